"""FP8 storage, scaled checkpoints and the FP8Linear layer (optim/fp8.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from wanfit.optim import fp8
from wanfit.optim.fp8 import (
    FP8Linear, Fp8Format, detect_fp8_format, dequantize, load_scaled, quantize_module, quantize_weight,
    scaled_mm_linear, should_quantize,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# Half an ulp relative to the bottom of a binade: 3 mantissa bits -> 2**-4, 2 bits -> 2**-3.
UNIT_ROUNDOFF = {"e4m3fn": 2.0**-4, "e5m2": 2.0**-3}
PREFIX = "model.diffusion_model."
cuda_fp8 = pytest.mark.skipif(
    not (torch.cuda.is_available() and fp8.scaled_mm_supported(torch.device("cuda", 0))),
    reason="needs a CUDA GPU with compute capability >= 8.9")


def comfy_dequant(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The Comfy-Org definition, written independently of fp8.dequantize."""
    return (w8.float() * scale.float()).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- quantize_weight / dequantize -----------------------------------------------------------

@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_round_trip_error_is_bounded_by_the_format_precision(fmt: str) -> None:
    torch.manual_seed(0)
    dtype = fp8.FP8_DTYPES[fmt]
    w = torch.randn(512, 512)
    # A row of values below the smallest normal after scaling, to exercise subnormals too.
    w[0] = torch.linspace(-0.9, 0.9, 512) * torch.finfo(dtype).smallest_normal * w.abs().max() / fp8.FP8_MAX[dtype]
    w8, scale = quantize_weight(w, fmt)
    assert w8.dtype == dtype and scale.dtype == torch.float32 and scale.shape == ()
    assert w8.float().abs().max().item() == torch.finfo(dtype).max  # amax lands on the top value
    back = dequantize(w8, scale, torch.float32)
    err = (back - w).abs()
    normal = w.abs() / scale >= torch.finfo(dtype).smallest_normal
    assert normal.float().mean() > 0.99 and (~normal).sum() >= 512
    assert (err[normal] / w.abs()[normal]).max().item() <= UNIT_ROUNDOFF[fmt]
    # Subnormals: absolute error at most half the subnormal spacing (2**-9 / 2**-16), scaled.
    spacing = torch.finfo(dtype).smallest_normal * 2.0 ** -{"e4m3fn": 3, "e5m2": 2}[fmt]
    assert err[~normal].max().item() <= spacing / 2 * scale.item()


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
@pytest.mark.parametrize("magnitude", [2.0**-24, 2.0**20])
def test_per_tensor_scale_uses_the_range_at_any_magnitude(fmt: str, magnitude: float) -> None:
    torch.manual_seed(1)
    w = torch.randn(256, 256)
    w8, scale = quantize_weight(w, fmt)
    w8_big, scale_big = quantize_weight(w * magnitude, fmt)
    # A power-of-two rescale moves only the scale: same fp8 codes, same relative error.
    assert torch.equal(w8_big.view(torch.uint8), w8.view(torch.uint8))
    assert scale_big.item() == scale.item() * magnitude
    rel = rel_err(dequantize(w8_big, scale_big, torch.float32), w * magnitude)
    assert rel <= UNIT_ROUNDOFF[fmt] / 2
    # Without a scale the same tensor underflows to zero or saturates.
    raw = (w * magnitude).clamp(-fp8.FP8_MAX[fp8.FP8_DTYPES[fmt]], fp8.FP8_MAX[fp8.FP8_DTYPES[fmt]])
    assert rel_err(raw.to(fp8.FP8_DTYPES[fmt]).float(), w * magnitude) > 0.5


def test_zero_tensor_gets_scale_one() -> None:
    w8, scale = quantize_weight(torch.zeros(4, 4))
    assert scale.item() == 1.0 and not w8.float().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_dequantize_equals_the_float32_formula_bit_for_bit(fmt: torch.dtype, dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    w8, scale = quantize_weight(torch.randn(300, 200) * 0.02, fmt)
    assert torch.equal(dequantize(w8, scale, dtype), comfy_dequant(w8, scale, dtype))


def test_dequantize_rejects_per_channel_scales() -> None:
    with pytest.raises(ValueError, match="per-tensor"):
        dequantize(torch.zeros(4, 4, dtype=E4M3), torch.ones(4), torch.float32)


# --- which tensors -----------------------------------------------------------------------------

QUANTISED = [
    "blocks.0.self_attn.q.weight", "blocks.12.self_attn.k.weight", "blocks.3.self_attn.v.weight",
    "blocks.39.self_attn.o.weight", "blocks.0.cross_attn.q.weight", "blocks.0.cross_attn.k.weight",
    "blocks.0.cross_attn.v.weight", "blocks.0.cross_attn.o.weight", "blocks.7.cross_attn.k_img.weight",
    "blocks.7.cross_attn.v_img.weight", "blocks.0.ffn.0.weight", "blocks.29.ffn.2.weight",
    PREFIX + "blocks.5.ffn.0.weight", "diffusion_model.blocks.5.self_attn.o.weight",
]
KEPT = [
    "blocks.0.self_attn.q.bias", "blocks.0.ffn.0.bias", "blocks.0.self_attn.norm_q.weight",
    "blocks.0.cross_attn.norm_k_img.weight", "blocks.0.norm3.weight", "blocks.0.norm3.bias",
    "blocks.0.modulation", "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.weight",
    "time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight", "head.head.weight",
    "head.modulation", "img_emb.proj.1.weight", "img_emb.proj.3.weight", "vace_blocks.0.self_attn.q.weight",
    "blocks.0.self_attn.q.scale_weight", "blocks.0.ffn.1.weight", PREFIX + "head.head.weight", "scaled_fp8",
]


@pytest.mark.parametrize("key", QUANTISED)
def test_block_linear_weights_are_quantised(key: str) -> None:
    assert should_quantize(key, torch.empty(8, 8))
    assert should_quantize(key, (8, 8))  # a shape from a safetensors header is enough


@pytest.mark.parametrize("key", KEPT)
def test_everything_else_stays_in_compute_dtype(key: str) -> None:
    assert not should_quantize(key, torch.empty(8, 8))


def test_only_2d_tensors_are_quantised() -> None:
    assert not should_quantize("blocks.0.self_attn.q.weight", torch.empty(8))
    assert not should_quantize("blocks.0.self_attn.q.weight", (8, 8, 1))


# --- FP8Linear -----------------------------------------------------------------------------

def make_layer(fmt=E4M3, bias=True, k=64, n=48, dtype=torch.bfloat16, seed=3) -> tuple[nn.Linear, FP8Linear]:
    torch.manual_seed(seed)
    ref = nn.Linear(k, n, bias=bias)
    return ref, FP8Linear.from_linear(ref, fmt, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 7, 64), (7, 64), (1, 3, 5, 64)])
def test_upcast_path_equals_linear_with_dequantised_weight(dtype, bias, shape) -> None:
    _, layer = make_layer(bias=bias, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    w = comfy_dequant(layer.weight, layer.scale_weight, dtype)
    expected = F.linear(x, w, None if layer.bias is None else layer.bias.to(dtype))
    out = layer(x)
    assert out.dtype == dtype and out.shape == (*shape[:-1], 48)
    assert torch.equal(out, expected)


def test_cond_and_uncond_batched_or_one_at_a_time_agree_on_upcast_path() -> None:
    _, layer = make_layer(dtype=torch.float32)
    cond, uncond = torch.randn(2, 9, 64).unbind(0)
    batched = layer(torch.stack([cond, uncond]))
    torch.testing.assert_close(batched[0], layer(cond[None])[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched[1], layer(uncond), rtol=1e-6, atol=1e-6)


def test_state_dict_round_trips_with_comfy_names() -> None:
    _, layer = make_layer()
    sd = layer.state_dict()
    assert {k: v.dtype for k, v in sd.items()} == {
        "weight": E4M3, "bias": torch.bfloat16, "scale_weight": torch.float32}
    other = FP8Linear(64, 48)
    assert not other.load_state_dict(sd).missing_keys
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(other(x), layer(x))
    with pytest.raises(RuntimeError, match="bias"):
        FP8Linear(64, 48).load_state_dict({"weight": sd["weight"]})


def test_loading_a_float_weight_quantises_it() -> None:
    ref, layer = make_layer()
    other = FP8Linear(64, 48)
    other.load_state_dict(ref.state_dict())
    assert other.weight.dtype == E4M3
    assert torch.equal(other.weight.view(torch.uint8), layer.weight.view(torch.uint8))
    assert other.scale_weight.item() == layer.scale_weight.item()


def test_to_dtype_converts_the_bias_only() -> None:
    _, layer = make_layer()
    x = torch.randn(4, 64, dtype=torch.float16)
    before = layer(x)
    w8 = layer.weight.clone()
    layer.half()
    assert layer.weight.dtype == E4M3 and layer.scale_weight.dtype == torch.float32
    assert layer.bias.dtype == torch.float16
    assert torch.equal(layer.weight.view(torch.uint8), w8.view(torch.uint8))
    assert torch.equal(layer(x), before)


# --- the _scaled_mm path (runs on CPU too with torch >= 2.13, so it is tested here directly) ----

def scaled_mm_on_cpu() -> bool:
    try:
        one = torch.ones((), dtype=torch.float32)
        torch._scaled_mm(torch.zeros(16, 16, dtype=E4M3), torch.zeros(16, 16, dtype=E4M3).t(),
                         scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


needs_cpu_scaled_mm = pytest.mark.skipif(not scaled_mm_on_cpu(), reason="this torch has no CPU _scaled_mm")


@needs_cpu_scaled_mm
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_scaled_mm_path_matches_upcast_within_activation_rounding(fmt) -> None:
    """Only the activations are rounded further (to e4m3fn, relative error <= 2**-4 each), so
    the output's relative error is bounded by 2**-4."""
    _, layer = make_layer(fmt=fmt, k=128, n=96)
    x = torch.randn(2, 37, 128, dtype=torch.bfloat16)
    fast = scaled_mm_linear(x, layer.weight, layer.scale_weight, layer.bias)
    assert fast.shape == (2, 37, 96) and fast.dtype == torch.bfloat16
    ref = F.linear(x.float(), comfy_dequant(layer.weight, layer.scale_weight, torch.float32), layer.bias.float())
    assert rel_err(fast, ref) <= 2.0**-4
    # One at a time (each with its own amax) is as close as batched.
    for i in range(2):
        assert rel_err(scaled_mm_linear(x[i], layer.weight, layer.scale_weight, layer.bias), ref[i]) <= 2.0**-4


@needs_cpu_scaled_mm
def test_input_quantised_in_row_chunks_equals_one_pass(monkeypatch) -> None:
    """The fp8 input is written chunk by chunk (no whole scaled copy of x): the same bits as
    quantising it in one expression, so the GEMM sees the same operand."""
    _, layer = make_layer(k=64, n=48)
    x = torch.randn(3, 41, 64, dtype=torch.bfloat16)
    whole = scaled_mm_linear(x, layer.weight, layer.scale_weight, layer.bias)
    monkeypatch.setattr(fp8, "QUANTIZE_CHUNK_BYTES", 5 * 64 * 2)  # 5 rows a chunk, a partial last one
    seen = []
    real_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, *args, **kw: seen.append(a.clone()) or real_mm(a, *args, **kw))
    chunked = scaled_mm_linear(x, layer.weight, layer.scale_weight, layer.bias)
    assert torch.equal(chunked, whole)
    inv = (448 / x.abs().max().float()).to(torch.bfloat16)
    one_pass = (x.reshape(-1, 64) * inv).clamp(-448, 448).to(E4M3)
    assert torch.equal(seen[0].view(torch.uint8), one_pass.view(torch.uint8))


@needs_cpu_scaled_mm
def test_scaled_mm_path_with_a_file_input_scale_saturates_outside_its_range() -> None:
    _, layer = make_layer(k=64, n=48)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    amax = x.abs().max().float()
    w = comfy_dequant(layer.weight, layer.scale_weight, torch.float32)
    good = scaled_mm_linear(x, layer.weight, layer.scale_weight, None, amax / 448)
    assert rel_err(good, x.float() @ w.t()) <= 2.0**-4
    # An input scale half as big clamps everything above amax / 2, as the file's producer chose.
    low = scaled_mm_linear(x, layer.weight, layer.scale_weight, None, amax / 896)
    clamped = x.float().clamp(-amax.item() / 2, amax.item() / 2)
    assert rel_err(low, clamped @ w.t()) <= 2.0**-4 < rel_err(low, x.float() @ w.t())


@needs_cpu_scaled_mm
def test_forward_takes_the_fast_path_once_enabled_and_falls_back_on_failure(monkeypatch) -> None:
    _, layer = make_layer(k=64, n=48)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    upcast = layer(x)
    monkeypatch.setattr(fp8, "scaled_mm_supported", lambda device: True)
    layer._use_mm.clear()
    fast = layer(x)
    assert torch.equal(fast, scaled_mm_linear(x, layer.weight, layer.scale_weight, layer.bias))
    assert not torch.equal(fast, upcast)
    assert torch.equal(layer(x.float()), F.linear(x.float(), layer.dequantized_weight(torch.float32),
                                                  layer.bias.float()))  # fp32 activations upcast
    _, odd = make_layer(k=24, n=48)  # 24 is not a multiple of 16: never the fast path
    xo = torch.randn(3, 24, dtype=torch.bfloat16)
    assert torch.equal(odd(xo), F.linear(xo, odd.dequantized_weight(), odd.bias))

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(torch, "_scaled_mm", broken)
    assert torch.equal(layer(x), upcast)
    assert layer._use_mm[x.device] is False


# --- a transformer-block-like module -------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (self.norm_q(self.q(x)), self.k(x), self.v(x)))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int = 64, ffn: int = 160, heads: int = 4) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 4, dim) / dim**0.5)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift1, scale1, shift2, scale2 = self.modulation.to(x.dtype).unbind(1)
        x = x + self.self_attn(self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None])
        return x + self.ffn(self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None])


class TinyDiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(32, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 64))
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Module()
        self.head.head = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.text_embedding(x)
        for block in self.blocks:
            x = block(x)
        return self.head.head(x)


def chain_bound(fmt: str, layers: int) -> float:
    """Relative output error expected from ``layers`` quantised Linears in a chain.

    An element's relative rounding error is at most u (2**-4 e4m3fn, 2**-3 e5m2); spread over
    the binade its RMS is at most u / sqrt(3), and a Linear's relative output error is about
    that RMS. Independent roundings along a chain add in quadrature: sqrt(layers) * u / sqrt(3).
    A statistical bound, not a worst case: residual connections and norms only shrink it.
    """
    return math.sqrt(layers) * UNIT_ROUNDOFF[fmt] / math.sqrt(3)


@pytest.mark.parametrize("fmt", ["e4m3fn", "e5m2"])
def test_quantised_blocks_match_the_float_reference(fmt: str) -> None:
    """Longest chain of quantised Linears: v, o, ffn.0, ffn.2 per block, two blocks -> 8:
    bound 0.102 (e4m3fn), 0.204 (e5m2). Measured over seeds 4-8: <= 0.058 / 0.119."""
    torch.manual_seed(4)
    model = TinyDiT()
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        ref = model(x)
        before, after = quantize_module(model, fmt, torch.float32)
        out = model(x)
    fp8_layers = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) == 12 and all(n.startswith("blocks.") for n in fp8_layers)
    assert type(model.head.head) is nn.Linear and type(model.text_embedding[0]) is nn.Linear
    assert model.blocks[0].modulation.dtype == torch.float32
    # Each quantised weight drops from 4 bytes to 1 per element, plus a 4-byte scale per layer.
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, FP8Linear))
    assert before - after == 3 * weights - 4 * len(fp8_layers)
    assert rel_err(out, ref) <= chain_bound(fmt, 8)  # seed 4: 0.034 (e4m3fn), 0.104 (e5m2)


def test_tiny_wan_model_quantised_and_reloaded_from_a_comfy_file(tmp_path) -> None:
    """The real DiT: the predicate picks exactly the block Linears; the quantised model is
    within the chain bound (12 Linears deep: v, o, cross v, cross o, ffn.0, ffn.2 per block,
    0.125 for e4m3fn; measured 0.014-0.021 over seeds 0-4), and its state dict, written as a
    Comfy-Org scaled file, loads into a fresh model that gives the same output bit for bit."""
    from wanfit.wan.model import WanConfig, WanModel
    cfg = WanConfig("i2v", in_dim=36, clip=True, clip_dim=40, dim=64, ffn_dim=128, num_heads=4, num_layers=2,
                    text_dim=32, freq_dim=32, text_len=16)
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(2, 16, 3, 8, 12, generator=g), t=torch.tensor([937.0, 215.0]),
                  context=torch.randn(2, 7, 32, generator=g), y=torch.randn(2, 20, 3, 8, 12, generator=g),
                  clip_fea=torch.randn(2, 257, 40, generator=g))
    with torch.no_grad():
        ref = model(**inputs)
        quantize_module(model, "e4m3fn", torch.float32)
        out = model(**inputs)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, FP8Linear))
    per_block = ["cross_attn.k", "cross_attn.k_img", "cross_attn.o", "cross_attn.q", "cross_attn.v",
                 "cross_attn.v_img", "ffn.0", "ffn.2", "self_attn.k", "self_attn.o", "self_attn.q", "self_attn.v"]
    assert names == [f"blocks.{i}.{n}" for i in range(2) for n in per_block]
    assert {n for n, p in model.named_parameters() if p.dtype != torch.float32} == {f"{n}.weight" for n in names}
    assert rel_err(out, ref) <= chain_bound("e4m3fn", 12)

    path = tmp_path / "wan_fp8_scaled.safetensors"
    sd = {PREFIX + k: v for k, v in model.state_dict().items()}
    save_file({**sd, PREFIX + "scaled_fp8": torch.empty(0, dtype=E4M3)}, str(path))
    fresh = WanModel(cfg).eval()
    load_scaled(fresh, load_file(str(path)), torch.float32)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs), out)


# --- scaled checkpoints as they are in the wild --------------------------------------------

def scaled_state_dict(model: nn.Module, fmt: torch.dtype, flavour: str, input_scale: bool = False) -> dict:
    """An fp8 state dict as the producers write it: block Linears and text_embedding in fp8."""
    sd = {}
    for key, value in model.state_dict().items():
        if key.endswith(".weight") and value.ndim == 2 and "head" not in key:
            w8, scale = quantize_weight(value, fmt)
            sd[key] = w8
            layer = key[: -len(".weight")]
            if flavour == "comfy":
                sd[f"{layer}.scale_weight"] = scale
            elif flavour == "kijai":  # assumed: [1]-shaped, as WanVideoWrapper squeezes it
                sd[f"{layer}.scale_weight"] = scale.reshape(1)
            else:  # plain: the scale is folded into the stored values, clipped to the range
                sd[key] = value.clamp(-fp8.FP8_MAX[fmt], fp8.FP8_MAX[fmt]).to(fmt)
        else:
            sd[key] = value.to(torch.bfloat16)
    if input_scale:
        sd["blocks.0.ffn.2.scale_input"] = torch.tensor(1000.0)
    if flavour == "comfy":
        sd = {PREFIX + k: v for k, v in sd.items()}
        sd[PREFIX + "scaled_fp8"] = torch.empty(0, dtype=fmt)
    return sd


def dequantised_reference(sd: dict, dtype: torch.dtype) -> TinyDiT:
    """A plain TinyDiT holding every fp8 weight dequantised with the independent formula."""
    plain = {}
    for key, value in sd.items():
        key = key.removeprefix(PREFIX)
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        if value.dtype in (E4M3, E5M2):
            scale = sd.get(PREFIX + key[:-7] + ".scale_weight", sd.get(key[:-7] + ".scale_weight", torch.ones(())))
            value = comfy_dequant(value, scale, dtype)
        plain[key] = value
    model = TinyDiT().to(dtype)
    model.load_state_dict(plain)
    return model


@pytest.mark.parametrize("flavour,fmt", [("comfy", E4M3), ("comfy", E5M2), ("kijai", E4M3), ("plain", E4M3)])
def test_scaled_file_loads_and_equals_its_dequantised_reference(tmp_path, flavour, fmt) -> None:
    torch.manual_seed(5)
    path = tmp_path / f"tiny_{flavour}.safetensors"
    save_file(scaled_state_dict(TinyDiT(), fmt, flavour, input_scale=flavour == "comfy"), str(path))
    sd = load_file(str(path))
    model = TinyDiT().to(torch.bfloat16)
    result = load_scaled(model, sd, torch.bfloat16)
    assert not result.missing_keys and not result.unexpected_keys
    fp8_layers = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    assert len(fp8_layers) == 12 and all(m.weight.dtype == fmt for m in fp8_layers.values())
    # text_embedding is fp8 in the file but stays in the compute dtype here.
    assert model.text_embedding[0].weight.dtype == torch.bfloat16
    assert (model.blocks[0].ffn[2].scale_input is not None) == (flavour == "comfy")
    x = torch.randn(2, 10, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), dequantised_reference(sd, torch.bfloat16)(x))
    # The loaded layers give their file entries back bit for bit, under the file's names.
    stripped = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    state = model.state_dict()
    for name in fp8_layers:
        assert torch.equal(state[f"{name}.weight"].view(torch.uint8), stripped[f"{name}.weight"].view(torch.uint8))
        expected = stripped.get(f"{name}.scale_weight", torch.ones(()))
        assert state[f"{name}.scale_weight"].item() == expected.item()


def test_loading_a_float_file_quantises_only_when_asked() -> None:
    torch.manual_seed(6)
    sd = TinyDiT().state_dict()
    kept = TinyDiT()
    load_scaled(kept, sd, torch.float32)
    assert not any(isinstance(m, FP8Linear) for m in kept.modules())
    quantised = TinyDiT()
    load_scaled(quantised, sd, torch.float32, fmt="e5m2")
    assert quantised.blocks[1].self_attn.o.weight.dtype == E5M2
    assert type(quantised.text_embedding[0]) is nn.Linear


@pytest.mark.parametrize("flavour,fmt,expected", [
    ("comfy", E4M3, Fp8Format(E4M3, True, "comfy", True)),
    ("comfy", E5M2, Fp8Format(E5M2, True, "comfy", True)),
    ("kijai", E4M3, Fp8Format(E4M3, True, "kijai", False)),
    ("plain", E5M2, Fp8Format(E5M2, False, "plain", False)),
])
def test_detect_fp8_format(flavour, fmt, expected) -> None:
    torch.manual_seed(7)
    sd = scaled_state_dict(TinyDiT(), fmt, flavour, input_scale=flavour == "comfy")
    found = detect_fp8_format(sd.keys(), (v.dtype for v in sd.values()))
    assert found == expected
    assert found.name == {E4M3: "e4m3fn", E5M2: "e5m2"}[fmt]


def test_detect_fp8_format_trusts_the_marker_and_ignores_float_files() -> None:
    sd = TinyDiT().state_dict()
    assert detect_fp8_format(sd.keys(), (v.dtype for v in sd.values())) is None
    assert detect_fp8_format([], []) is None
    keys = ["scaled_fp8", "blocks.0.ffn.0.weight", "blocks.0.ffn.0.scale_weight"]
    assert detect_fp8_format(keys, [E5M2, E4M3, torch.float32]).dtype == E5M2


def test_fp8_format_names() -> None:
    assert fp8.fp8_dtype("e4m3fn") is E4M3 and fp8.fp8_dtype("fp8_e5m2") is E5M2 and fp8.fp8_dtype(E5M2) is E5M2
    with pytest.raises(ValueError, match="unknown fp8 format"):
        fp8.fp8_dtype("int8")


# --- GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@cuda_fp8
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_scaled_mm_on_cuda_matches_the_upcast_path(fmt) -> None:
    torch.manual_seed(8)
    ref = nn.Linear(512, 1024).cuda()
    layer = FP8Linear.from_linear(ref, fmt, torch.bfloat16)
    x = torch.randn(2, 333, 512, device="cuda", dtype=torch.bfloat16)
    upcast = F.linear(x, layer.dequantized_weight(torch.bfloat16), layer.bias)
    fast = layer(x)
    assert layer._use_mm[x.device] is True
    assert rel_err(fast, upcast) <= 2.0**-4
    for i in range(2):  # cond / uncond one at a time
        assert rel_err(layer(x[i]), upcast[i]) <= 2.0**-4
    w8, scale = quantize_weight(torch.randn(300, 200, device="cuda"), fmt)
    assert torch.equal(dequantize(w8, scale, torch.bfloat16), comfy_dequant(w8, scale, torch.bfloat16))
