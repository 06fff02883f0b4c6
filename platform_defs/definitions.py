"""Composition root: load the organisation's declarations, build every asset, attach resources and sensors.

``workspace.yaml`` and ``dg dev`` load ``defs`` from here. A bad declaration fails the load with a
``DeclarationError`` whose first line names the declaration, its file, the field and the problem.
"""

from __future__ import annotations

import dagster as dg

from platform_defs.factories import build_all
from platform_defs.inventory import build_inventory_asset, build_inventory_schedule
from platform_defs.loader import load_organisation
from platform_defs.platform_metrics import build_platform_metrics_asset, build_platform_metrics_schedule
from platform_defs.policy import Policy, check_organisation, load_policy
from platform_defs.rollback import build_rollback_job
from platform_defs.settings import Settings, load_settings
from platform_defs.specs import Organisation
from platform_defs.wiring import build_resources
from sensors.alias_drift import build_alias_checks, build_alias_drift_sensor
from sensors.endpoint_status import build_endpoint_status_sensor


def build_definitions(org: Organisation | None = None, settings: Settings | None = None,
                      policy: Policy | None = None) -> dg.Definitions:
    settings = (settings or load_settings()).ensure_dirs()
    org = org or load_organisation()
    policy = policy or load_policy()
    check_organisation(org, policy)
    return dg.Definitions(
        assets=[*build_all(org, settings.releases_dir, policy), build_platform_metrics_asset(policy),
                build_inventory_asset(org, policy)],
        asset_checks=build_alias_checks(org),
        schedules=[build_platform_metrics_schedule(), build_inventory_schedule()],
        jobs=[build_rollback_job(org, policy)],
        resources=build_resources(settings),
        sensors=[build_endpoint_status_sensor(org), build_alias_drift_sensor(org)],
    )


defs = build_definitions()
