"""Where the ledger's rows live: one storage layer, SQLAlchemy Core, over sqlite (the embedded default) and
PostgreSQL (the production profile). ``resources.ledger`` holds every rule of the ledger and speaks only to this.

The two databases differ in four things, all of them here and nowhere else:

* **The append lock.** An append (read the head, check its signature, insert the entry and its signature, commit,
  submit to the witness) runs under one exclusive lock so the chain gets one writer at a time and the witness sees
  heads in order. On sqlite it is an ``fcntl.flock`` on ``<db>.lock`` plus ``BEGIN IMMEDIATE``; on PostgreSQL a
  session-level advisory lock (``pg_advisory_lock``) taken on the append's own connection and held across its
  commit and the witness submission: writers on several hosts share it with no lock file, and it goes with the
  session if the writer's process or host dies. ``verify`` takes the same lock shared while its snapshot starts.
* **Read snapshots.** sqlite's ``BEGIN`` (WAL); PostgreSQL's ``REPEATABLE READ READ ONLY``.
* **The lease table's writers.** sqlite's ``BEGIN IMMEDIATE`` serializes them; on PostgreSQL a transaction-level
  advisory lock does, and an append checking its fence holds the lease row ``FOR SHARE`` until it commits. Lease
  expiry is read on the database server's clock there, so hosts with skewed clocks agree on it.
* **The append-only guards**: triggers (an accident stopper: the hashes, signatures and witness catch attackers).

Connections come from one SQLAlchemy engine per database and process (a child after ``fork()`` opens its own and
never closes what it inherited: closing a PostgreSQL connection from the child would end the parent's session).
Transactions are explicit (``BEGIN`` .. ``COMMIT`` on a connection in autocommit mode), so each database's own
``BEGIN`` form is used.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from resources.files import create_private_file

TABLE = "ledger_entries"
SIGS = "head_signatures"
RECEIPTS = "witness_receipts"
LEASES = "promotion_leases"
COLUMNS = ("seq", "ts", "kind", "subject", "env", "actor", "data", "prev_hash", "hash")
BUSY_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5
# PostgreSQL: how long a statement waits for a lock (the append lock above all) before it fails; and how soon a
# peer that went silent (a writer host gone, a cut network) is given up, by the client and by the server, which
# then ends that session and so frees the append lock it held. Without them both wait for TCP's ~2 hours.
LOCK_WAIT_S = 60.0
DEAD_PEER_S = 30

# seq and token are 64-bit on PostgreSQL; on sqlite the seq stays an INTEGER PRIMARY KEY (the rowid itself)
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
METADATA = sa.MetaData()
sa.Table(TABLE, METADATA,
         sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
         *(sa.Column(c, sa.Text, nullable=c == "env") for c in COLUMNS[1:]))
# key: b64 of the signer's raw 32-byte public key; sig: b64 Ed25519 over anchor_message(seq, hash)
sa.Table(SIGS, METADATA, sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
         sa.Column("key", sa.Text, nullable=False), sa.Column("sig", sa.Text, nullable=False))
# where the witness is: its countersignature of the newest head it accepted (state, not history)
sa.Table(RECEIPTS, METADATA, sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
         sa.Column("cosig", sa.Text, nullable=False))
sa.Table(LEASES, METADATA, sa.Column("name", sa.Text, primary_key=True),
         sa.Column("holder", sa.Text, nullable=False), sa.Column("token", sa.BigInteger, nullable=False),
         sa.Column("expires_at", sa.Float(precision=53), nullable=False))
sa.Index(f"{TABLE}_subject", METADATA.tables[TABLE].c.subject, METADATA.tables[TABLE].c.kind)
sa.Index(f"{TABLE}_kind", METADATA.tables[TABLE].c.kind)

APPEND_ONLY = "the onepath ledger is append-only"
_GUARDED = (TABLE, SIGS)
_GUARDS = {
    "sqlite": [f"""CREATE TRIGGER IF NOT EXISTS {t}_no_{op} BEFORE {op.upper()} ON {t}
                   BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"""
               for t in _GUARDED for op in ("update", "delete")],
    "postgresql": [
        f"""CREATE OR REPLACE FUNCTION onepath_append_only() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$""",
        *(f"CREATE OR REPLACE TRIGGER {t}_no_{op} BEFORE {op.upper()} ON {t} FOR EACH "
          f"{'STATEMENT' if op == 'truncate' else 'ROW'} EXECUTE FUNCTION onepath_append_only()"
          for t in _GUARDED for op in ("update", "delete", "truncate")),
    ],
}

# advisory lock keys, per schema: one for appends (session level), one for the lease table and schema creation
_PG_LOCK = "hashtextextended('onepath-ledger:{what}:' || current_schema(), 0)"


def _pg_connect_args() -> dict[str, Any]:
    """libpq's settings for the ledger's sessions: bounded connect, lock waits and dead-peer detection both ways
    (client keepalives and TCP_USER_TIMEOUT; the server's keepalives set for the session)."""
    probe = max(1, DEAD_PEER_S // 6)
    keepalives = (f"-c tcp_keepalives_idle={probe} -c tcp_keepalives_interval={probe} "
                  f"-c tcp_keepalives_count=5")
    return {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "onepath-ledger",
            "keepalives": 1, "keepalives_idle": probe, "keepalives_interval": probe, "keepalives_count": 5,
            "tcp_user_timeout": DEAD_PEER_S * 1000,
            "options": f"-c lock_timeout={int(LOCK_WAIT_S * 1000)} {keepalives}"}


class LedgerUnavailable(RuntimeError):
    """The ledger's database cannot be reached or read (one line: which store, where, why; never a password)."""


def is_url(location: Any) -> bool:
    return isinstance(location, str) and "://" in location


def display_url(url: str) -> str:
    """The URL without its password (what an error or ``doctor`` may print)."""
    return make_url(url).render_as_string(hide_password=True)


_NOT_READY = object()


class _Engines:
    """One engine per database URL and process; an engine a child inherited through fork() is left alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, int], tuple[Any, sa.Engine]] = {}
        self._inherited: list[sa.Engine] = []

    def get(self, url: str, stamp: Any, build) -> sa.Engine:
        """The engine for ``url`` in this process; rebuilt when ``stamp`` (a sqlite file's identity) changed."""
        key = (url, os.getpid())
        with self._lock:
            hit = self._by_key.get(key)
            if hit is not None and hit[0] == stamp:
                return hit[1]
            for (u, pid), (_, eng) in list(self._by_key.items()):
                if u == url and pid != os.getpid():
                    self._inherited.append(eng)  # never close a connection inherited through fork()
                    del self._by_key[(u, pid)]
            if hit is not None:
                hit[1].dispose()  # the file was replaced: connections to the old one are of no use
            engine = build()
            self._by_key[key] = (stamp, engine)
            return engine


_ENGINES = _Engines()


class Conn:
    """One connection: named-parameter SQL, explicit transactions in the database's own form."""

    def __init__(self, store: "LedgerStore", sa_conn: sa.Connection):
        self.store = store
        self.sa = sa_conn
        self.in_transaction = False
        self.tables_seen: set[str] = set()  # the tables a read snapshot found at its start
        self.release_sql: str | None = None  # PostgreSQL: what gives up the append lock this session holds

    def execute(self, sql: str, **params: Any) -> sa.CursorResult:
        return self.sa.execute(_text(sql), params)

    def rows(self, sql: str, **params: Any) -> list[tuple]:
        return [tuple(r) for r in self.execute(sql, **params)]

    def one(self, sql: str, **params: Any) -> tuple | None:
        r = self.execute(sql, **params).first()
        return tuple(r) if r is not None else None

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.execute(sql, **params).scalar()

    def insert_rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` (dicts by column) into the ledger's ``table`` in batches (SQLAlchemy's insertmanyvalues:
        a few statements for many rows, not one per row)."""
        if rows:
            self.sa.execute(sa.insert(METADATA.tables[table]), rows)

    def begin(self, write: bool) -> None:
        pg = self.store.dialect == "postgresql"
        if write:
            self.sa.exec_driver_sql("BEGIN" if pg else "BEGIN IMMEDIATE")
        else:
            self.sa.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if pg else "BEGIN")
        self.in_transaction = True

    def commit(self) -> None:
        self.sa.exec_driver_sql("COMMIT")
        self.in_transaction = False

    def rollback(self) -> None:
        """Roll back the open transaction, if any (never raises: the error that led here matters more)."""
        if not self.in_transaction:
            return
        self.in_transaction = False
        try:
            self.sa.exec_driver_sql("ROLLBACK")
        except sa.exc.SQLAlchemyError:
            self.sa.invalidate()  # a broken connection: the server rolls back when the session ends

    def commit_with(self, *statements: tuple[str, dict[str, Any]], release: bool = False) -> None:
        """Run ``statements`` (their parameter names distinct) and commit; with ``release`` also give the append
        lock up (the caller needs it no longer); on PostgreSQL in one round trip."""
        self.run_with(*statements, "COMMIT", release=release)
        self.in_transaction = False

    def run_with(self, *statements: tuple[str, dict[str, Any]] | str, release: bool = False) -> None:
        """Run ``statements`` (SQL with its parameters, or plain SQL), with ``release`` then give the append lock
        up; on PostgreSQL in one round trip (psycopg2 sends them as one query)."""
        steps = [(st, {}) if isinstance(st, str) else st for st in statements]
        releasing = bool(release and self.release_sql)
        if releasing:
            steps.append((self.release_sql, {}))
        if not steps:
            return
        if self.store.dialect == "postgresql":
            params: dict[str, Any] = {}
            for _, p in steps:
                params.update(p)
            self.driver("; ".join(sql for sql, _ in steps), params)
        else:
            for sql, p in steps:
                self.driver(sql, p)
        if releasing:  # only once it ran: a statement before it that failed skipped it, and the lock is still
            self.release_sql = None  # held, for ``appending`` to give up (or to end the session) on the way out

    def driver(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        """``sql`` with ``:name`` parameters straight to the driver (no SQLAlchemy compilation: an append's hot
        statements); sqlite3 takes ``:name`` itself, psycopg2 gets ``%(name)s``."""
        if self.store.dialect == "postgresql":
            sql = _pyformat(sql)
        return self.sa.exec_driver_sql(sql, params or {}) if params else self.sa.exec_driver_sql(sql)

    @contextmanager
    def transaction(self, write: bool) -> Iterator["Conn"]:
        self.begin(write)
        try:
            yield self
            self.commit()
        finally:
            self.rollback()  # only when the commit was not reached

    def tables(self) -> set[str]:
        """The ledger's tables that exist (read inside the current transaction)."""
        if self.store.dialect == "postgresql":
            found = self.rows("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        else:
            found = self.rows("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r[0] for r in found}

    def now(self) -> float:
        """Seconds since the epoch on the database's clock (PostgreSQL) or this host's (sqlite: one host)."""
        if self.store.dialect == "postgresql":
            return float(self.scalar("SELECT extract(epoch FROM clock_timestamp())"))
        return time.time()

    def lease_row_sql(self, hold: bool = False) -> str:
        """Read a lease row; with ``hold`` (an append checking its fence) on PostgreSQL the row stays locked until
        the append commits, so the lease cannot be granted again in between (sqlite's BEGIN IMMEDIATE already
        keeps every other writer out)."""
        lock = " FOR SHARE" if hold and self.store.dialect == "postgresql" else ""
        return f"SELECT holder, token, expires_at FROM {LEASES} WHERE name = :name{lock}"

    def lock_leases(self) -> None:
        """Inside a lease transaction: one lease writer at a time (sqlite's BEGIN IMMEDIATE already is)."""
        if self.store.dialect == "postgresql":
            self.execute(f"SELECT pg_advisory_xact_lock({_PG_LOCK.format(what='leases')})")


_TEXTS: dict[str, sa.TextClause] = {}
_PYFORMAT: dict[str, str] = {}
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


def _pyformat(sql: str) -> str:
    """``:name`` parameters as psycopg2's ``%(name)s`` (the ledger's SQL has no ``%``, no ``::`` casts)."""
    out = _PYFORMAT.get(sql)
    if out is None:
        if len(_PYFORMAT) > 256:
            _PYFORMAT.clear()
        out = _PYFORMAT[sql] = _NAMED.sub(r"%(\1)s", sql)
    return out


def _text(sql: str) -> sa.TextClause:
    clause = _TEXTS.get(sql)
    if clause is None:
        if len(_TEXTS) > 512:
            _TEXTS.clear()
        clause = _TEXTS[sql] = sa.text(sql)
    return clause


class LedgerStore:
    """The ledger's database: a sqlite file (a path) or a PostgreSQL URL (``postgresql+psycopg2://...``)."""

    def __init__(self, location: Path | str):
        if is_url(location):
            url = make_url(str(location))
            if url.get_backend_name() == "sqlite":
                location = Path(url.database or "")
            elif url.get_backend_name() != "postgresql":
                raise ValueError(f"ledger store {display_url(str(location))}: only sqlite and postgresql are "
                                 f"supported")
        if is_url(location):
            self.dialect = "postgresql"
            self.url = str(location)
            self.db_path: Path | None = None
            self.display = display_url(self.url)
            self.lock_path: Path | None = None
        else:
            self.dialect = "sqlite"
            self.db_path = Path(location)
            self.url = f"sqlite:///{self.db_path}"
            self.display = str(self.db_path)
            self.lock_path = self.db_path.with_name(self.db_path.name + ".lock")
        self._ready: Any = _NOT_READY  # the file identity (sqlite) or None (PostgreSQL) the schema was ensured for

    def __repr__(self) -> str:
        return f"LedgerStore({self.display!r})"

    # -- engines and connections -------------------------------------------------------------------

    def _engine(self, create: bool) -> tuple[sa.Engine | None, Any]:
        """The engine and the identity of what it opens (a sqlite file is reopened when it was replaced)."""
        if self.dialect == "postgresql":
            return _ENGINES.get(self.url, None, lambda: sa.create_engine(
                self.url, isolation_level="AUTOCOMMIT", pool_pre_ping=True,
                connect_args=_pg_connect_args())), None
        assert self.db_path is not None
        try:
            st = os.stat(self.db_path)
        except FileNotFoundError:
            if not create:
                return None, None
            create_private_file(self.db_path)  # sqlite's -wal and -shm files take the database's mode
            st = os.stat(self.db_path)
        stamp = (st.st_dev, st.st_ino)
        return _ENGINES.get(self.url, stamp, self._sqlite_engine), stamp

    def _sqlite_engine(self) -> sa.Engine:
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT",
                                  connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            # An entry the witness countersigned must survive a power cut, or the witness would be "ahead" of
            # the database afterwards: commit durably.
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        return engine

    @contextmanager
    def connect(self, create: bool) -> Iterator[Conn | None]:
        """A connection (None when the ledger was never written and not ``create``); with ``create`` the schema
        exists. Nothing is created by reading: a sqlite file that does not exist stays absent, and on PostgreSQL
        a database without the ledger's table reads as an empty ledger."""
        try:
            engine, stamp = self._engine(create)
            if engine is None:
                yield None
                return
            with engine.connect() as sa_conn:
                conn = Conn(self, sa_conn)
                try:
                    if self._ready != stamp:
                        if create:
                            self._ensure_schema(conn)
                            self._ready = stamp
                        elif self.dialect == "postgresql" and TABLE not in conn.tables():
                            yield None
                            return
                    yield conn
                finally:
                    conn.rollback()
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as err:
            if self.dialect == "postgresql" and _is_unreachable(err):
                raise LedgerUnavailable(self.unreachable(err)) from None
            if self.dialect == "postgresql" and getattr(getattr(err, "orig", None), "pgcode", None) == "55P03":
                raise LedgerUnavailable(self.lock_not_granted(err)) from None
            raise

    def unreachable(self, err: BaseException) -> str:
        text = str(getattr(err, "orig", None) or err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        return f"the ledger's database {self.display} cannot be reached: {first}"

    def lock_not_granted(self, err: BaseException) -> str:
        first = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        return (f"the ledger's database {self.display} did not grant a lock within {LOCK_WAIT_S:g} s ({first}): the "
                f"writer holding it is frozen or cut off; the server frees it once it sees that session gone "
                f"(about {DEAD_PEER_S} s for a host that went away)")

    def _ensure_schema(self, conn: Conn) -> None:
        """Create the tables, indexes and guards that are missing (under the schema lock on PostgreSQL: hosts
        starting at once must not race on CREATE)."""
        if self.dialect == "sqlite":
            conn.sa.exec_driver_sql("PRAGMA journal_mode=WAL")  # outside a transaction, as sqlite requires
        with conn.transaction(write=True):
            conn.lock_leases()
            METADATA.create_all(conn.sa, checkfirst=True)
            for stmt in _GUARDS[self.dialect]:  # idempotent: also puts back guards someone dropped
                conn.sa.exec_driver_sql(stmt)

    # -- locks -----------------------------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[Conn]:
        """The append lock and a connection to append with (the schema exists)."""
        if self.dialect == "sqlite":
            with self.file_lock():
                with self.connect(create=True) as conn:
                    assert conn is not None
                    yield conn
            return
        with self.connect(create=True) as conn:
            assert conn is not None
            with self._advisory(conn, shared=False):
                yield conn

    @contextmanager
    def appending(self, first_query: str) -> Iterator[tuple[Conn, tuple | None]]:
        """The append lock held, a write transaction open and ``first_query`` (no parameters: the head) run in it,
        yielding the connection and the query's first row; on PostgreSQL all three in one round trip. What the
        caller does not commit (``Conn.commit_with``) is rolled back; the lock is released after, or earlier in
        the caller's last round trip (``release=True``)."""
        if self.dialect == "sqlite":
            with self.exclusive() as conn:
                conn.begin(write=True)
                row = conn.driver(first_query).first()
                yield conn, tuple(row) if row is not None else None  # connect() rolls back what was not committed
            return
        with self.connect(create=True) as conn:
            assert conn is not None
            key = _PG_LOCK.format(what="append")
            conn.release_sql = f"SELECT pg_advisory_unlock({key})"
            conn.in_transaction = True  # from here on: the statement below may fail after its BEGIN
            try:
                row = conn.sa.exec_driver_sql(f"SELECT pg_advisory_lock({key}); BEGIN; {first_query}").first()
                yield conn, tuple(row) if row is not None else None
            finally:
                conn.rollback()
                if conn.release_sql:
                    try:
                        conn.sa.exec_driver_sql(conn.release_sql)
                    except sa.exc.SQLAlchemyError:
                        conn.sa.invalidate()  # ending the session releases the lock
                    conn.release_sql = None

    @contextmanager
    def file_lock(self) -> Iterator[None]:
        """sqlite's append lock alone, without touching the database (the key's creation takes it); a no-op on
        PostgreSQL, where the key files are each host's own and written atomically."""
        if self.lock_path is None:
            yield
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextmanager
    def shared(self, conn: Conn | None) -> Iterator[None]:
        """Hold appends off (not other readers) on ``conn``'s database while a snapshot starts."""
        if conn is None:
            yield
            return
        if self.dialect == "postgresql":
            with self._advisory(conn, shared=True):
                yield
            return
        assert self.lock_path is not None
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            yield  # no lock file: nothing was ever appended by onepath
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _advisory(self, conn: Conn, shared: bool) -> Iterator[None]:
        kind = "_shared" if shared else ""
        key = _PG_LOCK.format(what="append")
        conn.execute(f"SELECT pg_advisory_lock{kind}({key})")
        try:
            yield
        finally:
            try:  # inside a read snapshot, which stays open (an aborted one makes this fail: then the session goes)
                conn.execute(f"SELECT pg_advisory_unlock{kind}({key})")
            except sa.exc.SQLAlchemyError:
                conn.in_transaction = False
                conn.sa.invalidate()  # ending the session releases the lock

    # -- errors ----------------------------------------------------------------------------------

    @staticmethod
    def missing_table(err: BaseException) -> bool:
        text = str(getattr(err, "orig", err))
        return "no such table" in text or getattr(getattr(err, "orig", None), "pgcode", None) == "42P01"


def _is_unreachable(err: BaseException) -> bool:
    orig = getattr(err, "orig", None)
    return getattr(orig, "pgcode", None) is None  # connection-level failures carry no SQLSTATE from the server
