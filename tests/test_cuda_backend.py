"""CudaBackend's own code on a machine without CUDA: torch.cuda's streams, events and cudart
are replaced by recording fakes and "device" tensors are CPU tensors.

This cannot show copies overlapping compute (the ``gpu`` tests and bench/prefetch.py do); it
runs every line of the backend that a first GPU user would otherwise be the first to run:
page-locking through cudaHostRegister and its failure path, unregistering when a buffer
dies, copies issued on the side stream, the compute stream waiting for exactly its block's
copy, and the wait time collected from timing events.
"""
from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from wanfit.optim.offload import BlockSwapper, CudaBackend

from test_offload import N_BLOCKS, X, make_blocks, reference

WAIT_MS = 2.0  # what every fake timing pair reports


class FakeStream:
    def __init__(self, name: str):
        self.name, self.waited_for = name, []

    def wait_event(self, event):
        self.waited_for.append(event)


class FakeEvent:
    def __init__(self, enable_timing: bool = False):
        self.timing, self.stream = enable_timing, None

    def record(self, stream):
        self.stream = stream

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        assert self.timing and end.timing, "elapsed_time needs timing events at both ends"
        return WAIT_MS


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister with their return codes; fails after ``limit`` bytes."""

    def __init__(self, limit: int | None = None):
        self.limit, self.registered = limit, {}

    def cudaHostRegister(self, ptr, size, flags):
        assert flags == 1 and ptr % 4096 == 0, "portable flag, page-aligned memory"
        if self.limit is not None and sum(self.registered.values()) + size > self.limit:
            return 2  # cudaErrorMemoryAllocation
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        del self.registered[ptr]
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    """A fake torch.cuda; ``state["current"]`` is the stream work is issued on right now."""
    compute = FakeStream("compute")
    state = {"compute": compute, "current": compute, "cudart": FakeCudart(), "copies": []}

    @contextlib.contextmanager
    def stream(s):
        before, state["current"] = state["current"], s
        try:
            yield
        finally:
            state["current"] = before
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("copy"))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: state["cudart"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    real_copy = torch.Tensor.copy_

    def copy_(dst, src, non_blocking=False):  # notes the stream each asynchronous copy is issued on
        if non_blocking:
            state["copies"].append(state["current"].name)
        return real_copy(dst, src, non_blocking=non_blocking)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    return state


def backend(state) -> CudaBackend:
    b = CudaBackend("cuda")
    assert b.device == torch.device("cuda", 0)
    b.device = torch.device("cpu")  # "device" buffers live on the CPU from here on
    return b


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (2, 2)])
def test_swap_through_the_cuda_backend(fake_cuda, resident, prefetch):
    b = backend(fake_cuda)
    swapped = N_BLOCKS - resident
    with BlockSwapper(make_blocks(), b, resident, prefetch) as swapper, torch.inference_mode():
        assert swapper.stats.pinned_blocks == swapped and not swapper.stats.staged
        assert sorted(fake_cuda["cudart"].registered.values()) == [swapper.stats.block_bytes] * swapped
        for shift in (0.0, 0.5):
            assert torch.equal(swapper.forward(X, shift=shift), reference(X, shift))
        # every copy went out on the side stream, never on the compute stream: each resident
        # block's 3 tensors once, then each swapped block (one flat buffer) once per forward
        assert set(fake_cuda["copies"]) == {"copy"} and len(fake_cuda["copies"]) == 3 * resident + 2 * swapped
        # the compute stream waited once per swapped block and forward, on a copy-stream event
        waits = fake_cuda["compute"].waited_for
        assert len(waits) == 2 * swapped and all(ev.stream is b._copy for ev in waits)
        assert swapper.telemetry().wait_s == pytest.approx(2 * swapped * WAIT_MS / 1e3)
    gc.collect()
    assert fake_cuda["cudart"].registered == {}, "pinned memory must be unregistered when freed"


def test_register_failure_falls_back_to_staging(fake_cuda):
    """The host cannot lock memory for every block: the last pinned blocks make way for one
    staging buffer per slot, and the output is still exact."""
    b = backend(fake_cuda)
    nbytes = BlockSwapper(make_blocks(), b, resident=0, prefetch=1).stats.block_bytes
    gc.collect()
    fake_cuda["cudart"] = FakeCudart(limit=3 * nbytes)
    b = backend(fake_cuda)
    with BlockSwapper(make_blocks(), b, resident=0, prefetch=1) as swapper, torch.inference_mode():
        assert swapper.stats.staged and swapper.stats.pinned_blocks == 1  # 3 pinned, 2 given up
        assert torch.equal(swapper.forward(X), reference(X))
    gc.collect()
    assert fake_cuda["cudart"].registered == {}


def test_pinned_buffers_are_page_aligned_and_writable(fake_cuda):
    b = backend(fake_cuda)
    buf = b.pinned(10_000)
    assert buf.dtype == torch.uint8 and buf.numel() == 10_000 and buf.data_ptr() % 4096 == 0
    buf.fill_(7)
    assert int(buf.sum()) == 70_000
    fake_cuda["cudart"].limit = 0
    assert b.pinned(4096) is None  # refused: the caller falls back to pageable memory
    del buf
    gc.collect()
    assert fake_cuda["cudart"].registered == {}
