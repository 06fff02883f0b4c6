"""Composition root: load the organisation's declarations, build every asset, attach resources and sensors.

``workspace.yaml`` and ``dg dev`` load ``defs`` from here. A bad declaration is left out (with what depends
on it), its one-line error on the ``declarations`` asset; a bad policy file fails the load. Under
``dg check defs`` (``DAGSTER_IS_DEFS_VALIDATION_CLI=1``) the load is strict: a broken declaration fails it,
naming file, line and field (dg's own ``check yaml`` validates only one file per component type).

A component (``platform_defs.components``) gets its declaration's slice of this one graph from
``declaration_slice``: the graph is built here once per load, over the whole organisation.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from platform_defs.declarations_asset import build_declarations_asset
from platform_defs.factories import build_all
from platform_defs.inventory import build_inventory_asset, build_inventory_schedule
from platform_defs.loader import load_organisation
from platform_defs.platform_metrics import build_platform_metrics_asset, build_platform_metrics_schedule
from platform_defs.policy import Policy, load_policy, resolve_organisation
from platform_defs.rollback import build_rollback_job
from platform_defs.settings import Settings, load_settings
from platform_defs.specs import Organisation
from platform_defs.wiring import build_resources
from sensors.access import build_access_sensor
from sensors.alias_drift import build_alias_checks, build_alias_drift_sensor
from platform_defs.drift_check import build_drift_checks
from sensors.approval_in_force import build_approval_in_force_checks
from sensors.approval_promotion import build_approval_promotion_sensor
from sensors.drift_sensor import build_drift_sensor
from sensors.endpoint_status import build_endpoint_status_sensor
from sensors.serving_health import build_continuity_checks, build_serving_health_checks
from sensors.handoff import build_handoff_sensor
from sensors.supervisor_events import build_supervisor_events_sensor


def build_definitions(org: Organisation | None = None, settings: Settings | None = None,
                      policy: Policy | None = None) -> dg.Definitions:
    settings = (settings or load_settings()).ensure_dirs()
    policy = policy or load_policy()
    # tracks come from the policy: an organisation passed in is resolved against it like a loaded one
    # tolerant: a broken declaration (and what depends on it) is left out with its error, shown on the
    # `declarations` asset; everything else loads, so sensors keep ticking and endpoints keep serving
    strict = os.environ.get("DAGSTER_IS_DEFS_VALIDATION_CLI") == "1"
    loaded = org or load_organisation(policy=policy, tolerant=not strict)
    problems = list(getattr(loaded, "problems", []))
    org = resolve_organisation(loaded, policy)
    org.problems = problems
    return dg.Definitions(
        assets=[*build_all(org, settings.releases_dir, policy, settings.releases_url),
                build_platform_metrics_asset(policy),
                build_inventory_asset(org, policy), build_declarations_asset(org)],
        asset_checks=[*build_alias_checks(org), *build_drift_checks(org, policy), *build_serving_health_checks(org),
                      *build_continuity_checks(org), *build_approval_in_force_checks(org, policy)],
        schedules=[build_platform_metrics_schedule(), build_inventory_schedule()],
        jobs=[build_rollback_job(org, policy)],
        resources=build_resources(settings, secrets_from_env=True),
        sensors=[
            build_endpoint_status_sensor(org), build_alias_drift_sensor(org), build_drift_sensor(org, policy),
            build_approval_promotion_sensor(org, policy), build_handoff_sensor(org, policy), build_supervisor_events_sensor(org, policy),
            build_access_sensor(org),
            # assets drive assets: a new model version goes to staging, and on through the environments
            # the policy lets automation promote (never an app release: those have no condition)
            dg.AutomationConditionSensorDefinition(
                "onepath_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=15,
                description="Evaluates the graph's automation conditions: model after dataset, staging after "
                            "model, later environments after the one before when policy allows."),
        ],
    )


def declaration_slice(specs: list[Any], built: dg.Definitions | None = None) -> dg.Definitions:
    """The assets and asset checks of ``specs`` (declarations) in ``built`` (default: this code location's
    ``defs``), taken from the one graph the composition root built, with governance applied by track; with the
    resources they run with, so the slice loads on its own."""
    keys = {dg.AssetKey(n) for d in specs for n in Organisation.asset_names(d)}
    built = built or defs
    assets = [a for a in built.assets or [] if isinstance(a, dg.AssetsDefinition) and set(a.keys) & keys]
    checks = [c for c in built.asset_checks or [] if {k.asset_key for k in c.check_keys} & keys]
    return dg.Definitions(assets=assets, asset_checks=checks, resources=built.resources)


defs = build_definitions()
