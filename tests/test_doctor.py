"""``onepath doctor``: per configured store OK, or one line naming the store, its address (never a password) and
the fix; against the embedded default, the real production stores (PostgreSQL, moto's S3), and broken settings."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from platform_defs.cli import main

PROD_VARS = ("ONEPATH_LEDGER_URL", "ONEPATH_DATA_URL", "ONEPATH_INFERENCE_LOG_URL", "ONEPATH_OUTCOMES_URL",
             "ONEPATH_DRIFT_REPORTS_URL", "ONEPATH_MLFLOW_ARTIFACTS", "ONEPATH_RELEASES_URL", "MLFLOW_TRACKING_URI",
             "MLFLOW_REGISTRY_URI", "ONEPATH_WITNESS_SOCKET", "DAGSTER_HOME", *(f"ONEPATH_DAGSTER_PG_{v}" for v in (
                 "HOST", "PORT", "USER", "PASSWORD", "DB")))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in PROD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ONEPATH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def doctor(capsys) -> tuple[int, list[str], list[str]]:
    code = main(["doctor"])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err.splitlines()


def test_the_embedded_default_is_ok_before_anything_was_made(home: Path, capsys) -> None:
    code, out, err = doctor(capsys)
    assert (code, err) == (0, [])
    assert [line.split(":")[0] for line in out] == ["dagster instance", "mlflow", "mlflow artifacts", "ledger",
                                                     "dataset snapshots", "inference logs", "app releases",
                                                     "outcomes", "drift reports", "witness"]
    assert all(": OK (" in line for line in out)


def test_production_stores_that_answer_are_ok_and_broken_ones_are_one_line_each(
        home: Path, postgres, moto_s3, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    bucket = f"doctor-{uuid.uuid4().hex[:10]}"
    moto_s3.client("s3").create_bucket(Bucket=bucket)
    for var, value in {"ONEPATH_LEDGER_URL": postgres.create_database("doctor_ledger"),
                       "MLFLOW_TRACKING_URI": postgres.create_database("doctor_mlflow"),
                       "ONEPATH_DATA_URL": f"s3://{bucket}/data", "ONEPATH_MLFLOW_ARTIFACTS": f"s3://{bucket}/mlflow",
                       "ONEPATH_INFERENCE_LOG_URL": f"s3://{bucket}/logs", "ONEPATH_RELEASES_URL": f"s3://{bucket}/rel",
                       "ONEPATH_OUTCOMES_URL": f"s3://{bucket}/onepath", "ONEPATH_DRIFT_REPORTS_URL": f"s3://{bucket}/onepath",
                       "AWS_ENDPOINT_URL_S3": moto_s3.endpoint_url, "ONEPATH_S3_ADDRESSING_STYLE": "path",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "ONEPATH_DAGSTER_PG_HOST": "127.0.0.1",
                       "ONEPATH_DAGSTER_PG_PORT": str(postgres.port), "ONEPATH_DAGSTER_PG_USER": "onepath",
                       "ONEPATH_DAGSTER_PG_PASSWORD": postgres.password,
                       "ONEPATH_DAGSTER_PG_DB": postgres.create_database("doctor_dagster").rsplit("/", 1)[1]}.items():
        monkeypatch.setenv(var, value)
    code, out, err = doctor(capsys)
    assert (code, err) == (0, []), err
    assert f"ledger: OK (postgresql+psycopg2://onepath:***@127.0.0.1:{postgres.port}/doctor_ledger)" in out
    assert f"dataset snapshots: OK (s3://{bucket}/data)" in out and f"inference logs: OK (s3://{bucket}/logs)" in out
    assert f"app releases: OK (s3://{bucket}/rel/releases/apps)" in out
    assert f"outcomes: OK (s3://{bucket}/onepath)" in out and f"drift reports: OK (s3://{bucket}/onepath)" in out
    assert all(postgres.password not in line for line in out)

    monkeypatch.setenv("ONEPATH_LEDGER_URL", postgres.url("doctor_ledger").replace(postgres.password, "wrong"))
    monkeypatch.setenv("ONEPATH_DATA_URL", "s3://no-such-bucket-here/data")
    monkeypatch.setenv("ONEPATH_RELEASES_URL", "s3://no-such-releases-bucket/rel")
    monkeypatch.setenv("ONEPATH_OUTCOMES_URL", "s3://no-such-bucket-here/onepath")
    monkeypatch.setenv("ONEPATH_WITNESS_SOCKET", str(home / "nobody.sock"))
    code, out, err = doctor(capsys)
    assert code == 1
    by_store = {line.split(":")[0]: line for line in err}
    assert set(by_store) == {"ledger", "dataset snapshots", "app releases", "outcomes", "witness"}, err
    assert "s3://no-such-releases-bucket/rel" in by_store["app releases"] and "NoSuchBucket" in by_store["app releases"]
    assert by_store["ledger"].startswith(f"ledger: postgresql+psycopg2://onepath:***@127.0.0.1:{postgres.port}/"
                                         "doctor_ledger does not answer (")
    assert "password authentication failed" in by_store["ledger"] and "ONEPATH_LEDGER_URL" in by_store["ledger"]
    assert "s3://no-such-bucket-here/data" in by_store["dataset snapshots"] and "NoSuchBucket" in by_store[
        "dataset snapshots"]
    assert by_store["outcomes"].startswith("outcomes: cannot list s3://no-such-bucket-here/onepath/") and (
        "NoSuchBucket" in by_store["outcomes"] and "AWS_ACCESS_KEY_ID" in by_store["outcomes"])
    assert "onepath witness serve" in by_store["witness"]
    for line in err:
        assert postgres.password not in line and "testing-secret" not in line and "wrong" not in line, line
    assert "mlflow: OK" in "\n".join(out) and "dagster instance: OK" in "\n".join(out)


def test_an_mlflow_server_that_does_not_answer_is_named_without_its_token(home: Path, monkeypatch, capsys) -> None:
    from tests.stores import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ci:s3cr3t-token@127.0.0.1:{free_port()}")
    code, out, err = doctor(capsys)
    (line,) = [line for line in err if line.startswith("mlflow tracking store:")]
    assert code == 1 and "s3cr3t-token" not in "\n".join(out + err), err
    assert line.startswith("mlflow tracking store: http://ci:***@127.0.0.1:") and "does not answer" in line, line
