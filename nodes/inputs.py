"""Every WanFit node checks what it receives against its own INPUT_TYPES before any work.

ComfyUI checks a prompt's literal values against the same declaration at /prompt (type,
min / max, choices), but not everywhere: the 2024 ComfyUI skips nodes reached only through
optional inputs, and no version looks at what arrives over a link (a plain number where an
IMAGE_EMBEDS link belongs, or an optional input linked to the wrong kind of node). So each
node's inputs go through :func:`check` when it runs: values are converted as ComfyUI's
validation converts them (``int()``, ``float()``, ``str()``), so the two never drift, then
checked against min / max and the choices, and linked objects against their socket type.
A problem raises ValueError in the pack's style, "WanFit - steps 1000000000: ...".
"""
from __future__ import annotations

import functools
import math

import torch

PREFIX = "WanFit - "
REFUSED_LINK = "[refused link]"  # what graph.shield puts where a link could not be followed
CHOICES_SHOWN = 8


def show(value) -> str:
    """A value as a message shows it: short, one line, ASCII (any console prints it), whatever
    a client sent; an object that came over a link by its type only (its repr could hold the
    server's paths)."""
    if value is not None and not isinstance(value, (bool, int, float, str, list, tuple, dict)):
        return f"(a {type(value).__name__})"
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _socket_types() -> dict[str, tuple[type, ...]]:
    """Socket type -> the Python classes its values are (our own, and the core ones we take)."""
    from ..optim.context import ContextWindows
    from ..optim.files import ModelFile
    from ..optim.step_cache import CacheSettings
    from ..optim.tiling import TilingOptions
    from ..wan.checkpoint import Checkpoint
    from .load import ModelHandle, VAEHandle
    from .types import ImageEmbeds, TextEmbeds

    return {
        "WANFIT_MODEL": (ModelHandle,), "WANFIT_VAE": (VAEHandle,), "WANFIT_TEXT_ENCODER": ModelFile.__args__,
        "WANFIT_CLIP_VISION": (Checkpoint,), "WANFIT_TEXT_EMBEDS": (TextEmbeds,),
        "WANFIT_IMAGE_EMBEDS": (ImageEmbeds,), "WANFIT_STEP_CACHE": (CacheSettings,),
        "WANFIT_CONTEXT_WINDOWS": (ContextWindows,), "WANFIT_VAE_TILING": (TilingOptions,),
        "LATENT": (dict,), "IMAGE": (torch.Tensor,),
    }


def _socket_problem(kind: str, value) -> str | None:
    """Why ``value`` is not a ``kind`` socket's value (None: it is, or the type is not ours to know)."""
    expected = _socket_types().get(kind)
    if expected is None:
        return None
    if isinstance(value, expected):
        if kind == "LATENT" and not isinstance(value.get("samples"), torch.Tensor):
            return "a LATENT without samples"
        if kind == "IMAGE" and value.ndim != 4:
            return f"an IMAGE is [frames, height, width, channels]; got shape {tuple(value.shape)}"
        return None
    if value is None:
        return f"nothing arrived (connect a node giving {kind})"
    if isinstance(value, (bool, int, float, str, list, dict)):
        return f"a plain value where a link from a node giving {kind} belongs"
    return f"a {type(value).__name__} arrived where {kind} belongs (linked to the wrong kind of node?)"


def convert(name: str, spec, value, required: bool = True):
    """``value`` as ComfyUI's validation converts it for the input declared by ``spec``;
    ValueError naming the input when it cannot be one. An optional socket may be None
    (unconnected)."""
    kind = spec[0] if isinstance(spec, (tuple, list)) and spec else None
    options = spec[1] if isinstance(spec, (tuple, list)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(value, str) and value.startswith(REFUSED_LINK):
        raise ValueError(f"{PREFIX}{name}: {value[len(REFUSED_LINK):].strip()}")
    if isinstance(kind, (list, tuple)):  # a list of choices
        if not isinstance(value, (str, int, float, bool)) or value not in kind:
            shown = ", ".join(map(str, kind[:CHOICES_SHOWN])) + (", ..." if len(kind) > CHOICES_SHOWN else "")
            raise ValueError(f"{PREFIX}{name} {show(value)}: not one of the choices ({shown or 'none available'})")
        return value
    if kind == "INT":
        value = _number(name, value, int, "an integer")
    elif kind == "FLOAT":
        value = _number(name, value, float, "a number")
        if not math.isfinite(value):
            raise ValueError(f"{PREFIX}{name} {show(value)}: a finite number is needed")
    elif kind == "BOOLEAN":
        if not isinstance(value, (bool, int)) or isinstance(value, int) and value not in (0, 1):
            raise ValueError(f"{PREFIX}{name} {show(value)}: true or false is needed")
        return bool(value)
    elif kind == "STRING":
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"{PREFIX}{name} {show(value)}: text is needed")
        return str(value)
    elif isinstance(kind, str):
        if value is None and not required:
            return None
        problem = _socket_problem(kind, value)
        if problem:
            raise ValueError(f"{PREFIX}{name} {show(value) if _plain(value) else ''}".rstrip() + f": {problem}")
        return value
    if "min" in options and value < options["min"]:
        raise ValueError(f"{PREFIX}{name} {show(value)}: must be at least {options['min']}")
    if "max" in options and value > options["max"]:
        raise ValueError(f"{PREFIX}{name} {show(value)}: must be at most {options['max']}")
    return value


def _plain(value) -> bool:
    return isinstance(value, (bool, int, float, str, list, dict))


def label(name) -> str:
    """An input name as messages show it: plain when it is an identifier."""
    return name if isinstance(name, str) and name.isidentifier() and name.isascii() else show(name)


def _number(name: str, value, cast, what: str):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{PREFIX}{name} {show(value)}: {what} is needed")
    try:
        return cast(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{PREFIX}{name} {show(value)}: {what} is needed") from None


def declared(cls) -> dict[str, tuple[object, bool]]:
    """Input name -> (its INPUT_TYPES entry, required) for the inputs of ``cls``; hidden ones
    (ComfyUI fills them: the prompt, the workflow) are taken as they come."""
    spec = cls.INPUT_TYPES()
    visible = {name: (entry, section == "required") for section in ("required", "optional")
               for name, entry in (spec.get(section) or {}).items()}
    return {**{name: ((None,), False) for name in spec.get("hidden") or {}}, **visible}


def check(cls, values: dict, defaults: set[str] = frozenset()) -> dict:
    """``values`` (what ComfyUI passes a node of ``cls``) converted and checked against its
    INPUT_TYPES; ValueError on the first problem. Inputs it does not declare are refused, and
    required ones that are missing, unless in ``defaults`` (the node's function has one)."""
    inputs = declared(cls)
    unknown = sorted(set(values) - set(inputs), key=str)
    if unknown:
        raise ValueError(f"{PREFIX}{', '.join(map(label, unknown))}: not an input of {cls.DISPLAY_NAME}")
    missing = [name for name, (_, required) in inputs.items() if required and name not in values and name not in defaults]
    if missing:
        raise ValueError(f"{PREFIX}{', '.join(missing)}: required, missing")
    return {name: convert(name, inputs[name][0], value, inputs[name][1]) for name, value in values.items()}


def literal_problem(entry: tuple[object, bool] | None, name: str, value) -> str | None:
    """What ComfyUI's own /prompt check says of literal ``value`` for input ``name`` declared by
    ``entry`` (from ``declared``), so the pack's graph check leaves that input to it and reports
    nothing twice; None when it says nothing."""
    kind = entry[0][0] if entry is not None else None
    if entry is None or isinstance(value, list) or not isinstance(kind, (list, tuple)) and kind not in (
            "INT", "FLOAT", "STRING"):
        return None  # ComfyUI checks no socket type (nor, in 2024, a BOOLEAN)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # its min / max tests are false for NaN: it lets them through
    try:
        convert(name, entry[0], value)
    except ValueError as err:
        return str(err)
    return None
