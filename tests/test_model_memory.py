"""The DiT's memory-lean forms equal the plain formulas they replace, bit for bit.

wan/model.py writes RoPE into its output's lanes, scales RMSNorm's float copy in place, runs
GELU over the FFN's hidden state and lets each sub-layer's temporaries go as soon as they
are used (see docs/BENCHMARKS.md for what that saves). The plain forms are restated here as
the reference: the official code's expressions.
"""
import pytest
import torch
import torch.nn.functional as F

from wanfit.optim import planner
from wanfit.wan.model import PRESETS, GELUInPlace, WanRMSNorm, _modulate, rope_apply, rope_freqs


def _rope_reference(x, freqs):
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs.unbind(-1)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_written_into_lanes_equals_the_stacked_formula(dtype):
    grid, heads, head_dim = (3, 4, 6), 2, 24
    x = torch.randn(2, 72, heads, head_dim).to(dtype)
    freqs = rope_freqs(grid, head_dim)
    out = rope_apply(x, freqs)
    assert out.dtype == torch.float32 and torch.equal(out, _rope_reference(x, freqs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_in_place_equals_the_formula_and_leaves_its_input(dtype):
    norm = WanRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    norm = norm.to(dtype)
    x = torch.randn(3, 10, 64).to(dtype)
    kept = x.clone()
    y = x.float()
    reference = (y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + 1e-6)).type_as(x) * norm.weight
    assert torch.equal(norm(x), reference)
    assert torch.equal(x, kept)  # a float32 input is its own float copy: never written


def test_gelu_in_place_without_grad_and_out_of_place_with_it():
    x = torch.randn(5, 33)
    reference = F.gelu(x, approximate="tanh")
    gelu = GELUInPlace(approximate="tanh")
    with torch.no_grad():
        h = x.clone()
        out = gelu(h)
    assert torch.equal(out, reference) and out.data_ptr() == h.data_ptr()
    w = x.clone().requires_grad_()
    out = gelu(w)
    assert torch.equal(out, reference) and out.data_ptr() != w.data_ptr()
    out.sum().backward()  # autograd still works when it is recording


def test_modulate_equals_the_float_formula():
    x = torch.randn(2, 7, 16).to(torch.bfloat16)
    shift, scale = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    assert torch.equal(_modulate(x, shift, scale, None), x.float() * (1 + scale) + shift)


def test_the_planner_sees_what_the_lean_forms_save(monkeypatch):
    """The A14B block at 81 frames 832x480, cond and uncond batched, fp8 matmul: traced with
    the lean forms, then with the plain ones patched back in. The trace follows the code, so
    the difference shows with no planner edit: over a quarter of a float32 residual stream (the
    other savings are in the block's statement structure, which cannot be patched back)."""
    from wanfit.optim import fp8
    from wanfit.wan import model

    args = (PRESETS["Wan2.2 I2V-A14B expert"], (21, 30, 52), 2, torch.bfloat16, "fp8_e4m3fn_scaled", "sdpa",
            "cuda", True)
    lean = planner.dit_activations(*args)
    monkeypatch.setattr(model, "rope_apply", _rope_reference)
    monkeypatch.setattr(model.GELUInPlace, "forward", torch.nn.GELU.forward)
    monkeypatch.setattr(fp8, "QUANTIZE_CHUNK_BYTES", 2**40)  # the whole scaled input at once
    planner.dit_activations.cache_clear()
    try:
        plain = planner.dit_activations(*args)
    finally:
        planner.dit_activations.cache_clear()
    stream = 2 * 32760 * 5120 * 4
    assert plain.block - lean.block > stream // 4
    assert lean.peak < plain.peak
