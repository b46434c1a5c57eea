"""Lazy loading: build a model on the meta device, then stream its tensors one at a time
from the memory-mapped file, cast or quantised on the way, straight to their device.

No full-model copy is made in host RAM: each tensor is read from the mmap, converted and
placed, and the file's copy is dropped before the next is read. fp8 block weights stay fp8
(with their per-tensor scale) or are quantised here, before they reach the device.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from safetensors import safe_open
from torch import nn

from ..wan.checkpoint import Checkpoint, CheckpointError
from ..wan.clip_vision import ClipVisionEncoder, convert_clip_vision_state_dict, detect_clip_vision_config
from ..wan.detect import detect_dit_config
from ..wan.model import WanModel
from ..wan.t5 import UMT5Encoder, detect_t5_config, t5_key_map
from ..wan.tokenizer import UMT5Tokenizer, load_tokenizer
from ..wan.vae import build_vae, detect_vae_config
from ..wan.vae_common import WanVAE
from . import fp8, hostmem

# Weight formats a user can ask for; "auto" keeps what the file stores.
WEIGHT_FORMATS = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_e5m2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")
Placement = torch.device | str | Callable[[str], torch.device | str]
"""One device for every tensor, or ``name -> device`` (e.g. resident blocks on the GPU,
swapped blocks on the host) so each tensor goes straight where it will live."""


class LazyStateDict(Mapping):
    """A read-only ``{internal key: tensor}`` view of an open safetensors file.

    ``names`` maps internal key -> key in the file (prefix included). A tensor is read from
    the mmap when it is looked up, never before.
    """

    def __init__(self, handle, names: Mapping[str, str]):
        self._handle, self._names = handle, dict(names)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(self._names[key])

    def __contains__(self, key: object) -> bool:
        # Mapping's default looks the key up, which would read the tensor to answer.
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@contextmanager
def open_lazy(ckpt: Checkpoint, rename: Callable[[list[str]], Mapping[str, str]] | None = None):
    """Yield a LazyStateDict of ``ckpt``; ``rename`` maps file keys (prefix stripped) to internal."""
    keys = list(ckpt.tensors)
    renamed = rename(keys) if rename else {k: k for k in keys}
    with safe_open(str(ckpt.path), framework="pt", device="cpu") as handle:
        yield LazyStateDict(handle, {new: ckpt.prefix + old for old, new in renamed.items()})


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` of ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    if attr in parent._parameters:
        parent._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        parent._buffers[attr] = value


def _convert_fp8_layers(module: nn.Module, info: Mapping[str, torch.dtype],
                        predicate: Callable[[str, tuple], bool], target: torch.dtype | None,
                        dtype: torch.dtype) -> set[str]:
    """Swap meta ``nn.Linear`` layers for meta ``FP8Linear`` where the weight will be fp8; returns
    the paths of every ``FP8Linear`` (also those converted by an earlier call)."""
    converted = {path for path, layer in module.named_modules() if isinstance(layer, fp8.FP8Linear)}
    for path, layer in list(module.named_modules()):
        if type(layer) is not nn.Linear:
            continue
        key = f"{path}.weight"
        file_dtype = info.get(key)
        if file_dtype is None or not predicate(key, tuple(layer.weight.shape)):
            continue
        fmt = target if target is not None else (file_dtype if fp8.is_fp8(file_dtype) else None)
        if fmt is None:
            continue
        new = fp8.FP8Linear(layer.in_features, layer.out_features, layer.bias is not None, fmt, dtype, "meta")
        _set_submodule(module, path, new)
        converted.add(path)
    return converted


def _set_submodule(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)


def stream_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor], info: Mapping[str, torch.dtype],
                   dtype: torch.dtype, device: Placement, source: str,
                   fp8_target: torch.dtype | None = None, fp8_scaled: bool = True,
                   fp8_predicate: Callable[[str, tuple], bool] = fp8.should_quantize) -> nn.Module:
    """Fill a meta-device ``module`` from ``tensors`` one tensor at a time.

    ``info`` gives each key's stored dtype (from the header, no read). Linear weights passing
    ``fp8_predicate`` become ``FP8Linear``: kept as stored when the file is fp8 of the wanted
    format, else quantised to ``fp8_target`` (per-tensor scale, or scale 1 when
    ``fp8_scaled`` is False). Every other tensor is dequantised / cast to ``dtype``.
    ``device`` may map each tensor name to its device. ``source`` names the file in errors.
    """
    place = device if callable(device) else (lambda name: device)
    hostmem.mmap_large_allocations()  # freed transients go back to the OS, not into heap holes
    fp8_layers = _convert_fp8_layers(module, info, fp8_predicate, fp8_target, dtype)
    names = list(module.state_dict(keep_vars=True))
    missing = [n for n in names if n not in tensors and not n.endswith(_SCALE_SUFFIXES)]
    if missing:
        raise CheckpointError(f"{source}: missing {len(missing)} tensors the model needs, e.g. "
                              f"{', '.join(missing[:3])}")
    for name in names:
        owner, _, attr = name.rpartition(".")
        if owner in fp8_layers and attr in ("scale_weight", "scale_input"):
            continue  # set together with the weight
        value = tensors[name]
        if owner in fp8_layers and attr == "weight":
            _load_fp8_weight(module.get_submodule(owner), value, tensors, owner, fp8_target, fp8_scaled,
                             place(name))
            continue
        if fp8.is_fp8(value.dtype):
            value = fp8.dequantize(value, tensors.get(f"{owner}.scale_weight", 1.0), dtype)
        elif value.is_floating_point():
            value = value.to(dtype)
        set_tensor(module, name, value.to(place(name)))
    leftovers = [n for n, t in module.state_dict(keep_vars=True).items() if t is not None and t.is_meta]
    if leftovers:
        raise CheckpointError(f"{source}: tensors left unloaded: {', '.join(leftovers[:3])}")
    return module.eval().requires_grad_(False)


def _load_fp8_weight(layer: fp8.FP8Linear, value: torch.Tensor, tensors: Mapping[str, torch.Tensor], owner: str,
                     target: torch.dtype | None, scaled: bool, device) -> None:
    scale = tensors.get(f"{owner}.scale_weight")
    if fp8.is_fp8(value.dtype) and (target is None or target == value.dtype):
        w8 = value
        scale = torch.ones(()) if scale is None else scale.reshape(()).float()
    else:
        w = fp8.dequantize(value, 1.0 if scale is None else scale, torch.float32) if fp8.is_fp8(value.dtype) \
            else value  # quantize_weight upcasts chunk by chunk
        target = target or layer.weight.dtype  # e.g. an fp8 file's weight with a LoRA merged in
        if scaled:
            w8, scale = fp8.quantize_weight(w, target)
        else:  # plain cast, as ComfyUI's weight_dtype fp8: no scale, values past the range clamp
            limit = fp8.FP8_MAX[target]
            w8, scale = w.clamp(-limit, limit).to(target), torch.ones(())
    layer.weight = nn.Parameter(w8.to(device), requires_grad=False)
    layer.scale_weight = scale.to(device)
    layer._scale = float(scale)
    scale_input = tensors.get(f"{owner}.scale_input")
    layer.scale_input = None if scale_input is None or w8 is not value else scale_input.reshape(()).float().to(device)


def _fp8_plan(weight_format: str) -> tuple[torch.dtype | None, bool]:
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    if weight_format.startswith("fp8_"):
        return fp8.fp8_dtype(weight_format.removesuffix("_scaled")), weight_format != "fp8_e4m3fn"
    return None, True


Transform = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.dtype]], Mapping[str, torch.Tensor]]
"""``transform(tensors, fp8_keys)`` wraps the lazy tensors of a checkpoint, e.g. to merge a LoRA
into each weight as it is read; ``fp8_keys`` maps the weights the model stores in fp8 to their
fp8 dtype (a wrapper may hand those on already quantised, with their ``scale_weight``)."""


def _fp8_predicate(weight_format: str) -> Callable[[str, tuple], bool]:
    if weight_format in DTYPES:
        return lambda key, shape: False  # dequantise every fp8 tensor
    return fp8.should_quantize


def load_dit(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16, weight_format: str = "auto",
             device: Placement = "cpu", attention: str = "auto", transform: Transform | None = None) -> WanModel:
    """Build the Wan DiT in ``ckpt``: shapes detected from the header, weights streamed.

    ``weight_format``: "auto" keeps fp8 block weights as stored and casts the rest to
    ``dtype``; "bf16" / "fp16" / "fp32" dequantise everything; "fp8_*" quantises the block
    Linears (norms, biases, embeddings, modulation and head stay in ``dtype``). ``transform``
    (see ``Transform``) wraps the file's tensors; what it hands on is loaded as if stored so:
    a float tensor is cast or quantised, an fp8 one kept with its ``scale_weight``.
    """
    target, scaled = _fp8_plan(weight_format)
    predicate = _fp8_predicate(weight_format)
    try:
        config = detect_dit_config(ckpt.shapes)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.name}: {err}") from err
    with torch.device("meta"):
        model = WanModel(config, attention_backend=attention)
    info = {k: v.dtype for k, v in ckpt.tensors.items()}
    dtype = DTYPES.get(weight_format, dtype)
    fp8_layers = _convert_fp8_layers(model, info, predicate, target, dtype)
    fp8_keys = {f"{path}.weight": model.get_submodule(path).weight.dtype for path in fp8_layers}
    with open_lazy(ckpt) as tensors:
        return stream_weights(model, transform(tensors, fp8_keys) if transform else tensors, info, dtype, device,
                              ckpt.name, fp8_target=target, fp8_scaled=scaled, fp8_predicate=predicate)


def reload_dit_tensors(model: WanModel, ckpt: Checkpoint, names: list[str], dtype: torch.dtype = torch.bfloat16,
                       weight_format: str = "auto", transform: Transform | None = None) -> None:
    """Read the tensors ``names`` of a loaded DiT from ``ckpt`` again, as ``load_dit`` with the
    same arguments would (``transform`` too), each onto the device it is on now. Used to
    redo what a LoRA merged into a few small tensors without reading the rest of the file.
    Parameter and buffer objects are replaced: detach any block swap first."""
    target, scaled = _fp8_plan(weight_format)
    dtype = DTYPES.get(weight_format, dtype)
    fp8_keys = {f"{path}.weight": layer.weight.dtype for path, layer in model.named_modules()
                if isinstance(layer, fp8.FP8Linear)}
    with open_lazy(ckpt) as tensors:
        tensors = transform(tensors, fp8_keys) if transform else tensors
        for name in names:
            owner, _, attr = name.rpartition(".")
            layer = model.get_submodule(owner) if owner else model
            current = getattr(layer, attr)
            value = tensors[name]
            if isinstance(layer, fp8.FP8Linear) and attr == "weight":
                _load_fp8_weight(layer, value, tensors, owner, target, scaled, current.device)
                continue
            if fp8.is_fp8(value.dtype):
                value = fp8.dequantize(value, tensors.get(f"{owner}.scale_weight", 1.0), dtype)
            set_tensor(model, name, value.to(device=current.device, dtype=current.dtype))


def loaded_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes the model in ``ckpt`` takes once loaded: fp8 tensors, scalars (fp8 scales) and
    non-float tensors as stored, every other tensor in ``dtype``."""
    total = 0
    for t in ckpt.tensors.values():
        numel = t.nbytes // t.dtype.itemsize
        keep = fp8.is_fp8(t.dtype) or not t.dtype.is_floating_point or numel <= 1
        total += t.nbytes if keep else numel * dtype.itemsize
    return total


def t5_block_linear(key: str, shape: tuple) -> bool:
    return key.startswith("blocks.") and len(shape) == 2 and ".pos_embedding." not in key


def load_text_encoder(ckpt: Checkpoint, dtype: torch.dtype = torch.bfloat16,
                      device: torch.device | str = "cpu") -> tuple[UMT5Encoder, UMT5Tokenizer]:
    """UMT5 encoder (fp8 block weights kept fp8) and its tokenizer (from the file or beside it)."""
    try:
        tokenizer = load_tokenizer(ckpt.path)
        names = t5_key_map(list(ckpt.tensors))
        config = detect_t5_config({new: ckpt.tensors[old].shape for old, new in names.items()})
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(f"{ckpt.name}: {err}") from err
    with torch.device("meta"):
        model = UMT5Encoder(config)
    info = {new: ckpt.tensors[old].dtype for old, new in names.items()}
    with open_lazy(ckpt, t5_key_map) as tensors:
        model = stream_weights(model, tensors, info, dtype, device, ckpt.name, fp8_predicate=t5_block_linear)
    return model, tokenizer


def load_clip_vision(ckpt: Checkpoint, dtype: torch.dtype = torch.float16,
                     device: torch.device | str = "cpu") -> ClipVisionEncoder:
    """CLIP ViT-H/14 vision tower in any supported key layout."""
    with open_lazy(ckpt) as tensors:
        try:
            sd = convert_clip_vision_state_dict(tensors)  # reads the vision tower's tensors only
            config = detect_clip_vision_config({k: v.shape for k, v in sd.items()})
        except ValueError as err:
            raise CheckpointError(f"{ckpt.name}: {err}") from err
    with torch.device("meta"):
        model = ClipVisionEncoder(config)
    info = {k: v.dtype for k, v in sd.items()}
    return stream_weights(model, sd, info, dtype, device, ckpt.name, fp8_predicate=lambda k, s: False)


def load_vae(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> WanVAE:
    """Wan 2.1 (z 16) or Wan 2.2 (z 48) VAE, version told from the shapes."""
    try:
        config = detect_vae_config(ckpt.shapes)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.name}: {err}") from err
    with torch.device("meta"):
        model = build_vae(config)
    info = {k: v.dtype for k, v in ckpt.tensors.items()}
    with open_lazy(ckpt) as tensors:
        return stream_weights(model, tensors, info, dtype, device, ckpt.name, fp8_predicate=lambda k, s: False)
