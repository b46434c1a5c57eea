"""The Wan 2.2 video VAE (official ``wan/modules/vae2_2.py``): 48 channels, 4x16x16 compression.

Wan 2.2 TI2V-5B uses it. Compared with 2.1: frames are 2x2-patchified into 12 channels, each
resolution level is one block whose main path is added to a parameter-free shortcut
(average-pool down, duplicate up), upsampling keeps its channel count, and the decoder has
its own base width ``dec_dim``.
"""
from __future__ import annotations

from einops import rearrange, reduce
from torch import Tensor, nn
from torch.nn import functional as F

from .vae_common import (WAN22_VAE, Causal, Decoder3d, Encoder3d, FeatureCache, Resample, Wan22VAEConfig,
                         WanVAE, res_blocks, run)


class AvgDown3D(nn.Module):
    """Shortcut down: fold a (t, s, s) neighbourhood into channels, average channel groups."""

    def __init__(self, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s

    def forward(self, x: Tensor) -> Tensor:
        pad = -x.shape[2] % self.factor_t
        if pad:  # causal: pad the past (F.pad copies even when there is nothing to pad)
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        x = rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w",
                      ft=self.factor_t, fh=self.factor_s, fw=self.factor_s)
        return reduce(x, "b (o g) t h w -> b o t h w", "mean", o=self.out_dim)


class DupUp3D(nn.Module):
    """Shortcut up: repeat channels, unfold them into a (t, s, s) neighbourhood."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.repeats = out_dim * factor_t * factor_s**2 // in_dim
        self.factor_t, self.factor_s = factor_t, factor_s

    def forward(self, x: Tensor, first_chunk: bool) -> Tensor:
        x = rearrange(x.repeat_interleave(self.repeats, dim=1),
                      "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)",
                      ft=self.factor_t, fh=self.factor_s, fw=self.factor_s)
        # The first frame is not doubled in time (see Resample); drop the extra copy.
        return x[:, :, self.factor_t - 1:] if first_chunk else x


class DownBlock(nn.Module, Causal):
    """One encoder level (official Down_ResidualBlock)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool,
                 down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(out_dim, 2 if temporal else 1, 2 if down else 1)
        layers = res_blocks(in_dim, out_dim, num_res_blocks)
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        out = run(self.downsamples, x, cache)
        out += self.avg_shortcut(x)  # in place, as in ResidualBlock
        return out


class UpBlock(nn.Module, Causal):
    """One decoder level (official Up_ResidualBlock)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers = res_blocks(in_dim, out_dim, num_res_blocks)
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", up_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        out = run(self.upsamples, x, cache)
        if self.avg_shortcut is not None:
            out += self.avg_shortcut(x, cache.first)  # in place, as in ResidualBlock
        return out


class WanVAE22(WanVAE):
    """Wan 2.2 VAE; see WanVAE for encode / decode / encode_chunk / decode_chunk."""

    def __init__(self, config: Wan22VAEConfig = WAN22_VAE) -> None:
        levels = len(config.dim_mult)
        temporal = (*config.temperal_downsample, False)  # the last level never resamples
        enc = [config.dim * m for m in (1, *config.dim_mult)]
        down = [DownBlock(enc[i], enc[i + 1], config.num_res_blocks, temporal[i], i < levels - 1)
                for i in range(levels)]
        dec = [config.dec_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
        temporal_up = (*config.temperal_downsample[::-1], False)
        up = [UpBlock(dec[i], dec[i + 1], config.num_res_blocks + 1, temporal_up[i], i < levels - 1)
              for i in range(levels)]
        super().__init__(
            config,
            Encoder3d(config.channels, enc[0], down, enc[-1], config.z_dim * 2),
            Decoder3d(config.z_dim, dec[0], up, dec[-1], config.channels))
