"""The deployer contract, written as outcomes every backend can meet.

* ``deploy(target, release)`` returns only when the new version answers at the target's stable
  address; otherwise it raises ``DeployError`` and the version that served before still serves
  there. A version that fails to start never takes traffic. (A Kubernetes rolling update with a
  readiness probe, or a SageMaker blue/green update, meets the same outcome.)
* A redeploy at the stable address drops no request. The new version takes traffic only after it
  is healthy; the old one then stops accepting new connections and drains before it stops: it
  finishes the requests it has, answers those still arriving on its open keep-alive connections
  with ``Connection: close`` so the client reconnects (to the new version), and closes a connection
  only once it has stayed idle for a short grace, exiting when none is left or at the drain
  deadline. Clients see neither an error nor a reset (``tests/test_zero_downtime.py``,
  ``bench/redeploy_bench.py``). The local backend does this in ``resources.serving.child``. A
  Kubernetes rolling update meets the same outcome with a readiness probe on the new pods,
  ``maxUnavailable: 0``, and a ``preStop`` hook plus ``terminationGracePeriodSeconds`` that cover
  the old pods' drain; a SageMaker blue/green deployment does it by shifting traffic to the new
  fleet once healthy and keeping the old one through its wait interval.
* A deploy that does not complete leaves nothing of its candidate: the candidate takes no traffic
  before its cutover (the local backend's workers accept on the stable socket only once the
  supervisor activates them at promote), it is discarded on any failure or interruption of
  ``deploy`` (``KeyboardInterrupt``, ``SystemExit``, Dagster's run termination), and the backend
  itself discards a candidate not cut over within the deploy's timeout plus ``promote_margin``
  (a deployer killed mid-deploy).
* ``delete(target)`` stops serving and is idempotent: deleting what is not there is not an error.
* ``status(target)`` reports what really serves, by asking the server at the stable address, also
  after the orchestrator restarts.
* A model worker's native thread pools (OpenMP, OpenBLAS, MKL, Accelerate, numexpr) have the
  release's ``model_threads`` threads (default 1): the workers are the parallelism. A model whose
  prediction is an OpenMP parallel region (HistGradientBoosting, LightGBM, XGBoost) would otherwise
  wait at every barrier for a core held by training or by another worker: beside a training run
  churn's p99 went from 15 ms to 1816 ms (``bench/threads_bench.py``). The local backend sets ``model_thread_env`` in the worker's
  environment; a Kubernetes backend puts the same variables in the container spec.
* ``worker_metrics(target)`` returns the Prometheus text of each worker of the version now current
  (what a bake judges a freshly switched version on); ``[]`` when nothing is current. Workers have no
  address of their own: the backend fetches it through its own authenticated channel (the local
  supervisor over its Unix sockets), so nothing but the stable address listens on the network.
* ``deploy(target, release, fallback=R)``: ``R`` is the only release the backend may restore on its
  own should ``release`` crash-loop (the promotion flow names its governed way back); with none, a
  crash-looping release is stopped. A backend never chooses a way back itself.
* ``deploy(target, release, fencing_token=N)`` and ``fence(target, N)``: whoever deploys holds a
  lease whose token grows with each holder; a cutover carrying a token lower than the highest the
  backend has seen is refused (``DeployError``) and changes nothing, so a deployer that lost its
  lease cannot overwrite the one that holds it. The local backend keeps the highest token in its
  supervisor's ``state.json``.
* Every route of an endpoint but ``/health`` needs a credential (``resources.serving.access``).
  ``publish_grants(target, table)`` makes an access table what an endpoint's workers judge callers by
  from their next request on (before the first deploy too, never restarting anything; the local
  backend writes ``<slot>/private/access.json``, owner-only, atomically). ``publish_credentials(target,
  {NAME: token})`` gives an app release its tokens where only its workers read them (local:
  ``<slot>/private/credentials/<NAME>``, 0600; names not given are removed) and never anywhere else.
  ``probe_credential(target)`` is the backend's own ``probe`` token (route version only, derived from
  the slot's secret), which ``status`` and ``deploy`` send to the stable address.
* A release config key ``pass_through`` (column names) is what an endpoint's inference log keeps of
  a record outside the model's signature (never a PII column); every other field is dropped and counted.
* A release with a ``digest`` is served only if its artifact's bytes hash to it: a worker that finds
  otherwise refuses to serve, and a deploy of it fails naming the mismatch (the previous version
  keeps serving).

The base class owns the lifecycle (launch a candidate beside the current version, wait for its
health, cut over, verify at the stable address, discard on failure). A backend implements only its
calls: ``_address``, ``_launch``, ``_candidate_failure``, ``_candidate_health``, ``_cutover``,
``_fence``, ``_discard``, ``_stop``, ``_worker_metrics`` (and, to serve credentials,
``_publish_grants``, ``_publish_credentials``, ``_held_credentials``, ``_probe_credential``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


# one definition, in the module the supervisor (standard library only) can import
from resources.serving.access import bearer
from resources.serving.protocol import THREAD_VARIABLES, model_thread_env  # noqa: F401  (re-exported)


class DeployError(RuntimeError):
    """A deploy did not complete. The previous version (if any) is still serving."""


@dataclass(frozen=True)
class Target:
    """Where something is served: one endpoint or app release in one environment."""

    name: str
    env: str
    kind: str = "endpoint"  # endpoint | app
    port: int | None = None  # fixed stable port, if declared

    @property
    def slot(self) -> str:
        return f"{self.name}.{self.env}"


@dataclass(frozen=True)
class Release:
    """What to serve. ``artifact`` is a local directory (model files, or an app build); ``digest`` is
    the content digest (``sha256:<hex>``) the server must find in it before it serves a byte of it."""

    version: str
    artifact: str
    config: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    digest: str | None = None


@dataclass
class DeploymentStatus:
    target: Target
    address: str | None
    serving_version: str | None
    healthy: bool
    detail: dict[str, Any] = field(default_factory=dict)
    serving_digest: str | None = None  # the content digest the server reports it loaded (GET /version)
    # What is wrong here, in words: what the server says of itself in /health (an inference log it cannot
    # write, a model that raises on every request) and what the backend knows (stopped after a crash
    # loop). Something that answers with problems is degraded; nothing answering with problems is down.
    problems: list[str] = field(default_factory=list)

    @property
    def health(self) -> str:
        """``healthy``, ``degraded`` (serving, with problems), ``down`` or ``not deployed``."""
        if self.healthy:
            return "degraded" if self.problems else "healthy"
        return "down" if self.address or self.problems else "not deployed"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = asdict(self.target)
        return d


@dataclass
class Candidate:
    """A launched version that does not yet count as serving."""

    target: Target
    release: Release
    handle: Any


def serving_version(status: "DeploymentStatus") -> str | None:
    """The version an environment serves, or None when nothing does.

    A backend that reports its current release (the local supervisor's ``current`` group) is believed
    first: right after a cutover the draining version may still answer a probe or two on the shared
    socket, and a server too busy to answer a probe in time still serves. Otherwise, what answered."""
    sup = status.detail.get("supervisor") or {}
    if sup.get("state") == "current" and sup.get("version"):
        return str(sup["version"])
    return status.serving_version if status.healthy else None


def server_problems(seen: dict[str, Any] | None) -> list[str]:
    """The problems a server's /health document lists (``{"status": "degraded", "problems": [...]}``)."""
    health = (seen or {}).get("health")
    if not isinstance(health, dict):
        return []
    listed = [str(p) for p in health.get("problems") or [] if str(p).strip()]
    if health.get("status") not in (None, "ok") and not listed:
        listed = [f"the server reports status {health.get('status')!r}"]
    return listed


def http_json(url: str, timeout: float = 2.0, data: dict | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"content-type": "application/json", "connection": "close",
                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode("utf-8", "replace")


def _auth(credential: str | None) -> dict[str, str]:
    return bearer(credential) if credential else {}


def probe(address: str, timeout: float = 1.0, credential: str | None = None) -> dict[str, Any] | None:
    """What answers at ``address``: its /version document with its /health one (both asked with
    ``credential``, the backend's ``probe`` token for an endpoint: see ``Deployer.probe_credential``;
    an endpoint tells an anonymous caller only ok/degraded), or None if nothing healthy answers or
    /version is refused."""
    try:
        code, health = http_json(address + "/health", timeout, headers=_auth(credential))
        if code != 200:
            return None
        code, version = http_json(address + "/version", timeout, headers=_auth(credential))
        if code != 200 or not isinstance(version, dict):
            return None
        return {**version, "health": health} if isinstance(health, dict) else version
    except (OSError, ValueError):
        return None


async def _probe_async(address: str, timeout: float, health: bool = True,
                       credential: str | Callable[[], str | None] | None = None) -> dict[str, Any] | None:
    """``probe`` over one keep-alive connection with asyncio: GET /health (unless ``health`` is off),
    then GET /version, both with ``credential`` (a callable is called once the connection is open: a
    credential is read only for a server that accepts one)."""
    import asyncio
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    auth = ""

    async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, bytes, bool]:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        keep = lines[0].startswith("HTTP/1.1") and headers.get("connection", "").lower() != "close"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    return status, body, keep
                body += chunk[:-2]
        if "content-length" in headers:
            return status, await reader.readexactly(int(headers["content-length"])), keep
        return status, await reader.read(), False  # body ends with the connection

    async def run() -> dict[str, Any] | None:
        nonlocal auth
        reader, writer = await asyncio.open_connection(host, port)
        try:
            token = credential() if callable(credential) else credential
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            health_doc = None
            if health:
                status, body, keep = await get(reader, writer, "/health")
                if status != 200:
                    return None
                try:
                    health_doc = json.loads(body)
                except ValueError:
                    health_doc = None
                if not keep:  # the server closed this connection: ask /version on a new one
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
            status, body, _ = await get(reader, writer, "/version")
            doc = json.loads(body) if status == 200 else None
            if not isinstance(doc, dict):
                return None
            return {**doc, "health": health_doc} if isinstance(health_doc, dict) else doc
        finally:
            writer.close()

    try:
        async with asyncio.timeout(timeout):  # not wait_for: that wraps every probe in a task of its own
            return await run()
    except (OSError, ValueError, IndexError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None


def _refusing(addresses: list[str], timeout: float, batch: int) -> set[str]:
    """The addresses (an IP and a port; a host name is not tried) where nothing accepts a TCP connection within
    ``timeout``: ``batch`` non-blocking connects at a time, waited on together, each socket closed at once.

    Plain sockets, not the event loop: asyncio's connection costs ~90 us of CPU per address even when it is
    refused, and an inventory's addresses are mostly closed when most endpoints are down (bench/
    inventory_bench.py: 2,000 addresses, 10 answering). What accepts is probed by ``_probe_async`` as before."""
    import errno
    import selectors
    import socket
    from urllib.parse import urlsplit

    refusing: set[str] = set()
    for i in range(0, len(addresses), batch):
        sel = selectors.DefaultSelector()
        pending: dict[str, socket.socket] = {}
        try:
            for a in addresses[i:i + batch]:
                try:
                    parts = urlsplit(a)
                    host, port = parts.hostname or "127.0.0.1", parts.port or 80
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    socket.inet_pton(family, host)
                    sock = socket.socket(family, socket.SOCK_STREAM)
                except (OSError, ValueError):
                    continue  # a host name, or no socket to spare: left to _probe_async
                sock.setblocking(False)
                code = sock.connect_ex((host, port))
                if code in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                    sel.register(sock, selectors.EVENT_WRITE, a)
                    pending[a] = sock
                    continue
                sock.close()
                if code != 0:
                    refusing.add(a)
            deadline = time.monotonic() + timeout
            while pending and (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    sock, a = key.fileobj, key.data
                    sel.unregister(sock)
                    del pending[a]
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                        refusing.add(a)
                    sock.close()
            refusing.update(pending)  # nothing accepted within the timeout
        finally:
            for sock in pending.values():
                sock.close()
            sel.close()
    return refusing


def probe_many(addresses: list[str], timeout: float = 1.0, concurrency: int = 256,
               health: bool = True, credentials: dict[str, str | None] | Callable[[str], str | None] | None = None,
               ) -> dict[str, dict[str, Any] | None]:
    """``probe`` every address at once (asyncio on uvloop, bounded concurrency); each gets ``timeout``
    and its credential from ``credentials``: ``{address: token}`` (none for an address not in it), or
    ``credential(address)``, called only once a server accepted the connection (on the probe's thread):
    an inventory of 2,000 addresses of which 10 answer reads 10 slot secrets, not 2,000.

    One event loop instead of a thread per request: thousands of addresses cost one process's worth
    of sockets, not a thread pool's queueing; an address where nothing accepts a connection is told
    apart first, without the loop (``_refusing``). ``health=False`` asks only /version: for a survey
    (the inventory) a server that answers which version it serves is up; deploys keep both."""
    import asyncio

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvloop is optional; asyncio's loop is slower, not wrong
        runner = asyncio.run

    creds = credentials or {}

    def credential_of(a: str) -> str | Callable[[], str | None] | None:
        return (lambda: creds(a)) if callable(creds) else creds.get(a)

    async def all_of() -> dict[str, dict[str, Any] | None]:
        # ``concurrency`` workers taking the next address, not a task per address waiting on a Semaphore: its
        # wake-up walks every waiter (Python 3.11), which cost 0.2 s of CPU at 2,000 addresses
        seen: dict[str, dict[str, Any] | None] = {}

        async def worker() -> None:
            for a in todo:
                seen[a] = await _probe_async(a, timeout, health, credential_of(a))

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(open_)))))
        return seen

    refusing = _refusing(addresses, timeout, concurrency)
    open_ = [a for a in addresses if a not in refusing]
    todo = iter(open_)
    seen = runner(all_of()) if open_ else {}
    return {a: None if a in refusing else seen[a] for a in addresses}


class Deployer(ABC):
    """Lifecycle shared by every backend. Subclasses are also Dagster resources."""

    poll_seconds: float = 0.05
    # a candidate not promoted within the deploy's timeout plus this is discarded by the backend itself
    promote_margin: float = 10.0

    # -- the contract ---------------------------------------------------------------------
    def deploy(self, target: Target, release: Release, timeout: float = 120.0,
               fencing_token: int | None = None, fallback: Release | None = None,
               before_cutover: Callable[[], None] | None = None) -> DeploymentStatus:
        """Serve ``release`` at ``target``'s stable address (see the module docstring). With a
        ``fencing_token``, the cutover is refused (DeployError, the candidate discarded, nothing
        changed) if the backend has seen a higher token. ``fallback`` is the only release the backend
        may put back on its own should ``release`` crash-loop (the promotion flow names the governed way
        back); with none, a crash-looping release is stopped and the address says so. ``before_cutover``
        runs once the candidate is healthy, right before it takes traffic: whatever it raises discards the
        candidate, nothing changed (the promotion flow checks there that the ledger can record the switch)."""
        candidate = self._launch(target, release, timeout + self.promote_margin)
        deadline = time.monotonic() + timeout
        try:
            self._await_healthy(candidate, deadline)
            if before_cutover is not None:
                before_cutover()
            self._cutover(candidate, fencing_token, fallback)
        except BaseException:
            # any interruption too (SIGINT's KeyboardInterrupt, SystemExit, Dagster's Terminate): a
            # candidate left behind would be a version nobody deployed; it never took traffic
            self._discard(candidate)
            raise
        address = self._address(target)
        credential = self.probe_credential(target)
        while True:
            seen = probe(address, credential=credential)
            if seen and str(seen.get("version")) == release.version:
                break
            if time.monotonic() > deadline:
                raise DeployError(
                    f"{target.slot}: version {release.version} is healthy but {address} still answers "
                    f"{seen.get('version') if seen else 'nothing'}"
                )
            time.sleep(self.poll_seconds)
        return self.status(target)

    def status(self, target: Target) -> DeploymentStatus:
        address = self._address_if_known(target)
        # a busy server is not a dead one
        seen = probe(address, timeout=3.0, credential=self.probe_credential(target)) if address else None
        return DeploymentStatus(
            target=target, address=address,
            serving_version=str(seen["version"]) if seen else None,
            healthy=seen is not None, detail={"server": seen, **self._backend_detail(target)},
            serving_digest=(seen.get("digest") or None) if seen else None,
            problems=server_problems(seen),
        )

    def delete(self, target: Target) -> None:
        self._stop(target)

    def fence(self, target: Target, token: int) -> None:
        """From now on refuse any cutover at ``target`` whose fencing token is lower than ``token``
        (DeployError if a higher one was seen already)."""
        self._fence(target, token)

    def address(self, target: Target) -> str:
        """The stable address clients use; allocated on first use and never changed."""
        return self._address(target)

    # -- who may call ------------------------------------------------------------------------
    def publish_grants(self, target: Target, table: dict[str, Any]) -> None:
        """Make ``table`` (the endpoint's access table, ``resources.serving.access``) what the workers
        of the endpoint ``target`` judge callers by, from their next request on: before the first
        deploy and while serving, never restarting anything. DeployError (one line naming the field)
        for a table the workers would refuse."""
        from resources.serving.access import parse_table

        if target.kind != "endpoint":
            raise DeployError(f"{target.slot}: grants are published for endpoints; this is an {target.kind}")
        try:
            parse_table(table, target.name, target.env)
        except ValueError as err:
            raise DeployError(f"{target.slot}: access table refused: {err}") from None
        self._publish_grants(target, table)

    def publish_credentials(self, target: Target, credentials: dict[str, str]) -> None:
        """Give the app ``target`` its credentials (``{ENDPOINT_NAME_UPPER: token}``) where only its
        workers are told to read them (``resources.serving.access.credential_header``); a name not given
        is removed. Never in a launch spec, state, event, environment or any file another can read."""
        from resources.serving.access import CREDENTIAL_NAME_RE, parse_token

        if target.kind != "app":
            raise DeployError(f"{target.slot}: credentials are published for app releases; this is an {target.kind}")
        for name, token in credentials.items():
            if not isinstance(name, str) or not CREDENTIAL_NAME_RE.fullmatch(name):
                raise DeployError(f"{target.slot}: credential name {name!r} must be an endpoint name in upper case")
            if not isinstance(token, str) or parse_token(token) is None:
                raise DeployError(f"{target.slot}: the credential for {name} is not an onepath credential")
        self._publish_credentials(target, dict(credentials))

    def held_credentials(self, target: Target) -> dict[str, str] | None:
        """What the app ``target`` holds now: ``{ENDPOINT_NAME_UPPER: sha256 of its token}`` (never a token),
        or None when it was never given credentials. How the platform sees a hand-over that did not happen
        (a rotation that failed between the tables and the app) and repairs it."""
        if target.kind != "app":
            raise DeployError(f"{target.slot}: credentials are held by app releases; this is an {target.kind}")
        return self._held_credentials(target)

    def probe_credential(self, target: Target) -> str | None:
        """The backend's own ``probe`` credential for the endpoint ``target`` (route version only: what
        ``status`` and ``deploy`` send to the stable address), or None for an app or before the backend
        has a secret for the slot."""
        return self._probe_credential(target) if target.kind == "endpoint" else None

    def worker_metrics(self, target: Target, timeout: float = 2.0) -> list[str]:
        """The Prometheus text of ``/metrics`` of each worker of the version now current at ``target``.

        One string per worker, in worker order; a worker that does not answer right now (it is being
        restarted) is an empty string, so positions stay stable across calls. An empty list means no
        version is current (never deployed, stopped, or stopped after a crash loop). Each worker is
        asked at its own address, not the stable one: the stable address reaches one worker at random
        and, right after a cutover, possibly the draining version. Counters are per process, so they
        start again from zero when a worker is restarted; callers comparing two snapshots must allow
        for that (``onepath_process_start_time_seconds`` tells a restarted worker apart).
        """
        return self._worker_metrics(target)

    # -- lifecycle helpers ----------------------------------------------------------------
    def _await_healthy(self, candidate: Candidate, deadline: float) -> None:
        while True:
            failure = self._candidate_failure(candidate)
            if failure:
                raise DeployError(f"{candidate.target.slot}: version {candidate.release.version} "
                                  f"failed to start; the previous version keeps serving. {failure}")
            seen = self._candidate_health(candidate)
            if seen and all(s is not None and str(s.get("version")) == candidate.release.version for s in seen):
                return
            if time.monotonic() > deadline:
                raise DeployError(f"{candidate.target.slot}: version {candidate.release.version} was "
                                  f"not healthy in time; the previous version keeps serving")
            time.sleep(self.poll_seconds)

    # -- backend calls --------------------------------------------------------------------
    @abstractmethod
    def _address(self, target: Target) -> str:
        """The stable address (allocated on first use, never changed after)."""

    def _address_if_known(self, target: Target) -> str | None:
        return self._address(target)

    @abstractmethod
    def _launch(self, target: Target, release: Release, promote_within: float) -> Candidate:
        """Start ``release`` beside what serves, taking no traffic until ``_cutover``. The backend
        discards it by itself if it is not cut over within ``promote_within`` seconds (the process
        that deploys may be killed mid-deploy, with no chance to discard it)."""

    @abstractmethod
    def _candidate_failure(self, candidate: Candidate) -> str | None:
        """Why the candidate can no longer become healthy, or None while it still can."""

    @abstractmethod
    def _candidate_health(self, candidate: Candidate) -> list[dict[str, Any] | None]:
        """Each candidate worker's /version document, or None for a worker whose /health is not 200
        (yet), asked through the backend's own channel (workers have no address of their own)."""

    @abstractmethod
    def _cutover(self, candidate: Candidate, fencing_token: int | None = None,
                 fallback: Release | None = None) -> None:
        """Make the candidate the version served at the stable address; drain the old one. Raise
        DeployError, changing nothing, if ``fencing_token`` is lower than the highest seen. Remember
        ``fallback`` (replacing any earlier one) as what a crash loop of the candidate may restore."""

    @abstractmethod
    def _fence(self, target: Target, token: int) -> None: ...

    @abstractmethod
    def _discard(self, candidate: Candidate) -> None: ...

    @abstractmethod
    def _worker_metrics(self, target: Target) -> list[str]:
        """The /metrics text of each worker of the current version (in worker order, '' for one that
        does not answer right now), or [] when none is current."""

    @abstractmethod
    def _stop(self, target: Target) -> None: ...

    def _backend_detail(self, target: Target) -> dict[str, Any]:
        return {}

    def _publish_grants(self, target: Target, table: dict[str, Any]) -> None:
        raise DeployError(f"{type(self).__name__} cannot publish an access table")

    def _publish_credentials(self, target: Target, credentials: dict[str, str]) -> None:
        raise DeployError(f"{type(self).__name__} cannot publish credentials")

    def _held_credentials(self, target: Target) -> dict[str, str] | None:
        raise DeployError(f"{type(self).__name__} cannot say which credentials an app holds")

    def _probe_credential(self, target: Target) -> str | None:
        return None
