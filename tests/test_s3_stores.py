"""The file stores on S3 (moto's real server on loopback): dataset snapshots so far.

The client is configured the way a deployment configures it, by the standard AWS variables only (plus
``ONEPATH_S3_ADDRESSING_STYLE=path``, which moto and MinIO need); AWS S3 itself differs only in having no
``AWS_ENDPOINT_URL_S3``.
"""

from __future__ import annotations

import uuid

import pandas as pd
import pytest

from resources import object_store
from resources.data_store import DataStore


@pytest.fixture
def bucket(moto_s3, monkeypatch: pytest.MonkeyPatch) -> str:
    for var, value in {"AWS_ENDPOINT_URL_S3": moto_s3.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
                       "ONEPATH_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(var, value)
    name = f"onepath-{uuid.uuid4().hex[:12]}"
    moto_s3.client("s3").create_bucket(Bucket=name)
    return name


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


# -- the outcomes store (ONEPATH_OUTCOMES_URL) ---------------------------------------------------------------

def _outcomes_world(tmp_path, bucket: str):
    """The same outcomes recorded to a local folder and to S3, beside one local inference log (the log's S3 reader
    has its own test): three calls, one spanning two days, a correction, an unmatched outcome, a tie."""
    from datetime import datetime, timedelta, timezone

    from resources.feedback import record_outcomes
    from resources.monitoring import MonitoringResource
    from tests.test_feedback import log_entry, write_log

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
    from resources.feedback import labelled_rows

    return labelled_rows(inference_log_dir=monitoring.log_root, outcomes_dir=monitoring.outcomes_root,
                         endpoint="credit_scoring", env="prod", max_age_days=7, max_rows=1000, now=now)


def test_outcomes_on_s3_are_one_object_per_call_and_day_and_join_as_the_local_store(tmp_path, bucket: str,
                                                                                    moto_s3) -> None:
    import re

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
    from datetime import datetime, timezone

    from resources.feedback import labelled_rows, record_outcomes
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
