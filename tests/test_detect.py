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


# --- every tensor's shape, from the header alone -----------------------------------------------

def test_dit_shapes_cover_every_tensor_of_the_model():
    from wanfit.wan.detect import dit_shapes
    for name in ("Wan2.2 I2V-A14B expert", "Wan2.1 I2V 14B", "Wan2.2 TI2V-5B"):
        assert dit_shapes(PRESETS[name]) == shapes_of(PRESETS[name])


@pytest.mark.parametrize("key, shape, message", [
    ("blocks.1.ffn.0.weight", (8960, 1000), r"tensor blocks\.1\.ffn\.0\.weight has shape \[8960, 1000\], but a "
                                            r"Wan2\.1 T2V 1\.3B needs \[8960, 1536\]"),
    ("blocks.29.self_attn.q.weight", (1536,), r"tensor blocks\.29\.self_attn\.q\.weight has shape \[1536\]"),
    ("head.modulation", (1, 3, 1536), r"tensor head\.modulation has shape \[1, 3, 1536\]"),
])
def test_one_wrong_shape_anywhere_is_refused_by_name(key, shape, message):
    from wanfit.wan.checkpoint import CheckpointError
    from wanfit.wan.detect import verify_dit
    shapes = {COMFY + k: v for k, v in shapes_of(PRESETS["Wan2.1 T2V 1.3B"]).items()}
    assert verify_dit(shapes, "ok.safetensors") == PRESETS["Wan2.1 T2V 1.3B"]
    shapes[COMFY + key] = shape
    with pytest.raises(CheckpointError, match=r"^wan2\.1_t2v_1\.3B_fp16\.safetensors: " + message):
        verify_dit(shapes, "wan2.1_t2v_1.3B_fp16.safetensors")


def test_a_missing_tensor_and_fp8_extras():
    from wanfit.wan.checkpoint import CheckpointError
    from wanfit.wan.detect import verify_dit
    shapes = dict(shapes_of(PRESETS["Wan2.1 T2V 1.3B"]))
    shapes.update({"scaled_fp8": (0,), "blocks.0.self_attn.q.scale_weight": ()})  # Comfy-Org fp8 extras
    verify_dit(shapes, "f.safetensors")
    del shapes["blocks.7.cross_attn.norm_k.weight"]
    with pytest.raises(CheckpointError, match=r"f\.safetensors: a Wan2\.1 T2V 1\.3B needs 1 tensors this file "
                                              r"lacks, e\.g\. blocks\.7\.cross_attn\.norm_k\.weight"):
        verify_dit(shapes, "f.safetensors")
