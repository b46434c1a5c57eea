"""Conditioning nodes: UMT5 text embeds, the empty (text-to-video) embeds and the
image-to-video encode (VAE latent of the start / end frame + mask, CLIP features)."""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..optim import loading, planner
from ..optim.gguf import GGUFCheckpoint, load_text_encoder_gguf
from ..optim import tiling as vae_tiling  # `tiling` is an input name here
from ..optim.tiling import Tiling, TilingOptions
from ..wan.checkpoint import Checkpoint
from . import comfy, stages
from .decode import vae_progress
from .load import VAEHandle
from .pairing import end_image_problem
from .types import ImageEmbeds, TextEmbeds, default_dtype

CATEGORY = "WanFit/conditioning"
MAX_SIZE = 8192
MAX_FRAMES = 1025

# (file, mtime, size, prompt) -> context [1, 512, D] on the CPU. Re-queuing a job with the
# same prompts then skips loading UMT5 altogether.
_TEXT_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
TEXT_CACHE_SIZE = 16
ENCODE_CALLS = {"count": 0}  # how many times UMT5 actually ran (tests read it)


def _text_key(ckpt: Checkpoint, prompt: str) -> tuple:
    stat = ckpt.path.stat()
    return (str(ckpt.path), stat.st_mtime_ns, stat.st_size, prompt)


def encode_prompts(ckpt: Checkpoint, prompts: list[str]) -> list[torch.Tensor]:
    """Contexts for ``prompts``, from the LRU cache where possible; UMT5 is loaded only for the
    missing ones, on the compute device when it has room (else the CPU, in the same dtype),
    and released right after."""
    keys = [_text_key(ckpt, p) for p in prompts]
    missing = list(dict.fromkeys(k for k in keys if k not in _TEXT_CACHE))
    if missing:
        dtype = default_dtype(comfy.compute_device())
        name = f"UMT5 ({ckpt.name})"
        device = stages.stage_device(name, loading.loaded_bytes(ckpt, dtype), planner.encoder_work("t5"))
        contexts = stages.run_stage(name, device, lambda d: _run_t5(ckpt, [k[-1] for k in missing], dtype, d))
        ENCODE_CALLS["count"] += 1
        for i, key in enumerate(missing):
            _TEXT_CACHE[key] = contexts[i:i + 1].clone()
    out = []
    for key in keys:
        _TEXT_CACHE.move_to_end(key)
        out.append(_TEXT_CACHE[key])
    while len(_TEXT_CACHE) > TEXT_CACHE_SIZE:
        _TEXT_CACHE.popitem(last=False)
    return out


def _run_t5(ckpt: Checkpoint, prompts: list[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """UMT5 contexts [N, 512, D] (float32, CPU) of ``prompts``; the encoder is gone on return."""
    if isinstance(ckpt, GGUFCheckpoint):
        encoder, tokenizer = load_text_encoder_gguf(ckpt, dtype, device)
    else:
        encoder, tokenizer = loading.load_text_encoder(ckpt, dtype, device)
    try:
        with torch.inference_mode(), comfy.cancellable_layers(encoder.blocks):
            ids, mask = tokenizer(prompts)
            context, _ = encoder.encode_padded(ids.to(device), mask.to(device))
            return context.float().cpu()
    finally:
        del encoder  # the text encoder leaves the GPU before anything else arrives
        comfy.free_memory_cache()


def check_size(width: int, height: int, frames: int, unit: int = 16):
    """True or a message: Wan needs 4n+1 frames and sizes in multiples of ``unit``. A value
    that comes over a link is None at validation time; the node checks it again when it runs."""
    if None in (width, height, frames):
        return True
    problems = []
    if (frames - 1) % 4:
        lo = (frames - 1) // 4 * 4 + 1
        problems.append(f"frames {frames}: Wan needs 4n+1 frames (e.g. {lo} or {lo + 4})")
    if width % unit or height % unit:
        problems.append(f"width x height {width}x{height}: both must be multiples of {unit}")
    return "; ".join(problems) or True


def _size_inputs(width=832, height=480, frames=81) -> dict:
    return {
        "width": ("INT", {"default": width, "min": 16, "max": MAX_SIZE, "step": 16}),
        "height": ("INT", {"default": height, "min": 16, "max": MAX_SIZE, "step": 16}),
        "frames": ("INT", {"default": frames, "min": 1, "max": MAX_FRAMES, "step": 4}),
    }


class WanFitTextEncode:
    """Encode the positive and negative prompt with UMT5-XXL. Runs on the compute device and
    leaves it afterwards; embeddings are cached per (file, prompt), so re-queuing the same
    prompt does not load the encoder again."""

    DISPLAY_NAME = "WanFit Text Encode"
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("WANFIT_TEXT_EMBEDS",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("WANFIT_TEXT_ENCODER",),
            "positive": ("STRING", {"multiline": True, "default": ""}),
            "negative": ("STRING", {"multiline": True, "default": ""}),
        }}

    def encode(self, text_encoder: Checkpoint, positive: str, negative: str):
        pos, neg = encode_prompts(text_encoder, [positive, negative])
        return (TextEmbeds(pos, neg, text_encoder.name),)


class WanFitEmptyEmbeds:
    """Text-to-video: the video's width, height and frame count (4n+1), no image. The sampler
    makes the latent from these and the model it gets."""

    DISPLAY_NAME = "WanFit Empty Embeds"
    CATEGORY = CATEGORY
    FUNCTION = "embeds"
    RETURN_TYPES = ("WANFIT_IMAGE_EMBEDS",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": _size_inputs()}

    @classmethod
    def VALIDATE_INPUTS(cls, width=832, height=480, frames=81):
        return check_size(width, height, frames)

    def embeds(self, width: int, height: int, frames: int):
        ok = check_size(width, height, frames)
        if ok is not True:
            raise ValueError(ok)
        return (ImageEmbeds(width, height, frames),)


def fit_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE [B, H, W, 3] 0..1 (first image used) -> [3, height, width] in [-1, 1]: scaled to
    cover the target (bicubic), then center-cropped."""
    x = image[:1].permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(0, 1)
    return x[0] * 2 - 1


def i2v_conditioning(vae, start: torch.Tensor, end: torch.Tensor | None, frames: int,
                     encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Official Wan image2video ``y``: the 4-channel mask of the 1+4n frame mask, then the VAE
    latent of [start frame, zeros..., (end frame)]. start / end: [3, H, W] in [-1, 1].
    ``encode`` (video -> latent) stands in for ``vae.encode``, e.g. a tiled encode."""
    _, h, w = start.shape
    s = vae.config.spatial_compression
    lat_h, lat_w = h // s, w // s
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    if end is not None:
        msk[:, -1] = 1
    msk = torch.cat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]  # [4, T, h, w]
    parts = [start[:, None], torch.zeros(3, frames - 1 - (end is not None), h, w)]
    if end is not None:
        parts.append(end[:, None])
    video = torch.cat(parts, dim=1)[None]
    with torch.inference_mode():
        latent = (encode or vae.encode)(video)[0].float().cpu()
    return torch.cat([msk, latent])[None]


class WanFitImageToVideoEncode:
    """Image-to-video: resize and center-crop the start image (and optional end image) to the
    target size, encode [start, zeros..., end] with the VAE and prepend the official 4-channel
    frame mask; with a CLIP vision encoder (Wan 2.1 i2v) add its image features. For Wan 2.1
    and Wan 2.2 I2V-A14B (wan_2.1_vae); with the Wan 2.2 VAE (TI2V-5B) the start image's latent
    becomes the first latent frame instead. The VAE encode tiles on the GPU when whole frames
    would not fit (optional `tiling` input: a WanFit VAE Tiling node; unconnected = auto)."""

    DISPLAY_NAME = "WanFit Image-to-Video Encode"
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("WANFIT_IMAGE_EMBEDS",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("WANFIT_VAE",), "start_image": ("IMAGE",), **_size_inputs()},
                "optional": {"end_image": ("IMAGE",), "clip_vision": ("WANFIT_CLIP_VISION",),
                             "tiling": ("WANFIT_VAE_TILING",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, width=832, height=480, frames=81):
        return check_size(width, height, frames)

    def encode(self, vae: VAEHandle, start_image: torch.Tensor, width: int, height: int, frames: int,
               end_image: torch.Tensor | None = None, clip_vision: Checkpoint | None = None,
               tiling: TilingOptions | None = None):
        if start_image is None:
            raise ValueError("Image-to-Video Encode needs a start_image")
        unit = 16 if vae.config.version == "2.1" else 32
        ok = check_size(width, height, frames, unit)
        if ok is not True:
            raise ValueError(f"{ok} (VAE {vae.name}, Wan {vae.config.version})")
        problem = end_image_problem(frames, end_image is not None, vae.config.version)
        if problem:
            raise ValueError(f"{problem} (VAE {vae.name})")
        start = fit_image(start_image, width, height)
        end = None if end_image is None else fit_image(end_image, width, height)
        latent = stages.run_vae_stage(f"VAE encode ({vae.name}, {width}x{height})", vae, width, height, True,
                                      tiling or vae_tiling.AUTO, lambda d, t: _vae_encode(vae, start, end, frames, d, t))
        if vae.config.version != "2.1":  # TI2V-5B: the image latent is the first latent frame
            return (ImageEmbeds(width, height, frames, first_latent=latent,
                                source="WanFit Image-to-Video Encode (Wan 2.2 VAE)"),)
        y = latent
        clip_fea = None
        if clip_vision is not None:
            dtype = default_dtype(comfy.compute_device())
            device = stages.stage_device(f"CLIP vision ({clip_vision.name})", loading.loaded_bytes(clip_vision, dtype),
                                  planner.encoder_work("clip"))
            encoder = loading.load_clip_vision(clip_vision, default_dtype(device), device)
            try:
                images = [start_image[:1]] + ([end_image[:1]] if end_image is not None else [])
                with torch.inference_mode(), comfy.cancellable_layers(encoder.encoder["layers"]):
                    clip_fea = torch.cat([encoder.encode(i.float()).float().cpu() for i in images], dim=1)
            finally:
                del encoder
                comfy.free_memory_cache()
        return (ImageEmbeds(width, height, frames, y=y, clip_fea=clip_fea, source="WanFit Image-to-Video Encode"),)


def _vae_encode(vae: VAEHandle, start: torch.Tensor, end: torch.Tensor | None, frames: int,
                device: torch.device, tiles: Tiling) -> torch.Tensor:
    """TI2V-5B: the start image's latent; Wan 2.1 / 2.2-A14B i2v: the conditioning ``y``."""
    model = loading.load_vae(vae.ckpt, default_dtype(device), device)
    try:
        def encode(video: torch.Tensor) -> torch.Tensor:
            return vae_tiling.tiled_encode(model, video, tiles, progress=vae_progress())
        if vae.config.version != "2.1":
            with torch.inference_mode():
                return encode(start[None, :, None])
        return i2v_conditioning(model, start, end, frames, encode)
    finally:
        del model
        comfy.free_memory_cache()


NODES = {cls.__name__: cls for cls in (WanFitTextEncode, WanFitEmptyEmbeds, WanFitImageToVideoEncode)}
