"""The file stores on S3 (moto's real server on loopback): dataset snapshots, the outcomes store and the drift
reports.

The client is configured the way a deployment configures it, by the standard AWS variables only (plus
``ONEPATH_S3_ADDRESSING_STYLE=path``, which moto and MinIO need); AWS S3 itself differs only in having no
``AWS_ENDPOINT_URL_S3``.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone

import dagster as dg
import pandas as pd
import pytest

from resources import object_store
from resources.data_store import DataStore
from resources.feedback import labelled_rows, record_outcomes
from resources.monitoring import MonitoringResource
from tests.test_feedback import log_entry, write_log
from tests.test_model_server import tiny_model  # noqa: F401  (the module fixture: a LogisticRegression)


def test_snapshots_are_content_addressed_objects_and_read_back_only_intact(bucket: str, moto_s3) -> None:
    store = DataStore(root=f"s3://{bucket}/onepath/data")
    df = pd.DataFrame({"income": [50_000.0, 61_000.5], "region": ["north", "south"]})
    where, data_hash = store.write("loans", df)
    assert where == f"s3://{bucket}/onepath/data/loans/{data_hash}.parquet"
    keys = [o["Key"] for o in moto_s3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys[0] == f"onepath/data/loans/{data_hash}.parquet" and len(keys) == 2
    assert keys[1].startswith("onepath/data/loans/_written/") and keys[1].endswith(f"-{data_hash}")  # the order
    pd.testing.assert_frame_equal(store.read("loans", data_hash), df)
    assert store.write("loans", df) == (where, data_hash)  # written once
    other, other_hash = store.write("loans", df.assign(income=[1.0, 2.0]))
    assert [h for h, _ in store.snapshots("loans")] == [data_hash, other_hash]

    forged = df.assign(income=[1.0, 1.0])  # someone with write access to the bucket replaces the object
    buf = __import__("io").BytesIO()
    forged.to_parquet(buf, index=False)
    moto_s3.client("s3").put_object(Bucket=bucket, Key=f"onepath/data/loans/{data_hash}.parquet", Body=buf.getvalue())
    with pytest.raises(ValueError, match="does not match its hash"):
        store.read("loans", data_hash)
    with pytest.raises(FileNotFoundError, match=f"missing at s3://{bucket}/onepath/data/loans/"):
        store.read("loans", "0" * 64)


def test_an_unreachable_store_is_one_line_naming_the_object_and_endpoint_never_a_secret(
        bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.stores import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    store = DataStore(root=f"s3://{bucket}/data")
    with pytest.raises(object_store.ObjectStoreError) as err:
        store.write("loans", pd.DataFrame({"x": [1]}))
    text = str(err.value)
    assert text.startswith(f"cannot look up s3://{bucket}/data/loans/") and "endpoint http://127.0.0.1:" in text
    assert "testing-secret" not in text and "\n" not in text


def test_a_setting_that_is_not_an_s3_uri_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from platform_defs.settings import load_settings

    monkeypatch.setenv("ONEPATH_DATA_URL", "https://bucket/data")
    with pytest.raises(ValueError, match="ONEPATH_DATA_URL='https://bucket/data': expected s3://BUCKET/PREFIX"):
        load_settings()
    monkeypatch.setenv("ONEPATH_DATA_URL", "s3://snapshots/onepath/")
    assert load_settings().data_root == "s3://snapshots/onepath"


@pytest.mark.parametrize("var", ["ONEPATH_OUTCOMES_URL", "ONEPATH_DRIFT_REPORTS_URL"])
def test_the_outcome_and_report_settings_take_only_an_s3_uri_and_reach_monitoring(
        var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from platform_defs.settings import SettingsError, load_settings
    from platform_defs.wiring import build_resources

    for value in ("/srv/outcomes", "s3:///no-bucket"):
        monkeypatch.setenv(var, value)
        with pytest.raises(SettingsError, match=f"^{var}='{value}': expected s3://BUCKET/PREFIX$"):
            load_settings()
    monkeypatch.delenv(var)
    embedded = build_resources(load_settings())["monitoring"]
    monkeypatch.setenv(var, "s3://acme/onepath/")
    monitoring = build_resources(load_settings())["monitoring"]
    if var == "ONEPATH_OUTCOMES_URL":
        assert str(embedded.outcomes_root) == embedded.outcomes_dir  # the embedded default: the folder, as before
        assert (monitoring.outcomes_root, monitoring.reports_root) == ("s3://acme/onepath/outcomes",
                                                                       embedded.reports_root)
    else:
        assert str(embedded.reports_dir("ep", "prod")) == f"{embedded.drift_reports_dir}/ep/prod"
        assert (monitoring.reports_dir("ep", "prod"), monitoring.outcomes_root) == (
            "s3://acme/onepath/drift_reports/ep/prod", embedded.outcomes_root)


# -- the outcomes store (ONEPATH_OUTCOMES_URL) ---------------------------------------------------------------

def _outcomes_world(tmp_path, bucket: str):
    """The same outcomes recorded to a local folder and to S3, beside one local inference log (the log's S3 reader
    has its own test): three calls, one spanning two days, a correction, an unmatched outcome, a tie."""


    now = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)
    t = now - timedelta(days=2, hours=1)  # 2026-11-24
    write_log(tmp_path / "logs", t, [log_entry(t + timedelta(seconds=i), f"r{i}", {"income": float(i)},
                                               {"application_id": f"A{i}"}) for i in range(6)])
    local = MonitoringResource(inference_log_dir=str(tmp_path / "logs"), outcomes_dir=str(tmp_path / "outcomes"),
                               drift_reports_dir=str(tmp_path / "reports"))
    s3 = local.model_copy(update={"outcomes_url": f"s3://{bucket}/onepath"})
    assert local.outcomes_root == tmp_path / "outcomes" and s3.outcomes_root == f"s3://{bucket}/onepath/outcomes"
    at = lambda d: (t + d).isoformat()  # noqa: E731
    calls = [
        [{"request_id": "r0", "label": 0, "observed_at": at(timedelta(hours=1))},
         {"request_id": "r1", "label": 1, "observed_at": at(timedelta(days=1))},  # the next day: a second object
         {"request_id": "ghost", "label": 1, "observed_at": at(timedelta(hours=2))}],
        [{"request_id": "r0", "label": 1, "observed_at": at(timedelta(hours=5))},  # a correction: r0 is 1
         {"request_id": "r2", "label": 1, "observed_at": at(timedelta(hours=3))}],
        [{"request_id": "r2", "label": 0, "observed_at": at(timedelta(hours=3))},  # a tie: the later write wins
         {"request_id": "r3", "label": 0, "observed_at": at(timedelta(hours=4))},
         {"request_id": "old", "label": 1, "observed_at": (now - timedelta(days=9)).isoformat()}],  # before the window
    ]
    for outcomes in calls:
        for where in (local, s3):
            assert record_outcomes(where.outcomes_root, "credit_scoring", "prod", outcomes) == len(outcomes)
    return local, s3, now


def _join(monitoring, now):

    return labelled_rows(inference_log_dir=monitoring.log_root, outcomes_dir=monitoring.outcomes_root,
                         endpoint="credit_scoring", env="prod", max_age_days=7, max_rows=1000, now=now)


def test_outcomes_on_s3_are_one_object_per_call_and_day_and_join_as_the_local_store(tmp_path, bucket: str,
                                                                                    moto_s3) -> None:

    local, s3, now = _outcomes_world(tmp_path, bucket)
    client = moto_s3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    days = [k.split("/")[4] for k in keys]
    assert days == ["2026-11-17", "2026-11-24", "2026-11-24", "2026-11-24", "2026-11-25"]  # call 1 spans two days
    assert all(re.fullmatch(r"onepath/outcomes/credit_scoring/prod/2026-11-\d\d/\d{8}T\d{12}Z-[0-9a-f]{12}\.jsonl", k)
               for k in keys), keys
    lines = b"".join(client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in sorted(keys, key=lambda k: k[-40:]))
    local_lines = b"".join(p.read_bytes() for p in sorted((tmp_path / "outcomes/credit_scoring/prod").glob("*.jsonl")))
    assert sorted(lines.splitlines()) == sorted(local_lines.splitlines())  # the same lines, byte for byte

    a, b = _join(local, now), _join(s3, now)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.counts() == b.counts()
    assert (b.outcomes, b.superseded_outcomes, b.unmatched_outcomes, b.joined) == (5, 2, 1, 4)  # "old" is not read
    assert dict(zip(b.frame["request_id"], b.frame["label"])) == {"r0": 1, "r1": 1, "r2": 0, "r3": 0}
    assert b.files["outcomes"] == 4  # the day before the window is not read (nor listed: StartAfter)

    # a corrupt line and a partial one put straight into the bucket count as they do in a day file
    day = "2026-11-24"
    bad = b'{"request_id": "r4", "label": "1", "observed_at": "2026-11-24T12:00:00+00:00"}\n{"request_id": "r5", "lab'
    client.put_object(Bucket=bucket, Key=f"onepath/outcomes/credit_scoring/prod/{day}/29990101T000000000000Z-"
                                         f"{'0' * 12}.jsonl", Body=bad)
    with open(tmp_path / f"outcomes/credit_scoring/prod/{day}.jsonl", "ab") as fh:
        fh.write(bad)
    client.put_object(Bucket=bucket, Key=f"onepath/outcomes/credit_scoring/prod/{day}/notes.txt", Body=b"x")  # foreign
    a, b = _join(local, now), _join(s3, now)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.counts() == b.counts() and b.corrupt_outcome_lines == 2


def test_an_outcomes_bucket_that_is_missing_or_unreachable_is_one_line_naming_it(
        tmp_path, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:

    from tests.stores import free_port

    missing = f"s3://{bucket}-gone/onepath/outcomes"
    with pytest.raises(object_store.ObjectStoreError) as err:
        record_outcomes(missing, "credit_scoring", "prod", [{"request_id": "r0", "label": 1}])
    text = str(err.value)
    assert text.startswith(f"cannot write {missing}/credit_scoring/prod/") and "NoSuchBucket" in text
    assert "testing-secret" not in text and "\n" not in text
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(object_store.ObjectStoreError) as err:
        labelled_rows(inference_log_dir=tmp_path / "logs", outcomes_dir=f"s3://{bucket}/onepath/outcomes",
                      endpoint="credit_scoring", env="prod", max_age_days=1, max_rows=10,
                      now=datetime.now(timezone.utc))
    text = str(err.value)
    assert text.startswith(f"cannot list s3://{bucket}/onepath/outcomes/credit_scoring/prod (endpoint http://127.0.0.1:")
    assert "testing-secret" not in text and "\n" not in text


# -- drift reports (ONEPATH_DRIFT_REPORTS_URL) ---------------------------------------------------------------

def _drift_world(tmp_path, settings, name: str):
    """One monitored endpoint environment (inputs income, accounts) with a tight retention, and its model's
    version 1 in the session's MLflow store (sqlite) with a reference sample and no model files: the check reads
    only the run's reference sample."""
    import numpy as np

    from platform_defs.drift_check import REFERENCE_ARTIFACT, monitored
    from platform_defs.policy import DriftPolicy, load_policy
    from platform_defs.specs import Organisation, parse_declaration
    from platform_defs.wiring import build_resources

    decls = [
        parse_declaration({"kind": "dataset", "name": f"{name}_data", "owner": "retention", "track": "ml-standard",
                           "generator": "assets.retention.data:generate_customer_activity",
                           "columns": [{"name": "income", "dtype": "float"}, {"name": "accounts", "dtype": "int"},
                                       {"name": "y", "dtype": "int", "role": "label"}]}),
        parse_declaration({"kind": "model", "name": f"{name}_model", "owner": "retention", "track": "ml-standard",
                           "dataset": f"{name}_data", "trainer": "assets.retention.trainer:train_churn"}),
        parse_declaration({"kind": "endpoint", "name": name, "owner": "retention", "track": "ml-standard",
                           "model": f"{name}_model"}),
    ]
    policy = load_policy()
    track = policy.track("ml-standard")
    drift = DriftPolicy.model_validate({**track.drift.model_dump(), "window_rows": 200, "min_rows": 50,
                                        "report_keep_last": 1, "report_max_age_days": 30})
    policy = policy.model_copy(update={"tracks": {**policy.tracks, "ml-standard": track.model_copy(
        update={"drift": drift})}})
    (m,) = monitored(Organisation(decls), policy)
    assert m.features == ["income", "accounts"]
    mlflow = build_resources(settings)["mlflow"]
    rng = np.random.default_rng(0)
    ref = tmp_path / "reference_sample.parquet"
    pd.DataFrame({"income": rng.normal(50, 10, 300), "accounts": rng.integers(0, 9, 300)}).to_parquet(ref)
    client = mlflow.client()
    run = client.create_run(mlflow.experiment_id("drift-s3"))
    client.log_artifact(run.info.run_id, str(ref), REFERENCE_ARTIFACT.rsplit("/", 1)[0])
    client.set_terminated(run.info.run_id)
    client.create_registered_model(m.model.name)
    client.create_model_version(m.model.name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return m, mlflow


def _log_drifted_rows(monitoring, m, start) -> None:
    """200 logged rows of version 1 whose income moved well away from the reference (a drift verdict)."""
    import numpy as np


    rng = np.random.default_rng(1)
    folder = monitoring.log_dir(m.endpoint.name, m.env)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(200):
        ts = start + timedelta(seconds=i)
        with open(folder / f"{ts.date().isoformat()}.jsonl", "a") as fh:
            fh.write(log_entry(ts, f"r{i}", {"income": float(rng.normal(80, 10)), "accounts": int(rng.integers(0, 9))}))


def test_drift_reports_are_uploaded_to_the_documented_key_linked_recorded_and_pruned_there(
        tmp_path, bucket: str, moto_s3, settings, tiny_model) -> None:

    from platform_defs.drift_check import evaluate, prune_reports
    from resources.deployers.base import Target
    from resources.ledger import Ledger
    from tests.conftest import grant_caller, model_release
    from tests.test_model_server import tiny_deployer

    name = f"drift_{uuid.uuid4().hex[:8]}"
    m, mlflow = _drift_world(tmp_path, settings, name)
    monitoring = MonitoringResource(inference_log_dir=str(tmp_path / "logs"), outcomes_dir=str(tmp_path / "o"),
                                    drift_reports_dir=str(tmp_path / "reports"),
                                    drift_reports_url=f"s3://{bucket}/onepath")
    where = f"s3://{bucket}/onepath/drift_reports/{name}/prod"
    assert monitoring.reports_dir(name, "prod") == where
    now = datetime.now(timezone.utc).replace(microsecond=0)
    _log_drifted_rows(monitoring, m, now - timedelta(hours=1))
    book = Ledger(tmp_path / "ledger.db", tmp_path / "key")
    client = moto_s3.client("s3")
    prefix = f"onepath/drift_reports/{name}/prod/"
    stale = f"{prefix}{now - timedelta(days=40):%Y%m%dT%H%M%SZ}-v0.html"  # written just now, named 40 days ago
    client.put_object(Bucket=bucket, Key=stale, Body=b"<html></html>")
    client.put_object(Bucket=bucket, Key=f"{prefix}README.txt", Body=b"not a report")  # not ours: left alone

    deployer = tiny_deployer(settings)
    target = Target(name, "prod", kind="endpoint")
    grant_caller(deployer, target)
    deployer.deploy(target, model_release("1", tiny_model, {"model_name": "tiny"}))
    try:
        results = [evaluate(m, mlflow=mlflow, deployer=deployer, monitoring=monitoring, ledger=book, actor="test",
                            now=now + timedelta(seconds=s)) for s in (0, 1)]
        assert not (tmp_path / "reports").exists()  # nothing was written to the local folder
        # unset, the local folder is as it was: a file there, linked as a path
        local = evaluate(m, mlflow=mlflow, deployer=deployer, ledger=book, actor="test", now=now,
                         monitoring=monitoring.model_copy(update={"drift_reports_url": None}))
        # a reports store that takes nothing (here: no such bucket) costs the report, never the verdict
        lost = evaluate(m, mlflow=mlflow, deployer=deployer, ledger=book, actor="test", now=now,
                        monitoring=monitoring.model_copy(update={"drift_reports_url": "s3://no-such-reports/x"}))
    finally:
        deployer.delete(target)

    assert lost.passed is False and lost.metadata["report"].value.startswith("report not stored: ")
    assert "no-such-reports" in lost.metadata["report"].value
    assert lost.metadata["reports_pruned"].value.startswith("old reports not pruned: ")
    recorded = book.entries(kind="drift_detected")[-1]
    assert recorded.data["report"] is None and "no-such-reports" in recorded.data["report_error"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    # the stale one is pruned by the time in its name (its LastModified is new), then the first by keep_last 1
    assert keys == [f"{prefix}{now + timedelta(seconds=1):%Y%m%dT%H%M%SZ}-v1.html", f"{prefix}README.txt"]
    assert [r.metadata["reports_pruned"].value for r in results] == [1, 1]
    last = results[-1]
    assert not last.passed and last.metadata["drifted_columns"].value == "income"
    uri = f"s3://{bucket}/{keys[0]}"
    assert isinstance(last.metadata["report"], dg.UrlMetadataValue) and last.metadata["report"].value == uri
    obj = client.get_object(Bucket=bucket, Key=keys[0])
    assert obj["ContentType"] == "text/html" and b"<html" in obj["Body"].read()[:2000].lower()
    entries = book.entries(kind="drift_detected", subject=name)
    assert [e.data["report"] for e in entries[:2]] == [f"s3://{bucket}/{prefix}{now + timedelta(seconds=s):%Y%m%dT%H%M%SZ}"
                                                   f"-v1.html" for s in (0, 1)]
    report = tmp_path / "reports" / name / "prod" / f"{now:%Y%m%dT%H%M%SZ}-v1.html"
    assert isinstance(local.metadata["report"], dg.PathMetadataValue) and local.metadata["report"].value == str(report)
    assert report.is_file() and book.entries(kind="drift_detected", subject=name)[-2].data["report"] == str(report)

    # retention by age on S3: everything older than max_age_days goes, whatever keep_last allows
    assert prune_reports(where, keep_last=10, max_age_days=1, now=(now + timedelta(days=1)).timestamp()) == []
    gone = prune_reports(where, keep_last=10, max_age_days=1, now=(now + timedelta(days=1, seconds=2)).timestamp())
    assert gone == [uri] and [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]] == [
        f"{prefix}README.txt"]


def test_a_dataset_fed_by_outcomes_reads_them_from_s3(tmp_path, bucket: str) -> None:
    """The dataset asset's feedback step (platform_defs.factories) takes the store from MonitoringResource."""

    from assets.credit.data import generate_credit_applications
    from platform_defs.factories import _with_feedback
    from platform_defs.loader import load_organisation
    from tests.test_feedback import CREDIT_FEATURES

    spec = load_organisation().by_name["credit_applications"]
    fb = spec.feedback
    drawn = generate_credit_applications(rows=40, period_start="2026-11-01", period_end="2026-11-26", shift=0.8,
                                         seed=9)
    monitoring = MonitoringResource(inference_log_dir=str(tmp_path / "logs"), outcomes_dir=str(tmp_path / "o"),
                                    drift_reports_dir=str(tmp_path / "r"), outcomes_url=f"s3://{bucket}/onepath")
    ts = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
    recs = drawn.to_dict(orient="records")
    for i, rec in enumerate(recs):
        write_log(tmp_path / "logs", ts + timedelta(seconds=i), [log_entry(
            ts + timedelta(seconds=i), f"req-{i}", {k: rec[k] for k in CREDIT_FEATURES},
            {k: rec[k] for k in ("application_id", "gender", "age_band")})], endpoint=fb.endpoint, env=fb.env)
    record_outcomes(monitoring.outcomes_root, fb.endpoint, fb.env,
                    [{"request_id": f"req-{i}", "label": int(rec["defaulted"])} for i, rec in enumerate(recs[:30])])
    base = generate_credit_applications(**{**spec.params, "rows": 50})
    df, meta = _with_feedback(spec, base, monitoring)
    assert (meta["feedback_rows"], meta["feedback_outcomes"], meta["feedback_logged_rows"]) == (30, 30, 40)
    assert len(df) == 80 and not (tmp_path / "o").exists()
    gone = monitoring.model_copy(update={"outcomes_url": f"s3://{bucket}-gone/onepath"})
    with pytest.raises(dg.Failure) as err:  # the asset fails in one line naming the object, not a traceback
        _with_feedback(spec, base, gone)
    assert err.value.description.startswith(f"cannot list s3://{bucket}-gone/onepath/outcomes/{fb.endpoint}/")


def test_simulated_outcomes_to_s3_come_in_batches_not_one_object_per_request(tmp_path, bucket: str, moto_s3) -> None:
    """simulate-traffic to an S3 store delivers what came due at most once a second (each delivery is an object).
    The endpoint is not what is tested here: ``send`` answers as a server does, on a clock that moves only when
    the loop waits."""
    from platform_defs.cli_simulate import S3_DELIVER_EVERY, Planned, Simulation
    from tests.test_simulate import ControlledClock

    clock = ControlledClock(1_800_000_000.0)
    root = f"s3://{bucket}/onepath/outcomes"
    sim = Simulation(endpoint="credit_scoring", env="prod", outcomes_dir=root,
                     requests=iter([Planned({"x": i}, i % 2) for i in range(100)]),
                     send=lambda record, rid: {"version": "1"}, rate=20.0, label_delay=2.0, clock=clock,
                     total=100, deliver_every=S3_DELIVER_EVERY)
    summary = sim.run()
    assert (summary.ok, summary.delivered, summary.pending) == (100, 100, 0)
    keys = [o["Key"] for o in moto_s3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert 5 <= len(keys) <= 7, keys  # 5 s of requests at 20/s: one delivery a second, not 100
    got = _join_outcomes(root, tmp_path)
    assert got.outcomes == 100 and got.superseded_outcomes == 0 and got.corrupt_outcome_lines == 0


def _join_outcomes(root: str, tmp_path):
    return labelled_rows(inference_log_dir=tmp_path / "no-logs", outcomes_dir=root, endpoint="credit_scoring",
                         env="prod", max_age_days=30, max_rows=10,
                         now=datetime.fromtimestamp(1_800_000_100.0, timezone.utc))
