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


def dit_shapes(model_type: str = "i2v", clip: bool = False) -> dict[str, tuple[int, ...]]:
    """Internal key -> shape of a tiny factory DiT (no weights)."""
    in_dim = {"t2v": 16, "i2v": 36, "ti2v": 48}[model_type]
    config = WanConfig(model_type, in_dim=in_dim, out_dim=48 if model_type == "ti2v" else 16, clip=clip,
                       clip_dim=CLIP_WIDTH, **DIT)
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
