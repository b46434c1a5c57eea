"""Load the official Wan 2.2 code (PyPI ``wan22``) as an independent reference.

``wan/__init__.py`` of that package pulls heavy extras, so its modules are imported
directly after registering empty ``wan`` / ``wan.modules`` packages, and its
``flash_attention`` (CUDA only) is replaced by an SDPA stand-in that honours k_lens.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types

import pytest
import torch
import torch.nn.functional as F


def _sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None,
                          q_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                          dtype=torch.bfloat16, version=None):
    """CPU stand-in for wan's flash_attention: q, k, v are [B, L, N, D]."""
    lk = k.size(1)
    mask = None
    if k_lens is not None:
        keep = torch.arange(lk, device=q.device)[None, :] < k_lens.to(q.device)[:, None]
        mask = keep[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).contiguous()


def _wan22_root() -> str:
    # Located through the distribution's metadata, not sys.path: the repository's own
    # ``wan/`` folder would shadow it when the working directory is on the path.
    try:
        dist = importlib.metadata.distribution("wan22")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("wan22 (official Wan 2.2 code) is not installed")
    return str(dist.locate_file("wan"))


def wan22_module(name: str) -> types.ModuleType:
    """Return ``wan.modules.<name>`` from the wan22 distribution (skip if not installed)."""
    root = _wan22_root()
    if "wan" not in sys.modules or not hasattr(sys.modules["wan"], "_wanfit_stub"):
        pkg = types.ModuleType("wan")
        pkg.__path__ = [root]
        pkg._wanfit_stub = True
        sys.modules["wan"] = pkg
        sub = types.ModuleType("wan.modules")
        sub.__path__ = [root + "/modules"]
        sys.modules["wan.modules"] = sub
        # t5.py imports the HF tokenizer wrapper (ftfy, regex); the encoder needs neither.
        tokenizers = types.ModuleType("wan.modules.tokenizers")
        tokenizers.HuggingfaceTokenizer = None
        sys.modules["wan.modules.tokenizers"] = tokenizers
        attention = importlib.import_module("wan.modules.attention")
        attention.flash_attention = _sdpa_flash_attention
    # t5.py evaluates torch.cuda.current_device() in a default argument at import time.
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        module = importlib.import_module(f"wan.modules.{name}")
    finally:
        torch.cuda.current_device = current_device
    if hasattr(module, "flash_attention"):
        module.flash_attention = _sdpa_flash_attention
    return module


def check(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 1e-5) -> float:
    """Assert max |out - ref| <= tol x the reference's largest magnitude (at least 1); print
    and return the error, so each parity test states what it measured."""
    err = (out - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    print(f"{what}: max abs err {err:.3e} (scale {scale:.2f})")
    assert err <= tol * scale, f"{what}: max abs err {err:.3e}"
    return err
