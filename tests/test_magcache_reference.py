"""MagCache decides what the authors' code decides, call by call, on a tiny Wan DiT.

The oracle below is our own transcription of the decision logic of Zehong-Ma/MagCache
(commit df81cb1), read, not copied:

- MagCache4Wan2.2/magcache_generate.py, ``magcache_forward`` lines 290-337 (which calls use
  the cache: the ``split_step`` rules for i2v / t2v, the plain rule otherwise; the per-branch
  accumulators indexed ``cnt % 2``; the reset only in the computing ``else``; the residual
  stored on every call; everything cleared when ``cnt`` reaches ``num_steps``) and
  ``init_magcache`` lines 340-363 (``num_steps = 2 * steps``, ``split_step = 2 * high-noise
  steps``, ratios padded with ``[1.0] * 2`` and resampled per branch by ``nearest_interp``,
  lines 30-37). Every attribute is set on ``model.__class__``, which both A14B experts share:
  one state spans the expert switch. (Its ti2v call passes ``split_steps=None`` into
  ``split_steps * 2`` and would raise; the forward's ``else`` is the plain rule, used here.)
- MagCache4Wan2.1/magcache_generate.py, ``magcache_forward`` lines 277-311 (the plain rule:
  ``cnt >= int(num_steps * retention_ratio)``) with its set-up at lines 895-918.

Official Wan calls the model for cond, then uncond, every step (``cnt = 2 * step + row``).
Our cache runs the same tiny model through ``make_denoiser`` with CFG batched and one branch
at a time, as two chained passes (the state handed on as the LATENT carries it), and must
skip the same (step, branch) calls with the same outputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wanfit.optim.step_cache import MAGCACHE_RATIOS, Calibrate, MagCache, StepCache
from wanfit.wan.denoise import Conditioning, make_denoiser
from wanfit.wan.model import WanConfig, WanModel
from wanfit.wan.sampling import sample, seeded_noise
from wanfit.wan.schedulers import boundary_step, flow_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")


class ReferenceMagCache:
    """The reference's per-call decision, transcribed (see the module docstring). One instance
    is the model class's state: one object for both experts and both passes."""

    def __init__(self, published: list[float], steps: int, thresh: float, k: int, retention: float,
                 high_noise_steps: int | None = None, mode: str = "t2v", reset_on_every_compute: bool = False):
        self.num_steps, self.thresh, self.k, self.retention, self.mode = 2 * steps, thresh, k, retention, mode
        self.split = None if high_noise_steps is None else 2 * high_noise_steps
        ratios = np.array([1.0] * 2 + list(published))
        if len(ratios) != 2 * steps:  # nearest interpolation per branch, then interleaved again
            def interp(src):
                if steps == 1:
                    return np.array([src[-1]])
                return src[np.round(np.arange(steps) * ((len(src) - 1) / (steps - 1))).astype(int)]
            ratios = np.stack([interp(ratios[0::2]), interp(ratios[1::2])], axis=1).reshape(-1)
        self.ratios = ratios
        self.reset_on_every_compute = reset_on_every_compute  # what the pack did before: the test can fail
        self.clear()
        self.residual = [None, None]
        self.skipped: list[tuple[int, int]] = []  # (step, row)

    def clear(self) -> None:
        self.cnt, self.acc_ratio, self.acc_err, self.acc_steps = 0, [1.0, 1.0], [0.0, 0.0], [0, 0]

    def uses_cache(self) -> bool:
        cnt = self.cnt
        if self.split is None:
            return not cnt < int(self.num_steps * self.retention)
        if self.mode == "i2v":
            return not cnt < int(self.split + (self.num_steps - self.split) * self.retention)
        return not (cnt < int(self.split * self.retention)
                    or self.split <= cnt <= (self.num_steps - self.split) * self.retention + self.split)

    def __call__(self, x: torch.Tensor, blocks) -> torch.Tensor:
        b = self.cnt % 2
        skip = False
        if self.uses_cache():
            self.acc_ratio[b] = self.acc_ratio[b] * self.ratios[self.cnt]
            self.acc_steps[b] += 1
            self.acc_err[b] += np.abs(1 - self.acc_ratio[b])
            if self.acc_err[b] < self.thresh and self.acc_steps[b] <= self.k:
                skip = True
            else:
                self.acc_err[b], self.acc_steps[b], self.acc_ratio[b] = 0, 0, 1.0
        if skip:
            out = x + self.residual[b]
            self.skipped.append((self.cnt // 2, b))
        else:
            out = blocks(x)
            self.residual[b] = out - x
            if self.reset_on_every_compute:
                self.acc_err[b], self.acc_steps[b], self.acc_ratio[b] = 0, 0, 1.0
        self.cnt += 1
        if self.cnt >= self.num_steps:
            self.clear()
        return out


def _tiny(seed: int) -> WanModel:
    torch.manual_seed(seed)
    config = WanConfig("t2v", dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32)
    return WanModel(config).eval()


COND = Conditioning(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1)))
UNCOND = Conditioning(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2)))
SHAPE = (1, 16, 2, 4, 4)


def _blocks(model):
    return lambda state, call: model.run_blocks(state)


def _oracle_hook(model, oracle: ReferenceMagCache):
    def run(state, call):
        assert len(call.branches) == 1  # the reference sees one branch per call
        state.x = oracle(state.x, lambda x: model.run_blocks(_with_x(state, x)).x)
        return state
    return run


def _with_x(state, x):
    state.x = x
    return state


def _two_passes(models, split: int, steps: int, shift: float, hook, batch_cfg: bool):
    """Pass 1 (steps 0..split, the first model) with leftover noise, pass 2 (split..steps, the
    second model) continuing from its latent and solver state; ``hook(model, pass)`` gives each
    pass's run_blocks."""
    sigmas = flow_sigmas(steps, shift)
    noise = seeded_noise(3, SHAPE)
    with torch.no_grad():
        a = sample(make_denoiser(models[0], COND, UNCOND, 5.0, batch_cfg=batch_cfg, run_blocks=hook(models[0], 0)),
                   torch.zeros(SHAPE), sigmas, "unipc", end_step=split, noise=noise, return_with_leftover_noise=True)
        b = sample(make_denoiser(models[1], COND, UNCOND, 5.0, batch_cfg=batch_cfg, run_blocks=hook(models[1], 1)),
                   a.latent, sigmas, "unipc", start_step=split, noise=None, add_noise=False,
                   solver_state=a.solver_state)
    return b.latent


def _ours(models, policy: MagCache, split: int, steps: int, shift: float, batch_cfg: bool):
    caches = [StepCache(policy, steps, split=split), StepCache(policy, steps, split=split)]

    def hook(model, which):
        if which == 1:  # a second Sampler node: the state arrives through the LATENT
            caches[1].load_state_dict(caches[0].state_dict())
        return caches[which].wrap(_blocks(model), "high" if model is models[0] and models[0] is not models[1]
                                  else "low" if model is models[1] and models[0] is not models[1] else "m")

    latent = _two_passes(models, split, steps, shift, hook, batch_cfg)
    report = caches[1].report()["branches"]
    skipped = sorted((s, row) for row, b in enumerate(("cond", "uncond")) for s in report[b]["skipped"])
    return latent, skipped


def _reference(models, published, steps, shift, thresh, k, retention, split, rule, **kw):
    mode = {"i2v_experts": "i2v", "t2v_experts": "t2v"}.get(rule)
    oracle = ReferenceMagCache(published, steps, thresh, k, retention, split if mode else None, mode or "t2v", **kw)
    latent = _two_passes(models, split, steps, shift, lambda model, which: _oracle_hook(model, oracle), False)
    return latent, sorted(oracle.skipped)


# (published set, steps, shift, boundary or None for one model run as two passes, thresh, K, retention)
CASES = [
    ("wan2.1_t2v_1.3B", 20, 5.0, None, 0.12, 4, 0.2),  # 50 calibrated steps resampled to 20
    ("wan2.1_t2v_14B", 30, 5.0, None, 0.24, 6, 0.2),
    ("wan2.2_t2v_A14B", 40, 12.0, 0.875, 0.06, 2, 0.4),  # the published 40-step calibration
    ("wan2.2_t2v_A14B", 20, 12.0, 0.875, 0.06, 2, 0.4),  # the recommended settings at 20 steps
    ("wan2.2_i2v_A14B", 40, 5.0, 0.900, 0.06, 2, 0.1),
    ("wan2.2_i2v_A14B", 20, 5.0, 0.900, 0.2, 3, 0.3),
    ("wan2.2_ti2v_5B_t2v", 50, 5.0, None, 0.06, 2, 0.2),
]


@pytest.mark.parametrize("preset, steps, shift, boundary, thresh, k, retention", CASES,
                         ids=[f"{c[0]}-{c[1]}steps-K{c[5]}" for c in CASES])
def test_decisions_and_outputs_equal_the_reference(preset, steps, shift, boundary, thresh, k, retention):
    experts = boundary is not None
    models = (_tiny(0), _tiny(1)) if experts else (_tiny(0),) * 2
    split = boundary_step(flow_sigmas(steps, shift), boundary) if experts else steps // 3
    policy = MagCache.published(preset, steps, threshold=thresh, skip_limit=k, retention=retention)
    assert policy.rule == {"wan2.2_t2v_A14B": "t2v_experts", "wan2.2_i2v_A14B": "i2v_experts"}.get(preset, "plain")
    published = list(MAGCACHE_RATIOS[preset][2:])  # the authors' list, without the padding they add
    want_latent, want = _reference(models, published, steps, shift, thresh, k, retention, split, policy.rule)
    assert want, "settings where the reference skips nothing test nothing"
    for batch_cfg in (False, True):
        latent, got = _ours(models, policy, split, steps, shift, batch_cfg)
        assert got == want, f"batch_cfg={batch_cfg}"
        if batch_cfg:  # a batch of two runs other matmul shapes than the reference's single calls
            torch.testing.assert_close(latent, want_latent, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(latent, want_latent)


def test_the_tiny_models_own_calibration_two_experts():
    """Ratios calibrated on the tiny two-expert job itself (WanFit Cache Calibrate), fed to both
    the reference and ours: the decisions follow the measured magnitudes."""
    models, steps, shift = (_tiny(0), _tiny(1)), 16, 5.0
    split = boundary_step(flow_sigmas(steps, shift), 0.9)
    recorders = [StepCache(Calibrate(), steps, split=split), StepCache(Calibrate(), steps, split=split)]

    def record(model, which):
        if which == 1:
            recorders[1].load_state_dict(recorders[0].state_dict())
        return recorders[which].wrap(_blocks(model), ("high", "low")[which])

    _two_passes(models, split, steps, shift, record, True)
    ratios = recorders[1].calibration("tiny").mag_ratios
    assert ratios[:2] == [1.0, 1.0] and len(set(ratios)) > 10
    thresh = 3 * float(np.median(np.abs(1 - np.array(ratios))))  # skips a fair share of these ratios
    for rule in ("i2v_experts", "t2v_experts"):
        from wanfit.optim.step_cache import ratios_for_steps
        policy = MagCache(ratios_for_steps(ratios, steps), thresh, 3, 0.2, rule, "calibration tiny")
        want_latent, want = _reference(models, ratios[2:], steps, shift, thresh, 3, 0.2, split, rule)
        assert want, rule
        latent, got = _ours(models, policy, split, steps, shift, False)
        assert got == want and torch.equal(latent, want_latent), rule


def test_the_oracle_tells_the_old_reset_from_the_reference():
    """The accumulators left untouched inside a retention window matter: resetting them on
    every computed call (what the pack did before) skips other calls with the recommended
    T2V-A14B settings at 20 steps, so the comparison above can fail."""
    steps, shift = 20, 12.0
    split = boundary_step(flow_sigmas(steps, shift), 0.875)
    published = list(MAGCACHE_RATIOS["wan2.2_t2v_A14B"][2:])
    models = (_tiny(0), _tiny(1))
    _, reference = _reference(models, published, steps, shift, 0.06, 2, 0.4, split, "t2v_experts")
    _, reset = _reference(models, published, steps, shift, 0.06, 2, 0.4, split, "t2v_experts",
                          reset_on_every_compute=True)
    assert reference != reset
