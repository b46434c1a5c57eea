"""Latent previews: Wan latent-to-RGB (ComfyUI's published factors) and its wiring into the
sampler's progress bar when ComfyUI's previews are on."""
from __future__ import annotations

import pytest
import torch

from wanfit.nodes import comfy, sample
from wanfit.wan import preview


def test_factor_tables_have_the_latent_channel_counts():
    assert len(preview.WAN21_RGB_FACTORS) == 16 and len(preview.WAN22_RGB_FACTORS) == 48
    for factors, bias in preview.FACTORS.values():
        assert all(len(row) == 3 for row in factors) and len(bias) == 3


@pytest.mark.parametrize("channels", [16, 48])
def test_latent_to_rgb_shape_and_range(channels):
    latent = torch.randn(1, channels, 5, 6, 10) * 3
    rgb = preview.latent_to_rgb(latent)
    assert rgb.shape == (6, 10, 3) and rgb.dtype == torch.uint8
    assert int(rgb.min()) >= 0 and int(rgb.max()) <= 255
    assert rgb.float().std() > 0  # not a flat image
    assert torch.equal(rgb, preview.latent_to_rgb(latent[0, :, 2]))  # the middle frame by default
    assert torch.equal(preview.latent_to_rgb(latent, frame=0), preview.latent_to_rgb(latent[0, :, 0]))


def test_latent_to_rgb_is_the_linear_map():
    x = torch.zeros(16, 2, 3)
    x[2] = 1.0  # channel 2 only: RGB = factors[2] + bias, then -1..1 -> 0..255
    expected = [(f + b + 1) / 2 * 255 for f, b in zip(preview.WAN21_RGB_FACTORS[2], preview.WAN21_RGB_BIAS)]
    got = preview.latent_to_rgb(x)[0, 0].float()
    assert torch.allclose(got, torch.tensor(expected), atol=0.51)


def test_latent_to_rgb_rejects_other_layouts():
    with pytest.raises(ValueError, match="16 or 48"):
        preview.latent_to_rgb(torch.zeros(1, 4, 1, 8, 8))
    with pytest.raises(ValueError, match="got"):
        preview.latent_to_rgb(torch.zeros(8, 8))


class _Bar:
    def __init__(self):
        self.calls = []

    def update_absolute(self, value, total=None, preview=None):
        self.calls.append((value, total, preview))


@pytest.mark.parametrize("enabled", [False, True])
def test_progress_sends_a_preview_only_when_enabled(monkeypatch, enabled):
    bar = _Bar()
    monkeypatch.setattr(comfy, "progress_bar", lambda total: bar)
    monkeypatch.setattr(comfy, "throw_if_interrupted", lambda: None)
    monkeypatch.setattr(comfy, "previews_enabled", lambda: enabled)
    progress = sample._Progress(4, 2)
    x0 = torch.randn(1, 16, 3, 4, 6)
    progress(2, 6, x0, x0)
    progress(3, 6, x0, x0)
    assert [c[:2] for c in bar.calls] == [(1, 4), (2, 4)]
    if not enabled:
        assert all(c[2] is None for c in bar.calls)
        return
    kind, image, size = bar.calls[0][2]
    assert kind == "JPEG" and size == comfy.PREVIEW_MAX_RESOLUTION
    assert image.size == (6, 4) and image.mode == "RGB"

