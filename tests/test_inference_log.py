"""The inference-log reader: a version's window (rows or hours) and the sensor's incremental scan."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

import resources.inference_log as il
from resources.inference_log import read_window, scan_new
from resources.serving.model_server import InferenceLog

COLS = ["income", "age", "purpose", "verified"]
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def line(i: int, *, version: str = "2", ts: datetime | None = None, **inputs) -> bytes:
    """One log line the way ModelApp writes it (orjson, isoformat ts with +00:00)."""
    values = {"income": 1000.0 + i, "age": 20 + i % 50, "purpose": ["car", "home", "edu"][i % 3],
              "verified": i % 2 == 0, **inputs}
    return orjson.dumps({
        "ts": (ts or T0 + timedelta(seconds=i)).isoformat(), "request_id": f"r{i}", "model": "credit",
        "version": version, "inputs": values, "extras": {"applicant_ref": f"A{i}", "nested": {"k": [i]}},
        "output": {"score": 0.5, "label": i % 2}, "latency_ms": 1.25,
    }) + b"\n"


def write(path: Path, *chunks: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        for c in chunks:
            fh.write(c)
    return path


def day_file(d: Path, day: datetime) -> Path:
    return d / f"{day:%Y-%m-%d}.jsonl"


# ---------------------------------------------------------------------------------------------
# read_window


def test_version_filtering_and_types(tmp_path):
    lines = [line(i, version="2" if i % 3 else "1") for i in range(300)]
    write(day_file(tmp_path, T0), *lines)
    w = read_window(tmp_path, version="2", columns=COLS, window_rows=10_000)
    expect = [f"r{i}" for i in range(300) if i % 3]
    assert w.frame["request_id"].tolist() == expect
    assert (w.rows, w.other_version_rows, w.corrupt_lines, w.partial_lines) == (200, 100, 0, 0)
    assert w.complete is False  # fewer rows than asked for
    assert list(w.frame.columns) == COLS + ["request_id", "ts"]
    f = w.frame
    assert f["income"].dtype == np.float64 and f["age"].dtype == np.float64
    assert f["purpose"].dtype == object and f["verified"].dtype == bool
    assert str(f["ts"].dtype) == "datetime64[ns, UTC]"
    assert f["income"].tolist() == [1000.0 + i for i in range(300) if i % 3]
    assert f["purpose"].tolist() == [["car", "home", "edu"][i % 3] for i in range(300) if i % 3]
    assert f["ts"].iloc[0] == pd.Timestamp(T0 + timedelta(seconds=1))
    assert (w.oldest_ts, w.newest_ts) == (T0 + timedelta(seconds=1), T0 + timedelta(seconds=299))
    assert w.files_read == [f"{T0:%Y-%m-%d}.jsonl"]
    # a version that never logged: an empty, typed frame, everything else counted as other versions
    none = read_window(tmp_path, version="9", columns=COLS, window_rows=5)
    assert none.rows == 0 and none.other_version_rows == 300 and list(none.frame.columns) == COLS + ["request_id", "ts"]


def test_row_window_is_the_newest_rows_oldest_first_across_a_day_rollover(tmp_path):
    day1, day2 = T0, T0 + timedelta(days=1)
    write(day_file(tmp_path, day1), *[line(i, ts=day1 + timedelta(hours=23, seconds=i)) for i in range(100)])
    write(day_file(tmp_path, day2), *[line(100 + i, ts=day2 + timedelta(seconds=i)) for i in range(30)])
    w = read_window(tmp_path, version="2", columns=COLS, window_rows=50)
    assert w.frame["request_id"].tolist() == [f"r{i}" for i in range(80, 130)]
    assert w.rows == 50 and w.complete is True
    assert w.files_read == [f"{day2:%Y-%m-%d}.jsonl", f"{day1:%Y-%m-%d}.jsonl"]
    assert w.frame["ts"].is_monotonic_increasing
    # only the newest file is opened when it holds the window
    w2 = read_window(tmp_path, version="2", columns=COLS, window_rows=30)
    assert w2.files_read == [f"{day2:%Y-%m-%d}.jsonl"]
    assert w2.frame["request_id"].tolist() == [f"r{i}" for i in range(100, 130)]


def test_time_window(tmp_path):
    day1, day2 = T0, T0 + timedelta(days=1)
    # one row a minute from day1 22:00 to day2 02:00, version 2 except every 4th
    rows = []
    for k in range(240):
        ts = day1 + timedelta(hours=22, minutes=k)
        rows.append((ts, line(k, ts=ts, version="1" if k % 4 == 0 else "2")))
    for ts, raw in rows:
        write(day_file(tmp_path, ts), raw)
    write(day_file(tmp_path, T0 - timedelta(days=5)), line(9999, ts=T0 - timedelta(days=5)))  # far older file
    now = day2 + timedelta(hours=1, minutes=30)  # 01:30: the window is 23:30 .. 01:30
    w = read_window(tmp_path, version="2", columns=COLS, window_hours=2, now=now)
    inside = [k for k, (ts, _) in enumerate(rows) if now - timedelta(hours=2) <= ts <= now]
    assert w.frame["request_id"].tolist() == [f"r{k}" for k in inside if k % 4]
    assert w.other_version_rows == sum(1 for k in inside if k % 4 == 0)
    assert w.complete is True  # rows older than 23:30 exist
    assert w.oldest_ts >= now - timedelta(hours=2) and w.newest_ts <= now
    assert f"{T0 - timedelta(days=5):%Y-%m-%d}.jsonl" not in w.files_read  # never opened
    # rows logged after `now` are not in the window; a window longer than the log is not complete
    early = read_window(tmp_path, version="2", columns=COLS, window_hours=48, now=day1 + timedelta(hours=22, minutes=10))
    assert early.frame["request_id"].tolist() == [f"r{k}" for k in range(11) if k % 4]
    assert early.complete is True  # the old file from 5 days before is inside 48 hours
    short = read_window(tmp_path, version="2", columns=COLS, window_hours=1000, now=now)
    assert short.complete is False


def test_stops_early_on_a_big_log(tmp_path):
    big = write(day_file(tmp_path, T0), *[line(i) for i in range(60_000)])
    older = write(day_file(tmp_path, T0 - timedelta(days=1)), *[line(i, ts=T0 - timedelta(hours=1)) for i in range(10)])
    size = big.stat().st_size
    assert size > 15_000_000
    w = read_window(tmp_path, version="2", columns=COLS, window_rows=100)
    assert w.frame["request_id"].tolist() == [f"r{i}" for i in range(59_900, 60_000)]
    assert w.bytes_read < size / 20, (w.bytes_read, size)
    assert w.files_read == [big.name] and older.name not in w.files_read
    h = read_window(tmp_path, version="2", columns=COLS, window_hours=0.05, now=T0 + timedelta(seconds=60_000))
    assert h.frame["request_id"].tolist() == [f"r{i}" for i in range(59_820, 60_000)]  # 180 s, both ends in
    assert h.bytes_read < size / 10, (h.bytes_read, size)
    # a window the whole log: read whole, the same rows as line by line
    every = read_window(tmp_path, version="2", columns=COLS, window_rows=100_000)
    assert every.rows == 60_010 and every.bytes_read >= size


def test_corrupt_and_partial_lines_are_counted_never_raised(tmp_path):
    good = [line(i) for i in range(40)]
    bad = [
        b"this is not json\n",
        b"[1, 2, 3]\n",
        orjson.dumps({"request_id": "x", "version": "2", "inputs": {}}) + b"\n",  # no ts
        orjson.dumps({"ts": T0.isoformat(), "request_id": "x", "version": "2"}) + b"\n",  # no inputs
        orjson.dumps({"ts": "yesterday", "request_id": "x", "version": "2", "inputs": {}}) + b"\n",
        orjson.dumps({"ts": "2026-03-01T00:00:00", "request_id": "x", "version": "2", "inputs": {}}) + b"\n",  # no offset
        orjson.dumps({"ts": T0.isoformat(), "request_id": 7, "version": "2", "inputs": {}}) + b"\n",
        line(500, income="a lot"),  # a string where the column holds numbers
        line(501)[:-30] + line(502),  # a torn write followed by a whole line, on one line
        b'{"ts": "2026-03-01T00:00:00+00:00"}{"ts": "2026-03-01T00:00:00+00:00"}\n',
    ]
    path = day_file(tmp_path, T0)
    write(path, *good[:20], *bad, b"\n", *good[20:], line(999)[:25])  # ends in a line being written
    w = read_window(tmp_path, version="2", columns=COLS, window_rows=1000)
    assert w.frame["request_id"].tolist() == [f"r{i}" for i in range(40)]
    assert w.corrupt_lines == len(bad)
    assert w.partial_lines == 1
    # the same rows as from the clean file, value for value
    clean = tmp_path / "clean"
    write(day_file(clean, T0), *good)
    c = read_window(clean, version="2", columns=COLS, window_rows=1000)
    pd.testing.assert_frame_equal(w.frame, c.frame)
    assert c.corrupt_lines == 0 and c.partial_lines == 0


def test_an_odd_newest_line_does_not_retype_its_column(tmp_path):
    write(day_file(tmp_path, T0), *[line(i) for i in range(30)], line(30, income="n/a"))
    w = read_window(tmp_path, version="2", columns=COLS, window_rows=100)
    assert w.frame["income"].dtype == np.float64 and w.rows == 30 and w.corrupt_lines == 1


def test_nulls_and_unknown_types(tmp_path):
    write(day_file(tmp_path, T0), *[line(i, income=None if i % 2 else 5.0, verified=None if i == 3 else True,
                                         note=None) for i in range(6)])
    w = read_window(tmp_path, version="2", columns=["income", "verified", "note"], window_rows=10)
    f = w.frame
    assert f["income"].dtype == np.float64 and f["income"].isna().tolist() == [False, True] * 3
    assert f["verified"].dtype == object and f["verified"].tolist() == [True, True, True, None, True, True]
    assert f["note"].isna().all()


def test_a_column_the_version_does_not_log_is_named(tmp_path):
    write(day_file(tmp_path, T0), *[line(i) for i in range(5)])
    with pytest.raises(ValueError, match=r"version '2' does not log input\(s\) ssn .*its rows log: age, income"):
        read_window(tmp_path, version="2", columns=["income", "ssn"], window_rows=10)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of window_rows and window_hours"),
    ({"window_rows": 5, "window_hours": 1.0}, "exactly one of window_rows and window_hours"),
    ({"window_rows": 0}, "window_rows must be a positive integer"),
    ({"window_hours": -1.0}, "window_hours must be a positive number"),
    ({"window_rows": 5, "columns": ["ts"]}, "clash"),
    ({"window_rows": 5, "version": ""}, "version must be a non-empty string"),
    ({"window_hours": 1.0, "now": datetime(2026, 1, 1)}, "timezone-aware"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"version": "2", "columns": COLS, **kwargs}
    with pytest.raises(ValueError, match=message):
        read_window(tmp_path, **args)


def test_missing_folder_is_an_empty_window(tmp_path):
    w = read_window(tmp_path / "never", version="2", columns=COLS, window_rows=10)
    assert w.rows == 0 and w.files_read == [] and w.complete is False


def test_reads_what_the_model_server_writer_wrote(tmp_path):
    log = InferenceLog(tmp_path / "ep" / "prod", pii=set())
    now = datetime.now(timezone.utc)
    log.write([line(i, ts=now) for i in range(3)])
    log.write([line(3, ts=now)[:-1]])  # a line still being written (no newline yet)
    log.close()
    w = read_window(tmp_path / "ep" / "prod", version="2", columns=COLS, window_hours=1)
    assert w.frame["request_id"].tolist() == ["r0", "r1", "r2"] and w.partial_lines == 1


# ---------------------------------------------------------------------------------------------
# scan_new


def test_scan_cursor_semantics_with_a_partial_line_completed_later(tmp_path):
    path = day_file(tmp_path, T0)
    write(path, *[line(i, version="1" if i < 3 else "2") for i in range(10)], b"garbage\n")
    first = scan_new(tmp_path, None)
    assert (first.new_rows, first.new_rows_by_version, first.corrupt_lines) == (10, {"1": 3, "2": 7}, 1)
    assert json.loads(json.dumps(first.cursor)) == first.cursor
    assert first.cursor["files"][path.name][0] == path.stat().st_size

    again = scan_new(tmp_path, first.cursor)
    assert (again.new_rows, again.corrupt_lines, again.bytes_read, again.files_read) == (0, 0, 0, [])

    half = line(10)
    write(path, line(11), half[:17])  # one whole line, then the start of another
    s = scan_new(tmp_path, again.cursor)
    assert s.new_rows == 1 and s.corrupt_lines == 0
    assert s.cursor["files"][path.name][0] == path.stat().st_size - 17  # never past the last complete line

    write(path, half[17:], line(12))  # the writer finishes the line
    before = json.dumps(s.cursor)
    s2 = scan_new(tmp_path, s.cursor)
    assert (s2.new_rows, s2.corrupt_lines) == (2, 0)
    assert s2.cursor["files"][path.name][0] == path.stat().st_size
    assert json.dumps(s.cursor) == before  # the caller's cursor is not modified


def test_scan_day_rollover_and_retirement(tmp_path):
    d = [T0 + timedelta(days=k) for k in range(4)]
    write(day_file(tmp_path, d[0]), *[line(i) for i in range(5)])
    write(day_file(tmp_path, d[1]), *[line(i) for i in range(4)])
    s = scan_new(tmp_path, None)
    assert s.new_rows == 9 and sorted(s.cursor["files"]) == [day_file(tmp_path, d[0]).name, day_file(tmp_path, d[1]).name]
    # the next day's file appears while a worker still finishes a line in yesterday's
    write(day_file(tmp_path, d[1]), line(50)[:-1])
    write(day_file(tmp_path, d[2]), *[line(i) for i in range(3)])
    s2 = scan_new(tmp_path, s.cursor)
    assert s2.new_rows == 3
    assert day_file(tmp_path, d[2]).name in s2.files_read
    # d0 is now two days older than the newest: read to its end once and retired
    assert s2.cursor["done_through"] == f"{d[0]:%Y-%m-%d}"
    assert sorted(s2.cursor["files"]) == [day_file(tmp_path, d[1]).name, day_file(tmp_path, d[2]).name]
    write(day_file(tmp_path, d[1]), b"\n")  # the late line is completed
    write(day_file(tmp_path, d[0]), line(77))  # a retired file is not looked at again
    s3 = scan_new(tmp_path, s2.cursor)
    assert (s3.new_rows, s3.files_read) == (1, [day_file(tmp_path, d[1]).name])


def test_scan_with_nothing_new_only_stats(tmp_path, monkeypatch):
    write(day_file(tmp_path, T0), *[line(i) for i in range(5)])
    write(day_file(tmp_path, T0 + timedelta(days=1)), *[line(i) for i in range(5)])
    old = (datetime.now(timezone.utc) - timedelta(minutes=5)).timestamp()
    os.utime(tmp_path, (old, old))  # the folder last changed well before this scan's listing
    cursor = scan_new(tmp_path, None).cursor

    calls: list[str] = []
    real_stat = os.stat

    def stat(p, *a, **k):
        calls.append(f"stat {Path(p).name}")
        return real_stat(p, *a, **k)

    def refuse(*a, **k):
        raise AssertionError("a scan with nothing new must not list the folder or open a file")

    monkeypatch.setattr(il.os, "stat", stat)
    monkeypatch.setattr(il.os, "scandir", refuse)
    monkeypatch.setattr(il, "open", refuse, raising=False)
    s = scan_new(tmp_path, cursor)
    assert s.new_rows == 0 and s.cursor == cursor
    assert len(calls) == 3, calls  # the folder and the two live files

    # a new file makes the folder's mtime move: then (and only then) it is listed
    monkeypatch.undo()
    write(day_file(tmp_path, T0 + timedelta(days=2)), line(1))
    s2 = scan_new(tmp_path, cursor)
    assert s2.new_rows == 1


def test_scan_reset_budget_and_bad_cursor(tmp_path):
    path = write(day_file(tmp_path, T0), *[line(i) for i in range(50)])
    s = scan_new(tmp_path, None)
    # the file is replaced by a shorter one (another inode): read again from its start
    path.unlink()
    write(path, *[line(i) for i in range(3)])
    r = scan_new(tmp_path, s.cursor)
    assert r.reset_files == [path.name] and r.new_rows == 3

    # a budget smaller than the backlog: several calls, the same total, never a row twice
    many = tmp_path / "many"
    write(day_file(many, T0), *[line(i) for i in range(2000)])
    write(day_file(many, T0 + timedelta(days=1)), *[line(i) for i in range(1000)])
    total, cur, calls = 0, None, 0
    while True:
        step = scan_new(many, cur, max_bytes=100_000)
        total += step.new_rows
        cur = step.cursor
        calls += 1
        if step.caught_up:
            break
    assert total == 3000 and calls > 3

    with pytest.raises(ValueError, match="cursor is not one scan_new returned"):
        scan_new(tmp_path, {"files": "nope"})
    assert scan_new(tmp_path / "absent", None).new_rows == 0
