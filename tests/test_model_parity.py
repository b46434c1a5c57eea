"""wan/model.py against the official Wan 2.2 code (wan22) and diffusers, on tiny random configs.

All float32 on CPU. Each comparison prints its max abs error. The installed wan22 WanModel has
no CLIP image input (Wan 2.1 i2v / FLF2V), so those two compare against diffusers only.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import wan22_module

from wanfit.wan.attention import attention, available_backends
from wanfit.wan.model import WanConfig, WanLayerNorm, WanModel, WanRMSNorm

TINY = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32)
CONFIGS = {
    "t2v": WanConfig("t2v", **TINY),
    "i2v_clip": WanConfig("i2v", in_dim=36, clip=True, clip_dim=40, **TINY),  # Wan 2.1 I2V
    "flf2v": WanConfig("i2v", in_dim=36, clip=True, clip_dim=40, clip_pos_len=514, **TINY),  # Wan 2.1 FLF2V
    "i2v": WanConfig("i2v", in_dim=36, **TINY),  # Wan 2.2 I2V-A14B expert: no CLIP
    "ti2v": WanConfig("ti2v", in_dim=48, out_dim=48, **TINY),  # Wan 2.2 TI2V-5B
}
FRAMES, HEIGHT, WIDTH = 3, 8, 12  # token grid (3, 4, 6): not square, to catch axis mix-ups
REL_TOL = 1e-5  # max abs error / max abs of the reference output
# wan22 opens autocast("cuda") regions, which warn on a machine without CUDA.
pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")


def make_model(cfg: WanConfig, seed: int = 0) -> WanModel:
    """Random weights; norm weights and the FLF2V position table moved off their 1 / 0 init."""
    torch.manual_seed(seed)
    model = WanModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (WanLayerNorm, WanRMSNorm)) and m.weight is not None:
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.add_(0.2 * torch.randn_like(m.bias))
        if cfg.clip_pos_len:
            model.img_emb.emb_pos.normal_(0, 0.5)
    return model


def make_inputs(cfg: WanConfig, t: tuple[float, ...] = (937.0, 215.0), seed: int = 1) -> dict:
    """Latent, timesteps (per token with the first frame at 0 for ti2v, as official), short text."""
    g = torch.Generator().manual_seed(seed)
    b = len(t)
    x = torch.randn(b, cfg.out_dim, FRAMES, HEIGHT, WIDTH, generator=g)
    t = torch.tensor(t)
    if cfg.model_type == "ti2v":
        per_frame = t[:, None].repeat(1, FRAMES)
        per_frame[:, 0] = 0
        t = per_frame[:, :, None, None].expand(b, FRAMES, HEIGHT // 2, WIDTH // 2).flatten(1)
    inputs = dict(x=x, t=t, context=torch.randn(b, 7, cfg.text_dim, generator=g))
    if cfg.in_dim > cfg.out_dim:
        inputs["y"] = torch.randn(b, cfg.in_dim - cfg.out_dim, FRAMES, HEIGHT, WIDTH, generator=g)
    if cfg.clip:
        inputs["clip_fea"] = torch.randn(b, cfg.clip_pos_len or 257, cfg.clip_dim, generator=g)
    return inputs


def run_wan22(cfg: WanConfig, state_dict: dict, inputs: dict, pad: int = 0) -> torch.Tensor:
    """The official model; it takes lists, pads tokens to seq_len and masks the padding."""
    official = wan22_module("model").WanModel(
        model_type=cfg.model_type, patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim,
        dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
        num_heads=cfg.num_heads, num_layers=cfg.num_layers, qk_norm=cfg.qk_norm,
        cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps).eval()
    official.load_state_dict(state_dict, strict=True)
    t, seq_len = inputs["t"], FRAMES * (HEIGHT // 2) * (WIDTH // 2) + pad
    # wan22 expands t [B] to [B, seq_len] with t.expand, which fails for B > 1: expand here.
    t = t[:, None].expand(-1, seq_len) if t.dim() == 1 else torch.cat([t, t[:, -1:].expand(-1, pad)], dim=1)
    y = list(inputs["y"]) if "y" in inputs else None
    with torch.no_grad():
        return torch.stack(official(list(inputs["x"]), t, list(inputs["context"]), seq_len, y=y))


def run_diffusers(cfg: WanConfig, state_dict: dict, inputs: dict) -> torch.Tensor:
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
        image_dim=cfg.clip_dim if cfg.clip else None, added_kv_proj_dim=cfg.dim if cfg.clip else None,
        pos_embed_seq_len=cfg.clip_pos_len or None).eval()
    converted = convert_wan_transformer_to_diffusers(dict(state_dict))
    if cfg.clip_pos_len:  # the converter has no entry for the FLF2V position table
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    model.load_state_dict(converted, strict=True)
    x = torch.cat([inputs["x"], inputs["y"]], dim=1) if "y" in inputs else inputs["x"]
    context = inputs["context"]  # diffusers expects text already zero-padded to 512
    context = torch.cat([context, context.new_zeros(context.shape[0], cfg.text_len - context.shape[1],
                                                    context.shape[2])], dim=1)
    clip_fea = inputs.get("clip_fea")
    if clip_fea is not None and cfg.clip_pos_len:  # diffusers views [2B, 257] as [B, 514]
        clip_fea = clip_fea.reshape(-1, 257, cfg.clip_dim)
    with torch.no_grad():
        return model(x, inputs["t"], context, encoder_hidden_states_image=clip_fea, return_dict=False)[0]


def max_error(name: str, ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Print and return the max abs error and the reference output's scale (max abs)."""
    assert ours.shape == ref.shape
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    print(f"{name}: max abs error {err:.3g} (output scale {scale:.3g})")
    return err, scale


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, rel_tol: float = REL_TOL) -> None:
    err, scale = max_error(name, ours, ref)
    assert err <= rel_tol * scale, f"{name}: max abs error {err:.3g} > {rel_tol:g} x {scale:.3g}"


def ours(cfg_name: str) -> tuple[WanConfig, WanModel, dict, torch.Tensor]:
    """Config, random model, inputs and our output for one of CONFIGS."""
    cfg = CONFIGS[cfg_name]
    model, inputs = make_model(cfg), make_inputs(cfg)
    with torch.no_grad():
        out = model(**inputs)
    return cfg, model, inputs, out


@pytest.mark.parity
@pytest.mark.parametrize("name", ["t2v", "i2v", "ti2v"])
def test_matches_wan22(name):
    cfg, model, inputs, out = ours(name)
    # Official pads the tokens to seq_len and masks the padding: pad a little to show it is moot.
    compare(f"{name} vs wan22", out, run_wan22(cfg, model.state_dict(), inputs, pad=5))


@pytest.mark.parity
@pytest.mark.parametrize("name", ["t2v", "i2v_clip", "flf2v", "i2v", "ti2v"])
def test_matches_diffusers(name):
    cfg, model, inputs, out = ours(name)
    compare(f"{name} vs diffusers", out, run_diffusers(cfg, model.state_dict(), inputs))


@pytest.mark.parity
def test_perturbed_weight_is_caught():
    cfg, model, inputs, out = ours("t2v")
    state_dict = model.state_dict()
    weight = state_dict["blocks.1.cross_attn.o.weight"]
    state_dict["blocks.1.cross_attn.o.weight"] = weight + 0.1 * weight.std() * torch.randn_like(weight)
    err, scale = max_error("t2v vs wan22, one weight perturbed by 10 %", out,
                           run_wan22(cfg, state_dict, inputs))
    assert err > 100 * REL_TOL * scale


@pytest.mark.parametrize("name", ["t2v", "i2v_clip", "ti2v"])
def test_batch_equals_single_samples(name):
    cfg, model, inputs, out = ours(name)
    with torch.no_grad():
        singles = torch.cat([model(**{k: v[i:i + 1] for k, v in inputs.items()}) for i in range(2)])
    compare(f"{name} batch of 2 vs one by one", out, singles, rel_tol=1e-6)


def test_block_loop_equals_forward():
    cfg, model, inputs, out = ours("ti2v")
    with torch.no_grad():
        state = model.embed(**inputs)
        assert state.e.dtype == state.e0.dtype == torch.float32
        first = HEIGHT // 2 * WIDTH // 2  # tokens of the first latent frame (timestep 0)
        assert state.runs == (first, state.x.shape[1] - first)
        assert state.e0.shape == (2, 2, 6, cfg.dim)  # one row per run, not per token
        for block in model.blocks:
            state.x = block(state.x, **state.block_kwargs)
        assert torch.equal(model.unembed(state), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_equal_per_token_embeddings(dtype):
    """Run-wise modulation is bit-identical to the official per-token form ([B, L, 6, C]
    embeddings broadcast token by token), also where batch samples switch at other tokens."""
    cfg = CONFIGS["ti2v"]
    model = make_model(cfg).to(dtype)
    inputs = make_inputs(cfg)
    t = inputs["t"].clone()
    t[1, 5:9] = 500.0  # sample 1 switches at two more tokens: runs split at 5, 9 and 24
    inputs["t"] = t
    with torch.no_grad():
        state = model.embed(**inputs)
        assert state.runs == (5, 4, 15, 48) and sum(state.runs) == t.shape[1]
        full = dataclasses.replace(state, runs=None,
                                   e=state.e.repeat_interleave(torch.tensor(state.runs), dim=1),
                                   e0=state.e0.repeat_interleave(torch.tensor(state.runs), dim=1))
        for s in (state, full):
            for block in model.blocks:
                s.x = block(s.x, **s.block_kwargs)
        assert torch.equal(state.x, full.x)
        assert torch.equal(model.unembed(state), model.unembed(full))
        # and the time embedding of each run is that of its timestep
        one = model.embed(**{**inputs, "t": torch.full((2,), 500.0)})
        assert torch.allclose(state.e0[1, 1], one.e0[1, 0], rtol=1e-5, atol=1e-6)


def test_low_precision_weights():
    """bf16 weights: linears in bf16, norms / modulation / residual / head in float32."""
    cfg, model, inputs, out = ours("i2v_clip")
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        state = model.embed(**inputs)
        assert state.x.dtype == state.context.dtype == torch.bfloat16 and state.e0.dtype == torch.float32
        state.x = model.blocks[0](state.x, **state.block_kwargs)
        assert state.x.dtype == torch.float32
        low = model(**inputs)
    assert low.dtype == torch.float32
    err = (low - out).abs().max().item() / out.abs().max().item()
    print(f"bf16 weights vs float32: relative error {err:.3g}")
    assert err < 0.05


def test_bad_inputs_are_named():
    cfg = CONFIGS["i2v_clip"]
    model, inputs = make_model(cfg), make_inputs(cfg)
    with pytest.raises(ValueError, match="36 input channels"):
        model(**{**inputs, "y": None})
    with pytest.raises(ValueError, match="clip_fea"):
        model(**{**inputs, "clip_fea": None})
    with pytest.raises(ValueError, match="text_len"):
        model(**{**inputs, "context": torch.zeros(2, 513, cfg.text_dim)})
    with pytest.raises(ValueError, match="per token"):
        model(**{**inputs, "t": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="must be one of"):
        dataclasses.replace(cfg, model_type="s2v")


def test_attention_backends():
    assert available_backends()[-1] == "sdpa"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) for n in (5, 7, 7))
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4, dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    for backend in ("auto", "sdpa"):
        compare(f"attention {backend} vs softmax", attention(q, k, v, backend), expected)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        attention(q, k, v, "xformers")
    for missing in {"sageattention", "flash_attn"} - set(available_backends()):
        with pytest.raises(ValueError, match=f"'{missing}' is not installed"):
            attention(q, k, v, missing)
