"""Sparse attention and compiled blocks through a real ComfyUI: the bundled A14B image-to-video
graph (two chained Samplers, each expert with its LoRA) with a WanFit Sparse Attention and a
WanFit Compile node after each LoRA node, queued over HTTP on the factory models.

The compile node runs Dynamo with the eager backend here (the graphs are captured and checked,
no C++ build in the server: tests/test_compile_slow.py builds Inductor kernels)."""
from __future__ import annotations

import json
import re

import pytest

from e2e import api_workflow, build, node_of, upload_image, wan_models  # noqa: F401

pytestmark = pytest.mark.e2e


def test_sparse_attention_and_compiled_blocks_over_http(wan_models, comfy_server):
    upload_image(comfy_server)
    prompt = build.resize(api_workflow("wan22_i2v_a14b_81f_32gb"), width=64, height=64, steps=4, frames=17)
    embeds = node_of(prompt, "WanFitImageToVideoEncode")
    samplers = [k for k, v in prompt.items() if v["class_type"] == "WanFitSampler"]
    for n, key in enumerate(samplers):
        sparse_id, compile_id = str(90 + 2 * n), str(91 + 2 * n)
        prompt[sparse_id] = {"class_type": "WanFitSparseAttention", "inputs": {
            "model": prompt[key]["inputs"]["model"], "image_embeds": [embeds, 0], "pattern": "radial", "decay": 0.2,
            "attention_sink": True, "window_frames": 2, "window_rows": 8, "window_columns": 8, "dense_steps": 1,
            "dense_blocks": 1, "granularity": "token"}}
        prompt[compile_id] = {"class_type": "WanFitCompile", "inputs": {
            "model": [sparse_id, 0], "compile_backend": "eager", "compile_mode": "default"}}
        prompt[key]["inputs"]["model"] = [compile_id, 0]
    before = len(comfy_server.log())  # the server is shared: read only what this job logged
    entry = comfy_server.client().run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert entry["outputs"][node_of(prompt, "WanFitSaveVideo")]["images"]
    log = comfy_server.log()[before:]
    # the node says what is kept for the video's grid: 5 latent frames of 4 x 4 tokens
    assert re.search(r"sparse attention radial \(decay 0\.2, sink on frame 0\), dense in the first 1 step and "
                     r"first 1 block\. 5x4x4 = 80 tokens: [\d.]+ % of the attention computed", log), log[-3000:]
    lines = [line for line in log.splitlines() if "WanFit sampling:" in line]
    assert len(lines) == 2, lines  # one per Sampler
    # the first pass runs step 0 dense and step 1 sparse; the second pass steps 2 and 3 sparse
    assert "(1 calls sparse, 1 dense" in lines[0] and "(2 calls sparse, 0 dense" in lines[1], lines
    assert all("compiled blocks (eager)" in line for line in lines), lines
    # compiled once in the first pass; the other expert and later steps reuse it
    assert re.search(r"warm-up [\d.]+ s, [1-9]\d* graph", lines[0]) and "warm-up 0.0 s, 0 graph" in lines[1], lines
    assert "fell back" not in log
