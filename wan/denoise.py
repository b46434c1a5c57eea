"""From a Wan DiT and its conditioning to the ``denoise(x, sigma, step)`` the sampler calls.

Classifier-free guidance runs cond and uncond as one batch of two (one pass through the
blocks, so block swap moves each block once per step) or one after the other (half the
activation memory). ``run_blocks`` is the hook where the memory engine and step caches take
over the block stack; by default the blocks run in order on the model's own device. Each
call says what it computes (``DiTCall``: step, sigma, the branch of each batch row).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .model import WanModel, WanState
from .sampling import Denoise


@dataclass(frozen=True)
class DiTCall:
    """What one call of the block stack computes, for hooks that keep state across calls
    (step caches keep one state per branch and per context window)."""

    step: int  # index in the whole schedule (both passes of a two-pass job)
    sigma: float
    branches: tuple[str, ...] = ("cond",)  # one per batch row: "cond" or "uncond"
    window: int | None = None  # context window index, None when the whole video runs at once


RunBlocks = Callable[[WanState, DiTCall], WanState]
"""``run_blocks(state, call) -> state`` with ``state.x`` passed through every block."""


def run_all_blocks(model: WanModel) -> RunBlocks:
    return lambda state, call: model.run_blocks(state)


@dataclass
class Conditioning:
    """One prompt's inputs to the DiT, batch size 1: text context, optional i2v latent ``y``
    and CLIP image features."""

    context: Tensor  # [1, 512, text_dim]
    y: Tensor | None = None  # [1, in_dim - out_dim, F, H, W]
    clip_fea: Tensor | None = None  # [1, 257, clip_dim]


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None else torch.cat([a, b if b is not None else a])


def make_denoiser(model: WanModel, positive: Conditioning, negative: Conditioning | None, cfg: float,
                  batch_cfg: bool = True, run_blocks: RunBlocks | None = None,
                  first_latent: Tensor | None = None) -> Denoise:
    """``denoise(x, sigma, step) -> velocity`` with guidance ``uncond + cfg * (cond - uncond)``.

    The model sees timestep ``sigma * 1000`` (ComfyUI's convention for Wan). cfg 1 or no
    negative runs the positive prompt only. ``first_latent`` (TI2V-5B image-to-video, as the
    official textimage2video): the first latent frame is that image latent and its tokens see
    timestep 0; its velocity is set so the solver's x0 there is the image latent.
    """
    run = run_blocks or run_all_blocks(model)
    device = model.patch_embedding.weight.device
    _, ph, pw = model.config.patch_size

    def forward(x: Tensor, call: DiTCall, context: Tensor, y, clip_fea) -> Tensor:
        sigma = call.sigma
        b, _, f, h, w = x.shape
        if first_latent is None:
            t = torch.full((b,), sigma * 1000.0, device=device)
        else:
            x = torch.cat([first_latent.to(x).expand(b, -1, 1, -1, -1), x[:, :, 1:]], dim=2)
            t = torch.full((b, f, (h // ph) * (w // pw)), sigma * 1000.0, device=device)
            t[:, 0] = 0.0
            t = t.flatten(1)
        out = model(x.to(device), t, context.to(device), None if clip_fea is None else clip_fea.to(device),
                    None if y is None else y.to(device), run_blocks=lambda state: run(state, call))
        return out.to(x.device)

    def guided(x: Tensor, sigma: float, step: int) -> Tensor:
        velocity = denoise(x, sigma, step)
        velocity[:, :, :1] = (x[:, :, :1] - first_latent.to(x)) / sigma
        return velocity

    def denoise(x: Tensor, sigma: float, step: int) -> Tensor:
        p, call = positive, DiTCall(step, sigma)
        if negative is None or cfg == 1.0:
            return forward(x, call, p.context, p.y, p.clip_fea)
        n = negative
        if batch_cfg:
            both = forward(torch.cat([x, x]), replace(call, branches=("cond", "uncond")),
                           torch.cat([p.context, n.context]), _cat(p.y, n.y), _cat(p.clip_fea, n.clip_fea))
            cond, uncond = both.chunk(2)
        else:
            cond = forward(x, call, p.context, p.y, p.clip_fea)
            uncond = forward(x, replace(call, branches=("uncond",)), n.context, n.y if n.y is not None else p.y,
                             n.clip_fea if n.clip_fea is not None else p.clip_fea)
        return uncond + cfg * (cond - uncond)

    return denoise if first_latent is None else guided
