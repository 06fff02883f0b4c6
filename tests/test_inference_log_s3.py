"""Inference logs on S3 as Parquet segments (ONEPATH_INFERENCE_LOG_URL), with real parts: moto's S3 server on
loopback (a test that stops S3 starts its own), real endpoint processes started by the local deployer (supervisor
and model-server workers), the readers the drift check, the drift sensor and the feedback join use.

What is proved: predictions become segments under the documented keys holding exactly the rows scored (no PII,
declared pass-through only); with S3 hanging, predictions answer at once, ``/metrics`` shows the rows pending
up to the cap and no further (the rest dropped and counted), ``/health`` says degraded naming the store and the
error, and once S3 answers again everything pending is written; a drain (SIGTERM) writes everything pending; a
SIGKILL loses exactly the rows ``/metrics`` showed pending, never a written one; read_window, scan_new and the
feedback join give over S3 what they give over the same rows as local JSON lines.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pandas as pd
import pyarrow.parquet as pq
import pytest

from resources.deployers.base import Target
from resources.deployers.local import LocalProcessDeployer
from resources.inference_log import read_window, scan_new
from resources.serving.segment_log import SEGMENT_RE, SegmentLog
from tests.conftest import artifact_roots, grant_caller, model_release, wait_for, worker_facts
from tests.test_model_server import tiny_model  # noqa: F401  (the module fixture: a LogisticRegression)

GOOD = {"income": 61.5, "accounts": 3}
S3_ENV = {"AWS_ACCESS_KEY_ID": "platform-key", "AWS_SECRET_ACCESS_KEY": "platform-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "ONEPATH_S3_ADDRESSING_STYLE": "path",
          # the log writer's own credentials: the platform's AWS_* never reach a worker
          "ONEPATH_INFERENCE_LOG_AWS_ACCESS_KEY_ID": "log-writer", "ONEPATH_INFERENCE_LOG_AWS_SECRET_ACCESS_KEY": "w"}


def _point_at(monkeypatch: pytest.MonkeyPatch, server, **limits: object) -> str:
    """The environment a deployment sets (this process and, through the deployer, the workers); a new bucket."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint_url)
    for var, value in S3_ENV.items():
        monkeypatch.setenv(var, value)
    for k, v in limits.items():
        monkeypatch.setenv(f"ONEPATH_INFERENCE_LOG_{k.upper()}", str(v))
    name = f"logs-{uuid.uuid4().hex[:12]}"
    server.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def own_moto():
    from tests.stores import start_moto

    server = start_moto()
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


class Endpoint:
    def __init__(self, settings, model_dir: Path, bucket: str, name: str):
        self.deployer = LocalProcessDeployer(settings.run_dir, port_base=settings.port_base,
                                             inference_log_dir=settings.inference_log_dir,
                                             artifact_roots=artifact_roots(settings),
                                             inference_log_url=f"s3://{bucket}/onepath")
        self.target = Target(name, "prod", kind="endpoint")
        self.auth = grant_caller(self.deployer, self.target)
        st = self.deployer.deploy(self.target, model_release("7", model_dir, {
            "model_name": "tiny", "pii_columns": ["national_id"], "pass_through": ["application_id"]}))
        self.address = st.address
        self.prefix = f"onepath/inference/{name}/prod/7/"

    def predict(self, body: dict, request_id: str) -> tuple[int, dict, float]:
        req = urllib.request.Request(self.address + "/predict", data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", "x-request-id": request_id,
                                              **self.auth})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read()), time.perf_counter() - t0
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()), time.perf_counter() - t0

    def get(self, path: str) -> str:
        with urllib.request.urlopen(urllib.request.Request(self.address + path, headers=self.auth), timeout=10) as r:
            return r.read().decode()

    def log_metrics(self) -> dict[str, float]:
        out = {}
        for line in self.get("/metrics").splitlines():
            if line.startswith("onepath_inference_log_rows_"):
                name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
                out[name.removeprefix("onepath_inference_log_rows_")] = float(value)
        return out

    def worker_pid(self) -> int:
        return worker_facts(self.deployer, self.target)[0]["pid"]

    def close(self) -> None:
        self.deployer.delete(self.target)


def _objects(client, bucket: str, prefix: str = "") -> list[tuple[str, bytes]]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out.append((o["Key"], client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()))
    return out


def _rows(client, bucket: str, prefix: str = "") -> pd.DataFrame:
    frames = [pq.read_table(io.BytesIO(data)).to_pandas() for _, data in _objects(client, bucket, prefix)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["request_id"])


def _send(ep: Endpoint, ids: list[str]) -> float:
    """One request per id; the slowest answer's seconds."""
    slowest = 0.0
    for rid in ids:
        code, out, took = ep.predict({**GOOD, "application_id": rid}, rid)
        assert code == 200, out
        slowest = max(slowest, took)
    return slowest


# ---------------------------------------------------------------------------------------------------------
# the writer in a real endpoint process


def test_predictions_become_parquet_segments_under_the_documented_keys(settings, tiny_model, moto_s3,
                                                                       monkeypatch) -> None:
    # cut by time here (10 rows never reach 1000): the SIGKILL test below cuts by size
    bucket = _point_at(monkeypatch, moto_s3, flush_rows=1000, flush_seconds=0.3)
    ep = Endpoint(settings, tiny_model, bucket, "s3log_keys")
    try:
        code, first, _ = ep.predict({**GOOD, "application_id": "APP-1", "national_id": "123-45-6789",
                                     "undeclared": 1}, "one")
        assert code == 200
        code, out, _ = ep.predict({"records": [GOOD, {"income": 10.0, "accounts": 1}]}, "many")
        assert code == 200
        _send(ep, [f"r{i}" for i in range(7)])
        client = moto_s3.client("s3")
        wait_for("10 rows written", lambda: len(_rows(client, bucket)) == 10, 30)
        keys = [k for k, _ in _objects(client, bucket)]
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        for k in keys:  # <prefix>/inference/<endpoint>/<env>/<version>/<YYYY-MM-DD>/<utc-ts>-<writer-id>-<n>.parquet
            assert k.startswith(ep.prefix), k
            got_day, name = k.removeprefix(ep.prefix).split("/")
            assert abs((datetime.fromisoformat(got_day).date() - datetime.fromisoformat(day).date()).days) <= 1
            assert SEGMENT_RE.match(name), name
        writers = {SEGMENT_RE.match(k.rsplit("/", 1)[1]).group(2) for k in keys}
        numbers = sorted(int(SEGMENT_RE.match(k.rsplit("/", 1)[1]).group(3)) for k in keys)
        assert len(writers) == 1 and numbers == list(range(len(keys)))  # one worker, its segments numbered
        rows = _rows(client, bucket).set_index("request_id")
        assert sorted(rows.index) == sorted(["one", "many:0", "many:1", *[f"r{i}" for i in range(7)]])
        one = rows.loc["one"]
        assert one["inputs"] == GOOD and json.loads(one["extras"]) == {"application_id": "APP-1"}
        assert one["model"] == "tiny" and one["version"] == "7" and one["latency_ms"] > 0
        assert json.loads(one["output"]) == first["predictions"][0]  # what the caller was answered
        raw = b"".join(data for _, data in _objects(client, bucket))
        assert b"123-45-6789" not in raw and b"national_id" not in raw  # PII never logged, not even its name
        m = wait_for("flushed in /metrics", lambda: (lambda x: x if x["flushed_total"] == 10 else None)(
            ep.log_metrics()), 10)
        assert m["pending"] == 0 and m["dropped_total"] == 0
        health = json.loads(ep.get("/health"))
        assert health["status"] == "ok" and health["inference_log"]["store"] == f"s3://{bucket}/{ep.prefix}".rstrip("/")
        assert not list((settings.inference_log_dir / "s3log_keys").glob("**/*.jsonl"))  # one store, not two
    finally:
        ep.close()


def test_s3_hanging_degrades_logging_never_predictions_and_memory_stays_bounded(settings, tiny_model, own_moto,
                                                                                monkeypatch) -> None:
    cap = 40
    bucket = _point_at(monkeypatch, own_moto, flush_rows=5, flush_seconds=0.2, max_pending_rows=cap)
    ep = Endpoint(settings, tiny_model, bucket, "s3log_down")
    client = own_moto.client("s3")
    try:
        _send(ep, [f"before{i}" for i in range(10)])
        wait_for("the first rows written", lambda: ep.log_metrics()["flushed_total"] == 10, 30)
        os.kill(own_moto.proc.pid, signal.SIGSTOP)  # S3 accepts connections and never answers
        sent, pendings = 10, []
        slowest = 0.0
        for i in range(cap * 3):
            slowest = max(slowest, _send(ep, [f"during{i}"]))
            sent += 1
            pendings.append(ep.log_metrics()["pending"])
        # a write that waited on S3 would wait out the 10 s read timeout: every answer came at once
        assert slowest < 5.0, slowest
        assert max(pendings) == cap and all(p <= cap for p in pendings)  # never above the cap
        m = ep.log_metrics()
        assert m["pending"] == cap and m["flushed_total"] == 10 and m["dropped_total"] == cap * 2
        assert m["pending"] + m["flushed_total"] + m["dropped_total"] == sent
        health = wait_for("health says degraded", lambda: (lambda h: h if h["status"] == "degraded" else None)(
            json.loads(ep.get("/health"))), 60)
        problem = next(p for p in health["problems"] if p.startswith("inference log:"))
        assert f"s3://{bucket}/{ep.prefix}" in problem and own_moto.endpoint_url in problem
        assert "log-writer" not in problem and "platform-secret" not in problem
        text = ep.get("/metrics")
        assert 'onepath_inference_log_ok{endpoint="s3log_down",env="prod"} 0' in text
        assert ep.predict(GOOD, "still")[0] == 200  # degraded logging, serving as ever (this row dropped)

        os.kill(own_moto.proc.pid, signal.SIGCONT)  # S3 is back: what was pending is written
        wait_for("pending written", lambda: (lambda x: x["pending"] == 0 and x["flushed_total"] == 10 + cap)(
            ep.log_metrics()), 90)
        wait_for("health ok again", lambda: json.loads(ep.get("/health"))["status"] == "ok", 30)
        rows = _rows(client, bucket)
        ids = list(rows["request_id"])
        assert len(ids) == len(set(ids)) == 10 + cap  # each pending row written once (a retry rewrites its key)
        assert set(ids) == {f"before{i}" for i in range(10)} | {f"during{i}" for i in range(cap)}
    finally:
        ep.close()


def test_a_drain_writes_everything_pending(settings, tiny_model, moto_s3, monkeypatch) -> None:
    bucket = _point_at(monkeypatch, moto_s3, flush_rows=100_000, flush_seconds=3600)
    ep = Endpoint(settings, tiny_model, bucket, "s3log_drain")
    ids = [f"d{i}" for i in range(25)]
    try:
        _send(ep, ids)
        m = ep.log_metrics()
        assert m["pending"] == 25 and m["flushed_total"] == 0  # nothing would be written for an hour
        pid = ep.worker_pid()
    finally:
        ep.close()  # the supervisor drains its workers: SIGTERM
    wait_for("the worker gone", lambda: not Path(f"/proc/{pid}").exists(), 60)
    rows = _rows(moto_s3.client("s3"), bucket)
    assert sorted(rows["request_id"]) == sorted(ids)


def test_sigkill_loses_only_the_rows_shown_pending(settings, tiny_model, moto_s3, monkeypatch) -> None:
    bucket = _point_at(monkeypatch, moto_s3, flush_rows=20, flush_seconds=3600)
    ep = Endpoint(settings, tiny_model, bucket, "s3log_kill")
    ids = [f"k{i}" for i in range(45)]
    try:
        _send(ep, ids)
        m = wait_for("two segments written", lambda: (lambda x: x if x["flushed_total"] == 40 else None)(
            ep.log_metrics()), 30)
        assert m["pending"] == 5  # the bound: fewer than flush_rows (or flush_seconds' worth), never above the cap
        pid = ep.worker_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for("the worker gone", lambda: not Path(f"/proc/{pid}").exists() or
                 "zombie" in Path(f"/proc/{pid}/status").read_text(), 30)
        rows = _rows(moto_s3.client("s3"), bucket)
        assert sorted(rows["request_id"]) == sorted(ids[:40])  # what was written stays; the 5 pending are lost
    finally:
        ep.close()


# ---------------------------------------------------------------------------------------------------------
# the readers: S3 segments against the same rows as local JSON lines


def _entries(n: int, start: datetime, version: str, seed: int) -> list[tuple]:
    import random

    rnd = random.Random(seed)
    out = []
    for i in range(n):
        ts = start + timedelta(seconds=i * 12)
        us = int((ts - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() * 1_000_000)
        inputs = {"income": round(rnd.gauss(50, 10), 3), "accounts": rnd.randint(0, 9),
                  "region": rnd.choice(["north", "south"]), "active": rnd.random() < 0.5,
                  "score": None if i % 11 == 0 else rnd.random()}
        out.append((us, f"{version}-{i}", inputs, {"application_id": f"A{i}"}, {"prediction": i % 2}, 1.25))
    return out


COLUMNS = [("income", "number"), ("accounts", "integer"), ("region", "string"), ("active", "boolean"),
           ("score", "number")]


def _write_s3(location: str, version: str, entries: list[tuple]) -> None:
    """Rows through the real segment writer (many segments: 500 rows each, as the buffer fills)."""
    log = SegmentLog(location, model="credit", version=version, columns=COLUMNS, flush_rows=500, flush_seconds=3600)
    for i in range(0, len(entries), 10):
        log.write(entries[i:i + 10])
        if log.pending >= 500:  # let the thread cut it now (a writer under load cuts by size)
            wait_for("a segment cut", lambda: log.pending < 500, 30, poll=0.001)
    log.close()
    assert log.flushed == len(entries) and log.dropped == 0, log.error


def _write_local(local: Path, by_version: dict[str, list[tuple]]) -> None:
    """The same rows as the JSON lines InferenceLog appends (one file per UTC day, in time order)."""
    local.mkdir(parents=True, exist_ok=True)
    lines = sorted((e for entries in by_version.values() for e in entries), key=lambda e: e[0])
    for us, rid, inputs, extras, output, latency in lines:
        ts = datetime.fromtimestamp(us / 1e6, timezone.utc)
        with open(local / f"{ts:%Y-%m-%d}.jsonl", "ab") as fh:
            fh.write(orjson.dumps({"ts": ts.isoformat(), "request_id": rid, "model": "credit",
                                   "version": rid.split("-")[0], "inputs": inputs, "extras": extras,
                                   "output": output, "latency_ms": latency}) + b"\n")


def test_read_window_scan_new_and_the_feedback_join_read_s3_as_they_read_local_files(moto_s3, monkeypatch,
                                                                                     tmp_path) -> None:
    bucket = _point_at(monkeypatch, moto_s3)
    location = f"s3://{bucket}/onepath/inference/credit_api/prod"
    local = tmp_path / "logs" / "credit_api" / "prod"
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=30)  # over two or three days
    current = _entries(9000, start, "3", 1)
    other = _entries(400, start + timedelta(hours=29), "2", 2)  # another version's rows, excluded by both
    _write_s3(location, "3", current)
    _write_s3(location, "2", other)
    _write_local(local, {"3": current, "2": other})

    from resources.monitoring import MonitoringResource

    monitoring = MonitoringResource(inference_log_dir=str(tmp_path / "logs"), outcomes_dir=str(tmp_path / "o"),
                                    drift_reports_dir=str(tmp_path / "r"), inference_log_url=f"s3://{bucket}/onepath")
    assert monitoring.log_dir("credit_api", "prod") == location  # what the drift check and the sensor read
    cols = ["income", "accounts", "region", "active", "score"]
    now = start + timedelta(hours=30)
    for kw in ({"window_rows": 500}, {"window_rows": 8000}, {"window_rows": 20000}, {"window_hours": 2.0},
               {"window_hours": 26.0}):
        a = read_window(local, version="3", columns=cols, now=now, **kw)
        b = read_window(location, version="3", columns=cols, now=now, **kw)
        pd.testing.assert_frame_equal(a.frame, b.frame)
        assert (a.rows, a.oldest_ts, a.newest_ts, a.complete) == (b.rows, b.oldest_ts, b.newest_ts, b.complete), kw
        if "window_hours" in kw:
            assert a.other_version_rows == b.other_version_rows, kw
        assert b.corrupt_lines == 0 and all(f.startswith(location) for f in b.files_read)
    small = read_window(location, version="3", columns=cols, now=now, window_rows=10)
    assert len(small.files_read) == 1  # the newest segment alone: a small window reads little
    with pytest.raises(ValueError, match="does not log input\\(s\\) national_id"):
        read_window(location, version="3", columns=["income", "national_id"], window_rows=10)

    first = scan_new(location, None)
    assert first.new_rows_by_version == scan_new(local, None).new_rows_by_version == {"2": 400, "3": 9000}
    again = scan_new(location, first.cursor)
    assert again.new_rows == 0 and again.files_read == []
    json.dumps(first.cursor)  # a sensor keeps it as its cursor string
    log = SegmentLog(location, model="credit", version="3", columns=COLUMNS, flush_seconds=3600)
    log.write(_entries(12, now + timedelta(seconds=1), "3", 3))  # after the feedback window below
    log.close()
    later = scan_new(location, again.cursor)
    assert later.new_rows_by_version == {"3": 12} and len(later.files_read) == 1
    assert scan_new(location, later.cursor).new_rows == 0
    with pytest.raises(ValueError, match="not an S3 log's cursor"):
        scan_new(location, scan_new(local, None).cursor)

    from resources.feedback import labelled_rows, record_outcomes

    outcomes = tmp_path / "outcomes"
    record_outcomes(outcomes, "credit_api", "prod",
                    [{"request_id": f"3-{i}", "label": i % 2} for i in range(0, 9000, 3)] + [{"request_id": "2-5", "label": 1}])
    a = labelled_rows(inference_log_dir=tmp_path / "logs", outcomes_dir=outcomes, endpoint="credit_api", env="prod",
                      max_age_days=1.0, max_rows=100_000, now=now)
    b = labelled_rows(inference_log_dir=f"s3://{bucket}/onepath/inference", outcomes_dir=outcomes,
                      endpoint="credit_api", env="prod", max_age_days=1.0, max_rows=100_000, now=now)
    key = ["ts", "request_id"]
    pd.testing.assert_frame_equal(a.frame.sort_values(key).reset_index(drop=True)[sorted(a.frame.columns)],
                                  b.frame.sort_values(key).reset_index(drop=True)[sorted(b.frame.columns)])
    assert (a.logged, a.joined, a.corrupt_log_lines) == (b.logged, b.joined, b.corrupt_log_lines) and a.joined > 0


def test_a_setting_that_is_not_an_s3_uri_or_a_bad_limit_is_refused_naming_it(monkeypatch) -> None:
    from platform_defs.settings import load_settings
    from resources.serving.segment_log import settings_from_env

    monkeypatch.setenv("ONEPATH_INFERENCE_LOG_URL", "/var/logs")
    with pytest.raises(ValueError, match="ONEPATH_INFERENCE_LOG_URL='/var/logs': expected s3://BUCKET/PREFIX"):
        load_settings()
    monkeypatch.setenv("ONEPATH_INFERENCE_LOG_URL", "s3://logs/onepath/")
    assert load_settings().inference_log_url == "s3://logs/onepath"
    with pytest.raises(ValueError, match="ONEPATH_INFERENCE_LOG_MAX_PENDING_ROWS='lots': expected a positive integer"):
        settings_from_env({"ONEPATH_INFERENCE_LOG_MAX_PENDING_ROWS": "lots"})
    assert settings_from_env({})["flush_rows"] == 5000
