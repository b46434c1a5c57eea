"""The fuzz of /prompt in the suite (tests/fuzz.py): seeded, bounded in cases and seconds,
over HTTP against the real ComfyUI with the tiny models; ``scripts/fuzz.py`` runs longer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import fuzz
from e2e import WORKFLOWS, api_workflow, error_text, node_of, small, upload_image, wan_models  # noqa: F401

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("WANFIT_FUZZ_SEED", "1"))
SECONDS = float(os.environ.get("WANFIT_FUZZ_SECONDS", "15"))


def small_workflows() -> dict[str, dict]:
    """Every bundled API workflow at 32 px, 5 frames, 2 steps."""
    return {path.stem: small(api_workflow(path.stem), size=32) | {} for path in sorted((WORKFLOWS / "api").glob("*.json"))}


def shrink(prompt: dict) -> dict:
    for node in prompt.values():
        if "frames" in node["inputs"] and not isinstance(node["inputs"]["frames"], list):
            node["inputs"]["frames"] = 5
        if node["class_type"] == "WanFitMultiGPU":
            node["inputs"]["devices"] = "cpu"  # no GPU here (the split itself: tests/test_multigpu_e2e.py)
        if node["class_type"] == "WanFitCompile":
            node["inputs"]["compile_backend"] = "eager"  # Inductor builds for minutes on a CPU
    return prompt


def test_fuzz_of_prompt(wan_models, comfy_server, tmp_path):
    upload_image(comfy_server)
    client = comfy_server.client()
    prompts = {name: shrink(prompt) for name, prompt in small_workflows().items()}
    alive = lambda: comfy_server.process.poll() is None and bool(client.queue() is not None)  # noqa: E731
    verdicts = fuzz.fuzz(client, prompts, client.object_info(), SEED, cases=400, seconds=SECONDS,
                         server_path=str(Path(comfy_server.log_path).parent), error_text=error_text, alive=alive)
    report = fuzz.summary(verdicts)
    print(json.dumps(report, indent=1)[:4000])
    fuzz.save_failures(verdicts, tmp_path / "failures")
    assert report["cases"] >= 20, report  # the fuzz really ran (about 100 cases in its 15 s here)
    assert report["problems"] == 0, json.dumps(report["examples"], indent=1)[:6000]
    good = prompts["wan21_t2v_1.3b_low_ram"]
    good[node_of(good, "WanFitSampler")]["inputs"]["seed"] = 987654
    entry = client.run(good, timeout=120)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
