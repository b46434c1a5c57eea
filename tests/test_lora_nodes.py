"""The WanFit LoRA node in-process (ComfyUI's hooks replaced) and at /prompt: validation, the
chain on the model handle, the sampler with LoRAs, and a held model taking a new strength
without reading its block weights from disk."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import factory
from e2e import api_workflow, small, upload_image, wan_models  # noqa: F401
from wanfit.nodes import NODE_CLASS_MAPPINGS, comfy, encode, load, sample, stages
from wanfit.nodes.lora import WanFitLoRA
from wanfit.optim import loading
from wanfit.optim.lora import LoraError

HIGH, LOW = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
LORA_HIGH = "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors"
LORA_LOW = "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors"
NAMES = [HIGH, LOW, LORA_HIGH, LORA_LOW, "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors",
         "wan2.1_t2v_1.3B_fp16.safetensors"]


class _Bar:
    def update_absolute(self, value, total=None, preview=None):
        pass


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    written = factory.write_models(root, NAMES)
    comfy_lora = root / "loras" / "comfy_format.safetensors"
    factory.write_lora(comfy_lora, "comfy", seed=3)  # made for the i2v tiny DiT (patch_embedding of 36 channels)
    written[comfy_lora.name] = comfy_lora
    written["a_vae.safetensors"] = root / "loras" / "a_vae.safetensors"
    shutil.copyfile(written["wan_2.1_vae.safetensors"], written["a_vae.safetensors"])
    return written


@pytest.fixture(autouse=True)
def no_comfy(monkeypatch, models):
    monkeypatch.setattr(comfy, "compute_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(comfy, "free_memory_cache", lambda: None)
    monkeypatch.setattr(comfy, "throw_if_interrupted", lambda: None)
    monkeypatch.setattr(comfy, "progress_bar", lambda total: _Bar())
    monkeypatch.setattr(comfy, "previews_enabled", lambda: False)
    monkeypatch.setattr(comfy, "list_models", lambda kind: sorted(models))
    monkeypatch.setattr(comfy, "model_path", lambda kind, name: str(models[name]))
    yield
    stages.release_model()


def _model(name=HIGH):
    return load.WanFitModelLoader().load(name, compute_dtype="fp32")[0]


def test_inputs_tooltips_and_validation():
    spec = NODE_CLASS_MAPPINGS["WanFitLoRA"].INPUT_TYPES()["required"]
    assert list(spec) == ["model", "lora_name", "strength", "lora_mode"]
    assert LORA_HIGH in spec["lora_name"][0] and spec["lora_mode"][0] == ["auto", "merged", "unmerged"]
    assert all("tooltip" in spec[k][1] for k in ("lora_name", "strength", "lora_mode"))
    assert WanFitLoRA.VALIDATE_OWN(LORA_HIGH) is True
    assert WanFitLoRA.VALIDATE_OWN(None) is True  # over a link: checked when it runs
    assert "not found in the ComfyUI loras folder" in WanFitLoRA.VALIDATE_OWN("nope.safetensors")
    message = WanFitLoRA.VALIDATE_OWN("a_vae.safetensors")
    assert "a_vae.safetensors: not a LoRA" in message


def test_the_node_chains_on_the_handle_and_checks_the_model():
    base = _model()
    one = WanFitLoRA().apply(base, LORA_HIGH, 1.0, "auto")[0]
    two = WanFitLoRA().apply(one, "comfy_format.safetensors", -0.5, "unmerged")[0]
    assert base.loras == () and len(one.loras) == 1 and [c.strength for c in two.loras] == [1.0, -0.5]
    assert two.key == base.key and two.lora_key != one.lora_key != base.lora_key
    assert LORA_HIGH in two.describe() and "x-0.5" in two.describe()
    with pytest.raises(LoraError, match="comfy_format.safetensors: this LoRA does not fit"):
        WanFitLoRA().apply(_model("wan2.1_t2v_1.3B_fp16.safetensors"), "comfy_format.safetensors", 1.0, "auto")
    with pytest.raises(ValueError, match="lora_mode 'fused'"):
        WanFitLoRA().apply(base, LORA_HIGH, 1.0, "fused")


def _run(model, text, embeds, steps=2, seed=0):
    return sample.WanFitSampler().run(model, text, embeds, steps, 1.0, 5.0, seed, "euler", 0, steps, True, False,
                                      schedule="simple")[0]["samples"]


def test_a_new_strength_on_the_held_model_reads_no_block_weight(monkeypatch):
    te = load.WanFitTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors")[0]
    text = encode.WanFitTextEncode().encode(te, "a cat walks", "blurry")[0]
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    embeds = encode.WanFitImageToVideoEncode().encode(vae, torch.rand(1, 40, 56, 3), 32, 32, 5)[0]
    base = _model()
    plain = _run(base, text, embeds)
    reads = []
    original = loading.LazyStateDict.__getitem__
    monkeypatch.setattr(loading.LazyStateDict, "__getitem__", lambda self, key: reads.append(key) or original(self, key))

    def matrices():  # block weight matrices read from the file
        return [k for k in reads if k.startswith("blocks.") and len(base.ckpt.shapes.get(k, ())) == 2]

    strong = _run(WanFitLoRA().apply(base, LORA_HIGH, 1.0, "auto")[0], text, embeds)
    assert reads and not matrices()  # same base held: only the small fixed-delta tensors were read
    assert stages.unmerged_loras(WanFitLoRA().apply(base, LORA_HIGH, 1.0, "auto")[0], stages._LOADED["key"][1])
    stages.release_model()
    fresh = _run(WanFitLoRA().apply(base, LORA_HIGH, 1.0, "auto")[0], text, embeds)  # merged as it loads
    assert matrices()
    held_model = stages._LOADED["model"]
    assert held_model.loras.unmerged is None and stages.unmerged_loras(
        WanFitLoRA().apply(base, LORA_HIGH, 1.0, "auto")[0], stages._LOADED["key"][1]) == []

    reads.clear()
    half = _run(WanFitLoRA().apply(base, LORA_HIGH, 0.5, "auto")[0], text, embeds)
    assert stages._LOADED["model"] is held_model
    assert reads and not matrices()
    scale = fresh.abs().max()
    assert (strong - fresh).abs().max() / scale < 0.08  # held + unmerged vs merged at load (fp8 rounding)
    assert (half - fresh).abs().max() > 1e-3 and (half - plain).abs().max() > 1e-3


@pytest.mark.e2e
def test_a_file_that_is_not_a_lora_is_refused_at_prompt(wan_models, comfy_server, comfy_models_dir):  # noqa: F811
    upload_image(comfy_server)
    bad = comfy_models_dir / "loras" / "not_a_lora_vae.safetensors"
    shutil.copyfile(wan_models["wan_2.1_vae.safetensors"], bad)
    prompt = small(api_workflow("wan22_i2v_a14b_61f_32gb"), size=32)
    # the low-noise one: the 2024 ComfyUI validates only what hangs off required inputs, and the
    # high-noise sampler reaches the graph's output through the optional latent input
    lora_node = next(k for k, n in prompt.items() if n["inputs"].get("lora_name") == LORA_LOW)
    prompt[lora_node]["inputs"]["lora_name"] = bad.name
    status, reply = comfy_server.client().queue_prompt(prompt)
    assert status == 400, reply
    errors = json.dumps(reply["node_errors"][lora_node]["errors"])
    assert "not_a_lora_vae.safetensors: not a LoRA" in errors
