"""Bake: the verdict logic on the model server's own metrics text (rendered by the real ``Metrics``)
with a scripted clock, then for real: endpoint processes on loopback, traffic from a client thread,
and the fault-injecting model making a version fail.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from platform_defs.governance.bake import bake, p99_upper_bound, parse_prometheus
from platform_defs.policy import BakePolicy
from resources.deployers.base import DeployError, Release, Target
from resources.deployers.local import LocalProcessDeployer
from resources.serving.model_server import Metrics
from tests.conftest import _free_port_base, caller_headers, model_release, save_credit_model

ROW = {"annual_income": 52000.0, "loan_amount": 12000.0, "loan_term_months": 36, "debt_to_income": 0.3,
       "credit_history_years": 7.5, "num_open_accounts": 4, "delinquencies_2y": 0,
       "employment_type": "salaried", "home_ownership": "mortgage", "purpose": "car"}
LABELS = 'endpoint="scripted",env="prod"'


# -- parsing -----------------------------------------------------------------------------------


def test_parse_prometheus_reads_the_model_servers_own_text():
    m = Metrics()
    m.observe("/predict", 200, 0.004)
    m.observe("/predict", 500, 0.2)
    m.observe("/invocations", 422, 3.0)
    samples = parse_prometheus(m.render(LABELS, "7", 1234.5).decode())
    req = {(s.labels["route"], s.labels["status"]): s.value for s in samples if s.name == "onepath_requests_total"}
    assert req == {("/predict", "200"): 1.0, ("/predict", "500"): 1.0, ("/invocations", "422"): 1.0}
    buckets = {s.labels["le"]: s.value for s in samples if s.name == "onepath_request_latency_seconds_bucket"}
    assert buckets["0.005"] == 1 and buckets["0.25"] == 2 and buckets["2.5"] == 2 and buckets["+Inf"] == 3
    info = next(s for s in samples if s.name == "onepath_model_info")
    assert info.labels == {"endpoint": "scripted", "env": "prod", "version": "7"} and info.value == 1
    start = next(s for s in samples if s.name == "onepath_process_start_time_seconds")
    assert start.labels == {} and start.value == 1234.5


def test_parse_prometheus_labels_values_and_errors():
    text = ('# HELP x a counter\n\nx{a="q\\"uote",b="back\\\\slash",c="line\\nbreak"} +Inf 1700000000\n'
            'y -2.5e-3\nz{} NaN\n')
    x, y, z = parse_prometheus(text)
    assert x.labels == {"a": 'q"uote', "b": "back\\slash", "c": "line\nbreak"} and x.value == math.inf
    assert (y.name, y.value, y.labels) == ("y", -0.0025, {}) and math.isnan(z.value)
    with pytest.raises(ValueError, match=r"^metrics line 2 is not a sample: 'oops'$"):
        parse_prometheus("a 1\noops\n")
    with pytest.raises(ValueError, match="metrics line 1 has malformed labels"):
        parse_prometheus('a{b=c} 1')
    with pytest.raises(ValueError, match="metrics line 1 has a value that is not a number"):
        parse_prometheus('a{b="c"} one')


def test_p99_is_the_upper_bound_of_the_bucket_holding_it():
    assert p99_upper_bound({}) is None
    assert p99_upper_bound({0.1: 0, math.inf: 0}) is None
    assert p99_upper_bound({0.005: 99, 0.5: 100, math.inf: 100}) == 0.005  # 99th of 100 is fast
    assert p99_upper_bound({0.005: 98, 0.5: 100, math.inf: 100}) == 0.5
    assert p99_upper_bound({0.005: 98, 2.5: 98, math.inf: 100}) == math.inf


# -- the verdict, on a scripted clock ------------------------------------------------------------


class Scripted:
    """Workers as real ``Metrics`` objects, rendered as the model server renders them; ``sleep``
    advances a fake clock and runs ``traffic(self)`` once per poll."""

    def __init__(self, version: str = "7", workers: int = 1, traffic=None):
        self.t = 0.0
        self.version = version
        self.current = True
        self.down: set[int] = set()
        self.starts = 0
        self.workers = [self.fresh() for _ in range(workers)]
        self.traffic = traffic or (lambda s: None)
        self.polls = 0

    def fresh(self) -> list:
        self.starts += 1
        return [Metrics(), 1_700_000_000.0 + self.starts]

    def clock(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.t += seconds
        self.polls += 1
        self.traffic(self)

    def worker_metrics(self, target) -> list[str]:
        if not self.current:
            return []
        return ["" if i in self.down else m.render(LABELS, self.version, started).decode()
                for i, (m, started) in enumerate(self.workers)]

    def serve(self, n: int, status: int = 200, seconds: float = 0.004, worker: int = 0) -> None:
        for _ in range(n):
            self.workers[worker][0].observe("/predict", status, seconds)


TARGET = Target("scripted", "prod")  # an endpoint name as declarations allow: ^[a-z][a-z0-9_]{1,62}$


def policy(**kw) -> BakePolicy:
    return BakePolicy(**{"seconds": 3, "poll_seconds": 0.5, "min_requests": 20, "max_error_rate": 0.01,
                         "max_p99_latency_ms": 250, **kw})


def run(s: Scripted, **kw):
    return bake(s, TARGET, s.version, policy(**kw), clock=s.clock, sleep=s.sleep)


def test_healthy_traffic_passes_and_what_came_before_the_switch_does_not_count():
    s = Scripted(traffic=lambda s: (s.serve(10), s.serve(1, 422)))
    s.serve(100, 500)  # before the baseline: the previous minutes of this process, not the bake's
    v = run(s)
    assert v.passed and v.reason == "passed"
    assert (v.requests, v.errors, v.error_rate, v.p99_ms, v.seconds) == (66, 0, 0.0, 5.0, 3.0)
    assert s.polls == 6
    assert v.summary == ("bake of scripted.prod version 7 passed: 66 requests, 0 5xx (0.0%), p99 <= 5 ms in 3.0 of 3 s")
    json.dumps(v.metadata)
    assert v.metadata["bake_passed"] is True and v.metadata["bake_p99_latency_ms"] == "<= 5 ms"


def test_error_rate_fails_as_soon_as_min_requests_are_in():
    s = Scripted(traffic=lambda s: (s.serve(5), s.serve(5, 503)))
    v = run(s)
    assert not v.passed and v.reason == "error_rate"
    assert (v.requests, v.errors, v.seconds, s.polls) == (20, 10, 1.0, 2)  # 2 of 6 polls: it stopped early
    assert "error rate 50.0% (10 5xx of 20 requests) over 1.0%" in v.summary and "\n" not in v.summary


def test_errors_before_min_requests_do_not_fail_early_and_can_be_outweighed():
    def traffic(s):
        s.serve(1, 500) if s.polls == 1 else s.serve(100)

    v = run(Scripted(traffic=traffic), max_error_rate=0.02)
    assert v.passed and (v.requests, v.errors) == (501, 1)


def test_an_error_rate_over_the_threshold_at_the_end_fails():
    def traffic(s):
        s.serve(10)
        if s.polls == 6:
            s.serve(2, 500)

    v = run(Scripted(traffic=traffic), min_requests=100)  # 62 requests: never early
    assert not v.passed and v.reason == "too_little_traffic" and v.seconds == 3.0
    assert v.summary.startswith("bake of scripted.prod version 7 failed: too little traffic: 62 of 100 requests; "
                                "error rate 3.2% (2 5xx of 62 requests) over 1.0%")
    v = run(Scripted(traffic=traffic), min_requests=10)
    assert not v.passed and v.reason == "error_rate" and v.seconds == 3.0


def test_too_little_traffic_fails_unless_allowed():
    v = run(Scripted(traffic=lambda s: s.serve(1) if s.polls <= 3 else None))
    assert not v.passed and v.reason == "too_little_traffic" and v.requests == 3
    assert "too little traffic: 3 of 20 requests" in v.summary
    v = run(Scripted(), pass_without_traffic=True)
    assert v.passed and v.reason == "passed_without_traffic" and v.requests == 0 and v.p99_ms is None
    assert "too little traffic: 0 of 20 requests, passed (pass_without_traffic)" in v.summary
    assert v.metadata["bake_p99_latency_ms"] == "no requests"


def test_p99_over_the_threshold_fails_at_the_end():
    # 1 slow of 100 is the 100th percentile, not the 99th: passes; 2 of 100 is the 99th: fails
    ok = run(Scripted(traffic=lambda s: (s.serve(99), s.serve(1, seconds=0.3)) if s.polls == 1 else None))
    assert ok.passed and ok.p99_ms == 5.0
    bad = run(Scripted(traffic=lambda s: (s.serve(98), s.serve(2, seconds=0.3)) if s.polls == 1 else None))
    assert not bad.passed and bad.reason == "p99_latency" and bad.p99_ms == 500.0 and bad.seconds == 3.0
    assert "p99 latency 500 ms over 250 ms" in bad.summary
    worst = run(Scripted(traffic=lambda s: s.serve(20, seconds=3.0)))
    assert not worst.passed and math.isinf(worst.p99_ms) and worst.largest_bucket_ms == 2500
    assert "p99 latency above the largest bucket over 250 ms" in worst.summary
    assert "p99 above 2500 ms" in worst.summary
    assert worst.as_dict()["p99_ms"] is None and worst.as_dict()["p99_above_largest_bucket"] is True
    json.dumps(worst.as_dict(), allow_nan=False)  # what the ledger accepts
    assert ok.as_dict()["p99_ms"] == 5.0 and ok.as_dict()["p99_above_largest_bucket"] is False


def test_a_restarted_worker_starts_from_zero_and_is_still_counted():
    def traffic(s):
        if s.polls == 1:
            s.serve(30, worker=0)
            s.serve(5, worker=1)
        elif s.polls == 2:  # worker 0 dies and is being restarted: it does not answer
            s.down.add(0)
        elif s.polls == 3:  # ...and is back as a new process, counting from zero
            s.down.clear()
            s.workers[0] = s.fresh()
            s.serve(10, worker=0)
        elif s.polls == 4:  # worker 1 restarted between two polls, same start time even (counters went down)
            s.workers[1][0] = Metrics()
            s.serve(3, 503, worker=1)

    s = Scripted(workers=2, traffic=traffic)
    s.serve(50, worker=0)
    s.serve(50, 500, worker=1)
    v = run(s, max_error_rate=0.1)
    assert (v.requests, v.errors, v.worker_restarts) == (48, 3, 2)
    assert v.passed


def test_a_version_that_no_longer_serves_fails_at_once():
    def crash(s):
        s.serve(5)
        if s.polls == 2:
            s.current = False  # crash-looped and stopped: no version is current

    v = run(Scripted(traffic=crash))
    assert not v.passed and v.reason == "not_serving" and v.seconds == 1.0 and v.requests == 5
    assert "version 7 no longer serves: no version is current" in v.summary

    def replaced(s):
        if s.polls == 1:
            s.version = "6"  # rolled back by the supervisor

    v = run(Scripted(traffic=replaced))
    assert not v.passed and v.reason == "not_serving" and v.seconds == 0.5
    assert "the current workers serve version 6" in v.summary

    gone = Scripted()
    gone.current = False
    v = run(gone)
    assert not v.passed and v.reason == "not_serving" and v.seconds == 0.0 and gone.polls == 0


# -- for real ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from resources.serving.faults import save_fault_model

    root = tmp_path_factory.mktemp("bake_models")
    good = save_credit_model(root / "good")
    return {
        "good": good,
        "errors": save_fault_model(root / "errors", base_model_dir=good, error_rate=0.5),
        "slow": save_fault_model(root / "slow", base_model_dir=good, latency_ms=300),
        "unloadable": save_fault_model(root / "unloadable", base_model_dir=good, fail_on_load=True),
    }


@pytest.fixture(scope="module")
def deployer(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bake_run")
    d = LocalProcessDeployer(run_dir, port_base=_free_port_base(), inference_log_dir=run_dir / "logs",
                             artifact_roots=[tmp_path_factory.getbasetemp()])
    yield d
    d.stop_all()


def release(models, name: str, version: str, workers: int = 1) -> Release:
    return model_release(version, models[name], {"model_name": "credit_risk", "pii_columns": []}, workers=workers)


class Traffic:
    """A client calling /predict in a loop in a thread until stopped, with the caller's credential
    ``headers`` (none: an anonymous client); counts answers by status."""

    def __init__(self, address: str, headers: dict[str, str]):
        self.address, self.headers = address, headers
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = json.dumps(ROW).encode()
        while not self.stop.is_set():
            req = urllib.request.Request(self.address + "/predict", data=body,
                                         headers={"content-type": "application/json", **self.headers})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    self.statuses.append(r.status)
            except urllib.error.HTTPError as err:
                self.statuses.append(err.code)

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def test_real_bake_passes_with_healthy_traffic_across_workers(deployer, models):
    target = Target("bake_good", "prod")
    headers = caller_headers(deployer, target)
    st = deployer.deploy(target, release(models, "good", "1", workers=2))
    texts = deployer.worker_metrics(target)
    assert len(texts) == 2 and all('onepath_model_info{endpoint="bake_good",env="prod",version="1"} 1' in t
                                   for t in texts)
    with Traffic(st.address, headers) as traffic:
        v = bake(deployer, target, "1", policy(seconds=3, poll_seconds=0.2, max_p99_latency_ms=2500))
    assert v.passed, v.summary
    assert v.requests >= 20 and v.errors == 0 and v.reason == "passed" and v.seconds >= 3
    assert v.requests <= len(traffic.statuses) and set(traffic.statuses) == {200}
    deployer.delete(target)
    assert deployer.worker_metrics(target) == []
    gone = bake(deployer, target, "1", policy(seconds=3, poll_seconds=0.2))
    assert not gone.passed and gone.reason == "not_serving"


def test_real_bake_fails_on_the_fault_models_errors(deployer, models):
    target = Target("bake_fault", "prod")
    headers = caller_headers(deployer, target)
    deployer.deploy(target, release(models, "good", "1"))
    st = deployer.deploy(target, release(models, "errors", "2"))
    with Traffic(st.address, headers) as traffic:
        v = bake(deployer, target, "2", policy(seconds=3, poll_seconds=0.2, min_requests=10,
                                               max_p99_latency_ms=2500))
    assert not v.passed and v.reason == "error_rate", v.summary
    assert v.errors > 0 and v.error_rate > 0.3 and "error rate" in v.summary
    assert 500 in traffic.statuses and 200 in traffic.statuses  # the model raised on a share of calls
    deployer.delete(target)


def test_real_bake_fails_on_injected_latency(deployer, models):
    target = Target("bake_slow", "prod")
    headers = caller_headers(deployer, target)
    st = deployer.deploy(target, release(models, "slow", "1"))
    with Traffic(st.address, headers):
        v = bake(deployer, target, "1", policy(seconds=2, poll_seconds=0.2, min_requests=3))
    # each call sleeps 300 ms, so every request is in the (0.25, 0.5] bucket or above
    assert not v.passed and v.reason == "p99_latency" and v.p99_ms >= 500, v.summary
    deployer.delete(target)


def test_real_bake_without_traffic(deployer, models):
    target = Target("bake_idle", "prod")
    st = deployer.deploy(target, release(models, "good", "1"))
    v = bake(deployer, target, "1", policy(seconds=1, poll_seconds=0.2))
    assert not v.passed and v.reason == "too_little_traffic" and v.requests == 0
    assert "too little traffic: 0 of 20 requests" in v.summary
    # callers without a credential are refused before the version sees them: no traffic for its bake
    # (they cannot make a version pass, nor dilute its error rate or p99), counted by caller all the same
    with Traffic(st.address, {}) as anonymous:
        v = bake(deployer, target, "1", policy(seconds=1, poll_seconds=0.2))
    assert len(anonymous.statuses) >= 20 and set(anonymous.statuses) == {401}
    assert not v.passed and v.reason == "too_little_traffic" and v.requests == 0, v.summary
    [text] = deployer.worker_metrics(target)
    assert 'caller="anonymous",route="/predict",status="401"' in text
    assert 'route="/predict",status="401"} ' not in text.split("# HELP onepath_caller_requests_total")[0]
    v = bake(deployer, target, "1", policy(seconds=1, poll_seconds=0.2, pass_without_traffic=True))
    assert v.passed and v.reason == "passed_without_traffic"
    deployer.delete(target)


def test_a_fault_model_that_fails_at_load_never_takes_traffic(deployer, models):
    target = Target("bake_unloadable", "prod")
    try:
        with pytest.raises(DeployError, match="(?s)version 1 failed to start.*FaultInjected: fault injected: fail_on_load"):
            deployer.deploy(target, release(models, "unloadable", "1"))
        assert deployer.worker_metrics(target) == []
    finally:
        deployer.delete(target)
