"""Notebook models in the declarations: expansion, names and one-line errors naming file, line and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from platform_defs.loader import load_organisation
from platform_defs.specs import (DeclarationError, NotebookModelSpec, SnapshotDatasetSpec, notebook_dataset_name,
                                 notebook_endpoint_name)
from platform_defs.settings import PROJECT_ROOT

NOTEBOOK_DECL = """declarations:
  - kind: model
    name: fraud
    owner: retention
    source: notebook
    version: 3
    label: is_fraud
    protected: [age_band]
"""


def _org_dir(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "assets"
    root.mkdir()
    for team in ("credit", "retention"):
        shutil.copytree(PROJECT_ROOT / "assets" / team, root / team)
    (root / "nb").mkdir()
    (root / "nb" / "defs.yaml").write_text(text)
    return root


def test_notebook_model_expands_into_dataset_model_and_endpoint(tmp_path):
    org = load_organisation(_org_dir(tmp_path, NOTEBOOK_DECL))
    assert notebook_dataset_name("fraud") == "fraud_data" and notebook_endpoint_name("fraud") == "fraud_scoring"
    ds, model, ep = org.by_name["fraud_data"], org.by_name["fraud"], org.by_name["fraud_scoring"]
    assert isinstance(ds, SnapshotDatasetSpec) and not ds.generator
    assert isinstance(model, NotebookModelSpec) and model.version == 3 and not model.trainer
    assert model.dataset == "fraud_data" and ep.model == "fraud" and ep.environments == ["staging", "prod"]
    assert ds.protected_columns == ["age_band"] and ds.label == "is_fraud"
    assert org.sources["fraud"].endswith("nb/defs.yaml:2")


@pytest.mark.parametrize("change, field, problem", [
    (("version: 3", "version: three"), "version", "valid integer"),
    (("version: 3", "version: 3\n    colour: red"), "colour", "unknown field"),
    (("source: notebook", "source: laptop"), "source", "unknown source"),
    (("    label: is_fraud\n", ""), "label", "required"),
])
def test_bad_notebook_declaration_is_one_line_naming_file_line_and_field(tmp_path, change, field, problem):
    with pytest.raises(DeclarationError) as err:
        load_organisation(_org_dir(tmp_path, NOTEBOOK_DECL.replace(*change)))
    line = str(err.value).splitlines()[0]
    assert f"field '{field}'" in line and problem in line.lower() and "nb/defs.yaml:2" in line, line


# --------------------------------------------------------------------------------------------
# Refusals: one line, nothing registered


def _frames():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"amount": rng.gamma(2, 50, 200), "hour": rng.integers(0, 24, 200).astype(float)})
    df["is_fraud"] = (df.amount > 120).astype(int)
    return df.iloc[:150], df.iloc[150:]


def test_register_refuses_without_test_rows_or_with_overlap():
    from platform_defs.notebook import held_out_problem

    train, test = _frames()
    assert "no test rows" in held_out_problem(train, None, "is_fraud")
    assert "also in the train frame" in held_out_problem(train, train.head(10), "is_fraud")
    ids_train, ids_test = train.assign(tx=range(150)), test.assign(tx=range(149, 199))
    assert "share 1 id(s) in 'tx'" in held_out_problem(ids_train, ids_test, "is_fraud", id_column="tx")
    assert held_out_problem(train, test, "is_fraud") is None


def test_register_refuses_in_one_line_without_a_key(tmp_path, monkeypatch):
    import onepath
    from sklearn.linear_model import LogisticRegression

    monkeypatch.delenv("ONEPATH_KEY", raising=False)
    train, test = _frames()
    m = LogisticRegression().fit(train[["amount", "hour"]], train.is_fraud)
    with pytest.raises(onepath.NotebookError) as err:
        onepath.register(m, train=train, test=test, label="is_fraud", name="fraud", owner="retention",
                         identity="nobody", key=tmp_path / "missing.key", declarations=tmp_path / "d.yaml")
    assert len(str(err.value).splitlines()) == 1 and "platform engineer" in str(err.value)
    assert not (tmp_path / "d.yaml").exists()
    with pytest.raises(onepath.NotebookError, match="no test rows"):
        onepath.register(m, train=train, label="is_fraud", name="fraud", owner="retention", identity="nobody",
                         key=tmp_path / "missing.key")


# --------------------------------------------------------------------------------------------
# The three steps, from a real Jupyter kernel


KERNEL_CELLS = [
    """import os, sys
os.environ.update(@ENV@)
sys.path.insert(0, @ROOT@)""",
    """import numpy as np, pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
import onepath
from tests.conftest import quick_policy
rng = np.random.default_rng(3)
n = 1200
df = pd.DataFrame({"amount": rng.gamma(2, 50, n), "hour": rng.integers(0, 24, n).astype(float),
                   "age_band": rng.choice(["18-30", "31-50", "51+"], n)})
df["is_fraud"] = ((df.amount > 150) | (rng.random(n) < 0.1)).astype(int)
df_train, df_test = train_test_split(df, test_size=0.3, random_state=1, stratify=df.is_fraud)""",
    """model = LogisticRegression().fit(df_train[["amount", "hour"]], df_train.is_fraud)
first = onepath.register(model, train=df_train, test=df_test, label="is_fraud", name="fraud", owner="retention",
                         protected=["age_band"], identity="carla", key=@KEY@, policy=quick_policy())""",
    # a second version arrives between step 1 and step 2 (registered elsewhere: the pin stays on the first)
    """other = LogisticRegression(C=0.01).fit(df_train[["amount"]].assign(hour=0.0), df_train.is_fraud)
second = onepath.register(other, train=df_train, test=df_test, label="is_fraud", name="fraud", owner="retention",
                          protected=["age_band"],
                          identity="carla", key=@KEY@, declarations=@SCRATCH@, policy=quick_policy())
probe = df_test.head(20)[["amount", "hour"]]
import json
print(json.dumps({"first": first.version, "second": second.version, "decl": str(first.declaration),
                  "probe": probe.to_dict(orient="records"), "proba": model.predict_proba(probe)[:, 1].tolist()}))""",
]


def test_three_steps_from_a_jupyter_kernel(settings, tmp_path):
    import json
    import os

    import httpx
    import nbformat
    from nbclient import NotebookClient

    from platform_defs.loader import load_organisation
    from platform_defs.notebook import version_to_promote
    from platform_defs.promotion import Services, promote_endpoint
    from platform_defs.wiring import build_resources
    from tests.conftest import cli_headers, quick_policy, record_policy

    decl = _org_dir(tmp_path, "declarations: []\n")
    (decl / "nb" / "defs.yaml").unlink()
    policy = quick_policy()
    resources = build_resources(settings)
    book = resources["ledger"].ledger()
    record_policy(book, policy)
    env = {"ONEPATH_HOME": str(settings.home), "ONEPATH_DECLARATIONS_DIR": str(decl)}
    fill = {"ENV": repr(env), "ROOT": repr(str(PROJECT_ROOT)),
            "KEY": repr(str(PROJECT_ROOT / "assets/demo_identities/carla.key")),
            "SCRATCH": repr(str(tmp_path / "scratch.yaml"))}

    def cell(text: str) -> str:
        for k, v in fill.items():
            text = text.replace(f"@{k}@", v)
        return text

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell(c)) for c in KERNEL_CELLS])
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = json.loads([o for o in nb.cells[-1].outputs if o.get("name") == "stdout"][-1]["text"].splitlines()[-1])
    assert (out["first"], out["second"]) == ("1", "2")
    written = Path(out["decl"]).read_text().splitlines()
    block = written[written.index("    name: fraud") - 1:]  # appended to the owner team's file
    assert len(block) + 1 <= 10 and max(map(len, block)) <= 100 and "    version: 1" in block, block

    os.environ["ONEPATH_DECLARATIONS_DIR"] = str(decl)
    try:
        org = load_organisation(decl, policy)
    finally:
        os.environ.pop("ONEPATH_DECLARATIONS_DIR")
    version, why, newer = version_to_promote(org, "fraud", book, resources["mlflow"])
    assert (version, newer) == ("1", ["2"]) and why.startswith("pinned by")
    services = Services(mlflow=resources["mlflow"], deployer=resources["deployer_local"].deployer(), ledger=book,
                        data_store=resources["data_store"])
    try:
        result = promote_endpoint(org, policy, "fraud_scoring", "staging", services=services, actor="test",
                                  trigger="test")
        assert result.version == "1"
        entry = book.entries(kind="deploy", subject="fraud_scoring", env="staging")[-1]
        assert entry.data["version"] == "1" and entry.data["newer_not_deployed"] == ["2"]
        assert entry.data["why"].startswith("pinned by")
        headers = cli_headers(book, services.deployer, "fraud_scoring", "staging", org)
        resp = httpx.post(f"{result.address}/predict", json={"records": out["probe"]}, headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["version"] == "1"
        got = [p["probability"] for p in body["predictions"]]
        assert got == pytest.approx(out["proba"], abs=1e-6)
    finally:
        services.deployer.stop_all()
