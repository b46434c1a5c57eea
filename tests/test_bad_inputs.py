"""Bad jobs over HTTP: each is refused at /prompt (400 with node_errors) or fails in history
with a message naming the problem, and the server then runs the next good job normally."""
from __future__ import annotations

import itertools
import json

import pytest

from e2e import NOT_UMT5, api_workflow, error_text, node_of, small, upload_image, wan_models  # noqa: F401

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(wan_models, comfy_server):
    upload_image(comfy_server)
    return comfy_server


def _t2v(frames: int = 5) -> dict:
    prompt = small(api_workflow("wan21_t2v_1.3b_low_ram"), size=32)
    prompt[node_of(prompt, "WanFitEmptyEmbeds")]["inputs"]["frames"] = frames
    return prompt


def _i2v(frames: int = 5) -> dict:
    prompt = small(api_workflow("wan22_i2v_a14b_61f_32gb"), size=32)
    prompt[node_of(prompt, "WanFitImageToVideoEncode")]["inputs"]["frames"] = frames
    return prompt


def _rejected(server, prompt: dict, node_type: str, *needles: str) -> None:
    status, reply = server.client().queue_prompt(prompt)
    assert status == 400, reply
    node_id = node_of(prompt, node_type)
    errors = reply["node_errors"].get(node_id)
    assert errors, f"no node_errors for {node_type} ({node_id}): {json.dumps(reply)[:2000]}"
    text = json.dumps(errors["errors"])
    for needle in needles:
        assert needle in text, text


_SEEDS = itertools.count(1000)


def _good_job_runs(server) -> None:
    """A fresh seed each time, so ComfyUI's output cache cannot answer for the sampler."""
    prompt = _t2v()
    prompt[node_of(prompt, "WanFitSampler")]["inputs"]["seed"] = next(_SEEDS)
    entry = server.client().run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    assert entry["outputs"][node_of(prompt, "SaveAnimatedWEBP")]["images"]


def test_frames_not_4n_plus_1(server):
    _rejected(server, _t2v(frames=80), "WanFitEmptyEmbeds", "frames 80", "4n+1")
    i2v = _i2v()
    i2v[node_of(i2v, "WanFitImageToVideoEncode")]["inputs"]["frames"] = 62
    _rejected(server, i2v, "WanFitImageToVideoEncode", "4n+1")
    _good_job_runs(server)


def test_size_not_a_multiple_of_16(server):
    prompt = _t2v()
    prompt[node_of(prompt, "WanFitEmptyEmbeds")]["inputs"]["width"] = 72
    _rejected(server, prompt, "WanFitEmptyEmbeds", "72x32", "multiples of 16")
    _good_job_runs(server)


def test_missing_start_image(server):
    prompt = _i2v()
    del prompt[node_of(prompt, "WanFitImageToVideoEncode")]["inputs"]["start_image"]
    _rejected(server, prompt, "WanFitImageToVideoEncode", "start_image")
    _good_job_runs(server)


def test_text_encoder_that_is_not_umt5(server):
    prompt = _t2v()
    prompt[node_of(prompt, "WanFitTextEncoderLoader")]["inputs"]["file"] = NOT_UMT5
    _rejected(server, prompt, "WanFitTextEncoderLoader", NOT_UMT5, "Wan VAE", "UMT5")
    _good_job_runs(server)


def test_t2v_model_in_the_i2v_path(server):
    prompt = _i2v()
    for node in prompt.values():
        if node["class_type"] == "WanFitModelLoader":
            node["inputs"]["file"] = node["inputs"]["file"].replace("i2v", "t2v")
    entry = server.client().run(prompt, timeout=120)
    assert entry["status"]["status_str"] == "error"
    message = error_text(entry)
    assert "wan2.2_t2v_high_noise_14B_fp8_scaled" in message and "text-to-video" in message, message
    assert "Image-to-Video Encode" in message, message
    _good_job_runs(server)


def test_cancel_stops_between_steps(server):
    """/interrupt during a long sampler run stops it within a step or two; the next job runs."""
    import time

    client = server.client()
    prompt = _t2v(frames=81)
    inputs = prompt[node_of(prompt, "WanFitSampler")]["inputs"]
    inputs.update(steps=5000, end_step=5000, seed=next(_SEEDS))
    status, reply = client.queue_prompt(prompt)
    assert status == 200, reply
    deadline = time.monotonic() + 60
    while not client.queue()["queue_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(4.0)  # past text encode and model load, into the steps
    client.interrupt()
    t = time.monotonic()
    entry = client.wait(reply["prompt_id"], timeout=60)
    assert time.monotonic() - t < 10, "the sampler did not stop between steps"
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in kinds, kinds
    _good_job_runs(server)
