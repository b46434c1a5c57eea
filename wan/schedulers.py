"""Flow-matching noise schedules and ODE solvers, as the official Wan code samples.

A flow-matching sample at noise level sigma is ``x = (1 - sigma) * x0 + sigma * noise``;
sigma runs from ~1 (pure noise) down to 0. The Wan DiT predicts the velocity
``v = noise - x0``, so ``x0 = x - sigma * v``.

Each solver moves a sample one step along a schedule and remembers what a multistep method
needs (earlier x0 predictions, UniPC's pre-step sample). ``state_dict()`` exports that memory
as plain tensors: a two-pass Wan 2.2 job hands it from the high-noise expert's node to the
low-noise expert's node, and the two passes then equal one pass that switched experts.

Coefficients are computed in float64 from the schedule's values; the references do the same
maths in float32 tensors.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
# Official sigma_max: the first of the 1000 training sigmas, 1 - 1/1000, held in float32.
SIGMA_MAX = float(torch.tensor(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32))
MAX_STEPS = 10000  # a schedule is built in one go before sampling: bounded, so it takes milliseconds


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")


def _shifted_sigmas(steps: int, shift: float, sigma_max: float, sigma_min: float) -> Tensor:
    """The official float64 sigmas before the final zero (FlowUniPCMultistepScheduler.set_timesteps)."""
    _check_steps(steps)
    # np.linspace's arithmetic (start + i * step), so the float32 cast is bit-identical.
    sigmas = torch.arange(steps, dtype=torch.float64) * ((sigma_min - sigma_max) / steps) + sigma_max
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, shift: float, sigma_max: float = SIGMA_MAX, sigma_min: float = 0.0) -> Tensor:
    """Float32 sigmas ``[steps + 1]`` of the official Wan sampler, ending in 0.

    ``linspace(sigma_max, sigma_min, steps + 1)`` without its last value, shifted by
    ``shift * s / (1 + (shift - 1) * s)``, then 0 appended; bit-identical to
    ``FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift).sigmas``. The official
    "dpm++" path (``get_sampling_sigmas``) starts at ``sigma_max=1.0`` instead.
    """
    sigmas = _shifted_sigmas(steps, shift, sigma_max, sigma_min)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def flow_timesteps(steps: int, shift: float, sigma_max: float = SIGMA_MAX, sigma_min: float = 0.0) -> Tensor:
    """The official int64 timesteps ``[steps]`` fed to the DiT: ``int(sigma * 1000)`` in float64."""
    return (_shifted_sigmas(steps, shift, sigma_max, sigma_min) * NUM_TRAIN_TIMESTEPS).to(torch.int64)


def simple_sigmas(steps: int, shift: float, timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Float32 sigmas ``[steps + 1]`` of ComfyUI's ``simple`` scheduler on a Wan model patched
    by ModelSamplingSD3 (``ModelSamplingDiscreteFlow``, multiplier 1000), ending in 0.

    That model's table holds ``shift * t / (1 + (shift - 1) * t)`` at ``t = i / 1000``,
    ``i = 1 .. 1000``; ``simple`` walks it from the top in strides of ``1000 / steps``
    (entry ``-(1 + int(x * 1000 / steps))`` for step ``x``). So it starts at exactly 1 where
    the official Wan schedule starts at 0.999; the lightx2v 4-step LoRAs were distilled on it.
    """
    _check_steps(steps)
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    table = t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    # x * stride in float64 and truncated, as ComfyUI's int(x * ss) per step
    picks = table[timesteps - 1 - (torch.arange(steps, dtype=torch.float64) * (timesteps / steps)).long()]
    return torch.cat([picks, picks.new_zeros(1)]).to(torch.float32)


SCHEDULES = ("wan", "simple")


def schedule_sigmas(schedule: str, steps: int, shift: float) -> Tensor:
    """The sigmas of a named schedule: "wan" (``flow_sigmas``, the official sampler's) or
    "simple" (``simple_sigmas``, ComfyUI's ``simple`` with ModelSamplingSD3)."""
    if schedule == "wan":
        return flow_sigmas(steps, shift)
    if schedule == "simple":
        return simple_sigmas(steps, shift)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def boundary_step(sigmas: Tensor, boundary: float) -> int:
    """First step whose timestep ``sigma * 1000`` falls below ``boundary * 1000``.

    Official Wan 2.2 runs the high-noise expert while ``t >= boundary * num_train_timesteps``
    (boundary 0.900 for i2v, 0.875 for t2v), so steps ``[0, k)`` are high-noise and ``[k, N)``
    low-noise. Returns ``N`` when every step is high-noise. The official ``t`` is truncated
    to an integer, which changes nothing for boundaries on whole thousandths.
    """
    timesteps = sigmas[:-1].double() * NUM_TRAIN_TIMESTEPS
    low = torch.nonzero(timesteps < boundary * NUM_TRAIN_TIMESTEPS)
    return int(low[0]) if len(low) else len(timesteps)


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; +-inf at the ends of the schedule."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log1p(-sigma) - math.log(sigma)


class FlowSolver:
    """Base class: ``step(v, i, x)`` moves ``x`` from ``sigmas[i]`` to ``sigmas[i + 1]``."""

    name = ""
    history_len = 0  # earlier x0 predictions a step needs

    def __init__(self, sigmas: Tensor | Sequence[float]) -> None:
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1
        self.history: list[tuple[float, Tensor]] = []  # (sigma, x0), oldest first
        self.sigma: float | None = None  # noise level of the last sample returned

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        """Advance ``sample`` (at ``sigmas[step_index]``) given the model's velocity there."""
        raise NotImplementedError

    def _remember(self, step_index: int, x0: Tensor | None = None) -> None:
        """Record a finished step: its x0 prediction (if kept) and the new noise level."""
        if self.history_len:
            self.history = (self.history + [(self.sigmas[step_index], x0)])[-self.history_len:]
        self.sigma = self.sigmas[step_index + 1]

    def state_dict(self) -> dict[str, Tensor]:
        """The solver's memory as plain tensors, keys prefixed with the solver's name."""
        p = self.name + "."
        state = {}
        if self.sigma is not None:
            state[p + "sigma"] = torch.tensor(self.sigma, dtype=torch.float64)
        if self.history:
            state[p + "x0"] = torch.stack([x0 for _, x0 in self.history])
            state[p + "x0_sigma"] = torch.tensor([s for s, _ in self.history], dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Continue from ``state_dict()`` of a solver of the same kind."""
        p = self.name + "."
        foreign = sorted({k.split(".")[0] for k in state if not k.startswith(p)})
        if foreign:
            raise ValueError(f"solver state from {', '.join(foreign)} cannot continue a {self.name!r} solver")
        self.sigma = float(state[p + "sigma"]) if p + "sigma" in state else None
        self.history = []
        if p + "x0" in state:
            self.history = list(zip(state[p + "x0_sigma"].tolist(), state[p + "x0"].unbind(0)))


class EulerSolver(FlowSolver):
    """First-order Euler on the flow ODE ``dx/dsigma = v`` (diffusers FlowMatchEulerDiscreteScheduler)."""

    name = "euler"

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        s, t = self.sigmas[step_index], self.sigmas[step_index + 1]
        self._remember(step_index)
        return sample + (t - s) * model_output


class DPMPP2MSolver(FlowSolver):
    """DPM-Solver++ 2M (midpoint) on flow sigmas, as wan22's FlowDPMSolverMultistepScheduler
    and diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2):
    first order on the first step (no history) and on the schedule's last step (to sigma 0)."""

    name = "dpm++_2m"
    history_len = 1

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        s, t = self.sigmas[step_index], self.sigmas[step_index + 1]
        x0 = sample - s * model_output
        h = _log_snr(t) - _log_snr(s)
        d = x0
        if self.history and step_index < self.steps - 1:
            s1, x0_prev = self.history[-1]
            r = (_log_snr(s) - _log_snr(s1)) / h
            d = x0 + (0.5 / r) * (x0 - x0_prev)
        self._remember(step_index, x0)
        return (t / s) * sample - ((1 - t) * math.expm1(-h)) * d


class UniPCSolver(FlowSolver):
    """UniPC-bh2, order 2, predicting x0, as wan22's FlowUniPCMultistepScheduler (the official
    default): the UniC corrector refines each incoming sample with the new model output
    before the UniP predictor steps on; order 1 on the first and last steps."""

    name = "unipc"
    history_len = 2  # the order-2 corrector looks two x0 predictions back

    def __init__(self, sigmas: Tensor | Sequence[float]) -> None:
        super().__init__(sigmas)
        self.last_sample: Tensor | None = None  # corrected sample the last predictor started from

    def step(self, model_output: Tensor, step_index: int, sample: Tensor) -> Tensor:
        s = self.sigmas[step_index]
        x0 = sample - s * model_output  # from the uncorrected sample, as the reference does
        if self.last_sample is not None:
            sample = self._correct(x0, s)
        order = min(2, self.steps - step_index, len(self.history) + 1)
        self.last_sample = sample
        t = self.sigmas[step_index + 1]
        h = _log_snr(t) - _log_snr(s)
        phi = math.expm1(-h)  # h*phi_1(-h), also B(h) for bh2
        out = (t / s) * sample - ((1 - t) * phi) * x0
        if order == 2:
            s1, x0_prev = self.history[-1]
            rk = (_log_snr(s1) - _log_snr(s)) / h
            out = out - ((1 - t) * phi * 0.5 / rk) * (x0_prev - x0)
        self._remember(step_index, x0)
        return out

    def _correct(self, x0: Tensor, t: float) -> Tensor:
        """UniC: redo the last step from ``last_sample`` with the new x0 prediction at ``t``."""
        s0, m0 = self.history[-1]
        h = _log_snr(t) - _log_snr(s0)
        hh = -h
        phi = math.expm1(hh)  # also B(h) for bh2
        out = (t / s0) * self.last_sample - ((1 - t) * phi) * m0
        if len(self.history) == 1:  # the last predictor was order 1
            return out - ((1 - t) * phi * 0.5) * (x0 - m0)
        s1, m1 = self.history[-2]
        rk = (_log_snr(s1) - _log_snr(s0)) / h
        phi_k = phi / hh - 1
        b1 = phi_k / phi
        b2 = 2 * (phi_k / hh - 0.5) / phi
        # rho solves [[1, 1], [rk, 1]] @ rho = [b1, b2]
        rho0 = (b1 - b2) / (1 - rk)
        rho1 = b1 - rho0
        return out - ((1 - t) * phi) * ((rho0 / rk) * (m1 - m0) + rho1 * (x0 - m0))

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        if self.last_sample is not None:
            state[self.name + ".last_sample"] = self.last_sample.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.last_sample = state.get(self.name + ".last_sample")


SOLVERS = ("euler", "unipc", "dpm++_2m")
_SOLVER_CLASSES = {cls.name: cls for cls in (EulerSolver, UniPCSolver, DPMPP2MSolver)}


def make_solver(name: str, sigmas: Tensor | Sequence[float]) -> FlowSolver:
    """A fresh solver ``name`` (one of ``SOLVERS``) over the schedule ``sigmas``."""
    if name not in _SOLVER_CLASSES:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return _SOLVER_CLASSES[name](sigmas)
