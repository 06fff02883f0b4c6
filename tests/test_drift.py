"""The pure drift evaluator against Evidently 0.7, on the example credit world."""

from __future__ import annotations

import pandas as pd
import pytest

from assets.credit.data import generate_credit_applications
from platform_defs.governance.drift import DriftResult, evaluate_drift

NUMERIC = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
           "num_open_accounts", "delinquencies_2y"]
CATEGORICAL = ["employment_type", "home_ownership", "purpose"]
FEATURES = NUMERIC + CATEGORICAL


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate_credit_applications(1000, shift=0.0, seed=42)


@pytest.fixture(scope="module")
def undrifted() -> pd.DataFrame:
    return generate_credit_applications(1000, shift=0.0, seed=43)


@pytest.fixture(scope="module")
def drifted() -> pd.DataFrame:
    return generate_credit_applications(800, shift=0.8, seed=43)


@pytest.fixture(scope="module")
def ks_undrifted(reference, undrifted) -> DriftResult:
    return evaluate_drift(reference, undrifted, columns=FEATURES)


@pytest.fixture(scope="module")
def ks_drifted(reference, drifted) -> DriftResult:
    return evaluate_drift(reference, drifted, columns=FEATURES)


def test_same_population_is_not_dataset_drift(ks_undrifted):
    r = ks_undrifted
    assert r.dataset_drift is False
    assert r.drifted_count <= 2, r.to_markdown()
    assert r.drifted_share == pytest.approx(r.drifted_count / len(FEATURES))
    assert not r.column("annual_income").drifted and not r.column("debt_to_income").drifted


def test_shifted_population_is_dataset_drift(ks_drifted):
    r = ks_drifted
    assert r.dataset_drift is True
    assert r.drifted_share >= 0.5
    for col in ("annual_income", "debt_to_income"):
        c = r.column(col)
        assert c.drifted and c.value_kind == "p_value" and c.value < c.threshold
    assert set(r.drifted_columns) >= {"annual_income", "debt_to_income"}
    assert (r.reference_rows, r.current_rows) == (1000, 800)


def test_types_from_dtype_and_explicit_methods_recorded(ks_drifted):
    r = ks_drifted
    assert [c.column for c in r.columns] == FEATURES
    for c in r.columns:
        expected = ("numeric", "ks", 0.05) if c.column in NUMERIC else ("categorical", "chisquare", 0.05)
        assert (c.type, c.method, c.threshold) == expected
        assert c.value_kind == "p_value" and 0.0 <= c.value <= 1.0


def test_custom_methods_and_thresholds_are_what_evidently_ran(reference, drifted):
    # 1000 reference rows is exactly where Evidently's own default would change: ours must not
    r = evaluate_drift(reference, drifted, columns=["annual_income", "purpose"], numeric_threshold=0.01,
                       categorical_method="jensenshannon", categorical_threshold=0.2, drift_share=0.9)
    inc, pur = r.column("annual_income"), r.column("purpose")
    assert (inc.method, inc.threshold, inc.value_kind) == ("ks", 0.01, "p_value")
    assert (pur.method, pur.threshold, pur.value_kind) == ("jensenshannon", 0.2, "distance")
    assert r.drift_share == 0.9
    assert r.method_by_type == {"numeric": ("ks", 0.01), "categorical": ("jensenshannon", 0.2)}


def test_wasserstein_is_a_distance_drift_when_above(reference, undrifted, drifted):
    cols = ["annual_income", "debt_to_income"]
    calm = evaluate_drift(reference, undrifted, columns=cols, numeric_method="wasserstein", numeric_threshold=0.1)
    moved = evaluate_drift(reference, drifted, columns=cols, numeric_method="wasserstein", numeric_threshold=0.1)
    for col in cols:
        c, m = calm.column(col), moved.column(col)
        assert c.value_kind == m.value_kind == "distance"
        assert (c.method, c.threshold) == ("wasserstein", 0.1)
        # a small distance below the threshold is NOT drift (the p-value reading would call it drift)
        assert c.value < 0.1 and not c.drifted
        assert m.value > 0.1 and m.drifted
        assert m.value > c.value
    assert calm.dataset_drift is False and moved.dataset_drift is True


def test_drift_share_decides_dataset_drift(reference, drifted):
    cols = ["annual_income", "loan_term_months"]  # income moves, term mix does not
    r_half = evaluate_drift(reference, drifted, columns=cols, drift_share=0.5)
    r_all = evaluate_drift(reference, drifted, columns=cols, drift_share=1.0)
    assert r_half.drifted_columns == ["annual_income"]
    assert r_half.drifted_share == 0.5 and r_half.dataset_drift is True
    assert r_all.drifted_share == 0.5 and r_all.dataset_drift is False


def test_summary_and_markdown(ks_drifted):
    r = ks_drifted
    s = r.summary
    assert "\n" not in s
    assert f"{r.drifted_count}/10 columns drifted" in s and "reference 1000 rows, current 800 rows" in s
    assert "DRIFT" in s and "numeric=ks@0.05" in s and "categorical=chisquare@0.05" in s
    md = r.to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| column")]
    assert len(rows) == len(FEATURES)
    inc = next(line for line in rows if line.startswith("| annual_income |"))
    assert "| numeric | ks | 0.05 |" in inc and inc.rstrip().endswith("| yes |")


def test_html_report_written(tmp_path, reference, drifted):
    out = tmp_path / "reports" / "drift.html"
    r = evaluate_drift(reference, drifted, columns=["annual_income", "purpose"], report_html=out)
    assert r.report_html == out
    assert out.is_file() and out.stat().st_size > 1000
    assert "<html" in out.read_text(encoding="utf-8", errors="replace")[:5000].lower()


def test_missing_column_in_current_is_named(reference, drifted):
    with pytest.raises(ValueError, match="current data is missing column.*debt_to_income"):
        evaluate_drift(reference, drifted.drop(columns=["debt_to_income"]), columns=FEATURES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"numeric_method": "chisquare"}, "does not apply to numeric"),
        ({"categorical_method": "nope"}, "unsupported categorical drift method"),
        ({"numeric_threshold": 0.0}, "threshold must be a positive number"),
        ({"drift_share": 0.0}, "drift_share"),
        ({"columns": []}, "at least one column"),
    ],
)
def test_bad_arguments_rejected(reference, undrifted, kwargs, message):
    args = {"columns": FEATURES, **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate_drift(reference, undrifted, **args)


def test_type_mismatch_between_windows_rejected(reference, undrifted):
    cur = undrifted.assign(annual_income=undrifted["annual_income"].astype(str))
    with pytest.raises(ValueError, match="annual_income.*numeric in reference but categorical in current"):
        evaluate_drift(reference, cur, columns=["annual_income"])
