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
