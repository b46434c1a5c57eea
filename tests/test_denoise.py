"""Guidance wiring: batched and sequential CFG agree; cfg 1 is the positive prediction."""
import torch

from wanfit.wan.denoise import Conditioning, make_denoiser
from wanfit.wan.model import WanConfig, WanModel


def _setup(model_type="t2v", clip=False):
    torch.manual_seed(0)
    in_dim = 36 if model_type == "i2v" else 16
    config = WanConfig(model_type, in_dim=in_dim, dim=64, ffn_dim=128, num_heads=4, num_layers=2,
                       freq_dim=32, text_dim=32, clip=clip, clip_dim=48)
    model = WanModel(config).eval()
    y = torch.randn(1, in_dim - 16, 2, 4, 4) if in_dim > 16 else None
    clip_fea = torch.randn(1, 257, 48) if clip else None
    pos = Conditioning(torch.randn(1, 512, 32), y, clip_fea)
    neg = Conditioning(torch.randn(1, 512, 32), y, clip_fea)
    return model, pos, neg


def test_batched_and_sequential_cfg_agree():
    model, pos, neg = _setup("i2v", clip=True)
    x = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        batched = make_denoiser(model, pos, neg, 3.5, batch_cfg=True)(x, 0.7, 0)
        sequential = make_denoiser(model, pos, neg, 3.5, batch_cfg=False)(x, 0.7, 0)
    assert (batched - sequential).abs().max() < 1e-5


def test_guidance_formula_and_cfg_one():
    model, pos, neg = _setup()
    x = torch.randn(1, 16, 2, 4, 4)
    with torch.no_grad():
        t = torch.tensor([700.0])
        cond = model(x, t, pos.context)
        uncond = model(x, t, neg.context)
        guided = make_denoiser(model, pos, neg, 5.0)(x, 0.7, 0)
        plain = make_denoiser(model, pos, neg, 1.0)(x, 0.7, 0)
    assert (guided - (uncond + 5.0 * (cond - uncond))).abs().max() < 1e-4
    assert torch.equal(plain, cond)
    assert (guided - cond).abs().max() > 1e-3  # the negative prompt does something


def test_run_blocks_hook_is_used():
    model, pos, neg = _setup()
    calls = []

    def run(state, call):
        calls.append((call.step, call.sigma, call.branches))
        for block in model.blocks:
            state.x = block(state.x, **state.block_kwargs)
        return state

    with torch.no_grad():
        make_denoiser(model, pos, neg, 2.0, run_blocks=run)(torch.randn(1, 16, 2, 4, 4), 0.5, 7)
    assert calls == [(7, 0.5, ("cond", "uncond"))]
    calls.clear()
    with torch.no_grad():
        make_denoiser(model, pos, neg, 2.0, batch_cfg=False, run_blocks=run)(torch.randn(1, 16, 2, 4, 4), 0.5, 3)
    assert calls == [(3, 0.5, ("cond",)), (3, 0.5, ("uncond",))]
