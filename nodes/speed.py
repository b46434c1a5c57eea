"""Speed nodes: sparse self-attention and compiled blocks, set on a WanFit model between the
loader and the sampler (as the Memory node's settings are), and the glue the sampler calls.

Neither changes the weights: the sampler keeps its loaded model and applies them per pass
(``optim/sparse.py`` wraps the block stack and sets the self-attention op; ``optim/compile.py``
binds one compiled block forward on every block, or takes it off again).
"""
from __future__ import annotations

import logging
from dataclasses import replace

from ..optim import compile as compiled_blocks
from ..optim.compile import CompiledRun, CompileSettings
from ..optim.planner import latent_shape
from ..optim.sparse import GRANULARITIES, PATTERNS, SparseAttention, SparseSettings
from .load import ModelHandle
from .types import ImageEmbeds

log = logging.getLogger("WanFit")
CATEGORY = "WanFit/speed"


def token_grid(handle: ModelHandle, embeds: ImageEmbeds) -> tuple[int, int, int]:
    """The DiT's token grid (frames, rows, columns after patching) for these embeds."""
    f, h, w = latent_shape(handle.config, embeds.frames, embeds.width, embeds.height)
    pt, ph, pw = handle.config.patch_size
    return f // pt, h // ph, w // pw


class WanFitSparseAttention:
    """Sparse self-attention for long videos (flex_attention, block-sparse): radial = Radial
    Attention's mask (neighbouring frames dense, the spatial window halving with each doubling of
    the frame distance; decay scales it, 1 = the paper's, 0.2 / 0.8 = its Wan 2.1 / 2.2 scripts);
    window = a plain window of frames, rows and columns. The first steps and blocks can stay
    dense (the published recipe: the first block, about a quarter of the steps). granularity
    token keeps the mask exactly; block computes every touched 128-token block whole (faster,
    as block-sparse kernels do). Outputs the model with it and, given the image embeds, the
    share of attention computed."""

    DISPLAY_NAME = "WanFit Sparse Attention"
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("WANFIT_MODEL", "STRING")
    RETURN_NAMES = ("model", "kept")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANFIT_MODEL",),
            "pattern": (list(PATTERNS), {"default": "radial"}),
            "decay": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.05}),
            "attention_sink": ("BOOLEAN", {"default": True}),
            "window_frames": ("INT", {"default": 2, "min": 0, "max": 1000}),
            "window_rows": ("INT", {"default": 8, "min": 0, "max": 1000}),
            "window_columns": ("INT", {"default": 8, "min": 0, "max": 1000}),
            "dense_steps": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "dense_blocks": ("INT", {"default": 1, "min": 0, "max": 64}),
            "granularity": (list(GRANULARITIES), {"default": "token"}),
        }, "optional": {"image_embeds": ("WANFIT_IMAGE_EMBEDS",)}}

    def apply(self, model: ModelHandle, pattern: str, decay: float, attention_sink: bool, window_frames: int,
              window_rows: int, window_columns: int, dense_steps: int, dense_blocks: int, granularity: str = "token",
              image_embeds: ImageEmbeds | None = None):
        settings = SparseSettings(pattern, decay, attention_sink, (window_frames, window_rows, window_columns),
                                  dense_steps, dense_blocks, granularity=granularity)
        text = settings.describe()
        if image_embeds is not None:
            grid = token_grid(model, image_embeds)
            mask = SparseAttention(settings).mask(grid, "cpu")
            text += f". {mask.describe()}"
        text += ". With context windows each window's grid gets its own mask (the sampler logs it)."
        log.info("WanFit: %s", text)
        return replace(model, sparse=settings), text


class WanFitCompile:
    """Compiled blocks: torch.compile of the DiT block, compiled once and reused by every block,
    both experts and later jobs (no recompiles across steps, CFG modes, LoRA strengths, step-cache
    skips or block swap). The first job pays the warm-up (reported in the telemetry); when
    compilation fails the blocks run uncompiled, with one warning. inductor makes fused kernels;
    aot_eager / eager only check that the block compiles."""

    DISPLAY_NAME = "WanFit Compile"
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("WANFIT_MODEL",)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANFIT_MODEL",),
            "compile_backend": (list(compiled_blocks.BACKENDS), {"default": "inductor"}),
            "compile_mode": (list(compiled_blocks.MODES), {"default": "default"}),
        }}

    def apply(self, model: ModelHandle, compile_backend: str, compile_mode: str):
        return (replace(model, compiled=CompileSettings(compile_backend, compile_mode)),)


class PassSpeed:
    """One sampling pass's sparse attention and compiled blocks (either may be off)."""

    def __init__(self, handle: ModelHandle, model, parallel: bool = False):
        self.model = model
        self.sparse = SparseAttention(handle.sparse) if handle.sparse is not None else None
        if handle.compiled is not None and parallel:
            # a failed compile reruns the call from its input, which would leave the ranks' exchanges out of step
            log.warning("WanFit Compile: compiled blocks are off in a multi-GPU pass; %s runs its blocks eagerly",
                        handle.name)
        if handle.compiled is not None and not parallel:
            self.compiled = CompiledRun(model, handle.compiled)
        else:
            self.compiled = None
            compiled_blocks.detach(model)  # a held model compiled by an earlier job

    def wrap(self, run_blocks):
        if self.sparse is not None:
            run_blocks = self.sparse.wrap(run_blocks, self.model.blocks)
        if self.compiled is not None:  # outermost: a failed compile reruns the whole call
            run_blocks = self.compiled.wrap(run_blocks)
        return run_blocks

    def record(self, tel) -> None:
        if self.sparse is not None:
            report = self.sparse.report()
            tel.record_speed("sparse_attention", report)
            for grid in report["grids"]:
                log.info("WanFit %s: %s", report["settings"], grid["line"])
        if self.compiled is not None:
            tel.record_speed("compiled_blocks", self.compiled.report())


NODES = {cls.__name__: cls for cls in (WanFitSparseAttention, WanFitCompile)}
