"""The LoRA node: a LoRA file from ComfyUI's loras folder on top of a WanFit model."""
from __future__ import annotations

import dataclasses

from ..optim.lora import LORA_MODES, LoraError, open_lora, read_lora_header
from . import comfy
from .load import CATEGORY, LoraChoice, ModelHandle


class WanFitLoRA:
    """Apply a LoRA from the loras folder to a WanFit model: ComfyUI / lightx2v (lora_down /
    lora_up, .diff, .diff_b), PEFT / diffusers (lora_A / lora_B) and kohya (lora_unet_) files.
    Chain several; give each Wan 2.2 expert its own (the lightx2v 4-step LoRAs come as a
    high-noise and a low-noise file). auto merges the LoRA into the weights as they load (no
    cost per step, fp8 requantised afterwards); unmerged adds it at every matmul (for weights
    that cannot take a merge, such as GGUF). A held model takes a new strength or LoRA
    without reading its weights again."""

    DISPLAY_NAME = "WanFit LoRA"
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("WANFIT_MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("WANFIT_MODEL",),
            "lora_name": (comfy.list_models("loras"),),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            "lora_mode": (list(LORA_MODES), {"default": "auto"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        # The header only: a file that is no LoRA is a 400 at /prompt. Whether it fits the
        # model is known when the node runs (the model comes over a link).
        if lora_name is None:
            return True
        if lora_name not in comfy.list_models("loras"):
            return f"{lora_name}: not found in the ComfyUI loras folder"
        try:
            read_lora_header(comfy.model_path("loras", lora_name))
        except (LoraError, FileNotFoundError) as err:
            return str(err)
        return True

    def apply(self, model: ModelHandle, lora_name: str, strength: float = 1.0, lora_mode: str = "auto"):
        if lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode {lora_mode!r}: expected one of {', '.join(LORA_MODES)}")
        if lora_mode == "merged" and not model.mergeable:
            raise ValueError(f"{lora_name}: {model.describe()} cannot take a merged LoRA; use unmerged or auto")
        lora = open_lora(comfy.model_path("loras", lora_name), model.ckpt.shapes, model.describe())
        return (dataclasses.replace(model, loras=(*model.loras, LoraChoice(lora, strength, lora_mode))),)


NODES = {cls.__name__: cls for cls in (WanFitLoRA,)}
