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
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"attn 5120x5120": (5120, 5120), "ffn.0 5120->13824": (5120, 13824), "ffn.2 13824->5120": (13824, 5120)}


def _import_fp8():
    """Import the pack as ``wanfit``, registered as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()
    from wanfit.optim import fp8
    return fp8


def measure(fn, repeats: int) -> tuple[float, int]:
    """Median milliseconds over ``repeats`` calls, and the bytes one call allocates at peak."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    fp8 = _import_fp8()
    device = torch.device("cuda", torch.cuda.current_device())
    fast_ok = fp8.scaled_mm_supported(device)
    report = {"device": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
              "torch": torch.__version__, "tokens": args.tokens, "scaled_mm_supported": fast_ok, "layers": {}}
    torch.manual_seed(0)
    for name, (k, n) in SHAPES.items():
        linear = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        x = torch.randn(args.tokens, k, device=device, dtype=torch.bfloat16)
        layer = fp8.FP8Linear.from_linear(linear, "e4m3fn", torch.bfloat16)
        flops = 2 * args.tokens * k * n
        with torch.no_grad():
            ref = linear(x).float()
            paths = {"bf16": lambda: linear(x),
                     "fp8_upcast": lambda: F.linear(x, layer.dequantized_weight(x.dtype), layer.bias)}
            if fast_ok:
                x8, sx = fp8.quantize_weight(x, "e4m3fn")  # per-tensor, like the layer's own input step
                paths["fp8_scaled_mm"] = lambda: fp8.scaled_mm_linear(x, layer.weight, layer.scale_weight, layer.bias)
                paths["fp8_gemm_only"] = lambda: torch._scaled_mm(
                    x8, layer.weight.t(), scale_a=sx, scale_b=layer.scale_weight, bias=layer.bias,
                    out_dtype=torch.bfloat16)
            row = {}
            for path, fn in paths.items():
                ms, peak = measure(fn, args.repeats)
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                row[path] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                             "peak_extra_mib": round(peak / 2**20, 1), "rel_err_vs_bf16": round(err, 5)}
                print(f"{name:20s} {path:14s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s "
                      f"+{peak / 2**20:7.1f} MiB  rel err {err:.4f}")
            if fast_ok:
                row["speedup_scaled_mm_vs_bf16"] = round(row["bf16"]["ms"] / row["fp8_scaled_mm"]["ms"], 3)
            row["slowdown_upcast_vs_bf16"] = round(row["fp8_upcast"]["ms"] / row["bf16"]["ms"], 3)
        report["layers"][name] = row
        del linear, layer, x
        torch.cuda.empty_cache()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
