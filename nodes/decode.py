"""VAE decode: a Wan LATENT to ComfyUI IMAGE frames."""
from __future__ import annotations

import torch

from ..optim import loading
from ..wan.vae_common import FeatureCache, time_chunks
from . import comfy, stages
from .load import VAEHandle
from .types import default_dtype, from_comfy_latent


class WanFitVAEDecode:
    """Decode a Wan video LATENT with the Wan 2.1 or 2.2 VAE into IMAGE frames
    [frames, H, W, 3] in 0..1, ready for the core Save / Preview nodes. It runs on the GPU
    (the held DiT leaves it first when both would not fit) or, when even then it would not
    fit, on the CPU; the VAE leaves the device afterwards."""

    DISPLAY_NAME = "WanFit VAE Decode"
    CATEGORY = "WanFit/latent"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("WANFIT_VAE",), "latent": ("LATENT",)}}

    def decode(self, vae: VAEHandle, latent: dict):
        samples = latent["samples"]
        if samples.ndim != 5 or samples.shape[1] != vae.config.z_dim:
            raise ValueError(f"{vae.name} (Wan {vae.config.version} VAE) decodes [B, {vae.config.z_dim}, T, H, W] "
                             f"latents; got shape {tuple(samples.shape)}")
        x = from_comfy_latent(samples)
        scale = vae.config.spatial_compression
        width, height = x.shape[-1] * scale, x.shape[-2] * scale
        device = stages.vae_stage_device(vae, width, height, encode=False)
        frames = stages.run_stage(f"VAE decode ({vae.name}, {width}x{height})", device, lambda d: _decode(vae, x, d))
        return (torch.cat(frames),)


def _decode(vae: VAEHandle, x: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Frames [f, H, W, 3] in 0..1 per decoded chunk, each moved to the CPU as it is done."""
    model = loading.load_vae(vae.ckpt, default_dtype(device), device)
    try:
        frames = []
        with torch.inference_mode():
            for i in range(x.shape[0]):
                cache = FeatureCache()
                for chunk in time_chunks(x.shape[2], 1):  # as WanVAE.decode, one latent frame a time
                    comfy.throw_if_interrupted()
                    # each chunk leaves the device at once: a whole video in float32 would
                    # not (121 frames at 1280x704: 1.3 GB, twice over while concatenated)
                    video = model.decode_chunk(x[i:i + 1, :, chunk], cache)[0].clamp_(-1, 1).cpu()
                    frames.append(((video.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1))
        return frames
    finally:
        del model
        comfy.free_memory_cache()


NODES = {"WanFitVAEDecode": WanFitVAEDecode}
