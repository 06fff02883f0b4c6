"""Labels that arrive later: the outcomes store, and its join with an endpoint's inference log.

An endpoint logs every row it scores (``<inference_log_dir>/<endpoint>/<env>/<YYYY-MM-DD>.jsonl``:
``ts, request_id, model, version, inputs, extras, output, latency_ms``; a multi-record request's
rows are ``"<id>:<j>"``). What really happened to each request (the applicant defaulted, the
customer left) is known only later and is appended to the outcomes store:

    <outcomes_dir>/<endpoint>/<env>/<YYYY-MM-DD>.jsonl      {"request_id", "label": int, "observed_at"}

one line per outcome, in the file of the day it was observed (UTC). Both stores are append-only JSON
lines written by several processes at once; a reader skips a line that is partial (no newline yet,
or a crashed writer's) or corrupt, and counts it.

On S3 (``ONEPATH_OUTCOMES_URL``; the store's location is then ``s3://bucket/prefix/outcomes``) there is no
append: each ``record_outcomes`` call writes one object per day it touches, with the same lines::

    <prefix>/outcomes/<endpoint>/<env>/<YYYY-MM-DD>/<YYYYmmddTHHMMSSffffffZ>-<12 hex>.jsonl

The name starts with the write's UTC time, so key order is write order (two writes in the same microsecond
are ordered by their random suffix), and a reader taking the objects in key order sees the lines in the
order the local day file would hold them: the same outcomes, corrections and counts.

``labelled_rows`` joins the two by request id; ``dataset_rows_from_feedback`` turns the joined rows
into rows of a declared dataset (its exact columns and dtypes), so a dataset can be rebuilt from its
generator's rows plus what production learned.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from platform_defs.specs import ColumnSpec, DatasetSpec
from resources import object_store

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_DAY_FILE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_OBJECT_RE = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{12}\.jsonl$")
META_COLUMNS = ("label", "request_id", "ts", "version")


class FeedbackError(ValueError):
    """Feedback cannot be used as asked. ``str(err)`` is one line naming what and where."""


# --------------------------------------------------------------------------------------------
# helpers


def _segment(what: str, value: str) -> str:
    if not isinstance(value, str) or not _SEGMENT_RE.match(value) or value in (".", ".."):
        raise FeedbackError(f"{what} {value!r} is not a valid name (letters, digits, '_', '-', '.')")
    return value


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return _utc(datetime.fromisoformat(value))
    except ValueError:
        return None


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not float


def _day_files(directory: Path, since: date | None) -> list[tuple[date, Path]]:
    """The ``YYYY-MM-DD.jsonl`` files of a folder, oldest first, from ``since`` on."""
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _DAY_FILE_RE.match(p.name)
        if not m:
            continue
        try:
            day = date.fromisoformat(m.group(1))
        except ValueError:
            continue
        if since is None or day >= since:
            out.append((day, p))
    return sorted(out)


def _log_records(log_dir: Path | str, since: date, result: "LabelledRows") -> Iterator[Any | None]:
    """The inference log's rows from ``since`` on, as JSON-line objects (None: one that is corrupt): the day
    files of a folder, or the Parquet segments of an S3 log (``resources.inference_log_s3.iter_rows``)."""
    if isinstance(log_dir, str):
        from resources.inference_log_s3 import iter_rows

        result.files["inference_log"] = 0  # segments read
        yield from iter_rows(log_dir, since, result.files)
        return
    files = _day_files(log_dir, since)
    result.files["inference_log"] = len(files)
    for _, path in files:
        yield from _json_lines(path)


def _json_lines(path: Path) -> Iterator[Any | None]:
    """Each line's JSON value, or None for a line that is partial or does not parse."""
    with open(path, "rb") as fh:
        data = fh.read()
    return _parse_lines(data)


def _parse_lines(data: bytes) -> Iterator[Any | None]:
    lines = data.split(b"\n")
    last = lines.pop()  # the text after the final newline: empty, or a line still being written
    for raw in lines:
        if not raw.strip():
            continue
        try:
            yield orjson.loads(raw)
        except orjson.JSONDecodeError:
            yield None
    if last.strip():
        yield None


# --------------------------------------------------------------------------------------------
# the outcomes store


def outcomes_root(outcomes_url: str | None, outcomes_dir: str | Path) -> Path | str:
    """The store's location: ``<outcomes_url>/outcomes`` when it is on S3 (``ONEPATH_OUTCOMES_URL``), else the
    folder. What :func:`record_outcomes` and :func:`labelled_rows` take."""
    return object_store.join(outcomes_url, "outcomes") if outcomes_url else Path(outcomes_dir)


def outcomes_path(outcomes_dir: str | Path, endpoint: str, env: str, day: date) -> Path:
    return Path(outcomes_dir) / _segment("endpoint", endpoint) / _segment("env", env) / f"{day.isoformat()}.jsonl"


def record_outcomes(outcomes_dir: str | Path, endpoint: str, env: str,
                    outcomes: Iterable[Mapping[str, Any]]) -> int:
    """Append outcomes ``{"request_id": str, "label": int, "observed_at": ISO time (default now)}``.

    ``outcomes_dir`` is the store's folder, or its ``s3://bucket/prefix/outcomes`` location
    (``MonitoringResource.outcomes_root``). Every outcome is checked before anything is written (a bad
    one raises ``FeedbackError`` naming its position and field, and nothing is appended). Each day's
    lines go to their file in one ``write`` under an exclusive lock, in append mode, so concurrent
    writers never interleave partial lines; on S3 to one new object per day (see the module
    docstring), an ``ObjectStoreError`` naming the object and the S3 endpoint when S3 refuses one (the
    days before it are then written). Returns how many outcomes were written.
    """
    _segment("endpoint", endpoint)
    _segment("env", env)
    by_day: dict[date, list[bytes]] = {}
    now = datetime.now(timezone.utc)
    for i, o in enumerate(outcomes):
        if not isinstance(o, Mapping):
            raise FeedbackError(f"outcome {i}: expected a mapping with request_id and label, got {type(o).__name__}")
        rid = o.get("request_id")
        if not isinstance(rid, str) or not rid.strip():
            raise FeedbackError(f"outcome {i}: field 'request_id' must be a non-empty string (got {rid!r})")
        label = o.get("label")
        if hasattr(label, "item") and not isinstance(label, (bool, str)):
            label = label.item()  # a numpy integer
        if not _is_int(label):
            raise FeedbackError(f"outcome {i} ({rid}): field 'label' must be an integer (got {label!r})")
        observed = o.get("observed_at")
        if observed is None:
            when = now
        elif isinstance(observed, datetime):
            when = _utc(observed)
        else:
            parsed = _parse_ts(observed)
            if parsed is None:
                raise FeedbackError(f"outcome {i} ({rid}): field 'observed_at' is not an ISO time (got {observed!r})")
            when = parsed
        extra = sorted(set(o) - {"request_id", "label", "observed_at"})
        if extra:
            raise FeedbackError(f"outcome {i} ({rid}): unknown field '{extra[0]}'")
        line = orjson.dumps({"request_id": rid, "label": label, "observed_at": when.isoformat()}) + b"\n"
        by_day.setdefault(when.date(), []).append(line)
    if object_store.is_s3(outcomes_dir):
        return _put_outcomes(str(outcomes_dir), endpoint, env, by_day, now)
    written = 0
    for day, lines in sorted(by_day.items()):
        path = outcomes_path(outcomes_dir, endpoint, env, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        _append(path, b"".join(lines))
        written += len(lines)
    return written


def _put_outcomes(root: str, endpoint: str, env: str, by_day: dict[date, list[bytes]], now: datetime) -> int:
    """One object per day of ``by_day`` under ``root`` (``<endpoint>/<env>/<day>/<utc-ts>-<random>.jsonl``)."""
    import secrets

    stamp = f"{now:%Y%m%dT%H%M%S%f}Z"
    written = 0
    for day, lines in sorted(by_day.items()):
        name = f"{stamp}-{secrets.token_hex(6)}.jsonl"
        object_store.put_bytes(object_store.join(root, endpoint, env, day.isoformat(), name), b"".join(lines),
                               content_type="application/x-ndjson")
        written += len(lines)
    return written


def _outcome_objects(location: str, since: date | None) -> list[str]:
    """The outcome objects of one endpoint environment's S3 location, in key order (day, then write time), from
    the day ``since`` on: the listing starts there, so the days before it are not listed."""
    bucket, base = object_store.split(location)
    out = []
    for o in object_store.list_objects(location, start_after=since.isoformat() if since else None):
        rel = o.uri.removeprefix(f"s3://{bucket}/").removeprefix(base + "/" if base else "")
        parts = rel.split("/")
        if len(parts) != 2 or not _DAY_RE.match(parts[0]) or not _OBJECT_RE.match(parts[1]):
            continue  # not an outcome object of this layout (a local day file's name does not fit either)
        try:
            day = date.fromisoformat(parts[0])
        except ValueError:
            continue
        if since is None or day >= since:
            out.append(o.uri)
    return sorted(out)


def _outcome_records(location: Path | str, since: date | None, result: "LabelledRows") -> Iterator[Any | None]:
    """The outcome lines of one endpoint environment from ``since`` on, in the order they were written: the day
    files of a folder, or the objects of an S3 location (read in parallel, yielded in key order)."""
    if isinstance(location, str):
        from resources.inference_log_s3 import READ_THREADS, _parallel

        uris = _outcome_objects(location, since)
        result.files["outcomes"] = len(uris)
        for i in range(0, len(uris), READ_THREADS):
            part = uris[i:i + READ_THREADS]
            for data in _parallel(object_store.get_bytes, part):
                if data is not None:  # None: deleted between the listing and the read
                    yield from _parse_lines(data)
        return
    files = _day_files(location, since)
    result.files["outcomes"] = len(files)
    for _, path in files:
        yield from _json_lines(path)


def _append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# the join


@dataclass
class LabelledRows:
    """Scored requests joined with their outcomes, and what the join saw on the way.

    ``frame`` has one row per labelled request, oldest first: the logged ``inputs`` and ``extras``
    as columns, then ``label``, ``request_id``, ``ts`` (UTC) and ``version`` (a logged input or
    extra of one of those four names is shadowed by them).
    """

    frame: pd.DataFrame
    logged: int = 0  # inference-log rows scored within the window
    outcomes: int = 0  # distinct request ids with an outcome (read from the window's files)
    joined: int = 0  # logged rows that have an outcome (before the max_rows cut)
    unmatched_outcomes: int = 0  # outcomes whose request id no logged row in the window has
    superseded_outcomes: int = 0  # outcome lines replaced by a later one for the same request id
    duplicate_requests: int = 0  # logged rows whose request id a newer logged row reused
    corrupt_log_lines: int = 0
    corrupt_outcome_lines: int = 0
    window_start: datetime | None = None
    window_end: datetime | None = None
    files: dict[str, int] = field(default_factory=dict)  # files read per store

    @property
    def corrupt_lines(self) -> int:
        return self.corrupt_log_lines + self.corrupt_outcome_lines

    def counts(self) -> dict[str, int]:
        return {"rows": len(self.frame), "logged": self.logged, "outcomes": self.outcomes, "joined": self.joined,
                "unmatched_outcomes": self.unmatched_outcomes, "superseded_outcomes": self.superseded_outcomes,
                "duplicate_requests": self.duplicate_requests, "corrupt_log_lines": self.corrupt_log_lines,
                "corrupt_outcome_lines": self.corrupt_outcome_lines}

    def summary(self) -> str:
        return (f"{len(self.frame)} labelled rows ({self.joined} joined of {self.logged} logged in the window, "
                f"{self.outcomes} outcomes, {self.unmatched_outcomes} unmatched, "
                f"{self.corrupt_lines} corrupt lines skipped)")


def _read_outcomes(directory: Path | str, since: date | None, result: LabelledRows) -> dict[str, tuple[datetime, int]]:
    """request id -> (observed_at, label), the latest observation winning (a correction; of two observed at the
    same time, the one written later)."""
    out: dict[str, tuple[datetime, int]] = {}
    for rec in _outcome_records(directory, since, result):
        rid = rec.get("request_id") if isinstance(rec, dict) else None
        label = rec.get("label") if isinstance(rec, dict) else None
        observed = _parse_ts(rec.get("observed_at")) if isinstance(rec, dict) else None
        if not isinstance(rid, str) or not rid or not _is_int(label) or observed is None:
            result.corrupt_outcome_lines += 1
            continue
        seen = out.get(rid)
        if seen is not None:
            result.superseded_outcomes += 1
            if seen[0] > observed:
                continue
        out[rid] = (observed, label)
    return out


def labelled_rows(*, inference_log_dir: str | Path, outcomes_dir: str | Path, endpoint: str, env: str,
                  max_age_days: float, max_rows: int, now: datetime | None = None) -> LabelledRows:
    """Inference-log rows scored within ``max_age_days`` before ``now``, joined with their outcomes by
    request id; the newest ``max_rows`` of them (see :class:`LabelledRows`).

    A request id logged more than once (a client reusing ``x-request-id``) joins on its newest row.
    An outcome recorded more than once for one request id counts as its latest ``observed_at``.
    """
    if max_age_days <= 0 or max_rows < 1:
        raise FeedbackError(f"max_age_days must be > 0 and max_rows >= 1 (got {max_age_days}, {max_rows})")
    end = _utc(now) if now is not None else datetime.now(timezone.utc)
    start = end - timedelta(days=max_age_days)
    result = LabelledRows(frame=pd.DataFrame(columns=list(META_COLUMNS)), window_start=start, window_end=end)
    s3_log = isinstance(inference_log_dir, str) and inference_log_dir.startswith("s3://")
    log_dir: Any = (f"{inference_log_dir.rstrip('/')}/{_segment('endpoint', endpoint)}/{_segment('env', env)}"
                    if s3_log else Path(inference_log_dir) / _segment("endpoint", endpoint) / _segment("env", env))
    out_dir: Path | str = (object_store.join(str(outcomes_dir), endpoint, env) if object_store.is_s3(outcomes_dir)
                           else Path(outcomes_dir) / endpoint / env)
    outcomes = _read_outcomes(out_dir, start.date(), result)
    result.outcomes = len(outcomes)

    # newest logged row per request id, among rows scored in [start, end]
    logged: dict[str, tuple[datetime, int, dict[str, Any]]] = {}
    order = 0
    for rec in _log_records(log_dir, start.date(), result):
        rid = rec.get("request_id") if isinstance(rec, dict) else None
        ts = _parse_ts(rec.get("ts")) if isinstance(rec, dict) else None
        if (not isinstance(rid, str) or not rid or ts is None or not isinstance(rec.get("inputs"), dict)
                or not isinstance(rec.get("extras", {}), dict)):
            result.corrupt_log_lines += 1
            continue
        if not start <= ts <= end:
            continue
        result.logged += 1
        order += 1
        seen = logged.get(rid)
        if seen is not None:
            result.duplicate_requests += 1
            if (seen[0], seen[1]) > (ts, order):
                continue
        # keep only what the join needs: the row if it has an outcome, else its key
        logged[rid] = (ts, order, rec if rid in outcomes else {})

    joined = [(ts, order, rid, rec) for rid, (ts, order, rec) in logged.items() if rid in outcomes]
    result.joined = len(joined)
    result.unmatched_outcomes = sum(1 for rid in outcomes if rid not in logged)
    joined.sort(key=lambda x: (x[0], x[1]))
    rows = []
    for ts, _, rid, rec in joined[-max_rows:]:
        row = {**(rec.get("extras") or {}), **rec["inputs"]}
        row.update({"label": outcomes[rid][1], "request_id": rid, "ts": ts, "version": str(rec.get("version"))})
        rows.append(row)
    if rows:
        frame = pd.DataFrame.from_records(rows)
        frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
        frame["label"] = frame["label"].astype("int64")
        result.frame = frame
    else:
        result.frame = pd.DataFrame({"label": pd.Series(dtype="int64"), "request_id": pd.Series(dtype=object),
                                     "ts": pd.Series(dtype="datetime64[ns, UTC]"), "version": pd.Series(dtype=object)})
    return result


# --------------------------------------------------------------------------------------------
# joined rows -> rows of a declared dataset


def _pandas_dtype(c: ColumnSpec) -> str:
    if c.dtype == "int":
        return "Int64" if c.nullable else "int64"
    if c.dtype == "float":
        return "float64"
    if c.dtype == "bool":
        return "boolean" if c.nullable else "bool"
    return "object"


def _missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, float) and math.isnan(v)


def _coerce(spec: DatasetSpec, c: ColumnSpec, values: list[Any], request_ids: list[str], source: str) -> pd.Series:
    def bad(i: int, what: str) -> FeedbackError:
        return FeedbackError(f"dataset '{spec.name}': column '{c.name}' ({c.dtype}, from {source}): request "
                             f"'{request_ids[i]}' has {values[i]!r}, {what}")

    out: list[Any] = []
    for i, v in enumerate(values):
        if _missing(v):
            out.append(None)
        elif c.dtype == "string":
            if isinstance(v, (dict, list)):
                raise bad(i, "not a string")
            out.append(v if isinstance(v, str) else str(v))
        elif c.dtype == "bool":
            if not isinstance(v, bool):
                raise bad(i, "not a boolean")
            out.append(v)
        elif c.dtype == "int":
            if isinstance(v, bool) or not (
                    _is_int(v) or (isinstance(v, float) and v.is_integer())
                    or (isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()))):
                raise bad(i, "not an integer")
            out.append(int(v))
        else:  # float
            if isinstance(v, bool):
                raise bad(i, "not a number")
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise bad(i, "not a number") from None
            if not math.isfinite(f):
                raise bad(i, "not a finite number")
            out.append(f)
    nulls = sum(v is None for v in out)
    if nulls and not c.nullable:
        first = next(i for i, v in enumerate(out) if v is None)
        raise FeedbackError(
            f"dataset '{spec.name}': required column '{c.name}' cannot be filled for {nulls} of {len(out)} "
            f"feedback rows (first: request '{request_ids[first]}'): it is not among the logged inputs or the "
            f"extras the caller passed; pass it with each request or declare it nullable: true")
    dtype = _pandas_dtype(c)
    if dtype == "object":
        return pd.Series(out, dtype=object)
    if dtype == "float64":
        return pd.Series([math.nan if v is None else v for v in out], dtype="float64")
    return pd.Series(out, dtype=dtype)


def dataset_rows_from_feedback(spec: DatasetSpec, labelled: pd.DataFrame) -> pd.DataFrame:
    """Rows of dataset ``spec`` (exactly its declared columns, in order, with the dtypes its generator
    uses) from ``labelled_rows(...).frame``:

    * features and protected attributes from the logged inputs, else from the extras the caller
      passed with the request (both are columns of ``labelled``);
    * the label column from the outcome (``label``);
    * a timestamp-role column from the time the request was scored (``ts``): its UTC date
      (``YYYY-MM-DD``) for a string column, epoch seconds for a number;
    * an id-role column from the extras, falling back to the request id;
    * PII columns are null: the inference log never holds personal data (endpoints drop declared PII
      before logging), so rows learned from production have none. A PII column must therefore be
      declared ``nullable: true``.

    A required (not nullable) column that cannot be filled, or a value of the wrong type, raises
    ``FeedbackError`` naming the dataset, the column and a request. When an id-role column passed by
    the caller repeats (the same application scored twice), only its newest request is kept: a
    dataset's id is unique.
    """
    missing_meta = [m for m in META_COLUMNS if m not in labelled.columns]
    if missing_meta:
        raise FeedbackError(f"dataset '{spec.name}': the labelled rows have no '{missing_meta[0]}' column "
                            f"(expected the frame of resources.feedback.labelled_rows)")
    label = spec.label
    if label is None:
        raise FeedbackError(f"dataset '{spec.name}': has no label column, so outcomes cannot become its rows")
    for c in spec.columns:
        if c.pii and not c.nullable:
            raise FeedbackError(
                f"dataset '{spec.name}': column '{c.name}' is PII and required (nullable: false); rows learned "
                f"from production carry no personal data (the inference log never holds PII): declare it "
                f"nullable: true")
    frame = labelled.sort_values("ts", kind="stable").reset_index(drop=True)
    n = len(frame)
    rids = frame["request_id"].astype(str).tolist()
    ts = pd.to_datetime(frame["ts"], utc=True) if n else pd.Series([], dtype="datetime64[ns, UTC]")
    cols: dict[str, pd.Series] = {}
    for c in spec.columns:
        if c.pii:
            values, source = [None] * n, "PII, never logged"
        elif c.name == label:
            values, source = frame["label"].tolist(), "the outcome"
        elif c.role == "timestamp":
            if c.dtype == "string":
                values = [t.date().isoformat() for t in ts]
            elif c.dtype in ("int", "float"):
                values = [t.timestamp() if c.dtype == "float" else int(t.timestamp()) for t in ts]
            else:
                raise FeedbackError(f"dataset '{spec.name}': timestamp column '{c.name}' is {c.dtype}; "
                                    f"feedback fills a timestamp as a date string or epoch seconds")
            source = "the request's scoring time"
        elif c.role == "id":
            passed = frame[c.name].tolist() if c.name in frame.columns and c.name not in META_COLUMNS else [None] * n
            values = [rid if _missing(v) else v for v, rid in zip(passed, rids)]
            source = "the extras, else the request id"
        else:
            if c.name in META_COLUMNS:  # shadowed by the join's own columns: never logged as itself
                values = [None] * n
            else:
                values = frame[c.name].tolist() if c.name in frame.columns else [None] * n
            source = "the logged inputs or extras"
        cols[c.name] = _coerce(spec, c, values, rids, source)
    out = pd.DataFrame(cols, columns=[c.name for c in spec.columns])
    ids = [c.name for c in spec.columns if c.role == "id"]
    if ids and n:
        before = len(out)
        out = out.drop_duplicates(subset=ids, keep="last").reset_index(drop=True)
        out.attrs["duplicate_ids_dropped"] = before - len(out)
    return out
