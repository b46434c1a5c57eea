"""bench/step_cache.py at its tiny size: the same code as the CPU / GPU figures, checked for
consistency (never for timings, which depend on the machine)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pack import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "step_cache.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "bench_step_cache")


def test_tiny_bench_is_consistent(bench):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bench.bench_size("tiny", [4, 12], torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    for steps, row in result["schedules"].items():
        assert row["calibration_identical"] and row["default_skips_nothing"] == (int(steps) <= 8)
        for name in bench.POLICIES:
            r = row[name]
            assert r["skipped"] == len(r["skipped_steps"]) < int(steps)
            assert r["identical"] == (r["skipped"] == 0) == (r["latent_rel_err"] == 0.0)
            assert r["identical"] or r["psnr_frames_db"] > 0
    # MagCache's skips follow its published ratios alone. 1.3B cond ratios at 12 steps (indices
    # 0 4 9 13 18 22 27 31 36 40 45 49 of 50): 1, .99682, .9957, .99541, .99481, .99388, .99171,
    # .98944, .9836, .9741, .94013, .81838 (uncond within 1e-4). Calls < int(24 * 0.2) = 4
    # compute (steps 0, 1); 2-5 reuse (4 = K); 6 computes; 7-9 reuse (error .011, .037, .089);
    # 10 (.198) and 11 (.18) exceed 0.12 and compute.
    assert result["schedules"]["12"]["magcache"]["skipped_steps"] == [2, 3, 4, 5, 7, 8, 9]


def test_cli_prints_json_last():
    out = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "tiny,full", "--steps", "4", "--device", "cpu",
                          "--threads", "1", "--policies", "magcache"],
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sizes"]["full"] == {"skipped": "the full size runs on a CUDA device only"}
    assert set(result["sizes"]["tiny"]["schedules"]["4"]) >= {"uncached_s", "magcache"}
    assert "not a quality claim" in result["note"]
