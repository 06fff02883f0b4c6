"""A supervisor's death is never an outage: its workers keep serving, a new supervisor adopts them
(it is handed the stable listening socket by one of them), and what happened is a ledger entry.

Real processes on loopback: one endpoint with two workers, driven through the local deployer; the
supervisor is SIGKILLed while a client sends ~150 requests/s through the stable address. The revive
is the one the ``endpoint_status`` sensor (and ``onepath status``) runs: ``revive_supervisors``. The
ledger entries come from the ``supervisor_events`` relay. One model folder serves as both versions
(a version label is enough here; the digest is checked all the same).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from platform_defs.loader import load_organisation
from platform_defs.policy import load_policy
from platform_defs.promotion import Services, endpoint_target
from resources.deployers.base import probe
from resources.deployers.local import LocalProcessDeployer
from resources.ledger import LedgerResource
from resources.processes import pid_alive
from resources.serving import protocol
from sensors.endpoint_status import revive_supervisors
from sensors.serving_health import outage_verdict
from sensors.supervisor_events import relay_events
from tests.conftest import _free_port_base, caller_headers, model_release, record_policy, save_credit_model, wait_for
from tests.test_rollback import write_org

ROW = {"annual_income": 52000.0, "loan_amount": 12000.0, "loan_term_months": 36, "debt_to_income": 0.3,
       "credit_history_years": 7.5, "num_open_accounts": 4, "delinquencies_2y": 0,
       "employment_type": "salaried", "home_ownership": "mortgage", "purpose": "car"}


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    org = load_organisation(write_org(root / "org", ["sd_adopt"], "sd"))
    model = save_credit_model(root / "models" / "a", seed=1)
    run_dir = root / "run"
    deployer = LocalProcessDeployer(run_dir, port_base=_free_port_base(), inference_log_dir=run_dir / "logs",
                                    artifact_roots=[tmp_path_factory.getbasetemp()])
    book = LedgerResource(location=str(root / "ledger.db"), key_path=str(root / "keys" / "platform.pem")).ledger()
    record_policy(book)  # the example policy, recorded as the one in force
    services = Services(mlflow=None, deployer=deployer, ledger=book)
    yield {"org": org, "deployer": deployer, "model": model, "services": services, "ledger": book}
    deployer.stop_all()


def target(world, name: str):
    return endpoint_target(world["org"].by_name[name], "prod")


def state(world, name: str) -> dict:
    return json.loads((world["deployer"].slot_dir(target(world, name)) / "state.json").read_text())


def events(world, name: str) -> list[dict]:
    path = world["deployer"].slot_dir(target(world, name)) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def current(world, name: str, version: str):
    """The deployer's status once ``version`` is current and answers at the stable address."""
    st = world["deployer"].status(target(world, name))
    sup = st.detail.get("supervisor") or {}
    return st if st.healthy and st.serving_version == version and sup.get("state") == "current" \
        and sup.get("version") == version else None


def relay(world) -> list:
    return relay_events(world["org"], load_policy(), world["services"], {})[0]


class Load:
    """Clients sending ``rate`` predictions/s in total through ``address`` (a new connection each, so a
    request reaches whichever worker accepts it), each holding the caller's credential ``headers``;
    every answer that is not a 200 of a known version, and every connection error, is a failure."""

    def __init__(self, address: str, headers: dict[str, str], rate: float = 150.0, clients: int = 6):
        self.host, self.port = address.removeprefix("http://").split(":")
        self.headers = {"content-type": "application/json", **headers}
        self.interval = clients / rate
        self.ok = 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _one(self) -> None:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=10)
        try:
            conn.request("POST", "/predict", body=json.dumps(ROW), headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
            with self.lock:
                if resp.status == 200:
                    self.ok += 1
                    self.versions.add(str(json.loads(body)["version"]))
                else:
                    self.failures.append(f"{resp.status} {body[:200]!r}")
        except (OSError, http.client.HTTPException) as err:
            with self.lock:
                self.failures.append(f"{type(err).__name__}: {err}")
        finally:
            conn.close()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.stopping.is_set():
            self._one()
            next_at += self.interval  # pacing to the rate, not waiting for anything to happen
            time.sleep(max(0.0, next_at - time.monotonic()))

    def count(self) -> int:
        with self.lock:
            return self.ok

    def more(self, n: int):
        """A condition: at least ``n`` more successful answers than now."""
        start = self.count()
        return lambda: self.count() >= start + n

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(20)


def test_a_killed_supervisor_is_adopted_under_load_without_a_failed_request(world):
    deployer, t = world["deployer"], target(world, "sd_adopt")
    headers = caller_headers(deployer, t)  # granted before the first deploy: its workers read it on request
    st = deployer.deploy(t, model_release("1", world["model"], {"model_name": "sd_model", "inference_log": False}, workers=2))
    pids = st.detail["supervisor"]["pids"]
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    old = state(world, "sd_adopt")["pid"]
    load = Load(st.address, headers)
    try:
        wait_for("the load answered", load.more(50), 30)
        os.kill(old, signal.SIGKILL)
        wait_for("the supervisor gone", lambda: not pid_alive(old), 10)
        # nobody supervises: the workers serve on, at the same address
        wait_for("100 more answers with no supervisor", load.more(100), 30)
        assert all(pid_alive(p) for p in pids)
        revived = revive_supervisors(deployer, [t])
        assert [(r["slot"], r["previous_pid"]) for r in revived] == [("sd_adopt.prod", old)]
        now = wait_for("the new supervisor serving version 1", lambda: current(world, "sd_adopt", "1"), 30)
        assert now.detail["supervisor"]["pid"] == revived[0]["pid"] != old
        assert now.detail["supervisor"]["pids"] == pids  # adopted, not started again
        assert revive_supervisors(deployer, [t]) == []  # a live supervisor is left alone
        wait_for("answers through the adopted workers", load.more(100), 30)

        # a deploy through the adopted supervisor: zero downtime as usual, the adopted workers drain
        st2 = deployer.deploy(t, model_release("2", world["model"], {"model_name": "sd_model", "inference_log": False}, workers=2))
        assert st2.serving_version == "2"
        wait_for("the adopted workers drained", lambda: not any(pid_alive(p) for p in pids), 30)
        wait_for("answers from version 2", load.more(100), 30)
    finally:
        load.stop()
    assert load.failures == [], f"{len(load.failures)} of {load.ok + len(load.failures)} failed: {load.failures[:5]}"
    assert load.versions == {"1", "2"}

    restarted = next(e for e in events(world, "sd_adopt") if e["event"] == "supervisor_restarted")
    assert (restarted["previous_pid"], restarted["adopted_pids"], restarted["relaunched"]) == (old, pids, False)
    assert isinstance(restarted["unsupervised_seconds"], float)
    written = relay(world)
    assert [(e.kind, e.actor) for e in written] == [("supervisor_restarted", "supervisor:sd_adopt.prod")]
    entry = written[0]
    assert (entry.data["version"], entry.data["adopted_pids"], entry.data["relaunched"]) == ("1", pids, False)
    assert relay(world) == []  # ids already in the ledger: never twice
    assert [e.kind for e in world["ledger"].entries(subject="sd_adopt", env="prod")] == ["supervisor_restarted"]


def test_the_listening_socket_goes_only_to_a_peer_with_the_secret(world):
    """The attacker's side of the handoff (on the live workers the test above left serving)."""
    deployer, t = world["deployer"], target(world, "sd_adopt")
    st = wait_for("version 2 serving", lambda: current(world, "sd_adopt", "2"), 30)
    group = state(world, "sd_adopt")["current"]["id"]
    slot = deployer.slot_dir(t)
    path = protocol.worker_socket(slot, group, 0, handoff=True)
    with pytest.raises(protocol.ControlError, match="wrong slot secret"):
        protocol.fetch_listening_socket(path, b"\x00" * protocol.SECRET_BYTES)
    # another local user cannot even reach the handoff socket (the private directory is 0700)
    probe_code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
                  "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(13)\nsys.exit(0)")
    other = subprocess.run(["/usr/bin/python3", "-I", "-c", probe_code, path], user=65534, timeout=30)
    assert other.returncode == 13
    # the slot's own secret gets it, and it is the stable socket (the supervisor checks the same)
    got = protocol.fetch_listening_socket(path, protocol.read_secret(slot))
    try:
        assert got.getsockname()[1] == int(st.address.rsplit(":", 1)[1])
        assert os.fstat(got.fileno()).st_ino == state(world, "sd_adopt")["stable_inode"]
    finally:
        got.close()
    # a second supervisor for a slot whose supervisor runs refuses to start
    argv = [sys.executable, "-m", "resources.serving.supervisor", "--slot-dir", str(slot), "--port",
            st.address.rsplit(":", 1)[1], "--artifact-root", str(slot)]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert second.returncode == 6 and "another supervisor runs" in second.stderr


def test_supervisor_and_workers_killed_the_revive_relaunches_and_records_the_outage(world):
    """Everything of the slot dies (version 2, left serving by the tests above)."""
    deployer, t = world["deployer"], target(world, "sd_adopt")
    st = wait_for("version 2 serving", lambda: current(world, "sd_adopt", "2"), 30)
    sup, pids = state(world, "sd_adopt")["pid"], st.detail["supervisor"]["pids"]
    for pid in [sup, *pids]:
        os.kill(pid, signal.SIGKILL)
    wait_for("the supervisor and its workers gone", lambda: not any(pid_alive(p) for p in [sup, *pids]), 10)
    assert probe(st.address, credential=deployer.probe_credential(t)) is None  # nothing serves: an outage
    assert not deployer.status(t).healthy

    # what the flow would have recorded for version 2: its registration (digest) and its deploy here; a
    # relaunch is believed only when it serves exactly that (confirm_relaunch)
    from resources.artifact_digest import folder_digest

    book = world["ledger"]
    book.append("model_registered", "sd_adopt_model", {"model": "sd_adopt_model", "version": "2",
                                                       "digest": folder_digest(world["model"])}, "test")
    book.append("deploy", "sd_adopt", {"model": "sd_adopt_model", "version": "2"}, "test", env="prod")

    revived = revive_supervisors(deployer, [t])
    assert [r["previous_pid"] for r in revived] == [sup]
    now = wait_for("version 2 serving again", lambda: current(world, "sd_adopt", "2"), 60)
    assert now.address == st.address and not set(now.detail["supervisor"]["pids"]) & set(pids)

    restarted = [e for e in events(world, "sd_adopt") if e["event"] == "supervisor_restarted"][-1]
    assert (restarted["previous_pid"], restarted["relaunched"], restarted["adopted_pids"]) == (sup, True, [])
    assert [e["version"] for e in events(world, "sd_adopt") if e["event"] == "serving_restored"] == ["2"]
    written = relay(world)
    assert [(e.kind, e.data.get("phase"), e.data["version"]) for e in written] == [
        ("supervisor_restarted", None, "2"), ("outage", "began", "2"), ("outage", "ended", "2")]
    # the environment's served_without_outage check fails for it (no deploy since: it stays failed)
    passed, description, metadata = outage_verdict(world["ledger"], "sd_adopt", "prod")
    assert not passed and metadata["outages"] == 1 and metadata["phase"] == "ended"
    assert "outage of version 2" in description and "it ended" in description


def test_a_stop_after_the_supervisor_died_stops_its_workers_and_nothing_revives(world):
    """``onepath down`` (``stop_all``) with the supervisor gone: the workers it left serving stop too."""
    deployer, t = world["deployer"], target(world, "sd_adopt")
    st = wait_for("version 2 serving", lambda: current(world, "sd_adopt", "2"), 30)
    sup, pids = state(world, "sd_adopt")["pid"], st.detail["supervisor"]["pids"]
    os.kill(sup, signal.SIGKILL)
    wait_for("the supervisor gone", lambda: not pid_alive(sup), 10)
    assert probe(st.address, credential=deployer.probe_credential(t)) is not None  # its workers serve on
    assert deployer.stop_all() == ["sd_adopt.prod"]
    wait_for("its workers gone", lambda: not any(pid_alive(p) for p in pids), 10)
    assert state(world, "sd_adopt")["stopped"] is True and revive_supervisors(deployer, [t]) == []
    assert probe(st.address, credential=deployer.probe_credential(t)) is None
