"""The local-process backend: real HTTP servers on loopback, one supervisor per environment.

Each target (endpoint or app release in one environment) gets a stable port, allocated once and
kept in ``<run_dir>/ports.json``, and a supervisor process (``resources.serving.supervisor``) that
holds the listening socket and runs the version's workers. State survives the Dagster process: a
new deployer instance finds the supervisors again through ``<run_dir>/<slot>/state.json``.

The supervisor is driven only over its Unix socket ``<slot>/private/control.sock`` with the slot's
secret (``resources.serving.protocol``); the slot directory is 0700, so another local user can
neither reach the socket nor read the secret, the state or the events. What runs is the
supervisor's choice: this backend sends only which release to run (``_launch_spec``), and the
artifact must lie inside one of ``artifact_roots``.

A supervisor that died (SIGKILL, OOM) leaves its workers serving; ``revive`` (called by the
``endpoint_status`` sensor and ``onepath status``, and implied by every deploy through
``_ensure_supervisor``) starts a new one for the slot, which adopts them.
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
from typing import Any, Iterator, Sequence

from platform_defs.settings import PROJECT_ROOT
from resources.processes import pid_alive
from resources.deployers.base import Candidate, Deployer, DeployError, DeploymentStatus, Release, Target
from resources.serving import access, protocol
from resources.serving.protocol import ControlError
from resources.files import atomic_write
from resources.serving.supervisor import log_tail, stop_socket_holders

ENDPOINT_DEFAULTS = {"pii_columns": [], "max_batch": 64, "model_threads": 1, "inference_log": True,
                     "pass_through": []}



# The platform's own credentials never reach what it serves: a served model's code (an MLmodel can point at a
# pickle) or an app runs in the supervisor's children and could read them from its environment. The store
# passwords, the platform's signing key and the cloud credentials stay with the platform's processes. MLflow's
# store URIs are among them: on PostgreSQL they hold its password (and nothing served reads MLflow's store).
PLATFORM_CREDENTIALS = ("ONEPATH_LEDGER_URL", "ONEPATH_PLATFORM_KEY", "ONEPATH_DAGSTER_PG_PASSWORD",
                        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                        "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                        "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_BACKEND_STORE_URI")


def served_environment(environ: Any) -> dict[str, str]:
    """``environ`` without the platform's credentials: what a supervisor (and so every worker) starts with."""
    return {k: v for k, v in environ.items() if k not in PLATFORM_CREDENTIALS}


class LocalProcessDeployer(Deployer):
    def __init__(self, run_dir: Path, *, host: str = "127.0.0.1", port_base: int = 18000,
                 python: str | None = None, inference_log_dir: Path | None = None,
                 artifact_roots: Sequence[Path | str] = (), inference_log_url: str | None = None):
        self.run_dir = Path(run_dir)
        self.host = host
        self.port_base = port_base
        self.python = python or sys.executable
        self.inference_log_dir = Path(inference_log_dir) if inference_log_dir else self.run_dir / "inference_logs"
        self.inference_log_url = inference_log_url or None  # s3://bucket/prefix: Parquet segments there instead
        # where release artifacts may come from (the MLflow cache, the releases dir): a supervisor
        # started by this deployer launches nothing from anywhere else
        self.artifact_roots = [Path(r) for r in artifact_roots]
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

    def _control(self, target: Target) -> Path | None:
        """The slot directory of a live supervisor that answers an authenticated /ping, else None."""
        state = self._state(target)
        if not state or state.get("stopped") or not pid_alive(int(state["pid"])):
            return None
        slot = self.slot_dir(target)
        try:
            protocol.control_call(slot, "/ping", timeout=2)
        except ControlError:
            return None
        return slot

    def _ensure_supervisor(self, target: Target) -> Path:
        slot = self._control(target)
        if slot:
            return slot
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

    def _start_supervisor(self, target: Target) -> Path:
        if not self.artifact_roots:
            raise DeployError(f"{target.slot}: this deployer has no artifact roots, so its supervisor could "
                              "launch nothing; configure artifact_roots")
        port = self._port(target)
        slot = self.slot_dir(target)
        try:
            protocol.ensure_owner_only_dir(slot)  # 0700: another user cannot traverse it
        except ControlError as err:
            raise DeployError(f"{target.slot}: {err}") from None
        # state.json of an earlier supervisor stays: the new one reads what served before from it
        # (what a crash loop rolls back to), and it is ready once state.json names its own pid
        env = served_environment(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        argv = [self.python, "-m", "resources.serving.supervisor", "--slot-dir", str(slot),
                "--host", self.host, "--port", str(port), "--inference-log-dir", str(self.inference_log_dir)]
        if self.inference_log_url:
            argv += ["--inference-log-url", self.inference_log_url]
        for root in self.artifact_roots:
            argv += ["--artifact-root", str(root)]
        fd = os.open(slot / "supervisor.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as log:
            proc = subprocess.Popen(
                argv,
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
                if proc.returncode == 6:  # another supervisor holds the slot's lock but did not answer
                    raise DeployError(f"{target.slot}: its supervisor (pid {(self._state(target) or {}).get('pid')}) "
                                      "runs but does not answer its control socket; not starting a second one")
                raise DeployError(f"{target.slot}: the supervisor for {self.host}:{port} exited: "
                                  f"{_one_line(log_tail(slot / 'supervisor.log', 600))}")
            state = self._state(target) or {}
            ready = self._control(target) if state.get("pid") == proc.pid else None
            if ready:
                return ready
            time.sleep(self.poll_seconds)
        raise DeployError(f"{target.slot}: the supervisor did not come up within 20 s")

    def _supervisor_gone(self, target: Target, state: dict[str, Any]) -> bool:
        """Whether the slot's last supervisor is gone: nobody holds its lock (a pid can be reused;
        the lock goes with the process); a slot from before the lock by its pid."""
        slot = self.slot_dir(target)
        pid = int(state.get("pid") or 0)
        if not (protocol.private_dir(slot) / protocol.SUPERVISOR_LOCK).exists():
            return not pid_alive(pid)
        # a killed process reads as gone (its main thread a zombie) a moment before its last thread
        # lets go of its files, the lock too: a recorded pid that is gone gets that moment
        deadline = time.monotonic() + (2.0 if not pid_alive(pid) else 0.0)
        while protocol.supervisor_running(slot):
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)
        return True

    def revive(self, target: Target) -> dict[str, Any] | None:
        """Start a supervisor again for ``target`` if its last one died without being stopped (it did
        not record ``stopped``); the new one adopts the workers still serving, or relaunches the version
        that was current (``resources.serving.supervisor``, "Adoption") and says so in a signed
        ``supervisor_restarted`` event. Returns ``{slot, previous_pid, pid}``, or None when there was
        nothing to revive. DeployError (one line) if it could not be started."""
        state = self._state(target)
        if not state or state.get("stopped") or not self._supervisor_gone(target, state):
            return None
        with self._locked(f"{target.slot}.lock"):
            state = self._state(target)  # a deploy may have started one meanwhile
            if not state or state.get("stopped") or not self._supervisor_gone(target, state):
                return None
            self._start_supervisor(target)
        return {"slot": target.slot, "previous_pid": state.get("pid"), "pid": (self._state(target) or {}).get("pid")}

    def _call(self, slot: Path, path: str, data: dict | None = None, timeout: float = 30) -> Any:
        try:
            return protocol.control_call(slot, path, data, timeout=timeout)
        except ControlError as err:
            raise DeployError(f"{slot.name}: {err}") from None

    # -- backend calls --------------------------------------------------------------------
    def _launch(self, target: Target, release: Release, promote_within: float) -> Candidate:
        spec = {**self._launch_spec(target, release), "promote_within": promote_within}
        with self._locked(f"{target.slot}.lock"):
            slot = self._ensure_supervisor(target)
            group = self._call(slot, "/launch", spec)
        return Candidate(target=target, release=release, handle={"slot": slot, "group": group["id"]})

    def _launch_spec(self, target: Target, release: Release) -> dict[str, Any]:
        """The narrow launch spec (``protocol.validate_launch_spec``): which release to run, never a
        command, environment or working directory."""
        cfg = dict(release.config)
        spec: dict[str, Any] = {"kind": target.kind, "version": release.version,
                                "artifact": os.path.abspath(release.artifact), "digest": release.digest,
                                "workers": release.workers}
        if target.kind == "endpoint":
            if "log_dir" in cfg:  # the factories' way of saying "no inference log"
                if cfg.pop("log_dir") is not None:
                    raise DeployError(f"{target.slot}: the inference log directory is the deployer's "
                                      "setting; a release only turns the log off (log_dir: None)")
                cfg.setdefault("inference_log", False)
            keys = protocol.KIND_KEYS["endpoint"] + protocol.KIND_OPTIONAL["endpoint"]
            spec.update({k: cfg.pop(k, ENDPOINT_DEFAULTS.get(k)) for k in keys})
        elif target.kind == "app":
            spec.update(entrypoint=cfg.pop("entrypoint", None),
                        calls={str(k).upper(): v for k, v in (cfg.pop("calls", None) or {}).items()})
        else:
            raise DeployError(f"unknown target kind {target.kind!r}")
        if cfg:
            raise DeployError(f"{target.slot}: release config key '{sorted(cfg)[0]}' is not something a "
                              f"{target.kind} release can set (known: "
                              f"{', '.join(protocol.KIND_KEYS[target.kind] + protocol.KIND_OPTIONAL[target.kind])})")
        return spec

    def _group(self, candidate: Candidate) -> dict[str, Any] | None:
        try:
            status = self._call(candidate.handle["slot"], "/status")
        except DeployError:
            return None
        return next((g for g in status["groups"] if g["id"] == candidate.handle["group"]), None)

    def _candidate_failure(self, candidate: Candidate) -> str | None:
        g = self._group(candidate)
        if g is None:
            return "its supervisor no longer answers"
        workers = [i for i, (r, c) in enumerate(zip(g.get("refused") or [], g["exit_codes"]))
                   if r or c == protocol.EXIT_ARTIFACT_REFUSED]  # the supervisor marks it on its next tick
        if workers:
            return (f"its artifact does not match the digest {g.get('digest')} (worker(s) {workers} refused it, "
                    f"exit {protocol.EXIT_ARTIFACT_REFUSED}); log: {_one_line(log_tail(Path(g['log']), 600))}")
        if g["state"] == "failed" or any(c is not None for c in g["exit_codes"]):
            return f"exit codes {g['exit_codes']}; log: {_one_line(log_tail(Path(g['log']), 1200))}"
        return None

    def _candidate_health(self, candidate: Candidate) -> list[dict[str, Any] | None]:
        try:
            return list(self._call(candidate.handle["slot"], "/probe", {"group": candidate.handle["group"]},
                                   timeout=10)["workers"])
        except DeployError:
            return []

    def _cutover(self, candidate: Candidate, fencing_token: int | None = None,
                 fallback: Release | None = None) -> None:
        data: dict[str, Any] = {"group": candidate.handle["group"],
                                "fallback": self._launch_spec(candidate.target, fallback) if fallback else None}
        if fencing_token is not None:
            data["fencing_token"] = fencing_token
        self._call(candidate.handle["slot"], "/promote", data)

    def _fence(self, target: Target, token: int) -> None:
        slot = self._control(target)
        if slot is None:  # nothing serves here: the supervisor a deploy starts learns the token from its promote
            return
        self._call(slot, "/fence", {"token": token})

    def _discard(self, candidate: Candidate) -> None:
        try:
            self._call(candidate.handle["slot"], "/discard", {"group": candidate.handle["group"]})
        except DeployError:
            pass

    def _worker_metrics(self, target: Target) -> list[str]:
        slot = self._control(target)
        if not slot:
            return []
        try:
            return list(self._call(slot, "/metrics", {})["workers"])
        except DeployError:
            return []

    # -- who may call ---------------------------------------------------------------------
    def _private(self, target: Target) -> Path:
        slot = self.slot_dir(target)
        try:
            protocol.ensure_owner_only_dir(slot)
            protocol.ensure_owner_only_dir(protocol.private_dir(slot))
        except ControlError as err:
            raise DeployError(f"{target.slot}: {err}") from None
        return protocol.private_dir(slot)

    def _publish_grants(self, target: Target, table: dict[str, Any]) -> None:
        """``<slot>/private/access.json``, replaced atomically (0600): each worker stats it per request."""
        atomic_write(self._private(target) / access.TABLE_FILE, json.dumps(table, sort_keys=True).encode())

    def _publish_credentials(self, target: Target, credentials: dict[str, str]) -> None:
        """``<slot>/private/credentials/<NAME>`` (0700 dir, 0600 files, each replaced atomically); what
        is not in ``credentials`` is removed."""
        cdir = self._private(target) / access.CREDENTIALS_DIR
        try:
            protocol.ensure_owner_only_dir(cdir)
        except ControlError as err:
            raise DeployError(f"{target.slot}: {err}") from None
        for name, token in credentials.items():
            atomic_write(cdir / name, token.encode() + b"\n")
        for old in os.listdir(cdir):
            if old not in credentials and not old.startswith("."):
                try:
                    os.unlink(cdir / old)
                except FileNotFoundError:
                    pass

    def _held_credentials(self, target: Target) -> dict[str, str] | None:
        cdir = self._private(target) / access.CREDENTIALS_DIR
        try:
            names = [n for n in os.listdir(cdir) if not n.startswith(".")]
        except FileNotFoundError:
            return None
        held = {}
        for name in names:
            try:
                held[name] = access.token_sha256((cdir / name).read_text().strip())
            except (OSError, UnicodeDecodeError):
                continue  # unreadable is not held: the platform hands it over again
        return held

    def _probe_credential(self, target: Target) -> str | None:
        secret = self.slot_secret(target)
        if secret is None:
            return None
        try:
            return access.backend_token(secret, target.name, target.env, "probe")
        except ValueError:  # a name no credential can carry: such an endpoint is never launched
            return None

    # -- signed events --------------------------------------------------------------------
    def slot_secret(self, target: Target) -> bytes | None:
        """The slot's secret (checked: a 0600 regular file we own), or None if it has none (yet)."""
        try:
            return protocol.read_secret(self.slot_dir(target))
        except ControlError:
            return None

    def read_events(self, target: Target, offset: int) -> tuple[list[dict[str, Any]], int, int]:
        """The supervisor events of ``target`` after byte ``offset`` of its ``events.jsonl`` whose
        signature verifies under the slot's secret: (events, new offset, lines refused).

        Only complete lines are read (a half-written last line waits for the next call); a forged,
        altered or unsigned line is refused and counted, never returned. Without a secret every line
        is refused. A file shorter than ``offset`` (replaced by a new run dir) is read from its start;
        event ids tell a line already relayed."""
        path = self.slot_dir(target) / "events.jsonl"
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < offset:
                    offset = 0
                fh.seek(offset)
                data = fh.read(8 * 1024 * 1024)
        except FileNotFoundError:
            return [], offset, 0
        end = data.rfind(b"\n")
        if end < 0:
            return [], offset, 0
        secret = self.slot_secret(target)
        events, refused = [], 0
        for raw in data[: end + 1].split(b"\n")[:-1]:
            event = protocol.verify_event(secret, raw) if secret is not None else None
            if event is None:
                refused += 1
            else:
                events.append(event)
        return events, offset + end + 1, refused

    def _stop(self, target: Target) -> None:
        state = self._state(target)
        if not state:
            return
        pid = int(state["pid"])
        slot = self._control(target)
        if slot:
            try:
                protocol.control_call(slot, "/stop", {}, timeout=5)
            except ControlError:
                pass
        deadline = time.monotonic() + 40
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(self.poll_seconds)
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        with self._locked(f"{target.slot}.lock"):  # a revive (sensor, status) waits, then finds it stopped
            state = self._state(target) or state
            inode = state.get("stable_inode")
            inode = inode if isinstance(inode, int) and not isinstance(inode, bool) else None
            if not state.get("stopped") and self._supervisor_gone(target, state):
                # its supervisor died and nobody adopted its workers (they outlive it): record the stop first,
                # so that nothing revives the slot, then stop what still holds the stable socket
                atomic_write(self.slot_dir(target) / "state.json",
                             json.dumps({**state, "stopped": True}, indent=2, sort_keys=True).encode())
                if inode is not None:
                    stop_socket_holders(inode, keep=set(), wait=40, until_exit=True)
            elif inode is not None:
                # stopped; a worker still draining from an earlier switch lets go of the stable socket now, so
                # that nothing of ours answers at the address once the stop returns
                stop_socket_holders(inode, keep=set(), wait=40)

    def status(self, target: Target) -> DeploymentStatus:
        """What serves, asked at the stable address, but only believed while this slot's supervisor runs:
        it holds the stable port for its whole life, so whatever answers is its worker. With no supervisor
        running the port is free, and anything that answers there (another local user's process claiming
        an approved version and digest) is reported as ``foreign``, never as serving."""
        st = super().status(target)
        sup = st.detail.get("supervisor")
        if sup is None and st.healthy:
            detail = {**st.detail, "server": None, "foreign": st.detail.get("server")}
            return DeploymentStatus(target=target, address=st.address, serving_version=None, healthy=False,
                                    detail=detail, serving_digest=None, problems=[
                                        f"no supervisor runs for {target.slot}, yet something answers at "
                                        f"{st.address}: not ours, not serving"])
        if sup and sup.get("state") == "crashloop":
            st.problems.insert(0, f"version {sup.get('version')} was stopped after crash-looping "
                                  f"({sup.get('restarts')} restarts)" + ("" if st.healthy else "; nothing serves"))
        elif sup and sup.get("state") == "current" and not st.healthy:
            st.problems.insert(0, f"version {sup.get('version')} is current but no worker answers at {st.address}")
        elif sup and isinstance(sup.get("refusing"), dict) and sup["refusing"].get("cause") != "not_deployed" \
                and not st.healthy:  # a crash-loop stop a restarted supervisor keeps, a relaunch, ...
            st.problems.insert(0, str(sup["refusing"].get("error")))
        return st

    def _backend_detail(self, target: Target) -> dict[str, Any]:
        slot = self._control(target)
        if not slot:
            return {"supervisor": None}
        try:
            st = self._call(slot, "/status")
        except DeployError:
            return {"supervisor": None}
        cur = st.get("current") or {}
        return {"supervisor": {"pid": st["pid"], "state": cur.get("state"), "version": cur.get("version"),
                               "digest": cur.get("digest"), "pids": cur.get("pids"),
                               "restarts": cur.get("restarts"), "refused": cur.get("refused"),
                               "ready": cur.get("ready"), "started_at": cur.get("started_at"),
                               "refusing": st.get("refusing")}}

    # -- whole-machine helpers ------------------------------------------------------------
    def slots(self) -> list[str]:
        return sorted(p.parent.name for p in self.run_dir.glob("*/state.json"))

    def _not_stopped(self) -> list[tuple[str, Target]]:
        running = []  # a slot whose supervisor died without being stopped counts: its workers may serve on
        for slot in self.slots():
            name, env = slot.rsplit(".", 1)
            t = Target(name, env)
            st = self._state(t)
            if st and not st.get("stopped"):
                running.append((slot, t))
        return running

    def live_slots(self) -> list[str]:
        """The slots not stopped (``onepath down`` stops them): their workers may still serve, and log."""
        return [slot for slot, _ in self._not_stopped()]

    def stop_all(self) -> list[str]:
        """Stop every supervisor under run_dir (in parallel); returns the slots that were running."""
        from concurrent.futures import ThreadPoolExecutor

        running = self._not_stopped()
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(running)))) as pool:
            list(pool.map(lambda item: self._stop(item[1]), running))
        return [slot for slot, _ in running]


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


def settings_config(settings: Any) -> dict[str, Any]:
    """The local backend's configuration from onepath's ``Settings``: the fields of ``LocalDeployerResource``
    (platform_defs.wiring builds the resource from it, ``onepath inventory`` the deployer, without Dagster)."""
    return {"run_dir": str(settings.run_dir), "host": settings.host, "port_base": settings.port_base,
            "inference_log_dir": str(settings.inference_log_dir), "inference_log_url": settings.inference_log_url,
            "artifact_roots": [str(settings.releases_dir / "models"), str(settings.releases_dir)]}


def from_config(run_dir: str, host: str, port_base: int, inference_log_dir: str,
                artifact_roots: Sequence[str], inference_log_url: str | None = None) -> LocalProcessDeployer:
    """The deployer a ``settings_config`` (or a ``LocalDeployerResource``'s fields) describes."""
    return LocalProcessDeployer(Path(run_dir), host=host, port_base=port_base,
                                inference_log_dir=Path(inference_log_dir),
                                artifact_roots=[Path(r) for r in artifact_roots], inference_log_url=inference_log_url)
