"""Node boxes as ComfyUI's frontend draws them, and a placement that keeps them apart.

The frontend (LiteGraph) draws a node's title bar above its position and gives the body at
least ``min_size``: one slot row per socket (inputs and outputs side by side), one row per
widget, multi-line text boxes taller, an image preview below a Load Image's widgets. A
saved size below that is enlarged when the graph loads, over whatever lies beneath: that is
how a low-noise sampler covered the bottom of the high-noise one. The constants below were
read from ComfyUI 0.3.64's frontend (1.27.10) in headless Chromium (``node.computeSize()``
for every node type the workflows use); the estimate of a node's width from its texts errs
on the wide side. ``tests/test_layout.py`` checks every shipped workflow with these sizes;
``tests/test_browser.py`` checks the boxes the real frontend draws.

Placement: nodes sit in columns (``Node.column``) in list order, each column as wide as its
widest node, a gap between neighbours; a node's height is the frontend's minimum or the
``height`` asked for, whichever is larger.
"""
from __future__ import annotations

TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT, drawn above pos
SLOT_H = 20  # LiteGraph.NODE_SLOT_HEIGHT: one row per socket
WIDGET_H = 24  # a combo / number / text / toggle / button row, spacing included
TEXT_BOX_H = 58  # a multi-line text widget's minimum
PAD_WIDGETS, PAD_TEXT_ONLY = 14, 10  # below the last widget (measured 14 with rows, 6-10 with text boxes only)
IMAGE_PREVIEW_H = 224  # a Load Image grows by this when its picture is shown (102 -> 326)
MIN_W = 210  # the narrowest node the frontend draws with widgets
CHAR_W = 8  # px per title character (14 px sans; measured 7-7.5 on average)
LABEL_CHAR_W = 7  # px per socket label character (12 px)
COLUMN_W = 320  # the narrowest column
GAP_X, GAP_Y = 60, 30  # between columns (room for the links), between a node's bottom and the next title


def min_size(title: str, sockets: list[str], outputs: list[str], widgets: list[str], preview_h: int = 0
             ) -> tuple[int, int]:
    """(width, height) of the body the frontend draws at least. ``widgets``: one kind per widget
    row ("row" or "text" for a multi-line box); ``preview_h``: room a picture takes below them."""
    rows = max(len(sockets), len(outputs), 1)
    height = rows * SLOT_H + sum(TEXT_BOX_H if w == "text" else WIDGET_H for w in widgets)
    if widgets:
        height += PAD_WIDGETS if "row" in widgets else PAD_TEXT_ONLY
    else:
        height += 6
    label_rows = [(len(sockets[i]) if i < len(sockets) else 0) + (len(outputs[i]) if i < len(outputs) else 0)
                  for i in range(rows)]
    width = max(MIN_W, CHAR_W * len(title) + 40, LABEL_CHAR_W * max(label_rows) + 70)
    return width, height + preview_h


def place(nodes, size_of) -> None:
    """Set ``pos`` and ``size`` of every node: columns left to right, nodes top to bottom in
    list order. ``size_of(node) -> (min width, height)``."""
    sizes = {id(n): size_of(n) for n in nodes}
    x = 0
    for column in sorted({n.column for n in nodes}):
        members = [n for n in nodes if n.column == column]
        width = max(COLUMN_W, *(sizes[id(n)][0] for n in members))
        y = 0
        for n in members:
            n.pos, n.size = (x, y), (width, sizes[id(n)][1])
            y += sizes[id(n)][1] + GAP_Y + TITLE_H
        x += width + GAP_X


def box(pos, size) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node as drawn, title bar included."""
    return pos[0], pos[1] - TITLE_H, pos[0] + size[0], pos[1] + size[1]


def overlaps(boxes: dict, margin: float = 0) -> list[tuple]:
    """Pairs of names whose boxes come closer than ``margin``."""
    names = list(boxes)
    found = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (l1, t1, r1, b1), (l2, t2, r2, b2) = boxes[a], boxes[b]
            if l1 < r2 + margin and l2 < r1 + margin and t1 < b2 + margin and t2 < b1 + margin:
                found.append((a, b))
    return found
