"""Bad declarations fail at load with one line naming the declaration, its file, the field and the
problem; `onepath validate` prints exactly that line and no traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from platform_defs.loader import load_organisation
from platform_defs.specs import DeclarationError

ROOT = Path(__file__).resolve().parents[1]
GOOD = (ROOT / "assets" / "retention" / "defs.yaml").read_text()


def write(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp_path


def first_line(tmp_path: Path) -> str:
    cwd = os.getcwd()
    os.chdir(tmp_path)  # file names are shown relative to where the person runs the command
    try:
        with pytest.raises(DeclarationError) as err:
            load_organisation(tmp_path)
    finally:
        os.chdir(cwd)
    return str(err.value).splitlines()[0]


def test_the_example_organisation_is_valid():
    org = load_organisation(ROOT / "assets")
    assert {d.name for d in org.by_name.values()} == {
        "credit_applications", "credit_risk", "credit_scoring", "loan_portal",
        "customer_activity", "churn", "churn_scoring"}


CASES = {
    "unknown_reference": (
        GOOD.replace("dataset: customer_activity", "dataset: customer_activty"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'dataset': unknown dataset 'customer_activty'"),
    "unknown_track": (
        GOOD.replace("track: ml-standard\n  dataset", "track: ml-hgh-risk\n  dataset"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'track': Input should be 'app', 'ml-standard' or "
                                                       "'ml-high-risk' (got 'ml-hgh-risk')"),
    "wrong_type": (
        GOOD.replace("metrics: {roc_auc: 0.65}", "metrics: {roc_auc: high}"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'metrics.roc_auc': Input should be a valid number"),
    "unknown_field": (
        GOOD.replace("trainer: assets", "trainr: x\n  trainer: assets"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'trainr': unknown field"),
    "pii_feature": (
        GOOD.replace("metrics: {roc_auc: 0.65}", "features: [email, plan]").replace(
            "    - {name: plan,", "    - {name: email, dtype: string, pii: true}\n    - {name: plan,"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'features': column 'email' is PII"),
    "unknown_kind": (
        GOOD.replace("type: onepath.Endpoint", "type: onepath.Endpiont"),
        "declaration '?' (team/defs.yaml:", "field 'type': unknown component type 'onepath.Endpiont' (known: "
                                            "onepath.Dataset, onepath.Model, onepath.Endpoint, onepath.AppRelease, "
                                            "onepath.ModelLine)"),
    "endpoint_track_mismatch": (
        GOOD.replace("track: ml-standard\n  model: churn", "track: ml-high-risk\n  model: churn"),
        "declaration 'churn_scoring' (endpoint, team/defs.yaml:", "field 'track': 'ml-high-risk' differs"),
    # tracks come from the policy (assets/policy.yaml): the author no longer picks them
    "unknown_team": (
        GOOD.replace("name: churn\n  owner: retention", "name: churn\n  owner: growth-hackers"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'owner': team 'growth-hackers' is not a team of the "
                                                       "policy (policy "),
    "track_not_allowed": (
        GOOD.replace("track: ml-standard\n  dataset", "track: ml-high-risk\n  dataset")
            .replace("track: ml-standard\n  model: churn", "track: ml-high-risk\n  model: churn"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'track': team 'retention' may not use track "
                                                       "'ml-high-risk' (policy "),
    "credit_decision_on_ml_standard": (
        GOOD.replace("track: ml-standard\n  dataset", "track: ml-standard\n  purpose: credit_decision\n  dataset"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'track': purpose 'credit_decision' needs track "
                                                       "'ml-high-risk' or stricter, not 'ml-standard' (policy "),
    "unknown_purpose": (
        GOOD.replace("track: ml-standard\n  dataset", "track: ml-standard\n  purpose: loan_pricing\n  dataset"),
        "declaration 'churn' (model, team/defs.yaml:", "field 'purpose': unknown purpose 'loan_pricing' (policy "),
    "bad_name": (
        GOOD.replace("name: churn\n", "name: Churn-Model\n"),
        "declaration 'Churn-Model' (model, team/defs.yaml:", "field 'name': 'Churn-Model' is not a valid name"),
}


RULES = {  # the policy rule each track refusal names
    "unknown_team": "teams: credit-risk, digital-lending, model-risk, platform, retention)",
    "track_not_allowed": "teams.retention.tracks is [ml-standard])",
    "credit_decision_on_ml_standard": "purposes.credit_decision.min_track is ml-high-risk)",
    "unknown_purpose": "purposes: credit_decision)",
}


FIELD_LINES = {  # the text on the line an error names: the field's own line, not the declaration's
    "unknown_reference": "dataset: customer_activty", "unknown_track": "track: ml-hgh-risk",
    "wrong_type": "metrics: {roc_auc: high}", "unknown_field": "trainr: x", "pii_feature": "features: [email, plan]",
    "unknown_kind": "type: onepath.Endpiont", "endpoint_track_mismatch": "track: ml-high-risk",
    "unknown_team": "owner: growth-hackers", "track_not_allowed": "track: ml-high-risk",
    "unknown_purpose": "purpose: loan_pricing", "bad_name": "name: Churn-Model",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_yaml_declaration_names_declaration_file_and_field(tmp_path, case):
    text, head, problem = CASES[case]
    assert text != GOOD
    write(tmp_path, {"team/defs.yaml": text})
    line = first_line(tmp_path)
    assert line.startswith(head), line
    assert problem in line, line
    if case in FIELD_LINES:
        n = next(i for i, x in enumerate(text.splitlines(), 1) if FIELD_LINES[case] in x)
        assert f"team/defs.yaml:{n}): " in line, line
    if case in RULES:
        assert f"{ROOT / 'assets' / 'policy.yaml'} {RULES[case]}" in line, line


def test_a_declaration_without_a_track_gets_the_policys():
    org = load_organisation(ROOT / "assets")
    raw = (ROOT / "assets" / "retention" / "defs.yaml").read_text()
    assert re.search(r"name: customer_activity\n  owner: retention +# no track", raw)  # the example leaves it out
    assert org.by_name["customer_activity"].track == "ml-standard"  # retention's only track
    # an endpoint that names none follows its model, purpose included
    assert org.by_name["credit_scoring"].track == "ml-high-risk"
    assert org.by_name["credit_scoring"].purpose == org.by_name["credit_risk"].purpose == "credit_decision"


def test_a_team_with_several_tracks_and_no_default_must_name_one(tmp_path):
    policy = (ROOT / "assets" / "policy.yaml").read_text().replace(
        "retention: {members: [ravi], tracks: [ml-standard]}",
        "retention: {members: [ravi], tracks: [ml-standard, ml-high-risk]}")
    (tmp_path / "policy.yaml").write_text(policy)
    from platform_defs.policy import load_policy

    write(tmp_path, {"team/defs.yaml": GOOD})
    with pytest.raises(DeclarationError) as err:
        load_organisation(tmp_path, load_policy(tmp_path / "policy.yaml"))
    line = str(err.value).splitlines()[0]
    assert line.startswith("declaration 'customer_activity' (dataset, ") and "team/defs.yaml:" in line
    assert "field 'track': no track declared and team 'retention' has no default" in line
    assert "set teams.retention.default_track" in line
    with_default = policy.replace("tracks: [ml-standard, ml-high-risk]}",
                                  "tracks: [ml-standard, ml-high-risk], default_track: ml-standard}")
    (tmp_path / "policy.yaml").write_text(with_default)
    org = load_organisation(tmp_path, load_policy(tmp_path / "policy.yaml"))
    assert org.by_name["customer_activity"].track == "ml-standard"


def test_validate_refuses_an_unknown_team_in_one_line(tmp_path):
    write(tmp_path, {"team/defs.yaml": CASES["unknown_team"][0]})
    out = run_cli("validate", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == "" and "Traceback" not in out.stderr
    line = out.stderr.splitlines()[0]  # then what depends on it, one line each, and the count
    assert "field 'owner': team 'growth-hackers' is not a team of the policy" in line


def test_duplicate_name_across_files(tmp_path):
    write(tmp_path, {"a/defs.yaml": GOOD, "b/defs.yaml": GOOD})
    line = first_line(tmp_path)
    assert line.startswith("declaration 'customer_activity' (dataset, b/defs.yaml:")
    assert "field 'name': duplicate name: already declared in a/defs.yaml:" in line


def test_invalid_yaml_names_file_and_line(tmp_path):
    write(tmp_path, {"t/defs.yaml": "declarations:\n  - kind: model\n    name: [unclosed\n"})
    line = first_line(tmp_path)
    assert line.startswith("declaration '?' (t/defs.yaml:") and "not valid YAML" in line


def test_python_declaration_error_names_the_module(tmp_path):
    write(tmp_path, {"py/declarations.py": """
        from platform_defs.declare import dataset, model
        ds = dataset(name="d1", owner="core", track="ml-standard", generator="m:f",
                     columns=[{"name": "y", "dtype": "int", "role": "label"}])
        m = model(name="m1", owner="core", track="ml-standard", dataset="d1", trainer="m:t", test_size="big")
        DECLARATIONS = [ds, m]
    """})
    line = first_line(tmp_path)
    assert line.startswith("declaration 'm1' (model, ") and "py/declarations.py" in line
    assert "field 'test_size': Input should be a valid number" in line


def test_python_unknown_reference(tmp_path):
    write(tmp_path, {"py/declarations.py": """
        from platform_defs.declare import endpoint
        DECLARATIONS = [endpoint(name="ep", owner="core", track="ml-standard", model="ghost")]
    """})
    line = first_line(tmp_path)
    assert line.startswith("declaration 'ep' (endpoint, ") and "field 'model': unknown model 'ghost'" in line


def test_app_calling_an_environment_the_endpoint_lacks(tmp_path):
    text = GOOD + textwrap.dedent("""\
        ---
        type: onepath.AppRelease
        attributes:
          name: portal
          owner: web
          track: app
          source: apps/x
          entrypoint: x.main:app
          calls: [churn_scoring]
          environments: [staging, prod, dr]
    """)
    write(tmp_path, {"team/defs.yaml": text})
    line = first_line(tmp_path)
    assert "declaration 'portal' (app," in line and "field 'calls.0': endpoint 'churn_scoring' has no environment 'dr'" in line


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform_defs.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_validate_prints_every_problem_one_line_each_and_no_traceback(tmp_path):
    text, _, problem = CASES["unknown_track"]
    write(tmp_path, {"team/defs.yaml": text})
    out = run_cli("validate", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert "Traceback" not in out.stderr
    assert lines[0].startswith("declaration 'churn' (model, team/defs.yaml:25): field 'track'")  # the line of 'track:'
    assert problem in lines[0]
    # what depends on churn is left out with its own line, then the count
    assert lines[1].startswith("declaration 'churn_scoring' (endpoint, team/defs.yaml:")
    assert lines[1].endswith("left out: depends on 'churn', which is broken")
    assert lines[2].startswith("declaration 'customer_activity' (dataset, team/defs.yaml:")
    assert lines[2].endswith("left out: depends on 'churn_scoring', which is broken")
    assert lines[3].startswith("3 problem(s); 0 declarations load") and len(lines) == 4


def test_a_tolerant_load_leaves_out_each_broken_declaration_and_its_dependents_with_one_line_each(tmp_path):
    other = (GOOD.replace(": customer_activity", ": upsell_activity").replace("churn_scoring", "upsell_scoring")
             .replace("name: churn\n", "name: upsell\n").replace("model: churn\n", "model: upsell\n"))
    write(tmp_path, {
        "good/defs.yaml": GOOD,
        # an unknown key on the model: it, its endpoint and the dataset fed by that endpoint are left out
        "other/defs.yaml": other.replace("metrics: {roc_auc: 0.65}", "metrics: {roc_auc: 0.65}\n  colour: red"),
        "yaml/defs.yaml": "declarations:\n  - kind: dataset\n    name: [unclosed\n",
        "trainer/defs.yaml": other.replace("upsell", "xsell").replace("assets.retention.trainer", "assets.nowhere"),
    })
    org = load_organisation(tmp_path, tolerant=True)
    assert sorted(org.by_name) == ["churn", "churn_scoring", "customer_activity"]
    lines = [str(p).splitlines()[0] for p in org.problems]
    assert any(x.startswith("declaration 'upsell' (model, ") and "other/defs.yaml:" in x and "colour" in x for x in lines), lines
    assert any("'upsell_scoring'" in x and x.endswith("depends on 'upsell', which is broken") for x in lines), lines
    assert any("'upsell_activity'" in x and x.endswith("depends on 'upsell_scoring', which is broken") for x in lines)
    assert any("yaml/defs.yaml:" in x and "not valid YAML" in x for x in lines), lines
    assert any(x.startswith("declaration 'xsell' (model") and "module 'assets.nowhere' not found" in x
               for x in lines), lines
    assert len(lines) == 7 and all("\n" not in x for x in lines), lines
    with pytest.raises(DeclarationError):  # not tolerant: the first problem fails the load, as before
        load_organisation(tmp_path)


def test_the_code_location_loads_tolerant_and_its_declarations_check_names_each_problem(tmp_path, settings):
    import dagster as dg

    from platform_defs.definitions import build_definitions

    write(tmp_path, {"good/defs.yaml": GOOD, "bad/defs.yaml": CASES["unknown_reference"][0].replace(
        "customer_activity", "other_activity").replace("churn", "other")})
    defs = build_definitions(org=load_organisation(tmp_path, tolerant=True), settings=settings)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"churn", "churn_scoring_prod", "declarations"} <= keys
    result = dg.materialize([defs.resolve_assets_def("declarations")], raise_on_error=False)
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.check_name == "all_declarations_load"
    assert "declaration 'other' (model" in check.description and "depends on 'other'" in check.description


def test_validate_imports_trainers_a_load_does_not(tmp_path):
    write(tmp_path, {"team/defs.yaml": GOOD.replace("assets.retention.trainer:train_churn", "broken_trainer:train"),
                     "broken_trainer.py": "import not_a_module_anywhere\ndef train(X, y, params):\n    pass\n"})
    sys.path.insert(0, str(tmp_path))
    try:
        assert len(load_organisation(tmp_path, tolerant=True).problems) == 0  # found and defined: loads
    finally:
        sys.path.remove(str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "platform_defs.cli", "validate", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"})
    assert out.returncode == 1
    assert "field 'trainer': importing 'broken_trainer' failed: ModuleNotFoundError" in out.stderr.splitlines()[0]


def test_validate_ok():
    out = run_cli("validate")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok: 7 declarations")


def test_definitions_refuse_to_load_a_bad_organisation(tmp_path, settings):
    from platform_defs.definitions import build_definitions

    write(tmp_path, {"team/defs.yaml": CASES["unknown_reference"][0]})
    with pytest.raises(DeclarationError, match="unknown dataset 'customer_activty'"):
        build_definitions(org=load_organisation(tmp_path), settings=settings)


@pytest.mark.parametrize("replace,problem", [
    ("assets.retention.trainer:train_churn", "field 'trainer': module 'assets.retention.trainr' not found"),
    ("assets.retention.data:generate_customer_activity", "field 'generator': 'generate_activity' is not a function in module"),
])
def test_code_references_must_exist(tmp_path, replace, problem):
    bad = {"assets.retention.trainer:train_churn": "assets.retention.trainr:train_churn",
           "assets.retention.data:generate_customer_activity": "assets.retention.data:generate_activity"}[replace]
    write(tmp_path, {"team/defs.yaml": GOOD.replace(replace, bad)})
    line = first_line(tmp_path)
    assert problem in line and "team/defs.yaml:" in line, line


def test_app_source_folder_must_exist(tmp_path):
    write(tmp_path, {"py/declarations.py": """
        from platform_defs.declare import app
        DECLARATIONS = [app(name="site", owner="web", track="app", source="apps/nowhere",
                            entrypoint="site.main:app")]
    """})
    assert "field 'source': folder 'apps/nowhere' does not exist" in first_line(tmp_path)


def test_an_endpoints_drift_settings_are_checked_against_the_policy_with_file_and_line(tmp_path):
    src = (ROOT / "assets" / "retention" / "defs.yaml").read_text()
    bad = src.replace("  model: churn\n", "  model: churn\n  drift: {numeric_method: kss, window_rows: 500}\n")
    assert bad != src
    write(tmp_path, {"team/defs.yaml": bad})
    out = run_cli("validate", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line, count = out.stderr.splitlines()
    assert count.startswith("1 problem(s); 3 declarations load")
    assert line.startswith("declaration 'churn_scoring' (endpoint, team/defs.yaml:")
    assert "field 'drift.numeric_method'" in line and "(got 'kss')" in line
    both = src.replace("  model: churn\n", "  model: churn\n  drift: {window_rows: 500, window_hours: 2}\n")
    write(tmp_path, {"team/defs.yaml": both})
    out = run_cli("validate", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 1 and "set window_rows or window_hours, not both" in out.stderr


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys; a reviewer reads the first. Both kinds of file refuse it."""
    text = GOOD.replace("  track: ml-standard\n  dataset: customer_activity\n",
                        "  track: ml-standard\n  dataset: customer_activity\n  track: ml-high-risk\n", 1)
    assert text != GOOD
    write(tmp_path, {"t/defs.yaml": text})
    line = first_line(tmp_path)
    assert line.startswith("declaration '?' (t/defs.yaml:")
    assert "duplicate key 'track' (first given at line" in line

    from platform_defs.policy import PolicyError, load_policy

    policy = (ROOT / "assets" / "policy.yaml").read_text()
    first_key = next(ln for ln in policy.splitlines() if ln and not ln.startswith((" ", "#")))
    bad = tmp_path / "policy.yaml"
    bad.write_text(policy + "\n" + first_key + "\n")
    with pytest.raises(PolicyError, match=f"duplicate key '{first_key.rstrip(':').split(':')[0]}'"):
        load_policy(bad)
