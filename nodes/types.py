"""Values travelling on WanFit sockets, and the LATENT conversions shared by the nodes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..wan.vae_common import Wan21VAEConfig, Wan22VAEConfig

SOLVER_STATE_KEY = "wanfit_solver_state"
SCHEDULE_KEY = "wanfit_schedule"


@dataclass(eq=False)
class TextEmbeds:
    """WANFIT_TEXT_EMBEDS: UMT5 contexts [1, 512, D] for the positive and negative prompt (CPU)."""

    positive: Tensor
    negative: Tensor
    encoder: str = ""


@dataclass(eq=False)
class ImageEmbeds:
    """WANFIT_IMAGE_EMBEDS: the video's size and, for image-to-video, its conditioning.

    ``y`` (Wan 2.1 / 2.2-A14B i2v): [1, 4 + z, T, h, w] mask + VAE latent (normalised);
    ``clip_fea``: CLIP vision features for Wan 2.1 i2v; ``first_latent`` (TI2V-5B with a start
    image): the Wan 2.2 VAE latent [1, 48, 1, h, w] that becomes the first latent frame, its
    tokens at timestep 0. All None for text-to-video.
    """

    width: int
    height: int
    frames: int
    y: Tensor | None = None
    clip_fea: Tensor | None = None
    first_latent: Tensor | None = None
    source: str = "WanFit Empty Embeds"

    @property
    def mode(self) -> str:
        if self.first_latent is not None:
            return "ti2v"
        return "t2v" if self.y is None else "i2v"

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1


def default_dtype(device: torch.device) -> torch.dtype:
    """Encoders and VAE: bfloat16 on an accelerator, float32 on the CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _vae_stats(channels: int) -> tuple[Tensor, Tensor]:
    config = {16: Wan21VAEConfig, 48: Wan22VAEConfig}.get(channels)
    if config is None:
        raise ValueError(f"a Wan latent has 16 (Wan 2.1 VAE) or 48 (Wan 2.2 VAE) channels, got {channels}")
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def to_comfy_latent(latent: Tensor) -> Tensor:
    """Normalised (model-space) latent -> ComfyUI LATENT samples (raw VAE latent, as ComfyUI's
    Wan nodes store it; its process_latent_in applies Wan's mean/std)."""
    mean, std = _vae_stats(latent.shape[1])
    return (latent.float().cpu() * std + mean).contiguous()


def from_comfy_latent(samples: Tensor) -> Tensor:
    """ComfyUI LATENT samples -> the normalised latent the DiT and our VAE work in."""
    if samples.ndim != 5:
        raise ValueError(f"a Wan video LATENT is [B, C, T, H, W]; got shape {tuple(samples.shape)}")
    mean, std = _vae_stats(samples.shape[1])
    return (samples.float().cpu() - mean) / std
