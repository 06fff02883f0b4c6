"""The drift sensor's tick on its own: a cursor over real log files, the min-new-rows skip with its
reason, corrupt lines counted and skipped, the minimum interval between checks, and a retrain request
per drift entry with the cooldown read from the ledger."""

from __future__ import annotations

import json
import time
from pathlib import Path

from platform_defs.drift_check import monitored
from platform_defs.policy import DriftPolicy, load_policy
from platform_defs.specs import Organisation, parse_declaration
from resources.ledger import Ledger
from resources.monitoring import MonitoringResource
from sensors.drift_sensor import tick

LINE = json.dumps({"ts": "2026-11-26T05:00:00+00:00", "request_id": "r", "model": "m", "version": "1",
                   "inputs": {"x": 1.5}, "extras": {}, "output": {}, "latency_ms": 1.0})


def world(tmp_path: Path, **drift):
    decls = [
        parse_declaration({"kind": "dataset", "name": "dd", "owner": "retention", "track": "ml-standard",
                           "generator": "assets.retention.data:generate_customer_activity",
                           "columns": [{"name": "x", "dtype": "float"}, {"name": "y", "dtype": "int", "role": "label"}]}),
        parse_declaration({"kind": "model", "name": "mm", "owner": "retention", "track": "ml-standard", "dataset": "dd",
                           "trainer": "assets.retention.trainer:train_churn"}),
        parse_declaration({"kind": "endpoint", "name": "ep", "owner": "retention", "track": "ml-standard", "model": "mm"}),
    ]
    policy = load_policy()
    track = policy.track("ml-standard")
    tuned = track.model_copy(update={"drift": DriftPolicy.model_validate({**track.drift.model_dump(), **drift})})
    policy = policy.model_copy(update={"tracks": {**policy.tracks, "ml-standard": tuned}})
    (target,) = monitored(Organisation(decls), policy)
    mon = MonitoringResource(inference_log_dir=str(tmp_path / "logs"), outcomes_dir=str(tmp_path / "o"),
                             drift_reports_dir=str(tmp_path / "r"))
    log = mon.log_dir("ep", "prod")
    log.mkdir(parents=True)
    return target, mon, log / "2026-11-26.jsonl", Ledger(tmp_path / "ledger.db", tmp_path / "key")


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def test_new_rows_corrupt_lines_and_the_check_interval(tmp_path):
    target, mon, log, book = world(tmp_path, min_new_rows=10, min_check_interval_minutes=5)
    append(log, (LINE + "\n") * 6 + "{not json\n" + LINE[:20])  # 6 rows, 1 corrupt, 1 still being written
    requests, reasons, cursor = tick([target], monitoring=mon, book=book, cursor={}, now=1000.0)
    assert requests == [] and "ep.prod: 6 of 10 new rows" in reasons and "1 corrupt log line(s) skipped" in reasons
    append(log, LINE[20:] + "\n" + (LINE + "\n") * 3)  # the partial line completes: 10 rows now
    requests, reasons, cursor = tick([target], monitoring=mon, book=book, cursor=cursor, now=1001.0)
    (check,) = requests
    assert check.asset_selection == [] and [k.name for k in check.asset_check_keys] == ["input_drift"]
    assert check.tags["onepath/new_rows"] == "10"
    append(log, (LINE + "\n") * 12)
    requests, reasons, cursor = tick([target], monitoring=mon, book=book, cursor=cursor, now=1060.0)
    assert requests == [] and any("next drift check in 241 s" in r for r in reasons)
    requests, reasons, cursor = tick([target], monitoring=mon, book=book, cursor=cursor, now=1302.0)
    assert len(requests) == 1 and requests[0].tags["onepath/new_rows"] == "12"
    requests, reasons, cursor = tick([target], monitoring=mon, book=book, cursor=cursor, now=1303.0)
    assert requests == [] and reasons == []


def test_one_retrain_per_drift_entry_then_the_cooldown(tmp_path):
    target, mon, log, book = world(tmp_path, cooldown_minutes=10)
    _, _, cursor = tick([target], monitoring=mon, book=book, cursor={}, now=0.0)
    first = book.append("drift_detected", "ep", {"version": "1", "drifted_columns": ["x"], "drifted_share": 1.0},
                        "test", env="prod")
    now = time.time()
    (retrain,) = tick([target], monitoring=mon, book=book, cursor=cursor, now=now)[0]
    assert retrain.run_key == f"retrain:ep:drift-{first.seq}" and retrain.tags["onepath/drifted_columns"] == "x"
    assert [a.to_user_string() for a in retrain.asset_selection] == ["dd", "mm"]
    _, _, cursor = tick([target], monitoring=mon, book=book, cursor=cursor, now=now)
    book.append("drift_detected", "ep", {"version": "1", "drifted_columns": ["x"]}, "test", env="prod")
    requests, reasons, cursor = tick([target], monitoring=mon, book=book, cursor=cursor, now=now + 60)
    assert requests == [] and any("in cooldown until" in r for r in reasons)
    third = book.append("drift_detected", "ep", {"version": "1", "drifted_columns": ["x"]}, "test", env="prod")
    (again,) = tick([target], monitoring=mon, book=book, cursor=cursor, now=now + 11 * 60)[0]
    assert again.run_key == f"retrain:ep:drift-{third.seq}"
    assert len(book.entries(kind="retrain_requested")) == 2
