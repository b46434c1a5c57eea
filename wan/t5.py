"""UMT5-XXL, the text encoder of Wan 2.1 / 2.2, in plain PyTorch.

The module tree uses the names of the official Wan checkpoint
(``models_t5_umt5-xxl-enc-bf16.pth``: ``token_embedding``, ``blocks.N.{norm1, attn.{q,k,v,o},
norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}``, ``norm``), so that file loads as is;
the transformers / ComfyUI layout (Comfy-Org ``umt5_xxl_*.safetensors``: ``shared``,
``encoder.block.N.layer.{0,1}...``, ``encoder.final_layer_norm``) is renamed by
:func:`t5_key_map`.

UMT5 differs from T5 v1.1 in one way that matters here: every layer owns its relative
position bias. Attention logits are not scaled, the FFN is gated GELU (tanh approximation)
and the norms are RMS norms without bias.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TEXT_LEN = 512  # Wan pads and truncates every prompt to this many tokens


@dataclass(frozen=True)
class UMT5Config:
    """Shape of a UMT5 encoder; the defaults are UMT5-XXL as used by Wan."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


UMT5_XXL = UMT5Config()


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # As both references: UMT5 activations overflow float16, clamp them short of inf.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-limit, limit)
    return x


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, statistics in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of each key-minus-query offset."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    # clamp(min=1) only keeps log(0) out; those offsets take the exact branch anyway.
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    return bucket + torch.where(rel < exact, rel, large.clamp(max=half - 1))


class RelativeBias(nn.Module):
    """One layer's learned bias per (bucket, head)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, heads, Lq, Lk]


class Attention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no scaling
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = FeedForward(cfg)
        self.pos_embedding = RelativeBias(cfg)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(buckets).to(x.dtype)
        if keep is not None:  # masked keys get the dtype's minimum, as in the official code
            bias = bias.masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        x = _clamp_fp16(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """UMT5 encoder stack: token ids -> final-norm hidden states [B, L, d_model]."""

    def __init__(self, config: UMT5Config = UMT5_XXL):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.d_model, config.eps)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                        config: UMT5Config | None = None) -> "UMT5Encoder":
        """Build from a state dict in either key layout, config detected from its shapes.

        The tensors are taken over (``assign=True``), cast only when ``dtype`` is given, so a
        memory-mapped file is not copied. Every key must be a plain parameter: scaled-FP8
        files need the FP8 module's layers (or its dequantisation) first.
        """
        sd = convert_t5_state_dict(state_dict)
        config = config or detect_t5_config({k: v.shape for k, v in sd.items()})
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.num_buckets,
                                           self.config.max_distance)
        keep = None if mask is None else mask.to(x.device) > 0
        for block in self.blocks:
            x = block(x, buckets, keep)
        return self.norm(x)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, L] and 0/1 mask [B, L] -> [B, L, d_model]; padded positions hold junk."""
        return self(ids, mask)

    def encode_padded(self, ids: torch.Tensor, mask: torch.Tensor,
                      text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
        """Wan's text context: ([B, text_len, d_model] with zeros past each prompt, lengths [B]).

        The official pipeline encodes the 512-token padded batch with its mask, cuts each
        prompt to its length, and the DiT pads it back with zeros. Masks are prefixes (the
        tokenizer's), so positions past the longest prompt are masked for every query and the
        bias depends on offsets only: they are dropped before encoding, which changes the
        cost, not the result.
        """
        lengths = mask.gt(0).sum(1)
        n = int(lengths.max())
        if n > text_len:
            raise ValueError(f"prompt of {n} tokens is longer than text_len={text_len}")
        out = self(ids[:, :n], mask[:, :n])
        keep = torch.arange(n, device=out.device)[None, :] < lengths.to(out.device)[:, None]
        out = out.masked_fill(~keep[..., None], 0)
        return F.pad(out, (0, 0, 0, text_len - n)), lengths


# --- checkpoint keys -------------------------------------------------------------------

_BLOCK = r"blocks\.(\d+)\."
_HF_BLOCK = r"encoder\.block\.(\d+)\.layer\."
# transformers / ComfyUI module path -> official Wan module path (the part after the match,
# "weight" or an FP8 extra such as "scale_weight", is kept).
_HF_RULES = [(re.compile(a), b) for a, b in [
    (r"(?:shared|encoder\.embed_tokens)\.", "token_embedding."),
    (_HF_BLOCK + r"0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
    (_HF_BLOCK + r"0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (_HF_BLOCK + r"0\.layer_norm\.", r"blocks.\1.norm1."),
    (_HF_BLOCK + r"1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (_HF_BLOCK + r"1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (_HF_BLOCK + r"1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (_HF_BLOCK + r"1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"encoder\.final_layer_norm\.", "norm."),
]]
_WAN_MODULES = r"(?:norm1|norm2|attn\.[qkvo]|ffn\.(?:gate\.0|fc1|fc2)|pos_embedding\.embedding)"
_WAN_RULES = [(re.compile(r"(token_embedding|norm|" + _BLOCK + _WAN_MODULES + r")\."), r"\g<0>")]
# Key that identifies each layout; whatever precedes it is the file's prefix.
_LAYOUTS = [("encoder.block.0.layer.0.SelfAttention.q.weight", _HF_RULES),
            ("blocks.0.attn.q.weight", _WAN_RULES)]


def _find_layout(keys: Sequence[str], layouts, what: str):
    for anchor, rules in layouts:
        for key in keys:
            prefix = key[:-len(anchor)]
            if key.endswith(anchor) and (not prefix or prefix.endswith(".")):
                return prefix, rules
    sample = ", ".join(keys[:5])
    raise ValueError(f"not {what}: no key ends with any of "
                     f"{[a for a, _ in layouts]} (first keys: {sample})")


def t5_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Source key -> internal (official Wan) key, for every key belonging to the encoder.

    Either layout is accepted, under any prefix. Keys outside the encoder (``spiece_model``,
    ``scaled_fp8``, ``decoder.*``, ``lm_head``) are left out of the map. Per-layer extras of
    scaled FP8 files (``*.scale_weight``, ``*.scale_input``) follow their layer: only the
    module path is renamed, so an FP8 loader finds them beside the renamed weight. When both
    ``shared.weight`` and ``encoder.embed_tokens.weight`` are present (tied copies), the
    first is used. Raises ValueError when the keys are not a UMT5/T5 encoder.
    """
    keys = list(keys)
    prefix, rules = _find_layout(keys, _LAYOUTS, "a UMT5 text encoder")
    out, taken = {}, set()
    for key in keys:
        if not key.startswith(prefix):
            continue
        for pattern, repl in rules:
            m = pattern.match(key, len(prefix))
            if m:
                new = m.expand(repl) + key[m.end():]
                if new not in taken:
                    out[key] = new
                    taken.add(new)
                break
    return out


def convert_t5_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict (either layout) to the internal layout, dropping foreign keys."""
    return {new: state_dict[old] for old, new in t5_key_map(state_dict.keys()).items()}


def detect_t5_config(shapes: Mapping[str, Sequence[int]]) -> UMT5Config:
    """UMT5Config from a {key: shape} mapping in either layout (FP8 extras are ignored)."""
    s = {new: tuple(shapes[old]) for old, new in t5_key_map(shapes.keys()).items()}
    layers = {int(m.group(1)) for k in s if (m := re.match(_BLOCK, k))}
    num_layers = max(layers) + 1 if layers else 0
    required = ["token_embedding.weight", "norm.weight"] + [
        f"blocks.{i}.{name}.weight" for i in range(num_layers)
        for name in ("norm1", "attn.q", "attn.k", "attn.v", "attn.o", "norm2",
                     "ffn.gate.0", "ffn.fc1", "ffn.fc2", "pos_embedding.embedding")]
    missing = [k for k in required if k not in s]
    if num_layers > 1 and "blocks.0.pos_embedding.embedding.weight" in s and all(
            f"blocks.{i}.pos_embedding.embedding.weight" not in s for i in range(1, num_layers)):
        raise ValueError("a T5 v1.1 encoder (one position bias shared by all layers, e.g. the "
                         "t5xxl of Flux / SD3), not UMT5: Wan needs umt5-xxl")
    if not num_layers or missing:
        raise ValueError(f"not a UMT5 text encoder: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    vocab, d_model = s["token_embedding.weight"]
    num_buckets, num_heads = s["blocks.0.pos_embedding.embedding.weight"]
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=s["blocks.0.attn.q.weight"][0] // num_heads,
                      d_ff=s["blocks.0.ffn.gate.0.weight"][0], num_layers=num_layers,
                      num_heads=num_heads, num_buckets=num_buckets)


def t5_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a UMT5 encoder of ``config`` in the internal layout, with its shape
    (one block built on the meta device, repeated for every block)."""
    import dataclasses

    from .checkpoint import repeated_block_shapes

    with torch.device("meta"):
        return repeated_block_shapes(UMT5Encoder(dataclasses.replace(config, num_layers=1)), config.num_layers)


def verify_t5(shapes: Mapping[str, Sequence[int]], name: str) -> UMT5Config:
    """``detect_t5_config`` and every tensor's shape checked against it, from the header
    alone (``wan.checkpoint.check_shapes``); a CheckpointError naming ``name``."""
    from .checkpoint import CheckpointError, check_shapes

    try:
        names = t5_key_map(shapes.keys())
        renamed = {new: tuple(shapes[old]) for old, new in names.items()}
        config = detect_t5_config(shapes)
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from err
    found = {k: v for k, v in renamed.items() if not k.endswith((".scale_weight", ".scale_input"))}
    check_shapes(name, f"a UMT5 encoder ({config.num_layers} layers, width {config.d_model})",
                 t5_shapes(config), found, {new: old for old, new in names.items()})
    return config
