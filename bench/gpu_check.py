"""GPU acceptance in one command: what a lent CUDA GPU should measure first, within 8 minutes.

    python bench/gpu_check.py --out DIR            # make gpu-check OUT=DIR
    python bench/gpu_check.py --out DIR --device cpu --tiny   # every part's code path on the CPU

Writes ``DIR/gpu_check.json`` (a bench/run.py-style report: bench/compare.py compares two of
them) after every part, ``DIR/summary.txt`` (a short text summary) and ``DIR/<part>.log``.
The parts, in order; each runs in its own process (a crash, an out-of-memory or a hang ends
that part only), prints as it goes, and is skipped when less time is left than it needs:

    fp8          bf16 vs fp8 ``_scaled_mm`` vs upcast Linear at the Wan 14B shapes, 32,760 tokens
                 (bench/fp8_matmul.py)
    block_swap   8 blocks of the real 14B size (random weights): resident vs swapped with prefetch
                 0 / 1 / 2, pinned vs staged; compute-stream wait and H2D bandwidth (bench/prefetch.py)
    planner      the planner's activation peak against ``torch.cuda.max_memory_allocated`` for one
                 DiT forward (A14B blocks) at two sizes; the bar is 10 %
    vae          the Wan 2.1 VAE at 832x480, whole frames vs the tiles the plan picks: measured
                 peak against the planned working memory, and time (bench/vae_tiling.py)
    sampling     a two-pass job (two 1.3B-shaped experts, 33 frames 832x480, 6 steps, CFG 3.5)
                 through the sampler node's own code: resident, then 20 of 30 blocks swapped;
                 s/step and the telemetry
    sparse_attention, compiled_blocks, multi_gpu
                 when the pack has them (their bench script exists) and the machine does
                 (multi_gpu: 2 or more GPUs)
    step_time    whatever time is left: the A14B expert's s/step resident and at a 12 GiB cap
                 (bench/step_time.py)

Without a CUDA device (and without ``--device cpu``) it says so, writes that to DIR and exits 0.
``--device cpu --tiny`` runs every part at toy sizes on the CPU: a dry run of the code paths
(the figures mean nothing), which the test suite runs. Exit status 0 unless a part failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import suite  # noqa: E402
from suite import higher, info, lower  # noqa: E402

DEFAULT_BUDGET_S = 450.0  # of the 8 minutes: the rest for starting Python and writing the report
REQUIRED = ("torch", "safetensors", "einops", "numpy", "gguf", "sentencepiece")
GIB = 2**30


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    tiny: bool
    gpus: int
    python: str = sys.executable

    def part_command(self, name: str, *extra: str) -> list[str]:
        """This script running one in-file part in a child process."""
        return [self.python, str(BENCH / "gpu_check.py"), "--part", name, "--device", self.device,
                *(["--tiny"] if self.tiny else []), *extra]

    def script(self, script: str, *args: str) -> list[str]:
        return [self.python, str(BENCH / script), *args]


@dataclass
class Part:
    """One measurement: the command its process runs, the seconds it is planned to take on the
    GPU (``expected_s``: skipped when less is left) and may take (``limit_s``: killed after),
    when it applies (``available``: None, or why not), its figures and its summary lines."""

    name: str
    what: str
    expected_s: float
    limit_s: float
    command: Callable[[Context], list[str]]
    available: Callable[[Context], str | None] = lambda ctx: None
    figures: tuple[suite.Figure, ...] | Callable = ()
    summary: Callable[[dict], list[str]] | None = None
    optional: bool = field(default=False)


# ----------------------------------------------------------------------------- in-file parts
# Each runs in a child process (``--part NAME``) and returns a JSON-ready dict.

def _import_pack() -> None:
    sys.path.insert(0, str(BENCH.parent / "tests"))
    from pack import register

    register()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_peak(config, grid: tuple[int, int, int], batch: int, weights: str, device, dtype=None) -> dict:
    """One ``WanModel.forward`` on ``device``: the planner's activation peak (``dit_activations``)
    against the allocator's (CUDA: ``max_memory_allocated`` above what was allocated before the
    call; CPU: ``hostmem.allocation_peak``). Weights random, built on the device; inputs as the
    sampler passes them (the host inputs stay on the CPU). Used by tests/test_planner.py's GPU
    test and by the ``planner`` part."""
    import torch

    from wanfit.optim import fp8
    from wanfit.optim.hostmem import allocation_peak
    from wanfit.optim.planner import dit_activations, dit_inputs
    from wanfit.wan.model import WanModel

    device = torch.device(device)
    dtype = dtype or torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: 14B-sized blocks take long on a CPU
        model = WanModel(config)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if weights.startswith("fp8"):
        fp8.quantize_module(model, "e4m3fn", dtype)
    inputs = dit_inputs(config, grid, batch, dtype, device=device)
    gen = torch.Generator(device).manual_seed(0)
    for key in ("x", "context", "clip_fea", "y"):
        if inputs[key] is not None:
            inputs[key].normal_(generator=gen)
    inputs["host"] = model.host_inputs(torch.full((batch,), 700.0), batch, grid)
    with torch.no_grad():
        model(**inputs)  # warm-up: cuBLAS workspaces and kernels chosen
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            model(**inputs)
            _sync(device)
            seconds = time.perf_counter() - t0
            measured = torch.cuda.max_memory_allocated(device) - start
        else:
            t0 = time.perf_counter()
            measured = allocation_peak(lambda: model(**inputs))
            seconds = time.perf_counter() - t0
    fast = fp8.scaled_mm_supported(device)
    predicted = dit_activations(config, grid, batch, dtype, weights, "sdpa", device.type, fp8_matmul=fast)
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"grid": list(grid), "tokens": math.prod(grid), "batch": batch, "weights": weights,
            "fp8_matmul": fast, "predicted_bytes": predicted.peak, "measured_bytes": measured,
            "predicted_over_measured": predicted.peak / measured if measured else None,
            "phase": predicted.phase, "forward_s": seconds}


def part_planner(device: str, tiny: bool) -> dict:
    from wanfit.wan.model import PRESETS, WanConfig

    if tiny:
        config = WanConfig("i2v", in_dim=36, dim=256, ffn_dim=704, num_heads=2, num_layers=2, text_len=64,
                           text_dim=64, freq_dim=64)
        sizes = {"B2 fp8": ((2, 8, 16), 2, "fp8_e4m3fn"), "B1 bf16": ((3, 8, 16), 1, "bf16")}
    else:  # two blocks of the real A14B expert: every block's activations are alike
        config = dataclasses.replace(PRESETS["Wan2.2 I2V-A14B expert"], num_layers=2)
        sizes = {"81f 832x480 CFG batched fp8": ((21, 30, 52), 2, "fp8_e4m3fn"),
                 "41f 832x480 one branch bf16": ((11, 30, 52), 1, "bf16")}
    out = {"device": _device_name(device), "blocks": config.num_layers, "dim": config.dim, "bar": 0.10, "sizes": {}}
    for name, (grid, batch, weights) in sizes.items():
        r = forward_peak(config, grid, batch, weights, device)
        r["within_bar"] = abs(r["predicted_over_measured"] - 1) <= 0.10
        out["sizes"][name] = r
        print(f"{name}: planned {r['predicted_bytes'] / GIB:.2f} GiB, measured {r['measured_bytes'] / GIB:.2f} GiB "
              f"(x{r['predicted_over_measured']:.3f}), forward {r['forward_s']:.2f} s", flush=True)
    out["pass"] = all(r["within_bar"] for r in out["sizes"].values())
    return out


def part_vae(device: str, tiny: bool) -> dict:
    import torch

    import vae_tiling
    from wanfit.wan.vae_common import Wan21VAEConfig

    if tiny:
        # the smallest frame that still tiles: tiles under MIN_BUDGET_PIXELS are budgeted as that many
        report = vae_tiling.run([(384, 128)], seconds=0.0, dtype=torch.bfloat16, budget=0.7,
                                config=Wan21VAEConfig(dim=4), device=device)
    else:
        report = vae_tiling.run([(832, 480)], seconds=2.0, dtype=torch.bfloat16, budget=0.35, device=device)
    for r in report["sizes"]:
        for stage in ("decode", "encode"):
            u, t = r["untiled"][stage], r["tiled"][stage]
            print(f"{r['width']}x{r['height']} {stage}: whole frames {u['peak_bytes'] / GIB:.2f} GiB "
                  f"(planned {u['planned_bytes'] / GIB:.2f}) in {u['seconds']:.2f} s; {r['tiling']}: "
                  f"{t['peak_bytes'] / GIB:.2f} GiB (planned {t['planned_bytes'] / GIB:.2f}) in {t['seconds']:.2f} s",
                  flush=True)
    return report


@contextmanager
def standalone_comfy(models: dict[str, Path], device):
    """The node pack's ComfyUI hooks (nodes/comfy.py) answered without ComfyUI, as the tests
    answer them: model files from ``models``, VRAM from torch, progress printed."""
    import torch

    from wanfit.nodes import comfy

    class Bar:
        def __init__(self, total: int):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            print(f"  step {value}/{total or self.total}", flush=True)

    def free_vram(dev) -> int:
        free = torch.cuda.mem_get_info(dev)[0]
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    hooks = {"compute_device": lambda: dev,
             "free_vram": free_vram,
             "unload_comfy_models": lambda nbytes, dev: None,
             "free_memory_cache": lambda: torch.cuda.empty_cache() if torch.cuda.is_available() else None,
             "throw_if_interrupted": lambda: None,
             "progress_bar": Bar,
             "previews_enabled": lambda: False,
             "list_models": lambda kind: sorted(models),
             "model_path": lambda kind, name: str(models[name])}
    saved = {name: getattr(comfy, name) for name in hooks if hasattr(comfy, name)}
    for name, hook in hooks.items():
        setattr(comfy, name, hook)
    try:
        yield
    finally:
        for name in hooks:
            if name in saved:
                setattr(comfy, name, saved[name])
            else:
                delattr(comfy, name)


def _host_ram_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("wanfit_bench_host_ram", BENCH / "host_ram.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_sampling(device: str, tiny: bool) -> dict:
    """Two experts written to disk, loaded by the Model Loader node, sampled by the Two-Pass
    Sampler node (plan, load, swap, sample, telemetry: the real code), resident then swapped."""
    import torch

    from wanfit.nodes import load, sample, stages
    from wanfit.nodes.encode import WanFitEmptyEmbeds
    from wanfit.nodes.memory import MemorySettings
    from wanfit.nodes.sample import PLAN_KEY, TELEMETRY_KEY
    from wanfit.nodes.types import TextEmbeds

    if tiny:
        shape = dict(dim=128, ffn_dim=256, num_heads=1, num_layers=4, text_dim=64, freq_dim=64)
        width, height, frames, steps, switch, swap = 32, 32, 5, 2, 1, 2
    else:  # the Wan 2.1 1.3B shape: a medium job that fits any card
        shape = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
        width, height, frames, steps, switch, swap = 832, 480, 33, 6, 3, 20
    host_ram = _host_ram_module()
    host_ram.SIZES = {"medium": shape}
    result: dict[str, Any] = {"device": _device_name(device), "model": shape, "width": width, "height": height,
                              "frames": frames, "steps": steps, "switch_step": switch, "cfg": 3.5, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="wanfit_gpu_check_") as tmp:
        high = Path(tmp) / "wan2.2_t2v_high_noise_medium_bf16.safetensors"
        low = Path(tmp) / "wan2.2_t2v_low_noise_medium_bf16.safetensors"
        t0 = time.perf_counter()
        result["file_bytes"] = host_ram.write_checkpoint(high, "medium", "bf16", seed=0)
        shutil.copyfile(high, low)  # the same weights under the second expert's name: speed is what is measured
        result["write_s"] = round(time.perf_counter() - t0, 1)
        print(f"wrote two {result['file_bytes'] / 1e9:.2f} GB experts in {result['write_s']} s", flush=True)
        models = {high.name: high, low.name: low}
        gen = torch.Generator().manual_seed(0)
        text_dim = shape.get("text_dim", 4096)
        text = TextEmbeds(torch.randn(1, 512, text_dim, generator=gen), torch.randn(1, 512, text_dim, generator=gen),
                          "random")
        with standalone_comfy(models, device):
            try:
                embeds = WanFitEmptyEmbeds().embeds(width, height, frames)[0]
                handles = [load.WanFitModelLoader().load(name)[0] for name in (high.name, low.name)]
                for run, memory in (("resident", None), (f"swap_{swap}_of_{shape['num_layers']}",
                                                         MemorySettings(blocks_to_swap=swap, prefetch=1))):
                    pair = [dataclasses.replace(h, memory=memory) for h in handles]
                    t0 = time.perf_counter()
                    out = sample.WanFitTwoPassSampler().run(pair[0], pair[1], text, embeds, steps, 3.5, 3.5, 5.0, 0,
                                                            "unipc", "step", switch, 0.0)[0]
                    wall = time.perf_counter() - t0
                    tel = out[TELEMETRY_KEY]
                    step_s = tel["step_s"]
                    # the first step of each pass pays its kernels' warm-up: the steady rate skips it
                    steady = [s for i, s in enumerate(step_s) if i not in (0, switch)] or step_s
                    result["runs"][run] = {
                        "wall_s": wall, "s_per_step": tel["mean_step_s"], "steady_s_per_step": sum(steady) / len(steady),
                        "stages_s": tel["stages_s"], "vram_peak_allocated_gib": _gib(tel["vram_peak_allocated"]),
                        "vram_peak_reserved_gib": _gib(tel["vram_peak_reserved"]),
                        "host_rss_peak_gib": _gib(tel["host_rss_peak"]), "h2d_gb": tel["h2d_bytes"] / 1e9,
                        "transfer_wait_s": tel["transfer_wait_s"],
                        "plans": [{k: p.get(k) for k in ("resident", "swapped", "prefetch", "batch", "peak_vram", "note")
                                   if k in p} for p in out[PLAN_KEY]],
                        "telemetry": tel,
                        "latent_finite": bool(torch.isfinite(out["samples"]).all())}
                    r = result["runs"][run]
                    print(f"{run}: {r['s_per_step']:.3f} s/step ({r['steady_s_per_step']:.3f} steady), "
                          f"VRAM peak {r['vram_peak_allocated_gib']} GiB, H2D {r['h2d_gb']:.2f} GB, "
                          f"waited {r['transfer_wait_s']:.3f} s", flush=True)
            finally:
                stages.release_model()
    runs = result["runs"]
    if len(runs) == 2:
        a, b = runs.values()
        result["swap_over_resident"] = b["steady_s_per_step"] / a["steady_s_per_step"]
    return result


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


IN_FILE = {"planner": part_planner, "vae": part_vae, "sampling": part_sampling}


# ----------------------------------------------------------------------------- the parts

def _exists(script: str) -> Callable[[Context], str | None]:
    def check(ctx: Context) -> str | None:
        return None if (BENCH / script).is_file() else f"the pack has no bench/{script} yet"
    return check


def _two_gpus(ctx: Context) -> str | None:
    missing = _exists("multi_gpu.py")(ctx)
    if missing:
        return missing
    if ctx.device == "cpu":
        return "several GPUs: not in a CPU dry run"
    return None if ctx.gpus >= 2 else f"needs 2 or more GPUs, this machine has {ctx.gpus}"


def _fp8_lines(r: dict) -> list[str]:
    lines = []
    for name, row in r["layers"].items():
        fast = f", fp8 _scaled_mm {row['fp8_scaled_mm']['ms']} ms (x{row['speedup_scaled_mm_vs_bf16']})" \
            if "fp8_scaled_mm" in row else ", no fp8 GEMM on this device"
        lines.append(f"{name}: bf16 {row['bf16']['ms']} ms{fast}, upcast {row['fp8_upcast']['ms']} ms "
                     f"(x{row['slowdown_upcast_vs_bf16']} of bf16)")
    return lines


def _swap_lines(r: dict) -> list[str]:
    s, w = r["s_per_forward"], r["wait_s_per_forward"]
    lines = [f"{r['blocks']} blocks of {r['block_gb']} GB, {r['tokens']} tokens: resident {s['resident']:.3f} s/forward"]
    lines += [f"{k}: x{r['ratio_vs_resident'][k]:.3f} of resident, compute waited {w[k]:.3f} s/forward"
              for k in s if k != "resident"]
    if r.get("h2d_GBps"):
        lines.append(f"H2D {r['h2d_GBps']:.1f} GB/s pinned, {r['h2d_pageable_GBps']:.1f} GB/s pageable")
    return lines


def _planner_lines(r: dict) -> list[str]:
    return [f"{name}: planned {s['predicted_bytes'] / GIB:.2f} GiB vs measured {s['measured_bytes'] / GIB:.2f} GiB "
            f"(x{s['predicted_over_measured']:.3f}, {'within' if s['within_bar'] else 'OUTSIDE'} 10 %)"
            for name, s in r["sizes"].items()]


def _vae_lines(r: dict) -> list[str]:
    lines = []
    for size in r["sizes"]:
        for stage in ("decode", "encode"):
            u, t = size["untiled"][stage], size["tiled"][stage]
            lines.append(f"{size['width']}x{size['height']} {stage}: whole {u['peak_bytes'] / GIB:.2f} GiB "
                         f"(x{u['measured_over_planned']} of planned), tiled {t['peak_bytes'] / GIB:.2f} GiB "
                         f"(x{t['measured_over_planned']} of planned), time x{size[f'{stage}_time_ratio']}")
    return lines


def _sampling_lines(r: dict) -> list[str]:
    lines = [f"{name}: {x['steady_s_per_step']:.3f} s/step steady ({x['s_per_step']:.3f} mean), VRAM peak "
             f"{x['vram_peak_allocated_gib']} GiB, H2D {x['h2d_gb']:.2f} GB, waited {x['transfer_wait_s']:.3f} s"
             for name, x in r["runs"].items()]
    if "swap_over_resident" in r:
        lines.append(f"swapped / resident: x{r['swap_over_resident']:.3f}")
    return lines


def _step_time_lines(r: dict) -> list[str]:
    return [f"case {k}: {c['s_per_step']:.2f} s/step (x{r['ratio_vs_a'].get(k, float('nan')):.3f} of a), "
            f"resident {c['resident']}, VRAM peak {c['vram_peak_allocated_gib']} GiB" if "s_per_step" in c
            else f"case {k}: {c.get('error')}" for k, c in r["cases"].items()]


def parts() -> list[Part]:
    """Every part, in the order they run (the optional ones after the five the issue asks for)."""
    return [
        Part("fp8", "fp8 _scaled_mm vs bf16 vs upcast at Wan 14B shapes", 40, 120,
             lambda c: c.script("fp8_matmul.py", "--device", c.device, *(["--tiny"] if c.tiny else [])),
             figures=(lower("layers/*/*/ms", "ms"), higher("layers/*/speedup_scaled_mm_vs_bf16", "x", timing=True),
                      lower("layers/*/*/peak_extra_mib", "MiB")), summary=_fp8_lines),
        Part("block_swap", "8 blocks of 14B size: resident vs swapped, prefetch 0/1/2, pinned vs staged", 90, 180,
             lambda c: c.script("prefetch.py", "--blocks", "8", "--repeats", "2", "--device", c.device,
                                *(["--tiny"] if c.tiny else [])),
             figures=(lower("s_per_forward/*", "s"), lower("wait_s_per_forward/*", "s"), higher("h2d_GBps", "GB/s"),
                      higher("h2d_pageable_GBps", "GB/s")), summary=_swap_lines),
        Part("planner", "planned activation peak vs torch.cuda.max_memory_allocated, two sizes", 45, 120,
             lambda c: c.part_command("planner"),
             figures=(info("sizes/*/predicted_over_measured", "planned/measured"), lower("sizes/*/measured_bytes", "B"),
                      lower("sizes/*/forward_s", "s")), summary=_planner_lines),
        Part("vae", "Wan 2.1 VAE 832x480: whole frames vs tiles, measured vs planned", 60, 150,
             lambda c: c.part_command("vae"),
             figures=suite.vae_tiling_figures, summary=_vae_lines),
        Part("sampling", "two-pass job through the sampler node, resident and swapped", 100, 200,
             lambda c: c.part_command("sampling"),
             figures=(lower("runs/*/steady_s_per_step", "s"), lower("runs/*/vram_peak_allocated_gib", "GiB"),
                      lower("runs/*/transfer_wait_s", "s"), info("runs/*/h2d_gb", "GB")), summary=_sampling_lines),
        # ---- parts other work adds: they run when their bench exists (detected, not assumed). ----
        # Their command lines are what those benches are expected to take (--device cuda|cpu,
        # --tiny for the CPU dry run, --compiled); whoever lands a bench adjusts its line here.
        Part("sparse_attention", "sparse vs dense attention at 8k / 16k / 32k tokens and a DiT forward "
             "(bench/attention.py)", 60, 120,
             lambda c: c.script("attention.py", "--device", c.device, "--no-compile",
                                *(["--quick", "--quick-tokens", "512"] if c.tiny else [])),
             available=_exists("attention.py"), optional=True),
        Part("compiled_blocks", "compiled vs eager blocks (bench/attention.py)", 60, 150,
             lambda c: c.script("attention.py", "--device", c.device, "--no-attention", "--no-dit",
                                *(["--repeats", "1"] if c.tiny else [])),
             available=_exists("attention.py"), optional=True),
        Part("multi_gpu", "s/step on 1 and 2 GPUs (bench/multi_gpu.py)", 90, 180,
             lambda c: c.script("multi_gpu.py", "--device", "cuda"), available=_two_gpus, optional=True),
        # last: the rest of the budget
        Part("step_time", "A14B expert s/step: resident fp8, and 12 GiB cap (15 resident, CFG sequential)", 120, 240,
             lambda c: c.script("step_time.py", "--cases", "ad", "--repeats", "1",
                                *(["--dry-run", "--device", "cpu", "--tiny"] if c.device == "cpu" else [])),
             figures=(lower("cases/*/s_per_step", "s"), lower("cases/*/vram_peak_allocated_gib", "GiB")),
             summary=_step_time_lines, optional=True),
    ]


# ----------------------------------------------------------------------------- running them

def run_parts(selected: list[Part], ctx: Context, out_dir: Path, budget_s: float, report: dict,
              clock: Callable[[], float] = time.monotonic) -> dict:
    """Run ``selected`` in order within ``budget_s`` seconds, each in its own process, writing the
    report after each; returns it. A part is skipped when it does not apply, or when less time is
    left than it expects to need; one that runs out of the time left is killed."""
    start = clock()
    report.setdefault("benches", {})
    for part in selected:
        left = budget_s - (clock() - start)
        entry: dict[str, Any] = {"what": part.what, "optional": part.optional, "expected_s": part.expected_s,
                                 "limit_s": part.limit_s, "figures": {}, "runs": []}
        why = part.available(ctx)
        if why is None and left < part.expected_s:
            why = f"would overrun the budget: needs about {part.expected_s:.0f} s, {max(left, 0):.0f} s left"
        if why:
            entry.update(status="skipped", reason=why)
            print(f"== {part.name}: skipped ({why})", flush=True)
        else:
            entry.update(_run_part(part, ctx, out_dir, min(part.limit_s, left)))
        report["benches"][part.name] = entry
        report["seconds"] = round(clock() - start, 1)
        common.write_json(out_dir / "gpu_check.json", report)
    write_summary(report, out_dir / "summary.txt", {p.name: p.summary for p in selected})
    return report


def _run_part(part: Part, ctx: Context, out_dir: Path, timeout: float) -> dict:
    cmd = part.command(ctx)
    print(f"== {part.name}: {part.what} (at most {timeout:.0f} s)\n   {' '.join(cmd)}", flush=True)
    load = common.load_avg()
    # Toy sizes gain nothing from threads, and a 2-thread OpenMP process on a shared 2-core
    # machine can run 6x slower than a 1-thread one (measured: the VAE part, 29.5 s vs 4.8 s).
    env = {"OMP_NUM_THREADS": "1"} if ctx.tiny else None
    done = common.run_process(cmd, timeout, echo=True, env=env)
    (out_dir / f"{part.name}.log").write_text(done.stdout, encoding="utf-8")
    runs = [{"seconds": round(done.seconds, 2), "returncode": done.returncode, "load": [load, common.load_avg()]}]
    entry: dict[str, Any] = {"command": " ".join(cmd), "seconds": round(done.seconds, 1), "runs": runs,
                             "load_per_core": common.load_per_core(runs)}
    raw = done.last_json()
    if done.timed_out:
        entry.update(status="timeout", reason=f"killed after {timeout:.0f} s", error=done.error_tail())
    elif done.returncode != 0 or raw is None:
        why = f"exit status {done.returncode}" if done.returncode else "no JSON object on its last line"
        entry.update(status="failed", reason=why, error=done.error_tail())
    elif set(raw) == {"skipped"}:
        entry.update(status="skipped", reason=str(raw["skipped"]), raw=raw)
    else:
        entry.update(status="ok", raw=raw)
        try:
            found = suite.extract(suite.Bench(part.name, "", figures=part.figures), raw)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            entry["figures_error"] = f"{type(err).__name__}: {err}"
            found = {}
        entry["figures"] = {name: common.figure_entry(f) for name, f in found.items()}
    print(f"== {part.name}: {entry['status']} in {done.seconds:.1f} s"
          + (f" ({entry['reason']})" if entry.get("reason") else ""), flush=True)
    return entry


def write_summary(report: dict, path: Path, summaries: dict[str, Callable | None] | None = None) -> str:
    """The report as a short text (``summaries``: each part's summary function, by name)."""
    m = report["machine"]
    gpus = ", ".join(f"{g.get('name')} ({g.get('memory_bytes', 0) / GIB:.0f} GiB, capability {g.get('capability')})"
                     for g in m.get("gpus", [])) or "no CUDA device"
    lines = [f"WanFit GPU check, {report['date']}, commit {(report['git'].get('commit') or '?')[:10]}"
             + (" (dirty)" if report["git"].get("dirty") else ""),
             f"{gpus}; driver {m.get('cuda_driver')}, CUDA {m.get('cuda_runtime')}, torch {report['versions']['torch']}",
             f"{m['cpu']['model']}, {m['cpu']['usable_cores']} cores, {(m.get('ram_bytes') or 0) / GIB:.0f} GiB RAM",
             f"device {report['device']}{' (tiny: code paths only, figures meaningless)' if report['tiny'] else ''}; "
             f"{report.get('seconds', 0):.0f} s of a {report['budget_s']:.0f} s budget", ""]
    if report.get("skipped"):
        lines.append(report["skipped"])
    summaries = summaries if summaries is not None else {p.name: p.summary for p in parts()}
    for name, entry in report.get("benches", {}).items():
        head = f"[{entry['status']}] {name}: {entry['what']}"
        if entry.get("seconds") is not None:
            head += f" ({entry['seconds']:.0f} s)"
        lines.append(head)
        if entry.get("reason"):
            lines.append(f"    {entry['reason']}")
        if entry["status"] == "ok":
            summary = summaries.get(name)
            try:
                body = summary(entry["raw"]) if summary else [
                    f"{fig}: {common.fmt(f['median'])} {f['unit']}" for fig, f in list(entry["figures"].items())[:12]]
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
                body = [f"(summary failed: {type(err).__name__}: {err}; see gpu_check.json)"]
            lines += [f"    {line}" for line in body]
        elif entry.get("error"):
            lines += [f"    | {line}" for line in entry["error"].strip().splitlines()[-6:]]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def _missing_modules() -> list[str]:
    import importlib.util

    return [m for m in REQUIRED if importlib.util.find_spec(m) is None]


def new_report(ctx: Context, budget_s: float) -> dict:
    return {"schema": 1, "kind": "wanfit-bench", "size": "gpu-check" + ("-tiny" if ctx.tiny else ""),
            "date": common.now(), "git": common.git_info(), "machine": common.machine_info(),
            "versions": common.versions(), "device": ctx.device, "tiny": ctx.tiny, "budget_s": budget_s,
            "benches": {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json, summary.txt and the logs")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts")
    parser.add_argument("--only", help="comma-separated part names")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a dry run of every code path")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # run one in-file part in this process
    args = parser.parse_args(argv)
    names = [p.name for p in parts()]
    if args.part:
        _import_pack()
        print(json.dumps(IN_FILE[args.part](args.device, args.tiny)))
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    if not args.budget > 0:
        parser.error(f"--budget {args.budget}: seconds > 0")
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs the toy sizes only: add --tiny (the real sizes need a GPU)")
    only = args.only.split(",") if args.only else names
    unknown = set(only) - set(names)
    if unknown:
        parser.error(f"unknown part {', '.join(sorted(unknown))}; parts: {', '.join(names)}")
    args.out.mkdir(parents=True, exist_ok=True)
    missing = _missing_modules()
    if missing:
        print(f"gpu_check: missing Python packages {', '.join(missing)}: install the pack's requirements "
              "(pip install -r requirements.txt) into the Python that has the CUDA torch", file=sys.stderr)
        return 1
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ctx = Context(args.device, args.tiny, cuda)
    report = new_report(ctx, args.budget)
    if args.device == "cuda" and not cuda:
        report["skipped"] = "no CUDA device: nothing measured (--device cpu --tiny dry-runs the code paths)"
        common.write_json(args.out / "gpu_check.json", report)
        write_summary(report, args.out / "summary.txt")
        print(f"gpu_check: {report['skipped']}; wrote {args.out}")
        return 0
    selected = [p for p in parts() if p.name in only]
    print(f"gpu_check: {len(selected)} parts within {args.budget:.0f} s on {args.device} "
          f"({', '.join(str(g.get('name')) for g in report['machine']['gpus']) or 'CPU'}); writing {args.out}",
          flush=True)
    report = run_parts(selected, ctx, args.out, args.budget, report)
    print()
    print((args.out / "summary.txt").read_text(encoding="utf-8"))
    failed = [n for n, e in report["benches"].items() if e["status"] in ("failed", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
