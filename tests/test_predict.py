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


def _book(home):
    from resources.ledger import Ledger, ledger_paths

    home.mkdir(parents=True, exist_ok=True)
    return Ledger(*ledger_paths(home))


def test_no_recorded_policy_is_one_line(home):
    with pytest.raises(onepath.NotebookError, match=r"^onepath-cli may not call churn_scoring\.prod: no policy is "
                                                    r"recorded in the ledger[^\n]*$"):
        onepath.predict("churn", [{"tenure_months": 3.0}])


def test_a_policy_that_does_not_grant_onepath_cli_is_one_line(home, tmp_path):
    from tests.conftest import ROOT, record_policy

    text = (ROOT / "assets" / "policy.yaml").read_text()
    granted = "      routes: [predict, version, metrics]\n      endpoints: all\n"
    assert granted in text, "the example policy's onepath-cli grant moved: update this test"
    policy = tmp_path / "policy.yaml"
    policy.write_text(text.replace(granted, "      routes: [predict, version, metrics]\n"
                                            "      endpoints: [credit_scoring]\n"))
    record_policy(_book(home), path=policy)
    with pytest.raises(onepath.NotebookError, match=r"^onepath-cli may not call churn_scoring\.prod: the recorded "
                                                    r"policy \(ledger #1\) grants it no access there[^\n]*$"):
        onepath.predict("churn", [{"tenure_months": 3.0}])


def test_an_endpoint_not_deployed_says_to_promote_it(home):
    # churn is declared (the example organisation) and served by churn_scoring, which nothing deployed here; the
    # recorded policy grants onepath-cli every endpoint
    from tests.conftest import record_policy

    record_policy(_book(home))
    recorded = [(e.seq, e.kind) for e in _book(home).entries()]
    with pytest.raises(onepath.NotebookError,
                       match=r"^churn_scoring\.prod does not answer: promote it first \(onepath promote churn --to prod\)"):
        onepath.predict("churn", [{"tenure_months": 3.0}])
    # refused before a credential was issued: no grant in the ledger, no access table published, no token stored
    from platform_defs.access import access_for
    from platform_defs.settings import load_settings

    assert [(e.seq, e.kind) for e in _book(home).entries()] == recorded
    assert not access_for(load_settings()).caller_file("onepath-cli", "churn_scoring", "prod").exists()


def test_a_model_two_endpoints_serve_is_refused_naming_both(home, tmp_path, monkeypatch):
    import shutil

    from tests.conftest import ROOT

    decl = tmp_path / "assets"
    shutil.copytree(ROOT / "assets", decl, ignore=shutil.ignore_patterns("__pycache__"))
    with open(decl / "retention" / "defs.yaml", "a") as f:
        f.write("---\ntype: onepath.Endpoint\nattributes:\n  name: churn_shadow\n  owner: retention\n"
                "  track: ml-standard\n  model: churn\n")
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(decl))
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(decl / "policy.yaml"))
    with pytest.raises(onepath.NotebookError, match=r"^two endpoints serve 'churn' \(churn_scoring, churn_shadow\): "
                                                    r"name the one to call"):
        onepath.predict("churn", [{"tenure_months": 3.0}])
    # named by its endpoint, the call goes on (and stops where nothing was recorded)
    with pytest.raises(onepath.NotebookError, match=r"^onepath-cli may not call churn_shadow\.prod: no policy"):
        onepath.predict("churn_shadow", [{"tenure_months": 3.0}])


def test_rows_are_sent_as_exact_json_records_and_what_json_cannot_carry_is_one_line_naming_the_column(home):
    import json

    import numpy as np
    import pandas as pd

    from platform_defs.notebook import _json_records

    frame = pd.DataFrame({"seen": pd.to_datetime(["2026-01-02 03:04", None]), "amount": [1.5, np.nan],
                          "n": np.array([1, 2], dtype="int64"), "tiny": [1e-12, 1.23456789e-7]})
    assert _json_records(frame) == [{"seen": "2026-01-02T03:04:00", "amount": 1.5, "n": 1, "tiny": 1e-12},
                                    {"seen": None, "amount": None, "n": 2, "tiny": 1.23456789e-7}]
    # every value exactly as given (pandas' to_json would round floats to 10 decimals): what curl would send
    records = [{"seen": pd.Timestamp("2026-01-02"), "n": np.int64(3), "x": np.float32(0.1)}, {"n": 2 ** 70}]
    assert json.loads(json.dumps(_json_records(records))) == [  # a missing column stays missing
        {"seen": "2026-01-02T00:00:00", "n": 3, "x": float(np.float32(0.1))}, {"n": 2 ** 70}]
    # refused before any access is looked at (churn is declared, nothing recorded or deployed here)
    for rows, said in [
        (pd.DataFrame({"ok": [1], "z": [complex(1, 2)]}), "rows: column 'z' holds complex values, which JSON cannot "
                                                          "carry: convert them first"),
        ([{"ok": 1}, {"ok": 2, "z": object()}], "rows: record 1, column 'z' holds object values"),
        (3, "rows must be a DataFrame or a list of records (dicts of column: value), not int"),
        ({"ok": 1}, "rows must be a DataFrame or a list of records (dicts of column: value), not dict: pass [record]"),
        ([{"ok": 1}, 2], "rows: record 1 is not a dict of column: value (got int)"),
    ]:
        with pytest.raises(onepath.NotebookError) as err:
            onepath.predict("churn", rows)
        assert str(err.value).startswith(said) and len(str(err.value).splitlines()) == 1, err.value
