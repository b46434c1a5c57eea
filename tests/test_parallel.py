"""The parallel forward (optim/parallel.py): on 2 CPU processes against one (tests/parallel_cases.py,
in a process of its own), and its pieces without processes: the mesh rules, the shares of
tokens and of TI2V's timestep runs, the exchange, the planner's view of a rank."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_server import free_port
from wanfit.optim import planner
from wanfit.optim.parallel import (DistComm, Mesh, ParallelError, Shard, _heads_to_seq, _runs_of, _seq_to_heads,
                                   choose_mesh, moved_bytes, sequence_counts, trace_hook)
from wanfit.wan.model import PRESETS

CASES = Path(__file__).resolve().parent / "parallel_cases.py"
A14B, TI2V, T2V_13B = PRESETS["Wan2.2 I2V-A14B expert"], PRESETS["Wan2.2 TI2V-5B"], PRESETS["Wan2.1 T2V 1.3B"]


@pytest.fixture(scope="module")
def two_ranks() -> dict[str, dict]:
    out = subprocess.run([sys.executable, str(CASES), str(free_port())], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-5000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {row["case"]: row for row in rows}


@pytest.mark.parametrize("kind", ["t2v", "i2v", "ti2v"])
def test_ulysses_on_two_ranks_equals_one_process_bit_for_bit(two_ranks, kind):
    """45 tokens: rank 1's share is padded; its padded keys are cut off before attention."""
    row = two_ranks[f"{kind} Ulysses sequence-parallel over 2"]
    assert row["equal"], row
    assert row["unmasked_max_diff"] > 1e-4, row  # attending to the padding would show


@pytest.mark.parametrize("kind", ["t2v", "i2v", "ti2v"])
def test_cfg_parallel_on_two_ranks_equals_batched_cfg_bit_for_bit(two_ranks, kind):
    assert two_ranks[f"{kind} CFG-parallel (cond | uncond)"]["equal"]


@pytest.mark.parametrize("case", ["i2v Ulysses sequence-parallel over 2", "ti2v CFG-parallel (cond | uncond)"])
@pytest.mark.parametrize("rank", [0, 1])
def test_the_planner_traces_a_rank_share_as_it_runs(two_ranks, case, rank):
    """Shape-only collectives in the trace, real ones in the run: the same bytes phase by phase,
    but for exchange buffers gloo releases late (within the planner's 10 % bar)."""
    row = two_ranks[f"plan {case} rank {rank}"]
    assert row["starts_equal"] and row["worst"] < 0.10, row
    assert row["block_peak"] < row["alone_block_peak"], row


# --- without processes ----------------------------------------------------------------------

def test_the_mesh_follows_the_mode_the_cfg_and_the_heads():
    assert choose_mesh(1, "auto", True, A14B) == Mesh(1)
    assert choose_mesh(2, "auto", True, A14B) == Mesh(2, 2)  # cond | uncond
    assert choose_mesh(2, "auto", False, A14B) == Mesh(2, 1)  # cfg 1: the tokens split
    assert choose_mesh(8, "auto", True, A14B) == Mesh(8, 2)  # 2 halves of 4
    assert choose_mesh(8, "sequence", True, A14B) == Mesh(8, 1)
    assert choose_mesh(4, "both", True, T2V_13B) == Mesh(4, 2)
    with pytest.raises(ParallelError, match="cfg above 1"):
        choose_mesh(2, "cfg", False, A14B)
    with pytest.raises(ParallelError, match=r"3 sequence ranks cannot split this model's 40 attention heads.*1, 2, 4, 5, 8, 10"):
        choose_mesh(3, "sequence", False, A14B)
    with pytest.raises(ParallelError, match="8 sequence ranks cannot split this model's 12"):
        choose_mesh(8, "sequence", True, T2V_13B)
    assert choose_mesh(8, "auto", True, TI2V) == Mesh(8, 2)  # 24 heads over 4
    assert sequence_counts(40, 8) == [1, 2, 4, 5, 8] and sequence_counts(12, 12) == [1, 2, 3, 4, 6, 12]


def test_shares_of_tokens_and_of_timestep_runs():
    shares = [Shard.of(45, r, 4) for r in range(4)]
    assert [(s.start, s.stop, s.pad) for s in shares] == [(0, 12, 0), (12, 24, 0), (24, 36, 0), (36, 45, 3)]
    assert [(s.start, s.stop, s.pad) for s in (Shard.of(3, r, 4) for r in range(4))] == [
        (0, 1, 0), (1, 2, 0), (2, 3, 0), (3, 3, 1)]  # a share of padding only
    # TI2V: 15 first-frame tokens at t=0, then 30 others; rank 1 of 2 (23..45) holds only the second run
    assert _runs_of((15, 30), Shard.of(45, 0, 2)) == ([0, 1], (15, 8))
    assert _runs_of((15, 30), Shard.of(45, 1, 2)) == ([1], (23,))  # 22 tokens + 1 of padding
    assert _runs_of((15, 30), Shard(45, 45, 12, 45)) == ([1], (12,))


def test_the_exchange_puts_every_rank_tokens_in_order():
    """One rank seen alone: with a stand-in all-to-all (rank 0 of 2, the other rank's data
    made up), tokens in and out sit where the split says."""
    class Swap:  # rank 0's view: it keeps chunk 0 and receives the other rank's chunk as chunk 1
        def all_to_all(self, out, inp, group):
            out[0] = inp[0]
            out[1] = inp[1] + 1000  # "rank 1's tokens"
    t = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)  # B, S, N, D
    heads = _seq_to_heads(t, 2, Swap(), None)
    assert heads.shape == (2, 6, 2, 5)
    assert torch.equal(heads[:, :3], t[:, :, :2]) and torch.equal(heads[:, 3:], t[:, :, 2:] + 1000)
    assert _heads_to_seq(heads, 2, Swap(), None).shape == t.shape


def test_fp8_travels_as_bytes():
    t = torch.zeros(4, dtype=torch.float8_e4m3fn)
    assert DistComm._wire(t).dtype == torch.uint8 and DistComm._wire(torch.zeros(2)).dtype == torch.float32


def test_the_plan_of_a_rank_holds_its_share_of_the_activations():
    """A14B at 81 frames 832x480 (32,760 tokens): a rank of 4 (2 per CFG half) plans a smaller
    activation peak than one device, with the whole-token embedding and the gathered output
    still counted."""
    grid = planner.latent_shape(A14B, 81, 832, 480)
    grid = tuple(s // p for s, p in zip(grid, A14B.patch_size))
    one = planner.dit_activations(A14B, grid, 2, torch.bfloat16, "fp8_e4m3fn_scaled", "sdpa", "cuda")
    hook = planner.BlocksHook(("split",), "split", trace_hook(Mesh(4, 2), 1))
    rank = planner.dit_activations(A14B, grid, 2, torch.bfloat16, "fp8_e4m3fn_scaled", "sdpa", "cuda", hook=hook)
    assert rank.peak < 0.75 * one.peak
    assert moved_bytes(A14B, 32760, Mesh(4, 2), torch.bfloat16) > moved_bytes(A14B, 32760, Mesh(2, 2), torch.bfloat16)
