"""The parallel forward on 2 CPU processes (gloo, 1 thread each), against one process: run by
tests/test_parallel.py in a process of its own, prints one JSON line per case (rank 0).

Tiny 4-head DiTs (dim 128: float32 GEMMs at that width give the same bits for any row count
here, so the split changes nothing but the exchange), 3 x 3 x 5 = 45 tokens: 23 + 22, so
rank 1's share is padded and the masking of padded keys is exercised.

    python tests/parallel_cases.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import register  # noqa: E402

register()
from wanfit.optim import planner  # noqa: E402
from wanfit.optim.parallel import DistComm, Mesh, ParallelBlocks, trace_hook  # noqa: E402
from wanfit.wan.model import WanConfig, WanModel  # noqa: E402

GRID = (3, 3, 5)


def model(kind: str) -> WanModel:
    torch.manual_seed(0)
    config = WanConfig(kind, dim=128, ffn_dim=256, num_heads=4, num_layers=2, freq_dim=64, text_dim=64,
                       in_dim={"t2v": 16, "i2v": 36, "ti2v": 48}[kind], out_dim=48 if kind == "ti2v" else 16)
    m = WanModel(config).float().eval().requires_grad_(False)
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return m


def inputs(m: WanModel, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    c = m.config
    f, h, w = GRID
    x = torch.randn(batch, c.out_dim, f, 2 * h, 2 * w, generator=g)
    t = torch.full((batch,), 700.0)
    if c.model_type == "ti2v":  # per-token timesteps: the first frame at 0 (two runs, cut by the split)
        t = torch.full((batch, f * h * w), 700.0)
        t[:, :h * w] = 0.0
    y = torch.randn(batch, c.in_dim - c.out_dim, f, 2 * h, 2 * w, generator=g) if c.model_type == "i2v" else None
    return dict(x=x, t=t, context=torch.randn(batch, 12, 64, generator=g), y=y)


def run(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    halves = {1: [None], 2: [dist.new_group([0]), dist.new_group([1])]}

    def report(**row):
        if rank == 0:
            print(json.dumps(row), flush=True)

    with torch.no_grad():
        for kind in ("t2v", "i2v", "ti2v"):
            for batch, mesh in ((1, Mesh(world, 1)), (2, Mesh(world, 2))):
                m = model(kind)
                args = inputs(m, batch)
                one = m(**args)
                split = ParallelBlocks(mesh, rank, DistComm(), halves[mesh.cfg])
                two = m(**args, run_blocks=split.wrap(m.run_blocks))
                row = dict(case=f"{kind} {mesh.describe()}", equal=bool(torch.equal(one, two)),
                           max_diff=float((one - two).abs().max()))
                if mesh.cfg == 1:
                    unmasked = ParallelBlocks(mesh, rank, DistComm(), halves[1], mask_padding=False)
                    bad = m(**args, run_blocks=unmasked.wrap(m.run_blocks))
                    row["unmasked_max_diff"] = float((one - bad).abs().max())
                report(**row)
        # the planner traces a rank's share with shape-only collectives: the same bytes as the
        # real one (its op outputs, phase by phase), on each rank
        for kind, batch, mesh in (("i2v", 1, Mesh(world, 1)), ("ti2v", 2, Mesh(world, 2))):
            m = model(kind)
            args = inputs(m, batch)
            host = m.host_inputs(args["t"], batch, GRID)
            real_inputs = {**args, "t": None, "host": host,
                           "run_blocks": ParallelBlocks(mesh, rank, DistComm(), halves[mesh.cfg]).wrap(m.run_blocks)}
            real = planner.trace_forward(m, real_inputs)
            hook = planner.BlocksHook(("split", mesh, rank), "split", trace_hook(mesh, rank))
            predicted = planner.dit_activations(m.config, GRID, batch, torch.float32, "fp32", "sdpa", "cpu",
                                                hook=hook)
            alone = planner.dit_activations(m.config, GRID, batch, torch.float32, "fp32", "sdpa", "cpu")
            # gloo's work objects let go of exchanged buffers on their own schedule, so a real
            # phase may count one or two of them more than the trace: compared within the
            # planner's 10 % bar, the starts of the embedding and the first block exactly
            worst = max(abs(real[p.name].outputs_peak - p.outputs_peak) / p.outputs_peak for p in predicted.phases)
            starts = [(p.start, real[p.name].start) for p in predicted.phases[:2]]
            mine = dict(case=f"plan {kind} {mesh.describe()} rank {rank}", worst=worst,
                        starts_equal=all(a == b for a, b in starts),
                        block_peak=predicted.phases[2].outputs_peak, alone_block_peak=alone.phases[2].outputs_peak)
            rows = [None] * world
            dist.all_gather_object(rows, mine)
            for row in rows:
                report(**row)
    dist.destroy_process_group()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 29561
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(run, args=(2, port), nprocs=2)
