"""CLIP vision (Wan 2.1 i2v image encoder) vs transformers' CLIPVisionModel.

Tiny random ViT in float32 on CPU; the reference output is ``hidden_states[-2]`` (the
penultimate layer, as Wan's ``use_31_block=True``). The same weights are fed to our encoder
in the three layouts found in the wild: transformers (Comfy-Org ``clip_vision_h``), open_clip,
and the official Wan ``.pth`` (Wan's own module names), each with foreign keys beside them.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference import check
from wanfit.wan.clip_vision import (CLIP_MEAN, CLIP_STD, VIT_H_14, ClipVisionConfig, ClipVisionEncoder,
                                    convert_clip_vision_state_dict, detect_clip_vision_config, preprocess)

transformers = pytest.importorskip("transformers")

# 2 heads of 64: the head count is not in the shapes, detection takes it from the width.
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
            image_size=56, patch_size=14)


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    # eager attention: an implementation independent of the SDPA kernel ours uses
    cfg = transformers.CLIPVisionConfig(hidden_act="gelu", attn_implementation="eager", **TINY)
    model = transformers.CLIPVisionModel(cfg).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():  # make norms and the class / position embeddings matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.3 * torch.randn_like(p))
            elif "embedding" in name and "patch" not in name:
                p.copy_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def pixels():
    size = TINY["image_size"]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def reference(hf, pixels):
    with torch.no_grad():
        return hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def transformers_layout(hf) -> dict[str, torch.Tensor]:
    """As Comfy-Org clip_vision_h.safetensors: under vision_model., with a projection."""
    sd = {"vision_model." + k: v.clone() for k, v in hf.state_dict().items()}
    sd["visual_projection.weight"] = torch.randn(16, TINY["hidden_size"])
    return sd


def _fused(sd, i, part):
    return torch.cat([sd[f"encoder.layers.{i}.self_attn.{p}_proj.{part}"] for p in "qkv"])


def open_clip_layout(hf) -> dict[str, torch.Tensor]:
    """open_clip names under visual., plus open_clip's (top-level) text-tower keys."""
    sd, w = hf.state_dict(), TINY["hidden_size"]
    out = {"visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["embeddings.class_embedding"],
           "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
           "visual.ln_post.weight": sd["post_layernorm.weight"], "visual.proj": torch.randn(w, 16),
           "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * 32, 32),
           "token_embedding.weight": torch.randn(50, 32), "logit_scale": torch.ones(())}
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"] = sd[f"pre_layrnorm.{part}"]
        for i in range(TINY["num_hidden_layers"]):
            r, l = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
            out.update({r + f"attn.in_proj_{part}": _fused(sd, i, part),
                        r + f"attn.out_proj.{part}": sd[l + f"self_attn.out_proj.{part}"],
                        r + f"ln_1.{part}": sd[l + f"layer_norm1.{part}"],
                        r + f"ln_2.{part}": sd[l + f"layer_norm2.{part}"],
                        r + f"mlp.c_fc.{part}": sd[l + f"mlp.fc1.{part}"],
                        r + f"mlp.c_proj.{part}": sd[l + f"mlp.fc2.{part}"]})
    return out


def wan_layout(hf) -> dict[str, torch.Tensor]:
    """Official models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth names (Wan's clip.py)."""
    sd, w = hf.state_dict(), TINY["hidden_size"]
    out = {"visual.patch_embedding.weight": sd["embeddings.patch_embedding.weight"],
           "visual.cls_embedding": sd["embeddings.class_embedding"].view(1, 1, w),
           "visual.pos_embedding": sd["embeddings.position_embedding.weight"][None],
           "visual.post_norm.weight": sd["post_layernorm.weight"], "visual.head": torch.randn(w, 16),
           "textual.blocks.0.attn.q.weight": torch.randn(32, 32), "log_scale": torch.ones(())}
    for part in ("weight", "bias"):
        out[f"visual.pre_norm.{part}"] = sd[f"pre_layrnorm.{part}"]
        for i in range(TINY["num_hidden_layers"]):
            r, l = f"visual.transformer.{i}.", f"encoder.layers.{i}."
            out.update({r + f"attn.to_qkv.{part}": _fused(sd, i, part),
                        r + f"attn.proj.{part}": sd[l + f"self_attn.out_proj.{part}"],
                        r + f"norm1.{part}": sd[l + f"layer_norm1.{part}"],
                        r + f"norm2.{part}": sd[l + f"layer_norm2.{part}"],
                        r + f"mlp.0.{part}": sd[l + f"mlp.fc1.{part}"],
                        r + f"mlp.2.{part}": sd[l + f"mlp.fc2.{part}"]})
    return out


LAYOUTS = {"transformers": transformers_layout, "open_clip": open_clip_layout, "wan": wan_layout}
TINY_CONFIG = ClipVisionConfig(width=128, num_layers=3, num_heads=2, mlp_dim=256, patch_size=14,
                               image_size=56)


@pytest.mark.parity
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_transformers(hf, pixels, layout):
    sd = LAYOUTS[layout](hf)
    assert detect_clip_vision_config({k: v.shape for k, v in sd.items()}) == TINY_CONFIG
    model = ClipVisionEncoder.from_state_dict(sd)
    with torch.no_grad():
        out = model(pixels)
    assert out.shape == (2, TINY_CONFIG.num_tokens, 128)
    check(out, reference(hf, pixels), f"CLIP vision {layout} layout vs CLIPVisionModel hidden_states[-2]")


@pytest.mark.parity
def test_encode_comfy_images(hf):
    """IMAGE [B, H, W, 3] 0..1 -> Wan's resize + normalisation -> penultimate states."""
    images = torch.rand(2, 37, 71, 3, generator=torch.Generator().manual_seed(2))
    size = TINY["image_size"]
    # Wan 2.1 CLIPModel.visual: a [-1, 1] frame [C, 1, H, W], bicubic to size, back to [0, 1], Normalize.
    frames = [(img.permute(2, 0, 1) * 2 - 1)[:, None] for img in images]
    x = torch.cat([F.interpolate(u.transpose(0, 1), size=(size, size), mode="bicubic", align_corners=False)
                   for u in frames]).mul_(0.5).add_(0.5)
    wan_pixels = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    check(preprocess(images, size), wan_pixels, "CLIP preprocess vs Wan 2.1 resize + normalise")
    model = ClipVisionEncoder.from_state_dict(transformers_layout(hf))
    with torch.no_grad():
        check(model.encode(images), reference(hf, wan_pixels), "CLIP encode(IMAGE) vs CLIPVisionModel")


@pytest.mark.parity
@pytest.mark.parametrize("key", ["encoder.layers.1.self_attn.v_proj.weight",
                                 "encoder.layers.0.layer_norm2.bias",
                                 "embeddings.position_embedding.weight", "pre_layrnorm.weight"])
def test_perturbed_weight_fails(hf, pixels, key):
    model = ClipVisionEncoder.from_state_dict(transformers_layout(hf))
    with torch.no_grad():
        model.get_parameter(key).view(-1)[5] += 0.5
        err = (model(pixels) - reference(hf, pixels)).abs().max().item()
    print(f"perturbed {key}: max abs err {err:.3e}")
    assert err > 1e-3


def test_last_block_is_skipped(hf, pixels):
    """Wan's penultimate states: the last block's weights must not change the output."""
    sd = transformers_layout(hf)
    key = "vision_model.encoder.layers.2.mlp.fc1.weight"
    sd[key] = torch.randn_like(sd[key])
    with torch.no_grad():
        assert torch.equal(ClipVisionEncoder.from_state_dict(sd)(pixels),
                           ClipVisionEncoder.from_state_dict(transformers_layout(hf))(pixels))


def test_detect_vit_h_and_keys():
    cfg = transformers.CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=16, image_size=224, patch_size=14,
                                        hidden_act="gelu")
    with torch.device("meta"):
        model = transformers.CLIPVisionModel(cfg)
    shapes = {"vision_model." + k: v.shape for k, v in model.state_dict().items()}
    config = detect_clip_vision_config(shapes)
    assert config == VIT_H_14 and config.num_tokens == 257
    converted = convert_clip_vision_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        assert set(converted) == set(ClipVisionEncoder(config).state_dict())  # post_layernorm dropped


def test_rejects_other_models():
    t5 = {"shared.weight": (50, 32), "encoder.block.0.layer.0.SelfAttention.q.weight": (32, 32)}
    with pytest.raises(ValueError, match="not a CLIP vision model"):
        detect_clip_vision_config(t5)
    clip_text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="not a CLIP vision model"):  # same layer names, no vision embeddings
        detect_clip_vision_config({"text_model." + k: v.shape for k, v in clip_text.state_dict().items()})
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=14))
    with pytest.raises(ValueError, match="no class embedding"):
        detect_clip_vision_config({"vision_model." + k: v.shape for k, v in siglip.state_dict().items()})
