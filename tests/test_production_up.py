"""`onepath up --profile production` on one machine: every store on a real PostgreSQL server and moto's S3 server
on loopback, a witness as its own OS user, identities made with `onepath keys init` and recorded in the policy.

The promotion path runs through the platform's daemon as a user drives it from the UI (GraphQL launches): the
dataset, the model, staging, an independent approval, two promotions of prod at once (exactly one deploys), the
bake on real traffic, and one tick of the drift sensor reading the inference log's segments from the bucket. The
profile refuses to start on an embedded store or a policy in demo mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml
from dagster_graphql import DagsterGraphQLClient

from tests.conftest import _free_port_base, onepath_env, wait_for
from tests.test_platform_up import LOCATION_QUERY, free_port, gql, launch_assets, ledger_text, stop_automation, wait_run
from tests.test_witness import WitnessProcess, public_folder, venv_readable_by_the_witness, witness_user  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "onepath-prod"
IDENTITIES = {"pat": ("platform", ["platform_admin", "model_approver"]), "mira": ("model-risk", ["model_approver"]),
              "carla": ("credit-risk", []), "rob": ("digital-lending", ["code_reviewer"])}
DRIFT_CHECK = """query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
  assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization {
    runId status evaluation { success } } } } } } } }"""
DRIFT_RUNS = """{ runsOrError(filter: {tags: [{key: "dagster/sensor_name", value: "drift"}]}) {
  ... on Runs { results { runId status } } } }"""


def cli(env: dict[str, str], *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "platform_defs.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert not check or done.returncode == 0, f"onepath {' '.join(argv)}: {done.stdout}\n{done.stderr}"
    return done


def production_policy(tmp_path: Path, public_keys: dict[str, str]) -> Path:
    """The example policy with demo mode off and its identities' keys made by `onepath keys init`; the credit
    track's bake and drift sized for a test (a 6 s bake on 5 requests; one check, after 150 new rows)."""
    policy = yaml.safe_load((ROOT / "assets" / "policy.yaml").read_text())
    policy["demo"] = False
    policy["identities"] = {name: {"team": team, "roles": roles, "public_key": public_keys[name],
                                   **({"git_emails": ["rob@lending.example"]} if name == "rob" else {})}
                            for name, (team, roles) in IDENTITIES.items()}
    track = policy["tracks"]["ml-high-risk"]
    track["drift"].update({"min_new_rows": 150, "window_rows": 300, "min_rows": 100, "min_check_interval_minutes": 30})
    # the latency bound is for a 2-core machine running the whole platform, the trainers and the traffic at once
    # (200 ms failed a bake there at 250 ms and rolled it back, as it should)
    track["bake"].update({"seconds": 6, "min_requests": 5, "poll_seconds": 0.5, "max_p99_latency_ms": 2000})
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stores(postgres, moto_s3) -> dict[str, str]:
    """The production settings of one installation: its databases, its bucket, the platform key in the
    environment only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    moto_s3.client("s3").create_bucket(Bucket=BUCKET)
    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()).decode()
    return {
        "ONEPATH_PLATFORM_KEY": pem,
        "ONEPATH_LEDGER_URL": postgres.create_database("prod_ledger"),
        "MLFLOW_TRACKING_URI": postgres.create_database("prod_mlflow"),
        "ONEPATH_DAGSTER_PG_HOST": "127.0.0.1", "ONEPATH_DAGSTER_PG_PORT": str(postgres.port),
        "ONEPATH_DAGSTER_PG_USER": "onepath", "ONEPATH_DAGSTER_PG_PASSWORD": postgres.password,
        "ONEPATH_DAGSTER_PG_DB": postgres.create_database("prod_dagster").rsplit("/", 1)[-1],
        "ONEPATH_MLFLOW_ARTIFACTS": f"s3://{BUCKET}/mlflow", "ONEPATH_DATA_URL": f"s3://{BUCKET}/data",
        "ONEPATH_INFERENCE_LOG_URL": f"s3://{BUCKET}/logs", "ONEPATH_RELEASES_URL": f"s3://{BUCKET}/releases",
        "ONEPATH_OUTCOMES_URL": f"s3://{BUCKET}/feedback", "ONEPATH_DRIFT_REPORTS_URL": f"s3://{BUCKET}/reports",
        "AWS_ACCESS_KEY_ID": "platform", "AWS_SECRET_ACCESS_KEY": "platform-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": moto_s3.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": moto_s3.endpoint_url,
        "ONEPATH_S3_ADDRESSING_STYLE": "path",
        "ONEPATH_INFERENCE_LOG_AWS_ACCESS_KEY_ID": "log-writer",
        "ONEPATH_INFERENCE_LOG_AWS_SECRET_ACCESS_KEY": "log-writer-secret",
        "ONEPATH_INFERENCE_LOG_FLUSH_SECONDS": "1",
        "ONEPATH_PORT_BASE": str(_free_port_base()),
    }


@pytest.fixture(scope="module")
def platform(stores, witness_user, tmp_path_factory) -> Iterator[tuple]:
    """Identities from `onepath keys init`, the policy recorded with the witness pinned, then `onepath up
    --profile production` (no MLflow UI: every process writes MLflow's artifacts to the bucket itself)."""
    from resources.approvals import public_key_b64
    from cryptography.hazmat.primitives import serialization

    tmp_path = tmp_path_factory.mktemp("production")
    base = public_folder()
    platform_key = public_key_b64(serialization.load_pem_private_key(stores["ONEPATH_PLATFORM_KEY"].encode(), None))
    witness = WitnessProcess(witness_user, base, platform_key)
    port = free_port()
    env = {**onepath_env(tmp_path / "home", port), **stores, "ONEPATH_PROFILE": "production",
           "ONEPATH_WITNESS_SOCKET": str(witness.socket)}
    keys: dict[str, Path] = {}
    public: dict[str, str] = {}
    for name in IDENTITIES:
        done = cli(env, "keys", "init", "--identity", name)
        keys[name] = tmp_path / "home" / "keys" / "identities" / f"{name}.key"
        public[name] = done.stdout.split('public_key: "')[1].split('"')[0]
    env["ONEPATH_POLICY_FILE"] = str(production_policy(tmp_path, public))
    cli(env, "policy", "init", "--as", "pat", "--key", str(keys["pat"]))
    log = tmp_path / "up.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "platform_defs.cli", "up", "--profile", "production",
                                 "--no-mlflow-ui"], cwd=ROOT, env={k: v for k, v in env.items() if k != "ONEPATH_PROFILE"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def loaded() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return bool(gql(port, LOCATION_QUERY)["workspaceOrError"]["locationEntries"])
            except httpx.HTTPError:
                return False

        wait_for("the production platform's code location", loaded, 240, poll=0.5)
        yield DagsterGraphQLClient("127.0.0.1", port_number=port), port, env, keys, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=90)
        from resources.deployers.local import LocalProcessDeployer

        LocalProcessDeployer(tmp_path / "home" / "run").stop_all()
        witness.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_the_promotion_path_runs_on_postgresql_and_s3(platform, stores, moto_s3, postgres):
    """v1 through staging and an approval to prod; live traffic, which the drift sensor finds in the bucket and
    has checked; v2 (trained on a later period) through staging and an approval, then two promotions of prod at
    once: one deploys, and v2 bakes on the live traffic."""
    client, port, env, keys, tmp_path = platform
    from resources.ledger import Ledger

    # only what this test launches deploys (the drift sensor keeps running)
    stop_automation(port, ("onepath_automation", "approved_promotions"))
    book = Ledger(stores["ONEPATH_LEDGER_URL"], tmp_path / "home" / "keys" / "platform.key",
                  private_key_pem=stores["ONEPATH_PLATFORM_KEY"])

    def deploys(env_name: str) -> list:
        return [e for e in book.entries(kind="deploy", subject="credit_scoring") if e.env == env_name]

    def approve(version: str, *first: str) -> None:
        # mira (model-risk, outside the owning team) with the key `keys init` made her
        cli(env, "approve", "credit_risk", "--version", version, "--env", "prod", *first,
            "--reason", "fairness and explainability reviewed", "--as", "mira", "--key", str(keys["mira"]))

    def materialize(*assets: str, run_config: dict | None = None) -> None:  # the gate is in the asset
        run = launch_assets(port, list(assets), checks=False, run_config=run_config)
        assert wait_run(client, run, 600) == "SUCCESS", ledger_text(book)

    materialize("credit_applications", "credit_risk", "credit_scoring_staging")
    v1 = deploys("staging")[-1].data["version"]
    approve(v1, "--first-release")
    materialize("credit_scoring_prod")
    assert [e.data["version"] for e in deploys("prod")] == [v1], ledger_text(book)

    traffic = subprocess.Popen(
        [sys.executable, "-m", "platform_defs.cli", "simulate-traffic", "credit_scoring", "--env", "prod",
         "--rate", "30", "--label-delay", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        # one drift sensor tick: it counts the rows the prod workers flushed to the bucket and asks for the drift
        # check, which reads them back from there (undrifted traffic: it passes)
        def drift_run() -> str | None:
            runs = gql(port, DRIFT_RUNS)["runsOrError"]["results"]
            return next((r["runId"] for r in runs if r["status"] in ("SUCCESS", "FAILURE")), None)

        run_id = wait_for("a run of the drift check the drift sensor asked for", drift_run, 420, poll=1)
        node = gql(port, DRIFT_CHECK, {"k": {"path": ["credit_scoring_prod"]}})["assetNodeOrError"]
        (check,) = [c for c in node["assetChecksOrError"]["checks"] if c["name"] == "input_drift"]
        execution = check["executionForLatestMaterialization"]
        assert execution["runId"] == run_id and execution["status"] == "SUCCEEDED", execution
        assert execution["evaluation"]["success"] is True, execution
        stop_automation(port, ("drift",))  # one check is enough: the next would only cost CPU

        # v2, trained on a later period, through staging; an approval; two promotions of prod at once, as two
        # people pressing Materialize: exactly one deploys, and v2 bakes on the live traffic
        later = {"ops": {"credit_applications": {"config": {"params": {"period_start": "2026-02-01",
                                                                       "period_end": "2026-07-31"}}}}}
        materialize("credit_applications", "credit_risk", "credit_scoring_staging", run_config=later)
        v2 = deploys("staging")[-1].data["version"]
        assert v2 != v1, ledger_text(book)
        approve(v2)
        runs = [launch_assets(port, ["credit_scoring_prod"], checks=False) for _ in range(2)]
        assert [wait_run(client, run, 600) for run in runs] == ["SUCCESS", "SUCCESS"], ledger_text(book)
        assert [e.data["version"] for e in deploys("prod")] == [v1, v2], ledger_text(book)
        (baked,) = book.entries(kind="bake_passed", subject="credit_scoring")
        assert baked.env == "prod" and baked.data["version"] == v2, baked.data
        verdict = [e for e in book.entries(kind="gate_verdict", subject="credit_scoring") if e.env == "prod"][-1]
        assert verdict.data["verdicts"]["approval"]["passed"], verdict.data
        assert traffic.poll() is None, traffic.stdout.read().decode()[-2000:]
    finally:
        os.killpg(traffic.pid, signal.SIGINT)
        traffic.wait(timeout=60)

    # every store is the production one: nothing of it under $ONEPATH_HOME
    home = tmp_path / "home"
    assert not (home / "ledger.db").exists() and not (home / "mlflow.db").exists()
    assert not list((home / "dagster_home").glob("*.db")) and not (home / "dagster_home" / "history").exists()
    assert not list((home / "data").rglob("*.parquet")) and not list((home / "inference_logs").rglob("*.jsonl"))
    assert not list((home / "outcomes").rglob("*.jsonl")) and not list((home / "drift_reports").rglob("*.html"))
    s3 = moto_s3.client("s3")
    keys_in = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
               for o in page.get("Contents", [])]
    for prefix in ("data/credit_applications/", "mlflow/", "logs/inference/credit_scoring/prod/",
                   "feedback/outcomes/credit_scoring/prod/", "reports/drift_reports/credit_scoring/prod/"):
        assert any(k.startswith(prefix) for k in keys_in), (prefix, keys_in[:20])
    import sqlalchemy as sa

    engine = sa.create_engine(postgres.url(stores["ONEPATH_DAGSTER_PG_DB"]))
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from runs")).scalar() >= 3
    engine.dispose()
    verified = cli(env, "audit", "verify")
    assert f"countersigned up to #{book.entries()[-1].seq}" in verified.stdout, verified.stdout


def test_the_production_profile_refuses_embedded_stores_and_demo_mode(tmp_path):
    """Nothing starts: every embedded store is named with the setting that moves it, and the example's demo
    policy is refused, in one line each."""
    env = onepath_env(tmp_path / "home", free_port())
    env["ONEPATH_LEDGER_URL"] = f"sqlite:///{tmp_path / 'ledger.db'}"  # a URL, and still a file on this host
    done = cli(env, "up", "--profile", "production", "--no-mlflow-ui", check=False)
    assert done.returncode == 1, done.stdout
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("onepath: the production profile does not start: "), done.stderr
    for store, setting in (("dagster instance", "ONEPATH_DAGSTER_PG_HOST"), ("ledger", "ONEPATH_LEDGER_URL"),
                           ("mlflow artifacts", "ONEPATH_MLFLOW_ARTIFACTS"), ("witness", "ONEPATH_WITNESS_SOCKET"),
                           ("inference logs", "ONEPATH_INFERENCE_LOG_URL")):
        assert any(line.startswith(f"onepath: {store}: still embedded on this host; set {setting}") for line in lines), \
            done.stderr
    assert any("turns demo mode on (demo: true)" in line for line in lines), done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "home" / "dagster_home").exists()
