"""Inductor on the CPU (a C++ build, tens of seconds): compiled flex_attention against masked
SDPA, Inductor-compiled blocks against eager ones with the warm-up reported, and the memory
planner against the allocator's peak with sparse attention on. One tiny model and one token
grid for the whole module, so each kernel variant compiles once."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from wanfit.nodes.memory import sparse_hook
from wanfit.optim import compile as compiled_blocks
from wanfit.optim import planner
from wanfit.optim.compile import CompiledRun, CompileSettings, graphs_compiled
from wanfit.optim.hostmem import allocation_peak
from wanfit.optim.sparse import SparseAttention, SparseSettings, dense_mask
from wanfit.wan.denoise import DiTCall
from wanfit.wan.model import WanConfig, WanModel

pytestmark = pytest.mark.slow

CONFIG = WanConfig("t2v", dim=256, ffn_dim=704, num_heads=2, num_layers=2, text_len=64, text_dim=64, freq_dim=64)
GRID = (16, 8, 8)  # 1,024 tokens: 8 x 8 blocks of 128, two frames a block
# whole blocks (a block with itself), partial ones (its neighbours) and skipped ones (the rest)
WINDOW = SparseSettings("window", window=(1, 7, 7), dense_blocks=1)
RADIAL = SparseSettings("radial", decay=0.05, dense_blocks=1)


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the CPU kernels' scratch depends on it (as in test_planner)
    torch.manual_seed(0)
    model = WanModel(CONFIG).eval().requires_grad_(False)
    inputs = planner.dit_inputs(CONFIG, GRID, 1, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for key in ("x", "context"):
        inputs[key] = torch.randn(inputs[key].shape, generator=gen)
    inputs["host"] = model.host_inputs(torch.full((1,), 700.0), 1, GRID)
    yield model, inputs
    compiled_blocks.detach(model)
    torch.set_num_threads(threads)


def _forward(model, inputs, run_blocks=None):
    with torch.inference_mode():
        if run_blocks is None:
            return model(**inputs)
        return model(**inputs, run_blocks=lambda state: run_blocks(state, DiTCall(0, 0.7)))


@pytest.mark.parametrize("settings", [WINDOW, RADIAL], ids=["window", "radial"])
def test_compiled_flex_equals_masked_sdpa(settings):
    op = SparseAttention(settings).op(GRID, "cpu")
    assert op.mask.partial and op.mask.full
    if settings is WINDOW:
        assert op.mask.keep_fraction < 0.4
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1024, 2, 128, generator=gen) for _ in range(3))
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=dense_mask(settings, GRID)).transpose(1, 2)
    with torch.inference_mode():
        torch.testing.assert_close(op(q, k, v), want, rtol=1e-5, atol=1e-5)


def test_planner_within_ten_percent_of_the_allocator_peak_with_sparse_on(setup):
    model, inputs = setup
    run = SparseAttention(WINDOW).wrap(lambda state, call: model.run_blocks(state), model.blocks)
    _forward(model, inputs, run)  # compiles flex first: its build allocates too
    measured = allocation_peak(lambda: _forward(model, inputs, run))
    handle = type("Handle", (), {"sparse": WINDOW})()
    predicted = planner.dit_activations(CONFIG, GRID, 1, torch.float32, "fp32", "sdpa", device_type="cpu",
                                        hook=sparse_hook(handle, "cpu"))
    assert predicted.peak == pytest.approx(measured, rel=0.10)


def test_inductor_blocks_equal_eager_and_report_the_warm_up(setup):
    model, inputs = setup
    sparse_run = lambda m: SparseAttention(WINDOW).wrap(lambda state, call: m.run_blocks(state), m.blocks)  # noqa: E731
    eager = _forward(model, inputs, sparse_run(model))
    run = CompiledRun(model, CompileSettings("inductor"))
    compiled = _forward(model, inputs, run.wrap(sparse_run(model)))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert run.fallback is None and run.graphs == 2 and run.warmup_s > 0  # the dense first block, the sparse second
    warm = graphs_compiled()
    other = WanModel(dataclasses.replace(CONFIG)).eval().requires_grad_(False)  # another expert, same shapes
    again = CompiledRun(other, CompileSettings("inductor"))
    _forward(other, inputs, again.wrap(sparse_run(other)))
    assert graphs_compiled() == warm and again.warmup_s == 0 and again.calls == 1
    compiled_blocks.detach(other)
