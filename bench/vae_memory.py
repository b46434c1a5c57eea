"""VAE working memory per output pixel, measured: what the memory plan budgets for a VAE stage.

Builds the full-size Wan 2.1 and Wan 2.2 VAEs (random weights, float32, CPU) and measures
the peak bytes of tensors each call allocates above the weights and inputs
(``hostmem.allocation_peak``: the CPU allocator's own accounting, the counterpart of
``torch.cuda.max_memory_allocated``):

- decode: a latent of 3 frames (1 + 4 + 4 video frames, decoded one latent frame at a time
  with the causal cache, as ``WanVAE.decode``);
- encode: 9 video frames (1, then chunks of 4, as ``WanVAE.encode``);
- decode_chunk2 / encode_chunk8: the same with 2 latent frames (8 video frames) per chunk,
  what a tiled VAE's ``temporal_size`` 9 asks for (``--chunked``).

Both are divided by width x height x 4 (float32): bytes per output pixel per byte of the
compute dtype, the unit of ``tiling.WORK_PER_PIXEL`` (which the planner and the VAE stages
use). ``tiling.WORK_HEADROOM`` goes on top for what the CPU allocator does not see on a GPU (cuDNN workspaces,
caching-allocator slack); that factor has not been measured on a GPU yet.

The last line of stdout is a JSON object with every figure and the planner's constants.

    python bench/vae_memory.py [--width 256] [--height 128] [--versions 2.1,2.2] [--chunked]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_pack():
    """The pack as ``wanfit``, registered as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()


def measure(version: str, width: int, height: int, chunked: bool = False) -> dict:
    """Decode and encode peaks of one full-size VAE, per output pixel per dtype byte."""
    from wanfit.optim.hostmem import allocation_peak
    from wanfit.wan.vae import build_vae
    from wanfit.wan.vae_common import Wan21VAEConfig, Wan22VAEConfig

    config = Wan21VAEConfig() if version == "2.1" else Wan22VAEConfig()
    unit = config.spatial_compression
    torch.manual_seed(0)
    vae = build_vae(config).eval()
    latent = torch.randn(1, config.z_dim, 3, height // unit, width // unit)
    video = torch.rand(1, 3, 9, height, width) * 2 - 1
    pixels = width * height * 4  # float32
    out = {}
    calls = {"decode": lambda: vae.decode(latent), "encode": lambda: vae.encode(video)}
    if chunked:
        calls.update(decode_chunk2=lambda: vae.decode(latent, chunk=2), encode_chunk8=lambda: vae.encode(video, chunk=8))
    for name, call in calls.items():
        start = time.perf_counter()
        with torch.inference_mode():
            peak = allocation_peak(call)
        out[name] = {"peak_bytes": peak, "per_pixel": round(peak / pixels, 1),
                     "seconds": round(time.perf_counter() - start, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--versions", default="2.1,2.2")
    parser.add_argument("--chunked", action="store_true", help="also 2 latent frames per chunk")
    args = parser.parse_args()
    _import_pack()
    from wanfit.optim import tiling

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    report = {"width": args.width, "height": args.height, "unit": "bytes per output pixel per dtype byte",
              "headroom": tiling.WORK_HEADROOM, "versions": {}}
    for version in args.versions.split(","):
        measured = measure(version, args.width, args.height, args.chunked)
        measured["tiling"] = {stage: tiling.WORK_PER_PIXEL[version, stage] for stage in ("encode", "decode")}
        report["versions"][version] = measured
        figures = ", ".join(f"{name} {m['per_pixel']:.0f}" for name, m in measured.items() if "per_pixel" in m)
        print(f"Wan {version} VAE at {args.width}x{args.height}: {figures} B/px per dtype byte "
              f"(budgeted, tiling.WORK_PER_PIXEL: {measured['tiling']}, "
              f"x{tiling.WORK_HEADROOM} headroom)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
