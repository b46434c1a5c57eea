"""`make demo`: a text-to-video job end to end, written under out/.

With no MODELS_DIR, tiny random Wan checkpoints are written first (under the file names
ComfyUI users have) so the job runs anywhere in about a minute on a CPU; the frames are
noise-like because the weights are random. MODELS_DIR=/path/to/ComfyUI/models runs the same
code on real weights (Wan 2.1 T2V 1.3B, UMT5-XXL, Wan 2.1 VAE in that folder layout).

Every stage goes through the code the nodes use: checkpoint validation and detection,
lazy loading from the mmap, UMT5 with its embedded tokenizer, the DiT under classifier-free
guidance with the flow-matching sampler, and the causal VAE decode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pack import register  # noqa: E402

register()
import factory  # noqa: E402
from wanfit.optim import loading  # noqa: E402
from wanfit.wan.checkpoint import open_checkpoint  # noqa: E402
from wanfit.wan.denoise import Conditioning, make_denoiser  # noqa: E402
from wanfit.wan.detect import variant_name  # noqa: E402
from wanfit.wan.sampling import sample, seeded_noise  # noqa: E402
from wanfit.wan.schedulers import flow_sigmas  # noqa: E402

DIT = "wan2.1_t2v_1.3B_fp16.safetensors"
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"


def find(models: Path, folders: tuple[str, ...], name: str) -> Path:
    for folder in folders:
        if (models / folder / name).exists():
            return models / folder / name
    raise SystemExit(f"{name}: not found in {', '.join(str(models / f) for f in folders)}")


def save_video(frames: torch.Tensor, out: Path, fps: int) -> list[str]:
    """frames [F, H, W, 3] in 0..1 -> PNG per frame and an animated WEBP."""
    from PIL import Image

    images = [Image.fromarray((f.clamp(0, 1) * 255).round().byte().numpy()) for f in frames]
    (out / "frames").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out / "frames" / f"frame_{i:03d}.png")
    images[0].save(out / "video.webp", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                   loop=0, lossless=True)
    return [str(out / "video.webp"), str(out / "frames")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="a red boat on a blue lake at sunset, camera slowly pans")
    parser.add_argument("--negative", default="blurry, static, low quality")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--solver", default="unipc")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    args = parser.parse_args()
    if (args.frames - 1) % 4:
        raise SystemExit(f"--frames {args.frames}: Wan needs 4n+1 frames (e.g. 61, 81)")
    if args.width % 16 or args.height % 16:
        raise SystemExit(f"--width/--height {args.width}x{args.height}: must be multiples of 16")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    models = Path(os.environ["MODELS_DIR"]) if os.environ.get("MODELS_DIR") else out / "models"
    if not os.environ.get("MODELS_DIR"):
        t = time.perf_counter()
        factory.write_models(models, [DIT, TEXT_ENCODER, VAE])
        timings["write_tiny_models_s"] = time.perf_counter() - t
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    t = time.perf_counter()
    dit_ckpt = open_checkpoint(find(models, ("diffusion_models", "unet"), DIT), expect="dit")
    encoder, tokenizer = loading.load_text_encoder(
        open_checkpoint(find(models, ("text_encoders", "clip"), TEXT_ENCODER), expect="t5"), dtype, device)
    timings["load_text_encoder_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        ids, mask = tokenizer([args.prompt, args.negative])
        context, _ = encoder.encode_padded(ids.to(device), mask.to(device))
    del encoder  # the text encoder leaves before the DiT arrives
    timings["encode_text_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model = loading.load_dit(dit_ckpt, dtype=dtype, device=device)
    timings["load_dit_s"] = time.perf_counter() - t
    model_name = variant_name(model.config)
    print(f"model: {model_name} from {dit_ckpt.name}")
    shape = (1, model.config.out_dim, 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8)
    sigmas = flow_sigmas(args.steps, args.shift)
    denoise = make_denoiser(model, Conditioning(context[:1]), Conditioning(context[1:]), args.cfg)
    step_times: list[float] = []

    def progress(step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        step_times.append(time.perf_counter())
        print(f"  step {step + 1}/{total}", flush=True)

    t = time.perf_counter()
    with torch.inference_mode():
        latent = sample(denoise, torch.zeros(shape), sigmas, args.solver, noise=seeded_noise(args.seed, shape),
                        callback=progress).latent
    timings["sample_s"] = time.perf_counter() - t
    del model

    t = time.perf_counter()
    vae = loading.load_vae(open_checkpoint(find(models, ("vae",), VAE), expect="vae"), torch.float32, device)
    with torch.inference_mode():
        video = vae.decode(latent.to(device))  # [1, 3, F, H, W] in [-1, 1]
    frames = ((video[0].permute(1, 2, 3, 0).float().cpu() + 1) / 2)
    timings["decode_s"] = time.perf_counter() - t
    written = save_video(frames, out, fps=16)

    report = {
        "prompt": args.prompt, "frames": frames.shape[0], "width": frames.shape[2], "height": frames.shape[1],
        "steps": args.steps, "cfg": args.cfg, "shift": args.shift, "solver": args.solver, "seed": args.seed,
        "model": model_name, "device": str(device),
        "models_dir": str(models), "timings": {k: round(v, 3) for k, v in timings.items()},
        "seconds_per_step": round(timings["sample_s"] / args.steps, 3),
        "peak_host_rss_mb": round(_peak_rss() / 2**20, 1), "outputs": written,
    }
    if device.type == "cuda":
        report["peak_vram_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
