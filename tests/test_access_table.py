"""resources.serving.access: tokens, backend credentials, the access table and its judge, the app side.

Unit level (no worker processes): the attacks at the serving level are in tests/test_endpoint_access.py."""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from resources.files import atomic_write
from resources.serving import access
from resources.serving.access import AccessTable, backend_token, make_token, parse_token, token_sha256
from resources.serving.protocol import WORKER_ROUTE

EP, ENV = "credit_scoring", "prod"
SLOT_SECRET = bytes(range(32))


def new_token(endpoint: str = EP, env: str = ENV) -> tuple[str, str]:
    gid = secrets.token_hex(6)
    return gid, make_token(endpoint, env, gid, secrets.token_urlsafe(32))


def grant(gid: str, tokens: list[tuple[str, str | None]], caller: str = "app:loan_portal",
          routes: tuple[str, ...] = ("predict", "version"), revoked: dict | None = None) -> dict:
    return {"id": gid, "caller": caller, "routes": list(routes), "revoked": revoked,
            "secrets": [{"sha256": token_sha256(t), "not_after": na} for t, na in tokens]}


def write_table(path: Path, grants: list[dict], generation: int = 1, **over) -> None:
    doc = {"version": 1, "endpoint": EP, "env": ENV, "generation": generation,
           "updated_at": "2026-12-01T00:00:00+00:00", "grants": grants, **over}
    atomic_write(path, json.dumps(doc).encode())


def h(token: str | None) -> list[tuple[bytes, bytes]]:
    return [(b"host", b"x")] + ([(b"authorization", f"Bearer {token}".encode())] if token else [])


def table(tmp_path: Path) -> AccessTable:
    return AccessTable(EP, ENV, tmp_path / "access.json",
                       access.backend_credentials(SLOT_SECRET, EP, ENV))


def test_token_round_trip_and_malformed_ones():
    gid, tok = new_token()
    assert parse_token(tok)[:3] == (EP, ENV, gid)
    for bad in ["", "op1", "op2.credit_scoring.prod.a1b2c3d4e5f6.xxxxxxxxxxxxxxxxxxxxxxxx",
                "op1.Credit.prod.a1b2c3d4e5f6.xxxxxxxxxxxxxxxxxxxxxxxx", "op1.credit_scoring.prod.zz.xxxxxxxxxxxxxxxxxxxxxxx",
                tok + ".extra", "op1.credit_scoring.prod.a1b2c3d4e5f6.short"]:
        assert parse_token(bad) is None, bad
    with pytest.raises(ValueError) as err:
        make_token("Bad-Name", ENV, gid, "s" * 30)
    assert "s" * 30 not in str(err.value)


def test_backend_tokens_are_derived_per_slot_and_per_role():
    sup = backend_token(SLOT_SECRET, EP, ENV, "supervisor")
    probe = backend_token(SLOT_SECRET, EP, ENV, "probe")
    assert sup != probe and parse_token(sup)[2] == "supervisor"
    assert backend_token(bytes(32), EP, ENV, "supervisor") != sup
    assert backend_token(SLOT_SECRET, EP, "staging", "supervisor") != sup
    creds = access.backend_credentials(SLOT_SECRET, EP, ENV)
    assert {c["id"]: c["unix_only"] for c in creds} == {"supervisor": True, "probe": False}
    assert sup not in json.dumps(creds) and token_sha256(sup) in json.dumps(creds)
    with pytest.raises(ValueError):
        backend_token(SLOT_SECRET, EP, ENV, "admin")


def test_judge_answers(tmp_path: Path):
    t = table(tmp_path)
    now = time.time()
    gid, tok = new_token()
    mgid, metrics_tok = new_token()
    rgid, revoked_tok = new_token()
    write_table(tmp_path / "access.json", [
        grant(gid, [(tok, None)]), grant(mgid, [(metrics_tok, None)], caller="prometheus", routes=("metrics",)),
        grant(rgid, [(revoked_tok, None)], revoked={"at": "2026-11-30T10:00:00Z", "why": "app retired"}),
    ])
    ok = t.judge(h(tok), "/predict", False, now)
    assert (ok.status, ok.caller) == (200, "app:loan_portal")
    assert t.judge(h(tok), "/invocations", False, now).ok and t.judge(h(tok), "/version", False, now).ok
    v = t.judge(h(tok), "/metrics", False, now)
    assert v.status == 403 and "predict, version" in v.message
    assert t.judge(h(metrics_tok), "/metrics", False, now).caller == "prometheus"
    v = t.judge(h(None), "/predict", False, now)
    assert (v.status, v.credential, v.caller) == (401, "missing", "anonymous")
    v = t.judge([(b"authorization", b"Basic dXNlcjpwYXNz")], "/predict", False, now)
    assert (v.status, v.credential) == (401, "missing")
    v = t.judge(h("nonsense"), "/predict", False, now)
    assert (v.status, v.credential, v.caller) == (401, "invalid", "unrecognised")
    v = t.judge(h(tok[:-4] + "AAAA"), "/predict", False, now)  # right grant, wrong secret
    assert (v.status, v.credential) == (401, "invalid") and tok[-20:] not in v.message
    v = t.judge(h(new_token()[1]), "/predict", False, now)  # unknown grant
    assert (v.status, v.credential) == (401, "invalid")
    other = make_token("churn_scoring", ENV, gid, tok.rsplit(".", 1)[1])
    v = t.judge(h(other), "/predict", False, now)
    assert v.status == 403 and "churn_scoring" in v.message and EP in v.message
    v = t.judge(h(make_token(EP, "staging", gid, tok.rsplit(".", 1)[1])), "/predict", False, now)
    assert v.status == 403 and "staging" in v.message
    v = t.judge(h(revoked_tok), "/predict", False, now)
    assert v.status == 403 and "revoked at 2026-11-30T10:00:00Z: app retired" in v.message
    for verdict in (t.judge(h(x), "/predict", False, now) for x in (tok, revoked_tok, other)):
        assert tok not in verdict.message and tok.rsplit(".", 1)[1] not in verdict.message


def test_rotation_overlap_ends_without_a_write(tmp_path: Path):
    t = table(tmp_path)
    gid, old = new_token()
    new = make_token(EP, ENV, gid, secrets.token_urlsafe(32))
    write_table(tmp_path / "access.json", [grant(gid, [(new, None), (old, "2026-12-01T12:00:00+00:00")])])
    before = datetime(2026, 12, 1, 12, tzinfo=timezone.utc).timestamp() - 1
    assert t.judge(h(old), "/predict", False, before).ok
    v = t.judge(h(old), "/predict", False, before + 2)
    assert v.status == 403 and "rotated out" in v.message
    assert t.judge(h(new), "/predict", False, before + 2).ok


def test_backend_credentials_routes_and_socket(tmp_path: Path):
    t = table(tmp_path)
    now = time.time()
    sup = backend_token(SLOT_SECRET, EP, ENV, "supervisor")
    probe = backend_token(SLOT_SECRET, EP, ENV, "probe")
    assert t.judge(h(sup), WORKER_ROUTE, True, now).caller == "onepath:supervisor"
    assert t.judge(h(sup), "/metrics", True, now).ok
    v = t.judge(h(sup), WORKER_ROUTE, False, now)
    assert v.status == 403 and "private socket" in v.message
    assert t.judge(h(sup), "/predict", True, now).status == 403
    assert t.judge(h(probe), "/version", False, now).ok
    assert t.judge(h(probe), WORKER_ROUTE, True, now).status == 403
    assert t.judge(h(probe), "/predict", False, now).status == 403
    # a table cannot grant the worker route nor claim a backend id
    gid, tok = new_token()
    write_table(tmp_path / "access.json", [grant(gid, [(tok, None)], routes=("worker",))])
    assert t.judge(h(tok), WORKER_ROUTE, True, now).status == 401 and "grants.0.routes" in t.problems[0]
    write_table(tmp_path / "access.json", [{**grant(gid, [(tok, None)]), "id": "supervisor"}])
    assert "grants.0.id" in (t.refresh() or t.problems[0])


def test_reload_on_change_missing_file_and_bad_file(tmp_path: Path):
    path = tmp_path / "access.json"
    t = table(tmp_path)
    now = time.time()
    gid, tok = new_token()
    assert t.judge(h(tok), "/predict", False, now).status == 401 and t.problems == []
    write_table(path, [grant(gid, [(tok, None)])])
    assert t.judge(h(tok), "/predict", False, now).ok  # the very next request
    write_table(path, [grant(gid, [(tok, None)], revoked={"at": "2026-12-01T00:00:00Z", "why": "leaked"})], 2)
    assert t.judge(h(tok), "/predict", False, now).status == 403 and t.generation == 2
    write_table(path, [grant(gid, [(tok, None)])], 3)
    assert t.judge(h(tok), "/predict", False, now).ok
    path.write_text("{not json")
    assert t.judge(h(tok), "/predict", False, now).ok  # the last good table
    assert str(path) in t.problems[0] and "not JSON" in t.problems[0]
    write_table(path, [grant(gid, [(tok, None)])], 4, endpoint="churn_scoring")
    t.refresh()
    assert "churn_scoring" in t.problems[0]
    write_table(path, [grant(gid, [(tok, None)])], 5)
    os.chmod(path, 0o666)
    t.refresh()
    assert "mode 0666" in t.problems[0]
    os.chmod(path, 0o600)
    write_table(path, [grant(gid, [(tok, None)])], 6)
    t.refresh()
    assert t.problems == [] and t.generation == 6
    path.unlink()
    assert t.judge(h(tok), "/predict", False, now).status == 401 and t.problems == []


def test_bad_table_fields_name_the_field(tmp_path: Path):
    gid, tok = new_token()
    cases = {
        "grants.0.secrets.0.sha256": [{**grant(gid, [(tok, None)]), "secrets": [{"sha256": "x"}]}],
        "grants.0.secrets.0.not_after": [{**grant(gid, [(tok, None)]),
                                          "secrets": [{"sha256": "a" * 64, "not_after": "soon"}]}],
        "grants.0.revoked": [{**grant(gid, [(tok, None)]), "revoked": "yes"}],
        "grants.1.id": [grant(gid, [(tok, None)]), grant(gid, [(tok, None)])],
        "grants.0.caller": [grant(gid, [(tok, None)], caller="onepath:supervisor")],
    }
    for field, grants in cases.items():
        path = tmp_path / f"{field}.json"
        write_table(path, grants)
        t = AccessTable(EP, ENV, path, [])
        assert field in t.problems[0], (field, t.problems)


def test_credential_header_follows_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(access.CREDENTIALS_ENV, str(tmp_path))
    assert access.credential_header("credit_scoring") == {}
    _, tok = new_token()
    atomic_write(tmp_path / "CREDIT_SCORING", tok.encode())
    assert access.credential_header("credit_scoring") == {"authorization": f"Bearer {tok}"}
    _, tok2 = new_token()
    atomic_write(tmp_path / "CREDIT_SCORING", tok2.encode() + b"\n")
    assert access.credential_header("CREDIT_SCORING") == {"authorization": f"Bearer {tok2}"}
    (tmp_path / "CREDIT_SCORING").unlink()
    assert access.credential_header("credit_scoring") == {}
    assert access.credential_header("../etc") == {}
    monkeypatch.delenv(access.CREDENTIALS_ENV)
    assert access.credential_header("credit_scoring") == {}
