"""CLIP ViT-H/14 image encoder of Wan 2.1 image-to-video, in plain PyTorch.

Wan feeds the DiT the penultimate hidden states of the vision tower (official
``VisionTransformer.forward(use_31_block=True)``): patch + class embeddings, position
embeddings, pre-layernorm, then all blocks but the last; no post-layernorm, no projection.
Output [B, 257, 1280] for a 224x224 image.

The module tree uses transformers' ``CLIPVisionModel`` names (``embeddings.*``,
``pre_layrnorm``, ``encoder.layers.N.*``), the layout of Comfy-Org ``clip_vision_h.safetensors``
(there under ``vision_model.``). :func:`convert_clip_vision_state_dict` also reads:
- open_clip names (``visual.conv1``, ``visual.transformer.resblocks.N.attn.in_proj_weight``...);
- the official Wan file ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, which
  holds Wan's own module names (``visual.patch_embedding``, ``visual.cls_embedding``,
  ``visual.transformer.N.attn.to_qkv``, ``visual.transformer.N.mlp.0``...), not open_clip's.
Any prefix is accepted; text towers, post-norms and projections are ignored.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}  # B, L, H, g, bigG


@dataclass(frozen=True)
class ClipVisionConfig:
    """Shape of a CLIP vision tower; the defaults are ViT-H/14 as used by Wan 2.1."""

    width: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120
    patch_size: int = 14
    image_size: int = 224
    activation: str = "gelu"  # "gelu" (exact; open_clip ViT-H) or "quick_gelu" (OpenAI CLIP)
    eps: float = 1e-5
    skip_last_layers: int = 1  # Wan uses the penultimate hidden states

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


VIT_H_14 = ClipVisionConfig()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, as Wan's CLIP (it runs the tower in float16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.position_embedding = nn.Embedding(cfg.num_tokens, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        if cfg.activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"unknown CLIP activation {cfg.activation!r}")
        self.quick = cfg.activation == "quick_gelu"
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in 0..1 -> CLIP input [B, 3, size, size], as Wan 2.1.

    Wan's ``CLIPModel.visual`` stretches the whole frame to size x size (no crop, aspect ratio
    not kept) with bicubic interpolation (align_corners=False, no antialias, overshoot not
    clamped), then normalises with CLIP's mean / std. It resizes the [-1, 1] frame and maps
    it to [0, 1] afterwards; bicubic weights sum to one, so resizing the 0..1 image is the
    same. (ComfyUI's own CLIPVisionEncode resizes the short side and crops instead.)
    """
    x = images[..., :3].movedim(-1, 1).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipVisionEncoder(nn.Module):
    """CLIP vision tower returning the hidden states after all but ``skip_last_layers`` blocks."""

    def __init__(self, config: ClipVisionConfig = VIT_H_14):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = LayerNorm(config.width, eps=config.eps)  # sic: transformers' name
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(EncoderLayer(config)
                                                              for _ in range(config.num_layers))})

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        config: ClipVisionConfig | None = None) -> "ClipVisionEncoder":
        """Build from a state dict in any supported layout, config detected from its shapes."""
        sd = convert_clip_vision_state_dict(state_dict)
        config = config or detect_clip_vision_config({k: v.shape for k, v in sd.items()})
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, image_size, image_size] -> [B, num_tokens, width]."""
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(f"CLIP vision input must be {size}x{size}, got {tuple(pixels.shape[-2:])}")
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder["layers"][: self.config.num_layers - self.config.skip_last_layers]:
            x = layer(x)
        return x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE [B, H, W, 3] in 0..1 -> Wan's CLIP context [B, 257, 1280]."""
        pixels = preprocess(images, self.config.image_size)
        return self(pixels.to(self.embeddings.patch_embedding.weight.device))


# --- checkpoint keys -------------------------------------------------------------------

_LAYER = r"encoder.layers.\1."
_QKV = ("q_proj", "k_proj", "v_proj")
# (pattern, internal name, tensor transform); a tuple of names splits a fused qkv tensor.
_HF_RULES = [
    (r"(embeddings\.(?:patch_embedding|class_embedding|position_embedding)|pre_layrnorm"
     r"|encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12]))",
     r"\1", None),
]
_OPEN_CLIP_RULES = [
    (r"conv1", "embeddings.patch_embedding", None),
    (r"class_embedding", "embeddings.class_embedding", None),
    (r"positional_embedding", "embeddings.position_embedding.weight", None),
    (r"ln_pre", "pre_layrnorm", None),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
     tuple(_LAYER + f"self_attn.{p}.\\2" for p in _QKV), None),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj", _LAYER + "self_attn.out_proj", None),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])", _LAYER + r"layer_norm\2", None),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc", _LAYER + "mlp.fc1", None),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj", _LAYER + "mlp.fc2", None),
]
_WAN_RULES = [
    (r"patch_embedding", "embeddings.patch_embedding", None),
    (r"cls_embedding", "embeddings.class_embedding", lambda t: t.reshape(t.shape[-1])),
    (r"pos_embedding", "embeddings.position_embedding.weight", lambda t: t.reshape(t.shape[-2:])),
    (r"pre_norm", "pre_layrnorm", None),
    (r"transformer\.(\d+)\.attn\.to_qkv", tuple(_LAYER + f"self_attn.{p}" for p in _QKV), None),
    (r"transformer\.(\d+)\.attn\.proj", _LAYER + "self_attn.out_proj", None),
    (r"transformer\.(\d+)\.norm([12])", _LAYER + r"layer_norm\2", None),
    (r"transformer\.(\d+)\.mlp\.0", _LAYER + "mlp.fc1", None),
    (r"transformer\.(\d+)\.mlp\.2", _LAYER + "mlp.fc2", None),
]
# Keys that identify each layout (patch embedding, first block), found under one prefix.
_LAYOUTS = [
    (("embeddings.patch_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight"), _HF_RULES),
    (("conv1.weight", "transformer.resblocks.0.attn.in_proj_weight"), _OPEN_CLIP_RULES),
    (("patch_embedding.weight", "transformer.0.attn.to_qkv.weight"), _WAN_RULES),
]


def _find_prefix(keys: Sequence[str]):
    present = set(keys)
    for (patch, block), rules in _LAYOUTS:
        for key in keys:
            prefix = key[:-len(patch)]
            if key.endswith(patch) and (not prefix or prefix.endswith(".")) and prefix + block in present:
                return prefix, rules
    raise ValueError(f"not a CLIP vision model: no prefix holds both keys of any of "
                     f"{[a for a, _ in _LAYOUTS]} (first keys: {', '.join(keys[:5])})")


def convert_clip_vision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> internal (transformers) names; fused qkv tensors are split.

    Only the vision tower is kept (keys under the detected prefix that name one of its
    modules); everything else, text tower, ``post_layernorm`` / ``ln_post`` / ``post_norm``,
    projections, ``logit_scale``, is dropped. Only the tensors kept are read, so a lazy
    mapping is not loaded whole.
    """
    keys = list(state_dict.keys())
    prefix, rules = _find_prefix(keys)
    compiled = [(re.compile(p + r"(?=\.|$)"), name, fn) for p, name, fn in rules]
    out = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        for pattern, name, fn in compiled:
            m = pattern.match(key, len(prefix))
            if not m:
                continue
            rest = key[m.end():]
            if isinstance(name, tuple):  # fused q, k, v along the output dimension
                for part, tensor in zip(name, state_dict[key].chunk(3, dim=0)):
                    out[m.expand(part) + rest] = tensor
            else:
                tensor = state_dict[key]
                out[m.expand(name) + rest] = fn(tensor) if fn else tensor
            break
    return out


def detect_clip_vision_config(shapes: Mapping[str, Sequence[int]],
                              num_heads: int | None = None) -> ClipVisionConfig:
    """ClipVisionConfig from a {key: shape} mapping in any supported layout.

    The head count is not in the shapes: give ``num_heads`` or it is taken from the width
    (16 for ViT-H's 1280; 64-wide heads for widths not in the known table). The activation is
    not either: "gelu" (open_clip ViT-H, Wan) is assumed.
    """
    meta = {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
    s = {k: tuple(v.shape) for k, v in convert_clip_vision_state_dict(meta).items()}
    if "embeddings.class_embedding" not in s:
        raise ValueError("not a CLIP vision model: no class embedding (SigLIP-style towers "
                         "without a class token are not what Wan 2.1 uses)")
    layers = {int(m.group(1)) for k in s if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    missing = [k for k in ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
                           "pre_layrnorm.weight", "encoder.layers.0.mlp.fc1.weight") if k not in s]
    if missing:
        raise ValueError(f"not a CLIP vision model: missing {missing}")
    width, _, patch, _ = s["embeddings.patch_embedding.weight"]
    grid = math.isqrt(s["embeddings.position_embedding.weight"][0] - 1)
    if grid * grid + 1 != s["embeddings.position_embedding.weight"][0]:
        raise ValueError("CLIP vision position embedding is not a square grid plus a class token")
    return ClipVisionConfig(
        width=width, num_layers=max(layers) + 1, patch_size=patch, image_size=grid * patch,
        num_heads=num_heads or _HEADS_BY_WIDTH.get(width, max(width // 64, 1)),
        mlp_dim=s["encoder.layers.0.mlp.fc1.weight"][0])
