"""The ``rollback`` job: a way back launched from the Dagster UI's launchpad.

The way back itself is ``platform_defs.promotion.roll_back`` (``onepath rollback`` calls it too): it
puts back the previous governed version of an endpoint environment, or ``to_version``, only if that
version passed its gate there under the policy in force and its bytes match its registered digest,
under the environment's promotion lock. This module only adapts it to a Dagster job.
"""


import dagster as dg
from pydantic import Field

from platform_defs.policy import Policy
from platform_defs.promotion import PromotionError, Services, roll_back
from platform_defs.specs import Organisation, endpoint_asset_name
from resources.data_store import DataStore
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource
from resources.mlflow_registry import MlflowRegistry


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
                    ledger: LedgerResource, deployer_local: LocalDeployerResource,
                    data_store: DataStore) -> dg.Output:
        actor = f"dagster:{context.run.run_id}"
        context.log.info(f"rollback requested by {actor}: {config.endpoint}.{config.env} "
                         f"to {config.to_version or 'the previous version'} (reason: {config.reason!r})")
        try:
            result = roll_back(org, policy, config.endpoint, config.env, to_version=config.to_version or None,
                               reason=config.reason, actor=actor, services=Services(
                                   mlflow=mlflow, deployer=deployer_local.deployer(), ledger=ledger.ledger(),
                                   data_store=data_store, log=context.log.info, warn=context.log.warning))
        except PromotionError as err:
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


__all__ = ["RollbackConfig", "build_rollback_job"]
