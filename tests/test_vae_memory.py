"""The VAE stage's working memory in the plan is measured, not guessed: bench/vae_memory.py
on the full-size Wan 2.1 and 2.2 VAEs (random weights, CPU allocator accounting) at a small
size must fit what the tile chooser budgets per pixel (``tiling.WORK_PER_PIXEL``), and not
far under it; the planner's own constants must cover it too.

At 128x64 the padded borders of every convolution add a few percent per pixel over the sizes
the constants were measured at (256x128 and 512x256, where they agree within 3 %), so the
bound here is the budgeted value, constant x headroom."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from wanfit.optim import planner, tiling

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "vae_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vae_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_planner_constants_cover_the_measured_vae(bench, version):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measured = bench.measure(version, 128, 64)
    finally:
        torch.set_num_threads(threads)
    encode, decode = planner._VAE_PER_PIXEL[version]
    for name, constant in (("decode", decode), ("encode", encode)):
        per_pixel = measured[name]["per_pixel"]
        assert per_pixel <= constant * planner._VAE_HEADROOM, (version, name, per_pixel, constant)
        first, _ = tiling.WORK_PER_PIXEL[version, name]
        assert per_pixel <= first * tiling.WORK_HEADROOM, (version, name, per_pixel, first)
        assert first <= 1.25 * per_pixel, (version, name, per_pixel, first)
