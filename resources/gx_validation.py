"""Great Expectations 1.x validation of a DataFrame against the expectations a dataset declares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from platform_defs.specs import DatasetSpec

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

TYPE_LISTS = {
    "int": ["int64", "int32", "int16", "int8", "Int64", "Int32"],
    "float": ["float64", "float32", "Float64"],
    "string": ["object", "str", "string", "StringDtype"],
    "bool": ["bool", "boolean"],
}


@dataclass
class Validation:
    success: bool
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["success"]]


def expectations_for(spec: DatasetSpec) -> list[Any]:
    import great_expectations as gx

    E = gx.expectations
    out: list[Any] = [E.ExpectTableRowCountToBeBetween(min_value=spec.min_rows)]
    for c in spec.columns:
        out.append(E.ExpectColumnToExist(column=c.name))
        out.append(E.ExpectColumnValuesToBeInTypeList(column=c.name, type_list=TYPE_LISTS[c.dtype]))
        if not c.nullable:
            out.append(E.ExpectColumnValuesToNotBeNull(column=c.name))
        if c.min is not None or c.max is not None:
            out.append(E.ExpectColumnValuesToBeBetween(column=c.name, min_value=c.min, max_value=c.max))
        if c.values is not None:
            out.append(E.ExpectColumnValuesToBeInSet(column=c.name, value_set=list(c.values)))
        if c.role == "id":
            out.append(E.ExpectColumnValuesToBeUnique(column=c.name))
    return out


def validate(df: pd.DataFrame, spec: DatasetSpec) -> Validation:
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = {"globally": False, "metric_calculations": False}
    except Exception:  # older/newer config shapes: progress bars are cosmetic
        pass
    source = ctx.data_sources.add_pandas(f"onepath_{spec.name}")
    asset = source.add_dataframe_asset(name=spec.name)
    batch_def = asset.add_batch_definition_whole_dataframe("snapshot")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"{spec.name}_declared"))
    for exp in expectations_for(spec):
        suite.add_expectation(exp)
    batch = batch_def.get_batch(batch_parameters={"dataframe": df})
    result = batch.validate(suite)
    rows = []
    for r in result.results:
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
        res = r.result or {}
        rows.append({
            "expectation": cfg.type,
            "column": kwargs.get("column"),
            "success": bool(r.success),
            "unexpected_count": res.get("unexpected_count"),
            "unexpected_percent": res.get("unexpected_percent"),
            "sample": [str(x) for x in (res.get("partial_unexpected_list") or [])[:5]],
            "observed": str(res.get("observed_value")) if res.get("observed_value") is not None else None,
            "kwargs": {k: v for k, v in kwargs.items() if k != "column"},
        })
    return Validation(bool(result.success), rows)
