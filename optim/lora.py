"""LoRA for the Wan DiT: read the files Wan users have, and say what each changes.

A LoRA file is matched against the model's own key names (from its checkpoint header, no
weight read) and becomes a list of :class:`Delta` per model tensor. Formats read, after one
of ``PREFIXES`` is stripped from a key:

- ComfyUI / lightx2v: ``blocks.N.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` and an
  optional ``.alpha``; full deltas ``<module>.diff`` (weight, or a bare parameter such as
  ``blocks.N.modulation``), ``<module>.diff_b`` (bias) and ``<module>.diff_m`` (its
  ``modulation``, as lightx2v writes ``blocks.N.diff_m``) for norms, biases and modulation.
- PEFT / diffusers: ``.lora_A.weight`` / ``.lora_B.weight`` (optional ``.lora_B.bias``) with the
  original module names or diffusers' ``WanTransformer3DModel`` names (``blocks.N.attn1.to_q``,
  ``ffn.net.0.proj``, ``condition_embedder.time_proj``, ``proj_out``, ...).
- kohya: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` (dots written as underscores).

Scaling, as each format defines it: ``alpha / rank`` when the file has an ``.alpha`` for the
module (ComfyUI, kohya); for PEFT files without one, ``lora_alpha / r`` from the adapter
config diffusers stores in the safetensors metadata (``lora_adapter_metadata``, with its
``rank_pattern`` / ``alpha_pattern`` and rsLoRA's ``/ sqrt(r)``); otherwise 1. Full deltas
are not scaled. A LoRA at strength ``s`` changes a weight ``W`` to
``W + s * scale * up @ down`` (reshaped to ``W``'s shape, so conv LoRAs work) plus ``s * diff``.

Two ways to apply them (``LORA_MODES``; "auto" picks merged unless the weights cannot take
a merge, e.g. GGUF):

- merged: :class:`MergedTensors` wraps the checkpoint's lazy tensors, so each patched weight
  is read, dequantised (fp8: with its scale) and patched in float32 a chunk of rows at a
  time, then rounded once to the compute dtype or, where the model stores it in fp8,
  requantised with a fresh scale (two passes: amax, then quantise): a float32 chunk of
  extra host RAM (plus the patched tensor where it is not fp8);
- unmerged: :func:`attach_unmerged` registers the factors as buffers of each Linear layer
  (so block swap moves them with their block) and a forward hook adds
  ``(x @ down.T) @ up.T`` in place to the layer's output, on nn.Linear and FP8Linear alike.
  Only Linear layers the DiT runs through their forward can take it (not the time
  embedding, time projection and head, which wan/model.py computes in float32 from the
  weight): their deltas, full deltas (norms, biases, modulation) and conv deltas are
  always merged ("fixed" deltas, all small tensors).
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..wan.checkpoint import _SAFETENSORS_DTYPES, CheckpointError, read_header
from ..wan.model import PRESETS
from . import fp8

log = logging.getLogger("WanFit")

LORA_MODES = ("auto", "merged", "unmerged")
# Stripped from a key before its module name is looked up (one of them, longest first).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.",
            "lora_unet_", "lora_transformer_", "lycoris_")
# Key endings and what they hold. "down" is A ([rank, in, ...]), "up" is B ([out, rank, ...]).
ROLES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
_FORMAT_NAMES = {".lora_down.weight": "lora_down/lora_up (ComfyUI, lightx2v)",
                 ".lora_A.weight": "lora_A/lora_B (PEFT, diffusers)", ".diff": "full deltas (.diff)",
                 ".diff_b": "full bias deltas (.diff_b)"}
_NOT_MODEL = (".scale_weight", ".scale_input")  # fp8 checkpoint scales, not model tensors
METADATA_KEY = "lora_adapter_metadata"  # diffusers: the PEFT LoraConfig as JSON

# Original Wan module names -> diffusers WanTransformer3DModel names (the renames of
# diffusers' convert_wan_transformer_to_diffusers). Block-relative names below; the rest whole.
_DIFFUSERS_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm2": "norm3", "norm3": "norm2",  # diffusers swaps the names of the cross-attn and ffn norms
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "modulation": "scale_shift_table",
}
_DIFFUSERS_TOP = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head": "proj_out", "head.modulation": "scale_shift_table",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class LoraError(CheckpointError):
    """A LoRA file that cannot be used with this model; the message names the file."""


def diffusers_name(path: str) -> str:
    """The diffusers name of an original Wan module / parameter path (itself when unchanged)."""
    if path in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[path]
    m = _BLOCK.match(path)
    if m and m.group(2) in _DIFFUSERS_BLOCK:
        return f"blocks.{m.group(1)}.{_DIFFUSERS_BLOCK[m.group(2)]}"
    return path


@dataclass(frozen=True)
class Delta:
    """One LoRA's change to one model tensor ``target`` (an internal key such as
    ``blocks.0.self_attn.q.weight``): ``scale * up @ down`` reshaped to the tensor, when
    ``up`` / ``down`` are given, and ``diff`` (a full delta) when given. Values are file keys."""

    target: str
    up: str | None = None
    down: str | None = None
    diff: str | None = None
    scale: float = 1.0
    rank: int = 0

    @property
    def low_rank(self) -> bool:
        return self.up is not None


@dataclass
class LoraFile:
    """A validated LoRA file matched to one model: header facts and the deltas, no weights."""

    path: Path
    deltas: dict[str, list[Delta]]  # target key -> deltas
    shapes: dict[str, tuple[int, ...]]  # file key -> shape
    dtypes: dict[str, torch.dtype]  # file key -> stored dtype
    targets: dict[str, tuple[int, ...]]  # model key -> shape, for every target of a delta
    formats: tuple[str, ...] = ()
    unmatched: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def key(self) -> tuple:
        """What identifies the file's contents: its path and modification time."""
        return (str(self.path), self.path.stat().st_mtime_ns)

    @property
    def max_rank(self) -> int:
        return max((d.rank for ds in self.deltas.values() for d in ds), default=0)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tensors the deltas read (in ``dtype``, or as stored)."""
        keys = {k for ds in self.deltas.values() for d in ds for k in (d.up, d.down, d.diff) if k}
        return sum(math.prod(self.shapes[k]) * (dtype or self.dtypes[k]).itemsize for k in keys)

    def open(self):
        """A ``safe_open`` handle (a context manager) on the file, for ``handle.get_tensor(key)``."""
        return safe_open(str(self.path), framework="pt", device="cpu")


def _split_role(key: str) -> tuple[str, str, str] | None:
    """(module name as written, role, key ending) of a LoRA key, or None when no role fits."""
    for suffix, role in ROLES:
        if key.endswith(suffix):
            return key[:-len(suffix)], role, suffix
    return None


def _strip(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def model_aliases(model_keys: Iterable[str]) -> dict[str, str]:
    """Every name a LoRA may use for a model module or parameter -> its internal path
    (``blocks.0.self_attn.q``): original, diffusers, and both with dots as underscores (kohya)."""
    paths = set()
    for key in model_keys:
        if key.endswith(_NOT_MODEL) or key == "scaled_fp8":
            continue
        paths.add(key.removesuffix(".weight").removesuffix(".bias") if key.endswith((".weight", ".bias")) else key)
    aliases: dict[str, str] = {}
    clashes: set[str] = set()
    for path in paths:
        for name in {path, diffusers_name(path)}:
            for alias in (name, name.replace(".", "_")):
                if aliases.get(alias, path) != path:
                    clashes.add(alias)
                aliases[alias] = path
    for alias in clashes:  # a name two modules could claim belongs to neither
        del aliases[alias]
    return aliases


def _adapter_config(metadata: Mapping[str, str]) -> dict:
    """The PEFT LoraConfig diffusers wrote into the file (prefixed ``transformer.`` when a
    pipeline saved it), or {}."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    if not isinstance(config, dict):
        return {}
    if "r" not in config and any(k.startswith("transformer.") for k in config):
        config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return config


def _pattern_value(patterns: Mapping[str, object] | None, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a pattern matches the whole module name or
    a dotted tail of it."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def _peft_scale(config: Mapping, module: str, rank: int) -> float | None:
    if "lora_alpha" not in config:
        return None
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _fits(delta_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> bool:
    return math.prod(delta_shape) == math.prod(target_shape) and delta_shape[:1] == target_shape[:1]


def read_lora_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype], dict]:
    """Validate a LoRA file's safetensors header: ``(shapes, dtypes, metadata)``, weights unread.
    Raises LoraError naming the file when it is not a readable LoRA."""
    path = Path(path)
    if not path.exists():
        raise LoraError(f"{path.name}: no such file ({path})")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise LoraError(f"{path.name}: WanFit reads .safetensors LoRAs only (pickle files can run code when "
                        "loaded); use the .safetensors release of this LoRA")
    try:
        header, metadata = read_header(path)
    except CheckpointError as err:
        raise LoraError(str(err)) from err
    shapes, dtypes = {}, {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise LoraError(f"{path.name}: tensor {key} has unsupported dtype {info.get('dtype')}")
        shapes[key], dtypes[key] = tuple(info["shape"]), dtype
    if not any(_split_role(k) for k in shapes):
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
        raise LoraError(f"{path.name}: not a LoRA: no key ends in lora_down / lora_up, lora_A / lora_B, "
                        f".diff or .diff_b (keys: {sample}, ...)")
    return shapes, dtypes, metadata


def open_lora(path: str | Path, model_shapes: Mapping[str, tuple[int, ...]], model_name: str = "this model",
              warn: bool = True) -> LoraFile:
    """Match the LoRA file ``path`` to a model given by its internal key -> shape map (a
    checkpoint's ``shapes``). Reads the header and the ``.alpha`` scalars only.

    Unmatched keys get one warning (count and three examples). No key fitting the model, or
    a key naming one of its tensors with another shape, is a LoraError that says which model
    the LoRA looks made for.
    """
    path = Path(path)
    shapes, dtypes, metadata = read_lora_header(path)
    aliases = model_aliases(model_shapes)
    targets = {k for k in model_shapes if not k.endswith(_NOT_MODEL)}
    modules: dict[str, dict[str, str]] = {}  # file module name -> role -> file key
    unknown = []
    formats = set()
    for key in shapes:
        split = _split_role(key)
        if split is None:
            unknown.append(key)
            continue
        module, role, suffix = split
        modules.setdefault(module, {})[role] = key
        formats.add(_FORMAT_NAMES.get(suffix, "") if not module.startswith("lora_unet_")
                    else "kohya (lora_unet_)")
    config = _adapter_config(metadata)
    alphas = [roles["alpha"] for roles in modules.values() if "alpha" in roles]
    alpha_values = {}
    if alphas:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            alpha_values = {k: float(f.get_tensor(k).float().reshape(-1)[0]) for k in alphas}

    deltas: dict[str, list[Delta]] = {}
    unmatched, misfit = list(unknown), []
    for module, roles in modules.items():
        internal = aliases.get(_strip(module))
        used = set()
        if "diff_m" in roles:  # the module's modulation parameter, itself a path of its own
            name = _strip(module)
            modulation = aliases.get(f"{name}.modulation") or aliases.get(f"{name}_modulation")
            if modulation is None:
                unmatched.append(roles["diff_m"])
            else:
                target = modulation
                if target in targets and _fits(shapes[roles["diff_m"]], model_shapes[target]):
                    deltas.setdefault(target, []).append(Delta(target, diff=roles["diff_m"]))
                else:
                    misfit.append((roles["diff_m"], shapes[roles["diff_m"]], target, tuple(model_shapes.get(target, ()))))
            used.add(roles["diff_m"])
            if internal is None:
                unmatched += [k for k in roles.values() if k not in used]
                continue
        if internal is None:
            unmatched += roles.values()
            continue
        weight = f"{internal}.weight" if f"{internal}.weight" in targets else internal
        bias = f"{internal}.bias"

        def add(target: str, key: str, delta: Delta, shape: tuple[int, ...]) -> None:
            if target not in targets:
                unmatched.append(key)
            elif not _fits(shape, model_shapes[target]):
                what = f"{module} ({'lora up @ down' if delta.low_rank else key.rpartition('.')[2]})"
                misfit.append((what, shape, target, tuple(model_shapes[target])))
            else:
                deltas.setdefault(target, []).append(delta)
            used.add(key)

        if "up" in roles and "down" in roles:
            up, down = roles["up"], roles["down"]
            rank = shapes[down][0]
            if len(shapes[up]) < 2 or shapes[up][1] != rank:
                misfit.append((f"{module} (lora up)", shapes[up], f"its down of rank {rank}", shapes[down]))
                used |= {up, down}
            else:
                alpha = alpha_values.get(roles.get("alpha"))
                scale = alpha / rank if alpha is not None else _peft_scale(config, _strip(module), rank)
                scale = 1.0 if scale is None else scale
                lora_shape = (shapes[up][0], *shapes[down][1:], *shapes[up][2:])
                add(weight, down, Delta(weight, up, down, None, scale, rank), lora_shape)
                used.add(up)
                if "up_bias" in roles:
                    add(bias, roles["up_bias"], Delta(bias, diff=roles["up_bias"], scale=scale),
                        shapes[roles["up_bias"]])
                if "alpha" in roles:
                    used.add(roles["alpha"])
        if "diff" in roles:
            add(weight, roles["diff"], Delta(weight, diff=roles["diff"]), shapes[roles["diff"]])
        if "diff_b" in roles:
            add(bias, roles["diff_b"], Delta(bias, diff=roles["diff_b"]), shapes[roles["diff_b"]])
        unmatched += [k for k in roles.values() if k not in used]

    if misfit or not deltas:
        raise LoraError(_mismatch_message(path.name, shapes, model_shapes, model_name, misfit, len(unmatched)))
    lora = LoraFile(path, deltas, shapes, dtypes, {t: tuple(model_shapes[t]) for t in deltas},
                    tuple(sorted(f for f in formats if f)), sorted(unmatched))
    if unmatched and warn:
        log.warning("WanFit LoRA %s: %d of its %d keys match no tensor of %s and are ignored, e.g. %s",
                    path.name, len(unmatched), len(shapes), model_name, ", ".join(lora.unmatched[:3]))
    return lora


# ----------------------------------------------------------------------------- messages

_Q = re.compile(r"blocks[._](\d+)[._](?:self_attn[._]q|attn1[._]to_q)[._]")
_FFN = re.compile(r"blocks[._]\d+[._]ffn[._](?:0|net[._]0[._]proj)[._]")


def _lora_dims(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, int | None, int, bool]:
    """(dim, ffn_dim, blocks, has CLIP k_img) a LoRA's shapes tell, whatever its naming."""
    dim = ffn = None
    blocks = 0
    for key, shape in shapes.items():
        body = _strip(key)
        if (m := _Q.search(body)) is not None:
            blocks = max(blocks, int(m.group(1)) + 1)
            split = _split_role(key)
            if split and split[1] == "down" and len(shape) == 2:
                dim = shape[1]
            elif split and split[1] == "up" and len(shape) == 2:
                dim = shape[0]
        elif _FFN.search(body) and (split := _split_role(key)) and split[1] == "up" and len(shape) == 2:
            ffn = shape[0]
    clip = any("k_img" in k or "add_k_proj" in k for k in shapes)
    return dim, ffn, blocks, clip


def _guess(dim: int | None, ffn: int | None, blocks: int, clip: bool) -> str:
    if dim is None:
        return "a model WanFit cannot tell (no self-attention q LoRA to read the width from)"
    names = [n for n, c in PRESETS.items() if c.dim == dim and (ffn is None or c.ffn_dim == ffn)
             and c.num_layers >= blocks and (c.clip or not clip)]
    detail = f"width {dim}" + (f", ffn {ffn}" if ffn else "") + (f", {blocks} blocks" if blocks else "")
    return f"{' / '.join(names)} ({detail})" if names else f"a Wan-like DiT of {detail}"


def _mismatch_message(name, shapes, model_shapes, model_name, misfit, unmatched) -> str:
    model_dim = model_shapes.get("blocks.0.self_attn.q.weight", (None,))[0]
    made_for = _guess(*_lora_dims(shapes))
    if misfit:
        key, shape, target, target_shape = misfit[0]
        what = (f"{len(misfit)} of its deltas have shapes that do not fit, e.g. {key} gives {list(shape)} for "
                f"{target} {list(target_shape)}")
    else:
        what = f"none of its {len(shapes)} keys names a tensor of the model ({unmatched} unmatched)"
    return (f"{name}: this LoRA does not fit {model_name}" + (f" (width {model_dim})" if model_dim else "")
            + f": {what}. It looks made for {made_for}.")


# ----------------------------------------------------------------------------- applying

# Linear layers wan/model.py computes in float32 straight from the weight (``_linear32``),
# so no forward hook sees them: their LoRA deltas are always merged.
FLOAT32_LINEARS = ("time_embedding.0", "time_embedding.2", "time_projection.1", "head.head")


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA file at a strength."""

    lora: LoraFile
    strength: float


def resolve_mode(mode: str, mergeable: bool = True) -> str:
    """"merged" or "unmerged" for a LoRA node's ``mode``: auto merges unless the model's
    weights cannot take a merge (``mergeable`` False: e.g. GGUF-quantised blocks)."""
    if mode not in LORA_MODES:
        raise ValueError(f"LoRA mode {mode!r}: expected one of {', '.join(LORA_MODES)}")
    if mode == "auto":
        return "merged" if mergeable else "unmerged"
    if mode == "merged" and not mergeable:
        raise ValueError("these weights cannot take a merged LoRA (e.g. GGUF); use mode unmerged or auto")
    return mode


def can_run_unmerged(target: str, shape: tuple[int, ...]) -> bool:
    """Whether a low-rank delta on model tensor ``target`` can be applied at matmul time: the
    weight of a Linear layer (2-D) that the DiT calls through its forward."""
    return len(shape) == 2 and target.endswith(".weight") and target[:-len(".weight")] not in FLOAT32_LINEARS


def is_fixed(applied: AppliedLora, delta: Delta) -> bool:
    """A delta that is always merged: full deltas, and low-rank ones no hook can apply."""
    return not (delta.low_rank and can_run_unmerged(delta.target, applied.lora.targets[delta.target]))


Patches = dict[str, list[tuple[AppliedLora, Delta]]]


def patches_of(applied: Iterable[AppliedLora], select=lambda applied, delta: True) -> Patches:
    """target -> [(LoRA, delta)] for the deltas ``select`` keeps; strength-0 LoRAs are left out,
    so they leave every tensor untouched (bit for bit)."""
    out: Patches = {}
    for a in applied:
        if a.strength == 0:
            continue
        for target, deltas in a.lora.deltas.items():
            for d in deltas:
                if select(a, d):
                    out.setdefault(target, []).append((a, d))
    return out


class _Readers:
    """One open ``safe_open`` handle per LoRA file, opened on first use."""

    def __init__(self):
        self._handles: dict[Path, object] = {}

    def __call__(self, lora: LoraFile, key: str) -> torch.Tensor:
        handle = self._handles.get(lora.path)
        if handle is None:
            handle = self._handles[lora.path] = lora.open()
        return handle.get_tensor(key)


CHUNK = 1 << 20  # elements patched in float32 at a time (4 MiB)


_SCRATCH_MIN = (1 << 20) // 4 + 1  # float32 elements: past hostmem's mmap threshold (1 MiB)


def float32_copies(*tensors: torch.Tensor, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Float32 copies of ``tensors`` (2-D, flattened from dim 1) in one buffer of at least 1 MiB.

    Why one padded buffer: LoRA factors are small (a rank-64 factor of a 5120-wide layer is
    1.3 MiB in float32, of a tiny one a few KiB). Copied one by one they come from glibc's heap,
    between the model's own small tensors loaded meanwhile, and the holes they leave stay
    resident; past the mmap threshold (``hostmem.mmap_large_allocations``) the buffer is a
    mapping of its own, returned to the system when freed."""
    shapes = [(t.shape[0], t[0].numel() if t.shape[0] else 0) for t in tensors]
    total = sum(r * c for r, c in shapes)
    buf = torch.empty(max(total, _SCRATCH_MIN), dtype=torch.float32, device=device)
    out, at = [], 0
    for t, (r, c) in zip(tensors, shapes):
        out.append(buf[at:at + r * c].view(r, c).copy_(t.reshape(r, c)))
        at += r * c
    return out


def _terms(patches: Iterable[tuple[AppliedLora, Delta]], shape: tuple[int, ...], read) -> list:
    """(strength * scale, full delta or None, up or None, down or None) per patch, factors in float32."""
    terms = []
    for a, d in patches:
        diff = None if d.diff is None else read(a.lora, d.diff).reshape(shape)
        up = down = None
        if d.low_rank:
            up, down = float32_copies(read(a.lora, d.up), read(a.lora, d.down))
        terms.append((a.strength * d.scale, diff, up, down))
    return terms


def _patched_chunks(value: torch.Tensor, terms: list, scale: float):
    """Yield (row slice, float32 rows of ``value * scale + deltas``) over ``value`` viewed as 2-D,
    ``CHUNK`` elements at a time; low-rank deltas enter as ``up[rows] @ down``."""
    flat = value.reshape(1, -1) if value.ndim < 2 else value
    step = max(1, CHUNK // max(1, flat[0].numel()))
    for r0 in range(0, flat.shape[0], step):
        rows = slice(r0, r0 + step)
        w = flat[rows].to(torch.float32, copy=True)
        if scale != 1.0:
            w.mul_(scale)
        for s, diff, up, down in terms:
            if diff is not None:
                w.add_(diff.reshape(flat.shape)[rows].to(torch.float32), alpha=s)
            if up is not None:
                w.view(w.shape[0], -1).addmm_(up[rows], down, alpha=s)
        yield rows, w


def _scale_of(value: torch.Tensor, scale) -> float:
    if scale is None or not fp8.is_fp8(value.dtype):
        return 1.0
    return float(scale.item() if isinstance(scale, torch.Tensor) else scale)


def merge(value: torch.Tensor, patches: Iterable[tuple[AppliedLora, Delta]], dtype: torch.dtype = torch.float32,
          scale: torch.Tensor | float | None = None, read=None) -> torch.Tensor:
    """``value + sum(strength * delta)`` computed in float32 a few rows at a time and rounded
    once to ``dtype``: the transient memory is the ``dtype`` result and one float32 chunk. An
    fp8 ``value`` is dequantised with ``scale`` first. Full deltas (``diff``) are read whole
    (they patch small tensors: norms, biases, modulation)."""
    terms = _terms(patches, value.shape, read or _Readers())
    flat_shape = (1, value.numel()) if value.ndim < 2 else value.shape
    out = torch.empty(flat_shape, dtype=dtype)
    for rows, w in _patched_chunks(value, terms, _scale_of(value, scale)):
        out[rows] = w
    return out.reshape(value.shape)


def merge_fp8(value: torch.Tensor, patches: Iterable[tuple[AppliedLora, Delta]], fmt: torch.dtype,
              scale: torch.Tensor | float | None = None, read=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge`` straight into fp8: ``(w8, scale)`` with a fresh per-tensor scale
    ``amax / fp8_max`` of the patched float32 weight, as ``fp8.quantize_weight`` defines it.
    Two passes over the rows (the first finds amax), so no full-size copy of the weight
    exists besides the fp8 result: the transient memory is one float32 chunk."""
    terms = _terms(patches, value.shape, read or _Readers())
    dequant, fmax = _scale_of(value, scale), fp8.FP8_MAX[fmt]
    amax = torch.zeros((), dtype=torch.float32)
    for _, w in _patched_chunks(value, terms, dequant):
        lo, hi = w.aminmax()
        amax = torch.maximum(amax, torch.maximum(lo.abs(), hi.abs()))
    new_scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    w8 = torch.empty(value.shape, dtype=fmt)
    flat = w8.view(1, -1) if value.ndim < 2 else w8
    for rows, w in _patched_chunks(value, terms, dequant):
        flat[rows] = w.div_(new_scale).clamp_(-fmax, fmax)
    return w8, new_scale


def delta_tensor(patches: Iterable[tuple[AppliedLora, Delta]], shape: tuple[int, ...]) -> torch.Tensor:
    """The summed float32 delta of ``patches`` for a tensor of ``shape`` (for checks and tests)."""
    return merge(torch.zeros(shape), patches)


class MergedTensors(Mapping):
    """A model's lazy ``{key: tensor}`` view (see ``loading.LazyStateDict``) with LoRA deltas
    added as each tensor is read.

    A patched tensor is dequantised (fp8: with its ``<layer>.scale_weight``) and patched in
    float32 a chunk of rows at a time. Weights the model stores in fp8 (``fp8_keys``) come
    back requantised with a fresh per-tensor scale, served as that layer's ``scale_weight``
    (its file ``scale_input`` is dropped); the rest come back in ``dtype``, the loader's
    compute dtype. Other tensors pass through untouched. While a model streams, the extra
    host memory is a float32 chunk, plus the patched tensor itself where it is not fp8.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], patches: Patches, dtype: torch.dtype = torch.float32,
                 fp8_keys: Mapping[str, torch.dtype] | None = None):
        self._tensors, self._patches, self._dtype = tensors, patches, dtype
        self._fp8 = {k: v for k, v in (fp8_keys or {}).items() if k in patches}
        self._scales: dict[str, torch.Tensor] = {}  # layer -> fresh scale of its requantised weight
        self._read = _Readers()
        self.merged: list[str] = []  # keys patched so far, in order

    @property
    def targets(self) -> set[str]:
        """The keys this view patches."""
        return set(self._patches)

    def __getitem__(self, key: str) -> torch.Tensor:
        owner, _, attr = key.rpartition(".")
        weight = f"{owner}.weight"
        if attr in ("scale_weight", "scale_input") and weight in self._fp8:
            if attr == "scale_input":  # a scale for the old weight's inputs: dropped with it
                raise KeyError(key)
            if owner not in self._scales:
                self[weight]
            return self._scales[owner]
        value = self._tensors[key]
        patches = self._patches.get(key)
        if not patches:
            return value
        scale = self._tensors.get(f"{owner}.scale_weight") if fp8.is_fp8(value.dtype) else None
        self.merged.append(key)
        if key in self._fp8:
            w8, self._scales[owner] = merge_fp8(value, patches, self._fp8[key], scale, self._read)
            return w8
        return merge(value, patches, self._dtype, scale, self._read)

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def merge_host_bytes(patches: Patches, dtype: torch.dtype, fp8_keys: Iterable[str] = ()) -> int:
    """Host bytes a merged load holds on top of an unpatched one, at its peak: one float32
    chunk and a tensor's factors in float32, plus the patched tensor in ``dtype`` where the
    model does not store it in fp8 (``fp8_keys``: the fp8 result is what a plain load holds too)."""
    fp8_keys, peak = set(fp8_keys), 0
    for target, items in patches.items():
        numel = math.prod(items[0][0].lora.targets[target])
        factors = sum(math.prod(x.lora.shapes[k]) for x, d in items for k in (d.up, d.down) if k)
        own = 0 if target in fp8_keys else numel * dtype.itemsize
        peak = max(peak, own + 4 * (min(numel, CHUNK) + factors))
    return peak


# ----------------------------------------------------------------------------- unmerged


def _lora_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: ``output += (x @ down.T) @ up.T``, the strength and scale already in ``up``."""
    x = args[0]
    down, up = module.lora_down, module.lora_up
    if down.dtype != x.dtype:
        down, up = down.to(x.dtype), up.to(x.dtype)
    xa = F.linear(x, down)
    if output.is_contiguous() and output.dtype == xa.dtype:
        output.view(-1, output.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), up.t())
        return output
    return output + F.linear(xa, up).to(output.dtype)


@dataclass
class UnmergedLora:
    """LoRA factors living on a model's Linear layers (buffers ``lora_down`` [R, in] and
    ``lora_up`` [out, R]) and the forward hooks that apply them.

    Within the blocks every block gets the same buffers (each layer padded with zeros to the
    largest rank any block has there), so swapped blocks keep one layout and
    ``BlockSwapper`` packs the factors with their block. Zero padding adds exact zeros.
    """

    layers: dict[str, nn.Module]
    block_bytes: list[int]  # per block (all equal)
    other_bytes: int  # outside the blocks (text embedding, CLIP image projection)
    max_rank: int
    dtype: torch.dtype
    _hooks: list = field(default_factory=list)

    def activation_bytes(self, tokens: int, batch: int = 1) -> int:
        """Transient bytes of the hooks at one call: ``x @ down.T`` for the widest rank (the
        product with ``up`` is added into the layer's output in place)."""
        return tokens * batch * self.max_rank * self.dtype.itemsize

    def remove(self) -> None:
        """Take the hooks and buffers off the model."""
        for hook in self._hooks:
            hook.remove()
        for layer in self.layers.values():
            layer._buffers.pop("lora_down", None)
            layer._buffers.pop("lora_up", None)
        self._hooks.clear()
        self.layers.clear()


def combine(applied: Iterable[AppliedLora]) -> list[AppliedLora]:
    """The same LoRAs with one entry per file (strengths summed), zero strengths dropped."""
    total: dict[tuple, list] = {}
    for a in applied:
        entry = total.setdefault((str(a.lora.path), a.lora.path.stat().st_mtime_ns), [a.lora, 0.0])
        entry[1] += a.strength
    return [AppliedLora(lora, s) for lora, s in total.values() if s != 0]


def difference(wanted: Iterable[AppliedLora], merged: Iterable[AppliedLora]) -> list[AppliedLora]:
    """What must run unmerged on weights that carry ``merged`` so they act as ``wanted``."""
    negated = [AppliedLora(a.lora, -a.strength) for a in merged]
    return combine([*wanted, *negated])


def attach_unmerged(model: nn.Module, applied: Iterable[AppliedLora], dtype: torch.dtype) -> UnmergedLora:
    """Register the low-rank deltas of ``applied`` that can run unmerged on ``model``'s Linear
    layers, as buffers on the device of each layer's weight, with forward hooks.

    Works on a meta-device model too (e.g. the planner's): the buffers are then meta tensors
    of the right shapes and nothing is read, so ``block_bytes`` / ``other_bytes`` /
    ``activation_bytes`` count what the real thing would hold. Blocks the LoRA names but
    ``model`` lacks (a model built with fewer blocks) are skipped; the padding is still
    computed over every block the LoRA names.
    """
    patches = patches_of(applied, lambda a, d: not is_fixed(a, d))
    ranks: dict[str, int] = {}  # block-relative layer path -> padded rank
    for target, items in patches.items():
        m = _BLOCK.match(target[:-len(".weight")])
        if m:
            ranks[m.group(2)] = max(ranks.get(m.group(2), 0), sum(d.rank for _, d in items))
    layers_wanted = {t[:-len(".weight")]: items for t, items in patches.items()}
    blocks = getattr(model, "blocks", [])
    for i in range(len(blocks)):
        for rel in ranks:
            layers_wanted.setdefault(f"blocks.{i}.{rel}", [])

    read = _Readers()
    result = UnmergedLora({}, [0] * len(blocks), 0, max(ranks.values(), default=0), dtype)
    for path, items in sorted(layers_wanted.items()):
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            continue
        m = _BLOCK.match(path)
        rank = ranks[m.group(2)] if m else sum(d.rank for _, d in items)
        device = layer.weight.device
        down = torch.zeros(rank, layer.in_features, dtype=dtype, device=device)
        up = torch.zeros(layer.out_features, rank, dtype=dtype, device=device)
        if device.type != "meta":
            at = 0
            for a, d in items:
                factor_up, factor_down = float32_copies(read(a.lora, d.up), read(a.lora, d.down))
                down[at:at + d.rank] = factor_down
                up[:, at:at + d.rank] = factor_up.mul_(a.strength * d.scale)
                at += d.rank
                del factor_up, factor_down
        layer.register_buffer("lora_down", down, persistent=False)
        layer.register_buffer("lora_up", up, persistent=False)
        result._hooks.append(layer.register_forward_hook(_lora_hook))
        result.layers[path] = layer
        nbytes = down.nbytes + up.nbytes
        if m:
            result.block_bytes[int(m.group(1))] += nbytes
        else:
            result.other_bytes += nbytes
            result.max_rank = max(result.max_rank, rank)
    return result
