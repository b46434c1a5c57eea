"""Memory planner: which DiT blocks stay on the GPU, which swap, where the encoders run.

Everything is computed before a byte of weights is read:

- weights: exact bytes per block from a meta-device ``WanModel`` with the fp8 layer rule
  (``fp8.should_quantize``) applied, packed as ``BlockSwapper`` packs them (each tensor
  256-byte aligned), plus the weights outside the blocks (embeddings, projections, head);
- activations: the model's own forward (``WanModel.forward``, two blocks, the loader's
  layer types) run on fake tensors under ``memtrace.LiveBytes``, which counts every
  storage the code creates and frees, in program order: nothing about the forward is
  restated here, so a change to wan/model.py (or a hook in ``run_blocks``) moves the plan by
  itself. The host-side inputs (timestep sinusoids, RoPE, TI2V's runs) are passed in,
  since fake tensors carry no values. What the trace cannot see is a kernel's scratch:
  one named term per kernel (``_kernel_terms``). Which attention kernel runs matters:
  flash / memory-efficient kernels are O(L); SDPA's math fallback materialises L x L scores;
- the plan: the smallest number of swapped blocks such that non-block weights + resident
  blocks + swap slots + activations (with a margin for allocator fragmentation) fit the
  budget. CFG runs cond and uncond as one batch of 2 unless running them one after the
  other lets more blocks stay resident: at tens of thousands of tokens a block's compute
  hides its copy, so what a swapped block really costs is pinned host RAM and bus traffic,
  and sequential CFG costs nothing else.

Encoders (UMT5, CLIP, VAE) run in their own stages with the DiT off the GPU; each goes to
the GPU when its weights and working memory fit the budget, else it runs on the CPU (the
nodes do the same at run time against the free VRAM: ``nodes/stages.py``). The
A14B experts take turns: the idle one stays on disk (mmap), so host RAM holds one
expert's swapped blocks at a time.

Bytes are reported in GiB (2**30), the unit ComfyUI and nvidia-smi print as "GB"/"MiB".
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..wan.clip_vision import VIT_H_14, ClipVisionEncoder
from ..wan.model import PRESETS, HostInputs, WanConfig, WanModel
from ..wan.t5 import TEXT_LEN, UMT5_XXL, UMT5Encoder
from ..wan.vae import build_vae
from ..wan.vae_common import WAN21_VAE, WAN22_VAE, VAEConfig
from . import fp8, memtrace, tiling
from .loading import DTYPES, WEIGHT_FORMATS, t5_block_linear
from .memtrace import Live
from .offload import BlockLayout, state_tensors

GIB = 2**30
DEFAULT_RESERVE = int(1.5 * GIB)  # CUDA context, cuBLAS workspaces, a desktop, allocator slack
ACTIVATION_MARGIN = 0.10  # of the activation peak: caching-allocator fragmentation
ATTENTION = ("sdpa", "flash_attn", "sageattention", "math")
# The VAE stage's working memory per pixel is optim/tiling's (measured by bench/vae_memory.py).


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


# ----------------------------------------------------------------------------- sizes

def vae_config(config: WanConfig) -> VAEConfig:
    """The VAE a DiT works with: Wan 2.2's (x16) for TI2V-5B (48 latent channels), else 2.1's."""
    return WAN22_VAE if config.out_dim == WAN22_VAE.z_dim else WAN21_VAE


def latent_shape(config: WanConfig, frames: int, width: int, height: int) -> tuple[int, int, int]:
    """(F, H, W) of the latent for a video: 1 + (frames - 1) // 4 frames, pixels / 8 (2.1 VAE)
    or / 16 (2.2 VAE)."""
    s = vae_config(config).spatial_compression
    unit = s * config.patch_size[1]
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"Wan videos have 4n+1 frames (1, 5, ..., 81); got {frames}")
    if width % unit or height % unit:
        raise ValueError(f"width and height must be multiples of {unit} for this model; got {width}x{height}")
    return 1 + (frames - 1) // 4, height // s, width // s


def token_count(config: WanConfig, frames: int, width: int, height: int) -> int:
    """Tokens the DiT sees: latent frames x (H / 2) x (W / 2) after its 1x2x2 patches."""
    f, h, w = latent_shape(config, frames, width, height)
    pt, ph, pw = config.patch_size
    return (f // pt) * (h // ph) * (w // pw)


# ----------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class DitWeights:
    """Bytes of a DiT's weights in one storage format."""

    block: int  # one block packed as BlockSwapper packs it (device slot / pinned size)
    block_params: int  # one block's parameters + buffers, unpadded
    num_blocks: int
    other: int  # everything outside the blocks: embeddings, projections, head
    largest_linear: int  # bytes of the largest quantised Linear weight in the compute dtype

    @property
    def total(self) -> int:
        return self.block * self.num_blocks + self.other


def _storage(weights: str, compute_dtype: torch.dtype | None) -> tuple[torch.dtype | None, torch.dtype]:
    """(fp8 dtype or None, compute dtype) for a weight format name."""
    if weights not in WEIGHT_FORMATS or weights == "auto":
        raise ValueError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_FORMATS[1:])}")
    if weights in DTYPES:
        if compute_dtype not in (None, DTYPES[weights]):
            raise ValueError(f"{weights} weights compute in {DTYPES[weights]}, not {compute_dtype}")
        return None, DTYPES[weights]
    return fp8.fp8_dtype(weights.removesuffix("_scaled")), compute_dtype or torch.bfloat16


def _meta_bytes(module: nn.Module) -> int:
    return sum(t.nbytes for t in state_tensors(module))


def build_dit(config: WanConfig, weights: str, dtype: torch.dtype) -> WanModel:
    """``config`` as ``loading.load_dit`` builds it for ``weights``, on the current default
    device (meta, or fake tensors): the Linears passing ``fp8.should_quantize`` become
    ``FP8Linear`` (fp8 weight, float32 scale, bias in ``dtype``) for fp8 formats; every other
    tensor is in ``dtype``."""
    fp8_dtype, _ = _storage(weights, dtype)
    model = WanModel(config).to(dtype)
    if fp8_dtype is not None:
        for path, layer in list(model.named_modules()):
            if type(layer) is nn.Linear and fp8.should_quantize(f"{path}.weight", layer.weight.shape):
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent), name, fp8.FP8Linear(
                    layer.in_features, layer.out_features, layer.bias is not None, fp8_dtype, dtype))
    return model


@functools.lru_cache(maxsize=64)
def dit_weights(config: WanConfig, weights: str = "bf16", compute_dtype: torch.dtype | None = None) -> DitWeights:
    """Exact weight bytes of ``config`` stored as ``weights`` (a ``loading.WEIGHT_FORMATS`` name).

    Built on the meta device, as ``loading.load_dit`` builds it (``build_dit``); one block
    stands for all of them.
    """
    _, dtype = _storage(weights, compute_dtype)
    with torch.device("meta"):
        model = build_dit(dataclasses.replace(config, num_layers=1), weights, dtype)
    largest = max((m.weight.numel() * dtype.itemsize for m in model.modules() if isinstance(m, fp8.FP8Linear)),
                  default=0)
    block = model.blocks[0]
    return DitWeights(block=BlockLayout(state_tensors(block)).nbytes, block_params=_meta_bytes(block),
                      num_blocks=config.num_layers, other=_meta_bytes(model) - _meta_bytes(block),
                      largest_linear=largest)


@dataclass(frozen=True)
class AsLoaded:
    """A DiT that is not simply ``config`` in a weight format: ``build()`` returns its meta model
    as the loader will fill it (GGUF layers holding quantised bytes, unmerged LoRA factors and
    hooks); ``key`` identifies it for the caches and ``label`` names it in the plan."""

    key: Hashable
    label: str
    num_blocks: int  # the model's; ``build`` may make fewer when its blocks are all alike
    build: Callable[[], WanModel] = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class BlocksHook:
    """Code that runs around the block stack (a step cache): ``wrap(run_blocks, batch)`` returns
    the ``state -> state`` a sampling call runs for a batch of ``batch`` rows, traced as is;
    ``held(batch, tokens)`` is what it keeps on the device for the calls the trace does not
    make (the other CFG branch run apart, other context windows). ``key`` for the caches."""

    key: Hashable
    label: str
    wrap: Callable[[Callable[[WanState], WanState], int], Callable[[WanState], WanState]] = field(
        compare=False, hash=False, repr=False)
    held: Callable[[int, int], int] = field(compare=False, hash=False, repr=False, default=lambda batch, tokens: 0)


@functools.lru_cache(maxsize=32)
def loaded_weights(loaded: AsLoaded, compute_dtype: torch.dtype) -> DitWeights:
    """Exact weight bytes of a model ``loaded.build()`` makes: each block packed as
    ``BlockSwapper`` packs it (the largest, when blocks differ: a slot must hold any)."""
    model = loaded.build()
    blocks = list(model.blocks)
    packed = [BlockLayout(state_tensors(b)).nbytes for b in blocks]
    params = [_meta_bytes(b) for b in blocks]
    largest = max((m.weight.numel() * compute_dtype.itemsize for m in model.modules() if isinstance(m, fp8.FP8Linear)),
                  default=0)
    return DitWeights(block=max(packed), block_params=max(params), num_blocks=loaded.num_blocks,
                      other=_meta_bytes(model) - sum(params), largest_linear=largest)


@functools.lru_cache(maxsize=16)
def encoder_bytes(kind: str, storage: str = "bf16") -> int:
    """Weight bytes of UMT5-XXL ("t5"), CLIP ViT-H ("clip") or a Wan VAE ("2.1", "2.2") stored
    as ``storage`` ("bf16", "fp16", "fp32" or, for T5, "fp8_e4m3fn": block Linears in fp8
    with a float32 scale, as ``loading.load_text_encoder`` keeps them)."""
    dtype = DTYPES.get(storage, torch.bfloat16)
    with torch.device("meta"):
        model = {"t5": lambda: UMT5Encoder(UMT5_XXL), "clip": lambda: ClipVisionEncoder(VIT_H_14),
                 "2.1": lambda: build_vae(WAN21_VAE), "2.2": lambda: build_vae(WAN22_VAE)}[kind]()
    total = 0
    for name, t in model.named_parameters():
        quantized = storage.startswith("fp8") and kind == "t5" and t5_block_linear(name, tuple(t.shape))
        total += t.numel() + 4 if quantized else t.numel() * dtype.itemsize
    return total


# ----------------------------------------------------------------------------- activations

def attention_kernel(attention: str, device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel behind an attention backend, as far as memory goes: "flash" (PyTorch's flash
    or memory-efficient SDPA kernels, flash_attn: output + logsumexp, O(L)), "sage"
    (SageAttention: plus int8 / fp8 copies of q, k, v) or "math" (L x L scores in float32).

    On CUDA, SDPA runs flash (fp16 / bf16, head_dim <= 256) or memory-efficient attention
    (head_dim a multiple of 8 for fp16 / bf16, of 4 for float32); on CPU its fused kernel;
    anything else falls back to math.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r}: expected one of {', '.join(ATTENTION)}")
    if attention == "sdpa":
        aligned = head_dim % (8 if dtype in (torch.float16, torch.bfloat16) else 4) == 0
        return "flash" if device_type == "cpu" or (device_type == "cuda" and aligned) else "math"
    return {"flash_attn": "flash", "sageattention": "sage", "math": "math"}[attention]


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one DiT forward at ``tokens`` tokens and batch ``batch``."""

    tokens: int
    batch: int
    kernel: str
    held: int  # kept across the block stack: time embeddings, RoPE, text (and image) context
    block: int  # one block's peak above its input and ``held`` (blocks after the first)
    peak: int  # the whole forward's peak: embed, the blocks, head and unpatchify
    phase: str  # where ``peak`` happens
    residual: int  # the float32 residual stream [B, L, dim] between blocks
    terms: tuple[tuple[str, int], ...] = ()  # kernel terms included in the peak phase (name, bytes)
    at_peak: tuple[Live, ...] = ()  # the tensors live at the peak, largest first
    phases: tuple[memtrace.Phase, ...] = ()  # the trace, phase by phase (PHASES)


# Bytes a kernel holds beyond its outputs, per attention kernel, on CUDA. PyTorch's flash and
# memory-efficient SDPA return out and logsumexp (both op outputs: the CPU flash kernel the
# trace runs returns the same two) and use no workspace for head_dim 128 without split-KV;
# flash_attn likewise. cuBLAS / cuBLASLt workspaces are allocated once per process and live
# in the reserve. SageAttention quantises q and k to int8 (k smoothed by its mean first, a
# compute-dtype copy) and v to fp8 for the call: an estimate from its published design.
def _sage_term(func, args, kwargs, outputs) -> int:
    if "scaled_dot_product" not in str(func):
        return 0
    q, k = args[0], args[1]
    nq, nk = q.numel(), k.numel()
    return nq + nk + nk + nk * q.dtype.itemsize  # int8 q, int8 k, fp8 v, smoothed k


# On a CPU the scratch of these kernels is measured where they run (memtrace.measured_workspace).
_CPU_SCRATCH_OPS = ("aten.addmm.default", "aten.mm.default", "aten.bmm.default", "aten.baddbmm.default",
                    "aten.convolution.default", "aten._scaled_mm.default",
                    "aten._scaled_dot_product_flash_attention_for_cpu.default")


@functools.cache
def _cpu_scratch() -> memtrace.KernelTerm:
    return memtrace.measured_workspace(_CPU_SCRATCH_OPS)


def _kernel_terms(kernel: str, device_type: str) -> tuple[memtrace.KernelTerm, ...]:
    if device_type == "cpu":
        return (_cpu_scratch(),)
    if kernel == "sage":
        return (memtrace.KernelTerm("SageAttention int8 / fp8 copies of q, k, v (estimate)", _sage_term),)
    return ()


def dit_inputs(config: WanConfig, grid: tuple[int, int, int], batch: int, dtype: torch.dtype,
               device: torch.device | str = "cpu", host_device: torch.device | str = "cpu") -> dict:
    """``WanModel.forward`` keyword arguments shaped as the sampler passes them for a token
    ``grid``: the latent in float32, conditioning and text context in the compute dtype (on
    ``device``), the host inputs (timestep sinusoids, RoPE, TI2V's runs) on ``host_device``.
    Values are left unset (``torch.empty``); a caller wanting a real forward fills them.
    TI2V-5B's first latent frame (timestep 0) makes two runs."""
    c = config
    f, h, w = grid
    pt, ph, pw = c.patch_size
    size = (f * pt, h * ph, w * pw)
    rows = 2 if c.model_type == "ti2v" else 1
    runs = (h * w, (f - 1) * h * w) if rows == 2 else None
    empty = functools.partial(torch.empty, device=device)
    return dict(
        x=empty(batch, c.out_dim, *size),
        t=None,
        context=empty(batch, c.text_len, c.text_dim, dtype=dtype),
        clip_fea=empty(batch, c.clip_pos_len or 257, c.clip_dim, dtype=dtype) if c.clip else None,
        y=empty(batch, c.in_dim - c.out_dim, *size, dtype=dtype) if c.in_dim != c.out_dim else None,
        host=HostInputs(torch.empty(batch * rows, c.freq_dim, device=host_device),
                        torch.empty(math.prod(grid), 1, c.head_dim // 2, 2, device=host_device), runs))


class _Kernel(torch.overrides.TorchFunctionMode):
    """Run SDPA as the planned device would: on meta tensors PyTorch has no kernel choice
    (it falls back to the math decomposition), so the choice is made here, by name."""

    def __init__(self, kernel: str):
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and self.kernel != "math":
            # the CPU flash kernel returns what CUDA flash / memory-efficient SDPA return:
            # out and a float32 logsumexp [B, N, L]
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kwargs)[0]
        return func(*args, **kwargs)


PHASES = ("embedding", "first block", "a block", "head")


def trace_forward(model: WanModel, inputs: dict, terms: tuple[memtrace.KernelTerm, ...] = (),
                  record: bool = False) -> dict[str, memtrace.Phase]:
    """Run ``model(**inputs)`` (two blocks are enough: every block after the first repeats the
    second) counting live activation bytes, with a phase per part of the forward: embedding,
    the first block (its input is the compute-dtype embedding), a later block and the head
    (with unpatchify). Works on real and on fake tensors alike."""
    if len(model.blocks) < 2:
        raise ValueError("trace_forward needs a model with at least two blocks")
    counter = memtrace.LiveBytes(terms, record)

    def phase(name: str):
        def begin(module, args) -> None:  # a pre-hook's return value would replace the args
            counter.mark(name)
        return begin

    hooks = [module.register_forward_pre_hook(phase(name))
             for module, name in ((model.blocks[0], PHASES[1]), (model.blocks[1], PHASES[2]), (model.head, PHASES[3]))]
    try:
        with counter:
            counter.mark(PHASES[0])
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {p.name: p for p in counter.finish() if p.name in PHASES}


def _traced_model(config: WanConfig, weights: str, dtype: torch.dtype, scaled_mm: bool) -> WanModel:
    """Two blocks of ``config`` as the loader builds them, on the meta device, SDPA attention;
    fp8 Linears take the ``torch._scaled_mm`` path when ``scaled_mm`` (a GPU with fp8 GEMMs),
    else they upcast their weight per call."""
    with torch.device("meta"):
        model = build_dit(dataclasses.replace(config, num_layers=2), weights, dtype).eval()
    return _for_tracing(model, scaled_mm)


def _traced_as_loaded(loaded: AsLoaded, scaled_mm: bool) -> WanModel:
    model = loaded.build().eval()
    model.blocks = nn.ModuleList(list(model.blocks)[:2])  # every later block repeats the second
    return _for_tracing(model, scaled_mm)


def _for_tracing(model: WanModel, scaled_mm: bool) -> WanModel:
    model.attention_backend = "sdpa"  # the kernel is chosen by _Kernel, as on the planned device
    for layer in model.modules():
        if isinstance(layer, fp8.FP8Linear):
            layer._use_mm[torch.device("meta")] = scaled_mm and layer._mm_shapes_ok
    return model


def dit_activations(config: WanConfig, grid: tuple[int, int, int], batch: int = 1,
                    compute_dtype: torch.dtype = torch.bfloat16, weights: str = "bf16",
                    attention: str = "sdpa", device_type: str = "cuda", fp8_matmul: bool = True,
                    loaded: AsLoaded | None = None, hook: BlocksHook | None = None) -> Activations:
    """Activation bytes of one ``WanModel.forward`` over a token ``grid`` (F, H, W after patching).

    The model's own forward runs on meta tensors (no memory, no compute) under
    ``memtrace.LiveBytes``; the attention kernel is picked as on ``device_type`` (flash-class
    SDPA, its math fallback, SageAttention as flash plus its term) and fp8 Linears take the
    ``torch._scaled_mm`` path when ``fp8_matmul`` on CUDA, else they upcast their weight per
    call. On CUDA the host inputs (timestep sinusoids, RoPE) arrive by a copy, counted; on a
    CPU they are already there. Inputs (latent, conditioning, text) and weights are not
    counted. ``device_type="cpu"`` adds the CPU kernels' measured scratch. ``loaded``: trace
    that model instead (its first two blocks), e.g. GGUF layers dequantising per call or
    unmerged LoRA matmuls; ``weights`` is then not read. ``hook``: the block stack runs
    through it (a step cache keeping the stack's input and storing the residual).
    """
    # A CPU's measured kernel scratch depends on its thread count, so that is part of the key.
    threads = torch.get_num_threads() if device_type == "cpu" else 0
    return _dit_activations(config, tuple(grid), batch, compute_dtype, weights if loaded is None else "",
                            attention, device_type, fp8_matmul, threads, loaded, hook)


@functools.lru_cache(maxsize=256)
def _dit_activations(config: WanConfig, grid: tuple[int, int, int], batch: int, compute_dtype: torch.dtype | None,
                     weights: str, attention: str, device_type: str, fp8_matmul: bool, threads: int,
                     loaded: AsLoaded | None, hook: BlocksHook | None) -> Activations:
    if not (config.qk_norm and config.cross_attn_norm):
        raise ValueError("the activation model covers the released Wan configs (qk_norm, cross_attn_norm)")
    if loaded is None:
        fp8_dtype, dtype = _storage(weights, compute_dtype)
        model = _traced_model(config, weights, dtype, fp8_dtype is not None and fp8_matmul and device_type == "cuda")
    else:
        dtype = compute_dtype or torch.bfloat16
        model = _traced_as_loaded(loaded, fp8_matmul and device_type == "cuda")
    kernel = attention_kernel(attention, device_type, dtype, config.head_dim)
    # On a GPU the host inputs arrive by a copy (counted); on a CPU they are already there.
    inputs = dit_inputs(config, tuple(grid), batch, dtype, "meta", "meta" if device_type == "cpu" else "cpu")
    if hook is not None:
        inputs["run_blocks"] = hook.wrap(model.run_blocks, batch)
    with torch.no_grad(), _Kernel(kernel):
        phases = trace_forward(model, inputs, _kernel_terms(kernel, device_type), record=True)
    peak = max(phases.values(), key=lambda p: p.peak)
    tokens = math.prod(grid)
    residual = 4 * batch * tokens * config.dim
    block = phases[PHASES[2]]
    return Activations(tokens, batch, kernel, held=block.start - residual, block=block.peak - block.start,
                       peak=peak.peak, phase=peak.name, residual=residual, terms=tuple(peak.terms.items()),
                       at_peak=tuple(sorted(peak.at_peak, key=lambda t: -t.nbytes)), phases=tuple(phases.values()))


dit_activations.cache_clear = _dit_activations.cache_clear  # tests that patch the model re-trace


# ----------------------------------------------------------------------------- the plan

class PlanError(ValueError):
    """The job cannot fit the budget; ``min_budget`` is the smallest budget that plans."""

    def __init__(self, message: str, min_budget: int):
        super().__init__(message)
        self.min_budget = min_budget


@dataclass(frozen=True)
class EncoderPlan:
    """Where one encoder runs, in its own stage (the DiT is off the GPU meanwhile)."""

    name: str  # "T5", "CLIP", "VAE"
    weight_bytes: int
    work_bytes: int  # working memory of the stage
    device: str  # "gpu" or "cpu"
    tiling: str | None = None  # the VAE's tiles when whole frames would not fit, in words

    @property
    def total(self) -> int:
        return self.weight_bytes + self.work_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """A memory plan for one job. Sizes in bytes; ``explain()`` puts it in words."""

    model: str
    config: WanConfig
    frames: int
    width: int
    height: int
    latent: tuple[int, int, int]
    tokens: int  # tokens of the whole video
    window_tokens: int  # tokens per DiT call (= tokens without a context window)
    context_frames: int | None
    weights: str
    compute_dtype: torch.dtype
    batch: int  # 2: cond + uncond batched; 1: one at a time, or no CFG
    passes: int  # DiT calls per step
    experts: int
    dit: DitWeights
    activations: Activations
    margin: int  # fragmentation headroom kept on top of the activations
    sampler_bytes: int  # latents, conditioning, model outputs, solver history
    resident: int
    swapped: int
    prefetch: int
    slots: int
    encoders: tuple[EncoderPlan, ...]
    budget: int
    reserve: int | None  # what auto_budget held back, when the budget came from it
    host_ram: int | None
    sampling_vram: int
    peak_vram: int
    peak_host: int
    warnings: tuple[str, ...] = ()
    windows: int = 1  # context windows per step: DiT calls per step are passes x windows
    hook: str | None = None  # what runs around the block stack (a step cache), counted in the trace

    @property
    def resident_bytes(self) -> int:
        return self.resident * self.dit.block

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.dit.block

    @property
    def pinned_bytes(self) -> int:
        return self.swapped * self.dit.block

    def explain(self) -> str:
        """The plan in a short paragraph."""
        d, a = self.dit, self.activations
        f, h, w = self.latent
        text = [f"{self.model}: {self.frames} frames at {self.width}×{self.height} -> latent {f}×{h}×{w} = "
                f"{self.tokens:,} tokens"]
        if self.window_tokens != self.tokens:
            text[-1] += (f", {self.window_tokens:,} per {self.context_frames}-frame context window"
                         f" ({self.windows} a step)")
        cfg = {(2, 1): "cond and uncond batched (2 ×)", (1, 2): "cond and uncond one after the other",
               (1, 1): "no CFG pass"}[(self.batch, self.passes)]
        text[-1] += f" ({cfg})."
        text.append(f"{self.weights} weights {_gib(d.total)}: {d.num_blocks} blocks of {d.block / GIB:.2f} GiB "
                    f"+ {_gib(d.other)} outside the blocks.")
        kernel = {"flash": "flash attention, O(L)", "sage": "SageAttention, O(L)",
                  "math": "SDPA math fallback with L×L scores"}[a.kernel]
        text.append(f"Activations peak {_gib(a.peak)} in {a.phase} ({kernel}), plus {_gib(self.margin)} headroom.")
        if self.hook:
            text.append(f"{self.hook} is counted in them and in what sampling holds between calls.")
        if not self.swapped:
            text.append(f"All {d.num_blocks} blocks stay resident, nothing swaps.")
        else:
            sync = " (synchronous: copies do not overlap compute)" if self.prefetch == 0 else ""
            text.append(f"{self.resident} blocks stay resident and {self.swapped} swap through {self.slots} "
                        f"slot{'s' if self.slots > 1 else ''} with prefetch {self.prefetch}{sync}: "
                        f"{_gib(self.pinned_bytes * self.passes * self.windows)} over the bus per step, "
                        f"{_gib(self.pinned_bytes)} pinned on the host.")
        text.append(f"Budget {_gib(self.budget)}: sampling peaks at {_gib(self.sampling_vram)}, "
                    f"{_gib(self.budget - self.sampling_vram)} to spare.")
        for e in self.encoders:
            if e.name == "VAE":
                where = "on the GPU once the DiT has left it" if e.device == "gpu" else "on the CPU"
                tiles = f" in {e.tiling} (whole frames would not fit)" if e.tiling else ""
                text.append(f"The VAE ({_gib(e.weight_bytes)}) decodes {where}{tiles}.")
            else:
                where = "on the GPU and leaves it" if e.device == "gpu" else "on the CPU"
                text.append(f"{e.name} ({_gib(e.weight_bytes)}) runs {where} before sampling.")
        if self.experts > 1:
            text.append(f"The {self.experts} experts take turns: one is loaded at a time, the idle one stays on disk.")
        text.append(f"Peak VRAM {_gib(self.peak_vram)}, peak host RAM {_gib(self.peak_host)}"
                    + (f" of {_gib(self.host_ram)} available." if self.host_ram else "."))
        return " ".join(text + list(self.warnings))

    def to_dict(self) -> dict:
        """JSON-ready summary (bytes as integers)."""
        a = self.activations
        return {
            "model": self.model, "frames": self.frames, "width": self.width, "height": self.height,
            "latent": list(self.latent), "tokens": self.tokens, "window_tokens": self.window_tokens,
            "weights": self.weights, "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "batch": self.batch, "passes": self.passes, "experts": self.experts,
            "block_bytes": self.dit.block, "blocks": self.dit.num_blocks, "other_bytes": self.dit.other,
            "resident": self.resident, "swapped": self.swapped, "prefetch": self.prefetch, "slots": self.slots,
            "activation_peak": a.peak, "activation_phase": a.phase, "attention_kernel": a.kernel,
            "margin": self.margin, "sampler_bytes": self.sampler_bytes,
            "encoders": [dataclasses.asdict(e) for e in self.encoders],
            "budget": self.budget, "reserve": self.reserve, "host_ram": self.host_ram,
            "sampling_vram": self.sampling_vram, "peak_vram": self.peak_vram, "peak_host": self.peak_host,
            "warnings": list(self.warnings), "windows": self.windows, "hook": self.hook,
        }


def auto_budget(reserve: int = DEFAULT_RESERVE, total: int | None = None,
                device: torch.device | str | None = None) -> int:
    """A VRAM budget: ``total`` (a card's size) or the device's free memory now, less ``reserve``."""
    if total is None:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: give the budget in bytes, or the card's total")
        total = torch.cuda.mem_get_info(device)[0]
    return max(0, total - reserve)


def _host_available() -> int:
    import psutil  # a ComfyUI requirement; only needed when host_ram is not given
    return psutil.virtual_memory().available


def _device_blocks(n: int, swapped: int, prefetch: int) -> int:
    """Blocks' worth of device memory: resident blocks + swap slots (BlockSwapper)."""
    return n - swapped + min(prefetch + 1, swapped)


def encoder_work(kind: str, width: int = 0, height: int = 0, vae_dtype: torch.dtype = torch.bfloat16,
                 encode: bool = False) -> int:
    """Working memory of one encoder stage: UMT5-XXL ("t5") on 2 prompts, CLIP ViT-H ("clip")
    on one image, or a Wan VAE ("2.1", "2.2") decoding (``encode``: encoding) whole width x
    height frames in ``vae_dtype`` (``tiling.work_bytes``)."""
    if kind == "t5":
        # attention scores and position bias in float32, the gated FFN in bf16 (an estimate;
        # small next to the weights)
        cfg = UMT5_XXL
        return 3 * 2 * cfg.num_heads * TEXT_LEN**2 * 4 + 4 * 2 * TEXT_LEN * cfg.d_ff * 2
    if kind == "clip":
        v, tokens = VIT_H_14, VIT_H_14.num_tokens
        return 3 * v.num_heads * tokens**2 * 4 + 4 * tokens * v.mlp_dim * 2
    vae = WAN21_VAE if kind == "2.1" else WAN22_VAE
    return tiling.work_bytes(vae, tiling.AUTO.whole(width, height), width, height, vae_dtype, encode)


def encoder_stage(name: str, weight_bytes: int, work_bytes: int, budget: int) -> EncoderPlan:
    """An encoder runs on the GPU (in a stage of its own, the DiT off it) when its weights and
    working memory fit the budget, else on the CPU."""
    return EncoderPlan(name, weight_bytes, work_bytes, "gpu" if weight_bytes + work_bytes <= budget else "cpu")


def _place_encoders(config: WanConfig, budget: int, t5_weights: str, vae_dtype: torch.dtype,
                    width: int, height: int, image: bool) -> tuple[EncoderPlan, ...]:
    """T5, CLIP (Wan 2.1 i2v) and the VAE (the larger of its encode and decode stages)."""
    plans = [encoder_stage("T5", encoder_bytes("t5", t5_weights), encoder_work("t5"), budget)]
    if config.clip:
        plans.append(encoder_stage("CLIP", encoder_bytes("clip", "fp16"), encoder_work("clip"), budget))
    vae = vae_config(config)
    storage = {torch.float32: "fp32", torch.float16: "fp16"}.get(vae_dtype, "bf16")
    weights = encoder_bytes(vae.version, storage)
    decisions = []  # per stage (decode; encode with an image): (work, tiles in words, on the GPU)
    for encode in {False, image}:
        chosen = tiling.choose_tiling(vae, width, height, vae_dtype, budget - weights, encode=encode)
        tiles = chosen or tiling.AUTO.whole(width, height)  # None: not even the smallest tiles fit, the CPU
        words = tiles.describe(vae, width, height) if tiles.grid(vae, width, height) != (1, 1) else None
        decisions.append((tiling.work_bytes(vae, tiles, width, height, vae_dtype, encode), words, chosen is not None))
    work, words, _ = max(decisions, key=lambda d: d[0])
    on_gpu = all(d[2] for d in decisions)
    plans.append(EncoderPlan("VAE", weights, work, "gpu" if on_gpu else "cpu", words))
    return tuple(plans)


def plan_memory(config: WanConfig | str, *, frames: int, width: int, height: int,
                budget: int | str = "auto", weights: str = "fp8_e4m3fn_scaled",
                compute_dtype: torch.dtype | None = None, cfg_batch: int | None = None, guidance: bool = True,
                attention: str = "sdpa", device_type: str = "cuda", fp8_matmul: bool = True,
                context_frames: int | None = None, experts: int | None = None, prefetch: int | None = None,
                reserve: int = DEFAULT_RESERVE, total: int | None = None, host_ram: int | None = None,
                t5_weights: str = "bf16", vae_dtype: torch.dtype = torch.bfloat16,
                margin: float = ACTIVATION_MARGIN, loaded: AsLoaded | None = None,
                hook: BlocksHook | None = None, windows: int = 1) -> MemoryPlan:
    """Plan a job's memory before anything is loaded.

    ``config``: a WanConfig or a ``PRESETS`` name. ``budget``: VRAM bytes the job may use, or
    "auto": ``auto_budget(reserve, total)``, the card's ``total`` (default: free CUDA memory
    now) less ``reserve``. ``cfg_batch``: 2 (cond and uncond batched), 1 (one after the other)
    or None (2 unless 1 keeps more blocks resident); ``guidance=False`` is a single pass
    (CFG 1, e.g. the 4-step LoRAs). ``t5_weights``: "bf16" or "fp8_e4m3fn". ``attention``: "sdpa", "flash_attn",
    "sageattention" or "math"; with ``device_type`` it tells which kernel runs.
    ``fp8_matmul``: the GPU runs fp8 GEMMs (capability >= 8.9; ``fp8.scaled_mm_supported``).
    ``context_frames``: the context window in video frames (4n+1), if any. ``experts``: 2 for
    the A14B pair (default: from the preset name). ``prefetch``: the swap's prefetch depth
    (default 1, or 0 when only that fits). ``host_ram``: bytes available (default: now).
    ``margin``: headroom kept on top of the activation peak, as a fraction of it.
    ``loaded``: the model as it will be loaded when that is more than a weight format (a GGUF
    file, unmerged LoRAs): its bytes and its traced forward replace those of ``weights``.
    ``hook``: code around the block stack (a step cache), traced with the forward, plus what
    it holds between calls. ``windows``: context windows per step (each a DiT call of
    ``context_frames``); their fused output is one more latent.

    Raises PlanError naming the smallest budget that works when even one swap slot and the
    activations do not fit.
    """
    model = config if isinstance(config, str) else next((k for k, v in PRESETS.items() if v == config), "Wan DiT")
    if isinstance(config, str):
        config = PRESETS[config]
    experts = experts or (2 if "A14B" in model else 1)
    if weights in WEIGHT_FORMATS[1:]:  # fp8 formats quantise on the host while loading
        fp8_dtype, dtype = _storage(weights, compute_dtype)
    else:  # a GGUF file: its bytes are kept as stored
        fp8_dtype, dtype = None, compute_dtype or torch.bfloat16
    if loaded is not None:
        weights = loaded.label
    reserve_used = None
    if budget == "auto":
        budget, reserve_used = auto_budget(reserve, total), reserve
    latent = latent_shape(config, frames, width, height)
    tokens = token_count(config, frames, width, height)
    window = min(context_frames or frames, frames)
    win_latent = latent_shape(config, window, width, height)
    grid = tuple(s // p for s, p in zip(win_latent, config.patch_size))
    d = dit_weights(config, weights, dtype) if loaded is None else loaded_weights(loaded, dtype)
    n = d.num_blocks

    # CFG modes in order of preference: (batch, DiT calls per step)
    modes = [(1, 1)] if not guidance else {2: [(2, 1)], 1: [(1, 2)], None: [(2, 1), (1, 2)]}[cfg_batch]
    latent_bytes = config.out_dim * math.prod(latent) * 4
    cond_bytes = (config.in_dim - config.out_dim) * math.prod(latent) * 4

    def need(batch: int) -> tuple[Activations, int, int]:
        act = dit_activations(config, grid, batch, dtype, weights, attention, device_type, fp8_matmul, loaded, hook)
        # latent + noise + two solver history entries + per-call input and output, conditioning;
        # with windows, the fused velocity; what a step cache holds for the calls not traced
        sampler = latent_bytes * (4 + 2 * batch + (windows > 1)) + cond_bytes * batch
        sampler += hook.held(batch, math.prod(grid)) if hook is not None else 0
        return act, math.ceil(act.peak * margin), sampler

    best = None
    for order, (batch, passes) in enumerate(modes):
        act, extra, sampler = need(batch)
        fixed = d.other + act.peak + extra + sampler
        depths = (prefetch,) if prefetch is not None else (1, 0)
        fits = [(p == 0 and prefetch is None, m, order, p)
                for p in depths for m in range(n + 1)
                if fixed + _device_blocks(n, m, p) * d.block <= budget]
        if fits:
            choice = min(fits)
            if best is None or choice < best[0]:
                best = (choice, batch, passes, act, extra, sampler)
    if best is None:
        lowest = min((d.other + a.peak + x + s + d.block, b) for b, _ in modes for a, x, s in [need(b)])
        raise PlanError(
            f"VRAM budget {_gib(budget)} is too small for {frames} frames at {width}×{height} with {weights} "
            f"weights: it needs at least {math.ceil(lowest[0] / GIB * 10) / 10:.1f} GiB (one "
            f"{d.block / GIB:.2f} GiB block slot, {_gib(d.other)} of weights outside the blocks and the "
            f"activations of {math.prod(grid) * lowest[1]:,} tokens). Use fewer frames, a lower resolution, "
            f"fp8 weights or a context window (e.g. 33 frames), or free VRAM.", lowest[0])
    (_, swapped, _, depth), batch, passes, act, extra, sampler = best
    slots = min(depth + 1, swapped)
    sampling_vram = d.other + act.peak + sampler + _device_blocks(n, swapped, depth) * d.block

    encoders = _place_encoders(config, budget, t5_weights, vae_dtype, width, height,
                               image=config.model_type != "t2v")
    gpu_stage = [e.total for e in encoders if e.device == "gpu"]
    peak_vram = max([sampling_vram, *gpu_stage])
    # Host: one expert's pinned swapped blocks (+ quantising one weight in float32 on the way);
    # an encoder on the CPU holds its weights there in its stage; decoded frames (float32).
    quantise = 2 * d.largest_linear // dtype.itemsize * 4 if fp8_dtype is not None else 0
    cpu_stage = [e.total for e in encoders if e.device == "cpu" and e.name != "VAE"]
    vae = encoders[-1]
    frames_bytes = frames * width * height * 3 * 4
    peak_host = max([swapped * d.block + quantise, *cpu_stage,
                     frames_bytes + (vae.total if vae.device == "cpu" else 0)])
    if host_ram is None:
        host_ram = _host_available()
    warnings = []
    if peak_host > host_ram:
        warnings.append(f"Warning: the plan needs {_gib(peak_host)} of host RAM and {_gib(host_ram)} is "
                        f"available: expect paging. Fewer frames or a lower resolution swap fewer blocks.")
    return MemoryPlan(
        model=model, config=config, frames=frames, width=width, height=height, latent=latent, tokens=tokens,
        window_tokens=math.prod(grid), context_frames=context_frames if window < frames else None,
        weights=weights, compute_dtype=dtype, batch=batch, passes=passes, experts=experts, dit=d,
        activations=act, margin=extra, sampler_bytes=sampler, resident=n - swapped, swapped=swapped,
        prefetch=depth if swapped else 0, slots=slots, encoders=encoders, budget=budget, reserve=reserve_used,
        host_ram=host_ram, sampling_vram=sampling_vram, peak_vram=peak_vram, peak_host=peak_host,
        warnings=tuple(warnings), windows=windows if window < frames else 1, hook=hook.label if hook else None)


# ----------------------------------------------------------------------------- picture

_COLOURS = {"outside blocks": (120, 144, 156), "resident blocks": (33, 150, 243), "swap slots": (255, 152, 0),
            "activations": (233, 30, 99), "headroom": (244, 143, 177), "sampler": (156, 39, 176),
            "free": (230, 230, 230), "reserve": (158, 158, 158), "T5": (76, 175, 80), "CLIP": (0, 150, 136),
            "VAE": (205, 220, 57)}


def plan_image(plan: MemoryPlan, width: int = 960) -> torch.Tensor:
    """The plan as a bar chart: a ComfyUI IMAGE [1, H, W, 3], float in 0..1.

    The top bar splits the budget (and the reserve, when known) during sampling into weights
    outside the blocks, resident blocks, swap slots, activations, headroom and free space;
    below it one bar per encoder stage on the GPU, on the same scale (CPU ones in words).
    """
    from PIL import Image, ImageDraw, ImageFont  # ComfyUI depends on Pillow; only this picture needs it

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    rows = [("sampling", [("outside blocks", plan.dit.other), ("resident blocks", plan.resident_bytes),
                          ("swap slots", plan.slot_bytes), ("activations", plan.activations.peak),
                          ("headroom", plan.margin), ("sampler", plan.sampler_bytes),
                          ("free", max(0, plan.budget - plan.sampling_vram - plan.margin)),
                          ("reserve", plan.reserve or 0)])]
    rows += [(f"{e.name} (GPU)" if e.device == "gpu" else f"{e.name}: CPU, {e.total / GIB:.1f} GiB of host RAM",
              [(e.name, e.total)] if e.device == "gpu" else []) for e in plan.encoders]
    total = max(sum(b for _, b in segs) for _, segs in rows) or 1
    left, right, bar_h, gap, top = 110, 20, 34, 16, 36
    legend_top = top + len(rows) * (bar_h + gap)
    height = legend_top + 22 * math.ceil(len(_COLOURS) / 4) + 8
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), f"{plan.model}: {plan.frames} frames {plan.width}x{plan.height}, {plan.weights}, budget "
              f"{plan.budget / GIB:.1f} GiB: {plan.resident} blocks resident, {plan.swapped} swapped",
              fill=(0, 0, 0), font=font)
    scale = (width - left - right) / total
    for i, (label, segs) in enumerate(rows):
        y = top + i * (bar_h + gap)
        draw.text((10, y + bar_h // 2 - 8), label, fill=(0, 0, 0), font=font)
        x = float(left)
        for name, nbytes in segs:
            w = nbytes * scale
            if w >= 1:
                draw.rectangle([x, y, x + w, y + bar_h], fill=_COLOURS[name], outline=(255, 255, 255))
                if w > 60:
                    draw.text((x + 4, y + bar_h // 2 - 8), f"{nbytes / GIB:.1f}G", fill=(0, 0, 0), font=font)
            x += w
        if i == 0 and plan.reserve:  # the budget's edge
            edge = left + plan.budget * scale
            draw.line([edge, y - 4, edge, y + bar_h + 4], fill=(0, 0, 0), width=2)
    for k, name in enumerate(_COLOURS):
        x, y = 10 + (k % 4) * (width // 4), legend_top + (k // 4) * 22
        draw.rectangle([x, y, x + 14, y + 14], fill=_COLOURS[name])
        draw.text((x + 20, y), name, fill=(0, 0, 0), font=font)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return (pixels.float() / 255)[None]
