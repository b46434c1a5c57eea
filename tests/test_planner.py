"""Memory planner: exact weight bytes, the activation replay against measured peaks, plan choices.

Measured peaks on the CPU come from the allocator's profiler events (``hostmem.allocation_peak``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pack import REPO_ROOT, load_script
from wanfit.optim import fp8
from wanfit.optim.hostmem import allocation_peak
from wanfit.optim.offload import BlockSwapper, RecordingBackend
from wanfit.optim.planner import (GIB, PHASES, PlanError, attention_kernel, auto_budget, dit_activations,
                                  dit_inputs, dit_weights, latent_shape, plan_image, plan_memory, token_count,
                                  trace_forward)
from wanfit.wan.model import PRESETS, WanAttentionBlock, WanConfig, WanModel

A14B = "Wan2.2 I2V-A14B expert"
TINY = dict(dim=256, ffn_dim=704, num_heads=2, num_layers=2, text_len=64, text_dim=64, freq_dim=64)


def card(gib: float, **kw):
    return plan_memory(A14B, width=832, height=480, budget="auto", total=int(gib * GIB), host_ram=64 * GIB, **kw)


# ----------------------------------------------------------------------------- sizes and weights

def test_latent_and_tokens():
    assert latent_shape(PRESETS[A14B], 81, 832, 480) == (21, 60, 104)
    assert token_count(PRESETS[A14B], 81, 832, 480) == 32760
    assert token_count(PRESETS["Wan2.2 TI2V-5B"], 121, 1280, 704) == 31 * 22 * 40  # x16 VAE
    with pytest.raises(ValueError, match="4n\\+1"):
        latent_shape(PRESETS[A14B], 80, 832, 480)
    with pytest.raises(ValueError, match="multiples of 16"):
        latent_shape(PRESETS[A14B], 81, 840, 480)


def test_block_bytes_of_a_14b_block():
    # Independent count: 10 d x d Linears with bias (self + cross q, k, v, o), the FFN, norm3
    # (weight + bias), four RMSNorm weights, the modulation.
    d, f = 5120, 13824
    linear_w, linear_b = 8 * d * d + 2 * d * f, 8 * d + f + d
    small = linear_b + 2 * d + 4 * d + 6 * d
    assert dit_weights(PRESETS[A14B], "bf16").block_params == 2 * (linear_w + small)
    fp8_bytes = linear_w + 2 * small + 10 * 4  # fp8 weights, bf16 rest, a float32 scale per Linear
    assert dit_weights(PRESETS[A14B], "fp8_e4m3fn_scaled").block_params == fp8_bytes


@pytest.mark.parametrize("weights", ["bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"])
def test_block_bytes_match_a_real_model_and_the_swapper(weights):
    cfg = WanConfig("i2v", in_dim=36, **dict(TINY, dim=128, ffn_dim=320, num_layers=4))
    planned = dit_weights(cfg, weights)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(weights, torch.bfloat16)
    model = WanModel(cfg).to(dtype)
    if weights.startswith("fp8"):
        fp8.quantize_module(model, weights.removeprefix("fp8_"), dtype)
    nbytes = lambda m: sum(t.nbytes for t in (*m.parameters(), *m.buffers()))  # noqa: E731
    assert planned.block_params == nbytes(model.blocks[0])
    assert planned.other == nbytes(model) - sum(nbytes(b) for b in model.blocks)
    with BlockSwapper(model.blocks, RecordingBackend(), resident=1, prefetch=1) as swapper:
        stats = swapper.telemetry()
        assert stats.block_bytes == planned.block
        assert stats.device_bytes == (1 + stats.slots) * planned.block
        assert stats.pinned_bytes == 3 * planned.block


# ----------------------------------------------------------------------------- activations

def _real_inputs(model: WanModel, batch: int, grid: tuple[int, int, int], dtype: torch.dtype) -> dict:
    """The planner's input layout (``dit_inputs``) filled with values for a real CPU forward; the
    host inputs computed as a sampling step computes them (TI2V: first frame at timestep 0)."""
    cfg = model.config
    inputs = dit_inputs(cfg, grid, batch, dtype)
    gen = torch.Generator().manual_seed(0)
    for key in ("x", "context", "clip_fea", "y"):
        if inputs[key] is not None:
            inputs[key] = torch.randn(inputs[key].shape, generator=gen).to(inputs[key].dtype)
    t = torch.full((batch,), 700.0)
    if cfg.model_type == "ti2v":
        t = torch.full((batch, math.prod(grid)), 700.0)
        t[:, : grid[1] * grid[2]] = 0
    inputs["host"] = model.host_inputs(t, batch, grid)
    assert inputs["host"].runs == dit_inputs(cfg, grid, batch, dtype)["host"].runs
    return inputs


CASES = [  # (config, compute dtype, weights, batch, token grid, attention)
    (WanConfig("i2v", in_dim=36, **TINY), torch.bfloat16, "bf16", 2, (2, 12, 16), "sdpa"),
    (WanConfig("i2v", in_dim=36, **TINY), torch.bfloat16, "fp8_e4m3fn", 1, (3, 8, 16), "sdpa"),
    (WanConfig("t2v", **dict(TINY, dim=384, num_heads=3, ffn_dim=1024)), torch.float32, "fp32", 1, (2, 16, 32), "sdpa"),
    (WanConfig("ti2v", in_dim=48, out_dim=48, **TINY), torch.bfloat16, "bf16", 1, (2, 16, 16), "sdpa"),
    (WanConfig("i2v", in_dim=36, clip=True, clip_dim=64, **TINY), torch.bfloat16, "bf16", 2, (2, 8, 16), "sdpa"),
    (WanConfig("t2v", **TINY), torch.bfloat16, "bf16", 2, (2, 8, 16), "math"),
    # weights big next to the activations: the fp8 upcast copy and time projection dominate
    (WanConfig("t2v", **dict(TINY, dim=512, ffn_dim=2048, num_heads=4)), torch.bfloat16, "fp8_e4m3fn", 1,
     (1, 8, 8), "sdpa"),
]
IDS = ["i2v-bf16-B2", "i2v-fp8-B1", "t2v-fp32", "ti2v-per-token-t", "i2v-clip-B2", "sdpa-math", "fp8-weight-heavy"]


def _model(cfg: WanConfig, dtype: torch.dtype, weights: str) -> WanModel:
    torch.manual_seed(0)
    model = WanModel(cfg).to(dtype).eval().requires_grad_(False)
    if weights.startswith("fp8"):
        fp8.quantize_module(model, "e4m3fn", dtype)
    return model


def _kernel(attention: str):
    return sdpa_kernel(SDPBackend.MATH) if attention == "math" else contextlib.nullcontext()


@pytest.fixture
def two_threads():
    """CPU kernels keep scratch buffers per thread: fix their number, as on CI (2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cfg, dtype, weights, batch, grid, attention", CASES, ids=IDS)
def test_fake_trace_equals_the_same_count_over_a_real_cpu_forward(cfg, dtype, weights, batch, grid, attention):
    """(a) The planner traces the model's own forward on meta tensors; the same counter run
    over a real CPU forward sees the same storages, phase by phase, byte for byte. This
    counts op outputs only, so it holds whatever kernels the CPU has."""
    model = _model(cfg, dtype, weights)
    inputs = _real_inputs(model, batch, grid, dtype)
    with torch.no_grad(), _kernel(attention):
        real = trace_forward(model, inputs)
    predicted = dit_activations(cfg, grid, batch, dtype, weights, attention, device_type="cpu")
    assert [p.name for p in predicted.phases] == list(PHASES) == list(real)
    for phase in predicted.phases:
        assert (phase.start, phase.outputs_peak) == (real[phase.name].start, real[phase.name].outputs_peak), phase.name
    assert predicted.tokens == math.prod(grid)


def _kernel_path() -> str:
    """What the CPU runs bf16 matmuls and SDPA with (recorded in the test report)."""
    amx = getattr(torch._C._cpu, "_is_amx_tile_supported", lambda: False)()
    return (f"capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 "
            f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, AMX {amx}, threads {torch.get_num_threads()}")


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("cfg, dtype, weights, batch, grid, attention", CASES, ids=IDS)
def test_prediction_with_kernel_terms_matches_the_cpu_allocator(cfg, dtype, weights, batch, grid, attention,
                                                                  record_property):
    """(b) The trace plus its CPU kernel term (the scratch of matmul / SDPA kernels, measured
    per op where they run) against the allocator's peak of the real forward: within 10 %,
    whichever kernels this CPU picks (the report records which)."""
    record_property("cpu_kernels", _kernel_path())
    model = _model(cfg, dtype, weights)
    inputs = _real_inputs(model, batch, grid, dtype)
    with torch.no_grad(), _kernel(attention):
        forward = allocation_peak(lambda: model(**inputs))
        state = model.embed(**{k: v for k, v in inputs.items()})
        state.x = model.blocks[0](state.x, **state.block_kwargs)
        block = allocation_peak(lambda: model.blocks[1](state.x, **state.block_kwargs))
    predicted = dit_activations(cfg, grid, batch, dtype, weights, attention, device_type="cpu")
    assert predicted.block == pytest.approx(block, rel=0.10), _kernel_path()
    assert predicted.peak == pytest.approx(forward, rel=0.10), _kernel_path()


def test_an_extra_temporary_in_a_block_moves_the_prediction_by_its_size(monkeypatch):
    """(c) Mutation: one more [B, L, dim] float32 tensor alive through every block, patched
    into wan/model.py's block, moves the planned block peak by exactly its size with no
    planner edit. A planner that stopped tracing the model's code would not see it."""
    cfg, grid, batch = PRESETS[A14B], (21, 30, 52), 2
    args = (cfg, grid, batch, torch.bfloat16, "fp8_e4m3fn_scaled", "sdpa", "cuda", True)
    before = dit_activations(*args)
    forward = WanAttentionBlock.forward

    def with_extra(self, x, *a, **k):
        extra = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # noqa: F841 - kept alive
        return forward(self, x, *a, **k)

    monkeypatch.setattr(WanAttentionBlock, "forward", with_extra)
    dit_activations.cache_clear()
    try:
        after = dit_activations(*args)
    finally:
        dit_activations.cache_clear()
    extra = batch * math.prod(grid) * cfg.dim * 4
    assert after.block - before.block == extra
    assert after.peak - before.peak == extra and after.phase == before.phase == "a block"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("weights, batch", [("bf16", 2), ("fp8_e4m3fn", 1)])
def test_activation_model_matches_cuda_max_memory_allocated(weights, batch):
    """bench/gpu_check.py's ``planner`` part at a small size (it runs two A14B-sized ones)."""
    gpu_check = load_script(REPO_ROOT / "bench" / "gpu_check.py", "bench_gpu_check")
    cfg = WanConfig("i2v", in_dim=36, **dict(TINY, dim=512, num_heads=4, ffn_dim=1408))
    r = gpu_check.forward_peak(cfg, (8, 30, 52), batch, weights, "cuda")
    assert r["predicted_bytes"] == pytest.approx(r["measured_bytes"], rel=0.10)


def test_attention_kernels():
    assert attention_kernel("sdpa", "cuda", torch.bfloat16, 128) == "flash"
    assert attention_kernel("sdpa", "cuda", torch.bfloat16, 100) == "math"  # no fused kernel aligned
    assert attention_kernel("sdpa", "cuda", torch.float32, 100) == "flash"  # memory-efficient
    assert attention_kernel("sdpa", "mps", torch.bfloat16, 128) == "math"
    assert attention_kernel("sageattention", "cuda", torch.bfloat16, 128) == "sage"
    cfg, grid = PRESETS[A14B], (21, 30, 52)
    flash = dit_activations(cfg, grid, 1, torch.bfloat16, "bf16", "sdpa", "cuda")
    math_ = dit_activations(cfg, grid, 1, torch.bfloat16, "bf16", "math", "cuda")
    scores = 40 * 32760**2 * 4  # one head-batched float32 L x L matrix
    assert math_.peak - flash.peak > 2 * scores
    # O(L) kernels: activations grow linearly with the tokens
    half = dit_activations(cfg, (11, 30, 52), 1, torch.bfloat16, "bf16", "sdpa", "cuda")
    assert flash.peak / half.peak == pytest.approx(21 / 11, rel=0.02)


# ----------------------------------------------------------------------------- plans

@pytest.mark.parametrize("frames", [61, 81])
def test_32gb_card_keeps_every_fp8_block_resident(frames):
    plan = card(32, frames=frames, weights="fp8_e4m3fn_scaled")
    assert (plan.swapped, plan.resident, plan.batch) == (0, 40, 2)
    assert plan.sampling_vram <= plan.budget - plan.margin


def test_plan_choices_are_monotone_in_the_budget():
    previous = None
    for gib in [40, 32, 28, 24, 20, 16, 14, 12, 10, 8, 7, 6.8]:
        plan = card(gib, frames=81, weights="fp8_e4m3fn_scaled")
        assert plan.sampling_vram + plan.margin <= plan.budget
        if previous is not None:
            assert plan.swapped >= previous.swapped and plan.resident <= previous.resident
        previous = plan
    assert previous.swapped > 30  # the small cards do swap


def test_sequential_cfg_only_when_it_keeps_more_blocks_resident():
    plan = card(32, frames=81, weights="bf16")  # 26.6 GiB of weights: batched CFG would swap more
    batched = card(32, frames=81, weights="bf16", cfg_batch=2)
    assert (plan.batch, plan.passes) == (1, 2) and plan.swapped < batched.swapped
    single = card(32, frames=81, weights="bf16", guidance=False)
    assert (single.batch, single.passes) == (1, 1)


def test_too_small_budget_names_the_minimum_that_works():
    with pytest.raises(PlanError) as err:
        plan_memory(A14B, frames=81, width=832, height=480, budget=3 * GIB, host_ram=64 * GIB)
    minimum = err.value.min_budget
    assert f"{math.ceil(minimum / GIB * 10) / 10:.1f} GiB" in str(err.value)
    for knob in ("frames", "resolution", "fp8", "context window"):
        assert knob in str(err.value)
    plan = plan_memory(A14B, frames=81, width=832, height=480, budget=minimum, host_ram=64 * GIB)
    assert (plan.swapped, plan.prefetch, plan.slots) == (40, 0, 1)
    with pytest.raises(PlanError):
        plan_memory(A14B, frames=81, width=832, height=480, budget=minimum - 1, host_ram=64 * GIB)


def test_context_window_and_fewer_frames_need_less():
    full = card(12, frames=121, weights="fp8_e4m3fn_scaled")
    window = card(12, frames=121, weights="fp8_e4m3fn_scaled", context_frames=81)
    assert window.window_tokens == 32760 < full.window_tokens == full.tokens
    assert window.activations.peak < full.activations.peak and window.swapped <= full.swapped


def test_host_ram_holds_one_experts_swapped_blocks():
    plan = card(12, frames=81, weights="fp8_e4m3fn_scaled")
    assert plan.experts == 2 and plan.swapped > 0
    assert plan.pinned_bytes == plan.swapped * plan.dit.block
    assert plan.pinned_bytes <= plan.peak_host < 2 * plan.pinned_bytes  # not both experts
    assert plan.encoders[0].device == "cpu"  # bf16 T5 (10.6 GiB) does not fit 10.5 GiB
    tight = plan_memory(A14B, frames=81, width=832, height=480, budget=plan.budget, host_ram=2 * GIB)
    assert any("host RAM" in w for w in tight.warnings)


def test_auto_budget_from_a_total():
    assert auto_budget(reserve=GIB, total=8 * GIB) == 7 * GIB
    plan = card(24, frames=61, weights="fp8_e4m3fn_scaled", reserve=2 * GIB)
    assert (plan.budget, plan.reserve) == (22 * GIB, 2 * GIB)


def test_explain_mentions_the_numbers():
    plan = card(16, frames=81, weights="fp8_e4m3fn_scaled")
    text = plan.explain()
    for needle in ("81 frames", "832×480", "32,760 tokens", "40 blocks", f"{plan.dit.block / GIB:.2f} GiB",
                   f"{plan.activations.peak / GIB:.1f} GiB", f"{plan.resident} blocks stay resident",
                   f"{plan.swapped} swap", f"{plan.budget / GIB:.1f} GiB", "T5", "VAE", "idle one stays on disk"):
        assert needle in text, needle
    assert "nothing swaps" in card(32, frames=61, weights="fp8_e4m3fn_scaled").explain()


def test_plan_image_is_a_labelled_bar_chart():
    plan = card(16, frames=81, weights="fp8_e4m3fn_scaled")
    image = plan_image(plan)
    assert image.shape[0] == 1 and image.shape[3] == 3 and image.shape[2] == 960 and image.shape[1] > 150
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    colours = {tuple(p) for p in (image[0].reshape(-1, 3) * 255).round().int().tolist()}
    assert len(colours) > 20  # bars, legend, text: not blank
    bar_row = image[0, 34 + 17]  # the middle of the sampling bar
    assert (bar_row[110:] < 0.99).any(dim=-1).float().mean() > 0.9
    other = plan_image(dataclasses.replace(plan, resident=40, swapped=0, slots=0))
    assert not torch.equal(image, other)
