"""Step caches: TeaCache, MagCache and EasyCache behind one hook, plus their calibration.

A :class:`StepCache` wraps the denoiser's ``run_blocks(state, call)`` (``wan/denoise.py``).
Per step and per branch (cond / uncond, and per context window) its policy decides whether
the block stack runs. A skipped call adds the residual stored at that branch's last
computed call (the blocks' output minus their input) to the tokens entering the blocks.
Block swap, fp8 and LoRA live inside the wrapped ``run_blocks`` and are untouched::

    policy = MagCache.published("wan2.1_t2v_14B", steps=20)
    cache = StepCache(policy, steps=20)
    denoise = make_denoiser(model, pos, neg, cfg, run_blocks=cache.wrap(prepared.run_blocks, model="t2v-14B"))
    sample(denoise, ...)
    log.info(cache.line())

State is kept per ``(branch, window)`` and indexed by ``DiTCall.step``, the step's place in
the whole schedule, so the second pass of a two-pass job continues the first pass's
schedule (reuse the object, or hand ``state_dict()`` to a new one). A different model (the
other A14B expert) invalidates what TeaCache and EasyCache stored: its first call computes,
because one expert's residual says nothing about the other's. MagCache's A14B rules keep
their state across the switch, as the reference does (its retention window computes the
low-noise expert's first calls).

With batched CFG the rows decide separately, as the authors' code decides for its separate
cond and uncond calls: a row that may reuse its residual does, and only the rows that must
compute run the blocks (a batch of one when the other reuses). Each branch only ever reads
its own residual.

The rules follow the authors' code (constants in ``step_cache_constants.json``; ``cnt``
below counts calls as theirs do, cond and uncond interleaved: ``cnt = 2 * step + row``):

- TeaCache (ali-vilab/TeaCache, TeaCache4Wan2.1): per branch, add ``poly(rel_l1)`` of the
  modulated timestep input (mode ``e``: the time embedding; ``e0``: its 6-way projection)
  between consecutive steps; reuse while the sum stays below the threshold, restart it after
  a computed step. Mode ``e`` computes the first step and the last; ``e0`` the first 5.
- MagCache (Zehong-Ma/MagCache, MagCache4Wan2.1 / 2.2): per branch multiply the calibrated
  residual magnitude ratios of the steps since the last computed one, add ``|1 - product|``
  to the error; reuse while the error stays below the threshold and at most K calls in a
  row; the first ``retention * 2 * steps`` calls compute. Wan 2.2 A14B: the ratios span both
  experts; t2v also computes the first ``retention`` share of the low-noise expert's calls,
  i2v computes the whole high-noise expert and that share. As in the reference, the
  accumulators restart only when a call outside the retention windows computes (a computed
  call inside a window leaves them as they were), and the whole state (accumulators and
  residuals) carries over the expert switch: the reference keeps it on the model class,
  which both experts share.
- EasyCache (H-EmbodVis/EasyCache, EasyCache4Wan2.1): runtime-adaptive. The cond branch
  decides for its pair: ``k`` (output change over input change between its last two
  computed calls) times the input's change since the previous step over the last computed
  output's mean magnitude, accumulated; reuse while below the threshold. The first
  ``warmup`` steps and the last compute.

Where ours differs from the authors' code, on purpose: a threshold of 0 never skips (their
TeaCache skips at 0 when its polynomial goes negative); EasyCache and the TeaCache
calibration measure the block stack's input and output (the hook we have), not the model's
latent in and out.

Calibration (:class:`Calibrate`) computes every call and records, per branch and step, the
residual magnitude ratio (MagCache's ``mag_ratios``) and the relative change of the
modulated input against that of the block output (TeaCache's curve, fitted with numpy).

Memory: each branch keeps one float32 residual ``[1, L, dim]`` on the storage device
(``storage``: the compute device, or e.g. the CPU); EasyCache's cond branch also keeps two
input-token tensors in the compute dtype, calibration one per branch. See
:meth:`StepCache.held_bytes_for`; under a fake-tensor trace the wrapper computes and stores
what a computed call stores, so a trace of the wrapped ``run_blocks`` sees those bytes.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..wan.denoise import DiTCall, RunBlocks
from ..wan.detect import variant_name
from ..wan.model import PRESETS, WanConfig, WanState

CONSTANTS: dict = json.loads(Path(__file__).with_name("step_cache_constants.json").read_text())
SHORT_SCHEDULE = 8  # steps; caches fail on distilled schedules this short (see README)
AUTO = -1.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,63}$")

# --- published constants, by model family ---------------------------------------------------

_TEA = CONSTANTS["teacache"]["coefficients"]
TEACACHE_COEFFICIENTS: dict[str, dict[str, tuple[float, ...]]] = {
    f"wan2.1_{k}": {mode: tuple(v) for mode, v in modes.items()} for k, modes in _TEA.items()}
# The README's first ("slow") column per mode (published A800 tables, TeaCache4Wan2.1).
TEACACHE_THRESHOLDS = {
    "wan2.1_t2v_1.3B": {"e": 0.05, "e0": 0.05},
    "wan2.1_t2v_14B": {"e": 0.14, "e0": 0.10},
    "wan2.1_i2v_14B_480p": {"e": 0.13, "e0": 0.20},
    "wan2.1_i2v_14B_720p": {"e": 0.20, "e0": 0.20},
}
# The README: use_ret_steps (e0) is faster and better "except for t2v-1.3B".
TEACACHE_DEFAULT_MODE = {"wan2.1_t2v_1.3B": "e"}
TEACACHE_WARMUP = {"e": 1, "e0": 5}

_MAG21, _MAG22 = CONSTANTS["magcache"]["wan2.1"], CONSTANTS["magcache"]["wan2.2"]
MAGCACHE_RATIOS: dict[str, tuple[float, ...]] = {
    **{f"wan2.1_{k}": tuple(_MAG21[k]) for k in ("t2v_1.3B", "t2v_14B", "i2v_14B_480p", "i2v_14B_720p")},
    **{f"wan2.2_{k}": tuple(_MAG22[k]) for k in ("t2v_A14B", "i2v_A14B", "ti2v_5B_t2v", "ti2v_5B_i2v")},
}
MAGCACHE_RULES = {"wan2.2_t2v_A14B": "t2v_experts", "wan2.2_i2v_A14B": "i2v_experts"}


def _mag_recommended(preset: str) -> dict:
    table = {"wan2.1_t2v_1.3B": _MAG21["recommended"]["t2v_1.3B"], "wan2.1_t2v_14B": _MAG21["recommended"]["t2v_14B"],
             "wan2.1_i2v_14B_480p": _MAG21["recommended"]["i2v_14B"],
             "wan2.1_i2v_14B_720p": _MAG21["recommended"]["i2v_14B"],
             "wan2.2_t2v_A14B": _MAG22["recommended"]["t2v_A14B"], "wan2.2_i2v_A14B": _MAG22["recommended"]["i2v_A14B"],
             "wan2.2_ti2v_5B_t2v": _MAG22["recommended"]["ti2v_5B"],
             "wan2.2_ti2v_5B_i2v": _MAG22["recommended"]["ti2v_5B"]}
    return table[preset]


EASYCACHE_THRESHOLD = CONSTANTS["easycache"]["defaults"]["thresh"]
EASYCACHE_WARMUP = CONSTANTS["easycache"]["defaults"]["ret_steps"]  # of a 50-step schedule


def easycache_warmup(steps: int) -> int:
    """The published 10 warm-up steps of a 50-step schedule, scaled to ``steps`` (at least 1)."""
    return max(1, round(EASYCACHE_WARMUP * steps / 50))


def nearest_interp(values: Sequence[float], length: int) -> np.ndarray:
    """Nearest-neighbour resampling to ``length`` points, the MagCache authors' way: index
    ``round(i * (n - 1) / (length - 1))`` (numpy's round-half-to-even); one point: the last."""
    src = np.asarray(values, dtype=np.float64)
    if length < 1 or len(src) < 1:
        raise ValueError(f"cannot resample {len(src)} values to {length}")
    if length == 1:
        return src[-1:]
    scale = (len(src) - 1) / (length - 1)
    return src[np.round(np.arange(length) * scale).astype(int)]


def ratios_for_steps(interleaved: Sequence[float], steps: int) -> tuple[tuple[float, float], ...]:
    """Interleaved ``[cond, uncond, cond, ...]`` magnitude ratios -> ``(cond, uncond)`` per step
    of a ``steps``-step schedule, each branch resampled on its own (as the reference does)."""
    values = np.asarray(interleaved, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2 or len(values) % 2:
        raise ValueError(f"magnitude ratios must be an even-length list [cond, uncond, ...], got {len(values)}")
    cond, uncond = values[0::2], values[1::2]
    if len(cond) != steps:
        cond, uncond = nearest_interp(cond, steps), nearest_interp(uncond, steps)
    return tuple((float(c), float(u)) for c, u in zip(cond, uncond))


# --- which published constants fit a model --------------------------------------------------

_T2V_14B_TWINS = {"Wan2.1 T2V 14B", "Wan2.2 T2V-A14B expert"}
_FAMILY = {"Wan2.1 T2V 1.3B": "wan2.1_t2v_1.3B", "Wan2.1 FLF2V 14B": "wan2.1_flf2v_14B",
           "Wan2.2 I2V-A14B expert": "wan2.2_i2v_A14B", "Wan2.2 TI2V-5B": "wan2.2_ti2v_5B"}
_AREA_480P, _AREA_720P = 832 * 480, 1280 * 720


@dataclass(frozen=True)
class JobInfo:
    """What a cache needs to know about the job to pick published constants and rules."""

    config: WanConfig
    steps: int
    mode: str = "t2v"  # the embeds: t2v, i2v or ti2v (TI2V-5B with a start image)
    width: int = 832
    height: int = 480
    two_experts: bool | None = None  # True: a Wan 2.2 A14B two-pass job; None: unknown
    name: str = ""  # model file name: only tells Wan 2.1 T2V 14B from a Wan 2.2 T2V-A14B expert
    split: int | None = None  # first low-noise step of a two-expert schedule


def model_family(job: JobInfo) -> tuple[str | None, str]:
    """The published-constants family of the job's model ("wan2.1_t2v_14B", "wan2.2_i2v_A14B",
    ...) and, when None, why not."""
    names = {n for n, p in PRESETS.items() if p == job.config}
    variant = variant_name(job.config)
    if not names:
        return None, f"{variant} is not a released Wan model's shape, so no published constants fit it"
    if names == _T2V_14B_TWINS:
        hint = job.name.lower()
        if job.two_experts or re.search(r"2[._]?2|a14b|high[_-]?noise|low[_-]?noise", hint):
            return "wan2.2_t2v_A14B", ""
        if job.two_experts is False or re.search(r"2[._]?1", hint):
            return "wan2.1_t2v_14B", ""
        return None, (f"{variant} has the shapes of both Wan 2.1 T2V 14B and a Wan 2.2 T2V-A14B expert, and the file "
                      f"name {job.name!r} does not say which")
    if names == {"Wan2.1 T2V 14B"}:
        return "wan2.1_t2v_14B", ""
    if names == {"Wan2.1 I2V 14B"}:
        area = job.width * job.height
        return ("wan2.1_i2v_14B_720p" if area > math.sqrt(_AREA_480P * _AREA_720P) else "wan2.1_i2v_14B_480p"), ""
    for name in names:
        if name in _FAMILY:
            return _FAMILY[name], ""
    return None, f"{variant}: no published constants"


# --- per-branch state and the policies ------------------------------------------------------

Key = tuple[str, "int | None"]  # (branch, context window)


@dataclass
class BranchState:
    """What one (branch, window) remembers between calls."""

    residual: Tensor | None = None  # blocks' output minus input at the last computed call, float32
    acc: float = 0.0  # TeaCache distance / MagCache error / EasyCache error, since the last computed call
    ratio: float = 1.0  # MagCache: product of the ratios since the last computed call
    count: int = 0  # MagCache: calls since the last computed one
    prev: Tensor | None = None  # TeaCache / calibration: last modulated input; EasyCache: last input tokens
    prev_e0: Tensor | None = None  # calibration: last e0
    last_input: Tensor | None = None  # EasyCache / calibration: input tokens of the last computed call
    last_output_mean: float | None = None  # EasyCache: mean |output| of the last computed call
    k: float | None = None  # EasyCache: transformation rate
    points: list[dict] = field(default_factory=list)  # calibration records

    TENSORS: ClassVar[tuple[str, ...]] = ("residual", "prev", "prev_e0", "last_input")

    def forget(self) -> None:
        """Drop everything but the calibration records (a different model starts)."""
        points = self.points
        self.__init__()
        self.points = points

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self.TENSORS:
            t = d[name]
            d[name] = None if t is None else t.detach().cpu()
        d["points"] = [dict(p) for p in self.points]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BranchState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Context:
    """One branch's view of one call."""

    step: int
    steps: int
    row: int  # 0 cond, 1 uncond: the authors' interleaving (cnt = 2 * step + row)
    branch: str
    window: int | None
    x: Tensor  # this branch's tokens entering the blocks [1, L, dim]
    e: Tensor  # [1, 1 or R, dim]
    e0: Tensor  # [1, 1 or R, 6, dim]
    split: int | None
    cache: StepCache


def _rel_l1(now: Tensor, prev: Tensor | None) -> float | None:
    if prev is None or prev.shape != now.shape:
        return None
    prev = prev.to(now.device)
    return float((now - prev).abs().mean() / prev.abs().mean())


class Policy:
    """A skip rule. ``decide`` returns the error estimate when the call may reuse its residual,
    None when it must compute; ``after_compute`` runs after every computed call (before the
    fresh residual replaces the stored one)."""

    name: ClassVar[str] = "policy"
    title: ClassVar[str] = "step cache"
    skips: ClassVar[bool] = True
    shared_decision: ClassVar[bool] = False  # the cond branch decides for uncond (EasyCache)
    resets_on_model_change: ClassVar[bool] = True

    def keeps_previous(self, row: int) -> bool:
        """Whether ``after_compute`` reads the residual it replaces (else it is freed first)."""
        return False

    def decide(self, st: BranchState, ctx: Context) -> float | None:
        return None

    def after_compute(self, st: BranchState, ctx: Context, x_in: Tensor, out: Tensor, residual: Tensor) -> None:
        st.acc, st.ratio, st.count = 0.0, 1.0, 0

    def cannot_reuse(self, st: BranchState) -> None:
        """``decide`` allowed a reuse but nothing fit to reuse is stored (a first call, another
        latent size): the call computes instead."""

    def inputs_held(self, row: int) -> int:
        """Input-token tensors (compute dtype, [1, L, dim]) a branch keeps beside its residual."""
        return 0

    def residuals_held(self) -> int:
        return 1

    def modulation_held(self) -> tuple[str, ...]:
        """Which of ``e`` / ``e0`` (float32, one row per timestep run) a branch keeps."""
        return ()

    def describe(self) -> str:
        return self.title

    def identity(self) -> dict:
        """JSON-able parameters: a carried state only continues under the same policy."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return json.loads(json.dumps({"policy": self.name, **params}))


@dataclass(frozen=True)
class NoSkip(Policy):
    """Every call computes; nothing is stored (the short-schedule default, or off)."""

    reason: str = ""
    name: ClassVar[str] = "off"
    skips: ClassVar[bool] = False

    def residuals_held(self) -> int:
        return 0

    def describe(self) -> str:
        return f"step cache off ({self.reason})" if self.reason else "step cache off"


@dataclass(frozen=True)
class TeaCache(Policy):
    """TeaCache: polynomial-rescaled relative L1 change of the timestep modulation."""

    coefficients: tuple[float, ...]
    threshold: float
    mode: str = "e"  # "e": time embedding; "e0": its projection (the authors' use_ret_steps)
    source: str = ""
    name: ClassVar[str] = "teacache"
    title: ClassVar[str] = "TeaCache"

    def __post_init__(self):
        if self.mode not in TEACACHE_WARMUP:
            raise ValueError(f"TeaCache mode must be 'e' or 'e0', got {self.mode!r}")
        if not self.coefficients:
            raise ValueError("TeaCache needs polynomial coefficients")

    @classmethod
    def published(cls, preset: str, mode: str = "auto", threshold: float = AUTO) -> TeaCache:
        if preset not in TEACACHE_COEFFICIENTS:
            raise ValueError(f"no published TeaCache coefficients {preset!r}; "
                             f"known: {', '.join(TEACACHE_COEFFICIENTS)}")
        mode = TEACACHE_DEFAULT_MODE.get(preset, "e0") if mode == "auto" else mode
        threshold = TEACACHE_THRESHOLDS[preset][mode] if threshold < 0 else threshold
        return cls(TEACACHE_COEFFICIENTS[preset][mode], threshold, mode, preset)

    def protected(self, step: int, steps: int) -> bool:
        return step < TEACACHE_WARMUP[self.mode] or (self.mode == "e" and step >= steps - 1)

    def decide(self, st: BranchState, ctx: Context) -> float | None:
        signal = ctx.e if self.mode == "e" else ctx.e0
        rel = _rel_l1(signal, st.prev)
        st.prev = signal.clone()
        if self.protected(ctx.step, ctx.steps) or rel is None:
            return None
        st.acc += float(np.polyval(self.coefficients, rel))
        return st.acc if self.threshold > 0 and st.acc < self.threshold else None

    def modulation_held(self) -> tuple[str, ...]:
        return (self.mode,)

    def describe(self) -> str:
        return f"TeaCache (threshold {self.threshold:g}, mode {self.mode}, coefficients {self.source or 'custom'})"


@dataclass(frozen=True)
class MagCache(Policy):
    """MagCache: calibrated residual magnitude ratios, an error budget and at most K reuses."""

    ratios: tuple[tuple[float, float], ...]  # (cond, uncond) per step of the whole schedule
    threshold: float
    skip_limit: int  # K
    retention: float
    rule: str = "plain"  # "plain", or the Wan 2.2 A14B rules "t2v_experts" / "i2v_experts"
    source: str = ""
    name: ClassVar[str] = "magcache"
    title: ClassVar[str] = "MagCache"

    def __post_init__(self):
        if self.rule not in ("plain", "t2v_experts", "i2v_experts"):
            raise ValueError(f"unknown MagCache rule {self.rule!r}")
        if not 0.0 <= self.retention <= 1.0:
            raise ValueError(f"MagCache retention ratio must be within 0..1, got {self.retention}")

    @classmethod
    def published(cls, preset: str, steps: int, threshold: float = AUTO, skip_limit: int = -1,
                  retention: float = AUTO) -> MagCache:
        if preset not in MAGCACHE_RATIOS:
            raise ValueError(f"no published MagCache ratios {preset!r}; known: {', '.join(MAGCACHE_RATIOS)}")
        rec = _mag_recommended(preset)
        return cls(ratios_for_steps(MAGCACHE_RATIOS[preset], steps), rec["thresh"] if threshold < 0 else threshold,
                   rec["K"] if skip_limit < 0 else skip_limit, rec["retention"] if retention < 0 else retention,
                   MAGCACHE_RULES.get(preset, "plain"), preset)

    def protected(self, step: int, row: int, steps: int, split: int | None) -> bool:
        cnt, num = 2 * step + row, 2 * steps
        if self.rule == "plain":
            return cnt < int(num * self.retention)
        s = 2 * (steps if split is None else split)
        if self.rule == "i2v_experts":
            return cnt < int(s + (num - s) * self.retention)
        return cnt < int(s * self.retention) or s <= cnt <= (num - s) * self.retention + s

    @property
    def resets_on_model_change(self) -> bool:  # type: ignore[override]
        # The reference keeps one state (call counter, accumulators, residuals) on the model
        # class, which both A14B experts share; the plain rule has no second model to follow.
        return self.rule == "plain"

    def decide(self, st: BranchState, ctx: Context) -> float | None:
        if self.protected(ctx.step, ctx.row, ctx.steps, ctx.split):
            return None  # computes; the accumulators are left as they are (the reference's)
        st.ratio *= self.ratios[ctx.step][ctx.row]
        st.count += 1
        st.acc += abs(1.0 - st.ratio)
        if self.threshold > 0 and st.acc < self.threshold and st.count <= self.skip_limit:
            return st.acc
        self.cannot_reuse(st)  # computes: the reference restarts its accumulators here, and only here
        return None

    def after_compute(self, st: BranchState, ctx: Context, x_in: Tensor, out: Tensor, residual: Tensor) -> None:
        pass  # a computed call inside a retention window leaves the accumulators untouched

    def cannot_reuse(self, st: BranchState) -> None:
        st.acc, st.ratio, st.count = 0.0, 1.0, 0

    def describe(self) -> str:
        rule = "" if self.rule == "plain" else f", {self.rule.replace('_', ' ')}"
        return (f"MagCache (threshold {self.threshold:g}, K {self.skip_limit}, retention {self.retention:g}{rule}, "
                f"ratios {self.source or 'custom'})")


@dataclass(frozen=True)
class EasyCache(Policy):
    """EasyCache: runtime-adaptive, no calibration; the cond branch decides for its pair."""

    threshold: float = EASYCACHE_THRESHOLD
    warmup: int = EASYCACHE_WARMUP
    name: ClassVar[str] = "easycache"
    title: ClassVar[str] = "EasyCache"
    shared_decision: ClassVar[bool] = True

    def keeps_previous(self, row: int) -> bool:
        return row == 0

    def protected(self, step: int, steps: int) -> bool:
        return step < self.warmup or step >= steps - 1

    def decide(self, st: BranchState, ctx: Context) -> float | None:
        pair = (ctx.step, ctx.window)
        if ctx.row != 0:
            return ctx.cache._pair.get(pair)
        estimate = None
        prev = st.prev
        if self.protected(ctx.step, ctx.steps):
            st.acc = 0.0
        elif (prev is not None and prev.shape == ctx.x.shape and st.k is not None
              and st.last_output_mean and st.residual is not None):
            change = float((ctx.x - prev.to(ctx.x.device)).abs().mean())
            st.acc += st.k * change / st.last_output_mean
            if self.threshold > 0 and st.acc < self.threshold:
                estimate = st.acc
        st.prev = ctx.cache._keep(ctx.x)
        ctx.cache._pair[pair] = estimate
        return estimate

    def after_compute(self, st: BranchState, ctx: Context, x_in: Tensor, out: Tensor, residual: Tensor) -> None:
        super().after_compute(st, ctx, x_in, out, residual)
        if ctx.row != 0:
            return
        last_in, last_res = st.last_input, st.residual
        if (st.last_output_mean is not None and last_in is not None and last_res is not None
                and last_in.shape == x_in.shape):
            last_in = last_in.to(x_in.device)
            out_change = (out - last_in - last_res.to(out.device)).abs().mean()
            in_change = (x_in - last_in).abs().mean()
            st.k = float(out_change / in_change) if float(in_change) > 0 else None
        st.last_input = st.prev if st.prev is not None else ctx.cache._keep(x_in)
        st.last_output_mean = float(out.abs().mean())

    def inputs_held(self, row: int) -> int:
        return 2 if row == 0 else 0

    def describe(self) -> str:
        return f"EasyCache (threshold {self.threshold:g}, warm-up {self.warmup} steps)"


@dataclass(frozen=True)
class Calibrate(Policy):
    """Computes every call and records what MagCache and TeaCache calibrate on."""

    name: ClassVar[str] = "calibrate"
    title: ClassVar[str] = "calibration"
    resets_on_model_change: ClassVar[bool] = False  # the A14B ratios span the expert switch

    def keeps_previous(self, row: int) -> bool:
        return True

    def after_compute(self, st: BranchState, ctx: Context, x_in: Tensor, out: Tensor, residual: Tensor) -> None:
        prev_res, last_in = st.residual, st.last_input
        if prev_res is not None and last_in is not None and prev_res.shape == residual.shape:
            prev_res = prev_res.to(residual.device)
            ratio = residual.norm(dim=-1) / prev_res.norm(dim=-1).clamp_min(1e-30)
            prev_out = last_in.to(out.device) + prev_res
            out_rel = (out - prev_out).abs().mean() / prev_out.abs().mean()
            st.points.append({"step": ctx.step, "ratio": float(ratio.mean()), "std": float(ratio.std()) if
                              ratio.numel() > 1 else 0.0, "e": _rel_l1(ctx.e, st.prev),
                              "e0": _rel_l1(ctx.e0, st.prev_e0), "out": float(out_rel)})
        st.prev, st.prev_e0 = ctx.e.clone(), ctx.e0.clone()
        st.last_input = ctx.cache._keep(x_in)

    def inputs_held(self, row: int) -> int:
        return 1

    def modulation_held(self) -> tuple[str, ...]:
        return ("e", "e0")


# --- the wrapper ------------------------------------------------------------------------------

def _traced(x: Tensor) -> bool:
    """True under a fake-tensor or meta trace (a memory planner's): no data to decide on."""
    if x.is_meta:
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - every torch this pack supports has it
        return False
    return isinstance(x, FakeTensor)


def _rows_of(state: WanState, rows: list[int]) -> WanState:
    """``state`` for some of its batch rows (every per-row tensor cut the same way). Consecutive
    rows are a view with the batch's strides, so compiled blocks see the layout they know."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        cut = lambda t: None if t is None else t[rows[0]:rows[-1] + 1]  # noqa: E731
    else:
        index = torch.tensor(rows, device=state.x.device)
        cut = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
    return replace(state, x=cut(state.x), e=cut(state.e), e0=cut(state.e0), context=cut(state.context),
                   context_img=cut(state.context_img))


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


class StepCache:
    """One job's step cache; see the module docstring. ``steps``: the whole schedule's step
    count; ``split``: the first low-noise step of a two-expert schedule (MagCache's Wan 2.2
    rules); ``storage``: where residuals live, ``"compute"`` (the device the blocks run on)
    or a device such as ``"cpu"``; ``note``: said with the report (why the cache is off, ...)."""

    def __init__(self, policy: Policy, steps: int, *, split: int | None = None,
                 storage: str | torch.device = "compute", note: str = ""):
        if steps < 1:
            raise ValueError(f"a step cache needs a schedule of at least 1 step, got {steps}")
        if isinstance(policy, MagCache) and len(policy.ratios) != steps:
            raise ValueError(f"MagCache ratios cover {len(policy.ratios)} steps; this schedule has {steps}")
        if split is not None and not 0 <= split <= steps:
            raise ValueError(f"split step {split} is outside the {steps}-step schedule")
        self.policy, self.steps, self.split, self.note = policy, steps, split, note
        self.storage = None if str(storage) == "compute" else torch.device(storage)
        self._states: dict[Key, BranchState] = {}
        self._calls: list[tuple[int, str, int | None, bool, float | None]] = []
        self._pair: dict[tuple[int, int | None], float | None] = {}
        self._model: str | None = None
        self.traced: dict[Key, list[Tensor]] = {}  # what a traced call stored, for a planner to inspect

    # the hook

    def wrap(self, run_blocks: RunBlocks, model: str = "") -> RunBlocks:
        """``run_blocks`` with step skipping. ``model`` names the weights it runs (an A14B
        expert); when it differs from the previous wrap's, stored state is dropped."""
        if self._model is not None and model != self._model and self.policy.resets_on_model_change:
            for st in self._states.values():
                st.forget()
            self._pair.clear()
        self._model = model

        def run(state: WanState, call: DiTCall) -> WanState:
            return self._run(run_blocks, state, call)
        return run

    def _target(self, like: Tensor) -> torch.device:
        return like.device if self.storage is None else self.storage

    def _place(self, t: Tensor, like: Tensor) -> Tensor:
        target = self._target(like)
        return t if t.device == target else t.to(target)

    def _keep(self, t: Tensor) -> Tensor:
        """A stored copy of tokens ``t`` on the storage device (never a view into the batch)."""
        target = self._target(t)
        return t.clone() if t.device == target else t.to(target)

    def _run(self, run_blocks: RunBlocks, state: WanState, call: DiTCall) -> WanState:
        if not 0 <= call.step < self.steps:
            raise ValueError(f"step {call.step} is outside the {self.steps}-step schedule this cache was made for")
        rows = len(call.branches)
        if state.x.shape[0] != rows:
            raise ValueError(f"DiTCall names {rows} branches for a batch of {state.x.shape[0]}")
        if _traced(state.x):
            return self._trace(run_blocks, state, call)
        if not self.policy.skips:
            self._calls.extend((call.step, b, call.window, True, None) for b in call.branches)
            return run_blocks(state, call)

        x = state.x
        keys = [(b, call.window) for b in call.branches]
        sts = [self._states.setdefault(k, BranchState()) for k in keys]
        ctxs = [Context(call.step, self.steps, 1 if b == "uncond" else 0, b, call.window, x[i:i + 1],
                        state.e[i:i + 1], state.e0[i:i + 1], self.split, self) for i, b in enumerate(call.branches)]
        estimates = [self.policy.decide(st, ctx) for st, ctx in zip(sts, ctxs)]
        reuse = []
        for e, st in zip(estimates, sts):
            ok = e is not None and st.residual is not None and st.residual.shape[1:] == x.shape[1:]
            if e is not None and not ok:
                self.policy.cannot_reuse(st)
            reuse.append(ok)
        for st, ok in zip(sts, reuse):
            if ok:  # a state carried from the previous pass arrives on the CPU
                st.residual = self._place(st.residual, x)
        compute = [i for i in range(rows) if not reuse[i]]
        for i in compute:
            if not self.policy.keeps_previous(ctxs[i].row):
                sts[i].residual = None  # freed before the blocks' activations peak
        if not compute:
            done = None
        elif len(compute) == rows:
            done = run_blocks(state, call).x
        else:  # batched CFG where one branch may reuse: only the others run (as the reference's calls do)
            part = replace(call, branches=tuple(call.branches[i] for i in compute))
            done = run_blocks(_rows_of(state, compute), part).x
        out = self._assemble(x, done, compute, [sts[i].residual if reuse[i] else None for i in range(rows)])
        for j, i in enumerate(compute):
            x_in, out_row = x[i:i + 1], done[j:j + 1]
            residual = out_row - x_in
            self.policy.after_compute(sts[i], ctxs[i], x_in, out_row, residual)
            sts[i].residual = self._place(residual, out)
        self._calls.extend((call.step, b, call.window, not reuse[i], None if not reuse[i] else estimates[i])
                           for i, b in enumerate(call.branches))
        state.x = out
        return state

    @staticmethod
    def _assemble(x: Tensor, done: Tensor | None, compute: list[int], residuals: list[Tensor | None]) -> Tensor:
        """The block stack's output for every row: the computed rows from ``done`` (in
        ``compute`` order), the others their input plus their stored residual."""
        rows = x.shape[0]
        if done is not None and len(compute) == rows:
            return done
        adds = [r.to(x.device) if r is not None else None for r in residuals]  # a copy when they live off the device
        if done is None and rows == 1:
            return x + adds[0]
        like = done if done is not None else next(a for a in adds if a is not None)
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, like.dtype), device=x.device)
        for i in range(rows):
            if i in compute:
                out[i:i + 1].copy_(done[compute.index(i):compute.index(i) + 1])
            else:
                torch.add(x[i:i + 1], adds[i], out=out[i:i + 1])
        return out

    def _trace(self, run_blocks: RunBlocks, state: WanState, call: DiTCall) -> WanState:
        """A computed call's memory, without decisions: blocks run, the residual and the inputs
        a policy keeps are stored (in ``traced``) on the storage device."""
        if not self.policy.skips:
            return run_blocks(state, call)
        x = state.x
        state = run_blocks(state, call)
        residual = state.x - x
        for i, b in enumerate(call.branches):
            row = 1 if b == "uncond" else 0
            kept = [self._place(residual[i:i + 1], state.x) for _ in range(self.policy.residuals_held())]
            kept += [self._keep(x[i:i + 1]) for _ in range(self.policy.inputs_held(row))]
            kept += [getattr(state, name)[i:i + 1].clone() for name in self.policy.modulation_held()]
            self.traced[(b, call.window)] = kept
        return state

    # memory

    @staticmethod
    def held_bytes_for(policy: Policy, branches: Sequence[str], tokens: int, dim: int,
                       compute_dtype: torch.dtype, windows: int = 1, runs: int = 1) -> int:
        """Bytes a cache with ``policy`` keeps between calls, once every branch has computed:
        per branch and window, float32 residuals ``[1, tokens, dim]`` and the input-token
        tensors the policy keeps in the compute dtype (on the storage device), plus the
        modulation rows TeaCache / calibration keep (float32, ``runs`` per branch: 1, or 2 for
        TI2V with a start image; these stay on the compute device and are a few kB)."""
        modulation = sum({"e": 1, "e0": 6}[m] for m in policy.modulation_held()) * runs * dim * 4
        total = 0
        for b in branches:
            row = 1 if b == "uncond" else 0
            total += tokens * dim * (4 * policy.residuals_held() + compute_dtype.itemsize * policy.inputs_held(row))
            total += modulation
        return total * windows

    def held_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this cache holds now, by device."""
        seen: dict[int, tuple[str, int]] = {}
        for st in self._states.values():
            for name in BranchState.TENSORS:
                t = getattr(st, name)
                if t is not None:
                    seen[id(t)] = (str(t.device), t.numel() * t.element_size())
        out: dict[str, int] = {}
        for device, n in seen.values():
            out[device] = out.get(device, 0) + n
        return out

    # reporting

    def report(self) -> dict[str, Any]:
        """Steps computed and skipped (a step is skipped when no call at it ran the blocks),
        per-branch skips, the summed error estimate of the reused calls, what is held."""
        seen = sorted({c[0] for c in self._calls})
        computed = sorted({c[0] for c in self._calls if c[3]})
        skipped = sorted(set(seen) - set(computed))
        branches: dict[str, dict] = {}
        errors = []
        for step, branch, window, was_computed, estimate in self._calls:
            b = branches.setdefault(branch, {"calls": 0, "skipped": []})
            b["calls"] += 1
            if not was_computed:
                b["skipped"].append(step if window is None else [step, window])
                errors.append(float(estimate or 0.0))
        held = self.held_bytes()
        return {"policy": self.policy.name, "settings": self.policy.describe(), "steps": self.steps,
                "steps_run": len(seen), "steps_computed": len(computed), "steps_skipped": len(skipped),
                "skipped_steps": skipped, "branches": branches, "error_estimate": sum(errors),
                "max_error_estimate": max(errors, default=0.0),
                "storage": "compute device" if self.storage is None else str(self.storage),
                "held_bytes": sum(held.values()), "held_by_device": held, "note": self.note, "line": self.line()}

    def line(self) -> str:
        """The job's one log line."""
        seen = sorted({c[0] for c in self._calls})
        computed = {c[0] for c in self._calls if c[3]}
        skipped = [s for s in seen if s not in computed]
        text = f"WanFit {self.policy.describe()}: "
        if not seen:
            text += "no steps ran"
        else:
            text += f"{len(computed)} of {len(seen)} steps computed, {len(skipped)} skipped"
            if skipped:
                text += " (steps " + ", ".join(map(str, skipped)) + ")"
            partial = sorted({c[0] for c in self._calls if not c[3]} - set(skipped))
            if partial:
                text += f"; one branch reused its residual at steps {', '.join(map(str, partial))}"
            errors = [float(c[4] or 0.0) for c in self._calls if not c[3]]
            if errors:
                text += f"; accumulated error estimate {sum(errors):.4f} (largest {max(errors):.4f})"
            held = sum(self.held_bytes().values())
            if held:
                where = "the compute device" if self.storage is None else str(self.storage)
                text += f"; residuals held on {where}: {_bytes(held)}"
        if self.note:
            text += f". {self.note}"
        return text + "."

    # across passes

    def state_dict(self) -> dict[str, Any]:
        """Everything a following pass needs (tensors on the CPU; never mutated afterwards)."""
        return {"version": 1, "identity": self.policy.identity(), "steps": self.steps, "split": self.split,
                "model": self._model, "note": self.note,
                "branches": [[b, w, st.to_dict()] for (b, w), st in self._states.items()],
                "calls": [list(c) for c in self._calls], "pair": [[s, w, e] for (s, w), e in self._pair.items()]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a previous pass's ``state_dict``; ValueError when it is another
        policy's or schedule's (the caller then starts afresh)."""
        if d.get("version") != 1:
            raise ValueError("step cache state of an unknown version")
        if d["identity"] != self.policy.identity():
            raise ValueError(f"the previous pass ran {d['identity'].get('policy')} with other settings")
        if d["steps"] != self.steps:
            raise ValueError(f"the previous pass's schedule had {d['steps']} steps, this one {self.steps}")
        self.split, self._model, self.note = d["split"], d["model"], d.get("note", self.note) or self.note
        self._states = {(b, w): BranchState.from_dict(st) for b, w, st in d["branches"]}
        self._calls = [tuple(c) for c in d["calls"]]  # type: ignore[misc]
        self._pair = {(s, w): e for s, w, e in d["pair"]}

    @property
    def next_step(self) -> int:
        """One past the last step that ran (0 before any)."""
        return max((c[0] for c in self._calls), default=-1) + 1

    # calibration

    def calibration(self, name: str, meta: dict[str, Any] | None = None) -> Calibration:
        """The calibration a :class:`Calibrate` job recorded (all steps must have run)."""
        if not isinstance(self.policy, Calibrate):
            raise ValueError("only a calibration job records a calibration")
        ran = {c[0] for c in self._calls}
        missing = sorted(set(range(self.steps)) - ran)
        if missing:
            raise ValueError(f"calibration {name!r} saw {len(ran)} of {self.steps} steps (missing "
                             f"{', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''}): run the "
                             "whole schedule (both passes of a two-pass job) with the calibration connected")
        by_branch: dict[str, list[dict]] = {}
        for (branch, _window), st in self._states.items():
            by_branch.setdefault(branch, []).extend(st.points)
        return Calibration.from_points(name, self.steps, by_branch, meta)


# --- calibrations -----------------------------------------------------------------------------

def fit_teacache(x: Sequence[float], y: Sequence[float], degree: int = 4) -> tuple[float, ...]:
    """Polynomial (highest power first, numpy's convention) mapping the modulated input's
    relative change to the block output's; degree 4 as published, lower with fewer than 5
    distinct points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    distinct = len(np.unique(x))  # cond and uncond share e: each step's x comes twice
    if distinct < 2:
        raise ValueError(f"a TeaCache fit needs at least 2 distinct steps with a previous step, got {distinct}")
    return tuple(float(c) for c in np.polyfit(x, y, min(degree, distinct - 1)))


@dataclass
class Calibration:
    """A saved calibration: MagCache ratios and TeaCache coefficients for one model set-up."""

    name: str
    steps: int
    mag_ratios: list[float]  # interleaved [cond, uncond] per step; step 0 is 1.0 (as published)
    mag_std: list[float]
    teacache: dict[str, list[float]]  # mode ("e", "e0") -> coefficients
    points: dict[str, list[dict]] = field(default_factory=dict)  # what the fits saw, per branch
    meta: dict[str, Any] = field(default_factory=dict)  # model, loras, shift, scheduler, size, ...

    @classmethod
    def from_points(cls, name: str, steps: int, by_branch: dict[str, list[dict]],
                    meta: dict[str, Any] | None = None) -> Calibration:
        if not NAME_RE.match(name):
            raise ValueError(f"calibration name {name!r}: use letters, digits, space, '.', '_' or '-' (up to 64)")
        ratios, stds = np.ones((steps, 2)), np.zeros((steps, 2))
        for row, branch in enumerate(("cond", "uncond")):
            points = by_branch.get(branch) or by_branch.get("cond", [])  # cfg 1: uncond takes cond's
            per_step: dict[int, list[dict]] = {}
            for p in points:
                per_step.setdefault(p["step"], []).append(p)
            for step, ps in per_step.items():  # several context windows: their mean
                ratios[step, row] = float(np.mean([p["ratio"] for p in ps]))
                stds[step, row] = float(np.mean([p["std"] for p in ps]))
        everything = [p for ps in by_branch.values() for p in ps]
        teacache = {}
        for mode in ("e", "e0"):
            xy = [(p[mode], p["out"]) for p in everything if p[mode] is not None]
            if len({p["step"] for p in everything if p[mode] is not None}) >= 2:  # branches repeat a step's x
                teacache[mode] = list(fit_teacache(*zip(*xy)))
        return cls(name, steps, [round(float(v), 6) for v in ratios.reshape(-1)],
                   [round(float(v), 6) for v in stds.reshape(-1)], teacache, by_branch,
                   {"created": time.strftime("%Y-%m-%d %H:%M:%S"), **(meta or {})})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "calibration") -> Calibration:
        try:
            d = json.loads(text)
            cal = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
            ratios_for_steps(cal.mag_ratios, cal.steps)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{source}: not a WanFit step-cache calibration ({err})") from err
        return cal

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


def load_calibration(directory: str | Path, name: str) -> Calibration:
    """The calibration saved as ``name`` in ``directory``: only a name ``list_calibrations``
    lists there is read (a name is never a path), and messages name it, not where it lies."""
    if not isinstance(name, str) or name not in list_calibrations(directory):
        raise FileNotFoundError(f"calibration {name!r}: no such calibration among the saved ones")
    return Calibration.from_json((Path(directory) / f"{name}.json").read_text(), f"calibration {name!r}")


def list_calibrations(directory: str | Path) -> list[str]:
    """Names of the calibrations saved in ``directory`` (sorted; none when it does not exist):
    files with a calibration name that lie inside it (a link leading out is not listed)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    root = d.resolve()
    return sorted(p.stem for p in d.glob("*.json")
                  if NAME_RE.match(p.stem) and p.is_file() and p.resolve().is_relative_to(root))


# --- from node settings to a policy -----------------------------------------------------------

POLICIES = ("teacache", "magcache", "easycache", "calibrate")
_TITLES = {"teacache": "WanFit TeaCache", "magcache": "WanFit MagCache", "easycache": "WanFit EasyCache",
           "calibrate": "WanFit Cache Calibrate"}


@dataclass(frozen=True)
class CacheSettings:
    """What a cache node was set to; -1 / "auto" mean the published recommendation."""

    policy: str
    threshold: float = AUTO
    mode: str = "auto"  # TeaCache
    constants: str = "auto"  # a published preset name, or "calibration: NAME"
    skip_limit: int = -1  # MagCache K
    retention: float = AUTO  # MagCache
    warmup: int = -1  # EasyCache
    storage: str = "compute"
    allow_short_schedules: bool = False
    calibration: Calibration | None = None  # loaded when ``constants`` names one
    name: str = ""  # calibrate: the name to save under

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown step cache {self.policy!r}; known: {', '.join(POLICIES)}")


def build_policy(s: CacheSettings, job: JobInfo) -> tuple[Policy, str]:
    """The policy for this job and a note for the log. ValueError (naming the node and what to
    do) when ``auto`` has nothing published for the model."""
    node = _TITLES[s.policy]
    if s.policy == "calibrate":
        return Calibrate(), ""
    if job.steps <= SHORT_SCHEDULE and not s.allow_short_schedules:
        return NoSkip(f"{job.steps} steps: with {SHORT_SCHEDULE} or fewer steps (distilled schedules) the caches "
                      "lose too much quality (sglang CI: Wan 2.2 A14B + TeaCache PSNR 14.6 against a 29.1 bar; "
                      "diffusers issue 14025: MagCache on 4-step Wan 2.2, severe quality loss); turn on "
                      "allow_short_schedules to cache anyway"), ""
    family, why = model_family(job)
    variant = variant_name(job.config)
    if s.policy == "easycache":
        warmup = easycache_warmup(job.steps) if s.warmup < 0 else s.warmup
        return EasyCache(EASYCACHE_THRESHOLD if s.threshold < 0 else s.threshold, warmup), ""
    cal = s.calibration
    if s.policy == "teacache":
        return _teacache(s, job, family, why, variant, node, cal)
    return _magcache(s, job, family, why, variant, node, cal)


def _teacache(s: CacheSettings, job: JobInfo, family, why, variant, node, cal) -> tuple[Policy, str]:
    note = ""
    if cal is not None:
        mode = s.mode if s.mode != "auto" else ("e0" if "e0" in cal.teacache else "e")
        if mode not in cal.teacache:
            raise ValueError(f"{node}: calibration {cal.name!r} has no TeaCache fit for mode {mode}")
        coefficients, source = tuple(cal.teacache[mode]), f"calibration {cal.name}"
        preset = family if family in TEACACHE_THRESHOLDS else None
    else:
        preset = family if s.constants == "auto" else s.constants
        if s.constants == "auto" and family is None:
            raise ValueError(f"{node}: {why}; pick published coefficients or a calibration on the node")
        if preset not in TEACACHE_COEFFICIENTS:
            raise ValueError(f"{node}: there are no published TeaCache coefficients for {variant} (the TeaCache "
                             "authors published Wan 2.1 only: t2v 1.3B / 14B, i2v 480p / 720p). Use WanFit MagCache "
                             "or WanFit EasyCache, or calibrate this model with WanFit Cache Calibrate and pick the "
                             "calibration here")
        mode = TEACACHE_DEFAULT_MODE.get(preset, "e0") if s.mode == "auto" else s.mode
        coefficients, source = TEACACHE_COEFFICIENTS[preset][mode], preset
        if family != preset:
            note = f"coefficients {preset} were fitted on another model than {variant}"
    if s.threshold >= 0:
        threshold = s.threshold
    elif preset in TEACACHE_THRESHOLDS:
        threshold = TEACACHE_THRESHOLDS[preset][mode]
    else:
        raise ValueError(f"{node}: no published TeaCache threshold for {variant}; set threshold on the node")
    return TeaCache(coefficients, threshold, mode, source), note


def _magcache(s: CacheSettings, job: JobInfo, family, why, variant, node, cal) -> tuple[Policy, str]:
    note = ""
    preset = family
    if family == "wan2.2_ti2v_5B":
        preset = "wan2.2_ti2v_5B_i2v" if job.mode == "ti2v" else "wan2.2_ti2v_5B_t2v"
    if cal is not None:
        interleaved, source = cal.mag_ratios, f"calibration {cal.name}"
        if cal.steps != job.steps:
            note = f"calibration {cal.name} was made at {cal.steps} steps; its ratios are resampled to {job.steps}"
        rule = cal.meta.get("rule", "plain")
    else:
        if s.constants != "auto":
            preset = s.constants
        elif family is None:
            raise ValueError(f"{node}: {why}; pick published ratios or a calibration on the node")
        if preset not in MAGCACHE_RATIOS:
            raise ValueError(f"{node}: there are no published MagCache ratios for {variant}; use WanFit EasyCache, "
                             "or calibrate this model with WanFit Cache Calibrate and pick the calibration here")
        interleaved, source, rule = MAGCACHE_RATIOS[preset], preset, MAGCACHE_RULES.get(preset, "plain")
        if preset != family and not (family == "wan2.2_ti2v_5B" and preset.startswith("wan2.2_ti2v_5B")):
            note = f"ratios {preset} were calibrated on another model than {variant}"
    rec = _mag_recommended(preset) if preset in MAGCACHE_RATIOS else None
    if rec is None and (s.threshold < 0 or s.skip_limit < 0 or s.retention < 0):
        raise ValueError(f"{node}: no published MagCache recommendation for {variant}; set threshold, K and "
                         "retention_ratio on the node")
    policy = MagCache(ratios_for_steps(interleaved, job.steps), rec["thresh"] if s.threshold < 0 else s.threshold,
                      rec["K"] if s.skip_limit < 0 else s.skip_limit,
                      rec["retention"] if s.retention < 0 else s.retention, rule, source)
    if len(interleaved) // 2 != job.steps and not note:
        note = f"ratios calibrated at {len(interleaved) // 2} steps, resampled to {job.steps}"
    return policy, note


def calibration_rule(family: str | None, two_experts: bool) -> str:
    """The MagCache rule a calibration of this model family applies later."""
    if two_experts and family in MAGCACHE_RULES:
        return MAGCACHE_RULES[family]
    return "plain"
