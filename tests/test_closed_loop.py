"""The closed loop, for real: traffic with and without a population shift reaches prod endpoints, the
drift sensor asks for the drift check, the check (Evidently) finds drift, the sensor asks for ONE
retraining run and then holds off, outcomes arrive later and the dataset is rebuilt with them, and
declarative automation carries the new version through the gates: on to prod for ml-standard, to a
wait for approval for ml-high-risk (then the approval sensor promotes it). A gate-failing retrain is
not deployed; a version registered from a notebook enters the same path; a version failing its bake
in prod is rolled back by itself.

Runs in its own onepath world (ledger, MLflow store, processes, ports) and its own Dagster instance.
Runs the sensors and automation through Dagster's public harness (``build_sensor_context``,
``evaluate_automation_conditions``) and executes what they request with ``dg.materialize``.
"""

from __future__ import annotations

import threading
import time

import dagster as dg
import pytest

from platform_defs.definitions import build_definitions
from platform_defs.policy import DriftPolicy
from platform_defs.wiring import build_resources
from resources.deployers.base import Target, http_json, probe
from tests.conftest import (DEMO_KEYS, cli_headers, cli_token, isolated_settings, quick_policy, record_policy,
                            record_test_registration)

DRIFT = {"min_new_rows": 300, "window_rows": 600, "min_rows": 200, "cooldown_minutes": 60,
         "min_check_interval_minutes": 0}


def loop_policy(**bake):
    base = quick_policy(**bake)
    tracks = {n: t.model_copy(update={"drift": DriftPolicy.model_validate({**t.drift.model_dump(), **DRIFT})})
              for n, t in base.tracks.items()}
    return base.model_copy(update={"tracks": tracks})


class StepClock:
    """A clock the test moves: waiting jumps straight to the wanted time."""

    def __init__(self) -> None:
        self.t = time.time()

    def now(self) -> float:
        return self.t

    def wait_until(self, t: float, control) -> None:
        self.t = max(self.t, t)


def send_traffic(world, endpoint: str, env: str, n: int, *, drift: bool, seed: int) -> int:
    """``n`` requests drawn from the endpoint's dataset generator (shifted under ``drift``), as
    ``onepath simulate-traffic`` sends them; their outcomes are delivered right after."""
    from datetime import date

    from platform_defs.cli_simulate import PredictClient, Simulation, iter_requests, resolve

    spec, dataset = resolve(world["org"], endpoint, env)
    address = world["deployer"].address(Target(endpoint, env, "endpoint", spec.ports.get(env)))
    client = PredictClient(address, credential=cli_token(world["ledger"], world["deployer"], endpoint, env, world["org"]))
    try:
        sim = Simulation(endpoint=endpoint, env=env, outcomes_dir=world["settings"].outcomes_dir,
                         requests=iter_requests(dataset, total=n, drift=drift, seed=seed, today=date.today),
                         send=client, rate=1e6, label_delay=0.0, clock=StepClock(), total=n)
        summary = sim.run()
    finally:
        client.close()
    assert summary.ok == n and summary.failed == 0, summary.line()
    return summary.delivered


def evaluate(world, name: str):
    """One tick as the daemon evaluates it: run requests resolved against the sensor's target (a request
    the daemon could not launch fails here too), the cursor carried to the next tick."""
    defs, instance = world["defs"], world["instance"]
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(instance=instance, cursor=world["cursors"].get(name),
                                 resources=defs.resources, definitions=defs) as ctx:
        data = sensor.evaluate_tick(ctx)
    world["cursors"][name] = data.cursor
    return data


def sensor_tick(world, name: str):
    data = evaluate(world, name)
    return list(data.run_requests or []), data.skip_message


def execute(world, request: dg.RunRequest, raise_on_error: bool = False):
    """Run what a sensor requested, the way the daemon would: its assets or checks, its tags."""
    defs = world["defs"]
    everything = [*defs.assets, *defs.asset_checks]
    if request.asset_check_keys and not request.asset_selection:
        selection = dg.AssetSelection.checks(*request.asset_check_keys)
    else:
        selection = request.asset_selection
    return dg.materialize(everything, selection=selection, resources=defs.resources, instance=world["instance"],
                          tags=request.tags, raise_on_error=raise_on_error)


def automation(world) -> list[str]:
    """Asset keys declarative automation requests now (the cursor carries over between calls)."""
    result = dg.evaluate_automation_conditions(defs=world["defs"], instance=world["instance"],
                                               cursor=world.get("automation_cursor"))
    world["automation_cursor"] = result.cursor
    keys = world["defs"].resolve_asset_graph().get_all_asset_keys()
    return sorted(k.to_user_string() for k in keys if result.get_num_requested(k))


def run_automation(world) -> tuple[list[str], dg.ExecuteInProcessResult | None]:
    """Evaluate automation, run what it requests as one run (as the automation sensor would), and
    evaluate once more, as the sensor's next tick would: a chain that completed requests nothing more."""
    wanted = automation(world)
    if not wanted:
        return wanted, None
    result = dg.materialize(list(world["defs"].assets), selection=wanted, resources=world["defs"].resources,
                            instance=world["instance"], tags={"dagster/from_automation_condition": "true"},
                            raise_on_error=False)
    assert automation(world) == []
    return wanted, result


def serving(world, endpoint: str, env: str) -> str | None:
    seen = probe(world["deployer"].address(Target(endpoint, env, "endpoint")),
                 credential=cli_token(world["ledger"], world["deployer"], endpoint, env, world["org"]))
    return str(seen["version"]) if seen else None


def entries(world, kind: str, subject: str | None = None):
    return world["ledger"].entries(kind=kind, subject=subject)


def sign_approval(world, model: str, version: str, env: str, who: str = "mira", first_release: bool = False):
    from platform_defs.registration import registration
    from resources.approvals import load_private_key, sign

    reg = registration(world["ledger"], model, version).data  # what an approval binds
    approval = sign(load_private_key(DEMO_KEYS / f"{who}.key"), asset=model, version=version, env=env,
                    reason="reviewed in the closed-loop test", approver=who, run_id=reg["run_id"] or "",
                    digest=reg["digest"], first_release=first_release)  # the flag is signed, like the rest
    return world["ledger"].append("approval", model, approval.as_dict(), who, env=env)


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    from platform_defs.loader import load_organisation
    from resources.deployers.local import LocalProcessDeployer

    iso = isolated_settings(settings, tmp_path_factory.mktemp("loop"), port_offset=150)
    org = load_organisation()
    policy = loop_policy()
    defs = build_definitions(org=org, settings=iso, policy=policy)
    res = build_resources(iso)
    record_policy(res["ledger"].ledger(), policy)
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("loop_instance"))) as instance:
        w = {"defs": defs, "instance": instance, "settings": iso, "org": org, "cursors": {},
             "deployer": res["deployer_local"].deployer(), "ledger": res["ledger"].ledger(), "mlflow": res["mlflow"]}
        # as `onepath up` does, the declarations asset is materialized once at the start (automation asks
        # for it while it is missing)
        first = dg.materialize(list(defs.assets), selection=["declarations", "customer_activity", "churn",
                                                             "churn_scoring_staging", "churn_scoring_prod"],
                               resources=defs.resources, instance=instance)
        assert first.success
        automation(w)  # the automation cursor starts after the first deploys
        try:
            yield w
        finally:
            LocalProcessDeployer(iso.run_dir).stop_all()


def test_without_drift_the_check_passes_and_nothing_is_retrained(world):
    requests, why = sensor_tick(world, "drift")
    assert not requests and "no new inference rows" in why
    send_traffic(world, "churn_scoring", "prod", 150, drift=False, seed=1)
    requests, why = sensor_tick(world, "drift")
    assert not requests and "churn_scoring.prod: 150 of 300 new rows" in why  # too few: a skip with the reason
    send_traffic(world, "churn_scoring", "prod", 250, drift=False, seed=2)
    requests, _ = sensor_tick(world, "drift")
    assert len(requests) == 1 and requests[0].asset_check_keys and requests[0].asset_selection == []
    check = execute(world, requests[0])
    (evaluation,) = check.get_asset_check_evaluations()
    assert evaluation.check_name == "input_drift" and evaluation.passed
    md = evaluation.metadata
    assert md["window_rows"].value == 400 and md["drifted_share"].value < 0.3
    assert md["methods"].value == {"numeric": {"method": "ks", "threshold": 0.01},
                                   "categorical": {"method": "jensenshannon", "threshold": 0.1}}
    assert "| column | type | method |" in md["columns"].value
    assert md["report"].value.endswith(".html")
    requests, _ = sensor_tick(world, "drift")
    assert requests == [] and entries(world, "retrain_requested") == []


def test_drift_requests_one_retraining_run_then_cools_down(world):
    send_traffic(world, "churn_scoring", "prod", 600, drift=True, seed=3)
    requests, _ = sensor_tick(world, "drift")
    (check_request,) = requests
    check = execute(world, check_request)
    (evaluation,) = check.get_asset_check_evaluations()
    assert evaluation.passed is False, evaluation.metadata["verdict"].value
    assert evaluation.metadata["drifted_share"].value >= 0.3
    (detected,) = entries(world, "drift_detected", "churn_scoring")
    assert detected.data["claims"]["trigger"] == "new_inference_rows: 600 new rows"  # its run's tags: a claim
    requests, _ = sensor_tick(world, "drift")
    (retrain,) = requests
    assert retrain.asset_selection == [dg.AssetKey("customer_activity"), dg.AssetKey("churn")]
    assert retrain.run_key == f"retrain:churn_scoring:drift-{detected.seq}"
    assert retrain.tags["onepath/trigger"] == "drift" and retrain.tags["onepath/drift_entry"] == str(detected.seq)
    (asked,) = entries(world, "retrain_requested", "churn_scoring")
    assert asked.data["trigger"] == f"drift_detected #{detected.seq}"
    assert sensor_tick(world, "drift")[0] == []  # requested once
    # more drifted traffic: drift again, but the endpoint is in its cooldown
    send_traffic(world, "churn_scoring", "prod", 300, drift=True, seed=4)
    (again,) = sensor_tick(world, "drift")[0]
    assert execute(world, again).get_asset_check_evaluations()[0].passed is False
    requests, why = sensor_tick(world, "drift")
    assert requests == [] and "in cooldown until" in why
    assert len(entries(world, "retrain_requested", "churn_scoring")) == 1
    world["retrain"] = retrain


def test_the_retrain_learns_from_labelled_production_data_and_automation_promotes_it_to_prod(world):
    before = serving(world, "churn_scoring", "prod")
    run = execute(world, world["retrain"], raise_on_error=True)
    mats = {e.materialization.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
            for e in run.get_asset_materialization_events()}
    assert mats["customer_activity"]["feedback_rows"] == 1300  # every answered request got its outcome
    assert mats["customer_activity"]["rows"] == 4000 + 1300 - mats["customer_activity"]["feedback_id_collisions"]
    new = str(mats["churn"]["model_version"])
    wanted, result = run_automation(world)
    # the model drives staging, staging drives prod (ml-standard may auto-promote); nothing else moves
    assert wanted == ["churn_scoring_prod", "churn_scoring_staging"]
    assert result is not None and result.success
    assert serving(world, "churn_scoring", "staging") == new and serving(world, "churn_scoring", "prod") == new
    deploys = [e for e in entries(world, "deploy", "churn_scoring") if e.data["version"] == new]
    assert {e.env for e in deploys} == {"staging", "prod"}
    assert all(e.data["claims"]["trigger"] == "declarative automation" for e in deploys)
    assert before != new


def test_high_risk_retrain_waits_for_approval_then_the_approval_promotes_it(world):
    defs, instance = world["defs"], world["instance"]
    first = dg.materialize(list(defs.assets), selection=["credit_applications", "credit_risk",
                                                         "credit_scoring_staging"],
                           resources=defs.resources, instance=instance)
    v1 = str(next(e.materialization.metadata["model_version"].value for e in first.get_asset_materialization_events()
                  if e.materialization.asset_key == dg.AssetKey("credit_risk")))
    sign_approval(world, "credit_risk", v1, "prod", first_release=True)
    assert dg.materialize(list(defs.assets), selection=["credit_scoring_prod"], resources=defs.resources,
                          instance=instance).success
    automation(world)  # what the manual runs above changed is not news to automation
    retrain = dg.materialize(list(defs.assets), selection=["credit_applications", "credit_risk"],
                             resources=defs.resources, instance=instance, run_config={"ops": {"credit_applications": {
                                 "config": {"params": {"period_start": "2026-02-01", "period_end": "2026-07-31"}}}}})
    v2 = str(next(e.materialization.metadata["model_version"].value for e in retrain.get_asset_materialization_events()
                  if e.materialization.asset_key == dg.AssetKey("credit_risk")))
    wanted, result = run_automation(world)
    assert wanted == ["credit_scoring_prod", "credit_scoring_staging"]  # never loan_portal_*: the app stays
    assert serving(world, "credit_scoring", "staging") == v2 and serving(world, "credit_scoring", "prod") == v1
    approval = {e.check_name: e for e in result.get_asset_check_evaluations()
                if e.asset_key == dg.AssetKey("credit_scoring_prod")}["approval"]
    assert approval.passed is False
    assert approval.metadata["verdict"].value.startswith("waiting for approval by mira, pat: run onepath approve "
                                                         f"credit_risk --version {v2} --env prod")
    waiting = entries(world, "awaiting_approval", "credit_scoring")[-1]
    assert waiting.data["version"] == v2 and waiting.data["still_serving"] == v1
    assert sensor_tick(world, "approved_promotions")[0] == []
    approved = sign_approval(world, "credit_risk", v2, "prod", who="pat")
    (promote,) = sensor_tick(world, "approved_promotions")[0]
    assert promote.asset_selection == [dg.AssetKey("credit_scoring_prod")]
    assert promote.tags["onepath/approval_entry"] == str(approved.seq)
    execute(world, promote, raise_on_error=True)
    assert serving(world, "credit_scoring", "prod") == v2
    (deploy,) = [e for e in entries(world, "deploy", "credit_scoring") if e.env == "prod" and e.data["version"] == v2]
    assert deploy.data["claims"]["trigger"] == f"approval #{approved.seq}" and "trigger" not in deploy.data
    world["credit_v2"] = v2


def test_a_retrain_that_fails_a_gate_is_not_deployed_and_automation_stops_there(world):
    defs, instance = world["defs"], world["instance"]
    v2 = world["credit_v2"]
    biased = dg.materialize(list(defs.assets), selection=["credit_applications", "credit_risk"],
                            resources=defs.resources, instance=instance, run_config={"ops": {"credit_applications": {
                                "config": {"params": {"biased": True}}}}})
    assert biased.success
    wanted, result = run_automation(world)
    assert "credit_scoring_staging" in wanted and set(wanted) <= {"credit_scoring_staging", "credit_scoring_prod"}
    assert not result.success
    verdicts = {e.check_name: e.passed for e in result.get_asset_check_evaluations()
                if e.asset_key == dg.AssetKey("credit_scoring_staging")}
    assert verdicts["fairness"] is False
    assert not [e for e in result.get_asset_materialization_events()]  # staging refused, prod never ran
    assert serving(world, "credit_scoring", "staging") == v2 and serving(world, "credit_scoring", "prod") == v2


def test_a_notebook_version_is_handed_off_into_the_graph_and_its_gate_says_what_to_log(world, tmp_path):
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from assets.retention.data import generate_customer_activity
    from assets.retention.trainer import train_churn
    from resources.mlflow_registry import trusted_types

    assert sensor_tick(world, "registry_handoff")[0] == []
    df = generate_customer_activity(rows=800, seed=5)
    feats = ["tenure_months", "plan", "monthly_fee", "logins_30d", "avg_balance", "complaints_90d", "primary_channel"]
    est = train_churn(df[feats], df["churned"], {})
    mlflow.set_tracking_uri(world["mlflow"].tracking_uri)
    mlflow.set_registry_uri(world["mlflow"].registry_uri)
    mlflow.set_experiment("notebooks/ravi")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(est, name="model", registered_model_name="churn",
                                        signature=infer_signature(df[feats], est.predict(df[feats])),
                                        serialization_format="skops", skops_trusted_types=trusted_types(est))
    version = str(info.registered_model_version)
    instance = world["instance"]
    result = evaluate(world, "registry_handoff")
    (event,) = result.asset_events
    assert event.asset_key == dg.AssetKey("churn") and event.metadata["model_version"].value == version
    assert "onepath.data_hash" in event.metadata["missing_lineage"].value
    instance.report_runless_asset_event(event)  # what the daemon does with a sensor's asset events
    (handoff,) = entries(world, "handoff", "churn")
    assert handoff.data["version"] == version
    (request,) = result.run_requests  # into the same path as every version: staging's gate
    assert request.asset_selection == [dg.AssetKey("churn_scoring_staging")]
    assert request.run_key == f"handoff:churn:{version}:churn_scoring"
    run = execute(world, request)
    assert not run.success
    failed = {e.check_name: e.metadata["verdict"].value for e in run.get_asset_check_evaluations() if not e.passed}
    assert "registered without onepath.data_hash" in failed["data_quality"]
    assert "Registering from a notebook" in failed["data_quality"]
    (registered,) = [e for e in entries(world, "model_registered", "churn") if e.data["version"] == version]
    assert registered.data["via"] == "handoff" and registered.data["data_hash"] is None  # as its tags were
    assert "reference sample" in failed["drift_ready"]
    assert serving(world, "churn_scoring", "staging") != version
    assert sensor_tick(world, "registry_handoff")[0] == []  # reported once


def test_a_version_failing_its_bake_in_prod_is_rolled_back_by_itself(world, tmp_path):
    """A faulty version (half its predictions raise) passes every gate, is switched in prod, fails its
    bake on the error rate read from its own metrics, and the previous version serves again."""
    import mlflow

    from resources.serving.faults import save_fault_model

    registry = world["mlflow"]
    good = serving(world, "churn_scoring", "prod")
    mv = registry.get_version("churn", good)
    run = registry.client().get_run(mv.run_id)
    base = registry.download("churn", good)
    faulty = save_fault_model(tmp_path / "faulty", base_model_dir=base, error_rate=0.5)
    mlflow.set_tracking_uri(registry.tracking_uri)
    mlflow.set_registry_uri(registry.registry_uri)
    with mlflow.start_run(experiment_id=run.info.experiment_id) as r:
        mlflow.log_artifacts(str(faulty), "model")
        # same snapshot as the version serving, so it must look better to be promoted at all
        mlflow.log_metrics({**run.data.metrics, "roc_auc": run.data.metrics["roc_auc"] + 0.001})
        ref = registry.run_artifact(mv.run_id, "onepath/reference_sample.parquet", tmp_path / "ref")
        mlflow.log_artifact(str(ref), "onepath")
        bad = mlflow.register_model(f"runs:/{r.info.run_id}/model", "churn")
    tags = {k: v for k, v in (mv.tags or {}).items() if k.startswith("onepath.")}
    for k, v in {**tags, "onepath.dagster_run_id": "copied-for-the-test"}.items():
        registry.client().set_model_version_tag("churn", bad.version, k, v)
    bad_version = str(bad.version)
    # its registration as the platform records one (digest of what MLflow serves, the good version's lineage)
    from platform_defs.registration import registration

    facts = registration(world["ledger"], "churn", good).data
    record_test_registration(world["ledger"], registry, "churn", bad_version, **{
        k: facts[k] for k in ("data_hash", "code_hash", "code_path", "dataset_key", "author", "split_seed",
                              "test_size", "training_rows")})

    baking = loop_policy(seconds=20, poll_seconds=0.2, min_requests=20, pass_without_traffic=False)
    record_policy(world["ledger"], baking)  # a policy change, recorded as onepath policy apply would
    defs = build_definitions(org=world["org"], settings=world["settings"], policy=baking)
    stop = threading.Event()
    address = world["deployer"].address(Target("churn_scoring", "prod", "endpoint"))
    record = {"tenure_months": 12.0, "plan": "basic", "monthly_fee": 0.0, "logins_30d": 3, "avg_balance": 900.0,
              "complaints_90d": 1, "primary_channel": "app"}

    auth = cli_headers(world["ledger"], world["deployer"], "churn_scoring", "prod", world["org"])

    def traffic() -> None:
        while not stop.is_set():
            http_json(address + "/predict", timeout=5, data=record, headers=auth)

    threads = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        staged = dg.materialize(list(defs.assets), selection=["churn_scoring_staging", "churn_scoring_prod"],
                                resources=defs.resources, instance=world["instance"], raise_on_error=False)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not staged.success
    assert serving(world, "churn_scoring", "staging") == bad_version
    assert serving(world, "churn_scoring", "prod") == good
    failed = entries(world, "bake_failed", "churn_scoring")[-1]
    assert failed.data["version"] == bad_version and failed.data["reason"] == "error_rate"
    rolled = entries(world, "rollback", "churn_scoring")[-1]
    assert rolled.data["from_version"] == bad_version and rolled.data["to_version"] == good
    assert rolled.seq > failed.seq and "bake failed" in rolled.data["reason"]
    assert world["mlflow"].aliases("churn")["prod"] == good
