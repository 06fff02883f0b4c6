"""The one promotion flow: lock → gate → verified artifact → deploy → alias → ledger → bake → model card,
and every way back.

This module is the only code that moves traffic, moves an MLflow alias, or writes a ``deploy`` or
``rollback`` ledger entry. The endpoint and app assets (the UI), ``onepath rollback`` (the CLI), the
``rollback`` job, the bake's automatic rollback and the relay of a supervisor's crash-loop fallback
all call it; it takes plain objects (:class:`Services`) and returns a result or raises one
:class:`PromotionError`, so it runs and is tested without Dagster.

What it guarantees, on every path:

* **Exactly one promotion per endpoint (or app) environment at a time.** The flow holds the lease
  ``promotion:<name>.<env>`` in the ledger's database (``Ledger.acquire_lease``) while it works and
  renews it from a heartbeat thread. A second promotion waits for it (``wait_seconds``), then
  re-evaluates what to deploy: when the version it would deploy already serves, it deploys nothing. So
  does one asked for (``asked_at``: its run's creation) before another promotion, that finished before
  this one took the lock, deployed that very version (a sensor's run and a person's at once).
  The lease's fencing token goes to the server side before the switch (``Deployer.fence``) and
  with it (``deploy(..., fencing_token=...)``), and every ``deploy``/``rollback`` entry is appended
  fenced by it, so a holder that stalled and lost its lease can neither switch traffic nor record.
* **What serves is what was approved, by content.** A model version's digest is fixed in the ledger
  when it is registered (``platform_defs.registration``); the flow fetches the version's folder
  verified against that digest, hands the digest to the deployer with the release (the worker
  refuses bytes that do not hash to it), and records it in the ``deploy`` entry.
* **A rollback is a promotion.** A way back goes only to a version that passed its gate for that
  environment under the policy in force (the gate is re-run where the policy changed since its
  verdict), with its registered digest. Where there is none, the environment stops serving and the
  ledger says why, rather than serve an ungoverned version.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator
from contextlib import contextmanager

from platform_defs.access import app_target, endpoint_target
from platform_defs.policy import Policy, policy_hash
from platform_defs.specs import AppSpec, DatasetSpec, EndpointSpec, ModelSpec, Organisation
from resources.deployers.base import Deployer, DeployError, Release, Target, serving_version
from resources.ledger import STORE_ERRORS, Entry, Lease, LeaseHeld, LeaseLost, Ledger, store_error_text

LEASE_TTL_SECONDS = 30.0  # a holder that stops renewing loses the lock this long after its last renewal
LEASE_RENEW_SECONDS = 10.0
LOCK_WAIT_SECONDS = 900.0  # how long a promotion waits for another one of the same environment (a bake included)


# --------------------------------------------------------------------------------------------
# What the flow works with, and what it returns


@dataclass
class Services:
    """The outside world, as the flow uses it (built from the Dagster resources, or by the CLI)."""

    mlflow: Any  # resources.mlflow_registry.MlflowRegistry
    deployer: Deployer
    ledger: Ledger
    data_store: Any = None  # resources.data_store.DataStore (model gates read snapshots)
    releases_dir: Path | None = None  # app release builds (with releases_url: the local cache of the bundles)
    releases_url: str | None = None  # ONEPATH_RELEASES_URL: app release bundles on S3; None: the folders only
    log: Callable[[str], None] = lambda message: None
    warn: Callable[[str], None] = lambda message: None

    def releases(self) -> Any:
        """Where app releases are kept (:class:`resources.release_store.ReleaseStore`)."""
        from resources.release_store import ReleaseStore

        assert self.releases_dir is not None
        return ReleaseStore(self.releases_dir, self.releases_url)


class PromotionError(RuntimeError):
    """A promotion (or a way back) was refused or failed. The message is one line and says what keeps
    serving; ``verdicts`` are the gate's, when it ran; ``metadata`` is for the asset's failure."""

    def __init__(self, message: str, *, verdicts: list | None = None, metadata: dict[str, Any] | None = None):
        super().__init__(one_line(message))
        self.verdicts = list(verdicts or [])
        self.metadata = dict(metadata or {})


@dataclass
class Promotion:
    subject: str  # endpoint or app name
    env: str
    version: str
    previous: str | None
    address: str | None
    digest: str | None
    outcome: str  # "deployed" | "already serving"
    deploy_entry: int | None = None
    verdicts: list = field(default_factory=list)
    bake: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, str] = field(default_factory=dict)  # an app's: the variable it reads -> the address
    seconds: float = 0.0


@dataclass(frozen=True)
class RollbackResult:
    endpoint: str
    env: str
    model: str
    from_version: str | None  # what served before (None: nothing answered)
    to_version: str
    address: str
    reason: str
    actor: str
    alias: str  # "<model>@<env>", now pointing at to_version
    rollback_entry: int  # ledger seq of the 'rollback' entry
    deploy_entry: int  # ledger seq of the new 'deploy' entry
    restored_deploy_entry: int  # ledger seq of the original deploy of to_version in this env
    digest: str | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"rolled back {self.endpoint}.{self.env} from version {self.from_version or 'nothing'} to version "
                f"{self.to_version} at {self.address} (MLflow alias {self.alias} -> {self.to_version}; "
                f"ledger #{self.rollback_entry} rollback, #{self.deploy_entry} deploy)")


def one_line(text: Any, limit: int = 600) -> str:
    flat = re.sub(r"\s+", " ", str(text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def refusals_in_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What the flow's callers catch is :class:`PromotionError`: a lost lease, a ledger that no longer
    matches its anchor, or an MLflow that cannot be reached become one too (one line), not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PromotionError:
            raise
        except Exception as err:
            from mlflow.exceptions import MlflowException

            from resources.ledger import LedgerTampered

            if isinstance(err, (LeaseLost, LedgerTampered, MlflowException)):
                subject = args[2] if len(args) > 2 else fn.__name__  # (org, policy, name or spec, env, ...)
                name = subject if isinstance(subject, str) else getattr(subject, "name", fn.__name__)
                env = f".{args[3]}" if len(args) > 3 else ""
                raise PromotionError(f"{name}{env}: {type(err).__name__}: {err}") from None
            raise

    return wrapper


# --------------------------------------------------------------------------------------------
# Targets and releases


def endpoint_release(spec: EndpointSpec, model: ModelSpec, dataset: DatasetSpec, version: str,
                     artifact: Any, digest: str | None, *, env: str) -> Release:
    """What a deployer gets to serve ``version`` of ``model`` at ``spec`` in ``env`` (a promotion and a
    rollback alike)."""
    return Release(version=version, artifact=str(artifact), workers=spec.workers_in(env), digest=digest, config={
        "model_name": model.name, "pii_columns": dataset.pii_columns, "max_batch": spec.max_batch,
        "model_threads": spec.model_threads, "inference_log": spec.inference_log,
        "pass_through": list(spec.pass_through),
    })


def resolve_endpoint(org: Organisation, name: str, env: str) -> tuple[EndpointSpec, ModelSpec, DatasetSpec]:
    spec = org.by_name.get(name)
    if not isinstance(spec, EndpointSpec):
        declared = ", ".join(sorted(d.name for d in org.of_kind("endpoint"))) or "none"
        what = f"is a {spec.kind}, not an endpoint" if spec is not None else "is not declared"
        raise PromotionError(f"endpoint '{name}' {what} (declared endpoints: {declared})")
    if env not in spec.environments:
        raise PromotionError(f"endpoint '{name}' has no environment '{env}' "
                             f"(its environments: {', '.join(spec.environments)})")
    model = org.by_name[spec.model]
    assert isinstance(model, ModelSpec)
    dataset = org.by_name[model.dataset]
    assert isinstance(dataset, DatasetSpec)
    return spec, model, dataset


# --------------------------------------------------------------------------------------------
# The lock


class PromotionLock:
    """A held promotion lease, renewed by a heartbeat thread until released."""

    def __init__(self, book: Ledger, lease: Lease):
        self.book, self.lease = book, lease
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease:{lease.name}", daemon=True)
        self._thread.start()

    @property
    def token(self) -> int:
        return self.lease.token

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_RENEW_SECONDS):
            try:
                self.lease = self.book.renew_lease(self.lease, LEASE_TTL_SECONDS)
            except LeaseLost as err:
                self.lost = str(err)
                return
            except Exception as err:  # noqa: BLE001 - the database was busy or away: try again next beat
                self.lost = None if time.time() < self.lease.expires_at else f"{self.lease.name}: lease not renewed: {err}"

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this grant is still current (and not about to expire)."""
        if self.lost:
            raise LeaseLost(self.lost)
        if self.lease.expires_at - time.time() < LEASE_RENEW_SECONDS / 2:
            self.lease = self.book.renew_lease(self.lease, LEASE_TTL_SECONDS)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=LEASE_RENEW_SECONDS)
        try:
            self.book.release_lease(self.lease)
        except STORE_ERRORS:  # the store is away: the lease expires by itself (LEASE_TTL_SECONDS)
            pass


def superseded(book: Ledger, subject: str, env: str, version: str, previous: str | None, *, waited: bool,
               asked_at: datetime | None) -> bool:
    """Whether another promotion already did what this one was asked to: ``version`` serves ``subject.env``
    (``previous``) and was deployed by a promotion this one waited for, or recorded after this one was asked
    (``asked_at``). A promotion asked after the last deploy of its version redeploys it, as asked."""
    if previous != version:
        return False
    if waited:
        return True
    if asked_at is None:
        return False
    deploys = book.entries(kind="deploy", subject=subject, env=env)
    return bool(deploys) and str(deploys[-1].data.get("version")) == version \
        and datetime.fromisoformat(deploys[-1].ts) >= asked_at


def lock_name(subject: str, env: str) -> str:
    return f"promotion:{subject}.{env}"


@contextmanager
def promotion_lock(book: Ledger, subject: str, env: str, holder: str,
                   wait_seconds: float = LOCK_WAIT_SECONDS) -> Iterator[tuple[PromotionLock, bool]]:
    """Hold the promotion lease of ``subject.env``; yields ``(lock, waited)`` where ``waited`` says another
    promotion held it first (so the caller re-evaluates). Refused with the holder's name after
    ``wait_seconds``."""
    name = lock_name(subject, env)
    deadline = time.monotonic() + wait_seconds
    waited = False
    while True:
        try:
            lease = book.acquire_lease(name, holder, LEASE_TTL_SECONDS)
            break
        except LeaseHeld as held:
            if time.monotonic() >= deadline:
                raise PromotionError(f"{subject}.{env}: refused: {held}") from None
            waited = True
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))  # polling a lease, with a deadline
    lock = PromotionLock(book, lease)
    try:
        yield lock, waited
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------
# Gate records


CLAIMS_FROM = "dagster run tags (unauthenticated)"


def client_claims(trigger: str | None, initiated_by: str | None = None, source: str = CLAIMS_FROM) -> dict[str, Any]:
    """What the launcher of a run said about it (what started it, who), recorded as claims: run tags are
    set by whoever launches the run, so the ledger's fact is the entry's ``actor`` (``dagster:<run id>``)."""
    return {"trigger": trigger, **({"initiated_by": initiated_by} if initiated_by else {}), "from": source}


def judge(book: Ledger, policy: Policy, required: list[str], evaluate: Callable[[], list]) -> tuple[list, Any]:
    """The gate's verdicts, and the policy's standing they were judged under: every gate of every path (a
    promotion, an app release, a way back's recheck) goes through here. When the policy file in use is not
    the policy recorded in the ledger (``policy_record.policy_standing``), no check runs: each required
    check is a failed verdict saying why and which command records the policy, and nothing deploys."""
    from platform_defs.governance.gates import Verdict
    from platform_defs.policy_record import policy_standing

    standing = policy_standing(book, policy)
    if standing.ok:
        return evaluate(), standing
    meta: dict[str, Any] = {"policy_problem": standing.problem}
    if standing.entry_seq is not None:
        meta["policy_entry"] = standing.entry_seq
    return [Verdict(check, False, standing.problem or "the policy is not recorded", dict(meta))
            for check in (required or ["policy"])], standing



def _code_of(v: Any) -> dict[str, Any]:
    """A custom check's verdict: the code that judged it (function, distribution, module sha256)."""
    keys = ("check_function", "provided_by", "check_sha256")
    return {k: v.metadata[k] for k in keys if k in v.metadata} if "check_sha256" in v.metadata else {}

def record_gate(book: Ledger, verdicts: list, *, subject: str, env: str, actor: str, version: str,
                who: dict[str, str], still_serving: str | None, policy: Policy, trigger: str | None = None,
                claims: dict[str, Any] | None = None, standing: Any = None) -> str | None:
    """Record the gate's verdicts (with the hash of the policy they were judged under and the ledger entry
    that recorded it); return the refusal message when any failed, else None. A version held back only by
    a missing approval is recorded as ``awaiting_approval`` (naming who may approve and the command), not
    as a refusal. ``trigger``/``claims``: what the run's launcher said (recorded as claims)."""
    if standing is None:
        from platform_defs.policy_record import policy_standing

        standing = policy_standing(book, policy)
    failed = [v for v in verdicts if not v.passed]
    claims = claims or client_claims(trigger)
    book.append("gate_verdict", subject, {
        **who, "version": version, "passed": not failed, "claims": claims, "policy_hash": policy_hash(policy),
        "policy_entry": standing.entry_seq if standing.ok else None,
        **({} if standing.ok else {"policy_problem": standing.problem}),
        "verdicts": {v.check: {"passed": v.passed, "summary": v.summary, **_code_of(v)} for v in verdicts}},
        actor, env=env)
    if not failed:
        return None
    if standing.ok and [v.check for v in failed] == ["approval"]:
        book.append("awaiting_approval", subject, {
            **who, "version": version, "still_serving": still_serving, "claims": claims,
            "approvers": failed[0].metadata.get("approvers"), "command": failed[0].metadata.get("command")},
            actor, env=env)
    else:
        book.append("promotion_refused", subject, {**who, "version": version, "still_serving": still_serving,
                                                   "failed": [v.check for v in failed], "claims": claims},
                    actor, env=env)
    return (f"{subject}.{env}: version {version} refused; "
            + "; ".join(f"{v.check}: {v.summary}" for v in failed)
            + f". {still_serving or 'Nothing'} keeps serving.")


def _model_gate(spec: EndpointSpec, model: ModelSpec, dataset: DatasetSpec, org: Organisation, policy: Policy,
                services: Services) -> Any:
    from platform_defs.governance.gates import ModelGate

    features, label = org.model_features(model)
    return ModelGate(endpoint=spec, model=model, dataset=dataset, features=features, label=label, policy=policy,
                     mlflow=services.mlflow, data_store=services.data_store, ledger=services.ledger,
                     deployer=services.deployer)


# checks a way back does not re-run: a rollback goes, by definition, to an older version than the one serving
NOT_RECHECKED_ON_THE_WAY_BACK = ("no_regression",)


def _passed_gate(book: Ledger, policy: Policy, name: str, env: str, version: str,
                 noun: str) -> tuple[Entry | None, Any, str | None]:
    """What every way back starts from: ``(newest passed gate verdict of version in env, the policy standing,
    None)``, or ``(None, standing, why not)`` when the policy file is not the recorded one in force (fail
    closed: nothing is governed) or the version never passed that gate. ``noun``: "version" or "release"."""
    from platform_defs.policy_record import policy_standing

    standing = policy_standing(book, policy)
    if not standing.ok:
        return None, standing, f"{noun} {version} cannot be judged: {standing.problem}"
    passed = [e for e in book.entries(kind="gate_verdict", subject=name, env=env)
              if str(e.data.get("version")) == version and e.data.get("passed")]
    if not passed:
        return None, standing, f"{noun} {version} never passed the {env} gate of {name}"
    return passed[-1], standing, None


def _verdicts_of_the_deploy(book: Ledger, name: str, env: str, version: str, noun: str) -> list:
    """The verdicts of the newest passed gate of ``version`` in ``name.env``, read back from the ledger: what a
    promotion that finds its version already deployed (by another run, while it waited for the lock) reports
    as its checks; a version serving there that never passed that gate is refused."""
    from platform_defs.governance.gates import Verdict

    passed = [e for e in book.entries(kind="gate_verdict", subject=name, env=env)
              if str(e.data.get("version")) == version and e.data.get("passed")]
    if not passed:
        raise PromotionError(f"{name}.{env}: {noun} {version} serves but never passed the {env} gate")
    entry = passed[-1]
    return [Verdict(check, bool(v.get("passed")), f"{v.get('summary')} (gate of ledger entry #{entry.seq}, passed by "
                    f"the promotion that deployed it since this one was asked)", {"ledger_entry": entry.seq})
            for check, v in (entry.data.get("verdicts") or {}).items()]


def governed(org: Organisation, policy: Policy, spec: EndpointSpec, env: str, version: str, *,
             services: Services, actor: str, recheck: bool = True, operator_choice: bool = False) -> str | None:
    """Why ``version`` may NOT serve ``spec.env`` on a way back, or None when it may: it passed its gate
    for that environment, under the policy in force (where the policy changed since, the gate is run
    again now, and recorded; with ``recheck=False`` such a version is simply not governed), and it has
    not failed its bake there since. A crash loop since its gate rules it out of every automatic choice
    too; an operator who names it (``operator_choice``) may restore it: a crash loop can be the host's
    doing (killed workers, memory), a failed bake is a verdict on the version."""
    book = services.ledger
    last, standing, refusal = _passed_gate(book, policy, spec.name, env, version, "version")
    if last is None:
        return refusal
    # judged bad here since its gate passed: it failed its bake, or crash-looped, in this environment
    for e in book.entries(subject=spec.name, env=env, since_seq=last.seq):
        if e.kind == "bake_failed" and str(e.data.get("version")) == version:
            return f"version {version} failed its bake in {env} (ledger #{e.seq})"
        if e.kind == "crashloop" and str(e.data.get("version")) == version and not operator_choice:
            return f"version {version} crash-looped in {env} (ledger #{e.seq})"
    revoked = _approval_revoked(org, policy, spec, env, version, book)
    if revoked:
        return revoked
    if last.data.get("policy_hash") == policy_hash(policy):
        return None
    if not recheck:
        return f"version {version} passed its {env} gate under an earlier policy and was not judged under this one"
    _, model, dataset = resolve_endpoint(org, spec.name, env)
    gate = _model_gate(spec, model, dataset, org, policy, services)
    required = [c for c in gate.required(env) if c not in NOT_RECHECKED_ON_THE_WAY_BACK]
    verdicts, standing = judge(book, policy, required, lambda: gate.evaluate(version, env))
    verdicts = [v for v in verdicts if v.check not in NOT_RECHECKED_ON_THE_WAY_BACK]
    failed = [v for v in verdicts if not v.passed]
    book.append("gate_verdict", spec.name, {
        "model": model.name, "version": version, "passed": not failed, "trigger": "way back: policy changed",
        "policy_hash": policy_hash(policy), "policy_entry": standing.entry_seq if standing.ok else None,
        "verdicts": {v.check: {"passed": v.passed, "summary": v.summary, **_code_of(v)} for v in verdicts}},
        actor, env=env)
    if failed:
        return (f"version {version} no longer passes the {env} gate under the policy in force: "
                + "; ".join(f"{v.check}: {v.summary}" for v in failed))
    return None


def _approval_revoked(org: Organisation, policy: Policy, spec: EndpointSpec, env: str, version: str,
                      book: Ledger) -> str | None:
    """Why a way back may not restore ``version`` where the track asks for approval: every approval it had
    there was revoked since (an expired one does not stop a way back: it was approved, and time alone
    is no verdict on the version; a new promotion needs a new approval)."""
    from platform_defs.governance.approval_standing import standing
    from platform_defs.registration import registered_author, registration
    from resources.approvals import Registered

    model = org.by_name[spec.model]
    track = policy.track(model.track)
    if env not in track.approval_envs:
        return None
    reg = registration(book, model.name, version)
    if reg is None:
        return None  # the digest check refuses it anyway, naming the missing registration
    author, _ = registered_author(reg)
    s = standing(book, policy, asset=model.name, version=version, env=env, owner_team=model.owner, author=author,
                 role=track.approver_role, registered=Registered.of_model(reg), valid_days=None)
    if s.revoked and not s.valid:
        return f"version {version}'s approval in {env} was revoked: " + "; ".join(x for x in s.lapsed())
    return None


def app_governed(policy: Policy, spec: AppSpec, env: str, version: str, *, services: Services,
                 repo_root: Path | None = None, crashloop_rules_out: bool = True) -> str | None:
    """Why app release ``version`` may NOT serve ``spec.env`` on a way back, or None when it may (the app
    counterpart of :func:`governed`): the policy file is the recorded policy in force, the release passed
    its gate for that environment under this very policy (an app's way back runs no gate again: one judged
    under an earlier policy is refused, saying so), it has not crash-looped there since its gate
    (``crashloop_rules_out``: for an automatic choice), and, where the app track asks for a code review
    there, its review was not revoked (an expired one does not stop a way back, as for models)."""
    book = services.ledger
    last, standing, refusal = _passed_gate(book, policy, spec.name, env, version, "release")
    if last is None:
        return refusal
    if crashloop_rules_out:
        for e in book.entries(subject=spec.name, env=env, since_seq=last.seq):
            if e.kind == "crashloop" and str(e.data.get("version")) == version:
                return f"release {version} crash-looped in {env} (ledger #{e.seq})"
    if last.data.get("policy_hash") != policy_hash(policy):
        return (f"release {version} passed its {env} gate (ledger #{last.seq}) under another policy than the "
                f"one in force (ledger #{standing.entry_seq}) and an app's way back does not run its gate again: "
                f"refused; promote it through its gate")
    return _review_revoked(policy, spec, env, version, book, repo_root)


def _review_revoked(policy: Policy, spec: AppSpec, env: str, version: str, book: Ledger,
                    repo_root: Path | None) -> str | None:
    """Why a way back may not restore app release ``version`` where the app track asks for a code review:
    every review it had there was revoked since (or its authors cannot be listed, so no review is known
    to stand)."""
    from platform_defs.governance.approval_standing import standing
    from platform_defs.governance.gates import AppGate, AuthorsUnknown
    from resources.approvals import Registered

    track = policy.track("app")
    if "code_review" not in track.checks or env not in track.approval_envs:
        return None
    if repo_root is None:
        from platform_defs.settings import PROJECT_ROOT

        repo_root = PROJECT_ROOT
    gate = AppGate(app=spec, policy=policy, ledger=book, deployer=None, source_dir=repo_root / spec.source,
                   repo_root=repo_root)
    built = gate.release_registration(version)
    if built is None:
        return f"release {version} has no release_built ledger entry, so no review of it can stand"
    try:
        authors = gate.authors()
    except AuthorsUnknown as err:
        return f"git could not list the commit authors of release {version}, so no review of it is known to stand: {err}"
    s = standing(book, policy, asset=spec.name, version=version, env=env, owner_team=spec.owner, author=None,
                 role=track.approver_role, registered=Registered.of_release(built), valid_days=None, other_team=False,
                 author_emails=authors)
    if s.revoked and not s.valid:
        return f"release {version}'s code review in {env} was revoked: " + "; ".join(x for x in s.lapsed())
    return None


def fallback_release(org: Organisation, policy: Policy, spec: EndpointSpec, env: str, version: str, *,
                     services: Services, actor: str) -> Release | None:
    """What the backend may put back on its own if ``version`` crash-loops in ``spec.env``: the newest
    other version deployed there that is governed right now (gate passed under the policy in force, no
    failed bake or crash loop since; no gate is re-run for this), with its verified folder. None when
    there is none: the backend then stops the version instead of choosing one itself."""
    from platform_defs.registration import NotRegistered, verified_artifact
    from resources.mlflow_registry import ArtifactMismatch

    _, model, dataset = resolve_endpoint(org, spec.name, env)
    tried: set[str] = {version}
    for entry in reversed(services.ledger.entries(kind="deploy", subject=spec.name, env=env)):
        candidate = str(entry.data.get("version"))
        if candidate in tried:
            continue
        tried.add(candidate)
        if governed(org, policy, spec, env, candidate, services=services, actor=actor, recheck=False):
            continue
        try:
            artifact, digest = verified_artifact(services.ledger, services.mlflow, model.name, candidate)
        except (NotRegistered, ArtifactMismatch):
            continue
        return endpoint_release(spec, model, dataset, candidate, artifact, digest, env=env)
    return None


# --------------------------------------------------------------------------------------------
# Content


def _verified_artifact(services: Services, model: ModelSpec, version: str, *, subject: str, env: str,
                       actor: str, still_serving: str | None) -> tuple[Path, str]:
    """The version's model folder, verified against the digest fixed at registration."""
    from platform_defs.registration import NotRegistered, verified_artifact
    from resources.mlflow_registry import ArtifactMismatch

    keeps = f"{still_serving or 'nothing'} keeps serving"
    meta = {"refused_version": version, "still_serving": still_serving or "nothing"}
    try:
        return verified_artifact(services.ledger, services.mlflow, model.name, version)
    except NotRegistered as err:
        raise PromotionError(f"{subject}.{env}: {err}; {keeps}", metadata=meta) from None
    except ArtifactMismatch as err:
        services.ledger.append("artifact_refused", subject, {
            "model": model.name, "version": version, "expected_digest": err.expected, "found_digest": err.found,
            "error": one_line(err, 300), "still_serving": still_serving}, actor, env=env)
        raise PromotionError(f"{subject}.{env}: {err}; {keeps}", metadata=meta) from None


# --------------------------------------------------------------------------------------------
# Endpoints: promote


@refusals_in_one_line
def promote_endpoint(org: Organisation, policy: Policy, name: str, env: str, *, services: Services, actor: str,
                     trigger: str, initiated_by: str | None = None,
                     wait_seconds: float = LOCK_WAIT_SECONDS, version: str | None = None,
                     asked_at: datetime | None = None) -> Promotion:
    """Deploy into ``name.env`` what the graph says belongs there: in the first environment the model's
    newest registered version (a notebook model's: the version its declaration pins; ``version``, the run
    config's, when given), in a later one exactly what the environment before it serves (``version``, when
    given, must be that one: anything else is refused, never substituted).

    ``trigger`` and ``initiated_by`` come from the run's tags: they are recorded under ``claims``, never
    as facts (the fact is ``actor``)."""
    t0 = time.perf_counter()
    claims = client_claims(trigger, initiated_by)
    spec, model, dataset = resolve_endpoint(org, name, env)
    i = spec.environments.index(env)
    upstream_env = spec.environments[i - 1] if i else None
    target = endpoint_target(spec, env)
    track = policy.track(model.track)
    book, deployer, mlflow = services.ledger, services.deployer, services.mlflow
    with promotion_lock(book, spec.name, env, actor, wait_seconds) as (lock, waited):
        requested, why, newer = (str(version) if version not in (None, "") else None), "", []
        if upstream_env is None:
            from platform_defs.notebook import NotebookError, version_to_promote

            try:
                chosen, why, newer = version_to_promote(org, model.name, book, mlflow)
            except NotebookError as err:
                if requested is None:
                    raise PromotionError(f"{spec.name}.{env}: {err}") from None
                chosen = requested
            if requested is not None and requested != chosen:
                try:
                    mlflow.get_version(model.name, requested)
                except Exception:  # noqa: BLE001 - MLflow says "not found" in several ways
                    raise PromotionError(f"{spec.name}.{env}: version {requested} of model '{model.name}' is not "
                                         f"registered") from None
                newer = [v for v in newer + ([chosen] if int(chosen) > int(requested) else []) if v != requested]
                chosen, why = requested, "asked for (run config version)"
            version = chosen
            services.log(f"{spec.name}.{env}: version {version}: {why}"
                         + (f"; newer version(s) {', '.join(newer)} exist and are NOT deployed" if newer else ""))
        else:
            version = serving_version(deployer.status(endpoint_target(spec, upstream_env)))
            if version is None:
                raise PromotionError(f"{spec.name}: nothing healthy serves in '{upstream_env}' to promote "
                                     f"to '{env}'; deploy '{upstream_env}' first")
            why = f"what '{upstream_env}' serves"
            if requested is not None and requested != version:
                raise PromotionError(f"{spec.name}.{env}: version {requested} asked, but '{upstream_env}' serves "
                                     f"version {version}: promote {requested} to '{upstream_env}' first")
        before = deployer.status(target)
        previous = serving_version(before)
        if superseded(book, spec.name, env, version, previous, waited=waited, asked_at=asked_at):
            # another promotion of this environment left our version serving since we were asked
            services.log(f"{spec.name}.{env}: version {version} already serves (deployed by another promotion since "
                         f"this one was asked); nothing to do")
            return Promotion(spec.name, env, version, previous, before.address, before.serving_digest,
                             "already serving", seconds=round(time.perf_counter() - t0, 3),
                             verdicts=_verdicts_of_the_deploy(book, spec.name, env, version, "version"))
        if upstream_env is None and previous and previous != version:
            same = _no_better(services, model.name, version, previous, track.regression_metric)
            if same:
                book.append("promotion_skipped", spec.name, {
                    "model": model.name, "version": version, "still_serving": previous,
                    "reason": same, "claims": claims}, actor, env=env)
                raise PromotionError(f"{spec.name}.{env}: version {version} not promoted: {same}. "
                                     f"Version {previous} keeps serving.",
                                     metadata={"skipped_version": version, "still_serving": previous})
        services.log(f"{spec.name}.{env}: deploying {model.name} version {version} (serving before: "
                     f"{previous or 'nothing'}) at {deployer.address(target)}")
        gate = _model_gate(spec, model, dataset, org, policy, services)
        verdicts, standing = judge(book, policy, gate.required(env), lambda: gate.evaluate(version, env))
        refusal = record_gate(book, verdicts, subject=spec.name, env=env, actor=actor, version=version,
                              who={"model": model.name}, still_serving=previous, policy=policy, claims=claims,
                              standing=standing)
        if refusal:
            raise PromotionError(refusal, verdicts=verdicts, metadata={
                "refused_version": version, "still_serving": previous or "nothing",
                "failed_checks": ", ".join(v.check for v in verdicts if not v.passed)})
        artifact, digest = _verified_artifact(services, model, version, subject=spec.name, env=env, actor=actor,
                                              still_serving=previous)
        fallback = fallback_release(org, policy, spec, env, version, services=services, actor=actor)
        deploy_t0 = time.perf_counter()
        release = endpoint_release(spec, model, dataset, version, artifact, digest, env=env)
        with _never_off_the_record(services, target, release, lock, who={"model": model.name}, actor=actor,
                                   still_serving=previous, fallback=fallback) as record:
            status = _deploy(services, target, release, lock, who={"model": model.name}, actor=actor,
                             still_serving=previous, verdicts=verdicts, fallback=fallback)
            alias_error = _move_alias(services, lock, model.name, env, version)
            entry = book.append("deploy", spec.name, {
                **({"alias_error": alias_error} if alias_error else {}),
                "model": model.name, "version": version, "why": why, "newer_not_deployed": newer,
                "digest": digest, "previous_version": previous,
                "address": status.address, "promoted_from": upstream_env, "track": model.track,
                "owner": model.owner, "checks": [v.check for v in verdicts], "claims": claims,
                "policy_hash": policy_hash(policy), "fencing_token": lock.token,
                "fallback_version": fallback.version if fallback else None,
                "deploy_seconds": round(time.perf_counter() - deploy_t0, 3)}, actor, env=env, fence=lock.lease)
            record["recorded"] = True
        if alias_error:
            raise PromotionError(f"{spec.name}.{env}: version {version} serves (ledger #{entry.seq}), but the MLflow "
                                 f"alias {model.name}@{env} could not be moved: {alias_error}", verdicts=verdicts)
        result = Promotion(spec.name, env, version, previous, status.address, digest, "deployed",
                           deploy_entry=entry.seq, verdicts=verdicts)
        # a bake guards a switch: it watches the new version with the old one to return to. A first release
        # has none (its gate asked for a signed first-release record instead), so it does not bake.
        if env in track.bake.environments and previous and previous != version:
            result.bake = _bake_or_roll_back(org, policy, spec, model, env, version, previous, services, lock,
                                             actor, claims, verdicts)
    result.card = _model_card(model, version, verdicts, services)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _deploy(services: Services, target: Target, release: Release, lock: PromotionLock, *, who: dict[str, str],
            actor: str, still_serving: str | None, verdicts: list, fallback: Release | None) -> Any:
    """Switch ``target`` to ``release`` under the lock: the server side is fenced with the lock's token
    first, so a holder that lost the lock before us can no longer cut over, and our cutover carries it.
    ``fallback`` is the only release the backend may restore on its own if ``release`` crash-loops. An
    endpoint's access table is published first (``platform_defs.access``): a fresh slot serves its callers
    from its first request."""
    from platform_defs.access import Access, AccessError

    lock.check()

    def ledger_can_record() -> None:
        """Right before the cutover: the lease is renewed, a write the ledger's store must take, so a store that
        is away (PostgreSQL stopped) means no switch rather than a switch nobody can record."""
        lock.lease = services.ledger.renew_lease(lock.lease, LEASE_TTL_SECONDS)

    try:
        services.deployer.fence(target, lock.token)
        if target.kind == "endpoint":  # its callers' grants are in place before a fresh slot's first request
            Access(services.ledger, services.deployer).publish_table(target)
        return services.deployer.deploy(target, release, fencing_token=lock.token, fallback=fallback,
                                        before_cutover=ledger_can_record)
    except STORE_ERRORS as err:  # nothing switched, and nothing can be recorded either
        raise PromotionError(f"{target.slot}: version {release.version} not switched to: the ledger cannot "
                             f"record it ({store_error_text(err)}); {still_serving or 'nothing'} keeps serving",
                             verdicts=verdicts, metadata={"refused_version": release.version,
                                                          "still_serving": still_serving or "nothing"}) from None
    except (DeployError, AccessError, OSError) as err:
        services.ledger.append("promotion_refused", target.name, {
            **who, "version": release.version, "still_serving": still_serving, "failed": ["deploy"],
            "error": one_line(err, 500)}, actor, env=target.env)
        raise PromotionError(str(err), verdicts=verdicts, metadata={
            "refused_version": release.version, "still_serving": still_serving or "nothing"}) from None


@contextmanager
def _never_off_the_record(services: Services, target: Target, release: Release, lock: PromotionLock, *,
                          who: dict[str, str], actor: str, still_serving: str | None,
                          fallback: Release | None) -> Iterator[dict[str, bool]]:
    """Around a switch and its ``deploy`` entry: interrupted in between (SIGINT, Dagster's Terminate, an
    error while the alias moves), a version that already serves is recorded all the same, marked
    ``interrupted``, before the interruption goes on. The caller sets ``recorded`` once it appended its
    entry. Before the switch there is nothing to record: the deployer discarded its candidate.

    When the ledger itself cannot record the switch (its store went away after the cutover), traffic never
    stays on a version the ledger does not record: ``fallback`` (the governed version the ledger last
    recorded there) is put back, or with none the version is stopped, and the promotion fails saying so."""
    state = {"recorded": False}
    try:
        yield state
    except BaseException as err:
        if not state["recorded"] and not isinstance(err, PromotionError):
            status = services.deployer.status(target)
            if serving_version(status) == release.version and release.version != still_serving:
                try:
                    services.ledger.append("deploy", target.name, {
                        **who, "version": release.version, "digest": release.digest,
                        "previous_version": still_serving, "address": status.address, "fencing_token": lock.token,
                        "interrupted": f"the promotion was interrupted after the switch ({type(err).__name__}); "
                                       f"the alias may not have moved"}, actor, env=target.env, fence=lock.lease)
                except STORE_ERRORS as store_err:
                    raise PromotionError(_switch_back(services, target, release, fallback, lock, store_err),
                                         metadata={"refused_version": release.version,
                                                   "still_serving": fallback.version if fallback else "nothing"}
                                         ) from None
        raise


def _switch_back(services: Services, target: Target, release: Release, fallback: Release | None,
                 lock: PromotionLock, store_err: BaseException) -> str:
    """Put ``fallback`` back at ``target`` (or stop it) because the switch to ``release`` cannot be recorded;
    the message says what serves now. The ledger is away, so nothing of this is recorded: what serves is again
    what it last recorded there."""
    why = f"{target.slot}: version {release.version} served, but the ledger cannot record it ({store_error_text(store_err)})"
    try:
        if fallback is None:
            services.deployer.delete(target)
            return f"{why}: it was stopped (nothing governed to put back)"
        services.deployer.deploy(target, fallback, fencing_token=lock.token)
        return f"{why}: switched back to version {fallback.version}, which the ledger last recorded there"
    except (DeployError, OSError) as err:
        return (f"{why}, and switching back failed ({one_line(err, 300)}): version {release.version} serves "
                f"unrecorded until a promotion or rollback replaces it")


def _move_alias(services: Services, lock: PromotionLock, model: str, env: str, version: str) -> str | None:
    """Point MLflow alias ``env`` of ``model`` at ``version`` while the lock still holds; the error, if it
    could not be moved (the version serves already: the caller records it either way)."""
    from mlflow.exceptions import MlflowException

    lock.check()
    try:
        services.mlflow.set_alias(model, env, version)
    except MlflowException as err:
        return one_line(err, 200)
    return None


def _no_better(services: Services, model: str, candidate: str, serving: str, metric: str) -> str | None:
    """Why ``candidate`` is not worth promoting over ``serving``, or None. Only versions trained on the same
    snapshot are comparable (same held-out rows); on other data the gates decide. The facts are the
    ledger's registrations (what the platform measured), not MLflow's run metrics, which any client
    can log."""
    from platform_defs.registration import registration

    a, b = registration(services.ledger, model, candidate), registration(services.ledger, model, serving)
    if a is None or b is None:
        return None
    if not a.data.get("data_hash") or a.data.get("data_hash") != b.data.get("data_hash"):
        return None
    mine = (a.data.get("metrics") or {}).get(metric)
    theirs = (b.data.get("metrics") or {}).get(metric)
    if mine is None or theirs is None or mine > theirs + 1e-9:
        return None
    return (f"trained on the same data (snapshot {str(a.data['data_hash'])[:12]}) as version {serving}, which "
            f"serves, and no better: held-out {metric} {mine:.4f} vs {theirs:.4f}")


def _bake_or_roll_back(org: Organisation, policy: Policy, spec: EndpointSpec, model: ModelSpec, env: str,
                       version: str, previous: str, services: Services, lock: PromotionLock, actor: str,
                       claims: dict[str, Any], verdicts: list) -> dict[str, Any]:
    """Watch the freshly switched version for the policy's bake period on its own metrics. If it fails,
    put the previous version back through the way back (ledger: ``bake_failed``, then the rollback's
    entries) and raise."""
    from platform_defs.governance.bake import bake

    bp = policy.track(model.track).bake
    target = endpoint_target(spec, env)
    services.log(f"{spec.name}.{env}: baking version {version} for {bp.seconds:g} s "
                 f"(min {bp.min_requests} requests, error rate <= {bp.max_error_rate:.1%}, "
                 f"p99 <= {bp.max_p99_latency_ms:g} ms)")
    verdict = bake(services.deployer, target, version, bp)
    data = {"model": model.name, "version": version, "previous_version": previous, "claims": claims,
            **{k: v for k, v in verdict.as_dict().items() if k not in ("version",)}}
    if verdict.passed:
        services.ledger.append("bake_passed", spec.name, data, actor, env=env)
        return verdict.metadata
    services.ledger.append("bake_failed", spec.name, data, actor, env=env)
    try:  # a bake runs only when a previous version served here: that is the way back
        rb = _way_back(org, policy, spec, env, services, lock, to_version=previous,
                       reason=f"bake failed: {verdict.summary}", actor=actor, from_version=version)
        outcome = f"rolled back to version {rb.to_version} (ledger #{rb.rollback_entry})"
    except PromotionError as err:
        if serving_version(services.deployer.status(target)) == version:
            # nothing governed to go back to, and the version that failed its bake may not go on serving
            stop_serving(services, target, actor=actor, reason=(
                f"version {version} failed its bake ({verdict.summary}) and the way back was refused ({err}): "
                f"stopped, nothing serves"), extra={"model": model.name, "version": version})
            outcome = f"automatic rollback refused, {spec.name}.{env} stopped: {err}"
        else:
            outcome = f"automatic rollback failed: {err}"
    services.warn(f"{spec.name}.{env}: bake of version {version} failed ({verdict.summary}); {outcome}")
    raise PromotionError(f"{spec.name}.{env}: version {version} failed its bake: {verdict.summary}; {outcome}",
                         verdicts=verdicts, metadata={**verdict.metadata, "outcome": outcome})


def _model_card(model: ModelSpec, version: str, verdicts: list, services: Services) -> dict[str, Any]:
    """Write the version's model card (Markdown and HTML) into its MLflow run; every deploy refreshes
    it with the longer history. The version already serves: a card that cannot be written is a
    warning, not a failed deploy. Returns ``{"markdown", "html_uri"}`` or ``{"error"}``."""
    from platform_defs.governance.model_card import card_data_from, write_model_card

    mlflow = services.mlflow
    try:
        mv = mlflow.get_version(model.name, version)
        card = card_data_from(model, mv, mlflow.client().get_run(mv.run_id), verdicts, services.ledger.entries())
        with tempfile.TemporaryDirectory() as tmp:
            md_path, html_path = write_model_card(card, Path(tmp))
            for p in (md_path, html_path):
                mlflow.log_run_artifact(mv.run_id, p, "onepath/model_card")
            return {"markdown": md_path.read_text(),
                    "html_uri": f"runs:/{mv.run_id}/onepath/model_card/{html_path.name}"}
    except Exception as err:  # noqa: BLE001 - see docstring
        services.warn(f"model card not written: {type(err).__name__}: {err}")
        return {"error": str(err)}


# --------------------------------------------------------------------------------------------
# Endpoints: the way back


def rollback_target(deploys: list[Entry], current: str | None, to_version: str | None,
                    endpoint: str, env: str, serving: str | None = None) -> Entry:
    """The ``deploy`` entry to restore: ``to_version``'s newest, or the newest that is not ``current``
    (what is being rolled back from). ``to_version`` "already serves" only when it is ``serving``, what
    answers at the address right now: naming the version the ledger last recorded while nothing answers
    (it crash-looped, it was stopped) is how an operator brings it back."""
    label = f"{endpoint}.{env}"
    if to_version:
        matching = [e for e in deploys if str(e.data.get("version")) == to_version]
        if not matching:
            seen = sorted({str(e.data.get("version")) for e in deploys}, key=_version_key)
            raise PromotionError(
                f"{label}: version {to_version} was never deployed to {env} (no 'deploy' entry in the ledger), "
                f"so it was never approved there; versions deployed to {env}: {', '.join(seen) or 'none'}")
        if to_version == serving:
            raise PromotionError(f"{label}: version {to_version} already serves; nothing to roll back")
        return matching[-1]
    earlier = [e for e in deploys if str(e.data.get("version")) != current]
    if not earlier:
        if not deploys:
            raise PromotionError(f"{label}: nothing to roll back to: no version was ever deployed to {env}")
        raise PromotionError(f"{label}: nothing to roll back to: version {current} is the only version ever "
                             f"deployed to {env}")
    return earlier[-1]


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (1 << 62, v)


@refusals_in_one_line
def roll_back(org: Organisation, policy: Policy, name: str, env: str, *, services: Services, reason: str,
              actor: str, to_version: str | None = None, wait_seconds: float = LOCK_WAIT_SECONDS) -> RollbackResult:
    """Put back the previous governed version of ``name.env`` (or ``to_version``) at its stable address.

    Refused, one line, with what serves still serving: no reason or actor, an unknown endpoint or
    environment, a version never deployed there, one that no longer passes its gate, one whose bytes
    do not match its registered digest, or a deploy that fails."""
    reason, actor = (reason or "").strip(), (actor or "").strip()
    spec, _, _ = resolve_endpoint(org, name, env)
    label = f"{spec.name}.{env}"
    if not reason:
        raise PromotionError(f"{label}: a rollback needs a reason (it is recorded in the ledger)")
    if not actor:
        raise PromotionError(f"{label}: a rollback needs an actor (who rolls back)")
    to_version = str(to_version).strip() if to_version not in (None, "") else None
    with promotion_lock(services.ledger, spec.name, env, actor, wait_seconds) as (lock, _):
        return _way_back(org, policy, spec, env, services, lock, to_version=to_version, reason=reason, actor=actor)


@refusals_in_one_line
def _way_back(org: Organisation, policy: Policy, spec: EndpointSpec, env: str, services: Services,
              lock: PromotionLock, *, to_version: str | None, reason: str, actor: str,
              from_version: str | None = None) -> RollbackResult:
    t0 = time.perf_counter()
    _, model, dataset = resolve_endpoint(org, spec.name, env)
    book, deployer = services.ledger, services.deployer
    label = f"{spec.name}.{env}"
    target = endpoint_target(spec, env)
    serving = serving_version(deployer.status(target))
    deploys = book.entries(kind="deploy", subject=spec.name, env=env)
    recorded = str(deploys[-1].data.get("version")) if deploys else None
    # What serves now. If nothing answers (crashed, stopped), the version the ledger last recorded
    # is the one being rolled back from: never "restore" the version that just went down.
    current = from_version or serving or recorded
    chosen = rollback_target(deploys, current, to_version, spec.name, env, serving=serving)
    version = str(chosen.data.get("version"))
    why_not = governed(org, policy, spec, env, version, services=services, actor=actor,
                       operator_choice=to_version is not None)
    if why_not and to_version is None:
        # the newest earlier version may have been judged bad since: go back to the newest one that was not
        for earlier in reversed([e for e in deploys if str(e.data.get("version")) not in (current, version)]):
            if governed(org, policy, spec, env, str(earlier.data.get("version")), services=services,
                        actor=actor) is None:
                chosen, version, why_not = earlier, str(earlier.data.get("version")), None
                break
    if why_not:
        raise PromotionError(f"{label}: refused to roll back to version {version}: {why_not}; "
                             f"{serving or 'nothing'} keeps serving")
    artifact, digest = _verified_artifact(services, model, version, subject=spec.name, env=env, actor=actor,
                                          still_serving=serving)
    fallback = fallback_release(org, policy, spec, env, version, services=services, actor=actor)
    release = endpoint_release(spec, model, dataset, version, artifact, digest, env=env)
    with _never_off_the_record(services, target, release, lock, who={"model": model.name}, actor=actor,
                               still_serving=serving, fallback=fallback) as record:
        status = _deploy(services, target, release, lock, who={"model": model.name}, actor=actor, still_serving=serving,
                         verdicts=[], fallback=fallback)
        address = status.address or deployer.address(target)
        # The restored version serves. Move the alias (as a promotion does), then record; an alias that
        # could not be moved is recorded with the rollback and reported, since the deploy itself happened.
        alias_error = _move_alias(services, lock, model.name, env, version)
        rb = book.append("rollback", spec.name, {
            "model": model.name, "from_version": current, "to_version": version, "reason": reason, "digest": digest,
            "address": address, "serving_before": serving, "restored_deploy_entry": chosen.seq,
            "fencing_token": lock.token, **({"alias_error": alias_error} if alias_error else {}),
        }, actor, env=env, fence=lock.lease)
        dep = book.append("deploy", spec.name, {
            "model": model.name, "version": version, "digest": digest, "previous_version": serving,
            "address": address, "promoted_from": None, "track": model.track, "owner": model.owner,
            "checks": chosen.data.get("checks") or list(policy.track(model.track).checks), "via": "rollback",
            "rollback_entry": rb.seq, "policy_hash": policy_hash(policy), "fencing_token": lock.token,
            "fallback_version": fallback.version if fallback else None,
        }, actor, env=env, fence=lock.lease)
        record["recorded"] = True
    if alias_error:
        raise PromotionError(f"{label}: version {version} serves again at {address} (ledger #{rb.seq}), but the "
                             f"MLflow alias {model.name}@{env} could not be moved: {alias_error}")
    return RollbackResult(
        endpoint=spec.name, env=env, model=model.name, from_version=current, to_version=version,
        address=address, reason=reason, actor=actor, alias=f"{model.name}@{env}", rollback_entry=rb.seq,
        deploy_entry=dep.seq, restored_deploy_entry=chosen.seq, digest=digest,
        seconds=round(time.perf_counter() - t0, 3),
    )


def stop_serving(services: Services, target: Target, *, reason: str, actor: str,
                 extra: dict[str, Any] | None = None) -> Entry:
    """Stop ``target`` (nothing governed to serve there) and record why."""
    services.deployer.delete(target)
    return services.ledger.append("serving_stopped", target.name, {
        "reason": reason, **(extra or {})}, actor, env=target.env)


@refusals_in_one_line
def confirm_supervisor_rollback(org: Organisation, policy: Policy, spec: EndpointSpec | AppSpec, env: str, *,
                                services: Services, event: dict[str, Any], actor: str,
                                wait_seconds: float = LOCK_WAIT_SECONDS) -> list[Entry]:
    """A supervisor says it replaced a crash-looping version by the one that served before it, on its own
    (the event's signature already verified). Record it as the way back it is only once the flow has
    confirmed it: what the server answers is that version, with its registered digest, and that
    version passed its gate for this environment under the policy in force.

    Otherwise: if what serves is still the governed version the ledger last recorded (the event does not
    match what happened), nothing moves and ``event_refused`` says so; if what serves is not governed,
    the environment is stopped and ``serving_stopped`` says why. Nothing ungoverned keeps serving."""
    book, deployer = services.ledger, services.deployer
    from_version = None if event.get("from_version") is None else str(event["from_version"])
    to_version = str(event.get("to_version"))
    common = {"event_id": event.get("id"), "event_ts": event.get("ts"), "group": event.get("group")}
    is_app = isinstance(spec, AppSpec)
    target = app_target(spec, env) if is_app else endpoint_target(spec, env)  # type: ignore[arg-type]
    model = None if is_app else resolve_endpoint(org, spec.name, env)[1]
    who: dict[str, str] = {"app": spec.name} if is_app else {"model": model.name}  # type: ignore[union-attr]

    def why_not(version: str, served_digest: str | None) -> str | None:
        if is_app:  # the supervisor chose it on a crash loop of another: a crash loop of its own is judged there
            return app_governed(policy, spec, env, version, services=services,  # type: ignore[arg-type]
                                crashloop_rules_out=False)
        from platform_defs.registration import registered_digest

        digest = registered_digest(book, model.name, version)  # type: ignore[union-attr]
        if digest is None:
            return f"version {version} has no registered digest"
        if served_digest != digest:
            return f"version {version} answers with digest {served_digest}, not its registered {digest}"
        return governed(org, policy, spec, env, version, services=services, actor=actor)  # type: ignore[arg-type]

    with promotion_lock(book, spec.name, env, actor, wait_seconds) as (lock, _):
        status = deployer.status(target)
        served = serving_version(status)
        deploys = book.entries(kind="deploy", subject=spec.name, env=env)
        recorded = str(deploys[-1].data.get("version")) if deploys else None
        problem = why_not(to_version, status.serving_digest) if served == to_version else (
            f"the supervisor reported version {to_version} restored, but {served or 'nothing'} serves")
        if problem is not None:
            if served is not None and served == recorded and why_not(served, status.serving_digest) is None:
                return [book.append("event_refused", spec.name, {
                    **common, **who, "event": "crashloop_rollback", "claimed_version": to_version,
                    "serving_version": served, "reason": problem}, actor, env=env)]
            return [stop_serving(services, target, actor=actor, reason=(
                f"after a crash loop of version {from_version} the supervisor fell back to version {to_version}, "
                f"which may not serve here ({problem}); stopped, nothing serves"), extra={**common, **who})]
        restored = [e for e in deploys if str(e.data.get("version")) == to_version]
        digest = None if is_app else status.serving_digest
        if not is_app:
            alias_error = _move_alias(services, lock, who["model"], env, to_version)
            if alias_error:
                common["alias_error"] = alias_error
        owned = spec if is_app else model
        address = status.address or deployer.address(target)
        rb = book.append("rollback", spec.name, {
            **common, **who, "from_version": from_version, "to_version": to_version, "digest": digest,
            "reason": f"crash loop: version {from_version} kept dying; the supervisor restored version {to_version}",
            "address": address, "serving_before": None, "restored_deploy_entry": restored[-1].seq if restored else None,
            "rolled_back_by": "supervisor", "fencing_token": lock.token}, actor, env=env, fence=lock.lease)
        dep = book.append("deploy", spec.name, {
            **common, **who, "version": to_version, "digest": digest, "previous_version": from_version,
            "address": address, "promoted_from": None, "track": owned.track, "owner": owned.owner,  # type: ignore[union-attr]
            "checks": list(restored[-1].data.get("checks") or []) if restored else [],
            "via": "rollback", "rolled_back_by": "supervisor", "rollback_entry": rb.seq,
            "policy_hash": policy_hash(policy), "fencing_token": lock.token}, actor, env=env, fence=lock.lease)
        return [rb, dep]


@refusals_in_one_line
def confirm_relaunch(org: Organisation, policy: Policy, spec: EndpointSpec | AppSpec, env: str, *,
                     services: Services, event: dict[str, Any], actor: str) -> list[Entry]:
    """A supervisor started after its predecessor died with every worker says it serves the version of its
    ``state.json`` again. That file is only a file: believe it only if what answers is the version the
    ledger last recorded as deployed there (an endpoint with its registered digest); otherwise stop the
    environment and say why. Returns what was written (nothing when it checks out)."""
    from platform_defs.registration import registered_digest

    is_app = isinstance(spec, AppSpec)
    target = app_target(spec, env) if is_app else endpoint_target(spec, env)  # type: ignore[arg-type]
    status = services.deployer.status(target)
    served = serving_version(status)
    if served is None:
        return []
    deploys = services.ledger.entries(kind="deploy", subject=spec.name, env=env)
    recorded = str(deploys[-1].data.get("version")) if deploys else None
    problem = None
    if served != recorded:
        problem = f"it serves version {served}, but the version last deployed here is {recorded or 'none'}"
    elif not is_app:
        model = resolve_endpoint(org, spec.name, env)[1]
        digest = registered_digest(services.ledger, model.name, served)
        if digest is None or status.serving_digest != digest:
            problem = (f"version {served} answers with digest {status.serving_digest}, not its registered "
                       f"{digest or '(none)'}")
    if problem is None:
        return []
    return [stop_serving(services, target, actor=actor, reason=(
        f"a supervisor relaunched what its state file named after every worker had died, and {problem}: "
        f"stopped, nothing serves"), extra={"event_id": event.get("id"), "version": served})]


# --------------------------------------------------------------------------------------------
# App releases


@refusals_in_one_line
def promote_app(org: Organisation, policy: Policy, name: str, env: str, *, services: Services, actor: str,
                trigger: str, newest_build: Callable[[], str], repo_root: Path,
                wait_seconds: float = LOCK_WAIT_SECONDS, asked_at: datetime | None = None) -> Promotion:
    """Deploy an app release into ``name.env``: the newest build first, later environments what the one
    before serves; through the app track's gate, under the lock, recorded."""
    from platform_defs.governance.gates import AppGate

    t0 = time.perf_counter()
    spec = org.by_name.get(name)
    if not isinstance(spec, AppSpec) or env not in spec.environments:
        raise PromotionError(f"'{name}.{env}' is not a declared app environment")
    i = spec.environments.index(env)
    upstream_env = spec.environments[i - 1] if i else None
    target = app_target(spec, env)
    book, deployer = services.ledger, services.deployer
    with promotion_lock(book, spec.name, env, actor, wait_seconds) as (lock, waited):
        if upstream_env is None:
            version = newest_build()
        else:
            version = serving_version(deployer.status(app_target(spec, upstream_env)))
            if version is None:
                raise PromotionError(f"{spec.name}: nothing healthy serves in '{upstream_env}' to promote")
        artifact = _app_release(services, spec, env, version, actor)
        calls = [endpoint_target(org.by_name[ep], env) for ep in spec.calls]  # type: ignore[arg-type]
        env_vars = {t.name.upper(): deployer.address(t) for t in calls}  # the app reads ONEPATH_<NAME>_URL
        before = deployer.status(target)
        previous = serving_version(before)
        if superseded(book, spec.name, env, version, previous, waited=waited, asked_at=asked_at):
            services.log(f"{spec.name}.{env}: release {version} already serves (deployed by another promotion "
                         f"since this one was asked); nothing to do")
            return Promotion(spec.name, env, version, previous, before.address, None, "already serving",
                             seconds=round(time.perf_counter() - t0, 3),
                             verdicts=_verdicts_of_the_deploy(book, spec.name, env, version, "release"))
        services.log(f"{spec.name}.{env}: deploying release {version} (before: {previous})")
        gate = AppGate(app=spec, policy=policy, ledger=book, deployer=deployer, source_dir=repo_root / spec.source,
                       repo_root=repo_root)
        verdicts, standing = judge(book, policy, gate.required(env), lambda: gate.evaluate(version, artifact, env))
        refusal = record_gate(book, verdicts, subject=spec.name, env=env, actor=actor, version=version,
                              who={"app": spec.name}, still_serving=previous, policy=policy,
                              claims=client_claims(trigger), standing=standing)
        if refusal:
            raise PromotionError(refusal, verdicts=verdicts, metadata={"refused_version": version})
        release = Release(version, str(artifact), config={"entrypoint": spec.entrypoint, "calls": env_vars})
        fallback = _app_fallback(policy, spec, env, version, services, env_vars, repo_root=repo_root)
        grant_ids = _app_credentials(org, spec, env, services, lock, version=version, actor=actor,
                                     still_serving=previous, verdicts=verdicts)
        with _never_off_the_record(services, target, release, lock, who={"app": spec.name}, actor=actor,
                                   still_serving=previous, fallback=fallback) as record:
            status = _deploy(services, target, release, lock, who={"app": spec.name}, actor=actor,
                             still_serving=previous, verdicts=verdicts, fallback=fallback)
            entry = book.append("deploy", spec.name, {
                "app": spec.name, "version": version, "previous_version": previous, "address": status.address,
                "promoted_from": upstream_env, "track": spec.track, "owner": spec.owner,
                "checks": [v.check for v in verdicts], "claims": client_claims(trigger), "calls": env_vars,
                "grants": grant_ids, "policy_hash": policy_hash(policy), "fencing_token": lock.token,
                "fallback_version": fallback.version if fallback else None}, actor, env=env, fence=lock.lease)
            record["recorded"] = True
    return Promotion(spec.name, env, version, previous, status.address, None, "deployed", deploy_entry=entry.seq,
                     verdicts=verdicts, calls={f"ONEPATH_{name}_URL": url for name, url in env_vars.items()},
                     seconds=round(time.perf_counter() - t0, 3))


def _app_release(services: Services, spec: AppSpec, env: str, version: str, actor: str) -> Path:
    """The release's local folder to deploy (with ONEPATH_RELEASES_URL: fetched from the bucket if this host has
    none, and checked against the content hash the ledger's ``release_built`` entry recorded). A bundle that does
    not hash to it is recorded (``artifact_refused``) and refused: nothing was deployed."""
    from resources.object_store import ObjectStoreError
    from resources.release_store import ReleaseError, ReleaseMismatch

    store = services.releases()
    try:
        return store.fetch_recorded(spec.name, version, services.ledger)
    except ReleaseMismatch as err:
        services.ledger.append("artifact_refused", spec.name, {
            "app": spec.name, "version": version, "expected_digest": err.expected, "found_digest": err.found,
            "error": one_line(err, 300)}, actor, env=env)
        raise PromotionError(f"{spec.name}: {err}", metadata={"refused_version": version}) from None
    except (ReleaseError, ObjectStoreError) as err:
        raise PromotionError(f"{spec.name}: {err}", metadata={"refused_version": version}) from None


def _app_credentials(org: Organisation, spec: AppSpec, env: str, services: Services, lock: PromotionLock, *,
                     version: str, actor: str, still_serving: str | None, verdicts: list) -> list[str]:
    """Before the release's workers start: its grants issued (or kept, with a fresh secret) on every endpoint it
    declares it calls, those endpoints' tables published, and its credentials handed to its slot only, so its
    first call works. Returns the grant ids (the deploy entry records them, never a token). A failure is a
    refused promotion: nothing was deployed."""
    from platform_defs.access import Access, AccessError

    lock.check()
    try:
        return Access(services.ledger, services.deployer, actor=actor).prepare_app(org, spec, env)
    except (AccessError, DeployError, OSError) as err:
        services.ledger.append("promotion_refused", spec.name, {
            "app": spec.name, "version": version, "still_serving": still_serving, "failed": ["credentials"],
            "error": one_line(err, 500)}, actor, env=env)
        raise PromotionError(f"{spec.name}.{env}: its credentials could not be issued: {err}", verdicts=verdicts,
                             metadata={"refused_version": version, "still_serving": still_serving or "nothing"}) from None


def _app_fallback(policy: Policy, spec: AppSpec, env: str, version: str, services: Services,
                  calls: dict[str, str], *, repo_root: Path | None = None) -> Release | None:
    """The app release the backend may put back on its own if ``version`` crash-loops: the newest other
    release deployed to ``env`` that is governed right now (:func:`app_governed`: recorded policy in force,
    gate passed there under it, no crash loop since, review not revoked), still built; None when there is
    none (the backend stops the release instead)."""
    from resources.object_store import ObjectStoreError
    from resources.release_store import ReleaseError

    book = services.ledger
    store = services.releases()
    tried: set[str] = {version}
    for entry in reversed(book.entries(kind="deploy", subject=spec.name, env=env)):
        candidate = str(entry.data.get("version"))
        if candidate in tried:
            continue
        tried.add(candidate)
        if app_governed(policy, spec, env, candidate, services=services, repo_root=repo_root):
            continue
        try:  # on S3: fetched here now, checked, so the backend can put it back without the bucket
            artifact = store.fetch_recorded(spec.name, candidate, book)
        except (ReleaseError, ObjectStoreError) as err:
            if store.on_s3:
                services.warn(f"{spec.name}.{env}: release {candidate} cannot be the fallback: {err}")
            continue
        return Release(candidate, str(artifact), config={"entrypoint": spec.entrypoint, "calls": calls})
    return None


__all__ = ["Promotion", "PromotionError", "RollbackResult", "Services", "app_target", "confirm_supervisor_rollback",
           "confirm_relaunch", "app_governed", "endpoint_release", "endpoint_target", "fallback_release", "governed", "judge", "promote_app", "promote_endpoint", "promotion_lock",
           "client_claims", "record_gate", "resolve_endpoint", "roll_back", "rollback_target", "stop_serving"]
