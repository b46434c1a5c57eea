"""The Memory node and the plan every sampling pass makes before loading (in-process)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from test_nodes import _image_embeds, _model, _text, models, no_comfy  # noqa: F401 - shared fixtures
from wanfit.nodes import memory, sample, stages
from wanfit.optim import planner

HIGH = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"


def _plan(model, embeds, **settings):
    base = dict(budget_gb=0.0, reserve_gb=0.0, blocks_to_swap=-1, prefetch=1, pin_memory=True,
                offload_embeddings=False)
    return memory.WanFitMemory().plan(model, embeds, **{**base, **settings})


def _sample(model, embeds, steps=2):
    return sample.WanFitSampler().run(model, _text(), embeds, steps, 3.5, 5.0, 0, "euler", 0, steps, True, False)[0]


def test_cpu_without_budget_says_there_is_nothing_to_plan():
    model, embeds = _model(HIGH), _image_embeds()
    handle, image, text = _plan(model, embeds)
    assert "no VRAM budget" in text and handle.memory.budget_gb == 0.0
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.std() > 0  # a note, not blank


def test_budget_gives_a_plan_picture_and_it_rides_in_the_latent():
    model, embeds = _model(HIGH), _image_embeds()
    handle, image, text = _plan(model, embeds, budget_gb=0.05)
    assert "resident" in text and "tokens" in text
    # on the CPU it is a preview of a card, and says so before any GPU figure
    assert text.startswith("Preview for a GPU with 0.05 GiB") and "runs on cpu" in text.split(":")[0]
    assert image.ndim == 4 and image.shape[-1] == 3 and 0 <= image.min() and image.max() <= 1
    latent = _sample(handle, embeds)
    (plan,) = latent[sample.PLAN_KEY]
    assert plan["budget"] == int(0.05 * 2**30) and plan["resident"] + plan["swapped"] == handle.config.num_layers


def test_too_small_budget_fails_before_loading_and_names_the_minimum():
    model, embeds = _model(HIGH), _image_embeds()
    handle = replace(model, memory=memory.MemorySettings(budget_gb=1e-4, reserve_gb=0.0))
    with pytest.raises(planner.PlanError, match=r"GiB") as err:
        _sample(handle, embeds)
    assert err.value.min_budget > 1e-4 * 2**30
    assert stages._LOADED["model"] is None  # nothing was loaded


def test_out_of_memory_in_a_step_releases_and_names_the_knobs(monkeypatch):
    model, embeds = _model(HIGH), _image_embeds()
    real = sample.get_model

    def oom_model(handle, swap):
        prepared = real(handle, swap)

        def raise_oom(state, call):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(prepared, "run_blocks", raise_oom)
        return prepared

    monkeypatch.setattr(sample, "get_model", oom_model)
    with pytest.raises(RuntimeError, match=r"out of GPU memory .* lower frames or resolution, raise "
                                           r"blocks_to_swap .* fp8_e4m3fn_scaled\. Memory was released"):
        _sample(model, embeds)
    assert stages._LOADED["model"] is None


def test_latent_carries_the_job_telemetry():
    model, embeds = _model(HIGH), _image_embeds()
    tel = _sample(model, embeds, steps=3)[sample.TELEMETRY_KEY]
    assert tel["steps"] == 3 and len(tel["step_s"]) == 3 and all(t > 0 for t in tel["step_s"])
    assert set(tel["stages_s"]) == {"load", "sample"} and tel["host_rss_peak"] > 0
    assert tel["vram_peak_allocated"] is None  # CPU


def test_blocks_swapped_by_hand_keep_the_nodes_prefetch(monkeypatch):
    """A plan with every block resident says prefetch 0; blocks_to_swap set on the node must not
    turn that into synchronous copies (what bench/gpu_check.py's sampling part swaps)."""
    monkeypatch.setattr(memory.fp8, "scaled_mm_supported", lambda device: False)  # no CUDA to ask
    model, embeds = _model(HIGH), _image_embeds()
    by_hand = memory.MemorySettings(budget_gb=64.0, blocks_to_swap=1, prefetch=2)
    job = memory.plan_job(model, embeds, 3.5, torch.device("cuda"), by_hand)
    assert (job.plan.swapped, job.plan.prefetch) == (0, 0)
    assert (job.swap.blocks_to_swap, job.swap.prefetch) == (1, 2)
    planned = memory.plan_job(model, embeds, 3.5, torch.device("cuda"), replace(by_hand, blocks_to_swap=-1))
    assert (planned.swap.blocks_to_swap, planned.swap.prefetch) == (0, 0)
