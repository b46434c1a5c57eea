"""LoRA: every key format merges to ``W + s * scale * B @ A`` (the factory computes the
expected delta from the tensors it wrote and each format's own scaling rule); a PEFT file
made with ``peft`` on diffusers' WanTransformer3DModel gives diffusers' output; strength 0
is no LoRA bit for bit; merged and unmerged agree; unmerged factors travel through block
swap; a held model changes LoRA without reading its block weights again."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import factory
from wanfit.optim import fp8, loading, lora
from wanfit.optim.engine import SwapSettings, prepare_dit
from wanfit.optim.offload import BlockLayout, RecordingBackend, state_tensors
from wanfit.wan.checkpoint import open_checkpoint
from wanfit.wan.denoise import Conditioning, make_denoiser

FP8_FILE = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
STRENGTH = 0.7
# merged vs unmerged in float32: the same sums in another order
FP32_TOL = 1e-5
# bf16 compute on fp8 weights: merged requantises W + delta, unmerged quantises W alone;
# both within fp8 e4m3's rounding (2^-4 relative per weight) of the float32 model
FP8_TOL = 0.08


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    fp16 = root / "wan_i2v_tiny_fp16.safetensors"
    save_file({k: v.to(torch.float16) for k, v in factory.dit_state_dict("i2v", seed=5).items()}, str(fp16))
    fp8_path = factory.write_models(root / "models", [FP8_FILE])[FP8_FILE]
    loras = {fmt: root / f"{fmt}.safetensors" for fmt in factory.LORA_FORMATS}
    expected = {fmt: factory.write_lora(path, fmt, seed=i) for i, (fmt, path) in enumerate(loras.items())}
    return {"fp16": open_checkpoint(fp16), "fp8": open_checkpoint(fp8_path), "loras": loras,
            "expected": expected, "root": root}


def _open(files, fmt, ckpt="fp16", **kw):
    return lora.open_lora(files["loras"][fmt], files[ckpt].shapes, **kw)


def _step(prepared, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cond = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=gen), torch.randn(1, 20, 3, 4, 4, generator=gen))
    neg = Conditioning(torch.randn(1, 512, factory.TEXT_DIM, generator=gen), cond.y)
    denoise = make_denoiser(prepared.model, cond, neg, 3.5, run_blocks=prepared.run_blocks)
    with torch.inference_mode():
        return denoise(torch.randn(1, 16, 3, 4, 4, generator=gen), 0.9, 0)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------- key formats


def test_diffusers_names_match_diffusers_own_converter():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = factory.dit_state_dict("i2v", clip=True)
    converted = convert_wan_transformer_to_diffusers({k: torch.empty(0) for k in sd})
    ours = set()
    for key in sd:
        module, _, suffix = key.rpartition(".")
        ours.add(f"{lora.diffusers_name(module)}.{suffix}" if suffix in ("weight", "bias") else lora.diffusers_name(key))
    assert set(converted) == ours, sorted(set(converted) ^ ours)[:5]


@pytest.mark.parametrize("fmt", factory.LORA_FORMATS)
def test_every_format_merges_to_w_plus_s_ba(files, fmt):
    ckpt = files["fp16"]
    entry = lora.AppliedLora(_open(files, fmt), STRENGTH)
    prepared = prepare_dit(ckpt, "cpu", dtype=torch.float32, weight_format="fp32", loras=[(entry, "merged")])
    got = prepared.model.state_dict()
    base = {k: v.float() for k, v in load_file(str(ckpt.path)).items()}
    expected = files["expected"][fmt]
    assert set(expected) <= set(got) and entry.lora.deltas.keys() == expected.keys()
    for key, value in got.items():
        want = base[key].double() + STRENGTH * expected[key] if key in expected else base[key].double()
        err = (value.double() - want).abs().max().item()
        assert err <= 1e-6 * max(1.0, want.abs().max().item()), f"{fmt} {key}: {err:.3g}"
    print(f"{fmt}: {len(expected)} tensors patched ({', '.join(entry.lora.formats)})")


def test_scales_follow_each_format(files):
    """alpha / rank (lightx2v, kohya, bare), none (comfy, peft: 1), the diffusers metadata's
    lora_alpha / r with its rank and alpha patterns."""
    scales = {}
    for fmt in factory.LORA_FORMATS:
        deltas = _open(files, fmt).deltas
        scales[fmt] = {t: ds[0].scale for t, ds in deltas.items() if ds[0].low_rank}
    assert set(scales["lightx2v"].values()) == {2.0} and set(scales["kohya"].values()) == {0.5}
    assert set(scales["comfy"].values()) == set(scales["peft"].values()) == {1.0}
    d = scales["diffusers"]
    assert d["blocks.0.ffn.2.weight"] == 3.0  # rank_pattern: r 2, alpha 6
    assert d["blocks.1.cross_attn.o.weight"] == 0.25  # alpha_pattern: alpha 1, r 4
    assert d["blocks.0.self_attn.q.weight"] == 1.5


def test_peft_file_made_by_diffusers_gives_diffusers_output(files, tmp_path):
    """LoraConfig on a tiny diffusers WanTransformer3DModel (random A and B, a rank and an
    alpha pattern), saved by diffusers' save_lora_adapter; our merged model against
    diffusers running that adapter, and against a fresh diffusers model loading the file."""
    pytest.importorskip("peft")
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from peft import LoraConfig
    from test_model_parity import REL_TOL, compare, make_inputs, make_model, run_diffusers

    from wanfit.wan.model import WanConfig

    cfg = WanConfig("t2v", dim=128, ffn_dim=192, num_heads=1, num_layers=2, text_dim=32, freq_dim=32)  # head 128
    ours = make_model(cfg)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(base))

    def diffusers_model():
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps).eval()
        model.load_state_dict(convert_wan_transformer_to_diffusers(dict(ours.state_dict())), strict=True)
        return model

    torch.manual_seed(3)
    trained = diffusers_model()
    trained.add_adapter(LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"ffn.net.2": 2}, alpha_pattern={"to_out.0": 3.0},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out", "time_proj",
                        "linear_1", "linear_2"]))
    trained.save_lora_adapter(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"

    ckpt = open_checkpoint(base)
    entry = lora.AppliedLora(lora.open_lora(path, ckpt.shapes), 1.0)
    assert not entry.lora.unmatched and len(entry.lora.deltas) == 2 * 10 + 6  # 10 per block + embedders, head
    model = prepare_dit(ckpt, "cpu", dtype=torch.float32, weight_format="fp32", loras=[(entry, "merged")]).model
    inputs = make_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs)
    x = inputs["x"]
    context = torch.cat([inputs["context"], inputs["context"].new_zeros(2, cfg.text_len - 7, cfg.text_dim)], 1)
    with torch.no_grad():
        reference = trained(x, inputs["t"], context, return_dict=False)[0]
    compare("merged PEFT LoRA vs diffusers with the adapter", out, reference, REL_TOL)
    fresh = diffusers_model()
    fresh.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=None)
    with torch.no_grad():
        loaded = fresh(x, inputs["t"], context, return_dict=False)[0]
    compare("merged PEFT LoRA vs diffusers loading the file", out, loaded, REL_TOL)
    unmerged = prepare_dit(ckpt, "cpu", dtype=torch.float32, weight_format="fp32", loras=[(entry, "unmerged")]).model
    with torch.no_grad():
        compare("unmerged PEFT LoRA vs diffusers", unmerged(**inputs), reference, REL_TOL)
    # and the LoRA does something: without it the output is far off
    assert _rel(run_diffusers(cfg, ours.state_dict(), inputs), reference) > 100 * REL_TOL


# ----------------------------------------------------------------------------- fp8, strength 0, modes


def test_fp8_scaled_source_is_dequantised_patched_and_requantised(files):
    ckpt = files["fp8"]
    entry = lora.AppliedLora(_open(files, "lightx2v", "fp8"), 1.0)
    model = prepare_dit(ckpt, "cpu", dtype=torch.bfloat16, loras=[(entry, "merged")]).model
    stored = load_file(str(ckpt.path))
    expected = files["expected"]["lightx2v"]
    prefix = "model.diffusion_model."
    key = "blocks.1.ffn.0.weight"
    w = fp8.dequantize(stored[prefix + key], stored[prefix + "blocks.1.ffn.0.scale_weight"], torch.float32)
    # patched in float32, requantised with a fresh scale
    w8, scale = fp8.quantize_weight((w.double() + expected[key]).float(), torch.float8_e4m3fn)
    layer = model.blocks[1].ffn[0]
    assert isinstance(layer, fp8.FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight.view(torch.uint8), w8.view(torch.uint8))
    assert layer.scale_weight.item() == scale.item() != stored[prefix + "blocks.1.ffn.0.scale_weight"].item()
    assert layer.scale_input is None
    bias = "blocks.1.ffn.0.bias"
    want = (stored[prefix + bias].double() + expected[bias]).to(torch.bfloat16)
    assert torch.equal(model.state_dict()[bias], want)


def test_chunked_merge_equals_the_whole_tensor_formula(files, monkeypatch):
    """A few rows at a time (here 300 elements: many chunks per weight) equals one float32 sum;
    straight to fp8 it equals quantize_weight of that sum, bit for bit."""
    entry = lora.AppliedLora(_open(files, "lightx2v", "fp8"), 0.9)
    stored = load_file(str(files["fp8"].path))
    key = "blocks.0.ffn.2.weight"
    value, scale = stored["model.diffusion_model." + key], stored["model.diffusion_model.blocks.0.ffn.2.scale_weight"]
    patches = lora.patches_of([entry])[key]
    whole = fp8.dequantize(value, scale, torch.float32) + lora.delta_tensor(patches, value.shape)
    monkeypatch.setattr(lora, "CHUNK", 300)
    chunked = lora.merge(value, patches, torch.float32, scale)
    assert _rel(chunked, whole) < 1e-6
    w8, new_scale = lora.merge_fp8(value, patches, torch.float8_e4m3fn, scale)
    ref8, ref_scale = fp8.quantize_weight(chunked, torch.float8_e4m3fn)
    assert new_scale.item() == ref_scale.item()
    assert torch.equal(w8.view(torch.uint8), ref8.view(torch.uint8))
    bias = lora.merge(stored["model.diffusion_model.blocks.0.ffn.2.bias"], lora.patches_of([entry])["blocks.0.ffn.2.bias"])
    assert bias.shape == (factory.DIT["dim"],)


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_strength_zero_is_no_lora_exactly(files, mode):
    ckpt = files["fp8"]
    plain = prepare_dit(ckpt, "cpu", dtype=torch.float32)
    zero = lora.AppliedLora(_open(files, "lightx2v", "fp8"), 0.0)
    other = prepare_dit(ckpt, "cpu", dtype=torch.float32, loras=[(zero, mode)])
    for (k, a), (_, b) in zip(plain.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8)
                           if b.dtype.itemsize == 1 else b), k
    assert torch.equal(_step(plain), _step(other))


def test_merged_and_unmerged_agree(files):
    entries = [lora.AppliedLora(_open(files, "lightx2v"), 0.8), lora.AppliedLora(_open(files, "kohya"), -0.5)]
    outs = {}
    for mode in ("merged", "unmerged"):
        prepared = prepare_dit(files["fp16"], "cpu", dtype=torch.float32, weight_format="fp32",
                               loras=[(e, mode) for e in entries])
        outs[mode] = _step(prepared)
    plain = _step(prepare_dit(files["fp16"], "cpu", dtype=torch.float32, weight_format="fp32"))
    err, effect = _rel(outs["unmerged"], outs["merged"]), _rel(plain, outs["merged"])
    print(f"float32: merged vs unmerged rel err {err:.2e}; the LoRAs change the output by {effect:.2e}")
    assert err < FP32_TOL and effect > 100 * FP32_TOL

    entry = lora.AppliedLora(_open(files, "lightx2v", "fp8"), 1.0)
    reference = _step(prepare_dit(files["fp8"], "cpu", dtype=torch.float32, weight_format="fp32",
                                  loras=[(entry, "merged")]))
    for mode in ("merged", "unmerged"):
        out = _step(prepare_dit(files["fp8"], "cpu", dtype=torch.bfloat16, weight_format="fp8_e4m3fn_scaled",
                                loras=[(entry, mode)]))
        err = _rel(out, reference)
        print(f"fp8 weights, bf16 compute, {mode}: rel err {err:.2e} against the float32 merged model")
        assert err < FP8_TOL


def test_unmerged_hooks_fp8_linears_and_keep_fixed_deltas_merged(files):
    entry = lora.AppliedLora(_open(files, "lightx2v", "fp8"), 1.0)
    prepared = prepare_dit(files["fp8"], "cpu", dtype=torch.bfloat16, loras=[(entry, "unmerged")])
    model, unmerged = prepared.model, prepared.loras.unmerged
    q = model.blocks[0].self_attn.q
    assert isinstance(q, fp8.FP8Linear) and q.lora_down.shape == (factory.LORA_RANK, factory.DIT["dim"])
    assert "blocks.0.self_attn.q.lora_down" not in model.state_dict()  # not persistent: state dicts unchanged
    assert "time_projection.1" not in unmerged.layers and "head.head" not in unmerged.layers
    assert "text_embedding.0" in unmerged.layers
    stored = load_file(str(files["fp8"].path))
    # fixed deltas (norms, biases, modulation, the float32 head / time layers) were merged
    head = "head.head.weight"
    assert not torch.equal(model.state_dict()[head], stored["model.diffusion_model." + head].to(torch.bfloat16))
    mod = "blocks.1.modulation"
    want = (stored["model.diffusion_model." + mod].double() + files["expected"]["lightx2v"][mod]).to(torch.bfloat16)
    assert torch.equal(model.state_dict()[mod], want)
    unmerged.remove()
    assert not hasattr(q, "lora_down") and not q._forward_hooks


# ----------------------------------------------------------------------------- block swap, meta


def _uneven(files):
    """A rank-4 LoRA on block 1 only plus a rank-4 one on both: block layouts need padding."""
    path = files["root"] / "block1_only.safetensors"
    factory.write_lora(path, "comfy", seed=9, blocks={1})
    return [lora.AppliedLora(lora.open_lora(path, files["fp8"].shapes), 0.9),
            lora.AppliedLora(_open(files, "lightx2v", "fp8"), 1.1)]


@pytest.mark.parametrize("swap,prefetch", [(1, 1), (2, 0), (2, 1)])
def test_unmerged_with_block_swap_equals_resident(files, swap, prefetch):
    entries = _uneven(files)
    loras = [(e, "unmerged") for e in entries]
    expected = _step(prepare_dit(files["fp8"], "cpu", dtype=torch.float32, loras=loras))
    backend = RecordingBackend(lazy=True)
    prepared = prepare_dit(files["fp8"], backend, SwapSettings(swap, prefetch), dtype=torch.float32, loras=loras)
    layouts = [BlockLayout(state_tensors(b)).meta for b in prepared.model.blocks]
    assert layouts[0] == layouts[1]  # padded: block 0 carries zeros where only block 1 has the LoRA
    assert prepared.model.blocks[0].ffn[0].lora_down.shape[0] == 2 * factory.LORA_RANK
    assert torch.equal(_step(prepared), expected)
    stats = prepared.swap_stats()
    assert stats.transfers == swap and stats.block_bytes >= sum(prepared.loras.unmerged.block_bytes) // 2
    prepared.close()


def test_padding_adds_exact_zeros(files):
    entries = _uneven(files)
    padded = prepare_dit(files["fp8"], "cpu", dtype=torch.float32, loras=[(e, "unmerged") for e in entries])
    block0 = padded.model.blocks[0].ffn[0]
    own = factory.LORA_RANK  # block 0 has only the second LoRA's rank-4 factors
    assert torch.count_nonzero(block0.lora_down[own:]) == 0 and torch.count_nonzero(block0.lora_up[:, own:]) == 0
    merged = prepare_dit(files["fp8"], "cpu", dtype=torch.float32, loras=[(e, "merged") for e in entries])
    assert _rel(_step(padded), _step(merged)) < FP8_TOL


def test_unmerged_on_a_meta_model_counts_without_reading(files, monkeypatch):
    """What the memory planner calls: the factors' bytes per block and outside the blocks,
    on a meta model built with one block, no tensor read."""
    from wanfit.wan.detect import detect_dit_config
    from wanfit.wan.model import WanModel

    entries = _uneven(files)
    real = lora.attach_unmerged(prepare_dit(files["fp8"], "cpu", dtype=torch.bfloat16).model, entries, torch.bfloat16)
    monkeypatch.setattr(lora.LoraFile, "open", lambda self: pytest.fail("a meta model must not read the LoRA"))
    import dataclasses
    config = dataclasses.replace(detect_dit_config(files["fp8"].shapes), num_layers=1)
    with torch.device("meta"):
        meta = WanModel(config).to(torch.bfloat16)
    counted = lora.attach_unmerged(meta, entries, torch.bfloat16)
    dim, ffn = factory.DIT["dim"], factory.DIT["ffn_dim"]
    r = 2 * factory.LORA_RANK
    linears = 8 * (dim + dim) + (dim + ffn) * 2  # q k v o (self + cross), ffn.0 and ffn.2
    assert counted.block_bytes == [r * linears * 2] and real.block_bytes == [r * linears * 2] * 2
    assert counted.other_bytes == real.other_bytes > 0
    assert counted.activation_bytes(tokens=100, batch=2) == 100 * 2 * r * 2
    assert all(t.is_meta for layer in counted.layers.values() for t in (layer.lora_down, layer.lora_up))


# ----------------------------------------------------------------------------- held model


def test_a_held_model_changes_lora_without_reading_block_weights(files, monkeypatch):
    ckpt = files["fp8"]
    a = lora.AppliedLora(_open(files, "lightx2v", "fp8"), 1.0)
    b = lora.AppliedLora(_open(files, "kohya", "fp8"), 0.6)
    backend = RecordingBackend(lazy=True)
    prepared = prepare_dit(ckpt, backend, SwapSettings(1, 1), dtype=torch.float32, loras=[(a, "merged")])
    reads = []
    original = loading.LazyStateDict.__getitem__
    monkeypatch.setattr(loading.LazyStateDict, "__getitem__", lambda self, key: reads.append(key) or original(self, key))

    for wanted in ([lora.AppliedLora(a.lora, 0.5), b], [b], [], [a]):
        reads.clear()
        prepared.set_loras(wanted)
        got = _step(prepared)
        matrices = [k for k in reads if k.startswith("blocks.") and len(ckpt.shapes[k]) == 2]
        assert not matrices, f"block weights read again: {matrices[:3]}"
        # only what fixed deltas touch: 1-D tensors, the float32 time / head layers (at 14B: 2.6 %
        # of an fp8 expert file at most, 364 MiB, when a LoRA touches all of them)
        small = [k for k in reads if len(ckpt.shapes[k]) == 1 or k.endswith(".modulation")
                 or k.removesuffix(".weight") in lora.FLOAT32_LINEARS]
        assert small == reads, sorted(set(reads) - set(small))
        monkeypatch.setattr(loading.LazyStateDict, "__getitem__", original)
        fresh = _step(prepare_dit(ckpt, "cpu", dtype=torch.float32, loras=[(w, "merged") for w in wanted]))
        monkeypatch.setattr(loading.LazyStateDict, "__getitem__",
                            lambda self, key: reads.append(key) or original(self, key))
        print(f"{[(w.lora.name, w.strength) for w in wanted]}: re-read {len(reads)} small tensors; "
              f"vs a fresh merged load rel err {_rel(got, fresh):.2e}")
        assert _rel(got, fresh) < FP8_TOL
    # back to the set it was loaded with: nothing runs unmerged, exactly the fresh load
    assert prepared.loras.unmerged is None
    assert torch.equal(got, fresh)
    prepared.close()


# ----------------------------------------------------------------------------- bad files


def test_unmatched_keys_get_one_warning(files, tmp_path, caplog):
    sd = load_file(str(files["loras"]["lightx2v"]))
    sd.update({f"diffusion_model.vace_blocks.{i}.proj.lora_down.weight": torch.zeros(4, 8) for i in range(5)})
    sd["diffusion_model.something_else"] = torch.zeros(1)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with caplog.at_level(logging.WARNING, "WanFit"):
        lora.open_lora(path, files["fp16"].shapes, "the tiny model")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "6 of its" in warnings[0] and "extra.safetensors" in warnings[0]
    assert warnings[0].count("vace_blocks") + warnings[0].count("something_else") == 3


def test_a_lora_for_another_model_names_what_it_is_for(tmp_path):
    """Shapes of a Wan 2.1 1.3B LoRA on a 14B model: the names match, the shapes do not."""
    from wanfit.wan.model import PRESETS, WanModel

    def shapes(name):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in WanModel(PRESETS[name]).state_dict().items()}

    small = shapes("Wan2.1 T2V 1.3B")
    sd = {}
    for i in range(30):
        for layer in ("self_attn.q", "ffn.0"):
            out, cin = small[f"blocks.{i}.{layer}.weight"]
            sd[f"diffusion_model.blocks.{i}.{layer}.lora_down.weight"] = torch.zeros(1, cin)
            sd[f"diffusion_model.blocks.{i}.{layer}.lora_up.weight"] = torch.zeros(out, 1)
    path = tmp_path / "wan21_1.3b_style.safetensors"
    save_file(sd, str(path))
    with pytest.raises(lora.LoraError) as err:
        lora.open_lora(path, shapes("Wan2.2 I2V-A14B expert"), "wan2.2_i2v_high_noise_14B")
    message = str(err.value)
    print(message)
    assert message.startswith("wan21_1.3b_style.safetensors:")
    assert "Wan2.1 T2V 1.3B" in message and "width 1536" in message and "(width 5120)" in message
    assert lora.open_lora(path, small).max_rank == 1  # and it fits the model it was made for

    sd = {"diffusion_model.other_net.0.lora_down.weight": torch.zeros(1, 4),
          "diffusion_model.other_net.0.lora_up.weight": torch.zeros(4, 1)}
    save_file(sd, str(path))
    with pytest.raises(lora.LoraError, match="none of its 2 keys names a tensor"):
        lora.open_lora(path, small)


def test_files_that_are_not_loras_are_refused(files, tmp_path):
    pickle = tmp_path / "lora.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(lora.LoraError, match="safetensors LoRAs only"):
        lora.read_lora_header(pickle)
    with pytest.raises(lora.LoraError, match="not a LoRA"):
        lora.read_lora_header(files["fp16"].path)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(files["loras"]["comfy"].read_bytes()[:-100])
    with pytest.raises(lora.LoraError, match="truncated"):
        lora.read_lora_header(truncated)
