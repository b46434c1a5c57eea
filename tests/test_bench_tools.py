"""The bench tooling: the suite runner (bench/run.py, bench/suite.py), the report comparison
(bench/compare.py), the GPU acceptance run's CPU-side logic (bench/gpu_check.py) and the docs
table generator (bench/docs.py). Fake benches are tiny Python scripts; nothing here times
anything real."""
from __future__ import annotations

import copy
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pack import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return load_script(BENCH / f"{name}.py", f"bench_tool_{name}")


suite = _load("suite")
run = _load("run")
compare = _load("compare")
gpu_check = _load("gpu_check")
docs = _load("docs")


def _script(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text(textwrap.dedent(body), encoding="utf-8")


# ----------------------------------------------------------------------------- registry and figures

def test_every_bench_script_is_registered_once():
    assert run.unregistered() == [], "register new benches in bench/suite.py (one Bench line)"
    names = [b.name for b in suite.BENCHES]
    assert len(names) == len(set(names))
    for b in suite.BENCHES:
        assert (BENCH / b.script).is_file(), b.script
        assert b.needs in ("any", "cuda") or b.needs.startswith("cuda:"), b.name
        assert b.repeats >= 1 and b.figures, b.name


def test_figure_patterns_name_keys_and_pool_list_items():
    raw = {"layers": {"attn": {"bf16": {"ms": 2.0}, "fp8": {"ms": 1.0}, "note": "x"}},
           "runs": [{"cold_s": 1.5}, {"cold_s": 1.25}, {"cold_s": None}], "flag": True,
           "figures": {"speedup": {"value": [2.0, 2.5], "unit": "x", "better": "higher"},
                       "bad": {"value": 1, "better": "sideways"}}}
    bench = suite.Bench("b", "b.py", figures=(suite.lower("layers/*/*/ms", "ms"), suite.lower("runs/[]/cold_s", "s"),
                                              suite.higher("flag", "?"), suite.lower("missing/*", "s")))
    found = suite.extract(bench, raw)
    assert found["layers/attn/bf16/ms"] == {"unit": "ms", "better": "lower", "timing": True, "samples": [2.0]}
    assert found["layers/attn/fp8/ms"]["samples"] == [1.0]
    assert found["runs/cold_s"]["samples"] == [1.5, 1.25]  # None is no sample
    assert found["speedup"] == {"unit": "x", "better": "higher", "timing": False, "samples": [2.0, 2.5]}
    assert "flag" not in found and "bad" not in found  # a bool is no figure; a bad direction is refused
    with pytest.raises(ValueError, match="better"):
        suite.Figure("x", "s", "faster")


# ----------------------------------------------------------------------------- the runner

@pytest.fixture(scope="module")
def fake_benches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    _script(folder, "good.py", """
        import json, os, random
        n = int(os.environ.get("GOOD_N", "0"))
        print("working...")
        print(json.dumps({"t_s": 1.0 + random.random() / 100, "bytes": 1000, "rate": 50.0}))
    """)
    _script(folder, "crash.py", """
        import sys
        print("Traceback: something broke in the bench", file=sys.stderr)
        sys.exit(3)
    """)
    _script(folder, "hang.py", """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open(sys.argv[1], "w").write(str(child.pid))
        time.sleep(120)
    """)
    _script(folder, "nocuda.py", """
        print('{"skipped": "no CUDA device"}')
    """)
    _script(folder, "nojson.py", """
        print("done, but no JSON")
    """)
    return folder


FIGS = (suite.lower("t_s", "s"), suite.lower("bytes", "B"), suite.higher("rate", "1/s"))


def _fake_suite(folder: Path, pid_file: Path) -> list:
    return [suite.Bench("good", "good.py", figures=FIGS, repeats=3),
            suite.Bench("crash", "crash.py", figures=FIGS),
            suite.Bench("hang", "hang.py", quick=(str(pid_file),), figures=FIGS, repeats=2, timeout_s=(2.0, 2.0)),
            suite.Bench("nocuda", "nocuda.py", figures=FIGS),
            suite.Bench("nojson", "nojson.py", figures=FIGS, repeats=1),
            suite.Bench("gpu_only", "good.py", figures=FIGS, needs="cuda:8"),
            suite.Bench("no_full", "good.py", figures=FIGS, full=None),
            suite.Bench("absent", "absent.py", figures=FIGS)]


@pytest.fixture(scope="module")
def fake_report(fake_benches, tmp_path_factory):
    pid_file = tmp_path_factory.mktemp("pid") / "child.pid"
    report = run.run_suite("quick", _fake_suite(fake_benches, pid_file), bench_dir=fake_benches,
                           log=lambda *a, **k: None)
    return report, pid_file


def test_suite_runs_every_bench_and_records_failures(fake_report):
    report, pid_file = fake_report
    b = report["benches"]
    assert {k: v["status"] for k, v in b.items()} == {
        "good": "ok", "crash": "failed", "hang": "timeout", "nocuda": "skipped", "nojson": "failed",
        "gpu_only": "skipped", "no_full": "ok", "absent": "skipped"}
    good = b["good"]["figures"]
    assert set(good) == {"t_s", "bytes", "rate"}
    assert good["t_s"]["n"] == 3 and good["t_s"]["min"] <= good["t_s"]["median"] <= good["t_s"]["max"]
    assert good["bytes"] == {"unit": "B", "better": "lower", "timing": False, "median": 1000, "min": 1000,
                             "max": 1000, "n": 3, "samples": [1000.0] * 3}
    assert good["t_s"]["timing"] and good["rate"]["timing"]  # units s and 1/s are wall-clock figures
    assert b["good"]["load_per_core"] >= 0 and len(b["good"]["runs"][0]["load"]) == 2
    assert "something broke" in b["crash"]["error"] and b["crash"]["reason"] == "exit status 3"
    assert b["hang"]["reason"].startswith("killed after 2 s") and len(b["hang"]["runs"]) == 1
    assert b["nocuda"]["reason"] == "no CUDA device" and "needs 8 CUDA devices" in b["gpu_only"]["reason"]
    assert b["nojson"]["reason"] == "no JSON object on the last line"
    assert "does not exist" in b["absent"]["reason"]
    m = report["machine"]
    assert m["cpu"]["model"] and m["cpu"]["usable_cores"] >= 1 and m["ram_bytes"] > 0
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["pack"]
    assert len(report["git"]["commit"] or "") == 40 and report["date"][:2] == "20"
    json.dumps(report)  # JSON-ready


def test_a_timed_out_bench_takes_its_own_workers_down(fake_report):
    _, pid_file = fake_report
    pid = int(pid_file.read_text())
    for _ in range(50):  # the kill is immediate; give the kernel a moment to reap
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] == "Z":  # a zombie waiting for init is gone for our purposes
                return
        time.sleep(0.1)
    pytest.fail(f"the hung bench's child {pid} survived the time limit")


def test_size_full_skips_a_bench_without_one(fake_benches):
    entry = run.run_bench(suite.Bench("no_full", "good.py", figures=FIGS, full=None), "full", cuda_devices=0,
                          bench_dir=fake_benches)
    assert entry["status"] == "skipped" and entry["reason"] == "no size full"


def test_table_lists_each_bench_and_its_figures(fake_report):
    text = run.table(fake_report[0])
    assert "good: ok" in text and "crash: failed" in text and "hang: timeout" in text
    assert "t_s" in text and "(lower is better)" in text and "(higher is better)" in text
    assert "2 ok" in text and "2 failed" in text


# ----------------------------------------------------------------------------- compare

def _figure(samples, better="lower", unit="s"):
    return {"unit": unit, "better": better, "median": sorted(samples)[len(samples) // 2], "min": min(samples),
            "max": max(samples), "n": len(samples), "samples": samples}


def _report(figures: dict, status: str = "ok") -> dict:
    return {"kind": "wanfit-bench", "size": "quick", "machine": {"cpu": {"model": "x", "usable_cores": 2}, "gpus": []},
            "versions": {"torch": "2.13.0"}, "benches": {"b": {"status": status, "figures": figures, "runs": [{}]}}}


def test_compare_injected_regression_and_improvement(tmp_path):
    base = _report({"time_s": _figure([1.0, 1.02, 1.04]), "speed": _figure([100, 101, 102], "higher", "x"),
                    "peak_bytes": _figure([5e9]), "noisy_s": _figure([1.0, 1.6, 2.0]),
                    "steady_s": _figure([2.0, 2.01, 2.02]), "skips": _figure([10], "higher", "steps"),
                    "info": _figure([3.0], "info", "GB"), "gone_s": _figure([1.0])})
    new = copy.deepcopy(base)
    f = new["benches"]["b"]["figures"]
    f["time_s"] = _figure([1.40, 1.45, 1.5])      # 40 % slower, outside the spread: regression
    f["speed"] = _figure([150, 151, 152], "higher", "x")  # 50 % faster: improvement
    f["peak_bytes"] = _figure([5.3e9])            # 6 % more bytes: under the 10 % threshold
    f["noisy_s"] = _figure([1.9, 2.0, 2.1])       # +25 % median, but inside the repeats' spread
    f["skips"] = _figure([7], "higher", "steps")  # fewer skipped steps: a regression of a "higher" figure
    f["info"] = _figure([4.0], "info", "GB")
    del f["gone_s"]
    f["new_s"] = _figure([1.0])
    result = compare.compare(base, new, threshold=10)
    verdicts = {r["figure"]: r["verdict"] for r in result["rows"]}
    assert verdicts == {"time_s": "regressed", "speed": "improved", "peak_bytes": "unchanged", "noisy_s": "noise",
                        "steady_s": "unchanged", "skips": "regressed", "info": "changed", "gone_s": "gone",
                        "new_s": "new"}
    assert result["regressions"] == 2
    row = next(r for r in result["rows"] if r["figure"] == "time_s")
    assert row["ratio"] == pytest.approx(1.45 / 1.02)
    assert [r["verdict"] for r in result["rows"]][:2] == ["regressed", "regressed"]  # worst first
    # at a 50 % threshold both changes (+42 %, -30 %) are within it
    assert compare.compare(base, new, threshold=50)["regressions"] == 0

    paths = {}
    for name, report in (("base", base), ("new", new)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(report))
    assert compare.main([str(paths["base"]), str(paths["new"]), "--json", str(tmp_path / "cmp.json")]) == 1
    assert json.loads((tmp_path / "cmp.json").read_text())["regressions"] == 2
    assert compare.main([str(paths["base"]), str(paths["base"])]) == 0
    assert compare.main([str(paths["base"]), str(paths["new"]), "--threshold", "50"]) == 0
    (tmp_path / "junk.json").write_text("{}")
    assert compare.main([str(paths["base"]), str(tmp_path / "junk.json")]) == 2


def test_compare_judges_timings_only_on_a_quiet_machine():
    """On a busy machine other processes move wall-clock figures: a timing measured under a high
    or very different load is not judged; exact figures (bytes) always are."""
    base = _report({"t_s": {**_figure([1.0, 1.01]), "timing": True}, "peak_bytes": _figure([100.0], unit="B")})
    new = copy.deepcopy(base)
    new["benches"]["b"]["figures"] = {"t_s": {**_figure([1.5, 1.52]), "timing": True},
                                      "peak_bytes": _figure([150.0], unit="B")}

    def verdicts(base_load, new_load, **kw):
        base["benches"]["b"]["load_per_core"], new["benches"]["b"]["load_per_core"] = base_load, new_load
        result = compare.compare(base, new, **kw)
        return {r["figure"]: r["verdict"] for r in result["rows"]}, result

    judged, result = verdicts(0.6, 2.4)  # apart, and the new run oversubscribed
    assert judged == {"t_s": "load", "peak_bytes": "regressed"} and result["regressions"] == 1
    assert "0.6 vs 2.4 per core" in next(r["note"] for r in result["rows"] if r["figure"] == "t_s")
    assert any("timings not judged in b" in w for w in result["warnings"])
    assert verdicts(0.6, 0.8)[0]["t_s"] == "regressed"  # a quiet machine both times: judged
    assert verdicts(0.6, 0.8, load_tolerance=0.1)[0]["t_s"] == "load"  # too far apart
    assert verdicts(2.5, 2.5)[0]["t_s"] == "load"  # equally busy is still busy
    assert verdicts(2.5, 2.5, max_load=100)[0]["t_s"] == "regressed"
    assert verdicts(None, None)[0]["t_s"] == "regressed"  # a report without loads: judged


def test_compare_a_bench_that_broke_is_a_regression():
    base = _report({"t_s": _figure([1.0])})
    new = _report({}, status="failed")
    result = compare.compare(base, new)
    assert result["benches"] == {"b": "broken"} and result["regressions"] == 1
    assert compare.compare(new, base)["benches"] == {"b": "fixed"}
    text = compare.format_result(result, "a", "b")
    assert "broken" in text and "1 regression" in text


def test_compare_two_runs_of_the_same_fake_suite_finds_no_regression(fake_benches, tmp_path):
    benches = [suite.Bench("good", "good.py", figures=FIGS, repeats=3)]
    a, b = (run.run_suite("quick", benches, bench_dir=fake_benches, log=lambda *x, **k: None) for _ in range(2))
    result = compare.compare(a, b)
    assert result["regressions"] == 0
    assert not [w for w in result["warnings"] if not w.startswith("timings not judged")]  # same machine


# ----------------------------------------------------------------------------- gpu_check

def _fake_part(name: str, code: str, **kw):
    return gpu_check.Part(name, f"fake {name}", kw.pop("expected_s", 0.1), kw.pop("limit_s", 30),
                          lambda ctx: [sys.executable, "-c", textwrap.dedent(code)], **kw)


def test_gpu_check_parts_are_isolated_and_kept_within_the_budget(tmp_path):
    parts = [
        _fake_part("crash", "import sys; print('partial'); sys.exit(7)"),
        _fake_part("hang", "import time; print('started', flush=True); time.sleep(60)", limit_s=1.5),
        _fake_part("good", "import json; print(json.dumps({'t': 2.0, 'rows': {'a': 1}}))",
                   figures=(suite.lower("t", "s"),), summary=lambda r: [f"t is {r['t']}"]),
        _fake_part("absent", "print(1)", available=lambda ctx: "the pack has no bench/absent.py yet", optional=True),
        _fake_part("too_long", "print(1)", expected_s=10_000),
        _fake_part("cut_short", "import time; time.sleep(60)", limit_s=600),
    ]
    ctx = gpu_check.Context("cpu", True, 0)
    report = gpu_check.new_report(ctx, 5.0)
    start = time.monotonic()
    report = gpu_check.run_parts(parts, ctx, tmp_path, 5.0, report)
    elapsed = time.monotonic() - start
    b = report["benches"]
    assert {k: v["status"] for k, v in b.items()} == {
        "crash": "failed", "hang": "timeout", "good": "ok", "absent": "skipped", "too_long": "skipped",
        "cut_short": "timeout"}
    assert b["crash"]["reason"] == "exit status 7" and "partial" in b["crash"]["error"]
    assert b["hang"]["reason"] == "killed after 2 s"  # its own limit (1.5 s), rounded
    assert b["good"]["figures"]["t"]["median"] == 2.0
    assert "would overrun the budget" in b["too_long"]["reason"]
    assert elapsed < 5.0 + 4  # cut_short got what was left of the 5 s, not its 600 s
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["benches"].keys() == b.keys() and on_disk["kind"] == "wanfit-bench"
    assert (tmp_path / "hang.log").read_text().startswith("started")
    summary = (tmp_path / "summary.txt").read_text()
    for line in ("[failed] crash", "[timeout] hang", "[ok] good", "t is 2.0", "[skipped] absent",
                 "the pack has no bench/absent.py yet"):
        assert line in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["skipped"].startswith("no CUDA device") and report["benches"] == {}
    assert "no CUDA device" in (tmp_path / "summary.txt").read_text()
    assert "no CUDA device" in capsys.readouterr().out


def test_gpu_check_optional_parts_are_detected_not_assumed():
    ctx = gpu_check.Context("cuda", False, 1)
    by_name = {p.name: p for p in gpu_check.parts()}
    assert [p.name for p in gpu_check.parts() if not p.optional] == ["fp8", "block_swap", "planner", "vae", "sampling"]
    for name, script in (("sparse_attention", "attention.py"), ("compiled_blocks", "attention.py")):
        expected = None if (BENCH / script).exists() else f"the pack has no bench/{script} yet"
        assert by_name[name].available(ctx) == expected
    assert by_name["multi_gpu"].available(ctx) is not None  # one GPU, or no bench yet
    assert sum(p.expected_s for p in gpu_check.parts() if not p.optional) < gpu_check.DEFAULT_BUDGET_S


def test_gpu_check_dry_run_of_every_part_on_the_cpu(tmp_path):
    """Every part's real code at toy sizes on the CPU (what runs on the GPU, minus CUDA), through
    the real command lines and child processes."""
    code = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--budget", "900",
                           "--only", "fp8,block_swap,planner,vae,sampling,multi_gpu"])  # sparse: test_attention_bench.py
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {k: (v["status"], v.get("reason")) for k, v in report["benches"].items()}
    assert code == 0, status
    for name in ("fp8", "block_swap", "planner", "vae", "sampling"):
        assert status[name][0] == "ok", (name, report["benches"][name].get("error"))
        assert report["benches"][name]["figures"], name
    assert status["multi_gpu"][0] == "skipped"
    raw = {k: v["raw"] for k, v in report["benches"].items() if v["status"] == "ok"}
    assert set(raw["fp8"]["layers"]["attn 5120x5120"]) >= {"bf16", "fp8_upcast", "fp8_scaled_mm"}
    assert raw["block_swap"]["blocks"] == 8 and set(raw["block_swap"]["s_per_forward"]) == {
        "resident", "swap_prefetch0", "swap_prefetch1", "swap_prefetch2", "swap_prefetch1_staged"}
    assert raw["block_swap"]["pinned_blocks"]["swap_prefetch1_staged"] == 0
    assert raw["block_swap"]["pinned_blocks"]["swap_prefetch1"] == 8
    assert len(raw["planner"]["sizes"]) == 2
    assert all(s["measured_bytes"] > 0 and s["predicted_bytes"] > 0 for s in raw["planner"]["sizes"].values())
    # bench/vae_tiling.py's own code (it was tests/test_tiling.py's bench test): a small VAE at
    # 384x128, 2 latent frames; the tiles hold less memory than whole frames
    vae = raw["vae"]["sizes"][0]
    assert vae["latent_frames"] == 2 and vae["frames"] == 5 and "tiles" in vae["tiling"]
    assert 0 < vae["decode_peak_ratio"] < 0.8 and 0 < vae["encode_peak_ratio"] < 0.8
    assert vae["tiled"]["decode"]["planned_bytes"] < vae["untiled"]["decode"]["planned_bytes"]
    assert set(raw["vae"]["target"]) == {"size", "peak_ratio_max", "time_ratio_max", "met"}
    runs = raw["sampling"]["runs"]
    assert list(runs) == ["resident", "swap_2_of_4"] and all(r["latent_finite"] for r in runs.values())
    # on the CPU nothing swaps (the DiT stays in host memory); the plan says so
    assert all(r["h2d_gb"] == 0 for r in runs.values())
    summary = (tmp_path / "summary.txt").read_text()
    assert "tiny: code paths only" in summary and "[ok] sampling" in summary


# ----------------------------------------------------------------------------- docs tables

def _plan(card, frames, w, h, weights, resident, windows=1, batch=2):
    return {"card_gib": card, "model": "Wan2.2 I2V-A14B expert", "frames": frames, "width": w, "height": h,
            "latent": [1 + (frames - 1) // 4, h // 8, w // 8], "window_tokens": 9 * (h // 16) * (w // 16),
            "windows": windows, "weights": weights, "batch": batch, "passes": 1 if batch == 2 else 2,
            "budget": card * 2**30 - 1.5 * 2**30, "resident": resident, "swapped": 40 - resident,
            "prefetch": int(resident < 40),
            "activation_peak": 3 * 2**30, "peak_vram": 10 * 2**30, "peak_host": 2**30,
            "encoders": [{"name": "VAE", "device": "gpu", "tiling": None}]}


def test_docs_tables_come_from_reports_and_prose_stays(tmp_path):
    report = {"kind": "wanfit-bench", "size": "quick", "date": "2026-12-03T10:00:00+00:00", "seconds": 12,
              "git": {"commit": "a" * 40, "dirty": False},
              "machine": {"cpu": {"model": "Test CPU", "usable_cores": 2}, "gpus": [], "load_avg": [3.5, 3, 3]},
              "benches": {"memory_plan": {"status": "ok", "command": "python bench/memory_plan.py", "runs": [{}],
                                          "figures": {"x": {}},
                                          "raw": {"plans": [_plan(32, 81, 832, 480, "fp8_e4m3fn_scaled", 40),
                                                            _plan(12, 81, 1280, 720, "fp8_e4m3fn_scaled", 17, 13, 1)]}}}}
    doc = ("# Title\n\nProse before.\n\n<!-- begin table memory_plan -->\nold table\n<!-- end table memory_plan -->\n"
           "\nProse between.\n\n<!-- begin table gpu_fp8 -->\nNot measured yet.\n<!-- end table gpu_fp8 -->\nEnd.\n")
    new, done = docs.render(doc, [("r.json", report)])
    assert done == ["memory_plan"]
    assert new.startswith("# Title\n\nProse before.\n\n<!-- begin table memory_plan -->\n| card | job |")
    assert "| 32 GB | 81f 832×480 | fp8_e4m3fn_scaled | 30.5 | 40 / 0 / 0 | batched | 3.0 | 10.0 | 1.0 |" in new
    assert "| 12 GB | 81f 1280×720, 33-frame windows |" in new and "sequential" in new
    assert "`python bench/docs.py r.json` from `python bench/memory_plan.py`: commit aaaaaaa" in new
    assert "load 3.5" in new and "old table" not in new
    assert "Prose between.\n\n<!-- begin table gpu_fp8 -->\nNot measured yet.\n<!-- end table gpu_fp8 -->\nEnd.\n" in new
    assert docs.render(new, [("r.json", report)])[0] == new  # stable

    path, rpath = tmp_path / "B.md", tmp_path / "r.json"
    path.write_text(doc)
    rpath.write_text(json.dumps(report))
    assert docs.main([str(rpath), "--doc", str(path), "--check"]) == 1
    assert docs.main([str(rpath), "--doc", str(path)]) == 0
    assert docs.main([str(rpath), "--doc", str(path), "--check"]) == 0


def test_every_table_marked_in_benchmarks_md_has_a_generator():
    text = (BENCH.parent / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    names = [m["name"] for m in docs.MARKER.finditer(text)]
    assert "memory_plan" in names and "suite" in names and "gpu_planner" in names
    assert set(names) <= set(docs.TABLES)
    begins = [line for line in text.splitlines() if line.startswith("<!-- begin table")]
    assert len(begins) == len(names)  # every begin has its end
