"""FP8 weights for the Wan DiT: per-tensor scaled storage, scaled checkpoints, fp8 matmul.

Storage: a weight ``w`` is kept as ``w8 = w / scale`` in float8 (e4m3fn or e5m2) with one
float32 ``scale = amax(|w|) / fp8_max`` per tensor, so every tensor uses the whole fp8 range
whatever its magnitude. ``dequantize`` gives back ``w8.float() * scale`` rounded once to the
compute dtype, the same definition the Comfy-Org ``*_fp8_scaled`` files use.

Only the big 2-D Linear weights inside the transformer blocks are quantised (see
``should_quantize``); norms, biases, embeddings, modulation, projections and the head stay in
the compute dtype: they are small and the output is sensitive to them.

Checkpoint flavours read here (keys may carry the ``model.diffusion_model.`` prefix):

- Comfy-Org ``*_fp8_scaled``: fp8 weights, ``<layer>.scale_weight`` (float32 scalar), optional
  ``<layer>.scale_input``, and a marker key ``scaled_fp8`` (an empty fp8 tensor whose dtype
  names the format).
- kijai ``*_scaled_KJ`` (WanVideoWrapper): fp8 weights and ``<layer>.scale_weight`` but no
  ``scaled_fp8`` marker. An assumption, not checked against a real file: WanVideoWrapper's
  loader calls a file scaled when any key ends in ``.scale_weight``, marker or not, and
  squeezes the scale before use (so it may be shaped ``[1]``); any one-element scale of any
  float dtype is accepted here. Its other accepted suffix, ``.weight_scale``, is not read.
- plain ``*_fp8_e4m3fn`` / ``*_fp8_e5m2``: fp8 weights without scales (scale 1).

Matmul: on CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell) ``FP8Linear`` quantises
its input per tensor to e4m3fn and calls ``torch._scaled_mm``; elsewhere (older GPUs, ROCm,
CPU, float32 activations) it upcasts its weight to the activation dtype for the one call.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8_DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {dtype: torch.finfo(dtype).max for dtype in FP8_DTYPES.values()}  # 448, 57344
MARKER_KEY = "scaled_fp8"
# File prefixes stripped before key names are matched (ComfyUI checkpoints, diffusion_models/).
PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# The transformer-block Linear weights, in the original Wan key names. Anchored on a whole
# "blocks" component so that e.g. "vace_blocks.N" is not taken by accident.
_QUANTIZABLE = re.compile(
    r"(?:^|\.)blocks\.\d+\."
    r"(?:self_attn\.[qkvo]|cross_attn\.(?:[qkvo]|k_img|v_img)|ffn\.[02])\.weight$"
)
QUANTIZE_CHUNK_BYTES = 256 * 2**20  # scaled input rows converted to fp8 at a time
# Activation dtypes _scaled_mm may write; float32 activations take the upcast path.
_MM_OUT_DTYPES = (torch.bfloat16, torch.float16)

Fmt = str | torch.dtype


def fp8_dtype(fmt: Fmt) -> torch.dtype:
    """``"e4m3fn"`` / ``"e5m2"`` (or the torch dtype itself) -> the torch float8 dtype."""
    dtype = FP8_DTYPES.get(fmt.removeprefix("fp8_").removeprefix("float8_")) if isinstance(fmt, str) else fmt
    if dtype not in FP8_MAX:
        raise ValueError(f"unknown fp8 format {fmt!r}; expected one of {sorted(FP8_DTYPES)}")
    return dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_MAX


def quantize_weight(w: torch.Tensor, fmt: Fmt = "e4m3fn", chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise one tensor: ``(w8, scale)`` with ``w ~= w8.float() * scale``.

    ``scale = amax(|w|) / fp8_max`` (float32, 0-dim), so the largest element maps to the
    format's largest finite value; an all-zero tensor gets scale 1. ``w`` may be in any
    float dtype: it is divided in float32 ``chunk`` elements at a time, so the transient
    memory is one float32 chunk, not a float32 copy of the weight (same bits either way).
    """
    dtype, fmax = fp8_dtype(fmt), FP8_MAX[fp8_dtype(fmt)]
    w = w.detach()
    if w.numel():
        lo, hi = w.aminmax()  # max |w| without an abs() copy
        amax = torch.maximum(lo.float().abs(), hi.float().abs())
    else:
        amax = torch.zeros((), device=w.device)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    w8 = torch.empty(w.shape, dtype=dtype, device=w.device)
    src, dst = w.reshape(-1), w8.view(-1)
    buf = torch.empty(min(chunk, src.numel()), dtype=torch.float32, device=w.device)
    for i in range(0, src.numel(), chunk):
        part = buf[:min(chunk, src.numel() - i)].copy_(src[i:i + chunk])
        dst[i:i + chunk].copy_(part.div_(scale).clamp_(-fmax, fmax))
    return w8, scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``w8.float() * scale`` rounded once to ``dtype``, without a float32 copy of the weight.

    fp8 values are exact in bf16 / fp16 / fp32, and a Python scalar multiplies in float32
    (PyTorch's op-math type), so this equals the float32 formula bit for bit at a third of
    the transient memory. ``scale`` must hold one value (per-tensor scaling).
    """
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"expected a per-tensor scale, got shape {tuple(scale.shape)}")
        if torch.compiler.is_compiling():  # a graph input: one graph for every layer's scale
            return w8.to(dtype).mul_(scale.to(w8.device))
        scale = scale.item()
    w = w8.to(dtype)
    return w if scale == 1.0 else w.mul_(scale)


def should_quantize(key: str, tensor: torch.Tensor | Sequence[int]) -> bool:
    """Whether the state-dict entry ``key`` is stored in fp8.

    The rule: only 2-D weights of the Linear layers inside ``blocks.N`` -- ``self_attn.{q,k,v,o}``,
    ``cross_attn.{q,k,v,o,k_img,v_img}``, ``ffn.0``, ``ffn.2``. Everything else stays in the
    compute dtype: biases, norms (``norm_q``, ``norm3``, ...), ``modulation``, the patch / text /
    time embeddings, ``time_projection``, ``img_emb`` and ``head``. Any file prefix is allowed.
    ``tensor`` may be the tensor or just its shape (from a safetensors header).
    """
    ndim = tensor.ndim if isinstance(tensor, torch.Tensor) else len(tensor)
    return ndim == 2 and _QUANTIZABLE.search(key) is not None


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass(frozen=True)
class Fp8Format:
    """What kind of fp8 checkpoint a state dict is."""

    dtype: torch.dtype  # torch.float8_e4m3fn or torch.float8_e5m2
    scaled: bool  # per-layer scale_weight keys (or the scaled_fp8 marker) present
    flavour: str  # "comfy" (scaled_fp8 marker), "kijai" (scales, no marker) or "plain"
    input_scales: bool = False  # scale_input keys present

    @property
    def name(self) -> str:
        return next(k for k, v in FP8_DTYPES.items() if v == self.dtype)


def detect_fp8_format(keys: Iterable[str], dtypes: Iterable[torch.dtype]) -> Fp8Format | None:
    """Tell an fp8 checkpoint's format from its key names and the matching dtypes.

    ``keys`` and ``dtypes`` run in parallel (e.g. ``sd.keys()`` and ``(t.dtype for t in
    sd.values())``, or the same from a safetensors header). None when no weight is fp8.
    """
    marker: torch.dtype | None = None
    counts: dict[torch.dtype, int] = {}
    scaled = input_scales = False
    for key, dtype in zip(keys, dtypes, strict=True):
        name = strip_prefix(key)
        if name == MARKER_KEY:
            marker = dtype
        elif name.endswith(".scale_weight"):
            scaled = True
        elif name.endswith(".scale_input"):
            input_scales = True
        elif is_fp8(dtype):
            counts[dtype] = counts.get(dtype, 0) + 1
    if not counts:
        return None
    dtype = marker if marker is not None and is_fp8(marker) else max(counts, key=counts.get)
    flavour = "comfy" if marker is not None else "kijai" if scaled else "plain"
    return Fp8Format(dtype, scaled or marker is not None, flavour, input_scales)


@functools.lru_cache(maxsize=None)
def scaled_mm_supported(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs fp8 GEMMs on ``device`` (CUDA, capability >= 8.9).

    ROCm is left out: its fp8 GEMMs take the ``*fnuz`` dtypes, not the files' e4m3fn / e5m2.
    """
    if device.type != "cuda" or torch.version.hip or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_linear(x: torch.Tensor, w8: torch.Tensor, scale_weight: torch.Tensor,
                     bias: torch.Tensor | None = None, scale_input: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with fp8 operands: ``x`` is quantised per tensor to e4m3fn, out in ``x.dtype``.

    The input scale is ``amax(|x|) / 448`` over the whole call (cond and uncond batched share
    one), or the file's ``scale_input`` when given. Leading dims are flattened, so ``[B, L, C]``
    and ``[L, C]`` both work. Needs in/out features divisible by 16 (a ``_scaled_mm`` rule).
    Transient memory: ``x`` in fp8 plus one chunk of it scaled in its dtype, against the upcast
    path's one copy of the weight in the compute dtype.
    """
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, shape[-1])
    fmax = FP8_MAX[torch.float8_e4m3fn]
    if scale_input is None:
        inv = fmax / torch.linalg.vector_norm(x2, float("inf")).float().clamp_min(1e-12)
    else:
        inv = 1.0 / scale_input.float()
    # The multiplier is rounded to x's dtype for the multiply below; the scale handed to
    # _scaled_mm is taken from that rounded value so the two cancel exactly.
    inv = inv.clamp_max(torch.finfo(dtype).max).to(dtype)
    scale_a = inv.float().reciprocal()
    # Scaled in row chunks straight into the fp8 input (row-major, as _scaled_mm wants): the
    # same values as one (x * inv).to(fp8), without a whole scaled copy of x beside it.
    x8 = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    rows = max(1, QUANTIZE_CHUNK_BYTES // max(1, x2.shape[1] * x2.element_size()))
    for start in range(0, x2.shape[0], rows):
        x8[start:start + rows].copy_((x2[start:start + rows] * inv).clamp_(-fmax, fmax))
    # e5m2 x e5m2 has no kernel; activations always go as e4m3fn, the weight as stored.
    out = torch._scaled_mm(x8, w8.t(), scale_a=scale_a, scale_b=scale_weight.float().reshape(()),
                           bias=None if bias is None else bias.to(dtype), out_dtype=dtype)
    return out.reshape(*shape[:-1], w8.shape[0])


class FP8Linear(nn.Module):
    """A Linear layer whose weight is stored in fp8 with a per-tensor float32 scale.

    State-dict names match the Comfy-Org scaled files: ``weight`` (fp8), ``bias`` (compute
    dtype), ``scale_weight`` (float32 scalar) and, when the file has one, ``scale_input``.
    ``load_state_dict`` also takes kijai-style ``[1]``-shaped scales, plain fp8 weights
    (scale 1) and bf16 / fp16 / fp32 weights (quantised on the way in).

    The output dtype is the input's. ``.to(dtype)`` / ``.half()`` convert the bias only; the
    fp8 weight and float32 scales are kept as they are.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: Fmt = "e4m3fn",
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=fp8_dtype(fmt), device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("scale_input", None)
        self._scale = 1.0  # scale_weight as a Python float: the upcast path multiplies by it in fp32
        # _scaled_mm wants both weight dims divisible by 16; the device check is cached per device.
        self._mm_shapes_ok = in_features % 16 == 0 and out_features % 16 == 0
        self._use_mm: dict[torch.device, bool] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: Fmt = "e4m3fn",
                    compute_dtype: torch.dtype = torch.bfloat16) -> FP8Linear:
        """Quantise an ``nn.Linear`` (on its device); the bias is cast to ``compute_dtype``."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, compute_dtype,
                    device=linear.weight.device)
        layer.set_weight(linear.weight)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().to(compute_dtype)
        return layer

    def set_weight(self, w: torch.Tensor, scale: torch.Tensor | float | None = None) -> None:
        """Store a weight: fp8 as given with ``scale`` (default 1), anything else quantised
        to this layer's format (e.g. after a LoRA was merged into the dequantised weight)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(w.shape)} for a {self.in_features}->{self.out_features} layer")
        device = self.weight.device
        if is_fp8(w.dtype):
            w8, scale = w, torch.as_tensor(1.0 if scale is None else scale)
        else:
            w8, scale = quantize_weight(w.to(device), self.weight.dtype)
        self.weight = nn.Parameter(w8.detach().to(device), requires_grad=False)
        self.scale_weight = scale.detach().to(device=device, dtype=torch.float32).reshape(())
        self._scale = float(self.scale_weight)

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize(self.weight, self._scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _MM_OUT_DTYPES and self._mm_enabled(x.device):
            try:
                return scaled_mm_linear(x, self.weight, self.scale_weight, self.bias, self.scale_input)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as err:  # e.g. a torch build without fp8 kernels for this GPU
                log.warning("fp8 matmul failed on %s (%s); this layer upcasts its weight instead", x.device, err)
                self._use_mm[x.device] = False
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # Compiled, the scale is read from its buffer: the Python float would be baked into the
        # graph, one graph per layer.
        scale = self.scale_weight if torch.compiler.is_compiling() else self._scale
        return F.linear(x, dequantize(self.weight, scale, x.dtype), bias)

    def _mm_enabled(self, device: torch.device) -> bool:
        use = self._use_mm.get(device)
        if use is None:
            use = self._use_mm[device] = self._mm_shapes_ok and scaled_mm_supported(device)
        return use

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # Bring the entries to this layer's storage (fp8 weight of the file's format, float32
        # 0-dim scales) so nn.Module's own loading copies and checks them.
        key, skey, ikey = prefix + "weight", prefix + "scale_weight", prefix + "scale_input"
        w = state_dict.get(key)
        if w is not None:
            if is_fp8(w.dtype):
                scale = state_dict.get(skey, torch.ones(()))
            else:
                w, scale = quantize_weight(w, self.weight.dtype)
                state_dict[key] = w
            state_dict[skey] = _as_scalar(scale)
            if w.dtype != self.weight.dtype:
                self.weight = nn.Parameter(torch.empty_like(self.weight, dtype=w.dtype), requires_grad=False)
            if ikey in state_dict:
                state_dict[ikey] = _as_scalar(state_dict[ikey])
                if self.scale_input is None:
                    self.scale_input = torch.ones((), device=self.weight.device)
            else:
                self.scale_input = None
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._scale = float(self.scale_weight)

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) / .half() would upcast the fp8 weight and round the float32 scales; keep the
        # originals (moved to wherever fn sent them) so only the bias follows the new dtype.
        # detach(): nn.Module may swap the data under the same Parameter object.
        kept = {name: None if t is None else t.detach()
                for name, t in (("weight", self.weight), ("scale_weight", self.scale_weight),
                                ("scale_input", self.scale_input))}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if old is not None and new.dtype != old.dtype:
                moved = old.to(new.device)
                setattr(self, name, nn.Parameter(moved, requires_grad=False) if name == "weight" else moved)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.weight.dtype}, input_scale={self.scale_input is not None}")


def _as_scalar(scale: torch.Tensor) -> torch.Tensor:
    """A one-element scale of any float dtype (kijai's may be ``[1]``) as a float32 0-dim tensor;
    anything else is passed on for nn.Module to report as a size mismatch."""
    return scale.reshape(()).float() if scale.numel() == 1 else scale


def _module_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """Every plain ``nn.Linear`` as (parent, attribute name, dotted path, layer)."""
    return [(parent, name, f"{path}.{name}" if path else name, child)
            for path, parent in model.named_modules() for name, child in parent.named_children()
            if type(child) is nn.Linear]


def quantize_module(model: nn.Module, fmt: Fmt = "e4m3fn", compute_dtype: torch.dtype = torch.bfloat16,
                    predicate: Callable[[str, torch.Tensor], bool] = should_quantize) -> tuple[int, int]:
    """Replace, in place, every ``nn.Linear`` whose ``"<path>.weight"`` passes ``predicate`` by an
    ``FP8Linear``; return the model's parameter + buffer bytes ``(before, after)``.

    Other tensors are left as they are. The model must hold real (not meta) tensors.
    """
    before = _module_bytes(model)
    for parent, name, path, child in _linears(model):
        if predicate(f"{path}.weight", child.weight):
            setattr(parent, name, FP8Linear.from_linear(child, fmt, compute_dtype))
    return before, _module_bytes(model)


def load_scaled(module: nn.Module, state_dict: Mapping[str, torch.Tensor],
                compute_dtype: torch.dtype = torch.bfloat16, fmt: Fmt | None = None,
                predicate: Callable[[str, torch.Tensor], bool] = should_quantize, strict: bool = True):
    """Load a state dict of any fp8 flavour (or none) into ``module``; return what
    ``nn.Module.load_state_dict`` returns.

    The file prefix and the ``scaled_fp8`` marker are dropped. Each ``nn.Linear`` whose weight
    passes ``predicate`` becomes an ``FP8Linear`` when that weight is fp8 (kept bit for bit with
    its scales) or when ``fmt`` is given (a bf16 / fp16 / fp32 weight is quantised to ``fmt``).
    Any other fp8 tensor the file carries (Comfy-Org files also quantise e.g.
    ``text_embedding``) is dequantised into ``compute_dtype``. ``FP8Linear`` layers already in
    ``module`` take their weights as they come.
    """
    sd = {name: v for k, v in state_dict.items() if (name := strip_prefix(k)) != MARKER_KEY}
    for parent, name, path, child in _linears(module):
        w = sd.get(f"{path}.weight")
        if w is not None and (is_fp8(w.dtype) or fmt is not None) and predicate(f"{path}.weight", w):
            setattr(parent, name, FP8Linear(child.in_features, child.out_features, child.bias is not None,
                                            w.dtype if is_fp8(w.dtype) else fmt, compute_dtype,
                                            child.weight.device))
    fp8_layers = {path for path, m in module.named_modules() if isinstance(m, FP8Linear)}
    for key in [k for k, v in sd.items() if is_fp8(v.dtype)]:
        owner = key.rpartition(".")[0]
        if owner not in fp8_layers:
            scale = sd.pop(f"{owner}.scale_weight", 1.0)
            sd.pop(f"{owner}.scale_input", None)
            sd[key] = dequantize(sd[key], scale, compute_dtype)
    return module.load_state_dict(sd, strict=strict)


def settle_matmul(model: nn.Module, device: torch.device | str) -> None:
    """Decide now, for every FP8Linear of ``model``, whether it runs ``torch._scaled_mm`` on
    ``device``: a compiled block must find the choice made, not make it on its first call (a
    first-call side effect is a different graph than the calls after it, in every layer of
    every new model)."""
    device = torch.device(device)
    for layer in model.modules():
        if isinstance(layer, FP8Linear):
            layer._mm_enabled(device)
