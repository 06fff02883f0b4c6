"""Declarations reload while the platform runs: a real `onepath up` with its own declarations folder;
adding a declaration shows it in the UI with no restart, breaking one leaves it (and what depends on it)
out with its error on the `declarations` asset and its failing check while the rest stays, a sensor keeps
ticking and an endpoint deployed before keeps answering; fixing it brings it back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import _free_port_base, model_release, save_credit_model, wait_for
from tests.test_platform_up import free_port, gql

ROOT = Path(__file__).resolve().parents[1]
RETENTION = (ROOT / "assets" / "retention" / "defs.yaml").read_text()
# a second line of the retention shape, under other names
UPSELL = (RETENTION.replace(": customer_activity", ": upsell_activity").replace("churn_scoring", "upsell_scoring")
          .replace("name: churn\n", "name: upsell\n").replace("model: churn\n", "model: upsell\n"))
NODES = """{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename
  ... on PythonError { message } ... on RepositoryLocation { repositories { name
    sensors { name sensorState { ticks(limit: 1) { timestamp } } }
    assetNodes { assetKey { path } description } } } } } } } }"""
CHECK_RUNS = """query($key: AssetKeyInput!) { assetCheckExecutions(assetKey: $key, checkName: "all_declarations_load",
  limit: 5) { status evaluation { success description } } }"""


def repo(port: int) -> dict:
    entry = gql(port, NODES)["workspaceOrError"]["locationEntries"][0]
    loc = entry["locationOrLoadError"]
    assert loc["__typename"] == "RepositoryLocation", loc
    return loc["repositories"][0]


def keys(port: int) -> set[str]:
    return {"/".join(a["assetKey"]["path"]) for a in repo(port)["assetNodes"]}


def declarations_node(port: int) -> dict:
    return next(a for a in repo(port)["assetNodes"] if a["assetKey"]["path"] == ["declarations"])


def last_tick(port: int, sensor: str) -> float | None:
    s = next(s for s in repo(port)["sensors"] if s["name"] == sensor)
    ticks = s["sensorState"]["ticks"]
    return ticks[0]["timestamp"] if ticks else None


@pytest.fixture()
def running(tmp_path):
    decl = tmp_path / "declarations"
    (decl / "retention").mkdir(parents=True)
    (decl / "retention" / "defs.yaml").write_text(RETENTION)
    port = free_port()
    env = {**os.environ, "ONEPATH_HOME": str(tmp_path / "home"), "ONEPATH_UI_PORT": str(port),
           "PYTHONPATH": str(ROOT), "ONEPATH_DECLARATIONS_DIR": str(decl)}
    env.pop("DAGSTER_HOME", None)
    env.pop("ONEPATH_POLICY_FILE", None)
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "platform_defs.cli", "up", "--no-mlflow-ui"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        try:
            return "churn" in keys(port)
        except (httpx.HTTPError, AssertionError, StopIteration, IndexError, KeyError, TypeError):
            return False

    wait_for("onepath up serves its code location", up, seconds=240, poll=0.5)
    yield port, decl, tmp_path
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=90)
    log.close()


@pytest.fixture()
def endpoint(tmp_path):
    """A model endpoint serving before any declaration changes (its own local deployer)."""
    from resources.deployers.base import Target
    from resources.deployers.resource import LocalDeployerResource

    run_dir = tmp_path / "ep-run"
    deployer = LocalDeployerResource(run_dir=str(run_dir), port_base=_free_port_base(),
                                     inference_log_dir=str(run_dir / "logs"),
                                     artifact_roots=[str(tmp_path)]).deployer()
    model = save_credit_model(tmp_path / "model")
    status = deployer.deploy(Target("rl_scoring", "staging", "endpoint", None), model_release("1", model, {"model_name": "rl_model", "pii_columns": []}))
    assert status.healthy, status
    yield status.address
    deployer.stop_all()


def test_declarations_reload_while_the_platform_runs(running, endpoint):
    port, decl, tmp_path = running
    answers = lambda: httpx.get(f"{endpoint}/health", timeout=10).status_code == 200  # noqa: E731
    assert answers()
    assert "none left out" in declarations_node(port)["description"]

    # add a declaration: it appears with no restart
    (decl / "upsell").mkdir()
    written = time.monotonic()
    (decl / "upsell" / "defs.yaml").write_text(UPSELL)
    wait_for("the new declaration in the UI", lambda: {"upsell", "upsell_scoring_prod"} <= keys(port), 120, 0.2)
    seen = time.monotonic() - written
    print(f"\nadded declaration visible in the UI {seen:.1f} s after the write")
    (tmp_path / "reload_latency.txt").write_text(f"{seen:.2f}\n")

    # break it (an unknown key): it and what depends on it are left out, the rest stays
    tick_before = wait_for("a supervisor_events tick", lambda: last_tick(port, "supervisor_events"), 120, 0.5)
    written = time.monotonic()
    (decl / "upsell" / "defs.yaml").write_text(UPSELL.replace("metrics: {roc_auc: 0.65}",
                                                                   "metrics: {roc_auc: 0.65}\n    colour: red"))
    wait_for("the broken declaration left out", lambda: "upsell" not in keys(port), 120, 0.2)
    print(f"broken declaration left out {time.monotonic() - written:.1f} s after the write")
    now = keys(port)
    assert {"customer_activity", "churn", "churn_scoring_prod", "declarations"} <= now
    assert not {"upsell_scoring_staging", "upsell_scoring_prod", "upsell_activity"} & now  # depend on upsell
    desc = declarations_node(port)["description"]
    assert "declaration 'upsell' (model" in desc and "colour" in desc, desc
    assert "left out: depends on 'upsell', which is broken" in desc, desc

    def failed_check():
        runs = gql(port, CHECK_RUNS, {"key": {"path": ["declarations"]}})["assetCheckExecutions"]
        return next((r for r in runs if r["evaluation"] and not r["evaluation"]["success"]), None)

    failing = wait_for("the declarations check failing", failed_check, 240, 1.0)
    assert "declaration 'upsell'" in failing["evaluation"]["description"], failing
    wait_for("supervisor_events ticking after the reload",
             lambda: (last_tick(port, "supervisor_events") or 0) > tick_before, 120, 0.5)
    assert answers()

    # fix it: it comes back
    (decl / "upsell" / "defs.yaml").write_text(UPSELL)
    wait_for("the fixed declaration back", lambda: {"upsell", "upsell_scoring_prod"} <= keys(port), 120, 0.2)
    assert "none left out" in declarations_node(port)["description"]
    assert answers()
    log = (tmp_path / "up.log").read_text()
    assert "reloaded: 3 declarations, 3 left out: declaration 'upsell'" in log, log[-3000:]
