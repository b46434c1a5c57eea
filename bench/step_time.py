"""Seconds per sampling step of a Wan 2.2 A14B expert on one CUDA GPU, resident and capped.

One step is the expert's forward over cond and uncond at 81 frames 832x480 (21 x 30 x 52 =
32,760 tokens, 512 text tokens, i2v conditioning), as the sampler runs it: ``embed``, the
block stack through the engine's ``PreparedDiT.run_blocks`` (resident blocks, then a
``BlockSwapper`` for the swapped tail), ``unembed``. A step uses one expert, so one expert
(the I2V-A14B shape, 40 blocks of dim 5120) is built per case: on the meta device, then
filled by ``loading.stream_weights`` from seeded random tensors drawn on the GPU (resident
tensors never touch the host; swapped blocks are copied to it, where they must live).

Cases, each in a fresh process so the memory cap and the allocator start clean:

    a  fp8 (e4m3fn, scaled), fully resident, no cap                   the reference
    b  fp8, capped at 32 GiB: resident 40 / prefetch 1, CFG batched
    c  bf16, capped at 32 GiB: resident 30 / prefetch 1, CFG batched
    d  fp8, capped at 12 GiB: resident 15 / prefetch 1, CFG sequential

The cap is ``torch.cuda.set_per_process_memory_fraction``. The default plans follow the
planner's sizes (optim/planner.py: fp8 block 0.327 GiB, bf16 block 0.655 GiB, 0.434 GiB
outside the blocks; activation peak 8.0 GiB with CFG batched, 4.0 GiB sequential, +10 %
margin, 1.5 GiB reserve): the most resident blocks that fit, two swap slots included.
The planner has no plan function to call yet, so ``--plan c=28:2:batch`` (resident,
prefetch, CFG batch / sequential) overrides a case. A plan that runs out of memory is
retried with 4 fewer resident blocks; the JSON says which ran.

Reported per case: s/step (mean of ``--repeats`` after one warm-up step), its ratio to case
a, peak VRAM allocated / reserved, GB copied host to device and seconds compute waited
per step. The last line of stdout is a JSON object; without CUDA it is
``{"skipped": "no CUDA device"}`` and the exit status is 0.

    python bench/step_time.py [--cases abcd] [--repeats 2] [--plan c=28:1:batch]
    python bench/step_time.py --dry-run --device cpu --tiny   # the code path, on the CPU

``--tiny`` shrinks the model (4 blocks of dim 256) and the video (9 frames 64x64);
``--dry-run`` times one step without warm-up; on the CPU the swap runs against the offload
module's recording backend and the cap is not enforced.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


@dataclass(frozen=True)
class Case:
    weights: str  # "fp8": block Linears in e4m3fn with per-tensor scales; "bf16": all bf16
    cap_gib: float | None
    resident: int  # of 40 blocks (scaled down with --tiny)
    prefetch: int
    cfg: str  # "batch": cond + uncond as one batch of 2; "sequential": two forwards


CASES = {
    "a": Case("fp8", None, 40, 1, "batch"),
    "b": Case("fp8", 32, 40, 1, "batch"),
    "c": Case("bf16", 32, 30, 1, "batch"),
    "d": Case("fp8", 12, 15, 1, "sequential"),
}
STEP_DOWN = 4  # resident blocks given up per out-of-memory retry


def _import_pack():
    """Register the repository as the package ``wanfit``, as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()


def _config(tiny: bool):
    from wanfit.wan.model import PRESETS, WanConfig
    if tiny:
        return WanConfig("i2v", in_dim=36, dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64,
                         freq_dim=64)
    return PRESETS["Wan2.2 I2V-A14B expert"]


class RandomWeights(Mapping):
    """``{name: seeded random tensor}`` for a meta model's state dict, drawn on ``device``
    when looked up (bf16, as a checkpoint would store it); norms near 1, the rest scaled
    by fan-in so activations stay in range."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], device: torch.device, seed: int = 0):
        self._shapes, self._device = dict(shapes), device
        self._gen = torch.Generator(device).manual_seed(seed)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        t = torch.randn(shape, generator=self._gen, device=self._device, dtype=torch.bfloat16)
        if "norm" in name:
            return t.mul_(0.1).add_(1.0)
        return t.div_(math.prod(shape[1:]) ** 0.5) if len(shape) >= 2 else t.mul_(0.02)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def build(case: Case, config, device: torch.device):
    """The expert as ``case`` plans it: a PreparedDiT with resident blocks on ``device`` and
    the rest behind a BlockSwapper (the recording backend stands in for CUDA on the CPU)."""
    from wanfit.optim import fp8, loading
    from wanfit.optim.engine import PreparedDiT, SwapSettings, attach_swap
    from wanfit.optim.offload import RecordingBackend
    from wanfit.wan.model import WanModel
    with torch.device("meta"):
        model = WanModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    resident = case.resident

    def place(name: str) -> torch.device | str:
        parts = name.split(".")
        return "cpu" if parts[0] == "blocks" and int(parts[1]) >= resident else device

    quantize = case.weights == "fp8"
    loading.stream_weights(model, RandomWeights(shapes, device), dict.fromkeys(shapes, torch.bfloat16),
                           torch.bfloat16, place, "random weights",
                           fp8_target=torch.float8_e4m3fn if quantize else None,
                           fp8_predicate=fp8.should_quantize if quantize else (lambda key, shape: False))
    if resident == config.num_layers:
        return PreparedDiT(model, resident)
    backend = device if device.type == "cuda" else RecordingBackend()
    return attach_swap(model, resident, backend, SwapSettings(config.num_layers - resident, case.prefetch))


def _inputs(config, grid: tuple[int, int, int], batch: int, device: torch.device) -> dict:
    gen = torch.Generator(device).manual_seed(1)
    f, h, w = grid[0], grid[1] * 2, grid[2] * 2  # latent size: the DiT patches 1x2x2
    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device)
    return dict(x=randn(batch, config.out_dim, f, h, w), t=torch.full((batch,), 900.0, device=device),
                context=randn(batch, 512, config.text_dim), y=randn(batch, config.in_dim - config.out_dim, f, h, w))


def step(prepared, inputs: list[dict]) -> None:
    """One sampling step: a forward per input batch (one with CFG batched, two sequential)."""
    model = prepared.model
    for kwargs in inputs:
        state = model.embed(kwargs["x"], kwargs["t"], kwargs["context"], None, kwargs["y"])
        prepared.run_blocks(state)
        model.unembed(state)


def run_case(case: Case, tiny: bool, device: torch.device, repeats: int, dry_run: bool) -> dict:
    """Build and time one case in this process; out of memory steps ``resident`` down."""
    from wanfit.optim.telemetry import Telemetry
    config = _config(tiny)
    grid = (3, 4, 4) if tiny else (21, 30, 52)  # 9 frames 64x64, or 81 frames 832x480
    scale = config.num_layers / 40
    case = dataclasses.replace(case, resident=min(config.num_layers, round(case.resident * scale)))
    if device.type == "cuda" and case.cap_gib is not None:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, case.cap_gib * GIB / torch.cuda.get_device_properties(device).total_memory), device)
    tried = []
    while True:
        tried.append(case.resident)
        prepared = None
        try:
            prepared = build(case, config, device)
            with torch.no_grad():
                batches = [2] if case.cfg == "batch" else [1, 1]
                inputs = [_inputs(config, grid, b, device) for b in batches]
                if not dry_run:
                    step(prepared, inputs)  # warm-up: kernels chosen, workspaces allocated
                with Telemetry(device) as tel:
                    swap = prepared.swapper.stats if prepared.swapper is not None else None
                    if prepared.swapper is not None:
                        tel.watch(prepared.swapper)
                    with tel.stage("sample"):
                        for _ in range(1 if dry_run else repeats):
                            step(prepared, inputs)
                            tel.mark_step()
            break
        except torch.cuda.OutOfMemoryError:
            if dry_run or case.resident == 0:
                raise
            case = dataclasses.replace(case, resident=max(0, case.resident - STEP_DOWN))
        finally:
            if prepared is not None:
                prepared.close()
            del prepared
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    s = tel.summary()
    n = s["steps"]
    return {**dataclasses.asdict(case), "blocks": config.num_layers, "tokens": math.prod(grid),
            "resident_tried": tried, "swapped": swap.swapped if swap else 0,
            "block_bytes": swap.block_bytes if swap else 0, "s_per_step": s["mean_step_s"], "step_s": s["step_s"],
            "vram_peak_allocated_gib": None if s["vram_peak_allocated"] is None else s["vram_peak_allocated"] / GIB,
            "vram_peak_reserved_gib": None if s["vram_peak_reserved"] is None else s["vram_peak_reserved"] / GIB,
            "h2d_gb_per_step": s["h2d_bytes"] / 1e9 / n, "wait_s_per_step": s["transfer_wait_s"] / n}


def _parse_plan(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    resident, prefetch, cfg = (spec.split(":") + ["", ""])[:3]
    if name not in CASES or not resident.isdigit() or cfg not in ("", "batch", "sequential"):
        raise argparse.ArgumentTypeError(f"--plan {text!r}: expected e.g. c=28:1:batch")
    change = {"resident": int(resident)}
    if prefetch:
        change["prefetch"] = int(prefetch)
    if cfg:
        change["cfg"] = cfg
    return name, change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="abcd", help="which cases to run, e.g. 'ad' (default abcd)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case, after a warm-up step")
    parser.add_argument("--plan", type=_parse_plan, action="append", default=[],
                        help="override a case's plan: NAME=RESIDENT[:PREFETCH[:batch|sequential]]")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="4 blocks of dim 256, 9 frames 64x64")
    parser.add_argument("--dry-run", action="store_true", help="one step per case, no warm-up")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a case as JSON, run in this process
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    _import_pack()
    if args.worker:
        result = run_case(Case(**json.loads(args.worker)), args.tiny, device, args.repeats, args.dry_run)
        print(json.dumps(result))
        return
    cases = {name: CASES[name] for name in args.cases}
    for name, change in args.plan:
        cases[name] = dataclasses.replace(cases[name], **change)
    flags = ["--device", args.device, "--repeats", str(args.repeats)] + ["--tiny"] * args.tiny \
        + ["--dry-run"] * args.dry_run
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "cases": {}}
    for name, case in cases.items():
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(dataclasses.asdict(case)), *flags],
                              capture_output=True, text=True)
        if proc.returncode:
            result["cases"][name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                                     f"exit status {proc.returncode}"}
            continue
        result["cases"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {result['cases'][name]['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    base = result["cases"].get("a", {}).get("s_per_step")
    result["ratio_vs_a"] = {name: r["s_per_step"] / base for name, r in result["cases"].items()
                            if base and "s_per_step" in r}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
