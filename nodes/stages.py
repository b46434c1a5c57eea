"""Device stages: the one DiT kept on the device between jobs, and room for each encoder.

The sampler keeps its last DiT loaded, so the next job with the same model and memory
settings starts sampling at once. The memory plan runs UMT5, CLIP and the VAE each in a
stage of its own with the DiT off the GPU: ``stage_device`` makes that so whenever the two
would not fit side by side (a 16 GB card holds a 14B fp8 expert or the VAE's working
memory, not both), and sends a stage to the CPU when even an empty GPU is too small.
"""
from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from ..optim import loading, planner
from ..optim.engine import PreparedDiT, SwapSettings, prepare_dit
from . import comfy
from .load import ModelHandle, VAEHandle
from .types import default_dtype

T = TypeVar("T")
log = logging.getLogger("WanFit")
GIB = 2**30
MARGIN = 512 * 2**20  # cuBLAS / cuDNN workspaces and allocator slack on top of a stage's estimate

_LOADED: dict = {"key": None, "model": None}


def release_model() -> None:
    """Drop the held DiT, its pinned memory and device slots, and return its memory."""
    if _LOADED["model"] is not None:
        _LOADED["model"].close()
    _LOADED["key"] = _LOADED["model"] = None
    gc.collect()
    comfy.free_memory_cache()


def get_model(handle: ModelHandle, swap: SwapSettings) -> PreparedDiT:
    """The DiT for ``handle`` on the compute device, swapping as ``swap`` says; a different
    one held before is released first, so two experts never share memory."""
    key = (handle.key, swap)
    if _LOADED["key"] != key:
        release_model()
        model = prepare_dit(handle.ckpt, comfy.compute_device(), swap, dtype=loading.DTYPES[handle.compute_dtype],
                            weight_format=handle.weight_format, attention=handle.attention)
        _LOADED.update(key=key, model=model)
    return _LOADED["model"]


def stage_device(name: str, weight_bytes: int, work_bytes: int) -> torch.device:
    """Where an encoder stage (``name``: weights + working memory) runs: the compute device if
    it has room, after releasing the held DiT and asking ComfyUI to unload its own models when
    needed; the CPU when even then it would not fit."""
    device = torch.device(comfy.compute_device())
    if device.type == "cpu":
        return device
    need = weight_bytes + work_bytes + MARGIN
    if comfy.free_vram(device) >= need:
        return device
    if _LOADED["model"] is not None:
        log.info("WanFit: %s needs %.1f GiB on %s; releasing the held DiT", name, need / GIB, device)
        release_model()
    comfy.unload_comfy_models(need, device)
    free = comfy.free_vram(device)
    if free >= need:
        return device
    log.warning("WanFit: %s needs %.1f GiB on %s and %.1f GiB is free: it runs on the CPU (slower)",
                name, need / GIB, device, free / GIB)
    return torch.device("cpu")


def vae_stage_device(vae: VAEHandle, width: int, height: int, encode: bool) -> torch.device:
    """Where the VAE encodes or decodes width x height frames (see ``stages.stage_device``)."""
    dtype = default_dtype(comfy.compute_device())
    work = planner.encoder_work(vae.config.version, width, height, dtype, encode=encode)
    return stage_device(f"VAE {'encode' if encode else 'decode'} ({vae.name}, {width}x{height})",
                        loading.loaded_bytes(vae.ckpt, dtype), work)


def run_stage(name: str, device: torch.device, run: Callable[[torch.device], T]) -> T:
    """``run(device)``; when a GPU runs out of memory all the same (the stage estimates are
    estimates), its memory is returned and the stage runs again on the CPU."""
    try:
        return run(device)
    except torch.OutOfMemoryError as err:
        if device.type == "cpu":
            raise
        message = str(err).splitlines()[0]
    gc.collect()  # the failed attempt's tensors went with the exception
    comfy.free_memory_cache()
    log.warning("WanFit: %s ran out of memory on %s (%s); running it on the CPU instead (slower)",
                name, device, message)
    return run(torch.device("cpu"))
