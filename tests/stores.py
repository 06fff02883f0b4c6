"""The production stores, real, on loopback, for the tests: a PostgreSQL 15 server and moto's S3 server.

PostgreSQL runs as the ``postgres`` OS user (``initdb`` refuses root) in a 0700 folder of its own under /tmp, on
a free 127.0.0.1 port, with password (scram-sha-256) authentication: with ``trust`` any local user could connect
as anyone. moto's server runs as its own process (it keeps its state in memory: stopping it loses everything).
Both are started by tests/conftest.py's session fixtures and stopped at the end of the session.
"""

from __future__ import annotations

import os
import secrets
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("ONEPATH_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "postgres"  # the OS user the server runs as
ROLE = "onepath"  # the database superuser initdb creates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups", "--", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class PostgresServer:
    """One PostgreSQL cluster in ``base`` (data, socket folder, log, password file), listening on 127.0.0.1."""

    base: Path
    port: int
    password: str

    def url(self, db: str = "postgres", driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{ROLE}:{self.password}@127.0.0.1:{self.port}/{db}"

    def _ctl(self, *args: str) -> subprocess.CompletedProcess:
        return _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.base / "data"), "-l", str(self.base / "log"),
                            *args)

    def start(self) -> None:
        done = self._ctl("-w", "-t", "60", "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} "
                         f"-k {self.base / 'sock'}", "start")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
                               f"\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-w", "-m", mode, "stop")

    def log_tail(self, n: int = 20) -> str:
        log = self.base / "log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""

    def create_database(self, name: str) -> str:
        """A new, empty database ``name``; its URL."""
        import sqlalchemy as sa

        engine = sa.create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)


def start_postgres() -> PostgresServer:
    """initdb and start a new cluster; the caller stops it (``stop``) and removes ``base``."""
    for tool in ("initdb", "pg_ctl"):
        if not (PG_BIN / tool).is_file():
            raise RuntimeError(f"PostgreSQL 15's {tool} is not at {PG_BIN}: install Debian's postgresql-15 "
                               f"(./dev test does when it can), or set ONEPATH_PG_BIN")
    base = Path(tempfile.mkdtemp(prefix="onepath-pg-", dir="/tmp"))  # the postgres user must reach it
    shutil.chown(base, PG_USER, PG_USER)
    base.chmod(0o700)
    password = secrets.token_urlsafe(24)
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    shutil.chown(pwfile, PG_USER, PG_USER)
    pwfile.chmod(0o600)
    (base / "sock").mkdir()
    shutil.chown(base / "sock", PG_USER, PG_USER)
    done = _as_postgres(str(PG_BIN / "initdb"), "-D", str(base / "data"), "-U", ROLE, f"--pwfile={pwfile}",
                        "-A", "scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
    pwfile.unlink()
    if done.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    last: Exception | None = None
    for _ in range(5):  # a free port can be taken between the check and the bind: try another
        server = PostgresServer(base, free_port(), password)
        try:
            server.start()
            return server
        except RuntimeError as err:
            last = err
    shutil.rmtree(base, ignore_errors=True)
    raise RuntimeError(f"PostgreSQL did not start: {last}")


@dataclass
class MotoServer:
    """moto's S3 (and SageMaker) HTTP server on 127.0.0.1:``port``, as its own process."""

    proc: subprocess.Popen
    port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, service: str = "s3"):
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(s3={"addressing_style": "path"}))

    def stop(self) -> None:
        """Its state is in memory and goes with it: a stopped (SIGSTOP) server is woken to take the SIGTERM."""
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def start_moto() -> MotoServer:
    import httpx

    exe = Path(sys.executable).parent / "moto_server"
    last = ""
    for _ in range(5):
        port = free_port()
        # its request log goes to an unlinked temp file: a pipe nobody reads fills after ~400 requests and then
        # blocks the server mid-request (a client sees read timeouts)
        err = tempfile.TemporaryFile()
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
                err.close()  # the server keeps its own descriptor
                return MotoServer(proc, port)
            except httpx.HTTPError:
                time.sleep(0.2)
        proc.kill()
        proc.wait(timeout=30)
        err.seek(0)
        last = err.read().decode(errors="replace")[-1000:]
        err.close()
    raise RuntimeError(f"moto_server did not answer: {last}")


class LedgerBackend:
    """Where a ledger test keeps its ledger: a sqlite file under ``tmp_path``, or a fresh PostgreSQL database of the
    session's server. ``attack()`` opens the store the way an attacker with its credentials would: a plain
    DB-API connection (``sqlite3``, ``psycopg2``), no onepath code in between."""

    def __init__(self, kind: str, tmp_path: Path, server: PostgresServer | None):
        self.kind, self.tmp_path, self.server = kind, tmp_path, server
        self._n = 0

    def __repr__(self) -> str:
        return f"LedgerBackend({self.kind})"

    def location(self, name: str = "") -> Path | str:
        """A new, empty place for a ledger (``name``: a second ledger in the same test)."""
        if self.kind == "sqlite":
            return self.tmp_path / name / "ledger.db"
        assert self.server is not None
        self._n += 1
        return self.server.create_database(f"ledger_{os.getpid()}_{id(self) % 100000}_{self._n}")

    def ledger(self, name: str = "", **kwargs):
        from resources.ledger import Ledger

        return Ledger(self.location(name), self.tmp_path / name / "keys" / "platform.key", **kwargs)


def attack(ledger):
    """An attacker's own connection to ``ledger``'s database, autocommit off, taking ``?`` placeholders."""
    import sqlite3

    if ledger.store.dialect == "sqlite":
        return sqlite3.connect(ledger.db_path)
    return _PgAttacker(ledger.store.url)


class _PgAttacker:
    """psycopg2 with sqlite's ``?`` placeholders and ``execute(...).fetchall()``, so one tampering script fits both."""

    def __init__(self, url: str):
        import psycopg2
        from sqlalchemy.engine import make_url

        self.conn = psycopg2.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))

    def execute(self, sql: str, params: tuple = ()):
        cur = self.conn.cursor()
        cur.execute(sql.replace("?", "%s"), params)
        return cur

    def commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_: object) -> None:
        if exc_type is None:
            self.conn.commit()
        else:
            self.conn.rollback()


def drop_guards(ledger, conn) -> None:
    """What an attacker does first: drop the append-only triggers (onepath puts them back on its next open)."""
    for table in ("ledger_entries", "head_signatures"):
        for op in ("update", "delete", "truncate"):
            if ledger.store.dialect == "sqlite":
                if op != "truncate":
                    conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_{op}")
            else:
                conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_{op} ON {table}")


def ledger_env(ledger) -> dict[str, str]:
    """The settings that make a onepath command (or the CLI in-process) use ``ledger``: its home (keys/ is
    there) and, on PostgreSQL, its URL."""
    env = {"ONEPATH_HOME": str(ledger.key_path.parent.parent)}
    if ledger.store.dialect == "postgresql":
        env["ONEPATH_LEDGER_URL"] = ledger.store.url
    return env
