"""Step caches on random Wan DiTs: steps skipped, wall time against no cache, and how far the
output moves (PSNR of decoded frames against the uncached run), for 4-, 8-, 20- and 40-step
schedules at the published thresholds.

Random weights make the deviation a consistency check, not a quality claim: it says the cache
does what its rule says and how much it moves an output, never how a real video would look.
Which steps a published MagCache set skips does not depend on the weights (its ratios are
fixed); TeaCache's and EasyCache's decisions do.

Per size and schedule, one uncached run (the reference), then:

    teacache      published Wan 2.1 t2v 1.3B coefficients, mode e, threshold 0.05
    teacache_cal  coefficients from a calibration run of this model at this step count
                  (WanFit Cache Calibrate's path), mode e, threshold 0.05
    magcache      published Wan 2.1 t2v 1.3B ratios (resampled), threshold 0.12, K 4, retention 0.2
    easycache     threshold 0.05, warm-up the published 10 of 50 steps, scaled

With 8 or fewer steps the nodes skip nothing by default (see README); the bench runs the
policies anyway there ("forced") to show why. CFG 5 runs batched (cond + uncond rows), unipc,
shift 5. Frames are decoded by a small random Wan 2.1 VAE (dim 8) in float32 and compared in
0..1 as ComfyUI's IMAGE holds them.

Sizes: tiny (dim 128, 2 blocks, 48 tokens), medium (dim 1024, 4 blocks, 96 tokens, 512 text
tokens), full (the Wan 2.1 T2V 1.3B shape at 33 frames 832x480; CUDA only).

    python bench/step_cache.py [--sizes tiny,medium] [--steps 4,8,20,40] [--device cpu] [--threads 1]
                               [--repeats 2]

Wall times are the fastest of ``--repeats`` runs (CPU timings on a shared machine vary by
tens of percent from run to run); ``block_calls_run`` (block-stack calls that ran, cond and
uncond rows counted apart) is exact.

The last line of stdout is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # DiT shape, latent [C, T, H, W]
    "tiny": (dict(dim=128, ffn_dim=256, num_heads=1, num_layers=2, freq_dim=64, text_dim=64), (16, 3, 8, 8)),
    "medium": (dict(dim=1024, ffn_dim=4096, num_heads=8, num_layers=4, freq_dim=256, text_dim=256), (16, 3, 8, 16)),
    "full": (dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, freq_dim=256, text_dim=4096), (16, 9, 60, 104)),
}
POLICIES = ("teacache", "teacache_cal", "magcache", "easycache")
CFG, SHIFT, SOLVER, SEED = 5.0, 5.0, "unipc", 42
TEXT_TOKENS = 32


def _import_pack():
    """Register the repository as the package ``wanfit``, as the tests do (tests/pack.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pack import register

    register()


def build(size: str, device: torch.device, dtype: torch.dtype):
    """A seeded random DiT of ``size``, its two prompts and a small random VAE."""
    from wanfit.wan.denoise import Conditioning
    from wanfit.wan.model import WanConfig, WanModel
    from wanfit.wan.vae21 import WanVAE21
    from wanfit.wan.vae_common import Wan21VAEConfig
    shape, latent = SIZES[size]
    torch.manual_seed(0)
    with torch.device(device):
        model = WanModel(WanConfig("t2v", **shape)).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [Conditioning(torch.randn(1, TEXT_TOKENS, shape["text_dim"], generator=gen).to(device, dtype))
               for _ in range(2)]
    torch.manual_seed(2)
    vae = WanVAE21(Wan21VAEConfig(dim=8, z_dim=16)).eval()
    return model, prompts, vae, latent


def _blocks(model):
    """The model's own block loop in the denoiser hook's (state, call) form."""
    return lambda state, call: model.run_blocks(state)


def run_job(model, prompts, latent_shape, steps: int, cache=None, device=torch.device("cpu")):
    """One uncached-or-cached sampling job; returns the latent and its wall time in seconds."""
    from wanfit.wan.denoise import make_denoiser
    from wanfit.wan.sampling import sample, seeded_noise
    from wanfit.wan.schedulers import flow_sigmas
    run = _blocks(model) if cache is None else cache.wrap(_blocks(model), "bench")
    denoise = make_denoiser(model, prompts[0], prompts[1], CFG, batch_cfg=True, run_blocks=run)
    shape = (1, *latent_shape)
    noise = seeded_noise(SEED, shape).to(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = sample(denoise, torch.zeros(shape, device=device), flow_sigmas(steps, SHIFT), SOLVER, noise=noise)
    _sync(device)
    return out.latent.float().cpu(), time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def frames(vae, latent: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return ((vae.decode(latent) + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """dB for images in 0..1; None when identical."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return None if mse == 0 else 10 * math.log10(1.0 / mse)


def policies(steps: int, calibration):
    from wanfit.optim.step_cache import EasyCache, MagCache, TeaCache, easycache_warmup
    return {
        "teacache": TeaCache.published("wan2.1_t2v_1.3B", "e"),
        "teacache_cal": TeaCache(tuple(calibration.teacache["e"]), 0.05, "e", f"calibration {calibration.name}"),
        "magcache": MagCache.published("wan2.1_t2v_1.3B", steps),
        "easycache": EasyCache(0.05, easycache_warmup(steps)),
    }


def bench_size(size: str, schedules: list[int], device: torch.device, names=POLICIES, repeats: int = 1) -> dict:
    """Every schedule of ``size``; wall times are the fastest of ``repeats`` runs each."""
    from wanfit.optim.step_cache import SHORT_SCHEDULE, Calibrate, StepCache
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model, prompts, vae, latent_shape = build(size, device, dtype)
    c = model.config
    run_job(model, prompts, latent_shape, 2, device=device)  # warm-up: first-call costs stay out of the timings
    result = {"config": {"dim": c.dim, "blocks": c.num_layers, "tokens": math.prod(latent_shape[1:]) // 4,
                         "latent": list(latent_shape), "dtype": str(dtype).removeprefix("torch.")},
              "schedules": {}}
    for steps in schedules:
        reference, base_s = run_job(model, prompts, latent_shape, steps, device=device)
        for _ in range(repeats - 1):
            base_s = min(base_s, run_job(model, prompts, latent_shape, steps, device=device)[1])
        ref_frames = frames(vae, reference)
        recorder = StepCache(Calibrate(), steps)
        recorded, _ = run_job(model, prompts, latent_shape, steps, recorder, device)
        row = {"uncached_s": round(base_s, 4), "default_skips_nothing": steps <= SHORT_SCHEDULE,
               "calibration_identical": bool(torch.equal(recorded, reference))}
        made = policies(steps, recorder.calibration(f"bench_{size}_{steps}"))
        for name in names:
            cache = StepCache(made[name], steps)
            out, wall = run_job(model, prompts, latent_shape, steps, cache, device)
            report = cache.report()
            for _ in range(repeats - 1):
                wall = min(wall, run_job(model, prompts, latent_shape, steps, StepCache(made[name], steps), device)[1])
            p = psnr(frames(vae, out), ref_frames)
            row[name] = {"skipped": report["steps_skipped"], "skipped_steps": report["skipped_steps"],
                         "block_calls_run": sum(b["calls"] - len(b["skipped"]) for b in report["branches"].values()),
                         "wall_s": round(wall, 4), "speedup": round(base_s / wall, 3),
                         "psnr_frames_db": None if p is None else round(p, 2), "identical": p is None,
                         "latent_rel_err": round(float((out - reference).norm() / reference.norm()), 5),
                         "error_estimate": round(report["error_estimate"], 4)}
        result["schedules"][str(steps)] = row
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,medium")
    parser.add_argument("--steps", default="4,8,20,40")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--repeats", type=int, default=2, help="wall time: the fastest of this many runs")
    args = parser.parse_args(argv)
    _import_pack()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {"device": str(device), "threads": torch.get_num_threads(), "repeats": args.repeats, "cfg": CFG,
           "shift": SHIFT,
           "solver": SOLVER, "note": "random weights: the deviation is a consistency check, not a quality claim",
           "sizes": {}}
    for size in args.sizes.split(","):
        if size == "full" and device.type != "cuda":
            out["sizes"][size] = {"skipped": "the full size runs on a CUDA device only"}
            continue
        out["sizes"][size] = bench_size(size, [int(s) for s in args.steps.split(",")], device,
                                        args.policies.split(","), args.repeats)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
