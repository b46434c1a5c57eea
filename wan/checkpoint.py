"""Open a model file without reading its weights: validate it, tell what it is, stream tensors.

A Checkpoint is the light handle a loader node returns: the safetensors header is parsed
and checked against the file size (a truncated download fails here, by name), the key
prefix ComfyUI files carry is stripped, and the model family is told from the key names.
Tensors are read one at a time from the memory-mapped file only when a model is built.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

# Prefixes seen in ComfyUI / Comfy-Org / kijai files, stripped before anything looks at keys.
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "first_stage_model.")

# Keys each family always has (after prefix stripping), one signature per known layout.
FAMILY_SIGNATURES = (
    ("dit", ("patch_embedding.weight", "head.head.weight")),
    ("vae", ("encoder.conv1.weight", "decoder.conv1.weight")),
    ("t5", ("encoder.block.0.layer.0.SelfAttention.q.weight",)),  # transformers / Comfy-Org
    ("t5", ("blocks.0.attn.q.weight", "token_embedding.weight")),  # official Wan .pth layout
    ("clip_vision", ("vision_model.embeddings.patch_embedding.weight",)),  # transformers
    ("clip_vision", ("visual.conv1.weight",)),  # open_clip
)
FAMILY_NAMES = {
    "dit": "a Wan diffusion model (DiT)",
    "vae": "a Wan VAE",
    "t5": "a UMT5-XXL text encoder",
    "clip_vision": "a CLIP vision encoder (ViT-H/14)",
}

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and what was expected."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class HeaderFacts:
    """What a model file's header tells, for any format whose ``tensors`` map keys to
    infos with ``shape``, ``dtype`` and ``nbytes`` (safetensors here, GGUF in optim/gguf)."""

    path: Path
    tensors: Mapping

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtypes(self) -> dict[torch.dtype, int]:
        """Bytes stored per dtype, e.g. to tell an fp8 file from a bf16 one (GGUF: ``torch.uint8``
        for all quantised types)."""
        out: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            out[info.dtype] = out.get(info.dtype, 0) + info.nbytes
        return out


@dataclass
class Checkpoint(HeaderFacts):
    """A validated safetensors file: header facts only, weights left on disk."""

    path: Path
    family: str
    prefix: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    def iter_tensors(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (key without prefix, tensor) one at a time from the memory-mapped file."""
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            for key in keys if keys is not None else list(self.tensors):
                yield key, f.get_tensor(self.prefix + key)

    def get_tensor(self, key: str) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            return f.get_tensor(self.prefix + key)


MAX_HEADER_BYTES = 16 * 2**20  # a Wan 14B DiT's header is about 150 KB; no model file needs 16 MiB


def read_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Parse and check a safetensors header; raise CheckpointError naming the file if broken.

    Checked as the safetensors format defines it, so that a file passing here also loads:
    a JSON object of tensors, each with a known dtype, a shape of non-negative integers and
    two data offsets; each tensor's byte range is its shape times its dtype's size; the
    ranges follow each other from 0 without gaps or overlaps and end where the file does.
    """
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: file is {size} bytes, too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= 1 or 8 + header_len > size:
                raise CheckpointError(
                    f"{name}: not a safetensors file (header length {header_len} does not fit a "
                    f"{size}-byte file); expected a .safetensors model")
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{name}: its header claims {header_len:,} bytes; a model file's header is "
                                      f"under {MAX_HEADER_BYTES // 2**20} MiB, so this is not a model WanFit can read")
            raw = f.read(header_len)
    except OSError as err:
        raise CheckpointError(f"{name}: cannot read ({err.strerror or err})") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{name}: not a safetensors file (header is not JSON); "
                              "expected a .safetensors model") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{name}: broken safetensors header: __metadata__ must map names to strings")
    _check_entries(name, header, size - 8 - header_len)
    return header, metadata


def _check_entries(name: str, header: dict, data_size: int) -> None:
    ranges = []
    for key, info in header.items():
        def broken(what: str) -> CheckpointError:
            return CheckpointError(f"{name}: broken safetensors header: tensor {key!r} {what}")
        if not isinstance(info, dict):
            raise broken("is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise broken("has no dtype")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
            raise broken(f"has unknown dtype {dtype!r} (known: {', '.join(_SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise broken(f"has shape {shape!r}; expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise broken(f"has data_offsets {offsets!r}; expected [begin, end] with 0 <= begin <= end")
        expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise broken(f"is {dtype} {shape} ({expected:,} bytes) but its data_offsets span "
                         f"{offsets[1] - offsets[0]:,} bytes")
        ranges.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(ranges):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves a gap of {begin - end:,} bytes"
            raise CheckpointError(f"{name}: broken safetensors header: tensor {key!r} at byte {begin:,} {what}")
        end = stop
    if end > data_size:
        raise CheckpointError(
            f"{name}: truncated: the header promises {end:,} bytes of tensor data, the file has {data_size:,}; "
            "download it again")
    if end < data_size:
        raise CheckpointError(f"{name}: broken safetensors file: {data_size - end:,} bytes after its last tensor")


def repeated_block_shapes(one_block: torch.nn.Module, num_layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor shape of a model with ``num_layers`` blocks, from ``one_block`` (the same
    model built with one block, e.g. on the meta device): ``blocks.0.*`` repeated per block."""
    shapes = {}
    for key, t in one_block.state_dict().items():
        if key.startswith("blocks.0."):
            for i in range(num_layers):
                shapes[f"blocks.{i}.{key[len('blocks.0.'):]}"] = tuple(t.shape)
        else:
            shapes[key] = tuple(t.shape)
    return shapes


def check_shapes(name: str, what: str, expected: Mapping[str, Sequence[int]],
                 found: Mapping[str, Sequence[int]], file_keys: Mapping[str, str] | None = None) -> None:
    """Raise CheckpointError naming the file when a tensor ``what`` (e.g. "a Wan2.2 I2V-A14B
    expert") needs is missing from ``found`` or has another shape. Extra tensors are ignored:
    loaders read only what the model has. ``file_keys``: the file's own name of a renamed
    tensor, which the message gives (a user can find that one in the file)."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"{name}: {what} needs {len(missing)} tensors this file lacks, e.g. "
                              f"{', '.join(missing[:3])}")
    wrong = [k for k in expected if tuple(found[k]) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        key = (file_keys or {}).get(k, k)
        raise CheckpointError(f"{name}: tensor {key} has shape {list(found[k])}, but {what} needs "
                              f"{list(expected[k])}{more}")


def _split_prefix(keys: list[str]) -> str:
    for prefix in KNOWN_PREFIXES:
        if keys and sum(k.startswith(prefix) for k in keys) >= 0.9 * len(keys):
            stripped = {k[len(prefix):] for k in keys if k.startswith(prefix)}
            if classify(stripped) is not None:
                return prefix
    return ""


def classify(keys: set[str]) -> str | None:
    """The model family a key set belongs to, or None."""
    for family, signature in FAMILY_SIGNATURES:
        if all(k in keys for k in signature):
            return family
    return None


def open_checkpoint(path: str | Path, expect: str | None = None) -> Checkpoint:
    """Validate ``path`` and return its Checkpoint; ``expect`` names the family a loader needs."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path.name}: no such file ({path})")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise CheckpointError(
            f"{path.name}: WanFit reads .safetensors files only (pickle checkpoints can run code "
            "when loaded); use the .safetensors release of this model")
    header, metadata = read_header(path)
    keys = list(header)
    prefix = _split_prefix(keys)
    tensors = {}
    for key, info in header.items():
        if not key.startswith(prefix):
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        tensors[key[len(prefix):]] = TensorInfo(tuple(info["shape"]), dtype, int(end) - int(start))
    family = classify(set(tensors))
    if family is None:
        wanted = FAMILY_NAMES.get(expect, "a Wan model, VAE, UMT5 text encoder or CLIP vision encoder")
        sample = ", ".join(sorted(tensors)[:4]) or "no tensors"
        raise CheckpointError(f"{path.name}: not {wanted}: its keys ({sample}, ...) match no known layout")
    if expect is not None and family != expect:
        raise CheckpointError(
            f"{path.name}: this is {FAMILY_NAMES[family]}, but this loader needs {FAMILY_NAMES[expect]}")
    return Checkpoint(path, family, prefix, tensors, metadata)
