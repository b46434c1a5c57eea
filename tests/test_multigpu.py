"""Multi-GPU through the nodes on CPU processes (gloo, 1 thread each): whole jobs on 2 ranks
equal 1 process bit for bit (tests/multigpu_cases.py, run in a process of its own; see there
why). Rank 0 is that process; the worker a real pool process (scripts/worker.py), or one
started as a separate command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).resolve().parent / "multigpu_cases.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    env = dict(os.environ, MKL_CBWR="AVX2,STRICT", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path_factory.mktemp("tmp")))
    out = subprocess.run([sys.executable, str(CASES), str(tmp_path_factory.mktemp("models"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    found = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            found[row["case"]] = row
    print(json.dumps(found, indent=1))
    return found


@pytest.mark.parametrize("case", [
    "two-pass 4-step LoRA job, cfg 1 (Ulysses)", "CFG-parallel, cfg 3.5", "EasyCache, cfg 3.5 (CFG-parallel)",
    "context windows (Ulysses)", "sparse attention (Ulysses)", "worker started as a separate command"])
def test_two_ranks_equal_one_process_bit_for_bit(results, case):
    row = results[case]
    assert row["equal"], row
    assert row["plan_names_rank_1"], row  # the worker planned its own share and the plan says so
    if "sparse_differs" in row:
        assert row["sparse_differs"], row  # the sparse mask was on (on both sides)
    if "stays" in row:
        assert row["stays"] and row["next_pool_equal"], row  # a worker started by hand serves the next pool too
    if "skipped" in row:
        assert row["skipped"][0] == row["skipped"][1] > 0, row  # the same steps skipped, some at all
