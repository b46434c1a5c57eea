"""Live tensor bytes of a piece of code, op by op in program order, from the code itself.

:class:`LiveBytes` is a ``TorchDispatchMode``: it sees every aten op the code runs, after
Python has decided what to compute, so whatever ``wan/model.py`` (or a step cache, a
context window, a LoRA) does is what gets counted, with no hand-kept mirror to drift. Each
op output that owns a new storage adds that storage's bytes; a storage is freed when its
last reference goes, which the mode notices before the next op runs, so the count follows
the allocator's view of the same program (``hostmem.allocation_peak`` on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU) without being one.

Run over fake tensors (``torch._subclasses.FakeTensorMode``) it predicts a forward of any
size in milliseconds, since no op computes anything; run over real tensors it measures the
same quantity, which is how tests prove the fake trace exact.

What no op output shows (a kernel's scratch space) is added per op by :class:`KernelTerm`
callables, each named, so a plan can say what it assumed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class KernelTerm:
    """Bytes a kernel holds during one op beyond its outputs (0 where it does not apply):
    ``bytes(op, args, kwargs, outputs) -> int``."""

    name: str
    bytes: Callable[[torch._ops.OpOverload, tuple, dict, list[torch.Tensor]], int]


@dataclass(frozen=True)
class Live:
    """One live storage: the op that made it, its first tensor's shape and dtype, its bytes."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class Phase:
    """The peak of one stretch of code (between two ``mark`` calls)."""

    name: str
    start: int  # live bytes when the phase began
    peak: int  # the most live bytes during it, kernel terms included
    outputs_peak: int = 0  # the most live bytes of op outputs alone (no kernel terms)
    at_peak: tuple[Live, ...] = ()  # what was live at that moment (when recorded)
    peak_op: str = ""  # the op during which the peak happened
    terms: dict[str, int] = field(default_factory=dict)  # the kernel terms at the peak


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class LiveBytes(TorchDispatchMode):
    """Count the bytes of storages created while this mode is active and still alive.

    ``mark(name)`` closes the current phase (its peak since the previous mark) and starts the
    next. Storages made before the mode was entered (weights, inputs) are not counted; views
    and in-place or ``out=`` results are not new storages. ``record=True`` keeps, for each
    phase, what was live at its peak (for explanations and tests; it costs a copy per new
    peak).
    """

    def __init__(self, terms: Sequence[KernelTerm] = (), record: bool = False):
        super().__init__()
        self.terms = tuple(terms)
        self.record = record
        self.live = 0
        self.phases: list[Phase] = []
        self._storages: dict[int, tuple[StorageWeakRef, Live]] = {}
        self._phase = Phase("start", 0, 0, 0)

    # -- bookkeeping

    def _collect(self) -> None:
        dead = [key for key, (ref, _) in self._storages.items() if ref.expired()]
        for key in dead:
            self.live -= self._storages.pop(key)[1].nbytes

    def _peak(self, op: str, transient: int, terms: dict[str, int]) -> None:
        phase = self._phase
        phase.outputs_peak = max(phase.outputs_peak, self.live)
        if self.live + transient > phase.peak:
            phase.peak = self.live + transient
            phase.terms, phase.peak_op = terms, op
            if self.record:
                phase.at_peak = tuple(live for _, live in self._storages.values())

    def mark(self, name: str) -> Phase:
        """End the current phase, start one called ``name``; returns the phase that ended."""
        self._collect()
        ended = self._phase
        if ended.name != "start" or ended.peak:
            self.phases.append(ended)
        self._phase = Phase(name, self.live, self.live, self.live)
        return ended

    def finish(self) -> list[Phase]:
        """Close the last phase; every phase in order."""
        self.mark("end")
        return self.phases

    def snapshot(self) -> tuple[Live, ...]:
        self._collect()
        return tuple(live for _, live in self._storages.values())

    # -- the mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._collect()
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        outputs = _tensors(out)
        for t in outputs:
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._storages or storage.nbytes() == 0:
                continue
            self._storages[key] = (StorageWeakRef(storage), Live(str(func), tuple(t.shape), t.dtype, storage.nbytes()))
            self.live += storage.nbytes()
        terms = {}
        for term in self.terms:
            nbytes = term.bytes(func, args, kwargs, outputs)
            if nbytes:
                terms[term.name] = terms.get(term.name, 0) + nbytes
        self._peak(str(func), sum(terms.values()), terms)
        return out


def measured_workspace(ops: Sequence[str], name: str = "CPU kernel scratch (measured)") -> KernelTerm:
    """Scratch space of CPU kernels, measured per op and shape by running the kernel once
    under the allocator profiler (``hostmem.allocation_peak``).

    It depends on the instruction set more than on the model: oneDNN's bf16 matmul keeps
    per-thread blocks of its tiling on AVX512-BF16 (a few hundred KiB) and reorders the weight
    into VNNI layout on AMX; the CPU flash-attention kernel keeps per-thread score buffers;
    an AVX2-only CPU runs bf16 matmuls natively with none. So it is measured where it runs
    rather than modelled. ``ops``: aten op names (``"aten.addmm.default"``) to measure.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .hostmem import allocation_peak

    wanted = frozenset(ops)
    cache: dict[tuple, int] = {}

    def real(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu").zero_()

    def scratch(func, args, kwargs, outputs) -> int:
        if str(func) not in wanted:
            return 0
        flat = tree_flatten((args, kwargs))[0]
        key = (str(func), torch.get_num_threads(),
               *((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in flat))
        if key not in cache:
            with unset_fake_temporarily(), torch.utils._python_dispatch._disable_current_modes():
                real_args, real_kwargs = torch.utils._pytree.tree_map(
                    lambda a: real(a) if isinstance(a, torch.Tensor) else a, (args, kwargs))
                made = []
                peak = allocation_peak(lambda: made.append(func(*real_args, **real_kwargs)))
                inputs = {t.untyped_storage()._cdata for t in _tensors((real_args, real_kwargs))}
                out_bytes = sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                                 for t in _tensors(made) if t.untyped_storage()._cdata not in inputs}.values())
            cache[key] = max(0, peak - out_bytes)
        return cache[key]

    return KernelTerm(name, scratch)
