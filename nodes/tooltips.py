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
    "lora_name": "LoRA file from the ComfyUI loras folder (.safetensors); checked against the model when the node "
                 "runs, read when sampling.",
    "strength": "LoRA strength: 1 as trained, 0 leaves the model as it is, negative subtracts it.",
    "lora_mode": "auto merges the LoRA into the weights as they load (no cost per step); unmerged adds it at every "
                 "matmul (needed for GGUF weights; costs its factors' memory and a little time per step).",
    "schedule": "Sigma schedule: wan = the official Wan sampler's (shifted, from 0.999); simple = ComfyUI's simple "
                "scheduler with ModelSamplingSD3 shift (from 1.0), what the lightx2v 4-step LoRAs expect.",
    "offload_embeddings": "Keep the text / image embedding layers in host RAM; they visit the GPU for their call.",
    "context_length": "Frames per context window, 4n+1 video frames (81 = 21 latent frames). Memory follows this, "
                      "not the video length; videos no longer than one window run whole.",
    "context_overlap": "Video frames shared by neighbouring windows (ceil(overlap / 4) latent frames); more overlap "
                       "blends better and runs more windows.",
    "context_schedule": "How windows are placed (ComfyUI's names): standard_static = fixed windows; "
                        "standard_uniform = shifted every step; looped_uniform = may wrap from the end to the start; "
                        "batched = side by side, no overlap.",
    "context_stride": "Uniform schedules only: also run windows whose frames are 2, 4, ... apart (levels); "
                      "1 = consecutive frames only.",
    "closed_loop": "looped_uniform only: windows wrap around the end, for a video that loops.",
    "fuse_method": "How overlapping windows blend per frame: pyramid (more weight mid-window), relative "
                   "(by distance from the window centre), flat (plain mean), overlap-linear (linear ramps over "
                   "the overlap).",
    "freenoise": "FreeNoise: each window's new frames start from a shuffle of the previous window's noise, "
                 "so windows agree better where they overlap.",
    "anchor_start_image": "Image-to-video: every window's first frame gets the start image's conditioning, "
                          "so the subject stays the same in windows far from the start.",
    "context_windows": "Optional WanFit Context Windows settings: sample long videos window by window.",
    "step_cache": "Optional step skipping (WanFit TeaCache / MagCache / EasyCache), or WanFit Cache Calibrate to "
                  "record a calibration; connect the same cache to both chained Samplers of a two-pass job.",
    "threshold": "How much estimated change a skipped step may accumulate; -1 = the published recommendation for "
                 "the model, 0 = never skip; higher skips more and drifts further from the uncached video.",
    "mode": "TeaCache input: e (time embedding; computes the first and last step) or e0 (its projection, the "
            "authors' use_ret_steps; computes the first 5); auto = the published choice for the model.",
    "coefficients": "TeaCache polynomial: auto = the published set for the model (Wan 2.1 only), a published set, "
                    "or a saved calibration.",
    "ratios": "MagCache magnitude ratios: auto = the published set for the model (resampled to the step count), "
              "a published set, or a saved calibration.",
    "K": "MagCache: most steps skipped in a row; -1 = the published setting for the model.",
    "retention_ratio": "MagCache: share of the first steps that always compute (for Wan 2.2 A14B, also of the "
                       "low-noise expert's first steps); -1 = the published setting.",
    "warmup_steps": "EasyCache: first steps that always compute; -1 = the published 10 of 50, scaled to the "
                    "step count.",
    "residual_device": "Where the stored residuals live: compute (the GPU the model runs on; fastest) or cpu "
                       "(saves VRAM: one float32 copy of the tokens per branch; costs a copy each step).",
    "allow_short_schedules": "With 8 or fewer steps (distilled / LoRA schedules) nothing is skipped unless this is "
                             "on: the caches lose too much quality there.",
    "name": "Calibration name: saved as user/wanfit/step_cache/NAME.json and listed on the cache nodes.",
    "pattern": "radial: Radial Attention's mask (neighbouring frames dense, the spatial window halving as the "
               "frame distance doubles); window: tokens attend within a box of frames, rows and columns.",
    "decay": "radial: scales the spatial window of frames 2 or more apart; 1 = the paper's mask, smaller is "
             "sparser (its scripts: 0.2 for Wan 2.1, 0.8 for Wan 2.2).",
    "attention_sink": "radial: every token also attends to all of the first frame (the reference's choice for Wan).",
    "window_frames": "window: how many frames apart two tokens may be (each side).",
    "window_rows": "window: how many token rows apart (a token is 16 x 16 pixels with the Wan 2.1 VAE).",
    "window_columns": "window: how many token columns apart.",
    "dense_steps": "The first steps of the schedule run dense attention (the published recipe: about a quarter).",
    "dense_blocks": "The first blocks of every step run dense attention (the published recipe: 1).",
    "granularity": "token: the mask exactly (blocks the mask cuts through are computed with it); block: every "
                   "128-token block holding a kept pair is computed whole, as block-sparse kernels do (faster, "
                   "keeps a little more).",
    "compile_backend": "inductor: fused kernels (needs a C compiler on the CPU; Triton on the GPU); aot_eager / "
                       "eager: only checks the block compiles, no speed-up.",
    "compile_mode": "default; max-autotune-no-cudagraphs tries more kernel variants (a longer first job).",
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
