"""The context-windows settings node; the sampler runs the DiT window by window with them."""
from __future__ import annotations

from ..optim.context import FUSE_METHODS, SCHEDULES, ContextWindows, settings_problem

CATEGORY = "WanFit/sampling"
MAX_CONTEXT = 1025  # video frames


class WanFitContextWindows:
    """Context windows for long videos: the sampler denoises overlapping windows of frames
    one at a time and blends them per frame, so memory follows the window, not the video.
    Lengths are in video frames (a 4n+1 window is n+1 latent frames), with ComfyUI's schedule
    and fuse-method names and windows. Windows apply only when the video is longer than one."""

    DISPLAY_NAME = "WanFit Context Windows"
    CATEGORY = CATEGORY
    FUNCTION = "settings"
    RETURN_TYPES = ("WANFIT_CONTEXT_WINDOWS",)
    RETURN_NAMES = ("context_windows",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "context_length": ("INT", {"default": 81, "min": 5, "max": MAX_CONTEXT, "step": 4}),
            "context_overlap": ("INT", {"default": 30, "min": 0, "max": MAX_CONTEXT - 1}),
            "context_schedule": (list(SCHEDULES), {"default": "standard_static"}),
            "context_stride": ("INT", {"default": 1, "min": 1, "max": 8}),
            "closed_loop": ("BOOLEAN", {"default": False}),
            "fuse_method": (list(FUSE_METHODS), {"default": "pyramid"}),
            "freenoise": ("BOOLEAN", {"default": False}),
            "anchor_start_image": ("BOOLEAN", {"default": False}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, context_length=None, context_overlap=None, context_schedule=None,
                        context_stride=None, fuse_method=None):
        return settings_problem(context_length, context_overlap, context_schedule, context_stride, fuse_method) or True

    def settings(self, context_length: int, context_overlap: int, context_schedule: str, context_stride: int,
                 closed_loop: bool, fuse_method: str, freenoise: bool, anchor_start_image: bool):
        return (ContextWindows.from_pixels(context_length, context_overlap, schedule=context_schedule,
                                           stride=context_stride, fuse_method=fuse_method, closed_loop=closed_loop,
                                           freenoise=freenoise, anchor_start_image=anchor_start_image),)


NODES = {"WanFitContextWindows": WanFitContextWindows}
