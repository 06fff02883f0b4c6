"""What the deployer, the supervisor and the workers agree on (standard library only: the supervisor
and the workers import it at start).

The control channel. A supervisor is driven only over the Unix socket ``<slot>/private/control.sock``
(the ``private`` directory is 0700, the slot directory too), and every request carries the slot's
secret (``<slot>/private/secret``: 32 random bytes as hex, a 0600 regular file owned by the
platform's user) in the ``X-Onepath-Secret`` header. The supervisor answers only a peer whose
``SO_PEERCRED`` uid is its own *and* that shows the secret; anything else gets 401/403 and changes
nothing. What this rests on: the kernel's file permissions (another local user cannot reach the
socket or read the secret) and the secret (a process of the same user that was not given the slot
directory cannot guess it). root can do anything: it is not in the threat model.

Events. Each line of ``<slot>/events.jsonl`` carries ``sig``, the HMAC-SHA256 under the slot's
secret of the canonical JSON of the event without ``sig`` (``sort_keys``, no spaces); a reader
verifies it with ``verify_event`` and refuses any line that does not verify.

A worker that refuses its artifact (the bytes on disk do not hash to the release's digest) exits with
``EXIT_ARTIFACT_REFUSED``; the supervisor does not restart it as a crash, and says why.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import re
import secrets as _secrets
import socket
import stat
from pathlib import Path
from typing import Any

from resources.serving.exit_codes import EXIT_ARTIFACT_REFUSED  # noqa: F401 - part of the protocol

PRIVATE_DIR = "private"
CONTROL_SOCKET = "control.sock"
SECRET_FILE = "secret"
SECRET_HEADER = "X-Onepath-Secret"
SECRET_BYTES = 32
MAX_BODY = 64 * 1024  # a control request is a few hundred bytes; anything bigger is refused
# A worker serves only its private socket until the supervisor POSTs this there (never reachable on the
# stable TCP socket): then it starts accepting on the stable one too (``resources.serving.child``).
ACTIVATE_ROUTE = "/-/onepath/activate"
# A model worker's process facts (pid, run_id, loaded_at, native_threads, version, digest): answered only
# to the supervisor's own credential on the private Unix socket (``resources.serving.access``)
WORKER_ROUTE = "/onepath/worker"

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")


def model_thread_env(threads: int = 1) -> dict[str, str]:
    """The environment that sizes a model worker's native thread pools (see the deployer contract in
    ``resources.deployers.base``); read by those libraries when they load, so it must be in the
    worker's environment from its start."""
    n = int(threads)
    if n < 1:
        raise ValueError(f"model_threads must be at least 1, got {n}")
    return {name: str(n) for name in THREAD_VARIABLES}


class ControlError(RuntimeError):
    """A control request failed; the message is one line. ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(" ".join(str(message).split()))
        self.status = status


# -- the private directory and the secret ---------------------------------------------------------
def private_dir(slot_dir: Path | str) -> Path:
    return Path(slot_dir) / PRIVATE_DIR


def ensure_owner_only_dir(path: Path) -> None:
    """Create ``path`` (0700) or check an existing one: a directory we own, not a symlink; its mode
    is set to 0700. Raises ControlError naming what is wrong."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"{path} is not a directory (a symlink or a file is never trusted)")
    if st.st_uid != os.getuid():
        raise ControlError(f"{path} is owned by uid {st.st_uid}, not by us (uid {os.getuid()})")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def _check_secret_file(path: Path, fd: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ControlError(f"{path} is not a regular file: refusing to use it as the slot's secret")
    if st.st_uid != os.getuid():
        raise ControlError(f"{path} is owned by uid {st.st_uid}, not by us (uid {os.getuid()}): refusing it")
    if stat.S_IMODE(st.st_mode) != 0o600:
        raise ControlError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0600: refusing it")
    raw = os.read(fd, 4 * SECRET_BYTES).decode("ascii", "replace").strip()
    try:
        secret = bytes.fromhex(raw)
    except ValueError:
        raise ControlError(f"{path} does not hold a hex secret: refusing it") from None
    if len(secret) != SECRET_BYTES:
        raise ControlError(f"{path} holds {len(secret)} bytes, not {SECRET_BYTES}: refusing it")
    return secret


def read_secret(slot_dir: Path | str) -> bytes:
    """The slot's secret, if its file is a 0600 regular file we own (not a symlink); else ControlError."""
    path = private_dir(slot_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise ControlError(f"cannot read the slot's secret {path}: {err.strerror}") from None
    try:
        return _check_secret_file(path, fd)
    finally:
        os.close(fd)


def load_or_create_secret(slot_dir: Path | str) -> bytes:
    """The slot's secret: created (O_EXCL, 0600) on first use, reused only if it passes ``read_secret``'s
    checks. The private directory is created 0700 (or checked) first."""
    pdir = private_dir(slot_dir)
    ensure_owner_only_dir(pdir)
    path = pdir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_secret(slot_dir)
    try:
        secret = _secrets.token_bytes(SECRET_BYTES)
        os.write(fd, secret.hex().encode() + b"\n")
        os.fchmod(fd, 0o600)  # whatever the umask
    finally:
        os.close(fd)
    return secret


def header_value(secret: bytes) -> str:
    return secret.hex()


# -- signed events ----------------------------------------------------------------------------------
def canonical(event: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in event.items() if k != "sig"}, sort_keys=True,
                      separators=(",", ":")).encode()


def sign_event(secret: bytes, event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its ``sig``."""
    return {**event, "sig": hmac.new(secret, canonical(event), hashlib.sha256).hexdigest()}


def verify_event(secret: bytes, line: bytes) -> dict[str, Any] | None:
    """The event on ``line`` if it is a JSON object whose ``sig`` verifies under ``secret``; else None
    (not JSON, no signature, a forged or altered line)."""
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("sig"), str):
        return None
    want = hmac.new(secret, canonical(event), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, event["sig"]):
        return None
    return {k: v for k, v in event.items() if k != "sig"}


# -- HTTP over a Unix socket -------------------------------------------------------------------------
def _via_dir_fd(sock: socket.socket, path: str, op: str) -> None:
    """``sock.bind(path)`` or ``sock.connect(path)``; a path longer than a socket address holds (108
    bytes) goes through its directory's /proc/self/fd link, so deep run dirs work too."""
    if len(os.fsencode(path)) < 100:
        getattr(sock, op)(path)
        return
    head, name = os.path.split(path)
    fd = os.open(head, os.O_PATH | os.O_DIRECTORY)
    try:
        getattr(sock, op)(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


def bind_unix(sock: socket.socket, path: str) -> None:
    _via_dir_fd(sock, path, "bind")


def connect_unix(sock: socket.socket, path: str) -> None:
    _via_dir_fd(sock, path, "connect")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            connect_unix(sock, self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def unix_get(path: str, route: str, timeout: float = 1.0, method: str = "GET",
             headers: dict[str, str] | None = None) -> tuple[int, bytes] | None:
    """GET (or ``method``, without a body) ``route`` from the HTTP server on the Unix socket ``path``,
    with ``headers`` added (a worker's credential): (status, body), or None if nothing answers in time."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request(method, route, headers={"connection": "close", "content-length": "0", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def control_call(slot_dir: Path | str, route: str, data: dict[str, Any] | None = None, *,
                 secret: bytes | None = None, timeout: float = 30.0) -> Any:
    """Send one control request to the slot's supervisor and return its JSON answer.

    GET when ``data`` is None, else POST with ``data`` as JSON. ``secret`` defaults to the slot's own
    (``read_secret``). Raises ControlError (one line; ``status`` 0 when nothing answers)."""
    sock = str(private_dir(slot_dir) / CONTROL_SOCKET)
    secret = read_secret(slot_dir) if secret is None else secret
    body = json.dumps(data).encode() if data is not None else None
    headers = {SECRET_HEADER: header_value(secret), "connection": "close"}
    if body is not None:
        headers["content-type"] = "application/json"
    conn = UnixHTTPConnection(sock, timeout)
    try:
        conn.request("POST" if body is not None else "GET", route, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as err:
        raise ControlError(f"supervisor {route}: no answer on {sock}: {err}") from None
    finally:
        conn.close()
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = raw.decode("utf-8", "replace")
    if resp.status != 200:
        why = doc.get("error") if isinstance(doc, dict) else doc
        raise ControlError(f"supervisor {route}: {resp.status} {why}", resp.status)
    return doc


# -- the launch spec ---------------------------------------------------------------------------------
VERSION_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
ENTRYPOINT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
CALL_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
CALL_URL_RE = re.compile(r"http://127\.0\.0\.1:([0-9]{1,5})")
COMMON_KEYS = ("kind", "version", "artifact", "digest", "workers")
# optional: seconds within which the candidate must be promoted, else the supervisor discards it by
# itself (the deployer that launched it may have been killed mid-deploy); absent: no deadline
OPTIONAL_KEYS = ("promote_within",)
KIND_KEYS = {
    "endpoint": ("model_name", "pii_columns", "max_batch", "model_threads", "inference_log"),
    "app": ("entrypoint", "calls"),
}
# optional per kind, so that a state.json written before the key existed still relaunches: the record
# fields outside the signature an endpoint logs (default none)
KIND_OPTIONAL = {"endpoint": ("pass_through",), "app": ()}
PASS_THROUGH_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_PASS_THROUGH = 64


class SpecError(ValueError):
    """A launch spec the supervisor refuses (one line, naming the key)."""


def _int(spec: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = spec[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpecError(f"launch: '{key}' must be an integer within {lo}..{hi}, got {v!r}")
    return v


def validate_launch_spec(spec: Any, artifact_roots: list[str]) -> dict[str, Any]:
    """The launch spec, checked: exactly the keys of its kind, each of its type; ``artifact`` resolved
    (realpath) and inside one of ``artifact_roots``. Raises SpecError naming the first wrong key."""
    if not isinstance(spec, dict):
        raise SpecError("launch: the spec must be a JSON object")
    kind = spec.get("kind")
    if kind not in KIND_KEYS:
        raise SpecError(f"launch: 'kind' must be 'endpoint' or 'app', got {kind!r}")
    allowed = set(COMMON_KEYS) | set(KIND_KEYS[kind])
    optional = set(OPTIONAL_KEYS) | set(KIND_OPTIONAL[kind])
    for key in spec:
        if key not in allowed and key not in optional:
            raise SpecError(f"launch: unknown key '{key}' (a {kind} spec has only "
                            f"{', '.join(sorted(allowed | optional))})")
    for key in sorted(allowed):
        if key not in spec:
            raise SpecError(f"launch: missing key '{key}'")
    version = spec["version"]
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise SpecError(f"launch: 'version' must match [A-Za-z0-9._-]{{1,64}}, got {version!r}")
    artifact = spec["artifact"]
    if not isinstance(artifact, str) or not os.path.isabs(artifact):
        raise SpecError(f"launch: 'artifact' must be an absolute path, got {artifact!r}")
    real = os.path.realpath(artifact)
    roots = [os.path.realpath(r) for r in artifact_roots]
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise SpecError(f"launch: 'artifact' {artifact} is outside the artifact roots ({', '.join(roots) or 'none'})")
    if not os.path.isdir(real):
        raise SpecError(f"launch: 'artifact' {artifact} is not a directory")
    digest = spec["digest"]
    if kind == "endpoint" and digest is None:
        raise SpecError("launch: an endpoint's 'digest' is required (the worker serves only bytes that hash to it)")
    if digest is not None and (not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest)):
        raise SpecError(f"launch: 'digest' must be 'sha256:<64 hex>' or null, got {digest!r}")
    out: dict[str, Any] = {"kind": kind, "version": version, "artifact": real, "digest": digest,
                           "workers": _int(spec, "workers", 1, 64)}
    within = spec.get("promote_within")
    if within is not None:
        if isinstance(within, bool) or not isinstance(within, (int, float)) or not 0 < within <= 86400:
            raise SpecError(f"launch: 'promote_within' must be a number of seconds within 0..86400, got {within!r}")
        out["promote_within"] = float(within)
    if kind == "endpoint":
        name = spec["model_name"]
        if not isinstance(name, str) or not VERSION_RE.fullmatch(name):
            raise SpecError(f"launch: 'model_name' must match [A-Za-z0-9._-]{{1,64}}, got {name!r}")
        pii = spec["pii_columns"]
        if not isinstance(pii, list) or not all(isinstance(c, str) for c in pii):
            raise SpecError("launch: 'pii_columns' must be a list of strings")
        if not isinstance(spec["inference_log"], bool):
            raise SpecError(f"launch: 'inference_log' must be true or false, got {spec['inference_log']!r}")
        passed = spec.get("pass_through", [])
        if not isinstance(passed, list) or len(passed) > MAX_PASS_THROUGH:
            raise SpecError(f"launch: 'pass_through' must be a list of at most {MAX_PASS_THROUGH} column names")
        for n, col in enumerate(passed):
            if not isinstance(col, str) or not PASS_THROUGH_RE.fullmatch(col):
                raise SpecError(f"launch: 'pass_through.{n}' must match [A-Za-z_][A-Za-z0-9_.-]{{0,63}}, got {col!r}")
        if len(set(passed)) != len(passed):
            raise SpecError("launch: 'pass_through' names a column twice")
        out.update(model_name=name, pii_columns=list(pii), max_batch=_int(spec, "max_batch", 1, 100_000),
                   model_threads=_int(spec, "model_threads", 1, 64), inference_log=spec["inference_log"],
                   pass_through=list(passed))
    else:
        entry = spec["entrypoint"]
        if not isinstance(entry, str) or len(entry) > 200 or not ENTRYPOINT_RE.fullmatch(entry):
            raise SpecError(f"launch: 'entrypoint' must be module:attribute, got {entry!r}")
        top = entry.split(":")[0].split(".")[0]
        if not (os.path.isdir(os.path.join(real, top)) or os.path.isfile(os.path.join(real, top + ".py"))):
            # only the release's own code: not a module from elsewhere on the path
            raise SpecError(f"launch: 'entrypoint' module {top!r} is not in the artifact {real}")
        calls = spec["calls"]
        if not isinstance(calls, dict):
            raise SpecError("launch: 'calls' must be an object {ENDPOINT_NAME: 'http://127.0.0.1:<port>'}")
        for name, url in calls.items():
            if not CALL_NAME_RE.fullmatch(name):
                raise SpecError(f"launch: 'calls' name {name!r} must match [A-Za-z][A-Za-z0-9_]{{0,63}}")
            m = CALL_URL_RE.fullmatch(url) if isinstance(url, str) else None
            if m is None or not 1 <= int(m.group(1)) <= 65535:
                raise SpecError(f"launch: 'calls' {name} must be http://127.0.0.1:<port>, got {url!r}")
        out.update(entrypoint=entry, calls={n.upper(): u for n, u in calls.items()})
    return out


# -- a worker's listening socket, handed to a new supervisor of its slot ------------------------------
# A worker outlives its supervisor (see ``resources.serving.supervisor``, "Adoption"). It offers the
# slot's stable listening socket on its own handoff socket ``<slot>/private/w-<group>-<i>.fd.sock``
# (in the 0700 private directory, made by the supervisor that started it and inherited as the fd named
# in ``ONEPATH_HANDOFF_FD``): a peer whose SO_PEERCRED uid is ours sends ``HANDOFF_HELLO`` and the
# slot's secret as hex on one line; the worker answers ``ok`` with the socket attached (SCM_RIGHTS),
# or one ``refused: <why>`` line and nothing else. A draining worker (its copy already closed) refuses.
HANDOFF_HELLO = b"onepath-handoff/1"
HANDOFF_SUFFIX = ".fd.sock"
SUPERVISOR_LOCK = "supervisor.lock"


def worker_socket(slot_dir: Path | str, group: str, index: int, *, handoff: bool = False) -> str:
    """The path of worker ``index`` of ``group``'s private health socket (or its handoff socket)."""
    return str(private_dir(slot_dir) / f"w-{group}-{index}{HANDOFF_SUFFIX if handoff else '.sock'}")


def peer_uid(sock: socket.socket) -> int:
    import struct

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)[1]


def offer_listening_socket(listener: socket.socket, secret: bytes, current_fd: Any) -> None:
    """Answer handoff requests on ``listener`` for ever (a worker runs it in a daemon thread).
    ``current_fd()`` is the fd of the stable listening socket to hand over, or None while it may not
    be handed over (draining, closed)."""
    want = HANDOFF_HELLO + b" " + header_value(secret).encode()
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(2.0)
                if peer_uid(conn) != os.getuid():
                    conn.sendall(b"refused: peer uid is not ours\n")
                    continue
                line = b""
                while not line.endswith(b"\n") and len(line) <= 2 * len(want):
                    chunk = conn.recv(256)
                    if not chunk:
                        break
                    line += chunk
                if not hmac.compare_digest(line.strip(), want):
                    conn.sendall(b"refused: missing or wrong slot secret\n")
                    continue
                fd = current_fd()
                if fd is None:
                    conn.sendall(b"refused: this worker no longer holds the listening socket (draining)\n")
                    continue
                socket.send_fds(conn, [b"ok\n"], [fd])
            except OSError:
                continue


def fetch_listening_socket(path: str, secret: bytes, timeout: float = 2.0) -> socket.socket:
    """The listening socket a worker offers on its handoff socket ``path``; ControlError (one line) if
    it does not hand one over."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        connect_unix(sock, path)
        sock.sendall(HANDOFF_HELLO + b" " + header_value(secret).encode() + b"\n")
        msg, fds, _flags, _addr = socket.recv_fds(sock, 256, 1)
    except OSError as err:
        raise ControlError(f"handoff {path}: {err}") from None
    finally:
        sock.close()
    if not msg.startswith(b"ok") or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ControlError(f"handoff {path}: {msg.decode('utf-8', 'replace').strip() or 'no answer'}")
    got = socket.socket(fileno=fds[0])
    got.set_inheritable(False)
    return got


def acquire_supervisor_lock(slot_dir: Path | str) -> int | None:
    """An fd holding the slot's supervisor lock (``flock``, held until the process ends, SIGKILL too),
    or None if another process holds it: one supervisor per slot, whatever state.json says."""
    import fcntl

    fd = os.open(private_dir(slot_dir) / SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def supervisor_running(slot_dir: Path | str) -> bool:
    """Whether a process holds the slot's supervisor lock (a live supervisor, starting or running)."""
    if not (private_dir(slot_dir) / SUPERVISOR_LOCK).exists():
        return False
    fd = acquire_supervisor_lock(slot_dir)
    if fd is None:
        return True
    os.close(fd)  # closing drops the lock
    return False
