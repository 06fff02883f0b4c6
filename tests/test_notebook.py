"""Notebook models in the declarations: expansion, names and one-line errors naming file, line and field; what
``onepath.register`` refuses. The three steps from a Jupyter kernel to prod run on a real platform in
test_declarations_live.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from platform_defs.loader import load_organisation
from platform_defs.specs import (DeclarationError, NotebookModelSpec, SnapshotDatasetSpec, notebook_dataset_name,
                                 notebook_endpoint_name)
from platform_defs.settings import PROJECT_ROOT

NOTEBOOK_DECL = """type: onepath.ModelLine
attributes:
  name: fraud
  owner: retention
  version: 3
  label: is_fraud
  protected: [age_band]
"""
OLD_FORM = """declarations:
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


@pytest.mark.parametrize("text, line", [(NOTEBOOK_DECL, 1), (OLD_FORM, 2)], ids=["component", "old-form"])
def test_notebook_model_expands_into_dataset_model_and_endpoint(tmp_path, text, line):
    org = load_organisation(_org_dir(tmp_path, text))
    assert notebook_dataset_name("fraud") == "fraud_data" and notebook_endpoint_name("fraud") == "fraud_scoring"
    ds, model, ep = org.by_name["fraud_data"], org.by_name["fraud"], org.by_name["fraud_scoring"]
    assert isinstance(ds, SnapshotDatasetSpec) and not ds.generator
    assert isinstance(model, NotebookModelSpec) and model.version == 3 and not model.trainer
    assert model.dataset == "fraud_data" and ep.model == "fraud" and ep.environments == ["staging", "prod"]
    assert ds.protected_columns == ["age_band"] and ds.label == "is_fraud"
    assert org.sources["fraud"].endswith(f"nb/defs.yaml:{line}")


@pytest.mark.parametrize("change, field, problem, line", [
    (("version: 3", "version: three"), "version", "valid integer", 5),
    (("version: 3", "version: 3\n  colour: red"), "colour", "unknown field", 6),
    (("version: 3", "version: 3\n  source: laptop"), "source", "the type onepath.modelline says it", 6),
    (("  label: is_fraud\n", ""), "label", "required", 3),  # missing: the attributes' first line
    (("protected: [age_band]", "protected: [age_band]\n  metrics: {rocauc: 0.7}"), "metrics", "unknown metric", 8),
    (("onepath.ModelLine", "onepath.ModelLin"), "type", "known: onepath.dataset, onepath.model, ", 1),
])
def test_bad_notebook_declaration_is_one_line_naming_file_line_and_field(tmp_path, change, field, problem, line):
    with pytest.raises(DeclarationError) as err:
        load_organisation(_org_dir(tmp_path, NOTEBOOK_DECL.replace(*change)))
    said = str(err.value).splitlines()[0]
    assert f"field '{field}'" in said and problem in said.lower() and f"nb/defs.yaml:{line})" in said, said


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
# A fresh MLflow store, first used by several processes at once (onepath up's daemon and a notebook's
# first register did: "table latest_metrics already exists")


def _first_use(uri, artifacts, barrier, answers) -> None:
    import mlflow  # noqa: F401  (imported before the barrier: the race is the store's creation, not imports)

    from resources.mlflow_registry import ready_store

    barrier.wait()
    try:
        ready_store(uri, artifacts)
        answers.put("ok")
    except Exception as err:  # noqa: BLE001 - the test reports what each process met
        answers.put(str(err).splitlines()[0][:160])


def test_processes_first_using_a_fresh_mlflow_store_at_once_all_succeed(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    barrier, answers = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_first_use, args=(uri, tmp_path / "artifacts", barrier, answers)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [answers.get(timeout=5) for _ in procs] == ["ok"] * 4
    assert oct((tmp_path / "mlflow.db.init-lock").stat().st_mode & 0o777) == "0o600"
    from mlflow import MlflowClient

    default = MlflowClient(tracking_uri=uri).get_experiment("0")  # not ./mlruns of the first process's folder
    assert default.artifact_location == (tmp_path / "artifacts" / "0").as_uri(), default.artifact_location


def test_a_second_register_updates_its_keys_and_keeps_what_the_team_declared(tmp_path):
    from platform_defs.notebook import render_declaration, write_declaration

    path = tmp_path / "defs.yaml"
    write_declaration(path, render_declaration(name="fraud", owner="retention", version="1", label="is_fraud",
                                               pii=[], protected=["age_band"], features=["amount", "hour"]), "fraud")
    # the team adds governance by hand (a purpose raises the minimum track; metric minimums), and a neighbour
    assert path.read_text().startswith("type: onepath.ModelLine\nattributes:\n  name: fraud\n")
    assert len(path.read_text().splitlines()) <= 10
    reviewed = path.read_text().replace("  label: is_fraud\n", "  label: is_fraud\n  purpose: credit_decision\n"
                                        "  metrics: {roc_auc: 0.7}  # agreed with model risk\n")
    other = "type: onepath.ModelLine\nattributes:\n  name: other\n  owner: retention\n  version: 4\n  label: y\n"
    path.write_text(reviewed + "---\n" + other)
    write_declaration(path, render_declaration(name="fraud", owner="retention", version="2", label="is_fraud",
                                               pii=[], protected=[], features=["amount"]), "fraud")
    text = path.read_text()
    assert "  version: 2\n" in text and "  version: 1\n" not in text and "  features: [amount]\n" in text
    assert "  purpose: credit_decision\n" in text and "metrics: {roc_auc: 0.7}  # agreed with model risk" in text
    assert "  protected: [age_band]\n" in text  # naming none this time takes none away
    assert text.endswith("---\n" + other)
    # a third model line goes in a document of its own; the file loads as three model lines
    write_declaration(path, render_declaration(name="third", owner="retention", version="1", label="y", pii=[],
                                               protected=[], features=None), "third")
    from platform_defs.loader import _load_yaml

    specs = [d for d, _ in _load_yaml(path)]
    assert [(d.name, d.version) for d in specs] == [("fraud", 2), ("other", 4), ("third", 1)]
    assert specs[0].purpose == "credit_decision" and specs[0].metrics == {"roc_auc": 0.7}


def test_a_register_into_an_old_form_file_converts_it_and_keeps_the_team_fields(tmp_path):
    from platform_defs.loader import _load_yaml
    from platform_defs.notebook import render_declaration, write_declaration

    path = tmp_path / "defs.yaml"
    path.write_text(OLD_FORM.replace("    label: is_fraud\n", "    label: is_fraud\n    purpose: fraud_check  # ours\n"))
    write_declaration(path, render_declaration(name="fraud", owner="retention", version="5", label="is_fraud",
                                               pii=[], protected=[], features=None), "fraud")
    text = path.read_text()
    assert text.startswith("type: onepath.ModelLine\n") and "declarations:" not in text
    assert re.search(r"^  purpose: fraud_check +# ours$", text, re.M), text
    (spec, _), = _load_yaml(path)
    assert spec.version == 5 and spec.purpose == "fraud_check" and spec.protected == ["age_band"]


def test_a_column_the_declaration_cannot_carry_is_refused_before_anything_is_registered(tmp_path):
    import onepath
    from sklearn.linear_model import LogisticRegression

    from platform_defs.notebook import render_declaration

    train, test = (f.rename(columns={"hour": "#hour"}) for f in _frames())
    m = LogisticRegression().fit(train[["amount", "#hour"]], train.is_fraud)
    with pytest.raises(onepath.NotebookError) as err:  # no key is needed to be told: nothing was logged or signed
        onepath.register(m, train=train, test=test, label="is_fraud", name="fraud", owner="retention",
                         identity="nobody", key=tmp_path / "missing.key", declarations=tmp_path / "d.yaml")
    assert str(err.value).startswith("the declaration this would write is not valid: ") and "'#hour'" in str(err.value)
    assert not (tmp_path / "d.yaml").exists()
    # what YAML would read otherwise is quoted; a long list goes one item a line, within 100 characters
    block = render_declaration(name="fraud", owner="retention", version="1", label="on", pii=[], protected=[],
                               features=[f"feature_number_{i}" for i in range(9)])
    assert '  label: "on"' in block and "    - feature_number_8" in block
    assert max(map(len, block.splitlines())) <= 100


def test_private_umask_makes_a_blocks_files_owner_only_and_gives_the_kernel_its_umask_back(tmp_path):
    import os

    from resources.files import private_umask

    before = os.umask(0o022)  # Jupyter's usual umask
    try:
        with private_umask():
            (tmp_path / "inside").write_text("x")
        (tmp_path / "after").write_text("x")
    finally:
        os.umask(before)
    assert oct((tmp_path / "inside").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "after").stat().st_mode & 0o777) == "0o644"  # the kernel's own umask comes back


_TEAM_LAYOUTS = {  # the same model line as a team may lay it out; each keeps its purpose and comment
    "block, pii items at the key's indentation": (
        "# team file\ntype: onepath.ModelLine\nattributes:\n  name: fraud  # ours\n  owner: retention\n  version: 1\n"
        "  label: is_fraud\n  purpose: fraud_check\n  pii:\n  - email\n"),
    "flow attributes": (
        "type: onepath.ModelLine  # ours\nattributes: {name: fraud, owner: retention, version: 1, label: is_fraud, "
        "purpose: fraud_check, pii: [email]}\n"),
    "quoted type and name": (
        "type: 'onepath.ModelLine'\nattributes:\n  name: \"fraud\"  # ours\n  owner: retention\n  version: 1\n"
        "  label: is_fraud\n  purpose: fraud_check\n  pii: [email]\n"),
    "attributes before type, 4-space indentation": (
        "attributes:\n    name: fraud  # ours\n    owner: retention\n    version: 1\n    label: is_fraud\n"
        "    purpose: fraud_check\n    pii:\n        - email\ntype: onepath.ModelLine\n"),
    "a merge key in the attributes": (
        "type: onepath.ModelLine\nattributes:\n  <<: {owner: retention, version: 1}\n  name: fraud  # ours\n"
        "  label: is_fraud\n  purpose: fraud_check\n  pii: [email]\n"),
}


@pytest.mark.parametrize("layout", list(_TEAM_LAYOUTS))
def test_a_register_finds_its_model_line_in_any_layout_and_keeps_the_team_fields(tmp_path, layout):
    from platform_defs.loader import _load_yaml
    from platform_defs.notebook import render_declaration, write_declaration

    path = tmp_path / "defs.yaml"
    other = ("# the next line\ntype: onepath.ModelLine\n"
             "attributes: {name: other, owner: retention, version: 4, label: y}\n")
    path.write_text(_TEAM_LAYOUTS[layout] + "---\n" + other)
    write_declaration(path, render_declaration(name="fraud", owner="retention", version="2", label="is_fraud",
                                               pii=[], protected=["age_band"], features=["amount"]), "fraud")
    text = path.read_text()
    specs = [d for d, _ in _load_yaml(path)]
    assert [(d.name, d.version) for d in specs] == [("fraud", 2), ("other", 4)], text  # updated, not duplicated
    assert specs[0].purpose == "fraud_check" and specs[0].pii == ["email"] and specs[0].protected == ["age_band"]
    assert specs[0].features == ["amount"] and "# ours" in text and text.endswith("---\n" + other), text
    assert text.startswith("# team file\n") == layout.startswith("block")


_OTHER = "type: onepath.ModelLine\nattributes: {name: other, owner: retention, version: 4, label: y}\n"
_LINE = "type: onepath.ModelLine\nattributes:\n  name: fraud\n  owner: retention\n  version: 1\n  label: is_fraud\n"
_COMMENTED = {  # (a file, the features the register names): each comment must stay where the team put it
    "after a list the register replaces": (
        "type: onepath.ModelLine\nattributes:\n  name: fraud\n  owner: retention\n  features:\n    - amount\n"
        "    - hour\n  # purpose decided with legal, ticket LEG-12: do not change\n  purpose: fraud_check\n"
        "  version: 1\n  # the label column is the chargeback flag\n  label: is_fraud\n", ["amount"]),
    "between and after the items of a list": (
        "type: onepath.ModelLine\nattributes:\n  name: fraud\n  features:\n    # money first\n    - amount\n"
        "    # then time\n    - hour  # local time\n    - day  # weekday\n  # who owns it\n  owner: retention\n"
        "  version: 1  # bumped by register\n  label: is_fraud\n", ["amount", "minute"]),
    "in a list the register takes away": (
        "type: onepath.ModelLine\nattributes:\n  name: fraud\n  features:  # the inputs\n    # money\n"
        "    - amount\n  # who owns it\n  owner: retention\n  version: 1\n  label: is_fraud\n", None),
    "at the end of the file": (_OTHER + "---\n" + _LINE + "# trailing team note\n", ["amount"]),
    "before the next document": (_LINE + "# next: other's line\n---\n" + _OTHER, ["amount"]),
    "before the key after the attributes": (
        "attributes:\n  name: fraud\n  owner: retention\n  version: 1\n  label: is_fraud\n# the type, checked\n"
        "type: onepath.ModelLine\n# end\n", ["amount", "hour"]),
}


def _line_keys(text: str) -> list[str | None]:
    """Each line's key (a mapping key, a list item's key, a document marker), None for a comment or blank line."""
    keys: list[tuple[str | None, int]] = []
    for line in text.splitlines():
        body, indent = line.strip(), len(line) - len(line.lstrip())
        if not body or body.startswith("#"):
            key = None
        elif body.startswith(("---", "...")):
            key = body[:3]
        elif body.startswith("-"):  # an item: its key is the nearest line above it that is less indented
            key = next(k for k, i in reversed(keys) if k and i < indent)
        else:
            key = body.split(":")[0].strip()
        keys.append((key, indent))
    return [k for k, _ in keys]


def _comment_places(text: str, keys: set[str]) -> list[tuple[str, str, str]]:
    """Each comment line of ``text`` with the nearest line above and below it that has one of ``keys``
    (``^``/``$``: the start and end of the file)."""
    of = _line_keys(text)
    return [(line.strip(), next((k for k in reversed(of[:i]) if k in keys), "^"),
             next((k for k in of[i + 1:] if k in keys), "$"))
            for i, line in enumerate(text.splitlines()) if line.strip().startswith("#")]


@pytest.mark.parametrize("case", list(_COMMENTED))
def test_a_register_keeps_every_comment_where_the_team_put_it(tmp_path, case):
    from platform_defs.loader import _load_yaml
    from platform_defs.notebook import render_declaration, write_declaration

    path = tmp_path / "defs.yaml"
    before, features = _COMMENTED[case]
    path.write_text(before)
    write_declaration(path, render_declaration(name="fraud", owner="retention", version="2", label="is_fraud",
                                               pii=[], protected=[], features=features), "fraud")
    after = path.read_text()
    fraud = next(d for d, _ in _load_yaml(path) if d.name == "fraud")
    assert fraud.version == 2 and fraud.features == features, after
    # every comment line is still there, in the same order, between the same keys (of the keys both files have)
    both = set(_line_keys(before)) & set(_line_keys(after)) - {None}
    lines = {c for c, _, _ in _comment_places(before, both)}
    assert [p for p in _comment_places(after, both) if p[0] in lines] == _comment_places(before, both), after
    # a comment after a value stays after it, or (its line gone) becomes a comment line where its line was
    for tail in re.findall(r"^ *[^#\s].* (#.*)$", before, re.M):
        assert re.search(rf"^.*{re.escape(tail)}$", after, re.M), (tail, after)


def test_a_register_that_would_lose_an_end_of_line_comment_is_refused_leaving_the_file_as_it_was(tmp_path):
    # a comment inside a flow list that spans lines: shortening the list would cut it; the check sees every
    # comment, a line's end included (a '#' in quotes is not one), so the file is left alone, in one line
    import onepath
    from platform_defs.notebook import render_declaration, write_declaration

    path = tmp_path / "defs.yaml"
    before = ("type: onepath.ModelLine\nattributes:\n  name: fraud\n  owner: retention\n  version: 1\n"
              "  label: is_fraud\n  description: 'not # a comment'\n  features: [amount,  # why amount\n    hour]\n")
    path.write_text(before)
    with pytest.raises(onepath.NotebookError, match="or drop a comment"):
        write_declaration(path, render_declaration(name="fraud", owner="retention", version="2", label="is_fraud",
                                                   pii=[], protected=[], features=["amount"]), "fraud")
    assert path.read_text() == before


def test_a_model_line_in_flow_style_on_its_document_marker_line_is_updated_in_place(tmp_path):
    from platform_defs.loader import _load_yaml
    from platform_defs.notebook import render_declaration, write_declaration

    path = tmp_path / "defs.yaml"
    other = "type: onepath.ModelLine\nattributes: {name: other, owner: retention, version: 4, label: y}\n"
    mine = ("--- {type: onepath.ModelLine, attributes: {name: fraud, owner: retention, version: 1, label: is_fraud,"
            " purpose: fraud_check}}  # ours\n")
    path.write_text(other + mine)
    write_declaration(path, render_declaration(name="fraud", owner="retention", version="2", label="is_fraud",
                                               pii=[], protected=[], features=["amount"]), "fraud")
    assert path.read_text() == other + mine.replace("version: 1", "version: 2").replace(
        "purpose: fraud_check}", "purpose: fraud_check, features: [amount]}")
    specs = [d for d, _ in _load_yaml(path)]
    assert [(d.name, d.version, d.features) for d in specs] == [("other", 4, None), ("fraud", 2, ["amount"])]


def test_a_register_that_cannot_update_the_file_changes_nothing_anywhere(tmp_path):
    import onepath

    from platform_defs.notebook import plan_declaration, render_declaration

    path = tmp_path / "defs.yaml"
    line = "type: onepath.ModelLine\nattributes: {name: fraud, owner: retention, version: 1, label: is_fraud}\n"
    path.write_text(line + "---\n" + line)  # declared twice: which one to update is not register's to guess
    block = render_declaration(name="fraud", owner="retention", version="2", label="is_fraud", pii=[], protected=[],
                               features=None)
    with pytest.raises(onepath.NotebookError) as err:
        plan_declaration(path, block, "fraud")
    assert "declared 2 times (lines 1, 4)" in str(err.value) and len(str(err.value).splitlines()) == 1
    # register checks the file before anything is logged: no key is needed to be told, nothing was written
    train, test = _frames()
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression().fit(train[["amount", "hour"]], train.is_fraud)
    with pytest.raises(onepath.NotebookError, match="declared 2 times"):
        onepath.register(m, train=train, test=test, label="is_fraud", name="fraud", owner="retention",
                         identity="nobody", key=tmp_path / "missing.key", declarations=path)
    assert path.read_text() == line + "---\n" + line
