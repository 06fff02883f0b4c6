"""MLflow in the production profile: tracking and registry on a real PostgreSQL server, artifacts in moto's S3 on
loopback, chosen with settings only (MLFLOW_TRACKING_URI, ONEPATH_MLFLOW_ARTIFACTS and the standard AWS / MLflow S3
variables); the embedded default's server command line stays what it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.stores import free_port

MODEL = "prod_scoring"


@pytest.fixture(scope="module")
def readied_template(postgres) -> str:
    """The name of a database whose MLflow tables ``ready_store`` made (once a module: MLflow's migrations take
    a while on PostgreSQL); a test that does not watch them being made starts from a copy of it."""
    import sqlalchemy as sa

    from resources.mlflow_registry import ready_store

    name = f"mlflow_template_{uuid.uuid4().hex[:8]}"
    ready_store(postgres.create_database(name), "s3://template-bucket/mlflow")
    engine = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:  # a template must have no sessions: MLflow's pooled ones here are done with
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                         {"d": name})
    finally:
        engine.dispose()
    return name


def _copy_of(postgres, template: str, name: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(postgres.url(), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    finally:
        engine.dispose()
    return postgres.url(name)


@pytest.fixture
def production(request, postgres, moto_s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A production setting of MLflow: its own PostgreSQL database and S3 bucket, given as environment variables
    only, and the settings onepath reads from them (home in ``tmp_path``). The database is empty, or with
    ``@pytest.mark.parametrize("production", ["readied"], indirect=True)`` a copy of ``readied_template``."""
    from platform_defs.settings import load_settings

    tag = uuid.uuid4().hex[:8]
    if getattr(request, "param", None) == "readied":
        url = _copy_of(postgres, request.getfixturevalue("readied_template"), f"mlflow_{tag}")
        _rows(url, "UPDATE experiments SET artifact_location = :a WHERE name = 'Default'",
              a=f"s3://mlflow-{tag}/mlflow/0")
    else:
        url = postgres.create_database(f"mlflow_{tag}")
    bucket = f"mlflow-{tag}"
    moto_s3.client("s3").create_bucket(Bucket=bucket)
    env = {"MLFLOW_TRACKING_URI": url, "ONEPATH_MLFLOW_ARTIFACTS": f"s3://{bucket}/mlflow/",
           "ONEPATH_HOME": str(tmp_path / "home"), "MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint_url,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = load_settings().ensure_dirs()
    return {"settings": settings, "url": url, "bucket": bucket, "s3": moto_s3.client("s3"), "password": postgres.password}


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _rows(url: str, sql: str, **params) -> list[tuple]:
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _small_model():
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(7)
    X = pd.DataFrame(rng.normal(size=(200, 3)), columns=["income", "debt", "tenure"])
    y = (X["income"] - X["debt"] > 0).astype(int)
    return LogisticRegression().fit(X, y), X


def test_settings_put_mlflow_on_postgresql_and_s3_and_refuse_another_scheme(production, monkeypatch) -> None:
    from platform_defs.settings import load_settings
    from platform_defs.wiring import build_resources

    s = production["settings"]
    assert s.mlflow_artifacts == f"s3://{production['bucket']}/mlflow"
    assert build_resources(s)["mlflow"].artifact_root == s.mlflow_artifacts
    assert not s.mlflow_artifact_root.exists()  # no local artifact folder is made for an S3 root
    monkeypatch.setenv("ONEPATH_MLFLOW_ARTIFACTS", "gs://bucket/x")
    with pytest.raises(ValueError, match=r"^ONEPATH_MLFLOW_ARTIFACTS='gs://bucket/x': expected a local folder or s3://"):
        load_settings()
    monkeypatch.setenv("ONEPATH_MLFLOW_ARTIFACTS", "s3:///no-bucket")
    with pytest.raises(ValueError, match="ONEPATH_MLFLOW_ARTIFACTS"):
        load_settings()


def test_the_definitions_hold_every_store_credential_as_an_env_var(postgres, monkeypatch) -> None:
    """What the Definitions give Dagster, which shows a resource's plain values in the UI (no login): the store
    URLs with a password and the platform key are ``dg.EnvVar``, read when a run starts; the CLI's are values."""
    import dagster as dg

    from platform_defs.settings import load_settings
    from platform_defs.wiring import build_resources

    url = postgres.url("postgres")
    for var in ("MLFLOW_TRACKING_URI", "ONEPATH_LEDGER_URL"):
        monkeypatch.setenv(var, url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("ONEPATH_PLATFORM_KEY", "-----BEGIN PRIVATE KEY-----not shown-----END PRIVATE KEY-----")
    settings = load_settings()
    defs = build_resources(settings, secrets_from_env=True)
    mlflow, ledger = defs["mlflow"], defs["ledger"]
    assert isinstance(mlflow.tracking_uri, dg.EnvVar) and mlflow.tracking_uri.env_var_name == "MLFLOW_TRACKING_URI"
    assert mlflow.registry_uri is None  # defaults to the tracking store: no second copy of the URL
    assert isinstance(ledger.location, dg.EnvVar) and isinstance(ledger.platform_key, dg.EnvVar)
    assert postgres.password not in repr(defs) and "not shown" not in repr(defs)

    monkeypatch.setenv("MLFLOW_REGISTRY_URI", postgres.url("template1"))  # a registry of its own: its variable
    registry = build_resources(load_settings(), secrets_from_env=True)["mlflow"].registry_uri
    assert isinstance(registry, dg.EnvVar) and registry.env_var_name == "MLFLOW_REGISTRY_URI"
    cli = build_resources(load_settings())["mlflow"]
    assert (cli.tracking_uri, cli.registry_uri) == (url, postgres.url("template1"))


@pytest.mark.parametrize("production", ["readied"], indirect=True)
def test_a_model_logged_registered_aliased_and_loaded_lives_in_postgresql_and_the_bucket(production,
                                                                                         tmp_path) -> None:
    """The platform's own MlflowRegistry (as wiring builds it from the settings) on PostgreSQL + S3: a version
    logged, registered, tagged and aliased is rows in MLflow's PostgreSQL tables and objects in the bucket, with
    nothing under a local folder; it loads back by models:/ URI and by alias, and its digest verifies."""
    import mlflow.pyfunc

    from platform_defs.wiring import build_resources
    from resources.artifact_digest import folder_digest

    s, url, bucket, s3 = (production[k] for k in ("settings", "url", "bucket", "s3"))
    registry = build_resources(s)["mlflow"]
    cwd_before = {p: (Path.cwd() / p).exists() for p in ("mlruns", "mlartifacts")}
    est, X = _small_model()
    note = tmp_path / "reference.txt"
    note.write_text("reference sample\n")
    tags = {"onepath.track": "ml-standard", "onepath.data_hash": "ab" * 32}
    reg = registry.log_and_register(model_name=MODEL, estimator=est, X_example=X, y_pred_example=est.predict(X),
                                    metrics={"roc_auc": 0.91}, params={"C": 1.0}, tags=tags,
                                    experiment=f"onepath/{MODEL}", artifacts={"onepath": str(note)})
    registry.set_alias(MODEL, "staging", reg.version)
    assert registry.aliases(MODEL) == {"staging": reg.version}
    assert registry.latest_version(MODEL) == reg.version == "1"
    assert {k: registry.get_version(MODEL, reg.version).tags[k] for k in tags} == tags

    # the artifacts are objects under <root>/<experiment name>, and nothing was written to a local folder
    exp = registry.client().get_experiment_by_name(f"onepath/{MODEL}")
    assert exp.artifact_location == f"s3://{bucket}/mlflow/onepath/{MODEL}"
    keys = _keys(s3, bucket, f"mlflow/onepath/{MODEL}/")
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("/model.skops") for k in keys), keys
    assert any(k.endswith(f"{reg.run_id}/artifacts/onepath/reference.txt") for k in keys), keys
    local = [p for p in (tmp_path / "home").rglob("*") if p.is_file()]
    assert local == [], local  # the home holds no MLflow file (no store, no artifact)
    assert {p: (Path.cwd() / p).exists() for p in cwd_before} == cwd_before

    # the runs, the version, its tags and alias are rows in MLflow's own tables in PostgreSQL
    assert _rows(url, "SELECT artifact_uri FROM runs WHERE run_uuid = :r", r=reg.run_id) == [
        (f"s3://{bucket}/mlflow/onepath/{MODEL}/{reg.run_id}/artifacts",)]
    assert _rows(url, "SELECT version, run_id FROM model_versions WHERE name = :n", n=MODEL) == [(1, reg.run_id)]
    assert _rows(url, "SELECT alias, version FROM registered_model_aliases WHERE name = :n", n=MODEL) == [
        ("staging", 1)]
    assert set(_rows(url, "SELECT key, value FROM model_version_tags WHERE name = :n", n=MODEL)) >= set(tags.items())

    # loaded back: the platform's cached copy (by models:/ URI) and MLflow's own loader by alias agree
    copy = registry.download(MODEL, reg.version)
    assert copy.is_relative_to(Path(registry.cache_dir))
    assert registry.fetch_verified(MODEL, reg.version, folder_digest(copy)) == copy
    expected = est.predict(X).tolist()
    assert mlflow.pyfunc.load_model(str(copy)).predict(X).tolist() == expected
    assert mlflow.pyfunc.load_model(f"models:/{MODEL}@staging").predict(X).tolist() == expected
    assert registry.run_artifact(reg.run_id, "onepath/reference.txt", tmp_path / "dl").read_text() == note.read_text()


def test_two_processes_ready_a_new_postgresql_store_at_once(production) -> None:
    """The first use of an empty PostgreSQL store by two processes at once (the daemon and a notebook): both
    succeed (the second waits on the advisory lock and finds the tables), and there is one Default experiment."""
    s, url = production["settings"], production["url"]
    code = ("import sys; from resources.mlflow_registry import ready_store; "
            "ready_store(sys.argv[1], sys.argv[2]); print('ready')")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code, url, s.mlflow_artifacts], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert _rows(url, "SELECT name, artifact_location FROM experiments") == [
        ("Default", f"s3://{production['bucket']}/mlflow/0")]


def test_the_embedded_mlflow_server_command_line_is_unchanged(settings) -> None:
    from platform_defs.cli import mlflow_server_command

    argv, env = mlflow_server_command(settings, 5000)
    assert argv == [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                    settings.mlflow_tracking_uri, "--default-artifact-root", settings.mlflow_artifact_root.as_uri(),
                    "--host", "127.0.0.1", "--port", "5000", "--workers", "1"]
    assert env == {}


@pytest.mark.parametrize("production", ["readied"], indirect=True)
def test_the_server_onepath_starts_for_production_proxies_artifacts_into_the_bucket(production, tmp_path,
                                                                                   monkeypatch) -> None:
    """The MLflow server command line `onepath up` builds for PostgreSQL + S3 runs a real `mlflow server`; a client
    that has only its http URI (no S3 endpoint or credentials) logs an artifact that lands in the bucket, and a
    run that is a row in PostgreSQL. The store's password is in no command line."""
    import httpx
    from mlflow import MlflowClient

    from platform_defs.cli import mlflow_server_command
    from platform_defs.wiring import build_resources

    s, url, bucket, s3 = (production[k] for k in ("settings", "url", "bucket", "s3"))
    port = free_port()
    argv, server_env = mlflow_server_command(s, port)
    assert "--default-artifact-root" not in argv
    assert argv[argv.index("--artifacts-destination") + 1] == f"s3://{bucket}/mlflow" and "--serve-artifacts" in argv
    assert production["password"] not in " ".join(argv) and server_env == {"MLFLOW_BACKEND_STORE_URI": url}
    build_resources(s)["mlflow"].ready()  # as `onepath up` does before it starts the server
    log = tmp_path / "mlflow-server.log"
    with open(log, "ab") as out:
        server = subprocess.Popen(argv, env={**os.environ, **server_env}, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert server.poll() is None, f"mlflow server exited {server.returncode}: {log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        # a few seconds on a quiet machine; the deadline is generous for a loaded CI host (it imports MLflow twice)
        wait_for("the mlflow server answering /health", answers, seconds=120, poll=0.2)
        assert production["password"] not in Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()

        # the client knows the server only: no S3 endpoint, no AWS credentials, no database
        for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
            monkeypatch.delenv(var)
        client = MlflowClient(tracking_uri=base)
        exp_id = client.create_experiment("through-the-server")
        assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
        run = client.create_run(exp_id)
        note = tmp_path / "note.txt"
        note.write_text("proxied to S3\n")
        client.log_artifact(run.info.run_id, str(note), artifact_path="docs")
        client.set_terminated(run.info.run_id)

        key = next(k for k in _keys(s3, bucket, "mlflow/") if k.endswith(f"{run.info.run_id}/artifacts/docs/note.txt"))
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == note.read_bytes()
        got = client.download_artifacts(run.info.run_id, "docs/note.txt", str(tmp_path / "back"))
        assert Path(got).read_bytes() == note.read_bytes()
        assert _rows(url, "SELECT status FROM runs WHERE run_uuid = :r", r=run.info.run_id) == [("FINISHED",)]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)


def test_an_unreachable_postgresql_store_is_one_line_naming_it_without_its_password(tmp_path) -> None:
    from resources.mlflow_registry import MlflowRegistry

    url = f"postgresql+psycopg2://onepath:hunter2-secret@127.0.0.1:{free_port()}/mlflow"
    registry = MlflowRegistry(tracking_uri=url, artifact_root="s3://bucket/mlflow", cache_dir=str(tmp_path / "c"))
    with pytest.raises(RuntimeError) as err:
        registry.ready()
    message = str(err.value)
    assert message.startswith("MLflow store postgresql+psycopg2://onepath:***@127.0.0.1:") and "/mlflow: cannot connect" in message
    assert "hunter2" not in message and "\n" not in message
