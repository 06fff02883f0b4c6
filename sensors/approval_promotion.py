"""Promote a held version once a person approves it.

A version of a model (or a release of an app) on a track whose next environment needs an approval stops after staging: the
promotion's ``approval`` check says who may approve and the exact ``onepath approve`` command, and the
ledger holds an ``awaiting_approval`` entry. When ``onepath approve`` appends an ``approval`` entry (its
subject a model, for each endpoint serving it, or an app), this sensor requests the promotion of that exact
version or release into that environment -- if the environment
before it serves that version and this one does not yet. The gate still verifies the approval
(signature, role, independence, version, environment); the sensor only saves someone a click.
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg

from platform_defs.specs import AppSpec, EndpointSpec, Organisation, endpoint_asset_name
from resources.deployers.base import Target, serving_version
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import Ledger, LedgerResource

SENSOR_NAME = "approved_promotions"


def tick(org: Organisation, *, book: Ledger, deployer, cursor: dict) -> tuple[list[dg.RunRequest], list[str], dict]:
    seen = int(cursor.get("ledger_seq") or 0)
    head = book.head()
    if head is None or head.seq <= seen:
        return [], ["no new approvals"], {"ledger_seq": seen}
    requests, reasons = [], []
    # what an approval's subject promotes: an endpoint's model (its versions), or an app itself (its releases)
    targets = [(ep, ep.model, "endpoint") for ep in org.of_kind("endpoint") if isinstance(ep, EndpointSpec)]
    targets += [(app, app.name, "app") for app in org.of_kind("app") if isinstance(app, AppSpec)]
    for entry in book.entries(kind="approval", since_seq=seen):
        version, env = str(entry.data.get("version")), entry.env
        for decl, subject, kind in targets:
            if subject != entry.subject or env not in decl.environments:
                continue
            i = decl.environments.index(env)
            if i == 0:
                continue
            up, here = decl.environments[i - 1], env
            up_serves = serving_version(deployer.status(Target(decl.name, up, kind, decl.ports.get(up))))
            here_serves = serving_version(deployer.status(Target(decl.name, here, kind, decl.ports.get(here))))
            if up_serves != version:
                reasons.append(f"approval #{entry.seq}: {decl.name}.{up} serves {up_serves or 'nothing'}, not "
                               f"{version}; {here} follows when {up} does")
                continue
            if here_serves == version:
                reasons.append(f"approval #{entry.seq}: {decl.name}.{here} already serves {version}")
                continue
            requests.append(dg.RunRequest(
                run_key=f"approved:{decl.name}:{here}:{entry.seq}",
                asset_selection=[dg.AssetKey(endpoint_asset_name(decl.name, here))],
                tags={"onepath/trigger": "approval", "onepath/approval_entry": str(entry.seq),
                      "onepath/approved_version": version, "onepath/approver": str(entry.data.get("approver"))},
            ))
    return requests, reasons, {"ledger_seq": head.seq}


def build_approval_promotion_sensor(org: Organisation, policy: Any = None) -> dg.SensorDefinition:
    """The sensor; with ``policy`` it also reports ``approval_in_force`` on every change (each tick: an
    approval expires by the clock) and records each lapse (``sensors.approval_in_force``)."""
    @dg.sensor(
        name=SENSOR_NAME,
        description="When an approval lands in the ledger, promotes exactly that version into that environment "
                    "(the gate verifies the approval again).",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        target=dg.AssetSelection.all(),  # its run requests select the environment assets to deploy
    )
    def approved_promotions(context: dg.SensorEvaluationContext, ledger: LedgerResource,
                            deployer_local: LocalDeployerResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        in_force = dict(cursor.pop("in_force", {}))
        book = ledger.ledger()
        requests, reasons, new = tick(org, book=book, deployer=deployer_local.deployer(), cursor=cursor)
        events = []
        if policy is not None:
            from sensors.approval_in_force import evaluate_in_force

            events = evaluate_in_force(org, policy, book, in_force)
        context.update_cursor(json.dumps({**new, "in_force": in_force}, sort_keys=True))
        if not requests and not events:
            return dg.SkipReason("; ".join(reasons) or "no new approvals")
        return dg.SensorResult(run_requests=requests, asset_events=events)

    return approved_promotions


__all__ = ["SENSOR_NAME", "build_approval_promotion_sensor", "tick"]
