"""bench/attention.py on small sizes: the same code as the figures, with flex_attention eager
(no C++ build) and the compiled row through aot_eager; consistency only, never timings."""
import json
from pathlib import Path

import pytest
import torch

from pack import load_script

pytestmark = pytest.mark.usefixtures("eager_flex", "one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "attention.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "bench_attention")


def test_quick_run_prints_json_rows(bench, capsys):
    result = bench.main(["--quick", "--quick-tokens", "2048", "--device", "cpu", "--patterns", "window"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rows"] == json.loads(json.dumps(result["rows"])) and printed["quick"]
    attention, dit = result["rows"]
    for row in (attention, dit):
        assert {"tokens", "dense_s", "sparse_s", "keep_fraction", "speedup"} <= set(row)
        assert row["speedup"] == pytest.approx(row["dense_s"] / row["sparse_s"])
        assert row["tokens"] == 30 * 52 and 0 < row["keep_fraction"] < 1
    assert attention["keep_fraction"] == dit["keep_fraction"]  # the same grid and pattern
    assert 0 < dit["relative_deviation_random_weights"] < 1


def test_compiled_row(bench):
    row = bench.compiled_row(bench.SMALL, 2048, torch.device("cpu"), torch.float32, 1, backend="aot_eager")
    assert row["compiled_over_eager"] == pytest.approx(row["compiled_s"] / row["eager_s"])
    assert row["max_abs_diff"] < 1e-4 and row["tokens"] == 1560
