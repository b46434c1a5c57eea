"""Input tooltips, by input name (the same name means the same thing on every node).

Current ComfyUI shows an input option's ``tooltip``; the 2024 ComfyUI ignores the key, so
adding it is safe on both. ``with_tooltips`` wraps a node's INPUT_TYPES to add them.
"""
from __future__ import annotations

import functools

TOOLTIPS = {
    "file": "Model file from the ComfyUI model folders; validated and identified from its tensor shapes when "
            "queued, read only when it runs.",
    "weight_dtype": "How block weights are stored on the device. auto keeps the file's format (fp8 stays fp8); "
                    "fp8_e4m3fn_scaled quantises with a per-tensor scale (half the memory of bf16).",
    "compute_dtype": "Dtype of activations and of the weights kept out of fp8 (norms, embeddings, head).",
    "attention": "Attention kernel. sageattention / flash_attn appear only when installed; auto picks the best.",
    "positive": "What the video shows.",
    "negative": "What to steer away from (used when cfg > 1).",
    "width": "Video width in pixels; a multiple of 16 (32 for TI2V-5B).",
    "height": "Video height in pixels; a multiple of 16 (32 for TI2V-5B).",
    "frames": "Number of frames, 4n+1 (e.g. 61 or 81 at 16 fps).",
    "start_image": "First frame of the video; resized and center-cropped to width x height.",
    "end_image": "Optional last frame (first-last-frame video).",
    "clip_vision": "CLIP vision encoder; needed by Wan 2.1 image-to-video models only.",
    "steps": "Sampling steps of the whole schedule (both passes of a two-pass job).",
    "cfg": "Classifier-free guidance scale; 1 skips the negative prompt (e.g. with 4-step LoRAs).",
    "cfg_high": "Guidance scale for the high-noise expert.",
    "cfg_low": "Guidance scale for the low-noise expert.",
    "shift": "Flow-matching timestep shift (5 for 480p, as the official configs; 12 for Wan 2.2 t2v).",
    "seed": "Noise seed; the same seed gives the same video on any device.",
    "scheduler": "Solver: unipc is the official default; euler; dpm++_2m.",
    "start_step": "First step of the schedule this pass runs.",
    "end_step": "Step this pass stops before (past the last step: run to the end).",
    "add_noise": "Add the seed's noise at start_step (off when continuing a latent with leftover noise).",
    "return_with_leftover_noise": "Stop at end_step without denoising fully, so another sampler can continue.",
    "latent": "Latent to continue from (leftover noise from a previous pass), or to start from.",
    "switch_at": "Switch experts at a step number or at the official boundary sigma.",
    "switch_step": "First step the low-noise expert runs (switch_at = step).",
    "boundary": "Sigma below which the low-noise expert runs; 0 = official (0.900 i2v, 0.875 t2v).",
    "budget_gb": "VRAM the job may use, in GB; 0 = auto: free VRAM now less the reserve.",
    "reserve_gb": "VRAM auto leaves free (CUDA context, other apps).",
    "blocks_to_swap": "DiT blocks kept in host RAM and streamed in each step; -1 = the fewest that fit.",
    "prefetch": "Swapped blocks copied ahead while earlier blocks compute (1 hides the copies; 0 = synchronous).",
    "pin_memory": "Keep swapped blocks in pinned host RAM so copies run asynchronously.",
    "offload_embeddings": "Keep the text / image embedding layers in host RAM; they visit the GPU for their call.",
    "tiling": "Tiled VAE settings (a WanFit VAE Tiling node). Unconnected = auto: whole frames when they fit the "
              "GPU, else the largest tiles that do; the CPU only when not even small tiles fit.",
    "tiling_mode": "auto: the largest tiles that fit the GPU (whole frames when they do), with the overlap and "
                   "temporal settings below; manual: tiles of tile_size; off: never tile.",
    "tile_size": "Tile width and height in pixels, a multiple of 16, at least twice the overlap. Device memory "
                 "follows the tile.",
    "overlap": "Pixels neighbouring tiles share, blended with feathered edges against seams; a multiple of 16.",
    "temporal_size": "Frames per time chunk, 4n+1: after the first frame, n latent frames go through the VAE's "
                     "causal cache at a time (exact). 5 = one, as official; larger uses more memory.",
    "temporal_overlap": "0 (recommended): time chunks continue one causal stream, exactly. 4m: overlapping "
                        "windows decoded afresh and cross-faded, as ComfyUI's VAE Decode (Tiled) (approximate).",
}


def with_tooltips(input_types):
    """Wrap an INPUT_TYPES classmethod's function so known inputs carry their tooltip."""
    @functools.wraps(input_types)
    def wrapped(cls):
        spec = input_types(cls)
        for section in spec.values():
            for name, entry in section.items():
                if name in TOOLTIPS:
                    options = dict(entry[1]) if len(entry) > 1 else {}
                    options.setdefault("tooltip", TOOLTIPS[name])
                    section[name] = (entry[0], options, *entry[2:])
        return spec
    return wrapped
