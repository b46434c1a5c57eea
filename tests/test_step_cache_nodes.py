"""The step-cache nodes in-process (ComfyUI's hooks replaced): settings into the samplers, two
chained Samplers equal to one Two-Pass run with the same skips, the report in the LATENT's
telemetry and the log, short schedules, calibrations saved to the user directory and listed."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

import factory
from wanfit.nodes import cache, comfy, encode, load, sample, stages

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors",
         "wan2.1_t2v_1.3B_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"]
HIGH, LOW, T2V = NAMES[:3]
REAL_USER_DIRECTORY = comfy.user_directory


class _Bar:
    def __init__(self, total):
        pass

    def update_absolute(self, value, total=None):
        pass


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return factory.write_models(tmp_path_factory.mktemp("models"), NAMES)


@pytest.fixture(autouse=True)
def no_comfy(monkeypatch, models, tmp_path):
    monkeypatch.setattr(comfy, "compute_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(comfy, "free_memory_cache", lambda: None)
    monkeypatch.setattr(comfy, "throw_if_interrupted", lambda: None)
    monkeypatch.setattr(comfy, "progress_bar", _Bar)
    monkeypatch.setattr(comfy, "list_models", lambda kind: sorted(models))
    monkeypatch.setattr(comfy, "model_path", lambda kind, name: str(models[name]))
    monkeypatch.setattr(comfy, "user_directory", lambda: str(tmp_path / "user"))
    yield tmp_path / "user"
    stages.release_model()


def _model(name):
    return load.WanFitModelLoader().load(name, compute_dtype="fp32")[0]


def _text():
    te = load.WanFitTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors")[0]
    return encode.WanFitTextEncode().encode(te, "a cat walks", "blurry")[0]


def _i2v_embeds():
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    return encode.WanFitImageToVideoEncode().encode(vae, torch.rand(1, 40, 56, 3), 32, 32, 5)[0]


def _mag(**kw):
    args = dict(threshold=-1.0, K=-1, retention_ratio=-1.0, ratios="wan2.2_i2v_A14B", residual_device="compute",
                allow_short_schedules=False)
    return cache.WanFitMagCache().make(**{**args, **kw})[0]


def _skips(latent):
    return latent[sample.TELEMETRY_KEY]["step_cache"]["skipped_steps"]


def test_chained_samplers_equal_the_two_pass_sampler_with_the_same_skips():
    text, embeds = _text(), _i2v_embeds()
    high, low = _model(HIGH), _model(LOW)
    steps, k, seed = 12, 6, 7
    mag = _mag(threshold=0.3, K=4, retention_ratio=0.1)  # the published A14B ratios; published rule (i2v)
    s = sample.WanFitSampler()
    a = s.run(high, text, embeds, steps, 3.5, 5.0, seed, "unipc", 0, k, True, True, step_cache=mag)[0]
    assert cache.CACHE_KEY in a  # the state travels to the second Sampler
    b = s.run(low, text, embeds, steps, 3.5, 5.0, seed, "unipc", k, steps, False, False, latent=a, step_cache=mag)[0]
    assert cache.CACHE_KEY not in b  # nothing left to hand on
    two = sample.WanFitTwoPassSampler().run(high, low, text, embeds, steps, 3.5, 3.5, 5.0, seed, "unipc", "step", k,
                                            0.0, step_cache=mag)[0]
    torch.testing.assert_close(b["samples"], two["samples"], atol=1e-4, rtol=1e-4)
    # i2v rule with split 6, retention 0.1: calls < int(12 + 12 * 0.1) = 13 compute (steps 0-6,
    # cond of 6); the low-noise expert reuses from step 7 on
    assert _skips(b) == _skips(two) and _skips(two) and min(_skips(two)) >= 7
    plain = sample.WanFitTwoPassSampler().run(high, low, text, embeds, steps, 3.5, 3.5, 5.0, seed, "unipc", "step",
                                              k, 0.0)[0]
    assert not torch.allclose(plain["samples"], two["samples"], atol=1e-4)  # the cache did something
    tel = two[sample.TELEMETRY_KEY]
    assert tel["steps_skipped"] == len(_skips(two)) and tel["steps_computed"] == steps - len(_skips(two))


def test_second_sampler_without_the_first_ones_state_starts_afresh(caplog):
    text, embeds = _text(), _i2v_embeds()
    low = _model(LOW)
    mag = _mag(threshold=0.3, K=4, retention_ratio=0.1)
    s = sample.WanFitSampler()
    a = s.run(_model(HIGH), text, embeds, 12, 3.5, 5.0, 1, "unipc", 0, 6, True, True)[0]  # no cache on pass 1
    with caplog.at_level(logging.INFO, logger="WanFit"):
        b = s.run(low, text, embeds, 12, 3.5, 5.0, 1, "unipc", 6, 12, False, False, latent=a, step_cache=mag)[0]
    assert "without a previous pass's cache state" in b[sample.TELEMETRY_KEY]["step_cache"]["line"]
    assert any("WanFit MagCache" in r.message for r in caplog.records)
    edited = dict(a, samples=a["samples"] + 1.0, **{cache.CACHE_KEY: {"state": {}, "fingerprint": None}})
    b = s.run(low, text, embeds, 12, 3.5, 5.0, 1, "unipc", 6, 12, False, False, latent=edited, step_cache=mag)[0]
    assert "LATENT was changed" in b[sample.TELEMETRY_KEY]["step_cache"]["line"]


def test_short_schedules_skip_nothing_by_default_and_say_why(caplog):
    text, empty = _text(), encode.WanFitEmptyEmbeds().embeds(32, 32, 5)[0]
    t2v = _model(T2V)
    easy = cache.WanFitEasyCache().make(-1.0, -1, "compute", False)[0]
    with caplog.at_level(logging.INFO, logger="WanFit"):
        out = sample.WanFitSampler().run(t2v, text, empty, 4, 5.0, 5.0, 0, "unipc", 0, 4, True, False,
                                         step_cache=easy)[0]
    report = out[sample.TELEMETRY_KEY]["step_cache"]
    assert report["steps_skipped"] == 0 and report["policy"] == "off"
    assert any("8 or fewer steps" in r.message and "allow_short_schedules" in r.message for r in caplog.records)
    plain = sample.WanFitSampler().run(t2v, text, empty, 4, 5.0, 5.0, 0, "unipc", 0, 4, True, False)[0]
    assert torch.equal(out["samples"], plain["samples"])
    allowed = cache.WanFitEasyCache().make(0.5, 1, "cpu", True)[0]
    out = sample.WanFitSampler().run(t2v, text, empty, 4, 5.0, 5.0, 0, "unipc", 0, 4, True, False,
                                     step_cache=allowed)[0]
    assert out[sample.TELEMETRY_KEY]["step_cache"]["policy"] == "easycache"


def test_teacache_auto_refuses_a_model_without_published_coefficients_before_loading():
    text, empty = _text(), encode.WanFitEmptyEmbeds().embeds(32, 32, 5)[0]
    tea = cache.WanFitTeaCache().make(-1.0, "auto", "auto", "compute", False)[0]
    stages.release_model()
    with pytest.raises(ValueError, match="WanFit TeaCache: .*not a released Wan model"):
        sample.WanFitSampler().run(_model(T2V), text, empty, 12, 5.0, 5.0, 0, "unipc", 0, 12, True, False,
                                   step_cache=tea)
    assert stages._LOADED["model"] is None  # refused before any weight was read


def test_calibrate_saves_a_calibration_that_the_cache_nodes_list_and_use(no_comfy):
    text, empty = _text(), encode.WanFitEmptyEmbeds().embeds(32, 32, 5)[0]
    t2v = _model(T2V)
    steps = 10
    assert cache.WanFitCacheCalibrate.VALIDATE_OWN("../escape") is not True
    calibrate = cache.WanFitCacheCalibrate().make("tiny t2v", "compute")[0]
    run = lambda c=None: sample.WanFitSampler().run(t2v, text, empty, steps, 5.0, 5.0, 2, "unipc", 0, steps,  # noqa
                                                    True, False, step_cache=c)[0]
    plain = run()
    recorded = run(calibrate)
    assert torch.equal(recorded["samples"], plain["samples"])  # calibration skips nothing
    path = no_comfy / "wanfit" / "step_cache" / "tiny t2v.json"
    saved = json.loads(path.read_text())
    assert saved["steps"] == steps and len(saved["mag_ratios"]) == 2 * steps and saved["meta"]["shift"] == 5.0
    choice = "calibration: tiny t2v"
    assert choice in cache.WanFitMagCache.INPUT_TYPES()["required"]["ratios"][0]
    assert choice in cache.WanFitTeaCache.INPUT_TYPES()["required"]["coefficients"][0]
    assert cache.WanFitMagCache.VALIDATE_OWN(choice) is True
    assert "no such calibration" in cache.WanFitMagCache.VALIDATE_OWN("calibration: nope")
    mag = _mag(threshold=0.0, K=2, retention_ratio=0.2, ratios=choice)
    tea = cache.WanFitTeaCache().make(0.0, "e", choice, "compute", False)[0]
    for settings in (mag, tea):
        assert torch.equal(run(settings)["samples"], plain["samples"])
    loose = run(_mag(threshold=0.5, K=3, retention_ratio=0.2, ratios=choice))
    assert _skips(loose) and not torch.equal(loose["samples"], plain["samples"])


def test_calibrating_one_pass_of_a_chain_without_handing_on_is_refused():
    text, embeds = _text(), _i2v_embeds()
    calibrate = cache.WanFitCacheCalibrate().make("half", "compute")[0]
    with pytest.raises(ValueError, match="whole 12-step schedule"):
        sample.WanFitSampler().run(_model(HIGH), text, embeds, 12, 3.5, 5.0, 0, "unipc", 0, 6, True, False,
                                   step_cache=calibrate)


def test_user_directory_on_current_and_2024_comfyui(monkeypatch):
    monkeypatch.setattr(comfy, "user_directory", REAL_USER_DIRECTORY)  # the real adapter; stand-in folder_paths
    current = SimpleNamespace(get_user_directory=lambda: "/c/user", user_directory="/wrong")
    old = SimpleNamespace(user_directory="/o/user", get_output_directory=lambda: "/o/output")
    oldest = SimpleNamespace(get_output_directory=lambda: "/x/output")
    for fake, expected in ((current, "/c/user"), (old, "/o/user"), (oldest, "/x/user")):
        monkeypatch.setattr(comfy, "_folder_paths", lambda fake=fake: fake)
        assert comfy.user_directory() == expected


def test_cache_nodes_are_registered_with_their_socket():
    from wanfit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    for name in ("WanFitTeaCache", "WanFitMagCache", "WanFitEasyCache", "WanFitCacheCalibrate"):
        assert NODE_CLASS_MAPPINGS[name].RETURN_TYPES == ("WANFIT_STEP_CACHE",)
        assert NODE_DISPLAY_NAME_MAPPINGS[name].startswith("WanFit ")
    for sampler in (sample.WanFitSampler, sample.WanFitTwoPassSampler):
        spec = sampler.INPUT_TYPES()["optional"]["step_cache"]
        assert spec[0] == "WANFIT_STEP_CACHE" and spec[1]["tooltip"]
