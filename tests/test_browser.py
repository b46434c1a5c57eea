"""Each template as a user opens it: the current ComfyUI's own frontend in headless Chromium
loads the workflow from the template route, and the node boxes it draws (title bars and
image previews included) do not overlap, no node grows past the size it was saved at, the
template's picture is served, and the page logs no error about the pack.

Runs only against a current ComfyUI (COMFYUI_DIR; the 2024 one has no template route) with
the ``playwright`` package and a Chromium (CHROMIUM, else /usr/bin/chromium: Debian's
``chromium`` package); skipped otherwise."""
from __future__ import annotations

import json
import os
import shutil
import urllib.parse

import pytest

from e2e import build

pytestmark = pytest.mark.e2e
MODULE = "ComfyUI-WanFit-under-test"  # the folder name tests/comfy_server.py installs the pack under


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(comfy_server):
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("needs a current ComfyUI (COMFYUI_DIR): the 2024 one has no template browser")
    sync_api = pytest.importorskip("playwright.sync_api")
    if chromium() is None:
        pytest.skip("no Chromium (apt-get install chromium, or set CHROMIUM)")
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1600, "height": 1000})
        tab.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        tab.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        tab.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status} {r.url}"))
        tab.goto(comfy_server.url, wait_until="networkidle", timeout=120_000)
        tab.wait_for_function("window.app && window.app.graph", timeout=120_000)
        tab.problems = problems
        yield tab
        browser.close()


def ours(problems: list[str]) -> list[str]:
    """Errors that name the pack (the frontend's own 404s for optional user files are not ours)."""
    return [p for p in problems if "wanfit" in p.lower() or urllib.parse.quote(MODULE) in p or MODULE in p]


@pytest.mark.parametrize("name", sorted(build.GRAPHS))
def test_template_loads_without_overlaps(page, name):
    template = build.TEMPLATES[name].name
    url = f"/api/workflow_templates/{MODULE}/{urllib.parse.quote(template)}"
    listed = page.evaluate("async () => (await (await fetch('/api/workflow_templates')).json())")
    assert template in listed[MODULE]
    saved = page.evaluate(f"async () => (await fetch({json.dumps(url + '.json')})).json()")
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", saved)
    page.wait_for_timeout(2500)  # the start image's preview loads and the node makes room for it
    drawn = page.evaluate("() => window.app.graph._nodes.map(n => ({id: n.id, type: n.type, "
                          "size: [...n.size], box: [...n.getBounding()]}))")
    by_id = {n["id"]: n for n in saved["nodes"]}
    assert sorted(d["id"] for d in drawn) == sorted(by_id)
    for d in drawn:
        want = by_id[d["id"]]["size"]
        assert d["size"][0] <= want[0] + 0.5 and d["size"][1] <= want[1] + 0.5, (
            f"{d['type']} {d['id']} drawn at {d['size']}, saved at {want}")
    for i, a in enumerate(drawn):
        ax, ay, aw, ah = a["box"]
        for b in drawn[i + 1:]:
            bx, by, bw, bh = b["box"]
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), (
                f"{a['type']} {a['id']} overlaps {b['type']} {b['id']}")
    status = page.evaluate(f"async () => (await fetch({json.dumps(url + '.jpg')})).status")
    assert status == 200
    assert not ours(page.problems), ours(page.problems)
