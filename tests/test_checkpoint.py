"""Opening model files: validation before any weight is read, family and prefix detection."""
import pytest
import torch
from safetensors.torch import save_file

from wanfit.wan.checkpoint import CheckpointError, open_checkpoint


def _dit_tensors(prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2),
            prefix + "head.head.weight": torch.zeros(64, 8),
            prefix + "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}


def test_dit_with_comfyui_prefix(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_dit_tensors("model.diffusion_model."), str(path))
    ckpt = open_checkpoint(path, expect="dit")
    assert ckpt.family == "dit" and ckpt.prefix == "model.diffusion_model."
    assert ckpt.shapes["patch_embedding.weight"] == (8, 16, 1, 2, 2)
    assert torch.equal(ckpt.get_tensor("head.head.weight"), torch.zeros(64, 8))
    assert dict(ckpt.iter_tensors(["head.head.weight"]))["head.head.weight"].shape == (64, 8)


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "wan2.1_t2v_1.3B_fp16.safetensors"
    save_file(_dit_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"wan2.1_t2v_1.3B_fp16.safetensors: truncated"):
        open_checkpoint(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is a text file, not a model" * 10)
    with pytest.raises(CheckpointError, match=r"notes.safetensors: not a safetensors file"):
        open_checkpoint(path)


def test_empty_and_tiny_files(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors: file is 0 bytes"):
        open_checkpoint(path)


def test_pickle_checkpoint_refused(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: WanFit reads .safetensors files only"):
        open_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="gone.safetensors: no such file"):
        open_checkpoint(tmp_path / "gone.safetensors")


def test_other_family_is_named(tmp_path):
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3),
               "decoder.conv1.weight": torch.zeros(4, 16, 3, 3, 3)}, str(path))
    assert open_checkpoint(path).family == "vae"
    with pytest.raises(CheckpointError, match=r"wan_2.1_vae.safetensors: this is a Wan VAE, but this "
                                              r"loader needs a Wan diffusion model"):
        open_checkpoint(path, expect="dit")


def test_unknown_model_family(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=r"sd15.safetensors: not a Wan diffusion model \(DiT\)"):
        open_checkpoint(path, expect="dit")


# --- broken headers: each is a CheckpointError naming the file and what is wrong ---------------

def _raw_file(path, header, data: bytes = b"") -> None:
    import json
    import struct
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


GOOD = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
BROKEN_HEADERS = {
    "not an object": ({"a": 5}, 16, r"tensor 'a' is not an object"),
    "no dtype": ({"a": {"shape": [2, 2], "data_offsets": [0, 16]}}, 16, r"tensor 'a' has no dtype"),
    "unknown dtype": ({"a": dict(GOOD, dtype="Q4")}, 16, r"tensor 'a' has unknown dtype 'Q4'"),
    "shape of strings": ({"a": dict(GOOD, shape=["2", 2])}, 16, r"tensor 'a' has shape \['2', 2\]"),
    "negative dim": ({"a": dict(GOOD, shape=[-2, -2])}, 16, r"tensor 'a' has shape \[-2, -2\]"),
    "one offset": ({"a": dict(GOOD, data_offsets=[0])}, 16, r"tensor 'a' has data_offsets \[0\]"),
    "negative offset": ({"a": dict(GOOD, data_offsets=[-16, 0])}, 16, r"data_offsets \[-16, 0\]"),
    "larger shape than bytes": ({"a": dict(GOOD, shape=[4096, 4096])}, 16,
                                r"tensor 'a' is F32 \[4096, 4096\] \(67,108,864 bytes\) but its data_offsets span 16"),
    "overlap": ({"a": GOOD, "b": dict(GOOD, data_offsets=[8, 24])}, 24, r"tensor 'b' at byte 8 overlaps"),
    "gap": ({"a": GOOD, "b": dict(GOOD, data_offsets=[32, 48])}, 48, r"tensor 'b' at byte 32 leaves a gap of 16"),
    "trailing bytes": ({"a": GOOD}, 20, r"4 bytes after its last tensor"),
    "metadata not strings": ({"__metadata__": {"x": 1}, "a": GOOD}, 16, r"__metadata__ must map names to strings"),
}


@pytest.mark.parametrize("case", list(BROKEN_HEADERS))
def test_broken_header_is_named(tmp_path, case):
    header, data_size, message = BROKEN_HEADERS[case]
    path = tmp_path / "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
    _raw_file(path, header, bytes(data_size))
    with pytest.raises(CheckpointError, match=r"^wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors: .*" + message):
        open_checkpoint(path)


def test_a_huge_header_is_refused_without_reading_it(tmp_path):
    import struct
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100 * 2**20))
        f.truncate(8 + 100 * 2**20 + 64)  # sparse: nothing is written or read
    with pytest.raises(CheckpointError, match=r"huge.safetensors: its header claims 104,857,600 bytes"):
        open_checkpoint(path)


def test_a_file_that_passes_the_header_checks_loads_with_safetensors(tmp_path):
    """The checks are the format's own: what they accept, safetensors reads."""
    path = tmp_path / "ok.safetensors"
    save_file({"b": torch.ones(3), "a": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(path))
    from wanfit.wan.checkpoint import read_header
    header, _ = read_header(path)
    assert set(header) == {"a", "b"}
