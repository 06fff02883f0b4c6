"""Whether what every environment serves is well, as a check on its asset and a record in the ledger.

``serving_healthy`` is a declared, non-blocking check on every endpoint and app environment asset. It
fails when the environment's ``DeploymentStatus`` lists problems: the server's own (its /health says
``degraded``: an inference log it cannot write, a model that raised on every recent request) or the
backend's (a version stopped after crash-looping, a current version no worker answers for). Staging is
judged like prod. An environment nothing was ever deployed to passes (there is nothing to be unwell).

The ``endpoint_status`` sensor, which asks every environment anyway, reports the check on every change
(:func:`evaluate_health`) and writes the ledger entry ``serving_unhealthy`` when an environment turns
unwell and ``serving_recovered`` when it is well again, so an outage is on the record with its cause;
running the check by hand asks the environment again.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from platform_defs.specs import AppSpec, EndpointSpec, Organisation, endpoint_asset_name
from resources.deployers.base import DeploymentStatus, Target
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import Ledger

CHECK_NAME = "serving_healthy"
CHECK_DESCRIPTION = ("What this environment serves answers and reports no problem: its inference log is written, "
                     "its model does not fail every request, it was not stopped after crash-looping.")
ACTOR = "sensor:endpoint_status"


def verdict(status: DeploymentStatus) -> tuple[bool, str]:
    """``(passed, description)`` for one environment's status."""
    if status.problems:
        return False, f"{status.health}: " + "; ".join(status.problems)
    if status.healthy:
        return True, f"version {status.serving_version} serves at {status.address}"
    return True, "nothing deployed here"


def evaluation(spec: EndpointSpec | AppSpec, env: str, status: DeploymentStatus) -> dg.AssetCheckEvaluation:
    passed, description = verdict(status)
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(endpoint_asset_name(spec.name, env)), check_name=CHECK_NAME, passed=passed,
        severity=dg.AssetCheckSeverity.ERROR, blocking=False, description=description,
        metadata={"health": status.health, "serving_version": status.serving_version or "none",
                  "problems": "; ".join(status.problems) or "none"},
    )


def evaluate_health(targets: list[tuple[Any, str, Target]], statuses: list[DeploymentStatus], book: Ledger,
                    reported: dict[str, str]) -> list[dg.AssetCheckEvaluation]:
    """Check evaluations for the environments whose verdict changed since ``reported`` (asset key ->
    ``"ok"`` or the problems last reported; updated in place), and the ledger entries of the changes."""
    events = []
    for (spec, env, _), st in zip(targets, statuses):
        key = endpoint_asset_name(spec.name, env)
        passed, _ = verdict(st)
        now = "ok" if passed else "; ".join(st.problems)
        before = reported.get(key)
        if before == now:
            continue
        reported[key] = now
        events.append(evaluation(spec, env, st))
        if not passed:
            book.append("serving_unhealthy", spec.name, {
                "health": st.health, "problems": st.problems, "serving_version": st.serving_version,
                "address": st.address}, ACTOR, env=env)
        elif before not in (None, "ok"):
            book.append("serving_recovered", spec.name, {
                "serving_version": st.serving_version, "address": st.address, "problems_before": before},
                ACTOR, env=env)
    return events


def build_serving_health_checks(org: Organisation) -> list[dg.AssetChecksDefinition]:
    from sensors.endpoint_status import targets_of

    return [_check(spec, env, target) for spec, env, target in targets_of(org)]


def _check(spec: EndpointSpec | AppSpec, env: str, target: Target) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=endpoint_asset_name(spec.name, env), name=CHECK_NAME, blocking=False,
                    description=CHECK_DESCRIPTION)
    def _serving_healthy(deployer_local: LocalDeployerResource) -> dg.AssetCheckResult:
        st = deployer_local.deployer().status(target)
        passed, description = verdict(st)
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR, description=description,
                                   metadata={"health": st.health, "problems": "; ".join(st.problems) or "none"})

    return _serving_healthy


__all__ = ["CHECK_NAME", "build_serving_health_checks", "evaluate_health", "evaluation", "verdict"]
