"""UMT5 text encoder and tokenizer vs transformers and the official Wan 2.2 code.

Tiny random configs in float32 on CPU. The tokenizer is a sentencepiece unigram model
trained here (T5 ids: pad 0, eos 1, unk 2, no bos); the oracle is transformers'
``T5Tokenizer`` (a ``tokenizers`` Unigram) built from that model's pieces, scores and
normaliser, with Wan's cleaning in front as its ``HuggingfaceTokenizer`` does (minus ftfy).
"""
from __future__ import annotations

import html
import io
import random

import pytest
import regex
import torch
from safetensors.torch import save_file

from wanfit.wan.t5 import (TEXT_LEN, UMT5_XXL, UMT5Config, UMT5Encoder, convert_t5_state_dict,
                           detect_t5_config, relative_position_bucket, t5_key_map)
from wanfit.wan.tokenizer import load_tokenizer, tokenizer_from_bytes

from reference import check, wan22_module

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TINY = dict(d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64)


# --- tokenizer fixtures -----------------------------------------------------------------

@pytest.fixture(scope="module")
def spiece() -> bytes:
    rng = random.Random(0)
    syllables = "ka lo mi ne ru ta shi po an el ü é \u65e5 \u672c s t".split()
    words = ["the", "a", "cat", "dog", "red", "car", "city", "night", "camera", "it's", "don't", "\"hi\""]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", ",", "!", ""])
              for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram",
                                   vocab_size=200, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    return buf.getvalue()


def _proto_fields(buf: bytes):
    """(field number, value) of a serialized protobuf message; enough to reach the charsmap."""
    def varint(i):
        value = shift = 0
        while True:
            byte = buf[i]
            i, value, shift = i + 1, value | (byte & 0x7F) << shift, shift + 7
            if byte < 0x80:
                return value, i
    i = 0
    while i < len(buf):
        tag, i = varint(i)
        wire = tag & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        else:
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        yield tag >> 3, value


@pytest.fixture(scope="module")
def hf_tokenizer(spiece):
    """transformers' T5Tokenizer from the same model (v5 needs protobuf to read the file itself)."""
    sp = spm.SentencePieceProcessor(model_proto=spiece)
    normalizer = next(v for f, v in _proto_fields(spiece) if f == 3)  # ModelProto.normalizer_spec
    charsmap = next(v for f, v in _proto_fields(normalizer) if f == 2)  # .precompiled_charsmap
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return transformers.T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap, extra_ids=0)


def wan_clean(text: str) -> str:
    """The official HuggingfaceTokenizer 'whitespace' cleaning, without ftfy.fix_text."""
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def reference_ids(hf_tokenizer, texts, seq_len):
    out = hf_tokenizer([wan_clean(t) for t in texts], padding="max_length", truncation=True,
                       max_length=seq_len, return_tensors="pt")
    return out.input_ids, out.attention_mask


TEXTS = [
    "the red car",
    "  kaloshi   ne\tru\n\nta  ",
    "&amp;lt;b&amp;gt; a cat &amp; a dog",
    "\uff26\uff35\uff2c\uff2c width \ufb01 ligature and QQQ unknown \U0001f642 chars",
    "the cat</s> a dog</s>tashi <pad> <unk>",
    "\u65e5\u672c café über",
    " ".join(["the city at night"] * 200),  # truncated: 511 tokens + EOS
]


# --- tokenizer --------------------------------------------------------------------------

def test_tokenizer_matches_transformers(spiece, hf_tokenizer):
    tok = tokenizer_from_bytes(spiece)
    ids, mask = tok(TEXTS)
    ref_ids, ref_mask = reference_ids(hf_tokenizer, TEXTS, TEXT_LEN)
    assert ids.shape == (len(TEXTS), TEXT_LEN) and ids.dtype == torch.long
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    assert mask[-1].all() and ids[-1, -1] == 1  # truncation keeps the EOS
    lengths = mask.sum(1)
    assert all(ids[i, n - 1] == 1 and (ids[i, n:] == 0).all() for i, n in enumerate(lengths.tolist()))


def test_tokenizer_uncurls_quotes_like_ftfy(spiece):
    tok = tokenizer_from_bytes(spiece, seq_len=32)
    curly, straight = tok("it\u2019s a \u201chi\u201d cat")[0], tok("it's a \"hi\" cat")[0]
    assert torch.equal(curly, straight)


def test_tokenizer_sources(spiece, hf_tokenizer, tmp_path):
    expected = tokenizer_from_bytes(spiece)(TEXTS)[0]
    inside = tmp_path / "inside" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    inside.parent.mkdir()
    save_file({"spiece_model": torch.frombuffer(bytearray(spiece), dtype=torch.uint8),
               "shared.weight": torch.zeros(2, 2)}, str(inside))
    beside = tmp_path / "beside" / "models_t5_umt5-xxl-enc-bf16.pth"
    (beside.parent / "google" / "umt5-xxl").mkdir(parents=True)
    (beside.parent / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece)
    as_json = tmp_path / "json" / "text_encoder.safetensors"
    as_json.parent.mkdir()
    save_file({"shared.weight": torch.zeros(2, 2)}, str(as_json))
    (as_json.parent / "tokenizer.json").write_text(hf_tokenizer.backend_tokenizer.to_str())
    for path in (inside, beside, as_json):
        assert torch.equal(load_tokenizer(path)(TEXTS)[0], expected), path
    bare = tmp_path / "bare" / "text_encoder.safetensors"
    bare.parent.mkdir()
    save_file({"shared.weight": torch.zeros(2, 2)}, str(bare))
    with pytest.raises(FileNotFoundError, match="text_encoder.safetensors.*spiece_model"):
        load_tokenizer(bare)


# --- encoder fixtures -------------------------------------------------------------------

def hf_model(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.UMT5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", dropout_rate=0.0, **TINY)
    model = transformers.UMT5EncoderModel(cfg).eval()
    with torch.no_grad():  # make norms and position biases matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names -> official Wan names, written out independently of t5_key_map."""
    out = {"token_embedding.weight": sd["shared.weight"],
           "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(TINY["num_layers"]):
        a, f = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        out.update({
            f"blocks.{i}.norm1.weight": sd[a + "layer_norm.weight"],
            f"blocks.{i}.pos_embedding.embedding.weight":
                sd[a + "SelfAttention.relative_attention_bias.weight"],
            f"blocks.{i}.norm2.weight": sd[f + "layer_norm.weight"],
            f"blocks.{i}.ffn.gate.0.weight": sd[f + "DenseReluDense.wi_0.weight"],
            f"blocks.{i}.ffn.fc1.weight": sd[f + "DenseReluDense.wi_1.weight"],
            f"blocks.{i}.ffn.fc2.weight": sd[f + "DenseReluDense.wo.weight"],
            **{f"blocks.{i}.attn.{p}.weight": sd[a + f"SelfAttention.{p}.weight"] for p in "qkvo"},
        })
    return out


def official_model(vocab: int, sd: dict[str, torch.Tensor]):
    t5 = wan22_module("t5")
    model = t5.T5Encoder(vocab=vocab, dim=TINY["d_model"], dim_attn=TINY["num_heads"] * TINY["d_kv"],
                         dim_ffn=TINY["d_ff"], num_heads=TINY["num_heads"], num_layers=TINY["num_layers"],
                         num_buckets=32, shared_pos=False, dropout=0.0).eval()
    model.load_state_dict(sd, strict=True)
    return model


def batch(vocab: int, lengths=(9, 40), seq: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


# --- encoder ----------------------------------------------------------------------------

@pytest.mark.parity
def test_bucket_matches_transformers():
    attn = transformers.UMT5EncoderModel(transformers.UMT5Config(vocab_size=8, **TINY)) \
        .encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(-600, 601)[None, :]
    assert torch.equal(relative_position_bucket(rel, 32, 128), attn._relative_position_bucket(rel))


@pytest.mark.parity
def test_transformers_layout_matches_transformers():
    ref_model = hf_model(200)
    ids, mask = batch(200)
    model = UMT5Encoder.from_state_dict(hf_state_dict(ref_model))
    assert model.config == UMT5Config(vocab_size=200, **TINY)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        check(model.encode(ids, mask), ref, "UMT5 transformers layout vs UMT5EncoderModel")


@pytest.mark.parity
def test_official_layout_matches_wan22_and_transformers():
    ref_model = hf_model(200)
    sd = to_official(hf_state_dict(ref_model))
    official = official_model(200, sd)  # strict load: the official layout is what we think
    assert set(sd) == set(official.state_dict())
    ids, mask = batch(200)
    model = UMT5Encoder.from_state_dict(sd)
    with torch.no_grad():
        out = model.encode(ids, mask)
        check(out, official(ids, mask), "UMT5 official layout vs wan22 T5Encoder")
        check(out, ref_model(input_ids=ids, attention_mask=mask).last_hidden_state,
              "UMT5 official layout vs UMT5EncoderModel")


@pytest.mark.parity
def test_encode_padded_matches_official_pipeline(spiece):
    """Tokenizer -> encoder -> padded context, vs the official T5EncoderModel.__call__ + DiT padding."""
    tok = tokenizer_from_bytes(spiece)
    ref_model = hf_model(200)  # the tokenizer's 200 pieces
    official = official_model(200, to_official(hf_state_dict(ref_model)))
    model = UMT5Encoder.from_state_dict(hf_state_dict(ref_model))
    ids, mask = tok(["a red car in the city at night", TEXTS[1], " ".join(["the city at night"] * 40)])
    with torch.no_grad():
        out, lengths = model.encode_padded(ids, mask)
        seq_lens = mask.gt(0).sum(dim=1).long()  # official: encode all 512, trim, pad with zeros
        contexts = {"official pipeline": official(ids, mask),
                    "UMT5EncoderModel": ref_model(input_ids=ids, attention_mask=mask).last_hidden_state}
        refs = {name: torch.stack([torch.cat([u[:v], u.new_zeros(TEXT_LEN - v, u.size(1))])
                                   for u, v in zip(context, seq_lens)])
                for name, context in contexts.items()}
    assert out.shape == (3, TEXT_LEN, TINY["d_model"]) and torch.equal(lengths, seq_lens)
    assert lengths.max() > 128  # offsets past max_distance are exercised
    for name, ref in refs.items():  # the official code's own float noise is the larger here
        check(out, ref, f"UMT5 encode_padded vs {name} (512 tokens)")


@pytest.mark.parity
@pytest.mark.parametrize("key", ["blocks.1.pos_embedding.embedding.weight", "blocks.0.norm2.weight",
                                 "blocks.1.ffn.gate.0.weight", "norm.weight"])
def test_perturbed_weight_fails(key):
    ref_model = hf_model(200)
    ids, mask = batch(200)
    model = UMT5Encoder.from_state_dict(hf_state_dict(ref_model))
    with torch.no_grad():
        model.get_parameter(key).view(-1)[5] += 0.5  # one entry: a uniform shift of a bias cancels
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        err = (model.encode(ids, mask) - ref).abs().max()
    print(f"perturbed {key}: max abs err {err:.3e}")
    assert err > 1e-3


# --- keys and detection -----------------------------------------------------------------

def xxl_shapes() -> dict[str, tuple[int, ...]]:
    cfg = transformers.UMT5Config(vocab_size=256384, d_model=4096, num_layers=24, num_heads=64, d_kv=64,
                                  d_ff=10240, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_detect_xxl_both_layouts():
    shapes = xxl_shapes()
    assert detect_t5_config(shapes) == UMT5_XXL
    official = {t5_key_map(shapes)[k]: s for k, s in shapes.items() if k in t5_key_map(shapes)}
    assert detect_t5_config({"model." + k: s for k, s in official.items()}) == UMT5_XXL


def test_key_map_keeps_fp8_extras_and_drops_foreign_keys():
    sd = hf_state_dict(hf_model(50))
    sd.update({"spiece_model": torch.zeros(7, dtype=torch.uint8), "scaled_fp8": torch.zeros(0),
               "encoder.block.0.layer.0.SelfAttention.q.scale_weight": torch.ones(()),
               "encoder.block.1.layer.1.DenseReluDense.wo.scale_input": torch.ones(())})
    mapping = t5_key_map(sd)
    assert "spiece_model" not in mapping and "scaled_fp8" not in mapping
    assert mapping["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] == "blocks.0.attn.q.scale_weight"
    assert mapping["encoder.block.1.layer.1.DenseReluDense.wo.scale_input"] == "blocks.1.ffn.fc2.scale_input"
    assert list(mapping.values()).count("token_embedding.weight") == 1  # shared + embed_tokens
    assert detect_t5_config({k: v.shape for k, v in sd.items()}) == UMT5Config(vocab_size=50, **TINY)
    converted = convert_t5_state_dict(sd)
    assert set(converted) - set(UMT5Encoder(UMT5Config(vocab_size=50, **TINY)).state_dict()) == {
        "blocks.0.attn.q.scale_weight", "blocks.1.ffn.fc2.scale_input"}


def test_rejects_other_models():
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="not a UMT5 text encoder"):
        detect_t5_config({"text_model." + k: v.shape for k, v in clip_l.state_dict().items()})
    dit = {"patch_embedding.weight": (16, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": (16, 16),
           "blocks.0.cross_attn.k.weight": (16, 16), "head.head.weight": (64, 16)}
    with pytest.raises(ValueError, match="not a UMT5 text encoder"):
        detect_t5_config(dit)
    t5_v11 = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=50, feed_forward_proj="gated-gelu", **TINY))
    with pytest.raises(ValueError, match="T5 v1.1"):
        detect_t5_config({k: v.shape for k, v in t5_v11.state_dict().items()})


def test_every_tensor_shape_is_checked_from_the_header():
    """The Comfy-Org fp8 layout (transformers names, scale_weight extras, spiece_model): one
    wrong block tensor anywhere is refused by name, before any weight is read."""
    import factory

    from wanfit.wan.checkpoint import CheckpointError
    from wanfit.wan.t5 import verify_t5

    shapes = {k: tuple(v.shape) for k, v in factory._t5().items()}
    assert verify_t5(shapes, "umt5.safetensors") == factory.T5
    shapes["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] = (128, 60)
    with pytest.raises(CheckpointError, match=r"^umt5\.safetensors: tensor encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_0\.weight has shape "
                                              r"\[128, 60\], but a UMT5 encoder \(2 layers, width 64\) needs \[128, 64\]"):
        verify_t5(shapes, "umt5.safetensors")


def test_a_garbage_embedded_tokenizer_is_named_not_sentencepiece_text(tmp_path):
    import factory

    from wanfit.optim.loading import load_text_encoder
    from wanfit.wan.checkpoint import CheckpointError, open_checkpoint

    sd = factory._t5()
    sd["spiece_model"] = torch.frombuffer(bytearray(b"not a sentencepiece model at all" * 4), dtype=torch.uint8)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"^umt5_xxl_fp8_e4m3fn_scaled\.safetensors: its sentencepiece "
                                              r"tokenizer \(128 bytes\) is not a valid sentencepiece model$"):
        load_text_encoder(open_checkpoint(path, expect="t5"))
