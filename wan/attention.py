"""Scaled dot-product attention over [B, L, heads, head_dim] tensors, with optional fast kernels.

PyTorch's SDPA always works. SageAttention and FlashAttention are used only when they are
installed; they are imported lazily, on first use, and never required.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A replacement for the dense self-attention call: (q, k, v) [B, L, N, D] -> [B, L, N, D].

The one seam where techniques change how the video tokens attend to each other (sequence
parallel ranks exchange heads and tokens around it; sparse attention masks blocks of it).
It travels in ``WanState.self_attention``; cross-attention to text and CLIP never uses it."""

BACKENDS = ("sageattention", "flash_attn", "sdpa")  # "auto" prefers them in this order
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _importable(module: str) -> bool:
    # A real import: a package that is present but broken (wrong CUDA build) must not count.
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def available_backends() -> list[str]:
    """Backends usable in this process, best first; "sdpa" is always last and always there."""
    return [b for b in BACKENDS if b == "sdpa" or _importable(b)]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _half(x: torch.Tensor) -> torch.Tensor:
    # The fused kernels take fp16/bf16 only; the official Wan code casts to bf16 likewise.
    return x if x.dtype in _HALF else x.to(torch.bfloat16)


def _sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn
    return sageattn(_half(q), _half(k), _half(v), tensor_layout="NHD", is_causal=False).to(q.dtype)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func
    return flash_attn_func(_half(q), _half(k), _half(v)).to(q.dtype)


_KERNELS = {"sageattention": _sage, "flash_attn": _flash, "sdpa": _sdpa}


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend that ``attention`` runs for ``backend`` on tensors like ``q``.

    "auto" picks the best installed kernel for CUDA fp16/bf16 inputs and SDPA otherwise
    (CPU, float32). An unknown or uninstalled backend raises ValueError naming it.
    """
    if backend == "sdpa":  # always there (and no import probe inside a compiled block)
        return backend
    if backend == "auto":
        if q.is_cuda and q.dtype in _HALF:
            return available_backends()[0]
        return "sdpa"
    if backend not in _KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend not in available_backends():
        raise ValueError(f"attention backend {backend!r} is not installed; available: "
                         f"{', '.join(available_backends())}")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Softmax attention, no mask: q [B, Lq, N, D], k and v [B, Lk, N, D] -> [B, Lq, N, D]."""
    return _KERNELS[resolve_backend(backend, q)](q, k, v)
