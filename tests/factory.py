"""Tiny random Wan checkpoints under the file names ComfyUI users have.

Real weights cannot be downloaded here, so every file a workflow names is written with
the real key layout, dtype and format (ComfyUI prefix, Comfy-Org fp8 scaled storage with its
``scaled_fp8`` marker, an embedded sentencepiece tokenizer), shapes scaled down. Latent
channel counts stay real (16 / 48) because they tie DiT, VAE and conditioning together.
Used by the tests and by ``make demo``; deterministic for a given seed.
"""
from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from wanfit.optim import fp8
from wanfit.wan.clip_vision import ClipVisionConfig, ClipVisionEncoder
from wanfit.wan.model import WanConfig, WanModel
from wanfit.wan.t5 import UMT5Config, UMT5Encoder
from wanfit.wan.vae21 import WanVAE21
from wanfit.wan.vae22 import WanVAE22
from wanfit.wan.vae_common import Wan21VAEConfig, Wan22VAEConfig

TEXT_DIM = 64  # tiny UMT5 width = the DiT's text_dim
CLIP_WIDTH = 128  # tiny CLIP width = the DiT's clip_dim (2 heads of 64)
VOCAB = 256
DIT = dict(dim=128, ffn_dim=256, num_heads=1, num_layers=2, freq_dim=64, text_dim=TEXT_DIM)  # head_dim 128

T5 = UMT5Config(vocab_size=VOCAB, d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
CLIP = ClipVisionConfig(width=CLIP_WIDTH, num_layers=3, num_heads=2, mlp_dim=256, patch_size=14, image_size=224)
VAE21 = Wan21VAEConfig(dim=8, z_dim=16)
VAE22 = Wan22VAEConfig(dim=8, z_dim=48, dec_dim=8)

WORDS = ("a cat dog bird walks runs flies over under the lake mountain sunset city street night rain "
         "snow forest camera slowly pans zoom close up wide shot cinematic light red blue green "
         "person woman man child car boat river sky cloud ocean wave fire smoke dance jump").split()


def tokenizer_model(seed: int = 0) -> bytes:
    """A tiny unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2)."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, model_type="unigram",
                                   vocab_size=VOCAB, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2, hard_vocab_limit=False)
    return buf.getvalue()


def _randomize(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights; norms near 1 and everything else small, so activations stay sane."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            sd[name] = t
            continue
        noise = torch.randn(t.shape, generator=gen)
        if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight")) or "layer_norm" in name:
            sd[name] = 1.0 + 0.1 * noise
        else:
            fan_in = t.shape[1] * (t[0, 0].numel() if t.ndim > 2 else 1) if t.ndim >= 2 else t.shape[0]
            sd[name] = noise / fan_in**0.5
    return sd


def _fp8_scaled(sd: dict[str, torch.Tensor], predicate) -> dict[str, torch.Tensor]:
    """Comfy-Org ``*_fp8_scaled`` storage: fp8 weights + ``scale_weight`` + ``scaled_fp8`` marker."""
    out = {}
    for key, t in sd.items():
        if predicate(key, t):
            out[key], out[key.removesuffix("weight") + "scale_weight"] = fp8.quantize_weight(t, "e4m3fn")
        else:
            out[key] = t.to(torch.bfloat16)
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def dit_state_dict(model_type: str, clip: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    in_dim = {"t2v": 16, "i2v": 36, "ti2v": 48}[model_type]
    config = WanConfig(model_type, in_dim=in_dim, out_dim=48 if model_type == "ti2v" else 16, clip=clip,
                       clip_dim=CLIP_WIDTH, **DIT)
    return _randomize(WanModel(config), seed)


def _dit(model_type: str, clip: bool = False, storage: str = "fp16", seed: int = 0):
    def build() -> dict[str, torch.Tensor]:
        sd = dit_state_dict(model_type, clip, seed)
        if storage == "fp8_scaled":
            sd = _fp8_scaled(sd, fp8.should_quantize)
            return {"model.diffusion_model." + k: v for k, v in sd.items()}
        return {k: v.to(torch.float16 if storage == "fp16" else torch.bfloat16) for k, v in sd.items()}
    return build


def _t5(seed: int = 0) -> dict[str, torch.Tensor]:
    """Transformers / Comfy-Org key layout, fp8 scaled block Linears, tokenizer embedded."""
    internal = _randomize(UMT5Encoder(T5), seed)
    hf = {"shared.weight": internal["token_embedding.weight"],
          "encoder.final_layer_norm.weight": internal["norm.weight"]}
    names = {"attn.q": "0.SelfAttention.q", "attn.k": "0.SelfAttention.k", "attn.v": "0.SelfAttention.v",
             "attn.o": "0.SelfAttention.o", "norm1": "0.layer_norm", "norm2": "1.layer_norm",
             "pos_embedding.embedding": "0.SelfAttention.relative_attention_bias",
             "ffn.gate.0": "1.DenseReluDense.wi_0", "ffn.fc1": "1.DenseReluDense.wi_1",
             "ffn.fc2": "1.DenseReluDense.wo"}
    for i in range(T5.num_layers):
        for ours, theirs in names.items():
            hf[f"encoder.block.{i}.layer.{theirs}.weight"] = internal[f"blocks.{i}.{ours}.weight"]
    sd = _fp8_scaled(hf, lambda k, t: t.ndim == 2 and ".layer." in k and "relative_attention_bias" not in k)
    sd["spiece_model"] = torch.frombuffer(bytearray(tokenizer_model(seed)), dtype=torch.uint8)
    return sd


def _clip(seed: int = 0) -> dict[str, torch.Tensor]:
    """Transformers key layout under ``vision_model.``, as Comfy-Org's clip_vision_h."""
    sd = _randomize(ClipVisionEncoder(CLIP), seed)
    return {"vision_model." + k: v.to(torch.float16) for k, v in sd.items()}


def _vae(version: str, seed: int = 0) -> dict[str, torch.Tensor]:
    model = WanVAE21(VAE21) if version == "2.1" else WanVAE22(VAE22)
    return {k: v.to(torch.bfloat16) if version == "2.2" else v for k, v in _randomize(model, seed).items()}


# file name -> (ComfyUI model folder, builder)
FILES: dict[str, tuple[str, Callable[[], dict[str, torch.Tensor]]]] = {
    "wan2.1_t2v_1.3B_fp16.safetensors": ("diffusion_models", _dit("t2v", seed=1)),
    "wan2.1_i2v_480p_14B_fp16.safetensors": ("diffusion_models", _dit("i2v", clip=True, seed=2)),
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", _dit("t2v", storage="fp8_scaled", seed=3)),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", _dit("t2v", storage="fp8_scaled", seed=4)),
    "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", _dit("i2v", storage="fp8_scaled", seed=5)),
    "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", _dit("i2v", storage="fp8_scaled", seed=6)),
    "wan2.2_ti2v_5B_fp16.safetensors": ("diffusion_models", _dit("ti2v", seed=7)),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", lambda: _t5(seed=8)),
    "wan_2.1_vae.safetensors": ("vae", lambda: _vae("2.1", seed=9)),
    "wan2.2_vae.safetensors": ("vae", lambda: _vae("2.2", seed=10)),
    "clip_vision_h.safetensors": ("clip_vision", lambda: _clip(seed=11)),
}


def write_models(models_dir: str | Path, names: list[str] | None = None,
                 folders: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the named files (default: all) into ``models_dir/<folder>/``; existing files are
    kept. ``folders`` renames folders, e.g. ``{"diffusion_models": "unet"}`` for old layouts."""
    written = {}
    for name in names or list(FILES):
        folder, build = FILES[name]
        path = Path(models_dir) / (folders or {}).get(folder, folder) / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            save_file({k: v.contiguous() for k, v in build().items()}, str(tmp))
            tmp.rename(path)
        written[name] = path
    return written


# ============================================================================ LoRA files
# Tiny LoRAs for the tiny DiTs above, in every key format WanFit reads. Each builder also
# returns what the LoRA should do, computed here from the stored tensors and the format's
# own scaling rule (not by WanFit's code): {model key: float64 delta at strength 1}.

LORA_RANK = 4
LORA_FORMATS = ("lightx2v", "comfy", "bare", "kohya", "peft", "diffusers")
_LORA_PREFIX = {"lightx2v": "diffusion_model.", "comfy": "model.diffusion_model.", "bare": "",
                "kohya": "lora_unet_", "peft": "diffusion_model.", "diffusers": "transformer."}
_LORA_ALPHA = {"lightx2v": 8.0, "kohya": 2.0, "bare": 4.0}  # with rank 4: scales 2, 0.5, 1
_DIFFUSERS_CONFIG = {"r": LORA_RANK, "lora_alpha": 6.0, "rank_pattern": {"ffn.net.2": 2},
                     "alpha_pattern": {"attn2.to_out.0": 1.0}}
# diffusers' WanTransformer3DModel names of the tiny model's layers (as its converter renames them)
_DIFFUSERS_NAMES = {"self_attn": "attn1", "cross_attn": "attn2", "q": "to_q", "k": "to_k", "v": "to_v",
                    "o": "to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
                    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
                    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
                    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
                    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
                    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out"}


def dit_shapes(model_type: str = "i2v", clip: bool = False, dit: dict = DIT) -> dict[str, tuple[int, ...]]:
    """Internal key -> shape of a tiny factory DiT (no weights); ``dit``: its size."""
    in_dim = {"t2v": 16, "i2v": 36, "ti2v": 48}[model_type]
    config = WanConfig(model_type, in_dim=in_dim, out_dim=48 if model_type == "ti2v" else 16, clip=clip,
                       clip_dim=CLIP_WIDTH, **dit)
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WanModel(config).state_dict().items()}


def _diffusers_module(path: str) -> str:
    if path in _DIFFUSERS_NAMES:
        return _DIFFUSERS_NAMES[path]
    block, i, rest = path.split(".", 2)
    if rest in _DIFFUSERS_NAMES:
        return f"{block}.{i}.{_DIFFUSERS_NAMES[rest]}"
    attn, layer = rest.split(".")
    return f"{block}.{i}.{_DIFFUSERS_NAMES[attn]}.{_DIFFUSERS_NAMES[layer]}"


def lora_file(fmt: str, shapes: dict[str, tuple[int, ...]], seed: int = 0, rank: int = LORA_RANK,
              blocks: set[int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """(state dict, safetensors metadata, expected deltas) of a tiny LoRA in format ``fmt``.

    Low-rank factors for every Linear (2-D weight; only blocks in ``blocks`` when given);
    lightx2v adds .diff_b bias deltas, .diff norm deltas and .diff_m modulation deltas;
    comfy adds a conv LoRA on patch_embedding and a .diff on head.modulation.
    """
    gen = torch.Generator().manual_seed(seed)
    prefix, sd, expected = _LORA_PREFIX[fmt], {}, {}
    dtype = torch.bfloat16 if fmt == "lightx2v" else torch.float32

    def put(key: str, t: torch.Tensor) -> torch.Tensor:
        sd[key] = t.to(dtype).contiguous()
        return sd[key].double()

    def name(path: str) -> str:
        if fmt == "diffusers":
            return prefix + _diffusers_module(path)
        return prefix + (path.replace(".", "_") if fmt == "kohya" else path)

    for key, shape in shapes.items():
        path = key.removesuffix(".weight")
        block = int(path.split(".")[1]) if path.startswith("blocks.") else None
        if blocks is not None and block not in blocks:
            continue
        if len(shape) == 2 and key.endswith(".weight"):
            r = rank
            if fmt == "diffusers" and path.endswith("ffn.2"):
                r = _DIFFUSERS_CONFIG["rank_pattern"]["ffn.net.2"]
            a_key, b_key = (("lora_A.weight", "lora_B.weight") if fmt in ("peft", "diffusers")
                            else ("lora_down.weight", "lora_up.weight"))
            down = put(f"{name(path)}.{a_key}", torch.randn(r, shape[1], generator=gen) / shape[1] ** 0.5)
            up = put(f"{name(path)}.{b_key}", 0.2 * torch.randn(shape[0], r, generator=gen) / r ** 0.5)
            scale = 1.0
            if fmt in _LORA_ALPHA:
                sd[f"{name(path)}.alpha"] = torch.tensor(_LORA_ALPHA[fmt])
                scale = _LORA_ALPHA[fmt] / r
            elif fmt == "diffusers":
                alpha = 1.0 if path.endswith("cross_attn.o") else _DIFFUSERS_CONFIG["lora_alpha"]
                scale = alpha / r
            expected[key] = scale * up @ down
            bias = f"{path}.bias"
            if fmt == "lightx2v" and block is not None and bias in shapes:
                expected[bias] = put(f"{name(path)}.diff_b", 0.05 * torch.randn(shapes[bias], generator=gen))
        elif fmt == "lightx2v" and block is not None and len(shape) == 1 and "norm" in key:
            suffix = "diff_b" if key.endswith(".bias") else "diff"
            expected[key] = put(f"{name(path.removesuffix('.bias'))}.{suffix}", 0.05 * torch.randn(shape, generator=gen))
        elif fmt == "lightx2v" and block is not None and key.endswith(".modulation"):
            expected[key] = put(f"{prefix}blocks.{block}.diff_m", 0.02 * torch.randn(shape, generator=gen))
    if fmt == "comfy":
        out, cin, *kernel = shapes["patch_embedding.weight"]
        down = put(f"{prefix}patch_embedding.lora_down.weight",
                   torch.randn(rank, cin, *kernel, generator=gen) / (cin * 4) ** 0.5)
        up = put(f"{prefix}patch_embedding.lora_up.weight", 0.2 * torch.randn(out, rank, 1, 1, 1, generator=gen))
        expected["patch_embedding.weight"] = (up.flatten(1) @ down.flatten(1)).reshape(out, cin, *kernel)
        expected["head.modulation"] = put(f"{prefix}head.modulation.diff",
                                          0.02 * torch.randn(shapes["head.modulation"], generator=gen))
    metadata = {}
    if fmt == "diffusers":
        import json

        metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
            {f"transformer.{k}": v for k, v in _DIFFUSERS_CONFIG.items()})}
    return sd, metadata, expected


def write_lora(path: str | Path, fmt: str, model_type: str = "i2v", seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """Write a tiny LoRA for the factory DiT of ``model_type``; returns its expected deltas."""
    sd, metadata, expected = lora_file(fmt, dit_shapes(model_type), seed, **kwargs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata or None)
    return expected


def _lightx2v_lora(seed: int) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: lora_file("lightx2v", dit_shapes("i2v"), seed)[0]


# The bundled 4-step workflows' LoRAs (lightx2v key layout, made for the tiny i2v experts).
FILES.update({
    "wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors": ("loras", _lightx2v_lora(21)),
    "wan2.2_i2v_lightx2v_4steps_lora_v1_low_noise.safetensors": ("loras", _lightx2v_lora(22)),
})

# === GGUF files (optim/gguf.py) ================================================================
# Tiny GGUF DiTs / UMT5 encoders written with gguf.GGUFWriter the way the files in circulation
# were made: city96's ComfyUI-GGUF tools/convert.py (architecture "wan", original key names, F32
# for 1-D / <= 1024-element / ".modulation" tensors, the 5-D patch embedding added back in F32 by
# tools/fix_5d_tensors.py) followed by llama-quantize with its lcpp.patch (time_embedding kept
# F16; a tensor whose rows are not whole blocks of the target type falls back to F16).

import math as _math  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType as _QT  # noqa: E402

GGUF_WIDE_DIT = dict(DIT, dim=256, ffn_dim=512, num_heads=2)  # every block Linear row a whole 256-block
_FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
               "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
               "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
               "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M}


def _wide_dit(model_type: str, seed: int):
    """A wide tiny DiT (2 heads: two sequence-parallel ranks can split it), fp8 scaled."""
    def build() -> dict[str, torch.Tensor]:
        sd = _fp8_scaled(dit_state_dict_wide(model_type, seed), fp8.should_quantize)
        return {"model.diffusion_model." + k: v for k, v in sd.items()}
    return build


# Two-head experts and their LoRAs for the multi-GPU tests (the bundled names' DiTs have one head).
WIDE_HIGH, WIDE_LOW = "wanfit_wide_i2v_high_noise_fp8_scaled.safetensors", "wanfit_wide_i2v_low_noise_fp8_scaled.safetensors"
WIDE_LORA_HIGH, WIDE_LORA_LOW = "wanfit_wide_i2v_lora_high_noise.safetensors", "wanfit_wide_i2v_lora_low_noise.safetensors"
FILES.update({
    WIDE_HIGH: ("diffusion_models", _wide_dit("i2v", 31)),
    WIDE_LOW: ("diffusion_models", _wide_dit("i2v", 32)),
    WIDE_LORA_HIGH: ("loras", lambda: lora_file("lightx2v", dit_shapes("i2v", dit=GGUF_WIDE_DIT), 33)[0]),
    WIDE_LORA_LOW: ("loras", lambda: lora_file("lightx2v", dit_shapes("i2v", dit=GGUF_WIDE_DIT), 34)[0]),
})


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Q4_K blocks (uint8, rows of 144 bytes per 256 values) of float rows whose length is a
    multiple of 256. gguf.quants has no K-quant quantiser, so this is our own, simple one:
    per 32-value sub-block an unsigned 4-bit grid from min(x, 0) to max(x); the sub-block
    scales and mins as 6-bit multiples of two fp16 super-block scales (ggml's layout)."""
    x = np.asarray(data, dtype=np.float32)
    if x.shape[-1] % 256:
        raise ValueError(f"Q4_K needs rows of whole 256-value blocks, got {x.shape}")
    blocks = x.reshape(-1, 8, 32)
    low = np.minimum(blocks.min(-1), 0)
    scale, mins = (blocks.max(-1) - low) / 15, -low
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    df, dmf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        lm = np.where(dmf > 0, np.rint(mins / dmf), 0).clip(0, 63).astype(np.uint8)
        step, offset = (df * ls)[..., None], (dmf * lm)[..., None]
        q = np.where(step > 0, np.rint((blocks + offset) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.concatenate([(ls[:, :4] & 0x3F) | ((ls[:, 4:] >> 4) << 6),
                             (lm[:, :4] & 0x3F) | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], axis=-1).astype(np.uint8)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=-1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 256 * 144)


def gguf_quantize(data: np.ndarray, qtype: _QT) -> np.ndarray:
    """``data`` stored as ``qtype``: gguf.quants where it can quantise, our Q4_K otherwise."""
    return quantize_q4_k(data) if qtype == _QT.Q4_K else gguf.quants.quantize(data, qtype)


def gguf_dit_tensor_type(key: str, shape: tuple[int, ...], quant: str) -> _QT:
    """The ggml type city96's pipeline gives a DiT tensor when asked for ``quant`` (the rule
    lives beside the planner's estimate, in optim/gguf.py)."""
    from wanfit.optim.gguf import converter_tensor_type

    return converter_tensor_type(key, shape, quant)


def _write_gguf(path: Path, arch: str, quant: str, tensors: list[tuple[str, np.ndarray, _QT]],
                orig_shapes: dict[str, tuple[int, ...]], metadata: Callable | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_FILE_TYPES[quant])
    for name, shape in orig_shapes.items():
        writer.add_array(f"comfy.gguf.orig_shape.{name}", list(shape))
    if metadata is not None:
        metadata(writer)
    for name, data, qtype in tensors:
        writer.add_tensor(name, gguf_quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)
    return path


def write_gguf_dit(path: str | Path, model_type: str = "t2v", quant: str = "Q8_0", *, clip: bool = False,
                   seed: int = 0, state_dict: dict[str, torch.Tensor] | None = None, prefix: str = "",
                   nd_layout: str = "5d", arch: str = "wan", types: dict[str, str] | None = None) -> Path:
    """A tiny Wan DiT GGUF: ``factory.dit_state_dict(model_type, clip, seed)`` (or
    ``state_dict``) stored as ``quant`` ("F16", "BF16", "Q8_0", "Q4_0", ... "Q4_K").

    ``nd_layout``: "5d" writes the 5-D patch embedding as it is (fix_5d_tensors.py); "orig_shape"
    folds it to 4-D with its real shape in ``comfy.gguf.orig_shape.<name>`` (newer converters).
    ``prefix`` (e.g. "model.diffusion_model.") is put before every name. ``types`` gives some
    keys another type, as llama.cpp's mixes (Q4_K_M) do for some blocks' layers.
    """
    sd = state_dict if state_dict is not None else dit_state_dict(model_type, clip, seed)
    tensors, orig = [], {}
    for key, t in sd.items():
        data = t.float().numpy()
        qtype = gguf_dit_tensor_type(key, tuple(data.shape), (types or {}).get(key, quant))
        if data.ndim > 4 and nd_layout == "orig_shape":
            orig[prefix + key] = tuple(data.shape)
            data = data.reshape(*data.shape[:3], -1)
        tensors.append((prefix + key, data, qtype))
    return _write_gguf(path, arch, quant, tensors, orig)


def dit_state_dict_wide(model_type: str = "t2v", seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny DiT 256 wide (2 heads of 128): every block Linear can be stored in a K-quant."""
    in_dim = {"t2v": 16, "i2v": 36, "ti2v": 48}[model_type]
    config = WanConfig(model_type, in_dim=in_dim, out_dim=48 if model_type == "ti2v" else 16, **GGUF_WIDE_DIT)
    return _randomize(WanModel(config), seed)


# llama.cpp's T5 encoder names for the internal (official Wan) UMT5 keys
_T5_GGUF_NAMES = {"attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_o",
                  "norm1": "attn_norm", "norm2": "ffn_norm", "pos_embedding.embedding": "attn_rel_b",
                  "ffn.gate.0": "ffn_gate", "ffn.fc1": "ffn_up", "ffn.fc2": "ffn_down"}


def t5_internal_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return _randomize(UMT5Encoder(T5), seed)


def _protobuf_fields(data: bytes) -> dict[int, object]:
    """The last value of each top-level field of a protobuf message (varint and bytes only)."""
    fields, i = {}, 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number] = varint()
        elif wire == 2:
            n = varint()
            fields[number], i = data[i:i + n], i + n
        elif wire == 5:
            fields[number], i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
    return fields


def _t5_tokenizer_metadata(writer: gguf.GGUFWriter, model: bytes) -> None:
    """The vocabulary as llama.cpp's convert_hf_to_gguf stores a T5 sentencepiece model."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]
    normalizer = _protobuf_fields(_protobuf_fields(model)[3])  # ModelProto.normalizer_spec
    writer.add_tokenizer_model("t5")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(types)
    writer.add_add_space_prefix(bool(normalizer.get(3, 1)))
    writer.add_remove_extra_whitespaces(bool(normalizer.get(4, 1)))
    if normalizer.get(2):
        writer.add_precompiled_charsmap(normalizer[2])
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(sp.pad_id())


def write_gguf_t5(path: str | Path, quant: str = "Q8_0", seed: int = 0, tokenizer: str = "embedded") -> Path:
    """A tiny UMT5 encoder GGUF with llama.cpp's T5 names (``enc.blk.N.attn_q.weight``,
    ``token_embd.weight``, architecture "t5encoder", as city96's umt5-xxl-encoder-gguf).
    ``tokenizer``: "embedded" stores the sentencepiece vocabulary in the file's metadata as
    llama.cpp does; "beside" writes ``spiece.model`` next to the file instead."""
    internal = t5_internal_state_dict(seed)
    tensors = []
    for key, t in internal.items():
        if key == "token_embedding.weight":
            name = "token_embd.weight"
        elif key == "norm.weight":
            name = "enc.output_norm.weight"
        else:
            _, i, rest = key.split(".", 2)
            module = rest.removesuffix(".weight")
            name = f"enc.blk.{i}.{_T5_GGUF_NAMES[module]}.weight"
        data = t.float().numpy()
        if data.ndim == 1 or data.size <= 1024 or name == "token_embd.weight":
            qtype = _QT.F32 if data.ndim == 1 or data.size <= 1024 else _QT.F16
        else:
            qtype = gguf_dit_tensor_type(name, tuple(data.shape), quant)
        tensors.append((name, data, qtype))
    model = tokenizer_model(seed)
    out = _write_gguf(path, "t5encoder", quant, tensors, {},
                      metadata=(lambda w: _t5_tokenizer_metadata(w, model)) if tokenizer == "embedded" else None)
    if tokenizer == "beside":
        (Path(path).parent / "spiece.model").write_bytes(model)
    return out


# file name -> (ComfyUI model folder, write_gguf_dit arguments); the DiT seeds are those of the
# safetensors files of the same model above, so a GGUF and its fp8 / fp16 twin hold the same weights
GGUF_FILES: dict[str, tuple[str, dict]] = {
    "wan2.1_t2v_1.3B_F16.gguf": ("diffusion_models", dict(model_type="t2v", quant="F16", seed=1)),
    "wan2.2_i2v_high_noise_14B_Q8_0.gguf": ("diffusion_models", dict(model_type="i2v", quant="Q8_0", seed=5)),
    "wan2.2_i2v_low_noise_14B_Q8_0.gguf": ("diffusion_models", dict(model_type="i2v", quant="Q8_0", seed=6)),
    "wan2.2_i2v_high_noise_14B_Q4_K_M.gguf": ("diffusion_models", dict(model_type="i2v", quant="Q4_K", seed=5)),
    "wan2.2_i2v_low_noise_14B_Q4_K_M.gguf": ("diffusion_models", dict(model_type="i2v", quant="Q4_K", seed=6)),
}


def write_gguf_models(models_dir: str | Path, names: list[str] | None = None,
                      folders: dict[str, str] | None = None) -> dict[str, Path]:
    """Write the named GGUF files (default: all of GGUF_FILES) as :func:`write_models` does."""
    written = {}
    for name in names or list(GGUF_FILES):
        folder, kwargs = GGUF_FILES[name]
        path = Path(models_dir) / (folders or {}).get(folder, folder) / name
        if not path.exists():
            write_gguf_dit(path, **kwargs)
        written[name] = path
    return written


# byte offsets of each block type's fp16 scales (random bytes there could be NaN or inf)
GGUF_FP16_SCALES = {_QT.Q8_0: (0,), _QT.Q4_0: (0,), _QT.Q4_1: (0, 2), _QT.Q5_0: (0,), _QT.Q5_1: (0, 2),
                    _QT.Q2_K: (80, 82), _QT.Q3_K: (108,), _QT.Q4_K: (0, 2), _QT.Q5_K: (0, 2), _QT.Q6_K: (208,)}
_FLOAT_BITS = {_QT.F16: (np.uint16, 0x7C00), _QT.BF16: (np.uint16, 0x7F80), _QT.F32: (np.uint32, 0x7F800000)}


def random_gguf_blocks(qtype: _QT, n_blocks: int, seed: int = 0) -> np.ndarray:
    """``n_blocks`` random valid blocks of ``qtype`` as uint8 [n_blocks, type_size]: random
    bytes (every bit pattern of the packed values is a valid block), with finite fp16 scales
    of varied magnitude where the type has them and no inf / NaN for the float types."""
    rng = np.random.default_rng(seed)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    if qtype in _FLOAT_BITS:
        width, exponent = _FLOAT_BITS[qtype]
        values = raw.view(width)
        top = width(1 << (exponent.bit_length() - 1))
        values[(values & exponent) == exponent] &= ~top  # clear the exponent's top bit
        return raw
    for at in GGUF_FP16_SCALES[qtype]:
        scale = rng.standard_normal(n_blocks) * rng.choice([1e-3, 1e-2, 1.0], n_blocks)
        raw[:, at:at + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw
