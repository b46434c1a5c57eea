"""bench/step_time.py on the CPU: its tiny dry run builds, swaps and times every case, so the
GPU benchmark is not dead on arrival; the GPU numbers themselves are never asserted here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pack import load_script
from wanfit.optim.fp8 import FP8Linear

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "step_time.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "bench_step_time")


def test_build_places_quantises_and_swaps_as_planned(bench):
    config = bench._config(tiny=True)
    case = bench.Case("fp8", 12, resident=1, prefetch=1, cfg="sequential")
    prepared = bench.build(case, config, torch.device("cpu"))
    try:
        model = prepared.model
        assert isinstance(model.blocks[0].ffn[0], FP8Linear)
        assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
        assert model.head.head.weight.dtype == torch.bfloat16
        stats = prepared.swapper.stats
        assert (stats.resident, stats.swapped, stats.slots) == (1, 3, 2)
        assert not any(t.is_meta for t in model.state_dict().values())
    finally:
        prepared.close()
    bf16 = bench.build(bench.Case("bf16", 32, 4, 1, "batch"), config, torch.device("cpu"))
    assert bf16.swapper is None and not any(isinstance(m, FP8Linear) for m in bf16.model.modules())


def test_every_case_runs_tiny_on_cpu(bench):
    for name, case in bench.CASES.items():
        r = bench.run_case(case, tiny=True, device=torch.device("cpu"), repeats=1, dry_run=True)
        forwards = 1 if r["cfg"] == "batch" else 2
        assert r["blocks"] == 4 and r["tokens"] == 48 and r["resident_tried"] == [r["resident"]]
        assert r["swapped"] == 4 - r["resident"]
        # every swapped block crosses once per forward, nothing else does
        assert r["h2d_gb_per_step"] * 1e9 == pytest.approx(forwards * r["swapped"] * r["block_bytes"])
        assert r["s_per_step"] > 0 and r["vram_peak_allocated_gib"] is None, name
    assert bench.CASES["c"].resident < 40 and bench.CASES["d"].cfg == "sequential"


def test_cli_dry_run_prints_json_last():
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--device", "cpu", "--tiny",
                          "--cases", "ad", "--plan", "d=30:2:batch"],
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["cases"]) == {"a", "d"}
    d = result["cases"]["d"]
    assert (d["resident"], d["prefetch"], d["cfg"], d["swapped"]) == (3, 2, "batch", 1)  # 30 of 40 -> 3 of 4
    assert result["ratio_vs_a"]["a"] == 1.0 and result["ratio_vs_a"]["d"] > 0


def test_without_cuda_it_skips():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"skipped": "no CUDA device"}
