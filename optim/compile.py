"""Compiled blocks: one ``torch.compile`` of the DiT block's forward, shared by every block.

Regional compilation: the block's ``forward`` function (not the module, not the model) is
compiled once per block class and settings, and each block's ``forward`` is bound to that one
compiled function. Dynamo treats a module's parameters as inputs, so every block of one model,
the other A14B expert and the next job's model all run the same compiled code: one compile
per variant of the inputs, never per block. The variants are what the inputs make: batch 1
(one CFG branch, or a step cache computing one row) or batch 2 (cond and uncond batched), and
each attention op (dense, or a sparse op of ``optim/sparse.py``), and each kind of block of a
GGUF file that mixes quant types (:func:`block_signature`); a new token count compiles once
more with that dimension dynamic. LoRA strengths live in buffers and block swap's
``.data`` swaps keep shapes, so neither recompiles; hooks run outside the compiled function
(its ``_call_impl`` is left eager), so adding or removing them does not either.

Where it hooks: :func:`attach` binds the compiled forward on ``model.blocks``; the block loops
(``WanModel.run_blocks``, ``BlockSwapper``) call the blocks as before. :class:`CompiledRun`
wraps the denoiser's ``run_blocks`` to time the calls that compiled (warm-up, for the
telemetry) and to fall back to eager blocks, with one warning, when compilation fails (no C
compiler, an unsupported op): the call runs again from its input.
"""
from __future__ import annotations

import logging
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..wan.attention import resolve_backend
from . import fp8
from .gguf import GGUFLinear
from ..wan.denoise import DiTCall, RunBlocks
from ..wan.model import WanState

log = logging.getLogger("WanFit")
BACKENDS = ("inductor", "aot_eager", "eager")  # inductor: fused kernels; the others check graphs only
MODES = ("default", "max-autotune-no-cudagraphs")
_COMPILED: dict[tuple, Callable] = {}
_FAILED: dict[tuple, str] = {}
_LOCK = threading.Lock()
_ATTR = "_wanfit_compiled"


@dataclass(frozen=True)
class CompileSettings:
    """How the blocks compile: the torch.compile backend and mode."""

    backend: str = "inductor"
    mode: str = "default"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"compile backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.mode not in MODES:
            raise ValueError(f"compile mode {self.mode!r}: choose one of {', '.join(MODES)}")

    def describe(self) -> str:
        mode = "" if self.mode == "default" else f", {self.mode}"
        return f"compiled blocks ({self.backend}{mode})"


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (its own counter)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def block_signature(block: nn.Module) -> tuple:
    """What a block's code branches on that Dynamo does not guard: each GGUF layer's quant type
    and size. Files such as Q4_K_M mix types from block to block, and Dynamo (torch 2.13)
    ran a block whose layer was Q8_0 and the next block's Q4_0 layer through one graph (NaN)."""
    return tuple((name, int(m.qtype), m.nbytes) for name, m in block.named_modules() if isinstance(m, GGUFLinear))


def compiled_forward(cls: type, settings: CompileSettings, signature: tuple = ()) -> Callable:
    """The one compiled ``cls.forward`` for ``settings`` and block ``signature`` in this process.

    Dynamo keeps its graphs on the function's code object and picks one by its guards, so a
    second signature gets a copy of the code: a cache of its own, which no guard can confuse."""
    key = (cls, settings, signature)
    with _LOCK:
        if key not in _COMPILED:
            forward = cls.forward
            if signature:
                forward = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                                             forward.__defaults__, forward.__closure__)
            kw = {} if settings.mode == "default" else {"mode": settings.mode}
            _COMPILED[key] = torch.compile(forward, backend=settings.backend, **kw)
        return _COMPILED[key]


def failed(settings: CompileSettings) -> str | None:
    """Why compiling with ``settings`` failed in this process, or None."""
    return next((why for (_, s), why in _FAILED.items() if s == settings), None)


def attach(model: nn.Module, settings: CompileSettings) -> bool:
    """Bind the compiled forward on every block of ``model`` (again with other settings);
    False when these settings already failed here (the blocks stay eager)."""
    if failed(settings):
        detach(model)
        return False
    for block in model.blocks:
        if getattr(block, _ATTR, None) == settings:
            continue
        block.forward = types.MethodType(compiled_forward(type(block), settings, block_signature(block)), block)
        setattr(block, _ATTR, settings)
    return True


def detach(model: nn.Module) -> None:
    """Eager blocks again."""
    for block in model.blocks:
        if getattr(block, _ATTR, None) is not None:
            del block.forward
            delattr(block, _ATTR)


def attached(model: nn.Module) -> CompileSettings | None:
    return getattr(model.blocks[0], _ATTR, None) if len(model.blocks) else None


def _compile_error(err: BaseException) -> bool:
    # Dynamo wraps backend failures (Inductor's C++ build, a missing compiler) in its own types.
    return isinstance(err, torch._dynamo.exc.TorchDynamoException) or type(err).__module__.startswith(
        ("torch._inductor", "torch._dynamo"))


class CompiledRun:
    """One job's compiled blocks: times the calls that compiled and falls back to eager."""

    def __init__(self, model: nn.Module, settings: CompileSettings):
        self.model, self.settings = model, settings
        self.active = attach(model, settings)
        self.warmup_s = 0.0
        self.graphs = 0
        self.calls = 0
        self.fallback = failed(settings)
        self._settled: set[torch.device] = set()

    def wrap(self, run_blocks: RunBlocks) -> RunBlocks:
        def run(state: WanState, call: DiTCall) -> WanState:
            if not self.active:
                return run_blocks(state, call)
            if state.x.device not in self._settled:
                fp8.settle_matmul(self.model, state.x.device)
                self._settled.add(state.x.device)
            x, attend, backend = state.x, state.self_attention, state.backend
            # "auto" is resolved here: inside a compiled block its import probe would break the graph
            state.backend = resolve_backend(backend, state.context)
            before, start = graphs_compiled(), time.perf_counter()
            try:
                state = run_blocks(state, call)
            except Exception as err:  # noqa: BLE001 - only compilation failures are handled
                if not _compile_error(err):
                    raise
                self._fall_back(err)
                state.x, state.self_attention = x, attend
                return run_blocks(state, call)
            finally:
                state.backend = backend
            self.calls += 1
            new = graphs_compiled() - before
            if new:
                if state.x.is_cuda:
                    torch.cuda.synchronize(state.x.device)
                self.warmup_s += time.perf_counter() - start
                self.graphs += new
            return state
        return run

    def _fall_back(self, err: BaseException) -> None:
        root = err
        while True:  # Dynamo wraps the backend's own error
            inner = getattr(root, "inner_exception", None) or root.__cause__
            if inner is None:
                break
            root = inner
        text = str(root).strip().splitlines()
        why = f"{type(root).__name__}: {text[0] if text else ''}"[:300]
        with _LOCK:
            first = not _FAILED
            _FAILED[(type(self.model.blocks[0]), self.settings)] = why
        detach(self.model)
        self.active, self.fallback = False, why
        message = ("WanFit compiled blocks: compilation failed (%s); the blocks run eagerly (uncompiled) from now "
                   "on. Install a C compiler for Inductor, or choose backend eager on the WanFit Compile node")
        if first:
            log.warning(message, why)
        else:
            log.info(message, why)

    def report(self) -> dict:
        return {"settings": self.settings.describe(), "active": self.active, "warmup_s": self.warmup_s,
                "graphs_compiled": self.graphs, "calls": self.calls, "fallback": self.fallback}
