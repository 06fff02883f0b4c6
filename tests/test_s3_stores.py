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
