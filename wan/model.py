"""The Wan 2.1 / 2.2 diffusion transformer (DiT) in plain PyTorch.

Parameter names follow the original Wan checkpoints, so an official state dict loads with
``load_state_dict(strict=True)``. The forward pass is split so a memory engine (block swap)
and step caches can act between its parts::

    state = model.embed(x, t, context, clip_fea, y)
    for block in model.blocks:
        state.x = block(state.x, **state.block_kwargs)
    out = model.unembed(state)

Dtypes mirror the official code run under ``autocast(bfloat16)``, with explicit casts:
linear layers compute in the compute dtype (that of ``patch_embedding.weight``), layer norms,
modulation and the residual stream in float32, time embedding and head in float32.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionFn, attention

MODEL_TYPES = ("t2v", "i2v", "ti2v")


@dataclass(frozen=True)
class WanConfig:
    """Shape of a Wan DiT. model_type: "t2v" (text only), "i2v" (conditioning latent ``y`` of
    in_dim - out_dim channels concatenated to x), "ti2v" (Wan2.2 5B: per-token timesteps)."""

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    clip: bool = False  # Wan 2.1 i2v: CLIP image tokens (img_emb) with their own k_img / v_img
    clip_dim: int = 1280
    clip_pos_len: int = 0  # Wan 2.1 FLF2V: learned positions over first + last frame tokens (514)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# The released models, checked against wan22's wan/configs and Wan2.1's; keyed by display name.
PRESETS: dict[str, WanConfig] = {
    "Wan2.1 T2V 1.3B": WanConfig("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "Wan2.1 T2V 14B": WanConfig("t2v", **_14B),
    "Wan2.1 I2V 14B": WanConfig("i2v", in_dim=36, clip=True, **_14B),
    "Wan2.1 FLF2V 14B": WanConfig("i2v", in_dim=36, clip=True, clip_pos_len=514, **_14B),
    "Wan2.2 T2V-A14B expert": WanConfig("t2v", **_14B),
    "Wan2.2 I2V-A14B expert": WanConfig("i2v", in_dim=36, **_14B),
    "Wan2.2 TI2V-5B": WanConfig("ti2v", in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_heads=24,
                                num_layers=30),
}


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[N] timesteps -> [N, dim] (cos, sin) embedding, in float64 as official."""
    half = dim // 2
    position = position.to(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


def rope_freqs(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """3-D RoPE for a (F, H, W) token grid: [F*H*W, 1, head_dim // 2, 2] float32 (cos, sin).

    The head dimension's pairs split into frame / height / width parts as official
    rope_params + rope_apply do; angles are computed in float64.
    """
    c = head_dim // 2
    parts = []
    for axis, (n, k) in enumerate(zip(grid, (c - 2 * (c // 3), c // 3, c // 3))):
        inv = 1.0 / torch.pow(theta, torch.arange(0, 2 * k, 2).to(torch.float64).div(2 * k))
        shape = [1, 1, 1, k]
        shape[axis] = n
        parts.append(torch.outer(torch.arange(n), inv).view(shape).expand(*grid, k))
    angles = torch.cat(parts, dim=-1).reshape(-1, 1, c)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def rope_apply(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x [B, L, N, D] by freqs from rope_freqs; float32 out.

    Real arithmetic in float32 (official: complex float64), so torch.compile can trace it.
    Each product is written into the output's even or odd lanes (x's pairs are read where
    they are, promoted to float32 by the multiply), so the only temporary is one half-size
    product, where ``stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos])`` holds five.
    """
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs.unbind(-1)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace ``out=`` into strided lanes (a graph break per call); compiled,
        # the stacked form is one fused kernel with no temporaries. The same products and sums.
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    even, odd = out.unflatten(-1, (-1, 2)).unbind(-1)
    product = torch.empty(x0.shape, dtype=torch.float32, device=x.device)
    torch.mul(x0, cos, out=even).sub_(torch.mul(x1, sin, out=product))
    torch.mul(x0, sin, out=odd).add_(torch.mul(x1, cos, out=product))
    return out


def _linear32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Official runs the time embedding and head under autocast(float32): weights upcast.
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


Runs = tuple[int, ...]  # token counts of consecutive runs that share a timestep (TI2V)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, runs: Runs | None) -> torch.Tensor:
    """``x.float() * (1 + scale) + shift``; shift / scale are [B, 1, C], or [B, R, C] with
    ``runs`` giving each run's token count. Per run, the result is written straight into one
    float32 output: bit-identical to the per-token form without its [B, L, 6, C] tensors."""
    if runs is None:  # x is promoted by the multiply; the shift goes into its fresh result
        return torch.mul(x, 1 + scale).add_(shift)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for xs, os, sh, sc in zip(x.split(runs, 1), out.split(runs, 1), shift.split(1, 1), scale.split(1, 1)):
        torch.mul(xs, 1 + sc, out=os).add_(sh)
    return out


def _gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, runs: Runs | None) -> torch.Tensor:
    """``x + y * gate`` with gate [B, 1, C], or [B, R, C] per run as in :func:`_modulate`."""
    if runs is None:
        return x + y * gate
    out = torch.empty(x.shape, dtype=torch.promote_types(y.dtype, gate.dtype), device=x.device)
    for ys, os, g in zip(y.split(runs, 1), out.split(runs, 1), gate.split(1, 1)):
        torch.mul(ys, g, out=os)
    return out.add_(x)  # y * gate + x: the same sum (addition commutes exactly)


class WanRMSNorm(nn.Module):

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input's dtype (official). The float32 copy and
        # the cast are this function's own tensors, so they are scaled in place.
        y = x.float()
        norm = torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        y = y * norm if y is x else y.mul_(norm)
        typed = y.type_as(x)
        if typed.dtype != torch.promote_types(typed.dtype, self.weight.dtype):
            return typed * self.weight
        return typed.mul_(self.weight)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weights' dtype, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class WanSelfAttention(nn.Module):

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, backend: str = "auto",
                attend: AttentionFn | None = None) -> torch.Tensor:
        """x [B, L, C] in the compute dtype, freqs from rope_freqs; ``attend`` replaces the
        dense attention call (see ``attention.AttentionFn``)."""
        shape = (*x.shape[:2], self.num_heads, self.head_dim)
        q = rope_apply(self.norm_q(self.q(x)).view(shape), freqs).to(x.dtype)
        k = rope_apply(self.norm_k(self.k(x)).view(shape), freqs).to(x.dtype)
        v = self.v(x).view(shape)
        out = attention(q, k, v, backend) if attend is None else attend(q, k, v)
        return self.o(out.flatten(2))


class WanCrossAttention(WanSelfAttention):
    """Attention to the text tokens; with ``clip``, plus a second attention to CLIP image tokens."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, clip: bool = False):
        super().__init__(dim, num_heads, qk_norm, eps)
        if clip:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
        """x [B, L1, C], context [B, L2, C] and context_img [B, L3, C], all in the compute dtype."""
        shape, dtype = (x.size(0), -1, self.num_heads, self.head_dim), x.dtype
        q = self.norm_q(self.q(x)).view(shape).to(dtype)
        k = self.norm_k(self.k(context)).view(shape).to(dtype)
        out = attention(q, k, self.v(context).view(shape), backend)
        if context_img is not None:
            k = self.norm_k_img(self.k_img(context_img)).view(shape).to(dtype)
            out = out + attention(q, k, self.v_img(context_img).view(shape), backend)
        return self.o(out.flatten(2))


class WanAttentionBlock(nn.Module):

    def __init__(self, config: WanConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, config.num_heads, config.qk_norm, eps, config.clip)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), GELUInPlace(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim).div_(dim**0.5))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, freqs: torch.Tensor, context: torch.Tensor,
                context_img: torch.Tensor | None = None, backend: str = "auto",
                runs: Runs | None = None, self_attention: AttentionFn | None = None) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C] float32. e0 [B, 1, 6, C] float32, or [B, R, 6, C] with
        ``runs`` (TI2V); the compute dtype is context's (embed makes it so)."""
        dtype = context.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unbind(2)
        # Sub-layer outputs and inputs are temporaries of one expression each, so each is freed
        # as soon as it is used (a local would keep it alive through the next sub-layer).
        x = _gated(x, self.self_attn(_modulate(self.norm1(x), shift1, scale1, runs).to(dtype), freqs, backend,
                                     self_attention), gate1, runs)  # float32 from here on, as official
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, context_img, backend)
        linear1, gelu, linear2 = self.ffn
        return _gated(x, linear2(gelu(linear1(_modulate(self.norm2(x), shift2, scale2, runs).to(dtype)))),
                      gate2, runs)


class GELUInPlace(nn.GELU):
    """tanh GELU written over its input when no gradient is recorded: the FFN's hidden state
    [B, L, ffn_dim] is its largest tensor, and the Linear's output has no other use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class Head(nn.Module):

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim).div_(dim**0.5))

    def forward(self, x: torch.Tensor, e: torch.Tensor, runs: Runs | None = None) -> torch.Tensor:
        """x [B, L, C], e [B, 1 or R, C] float32 -> [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unbind(2)
        return _linear32(self.head, _modulate(self.norm(x), shift, scale, runs))


class MLPProj(nn.Module):
    """CLIP image features [B, 257 (FLF2V: 514), clip_dim] -> image context tokens (Wan 2.1)."""

    def __init__(self, in_dim: int, out_dim: int, pos_len: int = 0):
        super().__init__()
        self.proj = nn.Sequential(WanLayerNorm(in_dim, 1e-5, True), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), WanLayerNorm(out_dim, 1e-5, True))
        self.emb_pos = nn.Parameter(torch.zeros(1, pos_len, in_dim)) if pos_len else None

    def forward(self, clip_fea: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = clip_fea if self.emb_pos is None else clip_fea + self.emb_pos
        return self.proj[1:](self.proj[0](x).to(dtype))


@dataclass(frozen=True)
class HostInputs:
    """What ``embed`` computes on the host from the timesteps' values rather than from
    shapes: their sinusoids, the RoPE table and TI2V's runs of equal timesteps. The memory
    planner traces the forward on tensors that have shapes but no values, so it passes
    these in; a real forward computes them with ``WanModel.host_inputs``."""

    sinusoid: torch.Tensor  # [B * R, freq_dim] float32: one row per sample and run of tokens
    freqs: torch.Tensor  # RoPE (cos, sin) [L, 1, head_dim // 2, 2] float32 (rope_freqs)
    runs: Runs | None = None  # per-token timesteps: token counts of the runs (TI2V)


@dataclass
class WanState:
    """What ``embed`` hands the blocks and ``unembed``; blocks run as
    ``state.x = block(state.x, **state.block_kwargs)``."""

    x: torch.Tensor  # tokens [B, L, dim]: compute dtype out of embed, float32 after a block
    e: torch.Tensor  # time embedding [B, 1 or R, dim] float32 (head; step caches)
    e0: torch.Tensor  # its projection [B, 1 or R, 6, dim] float32 (block modulation; step caches)
    freqs: torch.Tensor  # RoPE (cos, sin) [L, 1, head_dim // 2, 2] float32
    context: torch.Tensor  # text tokens [B, text_len, dim], compute dtype
    context_img: torch.Tensor | None  # CLIP image tokens [B, 257 or 514, dim] (Wan 2.1 i2v)
    grid: tuple[int, int, int]  # token grid (F, H, W) after patching
    backend: str = "auto"  # attention backend, see attention.py
    runs: Runs | None = None  # per-token timesteps: e / e0 hold one row per run of equal tokens
    self_attention: AttentionFn | None = None  # replaces dense self-attention (attention.AttentionFn)

    @property
    def block_kwargs(self) -> dict:
        return dict(e0=self.e0, freqs=self.freqs, context=self.context, context_img=self.context_img,
                    backend=self.backend, runs=self.runs, self_attention=self.self_attention)


class WanModel(nn.Module):
    """The Wan DiT. Inputs are batched: all samples share one latent size."""

    def __init__(self, config: WanConfig, attention_backend: str = "auto"):
        super().__init__()
        c = self.config = config
        self.attention_backend = attention_backend
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList(WanAttentionBlock(c) for _ in range(c.num_layers))
        self.head = Head(c.dim, c.out_dim, c.patch_size, c.eps)
        if c.clip:
            self.img_emb = MLPProj(c.clip_dim, c.dim, c.clip_pos_len)

    def time_embed(self, sinusoid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep sinusoids [N, freq_dim] float32 -> e [N, dim] and e0 [N, 6, dim], float32."""
        e = _linear32(self.time_embedding[2], F.silu(_linear32(self.time_embedding[0], sinusoid)))
        e0 = _linear32(self.time_projection[1], F.silu(e))
        return e, e0.unflatten(1, (6, self.config.dim))

    def host_inputs(self, t: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> HostInputs:
        """The value-dependent inputs of ``embed``, computed on the CPU (float64 angles; MPS
        has none): t is [B] (or a scalar) or per token [B, L] for a (F, H, W) token grid."""
        n = math.prod(grid)
        t = t.detach().cpu()
        runs = None
        if t.dim() <= 1:
            t = t.reshape(-1).expand(batch)
        elif t.shape == (batch, n):
            # Per-token timesteps come in runs (TI2V: the first frame's tokens, then the rest):
            # one embedding per run, applied run by run, never a [B, L, 6, dim] tensor.
            starts = torch.cat([torch.zeros(1, dtype=torch.long),
                                1 + torch.nonzero((t[:, 1:] != t[:, :-1]).any(0)).flatten()])
            bounds = [*starts.tolist(), n]
            runs = tuple(hi - lo for lo, hi in zip(bounds, bounds[1:]))
            t = t[:, starts].reshape(-1)
        else:
            raise ValueError(f"t must be [B] or per token [B, L] = [{batch}, {n}]; got {list(t.shape)}")
        sinusoid = sinusoidal_embedding_1d(self.config.freq_dim, t).float()
        return HostInputs(sinusoid, rope_freqs(grid, self.config.head_dim), runs)

    def embed(self, x: torch.Tensor, t: torch.Tensor | None, context: torch.Tensor,
              clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None,
              host: HostInputs | None = None) -> WanState:
        """Patchify and embed everything the blocks need.

        x: latent [B, C, F, H, W]; y: i2v conditioning [B, in_dim - C, F, H, W], concatenated
        along channels. t: [B] (or a scalar), or per token [B, L] (TI2V-5B: first frame at 0).
        context: text [B, <=text_len, text_dim], zero-padded to text_len and not masked, as
        official. clip_fea: CLIP features [B, 257 (FLF2V: 514), clip_dim], Wan 2.1 i2v only.
        host: ``host_inputs(t, ...)`` computed beforehand (t is then not read).
        """
        c = self.config
        dtype = self.patch_embedding.weight.dtype
        if y is not None:
            x = torch.cat([x, y], dim=1)
        if x.shape[1] != c.in_dim:
            y_dim = c.in_dim - c.out_dim
            parts = f" (latent {c.out_dim} + conditioning y {y_dim})" if y_dim else ""
            raise ValueError(f"this {c.model_type} model takes {c.in_dim} input channels{parts}; "
                             f"got {x.shape[1]}")
        if any(s % p for s, p in zip(x.shape[2:], c.patch_size)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by the patch size "
                             f"{c.patch_size}")
        grid = tuple(n // p for n, p in zip(x.shape[2:], c.patch_size))
        if host is None:
            host = self.host_inputs(t, x.shape[0], grid)
        x = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2)
        b = x.shape[0]
        e, e0 = self.time_embed(host.sinusoid.to(x.device))
        rows = len(host.runs) if host.runs else 1
        e, e0 = e.unflatten(0, (b, rows)), e0.unflatten(0, (b, rows))

        if context.shape[1] > c.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens; at most text_len={c.text_len}")
        context = self.text_embedding(F.pad(context, (0, 0, 0, c.text_len - context.shape[1])).to(dtype))
        if c.clip != (clip_fea is not None):
            raise ValueError("this model needs clip_fea (CLIP image features)" if c.clip
                             else "this model has no CLIP image input; pass clip_fea=None")
        context_img = self.img_emb(clip_fea, dtype) if c.clip else None
        freqs = host.freqs.to(x.device)
        return WanState(x, e, e0, freqs, context, context_img, grid, self.attention_backend, host.runs)

    def unembed(self, state: WanState) -> torch.Tensor:
        """Head and unpatchify: -> [B, out_dim, F, H, W] float32."""
        x = self.head(state.x, state.e, state.runs)
        (f, h, w), (pt, ph, pw) = state.grid, self.config.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    def run_blocks(self, state: WanState) -> WanState:
        """``state.x`` through every block in order, on the blocks' own device."""
        for block in self.blocks:
            state.x = block(state.x, **state.block_kwargs)
        return state

    def forward(self, x: torch.Tensor, t: torch.Tensor | None, context: torch.Tensor,
                clip_fea: torch.Tensor | None = None, y: torch.Tensor | None = None,
                host: HostInputs | None = None,
                run_blocks: Callable[[WanState], WanState] | None = None) -> torch.Tensor:
        """Predicted flow [B, out_dim, F, H, W] float32; arguments as ``embed``. ``run_blocks``
        replaces the plain block loop (block swap, step caches hook in there)."""
        state = self.embed(x, t, context, clip_fea, y, host)
        return self.unembed((run_blocks or self.run_blocks)(state))
