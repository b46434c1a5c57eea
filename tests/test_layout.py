"""The shipped UI workflows as ComfyUI's frontend draws them: no node box overlaps another or
is saved smaller than the frontend will draw it (it would grow over its neighbour and hide
widgets), every template has its picture and its note, and the image-to-video graphs start
from the example.png every ComfyUI ships. Sizes from workflows/layout.py, whose constants are
checked here against what the frontend measured (ComfyUI 0.3.64, frontend 1.27.10)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from e2e import WORKFLOWS, build

import layout  # noqa: E402  (workflows/layout.py, on the path through e2e)
import thumbnails  # noqa: E402

NAMES = sorted(build.GRAPHS)


def ui(name: str) -> dict:
    return json.loads(build.ui_file(name).read_text())


@pytest.mark.parametrize("name", NAMES)
def test_no_node_overlaps_another_as_drawn(name):
    graph = ui(name)
    nodes = {n["id"]: n for n in graph["nodes"]}
    by_id = {n.id: n for n in build.ui_graph(name)}
    boxes = {}
    for node_id, n in nodes.items():
        need_w, need_h = build.frontend_size(by_id[node_id])
        assert n["size"][0] >= need_w and n["size"][1] >= need_h, (
            f"{name}: node {node_id} {n['type']} saved at {n['size']}, the frontend draws at least "
            f"{[need_w, need_h]} (it would grow over its neighbours)")
        boxes[f"{node_id} {n.get('title', n['type'])}"] = layout.box(n["pos"], n["size"])
    assert not layout.overlaps(boxes, margin=layout.GAP_Y - 1), f"{name}: overlapping nodes"


def test_the_size_model_matches_the_frontend():
    """Minimum body sizes read from the frontend with node.computeSize() (ComfyUI 0.3.64)."""
    measured = {  # class: (height the frontend computed, build.py's estimate must not be below)
        "WanFitSampler": 398, "WanFitTwoPassSampler": 398, "WanFitModelLoader": 130, "WanFitTextEncoderLoader": 58,
        "WanFitVAELoader": 58, "WanFitLoRA": 106, "WanFitImageToVideoEncode": 186, "WanFitTextEncode": 142,
        "WanFitVAEDecode": 66, "WanFitContextWindows": 226, "WanFitEmptyEmbeds": 106, "WanFitSaveVideo": 130,
        "LoadImage": 326, "Note": 88,
    }
    seen = {}
    for name in NAMES:
        for n in build.ui_graph(name):
            seen[n.type] = build.frontend_size(n)[1] - (0 if n.type == "LoadImage" else n.preview_h)
    for cls, height in measured.items():
        assert height <= seen[cls] <= height + 8, (cls, seen[cls], height)
    # the Sampler overlap of the old files: saved 372 high, drawn 398
    assert layout.min_size("x", ["a"] * 6, ["LATENT"], ["row"] * 11) == (210, 398)


@pytest.mark.parametrize("name", NAMES)
def test_each_template_has_its_picture(name):
    path = build.ui_file(name).with_suffix(".jpg")
    with Image.open(path) as shipped:
        assert shipped.format == "JPEG" and shipped.size == (thumbnails.SIZE, thumbnails.SIZE)
        committed = np.asarray(shipped.convert("RGB"), dtype=np.float64)
    # the picture follows the layout: drawn again, it is the same up to JPEG loss
    fresh = np.asarray(thumbnails.draw(ui(name), build.TEMPLATES[name].title), dtype=np.float64)
    mse = np.mean((committed - fresh) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-9)) > 30, "stale picture: run python workflows/build.py"


@pytest.mark.parametrize("name", NAMES)
def test_note_lists_every_model_file_its_folder_and_the_card(name):
    graph = ui(name)
    notes = [n for n in graph["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for n in graph["nodes"]:
        folder = build.FOLDERS.get(n["type"])
        if folder:
            assert f"{folder}/{n['widgets_values'][0]}" in text, (name, n["widgets_values"][0])
    assert "Tuned for " in text and "GB" in text + build.TEMPLATES[name].card
    text.encode("cp1252")  # shown on Windows too


def test_templates_are_ordered_and_named_readably():
    names = [build.TEMPLATES[n].name for n in build.GRAPHS]
    assert sorted(t.order for t in build.TEMPLATES.values()) == list(range(1, len(build.GRAPHS) + 1))
    assert set(build.TEMPLATES) == set(build.GRAPHS)
    for name in names:
        assert not set(name) & set('<>:"/\\|?*#%&'), name  # a file name on Windows, a URL path in the browser
    assert sorted(names)[0] == build.TEMPLATES["wan22_i2v_a14b_81f_32gb"].name  # the demo's graph first


@pytest.mark.parametrize("name", NAMES)
def test_graphs_start_from_example_png_and_save_mp4(name):
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    images = [n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"]
    assert images in ([], ["example.png"])
    savers = [n["inputs"] for n in prompt.values() if n["class_type"].startswith("Save") or "Save" in n["class_type"]]
    assert [s["format"] for s in savers] == ["mp4"]
