"""Loader nodes: pick a file, validate it, detect what it is. Weights stay on disk.

Each loader returns a light handle (the validated Checkpoint, the chosen options and the
detected config); the sampler, encoders and decoder read weights only when they run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..optim import files
from ..optim.files import ModelFile
from ..optim.gguf import GGUFCheckpoint
from ..optim.lora import LoraFile
from ..optim.loading import WEIGHT_FORMATS
from ..wan.attention import available_backends
from ..wan.checkpoint import Checkpoint, CheckpointError
from ..wan.detect import variant_name
from ..wan.model import WanConfig
from ..wan.vae_common import VAEConfig
from . import comfy

CATEGORY = "WanFit/loaders"
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True, eq=False)
class LoraChoice:
    """One WanFit LoRA node's choice: the file (matched to the model), strength and mode."""

    lora: LoraFile
    strength: float
    mode: str = "auto"

    @property
    def key(self) -> tuple:
        return (*self.lora.key, self.strength, self.mode)


@dataclass(eq=False)
class ModelHandle:
    """A Wan DiT file and how to run it; weights are read by the sampler."""

    ckpt: Checkpoint
    config: WanConfig
    weight_format: str = "auto"
    compute_dtype: str = "bf16"
    attention: str = "auto"
    memory: object | None = None  # MemorySettings from a WanFit Memory node (nodes/memory.py)
    loras: tuple[LoraChoice, ...] = ()  # from WanFit LoRA nodes, in chain order
    parallel: object | None = None  # from a WanFit Multi-GPU node (nodes/multigpu.py)
    sparse: object | None = None  # SparseSettings from a WanFit Sparse Attention node (optim/sparse.py)
    compiled: object | None = None  # CompileSettings from a WanFit Compile node (optim/compile.py)

    @property
    def name(self) -> str:
        return self.ckpt.name

    @property
    def variant(self) -> str:
        return variant_name(self.config)

    @property
    def key(self) -> tuple:
        """What identifies the base weights: file (and its mtime) plus the options; LoRAs apart."""
        stat = self.ckpt.path.stat()
        return (str(self.ckpt.path), stat.st_mtime_ns, self.weight_format, self.compute_dtype, self.attention)

    @property
    def lora_key(self) -> tuple:
        """What identifies the LoRAs on top: each file (and mtime), strength and mode, in order."""
        return tuple(choice.key for choice in self.loras)

    @property
    def mergeable(self) -> bool:
        """Whether a LoRA can be merged into these weights as they load (not GGUF blocks)."""
        return self.ckpt.path.suffix.lower() != ".gguf" and not self.weight_format.startswith("gguf")

    def describe(self) -> str:
        loras = "".join(f" + {c.lora.name} x{c.strength:g}" for c in self.loras)
        return f"{self.name} ({self.variant}, {self.config.model_type}){loras}"


@dataclass(eq=False)
class VAEHandle:
    """A Wan 2.1 / 2.2 VAE file and its detected config."""

    ckpt: Checkpoint
    config: VAEConfig

    @property
    def name(self) -> str:
        return self.ckpt.name


_VERIFIED: dict[tuple, tuple | str] = {}  # (real path, size, mtime, family) -> (handle, config) or the problem
_VERIFIED_MAX = 64


def open_verified(kind: str, family: str, file: str) -> tuple[ModelFile, object]:
    """The file's header-only handle and detected config, every tensor checked (optim/files).
    Kept per file version (path, size, mtime), so /prompt, which validates on ComfyUI's event
    loop for every request, parses a file once, good or bad."""
    return open_verified_path(comfy.model_path(kind, file), family)


def open_verified_path(path: str | os.PathLike, family: str) -> tuple[ModelFile, object]:
    """``open_verified`` of a file by its path (a multi-GPU worker, which has no ComfyUI folders)."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns, family)
    if key not in _VERIFIED:
        try:
            ckpt = files.open_model(path, expect=family)
            _VERIFIED[key] = (ckpt, files.verify(ckpt))
        except CheckpointError as err:
            _VERIFIED[key] = str(err)
        while len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.pop(next(iter(_VERIFIED)))
    found = _VERIFIED[key]
    if isinstance(found, str):
        raise CheckpointError(found)
    return found


def _check_file(kind: str, family: str, file: str):
    """VALIDATE_INPUTS body shared by the loaders: True, or a message naming the problem
    (None: the name comes over a link, checked when the node runs)."""
    if file is None:
        return True
    if not isinstance(file, str) or file not in comfy.list_models(kind):
        return f"{file!r}: not found in the ComfyUI {kind} folder"
    try:
        open_verified(kind, family, file)
    except (CheckpointError, FileNotFoundError, PermissionError) as err:
        return str(err)
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

    def _open(self, file: str) -> tuple[ModelFile, object]:
        return open_verified(self.KIND, self.FAMILY, file)

    def load(self, file: str):
        return (self._open(file)[0],)


class WanFitModelLoader(_Loader):
    """Open a Wan 2.1 / 2.2 diffusion model (diffusion_models or unet folder): .safetensors
    (bf16, fp16, fp8, fp8_scaled) or .gguf (Q8_0 ... Q3_K). The file is validated and its
    variant detected from tensor shapes; weights are read only when sampling, in the chosen
    weight format (auto keeps fp8 files fp8 and GGUF files quantised), compute dtype and
    attention backend."""

    DISPLAY_NAME = "WanFit Model Loader"
    KIND, FAMILY = "diffusion_models", "dit"
    RETURN_TYPES = ("WANFIT_MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "file": (comfy.list_models(cls.KIND),),
            "weight_dtype": (list(WEIGHT_FORMATS), {"default": "auto"}),
            "compute_dtype": (list(COMPUTE_DTYPES), {"default": "bf16"}),
            "attention": (["auto", *available_backends()], {"default": "auto"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, file, weight_dtype="auto"):
        ok = _check_file(cls.KIND, cls.FAMILY, file)
        if ok is True and isinstance(file, str) and isinstance(weight_dtype, str):
            return _weight_problem(open_verified(cls.KIND, cls.FAMILY, file)[0], weight_dtype) or True
        return ok

    def load(self, file: str, weight_dtype: str = "auto", compute_dtype: str = "bf16", attention: str = "auto"):
        ckpt, config = self._open(file)
        problem = _weight_problem(ckpt, weight_dtype)
        if problem:
            raise ValueError(problem)
        return (ModelHandle(ckpt, config, weight_dtype, compute_dtype, attention),)


def _weight_problem(ckpt: ModelFile, weight_dtype: str) -> str | None:
    """A weight format the file cannot take (GGUF blocks stay quantised or dequantise), or None."""
    if isinstance(ckpt, GGUFCheckpoint) and weight_dtype.startswith("fp8"):
        return (f"{ckpt.name} is a GGUF model ({ckpt.quant_label()}); weight_dtype auto keeps it quantised, "
                f"bf16 / fp16 / fp32 dequantise it; {weight_dtype} does not apply")
    return None


class WanFitVAELoader(_Loader):
    """Open a Wan 2.1 (z16) or Wan 2.2 (z48) video VAE from the vae folder."""

    DISPLAY_NAME = "WanFit VAE Loader"
    KIND, FAMILY = "vae", "vae"
    RETURN_TYPES = ("WANFIT_VAE",)

    def load(self, file: str):
        ckpt, config = self._open(file)
        return (VAEHandle(ckpt, config),)


class WanFitTextEncoderLoader(_Loader):
    """Open the UMT5-XXL text encoder (text_encoders or clip folder), .safetensors or .gguf.
    The tokenizer is read from the file (spiece_model, or a GGUF's own vocabulary) or from a
    tokenizer file beside it."""

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
