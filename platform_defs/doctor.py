"""Checks of the configured stores, one function per store, for ``onepath doctor``: each returns None when the
store answers, or one line naming the store, its address (``user@host:port/db``, never a password) and the fix."""

from __future__ import annotations

from platform_defs.settings import Settings

CONNECT_TIMEOUT_SECONDS = 5


def _reason(err: BaseException, secret: str) -> str:
    """The driver's first line, the password taken out should a driver ever echo it."""
    orig = getattr(err, "orig", None) or err
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return first.replace(secret, "***") if secret else first


def _fix(reason: str) -> str:
    low = reason.lower()
    if "password authentication failed" in low or "role" in low and "does not exist" in low:
        return "check ONEPATH_DAGSTER_PG_USER and ONEPATH_DAGSTER_PG_PASSWORD"
    if "database" in low and "does not exist" in low:
        return "create the database or fix ONEPATH_DAGSTER_PG_DB"
    return "check that PostgreSQL runs there and ONEPATH_DAGSTER_PG_HOST / ONEPATH_DAGSTER_PG_PORT"


def check_dagster_instance(settings: Settings) -> str | None:
    """The Dagster instance's store: the PostgreSQL server of ``ONEPATH_DAGSTER_PG_*`` answers a query as that user
    in that database, and ``$DAGSTER_HOME/dagster.yaml`` does not keep the instance somewhere the settings do not
    say. None when all is well."""
    from platform_defs.dagster_instance import written_by_onepath

    path = settings.dagster_home / "dagster.yaml"
    try:
        written = written_by_onepath(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        written = None
    pg = settings.dagster_pg
    if pg is None:
        if written == "production":
            return (f"dagster instance: {path} keeps it on PostgreSQL but ONEPATH_DAGSTER_PG_* are not set: set them, "
                    "or remove the file for the embedded instance")
        return None  # embedded: sqlite files in $DAGSTER_HOME, nothing to reach
    import sqlalchemy as sa

    url = sa.URL.create("postgresql+psycopg2", username=pg.user, password=pg.password, host=pg.host, port=pg.port,
                        database=pg.db)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool,
                              connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as err:  # any driver failure is this store's one line
        reason = _reason(err, pg.password)
        return f"dagster instance: PostgreSQL at {pg.address} does not answer ({reason}): {_fix(reason)}"
    finally:
        engine.dispose()
    if path.is_file() and written is None:
        return (f"dagster instance: {path} is not onepath's, so ONEPATH_DAGSTER_PG_* do not configure it: make sure it "
                f"points at {pg.address}, or remove it and onepath writes one that does")
    return None
