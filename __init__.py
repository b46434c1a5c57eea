"""WanFit: Wan 2.1 / 2.2 video diffusion in the memory of an ordinary GPU.

ComfyUI imports this package under its folder's name and reads the two mappings below.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
