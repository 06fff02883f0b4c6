"""The inventory against a real world: MLflow on the session's sqlite store, the real ledger, real
endpoint and app processes on loopback (LocalProcessDeployer), ledger entries written the way the
endpoint asset writes them.

The world, built once for the module:

* ``inv_scoring`` (model ``inv_credit``): staging serves v2, prod serves v1; both recorded in the
  ledger with passing gate verdicts; prod carries a valid approval (mira) and one that does not
  verify (carla, of the owning team).
* ``inv_shadow`` (model ``inv_other``): staging was deployed v1 through the platform (recorded),
  then v2 out of band (not recorded) -> mismatch. prod was deployed v1 with no ledger entry (the
  MLflow alias says 1), then its server was stopped -> down, version from the alias.
* ``inv_portal`` (app): staging serves a release the ledger knows nothing about -> unrecorded;
  prod serves it as recorded (deploy, gate verdict without integration_tests, a code review).
* ``inv_idle`` (endpoint of ``inv_credit`` in prod only): never deployed -> not deployed; the
  model's ``prod`` alias belongs to ``inv_scoring`` as much as to it, so it is not a stand-in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from platform_defs.inventory import InventoryRow, build_inventory, build_inventory_asset
from platform_defs.loader import load_organisation
from platform_defs.policy import load_policy
from platform_defs.specs import EndpointSpec, Organisation
from platform_defs.wiring import build_resources
from resources.approvals import load_private_key, sign
from resources.deployers.base import Release, Target
from resources.deployers.local import LocalProcessDeployer
from resources.ledger import Ledger
from resources.mlflow_registry import MlflowRegistry
from tests.conftest import model_release, record_test_registration

ROOT = Path(__file__).resolve().parents[1]
DEMO_KEYS = ROOT / "assets" / "demo_identities"
FEATURES = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
            "num_open_accounts", "delinquencies_2y", "employment_type", "home_ownership", "purpose"]
HIGH_RISK = ["data_quality", "performance", "fairness", "explainability", "lineage", "drift_ready",
             "rollback_path", "approval"]

DEFS_YAML = """\
type: onepath.Dataset
attributes:
  name: inv_applications
  owner: credit-risk
  track: ml-high-risk
  generator: assets.credit.data:generate_credit_applications
  columns:
    - {name: application_id, dtype: string, role: id}
    - {name: applied_on, dtype: string, role: timestamp}
    - {name: full_name, dtype: string, pii: true}
    - {name: national_id, dtype: string, pii: true}
    - {name: email, dtype: string, pii: true}
    - {name: gender, dtype: string, protected: true}
    - {name: age_band, dtype: string, protected: true}
    - {name: annual_income, dtype: float}
    - {name: loan_amount, dtype: float}
    - {name: loan_term_months, dtype: int}
    - {name: debt_to_income, dtype: float}
    - {name: credit_history_years, dtype: float}
    - {name: num_open_accounts, dtype: int}
    - {name: delinquencies_2y, dtype: int}
    - {name: employment_type, dtype: string}
    - {name: home_ownership, dtype: string}
    - {name: purpose, dtype: string}
    - {name: defaulted, dtype: int, role: label}
---
type: onepath.Model
attributes:
  name: inv_credit
  owner: credit-risk
  track: ml-high-risk
  dataset: inv_applications
  trainer: "assets.credit.trainer:train_credit_risk"
---
type: onepath.Model
attributes:
  name: inv_other
  owner: credit-risk
  track: ml-high-risk
  dataset: inv_applications
  trainer: "assets.credit.trainer:train_credit_risk"
---
type: onepath.Endpoint
attributes:
  name: inv_scoring
  owner: credit-risk
  track: ml-high-risk
  model: inv_credit
---
type: onepath.Endpoint
attributes:
  name: inv_shadow
  owner: credit-risk
  track: ml-high-risk
  model: inv_other
---
type: onepath.Endpoint
attributes:
  name: inv_idle
  owner: credit-risk
  track: ml-high-risk
  model: inv_credit
  environments: [prod]
---
type: onepath.AppRelease
attributes:
  name: inv_portal
  owner: digital-lending
  track: app
  source: apps/loan_portal
  entrypoint: "loan_portal.main:app"
  calls: [inv_scoring]
"""


def register(mlflow: MlflowRegistry, name: str, seed: int, ledger: Ledger) -> dict[str, str]:
    """Train a real credit model and register it as the next version of ``name``, with lineage tags,
    and its registration (digest) in the ledger, as the model asset records it."""
    from assets.credit.data import generate_credit_applications
    from assets.credit.trainer import train_credit_risk
    from resources.data_store import dataframe_hash

    df = generate_credit_applications(rows=600, seed=seed)
    est = train_credit_risk(df[FEATURES], df["defaulted"], {})
    tags = {"onepath.dataset_key": "inv_applications", "onepath.data_hash": dataframe_hash(df),
            "onepath.code_hash": f"{seed:064x}", "onepath.author": "carla", "onepath.track": "ml-high-risk"}
    reg = mlflow.log_and_register(model_name=name, estimator=est, X_example=df[FEATURES],
                                  y_pred_example=est.predict(df[FEATURES].head(50)), metrics={"roc_auc": 0.8},
                                  params={}, tags=tags, experiment=f"onepath/{name}")
    entry = record_test_registration(ledger, mlflow, name, reg.version, dataset_key="inv_applications",
                                     data_hash=tags["onepath.data_hash"], code_hash=tags["onepath.code_hash"],
                                     author="carla")
    return {"version": reg.version, "digest": entry.data["digest"], **tags}


def deploy_model(deployer: LocalProcessDeployer, mlflow: MlflowRegistry, endpoint: str, env: str, model: str,
                 version: str) -> str:
    artifact = mlflow.download(model, version)
    st = deployer.deploy(Target(endpoint, env), model_release(version, artifact, config={
        "model_name": model, "pii_columns": ["full_name", "national_id", "email"]}))
    assert st.healthy and st.serving_version == version
    return st.address or ""


def record(ledger: Ledger, endpoint: str, env: str, model: str, version: str, address: str,
           previous: str | None = None) -> None:
    """What the endpoint asset writes on a successful deploy: the gate verdict, then the deploy."""
    actor = "dagster:test-inventory"
    ledger.append("gate_verdict", endpoint, {
        "model": model, "version": version, "passed": True,
        "verdicts": {c: {"passed": True, "summary": f"{c} ok"} for c in HIGH_RISK}}, actor, env=env)
    ledger.append("deploy", endpoint, {
        "model": model, "version": version, "previous_version": previous, "address": address,
        "promoted_from": None, "track": "ml-high-risk", "owner": "credit-risk", "checks": HIGH_RISK},
        actor, env=env)


def approve(ledger: Ledger, who: str, subject: str, version: str, env: str) -> None:
    """What ``onepath approve`` writes (signed with the shipped demo key), without its verification."""
    a = sign(load_private_key(DEMO_KEYS / f"{who}.key"), asset=subject, version=version, env=env,
             reason="reviewed", approver=who, run_id="", digest="", first_release=True)
    ledger.append("approval", subject, a.as_dict(), who, env=env)


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    decls = tmp_path_factory.mktemp("inv_decls")
    (decls / "inv").mkdir()
    (decls / "inv" / "defs.yaml").write_text(DEFS_YAML)
    org, policy = load_organisation(decls), load_policy()
    resources = build_resources(settings)
    mlflow, ledger = resources["mlflow"], resources["ledger"].ledger()
    deployer = resources["deployer_local"].deployer()
    assert isinstance(deployer, LocalProcessDeployer)

    credit = {n: register(mlflow, "inv_credit", seed, ledger) for n, seed in (("1", 11), ("2", 12))}
    other = {n: register(mlflow, "inv_other", seed, ledger) for n, seed in (("1", 21), ("2", 22))}
    assert [credit["1"]["version"], credit["2"]["version"], other["1"]["version"], other["2"]["version"]] == \
        ["1", "2", "1", "2"]
    deployed = [Target("inv_scoring", "staging"), Target("inv_scoring", "prod"), Target("inv_shadow", "staging"),
                Target("inv_shadow", "prod"), Target("inv_portal", "staging", kind="app"),
                Target("inv_portal", "prod", kind="app")]
    try:
        # inv_scoring: recorded, serving what is recorded
        addr = deploy_model(deployer, mlflow, "inv_scoring", "staging", "inv_credit", "2")
        record(ledger, "inv_scoring", "staging", "inv_credit", "2", addr)
        mlflow.set_alias("inv_credit", "staging", "2")
        approve(ledger, "mira", "inv_credit", "1", "prod")
        approve(ledger, "carla", "inv_credit", "1", "prod")
        addr = deploy_model(deployer, mlflow, "inv_scoring", "prod", "inv_credit", "1")
        record(ledger, "inv_scoring", "prod", "inv_credit", "1", addr)
        mlflow.set_alias("inv_credit", "prod", "1")
        # inv_shadow staging: recorded 1, then 2 deployed out of band
        addr = deploy_model(deployer, mlflow, "inv_shadow", "staging", "inv_other", "1")
        record(ledger, "inv_shadow", "staging", "inv_other", "1", addr)
        mlflow.set_alias("inv_other", "staging", "1")
        deploy_model(deployer, mlflow, "inv_shadow", "staging", "inv_other", "2")
        # inv_shadow prod: never in the ledger, the alias says 1, its server is stopped
        deploy_model(deployer, mlflow, "inv_shadow", "prod", "inv_other", "1")
        mlflow.set_alias("inv_other", "prod", "1")
        deployer.delete(Target("inv_shadow", "prod"))
        # inv_portal: one release deployed around the platform to both environments ...
        # built where the platform builds releases (a supervisor launches nothing from elsewhere)
        release_dir = settings.releases_dir / "apps" / "inv_portal" / "r-inventory01"
        shutil.copytree(ROOT / "apps" / "loan_portal", release_dir,
                        ignore=shutil.ignore_patterns("__pycache__", ".*"), dirs_exist_ok=True)
        for env in ("staging", "prod"):
            st = deployer.deploy(Target("inv_portal", env, kind="app"), Release("r-inventory01", str(release_dir), {
                "entrypoint": "loan_portal.main:app",
                "calls": {"CREDIT_SCORING": deployer.address(Target("inv_scoring", env))}}))
            assert st.healthy and st.serving_version == "r-inventory01"
        # ... prod through the platform: a code review, the app gate's verdict, the deploy
        approve(ledger, "rob", "inv_portal", "r-inventory01", "prod")
        ledger.append("gate_verdict", "inv_portal", {"app": "inv_portal", "version": "r-inventory01", "passed": True,
                                                     "verdicts": {c: {"passed": True, "summary": "ok"}
                                                                  for c in ("security_scan", "code_review")}},
                      "dagster:test-inventory", env="prod")
        ledger.append("deploy", "inv_portal", {"app": "inv_portal", "version": "r-inventory01",
                                               "previous_version": None, "address": st.address, "track": "app",
                                               "owner": "digital-lending", "checks": ["security_scan", "code_review"]},
                      "dagster:test-inventory", env="prod")
        yield {"org": org, "policy": policy, "mlflow": mlflow, "ledger": ledger, "deployer": deployer,
               "decls": decls, "settings": settings, "credit": credit, "other": other}
    finally:
        for t in deployed:
            deployer.delete(t)


def inventory(world, **kw) -> dict[tuple[str, str], InventoryRow]:
    rows = build_inventory(world["org"], world["policy"], world["mlflow"], world["ledger"], world["deployer"], **kw)
    return {(r.name, r.env): r for r in rows}


def test_inventory_agrees_with_what_every_server_reports(world):
    rows = inventory(world)
    assert set(rows) == {(n, e) for n in ("inv_scoring", "inv_shadow", "inv_portal") for e in ("staging", "prod")} \
        | {("inv_idle", "prod")}
    fresh = LocalProcessDeployer(world["settings"].run_dir)  # asks the servers, as after a restart
    for (name, env), r in rows.items():
        st = fresh.status(Target(name, env, kind=r.kind))
        assert (r.healthy, r.live_version, r.address) == (st.healthy, st.serving_version, st.address), (name, env)

    staging = rows[("inv_scoring", "staging")]
    deploys = world["ledger"].entries(kind="deploy", subject="inv_scoring", env="staging")
    assert staging.kind == "endpoint" and staging.model == "inv_credit"
    assert (staging.recorded_version, staging.version_source, staging.live_version) == ("2", "ledger", "2")
    assert staging.agrees is True and staging.state == "ok"
    assert staging.deployed_at == deploys[-1].ts and staging.deploy_entry == deploys[-1].seq
    assert staging.deployed_by == "dagster:test-inventory"
    assert (staging.owner, staging.track) == ("credit-risk", "ml-high-risk")
    two = world["credit"]["2"]
    assert staging.lineage == {"dataset_key": "inv_applications", "data_hash": two["onepath.data_hash"],
                               "code_hash": two["onepath.code_hash"]}
    assert staging.gate["passed"] is True and staging.gate["missing"] == []
    assert set(staging.gate["checks"]) == set(HIGH_RISK) and staging.approvals == []
    # staging's required checks exclude approval and rollback_path; prod's include them
    assert rows[("inv_scoring", "prod")].gate["missing"] == []

    prod = rows[("inv_scoring", "prod")]
    assert (prod.recorded_version, prod.live_version, prod.state) == ("1", "1", "ok")
    assert prod.lineage["data_hash"] == world["credit"]["1"]["onepath.data_hash"] != two["onepath.data_hash"]
    approvals = world["ledger"].entries(kind="approval", subject="inv_credit", env="prod")
    assert prod.approvals == [{"approver": a.actor, "approved_at": a.data["approved_at"], "reason": "reviewed",
                               "first_release": True, "ledger_entry": a.seq} for a in approvals]
    assert [a["approver"] for a in prod.approvals] == ["mira", "carla"]
    assert rows[("inv_shadow", "staging")].approvals == []  # approvals are per model, version and env


def test_a_version_served_out_of_band_is_a_mismatch(world):
    r = inventory(world)[("inv_shadow", "staging")]
    assert (r.recorded_version, r.version_source, r.live_version) == ("1", "ledger", "2")
    assert r.healthy and r.agrees is False and r.mismatch and r.state == "mismatch"
    assert r.state_text() == "MISMATCH live=2 recorded=1"
    # lineage and gate are those of the recorded version, as the ledger has them
    assert r.lineage["data_hash"] == world["other"]["1"]["onepath.data_hash"]
    assert r.gate is not None and r.gate["passed"] is True


def test_a_stopped_server_is_down_and_the_alias_stands_in_for_a_missing_deploy_entry(world):
    r = inventory(world)[("inv_shadow", "prod")]
    assert r.address is not None and not r.healthy and r.live_version is None
    assert (r.recorded_version, r.version_source, r.deploy_entry) == ("1", "mlflow_alias", None)
    assert r.agrees is None and r.state == "down" and r.state_text() == "DOWN (recorded 1)"
    assert any("MLflow alias inv_other@prod" in n for n in r.notes)


def test_app_releases_recorded_and_unrecorded(world):
    rows = inventory(world)
    staging, prod = rows[("inv_portal", "staging")], rows[("inv_portal", "prod")]
    assert staging.kind == "app" and staging.model is None and staging.lineage is None
    assert staging.healthy and staging.live_version == "r-inventory01"
    assert staging.recorded_version is None and staging.agrees is None and staging.state == "unrecorded"
    assert (prod.recorded_version, prod.version_source, prod.live_version, prod.state) == \
        ("r-inventory01", "ledger", "r-inventory01", "ok")
    assert [a["approver"] for a in prod.approvals] == ["rob"] and prod.lineage is None
    # the app track requires integration_tests in prod (not the first environment); the verdict lacks it
    assert prod.gate["passed"] is True and prod.gate["missing"] == ["integration_tests"]


def test_never_deployed_and_a_shared_alias_is_no_stand_in(world):
    r = inventory(world)[("inv_idle", "prod")]
    assert r.address is None and not r.healthy and r.recorded_version is None and r.state == "not deployed"
    assert any("shared by 2 endpoints" in n for n in r.notes)


def test_env_filter(world):
    prod = inventory(world, env="prod")
    assert set(prod) == {("inv_scoring", "prod"), ("inv_shadow", "prod"), ("inv_portal", "prod"), ("inv_idle", "prod")}
    assert inventory(world, env="qa") == {}


def test_a_server_that_accepts_but_never_answers_is_unhealthy(world):
    """A listener that never answers: the probe gives up after its timeout; the rest still answer."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)  # the kernel accepts; nobody reads
    try:
        port = silent.getsockname()[1]
        extra = EndpointSpec(name="inv_silent", owner="credit-risk", track="ml-high-risk", model="inv_other",
                             environments=["qa"], ports={"qa": port})
        org = Organisation(list(world["org"].by_name.values()) + [extra])
        rows = {(r.name, r.env): r for r in build_inventory(org, world["policy"], world["mlflow"], world["ledger"],
                                                             world["deployer"], timeout=2.0)}
        # (a timeout the real servers meet on a loaded machine: the silent one misses any timeout)
        r = rows[("inv_silent", "qa")]
        assert r.address == f"http://127.0.0.1:{port}" and not r.healthy and r.live_version is None
        assert r.recorded_version is None and r.state == "not deployed"
        assert rows[("inv_scoring", "prod")].healthy and rows[("inv_shadow", "staging")].healthy
    finally:
        silent.close()


def test_one_ledger_read_and_batched_registry_calls(world):
    calls: dict[str, int] = {}

    class CountingLedger(Ledger):
        def entries(self, *a, **kw):
            calls["ledger.entries"] = calls.get("ledger.entries", 0) + 1
            return super().entries(*a, **kw)

    class CountingClient:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            def call(*a, **kw):
                calls[name] = calls.get(name, 0) + 1
                return getattr(self.inner, name)(*a, **kw)
            return call

    class CountingRegistry(MlflowRegistry):
        def client(self):
            return CountingClient(super().client())

    ledger = world["ledger"]
    m = world["mlflow"]
    registry = CountingRegistry(tracking_uri=m.tracking_uri, registry_uri=m.registry_uri,
                                artifact_root=m.artifact_root, cache_dir=m.cache_dir)
    rows = build_inventory(world["org"], world["policy"], registry, CountingLedger(ledger.db_path, ledger.key_path),
                           world["deployer"])
    assert len(rows) == 7 and {r.recorded_version for r in rows if r.model} == {"1", "2", None}
    assert calls == {"ledger.entries": 1, "search_registered_models": 1, "search_model_versions": 1}


def run_cli(argv: list[str]) -> int:
    from platform_defs.cli import main

    return main(argv)


def test_cli_json_and_table(world, monkeypatch, capsys):
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(world["decls"]))
    assert run_cli(["inventory", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = inventory(world)
    got = {(r["name"], r["env"]): r for r in out}
    assert set(got) == set(expected)
    for key, r in expected.items():
        assert {k: got[key][k] for k in ("recorded_version", "live_version", "healthy", "agrees", "state",
                                         "address", "lineage", "deployed_at")} == \
            {k: r.as_dict()[k] for k in ("recorded_version", "live_version", "healthy", "agrees", "state",
                                         "address", "lineage", "deployed_at")}
    assert got[("inv_shadow", "staging")]["mismatch"] is True
    assert [a["approver"] for a in got[("inv_scoring", "prod")]["approvals"]] == ["mira", "carla"]

    assert run_cli(["inventory", "--env", "prod", "--json"]) == 0
    assert {r["env"] for r in json.loads(capsys.readouterr().out)} == {"prod"}

    assert run_cli(["inventory"]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("inv_shadow") and " staging " in x)
    assert "MISMATCH live=2 recorded=1" in line
    line = next(x for x in text.splitlines() if x.startswith("inv_shadow") and " prod " in x)
    assert "DOWN (recorded 1)" in line
    line = next(x for x in text.splitlines() if x.startswith("inv_scoring") and " prod " in x)
    assert "mira, carla" in line and " ok " in line
    assert "7 rows: 5 answering, 1 mismatch(es), 1 down, 1 unrecorded, 1 not deployed" in text


HEAVY = ("dagster", "mlflow", "pandas", "sklearn")


def imported(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -X importtime -m platform_defs.cli *argv`` as a fresh process: its result, and which of
    ``HEAVY`` it imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "platform_defs.cli", *argv], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, capture_output=True, text=True,
                         timeout=120)
    names = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return out, names & set(HEAVY)


def test_help_imports_nothing_heavy():
    out, heavy = imported(["--help"])
    assert out.returncode == 0 and "inventory" in out.stdout
    assert heavy == set(), f"`onepath --help` imported {sorted(heavy)}"


def test_a_fresh_inventory_reads_the_ledger_and_the_servers_only(world):
    """Where the ledger records every version (staging here: deploys and registrations), a fresh
    ``onepath inventory`` imports none of Dagster, MLflow, pandas, sklearn, and says the same as
    ``build_inventory`` with the registry."""
    out, heavy = imported(["inventory", "--env", "staging", "--json"],
                          {"ONEPATH_DECLARATIONS_DIR": str(world["decls"])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert heavy == set(), f"`onepath inventory` imported {sorted(heavy)}"
    got = {(r["name"], r["env"]): r for r in json.loads(out.stdout)}
    want = inventory(world, env="staging")
    assert set(got) == set(want)
    for key, r in want.items():
        assert got[key] == json.loads(json.dumps(r.as_dict())), key


def test_the_registry_is_asked_only_what_the_ledger_lacks(world):
    from platform_defs import inventory as inv
    from resources import mlflow_registry

    assert inv.TAG_PREFIX == mlflow_registry.TAG_PREFIX  # named twice so that the inventory imports no MLflow

    class Unasked:
        def client(self):
            raise AssertionError("the registry was asked")

    rows = build_inventory(world["org"], world["policy"], Unasked(), world["ledger"], world["deployer"],
                           env="staging")
    assert {(r.name, r.recorded_version, r.state) for r in rows} == {
        ("inv_scoring", "2", "ok"), ("inv_shadow", "1", "mismatch"), ("inv_portal", None, "unrecorded")}
    scoring = next(r for r in rows if r.name == "inv_scoring")
    assert scoring.lineage["data_hash"] == world["credit"]["2"]["onepath.data_hash"]  # the ledger's registration


def test_json_prints_what_its_help_says(world, monkeypatch, capsys):
    from platform_defs.cli_inventory import JSON_KEYS

    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(world["decls"]))
    assert run_cli(["inventory", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "print a JSON array instead of the table, one object per row with the keys " + ", ".join(JSON_KEYS) \
        in help_text
    assert run_cli(["inventory", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == 7
    assert all(isinstance(r, dict) and tuple(r) == JSON_KEYS for r in out)


def test_no_approval_required_by_the_track_says_so(world, monkeypatch, capsys):
    rows = inventory(world)
    # ml-high-risk asks an approval in prod only; the app track a code review in prod only
    assert {k: r.approval_required for k, r in rows.items()} == {
        ("inv_scoring", "staging"): False, ("inv_scoring", "prod"): True, ("inv_shadow", "staging"): False,
        ("inv_shadow", "prod"): True, ("inv_portal", "staging"): False, ("inv_portal", "prod"): True,
        ("inv_idle", "prod"): True}
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(world["decls"]))
    assert run_cli(["inventory"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def line(name: str, env: str) -> str:
        return next(x for x in lines if x.startswith(name) and f" {env} " in x)

    assert "not required by track" in line("inv_scoring", "staging")
    assert "not required by track" in line("inv_portal", "staging")
    assert "not required by track" not in line("inv_idle", "prod")  # required, and nobody approved: "-"
    assert "mira, carla" in line("inv_scoring", "prod")


@pytest.mark.parametrize("setup,argv,message", [
    ("decls", ["inventory", "--env", "qa"], "no endpoint or app has an environment 'qa' (environments: prod, staging)"),
    ("nowhere", ["inventory"], "declarations folder"),
    ("bad_policy", ["inventory"], "policy "),
    ("decls", ["inventory", "--timeout", "0"], "--timeout must be positive"),
])
def test_cli_errors_are_one_line(world, monkeypatch, capsys, tmp_path, setup, argv, message):
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(world["decls"] if setup != "nowhere" else tmp_path / "none"))
    if setup == "bad_policy":
        monkeypatch.setenv("ONEPATH_POLICY_FILE", str(tmp_path / "missing.yaml"))
    assert run_cli(argv) == 1
    err = capsys.readouterr()
    assert err.out == "" and len(err.err.splitlines()) == 1 and message in err.err, err.err
    assert err.err.startswith("onepath: ") and "Traceback" not in err.err


def test_production_inventory_asset(world):
    asset = build_inventory_asset(world["org"], world["policy"])
    spec = next(iter(asset.specs))
    assert spec.key == dg.AssetKey("production_inventory") and spec.group_name == "platform"
    assert set(spec.kinds) == {"inventory"} and not list(spec.deps)
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], resources=build_resources(world["settings"]), instance=instance)
    assert result.success
    md = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}
    assert (md["serving"], md["unhealthy"], md["mismatches"], md["total"]) == (5, 1, 1, 7)
    assert "MISMATCH live=2 recorded=1" in md["inventory"] and md["inventory"].startswith("| name | kind | env |")
    rows = {(r["name"], r["env"]): r for r in md["rows"]}
    assert rows[("inv_scoring", "staging")]["recorded_version"] == "2" and rows[("inv_scoring", "staging")]["agrees"]


def test_status_and_inventory_compare_what_serves_by_digest(world, monkeypatch, capsys):
    """A server labelled with a registered version but loaded with other content (version 1's bytes
    under the label 2, assembled around the platform) is a digest mismatch in the inventory and in
    ``onepath status``, whatever its label says; what serves its registered content is not."""
    from platform_defs.cli import _status_rows, cmd_status

    deployer, mlflow, ledger = world["deployer"], world["mlflow"], world["ledger"]
    credit = world["credit"]
    target = Target("inv_idle", "prod")
    st = deployer.deploy(target, model_release("2", mlflow.download("inv_credit", "1"), {"model_name": "inv_credit"}))
    try:
        assert st.serving_version == "2" and st.serving_digest == credit["1"]["digest"] != credit["2"]["digest"]
        ledger.append("deploy", "inv_idle", {"model": "inv_credit", "version": "2", "previous_version": None,
                                             "address": st.address, "promoted_from": None, "track": "ml-high-risk",
                                             "owner": "credit-risk", "checks": []}, "dagster:test-inventory",
                      env="prod")
        rows = inventory(world)
        bad, good = rows[("inv_idle", "prod")], rows[("inv_scoring", "staging")]
        assert (bad.recorded_version, bad.live_version, bad.agrees) == ("2", "2", True)  # the labels agree
        assert (bad.live_digest, bad.registered_digest) == (credit["1"]["digest"], credit["2"]["digest"])
        assert bad.digest_agrees is False and bad.mismatch and bad.state == "mismatch"
        assert bad.state_text() == (f"MISMATCH digest live={credit['1']['digest'][:19]} "
                                    f"registered={credit['2']['digest'][:19]}")
        assert (good.live_digest, good.digest_agrees, good.state) == (credit["2"]["digest"], True, "ok")
        # the lineage shown is the registered one: a tag rewritten in MLflow does not change it
        mlflow.client().set_model_version_tag("inv_credit", "2", "onepath.data_hash", "0" * 64)
        try:
            assert inventory(world)[("inv_scoring", "staging")].lineage["data_hash"] == credit["2"]["onepath.data_hash"]
        finally:
            mlflow.client().set_model_version_tag("inv_credit", "2", "onepath.data_hash", credit["2"]["onepath.data_hash"])

        monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(world["decls"]))
        status = {(r["name"], r["env"]): r for r in _status_rows(world["settings"], None)}
        assert (status[("inv_idle", "prod")]["digest"], status[("inv_idle", "prod")]["digest_ok"]) == \
            (credit["1"]["digest"], False)
        assert status[("inv_idle", "prod")]["registered_digest"] == credit["2"]["digest"]
        assert (status[("inv_scoring", "staging")]["digest"], status[("inv_scoring", "staging")]["digest_ok"]) == \
            (credit["2"]["digest"], True)
        assert status[("inv_portal", "prod")]["digest_ok"] is None  # an app release has no model digest
        assert cmd_status(argparse.Namespace(env=None, json=False)) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("inv_idle"))
        assert f"MISMATCH served={credit['1']['digest'][:19]} registered={credit['2']['digest'][:19]}" in line
    finally:
        deployer.delete(target)


def test_probe_many_tells_closed_addresses_apart_without_the_event_loop():
    """``_refusing``: a closed port is refused at once; a socket that listens (and never answers) and a host
    name are left to the asyncio probe, which gives the listener its timeout and reports it unhealthy."""
    import time

    from resources.deployers.base import _refusing, probe_many

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    try:
        up = f"http://127.0.0.1:{listener.getsockname()[1]}"
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        named = f"http://localhost:{closed.getsockname()[1]}"
        assert _refusing([up, down, named], 1.0, 2) == {down}
        t = time.monotonic()
        assert probe_many([up, down, named], timeout=0.5, health=False) == {up: None, down: None, named: None}
        assert 0.4 < time.monotonic() - t < 5  # the listener had its timeout; nothing waited on the closed port
    finally:
        listener.close()
        closed.close()
