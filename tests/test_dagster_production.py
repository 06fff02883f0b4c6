"""The Dagster instance on a real PostgreSQL 15 (tests/stores.py), chosen by the ONEPATH_DAGSTER_PG_* settings alone:
the dagster.yaml onepath writes names the variables and holds no password, runs and their events are rows in
PostgreSQL that another process sees, the run queue and the promotion pools are in force, and a store that does
not answer is one line naming it and its address. The embedded default is the file it always was."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import dagster as dg
import dagster_postgres
import pytest
import sqlalchemy as sa
import yaml

from platform_defs.dagster_instance import EMBEDDED_YAML, ensure_instance, production_yaml, written_by_onepath
from platform_defs.doctor import check_dagster_instance
from platform_defs.settings import DAGSTER_PG_VARS, SettingsError, dagster_postgres_from_env, load_settings
from platform_defs.specs import promotion_pool
from tests.stores import free_port

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 120.0


def wait_for(condition, what: str, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {deadline:.0f} s")


@pytest.fixture(scope="module")
def dagster_db(postgres) -> dict[str, str]:
    """Its own database on the session's server, as the five ONEPATH_DAGSTER_PG_* variables."""
    url = sa.make_url(postgres.create_database("dagster_prod"))
    return {"ONEPATH_DAGSTER_PG_HOST": url.host, "ONEPATH_DAGSTER_PG_PORT": str(url.port),
            "ONEPATH_DAGSTER_PG_USER": url.username, "ONEPATH_DAGSTER_PG_PASSWORD": url.password,
            "ONEPATH_DAGSTER_PG_DB": url.database}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home of its own, no Dagster PG setting inherited from the shell."""
    monkeypatch.setenv("ONEPATH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster_home"))
    for var in (*DAGSTER_PG_VARS, "ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


@pytest.fixture
def production(home: Path, dagster_db: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """``home`` with the production settings in the environment and onepath's dagster.yaml written; its path."""
    for var, value in dagster_db.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS", "3")
    return ensure_instance(load_settings())


@pytest.fixture
def instance(production: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.get() as inst:  # $DAGSTER_HOME/dagster.yaml, as the webserver and daemon load it
        yield inst


def test_the_production_file_names_the_variables_and_holds_no_password(production: Path, dagster_db):
    text = production.read_text()
    assert dagster_db["ONEPATH_DAGSTER_PG_PASSWORD"] not in text
    for var in DAGSTER_PG_VARS:
        assert f"env: {var}" in text
    assert dagster_db["ONEPATH_DAGSTER_PG_HOST"] not in text and dagster_db["ONEPATH_DAGSTER_PG_PORT"] not in text
    assert "max_concurrent_runs: 3" in text  # the one value in it: the run queue's limit, from the setting
    assert stat.S_IMODE(production.stat().st_mode) == 0o600
    assert written_by_onepath(text) == "production"


def test_a_run_and_its_events_are_rows_in_postgresql_that_another_host_sees(instance, dagster_db, production):
    assert isinstance(instance.run_storage, dagster_postgres.PostgresRunStorage)
    assert isinstance(instance.event_log_storage, dagster_postgres.PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, dagster_postgres.PostgresScheduleStorage)

    @dg.asset
    def tiny() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"rows": 3})

    result = dg.materialize([tiny], instance=instance)
    assert result.success
    run_id = result.run_id

    url = sa.URL.create("postgresql+psycopg2", username=dagster_db["ONEPATH_DAGSTER_PG_USER"],
                        password=dagster_db["ONEPATH_DAGSTER_PG_PASSWORD"], host=dagster_db["ONEPATH_DAGSTER_PG_HOST"],
                        port=int(dagster_db["ONEPATH_DAGSTER_PG_PORT"]), database=dagster_db["ONEPATH_DAGSTER_PG_DB"])
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            status = conn.execute(sa.text("select status from runs where run_id = :r"), {"r": run_id}).scalar_one()
            kinds = set(conn.execute(sa.text("select dagster_event_type from event_logs where run_id = :r"),
                                     {"r": run_id}).scalars())
            # schedule storage is there too: its tables were created in the same database
            schedules = conn.execute(sa.text("select to_regclass('public.instigators')")).scalar_one()
    finally:
        engine.dispose()
    assert status == "SUCCESS"
    # (Dagster stores the run start and success under their old names, PIPELINE_*)
    assert {"PIPELINE_START", "STEP_START", "ASSET_MATERIALIZATION", "PIPELINE_SUCCESS"} <= kinds
    assert schedules == "instigators"

    # another host: a process of its own with only DAGSTER_HOME and the variables, loading the same file
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEPATH_DAGSTER_")}
    env.update(dagster_db, DAGSTER_HOME=str(production.parent), PYTHONPATH=str(ROOT))
    code = ("import sys, dagster as dg\n"
            "with dg.DagsterInstance.get() as i:\n"
            "    run = i.get_run_by_id(sys.argv[1])\n"
            "    mat = i.get_latest_materialization_event(dg.AssetKey('tiny'))\n"
            "    print(run.status.value, mat.run_id, mat.asset_materialization.metadata['rows'].value)\n")
    out = subprocess.run([sys.executable, "-c", code, run_id], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SUCCESS", run_id, "3"]

    # and without the variables that host cannot load the instance at all (fails closed, no sqlite fallback)
    env.pop("ONEPATH_DAGSTER_PG_PASSWORD")
    out = subprocess.run([sys.executable, "-c", code, run_id], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0 and "ONEPATH_DAGSTER_PG_PASSWORD" in out.stderr


def test_the_run_queue_and_the_pools_default_limit_are_configured(instance):
    assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
    config = instance.get_concurrency_config()
    assert config.run_queue_config.max_concurrent_runs == 3  # ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS
    assert config.pool_config.default_pool_limit == 1
    assert config.pool_config.pool_granularity.value == "op"
    info = instance.event_log_storage.get_concurrency_info(promotion_pool("fraud_scoring", "prod"))
    assert info.limit == 1 and info.using_default_limit  # a promotion pool with no limit of its own: 1


def test_two_runs_in_one_promotion_pool_do_not_run_their_steps_together(instance, production):
    """Two hosts (two instance objects) materialize two assets of the same promotion pool: the second step waits
    in PostgreSQL's pending list until the first one's slot is free, and only then runs."""
    pool = promotion_pool("fraud_scoring", "staging")
    first_running, release, second_running = threading.Event(), threading.Event(), threading.Event()

    @dg.asset(pool=pool)
    def first_promotion() -> None:
        first_running.set()
        assert release.wait(DEADLINE), "the test never let the first promotion finish"

    @dg.asset(pool=pool)
    def second_promotion() -> None:
        second_running.set()

    results: dict[str, dg.ExecuteInProcessResult] = {}
    with dg.DagsterInstance.get() as other_host:
        one = threading.Thread(target=lambda: results.update(first=dg.materialize([first_promotion], instance=instance)))
        two = threading.Thread(target=lambda: results.update(second=dg.materialize([second_promotion],
                                                                                   instance=other_host)))
        one.start()
        try:
            assert first_running.wait(DEADLINE)
            info = instance.event_log_storage.get_concurrency_info(pool)
            assert info.limit == 1 and info.active_slot_count == 1
            two.start()
            wait_for(lambda: instance.event_log_storage.get_concurrency_info(pool).pending_step_count == 1,
                     "the second promotion's step queued for the pool")
            assert not second_running.is_set()  # the first still holds the pool's only slot
        finally:
            release.set()
            one.join(DEADLINE)
            if two.ident is not None:  # started
                two.join(DEADLINE)
    assert results["first"].success and results["second"].success and second_running.is_set()
    assert instance.event_log_storage.get_concurrency_info(pool).active_slot_count == 0


def test_every_environment_asset_has_its_own_promotion_pool():
    from platform_defs.factories import build_all
    from platform_defs.loader import load_organisation
    from platform_defs.policy import load_policy
    from platform_defs.specs import endpoint_asset_name

    policy = load_policy()
    org = load_organisation(policy=policy)
    pools: dict[str, str | None] = {}
    for a in build_all(org, ROOT / ".onepath-unused", policy):
        if isinstance(a, dg.AssetsDefinition):
            for key in a.keys:
                pools[key.to_user_string()] = a.op.pool
    envs = [(d.name, env) for kind in ("endpoint", "app") for d in org.of_kind(kind) for env in d.environments]
    assert envs
    for name, env in envs:
        assert pools[endpoint_asset_name(name, env)] == f"promotion.{name}.{env}"
    assert {k for k, p in pools.items() if p} == {endpoint_asset_name(n, e) for n, e in envs}  # nothing else pooled


# -- ensure_instance never takes a file that is not its own ---------------------------------------------------------


def test_the_embedded_default_is_unchanged(home: Path):
    path = ensure_instance(load_settings())
    assert path.read_text() == EMBEDDED_YAML
    assert set(yaml.safe_load(EMBEDDED_YAML)) == {"telemetry", "run_monitoring", "sensors"}  # Dagster's sqlite defaults
    with dg.DagsterInstance.get() as inst:
        assert type(inst.run_storage).__name__ == "SqliteRunStorage"
        assert inst.get_concurrency_config().pool_config.default_pool_limit is None  # pools unlimited here


def test_onepaths_embedded_file_becomes_the_production_one_and_back_is_refused(home, dagster_db, monkeypatch):
    path = ensure_instance(load_settings())
    assert path.read_text() == EMBEDDED_YAML
    for var, value in dagster_db.items():
        monkeypatch.setenv(var, value)
    ensure_instance(load_settings())
    assert path.read_text() == production_yaml(load_settings().dagster_pg)
    monkeypatch.setenv("ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS", "7")  # still onepath's file: follows the setting
    ensure_instance(load_settings())
    assert "max_concurrent_runs: 7  #" in path.read_text()
    written = path.read_text()
    for var in DAGSTER_PG_VARS:  # a host that lost its variables must not fall back to a sqlite instance of its own
        monkeypatch.delenv(var)
    with pytest.raises(SettingsError, match="ONEPATH_DAGSTER_PG_. are not set here"):
        ensure_instance(load_settings())
    assert path.read_text() == written


@pytest.mark.parametrize("text", [
    "telemetry:\n  enabled: false\n",  # an operator's own file
    None,  # onepath's production file, edited by hand
])
def test_a_file_that_is_not_onepaths_is_never_overwritten(home, dagster_db, monkeypatch, text):
    for var, value in dagster_db.items():
        monkeypatch.setenv(var, value)
    settings = load_settings()
    path = settings.dagster_home / "dagster.yaml"
    settings.ensure_dirs()
    text = text or production_yaml(settings.dagster_pg) + "compute_logs:\n  module: mine\n"
    path.write_text(text)
    ensure_instance(settings)
    assert path.read_text() == text
    for var in DAGSTER_PG_VARS:
        monkeypatch.delenv(var)
    ensure_instance(load_settings())  # nor by the embedded settings
    assert path.read_text() == text


# -- settings ----------------------------------------------------------------------------------------------------


def test_some_but_not_all_variables_is_one_line_naming_the_missing_ones(dagster_db):
    partial = {k: v for k, v in dagster_db.items() if k != "ONEPATH_DAGSTER_PG_DB"}
    with pytest.raises(SettingsError) as err:
        dagster_postgres_from_env(partial)
    line = str(err.value)
    assert "\n" not in line and "ONEPATH_DAGSTER_PG_DB" in line and dagster_db["ONEPATH_DAGSTER_PG_PASSWORD"] not in line
    with pytest.raises(SettingsError, match="ONEPATH_DAGSTER_PG_PORT must be a port number"):
        dagster_postgres_from_env({**dagster_db, "ONEPATH_DAGSTER_PG_PORT": "54x"})
    with pytest.raises(SettingsError, match="ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS"):
        dagster_postgres_from_env({**dagster_db, "ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS": "0"})
    pg = dagster_postgres_from_env(dagster_db)
    assert dagster_db["ONEPATH_DAGSTER_PG_PASSWORD"] not in repr(pg) + pg.address
    assert dagster_postgres_from_env({}) is None


def test_onepath_says_a_bad_setting_in_one_line(home, dagster_db):
    env = {k: v for k, v in os.environ.items()}
    env.update({k: v for k, v in dagster_db.items() if k != "ONEPATH_DAGSTER_PG_USER"}, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "platform_defs.cli", "up", "--no-mlflow-ui"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "onepath: ONEPATH_DAGSTER_PG_HOST, ONEPATH_DAGSTER_PG_PORT, ONEPATH_DAGSTER_PG_PASSWORD, ONEPATH_DAGSTER_PG_DB "
        "are set but ONEPATH_DAGSTER_PG_USER is not: the Dagster instance on PostgreSQL needs all five "
        "ONEPATH_DAGSTER_PG_* variables (or none, for the embedded instance)"]


# -- doctor ---------------------------------------------------------------------------------------------------------


def _settings_with(monkeypatch, values: dict[str, str]):
    for var, value in values.items():
        monkeypatch.setenv(var, value)
    return load_settings()


def test_doctor_passes_a_store_that_answers(home, dagster_db, monkeypatch):
    assert check_dagster_instance(load_settings()) is None  # embedded: nothing to reach
    assert check_dagster_instance(_settings_with(monkeypatch, dagster_db)) is None


@pytest.mark.parametrize("change, fix", [
    ({"ONEPATH_DAGSTER_PG_PORT": None}, "check that PostgreSQL runs there and ONEPATH_DAGSTER_PG_HOST / ONEPATH_DAGSTER_PG_PORT"),
    ({"ONEPATH_DAGSTER_PG_PASSWORD": "not-the-password"}, "check ONEPATH_DAGSTER_PG_USER and ONEPATH_DAGSTER_PG_PASSWORD"),
    ({"ONEPATH_DAGSTER_PG_DB": "no_such_db"}, "create the database or fix ONEPATH_DAGSTER_PG_DB"),
])
def test_doctor_names_a_store_that_does_not_answer_in_one_line_without_the_password(home, dagster_db, monkeypatch,
                                                                                   change, fix):
    values = {**dagster_db, **{k: v or str(free_port()) for k, v in change.items()}}
    settings = _settings_with(monkeypatch, values)
    line = check_dagster_instance(settings)
    assert line is not None and "\n" not in line
    address = (f"{values['ONEPATH_DAGSTER_PG_USER']}@{values['ONEPATH_DAGSTER_PG_HOST']}:"
               f"{values['ONEPATH_DAGSTER_PG_PORT']}/{values['ONEPATH_DAGSTER_PG_DB']}")
    assert line.startswith(f"dagster instance: PostgreSQL at {address} does not answer (")
    assert line.endswith(fix)
    assert dagster_db["ONEPATH_DAGSTER_PG_PASSWORD"] not in line and values["ONEPATH_DAGSTER_PG_PASSWORD"] not in line


def test_doctor_names_an_instance_file_the_settings_do_not_describe(home, dagster_db, monkeypatch):
    settings = _settings_with(monkeypatch, dagster_db)
    ensure_instance(settings)
    for var in DAGSTER_PG_VARS:
        monkeypatch.delenv(var)
    line = check_dagster_instance(load_settings())
    assert line is not None and "keeps it on PostgreSQL but ONEPATH_DAGSTER_PG_* are not set" in line
    (settings.dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    line = check_dagster_instance(_settings_with(monkeypatch, dagster_db))
    assert line is not None and "is not onepath's" in line and settings.dagster_pg.address in line
