"""`onepath up` (what the README's first command, `./dev up`, starts after install) starts the platform for
real: the Dagster UI with the example organisation loaded and its sensor running, driven here through the
GraphQL API the way the UI's clicks drive it, then in a real browser (headless Chromium), then by the app
developer's guide from a terminal, all on the same platform; stopping it (started as `./dev up` itself)
leaves no Dagster process behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dagster_graphql import DagsterGraphQLClient

from resources.processes import children_of, group_alive
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
LOCATION_QUERY = """{ workspaceOrError { ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message }
    ... on RepositoryLocation { repositories { name sensors { name sensorState { status } }
      assetNodes { assetKey { path } } } } } } } } }"""
LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on InvalidSubsetError { message } } }"""


def gql(port: int, query: str, variables: dict | None = None) -> dict:
    """POST a GraphQL document to the running webserver, as the UI does."""
    r = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query, "variables": variables or {}},
                   timeout=30)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ledger_text(book) -> str:
    """The whole ledger, one line per entry with its trigger and summary: a failure message that pytest
    prints in full (it shortens the repr of a list, not a string)."""
    def failed(e) -> str:  # a gate's failed checks, with what each said
        return "; ".join(f"{check}: {v.get('summary')}" for check, v in (e.data.get("verdicts") or {}).items()
                         if isinstance(v, dict) and not v.get("passed"))

    return "\n".join(f"#{e.seq} {e.kind} {e.subject} {e.env} trigger={e.data.get('trigger') or (e.data.get('claims') or {}).get('trigger')!r} "
                     f"{e.data.get('summary') or e.data.get('reason') or ''}{failed(e)}" for e in book.entries())


def loop_policy_file(tmp_path: Path) -> Path:
    """The example policy with the retention track's drift and bake sized for a test: a check after 300
    new rows over the newest 400, and a 10 s bake that needs 5 requests (at 40 requests/s its p99 rests on
    some 400 answers: the fifth slowest, not the second)."""
    import yaml

    policy = yaml.safe_load((ROOT / "assets" / "policy.yaml").read_text())
    track = policy["tracks"]["ml-standard"]
    track["drift"].update({"min_new_rows": 300, "window_rows": 400, "min_rows": 200, "min_check_interval_minutes": 0})
    track["bake"].update({"seconds": 10, "min_requests": 5, "poll_seconds": 0.5})
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


# first, before this module's platform starts: a second `onepath up` beside it would slow both
def test_stopping_up_leaves_no_dagster_process(tmp_path):
    """The README's first command, ``./dev up`` (here with --no-mlflow-ui): the wrapper installs only when the
    lock changed, then execs ``.venv/bin/onepath up``, so the process started is the platform and SIGTERM to
    it stops Dagster with it."""
    venv = ROOT / ".venv"
    assert venv.resolve() == Path(sys.prefix).resolve(), (
        f"./dev up runs {venv}, these tests run in {sys.prefix}: it would start (or install) another venv than the "
        f"one under test; run the tests with ./dev test")
    import hashlib

    # ./dev installs when its stamp is not the lock's and pyproject's hash: never from a test, into the venv under test
    installed_from = b"".join((ROOT / f).read_bytes() for f in ("requirements.lock", "pyproject.toml"))
    want = hashlib.sha256(installed_from).hexdigest()
    stamp = venv / ".onepath-installed"
    assert stamp.is_file() and stamp.read_text().strip() == want, (
        f"{venv} is not installed from this requirements.lock and pyproject.toml (./dev up would reinstall it under "
        f"the running tests): run ./dev install, then the tests")
    port = free_port()
    env = {**os.environ, "ONEPATH_HOME": str(tmp_path / "home"), "ONEPATH_UI_PORT": str(port),
           "PYTHONPATH": str(ROOT)}
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.Popen(["./dev", "up", "--no-mlflow-ui"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first = proc.stdout.readline().decode()
        assert first.startswith("onepath: 7 declarations loaded"), first
        # ./dev exec'd onepath: the pid started is the platform itself, not a shell that keeps SIGTERM to itself
        argv = [a.decode() for a in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")]
        assert (ROOT / argv[1]).resolve() == (venv / "bin" / "onepath").resolve(), argv
        assert argv[2:4] == ["up", "--no-mlflow-ui"], argv
        deadline = time.monotonic() + 240
        while True:
            try:
                gql(port, "{ version }")
                break
            except Exception:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.5)
        children = children_of(proc.pid)
        assert children, "onepath up should have started dg dev"
        os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=90)[0].decode()
        assert proc.returncode == 0 and "Dagster stopped" in out
        assert not any(group_alive(pid) for pid in children)
    finally:
        if proc.poll() is None:  # an assertion above failed with the platform still up: stop it as a user would
            proc.terminate()
            proc.communicate(timeout=90)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """One `onepath up` (with the MLflow UI) for this module's tests: the automation loop runs first, the
    browser tour after it on the same platform (starting one costs most of a minute)."""
    tmp_path = tmp_path_factory.mktemp("up")
    port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "ONEPATH_HOME": str(tmp_path / "home"), "ONEPATH_UI_PORT": str(port),
           "ONEPATH_MLFLOW_UI_URL": f"http://127.0.0.1:{mlflow_port}", "PYTHONPATH": str(ROOT),
           "ONEPATH_POLICY_FILE": str(loop_policy_file(tmp_path))}
    env.pop("DAGSTER_HOME", None)
    log = open(tmp_path / "up.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "platform_defs.cli", "up"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        try:
            if gql(port, LOCATION_QUERY)["workspaceOrError"]["locationEntries"]:
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)
    yield client, port, tmp_path
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=90)
    log.close()
    from resources.deployers.local import LocalProcessDeployer

    LocalProcessDeployer(tmp_path / "home" / "run").stop_all()


def test_up_loads_the_organisation_runs_sensors_and_materializes_from_the_api(platform):
    client, port, tmp_path = platform
    entry = gql(port, LOCATION_QUERY)["workspaceOrError"]["locationEntries"][0]
    loc = entry["locationOrLoadError"]
    assert loc["__typename"] == "RepositoryLocation", loc
    repo = loc["repositories"][0]
    assert {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]} == {
        name: "RUNNING" for name in ("endpoint_status", "alias_drift", "drift", "approved_promotions",
                                     "registry_handoff", "supervisor_events", "access", "onepath_automation")}
    keys = {"/".join(a["assetKey"]["path"]) for a in repo["assetNodes"]}
    assert {"credit_applications", "credit_risk", "credit_scoring_prod", "loan_portal_prod", "churn"} <= keys
    assert (tmp_path / "home" / "dagster_home" / "dagster.yaml").exists()

    assert wait_run(client, launch_assets(port, ["customer_activity"]), 240) == "SUCCESS"
    assert list((tmp_path / "home" / "data" / "customer_activity").glob("*.parquet"))
    # nobody asks for more: the running automation sensor trains churn on the new data and takes it
    # through staging's gate to prod (ml-standard may auto-promote); the ledger names the trigger
    from resources.ledger import Ledger, ledger_paths

    book = Ledger(*ledger_paths(tmp_path / "home"))
    deadline = time.monotonic() + 420
    while not [e for e in book.entries(kind="deploy", subject="churn_scoring") if e.env == "prod"]:
        assert time.monotonic() < deadline, [(e.kind, e.subject, e.env) for e in book.entries()]
        time.sleep(1)
    deploys = book.entries(kind="deploy", subject="churn_scoring")
    assert [e.env for e in deploys] == ["staging", "prod"]
    assert {e.data["claims"]["trigger"] for e in deploys} == {"declarative automation"}
    first = deploys[-1].data["version"]

    # the loop, closed by the running daemon alone: drifted traffic (outcomes delivered right away) ->
    # the drift sensor asks for the check -> drift -> one retraining run -> automation -> staging -> prod,
    # where the new version bakes on the traffic that keeps coming
    env = {**os.environ, "ONEPATH_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT),
           "ONEPATH_POLICY_FILE": str(tmp_path / "policy.yaml")}
    env.pop("DAGSTER_HOME", None)
    traffic = subprocess.Popen([sys.executable, "-m", "platform_defs.cli", "simulate-traffic", "churn_scoring",
                                "--drift", "--rate", "40", "--label-delay", "0"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not book.entries(kind="bake_passed", subject="churn_scoring") + \
                book.entries(kind="bake_failed", subject="churn_scoring"):  # the switch's last word
            assert traffic.poll() is None, traffic.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, ledger_text(book)
            time.sleep(1)
        kinds = [e.kind for e in book.entries() if e.subject in ("churn_scoring", "churn")]
        for kind in ("drift_detected", "retrain_requested", "bake_passed"):
            assert kind in kinds, ledger_text(book)
        (asked,) = book.entries(kind="retrain_requested", subject="churn_scoring")
        assert asked.data["trigger"].startswith("drift_detected #")
        final = [e for e in book.entries(kind="deploy", subject="churn_scoring") if e.env == "prod"][-1]
        assert final.data["claims"]["trigger"] == "declarative automation" and final.data["version"] != first
        # after all of that, everything the platform wrote is its own user's alone (attacker tier (a))
        from tests.test_file_permissions import loose_files

        assert loose_files(tmp_path / "home") == []
    finally:
        os.killpg(traffic.pid, signal.SIGINT)
        traffic.wait(timeout=60)


def test_the_dagster_ui_in_a_browser(platform):
    """After the loop above (it needs the automation sensor this test turns off), on the same platform."""
    client, port, tmp_path = platform
    from tests.browser import artifacts_dir

    ui_tour(port, client, tmp_path / "home", artifacts_dir())


def test_the_app_developers_guide_takes_loan_portal_to_prod(platform, tmp_path):
    """docs/guides/app-developer.md whole, as its reader types it, on this module's platform, after the browser
    tour (which deployed credit_scoring's staging, which loan_portal's integration tests call): the example's
    release is built and scanned into staging, refused in prod for want of a review (its integration tests pass),
    reviewed by another identity, and promoted; prod then answers with that release."""
    from platform_defs.factories import source_hash
    from resources.deployers.base import Target
    from resources.deployers.local import LocalProcessDeployer
    from resources.ledger import Ledger, ledger_paths
    from tests.guide_runner import Session, guide_env, live_guide, parse, project_copy

    client, port, up = platform
    home = up / "home"
    stop_automation(port)  # only the guide's commands, and the approved-promotions sensor they invoke, deploy
    guide = live_guide("test_the_app_developers_guide_takes_loan_portal_to_prod")
    blocks = parse(guide)
    release = "r-" + source_hash(ROOT / "apps" / "loan_portal")[0][:12]
    (approve,) = [c for b in blocks for c in b.commands if c.startswith("onepath approve loan_portal ")]
    assert f"--version {release} " in approve, (
        f"{guide.name}: apps/loan_portal builds release {release} now; the guide names another (write {release} "
        f"in its place, in every line that names it): {approve}")
    project = project_copy(tmp_path / "project")
    # the reader's terminal on this platform: its home and UI port and its policy; the guide's own project copy
    env = guide_env(project, home, ONEPATH_UI_PORT=str(port), ONEPATH_POLICY_FILE=str(up / "policy.yaml"))
    session = Session(project, env)
    said: dict = {}  # command -> every tests.guide_runner.Said of it, in order
    try:
        for b in blocks:
            for cmd, out in zip(b.commands, session.run(b) or []):
                said.setdefault(cmd, []).append(out)
    finally:
        session.close()
        print(f"\n{guide.name}:\n{session.report()}\n" + "\n".join(session.log))  # shown when it fails
    refused, promoted = said["onepath promote loan_portal --to prod"]
    assert "loan_portal did not reach prod:\n  code_review: " in refused.stdout, refused.stdout
    assert "integration_tests: " not in refused.stdout.split("did not reach prod:")[1], refused.stdout
    (why,) = said["onepath why loan_portal_prod"]
    assert f"onepath approve loan_portal --version {release} --env prod " in why.stdout, why.stdout
    assert promoted.stdout.rstrip().splitlines()[-1].startswith(f"loan_portal.prod serves {release} at http"), \
        promoted.stdout
    # the ledger: rob's review of exactly that release, and prod deployed it past a code_review that passed
    book = Ledger(*ledger_paths(home))
    (review,) = [e for e in book.entries(kind="approval", subject="loan_portal") if e.env == "prod"]
    assert review.actor == "rob" and review.data["version"] == release, review
    (deploy,) = [e for e in book.entries(kind="deploy", subject="loan_portal") if e.env == "prod"]
    assert deploy.data["version"] == release, deploy
    verdict = [e for e in book.entries(kind="gate_verdict", subject="loan_portal") if e.env == "prod"][-1]
    assert verdict.data["verdicts"]["code_review"]["passed"], verdict.data
    address = LocalProcessDeployer(home / "run").status(Target("loan_portal", "prod", "app")).address
    assert httpx.get(f"{address}/version", timeout=10).json()["version"] == release


# -- the Dagster UI in a real browser, on the same platform ---------------------------------------------

SENSOR = """query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename
  ... on Sensor { id sensorState { status ticks(limit: 1) { status } } } } }"""
ACTIVE_RUNS = """{ runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED, CANCELING]}) {
  ... on Runs { results { runId } } } }"""
STOP_SENSOR = """mutation($id: String) { stopSensor(id: $id) { __typename
  ... on StopSensorMutationResult { instigationState { status } } ... on PythonError { message } } }"""


CHECKS = """{ assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks {
  name canExecuteIndividually } } } } }"""


def launch_assets(port: int, keys: list[str], checks: bool = True, run_config: dict | None = None) -> str:
    """Launch one run materializing ``keys`` (GraphQL, as the UI's Materialize does); its run id. ``checks=False``:
    only the checks the assets report themselves (a promotion's gate), not those that run after them (the
    monitors: serving health, drift), as the UI's check selection does."""
    entry = gql(port, LOCATION_QUERY)["workspaceOrError"]["locationEntries"][0]
    repo = entry["locationOrLoadError"]["repositories"][0]
    selection: dict = {}
    if not checks:
        selection["assetCheckSelection"] = [
            {"assetKey": node["assetKey"], "name": check["name"]} for node in gql(port, CHECKS)["assetNodes"]
            if "/".join(node["assetKey"]["path"]) in keys
            for check in node["assetChecksOrError"].get("checks", [])
            if check["canExecuteIndividually"] != "CAN_EXECUTE"]
    params = {"selector": {"repositoryLocationName": entry["name"], "repositoryName": repo["name"],
                           "jobName": "__ASSET_JOB", "assetSelection": [{"path": [k]} for k in keys], **selection},
              "mode": "default", **({"runConfigData": run_config} if run_config else {})}
    launched = gql(port, LAUNCH, {"p": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def wait_run(client, run_id: str, seconds: float = 300) -> str:
    deadline = time.monotonic() + seconds
    while (status := client.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
        assert time.monotonic() < deadline, f"run {run_id} still {status} after {seconds} s"
        time.sleep(0.5)
    return status


def stop_automation(port: int, sensors: tuple[str, ...] = ("onepath_automation",)) -> None:
    """Turn the automation sensor (or ``sensors``) off and wait until what they began is over, so that nothing but
    what the test does deploys."""
    entry = gql(port, LOCATION_QUERY)["workspaceOrError"]["locationEntries"][0]
    repo = entry["locationOrLoadError"]["repositories"][0]
    selectors = [{"s": {"repositoryLocationName": entry["name"], "repositoryName": repo["name"], "sensorName": name}}
                 for name in sensors]
    for selector in selectors:
        sensor = gql(port, SENSOR, selector)["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        if sensor["sensorState"]["status"] != "STOPPED":
            stopped = gql(port, STOP_SENSOR, {"id": sensor["id"]})["stopSensor"]
            assert stopped.get("instigationState", {}).get("status") == "STOPPED", stopped

    # a tick the daemon had begun still launches its runs, and runs it launched before still deploy: wait until
    # the last tick is over and no run is queued or running
    def quiet() -> bool:
        ticks = [gql(port, SENSOR, s)["sensorOrError"]["sensorState"]["ticks"] for s in selectors]
        return not gql(port, ACTIVE_RUNS)["runsOrError"]["results"] and \
            not any(t and t[0]["status"] == "STARTED" for t in ticks)

    wait_for(f"the last tick of {', '.join(sensors)} over and no run queued or running", quiet, 300, poll=0.5)


def ui_tour(port: int, client, home: Path, shots: Path) -> None:
    """The Dagster UI of the platform on ``port`` in headless Chromium, one full-page screenshot per step in
    ``shots``: the graph shows the four kinds of asset; Materialize on a staging endpoint's page deploys a
    version new to its stable address; a blocked promotion shows its failing check's reason."""
    from playwright.sync_api import expect

    from platform_defs.access import endpoint_target
    from platform_defs.loader import load_organisation
    from resources.deployers.base import probe
    from resources.deployers.local import LocalProcessDeployer
    from resources.ledger import Ledger, ledger_paths
    from tests.browser import chromium_page

    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.png"):
        old.unlink()
    deployer = LocalProcessDeployer(home / "run")
    staging = endpoint_target(load_organisation().by_name["credit_scoring"], "staging")
    book = Ledger(*ledger_paths(home))

    def served() -> str | None:
        """The version credit_scoring's staging stable address answers with (asked with the backend's probe
        credential), or None."""
        got = probe(deployer.address(staging), credential=deployer.probe_credential(staging))
        return str(got["version"]) if got else None

    # a credit_risk version that staging does not serve yet, and nothing but the browser to deploy it: with
    # automation on, the sensor would take the new version to staging by itself
    stop_automation(port)
    assert wait_run(client, launch_assets(port, ["credit_applications", "credit_risk"])) == "SUCCESS"
    before = served()

    with chromium_page(f"http://127.0.0.1:{port}") as page:
        # Dagster's one-time "Join the Dagster community" dialog, whenever it comes up
        page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda skip: skip.click())
        step = "0-start"

        def shot(name: str) -> None:
            nonlocal step
            step = name
            page.screenshot(path=shots / f"{name}.png", full_page=True)

        def materialize(key: str) -> str:
            """Click Materialize on ``key``'s asset page; the id of the run the UI launched, its page open."""
            page.goto(f"/assets/{key}")
            expect(page.get_by_text("Latest materialization")).to_be_visible(timeout=60_000)
            with page.expect_response(lambda r: "/graphql" in r.url and "LaunchPipelineExecution"
                                      in (r.request.post_data or ""), timeout=90_000) as launched:
                page.get_by_role("button", name=re.compile(r"Materialize$")).click()
            answer = launched.value.json()["data"]["launchPipelineExecution"]
            assert answer["__typename"] == "LaunchRunSuccess", f"the UI's launch of {key} answered {answer}"
            page.goto(f"/runs/{answer['run']['id']}")
            return answer["run"]["id"]

        try:
            # a) the graph, every group expanded (the graph's own shortcut), names the four kinds of asset
            page.goto("/asset-groups")
            expect(page.get_by_text("retention", exact=True).last).to_be_visible(timeout=60_000)
            page.keyboard.press("Alt+e")
            for name in ("customer_activity", "churn", "churn_scoring_prod", "loan_portal_prod"):
                expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=30_000)
            shot("1-graph")

            # b) Materialize on the staging endpoint's page: the run succeeds on screen and the stable address
            # answers with the version that run deployed, which it did not serve before
            run_id = materialize("credit_scoring_staging")
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=300_000)
            shot("2-staging-deployed")
            (deploy,) = [e for e in book.entries(kind="deploy", subject="credit_scoring")
                         if e.env == "staging" and e.actor == f"dagster:{run_id}"]
            version = str(deploy.data["version"])
            assert version != before, f"staging served {before} already"
            assert served() == version

            # c) prod without an independent approval: the run fails, and the approval check's page shows why
            run_id = materialize("credit_scoring_prod")
            expect(page.get_by_text("Failure", exact=True).first).to_be_visible(timeout=300_000)
            shot("3-prod-refused")
            verdict = [e for e in book.entries(kind="gate_verdict", subject="credit_scoring")
                       if e.env == "prod" and e.actor == f"dagster:{run_id}"][-1].data["verdicts"]["approval"]
            assert not verdict["passed"] and verdict["summary"].startswith("waiting for approval by"), verdict
            page.goto("/assets/credit_scoring_prod?view=checks&checkDetail=approval")
            expect(page.get_by_text("This is a blocking asset check.")).to_be_visible(timeout=60_000)
            expect(page.get_by_text(verdict["summary"], exact=True)).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Failed", exact=True).last).to_be_visible()
            shot("4-approval-check")
        except Exception as err:
            page.screenshot(path=shots / "failed.png", full_page=True)
            raise AssertionError(f"the UI tour failed after step {step} (screenshots of each step and of the "
                                 f"failure in {shots}): {err}") from err
