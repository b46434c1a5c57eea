"""Write the example workflows in both ComfyUI formats from one description per graph.

    python workflows/build.py   # writes workflows/*.json + *.jpg (UI, templates) and workflows/api/*.json

Each graph is a list of nodes: id, class, widget values in the node's input order, links
``input -> (source node, output slot)`` and the column it sits in. The API format (what
/prompt takes, ``api/<id>.json``) and the UI format (what the editor loads: nodes with
pos/size/widgets_values and a links array, ``<title>.json``) are both derived from it, so
the two cannot drift. The UI file is named after its template title: ComfyUI's template
browser shows a custom node's template by its file name, in name order, with ``<name>.jpg``
beside it as the picture (drawn here from the layout, see thumbnails.py). Node positions and
sizes come from ``layout.py`` (the sizes ComfyUI's frontend draws). Every UI graph starts
with a note listing the model files, the folder each goes in and the card it is tuned for.

A new graph: a function returning its nodes (give each a ``column``), an entry in GRAPHS
and one in TEMPLATES; node classes not listed below need a line in SOCKETS / OUTPUTS.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import layout

HERE = Path(__file__).resolve().parent

# Output sockets (name, type) and socket inputs (name, type), in the frontend's order
# (required then optional, as INPUT_TYPES lists them); tests/test_workflows.py checks them
# against a running ComfyUI's /object_info.
OUTPUTS = {
    "WanFitModelLoader": [("WANFIT_MODEL", "WANFIT_MODEL")],
    "WanFitLoRA": [("WANFIT_MODEL", "WANFIT_MODEL")],
    "WanFitMultiGPU": [("WANFIT_MODEL", "WANFIT_MODEL")],
    "WanFitSparseAttention": [("model", "WANFIT_MODEL"), ("kept", "STRING")],
    "WanFitCompile": [("model", "WANFIT_MODEL")],
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
    "WanFitSaveVideo": [],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "Note": [],
}
INPUTS = {
    "WanFitLoRA": [("model", "WANFIT_MODEL")],
    "WanFitMultiGPU": [("model", "WANFIT_MODEL")],
    "WanFitSparseAttention": [("model", "WANFIT_MODEL"), ("image_embeds", "WANFIT_IMAGE_EMBEDS")],
    "WanFitCompile": [("model", "WANFIT_MODEL")],
    "WanFitTextEncode": [("text_encoder", "WANFIT_TEXT_ENCODER")],
    "WanFitImageToVideoEncode": [("vae", "WANFIT_VAE"), ("start_image", "IMAGE"), ("end_image", "IMAGE"),
                                 ("clip_vision", "WANFIT_CLIP_VISION"), ("tiling", "WANFIT_VAE_TILING")],
    "WanFitSampler": [("model", "WANFIT_MODEL"), ("text_embeds", "WANFIT_TEXT_EMBEDS"),
                      ("image_embeds", "WANFIT_IMAGE_EMBEDS"), ("latent", "LATENT"),
                      ("step_cache", "WANFIT_STEP_CACHE"), ("context_windows", "WANFIT_CONTEXT_WINDOWS")],
    "WanFitTwoPassSampler": [("high_noise_model", "WANFIT_MODEL"), ("low_noise_model", "WANFIT_MODEL"),
                             ("text_embeds", "WANFIT_TEXT_EMBEDS"), ("image_embeds", "WANFIT_IMAGE_EMBEDS"),
                             ("step_cache", "WANFIT_STEP_CACHE"), ("context_windows", "WANFIT_CONTEXT_WINDOWS")],
    "WanFitVAEDecode": [("vae", "WANFIT_VAE"), ("latent", "LATENT"), ("tiling", "WANFIT_VAE_TILING")],
    "WanFitSaveVideo": [("images", "IMAGE")],
}
DISPLAY = {  # the title a node shows when it has none of its own
    "LoadImage": "Load Image", "Note": "Note", "WanFitLoRA": "WanFit LoRA",
    "WanFitVAEDecode": "WanFit VAE Decode", "WanFitImageToVideoEncode": "WanFit Image-to-Video Encode",
}
TEXT_BOXES = {("WanFitTextEncode", "positive"), ("WanFitTextEncode", "negative"), ("Note", "text")}
VIRTUAL = {"Note"}  # drawn by the editor only; not in the API format
FOLDERS = {"WanFitModelLoader": "diffusion_models", "WanFitTextEncoderLoader": "text_encoders",
           "WanFitVAELoader": "vae", "WanFitCLIPVisionLoader": "clip_vision", "WanFitLoRA": "loras"}


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
    column: int = 0
    title: str | None = None
    height: int = 0  # body height wanted beyond the frontend's minimum (text boxes, previews)
    preview_h: int = 0  # room for a picture the node shows (Load Image, a saved video)
    width: int = 0  # body width wanted beyond the frontend's minimum (the note's lines)
    pos: tuple[int, int] = (0, 0)  # set by layout.place
    size: tuple[int, int] = (0, 0)


def shown_title(n: Node) -> str:
    if n.title or n.type in DISPLAY:
        return n.title or DISPLAY[n.type]
    rest = n.type.removeprefix("WanFit")  # "WanFitVAEDecode" -> "WanFit VAE Decode", as DISPLAY_NAME
    return ("WanFit " if rest != n.type else "") + re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", rest)


def frontend_size(n: Node) -> tuple[int, int]:
    """The smallest (width, height) ComfyUI's frontend draws this node's body at."""
    widgets = []
    for name in n.widgets:
        kind = "text" if (n.type, name) in TEXT_BOXES else "row"
        widgets += [kind] + ["row"] * len(ui_extra_widgets(n.type, name))
    return layout.min_size(shown_title(n), [name for name, _ in INPUTS.get(n.type, [])],
                           [name for name, _ in OUTPUTS[n.type]], widgets, n.preview_h)


def _wanted_size(n: Node) -> tuple[int, int]:
    width, height = frontend_size(n)
    return max(width, n.width), max(height, n.height)


def to_api(nodes: list[Node]) -> dict:
    graph = {}
    for n in nodes:
        if n.type in VIRTUAL:
            continue
        inputs = dict(n.widgets)
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.links.items()})
        graph[str(n.id)] = {"class_type": n.type, "inputs": inputs}
        if n.title:
            graph[str(n.id)]["_meta"] = {"title": n.title}
    return graph


def to_ui(nodes: list[Node]) -> dict:
    layout.place(nodes, _wanted_size)
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
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size),
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": in_links.get((n.id, name))}
                       for name, typ in INPUTS.get(n.type, [])],
            "outputs": [{"name": name, "type": typ, "links": out_links.get((n.id, slot), []), "slot_index": slot}
                        for slot, (name, typ) in enumerate(OUTPUTS[n.type])],
            "properties": {"Node name for S&R": n.type},
            "widgets_values": widgets,
        }
        if n.type == "Note":
            node["color"], node["bgcolor"] = "#432", "#653"  # the editor's yellow note colours
        if n.title:
            node["title"] = n.title
        ui_nodes.append(node)
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


# ----------------------------------------------------------------------------- the graphs

NEGATIVE = ("static, blurry, low quality, worst quality, jpeg artifacts, deformed, extra fingers, "
            "watermark, subtitles, still picture")
T5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"


def _model(id, file, weight="auto", title=None):
    return Node(id, "WanFitModelLoader", {"file": file, "weight_dtype": weight, "compute_dtype": "bf16",
                                          "attention": "auto"}, column=0, title=title)


def _sampler(id, model, start, end, add_noise, leftover, steps=20, cfg=3.5, shift=5.0, latent=None,
             embeds=7, title=None, scheduler="unipc", schedule="wan", windows=None):
    links = {"model": (model, 0), "text_embeds": (6, 0), "image_embeds": (embeds, 0)}
    if latent is not None:
        links["latent"] = (latent, 0)
    if windows is not None:
        links["context_windows"] = (windows, 0)
    return Node(id, "WanFitSampler", {"steps": steps, "cfg": cfg, "shift": shift, "seed": 42, "scheduler": scheduler,
                                      "schedule": schedule, "start_step": start, "end_step": end,
                                      "add_noise": add_noise, "return_with_leftover_noise": leftover},
                links, column=2, title=title)


def _lora(id, model, file, title):
    return Node(id, "WanFitLoRA", {"lora_name": file, "strength": 1.0, "lora_mode": "auto"}, {"model": (model, 0)},
                column=1, title=title)


def _loaders(t5_column: int = 0, vae: str = "wan_2.1_vae.safetensors") -> list[Node]:
    return [Node(3, "WanFitTextEncoderLoader", {"file": T5}, column=t5_column),
            Node(4, "WanFitVAELoader", {"file": vae}, column=t5_column)]


def _prompt(text: str, column: int = 1) -> Node:
    return Node(6, "WanFitTextEncode", {"positive": text, "negative": NEGATIVE}, {"text_encoder": (3, 0)},
                column=column, height=2 * 96 + 30)  # two readable text boxes


def _tail(vae, latent, prefix, fps, size, column=3, decode_id=10, save_id=11):
    """Decode and save: an mp4 in output/video/, its preview shown under the save node."""
    width, height = size
    return [Node(decode_id, "WanFitVAEDecode", {}, {"vae": (vae, 0), "latent": (latent, 0)}, column=column),
            Node(save_id, "WanFitSaveVideo", {"filename_prefix": f"video/{prefix}", "fps": float(fps),
                                              "format": "mp4", "crf": 19},
                 {"images": (decode_id, 0)}, column=column,
                 preview_h=round(layout.COLUMN_W * height / width) + 40)]


LIGHTX2V = "wan2.2_i2v_lightx2v_4steps_lora_v1_{}_noise.safetensors"


EXPERTS = "wan2.2_i2v_{}_noise_14B_fp8_scaled.safetensors"
GGUF_EXPERTS = "wan2.2_i2v_{}_noise_14B_Q4_K_M.gguf"  # city96's file names
START_IMAGE = "example.png"  # ComfyUI ships it in input/, so a fresh install runs the graph as it is


def wan22_i2v_a14b(frames: int, lora: bool = True, experts: str = EXPERTS, windows: bool = False,
                   size: tuple[int, int] = (832, 480), gpus: bool = False, speed: bool = False) -> list[Node]:
    """Wan 2.2 I2V-A14B, two chained samplers. With ``lora``: the lightx2v 4-step LoRAs (one per
    expert), 4 steps at cfg 1 (no negative pass), switch at 2, euler on ComfyUI's simple
    schedule, as the official ComfyUI template's "4steps LoRA" path. Without: 20 steps,
    cfg 3.5, switch at 10, unipc on the official Wan schedule. ``windows``: both samplers run
    81-frame context windows (30 frames of overlap, static, pyramid fusion, every window's
    first frame anchored on the start image). ``size``: the video's width and height.
    ``gpus``: each expert through a WanFit Multi-GPU node on every GPU (auto: with cfg 1 they
    split the tokens). ``speed``: each expert through WanFit Sparse Attention (radial, decay 0.8
    as the authors' Wan 2.2 script, the first step and block dense) and WanFit Compile."""
    nodes = [
        _model(1, experts.format("high"), title="High-noise expert"),
        _model(2, experts.format("low"), title="Low-noise expert"),
        *_loaders(),
        Node(5, "LoadImage", {"image": START_IMAGE}, column=0, title="Start image",
             preview_h=layout.IMAGE_PREVIEW_H),
    ]
    if lora:
        nodes += [_lora(12, 1, LIGHTX2V.format("high"), "4-step LoRA (high noise)"),
                  _lora(13, 2, LIGHTX2V.format("low"), "4-step LoRA (low noise)")]
    nodes += [
        _prompt("a white cat walks along a sunny harbour wall, the camera follows slowly"),
        Node(7, "WanFitImageToVideoEncode", {"width": size[0], "height": size[1], "frames": frames},
             {"vae": (4, 0), "start_image": (5, 0)}, column=1),
    ]
    high, low = (12, 13) if lora else (1, 2)
    if gpus:
        nodes += [Node(15, "WanFitMultiGPU", {"devices": "all", "mode": "auto"}, {"model": (high, 0)}, column=1,
                       title="Multi-GPU (high noise)"),
                  Node(16, "WanFitMultiGPU", {"devices": "all", "mode": "auto"}, {"model": (low, 0)}, column=1,
                       title="Multi-GPU (low noise)")]
        high, low = 15, 16
    if speed:
        for sparse, compiled, model, which in ((17, 19, high, "high"), (18, 20, low, "low")):
            nodes += [Node(sparse, "WanFitSparseAttention", {
                "pattern": "radial", "decay": 0.8, "attention_sink": True, "window_frames": 2, "window_rows": 8,
                "window_columns": 8, "dense_steps": 1, "dense_blocks": 1, "granularity": "token"},
                {"model": (model, 0), "image_embeds": (7, 0)}, column=1, title=f"Sparse attention ({which} noise)"),
                Node(compiled, "WanFitCompile", {"compile_backend": "inductor", "compile_mode": "default"},
                     {"model": (sparse, 0)}, column=1, title=f"Compiled blocks ({which} noise)")]
        high, low = 19, 20
    win = None
    if windows:
        win = 14
        nodes.append(Node(win, "WanFitContextWindows", {
            "context_length": 81, "context_overlap": 30, "context_schedule": "standard_static", "context_stride": 1,
            "closed_loop": False, "fuse_method": "pyramid", "freenoise": False, "anchor_start_image": True},
            column=1, title="Context windows (81 frames)"))
    if lora:
        nodes += [
            _sampler(8, high, 0, 2, True, True, steps=4, cfg=1.0, scheduler="euler", schedule="simple",
                     title="Sampler (high noise, steps 0-2)", windows=win),
            _sampler(9, low, 2, 10000, False, False, steps=4, cfg=1.0, scheduler="euler",
                     schedule="simple", latent=8, title="Sampler (low noise, steps 2-4)", windows=win),
        ]
        prefix = f"wanfit_i2v_a14b_{frames}f" + ("_gguf" if experts == GGUF_EXPERTS else "") + (
            f"_{size[1]}p_multigpu" if gpus else "") + ("_sparse" if speed else "")
    else:
        nodes += [
            _sampler(8, high, 0, 10, True, True, title="Sampler (high noise, steps 0-10)"),
            _sampler(9, low, 10, 10000, False, False, latent=8, title="Sampler (low noise, steps 10-20)"),
        ]
        prefix = f"wanfit_i2v_a14b_{frames}f_20step"
    return [*nodes, *_tail(4, 9, prefix, 16, size)]


def wan22_t2v_a14b() -> list[Node]:
    return [
        _model(1, "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", title="High-noise expert"),
        _model(2, "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", title="Low-noise expert"),
        *_loaders(),
        _prompt("a red boat on a blue lake at sunset, the camera slowly pans"),
        Node(7, "WanFitEmptyEmbeds", {"width": 832, "height": 480, "frames": 81}, column=1),
        Node(8, "WanFitTwoPassSampler", {"steps": 20, "cfg_high": 3.0, "cfg_low": 4.0, "shift": 12.0, "seed": 42,
                                         "scheduler": "unipc", "schedule": "wan", "switch_at": "boundary",
                                         "switch_step": 10, "boundary": 0.875},
             {"high_noise_model": (1, 0), "low_noise_model": (2, 0), "text_embeds": (6, 0),
              "image_embeds": (7, 0)}, column=2),
        *_tail(4, 8, "wanfit_t2v_a14b_81f", 16, (832, 480)),
    ]


def wan21_t2v_13b_low_ram() -> list[Node]:
    return [
        _model(1, "wan2.1_t2v_1.3B_fp16.safetensors", weight="fp8_e4m3fn"),
        *_loaders(),
        _prompt("a fox runs through a snowy forest, cinematic light"),
        Node(7, "WanFitEmptyEmbeds", {"width": 832, "height": 480, "frames": 81}, column=1),
        _sampler(8, 1, 0, 10000, True, False, steps=30, cfg=5.0, shift=5.0),
        *_tail(4, 8, "wanfit_t2v_1.3b", 16, (832, 480)),
    ]


def wan22_ti2v_5b() -> list[Node]:
    return [
        _model(1, "wan2.2_ti2v_5B_fp16.safetensors"),
        *_loaders(vae="wan2.2_vae.safetensors"),
        _prompt("waves roll onto a rocky beach at golden hour, drone shot"),
        Node(7, "WanFitEmptyEmbeds", {"width": 1280, "height": 704, "frames": 121}, column=1),
        _sampler(8, 1, 0, 10000, True, False, steps=30, cfg=5.0, shift=5.0),
        *_tail(4, 8, "wanfit_ti2v_5b_121f", 24, (1280, 704)),
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
    "wan22_i2v_a14b_720p_2gpu": lambda: wan22_i2v_a14b(81, size=(1280, 720), gpus=True),
    "wan22_i2v_a14b_161f_32gb_sparse": lambda: wan22_i2v_a14b(161, windows=True, speed=True),
}


@dataclass(frozen=True)
class Template:
    """How a graph shows in the template browser: its title (the UI file's name; the browser
    lists names in order, so the number sorts them) and the card it is tuned for (the note)."""
    order: int
    title: str
    card: str

    @property
    def name(self) -> str:
        return f"{self.order:02d} {self.title}"


_A14B_32 = ("a 32 GB card (RTX 5090): both experts' fp8 blocks stay on the GPU; 24 GB runs the same plan, "
            "16 GB and 12 GB swap blocks (the plan the sampler logs says how many)")
TEMPLATES = {  # most useful first
    "wan22_i2v_a14b_81f_32gb": Template(1, "Wan 2.2 14B image to video, 81 frames, 4 steps (32 GB)", _A14B_32),
    "wan22_i2v_a14b_61f_32gb": Template(2, "Wan 2.2 14B image to video, 61 frames, 4 steps (32 GB)", _A14B_32),
    "wan22_i2v_a14b_81f_12gb_gguf": Template(
        3, "Wan 2.2 14B image to video, 81 frames, GGUF Q4 (12 GB)",
        "a 12 GB card: Q4_K_M weights, 33 of 40 blocks resident, 7 swapped (planned 10.1 GiB)"),
    "wan22_t2v_a14b_81f_32gb": Template(4, "Wan 2.2 14B text to video, 81 frames, 20 steps (32 GB)", _A14B_32),
    "wan22_ti2v_5b_121f": Template(
        5, "Wan 2.2 5B text to video, 121 frames at 1280x704",
        "a 16 GB card or larger: the fp16 5B model stays resident (planned 12.6 GiB of weights and activations)"),
    "wan21_t2v_1.3b_low_ram": Template(
        6, "Wan 2.1 1.3B text to video, 81 frames, low RAM",
        "machines with 32 GB of RAM: the 1.3B model stored as fp8 on the GPU, any card it fits (see the logged plan)"),
    "wan22_i2v_a14b_161f_32gb": Template(
        7, "Wan 2.2 14B image to video, 161 frames in context windows (32 GB)",
        "a 32 GB card: 81-frame windows keep memory at the 81-frame graph's (planned 20.0 GiB)"),
    "wan22_i2v_a14b_81f_32gb_20step": Template(8, "Wan 2.2 14B image to video, 81 frames, 20 steps (32 GB)",
                                               _A14B_32),
    "wan22_i2v_a14b_61f_32gb_20step": Template(9, "Wan 2.2 14B image to video, 61 frames, 20 steps (32 GB)",
                                               _A14B_32),
    "wan22_i2v_a14b_720p_2gpu": Template(
        10, "Wan 2.2 14B image to video, 720p, 81 frames, 4 steps (2 GPUs)",
        "two (or more) GPUs of 24 GB: each expert split over every GPU, the video's tokens shared out "
        "(planned 18.0 GiB a GPU with 2; the device count must divide 40, the experts' attention heads)"),
    "wan22_i2v_a14b_161f_32gb_sparse": Template(
        11, "Wan 2.2 14B image to video, 161 frames, sparse attention and compiled blocks (32 GB)",
        "a 32 GB card, as the 161-frame graph; radial sparse attention computes about half of each window's "
        "attention (the node says how much) and the blocks are compiled: faster on a GPU by the papers, "
        "not yet measured here"),
}


def note_text(name: str, nodes: list[Node]) -> str:
    """The note at the top left of each UI graph: the model files, their folders, the card."""
    lines = [TEMPLATES[name].title, "", "Model files (Comfy-Org names; put each in ComfyUI/models/<folder>):"]
    seen = set()
    for n in nodes:
        for key in ("file", "lora_name"):
            if n.type in FOLDERS and key in n.widgets and n.widgets[key] not in seen:
                seen.add(n.widgets[key])
                lines.append(f"  {FOLDERS[n.type]}/{n.widgets[key]}")
    lines += ["", f"Tuned for {TEMPLATES[name].card}."]
    if any(n.type == "LoadImage" for n in nodes):
        lines += ["", f"Start image: {START_IMAGE} (ComfyUI ships it in input/); load your own in Start image."]
    lines += ["", "Saves an mp4 in output/video/ (WanFit Save Video)."]
    return "\n".join(lines)


def ui_graph(name: str) -> list[Node]:
    """The graph as the editor gets it: the API graph with its note in front."""
    nodes = GRAPHS[name]()
    text = note_text(name, nodes)
    note = Node(max(n.id for n in nodes) + 1, "Note", {"text": text}, column=0, title="Read me: model files",
                width=540, height=20 + 17 * (text.count("\n") + 1))
    return [note, *nodes]


def ui_file(name: str) -> Path:
    return HERE / f"{TEMPLATES[name].name}.json"


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
    import thumbnails

    (HERE / "api").mkdir(exist_ok=True)
    for name, build in GRAPHS.items():
        (HERE / "api" / f"{name}.json").write_text(json.dumps(to_api(build()), indent=2) + "\n")
        ui = to_ui(ui_graph(name))
        ui_file(name).write_text(json.dumps(ui, indent=2) + "\n")
        thumbnails.draw(ui, TEMPLATES[name].title).save(ui_file(name).with_suffix(".jpg"), quality=88)
        print(f"wrote workflows/api/{name}.json, workflows/{TEMPLATES[name].name}.json and .jpg")


if __name__ == "__main__":
    main()
