"""Telemetry for one job: peak VRAM, peak host RAM, seconds per step, bytes swapped, steps
computed and skipped by a step cache, and the time each stage took, as a JSON-ready dict and
as one log paragraph.

    with Telemetry() as tel:
        with tel.stage("load"):
            model = load_dit(...)
        tel.watch(swapper)                       # a BlockSwapper, when blocks swap
        with tel.stage("sample"):
            sample(..., callback=tel.on_step)    # or tel.mark_step() once per step
        log.info(tel.format())
    result["telemetry"] = tel.summary()

Host RAM is polled by a daemon thread (see :class:`hostmem.PeakSampler`) and read again at
each step; leaving the ``with`` block stops the thread, also when the job raises. Every
method may be called from any thread.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from .hostmem import PeakSampler
from .offload import SwapStats

class SwapSource(Protocol):
    """What :meth:`Telemetry.watch` reads: a :class:`offload.BlockSwapper` or the like."""

    def telemetry(self) -> SwapStats: ...


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class Telemetry:
    """Recorder for one job; see the module docstring.

    ``device``: where VRAM peaks are read (reset by :meth:`start`); None takes the current
    CUDA device when there is one. On a CPU device the VRAM figures are None.
    ``interval_s``: host RAM polling period.
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.02):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._sampler = PeakSampler(interval_s)
        self._lock = threading.Lock()
        self._stages: dict[str, float] = {}
        self._steps: list[float] = []
        self._skipped = 0
        self._step_cache: dict | None = None
        self._speed: dict[str, dict] = {}
        self._swaps: list[tuple[SwapSource, int, float]] = []  # source, h2d bytes and wait at watch()
        self._t0 = self._mark = self._t1 = None
        # A recorder dropped without stop() must not leave its thread polling forever.
        self._finalizer = weakref.finalize(self, self._sampler.stop)

    def start(self) -> Telemetry:
        """Reset the device's peak memory counters, start the clock and the RAM sampler."""
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = self._mark = time.perf_counter()
        self._sampler.start()
        return self

    def stop(self) -> None:
        """Stop the RAM sampler (idempotent); the recorded figures stay readable."""
        self._sampler.stop()
        if self._t1 is None and self._t0 is not None:
            self._t1 = time.perf_counter()

    def __enter__(self) -> Telemetry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def sampling(self) -> bool:
        """Whether the host RAM sampler thread is running."""
        return self._sampler.running

    def _sync(self) -> None:
        # Kernels run asynchronously: without this a step would be timed at launch, not end.
        if self._cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (``load``, ``encode``, ``sample``, ``decode``, ...); a name used
        twice (two sampling passes) adds up. The step clock restarts at the stage's start."""
        start = time.perf_counter()
        with self._lock:
            self._mark = start
        try:
            yield
        finally:
            self._sync()
            with self._lock:
                self._stages[name] = self._stages.get(name, 0.0) + time.perf_counter() - start

    def mark_step(self) -> None:
        """End a sampling step: record the seconds since the previous step ended (or since
        the current stage, or the job, began) and take a host RAM reading."""
        self._sync()
        now = time.perf_counter()
        with self._lock:
            if self._mark is None:
                raise RuntimeError("Telemetry not started")
            self._steps.append(now - self._mark)
            self._mark = now
        self._sampler.sample()

    def on_step(self, index: int, total: int, x: Any, x0: Any) -> None:
        """``mark_step`` with the signature of ``wan.sampling.sample``'s callback."""
        self.mark_step()

    def skip_step(self, n: int = 1) -> None:
        """Count steps a step cache skipped (the block stack did not run)."""
        with self._lock:
            self._skipped += n

    def record_step_cache(self, report: dict[str, Any]) -> None:
        """Take a step cache's job report (``optim.step_cache.StepCache.report``): its steps
        computed and skipped replace the ``skip_step`` count, and the report rides along."""
        with self._lock:
            self._step_cache = dict(report)

    def record_speed(self, name: str, report: dict[str, Any]) -> None:
        """A speed technique's pass report (``sparse_attention``, ``compiled_blocks``); a second
        pass's adds up: numbers and call counts are summed, grids listed once, a fallback kept."""
        with self._lock:
            old = self._speed.get(name)
            self._speed[name] = _merge(old, dict(report)) if old is not None else dict(report)

    def watch(self, source: SwapSource) -> None:
        """Report what ``source`` (a BlockSwapper) moves from now on: bytes copied host to
        device and seconds compute waited for them. Several sources (two experts) add up."""
        stats = source.telemetry()
        with self._lock:
            self._swaps.append((source, stats.h2d_bytes, stats.wait_s))

    def summary(self) -> dict[str, Any]:
        """The figures so far as plain JSON types; bytes are ints, seconds floats, None where
        unknown (VRAM on CPU, host RAM on a platform without a reading)."""
        swaps = [(src.telemetry(), h2d, wait) for src, h2d, wait in list(self._swaps)]
        vram = ((torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device))
                if self._cuda and self._t0 is not None else (None, None))
        end = self._t1 if self._t1 is not None else time.perf_counter()
        s = self._sampler
        with self._lock:
            steps = list(self._steps)
            return {
                "wall_s": None if self._t0 is None else end - self._t0,
                "stages_s": dict(self._stages),
                "steps": len(steps),
                "step_s": steps,
                "mean_step_s": sum(steps) / len(steps) if steps else None,
                "steps_skipped": self._skipped if self._step_cache is None else self._step_cache["steps_skipped"],
                "steps_computed": None if self._step_cache is None else self._step_cache["steps_computed"],
                "step_cache": self._step_cache,
                "vram_peak_allocated": vram[0],
                "vram_peak_reserved": vram[1],
                "host_rss_peak": s.peak_rss,
                "host_rss_anon_peak": s.peak_anon,
                "host_rss_anon_start": s.baseline_anon,
                "h2d_bytes": sum(st.h2d_bytes - h2d for st, h2d, _ in swaps),
                "transfer_wait_s": sum(st.wait_s - wait for st, _, wait in swaps),
                **{k: dict(v) for k, v in self._speed.items()},
            }

    def format(self) -> str:
        """One short paragraph for the log."""
        s = self.summary()
        parts = []
        if s["stages_s"]:
            parts.append(", ".join(f"{k} {v:.1f} s" for k, v in s["stages_s"].items()))
        if s["steps"]:
            skipped = f" ({s['steps_skipped']} skipped)" if s["steps_skipped"] else ""
            parts.append(f"{s['steps']} steps at {s['mean_step_s']:.2f} s/step{skipped}")
        if s["vram_peak_allocated"] is not None:
            parts.append(f"VRAM peak {_gb(s['vram_peak_allocated'])} allocated, "
                         f"{_gb(s['vram_peak_reserved'])} reserved")
        if s["host_rss_peak"] is not None:
            parts.append(f"host RAM peak {_gb(s['host_rss_peak'])} (anonymous {_gb(s['host_rss_anon_peak'])})")
        if s["step_cache"] is not None:
            c = s["step_cache"]
            parts.append(f"{c['settings']}: {c['steps_computed']} steps computed, {c['steps_skipped']} skipped")
        if "sparse_attention" in s:
            a = s["sparse_attention"]
            kept = ", ".join(f"{100 * g['keep_fraction']:.1f} % computed at {g['tokens']:,} tokens" for g in a["grids"])
            parts.append(f"{a['settings']} ({a['calls']['sparse']} calls sparse, {a['calls']['dense']} dense"
                         + (f"; {kept})" if kept else ")"))
        if "compiled_blocks" in s:
            c = s["compiled_blocks"]
            state = f"fell back to eager: {c['fallback']}" if c["fallback"] else (
                f"warm-up {c['warmup_s']:.1f} s, {c['graphs_compiled']} graph(s) compiled")
            parts.append(f"{c['settings']}: {state}")
        if self._swaps:
            parts.append(f"block swap moved {_gb(s['h2d_bytes'])} to the device, compute waited "
                         f"{s['transfer_wait_s']:.1f} s")
        return "WanFit: " + ("; ".join(parts) or "nothing recorded") + "."


def _merge(old: dict, new: dict) -> dict:
    out = dict(old)
    for key, value in new.items():
        before = out.get(key)
        if isinstance(value, bool) or before is None:
            out[key] = value if before is None or key != "fallback" else before
        elif isinstance(value, (int, float)):
            out[key] = before + value
        elif isinstance(value, dict):
            out[key] = {k: before.get(k, 0) + v for k, v in value.items()}
        elif isinstance(value, list):
            out[key] = before + [v for v in value if v not in before]
        else:
            out[key] = before if key == "fallback" and before else value
    return out
