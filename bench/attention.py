"""Sparse self-attention and compiled blocks: time against dense, measured in one run.

Rows:

    attention   self-attention alone, dense SDPA against block-sparse flex_attention (compiled)
                with the same q, k, v, at 8k / 16k / 32k tokens: token grids of 30 x 52 tokens
                a frame (832 x 480 video), 5 / 11 / 21 latent frames (17 / 41 / 81 video
                frames), per pattern (radial at the Wan 2.1 recipe's decay 0.2, with its frame-0
                sink; a window of 2 frames, 8 rows, 8 columns each side; each exact, or with
                ``_blocks`` in whole 128-token blocks)
    dit         a whole medium DiT forward (dim 512, 4 heads of 128, 2 blocks) at 16k tokens,
                dense against sparse (every block sparse); ``--dit-repeats`` runs each
    compiled    the medium DiT forward with eager blocks against Inductor-compiled blocks (one
                compile shared by its blocks), at 4k tokens; the compile time is reported apart

Each time is the fastest of ``--repeats`` runs after a warm-up run (which compiles); dense and
sparse alternate within one process so both see the same machine load. ``speedup`` is
dense / sparse. On a shared machine compare ratios, not seconds.

    python bench/attention.py [--device cpu] [--threads 2] [--repeats 3] [--quick] [--patterns radial,window]
                              [--tokens 8192,16384,32768] [--no-attention] [--no-dit] [--dit-repeats 1]
                              [--no-compile]

``--quick`` (under a minute): attention at 4k tokens and a small DiT forward on the same grid
(one flex_attention build), no compile ratio. CPU runs float32, CUDA bfloat16. The last line of
stdout is a JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FRAME = (30, 52)  # tokens per latent frame at 832 x 480 (1,560)
FRAMES_FOR = {8192: 5, 16384: 11, 32768: 21, 4096: 3, 2048: 1}
HEADS, HEAD_DIM = 2, 128
MEDIUM = dict(dim=512, ffn_dim=2048, num_heads=4, num_layers=2, freq_dim=256, text_dim=256, text_len=64)
SMALL = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, freq_dim=64, text_dim=64, text_len=64)


def _import_pack():
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register
    register()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def patterns():
    from wanfit.optim.sparse import SparseSettings
    radial = SparseSettings("radial", decay=0.2, dense_blocks=0)
    window = SparseSettings("window", window=(2, 8, 8), dense_blocks=0)
    return {"radial": radial, "window": window,
            "radial_blocks": dataclasses.replace(radial, granularity="block"),
            "window_blocks": dataclasses.replace(window, granularity="block")}


def grid_for(tokens: int) -> tuple[int, int, int]:
    frames = FRAMES_FOR.get(tokens) or max(1, round(tokens / (FRAME[0] * FRAME[1])))
    return (frames, *FRAME)


def attention_row(tokens: int, name: str, settings, device: torch.device, dtype: torch.dtype,
                  repeats: int) -> dict:
    from wanfit.optim.sparse import SparseAttention

    grid = grid_for(tokens)
    n = grid[0] * grid[1] * grid[2]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, n, HEADS, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(3))
    op = SparseAttention(settings).op(grid, device)

    def dense():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    with torch.inference_mode():
        start = time.perf_counter()
        op(q, k, v)  # builds the flex kernel for this shape
        build_s = time.perf_counter() - start
        dense()
        dense_s = sparse_s = float("inf")
        for _ in range(repeats):  # alternate, so both see the same load
            dense_s = min(dense_s, _best(dense, 1, device))
            sparse_s = min(sparse_s, _best(lambda: op(q, k, v), 1, device))
    return {"row": "attention", "pattern": name, "tokens": n, "grid": list(grid), "dense_s": dense_s,
            "sparse_s": sparse_s, "keep_fraction": op.mask.keep_fraction, "token_density": op.mask.density,
            "speedup": dense_s / sparse_s, "first_call_s": build_s}


def _dit(config: dict, device: torch.device, dtype: torch.dtype):
    from wanfit.wan.model import WanConfig, WanModel

    torch.manual_seed(0)
    return WanModel(WanConfig("t2v", **config)).to(device, dtype).eval().requires_grad_(False)


def _inputs(model, grid, device, dtype):
    from wanfit.optim import planner

    inputs = planner.dit_inputs(model.config, grid, 1, dtype, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for key in ("x", "context"):
        inputs[key] = torch.randn(inputs[key].shape, generator=gen).to(device, inputs[key].dtype)
    inputs["host"] = model.host_inputs(torch.full((1,), 700.0), 1, grid)
    return inputs


def dit_row(config: dict, tokens: int, name: str, settings, device, dtype, repeats: int) -> dict:
    from wanfit.optim.sparse import SparseAttention
    from wanfit.wan.denoise import DiTCall

    grid = grid_for(tokens)
    model = _dit(config, device, dtype)
    inputs = _inputs(model, grid, device, dtype)
    run = SparseAttention(settings).wrap(lambda state, call: model.run_blocks(state), model.blocks)
    sparse = lambda: model(**inputs, run_blocks=lambda state: run(state, DiTCall(0, 0.7)))  # noqa: E731
    dense = lambda: model(**inputs)  # noqa: E731
    with torch.inference_mode():
        sparse_out, dense_out = sparse(), dense()  # the first sparse call builds the kernel
        deviation = float((sparse_out - dense_out).norm() / dense_out.norm())
        del sparse_out, dense_out
        dense_s = sparse_s = float("inf")
        for _ in range(repeats):
            dense_s = min(dense_s, _best(dense, 1, device))
            sparse_s = min(sparse_s, _best(sparse, 1, device))
    keep = SparseAttention(settings).mask(grid, device).keep_fraction
    return {"row": "dit", "pattern": name, "tokens": grid[0] * grid[1] * grid[2], "grid": list(grid),
            "blocks": config["num_layers"], "dim": config["dim"], "dense_s": dense_s, "sparse_s": sparse_s,
            "keep_fraction": keep, "speedup": dense_s / sparse_s, "relative_deviation_random_weights": deviation}


def compiled_row(config: dict, tokens: int, device, dtype, repeats: int, backend: str = "inductor") -> dict:
    from wanfit.optim import compile as compiled_blocks
    from wanfit.optim.compile import CompiledRun, CompileSettings
    from wanfit.wan.denoise import DiTCall

    grid = grid_for(tokens)
    model = _dit(config, device, dtype)
    inputs = _inputs(model, grid, device, dtype)
    with torch.inference_mode():
        eager_out = model(**inputs)
        eager_s = _best(lambda: model(**inputs), repeats, device)
        run = CompiledRun(model, CompileSettings(backend)).wrap(lambda state, call: model.run_blocks(state))
        compiled = lambda: model(**inputs, run_blocks=lambda state: run(state, DiTCall(0, 0.7)))  # noqa: E731
        start = time.perf_counter()
        out = compiled()
        first_s = time.perf_counter() - start
        compiled_s = eager_s2 = float("inf")
        for _ in range(repeats):
            compiled_s = min(compiled_s, _best(compiled, 1, device))
            eager_s2 = min(eager_s2, _best(lambda: model(**inputs), 1, device))
    compiled_blocks.detach(model)
    eager_s = min(eager_s, eager_s2)
    return {"row": "compiled", "backend": backend, "tokens": grid[0] * grid[1] * grid[2], "grid": list(grid),
            "blocks": config["num_layers"],
            "eager_s": eager_s, "compiled_s": compiled_s, "compiled_over_eager": compiled_s / eager_s,
            "first_call_s": first_s, "max_abs_diff": float((out - eager_out).abs().max())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", default="8192,16384,32768")
    parser.add_argument("--patterns", default="radial,window",
                        help="of radial, window, radial_blocks, window_blocks")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quick-tokens", type=int, default=4096)
    parser.add_argument("--no-dit", action="store_true")
    parser.add_argument("--dit-repeats", type=int, default=1)
    parser.add_argument("--no-attention", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    _import_pack()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chosen = {k: v for k, v in patterns().items() if k in args.patterns.split(",")}
    rows = []
    if args.quick:
        name, settings = next(iter(chosen.items()))
        rows.append(attention_row(args.quick_tokens, name, settings, device, dtype, 1))
        print(json.dumps(rows[-1]), flush=True)
        rows.append(dit_row(SMALL, args.quick_tokens, name, settings, device, dtype, 1))
        print(json.dumps(rows[-1]), flush=True)
    else:
        for tokens in (int(t) for t in args.tokens.split(",")) if not args.no_attention else ():
            for name, settings in chosen.items():
                rows.append(attention_row(tokens, name, settings, device, dtype, args.repeats))
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_dit:
            for name, settings in chosen.items():
                rows.append(dit_row(MEDIUM, 16384, name, settings, device, dtype, args.dit_repeats))
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_compile:
            rows.append(compiled_row(MEDIUM, 4096, device, dtype, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "quick": args.quick, "rows": rows,
              "note": "times are the fastest of the repeats; dense and sparse alternate in one process; random "
                      "weights: deviations are not a quality claim"}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
