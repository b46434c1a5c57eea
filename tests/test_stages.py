"""Encoder stages: the held DiT leaves the GPU only when an encoder needs its room, and a
stage that cannot fit even then runs on the CPU (simulated GPU: free memory is scripted)."""
from __future__ import annotations

import logging

import pytest
import torch

from wanfit.nodes import comfy, stages
from wanfit.optim import loading
from wanfit.wan.checkpoint import open_checkpoint

import factory

GIB = 2**30


class FakeDiT:
    def __init__(self, gpu: dict, nbytes: int):
        self.gpu, self.nbytes, self.closed = gpu, nbytes, False

    def close(self):
        self.closed = True
        self.gpu["free"] += self.nbytes


@pytest.fixture
def gpu(monkeypatch):
    """A 16 GiB card: ``free`` bytes; ComfyUI's models hold ``comfy_models`` more it can unload."""
    card = {"free": 0, "comfy_models": 0, "unload_asks": []}

    def unload(nbytes, device):
        card["unload_asks"].append(nbytes)
        card["free"] += card["comfy_models"]
        card["comfy_models"] = 0
    monkeypatch.setattr(comfy, "compute_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(comfy, "free_vram", lambda device: card["free"])
    monkeypatch.setattr(comfy, "unload_comfy_models", unload)
    monkeypatch.setattr(comfy, "free_memory_cache", lambda: None)
    yield card
    stages._LOADED.update(key=None, model=None)


def hold(card, nbytes):
    dit = FakeDiT(card, nbytes)
    stages._LOADED.update(key="expert", model=dit)
    return dit


def test_a_stage_that_fits_beside_the_dit_keeps_it(gpu):
    gpu["free"] = 8 * GIB
    dit = hold(gpu, 10 * GIB)
    assert stages.stage_device("VAE", GIB, 5 * GIB) == torch.device("cuda", 0)
    assert not dit.closed and stages._LOADED["model"] is dit and gpu["unload_asks"] == []


def test_the_held_dit_leaves_when_the_stage_needs_its_room(gpu):
    gpu["free"] = 4 * GIB
    dit = hold(gpu, 10 * GIB)
    assert stages.stage_device("VAE", GIB, 5 * GIB) == torch.device("cuda", 0)
    assert dit.closed and stages._LOADED["model"] is None


def test_comfy_models_are_unloaded_too(gpu):
    gpu.update(free=2 * GIB, comfy_models=6 * GIB)
    assert stages.stage_device("UMT5", 6 * GIB, GIB // 2) == torch.device("cuda", 0)
    need = 6 * GIB + GIB // 2 + stages.MARGIN
    assert gpu["unload_asks"] == [need]


def test_a_stage_too_big_for_the_card_runs_on_the_cpu(gpu, caplog):
    gpu["free"] = 3 * GIB
    hold(gpu, 3 * GIB)
    with caplog.at_level(logging.WARNING, logger="WanFit"):
        assert stages.stage_device("UMT5 (umt5.safetensors)", 11 * GIB, GIB // 2) == torch.device("cpu")
    assert "UMT5 (umt5.safetensors) needs 12.0 GiB" in caplog.text and "6.0 GiB is free" in caplog.text


def test_cpu_compute_device_needs_no_checks(monkeypatch):
    monkeypatch.setattr(comfy, "compute_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(comfy, "free_vram", lambda device: pytest.fail("no VRAM query on the CPU"))
    assert stages.stage_device("VAE", 10**12, 10**12) == torch.device("cpu")


def test_loaded_bytes_keep_fp8_and_cast_the_rest(tmp_path):
    files = factory.write_models(tmp_path, ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"])
    t5 = open_checkpoint(files["umt5_xxl_fp8_e4m3fn_scaled.safetensors"])
    assert any(t.dtype == torch.float8_e4m3fn for t in t5.tensors.values())
    tokenizer = t5.tensors["spiece_model"].nbytes  # in the file, not in the model
    for dtype in (torch.bfloat16, torch.float32):
        model, _ = loading.load_text_encoder(t5, dtype)
        in_model = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
        assert loading.loaded_bytes(t5, dtype) - tokenizer == in_model
    vae = open_checkpoint(files["wan_2.1_vae.safetensors"])
    model = loading.load_vae(vae, torch.float32)
    assert loading.loaded_bytes(vae, torch.float32) == sum(t.nbytes for t in model.state_dict().values())


def test_run_stage_falls_back_to_the_cpu_on_oom(monkeypatch, caplog):
    monkeypatch.setattr(comfy, "free_memory_cache", lambda: None)
    tried = []

    def run(device):
        tried.append(device.type)
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "frames"
    with caplog.at_level(logging.WARNING, logger="WanFit"):
        assert stages.run_stage("VAE decode", torch.device("cuda", 0), run) == "frames"
    assert tried == ["cuda", "cpu"]
    assert "VAE decode ran out of memory on cuda:0 (CUDA out of memory. Tried to allocate 2.00 GiB)" in caplog.text
    with pytest.raises(torch.OutOfMemoryError):  # nowhere left to go
        stages.run_stage("VAE decode", torch.device("cpu"), lambda d: run(torch.device("cuda")))
