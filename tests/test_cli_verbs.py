"""The ``onepath`` group: each verb's module is imported only when that verb runs, and ``platform_defs.cli.VERBS``
is the one place of every verb's help (fresh processes, no platform)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from platform_defs.cli import VERBS, onepath

ROOT = Path(__file__).resolve().parents[1]
VERB_MODULES = {module for module, _, _ in VERBS.values()}


def fresh(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -X importtime -m platform_defs.cli *argv``: its result and the verb modules it imported."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "platform_defs.cli", *argv], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    names = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return out, names & VERB_MODULES


def test_every_verb_loads_with_the_help_of_the_table_only():
    ctx = click.Context(onepath)
    for name, (module, attr, help_text) in VERBS.items():
        cmd = onepath.get_command(ctx, name)
        assert cmd is not None and cmd.name == name and cmd.help == help_text, name
    assert set(onepath.list_commands(ctx)) == set(VERBS) | {"up", "status", "validate", "down"}


def test_a_verb_with_its_own_help_is_refused(monkeypatch):
    """Two places for one help would drift apart: a verb module's command carrying its own is an error."""
    from platform_defs import cli_why

    monkeypatch.setattr(cli_why.why, "help", "a second help")
    group = type(onepath)("t", lazy={"why": VERBS["why"]})
    with pytest.raises(RuntimeError, match="without a help of its own"):
        group.get_command(click.Context(group), "why")


def test_help_lists_every_verb_without_importing_one():
    out, loaded = fresh("--help")
    assert out.returncode == 0 and loaded == set(), sorted(loaded)
    listed = {line.split()[0]: " ".join(line.split()[1:]) for line in out.stdout.split("Commands:")[1].splitlines()
              if line.strip()}
    ctx = click.Context(onepath)
    width = click.HelpFormatter().width
    limit = width - 6 - max(len(n) for n in listed)
    assert listed == {n: onepath.get_command(ctx, n).get_short_help_str(limit) for n in onepath.list_commands(ctx)}


def test_a_verb_imports_its_own_module_only():
    out, loaded = fresh("inventory", "--help")
    assert out.returncode == 0 and "every endpoint and app release per environment" in out.stdout
    assert loaded == {"platform_defs.cli_inventory"}
    out, loaded = fresh("access", "--help")
    assert out.returncode == 0 and "Grants and credentials" in out.stdout and "reconcile" in out.stdout
    assert loaded == {"platform_defs.cli_access"}


def test_a_misspelt_verb_is_suggested():
    out, loaded = fresh("inventori")
    assert out.returncode == 2 and "Did you mean 'inventory'?" in out.stderr and loaded == set()


def test_card_prints_a_versions_card_and_writes_its_page(tmp_path, monkeypatch):
    """`onepath card`: the card a deploy wrote into the version's run, printed and saved; one line otherwise."""
    from platform_defs.settings import load_settings
    from platform_defs.wiring import build_resources

    env = {**os.environ, "ONEPATH_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DAGSTER_HOME"):
        env.pop(k, None)

    def card(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "platform_defs.cli", "card", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    never = card("churn")
    assert never.returncode == 1 and never.stderr.strip() == (
        "onepath card: no version of churn was ever deployed, so no card was written; name one with --version")
    assert card("nosuch").stderr.strip().startswith("onepath card: no model 'nosuch' is declared (models: ")

    monkeypatch.setenv("ONEPATH_HOME", env["ONEPATH_HOME"])  # the card a deploy would have written, in that home
    registry = build_resources(load_settings())["mlflow"]
    client = registry.client()
    run = client.create_run(client.create_experiment("cards")).info.run_id
    (tmp_path / "c").mkdir()
    for ext, text in (("md", "# Model card: churn v1\n"), ("html", "<html><body>churn v1</body></html>")):
        (tmp_path / "c" / f"model_card-churn-v1.{ext}").write_text(text)
        registry.log_run_artifact(run, tmp_path / "c" / f"model_card-churn-v1.{ext}", "onepath/model_card")
    client.create_registered_model("churn")
    client.create_model_version("churn", f"runs:/{run}/model", run_id=run)
    shown = card("churn", "--version", "1", "--html", "page.html")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "# Model card: churn v1\n"
    assert (tmp_path / "page.html").read_text() == "<html><body>churn v1</body></html>"
    assert card("churn", "--version", "2").stderr.strip() == "onepath card: churn has no version 2"


def test_a_refused_step_is_shown_as_the_platforms_own_line_not_an_internal_class_name():
    from platform_defs.cli_runs import describe

    def failed(first: str) -> str | None:
        return describe({"type": "ExecutionStepFailureEvent", "step": "loan_portal_prod", "error": [first],
                         "message": ""})

    # the gate's refusal is raised as dagster.Failure, whose class Dagster reports by its private module path
    assert failed("dagster._core.definitions.events.Failure: loan_portal.prod: version r-1 refused") == \
        "step loan_portal_prod FAILED: loan_portal.prod: version r-1 refused"
    assert failed("ValueError: boom") == "step loan_portal_prod FAILED: ValueError: boom"  # a bug keeps its name
