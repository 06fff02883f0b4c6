"""Workers and deploys under crashes, for real (issue 9): a candidate takes no connection before it is
promoted, an interrupted deploy (SIGINT, or the deployer SIGKILLed) leaves nothing of it behind, a
version stopped for crash-looping is refused at once with a 503 that says why, and a SIGKILLed worker
of two loses nothing for onepath's own (retrying) client.

Real supervisors and model servers on loopback (one run dir and port range for the module), MLflow
model folders saved once. Load comes from plain ``http.client`` threads, one new connection per
request, so a request that reached the wrong version, hung or failed is seen as such.
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
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from resources.deployers.base import Target
from resources.deployers.local import LocalProcessDeployer
from resources.serving import protocol
from resources.serving.retry import call_with_retry
from tests.conftest import _free_port_base, caller_headers, model_release, save_credit_model, wait_for

ROW = {"annual_income": 52000.0, "loan_amount": 12000.0, "loan_term_months": 36, "debt_to_income": 0.3,
       "credit_history_years": 7.5, "num_open_accounts": 4, "delinquencies_2y": 0,
       "employment_type": "salaried", "home_ownership": "mortgage", "purpose": "car"}
BODY = json.dumps({"records": [ROW]}).encode()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("crashes")
    good = save_credit_model(root / "models" / "good", seed=1)
    deployer = LocalProcessDeployer(root / "run", port_base=_free_port_base(), inference_log_dir=root / "logs",
                                    artifact_roots=[root / "models"])
    yield {"root": root, "deployer": deployer, "models": {"good": good}}
    deployer.stop_all()


@pytest.fixture(scope="module")
def serving(world):
    """Version 1 served with two workers at one prod target, for the module's tests in turn: its
    port and the test's credential for it (granted before the deploy)."""
    target = Target("wc", "prod")
    headers = caller_headers(world["deployer"], target)
    st = world["deployer"].deploy(target, release(world, "1", "good", workers=2))
    return target, int(st.address.rsplit(":", 1)[1]), headers


def release(world, version: str, which: str, workers: int = 1):
    return model_release(version, world["models"][which], {"model_name": "credit_risk"}, workers=workers)


def supervisor_status(world, target: Target) -> dict:
    return protocol.control_call(world["deployer"].slot_dir(target), "/status")


def events(world, target: Target) -> list[dict]:
    path = world["deployer"].slot_dir(target) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class Load:
    """Threads POSTing /predict at ``rate`` req/s in all, each request on a new connection (``keep``:
    over one kept-alive connection per thread). With ``retry`` each request goes through onepath's
    own retry rule (``resources.serving.retry``). Every request carries the caller's credential
    ``headers``."""

    port: int
    headers: dict[str, str]
    rate: float = 100.0
    threads: int = 4
    keep: bool = False
    retry: bool = False
    ok: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def start(self) -> "Load":
        for t in self.workers:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.workers:
            t.join(15)

    def _run(self) -> None:
        conn: list[http.client.HTTPConnection | None] = [None]
        step = self.threads / self.rate
        due = time.monotonic()

        def send() -> tuple[int, bytes, str | None]:
            if conn[0] is None:
                conn[0] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn[0].request("POST", "/predict", body=BODY, headers={"content-type": "application/json", **self.headers})
                resp = conn[0].getresponse()
                raw = resp.read()
            except BaseException:
                conn[0].close()
                conn[0] = None
                raise
            if not self.keep or (resp.getheader("connection") or "").lower() == "close":
                conn[0].close()
                conn[0] = None
            return resp.status, raw, resp.getheader("retry-after")

        while not self.stop_event.is_set():
            due += step
            self.stop_event.wait(max(0.0, due - time.monotonic()))
            try:
                status, raw, _ = call_with_retry(send) if self.retry else send()
            except Exception as err:  # noqa: BLE001 - every failure is what the test counts
                with self.lock:
                    self.failures.append(f"{type(err).__name__}: {err}")
                continue
            with self.lock:
                if status != 200:
                    self.failures.append(f"HTTP {status}: {raw[:200]!r}")
                    continue
                self.ok += 1
                v = str(json.loads(raw)["version"])
                self.versions[v] = self.versions.get(v, 0) + 1


DEPLOY = '''
import sys
from pathlib import Path
from resources.deployers.base import Target
from resources.deployers.local import LocalProcessDeployer
from tests.conftest import model_release
run_dir, port_base, root, model, version = sys.argv[1:6]


class Deployer(LocalProcessDeployer):
    def _await_healthy(self, candidate, deadline):
        print("health wait", flush=True)  # tells the test the candidate is launched and awaited
        return super()._await_healthy(candidate, deadline)


d = Deployer(Path(run_dir), port_base=int(port_base), inference_log_dir=Path(root) / "logs",
             artifact_roots=[Path(root) / "models"])
d.promote_margin = 1.0  # a candidate left behind is discarded 1 s after the deploy's own deadline
# (a short deploy timeout: the candidate is still loading when the deadline passes)
d.deploy(Target("wc", "prod"), model_release(version, model, {"model_name": "credit_risk"}), timeout=3)
'''


def _deploy_in_subprocess(world, version: str, which: str) -> subprocess.Popen:
    d = world["deployer"]
    return subprocess.Popen(
        [sys.executable, "-c", DEPLOY, str(d.run_dir), str(d.port_base), str(world["root"]),
         str(world["models"][which]), version],
        cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _candidate(world, target: Target, version: str) -> dict | None:
    st = supervisor_status(world, target)
    return next((g for g in st["groups"] if g["version"] == version and g["state"] == "starting"
                 and all(g["alive"])), None)


def _steady(world, target: Target, version: str, times: int = 5) -> None:
    for _ in range(times):
        st = world["deployer"].status(target)
        assert st.healthy and st.serving_version == version, st
        assert st.detail["supervisor"]["version"] == version and st.detail["supervisor"]["state"] == "current"


def test_an_interrupted_deploy_leaves_nothing_of_its_candidate_serving(world, serving):
    """SIGINT during the health wait: the deployer discards its candidate on the way out. SIGKILL
    during it: the supervisor discards the candidate once its launch's deadline has passed. A
    candidate that is healthy but not promoted (what a hung or killed deployer leaves) takes no
    connection. The old version answers every request throughout; status never names a candidate."""
    d = world["deployer"]
    target, port, headers = serving
    load = Load(port, headers, rate=60).start()
    try:
        # SIGINT while the candidate loads (it was spawned a moment ago: python is still importing)
        proc = _deploy_in_subprocess(world, "2", "good")
        assert proc.stdout.readline() == b"health wait\n"
        cand = _candidate(world, target, "2")
        assert cand is not None
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and b"KeyboardInterrupt" in err, err[-2000:]
        gone = supervisor_status(world, target)
        group = next(g for g in gone["groups"] if g["id"] == cand["id"])
        assert group["state"] == "failed"
        wait_for("the candidate's workers gone", lambda: not any(
            next(g for g in supervisor_status(world, target)["groups"] if g["id"] == cand["id"])["alive"]), 10)
        assert any(e["event"] == "discard" and e["group"] == cand["id"] for e in events(world, target))
        _steady(world, target, "1")

        # SIGKILL while the candidate loads: nobody is left to discard it but the supervisor
        proc = _deploy_in_subprocess(world, "3", "good")
        assert proc.stdout.readline() == b"health wait\n"
        cand = _candidate(world, target, "3")
        assert cand is not None
        proc.kill()
        proc.communicate(timeout=30)
        launch = next(e for e in events(world, target) if e["event"] == "launch" and e["group"] == cand["id"])
        assert launch["promote_within"] == 3 + 1.0  # the deploy's timeout plus the deployer's margin
        expired = wait_for("the supervisor discarded the orphan", lambda: next(
            (e for e in events(world, target) if e["event"] == "candidate_expired" and e["group"] == cand["id"]),
            None), 30)
        assert "not promoted within the deadline" in expired["detail"]
        wait_for("the orphan's workers gone", lambda: not any(
            next(g for g in supervisor_status(world, target)["groups"] if g["id"] == cand["id"])["alive"]), 10)
        _steady(world, target, "1")

        # a candidate healthy on its private socket but never promoted answers no client
        cand = d._launch(target, release(world, "4", "good"), promote_within=300)
        slot, gid = cand.handle["slot"], cand.handle["group"]
        wait_for("the unpromoted candidate healthy on its private socket", lambda: all(
            doc is not None and doc.get("version") == "4"
            for doc in protocol.control_call(slot, "/probe", {"group": gid})["workers"]), 90)
        seen = load.ok
        wait_for("requests answered while it is healthy", lambda: load.ok >= seen + 30, 30)
        _steady(world, target, "1")
        d._discard(cand)
    finally:
        load.stop()
    assert not load.failures, load.failures[:10]
    assert set(load.versions) == {"1"}, load.versions  # the candidates never answered a client
    assert load.ok > 100


def _raw_request(port: int, headers: dict[str, str], method: str = "POST") -> tuple[int, dict, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, "/predict" if method == "POST" else "/health",
                     body=BODY if method == "POST" else None,
                     headers={"content-type": "application/json", **headers})
        resp = conn.getresponse()
        return resp.status, {"retry-after": resp.getheader("retry-after"), **json.loads(resp.read())}, \
            time.monotonic() - t0
    finally:
        conn.close()


def test_a_version_stopped_for_crash_looping_is_refused_at_once_saying_why(world, monkeypatch):
    """The version's only worker dies twice (SIGKILL: the second death is a crash loop with
    ONEPATH_RESTART_LIMIT=1), with nothing to go back to: every request gets the supervisor's 503 at
    once, saying why; a good version deployed over it answers again."""
    monkeypatch.setenv("ONEPATH_RESTART_LIMIT", "1")  # read by the supervisor this deploy starts
    d = world["deployer"]
    target = Target("wc_loop", "staging")
    headers = caller_headers(d, target)
    st = d.deploy(target, release(world, "1", "good"))
    port = int(st.address.rsplit(":", 1)[1])
    first = supervisor_status(world, target)["current"]["pids"][0]
    os.kill(first, signal.SIGKILL)
    # its only worker is restarting (python alone takes longer to start than this takes to see)
    status, doc, seconds = wait_for("the supervisor answering for the restarting worker",
                                    lambda: (lambda got: got if got[0] == 503 else None)(_raw_request(port, headers)), 10)
    assert (doc["cause"], doc["retry-after"], doc["version"]) == ("restarting", "1", "1"), doc
    assert "every worker of version 1 of wc_loop staging exited" in doc["error"]
    again = wait_for("the worker restarted", lambda: (
        lambda pid: pid if pid not in (None, first) else None)(supervisor_status(world, target)["current"]["pids"][0]),
        30)
    os.kill(again, signal.SIGKILL)
    wait_for("version 1 stopped as crash-looping",
             lambda: (supervisor_status(world, target)["current"] or {}).get("state") == "crashloop", 30)
    loop = next(e for e in events(world, target) if e["event"] == "crashloop")
    assert loop["action"] == "stopped"
    answers = [_raw_request(port, headers, "POST" if i % 2 else "GET") for i in range(40)]
    for status, doc, seconds in answers:
        assert status == 503, (status, doc, seconds)
        assert (doc["endpoint"], doc["environment"], doc["version"], doc["cause"]) == (
            "wc_loop", "staging", "1", "crashloop_stopped")
        assert "version 1 of wc_loop staging was stopped after crash-looping" in doc["error"]
        assert "nothing serves here" in doc["error"] and doc["retry-after"] is None
    # the supervisor's status and the deployer's say the same
    assert supervisor_status(world, target)["refusing"]["cause"] == "crashloop_stopped"
    now = d.status(target)
    assert not now.healthy and now.detail["supervisor"]["refusing"]["cause"] == "crashloop_stopped"

    # a good version deployed over it: the refusal stops, the new version answers every request
    st = d.deploy(target, release(world, "2", "good"))
    assert st.serving_version == "2"
    statuses = [_raw_request(port, headers)[:2] for _ in range(20)]
    assert all(s == 200 and doc["version"] == "2" for s, doc in statuses), statuses
    assert supervisor_status(world, target)["refusing"] is None


def test_a_sigkilled_worker_of_two_loses_no_request_of_a_retrying_client(world, serving):
    """~200 req/s, half on new connections, half kept alive, through onepath's retry rule; each of
    the two workers SIGKILLed in turn (once both are ready again). The retrying client's failures
    must be none (README: what a raw client sees, measured)."""
    d = world["deployer"]
    target, port, headers = serving
    restarts_before = sum(e["event"] == "restart" for e in events(world, target))
    loads = [Load(port, headers, rate=100, retry=True).start(), Load(port, headers, rate=100, keep=True, retry=True).start()]
    try:
        for k in range(2):
            sup = d.status(target).detail["supervisor"]
            assert sup["ready"] == [True, True]
            pid = sup["pids"][k % 2]
            before = sum(ld.ok for ld in loads)
            os.kill(pid, signal.SIGKILL)
            wait_for("the killed worker restarted and ready", lambda: (
                lambda s: pid not in s["pids"] and s["ready"] == [True, True])(d.status(target).detail["supervisor"]),
                90)
            wait_for("load answered after the kill", lambda: sum(ld.ok for ld in loads) > before + 50, 30)
    finally:
        for ld in loads:
            ld.stop()
    restarts = [e for e in events(world, target) if e["event"] == "restart"]
    print(f"\n{sum(ld.ok for ld in loads)} answered over 2 kills; retrying client failures: "
          f"{[len(ld.failures) for ld in loads]}")
    assert len(restarts) == restarts_before + 2
    for ld in loads:
        assert not ld.failures, ld.failures[:10]
        assert set(ld.versions) == {"1"} and ld.ok > 300


def test_prod_endpoints_run_two_workers_unless_the_declaration_says_otherwise():
    from platform_defs.specs import EndpointSpec

    unset = EndpointSpec(name="wc_spec", owner="risk", track="ml-standard", model="m")
    assert (unset.workers, unset.workers_in("prod"), unset.workers_in("staging")) == (None, 2, 1)
    one = EndpointSpec(name="wc_spec", owner="risk", track="ml-standard", model="m", workers=1)
    assert (one.workers_in("prod"), one.workers_in("staging")) == (1, 1)
    with pytest.raises(ValueError, match="workers"):
        EndpointSpec(name="wc_spec", owner="risk", track="ml-standard", model="m", workers=0)
