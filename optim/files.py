"""Open a model file of either format and check all of it from its header, before a weight is read.

``open_model`` picks the reader by the file's format (safetensors, or GGUF for the quantised
DiT and UMT5 files); ``verify`` checks every tensor's shape against the config detected from
that header (``wan.detect.verify_dit``, ``wan.t5.verify_t5``, the VAE and CLIP detectors,
which check all of their tensors), so a file that passes is one the loaders can fill a
model from. Both raise ``CheckpointError`` naming the file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..wan.checkpoint import Checkpoint, CheckpointError, check_shapes, open_checkpoint
from ..wan.clip_vision import ClipVisionEncoder, convert_clip_vision_state_dict, detect_clip_vision_config
from ..wan.detect import verify_dit
from ..wan.t5 import verify_t5
from ..wan.tokenizer import load_tokenizer
from ..wan.vae import detect_vae_config
from . import gguf

ModelFile = Checkpoint | gguf.GGUFCheckpoint


def open_model(path: str | Path, expect: str | None = None) -> ModelFile:
    """The header-only handle of ``path``: a GGUF file by its suffix, else safetensors."""
    if gguf.is_gguf(path):
        if expect not in (None, "dit", "t5"):
            raise CheckpointError(f"{Path(path).name}: a GGUF file; WanFit reads GGUF diffusion models and UMT5 text "
                                  "encoders only, this loader needs a .safetensors file")
        return gguf.open_gguf(path, expect=expect)
    return open_checkpoint(path, expect=expect)


def verify(ckpt: ModelFile) -> object:
    """Check every tensor ``ckpt`` holds against the model its header describes; returns the
    detected config. A text encoder's tokenizer is parsed too (a broken one would otherwise
    surface only when the prompt is encoded)."""
    if ckpt.family == "dit":
        return verify_dit(ckpt.shapes, ckpt.name)
    if ckpt.family == "t5":
        config = verify_t5(ckpt.shapes, ckpt.name)
        try:
            if isinstance(ckpt, gguf.GGUFCheckpoint):
                if ckpt.tokenizer_model is None:
                    load_tokenizer(ckpt.path)
            else:
                load_tokenizer(ckpt.path)
        except (ValueError, FileNotFoundError) as err:
            raise CheckpointError(f"{ckpt.name}: {err}") from err
        return config
    if ckpt.family == "vae":
        try:
            return detect_vae_config(ckpt.shapes)  # builds the stages and checks every shape
        except ValueError as err:
            raise CheckpointError(f"{ckpt.name}: {err}") from err
    if ckpt.family == "clip_vision":
        try:
            config = detect_clip_vision_config(ckpt.shapes)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.name}: {err}") from err
        meta = {k: torch.empty(tuple(s), device="meta") for k, s in ckpt.shapes.items()}
        found = {k: tuple(v.shape) for k, v in convert_clip_vision_state_dict(meta).items()}
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in ClipVisionEncoder(config).state_dict().items()}
        check_shapes(ckpt.name, f"a CLIP vision encoder (width {config.width}, {config.num_layers} layers)",
                     expected, found)
        return config
    raise CheckpointError(f"{ckpt.name}: no check for a {ckpt.family} file")
