"""Lazy loading from the tiny factory files: formats kept or converted, errors name the file."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import factory
from wanfit.optim import fp8, loading
from wanfit.wan.checkpoint import CheckpointError, open_checkpoint
from wanfit.wan.model import WanModel
from wanfit.wan.detect import detect_dit_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return factory.write_models(tmp_path_factory.mktemp("models"))


def _inputs(config, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, config.out_dim, 3, 4, 4, generator=gen)
    y = torch.randn(1, config.in_dim - config.out_dim, 3, 4, 4, generator=gen) if config.in_dim > config.out_dim else None
    context = torch.randn(1, 512, config.text_dim, generator=gen)
    return dict(x=x, t=torch.tensor([700.0]), context=context, y=y)


def _dequantized_reference(path) -> WanModel:
    """The file's weights dequantised by hand (w8 * scale) into a plain float32 model."""
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(path)).items()}
    sd.pop("scaled_fp8")
    ref_sd = {}
    for key, value in sd.items():
        if key.endswith(".scale_weight"):
            continue
        scale = sd.get(key.removesuffix("weight") + "scale_weight")
        ref_sd[key] = value.float() * scale if scale is not None else value.float()
    model = WanModel(detect_dit_config({k: v.shape for k, v in ref_sd.items()}))
    model.load_state_dict(ref_sd)
    return model.eval()


def test_fp8_scaled_file_kept_fp8_equals_dequantized_reference(models):
    path = models["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"]
    model = loading.load_dit(open_checkpoint(path), dtype=torch.float32)
    q = model.blocks[0].self_attn.q
    assert isinstance(q, fp8.FP8Linear) and q.weight.dtype == torch.float8_e4m3fn
    assert not isinstance(model.head.head, fp8.FP8Linear) and model.head.head.weight.dtype == torch.float32
    ref = _dequantized_reference(path)
    with torch.no_grad():
        out, expected = model(**_inputs(model.config)), ref(**_inputs(model.config))
    err = (out - expected).abs().max().item()
    print(f"fp8 scaled file vs dequantised reference: max abs error {err:.3e}")
    assert err <= 1e-6 * expected.abs().max().item()


def test_bf16_format_dequantizes_everything(models):
    path = models["wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"]
    model = loading.load_dit(open_checkpoint(path), weight_format="bf16")
    assert not any(isinstance(m, fp8.FP8Linear) for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("fmt,dtype,scaled", [("fp8_e4m3fn_scaled", torch.float8_e4m3fn, True),
                                              ("fp8_e4m3fn", torch.float8_e4m3fn, False),
                                              ("fp8_e5m2", torch.float8_e5m2, True)])
def test_quantize_on_load(models, fmt, dtype, scaled):
    path = models["wan2.1_t2v_1.3B_fp16.safetensors"]
    model = loading.load_dit(open_checkpoint(path), dtype=torch.float32, weight_format=fmt)
    layers = [m for m in model.modules() if isinstance(m, fp8.FP8Linear)]
    assert len(layers) == model.config.num_layers * 10  # self q k v o, cross q k v o, ffn.0, ffn.2
    assert all(m.weight.dtype == dtype for m in layers)
    assert all((float(m.scale_weight) != 1.0) == scaled for m in layers)
    reference = loading.load_dit(open_checkpoint(path), dtype=torch.float32, weight_format="fp32")
    with torch.no_grad():
        out, expected = model(**_inputs(model.config)), reference(**_inputs(model.config))
    rel = ((out - expected).abs().max() / expected.abs().max()).item()
    print(f"{fmt}: relative error vs fp32 {rel:.3e}")
    assert rel < 0.1


def test_text_encoder_and_embedded_tokenizer(models):
    encoder, tokenizer = loading.load_text_encoder(
        open_checkpoint(models["umt5_xxl_fp8_e4m3fn_scaled.safetensors"]), dtype=torch.float32)
    assert isinstance(encoder.blocks[0].attn.q, fp8.FP8Linear)
    ids, mask = tokenizer(["a cat walks over the lake", "a dog"])
    context, lengths = encoder.encode_padded(ids, mask)
    assert context.shape == (2, 512, factory.TEXT_DIM)
    assert lengths.tolist() == mask.sum(1).tolist()
    assert context[1, lengths[1]:].abs().max() == 0


def test_text_encoder_without_tokenizer_is_named(models, tmp_path):
    sd = load_file(str(models["umt5_xxl_fp8_e4m3fn_scaled.safetensors"]))
    del sd["spiece_model"]
    path = tmp_path / "umt5_no_tokenizer.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="umt5_no_tokenizer.safetensors"):
        loading.load_text_encoder(open_checkpoint(path))


def test_missing_tensor_is_named(models, tmp_path):
    sd = load_file(str(models["wan2.1_t2v_1.3B_fp16.safetensors"]))
    del sd["blocks.1.ffn.2.bias"]
    path = tmp_path / "damaged.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"damaged.safetensors: missing 1 tensors .*blocks.1.ffn.2.bias"):
        loading.load_dit(open_checkpoint(path))


def test_unknown_weight_format(models):
    with pytest.raises(ValueError, match="weight format 'int4'"):
        loading.load_dit(open_checkpoint(models["wan2.1_t2v_1.3B_fp16.safetensors"]), weight_format="int4")


@pytest.mark.parametrize("name,z", [("wan_2.1_vae.safetensors", 16), ("wan2.2_vae.safetensors", 48)])
def test_vae_loads_and_round_trips_shapes(models, name, z):
    vae = loading.load_vae(open_checkpoint(models[name]))
    s = vae.config.spatial_compression
    video = torch.rand(1, 3, 5, 2 * s, 2 * s) * 2 - 1
    latent = vae.encode(video)
    assert latent.shape == (1, z, 2, 2, 2)
    assert vae.decode(latent).shape == video.shape


def test_placement_per_tensor(models):
    """A name -> device map is asked for every tensor the model holds, fp8 weights included
    (with no GPU here every answer is the CPU; the swap engine answers per block)."""
    asked = []

    def place(name):
        asked.append(name)
        return "cpu"

    model = loading.load_dit(open_checkpoint(models["wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"]),
                             dtype=torch.float32, device=place)
    weights = {k for k, t in model.state_dict().items() if not k.endswith((".scale_weight", ".scale_input"))}
    assert set(asked) == weights
    assert model.blocks[0].self_attn.q.weight.dtype == torch.float8_e4m3fn  # fp8 kept on the way


def test_each_tensor_is_read_from_the_file_once(tmp_path, monkeypatch):
    """Checking which tensors exist must not read them (a Mapping's default ``in`` does)."""
    import factory

    from wanfit.optim import loading
    from wanfit.wan.checkpoint import open_checkpoint

    name = "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    ckpt = open_checkpoint(factory.write_models(tmp_path, [name])[name], expect="dit")
    reads = []
    real_open = loading.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self._inner = real_open(*args, **kwargs)

        def __enter__(self):
            self._handle = self._inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self._inner.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self._handle.get_tensor(key)

    monkeypatch.setattr(loading, "safe_open", Counting)
    loading.load_dit(ckpt, dtype=torch.float32)
    assert reads and len(reads) == len(set(reads)), [k for k in set(reads) if reads.count(k) > 1][:3]
