"""Which model goes with which embeds: one rule set, checked at /prompt from the graph
(``graph.check_prompt``) and again when a sampler runs."""
from __future__ import annotations

from ..wan.model import WanConfig
from . import graph

ENCODE = "WanFit Image-to-Video Encode"
EMPTY = "WanFit Empty Embeds"
_THROUGH_MODEL = {"WanFitLoRA": "model", "WanFitMemory": "model", "WanFitMultiGPU": "model",
                  "WanFitSparseAttention": "model", "WanFitCompile": "model"}


def pairing_problem(model: str, config: WanConfig, image: str | None, clip: bool,
                    width: int | None = None, height: int | None = None) -> str | None:
    """What is wrong with sampling ``model`` (its name, for the message) on these embeds, or None.

    ``image``: None for Empty Embeds (text only), "2.1" for an Image-to-Video Encode through the
    Wan 2.1 VAE (mask + image latent), "2.2" for one through the Wan 2.2 VAE (TI2V-5B's first
    latent frame). ``clip``: CLIP vision features are there. ``width`` / ``height``: the video's
    size when known.
    """
    kind = config.model_type
    if kind == "t2v" and image is not None:
        return (f"model {model} is text-to-video, but its image embeds come from {ENCODE} (image-to-video); "
                f"use {EMPTY} or an image-to-video model")
    if kind == "i2v" and image == "2.2":
        return (f"the VAE feeding {ENCODE} is the Wan 2.2 VAE (TI2V-5B's); model {model} needs the Wan 2.1 VAE "
                "(wan_2.1_vae.safetensors), which Wan 2.1 and Wan 2.2 A14B use")
    if kind == "i2v" and image is None:
        return f"model {model} is image-to-video, but its embeds come from {EMPTY} (no image); use {ENCODE}"
    if kind == "ti2v" and image == "2.1":
        return (f"the VAE feeding {ENCODE} is the Wan 2.1 VAE; model {model} (TI2V-5B) needs the Wan 2.2 VAE "
                "(wan2.2_vae.safetensors)")
    if kind == "ti2v" and None not in (width, height) and (width % 32 or height % 32):
        return (f"model {model} (TI2V-5B, Wan 2.2 VAE) needs width and height in multiples of 32; got "
                f"{width}x{height} (e.g. {width // 32 * 32 or 32}x{height // 32 * 32 or 32})")
    if config.clip and image is not None and not clip:
        return (f"model {model} (Wan 2.1 image-to-video) needs CLIP image features: connect a WanFit CLIP Vision "
                f"Loader to {ENCODE}")
    return None


def _config(file) -> WanConfig | None:
    from .load import open_verified  # a loader's header, verified and cached once per file version

    if not isinstance(file, str):
        return None
    try:
        return open_verified("diffusion_models", "dit", file)[1]
    except Exception:  # noqa: BLE001 - the loader's own validation names what is wrong with the file
        return None


def vae_version(prompt: dict, encode_id: str) -> str | None:
    """The Wan VAE version ("2.1" / "2.2") feeding encode node ``encode_id``, when its file is known."""
    from .load import open_verified

    loader = graph.upstream(prompt, encode_id, "vae", {}, "WanFitVAELoader")
    file = graph.literal(loader, "file")
    if not isinstance(file, str):
        return None
    try:
        return open_verified("vae", "vae", file)[1].version
    except Exception:  # noqa: BLE001
        return None


def _embeds(prompt: dict, sampler_id: str) -> tuple[bool, str | None, bool, int | None, int | None, str] | None:
    """(known, image, clip, width, height, embeds node id) of the embeds a sampler gets; None
    when not ours."""
    link = graph.source(prompt, sampler_id, "image_embeds")
    if link is None:
        return None
    embeds_id, embeds = link
    kind = embeds.get("class_type")
    width, height = graph.literal(embeds, "width"), graph.literal(embeds, "height")
    if kind == "WanFitEmptyEmbeds":
        return True, None, False, width, height, embeds_id
    if kind == "WanFitImageToVideoEncode":
        version = vae_version(prompt, embeds_id)
        clip = graph.source(prompt, embeds_id, "clip_vision") is not None
        return version is not None, version, clip, width, height, embeds_id
    return None


def _sampler_check(inputs: tuple[str, ...]):
    """The pairing check of a sampler node taking models through ``inputs``. Its key is the
    embeds node and the kind of model: chained Samplers of one job on the same embeds report
    the same mistake once."""
    def check(prompt: dict, node_id: str) -> tuple[tuple, str] | None:
        embeds = _embeds(prompt, node_id)
        if embeds is None or not embeds[0]:
            return None
        _, image, clip, width, height, embeds_id = embeds
        for name in inputs:
            loader = graph.upstream(prompt, node_id, name, _THROUGH_MODEL, "WanFitModelLoader")
            config = _config(graph.literal(loader, "file"))
            if config is not None:
                found = pairing_problem(graph.literal(loader, "file"), config, image, clip,
                                        width if isinstance(width, int) else None,
                                        height if isinstance(height, int) else None)
                if found:
                    return ("pairing", embeds_id, config.model_type, config.clip), found
        return None
    return check


def end_image_problem(frames: int | None, end_image: bool, vae: str | None) -> str | None:
    """What is wrong with an end image on an Image-to-Video Encode of ``frames`` through the Wan
    ``vae`` ("2.1" / "2.2", None when unknown), or None."""
    if not end_image:
        return None
    if vae == "2.2":
        return ("the Wan 2.2 VAE (TI2V-5B) takes a start image only; disconnect end_image "
                "(first-last-frame needs an A14B or Wan 2.1 model with the Wan 2.1 VAE)")
    if frames is not None and frames < 5:
        return (f"frames {frames}: a video with an end_image needs at least 5 frames (the start frame, "
                "3 or more between, the end frame); raise frames or disconnect end_image")
    return None


@graph.register("WanFitImageToVideoEncode")
def _encode_check(prompt: dict, node_id: str) -> str | None:
    frames = graph.literal(graph.node(prompt, node_id), "frames")
    return end_image_problem(frames if isinstance(frames, int) else None,
                             graph.source(prompt, node_id, "end_image") is not None, vae_version(prompt, node_id))


graph.register("WanFitSampler")(_sampler_check(("model",)))
graph.register("WanFitTwoPassSampler")(_sampler_check(("high_noise_model", "low_noise_model")))
