"""How long one drift-sensor tick takes over 200 endpoints when no new data arrived.

Setup: an organisation with 200 ml-standard endpoints (staging + prod, prod watched for drift), each
with an inference log of ``--rows`` rows already seen by the sensor (its cursor is at the end), and a
ledger with ``--ledger`` entries. Measured: the real ``sensors.drift_sensor.tick`` (what the Dagster
sensor calls) with no new rows and no new ledger entries; then, as a baseline in the same run, a
naive tick that re-reads every log to count rows. Also: a tick where one endpoint received rows.

Run: ``.venv/bin/python bench/sensor_bench.py`` (Dagster's sensor budget is 60 s; aim: well under 1 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_org(n: int):
    from platform_defs.specs import Organisation, parse_declaration

    decls = [
        parse_declaration({"kind": "dataset", "name": "bench_data", "owner": "retention", "track": "ml-standard",
                           "generator": "assets.retention.data:generate_customer_activity",
                           "columns": [{"name": "x", "dtype": "float"}, {"name": "y", "dtype": "int", "role": "label"}]}),
        parse_declaration({"kind": "model", "name": "bench_model", "owner": "retention", "track": "ml-standard",
                           "dataset": "bench_data", "trainer": "assets.retention.trainer:train_churn"}),
    ]
    decls += [parse_declaration({"kind": "endpoint", "name": f"ep_{i:03d}", "owner": "retention",
                                 "track": "ml-standard", "model": "bench_model"}) for i in range(n)]
    return Organisation(decls)


def write_logs(log_root: Path, targets, rows: int) -> None:
    line = json.dumps({"ts": "2026-11-26T05:00:00+00:00", "request_id": "r", "model": "bench_model", "version": "1",
                       "inputs": {"x": 1.5}, "extras": {}, "output": {"prediction": 0}, "latency_ms": 1.0}) + "\n"
    for m in targets:
        d = log_root / m.endpoint.name / m.env
        d.mkdir(parents=True, exist_ok=True)
        (d / "2026-11-26.jsonl").write_text(line * rows)


def naive_tick(targets, monitoring) -> int:
    """What a sensor without a cursor does: count every log's rows on every tick."""
    total = 0
    for m in targets:
        for f in sorted(monitoring.log_dir(m.endpoint.name, m.env).glob("*.jsonl")):
            with open(f, "rb") as fh:
                total += sum(1 for _ in fh)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", type=int, default=200)
    ap.add_argument("--rows", type=int, default=5000, help="rows already in each endpoint's log")
    ap.add_argument("--ledger", type=int, default=2000, help="entries already in the ledger")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()

    from platform_defs.drift_check import monitored
    from platform_defs.policy import load_policy
    from resources.ledger import Ledger
    from resources.monitoring import MonitoringResource
    from sensors.drift_sensor import tick

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        org = build_org(args.endpoints)
        targets = monitored(org, load_policy())
        monitoring = MonitoringResource(inference_log_dir=str(home / "logs"), outcomes_dir=str(home / "outcomes"),
                                        drift_reports_dir=str(home / "reports"))
        write_logs(home / "logs", targets, args.rows)
        book = Ledger(home / "ledger.db", home / "ledger.key")
        for i in range(args.ledger):
            book.append("deploy", f"ep_{i % args.endpoints:03d}", {"version": str(i)}, "bench", env="prod")

        t0 = time.perf_counter()
        _, _, cursor = tick(targets, monitoring=monitoring, book=book, cursor={})
        first = time.perf_counter() - t0

        idle = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            requests, _, cursor = tick(targets, monitoring=monitoring, book=book, cursor=cursor)
            idle.append(time.perf_counter() - t0)
            assert not requests

        naive = []
        for _ in range(max(3, args.repeat // 5)):
            t0 = time.perf_counter()
            naive_tick(targets, monitoring)
            naive.append(time.perf_counter() - t0)

        # one endpoint got 100 new rows
        m = targets[0]
        with open(monitoring.log_dir(m.endpoint.name, m.env) / "2026-11-26.jsonl", "a") as fh:
            fh.write((json.dumps({"ts": "2026-11-26T05:01:00+00:00", "request_id": "n", "model": "bench_model",
                                  "version": "1", "inputs": {"x": 2.0}, "extras": {}, "output": {},
                                  "latency_ms": 1.0}) + "\n") * 100)
        t0 = time.perf_counter()
        _, reasons, cursor = tick(targets, monitoring=monitoring, book=book, cursor=cursor)
        one_new = time.perf_counter() - t0

    med, worst = statistics.median(idle), max(idle)
    print(f"\n{len(targets)} monitored endpoint environments, {args.rows} rows in each log, "
          f"{args.ledger} ledger entries\n")
    print("| tick | time |")
    print("|---|---|")
    print(f"| first tick (reads every log once, builds the cursor) | {first:.3f} s |")
    print(f"| no new data, median of {args.repeat} | {med * 1000:.1f} ms |")
    print(f"| no new data, worst of {args.repeat} | {worst * 1000:.1f} ms |")
    print(f"| one endpoint got 100 rows | {one_new * 1000:.1f} ms |")
    print(f"| baseline: re-read every log (no cursor), median | {statistics.median(naive) * 1000:.1f} ms |")
    print(f"\nspeed-up over the baseline: {statistics.median(naive) / med:.0f}x; reasons on the last tick: "
          f"{reasons[:2]}")


if __name__ == "__main__":
    main()
