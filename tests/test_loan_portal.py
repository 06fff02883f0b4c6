"""loan_portal app: driven through httpx.ASGITransport, scored by a real HTTP server on loopback.

The scoring endpoint is a small ASGI app served by uvicorn in a thread on a port the OS picks. It
records every request it receives. The path chooses its answer: ``/predict`` says 0.1,
``/p/<x>/predict`` says x, ``/broken/predict`` answers 500 (with an otherwise well-formed body).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "loan_portal"
sys.path.insert(0, str(APP_DIR))  # the platform puts --app-dir on sys.path the same way

from loan_portal.main import app  # noqa: E402

PII = {"full_name": "Ada <b>Lovelace</b>", "national_id": "NI-998877", "email": "ada@example.org"}
VALID: dict[str, Any] = {
    **PII, "gender": "F", "age_band": "36-50", "annual_income": 52000, "loan_amount": 12000.5,
    "loan_term_months": 36, "debt_to_income": 0.31, "credit_history_years": 7.5, "num_open_accounts": 4,
    "delinquencies_2y": 0, "employment_type": "salaried", "home_ownership": "mortgage", "purpose": "car",
}
FLOATS = {"annual_income", "loan_amount", "debt_to_income", "credit_history_years"}
INTS = {"loan_term_months", "num_open_accounts", "delinquencies_2y"}
STRINGS = {"application_id", "gender", "age_band", "employment_type", "home_ownership", "purpose"}
APP_ID = re.compile(r"WEB-[0-9a-f]{12}")


class Scorer:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.started = threading.Event()
        self.url = ""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                await send({"type": f"{kind}.complete"})
                if kind == "lifespan.startup":
                    self.started.set()
                else:
                    return
        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.calls.append({"path": scope["path"], "headers": headers, "raw": body, "json": json.loads(body)})
        m = re.fullmatch(r"(?:/p/([0-9.]+))?/predict", scope["path"])
        prob = float(m.group(1) or 0.1) if m else 0.1
        # a broken endpoint still sends a well-formed body: only its status says it failed
        status = 200 if m else 500
        payload = {"request_id": headers.get("x-request-id"), "model": "credit_scoring", "version": "7",
                   "predictions": [{"prediction": int(prob >= 0.5), "probability": prob}]}
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


@pytest.fixture(scope="module")
def scorer_server():
    scorer = Scorer()
    sock = socket.create_server(("127.0.0.1", 0))  # listening before the thread starts: nothing races
    server = uvicorn.Server(uvicorn.Config(scorer, lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert scorer.started.wait(30), "scoring stub did not start"
    scorer.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield scorer
    server.should_exit = True
    thread.join(30)
    sock.close()
    assert not thread.is_alive()


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("ONEPATH_RELEASE_VERSION", "3.1.4")
    monkeypatch.setenv("ONEPATH_ENV", "staging")
    monkeypatch.delenv("ONEPATH_CREDIT_SCORING_URL", raising=False)
    monkeypatch.delenv("ONEPATH_CREDENTIALS_DIR", raising=False)
    return monkeypatch


@pytest.fixture
def scorer(scorer_server, env):
    scorer_server.calls.clear()
    env.setenv("ONEPATH_CREDIT_SCORING_URL", scorer_server.url)
    return scorer_server


@pytest.fixture
def closed_url():
    """A loopback port that is bound but not listening: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


class Portal:
    """Synchronous face over httpx.ASGITransport: each call runs the app in a fresh event loop."""

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://portal") as c:
                return await c.request(method, url, **kwargs)

        return asyncio.run(go())

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@pytest.fixture
def client():
    return Portal()


def test_form_page_renders_every_field_with_version_and_env(client, scorer):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "release 3.1.4" in r.text and "env staging" in r.text
    for name in VALID:
        assert f'name="{name}"' in r.text
    assert "not configured" not in r.text


def test_form_page_says_scoring_is_not_configured(client):
    assert "Credit scoring is not configured" in client.get("/").text


def test_api_apply_scores_without_pii_and_with_typed_features(client, scorer):
    r = client.post("/api/apply", json=VALID)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"application_id", "decision", "probability_of_default", "model_version"}
    assert APP_ID.fullmatch(out["application_id"])
    assert out["decision"] == "approve" and out["probability_of_default"] == 0.1 and out["model_version"] == "7"

    [call] = scorer.calls
    assert call["path"] == "/predict"
    assert call["headers"]["x-request-id"] == out["application_id"]
    [record] = call["json"]["records"]
    assert set(call["json"]) == {"records"}
    assert set(record) == FLOATS | INTS | STRINGS
    assert record["application_id"] == out["application_id"]
    for key in PII:
        assert key not in record
    for value in PII.values():
        assert value.encode() not in call["raw"]
    assert all(type(record[k]) is float for k in FLOATS)
    assert all(type(record[k]) is int for k in INTS)
    assert all(type(record[k]) is str for k in STRINGS)
    assert record["annual_income"] == 52000.0 and record["loan_term_months"] == 36


@pytest.mark.parametrize("prob, decision", [
    (0.0, "approve"), (0.19, "approve"), (0.2, "refer"), (0.39, "refer"), (0.4, "decline"), (0.95, "decline"),
])
def test_decision_follows_probability_of_default(client, scorer, env, prob, decision):
    env.setenv("ONEPATH_CREDIT_SCORING_URL", f"{scorer.url}/p/{prob}")
    r = client.post("/api/apply", json=VALID)
    assert r.status_code == 200 and r.json()["decision"] == decision
    assert r.json()["probability_of_default"] == prob


@pytest.mark.parametrize("field, value", [
    ("annual_income", "lots"), ("gender", "Q"), ("age_band", "17"), ("loan_term_months", 18),
    ("num_open_accounts", 2.5), ("delinquencies_2y", True), ("debt_to_income", -1), ("loan_amount", "nan"),
    ("email", "not-an-email"), ("purpose", "yacht"), ("full_name", None), ("full_name", "   "),
    ("salary", 1),
])
def test_api_bad_field_is_422_naming_the_field(client, scorer, field, value):
    body = {**VALID, field: value}
    if value is None:
        del body[field]
    r = client.post("/api/apply", json=body)
    assert r.status_code == 422
    assert r.json()["field"] == field and field in r.json()["error"]
    assert scorer.calls == []


def test_api_body_that_is_not_an_object_is_422(client, scorer):
    assert client.post("/api/apply", content=b"{nope").status_code == 422
    r = client.post("/api/apply", json=[VALID])
    assert r.status_code == 422 and r.json()["field"] is None
    assert scorer.calls == []


def test_api_scoring_unreachable_is_503(client, env, closed_url):
    env.setenv("ONEPATH_CREDIT_SCORING_URL", closed_url)
    r = client.post("/api/apply", json=VALID)
    assert r.status_code == 503 and r.json() == {"error": "credit scoring is unavailable"}


def test_api_scoring_error_is_503(client, scorer, env):
    env.setenv("ONEPATH_CREDIT_SCORING_URL", f"{scorer.url}/broken")
    r = client.post("/api/apply", json=VALID)
    assert r.status_code == 503 and "unavailable" in r.json()["error"]
    assert [c["path"] for c in scorer.calls] == ["/broken/predict"]


def test_api_scoring_not_configured_is_503(client):
    r = client.post("/api/apply", json=VALID)
    assert r.status_code == 503 and r.json() == {"error": "credit scoring is not configured"}


def test_html_apply_shows_decision(client, scorer, env):
    env.setenv("ONEPATH_CREDIT_SCORING_URL", f"{scorer.url}/p/0.3")
    r = client.post("/apply", data={k: str(v) for k, v in VALID.items()})
    assert r.status_code == 200, r.text
    assert "Referred to an underwriter" in r.text and "30.0%" in r.text and "<dd>7</dd>" in r.text
    [call] = scorer.calls
    assert APP_ID.fullmatch(call["headers"]["x-request-id"]) and call["headers"]["x-request-id"] in r.text
    assert not set(PII) & set(call["json"]["records"][0])
    assert type(call["json"]["records"][0]["loan_term_months"]) is int


def test_html_bad_field_rerenders_form_with_400_and_escapes_input(client, scorer):
    form = {k: str(v) for k, v in VALID.items()} | {"annual_income": "abc", "full_name": "<script>x</script>"}
    r = client.post("/apply", data=form)
    assert r.status_code == 400
    assert "annual_income must be a number" in r.text
    assert "<script>x" not in r.text and "&lt;script&gt;x" in r.text
    assert 'name="loan_amount"' in r.text and "release 3.1.4" in r.text
    assert scorer.calls == []


def test_html_scoring_unreachable_is_503_page(client, env, closed_url):
    env.setenv("ONEPATH_CREDIT_SCORING_URL", closed_url)
    r = client.post("/apply", data={k: str(v) for k, v in VALID.items()})
    assert r.status_code == 503 and "credit scoring is unavailable" in r.text
    assert "Traceback" not in r.text and "release 3.1.4" in r.text


def test_health_and_version_contract(client, scorer):
    assert client.get("/health").json() == {"status": "ok", "version": "3.1.4"}
    assert client.get("/version").json() == {
        "app": "loan_portal", "version": "3.1.4", "env": "staging", "scoring_url": scorer.url}


def test_version_defaults(client, env):
    env.delenv("ONEPATH_RELEASE_VERSION")
    env.delenv("ONEPATH_ENV")
    assert client.get("/health").json() == {"status": "ok", "version": "dev"}
    assert client.get("/version").json() == {"app": "loan_portal", "version": "dev", "env": "dev",
                                             "scoring_url": None}


def test_each_scoring_call_carries_the_credential_onepath_handed_the_release_and_a_rotation_reaches_it(
        client, scorer, env, tmp_path):
    """The platform writes the release's credential to $ONEPATH_CREDENTIALS_DIR/CREDIT_SCORING (owner-only,
    replaced atomically on rotation); the portal sends it as a bearer token with each call, read again when
    the file changed, and never shows it to its own caller."""
    from resources.files import atomic_write

    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    first = "op1.credit_scoring.staging.0123456789ab." + "a" * 43
    atomic_write(creds / "CREDIT_SCORING", first.encode())
    env.setenv("ONEPATH_CREDENTIALS_DIR", str(creds))
    r = client.post("/api/apply", json=VALID)
    assert r.status_code == 200 and first not in r.text
    assert scorer.calls[-1]["headers"]["authorization"] == f"Bearer {first}"
    rotated = "op1.credit_scoring.staging.0123456789ab." + "b" * 43
    atomic_write(creds / "CREDIT_SCORING", rotated.encode())
    assert client.post("/api/apply", json=VALID).status_code == 200
    assert scorer.calls[-1]["headers"]["authorization"] == f"Bearer {rotated}"


def test_without_a_credential_the_call_carries_none(client, scorer):
    assert client.post("/api/apply", json=VALID).status_code == 200
    assert "authorization" not in scorer.calls[-1]["headers"]


def test_serves_under_the_platform_child_process(scorer, tmp_path):
    """The way the platform runs a release: resources.serving.child with --app-dir on inherited sockets
    (the shared stable TCP socket, and a private health socket that is a Unix socket), taking
    connections on the stable one once the supervisor's activation came on the private one."""
    from resources.serving.protocol import ACTIVATE_ROUTE, unix_get
    from tests.conftest import wait_for

    stable = socket.create_server(("127.0.0.1", 0))
    health = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    health.bind(str(tmp_path / "w.sock"))
    health.listen(16)
    env = {**os.environ, "ONEPATH_LISTEN_FDS": f"{stable.fileno()},{health.fileno()}",
           "ONEPATH_RELEASE_VERSION": "9.9.9", "ONEPATH_ENV": "test",
           "ONEPATH_CREDIT_SCORING_URL": scorer.url, "ONEPATH_DRAIN_SECONDS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "resources.serving.child", "--app-dir", str(APP_DIR), "--app", "loan_portal.main:app"],
        cwd=ROOT, env=env, pass_fds=(stable.fileno(), health.fileno()))
    try:
        got = wait_for("the release answering on its private socket", lambda: unix_get(str(tmp_path / "w.sock"),
                                                                                       "/health", 10), 60)
        assert got[0] == 200 and json.loads(got[1])["version"] == "9.9.9"
        assert unix_get(str(tmp_path / "w.sock"), ACTIVATE_ROUTE, 10, method="POST")[0] == 200
        with httpx.Client(base_url=f"http://127.0.0.1:{stable.getsockname()[1]}", timeout=60) as http:
            assert http.get("/health").json() == {"status": "ok", "version": "9.9.9"}
            r = http.post("/api/apply", json=VALID)
            assert r.status_code == 200 and r.json()["decision"] == "approve"
        assert scorer.calls[-1]["headers"]["x-request-id"] == r.json()["application_id"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) is not None
        stable.close()
        health.close()
