"""Reading inference logs written to S3 as Parquet segments (``resources.serving.segment_log``).

``resources.inference_log.read_window`` and ``scan_new`` come here when their location is an
``s3://bucket/prefix/inference/<endpoint>/<env>`` URI (the one test: ``object_store.is_s3``); the local
JSON-lines path is untouched. The layout below the location::

    <version>/<YYYY-MM-DD>/<utc-ts>-<writer-id>-<n>.parquet

``read_window`` lists only the version's prefix, reads segments newest first (by day, then name: a writer's
segments sort by when they were cut) and stops once the window is full, reading only the columns asked for
(``inputs.<column>``, ``ts``, ``request_id``). It returns the same frame as the local reader for the same rows.
What differs is what its counters can see: ``other_version_rows`` counts rows of other versions stamped
within the window's span (their segments' ``ts`` column only), ``corrupt_lines`` counts segments that are not
readable Parquet of this layout (each one, whatever its rows), ``partial_lines`` is 0 (an object is whole or
absent) and ``files_read`` are the keys read.

``scan_new`` lists the live days (from the day before its watermark on) of every version and reads the
footers of the segments it has not seen. S3 lists keys, not times, and a segment retried after an outage is
written late under the time it was cut: the cursor keeps the store's ``LastModified`` watermark and the keys
seen within ``SCAN_SLACK`` (15 minutes) before it, so a segment whose write completed up to that long after
its newer neighbours is still counted once; one later than that is missed by the scan (read_window reads it).
Segments are read in parallel (``READ_THREADS``).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from resources import object_store
from resources.inference_log import ORDER_SLACK
from resources.serving.segment_log import DAY_RE, SEGMENT_RE

# segments read at once (ONEPATH_S3_READ_THREADS): S3 answers parallel GETs in parallel
READ_THREADS = max(1, int(os.environ.get("ONEPATH_S3_READ_THREADS", "8") or "8"))
SCAN_SLACK = timedelta(minutes=15)
_CURSOR_VERSION = 1
_NUMERIC = (pa.types.is_integer, pa.types.is_floating)


@dataclass(frozen=True)
class Segment:
    uri: str
    version: str
    day: str
    name: str
    size: int
    modified: datetime

    @property
    def order(self) -> tuple[str, str]:
        return self.day, self.name


def _segments(location: str, under: str = "") -> tuple[list[Segment], int]:
    """Segments under ``location``/``under`` (oldest first), and how many objects there are not segments."""
    bucket, base = object_store.split(location)
    out, foreign = [], 0
    for o in object_store.list_objects(object_store.join(location, under) if under else location):
        rel = o.uri.removeprefix(f"s3://{bucket}/").removeprefix(base + "/" if base else "")
        parts = rel.split("/")
        if len(parts) != 3 or not DAY_RE.match(parts[1]) or not SEGMENT_RE.match(parts[2]):
            foreign += 1
            continue
        out.append(Segment(o.uri, parts[0], parts[1], parts[2], o.size, o.modified))
    out.sort(key=lambda s: s.order)
    return out, foreign


def _read(seg: Segment, columns: list[str] | None) -> pa.Table | None:
    """The segment's ``columns`` (None: footer only, an empty table of its rows' count), or None when it is
    not readable Parquet of this layout."""
    data = object_store.get_bytes(seg.uri)
    if data is None:  # gone between the listing and the read (a retention job)
        return pa.table({})
    try:
        if columns is None:
            md = pq.read_metadata(io.BytesIO(data))
            return pa.table({"_n": pa.nulls(md.num_rows, pa.null())})
        return pq.read_table(io.BytesIO(data), columns=columns)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, KeyError):
        return None


@dataclass(frozen=True)
class _Missing:
    logged: list[str]


def _read_inputs(seg: Segment, columns: list[str]) -> pa.Table | _Missing | None:
    """``ts``, ``request_id`` and the requested inputs (top-level columns) of a segment; ``_Missing`` when it
    does not log one of them; None when it is not readable Parquet of this layout."""
    data = object_store.get_bytes(seg.uri)
    if data is None:
        return pa.table({})
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        schema = pf.schema_arrow
        if "ts" not in schema.names or "request_id" not in schema.names or "inputs" not in schema.names:
            return None
        inputs = schema.field("inputs").type
        if not pa.types.is_struct(inputs):
            return None
        logged = [f.name for f in inputs]
        if any(c not in logged for c in columns):
            return _Missing(logged)
        tb = pf.read(columns=["ts", "request_id"] + [f"inputs.{c}" for c in columns])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, KeyError):
        return None
    if "inputs" not in tb.column_names:  # pyarrow may give nested columns flattened (by leaf name)
        return tb.rename_columns(["ts", "request_id", *columns])
    inputs = tb["inputs"].combine_chunks()
    return pa.table({"ts": tb["ts"], "request_id": tb["request_id"],
                     **{c: pc.struct_field(inputs, c) for c in columns}})


def _cut_us(seg: Segment) -> int:
    """When the segment was cut (its name), in µs since the epoch: none of its rows is newer."""
    return _us(datetime.strptime(seg.name[:21], "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc))


_POOL: list[Any] = []  # [(pid, threads, executor)]: its threads keep their boto3 clients (object_store.client)


def _parallel(fn: Any, items: list[Any]) -> Any:
    if len(items) <= 1:
        return list(map(fn, items))
    if not _POOL or _POOL[0][:2] != (os.getpid(), READ_THREADS):
        _POOL[:] = [(os.getpid(), READ_THREADS, ThreadPoolExecutor(READ_THREADS, thread_name_prefix="onepath-s3-read"))]
    return list(_POOL[0][2].map(fn, items))


def _us(t: datetime) -> int:
    delta = t - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _kind(t: pa.DataType) -> str | None:
    if pa.types.is_boolean(t):
        return "bool"
    if any(f(t) for f in _NUMERIC):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return None


def _columns_of(tb: pa.Table, columns: list[str], kinds: dict[str, Any]) -> dict[str, Any] | None:
    """``columns`` of a segment as the local reader types them (numbers float64), or None when a column's
    type differs from the one the newest segment gave it (the segment is then counted corrupt)."""
    out: dict[str, Any] = {}
    for c in columns:
        col = tb[c]
        k = _kind(col.type)
        if k is None or (kinds[c] is not None and kinds[c] != k):
            return None
        out[c] = col.cast(pa.float64()) if k == "number" else col
    return out


def read_window(location: str, *, version: str, columns: list[str], window_rows: int | None,
                window_hours: float | None, now: datetime) -> Any:
    """``resources.inference_log.read_window`` over S3 segments (arguments already checked there)."""
    from resources.inference_log import LogWindow, _frame, _out_schema

    now_us = _us(now)
    cutoff_us = now_us - int(window_hours * 3_600_000_000) if window_hours is not None else None
    segs, _ = _segments(location, version)
    segs = [s for s in segs if s.version == version]
    kinds: dict[str, Any] = {c: None for c in columns}
    slack_us = int(ORDER_SLACK.total_seconds() * 1_000_000)
    taken: list[pa.Table] = []
    corrupt = bytes_read = 0
    files_read: list[str] = []
    need = window_rows or 0
    complete = False
    discovered = False
    i = len(segs)
    batch = 1
    while i > 0 and not complete:
        chunk = segs[max(0, i - batch):i][::-1]  # newest first
        i -= len(chunk)
        if cutoff_us is not None:
            keep = []
            for s in chunk:
                # a segment holds rows stamped before it was cut (the writer's clock; the slack for another
                # host's): one cut before the window, and every older one, holds none of its rows
                if _cut_us(s) < cutoff_us - slack_us:
                    complete = True
                    break
                keep.append(s)
            chunk = keep
        tables = _parallel(lambda s: _read_inputs(s, columns), chunk)
        for seg, tb in zip(chunk, tables):
            files_read.append(seg.uri)
            bytes_read += seg.size
            if isinstance(tb, _Missing):
                if discovered:  # an older segment of the version that lacks a column: not its rows
                    corrupt += 1
                    continue
                missing = [c for c in columns if c not in tb.logged]
                raise ValueError(f"inference log {location}: version {version!r} does not log input(s) "
                                 f"{', '.join(missing)} (its rows log: {', '.join(tb.logged) or 'nothing'})")
            if tb is None or not tb.num_columns:
                corrupt += tb is None
                continue
            cols = _columns_of(tb, columns, kinds)
            if cols is None:
                corrupt += 1
                continue
            for c in columns:
                kinds[c] = kinds[c] or _kind(cols[c].type)
            discovered = True
            t = pa.table({"_line": pa.nulls(tb.num_rows, pa.int64()), "ts": tb["ts"].cast(pa.timestamp("us", tz="UTC")),
                          "request_id": tb["request_id"], "version": pa.array([version] * tb.num_rows, pa.string()),
                          **cols})
            if window_rows is not None:
                if t.num_rows >= need:
                    t = t.slice(t.num_rows - need)
                    complete = True
                taken.append(t)
                need -= t.num_rows
            else:
                assert cutoff_us is not None
                ts = t["ts"].cast(pa.int64()).to_numpy()
                if len(ts) and bool((ts < cutoff_us).any()):
                    complete = True
                in_range = (ts >= cutoff_us) & (ts <= now_us)
                if in_range.any():
                    taken.append(t if in_range.all() else t.filter(pa.array(in_range)))
            if complete:
                break
        batch = min(batch * 2, 4 * READ_THREADS)
    schema = _out_schema(columns, kinds)
    tb = (pa.concat_tables([t.cast(schema) if t.schema != schema else t for t in reversed(taken)])
          if taken else schema.empty_table())
    frame = _frame(tb, columns)
    oldest = frame["ts"].min().to_pydatetime() if len(frame) else None
    newest = frame["ts"].max().to_pydatetime() if len(frame) else None
    span_from = cutoff_us if cutoff_us is not None else (_us(oldest) if oldest is not None else None)
    other = _other_version_rows(location, version, span_from, now_us) if span_from is not None else 0
    return LogWindow(
        frame=frame, version=version, columns=columns, window_rows=window_rows, window_hours=window_hours,
        rows=len(frame), other_version_rows=other, corrupt_lines=corrupt, partial_lines=0,
        files_read=files_read, bytes_read=bytes_read, oldest_ts=oldest, newest_ts=newest, complete=complete,
    )


def _other_version_rows(location: str, version: str, from_us: int, to_us: int) -> int:
    """Rows of other versions stamped in ``[from_us, to_us]`` (their day folders only; ``ts`` column only)."""
    first = datetime.fromtimestamp(from_us / 1e6, timezone.utc).date().isoformat()
    last = datetime.fromtimestamp(to_us / 1e6, timezone.utc).date().isoformat()
    segs, _ = _segments(location)
    segs = [s for s in segs if s.version != version and first <= s.day <= last]

    def count(seg: Segment) -> int:
        tb = _read(seg, ["ts"])
        if tb is None or not tb.num_columns:
            return 0
        ts = tb["ts"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
        return int(np.count_nonzero((ts >= from_us) & (ts <= to_us)))

    return sum(_parallel(count, segs))


# --------------------------------------------------------------------------------------------
# scan_new


def _load_cursor(location: str, cursor: Any) -> dict[str, Any]:
    if cursor is None:
        return {"v": _CURSOR_VERSION, "store": "s3", "watermark": None, "recent": []}

    def bad(why: str) -> ValueError:
        return ValueError(f"scan_new({location}): the cursor is not one scan_new returned: {why}")

    if not isinstance(cursor, dict) or cursor.get("store") != "s3":
        raise bad("it is not an S3 log's cursor (was the log moved from a folder to S3? start from None)")
    if cursor.get("v") != _CURSOR_VERSION:
        raise bad(f"cursor format {cursor.get('v')!r}, this reader writes {_CURSOR_VERSION}")
    wm, recent = cursor.get("watermark"), cursor.get("recent")
    if wm is not None:
        try:
            wm_t = datetime.fromisoformat(wm)
        except (TypeError, ValueError):
            raise bad(f"watermark = {wm!r}") from None
        if wm_t.tzinfo is None:
            raise bad(f"watermark = {wm!r} has no UTC offset")
    if not isinstance(recent, list) or not all(isinstance(k, str) for k in recent):
        raise bad("'recent' must be a list of keys")
    return {"v": _CURSOR_VERSION, "store": "s3", "watermark": wm, "recent": list(recent)}


def scan_new(location: str, cursor: Any, *, max_bytes: int | None) -> Any:
    """``resources.inference_log.scan_new`` over S3 segments (see the module docstring for the cursor)."""
    from resources.inference_log import ScanResult

    cur = _load_cursor(location, cursor)
    wm = datetime.fromisoformat(cur["watermark"]) if cur["watermark"] else None
    seen = set(cur["recent"])
    if wm is None:
        segs, foreign = _segments(location)
    else:  # only the live days of each version: a long history is not listed again
        from_day = (wm - SCAN_SLACK - timedelta(days=1)).date()
        bucket, base = object_store.split(location)
        versions = _versions(location)
        segs, foreign = [], 0
        days = [(from_day + timedelta(days=d)).isoformat()
                for d in range((datetime.now(timezone.utc).date() + timedelta(days=1) - from_day).days + 1)]
        for v in versions:
            for d in days:
                s, f = _segments(location, f"{v}/{d}")
                segs += s
                foreign += f
    fresh = [s for s in segs if s.uri not in seen and (wm is None or s.modified >= wm - SCAN_SLACK)]
    fresh.sort(key=lambda s: (s.modified, s.order))
    budget = max_bytes
    todo, caught_up = [], True
    for s in fresh:
        if budget is not None and budget <= 0:
            caught_up = False
            break
        todo.append(s)
        if budget is not None:
            budget -= s.size
    tables = _parallel(lambda s: _read(s, None), todo)
    by_version: dict[str, int] = {}
    corrupt = 0
    for s, tb in zip(todo, tables):
        if tb is None:
            corrupt += 1
        elif tb.num_rows:
            by_version[s.version] = by_version.get(s.version, 0) + tb.num_rows
    if todo:
        new_wm = max(s.modified for s in todo)
        wm = new_wm if wm is None or new_wm > wm else wm
    if wm is not None:
        keep = {s.uri for s in segs if s.modified >= wm - SCAN_SLACK and (s.uri in seen or s in todo)}
        cur = {"v": _CURSOR_VERSION, "store": "s3", "watermark": wm.isoformat(), "recent": sorted(keep)}
    return ScanResult(new_rows=sum(by_version.values()), new_rows_by_version=dict(sorted(by_version.items())),
                      corrupt_lines=corrupt, files_read=[s.uri for s in todo], bytes_read=sum(s.size for s in todo),
                      cursor=cur, caught_up=caught_up)


def _versions(location: str) -> list[str]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, base = object_store.split(location)
    prefix = base + "/" if base else ""
    out: list[str] = []
    try:
        for page in object_store.client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"):
            out += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    except (BotoCoreError, ClientError) as err:
        raise object_store._fail("list", location, err) from None
    return out


def iter_rows(location: str, first_day: date, counts: dict[str, int] | None = None) -> Any:
    """Every row of every version logged on ``first_day`` or later, as the dicts a JSON line holds (``ts`` an
    ISO string, ``inputs``/``extras``/``output`` objects), oldest segment first: what the feedback join reads.
    An unreadable segment yields ``None`` once (counted corrupt by the caller)."""
    import orjson

    segs, _ = _segments(location)
    segs = [s for s in segs if s.day >= first_day.isoformat()]
    for i in range(0, len(segs), READ_THREADS):
        part = segs[i:i + READ_THREADS]
        for seg, tb in zip(part, _parallel(lambda s: _read(s, ["ts", "request_id", "version", "inputs", "extras"]),
                                           part)):
            if counts is not None:
                counts["inference_log"] = counts.get("inference_log", 0) + 1
            if tb is None:
                yield None
                continue
            if not tb.num_columns:
                continue
            ts = tb["ts"].cast(pa.timestamp("us", tz="UTC")).to_pylist()
            for t, rid, ver, inp, ext in zip(ts, tb["request_id"].to_pylist(), tb["version"].to_pylist(),
                                             tb["inputs"].to_pylist(), tb["extras"].to_pylist()):
                yield {"ts": t.isoformat(), "request_id": rid, "version": ver, "inputs": inp or {},
                       "extras": orjson.loads(ext) if ext else {}}
