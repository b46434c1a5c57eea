"""GGUF models: the quantised Wan DiT (and UMT5) files that 8-16 GB cards run.

Files are read with the ``gguf`` package's :class:`gguf.GGUFReader` (GGUF's own binary
format; nothing is unpickled) and validated before any weight is read: a file that is not
GGUF, is cut short, is another architecture, stores a tensor type we cannot dequantise or a
tensor whose bytes do not fit its type and shape fails with a
:class:`~..wan.checkpoint.CheckpointError` naming the file.

Conventions of city96's ComfyUI-GGUF converter (``tools/convert.py``, ``loader.py``), which
made the Wan GGUFs in circulation: ``general.architecture`` is ``"wan"``; tensors keep the
original Wan names (``blocks.N.self_attn.q.weight``), sometimes under a
``model.diffusion_model.`` prefix; a tensor's dims are stored in ggml order (innermost
first), so the torch shape is the reverse, unless ``comfy.gguf.orig_shape.<name>`` holds the
real shape (a tensor reshaped for storage, e.g. a 5-D Conv3d folded to 4-D). The 5-D
``patch_embedding.weight`` is added back in F32 by ``fix_5d_tensors.py``; 1-D tensors, tensors
of at most 1024 elements and ``.modulation`` are F32, ``time_embedding`` F16.

The block Linears stay quantised (:class:`GGUFLinear`): their raw bytes are what sits on
the device or swaps, and each call dequantises the weight in torch on the input's device.
Every other tensor is dequantised once, at load, into the compute dtype. The dequantisers
equal ``gguf.quants.dequantize`` bit for bit (float32 results; see tests/test_gguf.py).
"""
from __future__ import annotations

import functools
import math
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT
from torch import nn

from ..wan.checkpoint import KNOWN_PREFIXES, CheckpointError, HeaderFacts, classify
from ..wan.detect import detect_dit_config
from ..wan.model import WanConfig, WanModel
from ..wan.t5 import UMT5Encoder, detect_t5_config, t5_key_map
from ..wan.tokenizer import UMT5Tokenizer, load_tokenizer, tokenizer_from_bytes
from . import fp8, loading
from .offload import BlockLayout, state_tensors

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
QUANT_TYPES = (QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES
_TORCH_FLOAT = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}

DIT_ARCHITECTURES = ("wan",)
T5_ARCHITECTURES = ("t5encoder", "t5")
ARCHITECTURES = {"dit": DIT_ARCHITECTURES, "t5": T5_ARCHITECTURES}

# Dequantisation runs this many elements at a time, so its intermediates stay small next to
# the output: on a GPU few enough chunks that kernel launches stay cheap (the biggest Wan
# Linear, 5120 x 13824, takes 17); on the host, float32 temporaries of 256 KB, which glibc
# serves from its heap (optim.hostmem maps 1 MB and more afresh, page faults every time).
# DEQUANT_WORK_BYTES bounds the intermediates per element of a chunk (tests/test_gguf.py
# measures every type against it).
DEQUANT_CHUNK = 1 << 22
DEQUANT_CHUNK_CPU = 1 << 16
DEQUANT_WORK_BYTES = 12


def gguf_version() -> str:
    try:
        return _metadata.version("gguf")
    except _metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return "?"


def type_name(qtype: int) -> str:
    """``"Q4_K"`` for a ggml type id; ``"type 250"`` for an id ggml does not know."""
    try:
        return QT(qtype).name
    except ValueError:
        return f"type {qtype}"


def stored_bytes(numel: int, qtype: int) -> int:
    """Bytes ``numel`` elements take in ggml type ``qtype`` (a whole number of blocks)."""
    block, size = gguf.GGML_QUANT_SIZES[QT(qtype)]
    if numel % block:
        raise ValueError(f"{numel} elements are not a whole number of {type_name(qtype)} blocks of {block}")
    return numel // block * size


# --- dequantisation (torch, vectorised, any device) --------------------------------------

def _shifts(device: torch.device, values: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    if torch.compiler.is_compiling():  # a constant of the graph (Dynamo warns about a cached one)
        return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)
    return _cached_shifts(device, values, shape)


@functools.lru_cache(maxsize=16)
def _cached_shifts(device: torch.device, values: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 scale stored at byte ``at`` of each block, as float32 [n, 1]."""
    pair = blocks[:, at:at + 2]
    try:  # a strided view when the scale sits at an even address (every GGUF type's does)
        return pair.view(torch.float16).float()
    except RuntimeError:
        return pair.contiguous().view(torch.float16).float()


def _bits(qh: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Bit i of each byte row, byte by byte: [n, k] -> [n, 1, 8, k] reshaped to ``shape``
    (the K-quants' high bits: element j of sub-block i is bit i of byte j)."""
    n, k = qh.shape
    return ((qh.reshape(n, 1, 1, k) >> _shifts(qh.device, tuple(range(8)), (1, 1, 8, 1))) & 1).reshape(shape)


def _nibbles(qs: torch.Tensor, run: int) -> torch.Tensor:
    """Low nibbles of each run of ``run`` bytes, then their high nibbles: [n, k] -> [n, 2k]."""
    n, k = qs.shape
    q = qs.reshape(n, k // run, 1, run) >> _shifts(qs.device, (0, 4), (1, 1, 2, 1))
    return (q & 0x0F).reshape(n, 2 * k)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit sub-block scales and mins packed in Q4_K / Q5_K's 12 bytes."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# Each kernel decodes [n, type_size] uint8 blocks into ``out`` ([n, block_size], any float
# dtype) with the float32 operations of gguf.quants in the same order, so a float32 ``out``
# is bit-identical to it. Integer codes enter the last float op directly (int -> float32 is
# exact) and that op writes ``out``, computing in float32 and rounding once on the store.

def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(b[:, 2:].view(torch.int8), _f16(b, 0), out=out)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(_nibbles(b[:, 2:], 16).view(torch.int8) - 8, _f16(b, 0), out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.add(torch.mul(_nibbles(b[:, 4:], 16), _f16(b, 0)), _f16(b, 2), out=out)


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1: bit j of the little-endian uint32 ``qh`` [n, 4] is element j's fifth bit."""
    return _bits(qh, (-1, 8, 4)).transpose(1, 2).reshape(-1, 32)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 6:], 16) | (_high_bits32(b[:, 2:6]) << 4)
    torch.mul(q.view(torch.int8) - 16, _f16(b, 0), out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 8:], 16) | (_high_bits32(b[:, 4:8]) << 4)
    torch.add(torch.mul(q, _f16(b, 0)), _f16(b, 2), out=out)


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n, scales = b.shape[0], b[:, :16]
    dl = (_f16(b, 80) * (scales & 0x0F)).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4)).reshape(n, 16, 1)
    q = (b[:, 16:80].reshape(n, 2, 1, 32) >> _shifts(b.device, (0, 2, 4, 6), (1, 1, 4, 1))) & 3
    torch.sub(torch.mul(q.reshape(n, 16, 16), dl), ml, out=out.view(n, 16, 16))


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n, scales = b.shape[0], b[:, 96:108]
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(b.device, (0, 4), (1, 2, 1))).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(b.device, (0, 2, 4, 6), (1, 4, 1))).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 3) << 4)).view(torch.int8) - 32
    dl = (_f16(b, 108) * sc).reshape(n, 16, 1)
    ql = (b[:, 32:96].reshape(n, 2, 1, 32) >> _shifts(b.device, (0, 2, 4, 6), (1, 1, 4, 1))).reshape(n, 16, 16) & 3
    qh = _bits(b[:, :32], (n, 16, 16)) ^ 1  # the offset of 4 applies where the mask bit is 0
    torch.mul(ql.view(torch.int8) - (qh << 2).view(torch.int8), dl, out=out.view(n, 16, 16))


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: per 32-value sub-block scale d * sc and offset dmin * m, [n, 8, 1]."""
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (_f16(b, 0) * sc).reshape(n, 8, 1), (_f16(b, 2) * mn).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n, (d, dm) = b.shape[0], _k4_scales(b)
    torch.sub(torch.mul(_nibbles(b[:, 16:], 32).reshape(n, 8, 32), d), dm, out=out.view(n, 8, 32))


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n, (d, dm) = b.shape[0], _k4_scales(b)
    q = _nibbles(b[:, 48:], 32).reshape(n, 8, 32) | (_bits(b[:, 16:48], (n, 8, 32)) << 4)
    torch.sub(torch.mul(q, d), dm, out=out.view(n, 8, 32))


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).reshape(n, 16, 1)
    ql = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(b.device, (0, 2, 4, 6), (1, 1, 4, 1))) & 3
    q = (ql | (qh.reshape(n, 8, 32) << 4)).view(torch.int8) - 32
    torch.mul(q.reshape(n, 16, 16), d, out=out.view(n, 16, 16))


_KERNELS: dict[QT, Callable[[torch.Tensor, torch.Tensor], None]] = {
    QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1,
    QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
}


def dequantize(raw: torch.Tensor, qtype: int, shape: tuple[int, ...] | torch.Size,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor of ``shape`` stored as ggml type ``qtype`` in the uint8 ``raw``, in ``dtype``.

    Runs on ``raw``'s device. ``raw`` may be longer than the tensor (padded storage); its
    first bytes are used. Quantised types are decoded chunk by chunk (:data:`DEQUANT_CHUNK`
    elements on a GPU, :data:`DEQUANT_CHUNK_CPU` on the host), computing in float32 and
    rounding once into ``dtype`` (float32 results equal ``gguf.quants.dequantize`` bit for bit). F32 / F16 / BF16 are reinterpreted and cast; an
    F32 tensor asked for in float32 is returned as a view of ``raw``.
    """
    qtype = QT(qtype)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"cannot dequantise ggml type {qtype.name}; supported: "
                         f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
    numel = math.prod(shape)
    nbytes = stored_bytes(numel, qtype)
    data = raw.reshape(-1)
    if data.dtype != torch.uint8 or data.numel() < nbytes:
        raise ValueError(f"{type_name(qtype)} tensor of shape {tuple(shape)} needs {nbytes} uint8 bytes; "
                         f"got {data.numel()} {data.dtype} values")
    data = data[:nbytes]
    if qtype in _TORCH_FLOAT:
        return data.view(_TORCH_FLOAT[qtype]).view(shape).to(dtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks, kernel, n = data.view(-1, size), _KERNELS[qtype], numel // block
    out = torch.empty(n, block, dtype=dtype, device=raw.device)
    step = max(1, (DEQUANT_CHUNK_CPU if raw.device.type == "cpu" else DEQUANT_CHUNK) // block)
    for i in range(0, n, step):
        kernel(blocks[i:i + step], out[i:i + step])
    return out.view(shape)


def dequant_transient_bytes(numel: int, dtype: torch.dtype, qtype: int = QT.Q4_K) -> int:
    """Device bytes one :class:`GGUFLinear` call holds beyond its input and output: the
    dequantised weight in ``dtype`` plus, for quantised types, the working set of one device
    chunk (the planner adds this to the activation peak)."""
    if QT(qtype) in _TORCH_FLOAT:
        return 0 if _TORCH_FLOAT[QT(qtype)] == dtype else numel * dtype.itemsize
    return numel * dtype.itemsize + min(numel, DEQUANT_CHUNK) * DEQUANT_WORK_BYTES


# --- a Linear whose weight stays quantised -------------------------------------------------

class GGUFLinear(nn.Module):
    """A Linear layer that keeps its weight as the file's quantised bytes.

    ``weight`` is a flat uint8 Parameter holding the ggml blocks of the ``[out_features,
    in_features]`` weight, padded to ``storage_bytes`` when given (so blocks of mixed quant
    types share one layout for block swap). Parameters are what ``BlockSwapper`` packs and
    moves, so the QUANTISED bytes are what stay resident or swap. ``forward`` dequantises
    the weight on the input's device to the input's dtype for the one call and runs
    ``F.linear``; ``bias`` is kept in the compute dtype. ``.to(dtype)`` converts the bias
    only (integer tensors keep their dtype). Constructible on the meta device from shapes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qtype: int = QT.Q8_0,
                 compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 storage_bytes: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.qtype = in_features, out_features, QT(qtype)
        if self.qtype not in SUPPORTED_TYPES:
            raise ValueError(f"GGUFLinear: unsupported ggml type {self.qtype.name}")
        self.nbytes = stored_bytes(in_features * out_features, self.qtype)
        storage = self.nbytes if storage_bytes is None else storage_bytes
        if storage < self.nbytes:
            raise ValueError(f"storage_bytes={storage} is below the {self.nbytes} bytes of the weight")
        self.weight = nn.Parameter(torch.zeros(storage, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16,
                           device: torch.device | str | None = None) -> torch.Tensor:
        """The weight as a ``[out_features, in_features]`` tensor (e.g. to merge a LoRA)."""
        raw = self.weight if device is None else self.weight.to(device, non_blocking=True)
        return dequantize(raw, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype, x.device if self.weight.device != x.device else None)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        pad = f", storage_bytes={self.weight.numel()}" if self.weight.numel() != self.nbytes else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, qtype={self.qtype.name}{pad}")


# --- reading and validating a file ---------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file, from its header."""

    shape: tuple[int, ...]  # the torch shape (dims reversed, or comfy.gguf.orig_shape)
    qtype: QT
    nbytes: int  # bytes stored in the file
    offset: int  # absolute byte offset of its data in the file
    name: str  # its name in the file (prefix included)

    @property
    def quantized(self) -> bool:
        return self.qtype not in _TORCH_FLOAT

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype as ``Checkpoint.tensors`` reports it: the float dtype for F32 / F16 /
        BF16, ``torch.uint8`` (raw blocks) for quantised types."""
        return _TORCH_FLOAT.get(self.qtype, torch.uint8)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFCheckpoint(HeaderFacts):
    """A validated GGUF file: header facts only, weights left on disk.

    Offers what the pack reads from :class:`~..wan.checkpoint.Checkpoint` (``path``,
    ``family``, ``prefix``, ``tensors``, and ``HeaderFacts``' ``name``, ``shapes``, ``nbytes``,
    ``dtypes()``),
    with keys in the pack's layout: original Wan names for a DiT, transformers names
    (``encoder.block.N.layer.0.SelfAttention.q.weight``) for a UMT5 encoder.
    """

    path: Path
    family: str
    prefix: str
    architecture: str
    tensors: dict[str, GGUFTensorInfo]
    metadata: dict[str, object] = field(default_factory=dict)
    file_size: int = 0
    tokenizer_model: bytes | None = field(default=None, repr=False)  # T5: SentencePiece ModelProto

    def qtypes(self) -> dict[str, int]:
        """Bytes stored per ggml type name, e.g. ``{"Q4_K": ..., "F32": ...}``."""
        out: dict[str, int] = {}
        for info in self.tensors.values():
            out[info.qtype.name] = out.get(info.qtype.name, 0) + info.nbytes
        return out

    def quant_label(self) -> str:
        """The type holding most block-Linear bytes ("Q4_K"), as a loader would show it."""
        block = {}
        for key, info in self.tensors.items():
            if key.startswith("blocks.") or key.startswith("encoder.block."):
                block[info.qtype.name] = block.get(info.qtype.name, 0) + info.nbytes
        return max(block, key=block.get) if block else "?"

    @contextmanager
    def open_raw(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """Map the file (private copy-on-write mapping, pages read on touch) and yield
        ``raw(key)``: a uint8 view of that tensor's stored bytes. Views stay valid after exit."""
        size = self.path.stat().st_size
        if size != self.file_size:
            raise CheckpointError(f"{self.name}: the file changed on disk since it was opened "
                                  f"({self.file_size} -> {size} bytes); load it again")
        # numpy's memmap (as GGUFReader's) rather than torch.from_file: a private mapping on
        # every OS ComfyUI runs on; tensors sliced from it keep it alive.
        data = torch.from_numpy(np.memmap(self.path, dtype=np.uint8, mode="c", shape=(size,)))

        def raw(key: str) -> torch.Tensor:
            info = self.tensors[key]
            return data[info.offset:info.offset + info.nbytes]

        yield raw

    def get_tensor(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor dequantised to ``dtype`` on the CPU (reads only its bytes)."""
        info = self.tensors[key]
        with self.open_raw() as raw:
            return dequantize(raw(key), info.qtype, info.shape, dtype)

    def iter_tensors(self, keys: list[str] | None = None,
                     dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        with self.open_raw() as raw:
            for key in keys if keys is not None else list(self.tensors):
                info = self.tensors[key]
                yield key, dequantize(raw(key), info.qtype, info.shape, dtype)


class _Invalid(Exception):
    """A defect found in the tensor table, before the reader touches the data."""


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader that checks the tensor table (types, sizes, extents) before it builds its
    views of the data, so the error can name the tensor at fault. Metadata arrays are read
    faster: numbers as one view, strings as memoryviews (the base reader makes numpy views
    per value: 20 s for a UMT5 file's 256k-token vocabulary on a 2-core host). A field's
    ``contents()`` is what the base reader gives; a number array's ``data`` holds one index,
    so index its contents, not its parts."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        _check_tensor_table(start_offs, fields, int(self.data.shape[0]))
        super()._build_tensors(start_offs, fields)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        if raw_type == gguf.GGUFValueType.ARRAY:
            item_type = self._get(orig_offs, np.uint32)
            count = self._get(orig_offs + 4, np.uint64)
            kind = gguf.GGUFValueType(int(item_type[0])) if len(item_type) and len(count) else None
            nptype = self.gguf_scalar_to_np.get(kind)
            if nptype is not None:
                values = self._get(orig_offs + 12, nptype, int(count[0]))
                if len(values) != int(count[0]):
                    raise ValueError(f"metadata array of {int(count[0])} values runs past the end of the file")
                return 12 + int(values.nbytes), [item_type, count, values], [2], [gguf.GGUFValueType.ARRAY, kind]
            if kind == gguf.GGUFValueType.STRING and self.byte_order == "I" and sys.byteorder == "little":
                return self._string_array(orig_offs, item_type, count)
        return super()._get_field_parts(orig_offs, raw_type)

    def _string_array(self, orig_offs: int, item_type, count):
        buf, at, parts = memoryview(self.data), orig_offs + 12, [item_type, count]
        for _ in range(int(count[0])):
            if at + 8 > len(buf):
                raise ValueError("metadata string array runs past the end of the file")
            length = int.from_bytes(buf[at:at + 8], "little")
            if at + 8 + length > len(buf):
                raise ValueError("metadata string array runs past the end of the file")
            parts.append(buf[at + 8:at + 8 + length])
            at += 8 + length
        return at - orig_offs, parts, list(range(2, len(parts))), [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]


def _check_tensor_table(start: int, fields: list, file_size: int) -> None:
    extents = []
    for f in fields:
        if len(f.parts) != 6:  # a layout this check does not know: the reader's own checks run
            return
        _, _, _, dims, raw_type, offset = f.parts
        name, dims, qtype = f.name, [int(d) for d in dims], int(raw_type[0])
        try:
            qt = QT(qtype)
        except ValueError:
            raise _Invalid(f"tensor {name} has quant type id {qtype}, which is no ggml type "
                           f"(gguf {gguf_version()} knows {', '.join(t.name for t in QT)})") from None
        if qt not in SUPPORTED_TYPES:
            raise _Invalid(f"tensor {name} is stored as {qt.name}, a quant type WanFit cannot dequantise "
                           f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)}); use a file "
                           "quantised to one of those")
        block, size = gguf.GGML_QUANT_SIZES[qt]
        if dims and dims[0] % block:
            raise _Invalid(f"tensor {name}: its rows of {dims[0]} elements are not whole {qt.name} blocks "
                           f"of {block}: its byte size cannot match its type and shape")
        nbytes = math.prod(dims) // block * size
        extents.append((start + int(offset[0]), nbytes, name, qt, tuple(reversed(dims))))
    extents.sort()
    for (at, nbytes, name, qt, shape), nxt in zip(extents, extents[1:] + [None]):
        end = nxt[0] if nxt is not None else file_size
        if at + nbytes <= end:
            continue
        if nxt is None:
            raise _Invalid(f"truncated: tensor {name} ({qt.name} {list(shape)}) ends at byte {at + nbytes} "
                           f"but the file has {file_size} bytes; download it again")
        raise _Invalid(f"tensor {name}: {qt.name} {list(shape)} takes {nbytes} bytes, but only {end - at} are "
                       f"stored before the next tensor ({nxt[2]}): its byte size does not match its "
                       "type and shape")


def _string_field(reader: gguf.GGUFReader, key: str) -> str | None:
    f = reader.get_field(key)
    if f is None:
        return None
    if f.types != [gguf.GGUFValueType.STRING]:
        raise _Invalid(f"metadata {key} is not a string ({[t.name for t in f.types]})")
    return f.contents()


def _orig_shape(reader: gguf.GGUFReader, name: str) -> tuple[int, ...] | None:
    f = reader.get_field(f"comfy.gguf.orig_shape.{name}")
    if f is None:
        return None
    ints = {gguf.GGUFValueType.INT32, gguf.GGUFValueType.INT64, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.UINT64}
    if len(f.types) != 2 or f.types[0] != gguf.GGUFValueType.ARRAY or f.types[1] not in ints:
        raise _Invalid(f"metadata comfy.gguf.orig_shape.{name} is not an array of integers")
    return tuple(int(v) for v in f.contents())


def _metadata_of(reader: gguf.GGUFReader) -> dict[str, object]:
    """Scalar and string metadata (arrays are left out: tokenizer vocabularies are huge)."""
    out = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] != gguf.GGUFValueType.ARRAY and not key.startswith("GGUF."):
            out[key] = f.contents()
    return out


_T5_NAMES = [(re.compile(a), b) for a, b in [
    (r"^enc\.blk\.(\d+)\.attn_q\.", r"encoder.block.\1.layer.0.SelfAttention.q."),
    (r"^enc\.blk\.(\d+)\.attn_k\.", r"encoder.block.\1.layer.0.SelfAttention.k."),
    (r"^enc\.blk\.(\d+)\.attn_v\.", r"encoder.block.\1.layer.0.SelfAttention.v."),
    (r"^enc\.blk\.(\d+)\.attn_o\.", r"encoder.block.\1.layer.0.SelfAttention.o."),
    (r"^enc\.blk\.(\d+)\.attn_rel_b\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^enc\.blk\.(\d+)\.attn_norm\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^enc\.blk\.(\d+)\.ffn_gate\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^enc\.blk\.(\d+)\.ffn_up\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^enc\.blk\.(\d+)\.ffn_down\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
    (r"^enc\.blk\.(\d+)\.ffn_norm\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^enc\.output_norm\.", "encoder.final_layer_norm."),
    (r"^token_embd\.", "shared."),
]]


def t5_gguf_key(name: str) -> str | None:
    """llama.cpp's T5 encoder tensor name (``enc.blk.3.attn_q.weight``) -> the transformers
    name (``encoder.block.3.layer.0.SelfAttention.q.weight``); None for tensors outside the
    encoder (``dec.*``, ``output``)."""
    for pattern, repl in _T5_NAMES:
        m = pattern.match(name)
        if m:
            return m.expand(repl) + name[m.end():]
    return None


def _strip_prefix(names: list[str]) -> str:
    for prefix in KNOWN_PREFIXES:
        if names and sum(n.startswith(prefix) for n in names) >= 0.9 * len(names):
            return prefix
    return ""


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 is ten bytes of two's complement, as protobuf writes it
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb(number: int, value: int | float | bool | bytes | str) -> bytes:
    """One protobuf field: varint for ints / bools, fixed32 for floats, bytes for the rest."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def sentencepiece_model(reader: gguf.GGUFReader) -> bytes | None:
    """The SentencePiece ModelProto (``spiece.model`` bytes) of a llama.cpp T5 GGUF's
    vocabulary (``tokenizer.ggml.*``, written by convert_hf_to_gguf from the original
    model), or None when the file has none. Field numbers are sentencepiece_model.proto's."""
    def get(key, default=None):
        f = reader.get_field(f"tokenizer.ggml.{key}")
        return default if f is None else f.contents()

    if get("model") != "t5" or get("tokens") is None:
        return None
    tokens, scores, types = get("tokens"), get("scores"), get("token_type")
    if not (len(tokens) == len(scores) == len(types)):
        raise _Invalid(f"tokenizer.ggml tokens / scores / token_type differ in length "
                       f"({len(tokens)}, {len(scores)}, {len(types)})")
    unk = get("unknown_token_id", types.index(2) if 2 in types else 0)
    eos, pad, bos = get("eos_token_id", -1), get("padding_token_id", -1), get("bos_token_id", -1)
    pieces = b"".join(_pb(1, _pb(1, t) + _pb(2, float(sc)) + _pb(3, int(ty)))
                      for t, sc, ty in zip(tokens, scores, types))
    trainer = (_pb(3, 1) + _pb(4, len(tokens)) + _pb(35, 6 in types)  # UNIGRAM; byte_fallback
               + _pb(40, unk) + _pb(41, bos) + _pb(42, eos) + _pb(43, pad))
    for number, token_id in ((45, unk), (46, bos), (47, eos), (48, pad)):
        if 0 <= token_id < len(tokens):
            trainer += _pb(number, tokens[token_id])
    charsmap = get("precompiled_charsmap")
    normalizer = (_pb(1, "nmt_nfkc" if charsmap else "identity") + (_pb(2, bytes(charsmap)) if charsmap else b"")
                  + _pb(3, bool(get("add_space_prefix", True))) + _pb(4, bool(get("remove_extra_whitespaces", True)))
                  + _pb(5, True))
    return pieces + _pb(2, trainer) + _pb(3, normalizer)


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; :func:`open_gguf` checks the rest)."""
    return Path(path).suffix.lower() == ".gguf"


def open_gguf(path: str | Path, expect: str | None = None) -> GGUFCheckpoint:
    """Validate the GGUF file ``path`` and return its header-only handle.

    ``expect`` names the family a loader needs ("dit" or "t5"). Raises CheckpointError naming
    the file when it is missing, not GGUF, truncated or damaged, of another architecture,
    stores an unsupported quant type, or a tensor whose size does not fit its type and shape.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise CheckpointError(f"{name}: no such file ({path})")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] != b"GGUF":
        hint = " (it looks like a safetensors file)" if head[8:9] == b"{" else ""
        raise CheckpointError(f"{name}: not a GGUF file: it does not start with the GGUF magic{hint}; "
                              "expected a .gguf model")
    try:
        reader = _CheckedReader(path, "r")
        if reader.endianess != gguf.GGUFEndian.LITTLE:  # the dequantisers read little-endian blocks
            raise _Invalid("a big-endian GGUF; WanFit reads the little-endian files the converters write")
        architecture = _string_field(reader, "general.architecture")
        raw_tensors = [(t.name, t, _orig_shape(reader, t.name)) for t in reader.tensors]
        meta = _metadata_of(reader)
        spm_model = sentencepiece_model(reader) if architecture in T5_ARCHITECTURES else None
    except _Invalid as err:
        raise CheckpointError(f"{name}: {err}") from None
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{name}: not a readable GGUF file: its header is damaged or cut short "
                              f"({type(err).__name__}: {err}); download it again") from err

    known = ", ".join(f"'{a}' ({fam})" for fam, archs in ARCHITECTURES.items() for a in archs)
    family = next((fam for fam, archs in ARCHITECTURES.items() if architecture in archs), None)
    if architecture is not None and family is None:
        raise CheckpointError(f"{name}: general.architecture is '{architecture}': a GGUF of another model; "
                              f"WanFit reads {known}")
    if family == "t5":
        renamed = {t5_gguf_key(n): (n, t, s) for n, t, s in raw_tensors}
        renamed.pop(None, None)
        prefix = ""
        if classify(set(renamed)) != "t5":
            raise CheckpointError(f"{name}: general.architecture is '{architecture}' but its tensors are no "
                                  f"T5 encoder (llama.cpp names enc.blk.N.attn_q.weight, token_embd.weight)")
    else:
        prefix = _strip_prefix([n for n, _, _ in raw_tensors])
        renamed = {n[len(prefix):]: (n, t, s) for n, t, s in raw_tensors if n.startswith(prefix)}
        found = classify(set(renamed))
        if architecture is None:  # stable-diffusion.cpp style files carry no architecture
            if found != "dit":
                raise CheckpointError(f"{name}: no general.architecture and its tensors are no Wan DiT; "
                                      f"WanFit reads {known}")
            family = "dit"
        elif found != "dit":
            raise CheckpointError(f"{name}: general.architecture is 'wan' but its tensors are no Wan DiT "
                                  f"(first names: {', '.join(sorted(renamed)[:4])})")
    tensors = {}
    for key, (file_name, t, orig) in renamed.items():
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if orig is not None:
            if math.prod(orig) != t.n_elements:
                raise CheckpointError(f"{name}: tensor {file_name}: comfy.gguf.orig_shape {list(orig)} has "
                                      f"{math.prod(orig)} elements, the tensor {t.n_elements}")
            shape = orig
        tensors[key] = GGUFTensorInfo(shape, QT(t.tensor_type), int(t.n_bytes), int(t.data_offset), file_name)
    del reader
    if expect is not None and family != expect:
        wanted = {"dit": "a Wan diffusion model (DiT)", "t5": "a UMT5 text encoder"}
        raise CheckpointError(f"{name}: this is {wanted[family]}, but this loader needs "
                              f"{wanted.get(expect, expect)}")
    return GGUFCheckpoint(path, family, prefix, architecture or "wan", tensors, meta, size, spm_model)


# --- building models -----------------------------------------------------------------------

class _GGUFStateDict(Mapping):
    """``{model key: tensor}`` read from the mapped file on lookup, never before.

    Keys in ``kept`` are GGUFLinear weights: their raw bytes, as views of the mapping (or
    zero-padded to the storage size given). Every other tensor is dequantised to ``dtype``.
    """

    def __init__(self, raw: Callable[[str], torch.Tensor], tensors: Mapping[str, GGUFTensorInfo],
                 names: Mapping[str, str], kept: Mapping[str, int], dtype: torch.dtype):
        self._raw, self._tensors, self._names, self._kept, self._dtype = raw, tensors, dict(names), kept, dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        source = self._names[key]
        info, data = self._tensors[source], self._raw(source)
        storage = self._kept.get(key)
        if storage is None:
            return dequantize(data, info.qtype, info.shape, self._dtype)
        if storage == data.numel():
            return data
        padded = torch.zeros(storage, dtype=torch.uint8)
        padded[:data.numel()] = data
        return padded

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _swap_in_gguf_linears(model: nn.Module, plan: Mapping[str, tuple[QT, int]], dtype: torch.dtype) -> None:
    for path, (qtype, storage) in plan.items():
        layer = model.get_submodule(path)
        new = GGUFLinear(layer.in_features, layer.out_features, layer.bias is not None, qtype, dtype,
                         device="meta", storage_bytes=storage)
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def _quantized_plan(tensors: Mapping[str, GGUFTensorInfo], is_block_linear: Callable[[str, tuple], bool],
                    uniform_blocks: bool) -> dict[str, tuple[QT, int]]:
    """Module path -> (type, storage bytes) of each Linear that stays quantised.

    A block Linear stays quantised when the file stores it in a quantised type. With
    ``uniform_blocks``, every block's Linear at a position (``self_attn.q``, ...) where any
    block's is quantised becomes a GGUFLinear whose storage is the largest among them, so all
    blocks share one tensor layout (BlockSwapper needs it; llama.cpp's mixes such as Q4_K_M
    may store some blocks' layers in another type). Costs nothing when the types agree.
    """
    linears = {k: v for k, v in tensors.items() if k.endswith(".weight") and is_block_linear(k, v.shape)}
    positions: dict[str, list[str]] = {}
    for key in linears:
        positions.setdefault(re.sub(r"^(\w+)\.\d+\.", r"\1.#.", key), []).append(key)
    plan = {}
    for keys in positions.values():
        quantized = [k for k in keys if linears[k].quantized]
        if not quantized:
            continue
        chosen = keys if uniform_blocks else quantized
        storage = max(linears[k].nbytes for k in chosen) if uniform_blocks else None
        for k in chosen:
            plan[k.removesuffix(".weight")] = (linears[k].qtype, storage or linears[k].nbytes)
    return plan


def _dit_config(ckpt: GGUFCheckpoint):
    try:
        return detect_dit_config(ckpt.shapes)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.name}: {err}") from err


def build_meta_dit(ckpt: GGUFCheckpoint, dtype: torch.dtype = torch.bfloat16, attention: str = "auto",
                   uniform_blocks: bool = True, keep_quantized: bool = True) -> WanModel:
    """The WanModel of ``ckpt`` on the meta device, with GGUFLinear for the quantised block
    Linears (their storage as in the file; none without ``keep_quantized``): what
    :func:`load_dit_gguf` fills, and what a planner counts bytes on."""
    config = _dit_config(ckpt)
    with torch.device("meta"):
        model = WanModel(config, attention_backend=attention).to(dtype)
    if keep_quantized:
        _swap_in_gguf_linears(model, _quantized_plan(ckpt.tensors, fp8.should_quantize, uniform_blocks), dtype)
    return model


def load_dit_gguf(source: str | Path | GGUFCheckpoint, dtype: torch.dtype = torch.bfloat16,
                  device: loading.Placement = "cpu", attention: str = "auto",
                  uniform_blocks: bool = True, keep_quantized: bool = True,
                  transform: loading.Transform | None = None) -> WanModel:
    """Build the Wan DiT in a GGUF file, streaming tensor by tensor from the memory map.

    Block Linears stored quantised become :class:`GGUFLinear` holding the stored bytes
    (padded per position when ``uniform_blocks``, see :func:`_quantized_plan`); every other
    tensor is dequantised to ``dtype``. ``keep_quantized=False`` dequantises the block
    Linears too, once, at load (full-speed matmuls where memory allows; a "bf16" weight
    format). ``device`` is one device or ``name -> device``, as in ``optim.loading``. On the
    CPU, unpadded quantised weights (and F32 tensors loaded as float32) stay views of the
    private file mapping: no copy in host RAM until written. ``transform`` (LoRA deltas
    merged while streaming, as ``loading.load_dit``) sees the dequantised tensors; it may not
    touch a weight kept quantised.
    """
    ckpt = source if isinstance(source, GGUFCheckpoint) else open_gguf(source, expect="dit")
    if ckpt.family != "dit":
        raise CheckpointError(f"{ckpt.name}: a {ckpt.family} GGUF, not a Wan diffusion model (DiT)")
    model = build_meta_dit(ckpt, dtype, attention, uniform_blocks, keep_quantized)
    kept = _kept(model)
    with ckpt.open_raw() as raw:
        tensors = _GGUFStateDict(raw, ckpt.tensors, {k: k for k in ckpt.tensors}, kept, dtype)
        return loading.stream_weights(model, _transformed(ckpt, tensors, kept, transform), {}, dtype, device,
                                      ckpt.name, fp8_predicate=lambda key, shape: False)


def _kept(model: nn.Module) -> dict[str, int]:
    return {f"{path}.weight": m.weight.numel() for path, m in model.named_modules() if isinstance(m, GGUFLinear)}


def _transformed(ckpt: GGUFCheckpoint, tensors: Mapping, kept: Mapping[str, int],
                 transform: loading.Transform | None) -> Mapping:
    if transform is None:
        return tensors
    patched = transform(tensors, {})
    touched = sorted(set(getattr(patched, "targets", ())) & set(kept))
    if touched:  # a full delta (.diff) on a quantised weight: no re-quantiser for these types
        raise CheckpointError(f"{ckpt.name}: a LoRA changes the quantised weight {touched[0]} as a whole "
                              "(a .diff delta); GGUF weights take low-rank LoRAs only")
    return patched


def reload_dit_tensors_gguf(model: WanModel, ckpt: GGUFCheckpoint, names: list[str],
                            dtype: torch.dtype = torch.bfloat16, transform: loading.Transform | None = None) -> None:
    """``loading.reload_dit_tensors`` for a GGUF DiT: the tensors ``names`` (never weights kept
    quantised) read and dequantised again, through ``transform``, each onto its current device."""
    kept = _kept(model)
    with ckpt.open_raw() as raw:
        tensors = _transformed(ckpt, _GGUFStateDict(raw, ckpt.tensors, {k: k for k in ckpt.tensors}, kept, dtype),
                               kept, transform)
        for name in names:
            current = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
            loading.set_tensor(model, name, tensors[name].to(device=current.device, dtype=current.dtype))


@dataclass(frozen=True)
class GGUFDitBytes:
    """Exact bytes of a GGUF DiT as :func:`load_dit_gguf` builds it (for the memory plan)."""

    blocks: tuple[int, ...]  # each block's parameters: quantised weights as stored, the rest in dtype
    block: int  # one block packed for swap (BlockLayout: 256-byte aligned tensors), the largest
    other: int  # everything outside the blocks (embeddings, projections, head) in dtype
    largest_linear: int  # elements of the largest GGUFLinear weight
    dequant_transient: int  # device bytes its call adds: dequantised weight + chunk working set

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.other


def dit_bytes(ckpt: GGUFCheckpoint, dtype: torch.dtype = torch.bfloat16, uniform_blocks: bool = True,
              keep_quantized: bool = True) -> GGUFDitBytes:
    """Bytes of the model :func:`load_dit_gguf` builds with these arguments, from the
    file's header alone (no weight is read)."""
    model = build_meta_dit(ckpt, dtype, uniform_blocks=uniform_blocks, keep_quantized=keep_quantized)
    per_block = tuple(sum(t.nbytes for t in state_tensors(b)) for b in model.blocks)
    slot = max(BlockLayout(state_tensors(b)).nbytes for b in model.blocks)
    other = sum(t.nbytes for t in state_tensors(model)) - sum(per_block)
    linears = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    big = max(linears, key=lambda m: m.in_features * m.out_features, default=None)
    numel = big.in_features * big.out_features if big is not None else 0
    transient = dequant_transient_bytes(numel, dtype, big.qtype) if big is not None else 0
    return GGUFDitBytes(per_block, slot, other, numel, transient)


def converter_tensor_type(key: str, shape: tuple[int, ...], quant: str) -> QT:
    """The ggml type city96's pipeline (tools/convert.py, then llama-quantize with its
    lcpp.patch) gives a Wan DiT tensor when the file is made in ``quant`` ("Q4_K", "Q8_0",
    "F16", ...): F32 for 1-D tensors, tensors of at most 1024 values, ``.modulation`` and
    the 5-D patch embedding; F16 for ``time_embedding``; ``quant`` elsewhere, falling back
    to F16 where a row is not a whole number of ``quant``'s blocks."""
    if len(shape) == 1 or len(shape) > 4 or math.prod(shape) <= 1024 or key.endswith("modulation"):
        return QT.F32
    if "time_embedding." in key:
        return QT.F16
    target = QT[quant]
    if target in _TORCH_FLOAT:
        return target
    return target if shape[-1] % gguf.GGML_QUANT_SIZES[target][0] == 0 else QT.F16


def expected_checkpoint(config: WanConfig, quant: str, name: str | None = None) -> GGUFCheckpoint:
    """The header a ``quant`` GGUF of ``config`` made by city96's pipeline would have (no
    file): lets a planner count a model's bytes (:func:`dit_bytes`) before it is downloaded.
    Real K-quant mixes (Q4_K_M) may give some layers a larger type; a file's own header is
    exact, this is the uniform-type estimate."""
    with torch.device("meta"):
        model = WanModel(config)
    tensors, offset = {}, 0
    for key, t in model.state_dict().items():
        qtype = converter_tensor_type(key, tuple(t.shape), quant)
        nbytes = stored_bytes(t.numel(), qtype)
        tensors[key] = GGUFTensorInfo(tuple(t.shape), qtype, nbytes, offset, key)
        offset += -(-nbytes // 32) * 32
    return GGUFCheckpoint(Path(name or f"expected-{quant}.gguf"), "dit", "", "wan", tensors, {}, offset)


def block_bytes(ckpt: GGUFCheckpoint, dtype: torch.dtype = torch.bfloat16, uniform_blocks: bool = True) -> list[int]:
    """Each block's bytes once loaded: its quantised weights exactly as stored in the file
    (padded per position when ``uniform_blocks``), its biases, norms and modulation in ``dtype``."""
    return list(dit_bytes(ckpt, dtype, uniform_blocks).blocks)


# --- UMT5 text encoder ---------------------------------------------------------------------

def _t5_block_linear(key: str, shape: tuple) -> bool:
    return loading.t5_block_linear(key, shape)


def load_text_encoder_gguf(source: str | Path | GGUFCheckpoint, dtype: torch.dtype = torch.bfloat16,
                           device: torch.device | str = "cpu") -> tuple[UMT5Encoder, UMT5Tokenizer]:
    """UMT5 encoder from a llama.cpp-style T5 GGUF (city96's umt5-xxl-encoder-gguf), its
    quantised block Linears kept as :class:`GGUFLinear`, and its tokenizer.

    The tokenizer is the vocabulary stored in the GGUF (``tokenizer.ggml.*``, rebuilt as a
    SentencePiece model); a file without one takes ``spiece.model`` / ``tokenizer.json``
    from beside it (``wan.tokenizer.load_tokenizer``).
    """
    ckpt = source if isinstance(source, GGUFCheckpoint) else open_gguf(source, expect="t5")
    if ckpt.family != "t5":
        raise CheckpointError(f"{ckpt.name}: a {ckpt.family} GGUF, not a UMT5 text encoder")
    try:
        names = t5_key_map(list(ckpt.tensors))
        config = detect_t5_config({new: ckpt.tensors[old].shape for old, new in names.items()})
        tokenizer = (tokenizer_from_bytes(ckpt.tokenizer_model) if ckpt.tokenizer_model is not None
                     else load_tokenizer(ckpt.path))
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # sentencepiece raises RuntimeError
        raise CheckpointError(f"{ckpt.name}: {err}") from err
    internal = {new: ckpt.tensors[old] for old, new in names.items()}
    with torch.device("meta"):
        model = UMT5Encoder(config).to(dtype)
    _swap_in_gguf_linears(model, _quantized_plan(internal, _t5_block_linear, True), dtype)
    kept = {f"{path}.weight": m.weight.numel() for path, m in model.named_modules() if isinstance(m, GGUFLinear)}
    with ckpt.open_raw() as raw:
        tensors = _GGUFStateDict(raw, ckpt.tensors, {new: old for old, new in names.items()}, kept, dtype)
        model = loading.stream_weights(model, tensors, {}, dtype, device, ckpt.name,
                                       fp8_predicate=lambda key, shape: False)
    return model, tokenizer


__all__ = [
    "DEQUANT_CHUNK", "DEQUANT_CHUNK_CPU", "FLOAT_TYPES", "GGUFCheckpoint", "GGUFDitBytes", "GGUFLinear",
    "GGUFTensorInfo", "QUANT_TYPES", "SUPPORTED_TYPES", "block_bytes", "build_meta_dit", "dequant_transient_bytes",
    "converter_tensor_type", "dequantize", "dit_bytes", "expected_checkpoint", "gguf_version", "is_gguf", "load_dit_gguf", "load_text_encoder_gguf", "open_gguf",
    "sentencepiece_model", "stored_bytes", "t5_gguf_key", "type_name",
]
