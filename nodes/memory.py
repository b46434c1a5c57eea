"""The memory node, and the plan every sampling pass makes before it loads a weight.

Without a Memory node the sampler plans with the defaults (``auto`` budget: free VRAM less
a reserve). The plan decides how many blocks swap, the prefetch depth and whether cond and
uncond run batched; it is logged in words with every job and travels in the LATENT.
"""
from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..optim import fp8, gguf, lora, parallel, planner
from ..optim.engine import SwapSettings
from ..optim.parallel import Mesh
from ..optim.sparse import SparseAttention, mask_bytes
from ..optim.step_cache import StepCache
from ..wan.attention import available_backends
from ..wan.denoise import DiTCall
from . import comfy, stages
from .load import ModelHandle
from .types import ImageEmbeds

log = logging.getLogger("WanFit")
CATEGORY = "WanFit/memory"
GIB = 2**30


@dataclass(frozen=True)
class MemorySettings:
    """What the user set on the Memory node; 0 / -1 mean "let the plan decide"."""

    budget_gb: float = 0.0
    reserve_gb: float = 1.5
    blocks_to_swap: int = -1
    prefetch: int = 1
    pin_memory: bool = True
    offload_embeddings: bool = False


@dataclass(frozen=True)
class JobPlan:
    """What a sampling pass runs with; ``plan`` is None where there is no VRAM to plan (CPU)."""

    plan: planner.MemoryPlan | None
    swap: SwapSettings
    batch_cfg: bool
    text: str


def storage_format(handle: ModelHandle) -> str:
    """The weight format the planner should count: the loader's choice, or the file's for auto
    ("gguf": a GGUF file's blocks kept as stored)."""
    if handle.weight_format != "auto":
        return handle.weight_format
    if isinstance(handle.ckpt, gguf.GGUFCheckpoint):
        return "gguf"
    stored = handle.ckpt.tensors["blocks.0.ffn.0.weight"].dtype
    if fp8.is_fp8(stored):
        return "fp8_e5m2" if stored == torch.float8_e5m2 else "fp8_e4m3fn_scaled"
    return handle.compute_dtype  # auto casts non-fp8 weights to the compute dtype


def as_loaded(handle: ModelHandle, unmerged: list[lora.AppliedLora]) -> planner.AsLoaded | None:
    """The DiT as the engine will load it, for the planner, when a weight format alone does not
    say it: a GGUF file (its own bytes, dequantised per matmul) or LoRAs applied unmerged
    (their factors travel with each block, their matmuls add activations)."""
    ckpt, dtype = handle.ckpt, planner.DTYPES[handle.compute_dtype]
    is_gguf = isinstance(ckpt, gguf.GGUFCheckpoint)
    if not is_gguf and not unmerged:
        return None
    keep = handle.weight_format == "auto"
    label = (f"{ckpt.quant_label()} GGUF" if keep else f"GGUF as {handle.weight_format}") if is_gguf \
        else storage_format(handle)
    if unmerged:
        label += f" + {len(unmerged)} unmerged LoRA{'s' if len(unmerged) > 1 else ''}"

    def build():
        if is_gguf:  # every block, since a file may store blocks in different types
            model = gguf.build_meta_dit(ckpt, planner.DTYPES.get(handle.weight_format, dtype), keep_quantized=keep)
        else:  # its blocks are alike: two stand for all
            with torch.device("meta"):
                model = planner.build_dit(replace(handle.config, num_layers=2), storage_format(handle), dtype)
        if unmerged:
            lora.attach_unmerged(model, unmerged, dtype)
        return model

    key = (handle.key, tuple((a.lora.key, a.strength) for a in unmerged))
    return planner.AsLoaded(key, label, handle.config.num_layers, build)


def cache_hook(cache, handle: ModelHandle, windows: int = 1) -> planner.BlocksHook | None:
    """A step cache as the planner traces it: its wrapper around the block stack (keeping the
    stack's input, storing the residual) and what it holds for the calls a trace does not
    make: the other branch when CFG runs one branch at a time, the other context windows."""
    if cache is None or not cache.cache.policy.skips:
        return None
    policy, storage, steps = cache.cache.policy, cache.cache.storage, cache.cache.steps
    on_device = storage is None or storage.type != "cpu"
    dtype, dim = planner.DTYPES[handle.compute_dtype], handle.config.dim

    def wrap(run, batch):
        traced = StepCache(policy, steps)  # a fresh cache: under a trace it computes and stores, never skips
        run_cached = traced.wrap(lambda state, call: run(state))
        branches = ("cond", "uncond") if batch == 2 else ("cond",)
        return lambda state: run_cached(state, DiTCall(0, 1.0, branches))

    def held(batch, tokens):
        if not on_device:
            return 0
        every = StepCache.held_bytes_for(policy, ("cond", "uncond"), tokens, dim, dtype, windows)
        traced = StepCache.held_bytes_for(policy, ("cond", "uncond") if batch == 2 else ("cond",), tokens, dim, dtype)
        return every - traced

    where = "on the GPU" if on_device else "on the CPU"
    return planner.BlocksHook((type(policy).__name__, on_device, windows), f"{type(policy).__name__} (residuals "
                              f"{where})", wrap, held)


def split_hook(hook: planner.BlocksHook | None, mesh: Mesh, rank: int) -> planner.BlocksHook:
    """``hook`` (a step cache, which sees the whole tokens) around one rank's share of the
    block stack, as the planner traces it (``parallel.trace_hook``: shape-only collectives)."""
    inner = parallel.trace_hook(mesh, rank)
    outer = hook.wrap if hook is not None else (lambda run, batch: run)
    label = f"rank {rank} of {mesh.describe()}" + (f", {hook.label}" if hook is not None else "")
    return planner.BlocksHook((hook.key if hook is not None else None, mesh, rank), label,
                              lambda run, batch: outer(inner(run, batch), batch),
                              hook.held if hook is not None else (lambda batch, tokens: 0))


def sparse_hook(handle: ModelHandle, device_type: str = "cuda") -> planner.BlocksHook | None:
    """Sparse attention as the planner traces it: its wrapper sets the op, which on fake tensors
    allocates what the flex kernel of ``device_type`` allocates; its block masks are held between
    calls."""
    settings = getattr(handle, "sparse", None)
    if settings is None:
        return None

    def wrap(run, batch):
        blocks = getattr(getattr(run, "__self__", None), "blocks", ())  # the traced model's own blocks
        sparse = SparseAttention(settings, device_type).wrap(lambda state, call: run(state), blocks)
        branches = ("cond", "uncond") if batch == 2 else ("cond",)
        return lambda state: sparse(state, DiTCall(settings.dense_steps, 1.0, branches))

    def held(batch, tokens):
        return mask_bytes(settings, (1, 1, tokens))

    return planner.BlocksHook(("sparse", settings, device_type), settings.describe(), wrap, held)


def chain_hooks(outer: planner.BlocksHook | None, inner: planner.BlocksHook | None) -> planner.BlocksHook | None:
    """Two wrappers of the block stack as one: ``outer`` (a step cache) around ``inner``."""
    if outer is None or inner is None:
        return outer or inner
    return planner.BlocksHook((outer.key, inner.key), f"{outer.label}; {inner.label}",
                              lambda run, batch: outer.wrap(inner.wrap(run, batch), batch),
                              lambda batch, tokens: outer.held(batch, tokens) + inner.held(batch, tokens))


def plan_job(handle: ModelHandle, embeds: ImageEmbeds, cfg: float, device: torch.device,
             settings: MemorySettings | None = None, cache=None, windows=None, split=None) -> JobPlan:
    """Plan one pass before loading; raises planner.PlanError (naming the smallest budget that
    works) when the job cannot fit. ``cache``: the pass's step cache (nodes/cache.JobCache);
    ``windows``: its context windows (optim/context.ContextWindows); ``split``: this rank's part
    of a multi-device pass (nodes/multigpu.Split): its share of the tokens is planned, and
    its batching follows rank 0's."""
    s = settings or MemorySettings()
    mesh = split.mesh if split is not None and split.mesh.world > 1 else None
    if device.type != "cuda" and s.budget_gb <= 0:
        text = (f"{handle.describe()}: running on {device.type}, the DiT stays in host memory; "
                "no VRAM budget to plan (give one on the WanFit Memory node to preview a card's plan).")
        if mesh is not None:
            text = f"Rank {split.rank} of {mesh.world} ({device}, {mesh.describe()}): {text}"
        return JobPlan(None, SwapSettings(0, s.prefetch, s.pin_memory, s.offload_embeddings), True, text)
    attention = handle.attention if handle.attention != "auto" else available_backends()[0]
    frames = embeds.latent_frames
    active = windows is not None and windows.active(frames)
    count = len(windows.index_lists(frames)) if active else 1
    hook = chain_hooks(cache_hook(cache, handle, count), sparse_hook(handle))
    batch = None if split is None or split.batch_cfg is None else (2 if split.batch_cfg else 1)
    plan = planner.plan_memory(
        handle.config, frames=embeds.frames, width=embeds.width, height=embeds.height,
        budget=int(s.budget_gb * GIB) if s.budget_gb > 0 else "auto", reserve=int(s.reserve_gb * GIB),
        weights=storage_format(handle), compute_dtype=planner.DTYPES[handle.compute_dtype],
        guidance=cfg != 1.0, cfg_batch=batch if cfg != 1.0 else None, attention=attention, device_type="cuda",
        fp8_matmul=device.type == "cuda" and fp8.scaled_mm_supported(device), prefetch=s.prefetch,
        loaded=as_loaded(handle, stages.held_unmerged_loras(handle)),
        hook=hook if mesh is None else split_hook(hook, mesh, split.rank),
        context_frames=windows.pixel_length if active else None, windows=count)
    swapped = plan.swapped if s.blocks_to_swap < 0 else min(s.blocks_to_swap, handle.config.num_layers)
    # A plan that swaps nothing says prefetch 0; blocks swapped by hand take the node's prefetch.
    prefetch = plan.prefetch if swapped == plan.swapped else s.prefetch
    swap = SwapSettings(swapped if device.type == "cuda" else 0, prefetch, s.pin_memory, s.offload_embeddings)
    text = plan.explain()
    if device.type != "cuda":  # a preview: say so, and what it assumes the card has
        text = (f"Preview for a GPU with {s.budget_gb:g} GiB to spend (this job runs on {device.type}, where "
                "nothing below applies): the GPU's kernels, UMT5-XXL and the Wan VAE at their full sizes. " + text)
    if active:
        text += f" Context windows: {windows.describe(frames)}."
    if swapped != plan.swapped:
        text += f" blocks_to_swap is set to {swapped} on the Memory node (the plan chose {plan.swapped})."
    if mesh is not None:
        text = f"Rank {split.rank} of {mesh.world} ({device}, {mesh.describe()}): {text}"
    return JobPlan(plan, swap, plan.batch == 2, text)


def plan_image_or_note(job: JobPlan) -> torch.Tensor:
    """The plan as a picture; a plain note image when there is no plan."""
    if job.plan is not None:
        return planner.plan_image(job.plan)
    from PIL import Image, ImageDraw  # ComfyUI ships Pillow

    image = Image.new("RGB", (960, 120), (32, 32, 32))
    ImageDraw.Draw(image).multiline_text((12, 12), textwrap.fill(job.text, 150), fill=(230, 230, 230))
    return torch.from_numpy(np.array(image)).float()[None] / 255


class WanFitMemory:
    """Memory plan for a Wan DiT: the VRAM budget (auto = free VRAM less the reserve), how many
    blocks swap (auto = the fewest that fit), the prefetch depth, pinned memory and whether the
    text / image embeddings visit the GPU only for their call. Outputs the model with these
    settings for the sampler, the plan as a picture and in words."""

    DISPLAY_NAME = "WanFit Memory"
    CATEGORY = CATEGORY
    FUNCTION = "plan"
    RETURN_TYPES = ("WANFIT_MODEL", "IMAGE", "STRING")
    RETURN_NAMES = ("model", "plan_image", "plan")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANFIT_MODEL",),
            "image_embeds": ("WANFIT_IMAGE_EMBEDS",),
            "budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5}),
            "reserve_gb": ("FLOAT", {"default": 1.5, "min": 0.0, "max": 64.0, "step": 0.25}),
            "blocks_to_swap": ("INT", {"default": -1, "min": -1, "max": 64}),
            "prefetch": ("INT", {"default": 1, "min": 0, "max": 8}),
            "pin_memory": ("BOOLEAN", {"default": True}),
            "offload_embeddings": ("BOOLEAN", {"default": False}),
        }}

    def plan(self, model: ModelHandle, image_embeds: ImageEmbeds, budget_gb: float, reserve_gb: float,
             blocks_to_swap: int, prefetch: int, pin_memory: bool, offload_embeddings: bool):
        settings = MemorySettings(budget_gb, reserve_gb, blocks_to_swap, prefetch, pin_memory, offload_embeddings)
        # Planned with CFG on (the costlier case); the sampler plans again with its own cfg.
        job = plan_job(model, image_embeds, cfg=5.0, device=comfy.compute_device(), settings=settings)
        log.info("WanFit memory plan: %s", job.text)
        return replace(model, memory=settings), plan_image_or_note(job), job.text


NODES = {"WanFitMemory": WanFitMemory}
