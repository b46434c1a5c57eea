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
