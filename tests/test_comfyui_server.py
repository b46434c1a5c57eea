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
