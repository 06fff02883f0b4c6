"""The per-environment process supervisor of the local deployer (standard library only).

One supervisor owns one *slot*: an endpoint or app release in one environment. It binds the slot's
stable address once and keeps it for its whole life, so the address never changes when the version
does. It starts the version's worker processes with that listening socket inherited (plus a private
health socket each), promotes a healthy group to "current" and drains the old one with SIGTERM,
restarts a current worker that dies (with backoff, and stops a version that crash-loops), and tells
the truth about all of it on its control port. It runs in its own session, so it and its children
outlive the Dagster run that started it; ``onepath down`` stops it.

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

RESTART_LIMIT = 5  # restarts of one group within RESTART_WINDOW before it counts as crash-looping
RESTART_WINDOW = 60.0
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


class Supervisor:
    def __init__(self, slot_dir: Path, host: str, port: int):
        self.slot_dir = slot_dir
        self.host, self.port = host, port
        self.lock = threading.RLock()
        self.groups: dict[str, Group] = {}
        self.current: Group | None = None
        self.stopping = threading.Event()
        self.events_path = slot_dir / "events.jsonl"
        self.stable = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.stable.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.stable.bind((host, port))
        self.stable.listen(4096)
        self.stable.set_inheritable(True)
        self.port = self.stable.getsockname()[1]

    # -- records --------------------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"ts": now_iso(), "event": kind, **fields}, sort_keys=True)
        with open(self.events_path, "a") as f:
            f.write(line + "\n")

    def persist(self, control_port: int) -> None:
        with self.lock:
            cur = self.current
            write_json_atomic(self.slot_dir / "state.json", {
                "pid": os.getpid(), "control_port": control_port, "host": self.host, "port": self.port,
                "current": cur.view() if cur else None,
                "current_spec": cur.spec if cur else None,
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

    def promote(self, group_id: str) -> dict[str, Any]:
        with self.lock:
            g = self.groups.get(group_id)
            if g is None or g.state != "starting" or not all(p and p.poll() is None for p in g.procs):
                raise ValueError(f"group {group_id} is not a live candidate")
            old = self.current
            g.state = "current"
            self.current = g
            if old is not None and old is not g:
                old.state = "draining"
                old.drain_deadline = time.time() + DRAIN_SECONDS
                old.signal_all(signal.SIGTERM)
                self._await_released(old)
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
                if g.state in ("stopped", "failed") and g is not self.current and not g.alive():
                    # keep the record small: finished groups are in events.jsonl
                    if time.time() - _parse_ts(g.started_at) > 300:
                        del self.groups[gid]

    def _restart(self, g: Group, i: int, code: int) -> None:
        t = time.time()
        g.restarts = [r for r in g.restarts if t - r < RESTART_WINDOW]
        if len(g.restarts) >= RESTART_LIMIT:
            g.state = "crashloop"
            g.signal_all(signal.SIGKILL)
            self.event("crashloop", group=g.id, version=g.version, restarts=len(g.restarts), exit_code=code)
            return
        backoff = min(0.1 * (2 ** len(g.restarts)), 5.0)
        if g.restarts and t - g.restarts[-1] < backoff:
            return  # try again on a later tick
        g.restarts.append(t)
        g.spawn(i, self.stable)
        self.event("restart", group=g.id, version=g.version, worker=i, exit_code=code,
                   restarts=len(g.restarts))


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
    sup.persist(control_port)
    sup.event("supervisor_start", pid=os.getpid(), port=sup.port)

    def on_term(signum: int, frame: Any) -> None:
        threading.Thread(target=_stop_and_exit, args=(sup, lambda: sup.persist(control_port)),
                         daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=control.serve_forever, daemon=True).start()
    while not sup.stopping.is_set():
        before = sup.current.view() if sup.current else None
        sup.tick()
        after = sup.current.view() if sup.current else None
        if before != after:
            sup.persist(control_port)
        time.sleep(0.1)
    while True:  # _stop_and_exit ends the process
        time.sleep(1)


if __name__ == "__main__":
    main()
