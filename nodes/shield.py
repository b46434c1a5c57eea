"""The graph shield: a prompt ComfyUI's executor would die on is made safe and refused at /prompt.

The 2024 ComfyUI validates only what its outputs reach through required inputs, then runs
the graph by following every link, optional and undeclared ones included, outside any
``try``. A link to a missing node, a malformed link or a loop there ends its job thread
(KeyError, IndexError, RecursionError): /prompt answered 200, and no job runs again until
a restart. A node that is no object or has no known ``class_type`` makes its /prompt answer
500. ``check_prompt`` (nodes/graph.py) sees every prompt first; for prompts holding WanFit
nodes, :func:`shield` replaces each link that cannot be followed by a harmless marker (which
the node refuses if it ever runs, ``inputs.REFUSED_LINK``), drops broken nodes, and returns
the problems; :func:`report_at` picks the WanFit nodes ComfyUI is sure to validate, so the
answer is a 400 naming the node and the input.
"""
from __future__ import annotations

from collections.abc import Mapping

from .inputs import REFUSED_LINK, label, show

def _id(node_id) -> str:
    """A node id as messages show it: plain when it is a short printable string."""
    return node_id if isinstance(node_id, str) and node_id.isprintable() and len(node_id) <= 24 else show(node_id)


MAX_DEPTH = 300  # links in a row; ComfyUI's executor recurses once per link (Python's limit: 1000)


def shield(prompt: dict, classes: Mapping[str, type], ours: Mapping[str, type]) -> list[tuple[str | None, str]]:
    """Make ``prompt`` safe to validate and run, in place; the problems found, as (id of the
    node they are on, or None for a node that was dropped, message). ``classes``: ComfyUI's
    NODE_CLASS_MAPPINGS; ``ours``: the WanFit ones."""
    problems: list[tuple[str | None, str]] = []
    for node_id in list(prompt):
        node = prompt[node_id]
        kind = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(kind, str) or kind not in classes:
            what = ("is not an object" if not isinstance(node, dict) else "has no class_type" if kind is None
                    else f"has class_type {show(kind)}, which is not installed")
            problems.append((None, f"node {_id(node_id)} {what}"))
            del prompt[node_id]
        elif not isinstance(node.get("inputs", {}), dict):
            problems.append((node_id, f"node {node_id} ({kind}): its inputs are not an object"))
            node["inputs"] = {}
        else:
            node.setdefault("inputs", {})
    for node_id, node in prompt.items():
        for name, value in list(node["inputs"].items()):
            why = _link_problem(prompt, classes, value) if isinstance(value, list) else None
            if why:
                problems.append(_refuse(prompt, classes, ours, node_id, name, why))
    problems += [_refuse(prompt, classes, ours, node_id, name, why) for node_id, name, why in _loops(prompt)]
    return problems


def _refuse(prompt: dict, classes: Mapping[str, type], ours: Mapping[str, type], node_id: str, name: str,
            why: str) -> tuple[str, str]:
    """Cut the link of input ``name``. Another pack's node loses a required input (ComfyUI then
    refuses it by name, in every version); anything else gets a marker a WanFit node refuses
    with ``why`` if it ever runs (another pack's node drops an undeclared one unread)."""
    node = prompt[node_id]
    if node["class_type"] not in ours and name in _required(classes, node["class_type"]):
        del node["inputs"][name]
    else:
        node["inputs"][name] = f"{REFUSED_LINK} {why}"
    return node_id, f"node {node_id} ({node['class_type']}) input {label(name)}: {why}"



def _link_problem(prompt: dict, classes: Mapping[str, type], link: list) -> str | None:
    """Why ``link`` cannot be followed, or None."""
    if len(link) != 2:
        return f"a link is [node_id, output_index], got {show(link)}"
    target, index = link
    if not isinstance(target, str) or target not in prompt:
        return f"links to node {_id(target)}, which is not in the prompt"
    if isinstance(index, bool) or not isinstance(index, int):
        return f"output index {show(index)} is not a whole number"
    kind = prompt[target]["class_type"]
    outputs = getattr(classes[kind], "RETURN_TYPES", ())
    if not 0 <= index < len(outputs):
        return f"links to output {index} of node {target} ({kind}), which has {len(outputs)}"
    return None


def _links(node: dict) -> list[tuple[str, str]]:
    return [(name, value[0]) for name, value in node["inputs"].items() if isinstance(value, list)]


def _loops(prompt: dict) -> list[tuple[str, str, str]]:
    """(node id, input, why) for each link that closes a loop or runs past MAX_DEPTH, found by
    one depth-first walk (iterative: the walk itself must not hit Python's recursion limit)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found = []
    for root in prompt:
        if root in state:
            continue
        state[root] = 1
        path = [(root, iter(_links(prompt[root])))]
        while path:
            node_id, links = path[-1]
            step = next(links, None)
            if step is None:
                state[node_id] = 2
                path.pop()
                continue
            name, target = step
            if state.get(target) == 1:
                ids = [n for n, _ in path]
                loop = ", ".join(map(_id, ids[ids.index(target):]))
                found.append((node_id, name, f"closes a loop of links through nodes {loop}"))
            elif target not in state:
                if len(path) >= MAX_DEPTH:
                    found.append((node_id, name, f"the graph is deeper than {MAX_DEPTH} links here"))
                    continue
                state[target] = 1
                path.append((target, iter(_links(prompt[target]))))
    return found


def _required(classes: Mapping[str, type], kind: str) -> set[str]:
    try:
        return set((classes[kind].INPUT_TYPES() or {}).get("required") or {})
    except Exception:  # noqa: BLE001 - another pack's node: then none are counted as validated
        return set()


def report_at(prompt: dict, classes: Mapping[str, type], problems: list[tuple[str | None, str]],
              ours: Mapping[str, type]) -> dict[str, list[str]]:
    """Node id -> the problems to report under it. Every ComfyUI validates what an output
    reaches through required inputs; a problem on such a WanFit node is reported there, any
    other under the first WanFit nodes the outputs reach that way (so those outputs fail)."""
    outputs = [i for i, n in prompt.items() if getattr(classes[n["class_type"]], "OUTPUT_NODE", False) is True]
    validated, first, seen = set(), set(), set()
    queue = [(output, False) for output in outputs]  # (node, a WanFit node lies between it and the output)
    while queue:
        node_id, behind_ours = queue.pop()
        if (node_id, behind_ours) in seen:
            continue
        seen.add((node_id, behind_ours))
        validated.add(node_id)
        kind = prompt[node_id]["class_type"]
        if kind in ours and not behind_ours:
            first.add(node_id)
        required = _required(classes, kind)
        queue += [(target, behind_ours or kind in ours) for name, target in _links(prompt[node_id]) if name in required]
    where: dict[str, list[str]] = {}
    for node_id, text in problems:
        at = [node_id] if node_id in validated and prompt[node_id]["class_type"] in ours else sorted(first)
        for target in at:
            where.setdefault(target, []).append(text)
    return where
