"""Run the bench suite: every registered bench that applies to this machine, one report.

Each bench (bench/suite.py) runs ``repeats`` times, each in a fresh Python process with a time
limit; one that fails, prints no JSON or runs out of time is recorded as such and the rest
still run. The report (JSON) holds the machine (CPU model and flags, cores, RAM, GPUs and
driver), the torch and pack versions, the git commit, the date, and per bench its status,
command, wall time and figures (min / median / max over the repeats, with units and which
direction is better). A table is printed at the end. Compare two reports with
bench/compare.py.

    python bench/run.py --size quick --out out/bench-quick.json     # make bench
    python bench/run.py --size full --only vae_memory,host_ram --out out/full.json
    python bench/run.py --list

Exit status 0 when every bench that ran passed (skips are not failures), 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import suite  # noqa: E402

SCHEMA = 1


def applies(bench: suite.Bench, cuda_devices: int) -> str | None:
    """None when ``bench`` runs on this machine, else why not."""
    if bench.needs == "any":
        return None
    want = int(bench.needs.partition(":")[2] or 1)
    if cuda_devices < want:
        return f"needs {want} CUDA device{'s' * (want > 1)}, this machine has {cuda_devices}"
    return None


def run_bench(bench: suite.Bench, size: str, *, cuda_devices: int, repeats: int | None = None,
              bench_dir: Path = common.BENCH_DIR, python: str = sys.executable,
              log=print) -> dict[str, Any]:
    """Run one bench ``repeats`` times (fresh processes); its report entry."""
    args = bench.args(size)
    n = repeats or bench.repeats
    entry: dict[str, Any] = {"script": bench.script, "args": None if args is None else list(args),
                             "needs": bench.needs, "repeats": n, "runs": []}
    why_not = "no size " + size if args is None else applies(bench, cuda_devices)
    if why_not is None and not (bench_dir / bench.script).is_file():
        why_not = f"bench/{bench.script} does not exist"
    if why_not:
        return {**entry, "status": "skipped", "reason": why_not, "figures": {}}
    entry["command"] = " ".join(["python", f"bench/{bench.script}", *args])
    samples: dict[str, dict] = {}
    status, reason, raw = "ok", None, None
    for i in range(n):
        load = common.load_avg()
        done = common.run_process([python, str(bench_dir / bench.script), *args], bench.timeout(size))
        entry["runs"].append({"seconds": round(done.seconds, 2), "returncode": done.returncode,
                              "load": [load, common.load_avg()]})
        if done.timed_out:
            status, reason = "timeout", f"killed after {bench.timeout(size):g} s (run {i + 1} of {n})"
            entry["error"] = done.error_tail()
            break
        raw = done.last_json()
        if done.returncode != 0 or raw is None:
            status = "failed"
            reason = (f"exit status {done.returncode}" if done.returncode else "no JSON object on the last line")
            entry["error"] = done.error_tail()
            break
        if set(raw) == {"skipped"}:
            status, reason = "skipped", str(raw["skipped"])
            break
        try:
            found = suite.extract(bench, raw)
        except (KeyError, TypeError, ValueError, IndexError) as err:  # the JSON changed shape
            status, reason = "failed", f"reading its figures: {type(err).__name__}: {err}"
            break
        for name, figure in found.items():
            samples.setdefault(name, {**figure, "samples": []})
            samples[name]["samples"] += figure["samples"]
    if status == "ok" and not samples:
        status, reason = "failed", "printed JSON without any registered figure"
    entry.update(status=status, reason=reason, seconds=round(sum(r["seconds"] for r in entry["runs"]), 2),
                 load_per_core=common.load_per_core(entry["runs"]),
                 figures={name: common.figure_entry(f) for name, f in samples.items()}, raw=raw)
    return entry


def run_suite(size: str, benches: list[suite.Bench], *, repeats: int | None = None,
              bench_dir: Path = common.BENCH_DIR, log=print) -> dict[str, Any]:
    cuda = len(common.gpus())
    report: dict[str, Any] = {"schema": SCHEMA, "kind": "wanfit-bench", "size": size, "date": common.now(),
                              "git": common.git_info(), "machine": common.machine_info(),
                              "versions": common.versions(), "benches": {}}
    start = time.perf_counter()
    for i, bench in enumerate(benches, 1):
        log(f"[{i}/{len(benches)}] {bench.name} ({size})", flush=True)
        entry = run_bench(bench, size, cuda_devices=cuda, repeats=repeats, bench_dir=bench_dir, log=log)
        report["benches"][bench.name] = entry
        extra = f": {entry['reason']}" if entry.get("reason") else f", {len(entry['figures'])} figures"
        log(f"    {entry['status']} in {entry.get('seconds', 0):.1f} s{extra}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["machine"]["load_avg_end"] = common.machine_info()["load_avg"]
    return report


def unregistered(bench_dir: Path = common.BENCH_DIR) -> list[str]:
    """Scripts in bench/ that are neither a registered bench nor one of the suite's tools."""
    known = {b.script for b in suite.BENCHES} | suite.TOOLS
    return sorted(p.name for p in bench_dir.glob("*.py") if p.name not in known and not p.name.startswith("_"))


def table(report: dict[str, Any]) -> str:
    """The report as text: a line per bench, then its figures (median [min .. max] unit)."""
    m = report["machine"]
    gpu = ", ".join(f"{g.get('name')} ({g.get('memory_bytes', 0) / 2**30:.0f} GiB)" for g in m.get("gpus", [])) or "no GPU"
    commit = (report["git"].get("commit") or "?")[:10] + (" (dirty)" if report["git"].get("dirty") else "")
    load = m.get("load_avg")
    lines = [f"WanFit bench, size {report['size']}, {report['date']}, commit {commit}",
             f"{m['cpu']['model']}, {m['cpu']['usable_cores']} cores, "
             f"{(m.get('ram_bytes') or 0) / 2**30:.0f} GiB RAM, {gpu}; torch {report['versions']['torch']}"
             + (f"; 1-minute load {load[0]:.2f} at start" if load else ""), ""]
    width = max([len(n) for b in report["benches"].values() for n in b["figures"]] + [20])
    for name, b in report["benches"].items():
        head = f"{name}: {b['status']}"
        if b.get("seconds") is not None and b["status"] != "skipped":
            head += f" ({b['seconds']:.1f} s, {len(b['runs'])} run{'s' * (len(b['runs']) != 1)})"
        if b.get("reason"):
            head += f" - {b['reason']}"
        lines.append(head)
        for fig, f in b["figures"].items():
            spread = "" if f["n"] == 1 or f["min"] == f["max"] else f"  [{common.fmt(f['min'])} .. {common.fmt(f['max'])}]"
            arrow = {"lower": "(lower is better)", "higher": "(higher is better)"}.get(f["better"], "")
            lines.append(f"  {fig:<{width}} {common.fmt(f['median']):>12} {f['unit']:<12}{spread} {arrow}".rstrip())
    counts: dict[str, int] = {}
    for b in report["benches"].values():
        counts[b["status"]] = counts.get(b["status"], 0) + 1
    lines += ["", "benches: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; {report.get('seconds', 0):.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("quick", "full"), default="quick")
    parser.add_argument("--out", type=Path, help="report path (default out/bench-SIZE.json)")
    parser.add_argument("--only", help="comma-separated bench names")
    parser.add_argument("--skip", help="comma-separated bench names to leave out")
    parser.add_argument("--repeats", type=int, help="processes per bench (default: each bench's own)")
    parser.add_argument("--list", action="store_true", help="list the registered benches and exit")
    args = parser.parse_args(argv)
    benches = list(suite.BENCHES)
    names = {b.name for b in benches}
    for option in (args.only, args.skip):
        unknown = set((option or "").split(",")) - names - {""}
        if unknown:
            parser.error(f"unknown bench {', '.join(sorted(unknown))}; registered: {', '.join(sorted(names))}")
    if args.only:
        benches = [b for b in benches if b.name in args.only.split(",")]
    if args.skip:
        benches = [b for b in benches if b.name not in args.skip.split(",")]
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    if args.list:
        for b in suite.BENCHES:
            print(f"{b.name:14s} bench/{b.script:18s} needs {b.needs:6s} quick: {' '.join(b.quick) or '(defaults)'}")
        return 0
    for name in unregistered():
        print(f"note: bench/{name} is not registered in bench/suite.py and does not run", file=sys.stderr)
    out = args.out or common.ROOT / "out" / f"bench-{args.size}.json"
    report = run_suite(args.size, benches, repeats=args.repeats)
    common.write_json(out, report)
    print()
    print(table(report))
    print(f"\nreport: {out}")
    return 0 if all(b["status"] in ("ok", "skipped") for b in report["benches"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
