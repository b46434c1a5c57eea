"""Schedules and solvers against the official Wan 2.2 code (wan22) and diffusers.

Every trajectory runs a fixed analytic velocity field (a linear map of x plus terms in sigma
and a mild sin(x)) through a reference scheduler and through ``wanfit.wan.sampling.sample``
with the same sigmas, and compares the sample before every step and after the last one.
The references do their coefficient maths in float32 (FlowMatchEuler and the DPM solvers
also cast the sample to float32), so ~1e-6 is their floor; with float64 sigmas, wan22's
UniPC agrees with ours to ~1e-15.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from reference import wan22_module
from wanfit.wan.sampling import sample
from wanfit.wan.schedulers import SIGMA_MAX, flow_sigmas, flow_timesteps

pytestmark = pytest.mark.parity

STEPS = (4, 20, 40)
SHIFTS = (3.0, 5.0, 8.0)
GRID = [(steps, shift) for steps in STEPS for shift in SHIFTS]
TOL = 5e-6  # latents reach |x| ~ 4: ~1e-6 relative

_gen = torch.Generator().manual_seed(0)
_W = torch.randn(4, 4, generator=_gen, dtype=torch.float64) * 0.3
_B = torch.randn(4, generator=_gen, dtype=torch.float64).view(1, 4, 1, 1, 1)
_NOISE = torch.randn(1, 4, 2, 3, 3, generator=_gen, dtype=torch.float64)


def _wan22_utils(name: str) -> ModuleType:
    """``wan.utils.<name>`` from wan22 (its light utils package, under reference.py's stub ``wan``)."""
    wan22_module("attention")  # registers the stub ``wan`` package, or skips without wan22
    return importlib.import_module(f"wan.utils.{name}")


def _velocity(x: torch.Tensor, sigma) -> torch.Tensor:
    s = float(sigma)
    return torch.einsum("ij,bj...->bi...", _W, x) * (0.5 + s) + _B * (1 - s) + 0.2 * torch.sin(x)


def _reference_trajectory(scheduler, sigmas: torch.Tensor) -> list[torch.Tensor]:
    scheduler.set_begin_index(0)  # int timesteps may repeat; index by position
    x = float(sigmas[0]) * _NOISE
    out = [x]
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(_velocity(x, sigmas[i]), t, x, return_dict=False)[0]
        out.append(x)
    return out


def _our_trajectory(sigmas: torch.Tensor, solver: str) -> list[torch.Tensor]:
    out = []
    result = sample(lambda x, s, i: _velocity(x, s), torch.zeros_like(_NOISE), sigmas, solver,
                    noise=_NOISE, callback=lambda i, n, x, x0: out.append(x))
    return out + [result.latent]


def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _wan22_unipc(steps: int, shift: float):
    sched = _wan22_utils("fm_solvers_unipc").FlowUniPCMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)  # as wan/image2video.py
    sched.set_timesteps(steps, shift=shift)
    return sched


def _wan22_dpm(steps: int, shift: float):
    """The official "dpm++" path: get_sampling_sigmas (sigma_max 1.0) through retrieve_timesteps."""
    fm = _wan22_utils("fm_solvers")
    sched = fm.FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    fm.retrieve_timesteps(sched, sigmas=fm.get_sampling_sigmas(steps, shift))
    return sched


def _base_sigmas(steps: int) -> np.ndarray:
    """Unshifted official grid, for references that shift custom sigmas themselves."""
    return np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1].copy()


@pytest.mark.parametrize("steps,shift", GRID)
def test_sigmas_and_timesteps_match_wan22(steps, shift):
    unipc, dpm = _wan22_unipc(steps, shift), _wan22_dpm(steps, shift)
    ours = flow_sigmas(steps, shift)
    print(f"steps={steps} shift={shift}: wan22 unipc sigmas/timesteps bit-identical; "
          f"sigma[0]={ours[0].item():.7f} t={flow_timesteps(steps, shift)[:3].tolist()}...")
    assert ours.dtype == torch.float32 and torch.equal(ours, unipc.sigmas)
    assert torch.equal(flow_timesteps(steps, shift), unipc.timesteps)
    assert torch.equal(flow_sigmas(steps, shift, sigma_max=1.0), dpm.sigmas)
    assert torch.equal(flow_timesteps(steps, shift, sigma_max=1.0), dpm.timesteps)


@pytest.mark.parametrize("steps,shift", GRID)
def test_sigmas_match_diffusers(steps, shift):
    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    unipc.set_timesteps(sigmas=_base_sigmas(steps))
    dpm = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                      prediction_type="flow_prediction", flow_shift=shift)
    dpm.set_timesteps(steps)  # its own grid: 1 - linspace(1, 1/1000), the same values to float32 rounding
    ours = flow_sigmas(steps, shift)
    err_unipc = (unipc.sigmas - ours).abs().max().item()
    err_dpm = (dpm.sigmas - ours).abs().max().item()
    print(f"steps={steps} shift={shift}: diffusers unipc sigma err {err_unipc:.2e}, dpm sigma err {err_dpm:.2e}")
    assert err_unipc == 0.0 and torch.equal(unipc.timesteps, flow_timesteps(steps, shift))
    assert err_dpm <= 1.2e-7  # one float32 ulp below 1


@pytest.mark.parametrize("steps,shift", GRID)
def test_unipc_matches_wan22(steps, shift):
    sched = _wan22_unipc(steps, shift)
    err = _max_err(_reference_trajectory(sched, sched.sigmas), _our_trajectory(flow_sigmas(steps, shift), "unipc"))
    print(f"unipc vs wan22 FlowUniPCMultistepScheduler steps={steps} shift={shift}: max abs err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("steps,shift", GRID)
def test_unipc_matches_wan22_float64_sigmas(steps, shift):
    """With float64 sigmas the reference's maths is float64 too: the algorithms agree exactly."""
    sched = _wan22_unipc(steps, shift)
    sched.sigmas = sched.sigmas.double()
    err = _max_err(_reference_trajectory(sched, sched.sigmas), _our_trajectory(sched.sigmas, "unipc"))
    print(f"unipc vs wan22 (float64 sigmas) steps={steps} shift={shift}: max abs err {err:.2e}")
    assert err < 1e-12


@pytest.mark.parametrize("steps,shift", GRID)
def test_unipc_matches_diffusers(steps, shift):
    sched = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    sched.set_timesteps(sigmas=_base_sigmas(steps))  # its default grid starts at 1 - 1e-6, not 0.999
    err = _max_err(_reference_trajectory(sched, sched.sigmas), _our_trajectory(flow_sigmas(steps, shift), "unipc"))
    print(f"unipc vs diffusers UniPCMultistepScheduler steps={steps} shift={shift}: max abs err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("steps,shift", GRID)
def test_dpmpp_2m_matches_wan22(steps, shift):
    sched = _wan22_dpm(steps, shift)
    ours = _our_trajectory(flow_sigmas(steps, shift, sigma_max=1.0), "dpm++_2m")
    err = _max_err(_reference_trajectory(sched, sched.sigmas), ours)
    print(f"dpm++_2m vs wan22 FlowDPMSolverMultistepScheduler steps={steps} shift={shift}: max abs err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("steps,shift", GRID)
def test_dpmpp_2m_matches_diffusers(steps, shift):
    sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                        prediction_type="flow_prediction", flow_shift=shift)
    sched.set_timesteps(steps)
    err = _max_err(_reference_trajectory(sched, sched.sigmas), _our_trajectory(sched.sigmas, "dpm++_2m"))
    print(f"dpm++_2m vs diffusers DPMSolverMultistepScheduler steps={steps} shift={shift}: max abs err {err:.2e}")
    assert err < TOL


@pytest.mark.parametrize("steps,shift", GRID)
def test_euler_matches_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=_base_sigmas(steps))  # it shifts in float32: sigmas within one ulp of ours
    err = _max_err(_reference_trajectory(sched, sched.sigmas), _our_trajectory(sched.sigmas, "euler"))
    sigma_err = (sched.sigmas - flow_sigmas(steps, shift)).abs().max().item()
    print(f"euler vs diffusers FlowMatchEulerDiscreteScheduler steps={steps} shift={shift}: "
          f"max abs err {err:.2e} (sigma err {sigma_err:.1e})")
    assert sigma_err <= 1.2e-7
    assert err < TOL
