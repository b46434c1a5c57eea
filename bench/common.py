"""What bench/run.py and bench/gpu_check.py share: the machine's description, child processes
with a time limit, figure statistics and JSON reports. Plain Python; torch is imported only to
describe the machine."""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
# CPU flags that decide which kernels torch, oneDNN and our fp8 / GGUF paths run with
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


@dataclass
class Finished:
    """A child process's end: ``returncode`` None when it was killed at its time limit."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def last_json(self) -> dict | None:
        """The JSON object the child printed last (its last line, warnings aside), or None."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        # the last line that is a JSON object: a warning printed at exit (merged stderr) may follow it
        for line in reversed(lines[-20:]):
            if line.lstrip().startswith("{"):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return value if isinstance(value, dict) else None
        return None

    def last_json_value(self) -> Any:
        """The last line of stdout as JSON (any type), or None."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        try:
            return json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            return None

    def error_tail(self, chars: int = 2000) -> str:
        text = (self.stderr.strip() or self.stdout.strip())
        return text[-chars:]


def run_process(cmd: list[str], timeout: float, cwd: Path = ROOT, echo: bool = False,
                env: dict[str, str] | None = None) -> Finished:
    """Run ``cmd`` for at most ``timeout`` seconds. On time-out its whole process group is
    killed (benches start workers of their own). ``echo``: copy its output to ours as it comes
    (stdout and stderr are still captured)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.perf_counter()
    posix = os.name == "posix"
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if echo else subprocess.PIPE, start_new_session=posix)
    if echo:
        return _echoed(proc, timeout, start)
    try:
        out, err = proc.communicate(timeout=timeout)
        return Finished(proc.returncode, out, err, time.perf_counter() - start)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        return Finished(None, out or "", err or "", time.perf_counter() - start)


def _echoed(proc: subprocess.Popen, timeout: float, start: float) -> Finished:
    """Stream a child's merged output line by line under a deadline (a reader thread, so a
    silent child cannot hold us past it)."""
    import threading

    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write("    " + line)
            sys.stdout.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.wait()
        returncode = None
    reader.join(timeout=5)
    out = "".join(lines)
    # merged output: the last JSON line is on stdout, errors are in the same text
    return Finished(returncode, out, out if returncode else "", time.perf_counter() - start)


def _kill(proc: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass


def summarize(samples: list[float]) -> dict[str, float | int]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def figure_entry(f: dict) -> dict:
    """A figure as the report keeps it: unit, direction, timing or exact, statistics, samples."""
    return {"unit": f["unit"], "better": f["better"], "timing": f.get("timing", False), **summarize(f["samples"]),
            "samples": f["samples"]}


def load_avg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_per_core(runs: list[dict]) -> float | None:
    """The CPU load a bench ran under: the 1-minute load average at the start and end of each of
    its processes, averaged, per usable core (1.0: every core busy; above: processes waiting)."""
    values = [v for r in runs for v in r.get("load") or () if v is not None]
    return round(sum(values) / len(values) / usable_cores(), 2) if values else None


# ----------------------------------------------------------------------------- the machine

def _cpu() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    usable = usable_cores()
    return {"model": model, "arch": platform.machine(), "flags": [f for f in CPU_FLAGS if f in flags],
            "logical_cores": os.cpu_count(), "usable_cores": usable}


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().total)


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


_GPU_QUERY = """
import json, torch
print(json.dumps([{"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                   "capability": f"{p.major}.{p.minor}"}
                  for i, p in ((i, torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count()))]))
"""


def gpus() -> list[dict[str, Any]]:
    """Every CUDA device torch sees: name, memory, compute capability. Asked in a child process:
    the first property query creates a CUDA context, which this (parent) process would then hold,
    with its memory, through every bench it runs."""
    import torch

    if not torch.cuda.is_available():
        return []
    done = run_process([sys.executable, "-c", _GPU_QUERY], timeout=120)
    found = done.last_json_value()
    return found if isinstance(found, list) else [{"error": done.error_tail(500)}]


def machine_info() -> dict[str, Any]:
    import torch

    cards = gpus()
    cpu = _cpu()
    cpu["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    return {"host": platform.node(), "os": platform.platform(), "cpu": cpu, "ram_bytes": _ram_bytes(),
            "gpus": cards, "cuda_driver": _nvidia_driver() if cards else None,
            "cuda_runtime": torch.version.cuda, "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def versions() -> dict[str, Any]:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "pack": _pack_version()}
    for name in ("gguf", "safetensors", "numpy"):
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", None)
        except ImportError:
            found[name] = None
    return found


def _pack_version() -> str | None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = None
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if tomllib is not None:
        return tomllib.loads(text)["project"]["version"]
    for line in text.splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    """Written to a temporary name and renamed, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fmt(value: float | None) -> str:
    """A figure for a table: 4 significant digits, no exponent for everyday sizes."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    a = abs(value)
    if a >= 1e6 or a < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}" if a < 1e4 else f"{value:,.0f}"
