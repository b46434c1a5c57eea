"""Wan 2.1 / 2.2 VAE against the official code (wan22) and diffusers' AutoencoderKLWan.

Tiny random configs in float32 on CPU; the official wrappers (Wan2_1_VAE / Wan2_2_VAE) are used
with their model swapped for the tiny one, so the latent mean/std constants are checked too.
"""
from __future__ import annotations

import re

import pytest
import torch

from reference import wan22_module
from wanfit.wan.vae21 import WanVAE21
from wanfit.wan.vae22 import WanVAE22
from wanfit.wan.vae import build_vae, detect_vae_config
from wanfit.wan.vae_common import WAN21_VAE, WAN22_VAE, FeatureCache, Wan21VAEConfig, Wan22VAEConfig, time_chunks

TINY21 = Wan21VAEConfig(dim=8)
TINY22 = Wan22VAEConfig(dim=8, dec_dim=12)
TOL = 1e-6  # same ops in the same order: in practice bit-exact
CHUNK_TOL = 1e-5  # other chunk sizes give other conv shapes: rounding differs


def official_kwargs(cfg) -> dict:
    kw = dict(dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
              num_res_blocks=cfg.num_res_blocks, attn_scales=[],
              temperal_downsample=list(cfg.temperal_downsample), dropout=0.0)
    if cfg.version == "2.2":
        kw["dec_dim"] = cfg.dec_dim
    return kw


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights that keep activations O(1); the official init zeroes attention's proj."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def official_wrapper(monkeypatch, cfg, model: torch.nn.Module):
    """The official Wan2_x_VAE wrapper (mean/std, clamp) around a tiny official model."""
    version = cfg.version.replace(".", "_")
    ref = wan22_module(f"vae{version}")
    monkeypatch.setattr(ref, "_video_vae", lambda *a, **k: model)
    return getattr(ref, f"Wan{version}_VAE")(vae_pth=None, device="cpu")


def pair(cfg, seed: int = 0):
    """(official WanVAE_, ours) with the same random weights, loaded strict."""
    ref = wan22_module("vae2_1" if cfg.version == "2.1" else "vae2_2")
    official = ref.WanVAE_(**official_kwargs(cfg)).eval()
    randomize(official, seed)
    ours = build_vae(cfg).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def video(frames: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def latent(shape, seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


CASES = [pytest.param(TINY21, 16, id="2.1"), pytest.param(TINY22, 32, id="2.2")]


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:.*autocast")  # the wrappers' CUDA autocast, off on CPU
@pytest.mark.parametrize("cfg,size", CASES)
@pytest.mark.parametrize("frames", [1, 9])
def test_encode_decode_vs_official(monkeypatch, cfg, size, frames):
    official, ours = pair(cfg)
    wrapper = official_wrapper(monkeypatch, cfg, official)
    x = video(frames, size)
    with torch.no_grad():
        want = wrapper.encode([x[0]])[0][None]
        got = ours.encode(x)
        s = cfg.spatial_compression
        assert got.shape == (1, cfg.z_dim, 1 + (frames - 1) // 4, size // s, size // s)
        e_enc = err(got, want)
        z = latent(got.shape)
        want_x = wrapper.decode([z[0]])[0][None]
        got_x = ours.decode(z)
        e_dec = err(got_x, want_x)
    print(f"\nWan {cfg.version} vs official, {frames} frames: encode max abs err {e_enc:.2e}, "
          f"decode {e_dec:.2e} (|latent| max {want.abs().max():.1f}, "
          f"{(want_x.abs() < 1).float().mean():.0%} of pixels unclamped)")
    assert got_x.shape == x.shape
    assert (want_x.abs() < 1).float().mean() > 0.5  # outputs not all saturated by the clamp
    assert e_enc < TOL and e_dec < TOL


@pytest.mark.parity
@pytest.mark.parametrize("cfg,size", CASES)
def test_perturbed_weight_fails(cfg, size):
    official, ours = pair(cfg)
    scale = [torch.tensor(cfg.latents_mean), 1 / torch.tensor(cfg.latents_std)]
    x = video(5, size)
    with torch.no_grad():
        ours.encoder.middle[0].residual[2].weight.add_(0.05)
        ours.decoder.middle[0].residual[2].weight.add_(0.05)
        e_enc = err(ours.encode(x), official.encode(x, scale))
        latent_size = size // cfg.spatial_compression
        z = latent((1, cfg.z_dim, 2, latent_size, latent_size))
        e_dec = err(ours.decode(z), official.decode(z, scale).clamp(-1, 1))
    print(f"\nWan {cfg.version}, one perturbed weight: encode err {e_enc:.2e}, decode err {e_dec:.2e}")
    assert e_enc > 1e-2 and e_dec > 1e-2


@pytest.mark.parity
@pytest.mark.parametrize("cfg,size", CASES)
def test_vs_diffusers(cfg, size):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    _, ours = pair(cfg, seed=3)
    kw = dict(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
              num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample))
    sd = ours.state_dict()
    if cfg.version == "2.2":
        kw.update(decoder_base_dim=cfg.dec_dim, is_residual=True, patch_size=2, in_channels=12,
                  out_channels=12, scale_factor_spatial=16)
        sd = diffusers_keys_22(sd, cfg.num_res_blocks)
    else:
        sd = convert_wan_vae_to_diffusers(sd)
    ref = AutoencoderKLWan(**kw).eval()
    ref.load_state_dict(sd, strict=True)
    x = video(9, size, seed=4)
    with torch.no_grad():
        # diffusers' latents are the raw posterior mean: normalise / denormalise its side
        got = ours.encode(x)
        e_enc = err(got, ours.normalize(ref.encode(x).latent_dist.mode()))
        z = latent(got.shape)
        e_dec = err(ours.decode(z), ref.decode(ours.denormalize(z)).sample)
    print(f"\nWan {cfg.version} vs diffusers: encode max abs err {e_enc:.2e}, decode {e_dec:.2e}")
    assert e_enc < TOL and e_dec < TOL


def diffusers_keys_22(sd: dict, num_res_blocks: int) -> dict:
    """Original -> diffusers keys for Wan 2.2: convert_wan_vae_to_diffusers only knows 2.1's
    flat stage lists, not the per-level blocks (``encoder.downsamples.i.downsamples.j``)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    resnet = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2",
              "residual.6": "conv2", "shortcut": "conv_shortcut"}
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(encoder|decoder)\.(down|up)samples\.(\d+)\.\2samples\.(\d+)\.(.+)", key)
        if m is None:
            out.update(convert_wan_vae_to_diffusers({key: value}))
            continue
        coder, kind, i, j, rest = m.groups()
        if int(j) < num_res_blocks + (kind == "up"):
            head, _, leaf = rest.rpartition(".")
            out[f"{coder}.{kind}_blocks.{i}.resnets.{j}.{resnet[head]}.{leaf}"] = value
        else:
            out[f"{coder}.{kind}_blocks.{i}.{kind}sampler.{rest}"] = value
    return out


@pytest.mark.parity
@pytest.mark.parametrize("cfg,size", CASES)
def test_larger_chunks_match(cfg, size):
    """The tiled VAE may feed later chunks of 8 frames / 2 latents: same result as official 4 / 1."""
    _, ours = pair(cfg, seed=5)
    x = video(9, size, seed=6)
    with torch.no_grad():
        whole = ours.encode(x)
        cache = FeatureCache()
        chunked = torch.cat([ours.encode_chunk(x[:, :, s], cache) for s in time_chunks(9, 8)], 2)
        e_enc = err(chunked, whole)
        cache = FeatureCache()
        dec = torch.cat([ours.decode_chunk(whole[:, :, s], cache) for s in time_chunks(3, 2)], 2)
        e_dec = err(dec.clamp(-1, 1), ours.decode(whole))
    print(f"\nWan {cfg.version}, chunks of 8 frames / 2 latents vs 4 / 1: encode {e_enc:.2e}, "
          f"decode {e_dec:.2e}")
    assert e_enc < CHUNK_TOL and e_dec < CHUNK_TOL


@pytest.mark.parametrize("cfg,size", CASES)
def test_bfloat16(cfg, size):
    """Weights in bfloat16: inputs are cast in, results come back float32 and near float32's."""
    _, ours = pair(cfg)
    x = video(5, size)
    z = ours.encode(x)
    y = ours.decode(z)
    ours.to(torch.bfloat16)
    z16, y16 = ours.encode(x), ours.decode(z)
    assert z16.dtype == y16.dtype == torch.float32
    assert err(z16, z) < 0.1 and err(y16, y) < 0.15


def test_chunk_rules():
    ours = WanVAE21(TINY21)
    with pytest.raises(ValueError, match="4n\\+1"):
        ours.encode(video(8, 32))
    with pytest.raises(ValueError, match="first chunk must be 1 frame"):
        ours.encode_chunk(video(5, 32), FeatureCache())
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(video(1, 36))
    with pytest.raises(ValueError, match="first chunk must be 1 latent"):
        ours.decode_chunk(torch.zeros(1, 16, 2, 4, 4), FeatureCache())
    assert [(s.start, s.stop) for s in time_chunks(9, 4)] == [(0, 1), (1, 5), (5, 9)]


def meta_shapes(cfg, prefix: str = "") -> dict[str, tuple]:
    with torch.device("meta"):
        model = build_vae(cfg)
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parity
@pytest.mark.parametrize("cfg,name,cls,n_params", [(WAN21_VAE, "vae2_1", WanVAE21, 126_892_531),
                                                   (WAN22_VAE, "vae2_2", WanVAE22, 704_688_668)],
                         ids=["wan21", "wan22"])
def test_real_layouts_match_official(cfg, name, cls, n_params):
    """The real presets' keys and shapes equal the official modules' (both built on meta)."""
    with torch.device("meta"):
        official = wan22_module(name).WanVAE_(**official_kwargs(cfg))
        assert type(build_vae(cfg)) is cls
    want = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert meta_shapes(cfg) == want
    assert sum(torch.Size(s).numel() for s in want.values()) == n_params
    assert cfg.temporal_compression == 4
    assert cfg.spatial_compression == {"2.1": 8, "2.2": 16}[cfg.version]


ODD21 = Wan21VAEConfig(dim=4, num_res_blocks=1, temperal_downsample=(True, True, False))
ODD22 = Wan22VAEConfig(dim=4, dec_dim=8, dim_mult=(1, 2, 2), temperal_downsample=(True, False))


@pytest.mark.parametrize("cfg", [WAN21_VAE, WAN22_VAE, TINY21, TINY22, ODD21, ODD22],
                         ids=["wan21", "wan22", "tiny21", "tiny22", "tiny21-1res", "tiny22-3lvl"])
@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
def test_detect(cfg, prefix):
    shapes = meta_shapes(cfg, prefix)
    shapes["model.diffusion_model.head.head.weight"] = (64, 5120)  # other models' keys: ignored
    assert detect_vae_config(shapes) == cfg


def test_detect_rejects():
    with pytest.raises(ValueError, match="not a Wan VAE: expected the official key layout"):
        detect_vae_config({"patch_embedding.weight": (1536, 16, 1, 2, 2), "head.head.weight": (64, 1536)})
    diffusers_style = {"encoder.conv_in.weight": (96, 3, 3, 3, 3),
                       "decoder.mid_block.resnets.0.norm1.gamma": (384,)}
    with pytest.raises(ValueError, match="diffusers names"):
        detect_vae_config(diffusers_style)
    broken = meta_shapes(WAN21_VAE)
    broken["decoder.head.2.weight"] = (6, 96, 3, 3, 3)
    with pytest.raises(ValueError, match=r"tensor decoder.head.2.weight has shape \[6, 96, 3, 3, 3\], but it needs \[3, 96, 3, 3, 3\]"):
        detect_vae_config(broken)
    four_channel = meta_shapes(WAN21_VAE)
    four_channel["encoder.conv1.weight"] = (96, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="expected 3 .* or 12"):
        detect_vae_config(four_channel)


def test_vae_imports_run_one_way():
    """vae -> vae21, vae22 -> vae_common: the shared module knows neither version."""
    import ast
    from pathlib import Path

    wan = Path(__file__).resolve().parents[1] / "wan"

    def imported(name: str) -> set[str]:
        tree = ast.parse((wan / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert imported("vae_common") & {"vae", "vae21", "vae22"} == set()
    assert imported("vae21") & {"vae", "vae22"} == set() and imported("vae22") & {"vae", "vae21"} == set()
    assert {"vae21", "vae22", "vae_common"} <= imported("vae")
