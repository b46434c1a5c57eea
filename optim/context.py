"""Context windows: a long latent video denoised in overlapping windows of frames, fused per frame.

The DiT runs once per window on that window's latent frames (``wan.denoise.make_denoiser``
with ``windows=``), so activation memory follows the window length, not the video length.
The window index lists and the fuse weights are ComfyUI's (``comfy/context_windows.py``,
ComfyUI 0.3.64 and later), reproduced exactly, with its names:

- schedules: ``standard_static`` (fixed windows ``length - overlap`` apart, the last one moved
  back to end on the last frame), ``standard_uniform`` / ``looped_uniform`` (AnimateDiff's
  uniform windows, shifted every step by the bit-reversed step index; ``looped`` lets windows
  wrap from the last frame to the first, ``standard`` moves wrapping windows to the end;
  ``stride`` > 1 adds windows whose frames are 2, 4, ... apart), ``batched`` (disjoint windows);
- fuse methods: ``flat`` (plain mean), ``pyramid`` (weight grows towards the window's middle),
  ``overlap-linear`` (linear ramps over the overlap only, as kijai's WanVideoWrapper),
  ``relative`` (weight 1 at the window's centre falling to 0.01 at its ends, by frame index).

As in ComfyUI, windows are used only when the video has more latent frames than a window;
otherwise the whole video runs as one window. FreeNoise (``freenoise``) is ComfyUI's /
AnimateDiff-Evolved's noise shuffle: each window's new frames start from a seeded permutation
of the previous window's noise, so overlapping windows start out alike.

Lengths are given in video (pixel) frames and converted as ComfyUI's ``WAN Context Windows``
node does: a 4n+1-frame window is n+1 latent frames (``(length - 1) // 4 + 1``); an overlap of
``o`` video frames is ``ceil(o / 4)`` latent frames (each latent frame after the first stands
for 4 video frames). ``stride`` is not a frame count (ComfyUI's meaning: how many spacings
1, 2, 4, ... the uniform schedules use) and is not converted.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..wan.denoise import ContextWindow

SCHEDULES = ("standard_static", "standard_uniform", "looped_uniform", "batched")
FUSE_METHODS = ("pyramid", "relative", "flat", "overlap-linear")
UNIFORM = ("standard_uniform", "looped_uniform")
VAE_TIME_STRIDE = 4  # Wan VAEs: 4n+1 video frames <-> n+1 latent frames
MIN_PIXEL_LENGTH = 5  # two latent frames: a one-frame window has no motion to share
RAMP_FLOOR = 1e-37  # ComfyUI's overlap-linear ramps start (end) here, never at 0


def latent_length(pixel_frames: int) -> int:
    """Latent frames of a 4n+1-frame window: n + 1 (at least 1)."""
    return max((pixel_frames - 1) // VAE_TIME_STRIDE + 1, 1)


def latent_overlap(pixel_frames: int) -> int:
    """Latent frames covering an overlap of ``pixel_frames`` video frames: ceil(frames / 4)."""
    return max((pixel_frames - 1) // VAE_TIME_STRIDE + 1, 0)


def pixel_length(latent_frames: int) -> int:
    """Video frames of ``latent_frames`` latent frames: 4 (n - 1) + 1."""
    return VAE_TIME_STRIDE * (latent_frames - 1) + 1


def bit_reversed_fraction(step: int) -> float:
    """The step's 64 bits in reverse order, as a fraction of 2**64: 0, 1/2, 1/4, 3/4, 1/8, ...
    (ComfyUI's ``ordered_halving``), so successive steps shift uniform windows evenly."""
    reversed_bits = int(format(step, "064b")[::-1], 2)
    return reversed_bits / (1 << 64)


def _levels(frames: int, length: int, stride: int) -> int:
    """How many spacings (1, 2, 4, ...) a uniform schedule uses: ``stride``, capped at
    1 + ceil(log2(frames / length)), computed in integers."""
    k = 0
    while length << k < frames:
        k += 1
    return min(stride, k + 1)


def _uniform(frames: int, length: int, overlap: int, stride: int, step: int, end: int) -> list[list[int]]:
    """AnimateDiff's uniform windows, frame indices taken modulo ``frames``; ``end`` is how far
    past ``frames`` the window starts may go (0 closes the loop, ``-overlap`` does not)."""
    shift = bit_reversed_fraction(step)
    offset = int(round(frames * shift))
    windows = []
    for level in range(_levels(frames, length, stride)):
        spacing = 1 << level
        first = int(shift * spacing) + offset
        for start in range(first, frames + offset + end, length * spacing - overlap):
            windows.append([i % frames for i in range(start, start + length * spacing, spacing)])
    return windows


def _wrap_position(window: list[int], frames: int) -> int | None:
    """Position where a window's frames (mod ``frames``) stop increasing, None if they never do."""
    previous = -1
    for position, frame in enumerate(window):
        if frame % frames < previous:
            return position
        previous = frame % frames
    return None


def _moved_to_end(window: list[int], frames: int) -> list[int]:
    """The window's pattern of frames, rotated so it starts at 0 and then shifted to end on the
    last frame."""
    rotated = [(f - window[0] + frames) % frames for f in window]
    return [f + frames - 1 - rotated[-1] for f in rotated]


def _unwrapped(windows: list[list[int]], frames: int, length: int) -> list[list[int]]:
    """standard_uniform's fix-up of looped windows, as ComfyUI does it: a window that wraps is
    moved to end on the last frame; if the next window then lacks the frame the wrap landed on,
    a window starting there is inserted; repeated windows are dropped (first kept)."""
    drop = []
    i = 0
    while i < len(windows):
        wrap = _wrap_position(windows[i], frames)
        if wrap is not None:
            landed = windows[i][wrap]
            windows[i] = _moved_to_end(windows[i], frames)
            if landed not in windows[(i + 1) % len(windows)]:
                windows.insert(i + 1, list(range(landed, landed + length)))
        if any(windows[i] == windows[j] for j in range(i)):
            drop.append(i)
        i += 1
    return [w for i, w in enumerate(windows) if i not in drop]


def schedule_windows(schedule: str, frames: int, length: int, overlap: int, stride: int = 1,
                     closed_loop: bool = False, step: int = 0) -> list[list[int]]:
    """The latent frame indices of each window, exactly as ComfyUI's schedule function of the
    same name returns them (unchecked: see ``ContextWindows.check``). ``step`` matters for the
    uniform schedules only, ``closed_loop`` for ``looped_uniform`` only."""
    if schedule not in SCHEDULES:
        raise ValueError(f"context schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    whole = [list(range(frames))]
    if schedule == "looped_uniform":
        if frames < length:
            return whole
        return _uniform(frames, length, overlap, stride, step, 0 if closed_loop else -overlap)
    if frames <= length:
        return whole
    if schedule == "standard_uniform":
        return _unwrapped(_uniform(frames, length, overlap, stride, step, -overlap), frames, length)
    if schedule == "batched":
        return [list(range(s, min(s + length, frames))) for s in range(0, frames, length)]
    windows = []  # standard_static
    for start in range(0, frames, length - overlap):
        if start + length >= frames:
            start = frames - length
            windows.append(list(range(start, start + length)))
            break
        windows.append(list(range(start, start + length)))
    return windows


def fuse_weights(method: str, window: Sequence[int], frames: int, overlap: int) -> Tensor:
    """Un-normalised weight of each of the window's frames, as ComfyUI weighs them: float32, as
    its tensors; ``relative``: float64, the bias its running weighted average uses."""
    n = len(window)
    if method == "flat":
        return torch.ones(n)
    if method == "pyramid":
        half = (n + 1) // 2  # 1, 2, ..., peak, ..., 2, 1 (peak once if n is odd, twice if even)
        return torch.tensor([min(i + 1, n - i, half) for i in range(n)], dtype=torch.float32)
    if method == "overlap-linear":
        weights = torch.ones(n)
        if min(window) > 0:  # not the first window: fade in over the overlap
            _ramp_into(weights[:overlap], torch.linspace(RAMP_FLOOR, 1, overlap), window, overlap)
        if max(window) < frames - 1:  # not the last window: fade out (``[-0:]`` is all of it, as in ComfyUI)
            _ramp_into(weights[-overlap:], torch.linspace(1, RAMP_FLOOR, overlap), window, overlap)
        return weights
    if method == "relative":
        first, last = window[0], window[-1]
        centre, half_span = (first + last) / 2, (last - first + 1e-2) / 2
        return torch.tensor([max(1e-2, 1 - abs(f - centre) / half_span) for f in window], dtype=torch.float64)
    raise ValueError(f"fuse method {method!r}: use one of {', '.join(FUSE_METHODS)}")


def _ramp_into(target: Tensor, ramp: Tensor, window: Sequence[int], overlap: int) -> None:
    if target.numel() != ramp.numel():  # where ComfyUI's assignment fails
        raise ValueError(f"fuse method overlap-linear needs a context overlap of at least 1 latent frame and "
                         f"windows at least that long; got overlap {overlap} for a window of {len(window)} frames "
                         f"({window[0]}..{window[-1]})")
    target.copy_(ramp)


def freenoise(noise: Tensor, length: int, overlap: int, seed: int, dim: int = 2) -> Tensor:
    """FreeNoise: a copy of ``noise`` whose frames after the first window repeat earlier ones.
    Walking windows ``length - overlap`` apart, the ``length - overlap`` frames after each
    window are a seeded random permutation (CPU generator from ``seed``) of the same number of
    frames at that window's start, read after earlier replacements, as ComfyUI does."""
    out = noise.clone()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    frames, delta = noise.shape[dim], length - overlap
    for start in range(0, frames - length, delta):
        target = start + length
        count = min(delta, frames - target)
        if count <= 0:
            break
        source = torch.randperm(count, generator=generator, device="cpu") + start
        out.narrow(dim, target, count).copy_(out.index_select(dim, source.to(out.device)))
    return out


@dataclass(frozen=True)
class ContextWindows:
    """Context-window settings, in latent frames (``from_pixels`` takes video frames).

    ``anchor_start_image`` (image-to-video with a conditioning latent ``y``): every window's
    first frame gets the start image's conditioning (mask and image latent, ``y``'s frame 0),
    so windows far from the start still see the image: ComfyUI's ``cond_retain_index_list = 0``.
    """

    length: int
    overlap: int
    schedule: str = "standard_static"
    stride: int = 1
    fuse_method: str = "pyramid"
    closed_loop: bool = False
    freenoise: bool = False
    anchor_start_image: bool = False

    def __post_init__(self):
        problem = latent_settings_problem(self.length, self.overlap, self.schedule, self.stride, self.fuse_method)
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_pixels(cls, length: int, overlap: int, **options) -> ContextWindows:
        """Settings from a window length (4n+1) and overlap in video frames."""
        problem = settings_problem(length, overlap, options.get("schedule", "standard_static"),
                                   options.get("stride", 1), options.get("fuse_method", "pyramid"))
        if problem:
            raise ValueError(problem)
        return cls(latent_length(length), latent_overlap(overlap), **options)

    @property
    def pixel_length(self) -> int:
        """The window in video frames (4n+1): the planner's ``context_frames``."""
        return pixel_length(self.length)

    def active(self, frames: int) -> bool:
        """Whether a video of ``frames`` latent frames is split (ComfyUI: more frames than a window)."""
        return frames > self.length

    def window_frames(self, frames: int) -> int:
        """Latent frames of the longest DiT call for a video of ``frames`` latent frames."""
        return min(frames, self.length)

    def index_lists(self, frames: int, step: int = 0) -> list[list[int]]:
        """Each window's latent frame indices at ``step`` (one window of all frames when inactive)."""
        if not self.active(frames):
            return [list(range(frames))]
        return schedule_windows(self.schedule, frames, self.length, self.overlap, self.stride, self.closed_loop, step)

    def split(self, frames: int, step: int = 0) -> list[ContextWindow]:
        """The windows at ``step`` with normalised fusion weights: for every frame, the weights
        of the windows holding it sum to 1 (the ``Windowing`` interface of ``wan.denoise``)."""
        lists = self.index_lists(frames, step)
        raw = [fuse_weights(self.fuse_method, w, frames, self.overlap).double() for w in lists]
        total = torch.zeros(frames, dtype=torch.float64)
        for w, r in zip(lists, raw):
            total.index_add_(0, torch.tensor(w), r)
        return [ContextWindow(i, tuple(w), (r / total[w]).float()) for i, (w, r) in enumerate(zip(lists, raw))]

    def check(self, frames: int, steps: Iterable[int] = (0,)) -> None:
        """Raise ValueError, before any sampling, when the schedule breaks on this video at one of
        ``steps``: a window past the last frame, a frame twice in one window, a frame no window
        covers (ComfyUI would crash or return NaN there), or overlap-linear ramps that do not fit."""
        if frames < 1:
            raise ValueError(f"context windows need a video of at least 1 latent frame, got {frames}")
        for step in steps:
            lists = self.index_lists(frames, step)
            where = (f"context windows ({self.describe_settings()}) on {frames} latent frames "
                     f"({pixel_length(frames)} video frames) at step {step}")
            for w in lists:
                if min(w) < 0 or max(w) >= frames:
                    raise ValueError(f"{where}: window {w} reaches past the last frame {frames - 1}; "
                                     f"{self._stride_hint()}")
                if len(set(w)) != len(w):
                    raise ValueError(f"{where}: window {w} holds a frame twice; {self._stride_hint()}")
            missing = sorted(set(range(frames)) - {f for w in lists for f in w})
            if missing:
                raise ValueError(f"{where}: frames {missing} are in no window; {self._stride_hint()}")
            for w in lists:
                fuse_weights(self.fuse_method, w, frames, self.overlap)

    def _stride_hint(self) -> str:
        if self.stride > 1:
            return (f"context_stride {self.stride} adds windows of frames up to {1 << (self.stride - 1)} apart, "
                    f"spanning {self.length << (self.stride - 1)} frames, which do not fit this video: "
                    "use context_stride 1")
        return "use another schedule or overlap"

    def noise(self, noise: Tensor, seed: int) -> Tensor:
        """The starting noise for a windowed video: FreeNoise-shuffled if enabled and active."""
        if not self.freenoise or not self.active(noise.shape[2]):
            return noise
        return freenoise(noise, self.length, self.overlap, seed)

    def describe_settings(self) -> str:
        text = (f"{self.schedule}, {self.length} latent frames ({self.pixel_length} video frames) "
                f"overlapping by {self.overlap}, {self.fuse_method} fusion")
        if self.schedule in UNIFORM and self.stride > 1:
            text += f", stride {self.stride}"
        if self.schedule == "looped_uniform" and self.closed_loop:
            text += ", closed loop"
        return text + (", FreeNoise" if self.freenoise else "") + (
            ", start image in every window" if self.anchor_start_image else "")

    def describe(self, frames: int, step: int = 0) -> str:
        """The windows for a video of ``frames`` latent frames, in words (for the plan text)."""
        if not self.active(frames):
            return f"context windows off: {frames} latent frames fit one {self.length}-frame window"
        lists = self.index_lists(frames, step)
        spans = ", ".join(f"{w[0]}-{w[-1]}" for w in lists)
        return f"{len(lists)} context windows per step ({self.describe_settings()}): latent frames {spans}"


def latent_settings_problem(length: int, overlap: int, schedule: str, stride: int, fuse_method: str) -> str | None:
    """What is wrong with settings in latent frames, or None."""
    if schedule not in SCHEDULES:
        return f"context_schedule {schedule!r}: use one of {', '.join(SCHEDULES)}"
    if fuse_method not in FUSE_METHODS:
        return f"fuse_method {fuse_method!r}: use one of {', '.join(FUSE_METHODS)}"
    if length < latent_length(MIN_PIXEL_LENGTH):
        return (f"context window of {length} latent frames: at least {latent_length(MIN_PIXEL_LENGTH)} "
                f"({MIN_PIXEL_LENGTH} video frames)")
    if not 0 <= overlap < length:
        return (f"context overlap of {overlap} latent frames for a {length}-frame window: "
                f"use 0 to {length - 1}")
    if stride < 1:
        return f"context_stride {stride}: at least 1 (1 = consecutive frames only)"
    if fuse_method == "overlap-linear" and overlap < 1:
        return "fuse_method overlap-linear ramps over the overlap: give a context overlap of at least 1 frame"
    return None


def settings_problem(length: int | None, overlap: int | None, schedule: str | None = "standard_static",
                     stride: int | None = 1, fuse_method: str | None = "pyramid") -> str | None:
    """What is wrong with settings given in video frames (the node's widgets), or None. A None
    value is not known yet (a linked input at validation time) and is not checked."""
    if schedule is not None and schedule not in SCHEDULES:
        return f"context_schedule {schedule!r}: use one of {', '.join(SCHEDULES)}"
    if fuse_method is not None and fuse_method not in FUSE_METHODS:
        return f"fuse_method {fuse_method!r}: use one of {', '.join(FUSE_METHODS)}"
    if stride is not None and stride < 1:
        return f"context_stride {stride}: at least 1 (1 = consecutive frames only)"
    if length is not None and (length < MIN_PIXEL_LENGTH or (length - 1) % VAE_TIME_STRIDE):
        return (f"context_length {length}: a window is 4n+1 video frames, at least {MIN_PIXEL_LENGTH} "
                f"(5, 9, ..., 81)")
    if overlap is not None and overlap < 0:
        return f"context_overlap {overlap}: at least 0"
    if length is not None and overlap is not None and overlap > length - 1:
        return (f"context_overlap {overlap} for a {length}-frame window: use 0 to {length - 1} "
                f"(windows must advance)")
    if fuse_method == "overlap-linear" and overlap == 0:
        return "fuse_method overlap-linear ramps over the overlap: give a context_overlap of at least 1 frame"
    if None in (length, overlap, schedule, stride, fuse_method):
        return None
    return latent_settings_problem(latent_length(length), latent_overlap(overlap), schedule, stride, fuse_method)
