"""Fairness of a binary decision model across protected attributes. Pure: inputs in, result out.

The decision is judged on the **favourable outcome**. For the credit-risk model a prediction of
``0`` ("will not default") means the application is approved, so ``favourable_label=0``; labels
and predictions are mapped to ``1 = favourable`` before any fairlearn call, which makes
"selection rate" the approval rate, the true positive rate the approval rate among applicants
who repaid, and the false positive rate the approval rate among applicants who defaulted.

Per protected attribute (each column of ``sensitive``):

- **demographic parity difference** (DPD): largest minus smallest group approval rate
  (``fairlearn.metrics.demographic_parity_difference``);
- **equalized odds difference** (EOD): ``max(TPR difference, FPR difference)`` between groups,
  fairlearn's definition, from the rates fairlearn's ``MetricFrame`` computes per group;
- **disparate impact ratio** (DIR): smallest over largest group approval rate
  (``fairlearn.metrics.demographic_parity_ratio``), judged by the four-fifths rule.

Small groups: a group with fewer than ``min_group_size`` rows is listed in the per-group table
but left out of the three numbers (its rates are noise). For the EOD the same rule applies to the
rate's own denominator: a group's TPR is compared only if it has ``min_group_size`` rows with a
favourable label, its FPR only if it has ``min_group_size`` rows with an unfavourable one. (A
group of 40 applicants with a 15 % default rate has ~6 defaulters; its FPR moves in steps of
0.17 and would decide the EOD on its own.) The table says why each group or rate was left out.

An attribute that cannot be assessed (fewer than two groups big enough) **fails**: a blocking
check must not pass because there was nothing to compare.

Default thresholds (``DEFAULT_*``) were chosen on the example credit data; see
``DEFAULT_MAX_DPD`` for the measurements behind them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    demographic_parity_ratio,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score

#: Probability of default at or above which an application is declined (the portal's
#: ``APPROVE_BELOW``). At 0.5 the credit model approves ~95 % of the unbiased world (~84 % of the
#: biased one) and the biased model passes the four-fifths rule on gender: 0.5 hides disparity.
DEFAULT_DECISION_THRESHOLD = 0.2

# The defaults are the ml-high-risk track's limits in assets/policy.yaml. Measured on
# generate_credit_applications(rows=6000, seed=42), held-out 25 % split (train_test_split
# random_state=7, stratified), train_credit_risk with default params, decisions at
# DEFAULT_DECISION_THRESHOLD, min_group_size=60 (tests/test_evaluators.py re-measures them):
#
#   gender    unbiased  DPD 0.020  EOD 0.020  DIR 0.975   -> passes   (F 0.782, M 0.762 approved)
#             biased    DPD 0.136  EOD 0.079  DIR 0.743   -> fails on DIR (F 0.393, M 0.529)
#   age_band  unbiased  DPD 0.121  EOD 0.099  DIR 0.857   -> passes   (18-25 0.725 ... 65+ 0.847)
#             biased    DPD 0.164  EOD 0.158  DIR 0.728   -> fails (DPD and DIR; not stable, see below)
#
# The X gender group (~3 % of applicants, 31 test rows here) is listed but not compared: with
# min_group_size 60 gender's three numbers are the F vs M gap alone. For the EOD the bar also
# applies per label: on age band only 26-35 and 36-50 have 60 defaulters in the test set, so only
# their FPRs are compared (65+ has 11; its FPR, 0.545, would otherwise decide the EOD).
#
# Over 5 seeds (42, 1, 2, 3, 4) x 10 splits (random_state 0-9), same settings:
#   unbiased  passes 46/50: gender 50/50 (DPD <= 0.062, DIR >= 0.920); age band 46/50 (DPD
#             0.010-0.166, EOD 0.033-0.245, DIR >= 0.805; fails twice on DPD, twice on EOD).
#   biased    fails 50/50 on gender: DIR 0.557-0.783 fires every time, DPD 0.112-0.244 in 41.
#             Its age-band verdict varies (fails 31/50).
#   At a 0.5 threshold the biased model would pass on gender 50/50 (DIR 0.887-0.926 on seeds
#   42/1/2 x splits 7/3).
#
# So the four-fifths rule (DIR >= 0.8, the established convention) is what separates the two
# models on gender. DPD 0.15 catches the larger gaps. The EOD does not separate them (gender EOD
# up to 0.172 unbiased, 0.192 biased): its limit, 0.20, catches gross error-rate gaps only. The
# unbiased model's age-band numbers sit closest to their limits (DPD 0.121 vs 0.15 here) and
# fail on 4 of 50 splits: a held-out set of 1500 rows carries that much sampling noise.
DEFAULT_MAX_DPD = 0.15
DEFAULT_MAX_EOD = 0.20
DEFAULT_MIN_DIR = 0.80
DEFAULT_MIN_GROUP_SIZE = 60

MISSING_GROUP = "(missing)"


def apply_decision_threshold(probability_unfavourable: Any, threshold: float = DEFAULT_DECISION_THRESHOLD) -> np.ndarray:
    """``1`` (unfavourable: decline) where the probability is at or above ``threshold``, else ``0``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
    p = np.asarray(probability_unfavourable, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"expected a 1-d array of probabilities, got shape {p.shape}")
    return (p >= threshold).astype(int)


@dataclass(frozen=True)
class GroupStats:
    """One row of an attribute's per-group table (rates on the favourable outcome)."""

    group: str
    count: int
    favourable_rate: float
    favourable_rate_ci_low: float
    favourable_rate_ci_high: float
    true_positive_rate: float | None
    false_positive_rate: float | None
    accuracy: float
    label_favourable: int
    label_unfavourable: int
    included: bool
    tpr_compared: bool
    fpr_compared: bool
    note: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AttributeFairness:
    attribute: str
    passed: bool
    assessable: bool
    demographic_parity_difference: float | None
    equalized_odds_difference: float | None
    disparate_impact_ratio: float | None
    tpr_difference: float | None
    fpr_difference: float | None
    groups: list[GroupStats]
    violations: list[str]

    @property
    def excluded_groups(self) -> list[str]:
        return [g.group for g in self.groups if not g.included]

    def verdict(self) -> str:
        """``gender: DPD 0.165 > 0.150, DIR 0.778 < 0.800`` or ``gender: ok (DPD 0.121, ...)``."""
        small = f" [excluded, too small: {', '.join(self.excluded_groups)}]" if self.excluded_groups else ""
        if self.violations:
            return f"{self.attribute}: {', '.join(self.violations)}{small}"
        return (f"{self.attribute}: ok (DPD {_f(self.demographic_parity_difference)}, "
                f"EOD {_f(self.equalized_odds_difference)}, DIR {_f(self.disparate_impact_ratio)}){small}")

    def records(self) -> list[dict[str, Any]]:
        """The per-group table as plain records (for a metadata table)."""
        return [g.as_dict() for g in self.groups]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["excluded_groups"] = self.excluded_groups
        return d


@dataclass(frozen=True)
class FairnessResult:
    passed: bool
    summary: str
    attributes: dict[str, AttributeFairness]
    thresholds: dict[str, float | int]
    favourable_label: Any
    n_rows: int
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, attribute: str) -> AttributeFairness:
        return self.attributes[attribute]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "summary": self.summary,
            "thresholds": dict(self.thresholds),
            "favourable_label": _jsonable(self.favourable_label),
            "n_rows": self.n_rows,
            "notes": list(self.notes),
            "attributes": {k: v.as_dict() for k, v in self.attributes.items()},
        }

    def to_markdown(self) -> str:
        t = self.thresholds
        out = [f"**Fairness: {'PASSED' if self.passed else 'FAILED'}** on {self.n_rows} rows "
               f"(favourable outcome: label {self.favourable_label!r}). Limits: DPD ≤ {t['max_demographic_parity_difference']:.3f}, "
               f"EOD ≤ {t['max_equalized_odds_difference']:.3f}, DIR ≥ {t['min_disparate_impact_ratio']:.3f}; "
               f"groups under {t['min_group_size']} rows are listed but not compared."]
        for a in self.attributes.values():
            out += ["", f"### {a.attribute}: {'pass' if a.passed else 'FAIL'}", "",
                    f"DPD {_f(a.demographic_parity_difference)} · EOD {_f(a.equalized_odds_difference)} "
                    f"(TPR diff {_f(a.tpr_difference)}, FPR diff {_f(a.fpr_difference)}) · "
                    f"DIR {_f(a.disparate_impact_ratio)}"]
            if a.violations:
                out.append(f"Violations: {'; '.join(a.violations)}")
            out += ["", "| group | rows | favourable rate (95% CI) | TPR | FPR | accuracy | note |",
                    "|---|---:|---:|---:|---:|---:|---|"]
            for g in a.groups:
                out.append(
                    f"| {_md(g.group)} | {g.count} | {g.favourable_rate:.3f} ({g.favourable_rate_ci_low:.3f}–"
                    f"{g.favourable_rate_ci_high:.3f}) | {_f(g.true_positive_rate)} | {_f(g.false_positive_rate)} | "
                    f"{g.accuracy:.3f} | {_md(g.note)} |")
        return "\n".join(out) + "\n"


def evaluate_fairness(
    y_true: Any,
    y_pred: Any,
    sensitive: pd.DataFrame,
    *,
    favourable_label: Any = 0,
    max_demographic_parity_difference: float = DEFAULT_MAX_DPD,
    max_equalized_odds_difference: float = DEFAULT_MAX_EOD,
    min_disparate_impact_ratio: float = DEFAULT_MIN_DIR,
    min_group_size: int = DEFAULT_MIN_GROUP_SIZE,
) -> FairnessResult:
    """Judge binary decisions ``y_pred`` against outcomes ``y_true`` for each column of ``sensitive``.

    ``y_pred`` are decisions, already thresholded (see :func:`apply_decision_threshold`); both
    arrays hold the same two labels, one of which is ``favourable_label``. Rows align by position.
    """
    for name, v in (("max_demographic_parity_difference", max_demographic_parity_difference),
                    ("max_equalized_odds_difference", max_equalized_odds_difference),
                    ("min_disparate_impact_ratio", min_disparate_impact_ratio)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {v}")
    if int(min_group_size) < 1:
        raise ValueError(f"min_group_size must be at least 1, got {min_group_size}")
    if isinstance(sensitive, pd.Series):
        sensitive = sensitive.to_frame()
    if not isinstance(sensitive, pd.DataFrame):
        raise TypeError(f"sensitive must be a pandas DataFrame (one column per protected attribute), "
                        f"got {type(sensitive).__name__}")
    if sensitive.shape[1] == 0:
        raise ValueError("sensitive has no columns: name at least one protected attribute")
    yt, yp = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    n = len(yt)
    if len(yp) != n or len(sensitive) != n:
        raise ValueError(f"lengths differ: y_true {n}, y_pred {len(yp)}, sensitive {len(sensitive)}")
    if n == 0:
        raise ValueError("no rows to evaluate")
    values = set(pd.unique(np.concatenate([yt, yp])).tolist())
    if len(values | {favourable_label}) > 2:
        raise ValueError(f"expected binary labels with favourable label {favourable_label!r}, "
                         f"got values {sorted(map(repr, values))}")
    yf = (yt == favourable_label).astype(int)
    pf = (yp == favourable_label).astype(int)

    limits = {
        "max_demographic_parity_difference": float(max_demographic_parity_difference),
        "max_equalized_odds_difference": float(max_equalized_odds_difference),
        "min_disparate_impact_ratio": float(min_disparate_impact_ratio),
        "min_group_size": int(min_group_size),
    }
    attributes = {str(col): _attribute(str(col), sensitive[col], yf, pf, limits) for col in sensitive.columns}
    passed = all(a.passed for a in attributes.values())
    notes = []
    if pf.sum() in (0, n):
        notes.append("every decision is the same: check the decision threshold")
    return FairnessResult(
        passed=passed,
        summary="; ".join(a.verdict() for a in attributes.values()),
        attributes=attributes,
        thresholds=limits,
        favourable_label=favourable_label,
        n_rows=n,
        notes=notes,
    )


def _attribute(name: str, column: pd.Series, yf: np.ndarray, pf: np.ndarray,
               limits: dict[str, float | int]) -> AttributeFairness:
    m = int(limits["min_group_size"])
    col = column.reset_index(drop=True)
    groups = col.astype(object).where(col.notna(), MISSING_GROUP).astype(str).to_numpy()
    sf = pd.Series(groups, name=name)

    mf = MetricFrame(
        metrics={"count": count, "favourable_rate": selection_rate, "accuracy": accuracy_score},
        y_true=yf, y_pred=pf, sensitive_features=sf,
    )
    by = mf.by_group
    fav_labels = pd.Series(yf).groupby(groups).sum()
    # conditional rates only where their denominator is non-empty (fairlearn would warn and say 0)
    has_pos = yf == 1
    has_neg = yf == 0
    tpr = (MetricFrame(metrics=true_positive_rate, y_true=yf[has_pos], y_pred=pf[has_pos],
                       sensitive_features=groups[has_pos]).by_group if has_pos.any() else pd.Series(dtype=float))
    fpr = (MetricFrame(metrics=false_positive_rate, y_true=yf[has_neg], y_pred=pf[has_neg],
                       sensitive_features=groups[has_neg]).by_group if has_neg.any() else pd.Series(dtype=float))

    rows: list[GroupStats] = []
    for g in by.index:
        g = str(g)
        cnt = int(by.loc[g, "count"])
        n_fav = int(fav_labels.get(g, 0))
        n_unfav = cnt - n_fav
        included = cnt >= m
        tpr_ok = included and n_fav >= m
        fpr_ok = included and n_unfav >= m
        rate = float(by.loc[g, "favourable_rate"])
        lo, hi = _wilson(int(round(rate * cnt)), cnt)
        if not included:
            note = f"excluded: {cnt} rows < min_group_size {m}"
        else:
            parts = []
            if not tpr_ok:
                parts.append(f"TPR not compared ({n_fav} favourable-label rows < {m})")
            if not fpr_ok:
                parts.append(f"FPR not compared ({n_unfav} unfavourable-label rows < {m})")
            note = "; ".join(parts) if parts else "included"
        rows.append(GroupStats(
            group=g, count=cnt, favourable_rate=rate, favourable_rate_ci_low=lo, favourable_rate_ci_high=hi,
            true_positive_rate=float(tpr[g]) if g in tpr.index else None,
            false_positive_rate=float(fpr[g]) if g in fpr.index else None,
            accuracy=float(by.loc[g, "accuracy"]), label_favourable=n_fav, label_unfavourable=n_unfav,
            included=included, tpr_compared=tpr_ok, fpr_compared=fpr_ok, note=note,
        ))

    eligible = [r.group for r in rows if r.included]
    violations: list[str] = []
    if len(eligible) < 2:
        violations.append(f"not assessable: {len(eligible)} group(s) with at least {m} rows "
                          f"({', '.join(f'{r.group}={r.count}' for r in rows)})")
        return AttributeFairness(name, False, False, None, None, None, None, None, rows, violations)

    mask = np.isin(groups, eligible)
    dpd = float(demographic_parity_difference(yf[mask], pf[mask], sensitive_features=groups[mask]))
    if pf[mask].sum() == 0:
        dir_ = 1.0  # nobody is approved in any group: equal (and a note on the result says so)
    else:
        dir_ = float(demographic_parity_ratio(yf[mask], pf[mask], sensitive_features=groups[mask]))
    tpr_vals = [r.true_positive_rate for r in rows if r.tpr_compared]
    fpr_vals = [r.false_positive_rate for r in rows if r.fpr_compared]
    tpr_diff = float(max(tpr_vals) - min(tpr_vals)) if len(tpr_vals) >= 2 else None
    fpr_diff = float(max(fpr_vals) - min(fpr_vals)) if len(fpr_vals) >= 2 else None
    parts = [d for d in (tpr_diff, fpr_diff) if d is not None]
    eod = max(parts) if parts else None

    max_dpd, max_eod, min_dir = (limits["max_demographic_parity_difference"],
                                 limits["max_equalized_odds_difference"], limits["min_disparate_impact_ratio"])
    if dpd > max_dpd:
        violations.append(f"DPD {dpd:.3f} > {max_dpd:.3f}")
    if eod is None:
        violations.append(f"EOD not assessable: fewer than 2 groups with {m} rows of either label")
    elif eod > max_eod:
        violations.append(f"EOD {eod:.3f} > {max_eod:.3f}")
    if dir_ < min_dir:
        violations.append(f"DIR {dir_:.3f} < {min_dir:.3f}")
    return AttributeFairness(
        attribute=name, passed=not violations, assessable=True,
        demographic_parity_difference=dpd, equalized_odds_difference=eod, disparate_impact_ratio=dir_,
        tpr_difference=tpr_diff, fpr_difference=fpr_diff, groups=rows, violations=violations,
    )


def _labels(y: Any, name: str) -> np.ndarray:
    a = np.asarray(y.to_numpy() if isinstance(y, (pd.Series, pd.DataFrame)) else y)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if pd.isna(a).any():
        raise ValueError(f"{name} contains missing values")
    return a


def _wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (shows how little a small group's rate says)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def _f(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _md(s: str) -> str:
    return str(s).replace("|", "\\|")


def _jsonable(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
