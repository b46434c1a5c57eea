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
