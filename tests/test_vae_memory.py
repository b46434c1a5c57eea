"""The VAE stage's working memory in the plan is measured, not guessed: bench/vae_memory.py
on the full-size Wan 2.1 and 2.2 VAEs (random weights, CPU allocator accounting) at 128x64,
against what the tile chooser and the planner budget (``tiling.work_bytes``).

The per-pixel constants (``tiling.WORK_PER_PIXEL``) come from 256x128 and 512x256, where the
figures agree within 3 %; at 128x64 the padded borders of every convolution weigh up to 32 %
more per pixel, which is why a tile is budgeted as at least ``MIN_BUDGET_PIXELS``. So: the
budget must cover what 128x64 measures, and the constant must not sit far above it."""
from pathlib import Path

import pytest
import torch

from pack import load_script
from wanfit.optim import planner, tiling

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "vae_memory.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "bench_vae_memory")


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_planner_constants_cover_the_measured_vae(bench, version):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measured = bench.measure(version, 128, 64)
    finally:
        torch.set_num_threads(threads)
    for name in ("decode", "encode"):
        per_pixel = measured[name]["per_pixel"]
        first, _ = tiling.WORK_PER_PIXEL[version, name]
        assert first <= 1.25 * per_pixel, (version, name, per_pixel, first)
        budget = planner.encoder_work(version, 128, 64, torch.float32, encode=name == "encode")
        assert measured[name]["peak_bytes"] <= budget, (version, name, measured[name]["peak_bytes"], budget)
        # the plan and the tile chooser use the same figure
        assert budget == int(first * tiling.WORK_HEADROOM * 4 * tiling.MIN_BUDGET_PIXELS)
