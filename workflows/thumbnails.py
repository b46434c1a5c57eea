"""Template pictures: the graph's layout drawn small, under its title (what ComfyUI's template
browser shows for ``<name>.jpg`` beside a custom node's workflow). Drawn with Pillow from the
UI-format graph, so the picture follows the layout; no screenshot, nothing random."""
from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

SIZE = 512
BACKGROUND = (32, 34, 40)
COLOURS = {  # node body colour by what the node does
    "load": (52, 92, 140), "encode": (48, 120, 88), "sample": (120, 72, 140), "output": (170, 104, 40),
    "note": (110, 96, 48), "other": (80, 84, 92),
}


def kind(node_type: str) -> str:
    if node_type == "Note":
        return "note"
    if "Loader" in node_type or node_type in ("LoadImage", "WanFitLoRA"):
        return "load"
    if "Encode" in node_type or "Embeds" in node_type:
        return "encode"
    if "Sampler" in node_type or "ContextWindows" in node_type:
        return "sample"
    if "Decode" in node_type or "Save" in node_type:
        return "output"
    return "other"


def _font(size: int):
    return ImageFont.load_default(size=size)


def draw(ui: dict, title: str) -> Image.Image:
    """A SIZE x SIZE picture: the title on top, the node boxes and links below."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    lines = textwrap.wrap(title, 30)
    y = 18
    for line in lines:
        pen.text((20, y), line, fill=(236, 236, 236), font=_font(28))
        y += 36
    # the graph, scaled into the area below the title
    nodes = ui["nodes"]
    left = min(n["pos"][0] for n in nodes)
    top = min(n["pos"][1] - 30 for n in nodes)
    right = max(n["pos"][0] + n["size"][0] for n in nodes)
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes)
    area = (20, y + 14, SIZE - 20, SIZE - 20)
    scale = min((area[2] - area[0]) / (right - left), (area[3] - area[1]) / (bottom - top))
    ox = area[0] + ((area[2] - area[0]) - (right - left) * scale) / 2

    def at(x, y_):
        return ox + (x - left) * scale, area[1] + (y_ - top) * scale

    by_id = {n["id"]: n for n in nodes}
    for _, src, _, dst, _, _ in ui["links"]:
        a, b = by_id[src], by_id[dst]
        start = at(a["pos"][0] + a["size"][0], a["pos"][1] + 10)
        end = at(b["pos"][0], b["pos"][1] + 10)
        pen.line([start, end], fill=(150, 150, 160), width=2)
    for n in nodes:
        x0, y0 = at(n["pos"][0], n["pos"][1] - 30)
        x1, y1 = at(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        colour = COLOURS[kind(n["type"])]
        pen.rounded_rectangle([x0, y0, x1, y1], radius=4, fill=colour, outline=(210, 210, 215))
        pen.rectangle([x0 + 1, y0 + 1, x1 - 1, y0 + 30 * scale], fill=tuple(c // 2 for c in colour))
    return image
