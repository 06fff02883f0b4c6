"""onepath's one tamper-evident ledger: every deploy, promotion, approval, rollback and verdict.

Storage is one sqlite table (WAL), append-only: each entry carries ``prev_hash`` (the hash of the
entry before it; 64 zeros for the first) and ``hash``, the sha256 of the canonical JSON (sorted
keys, ``(",", ":")`` separators) of the object

    {"seq", "ts", "kind", "subject", "env", "actor", "data", "prev_hash"}

so anyone can re-check the chain with ``sqlite3`` and ``hashlib``. A chain alone only proves
consistency: someone who can write the database could rewrite it and re-hash every entry. So after
every append the head ``(seq, hash)`` is signed with the platform's Ed25519 key, which lives in a
file outside the database, and written to an *anchor* file:

    {"seq": 12, "hash": "...", "signed_at": "...", "signature": base64(sign(f"{seq}:{hash}"))}

``verify()`` recomputes every hash and link, checks the seq runs 1..n without gaps, checks the
anchor's signature with the public key (``<key>.pub``) and that the entry at the anchor's seq still
has the signed hash (and still exists). Before it signs a new head, ``append`` checks the same of
the current anchor, so a tampered tail is never laundered by the next legitimate append: it raises
:class:`LedgerTampered` instead (fail closed).

Promotion leases live in the same database (table ``promotion_leases``): one row per endpoint or
app environment, naming its holder, a *fencing token* that grows by one with every grant, and an
expiry. ``acquire_lease`` grants it when it is free or expired; the holder renews it while it works
(``renew_lease``); ``append(..., fence=lease)`` writes an entry only while that very grant still
holds, checked inside the append's own transaction; the deployer passes the token to the server
side, which refuses a cutover whose token is older than one it has seen. So a stalled holder that
lost its lease can neither switch traffic nor record that it did. The lease rows are state, not
history: they are outside the hash chain.

Concurrency: an append (read head, insert, commit, re-sign the anchor) runs under an exclusive
``fcntl.flock`` on ``<db>.lock`` and inside ``BEGIN IMMEDIATE``, so separate processes (Dagster
runs, sensors, the CLI) and threads of one process serialize. ``verify`` takes a shared lock just
long enough to read the anchor and open its database snapshot, so both name the same head; other
reads take no lock.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field

from resources.files import atomic_write, create_private_file

KINDS: tuple[str, ...] = (
    "deploy",
    "promotion",
    "promotion_refused",
    "approval",
    "rollback",
    "gate_verdict",
    "alias_moved",
    "restart",
    "crashloop",
    "retrain_requested",
    "drift_detected",
    "promotion_skipped",
    "awaiting_approval",
    "handoff",
    "bake_passed",
    "bake_failed",
    "first_release",
    "model_registered",
    "artifact_refused",
    "serving_stopped",
    "event_refused",
    "explainability_report",
    "digest_mismatch",
    "serving_unhealthy",
    "serving_recovered",
    "supervisor_restarted",
    "outage",
    "policy_recorded",
)

GENESIS_HASH = "0" * 64
TABLE = "ledger_entries"
COLUMNS = ("seq", "ts", "kind", "subject", "env", "actor", "data", "prev_hash", "hash")
BUSY_TIMEOUT_S = 60.0

_THREAD = threading.local()  # per-thread sqlite connections, by db path
_FORKED: list[sqlite3.Connection] = []
_MAX_CONNS_PER_THREAD = 4

_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        seq       INTEGER PRIMARY KEY,
        ts        TEXT NOT NULL,
        kind      TEXT NOT NULL,
        subject   TEXT NOT NULL,
        env       TEXT,
        actor     TEXT NOT NULL,
        data      TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash      TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS promotion_leases (
        name       TEXT PRIMARY KEY,
        holder     TEXT NOT NULL,
        token      INTEGER NOT NULL,
        expires_at REAL NOT NULL)""",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_subject ON {TABLE} (subject, kind)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_kind ON {TABLE} (kind)",
    # Guards against accidents, not attackers (who can drop them): the hashes and the signed
    # anchor are what make tampering evident.
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_no_update BEFORE UPDATE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, 'the onepath ledger is append-only'); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {TABLE}_no_delete BEFORE DELETE ON {TABLE}
        BEGIN SELECT RAISE(ABORT, 'the onepath ledger is append-only'); END""",
)


def canonical_json(obj: Any) -> str:
    """The one serialization that is hashed: sorted keys, no whitespace, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_hash(seq: int, ts: str, kind: str, subject: str, env: str | None, actor: str,
               data: Any, prev_hash: str) -> str:
    payload = {"seq": seq, "ts": ts, "kind": kind, "subject": subject, "env": env,
               "actor": actor, "data": data, "prev_hash": prev_hash}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def anchor_message(seq: int, hash_: str) -> bytes:
    return f"{seq}:{hash_}".encode()


def ledger_paths(home: Path) -> tuple[Path, Path]:
    """``(db_path, key_path)`` of the platform ledger under ``ONEPATH_HOME``."""
    home = Path(home)
    return home / "ledger.db", home / "keys" / "platform.key"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Entry:
    seq: int
    ts: str
    kind: str
    subject: str
    env: str | None
    actor: str
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: tuple) -> Entry:
        seq, ts, kind, subject, env, actor, data, prev_hash, hash_ = row
        return cls(seq, ts, kind, subject, env, actor, json.loads(data), prev_hash, hash_)


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    first_bad_seq: int | None
    reason: str
    head_seq: int | None = None
    head_hash: str | None = None
    anchor_seq: int | None = None
    anchor_signed_at: str | None = None
    unanchored: int = 0


class LedgerTampered(RuntimeError):
    """Raised by ``append`` when the current head no longer matches the signed anchor."""

    def __init__(self, first_bad_seq: int | None, reason: str):
        super().__init__(f"ledger tampered at entry #{first_bad_seq}: {reason}"
                         if first_bad_seq is not None else f"ledger tampered: {reason}")
        self.first_bad_seq = first_bad_seq
        self.reason = reason


@dataclass(frozen=True)
class Lease:
    """A grant of the promotion lease ``name`` to ``holder``; ``token`` fences everything it does."""

    name: str
    holder: str
    token: int
    expires_at: float


class LeaseHeld(RuntimeError):
    """The lease is held by someone else (one line: who, since which token, until when)."""

    def __init__(self, name: str, holder: str, token: int, expires_at: float):
        left = max(0.0, expires_at - time.time())
        super().__init__(f"{name}: another promotion holds the lock ({holder}, fencing token {token}, "
                         f"lease runs {left:.0f} s more unless renewed)")
        self.name, self.holder, self.token, self.expires_at = name, holder, token, expires_at


class LeaseLost(RuntimeError):
    """The holder's grant is no longer the current one (it expired and was granted again, or was released)."""


@dataclass
class _Anchor:
    seq: int
    hash: str
    signed_at: str
    signature: bytes


@dataclass
class _AnchorState:
    """What the anchor file says: absent, unreadable (``error``) or an anchor."""

    anchor: _Anchor | None = None
    error: str | None = None
    present: bool = False


class Ledger:
    """The append-only, hash-chained, signed-anchor ledger (see the module docstring)."""

    def __init__(self, db_path: Path, key_path: Path, anchor_path: Path | None = None):
        self.db_path = Path(db_path)
        self.key_path = Path(key_path)
        self.pub_path = self.key_path.with_suffix(".pub")
        self.anchor_path = Path(anchor_path) if anchor_path else self.key_path.parent / "ledger.anchor.json"
        self.lock_path = self.db_path.with_name(self.db_path.name + ".lock")
        self._key: Ed25519PrivateKey | None = None

    def __repr__(self) -> str:
        return f"Ledger({str(self.db_path)!r})"

    # -- connections and locking -----------------------------------------------------------------

    def _connection(self, create: bool) -> sqlite3.Connection | None:
        """This thread's connection to the ledger (None if the file does not exist and not ``create``).

        Connections are kept per thread and process: closing the last connection to a WAL
        database checkpoints it, which would triple the cost of every append. A connection is
        reopened when the file was replaced (another inode) or after a fork.
        """
        try:
            st = os.stat(self.db_path)
        except FileNotFoundError:
            if not create:
                return None
            st = None
        cache: dict[str, tuple[tuple[int, int, int], sqlite3.Connection, bool]]
        cache = _THREAD.__dict__.setdefault("conns", {})
        path = str(self.db_path)
        hit = cache.get(path)
        if hit and st is not None and hit[0] == (os.getpid(), st.st_dev, st.st_ino):
            conn, ready = hit[1], hit[2]
        else:
            if hit and hit[0][0] != os.getpid():
                _FORKED.append(hit[1])  # never close a connection inherited through fork()
            elif hit:
                hit[1].close()
            create_private_file(self.db_path)  # sqlite's -wal and -shm files take the database's mode
            conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            # An entry the anchor was signed over must survive a power cut, or the anchor would
            # be "ahead" of the database afterwards: commit durably.
            conn.execute("PRAGMA synchronous=FULL")
            ready = False
            st = os.stat(self.db_path)
        if create and not ready:
            self._ensure_schema(conn)
            ready = True
        cache.pop(path, None)
        cache[path] = ((os.getpid(), st.st_dev, st.st_ino), conn, ready)
        while len(cache) > _MAX_CONNS_PER_THREAD:  # tests and tools may open many ledgers
            _, old, _ = cache.pop(next(iter(cache)))
            old.close()
        return conn

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextmanager
    def _shared(self) -> Iterator[bool]:
        """Hold appends off (not other readers); yields False where there is no lock file yet."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield True
        finally:
            os.close(fd)

    @staticmethod
    def _ensure_schema(conn: sqlite3.Connection) -> None:
        """Create the table on first use. Called with the exclusive lock held."""
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection | None]:
        """A read transaction (one snapshot), or None when the ledger was never written."""
        conn = self._connection(create=False)
        if conn is None:
            yield None
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _select(self, where: str = "", params: Iterable[Any] = ()) -> list[Entry]:
        with self._reader() as conn:
            if conn is None:
                return []
            try:
                rows = conn.execute(
                    f"SELECT {', '.join(COLUMNS)} FROM {TABLE} {where} ORDER BY seq", tuple(params)
                ).fetchall()
            except sqlite3.OperationalError as err:
                if "no such table" in str(err):
                    return []
                raise
        return [Entry.from_row(r) for r in rows]

    # -- keys and anchor -------------------------------------------------------------------------

    def _private_key(self, create: bool) -> Ed25519PrivateKey | None:
        if self._key is not None:
            return self._key
        if not self.key_path.exists():
            if not create:
                return None
            self._create_key()
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"{self.key_path} is not an Ed25519 private key")
        self._key = key
        return key

    def _create_key(self) -> None:
        """Write a new key with mode 0600; if another process wins the race, keep its key."""
        self.key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        tmp = self.key_path.with_name(f".{self.key_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.key_path)  # atomic, and never replaces an existing key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        atomic_write(self.pub_path, _public_pem(key.public_key()), mode=0o600)

    def _public_key(self) -> tuple[Ed25519PublicKey | None, str | None]:
        """The verifying key (``<key>.pub``, else derived from the private key), or an error."""
        pub: Ed25519PublicKey | None = None
        if self.pub_path.exists():
            try:
                loaded = serialization.load_pem_public_key(self.pub_path.read_bytes())
            except ValueError as err:
                return None, f"public key {self.pub_path} is unreadable: {err}"
            if not isinstance(loaded, Ed25519PublicKey):
                return None, f"public key {self.pub_path} is not an Ed25519 key"
            pub = loaded
        if self.key_path.exists():
            try:
                priv = self._private_key(create=False)
            except (ValueError, TypeError) as err:
                return None, f"platform key {self.key_path} is unreadable: {err}"
            assert priv is not None
            if pub is None:
                pub = priv.public_key()
            elif _public_pem(pub) != _public_pem(priv.public_key()):
                return None, f"public key {self.pub_path} does not match the platform key {self.key_path}"
        if pub is None:
            return None, f"no platform key to check the anchor with ({self.pub_path} is missing)"
        return pub, None

    def _read_anchor(self) -> _AnchorState:
        try:
            raw = self.anchor_path.read_bytes()
        except FileNotFoundError:
            return _AnchorState()
        try:
            doc = json.loads(raw)
            anchor = _Anchor(seq=doc["seq"], hash=doc["hash"], signed_at=doc["signed_at"],
                             signature=base64.b64decode(doc["signature"], validate=True))
            if not isinstance(anchor.seq, int) or not isinstance(anchor.hash, str):
                raise TypeError("seq must be an integer and hash a string")
        except (ValueError, KeyError, TypeError) as err:
            return _AnchorState(present=True, error=f"anchor {self.anchor_path} is unreadable ({err})")
        return _AnchorState(anchor=anchor, present=True)

    def _write_anchor(self, key: Ed25519PrivateKey, seq: int, hash_: str) -> None:
        doc = {"seq": seq, "hash": hash_, "signed_at": _utc_now(),
               "signature": base64.b64encode(key.sign(anchor_message(seq, hash_))).decode()}
        atomic_write(self.anchor_path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)

    # -- append ----------------------------------------------------------------------------------

    def append(self, kind: str, subject: str, data: dict, actor: str, env: str | None = None,
               fence: Lease | None = None) -> Entry:
        """Append one entry and re-sign the anchor over it; returns the stored entry.

        With ``fence``, the entry is written only while that lease grant is still the current one and
        unexpired (checked in the same transaction); otherwise :class:`LeaseLost` and nothing is written."""
        for name, value in (("kind", kind), ("subject", subject), ("actor", actor)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"ledger entry field {name!r} must be a non-empty string (got {value!r})")
        if env is not None and not isinstance(env, str):
            raise ValueError(f"ledger entry field 'env' must be a string or None (got {env!r})")
        if not isinstance(data, dict):
            raise TypeError(f"ledger entry data must be a dict (got {type(data).__name__})")
        data_text = canonical_json(data)  # raises on values JSON cannot represent
        data_obj = json.loads(data_text)

        with self._exclusive():
            conn = self._connection(create=True)
            assert conn is not None
            try:
                conn.execute("BEGIN IMMEDIATE")
                if fence is not None:
                    self._check_fence(conn, fence)
                row = conn.execute(f"SELECT seq, hash FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
                head_seq, head_hash = row if row else (0, GENESIS_HASH)
                key = self._check_head_before_append(conn, head_seq)
                seq, ts = head_seq + 1, _utc_now()
                hash_ = entry_hash(seq, ts, kind, subject, env, actor, data_obj, head_hash)
                conn.execute(f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES (?,?,?,?,?,?,?,?,?)",
                             (seq, ts, kind, subject, env, actor, data_text, head_hash, hash_))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            # Still under the lock: the anchor always names the newest head.
            self._write_anchor(key, seq, hash_)
        return Entry(seq, ts, kind, subject, env, actor, data_obj, head_hash, hash_)

    def _check_head_before_append(self, conn: sqlite3.Connection, head_seq: int) -> Ed25519PrivateKey:
        """Refuse to sign over a chain whose anchored part was altered, truncated or unsigned."""
        state = self._read_anchor()
        if state.error:
            raise LedgerTampered(None, state.error)
        if state.anchor is None:
            if head_seq > 0:
                raise LedgerTampered(1, f"the signed anchor {self.anchor_path} is missing but the "
                                        f"ledger holds {head_seq} entries")
            key = self._private_key(create=True)
            assert key is not None
            if not self.pub_path.exists():
                atomic_write(self.pub_path, _public_pem(key.public_key()), mode=0o600)
            return key
        anchor = state.anchor
        key = self._private_key(create=False)
        if key is None:
            raise LedgerTampered(None, f"platform key {self.key_path} is missing; the anchor cannot be checked")
        if not self.pub_path.exists():
            atomic_write(self.pub_path, _public_pem(key.public_key()), mode=0o600)
        try:
            key.public_key().verify(anchor.signature, anchor_message(anchor.seq, anchor.hash))
        except InvalidSignature:
            raise LedgerTampered(anchor.seq, "the anchor's signature is invalid (forged or altered anchor)") from None
        if head_seq < anchor.seq:
            raise LedgerTampered(head_seq + 1, f"truncated: the ledger ends at #{head_seq} but the "
                                               f"signed anchor is at #{anchor.seq}")
        rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE seq >= ? ORDER BY seq",
                            (anchor.seq,)).fetchall()
        if not rows or rows[0][0] != anchor.seq or rows[0][8] != anchor.hash:
            raise LedgerTampered(anchor.seq, f"re-hashed chain: entry #{anchor.seq} does not match the signed anchor")
        # Entries after the anchor exist only if a writer died between commit and re-signing:
        # they must still chain from the anchored entry before this append anchors them.
        problem = _walk(rows, first_seq=anchor.seq, prev_hash=None).problem
        if problem:
            raise LedgerTampered(*problem)
        return key

    # -- promotion leases ------------------------------------------------------------------------

    @staticmethod
    def _check_fence(conn: sqlite3.Connection, lease: Lease) -> None:
        row = conn.execute("SELECT holder, token, expires_at FROM promotion_leases WHERE name = ?",
                           (lease.name,)).fetchone()
        if row is None or row[1] != lease.token or row[0] != lease.holder:
            now = f"token {row[1]} held by {row[0]}" if row else "no grant"
            raise LeaseLost(f"{lease.name}: the promotion lock (token {lease.token}) was lost; now {now}")
        if row[2] <= time.time():
            raise LeaseLost(f"{lease.name}: the promotion lock (token {lease.token}) expired")

    @contextmanager
    def _lease_txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on the lease table (sqlite's own lock serializes the writers)."""
        conn = self._connection(create=True)
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease:
        """Grant the lease ``name`` to ``holder`` for ``ttl`` seconds with the next fencing token, unless
        someone else holds it unexpired (:class:`LeaseHeld`)."""
        with self._lease_txn() as conn:
            row = conn.execute("SELECT holder, token, expires_at FROM promotion_leases WHERE name = ?",
                               (name,)).fetchone()
            now = time.time()
            if row is not None and row[2] > now:
                raise LeaseHeld(name, row[0], row[1], row[2])
            token = (row[1] if row else 0) + 1
            lease = Lease(name, holder, token, now + ttl)
            conn.execute("INSERT INTO promotion_leases (name, holder, token, expires_at) VALUES (?,?,?,?) "
                         "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, token = excluded.token, "
                         "expires_at = excluded.expires_at", (name, holder, token, lease.expires_at))
        return lease

    def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Extend a grant that is still current; :class:`LeaseLost` if it is not."""
        with self._lease_txn() as conn:
            self._check_fence(conn, lease)
            renewed = Lease(lease.name, lease.holder, lease.token, time.time() + ttl)
            conn.execute("UPDATE promotion_leases SET expires_at = ? WHERE name = ? AND token = ?",
                         (renewed.expires_at, lease.name, lease.token))
        return renewed

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up (a no-op when the grant is no longer current). The token counter stays."""
        with self._lease_txn() as conn:
            conn.execute("UPDATE promotion_leases SET expires_at = 0 WHERE name = ? AND token = ? AND holder = ?",
                         (lease.name, lease.token, lease.holder))

    def lease(self, name: str) -> Lease | None:
        """The current unexpired grant of ``name``, or None."""
        with self._reader() as conn:
            if conn is None:
                return None
            try:
                row = conn.execute("SELECT holder, token, expires_at FROM promotion_leases WHERE name = ?",
                                   (name,)).fetchone()
            except sqlite3.OperationalError as err:
                if "no such table" in str(err):
                    return None
                raise
        if row is None or row[2] <= time.time():
            return None
        return Lease(name, row[0], row[1], row[2])

    # -- reading ---------------------------------------------------------------------------------

    def entries(self, kind: str | None = None, subject: str | None = None, env: str | None = None,
                since_seq: int = 0) -> list[Entry]:
        """Entries with ``seq > since_seq``, oldest first, filtered by kind/subject/env if given."""
        clauses, params = ["seq > ?"], [since_seq]
        for col, value in (("kind", kind), ("subject", subject), ("env", env)):
            if value is not None:
                clauses.append(f"{col} = ?")
                params.append(value)
        return self._select("WHERE " + " AND ".join(clauses), params)

    def head(self) -> Entry | None:
        with self._reader() as conn:
            if conn is None:
                return None
            try:
                row = conn.execute(
                    f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
            except sqlite3.OperationalError as err:
                if "no such table" in str(err):
                    return None
                raise
        return Entry.from_row(row) if row else None

    def export(self, jsonl_path: Path, csv_path: Path) -> int:
        """Write every entry as JSON lines and as CSV (``data`` as a JSON string); returns the count."""
        rows = self._select()
        jsonl_path, csv_path = Path(jsonl_path), Path(csv_path)
        for p in (jsonl_path, csv_path):
            p.parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl_path, "w", encoding="utf-8") as f:
            for e in rows:
                f.write(canonical_json(e.as_dict()) + "\n")
        with open(csv_path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for e in rows:
                w.writerow([e.seq, e.ts, e.kind, e.subject, e.env or "", e.actor,
                            canonical_json(e.data), e.prev_hash, e.hash])
        return len(rows)

    # -- verify ----------------------------------------------------------------------------------

    def verify(self) -> Verification:
        """Recompute every hash and link, check seq continuity and the signed anchor."""
        try:
            state, rows, locked = self._snapshot()
            if not locked and not state.present and rows:
                # No lock file when we started, but entries now: the very first append ran
                # meanwhile. Look again, under its lock this time.
                state, rows, locked = self._snapshot()
        except sqlite3.DatabaseError as err:
            return Verification(False, 0, None, f"ledger database {self.db_path} is unreadable: {err}")

        walk = _walk(rows, first_seq=1, prev_hash=GENESIS_HASH,
                     want_hash_at=state.anchor.seq if state.anchor else None)
        n = len(rows)
        head_seq = rows[-1][0] if rows else None
        head_hash = rows[-1][8] if rows else None
        base = {"entries": n, "head_seq": head_seq, "head_hash": head_hash}

        def bad(seq: int | None, reason: str) -> Verification:
            return Verification(False, first_bad_seq=seq, reason=reason, **base)

        problem = self._anchor_problem(state, n, head_seq or 0, walk.hash_at)
        if walk.problem and (problem is None or problem[0] is None or walk.problem[0] <= problem[0]):
            return bad(*walk.problem)  # the lowest bad seq wins
        if problem:
            return bad(*problem)
        if state.anchor is None:
            return Verification(True, first_bad_seq=None, reason="empty ledger", **base)
        anchor = state.anchor
        last = head_seq or 0
        unanchored = last - anchor.seq
        reason = "intact"
        if unanchored:
            reason = (f"intact; {unanchored} entr{'y' if unanchored == 1 else 'ies'} after the signed "
                      f"anchor #{anchor.seq} {'is' if unanchored == 1 else 'are'} not yet anchored")
        return Verification(True, first_bad_seq=None, reason=reason, anchor_seq=anchor.seq,
                            anchor_signed_at=anchor.signed_at, unanchored=unanchored, **base)

    def _snapshot(self) -> tuple[_AnchorState, list[tuple], bool]:
        """The anchor and every row, as of one moment: (anchor, rows, whether the lock was held).

        Both are taken under the shared lock, so no append is between its commit and its
        re-signing: they name the same head. The lock is released as soon as the read
        transaction holds its snapshot; the rows are read after.
        """
        conn = None
        try:
            with self._shared() as locked:
                state = self._read_anchor()
                conn = self._connection(create=False)
                if conn is not None:
                    conn.execute("BEGIN")
                    try:
                        conn.execute(f"SELECT 1 FROM {TABLE} LIMIT 1").fetchall()
                    except sqlite3.OperationalError as err:
                        if "no such table" not in str(err):
                            raise
                        return state, [], locked
            if conn is None:
                return state, [], locked
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY seq").fetchall()
            return state, rows, locked
        finally:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")

    def _anchor_problem(self, state: _AnchorState, n: int, last: int,
                        hash_at_anchor: str | None) -> tuple[int | None, str] | None:
        """What is wrong with the anchor against a chain of ``n`` entries ending at ``last``."""
        if not state.present:
            if n == 0:
                return None
            return 1, (f"the signed anchor {self.anchor_path} is missing: none of the {n} entries "
                       f"can be vouched for")
        if state.error:
            return None, state.error
        anchor = state.anchor
        assert anchor is not None
        pub, err = self._public_key()
        if pub is None:
            return None, err or "no public key"
        try:
            pub.verify(anchor.signature, anchor_message(anchor.seq, anchor.hash))
        except InvalidSignature:
            return anchor.seq, f"the anchor's signature is invalid (forged or altered anchor for #{anchor.seq})"
        if last < anchor.seq:
            return last + 1, (f"truncated: entries #{last + 1}..#{anchor.seq} are missing (the ledger "
                              f"ends at #{last} but the signed anchor is at #{anchor.seq})")
        if hash_at_anchor != anchor.hash:
            return anchor.seq, (f"re-hashed chain: the chain does not match the signed anchor (entry "
                                f"#{anchor.seq} hash {str(hash_at_anchor)[:12]}, signed {anchor.hash[:12]}); "
                                f"entries up to #{anchor.seq} were rewritten and re-hashed")
        return None


@dataclass
class _Walk:
    problem: tuple[int, str] | None = None
    hash_at: str | None = None


def _walk(rows: list[tuple], first_seq: int, prev_hash: str | None,
          want_hash_at: int | None = None) -> _Walk:
    """Check seq continuity, every entry's hash and every link; remember the first problem.

    ``prev_hash=None`` trusts the first row's own link (used to check from the anchored entry on).
    """
    out = _Walk()
    expected = first_seq
    for seq, ts, kind, subject, env, actor, data_text, prev, hash_ in rows:
        if seq == want_hash_at:
            out.hash_at = hash_
        if out.problem:
            continue
        if seq != expected:
            if seq > expected:
                missing = f"#{expected}" if seq == expected + 1 else f"#{expected}..#{seq - 1}"
                out.problem = (expected, (f"entry {missing} is missing (the seq jumps from "
                                          f"#{expected - 1} to #{seq})"))
            else:
                out.problem = (seq, f"unexpected entry #{seq} (expected #{expected})")
            continue
        expected += 1
        try:
            data = json.loads(data_text)
        except (TypeError, ValueError):
            out.problem = (seq, f"entry #{seq} was altered: its data is not valid JSON")
            continue
        if entry_hash(seq, ts, kind, subject, env, actor, data, prev) != hash_:
            out.problem = (seq, f"entry #{seq} was altered: its content does not match its hash")
            continue
        if prev_hash is not None and prev != prev_hash:
            out.problem = (seq, (f"entry #{seq} does not link to entry #{seq - 1} (prev_hash "
                                 f"{prev[:12]} != {prev_hash[:12]}): an earlier entry was altered "
                                 f"and re-hashed, removed or moved"))
            continue
        prev_hash = hash_
    return out


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class LedgerResource(dg.ConfigurableResource):
    """The platform ledger: append-only, hash-chained, its head signed by the platform key."""

    db_path: str = Field(description="sqlite file holding the ledger (default $ONEPATH_HOME/ledger.db).")
    key_path: str = Field(
        description="Ed25519 platform signing key (PEM, mode 0600), kept outside the database; "
                    "created on first append; its public key is written next to it as .pub.")
    anchor_path: str | None = Field(
        None, description="Signed anchor file (seq, hash, signature of the head); default "
                          "ledger.anchor.json next to the key.")

    def ledger(self) -> Ledger:
        return Ledger(Path(self.db_path), Path(self.key_path),
                      Path(self.anchor_path) if self.anchor_path else None)
