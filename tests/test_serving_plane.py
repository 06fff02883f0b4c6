"""The serving plane attacked the way a process on the host would attack it.

Real supervisors and workers on loopback. The world lives in a directory every user can traverse
(pytest's own base directory is 0700, which would make the other-user tests pass for the wrong
reason), so what stops the other user is the slot directory's own permissions.

* Listeners: the supervisor and its workers hold exactly one TCP listening socket between them, the
  stable address (read from /proc, not from what the code says about itself).
* Another local user (``nobody``, through ``setpriv``; CI runs as root, which ignores file modes):
  cannot reach the control socket, read the secret, the state or the events; and even with the
  directory loosened and the secret in hand, the supervisor refuses a peer of another uid (403).
* The platform's own user without the secret, or with a wrong one: 401. With it: a launch spec that
  carries argv/env/cwd, an unknown key, or an artifact outside the artifact roots (directly or
  through a symlink) is refused 400, and the attack's command never runs (its marker file never
  appears).
* Events: a forged line, an altered line and a line signed with another key are refused by
  ``read_events``.
* Fencing: a promote with a stale token is refused and the old version keeps serving; the highest
  token survives a supervisor restart.
* Refused artifacts (a worker exiting ``EXIT_ARTIFACT_REFUSED``): a candidate fails its deploy naming
  the mismatch; in the current group the other workers keep serving, and when all have refused the
  previous version is restored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from resources.artifact_digest import folder_digest
from resources.deployers.base import DeployError, Release, Target, probe
from resources.deployers.local import LocalProcessDeployer
from resources.processes import pid_alive
from resources.serving import protocol
from resources.serving.protocol import EXIT_ARTIFACT_REFUSED, ControlError
from tests.conftest import _free_port_base, granted, save_credit_model, wait_for
from tests.test_deployer_contract import predict

ROOT = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "ab" * 32

# A tiny ASGI app release. It refuses its artifact (exit 78, as the model server does on a digest
# mismatch) at import when the file REFUSE is in its directory, and later, in worker i, as soon as
# the file refuse-<i> appears.
APP = '''
import json, os, sys, threading, time
HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = os.environ["ONEPATH_RELEASE_VERSION"]
WORKER = os.environ.get("ONEPATH_WORKER_INDEX", "")
if os.path.exists(os.path.join(HERE, "REFUSE")):
    print("artifact refused: its bytes hash to sha256:0000 not to the release digest", flush=True)
    sys.exit(78)


def _watch():
    trigger = os.path.join(HERE, "refuse-" + WORKER)
    while not os.path.exists(trigger):
        time.sleep(0.05)
    print("worker " + WORKER + ": artifact refused: its bytes changed on disk", flush=True)
    os._exit(78)


threading.Thread(target=_watch, daemon=True).start()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    calls = {k: v for k, v in os.environ.items() if k.startswith("ONEPATH_") and k.endswith("_URL")}
    body = json.dumps({"version": VERSION, "pid": os.getpid(), "worker": WORKER, "env": os.environ.get("ONEPATH_ENV"),
                       "calls": calls}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
'''

NOBODY_CLIENT = r'''
import json, os, socket, sys
slot, secret = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as err:
        out[name] = type(err).__name__
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(os.path.join(slot, "private", "control.sock"))
    s.sendall(("GET /status HTTP/1.0\r\nX-Onepath-Secret: " + secret + "\r\n\r\n").encode())
    out["answer"] = s.recv(100).decode("latin-1")
attempt("connect", connect)
attempt("secret", lambda: open(os.path.join(slot, "private", "secret")).read())
attempt("state", lambda: open(os.path.join(slot, "state.json")).read())
attempt("events", lambda: open(os.path.join(slot, "events.jsonl")).read())
attempt("list_slot", lambda: os.listdir(slot))
attempt("list_run_dir", lambda: os.listdir(os.path.dirname(slot)))
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def world():
    base = Path(tempfile.mkdtemp(prefix="onepath-sp-"))
    os.chmod(base, 0o755)  # every user may traverse down to the run dir: only the slot dir stops them
    models = base / "models"
    models.mkdir(mode=0o755)
    a = save_credit_model(models / "a", seed=1)
    b = models / "b"
    shutil.copytree(a, b)  # a second version with the same files: what matters here is the processes
    apps = {}
    for name in ("r1", "r2", "r3", "r4"):
        d = models / "apps" / name
        d.mkdir(parents=True)
        (d / "tinyapp.py").write_text(APP)
        apps[name] = d
    (apps["r2"] / "REFUSE").write_text("")
    evil = base / "evil"
    evil.mkdir()
    (models / "link").symlink_to(evil)
    run = base / "run"
    run.mkdir()
    for opened in (models, run):  # (the test process's umask is the platform's 077: open these on purpose)
        opened.chmod(0o755)
    deployer = LocalProcessDeployer(run, port_base=_free_port_base(), inference_log_dir=base / "logs",
                                    artifact_roots=[models])
    yield {"base": base, "deployer": deployer, "a": a, "b": b, "apps": apps, "evil": evil, "models": models}
    deployer.stop_all()
    shutil.rmtree(base, ignore_errors=True)


def endpoint_release(world, version: str, which: str = "a", workers: int = 1, digest: str | None = None) -> Release:
    """A release of model folder ``which`` carrying its digest (the worker refuses any other bytes)."""
    return Release(version, str(world[which]), {"model_name": "credit_risk", "pii_columns": []},
                   workers=workers, digest=digest or folder_digest(world[which]))


def status(world, target: Target) -> dict:
    return protocol.control_call(world["deployer"].slot_dir(target), "/status")


@pytest.fixture(scope="module")
def served(world):
    """One endpoint with two workers, deployed once for the tests that attack it."""
    target = Target("sp_attack", "prod")
    st = world["deployer"].deploy(target, endpoint_release(world, "1", workers=2))
    assert st.healthy and st.serving_version == "1"
    return target, st


# -- listeners --------------------------------------------------------------------------------------


def _addr(hexaddr: str) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit words host-order
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw), int(port, 16)


def tcp_listeners(pid: int) -> set[tuple[str, int, int]]:
    """(address, port, inode) of every TCP socket in LISTEN state that ``pid`` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[len("socket:["):-1]))
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in inodes:  # 0A: LISTEN
                out.add((*_addr(f[1]), int(f[9])))
    return out


def test_the_supervisor_and_its_workers_listen_on_nothing_but_the_stable_address(world, served):
    target, st = served
    port = int(st.address.rsplit(":", 1)[1])
    state = json.loads((world["deployer"].slot_dir(target) / "state.json").read_text())
    cur = status(world, target)["current"]
    pids = [state["pid"], *cur["pids"]]
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    seen = set().union(*(tcp_listeners(p) for p in pids))
    assert {(a, p) for a, p, _ in seen} == {("127.0.0.1", port)}, seen
    assert len({inode for *_, inode in seen}) == 1  # one socket, shared: not one per process
    for p in cur["pids"]:  # every worker has it (and its own Unix health socket)
        assert tcp_listeners(p) == seen
    # state.json names no control port and holds no secret; the group view reports the digest
    secret_hex = protocol.read_secret(world["deployer"].slot_dir(target)).hex()
    assert "control_port" not in state and secret_hex not in json.dumps(state)
    digest = folder_digest(world["a"])
    assert state["current"]["digest"] == cur["digest"] == digest
    assert world["deployer"].status(target).detail["supervisor"]["digest"] == digest


def test_the_slot_is_owner_only_and_the_model_server_is_told_the_digest(world, served):
    target, _ = served
    slot = world["deployer"].slot_dir(target)
    private = slot / "private"
    mode = lambda p: stat.S_IMODE(os.lstat(p).st_mode)  # noqa: E731
    assert mode(slot) == mode(private) == 0o700
    assert mode(private / "secret") == 0o600 and stat.S_ISREG(os.lstat(private / "secret").st_mode)
    assert stat.S_ISSOCK(os.lstat(private / "control.sock").st_mode)
    for f in ("state.json", "events.jsonl", "supervisor.log"):
        assert mode(slot / f) & 0o077 == 0, f
    for log in (slot / "logs").iterdir():
        assert mode(log) & 0o077 == 0
    configs = list((private / "configs").glob("1-*.json"))
    assert len(configs) == 1 and mode(configs[0]) & 0o077 == 0
    cfg = json.loads(configs[0].read_text())
    assert cfg["expected_digest"] == folder_digest(world["a"]) and cfg["model_dir"] == str(world["a"].resolve())
    gid = status(world, target)["current"]["id"]
    assert sorted(p.name for p in private.glob("w-*.sock")) == sorted(  # health and handoff sockets
        [f"w-{gid}-{i}.sock" for i in range(2)] + [f"w-{gid}-{i}.fd.sock" for i in range(2)])


# -- tier (a): another local user ---------------------------------------------------------------------


def as_nobody(slot: Path, secret: str = "") -> dict:
    out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-I",
                          "-c", NOBODY_CLIENT, str(slot), secret], capture_output=True, text=True, timeout=60,
                         cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_another_local_user_cannot_reach_the_control_socket_nor_read_the_slot(world, served):
    target, _ = served
    slot = world["deployer"].slot_dir(target)
    seen = as_nobody(slot)
    assert seen["list_run_dir"] == "ok"  # the path down to the slot is open: the slot's own mode stops it
    assert {k: seen[k] for k in ("connect", "secret", "state", "events", "list_slot")} == dict.fromkeys(
        ("connect", "secret", "state", "events", "list_slot"), "PermissionError"), seen
    assert "answer" not in seen


def test_even_with_the_directory_opened_and_the_secret_known_another_uid_is_refused(world, served):
    """Defence in depth: SO_PEERCRED. An administrator's chmod mistake plus a leaked secret still do
    not let another user drive the supervisor."""
    target, _ = served
    slot = world["deployer"].slot_dir(target)
    private = slot / "private"
    secret = protocol.read_secret(slot).hex()
    before = len(status(world, target)["groups"])
    try:
        os.chmod(slot, 0o711)
        os.chmod(private, 0o711)
        os.chmod(private / "control.sock", 0o777)
        seen = as_nobody(slot, secret)
    finally:
        os.chmod(private / "control.sock", 0o700)
        os.chmod(private, 0o700)
        os.chmod(slot, 0o700)
    assert seen["connect"] == "ok" and seen["answer"].startswith("HTTP/1.0 403"), seen
    assert len(status(world, target)["groups"]) == before


# -- tier (b): the platform's own user --------------------------------------------------------------


def raw_request(slot: Path, method: str, route: str, body: dict | None = None, secret: str | None = None):
    conn = protocol.UnixHTTPConnection(str(slot / "private" / "control.sock"), 10)
    headers = {"content-type": "application/json"}
    if secret is not None:
        headers[protocol.SECRET_HEADER] = secret
    try:
        conn.request(method, route, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_without_the_secret_or_with_a_wrong_one_nothing_happens(world, served, tmp_path):
    target, _ = served
    slot = world["deployer"].slot_dir(target)
    marker = tmp_path / "pwned"
    attack = {"version": "1", "argv": ["/bin/sh", "-c", f"id > {marker}"], "env": {}, "cwd": "/"}  # the old API
    before = status(world, target)
    real = protocol.read_secret(slot).hex()
    for secret in (None, "", "00" * 32, real[:-1] + ("1" if real[-1] == "0" else "0")):  # one digit off
        code, body = raw_request(slot, "POST", "/launch", attack, secret)
        assert code == 401 and "secret" in body["error"], (secret, code, body)
        code, _ = raw_request(slot, "GET", "/status", None, secret)
        assert code == 401
    with pytest.raises(ControlError, match="401") as err:
        protocol.control_call(slot, "/promote", {"group": before["current"]["id"]}, secret=b"\0" * 32)
    assert err.value.status == 401 and "\n" not in str(err.value)
    assert status(world, target)["groups"] == before["groups"]
    assert not marker.exists()


def full_spec(world, **extra) -> dict:
    return {"kind": "endpoint", "version": "666", "artifact": str(world["a"]), "digest": folder_digest(world["a"]),
            "workers": 1, "model_name": "credit_risk", "pii_columns": [], "max_batch": 8, "model_threads": 1,
            "inference_log": False, **extra}


def test_with_the_secret_a_launch_runs_only_a_release_from_the_artifact_roots(world, served, tmp_path):
    target, _ = served
    slot = world["deployer"].slot_dir(target)
    secret = protocol.read_secret(slot).hex()
    marker = tmp_path / "pwned"
    cmd = ["/bin/sh", "-c", f"id > {marker}"]
    before = status(world, target)["groups"]
    refused = {
        "argv": (full_spec(world, argv=cmd), "unknown key 'argv'"),
        "env": (full_spec(world, env={"LD_PRELOAD": str(marker)}), "unknown key 'env'"),
        "cwd": (full_spec(world, cwd="/"), "unknown key 'cwd'"),
        "unknown": (full_spec(world, model_path="/etc"), "unknown key 'model_path'"),
        "old API": ({"version": "1", "argv": cmd, "env": {}, "cwd": "/"}, "'kind'"),
        "outside roots": (full_spec(world, artifact=str(world["evil"])), "outside the artifact roots"),
        "/tmp/evil": (full_spec(world, artifact="/tmp/evil"), "outside the artifact roots"),
        "symlink out": (full_spec(world, artifact=str(world["models"] / "link")), "outside the artifact roots"),
        "dot-dot out": (full_spec(world, artifact=str(world["models"] / ".." / "evil")), "outside the artifact roots"),
        "relative": (full_spec(world, artifact="models/a"), "absolute path"),
        "version": (full_spec(world, version="1; id"), "'version'"),
        "digest": (full_spec(world, digest="md5:abc"), "'digest'"),
        "no digest": (full_spec(world, digest=None), "an endpoint's 'digest' is required"),
        "workers": (full_spec(world, workers=10_000), "'workers'"),
        "app module": ({"kind": "app", "version": "1", "artifact": str(world["apps"]["r1"]), "digest": None,
                        "workers": 1, "entrypoint": "os:system", "calls": {}}, "not in the artifact"),
        "app call": ({"kind": "app", "version": "1", "artifact": str(world["apps"]["r1"]), "digest": None,
                      "workers": 1, "entrypoint": "tinyapp:app", "calls": {"X": "http://evil.example:80"}},
                     "http://127.0.0.1:<port>"),
    }
    for name, (spec, why) in refused.items():
        code, body = raw_request(slot, "POST", "/launch", spec, secret)
        assert code == 400 and why in body["error"], (name, code, body)
        assert "\n" not in body["error"]
    assert status(world, target)["groups"] == before
    assert not marker.exists()
    # the deployer refuses to send what a release cannot say, before the supervisor sees it
    with pytest.raises(DeployError, match="release config key 'env'"):
        world["deployer"].deploy(Target("sp_attack", "prod"), Release("9", str(world["a"]), {
            "model_name": "credit_risk", "env": {"LD_PRELOAD": "/tmp/x.so"}}))
    assert probe(world["deployer"].address(target), credential=world["deployer"].probe_credential(target))["version"] == "1"


def test_a_supervisor_refuses_a_secret_file_it_did_not_make(world, tmp_path):
    slot = world["base"] / "run" / "sp_badsecret.prod"
    protocol.ensure_owner_only_dir(slot)
    (slot / "private").mkdir(mode=0o700)
    (slot / "private" / "secret").write_text("00" * 32)
    os.chmod(slot / "private" / "secret", 0o644)
    args = [sys.executable, "-m", "resources.serving.supervisor", "--slot-dir", str(slot), "--port", "0",
            "--artifact-root", str(world["models"])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=str(ROOT))
    assert out.returncode == 5 and "mode 0644, not 0600" in out.stderr and len(out.stderr.splitlines()) == 1
    (slot / "private" / "secret").unlink()
    (slot / "private" / "secret").symlink_to(tmp_path / "planted")
    (tmp_path / "planted").write_text("00" * 32)
    os.chmod(tmp_path / "planted", 0o600)
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, cwd=str(ROOT))
    assert out.returncode == 5 and "refusing to start" in out.stderr and not (slot / "state.json").exists()


# -- signed events ------------------------------------------------------------------------------------


def test_read_events_returns_only_lines_the_supervisor_signed(world, served):
    target, _ = served
    deployer = world["deployer"]
    path = deployer.slot_dir(target) / "events.jsonl"
    events, offset, refused = deployer.read_events(target, 0)
    assert refused == 0 and offset == path.stat().st_size
    assert [e["event"] for e in events][:3] == ["supervisor_start", "launch", "promote"]
    assert all(e["id"] and "sig" not in e for e in events) and len({e["id"] for e in events}) == len(events)

    lines = path.read_bytes().splitlines()
    real = json.loads(lines[-1])
    altered = {**real, "version": "666"}
    other_key = protocol.sign_event(b"k" * 32, {"id": "x1", "ts": real["ts"], "event": "crashloop_rollback",
                                                "from_version": "1", "to_version": "666"})
    forged = {"id": "x2", "ts": real["ts"], "event": "crashloop_rollback", "from_version": "1",
              "to_version": "666", "sig": "00" * 32}
    unsigned = {k: v for k, v in forged.items() if k != "sig"}
    with open(path, "ab") as f:
        for e in (forged, altered, other_key, unsigned):
            f.write(json.dumps(e).encode() + b"\n")
        f.write(b"not json\n")
    more, end, refused = deployer.read_events(target, offset)
    assert (more, refused, end) == ([], 5, path.stat().st_size)
    assert protocol.verify_event(protocol.read_secret(deployer.slot_dir(target)), lines[-1]) == {
        k: v for k, v in real.items() if k != "sig"}
    # an offset past the end (the file was replaced) reads from the start again
    again, _, refused = deployer.read_events(target, path.stat().st_size + 100)
    assert [e["id"] for e in again] == [e["id"] for e in events] and refused == 5


# -- fencing ----------------------------------------------------------------------------------------------


def test_a_promote_with_a_stale_fencing_token_is_refused_and_the_old_version_keeps_serving(world):
    deployer = world["deployer"]
    target = Target("sp_fence", "prod")
    st = deployer.deploy(target, endpoint_release(world, "1"), fencing_token=5)
    assert st.serving_version == "1"
    with pytest.raises(DeployError, match="fencing token 3 is lower than the highest token seen 5"):
        deployer.deploy(target, endpoint_release(world, "2", "b"), fencing_token=3)
    assert probe(st.address, credential=deployer.probe_credential(target))["version"] == "1"
    groups = status(world, target)["groups"]
    assert status(world, target)["current"]["version"] == "1"
    assert [g["state"] for g in groups if g["version"] == "2"] == ["failed"]  # the candidate was discarded

    deployer.fence(target, 9)
    with pytest.raises(DeployError, match="fence: token 4 is lower than the highest token seen 9"):
        deployer.fence(target, 4)
    with pytest.raises(DeployError, match="fencing token 8 is lower than the highest token seen 9"):
        deployer.deploy(target, endpoint_release(world, "2", "b"), fencing_token=8)
    assert probe(st.address, credential=deployer.probe_credential(target))["version"] == "1"

    # the highest token survives the supervisor: a new one reads it from state.json
    old_pid = json.loads((deployer.slot_dir(target) / "state.json").read_text())["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for("the supervisor gone", lambda: not pid_alive(old_pid), 60)  # its worker serves on, adopted next
    with pytest.raises(DeployError, match="fencing token 8 is lower than the highest token seen 9"):
        deployer.deploy(target, endpoint_release(world, "2", "b"), fencing_token=8)
    state = json.loads((deployer.slot_dir(target) / "state.json").read_text())
    assert state["pid"] != old_pid and state["fencing_token"] == 9
    assert deployer.deploy(target, endpoint_release(world, "2", "b"), fencing_token=9).serving_version == "2"
    deployer.delete(target)


# -- refused artifacts ------------------------------------------------------------------------------------


def app_release(world, name: str, workers: int = 1) -> Release:
    return Release(name, str(world["apps"][name]), {"entrypoint": "tinyapp:app",
                                                    "calls": {"credit_scoring": "http://127.0.0.1:9"}},
                   workers=workers, digest=DIGEST)


def slot_events(world, target: Target) -> list[dict]:
    return world["deployer"].read_events(target, 0)[0]


def test_a_candidate_that_refuses_its_artifact_fails_its_deploy_and_the_previous_one_keeps_serving(world):
    deployer = world["deployer"]
    target = Target("sp_refuse", "prod", kind="app")
    st = deployer.deploy(target, app_release(world, "r1"))
    seen = probe(st.address)
    assert seen["version"] == "r1" and seen["env"] == "prod"
    assert seen["calls"] == {"ONEPATH_CREDIT_SCORING_URL": "http://127.0.0.1:9"}  # derived by the supervisor
    with pytest.raises(DeployError, match=f"does not match the digest {DIGEST}") as err:
        deployer.deploy(target, app_release(world, "r2"))
    assert "artifact refused: its bytes hash to sha256:0000" in str(err.value)
    assert probe(st.address)["version"] == "r1"
    refused = wait_for("the artifact_refused event", lambda: [
        e for e in slot_events(world, target) if e["event"] == "artifact_refused"])
    assert [(e["version"], e["worker"], e["exit_code"]) for e in refused] == [("r2", 0, EXIT_ARTIFACT_REFUSED)]
    assert "artifact refused" in refused[0]["log"]
    assert not any(e["event"] == "restart" for e in slot_events(world, target))


def test_refusing_workers_of_the_current_version_are_not_restarted_and_all_refusing_rolls_back(world):
    deployer = world["deployer"]
    target = Target("sp_refuse", "staging", kind="app")
    deployer.deploy(target, app_release(world, "r1"))
    st = deployer.deploy(target, app_release(world, "r3", workers=2), fallback=app_release(world, "r1"))
    assert st.serving_version == "r3"
    (world["apps"]["r3"] / "refuse-0").write_text("")

    def one_refused():
        cur = status(world, target)["current"]
        return cur if cur["refused"] == [True, False] else None

    cur = wait_for("worker 0 marked refused", one_refused)
    assert cur["state"] == "current" and cur["alive"] == [False, True] and cur["restarts"] == 0
    assert all(probe(st.address)["worker"] == "1" for _ in range(5))  # the other worker keeps serving
    refused = [e for e in slot_events(world, target) if e["event"] == "artifact_refused"]
    assert [(e["version"], e["worker"]) for e in refused] == [("r3", 0)] and "bytes changed" in refused[0]["log"]

    (world["apps"]["r3"] / "refuse-1").write_text("")
    wait_for("version r1 restored after every worker of r3 refused",
             lambda: (status(world, target)["current"] or {}).get("version") == "r1"
             and (probe(st.address) or {}).get("version") == "r1")
    events = slot_events(world, target)
    loop = next(e for e in events if e["event"] == "crashloop")
    assert (loop["version"], loop["action"], loop["rollback_to"]) == ("r3", "rollback", "r1")
    assert "every worker of version r3 refused its artifact" in loop["detail"]
    assert any(e["event"] == "crashloop_rollback" and e["to_version"] == "r1" for e in events)
    assert not any(e["event"] == "restart" for e in events)


def test_an_inference_log_that_cannot_be_written_degrades_the_environment_visibly(world):
    """The log folder cannot be created (a file stands where it goes): the worker still starts and
    serves, its /health says degraded, and status, the serving_healthy check and the ledger say why."""
    from platform_defs.specs import EndpointSpec
    from resources.ledger import Ledger
    from sensors.serving_health import evaluate_health

    target = Target("sp_nolog", "staging")
    blocker = world["base"] / "logs" / "sp_nolog"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the endpoint's log folder should be")
    st = world["deployer"].deploy(target, endpoint_release(world, "1"))
    assert st.serving_version == "1"
    granted(world["deployer"], target)
    assert predict(st.address)["version"] == "1"
    st = world["deployer"].status(target)
    assert st.health == "degraded" and st.problems and st.problems[0].startswith("inference log:")
    spec = EndpointSpec(name="sp_nolog", owner="credit-risk", track="ml-standard", model="m", environments=["staging"])
    book = Ledger(world["base"] / "ledger.db", world["base"] / "keys" / "platform.key")
    (ev,) = evaluate_health([(spec, "staging", target)], [st], book, {})
    assert not ev.passed and ev.description.startswith("degraded: inference log:")
    (entry,) = book.entries(kind="serving_unhealthy")
    assert entry.subject == "sp_nolog" and entry.data["health"] == "degraded"
    world["deployer"].delete(target)
