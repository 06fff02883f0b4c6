"""Keep every grant justified, fresh and published, without anyone typing (``platform_defs.access``).

Each tick runs :meth:`Access.reconcile` on the organisation the definitions were built from and the recorded
policy in force: a grant an app no longer justifies (its ``calls`` dropped an endpoint, the app is gone) or
the recorded policy no longer grants (a caller removed or narrowed) is revoked, a secret older than
``access.rotate_after_days`` is rotated (the old one works ``overlap_seconds`` more), and each endpoint
environment's access table is written again when its content changed since the last tick (the cursor
holds the digests), or on the first tick of a fresh daemon.
"""

from __future__ import annotations

import json

import dagster as dg

from platform_defs.access import Access, AccessError
from platform_defs.specs import Organisation
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource

SENSOR_NAME = "access"


def build_access_sensor(org: Organisation) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR_NAME,
        description="Revokes grants nothing justifies any more, rotates old secrets, publishes endpoints' access tables.",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def access(context: dg.SensorEvaluationContext, ledger: LedgerResource, deployer_local: LocalDeployerResource):
        published = json.loads(context.cursor) if context.cursor else None
        try:
            out = Access(ledger.ledger(), deployer_local.deployer(), actor=f"sensor:{SENSOR_NAME}").reconcile(
                org, published=published)
        except AccessError as err:
            context.log.error(f"access: nothing changed: {err}")
            return dg.SkipReason(str(err))
        for r in out.revoked:
            context.log.warning(f"access: revoked grant {r['grant']} ({r['caller']} on {r['endpoint']}.{r['env']}): "
                                f"{r['why']}")
        for r in out.rotated:
            context.log.info(f"access: rotated grant {r['grant']} ({r['caller']} on {r['endpoint']}.{r['env']})")
        for e in out.errors:
            context.log.error(f"access: {e}")
        context.update_cursor(json.dumps(out.digests, sort_keys=True))
        return dg.SkipReason(f"access: {out.summary()}")

    return access
