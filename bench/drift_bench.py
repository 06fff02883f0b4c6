"""Drift benchmark: the fast engine against full Evidently on the same data, in one run.

    .venv/bin/python bench/drift_bench.py [--rows 1000000] [--reference-rows 1000]
        [--full-evidently undrifted,mean_shift] [--reduced-rows 200000] [--big-reference 100000]
        [--report-sample 50000] [--seed 7] [--json results.json] [--keep DIR]

What it does, inside a fresh temporary directory (removed at the end unless ``--keep``):

1. a population of 20 features -- 14 numeric (normal, log-normal, exponential, bounded, Poisson and
   binomial counts) and 6 categorical (3 to 12 categories, skewed mixes) -- and a ``--reference-rows``
   reference sample of it (what onepath stores per model version);
2. per scenario, ``--rows`` current rows:
   ``undrifted`` (the same population), ``mean_shift`` (three numeric columns move by 0.5 sd),
   ``shape_change`` (same means: one column's spread x1.6, one turned right-skewed, one bimodal),
   ``categorical_mix`` (two categorical mixes change), ``subtle`` (three numeric columns move by 0.1 sd,
   where a K-S p-value against a 1,000-row reference sits near 0.05);
3. the current rows are written as a real inference log (``<dir>/<YYYY-MM-DD>.jsonl`` lines in the
   model server's format, spread over the last 20 hours so the window spans a day rollover, after
   20,000 rows of the previous model version) and loaded back with ``read_window(window_rows=--rows)``;
   the loaded frame is checked value for value against what was written;
4. timed: ``load`` (read_window), ``verdict`` (``evaluate_drift(engine="fast")`` on the loaded frame),
   ``report`` (the same with ``report_html``: Evidently's full report on a ``--report-sample`` sample),
   and the baseline ``evaluate_drift(engine="evidently")`` on the same data with the same explicit
   methods: at ``--rows`` for the ``--full-evidently`` scenarios, at ``--reduced-rows`` (the first rows of
   the window) for the others, where the fast engine is run again on exactly those rows;
5. compared: per-column verdicts (and values) of the fast engine and Evidently on the same rows;
6. the methods are the policy's defaults (``DriftPolicy()``: ks at 0.01, jensenshannon at 0.1, drift share 0.3);
   ``mean_shift`` is also run with a distance pair (wasserstein/jensenshannon at 0.1) and, once, with a
   ``--big-reference`` reference (fast engine, Evidently at ``--reduced-rows``).

Prints a markdown table; PASS when every verdict is identical and every 1M-row fast verdict took at most
10 s. Other work on this 2-core machine skews all timings: the 1-minute load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from platform_defs.governance.drift import DriftResult, evaluate_drift  # noqa: E402
from platform_defs.policy import DriftPolicy  # noqa: E402
from resources.inference_log import read_window  # noqa: E402

TARGET_SECONDS = 10.0
NUMERIC = [f"num_{i:02d}" for i in range(14)]
CATEGORICAL = [f"cat_{i}" for i in range(6)]
FEATURES = NUMERIC + CATEGORICAL
CAT_LEVELS = {"cat_0": 3, "cat_1": 4, "cat_2": 5, "cat_3": 6, "cat_4": 8, "cat_5": 12}
SCENARIOS = ["undrifted", "mean_shift", "shape_change", "categorical_mix", "subtle"]
NOW = datetime(2026, 3, 2, 14, 0, tzinfo=timezone.utc)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load1() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------------------------
# data


def _mix(levels: int, skew: float) -> np.ndarray:
    p = np.exp(-skew * np.arange(levels))
    return p / p.sum()


def population(n: int, rng: np.random.Generator, scenario: str = "undrifted") -> pd.DataFrame:
    """``n`` rows of the feature population as ``scenario`` changes it."""
    sd = {c: 1.0 for c in NUMERIC}
    cols: dict[str, np.ndarray] = {}
    for i, c in enumerate(NUMERIC):
        kind = i % 7
        if kind == 0:
            x, sd[c] = rng.normal(50.0, 10.0, n), 10.0
        elif kind == 1:
            x, sd[c] = rng.lognormal(10.0, 0.5, n), float(np.exp(10.125) * math.sqrt(math.exp(0.25) - 1))
        elif kind == 2:
            x, sd[c] = rng.exponential(3.0, n), 3.0
        elif kind == 3:
            x, sd[c] = rng.uniform(0.0, 1.0, n), 1 / math.sqrt(12)
        elif kind == 4:
            x, sd[c] = rng.poisson(4.0, n).astype(np.float64), 2.0
        elif kind == 5:
            x, sd[c] = rng.binomial(36, 0.3, n).astype(np.float64), math.sqrt(36 * 0.3 * 0.7)
        else:
            x = rng.normal(0.0, 1.0, n)
        cols[c] = x
    for c in CATEGORICAL:
        levels = CAT_LEVELS[c]
        names = np.array([f"{c}_v{k}" for k in range(levels)], dtype=object)
        cols[c] = names[rng.choice(levels, size=n, p=_mix(levels, 0.35))]

    if scenario == "mean_shift":
        for c in ("num_00", "num_07", "num_02"):
            cols[c] = cols[c] + 0.5 * sd[c]
    elif scenario == "shape_change":
        a = cols["num_06"]
        cols["num_06"] = a.mean() + (a - a.mean()) * 1.6  # same mean, wider
        b = rng.exponential(1.0, n)  # same mean and sd as N(0, 1), right-skewed
        cols["num_13"] = b - 1.0
        half = rng.random(n) < 0.5  # same mean, bimodal
        cols["num_00"] = np.where(half, 50.0 - 8.0, 50.0 + 8.0) + rng.normal(0.0, 6.0, n)
    elif scenario == "categorical_mix":
        for c, skew in (("cat_0", -0.2), ("cat_3", 0.7)):
            levels = CAT_LEVELS[c]
            names = np.array([f"{c}_v{k}" for k in range(levels)], dtype=object)
            cols[c] = names[rng.choice(levels, size=n, p=_mix(levels, skew))]
    elif scenario == "subtle":
        for c in ("num_06", "num_13", "num_00"):
            cols[c] = cols[c] + 0.1 * sd[c]
    elif scenario != "undrifted":
        raise ValueError(scenario)
    return pd.DataFrame(cols)


def write_log(log_dir: Path, frame: pd.DataFrame, rng: np.random.Generator) -> int:
    """The rows as the model server logs them (version "2"), after 20,000 rows of version "1"."""
    log_dir.mkdir(parents=True, exist_ok=True)
    n = len(frame)
    start = NOW - timedelta(hours=20)
    step = timedelta(hours=20) / n
    old = population(20_000, rng)
    records = {
        "1": old.to_dict("records"),
        "2": frame.to_dict("records"),
    }
    handles: dict[str, Any] = {}
    size = 0
    try:
        for version, ts0, recs, dt in (("1", start - timedelta(hours=2), records["1"], timedelta(seconds=0.3)),
                                       ("2", start, records["2"], step)):
            buf: list[bytes] = []
            day = None
            for i, rec in enumerate(recs):
                ts = ts0 + dt * i
                d = f"{ts:%Y-%m-%d}"
                if d != day:
                    if buf:
                        handles[day].write(b"".join(buf))
                        buf = []
                    if d not in handles:
                        handles[d] = open(log_dir / f"{d}.jsonl", "ab")
                    day = d
                buf.append(orjson.dumps({
                    "ts": ts.isoformat(), "request_id": f"v{version}-{i}", "model": "bench", "version": version,
                    "inputs": rec, "extras": {"client": "bench"}, "output": {"score": 0.5, "label": 0},
                    "latency_ms": 2.5,
                }) + b"\n")
                if len(buf) >= 50_000:
                    handles[day].write(b"".join(buf))
                    buf = []
            if buf:
                handles[day].write(b"".join(buf))
    finally:
        for fh in handles.values():
            fh.close()
    for p in log_dir.glob("*.jsonl"):
        size += p.stat().st_size
    return size


# --------------------------------------------------------------------------------------------
# measuring


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compare(fast: DriftResult, full: DriftResult) -> tuple[bool, bool, list[str]]:
    """(verdicts identical, values bit-identical, differing columns)."""
    differ = [f.column for f, e in zip(fast.columns, full.columns) if f.drifted != e.drifted]
    same_values = all(f.value == e.value or (math.isnan(f.value) and math.isnan(e.value))
                      for f, e in zip(fast.columns, full.columns))
    same = not differ and fast.dataset_drift == full.dataset_drift and [c.column for c in fast.columns] == [
        c.column for c in full.columns]
    return same, same_values, differ


def check_loaded(loaded: pd.DataFrame, written: pd.DataFrame) -> None:
    if len(loaded) != len(written):
        raise AssertionError(f"read_window returned {len(loaded)} rows, {len(written)} were written")
    for c in NUMERIC:
        if not np.array_equal(loaded[c].to_numpy(), written[c].to_numpy()):
            raise AssertionError(f"column {c} differs after the round trip through the log")
    for c in CATEGORICAL:
        if not (loaded[c].to_numpy() == written[c].to_numpy()).all():
            raise AssertionError(f"column {c} differs after the round trip through the log")


def run(args: argparse.Namespace, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    policy = DriftPolicy()
    methods = {"numeric_method": policy.numeric_method, "numeric_threshold": policy.numeric_threshold,
               "categorical_method": policy.categorical_method, "categorical_threshold": policy.categorical_threshold,
               "drift_share": policy.drift_share}
    distance = {"numeric_method": "wasserstein", "numeric_threshold": 0.1, "categorical_method": "jensenshannon",
                "categorical_threshold": 0.1, "drift_share": policy.drift_share}
    full_set = {s.strip() for s in args.full_evidently.split(",") if s.strip()}
    rng = np.random.default_rng(args.seed)
    reference = population(args.reference_rows, rng)
    rows: list[dict[str, Any]] = []

    def measure(scenario: str, current: pd.DataFrame, ref: pd.DataFrame, how: dict[str, Any], *,
                load_s: float | None, evidently_rows: int, label: str) -> dict[str, Any]:
        fast, verdict_s = timed(lambda: evaluate_drift(ref, current, columns=FEATURES, engine="fast", **how))
        report_path = tmp / "reports" / f"{label}.html"
        rep, report_s = timed(lambda: evaluate_drift(ref, current, columns=FEATURES, engine="fast",
                                                     report_html=report_path, report_sample_rows=args.report_sample,
                                                     **how))
        if [c.drifted for c in rep.columns] != [c.drifted for c in fast.columns]:
            raise AssertionError("the run with a report gave another verdict")
        if evidently_rows >= len(current):
            same_rows, fast_same = current, fast
            fast_same_s = verdict_s
        else:
            same_rows = current.iloc[:evidently_rows]
            fast_same, fast_same_s = timed(lambda: evaluate_drift(ref, same_rows, columns=FEATURES, engine="fast",
                                                                  **how))
        log(f"{label}: fast {verdict_s:.2f} s; Evidently on {len(same_rows)} rows ...")
        la = load1()
        full, evidently_s = timed(lambda: evaluate_drift(ref, same_rows, columns=FEATURES, engine="evidently", **how))
        same, same_values, differ = compare(fast_same, full)
        log(f"{label}: Evidently {evidently_s:.1f} s, identical verdicts: {same}")
        return {
            "scenario": label, "current_rows": len(current), "reference_rows": len(ref),
            "methods": f"{how['numeric_method']}@{how['numeric_threshold']:g} / "
                       f"{how['categorical_method']}@{how['categorical_threshold']:g}",
            "drifted": fast.drifted_count, "drifted_columns": fast.drifted_columns,
            "dataset_drift": fast.dataset_drift,
            "verdict_s": verdict_s, "load_s": load_s,
            "load_verdict_s": (load_s + verdict_s) if load_s is not None else None,
            "report_s": report_s, "report_file": rep.report_html.name if rep.report_html else None,
            "evidently_rows": len(same_rows), "evidently_s": evidently_s, "fast_same_rows_s": fast_same_s,
            "speedup": evidently_s / fast_same_s if fast_same_s else None,
            "identical": same, "values_identical": same_values, "differing_columns": differ,
            "load_average": round(la, 2),
            "values": {c.column: c.value for c in fast.columns},
        }

    for scenario in SCENARIOS:
        log(f"{scenario}: generating {args.rows} rows")
        current = population(args.rows, rng, scenario)
        log_dir = tmp / "logs" / scenario / "prod"
        size, gen_s = timed(lambda: write_log(log_dir, current, rng))
        log(f"{scenario}: wrote {size / 1e6:.0f} MB of inference log in {gen_s:.0f} s; loading")
        window, load_s = timed(lambda: read_window(log_dir, version="2", columns=FEATURES, window_rows=args.rows))
        check_loaded(window.frame, current)
        log(f"{scenario}: loaded {window.rows} rows in {load_s:.2f} s ({window.summary})")
        loaded = window.frame[FEATURES]
        ev_rows = args.rows if scenario in full_set else min(args.rows, args.reduced_rows)
        rows.append(measure(scenario, loaded, reference, methods, load_s=load_s, evidently_rows=ev_rows,
                            label=scenario))
        if scenario == "mean_shift":
            rows.append(measure(scenario, loaded, reference, distance, load_s=load_s,
                                evidently_rows=min(args.rows, args.reduced_rows), label="mean_shift (distances)"))
            if args.big_reference:
                big_ref = population(args.big_reference, np.random.default_rng(args.seed + 1))
                rows.append(measure(scenario, loaded, big_ref, methods, load_s=load_s,
                                    evidently_rows=min(args.rows, args.reduced_rows),
                                    label=f"mean_shift ({args.big_reference // 1000}k reference)"))
        shutil.rmtree(log_dir.parent)
    meta = {"rows": args.rows, "reference_rows": args.reference_rows, "reduced_rows": args.reduced_rows,
            "full_evidently": sorted(full_set), "report_sample": args.report_sample, "cpus": os.cpu_count(),
            "policy_methods": methods}
    return rows, meta


def table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "methods", "ref rows", "drifted (fast)", "dataset drift", "fast verdict s", "load s",
            "load+verdict s", "report (sampled) s", "Evidently rows", "Evidently s", "fast s, same rows", "speedup",
            "identical verdicts"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x: float | None, nd: int = 2) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    for r in rows:
        ident = ("yes" + (" (values bit-equal)" if r["values_identical"] else "")) if r["identical"] else \
            f"NO: {', '.join(r['differing_columns'])}"
        out.append("| " + " | ".join([
            r["scenario"], r["methods"], f"{r['reference_rows']:,}", f"{r['drifted']}/20",
            "yes" if r["dataset_drift"] else "no", f(r["verdict_s"]), f(r["load_s"]), f(r["load_verdict_s"]),
            f(r["report_s"], 1), f"{r['evidently_rows']:,}", f(r["evidently_s"], 1), f(r["fast_same_rows_s"]),
            f"{r['speedup']:.0f}x" if r["speedup"] else "-", ident,
        ]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--reference-rows", type=int, default=1000)
    ap.add_argument("--full-evidently", default="undrifted,mean_shift",
                    help="scenarios whose Evidently baseline runs on all --rows (the rest on --reduced-rows)")
    ap.add_argument("--reduced-rows", type=int, default=200_000)
    ap.add_argument("--big-reference", type=int, default=100_000, help="0: skip the big-reference run")
    ap.add_argument("--report-sample", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the reports (and this run's files) here")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="drift-bench-")) if args.keep is None else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    la0 = load1()
    try:
        rows, meta = run(args, tmp)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    la1 = load1()
    print()
    print(f"{meta['rows']:,} current rows x 20 features (14 numeric, 6 categorical) against a "
          f"{meta['reference_rows']:,}-row reference; {meta['cpus']} CPUs; 1-min load average {la0:.1f} before, "
          f"{la1:.1f} after (other work on this machine skews every timing)")
    print(f"Evidently baseline at {meta['rows']:,} rows for: {', '.join(meta['full_evidently'])}; at "
          f"{meta['reduced_rows']:,} rows (the window's first rows) for the others, where 'fast s, same rows' is the "
          f"fast engine on exactly those rows. HTML reports: Evidently on a uniform sample of "
          f"{meta['report_sample']:,} rows.")
    print()
    print(table(rows))
    print()
    print("Columns the fast engine found drifted (identical to Evidently's on the same rows, see above):")
    print()
    for r in rows:
        short = [c.replace("num_", "n").replace("cat_", "c") for c in r["drifted_columns"]]
        print(f"- {r['scenario']} ({r['methods']}): {', '.join(short) or 'none'}")
    print()
    full_rows = [r for r in rows if r["current_rows"] >= 1_000_000]
    ok_time = all(r["verdict_s"] <= TARGET_SECONDS for r in full_rows)
    ok_same = all(r["identical"] for r in rows)
    print(f"verdict <= {TARGET_SECONDS:g} s on every {meta['rows']:,}-row window: {'yes' if ok_time else 'NO'}; "
          f"identical per-column verdicts everywhere: {'yes' if ok_same else 'NO'}")
    print("RESULT:", "PASS" if ok_time and ok_same else "FAIL")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "load_average": [la0, la1]}, indent=2,
                                        default=str))
    return 0 if ok_time and ok_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
