"""The pure drift evaluator against Evidently 0.7, on the example credit world."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import platform_defs.governance.drift as drift_mod
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


# ---------------------------------------------------------------------------------------------
# the fast engine: Evidently's own stat tests on the full columns, without the report machinery


def assert_same_verdicts(fast: DriftResult, full: DriftResult) -> None:
    assert (fast.engine, full.engine) == ("fast", "evidently")
    assert [c.column for c in fast.columns] == [c.column for c in full.columns]
    for f, e in zip(fast.columns, full.columns):
        assert (f.method, f.threshold, f.value_kind, f.type) == (e.method, e.threshold, e.value_kind, e.type)
        assert f.drifted == e.drifted, (f, e)
        assert math.isclose(f.value, e.value, rel_tol=1e-12), (f, e)
    assert (fast.drifted_count, fast.dataset_drift) == (full.drifted_count, full.dataset_drift)


def test_fast_agrees_with_evidently_ks_chisquare(reference, undrifted, drifted, ks_undrifted, ks_drifted):
    calm = evaluate_drift(reference, undrifted, columns=FEATURES, engine="fast")
    moved = evaluate_drift(reference, drifted, columns=FEATURES, engine="fast")
    assert_same_verdicts(calm, ks_undrifted)
    assert_same_verdicts(moved, ks_drifted)
    assert calm.dataset_drift is False and moved.dataset_drift is True


@pytest.mark.parametrize("numeric_method, categorical_method, threshold", [
    ("wasserstein", "jensenshannon", 0.1),
    ("psi", "psi", 0.1),
])
def test_fast_agrees_with_evidently_distances(reference, undrifted, drifted, numeric_method, categorical_method,
                                              threshold):
    args = {"columns": FEATURES, "numeric_method": numeric_method, "numeric_threshold": threshold,
            "categorical_method": categorical_method, "categorical_threshold": threshold}
    for cur in (undrifted, drifted):
        fast = evaluate_drift(reference, cur, engine="fast", **args)
        full = evaluate_drift(reference, cur, engine="evidently", **args)
        assert_same_verdicts(fast, full)
        assert all(c.value_kind == "distance" for c in fast.columns)
    assert evaluate_drift(reference, drifted, engine="fast", **args).drifted_count > \
        evaluate_drift(reference, undrifted, engine="fast", **args).drifted_count


def test_fast_cleans_like_evidently(reference, undrifted):
    cur = undrifted.copy()
    cur.loc[cur.index[:40], "annual_income"] = np.inf
    cur.loc[cur.index[40:60], "annual_income"] = np.nan
    cur.loc[cur.index[:30], "purpose"] = None
    ref = reference.copy()
    ref.loc[ref.index[:25], "debt_to_income"] = -np.inf
    cols = ["annual_income", "debt_to_income", "purpose"]
    assert_same_verdicts(evaluate_drift(ref, cur, columns=cols, engine="fast"),
                         evaluate_drift(ref, cur, columns=cols, engine="evidently"))
    empty = cur.assign(annual_income=np.nan)
    with pytest.raises(ValueError, match="empty column 'annual_income'.*current dataset"):
        evaluate_drift(ref, empty, columns=cols, engine="fast")


def test_fast_report_on_a_sample_says_so(tmp_path, reference, drifted, ks_drifted):
    out = tmp_path / "reports" / "drift.html"
    r = evaluate_drift(reference, drifted, columns=FEATURES, engine="fast", report_html=out, report_sample_rows=300)
    assert_same_verdicts(r, ks_drifted)  # the verdict is from all 800 rows, not the sample
    assert r.report_html == tmp_path / "reports" / "drift.sample-300-of-800.html"
    assert not out.exists() and r.report_html.is_file()
    assert (r.report_sampled_rows, r.report_sampled_reference_rows) == (300, 300)
    page = r.report_html.read_text(encoding="utf-8")
    assert "onepath-sample-note" in page and "sample of 300 of 800 current rows" in page
    assert "HTML report on a uniform sample of 300 of 800 current rows" in r.summary
    assert r.as_dict()["report_sampled_rows"] == 300


def test_fast_report_without_sampling_is_the_full_report(tmp_path, reference, drifted):
    out = tmp_path / "drift.html"
    r = evaluate_drift(reference, drifted, columns=["annual_income", "purpose"], engine="fast", report_html=out)
    assert r.report_html == out and out.is_file() and r.report_sampled_rows is None
    assert "onepath-sample-note" not in out.read_text(encoding="utf-8")


def test_auto_engine_by_window_size_and_method(reference, undrifted, monkeypatch):
    cols = ["annual_income", "purpose"]
    assert evaluate_drift(reference, undrifted, columns=cols).engine == "evidently"
    monkeypatch.setattr(drift_mod, "AUTO_FAST_ROWS", 1000)
    assert evaluate_drift(reference, undrifted, columns=cols).engine == "fast"
    # a method without a fast engine stays with Evidently however large the window; engine="fast" refuses it
    assert drift_mod._choose_engine("auto", 10**6, {"numeric": ("ks", 0.05), "categorical": ("TVD", 0.05)}) == "evidently"
    assert drift_mod._choose_engine("auto", 10**6, {"numeric": ("empirical_mmd", 0.05)}) == "evidently"
    assert drift_mod._choose_engine("auto", 10**6, {"numeric": ("ks", 0.05), "categorical": ("z", 0.05)}) == "fast"
    with pytest.raises(ValueError, match="'TVD' has no fast engine"):
        evaluate_drift(reference, undrifted, columns=cols, categorical_method="TVD", engine="fast")
    with pytest.raises(ValueError, match="engine must be"):
        evaluate_drift(reference, undrifted, columns=cols, engine="quick")


def test_inputs_beyond_what_a_model_takes_are_left_out_of_the_window_and_counted(reference, undrifted):
    """Evidently cannot bin a column spanning +-1e308 (two such rows crashed churn's input_drift check);
    the server refuses them now, and a window read from an older log leaves them out, counted."""
    from platform_defs.drift_check import FLOAT32_MAX, within_model_range

    window = undrifted.copy()
    window.loc[0, "annual_income"], window.loc[1, "loan_amount"] = 1e308, -math.inf
    window.loc[2, "debt_to_income"] = np.nan  # a missing value is not out of range
    window.loc[3, "annual_income"] = FLOAT32_MAX
    kept, dropped = within_model_range(window, FEATURES)
    assert dropped == 2 and len(kept) == len(window) - 2
    with pytest.raises(ValueError):  # what the check ran into before
        evaluate_drift(reference, window, columns=FEATURES, numeric_method="psi", numeric_threshold=0.1)
    result = evaluate_drift(reference, kept, columns=FEATURES, numeric_method="psi", numeric_threshold=0.1)
    assert result.columns and not math.isnan(result.drifted_share)
