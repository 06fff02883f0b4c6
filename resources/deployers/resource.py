"""Deployer backends as Dagster resources: configuration here, behaviour in the backend classes."""

from __future__ import annotations


import dagster as dg
from pydantic import Field

from resources.deployers.base import Deployer
from resources.deployers.local import LocalProcessDeployer, from_config  # noqa: F401


class LocalDeployerResource(dg.ConfigurableResource):
    """Serve on this machine: one supervised process group per endpoint/app and environment."""

    run_dir: str = Field(description="Supervisor state, stable port registry and process logs.")
    host: str = Field("127.0.0.1", description="Interface the stable addresses listen on.")
    port_base: int = Field(18000, description="First port tried when a stable address is allocated.")
    inference_log_dir: str = Field(description="Where endpoints append their inference logs.")
    inference_log_url: str | None = Field(
        None, description="s3://bucket/prefix (ONEPATH_INFERENCE_LOG_URL): endpoints write their inference logs "
                          "there as Parquet segments instead of JSON lines under inference_log_dir.")
    artifact_roots: list[str] = Field(
        default_factory=list,
        description="Directories release artifacts may come from (the MLflow model cache, the releases "
                    "dir); a supervisor launches nothing from anywhere else.")

    def deployer(self) -> Deployer:
        return from_config(self.run_dir, self.host, self.port_base, self.inference_log_dir, self.artifact_roots,
                           self.inference_log_url)
