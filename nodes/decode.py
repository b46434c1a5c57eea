"""VAE decode: a Wan LATENT to ComfyUI IMAGE frames."""
from __future__ import annotations

import torch

from ..optim import loading
from . import comfy
from .load import VAEHandle
from .types import default_dtype, from_comfy_latent


class WanFitVAEDecode:
    """Decode a Wan video LATENT with the Wan 2.1 or 2.2 VAE into IMAGE frames
    [frames, H, W, 3] in 0..1, ready for the core Save / Preview nodes. The VAE leaves the
    compute device afterwards."""

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
        device = comfy.compute_device()
        model = loading.load_vae(vae.ckpt, default_dtype(device), device)
        try:
            frames = []
            with torch.inference_mode():
                for i in range(x.shape[0]):
                    comfy.throw_if_interrupted()
                    video = model.decode(x[i:i + 1])[0]  # [3, F, H, W] in [-1, 1]
                    frames.append(((video.float().cpu().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1))
        finally:
            del model
            comfy.free_memory_cache()
        return (torch.cat(frames),)


NODES = {"WanFitVAEDecode": WanFitVAEDecode}
