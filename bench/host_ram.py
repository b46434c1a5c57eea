"""Host RAM of loading a Wan DiT: peak anonymous RSS growth over the checkpoint's size.

Writes a Wan-shaped DiT checkpoint (the 1.3B model's block shape, dim 1536 / ffn 8960, with
12 of its 30 blocks: 583 M parameters, 1.17 GB in fp16 and in bf16) tensor by tensor with
seeded random values, then measures three cases, each in a fresh subprocess so that every
baseline is clean:

- ``fp16``: the fp16 file loaded as fp16 (``load_dit(dtype=float16)``), then one small CPU
  forward. Target: peak RssAnon growth <= 1.05 x file size.
- ``fp8``: the bf16 file quantised to fp8 while loading (``weight_format=
  "fp8_e4m3fn_scaled"``), then one forward. Target: <= 0.55 x file size.
- ``repeat``: five load (fp8) + forward + release jobs in one process. Target: job 5's peak
  growth exceeds job 1's by less than 2 % of job 1's.

Growth is counted from the process's anonymous RSS (``RssAnon``, polled every 2 ms) just
before loading; the pages of the memory-mapped checkpoint are file-backed and not counted,
as the kernel can drop them. Paid before the baseline, once per process and whatever the
model: torch's meta-kernel imports (~67 MB) and a first forward of a throwaway tiny model.
``MALLOC_*`` variables in the environment (glibc tunables) reach the workers and the JSON.

``--size small`` (dim 1024 so every quantised weight is >= 1 MiB as in real models, 4
blocks: 103 MB) is what the test suite runs. The last line of stdout is a JSON object with
the ratios and pass / fail per target.

    python bench/host_ram.py [--size full|small] [--dir DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # WanConfig keyword arguments
    "full": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=12),
    "small": dict(dim=1024, ffn_dim=1024, num_heads=8, num_layers=4, text_dim=512),
}
TARGETS = {"fp16": 1.05, "fp8": 0.55, "repeat": 0.02}
FILES = {"fp16": "fp16", "fp8": "bf16", "repeat": "bf16"}  # case -> file it loads
JOBS = 5
_DTYPES = {"fp16": (torch.float16, "F16"), "bf16": (torch.bfloat16, "BF16")}


def _import_pack():
    """Register the repository as the package ``wanfit``, as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()


def write_checkpoint(path: Path, size: str, dtype_name: str, seed: int = 0) -> int:
    """Write a random Wan DiT of ``SIZES[size]`` to ``path`` as safetensors; return its size.

    The model is built on the meta device for its key layout and shapes only; each tensor is
    drawn, cast and written on its own, so at most one tensor is in memory at a time.
    """
    from wanfit.wan.model import WanConfig, WanModel
    dtype, st_name = _DTYPES[dtype_name]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanModel(WanConfig("t2v", **SIZES[size])).state_dict().items()}
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": st_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=gen)
            if "norm" in key:  # norms near 1, the rest scaled by fan-in so activations stay sane
                t = t.mul_(0.1).add_(1.0)
            elif len(shape) >= 2:
                t = t.div_(math.prod(shape[1:]) ** 0.5)
            f.write(t.to(dtype).view(torch.uint8).numpy())
    return path.stat().st_size


def _forward(model) -> None:
    """One forward over 4 tokens and 16 text tokens (padded to 512 by the model)."""
    c = model.config
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(torch.randn(1, c.out_dim, 1, 4, 4, generator=gen), torch.tensor([500.0]),
              torch.randn(1, 16, c.text_dim, generator=gen))


def _job(case: str, ckpt, hostmem, loading) -> dict[str, int]:
    """Load, forward, release under a PeakSampler: absolute anonymous RSS at each point."""
    kwargs = (dict(dtype=torch.float16) if case == "fp16"
              else dict(dtype=torch.bfloat16, weight_format="fp8_e4m3fn_scaled"))
    with hostmem.PeakSampler(interval_s=0.002) as sampler:
        model = loading.load_dit(ckpt, **kwargs)
        loaded = sampler.sample()[1]
        load_peak = sampler.peak_anon
        _forward(model)
        del model
        gc.collect()
    return dict(peak=sampler.peak_anon, load_peak=load_peak, loaded=loaded, released=hostmem.rss_anon_bytes())


def worker(case: str, path: Path) -> dict:
    """Run ``case`` in this (fresh) process; bytes above the pre-load baseline."""
    _import_pack()
    from wanfit.optim import hostmem, loading
    from wanfit.wan.checkpoint import open_checkpoint
    from wanfit.wan.model import WanConfig, WanModel
    ckpt = open_checkpoint(path, expect="dit")
    before = hostmem.rss_anon_bytes()
    tiny = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=1, text_dim=64)
    with torch.device("meta"):  # the first meta op imports torch's meta kernels
        WanModel(tiny)
    warm = hostmem.rss_anon_bytes()
    _forward(WanModel(tiny).to(torch.float16 if case == "fp16" else torch.bfloat16))  # CPU kernel set-up
    gc.collect()
    base = hostmem.rss_anon_bytes()
    jobs = [_job(case, ckpt, hostmem, loading) for _ in range(JOBS if case == "repeat" else 1)]
    return dict(meta_import=warm - before, warm_up=base - warm,
                jobs=[{k: v - base for k, v in j.items()} for j in jobs])


def _run_worker(case: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", case, "--file", str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(raw: dict, sizes: dict[str, int]) -> dict:
    result: dict = {"file_bytes": sizes, "meta_import_bytes": raw["fp16"]["meta_import"],
                    "warm_up_bytes": raw["fp16"]["warm_up"],
                    "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    for case in ("fp16", "fp8"):
        job, size = raw[case]["jobs"][0], sizes[FILES[case]]
        ratio = job["peak"] / size
        result[case] = {"peak_bytes": job["peak"], "load_peak_bytes": job["load_peak"], "ratio": ratio,
                        "target": TARGETS[case], "pass": ratio <= TARGETS[case],
                        "load_ratio": job["load_peak"] / size, "loaded_ratio": job["loaded"] / size,
                        "released_ratio": job["released"] / size}
    jobs, size = raw["repeat"]["jobs"], sizes["bf16"]
    peaks = [j["peak"] for j in jobs]
    growth = (peaks[-1] - peaks[0]) / peaks[0]
    result["repeat"] = {"peak_bytes": peaks, "growth": growth, "target": TARGETS["repeat"],
                        "pass": growth < TARGETS["repeat"], "peak_ratios": [p / size for p in peaks],
                        "released_ratios": [j["released"] / size for j in jobs]}
    result["pass"] = all(result[case]["pass"] for case in TARGETS)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.file)))
        return
    if not sys.platform.startswith("linux"):
        print(json.dumps({"skipped": "RssAnon needs Linux"}))
        return
    _import_pack()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = {name: Path(tmp) / f"wan_{args.size}_{name}.safetensors" for name in _DTYPES}
        sizes = {name: write_checkpoint(path, args.size, name) for name, path in files.items()}
        raw = {case: _run_worker(case, files[FILES[case]]) for case in TARGETS}
    print(json.dumps({"size": args.size, **_report(raw, sizes)}))


if __name__ == "__main__":
    main()
