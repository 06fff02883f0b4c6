"""Declarations as Dagster components (``type: onepath.Model`` in ``assets/**/defs.yaml``): dg's own tools on
the project, the same graph from a component as from Python, and ``onepath migrate-declarations``.

dg runs as subprocesses (seconds each, most of it importing Dagster): the dg runs of this file run side by side,
on copies of the project; the three that load no definitions share one process (``DG_IN_SEQUENCE``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from platform_defs.loader import load_organisation
from platform_defs.specs import COMPONENT_TYPES, parse_component
from tests.conftest import NOT_INHERITED
from tests.test_notebook import NOTEBOOK_DECL

ROOT = Path(__file__).resolve().parents[1]
DG = Path(sys.executable).parent / "dg"
PROJECT = ("apps", "assets", "platform_defs", "resources", "sensors", "onepath", "pyproject.toml", "workspace.yaml")
MODEL_LINE = "---\n" + NOTEBOOK_DECL  # the model line onepath.register writes (tests/test_notebook.py)
# the example organisation's retention line as it was declared before components (the old form)
OLD_RETENTION = """\
declarations:  # the retention team's churn line, declared in YAML: dataset -> model -> endpoint
  - kind: dataset
    name: customer_activity
    owner: retention      # no track: the policy gives it retention's only track (ml-standard)
    generator: assets.retention.data:generate_customer_activity
    params: {rows: 4000, as_of: "2026-06-30"}
    feedback: {endpoint: churn_scoring, env: prod}  # what churn_scoring scored in prod, with who left
    columns:
      - {name: customer_id, dtype: string, role: id}
      - {name: tenure_months, dtype: float, min: 0, max: 600}
      - {name: churned, dtype: int, role: label, values: [0, 1]}

  - kind: model
    name: churn
    owner: retention
    track: ml-standard
    dataset: customer_activity
    trainer: assets.retention.trainer:train_churn
    metrics: {roc_auc: 0.65}

  - kind: endpoint
    name: churn_scoring
    owner: retention
    model: churn
    pass_through: [customer_id]   # logged beside the features
  - kind: model
    name: fraud
    owner: retention
    source: notebook
    version: 3
    label: is_fraud
"""


def _copy_project(dst: Path) -> Path:
    for name in PROJECT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", ".onepath"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def _dg_env(project: Path, home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(project), "ONEPATH_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200",
           "PATH": f"{DG.parent}{os.pathsep}{os.environ.get('PATH', '')}", "DAGSTER_DISABLE_TELEMETRY": "1"}
    for var in (*NOT_INHERITED, "ONEPATH_DECLARATIONS_DIR", "DAGSTER_IS_DEFS_VALIDATION_CLI"):
        env.pop(var, None)
    return env


# dg commands run one after another in one process, each as the `dg` script runs it (``sys.argv``, then
# ``dagster_dg_cli.cli.main``), each one's output and exit status apart: for commands that load no definitions
# (which a process imports once), so that Dagster is imported once for them
DG_IN_SEQUENCE = """\
import contextlib, io, json, sys
from dagster_dg_cli.cli import main
commands, result_file = json.loads(sys.argv[1]), sys.argv[2]
said = []
for args in commands:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        sys.argv = ["dg", *args]
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    said.append([out.getvalue(), code])
with open(result_file, "w") as f:
    json.dump(said, f)
"""


def test_dg_checks_lists_and_scaffolds_the_project_and_check_defs_names_a_broken_field(tmp_path):
    good, broken, schema = (_copy_project(tmp_path / n) for n in ("good", "broken", "schema"))
    # a mistake the type's schema (derived from the spec) shows: dg check yaml says where
    typo = schema / "assets" / "retention" / "defs.yaml"
    typo.write_text(typo.read_text().replace("{name: plan, dtype: string", "{name: plan, dtype: strng"))
    typo_line = next(i for i, x in enumerate(typo.read_text().splitlines(), 1) if "strng" in x)
    retention = broken / "assets" / "retention" / "defs.yaml"
    # a mistake dg's own schema check cannot see (metrics is a mapping of numbers): only onepath's load can
    text = retention.read_text()
    retention.write_text(text.replace("metrics: {roc_auc: 0.65}", "metrics: {roc_auc: 0.65, rocauc: 0.7}"))
    bad_line = next(i for i, x in enumerate(retention.read_text().splitlines(), 1) if "rocauc" in x)
    # the commands that load no definitions, in order in one process on the schema copy (the scaffold's file
    # is written beside the typo: check yaml still finds the typo)
    in_sequence = [["list", "components", "--json"], ["scaffold", "defs", "onepath.Model", "fraud_model"],
                   ["check", "yaml"]]
    runs = {
        "check": (good, [str(DG), "check", "defs"]),
        "list": (good, [str(DG), "list", "defs", "--json"]),
        "broken": (broken, [str(DG), "check", "defs"]),
        "sequence": (schema, [sys.executable, "-c", DG_IN_SEQUENCE, json.dumps(in_sequence),
                              str(tmp_path / "sequence.json")]),
        # onepath validate says what dg check defs says, in one line and no traceback
        "validate": (broken, [sys.executable, "-m", "platform_defs.cli", "validate"]),
    }
    procs = {k: subprocess.Popen(cmd, cwd=where, env=_dg_env(where, tmp_path / f"home-{k}"), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, (where, cmd) in runs.items()}
    raw = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
    (_, stderr), rc = raw.pop("sequence")
    assert rc == 0, stderr
    out = {k: (stdout + stderr, rc) for k, ((stdout, stderr), rc) in raw.items()}
    out.update(zip(("components", "scaffold", "schema"),
                   map(tuple, json.loads((tmp_path / "sequence.json").read_text()))))

    said, rc = out["check"]
    assert rc == 0 and "All component YAML validated successfully" in said, said
    assert "All definitions loaded successfully" in said, said

    (said, _), rc = raw["list"]  # stdout alone: the JSON
    assert rc == 0, out["list"][0]
    listed = json.loads(said[said.index("{"):])
    keys = {a["asset_key"] for a in listed["assets"]}
    assert {"customer_activity", "churn", "churn_scoring_staging", "churn_scoring_prod", "credit_risk",
            "loan_portal"} <= keys, keys
    checks = {c["key"] for c in listed["asset_checks"]}
    assert {"churn:performance", "churn_scoring_prod:performance"} <= checks, checks

    said, rc = out["components"]
    assert rc == 0, said
    types = {c["key"] for c in json.loads(said[said.index("{"):])["items"]}
    assert set(COMPONENT_TYPES) <= types, types  # the five onepath types, from the project's registry module

    said, rc = out["scaffold"]
    assert rc == 0, said
    written = (schema / "assets" / "fraud_model" / "defs.yaml").read_text()
    assert written.startswith("type: onepath.Model\n") and "# your team, as the policy lists it" in written
    doc = yaml.safe_load(written)
    spec = parse_component(doc["type"], doc["attributes"])  # valid as written: every field the spec's
    assert spec.name == "fraud_model" and spec.trainer == "my_package.trainer:train"

    said, rc = out["broken"]
    assert rc == 1, said
    assert (f"declaration 'churn' (model, assets/retention/defs.yaml:{bad_line}): field 'metrics': "
            f"unknown metric 'rocauc'") in said, said

    said, rc = out["schema"]
    assert rc == 1, said
    assert (f"assets/retention/defs.yaml:{typo_line} - onepath.Dataset attributes.columns.2.dtype 'strng' is not "
            f"one of ['int', 'float', 'string', 'bool']") in said, said

    (_, stderr), rc = raw["validate"]
    assert rc == 1 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[0].startswith(
        f"declaration 'churn' (model, assets/retention/defs.yaml:{bad_line}): field 'metrics': unknown metric"), stderr


def test_every_scaffold_is_a_valid_declaration_and_every_schema_is_its_specs_fields():
    from platform_defs.components import COMPONENTS, SCAFFOLDS, attributes_model
    from platform_defs.specs import fixed_by_type

    assert set(SCAFFOLDS) == set(COMPONENTS) == set(COMPONENT_TYPES)
    for type_name, spec_type in COMPONENT_TYPES.items():
        doc = yaml.safe_load(textwrap.dedent(SCAFFOLDS[type_name]).format(name="x_line"))
        assert doc["type"] == type_name
        assert isinstance(parse_component(type_name, doc["attributes"]), spec_type)
        schema = attributes_model(type_name).model_json_schema()
        assert set(schema["properties"]) == set(spec_type.model_fields) - set(fixed_by_type(spec_type))
        assert schema.get("additionalProperties") is False  # extra="forbid", as in the specs
        assert schema["properties"]["owner"]["description"] == spec_type.model_fields["owner"].description


def _placeless(text: str | None) -> str | None:
    """``text`` without the place a declaration was written at (a YAML file's line, a Python module): the one
    thing two ways of declaring the same line may differ in."""
    return re.sub(r"\(/[^)]*\)", "(where declared)", text) if text else text


def _shape(defs) -> dict:
    """What a declaration's graph is made of: per asset its deps, tags, kinds, group, owners, automation and
    the metadata that is not a file's place; per check its blocking."""
    import dagster as dg

    assets = {}
    for spec in defs.resolve_all_asset_specs():
        meta = {k: v for k, v in (spec.metadata or {}).items() if not k.startswith("dagster/code_references")}
        assets[spec.key.to_user_string()] = {
            "deps": sorted(d.asset_key.to_user_string() for d in spec.deps), "tags": dict(spec.tags),
            "kinds": sorted(spec.kinds), "group": spec.group_name, "owners": list(spec.owners),
            "automation": str(spec.automation_condition),
            # where the declaration was written (a YAML line, a Python module) is the one thing that differs
            "metadata": {k: _placeless(str(v)) for k, v in meta.items()}, "description": _placeless(spec.description)}
    checks = {}
    for a in list(defs.assets or []) + list(defs.asset_checks or []):
        if isinstance(a, (dg.AssetsDefinition, dg.AssetChecksDefinition)):
            for c in a.check_specs:
                checks[(c.asset_key.to_user_string(), c.name)] = c.blocking
    return {"assets": assets, "checks": checks}


def test_a_model_line_declared_in_python_and_as_a_component_is_the_same_graph(tmp_path, settings, monkeypatch):
    import onepath
    from platform_defs import definitions

    component = tmp_path / "component" / "retention"
    component.mkdir(parents=True)
    text = (ROOT / "assets" / "retention" / "defs.yaml").read_text() + MODEL_LINE
    (component / "defs.yaml").write_text(text)
    # the same declarations in Python, written from the component file's attributes
    lines = ["from platform_defs.declare import dataset, endpoint, model",
             "from platform_defs.specs import NotebookDeclSpec", "DECLARATIONS = ["]
    maker = {"onepath.Dataset": "dataset", "onepath.Model": "model", "onepath.Endpoint": "endpoint",
             "onepath.ModelLine": "NotebookDeclSpec"}
    for doc in yaml.safe_load_all(text):
        lines.append(f"    {maker[doc['type']]}(**{doc['attributes']!r}),")
    python = tmp_path / "python" / "retention"
    python.mkdir(parents=True)
    (python / "declarations.py").write_text("\n".join(lines + ["]", ""]))

    org_c, org_p = load_organisation(component.parent), load_organisation(python.parent)
    assert list(org_c.by_name) == list(org_p.by_name) == ["customer_activity", "churn", "churn_scoring",
                                                          "fraud_data", "fraud", "fraud_scoring"]
    assert all(org_c.by_name[n] == org_p.by_name[n] for n in org_c.by_name)
    built_c = definitions.build_definitions(org=org_c, settings=settings)
    built_p = definitions.build_definitions(org=org_p, settings=settings)
    shape = _shape(built_c)
    assert shape == _shape(built_p)
    assert {"fraud_data", "fraud", "fraud_scoring_staging", "fraud_scoring_prod"} <= set(shape["assets"])
    assert shape["checks"][("fraud_scoring_staging", "performance")] is True  # the track's gate, blocking
    assert shape["assets"]["fraud_scoring_staging"]["automation"] != "None"  # staging follows the model

    # the component's own build_defs is its slice of the composition root's one graph (the same objects)
    monkeypatch.setattr(definitions, "defs", built_c)
    line = onepath.ModelLine.from_attributes_dict(attributes=yaml.safe_load(MODEL_LINE)["attributes"])
    part = line.build_defs(None)
    keys = {k.to_user_string() for a in part.assets for k in a.keys}
    assert keys == {"fraud_data", "fraud", "fraud_scoring_staging", "fraud_scoring_prod"}
    whole = {id(a) for a in [*built_c.assets, *built_c.asset_checks]}
    assert all(id(a) in whole for a in [*part.assets, *part.asset_checks])
    assert {k for k in _shape(built_c)["checks"] if k[0] in keys} == set(_shape(part)["checks"])


def _migrate(root: Path, *args: str, capsys) -> tuple[int, str, str]:
    from platform_defs.cli import main

    rc = main(["migrate-declarations", str(root), *args])
    said = capsys.readouterr()
    return rc, said.out, said.err


def test_migrate_declarations_converts_the_old_form_to_the_same_organisation_once(tmp_path, capsys):
    team = tmp_path / "decls" / "retention"
    team.mkdir(parents=True)
    path = team / "defs.yaml"
    old = "# the team file: retention\n\n" + OLD_RETENTION  # a leading comment is kept too
    path.write_text(old)
    before = load_organisation(team.parent)

    rc, out, err = _migrate(team.parent, "--check", capsys=capsys)
    assert rc == 1 and "retention/defs.yaml: still in the old form" in out and "1 file(s) in the old form" in err
    assert path.read_text() == old  # --check writes nothing

    rc, out, err = _migrate(team.parent, capsys=capsys)
    assert rc == 0 and "retention/defs.yaml: converted to components" in out, (out, err)
    new = path.read_text()
    docs = list(yaml.safe_load_all(new))
    assert [d["type"] for d in docs] == ["onepath.Dataset", "onepath.Model", "onepath.Endpoint", "onepath.ModelLine"]
    assert list(docs[0]["attributes"]) == ["name", "owner", "generator", "params", "feedback", "columns"]  # order kept
    assert "kind" not in docs[1]["attributes"] and "source" not in docs[3]["attributes"]
    for comment in ("# the team file: retention", "# the retention team's churn line",
                    "# no track: the policy gives it", "# logged beside"):
        assert comment in new, new
    after = load_organisation(team.parent)
    assert list(after.by_name) == list(before.by_name)
    assert all(after.by_name[n] == before.by_name[n] for n in before.by_name)

    rc, out, _ = _migrate(team.parent, capsys=capsys)  # a second run changes nothing
    assert rc == 0 and path.read_text() == new and out.startswith("ok: every declaration file")
    rc, _, _ = _migrate(team.parent, "--check", capsys=capsys)
    assert rc == 0


def test_migrate_declarations_leaves_a_file_it_cannot_convert_as_it_was_and_says_why(tmp_path, capsys):
    team = tmp_path / "decls" / "t"
    team.mkdir(parents=True)
    bad = OLD_RETENTION.replace("kind: endpoint", "kind: endpiont")
    (team / "defs.yaml").write_text(bad)
    rc, out, err = _migrate(team.parent, capsys=capsys)
    assert rc == 1 and out == ""
    assert "t/defs.yaml: not converted, left as it was: declaration 'churn_scoring'" in err and "endpiont" in err, err
    assert (team / "defs.yaml").read_text() == bad


def test_a_file_of_components_may_end_with_a_separator_and_comments(tmp_path):
    team = tmp_path / "nb"
    team.mkdir()
    (team / "defs.yaml").write_text(MODEL_LINE + "---\n# the next model line goes here\n")
    org = load_organisation(tmp_path)
    assert list(org.by_name) == ["fraud_data", "fraud", "fraud_scoring"]
    assert org.sources["fraud"].endswith("nb/defs.yaml:2")  # the document's first line (its type)


@pytest.mark.parametrize("broken, field, line", [
    ("type: onepath.Dataset\nattributes: {name: sales}\n1: 2\nfoo: 3\n", "1", 4),  # keys of mixed types
    ("type: onepath.Dataset\nattributes: {name: sales}\ntrue: 2\n", "True", 4),
    ("type: onepath.Dataset\nattributes: [name, sales]\n", "attributes", 2),  # attributes not a mapping
    ("- type: onepath.Dataset\n- attributes: {}\n", "type", 2),  # a list document
    ("type: [onepath.Dataset]\nattributes: {name: sales}\n", "type", 2),  # type not a string
    ("type: 3\nattributes: {name: sales}\n", "type", 2),
    ("type: onepath.Dataset\nattributes: {name: [sales]}\n", "name", 3),
    # a non-string attribute key
    ("type: onepath.ModelLine\nattributes: {name: other, owner: retention, version: 1, label: y, 1: 2}\n", "1", 3),
    # a merge key: the line of the key as written, not of its neighbour (the merged pairs come first)
    ("<<: {type: onepath.Dataset}\ntype: onepath.Dataset\nattributes: {name: x}\nbogus: 1\n", "bogus", 5),
    ("<<: {bogus: 1}\ntype: onepath.Dataset\nattributes: {name: x}\n", "bogus", 2),
    ("type: onepath.Dataset\nattributes:\n  <<: {name: sales}\n  name: [sales]\n", "name", 5),
])
def test_a_broken_component_document_is_one_line_and_only_it_is_left_out(tmp_path, broken, field, line):
    team = tmp_path / "nb"
    team.mkdir()
    (team / "defs.yaml").write_text("---\n" + broken + MODEL_LINE)
    org = load_organisation(tmp_path, tolerant=True)
    assert list(org.by_name) == ["fraud_data", "fraud", "fraud_scoring"]  # the file's valid document still loads
    [problem] = org.problems
    said = str(problem)
    assert len(said.splitlines()) == 1 and f"nb/defs.yaml:{line}" in said and f"field '{field}'" in said, said
