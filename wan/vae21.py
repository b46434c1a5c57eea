"""The Wan 2.1 video VAE (official ``wan/modules/vae2_1.py``): 16 channels, 4x8x8 compression.

Wan 2.1 models and the Wan 2.2 A14B experts use it. Shared layers and the chunked
encode/decode live in ``vae_common``; this file only lays out the stages.
"""
from __future__ import annotations

from torch import nn

from .vae_common import WAN21_VAE, Decoder3d, Encoder3d, Resample, Wan21VAEConfig, WanVAE, res_blocks


def _downsamples(c: Wan21VAEConfig) -> tuple[list[nn.Module], int]:
    dims = [c.dim * m for m in (1, *c.dim_mult)]
    layers: list[nn.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        layers += res_blocks(in_dim, out_dim, c.num_res_blocks)
        if i < len(c.dim_mult) - 1:
            mode = "downsample3d" if c.temperal_downsample[i] else "downsample2d"
            layers.append(Resample(out_dim, mode))
    return layers, dims[-1]


def _upsamples(c: Wan21VAEConfig) -> tuple[list[nn.Module], int]:
    dims = [c.dim * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
    temperal_upsample = c.temperal_downsample[::-1]
    layers: list[nn.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        in_dim = in_dim // 2 if i > 0 else in_dim  # the previous Resample halved the channels
        layers += res_blocks(in_dim, out_dim, c.num_res_blocks + 1)
        if i < len(c.dim_mult) - 1:
            mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            layers.append(Resample(out_dim, mode, up_dim=out_dim // 2))
    return layers, dims[-1]


class WanVAE21(WanVAE):
    """Wan 2.1 VAE; see WanVAE for encode / decode / encode_chunk / decode_chunk."""

    def __init__(self, config: Wan21VAEConfig = WAN21_VAE) -> None:
        down, enc_out = _downsamples(config)
        up, dec_out = _upsamples(config)
        dec_in = config.dim * config.dim_mult[-1]
        super().__init__(
            config,
            Encoder3d(config.channels, config.dim, down, enc_out, config.z_dim * 2),
            Decoder3d(config.z_dim, dec_in, up, dec_out, config.channels))
