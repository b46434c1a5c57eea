"""Loader nodes: pick a file, validate it, detect what it is. Weights stay on disk.

Each loader returns a light handle (the validated Checkpoint, the chosen options and the
detected config); the sampler, encoders and decoder read weights only when they run.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..optim.loading import WEIGHT_FORMATS
from ..wan.attention import available_backends
from ..wan.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from ..wan.detect import detect_dit_config, variant_name
from ..wan.model import WanConfig
from ..wan.vae import detect_vae_config
from ..wan.vae_common import VAEConfig
from . import comfy

CATEGORY = "WanFit/loaders"
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(eq=False)
class ModelHandle:
    """A Wan DiT file and how to run it; weights are read by the sampler."""

    ckpt: Checkpoint
    config: WanConfig
    weight_format: str = "auto"
    compute_dtype: str = "bf16"
    attention: str = "auto"
    memory: object | None = None  # MemorySettings from a WanFit Memory node (nodes/memory.py)

    @property
    def name(self) -> str:
        return self.ckpt.name

    @property
    def variant(self) -> str:
        return variant_name(self.config)

    @property
    def key(self) -> tuple:
        """What identifies the loaded weights: file (and its mtime) plus the options."""
        stat = self.ckpt.path.stat()
        return (str(self.ckpt.path), stat.st_mtime_ns, self.weight_format, self.compute_dtype, self.attention)

    def describe(self) -> str:
        return f"{self.name} ({self.variant}, {self.config.model_type})"


@dataclass(eq=False)
class VAEHandle:
    """A Wan 2.1 / 2.2 VAE file and its detected config."""

    ckpt: Checkpoint
    config: VAEConfig

    @property
    def name(self) -> str:
        return self.ckpt.name


def _check_file(kind: str, family: str, file: str, detect=None):
    """VALIDATE_INPUTS body shared by the loaders: True, or a message naming the problem
    (None: the name comes over a link, checked when the node runs). ``detect`` runs on the
    header's shapes too (e.g. a DiT variant WanFit does not support)."""
    if file is None:
        return True
    if file not in comfy.list_models(kind):
        return f"{file}: not found in the ComfyUI {kind} folder"
    try:
        ckpt = open_checkpoint(comfy.model_path(kind, file), expect=family)
        if detect is not None:
            detect(ckpt.shapes)
    except (CheckpointError, FileNotFoundError) as err:
        return str(err)
    except ValueError as err:
        return f"{file}: {err}"
    return True


class _Loader:
    KIND = ""
    FAMILY = ""
    CATEGORY = CATEGORY
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (comfy.list_models(cls.KIND),)}}

    @classmethod
    def VALIDATE_INPUTS(cls, file):
        # Reads the header only, so a wrong file is a 400 at /prompt, not a failed run.
        return _check_file(cls.KIND, cls.FAMILY, file)

    def _open(self, file: str) -> Checkpoint:
        return open_checkpoint(comfy.model_path(self.KIND, file), expect=self.FAMILY)

    def load(self, file: str):
        return (self._open(file),)


class WanFitModelLoader(_Loader):
    """Open a Wan 2.1 / 2.2 diffusion model (diffusion_models or unet folder). The file is
    validated and its variant detected from tensor shapes; weights are read only when sampling,
    in the chosen weight format (auto keeps fp8 files fp8), compute dtype and attention backend."""

    DISPLAY_NAME = "WanFit Model Loader"
    KIND, FAMILY = "diffusion_models", "dit"
    RETURN_TYPES = ("WANFIT_MODEL",)

    @classmethod
    def VALIDATE_INPUTS(cls, file):
        return _check_file(cls.KIND, cls.FAMILY, file, detect_dit_config)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "file": (comfy.list_models(cls.KIND),),
            "weight_dtype": (list(WEIGHT_FORMATS), {"default": "auto"}),
            "compute_dtype": (list(COMPUTE_DTYPES), {"default": "bf16"}),
            "attention": (["auto", *available_backends()], {"default": "auto"}),
        }}

    def load(self, file: str, weight_dtype: str = "auto", compute_dtype: str = "bf16", attention: str = "auto"):
        ckpt = self._open(file)
        try:
            config = detect_dit_config(ckpt.shapes)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.name}: {err}") from err
        return (ModelHandle(ckpt, config, weight_dtype, compute_dtype, attention),)


class WanFitVAELoader(_Loader):
    """Open a Wan 2.1 (z16) or Wan 2.2 (z48) video VAE from the vae folder."""

    DISPLAY_NAME = "WanFit VAE Loader"
    KIND, FAMILY = "vae", "vae"
    RETURN_TYPES = ("WANFIT_VAE",)

    def load(self, file: str):
        ckpt = self._open(file)
        try:
            config = detect_vae_config(ckpt.shapes)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.name}: {err}") from err
        return (VAEHandle(ckpt, config),)


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
