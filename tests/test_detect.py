"""DiT config detection from tensor shapes: every released model, prefixes, and rejections."""
from __future__ import annotations

import functools

import pytest
import torch

from wanfit.wan.detect import detect_dit_config, strip_prefix, variant_name
from wanfit.wan.model import PRESETS, WanConfig, WanModel

COMFY = "model.diffusion_model."


@functools.cache
def shapes_of(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a model built on the meta device: no memory is used."""
    with torch.device("meta"):
        model = WanModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("prefix", ["", COMFY])
@pytest.mark.parametrize("name", list(PRESETS))
def test_detects_every_preset(name, prefix):
    cfg = detect_dit_config({prefix + k: v for k, v in shapes_of(PRESETS[name]).items()})
    assert cfg == PRESETS[name]
    assert name in variant_name(cfg).split(" / ")


def test_variant_names():
    assert variant_name(PRESETS["Wan2.2 I2V-A14B expert"]) == "Wan2.2 I2V-A14B expert"
    assert variant_name(PRESETS["Wan2.1 T2V 1.3B"]) == "Wan2.1 T2V 1.3B"
    # Same shapes, so the name says both.
    assert variant_name(PRESETS["Wan2.2 T2V-A14B expert"]) == "Wan2.1 T2V 14B / Wan2.2 T2V-A14B expert"
    tiny = WanConfig("t2v", dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)
    assert variant_name(tiny) == "Wan t2v (dim 64, 2 layers)"


def test_tiny_config_round_trip():
    tiny = WanConfig("i2v", in_dim=36, clip=True, clip_dim=40, dim=64, ffn_dim=128, num_heads=4, num_layers=3,
                     text_dim=32, freq_dim=32)
    assert detect_dit_config(shapes_of(tiny), head_dim=16) == tiny


def test_strip_prefix_keeps_only_the_dit():
    shapes = shapes_of(PRESETS["Wan2.1 T2V 1.3B"])
    full = {COMFY + k: v for k, v in shapes.items()}
    full.update({"first_stage_model.encoder.conv1.weight": (96, 3, 3, 3, 3), "cond_stage_model.x": (1,)})
    assert strip_prefix(full) == shapes
    assert strip_prefix(shapes) == shapes


def test_tolerates_fp8_scale_entries():
    shapes = dict(shapes_of(PRESETS["Wan2.2 TI2V-5B"]))
    shapes.update({"scaled_fp8": (0,), "blocks.0.self_attn.q.scale_weight": (1,)})
    assert detect_dit_config(shapes) == PRESETS["Wan2.2 TI2V-5B"]


@pytest.mark.parametrize("keys", [
    {"encoder.conv1.weight": (96, 3, 3, 3, 3), "decoder.conv1.weight": (384, 16, 3, 3, 3)},  # VAE
    {"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096), "shared.weight": (256384, 4096)},  # T5
    {},
])
def test_rejects_what_is_not_a_dit(keys):
    expected = r"not a Wan diffusion model \(DiT\): expected keys patch_embedding.weight, text_embedding"
    with pytest.raises(ValueError, match=expected):
        detect_dit_config(keys)


def test_rejects_other_layouts_and_variants():
    shapes = shapes_of(PRESETS["Wan2.1 T2V 1.3B"])
    with pytest.raises(ValueError, match="diffusers' key layout"):
        detect_dit_config({"patch_embedding.weight": (1536, 16, 1, 2, 2),
                           "condition_embedder.time_embedder.linear_1.weight": (1536, 256)})
    with pytest.raises(ValueError, match="modules vace_blocks"):
        detect_dit_config({**shapes, "vace_blocks.0.after_proj.weight": (1536, 1536)})
    with pytest.raises(ValueError, match=r"blocks \[7\] are missing"):
        detect_dit_config({k: v for k, v in shapes.items() if not k.startswith("blocks.7.")})
