"""Write IMAGE frames ([frames, H, W, 3], 0..1) to a video file with PyAV, as ComfyUI's own
video savers do: mp4 (H.264, yuv420p) or webm (VP9, yuv420p), the frame rate as a rational
(fps to 1/1000), the prompt and the graph as container metadata (JSON strings; mp4 needs
``movflags=use_metadata_tags`` to keep keys other than the standard ones).

yuv420p halves the chroma planes, so both sides must be even: an odd width or height is
padded by repeating the last column / row (no pixel of the picture is lost).

Without PyAV (``av`` not installed) :func:`write_webp` writes an animated WEBP with Pillow,
so a graph still ends in a file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

# container -> (PyAV encoder, extension, crf range). libx264 and libvpx-vp9 ship in the PyAV wheels.
FORMATS = {
    "mp4": ("libx264", "mp4", 51),
    "webm": ("libvpx-vp9", "webm", 63),
}
DEFAULT_CRF = 19  # visually near lossless for H.264 (libx264's own default is 23)


def available() -> bool:
    """True when PyAV imports (it is in requirements.txt; ComfyUI itself requires it since 2025)."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    frames: int
    width: int
    height: int
    fps: Fraction
    padded: bool  # an odd side was padded to even


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """IMAGE frames -> uint8 [F, H, W, 3] (rounded, clipped; an alpha channel is dropped)."""
    if frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        raise ValueError(f"expected IMAGE frames [frames, height, width, 3]; got shape {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError("no frames to save")
    x = frames[..., :3].detach().to("cpu", torch.float32)
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8).numpy()


def even(pixels: np.ndarray) -> np.ndarray:
    """Pad [F, H, W, 3] to even H and W by repeating the last row / column."""
    f, h, w, _ = pixels.shape
    if h % 2 == 0 and w % 2 == 0:
        return pixels
    return np.pad(pixels, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def fps_fraction(fps: float) -> Fraction:
    if not 0 < fps < float("inf"):  # NaN fails too
        raise ValueError(f"fps {fps!r}: must be a positive number")
    return Fraction(round(fps * 1000), 1000)


def write(frames: torch.Tensor, path: str | Path, fps: float, container: str = "mp4", crf: int = DEFAULT_CRF,
          metadata: dict | None = None) -> VideoInfo:
    """Encode ``frames`` to ``path``. ``metadata``: name -> value; non-strings are stored as JSON
    (ComfyUI's keys: ``prompt`` and ``workflow``)."""
    import av

    if container not in FORMATS:
        raise ValueError(f"container {container!r}: expected one of {', '.join(FORMATS)}")
    encoder, _, max_crf = FORMATS[container]
    if not 0 <= crf <= max_crf:
        raise ValueError(f"crf {crf}: {encoder} takes 0..{max_crf}")
    rate = fps_fraction(fps)
    pixels = to_uint8(frames)
    padded = even(pixels)
    n, height, width, _ = padded.shape
    options = {"movflags": "use_metadata_tags"} if container == "mp4" else {}
    with av.open(str(path), mode="w", format=container, options=options) as out:
        for key, value in (metadata or {}).items():
            out.metadata[key] = value if isinstance(value, str) else json.dumps(value)
        stream = out.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        if container == "webm":
            stream.bit_rate = 0  # VP9 constant quality: crf alone decides
        for image in padded:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        out.mux(stream.encode(None))
    return VideoInfo(Path(path), n, width, height, rate, padded.shape != pixels.shape)


def write_webp(frames: torch.Tensor, path: str | Path, fps: float, quality: int = 90,
               metadata: dict | None = None) -> VideoInfo:
    """An animated WEBP (Pillow), the fallback without PyAV; metadata in EXIF as ComfyUI's
    SaveAnimatedWEBP stores it ("prompt:{...}", "workflow:{...}")."""
    from PIL import Image

    rate = fps_fraction(fps)
    pixels = to_uint8(frames)
    images = [Image.fromarray(p) for p in pixels]
    exif = images[0].getexif()
    tag = 0x0110  # Model, then Make and down, as ComfyUI numbers them
    for key, value in (metadata or {}).items():
        exif[tag] = f"{key}:{value if isinstance(value, str) else json.dumps(value)}"
        tag = 0x010F if tag == 0x0110 else tag - 1
    images[0].save(str(path), save_all=True, append_images=images[1:], duration=round(1000 / float(rate)),
                   quality=quality, lossless=False, exif=exif)
    return VideoInfo(Path(path), len(images), pixels.shape[2], pixels.shape[1], rate, False)
