"""A bounded fuzz of /prompt: random mutations of the bundled API workflows, made from the
workflows and from the server's own /object_info (the INPUT_TYPES every node declares), so a
new node or input is covered without editing this file.

Each case mutates a small copy of a workflow (1 to 3 changes: values of the wrong type or out
of range, NaN, huge and unicode strings, path-like names, broken and wrong-type links, plain
values where links belong, deleted / duplicated / unknown nodes) and is judged:

- the server answers /prompt (200 or 400) and goes on answering;
- a refusal or a failed job carries a message that names an input, a file or a node, with no
  raw Python text (tracebacks, "object has no attribute", KeyError ...) and no server path;
- a job still running after ``job_seconds`` is cancelled and must stop within ``cancel_seconds``.

``tests/test_fuzz.py`` runs it in the suite (seeded, a minute at most); ``scripts/fuzz.py``
runs longer ones against a server of its own.
"""
from __future__ import annotations

import copy
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RAW = re.compile(r"Traceback|object has no attribute|is not subscriptable|cannot be interpreted as an integer|"
                 r"unsupported operand|object is not iterable|list index out of range|KeyError|Overflow when|"
                 r"without overflow|NoneType|positional argument|unexpected keyword|Exception when validating|"
                 r"object is not callable|referenced before assignment|division by zero|index out of range")

NASTY_STRINGS = ("", "../../../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "\u2603\u00e9\U0001f600",
                 "x" * 100_000, "calibration: ../../../../planted", "NaN", "-1", "%s%s%n", "\x00", "a" * 300 + ".safetensors")
NASTY_NUMBERS = (0, -1, 1, 3, 10**9, 2**64, -(2**63), 1e-07, 2.5, 1e308, -1e308, float("nan"), float("inf"))
NASTY_VALUES = (None, True, [], {}, [1, 2, 3], {"a": 1}, "true")


@dataclass
class Case:
    """One mutated graph and what was changed."""

    seed: int
    workflow: str
    prompt: dict
    changes: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # inputs, node ids and files the changes touched


@dataclass
class Verdict:
    case: Case
    outcome: str  # "refused", "failed", "success", "cancelled"
    message: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def mutate(prompt: dict, workflow: str, info: dict, rng: random.Random, seed: int) -> Case:
    """A copy of ``prompt`` with 1 to 3 random changes; ``info``: the server's /object_info."""
    case = Case(seed, workflow, copy.deepcopy(prompt))
    for _ in range(rng.choice((1, 1, 2, 3))):
        rng.choice(MUTATIONS)(case, info, rng)
    return case


def _wanfit_nodes(case: Case) -> list[str]:
    return [i for i, n in case.prompt.items() if isinstance(n, dict) and str(n.get("class_type", "")).startswith("WanFit")]


def _spec(info: dict, node: dict) -> dict:
    """Input name -> (type, options) from /object_info for ``node``'s class."""
    entry = info.get(node.get("class_type"), {}).get("input", {})
    out = {}
    for section in ("required", "optional"):
        for name, spec in (entry.get(section) or {}).items():
            out[name] = (spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return out


def _value_for(kind, options: dict, rng: random.Random):
    if kind == "INT" or kind == "FLOAT":
        picks = list(NASTY_NUMBERS) + [options.get("max", 0) + 1, options.get("min", 0) - 1] + list(NASTY_VALUES)
        return rng.choice(picks + list(NASTY_STRINGS[:4]))
    if kind == "BOOLEAN":
        return rng.choice((2, "no", None, [], 0.5, "x"))
    if kind == "STRING":
        return rng.choice(NASTY_STRINGS + NASTY_VALUES)
    if isinstance(kind, list):
        return rng.choice(NASTY_STRINGS + NASTY_VALUES + (1, 2.5))
    return rng.choice(NASTY_NUMBERS + NASTY_VALUES + NASTY_STRINGS[:3])  # a plain value where a link belongs


def _value(case: Case, info: dict, rng: random.Random) -> None:
    """A WanFit node's input (widget or socket, required or optional) gets a hostile value."""
    if not _wanfit_nodes(case):
        return
    node_id = rng.choice(_wanfit_nodes(case))
    node = case.prompt[node_id]
    spec = _spec(info, node)
    if not spec:
        return
    name = rng.choice(sorted(spec))
    value = _value_for(*spec[name], rng)
    node.setdefault("inputs", {})[name] = value
    case.changes.append(f"{node_id}.{name} = {json.dumps(value)[:60]}")
    case.names.update({name, node_id})


def _link(case: Case, info: dict, rng: random.Random) -> None:
    """A link of any node is broken: malformed, to a missing node or output, or to another node."""
    links = [(i, name) for i, n in case.prompt.items() if isinstance(n, dict)
             for name, v in n.get("inputs", {}).items() if isinstance(v, list)]
    if not links:
        return
    node_id, name = rng.choice(links)
    target = (case.prompt[node_id]["inputs"][name][:1] or ["1"])[0]  # an earlier change may have emptied it
    others = sorted(i for i in case.prompt if i != node_id)
    value = rng.choice(([target], [target, 0, 1], [], [None, 0], ["999", 0], [target, 7], [target, "0"],
                        [target, True], [rng.choice(others), 0], [node_id, 0]))
    case.prompt[node_id]["inputs"][name] = value
    case.changes.append(f"{node_id}.{name} = {json.dumps(value)}")
    case.names.update({name, node_id})


def _extra_link(case: Case, info: dict, rng: random.Random) -> None:
    """A WanFit node gets an optional or undeclared input linked to some node (a wrong type, maybe a loop)."""
    if not _wanfit_nodes(case):
        return
    node_id = rng.choice(_wanfit_nodes(case))
    spec = _spec(info, case.prompt[node_id])
    name = rng.choice(sorted(spec) + ["undeclared"])
    target = rng.choice(sorted(case.prompt))
    case.prompt[node_id].setdefault("inputs", {})[name] = [target, 0]
    case.changes.append(f"{node_id}.{name} = [{target!r}, 0]")
    case.names.update({name, node_id, target})


def _node(case: Case, info: dict, rng: random.Random) -> None:
    """A node is deleted, duplicated, renamed to an unknown class, or replaced by a non-object."""
    node_id = rng.choice(sorted(case.prompt))
    action = rng.choice(("delete", "duplicate", "unknown", "not an object", "no class_type"))
    if action == "delete":
        del case.prompt[node_id]
    elif action == "duplicate":
        case.prompt[f"{node_id}0"] = copy.deepcopy(case.prompt[node_id])
    elif action == "unknown":
        case.prompt[node_id] = {**case.prompt[node_id], "class_type": "NoSuchNode"} if isinstance(
            case.prompt[node_id], dict) else {"class_type": "NoSuchNode"}
    elif action == "not an object":
        case.prompt[node_id] = rng.choice((5, "node", None, [1, 2]))
    else:
        case.prompt[node_id] = {"inputs": {}}
    case.changes.append(f"{action} node {node_id}")
    case.names.update({node_id, "NoSuchNode", "class_type"})
    case.names.update(name for n in case.prompt.values() if isinstance(n, dict)  # the inputs left dangling
                      for name, v in (n.get("inputs") or {}).items() if isinstance(v, list) and v[:1] == [node_id])


MUTATIONS: tuple[Callable[[Case, dict, random.Random], None], ...] = (_value, _value, _value, _link, _extra_link, _node)


def judge(case: Case, outcome: str, message: str, server_path: str, info: dict) -> list[str]:
    """What is wrong with how the server answered ``case`` (empty: nothing). ComfyUI's "Prompt
    has no outputs" is the right answer where the changes left no output node."""
    problems = []
    outputs = [n for n in case.prompt.values() if isinstance(n, dict)
               and info.get(n.get("class_type"), {}).get("output_node")]
    if outcome == "refused" and not outputs and "Prompt has no outputs" in message:
        return problems
    if outcome in ("refused", "failed"):
        if not message.strip():
            problems.append("no message")
        elif RAW.search(message):
            problems.append(f"raw Python text: {RAW.search(message).group(0)!r}")
        if server_path and server_path in message:
            problems.append("the server's own path in the message")
        files = {v for n in case.prompt.values() if isinstance(n, dict) for v in n.get("inputs", {}).values()
                 if isinstance(v, str) and v.endswith((".safetensors", ".gguf", ".png"))}
        if message.strip() and not any(name and str(name) in message for name in case.names | files):
            problems.append("names no input, node or file")
    return problems


def run_case(client, case: Case, info: dict, job_seconds: float, cancel_seconds: float, server_path: str,
             error_text: Callable[[dict], str]) -> Verdict:
    """Queue ``case`` and judge the answer, cancelling a job that runs past ``job_seconds``."""
    start = time.monotonic()
    try:
        status, reply = client.queue_prompt(case.prompt)
    except OSError as err:
        return Verdict(case, "no answer", str(err), problems=[f"/prompt did not answer: {err}"])
    except ValueError:  # not JSON: an HTTP 500 page
        return Verdict(case, "refused", "", problems=["/prompt answered something that is not JSON (HTTP 500?)"])
    if status != 200:
        message = json.dumps(reply) if isinstance(reply, dict) else str(reply)
        verdict = Verdict(case, "refused", message, time.monotonic() - start)
        if status != 400:
            verdict.problems.append(f"HTTP {status}")
        verdict.problems += judge(case, "refused", _refusal_text(reply), server_path, info)
        return verdict
    prompt_id = reply["prompt_id"]
    deadline = start + job_seconds
    entry = None
    while time.monotonic() < deadline:
        entry = client.history(prompt_id) or None  # an entry appears when the job has ended
        if entry:
            break
        time.sleep(0.1)
    if not entry:
        client.interrupt()
        cancelled = time.monotonic()
        try:
            entry = client.wait(prompt_id, timeout=cancel_seconds + 30)
        except TimeoutError:
            entry = None
        late = time.monotonic() - cancelled
        verdict = Verdict(case, "cancelled", "", time.monotonic() - start)
        if entry is None or late > cancel_seconds:
            verdict.problems.append(f"still running {late:.1f} s after Cancel")
        return verdict
    state = entry["status"].get("status_str")
    if state == "success":
        return Verdict(case, "success", "", time.monotonic() - start)
    message = error_text(entry)
    if "interrupted" in json.dumps(entry["status"]).lower() and not message:
        return Verdict(case, "cancelled", "", time.monotonic() - start)
    verdict = Verdict(case, "failed", message, time.monotonic() - start)
    verdict.problems += judge(case, "failed", message, server_path, info)
    return verdict


# ComfyUI's own checks of literal values and links: clear messages of its own, naming the input
# (its type conversion quotes Python's words: "int() argument must be ... not 'NoneType'").
COMFY_OWN = ("invalid_input_type", "value_not_in_list", "value_smaller_than_min", "value_bigger_than_max",
             "required_input_missing", "bad_linked_input", "return_type_mismatch")


def _refusal_text(reply) -> str:
    """What the user reads of a 400 and the judge checks: the error, and each node error's
    message and details (of ComfyUI's own checks only the input they name)."""
    if not isinstance(reply, dict):
        return str(reply)
    error = reply.get("error")
    if not isinstance(error, dict):
        return json.dumps(error)
    parts = [str(error.get("message"))] + ([str(error.get("details"))] if not reply.get("node_errors") else [])
    for node_id, errors in (reply.get("node_errors") or {}).items():
        for e in errors.get("errors", []):
            details = str(e.get("details"))
            if e.get("type") in COMFY_OWN:
                details = str((e.get("extra_info") or {}).get("input_name") or details.split(",")[0])
            parts.append(f"node {node_id}: {e.get('message')}: {details}")
    return "\n".join(parts)


def fuzz(client, prompts: dict[str, dict], info: dict, seed: int, cases: int, seconds: float,
         server_path: str, error_text: Callable[[dict], str], job_seconds: float = 20.0,
         cancel_seconds: float = 5.0, alive: Callable[[], bool] = lambda: True) -> list[Verdict]:
    """Up to ``cases`` cases from ``seed`` within ``seconds``; the verdicts, in order."""
    rng = random.Random(seed)
    verdicts = []
    deadline = time.monotonic() + seconds
    names = sorted(prompts)
    for i in range(cases):
        if time.monotonic() > deadline:
            break
        workflow = rng.choice(names)
        case = mutate(prompts[workflow], workflow, info, rng, seed)
        verdict = run_case(client, case, info, job_seconds, cancel_seconds, server_path, error_text)
        if not alive():
            verdict.problems.append("the server stopped answering")
        verdicts.append(verdict)
        if verdict.problems and "the server stopped answering" in verdict.problems:
            break
    return verdicts


def summary(verdicts: list[Verdict]) -> dict:
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.outcome] = counts.get(v.outcome, 0) + 1
    bad = [v for v in verdicts if v.problems]
    return {"cases": len(verdicts), "outcomes": counts, "problems": len(bad),
            "examples": [{"workflow": v.case.workflow, "changes": v.case.changes, "outcome": v.outcome,
                          "problems": v.problems, "message": v.message[:400]} for v in bad[:20]]}


def save_failures(verdicts: list[Verdict], folder: Path) -> None:
    """Each failing case's graph, to replay it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(v for v in verdicts if v.problems):
        (folder / f"case_{v.case.seed}_{i}.json").write_text(json.dumps(
            {"changes": v.case.changes, "problems": v.problems, "prompt": v.case.prompt}, allow_nan=True)[:2_000_000])
