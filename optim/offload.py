"""Block swap: run a stack of identical transformer blocks on a device too small to hold them.

The first ``resident`` blocks live on the device for good. The rest ("swapped") live on the
host and pass through a fixed ring of ``prefetch + 1`` device slots, one flat byte buffer each,
allocated once and reused across blocks and steps so device memory never fragments. While
block k computes, the next ``prefetch`` blocks are copied into their slots on a side stream.

Why the FIRST blocks stay resident: a forward starts by issuing the copies of the first
swapped blocks, and those copies then overlap the resident head's compute. With the
resident blocks at the tail instead, the first copy of every forward would have nothing to
hide behind unless it were issued during the previous forward, which would keep slots
occupied between calls and across Cancel.

Parameters are swapped by assigning ``tensor.data`` to a view into the slot and back to its
host tensor afterwards. That keeps the same Parameter objects (hooks, LoRA patches, state
dicts and anything else holding a reference see the same tensors) and costs one cheap
Python assignment per tensor, while ``torch.func.functional_call`` would rebuild the module's
parameter dict on every call and could not serve blocks that keep references to their
weights. Inference only: autograd does not follow ``.data`` assignments.

Events make the schedule race-free: the compute stream waits for exactly its block's copy
(``loaded[slot]``), and a copy into a slot waits for the compute that last read the slot
(``freed[slot]``). The same scheduling code runs against :class:`CudaBackend` and against
:class:`RecordingBackend`, a CPU stand-in that logs every transfer and can run its "copy
stream" eagerly or lazily so tests catch a missing event either way.
"""
from __future__ import annotations

import mmap
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor, nn

_ALIGN = 256  # bytes; every view starts aligned for vectorised kernels and fp8 matmul (16 B)


def state_tensors(module: nn.Module) -> list[Tensor]:
    """Parameters then buffers, each once: what must be on the device for ``forward``."""
    return [*module.parameters(), *module.buffers()]


class BlockLayout:
    """Byte offsets of a block's tensors packed into one flat uint8 buffer."""

    def __init__(self, tensors: Sequence[Tensor]):
        self.meta = [(t.shape, t.dtype) for t in tensors]
        self.offsets, n = [], 0
        for t in tensors:
            self.offsets.append(n)
            n += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.nbytes = n

    def views(self, flat: Tensor) -> list[Tensor]:
        """Typed views of ``flat``, one per tensor of the block."""
        return [flat[o:o + shape.numel() * dtype.itemsize].view(dtype).view(shape)
                for o, (shape, dtype) in zip(self.offsets, self.meta)]


class Backend(Protocol):
    """What the scheduler needs from a device; events are opaque to it.

    ``empty``: a device byte buffer. ``pinned``: a page-locked host byte buffer, or None when
    the host cannot lock more. ``to_device`` / ``to_host``: a copy on the compute stream /
    a synchronous copy back. ``h2d``: enqueue a copy on the copy stream (``tag``: block
    index, for logs). ``record_*``: mark the current point of the copy / compute stream.
    ``copy_waits`` / ``compute_waits``: that stream waits for an event; ``host_waits``: the
    Python thread does. ``waited_s``: seconds the compute stream has stood waiting.
    """

    device: torch.device

    def empty(self, nbytes: int) -> Tensor: ...
    def pinned(self, nbytes: int) -> Tensor | None: ...
    def to_device(self, t: Tensor) -> Tensor: ...
    def to_host(self, t: Tensor) -> Tensor: ...
    def h2d(self, dst: Tensor, src: Tensor, tag: int) -> None: ...
    def event(self) -> Any: ...
    def record_copy(self, ev: Any) -> None: ...
    def record_compute(self, ev: Any) -> None: ...
    def copy_waits(self, ev: Any) -> None: ...
    def compute_waits(self, ev: Any) -> None: ...
    def host_waits(self, ev: Any) -> None: ...
    def synchronize(self) -> None: ...
    def waited_s(self) -> float: ...


class CudaBackend:
    """A CUDA device: copies on one side stream, compute on the caller's current stream.

    Pinned host memory comes from ``cudaHostRegister`` on an anonymous mapping, not from
    torch's pinned allocator, which rounds every request up to a power of two (a 0.7 GB
    block would pin 1 GB) and keeps freed pinned memory cached instead of returning it.
    """

    def __init__(self, device: torch.device | str = "cuda"):
        device = torch.device(device)
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                                   else device.index)
        self._copy = torch.cuda.Stream(self.device)
        self._timed: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._waited = 0.0

    def empty(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def pinned(self, nbytes: int) -> Tensor | None:
        # An anonymous mapping of its own: page-aligned, so no page is shared with another
        # registered buffer (CUDA refuses to register a page twice), and unmapped when freed.
        host = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(host.data_ptr(), nbytes, 1)) != 0:  # 1: portable
            # The failed call leaves a pending CUDA error that torch would report at the next
            # kernel launch; a throwaway launch collects it here instead.
            try:
                torch.zeros(1, device=self.device).add_(1)
            except RuntimeError:
                pass
            return None
        weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
        return host

    def to_device(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)

    def to_host(self, t: Tensor) -> Tensor:
        return t.to("cpu")

    def h2d(self, dst: Tensor, src: Tensor, tag: int) -> None:
        with torch.cuda.stream(self._copy):
            dst.copy_(src, non_blocking=True)

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def record_copy(self, ev: torch.cuda.Event) -> None:
        ev.record(self._copy)

    def record_compute(self, ev: torch.cuda.Event) -> None:
        ev.record(torch.cuda.current_stream(self.device))

    def copy_waits(self, ev: torch.cuda.Event) -> None:
        self._copy.wait_event(ev)

    def compute_waits(self, ev: torch.cuda.Event) -> None:
        # Timing events either side of the wait measure how long the compute stream stalled.
        stream = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(ev)
        after.record(stream)
        self._timed.append((before, after))
        self._collect(block=False)

    def host_waits(self, ev: torch.cuda.Event) -> None:
        ev.synchronize()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def waited_s(self) -> float:
        self._collect(block=True)
        return self._waited

    def _collect(self, block: bool) -> None:
        while self._timed and (block or self._timed[0][1].query()):
            before, after = self._timed.popleft()
            after.synchronize()
            self._waited += before.elapsed_time(after) / 1e3


class _FakeEvent:
    def __init__(self, ident: int):
        self.id, self.pos = ident, 0


class RecordingBackend:
    """CPU stand-in for a device: "device" tensors are separate CPU tensors, every call is logged.

    ``lazy=False`` runs a copy the moment it is issued, a copy stream that is never behind:
    a copy issued into a slot a block still needs corrupts the output. ``lazy=True`` runs a
    copy only when something waits for it, a copy stream as far behind as the events allow:
    a missing wait lets a block compute on stale slot contents. Compute is synchronous, so
    compute events are complete when recorded. ``pin_limit`` (bytes) makes ``pinned`` fail
    beyond it, as ``cudaHostRegister`` does when the host runs out of lockable memory.
    """

    def __init__(self, lazy: bool = False, pin_limit: int | None = None):
        self.device = torch.device("cpu")
        self.lazy, self.pin_limit = lazy, pin_limit
        self.log: list[tuple] = []
        # Weak references only: tests check that closing frees every buffer.
        self._device: list[tuple[weakref.ref, int, int]] = []  # (storage, ptr, nbytes)
        self._pinned: list[tuple[weakref.ref, int]] = []
        self._queue: deque[tuple[Tensor, Tensor]] = deque()
        self._issued = self._events = 0

    def _track(self, t: Tensor) -> Tensor:
        self._device.append((weakref.ref(t.untyped_storage()), t.data_ptr(), t.nbytes))
        return t

    def empty(self, nbytes: int) -> Tensor:
        self.log.append(("alloc", nbytes))
        return self._track(torch.full((nbytes,), 0xFF, dtype=torch.uint8))

    def pinned(self, nbytes: int) -> Tensor | None:
        if self.pin_limit is not None and self.pinned_bytes() + nbytes > self.pin_limit:
            return None
        t = torch.empty(nbytes, dtype=torch.uint8)
        self._pinned.append((weakref.ref(t.untyped_storage()), nbytes))
        return t

    def to_device(self, t: Tensor) -> Tensor:
        self.log.append(("to_device", t.nbytes))
        return self._track(t.clone())

    def to_host(self, t: Tensor) -> Tensor:
        return t.clone()

    def h2d(self, dst: Tensor, src: Tensor, tag: int) -> None:
        self.log.append(("h2d", tag, src.nbytes, self.buffer_index(dst)))
        self._issued += 1
        if self.lazy:
            self._queue.append((dst, src))
        else:
            dst.copy_(src)

    def event(self) -> _FakeEvent:
        self._events += 1
        return _FakeEvent(self._events)

    def record_copy(self, ev: _FakeEvent) -> None:
        ev.pos = self._issued
        self.log.append(("record_copy", ev.id))

    def record_compute(self, ev: _FakeEvent) -> None:
        self.log.append(("record_compute", ev.id))

    def copy_waits(self, ev: _FakeEvent) -> None:
        self.log.append(("copy_waits", ev.id))

    def compute_waits(self, ev: _FakeEvent) -> None:
        self.log.append(("compute_waits", ev.id))
        self._run_until(ev.pos)

    def host_waits(self, ev: _FakeEvent) -> None:
        self.log.append(("host_waits", ev.id))
        self._run_until(ev.pos)

    def synchronize(self) -> None:
        self._run_until(self._issued)

    def waited_s(self) -> float:
        return 0.0

    def _run_until(self, pos: int) -> None:
        while self._queue and self._issued - len(self._queue) < pos:
            dst, src = self._queue.popleft()
            dst.copy_(src)

    def pending_copies(self) -> int:
        """Copies issued but not yet run."""
        return len(self._queue)

    def buffer_index(self, t: Tensor) -> int | None:
        """Index (in allocation order) of the live device buffer holding ``t``'s data, if any."""
        ptr = t.data_ptr()
        for i, (ref, start, nbytes) in enumerate(self._device):
            if ref() is not None and start <= ptr < start + max(nbytes, 1):
                return i
        return None

    def live_device_buffers(self) -> int:
        return sum(ref() is not None for ref, _, _ in self._device)

    def pinned_bytes(self) -> int:
        """Bytes of pinned host memory still alive."""
        return sum(n for ref, n in self._pinned if ref() is not None)


def _backend(device: torch.device | str | Backend) -> Backend:
    if isinstance(device, (str, torch.device)):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"block swap needs a CUDA device or a backend, got {device}")
        return CudaBackend(device)
    return device


@dataclass
class SwapStats:
    """What a :class:`BlockSwapper` holds and has done (counters are cumulative)."""

    resident: int = 0        # blocks kept on the device
    swapped: int = 0         # blocks streamed from the host every forward
    slots: int = 0           # device slots for swapped blocks (prefetch + 1, at most swapped)
    block_bytes: int = 0     # one swapped block packed flat, each tensor aligned to 256 bytes
    pinned_blocks: int = 0   # swapped blocks held in pinned host memory
    staged: bool = False     # unpinned blocks pass through pinned staging buffers (one per slot)
    device_bytes: int = 0    # resident blocks + slots
    pinned_bytes: int = 0    # pinned blocks + staging buffers
    forwards: int = 0
    transfers: int = 0       # block loads host -> device (each resident block's first load counts)
    h2d_bytes: int = 0
    wait_s: float = 0.0      # compute stream stalled waiting for a copy (CUDA events; 0 on CPU)
    peak_slots: int = 0      # most slots holding a loaded or loading block at once


class BlockSwapper:
    """Run ``blocks`` in order on a device, keeping only some of them there.

    ``blocks`` must share one layout (names, shapes, dtypes of parameters and buffers) from
    index ``resident`` on, as the blocks of a Wan DiT do. ``device`` is a CUDA device or a
    :class:`Backend`. Swapped blocks are packed into pinned host memory while
    ``pin_budget`` (bytes; None = no limit) allows and pinning succeeds; the rest stay in
    pageable memory and, if pinning is on, pass through one pinned staging buffer per slot
    (reserved first out of a budget too small for all blocks; taken from the last pinned
    blocks when pinning itself fails). Without any pinned memory they are copied straight
    from pageable memory, which is correct but does not overlap compute.

    Use as a context manager or call :meth:`close`: it returns every block to ordinary host
    memory and frees the pinned memory and device buffers. While open, do not move the
    blocks with ``.to()`` or replace their Parameter objects (``FP8Linear.set_weight``);
    in-place edits of their weights are picked up at the next load of a swapped block and
    act directly on the device copy of a resident one.

    ``resident_placed=True`` says the caller has already put the resident blocks on the
    device (the engine streams them there from the file, so they never pass through host
    RAM): the swapper runs them as they are, never copies them and leaves them there on
    :meth:`close`. It still runs them, so the first swapped blocks' copies overlap them.
    """

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str | Backend,
                 resident: int, prefetch: int = 1, pin_memory: bool = True,
                 pin_budget: int | None = None, resident_placed: bool = False):
        if not 0 <= resident <= len(blocks) or prefetch < 0:
            raise ValueError(f"resident={resident}, prefetch={prefetch} for {len(blocks)} blocks")
        self.backend = b = _backend(device)
        self.blocks = list(blocks)
        self._resident, self._swapped = self.blocks[:resident], self.blocks[resident:]
        self._tensors = [state_tensors(m) for m in self.blocks]
        m = len(self._swapped)
        self.slots = min(prefetch + 1, m)
        self.stats = SwapStats(resident=resident, swapped=m, slots=self.slots)
        self._placed = resident_placed
        self._resident_buffers = [] if resident_placed else [self._place_resident(i)
                                                             for i in range(resident)]
        b.synchronize()

        self._layout = BlockLayout(self._tensors[resident]) if m else BlockLayout([])
        for i in range(resident + 1, len(self.blocks)):
            if BlockLayout(self._tensors[i]).meta != self._layout.meta:
                raise ValueError(f"block {i} differs in layout from block {resident}")
        nbytes = self._layout.nbytes
        self._host = [list(self._tensors[i]) for i in range(resident, len(blocks))]
        self._pinned: list[Tensor] = []  # pinned flats of the first len(_pinned) swapped blocks
        self._staging: list[Tensor] = []
        if pin_memory:
            fits = pin_budget is None or m * nbytes <= pin_budget
            if not fits:  # staging buffers come out of the budget first
                self._staging = self._alloc_staging(nbytes)
                pin_budget -= len(self._staging) * nbytes
            while len(self._pinned) < m:
                if not fits and (len(self._pinned) + 1) * nbytes > pin_budget:
                    break
                flat = b.pinned(nbytes)
                if flat is None:
                    break
                self._pin(len(self._pinned), flat)
            if len(self._pinned) < m and not self._staging:
                # Pinning failed before the budget ran out: the host's lockable memory is
                # spent, so give the last pinned blocks' share to the staging buffers.
                for _ in range(min(self.slots, len(self._pinned))):
                    self._unpin(len(self._pinned) - 1)
                self._staging = self._alloc_staging(nbytes)
        for k, host in enumerate(self._host[len(self._pinned):], len(self._pinned)):
            self._host[k] = [h.detach().to("cpu") for h in host]
            for t, h in zip(self._tensors[resident + k], self._host[k]):
                t.data = h
        self._staging_views = [self._layout.views(x) for x in self._staging]
        self._slot_buffers = [b.empty(nbytes) for _ in range(self.slots)]
        self._slot_views = [self._layout.views(x) for x in self._slot_buffers]
        self._loaded = [b.event() for _ in range(self.slots)]
        self._freed = [b.event() for _ in range(self.slots)]

        self.stats.block_bytes = nbytes
        self.stats.pinned_blocks = len(self._pinned)
        self.stats.staged = bool(self._staging)
        self.stats.pinned_bytes = (len(self._pinned) + len(self._staging)) * nbytes
        resident_bytes = (sum(t.nbytes for i in range(resident) for t in self._tensors[i]) if resident_placed
                          else sum(x.nbytes for x in self._resident_buffers))
        self.stats.device_bytes = resident_bytes + self.slots * nbytes
        self._closed = False

    def _place_resident(self, i: int) -> Tensor:
        """Copy block ``i`` into a device buffer of its own, for good."""
        layout = BlockLayout(self._tensors[i])
        buf = self.backend.empty(layout.nbytes)
        for t, v in zip(self._tensors[i], layout.views(buf)):
            self.backend.h2d(v, t.detach(), i)
            t.data = v
        self._count(layout.nbytes)
        return buf

    def _pin(self, k: int, flat: Tensor) -> None:
        """Pack swapped block ``k`` into the pinned ``flat``; its tensors become views of it."""
        self._host[k] = self._layout.views(flat)
        for t, h in zip(self._tensors[len(self._resident) + k], self._host[k]):
            h.copy_(t.detach())
            t.data = h
        self._pinned.append(flat)

    def _unpin(self, k: int) -> None:
        """Move the last pinned block ``k`` back to pageable memory and free its pinned flat."""
        tensors = self._tensors[len(self._resident) + k]
        for t in tensors:
            t.data = t.data.clone()
        self._host[k] = list(tensors)
        self._pinned.pop()

    def _alloc_staging(self, nbytes: int) -> list[Tensor]:
        bufs = [self.backend.pinned(nbytes) for _ in range(self.slots)]
        return bufs if all(x is not None for x in bufs) else []

    def _count(self, nbytes: int) -> None:
        self.stats.transfers += 1
        self.stats.h2d_bytes += nbytes

    def _load(self, k: int) -> None:
        """Issue the copy of swapped block ``k`` into its slot, after the slot's last reader."""
        b, s = self.backend, k % self.slots
        tag = len(self._resident) + k
        b.copy_waits(self._freed[s])
        if k < len(self._pinned):
            b.h2d(self._slot_buffers[s], self._pinned[k], tag)
        elif self._staging:
            b.host_waits(self._loaded[s])  # the staging buffer's previous copy has been read
            for v, h in zip(self._staging_views[s], self._host[k]):
                v.copy_(h)
            b.h2d(self._slot_buffers[s], self._staging[s], tag)
        else:
            for v, h in zip(self._slot_views[s], self._host[k]):
                b.h2d(v, h, tag)
        b.record_copy(self._loaded[s])
        self._count(self._layout.nbytes)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``x = block(x, **kwargs)`` for every block in order; returns the final ``x``.

        On an exception (a failing block, ComfyUI's Cancel) every block is back on its host
        tensors and no copy is in flight when it propagates, so the next call starts clean.
        """
        held = [x]
        del x
        self._run(held, kwargs)
        return held[0]

    def run_blocks(self, state: Any) -> Any:
        """Run the blocks on a model state (``wan.model.WanState``): ``state.x`` through every
        block with ``state.block_kwargs``; returns ``state``. Only ``state`` holds the tokens,
        so each block's input is freed as its output replaces it (a caller's local would
        keep the embedding output alive through the whole stack: 2·B·L·dim bytes)."""
        held, state.x = [state.x], None
        self._run(held, state.block_kwargs)
        state.x = held[0]
        return state

    def _run(self, held: list[Tensor], kwargs: dict) -> None:
        """The schedule; ``held[0]`` is the running activation, replaced block by block."""
        if self._closed:
            raise RuntimeError("BlockSwapper is closed")
        b, n_slots, m = self.backend, self.slots, len(self._swapped)
        try:
            for k in range(n_slots):  # these copies overlap the resident blocks' compute
                self._load(k)
            issued = n_slots
            self.stats.peak_slots = max(self.stats.peak_slots, issued)
            for block in self._resident:
                held[0] = block(held[0], **kwargs)
            for k, block in enumerate(self._swapped):
                s = k % n_slots
                b.compute_waits(self._loaded[s])
                tensors = self._tensors[len(self._resident) + k]
                for t, v in zip(tensors, self._slot_views[s]):
                    t.data = v
                try:
                    held[0] = block(held[0], **kwargs)
                finally:
                    for t, h in zip(tensors, self._host[k]):
                        t.data = h
                b.record_compute(self._freed[s])
                if issued < m:
                    self._load(issued)
                    issued += 1
                    self.stats.peak_slots = max(self.stats.peak_slots, issued - k - 1)
        except BaseException:
            b.synchronize()  # no copy or kernel may still touch a slot the next call reuses
            raise
        self.stats.forwards += 1

    def telemetry(self) -> SwapStats:
        """Current :class:`SwapStats`, with the compute-wait time collected from the device."""
        self.stats.wait_s = self.backend.waited_s()
        return self.stats

    def close(self) -> None:
        """Return all blocks to pageable host memory; free pinned memory and device buffers."""
        if self._closed:
            return
        self._closed = True
        b = self.backend
        b.synchronize()
        for i in range(0 if self._placed else len(self._resident)):
            for t in self._tensors[i]:
                t.data = b.to_host(t.data)
        while self._pinned:
            self._unpin(len(self._pinned) - 1)
        self._resident_buffers, self._host, self._staging, self._staging_views = [], [], [], []
        self._slot_buffers, self._slot_views, self._loaded, self._freed = [], [], [], []

    def __enter__(self) -> BlockSwapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OnCallOffload:
    """Keep a module (a text or image embedding) on the host; put it on the device per call.

    Its parameters and buffers are packed into one pinned host buffer (when ``pin_memory``
    and pinning succeeds); a forward pre-hook copies them to the device on the current
    stream and a forward hook, run even when the call raises, points them back at the host
    copy, so the device copy is freed as soon as the call returns. :meth:`remove` undoes it.
    """

    def __init__(self, module: nn.Module, device: torch.device | str | Backend,
                 pin_memory: bool = True):
        self.backend = _backend(device)
        self._tensors = state_tensors(module)
        layout = BlockLayout(self._tensors)
        self._pinned = self.backend.pinned(layout.nbytes) if pin_memory else None
        if self._pinned is None:
            self._host = [t.detach().to("cpu") for t in self._tensors]
        else:
            self._host = layout.views(self._pinned)
            for h, t in zip(self._host, self._tensors):
                h.copy_(t.detach())
        for t, h in zip(self._tensors, self._host):
            t.data = h
        self._hooks = [module.register_forward_pre_hook(self._to_device),
                       module.register_forward_hook(self._to_host, always_call=True)]

    def _to_device(self, module: nn.Module, args: Any) -> None:
        for t, h in zip(self._tensors, self._host):
            t.data = self.backend.to_device(h)

    def _to_host(self, module: nn.Module, args: Any, output: Any) -> None:
        for t, h in zip(self._tensors, self._host):
            t.data = h

    def remove(self) -> None:
        """Remove the hooks and leave the module in pageable host memory."""
        for hook in self._hooks:
            hook.remove()
        if self._pinned is not None:
            for t in self._tensors:
                t.data = t.data.clone()
        self._hooks, self._pinned, self._host = [], None, []


def offload_on_call(module: nn.Module, device: torch.device | str | Backend,
                    pin_memory: bool = True) -> OnCallOffload:
    """Keep ``module`` on the host and move it to ``device`` only for each call."""
    return OnCallOffload(module, device, pin_memory)
