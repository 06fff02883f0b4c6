"""An endpoint's inference log on S3: rows buffered in memory, written as Parquet segments by a thread.

Chosen by the setting ``ONEPATH_INFERENCE_LOG_URL=s3://bucket/prefix`` (the supervisor hands each worker
``<prefix>/inference/<endpoint>/<env>`` as its config's ``log_url``); without it the worker appends JSON
lines (``InferenceLog``), unchanged. Each segment is one object::

    <prefix>/inference/<endpoint>/<env>/<version>/<YYYY-MM-DD>/<utc-ts>-<writer-id>-<n>.parquet

``YYYY-MM-DD``: the UTC day the rows were scored (a buffer that spans midnight becomes two segments);
``utc-ts``: when the segment was cut (``%Y%m%dT%H%M%S%fZ``, so one writer's segments sort by name);
``writer-id``: 12 hex digits drawn when the worker starts; ``n``: the writer's segment number (6 digits).
Columns: ``ts`` (timestamp[us, UTC]), ``request_id``, ``model``, ``version`` (strings), ``inputs`` (a struct
of the logged signature columns: number float64, integer int64, string, boolean; never a PII column),
``extras`` and ``output`` (JSON text), ``latency_ms`` (float64). ``resources.inference_log_s3`` reads them.

What a prediction pays is an append to a list under a lock: it never waits on storage. The thread cuts
a segment (of at most ``flush_rows`` rows) when that many are buffered or the oldest buffered row is
``flush_seconds`` old, and
writes it; while the store is unreachable it keeps the segment and retries with backoff (0.2 s doubling
to 30 s). ``pending`` (rows buffered or in unwritten segments) never exceeds ``max_pending_rows``: rows
beyond it are dropped and counted, so a store that is down costs bounded memory, never serving. On
close (the worker's drain: SIGTERM, the lifespan shutdown) everything pending is written, retrying for
at most ``drain_seconds``. A SIGKILL loses what was pending: at most ``max_pending_rows`` rows, and
while the store answers, at most the rows of the last ``flush_seconds`` plus the segment being written.

Settings (environment of the worker, inherited from the deployer): ``ONEPATH_INFERENCE_LOG_FLUSH_ROWS``
(5000), ``ONEPATH_INFERENCE_LOG_FLUSH_SECONDS`` (5), ``ONEPATH_INFERENCE_LOG_MAX_PENDING_ROWS`` (100000),
``ONEPATH_INFERENCE_LOG_DRAIN_SECONDS`` (5). The S3 client: ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``, ``ONEPATH_S3_ADDRESSING_STYLE`` as everywhere; its credentials are the log
writer's own, ``ONEPATH_INFERENCE_LOG_AWS_ACCESS_KEY_ID`` / ``_SECRET_ACCESS_KEY`` / ``_SESSION_TOKEN``
(the platform's ``AWS_*`` keys never reach a worker, see ``resources.deployers.local.served_environment``;
give these a policy that may only put objects under the log prefix), else boto3's default chain (an
instance role).

This module imports neither pyarrow nor boto3 until the thread starts (the worker's start stays light).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timezone
from typing import Any

import orjson

SEGMENT_RE = re.compile(r"^(\d{8}T\d{12}Z)-([0-9a-f]{12})-(\d{6,})\.parquet$")
DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ARROW_KIND = {"number": "float64", "integer": "int64", "string": "string", "boolean": "bool_"}
DEFAULTS = {"flush_rows": 5000, "flush_seconds": 5.0, "max_pending_rows": 100_000, "drain_seconds": 5.0}
_ENV = {"flush_rows": "ONEPATH_INFERENCE_LOG_FLUSH_ROWS", "flush_seconds": "ONEPATH_INFERENCE_LOG_FLUSH_SECONDS",
        "max_pending_rows": "ONEPATH_INFERENCE_LOG_MAX_PENDING_ROWS",
        "drain_seconds": "ONEPATH_INFERENCE_LOG_DRAIN_SECONDS"}
_BACKOFF_MIN, _BACKOFF_MAX = 0.2, 30.0


def settings_from_env(environ: Any = os.environ) -> dict[str, float]:
    """The writer's limits from the environment; a value that is not a positive number is one line naming it."""
    out: dict[str, float] = {}
    for k, var in _ENV.items():
        raw = environ.get(var, "").strip()
        if not raw:
            out[k] = DEFAULTS[k]
            continue
        try:
            v = float(raw) if k in ("flush_seconds", "drain_seconds") else int(raw)
        except ValueError:
            v = -1
        if v <= 0:
            raise ValueError(f"{var}={raw!r}: expected a positive {'number' if isinstance(DEFAULTS[k], float) else 'integer'}")
        out[k] = v
    return out


def segment_name(cut: datetime, writer: str, n: int) -> str:
    return f"{cut.strftime('%Y%m%dT%H%M%S%f')}Z-{writer}-{n:06d}.parquet"


def encode_segment(rows: list[tuple], *, model: str, version: str, columns: list[tuple[str, str]]) -> bytes:
    """One segment's Parquet bytes (the columns in the module docstring) of ``rows``, ``(ts_us, request_id, inputs,
    extras, output, latency_ms)`` tuples; ``columns``: ``(name, signature kind)`` of the logged inputs. The one
    encoder of the layout: the writer's thread and ``onepath migrate`` (JSON lines moved to S3) both use it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs = [pa.array([r[2].get(name) for r in rows], getattr(pa, ARROW_KIND[kind])()) for name, kind in columns]
    struct = (pa.StructArray.from_arrays(inputs, [c for c, _ in columns]) if columns
              else pa.array([{}] * len(rows), pa.struct([])))
    table = pa.table({
        "ts": pa.array([r[0] for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "request_id": pa.array([r[1] for r in rows], pa.string()),
        "model": pa.array([model] * len(rows), pa.string()),
        "version": pa.array([version] * len(rows), pa.string()),
        "inputs": struct,
        "extras": pa.array([orjson.dumps(r[3], default=str).decode() for r in rows], pa.string()),
        "output": pa.array([orjson.dumps(r[4], default=str).decode() for r in rows], pa.string()),
        "latency_ms": pa.array([r[5] for r in rows], pa.float64()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _client() -> Any:
    import boto3
    from botocore.config import Config

    env = os.environ
    kw = {}
    if env.get("ONEPATH_INFERENCE_LOG_AWS_ACCESS_KEY_ID"):
        kw = {"aws_access_key_id": env["ONEPATH_INFERENCE_LOG_AWS_ACCESS_KEY_ID"],
              "aws_secret_access_key": env.get("ONEPATH_INFERENCE_LOG_AWS_SECRET_ACCESS_KEY"),
              "aws_session_token": env.get("ONEPATH_INFERENCE_LOG_AWS_SESSION_TOKEN") or None}
    style = env.get("ONEPATH_S3_ADDRESSING_STYLE", "auto")
    # one attempt per call: the writer's own loop retries with backoff, never the request path
    return boto3.session.Session(**kw).client("s3", config=Config(
        s3={"addressing_style": style}, retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=2, read_timeout=10))


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


class SegmentLog:
    """The S3 inference log of one worker (one model version). ``write`` is called on the event loop with
    ``(ts_us, request_id, inputs, extras, output, latency_ms)`` tuples; everything else runs in the thread."""

    enabled = True
    dir = None  # not a folder

    def __init__(self, url: str, *, model: str, version: str, columns: list[tuple[str, str]],
                 flush_rows: int = 5000, flush_seconds: float = 5.0, max_pending_rows: int = 100_000,
                 drain_seconds: float = 5.0, client_factory: Any = _client):
        rest = url.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        if not url.startswith("s3://") or not self.bucket:
            raise ValueError(f"inference log URL {url!r}: expected s3://BUCKET/PREFIX")
        self.url = url.rstrip("/")
        self.prefix = "/".join(p for p in (prefix.strip("/"), version) if p)
        self.model, self.version = model, version
        self.columns = list(columns)  # (name, signature kind) of the logged inputs
        self.flush_rows, self.flush_seconds = int(flush_rows), float(flush_seconds)
        self.max_pending = int(max_pending_rows)
        self.drain_seconds = float(drain_seconds)
        self.writer = uuid.uuid4().hex[:12]
        self._n = 0
        self._client_factory = client_factory
        self._cv = threading.Condition(threading.Lock())
        self._buf: list[tuple] = []
        self._buf_since = 0.0  # monotonic time of the oldest buffered row
        self._segments: deque[tuple[str, bytes, int]] = deque()  # (key, parquet bytes, rows), oldest first
        self.pending = 0  # rows buffered or in segments not yet written
        self.flushed = 0
        self.dropped = 0
        self.segments_written = 0
        self.ok = True
        self.error: str | None = None
        self._closing = False
        self._deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="onepath-inference-log", daemon=True)
        self._thread.start()

    # -- the request path ----------------------------------------------------------------------
    @property
    def lines_written(self) -> int:
        return self.flushed

    @property
    def store(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def write(self, entries: list[tuple]) -> int:
        """Buffer ``entries``; returns how many were dropped (the pending cap reached, or closed)."""
        if not entries:
            return 0
        with self._cv:
            room = self.max_pending - self.pending if not self._closing else 0
            if room <= 0:
                self.dropped += len(entries)
                return len(entries)
            take = entries if len(entries) <= room else entries[:room]
            first = not self._buf
            if first:
                self._buf_since = time.monotonic()
            self._buf.extend(take)
            self.pending += len(take)
            if first or len(self._buf) >= self.flush_rows:  # the thread learns when the buffer is due
                self._cv.notify()
            dropped = len(entries) - len(take)
            self.dropped += dropped
            return dropped

    def close(self) -> None:
        """Write everything pending (retrying for at most ``drain_seconds``), then stop the thread."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._deadline = time.monotonic() + self.drain_seconds
            self._cv.notify()
        self._thread.join(self.drain_seconds + 5.0)

    # -- the thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        client = None
        backoff, retry_at = _BACKOFF_MIN, 0.0
        while True:
            with self._cv:
                while True:
                    now = time.monotonic()
                    if self._closing:
                        break
                    if len(self._buf) >= self.flush_rows:
                        break
                    due = self._buf_since + self.flush_seconds if self._buf else None
                    if self._segments:
                        due = retry_at if due is None else min(due, retry_at)
                    if due is not None and now >= due:
                        break
                    self._cv.wait(None if due is None else due - now)
                if len(self._buf) > self.flush_rows:  # a segment holds at most flush_rows rows
                    rows, self._buf = self._buf[:self.flush_rows], self._buf[self.flush_rows:]
                    self._buf_since = time.monotonic()
                else:
                    rows, self._buf = self._buf, []
                closing = self._closing
            if rows:
                try:
                    self._cut(rows)
                except Exception as err:  # a row arrow cannot take: never a crash of the thread
                    with self._cv:
                        self.pending -= len(rows)
                        self.dropped += len(rows)
                    self._fail(f"cannot build a segment of {len(rows)} rows: {type(err).__name__}: {err}")
            while self._segments and (closing or time.monotonic() >= retry_at):
                key, data, n = self._segments[0]
                try:
                    if client is None:
                        client = self._client_factory()
                    client.put_object(Bucket=self.bucket, Key=key, Body=data)
                except Exception as err:
                    why = str(err).splitlines()[0] if str(err) else type(err).__name__
                    self._fail(f"cannot write s3://{self.bucket}/{key} (endpoint {_endpoint()}): {why}")
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, _BACKOFF_MAX if not closing else 1.0)
                    if closing:
                        if time.monotonic() + backoff > self._deadline:
                            break
                        time.sleep(min(backoff, max(0.0, self._deadline - time.monotonic())))
                        continue
                    break
                self._segments.popleft()
                backoff = _BACKOFF_MIN
                with self._cv:
                    self.pending -= n
                    self.flushed += n
                    self.segments_written += 1
                    self.ok, self.error = True, None
            if closing:
                with self._cv:
                    if self._buf and time.monotonic() < self._deadline:
                        continue
                    if self.pending:
                        lost = self.pending
                        self.dropped += lost
                        self.pending = 0
                        print(f"onepath model server: inference log {self.store}: {lost} row(s) not written at "
                              f"shutdown: {self.error}", file=sys.stderr, flush=True)
                return

    def _fail(self, error: str) -> None:
        with self._cv:
            self.ok, self.error = False, error

    def _cut(self, rows: list[tuple]) -> None:
        """``rows`` (oldest first) as one Parquet segment per UTC day, queued to be written."""
        cut = datetime.now(timezone.utc)
        days: dict[str, list[tuple]] = {}
        for r in rows:
            day = datetime.fromtimestamp(r[0] / 1e6, timezone.utc).strftime("%Y-%m-%d")
            days.setdefault(day, []).append(r)
        for day, part in days.items():
            data = encode_segment(part, model=self.model, version=self.version, columns=self.columns)
            key = f"{self.prefix}/{day}/{segment_name(cut, self.writer, self._n)}"
            self._n += 1
            self._segments.append((key, data, len(part)))
