"""The one place WanFit reaches into ComfyUI. Imports are lazy so ``wan`` and ``optim``
(and the tests of everything but the nodes) run in a plain Python process.

Folder names changed in 2025: ``diffusion_models`` was ``unet`` and ``text_encoders`` was
``clip``. Both spellings are searched, so the pack runs on old and current ComfyUI.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from contextlib import contextmanager

FOLDER_ALIASES = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "clip_vision": ("clip_vision",),
    "loras": ("loras",),
}


def _folder_paths():
    import folder_paths  # ComfyUI's module; only importable inside a running ComfyUI

    return folder_paths


def _present_folders(kind: str) -> list[str]:
    known = _folder_paths().folder_names_and_paths
    return [name for name in FOLDER_ALIASES[kind] if name in known]


GGUF_KINDS = ("diffusion_models", "text_encoders")  # WanFit reads GGUF DiTs and UMT5 encoders


def _gguf_key(kind: str) -> str | None:
    """A folder key listing the ``.gguf`` files of ``kind``'s folders (ComfyUI lists only the
    extensions a key registers, and .gguf is none of the core ones), registered once. It
    shares the folder list of the first spelling present, so a folder added later counts too
    (the way ComfyUI-GGUF registers its ``unet_gguf``)."""
    if kind not in GGUF_KINDS:
        return None
    fp, key = _folder_paths(), f"wanfit_gguf_{kind}"
    if key not in fp.folder_names_and_paths:
        present = _present_folders(kind)
        if not present:
            return None
        fp.folder_names_and_paths[key] = (fp.folder_names_and_paths[present[0]][0], {".gguf"})
    return key


def _keys(kind: str) -> list[str]:
    return _present_folders(kind) + [k for k in [_gguf_key(kind)] if k]


def list_models(kind: str) -> list[str]:
    """File names in every folder registered for ``kind`` (either spelling; .gguf files too
    for diffusion models and text encoders), sorted, unique."""
    fp = _folder_paths()
    names: set[str] = set()
    for folder in _keys(kind):
        names.update(fp.get_filename_list(folder))
    return sorted(names)


def model_folders(kind: str) -> list[str]:
    """The real paths of every folder registered for ``kind``."""
    fp = _folder_paths()
    return [os.path.realpath(p) for folder in _present_folders(kind) for p in fp.get_folder_paths(folder)]


def model_path(kind: str, name: str) -> str:
    """Real path of ``name``; raises FileNotFoundError naming the folders searched, and
    PermissionError for a link leading out of every ``kind`` folder (the file is not read)."""
    fp = _folder_paths()
    for folder in _keys(kind):
        path = fp.get_full_path(folder, name)
        if path and os.path.isfile(path):
            real = os.path.realpath(path)
            if not any(os.path.commonpath([real, root]) == root for root in model_folders(kind)):
                raise PermissionError(f"{name}: a link to a file outside the ComfyUI {kind} folders; WanFit reads "
                                      "model files inside them only (add the other folder in extra_model_paths.yaml)")
            return real
    raise FileNotFoundError(f"{name}: not found in the ComfyUI model folders {', '.join(_present_folders(kind))}")


def on_prompt(handler) -> None:
    """Run ``handler(json)`` on every prompt ComfyUI's server receives, before it validates
    it; nothing when there is no ComfyUI server (tests, plain Python)."""
    try:
        from server import PromptServer
    except Exception:  # noqa: BLE001 - no server (plain Python, a linter's import check): nothing to hook
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None and hasattr(instance, "add_on_prompt_handler"):
        instance.add_on_prompt_handler(handler)


_STANDALONE: dict = {}  # a multi-GPU worker runs nodes' code without ComfyUI: its device


def run_standalone(device) -> None:
    """Serve the calls below without ComfyUI, computing on ``device`` (a multi-GPU worker
    process: no server, no Cancel of its own, no other models to unload)."""
    import torch

    _STANDALONE["device"] = torch.device(device)


def node_classes() -> dict[str, type]:
    """ComfyUI's NODE_CLASS_MAPPINGS: every installed node class (empty outside ComfyUI).
    Read from the loaded module, never imported: ``nodes`` is ComfyUI's nodes.py there, and
    elsewhere the name could resolve to this pack's own folder."""
    module = sys.modules.get("nodes")
    mapping = getattr(module, "NODE_CLASS_MAPPINGS", None)
    return mapping if isinstance(mapping, dict) and getattr(module, "__package__", None) in ("", None) else {}


def compute_device():
    """The device ComfyUI computes on (respects --cpu and friends)."""
    if _STANDALONE:
        return _STANDALONE["device"]
    import comfy.model_management as mm

    return mm.get_torch_device()


def free_vram(device) -> int:
    """Bytes free on ``device``: the driver's free memory plus what torch has cached unused."""
    if _STANDALONE:
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import comfy.model_management as mm

    return int(mm.get_free_memory(device))


def unload_comfy_models(nbytes: int, device) -> None:
    """Ask ComfyUI to unload its own models (core nodes' checkpoints) until ``nbytes`` are free."""
    if _STANDALONE:
        return
    import comfy.model_management as mm

    mm.free_memory(nbytes, device)


def free_memory_cache() -> None:
    if _STANDALONE:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return
    import comfy.model_management as mm

    mm.soft_empty_cache()


def interrupted() -> bool:
    """Whether the user pressed Cancel (never, in a standalone worker)."""
    if _STANDALONE:
        return False
    import comfy.model_management as mm

    return bool(mm.processing_interrupted())


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel."""
    if _STANDALONE:
        return  # a worker stops when rank 0 says so (optim.pool.Member.agree)
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


@contextmanager
def cancellable_layers(layers: Iterable):
    """Cancel honoured between ``layers`` (an encoder's blocks, torch modules): each checks
    for an interrupt before it runs, so a long encode stops within one layer."""
    hooks = [layer.register_forward_pre_hook(lambda *_: throw_if_interrupted()) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def progress_bar(total: int):
    import comfy.utils

    return comfy.utils.ProgressBar(total)


PREVIEW_MAX_RESOLUTION = 512  # what ComfyUI's own previewers send with each image


def previews_enabled() -> bool:
    """True when ComfyUI was started with previews on (``--preview-method`` other than none)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    method = getattr(args, "preview_method", None)
    return method is not None and str(getattr(method, "value", method)).lower() not in ("none", "nopreviews")


def latent_previewer():
    """A function x0 -> the preview tuple ComfyUI's progress bar sends (("JPEG", PIL image,
    max size)), using Wan latent-to-RGB factors on the middle latent frame; None when
    previews are off. Decided once per sampler run."""
    if not previews_enabled():
        return None
    from PIL import Image

    from ..wan.preview import latent_to_rgb

    def preview(x0):
        try:
            image = Image.fromarray(latent_to_rgb(x0).numpy())
        except ValueError:
            return None  # not a Wan latent layout: no preview rather than a failed job
        return ("JPEG", image, PREVIEW_MAX_RESOLUTION)

    return preview


def user_directory() -> str:
    """ComfyUI's user directory (``--user-directory``; ``ComfyUI/user`` by default).
    ``get_user_directory`` is current ComfyUI's; the 2024 one only has the module variable,
    and one older still has neither (then the folder beside ``output``)."""
    fp = _folder_paths()
    getter = getattr(fp, "get_user_directory", None)
    if getter is not None:
        return getter()
    if getattr(fp, "user_directory", None):
        return fp.user_directory
    return os.path.join(os.path.dirname(fp.get_output_directory()), "user")


def save_path(prefix: str, width: int, height: int, temp: bool = False) -> tuple[str, str, int, str]:
    """Where a saver writes: (folder, file name stem, counter, subfolder) in ComfyUI's output
    (or temp) directory, with its %date% / %width% prefix rules and counter, as its savers."""
    fp = _folder_paths()
    root = fp.get_temp_directory() if temp else fp.get_output_directory()
    folder, name, counter, subfolder, _ = fp.get_save_image_path(prefix, root, width, height)
    return folder, name, counter, subfolder


def metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata (savers then write no prompt or graph into files)."""
    try:
        from comfy.cli_args import args
    except Exception:  # noqa: BLE001 - outside ComfyUI: metadata on
        return False
    return bool(getattr(args, "disable_metadata", False))


def has_video_type() -> bool:
    """True on a ComfyUI with the VIDEO type and SaveVideo (0.3.31, May 2025, and later): its
    frontend previews an mp4 / webm output; the 2024 one shows only images."""
    import importlib.util

    try:
        return importlib.util.find_spec("comfy_api.input") is not None
    except (ImportError, ValueError):
        return False
