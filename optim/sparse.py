"""Sparse self-attention for long videos: block-sparse ``flex_attention`` over the token grid.

A video's tokens are a grid (F frames, H rows, W columns after patching), flattened frame by
frame, row by row, as ``WanModel.embed`` makes them. A pattern says which (query, key) token
pairs attend; ``flex_attention`` computes only the 128 x 128 blocks holding a kept pair (whole
blocks without a mask, partial blocks through the same rule as ``mask_mod``), so the result is
exactly softmax attention restricted to the pattern.

- ``radial`` (Radial Attention, Li et al. 2025, arXiv 2506.19852; mit-han-lab/radial-attention):
  query token k of frame i and key token l of frame j, d = |i - j|, r = floor(log2 max(d, 1)),
  s = tokens per frame. Frames at d <= 1 attend densely. Further apart, the spatial window
  shrinks by half per band of distances [2^r, 2^(r+1)): kept when ``|k - l| + 1 <= w`` with
  ``w = decay * s / 2^r``; where ``w < 1`` only ``k == l`` is kept, on every
  ``ceil(2^r / (decay * s))``-th frame. ``decay`` is the reference code's ``decay_factor``
  (1 is the paper's mask; its Wan scripts use 0.2 for Wan 2.1 and 0.8 for Wan 2.2) and
  ``sink`` its Wan attention sink (every token attends to all of frame 0).
- ``window``: a plain spatial-temporal window: kept when the two tokens are at most
  ``frames`` frames, ``rows`` rows and ``columns`` columns apart.

The published recipe runs the first steps and the first block(s) dense (radial attention's
Wan scripts: ``dense_timesteps``, ``dense_layers`` 1): ``dense_steps`` and ``dense_blocks``.

Where it hooks: :meth:`SparseAttention.wrap` wraps the denoiser's ``run_blocks(state, call)``
(``wan/denoise.py``) and sets ``state.self_attention`` (``wan/attention.AttentionFn``) to the
op for ``state.grid``, so the model's code is untouched and cross-attention never sees it. The
block index comes from a forward pre-hook on each block, put on for the call and taken off
after it: the hook tells the op whether the coming block is one of the dense ones (outside any
compiled region, so a compiled block sees one of two fixed values and never recompiles).

The op takes its layout from the grid, not from its inputs: it accepts any head count (a
sequence-parallel rank hands it N / P heads over the full sequence) and refuses a token count
that is not the grid's. Block masks are built once per (grid, device) and kept (a few hundred
kB at 32k tokens). Under a fake-tensor trace (the memory planner's) the op allocates what the
kernel returns (output and log-sum-exp) instead of running it.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..wan.attention import attention, resolve_backend
from ..wan.denoise import DiTCall, RunBlocks
from ..wan.model import WanState

log = logging.getLogger("WanFit")
PATTERNS = ("radial", "window")
GRANULARITIES = ("token", "block")
MASKS_KEPT = 8  # grids whose block masks stay cached (context windows: one or two grids)


@dataclass(frozen=True)
class SparseSettings:
    """Which pattern and its parameters; see the module docstring."""

    pattern: str = "radial"
    decay: float = 1.0  # radial: spatial window scale for frames 2 or more apart
    sink: bool = True  # radial: every token attends to frame 0
    window: tuple[int, int, int] = (2, 8, 8)  # window: frames, rows, columns apart (each side)
    dense_steps: int = 0  # the first steps of the schedule run dense
    dense_blocks: int = 1  # the first blocks of every call run dense
    block_size: int = 128
    granularity: str = "token"  # token: the mask exactly; block: every computed block whole (no per-pair rule)

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"sparse attention granularity {self.granularity!r}: choose one of "
                             f"{', '.join(GRANULARITIES)}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"sparse attention pattern {self.pattern!r}: choose one of {', '.join(PATTERNS)}")
        if not (math.isfinite(self.decay) and self.decay > 0):
            raise ValueError(f"sparse attention decay must be a positive number, got {self.decay}")
        if len(self.window) != 3 or any(int(w) != w or w < 0 for w in self.window):
            raise ValueError(f"sparse attention window must be three whole numbers >= 0 (frames, rows, columns), "
                             f"got {self.window}")
        if self.dense_steps < 0 or self.dense_blocks < 0:
            raise ValueError(f"dense_steps and dense_blocks must be >= 0, got {self.dense_steps}, {self.dense_blocks}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"sparse attention block_size must be a power of two >= 16, got {self.block_size}")

    def describe(self) -> str:
        if self.pattern == "radial":
            what = f"radial (decay {self.decay:g}{', sink on frame 0' if self.sink else ''})"
        else:
            f, r, c = self.window
            what = f"window ({f} frames, {r} rows, {c} columns)"
        dense = []
        if self.dense_steps:
            dense.append(f"first {self.dense_steps} step{'s' if self.dense_steps > 1 else ''}")
        if self.dense_blocks:
            dense.append(f"first {self.dense_blocks} block{'s' if self.dense_blocks > 1 else ''}")
        if self.granularity == "block":
            what += f" in whole {self.block_size}-token blocks"
        return f"sparse attention {what}" + (f", dense in the {' and '.join(dense)}" if dense else "")


# --- the token rules ----------------------------------------------------------------------------

def radial_reach(frames: int, per_frame: int, decay: float = 1.0) -> list[int]:
    """For each frame distance d (0 .. frames - 1), the largest spatial distance |k - l| the
    radial mask keeps, or -1 for none: ``floor(w) - 1`` with ``w = decay * s / 2^r`` (the
    paper's ``|k - l| + 1 <= w``), ``s`` at d <= 1; where ``w < 1``, 0 (the diagonal) on every
    ``ceil(2^r / (decay * s))``-th frame and -1 between."""
    reach = []
    for d in range(frames):
        if d <= 1:
            reach.append(per_frame - 1)
            continue
        band = 2 ** int(math.floor(math.log2(d)))
        w = decay * per_frame / band
        if w >= 1:
            reach.append(int(math.floor(w)) - 1)
        else:
            reach.append(0 if d % math.ceil(band / (decay * per_frame)) == 0 else -1)
    return reach


class TokenRule:
    """``keep(q, kv)`` for token indices of one grid, as tensor ops on lookup tables (so the
    same function is ``flex_attention``'s ``mask_mod``, builds the block lists and, in tests,
    the dense mask). The tables are padded to whole blocks."""

    def __init__(self, settings: SparseSettings, grid: tuple[int, int, int], device: torch.device | str = "cpu"):
        f, h, w = (int(n) for n in grid)
        if min(f, h, w) < 1:
            raise ValueError(f"token grid {grid} has an empty side")
        self.settings, self.grid, self.tokens = settings, (f, h, w), f * h * w
        bs = settings.block_size
        padded = -(-self.tokens // bs) * bs
        index = torch.arange(padded, device=device).clamp_max(self.tokens - 1)  # padding repeats the last token
        self.frame = (index // (h * w)).to(torch.int32)
        spatial = index % (h * w)
        if settings.pattern == "radial":
            self.spatial = spatial.to(torch.int32)
            self.reach = torch.tensor(radial_reach(f, h * w, settings.decay), dtype=torch.int32, device=device)
            self.sink = torch.tensor(settings.sink, device=device)
        else:
            self.row, self.col = (spatial // w).to(torch.int32), (spatial % w).to(torch.int32)
            self.limits = torch.tensor(settings.window, dtype=torch.int32, device=device)

    def __call__(self, b, h, q: Tensor, kv: Tensor) -> Tensor:  # flex_attention's mask_mod signature
        return self.keep(q, kv)

    def keep(self, q: Tensor, kv: Tensor) -> Tensor:
        fq, fk = self.frame[q], self.frame[kv]
        d = (fq - fk).abs()
        if self.settings.pattern == "radial":
            near = (self.spatial[q] - self.spatial[kv]).abs() <= self.reach[d]
            return near | (self.sink & (fk == 0))
        return ((d <= self.limits[0]) & ((self.row[q] - self.row[kv]).abs() <= self.limits[1])
                & ((self.col[q] - self.col[kv]).abs() <= self.limits[2]))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in vars(self).values() if isinstance(t, Tensor))


class BlockRule:
    """``keep(q, kv)`` at block granularity: the pair's blocks hold a pair the pattern keeps."""

    def __init__(self, kept: Tensor, block_size: int):
        self.kept, self.block_size = kept, block_size

    def __call__(self, b, h, q: Tensor, kv: Tensor) -> Tensor:
        return self.keep(q, kv)

    def keep(self, q: Tensor, kv: Tensor) -> Tensor:
        return self.kept[q // self.block_size, kv // self.block_size]

    def nbytes(self) -> int:
        return self.kept.nbytes


def dense_mask(settings: SparseSettings, grid: tuple[int, int, int]) -> Tensor:
    """The [L, L] boolean mask of a (small) grid: tests and explanations."""
    rule = TokenRule(settings, grid)
    idx = torch.arange(rule.tokens)
    if settings.granularity == "block":
        some, _ = _block_lists(settings, rule.grid, "cpu")
        return BlockRule(some, settings.block_size).keep(idx[:, None], idx[None, :])
    return rule.keep(idx[:, None], idx[None, :])


# --- block masks ---------------------------------------------------------------------------------

@dataclass
class GridMask:
    """The block mask of one grid on one device, and what it keeps."""

    grid: tuple[int, int, int]
    tokens: int
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    rule: TokenRule | BlockRule
    blocks: int  # q-block x kv-block pairs
    partial: int  # pairs computed through the mask rule
    full: int  # pairs computed whole
    computed: float  # share of the L x L score matrix inside computed blocks
    density: float  # share of token pairs the pattern keeps
    nbytes: int  # device bytes held: block lists and the rule's tables

    @property
    def keep_fraction(self) -> float:
        """The share of dense attention's work that is done: token pairs in computed blocks."""
        return self.computed

    def describe(self) -> str:
        f, h, w = self.grid
        return (f"{f}x{h}x{w} = {self.tokens:,} tokens: {100 * self.computed:.1f} % of the attention computed "
                f"({self.partial + self.full} of {self.blocks} blocks, {self.full} whole), "
                f"{100 * self.density:.1f} % of token pairs kept")


def _band(n: int, reach: int) -> int:
    """Pairs (x, y) in [0, n)^2 with |x - y| <= reach."""
    if reach < 0:
        return 0
    if reach >= n - 1:
        return n * n
    return n * (2 * reach + 1) - reach * (reach + 1)


def kept_pairs(settings: SparseSettings, grid: tuple[int, int, int]) -> int:
    """Token pairs the pattern keeps, in closed form (per frame pair a band count)."""
    f, h, w = grid
    s = h * w
    if settings.pattern == "radial":
        reach = radial_reach(f, s, settings.decay)
        total = 0
        for i in range(f):
            for j in range(f):
                total += s * s if (settings.sink and j == 0) else _band(s, reach[abs(i - j)])
        return total
    tf, tr, tc = settings.window
    frame_pairs = _band(f, tf)
    return frame_pairs * _band(h, tr) * _band(w, tc)


def _segments(grid: tuple[int, int, int], bs: int, device) -> tuple[Tensor, ...]:
    """Each block of ``bs`` consecutive tokens as the pieces of grid rows it covers: frame,
    row, first and last column ([blocks, pieces], ``valid`` marks the real ones)."""
    f, h, w = grid
    n = f * h * w
    nb = -(-n // bs)
    start = torch.arange(nb, device=device) * bs
    end = torch.clamp_max(start + bs, n) - 1  # last token of each block
    first_row, last_row = start // w, end // w
    pieces = int((last_row - first_row).max()) + 1
    g = first_row[:, None] + torch.arange(pieces, device=device)[None]  # global row (frame * h + row)
    valid = g <= last_row[:, None]
    g = torch.minimum(g, last_row[:, None])
    lo = torch.maximum(start[:, None], g * w) - g * w
    hi = torch.minimum(end[:, None], g * w + w - 1) - g * w
    return g // h, g % h, lo, hi, valid


def _block_lists(settings: SparseSettings, grid: tuple[int, int, int], device) -> tuple[Tensor, Tensor]:
    """(any, all): per (query block, key block), whether some / every token pair is kept,
    from interval arithmetic on the row pieces of the two blocks (no token pair evaluated)."""
    f, h, w = grid
    fr, row, lo, hi, valid = _segments(grid, settings.block_size, device)
    q = [t[:, :, None, None] for t in (fr, row, lo, hi, valid)]
    k = [t[None, None] for t in (fr, row, lo, hi, valid)]
    fq, rq, lq, hq, vq = q
    fk, rk, lk, hk, vk = k
    d = (fq - fk).abs()
    if settings.pattern == "radial":
        reach = torch.tensor(radial_reach(f, h * w, settings.decay), device=device)[d]
        aq, bq, ak, bk = rq * w + lq, rq * w + hq, rk * w + lk, rk * w + hk  # spatial index ranges
        nearest = torch.clamp_min(torch.maximum(ak - bq, aq - bk), 0)
        farthest = torch.maximum(bq - ak, bk - aq)
        some, every = nearest <= reach, farthest <= reach
        if settings.sink:
            some, every = some | (fk == 0), every | (fk == 0)
    else:
        tf, tr, tc = settings.window
        near = (d <= tf) & ((rq - rk).abs() <= tr)
        some = near & (torch.clamp_min(torch.maximum(lk - hq, lq - hk), 0) <= tc)
        every = near & (torch.maximum(hq - lk, hk - lq) <= tc)
    pair = vq & vk
    some = (some & pair).any(dim=3).any(dim=1)
    every = (every | ~pair).all(dim=3).all(dim=1)
    return some, every


def build_grid_mask(settings: SparseSettings, grid: tuple[int, int, int], device: torch.device | str) -> GridMask:
    """The block mask of ``grid`` on ``device``: per query block, the key blocks computed
    whole (every pair kept) and those computed through the rule (some pairs kept)."""
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device)
    rule = TokenRule(settings, grid, device)
    n, bs = rule.tokens, settings.block_size
    nb = -(-n // bs)
    some, every = _block_lists(settings, rule.grid, device)
    full, partial = some & every, some & ~every
    sizes = torch.full((nb,), bs, device=device, dtype=torch.float64)
    sizes[-1] = n - (nb - 1) * bs
    computed = float((sizes[:, None] * sizes[None, :] * some).sum()) / (n * n)

    def ordered(m: Tensor) -> tuple[Tensor, Tensor]:
        counts = m.sum(-1, dtype=torch.int32)
        order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None].contiguous(), order[None, None].contiguous()

    density, rule_grid = kept_pairs(settings, rule.grid) / (n * n), rule.grid
    if settings.granularity == "block":  # every computed block whole: the kernel evaluates no rule
        rule, full, partial, density = BlockRule(some, bs), some, torch.zeros_like(some), computed
    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=rule,
                                          seq_lengths=(n, n), compute_q_blocks=False)
    nbytes = rule.nbytes() + sum(t.nbytes for t in (kv_num, kv_idx, full_num, full_idx))
    return GridMask(rule_grid, n, block_mask, rule, nb * nb, int(partial.sum()), int(full.sum()), computed,
                    density, nbytes)


def mask_bytes(settings: SparseSettings, grid: tuple[int, int, int]) -> int:
    """Device bytes one grid's mask holds (tables and block lists), without building it."""
    n = math.prod(grid)
    nb = -(-n // settings.block_size)
    padded = nb * settings.block_size
    if settings.granularity == "block":
        tables = nb * nb
    elif settings.pattern == "radial":
        tables = 2 * 4 * padded + 4 * grid[0] + 1
    else:
        tables = 3 * 4 * padded + 4 * 3
    return tables + 2 * (4 * nb + 4 * nb * nb)


# --- the op --------------------------------------------------------------------------------------

_FLEX: dict[str, Callable] = {}
_FLEX_LOCK = threading.Lock()
_FAILED: list[str] = []  # why flex_attention could not compile here (warned once)


def _compiled_flex() -> Callable:
    # Eager flex_attention materialises every score; only its compiled form skips blocks.
    with _FLEX_LOCK:
        if "flex" not in _FLEX:
            from torch.nn.attention.flex_attention import flex_attention
            _FLEX["flex"] = torch.compile(flex_attention, dynamic=False)
        return _FLEX["flex"]


def _traced(x: Tensor) -> bool:
    if x.is_meta:
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(x, FakeTensor)


@dataclass(eq=False)
class BlockFlag:
    """Set by the blocks' pre-hooks before each block runs: whether it is a dense one."""

    dense: bool = False


@dataclass(eq=False)
class SparseOp:
    """The ``AttentionFn`` for one grid: block-sparse flex attention, or the dense backend for
    the blocks the flag marks dense. One object per (grid, device, backend): a compiled block
    sees the same object every call."""

    mask: GridMask
    backend: str
    flag: BlockFlag = field(default_factory=BlockFlag)
    flex: Callable = field(default_factory=lambda: _compiled_flex())  # got here, outside any compiled region
    planned: str = "cuda"  # under a planner's trace: the device type whose kernel it counts

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if q.shape[1] != self.mask.tokens or k.shape[1] != self.mask.tokens:
            raise ValueError(f"sparse attention was set up for a {'x'.join(map(str, self.mask.grid))} token grid "
                             f"({self.mask.tokens} tokens) and got {q.shape[1]} query / {k.shape[1]} key tokens")
        if self.flag.dense or _FAILED:
            return attention(q, k, v, self.backend)
        if torch.compiler.is_compiling():  # inside a compiled block: flex fuses into its graph
            return self._sparse(q, k, v)
        if _traced(q):
            return _traced_flex(q, self.planned)
        try:
            return self._sparse(q, k, v)
        except torch._dynamo.exc.TorchDynamoException as err:
            _FAILED.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            log.warning("WanFit sparse attention: flex_attention could not be compiled here (%s); attention runs "
                        "dense from now on", _FAILED[0])
            return attention(q, k, v, self.backend)

    def _sparse(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if torch.compiler.is_compiling():
            # Inside a compiled block q, k, v are views of fused buffers, which Inductor's CPU flex
            # template cannot read (torch 2.13); asked for [B, N, L, D] buffers, Inductor writes them so.
            q, k, v = (t.contiguous() for t in (q, k, v))
        return self.flex(q, k, v, block_mask=self.mask.block_mask).transpose(1, 2)


def _traced_flex(q: Tensor, device_type: str = "cuda") -> Tensor:
    """What compiled flex attention allocates, for a planner's trace. On a GPU (Triton): the
    output (laid out as the query, [B, L, N, D]) and a float32 log-sum-exp [B, N, L]. On a CPU
    (Inductor's C++ template, measured with torch 2.13 in tests/test_compile_slow.py): the
    output, per-thread score and accumulator blocks, copies of K and V, and two small buffers
    per 1,024 query tokens, all alive at once."""
    b, n_tok, heads, d = q.shape
    if device_type == "cpu":
        threads = torch.get_num_threads()
        scratch = [torch.empty(threads * 128 * (d + 130), dtype=torch.float32, device=q.device),
                   torch.empty(threads * 128 * 128, dtype=q.dtype, device=q.device),
                   *(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2)),
                   *(torch.empty(16384 * -(-n_tok // 1024), dtype=torch.float32, device=q.device) for _ in range(2))]
    else:
        scratch = [torch.empty(b, heads, n_tok, dtype=torch.float32, device=q.device)]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    del scratch
    return out


_OPS: OrderedDict[tuple, SparseOp] = OrderedDict()
_OPS_LOCK = threading.Lock()


def cached_mask_bytes() -> int:
    """Bytes of the block masks this process keeps, all devices."""
    with _OPS_LOCK:
        return sum({id(o.mask): o.mask.nbytes for o in _OPS.values()}.values())


class SparseAttention:
    """One sparse-attention set-up for a model's jobs: builds and keeps block masks per grid
    and wraps the block stack (see the module docstring)."""

    def __init__(self, settings: SparseSettings, planned: str = "cuda"):
        self.settings, self.planned = settings, planned  # planned: the device type a planner's trace counts
        self.used: dict[tuple, GridMask] = {}  # grids the last job ran sparse, for its report
        self.calls = {"sparse": 0, "dense": 0}

    def mask(self, grid: tuple[int, int, int], device: torch.device | str = "cpu") -> GridMask:
        return self.op(grid, device).mask

    def op(self, grid: tuple[int, int, int], device: torch.device | str, backend: str = "sdpa") -> SparseOp:
        """The op for ``grid`` on ``device``: one object per pattern, grid, device and dense
        backend in this process (kept between jobs, so compiled code sees the same one)."""
        s = self.settings
        pattern = (s.pattern, s.decay, s.sink, s.window, s.block_size, s.granularity)
        key = (pattern, tuple(int(g) for g in grid), str(torch.device(device)), backend)
        with _OPS_LOCK:
            if key in _OPS:
                _OPS.move_to_end(key)
                return _OPS[key]
            same = next((o for k, o in _OPS.items() if k[:3] == key[:3]), None)
            mask = same.mask if same is not None else build_grid_mask(s, key[1], device)
            _OPS[key] = SparseOp(mask, backend)
            while len(_OPS) > MASKS_KEPT:
                _OPS.popitem(last=False)
            return _OPS[key]

    def wrap(self, run_blocks: RunBlocks, blocks: Sequence[nn.Module]) -> RunBlocks:
        """``run_blocks`` with ``state.self_attention`` set to this grid's op on the sparse
        steps; ``blocks`` are the modules the stack runs (their pre-hooks mark dense blocks)."""
        s = self.settings

        def run(state: WanState, call: DiTCall) -> WanState:
            if call.step < s.dense_steps:
                self.calls["dense"] += 1
                return run_blocks(state, call)
            backend = resolve_backend(state.backend, state.context)  # outside any compiled region
            if _traced(state.x):
                op = SparseOp(_traced_mask(s, state.grid), backend, planned=self.planned)
            else:
                op = self.op(state.grid, state.x.device, backend)
                self.used[op.mask.grid] = op.mask
            self.calls["sparse"] += 1
            hooks = [block.register_forward_pre_hook(_marker(op.flag, i < s.dense_blocks))
                     for i, block in enumerate(blocks)]
            previous, state.self_attention = state.self_attention, op
            try:
                return run_blocks(state, call)
            finally:
                state.self_attention = previous
                for hook in hooks:
                    hook.remove()
        return run

    def report(self) -> dict:
        """What the last jobs ran: settings, calls sparse and dense, each grid's fractions."""
        return {"settings": self.settings.describe(), "calls": dict(self.calls),
                "grids": [{"grid": list(m.grid), "tokens": m.tokens, "keep_fraction": m.keep_fraction,
                           "density": m.density, "line": m.describe()} for m in self.used.values()]}


def _marker(flag: BlockFlag, dense: bool):
    def hook(module, args):
        flag.dense = dense
    return hook


def _traced_mask(settings: SparseSettings, grid: tuple[int, int, int]) -> GridMask:
    """A stand-in for tracing: the token count is all the op checks."""
    n = math.prod(grid)
    return GridMask(tuple(grid), n, None, None, 0, 0, 0, 1.0, 1.0, mask_bytes(settings, grid))  # type: ignore[arg-type]
