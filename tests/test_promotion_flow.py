"""The one promotion flow (platform_defs/promotion.py), driven without Dagster on a real world: the churn
line materialized for real (MLflow on sqlite, real endpoint processes), then promotions, ways back and
supervisor events from several callers at once and from an attacker holding the platform's files; and a
packaged custom check (acme-checks) named by the recorded policy gating that flow like a built-in."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

from platform_defs.definitions import build_definitions
from platform_defs.policy import policy_hash
from platform_defs.promotion import (PromotionError, Services, endpoint_release, endpoint_target, promote_endpoint,
                                     resolve_endpoint, roll_back)
from platform_defs.wiring import build_resources
from resources.deployers.base import DeployError, serving_version
from resources.ledger import LeaseLost
from tests.conftest import cli_headers, isolated_settings, quick_policy, record_policy


def materialize(defs: dg.Definitions, instance, keys: list[str], run_config: dict | None = None):
    return dg.materialize(list(defs.assets), selection=keys, resources=defs.resources, instance=instance,
                          run_config=run_config or {})


def newer_data(as_of: str) -> dict:
    return {"ops": {"customer_activity": {"config": {"params": {"as_of": as_of}}}}}


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    """churn v1 serving staging (prod empty), the flow's services, and a way to make more versions."""
    s = isolated_settings(settings, tmp_path_factory.mktemp("flow_home"), port_offset=170)
    policy = quick_policy()
    defs = build_definitions(settings=s, policy=policy)
    resources = build_resources(s)
    record_policy(resources["ledger"].ledger(), policy)  # the policy in force is the recorded one
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("flow_instance"))) as instance:
        materialize(defs, instance, ["customer_activity", "churn", "churn_scoring_staging"])
        from platform_defs.loader import load_organisation

        org = load_organisation()
        services = Services(mlflow=resources["mlflow"], deployer=resources["deployer_local"].deployer(),
                            ledger=resources["ledger"].ledger(), data_store=resources["data_store"])
        yield {"defs": defs, "instance": instance, "org": org, "policy": policy, "services": services,
               "settings": s}
        services.deployer.stop_all()


def target(world, env: str):
    spec, _, _ = resolve_endpoint(world["org"], "churn_scoring", env)
    return endpoint_target(spec, env)


def serving(world, env: str) -> str | None:
    return serving_version(world["services"].deployer.status(target(world, env)))


def deploys(world, env: str) -> list:
    return world["services"].ledger.entries(kind="deploy", subject="churn_scoring", env=env)


def test_a_packaged_check_named_by_the_signed_policy_blocks_then_lets_through_a_promotion(world, acme):
    """acme-checks (tests/fixtures/acme_checks, installed for real with pip) adds min_recall to ml-standard
    through the recorded policy: it blocks churn's staging promotion like a built-in, and once the policy is
    re-recorded with a bound it meets, the same promotion passes and deploys. (Here, on this module's world,
    so that churn is trained once: the gate judges the version staging serves.)"""
    import hashlib

    from platform_defs.policy import CustomCheck

    s, book, base = world["settings"], world["services"].ledger, world["policy"]
    # the package's check beside one built-in (the others cost time and prove nothing more here)
    track = base.tracks["ml-standard"].model_copy(update={"checks": ["performance"]})

    def with_min_recall(bound: float):
        checks = [*track.checks, "min_recall"]
        return base.model_copy(update={
            "tracks": {**base.tracks, "ml-standard": track.model_copy(update={"checks": checks})},
            "custom_checks": {"min_recall": CustomCheck(entry_point="min_recall", distribution="acme-checks",
                                                        params={"min": bound},
                                                        description="Recall on the held-out rows.")}})

    strict, lenient = with_min_recall(1.01), with_min_recall(0.0)
    version = serving(world, "staging")
    assert version is not None  # churn trained and serving staging: the world's
    refused_before = len(book.entries(kind="promotion_refused", subject="churn_scoring", env="staging"))
    try:
        record_policy(book, strict)  # signed and recorded, as `onepath policy init` does
        defs = build_definitions(settings=s, policy=strict)
        staging = next(a for a in defs.assets if dg.AssetKey("churn_scoring_staging") in a.keys)
        specs = {c.name: c for c in staging.check_specs}
        assert specs["min_recall"].blocking
        assert specs["min_recall"].description == ("Recall on the held-out rows. (custom check: acme_checks:"
                                                   "min_recall (entry point onepath.checks:min_recall))")
        assert set(specs) == {"performance", "min_recall"}

        run = dg.materialize(list(defs.assets), selection=["churn_scoring_staging"], resources=defs.resources,
                             instance=world["instance"], raise_on_error=False)
        checks = {e.check_name: e for e in run.get_asset_check_evaluations()
                  if e.asset_key == dg.AssetKey("churn_scoring_staging")}
        assert not checks["min_recall"].passed and checks["performance"].passed
        reason = checks["min_recall"].metadata["verdict"].value
        assert reason.startswith("recall ") and reason.endswith(" held-out rows (min 1.01)")
        assert checks["min_recall"].metadata["provided_by"].value == "acme-checks==1.0.0"
        acme_file = acme / "acme_checks" / "__init__.py"  # the code that ran, by its hash
        assert checks["min_recall"].metadata["check_sha256"].value == hashlib.sha256(acme_file.read_bytes()).hexdigest()
        assert "held_out_roc_auc" in checks["performance"].metadata  # the built-in ran, not the package's
        (refusal,) = book.entries(kind="promotion_refused", subject="churn_scoring", env="staging")[refused_before:]
        assert refusal.data["failed"] == ["min_recall"] and refusal.data["still_serving"] == version
        failure = next(e for e in run.all_events if e.event_type_value == "STEP_FAILURE")
        assert f"min_recall: {reason}" in failure.step_failure_data.error.message
        assert serving(world, "staging") == version  # the refused promotion moved nothing

        record_policy(book, lenient)  # the policy changed the recorded way (`onepath policy apply`)
        defs = build_definitions(settings=s, policy=lenient)
        run = dg.materialize(list(defs.assets), selection=["churn_scoring_staging"], resources=defs.resources,
                             instance=world["instance"])
        checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
        assert checks["min_recall"].passed and checks["min_recall"].metadata["verdict"].value.endswith("(min 0.0)")
        (mat,) = run.get_asset_materialization_events()
        meta = mat.materialization.metadata
        assert meta["outcome"].value == "deployed" and meta["model_version"].value == version
        assert "min_recall" in meta["model_card"].value  # on the model card with the built-ins
        (verdict,) = [e for e in book.entries(kind="gate_verdict", subject="churn_scoring", env="staging")
                      if e.data["passed"] and e.data["policy_hash"] == policy_hash(lenient)]
        assert verdict.data["verdicts"]["min_recall"]["passed"] is True
        assert verdict.data["verdicts"]["min_recall"]["check_sha256"] == \
            hashlib.sha256(acme_file.read_bytes()).hexdigest()
    finally:
        record_policy(book, base)  # the world's policy in force again, for the tests after this one


def test_two_promotions_of_one_environment_at_once_deploy_once(world):
    assert serving(world, "staging") == "1" and serving(world, "prod") is None
    outcomes: list = []
    results: list = []

    def promote(who: str) -> None:
        try:
            result = promote_endpoint(world["org"], world["policy"], "churn_scoring", "prod",
                                      services=world["services"], actor=who, trigger="test")
            outcomes.append(result.outcome)
            results.append(result)
        except Exception as err:  # noqa: BLE001 - recorded and asserted below
            outcomes.append(repr(err))

    threads = [threading.Thread(target=promote, args=(f"run-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(outcomes) == ["already serving", "deployed"], outcomes
    # the run that found its version deployed reports the deploy's checks (its asset's blocking checks need a
    # result each, or Dagster fails the run), read back from the gate that passed
    deployed, waited = sorted(results, key=lambda r: r.outcome != "deployed")
    assert sorted(v.check for v in waited.verdicts) == sorted(v.check for v in deployed.verdicts) != []
    assert all(v.passed and "gate of ledger entry #" in v.summary for v in waited.verdicts)
    assert [e.data["version"] for e in deploys(world, "prod")] == ["1"]
    assert serving(world, "prod") == "1"
    entry = deploys(world, "prod")[-1]
    assert entry.data["digest"].startswith("sha256:") and entry.data["policy_hash"] == policy_hash(world["policy"])
    assert entry.data["fencing_token"] >= 1


def test_a_promotion_asked_before_another_deployed_its_version_deploys_nothing(world):
    """A sensor's run and a person's, asked at once: the one that starts after the other finished never waits for
    the lock, and still finds its version deployed since it was asked; asked after that deploy, it redeploys."""
    from datetime import datetime, timedelta

    last = deploys(world, "staging")[-1]
    assert serving(world, "staging") == last.data["version"] == "1"

    def promote(actor: str, asked_at: datetime):
        return promote_endpoint(world["org"], world["policy"], "churn_scoring", "staging", services=world["services"],
                                actor=actor, trigger="test", version="1", asked_at=asked_at)

    asked = datetime.fromisoformat(last.ts) - timedelta(microseconds=1)  # just before that deploy was recorded
    assert promote("run-late", asked).outcome == "already serving"
    assert deploys(world, "staging")[-1].seq == last.seq  # nothing deployed, nothing recorded
    again = promote("run-redeploy", datetime.fromisoformat(last.ts) + timedelta(seconds=1))
    assert again.outcome == "deployed" and deploys(world, "staging")[-1].seq > last.seq
    assert serving(world, "staging") == "1"


def test_a_promotion_that_cannot_wait_is_refused_naming_the_holder(world):
    book = world["services"].ledger
    lease = book.acquire_lease("promotion:churn_scoring.prod", "dagster:someone-else", ttl=30)
    try:
        with pytest.raises(PromotionError, match="another promotion holds the lock .dagster:someone-else"):
            promote_endpoint(world["org"], world["policy"], "churn_scoring", "prod", services=world["services"],
                             actor="run-late", trigger="test", wait_seconds=0)
    finally:
        book.release_lease(lease)
    assert [e.data["version"] for e in deploys(world, "prod")] == ["1"]


def test_a_holder_that_lost_its_lease_can_neither_switch_traffic_nor_record(world):
    services, book = world["services"], world["services"].ledger
    spec, model, dataset = resolve_endpoint(world["org"], "churn_scoring", "prod")
    t = target(world, "prod")
    stale = book.acquire_lease("promotion:churn_scoring.prod", "run-stalled", ttl=0.3)
    services.deployer.fence(t, stale.token)
    deadline = time.monotonic() + 10
    while book.lease("promotion:churn_scoring.prod") is not None:  # the stalled holder's grant runs out
        assert time.monotonic() < deadline
        time.sleep(0.02)
    fresh = book.acquire_lease("promotion:churn_scoring.prod", "run-new", ttl=30)
    try:
        services.deployer.fence(t, fresh.token)
        from platform_defs.registration import verified_artifact

        artifact, digest = verified_artifact(book, services.mlflow, model.name, "1")
        before = services.deployer.status(t)
        with pytest.raises(DeployError, match="fencing token"):
            services.deployer.deploy(t, endpoint_release(spec, model, dataset, "1", artifact, digest, env=t.env),
                                     fencing_token=stale.token)
        with pytest.raises(LeaseLost):
            book.append("deploy", "churn_scoring", {"version": "1"}, "run-stalled", env="prod", fence=stale)
        after = services.deployer.status(t)
        # the same processes serve (prod runs two workers; either may answer the probe)
        assert serving_version(after) == "1" and after.detail["supervisor"]["pids"] == before.detail["supervisor"]["pids"]
    finally:
        book.release_lease(fresh)


@pytest.fixture(scope="module")
def two_versions(world):
    """churn v2, trained on newer data, serving staging and prod (v1 is prod's way back)."""
    materialize(world["defs"], world["instance"], ["customer_activity", "churn", "churn_scoring_staging"],
                newer_data("2026-09-30"))
    result = promote_endpoint(world["org"], world["policy"], "churn_scoring", "prod", services=world["services"],
                              actor="run-v2", trigger="test")
    assert (result.version, result.previous, result.outcome) == ("2", "1", "deployed")
    return world


def _forge_deploy_of_an_unvetted_version(world) -> str:
    """Tier (b): register a version nobody gated and write it a 'deploy' entry straight into the ledger."""
    from platform_defs.registration import record_registration

    services = world["services"]
    client = services.mlflow.client()
    v1 = client.get_model_version("churn", "1")
    unvetted = str(client.create_model_version("churn", source=v1.source, run_id=v1.run_id).version)
    record_registration(services.ledger, services.mlflow, model="churn", version=unvetted, run_id=v1.run_id,
                        data_hash=None, code_hash=None, code_path=None, dataset_key=None, author="mallory",
                        split_seed=None, test_size=None, training_rows=None, metrics=None, via="handoff")
    services.ledger.append("deploy", "churn_scoring", {"model": "churn", "version": unvetted, "checks": []},
                           "mallory", env="prod")
    return unvetted


def test_rollback_to_a_version_that_never_passed_the_gate_is_refused(two_versions):
    world = two_versions
    unvetted = _forge_deploy_of_an_unvetted_version(world)
    with pytest.raises(PromotionError, match=rf"refused to roll back to version {unvetted}: version {unvetted} "
                                             r"never passed the prod gate .* 2 keeps serving"):
        roll_back(world["org"], world["policy"], "churn_scoring", "prod", services=world["services"],
                  to_version=unvetted, reason="attack", actor="mallory")
    assert serving(world, "prod") == "2"
    assert world["services"].mlflow.aliases("churn")["prod"] == "2"


def test_a_changed_policy_reruns_the_gate_on_the_way_back(two_versions):
    world = two_versions
    stricter = world["policy"].model_copy(deep=True)
    stricter.tracks["ml-standard"] = stricter.tracks["ml-standard"].model_copy(update={"reference_rows": 100_000})
    record_policy(world["services"].ledger, stricter)  # the change, recorded (onepath policy apply)
    with pytest.raises(PromotionError, match=r"version 1 no longer passes the prod gate under the policy in force: "
                                             r"drift_ready"):
        roll_back(world["org"], stricter, "churn_scoring", "prod", services=world["services"],
                  to_version="1", reason="v2 misbehaves", actor="pat")
    assert serving(world, "prod") == "2"
    rerun = world["services"].ledger.entries(kind="gate_verdict", subject="churn_scoring", env="prod")[-1]
    assert rerun.data["policy_hash"] == policy_hash(stricter) and rerun.data["passed"] is False
    # under the policy it passed under (recorded again), the way back is open, and it is recorded with the digest
    record_policy(world["services"].ledger, world["policy"])
    result = roll_back(world["org"], world["policy"], "churn_scoring", "prod", services=world["services"],
                       to_version="1", reason="v2 misbehaves", actor="pat")
    assert (result.from_version, result.to_version) == ("2", "1") and serving(world, "prod") == "1"
    assert result.digest and deploys(world, "prod")[-1].data["digest"] == result.digest
    assert world["services"].mlflow.aliases("churn")["prod"] == "1"


def _events(world) -> Path:
    return world["services"].deployer.slot_dir(target(world, "prod")) / "events.jsonl"


def _relay(world):
    from sensors.supervisor_events import relay_events

    return relay_events(world["org"], world["policy"], world["services"], {})


def test_a_forged_event_line_is_refused_and_records_nothing(two_versions):
    world = two_versions
    before = world["services"].ledger.head().seq
    fake = {"id": "forged-0001", "ts": "2026-12-01T00:00:00Z", "event": "crashloop_rollback",
            "from_version": serving(world, "prod"), "to_version": "2", "group": "x"}
    with open(_events(world), "ab") as f:
        f.write((json.dumps(fake) + "\n").encode())
    written, cursor = _relay(world)
    assert written == [] and world["services"].ledger.head().seq == before
    assert cursor["churn_scoring.prod"]["refused"] >= 1


def test_a_signed_lie_moves_nothing(two_versions):
    """Tier (b) holds the slot's secret and signs an event: the flow checks what really serves."""
    from resources.serving.protocol import sign_event

    world = two_versions
    deployer = world["services"].deployer
    now = serving(world, "prod")
    unvetted = [e.data["version"] for e in world["services"].ledger.entries(kind="model_registered", subject="churn")
                if e.data.get("via") == "handoff"][-1]
    secret = deployer.slot_secret(target(world, "prod"))
    lie = sign_event(secret, {"id": "signed-lie-1", "ts": "2026-12-01T00:00:00Z", "event": "crashloop_rollback",
                              "from_version": now, "to_version": unvetted, "group": "x"})
    with open(_events(world), "ab") as f:
        f.write((json.dumps(lie, sort_keys=True) + "\n").encode())
    written, _ = _relay(world)
    assert [e.kind for e in written] == ["event_refused"], written
    assert f"reported version {unvetted} restored, but {now} serves" in written[0].data["reason"]
    assert serving(world, "prod") == now and world["services"].mlflow.aliases("churn")["prod"] == now
    assert not [e for e in world["services"].ledger.entries(kind="rollback", subject="churn_scoring")
                if e.data.get("to_version") == unvetted]


def _predictions(world, env: str, address: str, rows: list[dict]) -> list:
    """Scores asked as onepath-cli (every route but /health needs a credential)."""
    import urllib.request

    auth = cli_headers(world["services"].ledger, world["services"].deployer, "churn_scoring", env, world["org"])
    req = urllib.request.Request(address + "/predict", data=json.dumps({"records": rows}).encode(),
                                 headers={"content-type": "application/json", **auth})
    with urllib.request.urlopen(req, timeout=30) as r:
        return [p["probability"] for p in json.loads(r.read())["predictions"]]


def test_a_swapped_model_file_never_serves_under_the_approved_label(two_versions, tmp_path):
    """Tier (b): swap the cached model.skops of the version prod serves for another model's, and kill the
    worker. The restarted worker refuses the bytes; what answers is a governed version with its
    registered digest, never the substitute; the ledger says what happened."""
    import os
    import signal

    import mlflow.sklearn
    import skops.io

    from assets.retention.trainer import train_churn
    from platform_defs.registration import registered_digest
    from resources.data_store import DataStore
    from resources.mlflow_registry import trusted_types

    world = two_versions
    services, book = world["services"], world["services"].ledger
    t = target(world, "prod")
    status = services.deployer.status(t)
    now = serving_version(status)
    assert now == "1" and status.serving_digest == registered_digest(book, "churn", "1")
    org = world["org"]
    features, label = org.model_features(org.by_name["churn"])
    snapshot = DataStore(root=str(world["settings"].data_dir)).read(
        "customer_activity", book.entries(kind="model_registered", subject="churn")[0].data["data_hash"])
    rows = json.loads(snapshot[features].head(25).to_json(orient="records"))
    # the substitute: a churn model that learned the opposite; first, its answers differ from the approved one's
    substitute = train_churn(snapshot[features], 1 - snapshot[label], {})
    mlflow.sklearn.save_model(substitute, str(tmp_path / "sub"), serialization_format="skops",
                              skops_trusted_types=trusted_types(substitute))
    approved = _predictions(world, "prod", status.address, rows)
    forged = [float(p) for p in substitute.predict_proba(snapshot[features].head(25))[:, 1]]
    assert max(abs(a - b) for a, b in zip(approved, forged)) > 0.2

    cache = services.mlflow.download("churn", "1")
    (cache / "model.skops").write_bytes((tmp_path / "sub" / "model.skops").read_bytes())
    assert skops.io.load(cache / "model.skops", trusted=trusted_types(substitute)) is not None  # a real model
    for pid in status.detail["supervisor"]["pids"]:  # every worker (prod runs two): each restart refuses
        os.kill(pid, signal.SIGKILL)

    deadline = time.monotonic() + 180
    while True:  # the supervisor notices the refusal and falls back; wait on what it reports
        after = services.deployer.status(t)
        if serving_version(after) not in (None, "1"):
            break
        assert time.monotonic() < deadline, "no governed version serves again within 180 s"
        time.sleep(0.2)
    assert serving_version(after) == "2" and after.serving_digest == registered_digest(book, "churn", "2")
    answered = _predictions(world, "prod", after.address, rows)
    assert max(abs(a - b) for a, b in zip(answered, forged)) > 0.2  # never the substitute's answers
    written, _ = _relay(world)
    kinds = [e.kind for e in written]
    assert "artifact_refused" in kinds and kinds[-2:] == ["rollback", "deploy"], kinds
    refused = next(e for e in written if e.kind == "artifact_refused")
    assert refused.data["version"] == "1" and "digest" in str(refused.data["error"])
    assert written[-1].data["digest"] == registered_digest(book, "churn", "2")
    assert services.mlflow.aliases("churn")["prod"] == "2"


def test_a_version_registered_outside_onepath_as_a_pickle_is_never_registered(world, tmp_path):
    """A client of MLflow's server (attacker tier (a) can reach it) registers a cloudpickle version: its
    bytes would run code when loaded, so the handoff refuses it and nothing will ever load it."""
    import mlflow
    import mlflow.sklearn
    from sklearn.dummy import DummyClassifier

    from platform_defs.registration import registration
    from sensors.handoff import tick

    services = world["services"]
    mlflow.set_tracking_uri(services.mlflow.tracking_uri)
    with mlflow.start_run(experiment_id=services.mlflow.experiment_id("notebook-of-an-attacker")):
        info = mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], [0, 1]), name="model",
                                        registered_model_name="churn", serialization_format="cloudpickle")
    version = str(info.registered_model_version)
    _, requests, notes, _ = tick(world["org"], mlflow=services.mlflow, book=services.ledger, cursor={})
    assert registration(services.ledger, "churn", version) is None
    assert not [r for r in requests if r.tags.get("onepath/handoff_version") == version]
    refused = [e for e in services.ledger.entries(kind="handoff", subject="churn") if e.data["version"] == version]
    assert "serialized as 'cloudpickle', which runs code when loaded" in refused[-1].data["refused"]
    assert any(f"version {version} refused" in n for n in notes)


def test_a_version_that_failed_its_bake_is_no_way_back(two_versions):
    from platform_defs.promotion import governed

    world = two_versions
    services = world["services"]
    spec, _, _ = resolve_endpoint(world["org"], "churn_scoring", "prod")
    assert governed(world["org"], world["policy"], spec, "prod", "2", services=services, actor="t") is None
    services.ledger.append("bake_failed", "churn_scoring", {"model": "churn", "version": "2"}, "test", env="prod")
    why = governed(world["org"], world["policy"], spec, "prod", "2", services=services, actor="t")
    assert why and why.startswith("version 2 failed its bake in prod")


def test_whatever_answers_on_a_free_stable_port_is_not_believed(world):
    """Another local user binds a stable port nothing of ours holds and claims an approved version."""
    import http.server
    import threading as th

    from platform_defs.registration import registered_digest

    services = world["services"]
    t = target(world, "staging")
    services.deployer.delete(t)
    port = int(services.deployer.address(t).rsplit(":", 1)[1])
    claim = json.dumps({"version": "1", "digest": registered_digest(services.ledger, "churn", "1")}).encode()

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(claim)))
            self.end_headers()
            self.wfile.write(claim)

        def log_message(self, *args):
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Impostor)
    th.Thread(target=server.serve_forever, daemon=True).start()
    try:
        st = services.deployer.status(t)
        assert st.healthy is False and st.serving_version is None and st.serving_digest is None
        assert st.detail["foreign"]["version"] == "1"
        assert serving_version(st) is None
    finally:
        server.shutdown()
        server.server_close()


class _InterruptedWhileTheAliasMoves:
    """The real MLflow registry, except that moving an alias is interrupted (a SIGINT's KeyboardInterrupt
    arriving while MLflow's client sits in its own retries)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def set_alias(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_a_way_back_interrupted_after_its_switch_is_still_on_the_record(two_versions):
    import dataclasses

    from platform_defs.promotion import roll_back

    world = two_versions
    services = dataclasses.replace(world["services"], mlflow=_InterruptedWhileTheAliasMoves(world["services"].mlflow))
    before = len(deploys(world, "prod"))
    with pytest.raises(KeyboardInterrupt):
        roll_back(world["org"], world["policy"], "churn_scoring", "prod", services=services, actor="pat",
                  reason="interrupted on purpose", to_version="1")
    assert serving(world, "prod") == "1"
    after = deploys(world, "prod")
    assert len(after) == before + 1
    last = after[-1].data
    assert last["version"] == "1" and last["interrupted"].startswith("the promotion was interrupted after the switch")
