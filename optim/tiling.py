"""Tiled VAE encode and decode for the Wan 2.1 / 2.2 VAEs: device memory follows the tile.

Space. The frame is cut into tiles on the latent grid: tiles of one size, spread evenly so
that neighbours share at least ``overlap`` pixels. Each tile is encoded or decoded as a
video of its own, one tile after the other, with its own causal feature cache, so only one
tile's activations and cache are on the device at a time; its results leave the device chunk
by chunk. Tiles are blended with feathered weights: linear ramps across each shared band,
normalised to sum to one at every pixel, so a tile's own border (where its convolutions saw
zero padding instead of the neighbour's pixels) weighs little. Attention in the middle block
sees the tile, not the frame: tiling is an approximation, exact only with one tile.

Time. ``temporal_size`` = 4n+1 frames: after the first frame, n latent frames (4n video
frames) go through a tile's cache per chunk; 5 is the official one latent frame at a time,
larger chunks cost memory in proportion. With ``temporal_overlap`` 0 (the default) chunks are
one causal stream: the cache hands every temporal convolution the frames it would have seen,
so chunking is exact and there is nothing to overlap or blend. ``temporal_overlap`` 4m > 0
is ComfyUI's VAE Decode (Tiled) behaviour instead: windows of ``temporal_size`` frames, each
a fresh stream, overlapping by m latent frames and cross-faded. It is approximate (a window's
first latent frame is decoded as a video's first frame) and only there for parity.

``choose_tiling`` is the ``auto`` setting: the whole frame when its working memory fits,
else the grid of tiles that fits with the least recomputed overlap, from the measured bytes
per pixel below.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..wan.vae_common import ENCODE_CHUNK, VAEConfig, WanVAE, time_chunks

MODES = ("auto", "manual", "off")
UNIT = 16  # tile sizes and overlaps are multiples of the coarser VAE grid (Wan 2.2: 16 px)
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64  # pixels, ComfyUI's default
DEFAULT_TEMPORAL = 5  # frames: one latent frame per chunk, as official
MIN_TILE = 128  # pixels: the smallest tile auto or an out-of-memory retry goes down to

# VAE working memory, bytes per pixel of a frame (or tile) per byte of the compute dtype:
# (chunks of 1 latent frame / 4 video frames, each further latent frame per chunk). The CPU
# allocator peaks of the full-size VAEs (random weights) from ``bench/vae_memory.py
# --chunked`` at 256x128 and 512x256, the larger of the two, rounded up; the cache of every
# temporal layer is included. WORK_HEADROOM is what a GPU may add (cuDNN workspaces,
# caching-allocator slack): the planner's guess, not measured on a GPU yet.
WORK_PER_PIXEL: dict[tuple[str, str], tuple[int, int]] = {
    ("2.1", "decode"): (4350, 1450), ("2.1", "encode"): (3400, 1250),
    ("2.2", "decode"): (4300, 1450), ("2.2", "encode"): (1650, 700),
}
WORK_HEADROOM = 1.15
# Below 256x128 pixels the per-pixel figures stop holding: the zero-padded borders of every
# convolution weigh more (at 128x64 up to 1.32x, Wan 2.1 encode: 4443 against 3360 at 256x128,
# bench/vae_memory.py). A tile or frame is budgeted as at least this many pixels.
MIN_BUDGET_PIXELS = 256 * 128


def check_options(tile_size: int, overlap: int, temporal_size: int, temporal_overlap: int) -> str | None:
    """What is wrong with these settings (None: nothing), saying what is allowed."""
    problems = []
    if tile_size < UNIT or tile_size % UNIT or overlap < 0 or overlap % UNIT:
        problems.append(f"tile_size {tile_size} / overlap {overlap}: both must be multiples of {UNIT} px "
                        f"(tile_size at least {UNIT})")
    if tile_size < 2 * overlap:
        problems.append(f"tile_size {tile_size} is smaller than twice its overlap {overlap}: "
                        f"use tile_size >= {2 * overlap} or overlap <= {tile_size // 2 // UNIT * UNIT}")
    if problem := _time_problem(temporal_size, temporal_overlap):
        problems.append(problem)
    return "; ".join(problems) or None


def _time_problem(temporal_size: int, temporal_overlap: int) -> str | None:
    if temporal_size < 5 or (temporal_size - 1) % 4:
        lo = max(5, (temporal_size - 1) // 4 * 4 + 1)
        return (f"temporal_size {temporal_size}: must be 4n+1 frames with n >= 1 (n latent frames "
                f"per chunk), e.g. {lo} or {lo + 4}")
    if temporal_overlap < 0 or temporal_overlap % 4 or 2 * temporal_overlap > temporal_size - 1:
        return (f"temporal_overlap {temporal_overlap}: must be a multiple of 4 frames from 0 to "
                f"{(temporal_size - 1) // 8 * 4} (half of temporal_size {temporal_size} - 1); "
                "0 = one exact causal stream")
    return None


@dataclass(frozen=True)
class Tiling:
    """One concrete split: tiles of ``tile_width`` x ``tile_height`` px (clipped to the frame:
    a tile as large as the frame is no tiling), ``overlap`` px shared between neighbours (at
    most half a tile), and the time settings described in the module docstring. Sizes are
    used on the VAE's latent grid (rounded down to it)."""

    tile_width: int
    tile_height: int
    overlap: int = DEFAULT_OVERLAP
    temporal_size: int = DEFAULT_TEMPORAL
    temporal_overlap: int = 0

    def __post_init__(self) -> None:
        problem = _time_problem(self.temporal_size, self.temporal_overlap)
        if min(self.tile_width, self.tile_height) < 1 or self.overlap < 0:
            problem = f"tiles of {self.tile_width}x{self.tile_height} px with overlap {self.overlap} px"
        if problem:
            raise ValueError(f"VAE tiling: {problem}")

    @property
    def chunk_latents(self) -> int:
        """Latent frames per chunk after the first."""
        return (self.temporal_size - 1) // 4

    def tile_pixels(self, width: int, height: int) -> int:
        """Pixels of one tile of a width x height frame."""
        return min(self.tile_width, width) * min(self.tile_height, height)

    def grid(self, config: VAEConfig, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of tiles over a width x height frame."""
        s = config.spatial_compression
        return (len(_space_axis(width // s, self.tile_width, self.overlap, s, False).inputs),
                len(_space_axis(height // s, self.tile_height, self.overlap, s, False).inputs))

    def describe(self, config: VAEConfig, width: int, height: int) -> str:
        cols, rows = self.grid(config, width, height)
        n = self.chunk_latents
        space = (f"whole {width}x{height} frames" if cols == rows == 1 else
                 f"{cols}x{rows} tiles of {min(self.tile_width, width)}x{min(self.tile_height, height)} px "
                 f"(overlap {self.overlap} px)")
        time = f"{n} latent frame{'s' if n > 1 else ''} per chunk"
        if self.temporal_overlap:
            time = f"windows of {self.temporal_size} frames overlapping by {self.temporal_overlap}"
        return f"{space}, {time}"

    def smaller(self, width: int, height: int) -> Tiling | None:
        """Tiles of about half the area (an out-of-memory retry); None below MIN_TILE."""
        longest = max(min(self.tile_width, width), min(self.tile_height, height))
        side = int(longest * 0.7) // UNIT * UNIT
        if side < max(MIN_TILE, 2 * self.overlap):
            return None
        return replace(self, tile_width=side, tile_height=side)


@dataclass(frozen=True)
class TilingOptions:
    """What the user asks for (the WanFit VAE Tiling node; unconnected: ``AUTO``). ``auto``
    picks the tile size with these overlap and time settings; ``manual`` uses them all;
    ``off`` never tiles (a stage too big for the GPU then runs on the CPU)."""

    mode: str = "auto"
    tile_size: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP
    temporal_size: int = DEFAULT_TEMPORAL
    temporal_overlap: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"VAE tiling mode {self.mode!r}: expected one of {', '.join(MODES)}")
        problem = check_options(self.tile_size, self.overlap, self.temporal_size, self.temporal_overlap)
        if problem:
            raise ValueError(f"VAE tiling: {problem}")

    def whole(self, width: int, height: int) -> Tiling:
        """No spatial tiling, these time settings (the overlap stays for ``smaller``)."""
        return Tiling(width, height, self.overlap, self.temporal_size, self.temporal_overlap)

    def manual(self) -> Tiling:
        return Tiling(self.tile_size, self.tile_size, self.overlap, self.temporal_size, self.temporal_overlap)


AUTO = TilingOptions()


def work_bytes(config: VAEConfig, tiling: Tiling, width: int, height: int, dtype: torch.dtype,
               encode: bool = False) -> int:
    """Device working memory of a VAE stage over width x height frames with ``tiling``: one
    tile's activations and feature cache, in ``dtype``, with WORK_HEADROOM (a tile of at
    least MIN_BUDGET_PIXELS)."""
    first, extra = WORK_PER_PIXEL[config.version, "encode" if encode else "decode"]
    per_pixel = (first + extra * (tiling.chunk_latents - 1)) * WORK_HEADROOM
    return int(per_pixel * dtype.itemsize * max(tiling.tile_pixels(width, height), MIN_BUDGET_PIXELS))


def choose_tiling(config: VAEConfig, width: int, height: int, dtype: torch.dtype, free_bytes: int, *,
                  encode: bool = False, overlap: int = DEFAULT_OVERLAP, temporal_size: int = DEFAULT_TEMPORAL,
                  temporal_overlap: int = 0) -> Tiling | None:
    """The ``auto`` tiling: whole frames when their working memory fits ``free_bytes`` (what is
    left on the device after the VAE's weights), else the grid of tiles that fits with the
    least work: each grid's tiles are as small as covering the frame allows, and of the grids
    whose tile fits, the one computing the fewest pixels (overlaps are computed twice) wins,
    then the one with fewer tiles. None when not even MIN_TILE tiles fit. Pure: the same
    numbers give the same answer."""
    whole = Tiling(width, height, overlap, temporal_size, temporal_overlap)
    if work_bytes(config, whole, width, height, dtype, encode) <= free_bytes:
        return whole
    s = config.spatial_compression
    best = None
    for cols, tile_w in _tile_sizes(width // s, overlap // s, MIN_TILE // s):
        for rows, tile_h in _tile_sizes(height // s, overlap // s, MIN_TILE // s):
            tiling = Tiling(tile_w * s, tile_h * s, overlap, temporal_size, temporal_overlap)
            if work_bytes(config, tiling, width, height, dtype, encode) > free_bytes:
                continue
            cost = (cols * rows * tile_w * tile_h, cols * rows)
            if best is None or cost < best[0]:
                best = cost, tiling
    return None if best is None else best[1]


def _tile_sizes(size: int, overlap: int, smallest: int) -> list[tuple[int, int]]:
    """(tiles, the smallest tile giving that many) along one axis of ``size`` latent pixels,
    for every count whose tile is at least ``smallest`` and twice the overlap."""
    out = [(1, size)]
    for n in range(2, size + 1):
        tile = overlap + math.ceil((size - overlap) / n)
        if tile < max(smallest, 2 * overlap, 1):
            break
        if len(_spans(size, tile, overlap)) == n and tile < out[-1][1]:
            out.append((n, tile))
    return out


# ----------------------------------------------------------------------------- geometry

def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of equal tiles covering 0..size, spread evenly, sharing >= overlap."""
    if tile >= size:
        return [(0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [(i * (size - tile) // (n - 1), i * (size - tile) // (n - 1) + tile) for i in range(n)]


def _feather(spans: list[tuple[int, int]]) -> list[Tensor]:
    """Each span's blend weights: 1 where it is alone, linear ramps down to its edges across the
    parts it shares with its neighbours, normalised so all spans sum to 1 at every position."""
    raw = []
    for i, (a, b) in enumerate(spans):
        pos = torch.arange(a, b, dtype=torch.float64) + 0.5
        w = torch.ones(b - a, dtype=torch.float64)
        if i > 0 and spans[i - 1][1] > a:
            w = torch.minimum(w, (pos - a) / (spans[i - 1][1] - a))
        if i + 1 < len(spans) and spans[i + 1][0] < b:
            w = torch.minimum(w, (b - pos) / (b - spans[i + 1][0]))
        raw.append(w)
    total = torch.zeros(spans[-1][1], dtype=torch.float64)
    for (a, b), w in zip(spans, raw):
        total[a:b] += w
    return [(w / total[a:b]).float() for (a, b), w in zip(spans, raw)]


@dataclass(frozen=True)
class _Axis:
    """One axis of the split: where each piece reads its input and writes its output, and its
    blend weights over the output (None: one piece, nothing to blend)."""

    inputs: list[slice]
    outputs: list[slice]
    weights: list[Tensor | None]


def _axis(spans_in: list[tuple[int, int]], spans_out: list[tuple[int, int]]) -> _Axis:
    weights = _feather(spans_out) if len(spans_out) > 1 else [None]
    return _Axis([slice(*s) for s in spans_in], [slice(*s) for s in spans_out], weights)


def _space_axis(latent_size: int, tiling_size: int, overlap: int, unit: int, encode: bool) -> _Axis:
    """Tiles along one spatial axis, on the latent grid; pixels on the video side."""
    tile = max(1, tiling_size // unit)
    spans = _spans(latent_size, tile, min(overlap // unit, tile // 2))
    pixels = [(a * unit, b * unit) for a, b in spans]
    return _axis(pixels, spans) if encode else _axis(spans, pixels)


def _time_axis(latents: int, tiling: Tiling, compression: int, encode: bool) -> _Axis:
    """One causal stream, or (temporal_overlap > 0) overlapping windows, each a fresh stream."""
    if tiling.temporal_overlap == 0:
        spans = [(0, latents)]
    else:
        spans = _spans(latents, 1 + tiling.chunk_latents, tiling.temporal_overlap // 4)
    # a window's first latent frame stands for one video frame, the others for `compression`
    frames = [(0 if a == 0 else compression * a, compression * (b - 1) + 1) for a, b in spans]
    return _axis(frames, spans) if encode else _axis(spans, frames)


def _blend(target: Tensor, piece: Tensor, weights: tuple[Tensor | None, ...], alone: bool) -> None:
    """target (a slice of the output, zeros or earlier pieces) += piece x its weights."""
    if alone:
        target.copy_(piece)
        return
    t, h, w = (torch.ones(n) if x is None else x for x, n in zip(weights, piece.shape[2:]))
    target.addcmul_(piece, (t[:, None, None] * h[:, None] * w[None, :]).to(piece.device))


# ----------------------------------------------------------------------------- encode / decode

Progress = Callable[[int, int], None]


@torch.no_grad()
def tiled_decode(model: WanVAE, latent: Tensor, tiling: Tiling, out: Tensor | None = None,
                 progress: Progress | None = None) -> Tensor:
    """Normalised latent [B, z, T, h, w] -> video [B, 3, 1+4(T-1), h*s, w*s] in [-1, 1].

    Runs on ``model``'s device, tile by tile; each chunk moves to ``out``'s device (default: a
    new float32 CPU tensor; pass a view of your own buffer, e.g. a permuted [F, H, W, 3]
    IMAGE, to write there). ``progress(done, total)`` runs after every chunk. With one tile
    and temporal_overlap 0 the result is bit-identical to ``model.decode``.
    """
    config = model.config
    b, _, t, h, w = latent.shape
    s, tc = config.spatial_compression, config.temporal_compression
    shape = (b, config.channels // config.patch_size**2, 1 + tc * (t - 1), h * s, w * s)
    if out is None:
        out = torch.zeros(shape)
    elif tuple(out.shape) != shape:
        raise ValueError(f"tiled_decode: out has shape {tuple(out.shape)}, expected {shape}")
    else:
        out.zero_()
    times = _time_axis(t, tiling, tc, encode=False)
    rows = _space_axis(h, tiling.tile_height, tiling.overlap, s, encode=False)
    cols = _space_axis(w, tiling.tile_width, tiling.overlap, s, encode=False)
    alone = len(times.inputs) == len(rows.inputs) == len(cols.inputs) == 1
    n = tiling.chunk_latents
    per_tile = sum(len(time_chunks(span.stop - span.start, n)) for span in times.inputs)
    total, done = b * len(rows.inputs) * len(cols.inputs) * per_tile, 0
    for i in range(b):
        for y_in, y_out, wy in zip(rows.inputs, rows.outputs, rows.weights):
            for x_in, x_out, wx in zip(cols.inputs, cols.outputs, cols.weights):
                for t_in, t_out, wt in zip(times.inputs, times.outputs, times.weights):
                    chunks = time_chunks(t_in.stop - t_in.start, n)
                    stream = model.decode_stream(latent[i:i + 1, :, t_in, y_in, x_in], n)
                    for chunk, video in zip(chunks, stream):
                        video = video.to(out.device)
                        first = 0 if chunk.start == 0 else 1 + tc * (chunk.start - 1)
                        frames = slice(first, first + video.shape[2])
                        target = out[i:i + 1, :, t_out.start + frames.start:t_out.start + frames.stop, y_out, x_out]
                        _blend(target, video, (None if wt is None else wt[frames], wy, wx), alone)
                        del video
                        done += 1
                        if progress is not None:
                            progress(done, total)
                    del stream
    return out.clamp_(-1, 1)


@torch.no_grad()
def tiled_encode(model: WanVAE, video: Tensor, tiling: Tiling, progress: Progress | None = None) -> Tensor:
    """Video [B, 3, 1+4n, H, W] in [-1, 1] (any device) -> normalised latent [B, z, 1+n, H/s, W/s],
    float32 on the CPU.

    Each tile runs on ``model``'s device, its frames moved there chunk by chunk; the tile's
    latent comes back to the CPU and is blended there. ``progress(done, total)`` runs after
    every chunk. With one tile and temporal_overlap 0 the result is bit-identical to
    ``model.encode``.
    """
    config = model.config
    b, _, f, height, width = video.shape
    s, tc = config.spatial_compression, config.temporal_compression
    if (f - 1) % ENCODE_CHUNK or height % s or width % s:
        raise ValueError(f"tiled_encode: Wan {config.version} VAE encodes 4n+1 frames of multiples of "
                         f"{s} px; got {f} frames of {width}x{height}")
    t = 1 + (f - 1) // tc
    out = torch.zeros(b, config.z_dim, t, height // s, width // s)
    times = _time_axis(t, tiling, tc, encode=True)
    rows = _space_axis(height // s, tiling.tile_height, tiling.overlap, s, encode=True)
    cols = _space_axis(width // s, tiling.tile_width, tiling.overlap, s, encode=True)
    alone = len(times.inputs) == len(rows.inputs) == len(cols.inputs) == 1
    chunk = ENCODE_CHUNK * tiling.chunk_latents
    per_tile = sum(len(time_chunks(span.stop - span.start, chunk)) for span in times.inputs)
    count = {"done": 0, "total": b * len(rows.inputs) * len(cols.inputs) * per_tile}

    def tick() -> None:
        count["done"] += 1
        if progress is not None:
            progress(count["done"], count["total"])

    for i in range(b):
        for y_in, y_out, wy in zip(rows.inputs, rows.outputs, rows.weights):
            for x_in, x_out, wx in zip(cols.inputs, cols.outputs, cols.weights):
                for t_in, t_out, wt in zip(times.inputs, times.outputs, times.weights):
                    latent = model.encode(video[i:i + 1, :, t_in, y_in, x_in], chunk, tick).to(out.device)
                    _blend(out[i:i + 1, :, t_out, y_out, x_out], latent, (wt, wy, wx), alone)
                    del latent
    return out
