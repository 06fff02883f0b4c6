"""The ledger's witness, driven as the attackers would.

Who plays whom (we run as root, so a different OS user is made with ``useradd --system`` + setpriv):

* the **witness** runs as its own system user ``onepath-witness-test`` (``onepath witness init`` and
  ``onepath witness serve`` under setpriv), its folder, key and log owned by that user, mode 0700;
* the **platform's user** (tier b: it can write the ledger database and ``$ONEPATH_HOME/keys``) is
  this test process: it rewrites rows with sqlite, re-hashes them, replaces the key pair and re-signs;
* where the point is that the platform's user can NOT write something (the witness's log, its
  socket), the platform's user is played by ``nobody`` through setpriv, because root passes every
  permission check and so cannot show a permission boundary.
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from resources.ledger import Ledger, LedgerTampered
from resources.witness import WitnessClient
from tests.stores import LedgerBackend, ledger_env
from tests.test_ledger import fill, pin_policy, rehash_from, rows, select, sigs_of, tamper

ROOT = Path(__file__).resolve().parents[1]
WITNESS_USER = "onepath-witness-test"
SETPRIV = shutil.which("setpriv")
N = 10


def as_user(user: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    pw = pwd.getpwnam(user)
    group = "nogroup" if user == "nobody" else str(pw.pw_gid)
    return subprocess.run([SETPRIV, f"--reuid={pw.pw_uid}", f"--regid={group}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def witness_user() -> pwd.struct_passwd:
    assert SETPRIV and os.getuid() == 0, "running the witness as its own user needs root and setpriv, as on CI"
    try:
        return pwd.getpwnam(WITNESS_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", WITNESS_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(WITNESS_USER)


@pytest.fixture(scope="module", autouse=True)
def venv_readable_by_the_witness(witness_user) -> None:
    """The witness user runs this very interpreter and venv; if it cannot read them, Python falls back
    to the system's interpreter and its packages, and the witness would be another program."""
    seen = as_user(WITNESS_USER, sys.executable, "-c", "import sys; print(sys.prefix)")
    assert seen.stdout.strip() == sys.prefix, (
        f"the witness user sees prefix {seen.stdout.strip()!r}, not the venv {sys.prefix!r}: "
        f"the venv must be readable by other users (./dev installs it with umask 022)")


class WitnessProcess:
    """``onepath witness serve`` as the witness's own user; :meth:`stop` / :meth:`start` for outages."""

    def __init__(self, user: pwd.struct_passwd, base: Path, platform_key: str):
        self.user, self.base = user, base
        self.home = base / "w"  # the witness user's folder: it alone writes here; others may enter
        self.home.mkdir()
        os.chown(self.home, user.pw_uid, user.pw_gid)
        self.home.chmod(0o755)
        self.dir, self.socket = self.home / "data", self.home / "witness.sock"
        self.env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(self.home),
                    "PYTHONDONTWRITEBYTECODE": "1"}
        done = self.cli("init", "--dir", str(self.dir), "--platform-key", platform_key)
        assert done.returncode == 0, done.stderr
        self.key = done.stdout.strip()
        self.proc: subprocess.Popen | None = None
        self.start()

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        return as_user(WITNESS_USER, sys.executable, "-m", "platform_defs.cli", "witness", *argv,
                       cwd=str(ROOT), env=self.env)

    def start(self) -> None:
        pw = self.user
        self.proc = subprocess.Popen(
            [SETPRIV, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", sys.executable, "-m",
             "platform_defs.cli", "witness", "serve", "--dir", str(self.dir), "--socket", str(self.socket)],
            cwd=str(ROOT), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("witness serving"), (line, self.proc.stderr.read() if self.proc.poll() is not None else "")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def refusals(self) -> list[tuple]:
        conn = sqlite3.connect(f"file:{self.dir / 'witness.db'}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT first_seq, reason FROM refusals ORDER BY id").fetchall()
        finally:
            conn.close()


def public_folder() -> Path:
    """A new folder every user can enter (the witness's folder lives in it; a test's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="onepath-witness-", dir="/tmp"))
    base.chmod(0o755)
    return base


@pytest.fixture
def public_base() -> Iterator[Path]:
    base = public_folder()
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def world(backend: LedgerBackend, public_base: Path, witness_user) -> Iterator[tuple[Ledger, WitnessProcess]]:
    """A ledger (on sqlite, then on PostgreSQL) and its witness."""
    book = backend.ledger("home")
    platform_key = book.platform_public_key_b64()
    witness = WitnessProcess(witness_user, public_base, platform_key)
    try:
        yield Ledger(book.store.url, book.key_path, witness_socket=witness.socket), witness
    finally:
        witness.stop()


def swap_key_and_resign(ledger: Ledger, j: int) -> None:
    """Tier (b) at its strongest: a new key pair in keys/, entry j rewritten, every later entry re-hashed,
    every head re-signed with the new key."""
    mallory = Ed25519PrivateKey.generate()
    ledger.key_path.write_bytes(mallory.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    ledger.pub_path.write_bytes(mallory.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    tamper(ledger, ("UPDATE ledger_entries SET actor = 'mallory', data = '{\"version\":\"forged\"}' WHERE seq = ?", (j,)))
    rehash_from(ledger, j)
    raw = base64.b64encode(mallory.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)).decode()
    tamper(ledger, "DELETE FROM head_signatures", *[
        ("INSERT INTO head_signatures VALUES (?,?,?)",
         (seq, raw, base64.b64encode(mallory.sign(f"{seq}:{h}".encode())).decode())) for seq, *_, h in rows(ledger)])


def test_every_append_is_countersigned(world) -> None:
    ledger, witness = world
    written = fill(ledger, N)
    v = ledger.verify()
    assert (v.ok, v.witness_seq, v.unwitnessed, v.reason) == (True, N, 0, "intact"), v
    assert ledger.witness_public_key_b64() == witness.key
    with WitnessClient(witness.socket, witness_key=witness.key) as w:
        assert w.head()[:2] == (N, written[-1].hash)
        assert w.hash_at(3) == written[2].hash
    assert select(ledger, "SELECT MAX(seq) FROM witness_receipts") == [(N,)]


@pytest.mark.parametrize("j", [1, 4])
def test_a_key_swap_and_re_sign_is_named_by_the_witness(world, j: int) -> None:
    """Without a pinned key the re-signed ledger verifies under the new key: only the witness can tell."""
    ledger, witness = world
    fill(ledger, N)
    swap_key_and_resign(ledger, j)
    fresh = Ledger(ledger.store.url, ledger.key_path, witness_socket=witness.socket)
    v = fresh.verify()
    assert not v.ok and v.first_bad_seq == j, v
    assert f"entry #{j} differs from what the witness countersigned" in v.reason, v
    assert f"history from #{j} was rewritten" in v.reason
    # the attacker's next append is recorded, but the witness refuses it (not the platform key it knows)
    fresh.append("deploy", "credit_scoring", {}, actor="mallory")
    assert any("not signed by the platform key" in r for _, r in witness.refusals())
    v = fresh.verify()
    assert not v.ok and v.first_bad_seq == j, v


def test_with_the_key_pinned_the_witness_names_the_entry_and_the_reason_names_the_key(world) -> None:
    ledger, witness = world
    fill(ledger, N)
    p = pin_policy(ledger, ledger.platform_public_key_b64(), witness.key)
    ledger.append("deploy", "credit_scoring", {}, actor="ci")
    v = ledger.verify()
    assert (v.ok, v.signed_by_pin, v.witness_seq) == (True, True, N + 2), v
    swap_key_and_resign(ledger, 6)
    fresh = Ledger(ledger.store.url, ledger.key_path, witness_socket=witness.socket)
    v = fresh.verify()
    assert not v.ok and v.first_bad_seq == 6, v
    assert "entry #6 differs from what the witness countersigned" in v.reason
    assert f"not the key pinned in policy #{p.seq}" in v.reason and not v.signed_by_pin
    with pytest.raises(LedgerTampered, match="not the key pinned"):
        fresh.append("deploy", "credit_scoring", {}, actor="mallory")
    assert len(rows(ledger)) == N + 2


def test_truncation_is_named_by_the_witness(world) -> None:
    """The last rows deleted with the triggers dropped, their signatures too: the witness still has them."""
    ledger, witness = world
    fill(ledger, N)
    tamper(ledger, ("DELETE FROM ledger_entries WHERE seq > ?", (N - 3,)),
           ("DELETE FROM head_signatures WHERE seq > ?", (N - 3,)))
    v = ledger.verify()
    assert not v.ok and v.first_bad_seq == N - 2, v
    assert "truncated" in v.reason and f"countersigned up to #{N}" in v.reason
    if ledger.db_path is not None:
        for suffix in ("", "-wal", "-shm"):  # the whole database, gone
            Path(str(ledger.db_path) + suffix).unlink(missing_ok=True)
    else:
        tamper(ledger, "DROP TABLE ledger_entries, head_signatures, witness_receipts, promotion_leases")
    v = ledger.verify()
    assert not v.ok and v.first_bad_seq == 1 and v.entries == 0 and "truncated" in v.reason, v


def test_the_witness_down_during_appends_then_back(world) -> None:
    ledger, witness = world
    fill(ledger, 3)
    witness.stop()
    fill(ledger, 3)  # deploys are still recorded
    assert len(rows(ledger)) == 6 and len(sigs_of(ledger)) == 6
    v = ledger.verify()
    assert v.ok and v.unwitnessed == 3 and v.witness_seq is None, v
    assert "3 entries after #3 are not yet countersigned by the witness" in v.reason and "unreachable" in v.reason
    witness.start()
    v = ledger.verify()
    assert v.ok and (v.witness_seq, v.unwitnessed) == (3, 3), v  # reachable again, nothing submitted yet
    ledger.append("deploy", "credit_scoring", {}, actor="ci")  # catches up: submits #4..#7
    v = ledger.verify()
    assert (v.ok, v.witness_seq, v.unwitnessed, v.reason) == (True, 7, 0, "intact"), v


def test_a_receipt_the_store_refuses_leaves_no_append_lock_behind(world) -> None:
    """The receipt goes in with the lock's release (one round trip on PostgreSQL): when the store refuses the
    receipt, the append stands and the lock is given up all the same, so another process appends at once."""
    ledger, _ = world
    fill(ledger, 1)
    refuse = ("CREATE TRIGGER onepath_test_refuse BEFORE INSERT ON witness_receipts "
              "BEGIN SELECT RAISE(ABORT, 'refused'); END" if ledger.store.dialect == "sqlite" else
              "ALTER TABLE witness_receipts ADD CONSTRAINT onepath_test_refuse CHECK (seq < 0) NOT VALID")
    tamper(ledger, refuse)
    ledger.append("deploy", "credit_scoring", {}, actor="ci")  # written; its receipt refused
    assert len(rows(ledger)) == 2 and len(select(ledger, "SELECT seq FROM witness_receipts")) == 1
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; from resources.ledger import Ledger; "
                               "print(Ledger(sys.argv[1], Path(sys.argv[2])).append('deploy', 'x', {}, actor='b').seq)",
         ledger.store.url if ledger.store.dialect == "postgresql" else str(ledger.db_path), str(ledger.key_path)],
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": os.environ["HOME"]},
        capture_output=True, text=True, timeout=60)
    assert (other.returncode, other.stdout.strip()) == (0, "3"), other.stderr[-2000:]


def test_a_pinned_witness_that_does_not_answer_fails_closed(world) -> None:
    ledger, witness = world
    fill(ledger, 2)
    pin_policy(ledger, ledger.platform_public_key_b64(), witness.key)
    assert ledger.verify().ok
    witness.stop()
    v = ledger.verify()
    assert not v.ok and v.first_bad_seq is None and "cannot be vouched for" in v.reason, v
    unset = Ledger(ledger.store.url, ledger.key_path)  # no socket configured although the policy pins one
    v = unset.verify()
    assert not v.ok and "cannot be vouched for" in v.reason and "ONEPATH_WITNESS_SOCKET" in v.reason, v


def test_the_witness_refuses_a_fork_and_the_platform_user_cannot_write_its_log(world) -> None:
    ledger, witness = world
    written = fill(ledger, 4)
    key = serialization.load_pem_private_key(ledger.key_path.read_bytes(), password=None)

    def signed(seq: int, h: str) -> str:
        return base64.b64encode(key.sign(f"{seq}:{h}".encode())).decode()

    with WitnessClient(witness.socket, witness_key=witness.key) as w:
        # a rewritten #3 (validly signed by the platform key: the insider holds it) is a fork
        forged = "f" * 64
        ok, answer = w.submit([[3, written[1].hash, forged]], signed(3, forged))
        assert not ok and "fork at #3" in answer["error"]
        # a batch that does not continue the log
        ok, answer = w.submit([[6, "e" * 64, "d" * 64]], signed(6, "d" * 64))
        assert not ok and "does not continue" in answer["error"]
        # rows that do not chain, and a head not signed by the platform key
        ok, answer = w.submit([[5, written[3].hash, "a" * 64], [6, "b" * 64, "c" * 64]], signed(6, "c" * 64))
        assert not ok and "do not chain" in answer["error"]
        mallory = Ed25519PrivateKey.generate()
        ok, answer = w.submit([[5, written[3].hash, "a" * 64]],
                              base64.b64encode(mallory.sign(f"5:{'a' * 64}".encode())).decode())
        assert not ok and "not signed by the platform key" in answer["error"]
        assert w.head()[:2] == (4, written[-1].hash)
    assert [r[0] for r in witness.refusals()] == [3, 6, 6, 5]

    # the platform's user (nobody here, see the module docstring) cannot touch the witness's log
    db = witness.dir / "witness.db"
    write = as_user("nobody", sys.executable, "-c",
                    f"import sqlite3; c = sqlite3.connect({str(db)!r}); "
                    f"c.execute(\"INSERT INTO log VALUES (5, 'x', 'y', 'z')\"); c.commit()")
    assert write.returncode != 0 and "unable to open" in write.stderr, write
    for cmd in (f"echo forged >> {db}", f"rm -f {db}", f"rm -f {witness.socket}",
                f"cat {witness.dir / 'witness.key'}"):
        done = as_user("nobody", "sh", "-c", cmd)
        assert done.returncode != 0 and "Permission denied" in done.stderr, (cmd, done)
    assert witness.socket.exists() and ledger.verify().ok


def test_cli_verify_names_the_witness_state(world, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_ledger import run_cli

    ledger, witness = world
    for var, value in ledger_env(ledger).items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("ONEPATH_WITNESS_SOCKET", str(witness.socket))
    fill(ledger, 3)
    assert run_cli(["audit", "verify"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"witness at {witness.socket}: countersigned up to #3" in out
    assert out[-1].startswith("policy: none recorded yet")  # the policy chain is reported after the ledger
    swap_key_and_resign(ledger, 2)
    assert run_cli(["audit", "verify", "--full"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("ledger TAMPERED at entry #2: entry #2 differs from what the witness countersigned")
    assert "Traceback" not in "\n".join(err)


def test_witness_cli_refuses_bad_input_in_one_line(public_base: Path, witness_user) -> None:
    proc = WitnessProcess.__new__(WitnessProcess)
    proc.env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": str(public_base),
                "PYTHONDONTWRITEBYTECODE": "1"}
    done = proc.cli("init", "--dir", str(public_base / "x"), "--platform-key", "not-a-key")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done
    assert "--platform-key" in done.stderr and "Traceback" not in done.stderr
    done = proc.cli("serve", "--dir", str(public_base / "nowhere"), "--socket", str(public_base / "s.sock"))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_the_recorded_policy_pins_the_witness_and_a_shell_without_it_cannot_unpin_it(world, tmp_path) -> None:
    """``policy init`` with the witness configured pins its key; from then on the ledger checks the witness's
    answers with the pinned key, and a ``policy apply`` from a shell without ONEPATH_WITNESS_SOCKET would
    record no witness: refused unless said (--change-witness)."""
    from platform_defs.policy_record import PolicyRecordError, policy_in_force, record_policy
    from resources.approvals import load_private_key
    from tests.conftest import DEMO_ADMIN_KEY

    ledger, witness = world
    path = tmp_path / "policy.yaml"
    path.write_text((ROOT / "assets" / "policy.yaml").read_text())
    record_policy(ledger, path, signer="pat", key=load_private_key(DEMO_ADMIN_KEY), initial=True)
    assert policy_in_force(ledger).witness_key == witness.key
    assert ledger.pinned_witness_key() == witness.key
    fill(ledger, 3)
    assert ledger.verify().ok
    no_witness = Ledger(ledger.store.url, ledger.key_path)
    path.write_text(path.read_text().replace("seconds: 60\n", "seconds: 90\n", 1))
    with pytest.raises(PolicyRecordError, match="the configured witness \\(none\\) is not the one pinned in ledger #1"):
        record_policy(no_witness, path, signer="pat", key=load_private_key(DEMO_ADMIN_KEY), initial=False)
    v = no_witness.verify()  # the witness is pinned: a verify that cannot ask it vouches for nothing
    assert not v.ok and "cannot be vouched for" in v.reason, v


def test_policy_apply_change_witness_pins_the_witness_and_unpins_it_from_the_command_line(world, tmp_path) -> None:
    """README, "A witness countersigns every head": with the witness serving, ``export ONEPATH_WITNESS_SOCKET``
    and ``onepath policy apply --change-witness`` pin it in a ledger whose recorded policy pins none (the same
    policy text, recorded again); without the flag the command refuses. A shell without the socket that says
    --change-witness records "no witness" (removing it is a signed record like any change)."""
    from platform_defs.policy_record import policy_in_force, record_policy
    from resources.approvals import load_private_key
    from tests.conftest import DEMO_ADMIN_KEY, NOT_INHERITED

    ledger, witness = world
    path = tmp_path / "policy.yaml"
    path.write_text((ROOT / "assets" / "policy.yaml").read_text())
    no_witness = Ledger(ledger.store.url, ledger.key_path)
    first = record_policy(no_witness, path, signer="pat", key=load_private_key(DEMO_ADMIN_KEY), initial=True)
    assert policy_in_force(ledger).witness_key is None and ledger.pinned_witness_key() is None

    def policy_apply(*flags: str, socket: Path | None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for var in (*NOT_INHERITED, "ONEPATH_WITNESS_SOCKET"):
            env.pop(var, None)
        env.update(ledger_env(ledger))
        env["ONEPATH_POLICY_FILE"] = str(path)
        if socket is not None:
            env["ONEPATH_WITNESS_SOCKET"] = str(socket)
        return subprocess.run([sys.executable, "-m", "platform_defs.cli", "policy", "apply", *flags, "--as", "pat",
                               "--key", str(DEMO_ADMIN_KEY)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)

    def records() -> int:
        return len(ledger.entries(kind="policy_recorded"))

    # the witness is configured now; the recorded policy pins none: not without saying so
    refused = policy_apply(socket=witness.socket)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused
    assert refused.stderr.startswith(f"onepath: the configured witness ({witness.key[:12]}) is not the one pinned in "
                                     f"ledger #{first.seq} (none): refused"), refused.stderr
    assert "--change-witness" in refused.stderr and "Traceback" not in refused.stderr
    assert records() == 1

    pinned = policy_apply("--change-witness", socket=witness.socket)
    assert pinned.returncode == 0, pinned.stderr
    in_force = policy_in_force(ledger)
    assert in_force.seq > first.seq and f"ledger #{in_force.seq}, signed by pat" in pinned.stdout, pinned.stdout
    # the text is the same: what changed is said (not an empty diff)
    assert pinned.stdout.startswith(f"witness: none -> {witness.key[:12]}… (pinned from this record on)\n"), \
        pinned.stdout
    assert in_force.witness_key == witness.key and ledger.pinned_witness_key() == witness.key
    assert in_force.hash == policy_in_force(no_witness).hash == first.data["hash"]  # the same policy text
    v = ledger.verify()  # the witness countersigned every entry, its answers checked with the pinned key
    assert (v.ok, v.witness_seq, v.unwitnessed, v.reason) == (True, in_force.seq, 0, "intact"), v
    assert not no_witness.verify().ok  # pinned: a verify that cannot ask the witness vouches for nothing

    # the reverse (without the flag it is refused: the test above): a shell without ONEPATH_WITNESS_SOCKET that
    # says --change-witness records "no witness"
    unpinned = policy_apply("--change-witness", socket=None)
    assert unpinned.returncode == 0, unpinned.stderr
    assert unpinned.stdout.startswith(f"witness: {witness.key[:12]}… -> none"), unpinned.stdout
    newest = policy_in_force(no_witness)
    assert newest.seq > in_force.seq and newest.witness_key is None and no_witness.pinned_witness_key() is None
    v = no_witness.verify()
    assert v.ok and v.witness_seq is None, v  # no witness pinned, none configured: nothing to ask
