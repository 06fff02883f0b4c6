"""The per-environment process supervisor of the local deployer (standard library only).

One supervisor owns one *slot*: an endpoint or app release in one environment. It binds the slot's
stable address once and keeps it for its whole life, so the address never changes when the version
does. It starts the version's worker processes with that listening socket inherited (plus a private
health socket each), promotes a healthy group to "current" and drains the old one with SIGTERM,
restarts a current worker that dies (with backoff), and tells the truth about all of it on its
control port. It runs in its own session, so it and its children outlive the Dagster run that
started it; ``onepath down`` stops it.

A current version that crash-loops (more than RESTART_LIMIT restarts within RESTART_WINDOW) is
replaced at once by the version that was current before it: the supervisor remembers that version's
launch spec (also in ``state.json``, so a restarted supervisor still knows), launches it, waits until
each of its workers answers ``/health`` on its private port, promotes it and records
``crashloop`` then ``crashloop_rollback`` in ``events.jsonl``. With no previous version, the
crash-looping one is stopped and nothing serves (the ``crashloop`` event says so). Every event
carries a unique ``id`` so whoever relays them (the ``supervisor_events`` sensor) can tell a line it
has already relayed.

Control API (JSON over HTTP on 127.0.0.1, port in ``state.json``): ``GET /status``,
``POST /launch``, ``POST /promote``, ``POST /discard``, ``POST /stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# restarts of one group within RESTART_WINDOW seconds before it counts as crash-looping
RESTART_LIMIT = int(os.environ.get("ONEPATH_RESTART_LIMIT", "5"))
RESTART_WINDOW = float(os.environ.get("ONEPATH_RESTART_WINDOW", "60"))
# how long the version restored after a crash loop may take until every worker answers /health
RESTORE_SECONDS = float(os.environ.get("ONEPATH_RESTORE_SECONDS", "120"))
DRAIN_SECONDS = float(os.environ.get("ONEPATH_DRAIN_SECONDS", "30"))


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def log_tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


class Group:
    """The worker processes of one version."""

    def __init__(self, spec: dict[str, Any], slot_dir: Path):
        self.id = uuid.uuid4().hex[:10]
        self.spec = spec
        self.version = str(spec["version"])
        self.workers = int(spec.get("workers", 1))
        self.state = "starting"  # starting | current | draining | failed | stopped | crashloop
        self.procs: list[subprocess.Popen | None] = [None] * self.workers
        self.private_ports: list[int] = [0] * self.workers
        self.restarts: list[float] = []
        self.started_at = now_iso()
        self.log_path = slot_dir / "logs" / f"{self.version}-{self.id}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.exit_codes: list[int | None] = [None] * self.workers
        self.drain_deadline = 0.0

    def spawn(self, i: int, stable: socket.socket) -> None:
        private = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        private.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        private.bind(("127.0.0.1", 0))
        private.listen(64)
        env = dict(os.environ)
        env.update({k: str(v) for k, v in (self.spec.get("env") or {}).items()})
        env["ONEPATH_LISTEN_FDS"] = f"{stable.fileno()},{private.fileno()}"
        env["ONEPATH_WORKER_INDEX"] = str(i)
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                self.spec["argv"], cwd=self.spec.get("cwd") or None, env=env,
                pass_fds=(stable.fileno(), private.fileno()), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.private_ports[i] = private.getsockname()[1]
        private.close()
        self.procs[i] = proc
        self.exit_codes[i] = None

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
            "private_ports": self.private_ports, "started_at": self.started_at,
            "restarts": len(self.restarts), "meta": self.spec.get("meta", {}),
            "log": str(self.log_path),
        }


def read_state(slot_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((slot_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Supervisor:
    def __init__(self, slot_dir: Path, host: str, port: int):
        self.slot_dir = slot_dir
        self.host, self.port = host, port
        self.lock = threading.RLock()
        self.groups: dict[str, Group] = {}
        self.current: Group | None = None
        self.stopping = threading.Event()
        self.events_path = slot_dir / "events.jsonl"
        self.on_change: Any = lambda: None  # persists state.json; set by main() once the control port is known
        # The spec of the version that was current before the current one: what a crash loop rolls
        # back to. A supervisor started again for this slot reads it (and what was current then,
        # which becomes "previous" once something new is promoted) from the last state.json.
        before = read_state(slot_dir)
        self.previous_spec: dict[str, Any] | None = before.get("previous_spec")
        served = before.get("current") or {}
        self.last_served_spec: dict[str, Any] | None = (
            before.get("current_spec") if served.get("state") == "current" else None)
        self.stable = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.stable.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.stable.bind((host, port))
        self.stable.listen(4096)
        self.stable.set_inheritable(True)
        self.port = self.stable.getsockname()[1]

    # -- records --------------------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"id": uuid.uuid4().hex[:16], "ts": now_iso(), "event": kind, **fields}, sort_keys=True)
        with self.lock, open(self.events_path, "ab") as f:  # one write per line: readers see whole lines
            f.write((line + "\n").encode())

    def persist(self, control_port: int) -> None:
        with self.lock:
            cur = self.current
            write_json_atomic(self.slot_dir / "state.json", {
                "pid": os.getpid(), "control_port": control_port, "host": self.host, "port": self.port,
                "current": cur.view() if cur else None,
                "current_spec": cur.spec if cur else None,
                "previous_spec": self.previous_spec,
                "previous_version": str(self.previous_spec["version"]) if self.previous_spec else None,
                "updated_at": now_iso(), "stopped": self.stopping.is_set(),
            })

    # -- commands -------------------------------------------------------------------------
    def launch(self, spec: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(spec.get("argv"), list) or "version" not in spec:
            raise ValueError("launch needs 'argv' (list) and 'version'")
        with self.lock:
            g = Group(spec, self.slot_dir)
            for i in range(g.workers):
                g.spawn(i, self.stable)
            self.groups[g.id] = g
            self.event("launch", group=g.id, version=g.version, pids=[p.pid for p in g.procs if p])
            return g.view()

    def promote(self, group_id: str, *, restoring: bool = False) -> dict[str, Any]:
        """Make a healthy candidate current and drain the version it replaces.

        The replaced version's spec becomes ``previous_spec`` (what a crash loop of the new one rolls
        back to), unless it is the same version or was not serving (a crash-looped group keeps its
        state as the record of what happened). ``restoring`` (the crash-loop rollback) forgets the
        previous spec: the version restored has no known predecessor, and the one it replaced is
        exactly the one never to go back to."""
        with self.lock:
            g = self.groups.get(group_id)
            if g is None or g.state != "starting" or not all(p and p.poll() is None for p in g.procs):
                raise ValueError(f"group {group_id} is not a live candidate")
            old = self.current
            g.state = "current"
            self.current = g
            if old is not None and old is not g:
                if old.state == "current":
                    if old.version != g.version:
                        self.previous_spec = old.spec
                    old.state = "draining"
                    old.drain_deadline = time.time() + DRAIN_SECONDS
                    old.signal_all(signal.SIGTERM)
                    self._await_released(old)
                else:
                    old.signal_all(signal.SIGKILL)
            elif old is None and self.last_served_spec is not None:
                if str(self.last_served_spec.get("version")) != g.version:
                    self.previous_spec = self.last_served_spec
            self.last_served_spec = None
            if restoring:
                self.previous_spec = None
            self.event("promote", group=g.id, version=g.version, previous=old.version if old else None)
            return g.view()

    def _await_released(self, old: Group, limit: float = 10.0) -> None:
        """Return once no worker of ``old`` holds the stable socket any more (it closed its listener on
        SIGTERM and only finishes the requests it already has), so from then on every new connection
        reaches the new version. Read from /proc: the socket's inode among each process's fds."""
        inode = os.fstat(self.stable.fileno()).st_ino
        target = f"socket:[{inode}]"
        deadline = time.time() + limit
        while time.time() < deadline:
            holding = False
            for p in old.procs:
                if p is None or p.poll() is not None:
                    continue
                try:
                    fds = os.listdir(f"/proc/{p.pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        if os.readlink(f"/proc/{p.pid}/fd/{fd}") == target:
                            holding = True
                            break
                    except OSError:
                        continue
                if holding:
                    break
            if not holding:
                return
            time.sleep(0.01)

    def discard(self, group_id: str) -> dict[str, Any]:
        with self.lock:
            g = self.groups.get(group_id)
            if g is None:
                return {"discarded": False}
            if g is self.current:
                raise ValueError("the current group cannot be discarded; promote another first")
            g.state = "failed" if g.state == "starting" else g.state
            g.signal_all(signal.SIGKILL)
            self.event("discard", group=g.id, version=g.version)
            return {"discarded": True}

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "pid": os.getpid(), "host": self.host, "port": self.port,
                "current": self.current.view() if self.current else None,
                "groups": [g.view() for g in self.groups.values()],
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
                    if any(p is not None and p.poll() is not None for p in g.procs):
                        g.state = "failed"
                        g.signal_all(signal.SIGKILL)
                        self.event("start_failed", group=g.id, version=g.version,
                                   exit_codes=[p.poll() if p else None for p in g.procs])
                elif g.state == "current" and not self.stopping.is_set():
                    for i, p in enumerate(g.procs):
                        if p is not None and p.poll() is not None:
                            self._restart(g, i, p.returncode)
                if g.state in ("stopped", "failed", "crashloop") and g is not self.current and not g.alive():
                    # keep the record small: finished groups are in events.jsonl
                    if time.time() - _parse_ts(g.started_at) > 300:
                        del self.groups[gid]

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
        self.event("restart", group=g.id, version=g.version, worker=i, exit_code=code,
                   restarts=len(g.restarts))


    def _crashloop(self, g: Group, code: int) -> None:
        """``g`` (the current group) crash-loops: stop it, and roll back to the previous version if
        there is one (in a thread: its workers take seconds to load, and /status must keep answering)."""
        g.state = "crashloop"
        g.signal_all(signal.SIGKILL)
        prev = self.previous_spec
        common = {"group": g.id, "version": g.version, "restarts": len(g.restarts), "exit_code": code,
                  "restart_limit": RESTART_LIMIT, "window_seconds": RESTART_WINDOW}
        if prev is None or str(prev.get("version")) == g.version:
            self.event("crashloop", **common, action="stopped", rollback_to=None,
                       detail=f"version {g.version} restarted {len(g.restarts)} times within "
                              f"{RESTART_WINDOW:g} s and there is no previous version to roll back to: "
                              "it is stopped and nothing serves at this address")
            return
        to = str(prev["version"])
        self.event("crashloop", **common, action="rollback", rollback_to=to,
                   detail=f"version {g.version} restarted {len(g.restarts)} times within {RESTART_WINDOW:g} s: "
                          f"rolling back to version {to}")
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
            self.event("crashloop_rollback_failed", group=group.id if group else None, from_version=looped.version,
                       to_version=to, reason=why)

        try:
            new = self.groups[self.launch(spec)["id"]]
        except (OSError, ValueError, KeyError) as err:
            failed(f"cannot launch version {to}: {err}")
            return
        deadline = t0 + RESTORE_SECONDS
        while True:
            if self.stopping.is_set():
                failed("the supervisor is stopping", new)
                return
            with self.lock:
                dead = new.state != "starting" or any(p is None or p.poll() is not None for p in new.procs)
                ports = list(new.private_ports)
            if dead:
                failed(f"version {to} exited while starting; log: {' '.join(log_tail(new.log_path, 600).split())}",
                       new)
                return
            if all(_answers_health(port, to) for port in ports):
                break
            if time.monotonic() > deadline:
                failed(f"version {to} did not answer /health within {RESTORE_SECONDS:g} s", new)
                return
            time.sleep(0.05)
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


def _answers_health(port: int, version: str) -> bool:
    """Whether the worker listening on ``port`` answers /health 200 for ``version``."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    if resp.status != 200:
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return True  # an app release may answer /health with plain text: 200 is healthy
    return not isinstance(doc, dict) or "version" not in doc or str(doc["version"]) == version


def _parse_ts(ts: str) -> float:
    return time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone


def make_handler(sup: Supervisor, on_change: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet
            return

        def _reply(self, code: int, data: Any) -> None:
            body = json.dumps(data).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/status":
                self._reply(200, sup.status())
            elif self.path == "/ping":
                self._reply(200, {"ok": True, "pid": os.getpid()})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
                if self.path == "/launch":
                    out = sup.launch(body)
                elif self.path == "/promote":
                    out = sup.promote(body["group"])
                elif self.path == "/discard":
                    out = sup.discard(body["group"])
                elif self.path == "/stop":
                    self._reply(200, {"stopping": True})
                    threading.Thread(target=_stop_and_exit, args=(sup, on_change), daemon=True).start()
                    return
                else:
                    self._reply(404, {"error": "not found"})
                    return
            except (ValueError, KeyError) as err:
                self._reply(400, {"error": str(err)})
                return
            on_change()
            self._reply(200, out)

    return Handler


def _stop_and_exit(sup: Supervisor, on_change: Any) -> None:
    sup.stop()
    on_change()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m resources.serving.supervisor")
    ap.add_argument("--slot-dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    slot_dir = Path(args.slot_dir)
    slot_dir.mkdir(parents=True, exist_ok=True)
    try:
        sup = Supervisor(slot_dir, args.host, args.port)
    except OSError as err:
        print(f"onepath supervisor: cannot bind {args.host}:{args.port}: {err}", file=sys.stderr)
        raise SystemExit(4) from None
    control = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(sup, lambda: None))
    control.daemon_threads = True
    control_port = control.server_address[1]
    control.RequestHandlerClass = make_handler(sup, lambda: sup.persist(control_port))
    sup.on_change = lambda: sup.persist(control_port)
    sup.persist(control_port)
    sup.event("supervisor_start", pid=os.getpid(), port=sup.port)

    def on_term(signum: int, frame: Any) -> None:
        threading.Thread(target=_stop_and_exit, args=(sup, lambda: sup.persist(control_port)),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    persisted = None
    while not sup.stopping.is_set():
        sup.tick()
        with sup.lock:  # compared with what was last written: changes made between ticks count too
            now = (sup.current.view() if sup.current else None, sup.previous_spec)
        if now != persisted:
            sup.persist(control_port)
            persisted = now
        time.sleep(0.1)
    while True:  # _stop_and_exit ends the process
        time.sleep(1)


if __name__ == "__main__":
    main()
