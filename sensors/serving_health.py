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

``served_without_outage``, also declared and non-blocking on every such asset, looks back instead: it
fails while an ``outage`` entry (a supervisor and all its workers died, and the address refused until
the version was relaunched) follows the environment's last deploy or rollback; the
``supervisor_events`` sensor reports it when it records the entry.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from platform_defs.specs import AppSpec, EndpointSpec, Organisation, endpoint_asset_name
from resources.deployers.base import DeploymentStatus, Target
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import Ledger, LedgerResource

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
    from platform_defs.specs import targets_of

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


# -- whether it served without an outage since its last deploy -------------------------------------
CONTINUITY_CHECK = "served_without_outage"
CONTINUITY_DESCRIPTION = ("No outage is recorded for this environment since its last deploy or rollback: the ledger "
                          "holds no 'outage' entry (a supervisor and all its workers died, and the address refused "
                          "until the version was relaunched) after it. Non-blocking; reported by supervisor_events.")


def outage_verdict(book: Any, subject: str, env: str) -> tuple[bool, str, dict[str, Any]]:
    """(passed, description, metadata) of ``served_without_outage`` for (subject, env), from the ledger:
    failed when an ``outage`` entry follows the environment's last ``deploy``/``rollback`` entry."""
    since = max((e.seq for e in book.entries(subject=subject, env=env) if e.kind in ("deploy", "rollback")),
                default=0)
    outages = book.entries(kind="outage", subject=subject, env=env, since_seq=since)
    if not outages:
        return True, "no outage recorded since the last deploy", {"outages": 0}
    last = outages[-1]
    began = next((e for e in reversed(outages) if e.data.get("phase") == "began"), last)
    state = {"ended": "it ended", "unresolved": "it is NOT resolved"}.get(str(last.data.get("phase")), "it goes on")
    return False, (f"outage of version {last.data.get('version')} recorded at {began.ts} (ledger #{began.seq}): "
                   f"{began.data.get('detail')}; {state}"
                   + (f" after {last.data.get('seconds')} s of relaunch" if last.data.get("phase") == "ended" else "")
                   + (f": {last.data.get('detail')}" if last.data.get("phase") == "unresolved" else "")), {
        "outages": len([e for e in outages if e.data.get("phase") == "began"]), "ledger_entry": last.seq,
        "phase": str(last.data.get("phase")), "version": str(last.data.get("version"))}


def outage_evaluation(book: Any, subject: str, env: str) -> dg.AssetCheckEvaluation:
    passed, description, metadata = outage_verdict(book, subject, env)
    return dg.AssetCheckEvaluation(asset_key=dg.AssetKey(endpoint_asset_name(subject, env)),
                                   check_name=CONTINUITY_CHECK, passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                                   blocking=False, description=description, metadata=metadata)


def build_continuity_checks(org: Organisation) -> list[dg.AssetChecksDefinition]:
    """One declared, non-blocking ``served_without_outage`` check per endpoint and app environment."""
    from platform_defs.specs import targets_of

    return [_continuity_check(target) for _, _, target in targets_of(org)]


def _continuity_check(target: Target) -> dg.AssetChecksDefinition:
    key = endpoint_asset_name(target.name, target.env)

    @dg.asset_check(asset=key, name=CONTINUITY_CHECK, blocking=False, description=CONTINUITY_DESCRIPTION)
    def _check(ledger: LedgerResource) -> dg.AssetCheckResult:
        passed, description, metadata = outage_verdict(ledger.ledger(), target.name, target.env)
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR, description=description,
                                   metadata=metadata)

    return _check


__all__ = ["CHECK_NAME", "CONTINUITY_CHECK", "build_continuity_checks", "build_serving_health_checks", "evaluate_health",
           "evaluation", "outage_evaluation", "outage_verdict", "verdict"]
