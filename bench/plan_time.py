"""How long planning takes: the memory plan runs before every sampling pass.

Each case starts a fresh Python process (so "cold" is the first plan a ComfyUI process
makes), imports the pack, then times ``plan_memory`` for the Wan 2.2 I2V-A14B expert at 81
frames 832x480 on a 24 GB card: the first call (cold: it traces the forward on meta tensors;
the very first trace in a process also pays torch's one-time import of its meta-kernel
machinery, ``torch._dynamo``), the same plan again (warm: cached), and a new frame count in
the same process (a new trace, imports done). Prints one JSON object.

    python bench/plan_time.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
sys.path.insert(0, {tests!r})
from pack import register
register()
from wanfit.optim import planner
GIB = planner.GIB

def plan(frames):
    start = time.perf_counter()
    planner.plan_memory("Wan2.2 I2V-A14B expert", frames=frames, width=832, height=480, budget="auto",
                        total=24 * GIB, host_ram=64 * GIB)
    return time.perf_counter() - start

dynamo_before = "torch._dynamo" in sys.modules
cold = plan(81)
warm = min(plan(81) for _ in range(20))
new_case = plan(61)
print(json.dumps(dict(cold_s=cold, warm_s=warm, new_case_s=new_case, dynamo_imported_before=dynamo_before)))
"""


def run_once() -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests"))], capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes to time")
    args = parser.parse_args()
    runs = [run_once() for _ in range(args.repeats)]
    summary = {key: statistics.median(r[key] for r in runs) for key in ("cold_s", "warm_s", "new_case_s")}
    print(json.dumps({"case": "Wan2.2 I2V-A14B expert, 81 frames 832x480, 24 GB", "runs": runs,
                      "median": summary}))


if __name__ == "__main__":
    main()
