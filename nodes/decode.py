"""VAE decode: a Wan LATENT to ComfyUI IMAGE frames; the VAE tiling settings node."""
from __future__ import annotations

import torch

from ..optim import loading
from ..optim import tiling as vae_tiling  # `tiling` is an input name here
from ..optim.tiling import Tiling, TilingOptions
from . import comfy, stages
from .load import VAEHandle
from .types import default_dtype, from_comfy_latent


class WanFitVAETiling:
    """Tiled VAE settings for WanFit VAE Decode and Image-to-Video Encode (their optional
    `tiling` input; left unconnected they run as auto). auto: whole frames when they fit the
    GPU, else the largest tiles that do. manual: tiles of tile_size with this overlap,
    blended with feathered edges. off: never tile. Time runs in chunks of temporal_size
    frames through the VAE's causal cache, which is exact; temporal_overlap > 0 decodes
    overlapping windows afresh and cross-fades them instead, as ComfyUI's VAE Decode (Tiled)
    does (approximate)."""

    DISPLAY_NAME = "WanFit VAE Tiling"
    CATEGORY = "WanFit/latent"
    FUNCTION = "settings"
    RETURN_TYPES = ("WANFIT_VAE_TILING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tiling_mode": (list(vae_tiling.MODES), {"default": "manual"}),
            "tile_size": ("INT", {"default": vae_tiling.DEFAULT_TILE, "min": 64, "max": 4096, "step": vae_tiling.UNIT}),
            "overlap": ("INT", {"default": vae_tiling.DEFAULT_OVERLAP, "min": 0, "max": 2048, "step": vae_tiling.UNIT}),
            "temporal_size": ("INT", {"default": vae_tiling.DEFAULT_TEMPORAL, "min": 5, "max": 4097, "step": 4}),
            "temporal_overlap": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 4}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tiling_mode="manual", tile_size=512, overlap=64, temporal_size=5, temporal_overlap=0):
        if tiling_mode not in vae_tiling.MODES:
            return f"tiling_mode {tiling_mode!r}: expected one of {', '.join(vae_tiling.MODES)}"
        if None in (tile_size, overlap, temporal_size, temporal_overlap):
            return True  # linked values are checked again when the node runs
        return vae_tiling.check_options(tile_size, overlap, temporal_size, temporal_overlap) or True

    def settings(self, tiling_mode: str, tile_size: int, overlap: int, temporal_size: int, temporal_overlap: int):
        return (TilingOptions(tiling_mode, tile_size, overlap, temporal_size, temporal_overlap),)


class WanFitVAEDecode:
    """Decode a Wan video LATENT with the Wan 2.1 or 2.2 VAE into IMAGE frames
    [frames, H, W, 3] in 0..1, ready for the core Save / Preview nodes. It runs on the GPU
    (the held DiT leaves it first when both would not fit), in tiles when whole frames would
    not fit even then (see WanFit VAE Tiling), on the CPU only when not even small tiles fit;
    the VAE leaves the device afterwards."""

    DISPLAY_NAME = "WanFit VAE Decode"
    CATEGORY = "WanFit/latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        latent = ("LATENT", {"tooltip": "The sampled latent to decode into frames (a WanFit Sampler's output)."})
        return {"required": {"vae": ("WANFIT_VAE",), "latent": latent},
                "optional": {"tiling": ("WANFIT_VAE_TILING",)}}

    def decode(self, vae: VAEHandle, latent: dict, tiling: TilingOptions | None = None):
        samples = latent["samples"]
        if samples.ndim != 5 or samples.shape[1] != vae.config.z_dim:
            raise ValueError(f"{vae.name} (Wan {vae.config.version} VAE) decodes [B, {vae.config.z_dim}, T, H, W] "
                             f"latents; got shape {tuple(samples.shape)}")
        x = from_comfy_latent(samples)
        scale = vae.config.spatial_compression
        width, height = x.shape[-1] * scale, x.shape[-2] * scale
        # IMAGE [B*F, H, W, 3]: the tiles are blended straight into it, through a [B, 3, F, H, W] view
        b, frames = x.shape[0], 1 + vae.config.temporal_compression * (x.shape[2] - 1)
        images = torch.zeros(b * frames, height, width, 3)
        video = images.view(b, frames, height, width, 3).permute(0, 4, 1, 2, 3)
        stages.run_vae_stage(f"VAE decode ({vae.name}, {width}x{height})", vae, width, height, False,
                             tiling or vae_tiling.AUTO, lambda d, t: _decode(vae, x, d, t, video))
        return (images.add_(1).div_(2).clamp_(0, 1),)


def _decode(vae: VAEHandle, x: torch.Tensor, device: torch.device, tiles: Tiling, video: torch.Tensor) -> None:
    """Decode ``x`` into ``video`` on ``device``; each chunk leaves the device at once (a whole
    video in float32 would not fit: 121 frames at 1280x704 are 1.3 GB)."""
    model = loading.load_vae(vae.ckpt, default_dtype(device), device)
    try:
        vae_tiling.tiled_decode(model, x, tiles, out=video, progress=vae_progress())
    finally:
        del model
        comfy.free_memory_cache()


def vae_progress():
    """A tiled_decode / tiled_encode progress callback: ComfyUI's bar, and Cancel honoured."""
    bar = {}

    def report(done: int, total: int) -> None:
        comfy.throw_if_interrupted()
        if "bar" not in bar:
            bar["bar"] = comfy.progress_bar(total)
        bar["bar"].update_absolute(done, total)
    return report


NODES = {"WanFitVAEDecode": WanFitVAEDecode, "WanFitVAETiling": WanFitVAETiling}
