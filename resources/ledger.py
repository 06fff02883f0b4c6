"""onepath's one tamper-evident ledger: every deploy, promotion, approval, rollback and verdict.

Storage is one append-only table (``resources.ledger_store``: sqlite, the embedded default, or PostgreSQL, through
one SQLAlchemy Core layer): each entry carries ``prev_hash`` (the hash of the
entry before it; 64 zeros for the first) and ``hash``, the sha256 of the canonical JSON (sorted
keys, ``(",", ":")`` separators) of the object

    {"seq", "ts", "kind", "subject", "env", "actor", "data", "prev_hash"}

so anyone can re-check the chain with ``sqlite3`` (or ``psql``) and ``hashlib`` (``data`` is stored in that very
canonical form, and ``verify`` hashes it as stored).

A chain alone only proves consistency: whoever can write the database can rewrite it and re-hash
every entry. Three things stand against that, each against a stronger insider:

* **A head signature per append, in the same transaction.** Every append signs its new head
  ``(seq, hash)`` (``anchor_message``: ``f"{seq}:{hash}"``) with the platform's Ed25519 key (a file
  outside the database) and inserts ``(seq, key, sig)`` into ``head_signatures`` inside the append's
  own transaction: an entry and its signature are durable together or not at all.
  Only the head is signed, never every entry again (one signature per append). Before it inserts,
  an append checks that the current head carries a signature that verifies under the expected key,
  so a row INSERTed with sqlite or psql by someone without the key is *tampering*, refused
  (:class:`LedgerTampered`), never signed over by the next legitimate append.
* **The key is pinned in the recorded policy.** The expected key is the ``platform_key`` of the
  newest ``policy_recorded`` entry (see ``platform_defs/policy_record.py``; trust on first use, the
  key file's own public key, before any policy is recorded). A key pair replaced under
  ``$ONEPATH_HOME/keys`` no longer matches the pin: appends refuse, verify says so.
* **A witness** (``resources.witness``), a service running as its own OS user with its own log,
  countersigns every head: after each append commits (still under the lock) the rows it does not
  hold yet are submitted to it; it accepts only a batch that continues its log and ends in a head
  signed by the platform key it was initialised with. An insider who rewrites history, replaces the
  key and re-signs everything is named by ``verify`` at the first entry that differs from what the
  witness countersigned. The witness being unreachable never fails an append (deploys must still be
  recorded): those rows are submitted with the next append, and ``verify`` reports them.

``verify()`` walks the chain (hash, links, seq continuity), checks the head's signature (the chain
links every earlier entry to it), and when that fails finds the first bad signature by binary
search over the signed heads (a key-less re-hash from entry j breaks every signature from j on and
none before); ``verify(full=True)`` checks every signature. With a witness it asks the witness's
head and, when the chains differ, binary-searches the witness's ``hash_at`` for the first entry that
differs. A witness pinned in the policy but unreachable makes ``verify`` fail closed.

A ``ledger.db`` from before head signatures (an anchor file ``keys/ledger.anchor.json``) is migrated
on its first append or verify, under the exclusive lock: when the old anchor verifies under the
platform key and names the current head, its signature becomes the head's signature (it signs the same message), and the anchor file
is removed.

Promotion leases live in the same database (table ``promotion_leases``): one row per endpoint or
app environment, naming its holder, a *fencing token* that grows by one with every grant, and an
expiry. ``acquire_lease`` grants it when it is free or expired; the holder renews it while it works
(``renew_lease``); ``append(..., fence=lease)`` writes an entry only while that very grant still
holds, checked inside the append's own transaction; the deployer passes the token to the server
side, which refuses a cutover whose token is older than one it has seen. So a stalled holder that
lost its lease can neither switch traffic nor record that it did. The lease rows are state, not
history: they are outside the hash chain.

Concurrency: an append (read head, check its signature, insert entry and signature, commit,
submit to the witness) runs under the store's exclusive append lock (sqlite: an ``fcntl.flock`` on
``<db>.lock`` and ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock held by the append's session, so
writers on several hosts serialize with no shared lock file), so separate processes (Dagster runs,
sensors, the CLI), hosts and threads serialize. ``verify`` reads one database snapshot; other reads
take no lock.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import sqlalchemy as sa

from resources.files import atomic_write
from resources.ledger_store import (  # BUSY_TIMEOUT_S, LedgerUnavailable: re-exported for callers
    BUSY_TIMEOUT_S,  # noqa: F401
    COLUMNS,
    RECEIPTS,
    SIGS,
    TABLE,
    Conn,
    LedgerStore,
    LedgerUnavailable,
)
from resources.witness import WitnessClient, WitnessError

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
    "approval_revoked",
    "approval_lapsed",
    "credential_granted",  # platform_defs.access: a grant, its credential's sha256 (never a secret)
    "credential_rotated",
    "credential_revoked",
)

GENESIS_HASH = "0" * 64
WITNESS_TIMEOUT_S = 5.0
POLICY_KIND = "policy_recorded"
LEGACY_ANCHOR = "ledger.anchor.json"
_COLS = ", ".join(COLUMNS)
# what a read or write of the store can raise besides our own errors (a driver error, the store unreachable)
STORE_ERRORS: tuple[type[BaseException], ...] = (sa.exc.SQLAlchemyError, LedgerUnavailable)


def store_error_text(err: BaseException) -> str:
    """One line for a store error: the driver's own message, not SQLAlchemy's wrapper and its link."""
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_missing_table = LedgerStore.missing_table


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
    signed_by_pin: bool = False  # the head's signature verifies under the key pinned in the recorded policy
    witness_seq: int | None = None  # the witness's head, when a witness was asked and answered
    unwitnessed: int = 0  # entries after the witness's head (or after the last receipt when it is down)
    findings: tuple[str, ...] = ()  # every problem and note, one line each (reason leads with the first)
    pinned_in: int | None = None  # seq of the policy_recorded entry whose platform key was checked
    unreadable: bool = False  # the store could not be reached or read: nothing was judged, nothing vouched for


class LedgerTampered(RuntimeError):
    """Raised by ``append`` when the head is not one this platform signed with the expected key
    (nothing is written)."""

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


class LedgerCopyRefused(RuntimeError):
    """``Ledger.copy_to`` wrote nothing: the source does not verify, or the target holds another history."""


class LeaseLost(RuntimeError):
    """The holder's grant is no longer the current one (it expired and was granted again, or was released)."""




def _raw_b64(pub: Ed25519PublicKey) -> str:
    return base64.b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


_PUBS: dict[str, Ed25519PublicKey | None] = {}


def _pub_from_b64(text: Any) -> Ed25519PublicKey | None:
    """The public key of a b64 raw 32-byte Ed25519 key, or None when ``text`` is not one."""
    if not isinstance(text, str):
        return None
    if text in _PUBS:
        return _PUBS[text]
    try:
        pub: Ed25519PublicKey | None = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError):
        pub = None
    if len(_PUBS) >= 64:  # tests and tools see many keys; the platform sees one or two (cleared BEFORE adding:
        _PUBS.clear()     # clearing after it dropped the very key just parsed, a KeyError on the 65th key)
    _PUBS[text] = pub
    return pub


def _sig_ok(key_b64: str, sig_b64: str, seq: int, hash_: str | None) -> bool:
    pub = _pub_from_b64(key_b64)
    if pub is None or hash_ is None:
        return False
    try:
        pub.verify(base64.b64decode(sig_b64, validate=True), anchor_message(seq, hash_))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


class _Pins:
    """The ``platform_key`` (and ``witness_key``) of every ``policy_recorded`` entry, oldest first."""

    def __init__(self, records: Iterable[tuple[int, str]]):
        self.pins: list[tuple[int, Any, Any]] = []
        for seq, data_text in records:
            try:
                data = json.loads(data_text)
            except (TypeError, ValueError):
                data = {}
            data = data if isinstance(data, dict) else {}
            self.pins.append((seq, data.get("platform_key"), data.get("witness_key")))

    def newest(self) -> tuple[int, Any, Any] | None:
        return self.pins[-1] if self.pins else None

    def at(self, seq: int) -> tuple[int, Any] | None:
        """The pin in force when head ``seq`` was signed: the newest policy recorded before it; heads
        signed before the first policy (trust on first use) were signed by the key it then pinned."""
        if not self.pins:
            return None
        best = self.pins[0]
        for p in self.pins:
            if p[0] < seq:
                best = p
            else:
                break
        return best[0], best[1]


def _first_failing(seqs: list[int], good: Callable[[int], bool]) -> int:
    """Index of the first seq in ``seqs`` whose check fails, given that the last fails and failures
    are a suffix (a re-hash from entry j breaks every signed head from j on and none before)."""
    lo, hi = 0, len(seqs) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if good(seqs[mid]):
            lo = mid + 1
        else:
            hi = mid
    return lo


class Ledger:
    """The append-only, hash-chained ledger with signed heads and a witness (see the module docstring)."""

    def __init__(self, location: Path | str, key_path: Path, witness_socket: Path | str | None = None,
                 witness_timeout: float = WITNESS_TIMEOUT_S, private_key_pem: str | bytes | None = None):
        """``location``: the sqlite file (a path) or a PostgreSQL URL (``postgresql+psycopg2://...``).
        ``private_key_pem``: the platform key itself (PEM, from the environment on a host that appends: never
        written to disk); else the key file ``key_path`` (created on first use). ``<key>.pub`` is written
        next to ``key_path`` either way (it is public)."""
        self.store = LedgerStore(location)
        self.db_path = self.store.db_path  # None on PostgreSQL
        self.key_path = Path(key_path)
        self.pub_path = self.key_path.with_suffix(".pub")
        self.legacy_anchor_path = self.key_path.parent / LEGACY_ANCHOR
        self.witness_socket = Path(witness_socket) if witness_socket else None
        self.witness_timeout = witness_timeout
        self._key: Ed25519PrivateKey | None = None
        self._own_pub_pem = b""  # the .pub file this key writes, byte for byte
        self._key_pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem

    def __repr__(self) -> str:
        return f"Ledger({self.store.display!r})"

    @property
    def key_source(self) -> str:
        """Where the platform key comes from, fit for a message."""
        return "given in ONEPATH_PLATFORM_KEY" if self._key_pem is not None else str(self.key_path)

    @property
    def location(self) -> str:
        """Where the entries are, fit to print (a PostgreSQL URL without its password)."""
        return self.store.display

    def written(self) -> bool:
        """Whether anything was ever stored (reading or verifying an unused ledger creates nothing)."""
        with self.store.connect(create=False) as conn:
            return conn is not None

    # -- reading in one snapshot -----------------------------------------------------------------

    @contextmanager
    def _reader(self) -> Iterator[Conn | None]:
        """A read transaction (one snapshot), or None when the ledger was never written."""
        with self.store.connect(create=False) as conn:
            if conn is None:
                yield None
                return
            conn.begin(write=False)
            yield conn  # connect() rolls the read transaction back

    def _select(self, where: str = "", params: dict[str, Any] | None = None) -> list[Entry]:
        with self._reader() as conn:
            if conn is None:
                return []
            try:
                rows = conn.rows(f"SELECT {_COLS} FROM {TABLE} {where} ORDER BY seq", **(params or {}))
            except sa.exc.DBAPIError as err:
                if _missing_table(err):
                    return []
                raise
        return [Entry.from_row(r) for r in rows]

    # -- keys --------------------------------------------------------------------------------------

    def _private_key(self, create: bool) -> Ed25519PrivateKey | None:
        if self._key is not None:
            return self._key
        if self._key_pem is not None:
            where = "the platform key given in the environment (ONEPATH_PLATFORM_KEY)"
            try:
                key = serialization.load_pem_private_key(self._key_pem, password=None)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{where} is not a PEM private key: {err}") from None
        else:
            where = str(self.key_path)
            if not self.key_path.exists():
                if not create:
                    return None
                self._create_key()
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"{where} is not an Ed25519 private key")
        self._key = key
        self._own_pub_pem = _public_pem(key.public_key())
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
        if self._key is not None:  # every append asks: the usual answer without parsing a PEM again
            try:
                if self.pub_path.read_bytes() == self._own_pub_pem:
                    return self._key.public_key(), None
            except OSError:
                pass
        if self.pub_path.exists():
            try:
                loaded = serialization.load_pem_public_key(self.pub_path.read_bytes())
            except ValueError as err:
                return None, f"public key {self.pub_path} is unreadable: {err}"
            if not isinstance(loaded, Ed25519PublicKey):
                return None, f"public key {self.pub_path} is not an Ed25519 key"
            pub = loaded
        if self._key_pem is not None or self.key_path.exists():
            try:
                priv = self._private_key(create=False)
            except (ValueError, TypeError) as err:
                return None, f"platform key {self.key_source} is unreadable: {err}"
            assert priv is not None
            if pub is None:
                pub = priv.public_key()
            elif _public_pem(pub) != _public_pem(priv.public_key()):
                return None, f"public key {self.pub_path} does not match the platform key {self.key_source}"
        if pub is None:
            return None, f"no platform key to check signatures with ({self.pub_path} is missing)"
        return pub, None


    # -- the pinned key, the head signatures -----------------------------------------------------

    def platform_public_key_b64(self, create: bool = True) -> str:
        """The platform key's public half as b64 of its 32 raw bytes (what a policy pins); the key pair
        is created on first use, as the first append would."""
        if create and self._key_pem is None and not self.key_path.exists():
            with self.store.file_lock():
                key = self._private_key(create=True)
                assert key is not None
                if not self.pub_path.exists():
                    atomic_write(self.pub_path, _public_pem(key.public_key()), mode=0o600)
        pub, err = self._public_key()
        if pub is None:
            raise LedgerTampered(None, err or f"no platform key at {self.key_path}")
        return _raw_b64(pub)

    def _pins(self, conn: Conn) -> _Pins:
        try:
            return _Pins(conn.rows(f"SELECT seq, data FROM {TABLE} WHERE kind = :kind ORDER BY seq", kind=POLICY_KIND))
        except sa.exc.DBAPIError as err:
            if _missing_table(err):
                return _Pins(())
            raise

    def _newest_pin(self) -> tuple[int, Any, Any] | None:
        with self._reader() as conn:
            if conn is None:
                return None
            try:
                row = conn.one(f"SELECT seq, data FROM {TABLE} WHERE kind = :kind ORDER BY seq DESC LIMIT 1",
                               kind=POLICY_KIND)
            except sa.exc.DBAPIError as err:
                if _missing_table(err):
                    return None
                raise
        return _Pins([row]).newest() if row else None

    def pinned_platform_key(self) -> str | None:
        """The ``platform_key`` of the newest ``policy_recorded`` entry (None before any policy).

        The ledger only reads the field; whether that record is signed by an administrator is
        ``platform_defs.policy_record``'s job."""
        pin = self._newest_pin()
        return pin[1] if pin and isinstance(pin[1], str) else None

    def pinned_witness_key(self) -> str | None:
        pin = self._newest_pin()
        return pin[2] if pin and isinstance(pin[2], str) else None

    def witness_public_key_b64(self) -> str | None:
        """The configured witness's public key (asked over its socket); None when no witness is configured.
        Raises :class:`resources.witness.WitnessError` when it cannot be reached."""
        if self.witness_socket is None:
            return None
        with WitnessClient(self.witness_socket, self.witness_timeout) as w:
            return w.public_key()

    def _key_desc(self, pin: tuple[int, Any] | None) -> str:
        return f"the platform key pinned in policy #{pin[0]}" if pin else f"the platform key {self.pub_path}"

    def _signature_problem(self, signed_seqs: Callable[[], list[int]],
                           sig_of: Callable[[int], tuple[str, str] | None],
                           hash_of: Callable[[int], str | None], head_seq: int, pins: _Pins,
                           own_b64: str | None, full: bool) -> tuple[int | None, str] | None:
        """The first head signature that does not verify under the key expected at its seq, if any.

        ``signed_seqs()``: the signed seqs up to the head, ascending, the head among them (only asked
        for when the head's signature fails, or with ``full``: an append checks one signature)."""

        def expected(seq: int) -> tuple[str | None, tuple[int, Any] | None]:
            pin = pins.at(seq)
            return (pin[1] if pin else own_b64), pin

        def good(seq: int) -> bool:
            got = sig_of(seq)
            want, _ = expected(seq)
            return got is not None and got[0] == want and _sig_ok(got[0], got[1], seq, hash_of(seq))

        if not full and good(head_seq):
            return None
        signed = signed_seqs()
        if full:
            bad = next((i for i, s in enumerate(signed) if not good(s)), None)
            if bad is None:
                return None
        else:
            bad = _first_failing(signed, good)
        seq = signed[bad]
        first = signed[bad - 1] + 1 if bad else 1
        want, pin = expected(seq)
        got = sig_of(seq)
        desc = self._key_desc(pin)
        if want is None or _pub_from_b64(want) is None:
            return first, (f"entry #{first}: its signature cannot be checked: {desc} ({want!r}) is not an "
                           f"Ed25519 public key")
        where = f"entry #{first}" if first == seq else f"entries #{first}..#{seq} (signed head #{seq})"
        if got is not None and got[0] != want:
            return first, (f"{where}: signed with key {got[0][:16]}..., not with {desc} ({want[:16]}...): "
                           f"entries from #{first} were rewritten and re-signed with another key")
        return first, (f"{where}: its signature does not verify with {desc}: entries from #{first} were "
                       f"rewritten and re-hashed, or signed with another key")

    def _migrate_legacy_anchor(self, conn: Conn, head_seq: int, head_hash: str,
                               key: Ed25519PrivateKey) -> bool:
        """Inside the append's transaction: turn a verified old anchor naming the head into the head's
        signature (the same message was signed). False when there is no anchor file; LedgerTampered
        when there is one that does not verify or names another entry."""
        try:
            doc = json.loads(self.legacy_anchor_path.read_bytes())
        except FileNotFoundError:
            return False
        except ValueError as err:
            raise LedgerTampered(None, f"cannot migrate: the old anchor {self.legacy_anchor_path} is "
                                       f"unreadable ({err})") from None
        try:
            seq, hash_, sig = doc["seq"], doc["hash"], doc["signature"]
            ok = isinstance(seq, int) and isinstance(hash_, str) and isinstance(sig, str)
        except (KeyError, TypeError):
            ok = False
        own = _raw_b64(key.public_key())
        if not ok or not _sig_ok(own, sig, seq, hash_):
            raise LedgerTampered(None, f"cannot migrate: the old anchor {self.legacy_anchor_path} does not "
                                       f"verify with the platform key {self.key_path}")
        if (seq, hash_) != (head_seq, head_hash):
            raise LedgerTampered(min(seq, head_seq) + 1 if seq != head_seq else seq,
                                 f"cannot migrate: the old anchor {self.legacy_anchor_path} signs #{seq} "
                                 f"{hash_[:12]} but the head is #{head_seq} {head_hash[:12]}: entries "
                                 f"after the anchor were not signed by onepath")
        conn.execute(f"INSERT INTO {SIGS} (seq, key, sig) VALUES (:seq, :key, :sig)", seq=seq, key=own, sig=sig)
        return True

    def _migrate_now(self) -> None:
        """verify's way to migrate an old ledger (an append does it in its own transaction)."""
        with self.store.exclusive() as conn:  # the schema: the head_signatures table of a ledger from before them
            with conn.transaction(write=True):
                if conn.one(f"SELECT 1 FROM {SIGS} LIMIT 1") is None:
                    row = conn.one(f"SELECT seq, hash FROM {TABLE} ORDER BY seq DESC LIMIT 1")
                    key = self._private_key(create=False)
                    if row is not None and key is not None:
                        self._migrate_legacy_anchor(conn, row[0], row[1], key)
        self.legacy_anchor_path.unlink(missing_ok=True)

    # -- append ----------------------------------------------------------------------------------

    def append(self, kind: str, subject: str, data: dict, actor: str, env: str | None = None,
               fence: Lease | None = None) -> Entry:
        """Append one entry and its head signature in one transaction; returns the stored entry.

        The current head must carry a signature that verifies under the expected key (the pinned
        one), else :class:`LedgerTampered` and nothing is written. With ``fence``, the entry is written
        only while that lease grant is still the current one and unexpired (checked in the same
        transaction); otherwise :class:`LeaseLost` and nothing is written. After the commit, still
        under the lock, the rows the witness does not hold yet are submitted to it (best effort)."""
        for name, value in (("kind", kind), ("subject", subject), ("actor", actor)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"ledger entry field {name!r} must be a non-empty string (got {value!r})")
        if env is not None and not isinstance(env, str):
            raise ValueError(f"ledger entry field 'env' must be a string or None (got {env!r})")
        if not isinstance(data, dict):
            raise TypeError(f"ledger entry data must be a dict (got {type(data).__name__})")
        data_text = canonical_json(data)  # raises on values JSON cannot represent
        data_obj = json.loads(data_text)

        try:
            return self._append_locked(kind, subject, data_text, data_obj, actor, env, fence)
        except sa.exc.DBAPIError as err:
            if _missing_table(err) and self._signatures_dropped():
                raise LedgerTampered(None, f"the {SIGS} table of {self.location} was dropped: no entry can be "
                                           f"vouched for; nothing was written") from None
            raise

    def _append_locked(self, kind: str, subject: str, data_text: str, data_obj: Any, actor: str, env: str | None,
                       fence: Lease | None) -> Entry:
        # the append lock held, a write transaction open, the head read: on PostgreSQL in one round trip
        with self.store.appending(_HEAD_SQL) as (conn, found):
            if fence is not None:
                self._check_fence(conn, fence, hold=True)
            head = _Head.of(found, conn)
            pins = self._pins_for(conn, head)
            key, own_b64, migrated = self._check_head_before_append(conn, head, pins)
            head_seq, head_hash = (head.row[0], head.row[8]) if head.row else (0, GENESIS_HASH)
            seq, ts = head_seq + 1, _utc_now()
            hash_ = entry_hash(seq, ts, kind, subject, env, actor, data_obj, head_hash)
            sig = base64.b64encode(key.sign(anchor_message(seq, hash_))).decode()
            conn.commit_with(
                (f"INSERT INTO {TABLE} ({_COLS}) VALUES (:seq, :ts, :kind, :subject, :env, :actor, :data, "
                 f":prev_hash, :hash)", {"seq": seq, "ts": ts, "kind": kind, "subject": subject, "env": env,
                                         "actor": actor, "data": data_text, "prev_hash": head_hash, "hash": hash_}),
                (f"INSERT INTO {SIGS} (seq, key, sig) VALUES (:sig_seq, :sig_key, :sig_sig)",
                 {"sig_seq": seq, "sig_key": own_b64, "sig_sig": sig}),
                release=self.witness_socket is None)  # without a witness the lock is needed no longer
            if migrated:
                self.legacy_anchor_path.unlink(missing_ok=True)
            # Still under the lock: the witness sees heads in order.
            self._witness_catch_up(conn, [seq, head_hash, hash_], sig, pins, head.receipt)
        return Entry(seq, ts, kind, subject, env, actor, data_obj, head_hash, hash_)

    def _signatures_dropped(self) -> bool:
        with self.store.connect(create=False) as conn:
            if conn is None:
                return False
            tables = conn.tables()
        return TABLE in tables and SIGS not in tables

    def _pins_for(self, conn: Conn, head: "_Head") -> _Pins:
        """The policy pins, read again only when the newest policy record changed (which the head query names):
        an append in steady state reads no more than its head."""
        key = (self.store.url, head.newest_policy)
        found = _PINS_SEEN.get(key)
        if found is None:
            found = self._pins(conn)
            if len(_PINS_SEEN) >= 16:
                _PINS_SEEN.clear()
            _PINS_SEEN[key] = found
        return found

    def _check_head_before_append(self, conn: Conn, found: "_Head",
                                  pins: _Pins) -> tuple[Ed25519PrivateKey, str, bool]:
        """Refuse to extend a chain whose head this platform did not sign with the expected key.

        Returns the signing key, its b64 raw public key and whether an old anchor was migrated."""
        head = found.row
        head_seq = head[0] if head else 0
        key = self._private_key(create=head_seq == 0 and not pins.pins)
        if key is None:
            raise LedgerTampered(None, f"the platform key {self.key_path} is missing: the ledger's "
                                       f"{head_seq} entries cannot be extended")
        if not self.pub_path.exists():
            atomic_write(self.pub_path, _public_pem(key.public_key()), mode=0o600)
        pub, err = self._public_key()
        if pub is None:
            raise LedgerTampered(None, err or "no public key")
        own_b64 = _raw_b64(key.public_key())
        newest = pins.newest()
        if newest is not None and newest[1] != own_b64:
            raise LedgerTampered(None, f"the platform key {self.key_source} is not the key pinned in policy "
                                       f"#{newest[0]} ({str(newest[1])[:16]}..., this key {own_b64[:16]}...): "
                                       f"it was replaced; nothing was written (restore the pinned key)")
        last_signed = found.last_signed
        if head is None:
            if last_signed is not None:
                raise LedgerTampered(1, f"truncated: the ledger is empty but heads up to #{last_signed} "
                                        f"were signed")
            return key, own_b64, False
        seq, hash_ = head[0], head[8]
        altered = _walk([head], first_seq=seq, prev_hash=None).problem  # the head's own hash
        if altered:
            raise LedgerTampered(*altered)
        migrated = False
        if last_signed is None:
            migrated = self._migrate_legacy_anchor(conn, seq, hash_, key)
            last_signed = seq if migrated else None
        if last_signed is not None and last_signed > seq:
            raise LedgerTampered(seq + 1, f"truncated: entries #{seq + 1}..#{last_signed} are missing (the "
                                          f"ledger ends at #{seq} but heads up to #{last_signed} were signed)")
        head_sig = found.sig
        if head_sig is None and migrated:
            head_sig = conn.one(f"SELECT key, sig FROM {SIGS} WHERE seq = :seq", seq=seq)  # type: ignore[assignment]
        if head_sig is None:
            k = (last_signed or 0) + 1
            span = f"entry #{k} is" if k == seq else f"entries #{k}..#{seq} are"
            raise LedgerTampered(k, f"entry #{k} carries no platform signature: it was written outside "
                                    f"onepath ({span} unsigned); nothing was written")
        def signed() -> list[int]:
            return [r[0] for r in conn.rows(f"SELECT seq FROM {SIGS} WHERE seq <= :seq ORDER BY seq", seq=seq)]

        def sig_of(s: int) -> tuple[str, str] | None:
            if s == seq:
                return head_sig
            return conn.one(f"SELECT key, sig FROM {SIGS} WHERE seq = :seq", seq=s)  # type: ignore[return-value]

        def hash_of(s: int) -> str | None:
            return hash_ if s == seq else conn.scalar(f"SELECT hash FROM {TABLE} WHERE seq = :seq", seq=s)

        problem = self._signature_problem(signed, sig_of, hash_of, seq, pins, own_b64, full=False)
        if problem:
            raise LedgerTampered(problem[0], problem[1] + "; nothing was written")
        return key, own_b64, migrated

    # -- the witness -----------------------------------------------------------------------------

    def _witness_catch_up(self, conn: Conn, new_row: list, head_sig: str, pins: _Pins, last: int) -> None:
        """Submit every row the witness does not hold yet, ending in the new head ``new_row`` ([seq, prev_hash,
        hash]); ``last``: the newest receipt before this append. Never raises: an unreachable witness leaves the
        rows un-witnessed until the next append (verify says so)."""
        if self.witness_socket is None:
            return
        head_seq = new_row[0]
        try:
            pin = pins.newest()
            wkey = pin[2] if pin and isinstance(pin[2], str) else None
            with WitnessClient(self.witness_socket, self.witness_timeout, wkey) as w:
                start = last + 1
                if last == 0 or last >= head_seq:
                    start = w.head()[0] + 1  # unsure where the witness is: ask it
                for attempt in (0, 1):
                    rows = [new_row] if start == head_seq else [list(r) for r in conn.rows(
                        f"SELECT seq, prev_hash, hash FROM {TABLE} WHERE seq >= :start ORDER BY seq", start=start)]
                    if not rows or rows[-1][0] != head_seq:
                        return  # the witness holds our head already, or is ahead of us (verify reports it)
                    accepted, answer = w.submit(rows, head_sig)
                    if accepted:
                        conn.run_with((f"INSERT INTO {RECEIPTS} (seq, cosig) VALUES (:seq, :cosig) "
                                       f"ON CONFLICT (seq) DO UPDATE SET cosig = excluded.cosig",
                                       {"seq": head_seq, "cosig": answer["sig"]}), release=True)
                        return
                    if attempt == 0:
                        start = w.head()[0] + 1  # our receipts may be behind the witness: ask it
        except (WitnessError, OSError, ValueError, *STORE_ERRORS):
            return


    # -- promotion leases ------------------------------------------------------------------------

    @staticmethod
    def _check_fence(conn: Conn, lease: Lease, hold: bool = False) -> None:
        row = conn.one(conn.lease_row_sql(hold), name=lease.name)
        if row is None or row[1] != lease.token or row[0] != lease.holder:
            now = f"token {row[1]} held by {row[0]}" if row else "no grant"
            raise LeaseLost(f"{lease.name}: the promotion lock (token {lease.token}) was lost; now {now}")
        if row[2] <= conn.now():
            raise LeaseLost(f"{lease.name}: the promotion lock (token {lease.token}) expired")

    @contextmanager
    def _lease_txn(self) -> Iterator[Conn]:
        """One write transaction on the lease table, one lease writer at a time (``Conn.lock_leases``)."""
        with self.store.connect(create=True) as conn:
            assert conn is not None
            with conn.transaction(write=True):
                conn.lock_leases()
                yield conn

    def acquire_lease(self, name: str, holder: str, ttl: float) -> Lease:
        """Grant the lease ``name`` to ``holder`` for ``ttl`` seconds with the next fencing token, unless
        someone else holds it unexpired (:class:`LeaseHeld`). Expiry is on the store's clock."""
        with self._lease_txn() as conn:
            row = conn.one(conn.lease_row_sql(), name=name)
            now = conn.now()
            if row is not None and row[2] > now:
                raise LeaseHeld(name, row[0], row[1], row[2])
            token = (row[1] if row else 0) + 1
            lease = Lease(name, holder, token, now + ttl)
            conn.execute("INSERT INTO promotion_leases (name, holder, token, expires_at) VALUES "
                         "(:name, :holder, :token, :expires_at) ON CONFLICT (name) DO UPDATE SET "
                         "holder = excluded.holder, token = excluded.token, expires_at = excluded.expires_at",
                         name=name, holder=holder, token=token, expires_at=lease.expires_at)
        return lease

    def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Extend a grant that is still current; :class:`LeaseLost` if it is not."""
        with self._lease_txn() as conn:
            self._check_fence(conn, lease)
            renewed = Lease(lease.name, lease.holder, lease.token, conn.now() + ttl)
            conn.execute("UPDATE promotion_leases SET expires_at = :expires_at WHERE name = :name AND token = :token",
                         expires_at=renewed.expires_at, name=lease.name, token=lease.token)
        return renewed

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up (a no-op when the grant is no longer current). The token counter stays."""
        with self._lease_txn() as conn:
            conn.execute("UPDATE promotion_leases SET expires_at = 0 WHERE name = :name AND token = :token "
                         "AND holder = :holder", name=lease.name, token=lease.token, holder=lease.holder)

    def lease(self, name: str) -> Lease | None:
        """The current unexpired grant of ``name``, or None."""
        with self._reader() as conn:
            if conn is None:
                return None
            try:
                row = conn.one(conn.lease_row_sql(), name=name)
            except sa.exc.DBAPIError as err:
                if _missing_table(err):
                    return None
                raise
            if row is None or row[2] <= conn.now():
                return None
        return Lease(name, row[0], row[1], row[2])

    # -- reading ---------------------------------------------------------------------------------

    def entries(self, kind: str | None = None, subject: str | None = None, env: str | None = None,
                since_seq: int = 0, kinds: Iterable[str] | None = None) -> list[Entry]:
        """Entries with ``seq > since_seq``, oldest first, filtered by kind/subject/env if given; ``kinds``: only
        entries of these kinds (one read; an entry of another kind is not decoded)."""
        clauses, params = ["seq > :since"], {"since": since_seq}
        for col, value in (("kind", kind), ("subject", subject), ("env", env)):
            if value is not None:
                clauses.append(f"{col} = :{col}")
                params[col] = value
        if kinds is not None:
            wanted = sorted(set(kinds))
            # sqlite's "+kind": scan in seq order and skip the others, rather than search the kind index and sort
            # what it finds (twice the time when most entries are of these kinds, as the inventory's are)
            col = "+kind" if self.store.dialect == "sqlite" else "kind"
            names = [f"k{i}" for i in range(len(wanted))]
            clauses.append(f"{col} IN ({', '.join(':' + n for n in names)})" if wanted else "1 = 0")
            params.update(zip(names, wanted))
        return self._select("WHERE " + " AND ".join(clauses), params)

    def head(self) -> Entry | None:
        with self._reader() as conn:
            if conn is None:
                return None
            try:
                row = conn.one(f"SELECT {_COLS} FROM {TABLE} ORDER BY seq DESC LIMIT 1")
            except sa.exc.DBAPIError as err:
                if _missing_table(err):
                    return None
                raise
        return Entry.from_row(row) if row else None

    def copy_to(self, target: "Ledger") -> int:
        """Copy this ledger into ``target`` (another store) with the same entry numbers, hashes, head signatures
        and witness receipts, so ``target.verify()`` vouches for the same history; returns how many entries were
        copied. Safe to re-run: a target holding exactly the first k entries gets entries k+1.. (0 when it holds
        them all). Refuses (:class:`LedgerCopyRefused`, nothing written) a source that does not verify and a
        target that holds anything else: it never overwrites."""
        v = self.verify()
        if not v.ok:
            raise LedgerCopyRefused(f"the ledger at {self.location} does not verify ({v.reason}): nothing copied")
        with self._reader() as src:
            if src is None:
                return 0
            rows = src.rows(f"SELECT {_COLS} FROM {TABLE} ORDER BY seq")
            sigs = src.rows(f"SELECT seq, key, sig FROM {SIGS} ORDER BY seq")
            receipts = src.rows(f"SELECT seq, cosig FROM {RECEIPTS} ORDER BY seq") if RECEIPTS in src.tables() else []
        with target.store.appending(f"SELECT COUNT(*) FROM {TABLE}") as (conn, _):
            have = conn.rows(f"SELECT seq, hash FROM {TABLE} ORDER BY seq")
            mine = [(r[0], r[8]) for r in rows[:len(have)]]
            if have != mine:
                first = next((a[0] for a, b in zip(have, mine) if a != b), min(len(have), len(rows)) + 1)
                raise LedgerCopyRefused(f"the ledger at {target.location} is not empty and differs from "
                                        f"{self.location} from entry #{first} on: nothing copied (it is never "
                                        f"overwritten)")
            k = len(have)
            signed = conn.scalar(f"SELECT MAX(seq) FROM {SIGS}") or 0
            if signed > k:
                raise LedgerCopyRefused(f"the ledger at {target.location} holds head signatures past its entries "
                                        f"(#{signed} > #{k}): nothing copied")
            conn.insert_rows(TABLE, [dict(zip(COLUMNS, r)) for r in rows[k:]])
            conn.insert_rows(SIGS, [{"seq": q, "key": key, "sig": sig} for q, key, sig in sigs if q > k])
            held = {r[0] for r in conn.rows(f"SELECT seq FROM {RECEIPTS}")}
            conn.insert_rows(RECEIPTS, [{"seq": q, "cosig": c} for q, c in receipts if q not in held])
            conn.commit()
        return len(rows) - k

    def export(self, jsonl_path: Path, csv_path: Path, where: Callable[["Entry"], bool] | None = None) -> int:
        """Write every entry (or those ``where`` keeps) as JSON lines and as CSV (``data`` as a JSON string);
        returns the count."""
        rows = [e for e in self._select() if where is None or where(e)]
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

    def verify(self, full: bool = False) -> Verification:
        """Walk the chain, check the head signature (every signature with ``full``) under the pinned
        key, and compare with what the witness countersigned; name the first bad entry."""
        try:
            if (self.db_path is not None and self.legacy_anchor_path.exists() and self.db_path.exists()
                    and not self._has_signatures()):
                try:
                    self._migrate_now()
                except LedgerTampered as err:
                    return Verification(False, len(self._select()), err.first_bad_seq, err.reason,
                                        findings=(err.reason,))
            with self._snapshot() as (conn, rows, receipt, witness):
                return self._verify_snapshot(conn, rows, receipt, witness, full)
        except LedgerUnavailable as err:
            return Verification(False, 0, None, str(err), findings=(str(err),), unreadable=True)
        except sa.exc.SQLAlchemyError as err:
            reason = f"ledger database {self.location} is unreadable: {store_error_text(err)}"
            return Verification(False, 0, None, reason, findings=(reason,), unreadable=True)

    def _verify_snapshot(self, conn: Conn | None, rows: list[tuple], receipt: int,
                         witness: tuple[int, str] | WitnessError | None, full: bool) -> Verification:

        n = len(rows)
        head_seq = rows[-1][0] if rows else None
        head_hash = rows[-1][8] if rows else None
        hashes = {r[0]: r[8] for r in rows}
        problems: list[tuple[int | None, str]] = []  # (seq, reason)
        notes: list[str] = []

        walk = _walk(rows, first_seq=1, prev_hash=GENESIS_HASH)
        if walk.problem:
            problems.append(walk.problem)

        pins = self._pins(conn) if conn is not None else _Pins(())
        newest = pins.newest()
        pub, key_err = self._public_key()
        own_b64 = _raw_b64(pub) if pub is not None else None
        key_unknown = pub is None and bool(rows) and newest is None
        if key_unknown:
            problems.append((None, key_err or "no platform key"))
        if newest is not None and own_b64 is not None and own_b64 != newest[1]:
            problems.append((None, f"the platform key {self.pub_path} ({own_b64[:16]}...) is not the key "
                                   f"pinned in policy #{newest[0]} ({str(newest[1])[:16]}...): it was replaced"))

        sig_problem, signed_by_pin = (None, False) if key_unknown else self._verify_signatures(
            rows, conn, hashes, pins, own_b64, full)
        if sig_problem:
            problems.append(sig_problem)

        witness_problem, witness_seq, unwitnessed = self._verify_witness(conn, rows, hashes, receipt, witness,
                                                                         newest, notes)
        if witness_problem:
            problems.append(witness_problem)

        base = {"entries": n, "head_seq": head_seq, "head_hash": head_hash, "signed_by_pin": signed_by_pin,
                "witness_seq": witness_seq, "unwitnessed": unwitnessed,
                "pinned_in": newest[0] if newest else None}
        if not problems:
            reason = "intact" if n else "empty ledger"
            return Verification(True, first_bad_seq=None, reason="; ".join([reason, *notes]),
                                findings=tuple(notes), **base)
        # The lowest named entry wins; when the witness names one, its answer names the entry (a
        # re-signed history has valid-looking signatures up to where the key changed) and the reason
        # still mentions the key.
        def key(p: tuple[int | None, str]) -> tuple[int, int]:
            return (0 if p is witness_problem else 1, p[0]) if p[0] is not None else (2, 0)

        named = [p for p in problems if p[0] is not None]
        if witness_problem and walk.problem and walk.problem[0] < witness_problem[0]:
            primary = walk.problem
        elif witness_problem:
            primary = witness_problem
        elif named:
            primary = min(named, key=lambda p: p[0])
        else:
            primary = problems[0]
        ordered = [primary, *sorted((p for p in problems if p is not primary), key=key)]
        texts = [p[1] for p in ordered]
        return Verification(False, first_bad_seq=primary[0], reason="; ".join(texts),
                            findings=tuple(texts + notes), **base)

    def _has_signatures(self) -> bool:
        with self._reader() as conn:
            if conn is None:
                return False
            try:
                return conn.one(f"SELECT 1 FROM {SIGS} LIMIT 1") is not None
            except sa.exc.DBAPIError as err:
                if _missing_table(err):
                    return False
                raise

    @contextmanager
    def _snapshot(self) -> Iterator[tuple[Conn | None, list[tuple], int, tuple[int, str] | WitnessError | None]]:
        """The read transaction (None for a ledger never written), every row, the newest witness
        receipt's seq and the witness's signed head, as of one moment; head signatures are read
        from the same transaction, as needed (one for the head, a few for a binary search).

        The witness is asked under the shared append lock, right after the read transaction took its
        snapshot: no append is between its commit and its submission, so the witness's head and the
        database's agree unless someone else changed one of them."""
        witness: tuple[int, str] | WitnessError | None = None
        with self.store.connect(create=False) as conn:
            reading: Conn | None = conn
            with self.store.shared(conn):
                if conn is not None:
                    conn.begin(write=False)
                    conn.tables_seen = conn.tables()  # the snapshot starts at this first read
                    if TABLE not in conn.tables_seen:
                        conn.rollback()
                        reading = None
                if self.witness_socket is not None:
                    witness = self._ask_witness_head(reading)
            if reading is None:
                yield None, [], 0, witness
                return
            rows = reading.rows(f"SELECT {_COLS} FROM {TABLE} ORDER BY seq")
            receipt = 0
            if RECEIPTS in reading.tables_seen:  # else a ledger from before head signatures
                receipt = reading.scalar(f"SELECT MAX(seq) FROM {RECEIPTS}") or 0
            yield reading, rows, receipt, witness

    def _witness_client(self, wkey: str | None) -> WitnessClient:
        assert self.witness_socket is not None
        return WitnessClient(self.witness_socket, self.witness_timeout, wkey)

    def _ask_witness_head(self, conn: Conn | None) -> tuple[int, str] | WitnessError:
        wkey = None
        if conn is not None:
            pin = self._pins(conn).newest()
            wkey = pin[2] if pin and isinstance(pin[2], str) else None
        try:
            with self._witness_client(wkey) as w:
                seq, hash_, _ = w.head()
                return seq, hash_
        except WitnessError as err:
            return err

    def _verify_signatures(self, rows: list[tuple], conn: Conn | None, hashes: dict[int, str],
                           pins: _Pins, own_b64: str | None, full: bool) -> tuple[tuple[int, str] | None, bool]:
        def q(sql: str, **params: Any) -> list[tuple]:
            if conn is None or SIGS not in conn.tables_seen:  # a ledger from before head signatures, or dropped
                return []
            return conn.rows(sql, **params)

        last_signed = (q(f"SELECT MAX(seq) FROM {SIGS}") or [(None,)])[0][0]
        if not rows:
            if last_signed:
                return (1, f"truncated: the ledger is empty but heads up to #{last_signed} were signed"), False
            return None, False
        head_seq = rows[-1][0]
        truncated = None
        if last_signed and last_signed > head_seq:
            truncated = (head_seq + 1, f"truncated: entries #{head_seq + 1}..#{last_signed} are missing (the "
                                       f"ledger ends at #{head_seq} but heads up to #{last_signed} were signed)")
        if full:
            everything = {s: (k, g) for s, k, g in q(f"SELECT seq, key, sig FROM {SIGS} WHERE seq <= :head", head=head_seq)}
            sig_of: Callable[[int], tuple[str, str] | None] = everything.get
        else:
            def sig_of(seq: int) -> tuple[str, str] | None:
                found = q(f"SELECT key, sig FROM {SIGS} WHERE seq = :seq", seq=seq)
                return found[0] if found else None
        head_sig = sig_of(head_seq)
        if head_sig is None and not truncated:
            below = (q(f"SELECT MAX(seq) FROM {SIGS} WHERE seq < :head", head=head_seq) or [(None,)])[0][0]
            k = (below or 0) + 1
            span = f"entry #{k} is" if k == head_seq else f"entries #{k}..#{head_seq} are"
            hint = (f" (a ledger from before head signatures: its anchor {self.legacy_anchor_path} is gone)"
                    if not last_signed else "")
            return (k, f"entry #{k} carries no platform signature: it was written outside onepath "
                       f"({span} unsigned){hint}"), False

        def signed_seqs() -> list[int]:
            return [r[0] for r in q(f"SELECT seq FROM {SIGS} WHERE seq <= :head ORDER BY seq", head=head_seq)]

        problem = self._signature_problem(signed_seqs, sig_of, hashes.get, head_seq, pins, own_b64, full)
        if truncated:
            return ((problem[0], f"{problem[1]}; {truncated[1]}") if problem else truncated), False
        newest = pins.newest()
        signed_by_pin = problem is None and newest is not None and head_sig is not None and head_sig[0] == newest[1]
        return problem, signed_by_pin

    def _verify_witness(self, conn: Conn | None, rows: list[tuple], hashes: dict[int, str], receipt: int,
                        witness: tuple[int, str] | WitnessError | None, newest: tuple[int, Any, Any] | None,
                        notes: list[str]) -> tuple[tuple[int | None, str] | None, int | None, int]:
        """(problem, witness seq, unwitnessed count); notes get the un-witnessed tail."""
        n = rows[-1][0] if rows else 0
        pinned_wkey = newest[2] if newest and isinstance(newest[2], str) else None

        def since(k: int) -> str:
            found = conn.scalar(f"SELECT ts FROM {TABLE} WHERE seq = :seq", seq=k + 1) if conn else None
            return str(found) if found is not None else "?"

        def tail_note(k: int, why: str) -> int:
            u = n - k
            if u > 0:
                notes.append(f"{u} entr{'y' if u == 1 else 'ies'} after #{k} {'is' if u == 1 else 'are'} not "
                             f"yet countersigned by the witness: {why.format(since=since(k))}")
            return max(u, 0)

        if self.witness_socket is None:
            if pinned_wkey:
                return (None, f"policy #{newest[0]} pins a witness but no witness socket is configured "
                              f"(ONEPATH_WITNESS_SOCKET): the ledger cannot be vouched for"), None, 0
            return None, None, 0
        if isinstance(witness, WitnessError):
            if pinned_wkey:
                return (None, f"{witness}: the witness pinned in policy #{newest[0]} does not answer, so the "
                              f"ledger cannot be vouched for"), None, n - min(receipt, n)
            err = str(witness).replace("{", "{{").replace("}", "}}")
            return None, None, tail_note(min(receipt, n), "unreachable since {since} (" + err + ")")
        assert witness is not None
        wseq, whash = witness
        if wseq == 0:
            return None, 0, tail_note(0, "its log is empty; the next append submits them")
        if wseq <= n and hashes.get(wseq) == whash:
            return None, wseq, tail_note(wseq, "it was unreachable since {since}; the next append submits them")
        # The chains differ somewhere at or before min(wseq, n): find the first seq that differs.
        try:
            with self._witness_client(pinned_wkey) as w:
                hi = min(wseq, n)
                wh_hi = w.hash_at(hi) if hi else None
                if hi and hashes.get(hi) == wh_hi:
                    return (hi + 1, f"truncated: entries #{hi + 1}..#{wseq} are missing: the witness "
                                    f"countersigned up to #{wseq} {whash[:12]}, the ledger ends at #{n}"), wseq, 0
                if not hi:
                    return (1, f"truncated: the ledger is empty but the witness countersigned up to "
                               f"#{wseq} {whash[:12]}"), wseq, 0
                seqs = list(range(1, hi + 1))
                seen: dict[int, str | None] = {hi: wh_hi}

                def wit(s: int) -> str | None:
                    if s not in seen:
                        try:
                            seen[s] = w.hash_at(s)
                        except WitnessError as err:
                            if "holds no entry" not in str(err):
                                raise
                            seen[s] = None  # before the witness's first entry: nothing to compare
                    return seen[s]

                i = _first_failing(seqs, lambda s: wit(s) is None or wit(s) == hashes.get(s))
                j = seqs[i]
                return (j, f"entry #{j} differs from what the witness countersigned (witness: "
                           f"{str(wit(j))[:12]}, ledger: {str(hashes.get(j))[:12]}): history from #{j} "
                           f"was rewritten"), wseq, 0
        except WitnessError as err:
            return (None, f"{err}: the witness stopped answering while the ledger was compared with it"), wseq, 0



@dataclass(frozen=True)
class _Head:
    """What an append reads of the head in one query (``_HEAD_SQL``)."""

    row: tuple | None  # the head entry's columns (COLUMNS), None for an empty ledger
    sig: tuple[str, str] | None  # its (key, sig), None when it carries none
    last_signed: int | None  # the newest signed seq
    receipt: int  # the newest witness receipt's seq (0: none)
    newest_policy: tuple[Any, Any]  # (seq, hash) of the newest policy record: the pins change with it

    @classmethod
    def of(cls, found: tuple | None, conn: Conn) -> "_Head":
        if found is None:  # an empty ledger: no row to carry the rest
            return cls(None, None, conn.scalar(f"SELECT MAX(seq) FROM {SIGS}"), 0, (None, None))
        sig = (found[9], found[10]) if found[9] is not None else None
        return cls(found[:9], sig, found[11], found[12] or 0, (found[13], found[14]))


_HEAD_SQL = (f"SELECT {', '.join('e.' + c for c in COLUMNS)}, s.key, s.sig, (SELECT MAX(seq) FROM {SIGS}), "
             f"(SELECT MAX(seq) FROM {RECEIPTS}), (SELECT MAX(seq) FROM {TABLE} WHERE kind = '{POLICY_KIND}'), "
             f"(SELECT hash FROM {TABLE} WHERE kind = '{POLICY_KIND}' ORDER BY seq DESC LIMIT 1) "
             f"FROM {TABLE} e LEFT JOIN {SIGS} s ON s.seq = e.seq ORDER BY e.seq DESC LIMIT 1")
_PINS_SEEN: dict[tuple, _Pins] = {}  # by (store, newest policy record): see Ledger._pins_for


@dataclass
class _Walk:
    problem: tuple[int, str] | None = None


def _walk(rows: list[tuple], first_seq: int, prev_hash: str | None) -> _Walk:
    """Check seq continuity, every entry's hash and every link; remember the first problem.

    ``prev_hash=None`` trusts the first row's own link. The fast way builds each canonical payload
    around the stored data text (written canonical by ``append``), each other field encoded exactly as
    ``json.dumps`` does; only when that does not give the stored hash is the row hashed the long way
    (``entry_hash`` over the parsed data), so what passes is the documented hash either way."""
    out = _Walk()
    expected = first_seq
    sha256 = hashlib.sha256
    esc = encode_basestring_ascii  # json.dumps' own (C) string encoder, ensure_ascii=True
    memo: dict[Any, str] = {None: "null"}
    for seq, ts, kind, subject, env, actor, data_text, prev, hash_ in rows:
        if seq != expected:
            if isinstance(seq, int) and seq > expected:
                missing = f"#{expected}" if seq == expected + 1 else f"#{expected}..#{seq - 1}"
                out.problem = (expected, (f"entry {missing} is missing (the seq jumps from "
                                          f"#{expected - 1} to #{seq})"))
            else:
                out.problem = (expected, f"unexpected entry #{seq} (expected #{expected})")
            return out
        expected += 1
        try:
            a, k, s, e = memo.get(actor), memo.get(kind), memo.get(subject), memo.get(env)
            if a is None:
                a = memo[actor] = esc(actor)
            if k is None:
                k = memo[kind] = esc(kind)
            if s is None:
                s = memo[subject] = esc(subject)
            if e is None:
                e = memo[env] = esc(env)
            if len(memo) > 4096:
                memo = {None: "null"}
            fast = sha256((f'{{"actor":{a},"data":{data_text},"env":{e},"kind":{k},"prev_hash":{esc(prev)},'
                           f'"seq":{seq},"subject":{s},"ts":{esc(ts)}}}').encode()).hexdigest()
        except (TypeError, ValueError, UnicodeError):  # a value JSON cannot hold (a planted BLOB): the long way
            fast = None
        if fast != hash_:
            try:
                data = json.loads(data_text)
            except (TypeError, ValueError):
                out.problem = (seq, f"entry #{seq} was altered: its data is not valid JSON")
                return out
            try:
                exact = entry_hash(seq, ts, kind, subject, env, actor, data, prev)
            except (TypeError, ValueError):
                exact = None
            if exact != hash_:
                out.problem = (seq, f"entry #{seq} was altered: its content does not match its hash")
                return out
        if prev_hash is not None and prev != prev_hash:
            out.problem = (seq, (f"entry #{seq} does not link to entry #{seq - 1} (prev_hash "
                                 f"{str(prev)[:12]} != {str(prev_hash)[:12]}): an earlier entry was altered "
                                 f"and re-hashed, removed or moved"))
            return out
        prev_hash = hash_
    return out


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def __getattr__(name: str) -> Any:
    # the Dagster resource lives in resources.ledger_resource: reading the ledger (onepath inventory, audit,
    # witness) must not pay Dagster's import; ``from resources.ledger import LedgerResource`` still works
    if name == "LedgerResource":
        from resources.ledger_resource import LedgerResource

        return LedgerResource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
