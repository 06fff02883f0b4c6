"""The whole example organisation, materialized for real: MLflow on sqlite, real endpoint and app
processes on loopback, a real Dagster instance. Then a retrain and a staged promotion."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from platform_defs.definitions import build_definitions, build_resources
from platform_defs.loader import load_organisation
from platform_defs.policy import policy_hash
from resources.data_store import dataframe_hash
from resources.deployers import base as deployer_base
from tests.conftest import DEMO_KEYS, cli_headers, cli_token, endpoint_of, quick_policy, record_policy

ROOT = Path(__file__).resolve().parents[1]


def materialize(defs: dg.Definitions, instance, keys: list[str] | None = None, raise_on_error: bool = True):
    assets = list(defs.assets)
    selection = None if keys is None else keys
    return dg.materialize(assets, selection=selection, resources=defs.resources, instance=instance,
                          raise_on_error=raise_on_error)


def meta(result, key: str) -> dict:
    if isinstance(result, list):  # the newest result that materialized key
        for r in reversed(result):
            try:
                return meta(r, key)
            except KeyError:
                continue
        raise KeyError(key)
    for ev in result.get_asset_materialization_events():
        m = ev.materialization
        if m.asset_key == dg.AssetKey(key):
            return {k: v.value for k, v in m.metadata.items()}
    raise KeyError(key)


def post(url: str, body: dict, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


CALLER: dict = {}  # the world's ledger and deployer: the test calls its endpoints as onepath-cli, as the CLI does


def probe(address: str):
    """What answers at ``address``, asked as onepath-cli (an endpoint's /version needs a credential; an app's not)."""
    target = endpoint_of(CALLER["deployer"], CALLER["org"], address)
    token = cli_token(CALLER["book"], CALLER["deployer"], target.name, target.env) if target else None
    return deployer_base.probe(address, credential=token)


ALL_BUT_PROD_CREDIT = ["credit_applications", "credit_risk", "credit_scoring_staging", "loan_portal",
                       "loan_portal_staging", "customer_activity", "churn", "churn_scoring_staging",
                       "churn_scoring_prod"]


CLI_ENV: dict[str, str] = {}  # the world's: the CLI reads the policy recorded in force, as an operator's shell would


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform_defs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT), **CLI_ENV})


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    """Everything materialized; the credit line's prod refused until an independent approval, then promoted."""
    policy = quick_policy()
    defs = build_definitions(settings=settings, policy=policy)
    book = build_resources(settings)["ledger"].ledger()
    record_policy(book, policy)
    CALLER.update(book=book, deployer=build_resources(settings)["deployer_local"].deployer(),
                  org=load_organisation(policy=policy))
    # record_policy wrote the policy it recorded here: approve and revoke verify against the recorded policy
    # and refuse under a file that is not it (the example file is not: quick_policy shortens the bakes)
    CLI_ENV["ONEPATH_POLICY_FILE"] = str(Path(book.db_path).parent / f"policy-{policy_hash(policy)[:16]}.yaml")
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("instance"))) as instance:
        first = materialize(defs, instance, ALL_BUT_PROD_CREDIT)
        refused = materialize(defs, instance, ["credit_scoring_prod"], raise_on_error=False)
        approval = run_cli("approve", "credit_risk", "--version", meta(first, "credit_risk")["model_version"],
                           "--env", "prod", "--as", "mira", "--key", str(DEMO_KEYS / "mira.key"), "--first-release",
                           "--reason", "fairness and explainability reviewed")
        assert approval.returncode == 0, approval.stderr
        # the app's prod release waits for an independent code review; the credit prod deploy goes through
        promoted = materialize(defs, instance, ["credit_scoring_prod", "loan_portal_prod"], raise_on_error=False)
        review = run_cli("approve", "loan_portal", "--version", meta(first, "loan_portal")["release_version"],
                         "--env", "prod", "--as", "rob", "--key", str(DEMO_KEYS / "rob.key"), "--reason", "reviewed the diff")
        assert review.returncode == 0, review.stderr
        app = materialize(defs, instance, ["loan_portal_prod"])
        yield {"defs": defs, "instance": instance, "first": [first, promoted, app], "refused": refused,
               "app_refused": promoted,
               "settings": settings, "mlflow": build_resources(settings)["mlflow"],
               "ledger": build_resources(settings)["ledger"].ledger()}
    CLI_ENV.clear()
    CALLER.clear()


def test_graph_lineage_kinds_owners_groups(world):
    graph = world["defs"].resolve_asset_graph()
    deps = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
            for k in graph.get_all_asset_keys()}
    assert deps["credit_risk"] == {"credit_applications"}
    assert deps["credit_scoring_staging"] == {"credit_risk"}
    assert deps["credit_scoring_prod"] == {"credit_scoring_staging"}
    assert deps["loan_portal_staging"] == {"loan_portal", "credit_scoring_staging"}
    assert deps["loan_portal_prod"] == {"loan_portal_staging", "credit_scoring_prod"}
    assert deps["churn"] == {"customer_activity"} and deps["churn_scoring_staging"] == {"churn"}
    specs = {s.key.to_user_string(): s for s in world["defs"].resolve_all_asset_specs()}
    assert specs["credit_risk"].owners == ["team:credit-risk"]
    assert specs["credit_risk"].group_name == "credit_risk"
    assert {"model", "mlflow"} <= set(specs["credit_risk"].kinds)
    assert specs["credit_risk"].tags["onepath/track"] == "ml-high-risk"
    assert specs["churn"].group_name == "retention" and specs["churn"].tags["onepath/track"] == "ml-standard"
    assert "endpoint" in specs["credit_scoring_prod"].kinds and "app" in specs["loan_portal_prod"].kinds


def test_every_asset_materialized_and_checks_passed(world):
    results = world["first"]
    assert results[0].success and results[2].success
    keys = {ev.materialization.asset_key.to_user_string() for r in results
            for ev in r.get_asset_materialization_events()}
    assert keys == {"credit_applications", "credit_risk", "credit_scoring_staging", "credit_scoring_prod",
                    "loan_portal", "loan_portal_staging", "loan_portal_prod", "customer_activity", "churn",
                    "churn_scoring_staging", "churn_scoring_prod"}
    checks = {(e.asset_key.to_user_string(), e.check_name): e.passed
              for r in results for e in r.get_asset_check_evaluations()}
    assert checks[("credit_applications", "expectations")] is True
    assert checks[("credit_risk", "performance")] is True
    assert checks[("churn", "performance")] is True
    high_risk = {"data_quality", "performance", "fairness", "explainability", "lineage", "drift_ready"}
    assert {c for (a, c), ok in checks.items() if a == "credit_scoring_staging" and ok} == high_risk
    assert {c for (a, c), ok in checks.items() if a == "credit_scoring_prod" and ok} == \
        high_risk | {"approval", "rollback_path"}
    assert {c for (a, c), ok in checks.items() if a == "churn_scoring_prod" and ok} == \
        {"data_quality", "performance", "no_regression", "drift_ready"}
    assert checks[("loan_portal_staging", "security_scan")] is True
    assert {c for (a, c), ok in checks.items() if a == "loan_portal_prod" and ok} == \
        {"security_scan", "code_review", "integration_tests"}


def test_app_release_waits_for_code_review_then_passes_integration_tests(world):
    first_try = world["app_refused"]
    checks = {e.check_name: e for e in first_try.get_asset_check_evaluations()
              if e.asset_key == dg.AssetKey("loan_portal_prod")}
    assert checks["code_review"].passed is False
    assert "waiting for a code review by rob" in checks["code_review"].metadata["verdict"].value
    assert checks["integration_tests"].passed is True and "4 passed" in checks["integration_tests"].metadata["verdict"].value
    release = meta(world["first"], "loan_portal")["release_version"]
    built = [e.data["version"] for e in world["ledger"].entries(kind="release_built", subject="loan_portal")]
    assert release in built


def test_prod_is_refused_until_an_independent_signed_approval(world):
    refused = world["refused"]
    assert not refused.success
    assert not refused.get_asset_materialization_events()
    checks = {e.check_name: e for e in refused.get_asset_check_evaluations()}
    assert checks["approval"].passed is False and checks["rollback_path"].passed is False
    assert checks["fairness"].passed is True
    waiting = checks["approval"].metadata["verdict"].value
    assert waiting.startswith("waiting for approval by mira, pat: run onepath approve credit_risk --version ")
    kinds = [(e.kind, e.env) for e in world["ledger"].entries(subject="credit_scoring")]
    assert ("promotion_refused", "prod") in kinds and ("deploy", "prod") in kinds
    assert kinds.index(("promotion_refused", "prod")) < kinds.index(("deploy", "prod"))
    approval = world["ledger"].entries(kind="approval", subject="credit_risk")[0]
    assert approval.actor == "mira" and approval.data["first_release"] is True
    card = meta(world["first"], "credit_scoring_prod")["model_card"]
    assert "## Approvals" in card and "mira" in card and "## Fairness" in card
    assert meta(world["first"], "credit_scoring_prod")["model_card_html"].endswith(".html")


@pytest.mark.parametrize("args,message", [
    (["--as", "carla", "--key", str(DEMO_KEYS / "carla.key")], "approval refused: carla is in the owning team 'credit-risk'"),
    (["--as", "mira", "--key", str(DEMO_KEYS / "mira.key"), "--env", "qa"], "'qa' is not an environment of credit_risk"),
    (["--as", "mira", "--key", str(DEMO_KEYS / "mira.key"), "--version", "999"],
     "credit_risk version 999 has no model_registered ledger entry"),
    (["--as", "nobody"], "no private key at"),
])
def test_cli_approval_refusals(world, args, message):
    base = {"--version": meta(world["first"], "credit_risk")["model_version"], "--env": "prod"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    flat = [x for kv in base.items() for x in kv]
    out = run_cli("approve", "credit_risk", *flat, "--reason", "looks fine")
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_model_version_carries_lineage_that_recomputes(world):
    result, mlflow = world["first"], world["mlflow"]
    m = meta(result, "credit_risk")
    version = mlflow.get_version("credit_risk", m["model_version"])
    tags = version.tags
    assert tags["onepath.dataset_key"] == "credit_applications"
    assert tags["onepath.dagster_run_id"] == result[0].run_id
    ds = meta(result, "credit_applications")
    df = __import__("pandas").read_parquet(ds["path"])
    assert dataframe_hash(df) == tags["onepath.data_hash"] == ds["data_hash"]
    trainer = ROOT / "assets" / "credit" / "trainer.py"
    assert tags["onepath.code_hash"] == hashlib.sha256(trainer.read_bytes()).hexdigest()
    assert tags["onepath.code_path"] == "assets/credit/trainer.py"
    assert m["mlflow_version"].endswith(f"/models/credit_risk/versions/{m['model_version']}")
    run = mlflow.client().get_run(version.run_id)
    assert run.data.metrics["roc_auc"] == pytest.approx(m["held_out_roc_auc"])
    # the signature excludes PII, protected attributes, ids and the label
    import mlflow.models

    mlflow.set_tracking_uri(world["mlflow"].tracking_uri)  # the fluent API reads the process's URI: this world's
    mlflow.set_registry_uri(world["mlflow"].registry_uri or world["mlflow"].tracking_uri)
    sig = mlflow.models.get_model_info(f"models:/credit_risk/{m['model_version']}").signature
    names = set(sig.inputs.input_names())
    assert not names & {"full_name", "national_id", "email", "gender", "age_band", "application_id", "defaulted"}
    assert "debt_to_income" in names


def test_endpoints_serve_at_stable_addresses_with_aliases(world):
    result, mlflow = world["first"], world["mlflow"]
    version = meta(result, "credit_risk")["model_version"]
    aliases = mlflow.aliases("credit_risk")
    for env in ("staging", "prod"):
        m = meta(result, f"credit_scoring_{env}")
        assert m["model_version"] == version
        seen = probe(m["address"])
        assert seen and seen["version"] == version == aliases[env]
    churn_aliases = mlflow.aliases("churn")
    assert probe(meta(result, "churn_scoring_prod")["address"])["version"] == churn_aliases["prod"]


def test_prediction_over_http_and_inference_log_without_pii(world):
    result, settings = world["first"], world["settings"]
    address = meta(result, "credit_scoring_prod")["address"]
    df = __import__("pandas").read_parquet(meta(result, "credit_applications")["path"])
    row = json.loads(df.drop(columns=["defaulted"]).head(1).to_json(orient="records"))[0]
    out = post(address + "/predict", row, {"x-request-id": "graph-test-1",
                                           **cli_headers(CALLER["book"], CALLER["deployer"], "credit_scoring", "prod")})
    assert 0.0 <= out["predictions"][0]["probability"] <= 1.0
    log_dir = settings.inference_log_dir / "credit_scoring" / "prod"
    text = "".join(p.read_text() for p in log_dir.glob("*.jsonl"))
    for pii in ("full_name", "national_id", "email"):
        assert pii not in text and str(row[pii]) not in text
    entry = [json.loads(line) for line in text.splitlines() if "graph-test-1" in line][0]
    assert entry["extras"]["application_id"] == row["application_id"]
    assert "gender" in entry["extras"]  # passed through for fairness monitoring; not a model input
    assert "gender" not in entry["inputs"]


def test_app_release_calls_the_prod_endpoint(world):
    result = world["first"]
    app = meta(result, "loan_portal_prod")
    assert app["release_version"] == meta(result, "loan_portal")["release_version"]
    assert app["calls"]["ONEPATH_CREDIT_SCORING_URL"] == meta(result, "credit_scoring_prod")["address"]
    out = post(app["address"] + "/api/apply", {
        "full_name": "Test Person", "national_id": "000-00-0000", "email": "t@example.com", "gender": "M",
        "age_band": "26-35", "annual_income": 48000, "loan_amount": 9000, "loan_term_months": 24,
        "debt_to_income": 0.25, "credit_history_years": 6, "num_open_accounts": 3, "delinquencies_2y": 0,
        "employment_type": "salaried", "home_ownership": "rent", "purpose": "car"})
    assert out["decision"] in ("approve", "refer", "decline")
    assert out["model_version"] == meta(result, "credit_scoring_prod")["model_version"]


def test_a_retrain_on_unchanged_data_is_not_promoted_and_the_ledger_says_so(world):
    defs, instance, first = world["defs"], world["instance"], world["first"]
    v1 = meta(first, "credit_risk")["model_version"]
    staging = meta(first, "credit_scoring_staging")["address"]
    again = materialize(defs, instance, ["credit_risk", "credit_scoring_staging"], raise_on_error=False)
    assert not again.success
    v_same = meta(again, "credit_risk")["model_version"]
    assert int(v_same) == int(v1) + 1 and probe(staging)["version"] == v1
    skipped = world["ledger"].entries(kind="promotion_skipped", subject="credit_scoring", env="staging")[-1]
    assert skipped.data["version"] == v_same and skipped.data["still_serving"] == v1
    assert "same data" in skipped.data["reason"] and "no better" in skipped.data["reason"]
    world["skipped_version"] = v_same


def test_retrain_goes_to_staging_then_prod_is_promoted_alone_without_touching_the_app(world):
    defs, instance, first, mlflow = world["defs"], world["instance"], world["first"], world["mlflow"]
    v1 = meta(first, "credit_risk")["model_version"]
    prod_address = meta(first, "credit_scoring_prod")["address"]
    app_address = meta(first, "loan_portal_prod")["address"]
    app_pid = probe(app_address)
    # new data (a later application period) makes a retrain worth promoting
    staged = dg.materialize(list(defs.assets), selection=["credit_applications", "credit_risk", "credit_scoring_staging"],
                            resources=defs.resources, instance=instance, run_config={"ops": {"credit_applications": {
                                "config": {"params": {"period_start": "2026-02-01", "period_end": "2026-07-31"}}}}})
    v2 = meta(staged, "credit_risk")["model_version"]
    assert int(v2) == int(world.get("skipped_version", v1)) + 1
    assert meta(staged, "credit_scoring_staging")["previous_version"] == v1
    assert probe(prod_address)["version"] == v1, "prod must not move until it is materialized"
    assert mlflow.aliases("credit_risk") == {"staging": v2, "prod": v1}

    waiting = materialize(defs, instance, ["credit_scoring_prod"], raise_on_error=False)
    assert not waiting.success and probe(prod_address)["version"] == v1
    verdicts = {e.check_name: e.passed for e in waiting.get_asset_check_evaluations()}
    assert verdicts["approval"] is False and verdicts["rollback_path"] is True  # v1 served prod before
    ok = run_cli("approve", "credit_scoring", "--version", v2, "--env", "prod", "--as", "pat", "--key", str(DEMO_KEYS / "pat.key"), "--reason", "ok")
    assert ok.returncode == 0, ok.stderr
    promoted = materialize(defs, instance, ["credit_scoring_prod"])  # picks the approval up
    m = meta(promoted, "credit_scoring_prod")
    assert m["model_version"] == v2 and m["previous_version"] == v1 and m["address"] == prod_address
    assert probe(prod_address)["version"] == v2
    assert mlflow.aliases("credit_risk")["prod"] == v2
    # the app was not redeployed: same release, same process, and it now gets v2's answers
    assert probe(app_address) == app_pid
    out = post(app_address + "/api/apply", {
        "full_name": "A B", "national_id": "1", "email": "a@example.com", "gender": "F", "age_band": "36-50",
        "annual_income": 70000, "loan_amount": 5000, "loan_term_months": 12, "debt_to_income": 0.1,
        "credit_history_years": 12, "num_open_accounts": 5, "delinquencies_2y": 0,
        "employment_type": "salaried", "home_ownership": "own", "purpose": "car"})
    assert out["model_version"] == v2


def test_a_notebook_version_without_lineage_is_refused_with_instructions(world, tmp_path):
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from tests.conftest import save_credit_model

    defs, instance, registry = world["defs"], world["instance"], world["mlflow"]
    staging = meta(world["first"], "credit_scoring_staging")["address"]
    serving = probe(staging)["version"]
    est = mlflow.sklearn.load_model(str(save_credit_model(tmp_path / "nb")))
    mlflow.set_tracking_uri(registry.tracking_uri)
    X = __import__("pandas").read_parquet(meta(world["first"], "credit_applications")["path"])[est.feature_names_in_]
    with mlflow.start_run(experiment_id=registry.experiment_id("notebooks")):
        info = mlflow.sklearn.log_model(est, name="model", signature=infer_signature(X, est.predict(X)),
                                        registered_model_name="credit_risk")
    version = str(info.registered_model_version)
    # before the handoff sensor has seen it, nothing vouches for it: the gate says how to get it registered
    r = materialize(defs, instance, ["credit_scoring_staging"], raise_on_error=False)
    assert not r.success and probe(staging)["version"] == serving
    lineage = {e.check_name: e for e in r.get_asset_check_evaluations()}["lineage"]
    assert lineage.passed is False and "no model_registered ledger entry" in lineage.metadata["verdict"].value
    assert "registry_handoff" in lineage.metadata["verdict"].value
    from sensors.handoff import tick

    tick(load_organisation(ROOT / "assets"), mlflow=registry, book=world["ledger"], cursor={})
    r = materialize(defs, instance, ["credit_scoring_staging"], raise_on_error=False)
    assert not r.success and probe(staging)["version"] == serving
    checks = {e.check_name: e for e in r.get_asset_check_evaluations()}
    assert checks["lineage"].passed is False
    assert "without onepath.dataset_key, onepath.data_hash, onepath.code_hash" in checks["lineage"].metadata["verdict"].value
    assert "Registering from a notebook" in checks["lineage"].metadata["verdict"].value
    assert checks["drift_ready"].passed is False and "reference_sample.parquet" in checks["drift_ready"].metadata["verdict"].value
    assert all(e.metadata["model_version"].value == version for e in checks.values())


def test_biased_data_is_refused_by_fairness_and_staging_keeps_serving(world):
    defs, instance = world["defs"], world["instance"]
    staging = meta(world["first"], "credit_scoring_staging")["address"]
    serving = probe(staging)["version"]
    biased = dg.materialize(list(defs.assets), selection=["credit_applications", "credit_risk",
                                                           "credit_scoring_staging"],
                            resources=defs.resources, instance=instance, raise_on_error=False,
                            run_config={"ops": {"credit_applications": {"config": {"params": {"biased": True}}}}})
    assert not biased.success
    version = meta(biased, "credit_risk")["model_version"]
    checks = {e.check_name: e for e in biased.get_asset_check_evaluations() if e.asset_key.path == ["credit_scoring_staging"]}
    fairness = checks["fairness"]
    assert fairness.passed is False
    assert fairness.metadata["gender_dir"].value < 0.8
    assert "gender" in fairness.metadata["verdict"].value and "DIR" in fairness.metadata["verdict"].value
    assert "| F |" in fairness.metadata["per_group"].value
    assert probe(staging)["version"] == serving != version
    refusal = world["ledger"].entries(kind="promotion_refused", subject="credit_scoring", env="staging")[-1]
    assert refusal.data["version"] == version and "fairness" in refusal.data["failed"]
    # the fair world again, for whatever runs next
    materialize(defs, instance, ["credit_applications"])


def test_ledger_verifies_after_all_of_it(world):
    out = run_cli("audit", "verify")
    assert out.returncode == 0 and out.stdout.startswith("ledger intact: "), out.stdout + out.stderr


def test_failed_expectations_block_the_model(settings, tmp_path):
    src = (ROOT / "assets" / "retention" / "defs.yaml").read_text()
    bad = (src.replace("name: customer_activity", "name: tight_activity")
              .replace("dataset: customer_activity", "dataset: tight_activity")
              .replace("name: churn\n", "name: tight_churn\n")
              .replace("model: churn", "model: tight_churn")
              .replace("name: churn_scoring", "name: tight_scoring")
              .replace("endpoint: churn_scoring", "endpoint: tight_scoring")
              .replace("{name: logins_30d, dtype: int, min: 0}", "{name: logins_30d, dtype: int, min: 0, max: 3}"))
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "defs.yaml").write_text(bad)
    defs = build_definitions(org=load_organisation(tmp_path), settings=settings)
    with dg.instance_for_test() as instance:
        r = dg.materialize(list(defs.assets), selection=["tight_activity", "tight_churn"],
                           resources=defs.resources, instance=instance, raise_on_error=False)
        assert not r.success
        evals = {e.check_name: e for e in r.get_asset_check_evaluations()}
        assert evals["expectations"].passed is False
        failures = evals["expectations"].metadata["failures"].value
        assert "logins_30d" in failures and "expect_column_values_to_be_between" in failures
        assert [e.materialization.asset_key.to_user_string() for e in r.get_asset_materialization_events()] \
            == ["tight_activity"]
        # run alone, the model still refuses the failed snapshot
        r2 = dg.materialize(list(defs.assets), selection=["tight_churn"], resources=defs.resources,
                            instance=instance, raise_on_error=False)
        assert not r2.success
        failure = [e for e in r2.all_events if e.event_type_value == "STEP_FAILURE"][0]
        assert "failed its expectations" in str(failure.event_specific_data.error)


def test_each_ml_check_refuses_a_version_that_fails_it(world):
    """The gate on the live world with one threshold tightened at a time: each check refuses on its own."""
    from platform_defs.governance.gates import ModelGate
    from platform_defs.loader import load_organisation
    from platform_defs.policy import load_policy

    org, policy = load_organisation(ROOT / "assets"), load_policy()
    resources = world["defs"].resources
    ep, model = org.by_name["credit_scoring"], org.by_name["credit_risk"]
    dataset = org.by_name["credit_applications"]
    features, label = org.model_features(model)
    version = meta(world["first"], "credit_scoring_prod")["model_version"]

    def verdicts(**over):
        args = dict(endpoint=ep, model=model, dataset=dataset, features=features, label=label, policy=policy,
                    mlflow=resources["mlflow"], data_store=resources["data_store"], ledger=world["ledger"],
                    deployer=resources["deployer_local"].deployer(), instance=world["instance"])
        args.update(over)
        return {v.check: v for v in ModelGate(**args).evaluate(version, "staging")}

    baseline = verdicts()
    assert all(v.passed for v in baseline.values()), {k: v.summary for k, v in baseline.items()}

    strict_model = model.model_copy(update={"metrics": {"roc_auc": 0.99}})
    v = verdicts(model=strict_model)["performance"]
    assert not v.passed and "roc_auc" in v.summary and "≥ 0.99" in v.summary

    tight = dataset.model_copy(update={"columns": [
        c.model_copy(update={"max": 50_000}) if c.name == "annual_income" else c for c in dataset.columns]})
    v = verdicts(dataset=tight)["data_quality"]
    assert not v.passed and "annual_income" in v.markdown["failures"]

    unfair = policy.model_copy(update={"tracks": {**policy.tracks, "ml-high-risk": policy.track("ml-high-risk").model_copy(
        update={"fairness": policy.track("ml-high-risk").fairness.model_copy(update={"min_disparate_impact_ratio": 0.999})})}})
    v = verdicts(policy=unfair)["fairness"]
    assert not v.passed and "DIR" in v.summary

    bigger_sample = policy.model_copy(update={"tracks": {**policy.tracks, "ml-high-risk": policy.track("ml-high-risk").model_copy(
        update={"reference_rows": 4400})}})
    v = verdicts(policy=bigger_sample)["drift_ready"]
    assert not v.passed and "policy wants 4400" in v.summary

    # the version trained on the biased data scored a lower held-out AUC than what prod serves
    biased = [e.data["version"] for e in world["ledger"].entries(kind="promotion_refused", subject="credit_scoring")
              if "fairness" in e.data.get("failed", [])][-1]
    regress = policy.model_copy(update={"tracks": {**policy.tracks, "ml-high-risk": policy.track("ml-high-risk").model_copy(
        update={"checks": ["no_regression"], "regression_margin": 0.0})}})
    gate = ModelGate(endpoint=ep, model=model, dataset=dataset, features=features, label=label, policy=regress,
                     mlflow=resources["mlflow"], data_store=resources["data_store"], ledger=world["ledger"],
                     deployer=resources["deployer_local"].deployer(), instance=world["instance"])
    v = gate.evaluate(biased, "staging")[0]
    prod_now = probe(meta(world["first"], "credit_scoring_prod")["address"])["version"]
    assert v.check == "no_regression" and not v.passed and f"served in prod (v{prod_now})" in v.summary


# -- the same world through the sensor and the command line (keep these last: `down` ends it) --


def test_endpoint_status_sensor_observes_serving_and_next_versions(world):
    defs, instance, mlflow = world["defs"], world["instance"], world["mlflow"]
    sensor = defs.resolve_sensor_def("endpoint_status")
    ctx = dg.build_sensor_context(instance=instance, resources=defs.resources)
    result = sensor(ctx)
    obs = {e.asset_key.to_user_string(): {k: v.value for k, v in e.metadata.items()} for e in result.asset_events}
    aliases = mlflow.aliases("credit_risk")
    assert obs["credit_scoring_prod"]["serving_version"] == aliases["prod"]
    assert obs["credit_scoring_prod"]["alias_matches_server"] is True
    assert obs["credit_scoring_staging"]["would_deploy"] == mlflow.latest_version("credit_risk")
    assert obs["credit_scoring_prod"]["would_deploy"] == aliases["staging"]
    assert obs["loan_portal_prod"]["healthy"] is True
    assert set(obs) == {"credit_scoring_staging", "credit_scoring_prod", "churn_scoring_staging",
                        "churn_scoring_prod", "loan_portal_staging", "loan_portal_prod"}
    again = sensor(dg.build_sensor_context(instance=instance, resources=defs.resources, cursor=ctx.cursor))
    assert isinstance(again, dg.SkipReason) and "no change" in again.skip_message


def test_cli_status_reports_live_versions(world):
    out = run_cli("status", "--json")
    assert out.returncode == 0, out.stderr
    rows = {(r["name"], r["env"]): r for r in json.loads(out.stdout)}
    mlflow = world["mlflow"]
    assert rows[("credit_scoring", "prod")]["version"] == mlflow.aliases("credit_risk")["prod"]
    assert all(r["healthy"] for r in rows.values())
    text = run_cli("status", "--env", "prod")
    assert text.returncode == 0
    assert "credit_scoring" in text.stdout and "staging" not in text.stdout and "healthy" in text.stdout


def test_cli_down_stops_everything(world):
    addresses = [meta(world["first"], k)["address"] for k in ("credit_scoring_prod", "loan_portal_prod")]
    out = run_cli("down")
    assert out.returncode == 0 and "stopped 6 environment(s)" in out.stdout, out.stdout + out.stderr
    assert all(probe(a) is None for a in addresses)
    status = json.loads(run_cli("status", "--json").stdout)
    assert not any(r["healthy"] for r in status)
    assert run_cli("down").stdout.startswith("stopped 0 environment(s)")

