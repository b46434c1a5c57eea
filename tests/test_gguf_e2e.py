"""GGUF models through a real ComfyUI: the model loader lists .gguf files beside .safetensors
(diffusion_models / unet), the text-encoder loader a UMT5 GGUF, and the bundled graphs run
with them: the i2v A14B pair in Q8_0 (the 12 GB graph ships Q4_K_M), the 1.3B in F16."""
from __future__ import annotations

import json

import pytest

from e2e import GGUF_T5, api_workflow, node_of, small, upload_image, wan_models  # noqa: F401

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(wan_models, comfy_server):
    upload_image(comfy_server)
    return comfy_server


def _run(server, prompt: dict) -> None:
    entry = server.client().run(prompt, timeout=240)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert entry["outputs"][node_of(prompt, "WanFitSaveVideo")]["images"]


def test_the_loaders_list_gguf_files(server):
    info = server.client().object_info()
    models = info["WanFitModelLoader"]["input"]["required"]["file"][0]
    assert "wan2.2_i2v_high_noise_14B_Q4_K_M.gguf" in models and "wan2.1_t2v_1.3B_F16.gguf" in models
    assert any(m.endswith(".safetensors") for m in models)
    assert GGUF_T5 in info["WanFitTextEncoderLoader"]["input"]["required"]["file"][0]


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_i2v_pair_in_gguf_with_the_4_step_loras(server, quant):
    prompt = small(api_workflow("wan22_i2v_a14b_81f_12gb_gguf"), size=32)
    prompt[node_of(prompt, "WanFitImageToVideoEncode")]["inputs"]["frames"] = 5
    for node in prompt.values():
        if node["class_type"] == "WanFitModelLoader":
            node["inputs"]["file"] = node["inputs"]["file"].replace("Q4_K_M", quant)
    _run(server, prompt)


def test_f16_gguf_and_a_umt5_gguf(server):
    prompt = small(api_workflow("wan21_t2v_1.3b_low_ram"), size=32)
    prompt[node_of(prompt, "WanFitEmptyEmbeds")]["inputs"]["frames"] = 5
    loader = prompt[node_of(prompt, "WanFitModelLoader")]["inputs"]
    loader.update(file="wan2.1_t2v_1.3B_F16.gguf", weight_dtype="auto")
    prompt[node_of(prompt, "WanFitTextEncoderLoader")]["inputs"]["file"] = GGUF_T5
    _run(server, prompt)


def test_an_fp8_weight_format_on_a_gguf_file_is_refused(server):
    """The high-noise loader of a chained GGUF graph asked for fp8: current ComfyUI validates
    it at /prompt (400); the 2024 one does not validate what only an optional input (the
    second sampler's latent) reaches, so the loader refuses it when it runs, before any
    weight is read. Either way the message names the file and the setting."""
    prompt = small(api_workflow("wan22_i2v_a14b_81f_12gb_gguf"), size=32)
    prompt["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    status, reply = server.client().queue_prompt(prompt)
    if status == 400:
        text = json.dumps(reply["node_errors"]["1"])
    else:
        entry = server.client().wait(reply["prompt_id"], timeout=120)
        assert entry["status"]["status_str"] == "error"
        text = json.dumps(entry["status"])
        assert "WanFitSampler" not in {data.get("node_type") for kind, data in entry["status"]["messages"]
                                       if kind == "execution_error"}, "the sampler ran first"
    assert "wan2.2_i2v_high_noise_14B_Q4_K_M.gguf" in text and "GGUF" in text and "fp8_e4m3fn" in text, text
