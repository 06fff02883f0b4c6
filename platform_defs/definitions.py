"""Composition root: load the organisation's declarations, build every asset, attach resources and sensors.

``workspace.yaml`` and ``dg dev`` load ``defs`` from here. A bad declaration fails the load with a
``DeclarationError`` whose first line names the declaration, its file, the field and the problem.
"""

from __future__ import annotations

import dagster as dg

from platform_defs.factories import build_all
from platform_defs.loader import load_organisation
from platform_defs.platform_metrics import build_platform_metrics_asset, build_platform_metrics_schedule
from platform_defs.policy import Policy, check_organisation, load_policy
from platform_defs.settings import Settings, load_settings
from platform_defs.specs import Organisation
from resources.data_store import DataStore
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource, ledger_paths
from resources.mlflow_registry import MlflowRegistry
from sensors.endpoint_status import build_endpoint_status_sensor


def build_resources(settings: Settings) -> dict[str, object]:
    return {
        "mlflow": MlflowRegistry(
            tracking_uri=settings.mlflow_tracking_uri,
            registry_uri=settings.mlflow_registry_uri,
            artifact_root=str(settings.mlflow_artifact_root),
            ui_url=settings.mlflow_ui_url,
            cache_dir=str(settings.releases_dir / "models"),
        ),
        "data_store": DataStore(root=str(settings.data_dir)),
        "ledger": LedgerResource(db_path=str(ledger_paths(settings.home)[0]),
                                 key_path=str(ledger_paths(settings.home)[1])),
        "deployer_local": LocalDeployerResource(
            run_dir=str(settings.run_dir), host=settings.host, port_base=settings.port_base,
            inference_log_dir=str(settings.inference_log_dir),
        ),
    }


def build_definitions(org: Organisation | None = None, settings: Settings | None = None,
                      policy: Policy | None = None) -> dg.Definitions:
    settings = (settings or load_settings()).ensure_dirs()
    org = org or load_organisation()
    policy = policy or load_policy()
    check_organisation(org, policy)
    return dg.Definitions(
        assets=[*build_all(org, settings.releases_dir, policy), build_platform_metrics_asset(policy)],
        schedules=[build_platform_metrics_schedule()],
        resources=build_resources(settings),
        sensors=[build_endpoint_status_sensor(org)],
    )


defs = build_definitions()
