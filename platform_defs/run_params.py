"""The platform's terms for a run, mapped to Dagster's op config in ONE place.

``onepath materialize credit_applications --param period_start=2026-02-01`` and ``onepath promote ... --version 3``
speak of a dataset's generator parameters and an environment's version; the assets read them as op config
(``{"ops": {<asset>: {"config": {"params": {...}}}}}`` for a dataset, ``{"version": "3"}`` for an endpoint or
app environment asset). ``run_config_for`` is the only translation; an unknown parameter is one line naming
it and what the asset takes.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Mapping


class RunParamError(ValueError):
    """A parameter the asset does not take, or a value it cannot have (one line)."""


def parse_params(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": v}``; a value reads as JSON when it is JSON (``3``, ``true``, ``[1,2]``), else
    as the text it is (``2026-02-01``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise RunParamError(f"--param {pair!r}: write it as NAME=VALUE, e.g. --param period_start=2026-02-01")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def _op_name(asset: str) -> str:
    return asset.replace("/", "__").replace("-", "_")


def run_config_for(org: Any, asset: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Dagster run config for materializing ``asset`` of ``org`` with the platform-level ``params``:
    a dataset's generator parameters (checked against the generator's signature), or ``version`` for an
    endpoint or app environment asset (``<name>_<env>``). No params: ``{}``."""
    params = dict(params or {})
    if not params:
        return {}
    decl = org.by_name.get(asset)
    if decl is not None and decl.kind == "dataset":
        from platform_defs.factories import import_string

        accepted = sorted(inspect.signature(import_string(decl.generator)).parameters)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise RunParamError(f"dataset '{asset}' takes no parameter '{unknown[0]}' (its generator "
                                f"{decl.generator} takes: {', '.join(accepted) or 'none'})")
        return {"ops": {_op_name(asset): {"config": {"params": params}}}}
    env_of = _environment_asset(org, asset)
    if env_of is not None:
        unknown = sorted(set(params) - {"version"})
        if unknown:
            raise RunParamError(f"'{asset}' ({env_of[0]} in {env_of[1]}) takes no parameter '{unknown[0]}' "
                                f"(it takes: version)")
        return {"ops": {_op_name(asset): {"config": {"version": str(params["version"])}}}}
    if decl is None:
        raise RunParamError(f"no asset '{asset}' is declared (onepath inventory lists endpoints and apps; "
                            f"onepath validate every declaration)")
    raise RunParamError(f"{decl.kind} '{asset}' takes no parameters (got '{sorted(params)[0]}')")


def _environment_asset(org: Any, asset: str) -> tuple[str, str] | None:
    """(endpoint or app name, environment) when ``asset`` is one of their environment assets."""
    for d in org.by_name.values():
        for env in getattr(d, "environments", None) or []:
            if d.kind in ("endpoint", "app") and f"{d.name}_{env}" == asset:
                return d.name, env
    return None
