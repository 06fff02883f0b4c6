"""The resources every part of onepath uses, built from the settings (no definitions are loaded here,
so command-line verbs can import it cheaply)."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from platform_defs.settings import Settings
from resources.data_store import DataStore
from resources.deployers.local import settings_config
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource, ledger_paths
from resources.mlflow_registry import MlflowRegistry
from resources.monitoring import MonitoringResource


def _secret(var: str, value: str | None, from_env: bool) -> Any:
    """A credential the settings hold (``value``, None when unset): as ``dg.EnvVar(var)`` for the Definitions when
    that is where it came from, else the value itself."""
    if not value:
        return None
    return dg.EnvVar(var) if from_env and os.environ.get(var) == value else value


def build_resources(settings: Settings, *, secrets_from_env: bool = False) -> dict[str, object]:
    """The resources of ``settings``. ``secrets_from_env``: a store credential is given as ``dg.EnvVar``, which
    Dagster reads when a run starts and never shows in the UI or stores with a run (the Definitions); the
    command line, which calls the resources outside any run, gets the value itself."""
    return {
        # a PostgreSQL store URL holds a password; a registry on the tracking store is left to default to it
        "mlflow": MlflowRegistry(
            tracking_uri=_secret("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri, secrets_from_env),
            registry_uri=(None if secrets_from_env and settings.mlflow_registry_uri == settings.mlflow_tracking_uri
                          else _secret("MLFLOW_REGISTRY_URI", settings.mlflow_registry_uri, secrets_from_env)),
            artifact_root=settings.mlflow_artifacts,
            ui_url=settings.mlflow_ui_url,
            cache_dir=str(settings.releases_dir / "models"),
        ),
        "data_store": DataStore(root=settings.data_root),
        # a PostgreSQL URL holds a password
        "ledger": LedgerResource(location=(_secret("ONEPATH_LEDGER_URL", settings.ledger_url, secrets_from_env)
                                           or str(settings.ledger_location)),
                                 key_path=str(ledger_paths(settings.home)[1]),
                                 platform_key=_secret("ONEPATH_PLATFORM_KEY", os.environ.get("ONEPATH_PLATFORM_KEY"),
                                                      secrets_from_env),
                                 witness_socket=str(settings.witness_socket) if settings.witness_socket else None),
        "deployer_local": LocalDeployerResource(**settings_config(settings)),
        "monitoring": MonitoringResource(
            inference_log_dir=str(settings.inference_log_dir), outcomes_dir=str(settings.outcomes_dir),
            drift_reports_dir=str(settings.drift_reports_dir), inference_log_url=settings.inference_log_url,
            outcomes_url=settings.outcomes_url, drift_reports_url=settings.drift_reports_url,
        ),
    }
