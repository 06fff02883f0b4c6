"""The outcomes store and its join with the inference log: labels that arrive later become rows of
the declared datasets (exact columns and dtypes, no personal data) that still pass their GX suites."""

from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from assets.credit.data import generate_credit_applications
from assets.retention.data import generate_customer_activity
from platform_defs.loader import load_organisation
from resources.feedback import FeedbackError, dataset_rows_from_feedback, labelled_rows, record_outcomes
from resources.gx_validation import validate

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
EP, ENV = "credit_scoring", "prod"


@pytest.fixture(scope="module")
def org():
    return load_organisation()


def log_entry(ts: datetime, rid: str, inputs: dict, extras: dict | None = None, version: str = "1") -> str:
    """One line as the model server writes it (resources/serving/model_server.py)."""
    return json.dumps({"ts": ts.isoformat(), "request_id": rid, "model": "credit_risk", "version": version,
                       "inputs": inputs, "extras": extras or {}, "output": {"prediction": 0, "probability": 0.2},
                       "latency_ms": 1.5}) + "\n"


def write_log(root: Path, day: datetime, lines: list[str], endpoint: str = EP, env: str = ENV) -> Path:
    d = root / endpoint / env
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{day.date().isoformat()}.jsonl"
    with open(path, "a") as f:
        f.write("".join(lines))
    return path


def join(tmp_path: Path, **kw):
    args = dict(inference_log_dir=tmp_path / "logs", outcomes_dir=tmp_path / "outcomes", endpoint=EP, env=ENV,
                max_age_days=7, max_rows=1000, now=NOW)
    args.update(kw)
    return labelled_rows(**args)


def outcome_lines(tmp_path: Path, endpoint: str = EP, env: str = ENV) -> list[dict]:
    return [json.loads(line) for p in sorted((tmp_path / "outcomes" / endpoint / env).glob("*.jsonl"))
            for line in p.read_text().splitlines()]


# -- the outcomes store ---------------------------------------------------------------------------


def test_outcomes_go_to_the_file_of_the_day_they_were_observed(tmp_path):
    n = record_outcomes(tmp_path / "outcomes", EP, ENV, [
        {"request_id": "a", "label": 1, "observed_at": "2026-11-25T23:59:59+00:00"},
        {"request_id": "b", "label": 0, "observed_at": datetime(2026, 11, 26, 0, 0, 1, tzinfo=timezone.utc)},
        {"request_id": "c", "label": 0, "observed_at": "2026-11-26T01:30:00+01:00"},  # 00:30 UTC
    ])
    assert n == 3
    files = sorted(p.name for p in (tmp_path / "outcomes" / EP / ENV).iterdir())
    assert files == ["2026-11-25.jsonl", "2026-11-26.jsonl"]
    rows = outcome_lines(tmp_path)
    assert [(r["request_id"], r["label"]) for r in rows] == [("a", 1), ("b", 0), ("c", 0)]
    assert rows[2]["observed_at"] == "2026-11-26T00:30:00+00:00"
    # without observed_at the outcome is observed now
    record_outcomes(tmp_path / "outcomes", EP, ENV, [{"request_id": "d", "label": 1}])
    assert datetime.fromisoformat(outcome_lines(tmp_path)[-1]["observed_at"]).tzinfo is not None


@pytest.mark.parametrize("bad, message", [
    ({"request_id": "x", "label": "yes"}, "outcome 1 (x): field 'label' must be an integer (got 'yes')"),
    ({"request_id": "x", "label": True}, "outcome 1 (x): field 'label' must be an integer (got True)"),
    ({"request_id": "", "label": 1}, "outcome 1: field 'request_id' must be a non-empty string"),
    ({"request_id": "x", "label": 1, "observed_at": "yesterday"}, "outcome 1 (x): field 'observed_at' is not an ISO time"),
    ({"request_id": "x", "label": 1, "lable": 0}, "outcome 1 (x): unknown field 'lable'"),
])
def test_a_bad_outcome_is_named_and_nothing_is_written(tmp_path, bad, message):
    with pytest.raises(FeedbackError) as err:
        record_outcomes(tmp_path / "outcomes", EP, ENV, [{"request_id": "ok", "label": 0}, bad])
    assert str(err.value).startswith(message), str(err.value)
    assert not (tmp_path / "outcomes").exists()


def test_endpoint_and_env_cannot_escape_the_store(tmp_path):
    with pytest.raises(FeedbackError, match="endpoint '../x' is not a valid name"):
        record_outcomes(tmp_path / "outcomes", "../x", ENV, [{"request_id": "a", "label": 1}])


def _writer(args: tuple[str, int, int]) -> int:
    root, worker, n = args
    total = 0
    for start in range(0, n, 37):  # many small appends, racing the other workers
        batch = [{"request_id": f"w{worker}-{i}", "label": i % 2, "observed_at": NOW.isoformat()}
                 for i in range(start, min(start + 37, n))]
        total += record_outcomes(root, EP, ENV, batch)
    return total


def test_concurrent_writers_neither_lose_nor_tear_lines(tmp_path):
    workers, n = 6, 1500
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        written = pool.map(_writer, [(str(tmp_path / "outcomes"), w, n) for w in range(workers)])
    assert written == [n] * workers
    rows = outcome_lines(tmp_path)  # every line parses: none torn or interleaved
    assert len(rows) == workers * n
    assert {r["request_id"] for r in rows} == {f"w{w}-{i}" for w in range(workers) for i in range(n)}
    # the reader agrees: no corrupt line, every outcome counted
    assert join(tmp_path).outcomes == workers * n and join(tmp_path).corrupt_lines == 0


# -- the join -------------------------------------------------------------------------------------


def test_join_multi_record_requests_unmatched_outcomes_and_corrections(tmp_path):
    logs = tmp_path / "logs"
    t = NOW - timedelta(hours=2)
    write_log(logs, t, [
        log_entry(t, "single", {"annual_income": 1.0}, {"application_id": "A1"}),
        # one request of three records: the server logs "<id>:<j>"
        *[log_entry(t + timedelta(seconds=1), f"batch:{j}", {"annual_income": 10.0 + j}, {"application_id": f"B{j}"})
          for j in range(3)],
        log_entry(t + timedelta(seconds=2), "no-outcome-yet", {"annual_income": 5.0}),
    ])
    record_outcomes(tmp_path / "outcomes", EP, ENV, [
        {"request_id": "single", "label": 0, "observed_at": (t + timedelta(days=1)).isoformat()},
        {"request_id": "batch:0", "label": 1, "observed_at": (t + timedelta(hours=1)).isoformat()},
        {"request_id": "batch:2", "label": 0, "observed_at": (t + timedelta(hours=1)).isoformat()},
        {"request_id": "batch", "label": 1, "observed_at": t.isoformat()},  # the bare id names no row
        {"request_id": "ghost", "label": 1, "observed_at": t.isoformat()},
        # a correction: the later observation of "single" wins, whichever order the lines are in
        {"request_id": "single", "label": 1, "observed_at": (t + timedelta(days=2)).isoformat()},
        {"request_id": "batch:2", "label": 1, "observed_at": (t + timedelta(minutes=1)).isoformat()},
    ])
    got = join(tmp_path, now=t + timedelta(days=3))
    assert got.logged == 5
    assert got.outcomes == 5  # distinct request ids
    assert got.superseded_outcomes == 2
    assert got.joined == 3
    assert got.unmatched_outcomes == 2  # "batch" and "ghost"
    assert got.corrupt_lines == 0
    f = got.frame
    assert list(f["request_id"]) == ["single", "batch:0", "batch:2"]  # oldest first
    assert list(f["label"]) == [1, 1, 0]
    assert list(f["application_id"]) == ["A1", "B0", "B2"]
    assert list(f["annual_income"]) == [1.0, 10.0, 12.0]
    assert str(f["ts"].dtype) == "datetime64[ns, UTC]" and f["label"].dtype == "int64"
    assert set(f.columns) == {"annual_income", "application_id", "label", "request_id", "ts", "version"}


def test_max_age_keeps_only_requests_scored_in_the_window(tmp_path):
    logs = tmp_path / "logs"
    old, edge, inside, future = NOW - timedelta(days=30), NOW - timedelta(days=7), NOW - timedelta(days=1), NOW + timedelta(hours=1)
    write_log(logs, old, [log_entry(old, "old", {"x": 1})])
    # an older request in a newer file is still judged by its own time
    write_log(logs, edge, [log_entry(edge, "edge", {"x": 2}), log_entry(edge - timedelta(seconds=1), "just-out", {"x": 3})])
    write_log(logs, inside, [log_entry(inside, "inside", {"x": 4})])
    write_log(logs, future, [log_entry(future, "future", {"x": 5})])
    record_outcomes(tmp_path / "outcomes", EP, ENV,
                    [{"request_id": r, "label": 1, "observed_at": NOW.isoformat()}
                     for r in ("old", "edge", "just-out", "inside", "future")])
    got = join(tmp_path, max_age_days=7)
    assert list(got.frame["request_id"]) == ["edge", "inside"]
    assert got.logged == 2 and got.joined == 2
    assert got.unmatched_outcomes == 3  # their requests are outside the window
    assert got.files["inference_log"] == 3  # the 30-day-old file is not even read
    assert list(join(tmp_path, max_age_days=31).frame["request_id"]) == ["old", "just-out", "edge", "inside"]


def test_max_rows_keeps_the_newest(tmp_path):
    t0 = NOW - timedelta(days=2)
    lines = [log_entry(t0 + timedelta(minutes=i), f"r{i}", {"x": i}) for i in range(50)]
    write_log(tmp_path / "logs", t0, lines[::-1])  # file order does not matter, scoring time does
    record_outcomes(tmp_path / "outcomes", EP, ENV, [{"request_id": f"r{i}", "label": i % 2} for i in range(0, 50, 2)])
    got = join(tmp_path, max_rows=5)
    assert got.joined == 25 and len(got.frame) == 5
    assert list(got.frame["request_id"]) == ["r40", "r42", "r44", "r46", "r48"]


def test_a_reused_request_id_joins_its_newest_row(tmp_path):
    t = NOW - timedelta(hours=3)
    write_log(tmp_path / "logs", t, [log_entry(t + timedelta(minutes=5), "dup", {"x": 2}, version="2"),
                                     log_entry(t, "dup", {"x": 1}, version="1")])
    record_outcomes(tmp_path / "outcomes", EP, ENV, [{"request_id": "dup", "label": 1}])
    got = join(tmp_path)
    assert got.logged == 2 and got.duplicate_requests == 1 and got.joined == 1
    assert list(got.frame["x"]) == [2] and list(got.frame["version"]) == ["2"]


def test_corrupt_and_partial_lines_are_skipped_and_counted(tmp_path):
    t = NOW - timedelta(hours=1)
    good = [log_entry(t, f"g{i}", {"x": i}) for i in range(3)]
    write_log(tmp_path / "logs", t, [
        good[0], "this is not json\n", "[1, 2, 3]\n", good[1],
        json.dumps({"ts": t.isoformat(), "inputs": {}}) + "\n",  # no request id
        json.dumps({"ts": "soon", "request_id": "bad-ts", "inputs": {}}) + "\n",
        json.dumps({"ts": t.isoformat(), "request_id": "bad-inputs", "inputs": [1]}) + "\n",
        "\n", good[2],
        good[0][: len(good[0]) // 2],  # a crashed writer's partial last line (no newline)
    ])
    record_outcomes(tmp_path / "outcomes", EP, ENV, [{"request_id": f"g{i}", "label": 1} for i in range(3)])
    out_file = next((tmp_path / "outcomes" / EP / ENV).glob("*.jsonl"))
    with open(out_file, "a") as f:
        f.write('{"request_id": "g9", "label": "1", "observed_at": "2026-11-26T11:00:00+00:00"}\n')  # label a string
        f.write('{"request_id": "g8", "label": 1}\n')  # no observed_at
        f.write('{"request_id": "g0", "label": tru')  # partial
    got = join(tmp_path)
    assert got.corrupt_log_lines == 6
    assert got.corrupt_outcome_lines == 3
    assert got.corrupt_lines == 9
    assert got.logged == 3 and got.joined == 3 and list(got.frame["request_id"]) == ["g0", "g1", "g2"]
    assert "9 corrupt lines skipped" in got.summary()


def test_nothing_logged_yet_is_an_empty_frame_not_an_error(tmp_path, org):
    got = join(tmp_path)
    assert len(got.frame) == 0 and got.counts()["logged"] == 0 and got.corrupt_lines == 0
    spec = org.by_name["credit_applications"]
    rows = dataset_rows_from_feedback(spec, got.frame)
    assert list(rows.columns) == [c.name for c in spec.columns] and len(rows) == 0
    base = generate_credit_applications(rows=5)
    assert rows.dtypes.to_dict() == base.dtypes.to_dict()


def test_bad_join_parameters_are_one_line(tmp_path):
    with pytest.raises(FeedbackError, match="max_age_days must be > 0 and max_rows >= 1"):
        join(tmp_path, max_rows=0)


# -- joined rows -> dataset rows --------------------------------------------------------------------

CREDIT_FEATURES = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
                   "num_open_accounts", "delinquencies_2y", "employment_type", "home_ownership", "purpose"]


def log_rows(root: Path, frame: pd.DataFrame, *, features: list[str], extras: list[str], ts: datetime,
             label: str, prefix: str = "req", endpoint: str = EP) -> None:
    """Log ``frame``'s rows as an endpoint would (features as inputs, ``extras`` passed through), and
    record each row's true label as its outcome."""
    lines, outcomes = [], []
    for i, rec in enumerate(frame.to_dict(orient="records")):
        rid = f"{prefix}-{i}"
        lines.append(log_entry(ts + timedelta(seconds=i), rid, {k: rec[k] for k in features},
                               {k: rec[k] for k in extras}))
        outcomes.append({"request_id": rid, "label": int(rec[label])})
    write_log(root / "logs", ts, lines, endpoint=endpoint)
    record_outcomes(root / "outcomes", endpoint, ENV, outcomes)


def credit_feedback(tmp_path: Path, org, rows: int = 120, extras=("application_id", "gender", "age_band")):
    spec = org.by_name["credit_applications"]
    drawn = generate_credit_applications(rows=rows, period_start="2026-11-01", period_end="2026-11-26",
                                         shift=0.8, seed=9)
    log_rows(tmp_path, drawn, features=CREDIT_FEATURES, extras=list(extras), ts=NOW - timedelta(days=1),
             label="defaulted")
    return spec, drawn, join(tmp_path).frame


def test_feedback_rows_have_the_declared_columns_dtypes_and_no_personal_data(tmp_path, org):
    spec, drawn, labelled = credit_feedback(tmp_path, org)
    rows = dataset_rows_from_feedback(spec, labelled)
    base = generate_credit_applications(**spec.params)
    assert list(rows.columns) == list(base.columns) == [c.name for c in spec.columns]
    assert rows.dtypes.to_dict() == base.dtypes.to_dict()
    assert len(rows) == len(drawn) == 120
    for pii in spec.pii_columns:  # the log never holds PII, so neither do these rows
        assert rows[pii].isna().all(), pii
    assert set(rows["applied_on"]) == {(NOW - timedelta(days=1)).date().isoformat(),
                                       (NOW - timedelta(days=1) + timedelta(seconds=119)).date().isoformat()}
    kept = ["application_id", "gender", "age_band", *CREDIT_FEATURES, "defaulted"]
    expected = drawn[kept].sort_values("application_id").reset_index(drop=True)
    got = rows[kept].sort_values("application_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)  # features, protected attributes, ids and true labels


def test_base_plus_feedback_rows_pass_the_declared_suite(tmp_path, org):
    spec, _, labelled = credit_feedback(tmp_path, org)
    mixed = pd.concat([generate_credit_applications(**spec.params), dataset_rows_from_feedback(spec, labelled)],
                      ignore_index=True)
    result = validate(mixed, spec)
    assert result.success, result.failed
    # what makes it pass: PII declared nullable. The same frame fails a suite that requires it.
    strict = spec.model_copy(update={"columns": [c.model_copy(update={"nullable": False}) if c.pii else c
                                                 for c in spec.columns]})
    failed = validate(mixed, strict).failed
    assert {(f["expectation"], f["column"]) for f in failed} == {
        ("expect_column_values_to_not_be_null", c) for c in spec.pii_columns}


def test_retention_feedback_rows_pass_the_declared_suite(tmp_path, org):
    spec = org.by_name["customer_activity"]
    assert spec.feedback is not None and (spec.feedback.endpoint, spec.feedback.env) == ("churn_scoring", "prod")
    feats, _ = org.model_features(org.by_name["churn"])
    drawn = generate_customer_activity(rows=150, as_of="2026-11-26", shift=0.8, seed=4)
    log_rows(tmp_path, drawn, features=feats, extras=["customer_id"], ts=NOW - timedelta(hours=5), label="churned",
             endpoint="churn_scoring")
    labelled = join(tmp_path, endpoint="churn_scoring").frame
    rows = dataset_rows_from_feedback(spec, labelled)
    base = generate_customer_activity(**spec.params)
    assert len(rows) == 150 and rows.dtypes.to_dict() == base.dtypes.to_dict()
    assert sorted(rows["customer_id"]) == sorted(drawn["customer_id"])
    result = validate(pd.concat([base, rows], ignore_index=True), spec)
    assert result.success, result.failed


def test_the_credit_dataset_declares_its_feedback_and_nullable_pii(org):
    spec = org.by_name["credit_applications"]
    assert spec.feedback is not None and (spec.feedback.endpoint, spec.feedback.env) == ("credit_scoring", "prod")
    assert spec.pii_columns and all(spec.column(c).nullable for c in spec.pii_columns)


def test_id_falls_back_to_the_request_id_when_the_caller_did_not_pass_it(tmp_path, org):
    spec, _, labelled = credit_feedback(tmp_path, org, rows=10, extras=("gender", "age_band"))
    rows = dataset_rows_from_feedback(spec, labelled)
    assert sorted(rows["application_id"]) == sorted(f"req-{i}" for i in range(10))


def test_a_required_column_the_caller_did_not_pass_is_a_clear_error(tmp_path, org):
    spec, _, labelled = credit_feedback(tmp_path, org, rows=10, extras=("application_id", "age_band"))
    with pytest.raises(FeedbackError) as err:
        dataset_rows_from_feedback(spec, labelled)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("dataset 'credit_applications': required column 'gender' cannot be filled for 10 of 10 "
                           "feedback rows (first: request 'req-0')"), line


def test_a_value_of_the_wrong_type_names_column_and_request(tmp_path, org):
    spec, _, labelled = credit_feedback(tmp_path, org, rows=10)
    labelled = labelled.astype({"annual_income": object})
    labelled.loc[3, "annual_income"] = "lots"
    with pytest.raises(FeedbackError, match=r"^dataset 'credit_applications': column 'annual_income' \(float, from "
                                            r"the logged inputs or extras\): request 'req-3' has 'lots', not a number"):
        dataset_rows_from_feedback(spec, labelled)


def test_pii_that_is_not_nullable_cannot_take_feedback(tmp_path, org):
    spec, _, labelled = credit_feedback(tmp_path, org, rows=5)
    strict = spec.model_copy(update={"columns": [c.model_copy(update={"nullable": False}) if c.name == "email" else c
                                                 for c in spec.columns]})
    with pytest.raises(FeedbackError, match="^dataset 'credit_applications': column 'email' is PII and required "
                                            r"\(nullable: false\); .*the inference log never holds PII"):
        dataset_rows_from_feedback(strict, labelled)


def test_the_same_application_scored_twice_keeps_its_newest_outcome(tmp_path, org):
    spec = org.by_name["credit_applications"]
    drawn = generate_credit_applications(rows=3, period_start="2026-11-01", period_end="2026-11-26", seed=2)
    again = drawn.iloc[[1]].assign(loan_amount=999.0, defaulted=1 - int(drawn["defaulted"].iloc[1]))
    t = NOW - timedelta(hours=1)
    log_rows(tmp_path, drawn, features=CREDIT_FEATURES, extras=["application_id", "gender", "age_band"], ts=t,
             label="defaulted", prefix="first")
    log_rows(tmp_path, again, features=CREDIT_FEATURES, extras=["application_id", "gender", "age_band"],
             ts=t + timedelta(minutes=5), label="defaulted", prefix="retry")
    rows = dataset_rows_from_feedback(spec, join(tmp_path).frame)
    assert len(rows) == 3 and rows.attrs["duplicate_ids_dropped"] == 1
    row = rows.set_index("application_id").loc[drawn["application_id"].iloc[1]]
    assert row["loan_amount"] == 999.0 and row["defaulted"] == 1 - int(drawn["defaulted"].iloc[1])
