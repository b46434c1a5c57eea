"""Host memory of this process: resident set, its anonymous part, and their peaks.

Anonymous RSS (``RssAnon`` in ``/proc/self/status``) is the number that matters for model
weights: pages of a memory-mapped checkpoint count as file-backed RSS, which the kernel can
drop and re-read at will, while every tensor copy made on the host is anonymous and stays
until freed. Off Linux there is no such split; psutil's RSS stands in for both (an upper
bound for the anonymous part).

The kernel keeps a peak for the whole RSS (``VmHWM``) but not for its anonymous part, so
:class:`PeakSampler` polls from a daemon thread (one small read per sample, tens of us).

:func:`allocation_peak` measures tensors rather than pages: torch's CPU allocator reports
every allocation and free to the profiler when ``profile_memory=True`` (``[memory]`` events
with signed byte counts). Summed in time order they give the bytes allocated inside a call
and still alive, whose maximum is what the call added on top of what existed before: the CPU
counterpart of ``torch.cuda.max_memory_allocated`` minus the starting allocation, not blurred
by glibc's heap, page granularity or oneDNN scratch buffers.
"""
from __future__ import annotations

import ctypes
import functools
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_STATUS = "/proc/self/status"
_M_MMAP_THRESHOLD = -3  # glibc malloc.h
_FIELDS = re.compile(rb"^(VmRSS|RssAnon):\s+(\d+) kB", re.MULTILINE)


def allocation_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensors allocated by ``fn`` above what was live before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def read_rss() -> tuple[int | None, int | None]:
    """``(rss, anonymous rss)`` of this process in bytes; None where the platform cannot tell."""
    if sys.platform.startswith("linux"):
        with open(_STATUS, "rb") as f:
            fields = {name: int(kb) * 1024 for name, kb in _FIELDS.findall(f.read())}
        return fields.get(b"VmRSS"), fields.get(b"RssAnon")
    try:
        import psutil
    except ImportError:
        return None, None
    rss = psutil.Process().memory_info().rss
    return rss, rss


def rss_anon_bytes() -> int | None:
    """Anonymous resident bytes of this process now (RSS off Linux; None if unknown)."""
    return read_rss()[1]


@functools.cache
def mmap_large_allocations(threshold: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more from a mapping of its
    own, unmapped the moment it is freed; process-wide and for good (a second call is free).
    False where there is no glibc.

    By default glibc raises its mmap threshold each time a mapped block is freed (up to
    32 MiB), so after the first freed transient, tensors up to that size come from the heap,
    and memory freed there stays resident as holes between tensors that live on. Streaming
    a checkpoint through quantisation then grows RSS far past the model's size (see
    bench/host_ram.py). The price of a fixed threshold: a page fault per page of each large
    host allocation, small beside the copies that fill it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold))  # this process's libc
    except AttributeError:  # a libc without mallopt
        return False


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


class PeakSampler:
    """Peak RSS and anonymous RSS over a span, polled every ``interval_s`` by a daemon thread.

    ``sample()`` takes an extra reading from any thread (e.g. at each sampling step, so a
    peak between two polls is not missed there). Use as a context manager or call
    :meth:`start` / :meth:`stop`; ``stop`` joins the thread.
    """

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.baseline_rss = self.baseline_anon = self.peak_rss = self.peak_anon = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> tuple[int | None, int | None]:
        rss, anon = read_rss()
        with self._lock:
            self.peak_rss, self.peak_anon = _max(self.peak_rss, rss), _max(self.peak_anon, anon)
        return rss, anon

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> PeakSampler:
        if self._thread is not None:
            raise RuntimeError("PeakSampler already started")
        self.baseline_rss, self.baseline_anon = self.sample()
        self._thread = threading.Thread(target=self._run, name="wanfit-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (idempotent) after a last reading."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> PeakSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peak_rss_anon_growth(fn: Callable[..., T], *args: Any, interval_s: float = 0.005,
                         **kwargs: Any) -> tuple[T, int | None]:
    """Run ``fn(*args, **kwargs)``; return its result and the peak anonymous RSS reached
    during the call minus the anonymous RSS just before it, in bytes (None if unknown)."""
    with PeakSampler(interval_s) as sampler:
        result = fn(*args, **kwargs)
    if sampler.peak_anon is None or sampler.baseline_anon is None:
        return result, None
    return result, sampler.peak_anon - sampler.baseline_anon
