"""The loan portal's integration tests. The platform runs them against a release's staging
deployment (ONEPATH_APP_URL) before it may go to prod; they call the real scoring endpoint."""

import os

import httpx

URL = os.environ["ONEPATH_APP_URL"].rstrip("/")
RELEASE = os.environ["ONEPATH_RELEASE_VERSION"]

APPLICATION = {
    "full_name": "Integration Test", "national_id": "000-00-0000", "email": "it@example.com",
    "gender": "F", "age_band": "36-50", "annual_income": 64000, "loan_amount": 9000,
    "loan_term_months": 36, "debt_to_income": 0.22, "credit_history_years": 9,
    "num_open_accounts": 4, "delinquencies_2y": 0, "employment_type": "salaried",
    "home_ownership": "mortgage", "purpose": "car",
}


def test_serves_the_release_under_test():
    r = httpx.get(f"{URL}/version", timeout=5)
    assert r.status_code == 200 and r.json()["version"] == RELEASE


def test_form_renders():
    r = httpx.get(f"{URL}/", timeout=5)
    assert r.status_code == 200 and "annual_income" in r.text


def test_an_application_is_scored_end_to_end():
    r = httpx.post(f"{URL}/api/apply", json=APPLICATION, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["decision"] in ("approve", "refer", "decline")
    assert 0.0 <= body["probability_of_default"] <= 1.0 and body["model_version"]


def test_bad_input_is_refused_with_the_field_named():
    r = httpx.post(f"{URL}/api/apply", json={**APPLICATION, "annual_income": "lots"}, timeout=5)
    assert r.status_code == 422 and r.json()["field"] == "annual_income"
