"""Stand-in for torchvision, which has no CPU build here.

The 2024 ComfyUI imports torchvision at start for models WanFit never uses (Stable
Cascade, LaMa); the test harness puts this folder on the server's PYTHONPATH only.
"""
__version__ = "0.0.0-wanfit-stub"
from . import transforms  # noqa: E402,F401
