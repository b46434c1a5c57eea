"""wan/ and optim/ are plain PyTorch: they import in a process with no ComfyUI anywhere."""
import subprocess
import sys
import textwrap

from conftest import REPO_ROOT


def test_library_imports_without_comfyui():
    code = textwrap.dedent(f"""
        import importlib, importlib.util, pkgutil, sys
        spec = importlib.util.spec_from_file_location(
            "pack", {str(REPO_ROOT / '__init__.py')!r}, submodule_search_locations=[{str(REPO_ROOT)!r}])
        # Register the package without running its __init__ (that one is ComfyUI's entry point).
        pack = importlib.util.module_from_spec(spec)
        sys.modules["pack"] = pack
        for sub in ("wan", "optim"):
            base = importlib.import_module("pack." + sub)
            for info in pkgutil.iter_modules(base.__path__):
                importlib.import_module(f"pack.{{sub}}.{{info.name}}")
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in
                        ("comfy", "folder_paths", "comfy_extras", "server", "execution", "nodes"))
        assert not leaked, leaked
        print("ok", len([m for m in sys.modules if m.startswith("pack.")]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
