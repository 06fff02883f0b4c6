"""Who may call an endpoint: credentials, the endpoint's access table, and the worker's judge
(standard library only: the supervisor, the model workers and app workers import it).

A credential is the text ``op1.<endpoint>.<env>.<grant_id>.<secret>``, sent as ``Authorization:
Bearer <token>``. It is scoped to one endpoint in one environment by its own text, and it is worth
something only while the endpoint's access table lists the sha256 of that exact text under that
grant id. Nothing but the one holder of a secret ever stores more than ``token_sha256(token)``.

Two credentials belong to the backend itself and are never granted by anyone: ``backend_token``
derives them from the slot's secret (``resources.serving.protocol``), ``supervisor`` (routes
version, metrics, worker; accepted only on a worker's private Unix socket) and ``probe`` (route
version; what the deployer sends to the stable address). The supervisor hands the workers their
hashes in the worker config, never the tokens.

The access table is a JSON file the platform writes through the deployer (``publish_grants``)::

    {"version": 1, "endpoint": "credit_scoring", "env": "prod", "generation": 7, "updated_at": "...",
     "grants": [{"id": "a1b2c3d4e5f6", "caller": "app:loan_portal", "routes": ["predict", "version"],
                 "secrets": [{"sha256": "<hex>", "not_after": null}], "revoked": null}]}

``AccessTable.judge`` is on every request's path: it stats the file (inode, mtime_ns, size) and
reloads it when that changed, so a grant, a rotation or a revocation takes effect on the next
request without a redeploy. A missing file means no grants. A file that cannot be read, is not
owner-only, or does not parse keeps the last good table and is reported in ``problems`` (the
worker's ``/health`` turns degraded). A judgement costs a dict lookup, one sha256 and
``hmac.compare_digest`` per listed secret of the grant (one or two).

``credential_header(name)`` is the app side: the token the platform published for the endpoint
``name`` (``$ONEPATH_CREDENTIALS_DIR/<NAME>``), re-read when the file changes, as a header dict.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from datetime import datetime, timezone
from typing import Any, Iterable

from resources.serving.protocol import WORKER_ROUTE

TOKEN_PREFIX = "op1"
NAME_RE = re.compile(r"[a-z][a-z0-9_]{1,62}")
GRANT_ID_RE = re.compile(r"[0-9a-f]{12}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
SECRET_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
BACKEND_WHO = ("supervisor", "probe")
BACKEND_ROUTES = {"supervisor": ("version", "metrics", "worker"), "probe": ("version",)}
BACKEND_CALLERS = {"supervisor": "onepath:supervisor", "probe": "onepath:probe"}
TABLE_FILE = "access.json"
CREDENTIALS_DIR = "credentials"
CREDENTIALS_ENV = "ONEPATH_CREDENTIALS_DIR"

ROUTE_SCOPE = {
    "/predict": "predict", "/invocations": "predict", "/version": "version", "/metrics": "metrics",
    WORKER_ROUTE: "worker",
}
GRANTABLE = ("predict", "version", "metrics")  # "worker" is the supervisor's alone
ANONYMOUS, UNRECOGNISED = "anonymous", "unrecognised"
MAX_GRANTS = 10_000
MAX_SECRETS = 8


# -- tokens --------------------------------------------------------------------------------------
def make_token(endpoint: str, env: str, grant_id: str, secret: str) -> str:
    """The credential text; ValueError (one line, never the secret) for a part of the wrong form."""
    for what, value in (("endpoint", endpoint), ("env", env)):
        if not isinstance(value, str) or not NAME_RE.fullmatch(value):
            raise ValueError(f"a credential's {what} must match ^[a-z][a-z0-9_]{{1,62}}$, got {value!r}")
    if not isinstance(grant_id, str) or not (GRANT_ID_RE.fullmatch(grant_id) or grant_id in BACKEND_WHO):
        raise ValueError(f"a credential's grant id must be 12 lowercase hex digits, got {grant_id!r}")
    if not isinstance(secret, str) or not SECRET_RE.fullmatch(secret):
        raise ValueError("a credential's secret must be 16..128 characters of [A-Za-z0-9_-]")
    return f"{TOKEN_PREFIX}.{endpoint}.{env}.{grant_id}.{secret}"


def parse_token(token: str) -> tuple[str, str, str, str] | None:
    """``(endpoint, env, grant_id, secret)`` of a well-formed credential, else None."""
    if not isinstance(token, str):
        return None
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != TOKEN_PREFIX:
        return None
    _, endpoint, env, grant_id, secret = parts
    if not (NAME_RE.fullmatch(endpoint) and NAME_RE.fullmatch(env) and SECRET_RE.fullmatch(secret)
            and (GRANT_ID_RE.fullmatch(grant_id) or grant_id in BACKEND_WHO)):
        return None
    return endpoint, env, grant_id, secret


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def backend_token(slot_secret: bytes, endpoint: str, env: str, who: str) -> str:
    """The backend's own credential ``who`` (``supervisor`` or ``probe``) for the slot whose secret is
    ``slot_secret``: ``op1.<endpoint>.<env>.<who>.<hmac_sha256(slot_secret, b"onepath-credential:" + who)>``."""
    if who not in BACKEND_WHO:
        raise ValueError(f"a backend credential is one of {', '.join(BACKEND_WHO)}, not {who!r}")
    mac = hmac.new(slot_secret, b"onepath-credential:" + who.encode(), hashlib.sha256).hexdigest()
    return make_token(endpoint, env, who, mac)


def backend_credentials(slot_secret: bytes, endpoint: str, env: str) -> list[dict[str, Any]]:
    """What a worker config holds of the backend's credentials (their hashes, never the tokens)."""
    return [{"id": who, "caller": BACKEND_CALLERS[who],
             "sha256": token_sha256(backend_token(slot_secret, endpoint, env, who)),
             "routes": list(BACKEND_ROUTES[who]), "unix_only": who == "supervisor"} for who in BACKEND_WHO]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- the judge -----------------------------------------------------------------------------------
class Verdict:
    """What the judge says of one request: ``status`` 200, 401 or 403; ``caller`` (a grant's caller,
    ``anonymous`` or ``unrecognised``: the metrics label); ``message`` (never a token or a secret);
    ``credential`` (``missing``/``invalid`` on a 401, else None)."""

    __slots__ = ("status", "caller", "message", "credential")

    def __init__(self, status: int, caller: str, message: str = "", credential: str | None = None):
        self.status, self.caller, self.message, self.credential = status, caller, message, credential

    @property
    def ok(self) -> bool:
        return self.status == 200

    def __repr__(self) -> str:
        return f"Verdict({self.status}, {self.caller!r}, {self.message!r})"


_MISSING = Verdict(401, ANONYMOUS, "this route needs a credential: send 'Authorization: Bearer <token>'",
                   "missing")
_MALFORMED = Verdict(401, UNRECOGNISED, "the credential is not an onepath credential "
                                        "(op1.<endpoint>.<env>.<grant>.<secret>)", "invalid")


class _Grant:
    __slots__ = ("id", "caller", "routes", "secrets", "revoked", "unix_only", "ok", "denied")

    def __init__(self, gid: str, caller: str, routes: Iterable[str], secrets: list[tuple[str, float | None]],
                 revoked: tuple[str, str] | None, unix_only: bool):
        self.id, self.caller = gid, caller
        self.routes = tuple(dict.fromkeys(routes))
        self.secrets = secrets
        self.revoked, self.unix_only = revoked, unix_only
        self.ok = {scope: Verdict(200, caller) for scope in self.routes}  # made once: the hot path allocates none
        granted = ", ".join(self.routes) or "none"
        self.denied = {scope: Verdict(403, caller, f"credential {gid} ({caller}) is not granted the route scope "
                                                   f"'{scope}'; it is granted: {granted}")
                       for scope in ("predict", "version", "metrics", "worker")}


def _when(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where} must be an ISO-8601 time or null")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{where} is not an ISO-8601 time: {value[:40]!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def parse_table(doc: Any, endpoint: str, env: str) -> dict[str, _Grant]:
    """The grants of an access table document, by id; ValueError naming the first wrong field."""
    if not isinstance(doc, dict):
        raise ValueError("the table must be a JSON object")
    if doc.get("version") != 1:
        raise ValueError(f"'version' must be 1, got {doc.get('version')!r}")
    if doc.get("endpoint") != endpoint or doc.get("env") != env:
        raise ValueError(f"the table is for {doc.get('endpoint')!r} {doc.get('env')!r}, this worker serves "
                         f"{endpoint} {env}")
    grants = doc.get("grants")
    if not isinstance(grants, list) or len(grants) > MAX_GRANTS:
        raise ValueError(f"'grants' must be a list of at most {MAX_GRANTS} grants")
    out: dict[str, _Grant] = {}
    for n, g in enumerate(grants):
        where = f"grants.{n}"
        if not isinstance(g, dict):
            raise ValueError(f"{where} must be an object")
        gid = g.get("id")
        if not isinstance(gid, str) or not GRANT_ID_RE.fullmatch(gid):
            raise ValueError(f"{where}.id must be 12 lowercase hex digits")
        if gid in out:
            raise ValueError(f"{where}.id {gid} is listed twice")
        caller = g.get("caller")
        if not isinstance(caller, str) or not 0 < len(caller) <= 128 or not caller.isprintable() \
                or caller in (ANONYMOUS, UNRECOGNISED) or caller.startswith("onepath:"):
            raise ValueError(f"{where}.caller must be a printable name of 1..128 characters (not a reserved one)")
        routes = g.get("routes")
        if not isinstance(routes, list) or not all(isinstance(r, str) and r in GRANTABLE for r in routes):
            raise ValueError(f"{where}.routes must be a list of {', '.join(GRANTABLE)}")
        secrets = g.get("secrets")
        if not isinstance(secrets, list) or not 0 < len(secrets) <= MAX_SECRETS:
            raise ValueError(f"{where}.secrets must list 1..{MAX_SECRETS} secrets")
        parsed = []
        for k, s in enumerate(secrets):
            if not isinstance(s, dict) or not isinstance(s.get("sha256"), str) or not SHA256_RE.fullmatch(s["sha256"]):
                raise ValueError(f"{where}.secrets.{k}.sha256 must be 64 lowercase hex digits")
            parsed.append((s["sha256"], _when(s.get("not_after"), f"{where}.secrets.{k}.not_after")))
        rev = g.get("revoked")
        revoked = None
        if rev is not None:
            if not isinstance(rev, dict) or not isinstance(rev.get("at"), str) or not isinstance(rev.get("why"), str):
                raise ValueError(f"{where}.revoked must be null or {{at, why}}")
            revoked = (rev["at"][:40], " ".join(rev["why"].split())[:200])
        out[gid] = _Grant(gid, caller, routes, parsed, revoked, False)
    return out


class AccessTable:
    """The worker's judge: the endpoint's access table at ``path`` (reloaded when its stat changes)
    plus the backend's credentials from the worker config."""

    def __init__(self, endpoint: str, env: str, path: str | os.PathLike | None,
                 backend: list[dict[str, Any]] | None = None):
        self.endpoint, self.env = endpoint, env
        self.path = os.fspath(path) if path else None
        self.backend: dict[str, _Grant] = {}
        for n, b in enumerate(backend or []):
            who = b.get("id") if isinstance(b, dict) else None
            if who not in BACKEND_WHO or not isinstance(b.get("sha256"), str) or not SHA256_RE.fullmatch(b["sha256"]) \
                    or not isinstance(b.get("routes"), list):
                raise ValueError(f"backend_credentials.{n}: needs id (supervisor|probe), sha256 and routes")
            self.backend[who] = _Grant(who, BACKEND_CALLERS[who], [r for r in b["routes"] if r in ROUTE_SCOPE.values()],
                                       [(b["sha256"], None)], None, bool(b.get("unix_only", True)))
        self.grants: dict[str, _Grant] = dict(self.backend)
        self.generation: Any = None
        self.problem: str | None = None
        self._stat: tuple[int, int, int] | None = None
        self._scope = f"{endpoint} {env}"
        self.refresh()

    @property
    def problems(self) -> list[str]:
        return [self.problem] if self.problem else []

    def refresh(self) -> None:
        """Reload the table if its file changed since the last look (one ``os.stat``)."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stat is not None or self.problem:
                self.grants, self.generation, self.problem, self._stat = dict(self.backend), None, None, None
            return
        except OSError as err:
            self.problem = f"access table {self.path}: cannot stat it: {err.strerror}; the last good table is used"
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._stat:
            return
        self._stat = key
        try:
            self.grants = self._load()
            self.problem = None
        except (OSError, ValueError) as err:
            self.problem = (f"access table {self.path}: {' '.join(str(err).split())[:300]}; "
                            "the last good table is used")

    def _load(self) -> dict[str, _Grant]:
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o022:
                raise ValueError(f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}: only a file "
                                 "of ours that nobody else may write is trusted")
            raw = b""
            while chunk := os.read(fd, 1 << 20):
                raw += chunk
                if len(raw) > 64 << 20:
                    raise ValueError("larger than 64 MiB")
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw)
        except ValueError as err:
            raise ValueError(f"not JSON: {err}") from None
        grants = parse_table(doc, self.endpoint, self.env)
        merged = dict(grants)
        merged.update(self.backend)
        self.generation = doc.get("generation")
        return merged

    def judge(self, headers: Iterable[tuple[bytes, bytes]], route: str, over_unix: bool, now: float) -> Verdict:
        """The verdict on a request for ``route`` (a path; one outside ``ROUTE_SCOPE`` needs any valid
        credential of this endpoint) with ASGI ``headers``; ``over_unix``: it came on the worker's private
        Unix socket; ``now``: the time (``time.time()``)."""
        self.refresh()
        value = None
        for k, v in headers:
            if k == b"authorization":
                value = v
                break
        if value is None or len(value) < 8 or value[:7].lower() != b"bearer ":
            return _MISSING
        try:
            token = value[7:].strip().decode("ascii")
        except UnicodeDecodeError:
            return _MALFORMED
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != TOKEN_PREFIX:
            return _MALFORMED
        _, endpoint, env, gid, _secret = parts
        if endpoint != self.endpoint or env != self.env:
            if not (NAME_RE.fullmatch(endpoint) and NAME_RE.fullmatch(env)):
                return _MALFORMED
            return Verdict(403, UNRECOGNISED, f"this credential is for endpoint {endpoint} env {env}; this is "
                                              f"endpoint {self.endpoint} env {self.env}")
        grant = self.grants.get(gid)
        if grant is None:
            return Verdict(401, UNRECOGNISED, f"no credential of {self._scope} has this grant id", "invalid")
        digest = hashlib.sha256(token.encode()).hexdigest()
        for sha, not_after in grant.secrets:
            if hmac.compare_digest(sha, digest):
                break
        else:
            return Verdict(401, UNRECOGNISED, f"the credential does not match grant {grant.id} of {self._scope}",
                           "invalid")
        if grant.revoked is not None:
            at, why = grant.revoked
            return Verdict(403, grant.caller, f"credential {grant.id} ({grant.caller}) was revoked at {at}: {why}")
        if not_after is not None and now > not_after:
            return Verdict(403, grant.caller, f"this secret of credential {grant.id} ({grant.caller}) was rotated out "
                                              f"at {datetime.fromtimestamp(not_after, timezone.utc).isoformat()}; "
                                              "use the new one")
        if grant.unix_only and not over_unix:
            return Verdict(403, grant.caller, f"the {grant.id} credential is accepted only on the worker's private "
                                              "socket, not over TCP")
        scope = ROUTE_SCOPE.get(route)
        if scope is None:
            return Verdict(200, grant.caller)
        ok = grant.ok.get(scope)
        return ok if ok is not None else grant.denied[scope]


# -- the holder's side ---------------------------------------------------------------------------
class WatchedToken:
    """The credential in the file ``path`` (one line), read again whenever the file's (inode, mtime_ns,
    size) changed, so a rotation reaches a running holder on its next call. Opened without following
    a symlink; a file that holds no onepath credential counts as none. ``__call__`` answers the token
    or None (``default`` while the file cannot be read)."""

    def __init__(self, path: str | os.PathLike, default: str | None = None):
        self.path = os.fspath(path)
        self._sig: tuple[int, int, int] | None = None
        self._token = default

    def __call__(self) -> str | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._token if self._sig is None else None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig == self._sig:
            return self._token
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                text = os.read(fd, 4096).decode("ascii").strip()
            finally:
                os.close(fd)
        except (OSError, UnicodeDecodeError):
            return self._token
        self._sig, self._token = sig, (text if parse_token(text) else None)
        return self._token


_WATCHED: dict[str, WatchedToken] = {}
CREDENTIAL_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def credential_header(name: str) -> dict[str, str]:
    """``{"authorization": "Bearer <token>"}`` for calling the endpoint ``name`` (what the platform
    published for this app in ``$ONEPATH_CREDENTIALS_DIR/<NAME>``, a ``WatchedToken``: a rotation reaches
    a running app on its next request); ``{}`` when there is none."""
    directory = os.environ.get(CREDENTIALS_ENV)
    key = str(name).upper()
    if not directory or not CREDENTIAL_NAME_RE.fullmatch(key):
        return {}
    path = os.path.join(directory, key)
    watched = _WATCHED.get(path)
    if watched is None:
        watched = _WATCHED[path] = WatchedToken(path)
    token = watched()
    return bearer(token) if token else {}
