"""A step cache through a real ComfyUI: the bundled A14B image-to-video graph (two chained
Samplers) with one MagCache node wired into both, queued over HTTP on the factory models."""
from __future__ import annotations

import json
import re

import pytest

from e2e import api_workflow, build, node_of, upload_image, wan_models  # noqa: F401

pytestmark = pytest.mark.e2e


def test_magcache_across_two_chained_samplers_over_http(wan_models, comfy_server):
    upload_image(comfy_server)
    prompt = build.resize(api_workflow("wan22_i2v_a14b_81f_32gb"), width=32, height=32, steps=10, frames=5)
    prompt["90"] = {"class_type": "WanFitMagCache", "inputs": {
        "threshold": -1.0, "K": -1, "retention_ratio": -1.0, "ratios": "wan2.2_i2v_A14B",
        "residual_device": "cpu", "allow_short_schedules": False}}
    samplers = [k for k, v in prompt.items() if v["class_type"] == "WanFitSampler"]
    assert len(samplers) == 2
    for key in samplers:
        prompt[key]["inputs"]["step_cache"] = ["90", 0]
    entry = comfy_server.client().run(prompt, timeout=240)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert entry["outputs"][node_of(prompt, "WanFitSaveVideo")]["images"]
    lines = [line for line in comfy_server.log().splitlines() if "WanFit MagCache (threshold 0.06, K 2" in line]
    assert len(lines) == 2, lines  # one per Sampler node
    # the second pass reports the whole job: its skips sit in the low-noise expert (i2v rule)
    skipped = re.search(r"(\d+) of 10 steps computed, (\d+) skipped \(steps ([\d, ]+)\)", lines[-1])
    assert skipped, lines[-1]
    assert min(int(s) for s in skipped.group(3).split(", ")) >= 5
