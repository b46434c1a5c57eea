"""Memory plans for Wan 2.2 I2V-A14B on common cards, computed on the meta device (no GPU, seconds).

Cases: 832x480 with fp8 weights at 61, 81 and 121 frames on a 32 GB card, bf16 at 81 frames
on 32 GB, fp8 at 81 frames on 24, 16, 12 and 8 GB cards, and 1280x720 81 frames on 32 GB;
then TI2V-5B (the fp16 file of the bundled workflow) at 121 frames 1280x704 on 24 and 16 GB;
then GGUF experts (Q8_0 and uniform Q4_K, as city96's files store them) at 81 frames on 16,
12 and 8 GB, their bytes from the header such a file would have (``gguf.expected_checkpoint``);
then 161 and 241 frames in 81-frame context windows.
A card's budget is its nominal size (N GiB) less ``--reserve`` (CUDA context, cuBLAS,
desktop, allocator slack). CFG is left to the planner: cond and uncond batched (2x) unless
one after the other keeps more blocks resident. Flash-class SDPA and fp8 matmul (RTX 40 /
50) are assumed unless told otherwise.

Prints each plan's explanation, a table, and as the last line one JSON object holding every
plan (``{"plans": [...]}``).

    python bench/memory_plan.py [--reserve 1.5] [--host-ram 64] [--attention sdpa] [--t5 fp8_e4m3fn]
                                [--no-fp8-matmul] [--card 12] [--frames 81]

``--card`` / ``--frames`` keep only the cases of that card size / frame count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "Wan2.2 I2V-A14B expert"
TI2V = "Wan2.2 TI2V-5B"
FP8 = "fp8_e4m3fn_scaled"
CASES = [  # (card GiB, frames, width, height, weights, model)
    (32, 61, 832, 480, FP8, MODEL), (32, 81, 832, 480, FP8, MODEL), (32, 121, 832, 480, FP8, MODEL),
    (32, 81, 832, 480, "bf16", MODEL), (24, 81, 832, 480, FP8, MODEL), (16, 81, 832, 480, FP8, MODEL),
    (12, 81, 832, 480, FP8, MODEL), (8, 81, 832, 480, FP8, MODEL), (32, 81, 1280, 720, FP8, MODEL),
    (24, 121, 1280, 704, "fp16", TI2V), (16, 121, 1280, 704, "fp16", TI2V),
    # GGUF experts (city96's files; uniform-type estimates from gguf.expected_checkpoint)
    *((card, 81, 832, 480, f"gguf:{quant}", MODEL) for quant in ("Q8_0", "Q4_K") for card in (16, 12, 8)),
    # long videos in 81-frame context windows (30 frames of overlap, static), the 161-frame graph's
    (32, 161, 832, 480, f"{FP8}@81", MODEL), (32, 241, 832, 480, f"{FP8}@81", MODEL),
    (16, 161, 832, 480, f"{FP8}@81", MODEL),
    # 1280x720 decode on small cards: whole frames where they fit, else tiles on the GPU
    (12, 81, 1280, 720, f"{FP8}@33", MODEL), (8, 81, 1280, 720, f"{FP8}@33", MODEL),
]


def _import_planner():
    """Import the pack as ``wanfit``, registered as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()
    from wanfit.optim import planner
    return planner


def _vae(plan) -> str:
    vae = next(e for e in plan.encoders if e.name == "VAE")
    where = "GPU" if vae.device == "gpu" else "CPU"
    return f"{where}, {vae.tiling.split(',')[0] if vae.tiling else 'whole frames'}"


def _windows(frames: int):
    from wanfit.optim.context import ContextWindows

    return ContextWindows.from_pixels(frames, 30, schedule="standard_static")


def _gguf_expert(planner, quant: str):
    """The A14B expert as a ``quant`` GGUF file would load (its header estimated, no file)."""
    from wanfit.optim import gguf

    ckpt = gguf.expected_checkpoint(planner.PRESETS[MODEL], quant)
    return planner.AsLoaded(("expected GGUF", MODEL, quant), f"{quant} GGUF", planner.PRESETS[MODEL].num_layers,
                            lambda: gguf.build_meta_dit(ckpt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reserve", type=float, default=1.5, help="GiB held back from each card")
    parser.add_argument("--host-ram", type=float, default=64, help="GiB of host RAM available")
    parser.add_argument("--attention", default="sdpa", help="sdpa, flash_attn, sageattention or math")
    parser.add_argument("--t5", default="fp8_e4m3fn", choices=["fp8_e4m3fn", "bf16"],
                        help="UMT5 weights as kept on the device (the bundled workflows load the fp8 file)")
    parser.add_argument("--no-fp8-matmul", action="store_true", help="GPU without fp8 GEMMs (before RTX 40)")
    parser.add_argument("--cfg1", action="store_true",
                        help="cfg 1 (the 4-step LoRA graphs): the positive prompt only, no uncond branch")
    parser.add_argument("--card", type=int, help="only the cases of this card size (GB)")
    parser.add_argument("--frames", type=int, help="only the cases of this frame count")
    args = parser.parse_args()
    cases = [c for c in CASES if (args.card is None or c[0] == args.card) and (args.frames is None or c[1] == args.frames)]
    if not cases:
        parser.error(f"no case has card {args.card} GB and {args.frames} frames")
    planner = _import_planner()
    gib = planner.GIB
    plans, rows = [], []
    for card, frames, width, height, weights, model in cases:
        loaded, context, windows = None, None, 1
        if "@" in weights:  # context windows of that many frames
            weights, context = weights.split("@")[0], int(weights.split("@")[1])
            windows = len(_windows(context).index_lists(1 + (frames - 1) // 4))
        if weights.startswith("gguf:"):
            loaded = _gguf_expert(planner, weights.removeprefix("gguf:"))
            weights = "gguf"
        try:
            plan = planner.plan_memory(model, frames=frames, width=width, height=height, weights=weights,
                                       budget="auto", total=card * gib, reserve=int(args.reserve * gib),
                                       host_ram=int(args.host_ram * gib), attention=args.attention,
                                       fp8_matmul=not args.no_fp8_matmul, t5_weights=args.t5, loaded=loaded,
                                       context_frames=context, windows=windows, guidance=not args.cfg1)
        except planner.PlanError as err:
            print(f"[{card} GB, {frames} frames {width}x{height}, {weights}] {err}\n")
            plans.append({"card_gib": card, "model": model, "frames": frames, "width": width, "height": height,
                          "weights": weights, "error": str(err), "min_budget": err.min_budget})
            continue
        print(f"[{card} GB card] {plan.explain()}\n")
        plans.append({"card_gib": card, **plan.to_dict()})
        cfg = "batched" if plan.batch == 2 else "sequential" if plan.passes == 2 else "single"
        rows.append((f"{card} GB", "TI2V-5B " * (model == TI2V) + f"{frames}f {width}x{height}", plan.weights, f"{plan.budget / gib:.1f}",
                     f"{plan.resident}/{plan.swapped}/{plan.prefetch}", cfg, f"{plan.activations.peak / gib:.1f}",
                     f"{plan.sampling_vram / gib:.1f}", f"{plan.peak_vram / gib:.1f}", f"{plan.peak_host / gib:.1f}",
                     _vae(plan)))
    header = ("card", "job", "weights", "budget", "res/swap/pf", "cfg", "act", "sampling", "peak VRAM", "peak host",
              "VAE stage")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print("(GiB; res/swap/pf: resident blocks / swapped blocks / prefetch depth)")
    print(json.dumps({"model": MODEL, "reserve_gib": args.reserve, "t5": args.t5, "cfg1": args.cfg1, "plans": plans}))


if __name__ == "__main__":
    main()
