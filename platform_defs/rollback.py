"""Roll an endpoint environment back to a version that served there before.

``rollback`` is the one implementation; ``onepath rollback`` (``platform_defs.cli_rollback``) and the
``rollback`` job (``build_rollback_job``, launched from the Dagster UI's launchpad) both call it.

What "the previous approved version" means: a version reaches an environment only through a
materialization that passed that environment's gate, and every such deploy is recorded in the
ledger (kind ``deploy``, subject = endpoint, env = environment). So the rollback target is the
version of the most recent ``deploy`` entry for (endpoint, env) whose version differs from the one
that currently serves there (asked from the server, through the deployer), or an explicit
``to_version`` that has such an entry. Nothing is deleted: MLflow keeps every version, the ledger
gets a ``rollback`` entry and a new ``deploy`` entry (so "the version the ledger records" follows the
rollback), and the MLflow alias named after the environment moves to the restored version.
"""


import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import dagster as dg
from pydantic import Field

from platform_defs.factories import endpoint_release, endpoint_target
from platform_defs.policy import Policy
from platform_defs.specs import (
    DatasetSpec,
    EndpointSpec,
    ModelSpec,
    Organisation,
    endpoint_asset_name,
)
from resources.deployers.base import Deployer, DeployError, serving_version
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import Entry, Ledger, LedgerResource
from resources.mlflow_registry import MlflowRegistry


class RollbackError(RuntimeError):
    """A rollback was refused or did not complete. The message is one line; what served still serves."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


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
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"rolled back {self.endpoint}.{self.env} from version {self.from_version or 'nothing'} to version "
                f"{self.to_version} at {self.address} (MLflow alias {self.alias} -> {self.to_version}; "
                f"ledger #{self.rollback_entry} rollback, #{self.deploy_entry} deploy)")


def _one_line(text: str, limit: int = 600) -> str:
    flat = re.sub(r"\s+", " ", str(text)).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _resolve(org: Organisation, endpoint_name: str, env: str) -> tuple[EndpointSpec, ModelSpec, DatasetSpec]:
    spec = org.by_name.get(endpoint_name)
    if not isinstance(spec, EndpointSpec):
        known = ", ".join(sorted(d.name for d in org.of_kind("endpoint"))) or "none"
        raise RollbackError(f"'{endpoint_name}' is not a declared endpoint (endpoints: {known})")
    if env not in spec.environments:
        raise RollbackError(f"'{env}' is not an environment of {spec.name} "
                            f"(environments: {', '.join(spec.environments)})")
    model = org.by_name[spec.model]
    assert isinstance(model, ModelSpec)
    dataset = org.by_name[model.dataset]
    assert isinstance(dataset, DatasetSpec)
    return spec, model, dataset


def rollback_target(deploys: list[Entry], current: str | None, to_version: str | None,
                    endpoint: str, env: str) -> Entry:
    """The ``deploy`` entry to restore: ``to_version``'s newest, or the newest that is not ``current``."""
    label = f"{endpoint}.{env}"
    if to_version:
        matching = [e for e in deploys if str(e.data.get("version")) == to_version]
        if not matching:
            seen = sorted({str(e.data.get("version")) for e in deploys}, key=_version_key)
            raise RollbackError(
                f"{label}: version {to_version} was never deployed to {env} (no 'deploy' entry in the ledger), "
                f"so it was never approved there; versions deployed to {env}: {', '.join(seen) or 'none'}")
        if to_version == current:
            raise RollbackError(f"{label}: version {to_version} already serves; nothing to roll back")
        return matching[-1]
    earlier = [e for e in deploys if str(e.data.get("version")) != current]
    if not earlier:
        if not deploys:
            raise RollbackError(f"{label}: nothing to roll back to: no version was ever deployed to {env}")
        raise RollbackError(f"{label}: nothing to roll back to: version {current} is the only version ever "
                            f"deployed to {env}")
    return earlier[-1]


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), v) if v.isdigit() else (1 << 62, v)


def rollback(org: Organisation, endpoint_name: str, env: str, *, to_version: str | None = None, reason: str,
             actor: str, mlflow: MlflowRegistry, ledger: Ledger, deployer: Deployer,
             policy: Policy) -> RollbackResult:
    """Redeploy the previous approved version of ``endpoint_name`` in ``env`` at its stable address.

    Raises :class:`RollbackError` (one line) when refused (no reason, unknown endpoint or
    environment, a ``to_version`` never deployed to ``env``, nothing to roll back to) or when the
    deploy fails, in which case the version that served keeps serving and nothing is recorded.
    """
    t0 = time.perf_counter()
    reason = (reason or "").strip()
    actor = (actor or "").strip()
    spec, model, dataset = _resolve(org, endpoint_name, env)
    label = f"{spec.name}.{env}"
    if not reason:
        raise RollbackError(f"{label}: a rollback needs a reason (it is recorded in the ledger)")
    if not actor:
        raise RollbackError(f"{label}: a rollback needs an actor (who rolls back)")
    to_version = str(to_version).strip() if to_version not in (None, "") else None

    target = endpoint_target(spec, env)
    before = deployer.status(target)
    deploys = ledger.entries(kind="deploy", subject=spec.name, env=env)
    recorded = str(deploys[-1].data.get("version")) if deploys else None
    # What serves now. If nothing answers (crashed, stopped), the version the ledger last recorded
    # is the one being rolled back from: never "restore" the version that just went down.
    serving = serving_version(before)
    current = serving or recorded
    chosen = rollback_target(deploys, current, to_version, spec.name, env)
    version = str(chosen.data.get("version"))

    from mlflow.exceptions import MlflowException

    from platform_defs.registration import NotRegistered, verified_artifact
    from resources.mlflow_registry import ArtifactMismatch

    try:
        mlflow.get_version(model.name, version)
        artifact, digest = verified_artifact(ledger, mlflow, model.name, version)
    except (MlflowException, OSError, NotRegistered, ArtifactMismatch) as err:
        raise RollbackError(f"{label}: version {version} of model '{model.name}' cannot be fetched verified from "
                            f"MLflow ({_one_line(err, 400)}); {current or 'nothing'} keeps serving") from None
    release = endpoint_release(spec, model, dataset, version, artifact, digest)
    try:
        status = deployer.deploy(target, release)
    except DeployError as err:
        raise RollbackError(f"{label}: rollback to version {version} failed, "
                            f"{serving or 'nothing'} keeps serving: {err}") from None

    address = status.address or deployer.address(target)
    # The restored version serves. Move the alias (as a promotion does), then record; an alias that
    # could not be moved is recorded with the rollback and reported, since the deploy itself happened.
    alias_error = None
    try:
        mlflow.set_alias(model.name, env, version)
    except MlflowException as err:
        alias_error = _one_line(err, 200)
    rb = ledger.append("rollback", spec.name, {
        "model": model.name, "from_version": current, "to_version": version, "reason": reason,
        "address": address, "serving_before": serving, "restored_deploy_entry": chosen.seq,
        **({"alias_error": alias_error} if alias_error else {}),
    }, actor, env=env)
    checks = chosen.data.get("checks")
    if checks is None:
        checks = list(policy.track(model.track).checks)
    dep = ledger.append("deploy", spec.name, {
        "model": model.name, "version": version, "previous_version": serving,
        "address": address, "promoted_from": None, "track": model.track, "owner": model.owner,
        "checks": checks, "via": "rollback", "rollback_entry": rb.seq,
    }, actor, env=env)
    if alias_error:
        raise RollbackError(f"{label}: version {version} serves again at {address} (ledger #{rb.seq}), but the "
                            f"MLflow alias {model.name}@{env} could not be moved: {alias_error}")
    return RollbackResult(
        endpoint=spec.name, env=env, model=model.name, from_version=current, to_version=version,
        address=address, reason=reason, actor=actor, alias=f"{model.name}@{env}", rollback_entry=rb.seq,
        deploy_entry=dep.seq, restored_deploy_entry=chosen.seq, seconds=round(time.perf_counter() - t0, 3),
    )


# --------------------------------------------------------------------------------------------
# The launchpad job


class RollbackConfig(dg.Config):
    endpoint: str = Field(description="Endpoint to roll back (its declared name, e.g. credit_scoring).")
    env: str = Field(description="Environment to roll back (e.g. prod).")
    to_version: str = Field("", description="Version to restore; it must have been deployed to this environment "
                                            "before. Empty: the previous version that served there.")
    reason: str = Field(description="Why: recorded in the ledger. Required.")


def build_rollback_job(org: Organisation, policy: Policy) -> dg.JobDefinition:
    """The ``rollback`` job: one op, configured with endpoint, env, to_version and reason."""
    endpoints = sorted(d.name for d in org.of_kind("endpoint"))

    @dg.op(
        name="rollback_endpoint",
        description="Redeploy the previous approved version (or to_version) of an endpoint environment at its "
                    "stable address, move the MLflow alias, and record the rollback in the ledger.",
        tags={"onepath/kind": "rollback"},
    )
    def rollback_op(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MlflowRegistry,
                    ledger: LedgerResource, deployer_local: LocalDeployerResource) -> dg.Output:
        actor = context.run.tags.get("dagster/user") or f"dagster:{context.run.run_id}"
        context.log.info(f"rollback requested by {actor}: {config.endpoint}.{config.env} "
                         f"to {config.to_version or 'the previous version'} (reason: {config.reason!r})")
        try:
            result = rollback(org, config.endpoint, config.env, to_version=config.to_version or None,
                              reason=config.reason, actor=actor, mlflow=mlflow, ledger=ledger.ledger(),
                              deployer=deployer_local.deployer(), policy=policy)
        except RollbackError as err:
            raise dg.Failure(description=str(err),
                             metadata={"endpoint": config.endpoint, "env": config.env,
                                       "to_version": config.to_version or "previous"}) from None
        context.log.info(result.summary())
        context.log_event(dg.AssetObservation(
            asset_key=dg.AssetKey(endpoint_asset_name(result.endpoint, result.env)),
            description=f"rolled back to version {result.to_version}: {result.reason}",
            metadata={"serving_version": result.to_version, "rolled_back_from": result.from_version or "none",
                      "reason": result.reason, "actor": result.actor, "address": dg.MetadataValue.url(result.address),
                      "mlflow_alias": result.alias, "ledger_entry": result.rollback_entry},
        ))
        return dg.Output(result.as_dict(), metadata={
            "endpoint": result.endpoint, "env": result.env, "from_version": result.from_version or "none",
            "to_version": result.to_version, "address": dg.MetadataValue.url(result.address),
            "reason": result.reason, "ledger_entry": result.rollback_entry, "seconds": result.seconds})

    @dg.job(
        name="rollback",
        description="Roll an endpoint environment back to the version that served there before. Launch it from "
                    "the launchpad with ops.rollback_endpoint.config: endpoint, env, reason (required) and optionally "
                    f"to_version. Endpoints: {', '.join(endpoints) or 'none'}.",
        tags={"onepath/kind": "rollback"},
    )
    def rollback_job():
        rollback_op()

    return rollback_job


__all__ = [
    "RollbackConfig",
    "RollbackError",
    "RollbackResult",
    "build_rollback_job",
    "rollback",
    "rollback_target",
]
