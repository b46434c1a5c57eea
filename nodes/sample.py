"""Sampler nodes: one pass of a flow-matching schedule (KSamplerAdvanced-style), and the
two-expert Wan 2.2 A14B pass pair. The DiT is read from its file when the node runs; one model
is held at a time (``stages``), so the two experts are never both in memory."""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..optim import loading
from ..optim.context import UNIFORM, ContextWindows
from ..optim.telemetry import Telemetry
from ..wan.denoise import Conditioning, make_denoiser
from ..wan.sampling import sample, seeded_noise
from ..wan.schedulers import MAX_STEPS, SCHEDULES, SOLVERS, boundary_step, schedule_sigmas
from . import cache as step_caches
from . import comfy, multigpu
from .load import ModelHandle
from .memory import JobPlan, plan_job
from .pairing import pairing_problem
from .speed import PassSpeed
from .stages import get_model, release_model
from .types import (SCHEDULE_KEY, SOLVER_STATE_KEY, ImageEmbeds, TextEmbeds, from_comfy_latent,
                    to_comfy_latent)

log = logging.getLogger("WanFit")
CATEGORY = "WanFit/sampling"
PLAN_KEY = "wanfit_plan"
TELEMETRY_KEY = "wanfit_telemetry"
BOUNDARIES = {"i2v": 0.900, "t2v": 0.875}  # official Wan 2.2 A14B expert switch (sigma)

def _out_of_memory(handle: ModelHandle, job: JobPlan, err: BaseException) -> RuntimeError:
    swapped = job.swap.blocks_to_swap
    return RuntimeError(
        f"out of GPU memory while sampling with {handle.describe()} ({swapped} of "
        f"{handle.config.num_layers} blocks swapped): lower frames or resolution, raise blocks_to_swap on a "
        f"WanFit Memory node (now {swapped}), or load the model with weight_dtype fp8_e4m3fn_scaled. "
        f"Memory was released. ({err})")


def check_pairing(handle: ModelHandle, embeds: ImageEmbeds) -> None:
    """A clear error when the model and the embeds are for different tasks (the rules
    ``pairing.pairing_problem`` also applies at /prompt)."""
    image = "2.2" if embeds.first_latent is not None else "2.1" if embeds.y is not None else None
    problem = pairing_problem(handle.describe(), handle.config, image, embeds.clip_fea is not None,
                              embeds.width, embeds.height)
    if problem:
        raise ValueError(problem)
    y_dim = handle.config.in_dim - handle.config.out_dim
    if embeds.y is not None and embeds.y.shape[1] != y_dim:
        raise ValueError(f"model {handle.describe()} takes {y_dim} conditioning channels, the image embeds "
                         f"have {embeds.y.shape[1]}")


def latent_shape(handle: ModelHandle, embeds: ImageEmbeds) -> tuple[int, ...]:
    c = handle.config
    if embeds.y is not None:
        return (1, c.out_dim, *embeds.y.shape[2:])
    if embeds.first_latent is not None:
        return (1, c.out_dim, embeds.latent_frames, *embeds.first_latent.shape[3:])
    unit = 16 if c.out_dim == 48 else 8  # Wan 2.2 VAE (TI2V-5B) or Wan 2.1 VAE
    step = unit * c.patch_size[1]
    if embeds.width % step or embeds.height % step:
        raise ValueError(f"model {handle.describe()}: width x height {embeds.width}x{embeds.height} must be "
                         f"multiples of {step}")
    return (1, c.out_dim, embeds.latent_frames, embeds.height // unit, embeds.width // unit)


def _conditioning(handle: ModelHandle, text: TextEmbeds, embeds: ImageEmbeds, dtype: torch.dtype):
    clip = embeds.clip_fea if handle.config.clip else None
    ctx = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    y = ctx(embeds.y)
    return Conditioning(ctx(text.positive), y, ctx(clip)), Conditioning(ctx(text.negative), y, ctx(clip))


class _Progress:
    """ComfyUI progress bar per step, with a latent-to-RGB preview of x0 when ComfyUI's
    previews are on; Cancel raises between steps."""

    def __init__(self, total: int, offset: int):
        self.bar, self.total, self.offset = comfy.progress_bar(total), total, offset
        self.preview = comfy.latent_previewer()

    def __call__(self, step: int, steps: int, x, x0) -> None:
        value = step - self.offset + 1
        image = self.preview(x0) if self.preview is not None and x0 is not None else None
        if image is None:
            self.bar.update_absolute(value, self.total)
        else:
            self.bar.update_absolute(value, self.total, image)
        comfy.throw_if_interrupted()


def run_pass(handle: ModelHandle, text: TextEmbeds, embeds: ImageEmbeds, latent: torch.Tensor,
             sigmas: torch.Tensor, solver: str, cfg: float, start: int, end: int, noise, add_noise: bool,
             leftover: bool, state, callback, tel: Telemetry, cache: step_caches.JobCache | None = None,
             windows: ContextWindows | None = None):
    """One pass with ``handle``'s model, planned before any weight is read; memory is released
    if it fails, runs out of memory or is cancelled. ``cache`` (a step cache) wraps the block
    stack; ``windows`` runs the DiT window by window; a Multi-GPU model (``handle.parallel``)
    runs it split over its devices (``nodes/multigpu.py``). Returns the result and the plan."""
    check_pairing(handle, embeds)
    check_windows(windows, cache, latent.shape[2], range(start, min(end, len(sigmas) - 1)))
    split = multigpu.plan_split(handle, cfg)
    job = plan_job(handle, embeds, cfg, comfy.compute_device(), handle.memory, cache, windows, split)
    log.info("WanFit plan: %s", job.text)
    args = (handle, text, embeds, latent, sigmas, solver, cfg, start, end, noise, add_noise, leftover, state,
            callback, tel, cache, windows, job)
    if split is None:
        return _run(*args, None), job
    if split.batch_cfg is None:
        split.batch_cfg = job.batch_cfg  # rank 0 decides; every rank batches the same way
    spec = dict(text=text, embeds=embeds, latent=latent, sigmas=sigmas, solver=solver, cfg=cfg, start=start,
                end=end, noise=noise, add_noise=add_noise, leftover=leftover, state=state,
                cache=multigpu.cache_spec(cache), windows=windows)
    result, answers = multigpu.run_split(split, handle, spec, lambda s: _run(*args, s))
    for answer in answers:
        log.info("WanFit plan: %s", answer["plan"])
    return result, dataclasses.replace(job, text=" ".join([job.text] + [a["plan"] for a in answers]))


def _run(handle: ModelHandle, text: TextEmbeds, embeds: ImageEmbeds, latent: torch.Tensor, sigmas: torch.Tensor,
         solver: str, cfg: float, start: int, end: int, noise, add_noise: bool, leftover: bool, state, callback,
         tel: Telemetry, cache: step_caches.JobCache | None, windows: ContextWindows | None, job: JobPlan,
         split: multigpu.Split | None):
    """The pass itself, on this rank's device; with ``split``, this rank's share of each DiT call
    (and Cancel agreed between the ranks before each call instead of checked here alone)."""
    try:
        with tel.stage("load"):
            prepared = get_model(handle, job.swap)
        if prepared.swapper is not None:
            tel.watch(prepared.swapper)
        positive, negative = _conditioning(handle, text, embeds, loading.DTYPES[handle.compute_dtype])
        first = embeds.first_latent
        run_blocks = prepared.run_blocks if split is None else split.wrap(prepared.run_blocks)
        speed = PassSpeed(handle, prepared.model, parallel=split is not None)
        run_blocks = speed.wrap(run_blocks)
        if cache is not None:
            run_blocks = cache.wrap(run_blocks, str(handle.key))
        denoise = make_denoiser(prepared.model, positive, negative, cfg,
                                batch_cfg=job.batch_cfg if split is None else split.batch_cfg,
                                run_blocks=_cancellable(run_blocks) if split is None else run_blocks,
                                first_latent=first, windows=windows)
        def on_step(step: int, steps: int, x, x0) -> None:
            tel.on_step(step, steps, x, x0)
            check_finite(handle, step, steps, start, end, x0)
            callback(step, steps, x, x0)

        with torch.inference_mode(), tel.stage("sample"):
            result = sample(denoise, latent, sigmas, solver, start_step=start, end_step=end, noise=noise,
                            add_noise=add_noise, return_with_leftover_noise=leftover, solver_state=state,
                            callback=on_step)
            if first is not None and start < min(end, len(sigmas) - 1):
                left = float(sigmas[min(end, len(sigmas) - 1)]) if leftover else 0.0
                result.latent = result.latent.clone()
                result.latent[:, :, :1] = first.to(result.latent) / (1 - left)  # the image frame, exactly
        speed.record(tel)
        return result
    except torch.OutOfMemoryError as err:
        release_model()
        raise _out_of_memory(handle, job, err) from err
    except BaseException:
        release_model()
        raise


def check_finite(handle: ModelHandle, step: int, steps: int, start: int, end: int, x0) -> None:
    """Stop at the first step whose prediction is not finite: it would decode to a black video
    reported as a success."""
    if x0 is not None and not bool(torch.isfinite(x0).all()):
        raise ValueError(
            f"step {step + 1} of {steps} (this pass runs steps {start + 1}..{min(end, steps)}) with "
            f"{handle.describe()} gave NaN or infinite values. Likely causes: fp16 overflow (load the model "
            f"with compute_dtype bf16), NaN weights in {handle.name} (download it again), or a NaN input "
            "(a LATENT from another node)")


def _cancellable(run_blocks):
    """Cancel is honoured before every DiT call (each CFG branch, each context window), not
    only between steps."""
    def run(state, call):
        comfy.throw_if_interrupted()
        return run_blocks(state, call)
    return run


def check_windows(windows: ContextWindows | None, cache, frames: int, steps) -> None:
    """Context windows that break on this video, or that move every step under a step cache
    (its state is kept per window index), are refused before any weight is read."""
    if windows is None:
        return
    windows.check(frames, steps)
    if cache is not None and windows.active(frames) and windows.schedule in UNIFORM and cache.cache.policy.skips:
        raise ValueError(f"a step cache keeps one state per context window, but {windows.schedule} windows cover "
                         "other frames every step; use the standard_static or batched schedule with a step cache")


def _initial(handle: ModelHandle, embeds: ImageEmbeds, latent: dict | None, schedule: dict):
    """Starting latent (normalised) and solver state, from a LATENT input or zeros."""
    shape = latent_shape(handle, embeds)
    if latent is None:
        return torch.zeros(shape), None
    x = from_comfy_latent(latent["samples"])
    if tuple(x.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"the input LATENT has shape {tuple(x.shape)}, but model {handle.describe()} with "
                         f"these embeds needs {shape}")
    state = latent.get(SOLVER_STATE_KEY)
    previous = latent.get(SCHEDULE_KEY)
    if state and previous:
        same = (all(previous.get(k) == schedule[k] for k in ("steps", "shift", "scheduler"))
                and previous.get("schedule", "wan") == schedule["schedule"])
        if not same or previous.get("end_step") != schedule["start_step"]:
            state = None  # a different schedule: start the solver afresh, as ComfyUI would
    return x, state


def _output(x: torch.Tensor, state, schedule: dict, jobs: list[JobPlan], tel: Telemetry,
            extra: dict | None = None) -> tuple[dict]:
    """The LATENT, carrying the solver memory, the plans, the job's telemetry and ``extra``
    (a step cache's state for the next pass)."""
    log.info("WanFit sampling: %s", tel.format())
    plans = [job.plan.to_dict() if job.plan is not None else {"note": job.text} for job in jobs]
    return ({"samples": to_comfy_latent(x), SOLVER_STATE_KEY: {k: v.cpu() for k, v in state.items()},
             SCHEDULE_KEY: schedule, PLAN_KEY: plans, TELEMETRY_KEY: tel.summary(), **(extra or {})},)


_COMMON = {
    "steps": ("INT", {"default": 20, "min": 1, "max": MAX_STEPS}),
    "shift": ("FLOAT", {"default": 5.0, "min": 0.01, "max": 100.0, "step": 0.01}),
    "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
    "scheduler": (list(SOLVERS), {"default": "unipc"}),
    "schedule": (list(SCHEDULES), {"default": "wan"}),
}


class WanFitSampler:
    """One sampling pass over steps start_step..end_step of a flow-matching schedule
    (KSamplerAdvanced-style). With return_with_leftover_noise the LATENT carries the noise
    left and the solver's memory, so a second Sampler (add_noise off, start_step = this
    end_step) continues exactly: that is how the two Wan 2.2 A14B experts chain."""

    DISPLAY_NAME = "WanFit Sampler"
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANFIT_MODEL",), "text_embeds": ("WANFIT_TEXT_EMBEDS",),
            "image_embeds": ("WANFIT_IMAGE_EMBEDS",),
            "steps": _COMMON["steps"], "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1}),
            "shift": _COMMON["shift"], "seed": _COMMON["seed"], "scheduler": _COMMON["scheduler"],
            "schedule": _COMMON["schedule"],
            "start_step": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS}),
            "end_step": ("INT", {"default": MAX_STEPS, "min": 0, "max": MAX_STEPS}),
            "add_noise": ("BOOLEAN", {"default": True}),
            "return_with_leftover_noise": ("BOOLEAN", {"default": False}),
        }, "optional": {"latent": ("LATENT",), "step_cache": ("WANFIT_STEP_CACHE",),
                        "context_windows": ("WANFIT_CONTEXT_WINDOWS",)}}

    def run(self, model: ModelHandle, text_embeds: TextEmbeds, image_embeds: ImageEmbeds, steps: int, cfg: float,
            shift: float, seed: int, scheduler: str, start_step: int, end_step: int, add_noise: bool,
            return_with_leftover_noise: bool, latent: dict | None = None, schedule: str = "wan",
            step_cache=None, context_windows: ContextWindows | None = None):
        end = min(end_step, steps)
        if start_step >= end:
            log.warning("WanFit Sampler: start_step %d is not before end_step %d (of %d steps): nothing is sampled, "
                        "the input latent passes through (as KSamplerAdvanced does)", start_step, end, steps)
        sigmas = schedule_sigmas(schedule, steps, shift)
        info = dict(steps=steps, shift=shift, scheduler=scheduler, schedule=schedule, start_step=start_step,
                    end_step=end)
        x, state = _initial(model, image_embeds, latent, info)
        noise = seeded_noise(seed, x.shape) if add_noise else None
        if noise is not None and context_windows is not None:
            noise = context_windows.noise(noise, seed)  # FreeNoise, when on
        cache = step_caches.start(step_cache, [model], image_embeds, info, sigmas, latent,
                                  leftover=return_with_leftover_noise)
        with Telemetry(comfy.compute_device()) as tel:
            result, job = run_pass(model, text_embeds, image_embeds, x, sigmas, scheduler, cfg, start_step, end,
                                   noise, add_noise, return_with_leftover_noise, state,
                                   _Progress(max(end - start_step, 1), start_step), tel, cache, context_windows)
            extra = step_caches.finish(cache, tel, result.latent, info, return_with_leftover_noise, [model], cfg)
        return _output(result.latent, result.solver_state, info, [job], tel, extra)


class WanFitTwoPassSampler:
    """Wan 2.2 A14B in one node: the high-noise expert runs the first steps, the low-noise
    expert the rest, with one schedule and solver memory across the switch. Switch at a step,
    or at a boundary sigma (0 = official: 0.900 for i2v, 0.875 for t2v). Only one expert is
    in memory at a time."""

    DISPLAY_NAME = "WanFit Two-Pass Sampler"
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        cfg = ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1})
        return {"required": {
            "high_noise_model": ("WANFIT_MODEL",), "low_noise_model": ("WANFIT_MODEL",),
            "text_embeds": ("WANFIT_TEXT_EMBEDS",), "image_embeds": ("WANFIT_IMAGE_EMBEDS",),
            "steps": _COMMON["steps"], "cfg_high": cfg, "cfg_low": cfg,
            "shift": _COMMON["shift"], "seed": _COMMON["seed"], "scheduler": _COMMON["scheduler"],
            "schedule": _COMMON["schedule"],
            "switch_at": (["step", "boundary"], {"default": "step"}),
            "switch_step": ("INT", {"default": 10, "min": 0, "max": MAX_STEPS}),
            "boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }, "optional": {"step_cache": ("WANFIT_STEP_CACHE",), "context_windows": ("WANFIT_CONTEXT_WINDOWS",)}}

    def run(self, high_noise_model: ModelHandle, low_noise_model: ModelHandle, text_embeds: TextEmbeds,
            image_embeds: ImageEmbeds, steps: int, cfg_high: float, cfg_low: float, shift: float, seed: int,
            scheduler: str, switch_at: str, switch_step: int, boundary: float, schedule: str = "wan",
            step_cache=None, context_windows: ContextWindows | None = None):
        check_pairing(high_noise_model, image_embeds)
        check_pairing(low_noise_model, image_embeds)
        sigmas = schedule_sigmas(schedule, steps, shift)
        if switch_at == "boundary":
            b = boundary or BOUNDARIES.get(high_noise_model.config.model_type, 0.875)
            k = boundary_step(sigmas, b)
        else:
            k = min(switch_step, steps)
        x = torch.zeros(latent_shape(high_noise_model, image_embeds))
        noise = seeded_noise(seed, x.shape)
        if context_windows is not None:
            noise = context_windows.noise(noise, seed)  # FreeNoise, when on: once, for both passes
        progress = _Progress(steps, 0)
        add_noise = k == 0  # nothing ran yet: the low expert starts from noise
        info = dict(steps=steps, shift=shift, scheduler=scheduler, schedule=schedule, start_step=0, end_step=steps)
        models = [high_noise_model, low_noise_model]
        cache = step_caches.start(step_cache, models, image_embeds, info, sigmas, split=k)
        with Telemetry(comfy.compute_device()) as tel:
            a, job_a = run_pass(high_noise_model, text_embeds, image_embeds, x, sigmas, scheduler, cfg_high, 0, k,
                                noise, True, True, None, progress, tel, cache, context_windows)
            b, job_b = run_pass(low_noise_model, text_embeds, image_embeds, a.latent, sigmas, scheduler, cfg_low,
                                k, steps, noise if add_noise else None, add_noise, False, a.solver_state, progress,
                                tel, cache, context_windows)
            extra = step_caches.finish(cache, tel, b.latent, info, False, models, cfg_low)
        return _output(b.latent, b.solver_state, info, [job_a, job_b], tel, extra)


NODES = {cls.__name__: cls for cls in (WanFitSampler, WanFitTwoPassSampler)}
