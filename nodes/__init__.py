"""ComfyUI node classes: thin wrappers that validate inputs and call into wan/ and optim/."""
from . import cache, context, decode, encode, load, lora, memory, sample
from .tooltips import with_tooltips

_MODULES = (load, lora, encode, memory, context, cache, sample, decode)

NODE_CLASS_MAPPINGS = {name: cls for m in _MODULES for name, cls in m.NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: cls.DISPLAY_NAME for name, cls in NODE_CLASS_MAPPINGS.items()}

for _cls in NODE_CLASS_MAPPINGS.values():
    # The docstring is the node's description in the UI (current ComfyUI reads DESCRIPTION).
    _cls.DESCRIPTION = " ".join((_cls.__doc__ or "").split())
    _cls.INPUT_TYPES = classmethod(with_tooltips(_cls.INPUT_TYPES.__func__))
