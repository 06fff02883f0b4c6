"""Issue 11, the serving level: only declared callers reach an endpoint, and only declared data is logged.

Attacked the way a process on the host would try it: real worker processes (two) behind a real
supervisor (LocalProcessDeployer on loopback), the access table written through the deployer's
``publish_grants``, requests over real HTTP to the stable address and to a worker's own private
Unix socket. Each test says why it fails on main (before issue 11 every route answered anyone).
"""

from __future__ import annotations

import http.client
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from resources.deployers.base import Target
from resources.deployers.local import LocalProcessDeployer
from resources.serving import protocol
from resources.serving.access import backend_token, bearer, make_token
from tests.conftest import access_table, artifact_roots, model_release, new_grant, wait_for, worker_facts

TARGET = Target("acc_ep", "prod", kind="endpoint")
OTHER = Target("acc_other", "prod", kind="endpoint")  # another team's endpoint
GOOD = {"income": 61.5, "accounts": 3}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = pd.DataFrame({"income": rng.normal(50, 10, 300), "accounts": rng.integers(0, 9, 300)})
    y = (X.income + rng.normal(0, 5, 300) > 50).astype(int)
    model_dir = tmp_path_factory.mktemp("acc") / "m"
    est = LogisticRegression().fit(X, y)
    mlflow.sklearn.save_model(est, str(model_dir), signature=infer_signature(X, est.predict(X)),
                              input_example=X.head(2))
    return model_dir


class World:
    def __init__(self, deployer: LocalProcessDeployer, address: str, log_dir: Path):
        self.deployer, self.address, self.log_dir = deployer, address, log_dir
        self.app_grant, self.app_token = new_grant(TARGET, "app:loan_portal", ("predict", "version"))
        self.ops_grant, self.ops_token = new_grant(TARGET, "prometheus", ("metrics",))
        self.bodies: list[bytes] = []  # every response body a test saw: none may hold a token
        self.generation = 1

    def publish(self, *grants: dict) -> None:
        self.generation += 1
        self.deployer.publish_grants(TARGET, access_table(TARGET, list(grants), self.generation))

    def restore(self) -> None:
        self.publish(self.app_grant, self.ops_grant)

    def request(self, method: str, path: str, headers: dict | None = None, body: dict | None = None):
        """(status, headers, parsed body) from the stable address."""
        u = urlsplit(self.address)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        self.bodies.append(raw)
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = raw.decode()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc

    def predict(self, headers: dict | None, record: dict | None = None, request_id: str | None = None):
        h = {**(headers or {}), **({"x-request-id": request_id} if request_id else {})}
        return self.request("POST", "/predict", h, record or GOOD)

    def counter(self, name: str, **labels: str) -> float:
        """``name`` summed over every current worker's /metrics, for the lines carrying ``labels``."""
        total = 0.0
        for text in self.deployer.worker_metrics(TARGET):
            for line in text.splitlines():
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def world(settings, tiny_model):
    deployer = LocalProcessDeployer(settings.run_dir, port_base=settings.port_base,
                                    inference_log_dir=settings.inference_log_dir,
                                    artifact_roots=artifact_roots(settings))
    w = World(deployer, "", settings.inference_log_dir / TARGET.name / TARGET.env)
    w.restore()  # published before the first deploy: the workers read it from their first request
    st = deployer.deploy(TARGET, model_release("1", tiny_model, {
        "model_name": "tiny", "pii_columns": ["full_name"], "pass_through": ["application_id"]}, workers=2))
    w.address = st.address
    yield w
    deployer.delete(TARGET)


APP = lambda w: bearer(w.app_token)  # noqa: E731


def test_the_declared_caller_gets_its_answers(world):
    # the control: the granted caller is served on the routes it was granted
    code, _, out = world.predict(APP(world))
    assert code == 200 and out["version"] == "1"
    assert world.request("GET", "/version", APP(world))[0] == 200
    assert world.request("GET", "/health")[0] == 200  # /health needs no credential


def test_no_credential_is_401(world):
    # fails on main: every route answered 200 without any credential
    for method, path, body in [("POST", "/predict", GOOD), ("POST", "/invocations", {"dataframe_records": [GOOD]}),
                               ("GET", "/version", None), ("GET", "/metrics", None), ("GET", "/nope", None),
                               ("GET", protocol.WORKER_ROUTE, None)]:
        code, headers, out = world.request(method, path, None, body)
        assert code == 401, (path, code, out)
        assert out["credential"] == "missing" and "Authorization: Bearer" in out["error"]
        assert headers["www-authenticate"] == 'Bearer realm="onepath"'


def test_bogus_credentials_are_401(world):
    # fails on main: a made-up token, a team header or a guessed grant were all served (200)
    gid = world.app_grant["id"]
    bogus = [
        {"authorization": "Bearer hunter2"},
        {"authorization": "Basic YWRtaW46YWRtaW4="},
        {"x-team": "credit", "x-onepath-caller": "app:loan_portal"},
        bearer(make_token(TARGET.name, TARGET.env, "0123456789ab", "A" * 43)),  # unknown grant
        bearer(make_token(TARGET.name, TARGET.env, gid, "B" * 43)),  # the real grant id, a guessed secret
        bearer(world.app_token + "x"),
    ]
    for headers in bogus:
        code, _, out = world.predict(headers)
        assert code == 401, (headers, out)
        assert out["credential"] in ("missing", "invalid")


def test_another_endpoints_or_environments_credential_is_403(world):
    # fails on main: the server never looked at a credential, so another team's one was served (200)
    grant, token = new_grant(OTHER, "app:loan_portal", ("predict", "version"))
    world.deployer.publish_grants(OTHER, access_table(OTHER, [grant]))  # valid, at its own endpoint
    code, _, out = world.predict(bearer(token))
    assert code == 403 and "acc_other" in out["error"] and "acc_ep" in out["error"]
    staging = make_token(TARGET.name, "staging", world.app_grant["id"], world.app_token.rsplit(".", 1)[1])
    code, _, out = world.predict(bearer(staging))
    assert code == 403 and "env staging" in out["error"] and "env prod" in out["error"]
    code, _, out = world.request("GET", "/metrics", APP(world))  # its own endpoint, a route not granted
    assert code == 403 and "predict, version" in out["error"]


def test_revocation_takes_effect_on_the_next_request_without_a_redeploy(world):
    # fails on main: there was no access table to revoke anything in; the caller kept getting 200
    pids = [f["pid"] for f in worker_facts(world.deployer, TARGET)]
    assert world.predict(APP(world))[0] == 200
    revoked = {**world.app_grant, "revoked": {"at": "2026-12-01T09:00:00Z", "why": "key leaked in a ticket"}}
    world.publish(revoked, world.ops_grant)
    try:
        for _ in range(6):  # the very next requests, on whichever worker each lands
            code, _, out = world.predict(APP(world))
            assert code == 403 and "revoked at 2026-12-01T09:00:00Z: key leaked in a ticket" in out["error"]
        assert [f["pid"] for f in worker_facts(world.deployer, TARGET)] == pids  # the same processes
    finally:
        world.restore()
    assert world.predict(APP(world))[0] == 200


def test_a_rotated_out_secret_is_403_while_the_new_one_works(world):
    # fails on main: an old secret was never refused (nothing was)
    grant, old = new_grant(TARGET, "app:loan_portal", ("predict",))
    new = make_token(TARGET.name, TARGET.env, grant["id"], "N" * 43)
    from resources.serving.access import token_sha256

    now = datetime.now(timezone.utc)
    overlap = {**grant, "secrets": [{"sha256": token_sha256(new), "not_after": None},
                                    {"sha256": token_sha256(old), "not_after": (now + timedelta(hours=1)).isoformat()}]}
    world.publish(overlap)
    try:
        assert world.predict(bearer(old))[0] == 200 and world.predict(bearer(new))[0] == 200  # the overlap
        ended = {**overlap, "secrets": [overlap["secrets"][0],
                                        {**overlap["secrets"][1], "not_after": (now - timedelta(seconds=1)).isoformat()}]}
        world.publish(ended)
        for _ in range(4):
            code, _, out = world.predict(bearer(old))
            assert code == 403 and "rotated out" in out["error"]
            assert world.predict(bearer(new))[0] == 200
    finally:
        world.restore()


def test_the_workers_private_socket(world):
    # fails on main: the private socket answered /version (with pid and run id) and /metrics to anyone
    slot = world.deployer.slot_dir(TARGET)
    cur = protocol.control_call(slot, "/status")["current"]
    sock = protocol.worker_socket(slot, cur["id"], 0)
    for route in ("/version", "/metrics", protocol.WORKER_ROUTE, "/predict"):
        got = protocol.unix_get(sock, route, 5.0)
        assert got is not None and got[0] == 401, (route, got)
    sup = backend_token(protocol.read_secret(slot), TARGET.name, TARGET.env, "supervisor")
    code, _, out = world.request("GET", protocol.WORKER_ROUTE, bearer(sup))  # the supervisor's token over TCP
    assert code == 403 and "private socket" in out["error"]
    assert world.request("GET", "/version", bearer(sup))[0] == 403
    got = protocol.unix_get(sock, protocol.WORKER_ROUTE, 5.0, headers=bearer(sup))
    assert got[0] == 200 and json.loads(got[1])["pid"] == cur["pids"][0]
    assert protocol.unix_get(sock, "/predict", 5.0, method="POST", headers=bearer(sup))[0] == 403
    probe = world.deployer.probe_credential(TARGET)
    assert world.request("GET", "/version", bearer(probe))[0] == 200
    assert world.predict(bearer(probe))[0] == 403
    world.bodies.append(got[1])


def test_version_tells_a_caller_only_what_it_needs(world):
    # fails on main: /version answered pid, run_id, loaded_at and native_threads
    code, _, out = world.request("GET", "/version", APP(world))
    assert code == 200
    assert set(out) == {"endpoint", "env", "model", "version", "digest", "flavor", "features"}


def test_refusals_are_counted_by_caller_and_never_show_a_token(world):
    # fails on main: there was no onepath_caller_requests_total, and nothing was refused
    before = {k: world.counter("onepath_caller_requests_total", **lbl) for k, lbl in {
        "anon": {"caller": "anonymous", "route": "/predict", "status": "401"},
        "unrec": {"caller": "unrecognised", "route": "/predict", "status": "401"},
        "app403": {"caller": "app:loan_portal", "route": "/metrics", "status": "403"},
        "app200": {"caller": "app:loan_portal", "route": "/predict", "status": "200"},
    }.items()}
    world.predict(None)
    world.predict({"authorization": "Bearer op1.acc_ep.prod.0123456789ab." + "Z" * 43})
    world.request("GET", "/metrics", APP(world))
    world.predict(APP(world))
    code, _, text = world.request("GET", "/metrics", bearer(world.ops_token))
    assert code == 200 and "onepath_caller_requests_total" in text
    after = {"anon": world.counter("onepath_caller_requests_total", caller="anonymous", route="/predict", status="401"),
             "unrec": world.counter("onepath_caller_requests_total", caller="unrecognised", route="/predict",
                                    status="401"),
             "app403": world.counter("onepath_caller_requests_total", caller="app:loan_portal", route="/metrics",
                                     status="403"),
             "app200": world.counter("onepath_caller_requests_total", caller="app:loan_portal", route="/predict",
                                     status="200")}
    assert {k: after[k] - before[k] for k in after} == {"anon": 1, "unrec": 1, "app403": 1, "app200": 1}
    slot = world.deployer.slot_dir(TARGET)
    secrets_ = [world.app_token, world.ops_token, world.deployer.probe_credential(TARGET),
                backend_token(protocol.read_secret(slot), TARGET.name, TARGET.env, "supervisor")]
    secret_parts = [t.rsplit(".", 1)[1] for t in secrets_]
    for body in world.bodies:  # everything every test of this module was answered
        assert not any(s.encode() in body for s in secrets_ + secret_parts), body[:200]


def test_only_declared_fields_are_logged(world):
    # fails on main: an undeclared field (phone) was written verbatim into the inference log, uncounted
    before = world.counter("onepath_inference_log_undeclared_fields_total")
    record = {**GOOD, "phone": "+44 7700 900123", "application_id": "APP-77", "full_name": "Ada Lovelace"}
    code, _, out = world.predict(APP(world), record, request_id="acc-extra-1")
    assert code == 200

    def mine() -> list[dict]:
        return [e for f in sorted(world.log_dir.glob("*.jsonl")) for e in map(json.loads, f.read_text().splitlines())
                if e["request_id"] == "acc-extra-1"]

    lines = wait_for("the request's inference log line", mine, 10)  # written right after the answer
    assert len(lines) == 1
    entry = lines[0]
    assert entry["extras"] == {"application_id": "APP-77"}  # the declared pass-through is kept
    assert entry["inputs"] == GOOD
    text = "".join(f.read_text() for f in world.log_dir.glob("*.jsonl"))
    assert "+44 7700 900123" not in text and '"phone"' not in text and "Ada Lovelace" not in text
    # phone (undeclared) and full_name (PII, outside the signature): each dropped from the log and counted
    assert world.counter("onepath_inference_log_undeclared_fields_total") - before == 2


def test_a_bad_access_table_keeps_the_last_good_one_and_says_so_in_health(world):
    # fails on main: there was no access table, and /health had nothing to say about one
    path = protocol.private_dir(world.deployer.slot_dir(TARGET)) / "access.json"
    path.write_text("{ not json")
    try:
        assert world.predict(APP(world))[0] == 200  # the last good table
        code, _, health = world.request("GET", "/health")
        assert code == 200 and health["status"] == "degraded"
        assert any(str(path) in p and "not JSON" in p for p in health["problems"])
    finally:
        world.restore()
    assert world.request("GET", "/health")[2]["status"] == "ok"
