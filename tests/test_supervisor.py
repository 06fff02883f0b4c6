"""The supervisor on its own, for real: worker restarts, crash loops rolled back to the previous
version (also by a supervisor started again, which adopts the workers of the one that died), and the
``supervisor_events`` relay into the ledger and the MLflow alias. Real endpoint processes on loopback (own run dir and port range), MLflow on the
session's sqlite store, a ledger of this module's own (so counts are exact).

Crash loops come from the fault model's ``exit_after_s``: the version deploys fine, then each of its
processes exits a few seconds after loading, every time it is restarted. ``ONEPATH_RESTART_LIMIT=2``
(read by a supervisor when it starts) makes the third death within the window a crash loop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from platform_defs.policy import load_policy
from platform_defs.promotion import PromotionError, Services, endpoint_target, roll_back
from platform_defs.loader import load_organisation
from resources.deployers.base import probe
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource
from resources.processes import pid_alive
from resources.serving.protocol import load_or_create_secret, sign_event
from sensors.serving_health import evaluate_health
from sensors.supervisor_events import build_supervisor_events_sensor, relay_events
from tests.conftest import _free_port_base, granted, headers_at, model_release, record_policy, save_credit_model, wait_for
from tests.test_rollback import deploy_like_factories, register, write_org

ROW = {"annual_income": 52000.0, "loan_amount": 12000.0, "loan_term_months": 36, "debt_to_income": 0.3,
       "credit_history_years": 7.5, "num_open_accounts": 4, "delinquencies_2y": 0,
       "employment_type": "salaried", "home_ownership": "mortgage", "purpose": "car"}
ENDPOINTS = ["sv_restart", "sv_loop", "sv_alone", "sv_resume", "sv_broken", "sv_baked"]
EXIT_AFTER_S = 4.0  # long enough for the deploy to finish before the first death


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    from platform_defs.wiring import build_resources
    from resources.serving.faults import save_fault_model

    root = tmp_path_factory.mktemp("sv")
    org = load_organisation(write_org(root / "org", ENDPOINTS, "sv"))
    mlflow = build_resources(settings)["mlflow"]
    good_a = save_credit_model(root / "models" / "a", seed=1)
    good_b = save_credit_model(root / "models" / "b", seed=2)
    crash = save_fault_model(root / "models" / "crash", base_model_dir=good_a, exit_after_s=EXIT_AFTER_S)
    plan = {"sv_restart": [good_a], "sv_loop": [good_a, crash], "sv_alone": [crash],
            "sv_resume": [good_a, good_b, crash], "sv_baked": [good_a, good_b]}
    book = LedgerResource(location=str(root / "ledger.db"), key_path=str(root / "keys" / "platform.pem")).ledger()
    record_policy(book)  # the example policy, recorded as the one in force
    for ep, saved in plan.items():
        assert [register(mlflow, f"{ep}_model", s, book) for s in saved] == [str(i + 1) for i in range(len(saved))]
    run_dir = root / "run"
    resources = {
        "mlflow": mlflow,
        "deployer_local": LocalDeployerResource(run_dir=str(run_dir), port_base=_free_port_base(),
                                                inference_log_dir=str(run_dir / "logs"),
                                                artifact_roots=[str(tmp_path_factory.getbasetemp())]),
        "ledger": LedgerResource(location=str(root / "ledger.db"), key_path=str(root / "keys" / "platform.pem")),
        "data_store": build_resources(settings)["data_store"],
    }
    deployer = resources["deployer_local"].deployer()
    services = Services(mlflow=mlflow, deployer=deployer, ledger=resources["ledger"].ledger(),
                        data_store=resources["data_store"])
    yield {"org": org, "resources": resources, "deployer": deployer, "ledger": resources["ledger"].ledger(),
           "mlflow": mlflow, "run_dir": run_dir, "models": {"a": good_a, "crash": crash}, "services": services,
           "policy": load_policy()}
    deployer.stop_all()


def relay(world, cursor: dict):
    return relay_events(world["org"], world["policy"], world["services"], cursor)


def target(world, endpoint: str, env: str = "prod"):
    return endpoint_target(world["org"].by_name[endpoint], env)


def events(world, endpoint: str, env: str = "prod") -> list[dict]:
    path = world["deployer"].slot_dir(target(world, endpoint, env)) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def state(world, endpoint: str, env: str = "prod") -> dict:
    return json.loads((world["deployer"].slot_dir(target(world, endpoint, env)) / "state.json").read_text())


def predict(address: str) -> dict:
    req = urllib.request.Request(address + "/predict", data=json.dumps(ROW).encode(),
                                 headers={"content-type": "application/json", **headers_at(address)})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def serving(world, endpoint: str, version: str):
    """The status once ``version`` is the supervisor's current group and answers at the stable address."""
    st = world["deployer"].status(target(world, endpoint))
    sup = st.detail.get("supervisor") or {}
    ok = st.healthy and st.serving_version == version and sup.get("version") == version and sup.get("state") == "current"
    return st if ok else None


def ledger_view(world, endpoint: str) -> list[tuple[str, str | None]]:
    return [(e.kind, e.data.get("version", e.data.get("to_version"))) for e in
            world["ledger"].entries(subject=endpoint, env="prod") if e.kind != "gate_verdict"]


# -- restarts ------------------------------------------------------------------------------------


def test_a_killed_worker_comes_back_and_one_restart_is_relayed(world, monkeypatch):
    from resources.deployers.local import PLATFORM_CREDENTIALS

    org, deployer = world["org"], world["deployer"]
    # the platform's credentials, as a production host has them, and the rest of its Dagster instance's settings
    production = {**{var: f"secret-{var.lower()}" for var in PLATFORM_CREDENTIALS},
                  "ONEPATH_DAGSTER_PG_HOST": "db.internal", "ONEPATH_DAGSTER_PG_PORT": "5432",
                  "ONEPATH_DAGSTER_PG_USER": "onepath", "ONEPATH_DAGSTER_PG_DB": "dagster"}
    for var, value in production.items():
        monkeypatch.setenv(var, value)
    st = deploy_like_factories(org, "sv_restart", "prod", "1", world["resources"])
    assert len(st.detail["supervisor"]["pids"]) == 2  # prod's default
    for pid in (st.detail["supervisor"]["pid"], *st.detail["supervisor"]["pids"]):  # what serves holds none
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert not any(f"secret-{var.lower()}".encode() in environ for var in PLATFORM_CREDENTIALS), pid
    for var in production:
        monkeypatch.delenv(var)
    worker = 0
    pid = st.detail["supervisor"]["pids"][worker]
    os.kill(pid, signal.SIGKILL)

    def back():
        now = deployer.status(target(world, "sv_restart"))
        sup = now.detail["supervisor"] or {}
        ready = now.healthy and sup.get("ready") == [True, True] and pid not in sup["pids"]
        return now if ready and not pid_alive(pid) else None

    now = wait_for("the killed worker restarted and taking connections again", back, 60)
    assert now.serving_version == "1" and now.detail["supervisor"]["restarts"] == 1
    granted(deployer, target(world, "sv_restart"))
    assert predict(now.address)["version"] == "1"
    assert [e["event"] for e in events(world, "sv_restart")].count("restart") == 1

    written, cursor = relay(world, {})
    assert [(e.kind, e.subject, e.env, e.actor) for e in written] == [
        ("restart", "sv_restart", "prod", "supervisor:sv_restart.prod")]
    data = written[0].data
    assert (data["worker"], data["exit_code"], data["version"], data["model"]) == (worker, -9, "1", "sv_restart_model")
    assert cursor["sv_restart.prod"]["offset"] == (deployer.slot_dir(target(world, "sv_restart")) / "events.jsonl").stat().st_size
    # nothing new: nothing written; a lost cursor does not record the restart twice either
    assert relay(world, cursor)[0] == []
    assert relay(world, {})[0] == []
    assert ledger_view(world, "sv_restart") == [("deploy", "1"), ("restart", "1")]


def test_relay_reads_complete_lines_skips_corrupt_ones_and_follows_a_replaced_file(world):
    """The cursor logic on a file written by hand (signed with the slot's secret, as a supervisor
    signs), for a slot no supervisor runs (sv_restart.staging)."""
    deployer, book = world["deployer"], world["ledger"]
    slot_dir = deployer.slot_dir(target(world, "sv_restart", "staging"))
    slot_dir.mkdir(parents=True, exist_ok=True)
    secret = load_or_create_secret(slot_dir)
    path = slot_dir / "events.jsonl"

    def ev(i: int, kind: str = "restart", **kw) -> bytes:
        return json.dumps(sign_event(secret, {"id": f"hand-{i}", "ts": "2026-01-01T00:00:00Z", "event": kind,
                                              "group": "g", "version": "1", "worker": 0, "exit_code": 1,
                                              "restarts": i, **kw})).encode() + b"\n"

    unsigned = json.dumps({"id": "forged-1", "ts": "2026-01-01T00:00:00Z", "event": "restart", "group": "g",
                           "version": "1", "worker": 0, "exit_code": 1, "restarts": 9}).encode() + b"\n"
    path.write_bytes(ev(1) + b"this is not json\n" + b"[1, 2]\n" + unsigned + ev(2, "launch") + ev(3)[:20])
    written, cursor = relay(world, {})
    assert [e.data["event_id"] for e in written] == ["hand-1"]
    pos = cursor["sv_restart.staging"]
    assert pos["refused"] == 3 and pos["offset"] == path.stat().st_size - 20  # the half line waits

    with open(path, "ab") as f:  # the writer finishes its line
        f.write(ev(3)[20:])
    written, cursor = relay(world, cursor)
    assert [e.data["event_id"] for e in written] == ["hand-3"] and cursor["sv_restart.staging"]["refused"] == 3

    # the file is replaced (a new run dir, shorter): read from its start, nothing recorded twice; a signed
    # line with no id cannot be told apart from one already relayed, so it is refused too
    path.unlink()
    line = json.dumps(sign_event(secret, {"ts": "2026-01-01T00:00:01Z", "event": "restart", "version": "1",
                                          "worker": 0, "exit_code": 1})).encode() + b"\n"
    path.write_bytes(ev(1) + line)
    written, cursor = relay(world, cursor)
    assert written == [] and cursor["sv_restart.staging"]["refused"] == 4
    assert [e.kind for e in book.entries(subject="sv_restart", env="staging")] == ["restart"] * 2


# -- crash loops ---------------------------------------------------------------------------------


def test_a_crash_looping_version_is_replaced_by_the_previous_one_and_relayed(world, monkeypatch):
    monkeypatch.setenv("ONEPATH_RESTART_LIMIT", "2")  # read by the supervisor this test starts
    org, deployer, book, mlflow = world["org"], world["deployer"], world["ledger"], world["mlflow"]
    deploy_like_factories(org, "sv_loop", "prod", "1", world["resources"])
    st = deploy_like_factories(org, "sv_loop", "prod", "2", world["resources"])
    assert st.serving_version == "2" and mlflow.aliases("sv_loop_model")["prod"] == "2"
    assert state(world, "sv_loop")["previous_version"] == "1"

    back = wait_for("version 1 current again after version 2 crash-looped", lambda: serving(world, "sv_loop", "1"))
    granted(deployer, target(world, "sv_loop"))
    assert predict(back.address)["version"] == "1"
    seen = events(world, "sv_loop")
    loop = next(e for e in seen if e["event"] == "crashloop")
    assert (loop["version"], loop["action"], loop["rollback_to"], loop["restarts"]) == ("2", "rollback", "1", 2)
    rolled = next(e for e in seen if e["event"] == "crashloop_rollback")
    assert (rolled["from_version"], rolled["to_version"]) == ("2", "1")
    assert state(world, "sv_loop")["previous_version"] is None  # never "back" to the version that looped
    assert all('version="1"' in t for t in deployer.worker_metrics(target(world, "sv_loop")))

    # the sensor relays it: crashloop, then rollback + deploy as a rollback records them; alias back to 1
    sensor = build_supervisor_events_sensor(org, world["policy"])
    ctx = dg.build_sensor_context(cursor=None, resources=world["resources"])
    result = sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    assert {o.asset_key for o in result.asset_events} == {dg.AssetKey("sv_loop_prod")}
    assert ledger_view(world, "sv_loop") == [("deploy", "1"), ("deploy", "2"), ("restart", "2"), ("restart", "2"),
                                             ("crashloop", "2"), ("rollback", "1"), ("deploy", "1")]
    first, *_, cl, rb, dep = [e for e in book.entries(subject="sv_loop", env="prod") if e.kind != "gate_verdict"]
    assert cl.actor == rb.actor == dep.actor == "supervisor:sv_loop.prod"
    assert (cl.data["action"], cl.data["rollback_to"], cl.data["model"]) == ("rollback", "1", "sv_loop_model")
    assert (rb.data["from_version"], rb.data["to_version"], rb.data["restored_deploy_entry"]) == ("2", "1", first.seq)
    assert rb.data["address"] == back.address and "crash loop" in rb.data["reason"]
    assert (dep.data["via"], dep.data["rolled_back_by"], dep.data["rollback_entry"]) == ("rollback", "supervisor", rb.seq)
    assert (dep.data["previous_version"], dep.data["checks"]) == ("2", first.data["checks"])
    assert mlflow.aliases("sv_loop_model")["prod"] == "1"
    assert book.verify().ok

    # the next tick has nothing to do; a reset cursor records nothing twice
    again = dg.build_sensor_context(cursor=ctx.cursor, resources=world["resources"])
    assert isinstance(sensor(again), dg.SkipReason)
    reset = dg.build_sensor_context(cursor=None, resources=world["resources"])
    assert isinstance(sensor(reset), dg.SkipReason)
    assert len([e for e in book.entries(subject="sv_loop", env="prod") if e.kind != "gate_verdict"]) == 7


def test_a_crash_loop_with_nothing_to_go_back_to_stops_the_version(world, monkeypatch):
    monkeypatch.setenv("ONEPATH_RESTART_LIMIT", "2")
    org, deployer, mlflow = world["org"], world["deployer"], world["mlflow"]
    t = target(world, "sv_alone")
    st = deploy_like_factories(org, "sv_alone", "prod", "1", world["resources"])
    assert st.serving_version == "1"

    def looped():
        sup = deployer.status(t).detail.get("supervisor") or {}
        return sup.get("state") == "crashloop"

    wait_for("version 1 stopped as crash-looping", looped)
    assert deployer.worker_metrics(t) == []
    assert probe(st.address, timeout=1.0) is None
    loop = next(e for e in events(world, "sv_alone") if e["event"] == "crashloop")
    assert loop["action"] == "stopped" and loop["rollback_to"] is None
    assert "named no governed version to go back to" in loop["detail"] and "nothing serves" in loop["detail"]
    assert not any(e["event"] == "crashloop_rollback" for e in events(world, "sv_alone"))

    written, _ = relay(world, {})
    written = [e for e in written if e.subject == "sv_alone"]
    assert [e.kind for e in written] == ["restart", "restart", "crashloop"]
    assert written[-1].data["action"] == "stopped"
    assert mlflow.aliases("sv_alone_model")["prod"] == "1"  # nothing was restored: the alias stays

    # status, the serving_healthy check and the ledger say so
    st = deployer.status(t)
    assert st.health == "down" and st.problems[0].startswith("version 1 was stopped after crash-looping")
    spec = world["org"].by_name["sv_alone"]
    reported: dict = {}
    (ev,) = evaluate_health([(spec, "prod", t)], [st], world["ledger"], reported)
    assert not ev.passed and ev.check_name == "serving_healthy" and "crash-looping" in ev.description
    entry = world["ledger"].entries(kind="serving_unhealthy", subject="sv_alone", env="prod")[-1]
    assert entry.data["health"] == "down" and "crash-looping" in entry.data["problems"][0]
    assert evaluate_health([(spec, "prod", t)], [st], world["ledger"], reported) == []  # reported once

    # a supervisor started again after this one dies still says why nothing serves
    dead = state(world, "sv_alone")["pid"]
    os.kill(dead, signal.SIGKILL)
    wait_for("the supervisor gone", lambda: not pid_alive(dead))
    assert deployer.revive(t) is not None

    def said_again():
        now = deployer.status(t)
        sup = now.detail.get("supervisor") or {}
        return now if sup.get("pid") not in (None, dead) and now.problems else None

    again = wait_for("the revived supervisor saying the version was stopped", said_again)
    assert again.health == "down" and "crash-looping" in again.problems[0]
    assert again.detail["supervisor"]["refusing"]["cause"] == "crashloop_stopped"


def test_a_previous_version_that_cannot_come_back_leaves_nothing_serving_and_says_why(world, monkeypatch, tmp_path):
    monkeypatch.setenv("ONEPATH_RESTART_LIMIT", "2")
    deployer = world["deployer"]
    t = target(world, "sv_broken")
    v1 = tmp_path / "v1"
    shutil.copytree(world["models"]["a"], v1)
    config = {"model_name": "sv_broken_model", "pii_columns": []}
    deployer.deploy(t, model_release("1", v1, config))
    assert deployer.deploy(t, model_release("2", world["models"]["crash"], config),
                           fallback=model_release("1", v1, config)).serving_version == "2"
    (v1 / "model.skops").write_bytes(b"version 1's files went bad since it served")

    failed = wait_for("the crash-loop rollback failing", lambda: next(
        (e for e in events(world, "sv_broken") if e["event"] == "crashloop_rollback_failed"), None))
    assert (failed["from_version"], failed["to_version"]) == ("2", "1")
    assert failed["reason"].startswith("version 1 exited while starting; log: ") and "\n" not in failed["reason"]
    sup = deployer.status(t).detail["supervisor"]
    assert (sup["version"], sup["state"]) == ("2", "crashloop") and deployer.worker_metrics(t) == []

    written, _ = relay(world, {})
    kinds = [(e.kind, e.data.get("action")) for e in written if e.subject == "sv_broken"]
    # version 1's damaged files no longer hash to its digest: its worker refuses them (the supervisor may
    # also record that refusal, depending on whether its watch loop sees the exit before the restore
    # does), and nothing serves
    assert "artifact digest mismatch" in failed["reason"]
    assert [k for k in kinds if k[0] != "artifact_refused"] == [
        ("restart", None), ("restart", None), ("crashloop", "rollback"), ("crashloop", "rollback_failed")]
    assert "rolling back to version 1 failed, nothing serves: version 1 exited while starting" in written[-1].data["detail"]


def test_a_supervisor_started_again_still_knows_what_served_before(world, monkeypatch):
    org, deployer = world["org"], world["deployer"]
    t = target(world, "sv_resume")
    deploy_like_factories(org, "sv_resume", "prod", "1", world["resources"])
    st = deploy_like_factories(org, "sv_resume", "prod", "2", world["resources"])
    before = state(world, "sv_resume")
    assert before["previous_version"] == "1" and before["current"]["version"] == "2"

    # the supervisor dies; its worker serves on (tests/test_supervisor_death.py)
    os.kill(before["pid"], signal.SIGKILL)
    wait_for("the supervisor gone", lambda: not pid_alive(before["pid"]), 60)
    assert pid_alive(st.detail["supervisor"]["pids"][0])

    # a deploy starts a new supervisor, which adopts version 2's worker and reads the old state.json
    monkeypatch.setenv("ONEPATH_RESTART_LIMIT", "2")
    st = deploy_like_factories(org, "sv_resume", "prod", "3", world["resources"])
    now = state(world, "sv_resume")
    assert now["pid"] != before["pid"] and st.serving_version == "3" and now["previous_version"] == "2"

    back = wait_for("version 2 current again after version 3 crash-looped", lambda: serving(world, "sv_resume", "2"))
    granted(deployer, t)
    assert predict(back.address)["version"] == "2" and back.address == st.address
    rolled = next(e for e in events(world, "sv_resume") if e["event"] == "crashloop_rollback")
    assert (rolled["from_version"], rolled["to_version"]) == ("3", "2")
    assert deployer.status(t).detail["supervisor"]["pid"] == now["pid"]


def test_the_way_back_never_restores_a_version_that_failed_its_bake(world, monkeypatch):
    """Version 2 failed its bake and was rolled back; then version 1's workers are killed until it
    crash-loops. The supervisor may fall back only to what the flow named: nothing (2 failed its bake),
    so it stops version 1 instead of restoring 2. ``rollback`` by default refuses 2; ``--to 1`` while
    nothing serves brings 1 back (an operator's choice may restore a version that crash-looped)."""
    monkeypatch.setenv("ONEPATH_RESTART_LIMIT", "2")  # read by the supervisor the first deploy starts
    org, deployer, book, services = world["org"], world["deployer"], world["ledger"], world["services"]
    t = target(world, "sv_baked")
    deploy_like_factories(org, "sv_baked", "prod", "1", world["resources"])
    deploy_like_factories(org, "sv_baked", "prod", "2", world["resources"])
    assert state(world, "sv_baked")["previous_version"] == "1"  # the flow named 1 as 2's way back
    book.append("bake_failed", "sv_baked", {"model": "sv_baked_model", "version": "2", "previous_version": "1"},
                "dagster:test-run", env="prod")

    def rollback(**kw):
        return roll_back(org, world["policy"], "sv_baked", "prod", services=services, actor="pat",
                         reason="v2 failed its bake", **kw)

    assert rollback().to_version == "1"
    wait_for("version 1 current", lambda: serving(world, "sv_baked", "1"))
    assert state(world, "sv_baked")["previous_version"] is None  # 2 is no way back: none is named

    def kill_current() -> bool:
        sup = deployer.status(t).detail.get("supervisor") or {}
        if sup.get("state") == "crashloop":
            return True
        for pid in (state(world, "sv_baked").get("current") or {}).get("pids") or []:
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        return False

    wait_for("version 1 stopped as crash-looping after its workers were killed", kill_current, 60)
    loop = next(e for e in events(world, "sv_baked") if e["event"] == "crashloop")
    assert (loop["version"], loop["action"], loop["rollback_to"]) == ("1", "stopped", None)
    assert not any(e["event"] == "crashloop_rollback" for e in events(world, "sv_baked"))
    assert deployer.status(t).serving_version is None  # version 2 never came back
    relay(world, {})
    assert book.entries(kind="crashloop", subject="sv_baked", env="prod")[-1].data["action"] == "stopped"

    with pytest.raises(PromotionError, match="refused to roll back to version 2: version 2 failed its bake in prod"):
        rollback()
    back = rollback(to_version="1")
    assert (back.from_version, back.to_version) == ("1", "1")
    assert wait_for("version 1 serving again", lambda: serving(world, "sv_baked", "1")).serving_version == "1"


def test_supervisor_events_sensor_definition(world):
    sensor = build_supervisor_events_sensor(world["org"], world["policy"])
    assert sensor.name == "supervisor_events" and sensor.minimum_interval_seconds == 5
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.required_resource_keys == {"mlflow", "deployer_local", "ledger", "data_store"}
    dg.Definitions.validate_loadable(dg.Definitions(sensors=[sensor], resources=world["resources"]))
