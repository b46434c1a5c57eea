"""bench/memory_plan.py: the issue's cases print the plans the README and BENCHMARKS.md quote."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "memory_plan.py"


def _plans(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {(p["card_gib"], p["frames"], p["width"], p["weights"]): p for p in result["plans"]}


@pytest.fixture(scope="module")
def default_plans() -> dict:
    return _plans()


def test_plans_for_the_issue_cases(default_plans):
    plans = default_plans
    fp8 = "fp8_e4m3fn_scaled"
    assert len(plans) == 22 and not any("error" in p for p in plans.values())
    # 161 / 241 frames in 81-frame windows: the activations of one window, every block resident
    for frames, windows in ((161, 3), (241, 5)):
        long = plans[32, frames, 832, fp8]
        assert (long["resident"], long["windows"], long["window_tokens"]) == (40, windows, 32760)
        assert long["activation_peak"] == plans[32, 81, 832, fp8]["activation_peak"]
    for card in (16, 12, 8):  # GGUF experts: Q4_K moves about half an fp8 block's bytes
        fp8_plan, q8, q4 = (plans[card, 81, 832, w] for w in (fp8, "Q8_0 GGUF", "Q4_K GGUF"))
        assert q4["block_bytes"] < 0.6 * fp8_plan["block_bytes"] < q8["block_bytes"]
        assert q4["resident"] > fp8_plan["resident"] >= q8["resident"]
    for frames in (61, 81, 121):  # seed 001: ComfyUI offloads here; nothing needs to
        plan = plans[32, frames, 832, fp8]
        assert (plan["resident"], plan["swapped"]) == (40, 0)
        assert plan["peak_vram"] <= plan["budget"]
    bf16 = plans[32, 81, 832, "bf16"]  # 26.6 GiB of weights: fits only one CFG branch at a time
    assert (bf16["batch"], bf16["passes"]) == (1, 2) and bf16["sampling_vram"] > 0.9 * bf16["budget"]
    swapped = [plans[card, 81, 832, fp8]["swapped"] for card in (24, 16, 12, 8)]
    assert swapped == sorted(swapped) and swapped[-1] > swapped[1] > 0
    # TI2V-5B's per-token timesteps are modulated run by run, no [B, L, 6, dim] tensors:
    # 121 frames at 1280x704 stay resident on 16 GB and batch cond / uncond on 24 GB
    assert plans[16, 121, 1280, "fp16"]["swapped"] == 0
    assert plans[24, 121, 1280, "fp16"]["batch"] == 2
    # 1280x720 decode: whole frames on the GPU where they fit (12 GB), tiles where not (8 GB)
    vaes = [next(e for e in plans[card, 81, 1280, fp8]["encoders"] if e["name"] == "VAE") for card in (12, 8)]
    assert [(v["device"], v["tiling"] is None) for v in vaes] == [("gpu", True), ("gpu", False)]
    assert vaes[1]["work_bytes"] < vaes[0]["work_bytes"]
    for plan in plans.values():
        assert plan["peak_vram"] <= plan["budget"]
        t5 = next(e for e in plan["encoders"] if e["name"] == "T5")
        assert t5["weight_bytes"] < 7 * 2**30  # the fp8 file the workflows ship, not bf16


def test_t5_in_bf16_is_counted_larger(default_plans):
    fp8 = default_plans[12, 81, 832, "fp8_e4m3fn_scaled"]
    only = _plans("--t5", "bf16", "--card", "12", "--frames", "81")  # the 4 cases of 12 GB at 81 frames
    assert {(card, frames) for card, frames, _, _ in only} == {(12, 81)} and len(only) == 4
    bf16 = only[12, 81, 832, "fp8_e4m3fn_scaled"]
    t5 = [next(e for e in p["encoders"] if e["name"] == "T5") for p in (fp8, bf16)]
    assert 1.5 < t5[1]["weight_bytes"] / t5[0]["weight_bytes"] < 1.8
    assert (t5[0]["device"], t5[1]["device"]) == ("gpu", "cpu")  # 12 GB: only the fp8 T5 fits
    assert bf16["peak_host"] > fp8["peak_host"]
