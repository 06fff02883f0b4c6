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

Two engines give the same per-column numbers:

* ``engine="evidently"``: the ``DataDriftPreset`` report, as above. On 1,000,000 current rows it takes
  minutes: each column's statistic is computed three times (``ValueDrift``, then the legacy
  ``DatasetDriftMetric`` and ``DataDriftTable`` the preset renders), each with histograms, Doane bin
  widths, a binned time-index scatter and plotly figures. The statistics are a small part of it.
* ``engine="fast"``: per column, the stat test Evidently registered under the method's name
  (``evidently.legacy.calculations.stattests``: the very ``StatTest`` object ``ValueDrift`` resolves),
  called once on the full columns after the same cleaning ``get_one_column_drift`` does (infinities to
  NaN, NaN dropped). Same code on the same values, so the same value; the verdict uses the direction
  table below and is checked against the stat test's own ``drifted``. No report machinery runs.
  ``empirical_mmd`` (an n x n kernel matrix) and ``TVD`` (1000 permutations) are not offered: their cost
  grows with the window in a way no cleaning fixes.
* ``engine="auto"`` (default): ``fast`` from ``AUTO_FAST_ROWS`` current rows on, ``evidently`` below.

With the fast engine the HTML report (``report_html``) is Evidently's full report over a uniform random
sample of at most ``report_sample_rows`` rows of each window (seeded, in the original order). The file name
says ``sample-<k>-of-<n>``, the page carries a banner saying so, and ``DriftResult.report_sampled_rows``
records it; the verdict table never comes from the sample. When no sampling is needed the report runs on
the full windows and its per-column values are checked against the fast ones.
"""

from __future__ import annotations

import html
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

ColumnKind = Literal["numeric", "categorical"]
ValueKind = Literal["p_value", "distance"]
Engine = Literal["auto", "evidently", "fast"]

AUTO_FAST_ROWS = 100_000  # engine="auto": the fast engine from this many current rows on
REPORT_SAMPLE_ROWS = 50_000  # fast engine: the HTML report's bound per window
REPORT_SAMPLE_SEED = 20240917
# methods the fast engine refuses: why
NOT_FAST = {
    "empirical_mmd": "it builds an n x n kernel matrix over both windows",
    "TVD": "its p-value is a 1000-fold permutation test over both windows",
}

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
    engine: str = "evidently"
    # set when the HTML report was computed on a uniform sample (the verdict never is)
    report_sampled_rows: int | None = None
    report_sampled_reference_rows: int | None = None

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
        text = (
            f"{verdict}: {self.drifted_count}/{len(self.columns)} columns drifted "
            f"(share {self.drifted_share:.2f}, dataset drift at >= {self.drift_share:.2f}); "
            f"reference {self.reference_rows} rows, current {self.current_rows} rows; {methods}"
        )
        if self.report_sampled_rows is not None:
            text += (f"; HTML report on a uniform sample of {self.report_sampled_rows} of {self.current_rows} "
                     f"current rows")
        return text

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
            "engine": self.engine, "report_sampled_rows": self.report_sampled_rows,
            "report_sampled_reference_rows": self.report_sampled_reference_rows,
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


def _run_evidently(
    reference: pd.DataFrame, current: pd.DataFrame, columns: list[str], kinds: dict[str, ColumnKind],
    spec: dict[str, tuple[str, float]], drift_share: float, *, numeric_method: str, numeric_threshold: float,
    categorical_method: str, categorical_threshold: float, run_meta: dict[str, Any] | None = None,
) -> tuple[list[ColumnDrift], Any]:
    """Evidently's DataDriftPreset on the given windows: per-column results (cross-checked) and the snapshot."""
    numeric = [c for c in columns if kinds[c] == "numeric"]
    categorical = [c for c in columns if kinds[c] == "categorical"]
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
    snapshot = report.run(cur_ds, ref_ds, **(run_meta or {}))  # Evidently 0.7: run(current, reference)

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
    return results, snapshot


def _evidently_clean(series: pd.Series) -> pd.Series:
    """What ``get_one_column_drift`` hands its stat test: infinities as NaN, NaN dropped.

    A column of strings holds no infinity, so the (slow, object-wise) replace is skipped for it; the
    values that come out are the same either way.
    """
    if series.dtype == object and pd.api.types.infer_dtype(series, skipna=True) == "string":
        return series.dropna()
    return series.replace([-np.inf, np.inf], np.nan).dropna()


def _fast_column(reference: pd.Series, current: pd.Series, column: str, kind: ColumnKind, method: str,
                 threshold: float) -> ColumnDrift:
    """One column's value from the stat test Evidently registered for ``method``, on the full columns."""
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    column_type = ColumnType.Numerical if kind == "numeric" else ColumnType.Categorical
    ref = _evidently_clean(reference)
    cur = _evidently_clean(current)
    # the same refusals get_one_column_drift makes
    if ref.empty:
        raise ValueError(f"An empty column '{column}' was provided for drift calculation in the reference dataset.")
    if cur.empty:
        raise ValueError(f"An empty column '{column}' was provided for drift calculation in the current dataset.")
    stat_test = get_registered_stattest(method, column_type)
    outcome = stat_test(ref, cur, column_type, threshold)
    value = float(outcome.drift_score)
    value_kind, compare, _ = _METHODS[method]
    drifted = bool(compare(value, threshold)) if math.isfinite(value) else False
    if drifted != bool(outcome.drifted):
        raise RuntimeError(f"drift direction for {method!r} disagrees with Evidently's stat test on {column!r}: "
                           f"value {value!r}, threshold {threshold!r}, ours {drifted}, Evidently {outcome.drifted}")
    return ColumnDrift(column, kind, method, threshold, value, value_kind, drifted)


def _sample(frame: pd.DataFrame, bound: int, seed: int) -> pd.DataFrame:
    """A uniform random sample of ``bound`` rows without replacement, in the frame's own order."""
    if len(frame) <= bound:
        return frame
    rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=bound, replace=False))
    return frame.iloc[rows]


def _sampled_name(path: Path, k: int, n: int) -> Path:
    return path.with_name(f"{path.stem}.sample-{k}-of-{n}{path.suffix}")


def _banner(path: Path, text: str) -> None:
    """Put a visible note at the top of Evidently's saved HTML page."""
    page = path.read_text(encoding="utf-8")
    note = (f'<div id="onepath-sample-note" style="padding:10px 16px;background:#fff3cd;border-bottom:1px solid '
            f'#e0c36b;font:14px sans-serif">{html.escape(text)}</div>')
    at = page.find("<body")
    if at >= 0:
        at = page.find(">", at) + 1
        page = page[:at] + note + page[at:]
    else:
        page = note + page
    path.write_text(page, encoding="utf-8")


def _choose_engine(engine: str, current_rows: int, used: dict[str, tuple[str, float]]) -> str:
    if engine not in ("auto", "evidently", "fast"):
        raise ValueError(f"engine must be 'auto', 'evidently' or 'fast', got {engine!r}")
    slow = {m for m, _ in used.values() if m in NOT_FAST}
    if engine == "fast" and slow:
        m = sorted(slow)[0]
        raise ValueError(f"drift method {m!r} has no fast engine: {NOT_FAST[m]}; use engine='evidently'")
    if engine == "auto":
        return "fast" if current_rows >= AUTO_FAST_ROWS and not slow else "evidently"
    return engine


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
    engine: Engine = "auto",
    report_sample_rows: int = REPORT_SAMPLE_ROWS,
) -> DriftResult:
    """Compare ``current`` against ``reference`` on ``columns``; save Evidently's HTML if asked.

    ``engine`` picks how (see the module docstring); every engine gives the same per-column values and
    verdicts. With the fast engine, the HTML report of windows longer than ``report_sample_rows`` is
    computed on a uniform sample and saved as ``<name>.sample-<k>-of-<n>.html`` (``report_html`` of the
    result is the path written).
    """
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
    if isinstance(report_sample_rows, bool) or not isinstance(report_sample_rows, int) or report_sample_rows < 2:
        raise ValueError(f"report_sample_rows must be an integer of at least 2, got {report_sample_rows!r}")

    kinds: dict[str, ColumnKind] = {}
    for c in columns:
        ref_kind, cur_kind = _kind(reference[c]), _kind(current[c])
        if ref_kind != cur_kind:
            raise ValueError(f"column {c!r} is {ref_kind} in reference but {cur_kind} in current")
        kinds[c] = ref_kind
    spec = {"numeric": (numeric_method, float(numeric_threshold)),
            "categorical": (categorical_method, float(categorical_threshold))}
    used_types = {k: spec[k] for k in ("numeric", "categorical") if any(kinds[c] == k for c in columns)}
    chosen = _choose_engine(engine, len(current), used_types)
    methods = {"numeric_method": numeric_method, "numeric_threshold": numeric_threshold,
               "categorical_method": categorical_method, "categorical_threshold": categorical_threshold}

    saved: Path | None = None
    sampled_rows: int | None = None
    sampled_ref_rows: int | None = None
    if chosen == "evidently":
        results, snapshot = _run_evidently(reference, current, columns, kinds, spec, drift_share, **methods)
        if report_html is not None:
            saved = Path(report_html)
            saved.parent.mkdir(parents=True, exist_ok=True)
            snapshot.save_html(str(saved))
    else:
        results = [_fast_column(reference[c], current[c], c, kinds[c], *spec[kinds[c]]) for c in columns]
        if report_html is not None:
            ref_s = _sample(reference, report_sample_rows, REPORT_SAMPLE_SEED)
            cur_s = _sample(current, report_sample_rows, REPORT_SAMPLE_SEED + 1)
            is_sample = len(ref_s) < len(reference) or len(cur_s) < len(current)
            meta = None
            if is_sample:
                meta = {"name": f"drift (report on a sample of {len(cur_s)} of {len(current)} current rows)",
                        "metadata": {"onepath_report_sampled_rows": len(cur_s), "onepath_current_rows": len(current),
                                     "onepath_report_sampled_reference_rows": len(ref_s),
                                     "onepath_reference_rows": len(reference), "onepath_verdict": "full data"}}
            report_results, snapshot = _run_evidently(ref_s, cur_s, columns, kinds, spec, drift_share,
                                                      run_meta=meta, **methods)
            saved = Path(report_html)
            if is_sample:
                saved = _sampled_name(saved, len(cur_s), len(current))
                sampled_rows, sampled_ref_rows = len(cur_s), len(ref_s)
            else:  # the report saw exactly what the verdict saw: the two must agree
                for fast, full in zip(results, report_results):
                    if fast.drifted != full.drifted or not math.isclose(fast.value, full.value, rel_tol=1e-9):
                        raise RuntimeError(f"fast drift value for {fast.column!r} disagrees with Evidently's report: "
                                           f"{fast.value!r} vs {full.value!r}")
            saved.parent.mkdir(parents=True, exist_ok=True)
            snapshot.save_html(str(saved))
            if is_sample:
                _banner(saved, (
                    f"Sampled report: the per-column values on this page come from a uniform random sample of "
                    f"{len(cur_s)} of {len(current)} current rows and {len(ref_s)} of {len(reference)} reference "
                    f"rows. The drift verdict recorded by onepath was computed on all rows with the same methods "
                    f"and thresholds, so its values can differ from the ones shown here."))

    count = sum(r.drifted for r in results)
    share = count / len(results)
    return DriftResult(
        columns=results, drifted_count=count, drifted_share=share, drift_share=drift_share,
        dataset_drift=share >= drift_share, reference_rows=len(reference), current_rows=len(current),
        report_html=saved, method_by_type=used_types, engine=chosen,
        report_sampled_rows=sampled_rows, report_sampled_reference_rows=sampled_ref_rows,
    )
