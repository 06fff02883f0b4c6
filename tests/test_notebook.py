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
