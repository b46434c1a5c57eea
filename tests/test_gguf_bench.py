"""bench/gguf_dequant.py at small sizes: the same code as the figures in docs/BENCHMARKS.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gguf_dequant.py"


def test_gguf_bench_small():
    out = subprocess.run([sys.executable, str(SCRIPT), "--small"], capture_output=True, text=True,
                         check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rates = result["dequant_cpu"]
    assert set(rates) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert all(r["gb_per_s"] > 0 and r["mvalues_per_s"] > 0 for r in rates.values())
    assert rates["Q4_K"]["stored_bits_per_value"] == 4.5 and rates["Q6_K"]["stored_bits_per_value"] == 6.5625
    block = result["block_cpu"]
    assert block["bf16_ms"] > 0 and block["q4_k_ms"] > 0 and block["q4_k_over_bf16"] > 0
    assert 0 < block["dequant_share_of_q4_k"]
    # Q4_K is 4.5 bits a weight against bf16's 16; biases, norms and modulation stay bf16
    assert 0.25 < block["bytes_q4_k_over_bf16"] < 0.35
    assert 0 < block["output_rel_diff"] < 0.1
