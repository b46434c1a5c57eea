"""Stand-in for torchaudio, which has no build for the CPU torch here.

Current ComfyUI's audio nodes import it at start; without it they fail to import, and the
frontend then misses node types it expects (its model-folder combos raise errors). The
test harness puts this folder on the server's PYTHONPATH only; WanFit never uses audio.
"""
__version__ = "0.0.0-wanfit-stub"
from . import functional, transforms  # noqa: E402,F401
