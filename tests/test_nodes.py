"""The node functions in-process (ComfyUI's hooks replaced): caching, conditioning layout,
model / embeds pairing and the two-sampler chain equal to one Two-Pass run."""
from __future__ import annotations

import pytest
import torch

import factory
from wanfit.nodes import comfy, decode, encode, load, sample, stages
from wanfit.nodes.types import SOLVER_STATE_KEY

NAMES = ["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
         "wan2.1_t2v_1.3B_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors",
         "clip_vision_h.safetensors"]


class _Bar:
    def __init__(self, total):
        self.calls = []

    def update_absolute(self, value, total=None):
        self.calls.append((value, total))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return factory.write_models(root, NAMES)


@pytest.fixture(autouse=True)
def no_comfy(monkeypatch, models):
    folder = {name: path for name, path in models.items()}
    bars = []
    monkeypatch.setattr(comfy, "compute_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(comfy, "free_memory_cache", lambda: None)
    monkeypatch.setattr(comfy, "throw_if_interrupted", lambda: None)
    monkeypatch.setattr(comfy, "progress_bar", lambda total: bars.append(_Bar(total)) or bars[-1])
    monkeypatch.setattr(comfy, "list_models", lambda kind: sorted(folder))
    monkeypatch.setattr(comfy, "model_path", lambda kind, name: str(folder[name]))
    yield bars
    stages.release_model()


def _model(name, **kw):
    return load.WanFitModelLoader().load(name, compute_dtype="fp32", **kw)[0]


def _text():
    te = load.WanFitTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors")[0]
    return encode.WanFitTextEncode().encode(te, "a cat walks", "blurry")[0]


def _image_embeds(frames=5, size=32):
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    image = torch.rand(1, 40, 56, 3)
    return encode.WanFitImageToVideoEncode().encode(vae, image, size, size, frames)[0]


def test_text_embeds_are_cached_per_prompt():
    encode._TEXT_CACHE.clear()
    te = load.WanFitTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors")[0]
    node = encode.WanFitTextEncode()
    before = encode.ENCODE_CALLS["count"]
    a = node.encode(te, "a cat walks", "blurry")[0]
    assert a.positive.shape == (1, 512, factory.TEXT_DIM)
    assert encode.ENCODE_CALLS["count"] == before + 1
    b = node.encode(te, "a cat walks", "blurry")[0]
    assert encode.ENCODE_CALLS["count"] == before + 1, "same prompts re-encoded"
    assert torch.equal(a.positive, b.positive) and not torch.equal(a.positive, a.negative)
    node.encode(te, "a dog runs", "blurry")
    assert encode.ENCODE_CALLS["count"] == before + 2
    for i in range(encode.TEXT_CACHE_SIZE + 3):
        encode._TEXT_CACHE[("x", i)] = torch.zeros(1)
    node.encode(te, "a cat walks", "blurry")
    assert len(encode._TEXT_CACHE) <= encode.TEXT_CACHE_SIZE


def test_i2v_conditioning_layout():
    embeds = _image_embeds(frames=9, size=32)
    assert embeds.y.shape == (1, 4 + 16, 3, 4, 4)
    mask = embeds.y[0, :4]
    assert torch.all(mask[:, 0] == 1) and torch.all(mask[:, 1:] == 0)
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    flf = encode.WanFitImageToVideoEncode().encode(vae, torch.rand(1, 32, 32, 3), 32, 32, 9,
                                                   end_image=torch.rand(1, 32, 32, 3))[0]
    # official flf2v: only the last pixel frame is known, the 4th of the last latent frame's group
    assert torch.all(flf.y[0, 3, -1] == 1) and torch.all(flf.y[0, :3, -1] == 0) and torch.all(flf.y[0, :4, 1] == 0)


def test_fit_image_center_crops():
    image = torch.zeros(1, 20, 40, 3)
    image[:, :, 10:30] = 1.0
    out = encode.fit_image(image, 16, 16)
    assert out.shape == (3, 16, 16)
    assert torch.allclose(out, torch.ones_like(out))  # only the bright middle survives the crop


def test_size_validation_messages():
    assert encode.WanFitEmptyEmbeds.VALIDATE_OWN(width=832, height=480, frames=81) is True
    assert "4n+1" in encode.WanFitEmptyEmbeds.VALIDATE_OWN(width=832, height=480, frames=80)
    assert "multiples of 16" in encode.WanFitImageToVideoEncode.VALIDATE_OWN(width=840, height=480, frames=81)
    assert "multiples of 32" in encode.check_size(48, 32, 5, unit=32)
    assert encode.WanFitEmptyEmbeds.VALIDATE_OWN(width=None, height=480, frames=81) is True  # linked
    with pytest.raises(ValueError, match="4n\\+1"):
        encode.WanFitEmptyEmbeds().embeds(32, 32, 6)


def test_loader_options_and_file_validation(models, tmp_path):
    handle = _model(NAMES[0], weight_dtype="fp8_e4m3fn", attention="sdpa")
    assert handle.config.model_type == "i2v" and handle.weight_format == "fp8_e4m3fn"
    inputs = load.WanFitModelLoader.INPUT_TYPES()["required"]
    assert inputs["attention"][0][:1] == ["auto"] and "sdpa" in inputs["attention"][0]
    assert inputs["compute_dtype"][0] == ["bf16", "fp16", "fp32"]
    assert load.WanFitTextEncoderLoader.VALIDATE_OWN("umt5_xxl_fp8_e4m3fn_scaled.safetensors") is True
    msg = load.WanFitTextEncoderLoader.VALIDATE_OWN("wan_2.1_vae.safetensors")
    assert "UMT5" in msg and "VAE" in msg
    assert "not found" in load.WanFitVAELoader.VALIDATE_OWN("nope.safetensors")


def test_model_loader_validation_rejects_an_unsupported_dit_variant(monkeypatch, models, tmp_path):
    """A DiT with extra modules (here a VACE-style one) passes the family check but not
    detection: refused at validation, from the header alone."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(models[NAMES[2]]))
    sd["vace_blocks.0.before_proj.weight"] = torch.zeros(4, 4)
    path = tmp_path / "wan2.1_vace_1.3B.safetensors"
    save_file(sd, str(path))
    monkeypatch.setattr(comfy, "list_models", lambda kind: [path.name])
    monkeypatch.setattr(comfy, "model_path", lambda kind, name: str(path))
    msg = load.WanFitModelLoader.VALIDATE_OWN(path.name)
    assert msg is not True and path.name in msg and "VACE" in msg


def test_t2v_model_with_i2v_embeds_is_a_clear_error():
    with pytest.raises(ValueError, match="text-to-video.*Image-to-Video Encode"):
        sample.WanFitSampler().run(_model(NAMES[2]), _text(), _image_embeds(), 2, 3.0, 5.0, 0, "unipc", 0, 2,
                                   True, False)
    empty = encode.WanFitEmptyEmbeds().embeds(32, 32, 5)[0]
    with pytest.raises(ValueError, match="image-to-video.*Empty Embeds"):
        sample.WanFitSampler().run(_model(NAMES[0]), _text(), empty, 2, 3.0, 5.0, 0, "unipc", 0, 2, True, False)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_two_samplers_equal_one_two_pass_run(no_comfy, solver):
    text, embeds = _text(), _image_embeds(frames=5, size=32)
    high, low = _model(NAMES[0]), _model(NAMES[1])
    steps, k, seed = 4, 2, 7
    s = sample.WanFitSampler()
    a = s.run(high, text, embeds, steps, 3.5, 5.0, seed, solver, 0, k, True, True)[0]
    assert SOLVER_STATE_KEY in a
    b = s.run(low, text, embeds, steps, 3.5, 5.0, seed, solver, k, steps, False, False, latent=a)[0]
    assert stages._LOADED["key"][0] == low.key  # the high expert was released first
    two = sample.WanFitTwoPassSampler().run(high, low, text, embeds, steps, 3.5, 3.5, 5.0, seed, solver,
                                            "step", k, 0.0)[0]
    assert b["samples"].shape == (1, 16, 2, 4, 4)
    torch.testing.assert_close(b["samples"], two["samples"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a["samples"], b["samples"])
    bar = no_comfy[-1]
    assert [v for v, _ in bar.calls] == [1, 2, 3, 4]  # the Two-Pass bar runs over all steps


def test_boundary_switch_and_decode():
    text, embeds = _text(), _image_embeds(frames=5, size=32)
    high, low = _model(NAMES[0]), _model(NAMES[1])
    out = sample.WanFitTwoPassSampler().run(high, low, text, embeds, 3, 3.5, 3.5, 5.0, 1, "unipc",
                                            "boundary", 0, 0.0)[0]
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    frames = decode.WanFitVAEDecode().decode(vae, out)[0]
    assert frames.shape == (5, 32, 32, 3) and 0 <= frames.min() and frames.max() <= 1


def test_cancel_releases_the_model(monkeypatch):
    def cancel():
        raise KeyboardInterrupt("cancelled")
    monkeypatch.setattr(comfy, "throw_if_interrupted", cancel)
    empty = encode.WanFitEmptyEmbeds().embeds(32, 32, 5)[0]
    with pytest.raises(KeyboardInterrupt):
        sample.WanFitSampler().run(_model(NAMES[2]), _text(), empty, 3, 3.0, 5.0, 0, "unipc", 0, 3, True, False)
    assert stages._LOADED["model"] is None


def test_ti2v_start_image_is_the_first_latent_frame(models, tmp_path, monkeypatch):
    extra = factory.write_models(tmp_path, ["wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors"])
    folder = {**models, **extra}
    monkeypatch.setattr(comfy, "list_models", lambda kind: sorted(folder))
    monkeypatch.setattr(comfy, "model_path", lambda kind, name: str(folder[name]))
    vae = load.WanFitVAELoader().load("wan2.2_vae.safetensors")[0]
    with pytest.raises(ValueError, match="multiples of 32"):
        encode.WanFitImageToVideoEncode().encode(vae, torch.rand(1, 48, 48, 3), 48, 48, 5)
    embeds = encode.WanFitImageToVideoEncode().encode(vae, torch.rand(1, 40, 40, 3), 32, 32, 9)[0]
    assert embeds.mode == "ti2v" and embeds.first_latent.shape == (1, 48, 1, 2, 2) and embeds.y is None
    ti2v = _model("wan2.2_ti2v_5B_fp16.safetensors")
    out = sample.WanFitSampler().run(ti2v, _text(), embeds, 2, 5.0, 5.0, 3, "unipc", 0, 2, True, False)[0]
    from wanfit.nodes.types import from_comfy_latent
    latent = from_comfy_latent(out["samples"])
    assert latent.shape == (1, 48, 3, 2, 2)
    torch.testing.assert_close(latent[:, :, :1], embeds.first_latent, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="is text-to-video, but its image embeds come from WanFit Image-to-Video"):
        sample.WanFitSampler().run(_model(NAMES[2]), _text(), embeds, 2, 5.0, 5.0, 3, "unipc", 0, 2, True, False)
    frames = decode.WanFitVAEDecode().decode(vae, out)[0]
    assert frames.shape == (9, 32, 32, 3)


def test_decode_node_equals_the_vae_decode():
    """Chunk by chunk off the device, the node's frames are exactly WanVAE.decode's."""
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    latent = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    frames = decode.WanFitVAEDecode().decode(vae, {"samples": latent})[0]
    from wanfit.nodes.types import from_comfy_latent
    from wanfit.optim import loading
    model = loading.load_vae(vae.ckpt, torch.float32, "cpu")
    x = from_comfy_latent(latent)
    video = torch.cat([model.decode(x[i:i + 1]) for i in range(2)])  # [B, 3, F, H, W]
    expected = ((video.permute(0, 2, 3, 4, 1) + 1) / 2).clamp(0, 1).flatten(0, 1)
    assert frames.shape == (2 * 9, 32, 48, 3) and torch.equal(frames, expected)


def test_encoders_run_where_their_stage_says(monkeypatch):
    """UMT5 asks ``stage_device`` for its weights + working memory, the VAE asks
    ``vae_stage_device`` (encode, then decode) and runs in the tiling it answers."""
    from wanfit.optim import loading, planner
    from wanfit.optim.tiling import Tiling, TilingOptions

    calls, tilings = [], []

    def record(name, weight_bytes, work_bytes):
        calls.append((name.split(" ")[0], weight_bytes, work_bytes))
        return torch.device("cpu")

    def record_vae(vae, width, height, encode, options):
        calls.append(("VAE", width, height, encode, options))
        return torch.device("cpu"), Tiling(32, 32, 16)

    real = decode.vae_tiling.tiled_decode
    monkeypatch.setattr(stages, "stage_device", record)
    monkeypatch.setattr(stages, "vae_stage_device", record_vae)
    monkeypatch.setattr(decode.vae_tiling, "tiled_decode",
                        lambda model, x, tiles, **kw: tilings.append(tiles) or real(model, x, tiles, **kw))
    encode._TEXT_CACHE.clear()
    _text()
    embeds = _image_embeds(frames=5, size=32)
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    out = sample.WanFitSampler().run(_model(NAMES[0]), _text(), embeds, 2, 3.0, 5.0, 0, "unipc", 0, 2,
                                     True, False)[0]
    manual = TilingOptions("manual", 32, 16)
    decode.WanFitVAEDecode().decode(vae, out, manual)
    te = load.WanFitTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors")[0]
    assert [c[0] for c in calls] == ["UMT5", "VAE", "VAE"]
    assert calls[0][1:] == (loading.loaded_bytes(te, torch.float32), planner.encoder_work("t5"))
    assert calls[1][1:] == (32, 32, True, TilingOptions())  # unconnected: auto
    assert calls[2][1:] == (32, 32, False, manual)
    assert tilings == [Tiling(32, 32, 16)]


def test_decode_out_of_gpu_memory_reruns_on_the_cpu(monkeypatch):
    """A GPU stage that runs out of memory despite its estimate finishes on the CPU."""
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    latent = {"samples": torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))}
    expected = decode.WanFitVAEDecode().decode(vae, latent)[0]
    from wanfit.optim import loading
    real, devices = loading.load_vae, []

    def load_vae(ckpt, dtype, device):
        devices.append(torch.device(device).type)
        if torch.device(device).type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(ckpt, dtype, device)
    monkeypatch.setattr(stages, "vae_stage_device", lambda vae, w, h, encode, options:
                        (torch.device("cuda", 0), options.whole(w, h)))
    monkeypatch.setattr(loading, "load_vae", load_vae)
    assert torch.equal(decode.WanFitVAEDecode().decode(vae, latent)[0], expected)
    assert devices == ["cuda", "cpu"]


class _CancelAt:
    """throw_if_interrupted that counts its calls and raises from call ``at`` on (None: never)."""

    def __init__(self, at=None):
        self.at, self.calls = at, 0

    def __call__(self):
        self.calls += 1
        if self.at is not None and self.calls >= self.at:
            raise KeyboardInterrupt("cancelled")


def _text_stage():
    encode._TEXT_CACHE.clear()
    return _text()


def _clip_stage():
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    clip = load.WanFitCLIPVisionLoader().load("clip_vision_h.safetensors")[0]
    return encode.WanFitImageToVideoEncode().encode(vae, torch.rand(1, 32, 32, 3), 32, 32, 5, clip_vision=clip)[0]


def _decode_stage():
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    latent = {"samples": torch.randn(1, 16, 4, 4, 4)}  # ComfyUI layout: 4 latent frames, 13 video frames
    return decode.WanFitVAEDecode().decode(vae, latent)[0]


# stage -> (run it, the checks it must make at least: one per encoder layer or VAE chunk)
_STAGES = {
    "UMT5 per block": (_text_stage, factory.T5.num_layers),
    "VAE encode per chunk": (lambda: _image_embeds(frames=9), 3),  # 1 + 4 + 4 frames
    # the VAE encode's 2 chunks (1 + 4 frames), then CLIP's layers but the last (Wan uses the penultimate)
    "CLIP per layer": (_clip_stage, 2 + factory.CLIP.num_layers - 1),
    "VAE decode per chunk": (_decode_stage, 4),
}


@pytest.mark.parametrize("stage", list(_STAGES))
def test_cancel_is_honoured_inside_every_encoder_stage(monkeypatch, stage):
    """Cancel is checked between the layers (or chunks) of every stage, not only at its end:
    an interrupt at the second check stops the stage there, and the next job runs."""
    run, least = _STAGES[stage]
    counter = _CancelAt()
    monkeypatch.setattr(comfy, "throw_if_interrupted", counter)
    run()
    assert counter.calls >= least, f"{stage}: {counter.calls} cancel checks"
    cancel = _CancelAt(at=counter.calls - 1)  # the stage's last check but one: mid-way through
    monkeypatch.setattr(comfy, "throw_if_interrupted", cancel)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert cancel.calls == counter.calls - 1
    assert stages._LOADED["model"] is None
    monkeypatch.setattr(comfy, "throw_if_interrupted", lambda: None)
    run()  # the next job runs


def test_end_image_rules_hold_when_the_node_runs(models, tmp_path, monkeypatch):
    """The /prompt checks (frames >= 5 with an end image; none with the Wan 2.2 VAE) run again
    in the node, before the VAE loads, for graphs that never went through /prompt."""
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    image = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match="frames 1: a video with an end_image needs at least 5 frames"):
        encode.WanFitImageToVideoEncode().encode(vae, image, 32, 32, 1, end_image=image)
    assert encode.WanFitImageToVideoEncode().encode(vae, image, 32, 32, 1)[0].y.shape[2] == 1  # one frame alone is fine
    extra = factory.write_models(tmp_path, ["wan2.2_vae.safetensors"])
    monkeypatch.setattr(comfy, "model_path", lambda kind, name: str({**models, **extra}[name]))
    monkeypatch.setattr(comfy, "list_models", lambda kind: sorted({**models, **extra}))
    vae22 = load.WanFitVAELoader().load("wan2.2_vae.safetensors")[0]
    with pytest.raises(ValueError, match="takes a start image only"):
        encode.WanFitImageToVideoEncode().encode(vae22, image, 32, 32, 5, end_image=image)
