"""Loader nodes: pick a file, validate it, detect what it is. Weights stay on disk."""
from __future__ import annotations

from ..wan.checkpoint import Checkpoint, open_checkpoint
from . import comfy

CATEGORY = "WanFit/loaders"


class _Loader:
    KIND = ""
    FAMILY = ""
    CATEGORY = CATEGORY
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (comfy.list_models(cls.KIND),)}}

    def load(self, file: str) -> tuple[Checkpoint]:
        return (open_checkpoint(comfy.model_path(self.KIND, file), expect=self.FAMILY),)


class WanFitModelLoader(_Loader):
    """Open a Wan 2.1 / 2.2 diffusion model (diffusion_models or unet folder). The file is
    validated and its variant detected from tensor shapes; weights are read only when sampling."""

    DISPLAY_NAME = "WanFit Model Loader"
    KIND, FAMILY = "diffusion_models", "dit"
    RETURN_TYPES = ("WANFIT_MODEL",)


class WanFitVAELoader(_Loader):
    """Open a Wan 2.1 (z16) or Wan 2.2 (z48) video VAE from the vae folder."""

    DISPLAY_NAME = "WanFit VAE Loader"
    KIND, FAMILY = "vae", "vae"
    RETURN_TYPES = ("WANFIT_VAE",)


class WanFitTextEncoderLoader(_Loader):
    """Open the UMT5-XXL text encoder (text_encoders or clip folder). The tokenizer is read
    from the file (spiece_model) or from a tokenizer file beside it."""

    DISPLAY_NAME = "WanFit Text Encoder Loader"
    KIND, FAMILY = "text_encoders", "t5"
    RETURN_TYPES = ("WANFIT_TEXT_ENCODER",)


class WanFitCLIPVisionLoader(_Loader):
    """Open the CLIP ViT-H/14 vision encoder that Wan 2.1 image-to-video uses."""

    DISPLAY_NAME = "WanFit CLIP Vision Loader"
    KIND, FAMILY = "clip_vision", "clip_vision"
    RETURN_TYPES = ("WANFIT_CLIP_VISION",)


NODES = {cls.__name__: cls for cls in (WanFitModelLoader, WanFitVAELoader, WanFitTextEncoderLoader,
                                       WanFitCLIPVisionLoader)}
