"""The sampling loop: one KSamplerAdvanced-style pass over a flow-matching schedule.

A pass runs steps ``start_step .. end_step - 1`` of a schedule. Noise and leftover noise
follow ComfyUI's flow-model convention (``comfy.model_sampling.CONST``), so a latent with
leftover noise can travel between our nodes and ComfyUI's samplers alike:

- the input is mixed at ``s = sigmas[start_step]`` as ``x = s * noise + (1 - s) * latent``;
  without ``add_noise`` the noise is zero, so ``x = (1 - s) * latent``;
- the output at the pass's final sigma ``e`` is ``x / (1 - e)`` (identity at ``e = 0``),
  which the ``(1 - s)`` above undoes when the next pass starts there;
- ending early without ``return_with_leftover_noise`` is ComfyUI's ``force_full_denoise``:
  the schedule is cut after ``end_step`` and its last sigma replaced by 0, so the final
  step goes from ``sigmas[end_step - 1]`` all the way to a clean latent.

Pass A (``0..k``, leftover noise) then pass B (``k..N``, no noise, A's ``solver_state``)
equals one pass ``0..N`` to rounding, multistep history included.

The loop works in the model's latent space; converting ComfyUI ``LATENT`` values to and from
it (Wan's latent mean/std) is the caller's job, as ComfyUI's ``process_latent_in/out`` is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .schedulers import make_solver

Denoise = Callable[[Tensor, float, int], Tensor]
"""``denoise(x, sigma, step_index) -> velocity`` (guidance and expert choice included)."""
Callback = Callable[[int, int, Tensor, Tensor], None]
"""``callback(step_index, total_steps, x, x0_prediction)``; raise from it to cancel."""


@dataclass
class SampleResult:
    """The pass's latent and the solver memory a following pass continues from."""

    latent: Tensor
    solver_state: dict[str, Tensor] = field(default_factory=dict)


def seeded_noise(seed: int, shape: Sequence[int]) -> Tensor:
    """Standard normal noise for ``seed``: float32 from a CPU generator, so the same seed
    gives the same video on every device (and the same noise as ComfyUI's ``prepare_noise``)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def sample(
    denoise: Denoise,
    latent: Tensor,
    sigmas: Tensor,
    solver_name: str,
    start_step: int = 0,
    end_step: int | None = None,
    noise: Tensor | None = None,
    add_noise: bool = True,
    return_with_leftover_noise: bool = False,
    solver_state: Mapping[str, Tensor] | None = None,
    callback: Callback | None = None,
) -> SampleResult:
    """Run steps ``start_step .. end_step - 1`` of ``sigmas`` (``[steps + 1]``, ending in 0).

    ``denoise`` is called once per step with the current sample, its sigma and the step's
    index in the full schedule. ``callback`` gets that index, the schedule's step count, the
    sample and its x0 prediction. ``solver_state`` (from a previous pass's result) must
    belong to the same solver and end at ``sigmas[start_step]``.
    """
    steps = len(sigmas) - 1
    end = steps if end_step is None else min(end_step, steps)
    if start_step >= end:  # nothing to run: ComfyUI hands the latent back untouched
        return SampleResult(latent, dict(solver_state or {}))
    schedule = sigmas
    if end < steps and not return_with_leftover_noise:  # ComfyUI's force_full_denoise
        schedule = torch.cat([sigmas[:end], sigmas.new_zeros(1)])
    solver = make_solver(solver_name, schedule)
    start_sigma = float(schedule[start_step])
    if solver_state:
        solver.load_state_dict({k: v.to(latent.device) for k, v in solver_state.items()})
        if solver.sigma is not None and abs(solver.sigma - start_sigma) > 1e-6:
            raise ValueError(
                f"solver_state ends at sigma {solver.sigma:.6f} but this pass starts at "
                f"sigma {start_sigma:.6f} (step {start_step}): the schedules differ")

    if add_noise:
        if noise is None:
            raise ValueError("add_noise needs a noise tensor (see seeded_noise)")
        x = start_sigma * noise.to(latent) + (1 - start_sigma) * latent
    else:
        x = (1 - start_sigma) * latent

    for i in range(start_step, end):
        sigma = float(schedule[i])
        velocity = denoise(x, sigma, i)
        if callback is not None:
            callback(i, steps, x, x - sigma * velocity)
        x = solver.step(velocity, i, x)
    return SampleResult(x / (1 - float(schedule[end])), solver.state_dict())
