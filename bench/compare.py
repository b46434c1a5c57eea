"""Compare two bench reports (bench/run.py): per figure NEW / BASE, better or worse by the
figure's direction, and a verdict that accounts for the spread of the repeats.

Verdicts, per figure present in both reports:

    unchanged   the medians differ by at most the threshold
    noise       they differ by more, but the two ranges of repeats (min .. max) overlap:
                the change is inside the spread, not a regression
    regressed   worse by more than the threshold, every NEW repeat outside BASE's range
    improved    better by more than the threshold, likewise outside the range
    changed     an "info" figure (no better direction) moved beyond the threshold
    load        a timing figure measured on a busy machine: either run's CPU load (1-minute
                load average per core, around the bench's processes) above ``--max-load``, or
                the two more than ``--load-tolerance`` apart. Not judged: there the other
                processes move wall-clock figures more than code does (two runs of one commit
                on a 2-core machine at 2.5 per core differed by up to 2.7x). Exact figures
                (bytes, blocks, steps skipped) are always judged

A bench that ran in BASE and failed or timed out in NEW is "broken" and counts as a
regression; figures only in one report are listed as new or gone. Exit status 1 when
anything regressed or broke, 0 otherwise, 2 for unreadable input.

    python bench/compare.py BASE.json NEW.json [--threshold 10] [--max-load 1.5] [--load-tolerance 0.5]
                            [--all] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_THRESHOLD = 10.0  # percent
DEFAULT_LOAD_TOLERANCE = 0.5  # 1-minute load average per core
DEFAULT_MAX_LOAD = 1.5  # per core: a 2-thread bench alone on 2 cores makes about 1
BAD = ("regressed", "broken")
ORDER = ("broken", "regressed", "improved", "fixed", "noise", "load", "changed", "unchanged", "new", "gone",
         "not run")


def verdict(base: dict, new: dict, threshold: float) -> tuple[str, float]:
    """(verdict, NEW median / BASE median) for one figure; see the module docstring."""
    b, n = base["median"], new["median"]
    if b == 0:
        ratio = 1.0 if n == 0 else math.copysign(math.inf, n)
    else:
        ratio = n / b
    change = abs(ratio - 1) * 100 if math.isfinite(ratio) else math.inf
    if change <= threshold:
        return "unchanged", ratio
    if new["min"] <= base["max"] and base["min"] <= new["max"]:
        return "noise", ratio
    better = new.get("better", base.get("better", "info"))
    if better not in ("lower", "higher"):
        return "changed", ratio
    worse = n > b if better == "lower" else n < b
    return ("regressed" if worse else "improved"), ratio


def compare(base: dict, new: dict, threshold: float = DEFAULT_THRESHOLD,
            load_tolerance: float = DEFAULT_LOAD_TOLERANCE, max_load: float = DEFAULT_MAX_LOAD) -> dict[str, Any]:
    """Every figure and bench of two reports, judged; ``rows`` sorted worst first."""
    rows: list[dict[str, Any]] = []
    benches: dict[str, str] = {}
    busy: list[str] = []
    for name in sorted(set(base["benches"]) | set(new["benches"])):
        b, n = base["benches"].get(name), new["benches"].get(name)
        b_status = b["status"] if b else "absent"
        n_status = n["status"] if n else "absent"
        if b_status == "ok" and n_status in ("failed", "timeout"):
            benches[name] = "broken"
            rows.append({"bench": name, "figure": "", "verdict": "broken",
                         "note": f"{n_status}: {n.get('reason') or ''}".strip()})
            continue
        if b_status in ("failed", "timeout") and n_status == "ok":
            benches[name] = "fixed"
        elif b_status != "ok" or n_status != "ok":
            benches[name] = "not run"
            rows.append({"bench": name, "figure": "", "verdict": "not run",
                         "note": f"base {b_status}, new {n_status}"})
            continue
        else:
            benches[name] = "compared"
        bf, nf = b["figures"], n["figures"]
        loads = (b.get("load_per_core"), n.get("load_per_core"))
        unjudged = None not in loads and (max(loads) > max_load or abs(loads[0] - loads[1]) > load_tolerance)
        if unjudged:
            busy.append(name)
        for fig in sorted(set(bf) | set(nf)):
            if fig not in nf:
                rows.append({"bench": name, "figure": fig, "verdict": "gone", "base": bf[fig]})
                continue
            if fig not in bf:
                rows.append({"bench": name, "figure": fig, "verdict": "new" if benches[name] != "fixed" else "fixed",
                             "new": nf[fig]})
                continue
            v, ratio = verdict(bf[fig], nf[fig], threshold)
            row = {"bench": name, "figure": fig, "verdict": v, "ratio": ratio, "base": bf[fig], "new": nf[fig]}
            if unjudged and nf[fig].get("timing") and v not in ("unchanged", "noise"):
                row.update(verdict="load", note=f"was {v}; CPU load {loads[0]:g} vs {loads[1]:g} per core")
            rows.append(row)
    rows.sort(key=lambda r: (ORDER.index(r["verdict"]), r["bench"], r["figure"]))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    warnings = _differences(base, new)
    if busy:
        warnings.append(f"timings not judged in {', '.join(busy)}: measured under a CPU load above {max_load:g} "
                        f"per core or {load_tolerance:g} apart (see each bench's load_per_core); exact figures are")
    return {"threshold_pct": threshold, "load_tolerance": load_tolerance, "max_load": max_load, "rows": rows,
            "counts": counts, "benches": benches, "warnings": warnings,
            "regressions": sum(counts.get(v, 0) for v in BAD)}


def _differences(base: dict, new: dict) -> list[str]:
    """What makes two reports hard to compare: another size, CPU, GPU or torch."""
    out = []
    if base.get("size") != new.get("size"):
        out.append(f"sizes differ: {base.get('size')} vs {new.get('size')}")
    pairs = [("CPU", lambda r: r["machine"]["cpu"]["model"]),
             ("cores", lambda r: r["machine"]["cpu"]["usable_cores"]),
             ("GPU", lambda r: [g["name"] for g in r["machine"].get("gpus", [])]),
             ("torch", lambda r: r["versions"]["torch"])]
    for what, get in pairs:
        try:
            a, b = get(base), get(new)
        except (KeyError, TypeError):
            continue
        if a != b:
            out.append(f"{what} differs: {a} vs {b}")
    return out


def _range(f: dict) -> str:
    med = common.fmt(f["median"])
    return med if f["n"] == 1 or f["min"] == f["max"] else f"{med} [{common.fmt(f['min'])}..{common.fmt(f['max'])}]"


def format_result(result: dict, base_name: str, new_name: str, show_all: bool = False) -> str:
    lines = [f"BASE {base_name}", f"NEW  {new_name}", f"threshold {result['threshold_pct']:g} %"]
    lines += [f"warning: {w}" for w in result["warnings"]]
    shown = [r for r in result["rows"] if show_all or r["verdict"] not in ("unchanged", "noise", "load")]
    if shown:
        lines.append("")
        width = max(len(f"{r['bench']}/{r['figure']}") for r in shown)
        for r in shown:
            name = f"{r['bench']}/{r['figure']}".rstrip("/")
            if "ratio" in r:
                unit = r["new"].get("unit", "")
                note = f"; {r['note']}" if r.get("note") else ""
                lines.append(f"{r['verdict']:<10} {name:<{width}}  {_range(r['base'])} -> {_range(r['new'])} {unit}"
                             f"  x{r['ratio']:.3f} ({r['new'].get('better', '')} is better{note})")
            else:
                lines.append(f"{r['verdict']:<10} {name:<{width}}  {r.get('note', '')}".rstrip())
    lines += ["", "; ".join(f"{result['counts'][v]} {v}" for v in ORDER if v in result["counts"]) or "nothing compared"]
    lines.append(f"{result['regressions']} regression(s)" if result["regressions"] else "no regression")
    return "\n".join(lines)


def _load(path: Path) -> dict:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"compare: cannot read {path}: {err}") from None
    if not isinstance(report, dict) or report.get("kind") != "wanfit-bench" or "benches" not in report:
        raise SystemExit(f"compare: {path} is not a report of bench/run.py")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"percent a median may move before it counts (default {DEFAULT_THRESHOLD:g})")
    parser.add_argument("--max-load", type=float, default=DEFAULT_MAX_LOAD,
                        help=f"timings are judged only when both runs' CPU load per core is at most this "
                             f"(default {DEFAULT_MAX_LOAD:g}; a large value judges them all)")
    parser.add_argument("--load-tolerance", type=float, default=DEFAULT_LOAD_TOLERANCE,
                        help="... and the two loads differ by at most this (default "
                             f"{DEFAULT_LOAD_TOLERANCE:g})")
    parser.add_argument("--all", action="store_true", help="list unchanged figures too")
    parser.add_argument("--json", type=Path, help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    if not (args.threshold >= 0 and math.isfinite(args.threshold)):
        parser.error(f"--threshold {args.threshold}: a percentage >= 0")
    try:
        base, new = _load(args.base), _load(args.new)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    result = compare(base, new, args.threshold, args.load_tolerance, args.max_load)
    print(format_result(result, str(args.base), str(args.new), args.all))
    if args.json:
        common.write_json(args.json, result)
    return 1 if result["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
