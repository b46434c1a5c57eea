"""The plan counts the DiT as the engine loads it: a GGUF file's own bytes and its per-matmul
dequantisation, an unmerged LoRA's factors in every block and its extra matmuls."""
from __future__ import annotations

import pytest
import torch

import factory
from wanfit.nodes import stages
from wanfit.nodes.load import LoraChoice, ModelHandle
from wanfit.nodes.memory import MemorySettings, as_loaded, plan_job
from wanfit.nodes.types import ImageEmbeds
from wanfit.optim import gguf, lora, planner
from wanfit.wan.checkpoint import open_checkpoint
from wanfit.wan.detect import detect_dit_config

EMBEDS = ImageEmbeds(width=64, height=64, frames=9, y=torch.zeros(1, 20, 3, 8, 8))
BUDGET = MemorySettings(budget_gb=4.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    written = factory.write_models(root, ["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"])
    q4k = root / "wan2.2_i2v_high_noise_14B_Q4_K.gguf"
    factory.write_gguf_dit(q4k, "i2v", "Q4_K", state_dict=factory.dit_state_dict_wide("i2v"))
    return written["wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"], q4k


def _handle(ckpt, weight_format="auto", loras=()):
    return ModelHandle(ckpt, detect_dit_config(ckpt.shapes), weight_format, "bf16", "sdpa", loras=tuple(loras))


def test_a_gguf_model_is_planned_from_its_file(files):
    ckpt = gguf.open_gguf(files[1], expect="dit")
    job = plan_job(_handle(ckpt), EMBEDS, 3.5, torch.device("cpu"), BUDGET)
    counted = gguf.dit_bytes(ckpt, torch.bfloat16)
    assert (job.plan.dit.block, job.plan.dit.other) == (counted.block, counted.other)
    assert "Q4_K GGUF" in job.text
    # the same model dequantised at load: bf16 blocks, no per-matmul dequantisation
    bf16 = plan_job(_handle(ckpt, "bf16"), EMBEDS, 3.5, torch.device("cpu"), BUDGET)
    assert bf16.plan.dit.block > 2 * job.plan.dit.block
    assert job.plan.activations.peak >= bf16.plan.activations.peak


def test_the_trace_sees_a_gguf_layer_dequantise_its_weight():
    """What the plan counts of a GGUF matmul comes from GGUFLinear's own code: the weight
    dequantised for the call lives beside the output."""
    from wanfit.optim import memtrace

    layer = gguf.GGUFLinear(256, 512, True, gguf.QT.Q4_K, torch.bfloat16, device="meta")
    x = torch.empty(64, 256, dtype=torch.bfloat16, device="meta")
    counter = memtrace.LiveBytes()
    with torch.no_grad(), counter:
        counter.mark("call")
        layer(x)
    (phase,) = [p for p in counter.finish() if p.name == "call"]
    assert phase.outputs_peak >= 512 * 256 * 2 + 64 * 512 * 2


def test_an_unmerged_lora_adds_its_factors_to_each_block(files, tmp_path):
    ckpt = open_checkpoint(files[0], expect="dit")
    path = tmp_path / "lora.safetensors"
    factory.write_lora(path, "peft", rank=8)
    lf = lora.open_lora(path, ckpt.shapes)
    plain = plan_job(_handle(ckpt), EMBEDS, 3.5, torch.device("cpu"), BUDGET)
    choice = LoraChoice(lf, 1.0, "unmerged")
    job = plan_job(_handle(ckpt, loras=[choice]), EMBEDS, 3.5, torch.device("cpu"), BUDGET)
    with torch.device("meta"):
        meta = planner.build_dit(detect_dit_config(ckpt.shapes), "fp8_e4m3fn_scaled", torch.bfloat16)
    attached = lora.attach_unmerged(meta, [lora.AppliedLora(lf, 1.0)], torch.bfloat16)
    assert job.plan.dit.block_params == plain.plan.dit.block_params + attached.block_bytes[0]
    assert job.plan.activations.peak >= plain.plan.activations.peak
    assert "unmerged LoRA" in job.text
    merged = plan_job(_handle(ckpt, loras=[LoraChoice(lf, 1.0, "merged")]), EMBEDS, 3.5, torch.device("cpu"), BUDGET)
    assert merged.plan.dit == plain.plan.dit  # merged: nothing more on the device
    assert as_loaded(_handle(ckpt), stages.unmerged_loras(_handle(ckpt), None)) is None


# --- code around the block stack: step caches; context windows ---------------------------------

class _Job:  # what nodes/memory.cache_hook reads of a sampler's JobCache
    def __init__(self, policy, storage="compute"):
        from wanfit.optim.step_cache import StepCache
        self.cache = StepCache(policy, 20, storage=storage)


A14B = "Wan2.2 I2V-A14B expert"


def test_a_step_cache_is_traced_with_the_forward_and_its_residuals_held():
    """A14B at 81 frames: the cache wrapper keeps the stack's input through the blocks and
    stores a float32 residual per branch; run one branch at a time, the other branch's
    residual stays on the GPU too. None of it is restated in the planner."""
    from wanfit.nodes.memory import cache_hook
    from wanfit.optim.step_cache import EasyCache, MagCache, StepCache
    from wanfit.wan.model import PRESETS

    cfg = PRESETS[A14B]
    handle = ModelHandle(None, cfg, "fp8_e4m3fn_scaled")
    tokens, dim = 32760, cfg.dim
    kw = dict(frames=81, width=832, height=480, budget=24 * planner.GIB, host_ram=64 * planner.GIB)
    plain = {b: planner.plan_memory(A14B, cfg_batch=b, **kw) for b in (1, 2)}
    mag = MagCache(ratios=((1.0, 1.0),) * 20, threshold=0.1, skip_limit=2, retention=0.2)
    for batch in (1, 2):
        cached = planner.plan_memory(A14B, cfg_batch=batch, hook=cache_hook(_Job(mag), handle), **kw)
        # the trace: the stored residual and the stack input (bf16) show in the forward's peak
        assert cached.activations.peak > plain[batch].activations.peak
        # between calls: the branch the trace did not run (sequential CFG) holds its residual
        other = cached.sampler_bytes - plain[batch].sampler_bytes
        assert other == (4 * tokens * dim if batch == 1 else 0)
        assert "MagCache (residuals on the GPU)" in cached.explain()
    easy = planner.plan_memory(A14B, cfg_batch=1, hook=cache_hook(_Job(EasyCache()), handle), **kw)
    assert easy.sampler_bytes - plain[1].sampler_bytes == StepCache.held_bytes_for(
        EasyCache(), ("uncond",), tokens, dim, torch.bfloat16)
    on_cpu = planner.plan_memory(A14B, cfg_batch=1, hook=cache_hook(_Job(mag, "cpu"), handle), **kw)
    assert on_cpu.sampler_bytes == plain[1].sampler_bytes  # residuals on the host hold no VRAM
    windows = cache_hook(_Job(mag), handle, windows=3)
    assert windows.held(2, tokens) == 2 * StepCache.held_bytes_for(mag, ("cond", "uncond"), tokens, dim, torch.bfloat16)


def test_windowed_activations_follow_the_window_and_agree_with_a_cpu_measurement():
    """A tiny i2v DiT on the CPU: one denoise call of a 13-latent-frame video in windows of 4
    latent frames peaks where the plan's trace of a 4-frame forward says (plus the fused
    output), far below the whole video's."""
    from wanfit.optim.context import ContextWindows
    from wanfit.optim.hostmem import allocation_peak
    from wanfit.wan.denoise import Conditioning, make_denoiser
    from wanfit.wan.model import WanConfig, WanModel

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = WanConfig("i2v", in_dim=36, dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_len=32, text_dim=64,
                    freq_dim=64)
    model = WanModel(cfg).eval()
    frames, h, w = 13, 16, 16
    pos = Conditioning(torch.randn(1, 32, 64), torch.randn(1, 20, frames, h, w))
    x = torch.randn(1, 16, frames, h, w)
    windows = ContextWindows(length=4, overlap=1, schedule="standard_static")
    with torch.no_grad():
        whole = allocation_peak(lambda: make_denoiser(model, pos, None, 1.0)(x, 0.5, 0))
        windowed = allocation_peak(lambda: make_denoiser(model, pos, None, 1.0, windows=windows)(x, 0.5, 0))
    planned = planner.dit_activations(cfg, (4, h // 2, w // 2), 1, torch.float32, "fp32", "sdpa", "cpu")
    fused = x.nbytes  # the fused velocity, the size of the latent
    assert windowed < 0.5 * whole
    assert windowed == pytest.approx(planned.peak + fused, rel=0.15)
