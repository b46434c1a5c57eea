"""Memory planner: which DiT blocks stay on the GPU, which swap, where the encoders run.

Everything is computed before a byte of weights is read:

- weights: exact bytes per block from a meta-device ``WanModel`` with the fp8 layer rule
  (``fp8.should_quantize``) applied, packed as ``BlockSwapper`` packs them (each tensor
  256-byte aligned), plus the weights outside the blocks (embeddings, projections, head);
- activations: a replay of the DiT forward's allocations in program order (``_Tape``):
  every tensor ``wan/model.py`` creates, at its size and dtype, freed where CPython frees
  it. The peak of that replay is the activation peak; on CPU it equals the allocator's
  measured peak byte for byte in every case tests/test_planner.py runs. Which attention
  kernel runs matters: flash / memory-efficient kernels are O(L); SDPA's math fallback
  materialises L x L scores. The replay assumes the block loop drops each block's input
  once the next block has it, as ``WanModel.forward`` does;
- the plan: the smallest number of swapped blocks such that non-block weights + resident
  blocks + swap slots + activations (with a margin for allocator fragmentation) fit the
  budget. CFG runs cond and uncond as one batch of 2 unless running them one after the
  other lets more blocks stay resident: at tens of thousands of tokens a block's compute
  hides its copy, so what a swapped block really costs is pinned host RAM and bus traffic,
  and sequential CFG costs nothing else.

Encoders (UMT5, CLIP, VAE) run in their own stages with the DiT off the GPU; each goes to
the GPU when its weights and working memory fit the budget, else it runs on the CPU (the
nodes do the same at run time against the free VRAM: ``nodes/stages.py``). The
A14B experts take turns: the idle one stays on disk (mmap), so host RAM holds one
expert's swapped blocks at a time.

Bytes are reported in GiB (2**30), the unit ComfyUI and nvidia-smi print as "GB"/"MiB".
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..wan.clip_vision import VIT_H_14, ClipVisionEncoder
from ..wan.model import PRESETS, WanConfig, WanModel
from ..wan.t5 import TEXT_LEN, UMT5_XXL, UMT5Encoder
from ..wan.vae import build_vae
from ..wan.vae_common import WAN21_VAE, WAN22_VAE, VAEConfig
from . import fp8
from .loading import DTYPES, WEIGHT_FORMATS, t5_block_linear
from .offload import BlockLayout, state_tensors

GIB = 2**30
DEFAULT_RESERVE = int(1.5 * GIB)  # CUDA context, cuBLAS workspaces, a desktop, allocator slack
ACTIVATION_MARGIN = 0.10  # of the activation peak: caching-allocator fragmentation
ATTENTION = ("sdpa", "flash_attn", "sageattention", "math")
# VAE working memory per pixel of one frame (times the dtype size): ComfyUI's figures for
# the Wan VAEs (comfy/sd.py memory_used_encode / memory_used_decode), not measured here.
# VAE working memory, bytes per output pixel per byte of the compute dtype, (encode, decode):
# the tensors of the full-size VAEs, measured by bench/vae_memory.py (the most over 256x128
# and 512x256; ComfyUI's own estimates are 1.3-1.6x these). The headroom is for what a GPU
# adds (cuDNN workspaces, caching-allocator slack); it is a guess until measured on one.
_VAE_PER_PIXEL = {"2.1": (4600, 5500), "2.2": (2100, 5900)}
_VAE_HEADROOM = 1.15


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


# ----------------------------------------------------------------------------- sizes

def vae_config(config: WanConfig) -> VAEConfig:
    """The VAE a DiT works with: Wan 2.2's (x16) for TI2V-5B (48 latent channels), else 2.1's."""
    return WAN22_VAE if config.out_dim == WAN22_VAE.z_dim else WAN21_VAE


def latent_shape(config: WanConfig, frames: int, width: int, height: int) -> tuple[int, int, int]:
    """(F, H, W) of the latent for a video: 1 + (frames - 1) // 4 frames, pixels / 8 (2.1 VAE)
    or / 16 (2.2 VAE)."""
    s = vae_config(config).spatial_compression
    unit = s * config.patch_size[1]
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"Wan videos have 4n+1 frames (1, 5, ..., 81); got {frames}")
    if width % unit or height % unit:
        raise ValueError(f"width and height must be multiples of {unit} for this model; got {width}x{height}")
    return 1 + (frames - 1) // 4, height // s, width // s


def token_count(config: WanConfig, frames: int, width: int, height: int) -> int:
    """Tokens the DiT sees: latent frames x (H / 2) x (W / 2) after its 1x2x2 patches."""
    f, h, w = latent_shape(config, frames, width, height)
    pt, ph, pw = config.patch_size
    return (f // pt) * (h // ph) * (w // pw)


# ----------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class DitWeights:
    """Bytes of a DiT's weights in one storage format."""

    block: int  # one block packed as BlockSwapper packs it (device slot / pinned size)
    block_params: int  # one block's parameters + buffers, unpadded
    num_blocks: int
    other: int  # everything outside the blocks: embeddings, projections, head
    largest_linear: int  # bytes of the largest quantised Linear weight in the compute dtype

    @property
    def total(self) -> int:
        return self.block * self.num_blocks + self.other


def _storage(weights: str, compute_dtype: torch.dtype | None) -> tuple[torch.dtype | None, torch.dtype]:
    """(fp8 dtype or None, compute dtype) for a weight format name."""
    if weights not in WEIGHT_FORMATS or weights == "auto":
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_FORMATS[1:])}")
    if weights in DTYPES:
        if compute_dtype not in (None, DTYPES[weights]):
            raise ValueError(f"{weights} weights compute in {DTYPES[weights]}, not {compute_dtype}")
        return None, DTYPES[weights]
    return fp8.fp8_dtype(weights.removesuffix("_scaled")), compute_dtype or torch.bfloat16


def _meta_bytes(module: nn.Module) -> int:
    return sum(t.nbytes for t in state_tensors(module))


@functools.lru_cache(maxsize=64)
def dit_weights(config: WanConfig, weights: str = "bf16", compute_dtype: torch.dtype | None = None) -> DitWeights:
    """Exact weight bytes of ``config`` stored as ``weights`` (a ``loading.WEIGHT_FORMATS`` name).

    Built on the meta device, as ``loading.load_dit`` builds it: fp8 formats turn the Linear
    layers passing ``fp8.should_quantize`` into ``FP8Linear`` (fp8 weight, float32 scale,
    bias in the compute dtype); every other tensor is in the compute dtype.
    """
    fp8_dtype, dtype = _storage(weights, compute_dtype)
    with torch.device("meta"):
        model = WanModel(dataclasses.replace(config, num_layers=1)).to(dtype)  # blocks are alike
        largest = 0
        for path, layer in list(model.named_modules()):
            if type(layer) is nn.Linear and fp8_dtype and fp8.should_quantize(f"{path}.weight", layer.weight.shape):
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent), name, fp8.FP8Linear(
                    layer.in_features, layer.out_features, layer.bias is not None, fp8_dtype, dtype))
                largest = max(largest, layer.weight.numel() * dtype.itemsize)
    block = model.blocks[0]
    return DitWeights(block=BlockLayout(state_tensors(block)).nbytes, block_params=_meta_bytes(block),
                      num_blocks=config.num_layers, other=_meta_bytes(model) - _meta_bytes(block),
                      largest_linear=largest)


@functools.lru_cache(maxsize=16)
def encoder_bytes(kind: str, storage: str = "bf16") -> int:
    """Weight bytes of UMT5-XXL ("t5"), CLIP ViT-H ("clip") or a Wan VAE ("2.1", "2.2") stored
    as ``storage`` ("bf16", "fp16", "fp32" or, for T5, "fp8_e4m3fn": block Linears in fp8
    with a float32 scale, as ``loading.load_text_encoder`` keeps them)."""
    dtype = DTYPES.get(storage, torch.bfloat16)
    with torch.device("meta"):
        model = {"t5": lambda: UMT5Encoder(UMT5_XXL), "clip": lambda: ClipVisionEncoder(VIT_H_14),
                 "2.1": lambda: build_vae(WAN21_VAE), "2.2": lambda: build_vae(WAN22_VAE)}[kind]()
    total = 0
    for name, t in model.named_parameters():
        quantized = storage.startswith("fp8") and kind == "t5" and t5_block_linear(name, tuple(t.shape))
        total += t.numel() + 4 if quantized else t.numel() * dtype.itemsize
    return total


# ----------------------------------------------------------------------------- activations

def attention_kernel(attention: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel behind an attention backend, as far as memory goes: "flash" (PyTorch's flash
    or memory-efficient SDPA kernels, flash_attn: output + logsumexp, O(L)), "sage"
    (SageAttention: plus int8 / fp8 copies of q, k, v) or "math" (L x L scores in float32).

    On CUDA, SDPA runs flash (fp16 / bf16, head_dim <= 256) or memory-efficient attention
    (head_dim a multiple of 8 for fp16 / bf16, of 4 for float32); on CPU its fused kernel;
    anything else falls back to math.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r}: expected one of {', '.join(ATTENTION)}")
    if attention == "sdpa":
        aligned = head_dim % (8 if dtype in (torch.float16, torch.bfloat16) else 4) == 0
        return "flash" if device_type == "cpu" or (device_type == "cuda" and aligned) else "math"
    return {"flash_attn": "flash", "sageattention": "sage", "math": "math"}[attention]


class _Tape:
    """Live bytes as a forward allocates and frees tensors in program order, and their peak
    since the last ``mark``."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._keys = itertools.count()

    def new(self, nbytes: int) -> int:
        key = next(self._keys)
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return key

    def size(self, *keys: int) -> int:
        return sum(self._sizes[k] for k in keys)

    def mark(self) -> int:
        """The peak since the previous mark; the next peak starts from what is live now."""
        peak, self.peak = self.peak, self.live
        return peak

    def free(self, *keys: int) -> None:
        for key in keys:
            self.live -= self._sizes.pop(key)


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one DiT forward at ``tokens`` tokens and batch ``batch``."""

    tokens: int
    batch: int
    kernel: str
    held: int  # kept across the block stack: time embeddings, RoPE, text (and image) context
    block: int  # one block's peak above its input and ``held`` (blocks after the first)
    peak: int  # the whole forward's peak: embed, the blocks, head and unpatchify
    phase: str  # where ``peak`` happens
    residual: int  # the float32 residual stream [B, L, dim] between blocks


@dataclass
class _Forward:
    """Replays ``WanModel.forward``'s allocations on a ``_Tape``; sizes in bytes.

    Each method mirrors the code it is named after (wan/model.py, optim/fp8.py,
    wan/attention.py): a ``new`` for each tensor an op returns, a ``free`` where its last
    reference goes. Comments name the expression when it is not obvious.
    """

    c: WanConfig
    batch: int
    grid: tuple[int, int, int]
    s: int  # compute dtype size
    quantized: bool  # block Linears in fp8
    scaled_mm: bool  # fp8 Linears quantise their input for torch._scaled_mm
    kernel: str
    per_token_t: bool  # TI2V: a timestep per token, so e / e0 are [B, L, ...]
    host_rope: bool  # RoPE angles computed on this device (CPU) rather than on the host
    tape: _Tape = field(default_factory=_Tape)

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    def linear(self, rows: int, fin: int, fout: int, block: bool = True) -> int:
        """A Linear on [rows, fin] (a block's may be an FP8Linear); returns its output."""
        t, s = self.tape, self.s
        if block and self.quantized and self.scaled_mm and s == 2:
            scaled = t.new(rows * fin * s)  # x * (1 / scale), then fp8
            x8 = t.new(rows * fin)
            t.free(scaled)
            out = t.new(rows * fout * s)
            t.free(x8)
            return out
        if block and self.quantized:  # upcast path: the weight dequantised for the call
            w = t.new(fin * fout * s)
            out = t.new(rows * fout * s)
            t.free(w)
            return out
        return t.new(rows * fout * s)

    def rms_norm(self, n: int) -> int:
        """WanRMSNorm on n elements in the compute dtype."""
        t, s = self.tape, self.s
        y = t.new(4 * n if s != 4 else 0)  # x.float()
        t.free(t.new(4 * n))  # y.pow(2), gone after .mean
        yr = t.new(4 * n)
        typed = t.new(s * n) if s != 4 else yr  # .type_as(x)
        if s != 4:
            t.free(yr)
        out = t.new(s * n)  # * weight
        t.free(typed, y)
        return out

    def rope(self, x: int, n: int) -> int:
        """rope_apply(x, freqs).to(dtype); frees x (its argument)."""
        t, s = self.tape, self.s
        f = t.new(4 * n if s != 4 else 0)  # x.float()
        parts = []
        for _ in range(2):  # x0 * cos - x1 * sin, x0 * sin + x1 * cos
            a, b = t.new(2 * n), t.new(2 * n)
            parts.append(t.new(2 * n))
            t.free(a, b)
        out = t.new(4 * n)  # stack
        t.free(*parts, f, x)
        if s != 4:
            typed = t.new(s * n)
            t.free(out)
            out = typed
        return out

    def attention(self, lq: int, lk: int) -> int:
        """attention(q, k, v).flatten(2) for q [B, lq, C], k / v [B, lk, C]."""
        t, s, b, h, dim = self.tape, self.s, self.batch, self.c.num_heads, self.c.dim
        nq, nk, scores = b * lq * dim, b * lk * dim, b * h * lq * lk
        if self.kernel == "flash":
            lse = t.new(b * h * lq * 4)
            out = t.new(s * nq)  # laid out [B, L, N, D]: flatten(2) is a view
            t.free(lse)
            return out
        if self.kernel == "sage":  # estimate: smoothed k, int8 q / k, fp8 v
            km = t.new(s * nk)
            q8, k8 = t.new(nq), t.new(nk)
            t.free(km)
            v8 = t.new(nk)
            out = t.new(s * nq)
            t.free(q8, k8, v8)
            return out
        # SDPA math (_scaled_dot_product_attention_math): fp16 / bf16 inputs are upcast to
        # float32; matmul copies its [B, N, L, D] operands when B and N cannot fold into one
        # batch dimension; the softmax weights are also returned in the input dtype.
        up, fold = s != 4, b > 1 and h > 1
        q32, k32, v32 = t.new(4 * nq if up else 0), t.new(4 * nk if up else 0), t.new(4 * nk if up else 0)
        qs, ks = t.new(4 * nq), t.new(4 * nk)  # q and k^T scaled by sqrt(scale)
        copies = (t.new(4 * nq), t.new(4 * nk)) if fold else ()
        raw = t.new(4 * scores)
        t.free(*copies, ks)
        probs = t.new(4 * scores)
        t.free(t.new(scores), raw)  # _safe_softmax's -inf mask
        weights = t.new(s * scores) if up else probs
        vc = t.new(4 * nk if fold else 0)
        out = t.new(4 * nq)
        t.free(vc)
        if up:
            typed = t.new(s * nq)
            t.free(out, probs)
            out = typed
        t.free(qs, q32, k32, v32, weights)
        flat = t.new(s * nq)  # [B, N, L, D] -> flatten(2) copies
        t.free(out)
        return flat

    def modulate(self, normed: int, n: int, cast: bool = True) -> int:
        """_modulate(normed, shift, scale, runs), .to(dtype) when ``cast``; frees normed."""
        t, s, row = self.tape, self.s, self.batch * self.c.dim * 4
        if self.per_token_t:  # run by run into one float32 output
            out = t.new(4 * n)
            for _ in range(self.e_rows):
                t.free(t.new(row))  # 1 + scale of the run
            t.free(normed)
            m2 = out
        else:  # x.float() * (1 + scale) + shift
            one_plus = t.new(row)
            m = t.new(4 * n)
            t.free(normed, one_plus)
            m2 = t.new(4 * n)
            t.free(m)
        if s == 4 or not cast:
            return m2
        out = t.new(s * n)
        t.free(m2)
        return out

    def gated(self, n: int) -> int:
        """_gated(x, y, gate, runs): the new residual stream."""
        if self.per_token_t:  # y * gate run by run into the output, then += x
            return self.tape.new(4 * n)
        gated = self.tape.new(4 * n)
        out = self.tape.new(4 * n)
        self.tape.free(gated)
        return out

    @property
    def e_rows(self) -> int:
        """Rows of e / e0 per sample: TI2V's per-token timesteps come in two runs."""
        return 2 if self.per_token_t else 1

    def block(self, first: bool) -> int:
        """WanAttentionBlock.forward; returns the new residual stream (the input stays live)."""
        t, s, c, b, L = self.tape, self.s, self.c, self.batch, self.tokens
        n, rows, lt = b * L * c.dim, b * L, c.text_len
        mod = t.new(b * self.e_rows * 6 * c.dim * 4)  # modulation.float() + e0
        if first:  # x from embed: compute dtype, a transposed view of the patch embedding
            f = t.new(4 * n if s != 4 else 0)  # x.float()
            contig = t.new(4 * n)  # layer_norm makes its input contiguous
            normed = t.new(4 * n)
            t.free(contig)
            if s != 4:  # .type_as(x), then .float() again (run-wise modulation reads it as is)
                typed = t.new(s * n)
                t.free(normed, f)
                if self.per_token_t:
                    normed = typed
                else:
                    normed = t.new(4 * n)
                    t.free(typed)
        else:
            normed = t.new(4 * n)
        xm = self.modulate(normed, n)
        # self-attention
        qk = []
        for _ in range(2):
            lin = self.linear(rows, c.dim, c.dim)
            normed = self.rms_norm(n)
            t.free(lin)
            qk.append(self.rope(normed, n))
        v = self.linear(rows, c.dim, c.dim)
        att = self.attention(L, L)
        y = self.linear(rows, c.dim, c.dim)
        t.free(att, *qk, v, xm)
        x1 = self.gated(n)
        # cross-attention
        ln = t.new(4 * n)  # norm3(x), float32 like x
        xc = t.new(s * n) if s != 4 else ln
        if s != 4:
            t.free(ln)
        lin = self.linear(rows, c.dim, c.dim)
        q = self.rms_norm(n)
        t.free(lin)
        lin = self.linear(b * lt, c.dim, c.dim)
        k = self.rms_norm(b * lt * c.dim)
        t.free(lin)
        v = self.linear(b * lt, c.dim, c.dim)
        out = self.attention(L, lt)
        t.free(v)
        if c.clip:
            li = c.clip_pos_len or 257
            lin = self.linear(b * li, c.dim, c.dim)
            k_img = self.rms_norm(b * li * c.dim)
            t.free(lin, k)
            k = k_img
            v = self.linear(b * li, c.dim, c.dim)
            att = self.attention(L, li)
            t.free(v)
            total = t.new(s * n)
            t.free(att, out)
            out = total
        o = self.linear(rows, c.dim, c.dim)
        t.free(out, q, k, xc)
        x2 = t.new(4 * n)
        t.free(o, x1)
        # feed-forward; y (self-attention's output) lives until it is reassigned
        xf = self.modulate(t.new(4 * n), n)
        h = self.linear(rows, c.dim, c.ffn_dim)
        g = t.new(rows * c.ffn_dim * s)  # GELU
        t.free(h)
        y2 = self.linear(rows, c.ffn_dim, c.dim)
        t.free(g, xf, y)
        x3 = self.gated(n)
        t.free(y2, x2, mod)
        return x3

    def embed(self) -> tuple[int, list[int]]:
        """WanModel.embed with float32 inputs; returns (x, tensors held across the blocks)."""
        t, s, c, b, L = self.tape, self.s, self.c, self.batch, self.tokens
        vol = b * L * math.prod(c.patch_size)  # latent voxels
        cat = t.new(vol * c.in_dim * 4) if c.in_dim != c.out_dim else None  # cat([x, y])
        cast = t.new(vol * c.in_dim * s if s != 4 else 0)
        x = t.new(b * L * c.dim * s)  # patch embedding
        t.free(cast, *([cat] if cat is not None else []))
        if self.per_token_t:  # where t changes along the tokens: t[:, 1:] != t[:, :-1]
            t.free(t.new(b * (L - 1)))
        e, e0 = self.time_embed(b * self.e_rows)
        pad = t.new(b * c.text_len * c.text_dim * 4)
        text = t.new(b * c.text_len * c.text_dim * s) if s != 4 else pad  # .to(dtype)
        if s != 4:
            t.free(pad)
        h = self.linear(b * c.text_len, c.text_dim, c.dim, block=False)
        g = t.new(b * c.text_len * c.dim * s)
        t.free(h)
        context = self.linear(b * c.text_len, c.dim, c.dim, block=False)
        t.free(g, text)
        held = [e, e0, context]
        if c.clip:
            held.append(t.new(b * (c.clip_pos_len or 257) * c.dim * s))
        lc = L * c.head_dim // 2
        if self.host_rope:  # rope_freqs on this device: float64 angles, cos, sin, stack, float32
            angles, cos, sin = t.new(8 * lc), t.new(8 * lc), t.new(8 * lc)
            stacked = t.new(16 * lc)
            t.free(cos, sin)
            held.append(t.new(8 * lc))
            t.free(stacked, angles)
        else:  # computed on the host; only the float32 result comes over
            held.append(t.new(8 * lc))
        return x, held

    def time_embed(self, rows: int) -> tuple[int, int]:
        """WanModel.time_embed for ``rows`` timesteps: _linear32 upcasts each weight for its call."""
        t, c, up = self.tape, self.c, self.s != 4

        def linear32(fin: int, fout: int) -> int:
            w = t.new(fin * fout * 4 if up else 0)
            out = t.new(rows * fout * 4)
            t.free(w)
            return out

        h = linear32(c.freq_dim, c.dim)
        act = t.new(rows * c.dim * 4)  # silu
        t.free(h)
        e = linear32(c.dim, c.dim)
        t.free(act)
        act = t.new(rows * c.dim * 4)
        e0 = linear32(c.dim, 6 * c.dim)
        t.free(act)
        return e, e0

    def unembed(self, x: int) -> int:
        """Head and unpatchify; frees x, returns the output."""
        t, s, c, b, L = self.tape, self.s, self.c, self.batch, self.tokens
        n, p = b * L * c.dim, math.prod(c.patch_size) * c.out_dim
        mf = t.new(2 * c.dim * 4 if s != 4 else 0)  # modulation.float()
        mh = t.new(b * self.e_rows * 2 * c.dim * 4)
        t.free(mf)
        normed = self.modulate(t.new(4 * n), n, cast=False)  # the head stays float32
        w = t.new(c.dim * p * 4 if s != 4 else 0)  # _linear32: head weight in float32
        out = t.new(b * L * p * 4)
        t.free(w, normed, mh)
        video = t.new(b * L * p * 4)  # permute + reshape copies
        t.free(out, x)
        return video


def dit_activations(config: WanConfig, grid: tuple[int, int, int], batch: int = 1,
                    compute_dtype: torch.dtype = torch.bfloat16, weights: str = "bf16",
                    attention: str = "sdpa", device_type: str = "cuda", fp8_matmul: bool = True) -> Activations:
    """Activation bytes of one ``WanModel.forward`` over a token ``grid`` (F, H, W after patching).

    ``fp8_matmul``: fp8 Linears take the ``torch._scaled_mm`` path (CUDA, capability >= 8.9),
    quantising their input; otherwise each upcasts its weight for the call. Inputs (latent,
    conditioning, text features) and weights are not counted. TI2V-5B's per-token timesteps
    come in two runs (first frame, the rest), modulated run by run.
    """
    if not (config.qk_norm and config.cross_attn_norm):
        raise ValueError("the activation model covers the released Wan configs (qk_norm, cross_attn_norm)")
    fp8_dtype, dtype = _storage(weights, compute_dtype)
    kernel = attention_kernel(attention, device_type, dtype, config.head_dim)
    fw = _Forward(config, batch, tuple(grid), dtype.itemsize, fp8_dtype is not None,
                  fp8_matmul and device_type == "cuda", kernel, config.model_type == "ti2v", device_type == "cpu")
    t = fw.tape
    x, held = fw.embed()
    peaks = {"embedding": t.mark()}
    x1 = fw.block(first=True)
    t.free(x)
    peaks["first block"] = t.mark()
    start = t.live
    x2 = fw.block(first=False)
    peaks["a block"] = block = t.mark()
    t.free(x1)
    t.free(fw.unembed(x2))
    peaks["head"] = t.mark()
    phase = max(peaks, key=peaks.get)
    tokens = math.prod(grid)
    return Activations(tokens, batch, kernel, held=t.size(*held), block=block - start, peak=peaks[phase],
                       phase=phase, residual=4 * batch * tokens * config.dim)


# ----------------------------------------------------------------------------- the plan

class PlanError(ValueError):
    """The job cannot fit the budget; ``min_budget`` is the smallest budget that plans."""

    def __init__(self, message: str, min_budget: int):
        super().__init__(message)
        self.min_budget = min_budget


@dataclass(frozen=True)
class EncoderPlan:
    """Where one encoder runs, in its own stage (the DiT is off the GPU meanwhile)."""

    name: str  # "T5", "CLIP", "VAE"
    weight_bytes: int
    work_bytes: int  # working memory of the stage
    device: str  # "gpu" or "cpu"

    @property
    def total(self) -> int:
        return self.weight_bytes + self.work_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """A memory plan for one job. Sizes in bytes; ``explain()`` puts it in words."""

    model: str
    config: WanConfig
    frames: int
    width: int
    height: int
    latent: tuple[int, int, int]
    tokens: int  # tokens of the whole video
    window_tokens: int  # tokens per DiT call (= tokens without a context window)
    context_frames: int | None
    weights: str
    compute_dtype: torch.dtype
    batch: int  # 2: cond + uncond batched; 1: one at a time, or no CFG
    passes: int  # DiT calls per step
    experts: int
    dit: DitWeights
    activations: Activations
    margin: int  # fragmentation headroom kept on top of the activations
    sampler_bytes: int  # latents, conditioning, model outputs, solver history
    resident: int
    swapped: int
    prefetch: int
    slots: int
    encoders: tuple[EncoderPlan, ...]
    budget: int
    reserve: int | None  # what auto_budget held back, when the budget came from it
    host_ram: int | None
    sampling_vram: int
    peak_vram: int
    peak_host: int
    warnings: tuple[str, ...] = ()

    @property
    def resident_bytes(self) -> int:
        return self.resident * self.dit.block

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.dit.block

    @property
    def pinned_bytes(self) -> int:
        return self.swapped * self.dit.block

    def explain(self) -> str:
        """The plan in a short paragraph."""
        d, a = self.dit, self.activations
        f, h, w = self.latent
        text = [f"{self.model}: {self.frames} frames at {self.width}×{self.height} → latent {f}×{h}×{w} = "
                f"{self.tokens:,} tokens"]
        if self.window_tokens != self.tokens:
            text[-1] += f", {self.window_tokens:,} per {self.context_frames}-frame context window"
        cfg = {(2, 1): "cond and uncond batched (2 ×)", (1, 2): "cond and uncond one after the other",
               (1, 1): "no CFG pass"}[(self.batch, self.passes)]
        text[-1] += f" ({cfg})."
        text.append(f"{self.weights} weights {_gib(d.total)}: {d.num_blocks} blocks of {d.block / GIB:.2f} GiB "
                    f"+ {_gib(d.other)} outside the blocks.")
        kernel = {"flash": "flash attention, O(L)", "sage": "SageAttention, O(L)",
                  "math": "SDPA math fallback with L×L scores"}[a.kernel]
        text.append(f"Activations peak {_gib(a.peak)} in {a.phase} ({kernel}), plus {_gib(self.margin)} headroom.")
        if not self.swapped:
            text.append(f"All {d.num_blocks} blocks stay resident, nothing swaps.")
        else:
            sync = " (synchronous: copies do not overlap compute)" if self.prefetch == 0 else ""
            text.append(f"{self.resident} blocks stay resident and {self.swapped} swap through {self.slots} "
                        f"slot{'s' if self.slots > 1 else ''} with prefetch {self.prefetch}{sync}: "
                        f"{_gib(self.pinned_bytes * self.passes)} over the bus per step, "
                        f"{_gib(self.pinned_bytes)} pinned on the host.")
        text.append(f"Budget {_gib(self.budget)}: sampling peaks at {_gib(self.sampling_vram)}, "
                    f"{_gib(self.budget - self.sampling_vram)} to spare.")
        for e in self.encoders:
            if e.name == "VAE":
                where = "on the GPU once the DiT has left it" if e.device == "gpu" else "on the CPU"
                text.append(f"The VAE ({_gib(e.weight_bytes)}) decodes {where}.")
            else:
                where = "on the GPU and leaves it" if e.device == "gpu" else "on the CPU"
                text.append(f"{e.name} ({_gib(e.weight_bytes)}) runs {where} before sampling.")
        if self.experts > 1:
            text.append(f"The {self.experts} experts take turns: one is loaded at a time, the idle one stays on disk.")
        text.append(f"Peak VRAM {_gib(self.peak_vram)}, peak host RAM {_gib(self.peak_host)}"
                    + (f" of {_gib(self.host_ram)} available." if self.host_ram else "."))
        return " ".join(text + list(self.warnings))

    def to_dict(self) -> dict:
        """JSON-ready summary (bytes as integers)."""
        a = self.activations
        return {
            "model": self.model, "frames": self.frames, "width": self.width, "height": self.height,
            "latent": list(self.latent), "tokens": self.tokens, "window_tokens": self.window_tokens,
            "weights": self.weights, "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "batch": self.batch, "passes": self.passes, "experts": self.experts,
            "block_bytes": self.dit.block, "blocks": self.dit.num_blocks, "other_bytes": self.dit.other,
            "resident": self.resident, "swapped": self.swapped, "prefetch": self.prefetch, "slots": self.slots,
            "activation_peak": a.peak, "activation_phase": a.phase, "attention_kernel": a.kernel,
            "margin": self.margin, "sampler_bytes": self.sampler_bytes,
            "encoders": [dataclasses.asdict(e) for e in self.encoders],
            "budget": self.budget, "reserve": self.reserve, "host_ram": self.host_ram,
            "sampling_vram": self.sampling_vram, "peak_vram": self.peak_vram, "peak_host": self.peak_host,
            "warnings": list(self.warnings),
        }


def auto_budget(reserve: int = DEFAULT_RESERVE, total: int | None = None,
                device: torch.device | str | None = None) -> int:
    """A VRAM budget: ``total`` (a card's size) or the device's free memory now, less ``reserve``."""
    if total is None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: give the budget in bytes, or the card's total")
        total = torch.cuda.mem_get_info(device)[0]
    return max(0, total - reserve)


def _host_available() -> int:
    import psutil  # a ComfyUI requirement; only needed when host_ram is not given
    return psutil.virtual_memory().available


def _device_blocks(n: int, swapped: int, prefetch: int) -> int:
    """Blocks' worth of device memory: resident blocks + swap slots (BlockSwapper)."""
    return n - swapped + min(prefetch + 1, swapped)


def encoder_work(kind: str, width: int = 0, height: int = 0, vae_dtype: torch.dtype = torch.bfloat16,
                 encode: bool = False) -> int:
    """Working memory of one encoder stage: UMT5-XXL ("t5") on 2 prompts, CLIP ViT-H ("clip")
    on one image, or a Wan VAE ("2.1", "2.2") decoding (``encode``: encoding) width x height
    frames in ``vae_dtype``."""
    if kind == "t5":
        # attention scores and position bias in float32, the gated FFN in bf16 (an estimate;
        # small next to the weights)
        cfg = UMT5_XXL
        return 3 * 2 * cfg.num_heads * TEXT_LEN**2 * 4 + 4 * 2 * TEXT_LEN * cfg.d_ff * 2
    if kind == "clip":
        v, tokens = VIT_H_14, VIT_H_14.num_tokens
        return 3 * v.num_heads * tokens**2 * 4 + 4 * tokens * v.mlp_dim * 2
    per_pixel = _VAE_PER_PIXEL[kind][0 if encode else 1] * _VAE_HEADROOM
    return int(per_pixel * vae_dtype.itemsize * width * height)


def encoder_stage(name: str, weight_bytes: int, work_bytes: int, budget: int) -> EncoderPlan:
    """An encoder runs on the GPU (in a stage of its own, the DiT off it) when its weights and
    working memory fit the budget, else on the CPU."""
    return EncoderPlan(name, weight_bytes, work_bytes, "gpu" if weight_bytes + work_bytes <= budget else "cpu")


def _place_encoders(config: WanConfig, budget: int, t5_weights: str, vae_dtype: torch.dtype,
                    width: int, height: int, image: bool) -> tuple[EncoderPlan, ...]:
    """T5, CLIP (Wan 2.1 i2v) and the VAE (the larger of its encode and decode stages)."""
    plans = [encoder_stage("T5", encoder_bytes("t5", t5_weights), encoder_work("t5"), budget)]
    if config.clip:
        plans.append(encoder_stage("CLIP", encoder_bytes("clip", "fp16"), encoder_work("clip"), budget))
    vae = vae_config(config).version
    work = max(encoder_work(vae, width, height, vae_dtype, encode=e) for e in {False, image})
    storage = {torch.float32: "fp32", torch.float16: "fp16"}.get(vae_dtype, "bf16")
    plans.append(encoder_stage("VAE", encoder_bytes(vae, storage), work, budget))
    return tuple(plans)


def plan_memory(config: WanConfig | str, *, frames: int, width: int, height: int,
                budget: int | str = "auto", weights: str = "fp8_e4m3fn_scaled",
                compute_dtype: torch.dtype | None = None, cfg_batch: int | None = None, guidance: bool = True,
                attention: str = "sdpa", device_type: str = "cuda", fp8_matmul: bool = True,
                context_frames: int | None = None, experts: int | None = None, prefetch: int | None = None,
                reserve: int = DEFAULT_RESERVE, total: int | None = None, host_ram: int | None = None,
                t5_weights: str = "bf16", vae_dtype: torch.dtype = torch.bfloat16,
                margin: float = ACTIVATION_MARGIN) -> MemoryPlan:
    """Plan a job's memory before anything is loaded.

    ``config``: a WanConfig or a ``PRESETS`` name. ``budget``: VRAM bytes the job may use, or
    "auto": ``auto_budget(reserve, total)``, the card's ``total`` (default: free CUDA memory
    now) less ``reserve``. ``cfg_batch``: 2 (cond and uncond batched), 1 (one after the other)
    or None (2 unless 1 keeps more blocks resident); ``guidance=False`` is a single pass
    (CFG 1, e.g. the 4-step LoRAs). ``t5_weights``: "bf16" or "fp8_e4m3fn". ``attention``: "sdpa", "flash_attn",
    "sageattention" or "math"; with ``device_type`` it tells which kernel runs.
    ``fp8_matmul``: the GPU runs fp8 GEMMs (capability >= 8.9; ``fp8.scaled_mm_supported``).
    ``context_frames``: the context window in video frames (4n+1), if any. ``experts``: 2 for
    the A14B pair (default: from the preset name). ``prefetch``: the swap's prefetch depth
    (default 1, or 0 when only that fits). ``host_ram``: bytes available (default: now).
    ``margin``: headroom kept on top of the activation peak, as a fraction of it.

    Raises PlanError naming the smallest budget that works when even one swap slot and the
    activations do not fit.
    """
    model = config if isinstance(config, str) else next((k for k, v in PRESETS.items() if v == config), "Wan DiT")
    if isinstance(config, str):
        config = PRESETS[config]
    experts = experts or (2 if "A14B" in model else 1)
    fp8_dtype, dtype = _storage(weights, compute_dtype)
    reserve_used = None
    if budget == "auto":
        budget, reserve_used = auto_budget(reserve, total), reserve
    latent = latent_shape(config, frames, width, height)
    tokens = token_count(config, frames, width, height)
    window = min(context_frames or frames, frames)
    win_latent = latent_shape(config, window, width, height)
    grid = tuple(s // p for s, p in zip(win_latent, config.patch_size))
    d = dit_weights(config, weights, dtype)
    n = d.num_blocks

    # CFG modes in order of preference: (batch, DiT calls per step)
    modes = [(1, 1)] if not guidance else {2: [(2, 1)], 1: [(1, 2)], None: [(2, 1), (1, 2)]}[cfg_batch]
    latent_bytes = config.out_dim * math.prod(latent) * 4
    cond_bytes = (config.in_dim - config.out_dim) * math.prod(latent) * 4

    def need(batch: int) -> tuple[Activations, int, int]:
        act = dit_activations(config, grid, batch, dtype, weights, attention, device_type, fp8_matmul)
        # latent + noise + two solver history entries + per-call input and output, conditioning
        sampler = latent_bytes * (4 + 2 * batch) + cond_bytes * batch
        return act, math.ceil(act.peak * margin), sampler

    best = None
    for order, (batch, passes) in enumerate(modes):
        act, extra, sampler = need(batch)
        fixed = d.other + act.peak + extra + sampler
        depths = (prefetch,) if prefetch is not None else (1, 0)
        fits = [(p == 0 and prefetch is None, m, order, p)
                for p in depths for m in range(n + 1)
                if fixed + _device_blocks(n, m, p) * d.block <= budget]
        if fits:
            choice = min(fits)
            if best is None or choice < best[0]:
                best = (choice, batch, passes, act, extra, sampler)
    if best is None:
        lowest = min((d.other + a.peak + x + s + d.block, b) for b, _ in modes for a, x, s in [need(b)])
        raise PlanError(
            f"VRAM budget {_gib(budget)} is too small for {frames} frames at {width}×{height} with {weights} "
            f"weights: it needs at least {math.ceil(lowest[0] / GIB * 10) / 10:.1f} GiB (one "
            f"{d.block / GIB:.2f} GiB block slot, {_gib(d.other)} of weights outside the blocks and the "
            f"activations of {math.prod(grid) * lowest[1]:,} tokens). Use fewer frames, a lower resolution, "
            f"fp8 weights or a context window (e.g. 33 frames), or free VRAM.", lowest[0])
    (_, swapped, _, depth), batch, passes, act, extra, sampler = best
    slots = min(depth + 1, swapped)
    sampling_vram = d.other + act.peak + sampler + _device_blocks(n, swapped, depth) * d.block

    encoders = _place_encoders(config, budget, t5_weights, vae_dtype, width, height,
                               image=config.model_type != "t2v")
    gpu_stage = [e.total for e in encoders if e.device == "gpu"]
    peak_vram = max([sampling_vram, *gpu_stage])
    # Host: one expert's pinned swapped blocks (+ quantising one weight in float32 on the way);
    # an encoder on the CPU holds its weights there in its stage; decoded frames (float32).
    quantise = 2 * d.largest_linear // dtype.itemsize * 4 if fp8_dtype is not None else 0
    cpu_stage = [e.total for e in encoders if e.device == "cpu" and e.name != "VAE"]
    vae = encoders[-1]
    frames_bytes = frames * width * height * 3 * 4
    peak_host = max([swapped * d.block + quantise, *cpu_stage,
                     frames_bytes + (vae.total if vae.device == "cpu" else 0)])
    if host_ram is None:
        host_ram = _host_available()
    warnings = []
    if peak_host > host_ram:
        warnings.append(f"Warning: the plan needs {_gib(peak_host)} of host RAM and {_gib(host_ram)} is "
                        f"available: expect paging. Fewer frames or a lower resolution swap fewer blocks.")
    return MemoryPlan(
        model=model, config=config, frames=frames, width=width, height=height, latent=latent, tokens=tokens,
        window_tokens=math.prod(grid), context_frames=context_frames if window < frames else None,
        weights=weights, compute_dtype=dtype, batch=batch, passes=passes, experts=experts, dit=d,
        activations=act, margin=extra, sampler_bytes=sampler, resident=n - swapped, swapped=swapped,
        prefetch=depth if swapped else 0, slots=slots, encoders=encoders, budget=budget, reserve=reserve_used,
        host_ram=host_ram, sampling_vram=sampling_vram, peak_vram=peak_vram, peak_host=peak_host,
        warnings=tuple(warnings))


# ----------------------------------------------------------------------------- picture

_COLOURS = {"outside blocks": (120, 144, 156), "resident blocks": (33, 150, 243), "swap slots": (255, 152, 0),
            "activations": (233, 30, 99), "headroom": (244, 143, 177), "sampler": (156, 39, 176),
            "free": (230, 230, 230), "reserve": (158, 158, 158), "T5": (76, 175, 80), "CLIP": (0, 150, 136),
            "VAE": (205, 220, 57)}


def plan_image(plan: MemoryPlan, width: int = 960) -> torch.Tensor:
    """The plan as a bar chart: a ComfyUI IMAGE [1, H, W, 3], float in 0..1.

    The top bar splits the budget (and the reserve, when known) during sampling into weights
    outside the blocks, resident blocks, swap slots, activations, headroom and free space;
    below it one bar per encoder stage on the GPU, on the same scale (CPU ones in words).
    """
    from PIL import Image, ImageDraw, ImageFont  # ComfyUI depends on Pillow; only this picture needs it

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    rows = [("sampling", [("outside blocks", plan.dit.other), ("resident blocks", plan.resident_bytes),
                          ("swap slots", plan.slot_bytes), ("activations", plan.activations.peak),
                          ("headroom", plan.margin), ("sampler", plan.sampler_bytes),
                          ("free", max(0, plan.budget - plan.sampling_vram - plan.margin)),
                          ("reserve", plan.reserve or 0)])]
    rows += [(f"{e.name} (GPU)" if e.device == "gpu" else f"{e.name}: CPU, {e.total / GIB:.1f} GiB of host RAM",
              [(e.name, e.total)] if e.device == "gpu" else []) for e in plan.encoders]
    total = max(sum(b for _, b in segs) for _, segs in rows) or 1
    left, right, bar_h, gap, top = 110, 20, 34, 16, 36
    legend_top = top + len(rows) * (bar_h + gap)
    height = legend_top + 22 * math.ceil(len(_COLOURS) / 4) + 8
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), f"{plan.model}: {plan.frames} frames {plan.width}x{plan.height}, {plan.weights}, budget "
              f"{plan.budget / GIB:.1f} GiB: {plan.resident} blocks resident, {plan.swapped} swapped",
              fill=(0, 0, 0), font=font)
    scale = (width - left - right) / total
    for i, (label, segs) in enumerate(rows):
        y = top + i * (bar_h + gap)
        draw.text((10, y + bar_h // 2 - 8), label, fill=(0, 0, 0), font=font)
        x = float(left)
        for name, nbytes in segs:
            w = nbytes * scale
            if w >= 1:
                draw.rectangle([x, y, x + w, y + bar_h], fill=_COLOURS[name], outline=(255, 255, 255))
                if w > 60:
                    draw.text((x + 4, y + bar_h // 2 - 8), f"{nbytes / GIB:.1f}G", fill=(0, 0, 0), font=font)
            x += w
        if i == 0 and plan.reserve:  # the budget's edge
            edge = left + plan.budget * scale
            draw.line([edge, y - 4, edge, y + bar_h + 4], fill=(0, 0, 0), width=2)
    for k, name in enumerate(_COLOURS):
        x, y = 10 + (k % 4) * (width // 4), legend_top + (k // 4) * 22
        draw.rectangle([x, y, x + 14, y + 14], fill=_COLOURS[name])
        draw.text((x + 20, y), name, fill=(0, 0, 0), font=font)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (pixels.float() / 255)[None]
