"""Declarations that change while the platform runs, on one real `onepath up` with its own declarations
folder (started once for this file). By hand: adding a declaration shows it in the UI with no restart;
breaking one leaves it (and what depends on it) out with its error on the `declarations` asset and its
failing check while the rest stays, a sensor keeps ticking and an endpoint deployed before keeps answering;
fixing it brings it back. From a notebook: the data scientist's three steps as docs/guides/data-scientist.md
says them, its own blocks run in a real Jupyter kernel and a terminal (`onepath.register` writes the
declaration, a second version arrives, `onepath promote fraud --to prod` deploys the registered one, the
endpoint answers with the kernel's predictions); then docs/guides/auditor.md's commands on what it promoted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import (_free_port_base, model_release, onepath_env, save_credit_model, start_onepath_up,
                            wait_for)
from tests.test_platform_up import free_port, gql

ROOT = Path(__file__).resolve().parents[1]
RETENTION = (ROOT / "assets" / "retention" / "defs.yaml").read_text()
# a second line of the retention shape, under other names
UPSELL = (RETENTION.replace(": customer_activity", ": upsell_activity").replace("churn_scoring", "upsell_scoring")
          .replace("name: churn\n", "name: upsell\n").replace("model: churn\n", "model: upsell\n"))
NODES = """{ workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename
  ... on PythonError { message } ... on RepositoryLocation { repositories { name
    sensors { name sensorState { ticks(limit: 1) { timestamp } } }
    assetNodes { assetKey { path } description } } } } } } } }"""
CHECK_RUNS = """query($key: AssetKeyInput!) { assetCheckExecutions(assetKey: $key, checkName: "all_declarations_load",
  limit: 5) { status evaluation { success description } } }"""


def repo(port: int) -> dict:
    entry = gql(port, NODES)["workspaceOrError"]["locationEntries"][0]
    loc = entry["locationOrLoadError"]
    assert loc["__typename"] == "RepositoryLocation", loc
    return loc["repositories"][0]


def keys(port: int) -> set[str]:
    return {"/".join(a["assetKey"]["path"]) for a in repo(port)["assetNodes"]}


def declarations_node(port: int) -> dict:
    return next(a for a in repo(port)["assetNodes"] if a["assetKey"]["path"] == ["declarations"])


def last_tick(port: int, sensor: str) -> float | None:
    s = next(s for s in repo(port)["sensors"] if s["name"] == sensor)
    ticks = s["sensorState"]["ticks"]
    return ticks[0]["timestamp"] if ticks else None


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("live")
    decl = tmp_path / "declarations"
    (decl / "retention").mkdir(parents=True)
    (decl / "retention" / "defs.yaml").write_text(RETENTION)
    port = free_port()
    proc = start_onepath_up(onepath_env(tmp_path / "home", port, decl), tmp_path / "up.log")

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        try:
            return "churn" in keys(port)
        except (httpx.HTTPError, AssertionError, StopIteration, IndexError, KeyError, TypeError):
            return False

    wait_for("onepath up serves its code location", up, seconds=240, poll=0.5)
    yield port, decl, tmp_path
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=90)
    from resources.deployers.local import LocalProcessDeployer

    LocalProcessDeployer(tmp_path / "home" / "run").stop_all()  # what the platform deployed serves on without it


@pytest.fixture()
def endpoint(tmp_path):
    """A model endpoint serving before any declaration changes (its own local deployer)."""
    from resources.deployers.base import Target
    from resources.deployers.resource import LocalDeployerResource

    run_dir = tmp_path / "ep-run"
    deployer = LocalDeployerResource(run_dir=str(run_dir), port_base=_free_port_base(),
                                     inference_log_dir=str(run_dir / "logs"),
                                     artifact_roots=[str(tmp_path)]).deployer()
    model = save_credit_model(tmp_path / "model")
    status = deployer.deploy(Target("rl_scoring", "staging", "endpoint", None), model_release("1", model, {"model_name": "rl_model", "pii_columns": []}))
    assert status.healthy, status
    yield status.address
    deployer.stop_all()


def test_declarations_reload_while_the_platform_runs(running, endpoint):
    port, decl, tmp_path = running
    answers = lambda: httpx.get(f"{endpoint}/health", timeout=10).status_code == 200  # noqa: E731
    assert answers()
    assert "none left out" in declarations_node(port)["description"]

    # add a declaration: it appears with no restart
    (decl / "upsell").mkdir()
    written = time.monotonic()
    (decl / "upsell" / "defs.yaml").write_text(UPSELL)
    wait_for("the new declaration in the UI", lambda: {"upsell", "upsell_scoring_prod"} <= keys(port), 120, 0.2)
    seen = time.monotonic() - written
    print(f"\nadded declaration visible in the UI {seen:.1f} s after the write")
    (tmp_path / "reload_latency.txt").write_text(f"{seen:.2f}\n")

    # break it (an unknown key): it and what depends on it are left out, the rest stays
    tick_before = wait_for("a supervisor_events tick", lambda: last_tick(port, "supervisor_events"), 120, 0.5)
    written = time.monotonic()
    (decl / "upsell" / "defs.yaml").write_text(UPSELL.replace("metrics: {roc_auc: 0.65}",
                                                                   "metrics: {roc_auc: 0.65}\n  colour: red"))
    wait_for("the broken declaration left out", lambda: "upsell" not in keys(port), 120, 0.2)
    print(f"broken declaration left out {time.monotonic() - written:.1f} s after the write")
    now = keys(port)
    assert {"customer_activity", "churn", "churn_scoring_prod", "declarations"} <= now
    assert not {"upsell_scoring_staging", "upsell_scoring_prod", "upsell_activity"} & now  # depend on upsell
    desc = declarations_node(port)["description"]
    assert "declaration 'upsell' (model" in desc and "colour" in desc, desc
    assert "left out: depends on 'upsell', which is broken" in desc, desc

    def failed_check():
        runs = gql(port, CHECK_RUNS, {"key": {"path": ["declarations"]}})["assetCheckExecutions"]
        return next((r for r in runs if r["evaluation"] and not r["evaluation"]["success"]), None)

    failing = wait_for("the declarations check failing", failed_check, 240, 1.0)
    assert "declaration 'upsell'" in failing["evaluation"]["description"], failing
    wait_for("supervisor_events ticking after the reload",
             lambda: (last_tick(port, "supervisor_events") or 0) > tick_before, 120, 0.5)
    assert answers()

    # fix it: it comes back
    (decl / "upsell" / "defs.yaml").write_text(UPSELL)
    wait_for("the fixed declaration back", lambda: {"upsell", "upsell_scoring_prod"} <= keys(port), 120, 0.2)
    assert "none left out" in declarations_node(port)["description"]
    assert answers()
    log = (tmp_path / "up.log").read_text()
    assert "reloaded: 3 declarations, 3 left out: declaration 'upsell'" in log, log[-3000:]


# --------------------------------------------------------------------------------------------
# The data scientist's three steps, from a real Jupyter kernel, on the running platform


# The guide's blocks run in order in one real Jupyter kernel (python) and a terminal (console), on this module's
# platform: the guide is what is tested (tests/guide_runner.py LIVE_GUIDES names the test that runs each guide).

# a second version arrives between step 1 and step 2 (registered elsewhere: the pin stays on the first); it
# uses the guide's names (model, registered, df_train, df_test)
SECOND_VERSION = """other = LogisticRegression(C=0.01).fit(df_train[["amount"]].assign(hour=0.0), df_train.is_fraud)
second = onepath.register(other, train=df_train, test=df_test, label="is_fraud", name="fraud", owner="retention",
                          protected=["age_band"], identity="carla", key="assets/demo_identities/carla.key",
                          declarations=@SCRATCH@)
probe = df_test.head(20)[["amount", "hour"]]
import json
print(json.dumps({"first": registered.version, "second": second.version, "decl": str(registered.declaration),
                  "next": registered.next, "probe": probe.to_dict(orient="records"),
                  "proba": model.predict_proba(probe)[:, 1].tolist()}))"""
# after the guide's step 3: what onepath.predict answered against the kernel's own model
ANSWERED = """import json
print(json.dumps({"got": [p["probability"] for p in _],
                  "want": model.predict_proba(df_test.head(5)[["amount", "hour"]])[:, 1].tolist()}))"""


def test_three_steps_from_a_jupyter_kernel_to_prod(running, tmp_path):
    import json
    import re

    from resources.ledger import Ledger, ledger_paths
    from tests.guide_runner import Block, Session, live_guide, parse, project_copy

    port, decl, up_dir = running
    home = up_dir / "home"
    guide = live_guide("test_three_steps_from_a_jupyter_kernel_to_prod")
    blocks = parse(guide)
    registers = [b for b in blocks if b.lang == "python" and "onepath.register(" in b.body and not b.flags]
    promotes = [b for b in blocks if b.lang == "console" and any(c.startswith("onepath promote ") for c in b.commands)]
    calls = [b for b in blocks if b.lang == "python" and "onepath.predict(" in b.body]
    assert len(registers) == len(promotes) == len(calls) == 1, f"{guide}: one register, one promote, one call"
    # the reader's terminal and kernel: the project folder as cwd, the platform's home and declarations folder
    env = {**onepath_env(home, port, decl), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    session = Session(project_copy(tmp_path / "project"), env)
    out: dict = {}
    said = ""
    try:
        for b in blocks:
            result = session.run(b)
            if b is registers[0]:  # step 1 done
                printed = session.python(Block(guide, b.line, "python", set(), None,
                                               SECOND_VERSION.replace("@SCRATCH@", repr(str(tmp_path / "scratch.yaml")))))
                out = json.loads(printed.strip().splitlines()[-1])
            elif b is promotes[0]:
                said = "".join(r.both for r in result)
            elif b is calls[0]:
                answered = json.loads(session.python(Block(guide, b.line, "python", set(), None, ANSWERED)).strip()
                                      .splitlines()[-1])
    finally:
        session.close()
        print(f"\n{guide.name}:\n{session.report()}")

    # step 1, in the kernel
    assert (out["first"], out["second"]) == ("1", "2")
    assert out["next"] == "onepath promote fraud --to prod" and out["next"] in promotes[0].commands
    written = Path(out["decl"]).read_text().splitlines()
    assert Path(out["decl"]) == decl / "retention" / "defs.yaml"  # the owner team's file, in the platform's folder
    block = written[written.index("  name: fraud") - 2:]  # its own document, after the team's churn line
    assert block[0] == "type: onepath.ModelLine" and written[written.index("  name: fraud") - 3] == "---", written
    assert len(block) + 1 <= 10 and max(map(len, block)) <= 100 and "  version: 1" in block, block

    # step 2, from a terminal: the version registered in step 1, not the newer one, through staging to prod
    assert "promoting fraud_scoring version 1 (pinned by " in said, said
    assert "note: version 2 exists and is NOT deployed" in said, said
    assert re.search(r"fraud_scoring\.prod serves 1 at http://127\.0\.0\.1:\d+", said), said
    book = Ledger(*ledger_paths(home))
    staged = book.entries(kind="deploy", subject="fraud_scoring", env="staging")[-1]
    assert staged.data["version"] == "1" and staged.data["newer_not_deployed"] == ["2"], staged.data
    assert staged.data["why"].startswith("pinned by"), staged.data
    assert book.entries(kind="deploy", subject="fraud_scoring", env="prod")[-1].data["version"] == "1"

    # step 3: the guide's call answered the kernel's own model's probabilities; so does the curl line's address
    # with its credential
    assert answered["got"] == pytest.approx(answered["want"], abs=1e-6)
    address = re.search(r"curl -s -X POST (http://\S+)/predict", said).group(1)
    credential = Path(re.search(r"\$\(cat ([^)\s]+)\)", said).group(1)).read_text().strip()
    resp = httpx.post(f"{address}/predict", json={"records": out["probe"]},
                      headers={"authorization": f"Bearer {credential}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["version"] == "1"
    assert [p["probability"] for p in body["predictions"]] == pytest.approx(out["proba"], abs=1e-6)


def test_the_auditors_guide_on_what_the_data_scientist_promoted(running, tmp_path):
    """The auditor's guide, on the platform the data scientist's steps (the test before) promoted fraud on: its
    inventory, ledger verification and export, policy history and model card, as the auditor types them."""
    import json

    from tests.guide_runner import Session, live_guide, parse, project_copy

    port, decl, up_dir = running
    guide = live_guide("test_the_auditors_guide_on_what_the_data_scientist_promoted")
    env = {**onepath_env(up_dir / "home", port, decl),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    session = Session(project_copy(tmp_path / "project"), env)
    said: dict = {}  # command -> tests.guide_runner.Said (its stdout and stderr apart)
    for b in parse(guide):
        for cmd, out in zip(b.commands, session.run(b) or []):
            said[cmd] = out
    print(f"\n{guide.name}:\n{session.report()}")
    rows = json.loads(said["onepath inventory --env prod --json"].stdout)
    fraud = next(r for r in rows if r["name"] == "fraud_scoring")
    assert (fraud["recorded_version"], fraud["live_version"], fraud["mismatch"]) == ("1", "1", False), fraud
    assert "ledger intact" in said["onepath audit verify"].both, said["onepath audit verify"]
    exported = [json.loads(e) for e in
                (session.project / "audit-fraud-prod" / "ledger.jsonl").read_text().splitlines()]
    assert exported and all(e["subject"] == "fraud_scoring" and e["env"] == "prod" for e in exported), exported[:3]
    assert any(e["kind"] == "deploy" for e in exported), exported
    # the card of the version the data scientist promoted, printed and saved as its page: where it came from on
    # stderr, the card itself (platform_defs/governance/model_card.py render_markdown) alone on stdout
    card = said["onepath card fraud"]
    assert card.stderr.startswith("# fraud version 1 (last deployed to prod): "), card.stderr
    assert card.stdout.startswith("# Model card: fraud version 1\n"), card.stdout[:500]
    assert "\n## Ownership\n" in card.stdout and "\n| retention | ml-standard | " in card.stdout, card.stdout
    assert "<html" in (session.project / "fraud-v1-card.html").read_text().lower()
