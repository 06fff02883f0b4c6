"""Alias drift: notice when an MLflow alias no longer says what an environment serves.

onepath moves the alias named after an environment (``<model>@prod``) only when it deploys there,
and records every deploy in the ledger. So for every endpoint environment three answers should
agree: the alias, the version the stable address serves (asked from the server) and the version of
the ledger's latest ``deploy`` entry. When they do not, someone moved (or removed) the alias by hand,
or served something outside onepath.

* ``build_alias_drift_sensor(org)``: the ``alias_drift`` sensor. Each tick probes every endpoint
  environment in parallel, reads each model's aliases once and reads only the ledger entries added
  since the last tick. On a new drift it reports a failed ``alias_matches_serving`` check
  evaluation on the environment's asset and appends ONE ``alias_moved`` ledger entry; when the
  drift is fixed it reports the check passing again. A reported drift is not reported again on
  later ticks (cursor), nor after a cursor reset (the ledger already holds its entry).
* ``build_alias_checks(org)``: the same comparison as a declared, non-blocking asset check per
  endpoint environment (``alias_matches_serving``), so the check shows on each asset, can be
  executed on demand, and runs after every deploy launched from the UI. The sensor's evaluations
  are reported against these declared checks.

A mismatch where the server answers a version the ledger does not record yet is what a deploy
looks like between its cutover and its ledger entry (milliseconds): it is reported only when it is
still there on the next tick. An environment where nothing answers is compared with the ledger
only (an outage is the endpoint_status sensor's business, not an alias move).

Labels are not enough: where the three agree, the content digest the server reports (``/version``)
must also be the digest the ledger's ``model_registered`` entry holds for the served version. A
difference fails the same check naming both digests and is recorded once as ``digest_mismatch``.
"""


import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dagster as dg

from platform_defs.specs import EndpointSpec, Organisation, endpoint_asset_name
from resources.deployers.base import DeploymentStatus, Target, serving_version
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import Ledger, LedgerResource
from resources.mlflow_registry import MlflowRegistry

CHECK_NAME = "alias_matches_serving"
CHECK_DESCRIPTION = ("The MLflow alias named after this environment points at the version the stable address "
                     "serves and the ledger's last deploy records (non-blocking; reported by the alias_drift "
                     "sensor).")
SENSOR_ACTOR = "sensor:alias_drift"


def endpoint_targets(org: Organisation) -> list[tuple[EndpointSpec, str, Target]]:
    out = []
    for d in org.by_name.values():
        if isinstance(d, EndpointSpec):
            out += [(d, env, Target(d.name, env, "endpoint", d.ports.get(env))) for env in d.environments]
    return out


def registry_aliases(mlflow: MlflowRegistry, model: str) -> dict[str, str]:
    """Alias -> version; {} only when the model is not registered. Other registry errors raise, so an
    unreachable registry never reads as "every alias was removed"."""
    from mlflow.exceptions import MlflowException

    try:
        rm = mlflow.client().get_registered_model(model)
    except MlflowException as err:
        if getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {a: str(v) for a, v in (rm.aliases or {}).items()}


@dataclass(frozen=True)
class AliasState:
    endpoint: str
    env: str
    model: str
    alias: str | None  # version the MLflow alias <model>@<env> points at
    served: str | None  # version answering at the stable address (None: nothing answers)
    recorded: str | None  # version of the ledger's latest 'deploy' entry for (endpoint, env)
    recorded_seq: int | None
    address: str | None
    served_digest: str | None = None  # the content digest the server reports it loaded
    registered_digest: str | None = None  # the model_registered digest of the served version

    @property
    def asset_key(self) -> dg.AssetKey:
        return dg.AssetKey(endpoint_asset_name(self.endpoint, self.env))

    @property
    def label(self) -> str:
        return f"{self.endpoint}.{self.env}"

    @property
    def deployed(self) -> bool:
        return any(v is not None for v in (self.alias, self.served, self.recorded))

    @property
    def problem(self) -> str | None:
        """Why the alias does not match, or None when it does (or there is nothing to compare)."""
        if not self.deployed:
            return None
        alias = f"MLflow alias {self.model}@{self.env}"
        where = f"at {self.address}" if self.address else "at its stable address"
        if self.alias is None:
            return (f"{alias} was removed, while {self.served or self.recorded} "
                    f"{'serves ' + where if self.served else 'is the last recorded deploy'}")
        if self.served is not None and self.alias != self.served:
            return (f"{alias} points to version {self.alias}, but version {self.served} serves {where}"
                    + (f" (the ledger records version {self.recorded})" if self.recorded else ""))
        if self.alias != self.recorded:
            return (f"{alias} points to version {self.alias}, but the ledger's last deploy to {self.env} "
                    f"records version {self.recorded or 'none'}"
                    + ("" if self.served else f" (nothing answers {where})"))
        return self.digest_problem

    @property
    def digest_problem(self) -> str | None:
        """What serves, compared by content: the served digest against the served version's registration."""
        if self.served is None or self.served_digest == self.registered_digest is not None:
            return None
        return (f"version {self.served} serves {f'at {self.address}' if self.address else ''} with digest "
                f"{self.served_digest or 'not reported'}, but the ledger registered version {self.served} with "
                f"digest {self.registered_digest or 'none (no model_registered entry)'}")

    @property
    def settling(self) -> bool:
        """Server and ledger disagree: a deploy between cutover and ledger entry looks like this."""
        return self.served is not None and self.served != self.recorded

    @property
    def signature(self) -> list[str | None]:
        return [self.alias, self.served, self.recorded, self.served_digest]

    def metadata(self) -> dict[str, Any]:
        return {
            "mlflow_alias": f"{self.model}@{self.env}",
            "alias_version": self.alias or "none",
            "serving_version": self.served or "nothing answers",
            "ledger_version": self.recorded or "none",
            "ledger_entry": self.recorded_seq if self.recorded_seq is not None else "none",
            "address": self.address or "not allocated",
            "serving_digest": self.served_digest or "none",
            "registered_digest": self.registered_digest or "none",
            "verdict": (self.problem or "alias, server and ledger agree") if self.deployed else "not deployed",
        }


def _latest_deploys(book: Ledger, since_seq: int = 0) -> dict[tuple[str, str], tuple[str, int]]:
    out: dict[tuple[str, str], tuple[str, int]] = {}
    for e in book.entries(kind="deploy", since_seq=since_seq):
        if e.env is not None:
            out[(e.subject, e.env)] = (str(e.data.get("version")), e.seq)
    return out


def inspect_targets(targets: list[tuple[EndpointSpec, str, Target]], mlflow: MlflowRegistry,
                    deployer_local: LocalDeployerResource,
                    recorded: dict[tuple[str, str], tuple[str, int]], book: Ledger) -> list[AliasState]:
    """Probe every target in parallel while the registry's aliases are read (once per model); each
    served version's registered digest comes from ``book``."""
    from platform_defs.registration import registered_digest

    deployer = deployer_local.deployer()
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(targets)))) as pool:
        futures = [pool.submit(deployer.status, t) for _, _, t in targets]
        aliases = {m: registry_aliases(mlflow, m) for m in sorted({d.model for d, _, _ in targets})}
        statuses: list[DeploymentStatus] = [f.result() for f in futures]
    out = []
    for (d, env, _), st in zip(targets, statuses):
        rec = recorded.get((d.name, env))
        served = serving_version(st)
        out.append(AliasState(
            endpoint=d.name, env=env, model=d.model, alias=aliases[d.model].get(env),
            served=served,
            recorded=rec[0] if rec else None, recorded_seq=rec[1] if rec else None, address=st.address,
            served_digest=st.serving_digest if served is not None else None,
            registered_digest=registered_digest(book, d.model, served) if served is not None else None,
        ))
    return out


def _evaluation(state: AliasState, passed: bool) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=state.asset_key, check_name=CHECK_NAME, passed=passed,
        severity=dg.AssetCheckSeverity.ERROR, blocking=False,
        description=state.problem if not passed else "alias, server and ledger agree",
        metadata=state.metadata(),
    )


def _already_in_ledger(book: Ledger, state: AliasState) -> bool:
    """True when the ledger already holds this drift (a cursor reset must not record it twice)."""
    moved = book.entries(kind=_ledger_kind(state), subject=state.endpoint, env=state.env)
    if not moved:
        return False
    last = moved[-1]
    return (last.seq > (state.recorded_seq or 0)
            and [last.data.get("alias_version"), last.data.get("serving_version"),
                 last.data.get("ledger_version"), last.data.get("serving_digest")] == state.signature)


def _ledger_kind(state: AliasState) -> str:
    """``digest_mismatch`` when labels agree and only the content differs; ``alias_moved`` otherwise."""
    return "digest_mismatch" if state.problem == state.digest_problem else "alias_moved"


def build_alias_drift_sensor(org: Organisation) -> dg.SensorDefinition:
    targets = endpoint_targets(org)

    @dg.sensor(
        name="alias_drift",
        description="Reports (failed alias_matches_serving check + one alias_moved ledger entry) when an MLflow "
                    "alias no longer matches what its environment serves and the ledger records; reports the "
                    "check passing again once fixed.",
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def alias_drift(context: dg.SensorEvaluationContext, mlflow: MlflowRegistry, ledger: LedgerResource,
                    deployer_local: LocalDeployerResource):
        if not targets:
            return dg.SkipReason("no endpoints declared")
        book = ledger.ledger()
        cursor = json.loads(context.cursor) if context.cursor else {}
        seen_seq = int(cursor.get("ledger_seq", 0))
        head = book.head()
        head_seq = head.seq if head else 0
        recorded = {tuple(k.split("|", 1)): tuple(v) for k, v in cursor.get("recorded", {}).items()}
        if head_seq < seen_seq:  # a different (reset) ledger: read it again from the start
            recorded, seen_seq = {}, 0
        recorded.update(_latest_deploys(book, since_seq=seen_seq))
        states = inspect_targets(targets, mlflow, deployer_local, recorded, book)  # type: ignore[arg-type]

        reported: dict[str, Any] = cursor.get("reported", {})
        pending: dict[str, Any] = cursor.get("pending", {})
        events: list[dg.AssetCheckEvaluation] = []
        logged: list[str] = []
        next_pending: dict[str, Any] = {}
        for state in states:
            key = state.asset_key.to_user_string()
            before = reported.get(key)  # None (never reported), "ok", or the reported drift signature
            if not state.deployed:
                continue
            if state.problem is None:
                if before != "ok":
                    events.append(_evaluation(state, passed=True))
                    reported[key] = "ok"
                    if before is not None:
                        context.log.info(f"{state.label}: alias drift fixed ({state.model}@{state.env} = "
                                         f"{state.alias})")
                continue
            if before == state.signature:
                continue  # this very drift was reported already
            if state.settling and pending.get(key) != state.signature:
                next_pending[key] = state.signature  # confirm on the next tick (see module docstring)
                continue
            events.append(_evaluation(state, passed=False))
            reported[key] = state.signature
            # the ledger is checked only when the cursor knows nothing of this environment (a reset
            # cursor); after a recovery the cursor says "ok", and the same drift again is a new one
            if before is not None or not _already_in_ledger(book, state):
                entry = book.append(_ledger_kind(state), state.endpoint, {
                    "model": state.model, "alias": state.env, "alias_version": state.alias,
                    "serving_version": state.served, "ledger_version": state.recorded,
                    "ledger_deploy_entry": state.recorded_seq, "address": state.address, "problem": state.problem,
                    "serving_digest": state.served_digest, "registered_digest": state.registered_digest,
                }, SENSOR_ACTOR, env=state.env)
                logged.append(f"{state.label} (ledger #{entry.seq})")
            context.log.warning(f"{state.label}: {state.problem}")
        context.update_cursor(json.dumps({
            "ledger_seq": max(head_seq, *(seq for _, seq in recorded.values())) if recorded else head_seq,
            "recorded": {f"{s}|{e}": list(v) for (s, e), v in sorted(recorded.items())},
            "reported": reported, "pending": next_pending,
        }, sort_keys=True))
        if not events:
            waiting = f"; {len(next_pending)} mismatch(es) to confirm next tick" if next_pending else ""
            return dg.SkipReason(f"aliases unchanged across {len(states)} endpoint environments{waiting}")
        if logged:
            context.log.info(f"alias drift recorded in the ledger: {', '.join(logged)}")
        return dg.SensorResult(asset_events=events)

    return alias_drift


def build_alias_checks(org: Organisation) -> list[dg.AssetChecksDefinition]:
    """One declared, non-blocking ``alias_matches_serving`` check per endpoint environment asset."""
    out = []
    for d, env, target in endpoint_targets(org):
        out.append(_alias_check(d, env, target))
    return out


def _alias_check(spec: EndpointSpec, env: str, target: Target) -> dg.AssetChecksDefinition:
    key = endpoint_asset_name(spec.name, env)

    @dg.asset_check(asset=key, name=CHECK_NAME, blocking=False, description=CHECK_DESCRIPTION)
    def _check(mlflow: MlflowRegistry, ledger: LedgerResource,
               deployer_local: LocalDeployerResource) -> dg.AssetCheckResult:
        book = ledger.ledger()
        deploys = book.entries(kind="deploy", subject=spec.name, env=env)
        recorded = {(spec.name, env): (str(deploys[-1].data.get("version")), deploys[-1].seq)} if deploys else {}
        state = inspect_targets([(spec, env, target)], mlflow, deployer_local, recorded, book)[0]
        return dg.AssetCheckResult(passed=state.problem is None, severity=dg.AssetCheckSeverity.ERROR,
                                   description=state.problem or "alias, server and ledger agree",
                                   metadata=state.metadata())

    return _check


__all__ = [
    "CHECK_NAME",
    "AliasState",
    "build_alias_checks",
    "build_alias_drift_sensor",
    "endpoint_targets",
    "inspect_targets",
    "registry_aliases",
]
