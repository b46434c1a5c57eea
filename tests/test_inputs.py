"""The run-time input check (nodes/inputs.py), the graph shield (nodes/shield.py), the /prompt
graph check's one-message rules (nodes/graph.py) and calibration names, without a server."""
from __future__ import annotations

import json

import pytest
import torch

import factory
from wanfit.nodes import cache, comfy, graph, inputs, sample, shield
from wanfit.nodes.encode import WanFitEmptyEmbeds
from wanfit.nodes.load import ModelHandle
from wanfit.nodes.sample import WanFitSampler
from wanfit.nodes.types import ImageEmbeds, TextEmbeds
from wanfit.optim.step_cache import load_calibration, list_calibrations
from wanfit.optim.tiling import TilingOptions
from wanfit.wan.checkpoint import open_checkpoint

STEPS = ("INT", {"default": 20, "min": 1, "max": 10000})


@pytest.mark.parametrize("value, expected", [(4, 4), (4.0, 4), (2.5, 2), ("7", 7), (1e-07, 0)])
def test_integers_convert_as_comfyui_converts_them(value, expected):
    assert inputs.convert("steps", ("INT", {"min": 0, "max": 10}), value) == expected


@pytest.mark.parametrize("value, needle", [
    (10**9, "steps 1000000000: must be at most 10000"), (2**64, "at most 10000"), (1e308, "at most 10000"),
    (0, "steps 0: must be at least 1"), (float("nan"), "an integer is needed"), (True, "an integer is needed"),
    ("many", "an integer is needed"), ([1], "an integer is needed"), (None, "an integer is needed"),
])
def test_integers_out_of_range_or_of_another_type_are_refused_by_name(value, needle):
    with pytest.raises(ValueError, match="^WanFit - steps") as err:
        inputs.convert("steps", STEPS, value)
    assert needle in str(err.value)


def test_floats_booleans_strings_and_choices():
    cfg = ("FLOAT", {"min": 0.0, "max": 100.0})
    assert inputs.convert("cfg", cfg, 3) == 3.0 and isinstance(inputs.convert("cfg", cfg, 3), float)
    for bad, needle in ((float("inf"), "finite"), (float("nan"), "finite"), ("lots", "a number"), (1e308, "at most")):
        with pytest.raises(ValueError, match=needle):
            inputs.convert("cfg", cfg, bad)
    assert inputs.convert("add_noise", ("BOOLEAN", {}), 1) is True
    with pytest.raises(ValueError, match="true or false"):
        inputs.convert("add_noise", ("BOOLEAN", {}), "no")  # bool("no") would be True
    assert inputs.convert("positive", ("STRING", {}), 5) == "5"
    with pytest.raises(ValueError, match="text is needed"):
        inputs.convert("positive", ("STRING", {}), {"a": 1})
    assert inputs.convert("dtype", (["bf16", "fp32"],), "fp32") == "fp32"
    with pytest.raises(ValueError, match=r"dtype '\\u2603': not one of the choices \(bf16, fp32\)"):
        inputs.convert("dtype", (["bf16", "fp32"],), "\u2603")
    with pytest.raises(ValueError, match=r"\.\.\.\)$"):  # a long list is cut short
        inputs.convert("file", ([f"f{i}" for i in range(20)],), "x")
    long = "x" * 10_000
    with pytest.raises(ValueError) as err:
        inputs.convert("dtype", (["bf16"],), long)
    assert len(str(err.value)) < 200  # a huge value is not echoed whole
    with pytest.raises(ValueError, match=r"^WanFit - steps \(a TilingOptions\): an integer is needed$"):
        inputs.convert("steps", STEPS, TilingOptions())  # an object over a link: its type, never its repr


def test_linked_objects_must_be_what_their_socket_promises(tmp_path):
    name = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    ckpt = open_checkpoint(factory.write_models(tmp_path, [name])[name])
    assert inputs.convert("tiling", ("WANFIT_VAE_TILING",), TilingOptions()) == TilingOptions()
    with pytest.raises(ValueError, match="tiling: a Checkpoint arrived where WANFIT_VAE_TILING belongs"):
        inputs.convert("tiling", ("WANFIT_VAE_TILING",), ckpt, required=False)
    with pytest.raises(ValueError, match="image_embeds -1000000000.0: a plain value where a link"):
        inputs.convert("image_embeds", ("WANFIT_IMAGE_EMBEDS",), -1e9)
    assert inputs.convert("tiling", ("WANFIT_VAE_TILING",), None, required=False) is None  # unconnected
    with pytest.raises(ValueError, match="nothing arrived"):
        inputs.convert("model", ("WANFIT_MODEL",), None)
    with pytest.raises(ValueError, match="LATENT without samples"):
        inputs.convert("latent", ("LATENT",), {"noise": 1})
    with pytest.raises(ValueError, match=r"IMAGE is \[frames"):
        inputs.convert("start_image", ("IMAGE",), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="^WanFit - latent: links to node 9"):
        inputs.convert("latent", ("LATENT",), inputs.REFUSED_LINK + " links to node 9, which is not in the prompt")


def test_check_refuses_undeclared_and_missing_inputs():
    with pytest.raises(ValueError, match="- bogus: not an input of WanFit Empty Embeds"):
        inputs.check(WanFitEmptyEmbeds, {"width": 32, "height": 32, "frames": 5, "bogus": 1})
    with pytest.raises(ValueError, match="frames: required, missing"):
        inputs.check(WanFitEmptyEmbeds, {"width": 32, "height": 32})
    assert inputs.check(WanFitEmptyEmbeds, {"width": 32, "height": 32}, {"frames"}) == {"width": 32, "height": 32}


def test_a_node_refuses_its_inputs_before_any_work(monkeypatch):
    """The checks run in the node's own function (what ComfyUI calls), before the schedule or
    the model: a step count that would allocate gigabytes costs nothing."""
    monkeypatch.setattr(sample, "schedule_sigmas", lambda *a: pytest.fail("work started"))
    handle, text, embeds = object.__new__(ModelHandle), TextEmbeds(torch.zeros(1), torch.zeros(1)), ImageEmbeds(32, 32, 5)
    with pytest.raises(ValueError, match="steps 1000000000: must be at most 10000"):
        WanFitSampler().run(handle, text, embeds, 10**9, 1.0, 5.0, 0, "euler", 0, 4, True, False)
    with pytest.raises(ValueError, match="seed 18446744073709551616: must be at most"):
        WanFitSampler().run(steps=4, cfg=1.0, shift=5.0, seed=2**64, scheduler="euler", start_step=0, end_step=4,
                            add_noise=True, return_with_leftover_noise=False, model=handle, text_embeds=text,
                            image_embeds=embeds)
    with pytest.raises(ValueError, match="text_embeds: nothing arrived"):
        WanFitSampler().run(handle, None, embeds, 4, 1.0, 5.0, 0, "euler", 0, 4, True, False)
    with pytest.raises(ValueError, match="frames 80: Wan needs 4n"):  # the node's own check, on the values it got
        WanFitEmptyEmbeds().embeds(width=32, height=32, frames=80)


# --- the graph shield -----------------------------------------------------------------------

class _Out:
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}


class _Core:
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (["a.png"],)}}


CLASSES = {**graph.NODES, "Save": _Out, "Load": _Core}


def _prompt() -> dict:
    """VAE loader and Empty Embeds -> Sampler -> VAE Decode -> an output node."""
    return {
        "1": {"class_type": "WanFitVAELoader", "inputs": {"file": "vae.safetensors"}},
        "2": {"class_type": "WanFitEmptyEmbeds", "inputs": {"width": 32, "height": 32, "frames": 5}},
        "3": {"class_type": "WanFitSampler", "inputs": {"image_embeds": ["2", 0], "model": ["9", 0]}},
        "4": {"class_type": "WanFitVAEDecode", "inputs": {"vae": ["1", 0], "latent": ["3", 0], "tiling": ["8", 0]}},
        "5": {"class_type": "Save", "inputs": {"images": ["4", 0]}},
    }


def test_the_shield_replaces_every_link_the_executor_cannot_follow():
    prompt = _prompt()
    prompt["3"]["inputs"].update(latent=["3", 0], text_embeds=["2"], seed=["2", True])
    prompt["2"]["inputs"]["width"] = ["1", 4]
    prompt.update({"6": 7, "7": {"inputs": {}}, "8": {"class_type": "Gone", "inputs": {}}})
    problems = shield.shield(prompt, CLASSES, graph.NODES)
    texts = [text for _, text in problems]
    for needle in ("node 6 is not an object", "node 7 has no class_type", "class_type 'Gone', which is not installed",
                   "input model: links to node 9, which is not in the prompt",
                   "input tiling: links to node 8, which is not in the prompt",
                   "input text_embeds: a link is [node_id, output_index], got ['2']",
                   "input seed: output index True is not a whole number",
                   "input width: links to output 4 of node 1 (WanFitVAELoader), which has 1",
                   "input latent: closes a loop of links through nodes 3"):
        assert any(needle in text for text in texts), (needle, texts)
    assert set(prompt) == {"1", "2", "3", "4", "5"}
    for node in prompt.values():  # every link left points at an existing node's existing output
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt and 0 <= value[1] < len(CLASSES[prompt[value[0]]["class_type"]].RETURN_TYPES)
    assert shield.shield(prompt, CLASSES, graph.NODES) == []  # what is left is safe


def test_deep_chains_are_cut_before_the_executor_recurses_too_far():
    prompt = {str(i): {"class_type": "Load", "inputs": {"image": "a.png", "x": [str(i + 1), 0]}} for i in range(400)}
    prompt["400"] = {"class_type": "Load", "inputs": {"image": "a.png"}}
    problems = shield.shield(prompt, CLASSES, graph.NODES)
    assert len(problems) == 1 and "deeper than 300 links" in problems[0][1]


def test_problems_are_reported_where_every_comfyui_validates():
    prompt = _prompt()
    problems = shield.shield(prompt, CLASSES, graph.NODES)
    where = shield.report_at(prompt, CLASSES, problems, graph.NODES)
    # node 3 (the Sampler) is reached through the decode's required latent: its own problem is its own;
    # the decode's optional tiling is not validated in 2024, but the decode itself is
    assert set(where) == {"3", "4"} and "model" in where["3"][0] and "tiling" in where["4"][0]
    prompt = _prompt()
    prompt["3"]["inputs"]["latent"] = ["77", 0]
    prompt["4"]["inputs"]["latent"] = "a value"  # the sampler now hangs off nothing ComfyUI validates
    prompt["4"]["inputs"].pop("tiling")
    problems = shield.shield(prompt, CLASSES, graph.NODES)
    where = shield.report_at(prompt, CLASSES, problems, graph.NODES)
    assert list(where) == ["4"]  # the output's first WanFit node
    assert any("node 3 (WanFitSampler) input latent: links to node 77" in text for text in where["4"])


def test_check_prompt_reports_each_mistake_once(monkeypatch):
    monkeypatch.setattr(comfy, "node_classes", lambda: CLASSES)
    monkeypatch.setattr(comfy, "list_models", lambda kind: ["vae.safetensors"])
    prompt = _prompt()
    prompt["3"]["inputs"]["model"] = ["1", 0]
    prompt["2"]["inputs"].update(frames=2000)  # above ComfyUI's max: its message, not also our 4n+1
    graph.check_prompt({"prompt": prompt})
    assert graph.problem("2") is None
    prompt["2"]["inputs"].update(frames=80)  # ComfyUI lets it through: ours
    graph.check_prompt({"prompt": prompt})
    assert "frames 80" in graph.problem("2")
    prompt["2"]["inputs"].update(frames=5)
    prompt["3"]["inputs"]["image_embeds"] = -1e9  # a plain value where a link belongs: ComfyUI says nothing
    graph.check_prompt({"prompt": prompt})
    assert "image_embeds -1000000000.0: a plain value" in graph.problem("3")


def test_the_same_problem_at_two_chained_nodes_is_reported_downstream(monkeypatch):
    found = {"3": [("k", "same")], "4": [("k", "same"), ("j", "other")], "1": [("j", "other")]}
    kept = graph.once(_prompt(), found)
    assert kept == {"4": [("k", "same"), ("j", "other")]}  # 3 and 1 feed 4


# --- calibration names ----------------------------------------------------------------------

def test_calibration_names_are_names(tmp_path):
    folder = tmp_path / "user" / "wanfit" / "step_cache"
    folder.mkdir(parents=True)
    outside = tmp_path / "planted.json"
    outside.write_text(json.dumps({"name": "planted", "steps": 2, "mag_ratios": [1.0] * 4, "mag_std": [0.0] * 4,
                                   "teacache": {}}))
    (folder / "link.json").symlink_to(outside)
    assert list_calibrations(folder) == []  # a link leading out is not listed
    for name in ("../../../planted", "link"):
        with pytest.raises(FileNotFoundError) as err:
            load_calibration(folder, name)
        assert str(tmp_path) not in str(err.value)  # where the server keeps it is nobody's business
    with pytest.raises(FileNotFoundError):
        load_calibration(folder, str(outside.with_suffix("")))
    (folder / "good.json").write_text("{not json")
    with pytest.raises(ValueError, match="^calibration 'good': not a WanFit") as err:
        load_calibration(folder, "good")
    assert str(tmp_path) not in str(err.value)


def test_cache_node_refuses_an_unlisted_calibration(monkeypatch, tmp_path):
    monkeypatch.setattr(comfy, "user_directory", lambda: str(tmp_path))
    (tmp_path / "planted.json").write_text("{}")
    with pytest.raises(ValueError, match="ratios 'calibration: ../../planted': not one of the choices"):
        cache.WanFitMagCache().make(0.1, 2, 0.2, "calibration: ../../planted", "compute", False)
