"""What serves and what is judged is checked by content digest, the way an attacker on the host would try it.

A world of its own (its MLflow store, ledger, data and ports): the credit dataset and model
materialized through the graph, so the ``model_registered`` entry is the one the model asset writes.
The attacker is the platform's own user (tier b): they can write the MLflow download cache, MLflow's
artifact store, version tags and run metrics and artifacts, and kill workers; they cannot sign
ledger entries.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from platform_defs.definitions import build_definitions
from platform_defs.governance.gates import ModelGate
from platform_defs.loader import load_organisation
from platform_defs.policy import load_policy
from platform_defs.registration import (
    KIND,
    explainability_record,
    record_registration,
    registered_digest,
    registration,
)
from resources.artifact_digest import ArtifactError, bytes_digest, folder_digest, read_folder
from resources.deployers.base import DeployError, DeploymentStatus, Release, Target, probe
from resources.mlflow_registry import ArtifactMismatch
from resources.serving.model_server import load_estimator
from resources.serving.protocol import EXIT_ARTIFACT_REFUSED
from tests.conftest import caller_headers, isolated_settings, quick_policy, record_test_registration, save_credit_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "credit_risk"


# -- the digest itself -------------------------------------------------------------------------


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "model.skops").write_bytes(b"weights")
    (root / "sub" / "extra.pkl").write_bytes(b"pickle")
    return root


def test_any_file_added_changed_or_removed_changes_the_digest(tmp_path):
    root = _folder(tmp_path / "m")
    base = folder_digest(root)
    assert base.startswith("sha256:") and len(base) == len("sha256:") + 64
    digest, files = read_folder(root)
    assert digest == base and files == {"MLmodel": b"flavors: {}\n", "model.skops": b"weights",
                                        "sub/extra.pkl": b"pickle"}
    seen = {base}

    def changed() -> str:
        d = folder_digest(root)
        assert d not in seen, "a change left the digest as it was"
        seen.add(d)
        return d

    (root / "sub" / "new.py").write_text("print('hi')")  # added, in a subfolder
    changed()
    (root / "sub" / "new.py").unlink()  # removed again: back to the original
    assert folder_digest(root) == base
    (root / "MLmodel").write_text("flavors: {python_function: {loader_module: evil}}\n")  # not just the weights
    changed()
    (root / "model.skops").write_bytes(b"weightS")  # one byte
    changed()
    (root / "model.skops").unlink()
    changed()
    (root / "model.skops").write_bytes(b"weightS")
    os.rename(root / "sub" / "extra.pkl", root / "sub" / "extra2.pkl")  # same bytes, other name
    changed()
    # a byte moved across a file boundary: framing makes these two folders differ
    a, b = _folder(tmp_path / "a"), _folder(tmp_path / "b")
    (a / "model.skops").write_bytes(b"ab")
    (a / "sub" / "extra.pkl").write_bytes(b"c")
    (b / "model.skops").write_bytes(b"a")
    (b / "sub" / "extra.pkl").write_bytes(b"bc")
    assert folder_digest(a) != folder_digest(b)
    (tmp_path / "empty").mkdir()
    assert folder_digest(tmp_path / "empty") != folder_digest(a)


def test_a_symlink_or_special_file_is_refused_naming_it(tmp_path):
    root = _folder(tmp_path / "m")
    (tmp_path / "elsewhere.bin").write_bytes(b"weights")
    (root / "model.skops").unlink()
    (root / "model.skops").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(ArtifactError, match=r"model\.skops is a symlink: refused"):
        folder_digest(root)
    (root / "model.skops").unlink()
    (root / "sub2").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ArtifactError, match="sub2 is a symlink"):
        read_folder(root)
    (root / "sub2").unlink()
    os.mkfifo(root / "pipe")
    with pytest.raises(ArtifactError, match="pipe is not a regular file"):
        folder_digest(root)
    (root / "pipe").unlink()
    link = tmp_path / "link"
    link.symlink_to(root, target_is_directory=True)
    with pytest.raises(ArtifactError, match="is a symlink"):
        folder_digest(link)
    assert folder_digest(root).startswith("sha256:")


# -- a world of its own ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    iso = isolated_settings(settings, tmp_path_factory.mktemp("digest_world"), port_offset=110)
    defs = build_definitions(settings=iso, policy=quick_policy())
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("digest_instance"))) as instance:
        result = dg.materialize(list(defs.assets), selection=["credit_applications", MODEL],
                                resources=defs.resources, instance=instance)
        mat = {k: v.value for ev in result.get_asset_materialization_events()
               if ev.materialization.asset_key == dg.AssetKey(MODEL) for k, v in ev.materialization.metadata.items()}
        res = defs.resources
        org = load_organisation(ROOT / "assets")
        deployer = res["deployer_local"].deployer()
        yield {"settings": iso, "defs": defs, "instance": instance, "mlflow": res["mlflow"],
               "book": res["ledger"].ledger(), "data_store": res["data_store"], "deployer": deployer,
               "org": org, "version": str(mat["model_version"]), "mat": mat}
        deployer.stop_all()


def gate(world, deployer=None, **over) -> ModelGate:
    org = world["org"]
    model = org.by_name[MODEL]
    features, label = org.model_features(model)
    args = dict(endpoint=org.by_name["credit_scoring"], model=model, dataset=org.by_name["credit_applications"],
                features=features, label=label, policy=load_policy(), mlflow=world["mlflow"],
                data_store=world["data_store"], ledger=world["book"], deployer=deployer or world["deployer"])
    args.update(over)
    return ModelGate(**args)


def verdicts(world, version: str, env: str = "staging", **over) -> dict:
    return {v.check: v for v in gate(world, **over).evaluate(version, env)}


def test_registration_fixes_the_digest_and_lineage_in_the_ledger(world):
    mlflow, book, version = world["mlflow"], world["book"], world["version"]
    entry = registration(book, MODEL, version)
    assert entry is not None and entry.kind == KIND and entry.actor.startswith("dagster:")
    mv = mlflow.get_version(MODEL, version)
    tags = mv.tags
    with tempfile.TemporaryDirectory() as tmp:
        fresh = mlflow.fresh_copy(MODEL, version, Path(tmp))  # as MLflow serves it
        assert entry.data["digest"] == folder_digest(fresh) == world["mat"]["digest"]
        ref = mlflow.run_artifact(mv.run_id, "onepath/reference_sample.parquet", Path(tmp))
        assert entry.data["reference_digest"] == bytes_digest(ref.read_bytes())
    d = entry.data
    assert (d["model"], d["version"], d["run_id"], d["via"]) == (MODEL, version, mv.run_id, "graph")
    assert (d["data_hash"], d["code_hash"], d["code_path"], d["dataset_key"], d["author"]) == (
        tags["onepath.data_hash"], tags["onepath.code_hash"], tags["onepath.code_path"], "credit_applications",
        tags["onepath.author"])
    assert (d["split_seed"], d["test_size"], d["training_rows"]) == (
        int(tags["onepath.split_seed"]), float(tags["onepath.test_size"]), int(tags["onepath.training_rows"]))
    run = mlflow.client().get_run(mv.run_id)
    assert d["metrics"]["roc_auc"] == pytest.approx(run.data.metrics["roc_auc"])
    # the first record stands: recording again appends nothing and returns it
    n = len(book.entries(kind=KIND))
    again = record_registration(book, mlflow, model=MODEL, version=version, run_id=mv.run_id, data_hash="x" * 64,
                                code_hash=None, code_path=None, dataset_key=None, author="mallory", split_seed=None,
                                test_size=None, training_rows=None, metrics={"roc_auc": 1.0})
    assert again.seq == entry.seq and len(book.entries(kind=KIND)) == n and book.verify().ok


# -- tier (b): the cached artifact swapped ---------------------------------------------------------


def _server_config(tmp_path: Path, model_dir: Path, version: str, digest: str | None) -> Path:
    cfg = {"endpoint": "cd_direct", "env": "test", "version": version, "model_dir": str(model_dir),
           "model_name": MODEL, "log_dir": None, **({"expected_digest": digest} if digest is not None else {})}
    path = tmp_path / f"server-{version}-{bool(digest)}.json"
    path.write_text(json.dumps(cfg))
    return path


def _run_server(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resources.serving.model_server", str(cfg)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180)


def _mlflow_copy(world, version: str) -> Path:
    """Where MLflow's artifact store keeps the version's model folder (the attacker can write it)."""
    from urllib.parse import urlparse

    source = world["mlflow"].get_version(MODEL, version).source  # models:/<logged model id>
    assert source.startswith("models:/m-"), source
    location = world["mlflow"].client().get_logged_model(source.removeprefix("models:/")).artifact_location
    return Path(urlparse(location).path)


def test_a_swapped_cache_is_refused_by_the_server_and_repaired_by_fetch_verified(world, tmp_path):
    mlflow, book, deployer, version = world["mlflow"], world["book"], world["deployer"], world["version"]
    registered = registered_digest(book, MODEL, version)
    org = world["org"]
    features, label = org.model_features(org.by_name[MODEL])
    approved_dir = mlflow.fetch_verified(MODEL, version, registered)
    approved = load_estimator(approved_dir, MODEL, version, registered)
    substitute_dir = save_credit_model(tmp_path / "substitute", rows=300, seed=99)
    substitute = load_estimator(substitute_dir, MODEL, "x", folder_digest(substitute_dir))
    rows = world["data_store"].read("credit_applications", registration(book, MODEL, version).data["data_hash"])
    X = rows[features].head(200)
    # FIRST: the substitute would answer differently (same pipeline types, so skops would load it)
    p_ok, p_sub = approved.predict_proba(X)[:, 1], substitute.predict_proba(X)[:, 1]
    assert np.abs(p_ok - p_sub).max() > 0.05 and (approved.predict(X) != substitute.predict(X)).any()

    cache = mlflow.download(MODEL, version)
    sub_bytes = (substitute_dir / "model.skops").read_bytes()
    (cache / "model.skops").write_bytes(sub_bytes)  # the attack
    found = folder_digest(cache)
    assert found != registered

    # the server, started on it, refuses with one clear line and its own exit code
    out = _run_server(_server_config(tmp_path, cache, version, registered))
    assert out.returncode == EXIT_ARTIFACT_REFUSED, out.stderr
    [line] = out.stderr.strip().splitlines()
    for part in (MODEL, f"version {version}", str(cache), f"expected {registered}", f"found {found}"):
        assert part in line, (part, line)
    # ... and so does one told no digest at all
    out = _run_server(_server_config(tmp_path, approved_dir, version, None))
    assert out.returncode == EXIT_ARTIFACT_REFUSED and "no expected_digest" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    # a deploy of the tampered folder fails; nothing takes traffic
    target = Target("cd_attack", "prod")
    with pytest.raises(DeployError, match="artifact digest mismatch"):
        deployer.deploy(target, Release(version, str(cache), digest=registered,
                                        config={"model_name": MODEL}))
    assert probe(deployer.address(target), credential=deployer.probe_credential(target)) is None

    # fetch_verified repairs the cache from MLflow's own copy, owner-only
    repaired = mlflow.fetch_verified(MODEL, version, registered)
    assert repaired == cache and folder_digest(repaired) == registered
    assert (repaired / "model.skops").read_bytes() != sub_bytes
    assert stat.S_IMODE(repaired.stat().st_mode) == 0o700
    assert stat.S_IMODE((repaired / "model.skops").stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(world["mlflow"].cache_dir).stat().st_mode) == 0o700

    # served from the verified copy: /version reports the digest, and the answers are the approved model's
    headers = caller_headers(deployer, target)
    st = deployer.deploy(target, Release(version, str(repaired), digest=registered,
                                         config={"model_name": MODEL}))
    assert st.serving_version == version and st.serving_digest == registered
    probe_token = deployer.probe_credential(target)
    assert probe(st.address, credential=probe_token)["digest"] == registered
    records = json.loads(X.head(20).to_json(orient="records"))
    import urllib.request

    req = urllib.request.Request(st.address + "/predict", data=json.dumps({"records": records}).encode(),
                                 headers={"content-type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=10) as r:
        served = [p["probability"] for p in json.loads(r.read())["predictions"]]
    assert served == pytest.approx(p_ok[:20].tolist()) and served != pytest.approx(p_sub[:20].tolist())

    # the attack from the report: swap the cache under the running version and kill its worker; the
    # supervisor's restart reads the swapped file and refuses it, so nothing answers with the substitute
    (cache / "model.skops").write_bytes(sub_bytes)
    [worker] = st.detail["supervisor"]["pids"]  # /version names no pid: the supervisor does
    os.kill(worker, 9)
    slot = deployer.slot_dir(target)

    def refused_in_log() -> bool:
        return any("artifact digest mismatch" in p.read_text(errors="replace")
                   for p in slot.rglob("*.log") if p.is_file())

    import time

    deadline = time.monotonic() + 60
    while not refused_in_log() and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a condition with a deadline
    assert refused_in_log(), "the restarted worker did not refuse the swapped artifact"
    seen = probe(st.address, credential=probe_token)
    assert seen is None or seen.get("digest") == registered
    deployer.delete(target)
    assert mlflow.fetch_verified(MODEL, version, registered) == cache  # repaired again for the tests after


def test_a_tampered_mlflow_copy_raises_artifact_mismatch(world, tmp_path):
    mlflow, book, version = world["mlflow"], world["book"], world["version"]
    registered = registered_digest(book, MODEL, version)
    stored = _mlflow_copy(world, version) / "model.skops"
    original = stored.read_bytes()
    cache = mlflow.download(MODEL, version)
    try:
        stored.write_bytes(original + b"\0")
        (cache / "model.skops").write_bytes(original + b"\0")
        with pytest.raises(ArtifactMismatch) as err:
            mlflow.fetch_verified(MODEL, version, registered)
        msg = str(err.value)
        assert len(msg.splitlines()) == 1
        assert f"model '{MODEL}' version {version}" in msg and f"expected {registered}" in msg
        assert err.value.found.startswith("sha256:") and err.value.found != registered and err.value.found in msg
        # a gate judging the version refuses it: the estimator is only ever loaded from verified bytes
        v = verdicts(world, version)
        assert not v["performance"].passed and "artifact digest mismatch" in v["performance"].summary
    finally:
        stored.write_bytes(original)
    assert folder_digest(mlflow.fetch_verified(MODEL, version, registered)) == registered


# -- the gate trusts the ledger, not what a client can write ------------------------------------------


def test_the_gate_passes_the_registered_version_and_verifies_what_it_relies_on(world):
    version = world["version"]
    first = verdicts(world, version)
    assert all(v.passed for v in first.values()), {k: v.summary for k, v in first.items()}
    assert "recomputed on" in first["performance"].summary
    assert "registered in ledger" in first["lineage"].summary
    assert first["lineage"].metadata["digest"] == registered_digest(world["book"], MODEL, version)
    record = explainability_record(world["book"], MODEL, version)
    assert record is not None and first["explainability"].metadata["computed_now"] is True
    again = verdicts(world, version)["explainability"]
    assert again.passed and again.metadata["computed_now"] is False  # the stored report hashed to the record
    assert again.metadata["report_digest"] == record.data["report_digest"]


@pytest.mark.parametrize("tag,value", [("data_hash", "0" * 64), ("author", "mira"), ("code_hash", "f" * 64),
                                       ("split_seed", "12345")])
def test_a_tag_changed_after_registration_fails_lineage_naming_it(world, tag, value):
    mlflow, version = world["mlflow"], world["version"]
    client = mlflow.client()
    before = mlflow.get_version(MODEL, version).tags[f"onepath.{tag}"]
    client.set_model_version_tag(MODEL, version, f"onepath.{tag}", value)
    try:
        v = verdicts(world, version)
        assert not v["lineage"].passed
        assert f"MLflow tag onepath.{tag} is '{value}'" in v["lineage"].summary
        assert "changed after registration" in v["lineage"].summary
        # what the other checks rely on is the ledger's: the changed tag moves none of them
        assert all(x.passed for c, x in v.items() if c != "lineage"), {c: x.summary for c, x in v.items()}
    finally:
        client.set_model_version_tag(MODEL, version, f"onepath.{tag}", before)
    client.delete_model_version_tag(MODEL, version, "onepath.dataset_key")
    try:
        v = verdicts(world, version)["lineage"]
        assert not v.passed and "onepath.dataset_key was removed after registration" in v.summary
    finally:
        client.set_model_version_tag(MODEL, version, "onepath.dataset_key", "credit_applications")


def test_the_registered_author_cannot_approve_whatever_the_tag_says(world):
    """The approval's independence check uses the registered author: re-tagging the author in MLflow
    does not let the real author approve their own version; another approver still can."""
    from resources.approvals import load_private_key, sign

    mlflow, book = world["mlflow"], world["book"]
    version = _register_dummy(world, lie=0.9, author="mira")
    mlflow.client().set_model_version_tag(MODEL, version, "onepath.author", "someone-else")

    def approve(who: str) -> None:
        reg = registration(book, MODEL, version).data
        a = sign(load_private_key(ROOT / "assets" / "demo_identities" / f"{who}.key"), asset=MODEL,
                 version=version, env="prod", reason="reviewed", approver=who, run_id=reg["run_id"] or "",
                 digest=reg["digest"])
        book.append("approval", MODEL, a.as_dict(), who, env="prod")

    approve("mira")
    v = verdicts(world, version, env="prod")["approval"]
    assert not v.passed and v.metadata["refused"] == 1
    assert f"mira authored version {version}: self-approval is not allowed" in v.markdown["refused_approvals"]
    approve("pat")
    v = verdicts(world, version, env="prod")["approval"]
    assert v.passed and v.metadata["approver"] == "pat"


def _register_dummy(world, lie: float, author: str | None = None) -> str:
    """A useless model (always the prior) registered as the next version, with the good version's lineage,
    a run metric that lies about it, and a registration as the platform records one."""
    from sklearn.dummy import DummyClassifier

    mlflow, book, good = world["mlflow"], world["book"], world["version"]
    org = world["org"]
    features, label = org.model_features(org.by_name[MODEL])
    reg = registration(book, MODEL, good).data
    df = world["data_store"].read("credit_applications", reg["data_hash"])
    est = DummyClassifier(strategy="prior").fit(df[features], df[label])
    tags = {k: v for k, v in mlflow.get_version(MODEL, good).tags.items() if k != "onepath.dagster_run_id"}
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "reference_sample.parquet"
        ref.write_bytes(Path(mlflow.run_artifact(reg["run_id"], "onepath/reference_sample.parquet",
                                                 Path(tmp) / "dl")).read_bytes())
        out = mlflow.log_and_register(model_name=MODEL, estimator=est, X_example=df[features],
                                      y_pred_example=est.predict(df[features].head(50)),
                                      metrics={"roc_auc": lie}, params={}, tags=tags,
                                      experiment=f"onepath/{MODEL}", artifacts={"onepath": str(ref)})
    facts = {k: reg[k] for k in ("data_hash", "code_hash", "code_path", "dataset_key", "author", "split_seed",
                                 "test_size", "training_rows")}
    facts["author"] = author or facts["author"]
    record_test_registration(book, mlflow, MODEL, out.version, **facts)
    return out.version


class ServingDeployer:
    """Reports that ``version`` serves in every environment: a stand-in for prod, for no_regression."""

    def __init__(self, version: str):
        self.version = version

    def status(self, target: Target) -> DeploymentStatus:
        return DeploymentStatus(target=target, address="http://127.0.0.1:9", serving_version=self.version,
                                healthy=True)


def test_a_better_metric_logged_on_the_run_does_not_get_a_failing_version_through(world):
    mlflow, good = world["mlflow"], world["version"]
    bad = _register_dummy(world, lie=0.97)
    run_id = mlflow.get_version(MODEL, bad).run_id
    mlflow.client().log_metric(run_id, "roc_auc", 0.999)  # after registration, too
    assert mlflow.client().get_run(run_id).data.metrics["roc_auc"] == 0.999
    v = verdicts(world, bad)
    assert not v["performance"].passed and "roc_auc 0.5000" in v["performance"].summary, v["performance"].summary
    assert v["performance"].metadata["held_out_roc_auc"] == pytest.approx(0.5)

    policy = load_policy()
    track = policy.track("ml-high-risk").model_copy(update={"checks": ["no_regression"], "regression_margin": 0.02})
    regress = policy.model_copy(update={"tracks": {**policy.tracks, "ml-high-risk": track}})
    # and the serving version's own run metric, lowered by the attacker, is not what it is compared with
    mlflow.client().log_metric(registration(world["book"], MODEL, good).data["run_id"], "roc_auc", 0.1)
    [nr] = gate(world, deployer=ServingDeployer(good), policy=regress).evaluate(bad, "staging")
    assert nr.check == "no_regression" and not nr.passed, nr.summary
    assert nr.metadata["roc_auc"] == pytest.approx(0.5)
    assert nr.metadata["prod_roc_auc"] == pytest.approx(
        registration(world["book"], MODEL, good).data["metrics"]["roc_auc"])


def test_a_replaced_reference_sample_and_report_are_caught(world, tmp_path):
    mlflow, book, version = world["mlflow"], world["book"], world["version"]
    run_id = registration(book, MODEL, version).data["run_id"]
    ref = mlflow.run_artifact(run_id, "onepath/reference_sample.parquet", tmp_path / "orig")
    original = ref.read_bytes()
    fake = tmp_path / "fake" / "reference_sample.parquet"
    fake.parent.mkdir()
    pd.read_parquet(ref).sample(frac=1.0, random_state=3).to_parquet(fake, index=False)  # same rows, other file
    mlflow.log_run_artifact(run_id, fake, "onepath")
    try:
        v = verdicts(world, version)["drift_ready"]
        assert not v.passed and "replaced or added after registration" in v.summary
        assert v.metadata["registered_reference_digest"] == registration(book, MODEL, version).data["reference_digest"]
        assert v.metadata["reference_digest"] == bytes_digest(fake.read_bytes())
    finally:
        (tmp_path / "back").mkdir()
        (tmp_path / "back" / "reference_sample.parquet").write_bytes(original)
        mlflow.log_run_artifact(run_id, tmp_path / "back" / "reference_sample.parquet", "onepath")
    assert verdicts(world, version)["drift_ready"].passed

    # the explainability report rewritten in MLflow: not believed, recomputed and recorded again
    verdicts(world, version)  # makes sure a report and its ledger record exist
    from platform_defs.governance.explainability import JSON_NAME

    report = mlflow.run_artifact(run_id, f"onepath/explainability/{JSON_NAME}", tmp_path / "rep")
    doc = json.loads(report.read_text())
    doc["top_features"] = ["gender"] + doc["top_features"]
    forged = tmp_path / "forged" / JSON_NAME
    forged.parent.mkdir()
    forged.write_text(json.dumps(doc))
    mlflow.log_run_artifact(run_id, forged, "onepath/explainability")
    before = explainability_record(book, MODEL, version)
    v = verdicts(world, version)["explainability"]
    assert v.metadata["computed_now"] is True and f"does not match the digest recorded in ledger #{before.seq}" \
        in v.summary
    assert not v.summary.startswith("top features: gender")
    assert explainability_record(book, MODEL, version).seq > before.seq


def test_a_version_without_registration_fails_until_the_handoff_sensor_records_it_once(world, tmp_path):
    from sensors.handoff import tick

    mlflow, book = world["mlflow"], world["book"]
    client = mlflow.client()
    saved = save_credit_model(tmp_path / "nb", rows=400, seed=5)
    version = str(client.create_model_version(MODEL, source=str(saved)).version)
    v = verdicts(world, version)
    assert not v["lineage"].passed and "no model_registered ledger entry" in v["lineage"].summary
    assert "registry_handoff" in v["lineage"].summary and "materialize" in v["lineage"].summary
    assert not v["performance"].passed and "no model_registered ledger entry" in v["performance"].summary

    org = world["org"]
    _, _, _, cursor = tick(org, mlflow=mlflow, book=book, cursor={})
    entry = registration(book, MODEL, version)
    assert entry is not None and entry.data["via"] == "handoff" and entry.actor == "sensor:registry_handoff"
    with tempfile.TemporaryDirectory() as tmp:  # the digest of the folder as MLflow serves it: what was saved
        served_digest, served = read_folder(mlflow.fresh_copy(MODEL, version, Path(tmp)))
    assert entry.data["digest"] == served_digest
    assert {k: served[k] for k in read_folder(saved)[1]} == read_folder(saved)[1]
    n = len(book.entries(kind=KIND, subject=MODEL))
    tick(org, mlflow=mlflow, book=book, cursor={})  # a reset cursor: once per version all the same
    assert len(book.entries(kind=KIND, subject=MODEL)) == n
    v = verdicts(world, version)["lineage"]
    assert not v.passed and "without onepath.dataset_key, onepath.data_hash, onepath.code_hash" in v.summary
