"""The bench registry: what ``bench/run.py`` runs, at which sizes, and which figures it reads.

Each bench is a script in bench/ that prints one JSON object on its last line of stdout. A
``Bench`` line says how to run it at the two sizes (``quick``: seconds on 2 CPU cores, for a
regression check; ``full``: the figures docs/BENCHMARKS.md quotes), on which machines it
applies, how many fresh processes to run (repeats), and which numbers of its JSON are figures,
each with a unit and a direction (``LOWER`` is better for times and bytes, ``HIGHER`` for
speedups, rates and skip counts, ``INFO`` is reported and never judged).

Figures are named by a path into the JSON, ``/`` between keys:

    "layers/*/bf16/ms"      ``*`` takes every key of a dict (or index of a list); the key is
                            part of the figure's name: layers/attn 5120x5120/bf16/ms, ...
    "runs/[]/cold_s"        ``[]`` takes every item of a list as a sample of ONE figure
                            (runs/cold_s), for benches that repeat inside one process

A bench may also declare its own figures in its JSON, which needs no pattern here:

    {"figures": {"dense_s": {"value": 1.25, "unit": "s", "better": "lower"},
                 "speedup": {"value": [2.1, 2.3, 2.2], "unit": "x", "better": "higher", "timing": true}}, ...}

(``value`` a number or a list of samples; ``"timing": true`` marks a wall-clock figure).
Samples from every repeat are pooled: the report keeps min / median / max per figure, and
``bench/compare.py`` judges a change against that spread. A figure is a *timing* (it moves
with the machine's load) when its unit is one of ``TIMING_UNITS`` or it says so
(``timing=True``, e.g. a speedup); compare judges timings only between runs made under a
similar CPU load. Bytes, block counts, skipped steps and other exact figures are always judged.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

LOWER, HIGHER, INFO = "lower", "higher", "info"
DIRECTIONS = (LOWER, HIGHER, INFO)
GIB = 2**30
TIMING_UNITS = {"s", "ms", "us", "1/s", "GB/s", "M values/s", "TFLOP/s", "x time"}


def is_timing(unit: str, timing: bool | None = None) -> bool:
    return unit in TIMING_UNITS if timing is None else bool(timing)


@dataclass(frozen=True)
class Figure:
    """Numbers at ``path`` in a bench's JSON (see the module docstring), in ``unit``."""

    path: str
    unit: str
    better: str = LOWER
    timing: bool | None = None  # None: from the unit (TIMING_UNITS)

    def __post_init__(self) -> None:
        if self.better not in DIRECTIONS:
            raise ValueError(f"figure {self.path!r}: better must be one of {DIRECTIONS}, got {self.better!r}")


def lower(path: str, unit: str, timing: bool | None = None) -> Figure:
    return Figure(path, unit, LOWER, timing)


def higher(path: str, unit: str, timing: bool | None = None) -> Figure:
    return Figure(path, unit, HIGHER, timing)


def info(path: str, unit: str, timing: bool | None = None) -> Figure:
    return Figure(path, unit, INFO, timing)


# (name, value or list of samples, unit, better[, timing]): what a figures function returns
FigureRows = list[tuple]


@dataclass(frozen=True)
class Bench:
    """One bench script and how the suite runs it.

    ``quick`` / ``full``: its arguments at each size (``full=None``: the quick run is the only
    one). ``needs``: "any" (runs on every machine), "cuda" (one CUDA GPU), "cuda:2" (two or
    more). ``repeats``: fresh processes per size; 1 where the figures do not vary between runs
    (byte counts) or the bench repeats inside itself (``[]`` patterns). ``timeout_s``: per
    process, (quick, full). ``figures``: Figure patterns, or a function of the JSON that
    returns ``(name, value, unit, better)`` rows.
    """

    name: str
    script: str
    quick: tuple[str, ...] = ()
    full: tuple[str, ...] | None = ()
    figures: tuple[Figure, ...] | Callable[[dict], FigureRows] = ()
    needs: str = "any"
    repeats: int = 3
    timeout_s: tuple[float, float] = (180.0, 3600.0)
    note: str = field(default="", compare=False)

    def args(self, size: str) -> tuple[str, ...] | None:
        return self.quick if size == "quick" else self.full

    def timeout(self, size: str) -> float:
        return self.timeout_s[0] if size == "quick" else self.timeout_s[1]


# ----------------------------------------------------------------------------- figure functions

def _plan_label(p: dict) -> str:
    window = f" windows of {p['window_tokens']} tokens" if p.get("windows", 1) > 1 else ""
    return f"{p['card_gib']} GB {p['frames']}f {p['width']}x{p['height']} {p['weights']}{window}"


def memory_plan_figures(raw: dict) -> FigureRows:
    """Per plan: peak VRAM, resident blocks and activations (exact: computed on meta tensors)."""
    rows: FigureRows = []
    for p in raw["plans"]:
        label = _plan_label(p)
        if "error" in p:
            rows.append((f"{label}/min_budget_gib", p["min_budget"] / GIB, "GiB", LOWER))
            continue
        rows += [(f"{label}/peak_vram_gib", p["peak_vram"] / GIB, "GiB", LOWER),
                 (f"{label}/resident_blocks", p["resident"], "blocks", HIGHER),
                 (f"{label}/activation_peak_gib", p["activation_peak"] / GIB, "GiB", LOWER),
                 (f"{label}/peak_host_gib", p["peak_host"] / GIB, "GiB", LOWER)]
    return rows


def vae_tiling_figures(raw: dict) -> FigureRows:
    rows: FigureRows = []
    for r in raw["sizes"]:
        size = f"{r['width']}x{r['height']}"
        for stage in ("decode", "encode"):
            rows += [(f"{size}/{stage}_peak_ratio", r[f"{stage}_peak_ratio"], "tiled/untiled", LOWER),
                     (f"{size}/{stage}_time_ratio", r[f"{stage}_time_ratio"], "tiled/untiled", LOWER, True),
                     (f"{size}/{stage}_untiled_s", r["untiled"][stage]["seconds"], "s", LOWER)]
    return rows


def attention_figures(raw: dict) -> FigureRows:
    """Per row (tokens, pattern, attention alone or a DiT forward, or compiled blocks): the times,
    the speedup and the share of attention kept."""
    rows: FigureRows = []
    for r in raw["rows"]:
        label = "/".join(str(r[k]) for k in ("row", "tokens", "pattern") if k in r)
        for key, value in r.items():
            if key.endswith("_s") and isinstance(value, (int, float)):
                rows.append((f"{label}/{key}", value, "s", LOWER))
        if isinstance(r.get("speedup"), (int, float)):
            rows.append((f"{label}/speedup", r["speedup"], "x", HIGHER, True))
        if isinstance(r.get("keep_fraction"), (int, float)):
            rows.append((f"{label}/keep_fraction", r["keep_fraction"], "of pairs", INFO))
    return rows


def multi_gpu_figures(raw: dict) -> FigureRows:
    """Per split: the speedup over one process and the bytes a rank sends per call (CPU, and
    CUDA when measured); per planned case, each GPU's peak and resident blocks."""
    rows: FigureRows = []
    for device in ("cpu", "cuda"):
        result = raw.get(device) or {}
        for split in ("cfg-parallel", "ulysses"):
            if split in result:
                r = result[split]
                rows += [(f"{device}/{split}/speedup", r["speedup"], "x", HIGHER, True),
                         (f"{device}/{split}/seconds", r["seconds"]["median"], "s", LOWER),
                         (f"{device}/{split}/bytes_sent_per_call", r["bytes_sent_per_call"], "B", LOWER)]
    for p in raw["plans"]:
        label = f"{p['size']} {p['card_gib']} GB x{p['gpus']} cfg {p['cfg']:g}"
        rows += [(f"{label}/peak_vram_gib", p["peak_vram_gib"], "GiB", LOWER),
                 (f"{label}/resident_blocks", p["resident"], "blocks", HIGHER)]
    return rows


# ----------------------------------------------------------------------------- the registry
#
# One line per bench. The quick sizes are chosen to finish in seconds on 2 CPU cores; the
# full sizes are the ones docs/BENCHMARKS.md quotes.

BENCHES: list[Bench] = [
    Bench("memory_plan", "memory_plan.py", repeats=1, figures=memory_plan_figures,
          note="exact (meta tensors): any change is a change of the planner"),
    Bench("plan_time", "plan_time.py", quick=("--repeats", "3"), full=("--repeats", "5"), repeats=1,
          figures=(lower("runs/[]/cold_s", "s"), lower("runs/[]/warm_s", "s"), lower("runs/[]/new_case_s", "s"))),
    Bench("vae_memory", "vae_memory.py", quick=("--width", "128", "--height", "64", "--versions", "2.1"),
          full=("--width", "256", "--height", "128"), repeats=1,
          figures=(lower("versions/*/decode/per_pixel", "B/px"), lower("versions/*/encode/per_pixel", "B/px"))),
    # quick: a narrow VAE (dim 8) at the smallest frame that still tiles; full: the real VAE
    Bench("vae_tiling", "vae_tiling.py", quick=("--sizes", "384x128", "--seconds", "0", "--dim", "8", "--budget", "0.7",
                                                "--threads", "1"),
          full=("--sizes", "832x480,1280x720", "--seconds", "20"), repeats=2, figures=vae_tiling_figures),
    Bench("host_ram", "host_ram.py", quick=("--size", "small"), full=("--size", "full"), repeats=2,
          figures=(lower("fp16/ratio", "x file"), lower("fp8/ratio", "x file"), lower("fp8/load_ratio", "x file"))),
    Bench("lora", "lora.py", quick=("--size", "small"), full=("--size", "full"), repeats=1,
          figures=(lower("fp16/*/peak_bytes", "B"), lower("fp8/*/peak_bytes", "B"),
                   lower("fp16/*/load_s", "s"), lower("fp8/*/load_s", "s"))),
    Bench("gguf_dequant", "gguf_dequant.py", quick=("--small",), full=(), repeats=2,
          figures=(higher("dequant_cpu/*/mvalues_per_s", "M values/s"),
                   lower("block_cpu/q4_k_over_bf16", "x time"), lower("block_cpu/bytes_q4_k_over_bf16", "x bytes"),
                   higher("dequant_cuda/*/mvalues_per_s", "M values/s"))),
    Bench("step_cache", "step_cache.py", quick=("--sizes", "tiny", "--steps", "4,20", "--threads", "1", "--repeats", "1"),
          full=("--sizes", "tiny,medium", "--threads", "1", "--repeats", "2"), repeats=2,
          figures=(lower("sizes/*/schedules/*/uncached_s", "s"), higher("sizes/*/schedules/*/*/skipped", "steps"),
                   higher("sizes/*/schedules/*/*/speedup", "x", timing=True),
                   higher("sizes/*/schedules/*/*/psnr_frames_db", "dB"))),
    # CUDA benches: skipped (and recorded so) on a machine without a GPU
    Bench("fp8_matmul", "fp8_matmul.py", quick=("--tokens", "8192", "--repeats", "5"), full=(), needs="cuda",
          figures=(lower("layers/*/*/ms", "ms"), higher("layers/*/speedup_scaled_mm_vs_bf16", "x", timing=True),
                   lower("layers/*/*/peak_extra_mib", "MiB"))),
    Bench("prefetch", "prefetch.py", quick=("--blocks", "8", "--tokens", "8192", "--repeats", "1"), full=(),
          needs="cuda", repeats=2,
          figures=(lower("s_per_forward/*", "s"), lower("wait_s_per_forward/*", "s"), higher("h2d_GBps", "GB/s"),
                   lower("ratio_vs_resident/*", "x", timing=True))),
    Bench("step_time", "step_time.py", quick=("--cases", "a", "--repeats", "1"), full=(), needs="cuda", repeats=1,
          timeout_s=(600.0, 3600.0),
          figures=(lower("cases/*/s_per_step", "s"), lower("cases/*/vram_peak_allocated_gib", "GiB"),
                   lower("cases/*/wait_s_per_step", "s"), info("cases/*/h2d_gb_per_step", "GB"))),
    # ---- benches being added by other work: register each with ONE line here ----
    Bench("attention", "attention.py", quick=("--quick", "--threads", "1"), full=(), repeats=1,
          figures=attention_figures, note="sparse vs dense in one process; flex needs a compile per pattern"),
    Bench("multi_gpu", "multi_gpu.py", quick=("--quick",), full=(), repeats=1, figures=multi_gpu_figures,
          note="2 CPU ranks x 1 thread against 1 process; per-GPU plans exact (meta tensors)"),
    # A bench that prints {"figures": {...}} (module docstring) needs no figures= here.
]

# Scripts in bench/ that are the suite's own tools, not benches.
TOOLS = {"run.py", "suite.py", "common.py", "compare.py", "gpu_check.py", "docs.py"}


# ----------------------------------------------------------------------------- reading figures

def _walk(node: Any, parts: list[str], name: list[str]) -> Iterator[tuple[str, Any]]:
    """(name, value) for every match of ``parts`` under ``node``; ``[]`` items share a name."""
    if not parts:
        yield "/".join(name), node
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            yield from _walk(child, rest, [*name, str(key)])
    elif head == "[]":
        for child in node if isinstance(node, list) else ():
            yield from _walk(child, rest, name)
    elif isinstance(node, dict) and head in node:
        yield from _walk(node[head], rest, [*name, head])


def _numbers(value: Any) -> list[float]:
    values = value if isinstance(value, list) else [value]
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]


def extract(bench: Bench, raw: dict) -> dict[str, dict]:
    """``{name: {"unit", "better", "samples"}}`` from one run's JSON: the registered patterns or
    function, plus what the bench declares under ``"figures"``."""
    out: dict[str, dict] = {}

    def add(name: str, value: Any, unit: str, better: str, timing: bool | None = None) -> None:
        samples = _numbers(value)
        if not samples:
            return
        entry = out.setdefault(name, {"unit": unit, "better": better, "timing": is_timing(unit, timing),
                                      "samples": []})
        entry["samples"] += samples

    if callable(bench.figures):
        for row in bench.figures(raw):
            add(*row)
    else:
        for figure in bench.figures:
            for name, value in _walk(raw, figure.path.split("/"), []):
                add(name, value, figure.unit, figure.better, figure.timing)
    declared = raw.get("figures")
    if isinstance(declared, dict):
        for name, spec in declared.items():
            if isinstance(spec, dict) and spec.get("better", INFO) in DIRECTIONS:
                add(name, spec.get("value"), str(spec.get("unit", "")), spec.get("better", INFO), spec.get("timing"))
    return out
