"""Whole jobs through the nodes on 1 process and on 2 ranks (CPU, gloo), compared bit for bit.

Run by tests/test_multigpu.py in a process of its own: ``MKL_CBWR=AVX2,STRICT`` (set before
MKL starts) makes a float32 GEMM's result independent of its row count, which a token split
changes (without it MKL picks kernels by size, and rows differ in the last bits), and 1 torch
thread here and in the worker keeps every sum in one order. Prints one JSON line per case.

    MKL_CBWR=AVX2,STRICT python tests/multigpu_cases.py MODELS_DIR
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack import register  # noqa: E402

register()
import factory  # noqa: E402
from wanfit.nodes import cache, comfy, encode, load, lora, multigpu, sample, speed  # noqa: E402
from wanfit.nodes.context import WanFitContextWindows  # noqa: E402
from wanfit.optim.pool import Pool, free_port  # noqa: E402


NAMES = [factory.WIDE_HIGH, factory.WIDE_LOW, factory.WIDE_LORA_HIGH, factory.WIDE_LORA_LOW,
         "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"]


class _Bar:
    def update_absolute(self, *a):
        pass


def standalone(models: dict[str, Path]) -> None:
    """The nodes' ComfyUI adapter answered here (no ComfyUI in this process)."""
    comfy.compute_device = lambda: torch.device("cpu")
    comfy.free_memory_cache = lambda: None
    comfy.throw_if_interrupted = lambda: None
    comfy.interrupted = lambda: False
    comfy.progress_bar = lambda total: _Bar()
    comfy.previews_enabled = lambda: False
    comfy.list_models = lambda kind: sorted(models)
    comfy.model_path = lambda kind, name: str(models[name])


def inputs(frames: int = 9):
    te = load.WanFitTextEncoderLoader().load("umt5_xxl_fp8_e4m3fn_scaled.safetensors")[0]
    text = encode.WanFitTextEncode().encode(te, "a cat walks", "blurry")[0]
    vae = load.WanFitVAELoader().load("wan_2.1_vae.safetensors")[0]
    # 80x48 px: latent 10x6, tokens 5x3 = 15 per frame: an odd count, so one rank's share is padded
    embeds = encode.WanFitImageToVideoEncode().encode(vae, torch.rand(1, 40, 56, 3), 80, 48, frames)[0]
    return text, embeds


def experts(devices: str | None, mode: str = "auto"):
    out = []
    for name, lora_name in ((factory.WIDE_HIGH, factory.WIDE_LORA_HIGH), (factory.WIDE_LOW, factory.WIDE_LORA_LOW)):
        model = load.WanFitModelLoader().load(name, compute_dtype="fp32")[0]
        model = lora.WanFitLoRA().apply(model, lora_name, 1.0, "auto")[0]
        if devices is not None:
            model = multigpu.WanFitMultiGPU().apply(model, devices, mode)[0]
        out.append(model)
    return out


def two_pass(high, low, text, embeds, cfg=1.0, steps=4, step_cache=None, windows=None):
    split = steps // 2
    first = sample.WanFitSampler().run(high, text, embeds, steps, cfg, 5.0, 7, "euler", 0, split, True, True,
                                       schedule="simple", step_cache=step_cache, context_windows=windows)[0]
    return sample.WanFitSampler().run(low, text, embeds, steps, cfg, 5.0, 7, "euler", split, steps, False, False,
                                      first, schedule="simple", step_cache=step_cache, context_windows=windows)[0]


def compare(name: str, one: dict, two: dict, **extra) -> dict:
    plans = " ".join(p.get("note", "") if isinstance(p, dict) else str(p) for p in two[sample.PLAN_KEY])
    diff = float((one["samples"] - two["samples"]).abs().max())
    return {"case": name, "equal": bool(torch.equal(one["samples"], two["samples"])), "max_diff": diff,
            "plan_names_rank_1": "Rank 1 of 2 (cpu" in plans, **extra}


def skipped(latent: dict) -> int:
    return latent["wanfit_telemetry"]["step_cache"]["steps_skipped"]


def case_lora(text, embeds) -> dict:
    return compare("two-pass 4-step LoRA job, cfg 1 (Ulysses)", two_pass(*experts(None), text, embeds),
                   two_pass(*experts("cpu*2"), text, embeds))


def case_cfg(text, embeds) -> dict:
    return compare("CFG-parallel, cfg 3.5", two_pass(*experts(None), text, embeds, cfg=3.5),
                   two_pass(*experts("cpu*2", "cfg"), text, embeds, cfg=3.5))


def case_step_cache(text, embeds) -> dict:
    easy = cache.WanFitEasyCache().make(0.5, 1, "compute", True)[0]
    one = two_pass(*experts(None), text, embeds, cfg=3.5, steps=10, step_cache=easy)
    two = two_pass(*experts("cpu*2", "both"), text, embeds, cfg=3.5, steps=10, step_cache=easy)
    return compare("EasyCache, cfg 3.5 (CFG-parallel)", one, two, skipped=[skipped(one), skipped(two)])


def case_windows() -> dict:
    text, embeds = inputs(frames=17)  # 5 latent frames in windows of 3, overlap 1
    windows = WanFitContextWindows().settings(9, 4, "standard_static", 1, False, "pyramid", False, False)[0]
    return compare("context windows (Ulysses)", two_pass(*experts(None), text, embeds, windows=windows),
                   two_pass(*experts("cpu*2"), text, embeds, windows=windows))


def case_sparse(text, embeds) -> dict:
    """Sparse attention (a window of frames, rows and columns) as Ulysses' inner op: each rank masks
    its heads over the whole video's grid."""
    def sparse(models):
        return [speed.WanFitSparseAttention().apply(m, "window", 1.0, False, 1, 2, 2, 0, 0, "token")[0] for m in models]
    one = two_pass(*sparse(experts(None)), text, embeds)
    dense = two_pass(*experts(None), text, embeds)
    return compare("sparse attention (Ulysses)", one, two_pass(*sparse(experts("cpu*2")), text, embeds),
                   sparse_differs=bool((one["samples"] - dense["samples"]).abs().max() > 1e-3))


def case_separate_worker(text, embeds) -> dict:
    """A remote rank: its worker started as its own command with the line rank 0 logs (what runs
    on another machine), joining 127.0.0.1 at the port set for it. It stays (``--stay``): when
    rank 0's pool closes, the same process waits for the next pool, which it joins."""
    multigpu.close_pool()
    os.environ["WANFIT_MULTIGPU_PORT"] = str(free_port())
    command = Pool(("cpu", "remote"), Path("."), port=int(os.environ["WANFIT_MULTIGPU_PORT"]), threads=1).command(1)
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        one = two_pass(*experts(None), text, embeds)
        first = two_pass(*experts("cpu,remote"), text, embeds)
        multigpu.close_pool()
        again = two_pass(*experts("cpu,remote"), text, embeds)  # a new pool: the worker came back
        result = compare("worker started as a separate command", one, first, command=" ".join(command[1:4]),
                         stays="--stay" in command and worker.poll() is None,
                         next_pool_equal=torch.equal(again["samples"], first["samples"]))
    finally:
        multigpu.close_pool()
        del os.environ["WANFIT_MULTIGPU_PORT"]
        worker.terminate()
        worker.wait(timeout=30)
    return result


def main() -> int:
    torch.set_num_threads(1)
    os.environ["WANFIT_WORKER_THREADS"] = "1"
    models = factory.write_models(Path(sys.argv[1]), NAMES)
    standalone(models)
    text, embeds = inputs()
    try:
        for run in (lambda: case_lora(text, embeds), lambda: case_cfg(text, embeds),
                    lambda: case_step_cache(text, embeds), case_windows, lambda: case_sparse(text, embeds),
                    lambda: case_separate_worker(text, embeds)):
            t = time.perf_counter()
            print(json.dumps({**run(), "seconds": round(time.perf_counter() - t, 2)}), flush=True)
    finally:
        multigpu.close_pool()
    return 0


if __name__ == "__main__":
    sys.exit(main())
