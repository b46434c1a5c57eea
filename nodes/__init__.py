"""ComfyUI node classes: thin wrappers that validate inputs and call into wan/ and optim/."""
from . import cache, comfy, context, decode, encode, graph, load, lora, memory, pairing, sample, speed  # noqa: F401
from .tooltips import with_tooltips
from .validation import with_graph_check

_MODULES = (load, lora, encode, memory, speed, context, cache, sample, decode)

NODE_CLASS_MAPPINGS = {name: cls for m in _MODULES for name, cls in m.NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: cls.DISPLAY_NAME for name, cls in NODE_CLASS_MAPPINGS.items()}

for _cls in NODE_CLASS_MAPPINGS.values():
    # The docstring is the node's description in the UI (current ComfyUI reads DESCRIPTION).
    _cls.DESCRIPTION = " ".join((_cls.__doc__ or "").split())
    _cls.INPUT_TYPES = classmethod(with_tooltips(_cls.INPUT_TYPES.__func__))
    with_graph_check(_cls)

comfy.on_prompt(graph.check_prompt)  # graph-wide checks at /prompt (a no-op outside ComfyUI)
