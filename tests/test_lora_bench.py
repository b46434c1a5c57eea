"""bench/lora.py at its small size: the same code as the full benchmark, in subprocesses;
a merged LoRA adds less than 5 % to the peak host RAM of loading without one."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pack import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "lora.py"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon needs Linux")
def test_small_lora_bench():
    out = subprocess.run([sys.executable, str(SCRIPT), "--size", "small", "--rank", "64"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({s: {m: result[s][m]["peak_over_none"] for m in ("merged", "unmerged")}
                      for s in ("fp16", "fp8")}))
    for storage in ("fp16", "fp8"):
        cases = result[storage]
        assert cases["merged"]["peak_over_none"] < 0.05, cases
        assert cases["merged"]["lora_bytes"] == 0 and cases["unmerged"]["lora_bytes"] > 0
        held = cases["unmerged"]["loaded_bytes"] - cases["none"]["loaded_bytes"]
        assert held >= 0.9 * cases["unmerged"]["lora_bytes"]  # the factors are held on top
        assert all(cases[m]["load_s"] > 0 and cases[m]["forward_s"] > 0 for m in ("none", "merged", "unmerged"))
    assert result["pass"] and result["lora_file_bytes"] > 0
