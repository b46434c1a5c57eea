"""From a Wan DiT and its conditioning to the ``denoise(x, sigma, step)`` the sampler calls.

Classifier-free guidance runs cond and uncond as one batch of two (one pass through the
blocks, so block swap moves each block once per step) or one after the other (half the
activation memory). ``run_blocks`` is the hook where the memory engine and step caches take
over the block stack; by default the blocks run in order on the model's own device. Each
call says what it computes (``DiTCall``: step, sigma, the branch of each batch row, the
context window).

With ``windows`` (context windows, ``optim/context.py``) a step runs the DiT once per window on
that window's latent frames, with the i2v conditioning cut to the same frames, and fuses the
windows' guided velocities with per-frame weights; one window's activations exist at a time.
What lives behind ``run_blocks`` (block swap, fp8, LoRA, step caches) sees ordinary calls,
each tagged with its window's index.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

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


@dataclass(frozen=True)
class ContextWindow:
    """One context window of a step: the latent frames the DiT sees, in that order, and each
    one's share of the fused output (over all windows of a step the shares of a frame sum to 1)."""

    index: int
    frames: tuple[int, ...]
    weights: Tensor  # [len(frames)] float32


class Windowing(Protocol):
    """Splits a video of ``frames`` latent frames into context windows at ``step``
    (``optim.context.ContextWindows``). ``anchor_start_image``: every window's first frame takes
    the i2v conditioning of frame 0 (mask + start-image latent)."""

    anchor_start_image: bool

    def split(self, frames: int, step: int) -> Sequence[ContextWindow]: ...


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


def _window_conditioning(c: Conditioning, frames: Tensor, anchor: bool) -> Conditioning:
    """``c`` for a window: ``y`` (mask + image latent) cut to the window's frames, its first
    frame replaced by frame 0's with ``anchor``; text and CLIP features are per video."""
    if c.y is None:
        return c
    y = c.y.index_select(2, frames.to(c.y.device))
    if anchor:
        y[:, :, :1] = c.y[:, :, :1]
    return replace(c, y=y)


def fuse_windows(x: Tensor, windows: Sequence[ContextWindow], run: Callable[[ContextWindow, Tensor], Tensor]) -> Tensor:
    """``sum over windows of weights * run(window, x's frames of the window)``, placed back on each
    window's frames; one window's ``run`` at a time."""
    out = None
    for window in windows:
        frames = torch.tensor(window.frames, device=x.device)
        part = run(window, x.index_select(2, frames))
        if out is None:
            out = part.new_zeros(*part.shape[:2], x.shape[2], *part.shape[3:])
        out.index_add_(2, frames.to(part.device), part * window.weights.to(part).view(1, 1, -1, 1, 1))
        del part
    return out


def make_denoiser(model: WanModel, positive: Conditioning, negative: Conditioning | None, cfg: float,
                  batch_cfg: bool = True, run_blocks: RunBlocks | None = None,
                  first_latent: Tensor | None = None, windows: Windowing | None = None) -> Denoise:
    """``denoise(x, sigma, step) -> velocity`` with guidance ``uncond + cfg * (cond - uncond)``.

    The model sees timestep ``sigma * 1000`` (ComfyUI's convention for Wan). cfg 1 or no
    negative runs the positive prompt only. ``first_latent`` (TI2V-5B image-to-video, as the
    official textimage2video): the first latent frame is that image latent and its tokens see
    timestep 0; its velocity is set so the solver's x0 there is the image latent.
    ``windows``: context windows (see the module docstring); the window holding latent frame 0
    gets ``first_latent`` there, i2v ``y`` is cut per window.
    """
    run = run_blocks or run_all_blocks(model)
    device = model.patch_embedding.weight.device
    _, ph, pw = model.config.patch_size

    def forward(x: Tensor, call: DiTCall, context: Tensor, y, clip_fea, first_at: int | None) -> Tensor:
        """One DiT call; ``first_at``: where latent frame 0 (TI2V image latent) sits in ``x``."""
        sigma = call.sigma
        b, _, f, h, w = x.shape
        if first_latent is None or first_at is None:
            t = torch.full((b,), sigma * 1000.0, device=device)
        else:
            x = x.clone()
            x[:, :, first_at:first_at + 1] = first_latent.to(x).expand(b, -1, 1, -1, -1)
            t = torch.full((b, f, (h // ph) * (w // pw)), sigma * 1000.0, device=device)
            t[:, first_at] = 0.0
            t = t.flatten(1)
        out = model(x.to(device), t, context.to(device), None if clip_fea is None else clip_fea.to(device),
                    None if y is None else y.to(device), run_blocks=lambda state: run(state, call))
        return out.to(x.device)

    def guide(x: Tensor, call: DiTCall, p: Conditioning, n: Conditioning | None, first_at: int | None) -> Tensor:
        if n is None or cfg == 1.0:
            return forward(x, call, p.context, p.y, p.clip_fea, first_at)
        if batch_cfg:
            both = forward(torch.cat([x, x]), replace(call, branches=("cond", "uncond")),
                           torch.cat([p.context, n.context]), _cat(p.y, n.y), _cat(p.clip_fea, n.clip_fea), first_at)
            cond, uncond = both.chunk(2)
        else:
            cond = forward(x, call, p.context, p.y, p.clip_fea, first_at)
            uncond = forward(x, replace(call, branches=("uncond",)), n.context, n.y if n.y is not None else p.y,
                             n.clip_fea if n.clip_fea is not None else p.clip_fea, first_at)
        return uncond + cfg * (cond - uncond)

    def denoise(x: Tensor, sigma: float, step: int) -> Tensor:
        call = DiTCall(step, sigma)
        if windows is None:
            return guide(x, call, positive, negative, 0)
        anchor = windows.anchor_start_image

        def one(window: ContextWindow, xw: Tensor) -> Tensor:
            frames = torch.tensor(window.frames)
            p = _window_conditioning(positive, frames, anchor)
            n = None if negative is None else _window_conditioning(negative, frames, anchor)
            first_at = window.frames.index(0) if 0 in window.frames else None
            return guide(xw, replace(call, window=window.index), p, n, first_at)

        return fuse_windows(x, windows.split(x.shape[2], step), one)

    def guided(x: Tensor, sigma: float, step: int) -> Tensor:
        velocity = denoise(x, sigma, step)
        velocity[:, :, :1] = (x[:, :, :1] - first_latent.to(x)) / sigma
        return velocity

    return denoise if first_latent is None else guided
