"""Device stages: the one DiT kept on the device between jobs, and room for each encoder.

The sampler keeps its last DiT loaded, so the next job with the same model and memory
settings starts sampling at once. The memory plan runs UMT5, CLIP and the VAE each in a
stage of its own with the DiT off the GPU: ``stage_device`` makes that so whenever the two
would not fit side by side (a 16 GB card holds a 14B fp8 expert or the VAE's working
memory, not both), and sends a stage to the CPU when even an empty GPU is too small.
The VAE stage tiles on the GPU instead (``vae_stage_device``): the CPU is its last resort,
and an out-of-memory on the GPU retries with smaller tiles first (``run_vae_stage``).
"""
from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from ..optim import loading, lora, tiling
from ..optim.engine import PreparedDiT, SwapSettings, prepare_dit
from ..optim.tiling import Tiling, TilingOptions
from . import comfy
from .load import ModelHandle, VAEHandle
from .types import default_dtype

T = TypeVar("T")
log = logging.getLogger("WanFit")
GIB = 2**30
MARGIN = 512 * 2**20  # cuBLAS / cuDNN workspaces and allocator slack on top of a stage's estimate
HOST_RESERVE = 4 * GIB  # host RAM a CPU VAE stage leaves to the frames it returns and the rest

_LOADED: dict = {"key": None, "model": None, "loras": ()}


def release_model() -> None:
    """Drop the held DiT, its pinned memory and device slots, and return its memory."""
    if _LOADED["model"] is not None:
        _LOADED["model"].close()
    _LOADED["key"] = _LOADED["model"] = None
    _LOADED["loras"] = ()
    gc.collect()
    comfy.free_memory_cache()


def lora_modes(handle: ModelHandle) -> list[tuple[lora.AppliedLora, str]]:
    """Each LoRA of ``handle`` with the mode a fresh load applies it in ("merged" / "unmerged")."""
    return [(lora.AppliedLora(c.lora, c.strength), lora.resolve_mode(c.mode, handle.mergeable))
            for c in handle.loras]


def _holds(handle: ModelHandle, swap: SwapSettings) -> bool:
    return _LOADED["model"] is not None and _LOADED["key"] == (handle.key, swap)


def unmerged_loras(handle: ModelHandle, swap: SwapSettings) -> list[lora.AppliedLora]:
    """The LoRAs ``get_model(handle, swap)`` would apply unmerged now: the unmerged-mode ones
    on a fresh load; on a held model whose LoRAs changed, the whole difference from what was
    merged into it. The memory plan counts their bytes (``lora.attach_unmerged`` on a meta model)."""
    if _holds(handle, swap):
        return lora.difference([a for a, _ in lora_modes(handle)], _LOADED["model"].loras.merged)
    return [a for a, mode in lora_modes(handle) if mode == "unmerged"]


def held_unmerged_loras(handle: ModelHandle) -> list[lora.AppliedLora]:
    """``unmerged_loras`` before the swap settings are known (the plan decides them): against
    the held model when it holds ``handle``'s weights, whatever they swap."""
    held = _LOADED["model"] is not None and _LOADED["key"][0] == handle.key
    return unmerged_loras(handle, _LOADED["key"][1]) if held else unmerged_loras(handle, None)


def get_model(handle: ModelHandle, swap: SwapSettings) -> PreparedDiT:
    """The DiT for ``handle`` on the compute device, swapping as ``swap`` says; a different
    one held before is released first, so two experts never share memory. When only the
    LoRAs (or their strengths) changed, the held model takes the change without reading its
    weights again (see ``PreparedDiT.set_loras``)."""
    if _holds(handle, swap):
        if _LOADED["loras"] != handle.lora_key:
            log.info("WanFit: %s: LoRAs changed; applying the change to the held weights (no reload)",
                     handle.describe())
            _LOADED["model"].set_loras([a for a, _ in lora_modes(handle)])
            _LOADED["loras"] = handle.lora_key
        return _LOADED["model"]
    release_model()
    model = prepare_dit(handle.ckpt, comfy.compute_device(), swap, dtype=loading.DTYPES[handle.compute_dtype],
                        weight_format=handle.weight_format, attention=handle.attention, loras=lora_modes(handle))
    _LOADED.update(key=(handle.key, swap), model=model, loras=handle.lora_key)
    return model


def stage_device(name: str, weight_bytes: int, work_bytes: int) -> torch.device:
    """Where an encoder stage (``name``: weights + working memory) runs: the compute device if
    it has room, after releasing the held DiT and asking ComfyUI to unload its own models when
    needed; the CPU when even then it would not fit."""
    device = torch.device(comfy.compute_device())
    if device.type == "cpu":
        return device
    need = weight_bytes + work_bytes + MARGIN
    free = _make_room(name, need, device)
    if free >= need:
        return device
    log.warning("WanFit: %s needs %.1f GiB on %s and %.1f GiB is free: it runs on the CPU (slower)",
                name, need / GIB, device, free / GIB)
    return torch.device("cpu")


def _make_room(name: str, need: int, device: torch.device) -> int:
    """Free bytes on ``device`` once the held DiT and ComfyUI's models have left, if ``need``
    was not free already."""
    free = comfy.free_vram(device)
    if free >= need:
        return free
    if _LOADED["model"] is not None:
        log.info("WanFit: %s needs %.1f GiB on %s; releasing the held DiT", name, need / GIB, device)
        release_model()
    comfy.unload_comfy_models(need, device)
    return comfy.free_vram(device)


def vae_stage_device(vae: VAEHandle, width: int, height: int, encode: bool,
                     options: TilingOptions = tiling.AUTO) -> tuple[torch.device, Tiling]:
    """Where and how the VAE encodes or decodes width x height frames: whole frames on the GPU
    when they fit (the held DiT and ComfyUI's models leave first if need be), else (``auto``)
    the largest tiles that fit on the GPU, else the CPU. ``manual`` tiles go to the GPU when
    they fit, ``off`` never tiles."""
    stage = f"VAE {'encode' if encode else 'decode'} ({vae.name}, {width}x{height})"
    device = torch.device(comfy.compute_device())
    dtype = default_dtype(device)
    wanted = options.manual() if options.mode == "manual" else options.whole(width, height)
    if device.type == "cpu":
        return device, _cpu_tiling(vae, width, height, encode, options)
    weights = loading.loaded_bytes(vae.ckpt, dtype)
    need = weights + tiling.work_bytes(vae.config, wanted, width, height, dtype, encode) + MARGIN
    free = _make_room(stage, need, device)
    if free >= need:
        return device, wanted
    if options.mode == "auto":
        tiles = tiling.choose_tiling(vae.config, width, height, dtype, free - weights - MARGIN, encode=encode,
                                     overlap=options.overlap, temporal_size=options.temporal_size,
                                     temporal_overlap=options.temporal_overlap)
        if tiles is not None:
            log.info("WanFit: %s needs %.1f GiB untiled on %s and %.1f GiB is free: it runs in %s",
                     stage, need / GIB, device, free / GIB, tiles.describe(vae.config, width, height))
            return device, tiles
    log.warning("WanFit: %s needs %.1f GiB on %s (%s) and %.1f GiB is free: it runs on the CPU (slower)",
                stage, need / GIB, device, wanted.describe(vae.config, width, height) if options.mode != "auto"
                else "even in the smallest tiles", free / GIB)
    return torch.device("cpu"), _cpu_tiling(vae, width, height, encode, options)


def _cpu_tiling(vae: VAEHandle, width: int, height: int, encode: bool, options: TilingOptions) -> Tiling:
    """On the CPU: the tiles asked for (manual / off), or (auto) whole frames when host RAM
    holds them, else the largest tiles it does."""
    wanted = options.manual() if options.mode == "manual" else options.whole(width, height)
    if options.mode != "auto":
        return wanted
    import psutil  # a ComfyUI requirement

    free = psutil.virtual_memory().available - HOST_RESERVE
    tiles = tiling.choose_tiling(vae.config, width, height, torch.float32, free, encode=encode,
                                 overlap=options.overlap, temporal_size=options.temporal_size,
                                 temporal_overlap=options.temporal_overlap)
    if tiles is None:
        return wanted.smaller(width, height) or wanted
    if tiles != wanted:
        log.info("WanFit: VAE on the CPU in %s (%.1f GiB of host RAM free)",
                 tiles.describe(vae.config, width, height), free / GIB)
    return tiles


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


def run_vae_stage(name: str, vae: VAEHandle, width: int, height: int, encode: bool, options: TilingOptions,
                  run: Callable[[torch.device, Tiling], T]) -> T:
    """``run(device, tiling)`` where ``vae_stage_device`` says. When a GPU runs out of memory
    all the same, its memory is returned and the stage runs again in smaller tiles (unless
    tiling is ``off``), down to the smallest; then on the CPU. Each retry is logged."""
    device, tiles = vae_stage_device(vae, width, height, encode, options)
    while device.type != "cpu":
        try:
            return run(device, tiles)
        except torch.OutOfMemoryError as err:
            message = str(err).splitlines()[0]
        gc.collect()  # the failed attempt's tensors went with the exception
        comfy.free_memory_cache()
        smaller = None if options.mode == "off" else tiles.smaller(width, height)
        if smaller is None:
            log.warning("WanFit: %s ran out of memory on %s in %s (%s); running it on the CPU instead (slower)",
                        name, device, tiles.describe(vae.config, width, height), message)
            device, tiles = torch.device("cpu"), _cpu_tiling(vae, width, height, encode, options)
        else:
            log.warning("WanFit: %s ran out of memory on %s in %s (%s); retrying in %s", name, device,
                        tiles.describe(vae.config, width, height), message, smaller.describe(vae.config, width, height))
            tiles = smaller
    return run(device, tiles)
