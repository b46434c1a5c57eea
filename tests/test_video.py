"""WanFit Save Video and optim/video.py: the file decoded back with PyAV has the frames, the
frame rate, the size and (within codec loss) the pixels of the IMAGE input; the metadata
holds the prompt and the graph; without PyAV the node writes an animated WEBP."""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from wanfit.nodes import NODE_CLASS_MAPPINGS, comfy, save
from wanfit.optim import video

av = pytest.importorskip("av")


def moving_frames(frames: int = 9, height: int = 48, width: int = 80) -> torch.Tensor:
    """Smooth gradients that move: what a video codec is made for (noise would measure nothing)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([torch.stack([(x + t / frames) % 1, y, 0.5 + 0.4 * torch.sin(6 * x + t)], -1)
                        for t in range(frames)])


def decode(path) -> tuple[np.ndarray, Fraction, dict, str]:
    with av.open(str(path)) as f:
        stream = f.streams.video[0]
        pixels = np.stack([frame.to_ndarray(format="rgb24") for frame in f.decode(stream)])
        return pixels, stream.average_rate, dict(f.metadata), stream.codec_context.name


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255 ** 2 / mse))


@pytest.mark.parametrize("container, codec", [("mp4", "h264"), ("webm", "vp9")])
def test_decoded_file_matches_the_frames(tmp_path, container, codec):
    frames = moving_frames()
    path = tmp_path / f"v.{container}"
    info = video.write(frames, path, fps=16.0, container=container, metadata={"prompt": {"1": {"x": 1}}})
    pixels, rate, meta, name = decode(path)
    assert name == codec
    assert pixels.shape == (9, 48, 80, 3) and (info.frames, info.width, info.height) == (9, 80, 48)
    assert rate == 16 and not info.padded
    # yuv420p halves chroma; crf 19 on smooth content measured 32 dB (one bad frame would drop far lower)
    assert psnr(pixels, video.to_uint8(frames)) > 28
    assert json.loads({k.lower(): v for k, v in meta.items()}["prompt"]) == {"1": {"x": 1}}


def test_odd_sizes_are_padded_and_fractional_fps_kept(tmp_path):
    frames = moving_frames(frames=5, height=33, width=47)
    info = video.write(frames, tmp_path / "odd.mp4", fps=23.976)
    pixels, rate, _, _ = decode(tmp_path / "odd.mp4")
    assert pixels.shape == (5, 34, 48, 3) and info.padded
    assert rate == Fraction(23976, 1000)
    assert psnr(pixels[:, :33, :47], video.to_uint8(frames)) > 28


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="fps nan"):
        video.write(moving_frames(), tmp_path / "a.mp4", fps=float("nan"))
    with pytest.raises(ValueError, match="crf 60"):
        video.write(moving_frames(), tmp_path / "a.mp4", fps=16, crf=60)
    with pytest.raises(ValueError, match=r"shape \(9, 48, 80\)"):
        video.write(moving_frames()[..., 0], tmp_path / "a.mp4", fps=16)


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    def save_path(prefix, width, height, temp=False):
        folder = tmp_path / ("temp" if temp else "output")
        folder.mkdir(exist_ok=True)
        return str(folder), prefix.replace("/", "_"), len(list(folder.iterdir())) + 1, ""
    monkeypatch.setattr(comfy, "save_path", save_path)
    monkeypatch.setattr(comfy, "metadata_disabled", lambda: False)
    return tmp_path


def test_node_writes_mp4_with_prompt_and_workflow(output_dir, monkeypatch):
    monkeypatch.setattr(comfy, "has_video_type", lambda: True)
    node = NODE_CLASS_MAPPINGS["WanFitSaveVideo"]()
    graph = {"nodes": [{"id": 1}], "links": []}
    out = node.save(moving_frames(), "video/WanFit", 16.0, "mp4", 19, prompt={"1": {"class_type": "X"}},
                    extra_pnginfo={"workflow": graph})
    assert out["ui"] == {"images": [{"filename": "video_WanFit_00001_.mp4", "subfolder": "", "type": "output"}],
                         "animated": (True,)}  # what ComfyUI's SaveVideo returns: its frontend plays it
    pixels, rate, meta, _ = decode(output_dir / "output" / "video_WanFit_00001_.mp4")
    assert len(pixels) == 9 and rate == 16
    assert json.loads(meta["workflow"]) == graph and json.loads(meta["prompt"]) == {"1": {"class_type": "X"}}


def test_node_on_the_2024_comfyui_adds_a_webp_preview(output_dir, monkeypatch):
    """That frontend shows outputs as <img> only: the mp4 comes first (the file), then a preview."""
    monkeypatch.setattr(comfy, "has_video_type", lambda: False)
    out = NODE_CLASS_MAPPINGS["WanFitSaveVideo"]().save(moving_frames(height=600, width=1000), "v", 16.0, "mp4", 19)
    first, preview = out["ui"]["images"]
    assert first["filename"].endswith(".mp4") and preview["type"] == "temp"
    with Image.open(output_dir / "temp" / preview["filename"]) as webp:
        assert webp.n_frames == 9 and webp.size == (512, 307)


def test_without_pyav_the_node_writes_webp_and_warns_once(output_dir, monkeypatch, caplog):
    monkeypatch.setattr(video, "available", lambda: False)
    monkeypatch.setattr(save, "_warned", [])
    node = NODE_CLASS_MAPPINGS["WanFitSaveVideo"]()
    with caplog.at_level("WARNING", logger="WanFit"):
        out = node.save(moving_frames(), "v", 16.0, "mp4", 19, prompt={"1": {}})
        node.save(moving_frames(), "v", 16.0, "mp4", 19)
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        "WanFit Save Video: PyAV (the av package) is not installed, so videos are saved as animated WEBP; "
        "pip install av (it is in the pack's requirements.txt) for mp4 / webm"]
    file = out["ui"]["images"][0]["filename"]
    assert file.endswith(".webp")
    with Image.open(output_dir / "output" / file) as webp:
        webp.seek(1)
        webp.load()
        assert webp.n_frames == 9 and webp.info["duration"] == 62  # 16 fps
        assert webp.getexif()[0x0110] == 'prompt:{"1": {}}'


def test_node_class_mappings_list_every_node_module():
    """The literal NODE_CLASS_MAPPINGS (read by static scanners) misses no module's NODES."""
    import importlib
    import pkgutil

    import wanfit.nodes

    every = {}
    for info in pkgutil.iter_modules(wanfit.nodes.__path__):  # every module of nodes/, a new one too
        every.update(getattr(importlib.import_module(f"wanfit.nodes.{info.name}"), "NODES", {}))
    assert NODE_CLASS_MAPPINGS == every
