"""Pure data-drift evaluation with Evidently 0.7 (no Dagster, no MLflow).

``evaluate_drift(reference, current, columns=[...])`` compares two windows column by column and
returns a :class:`DriftResult`. The statistical method and threshold are always passed to Evidently
explicitly, per column type (``num_method``/``num_threshold``, ``cat_method``/``cat_threshold``):
left to itself Evidently picks a method from the reference size (K-S below 1000 rows, Wasserstein
above), so the same policy would silently mean different tests on different windows.

Evidently 0.7 reports, per column, only a number: a p-value for hypothesis tests (drift when it is
small) or a distance for divergence measures (drift when it is large). The direction table below
mirrors the comparison each Evidently stat test uses, and the drifted count we derive is checked
against Evidently's own ``DriftedColumnsCount`` so the two can never silently disagree.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

ColumnKind = Literal["numeric", "categorical"]
ValueKind = Literal["p_value", "distance"]

# method -> (what the value is, drift comparison value-vs-threshold, column kinds it applies to).
# Comparisons copied from evidently.legacy.calculations.stattests (0.7.x).
_P, _D = "p_value", "distance"
_METHODS: dict[str, tuple[ValueKind, Callable[[float, float], bool], frozenset[str]]] = {
    # numeric hypothesis tests
    "ks": (_P, operator.le, frozenset({"numeric"})),
    "anderson": (_P, operator.lt, frozenset({"numeric"})),
    "cramer_von_mises": (_P, operator.le, frozenset({"numeric"})),
    "es": (_P, operator.lt, frozenset({"numeric"})),
    "mannw": (_P, operator.lt, frozenset({"numeric"})),
    "t_test": (_P, operator.lt, frozenset({"numeric"})),
    "empirical_mmd": (_P, operator.lt, frozenset({"numeric"})),
    # categorical hypothesis tests
    "chisquare": (_P, operator.lt, frozenset({"categorical"})),
    "z": (_P, operator.lt, frozenset({"categorical"})),
    "fisher_exact": (_P, operator.lt, frozenset({"categorical"})),
    "g_test": (_P, operator.lt, frozenset({"categorical"})),
    "TVD": (_P, operator.lt, frozenset({"categorical"})),
    # distances / divergences
    "wasserstein": (_D, operator.ge, frozenset({"numeric"})),
    "ed": (_D, operator.gt, frozenset({"numeric"})),
    "jensenshannon": (_D, operator.ge, frozenset({"numeric", "categorical"})),
    "hellinger": (_D, operator.ge, frozenset({"numeric", "categorical"})),
    "kl_div": (_D, operator.ge, frozenset({"numeric", "categorical"})),
    "psi": (_D, operator.ge, frozenset({"numeric", "categorical"})),
}

SUPPORTED_METHODS = tuple(sorted(_METHODS))


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    type: ColumnKind
    method: str
    threshold: float
    value: float
    value_kind: ValueKind
    drifted: bool

    def as_dict(self) -> dict:
        return {
            "column": self.column, "type": self.type, "method": self.method, "threshold": self.threshold,
            "value": self.value, "value_kind": self.value_kind, "drifted": self.drifted,
        }


@dataclass(frozen=True)
class DriftResult:
    columns: list[ColumnDrift]
    drifted_count: int
    drifted_share: float
    drift_share: float
    dataset_drift: bool
    reference_rows: int
    current_rows: int
    report_html: Path | None = None
    method_by_type: dict[str, tuple[str, float]] = field(default_factory=dict)

    def column(self, name: str) -> ColumnDrift:
        for c in self.columns:
            if c.column == name:
                return c
        raise KeyError(name)

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.columns if c.drifted]

    @property
    def summary(self) -> str:
        verdict = "DRIFT" if self.dataset_drift else "no drift"
        methods = ", ".join(f"{k}={m}@{t:g}" for k, (m, t) in self.method_by_type.items())
        return (
            f"{verdict}: {self.drifted_count}/{len(self.columns)} columns drifted "
            f"(share {self.drifted_share:.2f}, dataset drift at >= {self.drift_share:.2f}); "
            f"reference {self.reference_rows} rows, current {self.current_rows} rows; {methods}"
        )

    def to_markdown(self) -> str:
        lines = [
            self.summary,
            "",
            "| column | type | method | threshold | value | value kind | drifted |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in self.columns:
            lines.append(
                f"| {c.column} | {c.type} | {c.method} | {c.threshold:g} | {c.value:.4g} | {c.value_kind} | "
                f"{'yes' if c.drifted else 'no'} |"
            )
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {
            "columns": [c.as_dict() for c in self.columns], "drifted_count": self.drifted_count,
            "drifted_share": self.drifted_share, "drift_share": self.drift_share,
            "dataset_drift": self.dataset_drift, "reference_rows": self.reference_rows,
            "current_rows": self.current_rows, "report_html": str(self.report_html) if self.report_html else None,
        }


def _kind(series: pd.Series) -> ColumnKind:
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return "categorical"
    return "numeric"


def _check_method(method: str, threshold: float, kind: ColumnKind) -> None:
    if method not in _METHODS:
        raise ValueError(f"unsupported {kind} drift method {method!r}; choose one of {', '.join(SUPPORTED_METHODS)}")
    if kind not in _METHODS[method][2]:
        raise ValueError(f"drift method {method!r} does not apply to {kind} columns")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"{kind} drift threshold must be a positive number, got {threshold!r}")


def evaluate_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    columns: list[str],
    numeric_method: str = "ks",
    numeric_threshold: float = 0.05,
    categorical_method: str = "chisquare",
    categorical_threshold: float = 0.05,
    drift_share: float = 0.5,
    report_html: Path | None = None,
) -> DriftResult:
    """Compare ``current`` against ``reference`` on ``columns``; save Evidently's HTML if asked."""
    if not columns:
        raise ValueError("columns must name at least one column")
    if len(set(columns)) != len(columns):
        raise ValueError("columns contains duplicates")
    for name, frame in (("reference", reference), ("current", current)):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} data is missing column(s): {', '.join(missing)}")
        if len(frame) == 0:
            raise ValueError(f"{name} data has no rows")
    if not 0.0 < drift_share <= 1.0:
        raise ValueError(f"drift_share must be in (0, 1], got {drift_share!r}")
    _check_method(numeric_method, numeric_threshold, "numeric")
    _check_method(categorical_method, categorical_threshold, "categorical")

    kinds: dict[str, ColumnKind] = {}
    for c in columns:
        ref_kind, cur_kind = _kind(reference[c]), _kind(current[c])
        if ref_kind != cur_kind:
            raise ValueError(f"column {c!r} is {ref_kind} in reference but {cur_kind} in current")
        kinds[c] = ref_kind
    numeric = [c for c in columns if kinds[c] == "numeric"]
    categorical = [c for c in columns if kinds[c] == "categorical"]
    spec = {"numeric": (numeric_method, float(numeric_threshold)),
            "categorical": (categorical_method, float(categorical_threshold))}

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    ref_ds = Dataset.from_pandas(reference[columns], data_definition=definition)
    cur_ds = Dataset.from_pandas(current[columns], data_definition=definition)
    report = Report([
        DataDriftPreset(
            columns=list(columns),
            num_method=numeric_method,
            num_threshold=float(numeric_threshold),
            cat_method=categorical_method,
            cat_threshold=float(categorical_threshold),
            drift_share=drift_share,
        )
    ])
    snapshot = report.run(cur_ds, ref_ds)  # Evidently 0.7: run(current, reference)

    values: dict[str, tuple[str, float, float]] = {}
    evidently_count: float | None = None
    for m in snapshot.dict()["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith(":ValueDrift"):
            values[cfg["column"]] = (cfg["method"], float(cfg["threshold"]), float(m["value"]))
        elif cfg["type"].endswith(":DriftedColumnsCount"):
            evidently_count = float(m["value"]["count"])

    results: list[ColumnDrift] = []
    for c in columns:
        if c not in values:
            raise RuntimeError(f"Evidently returned no drift value for column {c!r}")
        used_method, used_threshold, value = values[c]
        method, threshold = spec[kinds[c]]
        if used_method != method or not math.isclose(used_threshold, threshold):
            raise RuntimeError(
                f"Evidently used {used_method}@{used_threshold} for {c!r}, expected {method}@{threshold}"
            )
        value_kind, compare, _ = _METHODS[method]
        drifted = bool(compare(value, threshold)) if math.isfinite(value) else False
        results.append(ColumnDrift(c, kinds[c], method, threshold, value, value_kind, drifted))

    count = sum(r.drifted for r in results)
    if evidently_count is not None and int(evidently_count) != count:
        raise RuntimeError(f"drifted column count disagrees with Evidently: ours {count}, Evidently {evidently_count:g}")
    share = count / len(results)

    saved: Path | None = None
    if report_html is not None:
        saved = Path(report_html)
        saved.parent.mkdir(parents=True, exist_ok=True)
        snapshot.save_html(str(saved))

    used_types = {k: spec[k] for k in ("numeric", "categorical") if any(kinds[c] == k for c in columns)}
    return DriftResult(
        columns=results, drifted_count=count, drifted_share=share, drift_share=drift_share,
        dataset_drift=share >= drift_share, reference_rows=len(reference), current_rows=len(current),
        report_html=saved, method_by_type=used_types,
    )
