"""The memory engine: a DiT loaded per plan (resident head, swapped tail) runs like a resident one."""
import gc

import pytest
import torch

import factory
from wanfit.optim.engine import SwapSettings, prepare_dit
from wanfit.optim.offload import RecordingBackend, state_tensors
from wanfit.wan.checkpoint import open_checkpoint
from wanfit.wan.denoise import Conditioning, make_denoiser

FILE = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return open_checkpoint(factory.write_models(tmp_path_factory.mktemp("m"), [FILE])[FILE])


def _step(prepared):
    gen = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=gen), torch.randn(1, 20, 3, 4, 4, generator=gen))
    neg = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=gen), cond.y)
    denoise = make_denoiser(prepared.model, cond, neg, 3.5, run_blocks=prepared.run_blocks)
    with torch.inference_mode():
        return denoise(torch.randn(1, 16, 3, 4, 4, generator=gen), 0.9, 0)


@pytest.mark.parametrize("swap,prefetch,embeddings", [(1, 1, False), (2, 0, True), (2, 2, False)])
def test_swapped_equals_resident(ckpt, swap, prefetch, embeddings):
    resident = prepare_dit(ckpt, "cpu", dtype=torch.float32)
    expected = _step(resident)
    backend = RecordingBackend(lazy=True)
    prepared = prepare_dit(ckpt, backend, SwapSettings(swap, prefetch, True, embeddings), dtype=torch.float32)
    assert prepared.resident == 2 - swap
    out = _step(prepared)
    assert torch.equal(out, expected)
    stats = prepared.swap_stats()
    # cond and uncond run batched: one pass through the blocks, each swapped block moved once
    assert stats.swapped == swap and stats.forwards == 1 and stats.transfers == swap
    prepared.close()
    gc.collect()
    assert backend.live_device_buffers() == 0 and backend.pinned_bytes() == 0


def test_too_many_blocks_to_swap(ckpt):
    with pytest.raises(ValueError, match="blocks_to_swap=5: this model has 2 blocks"):
        prepare_dit(ckpt, "cpu", SwapSettings(blocks_to_swap=5))


def test_first_swapped_copy_overlaps_the_resident_blocks(ckpt):
    """The copy of the first swapped block is issued before the resident head computes, so it
    flies while that head runs; the resident block is never copied by the swapper."""
    backend = RecordingBackend(lazy=True)
    prepared = prepare_dit(ckpt, backend, SwapSettings(blocks_to_swap=1), dtype=torch.float32)
    for i, block in enumerate(prepared.model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: backend.log.append(("run", i)))
    start = len(backend.log)
    _step(prepared)
    events = [e[:2] for e in backend.log[start:] if e[0] in ("h2d", "run")]
    assert events == [("h2d", 1), ("run", 0), ("run", 1)]
    stats = prepared.swap_stats()
    assert (stats.resident, stats.swapped, stats.transfers) == (1, 1, 1)
    head = sum(t.nbytes for t in state_tensors(prepared.model.blocks[0]))
    assert stats.device_bytes == head + stats.block_bytes
    prepared.close()
