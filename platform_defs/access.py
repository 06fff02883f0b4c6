"""Who may call an endpoint: grants, their credentials, and the one table each endpoint environment serves.

A caller reaches an endpoint only because something says it may:

* an **app release's declaration** (``calls: [credit_scoring]``): caller ``app:<name>``, routes predict and
  version, one grant per (called endpoint, environment of the app). Issued by the app's deploy
  (:meth:`Access.prepare_app`), which hands the release its credentials before its workers start;
* the **recorded policy** (``access.callers`` of the policy in force in the ledger, not the file): a person's
  CLI, a batch job, the metrics scraper. Issued on first use (:meth:`Access.caller_token`); the secret
  lives in the platform's caller store, ``$ONEPATH_HOME/access/callers/`` (0700, files 0600).

Every grant is its own credential (``op1.<endpoint>.<env>.<grant>.<secret>``, ``resources.serving.access``),
scoped to one endpoint in one environment. The ledger holds what happened to it, never a secret:
``credential_granted`` (its sha256), ``credential_rotated`` (the new sha256, and until when the old one
works), ``credential_revoked`` (why). :func:`grants` folds those entries into the state of every grant; an
endpoint environment's access table (:func:`table`) is a pure function of that state, published through
the deployer (``publish_grants``) where its workers read it on every request: a revocation or rotation
takes effect on the next request, no redeploy.

:meth:`Access.reconcile` (the ``access`` sensor, each tick; ``onepath access reconcile``) revokes what
nothing justifies any more (an app that no longer declares the call, a caller the recorded policy dropped
or narrowed), rotates what is older than ``rotate_after_days``, and republishes every table that changed.

Takes a ledger and a deployer; no Dagster. Errors are :class:`AccessError`, one line naming what is
missing and the command or file that fixes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from platform_defs.policy import AccessPolicy, GrantRoute
from platform_defs.specs import AppSpec, EndpointSpec, Organisation
from resources.deployers.base import Deployer, Target
from resources.files import atomic_write, private_dir
from resources.serving import access as wire

GRANTED, ROTATED, REVOKED = "credential_granted", "credential_rotated", "credential_revoked"
KINDS = (GRANTED, ROTATED, REVOKED)
APP_ROUTES: tuple[GrantRoute, ...] = ("predict", "version")
CLI_CALLER = "onepath-cli"
TABLE_VERSION = 1
KEEP_ROTATED_OUT = 3  # rotated-out secrets kept in a table (so their holder hears "rotated out", not "unknown")


class AccessError(RuntimeError):
    """An access operation was refused or cannot run; ``str(err)`` is one line: what is missing, what fixes it."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    t = datetime.fromisoformat(str(ts))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def app_caller(app: str) -> str:
    return f"app:{app}"


# --------------------------------------------------------------------------------------------
# The state of every grant, folded from the ledger


@dataclass
class Secret:
    sha256: str
    since: str  # when it was issued (the ledger entry's time)
    not_after: str | None = None  # set by the rotation that replaced it


@dataclass
class Grant:
    id: str
    caller: str
    endpoint: str
    env: str
    routes: list[str]
    because: str
    granted_at: str
    granted_seq: int
    secrets: list[Secret] = field(default_factory=list)
    revoked: dict[str, str] | None = None  # {"at", "why", "seq"}
    last_seq: int = 0

    @property
    def live(self) -> bool:
        return self.revoked is None

    @property
    def current(self) -> Secret:
        return self.secrets[-1]

    def secret_age(self, now: datetime) -> timedelta:
        return now - (_parse(self.current.since) or now)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "caller": self.caller, "endpoint": self.endpoint, "env": self.env,
                "routes": list(self.routes), "because": self.because, "granted_at": self.granted_at,
                "granted_entry": self.granted_seq, "secret_since": self.current.since,
                "rotations": len(self.secrets) - 1, "revoked": self.revoked}


def grants(book: Any) -> dict[str, Grant]:
    """Every grant ever issued, by id, in the state its ledger entries leave it (oldest first)."""
    entries = sorted((e for kind in KINDS for e in book.entries(kind=kind)), key=lambda e: e.seq)
    out: dict[str, Grant] = {}
    for e in entries:
        d = e.data
        gid = str(d.get("grant"))
        if e.kind == GRANTED:
            out[gid] = Grant(gid, str(d["caller"]), str(d["endpoint"]), str(d["env"]), list(d.get("routes") or []),
                             str(d.get("because", "")), e.ts, e.seq, [Secret(str(d["token_sha256"]), e.ts)],
                             last_seq=e.seq)
            continue
        g = out.get(gid)
        if g is None:  # an entry about a grant never issued: nothing to fold it into
            continue
        g.last_seq = e.seq
        if e.kind == ROTATED:
            for s in g.secrets:
                if s.not_after is None:
                    s.not_after = d.get("previous_not_after")
            g.secrets.append(Secret(str(d["token_sha256"]), e.ts))
        elif e.kind == REVOKED and g.revoked is None:
            g.revoked = {"at": e.ts, "why": str(d.get("why", "")), "seq": str(e.seq)}
    return out


def table(state: dict[str, Grant], endpoint: str, env: str) -> dict[str, Any]:
    """The access table of ``endpoint`` in ``env`` (the contract's schema): every grant ever issued there, the
    revoked ones too (their callers hear 403, revoked), with their current and rotated-out secrets' hashes.
    A pure function of the ledger: ``generation`` and ``updated_at`` are those of its newest entry."""
    mine = [g for g in state.values() if g.endpoint == endpoint and g.env == env]
    newest = max(mine, key=lambda g: g.last_seq, default=None)
    rows = []
    for g in sorted(mine, key=lambda g: g.granted_seq):
        kept = g.secrets[-(KEEP_ROTATED_OUT + 1):]
        rows.append({"id": g.id, "caller": g.caller, "routes": list(g.routes),
                     "secrets": [{"sha256": s.sha256, "not_after": s.not_after} for s in kept],
                     "revoked": None if g.revoked is None else {"at": g.revoked["at"], "why": g.revoked["why"]}})
    return {"version": TABLE_VERSION, "endpoint": endpoint, "env": env,
            "generation": newest.last_seq if newest else 0,
            "updated_at": _ts_of(newest), "grants": rows}


def _ts_of(g: Grant | None) -> str | None:
    if g is None:
        return None
    stamps = [g.granted_at, *(s.since for s in g.secrets), *([g.revoked["at"]] if g.revoked else [])]
    return max(stamps)


def table_digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# What justifies a grant


@dataclass(frozen=True)
class Need:
    caller: str
    endpoint: str
    env: str
    routes: tuple[str, ...]
    because: str


def app_needs(org: Organisation) -> list[Need]:
    """The grants the app declarations justify: one per (app, endpoint it calls, environment of the app)."""
    out = []
    for app in org.of_kind("app"):
        src = org.sources.get(app.name) or "its declaration"
        for ep in app.calls:
            for env in app.environments:
                out.append(Need(app_caller(app.name), ep, env, APP_ROUTES,
                                f"app {app.name} declares calls: [{ep}] ({src})"))
    return out


def policy_needs(org: Organisation, recorded: Any) -> list[Need]:
    """The grants the recorded policy in force justifies: each of its callers on each declared endpoint
    environment it reaches."""
    if recorded is None:
        return []
    out = []
    for name, caller in recorded.policy.access.callers.items():
        for ep in org.of_kind("endpoint"):
            for env in ep.environments:
                if caller.reaches(ep.name, env):
                    out.append(Need(name, ep.name, env, tuple(caller.routes),
                                    f"recorded policy ledger #{recorded.seq}: access.callers.{name}"))
    return out


def _recorded(book: Any) -> Any:
    from platform_defs.policy_record import PolicyRecordError, policy_in_force

    try:
        return policy_in_force(book)
    except PolicyRecordError as err:
        raise AccessError(f"the recorded policy chain is broken ({err}): no grant changes until the ledger is "
                          f"restored (onepath audit verify)") from None


def _access_policy(recorded: Any) -> AccessPolicy:
    return recorded.policy.access if recorded is not None else AccessPolicy()


def _policy_file() -> str:
    from platform_defs.policy import _shown, policy_path

    return _shown(policy_path())


# --------------------------------------------------------------------------------------------
# Operations


def endpoint_target(spec: EndpointSpec, env: str) -> Target:
    """Where the endpoint ``spec`` serves in ``env`` (the one definition: promotion uses it too)."""
    return Target(spec.name, env, kind="endpoint", port=spec.ports.get(env))


def app_target(spec: AppSpec, env: str) -> Target:
    """Where the app release ``spec`` serves in ``env``."""
    return Target(spec.name, env, kind="app", port=spec.ports.get(env))


def _endpoint_target_named(org: Organisation | None, endpoint: str, env: str) -> Target:
    """``endpoint_target`` by name; an endpoint no longer declared still has its slot (its table is revoked)."""
    spec = org.by_name.get(endpoint) if org is not None else None
    return endpoint_target(spec, env) if isinstance(spec, EndpointSpec) else Target(endpoint, env, kind="endpoint")


@dataclass
class Reconciled:
    revoked: list[dict[str, str]] = field(default_factory=list)  # {grant, caller, endpoint, env, why}
    rotated: list[dict[str, str]] = field(default_factory=list)  # {grant, caller, endpoint, env}
    published: list[str] = field(default_factory=list)  # "<endpoint>.<env>" whose table was written
    digests: dict[str, str] = field(default_factory=dict)  # slot -> digest of the table in force
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{len(self.revoked)} revoked, {len(self.rotated)} rotated, {len(self.published)} table(s) "
                f"published" + (f", {len(self.errors)} error(s)" if self.errors else ""))


class Access:
    """Issue, rotate, revoke and publish, under one lock per onepath home (``<home>/access/.lock``), so the
    sensor, a deploy and an operator never decide on the same state at once."""

    def __init__(self, book: Any, deployer: Deployer, home: Path | None = None, *, actor: str = "onepath",
                 clock: Callable[[], datetime] = _now):
        """``home``: the onepath home whose ``access/`` holds the lock and the callers' store (default: the
        folder of the ledger's sqlite file, which is ``$ONEPATH_HOME``; with the ledger on PostgreSQL, the
        settings' ``$ONEPATH_HOME``)."""
        self.book, self.deployer, self.actor, self.clock = book, deployer, actor, clock
        if home is None:
            from platform_defs.settings import load_settings

            home = Path(book.db_path).parent if book.db_path is not None else load_settings().home
        self.home = Path(home)

    # -- where things live ------------------------------------------------------------------------

    @property
    def access_dir(self) -> Path:
        return self.home / "access"

    @property
    def callers_dir(self) -> Path:
        """The policy callers' secret store: owner-only, under the platform's state dir."""
        return self.access_dir / "callers"

    def caller_file(self, caller: str, endpoint: str, env: str) -> Path:
        return self.callers_dir / f"{caller}.{endpoint}.{env}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        private_dir(self.access_dir)
        fd = os.open(self.access_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- the primitives (each one ledger entry) ---------------------------------------------------------

    def _issue(self, need: Need) -> tuple[str, str]:
        gid, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        token = wire.make_token(need.endpoint, need.env, gid, secret)
        self.book.append(GRANTED, need.endpoint, {
            "grant": gid, "caller": need.caller, "endpoint": need.endpoint, "env": need.env,
            "routes": list(need.routes), "token_sha256": wire.token_sha256(token), "because": need.because,
        }, self.actor, env=need.env)
        return gid, token

    def _rotate(self, g: Grant, overlap_seconds: float) -> str:
        token = wire.make_token(g.endpoint, g.env, g.id, secrets.token_urlsafe(32))
        self.book.append(ROTATED, g.endpoint, {
            "grant": g.id, "token_sha256": wire.token_sha256(token),
            "previous_not_after": _iso(self.clock() + timedelta(seconds=overlap_seconds)),
        }, self.actor, env=g.env)
        return token

    def _revoke(self, g: Grant, why: str) -> None:
        self.book.append(REVOKED, g.endpoint, {"grant": g.id, "why": why}, self.actor, env=g.env)

    def _publish(self, org: Organisation | None, endpoint: str, env: str,
                 state: dict[str, Grant] | None = None, target: Target | None = None) -> str:
        doc = table(state if state is not None else grants(self.book), endpoint, env)
        self.deployer.publish_grants(target or _endpoint_target_named(org, endpoint, env), doc)
        return table_digest(doc)

    def _store(self, caller: str, endpoint: str, env: str, token: str) -> None:
        private_dir(self.callers_dir)
        atomic_write(self.caller_file(caller, endpoint, env), token.encode(), mode=0o600)

    def _stored(self, g: Grant) -> str | None:
        """The store's token for ``g`` when it is ``g``'s current secret (anything else is stale)."""
        try:
            token = self.caller_file(g.caller, g.endpoint, g.env).read_text().strip()
        except OSError:
            return None
        return token if wire.token_sha256(token) == g.current.sha256 else None

    # -- what the entry points call ------------------------------------------------------------

    def state(self) -> dict[str, Grant]:
        return grants(self.book)

    def publish_table(self, target: Target) -> str:
        """Write the endpoint target's table where its workers read it (every endpoint deploy does this first,
        so a fresh slot serves its callers at once); returns the table's digest."""
        with self._locked():
            return self._publish(None, target.name, target.env, target=target)

    def prepare_app(self, org: Organisation, spec: AppSpec, env: str) -> list[str]:
        """Before an app release's workers start in ``env``: each endpoint it declares it calls gets its grant
        (the live one kept, with a fresh secret; a new one when there is none or it was revoked), the tables
        of those endpoints are published (so the new secret is accepted), then the credentials reach the
        app's slot (``publish_credentials``, only there). Returns the grant ids (what the deploy entry
        records; never a token)."""
        with self._locked():
            overlap = _access_policy(_recorded(self.book)).overlap_seconds
            state = self.state()
            tokens: dict[str, str] = {}
            ids: list[str] = []
            caller = app_caller(spec.name)
            src = org.sources.get(spec.name) or "its declaration"
            for ep in spec.calls:
                live = [g for g in state.values() if g.caller == caller and g.endpoint == ep and g.env == env
                        and g.live]
                for extra in live[:-1]:  # one grant per (caller, endpoint, env): older duplicates go
                    self._revoke(extra, f"replaced by grant {live[-1].id}")
                if live:
                    gid, token = live[-1].id, self._rotate(live[-1], overlap)
                else:
                    gid, token = self._issue(Need(caller, ep, env, APP_ROUTES,
                                                  f"app {spec.name} declares calls: [{ep}] ({src})"))
                tokens[ep.upper()] = token
                ids.append(gid)
            state = self.state()
            for ep in spec.calls:
                self._publish(org, ep, env, state)
            self.deployer.publish_credentials(app_target(spec, env), tokens)
            return ids

    def granted(self, org: Organisation, caller: str, endpoint: str, env: str) -> tuple[Any, Need]:
        """The recorded policy and what it grants policy caller ``caller`` on ``endpoint.env``; refused
        (AccessError, one line naming the policy file) when it grants nothing there. Only reads: nothing is
        issued, recorded or published."""
        recorded = _recorded(self.book)
        shown = _policy_file()
        if recorded is None:
            raise AccessError(f"{caller} may not call {endpoint}.{env}: no policy is recorded in the ledger, so "
                              f"none grants it (record {shown} with onepath policy init --as <platform admin>)")
        need = next((n for n in policy_needs(org, recorded)
                     if n.caller == caller and n.endpoint == endpoint and n.env == env), None)
        if need is None:
            raise AccessError(f"{caller} may not call {endpoint}.{env}: the recorded policy (ledger "
                              f"#{recorded.seq}) grants it no access there (access.callers.{caller} in {shown}; "
                              f"record a change with onepath policy apply)")
        return recorded, need

    def caller_token(self, org: Organisation, caller: str, endpoint: str, env: str) -> str:
        """The credential of policy caller ``caller`` for ``endpoint.env``: from its store, issued on first use
        when the recorded policy grants it, a fresh secret when the store lost it. Refused (AccessError, one
        line naming the policy file) when the recorded policy does not grant it."""
        with self._locked():
            recorded, need = self.granted(org, caller, endpoint, env)
            live = [g for g in self.state().values() if g.caller == caller and g.endpoint == endpoint
                    and g.env == env and g.live and tuple(g.routes) == need.routes]
            if live:
                token = self._stored(live[-1])
                if token is not None:
                    return token
                token = self._rotate(live[-1], recorded.policy.access.overlap_seconds)
            else:
                _, token = self._issue(need)
            self._publish(org, endpoint, env)
            self._store(caller, endpoint, env, token)
            return token

    def stored_credential(self, org: Organisation, caller: str, endpoint: str, env: str) -> Callable[[], str | None]:
        """``caller_token`` now (refused as it is), then a function that answers the store's token, read again
        whenever its file changed: a rotation during a long run (simulate-traffic) reaches the next request."""
        token = self.caller_token(org, caller, endpoint, env)
        return wire.WatchedToken(self.caller_file(caller, endpoint, env), token)

    def revoke(self, org: Organisation | None, grant_id: str, why: str) -> Grant:
        why = " ".join((why or "").split())
        if not why:
            raise AccessError("say why: onepath access revoke GRANT --why TEXT (it is recorded in the ledger)")
        with self._locked():
            g = self.state().get(grant_id)
            if g is None:
                raise AccessError(f"no grant '{grant_id}' (onepath access list shows them)")
            already = not g.live
            if not already:
                self._revoke(g, why)
            try:  # published every time, also for a grant revoked already: a publish that failed is retried here
                self._publish(org, g.endpoint, g.env)
            except Exception as err:
                g = self.state()[grant_id]
                raise AccessError(f"grant {grant_id} is revoked in the ledger (#{g.revoked['seq']}) but NOT in force "  # type: ignore[index]
                                  f"yet: publishing {g.endpoint}.{g.env}'s table failed: {err}; run the same "
                                  f"command again (or onepath access reconcile)") from None
            if already:
                raise AccessError(f"grant {grant_id} was revoked already at {g.revoked['at']} "  # type: ignore[index]
                                  f"(ledger #{g.revoked['seq']}): {g.revoked['why']}; its table is published again")  # type: ignore[index]
            return self.state()[grant_id]

    def rotate(self, org: Organisation, grant_id: str) -> Grant:
        """A new secret for ``grant_id``, its old one refused ``overlap_seconds`` later. An app's grant is
        rotated with every other live grant of that app in that environment (its credentials are published
        as one set); a policy caller's new secret goes to the store."""
        with self._locked():
            g = self.state().get(grant_id)
            if g is None:
                raise AccessError(f"no grant '{grant_id}' (onepath access list shows them)")
            if not g.live:
                raise AccessError(f"grant {grant_id} is revoked: a revoked grant is never rotated (its caller gets a "
                                  f"new grant: an app by its next deploy, a policy caller on its next use)")
            overlap = _access_policy(_recorded(self.book)).overlap_seconds
            self._rotate_set(org, g, overlap)
            return self.state()[grant_id]

    def _rotate_set(self, org: Organisation, g: Grant, overlap: float) -> list[Grant]:
        """Rotate ``g`` (and, for an app, its siblings); publish the tables, then hand over the secrets."""
        state = self.state()
        if g.caller.startswith("app:"):
            name = g.caller.removeprefix("app:")
            spec = org.by_name.get(name)
            group = [x for x in state.values() if x.caller == g.caller and x.env == g.env and x.live]
            tokens = {x.endpoint.upper(): self._rotate(x, overlap) for x in group}
            after = self.state()
            for x in group:
                self._publish(org, x.endpoint, x.env, after)
            if isinstance(spec, AppSpec) and g.env in spec.environments:
                self.deployer.publish_credentials(app_target(spec, g.env), tokens)
            else:  # an app no longer declared: its grants are revoked by reconcile, nothing to hand over
                tokens.clear()
            return group
        token = self._rotate(g, overlap)
        self._publish(org, g.endpoint, g.env)
        self._store(g.caller, g.endpoint, g.env, token)
        return [g]

    def reconcile(self, org: Organisation, published: dict[str, str] | None = None) -> Reconciled:
        """Revoke what nothing justifies any more, rotate what is older than ``rotate_after_days``, and
        publish every endpoint environment's table whose content differs from ``published`` (slot -> digest
        of what was written last; None: publish all)."""
        out = Reconciled()
        with self._locked():
            recorded = _recorded(self.book)
            policy = _access_policy(recorded)
            needs = {(n.caller, n.endpoint, n.env): n for n in [*app_needs(org), *policy_needs(org, recorded)]}
            now = self.clock()
            for g in list(self.state().values()):
                if not g.live:
                    continue
                why = self._unjustified(g, needs.get((g.caller, g.endpoint, g.env)), org, recorded)
                if why:
                    self._revoke(g, why)
                    out.revoked.append({"grant": g.id, "caller": g.caller, "endpoint": g.endpoint, "env": g.env,
                                        "why": why})
            rotated: set[str] = set()
            for g in list(self.state().values()):
                if not g.live or g.id in rotated:
                    continue
                if g.secret_age(now) < timedelta(days=policy.rotate_after_days) and self._held(org, g):
                    continue
                try:
                    group = self._rotate_set(org, g, policy.overlap_seconds)
                except Exception as err:  # one failed hand-over must not stop the others
                    out.errors.append(f"rotating grant {g.id} ({g.caller} on {g.endpoint}.{g.env}): {err}")
                    continue
                for x in group:
                    rotated.add(x.id)
                    out.rotated.append({"grant": x.id, "caller": x.caller, "endpoint": x.endpoint, "env": x.env})
            state = self.state()
            slots = {(ep.name, env) for ep in org.of_kind("endpoint") for env in ep.environments}
            slots |= {(g.endpoint, g.env) for g in state.values()}
            for endpoint, env in sorted(slots):
                doc = table(state, endpoint, env)
                digest, slot = table_digest(doc), f"{endpoint}.{env}"
                out.digests[slot] = digest
                if published is not None and published.get(slot) == digest:
                    continue
                try:
                    self.deployer.publish_grants(_endpoint_target_named(org, endpoint, env), doc)
                    out.published.append(slot)
                except Exception as err:
                    out.digests.pop(slot, None)
                    out.errors.append(f"publishing the access table of {slot}: {err}")
        return out

    def _held(self, org: Organisation, g: Grant) -> bool:
        """Whether an app grant's current secret is what the app holds (a policy caller's is checked by
        ``caller_token`` against its store). False when a hand-over did not happen, say a rotation whose
        tables were written but whose credentials never reached the app, whose old secret then runs out:
        reconcile rotates it again and hands it over."""
        if not g.caller.startswith("app:"):
            return True
        spec = org.by_name.get(g.caller.removeprefix("app:"))
        if not isinstance(spec, AppSpec) or g.env not in spec.environments:
            return True  # reconcile revokes it; nothing to hand over
        try:
            held = self.deployer.held_credentials(app_target(spec, g.env))
        except Exception:  # a backend that cannot say: nothing is judged missing
            return True
        return held is None or held.get(g.endpoint.upper()) == g.current.sha256

    @staticmethod
    def _unjustified(g: Grant, need: Need | None, org: Organisation, recorded: Any) -> str | None:
        if need is not None:
            if tuple(g.routes) != need.routes:
                return (f"its routes [{', '.join(g.routes)}] are no longer what {need.because} grants "
                        f"([{', '.join(need.routes)}])")
            return None
        ep = org.by_name.get(g.endpoint)
        if not isinstance(ep, EndpointSpec) or g.env not in ep.environments:
            return f"endpoint {g.endpoint}.{g.env} is no longer declared"
        if g.caller.startswith("app:"):
            app = org.by_name.get(g.caller.removeprefix("app:"))
            if not isinstance(app, AppSpec):
                return f"app {g.caller.removeprefix('app:')} is no longer declared"
            if g.env not in app.environments:
                return f"app {app.name} no longer has environment {g.env}"
            return f"app {app.name} no longer declares calls: [{g.endpoint}] ({org.sources.get(app.name) or 'its declaration'})"
        where = f"the recorded policy (ledger #{recorded.seq})" if recorded is not None else "no recorded policy"
        return f"{where} no longer grants {g.caller} {g.endpoint}.{g.env} (access.callers)"


def access_for(settings: Any, *, actor: str = "onepath", book: Any = None, deployer: Any = None) -> Access:
    """An :class:`Access` on the platform's own ledger and local deployer (what the CLI uses)."""
    from platform_defs.wiring import build_resources

    res = build_resources(settings)
    return Access(book if book is not None else res["ledger"].ledger(),  # type: ignore[attr-defined]
                  deployer if deployer is not None else res["deployer_local"].deployer(),  # type: ignore[attr-defined]
                  settings.home, actor=actor)


def cli_token(settings: Any, org: Organisation, endpoint: str, env: str) -> str:
    """The ``onepath-cli`` credential for ``endpoint.env`` (issued on first use under the recorded policy)."""
    return access_for(settings, actor=CLI_CALLER).caller_token(org, CLI_CALLER, endpoint, env)


def cli_header(settings: Any, org: Organisation, endpoint: str, env: str) -> dict[str, str]:
    return wire.bearer(cli_token(settings, org, endpoint, env))


__all__ = ["APP_ROUTES", "Access", "AccessError", "CLI_CALLER", "Grant", "Need", "Reconciled", "access_for",
           "app_caller", "app_needs", "cli_header", "cli_token", "grants", "policy_needs", "table", "table_digest"]
