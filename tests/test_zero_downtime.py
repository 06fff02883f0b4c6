"""A redeploy at an environment's stable address drops no request (issue 4, zero-downtime switch).

Real parts only: two real MLflow sklearn model versions, the local deployer with its supervisor and
model-server processes on loopback, and a keep-alive HTTP/1.1 load client on asyncio streams. The
client first measures capacity (closed loop, 16 connections), then drives an open loop at half of
it over several keep-alive connections while version B replaces A and A replaces B again. Every
request must get a 200: a reset, an EOF before the whole response, a timeout or any other status
counts as a failure. Each switch must really change the version every connection is answered by.

The keep-alive case is the one that used to fail: an old worker closed its idle keep-alive
connections the moment it was told to stop, so a client sending its next request on one of them at
that instant got an EOF.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from resources.deployers.base import Release, Target
from resources.deployers.local import LocalProcessDeployer
from tests.conftest import _free_port_base, grant_caller, model_release, save_credit_model

FEATURES = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
            "num_open_accounts", "delinquencies_2y", "employment_type", "home_ownership", "purpose"]
REQUEST_TIMEOUT = 10.0  # a request that takes this long counts as failed
OPEN_LOOP_CONNECTIONS = 12


def run(coro):
    """Run the client on uvloop (as the servers do): on two cores the client's own CPU shares the
    machine with the server under test, and uvloop halves it."""
    import uvloop

    return uvloop.run(coro)


# ------------------------------------------------------------------------------------------------
# a keep-alive HTTP/1.1 load client


@dataclass
class Tally:
    """What the load client saw. Appended to from the client's thread, read from the test's."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    closes: int = 0  # responses that asked the client to reconnect (connection: close)
    reconnects: int = 0
    # per connection: the version of its latest 200 answer, and every answer as (done_at, version)
    latest: dict[int, str] = field(default_factory=dict)
    answers: list[tuple[float, str]] = field(default_factory=list)
    scheduled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, conn: int, version: str) -> None:
        with self.lock:
            self.ok += 1
            self.latest[conn] = version
            self.answers.append((time.monotonic(), version))

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


@dataclass(frozen=True)
class Route:
    """What the client POSTs to and which field of a 200 answer names the version that answered."""

    path: str = "/predict"
    headers: dict[str, str] = field(default_factory=dict)  # the caller's credential
    version_field: str = "version"

    def head(self, host: str, port: int, length: int) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        return (f"POST {self.path} HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n{extra}"
                f"content-length: {length}\r\n\r\n").encode("latin-1")


class Connection:
    """One client connection: reused while the server keeps it alive, reopened when it asks."""

    def __init__(self, index: int, host: str, port: int, tally: Tally, route: Route):
        self.index, self.host, self.port, self.tally, self.route = index, host, port, tally, route
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opened = 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, body: bytes) -> None:
        try:
            await asyncio.wait_for(self._post(body), REQUEST_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ValueError, IndexError) as err:
            self.tally.fail(f"connection {self.index} (request {self.opened} on it): "
                            f"{type(err).__name__}: {err}")
            self.close()

    async def _post(self, body: bytes) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            if self.opened:
                self.tally.reconnects += 1
            self.opened = 0
        assert self.reader is not None
        self.opened += 1
        self.writer.write(self.route.head(self.host, self.port, len(body)) + body)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        payload = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            self.tally.closes += 1
            self.close()
        if status != 200:
            self.tally.fail(f"connection {self.index}: HTTP {status}: {payload[:200]!r}")
            return
        self.tally.record(self.index, str(json.loads(payload)[self.route.version_field]))


async def closed_loop(host: str, port: int, bodies: list[bytes], connections: int, seconds: float,
                      route: Route) -> tuple[float, Tally]:
    """Requests per second with ``connections`` clients each sending its next request on an answer."""
    tally = Tally()
    end = time.monotonic() + seconds

    async def client(i: int) -> int:
        conn, n = Connection(i, host, port, tally, route), 0
        while time.monotonic() < end:
            await conn.post(bodies[(i * 131 + n) % len(bodies)])
            n += 1
        conn.close()
        return n

    t0 = time.monotonic()
    done = await asyncio.gather(*(client(i) for i in range(connections)))
    return sum(done) / (time.monotonic() - t0), tally


async def open_loop(host: str, port: int, bodies: list[bytes], rate: float, connections: int, route: Route,
                    stop: threading.Event, tally: Tally) -> None:
    """Send at ``rate`` requests per second in total, whatever the answers take: connection ``k`` sends
    request ``j`` at ``t0 + (k + j * connections) / rate`` (or at once when it is behind)."""
    t0 = time.monotonic() + 0.05

    async def client(k: int) -> None:
        conn, j = Connection(k, host, port, tally, route), 0
        while not stop.is_set():
            due = t0 + (k + j * connections) / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tally.scheduled += 1
            await conn.post(bodies[(k * 977 + j) % len(bodies)])
            j += 1
        conn.close()

    await asyncio.gather(*(client(k) for k in range(connections)))


class Load(threading.Thread):
    def __init__(self, host: str, port: int, bodies: list[bytes], rate: float, connections: int, route: Route):
        super().__init__(daemon=True)
        self.args = (host, port, bodies, rate, connections, route)
        self.stop_event = threading.Event()
        self.tally = Tally()
        self.error: BaseException | None = None
        self.started_at = self.stopped_at = 0.0

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            run(open_loop(*self.args, self.stop_event, self.tally))
        except BaseException as err:  # surfaced by the test
            self.error = err
        self.stopped_at = time.monotonic()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(REQUEST_TIMEOUT + 5)
        assert not self.is_alive(), "the load client did not stop"
        if self.error is not None:
            raise self.error


def wait_until(condition, what: str, timeout: float, load: Load) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}; failures so far: {load.tally.failures[:5]}")
        if not load.is_alive():
            raise AssertionError(f"the load client stopped early: {load.error!r}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------
# the test


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    # B is A's files in a second directory: what the switch exercises is the processes, and a second
    # real save costs MLflow's ~5 s pip-requirements inference (the deployer contract test deploys
    # two differently trained models)
    root = tmp_path_factory.mktemp("zdt_models")
    a = save_credit_model(root / "a", seed=1)
    return {"A": a, "B": Path(shutil.copytree(a, root / "b"))}


@pytest.fixture(scope="module")
def bodies() -> list[bytes]:
    from assets.credit.data import generate_credit_applications

    df = generate_credit_applications(rows=500, seed=11)
    records = json.loads(df[["application_id", *FEATURES]].to_json(orient="records"))
    return [json.dumps({"records": [r]}).encode() for r in records]


def test_redeploy_and_rollback_under_keep_alive_load_drop_no_request(model_dirs, bodies, tmp_path, monkeypatch):
    monkeypatch.setenv("ONEPATH_DRAIN_SECONDS", "5")  # the supervisor's and the workers' drain deadline
    deployer = LocalProcessDeployer(tmp_path / "run", port_base=_free_port_base(),
                                    inference_log_dir=tmp_path / "inference",
                                    artifact_roots=[model_dirs["A"].parent])
    target = Target("zdt", "prod", kind="endpoint")
    versions = {"A": "1", "B": "2"}

    def release(which: str) -> Release:
        return model_release(versions[which], model_dirs[which], {"model_name": "credit_risk", "pii_columns": []})

    load: Load | None = None
    try:
        route = Route("/predict", grant_caller(deployer, target, "zdt-load", ("predict",)))  # a granted caller
        st = deployer.deploy(target, release("A"))
        assert st.healthy and st.serving_version == "1"
        host, port = "127.0.0.1", int(st.address.rsplit(":", 1)[1])

        capacity, warm = run(closed_loop(host, port, bodies, connections=16, seconds=2.0, route=route))
        assert not warm.failures, warm.failures[:5]
        assert capacity > 0
        rate = capacity / 2
        print(f"\ncapacity {capacity:.0f} req/s (closed loop, 16 keep-alive connections); "
              f"open loop at {rate:.0f} req/s over {OPEN_LOOP_CONNECTIONS} connections")

        load = Load(host, port, bodies, rate, OPEN_LOOP_CONNECTIONS, route)
        load.start()
        tally = load.tally
        wait_until(lambda: len(tally.latest) == OPEN_LOOP_CONNECTIONS, "every connection answered by A", 10, load)

        for which in ("B", "A"):  # redeploy, then roll back with another deploy
            v = versions[which]
            before = tally.ok
            st = deployer.deploy(target, release(which))
            assert st.serving_version == v and st.address == f"http://{host}:{port}"
            assert tally.ok > before, "the load client sent nothing while the version switched"
            wait_until(lambda: len(tally.latest) == OPEN_LOOP_CONNECTIONS and set(tally.latest.values()) == {v},
                       f"every keep-alive connection answered by version {v}", 15, load)

        load.stop()
        elapsed = load.stopped_at - load.started_at
        seen = [ver for _, ver in tally.answers]
        switches = [ver for i, ver in enumerate(seen) if i == 0 or seen[i - 1] != ver]
        print(f"sent {tally.scheduled} requests in {elapsed:.1f} s ({tally.scheduled / elapsed:.0f} req/s); "
              f"{tally.ok} answered 200, {len(tally.failures)} failed; {tally.closes} answers asked the client "
              f"to reconnect; version order {switches[:3]}...{switches[-3:]}")
        assert not tally.failures, f"{len(tally.failures)} of {tally.scheduled} requests failed: {tally.failures[:10]}"
        assert tally.ok == tally.scheduled
        assert seen[0] == "1" and "2" in seen and seen[-1] == "1"
        # the old version's keep-alive connections were asked to move, not cut
        assert tally.closes >= OPEN_LOOP_CONNECTIONS
    finally:
        if load is not None and load.is_alive():
            load.stop_event.set()
            load.join(REQUEST_TIMEOUT + 5)
        deployer.delete(target)
        deployer.stop_all()


# ------------------------------------------------------------------------------------------------
# the app release's own calls, through a model redeploy and a rotation of its credential (issue 11)

APPLICATION = {
    "full_name": "Ada Lovelace", "national_id": "NI-1", "email": "ada@example.org", "gender": "F",
    "age_band": "36-50", "annual_income": 52000, "loan_amount": 12000, "loan_term_months": 36,
    "debt_to_income": 0.31, "credit_history_years": 7.5, "num_open_accounts": 4, "delinquencies_2y": 0,
    "employment_type": "salaried", "home_ownership": "mortgage", "purpose": "car",
}
OVERLAP_SECONDS = 3.0  # the old secret's last moments, kept short so the test sees it refused


def test_the_app_release_calls_its_endpoint_with_its_credential_through_a_redeploy_and_a_rotation(
        model_dirs, tmp_path, monkeypatch):
    """loan_portal deployed by the promotion flow (which issues its grant and hands it its credential before
    its workers start) is driven under load while the model it calls is redeployed and its credential is
    rotated: every application is scored (0 failed), and once the overlap is over the old secret is refused."""
    import urllib.error
    import urllib.request

    from platform_defs.access import Access, grants
    from platform_defs.loader import load_organisation
    from platform_defs.promotion import Services, promote_app
    from resources.ledger import Ledger
    from tests.conftest import quick_policy, record_policy

    monkeypatch.setenv("ONEPATH_DRAIN_SECONDS", "5")
    root = Path(__file__).resolve().parents[1]
    policy = quick_policy()
    policy = policy.model_copy(update={"access": policy.access.model_copy(update={"overlap_seconds": OVERLAP_SECONDS})})
    book = Ledger(tmp_path / "ledger.db", tmp_path / "keys" / "platform.key")
    record_policy(book, policy)
    releases = tmp_path / "releases"
    shutil.copytree(root / "apps" / "loan_portal", releases / "apps" / "loan_portal" / "r1",
                    ignore=shutil.ignore_patterns("__pycache__"))
    deployer = LocalProcessDeployer(tmp_path / "run", port_base=_free_port_base(),
                                    inference_log_dir=tmp_path / "inference",
                                    artifact_roots=[model_dirs["A"].parent, releases])
    org = load_organisation(policy=policy)
    endpoint = Target("credit_scoring", "staging", kind="endpoint")
    access = Access(book, deployer, actor="test")

    def release(which: str, version: str) -> Release:
        return model_release(version, model_dirs[which], {"model_name": "credit_risk", "pii_columns": [],
                                                          "pass_through": ["application_id", "gender", "age_band"]})

    def refused(token: str) -> bool:  # the endpoint's answer to a direct call with ``token``
        req = urllib.request.Request(deployer.address(endpoint) + "/version", headers={"authorization": f"Bearer {token}"})
        try:
            urllib.request.urlopen(req, timeout=5).close()
            return False
        except urllib.error.HTTPError as err:
            return err.code == 403 and b"rotated out" in err.read()

    load: Load | None = None
    try:
        access.publish_table(endpoint)  # as every endpoint deploy does first
        assert deployer.deploy(endpoint, release("A", "1")).serving_version == "1"
        app = promote_app(org, policy, "loan_portal", "staging", actor="test", trigger="test", repo_root=root,
                          newest_build=lambda: "r1",
                          services=Services(mlflow=None, deployer=deployer, ledger=book, releases_dir=releases))
        [grant] = [g for g in grants(book).values() if g.caller == "app:loan_portal"]
        credential = deployer.slot_dir(Target("loan_portal", "staging", "app")) / "private" / "credentials" / "CREDIT_SCORING"
        old = credential.read_text().strip()
        host, port = "127.0.0.1", int(app.address.rsplit(":", 1)[1])
        route = Route("/api/apply", {}, "model_version")  # the load is the app's customers: no credential of theirs
        bodies = [json.dumps({**APPLICATION, "loan_amount": 5000 + 37 * i}).encode() for i in range(200)]

        capacity, warm = run(closed_loop(host, port, bodies, connections=8, seconds=2.0, route=route))
        assert not warm.failures, warm.failures[:5]
        rate = max(5.0, capacity / 2)
        load = Load(host, port, bodies, rate, 6, route)
        load.start()
        tally = load.tally
        wait_until(lambda: len(tally.latest) == 6, "every connection's application scored by version 1", 15, load)

        access.publish_table(endpoint)
        before = tally.ok
        assert deployer.deploy(endpoint, release("B", "2")).serving_version == "2"  # the model redeployed
        wait_until(lambda: set(tally.latest.values()) == {"2"} and len(tally.latest) == 6,
                   "every connection's application scored by version 2", 20, load)
        assert tally.ok > before

        rotated = access.rotate(org, grant.id)  # the credential rotated while the app is busy
        assert rotated.id == grant.id and credential.read_text().strip() != old
        wait_until(lambda: refused(old), "the old secret refused once the overlap is over", OVERLAP_SECONDS + 15, load)
        after = tally.ok
        wait_until(lambda: tally.ok >= after + max(10, int(rate)), "applications still scored after the overlap",
                   20, load)
        load.stop()
        print(f"\napp capacity {capacity:.0f} applications/s (closed loop, 8 connections); under load at {rate:.0f}/s: "
              f"{tally.scheduled} applications, {tally.ok} scored, "
              f"{len(tally.failures)} failed, through a model redeploy and a rotation")
        assert not tally.failures, f"{len(tally.failures)} of {tally.scheduled} failed: {tally.failures[:10]}"
        assert tally.ok == tally.scheduled
        rotations = [e for e in book.entries(kind="credential_rotated") if e.data["grant"] == grant.id]
        assert rotations and old.rsplit(".", 1)[1] not in json.dumps([e.as_dict() for e in book.entries()])
    finally:
        if load is not None and load.is_alive():
            load.stop_event.set()
            load.join(REQUEST_TIMEOUT + 5)
        deployer.stop_all()


# ------------------------------------------------------------------------------------------------
# the drain itself, step by step, on one child process (an app release's way of serving)

APP = '''
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            await send({"type": msg["type"] + ".complete"})
            if msg["type"] == "lifespan.shutdown":
                return
    while (await receive()).get("more_body"):
        pass
    body = b"hello"
    # the app asks for keep-alive: while draining the server must override it
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"5"), (b"connection", b"keep-alive")]})
    await send({"type": "http.response.body", "body": body})
'''

LAUNCH = '''
import os, socket, subprocess, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(64)
os.environ["ONEPATH_LISTEN_FDS"] = str(s.fileno())
p = subprocess.Popen([sys.executable, "-m", "resources.serving.child", "--app-dir", sys.argv[1],
                      "--app", "drainapp:app"], pass_fds=(s.fileno(),))
print(p.pid, s.getsockname()[1], flush=True)
s.close()  # like the supervisor's private socket: only the child holds it now
sys.stdin.read()  # live until the test closes stdin or kills this process
p.wait()
'''


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except OSError:
        return True


def _connect(port: int):
    import socket

    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _get(sock) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"EOF after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(4096)
    return int(lines[0].split()[1]), headers, body


def _wait(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.01)


@pytest.fixture
def child(tmp_path, monkeypatch):
    """A child serving a tiny ASGI app on a socket only it holds, under a stand-in parent process."""
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "drainapp.py").write_text(APP)
    monkeypatch.setenv("ONEPATH_DRAIN_IDLE_SECONDS", "2.5")
    monkeypatch.setenv("ONEPATH_DRAIN_SECONDS", "20")
    root = str(Path(__file__).resolve().parents[1])
    parent = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, cwd=root, env={**os.environ, "PYTHONPATH": root})
    pid, port = (int(x) for x in parent.stdout.readline().split())

    def answers() -> bool:
        try:
            with _connect(port) as s:
                return _get(s)[0] == 200
        except OSError:
            return False

    try:
        _wait(answers, "the child answers")
        yield parent, pid, port
    finally:
        if not _pid_gone(pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_a_draining_child_stops_accepting_answers_its_connections_with_close_then_exits(child):
    import os
    import signal

    parent, pid, port = child
    busy, idle = _connect(port), _connect(port)
    assert _get(busy)[1]["connection"] == "keep-alive" and _get(idle)[0] == 200

    os.kill(pid, signal.SIGTERM)

    def refused() -> bool:
        try:
            _connect(port).close()
            return False
        except (ConnectionRefusedError, ConnectionResetError):  # reset: queued as the listener closed
            return True

    _wait(refused, "the draining child closed its listening socket")  # (1) no new connections
    assert not _pid_gone(pid)
    status, headers, body = _get(busy)  # (2) a connection it has still gets answers, told to go
    assert (status, body, headers["connection"]) == (200, b"hello", "close")
    assert busy.recv(1) == b""  # and the server closed it after that answer
    idle.settimeout(20)
    assert idle.recv(1) == b""  # (3) the idle one is closed after the grace, not reset
    _wait(lambda: _pid_gone(pid), "the child exited once no connection was left")  # (4)
    busy.close()
    idle.close()
    parent.stdin.close()
    assert parent.wait(10) == 0


def test_a_child_whose_parent_died_keeps_serving(child):
    """A supervisor's death is not an outage: its workers serve on until a new one adopts them
    (tests/test_supervisor_death.py drives the adoption)."""
    parent, pid, port = child
    keep = _connect(port)
    assert _get(keep)[1]["connection"] == "keep-alive"
    parent.kill()
    parent.wait()
    _wait(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] != str(parent.pid),
          "the child reparented after its parent died")
    status, headers, _ = _get(keep)  # its connections stay
    assert (status, headers["connection"]) == (200, "keep-alive")
    with _connect(port) as s:  # and it takes new ones
        assert _get(s)[0] == 200
    assert not _pid_gone(pid)
    keep.close()
