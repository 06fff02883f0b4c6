"""``onepath register models:/NAME/VERSION`` ADOPTS a version logged with plain MLflow: the version printed,
signed, recorded in the ledger and pinned in the declaration is that version, no new version is logged, and
the digest it signed is the one a deploy verifies (a deploy to staging through the gates proves it). Each
``onepath register`` runs as its own process, as a user runs it, against an isolated onepath home."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from platform_defs.settings import PROJECT_ROOT
from tests.conftest import cli_headers, isolated_settings, quick_policy, record_policy

KEY = PROJECT_ROOT / "assets" / "demo_identities" / "carla.key"
COMMIT = "4f1c2a9e8b7d6c5f4e3d2c1b0a9f8e7d6c5b4a39"


def _frames():
    import numpy as np
    import pandas as pd
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(5)
    n = 1000
    df = pd.DataFrame({"amount": rng.gamma(2, 50, n), "hour": rng.integers(0, 24, n).astype(float),
                       "age_band": rng.choice(["18-30", "31-50", "51+"], n)})
    df["is_fraud"] = ((df.amount > 150) | (rng.random(n) < 0.1)).astype(int)
    return train_test_split(df, test_size=0.3, random_state=2, stratify=df.is_fraud)


def _log_with_plain_mlflow(world, name: str, model, X, run_tags: dict | None = None, **kw) -> str:
    """What a data scientist does without onepath: log and register the model with MLflow alone."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    # the fluent API's tracking URI is process-wide: set it for this log only, and leave no active experiment
    tracking_uri = world["settings"].mlflow_tracking_uri
    saved = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        exp = client.get_experiment_by_name(f"plain-{name}")
        exp_id = exp.experiment_id if exp else client.create_experiment(
            f"plain-{name}", artifact_location=(world["root"] / "plain-mlflow").as_uri())
        with mlflow.start_run(experiment_id=exp_id, tags=run_tags):
            info = mlflow.sklearn.log_model(model, name="model", registered_model_name=name,
                                            signature=infer_signature(X, model.predict(X)), **kw)
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    from platform_defs.wiring import build_resources

    root = tmp_path_factory.mktemp("adopt")
    iso = isolated_settings(settings, root / "home", port_offset=85)
    policy = quick_policy()
    policy_file = root / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=True))
    resources = build_resources(iso)
    record_policy(resources["ledger"].ledger(), path=policy_file)  # the file the CLI reads is the recorded one
    decl = root / "assets"
    for team in ("credit", "retention"):
        shutil.copytree(PROJECT_ROOT / "assets" / team, decl / team)
    train, test = _frames()
    train.to_parquet(root / "train.parquet", index=False)
    test.to_parquet(root / "test.parquet", index=False)
    env = {**os.environ, "ONEPATH_HOME": str(iso.home), "DAGSTER_HOME": str(iso.dagster_home),
           "ONEPATH_DECLARATIONS_DIR": str(decl), "ONEPATH_POLICY_FILE": str(policy_file),
           "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)

    def onepath(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "platform_defs.cli", *args], cwd=PROJECT_ROOT, env=env,
                              text=True, capture_output=True, timeout=600, check=False)

    return {"settings": iso, "resources": resources, "policy": policy, "decl": decl, "root": root,
            "train": train, "test": test, "onepath": onepath}


def _register_args(world, uri: str, *extra: str, train: str = "train.parquet") -> list[str]:
    root = world["root"]
    return ["register", uri, "--train", str(root / train), "--test", str(root / "test.parquet"),
            "--label", "is_fraud", "--owner", "retention", "--protected", "age_band", "--as", "carla",
            "--key", str(KEY), *extra]


def test_register_adopts_the_mlflow_version_and_a_staging_deploy_passes_the_gates(world):
    import httpx
    from sklearn.linear_model import LogisticRegression

    from platform_defs.loader import load_organisation
    from platform_defs.notebook import version_to_promote
    from platform_defs.promotion import Services, promote_endpoint
    from platform_defs.registration import CODE_RECORD, registration
    from resources.artifact_digest import folder_digest

    train, test, resources = world["train"], world["test"], world["resources"]
    mlflow, book = resources["mlflow"], resources["ledger"].ledger()
    model = LogisticRegression().fit(train[["amount", "hour"]], train.is_fraud)
    # MLflow's defaults (the pinned MLflow 3 stores sklearn models in skops format by default); the commit is
    # the tag MLflow sets itself when the training script runs in a git checkout (fixed here, so the test
    # does not depend on where it runs)
    version = _log_with_plain_mlflow(world, "fraud", model,
                                     train[["amount", "hour"]], run_tags={"mlflow.source.git.commit": COMMIT})
    assert version == "1"
    mv = mlflow.get_version("fraud", "1")
    with_tags_before = dict(mv.tags or {})

    # a signature column the frames lack: one line naming it, and nothing is written onto the version
    train.drop(columns=["hour"]).to_parquet(world["root"] / "no_hour.parquet", index=False)
    bad = world["onepath"](*_register_args(world, "models:/fraud/1", train="no_hour.parquet"))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert bad.stderr.strip() == ("onepath register: models:/fraud/1: column 'hour' of the model's signature is "
                                  "not in the train frame"), bad.stderr
    assert dict(mlflow.get_version("fraud", "1").tags or {}) == with_tags_before
    assert registration(book, "fraud", "1") is None

    out = world["onepath"](*_register_args(world, "models:/fraud/1"))
    assert out.returncode == 0, out.stdout + out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("models:/fraud/1 adopted: registered as fraud version 1, pinned in "), out.stdout
    assert "PASS performance" in out.stdout and "fairness" in out.stdout

    # adopted, not copied: still one version, the declaration pins it, the ledger names it
    versions = sorted(str(v.version) for v in mlflow.client().search_model_versions("name = 'fraud'"))
    assert versions == ["1"], versions
    written = (world["decl"] / "retention" / "defs.yaml").read_text()
    assert "type: onepath.ModelLine\nattributes:\n  name: fraud\n" in written and "  version: 1\n" in written, written
    entry = registration(book, "fraud", "1")
    assert entry is not None and entry.data["version"] == "1" and entry.data["run_id"] == mv.run_id
    assert entry.data["author"] == "carla" and entry.data["author_verified"] is True, entry.data
    # the digest signed and recorded is the digest of the folder MLflow serves for version 1
    with tempfile.TemporaryDirectory() as tmp:
        assert entry.data["digest"] == folder_digest(mlflow.fresh_copy("fraud", "1", Path(tmp)))
    tags = dict(mlflow.get_version("fraud", "1").tags or {})
    assert tags["onepath.signed_by"] == "carla" and tags["onepath.source"] == "mlflow"
    assert tags["onepath.data_hash"] == entry.data["data_hash"]
    # onepath's artifacts went onto the version's own run; the code record says what the run said of its code
    with tempfile.TemporaryDirectory() as tmp:
        assert mlflow.run_artifact(mv.run_id, "onepath/reference_sample.parquet", Path(tmp)) is not None
        code = mlflow.run_artifact(mv.run_id, CODE_RECORD, Path(tmp)).read_text()
    assert "adopted by onepath" in code and "onepath register models:/fraud/1" in code, code
    assert f"mlflow.source.git.commit: {COMMIT}" in code
    assert entry.data["code_known"] is True and entry.data["code_path"].endswith(f"at git commit {COMMIT}")

    # registering it again is refused, in one line, and signs nothing anew
    again = world["onepath"](*_register_args(world, "models:/fraud/1"))
    assert again.returncode == 1 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert again.stderr.startswith("onepath register: already registered by onepath: models:/fraud/1 (signed by "
                                   "carla, ledger #"), again.stderr
    assert len([e for e in book.entries(kind="model_registered", subject="fraud")]) == 1

    os.environ["ONEPATH_DECLARATIONS_DIR"] = str(world["decl"])
    try:
        org = load_organisation(world["decl"], world["policy"])
    finally:
        os.environ.pop("ONEPATH_DECLARATIONS_DIR")
    assert version_to_promote(org, "fraud", book, mlflow)[:3:2] == ("1", [])
    # the registry_handoff sensor leaves a notebook model alone: no registration from tags, no run over the pin
    from sensors.handoff import tick

    _events, requests, _notes, _cursor = tick(org, mlflow=mlflow, book=book, cursor={}, policy=world["policy"])
    assert not [r for r in requests if "fraud" in str(r.asset_selection)], requests
    assert not book.entries(kind="handoff", subject="fraud")

    # the real proof: the gates pass the adopted version and the deployer serves exactly its files
    services = Services(mlflow=mlflow, deployer=resources["deployer_local"].deployer(), ledger=book,
                        data_store=resources["data_store"])
    try:
        result = promote_endpoint(org, world["policy"], "fraud_scoring", "staging", services=services,
                                  actor="test", trigger="test")
        assert result.version == "1"
        deploy = book.entries(kind="deploy", subject="fraud_scoring", env="staging")[-1]
        assert deploy.data["version"] == "1" and deploy.data["digest"] == entry.data["digest"], deploy.data
        probe = test.head(10)[["amount", "hour"]]
        headers = cli_headers(book, services.deployer, "fraud_scoring", "staging", org)
        resp = httpx.post(f"{result.address}/predict", json={"records": probe.to_dict(orient="records")},
                          headers=headers, timeout=30)
        assert resp.status_code == 200 and resp.json()["version"] == "1", resp.text
        got = [p["probability"] for p in resp.json()["predictions"]]
        assert got == pytest.approx(model.predict_proba(probe)[:, 1].tolist(), abs=1e-6)
    finally:
        services.deployer.stop_all()

    # lineage, as a track that requires it checks it: the code record on the run still hashes to the code hash
    # registered; changed on the run afterwards (MLflow's artifacts are client-writable), it fails, naming it
    from platform_defs.governance.gates import _Version
    from platform_defs.promotion import _model_gate

    gate = _model_gate(org.by_name["fraud_scoring"], org.by_name["fraud"], org.by_name["fraud_data"], org,
                       world["policy"], services)
    lineage = gate._check_lineage(_Version(gate, "1"), "staging")
    assert lineage.passed, lineage.summary
    forged = world["root"] / "forged" / "source.py"
    forged.parent.mkdir()
    forged.write_text("# another story\n")
    mlflow.log_run_artifact(mv.run_id, forged, "onepath/code")
    lineage = gate._check_lineage(_Version(gate, "1"), "staging")
    assert not lineage.passed and "code record hashes to" in lineage.summary, lineage.summary
    assert "changed after registration" in lineage.summary


def test_code_of_an_adopted_version_is_known_only_by_a_git_commit_and_unknown_code_fails_lineage():
    from types import SimpleNamespace

    from platform_defs.governance.gates import ModelGate
    from platform_defs.notebook import adopted_code_record

    h, where, text, known = adopted_code_record({"mlflow.source.name": "train.py", "mlflow.source.git.commit": COMMIT,
                                                 "mlflow.user": "x"}, "models:/fraud/3", "onepath register ...")
    assert known and where == f"train.py at git commit {COMMIT}" and "mlflow.user" not in text
    assert hashlib.sha256(text.encode()).hexdigest() == h
    _, where, text, known = adopted_code_record({"mlflow.source.name": "train.py"}, "models:/fraud/3", "cmd")
    assert not known and "no git commit" in where and "# mlflow.source.name: train.py" in text
    _, where, _, known = adopted_code_record({}, "models:/fraud/3", "onepath register models:/fraud/3 --train t")
    assert not known and where.startswith("unknown: its MLflow run records no source")
    gate = ModelGate.__new__(ModelGate)
    problems = gate._code_record_problems(SimpleNamespace(version="3"), {"code_known": False, "code_path": where})
    assert len(problems) == 1, problems
    assert problems[0].startswith("version 3 was registered without knowing its code (unknown: its MLflow run")
    assert "git checkout" in problems[0]


def test_register_refuses_a_pickled_version_in_one_line_and_touches_nothing(world):
    from sklearn.linear_model import LogisticRegression

    train, mlflow = world["train"], world["resources"]["mlflow"]
    model = LogisticRegression().fit(train[["amount", "hour"]], train.is_fraud)
    version = _log_with_plain_mlflow(world, "fraud_pickled", model,
                                     train[["amount", "hour"]], serialization_format="cloudpickle")
    out = world["onepath"](*_register_args(world, f"models:/fraud_pickled/{version}"))
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "onepath will not load it" in out.stderr and "skops" in out.stderr, out.stderr
    assert not any(k.startswith("onepath.") for k in (mlflow.get_version("fraud_pickled", version).tags or {}))
    missing = world["onepath"](*_register_args(world, "models:/fraud_pickled/9"))
    assert missing.returncode == 1 and "is not in MLflow's registry" in missing.stderr, missing.stderr
