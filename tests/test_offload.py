"""Block swap: the schedule, checked on CPU through the recording backend, and CUDA overlap.

``RecordingBackend(lazy=False)`` runs each copy the moment it is issued, so a copy issued
into a slot that a block still needs corrupts the output; ``lazy=True`` runs a copy only when
something waits for it, so a missing wait leaves a block computing on stale bytes (device
buffers start as 0xFF, NaN in float). Output equality in both modes is the race check.
"""
from __future__ import annotations

import gc
import types

import pytest
import torch
from torch import nn

from wanfit.optim.offload import BlockSwapper, RecordingBackend, offload_on_call

DIM, N_BLOCKS = 16, 6
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Probe(nn.Module):
    """A small residual block with mixed dtypes and a 0-d buffer; reports each run."""

    def __init__(self, index: int, trace=None):
        super().__init__()
        g = torch.Generator().manual_seed(index)
        self.weight = nn.Parameter(torch.randn(DIM, DIM, generator=g) / DIM ** 0.5)
        self.bias = nn.Parameter(torch.randn(DIM, generator=g).to(torch.bfloat16))
        self.register_buffer("gain", torch.tensor(0.5 + index / 10, dtype=torch.float64))
        self.index, self.trace = index, trace
        self.fail = False

    def forward(self, x, shift=0.0):
        if self.trace:
            self.trace(self)
        if self.fail:
            raise RuntimeError("cancelled")
        return x + torch.tanh(x @ self.weight + self.bias.float() + shift) * self.gain.float()


def make_blocks(trace=None) -> nn.ModuleList:
    return nn.ModuleList(Probe(i, trace) for i in range(N_BLOCKS))


def run_plain(blocks, x, shift=0.0):
    with torch.no_grad():
        for block in blocks:
            x = block(x, shift=shift)
    return x


def reference(x, shift=0.0):
    return run_plain(make_blocks(), x, shift)


def traced(backend: RecordingBackend) -> nn.ModuleList:
    """Blocks that log ("run", index, device buffer of their weight, live device buffers)."""
    def trace(block):
        backend.log.append(("run", block.index, backend.buffer_index(block.weight),
                            backend.live_device_buffers()))
    return make_blocks(trace)


def block_bytes() -> int:
    with BlockSwapper(make_blocks(), RecordingBackend(), resident=0) as swapper:
        return swapper.stats.block_bytes


X = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("resident,prefetch", [(0, 0), (0, 1), (0, 2), (2, 1), (3, 3),
                                                (4, 4), (N_BLOCKS, 1)])
def test_output_identical_to_resident(resident, prefetch, lazy):
    swapper = BlockSwapper(make_blocks(), RecordingBackend(lazy=lazy), resident, prefetch)
    with swapper, torch.inference_mode():
        for shift in (0.0, 0.25):  # the second forward reuses slots filled by the first
            assert torch.equal(swapper.forward(X, shift=shift), reference(X, shift))
    assert swapper.stats.forwards == 2
    assert swapper.stats.peak_slots == min(prefetch + 1, N_BLOCKS - resident)


@pytest.mark.parametrize("lazy", [False, True])
def test_schedule(lazy):
    backend = RecordingBackend(lazy=lazy)
    resident, prefetch = 2, 1
    swapper = BlockSwapper(traced(backend), backend, resident, prefetch)
    start = len(backend.log)
    for _ in range(3):
        swapper.forward(X)
    log = backend.log[start:]
    slots = prefetch + 1

    assert not any(e[0] == "alloc" for e in log), "no device allocation during forwards"
    assert backend.live_device_buffers() == resident + slots
    runs = [e for e in log if e[0] == "run"]
    assert [e[1] for e in runs] == list(range(N_BLOCKS)) * 3
    assert all(e[3] == resident + slots for e in runs), "never more blocks on the device"
    assert {e[2] for e in runs if e[1] < resident} == set(range(resident))
    assert {e[2] for e in runs if e[1] >= resident} == {resident, resident + 1}

    # Each swapped block is copied exactly once per forward, in order, into the slot it runs in.
    copies = [e for e in log if e[0] == "h2d"]
    assert [e[1] for e in copies] == list(range(resident, N_BLOCKS)) * 3
    assert all(e[2] == swapper.stats.block_bytes for e in copies)
    slot_of = {(e[1], i // (N_BLOCKS - resident)): e[3] for i, e in enumerate(copies)}
    assert all(e[2] == slot_of[e[1], i // N_BLOCKS] for i, e in enumerate(runs)
               if e[1] >= resident)

    # Events: a block waits for its own copy; a copy into a slot waits for the slot's last run.
    recorded_at = {}
    last_run_on = {}
    for pos, e in enumerate(log):
        if e[0] in ("record_copy", "record_compute"):
            recorded_at[e[1]] = pos
        elif e[0] == "run" and e[1] >= resident:
            wait = next(w for w in reversed(log[:pos]) if w[0] == "compute_waits")
            copied = max(p for p, c in enumerate(log[:pos]) if c[0] == "h2d" and c[1] == e[1])
            assert recorded_at[wait[1]] > copied, f"block {e[1]} ran without waiting for its copy"
            last_run_on[e[2]] = pos
        elif e[0] == "h2d" and e[3] in last_run_on:
            wait = next(w for w in reversed(log[:pos]) if w[0] == "copy_waits")
            assert recorded_at[wait[1]] > last_run_on[e[3]], "copy raced the slot's last reader"

    stats = swapper.telemetry()
    resident_bytes = stats.device_bytes - slots * stats.block_bytes
    assert stats.transfers == resident + 3 * (N_BLOCKS - resident)
    assert stats.h2d_bytes == resident_bytes + 3 * (N_BLOCKS - resident) * stats.block_bytes
    assert stats.peak_slots == slots and stats.wait_s == 0.0
    swapper.close()


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetch_runs_ahead(prefetch):
    """When block k starts, exactly the copies up to k + prefetch have been issued."""
    backend = RecordingBackend()
    BlockSwapper(traced(backend), backend, resident=0, prefetch=prefetch).forward(X)
    issued = 0
    for e in backend.log:
        if e[0] == "h2d":
            issued = e[1] + 1
        elif e[0] == "run":
            assert issued == min(e[1] + prefetch + 1, N_BLOCKS)


@pytest.mark.parametrize("lazy", [False, True])
def test_cancel_mid_forward_releases_everything(lazy):
    backend = RecordingBackend(lazy=lazy)
    blocks = traced(backend)
    with pytest.raises(RuntimeError, match="cancelled"):
        with BlockSwapper(blocks, backend, resident=1, prefetch=1) as swapper:
            blocks[3].fail = True
            with pytest.raises(RuntimeError, match="cancelled"):
                swapper.forward(X)
            # Mid-forward failure: nothing in flight, every swapped block back on the host.
            assert backend.pending_copies() == 0
            assert all(backend.buffer_index(t) is None
                       for b in blocks[1:] for t in [*b.parameters(), *b.buffers()])
            blocks[3].fail = False
            assert torch.equal(swapper.forward(X), reference(X))  # the same swapper runs again
            blocks[4].fail = True
            swapper.forward(X)  # Cancel escapes the `with`: close() must run
    gc.collect()
    assert backend.live_device_buffers() == 0 and backend.pinned_bytes() == 0
    assert all(backend.buffer_index(t) is None for b in blocks for t in b.parameters())
    with pytest.raises(RuntimeError, match="closed"):
        swapper.forward(X)
    blocks[4].fail = False
    assert torch.equal(run_plain(blocks, X), reference(X))  # weights survived the round trip
    with BlockSwapper(blocks, backend, resident=2, prefetch=2) as again:
        assert torch.equal(again.forward(X), reference(X))


@pytest.mark.parametrize("lazy", [False, True])
def test_pin_budget_falls_back_to_staging(lazy):
    nbytes = block_bytes()
    backend = RecordingBackend(lazy=lazy)
    # 5 swapped blocks, 2 slots: a 3-block budget buys 2 staging buffers and 1 pinned block.
    swapper = BlockSwapper(make_blocks(), backend, resident=1, prefetch=1, pin_budget=3 * nbytes)
    assert (swapper.stats.pinned_blocks, swapper.stats.staged) == (1, True)
    assert backend.pinned_bytes() == swapper.stats.pinned_bytes == 3 * nbytes
    for shift in (0.0, 0.5, 1.0):
        assert torch.equal(swapper.forward(X, shift=shift), reference(X, shift))
    copies = [e for e in backend.log if e[0] == "h2d" and e[1] >= 1]
    assert [e[1] for e in copies] == list(range(1, N_BLOCKS)) * 3  # one flat copy per block
    assert sum(e[0] == "host_waits" for e in backend.log) == 3 * 4  # before each staged copy
    swapper.close()
    gc.collect()
    assert backend.pinned_bytes() == 0


@pytest.mark.parametrize("lazy", [False, True])
def test_pinning_failure_gives_pinned_blocks_to_staging(lazy):
    nbytes = block_bytes()
    backend = RecordingBackend(lazy=lazy, pin_limit=3 * nbytes)  # the host locks 3 blocks, no more
    with BlockSwapper(make_blocks(), backend, resident=0, prefetch=1) as swapper:
        assert (swapper.stats.pinned_blocks, swapper.stats.staged) == (1, True)
        assert backend.pinned_bytes() == 3 * nbytes
        assert torch.equal(swapper.forward(X), reference(X))


@pytest.mark.parametrize("lazy", [False, True])
def test_without_pinned_memory(lazy):
    backend = RecordingBackend(lazy=lazy, pin_limit=0)
    with BlockSwapper(make_blocks(), backend, resident=2, prefetch=1) as swapper:
        assert (swapper.stats.pinned_blocks, swapper.stats.staged) == (0, False)
        assert torch.equal(swapper.forward(X), reference(X))
    backend = RecordingBackend(lazy=lazy)
    with BlockSwapper(make_blocks(), backend, resident=2, prefetch=1, pin_memory=False) as swapper:
        assert torch.equal(swapper.forward(X), reference(X))
    assert backend.pinned_bytes() == 0


def test_layout_mismatch_is_rejected():
    blocks = make_blocks()
    blocks[4].bias = nn.Parameter(torch.zeros(DIM))  # float32 instead of bfloat16
    with pytest.raises(ValueError, match="block 4"):
        BlockSwapper(blocks, RecordingBackend(), resident=1)
    BlockSwapper(blocks[:4], RecordingBackend(), resident=1).close()


def test_offload_on_call():
    backend = RecordingBackend()
    module = nn.Linear(DIM, 8)
    expected = module(X)
    seen = []  # registered first, so it runs before the offload's hook moves weights back
    module.register_forward_hook(lambda m, a, out: seen.append(backend.buffer_index(m.weight)))
    handle = offload_on_call(module, backend)
    assert backend.pinned_bytes() > 0
    assert torch.equal(module(X), expected)
    assert seen[-1] is not None, "weights were on the device during the call"
    assert backend.buffer_index(module.weight) is None and backend.live_device_buffers() == 0

    def boom(m, a, out):
        raise RuntimeError("boom")
    hook = module.register_forward_hook(boom, prepend=True)
    with pytest.raises(RuntimeError, match="boom"):
        module(X)
    hook.remove()
    assert backend.buffer_index(module.weight) is None and backend.live_device_buffers() == 0
    handle.remove()
    gc.collect()
    assert backend.pinned_bytes() == 0 and torch.equal(module(X), expected)
    assert sum(e[0] == "to_device" for e in backend.log) == 2 * 2  # weight and bias, twice


def test_fp8_blocks():
    """fp8 weights, bf16 biases and 0-d float32 scales survive packing into byte buffers."""
    from wanfit.optim.fp8 import FP8Linear

    torch.manual_seed(0)
    blocks = [nn.Sequential(FP8Linear.from_linear(nn.Linear(32, 32)), nn.GELU()) for _ in range(4)]
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    expected = nn.Sequential(*blocks)(x)
    with BlockSwapper(blocks, RecordingBackend(lazy=True), resident=1, prefetch=1) as swapper:
        assert torch.equal(swapper.forward(x), expected)
    assert blocks[2][0].weight.dtype == torch.float8_e4m3fn and torch.equal(
        nn.Sequential(*blocks)(x), expected)


def test_wan_model_with_swapped_blocks():
    """A tiny WanModel: swapped blocks and an offloaded text embedding change no bit."""
    from wanfit.wan.model import WanConfig, WanModel

    cfg = WanConfig("i2v", in_dim=36, dim=32, ffn_dim=64, num_heads=2, num_layers=4, text_dim=24,
                    freq_dim=16, text_len=8)
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(2, 16, 3, 4, 6, generator=g), t=torch.tensor([900.0, 100.0]),
                  context=torch.randn(2, 5, 24, generator=g),
                  y=torch.randn(2, 20, 3, 4, 6, generator=g))
    with torch.inference_mode():
        expected = model(**inputs)
        backend = RecordingBackend(lazy=True)
        text = offload_on_call(model.text_embedding, backend)
        with BlockSwapper(model.blocks, backend, resident=1, prefetch=1) as swapper:
            for _ in range(2):
                state = swapper.run_blocks(model.embed(**inputs))
                assert torch.equal(model.unembed(state), expected)
        text.remove()
    assert sum(e[0] == "h2d" and e[2] == swapper.stats.block_bytes for e in backend.log) == 2 * 3


# --- CUDA --------------------------------------------------------------------------------

class Heavy(nn.Module):
    """A block whose compute (repeated matmuls) outlasts the copy of its weight."""

    def __init__(self, dim: int, reps: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
        self.reps = reps

    def forward(self, x):
        for _ in range(self.reps):
            x = torch.tanh(x @ self.weight)
        return x


@pytest.mark.parametrize("resident,prefetch,pin_budget", [(0, 1, None), (2, 2, None), (0, 1, 0),
                                                          (1, 0, None)])
@pytest.mark.gpu
@needs_cuda
def test_cuda_matches_resident(resident, prefetch, pin_budget):
    x = X.cuda()
    want = make_blocks().cuda()
    with torch.no_grad():
        expected = x
        for block in want:
            expected = block(expected)
        with BlockSwapper(make_blocks(), "cuda", resident, prefetch, pin_budget=pin_budget) as s:
            assert s.stats.staged == (pin_budget == 0)
            for _ in range(2):
                assert torch.equal(s.forward(x), expected)
        lin = nn.Linear(DIM, 8)
        want_lin = lin.cuda()(x)
        offload_on_call(lin.cpu(), "cuda")
        assert torch.equal(lin(x), want_lin) and lin.weight.device.type == "cpu"


@pytest.mark.gpu
@needs_cuda
def test_cuda_prefetch_hides_transfers():
    """With heavy compute, prefetch 1 leaves only the first copy exposed; prefetch 0 all."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(Heavy(8192, reps=12) for _ in range(8)).to(torch.bfloat16)  # 128 MB
    x = torch.randn(4096, 8192, device="cuda", dtype=torch.bfloat16)
    waited = {}
    with torch.no_grad():
        for prefetch in (0, 1):
            with BlockSwapper(blocks, "cuda", resident=0, prefetch=prefetch) as s:
                s.forward(x)  # warm-up
                before = s.telemetry().wait_s
                s.forward(x)
                waited[prefetch] = s.telemetry().wait_s - before
    assert waited[0] > 0
    assert waited[1] < 0.3 * waited[0], waited


def test_run_blocks_frees_each_input():
    """Only the state holds the activation: once a block returns, its input is gone (the
    planner assumes one live input per block, as WanModel.forward has)."""
    import weakref

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))
            self.alive_inputs = []

        def forward(self, x, refs):
            refs.append(weakref.ref(x))
            self.alive_inputs.append(sum(r() is not None for r in refs[:-1]))
            return x * self.w

    blocks = [Probe() for _ in range(4)]
    state = types.SimpleNamespace(x=torch.ones(4), block_kwargs={"refs": []})
    with BlockSwapper(blocks, RecordingBackend(), resident=1, prefetch=1) as swapper, torch.no_grad():
        swapper.run_blocks(state)
    assert [b.alive_inputs[0] for b in blocks] == [0, 0, 0, 0]
