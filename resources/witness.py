"""A witness for the platform ledger: a small service, run as ITS OWN OS user, that keeps its own log.

Why: the platform's user can rewrite the ledger database, re-hash it, replace the key pair under
``$ONEPATH_HOME/keys`` and re-sign everything: nothing the platform's user can write proves what
the history was. A witness (as Certificate Transparency witnesses do) keeps a second copy of the
chain's skeleton, ``(seq, prev_hash, hash)`` per entry, in a database only its own user can write,
and countersigns what it accepted with its own key. In production the same role is played by an
object-locked S3 bucket or the company's transparency log.

What it accepts (``submit``): a batch of rows that

* continues its log: the first row's seq is its last seq + 1 and its ``prev_hash`` its last hash
  (rows it already holds may be repeated, with the same hash; on an empty log any start is accepted:
  trust on first use), and whose rows link to each other (it cannot recompute entry hashes, it checks
  the links it is given);
* ends in a head signed by the platform key it was initialised with (``head_sig``, Ed25519 over
  ``f"{seq}:{hash}"``, the ledger's own head signature).

Anything else is refused and recorded in its ``refusals`` table (a fork: a seq it holds with another
hash, or a batch that does not continue its log). Every answer the ledger relies on is signed with the
witness key: ``witness:{seq}:{hash}`` (the countersignature), and for ``head`` also the caller's nonce
(``witness-head:{nonce}:{seq}:{hash}``) so an old answer cannot be replayed as the current one.

Protocol: a unix socket; one JSON object per line in, one per line out. Ops: ``public_key``,
``head`` {nonce}, ``hash_at`` {seq}, ``submit`` {rows, head_sig}. Answers carry ``ok``; a refusal is
``{"ok": false, "error": "..."}``.

The socket is mode 0666 inside a folder the witness user owns and only it can write: anyone local may
*ask*, because nothing it answers is secret (hashes) and nothing it accepts is unauthenticated (every
batch must end in a head signed by the platform key); nobody but the witness user can replace the
socket or touch the log. (0660 plus a group would also keep other local users from filling the
refusals table; the platform's user would then have to be in that group, one more thing to set up.)

Standard library and ``cryptography`` only: the service must not import Dagster.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import socketserver
import sqlite3
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE = "witness.key"
DB_FILE = "witness.db"
MAX_REQUEST_BYTES = 256 * 1024 * 1024  # a first submission of a big ledger is one line
EMPTY_HASH = "0" * 64


class WitnessError(RuntimeError):
    """The witness could not be reached, refused a request, or answered something that does not verify."""


def witness_message(seq: int, hash_: str) -> bytes:
    return f"witness:{seq}:{hash_}".encode()


def head_message(nonce: str, seq: int, hash_: str) -> bytes:
    return f"witness-head:{nonce}:{seq}:{hash_}".encode()


def head_sig_message(seq: int, hash_: str) -> bytes:
    """What the platform signs over its head (the ledger's ``anchor_message``)."""
    return f"{seq}:{hash_}".encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def public_key_from_b64(text: str, what: str = "key") -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as err:
        raise WitnessError(f"{what} {text!r} is not a base64 raw 32-byte Ed25519 public key ({err})") from None


def raw_public_b64(key: Ed25519PublicKey) -> str:
    return b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def verifies(pub: Ed25519PublicKey, sig_b64: str, message: bytes) -> bool:
    try:
        pub.verify(base64.b64decode(sig_b64, validate=True), message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# -- the witness's own store ---------------------------------------------------------------------


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS config (name TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL, received_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS refusals (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL,
        first_seq INTEGER, reason TEXT NOT NULL)""",
    """CREATE TRIGGER IF NOT EXISTS log_no_update BEFORE UPDATE ON log
        BEGIN SELECT RAISE(ABORT, 'the witness log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS log_no_delete BEFORE DELETE ON log
        BEGIN SELECT RAISE(ABORT, 'the witness log is append-only'); END""",
)


def init_witness(directory: Path, platform_key_b64: str) -> str:
    """Create the witness's folder (0700), key (0600) and log; returns its public key (b64 raw)."""
    platform = public_key_from_b64(platform_key_b64, "--platform-key")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    key_path, db_path = directory / KEY_FILE, directory / DB_FILE
    if key_path.exists() or db_path.exists():
        raise WitnessError(f"{directory} already holds a witness ({KEY_FILE} or {DB_FILE} exists): "
                           f"a witness is initialised once")
    key = Ed25519PrivateKey.generate()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    conn = _open_db(db_path)
    try:
        with conn:
            conn.execute("INSERT INTO config VALUES ('platform_key', ?)", (raw_public_b64(platform),))
            conn.execute("INSERT INTO config VALUES ('created_at', ?)", (_now(),))
    finally:
        conn.close()
    return raw_public_b64(key.public_key())


def _open_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # a countersigned row survives a power cut
    with conn:
        for stmt in _SCHEMA:
            conn.execute(stmt)
    return conn


class Witness:
    """The witness's logic over its folder (the server calls :meth:`handle` for every request line)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        key_path = self.dir / KEY_FILE
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError:
            raise WitnessError(f"{key_path} is missing: run `onepath witness init --dir {self.dir} "
                               f"--platform-key B64` first") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise WitnessError(f"{key_path} is not an Ed25519 private key")
        self.key = key
        self.conn = _open_db(self.dir / DB_FILE)
        row = self.conn.execute("SELECT value FROM config WHERE name = 'platform_key'").fetchone()
        if row is None:
            raise WitnessError(f"{self.dir / DB_FILE} names no platform key: it was not made by `witness init`")
        self.platform_key_b64 = row[0]
        self.platform_key = public_key_from_b64(row[0], "platform key")
        self.lock = threading.Lock()

    def sign(self, message: bytes) -> str:
        return b64(self.key.sign(message))

    def _last(self) -> tuple[int, str]:
        row = self.conn.execute("SELECT seq, hash FROM log ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, EMPTY_HASH)

    def _refuse(self, first_seq: int | None, reason: str) -> dict[str, Any]:
        with self.conn:
            self.conn.execute("INSERT INTO refusals (at, first_seq, reason) VALUES (?,?,?)",
                              (_now(), first_seq, reason[:2000]))
        last_seq, last_hash = self._last()
        return {"ok": False, "error": reason, "head_seq": last_seq, "head_hash": last_hash}

    def handle(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            return {"ok": False, "error": "a request is a JSON object with an 'op'"}
        op = req["op"]
        with self.lock:
            if op == "public_key":
                return {"ok": True, "key": raw_public_b64(self.key.public_key()),
                        "platform_key": self.platform_key_b64}
            if op == "head":
                nonce = req.get("nonce")
                if nonce is not None and (not isinstance(nonce, str) or not 8 <= len(nonce) <= 128):
                    return {"ok": False, "error": "head's 'nonce' must be a string of 8..128 characters"}
                seq, hash_ = self._last()
                answer = {"ok": True, "seq": seq, "hash": hash_, "sig": self.sign(witness_message(seq, hash_))}
                if nonce is not None:
                    answer["nonce_sig"] = self.sign(head_message(nonce, seq, hash_))
                return answer
            if op == "hash_at":
                seq = req.get("seq")
                if not isinstance(seq, int) or isinstance(seq, bool):
                    return {"ok": False, "error": "hash_at needs an integer 'seq'"}
                row = self.conn.execute("SELECT hash FROM log WHERE seq = ?", (seq,)).fetchone()
                if row is None:
                    return {"ok": False, "error": f"the witness holds no entry #{seq}"}
                return {"ok": True, "seq": seq, "hash": row[0], "sig": self.sign(witness_message(seq, row[0]))}
            if op == "submit":
                return self._submit(req.get("rows"), req.get("head_sig"))
            return {"ok": False, "error": f"unknown op {op!r} (public_key, head, hash_at, submit)"}

    def _submit(self, rows: Any, head_sig: Any) -> dict[str, Any]:
        if (not isinstance(rows, list) or not rows or not isinstance(head_sig, str)
                or not all(isinstance(r, list) and len(r) == 3 and isinstance(r[0], int)
                           and isinstance(r[1], str) and isinstance(r[2], str) for r in rows)):
            return {"ok": False, "error": "submit needs 'rows' [[seq, prev_hash, hash], ...] and 'head_sig'"}
        for a, b in zip(rows, rows[1:]):
            if b[0] != a[0] + 1 or b[1] != a[2]:
                return self._refuse(b[0], f"the submitted rows do not chain at #{b[0]} "
                                          f"(seq after #{a[0]}, prev_hash {b[1][:12]} != {a[2][:12]})")
        head_seq, head_hash = rows[-1][0], rows[-1][2]
        if not verifies(self.platform_key, head_sig, head_sig_message(head_seq, head_hash)):
            return self._refuse(head_seq, f"the head #{head_seq} is not signed by the platform key "
                                          f"{self.platform_key_b64} this witness was initialised with")
        last_seq, last_hash = self._last()
        # rows it already holds must be the same rows (else a fork: history was rewritten)
        held = [r for r in rows if r[0] <= last_seq]
        if held:
            have = dict(self.conn.execute("SELECT seq, hash FROM log WHERE seq BETWEEN ? AND ?",
                                          (held[0][0], held[-1][0])).fetchall())
            for seq, _prev, hash_ in held:
                if seq in have and have[seq] != hash_:  # (rows before its first one are not compared)
                    return self._refuse(seq, f"fork at #{seq}: the witness holds hash {have[seq][:12]}, "
                                             f"the submission says {hash_[:12]}")
        new = [r for r in rows if r[0] > last_seq]
        if new:
            first = new[0]
            if last_seq and (first[0] != last_seq + 1 or first[1] != last_hash):
                return self._refuse(first[0], f"the submission does not continue the witness's log "
                                              f"(it ends at #{last_seq} {last_hash[:12]}; the batch starts at "
                                              f"#{first[0]} linking to {first[1][:12]})")
            at = _now()
            with self.conn:
                self.conn.executemany("INSERT INTO log (seq, prev_hash, hash, received_at) VALUES (?,?,?,?)",
                                      [(s, p, h, at) for s, p, h in new])
        return {"ok": True, "seq": head_seq, "hash": head_hash,
                "sig": self.sign(witness_message(head_seq, head_hash))}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        witness: Witness = self.server.witness  # type: ignore[attr-defined]
        while True:
            line = self.rfile.readline(MAX_REQUEST_BYTES)
            if not line:
                return
            try:
                req = json.loads(line)
            except ValueError:
                answer: dict[str, Any] = {"ok": False, "error": "a request is one JSON object per line"}
            else:
                try:
                    answer = witness.handle(req)
                except sqlite3.Error as err:
                    answer = {"ok": False, "error": f"witness store error: {err}"}
            self.wfile.write((json.dumps(answer) + "\n").encode())
            self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def check_socket_dir(socket_path: Path) -> None:
    """The socket's folder must be the witness user's own, writable by nobody else (so nobody else can
    replace the socket with one of their own)."""
    parent = Path(socket_path).parent
    st = parent.stat()
    if st.st_uid != os.getuid():
        raise WitnessError(f"socket folder {parent} is owned by uid {st.st_uid}, not by the witness's "
                           f"user (uid {os.getuid()}): someone else could replace the socket")
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise WitnessError(f"socket folder {parent} is writable by group or others "
                           f"(mode {stat.S_IMODE(st.st_mode):o}): someone else could replace the socket")


def make_server(directory: Path, socket_path: Path) -> _Server:
    witness = Witness(directory)
    socket_path = Path(socket_path)
    check_socket_dir(socket_path)
    if socket_path.exists() or socket_path.is_symlink():
        if not stat.S_ISSOCK(socket_path.lstat().st_mode):
            raise WitnessError(f"{socket_path} exists and is not a socket")
        socket_path.unlink()
    server = _Server(str(socket_path), _Handler)
    os.chmod(socket_path, 0o666)  # see the module docstring
    server.witness = witness  # type: ignore[attr-defined]
    return server


def serve(directory: Path, socket_path: Path, ready: Any = None) -> None:
    server = make_server(directory, socket_path)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        Path(socket_path).unlink(missing_ok=True)


# -- the client the ledger uses ------------------------------------------------------------------


class WitnessClient:
    """One connection to a witness; every answer is checked against ``witness_key`` when given."""

    def __init__(self, socket_path: Path, timeout: float = 5.0, witness_key: str | None = None):
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.file: Any = None
        self.witness_key_b64 = witness_key
        self._pub: Ed25519PublicKey | None = public_key_from_b64(witness_key, "witness key") if witness_key else None

    def __enter__(self) -> WitnessClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.file = None

    def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            if self.sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(self.timeout)
                try:
                    s.connect(str(self.socket_path))
                except OSError:
                    s.close()
                    raise
                self.sock, self.file = s, s.makefile("rwb")
            self.file.write((json.dumps(req) + "\n").encode())
            self.file.flush()
            line = self.file.readline(64 * 1024 * 1024)
        except OSError as err:
            self.close()
            raise WitnessError(f"the witness at {self.socket_path} cannot be reached: {err}") from None
        if not line:
            self.close()
            raise WitnessError(f"the witness at {self.socket_path} closed the connection")
        try:
            answer = json.loads(line)
        except ValueError:
            raise WitnessError(f"the witness at {self.socket_path} answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise WitnessError(f"the witness at {self.socket_path} answered something that is not an object")
        return answer

    def public_key(self) -> str:
        answer = self._call({"op": "public_key"})
        key = answer.get("key")
        if not answer.get("ok") or not isinstance(key, str):
            raise WitnessError(f"the witness at {self.socket_path} did not name its key: {answer.get('error')}")
        public_key_from_b64(key, "the witness's key")
        return key

    def pub(self) -> Ed25519PublicKey:
        """The key answers are checked with: the pinned one, else what the witness says (trust on first use)."""
        if self._pub is None:
            self.witness_key_b64 = self.public_key()
            self._pub = public_key_from_b64(self.witness_key_b64, "witness key")
        return self._pub

    def _signed(self, answer: dict[str, Any], what: str) -> tuple[int, str, str]:
        seq, hash_, sig = answer.get("seq"), answer.get("hash"), answer.get("sig")
        if not isinstance(seq, int) or not isinstance(hash_, str) or not isinstance(sig, str):
            raise WitnessError(f"the witness's answer to {what} is malformed")
        if not verifies(self.pub(), sig, witness_message(seq, hash_)):
            raise WitnessError(f"the witness's answer to {what} is not signed by the witness key "
                               f"{self.witness_key_b64}")
        return seq, hash_, sig

    def head(self) -> tuple[int, str, str]:
        """``(seq, hash, countersignature)`` of the witness's newest entry (seq 0 when its log is empty)."""
        nonce = b64(os.urandom(18))
        answer = self._call({"op": "head", "nonce": nonce})
        if not answer.get("ok"):
            raise WitnessError(f"the witness refused head: {answer.get('error')}")
        seq, hash_, sig = self._signed(answer, "head")
        if not verifies(self.pub(), str(answer.get("nonce_sig")), head_message(nonce, seq, hash_)):
            raise WitnessError("the witness's head answer does not cover this request's nonce (a replayed answer?)")
        return seq, hash_, sig

    def hash_at(self, seq: int) -> str:
        answer = self._call({"op": "hash_at", "seq": seq})
        if not answer.get("ok"):
            raise WitnessError(f"the witness refused hash_at #{seq}: {answer.get('error')}")
        got, hash_, _ = self._signed(answer, f"hash_at #{seq}")
        if got != seq:
            raise WitnessError(f"the witness answered #{got} to hash_at #{seq}")
        return hash_

    def submit(self, rows: list[list[Any]], head_sig: str) -> tuple[bool, dict[str, Any]]:
        """``(accepted, answer)``; an accepted answer's countersignature is checked."""
        answer = self._call({"op": "submit", "rows": rows, "head_sig": head_sig})
        if not answer.get("ok"):
            return False, answer
        seq, hash_, _ = self._signed(answer, "submit")
        if (seq, hash_) != (rows[-1][0], rows[-1][2]):
            raise WitnessError(f"the witness countersigned #{seq}, not the submitted head #{rows[-1][0]}")
        return True, answer
