"""Write the example workflows in both ComfyUI formats from one description per graph.

    python workflows/build.py          # writes workflows/*.json (UI) and workflows/api/*.json

Each graph is a list of nodes: id, class, widget values in the node's input order, and
links ``input -> (source node, output slot)``. The API format (what /prompt takes) and the
UI format (what the ComfyUI editor loads: nodes with pos/size/widgets_values and a links
array) are both derived from it, so the two cannot drift.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Output sockets (name, type) and linkable inputs (name, type), in INPUT_TYPES order.
OUTPUTS = {
    "WanFitModelLoader": [("WANFIT_MODEL", "WANFIT_MODEL")],
    "WanFitLoRA": [("WANFIT_MODEL", "WANFIT_MODEL")],
    "WanFitVAELoader": [("WANFIT_VAE", "WANFIT_VAE")],
    "WanFitTextEncoderLoader": [("WANFIT_TEXT_ENCODER", "WANFIT_TEXT_ENCODER")],
    "WanFitCLIPVisionLoader": [("WANFIT_CLIP_VISION", "WANFIT_CLIP_VISION")],
    "WanFitTextEncode": [("WANFIT_TEXT_EMBEDS", "WANFIT_TEXT_EMBEDS")],
    "WanFitEmptyEmbeds": [("WANFIT_IMAGE_EMBEDS", "WANFIT_IMAGE_EMBEDS")],
    "WanFitImageToVideoEncode": [("WANFIT_IMAGE_EMBEDS", "WANFIT_IMAGE_EMBEDS")],
    "WanFitSampler": [("LATENT", "LATENT")],
    "WanFitContextWindows": [("context_windows", "WANFIT_CONTEXT_WINDOWS")],
    "WanFitTwoPassSampler": [("LATENT", "LATENT")],
    "WanFitVAEDecode": [("IMAGE", "IMAGE")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "SaveAnimatedWEBP": [],
}
INPUTS = {
    "WanFitLoRA": [("model", "WANFIT_MODEL")],
    "WanFitTextEncode": [("text_encoder", "WANFIT_TEXT_ENCODER")],
    "WanFitImageToVideoEncode": [("vae", "WANFIT_VAE"), ("start_image", "IMAGE"), ("end_image", "IMAGE"),
                                 ("clip_vision", "WANFIT_CLIP_VISION")],
    "WanFitSampler": [("model", "WANFIT_MODEL"), ("text_embeds", "WANFIT_TEXT_EMBEDS"),
                      ("image_embeds", "WANFIT_IMAGE_EMBEDS"), ("latent", "LATENT"),
                      ("step_cache", "WANFIT_STEP_CACHE"), ("context_windows", "WANFIT_CONTEXT_WINDOWS")],
    "WanFitTwoPassSampler": [("high_noise_model", "WANFIT_MODEL"), ("low_noise_model", "WANFIT_MODEL"),
                             ("text_embeds", "WANFIT_TEXT_EMBEDS"), ("image_embeds", "WANFIT_IMAGE_EMBEDS")],
    "WanFitVAEDecode": [("vae", "WANFIT_VAE"), ("latent", "LATENT")],
    "SaveAnimatedWEBP": [("images", "IMAGE")],
}


def ui_extra_widgets(class_type: str, name: str) -> list:
    """Values the editor stores after a widget that the API format does not have."""
    if name == "seed":
        return ["fixed"]  # control_after_generate
    if class_type == "LoadImage" and name == "image":
        return ["image"]  # the upload button
    return []


@dataclass
class Node:
    id: int
    type: str
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name -> (node id, output slot)
    pos: tuple[int, int] = (0, 0)
    title: str | None = None


def to_api(nodes: list[Node]) -> dict:
    graph = {}
    for n in nodes:
        inputs = dict(n.widgets)
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.links.items()})
        graph[str(n.id)] = {"class_type": n.type, "inputs": inputs}
        if n.title:
            graph[str(n.id)]["_meta"] = {"title": n.title}
    return graph


def to_ui(nodes: list[Node]) -> dict:
    links, by_id = [], {n.id: n for n in nodes}
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for n in nodes:
        for name, (src, slot) in n.links.items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, n.id, [i for i, _ in INPUTS[n.type]].index(name),
                          OUTPUTS[by_id[src].type][slot][1]])
            out_links.setdefault((src, slot), []).append(link_id)
            in_links[(n.id, name)] = link_id
    ui_nodes = []
    for order, n in enumerate(nodes):
        widgets = []
        for name, value in n.widgets.items():
            widgets += [value, *ui_extra_widgets(n.type, name)]
        node = {
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": [320, 60 + 26 * len(widgets)],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": in_links.get((n.id, name))}
                       for name, typ in INPUTS.get(n.type, [])],
            "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                        for slot, (name, typ) in enumerate(OUTPUTS[n.type])],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": widgets,
        }
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


# ----------------------------------------------------------------------------- the graphs

NEGATIVE = ("static, blurry, low quality, worst quality, jpeg artifacts, deformed, extra fingers, "
            "watermark, subtitles, still picture")
T5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"


def _model(id, file, pos, weight="auto", title=None):
    return Node(id, "WanFitModelLoader", {"file": file, "weight_dtype": weight, "compute_dtype": "bf16",
                                          "attention": "auto"}, pos=pos, title=title)


def _sampler(id, model, start, end, add_noise, leftover, pos, steps=20, cfg=3.5, shift=5.0, latent=None,
             embeds=7, title=None, scheduler="unipc", schedule="wan", windows=None):
    links = {"model": (model, 0), "text_embeds": (6, 0), "image_embeds": (embeds, 0)}
    if latent is not None:
        links["latent"] = (latent, 0)
    if windows is not None:
        links["context_windows"] = (windows, 0)
    return Node(id, "WanFitSampler", {"steps": steps, "cfg": cfg, "shift": shift, "seed": 42, "scheduler": scheduler,
                                      "schedule": schedule, "start_step": start, "end_step": end,
                                      "add_noise": add_noise, "return_with_leftover_noise": leftover},
                links, pos, title)


def _lora(id, model, file, pos, title):
    return Node(id, "WanFitLoRA", {"lora_name": file, "strength": 1.0, "lora_mode": "auto"}, {"model": (model, 0)},
                pos, title)


def _tail(vae, latent, prefix, fps, decode_id=10, save_id=11):
    return [Node(decode_id, "WanFitVAEDecode", {}, {"vae": (vae, 0), "latent": (latent, 0)}, (1500, 200)),
            Node(save_id, "SaveAnimatedWEBP", {"filename_prefix": prefix, "fps": float(fps), "lossless": False,
                                               "quality": 90, "method": "default"}, {"images": (decode_id, 0)},
                 (1850, 200))]


LIGHTX2V = "wan2.2_i2v_lightx2v_4steps_lora_v1_{}_noise.safetensors"


EXPERTS = "wan2.2_i2v_{}_noise_14B_fp8_scaled.safetensors"
GGUF_EXPERTS = "wan2.2_i2v_{}_noise_14B_Q4_K_M.gguf"  # city96's file names


def wan22_i2v_a14b(frames: int, lora: bool = True, experts: str = EXPERTS, windows: bool = False) -> list[Node]:
    """Wan 2.2 I2V-A14B, two chained samplers. With ``lora``: the lightx2v 4-step LoRAs (one per
    expert), 4 steps at cfg 1 (no negative pass), switch at 2, euler on ComfyUI's simple
    schedule, as the official ComfyUI template's "4steps LoRA" path. Without: 20 steps,
    cfg 3.5, switch at 10, unipc on the official Wan schedule. ``windows``: both samplers run
    81-frame context windows (30 frames of overlap, static, pyramid fusion, every window's
    first frame anchored on the start image)."""
    nodes = [
        _model(1, experts.format("high"), (0, 0), title="High-noise expert"),
        _model(2, experts.format("low"), (0, 180), title="Low-noise expert"),
        Node(3, "WanFitTextEncoderLoader", {"file": T5}, pos=(0, 360)),
        Node(4, "WanFitVAELoader", {"file": "wan_2.1_vae.safetensors"}, pos=(0, 480)),
        Node(5, "LoadImage", {"image": "start.png"}, pos=(0, 600), title="Start image"),
        Node(6, "WanFitTextEncode", {"positive": "a white cat walks along a sunny harbour wall, the camera "
                                     "follows slowly", "negative": NEGATIVE}, {"text_encoder": (3, 0)}, (380, 300)),
        Node(7, "WanFitImageToVideoEncode", {"width": 832, "height": 480, "frames": frames},
             {"vae": (4, 0), "start_image": (5, 0)}, (380, 560)),
    ]
    win = None
    if windows:
        win = 14
        nodes.append(Node(win, "WanFitContextWindows", {
            "context_length": 81, "context_overlap": 30, "context_schedule": "standard_static", "context_stride": 1,
            "closed_loop": False, "fuse_method": "pyramid", "freenoise": False, "anchor_start_image": True},
            pos=(380, 760), title="Context windows (81 frames)"))
    if lora:
        nodes += [
            _lora(12, 1, LIGHTX2V.format("high"), (380, 0), "4-step LoRA (high noise)"),
            _lora(13, 2, LIGHTX2V.format("low"), (380, 150), "4-step LoRA (low noise)"),
            _sampler(8, 12, 0, 2, True, True, (780, 0), steps=4, cfg=1.0, scheduler="euler", schedule="simple",
                     title="Sampler (high noise, steps 0-2)", windows=win),
            _sampler(9, 13, 2, 10000, False, False, (780, 400), steps=4, cfg=1.0, scheduler="euler",
                     schedule="simple", latent=8, title="Sampler (low noise, steps 2-4)", windows=win),
        ]
        prefix = f"wanfit_i2v_a14b_{frames}f" + ("_gguf" if experts == GGUF_EXPERTS else "")
    else:
        nodes += [
            _sampler(8, 1, 0, 10, True, True, (780, 0), title="Sampler (high noise, steps 0-10)"),
            _sampler(9, 2, 10, 10000, False, False, (780, 400), latent=8, title="Sampler (low noise, steps 10-20)"),
        ]
        prefix = f"wanfit_i2v_a14b_{frames}f_20step"
    return [*nodes, *_tail(4, 9, prefix, 16)]


def wan22_t2v_a14b() -> list[Node]:
    return [
        _model(1, "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", (0, 0), title="High-noise expert"),
        _model(2, "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", (0, 180), title="Low-noise expert"),
        Node(3, "WanFitTextEncoderLoader", {"file": T5}, pos=(0, 360)),
        Node(4, "WanFitVAELoader", {"file": "wan_2.1_vae.safetensors"}, pos=(0, 480)),
        Node(6, "WanFitTextEncode", {"positive": "a red boat on a blue lake at sunset, the camera slowly pans",
                                     "negative": NEGATIVE}, {"text_encoder": (3, 0)}, (380, 300)),
        Node(7, "WanFitEmptyEmbeds", {"width": 832, "height": 480, "frames": 81}, pos=(380, 560)),
        Node(8, "WanFitTwoPassSampler", {"steps": 20, "cfg_high": 3.0, "cfg_low": 4.0, "shift": 12.0, "seed": 42,
                                         "scheduler": "unipc", "schedule": "wan", "switch_at": "boundary",
                                         "switch_step": 10, "boundary": 0.875},
             {"high_noise_model": (1, 0), "low_noise_model": (2, 0), "text_embeds": (6, 0),
              "image_embeds": (7, 0)}, (780, 0)),
        *_tail(4, 8, "wanfit_t2v_a14b_81f", 16),
    ]


def wan21_t2v_13b_low_ram() -> list[Node]:
    return [
        _model(1, "wan2.1_t2v_1.3B_fp16.safetensors", (0, 0), weight="fp8_e4m3fn"),
        Node(3, "WanFitTextEncoderLoader", {"file": T5}, pos=(0, 360)),
        Node(4, "WanFitVAELoader", {"file": "wan_2.1_vae.safetensors"}, pos=(0, 480)),
        Node(6, "WanFitTextEncode", {"positive": "a fox runs through a snowy forest, cinematic light",
                                     "negative": NEGATIVE}, {"text_encoder": (3, 0)}, (380, 300)),
        Node(7, "WanFitEmptyEmbeds", {"width": 832, "height": 480, "frames": 81}, pos=(380, 560)),
        _sampler(8, 1, 0, 10000, True, False, (780, 0), steps=30, cfg=5.0, shift=5.0),
        *_tail(4, 8, "wanfit_t2v_1.3b", 16),
    ]


def wan22_ti2v_5b() -> list[Node]:
    return [
        _model(1, "wan2.2_ti2v_5B_fp16.safetensors", (0, 0)),
        Node(3, "WanFitTextEncoderLoader", {"file": T5}, pos=(0, 360)),
        Node(4, "WanFitVAELoader", {"file": "wan2.2_vae.safetensors"}, pos=(0, 480)),
        Node(6, "WanFitTextEncode", {"positive": "waves roll onto a rocky beach at golden hour, drone shot",
                                     "negative": NEGATIVE}, {"text_encoder": (3, 0)}, (380, 300)),
        Node(7, "WanFitEmptyEmbeds", {"width": 1280, "height": 704, "frames": 121}, pos=(380, 560)),
        _sampler(8, 1, 0, 10000, True, False, (780, 0), steps=30, cfg=5.0, shift=5.0),
        *_tail(4, 8, "wanfit_ti2v_5b_121f", 24),
    ]


GRAPHS = {
    "wan22_i2v_a14b_61f_32gb": lambda: wan22_i2v_a14b(61),
    "wan22_i2v_a14b_81f_32gb": lambda: wan22_i2v_a14b(81),
    "wan22_i2v_a14b_61f_32gb_20step": lambda: wan22_i2v_a14b(61, lora=False),
    "wan22_i2v_a14b_81f_32gb_20step": lambda: wan22_i2v_a14b(81, lora=False),
    "wan22_i2v_a14b_161f_32gb": lambda: wan22_i2v_a14b(161, windows=True),
    "wan22_i2v_a14b_81f_12gb_gguf": lambda: wan22_i2v_a14b(81, experts=GGUF_EXPERTS),
    "wan22_t2v_a14b_81f_32gb": wan22_t2v_a14b,
    "wan21_t2v_1.3b_low_ram": wan21_t2v_13b_low_ram,
    "wan22_ti2v_5b_121f": wan22_ti2v_5b,
}


SIZE_NODES = ("WanFitEmptyEmbeds", "WanFitImageToVideoEncode")


def resize(prompt: dict, width: int | None = None, height: int | None = None, steps: int | None = None,
           frames: int | None = None) -> dict:
    """A copy of an API-format graph at another size: video width/height/frames on the embeds
    nodes, and ``steps`` per schedule with each Sampler's start/end step scaled in proportion
    (a chained pair keeps its split); the Two-Pass Sampler switches after its first step.
    None keeps the graph's value. Used by the tests and ``make demo`` to run the shipped
    graphs small on a CPU."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in SIZE_NODES:
            for key, value in (("width", width), ("height", height), ("frames", frames)):
                if value is not None:
                    inputs[key] = value
        elif steps is not None and node["class_type"] == "WanFitSampler":
            full = inputs["steps"]
            inputs["steps"] = steps
            for key in ("start_step", "end_step"):
                if inputs[key] < full:
                    inputs[key] = inputs[key] * steps // full
        elif steps is not None and node["class_type"] == "WanFitTwoPassSampler":
            inputs["steps"] = steps + 1
            inputs["switch_step"] = 1
    return prompt


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    for name, build in GRAPHS.items():
        nodes = build()
        (HERE / "api" / f"{name}.json").write_text(json.dumps(to_api(nodes), indent=2) + "\n")
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(nodes), indent=2) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
