"""Step-cache nodes (TeaCache, MagCache, EasyCache, calibration) and the glue the samplers call.

A cache node outputs its settings (``WANFIT_STEP_CACHE``); a sampler's optional
``step_cache`` input takes them. The sampler resolves them against its model when it starts
(published constants per model variant, before any weight is read), wraps the block stack,
logs one line per job and puts the report into the LATENT's telemetry. A pass that ends with
leftover noise hands the cache state on in its LATENT, as the solver state travels, so a
second Sampler continues the same schedule. Calibrations are JSON files in ComfyUI's user
directory (``user/wanfit/step_cache``), listed on the cache nodes beside the published sets.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..optim.step_cache import (MAGCACHE_RATIOS, NAME_RE, TEACACHE_COEFFICIENTS, CacheSettings, Calibrate,
                                Calibration, JobInfo, StepCache, build_policy, calibration_rule, list_calibrations,
                                load_calibration, model_family)
from ..wan.schedulers import boundary_step
from . import comfy
from .types import ImageEmbeds, to_comfy_latent

log = logging.getLogger("WanFit")
CATEGORY = "WanFit/sampling"
CACHE_KEY = "wanfit_step_cache"
CALIBRATION = "calibration: "
RESIDUAL_DEVICES = ["compute", "cpu"]


def calibration_dir() -> Path:
    return Path(comfy.user_directory()) / "wanfit" / "step_cache"


def saved_calibrations() -> list[str]:
    """Saved calibrations as node choices; none where ComfyUI's folders cannot be read."""
    try:
        return [CALIBRATION + name for name in list_calibrations(calibration_dir())]
    except (ImportError, OSError):
        return []


def _calibration(choice: str) -> Calibration | None:
    """The saved calibration a choice names (None for a published set); only a listed name is read."""
    if not choice.startswith(CALIBRATION):
        return None
    return load_calibration(calibration_dir(), choice[len(CALIBRATION):])


def _check_choice(choice: str | None, published: Sequence[str], what: str):
    if choice is None or choice == "auto" or choice in published:
        return True
    if not choice.startswith(CALIBRATION):
        return f"{choice!r}: not a published {what} set or a saved calibration"
    try:
        cal = _calibration(choice)
    except (FileNotFoundError, ValueError) as err:
        return f"{choice!r}: {err}"
    if what == "TeaCache coefficient" and not cal.teacache:
        return f"{choice!r} has no TeaCache fit (it was made with too few steps)"
    return True


_COMMON = {
    "threshold": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 10.0, "step": 0.01}),
    "residual_device": (RESIDUAL_DEVICES, {"default": "compute"}),
    "allow_short_schedules": ("BOOLEAN", {"default": False}),
}


class _CacheNode:
    CATEGORY = CATEGORY
    FUNCTION = "make"
    RETURN_TYPES = ("WANFIT_STEP_CACHE",)
    RETURN_NAMES = ("step_cache",)


class WanFitTeaCache(_CacheNode):
    """TeaCache step skipping for a WanFit sampler's step_cache input: the block stack is skipped
    while the rescaled change of the timestep modulation stays below the threshold. Published
    coefficients exist for Wan 2.1 only (t2v 1.3B / 14B, i2v 480p / 720p); for Wan 2.2 use
    MagCache or EasyCache, or calibrate the model. With 8 or fewer steps nothing is skipped
    unless allowed: distilled schedules lose too much."""

    DISPLAY_NAME = "WanFit TeaCache"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "threshold": _COMMON["threshold"],
            "mode": (["auto", "e", "e0"], {"default": "auto"}),
            "coefficients": (["auto", *TEACACHE_COEFFICIENTS, *saved_calibrations()], {"default": "auto"}),
            "residual_device": _COMMON["residual_device"],
            "allow_short_schedules": _COMMON["allow_short_schedules"],
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, coefficients=None):
        return _check_choice(coefficients, list(TEACACHE_COEFFICIENTS), "TeaCache coefficient")

    def make(self, threshold: float, mode: str, coefficients: str, residual_device: str,
             allow_short_schedules: bool):
        return (CacheSettings("teacache", threshold=threshold, mode=mode, constants=coefficients,
                              storage=residual_device, allow_short_schedules=allow_short_schedules,
                              calibration=_calibration(coefficients)),)


class WanFitMagCache(_CacheNode):
    """MagCache step skipping for a WanFit sampler's step_cache input: calibrated residual
    magnitude ratios decide, with an error budget (threshold), at most K skips in a row and the
    first retention_ratio of the steps always computed. Published ratios for Wan 2.1 (t2v 1.3B /
    14B, i2v 480p / 720p) and Wan 2.2 (T2V-A14B, I2V-A14B, TI2V-5B), resampled to the step count;
    the A14B ratios run over both experts. -1 = the published setting for the model."""

    DISPLAY_NAME = "WanFit MagCache"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "threshold": _COMMON["threshold"],
            "K": ("INT", {"default": -1, "min": -1, "max": 100}),
            "retention_ratio": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.05}),
            "ratios": (["auto", *MAGCACHE_RATIOS, *saved_calibrations()], {"default": "auto"}),
            "residual_device": _COMMON["residual_device"],
            "allow_short_schedules": _COMMON["allow_short_schedules"],
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ratios=None):
        return _check_choice(ratios, list(MAGCACHE_RATIOS), "MagCache ratio")

    def make(self, threshold: float, K: int, retention_ratio: float, ratios: str, residual_device: str,
             allow_short_schedules: bool):
        return (CacheSettings("magcache", threshold=threshold, skip_limit=K, retention=retention_ratio,
                              constants=ratios, storage=residual_device, allow_short_schedules=allow_short_schedules,
                              calibration=_calibration(ratios)),)


class WanFitEasyCache(_CacheNode):
    """EasyCache step skipping for a WanFit sampler's step_cache input: runtime-adaptive, no
    calibration; it learns how fast the block stack's output follows its input and skips while
    the predicted change stays below the threshold (published 0.05). Works on any model."""

    DISPLAY_NAME = "WanFit EasyCache"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "threshold": _COMMON["threshold"],
            "warmup_steps": ("INT", {"default": -1, "min": -1, "max": 1000}),
            "residual_device": _COMMON["residual_device"],
            "allow_short_schedules": _COMMON["allow_short_schedules"],
        }}

    def make(self, threshold: float, warmup_steps: int, residual_device: str, allow_short_schedules: bool):
        return (CacheSettings("easycache", threshold=threshold, warmup=warmup_steps, storage=residual_device,
                              allow_short_schedules=allow_short_schedules),)


class WanFitCacheCalibrate(_CacheNode):
    """Calibration for TeaCache and MagCache: connect to a sampler's step_cache input and run one
    whole job (both passes of a two-pass job) without skipping. It records this model's residual
    magnitude ratios and the modulation-to-output change curve, for this model, LoRA set, step
    count and shift, and saves them under the name in ComfyUI's user directory; the TeaCache and
    MagCache nodes then list it."""

    DISPLAY_NAME = "WanFit Cache Calibrate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "name": ("STRING", {"default": "my_calibration"}),
            "residual_device": _COMMON["residual_device"],
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, name=None):
        if name is None or NAME_RE.match(name):
            return True
        return f"calibration name {name!r}: use letters, digits, space, '.', '_' or '-' (up to 64)"

    def make(self, name: str, residual_device: str):
        check = self.VALIDATE_INPUTS(name)
        if check is not True:
            raise ValueError(check)
        return (CacheSettings("calibrate", storage=residual_device, name=name),)


NODES = {cls.__name__: cls for cls in (WanFitTeaCache, WanFitMagCache, WanFitEasyCache, WanFitCacheCalibrate)}


# --- the samplers' side ---------------------------------------------------------------------

@dataclass
class JobCache:
    """One job's cache with the settings and job facts it was made from."""

    cache: StepCache
    settings: CacheSettings
    job: JobInfo

    def wrap(self, run_blocks, model: str):
        return self.cache.wrap(run_blocks, model)


def _fingerprint(samples: torch.Tensor) -> list:
    s = samples.double()
    return [list(samples.shape), float(s.sum()), float(s.abs().sum())]


def start(settings: CacheSettings | None, handles: Sequence, embeds: ImageEmbeds, schedule: dict,
          sigmas: torch.Tensor, latent: dict | None = None, *, leftover: bool = False,
          split: int | None = None) -> JobCache | None:
    """The cache for a sampler node's job (None without a cache input). ``handles``: the
    ModelHandles the job runs, in order; ``split``: the expert switch when the node knows it.
    Raises ValueError (naming the node and what to do) before any weight is read."""
    if settings is None:
        return None
    steps, begin, end = schedule["steps"], schedule["start_step"], schedule["end_step"]
    carried = (latent or {}).get(CACHE_KEY)
    if split is None and carried:
        split = (carried.get("state") or {}).get("split")
    if split is None:
        if leftover and begin == 0 and end < steps:
            split = end  # a high-noise pass handing over at end_step
        elif begin > 0:
            split = begin
        else:
            from .sample import BOUNDARIES
            split = boundary_step(sigmas, BOUNDARIES.get(handles[0].config.model_type, 0.875))
    if settings.policy == "calibrate" and steps < 2:
        raise ValueError(f"WanFit Cache Calibrate: a {steps}-step schedule has nothing to calibrate (MagCache ratios "
                         "compare each step with the one before); calibrate with the step count you sample with, 2 "
                         "or more (a TeaCache fit needs 3 or more)")
    if settings.policy == "calibrate" and ((begin > 0 and not carried) or (end < steps and not leftover)):
        raise ValueError(f"WanFit Cache Calibrate: a calibration records the whole {steps}-step schedule; this pass "
                         f"runs steps {begin}..{end} without handing the rest on (connect the calibration to both "
                         "chained Samplers, the first returning with leftover noise, or use the Two-Pass Sampler)")
    two = True if len({h.key for h in handles}) > 1 else None
    job = JobInfo(handles[0].config, steps, embeds.mode, embeds.width, embeds.height, two, handles[0].name, split)
    policy, note = build_policy(settings, job)
    cache = StepCache(policy, steps, split=split, storage=settings.storage, note=note)
    if carried:
        reason = _resume(cache, carried, latent, begin)
        if reason:
            cache = StepCache(policy, steps, split=split, storage=settings.storage, note=note)
            cache.note = "; ".join(filter(None, [note, f"started afresh at step {begin}: {reason}"]))
    elif begin > 0 and policy.skips:
        cache.note = "; ".join(filter(None, [note, f"started at step {begin} without a previous pass's cache state "
                                                     "(its LATENT carries none)"]))
    return JobCache(cache, settings, job)


def _resume(cache: StepCache, carried: dict, latent: dict, begin: int) -> str:
    """Load a previous pass's state into ``cache``; '' on success, else why not."""
    if carried.get("fingerprint") != _fingerprint(latent["samples"]):
        return "the LATENT was changed after the pass that carried the cache state"
    try:
        cache.load_state_dict(carried["state"])
    except (ValueError, KeyError) as err:
        return str(err)
    if cache.next_step != begin:
        return f"the previous pass ended at step {cache.next_step}, this one starts at {begin}"
    return ""


def finish(job_cache: JobCache | None, tel, latent: torch.Tensor, schedule: dict, leftover: bool,
           handles: Sequence, cfg: float) -> dict:
    """Log the job's line, record it in the telemetry, save a finished calibration; returns the
    LATENT entries that hand the state to a following pass."""
    if job_cache is None:
        return {}
    cache, settings, job = job_cache.cache, job_cache.settings, job_cache.job
    more = leftover and schedule["end_step"] < schedule["steps"]
    if isinstance(cache.policy, Calibrate) and not more:
        family, _ = model_family(job)
        cal = cache.calibration(settings.name, dict(
            models=[h.describe() for h in handles], files=[h.name for h in handles],
            loras=[[f"{c.lora.name} x{c.strength:g} ({c.mode})" for c in h.loras] for h in handles], shift=schedule.get("shift"),
            scheduler=schedule.get("scheduler"), cfg=cfg, width=job.width, height=job.height, mode=job.mode,
            family=family, split=cache.split, rule=calibration_rule(family, bool(job.two_experts))))
        path = cal.save(calibration_dir())
        log.info("WanFit: calibration %r saved to %s", settings.name, path)
        cache.note = "; ".join(filter(None, [cache.note, f"saved calibration {settings.name!r} (user directory, "
                                                         f"wanfit/step_cache/{path.name})"]))
    report = cache.report()
    log.info("%s", report["line"])
    tel.record_step_cache(report)
    if not more:
        return {}
    return {CACHE_KEY: {"state": cache.state_dict(), "fingerprint": _fingerprint(to_comfy_latent(latent))}}
