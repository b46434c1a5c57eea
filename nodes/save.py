"""The video saver: IMAGE frames to an mp4 / webm file in ComfyUI's output folder."""
from __future__ import annotations

import logging
import os

from ..optim import video
from . import comfy
from .inputs import show

log = logging.getLogger("WanFit")
PREVIEW_SIZE = 512  # the 2024 frontend's preview (an animated WEBP) is scaled to this longer side
_warned: list[bool] = []


class WanFitSaveVideo:
    """Save frames as a video file in ComfyUI's output folder: mp4 (H.264, yuv420p, plays
    everywhere) or webm (VP9). The frame rate comes from fps; odd sizes are padded to even
    ones; the prompt and the graph are stored in the file's metadata, as ComfyUI's own savers
    do (drag the file onto the editor to load its graph). The node shows the video when done.
    Without PyAV (the av package) it writes an animated WEBP instead and says so once."""

    DISPLAY_NAME = "WanFit Save Video"
    CATEGORY = "WanFit/video"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The frames to save (a WanFit VAE Decode's output)."}),
            "filename_prefix": ("STRING", {"default": "video/WanFit", "tooltip": "Output file prefix; may hold "
                                           "subfolders and ComfyUI's %date:yyyy-MM-dd% style fields."}),
            "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0,
                              "tooltip": "Frames per second (Wan 2.1 / 2.2 A14B: 16; TI2V-5B: 24)."}),
            "format": (list(video.FORMATS), {"default": "mp4", "tooltip": "mp4: H.264, plays everywhere; "
                                             "webm: VP9, smaller at the same quality, for the web."}),
            "crf": ("INT", {"default": video.DEFAULT_CRF, "min": 0, "max": 51, "tooltip": "Quality: lower is "
                            "better and bigger; 19 looks near lossless, 23 is H.264's default."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return prefix_problem(filename_prefix) or True

    def save(self, images, filename_prefix: str, fps: float, format: str, crf: int, prompt=None,
             extra_pnginfo=None):
        metadata = {}
        if not comfy.metadata_disabled():
            metadata.update(extra_pnginfo or {})
            if prompt is not None:
                metadata["prompt"] = prompt
        height, width = int(images.shape[1]), int(images.shape[2])
        folder, name, counter, subfolder = comfy.save_path(filename_prefix, width, height)
        if video.available():
            file = f"{name}_{counter:05}_.{video.FORMATS[format][1]}"
            info = video.write(images, os.path.join(folder, file), fps, format, crf, metadata)
        else:
            if not _warned:
                _warned.append(True)
                log.warning("WanFit Save Video: PyAV (the av package) is not installed, so videos are saved "
                            "as animated WEBP; pip install av (it is in the pack's requirements.txt) for mp4 / webm")
            file = f"{name}_{counter:05}_.webp"
            info = video.write_webp(images, os.path.join(folder, file), fps, metadata=metadata)
        log.info("WanFit Save Video: %s, %d frames, %dx%d at %s fps%s", file, info.frames, info.width, info.height,
                 info.fps, " (padded to even sides)" if info.padded else "")
        results = [{"filename": file, "subfolder": subfolder, "type": "output"}]
        if file.endswith(".webp") or comfy.has_video_type():
            return {"ui": {"images": results, "animated": (True,)}}
        # The 2024 frontend shows outputs as <img>: the video file fails to load there and is
        # skipped, so an animated WEBP preview (temp folder) follows it.
        return {"ui": {"images": results + [_webp_preview(images, fps)], "animated": (True,)}}


NAME_BYTES = 200  # a file name's limit is 255 bytes on common file systems; the counter and suffix need the rest


def prefix_problem(prefix) -> str | None:
    """What is wrong with ``filename_prefix`` (None: nothing, or it comes over a link): every
    part a file name can hold, inside the output folder."""
    if not isinstance(prefix, str):
        return None
    parts = prefix.replace("\\", "/").split("/")
    if "\x00" in prefix or prefix.startswith("/") or ".." in parts:
        return f"filename_prefix {show(prefix)}: a name inside the output folder (subfolders with /, no .. or /)"
    long = next((p for p in parts if len(p.encode()) > NAME_BYTES), None)
    if long is not None:
        return (f"filename_prefix: the part {show(long[:24])}... is {len(long.encode())} bytes long; a file name "
                f"holds {NAME_BYTES}")
    return None


def _webp_preview(images, fps: float) -> dict:
    import torch.nn.functional as F

    height, width = images.shape[1:3]
    scale = min(1.0, PREVIEW_SIZE / max(height, width))
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        images = F.interpolate(images[..., :3].movedim(-1, 1), size=size, mode="area").movedim(1, -1)
    folder, name, counter, subfolder = comfy.save_path("WanFit_preview", images.shape[2], images.shape[1], temp=True)
    file = f"{name}_{counter:05}_.webp"
    video.write_webp(images, os.path.join(folder, file), fps, quality=80)
    return {"filename": file, "subfolder": subfolder, "type": "temp"}


NODES = {"WanFitSaveVideo": WanFitSaveVideo}
