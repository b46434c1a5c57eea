"""The sampling loop: two-pass hand-over, step slicing, noise semantics, expert boundary."""
from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from reference import wan22_module
from wanfit.wan.sampling import SampleResult, sample, seeded_noise
from wanfit.wan.schedulers import SOLVERS, boundary_step, flow_sigmas, make_solver

_gen = torch.Generator().manual_seed(1)
_W_HIGH = torch.randn(4, 4, generator=_gen, dtype=torch.float64) * 0.3
_W_LOW = torch.randn(4, 4, generator=_gen, dtype=torch.float64) * 0.3
_B = torch.randn(4, generator=_gen, dtype=torch.float64).view(1, 4, 1, 1, 1)
_NOISE = torch.randn(1, 4, 3, 4, 4, generator=_gen, dtype=torch.float64)
_LATENT = torch.randn(1, 4, 3, 4, 4, generator=_gen, dtype=torch.float64)


def _expert(w: torch.Tensor):
    def velocity(x, sigma, step_index):
        return torch.einsum("ij,bj...->bi...", w.to(x.dtype), x) * (0.5 + sigma) + _B.to(x.dtype) * (1 - sigma)
    return velocity


HIGH, LOW = _expert(_W_HIGH), _expert(_W_LOW)


def _switching(k: int):
    """One pass that changes expert at step k, as official Wan 2.2 does."""
    return lambda x, sigma, i: (HIGH if i < k else LOW)(x, sigma, i)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("solver", SOLVERS)
def test_two_passes_equal_one_pass_that_switches_expert(solver, dtype, tol):
    sigmas = flow_sigmas(20, 5.0)
    noise, latent = _NOISE.to(dtype), torch.zeros_like(_NOISE, dtype=dtype)
    for k in (1, 2, 7, 19):
        single = sample(_switching(k), latent, sigmas, solver, noise=noise).latent
        a = sample(HIGH, latent, sigmas, solver, 0, k, noise=noise, return_with_leftover_noise=True)
        b = sample(LOW, a.latent, sigmas, solver, k, 20, add_noise=False, solver_state=a.solver_state)
        err = (b.latent - single).abs().max().item()
        print(f"{solver} {dtype} switch at {k}: two-pass vs one-pass max abs err {err:.2e}")
        assert err < tol


@pytest.mark.parametrize("solver", ["unipc", "dpm++_2m"])
def test_multistep_history_matters(solver):
    """Without the handed-over state pass B restarts at first order: a visibly different result."""
    sigmas = flow_sigmas(20, 5.0)
    single = sample(_switching(7), torch.zeros_like(_NOISE), sigmas, solver, noise=_NOISE).latent
    a = sample(HIGH, torch.zeros_like(_NOISE), sigmas, solver, 0, 7, noise=_NOISE, return_with_leftover_noise=True)
    b = sample(LOW, a.latent, sigmas, solver, 7, add_noise=False)
    assert (b.latent - single).abs().max().item() > 1e-4


def test_solver_state_is_plain_tensors_and_survives_safetensors():
    sigmas = flow_sigmas(12, 5.0)
    single = sample(_switching(5), torch.zeros_like(_NOISE), sigmas, "unipc", noise=_NOISE).latent
    a = sample(HIGH, torch.zeros_like(_NOISE), sigmas, "unipc", 0, 5, noise=_NOISE, return_with_leftover_noise=True)
    assert a.solver_state and all(isinstance(v, torch.Tensor) for v in a.solver_state.values())
    assert {"unipc.sigma", "unipc.x0", "unipc.x0_sigma", "unipc.last_sample"} == set(a.solver_state)
    restored = st_load(st_save(a.solver_state))
    b = sample(LOW, a.latent, sigmas, "unipc", 5, add_noise=False, solver_state=restored)
    assert (b.latent - single).abs().max().item() < 1e-12


@pytest.mark.parametrize("solver", SOLVERS)
def test_end_step_without_leftover_noise_denoises_fully(solver):
    """ComfyUI's force_full_denoise: cut after end_step, last sigma replaced by 0."""
    sigmas, end = flow_sigmas(20, 5.0), 8
    seen = []
    out = sample(HIGH, _LATENT, sigmas, solver, 0, end, noise=_NOISE,
                 callback=lambda i, n, x, x0: seen.append((i, n, x0)))
    assert [i for i, _, _ in seen] == list(range(end)) and {n for _, n, _ in seen} == {20}
    cut = torch.cat([sigmas[:end], torch.zeros(1)])
    assert torch.equal(out.latent, sample(HIGH, _LATENT, cut, solver, noise=_NOISE).latent)
    # the final step to sigma 0 is first order: the result is that step's x0 prediction
    assert (out.latent - seen[-1][2]).abs().max().item() < 1e-12


def test_start_and_end_slicing():
    sigmas = flow_sigmas(10, 3.0)
    calls = []
    def record(x, sigma, i):
        calls.append((i, sigma))
        return HIGH(x, sigma, i)
    sample(record, _LATENT, sigmas, "euler", 3, 6, noise=_NOISE, return_with_leftover_noise=True)
    assert calls == [(i, float(sigmas[i])) for i in range(3, 6)]
    calls.clear()
    sample(record, _LATENT, sigmas, "euler", 8, 99, noise=_NOISE)  # end clamps to the schedule
    assert [i for i, _ in calls] == [8, 9]
    calls.clear()
    untouched = sample(record, _LATENT, sigmas, "euler", 6, 6, noise=_NOISE, solver_state={"euler.sigma": torch.tensor(0.5)})
    assert calls == [] and untouched.latent is _LATENT and set(untouched.solver_state) == {"euler.sigma"}


def test_add_noise_semantics():
    first_x = []
    def record(x, sigma, i):
        first_x.append(x.clone())
        return HIGH(x, sigma, i)
    sigmas = flow_sigmas(10, 5.0)
    s = float(sigmas[4])
    sample(record, _LATENT, sigmas, "euler", 4, 5, noise=_NOISE, return_with_leftover_noise=True)
    assert torch.allclose(first_x[-1], s * _NOISE + (1 - s) * _LATENT, rtol=0, atol=1e-15)
    # at sigma 1 the input is pure noise, whatever the latent
    sample(record, _LATENT, flow_sigmas(10, 5.0, sigma_max=1.0), "euler", 0, 1, noise=_NOISE,
           return_with_leftover_noise=True)
    assert torch.equal(first_x[-1], _NOISE)
    # ComfyUI's convention: without noise the input is (1 - s) * latent; leftover output is x / (1 - e)
    out = sample(record, _LATENT, sigmas, "euler", 4, 5, add_noise=False, return_with_leftover_noise=True)
    assert torch.allclose(first_x[-1], (1 - s) * _LATENT, rtol=0, atol=1e-15)
    e = float(sigmas[5])
    expected = (first_x[-1] + (e - s) * HIGH(first_x[-1], s, 4)) / (1 - e)
    assert torch.allclose(out.latent, expected, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="noise"):
        sample(HIGH, _LATENT, sigmas, "euler")


def test_callback_can_cancel():
    calls = []
    def cancel(i, n, x, x0):
        if i == 2:
            raise InterruptedError("cancelled")
    def record(x, sigma, i):
        calls.append(i)
        return HIGH(x, sigma, i)
    with pytest.raises(InterruptedError):
        sample(record, _LATENT, flow_sigmas(10, 5.0), "unipc", noise=_NOISE, callback=cancel)
    assert calls == [0, 1, 2]


def test_unknown_solver_and_foreign_state():
    with pytest.raises(ValueError, match=r"unknown solver 'heun'.*euler, unipc, dpm\+\+_2m"):
        make_solver("heun", flow_sigmas(4, 5.0))
    sigmas = flow_sigmas(10, 5.0)
    a = sample(HIGH, _LATENT, sigmas, "unipc", 0, 4, noise=_NOISE, return_with_leftover_noise=True)
    with pytest.raises(ValueError, match="unipc"):
        sample(LOW, a.latent, sigmas, "dpm++_2m", 4, add_noise=False, solver_state=a.solver_state)
    with pytest.raises(ValueError, match="schedules differ"):
        sample(LOW, a.latent, sigmas, "unipc", 5, add_noise=False, solver_state=a.solver_state)


def test_seeded_noise_is_deterministic_cpu_float32():
    a, b = seeded_noise(42, (1, 16, 2, 4, 4)), seeded_noise(42, [1, 16, 2, 4, 4])
    assert a.dtype == torch.float32 and a.device.type == "cpu" and torch.equal(a, b)
    assert not torch.equal(a, seeded_noise(43, (1, 16, 2, 4, 4)))
    with torch.random.fork_rng():  # ComfyUI's prepare_noise: torch.manual_seed(seed), randn on the CPU
        assert torch.equal(a, torch.randn((1, 16, 2, 4, 4), generator=torch.manual_seed(42)))
    assert seeded_noise(0xFFFFFFFFFFFFFFFF, (2,)).shape == (2,)  # ComfyUI's largest seed


def _official_switch(steps: int, shift: float, boundary: float) -> int:
    """The official rule (wan/image2video.py): high-noise expert while t >= boundary * 1000."""
    wan22_module("attention")  # registers reference.py's stub ``wan`` package, or skips
    sched = importlib.import_module("wan.utils.fm_solvers_unipc").FlowUniPCMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    sched.set_timesteps(steps, shift=shift)
    high = [t.item() >= boundary * sched.config.num_train_timesteps for t in sched.timesteps]
    return high.index(False) if False in high else len(high)


@pytest.mark.parametrize("name,steps,shift,boundary", [("i2v A14B", 40, 5.0, 0.900), ("t2v A14B", 40, 12.0, 0.875)])
def test_boundary_step_official_settings(name, steps, shift, boundary):
    k = boundary_step(flow_sigmas(steps, shift), boundary)
    print(f"{name}: {steps} steps, shift {shift}, boundary {boundary} -> low-noise expert from step {k}")
    assert k == _official_switch(steps, shift, boundary)


def test_boundary_step_grid():
    for steps in (1, 2, 3, 4, 6, 8, 10, 20, 30, 40, 50):
        for shift in (1.0, 3.0, 5.0, 8.0, 12.0):
            for boundary in (0.875, 0.900):
                assert boundary_step(flow_sigmas(steps, shift), boundary) == _official_switch(steps, shift, boundary)


def test_result_type():
    out = sample(HIGH, _LATENT, flow_sigmas(3, 5.0), "dpm++_2m", noise=_NOISE)
    assert isinstance(out, SampleResult) and out.latent.shape == _LATENT.shape
