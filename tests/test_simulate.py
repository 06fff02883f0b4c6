"""simulate-traffic: a world that changes, and labels that arrive later.

The sending and delivery loop runs against a real credit model served by the local deployer, on a
clock the test controls (every wait jumps the clock to its due time, so nothing sleeps); the CLI runs
as a real process for its error lines and its Ctrl-C behaviour.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from assets.credit.data import generate_credit_applications
from platform_defs.cli_simulate import (DRIFT_SHIFT, Control, PredictClient, Simulation, iter_requests,
                                        sent_columns)
from platform_defs.loader import load_organisation
from resources.deployers.base import Target
from resources.deployers.local import LocalProcessDeployer
from resources.feedback import dataset_rows_from_feedback, labelled_rows
from resources.gx_validation import validate
from tests.conftest import grant_caller, model_release, record_policy, save_credit_model

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT, ENV = "credit_scoring", "simtest"


class ControlledClock:
    """Seconds that move only when the loop waits: ``wait_until(t)`` jumps to ``t``. Callbacks set
    with ``at(t, fn)`` run as the clock passes ``t`` (how a test presses Ctrl-C at a given moment)."""

    def __init__(self, start: float):
        self.t = start
        self._at: list[tuple[float, object]] = []

    def now(self) -> float:
        return self.t

    def at(self, t: float, fn) -> None:
        self._at.append((t, fn))
        self._at.sort(key=lambda x: x[0])

    def wait_until(self, t: float, control: Control) -> None:
        while self._at and self._at[0][0] <= t:
            when, fn = self._at.pop(0)
            self.t = max(self.t, when)
            fn()
            if control.stopping:  # an interrupt ends the wait early, as on the real clock
                return
        self.t = max(self.t, t)


@pytest.fixture(scope="module")
def org():
    return load_organisation()


@pytest.fixture(scope="module")
def served(settings, org, tmp_path_factory):
    """A real credit model behind a stable address, logging to its own folder."""
    root = tmp_path_factory.mktemp("simulate")
    model = save_credit_model(root / "model", seed=3)
    logs = root / "inference_logs"
    deployer = LocalProcessDeployer(settings.run_dir, host=settings.host, port_base=settings.port_base,
                                    inference_log_dir=logs, artifact_roots=[root])
    target = Target(ENDPOINT, ENV, kind="endpoint")
    dataset = org.by_name["credit_applications"]
    try:
        # "simtest" is no declared environment: this module's caller gets a grant of its own (as a policy
        # caller would), and the endpoint keeps what credit_scoring declares it passes through
        auth = grant_caller(deployer, target, "simulate-test")
        st = deployer.deploy(target, model_release("1", model, {
            "model_name": "credit_risk", "pii_columns": dataset.pii_columns,
            "pass_through": list(org.by_name[ENDPOINT].pass_through)}))
        yield {"address": st.address, "logs": logs, "dataset": dataset,
               "token": auth["authorization"].removeprefix("Bearer ")}
    finally:
        deployer.delete(target)


def simulation(served, tmp_path, clock, *, total=300, drift=True, seed=11, label_delay=30.0, rate=20.0,
               control=None, send=None):
    control = control or Control()
    client = PredictClient(served["address"], credential=served["token"])
    today = datetime.fromtimestamp(clock.now(), timezone.utc).date()
    sim = Simulation(endpoint=ENDPOINT, env=ENV, outcomes_dir=tmp_path / "outcomes",
                     requests=iter_requests(served["dataset"], total=total, drift=drift, seed=seed,
                                            today=lambda: today),
                     send=send or client, rate=rate, label_delay=label_delay, clock=clock, control=control,
                     total=total)
    return sim, control


def outcomes(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((tmp_path / "outcomes" / ENDPOINT / ENV).glob("*.jsonl"))
            for line in p.read_text().splitlines()]


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# -- the world really moves -------------------------------------------------------------------------


def _draw(org, n: int, drift: bool, seed: int) -> pd.DataFrame:
    planned = list(iter_requests(org.by_name["credit_applications"], total=n, drift=drift, seed=seed,
                                 today=lambda: date(2026, 11, 26)))
    return pd.DataFrame([p.record for p in planned])


def test_drift_moves_several_columns_including_a_distribution_shape(org):
    base = generate_credit_applications(rows=3000, period_start="2026-11-01", period_end="2026-11-26", seed=5)
    calm, moved = _draw(org, 3000, False, 1), _draw(org, 3000, True, 1)
    log_base, log_calm, log_moved = (np.log(f["annual_income"]) for f in (base, calm, moved))
    # undrifted draws come from the declared population ...
    assert stats.ks_2samp(base["annual_income"], calm["annual_income"]).pvalue > 1e-3
    # ... drifted ones do not: incomes fall AND spread (the shape changes, not only the mean)
    assert stats.ks_2samp(base["annual_income"], moved["annual_income"]).pvalue < 1e-12
    assert log_moved.mean() < log_base.mean() - 0.2
    assert log_moved.std() > 1.2 * log_base.std() and abs(log_calm.std() / log_base.std() - 1) < 0.1
    assert moved["debt_to_income"].mean() > base["debt_to_income"].mean() + 0.1
    young = lambda f: (f["age_band"] == "18-25").mean()  # noqa: E731
    assert young(moved) > young(base) + 0.1
    purposes = pd.crosstab(pd.concat([base["purpose"], moved["purpose"]]),
                           np.r_[np.zeros(len(base)), np.ones(len(moved))])
    assert stats.chi2_contingency(purposes).pvalue < 1e-12
    assert DRIFT_SHIFT >= 0.5


def test_requests_carry_features_id_and_protected_attributes_never_pii_or_label(org):
    spec = org.by_name["credit_applications"]
    planned = next(iter_requests(spec, total=1, drift=False, seed=3, today=lambda: date(2026, 11, 26)))
    assert set(planned.record) == set(sent_columns(spec))
    assert {"application_id", "gender", "age_band", "annual_income", "purpose"} <= set(planned.record)
    assert not set(planned.record) & {*spec.pii_columns, "defaulted", "applied_on"}
    assert planned.record["application_id"].startswith("APP-202611-")  # drawn for the current period
    assert planned.label in (0, 1)


def test_long_runs_draw_in_chunks_with_unique_ids(org):
    spec = org.by_name["credit_applications"]
    planned = list(iter_requests(spec, total=2500, drift=True, seed=8, today=lambda: date(2026, 11, 26),
                                 chunk_rows=1000))
    ids = [p.record["application_id"] for p in planned]
    assert len(ids) == 2500 == len(set(ids))


# -- end to end: real endpoint, controlled clock ----------------------------------------------------


def test_drifted_traffic_becomes_labelled_rows_of_a_moved_world(served, tmp_path, org):
    clock = ControlledClock(time.time())
    t0 = clock.now()
    today = datetime.fromtimestamp(t0, timezone.utc).date()
    sent: dict[str, tuple[float, dict]] = {}
    client = PredictClient(served["address"], credential=served["token"])

    def send(record, rid):
        sent[rid] = (clock.now(), record)
        return client(record, rid)

    before = labelled_rows(inference_log_dir=served["logs"], outcomes_dir=tmp_path / "outcomes", endpoint=ENDPOINT,
                           env=ENV, max_age_days=1, max_rows=100_000)
    sim, _ = simulation(served, tmp_path, clock, send=send)
    heard: list[tuple[float, int]] = []
    summary = sim.run(lambda s, event: heard.append((clock.now(), s.delivered)))
    # what was drawn, again (same seed, same rows): request i carried row i and owes its label
    planned = list(iter_requests(served["dataset"], total=300, drift=True, seed=11, today=lambda: today))

    assert (summary.sent, summary.ok, summary.failed, summary.delivered, summary.pending) == (300, 300, 0, 300, 0)
    assert summary.state == "done" and summary.versions == {"1": 300}
    assert [sent[sim.request_id(i)][1] for i in range(300)] == [p.record for p in planned]
    # the rate: request i leaves at t0 + i / 20 on the controlled clock
    assert [sent[sim.request_id(i)][0] for i in range(300)] == pytest.approx([t0 + i / 20 for i in range(300)],
                                                                             abs=1e-6)
    # labels arrive later: nothing before the first request's delay, each exactly 30 s after its answer,
    # each the row's true outcome, none twice
    assert heard and all(d == 0 for t, d in heard if t < t0 + 30)
    got = outcomes(tmp_path)
    assert len(got) == 300 == len({o["request_id"] for o in got}), "no outcome delivered twice"
    for o in got:
        assert epoch(o["observed_at"]) == pytest.approx(sent[o["request_id"]][0] + 30, abs=1e-5)
    truth = {sim.request_id(i): p.label for i, p in enumerate(planned)}
    assert {o["request_id"]: o["label"] for o in got} == truth

    # the portal also sends a batch: one request of three records
    batch = [sent[rid][1] for rid in list(sent)[:3]]
    batch = [{**r, "application_id": f"BATCH-{j}"} for j, r in enumerate(batch)]
    import urllib.request
    req = urllib.request.Request(served["address"] + "/predict", data=json.dumps({"records": batch}).encode(),
                                 headers={"content-type": "application/json", "x-request-id": "portal-batch",
                                          "authorization": f"Bearer {served['token']}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["request_id"] == "portal-batch"
    from resources.feedback import record_outcomes
    record_outcomes(tmp_path / "outcomes", ENDPOINT, ENV, [{"request_id": "portal-batch:0", "label": 1},
                                                           {"request_id": "portal-batch:2", "label": 0}])

    lr = labelled_rows(inference_log_dir=served["logs"], outcomes_dir=tmp_path / "outcomes", endpoint=ENDPOINT,
                       env=ENV, max_age_days=1, max_rows=100_000)
    assert lr.logged == before.logged + 303
    assert (lr.joined, lr.outcomes, lr.unmatched_outcomes, lr.corrupt_lines) == (302, 302, 0, 0)
    log_text = "".join(p.read_text() for p in (served["logs"] / ENDPOINT / ENV).glob("*.jsonl"))
    assert "full_name" not in log_text and "national_id" not in log_text and "@example.com" not in log_text

    spec = served["dataset"]
    sim_rows = lr.frame[lr.frame["request_id"].str.startswith(f"sim-{sim.run_id}-")]
    rows = dataset_rows_from_feedback(spec, sim_rows)
    assert len(rows) == 300
    base = generate_credit_applications(**spec.params)
    assert rows.dtypes.to_dict() == base.dtypes.to_dict()
    assert rows[spec.pii_columns].isna().all().all()
    # every row is what was sent, with the outcome that was true for it
    expected = pd.DataFrame([{**p.record, "defaulted": p.label} for p in planned])
    cols = list(expected.columns)
    pd.testing.assert_frame_equal(rows[cols].sort_values("application_id").reset_index(drop=True),
                                  expected.sort_values("application_id").reset_index(drop=True), check_dtype=False)
    # the world moved: production incomes are not the population the dataset was generated from
    undrifted = generate_credit_applications(rows=3000, period_start="2026-11-01", period_end="2026-11-26", seed=21)
    assert stats.ks_2samp(rows["annual_income"], undrifted["annual_income"]).pvalue < 1e-6
    assert np.log(rows["annual_income"]).std() > 1.15 * np.log(undrifted["annual_income"]).std()
    # and the declared suite still passes on base + feedback rows
    result = validate(pd.concat([base, rows], ignore_index=True), spec)
    assert result.success, result.failed


def test_first_interrupt_stops_sending_and_still_delivers_what_is_owed_once(served, tmp_path):
    clock = ControlledClock(time.time())
    t0 = clock.now()
    sim, control = simulation(served, tmp_path, clock, total=None, drift=False, seed=4)
    clock.at(t0 + 4.99, control.interrupt)  # Ctrl-C just before 5 s: 100 requests have left (t0 .. t0 + 4.95)
    events: list[str] = []
    summary = sim.run(lambda s, event: events.append(event))
    assert events.count("stopping") == 1 and events[-1] == "stopped"
    assert (summary.sent, summary.ok, summary.delivered, summary.pending, summary.dropped) == (100, 100, 100, 0, 0)
    got = outcomes(tmp_path)
    assert len(got) == 100 == len({o["request_id"] for o in got})
    assert max(epoch(o["observed_at"]) for o in got) == pytest.approx(t0 + 4.95 + 30, abs=1e-5)
    assert summary.line().endswith("[stopped]")


def test_second_interrupt_drops_what_is_owed_and_delivers_nothing_twice(served, tmp_path):
    clock = ControlledClock(time.time())
    t0 = clock.now()
    sim, control = simulation(served, tmp_path, clock, total=None, drift=True, seed=5)
    clock.at(t0 + 4.99, control.interrupt)
    clock.at(t0 + 32.01, control.interrupt)  # by then the outcomes of requests sent up to t0 + 2 s were due
    summary = sim.run()
    assert summary.state == "aborted"
    assert (summary.sent, summary.delivered, summary.dropped, summary.pending) == (100, 41, 59, 0)
    got = outcomes(tmp_path)
    assert len(got) == 41 == len({o["request_id"] for o in got})
    assert {o["request_id"] for o in got} == {sim.request_id(i) for i in range(41)}


def test_an_endpoint_that_stops_answering_ends_the_run(served, tmp_path):
    clock = ControlledClock(time.time())
    # a stable address with nothing behind it: the port of a socket that was bound and closed
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    sim, _ = simulation(served, tmp_path, clock, total=None, send=PredictClient(dead))
    summary = sim.run()
    assert summary.state == "failed" and summary.ok == 0 and summary.failed == 20 and summary.sent == 20
    assert "failed 20 requests in a row" in summary.line() and "ConnectionRefusedError" in summary.line()
    assert outcomes(tmp_path) == []


# -- the command ------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "platform_defs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_an_undeclared_endpoint_is_one_line_and_exit_1():
    out = run_cli("simulate-traffic", "credit_scorin")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "onepath: endpoint 'credit_scorin' is not declared (declared endpoints: churn_scoring, credit_scoring)"]


@pytest.mark.parametrize("args, line", [
    (["credit_scoring", "--env", "dev"],
     "onepath: endpoint 'credit_scoring' has no environment 'dev' (its environments: staging, prod)"),
    (["credit_scoring", "--rate", "0"], "onepath: --rate must be positive (got 0.0)"),
    (["credit_scoring", "--requests", "0"], "onepath: --requests must be at least 1 (got 0)"),
])
def test_bad_arguments_are_one_line_and_exit_1(args, line):
    out = run_cli("simulate-traffic", *args)
    assert out.returncode == 1 and out.stderr.splitlines() == [line], out.stderr


def test_nothing_serving_at_the_address_is_one_line_and_exit_1(tmp_path):
    out = run_cli("simulate-traffic", "churn_scoring", "--requests", "5",
                  env={"ONEPATH_HOME": str(tmp_path / "home"), "ONEPATH_RUN_DIR": str(tmp_path / "run")})
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        "onepath: nothing serves endpoint 'churn_scoring' in 'prod' (it has no stable address yet): deploy it "
        "first (materialize churn_scoring_prod)"]


@pytest.fixture
def prod_world(settings, tmp_path):
    """An isolated onepath home where credit_scoring/prod serves a real model (its own run dir and ports, so
    the session's graph tests keep theirs)."""
    env = {"ONEPATH_HOME": str(tmp_path / "home"), "ONEPATH_RUN_DIR": str(tmp_path / "run"),
           "ONEPATH_INFERENCE_LOG_DIR": str(tmp_path / "logs"), "ONEPATH_OUTCOMES_DIR": str(tmp_path / "outcomes"),
           "ONEPATH_PORT_BASE": str(settings.port_base + 150)}
    deployer = LocalProcessDeployer(tmp_path / "run", host=settings.host, port_base=settings.port_base + 150,
                                    inference_log_dir=tmp_path / "logs", artifact_roots=[tmp_path])
    target = Target("credit_scoring", "prod", kind="endpoint")
    model = save_credit_model(tmp_path / "model", seed=5)
    from resources.ledger import Ledger, ledger_paths

    # the home's recorded policy grants onepath-cli, whose credential simulate-traffic asks for on first use
    record_policy(Ledger(*ledger_paths(tmp_path / "home")))
    try:
        deployer.deploy(target, model_release("1", model, {"model_name": "credit_risk",
                                                           "pii_columns": ["full_name", "national_id", "email"]}))
        yield env, tmp_path
    finally:
        deployer.stop_all()


def _start(env: dict, *args: str) -> tuple[subprocess.Popen, "queue.Queue[str]", threading.Thread]:
    proc = subprocess.Popen([sys.executable, "-m", "platform_defs.cli", "simulate-traffic", "credit_scoring", *args],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)
    reader.start()
    return proc, lines, reader


def _logged(root: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (root / "logs" / "credit_scoring" / "prod").glob("*.jsonl"))


def _wait_for(cond, what: str, deadline_s: float = 90.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _line_with(lines: "queue.Queue[str]", text: str, deadline_s: float = 90.0) -> str:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"timed out waiting for a line with {text!r}") from None
        if text in line:
            return line


def test_ctrl_c_stops_sending_delivers_owed_outcomes_once_and_exits_cleanly(prod_world):
    env, root = prod_world
    proc, lines, reader = _start(env, "--rate", "200", "--label-delay", "1", "--seed", "3")
    try:
        assert "simulating credit_scoring/prod at http://" in _line_with(lines, "simulating")
        _wait_for(lambda: _logged(root) >= 20, "20 scored requests")
        proc.send_signal(signal.SIGINT)
        assert "stopping: no more requests" in _line_with(lines, "stopping")
        rc = proc.wait(timeout=90)
    finally:
        proc.kill()
    reader.join(timeout=30)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert rc == 0 and proc.stderr.read() == ""
    final = rest[-1]
    assert final.rstrip().endswith("[stopped]") and "pending 0" in final
    sent = int(final.split("sent ")[1].split(" ")[0])
    got = [json.loads(x) for p in (root / "outcomes" / "credit_scoring" / "prod").glob("*.jsonl")
           for x in p.read_text().splitlines()]
    assert len(got) == sent == len({o["request_id"] for o in got}) == _logged(root), final


def test_second_ctrl_c_drops_owed_outcomes_and_exits_130(prod_world):
    env, root = prod_world
    proc, lines, reader = _start(env, "--rate", "200", "--label-delay", "600", "--seed", "4")
    try:
        _line_with(lines, "simulating")
        _wait_for(lambda: _logged(root) >= 20, "20 scored requests")
        proc.send_signal(signal.SIGINT)
        _line_with(lines, "stopping")
        proc.send_signal(signal.SIGINT)
        final = _line_with(lines, "[aborted]")
        rc = proc.wait(timeout=90)
    finally:
        proc.kill()
    assert rc == 130 and "Traceback" not in proc.stderr.read()
    sent = int(final.split("sent ")[1].split(" ")[0])
    assert f"dropped {sent}" in final and "outcomes delivered 0" in final
    assert not list((root / "outcomes").glob("**/*.jsonl"))


def test_simulate_traffic_without_a_grant_of_the_recorded_policy_is_refused_in_one_line(prod_world, tmp_path):
    env, root = prod_world
    # the same serving endpoint, seen from a home whose ledger records no policy: nothing grants onepath-cli
    bare = {**env, "ONEPATH_HOME": str(tmp_path / "bare")}
    out = run_cli("simulate-traffic", "credit_scoring", "--requests", "3", env=bare)
    assert out.returncode == 1 and out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("onepath: onepath-cli may not call credit_scoring.prod: no policy is recorded")
    assert "assets/policy.yaml" in out.stderr and _logged(root) == 0
    # under the recorded policy of its own home it is granted, on first use, and sends with it
    ok = run_cli("simulate-traffic", "credit_scoring", "--requests", "3", "--label-delay", "0", env=env)
    assert ok.returncode == 0, ok.stderr
    assert _logged(root) == 3
    from resources.ledger import Ledger, ledger_paths

    granted = Ledger(*ledger_paths(Path(env["ONEPATH_HOME"]))).entries(kind="credential_granted")
    assert [(e.data["caller"], e.data["endpoint"], e.env) for e in granted] == [("onepath-cli", "credit_scoring", "prod")]
