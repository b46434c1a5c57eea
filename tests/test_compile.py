"""Compiled blocks (optim/compile.py): one compiled block forward for every block, both experts
and later jobs, with no recompile after warm-up, counted with Dynamo's own counters; a failed
compile falls back to eager blocks with one warning.

These run Dynamo with the aot_eager backend (graphs captured and functionalised, no C++ build:
recompiles are Dynamo's decisions, whatever backend runs the graphs). The Inductor build is in
tests/test_compile_slow.py."""
from __future__ import annotations

import logging

import pytest
import torch

import factory
from wanfit.optim import compile as compiled_blocks
from wanfit.optim import lora
from wanfit.optim.compile import CompiledRun, CompileSettings, graphs_compiled
from wanfit.optim.engine import SwapSettings, prepare_dit
from wanfit.optim.offload import RecordingBackend
from wanfit.optim.sparse import SparseAttention, SparseSettings
from wanfit.optim.step_cache import MagCache, StepCache
from wanfit.wan.checkpoint import open_checkpoint
from wanfit.wan.denoise import Conditioning, make_denoiser
from wanfit.wan.sampling import sample, seeded_noise
from wanfit.wan.schedulers import flow_sigmas

pytestmark = pytest.mark.usefixtures("eager_flex")

AOT = CompileSettings("aot_eager")
HIGH, LOW = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    written = factory.write_models(root, [HIGH, LOW])
    factory.write_lora(root / "lora.safetensors", "lightx2v")
    ckpts = [open_checkpoint(written[name]) for name in (HIGH, LOW)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    prepared = []
    for ckpt in ckpts:
        applied = lora.AppliedLora(lora.open_lora(root / "lora.safetensors", ckpt.shapes), 1.0)
        prepared.append(prepare_dit(ckpt, RecordingBackend(lazy=True), SwapSettings(1, 1), dtype=torch.float32,
                                    loras=[(applied, "unmerged")]))
    yield prepared, root / "lora.safetensors"
    for p in prepared:
        compiled_blocks.detach(p.model)
        p.close()
    torch.set_num_threads(before)


SHAPE = (1, 16, 3, 4, 4)
_GEN = torch.Generator().manual_seed(0)
COND = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=_GEN), torch.randn(1, 20, 3, 4, 4, generator=_GEN))
NEG = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=_GEN), COND.y)


def _job(prepared, batch_cfg: bool, sparse_on: bool = True, compiled: bool = True, skip: bool = True,
         passes: tuple[int, ...] = (0, 1)):
    """A two-pass 4-step job: the high-noise expert for steps 0-1, the low-noise one for 2-3, a
    MagCache that skips (short schedules allowed), sparse attention with its first block dense."""
    policy = MagCache(((0.99, 0.93),) * 4, threshold=0.1 if skip else 0.0, skip_limit=1, retention=0.0,
                      rule="t2v_experts")
    cache = StepCache(policy, 4, split=2)
    sigmas, noise = flow_sigmas(4, 5.0), seeded_noise(1, SHAPE)
    runs = []
    latent, state = torch.zeros(SHAPE), None
    for which, (start, end) in enumerate(((0, 2), (2, 4))):
        if which not in passes:
            continue
        p = prepared[which]
        run = p.run_blocks
        if sparse_on:
            run = SparseAttention(SparseSettings("radial", decay=0.3, block_size=16)).wrap(run, p.model.blocks)
        comp = CompiledRun(p.model, AOT) if compiled else None
        if comp is None:
            compiled_blocks.detach(p.model)
        else:
            run = comp.wrap(run)
            runs.append(comp)
        denoise = make_denoiser(p.model, COND, NEG, 3.5, batch_cfg=batch_cfg, run_blocks=cache.wrap(run, str(which)))
        with torch.inference_mode():
            r = sample(denoise, latent, sigmas, "euler", start_step=start, end_step=end, noise=noise,
                       add_noise=start == 0, return_with_leftover_noise=end < 4, solver_state=state)
        latent, state = r.latent, r.solver_state
    return latent, cache, runs


def test_no_recompile_after_warm_up(experts):
    """After the high-noise expert's pass with batched CFG and with CFG one branch at a time
    (the variants: batch 2 and 1, the dense first block and the sparse ones), nothing compiles
    again: not over steps, not for the other expert, not between CFG modes, not after a LoRA
    strength change (unmerged, hooks and buffers replaced), not when a step cache skips or runs
    one row, and not through block swap's ``.data`` swaps of the last block."""
    prepared, _ = experts
    _job(prepared, batch_cfg=True, passes=(0,))
    _job(prepared, batch_cfg=False, passes=(0,))
    warm = graphs_compiled()
    assert warm > 0
    for p in prepared:
        applied = p.loras.fixed[0]
        p.set_loras([lora.AppliedLora(applied.lora, 0.4)])
    for batch_cfg in (True, False, True):
        latent, cache, runs = _job(prepared, batch_cfg)
        assert torch.isfinite(latent).all()
    report = cache.report()
    branches = report["branches"]
    assert report["steps_skipped"] > 0 and branches["cond"]["skipped"] != branches["uncond"]["skipped"]
    assert graphs_compiled() == warm, "recompiled after warm-up"
    assert all(r.graphs == 0 and r.warmup_s == 0 and r.calls > 0 for r in runs)
    assert all(p.swap_stats().forwards > 0 for p in prepared)


def test_one_graph_for_every_block():
    """Four fp8 blocks (each with its own weight scale) and sparse attention with the first
    block dense: two graphs (dense, sparse), so nothing per block is baked into the graph."""
    from wanfit.optim import fp8
    from wanfit.wan.model import WanConfig, WanModel

    torch._dynamo.reset()  # count this model's graphs from nothing
    torch.manual_seed(0)
    model = WanModel(WanConfig("t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=4, freq_dim=32,
                               text_dim=32)).eval()
    fp8.quantize_module(model, "e4m3fn", torch.float32)
    scales = {float(b.ffn[0].scale_weight) for b in model.blocks}
    assert len(scales) == 4
    run = CompiledRun(model, AOT)
    sparse_run = SparseAttention(SparseSettings("radial", decay=0.3, block_size=16)).wrap(
        lambda state, call: model.run_blocks(state), model.blocks)
    cond = Conditioning(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager = make_denoiser(model, cond, None, 1.0, run_blocks=sparse_run)(x, 0.9, 0)
        out = make_denoiser(model, cond, None, 1.0, run_blocks=run.wrap(sparse_run))(x, 0.9, 0)
    compiled_blocks.detach(model)
    torch._dynamo.reset()
    assert run.graphs == 2
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_compiled_equals_eager(experts):
    prepared, _ = experts
    for batch_cfg in (True, False):
        compiled, _, _ = _job(prepared, batch_cfg, skip=False)
        eager, _, _ = _job(prepared, batch_cfg, compiled=False, skip=False)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_a_failed_compile_falls_back_to_eager_with_one_warning(experts, monkeypatch, caplog):
    prepared, _ = experts

    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler here")

    settings = CompileSettings("eager", "max-autotune-no-cudagraphs")  # a key no other test compiled
    monkeypatch.setattr(compiled_blocks, "compiled_forward",
                        lambda cls, s, *_: torch.compile(cls.forward, backend=broken))
    monkeypatch.setattr(compiled_blocks, "_FAILED", {})
    expected, _, _ = _job(prepared, True, compiled=False, skip=False)
    with caplog.at_level(logging.INFO, logger="WanFit"):
        runs = []
        for _ in range(2):  # a second job: no second warning, and no compile attempt
            policy = MagCache(((1.0, 1.0),) * 4, 0.0, 2, 0.0)
            cache = StepCache(policy, 4, split=2)
            p = prepared[0]
            run = CompiledRun(p.model, settings)
            runs.append(run)
            denoise = make_denoiser(p.model, COND, NEG, 3.5, run_blocks=cache.wrap(run.wrap(p.run_blocks), "h"))
            with torch.inference_mode():
                denoise(torch.randn(SHAPE), 0.9, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "compilation failed" in r.message]
    assert len(warnings) == 1 and "no C compiler here" in warnings[0].getMessage()
    assert runs[0].fallback and not runs[0].active and not runs[1].active
    assert compiled_blocks.attached(prepared[0].model) is None
    again, _, _ = _job(prepared, True, compiled=False, skip=False)
    torch.testing.assert_close(again, expected)


def test_telemetry_reports_the_warm_up():
    from wanfit.optim.telemetry import Telemetry

    with Telemetry("cpu") as tel:
        tel.record_speed("compiled_blocks", {"settings": "compiled blocks (inductor)", "active": True,
                                             "warmup_s": 2.5, "graphs_compiled": 2, "calls": 4, "fallback": None})
        tel.record_speed("compiled_blocks", {"settings": "compiled blocks (inductor)", "active": True,
                                             "warmup_s": 0.0, "graphs_compiled": 0, "calls": 4, "fallback": None})
    s = tel.summary()["compiled_blocks"]
    assert (s["warmup_s"], s["graphs_compiled"], s["calls"]) == (2.5, 2, 8)
    assert "compiled blocks (inductor): warm-up 2.5 s, 2 graph(s) compiled" in tel.format()


def test_a_gguf_model_with_mixed_quant_types_compiles_once_per_kind_of_block(tmp_path):
    """Q4_K_M-style files mix quant types from block to block: each kind of block gets its own
    graph (one graph for all gave NaN: Dynamo did not guard the layer's type), the result is
    the eager one, and a second call compiles nothing."""
    from wanfit.optim import gguf

    torch._dynamo.reset()
    path = factory.write_gguf_dit(tmp_path / "mixed.gguf", "t2v", "Q4_0", types={"blocks.0.ffn.0.weight": "Q8_0"})
    p = prepare_dit(gguf.open_gguf(path), RecordingBackend(lazy=True), SwapSettings(1, 1), dtype=torch.float32)
    assert [b.ffn[0].qtype.name for b in p.model.blocks] == ["Q8_0", "Q4_0"]
    cond = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    try:
        with torch.inference_mode():
            eager = make_denoiser(p.model, cond, None, 1.0, run_blocks=p.run_blocks)(x, 0.9, 0)
            run = CompiledRun(p.model, AOT)
            out = make_denoiser(p.model, cond, None, 1.0, run_blocks=run.wrap(p.run_blocks))(x, 0.9, 0)
            warm = graphs_compiled()
            make_denoiser(p.model, cond, None, 1.0, run_blocks=run.wrap(p.run_blocks))(x, 0.5, 1)
    finally:
        compiled_blocks.detach(p.model)
        p.close()
    assert run.graphs == 2 and graphs_compiled() == warm
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)  # one graph for both gave NaN
