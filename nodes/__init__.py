"""ComfyUI node classes: thin wrappers that validate inputs and call into wan/ and optim/."""
from . import comfy, graph, pairing  # noqa: F401  (pairing registers its graph checks)
from .cache import WanFitCacheCalibrate, WanFitEasyCache, WanFitMagCache, WanFitTeaCache
from .context import WanFitContextWindows
from .decode import WanFitVAEDecode, WanFitVAETiling
from .encode import WanFitEmptyEmbeds, WanFitImageToVideoEncode, WanFitTextEncode
from .load import WanFitCLIPVisionLoader, WanFitModelLoader, WanFitTextEncoderLoader, WanFitVAELoader
from .lora import WanFitLoRA
from .memory import WanFitMemory
from .multigpu import WanFitMultiGPU
from .sample import WanFitSampler, WanFitTwoPassSampler
from .save import WanFitSaveVideo
from .speed import WanFitCompile, WanFitSparseAttention
from .tooltips import with_tooltips
from .validation import with_graph_check

# A literal dict, so tools that read the source without importing it (comfy-test, the
# registry's scanners) see every node.
NODE_CLASS_MAPPINGS = {
    "WanFitModelLoader": WanFitModelLoader,
    "WanFitVAELoader": WanFitVAELoader,
    "WanFitTextEncoderLoader": WanFitTextEncoderLoader,
    "WanFitCLIPVisionLoader": WanFitCLIPVisionLoader,
    "WanFitLoRA": WanFitLoRA,
    "WanFitTextEncode": WanFitTextEncode,
    "WanFitEmptyEmbeds": WanFitEmptyEmbeds,
    "WanFitImageToVideoEncode": WanFitImageToVideoEncode,
    "WanFitMemory": WanFitMemory,
    "WanFitMultiGPU": WanFitMultiGPU,
    "WanFitSparseAttention": WanFitSparseAttention,
    "WanFitCompile": WanFitCompile,
    "WanFitContextWindows": WanFitContextWindows,
    "WanFitTeaCache": WanFitTeaCache,
    "WanFitMagCache": WanFitMagCache,
    "WanFitEasyCache": WanFitEasyCache,
    "WanFitCacheCalibrate": WanFitCacheCalibrate,
    "WanFitSampler": WanFitSampler,
    "WanFitTwoPassSampler": WanFitTwoPassSampler,
    "WanFitVAEDecode": WanFitVAEDecode,
    "WanFitVAETiling": WanFitVAETiling,
    "WanFitSaveVideo": WanFitSaveVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {name: cls.DISPLAY_NAME for name, cls in NODE_CLASS_MAPPINGS.items()}

for _cls in NODE_CLASS_MAPPINGS.values():
    # The docstring is the node's description in the UI (current ComfyUI reads DESCRIPTION).
    _cls.DESCRIPTION = " ".join((_cls.__doc__ or "").split())
    _cls.INPUT_TYPES = classmethod(with_tooltips(_cls.INPUT_TYPES.__func__))
    with_graph_check(_cls)

comfy.on_prompt(graph.check_prompt)  # graph-wide checks at /prompt (a no-op outside ComfyUI)
