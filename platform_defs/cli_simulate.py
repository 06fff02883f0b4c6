"""``onepath simulate-traffic ENDPOINT [--env prod] [--drift] [--rate 20] [--requests N | --duration S]
[--label-delay 30] [--seed N]``: a world that changes, and labels that arrive later.

Sends realistic requests to an endpoint's stable address, drawn from its dataset's generator for the
current period (with the declared parameters; ``--drift`` moves the population with ``shift=0.8``:
incomes fall and spread, debt rises, applicants get younger, the purpose mix changes). Each request
carries one row's features plus its id and protected attributes as pass-through extras (as the loan
portal would; never personal data) and its own ``x-request-id``. The row's true outcome is appended
to the outcomes store ``--label-delay`` seconds after its request was answered. The run ends when
every request is sent and every due outcome delivered; without ``--requests``/``--duration`` it sends
until Ctrl-C.

Ctrl-C once stops sending and still delivers the outcomes already owed, as they come due; Ctrl-C
again drops those and exits at once (130). No outcome is ever delivered twice: an outcome leaves the
queue only once it is written, and the loop stops only between steps.

The sending and delivery logic is importable (:func:`iter_requests`, :class:`Simulation`) and runs
on any clock with ``now()`` and ``wait_until(t, control)``, so a test drives it with a clock it
controls. Errors are one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import heapq
import http.client
import inspect
import json
import math
import os
import secrets
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from resources.serving.access import bearer
from resources.serving.retry import call_with_retry

if TYPE_CHECKING:  # imported where used: `onepath` starts without pydantic for other verbs
    from platform_defs.specs import DatasetSpec, EndpointSpec, Organisation

DRIFT_SHIFT = 0.8
CHUNK_ROWS = 1000
MAX_CONSECUTIVE_FAILURES = 20
# outcomes to an S3 store are delivered at most this often (seconds): each delivery is an object
S3_DELIVER_EVERY = 1.0


class SimulateError(Exception):
    """The simulation cannot run as asked; ``str(err)`` is one line."""


# --------------------------------------------------------------------------------------------
# What to send: rows of the endpoint's dataset, drawn for "now"


def resolve(org: Organisation, endpoint: str, env: str) -> tuple[EndpointSpec, DatasetSpec]:
    """The endpoint declaration and the dataset its model learns from, or a one-line ``SimulateError``."""
    from platform_defs.promotion import PromotionError, resolve_endpoint

    try:
        spec, _, dataset = resolve_endpoint(org, endpoint, env)
    except PromotionError as err:
        raise SimulateError(str(err)) from None
    return spec, dataset


def _generator(dataset: DatasetSpec) -> Callable[..., Any]:
    import importlib

    module, _, attr = dataset.generator.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise SimulateError(f"dataset '{dataset.name}': generator '{dataset.generator}' does not import: {err}") from None


def now_params(accepted: set[str], today: date) -> dict[str, Any]:
    """Generator parameters that ask for data of the current period: an application period from the
    first of this month to today (``period_start``/``period_end``), or a snapshot as of today (``as_of``)."""
    out: dict[str, Any] = {}
    if {"period_start", "period_end"} <= accepted:
        out.update(period_start=today.replace(day=1).isoformat(), period_end=today.isoformat())
    if "as_of" in accepted:
        out["as_of"] = today.isoformat()
    return out


def generator_params(dataset: DatasetSpec, *, rows: int, drift: bool, seed: int, today: date) -> dict[str, Any]:
    """The declared parameters, asked for ``rows`` rows of the current period (and ``shift`` under drift)."""
    accepted = set(inspect.signature(_generator(dataset)).parameters)
    missing = [p for p in ("rows", "seed") if p not in accepted]
    if drift and "shift" not in accepted:
        missing.append("shift")
    if missing:
        raise SimulateError(f"dataset '{dataset.name}': generator '{dataset.generator}' has no '{missing[0]}' "
                            f"parameter, which simulate-traffic needs")
    params = {**dataset.params, **now_params(accepted, today), "rows": rows, "seed": seed}
    if drift:
        params["shift"] = DRIFT_SHIFT
    return params


def sent_columns(dataset: DatasetSpec) -> list[str]:
    """What a caller sends with each request: every column except the label, the timestamp (the
    endpoint knows when it scored) and personal data. Model features are inputs; the id and protected
    attributes reach the inference log as extras only where the endpoint declares them ``pass_through``
    (credit_scoring: application_id, gender, age_band; churn_scoring: customer_id), anything else is
    dropped from the log and counted."""
    return [c.name for c in dataset.columns if not c.pii and c.role not in ("label", "timestamp")]


@dataclass(frozen=True)
class Planned:
    record: dict[str, Any]
    label: int


def _native(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def iter_requests(dataset: DatasetSpec, *, total: int | None, drift: bool, seed: int,
                  today: Callable[[], date], chunk_rows: int = CHUNK_ROWS) -> Iterator[Planned]:
    """Requests drawn from the dataset's generator, ``total`` of them (``None``: without end).

    Rows are drawn ``chunk_rows`` at a time (a run of ``total <= chunk_rows`` is one generator call
    with ``rows=total``), each chunk with its own seed; a row whose id an earlier chunk already used
    is skipped, so ids stay unique as the dataset declares them.
    """
    gen = _generator(dataset)
    cols = sent_columns(dataset)
    label = dataset.label
    if label is None:
        raise SimulateError(f"dataset '{dataset.name}' has no label column: there is no outcome to deliver")
    ids = [c.name for c in dataset.columns if c.role == "id"]
    seen: set[tuple[Any, ...]] = set()
    produced, k = 0, 0
    while total is None or produced < total:
        rows = chunk_rows if total is None else min(chunk_rows, total - produced)
        params = generator_params(dataset, rows=rows, drift=drift, seed=seed + 1_000_003 * k, today=today())
        k += 1
        try:
            frame = gen(**params)
        except (TypeError, ValueError) as err:
            raise SimulateError(f"dataset '{dataset.name}': generator rejected its parameters: {err}") from None
        absent = [c for c in [*cols, label] if c not in frame.columns]
        if absent:
            raise SimulateError(f"dataset '{dataset.name}': generator output has no column '{absent[0]}'")
        fresh = 0
        for rec in frame[[*cols, label]].to_dict(orient="records"):
            key = tuple(rec[c] for c in ids)
            if ids and key in seen:
                continue
            seen.add(key)
            fresh += 1
            y = _native(rec.pop(label))
            yield Planned({c: _native(v) for c, v in rec.items()}, int(y))
            produced += 1
            if total is not None and produced >= total:
                return
        if fresh == 0:
            raise SimulateError(f"dataset '{dataset.name}': the generator keeps drawing ids already sent")


# --------------------------------------------------------------------------------------------
# Clocks and the control a signal handler flips


class Control:
    """Flipped from a signal handler: the first ``interrupt`` stops sending, the second drops what is
    still owed. The handler only sets flags and writes one byte to a pipe (no locks, so it cannot
    deadlock whatever the main thread was doing); a real clock's wait watches that pipe."""

    def __init__(self) -> None:
        self.stopping = False
        self.aborted = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)

    def interrupt(self) -> None:
        if self.stopping:
            self.aborted = True
        self.stopping = True
        try:
            os.write(self._w, b"!")
        except OSError:  # the pipe is full or closed: the flags alone still stop the loop
            pass

    def wait(self, seconds: float) -> None:
        """Wait ``seconds``, or less if interrupted."""
        if select.select([self._r], [], [], max(seconds, 0.0))[0]:
            os.read(self._r, 1024)

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class Clock(Protocol):
    def now(self) -> float: ...

    def wait_until(self, t: float, control: Control) -> None: ...


class RealClock:
    """Wall-clock seconds; a wait ends at ``t`` or as soon as ``control`` is interrupted."""

    def now(self) -> float:
        return time.time()

    def wait_until(self, t: float, control: Control) -> None:
        remaining = t - time.time()
        if remaining > 0 and not control.aborted:
            control.wait(remaining)


# --------------------------------------------------------------------------------------------
# Sending


class PredictClient:
    """POSTs one record to ``<address>/predict`` over a kept-alive connection (reopened when it drops)."""

    def __init__(self, address: str, timeout: float = 10.0, credential: str | Callable[[], str] | None = None):
        parts = urlsplit(address)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        # the caller's own credential (onepath-cli's, platform_defs.access), asked before each request so a
        # rotation during a long run reaches it: every route but /health needs one
        self._credential = credential

    def _auth(self) -> dict[str, str]:
        token = self._credential() if callable(self._credential) else self._credential
        return bearer(token) if token else {}

    def __call__(self, record: dict[str, Any], request_id: str) -> dict[str, Any]:
        body = json.dumps(record).encode()
        headers = {"content-type": "application/json", "x-request-id": request_id, **self._auth()}

        def send() -> tuple[http.client.HTTPResponse, bytes]:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request("POST", "/predict", body=body, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
            except BaseException:
                self.close()  # the next attempt (if the retry rule allows one) opens a new connection
                raise
            if resp.getheader("connection", "").lower() == "close":
                self.close()
            return resp, raw

        try:
            # a kept-alive connection the server closed, or a worker that died holding the request:
            # once more on a new connection, same request id (resources.serving.retry)
            resp, raw = call_with_retry(send)
        except http.client.HTTPException as err:
            raise RequestFailed(f"{type(err).__name__}: {err}") from None
        if resp.status in (401, 403):  # no retry helps: the credential itself is refused
            raise CredentialRefused(f"HTTP {resp.status}: {raw[:200].decode('utf-8', 'replace')}")
        if resp.status != 200:
            raise RequestFailed(f"HTTP {resp.status}: {raw[:200].decode('utf-8', 'replace')}")
        doc = json.loads(raw)
        if doc.get("request_id") != request_id:
            raise RequestFailed(f"the endpoint answered for request {doc.get('request_id')!r}, not {request_id!r}")
        return doc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class RequestFailed(Exception):
    pass


class CredentialRefused(RequestFailed):
    """The endpoint refused the caller's credential (401/403): revoked, rotated out, or not granted."""


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class Summary:
    endpoint: str
    env: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    delivered: int = 0
    pending: int = 0
    dropped: int = 0
    started: float = 0.0
    last_sent_at: float = 0.0
    now: float = 0.0
    total: int | None = None
    state: str = "running"  # running | stopping | done | stopped (interrupted, all owed delivered) | aborted | failed
    error: str | None = None
    versions: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        span = self.last_sent_at - self.started  # first to last request: the rate actually achieved
        rate = (self.sent - 1) / span if self.sent > 1 and span > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        versions = ",".join(f"v{v}" for v in sorted(self.versions)) or "-"
        out = (f"{self.endpoint}/{self.env}: sent {self.sent}{of} ({self.failed} failed, {rate:.1f} req/s, "
               f"served by {versions}), outcomes delivered {self.delivered}, pending {self.pending}")
        if self.dropped:
            out += f", dropped {self.dropped}"
        if self.state != "running":
            out += f" [{self.state}]"
        if self.error:
            out += f": {self.error}"
        return out


class Simulation:
    """Sends ``requests`` at ``rate`` per second of ``clock`` time and delivers each answered request's
    outcome ``label_delay`` seconds after its answer, to ``outcomes_dir``. Stops sending after ``total``
    requests (if given), at ``send_until`` (if given), when ``control`` is interrupted, or after
    ``MAX_CONSECUTIVE_FAILURES`` failed requests in a row; then delivers what is owed as it comes due,
    unless interrupted again. ``deliver_every`` > 0 holds outcomes that came due until the oldest of them
    is that many seconds overdue and delivers them in one call (the default for an S3 store, where each
    call is an object: one per answered request otherwise)."""

    def __init__(self, *, endpoint: str, env: str, outcomes_dir: Any, requests: Iterator[Planned],
                 send: Callable[[dict[str, Any], str], dict[str, Any]], rate: float, label_delay: float,
                 clock: Clock, control: Control | None = None, total: int | None = None,
                 send_until: float | None = None, run_id: str | None = None, deliver_every: float = 0.0):
        if not rate > 0:
            raise SimulateError(f"--rate must be positive (got {rate})")
        if label_delay < 0:
            raise SimulateError(f"--label-delay must not be negative (got {label_delay})")
        self.endpoint, self.env, self.outcomes_dir = endpoint, env, outcomes_dir
        self.requests, self.send = requests, send
        self.rate, self.label_delay, self.deliver_every = rate, label_delay, max(0.0, deliver_every)
        self.clock, self.control = clock, control or Control()
        self.total, self.send_until = total, send_until
        self.run_id = run_id or secrets.token_hex(4)
        self._owed: list[tuple[float, int, str, int]] = []  # (due, sequence, request id, label), a heap
        self._i = 0
        self._exhausted = False
        self._consecutive_failures = 0
        self.summary = Summary(endpoint, env, total=total)

    def request_id(self, i: int) -> str:
        return f"sim-{self.run_id}-{i:07d}"

    # -- steps --------------------------------------------------------------------------------
    def send_one(self) -> bool:
        """Send the next request; False when there is none left."""
        try:
            planned = next(self.requests)
        except StopIteration:
            self._exhausted = True
            return False
        rid = self.request_id(self._i)
        self._i += 1
        self.summary.sent += 1
        self.summary.last_sent_at = self.clock.now()
        try:
            doc = self.send(planned.record, rid)
        except (OSError, RequestFailed, ValueError) as err:
            self.summary.failed += 1
            self._consecutive_failures += 1
            self.summary.error = f"last failure: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            return True
        self._consecutive_failures = 0
        self.summary.ok += 1
        v = str(doc.get("version"))
        self.summary.versions[v] = self.summary.versions.get(v, 0) + 1
        heapq.heappush(self._owed, (self.clock.now() + self.label_delay, self._i, rid, planned.label))
        return True

    def deliver_due(self) -> int:
        """Write every outcome due by now (one append); an outcome leaves the queue only once written."""
        from resources.feedback import record_outcomes

        now = self.clock.now()
        due = []
        for item in sorted(self._owed):
            if item[0] > now:
                break
            due.append(item)
        if not due or due[0][0] + self.deliver_every > now:
            return 0
        observed = datetime.fromtimestamp(now, timezone.utc).isoformat()
        record_outcomes(self.outcomes_dir, self.endpoint, self.env,
                        [{"request_id": rid, "label": label, "observed_at": observed} for _, _, rid, label in due])
        for _ in due:
            heapq.heappop(self._owed)
        self.summary.delivered += len(due)
        return len(due)

    def _sending(self) -> bool:
        if self.control.stopping or self._exhausted:
            return False
        if self.total is not None and self.summary.sent >= self.total:
            return False
        if self.send_until is not None and self.clock.now() >= self.send_until:
            return False
        return self._consecutive_failures < MAX_CONSECUTIVE_FAILURES

    # -- the loop -----------------------------------------------------------------------------
    def run(self, on_progress: Callable[[Summary, str], None] | None = None) -> Summary:
        """Run to the end; ``on_progress(summary, event)`` after every step (event ``progress``), once on
        ``stopping`` (the first interrupt) and once at the end with the final state (``done``, ``stopped``,
        ``aborted`` or ``failed``)."""
        s = self.summary
        start = s.started = s.now = self.clock.now()
        told_stopping = False
        while True:
            if self.control.aborted:
                s.dropped, s.pending = len(self._owed), 0
                self._owed.clear()
                s.state = "aborted"
                break
            if self.control.stopping and not told_stopping:
                told_stopping = True
                s.state = "stopping"
                if on_progress:
                    on_progress(s, "stopping")
            sending = self._sending()
            next_send = start + self._i / self.rate if sending else math.inf
            if self.send_until is not None:
                next_send = next_send if next_send < self.send_until else math.inf
            next_due = self._owed[0][0] + self.deliver_every if self._owed else math.inf
            if next_send == math.inf and next_due == math.inf:
                s.state = ("failed" if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES
                           else "stopped" if self.control.stopping else "done")
                break
            self.clock.wait_until(min(next_send, next_due), self.control)
            if self.control.aborted:
                continue
            self.deliver_due()
            if sending and not self.control.stopping and self.clock.now() >= next_send:
                self.send_one()
            s.now = self.clock.now()
            s.pending = len(self._owed)
            if on_progress:
                on_progress(s, "progress")
        if s.state == "failed":
            s.error = (f"the endpoint failed {MAX_CONSECUTIVE_FAILURES} requests in a row; "
                       f"{s.error or ''}".rstrip("; "))
        s.now = self.clock.now()
        s.pending = len(self._owed)
        if on_progress:
            on_progress(s, s.state)
        return s


# --------------------------------------------------------------------------------------------
# The command


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from platform_defs.promotion import endpoint_target
    from platform_defs.loader import load_organisation
    from platform_defs.settings import load_settings
    from platform_defs.specs import DeclarationError
    from resources.deployers.local import LocalProcessDeployer
    from resources.feedback import FeedbackError, outcomes_root
    from resources.object_store import ObjectStoreError

    if args.rate <= 0:
        return _fail(f"--rate must be positive (got {args.rate})")
    if args.requests is not None and args.requests < 1:
        return _fail(f"--requests must be at least 1 (got {args.requests})")
    if args.duration is not None and args.duration <= 0:
        return _fail(f"--duration must be positive (got {args.duration})")
    if args.label_delay < 0:
        return _fail(f"--label-delay must not be negative (got {args.label_delay})")
    try:
        org = load_organisation()
        spec, dataset = resolve(org, args.endpoint, args.env)
    except DeclarationError as err:
        return _fail(str(err).splitlines()[0])
    except SimulateError as err:
        return _fail(str(err))
    settings = load_settings()
    outcomes = outcomes_root(settings.outcomes_url, settings.outcomes_dir)  # a folder, or s3://bucket/prefix/outcomes
    deployer = LocalProcessDeployer(settings.run_dir, host=settings.host, port_base=settings.port_base,
                                    inference_log_dir=settings.inference_log_dir)
    status = deployer.status(endpoint_target(spec, args.env))
    if not status.healthy:
        where = f"at {status.address}" if status.address else "(it has no stable address yet)"
        return _fail(f"nothing serves endpoint '{spec.name}' in '{args.env}' {where}: deploy it first "
                     f"(materialize {spec.name}_{args.env})")
    assert status.address is not None
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    clock = RealClock()
    try:  # a generator that cannot be asked for these rows fails here, before anything is sent
        generator_params(dataset, rows=1, drift=args.drift, seed=seed, today=date.today())
    except SimulateError as err:
        return _fail(str(err))
    from platform_defs.access import AccessError, CLI_CALLER, access_for

    try:  # onepath-cli's own credential, issued on first use when the recorded policy grants it
        access = access_for(settings, actor=CLI_CALLER)
        credential = access.stored_credential(org, CLI_CALLER, spec.name, args.env)
    except AccessError as err:
        return _fail(str(err))
    control = Control()
    client = PredictClient(status.address, credential=credential)
    try:
        sim = Simulation(
            endpoint=spec.name, env=args.env, outcomes_dir=outcomes,
            requests=iter_requests(dataset, total=args.requests, drift=args.drift, seed=seed,
                                   today=lambda: datetime.fromtimestamp(clock.now(), timezone.utc).date()),
            send=client, rate=args.rate, label_delay=args.label_delay, clock=clock, control=control,
            total=args.requests, send_until=clock.now() + args.duration if args.duration else None,
            deliver_every=S3_DELIVER_EVERY if isinstance(outcomes, str) else 0.0,
        )
    except SimulateError as err:
        return _fail(str(err))
    tty = sys.stdout.isatty()
    last = [0.0 if tty else time.monotonic()]  # piped: a line every 10 s, not one at the start

    def progress(s: Summary, event: str) -> None:
        if event == "stopping":
            print(("\n" if tty else "") + f"stopping: no more requests; delivering {s.pending} owed outcome(s) "
                  f"as they come due (Ctrl-C again to drop them)", flush=True)
        elif event == "progress":
            t = time.monotonic()
            if t - last[0] >= (0.5 if tty else 10.0):
                last[0] = t
                print(("\r\033[K" if tty else "") + s.line(), end="" if tty else "\n", flush=True)

    shift = f"shift={DRIFT_SHIFT}" if args.drift else "no drift"
    how_long = (f"{args.requests} requests" if args.requests else
                f"for {args.duration:g} s" if args.duration else "until Ctrl-C")
    print(f"simulating {spec.name}/{args.env} at {status.address} (version {status.serving_version}): "
          f"{args.rate:g} req/s, {how_long}, {shift}, labels {args.label_delay:g} s later, seed {seed}, "
          f"run {sim.run_id}; outcomes to {outcomes}/{spec.name}/{args.env}", flush=True)
    if not spec.inference_log:
        print(f"note: endpoint '{spec.name}' keeps no inference log (inference_log: false), so these outcomes "
              f"will join no request", flush=True)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: control.interrupt())
    try:
        summary = sim.run(progress)
    except SimulateError as err:
        return _fail(str(err))
    except (FeedbackError, ObjectStoreError, OSError) as err:
        return _fail(f"cannot deliver outcomes to {outcomes}: {err}")
    finally:
        signal.signal(signal.SIGINT, previous)
        client.close()
        control.close()
    print(("\r\033[K" if tty else "") + summary.line(), flush=True)
    if summary.state == "aborted":
        return 130
    return 1 if summary.state == "failed" else 0


import click  # noqa: E402

from platform_defs.cli_base import exclusive, verb  # noqa: E402


@click.command("simulate-traffic")  # its help: platform_defs.cli.VERBS
@click.argument("endpoint")
@click.option("--env", default="prod", help="environment (default prod)")
@click.option("--drift", is_flag=True, help=f"draw from a moved population (generator shift={DRIFT_SHIFT})")
@click.option("--rate", type=float, default=20.0, help="requests per second (default 20)")
@click.option("--requests", type=int, metavar="N", help="send N requests (default: until Ctrl-C)")
@click.option("--duration", type=float, metavar="S", help="send for S seconds")
@click.option("--label-delay", type=float, default=30.0, metavar="S",
              help="seconds after a request until its outcome arrives (default 30)")
@click.option("--seed", type=int, help="generator seed (default: a random one, printed)")
def simulate_traffic(**kw):  # noqa: ANN003
    exclusive(requests=kw["requests"], duration=kw["duration"])
    return verb(cmd_simulate)(**kw)
