"""``onepath.predict`` (the data scientist's step 3 from a notebook) refuses in one line what it cannot call; the
call itself runs against a real prod endpoint in tests/test_declarations_live.py (the data scientist's guide)."""

from __future__ import annotations

import pytest

import onepath


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONEPATH_HOME", str(tmp_path / "home"))
    for var in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def test_a_model_nothing_serves_is_one_line(home):
    with pytest.raises(onepath.NotebookError, match="^no endpoint serves 'fraud': register it first"):
        onepath.predict("fraud", [{"amount": 1.0}])


def test_an_endpoint_not_deployed_says_to_promote_it(home):
    # churn is declared (the example organisation) and served by churn_scoring, which nothing deployed here
    with pytest.raises(onepath.NotebookError,
                       match=r"^churn_scoring\.prod does not answer: promote it first \(onepath promote churn --to prod\)"):
        onepath.predict("churn", [{"tenure_months": 3.0}])
