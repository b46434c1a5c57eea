"""Encoder stages: the held DiT leaves the GPU only when an encoder needs its room, and a
stage that cannot fit even then runs on the CPU; the VAE tiles on the GPU first (simulated
GPU: free memory is scripted)."""
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


# ----------------------------------------------------------------------------- the VAE stage

class _Ckpt:
    name = "wan_2.1_vae.safetensors"


def _vae_handle(monkeypatch, weight_bytes: int = GIB // 4):
    from wanfit.nodes.load import VAEHandle
    from wanfit.wan.vae_common import WAN21_VAE

    monkeypatch.setattr(loading, "loaded_bytes", lambda ckpt, dtype: weight_bytes)
    return VAEHandle(_Ckpt(), WAN21_VAE)


def _untiled_need(vae, width, height, encode=False):
    from wanfit.optim.tiling import Tiling, work_bytes

    return (loading.loaded_bytes(vae.ckpt, torch.bfloat16) + stages.MARGIN
            + work_bytes(vae.config, Tiling(width, height), width, height, torch.bfloat16, encode))


def test_vae_whole_frames_when_they_fit(gpu, monkeypatch):
    vae = _vae_handle(monkeypatch)
    gpu["free"] = _untiled_need(vae, 1280, 720)
    device, tiles = stages.vae_stage_device(vae, 1280, 720, encode=False)
    assert device == torch.device("cuda", 0) and tiles.grid(vae.config, 1280, 720) == (1, 1)


def test_vae_that_does_not_fit_tiles_on_the_gpu(gpu, monkeypatch, caplog):
    """Not "does not fit -> CPU" any more: the largest tiles that fit, on the GPU, said so."""
    from wanfit.optim.tiling import work_bytes

    vae = _vae_handle(monkeypatch)
    need = _untiled_need(vae, 1280, 720)
    gpu["free"] = need // 3
    dit = hold(gpu, need // 4)  # leaves first: still not enough for whole frames
    with caplog.at_level(logging.INFO, logger="WanFit"):
        device, tiles = stages.vae_stage_device(vae, 1280, 720, encode=False)
    assert dit.closed and device == torch.device("cuda", 0)
    cols, rows = tiles.grid(vae.config, 1280, 720)
    assert cols * rows > 1
    left = gpu["free"] - loading.loaded_bytes(vae.ckpt, torch.bfloat16) - stages.MARGIN
    assert work_bytes(vae.config, tiles, 1280, 720, torch.bfloat16) <= left
    assert f"it runs in {cols}x{rows} tiles" in caplog.text


def test_vae_goes_to_the_cpu_only_when_no_tile_fits(gpu, monkeypatch, caplog):
    from wanfit.optim.tiling import TilingOptions

    vae = _vae_handle(monkeypatch)
    gpu["free"] = GIB // 4 + stages.MARGIN + 2**20  # the weights and hardly anything more
    with caplog.at_level(logging.WARNING, logger="WanFit"):
        assert stages.vae_stage_device(vae, 1280, 720, encode=True)[0] == torch.device("cpu")
    assert "even in the smallest tiles" in caplog.text
    # manual tiles that do not fit, and "off", go to the CPU as they are: no silent re-tiling
    gpu["free"] = _untiled_need(vae, 1280, 720) // 2
    manual = TilingOptions("manual", 1024, 64)
    assert stages.vae_stage_device(vae, 1280, 720, False, manual) == (torch.device("cpu"), manual.manual())
    off = TilingOptions("off")
    assert stages.vae_stage_device(vae, 1280, 720, False, off) == (torch.device("cpu"), off.whole(1280, 720))
    small = TilingOptions("manual", 256, 64)
    assert stages.vae_stage_device(vae, 1280, 720, False, small) == (torch.device("cuda", 0), small.manual())


def _oom_until(tile_pixels: int, tried: list):
    def run(device, tiles):
        tried.append((device.type, tiles.tile_pixels(1280, 720)))
        if device.type == "cuda" and tiles.tile_pixels(1280, 720) > tile_pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return "frames"
    return run


def test_vae_out_of_memory_retries_smaller_tiles_then_the_cpu(gpu, monkeypatch, caplog):
    from wanfit.optim.tiling import TilingOptions

    vae = _vae_handle(monkeypatch)
    gpu["free"] = _untiled_need(vae, 1280, 720)  # the estimate says whole frames fit
    tried = []
    with caplog.at_level(logging.WARNING, logger="WanFit"):
        assert stages.run_vae_stage("VAE decode", vae, 1280, 720, False, TilingOptions(),
                                    _oom_until(300_000, tried)) == "frames"
    assert [d for d, _ in tried] == ["cuda"] * len(tried) and tried[0][1] == 1280 * 720
    assert all(b < a for (_, a), (_, b) in zip(tried, tried[1:])) and tried[-1][1] <= 300_000
    assert "VAE decode ran out of memory on cuda:0 in whole 1280x720 frames" in caplog.text
    assert "retrying in" in caplog.text
    tried.clear()  # never fits on the GPU: smaller tiles down to the smallest, then the CPU
    assert stages.run_vae_stage("VAE decode", vae, 1280, 720, False, TilingOptions(), _oom_until(0, tried)) == "frames"
    assert tried[-1][0] == "cpu" and len(tried) > 3 and "running it on the CPU instead" in caplog.text
    tried.clear()  # "off" never tiles: straight to the CPU
    stages.run_vae_stage("VAE decode", vae, 1280, 720, False, TilingOptions("off"), _oom_until(0, tried))
    assert [d for d, _ in tried] == ["cuda", "cpu"]
