"""The governance evaluators on real data and with the real tools: fairness (fairlearn) on the credit
model trained on the unbiased and the biased world, explainability (permutation importance) on the
credit pipeline, and the security scan (bandit, detect-secrets) on the real loan_portal app and on
copies of it with planted problems. No mocks, no skips."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, demographic_parity_ratio, equalized_odds_difference
from sklearn.dummy import DummyClassifier
from sklearn.model_selection import train_test_split

from assets.credit.data import generate_credit_applications
from assets.credit.trainer import train_credit_risk
from platform_defs.governance.explainability import JSON_NAME, PNG_NAME, explain
from platform_defs.governance.fairness import (
    DEFAULT_DECISION_THRESHOLD,
    DEFAULT_MAX_DPD,
    DEFAULT_MAX_EOD,
    DEFAULT_MIN_DIR,
    DEFAULT_MIN_GROUP_SIZE,
    apply_decision_threshold,
    evaluate_fairness,
)
from platform_defs.governance.security_scan import scan_source
from platform_defs.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "loan_portal"
FEATURES = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
            "num_open_accounts", "delinquencies_2y", "employment_type", "home_ownership", "purpose"]
PROTECTED = ["gender", "age_band"]
MARGIN = 0.01  # every deciding number is at least this far from its limit


# ---------------------------------------------------------------------------------------------
# fairness
#
# The credit fixtures model the ml-high-risk policy (assets/policy.yaml): its limits, its decision
# threshold and its min_group_size 60, under which the X gender group (~3 % of applicants, 31 of
# the 1500 test rows here) is listed but not compared. Measured values for this split (seed 42,
# random_state 7) are in the comment above DEFAULT_MAX_DPD in platform_defs/governance/fairness.py.


def policy_fairness():
    return load_policy(ROOT / "assets" / "policy.yaml").track("ml-high-risk").fairness


class Credit:
    def __init__(self, biased: bool):
        pol = policy_fairness()
        df = generate_credit_applications(rows=6000, biased=biased)
        train, test = train_test_split(df, test_size=0.25, random_state=7, stratify=df["defaulted"])
        self.model = train_credit_risk(train[FEATURES], train["defaulted"], {})
        self.test = test.reset_index(drop=True)
        self.p_default = self.model.predict_proba(self.test[FEATURES])[:, 1]
        self.y_pred = apply_decision_threshold(self.p_default, pol.decision_threshold)
        self.result = evaluate_fairness(
            self.test["defaulted"], self.y_pred, self.test[PROTECTED],
            max_demographic_parity_difference=pol.max_demographic_parity_difference,
            max_equalized_odds_difference=pol.max_equalized_odds_difference,
            min_disparate_impact_ratio=pol.min_disparate_impact_ratio,
            min_group_size=pol.min_group_size,
        )


@pytest.fixture(scope="module")
def unbiased() -> Credit:
    return Credit(biased=False)


@pytest.fixture(scope="module")
def biased() -> Credit:
    return Credit(biased=True)


def test_module_defaults_are_the_high_risk_policy():
    pol = policy_fairness()
    assert (DEFAULT_MAX_DPD, DEFAULT_MAX_EOD, DEFAULT_MIN_DIR, DEFAULT_DECISION_THRESHOLD, DEFAULT_MIN_GROUP_SIZE) == (
        pol.max_demographic_parity_difference, pol.max_equalized_odds_difference, pol.min_disparate_impact_ratio,
        pol.decision_threshold, pol.min_group_size) == (0.15, 0.20, 0.80, 0.2, 60)


def test_decision_threshold_is_what_makes_disparity_visible(unbiased: Credit, biased: Credit):
    # measured: unbiased approves 0.958 at 0.5 and 0.771 at 0.2; biased 0.845 and 0.465
    assert np.array_equal(unbiased.y_pred, (unbiased.p_default >= DEFAULT_DECISION_THRESHOLD).astype(int))
    for c, more in ((unbiased, 0.15), (biased, 0.3)):
        approved_at_half = float(np.mean(c.p_default < 0.5))
        approved_at_default = float(np.mean(c.y_pred == 0))
        assert approved_at_half > approved_at_default + more
    assert float(np.mean(unbiased.y_pred == 0)) > float(np.mean(biased.y_pred == 0)) + 0.2
    # at 0.5 the biased model passes on gender (DPD 0.078, DIR 0.912); at 0.2 it fails (see below)
    t = biased.test
    at_half = evaluate_fairness(t["defaulted"], apply_decision_threshold(biased.p_default, 0.5), t[["gender"]])
    g = at_half["gender"]
    assert g.passed, at_half.summary
    assert g.disparate_impact_ratio >= DEFAULT_MIN_DIR + MARGIN
    assert g.demographic_parity_difference <= DEFAULT_MAX_DPD - MARGIN
    assert not biased.result["gender"].passed


def test_unbiased_model_passes_on_gender_and_age_band_with_margin(unbiased: Credit):
    r = unbiased.result
    assert r.passed, r.summary
    for attr in PROTECTED:
        a = r[attr]
        assert a.passed and a.assessable and a.violations == [], attr
        assert a.demographic_parity_difference <= DEFAULT_MAX_DPD - MARGIN, attr
        assert a.equalized_odds_difference <= DEFAULT_MAX_EOD - MARGIN, attr
        assert a.disparate_impact_ratio >= DEFAULT_MIN_DIR + MARGIN, attr
    g, a = r["gender"], r["age_band"]
    assert r.summary == (
        f"gender: ok (DPD {g.demographic_parity_difference:.3f}, EOD {g.equalized_odds_difference:.3f}, "
        f"DIR {g.disparate_impact_ratio:.3f}) [excluded, too small: X]; "
        f"age_band: ok (DPD {a.demographic_parity_difference:.3f}, EOD {a.equalized_odds_difference:.3f}, "
        f"DIR {a.disparate_impact_ratio:.3f})")


def test_biased_model_fails_on_gender_with_the_numbers_in_the_summary(biased: Credit):
    r = biased.result
    g = r["gender"]
    assert g.assessable and not g.passed and not r.passed
    assert g.disparate_impact_ratio <= DEFAULT_MIN_DIR - MARGIN
    dir_ = f"DIR {g.disparate_impact_ratio:.3f} < {DEFAULT_MIN_DIR:.3f}"
    # On this split only the four-fifths rule fires: DPD 0.136 stays under 0.15 (over 50 splits
    # the DIR fires every time, the DPD in 41). The EOD does not separate the models (see fairness.py).
    assert g.demographic_parity_difference < DEFAULT_MAX_DPD
    assert g.violations == [dir_]
    assert r.summary.startswith(f"gender: {dir_} [excluded, too small: X]; age_band: ")
    assert "\n" not in r.summary


def test_biased_world_moves_approvals_of_women_below_men(unbiased: Credit, biased: Credit):
    """With X excluded the gender DPD is the F vs M gap itself: ~0 unbiased, >0.1 biased."""
    def gap(c: Credit) -> float:
        g = c.result["gender"]
        rates = {x.group: x.favourable_rate for x in g.groups}
        assert g.demographic_parity_difference == pytest.approx(abs(rates["M"] - rates["F"]))
        return rates["M"] - rates["F"]

    assert abs(gap(unbiased)) < 0.05  # measured -0.020 (women approved slightly more often)
    assert gap(biased) > 0.10  # measured 0.136: 0.393 of women approved, 0.529 of men


def test_age_bands_are_evaluated_assessable_and_pass_for_the_unbiased_model(unbiased: Credit):
    """Credit history length (which tracks age) no longer drives default, so approvals by age band
    stay within the limits; the remaining spread (0.725 for 18-25 to 0.847 for 65+) is the
    legitimate features' (home ownership, income) and sampling noise."""
    a = unbiased.result["age_band"]
    assert a.assessable and a.passed and a.violations == []
    assert [x.group for x in a.groups] == ["18-25", "26-35", "36-50", "51-65", "65+"]
    assert all(x.included for x in a.groups)  # every band has at least min_group_size rows
    rates = [x.favourable_rate for x in a.groups]
    assert a.demographic_parity_difference == pytest.approx(max(rates) - min(rates))
    assert a.disparate_impact_ratio == pytest.approx(min(rates) / max(rates))
    # few defaulters in the young and old bands: their FPR is listed, not compared
    fpr_compared = [x.group for x in a.groups if x.fpr_compared]
    assert len(fpr_compared) >= 2 and len(fpr_compared) < len(a.groups)
    fprs = [x.false_positive_rate for x in a.groups if x.fpr_compared]
    assert a.fpr_difference == pytest.approx(max(fprs) - min(fprs))
    assert f"age_band: ok (DPD {a.demographic_parity_difference:.3f}" in unbiased.result.summary


def test_per_group_table_matches_a_direct_count(unbiased: Credit):
    t, y_pred = unbiased.test, unbiased.y_pred
    m = unbiased.result.thresholds["min_group_size"]
    assert m == 60
    assert unbiased.result.n_rows == len(t)
    for attr in PROTECTED:
        a = unbiased.result[attr]
        assert [x.group for x in a.groups] == sorted(t[attr].unique())
        assert sum(x.count for x in a.groups) == len(t)
        for row in a.groups:
            mask = (t[attr] == row.group).to_numpy()
            approved = y_pred[mask] == 0
            repaid = t["defaulted"].to_numpy()[mask] == 0
            assert row.count == mask.sum()
            assert row.label_favourable == repaid.sum() and row.label_unfavourable == (~repaid).sum()
            assert row.favourable_rate == pytest.approx(approved.mean())
            assert row.true_positive_rate == pytest.approx(approved[repaid].mean())
            assert row.false_positive_rate == pytest.approx(approved[~repaid].mean())
            assert row.accuracy == pytest.approx(np.mean(y_pred[mask] == t["defaulted"].to_numpy()[mask]))
            assert row.favourable_rate_ci_low < row.favourable_rate < row.favourable_rate_ci_high
            assert row.included == (row.count >= m)
            assert row.tpr_compared == (row.included and row.label_favourable >= m)
            assert row.fpr_compared == (row.included and row.label_unfavourable >= m)
    g = unbiased.result["gender"]
    assert [x.group for x in g.groups] == ["F", "M", "X"]
    n_x = int((t["gender"] == "X").sum())
    assert 0 < n_x < m  # ~3 % of 1500 rows
    x = next(r for r in g.groups if r.group == "X")
    assert x.count == n_x and not x.included and not x.tpr_compared and not x.fpr_compared
    assert x.note == f"excluded: {n_x} rows < min_group_size {m}"
    assert all(r.note == "included" for r in g.groups if r.group != "X")
    assert g.fpr_difference == pytest.approx(abs(g.groups[0].false_positive_rate - g.groups[1].false_positive_rate))
    assert g.tpr_difference == pytest.approx(abs(g.groups[0].true_positive_rate - g.groups[1].true_positive_rate))
    records = g.records()
    assert records[0]["group"] == "F" and set(records[0]) >= {"group", "count", "favourable_rate",
                                                              "true_positive_rate", "false_positive_rate",
                                                              "accuracy", "included", "note"}
    md = unbiased.result.to_markdown()
    assert md.startswith("**Fairness: PASSED** on 1500 rows")
    assert "### gender: pass" in md and "### age_band: pass" in md
    assert md.count("| group | rows | favourable rate (95% CI) | TPR | FPR | accuracy | note |") == 2
    assert f"| X | {n_x} | {x.favourable_rate:.3f} (" in md
    assert f"excluded: {n_x} rows < min_group_size 60 |" in md
    json.dumps(unbiased.result.to_dict())  # metadata-ready


def test_numbers_are_fairlearns_when_every_group_qualifies(biased: Credit):
    t = biased.test
    fm = t["gender"].isin(["F", "M"]).to_numpy()
    y, p = t["defaulted"].to_numpy()[fm], biased.y_pred[fm]
    r = evaluate_fairness(y, p, t.loc[fm, ["gender"]])["gender"]
    assert all(x.included and x.tpr_compared and x.fpr_compared for x in r.groups)
    yf, pf, s = (y == 0).astype(int), (p == 0).astype(int), t.loc[fm, "gender"]
    assert r.demographic_parity_difference == pytest.approx(demographic_parity_difference(yf, pf, sensitive_features=s))
    assert r.equalized_odds_difference == pytest.approx(equalized_odds_difference(yf, pf, sensitive_features=s))
    assert r.disparate_impact_ratio == pytest.approx(demographic_parity_ratio(yf, pf, sensitive_features=s))


def test_groups_under_min_group_size_are_listed_but_not_compared(unbiased: Credit):
    t = unbiased.test
    n_x = int((t["gender"] == "X").sum())
    r = evaluate_fairness(t["defaulted"], unbiased.y_pred, t[["gender"]])  # default min_group_size 60
    g = r["gender"]
    x = next(row for row in g.groups if row.group == "X")
    assert not x.included and x.note == f"excluded: {n_x} rows < min_group_size 60"
    assert g.excluded_groups == ["X"]
    rates = {row.group: row.favourable_rate for row in g.groups}
    assert g.demographic_parity_difference == pytest.approx(abs(rates["F"] - rates["M"]))
    assert g.disparate_impact_ratio == pytest.approx(min(rates["F"], rates["M"]) / max(rates["F"], rates["M"]))
    assert "[excluded, too small: X]" in r.summary
    assert f"excluded: {n_x} rows < min_group_size 60" in r.to_markdown()
    # at exactly its size the group is compared (the bar is "at least"); its approval rate counts,
    # but neither of its conditional rates: each label has fewer than min_group_size rows
    r2 = evaluate_fairness(t["defaulted"], unbiased.y_pred, t[["gender"]], min_group_size=n_x)
    g2 = r2["gender"]
    x2 = next(row for row in g2.groups if row.group == "X")
    assert x2.included and g2.excluded_groups == [] and "[excluded" not in r2.summary
    assert 0 < x2.label_unfavourable < n_x and not x2.tpr_compared and not x2.fpr_compared
    assert x2.note == (f"TPR not compared ({x2.label_favourable} favourable-label rows < {n_x}); "
                       f"FPR not compared ({x2.label_unfavourable} unfavourable-label rows < {n_x})")
    assert g2.demographic_parity_difference == pytest.approx(max(rates.values()) - min(rates.values()))


def test_a_tiny_extreme_group_does_not_decide_the_verdict():
    # 100 A and 100 B approved alike; 5 C all declined (and all repaid): listed, not compared
    groups = ["A"] * 100 + ["B"] * 100 + ["C"] * 5
    y_true = ([0] * 80 + [1] * 20) * 2 + [0] * 5
    y_pred = ([0] * 70 + [1] * 10 + [0] * 5 + [1] * 15) * 2 + [1] * 5
    r = evaluate_fairness(y_true, y_pred, pd.DataFrame({"region": groups}), min_group_size=10)
    g = r["region"]
    assert r.passed, r.summary
    assert g.demographic_parity_difference == 0.0 and g.disparate_impact_ratio == 1.0
    c = next(row for row in g.groups if row.group == "C")
    assert c.favourable_rate == 0.0 and not c.included
    assert c.note == "excluded: 5 rows < min_group_size 10"
    # the same group, big enough, fails the four-fifths rule
    r2 = evaluate_fairness(y_true, y_pred, pd.DataFrame({"region": groups}), min_group_size=5)
    assert not r2.passed and "DIR 0.000 < 0.800" in r2.summary


def test_an_attribute_with_one_comparable_group_fails_as_not_assessable():
    groups = ["A"] * 100 + ["B"] * 10
    y = [0, 1] * 55
    r = evaluate_fairness(y, y, pd.DataFrame({"region": groups}))
    assert not r.passed and not r["region"].assessable
    assert r.summary.startswith("region: not assessable: 1 group(s) with at least 60 rows (A=100, B=10)")


def test_bad_inputs_are_refused():
    df = pd.DataFrame({"g": ["a", "b", "a"]})
    with pytest.raises(ValueError, match="lengths differ"):
        evaluate_fairness([0, 1, 0], [0, 1], df)
    with pytest.raises(ValueError, match="binary labels"):
        evaluate_fairness([0, 1, 2], [0, 1, 0], df)
    with pytest.raises(TypeError, match="DataFrame"):
        evaluate_fairness([0, 1, 0], [0, 1, 0], ["a", "b", "a"])
    with pytest.raises(ValueError, match="threshold"):
        apply_decision_threshold([0.1], 1.0)


# ---------------------------------------------------------------------------------------------
# explainability


def test_explain_credit_model_writes_png_and_json_and_ranks_debt_first(unbiased: Credit, tmp_path: Path):
    import matplotlib

    backend = matplotlib.get_backend()
    X, y = unbiased.test[FEATURES], unbiased.test["defaulted"]
    r = explain(unbiased.model, X, y, out_dir=tmp_path / "explain")
    assert r.passed, r.summary
    assert r.png_path == tmp_path / "explain" / PNG_NAME and r.json_path == tmp_path / "explain" / JSON_NAME
    assert r.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(r.json_path.read_text())
    assert [f["feature"] for f in report["features"]] == [f.feature for f in r.features]
    assert sorted(f.feature for f in r.features) == sorted(FEATURES)  # the pipeline's input columns
    assert report["n_rows_used"] == r.n_rows_used == r.n_rows_total == 1500
    assert report["scoring"] == "roc_auc" and report["n_repeats"] == 5
    assert all(len(f["importances"]) == 5 for f in report["features"])
    means = [f.importance_mean for f in r.features]
    assert means == sorted(means, reverse=True)
    # measured: debt_to_income 0.150, delinquencies_2y 0.053, employment_type 0.053 (those two swap
    # between seeds), then loan_amount 0.012; credit_history_years 0.0002 (no longer a driver)
    assert r.top_features[0] == "debt_to_income"
    assert set(r.top_features[:3]) == {"debt_to_income", "delinquencies_2y", "employment_type"}
    imp = {f.feature: f.importance_mean for f in r.features}
    assert imp["debt_to_income"] > 2 * max(imp["delinquencies_2y"], imp["employment_type"])
    assert min(imp["delinquencies_2y"], imp["employment_type"]) > 2 * r.features[3].importance_mean
    assert abs(imp["credit_history_years"]) < 0.005
    assert r.summary.startswith(f"top roc_auc drop: debt_to_income {r.features[0].importance_mean:.3f}")
    assert "1500 rows, 5 repeats" in r.summary
    assert 0.7 < r.baseline_score < 0.95
    assert matplotlib.get_backend() == backend  # no global backend switch
    assert r.records()[0]["feature"] == "debt_to_income"
    json.dumps(r.to_dict())


def test_a_model_that_ignores_its_inputs_is_not_explainable(unbiased: Credit, tmp_path: Path):
    X, y = unbiased.test[FEATURES], unbiased.test["defaulted"]
    dummy = DummyClassifier(strategy="prior").fit(X, y)
    r = explain(dummy, X, y, out_dir=tmp_path)
    assert not r.passed
    assert r.summary.startswith("no feature has positive importance")
    assert all(f.importance_mean == 0.0 for f in r.features) and r.top_features == []
    assert r.png_path.is_file() and r.json_path.is_file()  # the evidence is still written


def test_explain_subsamples_with_a_fixed_seed_and_says_so(unbiased: Credit, tmp_path: Path):
    X, y = unbiased.test[FEATURES], unbiased.test["defaulted"]
    a = explain(unbiased.model, X, y, out_dir=tmp_path / "a", max_rows=600, n_repeats=3)
    b = explain(unbiased.model, X, y, out_dir=tmp_path / "b", max_rows=600, n_repeats=3)
    assert a.n_rows_used == 600 and a.n_rows_total == 1500
    assert "600 of 1500 rows (sampled, seed 0), 3 repeats" in a.summary
    assert json.loads(a.json_path.read_text())["n_rows_used"] == 600
    assert [f.importance_mean for f in a.features] == [f.importance_mean for f in b.features]


# ---------------------------------------------------------------------------------------------
# security scan

# Built from pieces so that this test file does not itself carry a secret for a scanner to find.
AWS_KEY_LINE = 'AWS_ACCESS_KEY_ID = "' + "AKIA" + 'IOSFODNN7EXAMPLE"'
KEYWORD_LINE = "pass" + "word = " + '"hunter2-' + 'very-secret"'
PRIVATE_KEY = "-----BEGIN RSA " + "PRIVATE KEY-----\n" + "QUJD" * 16 + "\n-----END RSA " + "PRIVATE KEY-----\n"


@pytest.fixture
def app_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "loan_portal"
    shutil.copytree(APP, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _append(path: Path, text: str) -> int:
    """Append ``text`` (one line) to ``path``; return its 1-based line number."""
    before = path.read_text()
    if before and not before.endswith("\n"):
        before += "\n"
    path.write_text(before + text + "\n")
    return before.count("\n") + 1


def test_the_real_app_passes():
    r = scan_source(APP)
    assert r.passed, r.summary
    assert r.blocking == [] and r.errors == []
    assert "loan_portal/main.py" in r.files_scanned and r.python_files >= 2
    assert {t.tool for t in r.tools} == {"bandit", "detect-secrets"}
    assert all(t.error is None for t in r.tools)  # bandit exits 1 for the low-severity asserts in integration_tests/
    assert r.summary.startswith("clean: no bandit finding at high or above, no secrets;")


def test_shell_injection_fails_naming_file_and_line(app_copy: Path):
    jobs = app_copy / "loan_portal" / "jobs.py"
    jobs.write_text("import subprocess\n\n\ndef run(user_input):\n"
                    "    return subprocess.call(user_input, shell=True)\n")
    r = scan_source(app_copy)
    assert not r.passed
    [hit] = r.blocking
    assert (hit.tool, hit.file, hit.line, hit.severity, hit.rule) == ("bandit", "loan_portal/jobs.py", 5, "HIGH", "B602")
    assert "bandit B602 at loan_portal/jobs.py:5" in r.summary
    assert any(f.rule == "B404" and not f.blocking for f in r.findings)  # low: reported, not blocking


@pytest.mark.parametrize("where, content, secret_type", [
    ("loan_portal/main.py", AWS_KEY_LINE, "AWS Access Key"),
    ("loan_portal/main.py", KEYWORD_LINE, "Secret Keyword"),
    ("loan_portal/signing.pem", PRIVATE_KEY, "Private Key"),
    (".env", "AWS_ACCESS_KEY_ID=" + "AKIA" + "IOSFODNN7EXAMPLE", "AWS Access Key"),
], ids=["aws-key-in-code", "password-in-code", "private-key-file", "hidden-dotenv"])
def test_each_planted_secret_fails_naming_file_and_line(app_copy: Path, where: str, content: str, secret_type: str):
    target = app_copy / where
    if target.exists():
        line = _append(target, content)
    else:
        target.write_text(content if content.endswith("\n") else content + "\n")
        line = 1
    r = scan_source(app_copy)
    assert not r.passed
    hits = [f for f in r.blocking if f.tool == "detect-secrets"]
    assert (where, line, secret_type) in {(f.file, f.line, f.rule) for f in hits}, r.findings
    assert f"detect-secrets {secret_type} at {where}:{line}" in r.summary
    assert all(f.file == where for f in r.blocking)


def test_fail_on_sets_the_bandit_severity_bar(app_copy: Path):
    (app_copy / "loan_portal" / "tools.py").write_text(
        "import subprocess\n\n\ndef version():\n    return subprocess.run(['git', '--version'])\n")
    high = scan_source(app_copy, fail_on="high")
    low = scan_source(app_copy, fail_on="low")
    assert high.passed, high.summary
    assert "below the bar" in high.summary
    assert not low.passed
    assert {(f.file, f.rule) for f in low.blocking} >= {("loan_portal/tools.py", "B404")}
    with pytest.raises(ValueError, match="fail_on"):
        scan_source(app_copy, fail_on="critical")


def test_hidden_dirs_and_pycache_are_not_scanned_and_a_bandit_file_cannot_disable_it(app_copy: Path):
    for d in (".cache", "__pycache__", "loan_portal/.venv/lib"):
        (app_copy / d).mkdir(parents=True)
        (app_copy / d / "creds.py").write_text(AWS_KEY_LINE + "\nimport os\nos.system(input())\n")
    assert scan_source(app_copy).passed
    # the tree under review ships its own bandit config that skips the shell checks
    (app_copy / ".bandit").write_text("[bandit]\nskips: B602,B605\n")
    (app_copy / "loan_portal" / "jobs.py").write_text("import os\n\n\ndef run(cmd):\n    os.system(cmd)\n")
    r = scan_source(app_copy)
    assert not r.passed
    assert [(f.file, f.line, f.rule) for f in r.blocking] == [("loan_portal/jobs.py", 5, "B605")]
    assert not any(f.startswith((".cache/", "__pycache__/")) or "/.venv/" in f for f in r.files_scanned)
    assert ".bandit" in r.files_scanned  # hidden files are scanned (for secrets)


def test_nosec_is_honoured_and_counted(app_copy: Path):
    (app_copy / "loan_portal" / "jobs.py").write_text(
        "import subprocess  # nosec B404\n\n\ndef run(cmd):\n    return subprocess.call(cmd, shell=True)  # nosec B602\n")
    r = scan_source(app_copy)
    assert r.passed, r.summary
    assert r.suppressed["nosec"] == 2
    assert "2 suppressed by nosec" in r.summary


def test_a_file_bandit_cannot_parse_fails_the_scan(app_copy: Path):
    (app_copy / "loan_portal" / "broken.py").write_text("def broken(:\n    pass\n")
    r = scan_source(app_copy)
    assert not r.passed
    assert r.summary.startswith("bandit failed: could not scan loan_portal/broken.py: syntax error")


def test_a_tool_that_crashes_fails_the_scan_naming_it_and_its_stderr(app_copy: Path):
    # -S: no site-packages, so neither tool can be imported: a real crash, not a simulated one
    r = scan_source(app_copy, python=[sys.executable, "-S"])
    assert not r.passed
    assert r.summary.startswith("bandit failed: exited with 1 without a JSON report: ")
    assert "No module named bandit" in r.summary
    assert "detect-secrets failed: exited with 1: " in r.summary and "No module named detect_secrets" in r.summary
    assert len(r.errors) == 2


def test_a_missing_folder_fails(tmp_path: Path):
    r = scan_source(tmp_path / "nope")
    assert not r.passed and r.summary.startswith("cannot scan ") and "not a directory" in r.summary
