"""Tiled against untiled Wan VAE decode and encode: peak memory and time, on the CPU.

The full-size Wan 2.1 VAE (random weights) at 832x480 and 1280x720. For each size, the
time of one untiled latent frame (the second: 4 video frames, every feature cache in use)
sets the job: as many latent frames (at least 2) as fit ``--seconds`` of untiled decoding.
That latent decodes untiled and tiled, and a video of as many frames encodes untiled and
tiled. The tiling is what ``choose_tiling`` picks for a budget of ``--budget`` (default 35 %)
of the untiled working memory. Peaks are the CPU allocator's (``hostmem.allocation_peak``:
tensors allocated during the call above what was live before; the output buffer is
allocated first), so they count what a GPU stage would hold on the device. Times are wall
clock on however many threads torch uses (``--threads``).

The last line of stdout is a JSON object; targets: at 1280x720 the tiled decode peak is at
most 40 % of the untiled one for at most 25 % more time. Beside each measured peak stands what
the memory plan budgets for it (``tiling.work_bytes``, the VAE stage's own figure, headroom
included): ``measured_over_planned`` above 1 means the plan under-counts.

    python bench/vae_tiling.py [--sizes 832x480,1280x720] [--seconds 60] [--dtype bfloat16]
    python bench/vae_tiling.py --device cuda --sizes 832x480 --seconds 5   # peaks from the CUDA allocator
    python bench/vae_tiling.py --sizes 416x240 --seconds 0 --dim 16   # the suite's quick size (a narrow VAE)

On CUDA the peaks are ``torch.cuda.max_memory_allocated`` above what was allocated before the
call (the weights); the latent and the output frames stay in host memory, as in the VAE stage.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET_PEAK, TARGET_TIME = 0.40, 1.25


def _import_pack() -> None:
    """The pack as ``wanfit``, registered as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_peak(fn, device: torch.device = torch.device("cpu")) -> tuple[object, int, float]:
    """``fn()``, the peak bytes it allocated on ``device`` above what was live before, seconds."""
    box = {}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        box["out"] = fn()
        _sync(device)
        return box["out"], torch.cuda.max_memory_allocated(device) - before, time.perf_counter() - start
    from wanfit.optim.hostmem import allocation_peak

    start = time.perf_counter()
    peak = allocation_peak(lambda: box.setdefault("out", fn()))
    return box["out"], peak, time.perf_counter() - start


def measure(vae, width: int, height: int, seconds: float, budget: float) -> dict:
    """Untiled and tiled decode and encode of one size; see the module docstring."""
    from wanfit.optim import tiling
    from wanfit.wan.vae_common import FeatureCache

    config = vae.config
    dtype, device = vae.conv1.weight.dtype, vae.conv1.weight.device
    s = config.spatial_compression
    g = torch.Generator().manual_seed(0)
    max_latents = 64
    latent = torch.randn(1, config.z_dim, max_latents, height // s, width // s, generator=g)

    with torch.inference_mode():
        cache = FeatureCache()
        vae.decode_chunk(latent[:, :, :1], cache)
        _sync(device)
        start = time.perf_counter()
        vae.decode_chunk(latent[:, :, 1:2], cache)
        _sync(device)
        per_latent = time.perf_counter() - start
        del cache
        latents = int(min(max_latents, max(2, seconds // per_latent)))
        latent = latent[:, :, :latents].contiguous()
        frames = 1 + config.temporal_compression * (latents - 1)
        whole = tiling.Tiling(width, height)
        tiles = tiling.choose_tiling(config, width, height, dtype,
                                     int(budget * tiling.work_bytes(config, whole, width, height, dtype)))
        if tiles is None:
            raise ValueError(f"no tiles of {tiling.MIN_TILE} px or more fit {budget:.0%} of the untiled "
                             f"working memory at {width}x{height}: raise --budget")
        report = {"width": width, "height": height, "latent_frames": latents, "frames": frames,
                  "tiling": tiles.describe(config, width, height), "untiled": {}, "tiled": {}}
        planned = {name: {stage: tiling.work_bytes(config, t, width, height, dtype, encode=stage == "encode")
                          for stage in ("decode", "encode")} for name, t in (("untiled", whole), ("tiled", tiles))}
        out, reference = torch.zeros(1, 3, frames, height, width), None
        for name, tiling_used in (("untiled", whole), ("tiled", tiles)):
            _, peak, elapsed = _timed_peak(lambda: tiling.tiled_decode(vae, latent, tiling_used, out=out), device)
            report[name]["decode"] = {"peak_bytes": peak, "seconds": round(elapsed, 3)}
            reference = out.clone() if reference is None else reference
        report["decode_mean_abs_diff"] = round((out - reference).abs().mean().item(), 4)
        video = torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1
        for name, tiling_used in (("untiled", whole), ("tiled", tiles)):
            _, peak, elapsed = _timed_peak(lambda: tiling.tiled_encode(vae, video, tiling_used), device)
            report[name]["encode"] = {"peak_bytes": peak, "seconds": round(elapsed, 3)}
    for name in ("untiled", "tiled"):
        for stage in ("decode", "encode"):
            entry = report[name][stage]
            entry["planned_bytes"] = planned[name][stage]
            entry["measured_over_planned"] = round(entry["peak_bytes"] / planned[name][stage], 3)
    for stage in ("decode", "encode"):
        untiled, tiled = report["untiled"][stage], report["tiled"][stage]
        report[f"{stage}_peak_ratio"] = round(tiled["peak_bytes"] / untiled["peak_bytes"], 3)
        report[f"{stage}_time_ratio"] = round(tiled["seconds"] / max(untiled["seconds"], 1e-9), 3)
    return report


def run(sizes: list[tuple[int, int]], seconds: float, dtype: torch.dtype, budget: float = 0.35,
        config=None, device: torch.device | str = "cpu") -> dict:
    """The report for ``sizes`` with the Wan 2.1 VAE (``config``: a smaller one for tests) on
    ``device``."""
    from wanfit.wan.vae import build_vae
    from wanfit.wan.vae_common import WAN21_VAE

    torch.manual_seed(0)
    vae = build_vae(config or WAN21_VAE).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 1 / max(1, p[0].numel()) ** 0.5)  # activations stay O(1)
    vae.to(device=device, dtype=dtype)
    results = [measure(vae, w, h, seconds, budget) for w, h in sizes]
    big = max(results, key=lambda r: r["width"] * r["height"])
    return {"vae": f"Wan 2.1, dim {vae.config.dim}", "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
            "threads": torch.get_num_threads(), "seconds_per_size": seconds, "budget": budget, "sizes": results,
            "target": {"size": f"{big['width']}x{big['height']}", "peak_ratio_max": TARGET_PEAK,
                       "time_ratio_max": TARGET_TIME,
                       "met": big["decode_peak_ratio"] <= TARGET_PEAK and big["decode_time_ratio"] <= TARGET_TIME}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="832x480,1280x720")
    parser.add_argument("--seconds", type=float, default=60.0, help="untiled decode time per size")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--budget", type=float, default=0.35, help="tile budget, of the untiled working memory")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: peaks from the CUDA allocator")
    parser.add_argument("--dim", type=int, default=96,
                        help="the VAE's base width (96: the real Wan 2.1 VAE; smaller for a quick run)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    _import_pack()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    from wanfit.wan.vae_common import Wan21VAEConfig

    report = run(sizes, args.seconds, getattr(torch, args.dtype), args.budget, config=Wan21VAEConfig(dim=args.dim),
                 device=args.device)
    for r in report["sizes"]:
        print(f"{r['width']}x{r['height']}, {r['frames']} frames, {r['tiling']}: decode peak x{r['decode_peak_ratio']}"
              f" time x{r['decode_time_ratio']}; encode peak x{r['encode_peak_ratio']} time x{r['encode_time_ratio']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
