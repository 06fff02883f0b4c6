"""The per-environment process supervisor of the local deployer (standard library only).

One supervisor owns one *slot*: an endpoint or app release in one environment. It binds the slot's
stable address once and keeps it for its whole life, so the address never changes when the version
does. It starts the version's worker processes with that listening socket inherited (plus a private
health socket each: a Unix socket in the slot's private directory, never a TCP port). A worker
serves only its private socket until it is activated (``POST protocol.ACTIVATE_ROUTE`` there), so a
candidate takes no client connection before its promote. Promote activates every worker of the
healthy group, and only once each acknowledged does it make the group "current" and drain the old
one with SIGTERM. A current worker that dies is restarted (with backoff) and activated again once it
answers ``/health``. A candidate not promoted within its launch's ``promote_within`` seconds (its
deployer was killed mid-deploy) is discarded here (``candidate_expired``). Whenever no worker of
the current group is ready (nothing deployed, all restarting, stopped after a crash loop), the
``Refuser`` answers every connection on the stable socket at once with 503 and a JSON body saying
why (``Retry-After`` while a restart or rollback is under way), and accepts nothing once a worker is
ready. It tells the truth about all of it on its control socket. It runs in its own session, so it
and its children outlive the Dagster run that started it; ``onepath down`` stops it.

A current version that crash-loops (more than RESTART_LIMIT restarts within RESTART_WINDOW) is
replaced at once by its *fallback*: the launch spec its promote named (the promotion flow's governed
way back; the supervisor never picks one itself, so a version that failed its bake is never what it
restores). It keeps that spec (also in ``state.json``, so a restarted supervisor still knows),
launches it, waits until each of its workers answers ``/health`` on its private socket, promotes it
and records ``crashloop`` then ``crashloop_rollback`` in ``events.jsonl``. With no fallback, the
crash-looping one is stopped and nothing serves (the ``crashloop`` event says so). Every event
carries a unique ``id`` so whoever relays them (the ``supervisor_events`` sensor) can tell a line it
has already relayed.

What it runs is its own decision, not the caller's: a launch spec names only which release to run
(kind, version, artifact directory inside one of the ``--artifact-root`` directories, digest, worker
count and the kind's few settings; ``resources.serving.protocol.validate_launch_spec``), and the
supervisor builds the command line, environment, working directory and model-server config itself.
A worker that exits with ``EXIT_ARTIFACT_REFUSED`` (its bytes do not match the digest) is not
restarted: the supervisor records ``artifact_refused`` and marks it refused; a current group whose
every worker refused is treated like a crash loop.

Adoption: a supervisor's death is not an outage. Its workers do not exit with it: each one offers
the stable listening socket on its own handoff socket ``<slot>/private/w-<group>-<i>.fd.sock``
(``resources.serving.protocol.offer_listening_socket``: only to a peer of our uid showing the slot's
secret). A supervisor started for a slot (``LocalProcessDeployer.revive``: by the ``endpoint_status``
sensor, ``onepath status`` or any deploy) first takes the slot's lock (``<slot>/private/supervisor.lock``,
an ``flock`` released with the process however it dies: one supervisor per slot, exit 6 otherwise),
then reads ``state.json``: for each recorded worker of the current group it pins the pid with a pidfd
and checks that this very process holds the recorded stable socket (inode, from /proc) and answers
/health (an endpoint's /version with the recorded version, digest and pid). It asks one of them for
the socket, checks it is the recorded one (inode, port, listening) and adopts the group: ``Adopted``
process handles (pidfd: ``poll``/``send_signal``; an adopted worker's exit status is unknown,
``EXIT_UNKNOWN``, and its exit counts as a crash), the fencing token and ``previous_spec`` kept, a
worker that died meanwhile started again. Anything else still holding the socket (a dead supervisor's
candidate, never promoted by anyone alive) is told to drain (SIGTERM; SIGKILL if it still holds the
socket 5 s later). With no live worker it binds the port afresh
and relaunches the recorded current spec (validated again, digest-checked by the worker); until that
version answers, the address refuses. It records ``supervisor_restarted`` (previous pid, adopted pids,
workers respawned, pids stopped, ``relaunched``, ``unsupervised_seconds``: since the last supervisor's
``heartbeat``, touched every second) and, after a relaunch, ``serving_restored`` or ``relaunch_failed``;
``sensors.supervisor_events`` makes them ``supervisor_restarted`` and ``outage`` ledger entries.

Credentials (``resources.serving.access``): every route of a model worker but /health needs one. The
supervisor derives its own (``supervisor``: routes version, metrics, worker; accepted only on a
worker's private Unix socket) from the slot's secret and keeps it in memory; it sends it on every
call to a worker but /health and the activation, and asks an endpoint worker's pid, version and
digest on ``protocol.WORKER_ROUTE`` (adoption, ``/probe``). Each endpoint worker's config (0600, in
the private directory) names the access table ``<slot>/private/access.json`` and holds the hashes of
the backend's two credentials and the launch spec's ``pass_through`` columns; an app worker is told
``ONEPATH_CREDENTIALS_DIR=<slot>/private/credentials``. Neither state.json nor events hold a secret.

Control API: JSON over HTTP on the Unix socket ``<slot>/private/control.sock``; every request needs
the peer's uid to be ours and the slot's secret (see ``resources.serving.protocol``). ``GET /status``,
``GET /ping``, ``POST /launch``, ``POST /probe {group}`` (each worker's /version document),
``POST /metrics`` (each current worker's /metrics text), ``POST /promote {group, fencing_token?, fallback?}``,
``POST /fence {token}``, ``POST /discard {group}``, ``POST /stop``. A promote or fence whose token is
lower than the highest token seen is refused (409) and changes nothing; the highest persists in
``state.json``. Every line of ``events.jsonl`` is signed with the slot's secret.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from resources.files import atomic_write
from resources.serving import access, protocol
from resources.serving.protocol import EXIT_ARTIFACT_REFUSED, ControlError, SpecError

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# restarts of one group within RESTART_WINDOW seconds before it counts as crash-looping
RESTART_LIMIT = int(os.environ.get("ONEPATH_RESTART_LIMIT", "5"))
RESTART_WINDOW = float(os.environ.get("ONEPATH_RESTART_WINDOW", "60"))
# how long the version restored after a crash loop may take until every worker answers /health
RESTORE_SECONDS = float(os.environ.get("ONEPATH_RESTORE_SECONDS", "120"))
DRAIN_SECONDS = float(os.environ.get("ONEPATH_DRAIN_SECONDS", "30"))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode())


def last_line(path: Path) -> str:
    lines = [line for line in log_tail(path, 4000).splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def log_tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


# what ``returncode`` reads for an adopted worker that exited: its exit status went to the process
# that reaped it, not to us (outside 0..255 and the negative signal numbers, so never a real one)
EXIT_UNKNOWN = -256
GROUP_ID_RE = re.compile(r"[0-9a-f]{10}")


class Adopted:
    """A worker this supervisor did not start (adopted from one that died): the few calls ``Group``
    makes of a ``subprocess.Popen`` (``pid``, ``poll``, ``returncode``, ``send_signal``), over a pidfd,
    so a signal can never reach a process that merely reused the pid. Its exit code is unknown
    (``EXIT_UNKNOWN``): an exit counts as a crash and is restarted as one."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self._pidfd: int | None = pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0]:  # readable: it exited
            os.close(self._pidfd)
            self._pidfd = None
            self.returncode = EXIT_UNKNOWN
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            assert self._pidfd is not None
            signal.pidfd_send_signal(self._pidfd, sig)

    def wait(self, timeout: float) -> int | None:
        """``poll()`` after waiting at most ``timeout`` s for the process to exit."""
        if self._pidfd is not None:
            select.select([self._pidfd], [], [], max(0.0, timeout))
        return self.poll()

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def holds_socket(pid: int, inode: int) -> bool:
    """Whether process ``pid`` has the socket ``inode`` among its open fds (read from /proc)."""
    target = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def socket_holders(inode: int) -> list[int]:
    """Every process (that we may inspect) holding the socket ``inode``, except this one."""
    me = os.getpid()
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != me and holds_socket(int(d), inode)]


class Group:
    """The worker processes of one version. ``command`` is what the supervisor built for the spec:
    (argv, environment additions)."""

    def __init__(self, spec: dict[str, Any], slot_dir: Path, command: tuple[list[str], dict[str, str]],
                 group_id: str, promote_within: float | None = None):
        self.id = group_id
        self.spec = spec
        # a candidate not promoted by then is discarded by the supervisor itself (monotonic clock)
        self.promote_by = time.monotonic() + promote_within if promote_within else None
        self.version = str(spec["version"])
        self.workers = int(spec["workers"])
        self.state = "starting"  # starting | current | draining | failed | stopped | crashloop
        self.procs: list[subprocess.Popen | Adopted | None] = [None] * self.workers
        self.argv, self.env = command
        self.slot_dir = slot_dir
        self.sockets = [protocol.worker_socket(slot_dir, self.id, i) for i in range(self.workers)]
        self.handoffs = [protocol.worker_socket(slot_dir, self.id, i, handoff=True) for i in range(self.workers)]
        self.refused: list[bool] = [False] * self.workers
        self.restarts: list[float] = []
        self.started_at = now_iso()
        self.log_path = slot_dir / "logs" / f"{self.version}-{self.id}.log"
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.exit_codes: list[int | None] = [None] * self.workers
        self.drain_deadline = 0.0
        # a worker is ready once it answered /health since its spawn and accepts on the stable socket
        # (activated); while no worker of the current group is, the supervisor answers 503 itself
        self.ready: list[bool] = [False] * self.workers

    def spawn(self, i: int, stable: socket.socket) -> None:
        private = _listening_unix(self.sockets[i])
        handoff = _listening_unix(self.handoffs[i])
        try:
            env = dict(os.environ)
            env.update(self.env)
            env["ONEPATH_LISTEN_FDS"] = f"{stable.fileno()},{private.fileno()}"
            env["ONEPATH_HANDOFF_FD"] = str(handoff.fileno())  # see "Adoption" above
            env["ONEPATH_SLOT_DIR"] = str(self.slot_dir)
            env["ONEPATH_WORKER_INDEX"] = str(i)
            with open(self.log_path, "ab") as log:
                proc = subprocess.Popen(
                    self.argv, cwd=str(PROJECT_ROOT), env=env,
                    pass_fds=(stable.fileno(), private.fileno(), handoff.fileno()), stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
        finally:
            private.close()  # only the child holds them now
            handoff.close()
        self.procs[i] = proc
        self.exit_codes[i] = None
        self.ready[i] = False

    def remove_sockets(self) -> None:
        for path in self.sockets + self.handoffs:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def alive(self) -> bool:
        return any(p is not None and p.poll() is None for p in self.procs)

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id, "version": self.version, "state": self.state, "workers": self.workers,
            "pids": [p.pid if p else None for p in self.procs],
            "alive": [p is not None and p.poll() is None for p in self.procs],
            "exit_codes": [p.poll() if p else None for p in self.procs],
            "refused": list(self.refused), "started_at": self.started_at,
            "restarts": len(self.restarts), "kind": self.spec["kind"], "digest": self.spec.get("digest"),
            "artifact": self.spec["artifact"], "log": str(self.log_path), "ready": list(self.ready),
        }


def _listening_unix(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        protocol.bind_unix(sock, path)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def read_state(slot_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((slot_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Conflict(Exception):
    """A command refused because it is stale (a lower fencing token): 409."""


class Supervisor:
    def __init__(self, slot_dir: Path, host: str, port: int, *, secret: bytes,
                 artifact_roots: list[str], inference_log_dir: str | None, inference_log_url: str | None = None):
        self.slot_dir = slot_dir
        self.host, self.port = host, port
        self.secret = secret
        self.artifact_roots = [os.path.realpath(r) for r in artifact_roots]
        self.inference_log_dir = inference_log_dir
        self.inference_log_url = inference_log_url.rstrip("/") if inference_log_url else None  # s3://bucket/prefix
        self.name, _, self.env_name = slot_dir.name.rpartition(".")
        # the supervisor's own credential for its endpoint workers (derived from the slot secret, held
        # only in memory; the workers get its hash): sent on every HTTP call to a worker but /health
        try:
            self.worker_headers = access.bearer(access.backend_token(secret, self.name, self.env_name, "supervisor"))
        except ValueError:  # a name no credential can carry: an endpoint launch here is refused (_command)
            self.worker_headers = {}
        self.lock = threading.RLock()
        self.groups: dict[str, Group] = {}
        self.current: Group | None = None
        self.stopping = threading.Event()
        self.events_path = slot_dir / "events.jsonl"
        for older in (self.events_path, slot_dir / "supervisor.log"):  # a slot from before the umask
            if older.exists():
                os.chmod(older, 0o600)
        self.on_change: Any = lambda: None  # persists state.json; set by main()
        # The fallback the current version's promote named: what a crash loop of it may roll back to.
        # A supervisor started again for this slot reads it from the last state.json.
        before = read_state(slot_dir)
        token = before.get("fencing_token")
        self.fencing_token: int | None = token if isinstance(token, int) and not isinstance(token, bool) else None
        self.previous_spec: dict[str, Any] | None = None
        prev = before.get("previous_spec")
        if prev is not None:  # state.json is only a file: a fallback it names is checked like any launch
            try:
                self.previous_spec = protocol.validate_launch_spec(prev, self.artifact_roots)
            except SpecError as err:
                print(f"onepath supervisor: the recorded fallback is refused: {' '.join(str(err).split())}",
                      file=sys.stderr)
        self.heartbeat = protocol.private_dir(slot_dir) / "heartbeat"
        try:  # when the supervisor before this one was last seen alive (it touches the file every second)
            last_seen: float | None = os.stat(self.heartbeat).st_mtime
        except OSError:
            last_seen = None
        self.takeover: dict[str, Any] = {
            "previous_pid": before.get("pid"), "previous_stopped": bool(before.get("stopped")),
            "unsupervised_seconds": round(max(0.0, time.time() - last_seen), 1) if last_seen and before else None,
            "adopted_pids": [], "respawned": [], "stopped_pids": [], "handoff_errors": [], "relaunch": None,
        }
        self.stable = self._take_over(before)
        self.stable.set_inheritable(True)
        self.port = self.stable.getsockname()[1]
        # why nothing serves, once the current version was stopped (crash loop): (cause, detail, retry)
        self.outage: tuple[str, str, int | None] | None = None
        recorded = before.get("outage")
        if self.current is None and self.takeover["relaunch"] is not None:
            v = self.takeover["relaunch"].get("version")
            self.outage = ("relaunching", f"every worker of version {v} of {self.name} {self.env_name} died with its "
                                          "supervisor; it is being started again", 2)
        elif (self.current is None and isinstance(recorded, list) and len(recorded) == 3
              and all(isinstance(x, str) for x in recorded[:2])):
            self.outage = (recorded[0], recorded[1], None)  # still stopped: no restart under way
        self.refuser = Refuser(self.stable)
        self._update_refusal()  # nothing is deployed yet, or what was adopted is ready
        if self.current is not None:  # workers started again, or not yet activated, take traffic once healthy
            for i, ready in enumerate(self.current.ready):
                if not ready:
                    threading.Thread(target=self._activate_when_healthy, args=(self.current, i, self.current.procs[i]),
                                     name=f"activate-{self.current.id}-{i}", daemon=True).start()

    # -- adoption ---------------------------------------------------------------------------
    def _take_over(self, before: dict[str, Any]) -> socket.socket:
        """The slot's stable listening socket: the one the live workers of the last current group
        hold, handed over by one of them (that group is adopted), else a fresh bind (OSError if the
        port is taken); a current spec with no live worker is left in ``takeover["relaunch"]``."""
        cur = before.get("current")
        cur = cur if isinstance(cur, dict) else {}
        inode = before.get("stable_inode")
        spec: Any = before.get("current_spec")
        if (cur.get("state") != "current" or not isinstance(spec, dict) or before.get("stopped")
                or not isinstance(cur.get("id"), str) or not GROUP_ID_RE.fullmatch(cur["id"])):
            return self._bind(inode)
        try:
            spec = protocol.validate_launch_spec(spec, self.artifact_roots)  # state.json is only a file
        except SpecError as err:
            self.takeover["handoff_errors"].append(f"the recorded current spec is refused: {err}")
            return self._bind(inode)
        stable = None
        if isinstance(inode, int) and not isinstance(inode, bool):
            try:
                command = self._command(spec, cur["id"])
            except SpecError as err:
                self.takeover["handoff_errors"].append(str(err))
                return self._bind(inode)
            g = Group(spec, self.slot_dir, command, cur["id"])
            pids = cur.get("pids") if isinstance(cur.get("pids"), list) else []
            for i in range(g.workers):
                g.procs[i] = _verify_worker(pids[i] if i < len(pids) else None, inode, g.sockets[i], spec,
                                            self.worker_headers)
            for i, p in enumerate(g.procs):
                if p is None:
                    continue
                try:
                    got = protocol.fetch_listening_socket(g.handoffs[i], self.secret)
                except ControlError as err:
                    self.takeover["handoff_errors"].append(str(err))
                    continue
                if _is_listener(got, inode, self.port):
                    stable = got
                    break
                got.close()
                self.takeover["handoff_errors"].append(f"worker {p.pid} handed over a socket that is not the slot's")
            if stable is None:
                for p in g.procs:
                    if isinstance(p, Adopted):
                        p.close()
            else:
                g.state = "current"
                if isinstance(cur.get("started_at"), str):
                    g.started_at = cur["started_at"]
                self.groups[g.id] = g
                self.current = g
                self.takeover["adopted_pids"] = [p.pid for p in g.procs if p is not None]
                # anything else holding the slot's socket is a dead supervisor's candidate or stray worker:
                # never promoted by anyone alive, it must not serve; it drains (a draining one closed its copy)
                self.takeover["stopped_pids"] = stop_socket_holders(inode, keep=set(self.takeover["adopted_pids"]))
                for i, p in enumerate(g.procs):
                    if p is None:  # this worker died meanwhile: started again, counted as a restart
                        g.restarts.append(time.time())
                        g.spawn(i, stable)
                        self.takeover["respawned"].append(i)
                    else:  # a worker of the current group accepts on the stable socket (activation is idempotent)
                        g.ready[i] = _activate(g.sockets[i])
                return stable
        self.takeover["relaunch"] = spec
        return self._bind(inode)

    def _bind(self, old_inode: Any) -> socket.socket:
        """A fresh stable socket; first stopping whatever still holds the old one without being
        adoptable (it would keep the port taken, and nobody supervises it)."""
        if isinstance(old_inode, int) and not isinstance(old_inode, bool):
            self.takeover["stopped_pids"] = stop_socket_holders(old_inode, keep=set())
        stable = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            stable.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            stable.bind((self.host, self.port))
            stable.listen(4096)
        except OSError:
            stable.close()
            raise
        return stable

    def relaunch(self, spec: dict[str, Any]) -> None:
        """Serve ``spec`` (the version that was current when the last supervisor died with all its
        workers) again: launch, wait until every worker answers /health, promote. In a thread."""
        t0 = time.monotonic()
        version = str(spec["version"])
        try:
            new = self.groups[self.launch(spec)["id"]]
        except (OSError, ValueError, KeyError) as err:
            self.event("relaunch_failed", group=None, version=version, reason=f"cannot launch version {version}: {err}")
            with self.lock:
                if self.current is None:
                    self.outage = ("relaunch_failed", f"version {version} of {self.name} {self.env_name} could not "
                                                      f"be started again ({err}); nothing serves here", None)
                    self._update_refusal()
            return
        why = self._await_group_healthy(new, t0 + RESTORE_SECONDS)
        with self.lock:
            if why is None and self.current is not None:
                why = f"version {self.current.version} was promoted meanwhile"
            if why is None:
                try:  # the same version again: its fallback stays what its promotion named, if still valid
                    try:
                        self.promote(new.id, fallback=self.previous_spec)
                    except SpecError as err:  # a way back that can no longer launch must not cost the version
                        self.event("fallback_refused", group=new.id, version=version,
                                   reason=" ".join(str(err).split()))
                        self.promote(new.id, fallback=None)
                except ValueError as err:
                    why = " ".join(str(err).split())
            if why is not None:
                new.state = "failed"
                new.signal_all(signal.SIGKILL)
                self.event("relaunch_failed", group=new.id, version=version, reason=why)
                if self.current is None:
                    self.outage = ("relaunch_failed", f"version {version} of {self.name} {self.env_name} could not "
                                                      f"be started again ({why}); nothing serves here", None)
                    self._update_refusal()
                return
            self.event("serving_restored", group=new.id, version=version, seconds=round(time.monotonic() - t0, 3))
        self.on_change()

    # -- records --------------------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> None:
        signed = protocol.sign_event(self.secret, {"id": uuid.uuid4().hex[:16], "ts": now_iso(), "event": kind,
                                                   **fields})
        line = json.dumps(signed, sort_keys=True)
        with self.lock, open(self.events_path, "ab") as f:  # one write per line: readers see whole lines
            f.write((line + "\n").encode())

    def persist(self) -> None:
        with self.lock:
            cur = self.current
            write_json_atomic(self.slot_dir / "state.json", {
                "pid": os.getpid(), "host": self.host, "port": self.port, "fencing_token": self.fencing_token,
                "stable_inode": os.fstat(self.stable.fileno()).st_ino,
                "current": cur.view() if cur else None,
                "current_spec": cur.spec if cur else None,
                "previous_spec": self.previous_spec,
                "previous_version": str(self.previous_spec["version"]) if self.previous_spec else None,
                "updated_at": now_iso(), "stopped": self.stopping.is_set(),
                # why nothing serves (a crash-loop stop): a supervisor started again still says so
                "outage": list(self.outage) if self.outage else None,
            })

    # -- commands -------------------------------------------------------------------------
    def launch(self, spec: Any) -> dict[str, Any]:
        """Start the workers of the release ``spec`` names (checked by ``validate_launch_spec``; raises
        SpecError). The command, environment, working directory and config are built here."""
        spec = protocol.validate_launch_spec(spec, self.artifact_roots)
        within = spec.pop("promote_within", None)  # about this launch, not the release: never restored
        with self.lock:
            gid = uuid.uuid4().hex[:10]
            g = Group(spec, self.slot_dir, self._command(spec, gid), gid, within)
            self.groups[g.id] = g
            for i in range(g.workers):
                g.spawn(i, self.stable)
            self.event("launch", group=g.id, version=g.version, digest=spec.get("digest"),
                       pids=[p.pid for p in g.procs if p], promote_within=within)
            return g.view()

    def _command(self, spec: dict[str, Any], gid: str) -> tuple[list[str], dict[str, str]]:
        """argv and the environment additions for a worker of ``spec`` (already validated)."""
        env = {"ONEPATH_RELEASE_VERSION": spec["version"], "ONEPATH_ENV": self.env_name}
        private = protocol.private_dir(self.slot_dir)
        if spec["kind"] == "endpoint":
            if not self.worker_headers:
                raise SpecError(f"launch: endpoint {self.name!r} env {self.env_name!r}: an endpoint's name and "
                                "environment must match ^[a-z][a-z0-9_]{1,62}$ (its credentials carry them)")
            env.update(protocol.model_thread_env(spec["model_threads"]))
            # the one place a worker's log store is chosen: Parquet segments on S3 when the platform has
            # ONEPATH_INFERENCE_LOG_URL (resources.serving.segment_log), else JSON lines in the folder
            log_url = (f"{self.inference_log_url}/inference/{self.name}/{self.env_name}"
                       if spec["inference_log"] and self.inference_log_url else None)
            log_dir = (os.path.join(self.inference_log_dir, self.name, self.env_name)
                       if spec["inference_log"] and self.inference_log_dir and not log_url else None)
            config = {
                "endpoint": self.name, "env": self.env_name, "version": spec["version"],
                "model_dir": spec["artifact"], "model_name": spec["model_name"],
                "pii_columns": spec["pii_columns"], "max_batch": spec["max_batch"], "log_dir": log_dir,
                "log_url": log_url,
                "expected_digest": spec["digest"],
                # who may call (written by the platform through the deployer's publish_grants), and the
                # backend's own credentials as hashes: this file never holds a token
                "access_file": str(private / access.TABLE_FILE),
                "backend_credentials": access.backend_credentials(self.secret, self.name, self.env_name),
                "pass_through_columns": spec.get("pass_through", []),
            }
            configs = protocol.private_dir(self.slot_dir) / "configs"
            protocol.ensure_owner_only_dir(configs)
            path = configs / f"{spec['version']}-{gid}.json"
            write_json_atomic(path, config)
            return [sys.executable, "-m", "resources.serving.model_server", str(path)], env
        for name, url in spec["calls"].items():
            env[f"ONEPATH_{name}_URL"] = url
        # where the platform publishes this app's credentials (publish_credentials; owner-only files):
        # the path is in the environment, never a token (resources.serving.access.credential_header)
        env[access.CREDENTIALS_ENV] = str(private / access.CREDENTIALS_DIR)
        return [sys.executable, "-m", "resources.serving.child", "--app-dir", spec["artifact"],
                "--app", spec["entrypoint"]], env

    def fence(self, token: Any) -> dict[str, Any]:
        """Raise the lowest fencing token a promote may carry to ``token``."""
        token = _token(token)
        with self.lock:
            if self.fencing_token is not None and token < self.fencing_token:
                raise Conflict(f"fence: token {token} is lower than the highest token seen {self.fencing_token}")
            self.fencing_token = token
            self.persist()
            return {"fencing_token": token}

    def probe(self, group_id: Any) -> dict[str, Any]:
        """Each worker's facts (None where /health is not 200 or nothing answers): an endpoint worker's
        ``protocol.WORKER_ROUTE`` document (pid, version, digest, ...), asked with the supervisor's
        credential; an app worker's /version (never sent a credential: it is another team's code)."""
        with self.lock:
            g = self.groups.get(group_id) if isinstance(group_id, str) else None
            if g is None:
                raise ValueError(f"probe: no group {group_id!r}")
            paths = list(g.sockets)
            endpoint = g.spec["kind"] == "endpoint"
        headers = self.worker_headers
        if endpoint:
            return {"group": g.id, "workers": _in_threads(
                lambda p: _worker_doc(p, protocol.WORKER_ROUTE, headers), paths)}
        return {"group": g.id, "workers": _in_threads(_worker_doc, paths)}

    def metrics(self) -> dict[str, Any]:
        """The /metrics text of each worker of the current group ('' where none answers), or no
        workers when nothing is current."""
        with self.lock:
            cur = self.current
            paths = list(cur.sockets) if cur is not None and cur.state == "current" else []
            headers = self.worker_headers if cur is not None and cur.spec["kind"] == "endpoint" else {}
        return {"workers": _in_threads(lambda p: _worker_metrics(p, headers), paths)}

    def promote(self, group_id: str, *, restoring: bool = False, fencing_token: Any = None,
                fallback: Any = None) -> dict[str, Any]:
        """Make a healthy candidate current and drain the version it replaces.

        ``fallback`` (a launch spec, checked like any other) becomes ``previous_spec``: the only version
        a crash loop of the new one may roll back to. The supervisor never picks one itself (the version
        it replaced may be the one that just failed its bake): the promotion flow names the governed way
        back, and with none a crash loop stops the version. ``restoring`` (the crash-loop rollback)
        forgets it: the version restored has no known way back. A ``fencing_token`` lower than the
        highest seen refuses the promote (Conflict) before anything changes; a higher one becomes the
        highest."""
        token = None if fencing_token is None else _token(fencing_token)
        if fallback is not None:
            fallback = protocol.validate_launch_spec(fallback, self.artifact_roots)
        with self.lock:
            if token is not None and self.fencing_token is not None and token < self.fencing_token:
                raise Conflict(f"promote: fencing token {token} is lower than the highest token seen "
                               f"{self.fencing_token}; nothing changed")
            g = self.groups.get(group_id)
            if g is None or g.state != "starting" or not all(p and p.poll() is None for p in g.procs):
                raise ValueError(f"group {group_id} is not a live candidate")
            # until now the candidate served only its private sockets; from here on it takes
            # connections, and the old version is drained only once every new worker said so
            acks = _in_threads(_activate, list(g.sockets))
            if not all(acks):
                g.state = "draining"  # a worker that did activate finishes what it took, then goes
                g.drain_deadline = time.time() + DRAIN_SECONDS
                g.signal_all(signal.SIGTERM)
                missing = [i for i, ok in enumerate(acks) if not ok]
                self.event("promote_failed", group=g.id, version=g.version, workers=missing,
                           reason="not every worker acknowledged its activation")
                raise ValueError(f"group {group_id}: worker(s) {missing} did not acknowledge their activation; "
                                 f"the version that served keeps serving")
            g.ready = [True] * g.workers
            if token is not None:
                self.fencing_token = token
            old = self.current
            g.state = "current"
            self.current = g
            self.outage = None
            self._update_refusal()  # the new workers answer from now on, not after the old ones drained
            if old is not None and old is not g:
                if old.state == "current":
                    old.state = "draining"
                    old.drain_deadline = time.time() + DRAIN_SECONDS
                    old.signal_all(signal.SIGTERM)
                    self._await_released(old)
                else:
                    old.signal_all(signal.SIGKILL)
            self.previous_spec = None if restoring or fallback is None or fallback["version"] == g.version \
                else fallback
            self.event("promote", group=g.id, version=g.version, previous=old.version if old else None)
            self._update_refusal()
            return g.view()

    def _await_released(self, old: Group, limit: float = 10.0) -> None:
        """Return once no worker of ``old`` holds the stable socket any more (it closed its listener on
        SIGTERM and only finishes the requests it already has), so from then on every new connection
        reaches the new version. Read from /proc: the socket's inode among each process's fds."""
        inode = os.fstat(self.stable.fileno()).st_ino
        deadline = time.time() + limit
        while time.time() < deadline:
            if not any(p is not None and p.poll() is None and holds_socket(p.pid, inode) for p in old.procs):
                return
            time.sleep(0.01)

    def discard(self, group_id: str) -> dict[str, Any]:
        with self.lock:
            g = self.groups.get(group_id)
            if g is None:
                return {"discarded": False}
            if g is self.current:
                raise ValueError("the current group cannot be discarded; promote another first")
            self._check_starting(g)  # the deployer may have seen a worker exit before the watch loop did
            if g.state == "draining":  # activated by a promote that failed: it finishes what it took
                return {"discarded": True}
            g.state = "failed" if g.state == "starting" else g.state
            g.signal_all(signal.SIGKILL)
            self.event("discard", group=g.id, version=g.version)
            return {"discarded": True}

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "pid": os.getpid(), "host": self.host, "port": self.port,
                "artifact_roots": self.artifact_roots, "fencing_token": self.fencing_token,
                "current": self.current.view() if self.current else None,
                "groups": [g.view() for g in self.groups.values()],
                "refusing": self.refuser.refusing(),
            }

    def stop(self) -> None:
        with self.lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
            for g in self.groups.values():
                g.signal_all(signal.SIGTERM)
            self.event("stop")
        deadline = time.time() + DRAIN_SECONDS
        while time.time() < deadline and any(g.alive() for g in self.groups.values()):
            time.sleep(0.05)
        for g in self.groups.values():
            g.signal_all(signal.SIGKILL)

    # -- the watch loop -------------------------------------------------------------------
    def tick(self) -> None:
        with self.lock:
            for gid, g in list(self.groups.items()):
                if g.state == "draining":
                    if not g.alive():
                        g.state = "stopped"
                        self.event("drained", group=g.id, version=g.version)
                    elif time.time() > g.drain_deadline:
                        g.signal_all(signal.SIGKILL)
                elif g.state == "starting":
                    self._check_starting(g)
                    if g.state == "starting" and g.promote_by is not None and time.monotonic() > g.promote_by:
                        self._expire(g)
                elif g.state == "current" and not self.stopping.is_set():
                    for i, p in enumerate(g.procs):
                        if p is None or p.poll() is None:
                            continue
                        g.ready[i] = False
                        if g.refused[i]:
                            continue
                        if p.returncode == EXIT_ARTIFACT_REFUSED:
                            self._refused(g, i)  # not a crash: starting it again would refuse again
                        else:
                            self._restart(g, i, p.returncode)
                        if g.state != "current":
                            break
                    if g.state == "current" and all(g.refused):
                        self._crashloop(g, EXIT_ARTIFACT_REFUSED,
                                        why=f"every worker of version {g.version} refused its artifact "
                                            f"(digest {g.spec.get('digest')}): {last_line(g.log_path)}")
                if g.state in ("stopped", "failed", "crashloop") and g is not self.current and not g.alive():
                    g.remove_sockets()
                    # keep the record small: finished groups are in events.jsonl
                    if time.time() - _parse_ts(g.started_at) > 300:
                        del self.groups[gid]
            self._update_refusal()

    def _expire(self, g: Group) -> None:
        """A candidate nobody promoted within its launch's ``promote_within``: whoever deployed it is
        gone (killed mid-deploy), so it is discarded here. It never took a connection."""
        g.state = "failed"
        g.signal_all(signal.SIGKILL)
        self.event("candidate_expired", group=g.id, version=g.version,
                   detail=f"version {g.version} was not promoted within the deadline of its launch; discarded "
                          "(the deploy that launched it did not finish)")

    def _outage(self) -> tuple[str, str, int | None] | None:
        """(cause, detail, Retry-After seconds or None) while no worker of the current version is ready
        to answer at the stable address, else None."""
        if self.stopping.is_set():
            return None
        cur = self.current
        if cur is not None and cur.state == "current":
            if any(cur.ready):
                return None
            return ("restarting", f"every worker of version {cur.version} of {self.name} {self.env_name} exited "
                                  "and is being restarted", 1)
        if self.outage is not None:
            return self.outage
        if cur is None:
            return ("not_deployed", f"nothing is deployed at {self.name} {self.env_name} yet; nothing serves here",
                    None)
        return ("stopped", f"version {cur.version} of {self.name} {self.env_name} is {cur.state}; "
                           "nothing serves here", None)

    def _update_refusal(self) -> None:
        """Point the refusal responder at the current outage (or stop it). Called with the lock held."""
        out = self._outage()
        if out is None:
            self.refuser.clear()
        else:
            cause, detail, retry = out
            self.refuser.refuse({"error": detail, "cause": cause, "endpoint": self.name,
                                 "environment": self.env_name,
                                 "version": self.current.version if self.current else None}, retry)

    def _await_group_healthy(self, new: Group, deadline: float) -> str | None:
        """Wait until each worker of ``new`` answers /health on its private socket; None then, else
        why not (a worker exited, the supervisor stops, or ``deadline`` passed)."""
        while True:
            if self.stopping.is_set():
                return "the supervisor is stopping"
            with self.lock:
                dead = new.state != "starting" or any(p is None or p.poll() is not None for p in new.procs)
                paths = list(new.sockets)
            if dead:
                return (f"version {new.version} exited while starting; log: "
                        f"{' '.join(log_tail(new.log_path, 600).split())}")
            headers = self.worker_headers if new.spec["kind"] == "endpoint" else None
            if all(_answers_health(path, new.version, headers) for path in paths):
                return None
            if time.monotonic() > deadline:
                return f"version {new.version} did not answer /health within {RESTORE_SECONDS:g} s"
            time.sleep(0.05)

    def _check_starting(self, g: Group) -> None:
        """A candidate with a worker that exited has failed; one that refused its artifact says so."""
        if g.state != "starting" or not any(p is not None and p.poll() is not None for p in g.procs):
            return
        for i, p in enumerate(g.procs):
            if p is not None and p.returncode == EXIT_ARTIFACT_REFUSED:
                self._refused(g, i)
        g.state = "failed"
        g.signal_all(signal.SIGKILL)
        self.event("start_failed", group=g.id, version=g.version,
                   exit_codes=[p.poll() if p else None for p in g.procs])

    def _refused(self, g: Group, i: int) -> None:
        if g.refused[i]:
            return
        g.refused[i] = True
        self.event("artifact_refused", group=g.id, version=g.version, worker=i, digest=g.spec.get("digest"),
                   exit_code=EXIT_ARTIFACT_REFUSED, log=last_line(g.log_path)[:500])

    def _restart(self, g: Group, i: int, code: int) -> None:
        t = time.time()
        g.restarts = [r for r in g.restarts if t - r < RESTART_WINDOW]
        if len(g.restarts) >= RESTART_LIMIT:
            self._crashloop(g, code)
            return
        backoff = min(0.1 * (2 ** len(g.restarts)), 5.0)
        if g.restarts and t - g.restarts[-1] < backoff:
            return  # try again on a later tick
        g.restarts.append(t)
        g.spawn(i, self.stable)
        threading.Thread(target=self._activate_when_healthy, args=(g, i, g.procs[i]), name=f"activate-{g.id}-{i}",
                         daemon=True).start()
        self.event("restart", group=g.id, version=g.version, worker=i, exit_code=code,
                   restarts=len(g.restarts))

    def _activate_when_healthy(self, g: Group, i: int, proc: subprocess.Popen | None) -> None:
        """A worker restarted inside the current group takes connections once it answers /health:
        activate it then (and stop refusing, if it is the first ready one)."""
        deadline = time.monotonic() + RESTORE_SECONDS
        while time.monotonic() < deadline and not self.stopping.is_set():
            with self.lock:
                if g.procs[i] is not proc or proc is None or proc.poll() is not None or g.state != "current":
                    return
            if _answers_health(g.sockets[i], g.version, self.worker_headers if g.spec["kind"] == "endpoint" else None):
                with self.lock:
                    if g.procs[i] is not proc or g.state != "current":
                        return
                    if _activate(g.sockets[i]):
                        g.ready[i] = True
                        self._update_refusal()
                        return
            time.sleep(0.05)


    def _crashloop(self, g: Group, code: int, why: str | None = None) -> None:
        """``g`` (the current group) crash-loops (or every worker of it refused its artifact: ``why``):
        stop it, and roll back to its fallback if its promote named one (in a thread: its workers take
        seconds to load, and /status must keep answering)."""
        g.state = "crashloop"
        g.signal_all(signal.SIGKILL)
        prev = self.previous_spec
        common = {"group": g.id, "version": g.version, "restarts": len(g.restarts), "exit_code": code,
                  "restart_limit": RESTART_LIMIT, "window_seconds": RESTART_WINDOW}
        what = f"version {g.version} of {self.name} {self.env_name}"
        n = len(g.restarts)
        looped = (f"{what} was stopped after crash-looping ({n} restart{'' if n == 1 else 's'} within "
                  f"{RESTART_WINDOW:g} s)") if why is None else f"{what} was stopped: {why}"
        why = why or f"version {g.version} restarted {len(g.restarts)} times within {RESTART_WINDOW:g} s"
        if prev is None or str(prev.get("version")) == g.version:
            self.outage = ("crashloop_stopped", f"{looped} and its promotion named no governed version to go "
                                                "back to; nothing serves here", None)
            self.event("crashloop", **common, action="stopped", rollback_to=None,
                       detail=f"{why} and its promotion named no governed version to go back to: "
                              "it is stopped and nothing serves at this address")
            return
        to = str(prev["version"])
        self.outage = ("rolling_back", f"{looped}; version {prev['version']} is being restored", 2)
        self.event("crashloop", **common, action="rollback", rollback_to=to,
                   detail=f"{why}: rolling back to version {to}")
        threading.Thread(target=self._restore, args=(g, prev), name="crashloop-rollback", daemon=True).start()

    def _restore(self, looped: Group, spec: dict[str, Any]) -> None:
        """Launch ``spec``, wait until each worker answers /health on its private port (deadline
        RESTORE_SECONDS), then promote it, unless another version became current meanwhile."""
        t0 = time.monotonic()
        to = str(spec["version"])

        def failed(why: str, group: Group | None = None) -> None:
            if group is not None:
                with self.lock:
                    group.state = "failed"
                    group.signal_all(signal.SIGKILL)
            with self.lock:
                if self.current is looped:
                    self.outage = ("crashloop_stopped",
                                   f"version {looped.version} of {self.name} {self.env_name} was stopped after "
                                   f"crash-looping and version {to} could not come back ({why}); nothing serves here",
                                   None)
                    self._update_refusal()
            self.event("crashloop_rollback_failed", group=group.id if group else None, from_version=looped.version,
                       to_version=to, reason=why)

        try:
            new = self.groups[self.launch(spec)["id"]]  # checked again: state.json is only a file
        except (OSError, ValueError, KeyError) as err:
            failed(f"cannot launch version {to}: {err}")
            return
        why = self._await_group_healthy(new, t0 + RESTORE_SECONDS)
        if why is not None:
            failed(why, new)
            return
        with self.lock:
            if self.current is not looped:
                now = self.current.version if self.current else None
                new.state = "failed"
                new.signal_all(signal.SIGKILL)
                self.event("crashloop_rollback_skipped", group=new.id, from_version=looped.version, to_version=to,
                           reason=f"version {now} was promoted meanwhile")
                return
            try:
                self.promote(new.id, restoring=True)
            except ValueError as err:
                failed(str(err), new)
                return
            self.event("crashloop_rollback", group=new.id, from_group=looped.id, from_version=looped.version,
                       to_version=to, seconds=round(time.monotonic() - t0, 3))
        self.on_change()


def _verify_worker(pid: Any, inode: int, path: str, spec: dict[str, Any],
                   headers: dict[str, str] | None = None) -> Adopted | None:
    """A handle on ``pid`` if it is a live worker of ``spec`` this slot started: pinned by a pidfd
    first (so what is checked next is that very process), it holds the slot's stable socket ``inode``,
    and its private socket ``path`` answers /health for the version (an endpoint's
    ``protocol.WORKER_ROUTE``, asked with the supervisor's credential ``headers``, also with the spec's
    digest and this pid). Otherwise None."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 1:
        return None
    try:
        p = Adopted(pid, os.pidfd_open(pid))
    except OSError:
        return None
    ok, verified = holds_socket(pid, inode), False
    for _attempt in range(3):  # a busy worker may answer late: asked three times before it is given up
        if not ok or p.poll() is not None:
            break
        if spec["kind"] == "endpoint":
            doc = _worker_doc(path, protocol.WORKER_ROUTE, headers, 2.0)
            verified = (doc is not None and str(doc.get("version")) == spec["version"]
                        and doc.get("digest") == spec["digest"] and doc.get("pid") == pid)
        else:
            verified = _answers_health(path, spec["version"])
        if verified:
            break
    ok = ok and verified
    if ok and p.poll() is None:
        return p
    p.close()
    return None


def _is_listener(sock: socket.socket, inode: Any, port: int) -> bool:
    """Whether ``sock`` is the slot's stable socket: the recorded inode, listening, on ``port``."""
    try:
        return (os.fstat(sock.fileno()).st_ino == inode and sock.getsockname()[1] == port
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    except OSError:
        return False


def stop_socket_holders(inode: int, keep: set[int], *, wait: float = 5.0, until_exit: bool = False) -> list[int]:
    """SIGTERM every process but ``keep`` that holds the socket ``inode`` (each pinned by a pidfd first,
    and checked again through it): a worker drains, closing its copy at once and answering the
    requests it has, so no client loses one. Wait at most ``wait`` s until each has let go of the
    socket (``until_exit``: has exited), then SIGKILL the ones that have not. Returns their pids."""
    handles = []
    for pid in socket_holders(inode):
        if pid in keep:
            continue
        try:
            h = Adopted(pid, os.pidfd_open(pid))
        except OSError:
            continue
        if holds_socket(pid, inode):  # still that process, and still holding it
            try:
                h.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            handles.append(h)
        else:
            h.close()
    deadline = time.monotonic() + wait

    def done(h: Adopted) -> bool:
        return h.poll() is not None or (not until_exit and not holds_socket(h.pid, inode))

    while not all(done(h) for h in handles) and time.monotonic() < deadline:
        time.sleep(0.02)
    for h in handles:
        if not done(h):
            try:
                h.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            h.wait(2.0)
        h.close()
    return [h.pid for h in handles]


def _answers_health(path: str, version: str, headers: dict[str, str] | None = None) -> bool:
    """Whether the worker listening on the Unix socket ``path`` answers /health 200 for ``version`` (an
    endpoint worker names its version only to a caller of the endpoint: ``headers``, the supervisor's
    credential)."""
    got = protocol.unix_get(path, "/health", 1.0, headers=headers or None)
    if got is None or got[0] != 200:
        return False
    try:
        doc = json.loads(got[1])
    except ValueError:
        return True  # an app release may answer /health with plain text: 200 is healthy
    return not isinstance(doc, dict) or "version" not in doc or str(doc["version"]) == version


def _activate(path: str) -> bool:
    """Tell the worker on the private socket ``path`` to accept on the stable socket; True once it says
    it does."""
    got = protocol.unix_get(path, protocol.ACTIVATE_ROUTE, 5.0, method="POST")
    return got is not None and got[0] == 200


class Refuser:
    """Answers every connection on the stable socket at once with ``503`` and a JSON body saying why,
    while nothing of the current version can (``refuse``); accepts nothing otherwise (``clear``), so
    it never takes a connection a ready worker could have answered.

    One thread, one selector, non-blocking sockets: a connection's request head (and a body of at
    most BODY_LIMIT bytes) is read first so the client reads the answer rather than a reset, for at
    most CONN_SECONDS; then the answer, ``connection: close``. At most MAX_CONNS at once: beyond that
    new connections wait in the backlog until one of those is answered (within CONN_SECONDS)."""

    HEAD_LIMIT = 16 * 1024
    BODY_LIMIT = 1024 * 1024
    CONN_SECONDS = 2.0
    MAX_CONNS = 256

    def __init__(self, stable: socket.socket):
        self.stable = stable
        # a worker may take the connection between select and accept: never block on accept (the flag
        # is shared with the workers' copies, which asyncio sets non-blocking anyway)
        stable.setblocking(False)
        self.answer: bytes | None = None
        self.doc: dict[str, Any] | None = None

    def refuse(self, doc: dict[str, Any], retry_after: int | None) -> None:
        if doc == self.doc:
            return
        body = json.dumps(doc).encode()
        head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n"
                + (f"retry-after: {retry_after}\r\n" if retry_after else "") + "\r\n")
        self.doc, self.answer = doc, head.encode() + body

    def clear(self) -> None:
        self.doc = self.answer = None

    def refusing(self) -> dict[str, Any] | None:
        return self.doc

    def run(self) -> None:
        """The responder's thread: an unexpected error is said and the loop starts again (its open
        connections are dropped), so the address never silently goes back to hanging."""
        while True:
            try:
                self._serve()
            except Exception as err:  # noqa: BLE001 - see docstring
                print(f"onepath supervisor: refusal responder: {type(err).__name__}: {err}; restarting it",
                      file=sys.stderr)
                time.sleep(0.05)

    def _serve(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        listening = False
        conns: dict[socket.socket, dict[str, Any]] = {}
        while True:
            want = self.answer is not None and len(conns) < self.MAX_CONNS
            if want != listening:
                if want:
                    sel.register(self.stable, selectors.EVENT_READ)
                else:
                    sel.unregister(self.stable)
                listening = want
            for key, _ in sel.select(0.05):
                if key.fileobj is self.stable:
                    answer = self.answer
                    if answer is None:  # a worker became ready meanwhile: leave the connection to it
                        continue
                    try:
                        conn, _addr = self.stable.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    except OSError:
                        continue
                    conn.setblocking(False)
                    conns[conn] = {"buf": b"", "out": answer, "need": None,
                                   "until": time.monotonic() + self.CONN_SECONDS}
                    sel.register(conn, selectors.EVENT_READ)
                else:
                    self._service(sel, conns, key.fileobj, key.events)
            t = time.monotonic()
            for conn, st in list(conns.items()):
                if t > st["until"]:
                    if st["need"] == "closing":
                        self._close(sel, conns, conn)
                    else:
                        self._answer(sel, conns, conn)

    def _service(self, sel: Any, conns: dict, conn: Any, events: int) -> None:
        import selectors

        st = conns.get(conn)
        if st is None:
            return
        if events & selectors.EVENT_WRITE:
            self._answer(sel, conns, conn)
            return
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(sel, conns, conn)
            return
        if st["need"] == "closing":  # answered; waiting for the client to close
            if not data:
                self._close(sel, conns, conn)
            return
        if not data:
            self._answer(sel, conns, conn)
            return
        st["buf"] += data
        buf = st["buf"]
        if st["need"] is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.HEAD_LIMIT:
                    self._answer(sel, conns, conn)
                return
            head = buf[:end].decode("latin-1", "replace").lower()
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip() == "content-length":
                    try:
                        length = int(value.strip())
                    except ValueError:
                        length = 0
            chunked = "transfer-encoding: chunked" in head
            st["need"] = ("chunked", end + 4) if chunked else ("length", end + 4 + max(0, min(length, self.BODY_LIMIT)))
        kind, n = st["need"]
        if (kind == "length" and len(buf) >= n) or (kind == "chunked" and buf.endswith(b"0\r\n\r\n")) \
                or len(buf) > self.HEAD_LIMIT + self.BODY_LIMIT:
            self._answer(sel, conns, conn)

    def _answer(self, sel: Any, conns: dict, conn: Any) -> None:
        import selectors

        st = conns[conn]
        try:
            sent = conn.send(st["out"])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(sel, conns, conn)
            return
        st["out"] = st["out"][sent:]
        st["buf"] = b""
        if st["out"]:
            sel.modify(conn, selectors.EVENT_WRITE)
            return
        try:
            conn.shutdown(socket.SHUT_WR)  # the answer is whole; the client closes, we read its EOF
        except OSError:
            self._close(sel, conns, conn)
            return
        st["need"] = "closing"
        st["until"] = time.monotonic() + self.CONN_SECONDS
        sel.modify(conn, selectors.EVENT_READ)

    def _close(self, sel: Any, conns: dict, conn: Any) -> None:
        conns.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()


def _worker_doc(path: str, route: str = "/version", headers: dict[str, str] | None = None,
                timeout: float = 0.5) -> dict[str, Any] | None:
    """The JSON document a worker answers on ``route`` if its /health answers 200, else None: an app
    worker's /version (never sent a credential: it is another team's code), an endpoint worker's process
    facts (``protocol.WORKER_ROUTE``: pid, version, digest, ...) asked with the supervisor's credential
    ``headers``."""
    got = protocol.unix_get(path, "/health", timeout)
    if got is None or got[0] != 200:
        return None
    got = protocol.unix_get(path, route, timeout, headers=headers)
    if got is None or got[0] != 200:
        return None
    try:
        doc = json.loads(got[1])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _worker_metrics(path: str, headers: dict[str, str] | None = None) -> str:
    got = protocol.unix_get(path, "/metrics", 2.0, headers=headers)
    return got[1].decode("utf-8", "replace") if got is not None and got[0] == 200 else ""


def _in_threads(fn: Any, items: list[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, each call in its own thread (workers answer independently)."""
    out: list[Any] = [None] * len(items)

    def run(i: int) -> None:
        out[i] = fn(items[i])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _token(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a fencing token is a non-negative integer, got {value!r}")
    return value


def _parse_ts(ts: str) -> float:
    return time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone


class ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def server_bind(self) -> None:
        protocol.bind_unix(self.socket, str(self.server_address))


def make_handler(sup: Supervisor) -> type[BaseHTTPRequestHandler]:
    expected = protocol.header_value(sup.secret).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet
            return

        def address_string(self) -> str:
            return "unix"

        def _reply(self, code: int, data: Any) -> None:
            body = json.dumps(data).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def _refuse(self, code: int, why: str) -> bool:
            # read (and drop) a small body first, so the client sees the answer rather than a reset
            try:
                n = int(self.headers.get("content-length") or 0)
            except ValueError:
                n = 0
            if 0 < n <= protocol.MAX_BODY:
                self.rfile.read(n)
            self._reply(code, {"error": why})
            return False

        def _authorized(self) -> bool:
            """The peer is our own uid (SO_PEERCRED) and shows the slot's secret; else 403/401."""
            raw = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", raw)
            if uid != os.getuid():
                return self._refuse(403, f"peer uid {uid} is not the supervisor's uid {os.getuid()}")
            given = (self.headers.get(protocol.SECRET_HEADER) or "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, expected):
                return self._refuse(401, "missing or wrong slot secret")
            return True

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/status":
                self._reply(200, sup.status())
            elif self.path == "/ping":
                self._reply(200, {"ok": True, "pid": os.getpid()})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            if not self._authorized():
                return
            try:
                n = int(self.headers.get("content-length") or 0)
            except ValueError:
                n = -1
            if not 0 <= n <= protocol.MAX_BODY:
                self._reply(400, {"error": f"a request body is at most {protocol.MAX_BODY} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
                if self.path == "/launch":
                    out = sup.launch(body)
                elif self.path == "/promote":
                    out = sup.promote(body["group"], fencing_token=body.get("fencing_token"),
                                      fallback=body.get("fallback"))
                elif self.path == "/fence":
                    out = sup.fence(body["token"])
                elif self.path == "/probe":
                    out = sup.probe(body["group"])
                elif self.path == "/metrics":
                    out = sup.metrics()
                elif self.path == "/discard":
                    out = sup.discard(body["group"])
                elif self.path == "/stop":
                    self._reply(200, {"stopping": True})
                    threading.Thread(target=_stop_and_exit, args=(sup,), daemon=True).start()
                    return
                else:
                    self._reply(404, {"error": "not found"})
                    return
            except Conflict as err:
                self._reply(409, {"error": str(err)})
                return
            except KeyError as err:
                self._reply(400, {"error": f"missing key {err}"})
                return
            except (ValueError, SpecError, OSError) as err:
                self._reply(400, {"error": " ".join(str(err).split())})
                return
            sup.on_change()
            self._reply(200, out)

    return Handler


def _stop_and_exit(sup: Supervisor) -> None:
    sup.stop()
    sup.persist()
    for g in list(sup.groups.values()):
        g.remove_sockets()
    try:
        os.unlink(protocol.private_dir(sup.slot_dir) / protocol.CONTROL_SOCKET)
    except OSError:
        pass
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    os.umask(0o077)  # every file and socket the supervisor makes is owner-only
    ap = argparse.ArgumentParser(prog="python -m resources.serving.supervisor")
    ap.add_argument("--slot-dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--artifact-root", action="append", default=[], required=True,
                    help="a directory release artifacts may come from (repeatable)")
    ap.add_argument("--inference-log-dir", default=None, help="where endpoints append their inference logs")
    ap.add_argument("--inference-log-url", default=None,
                    help="s3://bucket/prefix: endpoints write their inference logs there as Parquet segments")
    args = ap.parse_args(argv)
    slot_dir = Path(args.slot_dir)
    try:
        slot_dir.parent.mkdir(parents=True, exist_ok=True)
        protocol.ensure_owner_only_dir(slot_dir)
        secret = protocol.load_or_create_secret(slot_dir)
    except (ControlError, OSError) as err:
        print(f"onepath supervisor: refusing to start for {slot_dir}: {err}", file=sys.stderr)
        raise SystemExit(5) from None
    deadline = time.monotonic() + 1.0  # the deployer's liveness look holds the lock for an instant
    while (lock := protocol.acquire_supervisor_lock(slot_dir)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if lock is None:
        print(f"onepath supervisor: another supervisor runs for {slot_dir} (it holds "
              f"{protocol.private_dir(slot_dir) / protocol.SUPERVISOR_LOCK}); not starting a second one",
              file=sys.stderr)
        raise SystemExit(6)
    try:
        sup = Supervisor(slot_dir, args.host, args.port, secret=secret, artifact_roots=args.artifact_root,
                         inference_log_dir=args.inference_log_dir, inference_log_url=args.inference_log_url)
    except OSError as err:
        print(f"onepath supervisor: cannot bind {args.host}:{args.port}: {err}", file=sys.stderr)
        raise SystemExit(4) from None
    # this supervisor holds the slot's stable port, so no other one runs for the slot: a control
    # socket left behind is a dead one's
    sock_path = protocol.private_dir(slot_dir) / protocol.CONTROL_SOCKET
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    control = ControlServer(str(sock_path), make_handler(sup))
    sup.on_change = sup.persist
    sup.persist()
    sup.event("supervisor_start", pid=os.getpid(), port=sup.port)
    found = sup.takeover
    if found["previous_pid"] is not None and not found["previous_stopped"]:
        # the last supervisor of this slot died without being stopped (see "Adoption")
        cur = sup.current
        relaunch = found["relaunch"]
        sup.event("supervisor_restarted", pid=os.getpid(), previous_pid=found["previous_pid"],
                  version=cur.version if cur else (str(relaunch["version"]) if relaunch else None),
                  group=cur.id if cur else None, adopted_pids=found["adopted_pids"], respawned=found["respawned"],
                  stopped_pids=found["stopped_pids"], relaunched=relaunch is not None,
                  unsupervised_seconds=found["unsupervised_seconds"], detail="; ".join(found["handoff_errors"])[:500])
        if relaunch is not None:
            threading.Thread(target=sup.relaunch, args=(relaunch,), name="relaunch", daemon=True).start()

    def on_term(signum: int, frame: Any) -> None:
        threading.Thread(target=_stop_and_exit, args=(sup,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    threading.Thread(target=sup.refuser.run, name="refuser", daemon=True).start()
    persisted = None
    beat = 0.0
    while not sup.stopping.is_set():
        sup.tick()
        if time.monotonic() - beat >= 1.0:  # what a supervisor after this one reads as our last sign of life
            sup.heartbeat.touch()
            beat = time.monotonic()
        with sup.lock:  # compared with what was last written: changes made between ticks count too
            now = (sup.current.view() if sup.current else None, sup.previous_spec, sup.fencing_token)
        if now != persisted:
            sup.persist()
            persisted = now
        time.sleep(0.1)
    while True:  # _stop_and_exit ends the process
        time.sleep(1)


if __name__ == "__main__":
    main()
