"""The drift sensor: production inputs that moved ask for a retraining run, once, then hold off.

Each tick is cheap by design (a few ``stat`` calls per endpoint environment when nothing arrived):

1. For every monitored endpoint environment it reads only the inference-log bytes appended since its
   cursor and adds the new rows to that environment's tally. Corrupt lines are counted (shown in the
   tick's reason and the run's tags) and skipped; a partial last line waits for the next tick.
2. When the tally reaches the policy's ``min_new_rows`` (and the last check it asked for is at least
   ``min_check_interval_minutes`` old), it requests a run of the environment's ``input_drift`` check
   (where the statistics run) and resets the tally. Fewer rows is a skip whose
   reason says how many of how many arrived.
3. It reads the ``drift_detected`` ledger entries the checks appended since its cursor. For each, unless
   the endpoint is in its cooldown (a ``retrain_requested`` entry younger than the policy's
   ``cooldown_minutes``), it requests ONE retraining run -- the model's dataset (rebuilt from its
   generator plus recent labelled production rows) and the model -- with a run key naming the drift
   entry and tags saying why, and appends a ``retrain_requested`` entry naming the trigger. What follows
   (staging, prod, or a wait for approval) is the graph's declarative automation and the gates.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from platform_defs.drift_check import Monitored, monitored
from platform_defs.policy import Policy
from platform_defs.specs import Organisation
from resources.ledger import Ledger, LedgerResource
from resources.monitoring import MonitoringResource

SENSOR_NAME = "drift"
# what its run requests may select: any asset (a retrain) or asset check (a drift check)
TARGET = dg.AssetSelection.all() | dg.AssetSelection.all_asset_checks()
ACTOR = "sensor:drift"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _ts(entry_ts: str) -> float:
    return datetime.fromisoformat(entry_ts.replace("Z", "+00:00")).timestamp()


def in_cooldown(book: Ledger, m: Monitored, now: float) -> tuple[bool, str]:
    """Whether a retrain for ``m``'s endpoint was requested within the policy's cooldown, and until when."""
    recent = book.entries(kind="retrain_requested", subject=m.endpoint.name)
    if not recent:
        return False, ""
    last = recent[-1]
    until = _ts(last.ts) + m.drift.cooldown_minutes * 60
    if now < until:
        return True, (f"{m.endpoint.name}: in cooldown until "
                      f"{datetime.fromtimestamp(until, timezone.utc):%Y-%m-%d %H:%M:%SZ} "
                      f"(retrain requested by ledger #{last.seq})")
    return False, ""


def tick(targets: list[Monitored], *, monitoring: MonitoringResource, book: Ledger, cursor: dict[str, Any],
         now: float | None = None) -> tuple[list[dg.RunRequest], list[str], dict[str, Any]]:
    """One evaluation: (run requests, reasons, new cursor). Pure apart from reading logs and the ledger
    and appending ``retrain_requested`` entries."""
    from resources.inference_log import scan_new

    now = time.time() if now is None else now
    logs = dict(cursor.get("logs") or {})
    tally = dict(cursor.get("tally") or {})
    checked = dict(cursor.get("checked") or {})
    requests: list[dg.RunRequest] = []
    reasons: list[str] = []
    corrupt_total = 0
    for m in targets:
        scan = scan_new(monitoring.log_dir(m.endpoint.name, m.env), logs.get(m.label))
        logs[m.label] = scan.cursor
        corrupt_total += scan.corrupt_lines
        n = tally.get(m.label, 0) + scan.new_rows
        wait = checked.get(m.label, 0) + m.drift.min_check_interval_minutes * 60 - now
        if n >= m.drift.min_new_rows and wait > 0:
            reasons.append(f"{m.label}: {n} new rows; next drift check in {wait:.0f} s (min_check_interval_minutes)")
        elif n >= m.drift.min_new_rows:
            checked[m.label] = now
            requests.append(dg.RunRequest(
                run_key=f"drift-check:{m.label}:{_digest(scan.cursor)}",
                asset_selection=[], asset_check_keys=[m.check_key],  # the check alone, no asset
                tags={"onepath/trigger": "new_inference_rows", "onepath/endpoint": m.endpoint.name,
                      "onepath/env": m.env, "onepath/new_rows": str(n),
                      "onepath/corrupt_log_lines": str(scan.corrupt_lines)},
            ))
            n = 0
        elif scan.new_rows or scan.corrupt_lines:
            reasons.append(f"{m.label}: {n} of {m.drift.min_new_rows} new rows")
        tally[m.label] = n
    if corrupt_total:
        reasons.append(f"{corrupt_total} corrupt log line(s) skipped")

    seen = int(cursor.get("ledger_seq") or 0)
    head = book.head()
    if head is not None and head.seq > seen:
        by_label = {m.label: m for m in targets}
        for entry in book.entries(kind="drift_detected", since_seq=seen):
            m = by_label.get(f"{entry.subject}.{entry.env}")
            if m is None or not m.drift.retrain:
                continue
            if not getattr(m.model, "trainer", ""):
                reasons.append(f"drift #{entry.seq} on {m.label}: no retraining requested: model '{m.model.name}' "
                               f"has no trainer (registered from a notebook); its owner '{m.model.owner}' is asked "
                               f"for a new version (onepath.register)")
                continue
            cooling, why = in_cooldown(book, m, now)
            if cooling:
                reasons.append(f"drift #{entry.seq} not acted on: {why}")
                continue
            run_key = f"retrain:{m.endpoint.name}:drift-{entry.seq}"
            assets = [m.model.dataset, m.model.name]
            book.append("retrain_requested", m.endpoint.name, {
                "model": m.model.name, "trigger": f"drift_detected #{entry.seq}", "run_key": run_key,
                "assets": assets, "version": entry.data.get("version"),
                "drifted_columns": entry.data.get("drifted_columns"),
                "drifted_share": entry.data.get("drifted_share"),
                "cooldown_minutes": m.drift.cooldown_minutes}, ACTOR, env=m.env)
            requests.append(dg.RunRequest(
                run_key=run_key, asset_selection=[dg.AssetKey(a) for a in assets],
                tags={"onepath/trigger": "drift", "onepath/drift_entry": str(entry.seq),
                      "onepath/endpoint": m.endpoint.name, "onepath/env": m.env,
                      "onepath/model": m.model.name, "onepath/serving_version": str(entry.data.get("version")),
                      "onepath/drifted_columns": ",".join(entry.data.get("drifted_columns") or [])[:200]},
            ))
        seen = head.seq
    return requests, reasons, {"logs": logs, "tally": tally, "checked": checked, "ledger_seq": seen}


def build_drift_sensor(org: Organisation, policy: Policy) -> dg.SensorDefinition:
    targets = monitored(org, policy)

    @dg.sensor(
        name=SENSOR_NAME,
        description="Watches inference logs with a cursor; asks for the input_drift check when enough new rows "
                    "arrived, and for one retraining run (then a cooldown) when a check found drift.",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        target=TARGET,
    )
    def drift(context: dg.SensorEvaluationContext, monitoring: MonitoringResource, ledger: LedgerResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        requests, reasons, new_cursor = tick(targets, monitoring=monitoring, book=ledger.ledger(), cursor=cursor)
        context.update_cursor(json.dumps(new_cursor, sort_keys=True))
        if not requests:
            return dg.SkipReason("; ".join(reasons) or f"no new inference rows across {len(targets)} "
                                                        f"monitored environments")
        return dg.SensorResult(run_requests=requests)

    return drift


__all__ = ["SENSOR_NAME", "build_drift_sensor", "in_cooldown", "tick"]
