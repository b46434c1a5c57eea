"""Block swap cost against a resident model, at Wan 14B sizes.

Builds ``--blocks`` (40) blocks shaped like a Wan 2.1/2.2 14B DiT block (dim 5120, ffn 13824,
40 heads; 351 M parameters, 0.70 GB in bf16), runs one forward over ``--tokens`` (32760 =
81 frames at 832x480: 21 latent frames x 60 x 104 / 2x2 patches) with 512 text tokens, and
times it fully resident, then with every block swapped: prefetch 0 (synchronous), 1 and 2,
and prefetch 1 with the blocks in pageable memory behind pinned staging buffers.

The block is a stand-in with the real block's weights and matmuls (self-attention through
``scaled_dot_product_attention``, cross-attention, GELU FFN, adaLN modulation) but no RoPE,
whose cost is a few elementwise passes. The last line of stdout is a JSON object; without
CUDA it is ``{"skipped": "no CUDA device"}`` and the exit status is 0.

    python bench/prefetch.py [--blocks 40] [--tokens 32760] [--repeats 2]
    python bench/prefetch.py --device cpu --tiny   # the code path on the CPU (recording backend)

At the defaults it needs about 30 GB of GPU memory (the resident run) and 30 GB of host
memory, and runs for a few minutes, most of it pinning 28 GB once per swapped configuration.
``bench/gpu_check.py`` runs it with ``--blocks 8`` (5.6 GB) to fit its time budget.
``--tiny`` shrinks the blocks (dim 256, ffn 512, 2 heads) and the tokens (64); on the CPU the
swapper runs against ``offload.RecordingBackend`` and no copy bandwidth is measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _import_pack():
    """Import the pack as ``wanfit``, registered as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()
    from wanfit.optim.offload import BlockSwapper, RecordingBackend
    return BlockSwapper, RecordingBackend


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.heads
        q = self.norm_q(self.q(x)).view(b, -1, h, x.shape[-1] // h).transpose(1, 2)
        k = self.norm_k(self.k(context)).view(b, -1, h, x.shape[-1] // h).transpose(1, 2)
        v = self.v(context).view(b, -1, h, x.shape[-1] // h).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class WanLikeBlock(nn.Module):
    """Parameters and matmuls of a Wan DiT block (no RoPE)."""

    def __init__(self, dim: int = 5120, ffn: int = 13824, heads: int = 40):
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.self_attn = Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        m = (self.modulation + e).chunk(6, dim=1)
        y = self.norm1(x) * (1 + m[1]) + m[0]
        x = x + self.self_attn(y, y) * m[2]
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.norm2(x) * (1 + m[4]) + m[3]
        return x + self.ffn(y) * m[5]


def timed(run, repeats: int, sync=torch.cuda.synchronize) -> float:
    """Seconds per call, after one warm-up call."""
    run()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the code path")
    parser.add_argument("--tiny", action="store_true", help="blocks of dim 256, 64 tokens")
    args = parser.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    BlockSwapper, RecordingBackend = _import_pack()
    dtype = torch.bfloat16
    dim, ffn, heads, tokens = (256, 512, 2, 64) if args.tiny else (5120, 13824, 40, args.tokens)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the GPU: CPU init of 14 B parameters takes minutes
        blocks = nn.ModuleList(WanLikeBlock(dim, ffn, heads).to(dtype) for _ in range(args.blocks))
    x = torch.randn(1, tokens, dim, device=dev, dtype=dtype)
    e = torch.randn(1, 6, dim, device=dev, dtype=dtype) * 0.02
    context = torch.randn(1, 512, dim, device=dev, dtype=dtype)
    block_gb = sum(t.nbytes for t in blocks[0].state_dict().values()) / 1e9

    def run_resident():
        y = x
        for block in blocks:
            y = block(y, e, context)
        return y

    result = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "blocks": args.blocks,
              "tokens": tokens, "dim": dim, "block_gb": round(block_gb, 3), "s_per_forward": {},
              "wait_s_per_forward": {}, "pinned_blocks": {}}
    with torch.inference_mode():
        result["s_per_forward"]["resident"] = timed(run_resident, args.repeats, sync)
        print(f"resident: {result['s_per_forward']['resident']:.3f} s/forward", flush=True)
        blocks.cpu()
        if cuda:
            torch.cuda.empty_cache()
        configs = {"swap_prefetch0": (0, None), "swap_prefetch1": (1, None),
                   "swap_prefetch2": (2, None), "swap_prefetch1_staged": (1, 0)}
        for name, (prefetch, pin_budget) in configs.items():
            backend = dev if cuda else RecordingBackend()
            with BlockSwapper(blocks, backend, resident=0, prefetch=prefetch,
                              pin_budget=pin_budget) as swapper:
                s = timed(lambda: swapper.forward(x, e=e, context=context), args.repeats, sync)
                stats = swapper.telemetry()
                result["s_per_forward"][name] = s
                result["wait_s_per_forward"][name] = stats.wait_s / stats.forwards
                result["pinned_blocks"][name] = stats.pinned_blocks
                print(f"{name}: {s:.3f} s/forward, compute waited "
                      f"{stats.wait_s / stats.forwards:.3f} s/forward", flush=True)
        if cuda:
            # Raw copy speed of one block's bytes, pinned and pageable, to read the numbers above.
            src = torch.empty(int(block_gb * 1e9), dtype=torch.uint8, pin_memory=True)
            dst = torch.empty_like(src, device=dev)
            result["h2d_GBps"] = src.nbytes / timed(lambda: dst.copy_(src, non_blocking=True), 5) / 1e9
            pageable = torch.empty(src.nbytes, dtype=torch.uint8)
            result["h2d_pageable_GBps"] = pageable.nbytes / timed(lambda: dst.copy_(pageable), 3) / 1e9
            print(f"H2D: {result['h2d_GBps']:.1f} GB/s pinned, {result['h2d_pageable_GBps']:.1f} GB/s pageable",
                  flush=True)
        else:
            result["h2d_GBps"] = result["h2d_pageable_GBps"] = None  # no device to copy to
    base = result["s_per_forward"]["resident"]
    result["ratio_vs_resident"] = {k: v / base for k, v in result["s_per_forward"].items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
