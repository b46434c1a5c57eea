"""Sparse self-attention (optim/sparse.py): the radial mask against the paper's definition on
grids written out by hand, block lists and keep fractions against brute force, the op's
semantics (any head count, the grid's token count, dense steps and blocks) and the pipeline:
step caches, context windows, fp8 / GGUF / LoRA weights, block swap and the memory planner.

flex_attention runs eagerly here (it evaluates the same rule on every pair, so the semantics are
the compiled kernel's); tests/test_compile_slow.py runs the compiled kernel."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import factory
from wanfit.optim import sparse
from wanfit.optim.engine import SwapSettings, prepare_dit
from wanfit.optim.offload import RecordingBackend
from wanfit.optim.sparse import (SparseAttention, SparseSettings, build_grid_mask, dense_mask, kept_pairs,
                                 radial_reach)
from wanfit.optim.step_cache import MagCache, StepCache
from wanfit.wan.checkpoint import open_checkpoint
from wanfit.wan.denoise import Conditioning, make_denoiser
from wanfit.wan.model import WanConfig, WanModel

pytestmark = pytest.mark.usefixtures("eager_flex", "one_thread")


def _expand(frame_pairs: list[str], per_frame: dict[str, list[str]]) -> torch.Tensor:
    """A token mask from a frame-pair table: each letter names an s x s block written below."""
    rows = []
    for line in frame_pairs:
        blocks = [torch.tensor([[c == "1" for c in r] for r in per_frame[ch]]) for ch in line]
        rows.append(torch.cat(blocks, dim=1))
    return torch.cat(rows, dim=0)


def test_radial_mask_is_the_papers_on_small_grids_written_out():
    # 4 frames of s = 4 tokens (1 x 4), decay 1: frames 0-1 apart attend densely (A); 2 or 3
    # apart (r = 1) keep |k - l| + 1 <= s / 2 = 2, a band of width 3 (B).
    blocks = {"A": ["1111"] * 4, "B": ["1100", "1110", "0111", "0011"]}
    table = ["AABB",
             "AAAB",
             "BAAA",
             "BBAA"]
    want = _expand(table, blocks)
    assert torch.equal(dense_mask(SparseSettings("radial", sink=False, block_size=16), (4, 1, 4)), want)
    # the attention sink: every token also attends to all of frame 0
    sink = ["AABB", "AAAB", "AAAA", "ABAA"]
    assert torch.equal(dense_mask(SparseSettings("radial", sink=True, block_size=16), (4, 1, 4)), _expand(sink, blocks))

    # 6 frames of s = 2 tokens (2 x 1): 2-3 apart w = 1 keeps the diagonal (D); 4-5 apart (r = 2)
    # w = 1/2 < 1: the diagonal on every ceil(4 / 2) = 2nd frame: distance 4 yes (D), 5 no (0).
    blocks = {"A": ["11", "11"], "D": ["10", "01"], "0": ["00", "00"]}
    table = ["AADDD0",
             "AAADDD",
             "DAAADD",
             "DDAAAD",
             "DDDAAA",
             "0DDDAA"]
    plain = SparseSettings("radial", sink=False, block_size=16)
    assert torch.equal(dense_mask(plain, (6, 2, 1)), _expand(table, blocks))
    assert radial_reach(6, 2) == [1, 1, 0, 0, 0, -1]
    # decay scales the window of frames 2+ apart only: s = 8, decay 0.5: w = 2 at d 2-3, 1 at d 4
    assert radial_reach(5, 8, 0.5) == [7, 7, 1, 1, 0]


def test_window_mask_on_a_grid_written_out():
    # 2 frames of 2 x 2 tokens, window (0 frames, 0 rows, 1 column): a token sees its own row
    # of its own frame (both columns).
    own_row = ["1100", "1100", "0011", "0011"]
    want = _expand(["AO", "OA"], {"A": own_row, "O": ["0000"] * 4})
    assert torch.equal(dense_mask(SparseSettings("window", window=(0, 0, 1), block_size=16), (2, 2, 2)), want)


CASES = [SparseSettings("radial", decay=0.3, block_size=16), SparseSettings("radial", sink=False, block_size=16),
         SparseSettings("radial", decay=2.0, block_size=32), SparseSettings("window", window=(1, 1, 2), block_size=16),
         SparseSettings("window", window=(0, 3, 0), block_size=32)]
BLOCKS = [SparseSettings("radial", decay=0.3, block_size=16, granularity="block"),
          SparseSettings("window", window=(1, 1, 2), block_size=16, granularity="block")]
GRIDS = [(7, 3, 5), (9, 4, 11), (3, 17, 2), (12, 2, 3), (2, 1, 40)]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: s.describe())
def test_block_lists_and_fractions_equal_brute_force(settings):
    """The block lists come from interval arithmetic on row pieces; every token pair says the
    same, and the reported fractions are what the pairs and blocks add up to."""
    bs = settings.block_size
    for grid in GRIDS:
        m = dense_mask(settings, grid)
        n = m.shape[0]
        nb = -(-n // bs)
        padded = torch.zeros(nb * bs, nb * bs, dtype=torch.bool)
        padded[:n, :n] = m
        real = torch.zeros_like(padded)
        real[:n, :n] = True
        some = padded.view(nb, bs, nb, bs).any(3).any(1)
        every = (padded | ~real).view(nb, bs, nb, bs).all(3).all(1)
        got = build_grid_mask(settings, grid, "cpu")
        dense = got.block_mask.to_dense()[0, 0].bool()
        assert torch.equal(dense, some), grid
        assert (got.partial, got.full) == (int((some & ~every).sum()), int((some & every).sum())), grid
        assert kept_pairs(settings, grid) == int(m.sum()) and got.density == pytest.approx(float(m.float().mean()))
        covered = (some.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]).float().mean()
        assert got.keep_fraction == pytest.approx(float(covered)), grid


@pytest.mark.parametrize("settings", BLOCKS, ids=lambda s: s.describe())
def test_block_granularity_computes_every_touched_block_whole(settings):
    token = SparseSettings(settings.pattern, settings.decay, settings.sink, settings.window, block_size=16)
    for grid in GRIDS[:3]:
        exact = dense_mask(token, grid)
        n, bs = exact.shape[0], 16
        nb = -(-n // bs)
        touched = torch.zeros(nb * bs, nb * bs, dtype=torch.bool)
        touched[:n, :n] = exact
        touched = touched.view(nb, bs, nb, bs).any(3).any(1)
        want = touched.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]
        assert torch.equal(dense_mask(settings, grid), want) and bool((want | ~exact).all())
        got = build_grid_mask(settings, grid, "cpu")
        assert got.partial == 0 and got.full == int(touched.sum()) and got.density == got.keep_fraction
        assert got.keep_fraction == build_grid_mask(token, grid, "cpu").keep_fraction
        assert abs(sparse.mask_bytes(settings, grid) - got.nbytes) <= 64
        q, k, v = _qkv(n, heads=2)
        op = SparseAttention(settings).op(grid, "cpu")
        torch.testing.assert_close(op(q, k, v), _masked_sdpa(q, k, v, want), rtol=1e-5, atol=1e-5)


def test_keep_fraction_follows_the_settings():
    grid = (21, 30, 52)  # 81 frames at 832 x 480: 32,760 tokens
    fractions = [build_grid_mask(SparseSettings("radial", decay=d), grid, "cpu").keep_fraction for d in (0.2, 1.0, 4.0)]
    assert fractions[0] < fractions[1] < fractions[2] < 1.0
    assert build_grid_mask(SparseSettings("window", window=(20, 29, 51)), grid, "cpu").keep_fraction == 1.0
    small = build_grid_mask(SparseSettings("window", window=(1, 2, 2)), grid, "cpu")
    assert small.keep_fraction < 0.06 and small.density < small.keep_fraction
    longer = build_grid_mask(SparseSettings("radial", decay=0.2), (41, 30, 52), "cpu")
    assert longer.keep_fraction < fractions[0]  # sparser as the video grows: O(n log n)


def _qkv(n, heads=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, heads, d, generator=g) for _ in range(3)]


def _masked_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def test_a_mask_keeping_everything_equals_dense_sdpa_and_the_op_takes_any_heads():
    grid = (3, 4, 5)
    s = SparseSettings("window", window=(2, 3, 4), block_size=16, dense_blocks=0)
    q, k, v = _qkv(60)
    op = SparseAttention(s).op(grid, "cpu")
    assert op.mask.keep_fraction == 1.0 and op.mask.partial == 0
    dense = _masked_sdpa(q, k, v, None)
    torch.testing.assert_close(op(q, k, v), dense, rtol=1e-5, atol=1e-5)
    # a sequence-parallel rank's share: the full sequence, a subset of the heads
    torch.testing.assert_close(op(q[:, :, 1:3], k[:, :, 1:3], v[:, :, 1:3]), dense[:, :, 1:3], rtol=1e-5, atol=1e-5)


def test_the_op_is_the_masked_attention_and_refuses_another_token_count():
    grid = (16, 2, 4)
    s = SparseSettings("radial", decay=0.2, block_size=16, dense_blocks=0)
    op = SparseAttention(s).op(grid, "cpu")
    assert 0 < op.mask.partial and op.mask.keep_fraction < 0.7  # skipped, whole and partial blocks
    q, k, v = _qkv(128, heads=3)
    torch.testing.assert_close(op(q, k, v), _masked_sdpa(q, k, v, dense_mask(s, grid)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="16x2x4 token grid .128 tokens. and got 64"):
        op(q[:, :64], k[:, :64], v[:, :64])


def _tiny(layers=3, seed=0):
    torch.manual_seed(seed)
    return WanModel(WanConfig("t2v", dim=64, ffn_dim=128, num_heads=4, num_layers=layers, freq_dim=32,
                              text_dim=32)).eval()


COND = Conditioning(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1)))
UNCOND = Conditioning(torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2)))
X = torch.randn(1, 16, 4, 8, 8, generator=torch.Generator().manual_seed(3))  # grid 4 x 4 x 4


def _denoise(model, run_blocks, step=0, batch_cfg=True, **kw):
    with torch.inference_mode():
        return make_denoiser(model, COND, UNCOND, 5.0, batch_cfg=batch_cfg, run_blocks=run_blocks, **kw)(X, 0.9, step)


def _spy(monkeypatch):
    """Which blocks ran sparse: (block index, sparse?) per self-attention call."""
    seen = []
    call = sparse.SparseOp.__call__

    def spying(self, q, k, v):
        seen.append(not self.flag.dense)
        return call(self, q, k, v)

    monkeypatch.setattr(sparse.SparseOp, "__call__", spying)
    return seen


def test_dense_steps_and_dense_blocks(monkeypatch):
    model = _tiny()
    blocks = lambda state, call: model.run_blocks(state)  # noqa: E731
    plain = _denoise(model, blocks, step=1)
    seen = _spy(monkeypatch)
    s = SparseSettings("radial", decay=0.3, block_size=16, dense_steps=2, dense_blocks=1)
    sa = SparseAttention(s)
    assert torch.equal(_denoise(model, sa.wrap(blocks, model.blocks), step=1), plain)  # a dense step
    assert seen == [] and sa.calls == {"sparse": 0, "dense": 1}
    out = _denoise(model, sa.wrap(blocks, model.blocks), step=2)
    assert seen == [False, True, True] and not torch.allclose(out, plain, atol=1e-3)
    assert model.blocks[0]._forward_pre_hooks == {}  # the block-index hooks come off after the call
    # keeping everything, the sparse steps equal the dense ones
    everything = SparseAttention(SparseSettings("window", window=(9, 9, 9), block_size=16, dense_blocks=0))
    torch.testing.assert_close(_denoise(model, everything.wrap(blocks, model.blocks), step=1), plain,
                               rtol=1e-5, atol=1e-5)


def test_deviation_from_dense_is_reported_not_claimed(record_property):
    """Random weights say nothing about quality: the numbers go to the report."""
    model = _tiny()
    blocks = lambda state, call: model.run_blocks(state)  # noqa: E731
    plain = _denoise(model, blocks)
    for s in (SparseSettings("radial", decay=0.3, block_size=16), SparseSettings("window", window=(1, 1, 1),
                                                                                   block_size=16)):
        sa = SparseAttention(s)
        out = _denoise(model, sa.wrap(blocks, model.blocks))
        rel = float((out - plain).norm() / plain.norm())
        record_property(f"relative_deviation {s.describe()}", f"{rel:.4f} at keep "
                        f"{sa.report()['grids'][0]['keep_fraction']:.3f}")
        assert 0 < rel < 1


def test_step_cache_outside_context_windows_inside(monkeypatch):
    """MagCache around sparse attention skips as without it; context windows get a mask per
    window grid."""
    from wanfit.optim.context import ContextWindows

    model = _tiny()
    blocks = lambda state, call: model.run_blocks(state)  # noqa: E731
    sa = SparseAttention(SparseSettings("radial", decay=0.3, block_size=16, dense_blocks=0))
    cache = StepCache(MagCache(((1.0, 1.0),) * 4, threshold=1.0, skip_limit=4, retention=0.25), 4)
    run = cache.wrap(sa.wrap(blocks, model.blocks), "m")
    for step in range(4):
        _denoise(model, run, step=step)
    assert cache.report()["skipped_steps"] == [1, 2, 3] and sa.calls["sparse"] == 1
    windows = ContextWindows(length=3, overlap=1, schedule="standard_static")  # latent frames 0-2 and 1-3
    sa = SparseAttention(SparseSettings("radial", decay=0.3, block_size=16, dense_blocks=0))
    _denoise(model, sa.wrap(blocks, model.blocks), windows=windows)
    assert [g["grid"] for g in sa.report()["grids"]] == [[3, 4, 4]] and sa.calls["sparse"] == 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    name = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    fp8 = open_checkpoint(factory.write_models(root, [name])[name])
    gguf_path = root / "tiny_Q8_0.gguf"
    factory.write_gguf_dit(gguf_path, "i2v", "Q8_0")
    factory.write_lora(root / "lora.safetensors", "lightx2v")
    return fp8, gguf_path, root / "lora.safetensors"


def _step(prepared, run_blocks):
    gen = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=gen),
                        torch.randn(1, 20, 3, 4, 4, generator=gen))
    neg = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=gen), cond.y)
    denoise = make_denoiser(prepared.model, cond, neg, 3.5, run_blocks=run_blocks)
    with torch.inference_mode():
        return denoise(torch.randn(1, 16, 3, 4, 4, generator=gen), 0.9, 0)


def test_with_fp8_gguf_lora_and_block_swap(files):
    """The op sees q, k, v in the compute dtype whatever the weights: fp8 blocks swapped through
    the recording backend with an unmerged LoRA, and GGUF blocks, each equal to dense when the
    mask keeps everything, and differing with radial."""
    from wanfit.optim import gguf, lora

    fp8, gguf_path, lora_path = files
    everything = SparseSettings("window", window=(9, 9, 9), block_size=16, dense_blocks=0)
    radial = SparseSettings("radial", decay=0.3, block_size=16, dense_blocks=0)
    applied = lora.AppliedLora(lora.open_lora(lora_path, fp8.shapes), 0.7)
    swapped = prepare_dit(fp8, RecordingBackend(lazy=True), SwapSettings(1, 1), dtype=torch.float32,
                          loras=[(applied, "unmerged")])
    quant = prepare_dit(gguf.open_gguf(gguf_path), "cpu", dtype=torch.float32)
    for prepared in (swapped, quant):
        dense = _step(prepared, prepared.run_blocks)
        same = _step(prepared, SparseAttention(everything).wrap(prepared.run_blocks, prepared.model.blocks))
        torch.testing.assert_close(same, dense, rtol=1e-5, atol=1e-5)
        other = _step(prepared, SparseAttention(radial).wrap(prepared.run_blocks, prepared.model.blocks))
        assert not torch.allclose(other, dense, atol=1e-4)
    assert swapped.swap_stats().forwards == 3
    swapped.close()


def test_planner_counts_the_op_and_its_masks():
    """The plan traces the model's forward with the sparse op in place (its output and
    log-sum-exp, as the flex kernel's) and holds the masks between calls; tests/
    test_compile_slow.py measures the compiled kernel against it."""
    from wanfit.nodes.memory import sparse_hook
    from wanfit.optim import planner

    config = WanConfig("t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, freq_dim=32, text_dim=32)
    handle = type("H", (), {"sparse": SparseSettings("radial", decay=0.3)})()
    hook = sparse_hook(handle)
    grid = (8, 30, 52)
    dense = planner.dit_activations(config, grid, 1, torch.float32, "fp32", "sdpa", device_type="cuda")
    with_op = planner.dit_activations(config, grid, 1, torch.float32, "fp32", "sdpa", device_type="cuda", hook=hook)
    # flash SDPA and flex return the same two tensors: the same peak
    assert with_op.peak == dense.peak and with_op.block == dense.block
    assert hook.held(1, 12480) == sparse.mask_bytes(handle.sparse, (1, 1, 12480)) > 0
    real = build_grid_mask(handle.sparse, grid, "cpu").nbytes
    assert abs(sparse.mask_bytes(handle.sparse, grid) - real) <= 64
    logging.getLogger("WanFit").info("mask bytes %d", real)
