"""GGUF: torch dequantisation throughput per ggml type, and a DiT block forward in Q4_K against bf16.

Dequantisation: ``--numel`` random valid values per type (random blocks with finite scales),
decoded to bf16 (the compute dtype) by ``optim.gguf.dequantize``; reported as GB/s of output
and million values per second, and to float32 beside gguf's own numpy decoder on the same
blocks (float32 out, the reference it equals bit for bit). On CUDA too when a GPU is present.

Block: one Wan DiT block (``--dim`` / ``--ffn``, default the 1.3B's 1536 / 8960) on
``--tokens`` tokens (default 1560: one latent frame at 832x480) with a 512-token text context,
its Linears once in bf16 and once as ``GGUFLinear`` Q4_K (the factory's quantiser), timed in
the same run; the Q4_K forward's share spent dequantising, the bytes each block moves when
swapped, and the output's relative difference from bf16 are reported beside the time ratio.
The last line of stdout is a JSON object.

    python bench/gguf_dequant.py [--numel 4194304] [--dim 1536 --ffn 8960 --tokens 1560] [--repeats 7] [--block-repeats 3]
    python bench/gguf_dequant.py --small   # the sizes tests/test_gguf_bench.py runs
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import gguf  # noqa: E402
import torch  # noqa: E402


def _import_pack():
    """The pack as ``wanfit`` (registered as the tests do) and the tiny-model factory."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()
    import factory
    from wanfit.optim import gguf as G
    from wanfit.wan import model as wan_model
    return G, wan_model, factory


def timed(*fns: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Fastest of ``repeats`` calls of each of ``fns`` after one warm-up call each, in seconds.
    The calls alternate, so every function sees the same load; on a shared host the minimum
    is the code's own cost, the median mostly other processes'."""
    for fn in fns:
        fn()
    sync()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def dequant_rates(G, factory, numel: int, repeats: int, device: str, numpy_ref: bool) -> dict:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for qtype in G.SUPPORTED_TYPES:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        n_blocks = max(1, numel // block)
        blocks = factory.random_gguf_blocks(qtype, n_blocks, seed=int(qtype))
        raw = torch.from_numpy(blocks.copy()).reshape(-1).to(device)
        count = n_blocks * block
        fns = [lambda: G.dequantize(raw, qtype, (count,), torch.bfloat16),
               lambda: G.dequantize(raw, qtype, (count,), torch.float32)]
        with_numpy = numpy_ref and qtype != gguf.GGMLQuantizationType.F32  # numpy's F32 "decode" is a view
        if with_numpy:
            flat = blocks.reshape(1, -1) if qtype == gguf.GGMLQuantizationType.BF16 else blocks.reshape(-1)
            fns.append(lambda: gguf.quants.dequantize(flat, qtype))
        seconds = timed(*fns, repeats=repeats, sync=sync)
        row = {"gb_per_s": round(count * 2 / seconds[0] / 1e9, 3), "mvalues_per_s": round(count / seconds[0] / 1e6, 1),
               "f32_mvalues_per_s": round(count / seconds[1] / 1e6, 1),
               "stored_bits_per_value": round(blocks.nbytes * 8 / count, 4)}
        if with_numpy:
            row["numpy_f32_mvalues_per_s"] = round(count / seconds[2] / 1e6, 1)
            row["torch_f32_over_numpy_speed"] = round(seconds[2] / seconds[1], 2)
        out[qtype.name] = row
    return out


def block_forward(G, wan_model, factory, dim: int, ffn: int, tokens: int, repeats: int) -> dict:
    """One DiT block, bf16 Linears against Q4_K GGUFLinears, on the CPU."""
    heads = dim // 128
    config = wan_model.WanConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=1, text_dim=dim)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = wan_model.WanAttentionBlock(config)
        for p in ref.parameters():
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02)
    ref = ref.to(torch.bfloat16).eval()
    quant = wan_model.WanAttentionBlock(config).to(torch.bfloat16).eval()
    quant.load_state_dict(ref.state_dict())
    linears = [(path, m) for path, m in quant.named_modules() if type(m) is torch.nn.Linear]
    for path, m in linears:
        w = m.weight.detach().float().numpy()
        layer = G.GGUFLinear(m.in_features, m.out_features, m.bias is not None, G.QT.Q4_K, torch.bfloat16)
        layer.weight.data = torch.from_numpy(factory.quantize_q4_k(w).reshape(-1).copy())
        layer.bias.data = m.bias.detach().clone()
        parent, _, attr = path.rpartition(".")
        setattr(quant.get_submodule(parent) if parent else quant, attr, layer)

    h = max(d for d in range(1, int(tokens ** 0.5) + 1) if tokens % d == 0)  # 1560 -> 30 x 52
    grid = (1, h, tokens // h)
    n = tokens
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, n, dim, generator=gen)
    e0 = torch.randn(1, 1, 6, dim, generator=gen) * 0.1
    context = torch.randn(1, 512, dim, generator=gen).to(torch.bfloat16)
    freqs = wan_model.rope_freqs(grid, dim // heads)
    kwargs = dict(e0=e0, freqs=freqs, context=context)

    with torch.inference_mode():
        expected = ref(x, **kwargs)
        got = quant(x, **kwargs)
        gguf_layers = [m for m in quant.modules() if isinstance(m, G.GGUFLinear)]
        bf16_s, q4_s, dequant_s = timed(lambda: ref(x, **kwargs), lambda: quant(x, **kwargs),
                                        lambda: [m.dequantized_weight(torch.bfloat16) for m in gguf_layers],
                                        repeats=repeats)

    def block_bytes(module):
        return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))

    return {
        "dim": dim, "ffn_dim": ffn, "tokens": n, "grid": list(grid),
        "bf16_ms": round(bf16_s * 1e3, 1), "q4_k_ms": round(q4_s * 1e3, 1),
        "q4_k_over_bf16": round(q4_s / bf16_s, 3),
        "dequant_ms": round(dequant_s * 1e3, 1), "dequant_share_of_q4_k": round(dequant_s / q4_s, 3),
        "block_bytes_bf16": block_bytes(ref), "block_bytes_q4_k": block_bytes(quant),
        "bytes_q4_k_over_bf16": round(block_bytes(quant) / block_bytes(ref), 3),
        "output_rel_diff": round(((got - expected).norm() / expected.norm()).item(), 4),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=1 << 22, help="values decoded per type")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--tokens", type=int, default=1560)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per dequantisation")
    parser.add_argument("--block-repeats", type=int, default=3, help="timed calls per block forward")
    parser.add_argument("--no-numpy", action="store_true", help="skip gguf's numpy decoder")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for the test")
    args = parser.parse_args(argv)
    if args.small:
        args.numel, args.dim, args.ffn, args.tokens, args.repeats, args.block_repeats = 1 << 14, 256, 512, 64, 1, 1
    G, wan_model, factory = _import_pack()
    result = {
        "torch": torch.__version__, "gguf": G.gguf_version(), "threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other processes on the host skew CPU figures
        "numel": args.numel,
        "dequant_cpu": dequant_rates(G, factory, args.numel, args.repeats, "cpu", not args.no_numpy),
        "dequant_cuda": (dequant_rates(G, factory, args.numel, args.repeats, "cuda", False)
                         if torch.cuda.is_available() else {"skipped": "no CUDA device"}),
        "block_cpu": block_forward(G, wan_model, factory, args.dim, args.ffn, args.tokens, args.block_repeats),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
