"""Custom checks (platform_defs/governance/custom_checks.py): a third-party package installed for real adds a
check to a track through the policy, and it gates a promotion like a built-in one (that end to end, on a world
with churn already trained: test_promotion_flow); a check that misbehaves fails closed; a policy naming a check
nobody provides, or trying to replace a built-in, is refused at load."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from platform_defs.governance.custom_checks import CheckContext, provider, run_custom
from platform_defs.policy import PolicyError, load_policy, parse_policy
from tests.conftest import check_package, pip_install_into

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "assets" / "policy.yaml"
SHOWN = "assets/policy.yaml"


def policy_doc() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def parse(doc: dict):
    """The policy loaded for use, as ``load_policy`` loads a file: structure, then the use-time rules."""
    from platform_defs.policy import use_problem

    policy = parse_policy(yaml.safe_dump(doc, sort_keys=False), SHOWN)
    problem = use_problem(policy)
    if problem is not None:
        raise PolicyError(SHOWN, *problem)
    return policy


def refused(doc: dict) -> str:
    with pytest.raises(PolicyError) as err:
        parse(doc)
    return str(err.value)


# -- the policy at load ---------------------------------------------------------------------------------

def test_a_check_nobody_provides_is_refused_naming_the_file_track_and_check():
    doc = policy_doc()
    doc["tracks"]["ml-standard"]["checks"].append("min_recall")
    assert refused(doc) == (
        "policy assets/policy.yaml: key 'tracks.ml-standard.checks.4': unknown check 'min_recall': not built in and "
        "not declared under custom_checks (a custom check is declared there with function: or entry_point: and "
        "distribution:) (built in for track 'ml-standard': data_quality, performance, no_regression, fairness, "
        "explainability, lineage, drift_ready, rollback_path, approval)")
    doc["custom_checks"] = {"min_recall": {"entry_point": "acme_min_recall"}}
    assert refused(doc) == ("policy assets/policy.yaml: key 'custom_checks.min_recall': entry_point needs "
                            "distribution: (the installed distribution that must provide it; another package's "
                            "entry point of that name never runs)")
    doc["custom_checks"]["min_recall"]["distribution"] = "acme-checks"
    assert refused(doc) == ("policy assets/policy.yaml: key 'tracks.ml-standard.checks.4': custom check 'min_recall': "
                            "distribution 'acme-checks' is not installed with entry point 'acme_min_recall' in group "
                            "'onepath.checks'")
    doc["tracks"]["ml-standard"]["checks"].append("Min-Recall")  # not a check name: one line, not a traceback
    assert "key 'tracks.ml-standard.checks.5': unknown check 'Min-Recall'" in refused(
        {**doc, "custom_checks": {"min_recall": {"function": "tests.fixtures.bad_checks:params_echo"}}})


def test_a_custom_check_cannot_replace_a_built_in_or_gate_what_it_does_not_apply_to():
    doc = policy_doc()
    doc["custom_checks"] = {"performance": {"function": "tests.fixtures.bad_checks:params_echo"}}
    assert refused(doc) == ("policy assets/policy.yaml: key 'custom_checks.performance': 'performance' is a built-in "
                            "check; a custom check cannot replace it (choose another name)")
    doc["custom_checks"] = {"echo": {"function": "tests.fixtures.bad_checks:params_echo", "applies_to": ["model"]}}
    doc["tracks"]["app"]["checks"].append("echo")
    assert refused(doc) == ("policy assets/policy.yaml: key 'tracks.app.checks.3': custom check 'echo' applies to "
                            "model, not to the apps of track 'app' (custom_checks.echo.applies_to)")
    doc["tracks"]["app"]["checks"] = ["security_scan", "performance"]
    assert "key 'tracks.app.checks.1': unknown check 'performance' for track 'app'" in refused(doc)
    doc = policy_doc()
    doc["custom_checks"] = {"echo": {"function": "not an import path"}}
    assert refused(doc).startswith("policy assets/policy.yaml: key 'custom_checks.echo.function': 'not an import "
                                   "path' is not an import path of the form 'package.module:function'")
    doc["custom_checks"] = {"echo": {"function": "a.b:c", "entry_point": "c"}}
    assert refused(doc) == ("policy assets/policy.yaml: key 'custom_checks.echo': set exactly one of "
                            "function and entry_point")
    doc["custom_checks"] = {"echo": {"function": "a.b:c", "timeout": 3}}
    assert refused(doc) == "policy assets/policy.yaml: key 'custom_checks.echo.timeout': unknown key"


# -- the check at run time: fails closed -----------------------------------------------------------------

def _policy_with(**functions: str):
    doc = policy_doc()
    doc["custom_checks"] = {name: {"function": fn, "applies_to": ["app"], "timeout_seconds": 0.5,
                                   "params": {"pass": True}} for name, fn in functions.items()}
    doc["tracks"]["app"]["checks"] += list(functions)
    return parse(doc)


def _ctx(name: str, policy) -> CheckContext:
    return CheckContext(check=name, kind="app", subject="loan_portal", version="r-1", env="staging", track="app",
                        params=policy.custom_checks[name].params, spec=None, build=ROOT)


@pytest.mark.parametrize("fn, why", [
    ("tests.fixtures.bad_checks:raises", "raised RuntimeError: the metrics service is down"),
    ("tests.fixtures.bad_checks:wrong_type", "returned bool, not onepath.Verdict"),
    ("tests.fixtures.bad_checks:bad_verdict", "raised TypeError: Verdict.passed must be a bool, got str"),
    ("tests.fixtures.bad_checks:needs_a_model", "raised TypeError: ctx.estimator is for model checks: "
                                                "'loan_portal' is an app release"),
    ("tests.fixtures.no_such_module:check", "could not be imported: ModuleNotFoundError: No module named "
                                            "'tests.fixtures.no_such_module'"),
    ("tests.fixtures.bad_checks:missing", "could not be imported: AttributeError: module "
                                          "'tests.fixtures.bad_checks' has no attribute 'missing'"),
    ("tests.fixtures.bad_checks:NOT_A_FUNCTION", "is not callable (a int)"),
    ("tests.fixtures.bad_checks:slow", "did not finish within 0.5s (custom_checks.c.timeout_seconds)"),
])
def test_a_check_that_misbehaves_fails_closed_naming_the_check_and_its_function(fn, why):
    from tests.fixtures import bad_checks

    policy = _policy_with(c=fn)
    bad_checks.RELEASE.clear()
    try:
        v = run_custom(policy, "c", _ctx("c", policy))
    finally:
        bad_checks.RELEASE.set()
    assert (v.check, v.passed) == ("c", False)
    assert v.summary == f"custom check 'c' ({fn}) {why}"
    assert "\n" not in v.summary and v.metadata["check_function"] == fn


def test_a_verdict_is_recorded_like_a_built_ins_and_cannot_restate_the_version():
    from platform_defs.factories import check_results

    policy = _policy_with(echo="tests.fixtures.bad_checks:params_echo")
    v = run_custom(policy, "echo", _ctx("echo", policy))
    assert (v.passed, v.summary) == (True, "judged loan_portal r-1 for staging")
    (result,) = check_results([v], "r-1", "release")
    meta = {k: getattr(m, "value", m) for k, m in result.metadata.items()}
    assert result.check_name == "echo" and result.passed and result.severity == dg.AssetCheckSeverity.ERROR
    assert meta["release_version"] == "r-1" and meta["verdict"] == v.summary and meta["n"] == 3
    assert meta["check_function"] == "tests.fixtures.bad_checks:params_echo" and meta["provided_by"] == "policy"
    v = run_custom(policy, "echo", _ctx("echo", policy))
    (result,) = check_results([v], "r-1", "model")
    assert result.metadata["model_version"].value == "r-1"  # the check's own "model_version" metric does not win


# -- a third-party package, installed for real (``acme``, conftest) -----------------------------------

def test_an_installed_package_provides_a_check_but_never_a_built_in(acme):
    doc = policy_doc()
    doc["tracks"]["ml-standard"]["checks"].append("min_recall")
    assert "unknown check 'min_recall': not built in and not declared" in refused(doc)  # installed is not enough
    doc["custom_checks"] = {"min_recall": {"entry_point": "min_recall", "distribution": "acme_checks"}}
    policy = parse(doc)  # loads now: the named distribution provides min_recall
    found = provider(policy, "min_recall")
    assert found.provided_by == "acme-checks==1.0.0"
    assert found.function == "acme_checks:min_recall (entry point onepath.checks:min_recall)"
    doc["custom_checks"]["min_recall"]["version"] = "2.0"  # pinned to another release: refused at load
    assert refused(doc) == ("policy assets/policy.yaml: key 'custom_checks.min_recall': custom check 'min_recall' "
                            "(acme_checks:min_recall (entry point onepath.checks:min_recall)) is not the pinned "
                            "distribution: custom_checks.min_recall.version expects acme_checks==2.0, found "
                            "acme-checks==1.0.0")
    from platform_defs.governance.custom_checks import describe
    from platform_defs.governance.gates import DESCRIPTIONS

    # the package's 'performance' is never consulted: built-in names are the built-ins
    assert describe(policy, "performance") == DESCRIPTIONS["performance"]
    assert "unlisted" not in {c for t in policy.tracks.values() for c in t.checks}


def test_an_app_tracks_custom_check_runs_in_the_app_gate_after_the_built_ins(tmp_path):
    """The app gate runs the policy's custom check for the release and environment, beside security_scan."""
    import shutil

    from platform_defs.governance.gates import AppGate
    from platform_defs.loader import load_organisation

    policy = _policy_with(echo="tests.fixtures.bad_checks:params_echo")
    build = tmp_path / "r-test"
    shutil.copytree(ROOT / "apps" / "loan_portal", build, ignore=shutil.ignore_patterns("__pycache__"))
    gate = AppGate(app=load_organisation(ROOT / "assets").by_name["loan_portal"], policy=policy, ledger=None,
                   deployer=None, source_dir=ROOT / "apps" / "loan_portal", repo_root=ROOT)
    assert gate.required("staging") == ["security_scan", "echo"]
    scan, echo = gate.evaluate("r-test", build, "staging")
    assert scan.check == "security_scan" and scan.passed
    assert (echo.check, echo.passed, echo.summary) == ("echo", True, "judged loan_portal r-test for staging")


def test_custom_checks_run_after_every_built_in_on_copies_never_the_gates_objects(tmp_path):
    """A custom check listed first still runs after the built-ins (so patching them at run time changes no
    verdict of this gate), results stay in the policy's order, and what it edits is its own copy."""
    import shutil

    import pandas as pd
    from sklearn.dummy import DummyClassifier

    from platform_defs.governance.custom_checks import Copies
    from platform_defs.governance.gates import AppGate
    from platform_defs.loader import load_organisation

    policy = _policy_with(patch="tests.fixtures.bad_checks:patches_the_built_ins")
    app = policy.tracks["app"].model_copy(update={"checks": ["patch", "security_scan"]})
    policy = policy.model_copy(update={"tracks": {**policy.tracks, "app": app}})
    build = tmp_path / "r-test"
    shutil.copytree(ROOT / "apps" / "loan_portal", build, ignore=shutil.ignore_patterns("__pycache__"))
    (build / "leak.py").write_text('PASSWORD = "hunter2-but-longer-and-random-Zx81Qw"\nimport pickle, subprocess\n'
                                   'subprocess.call("rm -rf /tmp/x", shell=True)\n')
    gate = AppGate(app=load_organisation(ROOT / "assets").by_name["loan_portal"], policy=policy, ledger=None,
                   deployer=None, source_dir=ROOT / "apps" / "loan_portal", repo_root=ROOT)
    original = AppGate._check_security_scan
    try:
        patch, scan = gate.evaluate("r-test", build, "staging")
    finally:
        AppGate._check_security_scan = original
    assert (patch.check, patch.passed) == ("patch", True)
    assert (scan.check, scan.passed) == ("security_scan", False) and scan.summary != "patched"

    X = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0]})
    y = pd.Series([0, 1, 0, 1])

    class Candidate:  # the gate's cached version, in shape
        gate = "the gate"
        estimator = DummyClassifier().fit(X, y)
        held_out = (X, y, X)

    candidate = Candidate()
    params = {"min": 0.5}
    ctx = CheckContext(check="e", kind="model", subject="m", version="1", env="staging", track="ml-standard",
                       params=params, spec=None, _version=Copies(candidate))
    from tests.fixtures.bad_checks import edits_what_it_is_given

    assert edits_what_it_is_given(ctx).passed
    assert X["a"].tolist() == [1.0, 2.0, 3.0, 4.0] and not hasattr(candidate.estimator, "fitted_")
    assert params == {"min": 0.5} and not hasattr(ctx._v, "gate")
    assert ctx.held_out[0]["a"].tolist() == [0, 0, 0, 0]  # its own copy, kept for that check


def test_a_trainer_from_an_installed_package_is_declared_through_onepath_trainers(acme, tmp_path):
    """``trainer: "onepath.trainers:acme_logistic"`` resolves through the package's entry point: the declaration
    loads (and validate's import check passes), the trainer trains, and its code hash is the package's file; a
    name nobody provides is the declaration's one-line trainer problem."""
    import shutil

    import pandas as pd

    from platform_defs.factories import code_hash, import_string
    from platform_defs.loader import load_organisation

    policy = load_policy()
    declarations = tmp_path / "assets"
    shutil.copytree(ROOT / "assets" / "retention", declarations / "retention")
    defs = declarations / "retention" / "defs.yaml"
    text = defs.read_text()
    assert "assets.retention.trainer:train_churn" in text
    defs.write_text(text.replace("assets.retention.trainer:train_churn", "onepath.trainers:acme_logistic"))
    org = load_organisation(declarations, policy, tolerant=True, check_imports=True)
    assert org.problems == [] and org.by_name["churn"].trainer == "onepath.trainers:acme_logistic"
    trainer = import_string(org.by_name["churn"].trainer)
    X = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0] * 5, "b": ["x", "y"] * 10})
    y = pd.Series([0, 0, 1, 1] * 5)
    assert trainer(X, y, {"C": 0.5}).predict(X).tolist() == y.tolist()
    assert code_hash(trainer)[1].endswith("acme_checks/__init__.py")
    defs.write_text(text.replace("assets.retention.trainer:train_churn", "onepath.trainers:acme_nothing"))
    (problem, *_) = load_organisation(declarations, policy, tolerant=True, check_imports=True).problems
    assert str(problem).splitlines()[0].endswith(
        "field 'trainer': no installed package provides trainer 'acme_nothing' in entry-point group "
        "'onepath.trainers'"), str(problem)


def test_a_second_package_offering_the_name_never_stands_in_for_the_declared_distribution(acme, tmp_path):
    """A second package offering 'min_recall' cannot quietly take over the check the policy names: the policy
    names the distribution, and only that distribution's entry point runs."""
    src = check_package(tmp_path / "rival", "rival-checks", {"min_recall": "rival_checks:min_recall"},
                        ["rival_checks"])
    (src / "rival_checks").mkdir()
    (src / "rival_checks" / "__init__.py").write_text(
        "import onepath\n\n\ndef min_recall(ctx):\n    return onepath.Verdict(True, 'always')\n")
    target = pip_install_into(tmp_path / "site", src)
    doc = policy_doc()
    doc["tracks"]["ml-standard"]["checks"].append("min_recall")
    doc["custom_checks"] = {"min_recall": {"entry_point": "min_recall", "distribution": "acme-checks"}}
    sys.path.insert(0, str(target))  # installed after the policy was written, in the same process: seen
    try:
        assert provider(parse(doc), "min_recall").provided_by == "acme-checks==1.0.0"
        doc["custom_checks"]["min_recall"]["distribution"] = "rival-checks"
        assert provider(parse(doc), "min_recall").provided_by == "rival-checks==0.1"
        doc["custom_checks"]["min_recall"]["distribution"] = "other-checks"
        assert refused(doc) == (
            "policy assets/policy.yaml: key 'tracks.ml-standard.checks.4': custom check 'min_recall': distribution "
            "'other-checks' is not installed with entry point 'min_recall' in group 'onepath.checks' (provided by "
            "acme-checks==1.0.0, rival-checks==0.1)")
    finally:
        sys.path.remove(str(target))


# -- a check's code is never a team's file (no boundary against team Python), and pinned by the policy -

def test_a_check_module_under_the_declarations_folder_is_refused_at_load_and_at_run_time(monkeypatch):
    """A team writes the declarations folder: a check from there could return Verdict(True) or patch the
    built-ins when imported. It is refused without being imported, at load and in the gate."""
    doc = policy_doc()
    doc["custom_checks"] = {"min_recall": {"function": "assets.retention.trainer:train_churn"}}
    doc["tracks"]["ml-standard"]["checks"].append("min_recall")
    why = ("custom check 'min_recall' (assets.retention.trainer:train_churn): assets/retention/trainer.py is under "
           "the declarations folder, which teams write; a custom check comes from an installed package or a "
           "platform-owned module outside it")
    assert refused(doc) == f"policy assets/policy.yaml: key 'tracks.ml-standard.checks.4': {why}"
    policy = _policy_with(c="tests.fixtures.bad_checks:params_echo")  # loads: tests/ is not a declarations folder
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(ROOT / "tests"))  # ... until it is
    sys.modules.pop("tests.fixtures.bad_checks", None)
    v = run_custom(policy, "c", _ctx("c", policy))
    assert (v.passed, v.summary) == (False, "custom check 'c' (tests.fixtures.bad_checks:params_echo): "
                                            "tests/fixtures/bad_checks.py is under the declarations folder, which "
                                            "teams write; a custom check comes from an installed package or a "
                                            "platform-owned module outside it")
    assert "tests.fixtures.bad_checks" not in sys.modules  # refused before importing it
    monkeypatch.delenv("ONEPATH_DECLARATIONS_DIR")  # `onepath validate tests/`: the folder validated counts too
    from platform_defs.governance.custom_checks import importable_problems

    (problem,) = importable_problems(policy, ROOT / "tests")
    assert problem.endswith("tests/fixtures/bad_checks.py is under the declarations folder, which teams write; a "
                            "custom check comes from an installed package or a platform-owned module outside it")
    assert importable_problems(policy) == [] and importable_problems(policy, ROOT / "assets") == []


def test_a_team_module_found_by_any_finder_is_refused_like_one_on_sys_path(tmp_path, monkeypatch):
    """An editable install maps packages with a finder on sys.meta_path, not sys.path: the refusal follows
    the import system, so a declarations folder reached that way is refused too, unimported."""
    import importlib.util

    declarations = tmp_path / "assets"
    (declarations / "retention").mkdir(parents=True)
    (declarations / "retention" / "teamcheck.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(declarations))

    class Editable:  # what setuptools' editable finder does: a name mapped to a file
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "onepath_team_code":
                return importlib.util.spec_from_file_location(name, declarations / "retention" / "teamcheck.py")
            return None

    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Editable()])
    with pytest.raises(PolicyError, match="teamcheck.py is under the declarations folder"):
        _policy_with(c="onepath_team_code:ok")  # refused at load
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(tmp_path / "elsewhere"))
    policy = _policy_with(c="onepath_team_code:ok")  # loaded while it was not a declarations folder ...
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(declarations))  # ... refused in the gate once it is
    found = provider(policy, "c")
    assert isinstance(found, str) and "teamcheck.py is under the declarations folder, which teams write" in found
    v = run_custom(policy, "c", _ctx("c", policy))
    assert not v.passed and "is under the declarations folder" in v.summary
    assert "onepath_team_code" not in sys.modules


def test_a_pinned_sha256_that_no_longer_matches_fails_the_check_closed(tmp_path, monkeypatch):
    module = tmp_path / "platform_checks_pin.py"
    module.write_text("import onepath\n\n\ndef ok(ctx):\n    return onepath.Verdict(True, 'fine')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pinned = hashlib.sha256(module.read_bytes()).hexdigest()
    policy = _policy_with(c="platform_checks_pin:ok")
    policy = policy.model_copy(update={"custom_checks": {"c": policy.custom_checks["c"].model_copy(
        update={"sha256": pinned})}})
    v = run_custom(policy, "c", _ctx("c", policy))
    assert (v.passed, v.metadata["check_sha256"]) == (True, pinned)
    module.write_text(module.read_text().replace("True", "False") + "# changed\n")  # the file changed since
    found = hashlib.sha256(module.read_bytes()).hexdigest()
    v = run_custom(policy, "c", _ctx("c", policy))
    assert (v.passed, v.summary) == (False, f"custom check 'c' (platform_checks_pin:ok) is not the pinned code: "
                                            f"custom_checks.c.sha256 expects {pinned}, found {found}")
    assert v.metadata["check_sha256"] == found
    doc = policy_doc()
    doc["custom_checks"] = {"c": {"function": "platform_checks_pin:ok", "sha256": pinned}}
    doc["tracks"]["ml-standard"]["checks"].append("c")
    assert refused(doc) == (f"policy assets/policy.yaml: key 'custom_checks.c': custom check 'c' "
                            f"(platform_checks_pin:ok) is not the pinned code: custom_checks.c.sha256 expects "
                            f"{pinned}, found {found}")


def test_a_recorded_policy_naming_an_uninstalled_package_still_verifies_as_a_chain(acme, tmp_path):
    """History is re-parsed structurally: uninstalling the package a recorded policy names (or a rule added
    since) does not break the recorded chain; only loading that policy for use refuses it."""
    import importlib

    from platform_defs.policy_record import recorded_policies
    from resources.ledger import Ledger
    from tests.conftest import record_policy

    doc = policy_doc()
    doc["tracks"]["ml-standard"]["checks"].append("min_recall")
    doc["custom_checks"] = {"min_recall": {"entry_point": "min_recall", "distribution": "acme-checks"}}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    book = Ledger(tmp_path / "ledger.db", tmp_path / "keys" / "platform.key")
    record_policy(book, path=path)
    sys.path.remove(str(acme))  # the package is uninstalled (an auditor's machine never had it)
    importlib.invalidate_caches()
    try:
        (record,) = recorded_policies(book)
        assert record.policy.custom_checks["min_recall"].distribution == "acme-checks"
        with pytest.raises(PolicyError, match="distribution 'acme-checks' is not installed"):
            load_policy(path)
    finally:
        sys.path.insert(0, str(acme))
        importlib.invalidate_caches()


def test_a_check_module_may_use_dataclasses_and_type_hints_like_any_module(tmp_path, monkeypatch):
    """The gate runs a fresh module made of the checked bytes; while it runs it is sys.modules' entry for its
    name, so what looks its module up there (a dataclass under ``from __future__ import annotations``,
    typing.get_type_hints) works, and the entry before is put back after."""
    (tmp_path / "platform_checks_typed.py").write_text(
        "from __future__ import annotations\n\nimport typing\nfrom dataclasses import dataclass\n\nimport onepath\n\n\n"
        "@dataclass\nclass Limit:\n    floor: float\n\n\nHINTS = typing.get_type_hints(Limit)\n\n\n"
        "def ok(ctx):\n    return onepath.Verdict(Limit(0.5).floor == 0.5, f'hints {sorted(HINTS)}')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "platform_checks_typed", raising=False)
    policy = _policy_with(c="platform_checks_typed:ok")
    v = run_custom(policy, "c", _ctx("c", policy))
    assert (v.passed, v.summary) == (True, "hints ['floor']"), v
    assert "platform_checks_typed" not in sys.modules  # nothing imported it: nothing left behind


def test_the_code_that_judges_is_the_code_hashed_never_an_older_import(tmp_path, monkeypatch):
    """A long-lived process imported a check module, then the file changed and the policy pinned the new file:
    the new bytes judge and their hash is recorded (the module imported earlier is not reused); a pin of the
    old bytes fails closed naming expected and found; and what runs is the file that one lookup found and
    hashed, not one a later lookup would find."""
    import importlib

    from platform_defs.governance.custom_checks import load, source_of

    module = tmp_path / "platform_checks_stale.py"
    a = "import onepath\n\n\ndef ok(ctx):\n    return onepath.Verdict(False, 'old code: fails')\n"
    b = "import onepath\n\n\ndef ok(ctx):\n    return onepath.Verdict(True, 'new code: passes')\n"
    sha_a, sha_b = (hashlib.sha256(t.encode()).hexdigest() for t in (a, b))
    module.write_text(a)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "platform_checks_stale", raising=False)
    imported = importlib.import_module("platform_checks_stale")  # the process imported A
    base = _policy_with(c="platform_checks_stale:ok")

    def pinned(digest: str):
        return base.model_copy(update={"custom_checks": {"c": base.custom_checks["c"].model_copy(
            update={"sha256": digest})}})

    v = run_custom(pinned(sha_a), "c", _ctx("c", pinned(sha_a)))
    assert (v.passed, v.summary, v.metadata["check_sha256"]) == (False, "old code: fails", sha_a)
    module.write_text(b)  # the file changed; the policy pins the new file
    v = run_custom(pinned(sha_b), "c", _ctx("c", pinned(sha_b)))
    assert (v.passed, v.summary, v.metadata["check_sha256"]) == (True, "new code: passes", sha_b)
    v = run_custom(pinned(sha_a), "c", _ctx("c", pinned(sha_a)))
    assert (v.passed, v.summary, v.metadata["check_sha256"]) == (
        False, f"custom check 'c' (platform_checks_stale:ok) is not the pinned code: custom_checks.c.sha256 "
               f"expects {sha_a}, found {sha_b}", sha_b)
    assert sys.modules["platform_checks_stale"] is imported and imported.ok(None).reason == "old code: fails"

    found = provider(pinned(sha_b), "c")  # the one lookup ...
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "platform_checks_stale.py").write_text(a.replace("old code", "a file created since"))
    monkeypatch.syspath_prepend(str(shadow))  # ... then a file earlier on the path, and nothing imported
    monkeypatch.delitem(sys.modules, "platform_checks_stale")
    assert load(found, source_of(found))(None).reason == "new code: passes"
    assert "platform_checks_stale" not in sys.modules


def test_an_entry_point_naming_a_module_under_the_declarations_folder_is_refused_unimported(tmp_path, monkeypatch):
    """An installed package's entry point can name any module: one whose file lies under the declarations
    folder (teams write it) is refused like a ``function:`` there, at load, in validate and in the gate,
    located without being imported."""
    from platform_defs.governance.custom_checks import importable_problems

    declarations = tmp_path / "assets"
    declarations.mkdir()
    (declarations / "team_sneak.py").write_text("raise SystemExit('imported')\n")
    # metadata only: its entry point names the team's module
    target = pip_install_into(tmp_path / "site", check_package(tmp_path / "sneak", "sneak-checks",
                                                               {"sneak": "team_sneak:ok"}, []))
    monkeypatch.syspath_prepend(str(target))
    monkeypatch.syspath_prepend(str(declarations))  # team_sneak is importable, from the declarations folder
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(declarations))
    why = ("custom check 'sneak' (team_sneak:ok (entry point onepath.checks:sneak)): "
           f"{declarations / 'team_sneak.py'} is under the declarations folder, which teams write; a custom check "
           "comes from an installed package or a platform-owned module outside it")
    doc = policy_doc()
    doc["custom_checks"] = {"sneak": {"entry_point": "sneak", "distribution": "sneak-checks", "applies_to": ["app"]}}
    doc["tracks"]["app"]["checks"].append("sneak")
    assert refused(doc) == f"policy assets/policy.yaml: key 'tracks.app.checks.3': {why}"
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(tmp_path / "elsewhere"))
    policy = parse(doc)  # loaded while it was not a declarations folder ...
    (problem,) = importable_problems(policy, declarations)  # ... `onepath validate` of that folder refuses it
    assert problem.endswith(why)
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(declarations))  # ... and so does the gate once it is one
    v = run_custom(policy, "sneak", CheckContext(check="sneak", kind="app", subject="loan_portal", version="r-1",
                                                 env="staging", track="app", params={}, spec=None, build=ROOT))
    assert (v.passed, v.summary) == (False, why)
    assert "team_sneak" not in sys.modules


def test_an_app_check_writes_a_copy_of_the_release_never_the_release_that_serves(tmp_path):
    """Built-ins run first, so a file a custom check added to the release would be served unscanned: an app
    check is given a copy of the build, removed after, and the release folder stays as the built-ins saw it."""
    import shutil

    from platform_defs.governance.gates import AppGate
    from platform_defs.loader import load_organisation

    policy = _policy_with(writes="tests.fixtures.bad_checks:writes_into_the_build")
    build = tmp_path / "r-test"
    shutil.copytree(ROOT / "apps" / "loan_portal", build, ignore=shutil.ignore_patterns("__pycache__"))
    before = {p.relative_to(build): p.read_bytes() for p in build.rglob("*") if p.is_file()}
    gate = AppGate(app=load_organisation(ROOT / "assets").by_name["loan_portal"], policy=policy, ledger=None,
                   deployer=None, source_dir=ROOT / "apps" / "loan_portal", repo_root=ROOT)
    scan, writes = gate.evaluate("r-test", build, "staging")
    assert scan.passed and (writes.check, writes.passed) == ("writes", True)
    written = Path(writes.summary.removeprefix("wrote "))
    assert written.name == "injected.py" and written.parent.name == "r-test" and not written.is_relative_to(build)
    assert not written.parent.exists()  # the copy is removed after the check
    assert {p.relative_to(build): p.read_bytes() for p in build.rglob("*") if p.is_file()} == before
