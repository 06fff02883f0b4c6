"""The local-process backend: real HTTP servers on loopback, one supervisor per environment.

Each target (endpoint or app release in one environment) gets a stable port, allocated once and
kept in ``<run_dir>/ports.json``, and a supervisor process (``resources.serving.supervisor``) that
holds the listening socket and runs the version's workers. State survives the Dagster process: a
new deployer instance finds the supervisors again through ``<run_dir>/<slot>/state.json``.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from platform_defs.settings import PROJECT_ROOT
from resources.processes import pid_alive
from resources.deployers.base import (Candidate, Deployer, DeployError, Release, Target, http_json,
                                      model_thread_env)
from resources.serving.supervisor import log_tail


class LocalProcessDeployer(Deployer):
    def __init__(self, run_dir: Path, *, host: str = "127.0.0.1", port_base: int = 18000,
                 python: str | None = None, inference_log_dir: Path | None = None):
        self.run_dir = Path(run_dir)
        self.host = host
        self.port_base = port_base
        self.python = python or sys.executable
        self.inference_log_dir = Path(inference_log_dir) if inference_log_dir else self.run_dir / "inference_logs"
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- ports ----------------------------------------------------------------------------
    @contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with open(self.run_dir / name, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _ports(self) -> dict[str, int]:
        path = self.run_dir / "ports.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def _port(self, target: Target, allocate: bool = True) -> int | None:
        with self._locked("ports.lock"):
            ports = self._ports()
            if target.port is not None:
                if ports.get(target.slot) != target.port:
                    ports[target.slot] = target.port
                    self._save_ports(ports)
                return target.port
            if target.slot in ports or not allocate:
                return ports.get(target.slot)
            used = set(ports.values())
            port = self.port_base
            while port in used or not _bindable(self.host, port):
                port += 1
                if port > 65535:
                    raise DeployError("no free port left for a stable address")
            ports[target.slot] = port
            self._save_ports(ports)
            return port

    def _save_ports(self, ports: dict[str, int]) -> None:
        tmp = self.run_dir / f"ports.json.{os.getpid()}"
        tmp.write_text(json.dumps(ports, indent=2, sort_keys=True))
        os.replace(tmp, self.run_dir / "ports.json")

    def _address(self, target: Target) -> str:
        return f"http://{self.host}:{self._port(target)}"

    def _address_if_known(self, target: Target) -> str | None:
        port = self._port(target, allocate=False)
        return f"http://{self.host}:{port}" if port else None

    # -- supervisor -----------------------------------------------------------------------
    def slot_dir(self, target: Target) -> Path:
        return self.run_dir / target.slot

    def _state(self, target: Target) -> dict[str, Any] | None:
        path = self.slot_dir(target) / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _control(self, target: Target) -> str | None:
        state = self._state(target)
        if not state or state.get("stopped") or not pid_alive(int(state["pid"])):
            return None
        url = f"http://127.0.0.1:{state['control_port']}"
        try:
            code, _ = http_json(url + "/ping", timeout=2)
        except OSError:
            return None
        return url if code == 200 else None

    def _ensure_supervisor(self, target: Target) -> str:
        url = self._control(target)
        if url:
            return url
        never_served = not (self.slot_dir(target) / "state.json").exists()
        for _ in range(5):
            try:
                return self._start_supervisor(target)
            except _PortTaken:
                # another program took the port between allocation and bind. A stable address that
                # never served anyone can still move; one that did, or a declared port, cannot.
                if target.port is not None or not never_served:
                    raise DeployError(f"{target.slot}: its stable port {self._port(target)} is taken by "
                                      f"another program; free it and deploy again") from None
                self._reallocate(target)
        raise DeployError(f"{target.slot}: no free port found for its stable address")

    def _reallocate(self, target: Target) -> None:
        with self._locked("ports.lock"):
            ports = self._ports()
            taken = ports.pop(target.slot, None)
            if taken is not None:
                ports[f"(taken by another program).{taken}"] = taken
            self._save_ports(ports)

    def _start_supervisor(self, target: Target) -> str:
        port = self._port(target)
        slot = self.slot_dir(target)
        slot.mkdir(parents=True, exist_ok=True)
        # state.json of an earlier supervisor stays: the new one reads what served before from it
        # (what a crash loop rolls back to), and it is ready once state.json names its own pid
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        with open(slot / "supervisor.log", "ab") as log:
            proc = subprocess.Popen(
                [self.python, "-m", "resources.serving.supervisor", "--slot-dir", str(slot),
                 "--host", self.host, "--port", str(port)],
                cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        # the supervisor outlives this process; while we live, reap it if it exits (no zombies)
        threading.Thread(target=proc.wait, daemon=True).start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                if proc.returncode == 4:  # the supervisor's "cannot bind" exit
                    raise _PortTaken(port)
                raise DeployError(f"{target.slot}: the supervisor for {self.host}:{port} exited: "
                                  f"{log_tail(slot / 'supervisor.log', 600)}")
            state = self._state(target) or {}
            url = self._control(target) if state.get("pid") == proc.pid else None
            if url:
                return url
            time.sleep(self.poll_seconds)
        raise DeployError(f"{target.slot}: the supervisor did not come up within 20 s")

    def _call(self, url: str, path: str, data: dict | None = None) -> Any:
        code, body = http_json(url + path, timeout=30, data=data)
        if code != 200:
            raise DeployError(f"supervisor {path}: {body}")
        return body

    # -- backend calls --------------------------------------------------------------------
    def _launch(self, target: Target, release: Release) -> Candidate:
        with self._locked(f"{target.slot}.lock"):
            url = self._ensure_supervisor(target)
            spec = self._launch_spec(target, release)
            group = self._call(url, "/launch", spec)
        return Candidate(
            target=target, release=release, handle={"control": url, "group": group["id"]},
            health_urls=[f"http://127.0.0.1:{p}" for p in group["private_ports"]],
        )

    def _launch_spec(self, target: Target, release: Release) -> dict[str, Any]:
        slot = self.slot_dir(target)
        cfg = dict(release.config)
        env = {"PYTHONPATH": str(PROJECT_ROOT), **{k: str(v) for k, v in cfg.pop("env", {}).items()}}
        if target.kind == "endpoint":
            env.update(model_thread_env(cfg.pop("model_threads", 1)))
            configs = slot / "configs"
            configs.mkdir(parents=True, exist_ok=True)
            server_cfg = {
                "endpoint": target.name, "env": target.env, "version": release.version,
                "model_dir": release.artifact,
                "log_dir": str(self.inference_log_dir / target.name / target.env),
                **cfg,
            }
            cfg_path = configs / f"{release.version}.json"
            cfg_path.write_text(json.dumps(server_cfg, indent=2))
            argv = [self.python, "-m", "resources.serving.model_server", str(cfg_path)]
        elif target.kind == "app":
            env.update({"ONEPATH_RELEASE_VERSION": release.version, "ONEPATH_ENV": target.env})
            argv = [self.python, "-m", "resources.serving.child", "--app-dir", release.artifact,
                    "--app", cfg["entrypoint"]]
        else:
            raise DeployError(f"unknown target kind {target.kind!r}")
        return {"version": release.version, "argv": argv, "env": env, "workers": release.workers,
                "cwd": str(PROJECT_ROOT), "meta": {"artifact": release.artifact, "kind": target.kind}}

    def _group(self, candidate: Candidate) -> dict[str, Any] | None:
        try:
            status = self._call(candidate.handle["control"], "/status")
        except (OSError, DeployError):
            return None
        return next((g for g in status["groups"] if g["id"] == candidate.handle["group"]), None)

    def _candidate_failure(self, candidate: Candidate) -> str | None:
        g = self._group(candidate)
        if g is None:
            return "its supervisor no longer answers"
        if g["state"] == "failed" or any(c is not None for c in g["exit_codes"]):
            return f"exit codes {g['exit_codes']}; log: {log_tail(Path(g['log']), 1200)}"
        return None

    def _cutover(self, candidate: Candidate) -> None:
        self._call(candidate.handle["control"], "/promote", {"group": candidate.handle["group"]})

    def _discard(self, candidate: Candidate) -> None:
        try:
            self._call(candidate.handle["control"], "/discard", {"group": candidate.handle["group"]})
        except (OSError, DeployError):
            pass

    def _worker_addresses(self, target: Target) -> list[str]:
        url = self._control(target)
        if not url:
            return []
        try:
            cur = self._call(url, "/status").get("current")
        except (OSError, DeployError):
            return []
        if not cur or cur.get("state") != "current":  # crash-looped and stopped: nothing is current
            return []
        return [f"http://127.0.0.1:{p}" for p in cur.get("private_ports") or []]

    def _stop(self, target: Target) -> None:
        state = self._state(target)
        if not state:
            return
        pid = int(state["pid"])
        url = self._control(target)
        if url:
            try:
                http_json(url + "/stop", timeout=5, data={})
            except OSError:
                pass
        deadline = time.monotonic() + 40
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(self.poll_seconds)
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass

    def _backend_detail(self, target: Target) -> dict[str, Any]:
        url = self._control(target)
        if not url:
            return {"supervisor": None}
        try:
            st = self._call(url, "/status")
        except (OSError, DeployError):
            return {"supervisor": None}
        cur = st.get("current") or {}
        return {"supervisor": {"pid": st["pid"], "state": cur.get("state"), "version": cur.get("version"),
                               "pids": cur.get("pids"), "restarts": cur.get("restarts"),
                               "started_at": cur.get("started_at")}}

    # -- whole-machine helpers ------------------------------------------------------------
    def slots(self) -> list[str]:
        return sorted(p.parent.name for p in self.run_dir.glob("*/state.json"))

    def stop_all(self) -> list[str]:
        """Stop every supervisor under run_dir (in parallel); returns the slots that were running."""
        from concurrent.futures import ThreadPoolExecutor

        running = []
        for slot in self.slots():
            name, env = slot.rsplit(".", 1)
            t = Target(name, env)
            st = self._state(t)
            if st and not st.get("stopped") and pid_alive(int(st["pid"])):
                running.append((slot, t))
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(running)))) as pool:
            list(pool.map(lambda item: self._stop(item[1]), running))
        return [slot for slot, _ in running]


class _PortTaken(Exception):
    pass


def _bindable(host: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()
