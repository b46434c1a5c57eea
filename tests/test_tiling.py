"""Tiled VAE encode and decode (optim/tiling.py) on the tiny factory VAEs, float32 on the CPU.

One tile is the untiled VAE bit for bit; smaller tiles stay within a stated bound of it and
show no seams; the peak memory of a tiled decode follows the tile, not the frame; the auto
choice fits its budget; bad settings are refused, saying what is allowed.

Inputs are smooth (bicubically upsampled noise), as latents and frames of real videos are:
white noise would make every pixel depend on the tile edge as much as on its neighbours.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import factory
from wanfit.nodes.decode import WanFitVAETiling
from wanfit.optim import tiling
from wanfit.optim.hostmem import allocation_peak
from wanfit.optim.tiling import Tiling, TilingOptions, check_options, choose_tiling, tiled_decode, tiled_encode
from wanfit.wan.vae import build_vae
from wanfit.wan.vae_common import WAN21_VAE, WAN22_VAE

FILES = {"2.1": "wan_2.1_vae.safetensors", "2.2": "wan2.2_vae.safetensors"}
# Mean absolute error of tiled against untiled output, as a fraction of the untiled output's
# standard deviation, in the 3x2 grids of GRIDS. Measured: Wan 2.1 0.06 (decode) / 0.04
# (encode); Wan 2.2, whose tiles here are 6 latent pixels wide, 0.22 / 0.09. A misplaced or
# mis-weighted tile gives ~1.
TILED_BOUND = {"2.1": 0.12, "2.2": 0.3}
# Mean error in a band around the tile borders against the rest: measured 0.9-1.2 with
# feathered overlaps, 1.8-7 where tiles only touch.
SEAM_BOUND = 1.25


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def vae(request):
    config = factory.VAE21 if request.param == "2.1" else factory.VAE22
    model = build_vae(config).eval()
    model.load_state_dict({k: v.float() for k, v in factory.FILES[FILES[request.param]][1]().items()})
    return model


def smooth(shape: tuple, factor: int, seed: int) -> torch.Tensor:
    """Noise on a grid ``factor`` times coarser, bicubically upsampled to ``shape`` [B, C, T, H, W]."""
    b, c, t, h, w = shape
    coarse = torch.randn(b, c * t, h // factor + 2, w // factor + 2, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).view(shape)


def inputs(model, height: int, width: int, latents: int = 3):
    s = model.config.spatial_compression
    latent = smooth((1, model.config.z_dim, latents, height // s, width // s), 2, 0)
    video = smooth((1, 3, 1 + 4 * (latents - 1), height, width), 8, 1).clamp(-1, 1)
    return latent, video


# ----------------------------------------------------------------------------- exactness

def test_one_tile_is_the_untiled_vae_bit_for_bit(vae):
    s = vae.config.spatial_compression
    latent = smooth((2, vae.config.z_dim, 3, 64 // s, 96 // s), 2, 2)
    video = smooth((2, 3, 9, 64, 96), 8, 3).clamp(-1, 1)
    # each video of a batch is a stream of its own, as in the decode node
    def each(fn, x, **kw):
        return torch.cat([fn(x[i:i + 1], **kw) for i in range(len(x))])
    assert torch.equal(tiled_decode(vae, latent, Tiling(96, 64)), each(vae.decode, latent))
    assert torch.equal(tiled_encode(vae, video, Tiling(96, 64)), each(vae.encode, video))
    latent, video = latent[:1], video[:1]
    for one_tile in (Tiling(4096, 4096, 64), TilingOptions().whole(96, 64)):
        assert torch.equal(tiled_decode(vae, latent, one_tile), vae.decode(latent))
        assert torch.equal(tiled_encode(vae, video, one_tile), vae.encode(video))
    # longer time chunks are one stream too: the same as the VAE with those chunks
    chunked = Tiling(96, 64, temporal_size=9)
    assert torch.equal(tiled_decode(vae, latent, chunked), vae.decode(latent, chunk=2))
    assert torch.equal(tiled_encode(vae, video, chunked), vae.encode(video, chunk=8))


def test_decode_writes_into_the_callers_buffer(vae):
    """The node's IMAGE [F, H, W, 3] is the output, seen as [1, 3, F, H, W]: no second copy."""
    latent, _ = inputs(vae, 32, 64, latents=2)
    images = torch.full((5, 32, 64, 3), 7.0)
    view = images.view(1, 5, 32, 64, 3).permute(0, 4, 1, 2, 3)
    assert tiled_decode(vae, latent, Tiling(32, 32, 16), out=view) is view
    assert torch.equal(images.permute(3, 0, 1, 2)[None], tiled_decode(vae, latent, Tiling(32, 32, 16)))
    with pytest.raises(ValueError, match="out has shape"):
        tiled_decode(vae, latent, Tiling(32, 32), out=torch.zeros(1, 3, 4, 32, 64))


# ----------------------------------------------------------------------------- tiles

def _border_band(spans: list[tuple[int, int]], size: int, band: int) -> torch.Tensor:
    """Positions within ``band`` of a tile edge inside the frame."""
    mask = torch.zeros(size, dtype=torch.bool)
    for a, b in spans:
        for edge in (a, b):
            if 0 < edge < size:
                mask[max(0, edge - band):edge + band] = True
    return mask


def _errors(vae, encode: bool, tile: int, overlap: int, height: int, width: int):
    """Per-position mean abs error of tiles against untiled, the border band, and the scale."""
    s = vae.config.spatial_compression
    latent, video = inputs(vae, height, width)
    if encode:
        want, got = vae.encode(video), tiled_encode(vae, video, Tiling(tile, tile, overlap))
    else:
        want, got = vae.decode(latent), tiled_decode(vae, latent, Tiling(tile, tile, overlap))
    err = (got - want).abs().mean(dim=(0, 1, 2))
    scale = 1 if encode else s
    band = 1 if encode else 8  # one latent pixel / 8 pixels either side of a tile edge
    rows = tiling._space_axis(height // s, tile, overlap, s, encode=False).inputs
    cols = tiling._space_axis(width // s, tile, overlap, s, encode=False).inputs
    in_band = (_border_band([(r.start * scale, r.stop * scale) for r in rows], err.shape[0], band)[:, None]
               | _border_band([(c.start * scale, c.stop * scale) for c in cols], err.shape[1], band)[None, :])
    return err, in_band, want.std().item()


# (height, width, tile, overlap) per VAE: a 2x3 grid; Wan 2.2's 16x grid needs larger frames
GRIDS = {"2.1": (96, 128, 64, 32), "2.2": (128, 192, 96, 32)}


@pytest.mark.parametrize("encode", [False, True], ids=["decode", "encode"])
def test_small_tiles_stay_close_without_seams(vae, encode):
    height, width, tile, overlap = GRIDS[vae.config.version]
    assert Tiling(tile, tile, overlap).grid(vae.config, width, height) == (3, 2)
    err, band, scale = _errors(vae, encode, tile, overlap, height, width)
    ratio = err[band].mean() / err[~band].mean()
    print(f"\nWan {vae.config.version} {'encode' if encode else 'decode'}, {tile} px tiles, overlap {overlap}: "
          f"mean err {err.mean() / scale:.3f} of the output's std; border band / rest {ratio:.2f}")
    assert err.mean() < TILED_BOUND[vae.config.version] * scale
    assert ratio < SEAM_BOUND
    # the measure sees seams where there are some: tiles that only touch (they divide the frame)
    hard, band, _ = _errors(vae, encode, tile - overlap, 0, height, width)
    assert hard[band].mean() / hard[~band].mean() > SEAM_BOUND


def test_blend_weights_sum_to_one_everywhere():
    for size, tile, overlap in ((100, 60, 30), (160, 84, 8), (90, 49, 8), (7, 3, 1), (50, 50, 10)):
        spans = tiling._spans(size, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == size and all(b - a == min(tile, size) for a, b in spans)
        assert all(spans[i][1] - spans[i + 1][0] >= overlap for i in range(len(spans) - 1))
        total = torch.zeros(size)
        for (a, b), w in zip(spans, tiling._feather(spans)):
            total[a:b] += w
            assert w.min() > 0
        assert torch.allclose(total, torch.ones(size), atol=1e-6), (size, tile, overlap)


def test_peak_memory_follows_the_tile_not_the_frame():
    """Decode 4x the pixels: untiled the allocator peak grows ~4x, in tiles of one size it
    stays put (CPU allocator accounting; ratios within one run, so any CPU kernel holds)."""
    model = build_vae(factory.VAE21).eval()
    peaks = {}
    for size in (64, 128):
        latent = smooth((1, 16, 2, size // 8, size // 8), 2, 4)  # the 2nd latent frame fills every cache
        out = torch.zeros(1, 3, 5, size, size)  # the output exists before, as the node's IMAGE
        for name, tiles in (("untiled", Tiling(size, size)), ("tiled", Tiling(64, 64, 16))):
            peaks[name, size] = allocation_peak(lambda: tiled_decode(model, latent, tiles, out=out))
    untiled, tiled = peaks["untiled", 128] / peaks["untiled", 64], peaks["tiled", 128] / peaks["tiled", 64]
    print(f"\npeak at 128x128 / 64x64: untiled x{untiled:.2f}, 64 px tiles x{tiled:.2f}")
    assert untiled > 3.0
    assert tiled < 1.25


# ----------------------------------------------------------------------------- time

def test_overlapping_time_windows_cover_every_frame(vae):
    latent, video = inputs(vae, 32, 32, latents=7)
    windows = Tiling(32, 32, 0, temporal_size=9, temporal_overlap=4)  # 3 latents, sharing 1
    assert [(w.start, w.stop) for w in tiling._time_axis(7, windows, 4, encode=False).inputs] == \
        [(0, 3), (2, 5), (4, 7)]
    # within a window, chunks of 2 latent frames: compare with one stream chunked alike
    decoded, exact = tiled_decode(vae, latent, windows), vae.decode(latent, chunk=2)
    assert decoded.shape == exact.shape
    assert torch.equal(decoded[:, :, :8], vae.decode(latent[:, :, :3], chunk=2)[:, :, :8])  # the first window's own
    assert not torch.equal(decoded[:, :, 8:], exact[:, :, 8:])  # later windows start afresh
    assert (decoded - exact).abs().mean() < 0.5 * exact.std()
    encoded, exact = tiled_encode(vae, video, windows), vae.encode(video, chunk=8)
    assert encoded.shape == exact.shape
    torch.testing.assert_close(encoded[:, :, :2], exact[:, :, :2], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- auto

@pytest.mark.parametrize("config", [WAN21_VAE, WAN22_VAE], ids=["2.1", "2.2"])
def test_auto_picks_the_fewest_pixels_that_fit(config):
    width, height, dtype = 1280, 720, torch.bfloat16
    whole = tiling.work_bytes(config, Tiling(width, height), width, height, dtype)
    assert choose_tiling(config, width, height, dtype, whole) == Tiling(width, height)
    previous = Tiling(width, height)
    for fraction in (0.9, 0.5, 0.3, 0.1, 0.04):
        free = int(whole * fraction)
        tiles = choose_tiling(config, width, height, dtype, free)
        assert tiling.work_bytes(config, tiles, width, height, dtype) <= free
        assert tiles.tile_pixels(width, height) <= previous.tile_pixels(width, height)
        cols, rows = tiles.grid(config, width, height)
        assert cols * rows > 1 and min(tiles.tile_width, tiles.tile_height) >= tiling.MIN_TILE
        previous = tiles
    assert choose_tiling(config, width, height, dtype, whole // 1000) is None  # not even 128 px tiles
    # strips when they are the cheapest: the frame's full height in 3 columns
    three = choose_tiling(config, width, height, dtype, int(whole * 0.45))
    assert three.grid(config, width, height) == (3, 1) and three.tile_height == height


def test_work_grows_with_the_time_chunk():
    small, big = Tiling(512, 512), Tiling(512, 512, temporal_size=9)
    for encode in (False, True):
        one = tiling.work_bytes(WAN21_VAE, small, 832, 480, torch.bfloat16, encode)
        two = tiling.work_bytes(WAN21_VAE, big, 832, 480, torch.bfloat16, encode)
        assert one < two < 2 * one


def test_smaller_halves_the_tile_down_to_the_minimum():
    tiles, seen = Tiling(1280, 720), []
    while tiles is not None:
        seen.append(tiles.tile_pixels(1280, 720))
        tiles = tiles.smaller(1280, 720)
    assert len(seen) > 3 and all(b <= 0.71 * a for a, b in zip(seen, seen[1:]))
    assert seen[-1] >= tiling.MIN_TILE**2


# ----------------------------------------------------------------------------- bad input

def test_bad_settings_are_refused_with_what_is_allowed():
    assert check_options(512, 64, 5, 0) is None and check_options(128, 64, 9, 4) is None
    assert "smaller than twice its overlap 96" in check_options(160, 96, 5, 0)
    assert "overlap <= 64" in check_options(128, 96, 5, 0)
    assert "multiples of 16" in check_options(500, 64, 5, 0)
    assert "4n+1" in check_options(512, 64, 8, 0) and "e.g. 5 or 9" in check_options(512, 64, 8, 0)
    assert "4n+1" in check_options(512, 64, 64, 8)  # ComfyUI's defaults are not latent frames
    assert "from 0 to 4" in check_options(512, 64, 9, 8)
    assert "multiple of 4" in check_options(512, 64, 13, 2)
    with pytest.raises(ValueError, match="twice its overlap"):
        TilingOptions("manual", 64, 64)
    with pytest.raises(ValueError, match="expected one of auto, manual, off"):
        TilingOptions("tiles")
    with pytest.raises(ValueError, match="temporal_size 6"):
        Tiling(512, 512, 64, temporal_size=6)
    node = WanFitVAETiling
    assert node.VALIDATE_OWN("manual", 512, 64, 5, 0) is True
    assert "twice its overlap" in node.VALIDATE_OWN("manual", 96, 64, 5, 0)
    assert "4n+1" in node.VALIDATE_OWN("auto", 512, 64, 12, 0)
    assert "expected one of" in node.VALIDATE_OWN("sometimes", 512, 64, 5, 0)
    assert node.VALIDATE_OWN("manual", None, 64, 5, 0) is True  # linked: checked when it runs
    assert node().settings("manual", 256, 32, 9, 4) == (TilingOptions("manual", 256, 32, 9, 4),)
