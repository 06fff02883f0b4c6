"""The tamper-evident ledger: chain, head signatures, every tampering case, concurrent writers, CLI.

Everything runs against real keys in a temporary folder and a real store: the tests that take the
``backend`` fixture run twice, on a sqlite file and on a fresh database of the session's PostgreSQL
server (the rest are about sqlite's file). Tampering is done the way an attacker with write access
would: a plain sqlite3 or psycopg2 connection that first drops the append-only triggers. The
platform's user (tier b) is this test process; the witness cases, which need a second OS user, are
in tests/test_witness.py.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.stores import LedgerBackend, attack, drop_guards
from resources.ledger import (
    GENESIS_HASH,
    KINDS,
    Entry,
    Ledger,
    LedgerResource,
    LedgerTampered,
    entry_hash,
    ledger_paths,
)

ROOT = Path(__file__).resolve().parents[1]
N = 10


# -- helpers ------------------------------------------------------------------------------------


def make_ledger(tmp_path: Path) -> Ledger:
    db, key = ledger_paths(tmp_path)
    return Ledger(db, key)


def fill(ledger: Ledger, n: int = N) -> list[Entry]:
    kinds = ["deploy", "gate_verdict", "promotion", "approval", "rollback"]
    return [
        ledger.append(kinds[i % len(kinds)], "credit_scoring" if i % 2 else "credit_risk",
                      {"version": str(i), "checks": {"roc_auc": 0.7 + i / 100}}, actor=f"user{i % 3}",
                      env=("staging", "prod", None)[i % 3])
        for i in range(n)
    ]


def tamper(ledger: Ledger, *statements: tuple[str, tuple] | str) -> None:
    """Run SQL against the ledger as an attacker would (dropping the append-only guards), in one transaction."""
    conn = attack(ledger)
    try:
        drop_guards(ledger, conn)
        for st in statements:
            sql, params = (st, ()) if isinstance(st, str) else st
            conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def select(ledger: Ledger, sql: str) -> list[tuple]:
    conn = attack(ledger)
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def sigs_of(ledger: Ledger) -> list[tuple]:
    return select(ledger, "SELECT seq, key, sig FROM head_signatures ORDER BY seq")


def rows(ledger: Ledger) -> list[tuple]:
    return select(ledger, "SELECT seq, ts, kind, subject, env, actor, data, prev_hash, hash "
                          "FROM ledger_entries ORDER BY seq")


def rehash_from(ledger: Ledger, start: int) -> None:
    """Recompute hash and prev_hash of every entry from ``start`` on, consistently."""
    all_rows = rows(ledger)
    prev = all_rows[start - 2][8] if start > 1 else GENESIS_HASH
    updates = []
    for seq, ts, kind, subject, env, actor, data, _prev, _h in all_rows[start - 1:]:
        h = entry_hash(seq, ts, kind, subject, env, actor, json.loads(data), prev)
        updates.append(("UPDATE ledger_entries SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, seq)))
        prev = h
    tamper(ledger, *updates)


def set_data(ledger: Ledger, seq: int, data: dict) -> None:
    tamper(ledger, ("UPDATE ledger_entries SET data = ? WHERE seq = ?",
                    (json.dumps(data, sort_keys=True, separators=(",", ":")), seq)))


def assert_bad(ledger: Ledger, seq: int | None, *words: str) -> None:
    v = ledger.verify()
    assert not v.ok, v
    assert v.first_bad_seq == seq, v
    for w in words:
        assert w in v.reason, v
    assert v.entries == (len(rows(ledger)) if ledger.written() else 0)


# -- the happy path -----------------------------------------------------------------------------


def test_append_read_verify(backend: LedgerBackend) -> None:
    ledger = backend.ledger()
    assert ledger.verify().ok and ledger.verify().entries == 0
    assert ledger.head() is None and ledger.entries() == []
    assert ledger.lease("credit_scoring.prod") is None and ledger.pinned_platform_key() is None
    assert not ledger.written(), "reading or verifying an unused ledger creates nothing"

    written = fill(ledger)
    assert [e.seq for e in written] == list(range(1, N + 1))
    assert written[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(written, written[1:], strict=False))
    assert ledger.entries() == written
    assert ledger.head() == written[-1]

    v = ledger.verify()
    assert (v.ok, v.entries, v.first_bad_seq, v.reason) == (True, N, None, "intact")
    assert (v.head_seq, v.head_hash, v.signed_by_pin, v.witness_seq) == (N, written[-1].hash, False, None)
    assert ledger.verify(full=True).ok

    # filters
    assert [e.seq for e in ledger.entries(kind="deploy")] == [1, 6]
    assert {e.subject for e in ledger.entries(subject="credit_risk")} == {"credit_risk"}
    assert [e.seq for e in ledger.entries(env="prod")] == [2, 5, 8]
    assert [e.seq for e in ledger.entries(since_seq=7)] == [8, 9, 10]
    assert [e.seq for e in ledger.entries(kind="promotion", subject="credit_risk", since_seq=1)] == [3]
    assert ledger.entries(kind="deploy")[0].as_dict()["data"] == {"version": "0", "checks": {"roc_auc": 0.7}}
    assert ledger.entries(kinds=["deploy", "promotion"]) == [e for e in written if e.kind in ("deploy", "promotion")]
    assert ledger.entries(kinds=["deploy"], env="prod") == [e for e in written if e.kind == "deploy" and e.env == "prod"]
    assert ledger.entries(kinds=[]) == []


def test_hash_format_is_reproducible_without_onepath(backend: LedgerBackend) -> None:
    """An auditor can re-check an entry and the head signatures with hashlib, json and the public key."""
    ledger = backend.ledger()
    fill(ledger, 3)
    for seq, ts, kind, subject, env, actor, data, prev, h in rows(ledger):
        assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"))
        payload = {"seq": seq, "ts": ts, "kind": kind, "subject": subject, "env": env,
                   "actor": actor, "data": json.loads(data), "prev_hash": prev}
        expected = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
        assert h == expected.hexdigest()
        assert ts.endswith("+00:00")
    pub = serialization.load_pem_public_key(ledger.pub_path.read_bytes())
    raw = base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    assert ledger.platform_public_key_b64() == raw
    sigs = sigs_of(ledger)
    assert [s for s, _, _ in sigs] == [1, 2, 3], "one head signature per append"
    for (seq, key, sig), row in zip(sigs, rows(ledger), strict=True):
        assert key == raw
        pub.verify(base64.b64decode(sig), f"{seq}:{row[8]}".encode())  # raises if bad
    assert not (ledger.key_path.parent / "ledger.anchor.json").exists()


def test_key_lives_outside_the_db_with_mode_0600(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    ledger.append("deploy", "credit_scoring", {}, actor="ci")
    assert ledger.key_path == tmp_path / "keys" / "platform.key"
    assert stat.S_IMODE(ledger.key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(ledger.key_path.read_bytes(), password=None)
    assert ledger.pub_path == tmp_path / "keys" / "platform.pub"
    assert ledger.pub_path.read_bytes() == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert b"PRIVATE" not in ledger.db_path.read_bytes()
    # a second ledger object (another process, say) uses the same key rather than making one
    before = ledger.key_path.read_bytes()
    Ledger(ledger.db_path, ledger.key_path).append("approval", "credit_scoring", {}, actor="ci")
    assert ledger.key_path.read_bytes() == before
    assert set(KINDS) >= {"deploy", "promotion", "promotion_refused", "approval", "rollback",
                          "gate_verdict", "alias_moved", "restart", "crashloop",
                          "retrain_requested", "first_release"}


def test_append_rejects_bad_input_and_the_db_refuses_edits(backend: LedgerBackend) -> None:
    ledger = backend.ledger()
    fill(ledger, 2)
    with pytest.raises(ValueError, match="kind"):
        ledger.append("", "x", {}, actor="a")
    with pytest.raises(TypeError, match="data"):
        ledger.append("deploy", "x", ["not", "a", "dict"], actor="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ledger.append("deploy", "x", {"auc": float("nan")}, actor="a")
    for sql in ("UPDATE ledger_entries SET actor = 'x' WHERE seq = 1", "DELETE FROM ledger_entries",
                "UPDATE head_signatures SET sig = 'x'", "DELETE FROM head_signatures",
                *(["TRUNCATE ledger_entries", "TRUNCATE head_signatures"] if backend.kind == "postgresql" else [])):
        conn = attack(ledger)
        try:
            with pytest.raises(Exception, match="append-only"):
                conn.execute(sql)
        finally:
            conn.close()
    assert ledger.verify().ok and ledger.head().seq == 2


def test_resource_builds_the_ledger(tmp_path: Path) -> None:
    db, key = ledger_paths(tmp_path)
    res = LedgerResource(location=str(db), key_path=str(key))
    entry = res.ledger().append("first_release", "loan_portal", {"release": "r-0123"}, actor="dagster")
    assert Ledger(db, key).head() == entry
    assert res.ledger().verify().ok


def test_a_run_config_cannot_unset_the_configured_witness(tmp_path: Path, monkeypatch) -> None:
    """A Dagster run config may override a resource's fields, null included: the ledger the run gets still
    asks the witness the settings configure (ONEPATH_WITNESS_SOCKET), not none."""
    import dagster as dg

    db, key = ledger_paths(tmp_path)
    socket = tmp_path / "witness.sock"
    monkeypatch.setenv("ONEPATH_WITNESS_SOCKET", str(socket))
    seen: list = []

    @dg.asset
    def probe(ledger: LedgerResource) -> None:
        seen.append(ledger.ledger().witness_socket)

    res = LedgerResource(location=str(db), key_path=str(key), witness_socket=str(socket))
    result = dg.materialize([probe], resources={"ledger": res},
                            run_config={"resources": {"ledger": {"config": {
                                "location": str(db), "key_path": str(key), "witness_socket": None}}}})
    assert result.success and seen == [socket]


# -- tampering ----------------------------------------------------------------------------------


@pytest.fixture
def filled(backend: LedgerBackend) -> Ledger:
    ledger = backend.ledger()
    fill(ledger)
    assert ledger.verify().ok
    return ledger


def test_edited_data_is_caught_at_that_entry(filled: Ledger) -> None:
    set_data(filled, 4, {"version": "999"})
    assert_bad(filled, 4, "entry #4 was altered")


def test_edited_and_rehashed_middle_entry_breaks_the_next_link(filled: Ledger) -> None:
    set_data(filled, 4, {"version": "999"})
    row = rows(filled)[3]
    seq, ts, kind, subject, env, actor, data, prev, _ = row
    tamper(filled, ("UPDATE ledger_entries SET hash = ? WHERE seq = 4",
                    (entry_hash(seq, ts, kind, subject, env, actor, json.loads(data), prev),)))
    assert_bad(filled, 5, "entry #5 does not link to entry #4")


def test_edited_and_rehashed_last_entry_breaks_its_signature(filled: Ledger) -> None:
    tamper(filled, ("UPDATE ledger_entries SET actor = 'mallory' WHERE seq = ?", (N,)))
    rehash_from(filled, N)
    assert_bad(filled, N, f"entry #{N}: its signature does not verify", "rewritten and re-hashed")


def test_a_planted_value_json_cannot_hold_is_named_not_a_crash(tmp_path: Path) -> None:
    """sqlite stores any value in any column (a BLOB in a TEXT column); PostgreSQL's types refuse it."""
    filled = make_ledger(tmp_path)
    fill(filled)
    tamper(filled, "UPDATE ledger_entries SET actor = X'00ff' WHERE seq = 6")
    assert_bad(filled, 6, "entry #6 was altered")


def test_deleted_middle_entry_is_a_seq_gap(filled: Ledger) -> None:
    tamper(filled, "DELETE FROM ledger_entries WHERE seq = 5")
    assert_bad(filled, 5, "entry #5 is missing")


def test_deleted_middle_entry_with_relinked_chain_is_named_where_it_was_removed(filled: Ledger) -> None:
    # Renumbering needs re-hashing everything after it: the signatures from #5 on no longer verify.
    tamper(filled, "DELETE FROM ledger_entries WHERE seq = 5")
    tamper(filled, *[("UPDATE ledger_entries SET seq = ? WHERE seq = ?", (s - 1, s)) for s in range(6, N + 1)])
    rehash_from(filled, 5)
    assert_bad(filled, 5, "entry #5: its signature does not verify", "truncated")


def test_reordered_entries_are_caught_at_the_first_moved_one(filled: Ledger) -> None:
    tamper(filled,
           "UPDATE ledger_entries SET seq = -3 WHERE seq = 3",
           "UPDATE ledger_entries SET seq = 3 WHERE seq = 6",
           "UPDATE ledger_entries SET seq = 6 WHERE seq = -3")
    assert_bad(filled, 3, "entry #3 was altered")


def test_truncated_newest_entries_are_caught_at_the_first_missing(filled: Ledger) -> None:
    tamper(filled, ("DELETE FROM ledger_entries WHERE seq > ?", (N - 2,)))
    assert_bad(filled, N - 1, "truncated", f"#{N - 1}..#{N}")


def test_emptied_database_is_truncation_from_one(filled: Ledger) -> None:
    tamper(filled, "DELETE FROM ledger_entries")
    assert_bad(filled, 1, "truncated")
    # (a deleted database file, signatures and all, is only caught by the witness: test_witness.py)


@pytest.mark.parametrize("j", [1, 2, 7])
def test_rewrite_and_rehash_without_the_key_is_named_at_the_first_rewritten_entry(filled: Ledger, j: int) -> None:
    """Entry j rewritten and every later one re-hashed (no key): internally consistent, yet named at #j."""
    tamper(filled, ("UPDATE ledger_entries SET actor = 'mallory' WHERE seq = ?", (j,)))
    rehash_from(filled, j)
    prev = GENESIS_HASH  # every hash and link checks out ...
    for seq, ts, kind, subject, env, actor, data, p, h in rows(filled):
        assert p == prev and h == entry_hash(seq, ts, kind, subject, env, actor, json.loads(data), p)
        prev = h
    # ... but not the heads the platform signed: named at #j, not at the head
    assert_bad(filled, j, f"entry #{j}: its signature does not verify", f"entries from #{j} were rewritten")
    v = filled.verify(full=True)
    assert (v.ok, v.first_bad_seq) == (False, j), v
    with pytest.raises(LedgerTampered) as err:
        filled.append("deploy", "credit_scoring", {}, actor="ci")
    assert err.value.first_bad_seq == j and "nothing was written" in str(err.value)
    assert len(rows(filled)) == N and len(sigs_of(filled)) == N


def test_a_keyless_insert_is_tampering_and_the_next_append_refuses_it(filled: Ledger) -> None:
    """A correctly hashed row INSERTed with sqlite by someone without the key is never laundered."""
    ts, h = rows(filled)[-1][1], rows(filled)[-1][8]
    new = (N + 1, ts, "approval", "credit_scoring", "prod", "mallory", "{}", h)
    conn = attack(filled)
    with conn:
        conn.execute("INSERT INTO ledger_entries VALUES (?,?,?,?,?,?,?,?,?)",
                     (*new, entry_hash(*new[:6], {}, h)))
    conn.close()
    assert_bad(filled, N + 1, f"entry #{N + 1} carries no platform signature", "written outside onepath")
    with pytest.raises(LedgerTampered, match="carries no platform signature") as err:
        filled.append("deploy", "credit_scoring", {}, actor="ci")
    assert err.value.first_bad_seq == N + 1
    assert len(rows(filled)) == N + 1 and len(sigs_of(filled)) == N, "nothing was written"
    # ... and a forged signature for it (the attacker's own key) does not make it one
    mallory = Ed25519PrivateKey.generate()
    raw = base64.b64encode(mallory.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)).decode()
    forged = base64.b64encode(mallory.sign(f"{N + 1}:{rows(filled)[-1][8]}".encode())).decode()
    tamper(filled, ("INSERT INTO head_signatures VALUES (?,?,?)", (N + 1, raw, forged)))
    assert_bad(filled, N + 1, "signed with key", "not with the platform key")
    with pytest.raises(LedgerTampered, match="signed with key"):
        filled.append("deploy", "credit_scoring", {}, actor="ci")


def test_full_verify_checks_every_signature(filled: Ledger) -> None:
    """A forged signature below an intact head: the chain vouches for the entry (the head's signature
    covers it through the links), so the quick check passes; the audit (full=True) names it."""
    key, sig = next((k, g) for s, k, g in sigs_of(filled) if s == 4)
    tamper(filled, ("UPDATE head_signatures SET sig = ? WHERE seq = 4", (sig[:-4] + ("AAA=" if sig[-4:] != "AAA=" else "BBB="),)))
    assert filled.verify().ok
    v = filled.verify(full=True)
    assert (v.ok, v.first_bad_seq) == (False, 4) and "entry #4: its signature does not verify" in v.reason, v


def test_replaced_public_key_is_caught(filled: Ledger) -> None:
    mallory = Ed25519PrivateKey.generate()
    filled.pub_path.write_bytes(mallory.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert_bad(filled, None, "does not match the platform key")
    with pytest.raises(LedgerTampered, match="does not match the platform key"):
        filled.append("deploy", "credit_scoring", {}, actor="ci")


def test_deleted_signatures_are_caught(filled: Ledger) -> None:
    tamper(filled, "DELETE FROM head_signatures")
    assert_bad(filled, 1, "entry #1 carries no platform signature")
    with pytest.raises(LedgerTampered, match="no platform signature"):
        filled.append("deploy", "credit_scoring", {}, actor="ci")


def test_the_lowest_bad_entry_is_reported(filled: Ledger) -> None:
    set_data(filled, 3, {"x": 1})
    tamper(filled, ("DELETE FROM ledger_entries WHERE seq > ?", (N - 2,)))
    assert_bad(filled, 3, "entry #3 was altered")


def test_append_refuses_to_sign_over_a_tampered_head(filled: Ledger, backend: LedgerBackend) -> None:
    """The next legitimate append must not launder a truncated, altered or re-hashed tail."""
    tamper(filled, ("DELETE FROM ledger_entries WHERE seq > ?", (N - 2,)))
    with pytest.raises(LedgerTampered, match="truncated") as err:
        filled.append("deploy", "credit_scoring", {}, actor="ci")
    assert err.value.first_bad_seq == N - 1
    assert_bad(filled, N - 1, "truncated")  # nothing was written

    other = backend.ledger("other")
    fill(other, 3)
    set_data(other, 3, {"version": "forged"})
    with pytest.raises(LedgerTampered, match="entry #3 was altered"):
        other.append("deploy", "credit_scoring", {}, actor="ci")
    assert len(rows(other)) == 3


def pin_policy(ledger: Ledger, platform_key: str, witness_key: str | None = None) -> Entry:
    """A policy_recorded entry with the common shape (the ledger reads only platform_key/witness_key;
    whether the record is admin-signed is platform_defs.policy_record's job)."""
    return ledger.append("policy_recorded", "policy", {
        "hash": "sha256:" + "ab" * 32, "previous_hash": None, "previous_entry": None, "text": "teams: {}\n",
        "diff": "", "platform_key": platform_key, "witness_key": witness_key, "demo": False,
        "signed_by": "admin", "signed_at": "2026-12-01T00:00:00+00:00", "signature": "not-checked-here"},
        actor="admin")


def test_a_replaced_key_pair_is_refused_once_the_key_is_pinned(filled: Ledger) -> None:
    """Tier (b): the platform's user replaces keys/platform.key and .pub and re-signs every head."""
    pinned = filled.platform_public_key_b64()
    p = pin_policy(filled, pinned)
    filled.append("deploy", "credit_scoring", {}, actor="ci")
    v = filled.verify()
    assert (v.ok, v.signed_by_pin, v.pinned_in) == (True, True, p.seq), v
    assert filled.pinned_platform_key() == pinned

    mallory = Ed25519PrivateKey.generate()
    filled.key_path.write_bytes(mallory.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    filled.pub_path.write_bytes(mallory.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    raw = base64.b64encode(mallory.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)).decode()
    tamper(filled, "DELETE FROM head_signatures", *[
        ("INSERT INTO head_signatures VALUES (?,?,?)",
         (seq, raw, base64.b64encode(mallory.sign(f"{seq}:{h}".encode())).decode()))
        for seq, *_, h in rows(filled)])
    fresh = Ledger(filled.store.url, filled.key_path)
    v = fresh.verify()
    assert not v.ok and not v.signed_by_pin, v
    assert f"not the key pinned in policy #{p.seq}" in v.reason, v
    assert "signed with key" in v.reason, v
    with pytest.raises(LedgerTampered, match=f"is not the key pinned in policy #{p.seq}") as err:
        fresh.append("deploy", "credit_scoring", {}, actor="mallory")
    assert err.value.first_bad_seq is None
    assert len(rows(filled)) == N + 2


def test_a_ledger_from_before_head_signatures_is_migrated_from_its_anchor(tmp_path: Path) -> None:
    """An old ledger.db (no head_signatures table, a signed anchor file): the first open under the
    exclusive lock turns the verified anchor into the head's signature."""
    ledger = make_ledger(tmp_path)
    fill(ledger, 3)
    head = rows(ledger)[-1]
    key = serialization.load_pem_private_key(ledger.key_path.read_bytes(), password=None)
    conn = sqlite3.connect(ledger.db_path, isolation_level=None)
    conn.execute("DROP TRIGGER head_signatures_no_update")
    conn.execute("DROP TRIGGER head_signatures_no_delete")
    conn.execute("DROP TABLE head_signatures")
    conn.execute("DROP TABLE witness_receipts")
    conn.close()
    anchor = ledger.legacy_anchor_path
    anchor.write_text(json.dumps({"seq": 3, "hash": head[8], "signed_at": "2026-11-30T00:00:00+00:00",
                                  "signature": base64.b64encode(key.sign(f"3:{head[8]}".encode())).decode()}))
    old = Ledger(ledger.db_path, ledger.key_path)
    v = old.verify()
    assert v.ok and v.entries == 3, v
    assert not anchor.exists() and [s for s, _, _ in sigs_of(ledger)] == [3]
    old.append("deploy", "credit_scoring", {}, actor="ci")
    assert old.verify().ok and [s for s, _, _ in sigs_of(ledger)] == [3, 4]

    # an anchor that does not name the head is refused in one line, nothing written
    other = make_ledger(tmp_path / "other")
    fill(other, 3)
    conn = sqlite3.connect(other.db_path, isolation_level=None)
    conn.execute("DROP TRIGGER head_signatures_no_delete")
    conn.execute("DELETE FROM head_signatures")
    conn.close()
    okey = serialization.load_pem_private_key(other.key_path.read_bytes(), password=None)
    h2 = rows(other)[1][8]
    other.legacy_anchor_path.write_text(json.dumps({
        "seq": 2, "hash": h2, "signed_at": "x", "signature": base64.b64encode(okey.sign(f"2:{h2}".encode())).decode()}))
    with pytest.raises(LedgerTampered, match="cannot migrate") as err:
        other.append("deploy", "credit_scoring", {}, actor="ci")
    assert err.value.first_bad_seq == 3 and len(rows(other)) == 3


# -- concurrency --------------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from resources.ledger import Ledger
ledger = Ledger(sys.argv[1], Path(sys.argv[2]))
name, count = sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
for i in range(count):
    ledger.append("deploy", "credit_scoring", {"writer": name, "i": i}, actor=name, env="staging")
"""


def test_concurrent_processes_and_threads_keep_one_gapless_chain(backend: LedgerBackend) -> None:
    """On PostgreSQL the processes share no lock file: the store's advisory lock is all that orders them."""
    procs_n, threads_n, each = 4, 4, 50
    ledger = backend.ledger()
    ledger.platform_public_key_b64()  # the key pair exists before anyone races to make it
    place = ledger.store.url
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, place, str(ledger.key_path),
                               f"p{i}", str(each)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env) for i in range(procs_n)]
    go = threading.Event()
    errors: list[BaseException] = []
    bad_verifications: list = []
    verifications: list = []
    writers_done = threading.Event()

    def write(name: str) -> None:
        go.wait()
        own = Ledger(place, ledger.key_path)  # threads share nothing but the store and the key files
        try:
            for i in range(each):
                own.append("deploy", "credit_scoring", {"writer": name, "i": i}, actor=name, env="staging")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def verify_while_writing() -> None:
        go.wait()
        while True:
            done = writers_done.is_set()
            v = ledger.verify()
            verifications.append(v)
            # An entry and its head signature commit in one transaction: a verify never sees one alone.
            if not v.ok or (v.head_seq or 0) != v.entries or (v.entries and v.reason != "intact"):
                bad_verifications.append(v)
            if done:
                break

    try:
        for p in procs:  # every process has imported and opened the ledger before anyone writes
            assert p.stdout.readline().strip() == "ready"
        threads = [threading.Thread(target=write, args=(f"t{i}",), daemon=True) for i in range(threads_n)]
        checker = threading.Thread(target=verify_while_writing, daemon=True)
        for t in [*threads, checker]:
            t.start()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        go.set()
        for p in procs:
            p.stdin.close()
            assert p.wait(timeout=300) == 0
        for t in threads:
            t.join(timeout=300)
        writers_done.set()
        checker.join(timeout=300)
    finally:  # never leave a writer or the checker behind, also when an assertion failed
        go.set()
        writers_done.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    assert errors == []
    assert bad_verifications == [], f"a verify running alongside the writers saw a broken chain: {bad_verifications[:1]}"
    assert verifications and verifications[-1].entries == (procs_n + threads_n) * each
    entries = ledger.entries()
    total = (procs_n + threads_n) * each
    assert [e.seq for e in entries] == list(range(1, total + 1))
    seen = sorted((e.data["writer"], e.data["i"]) for e in entries)
    names = [f"p{i}" for i in range(procs_n)] + [f"t{i}" for i in range(threads_n)]
    assert seen == sorted((n, i) for n in names for i in range(each))
    v = ledger.verify()
    assert (v.ok, v.entries, v.head_seq, v.reason) == (True, total, total, "intact")
    assert len(sigs_of(ledger)) == total


def test_writers_on_four_hosts_share_no_file_and_keep_one_chain(postgres, tmp_path: Path) -> None:
    """4 processes x 500 appends on PostgreSQL, each with its own copy of the platform key in a folder of its own
    (as on four hosts: nothing on disk is shared, no lock file): seq 1..2000 with no gap, no duplicate and each
    writer's appends in its own order, and a chain that verifies."""
    import shutil

    writers, each = 4, 500
    url = postgres.create_database("four_hosts")
    first = Ledger(url, tmp_path / "host0" / "keys" / "platform.key")
    first.platform_public_key_b64()
    for i in range(1, writers):
        shutil.copytree(tmp_path / "host0" / "keys", tmp_path / f"host{i}" / "keys")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(tmp_path / f"host{i}" / "keys" / "platform.key"),
                               f"host{i}", str(each)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env) for i in range(writers)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            p.stdin.close()
            assert p.wait(timeout=600) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    entries = first.entries()
    assert [e.seq for e in entries] == list(range(1, writers * each + 1))
    for i in range(writers):
        assert [e.data["i"] for e in entries if e.actor == f"host{i}"] == list(range(each))
    v = first.verify(full=True)
    assert (v.ok, v.entries, v.reason) == (True, writers * each, "intact"), v


# -- export -------------------------------------------------------------------------------------


def test_export_writes_jsonl_and_csv(filled: Ledger, tmp_path: Path) -> None:
    out = tmp_path / "out" / "audit"
    assert filled.export(out / "ledger.jsonl", out / "ledger.csv") == N
    lines = (out / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == N
    assert [json.loads(line) for line in lines] == [e.as_dict() for e in filled.entries()]
    with open(out / "ledger.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == N
    assert list(table[0]) == ["seq", "ts", "kind", "subject", "env", "actor", "data", "prev_hash", "hash"]
    for row, e in zip(table, filled.entries(), strict=True):
        assert int(row["seq"]) == e.seq and row["hash"] == e.hash and row["prev_hash"] == e.prev_hash
        assert json.loads(row["data"]) == e.data and row["env"] == (e.env or "")


# -- CLI ----------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    from platform_defs.cli import main

    return main(argv)


def test_cli_verify_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("ONEPATH_HOME", str(home))

    assert run_cli(["audit", "verify"]) == 0
    assert capsys.readouterr().out.startswith("ledger intact: 0 entries")

    ledger = Ledger(*ledger_paths(home))
    written = fill(ledger, 3)
    assert run_cli(["audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines() == [
        f"ledger intact: 3 entries, head #3 {written[-1].hash[:12]}, head signed by the platform key "
        f"(not pinned: no policy recorded yet)", "witness: none configured (ONEPATH_WITNESS_SOCKET)",
        "policy: none recorded yet (onepath policy init --as <platform admin>): nothing promotes"]
    assert run_cli(["audit", "verify", "--full"]) == 0
    assert "every signature checked" in capsys.readouterr().out

    assert run_cli(["audit", "export", "--out", str(tmp_path / "exp")]) == 0
    assert "exported 3 entries" in capsys.readouterr().out
    assert len((tmp_path / "exp" / "ledger.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "exp" / "ledger.csv").read_text().splitlines()) == 4

    set_data(ledger, 2, {"version": "forged"})
    assert run_cli(["audit", "verify"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err_lines = captured.err.strip().splitlines()
    assert err_lines[0].startswith("ledger TAMPERED at entry #2: ") and len(err_lines) == 2
    assert err_lines[1].startswith("witness: none configured")

    for suffix in ("", "-wal", "-shm"):
        Path(str(ledger.db_path) + suffix).unlink(missing_ok=True)
    ledger.db_path.write_bytes(b"this is not a database" * 100)
    assert run_cli(["audit", "verify"]) == 1
    captured = capsys.readouterr()
    assert "unreadable" in captured.err.splitlines()[0] and "Traceback" not in captured.err

    assert run_cli(["audit", "export"]) == 2  # --out is required: a usage error, in one line
    assert "Missing option '--out'" in capsys.readouterr().err


def test_audit_export_filters_by_asset_env_and_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("ONEPATH_HOME", str(home))
    ledger = Ledger(*ledger_paths(home))
    ledger.append("deploy", "credit_scoring", {"version": "1"}, "t", env="staging")
    ledger.append("deploy", "credit_scoring", {"version": "1"}, "t", env="prod")
    ledger.append("approval", "credit_risk", {"version": "1"}, "t", env="prod")
    cut = ledger.entries()[-1].ts

    def exported(*flags: str) -> list[int]:
        out = tmp_path / "exp"
        assert run_cli(["audit", "export", "--out", str(out), *flags]) == 0
        capsys.readouterr()
        return [json.loads(line)["seq"] for line in (out / "ledger.jsonl").read_text().splitlines()]

    assert exported() == [1, 2, 3]
    assert exported("--asset", "credit_scoring") == [1, 2]
    assert exported("--asset", "credit_scoring_prod") == [2]
    assert exported("--env", "prod") == [2, 3]
    assert exported("--since", cut) == [3] and exported("--until", cut) == [1, 2]
    assert exported("--since", "2000-01-01", "--until", "2000-01-02") == []
    assert run_cli(["audit", "export", "--out", str(tmp_path), "--since", "yesterday"]) == 2
    assert capsys.readouterr().err.strip() == ("onepath: --since 'yesterday' is not an ISO time: write e.g. "
                                               "2026-02-01 or 2026-02-01T10:00:00Z")
    assert run_cli(["audit", "export", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for flag in ("--asset", "--env", "--since", "--until"):
        assert flag in help_text


def test_the_public_key_cache_survives_many_keys() -> None:
    """A process that meets more than 64 platform keys (a test session, an auditor's tool) still parses the
    65th: the cache was cleared after adding it, a KeyError inside every append and verify."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from resources.ledger import _pub_from_b64
    from resources.witness import raw_public_b64

    keys = [raw_public_b64(Ed25519PrivateKey.generate().public_key()) for _ in range(200)]
    assert all(_pub_from_b64(k) is not None for k in keys)
    assert _pub_from_b64("not a key") is None


def test_a_writer_that_holds_the_append_lock_and_goes_silent_fails_the_others_in_bounded_time(
        postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that took the append lock and then answers nothing (a frozen writer, or one whose host went away
    before TCP noticed): another append waits at most the lock wait, then fails in one line and writes nothing."""
    import time

    import psycopg2
    from sqlalchemy.engine import make_url

    from resources import ledger_store
    from resources.ledger import LedgerUnavailable

    monkeypatch.setattr(ledger_store, "LOCK_WAIT_S", 2.0)
    ledger = Ledger(postgres.create_database("silent_writer"), tmp_path / "home" / "keys" / "platform.key")
    fill(ledger, 2)
    url = make_url(ledger.store.url)
    frozen = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                              dbname=url.database)
    frozen.autocommit = True
    try:
        frozen.cursor().execute("SELECT pg_advisory_lock(hashtextextended('onepath-ledger:append:' "
                                "|| current_schema(), 0))")
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable, match="lock timeout") as err:
            ledger.append("deploy", "credit_scoring", {"version": "3"}, actor="ci", env="prod")
        assert 1.5 < time.monotonic() - started < 20
        assert "\n" not in str(err.value) and postgres.password not in str(err.value)
    finally:
        frozen.close()  # the session ends: its lock goes with it
    assert len(rows(ledger)) == 2  # nothing written
    assert ledger.append("deploy", "credit_scoring", {"version": "3"}, actor="ci", env="prod").seq == 3


def test_postgresql_down_fails_closed_and_the_ledger_carries_on_when_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A server of its own, stopped between appends: an append, a lease and verify fail in one line naming the
    store (never its password) and write nothing; once it is back, the same Ledger object goes on at the next seq."""
    import time

    from resources.ledger import LedgerUnavailable
    from tests.stores import ledger_env, start_postgres

    server = start_postgres()
    try:
        ledger = Ledger(server.create_database("down"), tmp_path / "home" / "keys" / "platform.key")
        fill(ledger, 3)
        server.stop()
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable, match="cannot be reached") as err:
            ledger.append("deploy", "credit_scoring", {"version": "4"}, actor="ci", env="prod")
        assert time.monotonic() - started < 30
        assert server.password not in str(err.value) and f"127.0.0.1:{server.port}/down" in str(err.value)
        with pytest.raises(LedgerUnavailable):
            ledger.acquire_lease("promotion:credit_scoring.prod", "run-a", ttl=30)
        v = ledger.verify()
        assert not v.ok and "cannot be reached" in v.reason and server.password not in v.reason, v
        for var, value in ledger_env(ledger).items():
            monkeypatch.setenv(var, value)
        assert run_cli(["audit", "verify"]) == 1
        err_lines = capsys.readouterr().err.strip().splitlines()
        assert err_lines[0].startswith("ledger UNREADABLE: the ledger's database postgresql+psycopg2://onepath:***@"), \
            err_lines
        assert all(server.password not in line and "Traceback" not in line for line in err_lines), err_lines
        server.start()
        entry = ledger.append("deploy", "credit_scoring", {"version": "4"}, actor="ci", env="prod")
        assert entry.seq == 4 and ledger.verify().ok
    finally:
        server.stop()
        import shutil

        shutil.rmtree(server.base, ignore_errors=True)


def test_copy_to_postgresql_keeps_numbers_hashes_and_signatures_and_never_overwrites(
        postgres, tmp_path: Path) -> None:
    """What ``onepath migrate --to production`` does with the ledger: the same entries, seq for seq and hash for
    hash, with the head signatures, so the copy verifies under the same pinned key; a re-run copies only what
    is new; another history in the target, or a source that does not verify, is refused and nothing is written."""
    from resources.ledger import LedgerCopyRefused

    source = make_ledger(tmp_path)
    fill(source)
    pin_policy(source, source.platform_public_key_b64())
    target = Ledger(postgres.create_database("copy_target"), source.key_path)
    assert source.copy_to(target) == N + 1
    assert target.entries() == source.entries() and sigs_of(target) == sigs_of(source)
    v = target.verify(full=True)
    assert (v.ok, v.head_hash, v.signed_by_pin) == (True, source.head().hash, True), v
    assert source.copy_to(target) == 0  # a re-run is a no-op ...
    source.append("deploy", "credit_scoring", {"version": "late"}, actor="ci", env="prod")
    assert source.copy_to(target) == 1 and target.head() == source.head()  # ... or copies what came since

    other = Ledger(postgres.create_database("copy_other"), source.key_path)
    other.append("deploy", "someone_else", {}, actor="ci")
    with pytest.raises(LedgerCopyRefused, match="differs .* from entry #1 on"):
        source.copy_to(other)
    assert len(other.entries()) == 1
    set_data(source, 3, {"version": "forged"})
    with pytest.raises(LedgerCopyRefused, match="does not verify"):
        source.copy_to(Ledger(postgres.create_database("copy_third"), source.key_path))


def test_a_host_given_the_platform_key_in_its_environment_keeps_it_off_disk(postgres, tmp_path: Path) -> None:
    """ONEPATH_PLATFORM_KEY (the PEM, from a Secret) instead of a key file: two hosts append to one PostgreSQL
    ledger with no private key on either disk; a value that is not a key is refused in one line, nothing written."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    url = postgres.create_database("key_in_env")
    hosts = [Ledger(url, tmp_path / f"host{i}" / "keys" / "platform.key", private_key_pem=pem) for i in (0, 1)]
    for i, host in enumerate(hosts * 2):
        host.append("deploy", "credit_scoring", {"version": str(i)}, actor=f"host{i % 2}", env="prod")
    assert [e.seq for e in hosts[1].entries()] == [1, 2, 3, 4]
    assert hosts[0].verify(full=True).ok and hosts[1].platform_public_key_b64() == base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
    for i in (0, 1):
        assert not (tmp_path / f"host{i}" / "keys" / "platform.key").exists()
        assert (tmp_path / f"host{i}" / "keys" / "platform.pub").exists()  # public: written for auditors
    bad = Ledger(url, tmp_path / "host2" / "keys" / "platform.key", private_key_pem="not a key")
    with pytest.raises(ValueError, match="ONEPATH_PLATFORM_KEY\\) is not a PEM private key"):
        bad.append("deploy", "credit_scoring", {}, actor="host2")
    assert len(hosts[0].entries()) == 4
