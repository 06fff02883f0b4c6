"""The ``declarations`` asset: what the code location's tolerant load left out, shown in the UI.

Its description lists every problem (one line each) as soon as the location loads; its blocking check
``all_declarations_load`` fails naming each problem when the asset runs, which the automation sensor
does whenever the set of problems changes (the asset's code version is their digest).
"""

from __future__ import annotations

import hashlib

import dagster as dg

from platform_defs.specs import Organisation

NAME = "declarations"
CHECK = "all_declarations_load"


def problem_lines(org: Organisation) -> list[str]:
    return [str(p).splitlines()[0] for p in getattr(org, "problems", [])]


def build_declarations_asset(org: Organisation) -> dg.AssetsDefinition:
    lines = problem_lines(org)
    loaded = len(org)
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    head = (f"{loaded} declarations loaded, {len(lines)} left out" if lines else f"{loaded} declarations loaded")
    description = head + ("".join(f"\n- {line}" for line in lines) if lines else "; none left out.")

    @dg.asset(
        name=NAME, group_name="onepath", code_version=digest, description=description,
        check_specs=[dg.AssetCheckSpec(CHECK, asset=NAME, blocking=True,
                                       description="Every declaration loads; fails naming each one left out.")],
        metadata={"onepath/left_out": dg.MetadataValue.int(len(lines)),
                  **({"onepath/problems": dg.MetadataValue.md("\n".join(f"- {x}" for x in lines))} if lines else {})},
        automation_condition=(dg.AutomationCondition.missing() & ~dg.AutomationCondition.in_progress())
        | dg.AutomationCondition.code_version_changed(),  # once while missing, not again each tick while it runs
    )
    def _declarations():
        meta = {"loaded": dg.MetadataValue.int(loaded), "left_out": dg.MetadataValue.int(len(lines))}
        if lines:
            meta["problems"] = dg.MetadataValue.md("\n".join(f"- {x}" for x in lines))
        yield dg.MaterializeResult(metadata=meta)
        yield dg.AssetCheckResult(
            check_name=CHECK, passed=not lines, severity=dg.AssetCheckSeverity.ERROR, metadata=meta,
            description=("; ".join(lines) if lines else f"all {loaded} declarations load"))

    return _declarations
