"""Moving an embedded installation onto the production stores: the MLflow registry (sqlite + local artifacts)
into PostgreSQL + S3 with its ids kept, on a real MLflow, a real PostgreSQL and moto's real S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from platform_defs.store_migration import MigrationRefused, copy_mlflow
from resources.artifact_digest import folder_digest
from resources.mlflow_registry import MlflowRegistry
from tests.conftest import NOT_INHERITED, ROOT
from tests.test_inventory import FEATURES


@pytest.fixture
def s3(bucket: str) -> str:
    """A fresh bucket, and the AWS variables MLflow's and onepath's clients read."""
    return bucket


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


# ---------------------------------------------------------------------------------------------------------------
# `onepath migrate --to production`: a whole embedded installation moved by the CLI


def _embedded_installation(settings, home: Path) -> dict:
    """A real embedded installation, built cheaply: the credit dataset and ONE trained model materialized through
    the platform's own definitions into a sqlite Dagster instance (ledger entries, MLflow run/version, the dataset
    snapshot, check evaluations), an alias and a tag on the version, and an endpoint's JSON-lines inference log."""
    import dataclasses

    import dagster as dg

    from platform_defs.dagster_instance import EMBEDDED_YAML
    from platform_defs.definitions import build_definitions
    from tests.conftest import isolated_settings, quick_policy

    emb = dataclasses.replace(isolated_settings(settings, home, port_offset=150), ledger_url=None, data_url=None,
                              dagster_pg=None, mlflow_artifacts_url=None, inference_log_url=None)
    (emb.dagster_home / "dagster.yaml").write_text(EMBEDDED_YAML)
    defs = build_definitions(settings=emb, policy=quick_policy())
    with dg.DagsterInstance.from_config(str(emb.dagster_home)) as instance:
        assert dg.materialize(list(defs.assets), selection=["credit_applications", "credit_risk"],
                              resources=defs.resources, instance=instance, run_config={"ops": {
                                  "credit_applications": {"config": {"params": {"rows": 1500}}}}}).success
    mlflow = defs.resources["mlflow"]
    mlflow.set_alias("credit_risk", "prod", "1")
    mlflow.client().set_model_version_tag("credit_risk", "1", "onepath.reviewed", "yes")
    log = emb.inference_log_dir / "credit_scoring" / "prod"
    log.mkdir(parents=True)
    rows = [{"ts": f"2026-11-30T10:00:0{i}.000123+00:00", "request_id": f"r{i}", "model": "credit_risk", "version": "1",
             "inputs": {"income": 1000.5 + i, "age": 30 + i, "region": "north"}, "extras": {}, "output": {"p": 0.1},
             "latency_ms": 1.5} for i in range(3)]
    (log / "2026-11-30.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                                           + b"not json\n" + b'{"ts": "2026-11-30T10:00:09')  # corrupt; unfinished
    return {"settings": emb, "rows": rows}


def _migrate(home: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform_defs.cli", "migrate", "--to", "production", *args],
                          cwd=ROOT, env={**env, "ONEPATH_HOME": str(home)}, text=True, capture_output=True,
                          timeout=600, check=False)


def _production_env(postgres, bucket: str, tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    dagster_db = f"dagster_{tag}"
    postgres.create_database(dagster_db)
    env.update({
        "PYTHONPATH": str(ROOT), "GX_ANALYTICS_ENABLED": "false",
        "ONEPATH_LEDGER_URL": postgres.create_database(f"ledger_{tag}"),
        "MLFLOW_TRACKING_URI": postgres.create_database(f"mlflow_{tag}"),
        "ONEPATH_MLFLOW_ARTIFACTS": f"s3://{bucket}/mlartifacts",
        "ONEPATH_DATA_URL": f"s3://{bucket}/data", "ONEPATH_INFERENCE_LOG_URL": f"s3://{bucket}/logs",
        "ONEPATH_DAGSTER_PG_HOST": "127.0.0.1", "ONEPATH_DAGSTER_PG_PORT": str(postgres.port),
        "ONEPATH_DAGSTER_PG_USER": "onepath", "ONEPATH_DAGSTER_PG_PASSWORD": postgres.password,
        "ONEPATH_DAGSTER_PG_DB": dagster_db,
    })
    return env


def _tables(url: str) -> list[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def _objects(bucket: str) -> list[str]:
    from resources import object_store

    return [o.uri for o in object_store.list_objects(f"s3://{bucket}")]


def _target_instance(env: dict[str, str], scratch: Path):
    """The production instance ``env`` names, opened as every process opens it: its dagster.yaml names the
    ONEPATH_DAGSTER_PG_* variables, read from this process's environment."""
    from platform_defs.settings import DAGSTER_PG_VARS, dagster_postgres_from_env
    from platform_defs.store_migration import postgres_instance

    os.environ.update({var: env[var] for var in DAGSTER_PG_VARS})
    scratch.mkdir(parents=True, exist_ok=True)
    return postgres_instance(dagster_postgres_from_env(env), scratch)


def _latest(instance, key: str) -> dict:
    import dagster as dg

    return {k: v.value for k, v in instance.get_latest_materialization_event(dg.AssetKey(key))
            .asset_materialization.metadata.items()}


def test_onepath_migrate_moves_an_embedded_installation_and_a_rerun_changes_nothing(
        tmp_path: Path, settings, postgres, s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import dagster as dg
    from mlflow import MlflowClient

    from platform_defs.settings import DAGSTER_PG_VARS

    for var in DAGSTER_PG_VARS:  # _target_instance sets them; the test's end takes them away again
        monkeypatch.setenv(var, "")

    from platform_defs.store_migration import embedded_settings, sqlite_instance
    from resources.data_store import DataStore
    from resources.inference_log_s3 import iter_rows
    from resources.ledger import Ledger

    home = tmp_path / "home"
    world = _embedded_installation(settings, home)
    emb = world["settings"]
    env = _production_env(postgres, s3, "a")

    dry = _migrate(home, env, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "ledger -> postgresql+psycopg2://onepath:***@127.0.0.1" in dry.stdout, dry.stdout
    assert "would copy 2 latest materializations, 2 check evaluations" in dry.stdout, dry.stdout
    assert "would copy 1 snapshots" in dry.stdout and "would copy 3 rows, 1 segments" in dry.stdout, dry.stdout
    for var in ("ONEPATH_LEDGER_URL", "MLFLOW_TRACKING_URI"):  # a dry run writes nothing: not even a schema
        assert _tables(env[var]) == [], var
    assert _tables(postgres.url(env["ONEPATH_DAGSTER_PG_DB"])) == []
    assert _objects(s3) == []

    done = _migrate(home, env)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert postgres.password not in out + done.stderr
    lines = {line.split(" -> ")[0]: line for line in out.splitlines() if " -> " in line}
    assert set(lines) == {"ledger", "MLflow", "dataset snapshots", "inference logs", "Dagster"}, out
    assert "copied" in lines["ledger"] and "the target verifies" in lines["ledger"], out
    assert "copied 3 rows, 1 segments; 2 corrupt or unfinished lines left out" in lines["inference logs"], out
    assert "copied 1 snapshots" in lines["dataset snapshots"], out

    # the ledger: the same entries and head, and `onepath audit verify` on the new store passes
    source = embedded_settings(emb).ledger()
    target = Ledger(env["ONEPATH_LEDGER_URL"], source.key_path)
    assert [(e.seq, e.hash) for e in target.entries()] == [(e.seq, e.hash) for e in source.entries()]
    head = source.head()
    assert head is not None and head.seq >= 1
    assert f"head #{head.seq} {head.hash}" in lines["ledger"]
    audit = subprocess.run([sys.executable, "-m", "platform_defs.cli", "audit", "verify"], cwd=ROOT, text=True,
                           env={**env, "ONEPATH_HOME": str(home)}, capture_output=True, timeout=300, check=False)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert target.verify().head_hash == head.hash

    # MLflow: run id, version, alias and tags as they were
    src_client = MlflowClient(tracking_uri=emb.mlflow_tracking_uri, registry_uri=emb.mlflow_tracking_uri)
    dst_client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    mine, theirs = src_client.get_model_version("credit_risk", "1"), dst_client.get_model_version("credit_risk", "1")
    assert (theirs.run_id, theirs.tags) == (mine.run_id, mine.tags) and theirs.tags["onepath.reviewed"] == "yes"
    assert str(dst_client.get_model_version_by_alias("credit_risk", "prod").version) == "1"
    assert dst_client.get_run(mine.run_id).info.artifact_uri.startswith(f"s3://{s3}/mlartifacts/")

    # Dagster: what the gates read, the same (the snapshot's path re-rooted to S3), and the checks' verdicts
    (tmp_path / "src-instance").mkdir()
    with sqlite_instance(emb.dagster_home, tmp_path / "src-instance") as src_inst:
        before = {k: _latest(src_inst, k) for k in ("credit_applications", "credit_risk")}
    dst_inst = _target_instance(env, tmp_path / "dst-instance")
    try:
        after = {k: _latest(dst_inst, k) for k in ("credit_applications", "credit_risk")}
        data_hash = before["credit_applications"]["data_hash"]
        assert before["credit_applications"]["path"] == str(emb.data_dir / "credit_applications" / f"{data_hash}.parquet")
        expected = {**before["credit_applications"],
                    "path": f"s3://{s3}/data/credit_applications/{data_hash}.parquet"}
        assert after["credit_applications"] == expected
        assert after["credit_risk"] == before["credit_risk"]  # model_version, mlflow_run_id, digest, ...
        assert after["credit_risk"]["mlflow_run_id"] == mine.run_id
        check = dst_inst.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey("credit_risk"),
                                                                                  "performance"))
        assert check is not None and check.event.asset_check_evaluation.passed is not None
        tags = dst_inst.get_latest_materialization_event(dg.AssetKey("credit_risk")).asset_materialization.tags
        assert tags["dagster/data_version"] == "1" and tags["onepath/migrated_from"]
        counts = {k: len(dst_inst.fetch_materializations(dg.AssetKey(k), limit=10).records)
                  for k in ("credit_applications", "credit_risk")}
    finally:
        dst_inst.dispose()

    # the files: the snapshot hashes to its name on S3 (DataStore.read checks it), the log's rows are segments
    remote = DataStore(root=f"s3://{s3}/data")
    assert [h for h, _ in remote.snapshots("credit_applications")] == [data_hash]
    assert len(remote.read("credit_applications", data_hash)) > 0
    from datetime import date

    got = list(iter_rows(f"s3://{s3}/logs/inference/credit_scoring/prod", date(2026, 11, 1)))
    assert [(r["request_id"], r["version"], r["inputs"]) for r in got] == \
        [(r["request_id"], "1", r["inputs"]) for r in world["rows"]]

    # a second run: up to date everywhere, nothing changes
    objects = _objects(s3)
    again = _migrate(home, env)
    assert again.returncode == 0, again.stderr
    for line in again.stdout.splitlines():
        if " -> " in line:
            assert "already up to date" in line, again.stdout
    assert _objects(s3) == objects
    assert [(e.seq, e.hash) for e in target.entries()] == [(e.seq, e.hash) for e in source.entries()]
    dst_inst = _target_instance(env, tmp_path / "dst-instance-2")
    try:
        assert {k: len(dst_inst.fetch_materializations(dg.AssetKey(k), limit=10).records)
                for k in ("credit_applications", "credit_risk")} == counts == {"credit_applications": 1,
                                                                               "credit_risk": 1}
    finally:
        dst_inst.dispose()

    # a platform still running is refused before anything is read
    (emb.run_dir / "up.json").write_text(json.dumps({"pid": os.getpid(), "dagster_pgid": 0}))
    running = _migrate(home, env)
    assert running.returncode == 1 and "onepath up is running" in running.stderr, running.stderr
    (emb.run_dir / "up.json").unlink()

    # foreign targets: another installation's ledger, then a Dagster instance someone else wrote: refused, one line
    # naming the store and its address (no password), exit 1, nothing written to them or to any later store
    other = tmp_path / "other"
    other.mkdir()
    foreign_url = postgres.create_database("ledger_foreign")
    foreign = Ledger(foreign_url, other / "keys" / "platform.key")
    foreign.append("test_entry", "someone-else", {"n": 1}, "tester")
    fresh = _production_env(postgres, s3, "b")
    fresh["ONEPATH_LEDGER_URL"] = foreign_url
    refused = _migrate(home, fresh)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("onepath migrate: ledger at postgresql+psycopg2://onepath:***@127.0.0.1:") and \
        "refused" in line, refused.stderr
    assert postgres.password not in refused.stdout + refused.stderr
    assert [e.subject for e in foreign.entries()] == ["someone-else"]
    assert _tables(fresh["MLFLOW_TRACKING_URI"]) == []  # the steps after the refusal never ran

    theirs_db = _production_env(postgres, s3, "c")
    theirs_inst = _target_instance(theirs_db, tmp_path / "theirs-instance")
    try:
        theirs_inst.report_runless_asset_event(dg.AssetMaterialization("credit_applications", metadata={"n": 1}))
    finally:
        theirs_inst.dispose()
    env_c = {**env, **{k: theirs_db[k] for k in theirs_db if k.startswith("ONEPATH_DAGSTER_PG_")}}
    refused = _migrate(home, env_c)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"onepath migrate: Dagster at onepath@127.0.0.1:{postgres.port}/dagster_c: refused: the Dagster instance "
        f"at onepath@127.0.0.1:{postgres.port}/dagster_c already holds a materialization of 'credit_applications'"), \
        refused.stderr
    theirs_inst = _target_instance(theirs_db, tmp_path / "theirs-instance-2")
    try:
        assert len(theirs_inst.fetch_materializations(dg.AssetKey("credit_applications"), limit=10).records) == 1
        assert not theirs_inst.has_asset_key(dg.AssetKey("credit_risk"))
    finally:
        theirs_inst.dispose()


@pytest.mark.parametrize("passed", [True, False])
def test_the_copied_dagster_state_holds_automation_as_the_source_did(passed: bool) -> None:
    """What declarative automation reads (``all_deps_blocking_checks_passed``) judges the copy as it judged the
    source: a passed blocking check lets the downstream asset run, a failed one holds it; a re-run copies
    nothing, and an instance holding an event of its own is refused with nothing written."""
    import dagster as dg

    from platform_defs.store_migration import copy_dagster

    @dg.asset(check_specs=[dg.AssetCheckSpec("quality", asset="upstream", blocking=True)])
    def upstream():
        return dg.MaterializeResult(metadata={"path": "/old/data/upstream/x.parquet", "rows": 3},
                                    check_results=[dg.AssetCheckResult(check_name="quality", passed=passed)])

    @dg.asset(deps=[upstream], automation_condition=dg.AutomationCondition.all_deps_blocking_checks_passed())
    def downstream() -> None:
        return None

    def wanted(instance) -> int:
        result = dg.evaluate_automation_conditions(defs=[upstream, downstream], instance=instance)
        return next(r.true_subset.size for r in result.results if r.key == dg.AssetKey("downstream"))

    with dg.instance_for_test() as source, dg.instance_for_test() as target, dg.instance_for_test() as theirs:
        dg.materialize([upstream], instance=source, raise_on_error=False)
        done = copy_dagster(source, target, {"/old/data": "s3://b/data"}, "target")
        assert done.counts == {"latest materializations": 1, "check evaluations": 1}
        assert wanted(target) == wanted(source) == (1 if passed else 0)
        meta = target.get_latest_materialization_event(dg.AssetKey("upstream")).asset_materialization.metadata
        assert meta["path"].value == "s3://b/data/upstream/x.parquet" and meta["rows"].value == 3
        assert copy_dagster(source, target, {"/old/data": "s3://b/data"}, "target").up_to_date
        theirs.report_runless_asset_event(dg.AssetMaterialization("other", metadata={"n": 1}))
        with pytest.raises(MigrationRefused, match="already holds a materialization of 'other' that no migration"):
            copy_dagster(source, theirs, {}, "theirs")
        assert not theirs.has_asset_key(dg.AssetKey("upstream"))


def test_snapshots_and_logs_move_as_the_readers_read_them_and_a_changed_or_foreign_target_is_refused(
        tmp_path: Path, s3: str) -> None:
    """The two file steps on moto's S3: snapshots keep their order (the ``_written`` markers) and hash to their
    names; a JSON-lines log reads back through the S3 window reader as the local reader reads it; a re-run
    writes nothing; a log file changed after its copy, and targets holding another writer's objects, are
    refused with nothing written."""
    import os as _os
    from datetime import datetime, timezone

    import pandas as pd

    from platform_defs.store_migration import copy_datasets, copy_inference_logs
    from resources.data_store import DataStore
    from resources.inference_log import read_window

    data = tmp_path / "data"
    local = DataStore(root=str(data))
    older, _ = local.write("loans", pd.DataFrame({"x": [1, 2, 3]}))
    newer, _ = local.write("loans", pd.DataFrame({"x": [4, 5]}))
    _os.utime(older, (1_700_000_000, 1_700_000_000))  # the older snapshot is older on disk too
    order = [h for h, _ in local.snapshots("loans")]
    assert copy_datasets(data, f"s3://{s3}/data").counts == {"snapshots": 2}
    remote = DataStore(root=f"s3://{s3}/data")
    assert [h for h, _ in remote.snapshots("loans")] == order
    assert all(len(remote.read("loans", h)) for h in order)
    assert copy_datasets(data, f"s3://{s3}/data").up_to_date
    DataStore(root=f"s3://{s3}/elsewhere").write("loans", pd.DataFrame({"x": [9]}))
    with pytest.raises(MigrationRefused, match="a snapshot this installation does not hold"):
        copy_datasets(data, f"s3://{s3}/elsewhere")
    assert len(_objects_under(f"s3://{s3}/elsewhere")) == 2  # its own snapshot and marker only

    logs = tmp_path / "logs"
    (logs / "scoring" / "prod").mkdir(parents=True)
    day = logs / "scoring" / "prod" / "2026-11-30.jsonl"
    lines = [{"ts": f"2026-11-30T10:00:0{i}+00:00", "request_id": f"r{i}", "model": "m", "version": v,
              "inputs": {"amount": [10, 10.5, 11][i], "n": i, "ok": True}, "extras": {}, "output": {"p": 0.5},
              "latency_ms": 2.0} for i, v in enumerate(["1", "1", "2"])]
    day.write_text("".join(json.dumps(line) + "\n" for line in lines))
    to = f"s3://{s3}/logs"
    assert copy_inference_logs(logs, to).counts == {"rows": 3, "segments": 2}  # one per version
    now = datetime(2026, 11, 30, 12, tzinfo=timezone.utc)
    for version in ("1", "2"):
        here = read_window(logs / "scoring" / "prod", version=version, columns=["amount", "n", "ok"], window_rows=10,
                           now=now)
        there = read_window(f"{to}/inference/scoring/prod", version=version, columns=["amount", "n", "ok"],
                            window_rows=10, now=now)
        assert there.frame[["request_id", "amount", "n", "ok"]].to_dict("records") == \
            here.frame[["request_id", "amount", "n", "ok"]].to_dict("records") != []
    before = _objects_under(to)
    assert copy_inference_logs(logs, to).up_to_date and _objects_under(to) == before
    with day.open("a") as f:
        f.write(json.dumps({**lines[0], "request_id": "late", "ts": "2026-11-30T11:00:00+00:00"}) + "\n")
    with pytest.raises(MigrationRefused, match="was copied from scoring/prod/2026-11-30.jsonl, which has changed"):
        copy_inference_logs(logs, to)
    assert _objects_under(to) == before
    from resources import object_store

    object_store.put_bytes(f"s3://{s3}/other/inference/scoring/prod/1/2026-11-30/"
                           f"20261130T100000000000Z-0123456789ab-000000.parquet", b"x")
    with pytest.raises(MigrationRefused, match="is not a segment of this installation's logs"):
        copy_inference_logs(logs, f"s3://{s3}/other")
    assert len(_objects_under(f"s3://{s3}/other")) == 1


def _objects_under(uri: str) -> list[str]:
    from resources import object_store

    return [o.uri for o in object_store.list_objects(uri)]


def test_outcomes_drift_reports_and_releases_move_and_a_rerun_or_a_foreign_target_is_handled(
        tmp_path: Path, s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three file steps of the later stores: outcomes join from S3 as they joined from their day files (the
    later line still wins), drift reports keep their names (what Dagster's metadata is re-rooted to), a release's
    bundle fetched on another host hashes to what the ledger recorded; a re-run writes nothing; an outcome file
    changed after its copy, and a reports or releases prefix holding another's object (also in a dry run), are
    refused with nothing written."""
    import dataclasses
    import shutil

    import pandas as pd

    from platform_defs.settings import load_settings
    from platform_defs.store_migration import STEPS
    from resources.release_store import ReleaseStore, source_hash
    from tests.test_s3_stores import _join, _outcomes_world

    monkeypatch.setenv("ONEPATH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ONEPATH_LEDGER_URL", raising=False)
    local, _, now = _outcomes_world(tmp_path, s3)  # its own copy on S3 is under onepath/: ours goes elsewhere
    source = dataclasses.replace(load_settings(), outcomes_dir=tmp_path / "outcomes",
                                 drift_reports_dir=tmp_path / "reports")
    target = dataclasses.replace(source, outcomes_url=f"s3://{s3}/moved", drift_reports_url=f"s3://{s3}/moved",
                                 releases_url=f"s3://{s3}/moved")
    steps = {s.store: s for s in STEPS}
    report = tmp_path / "reports" / "credit_scoring" / "prod" / "20261124T100000Z-v1.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html>drift</html>")
    app = tmp_path / "home" / "releases" / "apps" / "loan_portal"
    shutil.copytree(ROOT / "apps" / "loan_portal", app / "src", ignore=shutil.ignore_patterns("__pycache__"))
    digest, files = source_hash(app / "src")
    (app / "src").rename(app / f"r-{digest[:12]}")
    source.ledger().append("release_built", "loan_portal", {"version": f"r-{digest[:12]}", "content_hash": digest,
                                                            "files": files}, "dagster")

    def run(store: str, dry_run: bool = False):
        return steps[store].run(source, target, dry_run, steps[store].roots(source, target))

    assert run("outcomes", dry_run=True).counts == {"outcome files": 3} and not _objects_under(f"s3://{s3}/moved")
    assert run("outcomes").counts == {"outcome files": 3}
    moved = local.model_copy(update={"outcomes_url": f"s3://{s3}/moved"})
    a, b = _join(local, now), _join(moved, now)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.counts() == b.counts() and dict(zip(b.frame["request_id"], b.frame["label"]))["r0"] == 1
    assert run("drift reports").counts == {"drift reports": 1}
    assert steps["drift reports"].roots(source, target) == {str(tmp_path / "reports"): f"s3://{s3}/moved/drift_reports"}
    from resources import object_store

    assert object_store.get_bytes(f"s3://{s3}/moved/drift_reports/credit_scoring/prod/{report.name}") == \
        report.read_bytes()
    assert run("app releases").counts == {"releases": 1}
    fetched = ReleaseStore(tmp_path / "host-b", f"s3://{s3}/moved").fetch("loan_portal", f"r-{digest[:12]}", digest)
    assert source_hash(fetched)[0] == digest

    before = _objects_under(f"s3://{s3}/moved")
    assert all(run(store).up_to_date for store in ("outcomes", "drift reports", "app releases"))
    assert _objects_under(f"s3://{s3}/moved") == before
    with open(next((tmp_path / "outcomes" / "credit_scoring" / "prod").glob("*.jsonl")), "ab") as fh:
        fh.write(b'{"request_id": "r9", "label": 1, "observed_at": "2026-11-24T12:00:00+00:00"}\n')
    with pytest.raises(MigrationRefused, match="exists with other bytes than .*changed since it was copied"):
        run("outcomes")
    object_store.put_bytes(f"s3://{s3}/moved/drift_reports/credit_scoring/prod/theirs.html", b"x")
    with pytest.raises(MigrationRefused, match="theirs.html is not one of this installation's drift reports"):
        run("drift reports")
    assert _objects_under(f"s3://{s3}/moved") == sorted([*before, f"s3://{s3}/moved/drift_reports/credit_scoring/"
                                                                    "prod/theirs.html"])
    object_store.put_bytes(f"s3://{s3}/moved/releases/apps/loan_portal/r-000000000000.tar.gz", b"x")
    with pytest.raises(MigrationRefused, match="r-000000000000.tar.gz is not one of this installation's releases"):
        run("app releases", dry_run=True)
