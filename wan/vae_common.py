"""What the Wan 2.1 and Wan 2.2 video VAEs share: layers, the time-chunk feature cache, configs.

Both VAEs are causal in time: a video is encoded as its first frame, then chunks of 4 frames,
and decoded one latent frame at a time. Every temporal convolution keeps the last frames of
its input in a FeatureCache, so the next chunk sees them as its past. One cache belongs to one
stream (a video, or one spatial tile of it); the tiled VAE keeps one per tile.

Module and parameter names follow the official code (``vae2_1.py`` / ``vae2_2.py``, including
Sequential indices and the ``temperal`` spelling), so official state dicts load strict.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

CACHE_T = 2  # frames a 3-tap temporal convolution needs from the previous chunk
ENCODE_CHUNK = 4  # frames per encoder chunk after the first frame, as official


# ----------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan video VAE (field names as in the official constructors).

    Abstract: the version-specific constants live in Wan21VAEConfig / Wan22VAEConfig.
    """

    version: ClassVar[str]
    patch_size: ClassVar[int]  # pixels folded into channels before the encoder
    latents_mean: ClassVar[tuple[float, ...]]
    latents_std: ClassVar[tuple[float, ...]]

    dim: int
    z_dim: int
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_mult", tuple(self.dim_mult))
        object.__setattr__(self, "temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} flags "
                             f"(one per downsampling), got {self.temperal_downsample}")
        if self.z_dim != len(self.latents_mean):
            raise ValueError(f"Wan {self.version} VAE latents have {len(self.latents_mean)} "
                             f"channels (its latent mean/std), got z_dim={self.z_dim}")

    @property
    def channels(self) -> int:
        """Channels entering the encoder / leaving the decoder: RGB times the patch."""
        return 3 * self.patch_size**2

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class Wan21VAEConfig(VAEConfig):
    """Wan 2.1 VAE (also used by Wan 2.2 A14B): 16 latent channels, 4x8x8 compression."""

    version: ClassVar[str] = "2.1"
    patch_size: ClassVar[int] = 1
    latents_mean: ClassVar[tuple[float, ...]] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    latents_std: ClassVar[tuple[float, ...]] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

    dim: int = 96
    z_dim: int = 16


@dataclass(frozen=True)
class Wan22VAEConfig(VAEConfig):
    """Wan 2.2 VAE (TI2V-5B): 48 latent channels, 4x16x16 compression, wider decoder."""

    version: ClassVar[str] = "2.2"
    patch_size: ClassVar[int] = 2
    latents_mean: ClassVar[tuple[float, ...]] = (
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
        -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
        -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
        -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
        0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
    latents_std: ClassVar[tuple[float, ...]] = (
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
        0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
        0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
        0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
        0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

    dim: int = 160
    z_dim: int = 48
    dec_dim: int = 256  # the decoder's base width


WAN21_VAE = Wan21VAEConfig()
WAN22_VAE = Wan22VAEConfig()


# ----------------------------------------------------------------------------- cache

class FeatureCache:
    """Per-layer tails of the previous time chunk, for one stream (a video or one tile).

    ``tails`` maps each temporal layer to the last input frames it saw; ``chunks`` counts the
    chunks done. The first chunk is special in both VAEs (the first frame is neither merged
    nor doubled in time), so layers ask ``first``. Tails stay on the activations' device; a
    caller that parks a cache elsewhere between chunks moves it back before the next one.
    """

    def __init__(self) -> None:
        self.tails: dict[nn.Module, Tensor] = {}
        self.chunks = 0

    @property
    def first(self) -> bool:
        return self.chunks == 0

    def get(self, layer: nn.Module) -> Tensor | None:
        return self.tails.get(layer)

    def put(self, layer: nn.Module, tail: Tensor) -> None:
        self.tails[layer] = tail


def time_chunks(length: int, size: int) -> list[slice]:
    """The causal chunking: frame 0 alone, then chunks of ``size`` frames (the last may be short)."""
    return [slice(0, min(1, length))] + [slice(i, min(i + size, length)) for i in range(1, length, size)]


class Causal:
    """Marker: the layer's forward is ``forward(x, cache)`` and carries state across chunks."""


def run(layers: Iterable[nn.Module], x: Tensor, cache: FeatureCache) -> Tensor:
    """Apply ``layers`` in order, handing the cache to the causal ones. Convolutions and
    resamples get their input to keep (``consume``): unless the caller holds it too, it is
    freed as soon as its padded or reshaped copy exists, before the big operation runs."""
    for layer in layers:
        if isinstance(layer, (CausalConv3d, Resample)):
            box = [x]
            del x
            x = layer.consume(box, cache)
        else:
            x = layer(x, cache) if isinstance(layer, Causal) else layer(x)
    return x


def per_frame(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a 2-D operation to every frame of [B, C, T, H, W]."""
    t = x.shape[2]
    return rearrange(fn(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", t=t)


# ----------------------------------------------------------------------------- layers

class CausalConv3d(nn.Conv3d, Causal):
    """3-D convolution padded only towards the past in time.

    With a cache, the past is the previous chunk's last ``CACHE_T`` input frames (zeros before
    the first chunk), so chunked and whole-sequence results agree.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        t, h, w = self.padding
        self._pad = (w, w, h, h, 2 * t, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: Tensor, cache: FeatureCache | None = None) -> Tensor:
        return super().forward(self._padded(x, self._remember(x, cache)))

    def consume(self, box: list[Tensor], cache: FeatureCache | None = None) -> Tensor:
        """``forward(box.pop(), cache)``, dropping this call's reference to the input once it
        is padded: a caller that hands it over this way (``run``) keeps no other, so the
        input is not alive beside its padded copy and the output during the convolution."""
        x = box.pop()
        padded = self._padded(x, self._remember(x, cache))
        del x
        return super().forward(padded)

    def _remember(self, x: Tensor, cache: FeatureCache | None) -> Tensor | None:
        """The previous chunk's tail from ``cache``, which now keeps this chunk's instead."""
        if cache is None or not self._pad[4]:  # a 1-tap conv in time needs no past
            return None
        prev = cache.get(self)
        tail = x[:, :, -CACHE_T:].clone()  # a clone: a view would keep all of x alive
        if tail.shape[2] < CACHE_T and prev is not None:
            tail = torch.cat([prev[:, :, -1:], tail], 2)
        cache.put(self, tail)
        return prev

    def _padded(self, x: Tensor, prev: Tensor | None) -> Tensor:
        """[zeros, prev, x] in time, zero-padded in space: the official ``F.pad(cat([prev, x]))``
        written into one buffer, so no concatenated copy lives beside it during the convolution."""
        w, _, h, _, past, _ = self._pad
        if prev is not None and past > 0:
            prev = prev[:, :, -past:]
        else:
            prev = None  # no past frames to fill (a 1-tap conv), as official
        if not (w or h or past):
            return x.contiguous()
        b, c, t, height, width = x.shape
        out = x.new_zeros(b, c, past + t, height + 2 * h, width + 2 * w)
        rows, cols = slice(h, h + height), slice(w, w + width)
        if prev is not None:
            out[:, :, past - prev.shape[2]:past, rows, cols] = prev
        out[:, :, past:, rows, cols] = x
        return out


class RMSNorm(nn.Module):
    """L2 norm over channels times sqrt(C) and a learned gain (official RMS_norm, no bias)."""

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (3 if video else 2)))

    def forward(self, x: Tensor) -> Tensor:
        # in place on normalize's fresh result: one temporary instead of three (same products)
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)


class ResidualBlock(nn.Module, Causal):
    """(norm, SiLU, causal conv) x 2 plus a 1x1x1 conv shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(  # SiLU in place: it always follows a norm's fresh output
            RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(inplace=True),
            nn.Identity(),  # official Dropout(0): keeps the second conv at index 6
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        out = run(self.residual, x, cache)
        out += self.shortcut(x)  # in place: no third block-sized tensor beside the two summands
        return out


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = per_frame(self._attend, x)
        out += x
        return out

    def _attend(self, y: Tensor) -> Tensor:
        # Tensor layouts as official: other strides pick other kernels and round differently.
        qkv = rearrange(self.to_qkv(self.norm(y)), "n c h w -> n 1 (h w) c").contiguous()
        out = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(y.shape))


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x in space: every pixel repeated 2x2, which is what the official
    ``nearest-exact`` interpolation does at scale 2. One copy in the input's dtype, where the
    official float32 round trip (for bfloat16) makes three."""

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class Resample(nn.Module, Causal):
    """2x down/up-sampling in space, and in time for the ``*3d`` modes.

    Time runs causally: downsampling merges each frame pair with the frame before it, and
    upsampling doubles every frame but the video's first, so 1 + 4n frames <-> 1 + n latents.
    """

    def __init__(self, dim: int, mode: str, up_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            # up_dim: channels after upsampling (2.1 halves them, 2.2 keeps them)
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, up_dim, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        return self.consume([x], cache)

    def consume(self, box: list[Tensor], cache: FeatureCache) -> Tensor:
        """``forward(box.pop(), cache)``; each intermediate is dropped as soon as the next
        exists (see ``CausalConv3d.consume``)."""
        x = box.pop()
        if self.mode == "upsample3d" and not cache.first:
            # One conv yields two frames per input frame, interleaved in time; they go straight
            # to the per-frame layout (one copy, not two).
            box.append(x)
            del x
            frames = self.time_conv.consume(box, cache)
            t = 2 * frames.shape[2]
            frames = rearrange(frames, "b (two c) t h w -> (b t two) c h w", two=2)
        else:
            t = x.shape[2]
            frames = rearrange(x, "b c t h w -> (b t) c h w")
            del x
        for layer in self.resample:
            frames = layer(frames)
        x = rearrange(frames, "(b t) c h w -> b c t h w", t=t)
        del frames
        if self.mode == "downsample3d":
            prev = cache.get(self.time_conv)
            cache.put(self.time_conv, x[:, :, -1:].clone())
            if prev is not None:  # the first frame passes alone
                box.append(torch.cat([prev, x], 2))
                del x
                x = self.time_conv.consume(box)
        return x


def res_blocks(in_dim: int, out_dim: int, n: int) -> list[nn.Module]:
    """``n`` residual blocks, the first one changing the width."""
    return [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(n)]


def middle_block(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head_block(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(dim), nn.SiLU(inplace=True), CausalConv3d(dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module, Causal):
    """conv1 -> downsamples -> middle (with attention) -> head; the stages come from the version."""

    def __init__(self, in_dim: int, dim: int, downsamples: list[nn.Module], out_dim: int,
                 z2: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(in_dim, dim, 3, padding=1)
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = middle_block(out_dim)
        self.head = head_block(out_dim, z2)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        return run((self.conv1, *self.downsamples, *self.middle, *self.head), x, cache)


class Decoder3d(nn.Module, Causal):
    """conv1 -> middle (with attention) -> upsamples -> head; the stages come from the version."""

    def __init__(self, z_dim: int, dim: int, upsamples: list[nn.Module], out_dim: int,
                 channels: int) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(z_dim, dim, 3, padding=1)
        self.middle = middle_block(dim)
        self.upsamples = nn.Sequential(*upsamples)
        self.head = head_block(out_dim, channels)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        return run((self.conv1, *self.middle, *self.upsamples, *self.head), x, cache)


def patchify(x: Tensor, p: int) -> Tensor:
    return x if p == 1 else rearrange(x, "b c t (h q) (w r) -> b (c r q) t h w", q=p, r=p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    return x if p == 1 else rearrange(x, "b (c r q) t h w -> b c t (h q) (w r)", q=p, r=p)


# ----------------------------------------------------------------------------- the VAE

class WanVAE(nn.Module):
    """A Wan video VAE: ``encoder``, ``conv1`` (to mean/log-variance), ``conv2``, ``decoder``.

    Latents outside this class are normalised with the model's latent mean/std, as the
    official wrappers return them. Videos are [B, 3, F, H, W] in [-1, 1]. Outputs are float32
    whatever the weights' dtype; inputs are cast to the weights' dtype and device.
    """

    def __init__(self, config: VAEConfig, encoder: Encoder3d, decoder: Decoder3d) -> None:
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = encoder
        self.conv1 = CausalConv3d(z * 2, z * 2, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = decoder

    def normalize(self, mu: Tensor) -> Tensor:
        """Raw posterior mean -> normalised latent, in float32: (mu - mean) * (1 / std)."""
        mean, inv_std = self._stats(mu.device)
        return (mu.float() - mean) * inv_std

    def denormalize(self, latent: Tensor) -> Tensor:
        """Normalised latent -> raw posterior mean, in float32."""
        mean, inv_std = self._stats(latent.device)
        return latent.float() / inv_std + mean

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Built per call, not buffers: buffers would join the state dict or stay on meta.
        mean = torch.tensor(self.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.config.latents_std, device=device).view(1, -1, 1, 1, 1)
        return mean, inv_std

    @torch.no_grad()
    def encode_chunk(self, video: Tensor, cache: FeatureCache) -> Tensor:
        """Encode one time chunk of a video; returns its normalised latent frames.

        The first chunk of a stream is its first frame alone (-> 1 latent frame); every later
        chunk is a multiple of 4 frames (-> a quarter as many). Official encoding uses 4.
        """
        return self._to_latent(self._encode_frames(video, cache))

    @torch.no_grad()
    def decode_chunk(self, latent: Tensor, cache: FeatureCache) -> Tensor:
        """Decode normalised latent frames of one stream; not clamped (tiles blend first).

        The first chunk is 1 latent frame (-> 1 video frame); later chunks any number n of
        latent frames (-> 4n video frames). Official decoding uses chunks of 1.
        """
        return self._decode_frames(self._from_latent(latent), cache)

    @torch.no_grad()
    def encode(self, video: Tensor, chunk: int = ENCODE_CHUNK,
               on_chunk: Callable[[], None] | None = None) -> Tensor:
        """[B, 3, 1+4n, H, W] in [-1, 1] -> normalised latent [B, z_dim, 1+n, H/s, W/s].

        The first frame goes alone, then ``chunk`` frames at a time (a multiple of 4; official:
        4), each moved to the weights' device as it goes; ``on_chunk`` runs after each.
        """
        frames = video.shape[2]
        if (frames - 1) % ENCODE_CHUNK:
            raise ValueError(f"Wan VAE encodes 4n+1 frames (1, 5, 9, ..., 81); got {frames}")
        cache = FeatureCache()
        features = []
        for s in time_chunks(frames, chunk):
            features.append(self._encode_frames(video[:, :, s], cache))
            if on_chunk is not None:
                on_chunk()
        # conv1 over the whole sequence as official (per chunk differs only by rounding)
        return self._to_latent(torch.cat(features, 2))

    @torch.no_grad()
    def decode(self, latent: Tensor, chunk: int = 1) -> Tensor:
        """Normalised latent [B, z_dim, T, h, w] -> video [B, 3, 1+4(T-1), h*s, w*s] in [-1, 1];
        the first latent frame alone, then ``chunk`` at a time (official: 1)."""
        return torch.cat(list(self.decode_stream(latent, chunk)), 2).clamp_(-1, 1)

    @torch.no_grad()
    def decode_stream(self, latent: Tensor, chunk: int = 1) -> Iterator[Tensor]:
        """``decode``'s video chunk by chunk, not clamped (tiles blend first): 1 frame for the
        first latent frame, then 4 per latent frame, ``chunk`` latent frames at a time. The
        latent goes to the weights' device whole (it is small), frames leave as they come."""
        x = self._from_latent(latent)
        cache = FeatureCache()
        for s in time_chunks(x.shape[2], chunk):
            yield self._decode_frames(x[:, :, s], cache)

    def _encode_frames(self, video: Tensor, cache: FeatureCache) -> Tensor:
        n = video.shape[2]
        if not (n == 1 if cache.first else n > 0 and n % ENCODE_CHUNK == 0):
            raise ValueError(f"encode_chunk: the first chunk must be 1 frame and later ones a multiple "
                             f"of {ENCODE_CHUNK}; got {n} frames for chunk {cache.chunks}")
        (h, w), unit = video.shape[-2:], self.config.spatial_compression
        if h % unit or w % unit:
            raise ValueError(f"Wan {self.config.version} VAE: video height and width must be "
                             f"multiples of {unit}, got {h}x{w}")
        weight = self.conv1.weight
        x = patchify(video.to(device=weight.device, dtype=weight.dtype), self.config.patch_size)
        out = self.encoder(x, cache)
        cache.chunks += 1
        return out

    def _to_latent(self, features: Tensor) -> Tensor:
        return self.normalize(self.conv1(features)[:, : self.config.z_dim])  # the posterior mean

    def _from_latent(self, latent: Tensor) -> Tensor:
        weight = self.conv2.weight
        return self.conv2(self.denormalize(latent).to(device=weight.device, dtype=weight.dtype))

    def _decode_frames(self, x: Tensor, cache: FeatureCache) -> Tensor:
        n = x.shape[2]
        if n == 0 or (cache.first and n != 1):
            raise ValueError(f"decode_chunk: the first chunk must be 1 latent frame, got {n}")
        out = unpatchify(self.decoder(x, cache), self.config.patch_size)
        cache.chunks += 1
        return out.float()
