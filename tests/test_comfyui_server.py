"""The pack as ComfyUI sees it: it imports under any folder name and every node is listed."""
import re

import pytest

from wanfit import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

pytestmark = pytest.mark.e2e


def test_object_info_lists_every_node(comfy_server):
    info = comfy_server.client().object_info()
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"nodes absent from /object_info: {missing}"
    for name in NODE_CLASS_MAPPINGS:
        assert info[name]["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        assert info[name]["category"].startswith("WanFit")


def test_pack_imported_without_failure(comfy_server):
    log = comfy_server.log()
    assert "ComfyUI-WanFit-under-test" in log, "the pack was not loaded from custom_nodes"
    failures = [line for line in log.splitlines() if re.search(r"IMPORT FAILED|Cannot import", line)]
    assert not [f for f in failures if "WanFit" in f], failures


def test_every_node_has_a_description():
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert (cls.__doc__ or "").strip(), f"{name} has no docstring"
        assert cls.DESCRIPTION == " ".join(cls.__doc__.split()), name


def test_widgets_carry_tooltips(comfy_server):
    """Every widget input of every node has a tooltip (shown by current ComfyUI; the 2024
    one passes the option through /object_info unchanged)."""
    info = comfy_server.client().object_info()
    missing = []
    for name in NODE_CLASS_MAPPINGS:
        for section in ("required", "optional"):
            for key, spec in info[name]["input"].get(section, {}).items():
                widget = isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")
                if widget and not (len(spec) > 1 and spec[1].get("tooltip")):
                    missing.append(f"{name}.{key}")
    assert not missing, missing
    tip = lambda node, section: info[node]["input"][section]["latent"][1].get("tooltip")  # noqa: E731
    assert "decode" in tip("WanFitVAEDecode", "required") and tip("WanFitSampler", "optional") != tip(
        "WanFitVAEDecode", "required")  # the decoder's latent is not the sampler's


def test_model_management_has_what_the_adapter_calls():
    """nodes/comfy.py calls these ComfyUI functions (some only on a GPU, which CI lacks):
    each must exist with a compatible signature in the ComfyUI under test."""
    import ast

    from comfy_server import find_comfyui

    root = find_comfyui()
    if root is None:
        pytest.skip("no ComfyUI checkout")
    tree = ast.parse((root / "comfy" / "model_management.py").read_text())
    params = {f.name: [a.arg for a in f.args.args] for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert params["get_free_memory"][:1] == ["dev"]
    assert params["free_memory"][:2] == ["memory_required", "device"]
    for name in ("get_torch_device", "soft_empty_cache", "throw_exception_if_processing_interrupted"):
        assert name in params, name
