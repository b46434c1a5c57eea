"""Every WanFit node validates through the graph check, so each problem is reported once.

ComfyUI attaches a VALIDATE_INPUTS message to every input the function names (a size check
reading width, height and frames reported its problem three times) and skips its own range
and list tests for those inputs. So a node's own check runs in ``graph.check_prompt`` on the
prompt's literal values (links as None, as ComfyUI passes them), together with the
graph-wide checks, and the node's VALIDATE_INPUTS names only one hidden input, ``WanFit``
(ComfyUI's ``UNIQUE_ID``: hidden inputs are told by their value, so the key is free, and
ComfyUI prefixes the message with it: "WanFit - frames 80: ..."): the problem comes back
once, under the node, and ComfyUI keeps checking every widget's range and choices itself.
The node's own check is kept as ``VALIDATE_OWN``.

When the node runs, its inputs are checked again before any work, whatever path they took:
against its INPUT_TYPES (``inputs.check``: types, ranges, choices, socket types) and its own
check on the values it actually got (a width that came over a link is known by then).
"""
from __future__ import annotations

import functools
import inspect

from . import graph, inputs

HIDDEN = "WanFit"  # the hidden input carrying the node's id to VALIDATE_INPUTS


def with_graph_check(cls) -> None:
    """Route ``cls``'s validation through ``graph`` (see the module docstring)."""
    graph.NODES[cls.__name__] = cls
    own = getattr(cls, "VALIDATE_INPUTS", None)
    if own is not None:
        cls.VALIDATE_OWN = own
        graph.VALIDATORS[cls.__name__] = own
        graph.VALIDATOR_ARGS[cls.__name__] = tuple(inspect.signature(own).parameters)

    def validate(klass, WanFit=None):  # noqa: N803 - the hidden input's name, shown before the message
        return graph.problem(WanFit) or True

    cls.VALIDATE_INPUTS = classmethod(validate)

    input_types = cls.INPUT_TYPES.__func__

    @functools.wraps(input_types)
    def with_hidden(klass):
        out = input_types(klass)
        out.setdefault("hidden", {})[HIDDEN] = "UNIQUE_ID"
        return out

    cls.INPUT_TYPES = classmethod(with_hidden)
    run = getattr(cls, cls.FUNCTION)

    params = list(inspect.signature(run).parameters.values())[1:]  # after self
    optional = {p.name for p in params if p.default is not inspect.Parameter.empty}

    @functools.wraps(run)
    def checked(self, *args, **kwargs):  # ComfyUI passes inputs by name, the hidden ones too
        kwargs.pop(HIDDEN, None)
        kwargs = inputs.check(cls, {p.name: value for p, value in zip(params, args)} | kwargs, optional)
        if own is not None:
            verdict = own(**{name: kwargs[name] for name in graph.VALIDATOR_ARGS[cls.__name__] if name in kwargs})
            if verdict is not True:
                raise ValueError(f"{inputs.PREFIX}{verdict if verdict is not False else 'invalid inputs'}")
        return run(self, **kwargs)

    setattr(cls, cls.FUNCTION, checked)
