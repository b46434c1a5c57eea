"""FP8 matmul against bf16 at Wan 14B layer sizes.

Times one Linear at ``--tokens`` (32760 = 81 frames at 832x480: 21 latent frames x 60 x 104 / 2x2
patches) for the 14B DiT's shapes -- attention 5120x5120, ffn.0 5120->13824, ffn.2 13824->5120 --
four ways: bf16 ``F.linear``; ``FP8Linear`` on the ``torch._scaled_mm`` path (input quantised per
tensor in the call); the bare fp8 GEMM on a pre-quantised input; and ``FP8Linear``'s upcast path
(weight dequantised to bf16 per call, as on GPUs below compute capability 8.9). Reports the
median milliseconds, TFLOP/s, the peak memory each call adds over its inputs and weights, and the
relative error against bf16. The last line of stdout is a JSON object; without CUDA it is
``{"skipped": "no CUDA device"}`` and the exit status is 0.

    python bench/fp8_matmul.py [--tokens 32760] [--repeats 20]
    python bench/fp8_matmul.py --device cpu --tiny   # the code path on the CPU (torch's CPU _scaled_mm)

``--tiny`` divides the layer sizes by 40 (multiples of 16, as ``_scaled_mm`` wants) and runs 16
tokens, 2 timed calls: a dry run of every path, its figures meaningless.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"attn 5120x5120": (5120, 5120), "ffn.0 5120->13824": (5120, 13824), "ffn.2 13824->5120": (13824, 5120)}
TINY = 40  # --tiny: every size divided by this, rounded to a multiple of 16 (torch's CPU fp8 GEMM is slow)


def _import_fp8():
    """Import the pack as ``wanfit``, registered as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()
    from wanfit.optim import fp8
    return fp8


def measure(fn, repeats: int, device: torch.device) -> tuple[float, int]:
    """Median milliseconds over ``repeats`` calls, and the bytes one call allocates at peak
    (CUDA: the caching allocator's peak; CPU: the allocator's profiler events)."""
    if device.type != "cuda":
        return _measure_cpu(fn, repeats)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def _measure_cpu(fn, repeats: int) -> tuple[float, int]:
    from wanfit.optim.hostmem import allocation_peak

    fn()
    peak = allocation_peak(fn)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the code path")
    parser.add_argument("--tiny", action="store_true", help=f"layer sizes / {TINY}, 16 tokens, 2 repeats")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    fp8 = _import_fp8()
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    shapes = {name: (max(16, k // TINY // 16 * 16), max(16, n // TINY // 16 * 16)) if args.tiny else (k, n)
              for name, (k, n) in SHAPES.items()}
    tokens = 16 if args.tiny else args.tokens
    repeats = 2 if args.tiny else args.repeats
    # The CPU runs torch's own _scaled_mm (torch >= 2.13): the same code path, not a speed claim.
    fast_ok = fp8.scaled_mm_supported(device) or (device.type == "cpu" and hasattr(torch, "_scaled_mm"))
    cuda = device.type == "cuda"
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
              "torch": torch.__version__, "tokens": tokens, "tiny": args.tiny, "scaled_mm_supported": fast_ok,
              "layers": {}}
    torch.manual_seed(0)
    for name, (k, n) in shapes.items():
        linear = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
        layer = fp8.FP8Linear.from_linear(linear, "e4m3fn", torch.bfloat16)
        flops = 2 * tokens * k * n
        with torch.no_grad():
            ref = linear(x).float()
            paths = {"bf16": lambda: linear(x),
                     "fp8_upcast": lambda: F.linear(x, layer.dequantized_weight(x.dtype), layer.bias)}
            if fast_ok:
                x8, sx = fp8.quantize_weight(x, "e4m3fn")  # per-tensor, like the layer's own input step
                paths["fp8_scaled_mm"] = lambda: fp8.scaled_mm_linear(x, layer.weight, layer.scale_weight, layer.bias)
                sa, sb = sx.float().reshape(()), layer.scale_weight.float().reshape(())  # scalar scales
                paths["fp8_gemm_only"] = lambda: torch._scaled_mm(
                    x8, layer.weight.t(), scale_a=sa, scale_b=sb, bias=layer.bias, out_dtype=torch.bfloat16)
            row = {}
            for path, fn in paths.items():
                ms, peak = measure(fn, repeats, device)
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                row[path] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                             "peak_extra_mib": round(peak / 2**20, 1), "rel_err_vs_bf16": round(err, 5)}
                print(f"{name:20s} {path:14s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s "
                      f"+{peak / 2**20:7.1f} MiB  rel err {err:.4f}", flush=True)
            if fast_ok:
                row["speedup_scaled_mm_vs_bf16"] = round(row["bf16"]["ms"] / row["fp8_scaled_mm"]["ms"], 3)
            row["slowdown_upcast_vs_bf16"] = round(row["fp8_upcast"]["ms"] / row["bf16"]["ms"], 3)
        report["layers"][name] = row
        del linear, layer, x
        if cuda:
            torch.cuda.empty_cache()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
