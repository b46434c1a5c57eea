"""Checks at /prompt that one node's inputs cannot make: the whole graph, read before it runs.

ComfyUI validates each node on its own inputs, and a linked input has no value yet, so it
cannot see that a text-to-video model is wired to an image-to-video encode, that a Wan 2.2
VAE feeds an A14B, or that TI2V-5B's frame size is no multiple of 32. ComfyUI hands every
queued prompt to the ``on_prompt`` handlers first (``PromptServer.add_on_prompt_handler``, in
the 2024 and current ComfyUI alike); :func:`check_prompt` reads the graph there, follows the
links to the loaders, reads their files' headers (cached) and records each WanFit node's
problem. The node's ``VALIDATE_INPUTS`` then returns it through a hidden ``UNIQUE_ID``
input (``nodes/__init__.py`` adds it to every node), so ComfyUI answers 400 naming the node,
once. Literal float inputs are checked here too: ComfyUI's min / max tests are false for NaN.

The same checks run again when a node runs (a graph built some other way never passed here).
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Hashable

from . import comfy, inputs, shield

log = logging.getLogger("WanFit")

# node id -> problem, for the prompt being validated. ComfyUI validates a prompt right after
# its handlers ran; two prompts validated at once with the same node ids could see each
# other's entry, which at worst names a problem of the other graph.
_PROBLEMS: dict[str, str] = {}
# class name -> graph check of such a node: a problem, or (key, problem) where the same problem
# can come up at several nodes (``once`` then reports it at one)
CHECKS: dict[str, Callable[[dict, str], str | tuple[Hashable, str] | None]] = {}
NODES: dict[str, type] = {}  # WanFit class name -> node class
VALIDATORS: dict[str, Callable] = {}  # class name -> the node's own check (bound classmethod)
VALIDATOR_ARGS: dict[str, tuple[str, ...]] = {}  # ... and the inputs it reads


@functools.cache
def float_inputs(class_name: str) -> tuple[str, ...]:
    """The FLOAT widgets of a WanFit node (read from INPUT_TYPES inside ComfyUI, once)."""
    spec = NODES[class_name].INPUT_TYPES()
    return tuple(name for section in ("required", "optional") for name, entry in spec.get(section, {}).items()
                 if isinstance(entry, (tuple, list)) and entry and entry[0] == "FLOAT")


def register(class_name: str):
    """Decorator: ``check(prompt, node_id) -> problem | None`` for nodes of ``class_name``."""
    def add(check):
        CHECKS[class_name] = check
        return check
    return add


def problem(unique_id) -> str | None:
    """The problem ``check_prompt`` found for node ``unique_id`` (None: none, or not checked)."""
    return _PROBLEMS.get(str(unique_id)) if unique_id is not None else None


def check_prompt(json_data: dict) -> dict:
    """ComfyUI's on_prompt hook: record each WanFit node's problem. A prompt holding WanFit
    nodes is made safe for ComfyUI's executor first (``shield``: links that cannot be followed
    are replaced, and refused); otherwise it passes on unchanged. Never raises (ComfyUI would
    only log it): a check that fails is skipped."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node_id in prompt:
        _PROBLEMS.pop(str(node_id), None)
    if not any(isinstance(node, dict) and node.get("class_type") in NODES for node in prompt.values()):
        return json_data
    found: dict[str, list[tuple[Hashable, str]]] = {}
    classes = comfy.node_classes()
    if classes:
        try:
            problems = shield.shield(prompt, classes, NODES)
            if problems:
                log.warning("WanFit: this prompt cannot run as sent: %s", "; ".join(text for _, text in problems))
            for node_id, texts in shield.report_at(prompt, classes, problems, NODES).items():
                found[node_id] = [(text, f"the graph cannot run: {text}") for text in texts]
        except Exception as err:  # noqa: BLE001 - never stand between the user and ComfyUI's own answer
            log.warning("WanFit: graph shield skipped: %s", err)
    for node_id, node in prompt.items():
        kind = node.get("class_type") if isinstance(node, dict) else None
        if kind not in NODES:
            continue
        try:
            problem = node_problem(prompt, node_id, node, kind)
        except Exception as err:  # noqa: BLE001 - a broken graph is ComfyUI's own validation's to report
            log.debug("WanFit: graph check of node %s skipped: %s", node_id, err)
            continue
        if problem:
            found.setdefault(node_id, []).append(problem if isinstance(problem, tuple) else (problem, problem))
    for node_id, problems in once(prompt, found).items():
        _PROBLEMS[str(node_id)] = "; ".join(dict.fromkeys(text for _, text in problems))
    return json_data


def node_problem(prompt: dict, node_id: str, node: dict, kind: str):
    """The problem of one WanFit node ComfyUI will not report itself: a non-finite float, a
    plain value where a link belongs, the node's own check and the graph checks of its class.
    Where ComfyUI's own check refuses a literal value (range, choices, type), the node's own
    checks are left out: the user reads one message per mistake."""
    spec = inputs.declared(NODES[kind])
    literals = {name: value for name, value in (node.get("inputs") or {}).items() if not isinstance(value, list)}
    if any(inputs.literal_problem(spec.get(name), name, value) for name, value in literals.items()):
        return non_finite(node, float_inputs(kind))
    return (non_finite(node, float_inputs(kind)) or unchecked_literal(spec, literals) or own_check(node, kind)
            or (CHECKS[kind](prompt, node_id) if kind in CHECKS else None))


def unchecked_literal(spec: dict, literals: dict) -> str | None:
    """A literal the node would refuse that ComfyUI lets through (``spec``: its declared inputs):
    a plain value where a link belongs (ComfyUI checks no literal of a socket type), a boolean
    that is none."""
    for name, value in literals.items():
        if name not in spec:
            continue  # ComfyUI drops undeclared literals unread
        try:
            inputs.convert(name, spec[name][0], value)
        except ValueError as err:
            return str(err)[len(inputs.PREFIX):]
    return None


def once(prompt: dict, found: dict[str, list[tuple[Hashable, str]]]) -> dict[str, list[tuple[Hashable, str]]]:
    """Each problem (by its key) under one node: where the same one comes up at two nodes, one
    upstream of the other (two chained Samplers on the same wrong VAE), only at the
    downstream one, which is nearer the output and validated by every ComfyUI."""
    keys: dict[Hashable, set[str]] = {}
    for node_id, problems in found.items():
        for key, _ in problems:
            keys.setdefault(key, set()).add(node_id)
    kept = {}
    for node_id, problems in found.items():
        mine = [(key, text) for key, text in problems
                if not any(other != node_id and node_id in ancestors(prompt, other) for other in keys[key])]
        if mine:
            kept[node_id] = mine
    return kept


def ancestors(prompt: dict, node_id: str) -> set[str]:
    """Every node ``node_id`` depends on through links."""
    seen: set[str] = set()
    queue = [node_id]
    while queue:
        for value in ((node(prompt, queue.pop()) or {}).get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in seen:
                seen.add(value[0])
                queue.append(value[0])
    return seen


def own_check(node: dict, kind: str) -> str | None:
    """The node's own VALIDATE_INPUTS verdict on the prompt's literal values (links as None)."""
    if kind not in VALIDATORS:
        return None
    inputs = node.get("inputs", {})
    verdict = VALIDATORS[kind](**{name: literal(node, name) for name in VALIDATOR_ARGS[kind] if name in inputs})
    return None if verdict is True else str(verdict) if verdict is not False else f"{kind}: invalid inputs"


def non_finite(node: dict, names: tuple[str, ...]) -> str | None:
    """The first literal float input that is NaN or infinite (JSON's NaN / Infinity parse)."""
    for name in names:
        value = node.get("inputs", {}).get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            return f"{name} is {value}: a finite number is needed"
    return None


# --- reading the graph ------------------------------------------------------------------------

def node(prompt: dict, node_id) -> dict | None:
    found = prompt.get(str(node_id))
    return found if isinstance(found, dict) else None


def source(prompt: dict, node_id, input_name: str) -> tuple[str, dict] | None:
    """(id, node) feeding ``input_name`` of ``node_id``, or None (a widget, or unconnected)."""
    value = (node(prompt, node_id) or {}).get("inputs", {}).get(input_name)
    if isinstance(value, list) and len(value) == 2:
        found = node(prompt, value[0])
        return (str(value[0]), found) if found is not None else None
    return None


def upstream(prompt: dict, node_id, input_name: str, through: dict[str, str], want: str) -> dict | None:
    """Follow ``input_name`` back through nodes of the classes in ``through`` (class -> the input
    that passes the value on) to a node of class ``want``; None when the chain ends elsewhere."""
    seen = set()
    link = source(prompt, node_id, input_name)
    while link is not None and link[0] not in seen:
        seen.add(link[0])
        found_id, found = link
        kind = found.get("class_type")
        if kind == want:
            return found
        if kind not in through:
            return None
        link = source(prompt, found_id, through[kind])
    return None


def literal(found: dict | None, name: str):
    """A widget value of ``found`` (None when absent or linked)."""
    value = (found or {}).get("inputs", {}).get(name)
    return None if isinstance(value, list) else value
