"""GGUF models: torch dequantisation against gguf's numpy code, the loader, GGUFLinear, swap, bad files."""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

import factory
from wanfit.optim import gguf as G
from wanfit.optim import hostmem
from wanfit.optim.engine import SwapSettings, attach_swap
from wanfit.optim.offload import BlockLayout, RecordingBackend, state_tensors
from wanfit.wan.checkpoint import CheckpointError
from wanfit.wan.detect import detect_dit_config
from wanfit.wan.model import PRESETS, WanModel
from wanfit.wan.t5 import UMT5Encoder

# gguf.quants can quantise these; ggml's own accuracy test (tests/test-quantize-fns.cpp) bounds
# sqrt(sum (x - x')^2) / n on 0.1 + 2 cos(i) by MAX_QUANTIZATION_TOTAL_ERROR = 0.002
ROUND_TRIP = (QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)
GGML_TOTAL_ERROR = 0.002
random_blocks = factory.random_gguf_blocks


def numpy_dequantize(raw: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.BF16:  # gguf.quants.dequantize works on rows of BF16 blocks
        return gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1)
    return gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(-1)


@pytest.mark.parametrize("qtype", G.SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_numpy_bit_for_bit(qtype):
    raw = random_blocks(qtype, 96, seed=int(qtype))
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    expected = torch.from_numpy(np.ascontiguousarray(numpy_dequantize(raw, qtype), dtype=np.float32))
    got = G.dequantize(torch.from_numpy(raw.copy()).reshape(-1), qtype, (96 * block,))
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert torch.isfinite(got).all() and got.abs().max() > 0
    # other compute dtypes are the float32 result rounded once
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(G.dequantize(torch.from_numpy(raw.copy()), qtype, (96 * block,), dtype),
                           expected.to(dtype))


@pytest.mark.parametrize("qtype", G.QUANT_TYPES, ids=lambda t: t.name)
def test_chunked_dequantize_is_the_same(qtype, monkeypatch):
    raw = torch.from_numpy(random_blocks(qtype, 40, seed=1).copy()).reshape(-1)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    whole = G.dequantize(raw, qtype, (40 * block,))
    monkeypatch.setattr(G, "DEQUANT_CHUNK_CPU", 3 * block)  # 14 chunks, the last one short
    assert torch.equal(G.dequantize(raw, qtype, (8, 5 * block)), whole.view(8, 5 * block))
    assert torch.equal(G.dequantize(raw, qtype, (40 * block,), torch.bfloat16), whole.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", ROUND_TRIP, ids=lambda t: t.name)
def test_round_trip_within_ggml_published_error(qtype):
    n = 32 * 128  # ggml's test size
    ggml_data = 0.1 + 2 * np.cos(np.arange(n, dtype=np.float32))
    random_data = np.random.default_rng(3).uniform(-1.9, 2.1, n).astype(np.float32)  # the same range
    for data in (ggml_data, random_data):
        q = gguf.quants.quantize(data.reshape(1, -1), qtype)
        back = G.dequantize(torch.from_numpy(np.ascontiguousarray(q).view(np.uint8).reshape(-1)), qtype, (n,))
        total_error = float(np.sqrt(((back.numpy().astype(np.float64) - data) ** 2).sum()) / n)
        assert 0 < total_error < GGML_TOTAL_ERROR  # it did round, within ggml's bound


def test_factory_q4_k_quantiser_within_ggml_published_error():
    """The test files' Q4_K comes from the factory's own quantiser (gguf.quants has none for
    K-quants); gguf's numpy dequantiser, an independent decoder, reads it back within ggml's bound."""
    n = 32 * 128
    for data in (0.1 + 2 * np.cos(np.arange(n, dtype=np.float32)),
                 np.random.default_rng(4).uniform(-1.9, 2.1, n).astype(np.float32)):
        back = gguf.quants.dequantize(factory.quantize_q4_k(data.reshape(1, -1)), QT.Q4_K).reshape(-1)
        assert 0 < np.sqrt(((back.astype(np.float64) - data) ** 2).sum()) / n < GGML_TOTAL_ERROR


def test_dequantize_working_set_within_the_planner_bound(monkeypatch):
    """Peak CPU allocation of one dequantisation stays within dequant_transient_bytes."""
    monkeypatch.setattr(G, "DEQUANT_CHUNK", 1 << 15)
    monkeypatch.setattr(G, "DEQUANT_CHUNK_CPU", 1 << 15)  # the bound is the device chunk's; same size here
    for qtype in G.QUANT_TYPES:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        n_blocks = (4 << 15) // block
        raw = torch.from_numpy(random_blocks(qtype, n_blocks).copy()).reshape(-1)
        numel = n_blocks * block
        peak = hostmem.allocation_peak(lambda: G.dequantize(raw, qtype, (numel,), torch.bfloat16))
        assert numel * 2 < peak <= G.dequant_transient_bytes(numel, torch.bfloat16, qtype), qtype.name


# --- files -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    wide = factory.dit_state_dict_wide("t2v", seed=2)
    mixed = {"blocks.1.ffn.0.weight": "Q8_0", "blocks.1.self_attn.v.weight": "F16"}
    return {
        "q8": factory.write_gguf_dit(d / "i2v_Q8_0.gguf", "i2v", "Q8_0", seed=5, prefix="model.diffusion_model."),
        "f16": factory.write_gguf_dit(d / "i2v_F16.gguf", "i2v", "F16", seed=5),
        "q4k": factory.write_gguf_dit(d / "t2v_Q4_K.gguf", "t2v", "Q4_K", state_dict=wide, nd_layout="orig_shape"),
        "mixed": factory.write_gguf_dit(d / "t2v_Q4_K_M.gguf", "t2v", "Q4_K", state_dict=wide, types=mixed),
        "tiny_q4k": factory.write_gguf_dit(d / "i2v_Q4_K_M.gguf", "i2v", "Q4_K", seed=5),
        "t5": factory.write_gguf_t5(d / "t5" / "umt5-xxl-encoder-Q8_0.gguf", "Q8_0", seed=8),
        "t5_beside": factory.write_gguf_t5(d / "t5b" / "umt5-xxl-encoder-Q8_0.gguf", "Q8_0", seed=8,
                                           tokenizer="beside"),
    }


@pytest.fixture(scope="module")
def t5_ckpt(files):
    """The T5 GGUF with its vocabulary in the metadata, parsed once: gguf's reader walks
    metadata arrays value by value (the 240 KB normalisation map alone takes seconds here)."""
    return G.open_gguf(files["t5"])


def oracle_state_dict(path) -> dict[str, torch.Tensor]:
    """The file read by gguf's own reader and numpy dequantiser (prefix stripped, dims
    reversed, comfy.gguf.orig_shape applied): the independent reference of what we load."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape_field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        shape = tuple(shape_field.contents()) if shape_field else tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name.removeprefix("model.diffusion_model.")] = torch.from_numpy(data.copy()).reshape(shape)
    return out


def _inputs(model_type: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 4, generator=gen)
    context = torch.randn(1, 12, factory.TEXT_DIM, generator=gen)
    y = torch.randn(1, 20, 3, 4, 4, generator=gen) if model_type == "i2v" else None
    return x, torch.tensor([700.0]), context, y


def _forward(model, model_type: str, seed: int = 0) -> torch.Tensor:
    x, t, context, y = _inputs(model_type, seed)
    with torch.inference_mode():
        return model(x, t, context, y=y)


def _reference_model(state_dict: dict[str, torch.Tensor]) -> WanModel:
    model = WanModel(detect_dit_config({k: v.shape for k, v in state_dict.items()}))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def test_header_handle(files):
    source = factory.dit_state_dict("i2v", seed=5)
    for key in ("q8", "f16", "tiny_q4k"):
        ckpt = G.open_gguf(files[key])
        assert (ckpt.family, ckpt.architecture, ckpt.name) == ("dit", "wan", files[key].name)
        assert ckpt.prefix == ("model.diffusion_model." if key == "q8" else "")
        assert ckpt.shapes == {k: tuple(v.shape) for k, v in source.items()}  # logical torch shapes
        assert detect_dit_config(ckpt.shapes) == detect_dit_config({k: v.shape for k, v in source.items()})
        assert ckpt.nbytes == sum(ckpt.qtypes().values()) == sum(ckpt.dtypes().values())
        reader = gguf.GGUFReader(files[key])
        assert ckpt.nbytes == sum(int(t.n_bytes) for t in reader.tensors)
    q8 = G.open_gguf(files["q8"]).tensors
    assert q8["blocks.0.ffn.0.weight"].qtype == QT.Q8_0 and q8["blocks.0.ffn.0.weight"].dtype == torch.uint8
    assert q8["blocks.0.modulation"].qtype == QT.F32 and q8["patch_embedding.weight"].shape == (128, 36, 1, 2, 2)
    assert q8["time_embedding.0.weight"].qtype == QT.F16
    # the 128-wide tiny model: K-quant rows need 256 values, so city96's pipeline falls back to F16
    tiny = G.open_gguf(files["tiny_q4k"]).tensors
    assert tiny["blocks.0.ffn.2.weight"].qtype == QT.Q4_K and tiny["blocks.0.ffn.0.weight"].qtype == QT.F16
    wide = G.open_gguf(files["q4k"])
    assert wide.shapes["patch_embedding.weight"] == (256, 16, 1, 2, 2)  # from comfy.gguf.orig_shape
    assert wide.quant_label() == "Q4_K"
    assert G.open_gguf(files["t5_beside"]).family == "t5"


@pytest.mark.parametrize("key,dtype", [("q8", torch.float32), ("f16", torch.float32), ("q4k", torch.float32),
                                       ("tiny_q4k", torch.float32), ("q8", torch.bfloat16)])
def test_loaded_model_equals_the_numpy_dequantised_file(files, key, dtype):
    """GGUFLinear dequantises per call what gguf.quants gives; the model then runs the same ops
    as a WanModel loaded with gguf's numpy-dequantised tensors: outputs are identical."""
    model = G.load_dit_gguf(files[key], dtype=dtype)
    ref = _reference_model(oracle_state_dict(files[key])).to(dtype)
    model_type = "t2v" if key == "q4k" else "i2v"
    assert torch.equal(_forward(model, model_type), _forward(ref, model_type))
    quantized = {path for path, m in model.named_modules() if isinstance(m, G.GGUFLinear)}
    ckpt = G.open_gguf(files[key])
    assert quantized == {k.removesuffix(".weight") for k, v in ckpt.tensors.items()
                         if k.startswith("blocks.") and v.quantized}
    if key != "f16":
        assert quantized and all(model.get_submodule(p).weight.dtype == torch.uint8 for p in quantized)
    assert model.patch_embedding.weight.dtype == dtype and model.head.head.weight.dtype == dtype


def test_dequantised_at_load(files):
    """keep_quantized=False: plain Linears in the compute dtype, the same numbers."""
    model = G.load_dit_gguf(files["q4k"], torch.float32, keep_quantized=False)
    assert not any(isinstance(m, G.GGUFLinear) for m in model.modules())
    assert torch.equal(_forward(model, "t2v"), _forward(_reference_model(oracle_state_dict(files["q4k"])), "t2v"))
    sizes = G.dit_bytes(G.open_gguf(files["q4k"]), torch.bfloat16, keep_quantized=False)
    assert sizes.largest_linear == 0 and sizes.blocks[0] == sum(
        v.numel() * 2 for k, v in factory.dit_state_dict_wide().items() if k.startswith("blocks.0."))


def test_q8_0_output_close_to_its_float_source(files):
    """Q8_0 stores each weight to within half a step of amax/127 per 32 values: the relative
    RMS error of the block weights is about 0.6 % (asserted < 0.8 % below). Through the tiny
    DiT's 2 blocks (each 8 quantised matmuls in series with residuals) such errors add roughly
    in quadrature, so the output moves ~1 %; the bound of 2 % leaves twice that, while a wrong
    decode (nibble order, a scale) moves it by O(100 %). F16 stays within fp16 rounding."""
    source = factory.dit_state_dict("i2v", seed=5)
    expected = _forward(_reference_model(source), "i2v")
    ckpt = G.open_gguf(files["q8"])
    w_err = [((ckpt.get_tensor(k) - source[k]).norm() / source[k].norm()).item()
             for k, v in ckpt.tensors.items() if v.quantized]
    assert 0.003 < max(w_err) < 0.008

    def rel(out):
        return ((out - expected).norm() / expected.norm()).item()

    q8 = rel(_forward(G.load_dit_gguf(files["q8"], torch.float32), "i2v"))
    f16 = rel(_forward(G.load_dit_gguf(files["f16"], torch.float32), "i2v"))
    q4 = rel(_forward(G.load_dit_gguf(files["tiny_q4k"], torch.float32), "i2v"))
    assert 0 < f16 < 2e-3 and 0 < q8 < 0.02 and q8 < q4 < 0.2


def test_gguf_linear():
    torch.manual_seed(0)
    w = torch.randn(96, 256) / 16
    raw = torch.from_numpy(factory.quantize_q4_k(w.numpy()).reshape(-1).copy())
    layer = G.GGUFLinear(256, 96, True, QT.Q4_K, torch.float32)
    layer.weight.data = raw
    layer.bias.data = torch.randn(96)
    x = torch.randn(3, 5, 256)
    expected = F.linear(x, G.dequantize(raw, QT.Q4_K, (96, 256)), layer.bias)
    assert torch.equal(layer(x), expected)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    meta = G.GGUFLinear(5120, 13824, True, QT.Q4_K, torch.bfloat16, device="meta")
    assert meta.weight.is_meta and meta.weight.nbytes == 5120 * 13824 // 256 * 144
    assert sum(t.nbytes for t in state_tensors(meta)) == 5120 * 13824 * 144 // 256 + 13824 * 2
    with pytest.raises(ValueError, match="IQ2_XXS"):
        G.GGUFLinear(256, 256, False, QT.IQ2_XXS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("qtype", G.SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_on_cuda_equals_cpu(qtype):
    raw = torch.from_numpy(random_blocks(qtype, 64).copy()).reshape(-1)
    shape = (64 * gguf.GGML_QUANT_SIZES[qtype][0],)
    cpu = G.dequantize(raw, qtype, shape)
    assert torch.equal(G.dequantize(raw.cuda(), qtype, shape).cpu().view(torch.int32), cpu.view(torch.int32))


def test_block_bytes_are_the_files(files):
    """The plan's block bytes: quantised weights exactly as stored, the rest in the compute dtype."""
    for key in ("q8", "q4k", "tiny_q4k"):
        ckpt = G.open_gguf(files[key])
        for dtype in (torch.bfloat16, torch.float32):
            expected = []
            for i in range(2):
                infos = [v for k, v in ckpt.tensors.items() if k.startswith(f"blocks.{i}.")]
                expected.append(sum(v.nbytes if v.quantized else v.numel * dtype.itemsize for v in infos))
            sizes = G.dit_bytes(ckpt, dtype)
            assert list(sizes.blocks) == G.block_bytes(ckpt, dtype) == expected
            model = G.load_dit_gguf(ckpt, dtype)
            assert [sum(t.nbytes for t in state_tensors(b)) for b in model.blocks] == expected
            assert sizes.block == BlockLayout(state_tensors(model.blocks[1])).nbytes
            assert sizes.other == sum(t.nbytes for t in state_tensors(model)) - sum(expected)
    q4 = G.dit_bytes(G.open_gguf(files["q4k"]))
    assert q4.largest_linear == 256 * 512 and q4.dequant_transient == 256 * 512 * 2 + 256 * 512 * G.DEQUANT_WORK_BYTES
    bf16_block = sum(v.numel() * 2 for k, v in factory.dit_state_dict_wide().items() if k.startswith("blocks.0."))
    assert q4.blocks[0] < 0.35 * bf16_block  # Q4_K: 4.5 bits per weight


def test_expected_checkpoint_matches_a_written_file(files):
    """The header a planner can count before download equals a written file's, type by type."""
    written = G.open_gguf(files["tiny_q4k"])
    expected = G.expected_checkpoint(detect_dit_config(written.shapes), "Q4_K")
    assert {k: (v.shape, v.qtype, v.nbytes) for k, v in expected.tensors.items()} == \
        {k: (v.shape, v.qtype, v.nbytes) for k, v in written.tensors.items()}
    assert G.dit_bytes(expected) == G.dit_bytes(written)
    # a full-size A14B expert: Q4_K block Linears are 4.5 bits a weight
    a14b = G.dit_bytes(G.expected_checkpoint(PRESETS["Wan2.2 I2V-A14B expert"], "Q4_K"))
    linear = 4 * 5120 * 5120 * 2 + 2 * 5120 * 13824  # self + cross attention, ffn
    assert a14b.blocks[0] > linear * 4.5 / 8 and a14b.blocks[0] < linear * 4.5 / 8 * 1.01
    assert a14b.largest_linear == 5120 * 13824


@pytest.mark.parametrize("key,resident,prefetch", [("q4k", 1, 1), ("q8", 0, 1), ("mixed", 1, 0)])
def test_swapped_gguf_model_equals_resident(files, key, resident, prefetch):
    model_type = "i2v" if key == "q8" else "t2v"
    expected = _forward(G.load_dit_gguf(files[key], torch.float32), model_type)
    model = G.load_dit_gguf(files[key], torch.float32)
    backend = RecordingBackend(lazy=True)
    prepared = attach_swap(model, resident, backend, SwapSettings(2 - resident, prefetch))
    x, t, context, y = _inputs(model_type)
    with torch.inference_mode():
        state = model.embed(x, t, context, y=y)
        out = model.unembed(prepared.run_blocks(state))
    assert torch.equal(out, expected)
    stats = prepared.swap_stats()
    # what moves is the quantised block: its uint8 blocks, not a dequantised weight
    assert stats.transfers == 2 - resident and stats.block_bytes == G.dit_bytes(G.open_gguf(files[key]), torch.float32).block
    prepared.close()


def test_mixed_types_need_uniform_storage_to_swap(files):
    """A Q4_K_M-style file with another type in one block: padded storage keeps one layout;
    without it BlockSwapper refuses the blocks."""
    ckpt = G.open_gguf(files["mixed"])
    padded = G.load_dit_gguf(ckpt, torch.float32)
    assert padded.blocks[1].ffn[0].qtype == QT.Q8_0 and padded.blocks[0].ffn[0].qtype == QT.Q4_K
    assert padded.blocks[1].self_attn.v.qtype == QT.F16  # kept raw F16 to match block 0's layout
    assert padded.blocks[0].ffn[0].weight.numel() == ckpt.tensors["blocks.1.ffn.0.weight"].nbytes
    exact = G.load_dit_gguf(ckpt, torch.float32, uniform_blocks=False)
    assert type(exact.blocks[1].self_attn.v) is torch.nn.Linear
    with pytest.raises(ValueError, match="differs in layout"):
        attach_swap(exact, 0, RecordingBackend(), SwapSettings(2, 1))
    assert G.block_bytes(ckpt, uniform_blocks=False) != G.block_bytes(ckpt)


def test_text_encoder_gguf(files):
    """Loaded exactly as gguf's numpy code decodes the file; against the float source, within
    twice what gaussian noise of Q8_0's size (0.55 % of each block weight's spread) does to
    this tiny T5 (its attention is unscaled, as T5's, so it is more sensitive than the DiT)."""
    model, tokenizer = G.load_text_encoder_gguf(files["t5_beside"], torch.float32)
    assert isinstance(model.blocks[0].attn.q, G.GGUFLinear) and model.blocks[0].attn.q.qtype == QT.Q8_0
    ref = UMT5Encoder.from_state_dict({G.t5_gguf_key(k): v for k, v in oracle_state_dict(files["t5_beside"]).items()})
    internal = factory.t5_internal_state_dict(seed=8)
    gen = torch.Generator().manual_seed(1)
    noisy = {k: v + v.std() * 0.0055 * torch.randn(v.shape, generator=gen) if G._t5_block_linear(k, v.shape) else v
             for k, v in internal.items()}
    source, perturbed = UMT5Encoder(factory.T5).eval(), UMT5Encoder(factory.T5).eval()
    source.load_state_dict(internal)
    perturbed.load_state_dict(noisy)
    ids, mask = tokenizer(["a cat walks over the lake"])
    with torch.inference_mode():
        out, exact, expected, noise = model(ids, mask), ref(ids, mask), source(ids, mask), perturbed(ids, mask)
    assert torch.equal(out, exact)
    error, noise_error = ((out - expected).norm() / expected.norm()).item(), ((noise - expected).norm() / expected.norm()).item()
    assert 0 < error < 2 * noise_error


def test_text_encoder_tokenizer_from_the_gguf_vocabulary(files, t5_ckpt):
    """The vocabulary llama.cpp stores in the GGUF, rebuilt as a SentencePiece model, encodes
    as the original spiece.model does; a file without one takes spiece.model from beside it."""
    import sentencepiece as spm

    original = spm.SentencePieceProcessor(model_proto=factory.tokenizer_model(8))
    rebuilt = spm.SentencePieceProcessor(model_proto=t5_ckpt.tokenizer_model)
    assert rebuilt.get_piece_size() == original.get_piece_size()
    assert (rebuilt.unk_id(), rebuilt.eos_id(), rebuilt.pad_id(), rebuilt.bos_id()) == (2, 1, 0, -1)
    texts = ["a cat walks over the lake", "  Zoom   close-up, WIDE shot!  ", "\uff43\uff41\uff54 \ufb01re smoke", "dance 123 \u00e9t\u00e9 \u6c34"]
    for text in texts:
        assert rebuilt.encode(text) == original.encode(text), text
    _, tokenizer = G.load_text_encoder_gguf(t5_ckpt)
    _, beside = G.load_text_encoder_gguf(files["t5_beside"])
    assert G.open_gguf(files["t5_beside"]).tokenizer_model is None
    for text in texts:
        assert torch.equal(tokenizer([text])[0], beside([text])[0])


# --- bad files ---------------------------------------------------------------------------------

def _patched(src, dst, edit) -> str:
    """Copy ``src`` to ``dst`` and edit its tensor table in place through gguf's own reader."""
    shutil.copy(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    edit(reader)
    reader.data.flush()
    del reader
    return str(dst)


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def _bad(path, match):
    with pytest.raises(CheckpointError, match=match) as err:
        G.open_gguf(path)
    assert str(err.value).startswith(f"{Path(path).name}: ")


def test_truncated(files, tmp_path):
    data = files["q8"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    _bad(cut, "truncated: tensor .* ends at byte .* but the file has")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:300])
    _bad(head, "damaged or cut short")


def test_wrong_architecture(files, tmp_path):
    flux = factory.write_gguf_dit(tmp_path / "flux.gguf", "t2v", "Q8_0", arch="flux")
    _bad(flux, "general.architecture is 'flux': a GGUF of another model")
    with pytest.raises(CheckpointError, match="this is a UMT5 text encoder, but this loader needs a Wan"):
        G.open_gguf(files["t5_beside"], expect="dit")


def test_unknown_and_unsupported_quant_types(files, tmp_path):
    def set_type(value):
        return lambda r: _tensor(r, "model.diffusion_model.blocks.0.ffn.0.weight").field.parts[4].__setitem__(0, value)

    _bad(_patched(files["q8"], tmp_path / "unknown.gguf", set_type(250)),
         "tensor model.diffusion_model.blocks.0.ffn.0.weight has quant type id 250, which is no ggml type")
    _bad(_patched(files["q8"], tmp_path / "iq2.gguf", set_type(int(QT.IQ2_XXS))),
         "stored as IQ2_XXS, a quant type WanFit cannot dequantise")


def test_byte_size_mismatch(files, tmp_path):
    def double_rows(r):
        _tensor(r, "model.diffusion_model.blocks.0.ffn.0.weight").field.parts[3][1] *= 2

    _bad(_patched(files["q8"], tmp_path / "rows.gguf", double_rows),
         r"blocks.0.ffn.0.weight: Q8_0 \[512, 128\] takes 69632 bytes, but only 34816 are stored .* "
         "does not match its type and shape")

    def odd_row(r):
        _tensor(r, "model.diffusion_model.blocks.0.ffn.0.weight").field.parts[3][0] = 100

    _bad(_patched(files["q8"], tmp_path / "row.gguf", odd_row), "rows of 100 elements are not whole Q8_0 blocks")


def test_not_gguf(files, tmp_path):
    st = tmp_path / "model.gguf"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}      " + bytes(64))
    _bad(st, "not a GGUF file: .*looks like a safetensors file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _bad(empty, "not a GGUF file")
    with pytest.raises(CheckpointError, match="no such file"):
        G.open_gguf(tmp_path / "missing.gguf")


def test_big_endian(tmp_path):
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(str(path), "wan", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("patch_embedding.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _bad(path, "a big-endian GGUF")
