"""Drift over an inference log on S3 (Parquet segments) against the same rows as local JSON lines, in one run.

    .venv/bin/python bench/s3_log_bench.py [--rows 1000000] [--segment-rows 5000] [--scenario mean_shift]
        [--reference-rows 1000] [--seed 7] [--read-threads 8] [--json results.json]

What it does:

1. ``--rows`` current rows of ``bench/drift_bench.py``'s 20-feature population (14 numeric, 6 categorical)
   in ``--scenario``, and a reference sample;
2. the same rows written twice: as the local JSON-lines log (``drift_bench.write_log``: after 20,000 rows
   of the previous version) and through the model server's segment writer
   (``resources.serving.segment_log.SegmentLog``, ``--segment-rows`` rows a segment, the default writer's
   size) to moto's S3 server on loopback (its own process, started here), with the previous version's rows
   under their own prefix;
3. timed: ``read_window(window_rows=--rows)`` over each store (``load``), then the verdict
   (``evaluate_drift(engine="fast")``, the policy's default methods) on each frame;
4. checked: the two frames are equal and the verdicts identical.

moto is a Python server in one process: reads from AWS S3 or MinIO run in parallel where moto serialises
them. Other work on this 2-core machine skews every timing: the 1-minute load average is printed with them.
PASS when the frames and verdicts are identical and S3 load + verdict took at most 10 s.

``--request-path`` measures instead what logging costs a prediction on the event loop, per scored row,
in-process: the JSON-lines path (``ModelApp._log_lines`` then ``InferenceLog.write``: orjson and one
``write`` per batch) against the S3 path (``ModelApp._log_rows_of`` then ``SegmentLog.write``: a tuple and
a list append under a lock; the segment thread runs meanwhile and writes to moto), batches of
``--batch`` rows of the credit model's 10 features, medians of interleaved repeats. (``serve_bench.py``
drives the server with wrk, which this machine does not have.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from drift_bench import FEATURES, NOW, NUMERIC, population, write_log  # noqa: E402

from platform_defs.governance.drift import evaluate_drift  # noqa: E402
from platform_defs.policy import DriftPolicy  # noqa: E402

TARGET_SECONDS = 10.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_segments(location: str, version: str, frame: pd.DataFrame, ts0, step, segment_rows: int) -> int:
    """The rows through the real segment writer; returns the segments written."""
    from resources.serving.segment_log import SegmentLog

    columns = [(c, "number" if c in NUMERIC else "string") for c in FEATURES]
    w = SegmentLog(location, model="bench", version=version, columns=columns, flush_rows=segment_rows,
                   flush_seconds=3600, max_pending_rows=4 * segment_rows, drain_seconds=600)
    from datetime import datetime, timezone

    recs = frame.to_dict("records")
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)

    def us(j: int) -> int:  # the very timestamps drift_bench.write_log stamps (ts0 + step * j)
        d = ts0 + step * j - epoch
        return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds

    for i in range(0, len(recs), segment_rows):
        part = [(us(j), f"v{version}-{j}", recs[j], {"client": "bench"},
                 {"score": 0.5, "label": 0}, 2.5) for j in range(i, min(i + segment_rows, len(recs)))]
        while w.pending > 2 * segment_rows:
            time.sleep(0.01)
        if w.write(part):
            raise RuntimeError(f"segment writer dropped rows: {w.error}")
    w.close()
    if w.flushed != len(recs):
        raise RuntimeError(f"segment writer wrote {w.flushed} of {len(recs)} rows: {w.error}")
    return w.segments_written


def request_path(batch: int, repeats: int) -> dict:
    """Median µs per row of each logging path on the request path (see the module docstring)."""
    import statistics
    import types

    from resources.serving.model_server import InferenceLog, Metrics, ModelApp, _epoch_us
    from resources.serving.segment_log import SegmentLog

    feats = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
             "num_open_accounts", "delinquencies_2y", "employment_type", "home_ownership", "purpose"]
    rec = {"application_id": "APP-000123", "annual_income": 61250.0, "loan_amount": 12000.0, "loan_term_months": 36,
           "debt_to_income": 0.31, "credit_history_years": 7.5, "num_open_accounts": 4, "delinquencies_2y": 0,
           "employment_type": "salaried", "home_ownership": "rent", "purpose": "car"}
    recs = [dict(rec) for _ in range(batch)]
    res = [{"prediction": 0, "probability": 0.1234} for _ in range(batch)]
    fake = types.SimpleNamespace(_pass=frozenset({"application_id"}), _features=set(feats), _logged_features=feats,
                                 model=types.SimpleNamespace(name="credit_risk", version="1"), metrics=Metrics())
    tmp = Path(tempfile.mkdtemp(prefix="onepath-logpath-"))
    local = InferenceLog(tmp / "logs", set())
    seg = SegmentLog("s3://bench-logs/onepath/inference/credit_risk/bench", model="credit_risk", version="1",
                     columns=[(c, "number") for c in feats[:7]] + [(c, "string") for c in feats[7:]],
                     max_pending_rows=10_000_000)

    def json_lines() -> None:
        from datetime import datetime, timezone
        lines: list = []
        ModelApp._log_lines(fake, lines, datetime.now(timezone.utc).isoformat(), recs, res, "req", time.perf_counter())
        local.write(lines)

    def segments() -> None:
        from datetime import datetime, timezone
        rows: list = []
        ModelApp._log_rows_of(fake, rows, _epoch_us(datetime.now(timezone.utc)), recs, res, "req", time.perf_counter())
        seg.write(rows)

    times: dict[str, list[float]] = {"json_lines": [], "segments": []}
    try:
        for i in range(repeats):
            for name, fn in ((("json_lines", json_lines), ("segments", segments)) if i % 2 == 0
                             else (("segments", segments), ("json_lines", json_lines))):
                t0 = time.perf_counter()
                for _ in range(200):
                    fn()
                times[name].append((time.perf_counter() - t0) / (200 * batch) * 1e6)
        seg.close()
    finally:
        local.close()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return {"batch": batch, "repeats": repeats, "us_per_row": med, "segments_written": seg.segments_written,
            "rows_flushed": seg.flushed, "rows_dropped": seg.dropped, "load_average": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--segment-rows", type=int, default=5000)
    ap.add_argument("--scenario", default="mean_shift")
    ap.add_argument("--reference-rows", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--read-threads", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--request-path", action="store_true", help="measure the request path's logging cost instead")
    ap.add_argument("--batch", type=int, default=8, help="--request-path: rows per scored batch")
    ap.add_argument("--repeats", type=int, default=21, help="--request-path: interleaved repeats")
    args = ap.parse_args(argv)

    from datetime import timedelta

    from tests.stores import start_moto

    import resources.inference_log_s3 as s3_reader
    from resources.inference_log import read_window

    s3_reader.READ_THREADS = args.read_threads
    tmp = Path(tempfile.mkdtemp(prefix="onepath-s3log-bench-"))
    server = start_moto()
    try:
        os.environ.update({"AWS_ENDPOINT_URL_S3": server.endpoint_url, "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                           "ONEPATH_S3_ADDRESSING_STYLE": "path"})
        server.client("s3").create_bucket(Bucket="bench-logs")
        if args.request_path:
            result = request_path(args.batch, args.repeats)
            print(json.dumps(result, indent=2))
            return 0
        location = "s3://bench-logs/onepath/inference/bench/prod"
        rng = np.random.default_rng(args.seed)
        reference = population(args.reference_rows, rng)
        current = population(args.rows, rng, args.scenario)
        local = tmp / "logs"
        log(f"writing {args.rows} rows as JSON lines ...")
        size = write_log(local, current, np.random.default_rng(args.seed + 1))
        log(f"writing {args.rows} rows as Parquet segments to moto ...")
        start = NOW - timedelta(hours=20)
        t0 = time.perf_counter()
        old = population(20_000, np.random.default_rng(args.seed + 1))
        write_segments(location, "1", old, start - timedelta(hours=2), timedelta(seconds=0.3), args.segment_rows)
        segments = write_segments(location, "2", current, start, timedelta(hours=20) / args.rows, args.segment_rows)
        write_s = time.perf_counter() - t0
        listed = server.client("s3").list_objects_v2(Bucket="bench-logs", Prefix="onepath/inference/bench/prod/2/")
        s3_bytes = sum(o["Size"] for o in listed.get("Contents", []))
        policy = DriftPolicy()
        how = {"numeric_method": policy.numeric_method, "numeric_threshold": policy.numeric_threshold,
               "categorical_method": policy.categorical_method,
               "categorical_threshold": policy.categorical_threshold, "drift_share": policy.drift_share}
        out = {}
        for name, where in (("local", local), ("s3", location)):
            la = os.getloadavg()[0]
            t0 = time.perf_counter()
            w = read_window(where, version="2", columns=FEATURES, window_rows=args.rows, now=NOW)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            verdict = evaluate_drift(reference, w.frame, columns=FEATURES, engine="fast", **how)
            verdict_s = time.perf_counter() - t0
            out[name] = {"load_s": round(load_s, 2), "verdict_s": round(verdict_s, 2),
                         "load_verdict_s": round(load_s + verdict_s, 2), "rows": w.rows, "bytes_read": w.bytes_read,
                         "objects_read": len(w.files_read), "load_average": round(la, 2),
                         "drifted_columns": verdict.drifted_columns, "dataset_drift": verdict.dataset_drift,
                         "_frame": w.frame, "_verdict": verdict}
            log(f"{name}: load {load_s:.2f} s + verdict {verdict_s:.2f} s ({w.rows} rows, load avg {la:.1f})")
        pd.testing.assert_frame_equal(out["local"]["_frame"], out["s3"]["_frame"])
        same = ([(c.column, c.drifted, c.value) for c in out["local"]["_verdict"].columns]
                == [(c.column, c.drifted, c.value) for c in out["s3"]["_verdict"].columns])
        for v in out.values():
            v.pop("_frame")
            v.pop("_verdict")
        ok = same and out["s3"]["load_verdict_s"] <= TARGET_SECONDS
        result = {"rows": args.rows, "features": len(FEATURES), "scenario": args.scenario,
                  "segment_rows": args.segment_rows, "segments": segments, "segment_write_s": round(write_s, 1),
                  "jsonl_bytes": size, "parquet_bytes": s3_bytes, "identical_frames": True,
                  "identical_verdicts": same, "read_threads": args.read_threads, **out, "pass": ok}
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
