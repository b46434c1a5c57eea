"""LoRA load cost: load time and peak host RAM with a rank-64 LoRA merged, unmerged, or none.

Writes a Wan DiT checkpoint with bench/host_ram.py's writer (``full``: the Wan 2.1 1.3B shape,
30 blocks of width 1536, 1.42 G parameters, 2.84 GB in fp16 / bf16, seeded random values) and a
rank-64 LoRA on every Linear of the blocks in the lightx2v key layout (bf16 factors, ``alpha``
64), then loads it in six fresh subprocesses the way a block-swap job holds it on the host:
every block swapped, packed into "pinned" host memory (``RecordingBackend``, the CPU stand-in
of the CUDA backend, whose pinned buffers are ordinary anonymous memory):

- storage ``fp16``: the fp16 file kept fp16; ``fp8``: the bf16 file quantised to
  ``fp8_e4m3fn_scaled`` while loading (what the workflows' 14B experts go through);
- LoRA ``none``, ``merged`` (patched as each weight streams: float32 a chunk of rows at a
  time, then rounded, or requantised with a fresh scale) or ``unmerged`` (factors registered
  on the layers and packed with their block, applied by forward hooks).

Each case reports the load time (LoRA header match included) and the peak anonymous RSS
growth (``RssAnon``, polled every 2 ms, see optim/hostmem.py) over the baseline just before
loading, and separately one small forward's time. Target: merged adds less than 5 % to
none's peak, per storage. Unmerged holds the factors on top (``lora_bytes``, not a target).
The LoRA leaves the embeddings and head alone: on the host those tensors are file-backed
pages without a LoRA and owned copies with one, while on a GPU both live in VRAM.
``--size small`` (4 blocks of width 1024, 103 MB) is what the test suite runs.

    python bench/lora.py [--size full|small] [--rank 64] [--dir DIR]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # WanConfig keyword arguments
    "full": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "small": dict(dim=1024, ffn_dim=1024, num_heads=8, num_layers=4, text_dim=512),
}
STORAGES = {"fp16": ("fp16", dict(dtype=torch.float16)),  # storage -> (file dtype, prepare_dit kwargs)
            "fp8": ("bf16", dict(dtype=torch.bfloat16, weight_format="fp8_e4m3fn_scaled"))}
MODES = ("none", "merged", "unmerged")
TARGET = 0.05  # merged peak over none's


def _host_ram():
    """bench/host_ram.py as a module: its checkpoint writer, sizes and tiny forward."""
    spec = importlib.util.spec_from_file_location("wanfit_bench_host_ram", ROOT / "bench" / "host_ram.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SIZES = {f"lora_{k}": v for k, v in SIZES.items()}  # its writer, our sizes
    return module


def write_lora(path: Path, size: str, rank: int, seed: int = 0) -> int:
    """A rank-``rank`` LoRA for every Linear of the ``size`` model's blocks, lightx2v keys; returns bytes."""
    from safetensors.torch import save_file

    from wanfit.wan.model import WanConfig, WanModel
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanModel(WanConfig("t2v", **SIZES[size])).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if len(shape) == 2 and key.endswith(".weight") and key.startswith("blocks."):
            name = "diffusion_model." + key.removesuffix(".weight")
            sd[f"{name}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=gen) / shape[1] ** 0.5).bfloat16()
            sd[f"{name}.lora_up.weight"] = (0.01 * torch.randn(shape[0], rank, generator=gen)).bfloat16()
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return path.stat().st_size


def worker(storage: str, mode: str, ckpt_path: Path, lora_path: Path) -> dict:
    """Load ``ckpt_path`` as ``storage`` with the LoRA in ``mode``, in this fresh process."""
    host_ram = _host_ram()
    host_ram._import_pack()
    from wanfit.optim import hostmem, lora
    from wanfit.optim.engine import SwapSettings, prepare_dit
    from wanfit.optim.offload import RecordingBackend
    from wanfit.wan.checkpoint import open_checkpoint
    from wanfit.wan.model import WanConfig, WanModel
    ckpt = open_checkpoint(ckpt_path, expect="dit")
    tiny = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=1, text_dim=64)
    kwargs = STORAGES[storage][1]
    with torch.device("meta"):  # torch's meta kernels and a first CPU forward, before the baseline
        WanModel(tiny)
    host_ram._forward(WanModel(tiny).to(kwargs["dtype"]))
    gc.collect()
    base = hostmem.rss_anon_bytes()
    t = time.perf_counter()
    with hostmem.PeakSampler(interval_s=0.002) as sampler:
        loras = [] if mode == "none" else [(lora.AppliedLora(lora.open_lora(lora_path, ckpt.shapes), 1.0), mode)]
        swap = SwapSettings(blocks_to_swap=len([k for k in ckpt.shapes if k.endswith(".ffn.0.weight")]))
        prepared = prepare_dit(ckpt, RecordingBackend(), swap, **kwargs, loras=loras)
        load_s = time.perf_counter() - t
        loaded = sampler.sample()[1]
    t = time.perf_counter()
    with torch.inference_mode():  # the swapped blocks stream through the (stand-in) device slots
        prepared.model.unembed(prepared.run_blocks(prepared.model.embed(*_inputs(prepared.model))))
    forward_s = time.perf_counter() - t
    unmerged = prepared.loras.unmerged
    lora_bytes = 0 if unmerged is None else sum(unmerged.block_bytes) + unmerged.other_bytes
    return dict(load_s=round(load_s, 3), forward_s=round(forward_s, 3), peak_bytes=sampler.peak_anon - base,
                loaded_bytes=loaded - base, lora_bytes=lora_bytes)


def _inputs(model) -> tuple:
    c = model.config
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, c.out_dim, 1, 4, 4, generator=gen), torch.tensor([500.0]),
            torch.randn(1, 16, c.text_dim, generator=gen))


def _run_worker(storage: str, mode: str, ckpt: Path, lora_path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", storage, mode, "--file", str(ckpt),
                          "--lora", str(lora_path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {storage}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(raw: dict, file_bytes: dict, lora_bytes: int) -> dict:
    result: dict = {"file_bytes": file_bytes, "lora_file_bytes": lora_bytes, "target": TARGET}
    for storage, cases in raw.items():
        none = cases["none"]["peak_bytes"]
        entry = {mode: {**case, "peak_over_none": case["peak_bytes"] / none - 1} for mode, case in cases.items()}
        entry["pass"] = entry["merged"]["peak_over_none"] < TARGET
        result[storage] = entry
    result["pass"] = all(result[s]["pass"] for s in raw)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--worker", nargs=2, metavar=("STORAGE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lora", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.file, args.lora)))
        return
    if not sys.platform.startswith("linux"):
        print(json.dumps({"skipped": "RssAnon needs Linux"}))
        return
    host_ram = _host_ram()
    host_ram._import_pack()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = {name: Path(tmp) / f"wan_{args.size}_{name}.safetensors" for name in ("fp16", "bf16")}
        sizes = {name: host_ram.write_checkpoint(path, f"lora_{args.size}", name) for name, path in files.items()}
        lora_path = Path(tmp) / f"lora_{args.size}_rank{args.rank}.safetensors"
        lora_bytes = write_lora(lora_path, args.size, args.rank)
        raw = {storage: {mode: _run_worker(storage, mode, files[STORAGES[storage][0]], lora_path) for mode in MODES}
               for storage in STORAGES}
    print(json.dumps({"size": args.size, "rank": args.rank, **report(raw, sizes, lora_bytes)}))


if __name__ == "__main__":
    main()
