"""Observe what every environment really serves, and what its next materialization would deploy.

Each tick asks every stable address (in parallel, short timeout) and MLflow's aliases, and records an
``AssetObservation`` on the environment's asset when something changed: serving version, health and
its problems, the alias, and the version a materialization would deploy now. That is how the UI shows
which version a promotion will deploy before anyone clicks. The same tick reports the
``serving_healthy`` check where its verdict changed, and records the change in the ledger
(``sensors.serving_health``).

Before it asks, it revives every supervisor that died without being stopped (``revive_supervisors``,
also called by ``onepath status``): a process death is never left standing until the next deploy.
"""


import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dagster as dg

from platform_defs.specs import AppSpec, EndpointSpec, Organisation, endpoint_asset_name, targets_of  # noqa: F401
from sensors.serving_health import evaluate_health
from resources.deployers.base import DeployError, Target
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource
from resources.mlflow_registry import MlflowRegistry


def revive_supervisors(deployer: Any, targets: list[Target]) -> list[dict[str, Any]]:
    """Start a supervisor again (it adopts the workers still serving, or relaunches) for every target
    whose supervisor died without being stopped (``LocalProcessDeployer.revive``); what was revived,
    ``{slot, previous_pid, pid}`` or ``{slot, error}``. The new supervisor records it in its signed
    events, which the ``supervisor_events`` sensor relays into the ledger."""

    def one(target: Target) -> dict[str, Any] | None:
        try:
            return deployer.revive(target)
        except DeployError as err:
            return {"slot": target.slot, "error": str(err)}

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(targets)))) as pool:
        return [r for r in pool.map(one, targets) if r]


def build_endpoint_status_sensor(org: Organisation) -> dg.SensorDefinition:
    targets = targets_of(org)

    @dg.sensor(
        name="endpoint_status",
        description="Records what each endpoint/app environment serves and what promoting it would deploy.",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def endpoint_status(context: dg.SensorEvaluationContext, mlflow: MlflowRegistry,
                        deployer_local: LocalDeployerResource, ledger: LedgerResource):
        deployer = deployer_local.deployer()
        for r in revive_supervisors(deployer, [t for _, _, t in targets]):
            if "error" in r:
                context.log.error(f"endpoint_status: {r['slot']}: its supervisor is gone and could not be "
                                  f"started again: {r['error']}")
            else:
                context.log.warning(f"endpoint_status: {r['slot']}: its supervisor (pid {r['previous_pid']}) was "
                                    f"gone; started pid {r['pid']}, which adopts what still serves")
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(targets)))) as pool:
            statuses = list(pool.map(lambda t: deployer.status(t[2]), targets))
        models = {d.model for d, _, _ in targets if isinstance(d, EndpointSpec)}
        aliases = {m: mlflow.aliases(m) for m in models}
        newest = {m: mlflow.latest_version(m) for m in models}
        serving = {(d.name, env): s.serving_version for (d, env, _), s in zip(targets, statuses)}
        cursor = json.loads(context.cursor) if context.cursor else {}
        health = cursor.pop("health", {})
        events: list[Any] = evaluate_health(targets, statuses, ledger.ledger(), health)
        for (d, env, target), st in zip(targets, statuses):
            i = d.environments.index(env)
            if isinstance(d, EndpointSpec):
                nxt = newest[d.model] if i == 0 else serving.get((d.name, d.environments[i - 1]))
                alias = aliases[d.model].get(env)
            else:
                nxt = None if i == 0 else serving.get((d.name, d.environments[i - 1]))
                alias = None
            snap = {
                "serving_version": st.serving_version or "none",
                "healthy": st.healthy,
                "health": st.health,
                "problems": "; ".join(st.problems) or "none",
                "address": st.address or "not allocated",
                "would_deploy": nxt or "none",
            }
            if isinstance(d, EndpointSpec):
                snap["mlflow_alias_version"] = alias or "none"
                snap["alias_matches_server"] = (alias or None) == st.serving_version
            key = endpoint_asset_name(d.name, env)
            digest = hashlib.sha256(json.dumps(snap, sort_keys=True).encode()).hexdigest()[:16]
            if cursor.get(key) != digest:
                cursor[key] = digest
                events.append(dg.AssetObservation(asset_key=dg.AssetKey(key), metadata=snap))
        context.update_cursor(json.dumps({**cursor, "health": health}, sort_keys=True))
        if not events:
            return dg.SkipReason(f"no change across {len(targets)} environments")
        return dg.SensorResult(asset_events=events)

    return endpoint_status
