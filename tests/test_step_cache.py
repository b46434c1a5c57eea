"""Step caches (optim/step_cache.py): exact skip patterns from the published rules on synthetic
signals, threshold 0 equal to no cache, branches and windows kept apart, two chained passes
equal to one, residuals where they were told to live, and calibration recovering what made a
synthetic run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wanfit.optim.step_cache import (MAGCACHE_RATIOS, PRESETS, CacheSettings, Calibrate, Calibration, EasyCache,
                                     JobInfo, MagCache, NoSkip, StepCache, TeaCache, build_policy, load_calibration,
                                     model_family, nearest_interp, ratios_for_steps)
from wanfit.wan.denoise import Conditioning, DiTCall, make_denoiser
from wanfit.wan.model import WanConfig, WanModel, WanState
from wanfit.wan.sampling import sample, seeded_noise
from wanfit.wan.schedulers import flow_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 8


def _state(x: torch.Tensor, e: torch.Tensor | None = None) -> WanState:
    b = x.shape[0]
    e = torch.ones(b, 1, DIM) if e is None else e
    return WanState(x, e, e.unsqueeze(2).expand(b, 1, 6, DIM).clone(), torch.zeros(1), torch.zeros(b, 1), None, (1, 1, 1))


def _drive(cache: StepCache, steps, inputs, blocks, branches=("cond",), batched=True, window=None, model="m",
           signal=None):
    """Call the wrapped fake block stack once per step (and branch); returns the outputs."""
    run = cache.wrap(blocks, model)
    outs = []
    for step in steps:
        x = inputs(step)
        e = None if signal is None else signal(step)
        if batched:
            rows = torch.cat([x] * len(branches))
            ee = None if e is None else torch.cat([e] * len(branches))
            outs.append(run(_state(rows, ee), DiTCall(step, 0.5, tuple(branches), window)).x)
        else:
            outs.append(torch.cat([run(_state(x.clone(), e), DiTCall(step, 0.5, (b,), window)).x for b in branches]))
    return outs


def _plus(offsets: dict[str, float]):
    """Blocks that add a per-branch constant: any reuse of another branch's residual shows."""
    def run(state, call):
        add = torch.tensor([offsets[b] for b in call.branches]).view(-1, 1, 1)
        state.x = state.x.float() + add
        return state
    return run


def _skipped(cache: StepCache, branch: str = "cond") -> list:
    return cache.report()["branches"][branch]["skipped"]


# --- the published rules, on synthetic signals, patterns written out by hand ----------------

def test_teacache_e_mode_pattern():
    # poly(x) = x, so the accumulator is the plain relative L1; e grows 10 % a step: rel 0.1.
    policy = TeaCache((0.0, 0.0, 0.0, 1.0, 0.0), threshold=0.25, mode="e")
    cache = StepCache(policy, 10)
    _drive(cache, range(10), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0}),
           signal=lambda s: torch.full((1, 1, DIM), 1.1 ** s))
    # step 0 computes (warm-up); 1: 0.1, 2: 0.2 reuse; 3: 0.3 >= 0.25 computes and restarts;
    # ... step 9 is the last step: computes in mode e.
    assert _skipped(cache) == [1, 2, 4, 5, 7, 8]


def test_teacache_e0_mode_pattern():
    policy = TeaCache((0.0, 0.0, 0.0, 1.0, 0.0), threshold=0.25, mode="e0")
    cache = StepCache(policy, 10)
    _drive(cache, range(10), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0}),
           signal=lambda s: torch.full((1, 1, DIM), 1.1 ** s))
    # e0 mode: the first 5 steps compute, the last step is not forced.
    assert _skipped(cache) == [5, 6, 8, 9]


def test_teacache_threshold_zero_never_skips_even_when_the_polynomial_is_negative():
    policy = TeaCache((0.0, 0.0, 0.0, 0.0, -1.0), threshold=0.0, mode="e")  # poly = -1 everywhere
    cache = StepCache(policy, 10)
    _drive(cache, range(10), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0}),
           signal=lambda s: torch.full((1, 1, DIM), 1.1 ** s))
    assert _skipped(cache) == []


def _mag(cond: float, uncond: float, steps: int = 10, **kw) -> MagCache:
    kw = {"threshold": 0.05, "skip_limit": 2, "retention": 0.2, **kw}
    return MagCache(tuple((cond, uncond) for _ in range(steps)), **kw)


def test_magcache_pattern_per_branch_sequential_cfg():
    cache = StepCache(_mag(0.99, 0.96), 10)
    _drive(cache, range(10), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0, "uncond": 100.0}),
           branches=("cond", "uncond"), batched=False)
    # calls cnt < int(2 * 10 * 0.2) = 4 compute: steps 0, 1.
    # cond (0.99): 2: err 0.01, 3: 0.01 + 0.0199 = 0.0299 reuse; 4: a third reuse > K=2, computes; ...
    assert _skipped(cache, "cond") == [2, 3, 5, 6, 8, 9]
    # uncond (0.96): 2: err 0.04 reuse; 3: 0.04 + 0.0784 >= 0.05 computes; ...
    assert _skipped(cache, "uncond") == [2, 4, 6, 8]
    assert cache.report()["skipped_steps"] == [2, 6, 8]  # steps where neither branch ran the blocks


def test_magcache_batched_rows_decide_as_separate_calls():
    """Batched CFG decides as the reference's separate cond and uncond calls: a row that may
    reuse does, and only the rows that must compute run the blocks (a batch of one)."""
    seen = []
    blocks = _plus({"cond": 1.0, "uncond": 100.0})

    def recording(state, call):
        seen.append((call.step, call.branches, state.x.shape[0], state.context.shape[0]))
        return blocks(state, call)

    cache = StepCache(_mag(0.99, 0.96), 10)
    outs = _drive(cache, range(10), lambda s: torch.ones(1, 4, DIM), recording, branches=("cond", "uncond"),
                  batched=True)
    assert _skipped(cache, "cond") == [2, 3, 5, 6, 8, 9]  # as in the sequential test above
    assert _skipped(cache, "uncond") == [2, 4, 6, 8]
    assert cache.report()["skipped_steps"] == [2, 6, 8]
    assert [(s, b) for s, b, _, _ in seen] == [(0, ("cond", "uncond")), (1, ("cond", "uncond")), (3, ("uncond",)),
                                               (4, ("cond",)), (5, ("uncond",)), (7, ("cond", "uncond")),
                                               (9, ("uncond",))]
    assert all(rows == ctx == len(b) for _, b, rows, ctx in seen)  # every per-row input cut alike
    for out in outs:  # computed or reused, each row carries its own branch's residual
        assert torch.all(out[0] == 2.0) and torch.all(out[1] == 101.0)


def test_magcache_retention_counts_calls_interleaved():
    policy = _mag(1.0, 1.0, retention=0.25)  # int(20 * 0.25) = 5 calls: cond of step 2 is call 4, uncond call 5
    assert policy.protected(2, 0, 10, None) and not policy.protected(2, 1, 10, None)
    assert not policy.protected(3, 0, 10, None)


def test_magcache_wan22_expert_rules():
    t2v = _mag(1.0, 1.0, steps=20, retention=0.4, rule="t2v_experts", threshold=1.0, skip_limit=100)
    # split 8: calls < int(16 * 0.4) = 6 (steps 0-2) and 16 <= cnt <= 24 * 0.4 + 16 = 25.6 (steps 8-12)
    protected = [s for s in range(20) if t2v.protected(s, 0, 20, 8)]
    assert protected == [0, 1, 2, 8, 9, 10, 11, 12]
    i2v = _mag(1.0, 1.0, steps=20, retention=0.1, rule="i2v_experts", threshold=1.0, skip_limit=100)
    # calls < int(16 + 24 * 0.1) = 18: the whole high-noise expert and step 8
    assert [s for s in range(20) if i2v.protected(s, 0, 20, 8)] == list(range(9))
    cache = StepCache(t2v, 20, split=8)
    _drive(cache, range(20), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0}))
    assert _skipped(cache) == [3, 4, 5, 6, 7, *range(13, 20)]


def test_easycache_pattern_and_pair_decision():
    v = torch.rand(1, 4, DIM, generator=torch.Generator().manual_seed(0)) + 0.5

    def double(state, call):  # output 2x: residual x, k = 2
        state.x = 2 * state.x.float()
        return state

    for batched in (True, False):
        cache = StepCache(EasyCache(threshold=0.025, warmup=2), 10)
        _drive(cache, range(10), lambda s: v * (1 + 0.01 * s), double, branches=("cond", "uncond"), batched=batched)
        # k = 2; each step adds 2 * 0.01 / (2 * (1 + 0.01 c)) ~ 0.0099 (c: last computed step):
        # 2, 3 reuse (0.0099, 0.0198), 4 computes (0.0297); 5, 6 reuse, 7 computes; 8 reuses;
        # 9 is the last step. uncond follows cond's decision.
        assert _skipped(cache, "cond") == _skipped(cache, "uncond") == [2, 3, 5, 6, 8]


# --- exactness, branches and windows ----------------------------------------------------------

def _tiny(seed: int = 0, model_type: str = "t2v"):
    torch.manual_seed(seed)
    config = WanConfig(model_type, dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32)
    return WanModel(config).eval()


def _blocks(model):
    """The model's own block loop in the denoiser hook's (state, call) form."""
    return lambda state, call: model.run_blocks(state)


COND = Conditioning(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1)))
UNCOND = Conditioning(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2)))
SHAPE = (1, 16, 2, 4, 4)


def _sample(model, cache=None, steps=12, batch_cfg=True, start=0, end=None, leftover=False, latent=None,
            state=None, model_key="m", cfg=5.0):
    run = None if cache is None else cache.wrap(_blocks(model), model_key)
    denoise = make_denoiser(model, COND, UNCOND, cfg, batch_cfg=batch_cfg, run_blocks=run)
    with torch.no_grad():
        return sample(denoise, torch.zeros(SHAPE) if latent is None else latent, flow_sigmas(steps, 5.0), "unipc",
                      start_step=start, end_step=end, noise=seeded_noise(3, SHAPE), add_noise=start == 0,
                      return_with_leftover_noise=leftover, solver_state=state)


def _policies(steps: int, threshold: float):
    return [MagCache.published("wan2.1_t2v_1.3B", steps, threshold=threshold),
            TeaCache.published("wan2.1_t2v_1.3B", "e", threshold=threshold),
            TeaCache.published("wan2.1_t2v_14B", "e0", threshold=threshold),
            EasyCache(threshold=threshold, warmup=2)]


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_threshold_zero_equals_no_cache(batch_cfg):
    model = _tiny()
    plain = _sample(model, batch_cfg=batch_cfg).latent
    for policy in [*_policies(12, 0.0), Calibrate()]:
        cache = StepCache(policy, 12)
        assert torch.equal(_sample(model, cache, batch_cfg=batch_cfg).latent, plain), policy.describe()
        assert cache.report()["steps_skipped"] == 0
    loose = StepCache(MagCache.published("wan2.1_t2v_1.3B", 12, threshold=0.5), 12)  # the test can fail
    assert not torch.equal(_sample(model, loose, batch_cfg=batch_cfg).latent, plain)
    assert loose.report()["steps_skipped"] > 0


@pytest.mark.parametrize("batched", [True, False])
def test_uncond_never_reuses_the_cond_residual(batched):
    cache = StepCache(_mag(1.0, 1.0, threshold=1.0, skip_limit=100), 10)
    outs = _drive(cache, range(10), lambda s: torch.zeros(1, 4, DIM), _plus({"cond": 1.0, "uncond": 100.0}),
                  branches=("cond", "uncond"), batched=batched)
    assert _skipped(cache, "cond") == _skipped(cache, "uncond") == list(range(2, 10))
    for out in outs:  # computed or reused, each row carries its own branch's residual
        assert torch.all(out[0] == 1.0) and torch.all(out[1] == 100.0)


def test_context_windows_keep_their_own_state():
    cache = StepCache(_mag(1.0, 1.0, threshold=1.0, skip_limit=100), 10)
    run = cache.wrap(lambda state, call: setattr(state, "x", state.x + 10.0 * (call.window + 1)) or state)
    for step in range(10):
        for window in (0, 1):
            out = run(_state(torch.zeros(1, 4, DIM)), DiTCall(step, 0.5, ("cond",), window)).x
            assert torch.all(out == 10.0 * (window + 1))
    assert cache.report()["branches"]["cond"]["skipped"][:2] == [[2, 0], [2, 1]]


def test_a_different_model_computes_its_first_call():
    cache = StepCache(_mag(1.0, 1.0, threshold=1.0, skip_limit=100), 10)
    _drive(cache, range(5), lambda s: torch.zeros(1, 4, DIM), _plus({"cond": 1.0}), model="high")
    outs = _drive(cache, range(5, 10), lambda s: torch.zeros(1, 4, DIM), _plus({"cond": 7.0}), model="low")
    assert _skipped(cache) == [2, 3, 4, 6, 7, 8, 9]  # step 5 computed: the other expert's residual is not used
    assert all(torch.all(o == 7.0) for o in outs)


# --- two passes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["magcache", "teacache", "easycache"])
def test_two_chained_passes_equal_one_pass(policy):
    model, steps, k = _tiny(), 12, 5
    make = {"magcache": lambda: MagCache.published("wan2.1_t2v_1.3B", steps, threshold=0.3),
            "teacache": lambda: TeaCache((0.0, 0.0, 0.0, 1.0, 0.0), 1.7, "e"),  # rel L1 ~0.8 a step here
            "easycache": lambda: EasyCache(threshold=0.1, warmup=2)}[policy]
    one = StepCache(make(), steps)
    whole = _sample(model, one, steps).latent
    first = StepCache(make(), steps)
    a = _sample(model, first, steps, end=k, leftover=True)
    second = StepCache(make(), steps)
    second.load_state_dict(first.state_dict())  # what the LATENT carries between Sampler nodes
    b = _sample(model, second, steps, start=k, latent=a.latent, state=a.solver_state)
    assert one.report()["skipped_steps"] and one.report()["skipped_steps"] == second.report()["skipped_steps"]
    torch.testing.assert_close(b.latent, whole, atol=1e-5, rtol=1e-5)


def test_magcache_two_passes_index_the_ratios_by_the_global_step():
    """WanVideoWrapper issue #640: MagCache across two passes. Ratio 0.5 at step 7 only: the
    second pass (steps 5..9) must compute at global step 7, which a pass counting from 0 (or
    ratios resampled to the pass's 5 steps) would not."""
    steps, k = 10, 5
    ratios = tuple((0.5, 0.5) if s == 7 else (1.0, 1.0) for s in range(steps))
    policy = MagCache(ratios, threshold=0.3, skip_limit=100, retention=0.1)
    first = StepCache(policy, steps)
    blocks = _plus({"cond": 1.0, "uncond": 2.0})
    _drive(first, range(k), lambda s: torch.zeros(1, 4, DIM), blocks, branches=("cond", "uncond"))
    second = StepCache(policy, steps)
    second.load_state_dict(first.state_dict())
    _drive(second, range(k, steps), lambda s: torch.zeros(1, 4, DIM), blocks, branches=("cond", "uncond"))
    assert _skipped(second) == [1, 2, 3, 4, 5, 6, 8, 9]
    with pytest.raises(ValueError, match="cover 5 steps"):
        StepCache(MagCache(ratios[:5], 0.3, 100, 0.1), steps)  # ratios for one pass only: refused


def test_magcache_a14b_two_experts_chained_equal_one_two_expert_run():
    high, low, steps, k = _tiny(0), _tiny(1), 16, 7
    policy = MagCache.published("wan2.2_t2v_A14B", steps, threshold=0.3, skip_limit=4, retention=0.2)
    one = StepCache(policy, steps, split=k)
    a = _sample(high, one, steps, end=k, leftover=True, model_key="high")
    whole = _sample(low, one, steps, start=k, latent=a.latent, state=a.solver_state, model_key="low").latent
    first = StepCache(policy, steps, split=k)
    a2 = _sample(high, first, steps, end=k, leftover=True, model_key="high")
    second = StepCache(policy, steps, split=k)
    second.load_state_dict(first.state_dict())
    b = _sample(low, second, steps, start=k, latent=a2.latent, state=a2.solver_state, model_key="low")
    assert torch.equal(b.latent, whole)
    assert one.report()["skipped_steps"] == second.report()["skipped_steps"]
    assert one.report()["skipped_steps"] and k not in one.report()["skipped_steps"]


def test_state_of_another_policy_or_schedule_is_refused():
    cache = StepCache(_mag(1.0, 1.0), 10)
    with pytest.raises(ValueError, match="other settings"):
        StepCache(_mag(0.9, 1.0), 10).load_state_dict(cache.state_dict())
    with pytest.raises(ValueError, match="other settings"):
        StepCache(EasyCache(), 10).load_state_dict(cache.state_dict())


# --- memory: where the residuals live and how many bytes -----------------------------------------

@pytest.mark.parametrize("make", [lambda: MagCache.published("wan2.1_t2v_1.3B", 12, threshold=0.3),
                                  lambda: EasyCache(threshold=0.1, warmup=2), lambda: Calibrate()])
@pytest.mark.parametrize("storage", ["compute", "cpu"])
def test_held_bytes_match_the_closed_form(make, storage):
    model = _tiny()
    cache = StepCache(make(), 12, storage=storage)
    _sample(model, cache)
    held = cache.held_bytes()
    assert set(held) == {"cpu"}
    tokens = 2 * 2 * 2  # latent 2x4x4 in patches of 1x2x2
    expected = StepCache.held_bytes_for(cache.policy, ("cond", "uncond"), tokens, 64, torch.float32)
    assert held["cpu"] <= expected and held["cpu"] >= 2 * tokens * 64 * 4
    if isinstance(cache.policy, (MagCache, Calibrate)):
        assert held["cpu"] == expected  # every branch's residual (+ inputs) is there at the end


def test_a_traced_call_stores_the_residuals_on_the_storage_device():
    """Under a fake-tensor trace (the memory planner's) the wrapper stores what a computed call
    stores; the storage device is honoured ("meta" stands in for a second device here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for storage, device in (("compute", "cpu"), ("meta", "meta")):
        policy = EasyCache()
        cache = StepCache(policy, 10, storage=storage)
        run = cache.wrap(_plus({"cond": 1.0, "uncond": 2.0}))
        with FakeTensorMode():
            x = torch.empty(2, 6, DIM, dtype=torch.bfloat16)
            run(_state(x, torch.ones(2, 1, DIM)), DiTCall(0, 0.9, ("cond", "uncond")))
        assert {t.device.type for ts in cache.traced.values() for t in ts} == {device}
        nbytes = sum(t.numel() * t.element_size() for ts in cache.traced.values() for t in ts)
        assert nbytes == StepCache.held_bytes_for(policy, ("cond", "uncond"), 6, DIM, torch.bfloat16)
        assert not cache.report()["branches"]  # a trace records no decisions


def test_real_run_keeps_residuals_on_the_cpu_when_told():
    cache = StepCache(_mag(1.0, 1.0), 10, storage="cpu")
    _drive(cache, range(3), lambda s: torch.zeros(1, 4, DIM), _plus({"cond": 1.0}))
    assert cache._states[("cond", None)].residual.device.type == "cpu"


# --- calibration --------------------------------------------------------------------------------

def test_calibration_then_threshold_zero_reproduces_the_uncached_run(tmp_path):
    model, steps = _tiny(), 12
    plain = _sample(model, steps=steps).latent
    recorder = StepCache(Calibrate(), steps)
    assert torch.equal(_sample(model, recorder, steps).latent, plain)
    path = recorder.calibration("tiny", {"shift": 5.0}).save(tmp_path)
    cal = load_calibration(tmp_path, path.stem)
    assert cal.steps == steps and len(cal.mag_ratios) == 2 * steps and set(cal.teacache) == {"e", "e0"}
    job = JobInfo(model.config, steps)
    for settings in (CacheSettings("magcache", 0.0, skip_limit=2, retention=0.2, calibration=cal),
                     CacheSettings("teacache", 0.0, mode="e", calibration=cal),
                     CacheSettings("teacache", 0.0, mode="e0", calibration=cal)):
        policy, _ = build_policy(settings, job)
        cache = StepCache(policy, steps)
        assert torch.equal(_sample(model, cache, steps).latent, plain), settings
    policy, _ = build_policy(CacheSettings("magcache", 0.5, skip_limit=3, retention=0.2, calibration=cal), job)
    assert StepCache(policy, steps) and policy.source == "calibration tiny"


def test_calibration_recovers_the_ratios_that_made_a_synthetic_run():
    steps = 9
    gen = torch.Generator().manual_seed(4)
    gains = {b: 0.8 + 0.4 * torch.rand(steps, generator=gen) for b in ("cond", "uncond")}
    base = torch.rand(1, 5, DIM, generator=gen) + 0.1

    def blocks(state, call):  # residual of step t = base * prod(gains[1..t])
        scale = torch.stack([gains[b][1:call.step + 1].prod() for b in call.branches]).view(-1, 1, 1)
        state.x = state.x.float() + base * scale
        return state

    cache = StepCache(Calibrate(), steps)
    _drive(cache, range(steps), lambda s: torch.rand(1, 5, DIM, generator=gen), blocks, branches=("cond", "uncond"),
           signal=lambda s: torch.full((1, 1, DIM), 1.0 + s))
    cal = cache.calibration("synthetic")
    ratios = np.array(cal.mag_ratios).reshape(steps, 2)
    np.testing.assert_allclose(ratios[1:, 0], gains["cond"][1:].numpy(), rtol=1e-5)
    np.testing.assert_allclose(ratios[1:, 1], gains["uncond"][1:].numpy(), rtol=1e-5)
    assert ratios[0].tolist() == [1.0, 1.0]


def test_calibration_fits_the_modulation_to_output_curve():
    steps = 10
    xs = np.linspace(0.02, 0.2, steps)  # relative change of e at each step
    poly = np.array([10.0, 3.0, 0.05])  # the output's relative change = poly(x)
    e = [torch.full((1, 1, DIM), 1.0)]
    out = [torch.full((1, 5, DIM), 2.0)]
    for s in range(1, steps):
        e.append(e[-1] * (1 + xs[s]))
        out.append(out[-1] * (1 + float(np.polyval(poly, xs[s]))))

    def blocks(state, call):
        state.x = out[call.step].clone()
        return state

    cache = StepCache(Calibrate(), steps)
    _drive(cache, range(steps), lambda s: torch.full((1, 5, DIM), 0.5), blocks, signal=lambda s: e[s])
    fit = Calibration.from_points("fit", steps, {"cond": cache._states[("cond", None)].points}).teacache["e"]
    np.testing.assert_allclose(np.polyval(fit, xs[1:]), np.polyval(poly, xs[1:]), rtol=1e-4, atol=1e-5)


def test_calibration_needs_the_whole_schedule():
    cache = StepCache(Calibrate(), 6)
    _drive(cache, range(3), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0}))
    with pytest.raises(ValueError, match="saw 3 of 6 steps"):
        cache.calibration("partial")


# --- published constants and choices --------------------------------------------------------------

def test_nearest_interp_is_the_references_formula():
    src = [10, 11, 12, 13, 14]
    assert nearest_interp(src, 3).tolist() == [10, 12, 14]
    assert nearest_interp(src, 4).tolist() == [10, 11, 13, 14]  # round(4/3) = 1, round(8/3) = 3
    assert nearest_interp(src, 1).tolist() == [14]
    ratios = ratios_for_steps(MAGCACHE_RATIOS["wan2.1_t2v_14B"], 20)  # 50 calibrated steps to 20
    index = np.round(np.arange(20) * 49 / 19).astype(int)
    assert [r[0] for r in ratios] == [MAGCACHE_RATIOS["wan2.1_t2v_14B"][2 * i] for i in index]
    assert [r[1] for r in ratios] == [MAGCACHE_RATIOS["wan2.1_t2v_14B"][2 * i + 1] for i in index]


def _job(preset: str, **kw) -> JobInfo:
    return JobInfo(PRESETS[preset], kw.pop("steps", 20), **kw)


def test_model_families():
    assert model_family(_job("Wan2.1 T2V 1.3B"))[0] == "wan2.1_t2v_1.3B"
    assert model_family(_job("Wan2.1 I2V 14B", width=832, height=480))[0] == "wan2.1_i2v_14B_480p"
    assert model_family(_job("Wan2.1 I2V 14B", width=1280, height=720))[0] == "wan2.1_i2v_14B_720p"
    assert model_family(_job("Wan2.2 I2V-A14B expert"))[0] == "wan2.2_i2v_A14B"
    assert model_family(_job("Wan2.2 TI2V-5B"))[0] == "wan2.2_ti2v_5B"
    twin = "Wan2.1 T2V 14B"
    assert model_family(_job(twin, name="wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"))[0] == "wan2.2_t2v_A14B"
    assert model_family(_job(twin, name="wan2.1_t2v_14B_bf16.safetensors"))[0] == "wan2.1_t2v_14B"
    assert model_family(_job(twin, name="model.safetensors", two_experts=True))[0] == "wan2.2_t2v_A14B"
    family, why = model_family(_job(twin, name="model.safetensors"))
    assert family is None and "does not say which" in why


@pytest.mark.parametrize("preset", ["Wan2.2 I2V-A14B expert", "Wan2.2 TI2V-5B"])
def test_teacache_never_applies_wan21_coefficients_to_wan22(preset):
    with pytest.raises(ValueError, match="WanFit TeaCache.*Wan 2.1 only.*MagCache.*EasyCache.*Calibrate"):
        build_policy(CacheSettings("teacache"), _job(preset))
    with pytest.raises(ValueError, match="Wan 2.1 only"):
        build_policy(CacheSettings("teacache"), _job("Wan2.1 T2V 14B", name="wan2.2_t2v_high_noise_14B.safetensors"))


def test_published_defaults_per_model():
    policy, _ = build_policy(CacheSettings("magcache"), _job("Wan2.2 I2V-A14B expert", steps=40, split=20))
    assert (policy.threshold, policy.skip_limit, policy.retention, policy.rule) == (0.06, 2, 0.1, "i2v_experts")
    policy, _ = build_policy(CacheSettings("magcache"), _job("Wan2.1 T2V 14B", name="wan2.1_t2v_14B.safetensors"))
    assert (policy.threshold, policy.skip_limit, policy.retention, policy.rule) == (0.24, 6, 0.2, "plain")
    policy, _ = build_policy(CacheSettings("magcache"), _job("Wan2.2 TI2V-5B", mode="ti2v", steps=50))
    assert policy.source == "wan2.2_ti2v_5B_i2v" and policy.ratios[1] == tuple(MAGCACHE_RATIOS[policy.source][2:4])
    policy, _ = build_policy(CacheSettings("teacache"), _job("Wan2.1 T2V 1.3B"))
    assert (policy.mode, policy.threshold) == ("e", 0.05)
    policy, _ = build_policy(CacheSettings("teacache"), _job("Wan2.1 I2V 14B"))
    assert (policy.mode, policy.threshold, policy.source) == ("e0", 0.20, "wan2.1_i2v_14B_480p")
    policy, _ = build_policy(CacheSettings("easycache"), _job("Wan2.2 I2V-A14B expert", steps=40))
    assert (policy.threshold, policy.warmup) == (0.05, 8)
    with pytest.raises(ValueError, match="not a released Wan model"):
        build_policy(CacheSettings("magcache"), JobInfo(_tiny().config, 20))


def test_short_schedules_skip_nothing_unless_allowed():
    for steps in (4, 8):
        policy, _ = build_policy(CacheSettings("magcache"), _job("Wan2.2 I2V-A14B expert", steps=steps, split=2))
        assert isinstance(policy, NoSkip) and "sglang" in policy.reason and "14025" in policy.reason
        cache = StepCache(policy, steps)
        _drive(cache, range(steps), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0}))
        assert cache.report()["steps_skipped"] == 0 and "8 or fewer steps" in cache.line()
        assert sum(cache.held_bytes().values()) == 0
    policy, _ = build_policy(CacheSettings("teacache", allow_short_schedules=True), _job("Wan2.1 T2V 1.3B", steps=4))
    assert isinstance(policy, TeaCache)
    # no constants are needed to skip nothing: a short Wan 2.2 job with TeaCache is not an error
    assert isinstance(build_policy(CacheSettings("teacache"), _job("Wan2.2 TI2V-5B", steps=4))[0], NoSkip)


def test_the_job_line_says_what_happened():
    cache = StepCache(_mag(0.99, 0.96), 10)
    _drive(cache, range(10), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0, "uncond": 100.0}),
           branches=("cond", "uncond"), batched=True)
    line = cache.line()
    assert "7 of 10 steps computed, 3 skipped (steps 2, 6, 8)" in line
    assert "one branch reused its residual at steps 3, 4, 5, 9" in line
    assert "accumulated error estimate" in line and "residuals held on the compute device" in line
    report = cache.report()
    assert report["error_estimate"] == pytest.approx(3 * (0.01 + 0.0299) + 4 * 0.04)


def test_telemetry_carries_the_report():
    from wanfit.optim.telemetry import Telemetry

    cache = StepCache(_mag(0.99, 0.96), 10)
    _drive(cache, range(10), lambda s: torch.ones(1, 4, DIM), _plus({"cond": 1.0, "uncond": 100.0}),
           branches=("cond", "uncond"))
    with Telemetry("cpu") as tel:
        tel.skip_step()  # the plain counter, replaced by the cache's report
        tel.record_step_cache(cache.report())
    s = tel.summary()
    assert (s["steps_skipped"], s["steps_computed"]) == (3, 7)
    assert s["step_cache"]["skipped_steps"] == [2, 6, 8]
    assert "MagCache (threshold 0.05, K 2, retention 0.2, ratios custom): 7 steps computed, 3 skipped" in tel.format()


def test_residuals_stored_off_the_compute_device_come_back_for_the_add(monkeypatch):
    """The real (deciding) path with residuals on another device than the tokens: MagCache
    decides from its ratios alone, so it runs on fake tensors with "meta" as the storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wanfit.optim import step_cache

    monkeypatch.setattr(step_cache, "_traced", lambda x: False)
    cache = StepCache(_mag(1.0, 1.0, steps=6, threshold=1.0, skip_limit=100), 6, storage="meta")
    with FakeTensorMode():
        outs = _drive(cache, range(6), lambda s: torch.zeros(1, 4, DIM), _plus({"cond": 1.0, "uncond": 2.0}),
                      branches=("cond", "uncond"))
        assert {o.device.type for o in outs} == {"cpu"}
    assert _skipped(cache) == [1, 2, 3, 4, 5]
    assert {st.residual.device.type for st in cache._states.values()} == {"meta"}
