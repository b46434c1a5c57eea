"""Shared pieces of the workflow end-to-end tests: the factory models written into the
server's model folders (before it lists them), the start image uploaded, small job sizes."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

import factory
from pack import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "workflows"))
import build  # noqa: E402  (workflows/build.py)

WORKFLOWS = REPO_ROOT / "workflows"
START_IMAGE = "start.png"
NOT_UMT5 = "umt5_xxl_but_really_a_vae.safetensors"
GGUF_T5 = "umt5-xxl-encoder-Q8_0.gguf"  # city96's name


@pytest.fixture(scope="session")
def wan_models(comfy_models_dir):
    """Every factory file under its real name; request this before ``comfy_server``."""
    written = factory.write_models(comfy_models_dir)
    written.update(factory.write_gguf_models(comfy_models_dir))
    t5 = Path(comfy_models_dir) / "text_encoders" / GGUF_T5
    if not t5.exists():
        written[GGUF_T5] = factory.write_gguf_t5(t5, "Q8_0", seed=8)
    # A VAE under a text encoder's folder and name: what a user who picked the wrong file has.
    wrong = Path(comfy_models_dir) / "text_encoders" / NOT_UMT5
    if not wrong.exists():
        shutil.copyfile(written["wan_2.1_vae.safetensors"], wrong)
    return written


def upload_image(server, name: str = START_IMAGE, size=(72, 56)) -> None:
    """A plain start image, uploaded as the editor's upload button does."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buf, format="PNG")
    server.client().upload_image(name, buf.getvalue())


def api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def small(prompt: dict, size: int = 64, steps: int = 2) -> dict:
    """The same graph at a test size: ``size`` pixels square, a few steps; frames kept."""
    return build.resize(prompt, width=size, height=size, steps=steps)


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def error_text(entry: dict) -> str:
    """The execution error a history entry carries (exception type and message)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""
