"""Moving an embedded installation onto the production stores: the MLflow registry (sqlite + local artifacts)
into PostgreSQL + S3 with its ids kept, on a real MLflow, a real PostgreSQL and moto's real S3 server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from platform_defs.store_migration import MigrationRefused, copy_mlflow
from resources.artifact_digest import folder_digest
from resources.mlflow_registry import MlflowRegistry
from tests.test_inventory import FEATURES


@pytest.fixture
def s3(moto_s3, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket, and the AWS variables MLflow's and onepath's clients read."""
    for var, value in {"AWS_ENDPOINT_URL_S3": moto_s3.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint_url,
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "ONEPATH_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(var, value)
    name = f"mlflow-{uuid.uuid4().hex[:10]}"
    moto_s3.client("s3").create_bucket(Bucket=name)
    return name


def test_the_registry_moves_with_its_run_ids_versions_aliases_tags_and_artifact_bytes(
        tmp_path: Path, postgres, s3: str) -> None:
    from mlflow import MlflowClient

    from assets.credit.data import generate_credit_applications
    from assets.credit.trainer import train_credit_risk

    src_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    embedded = MlflowRegistry(tracking_uri=src_uri, registry_uri=src_uri, artifact_root=str(tmp_path / "mlartifacts"),
                              ui_url="http://127.0.0.1:5000", cache_dir=str(tmp_path / "cache"))
    df = generate_credit_applications(rows=300, seed=3)
    est = train_credit_risk(df[FEATURES], df["defaulted"], {})
    regs = [embedded.log_and_register(model_name="credit_scoring", estimator=est, X_example=df[FEATURES],
                                      y_pred_example=est.predict(df[FEATURES].head(20)), metrics={"roc_auc": 0.8},
                                      params={"seed": i}, tags={"onepath.author": "carla", "onepath.n": str(i)},
                                      experiment="onepath/credit_scoring") for i in (1, 2)]
    embedded.set_alias("credit_scoring", "prod", "1")
    digest = folder_digest(embedded.download("credit_scoring", "1"))

    target = postgres.create_database("mlflow_target")
    done = copy_mlflow(src_uri, target, tmp_path / "mlartifacts", f"s3://{s3}/mlartifacts")
    assert done.tables["runs"] == 2 and done.tables["model_versions"] == 2 and done.artifacts > 0, done
    client = MlflowClient(tracking_uri=target, registry_uri=target)
    for reg in regs:  # the same run ids, versions and tags
        run = client.get_run(reg.run_id)
        assert run.info.artifact_uri.startswith(f"s3://{s3}/mlartifacts/"), run.info.artifact_uri
        mv = client.get_model_version("credit_scoring", reg.version)
        assert mv.run_id == reg.run_id and mv.tags["onepath.author"] == "carla"
    assert str(client.get_model_version_by_alias("credit_scoring", "prod").version) == "1"
    moved = MlflowRegistry(tracking_uri=target, registry_uri=target, artifact_root=f"s3://{s3}/mlartifacts",
                           ui_url="http://127.0.0.1:5000", cache_dir=str(tmp_path / "cache-moved"))
    assert folder_digest(moved.download("credit_scoring", "1")) == digest  # from S3, byte for byte
    again = copy_mlflow(src_uri, target, tmp_path / "mlartifacts", f"s3://{s3}/mlartifacts")
    assert again.tables == {} and again.artifacts == 0  # a re-run writes nothing

    exp = client.create_experiment("after-the-move")  # the target's id sequence goes on past the copied ids
    assert int(exp) > max(int(e.experiment_id) for e in client.search_experiments() if e.name != "after-the-move")
    with pytest.raises(MigrationRefused, match="table experiments, key 2"):  # the target lives on: not touched
        copy_mlflow(src_uri, target, tmp_path / "mlartifacts", f"s3://{s3}/mlartifacts")
    other = postgres.create_database("mlflow_other")
    MlflowClient(tracking_uri=other).create_experiment("someone-else")
    with pytest.raises(MigrationRefused, match="holds other data than the source .*a target is never overwritten"):
        copy_mlflow(src_uri, other, tmp_path / "mlartifacts", f"s3://{s3}/mlartifacts")
