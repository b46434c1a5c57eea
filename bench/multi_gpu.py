"""Several devices: the DiT forward on 1 process against 2 ranks (CPU processes, gloo), and
the memory plan of each GPU for Wan 2.2 I2V-A14B on 1, 2, 4 and 8 cards.

CPU part: one process with 1 thread runs a medium DiT forward (cond + uncond batched);
then 2 processes with 1 thread each run the same call split CFG-parallel (one row each) and
Ulysses sequence-parallel (half the tokens each), timed in the same run; speedup = 1 process
/ 2 ranks, and the bytes each rank sent per call (counted at the collectives). CUDA part,
when several GPUs are here: the same split on ``cuda:0..N-1`` with NCCL, s per call.

Plan part (meta device, no GPU needed): per-GPU activation peak and resident / swapped blocks
for A14B fp8 at 81 frames 832x480 and 1280x720 on cards of 24 and 32 GiB, cfg 3.5 (mode auto:
CFG-parallel from 2 GPUs, each half Ulysses) and cfg 1.

JSON on the last line. ``--quick`` runs a smaller forward (seconds).

    python bench/multi_gpu.py [--quick] [--device all|cpu|cuda] [--tokens 4096] [--dim 1024] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pack import register  # noqa: E402

register()
from wanfit.optim import planner  # noqa: E402
from wanfit.optim.parallel import DistComm, Mesh, ParallelBlocks, choose_mesh, trace_hook  # noqa: E402
from wanfit.wan.model import PRESETS, WanConfig, WanModel  # noqa: E402

GIB = 2**30


class CountingComm(DistComm):
    """DistComm that counts the bytes this rank sends."""

    def __init__(self):
        self.sent = 0

    def all_to_all(self, out, inp, group):
        self.sent += inp.numel() * inp.element_size() * (inp.shape[0] - 1) // inp.shape[0]
        super().all_to_all(out, inp, group)

    def all_gather(self, outs, inp, group):
        self.sent += inp.numel() * inp.element_size() * (len(outs) - 1)
        super().all_gather(outs, inp, group)


def build(dim: int, layers: int, device: str) -> WanModel:
    torch.manual_seed(0)
    config = WanConfig("t2v", dim=dim, ffn_dim=dim * 4, num_heads=dim // 128, num_layers=layers, text_dim=dim)
    model = WanModel(config).to(device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16).eval()
    return model.requires_grad_(False)


def frames_for(tokens: int) -> int:
    return max(1, tokens // 256)  # 16 x 16 tokens per frame


def call_inputs(model: WanModel, tokens: int, device: str) -> dict:
    x = torch.randn(2, 16, frames_for(tokens), 32, 32, device=device)
    return dict(x=x, t=torch.full((2,), 700.0, device=device), context=torch.randn(2, 64, model.config.text_dim,
                                                                                 device=device))


def timed(fn, repeats: int, sync=lambda: None) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def rank_main(rank: int, world: int, port: int, args, device_kind: str, out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = "cpu" if device_kind == "cpu" else f"cuda:{rank}"
    if device != "cpu":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    halves = {1: [None], 2: [dist.new_group(list(range(h * world // 2, (h + 1) * world // 2))) for h in range(2)]}
    model = build(args.dim, args.layers, device)
    inputs = call_inputs(model, args.tokens, device)
    sync = (lambda: torch.cuda.synchronize()) if device != "cpu" else (lambda: None)
    rows = {}
    with torch.no_grad():
        for name, mesh in (("cfg-parallel", Mesh(world, 2)), ("ulysses", Mesh(world, 1))):
            comm = CountingComm()
            split = ParallelBlocks(mesh, rank, comm, halves[mesh.cfg])
            timing = timed(lambda: model(**inputs, run_blocks=split.wrap(model.run_blocks)), args.repeats, sync)
            rows[name] = {"seconds": timing, "bytes_sent_per_call": comm.sent // (args.repeats + 1)}
    if rank == 0:
        out.update(rows)
    dist.destroy_process_group()


def _spawn_entry(rank, world, port, args, device_kind, queue):
    out: dict = {}
    rank_main(rank, world, port, args, device_kind, out)
    if rank == 0:
        queue.put(out)


def measure(args, device_kind: str, world: int) -> dict:
    import torch.multiprocessing as mp

    from wanfit.optim.pool import free_port

    device = "cpu" if device_kind == "cpu" else "cuda:0"
    torch.set_num_threads(1)
    model = build(args.dim, args.layers, device)
    inputs = call_inputs(model, args.tokens, device)
    sync = (lambda: torch.cuda.synchronize()) if device != "cpu" else (lambda: None)
    with torch.no_grad():
        one = timed(lambda: model(**inputs), args.repeats, sync)
    del model
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_spawn_entry, args=(world, free_port(), args, device_kind, queue), nprocs=world,
                       start_method="spawn")
    rows = queue.get()
    result = {"device": device_kind, "ranks": world, "threads_per_rank": 1, "dim": args.dim, "layers": args.layers,
              "tokens": frames_for(args.tokens) * 256, "batch": 2, "one_process_s": one}
    for name, row in rows.items():
        result[name] = {**row, "speedup": one["median"] / row["seconds"]["median"]}
    return result


def plans(reserve: float) -> list[dict]:
    config = PRESETS["Wan2.2 I2V-A14B expert"]
    out = []
    for width, height in ((832, 480), (1280, 720)):
        for card in (24, 32):
            for gpus in (1, 2, 4, 8):
                for cfg in (3.5, 1.0):
                    mesh = choose_mesh(gpus, "auto", cfg != 1.0, config)
                    hook = None if gpus == 1 else planner.BlocksHook(("split", mesh), mesh.describe(),
                                                                     trace_hook(mesh, mesh.world - 1))
                    plan = planner.plan_memory(config, frames=81, width=width, height=height,
                                               budget=int((card - reserve) * GIB), weights="fp8_e4m3fn_scaled",
                                               guidance=cfg != 1.0, cfg_batch=2 if mesh.cfg == 2 else None,
                                               hook=hook, host_ram=64 * GIB)
                    out.append({"size": f"{width}x{height}", "card_gib": card, "gpus": gpus, "cfg": cfg,
                                "mesh": mesh.describe(), "activations_gib": round(plan.activations.peak / GIB, 2),
                                "resident": plan.resident, "swapped": plan.swapped,
                                "peak_vram_gib": round(plan.sampling_vram / GIB, 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reserve", type=float, default=1.5, help="GiB left on each card")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="measure CPU ranks, CUDA ranks (2 or more GPUs), or both")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.dim, args.layers, args.repeats = 1024, 256, 2, 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    report: dict = {"plans": plans(args.reserve)}
    if args.device in ("all", "cpu"):
        report["cpu"] = measure(args, "cpu", 2)
    gpus = torch.cuda.device_count()
    if args.device in ("all", "cuda"):
        report["cuda"] = measure(args, "cuda", gpus) if gpus >= 2 else {"skipped": f"{gpus} CUDA device(s)"}
    for row in report["plans"]:
        print(f"{row['size']} {row['card_gib']} GiB x{row['gpus']} cfg {row['cfg']:g} ({row['mesh']}): "
              f"activations {row['activations_gib']} GiB, {row['resident']}/{row['swapped']} blocks, "
              f"peak {row['peak_vram_gib']} GiB")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
