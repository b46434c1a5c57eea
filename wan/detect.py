"""Tell which Wan DiT a state dict holds from its tensor shapes alone (never a file name)."""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

from .model import PRESETS, WanConfig, WanModel

V = TypeVar("V")

ANCHOR = "patch_embedding.weight"
REQUIRED = (ANCHOR, "text_embedding.0.weight", "time_embedding.0.weight", "time_projection.1.weight",
            "blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight", "head.head.weight")
MODULES = {"patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head",
           "img_emb", "scaled_fp8"}  # the last: marker tensor of Comfy-Org fp8_scaled files
HEAD_DIM = 128  # every released Wan model


def strip_prefix(entries: Mapping[str, V]) -> dict[str, V]:
    """The DiT entries of a state dict (or a key -> shape map) with their key prefix removed.

    Accepts the original layout and any prefix ending in "." (ComfyUI's
    "model.diffusion_model."); entries outside the DiT's prefix are dropped. Without a
    ``patch_embedding.weight`` key the entries are returned unchanged.
    """
    prefixes = [k[:-len(ANCHOR)] for k in entries if k == ANCHOR or k.endswith("." + ANCHOR)]
    if not prefixes:
        return dict(entries)
    prefix = min(prefixes, key=len)
    return {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}


def detect_dit_config(shapes: Mapping[str, Sequence[int]], head_dim: int = HEAD_DIM) -> WanConfig:
    """WanConfig of a Wan 2.1 / 2.2 DiT from its key -> shape map (prefix allowed).

    Raises ValueError naming what was expected when the keys are not a Wan DiT in the
    original layout.
    """
    s = {k: tuple(v) for k, v in strip_prefix(shapes).items()}
    if any(k.startswith("condition_embedder.") for k in s):
        raise ValueError("this is a Wan DiT in diffusers' key layout (condition_embedder, attn1, ...); "
                         "WanFit reads the original / ComfyUI layout (patch_embedding, blocks.N, ...)")
    missing = [k for k in REQUIRED if k not in s]
    if missing:
        seen = ", ".join(sorted(s)[:4]) or "none"
        raise ValueError(f"not a Wan diffusion model (DiT): expected keys {', '.join(REQUIRED)} "
                         f"(optionally prefixed model.diffusion_model.); missing {', '.join(missing)}; "
                         f"keys seen: {seen}, ...")
    extra = sorted({k.split(".")[0] for k in s} - MODULES)
    if extra:
        raise ValueError(f"unsupported Wan variant: modules {', '.join(extra)} are not part of the "
                         "Wan 2.1 / 2.2 DiT (VACE, S2V and Animate models are not supported)")
    indices = {int(k.split(".")[1]) for k in s if k.startswith("blocks.")}
    if indices != set(range(len(indices))):
        gaps = sorted(set(range(max(indices) + 1)) - indices)
        raise ValueError(f"incomplete Wan DiT: blocks {gaps} are missing")

    dim, in_dim, *patch = s[ANCHOR]
    out_dim = s["head.head.weight"][0] // math.prod(patch)
    if dim % head_dim:
        raise ValueError(f"DiT width {dim} is not a multiple of the head size {head_dim}")
    if in_dim == out_dim:
        model_type = "ti2v" if in_dim == 48 else "t2v"
    elif in_dim > out_dim:
        model_type = "i2v"
    else:
        raise ValueError(f"unsupported Wan DiT: {in_dim} input channels but {out_dim} output channels")
    clip = "blocks.0.cross_attn.k_img.weight" in s
    return WanConfig(
        model_type=model_type, patch_size=tuple(patch), in_dim=in_dim, dim=dim,
        ffn_dim=s["blocks.0.ffn.0.weight"][0], freq_dim=s["time_embedding.0.weight"][1],
        text_dim=s["text_embedding.0.weight"][1], out_dim=out_dim, num_heads=dim // head_dim,
        num_layers=len(indices), qk_norm="blocks.0.self_attn.norm_q.weight" in s,
        cross_attn_norm="blocks.0.norm3.weight" in s, clip=clip,
        clip_dim=s.get("img_emb.proj.1.weight", (0, WanConfig.clip_dim))[1],
        clip_pos_len=s["img_emb.emb_pos"][1] if "img_emb.emb_pos" in s else 0)


def variant_name(config: WanConfig) -> str:
    """Human name: "Wan2.2 I2V-A14B expert"; shape twins joined ("Wan2.1 T2V 14B / Wan2.2
    T2V-A14B expert"); otherwise a description like "Wan t2v (dim 64, 2 layers)"."""
    names = [name for name, preset in PRESETS.items() if preset == config]
    if names:
        return " / ".join(names)
    clip = ", CLIP" if config.clip else ""
    return f"Wan {config.model_type} (dim {config.dim}, {config.num_layers} layers{clip})"


@functools.lru_cache(maxsize=32)
def dit_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a DiT of ``config`` has, with its shape (one block built on the meta
    device, its keys repeated for every block)."""
    from .checkpoint import repeated_block_shapes

    with torch.device("meta"):
        return repeated_block_shapes(WanModel(dataclasses.replace(config, num_layers=1)), config.num_layers)


def verify_dit(shapes: Mapping[str, Sequence[int]], name: str) -> WanConfig:
    """``detect_dit_config``, then every tensor checked against the detected config from the
    header alone, so a file with one wrong shape is refused before any weight is read
    (a CheckpointError naming ``name``)."""
    from .checkpoint import CheckpointError, check_shapes

    try:
        config = detect_dit_config(shapes)
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from err
    found = {k: v for k, v in strip_prefix(shapes).items() if not _FP8_EXTRA.search(k)}
    check_shapes(name, f"a {variant_name(config)}", dit_shapes(config), found)
    return config


_FP8_EXTRA = re.compile(r"(?:^scaled_fp8$|\.scale_(?:weight|input)$)")
