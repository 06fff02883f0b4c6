"""The tamper-evident ledger: chain, signed anchor, every tampering case, concurrent writers, CLI.

Everything runs against real sqlite files and real keys in a temporary folder. Tampering is done
the way an attacker with write access would: a plain sqlite connection that first drops the
append-only triggers.
"""

from __future__ import annotations

import argparse
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
    """Run SQL against the ledger as an attacker would (dropping the append-only guards)."""
    conn = sqlite3.connect(ledger.db_path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS ledger_entries_no_update")
        conn.execute("DROP TRIGGER IF EXISTS ledger_entries_no_delete")
        conn.execute("BEGIN")
        for st in statements:
            sql, params = (st, ()) if isinstance(st, str) else st
            conn.execute(sql, params)
        conn.execute("COMMIT")
    finally:
        conn.close()


def rows(ledger: Ledger) -> list[tuple]:
    conn = sqlite3.connect(ledger.db_path)
    try:
        return conn.execute("SELECT seq, ts, kind, subject, env, actor, data, prev_hash, hash "
                            "FROM ledger_entries ORDER BY seq").fetchall()
    finally:
        conn.close()


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
    assert v.entries == (len(rows(ledger)) if ledger.db_path.exists() else 0)


# -- the happy path -----------------------------------------------------------------------------


def test_append_read_verify(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    assert ledger.verify().ok and ledger.verify().entries == 0
    assert ledger.head() is None and ledger.entries() == []
    assert not ledger.db_path.exists(), "reading or verifying an unused ledger creates nothing"

    written = fill(ledger)
    assert [e.seq for e in written] == list(range(1, N + 1))
    assert written[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(written, written[1:], strict=False))
    assert ledger.entries() == written
    assert ledger.head() == written[-1]

    v = ledger.verify()
    assert (v.ok, v.entries, v.first_bad_seq, v.reason) == (True, N, None, "intact")
    assert (v.head_seq, v.head_hash, v.anchor_seq) == (N, written[-1].hash, N)

    # filters
    assert [e.seq for e in ledger.entries(kind="deploy")] == [1, 6]
    assert {e.subject for e in ledger.entries(subject="credit_risk")} == {"credit_risk"}
    assert [e.seq for e in ledger.entries(env="prod")] == [2, 5, 8]
    assert [e.seq for e in ledger.entries(since_seq=7)] == [8, 9, 10]
    assert [e.seq for e in ledger.entries(kind="promotion", subject="credit_risk", since_seq=1)] == [3]
    assert ledger.entries(kind="deploy")[0].as_dict()["data"] == {"version": "0", "checks": {"roc_auc": 0.7}}


def test_hash_format_is_reproducible_without_onepath(tmp_path: Path) -> None:
    """An auditor can re-check an entry and the anchor with hashlib, json and the public key."""
    ledger = make_ledger(tmp_path)
    fill(ledger, 3)
    for seq, ts, kind, subject, env, actor, data, prev, h in rows(ledger):
        assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"))
        payload = {"seq": seq, "ts": ts, "kind": kind, "subject": subject, "env": env,
                   "actor": actor, "data": json.loads(data), "prev_hash": prev}
        expected = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
        assert h == expected.hexdigest()
        assert ts.endswith("+00:00")
    anchor = json.loads(ledger.anchor_path.read_text())
    assert set(anchor) == {"seq", "hash", "signed_at", "signature"}
    assert (anchor["seq"], anchor["hash"]) == (3, ledger.head().hash)
    pub = serialization.load_pem_public_key(ledger.pub_path.read_bytes())
    pub.verify(base64.b64decode(anchor["signature"]), f"3:{anchor['hash']}".encode())  # raises if bad


def test_key_lives_outside_the_db_with_mode_0600(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    ledger.append("deploy", "credit_scoring", {}, actor="ci")
    assert ledger.key_path == tmp_path / "keys" / "platform.key"
    assert ledger.anchor_path == tmp_path / "keys" / "ledger.anchor.json"
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


def test_append_rejects_bad_input_and_the_db_refuses_edits(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    fill(ledger, 2)
    with pytest.raises(ValueError, match="kind"):
        ledger.append("", "x", {}, actor="a")
    with pytest.raises(TypeError, match="data"):
        ledger.append("deploy", "x", ["not", "a", "dict"], actor="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ledger.append("deploy", "x", {"auc": float("nan")}, actor="a")
    conn = sqlite3.connect(ledger.db_path)
    try:
        for sql in ("UPDATE ledger_entries SET actor = 'x' WHERE seq = 1", "DELETE FROM ledger_entries"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)
    finally:
        conn.close()
    assert ledger.verify().ok and ledger.head().seq == 2


def test_resource_builds_the_ledger(tmp_path: Path) -> None:
    db, key = ledger_paths(tmp_path)
    res = LedgerResource(db_path=str(db), key_path=str(key))
    entry = res.ledger().append("first_release", "loan_portal", {"release": "r-0123"}, actor="dagster")
    assert Ledger(db, key).head() == entry
    assert res.ledger().verify().ok


# -- tampering ----------------------------------------------------------------------------------


@pytest.fixture
def filled(tmp_path: Path) -> Ledger:
    ledger = make_ledger(tmp_path)
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


def test_edited_and_rehashed_last_entry_mismatches_the_anchor(filled: Ledger) -> None:
    tamper(filled, ("UPDATE ledger_entries SET actor = 'mallory' WHERE seq = ?", (N,)))
    rehash_from(filled, N)
    assert_bad(filled, N, "re-hashed chain", "signed anchor")


def test_deleted_middle_entry_is_a_seq_gap(filled: Ledger) -> None:
    tamper(filled, "DELETE FROM ledger_entries WHERE seq = 5")
    assert_bad(filled, 5, "entry #5 is missing")


def test_deleted_middle_entry_with_relinked_chain_is_still_a_gap(filled: Ledger) -> None:
    # Renumbering would need re-hashing everything after it: that is the rewritten-chain case.
    tamper(filled, "DELETE FROM ledger_entries WHERE seq = 5")
    tamper(filled, *[("UPDATE ledger_entries SET seq = ? WHERE seq = ?", (s - 1, s)) for s in range(6, N + 1)])
    rehash_from(filled, 5)
    assert_bad(filled, N, "truncated")


def test_reordered_entries_are_caught_at_the_first_moved_one(filled: Ledger) -> None:
    tamper(filled,
           "UPDATE ledger_entries SET seq = -3 WHERE seq = 3",
           "UPDATE ledger_entries SET seq = 3 WHERE seq = 6",
           "UPDATE ledger_entries SET seq = 6 WHERE seq = -3")
    assert_bad(filled, 3, "entry #3 was altered")


def test_truncated_newest_entries_are_caught_at_the_first_missing(filled: Ledger) -> None:
    tamper(filled, ("DELETE FROM ledger_entries WHERE seq > ?", (N - 2,)))
    assert_bad(filled, N - 1, "truncated", f"#{N - 1}..#{N}")


def test_emptied_or_deleted_database_is_truncation_from_one(filled: Ledger) -> None:
    tamper(filled, "DELETE FROM ledger_entries")
    assert_bad(filled, 1, "truncated")
    for suffix in ("", "-wal", "-shm"):
        Path(str(filled.db_path) + suffix).unlink(missing_ok=True)
    v = filled.verify()
    assert (v.ok, v.first_bad_seq, v.entries) == (False, 1, 0) and "truncated" in v.reason


def test_whole_chain_rewritten_and_rehashed_mismatches_the_anchor(filled: Ledger) -> None:
    tamper(filled, "UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 2")
    rehash_from(filled, 1)
    # internally consistent: every hash and link checks out ...
    prev = GENESIS_HASH
    for seq, ts, kind, subject, env, actor, data, p, h in rows(filled):
        assert p == prev and h == entry_hash(seq, ts, kind, subject, env, actor, json.loads(data), p)
        prev = h
    # ... but it is not the chain the platform signed
    assert_bad(filled, N, "re-hashed chain", "does not match the signed anchor")


def test_forged_anchor_signature_is_caught(filled: Ledger) -> None:
    tamper(filled, "UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 2")
    rehash_from(filled, 1)
    head = rows(filled)[-1]
    anchor = json.loads(filled.anchor_path.read_text())
    anchor["hash"] = head[8]  # point the anchor at the rewritten head, keep the old signature
    filled.anchor_path.write_text(json.dumps(anchor))
    assert_bad(filled, N, "signature is invalid")
    # re-signed with the attacker's own key: still invalid for the platform's public key
    mallory = Ed25519PrivateKey.generate()
    anchor["signature"] = base64.b64encode(mallory.sign(f"{N}:{head[8]}".encode())).decode()
    filled.anchor_path.write_text(json.dumps(anchor))
    assert_bad(filled, N, "signature is invalid")


def test_replaced_public_key_is_caught(filled: Ledger) -> None:
    mallory = Ed25519PrivateKey.generate()
    head = rows(filled)[-1]
    filled.pub_path.write_bytes(mallory.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    filled.anchor_path.write_text(json.dumps({
        "seq": N, "hash": head[8], "signed_at": "2020-01-01T00:00:00+00:00",
        "signature": base64.b64encode(mallory.sign(f"{N}:{head[8]}".encode())).decode()}))
    assert_bad(filled, None, "does not match the platform key")


def test_garbage_anchor_is_caught(filled: Ledger) -> None:
    filled.anchor_path.write_text("{not json")
    assert_bad(filled, None, "unreadable")


def test_deleted_anchor_with_entries_is_not_ok(filled: Ledger) -> None:
    filled.anchor_path.unlink()
    assert_bad(filled, 1, "anchor", "missing")


def test_the_lowest_bad_entry_is_reported(filled: Ledger) -> None:
    set_data(filled, 3, {"x": 1})
    tamper(filled, ("DELETE FROM ledger_entries WHERE seq > ?", (N - 2,)))
    assert_bad(filled, 3, "entry #3 was altered")


def test_append_refuses_to_sign_over_a_tampered_head(filled: Ledger) -> None:
    """The next legitimate append must not launder a truncated or re-hashed tail."""
    tamper(filled, ("DELETE FROM ledger_entries WHERE seq > ?", (N - 2,)))
    with pytest.raises(LedgerTampered, match="truncated") as err:
        filled.append("deploy", "credit_scoring", {}, actor="ci")
    assert err.value.first_bad_seq == N - 1
    assert_bad(filled, N - 1, "truncated")  # nothing was written, the anchor is unchanged

    other = make_ledger(filled.db_path.parent / "other")
    fill(other, 3)
    tamper(other, "UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 3")
    rehash_from(other, 3)
    with pytest.raises(LedgerTampered, match="re-hashed"):
        other.append("deploy", "credit_scoring", {}, actor="ci")
    assert len(rows(other)) == 3

    other.anchor_path.unlink()
    with pytest.raises(LedgerTampered, match="missing"):
        other.append("deploy", "credit_scoring", {}, actor="ci")


def test_entries_after_the_anchor_are_reported_then_anchored(filled: Ledger) -> None:
    """A writer that died between commit and re-signing leaves chained but unanchored entries."""
    ts, h = rows(filled)[-1][1], rows(filled)[-1][8]
    new = (N + 1, ts, "restart", "credit_scoring", "prod", "supervisor", "{}", h)
    conn = sqlite3.connect(filled.db_path)
    with conn:
        conn.execute("INSERT INTO ledger_entries VALUES (?,?,?,?,?,?,?,?,?)",
                     (*new, entry_hash(*new[:6], {}, h)))
    conn.close()
    v = filled.verify()
    assert (v.ok, v.entries, v.unanchored, v.anchor_seq) == (True, N + 1, 1, N)
    assert "1 entry after the signed anchor #10 is not yet anchored" in v.reason
    filled.append("deploy", "credit_scoring", {}, actor="ci")
    v = filled.verify()
    assert (v.ok, v.entries, v.unanchored, v.anchor_seq, v.reason) == (True, N + 2, 0, N + 2, "intact")


# -- concurrency --------------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from resources.ledger import Ledger
ledger = Ledger(Path(sys.argv[1]), Path(sys.argv[2]))
name, count = sys.argv[3], int(sys.argv[4])
print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
for i in range(count):
    ledger.append("deploy", "credit_scoring", {"writer": name, "i": i}, actor=name, env="staging")
"""


def test_concurrent_processes_and_threads_keep_one_gapless_chain(tmp_path: Path) -> None:
    procs_n, threads_n, each = 4, 4, 50
    ledger = make_ledger(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(ledger.db_path), str(ledger.key_path),
                               f"p{i}", str(each)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env) for i in range(procs_n)]
    go = threading.Event()
    errors: list[BaseException] = []
    bad_verifications: list = []
    verifications: list = []
    writers_done = threading.Event()

    def write(name: str) -> None:
        go.wait()
        own = Ledger(ledger.db_path, ledger.key_path)  # threads share nothing but the files
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
            # Appends commit and re-sign under one lock, so a verify never sees a half-done one.
            if not v.ok or v.unanchored:
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
    assert bad_verifications == [], "a verify running alongside the writers saw a broken chain"
    assert verifications and verifications[-1].entries == (procs_n + threads_n) * each
    entries = ledger.entries()
    total = (procs_n + threads_n) * each
    assert [e.seq for e in entries] == list(range(1, total + 1))
    seen = sorted((e.data["writer"], e.data["i"]) for e in entries)
    names = [f"p{i}" for i in range(procs_n)] + [f"t{i}" for i in range(threads_n)]
    assert seen == sorted((n, i) for n in names for i in range(each))
    v = ledger.verify()
    assert (v.ok, v.entries, v.anchor_seq, v.unanchored) == (True, total, total, 0)


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
    from platform_defs.cli_audit import add_audit_parser

    ap = argparse.ArgumentParser(prog="onepath")
    add_audit_parser(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.fn(args)


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
    anchor = json.loads(ledger.anchor_path.read_text())
    assert out.strip() == (f"ledger intact: 3 entries, head #3 {written[-1].hash[:12]}, "
                           f"anchor signed at {anchor['signed_at']}")

    assert run_cli(["audit", "export", "--out", str(tmp_path / "exp")]) == 0
    assert "exported 3 entries" in capsys.readouterr().out
    assert len((tmp_path / "exp" / "ledger.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "exp" / "ledger.csv").read_text().splitlines()) == 4

    set_data(ledger, 2, {"version": "forged"})
    assert run_cli(["audit", "verify"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("ledger TAMPERED at entry #2: ")

    for suffix in ("", "-wal", "-shm"):
        Path(str(ledger.db_path) + suffix).unlink(missing_ok=True)
    ledger.db_path.write_bytes(b"this is not a database" * 100)
    assert run_cli(["audit", "verify"]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err

    with pytest.raises(SystemExit):
        run_cli(["audit", "export"])  # --out is required
