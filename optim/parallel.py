"""Several devices on one DiT call: CFG-parallel and Ulysses sequence-parallel ranks.

A job's ranks form a mesh of ``cfg`` x ``sequence`` ranks (``Mesh``). Every rank runs the same
sampler on the same inputs; at each DiT call the block stack, where the work is, is split:

- CFG-parallel (``cfg`` = 2): the cond and uncond rows of a batched call run on two halves of
  the ranks, one row each;
- Ulysses sequence-parallel: within a half, each rank takes an equal share of the video tokens
  (the last padded up to an equal length), with its share of the RoPE table and of TI2V's
  per-token timestep runs. Around self-attention the ranks exchange heads for tokens
  (``all_to_all``), so each attends over the whole video for ``heads / sequence`` heads; the
  padded tokens are cut off there, so no real token ever attends to one (the padding is
  masked), and exchanged back. Cross-attention to text and CLIP stays local: every rank holds
  the whole context.

It hooks the model where the other techniques do: :meth:`ParallelBlocks.wrap` wraps a
``run_blocks`` (block swap, LoRA, fp8 and GGUF live behind it untouched) and sets the state's
``self_attention`` seam, taking whatever op was there (sparse attention) as the inner one.
One all-gather before ``unembed`` gives every rank the whole result, so code outside the block
stack (the step caches, the solver, context-window fusion) sees the same tensors on every
rank and decides the same thing without a word exchanged.

The collectives go through a ``Comm``: ``DistComm`` (torch.distributed; fp8 travels as bytes,
which gloo cannot carry) or ``TraceComm``, which only makes tensors of the right shapes, for
the memory planner to trace a rank's forward on meta tensors.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..wan.attention import AttentionFn, attention
from ..wan.model import WanConfig, WanState

MODES = ("auto", "cfg", "sequence", "both")


class ParallelError(ValueError):
    """A mesh that cannot run this model or job; the message says which counts work."""


@dataclass(frozen=True)
class Mesh:
    """``world`` ranks as ``cfg`` (1 or 2) halves of ``world // cfg`` sequence ranks; rank r is
    CFG half ``r // sequence`` and sequence rank ``r % sequence`` within it."""

    world: int
    cfg: int = 1

    def __post_init__(self):
        if self.cfg not in (1, 2) or self.world < 1 or self.world % self.cfg:
            raise ParallelError(f"a mesh of {self.world} ranks cannot have {self.cfg} CFG halves")

    @property
    def sequence(self) -> int:
        return self.world // self.cfg

    def cfg_rank(self, rank: int) -> int:
        return rank // self.sequence

    def seq_rank(self, rank: int) -> int:
        return rank % self.sequence

    def seq_group_ranks(self, rank: int) -> list[int]:
        """The ranks sharing ``rank``'s CFG half, in sequence order."""
        half = self.cfg_rank(rank)
        return [half * self.sequence + s for s in range(self.sequence)]

    def describe(self) -> str:
        parts = (["CFG-parallel (cond | uncond)"] if self.cfg == 2 else []) + (
            [f"Ulysses sequence-parallel over {self.sequence}"] if self.sequence > 1 else [])
        return " x ".join(parts) or "one rank"


def sequence_counts(heads: int, limit: int) -> list[int]:
    """Sequence-parallel rank counts up to ``limit`` that split ``heads`` evenly."""
    return [n for n in range(1, limit + 1) if heads % n == 0]


def choose_mesh(world: int, mode: str, guidance: bool, config: WanConfig) -> Mesh:
    """The mesh for a job on ``world`` ranks. ``mode``: cfg (two halves, cond | uncond), sequence
    (every rank splits the tokens), both (two halves that each split them), auto (CFG-parallel
    where the job has guidance and the rank count is even, the rest in sequence). With cfg 1
    (the 4-step LoRAs) there is no uncond row: every rank goes to the sequence split."""
    if mode not in MODES:
        raise ParallelError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    if world == 1:
        return Mesh(1)
    if mode == "cfg" and not guidance:
        raise ParallelError("CFG-parallel needs cfg above 1 (two rows to split); with cfg 1 use sequence or auto")
    if mode == "cfg" and world != 2:
        raise ParallelError(f"CFG-parallel alone uses 2 ranks, not {world}; use both or auto for more")
    if mode == "both" and (not guidance or world % 2):
        raise ParallelError("both needs cfg above 1 and an even number of ranks")
    cfg = 2 if mode in ("cfg", "both") or (mode == "auto" and guidance and world % 2 == 0) else 1
    mesh = Mesh(world, cfg)
    if config.num_heads % mesh.sequence:
        works = ", ".join(map(str, sequence_counts(config.num_heads, 64)))
        raise ParallelError(f"{mesh.sequence} sequence ranks cannot split this model's {config.num_heads} attention "
                            f"heads evenly (Ulysses gives each rank heads / ranks); sequence rank counts that work: "
                            f"{works}" + (" (times 2 with CFG-parallel)" if guidance else ""))
    return mesh


class Comm(Protocol):
    """The collectives the split uses (``group``: a process group, or None for all ranks)."""

    def all_to_all(self, out: Tensor, inp: Tensor, group: Any) -> None: ...
    def all_gather(self, outs: list[Tensor], inp: Tensor, group: Any) -> None: ...


class DistComm:
    """``torch.distributed``, with fp8 sent as its bytes (gloo refuses fp8 tensors)."""

    @staticmethod
    def _wire(t: Tensor) -> Tensor:
        return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype.is_floating_point else t

    def all_to_all(self, out: Tensor, inp: Tensor, group: Any) -> None:
        import torch.distributed as dist

        dist.all_to_all_single(self._wire(out), self._wire(inp), group=group)

    def all_gather(self, outs: list[Tensor], inp: Tensor, group: Any) -> None:
        import torch.distributed as dist

        dist.all_gather([self._wire(o) for o in outs], self._wire(inp), group=group)


class TraceComm:
    """No communication: what a rank's memory planner traces (the outputs are allocated, as the
    real collectives allocate them, and left unwritten)."""

    def all_to_all(self, out: Tensor, inp: Tensor, group: Any) -> None:
        pass

    def all_gather(self, outs: list[Tensor], inp: Tensor, group: Any) -> None:
        pass


@dataclass(frozen=True)
class Shard:
    """Tokens [start, stop) of ``length``, padded to ``size`` (equal on every rank)."""

    start: int
    stop: int
    size: int
    length: int

    @classmethod
    def of(cls, length: int, rank: int, ranks: int) -> Shard:
        size = -(-length // ranks)
        start = min(rank * size, length)
        return cls(start, min(start + size, length), size, length)

    @property
    def pad(self) -> int:
        return self.size - (self.stop - self.start)


def _take(t: Tensor, shard: Shard, dim: int) -> Tensor:
    """``t``'s tokens of ``shard`` along ``dim``, zero-padded to the shard size."""
    part = t.narrow(dim, shard.start, shard.stop - shard.start)
    if not shard.pad:
        return part
    pad = [0, 0] * (t.dim() - dim - 1) + [0, shard.pad]
    return F.pad(part, pad)


def _runs_of(runs: Sequence[int], shard: Shard) -> tuple[list[int], tuple[int, ...]]:
    """The rows (runs of equal timesteps) overlapping ``shard`` and their token counts in it; the
    padding joins the last run (its tokens are dropped, any modulation serves)."""
    rows, counts, at = [], [], 0
    for row, count in enumerate(runs):
        overlap = min(at + count, shard.stop) - max(at, shard.start)
        if overlap > 0:
            rows.append(row)
            counts.append(overlap)
        at += count
    if not rows:  # a shard of padding only
        return [len(runs) - 1], (shard.size,)
    counts[-1] += shard.pad
    return rows, tuple(counts)


def _seq_to_heads(t: Tensor, ranks: int, comm: Comm, group: Any) -> Tensor:
    """[B, S, N, D] (this rank's tokens, all heads) -> [B, ranks * S, N / ranks, D] (every rank's
    tokens, in rank order, for this rank's share of the heads)."""
    b, s, n, d = t.shape
    send = t.reshape(b, s, ranks, n // ranks, d).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(send)
    comm.all_to_all(received, send, group)
    return received.permute(1, 0, 2, 3, 4).reshape(b, ranks * s, n // ranks, d)


def _heads_to_seq(t: Tensor, ranks: int, comm: Comm, group: Any) -> Tensor:
    """The inverse of :func:`_seq_to_heads`."""
    b, length, h, d = t.shape
    s = length // ranks
    send = t.reshape(b, ranks, s, h, d).permute(1, 0, 2, 3, 4).contiguous()
    received = torch.empty_like(send)
    comm.all_to_all(received, send, group)
    return received.permute(1, 2, 0, 3, 4).reshape(b, s, ranks * h, d)


def ulysses(inner: AttentionFn, shard: Shard, ranks: int, comm: Comm, group: Any,
            mask_padding: bool = True) -> AttentionFn:
    """Self-attention over the whole sequence from each rank's share of it: heads and tokens
    are exchanged around ``inner`` (the dense kernel, or a sparse one), which sees exactly the
    tokens of one process, for ``heads / ranks`` heads. ``mask_padding=False`` (tests only)
    attends to the padded keys, to show what masking them prevents."""
    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (_seq_to_heads(t, ranks, comm, group) for t in (q, k, v))
        if mask_padding:
            q, k, v = (t[:, :shard.length] for t in (q, k, v))
        out = inner(q, k, v)
        del q, k, v
        if mask_padding and out.shape[1] != ranks * shard.size:
            out = F.pad(out, (0, 0, 0, 0, 0, ranks * shard.size - out.shape[1]))
        return _heads_to_seq(out, ranks, comm, group)
    return attend


@dataclass
class ParallelBlocks:
    """The split of one rank of ``mesh`` around a ``run_blocks``. ``groups``: the process group
    of each CFG half's sequence ranks (index: the half), ``world_group``: every rank's."""

    mesh: Mesh
    rank: int
    comm: Comm
    groups: Sequence[Any] = (None,)
    world_group: Any = None
    mask_padding: bool = True
    before_call: Callable[[], None] | None = None  # e.g. agree on Cancel, once per DiT call
    in_call: bool = False  # between the first and the last collective of a call

    def wrap(self, run_blocks: Callable[..., WanState]) -> Callable[..., WanState]:
        """``run_blocks(state, *more) -> state`` over this rank's share; every rank returns the
        whole result."""
        @functools.wraps(run_blocks)
        def run(state: WanState, *more) -> WanState:
            if self.before_call is not None:
                self.before_call()
            self.in_call = True
            out = self.run(state, lambda s: run_blocks(s, *more))
            self.in_call = False
            return out
        return run

    def run(self, state: WanState, run_blocks: Callable[[WanState], WanState]) -> WanState:
        mesh, rank = self.mesh, self.rank
        batch, length = state.x.shape[:2]
        if mesh.cfg == 2 and batch != 2:
            raise ParallelError(f"CFG-parallel runs batched cond + uncond calls; this call has batch {batch}")
        whole = (state.e, state.e0, state.freqs, state.context, state.context_img, state.runs, state.self_attention)
        rows = slice(mesh.cfg_rank(rank), mesh.cfg_rank(rank) + 1) if mesh.cfg == 2 else slice(None)
        shard = Shard.of(length, mesh.seq_rank(rank), mesh.sequence)
        e, e0 = state.e[rows], state.e0[rows]
        if state.runs is not None:
            keep, state.runs = _runs_of(state.runs, shard)
            e, e0 = e[:, keep], e0[:, keep]
        state.e, state.e0 = e, e0
        share = _take(state.x[rows], shard, 1)
        # a share of its own, so the whole video's embedding goes as the blocks begin
        state.x = share.clone() if share.untyped_storage().data_ptr() == state.x.untyped_storage().data_ptr() else share
        del share
        state.freqs = _take(state.freqs, shard, 0)
        state.context = state.context[rows]
        state.context_img = None if state.context_img is None else state.context_img[rows]
        if mesh.sequence > 1:
            inner = whole[6] or functools.partial(attention, backend=state.backend)
            state.self_attention = ulysses(inner, shard, mesh.sequence, self.comm,
                                           self.groups[mesh.cfg_rank(rank)], self.mask_padding)
        try:
            local = run_blocks(state).x
        finally:
            state.e, state.e0, state.freqs, state.context, state.context_img, state.runs, state.self_attention = whole
            state.x = None
        state.x = self._gather(local, batch, length)
        return state

    def _gather(self, local: Tensor, batch: int, length: int) -> Tensor:
        """Every rank's share into one buffer, [CFG half, sequence rank, rows, share, dim]; the
        whole result is a view of it (a copy only for two rows split by tokens alone)."""
        mesh = self.mesh
        rows, size, dim = local.shape
        buffer = local.new_empty(mesh.cfg, mesh.sequence, rows, size, dim)
        self.comm.all_gather(list(buffer.flatten(0, 1).unbind(0)), local, self.world_group)
        del local
        if rows == 1:  # CFG-parallel, or one row: the shares already lie in token order
            return buffer.view(mesh.cfg, mesh.sequence * size, dim)[:, :length]
        return buffer[0].transpose(0, 1).reshape(rows, mesh.sequence * size, dim)[:, :length]


def trace_hook(mesh: Mesh, rank: int = 0):
    """A ``planner.BlocksHook``-style ``wrap(run, batch)``: the forward of ``rank`` as the planner
    traces it, with shape-only collectives (``TraceComm``)."""
    def wrap(run: Callable[[WanState], WanState], batch: int) -> Callable[[WanState], WanState]:
        return ParallelBlocks(mesh, rank, TraceComm(), groups=[None] * mesh.cfg).wrap(run)
    return wrap


def moved_bytes(config: WanConfig, length: int, mesh: Mesh, dtype: torch.dtype, batch: int = 2) -> int:
    """Bytes each rank sends per DiT call: four all-to-alls (q, k, v and the output) of its
    tokens per block, and the final all-gather of the float32 result."""
    rows = 1 if mesh.cfg == 2 else batch
    share = Shard.of(length, 0, mesh.sequence).size
    a2a = 0 if mesh.sequence == 1 else 4 * rows * share * config.dim * dtype.itemsize * (mesh.sequence - 1) // mesh.sequence
    return config.num_layers * a2a + rows * share * config.dim * 4 * (mesh.world - 1)


