"""Checks of the configured stores, one function per store, for ``onepath doctor``: each returns None when the
store answers, or one line naming the store, its address (``user@host:port/db``, never a password) and the fix."""

from __future__ import annotations

from pathlib import Path

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


# -- the other stores ---------------------------------------------------------------------------------------


def _sql_store(what: str, url: str, fix: str) -> str | None:
    """A SQL store (sqlite file or PostgreSQL URL) answers ``select 1``; one line naming it without its password."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").exists():
        return None  # an embedded store not made yet: the first `onepath up` makes it
    args = {"connect_timeout": CONNECT_TIMEOUT_SECONDS} if url.startswith("postgresql") else {}
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=args)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as err:  # any driver failure is this store's one line
        return f"{what}: {shown} does not answer ({_reason(err, make_url(url).password or '')}): {fix}"
    finally:
        engine.dispose()
    return None


def check_ledger(settings: Settings) -> str | None:
    """The ledger's store answers and, when it holds entries, verifies (chain, signatures, witness)."""
    if settings.ledger_url:
        down = _sql_store("ledger", settings.ledger_url,
                          "check that PostgreSQL runs there and ONEPATH_LEDGER_URL (user, password, host, port, db)")
        if down:
            return down
    v = settings.ledger().verify()
    if not v.ok:
        return (f"ledger: {settings.ledger().location}: {v.reason.splitlines()[0]}: run `onepath audit verify` "
                f"for every finding")
    return None


def check_mlflow(settings: Settings) -> str | None:
    """MLflow's tracking store (and the registry's, when it is another) answers."""
    for what, uri in (("mlflow tracking store", settings.mlflow_tracking_uri),
                      ("mlflow registry store", settings.mlflow_registry_uri)):
        if what.startswith("mlflow registry") and uri == settings.mlflow_tracking_uri:
            continue
        if uri.startswith(("http://", "https://")):
            import httpx

            try:
                httpx.get(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_SECONDS).raise_for_status()
            except httpx.HTTPError as err:  # its message names the URL, token and all
                from urllib.parse import urlsplit

                reason = _reason(err, urlsplit(uri).password or "")
                return (f"{what}: {_shown(uri)} does not answer ({reason}): start the MLflow server or fix "
                        "MLFLOW_TRACKING_URI")
            continue
        down = _sql_store(what, uri, "check that the database runs there and MLFLOW_TRACKING_URI")
        if down:
            return down
    return None


def _bucket(what: str, uri: str, fix: str) -> str | None:
    """An ``s3://bucket/prefix`` can be listed with the credentials in the environment."""
    from resources import object_store

    try:
        object_store.list_objects(object_store.join(uri, "_onepath_doctor"))
    except object_store.ObjectStoreError as err:
        return f"{what}: {err}: {fix}"
    return None


_S3_FIX = ("check the bucket exists and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3, "
           "ONEPATH_S3_ADDRESSING_STYLE for a server that is not AWS)")


def _files(what: str, url: str | None, folder: Path) -> str | None:
    """A store of files: its bucket can be listed, else its local folder can be written."""
    return _bucket(what, url, _S3_FIX) if url else _folder(what, folder)


def check_mlflow_artifacts(settings: Settings) -> str | None:
    return _files("mlflow artifacts", settings.mlflow_artifacts_url, settings.mlflow_artifact_root)


def check_data(settings: Settings) -> str | None:
    return _files("dataset snapshots", settings.data_url, settings.data_dir)


def check_releases(settings: Settings) -> str | None:
    """Where app release bundles are."""
    return _files("app releases", settings.releases_url, settings.releases_dir)


def check_inference_logs(settings: Settings) -> str | None:
    """Where the endpoints log what they score (the workers write with their own keys, ONEPATH_INFERENCE_LOG_AWS_*,
    which only a worker holds: this lists with the platform's)."""
    return _files("inference logs", settings.inference_log_url, settings.inference_log_dir)


def check_outcomes(settings: Settings) -> str | None:
    """Where delivered outcomes (labels) are recorded and the feedback join reads them."""
    return _files("outcomes", settings.outcomes_url, settings.outcomes_dir)


def check_drift_reports(settings: Settings) -> str | None:
    """Where the drift check keeps its HTML reports."""
    return _files("drift reports", settings.drift_reports_url, settings.drift_reports_dir)


def _folder(what: str, path: Path) -> str | None:
    import os

    if path.exists() and not os.access(path, os.W_OK | os.X_OK):
        return f"{what}: {path} cannot be written by this user: fix its owner or mode (0700, the platform's user)"
    return None


def check_witness(settings: Settings) -> str | None:
    """The configured witness answers (no witness configured: nothing to reach; `audit verify` says what that
    means)."""
    if settings.witness_socket is None:
        return None
    from resources.witness import WitnessClient, WitnessError

    try:
        with WitnessClient(settings.witness_socket, CONNECT_TIMEOUT_SECONDS) as w:
            w.head()
    except (WitnessError, OSError) as err:
        return (f"witness: {settings.witness_socket} does not answer ({err}): start `onepath witness serve` as its "
                f"own user, or fix ONEPATH_WITNESS_SOCKET")
    return None


STORES = (  # (store, where it is, its check), in the order doctor prints them
    ("dagster instance", lambda s: s.dagster_pg.address if s.dagster_pg else str(s.dagster_home), check_dagster_instance),
    ("mlflow", lambda s: _shown(s.mlflow_tracking_uri), check_mlflow),
    ("mlflow artifacts", lambda s: s.mlflow_artifacts, check_mlflow_artifacts),
    ("ledger", lambda s: _shown(str(s.ledger_location)), check_ledger),
    ("dataset snapshots", lambda s: s.data_root, check_data),
    ("inference logs", lambda s: s.inference_log_url or str(s.inference_log_dir), check_inference_logs),
    ("app releases", lambda s: s.releases.where, check_releases),
    ("outcomes", lambda s: s.outcomes_url or str(s.outcomes_dir), check_outcomes),
    ("drift reports", lambda s: s.drift_reports_url or str(s.drift_reports_dir), check_drift_reports),
    ("witness", lambda s: str(s.witness_socket or "none configured"), check_witness),
)


def _shown(url: str) -> str:
    """A store's address for a line: a URL without its password (PostgreSQL, an MLflow server's user:token)."""
    from resources.ledger_store import display_url, is_url

    return display_url(url) if is_url(url) else url


def run_checks(settings: Settings) -> list[tuple[str, str, str | None]]:
    """``(store, address, problem)`` per configured store; problem None when it answers."""
    out = []
    for name, where, check in STORES:
        try:
            problem = check(settings)
        except Exception as err:  # a check that breaks is that store's one line, never a traceback
            problem = f"{name}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        out.append((name, where(settings), problem))
    return out


def production_refusals(settings: Settings) -> list[str]:
    """Why the production profile may not start on these settings, one line each (none: it may): a store still
    embedded on this host, a policy in demo mode, a configured store that does not answer."""
    from platform_defs.policy import PolicyError, load_policy, policy_path

    lines = [f"{store}: still embedded on this host; set {setting}" for store, setting in settings.embedded_stores()]
    try:
        if load_policy(policy_path()).demo:
            lines.append(f"policy: {policy_path()} turns demo mode on (demo: true): demo identities and the shipped "
                         "keys are never production's; turn it off and record the policy with your own identities "
                         "(onepath keys init, then onepath policy init)")
    except PolicyError as err:
        lines.append(str(err).splitlines()[0])
    if not lines:
        lines = [problem for _, _, problem in run_checks(settings) if problem is not None]
    return lines
