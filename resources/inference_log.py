"""Reading endpoints' inference logs: a version's newest window, and what was appended since a cursor.

A location that is an ``s3://`` URI is an S3 log of Parquet segments (``ONEPATH_INFERENCE_LOG_URL``; written
by ``resources.serving.segment_log``): ``read_window`` and ``scan_new`` hand it to
``resources.inference_log_s3``, which gives the same frames for the same rows. Everything below is the
embedded default, local JSON lines.

An endpoint environment appends JSON lines to ``<inference_log_dir>/<endpoint>/<env>/<YYYY-MM-DD>.jsonl``
(UTC day of the write), one per scored row (see ``InferenceLog`` in ``resources/serving/model_server.py``)::

    {"ts": iso8601 with offset, "request_id": str, "model": str, "version": str,
     "inputs": {feature: value}, "extras": {...}, "output": {...}, "latency_ms": float}

Several worker processes append to the same file (``O_APPEND``, whole lines per ``write``), so a reader
may see the last line half written; it is never read as a row. A line that is not a JSON object, or
lacks ``ts``/``request_id``/``version`` (strings; ``ts`` with a UTC offset) or an ``inputs`` object, or
holds a value of another JSON type than the rest of its column, is *corrupt*: counted and skipped,
never raised.

``read_window`` returns the newest rows (``window_rows``) or the rows of the last hours
(``window_hours``) logged by ONE model version, reading files newest first and each file backwards in
blocks, and stops once the window is full: a small window of a big log costs one small block.

``scan_new`` is for sensors: it reads only the bytes appended since its cursor (per-file byte offsets,
never past the last complete line) and counts the new rows per version. With nothing new it costs one
``stat`` of the directory and one per live file (today's and yesterday's).

Parsing is columnar: each block goes through ``pyarrow.json`` with an explicit schema holding only the
fields asked for (``extras``/``output`` are skipped unparsed), in C++ threads, with no Python object per
row. A block that arrow refuses (a corrupt line, a type change, a blank line) is parsed again line by line
with orjson, which is the reference for what is corrupt; both give the same rows. On this 2-core machine
1,000,000 rows x 20 features (~450 MB) load in a few seconds (``bench/drift_bench.py`` measures it).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

DAY_FILE_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl$")

# Rows are stamped just before their line is appended, so lines of concurrent writers are out of ts order
# by at most the write latency (milliseconds). A time window stops reading once it has seen a row this
# much older than its start.
ORDER_SLACK = timedelta(seconds=60)

_MIN_BLOCK = 256 * 1024
_MAX_BLOCK = 32 * 1024 * 1024
_ARROW_CHUNK = 1024 * 1024  # arrow's own parallel chunk inside a block
_SAMPLE_LINES = 200  # newest lines of the version looked at for column presence and types
_RACY_NS = 2_000_000_000  # a directory mtime this close to our listing is not trusted (same clock tick)
_CURSOR_VERSION = 1
RESERVED = ("ts", "request_id")

Kind = Literal["number", "string", "bool"]
_ARROW_TYPE: dict[str | None, pa.DataType] = {
    "number": pa.float64(), "string": pa.string(), "bool": pa.bool_(), None: pa.null(),
}


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class LogWindow:
    """One version's rows in a window of an inference log, oldest first.

    ``frame`` has the requested input columns (numbers float64 with NaN for null, strings object,
    booleans bool or object when null occurs) plus ``request_id`` and ``ts`` (datetime64[ns, UTC]).
    Counts cover the lines from the newest end of the log back to the window's start:
    ``other_version_rows`` were valid rows of other versions (excluded), ``corrupt_lines`` were skipped,
    ``partial_lines`` is how many files ended in a line still being written (ignored).
    ``complete`` says the log reaches back over the whole window (rows: ``window_rows`` rows were
    found; hours: rows older than the window's start exist).
    """

    frame: pd.DataFrame
    version: str
    columns: list[str]
    window_rows: int | None
    window_hours: float | None
    rows: int
    other_version_rows: int
    corrupt_lines: int
    partial_lines: int
    files_read: list[str]
    bytes_read: int
    oldest_ts: datetime | None
    newest_ts: datetime | None
    complete: bool

    @property
    def summary(self) -> str:
        span = (f"{self.oldest_ts:%Y-%m-%d %H:%M:%S} .. {self.newest_ts:%Y-%m-%d %H:%M:%S} UTC"
                if self.oldest_ts and self.newest_ts else "no rows")
        return (f"{self.rows} rows of version {self.version} ({span}); {self.other_version_rows} rows of other "
                f"versions excluded, {self.corrupt_lines} corrupt lines skipped; {len(self.files_read)} file(s), "
                f"{self.bytes_read} bytes read")


@dataclass(frozen=True)
class ScanResult:
    """What was appended to an inference log since a cursor.

    ``new_rows`` counts valid new rows of every version, ``new_rows_by_version`` splits them;
    ``cursor`` is JSON-serialisable and goes into the next call. ``caught_up`` is False when
    ``max_bytes`` stopped the scan early (the next call continues). ``reset_files`` were truncated or
    replaced since the cursor and were read again from their start.
    """

    new_rows: int
    new_rows_by_version: dict[str, int]
    corrupt_lines: int
    files_read: list[str]
    bytes_read: int
    cursor: dict[str, Any]
    caught_up: bool = True
    reset_files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# parsing one block of complete lines


@dataclass
class _Block:
    table: pa.Table  # valid rows: _line, ts (timestamp[us, UTC]), request_id, version, <columns>
    corrupt_lines: np.ndarray  # line indices (within the block) of corrupt lines
    lines: int  # non-blank lines


def _kind_of(value: Any) -> Kind | Literal["other"]:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def _parse_ts_us(value: str) -> int | None:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        return None
    delta = t - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _schema(columns: list[str], kinds: dict[str, Kind | None]) -> pa.Schema:
    return pa.schema([
        ("ts", pa.string()), ("request_id", pa.string()), ("version", pa.string()),
        ("inputs", pa.struct([(c, _ARROW_TYPE[kinds[c]]) for c in columns])),
    ])


def _out_schema(columns: list[str], kinds: dict[str, Kind | None]) -> pa.Schema:
    return pa.schema([("_line", pa.int64()), ("ts", pa.timestamp("us", tz="UTC")), ("request_id", pa.string()),
                      ("version", pa.string())] + [(c, _ARROW_TYPE[kinds[c]]) for c in columns])


def _parse_arrow(data: memoryview, newlines: int, columns: list[str], kinds: dict[str, Kind | None]) -> _Block | None:
    """The block through pyarrow's JSON reader, or None when arrow refuses it (then: line by line)."""
    try:
        tb = pj.read_json(
            pa.BufferReader(pa.py_buffer(data)),
            read_options=pj.ReadOptions(use_threads=True, block_size=_ARROW_CHUNK),
            parse_options=pj.ParseOptions(explicit_schema=_schema(columns, kinds), unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    n = tb.num_rows
    # arrow accepts several objects on one line and skips blank lines: only a one-row-per-line block counts
    if n != newlines:
        return None
    try:
        ts = tb["ts"].cast(pa.timestamp("us", tz="UTC"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    inputs = tb["inputs"]
    valid = pc.and_(pc.and_(pc.is_valid(ts), pc.is_valid(tb["request_id"])),
                    pc.and_(pc.is_valid(tb["version"]), pc.is_valid(inputs)))
    valid_np = valid.to_numpy(zero_copy_only=False)
    line = np.arange(n, dtype=np.int64)
    cols: dict[str, Any] = {"_line": pa.array(line), "ts": ts, "request_id": tb["request_id"], "version": tb["version"]}
    for c in columns:
        cols[c] = pc.struct_field(inputs, c)
    out = pa.table(cols)
    if not valid_np.all():
        out = out.filter(valid)
    return _Block(out, line[~valid_np], n)


def _parse_lines(data: memoryview, columns: list[str], kinds: dict[str, Kind | None], version: str | None) -> _Block:
    """Line by line with orjson: the reference for what is a row and what is corrupt.

    Input values are kept for rows of ``version`` (all versions when None); a value whose JSON type
    differs from its column's makes the line corrupt; the first value seen fixes an unknown column type.
    """
    lines: list[int] = []
    ts_l: list[int] = []
    rid_l: list[str] = []
    ver_l: list[str] = []
    vals: dict[str, list[Any]] = {c: [] for c in columns}
    corrupt: list[int] = []
    i = -1
    for raw in bytes(data).split(b"\n")[:-1]:
        if not raw.strip():
            continue
        i += 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            corrupt.append(i)
            continue
        if not isinstance(obj, dict):
            corrupt.append(i)
            continue
        ts, rid, ver, inp = obj.get("ts"), obj.get("request_id"), obj.get("version"), obj.get("inputs")
        if not (isinstance(ts, str) and isinstance(rid, str) and isinstance(ver, str) and isinstance(inp, dict)):
            corrupt.append(i)
            continue
        us = _parse_ts_us(ts)
        if us is None:
            corrupt.append(i)
            continue
        if version is None or ver == version:
            row = [inp.get(c) for c in columns]
            found = [(c, _kind_of(v)) for c, v in zip(columns, row) if v is not None]
            if any(k == "other" or (kinds[c] is not None and kinds[c] != k) for c, k in found):
                corrupt.append(i)  # a value of another JSON type than its column's
                continue
            for c, k in found:
                kinds[c] = k  # type: ignore[assignment]
        else:
            row = [None] * len(columns)  # other versions' inputs are not kept (nor judged)
        lines.append(i)
        ts_l.append(us)
        rid_l.append(rid)
        ver_l.append(ver)
        for c, v in zip(columns, row):
            vals[c].append(v)
    schema = _out_schema(columns, kinds)
    cols: dict[str, Any] = {
        "_line": pa.array(lines, pa.int64()),
        "ts": pa.array(ts_l, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "request_id": pa.array(rid_l, pa.string()),
        "version": pa.array(ver_l, pa.string()),
    }
    for c in columns:
        vs = vals[c]
        if kinds[c] == "number":
            vs = [float(v) if v is not None else None for v in vs]
        cols[c] = pa.array(vs, _ARROW_TYPE[kinds[c]])
    return _Block(pa.table(cols, schema=schema), np.asarray(corrupt, dtype=np.int64), i + 1)


def _parse_block(data: memoryview, newlines: int, columns: list[str], kinds: dict[str, Kind | None],
                 version: str | None) -> _Block:
    """``data``: whole lines, ``newlines`` of them (counted by the caller, which has the bytes object)."""
    return _parse_arrow(data, newlines, columns, kinds) or _parse_lines(data, columns, kinds, version)


def _tail_lines(data: memoryview, n: int = 2000) -> list[bytes]:
    """Up to the last ``n`` complete lines of a block, newest first."""
    cut = max(0, len(data) - 4 * 1024 * 1024)
    lines = bytes(data[cut:]).split(b"\n")[:-1]
    if cut:
        lines = lines[1:]  # the first piece is the end of a line cut in two
    return lines[::-1][:n]


def _discover(data: memoryview, columns: list[str], kinds: dict[str, Kind | None], version: str, where: Path) -> None:
    """Column types (and that every requested column is logged) from the newest lines of ``version``.

    A column's type is the JSON type most of its non-null sampled values have, so one odd line cannot
    make every other line of the column look corrupt.
    """
    seen: set[str] = set()
    votes: dict[str, dict[str, int]] = {c: {} for c in columns}
    sampled = 0
    for raw in _tail_lines(data):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or obj.get("version") != version or not isinstance(obj.get("inputs"), dict):
            continue
        inp = obj["inputs"]
        sampled += 1
        for c in columns:
            if c in inp:
                seen.add(c)
                if inp[c] is not None:
                    k = _kind_of(inp[c])
                    votes[c][k] = votes[c].get(k, 0) + 1
        if sampled >= _SAMPLE_LINES:
            break
    for c in columns:
        known = {k: n for k, n in votes[c].items() if k != "other"}
        if kinds[c] is None and known:
            kinds[c] = max(known, key=lambda k: known[k])  # type: ignore[assignment]
    missing = [c for c in columns if c not in seen]
    if sampled and missing:
        logged = sorted(_last_inputs(data, version))
        raise ValueError(
            f"inference log {where}: version {version!r} does not log input(s) {', '.join(missing)} "
            f"(its rows log: {', '.join(logged) or 'nothing'})"
        )


def _last_inputs(data: memoryview, version: str) -> list[str]:
    for raw in _tail_lines(data):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("version") == version and isinstance(obj.get("inputs"), dict):
            return list(obj["inputs"])
    return []


# --------------------------------------------------------------------------------------------
# files


def _day_files(log_dir: Path) -> list[tuple[date, str]]:
    out = []
    with os.scandir(log_dir) as it:
        for e in it:
            m = DAY_FILE_RE.match(e.name)
            if not m:
                continue
            try:
                out.append((date.fromisoformat(m.group(1)), e.name))
            except ValueError:
                continue
    return sorted(out)


def _complete_end(fh: Any, size: int) -> int:
    """Offset just past the last newline of the first ``size`` bytes (0: no complete line)."""
    pos, step = size, 64 * 1024
    while pos > 0:
        start = max(0, pos - step)
        fh.seek(start)
        chunk = fh.read(pos - start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos, step = start, step * 2
    return 0


def _backward_blocks(fh: Any, end: int, next_size: Any) -> Any:
    """Yield ``(whole lines, their count, bytes read)`` for the bytes ``[0, end)`` of a file, newest first.

    ``end`` is a line boundary; ``next_size()`` says how many bytes to read next. A block is a
    zero-copy view; the few bytes of the line cut by a block's start are read again with the next.
    """
    line_end = end  # everything from here on was yielded
    pos = end  # next read ends here (a line boundary when nothing is pending)
    pending = 0
    while line_end > 0:
        start = max(0, pos - next_size())
        fh.seek(start)
        buf = fh.read(line_end - start)
        pending += pos - start
        pos = start
        lo = 0
        if start > 0:
            nl = buf.find(b"\n")
            if nl < 0:  # one line longer than the block: read further back
                continue
            lo = nl + 1
            if lo == len(buf):
                continue
        yield memoryview(buf)[lo:], buf.count(b"\n") - (1 if lo else 0), pending
        pending = 0
        line_end = start + lo
        pos = line_end if start > 0 else 0


def _tail_is_partial(fh: Any, end: int, size: int) -> bool:
    if size <= end:
        return False
    fh.seek(end)
    return bool(fh.read(min(size - end, 1 << 20)).strip())


# --------------------------------------------------------------------------------------------
# read_window


def _check_args(log_dir: Path, version: Any, columns: Any, window_rows: Any, window_hours: Any) -> None:
    where = f"read_window({log_dir})"
    if not isinstance(version, str) or not version:
        raise ValueError(f"{where}: version must be a non-empty string, got {version!r}")
    if not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) and c for c in columns):
        raise ValueError(f"{where}: columns must be a list of column names, got {columns!r}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"{where}: columns contains duplicates")
    clash = [c for c in columns if c in RESERVED]
    if clash:
        raise ValueError(f"{where}: column name(s) {', '.join(clash)} clash with the frame's own ts/request_id")
    if (window_rows is None) == (window_hours is None):
        raise ValueError(f"{where}: set exactly one of window_rows and window_hours")
    if window_rows is not None and (isinstance(window_rows, bool) or not isinstance(window_rows, int)
                                    or window_rows < 1):
        raise ValueError(f"{where}: window_rows must be a positive integer, got {window_rows!r}")
    if window_hours is not None and (isinstance(window_hours, bool) or not isinstance(window_hours, (int, float))
                                     or not math.isfinite(window_hours) or window_hours <= 0):
        raise ValueError(f"{where}: window_hours must be a positive number, got {window_hours!r}")


def _is_s3(location: Any) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def _us(t: datetime) -> int:
    delta = t - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _frame(tb: pa.Table, columns: list[str]) -> pd.DataFrame:
    n = tb.num_rows
    data: dict[str, Any] = {}
    for c in columns:
        col = tb[c]
        if pa.types.is_null(col.type):
            data[c] = np.full(n, np.nan)
        elif pa.types.is_floating(col.type):
            data[c] = col.to_numpy()
        elif pa.types.is_boolean(col.type) and col.null_count == 0:
            data[c] = col.to_numpy()
        else:  # strings (and booleans with nulls): one Python object per distinct value, not per row
            enc = pc.dictionary_encode(col).combine_chunks()
            values = np.empty(len(enc.dictionary) + 1, dtype=object)
            values[:-1] = enc.dictionary.to_pylist()
            data[c] = values[enc.indices.fill_null(len(enc.dictionary)).to_numpy()]
    data["request_id"] = tb["request_id"].to_numpy(zero_copy_only=False).astype(object, copy=False)
    data["ts"] = pd.to_datetime(tb["ts"].cast(pa.int64()).to_numpy(), unit="us", utc=True)
    return pd.DataFrame(data, columns=[*columns, "request_id", "ts"], copy=False)


def read_window(
    log_dir: Path | str,
    *,
    version: str,
    columns: list[str],
    window_rows: int | None = None,
    window_hours: float | None = None,
    now: datetime | None = None,
) -> LogWindow:
    """The newest ``window_rows`` rows, or the rows stamped within ``window_hours`` before ``now``, that
    ``version`` logged in ``log_dir`` (an endpoint environment's folder). Set exactly one window.

    Rows of other versions are excluded and counted; corrupt lines are counted and skipped; a line still
    being written is ignored. Files are read newest first, each backwards in blocks sized to what the
    window still needs, and reading stops once the window is full. A folder that does not exist yet
    (nothing was ever logged) is an empty window. A requested column that the version's newest rows do
    not log at all is a ``ValueError`` naming it.
    """
    s3 = _is_s3(log_dir)  # the one place a reader chooses its store: Parquet segments on S3, else JSON lines
    log_dir = log_dir if s3 else Path(log_dir)  # type: ignore[assignment]
    _check_args(log_dir, version, columns, window_rows, window_hours)
    columns = list(columns)
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        raise ValueError(f"read_window({log_dir}): now must be timezone-aware, got {now!r}")
    if s3:
        from resources import inference_log_s3

        return inference_log_s3.read_window(str(log_dir), version=version, columns=columns, window_rows=window_rows,
                                            window_hours=window_hours, now=now)
    now_us = _us(now)
    cutoff_us = now_us - int(window_hours * 3_600_000_000) if window_hours is not None else None
    slack_us = int(ORDER_SLACK.total_seconds() * 1_000_000)

    kinds: dict[str, Kind | None] = {c: None for c in columns}
    files = _day_files(log_dir) if log_dir.is_dir() else []
    taken: list[pa.Table] = []  # newest block first
    other = corrupt = partial = bytes_read = blocks = 0
    files_read: list[str] = []
    need = window_rows or 0
    matched = 0
    consumed = 0
    discovered = False
    complete = stop = False

    def next_size() -> int:
        if window_rows is not None and matched:
            per_row = consumed / matched
            return int(min(_MAX_BLOCK, max(_MIN_BLOCK, need * per_row * 1.1 + 4096)))
        return min(_MAX_BLOCK, _MIN_BLOCK << min(blocks, 10))

    for day, name in reversed(files):
        if cutoff_us is not None:
            day_end_us = _us(datetime(day.year, day.month, day.day, tzinfo=timezone.utc) + timedelta(days=1))
            if day_end_us + slack_us < cutoff_us:  # this file and every older one end before the window
                complete = True
                break
        path = log_dir / name
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            end = _complete_end(fh, size)
            partial += _tail_is_partial(fh, end, size)
            files_read.append(name)
            for data, newlines, nread in _backward_blocks(fh, end, next_size):
                bytes_read += nread
                consumed += nread
                blocks += 1
                if not discovered and columns:
                    _discover(data, columns, kinds, version, path)
                    discovered = all(kinds[c] is not None for c in columns)
                blk = _parse_block(data, newlines, columns, kinds, version)
                t = blk.table
                lines = t["_line"].to_numpy()
                match = pc.equal(t["version"], pa.scalar(version)).to_numpy(zero_copy_only=False)
                if window_rows is not None:
                    idx = np.flatnonzero(match)
                    if len(idx) >= need:
                        idx = idx[len(idx) - need:]
                        start_line = int(lines[idx[0]]) if len(idx) else blk.lines
                        complete = stop = True
                    else:
                        start_line = 0
                    other += int(np.count_nonzero(~match & (lines >= start_line)))
                else:
                    assert cutoff_us is not None
                    ts = t["ts"].cast(pa.int64()).to_numpy()
                    in_range = (ts >= cutoff_us) & (ts <= now_us)
                    idx = np.flatnonzero(match & in_range)
                    start_line = 0
                    if len(ts) and bool((ts < cutoff_us).any()):
                        complete = True
                        start_line = int(lines[in_range].min()) if in_range.any() else blk.lines
                    other += int(np.count_nonzero(~match & in_range))
                    if len(ts) and (int(ts.max()) < cutoff_us or int(ts.min()) < cutoff_us - slack_us):
                        stop = True
                corrupt += int(np.count_nonzero(blk.corrupt_lines >= start_line))
                if len(idx):
                    taken.append(t if len(idx) == t.num_rows else t.take(pa.array(idx)))
                    matched += len(idx)
                    need -= len(idx)
                if stop:
                    break
        if stop:
            break

    schema = _out_schema(columns, kinds)
    if taken:
        tb = pa.concat_tables(list(reversed(taken)), promote_options="permissive")
    else:
        tb = schema.empty_table()
    frame = _frame(tb, columns)
    ts_col = frame["ts"]
    return LogWindow(
        frame=frame, version=version, columns=columns, window_rows=window_rows, window_hours=window_hours,
        rows=len(frame), other_version_rows=other, corrupt_lines=corrupt, partial_lines=partial,
        files_read=files_read, bytes_read=bytes_read,
        oldest_ts=ts_col.min().to_pydatetime() if len(frame) else None,
        newest_ts=ts_col.max().to_pydatetime() if len(frame) else None,
        complete=complete,
    )


# --------------------------------------------------------------------------------------------
# scan_new


def _load_cursor(log_dir: Path, cursor: Any) -> dict[str, Any]:
    fresh = {"v": _CURSOR_VERSION, "files": {}, "done_through": None, "dir_mtime_ns": None, "listed_ns": None}
    if cursor is None:
        return fresh

    def bad(why: str) -> ValueError:
        return ValueError(f"scan_new({log_dir}): the cursor is not one scan_new returned: {why}")

    if not isinstance(cursor, dict):
        raise bad(f"expected a dict, got {type(cursor).__name__}")
    if cursor.get("v") != _CURSOR_VERSION:
        raise bad(f"cursor format {cursor.get('v')!r}, this reader writes {_CURSOR_VERSION}")
    files = cursor.get("files")
    if not isinstance(files, dict):
        raise bad("'files' must map file names to [offset, inode]")
    out_files: dict[str, list[int | None]] = {}
    for name, entry in files.items():
        if (not isinstance(name, str) or not DAY_FILE_RE.match(name) or not isinstance(entry, (list, tuple))
                or len(entry) != 2 or not isinstance(entry[0], int) or entry[0] < 0
                or not (entry[1] is None or isinstance(entry[1], int))):
            raise bad(f"files[{name!r}] = {entry!r}")
        out_files[name] = [entry[0], entry[1]]
    done = cursor.get("done_through")
    if done is not None and not (isinstance(done, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", done)):
        raise bad(f"done_through = {done!r}")
    for key in ("dir_mtime_ns", "listed_ns"):
        if cursor.get(key) is not None and not isinstance(cursor.get(key), int):
            raise bad(f"{key} = {cursor.get(key)!r}")
    return {"v": _CURSOR_VERSION, "files": out_files, "done_through": done,
            "dir_mtime_ns": cursor.get("dir_mtime_ns"), "listed_ns": cursor.get("listed_ns")}


def scan_new(log_dir: Path | str, cursor: dict | None, *, max_bytes: int | None = 256 * 1024 * 1024) -> ScanResult:
    """Rows appended to ``log_dir`` since ``cursor`` (None: everything there is), and the next cursor.

    The cursor holds a byte offset per live file, always at the end of a complete line: a line still
    being written is read on a later call, once complete. Files that appeared are read from their start;
    a file truncated or replaced (other inode) is read again from its start (``reset_files``). Day files
    two days older than the newest are read to their end once and then retired from the cursor (a line
    left unfinished in one is counted corrupt).

    With nothing new it costs a ``stat`` of the folder and one per live file: the folder is listed only
    when its mtime moved (a file appeared or went) or is too recent to be trusted. ``max_bytes`` bounds
    one call's reading (a first call on a long history); ``caught_up`` says whether it stopped early.
    """
    s3 = _is_s3(log_dir)
    log_dir = log_dir if s3 else Path(log_dir)  # type: ignore[assignment]
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"scan_new({log_dir}): max_bytes must be a positive integer or None, got {max_bytes!r}")
    if s3:
        from resources import inference_log_s3

        return inference_log_s3.scan_new(str(log_dir), cursor, max_bytes=max_bytes)
    cur = _load_cursor(log_dir, cursor)
    result: dict[str, Any] = {"by_version": {}, "corrupt": 0, "files_read": [], "bytes": 0, "reset": []}

    def done(caught_up: bool = True) -> ScanResult:
        by = result["by_version"]
        return ScanResult(new_rows=sum(by.values()), new_rows_by_version=dict(sorted(by.items())),
                          corrupt_lines=result["corrupt"], files_read=result["files_read"],
                          bytes_read=result["bytes"], cursor=cur, caught_up=caught_up, reset_files=result["reset"])

    try:
        st_dir = os.stat(log_dir)
    except FileNotFoundError:
        return done()
    if (cur["dir_mtime_ns"] == st_dir.st_mtime_ns and cur["listed_ns"] is not None
            and st_dir.st_mtime_ns < cur["listed_ns"] - _RACY_NS):
        names = sorted(cur["files"])
    else:
        listed_ns = time.time_ns()
        names = [n for _, n in _day_files(log_dir)
                 if cur["done_through"] is None or n[:10] > cur["done_through"] or n in cur["files"]]
        for gone in set(cur["files"]) - set(names):
            del cur["files"][gone]
        cur["dir_mtime_ns"], cur["listed_ns"] = st_dir.st_mtime_ns, listed_ns
    if not names:
        return done()
    live_from = (date.fromisoformat(names[-1][:10]) - timedelta(days=1)).isoformat()
    budget = max_bytes
    retiring = True  # retire only a contiguous run of the oldest files, so done_through stays exact

    for name in names:
        path = log_dir / name
        off, ino = cur["files"].get(name, [0, None])
        try:
            st = os.stat(path)
        except FileNotFoundError:
            cur["files"].pop(name, None)
            continue
        if (ino is not None and st.st_ino != ino) or st.st_size < off:
            result["reset"].append(name)
            off = 0
        size = st.st_size
        more = False  # stopped by the budget with complete lines left
        if size > off:
            with open(path, "rb") as fh:
                while off < size:
                    if budget is not None and budget <= 0:
                        more = True
                        break
                    want = min(size - off, _MAX_BLOCK, budget if budget is not None else _MAX_BLOCK)
                    while True:
                        fh.seek(off)
                        chunk = fh.read(want)
                        cut = chunk.rfind(b"\n")
                        if cut >= 0 or off + want >= size:
                            break
                        want = min(size - off, want * 2)  # one line longer than what was read
                    result["bytes"] += len(chunk)
                    if budget is not None:
                        budget -= len(chunk)
                    if cut < 0:  # only a line still being written
                        break
                    blk = _parse_block(memoryview(chunk)[:cut + 1], chunk.count(b"\n", 0, cut + 1), [], {}, None)
                    off += cut + 1
                    result["corrupt"] += len(blk.corrupt_lines)
                    if blk.table.num_rows:
                        vc = pc.value_counts(blk.table["version"])
                        for v, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
                            result["by_version"][v] = result["by_version"].get(v, 0) + n
            if name not in result["files_read"]:
                result["files_read"].append(name)
        cur["files"][name] = [off, st.st_ino]
        if retiring and name[:10] < live_from and not more:
            if size > off:  # an unfinished line no writer will complete any more
                with open(path, "rb") as fh:
                    fh.seek(off)
                    if fh.read(min(size - off, 1 << 20)).strip():
                        result["corrupt"] += 1
            del cur["files"][name]
            cur["done_through"] = max(cur["done_through"] or "", name[:10])
        else:
            retiring = False
        if more:
            cur["listed_ns"] = None  # files after this one may not be in the cursor yet: list next time
            return done(caught_up=False)
    return done()


__all__ = ["DAY_FILE_RE", "ORDER_SLACK", "LogWindow", "ScanResult", "read_window", "scan_new"]
