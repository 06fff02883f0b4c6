"""Rollback for real: MLflow on the session's sqlite store, real endpoint processes on loopback, the
session's signed ledger. Deploys are written to the ledger and the alias the way factories.py does.

Each test uses its own endpoint and model, so tests do not depend on each other's state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from platform_defs.promotion import PromotionError, Services, endpoint_release, endpoint_target, roll_back
from platform_defs.loader import load_organisation
from platform_defs.policy import load_policy
from platform_defs.rollback import build_rollback_job
from platform_defs.specs import DatasetSpec, EndpointSpec, ModelSpec, Organisation
from resources.deployers.base import probe
from resources.processes import pid_alive
from tests.conftest import record_policy, record_test_registration, save_credit_model

ROOT = Path(__file__).resolve().parents[1]


# -- helpers (also used by test_alias_drift.py) ------------------------------------------------


def write_org(root: Path, endpoints: list[str], prefix: str) -> Path:
    """A declarations folder: one credit-like dataset, and per endpoint its own model and endpoint."""
    from assets.credit.declarations import credit_applications

    dataset = {**credit_applications.model_dump(mode="json"), "name": f"{prefix}_applications", "feedback": None}
    decls = [dataset]
    for ep in endpoints:
        decls.append({"kind": "model", "name": f"{ep}_model", "owner": "credit-risk", "track": "ml-high-risk",
                      "dataset": dataset["name"], "trainer": "assets.credit.trainer:train_credit_risk"})
        decls.append({"kind": "endpoint", "name": ep, "owner": "credit-risk", "track": "ml-high-risk",
                      "model": f"{ep}_model", "environments": ["staging", "prod"]})
    (root / "team").mkdir(parents=True, exist_ok=True)
    (root / "team" / "defs.yaml").write_text(yaml.safe_dump({"declarations": decls}, sort_keys=False))
    return root


def register(mlflow, model: str, saved: Path, book) -> str:
    """Register the saved MLflow model directory as the next version of ``model``, and record its
    registration (digest) in ``book`` as the platform does."""
    from mlflow.exceptions import MlflowException

    client = mlflow.client()
    try:
        client.create_registered_model(model)
    except MlflowException:
        pass  # already registered
    version = str(client.create_model_version(model, source=str(saved)).version)
    record_test_registration(book, mlflow, model, version)
    return version


def deploy_like_factories(org: Organisation, endpoint: str, env: str, version: str, resources: dict,
                          actor: str = "dagster:test-run"):
    """What the promotion flow records for a version whose gate passed, without running the gate (these
    tests are about what comes after): a passed gate verdict under the policy in force, the deploy of
    the verified folder, the alias, and the 'deploy' entry with the digest."""
    from platform_defs.governance.gates import Verdict
    from platform_defs.policy import policy_hash
    from platform_defs.promotion import Services, fallback_release, record_gate
    from platform_defs.registration import verified_artifact

    spec = org.by_name[endpoint]
    assert isinstance(spec, EndpointSpec)
    model = org.by_name[spec.model]
    assert isinstance(model, ModelSpec)
    dataset = org.by_name[model.dataset]
    assert isinstance(dataset, DatasetSpec)
    mlflow, deployer = resources["mlflow"], resources["deployer_local"].deployer()
    book, policy = resources["ledger"].ledger(), load_policy()
    target = endpoint_target(spec, env)
    before = deployer.status(target)
    verdicts = [Verdict("data_quality", True, "test"), Verdict("performance", True, "test")]
    assert record_gate(book, verdicts, subject=spec.name, env=env, actor=actor, version=version,
                       who={"model": model.name}, still_serving=before.serving_version, policy=policy,
                       trigger="test") is None
    artifact, digest = verified_artifact(book, mlflow, model.name, version)
    services = Services(mlflow=mlflow, deployer=deployer, ledger=book)
    fallback = fallback_release(org, policy, spec, env, version, services=services, actor=actor)
    status = deployer.deploy(target, endpoint_release(spec, model, dataset, version, artifact, digest, env=env),
                             fallback=fallback)
    if before.healthy:  # every worker of the version it replaced (/version names no pid: the supervisor does)
        for pid in before.detail["supervisor"]["pids"]:
            drained(pid)
    mlflow.set_alias(model.name, env, version)
    book.append("deploy", spec.name, {
        "model": model.name, "version": version, "digest": digest, "previous_version": before.serving_version,
        "address": status.address, "promoted_from": None, "track": model.track, "owner": model.owner,
        "checks": [v.check for v in verdicts], "policy_hash": policy_hash(policy)}, actor, env=env)
    return status


def drained(*pids: int) -> None:
    """Wait until replaced workers have exited. Right after a cutover the previous version may still
    take a connection or two on the shared stable socket while it drains; once its processes are gone
    only the new version can answer. (A condition with a deadline, not a sleep.)"""
    deadline = time.monotonic() + 60
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if pid_alive(p)]
    assert not left, f"workers {left} did not drain within 60 s"


def _target(world, endpoint: str, env: str):
    return endpoint_target(world["org"].by_name[endpoint], env)


def worker_pids(world, endpoint: str, env: str = "prod") -> list[int]:
    """Every worker of what serves ``endpoint`` in ``env`` now, as its supervisor names them (/version
    names no pid)."""
    return list(world["deployer"].status(_target(world, endpoint, env)).detail["supervisor"]["pids"])


def served(world, endpoint: str, env: str = "prod") -> dict | None:
    """What answers at the endpoint's stable address: its /version, asked with the backend's own probe
    credential (an anonymous caller is refused), or None."""
    deployer, target = world["deployer"], _target(world, endpoint, env)
    return probe(deployer.address(target), credential=deployer.probe_credential(target))


def kinds(book, endpoint: str, env: str) -> list[tuple[str, str | None]]:
    return [(e.kind, str(e.data.get("version", e.data.get("to_version")))) for e in book.entries(subject=endpoint, env=env)
            if e.kind != "gate_verdict"]


# -- fixtures ----------------------------------------------------------------------------------

ENDPOINTS = ["rb_main", "rb_refuse", "rb_broken", "rb_job", "rb_cli", "rb_revoked"]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rb_models")
    return {"a": save_credit_model(root / "a", seed=1), "b": save_credit_model(root / "b", seed=2)}


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory, saved_models):
    from platform_defs.wiring import build_resources

    org_dir = write_org(tmp_path_factory.mktemp("rb_org"), ENDPOINTS, "rb")
    org = load_organisation(org_dir)
    resources = build_resources(settings)
    record_policy(resources["ledger"].ledger())  # the example policy, recorded as the one in force
    mlflow = resources["mlflow"]
    versions = {}
    # rb_broken's versions live in folders of their own: a test damages MLflow's copy of one of them
    import shutil

    private = tmp_path_factory.mktemp("rb_broken_sources")
    sources = {ep: {k: saved_models[k] for k in ("a", "b")} for ep in ENDPOINTS}
    sources["rb_broken"] = {k: Path(shutil.copytree(saved_models[k], private / k)) for k in ("a", "b")}
    for ep in ENDPOINTS:  # every model gets versions 1 (model a) and 2 (model b)
        versions[ep] = [register(mlflow, f"{ep}_model", sources[ep][k], resources["ledger"].ledger())
                        for k in ("a", "b")]
        assert versions[ep] == ["1", "2"]
    deployer = resources["deployer_local"].deployer()
    yield {"org": org, "org_dir": org_dir, "resources": resources, "mlflow": mlflow, "deployer": deployer,
           "sources": sources,
           "ledger": resources["ledger"].ledger(), "policy": load_policy(), "settings": settings}
    for ep in ENDPOINTS:
        for env in ("staging", "prod"):
            deployer.delete(endpoint_target(org.by_name[ep], env))


def do_rollback(world, endpoint: str, env: str = "prod", **kw):
    args = {"reason": "v2 misbehaves in prod", "actor": "pat", **kw}
    services = Services(mlflow=world["mlflow"], deployer=world["deployer"], ledger=world["ledger"],
                        data_store=world["resources"]["data_store"])
    return roll_back(world["org"], world["policy"], endpoint, env, services=services, **args)


# -- rollback() --------------------------------------------------------------------------------


def test_rollback_restores_the_previous_version_at_the_same_address_and_keeps_history(world):
    org, res, mlflow, book = world["org"], world["resources"], world["mlflow"], world["ledger"]
    deploy_like_factories(org, "rb_main", "prod", "1", res)
    address = deploy_like_factories(org, "rb_main", "prod", "2", res).address
    assert served(world, "rb_main")["version"] == "2" and mlflow.aliases("rb_main_model")["prod"] == "2"

    pids = worker_pids(world, "rb_main")
    result = do_rollback(world, "rb_main")
    drained(*pids)

    assert (result.from_version, result.to_version, result.address) == ("2", "1", address)
    seen = served(world, "rb_main")
    assert seen["version"] == "1" and seen["model"] == "rb_main_model"
    assert mlflow.aliases("rb_main_model")["prod"] == "1"
    assert kinds(book, "rb_main", "prod") == [("deploy", "1"), ("deploy", "2"), ("rollback", "1"), ("deploy", "1")]
    rb = book.entries(kind="rollback", subject="rb_main", env="prod")[-1]
    assert rb.seq == result.rollback_entry and rb.actor == "pat"
    assert {k: rb.data[k] for k in ("model", "from_version", "to_version", "reason", "address")} == {
        "model": "rb_main_model", "from_version": "2", "to_version": "1", "reason": "v2 misbehaves in prod",
        "address": address}
    redeploy = book.entries(kind="deploy", subject="rb_main", env="prod")[-1]
    assert redeploy.seq == result.deploy_entry
    assert redeploy.data["version"] == "1" and redeploy.data["previous_version"] == "2"
    assert redeploy.data["rollback_entry"] == rb.seq and redeploy.data["address"] == address
    # nothing deleted from MLflow
    assert {str(mlflow.get_version("rb_main_model", v).version) for v in ("1", "2")} == {"1", "2"}
    assert mlflow.latest_version("rb_main_model") == "2"

    # rolling back again undoes the rollback: the newest deploy that is not what serves is version 2
    pids = worker_pids(world, "rb_main")
    again = do_rollback(world, "rb_main", reason="v1 was not the problem after all")
    drained(*pids)
    assert (again.from_version, again.to_version) == ("1", "2")
    assert served(world, "rb_main")["version"] == "2" and mlflow.aliases("rb_main_model")["prod"] == "2"
    # and an explicit --to goes to exactly that version
    pids = worker_pids(world, "rb_main")
    pinned = do_rollback(world, "rb_main", to_version="1", reason="pin v1")
    drained(*pids)
    assert pinned.to_version == "1" and served(world, "rb_main")["version"] == "1"
    assert len(book.entries(kind="rollback", subject="rb_main", env="prod")) == 3
    assert book.verify().ok


@pytest.mark.parametrize("endpoint,env,kw,message", [
    ("rb_refuse", "prod", {"reason": ""}, "rb_refuse.prod: a rollback needs a reason"),
    ("rb_refuse", "prod", {"reason": "   "}, "a rollback needs a reason"),
    ("rb_refuse", "prod", {"to_version": "2"},
     "rb_refuse.prod: version 2 was never deployed to prod .* versions deployed to prod: 1$"),
    ("rb_refuse", "prod", {"to_version": "99"}, "version 99 was never deployed to prod"),
    ("rb_refuse", "prod", {"to_version": "1"}, "rb_refuse.prod: version 1 already serves; nothing to roll back"),
    ("rb_refuse", "prod", {}, "nothing to roll back to: version 1 is the only version ever deployed to prod"),
    ("rb_refuse", "staging", {}, "rb_refuse.staging: nothing to roll back to: no version was ever deployed"),
    ("rb_nope", "prod", {}, "endpoint 'rb_nope' is not declared .*rb_refuse"),
    ("rb_refuse", "qa", {}, "endpoint 'rb_refuse' has no environment 'qa' \\(its environments: staging, prod\\)"),
])
def test_refusals_change_nothing(world, endpoint, env, kw, message):
    org, res, book, mlflow = world["org"], world["resources"], world["ledger"], world["mlflow"]
    target = endpoint_target(org.by_name["rb_refuse"], "prod")
    if not world["deployer"].status(target).healthy:
        deploy_like_factories(org, "rb_refuse", "prod", "1", res)
    history = [e.seq for e in book.entries(subject="rb_refuse")]
    with pytest.raises(PromotionError, match=message) as err:
        do_rollback(world, endpoint, env, **kw)
    assert "\n" not in str(err.value)
    assert world["deployer"].status(target).serving_version == "1"
    assert mlflow.aliases("rb_refuse_model") == {"prod": "1"}
    assert [e.seq for e in book.entries(subject="rb_refuse")] == history


def test_a_way_back_never_restores_a_version_whose_approval_was_revoked(world):
    """mira approved version 1 for prod, then revoked it (the fairness numbers were wrong); version 2 went out.
    A rollback is a promotion: it may not put back what the approver took back."""
    from platform_defs.registration import registration
    from resources.approvals import load_private_key, sign, sign_revocation
    from tests.conftest import DEMO_KEYS

    org, res, book = world["org"], world["resources"], world["ledger"]
    mira = load_private_key(DEMO_KEYS / "mira.key")
    deploy_like_factories(org, "rb_revoked", "prod", "1", res)
    reg = registration(book, "rb_revoked_model", "1").data
    approval = sign(mira, asset="rb_revoked_model", version="1", env="prod", reason="reviewed", approver="mira",
                    run_id=reg["run_id"], digest=reg["digest"])
    book.append("approval", "rb_revoked_model", approval.as_dict(), "mira", env="prod")
    revocation = sign_revocation(mira, asset="rb_revoked_model", version="1", env="prod",
                                 reason="fairness numbers were wrong", revoker="mira", approval_entry=None)
    rev = book.append("approval_revoked", "rb_revoked_model", revocation.as_dict(), "mira", env="prod")
    deploy_like_factories(org, "rb_revoked", "prod", "2", res)
    history = [e.seq for e in book.entries(subject="rb_revoked")]
    with pytest.raises(PromotionError, match=r"version 1's approval in prod was revoked: approval #\d+ of "
                                             rf"rb_revoked_model version 1 in prod was revoked by mira .*ledger #{rev.seq}"):
        do_rollback(world, "rb_revoked", to_version="1")
    assert world["deployer"].status(endpoint_target(org.by_name["rb_revoked"], "prod")).serving_version == "2"
    assert [e.seq for e in book.entries(subject="rb_revoked")] == history


def test_a_failed_redeploy_leaves_the_current_version_serving(world):
    org, res, book, mlflow = world["org"], world["resources"], world["ledger"], world["mlflow"]
    deploy_like_factories(org, "rb_broken", "prod", "1", res)
    address = deploy_like_factories(org, "rb_broken", "prod", "2", res).address
    # version 1's files went bad since it last served, in the local copy and in MLflow's own: a bad
    # cache alone is replaced from MLflow (fetch_verified), this cannot be
    for folder in (Path(mlflow.cache_dir) / "rb_broken_model" / "1", world["sources"]["rb_broken"]["a"]):
        (folder / "model.skops").write_bytes(b"this is not a model any more")
    history = [e.seq for e in book.entries(subject="rb_broken")]

    with pytest.raises(PromotionError, match=r"^rb_broken.prod: model 'rb_broken_model' version 1: artifact digest "
                                             r"mismatch: expected sha256:\w+, found sha256:\w+ .*; 2 keeps serving$") as err:
        do_rollback(world, "rb_broken")

    assert "\n" not in str(err.value)
    assert served(world, "rb_broken")["version"] == "2"
    assert mlflow.aliases("rb_broken_model")["prod"] == "2"
    # the detected tampering is recorded; no rollback or deploy is
    new = [e for e in book.entries(subject="rb_broken") if e.seq not in history]
    assert [(e.kind, e.data["version"], e.data["still_serving"]) for e in new] == [("artifact_refused", "1", "2")]


# -- the launchpad job -------------------------------------------------------------------------


def test_rollback_job_runs_from_run_config_and_fails_cleanly_on_refusal(world, tmp_path):
    org, res, book = world["org"], world["resources"], world["ledger"]
    deploy_like_factories(org, "rb_job", "prod", "1", res)
    address = deploy_like_factories(org, "rb_job", "prod", "2", res).address
    job = build_rollback_job(org, world["policy"])
    assert isinstance(job, dg.JobDefinition) and job.name == "rollback"
    assert [n.name for n in job.graph.nodes] == ["rollback_endpoint"]
    # loads next to everything else onepath defines (op and job names must not clash)
    from platform_defs.factories import build_all
    from sensors.alias_drift import build_alias_checks, build_alias_drift_sensor

    dg.Definitions.validate_loadable(dg.Definitions(
        assets=build_all(org, world["settings"].releases_dir, world["policy"]), asset_checks=build_alias_checks(org),
        jobs=[job], sensors=[build_alias_drift_sensor(org)], resources=res))
    resources = {k: res[k] for k in ("mlflow", "ledger", "deployer_local", "data_store")}

    def run(instance, **config):
        return job.execute_in_process(run_config={"ops": {"rollback_endpoint": {"config": config}}}, resources=resources,
                                      instance=instance, raise_on_error=False)

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        pids = worker_pids(world, "rb_job")
        ok = run(instance, endpoint="rb_job", env="prod", reason="latency regression in v2")
        assert ok.success
        drained(*pids)
        assert served(world, "rb_job")["version"] == "1"
        out = ok.output_for_node("rollback_endpoint")
        assert (out["from_version"], out["to_version"], out["address"]) == ("2", "1", address)
        rb = book.entries(kind="rollback", subject="rb_job", env="prod")[-1]
        assert rb.actor == f"dagster:{ok.run_id}" and rb.data["reason"] == "latency regression in v2"
        observed = [e.event_specific_data.asset_observation for e in ok.all_events
                    if e.event_type_value == "ASSET_OBSERVATION"]
        assert observed[0].asset_key == dg.AssetKey("rb_job_prod")
        assert observed[0].metadata["serving_version"].value == "1"

        for config, message in [
            ({"reason": ""}, "rb_job.prod: a rollback needs a reason"),
            ({"reason": "try v7", "to_version": "7"}, "rb_job.prod: version 7 was never deployed to prod"),
        ]:
            refused = run(instance, endpoint="rb_job", env="prod", **config)
            assert not refused.success
            failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
            error = failure.event_specific_data.error
            assert message in error.message and "Traceback" not in error.message
            assert error.cls_name == "Failure"
        assert served(world, "rb_job")["version"] == "1"
        assert len(book.entries(kind="rollback", subject="rb_job")) == 1


# -- the command -------------------------------------------------------------------------------

# ``onepath rollback`` as the console script runs it
CLI = textwrap.dedent("""
    import sys
    from platform_defs.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def onepath(world, *args: str, identity: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONEPATH_DECLARATIONS_DIR": str(world["org_dir"])}
    env.pop("ONEPATH_IDENTITY", None)
    if identity:
        env["ONEPATH_IDENTITY"] = identity
    return subprocess.run([sys.executable, "-c", CLI, *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_rollback(world):
    org, res, book = world["org"], world["resources"], world["ledger"]
    deploy_like_factories(org, "rb_cli", "prod", "1", res)
    address = deploy_like_factories(org, "rb_cli", "prod", "2", res).address

    for args, message in [
        (["rb_cli", "--env", "prod"], "onepath: a rollback needs a reason: onepath rollback rb_cli --env prod"),
        (["rb_cli", "--env", "prod", "--to", "5", "--reason", "x"],
         "onepath: rb_cli.prod: version 5 was never deployed to prod"),
        (["rb_cli", "--reason", "x"], "onepath: say which environment to roll back: --env ENV"),
        (["nope", "--env", "prod", "--reason", "x"], "onepath: endpoint 'nope' is not declared"),
    ]:
        out = onepath(world, "rollback", *args)
        assert out.returncode == 1, out.stdout + out.stderr
        assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr

    pids = worker_pids(world, "rb_cli")
    out = onepath(world, "rollback", "rb_cli", "--env", "prod", "--reason", "bad v2", identity="mira")
    assert out.returncode == 0, out.stderr
    drained(*pids)
    assert out.stdout.startswith(f"rolled back rb_cli.prod from version 2 to version 1 at {address} "
                                 f"(MLflow alias rb_cli_model@prod -> 1;"), out.stdout
    assert served(world, "rb_cli")["version"] == "1"
    assert book.entries(kind="rollback", subject="rb_cli")[-1].actor == "mira"  # $ONEPATH_IDENTITY
    pids = worker_pids(world, "rb_cli")

    out = onepath(world, "rollback", "rb_cli", "--env", "prod", "--to", "2", "--reason", "fixed upstream",
                  "--as", "pat", identity="mira")
    assert out.returncode == 0, out.stderr
    drained(*pids)
    assert served(world, "rb_cli")["version"] == "2" and world["mlflow"].aliases("rb_cli_model")["prod"] == "2"
    last = book.entries(kind="rollback", subject="rb_cli")[-1]
    assert last.actor == "pat" and last.data["to_version"] == "2" and last.data["reason"] == "fixed upstream"
    json.dumps(last.data)  # plain JSON in the ledger
