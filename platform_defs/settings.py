"""Where onepath keeps its state. Every setting is an environment variable with a local default.

Nothing here starts a server: the defaults are an embedded, project-local world (a Dagster
instance in ``.onepath/dagster_home``, MLflow on sqlite with local artifacts, data and logs under
``.onepath``). Point the variables elsewhere to share state (Postgres, S3, a remote MLflow).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from resources.files import create_private_file, private_dir
from resources.object_store import is_s3

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A setting that cannot be used; its message is one line naming the variable."""


DAGSTER_PG_VARS = ("ONEPATH_DAGSTER_PG_HOST", "ONEPATH_DAGSTER_PG_PORT", "ONEPATH_DAGSTER_PG_USER",
                   "ONEPATH_DAGSTER_PG_PASSWORD", "ONEPATH_DAGSTER_PG_DB")


@dataclass(frozen=True)
class DagsterPostgres:
    """The Dagster instance (runs, event logs, schedules) on PostgreSQL: ``ONEPATH_DAGSTER_PG_*``, all five or
    none. The instance file names the variables, never their values (``platform_defs.dagster_instance``), so
    every process that loads it (webserver, daemon, run workers, on any host) needs them in its environment."""

    host: str
    port: int
    user: str
    db: str
    password: str = field(repr=False)
    max_concurrent_runs: int = 10  # ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS: the run queue's limit (-1: none)

    @property
    def address(self) -> str:
        """Where the store is, for a message: ``user@host:port/db``, never the password."""
        return f"{self.user}@{self.host}:{self.port}/{self.db}"


def dagster_postgres_from_env(environ: Mapping[str, str] = os.environ) -> DagsterPostgres | None:
    """The production Dagster instance's settings, or None (the embedded instance) when none of them is set."""
    given = {var: environ.get(var, "") for var in DAGSTER_PG_VARS}
    if not any(given.values()):
        return None
    missing = [var for var, value in given.items() if not value]
    if missing:
        present = [var for var, value in given.items() if value]
        raise SettingsError(f"{', '.join(present)} {'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not: the Dagster instance on PostgreSQL needs all "
                            "five ONEPATH_DAGSTER_PG_* variables (or none, for the embedded instance)")
    port = given["ONEPATH_DAGSTER_PG_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"ONEPATH_DAGSTER_PG_PORT must be a port number (1-65535), not {port!r}")
    runs = environ.get("ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS", "10").strip()
    if not (runs.isdigit() and int(runs) >= 1) and runs != "-1":
        raise SettingsError(f"ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS must be a whole number of runs (1 or more; -1 for "
                            f"no limit), not {runs!r}")
    return DagsterPostgres(host=given["ONEPATH_DAGSTER_PG_HOST"], port=int(port), user=given["ONEPATH_DAGSTER_PG_USER"],
                           db=given["ONEPATH_DAGSTER_PG_DB"], password=given["ONEPATH_DAGSTER_PG_PASSWORD"],
                           max_concurrent_runs=int(runs))


@dataclass(frozen=True)
class Settings:
    home: Path
    dagster_home: Path
    mlflow_tracking_uri: str
    mlflow_registry_uri: str
    mlflow_artifact_root: Path
    mlflow_ui_url: str
    data_dir: Path
    inference_log_dir: Path
    outcomes_dir: Path
    drift_reports_dir: Path
    run_dir: Path
    releases_dir: Path
    host: str
    port_base: int
    # the ledger's witness (onepath witness serve, its own OS user); None: no witness
    witness_socket: Path | None = None
    profile: str = "development"  # ONEPATH_PROFILE; "production" refuses what only a demo may do (demo mode)
    # ONEPATH_LEDGER_URL: the ledger on PostgreSQL (postgresql+psycopg2://user:password@host:port/db); None: the
    # embedded sqlite file $ONEPATH_HOME/ledger.db. The URL holds a password: it is read from the environment only.
    ledger_url: str | None = None
    # ONEPATH_DATA_URL: dataset snapshots on S3 (s3://bucket/prefix); None: under data_dir
    data_url: str | None = None
    dagster_pg: DagsterPostgres | None = None  # ONEPATH_DAGSTER_PG_*; None: the embedded (sqlite) Dagster instance
    # ONEPATH_MLFLOW_ARTIFACTS given as s3://bucket/prefix: MLflow's artifacts on S3; None: the local
    # folder mlflow_artifact_root (which is then the only place they are)
    mlflow_artifacts_url: str | None = None

    @property
    def mlflow_artifacts(self) -> str:
        """Where MLflow artifacts of the experiments onepath creates go: the S3 URI, else the local folder."""
        return self.mlflow_artifacts_url or str(self.mlflow_artifact_root)
    # ONEPATH_INFERENCE_LOG_URL: endpoints' inference logs as Parquet segments on S3 (s3://bucket/prefix; key layout
    # in resources/serving/segment_log.py); None: JSON lines per day under inference_log_dir
    inference_log_url: str | None = None
    # ONEPATH_RELEASES_URL: app release bundles on S3 (s3://bucket/prefix; key layout in resources/release_store.py),
    # releases_dir then their local cache; None: the folders under releases_dir are the releases
    releases_url: str | None = None
    # ONEPATH_OUTCOMES_URL: the outcomes store on S3 (s3://bucket/prefix: one object per delivery under
    # <prefix>/outcomes/, see resources/feedback.py); None: JSON lines per day under outcomes_dir
    outcomes_url: str | None = None
    # ONEPATH_DRIFT_REPORTS_URL: drift reports on S3 (s3://bucket/prefix: <prefix>/drift_reports/); None: under
    # drift_reports_dir
    drift_reports_url: str | None = None

    @property
    def releases(self):
        """Where app releases are kept (:class:`resources.release_store.ReleaseStore`)."""
        from resources.release_store import ReleaseStore

        return ReleaseStore(self.releases_dir, self.releases_url)

    @property
    def data_root(self) -> str:
        """Where dataset snapshots are: the S3 URI, else the local folder."""
        return self.data_url or str(self.data_dir)

    @property
    def ledger_location(self) -> Path | str:
        """The ledger's store: the PostgreSQL URL, else the embedded sqlite file."""
        return self.ledger_url or self.home / "ledger.db"

    def ledger(self):
        """The platform ledger these settings name (its signing key under ``$ONEPATH_HOME/keys``)."""
        from resources.ledger import Ledger, ledger_paths

        return Ledger(self.ledger_location, ledger_paths(self.home)[1], witness_socket=self.witness_socket,
                      private_key_pem=os.environ.get("ONEPATH_PLATFORM_KEY") or None)

    def embedded_stores(self) -> list[tuple[str, str]]:
        """``(store, the setting that moves it off this host)`` for every store still embedded in ``$ONEPATH_HOME``
        (sqlite, local files) or missing (the witness): what the production profile refuses to start with."""
        out = []
        if self.dagster_pg is None:
            out.append(("dagster instance", "ONEPATH_DAGSTER_PG_HOST, _PORT, _USER, _PASSWORD, _DB"))
        for store, uri, var in (("mlflow tracking", self.mlflow_tracking_uri, "MLFLOW_TRACKING_URI"),
                                ("mlflow registry", self.mlflow_registry_uri, "MLFLOW_REGISTRY_URI"),
                                ("ledger", self.ledger_url or "", "ONEPATH_LEDGER_URL")):
            if uri.startswith(("sqlite:", "file:")) or "://" not in uri:  # a file on this host, whatever its URL
                out.append((store, f"{var}=postgresql+psycopg2://..."))
        for store, value, var in (("mlflow artifacts", self.mlflow_artifacts_url, "ONEPATH_MLFLOW_ARTIFACTS"),
                                  ("dataset snapshots", self.data_url, "ONEPATH_DATA_URL"),
                                  ("inference logs", self.inference_log_url, "ONEPATH_INFERENCE_LOG_URL"),
                                  ("app releases", self.releases_url, "ONEPATH_RELEASES_URL"),
                                  ("outcomes", self.outcomes_url, "ONEPATH_OUTCOMES_URL"),
                                  ("drift reports", self.drift_reports_url, "ONEPATH_DRIFT_REPORTS_URL")):
            if not value:
                out.append((store, f"{var}=s3://BUCKET/PREFIX"))
        if self.witness_socket is None:
            out.append(("witness", "ONEPATH_WITNESS_SOCKET (onepath witness serve, as its own OS user)"))
        return out

    def ensure_dirs(self) -> "Settings":
        """Create every folder owner-only (0700), and an embedded MLflow store as an owner-only file:
        any other local user is an attacker (see ``resources.files``)."""
        for p in (
            self.home,
            self.dagster_home,
            *(() if self.mlflow_artifacts_url else (self.mlflow_artifact_root,)),
            self.data_dir,
            self.inference_log_dir,
            self.outcomes_dir,
            self.drift_reports_dir,
            self.run_dir,
            self.releases_dir,
        ):
            private_dir(p)
        for uri in {self.mlflow_tracking_uri, self.mlflow_registry_uri}:
            if uri.startswith("sqlite:///"):
                create_private_file(Path(uri.removeprefix("sqlite:///")))
        return self


def load_settings() -> Settings:
    """Read settings from the environment (``ONEPATH_*``, ``DAGSTER_HOME``, ``MLFLOW_*``)."""
    home = Path(os.environ.get("ONEPATH_HOME", PROJECT_ROOT / ".onepath")).resolve()
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = os.environ.get("ONEPATH_MLFLOW_ARTIFACTS", "")
    if "://" in artifacts and not is_s3(artifacts.strip()):
        raise SettingsError(f"ONEPATH_MLFLOW_ARTIFACTS={artifacts!r}: expected a local folder or s3://BUCKET/PREFIX")
    artifacts_url = _s3_url("ONEPATH_MLFLOW_ARTIFACTS") if is_s3(artifacts.strip()) else None
    return Settings(
        home=home,
        dagster_home=Path(os.environ.get("DAGSTER_HOME", home / "dagster_home")).resolve(),
        mlflow_tracking_uri=tracking,
        mlflow_registry_uri=os.environ.get("MLFLOW_REGISTRY_URI", tracking),
        mlflow_artifact_root=Path(artifacts if artifacts and not artifacts_url else home / "mlartifacts").resolve(),
        mlflow_artifacts_url=artifacts_url,
        mlflow_ui_url=os.environ.get("ONEPATH_MLFLOW_UI_URL", "http://127.0.0.1:5000"),
        data_dir=Path(os.environ.get("ONEPATH_DATA_DIR", home / "data")).resolve(),
        inference_log_dir=Path(
            os.environ.get("ONEPATH_INFERENCE_LOG_DIR", home / "inference_logs")
        ).resolve(),
        outcomes_dir=Path(os.environ.get("ONEPATH_OUTCOMES_DIR", home / "outcomes")).resolve(),
        drift_reports_dir=Path(os.environ.get("ONEPATH_DRIFT_REPORTS_DIR", home / "drift_reports")).resolve(),
        run_dir=Path(os.environ.get("ONEPATH_RUN_DIR", home / "run")).resolve(),
        releases_dir=Path(os.environ.get("ONEPATH_RELEASES_DIR", home / "releases")).resolve(),
        host=os.environ.get("ONEPATH_HOST", "127.0.0.1"),
        port_base=int(os.environ.get("ONEPATH_PORT_BASE", "18000")),
        witness_socket=Path(os.environ["ONEPATH_WITNESS_SOCKET"]) if os.environ.get("ONEPATH_WITNESS_SOCKET") else None,
        profile=current_profile(),
        ledger_url=os.environ.get("ONEPATH_LEDGER_URL") or None,
        data_url=_s3_url("ONEPATH_DATA_URL"),
        dagster_pg=dagster_postgres_from_env(),
        inference_log_url=_s3_url("ONEPATH_INFERENCE_LOG_URL"),
        releases_url=_s3_url("ONEPATH_RELEASES_URL"),
        outcomes_url=_s3_url("ONEPATH_OUTCOMES_URL"),
        drift_reports_url=_s3_url("ONEPATH_DRIFT_REPORTS_URL"),
    )


def _s3_url(var: str) -> str | None:
    """An ``s3://bucket/prefix`` setting (None when unset); anything else is refused naming the variable."""
    value = os.environ.get(var, "").strip()
    if not value:
        return None
    if not value.startswith("s3://") or not value[5:].split("/", 1)[0]:
        raise SettingsError(f"{var}={value!r}: expected s3://BUCKET/PREFIX")
    return value.rstrip("/")


def declarations_dir() -> Path:
    """Where the organisation's declarations are (``ONEPATH_DECLARATIONS_DIR``; default the project's ``assets/``)."""
    return Path(os.environ.get("ONEPATH_DECLARATIONS_DIR", PROJECT_ROOT / "assets")).resolve()


YAML_NAMES = ("defs.yaml", "defs.yml")


def declaration_files(root: Path) -> list[Path]:
    """Every file under ``root`` a load reads declarations from (``declarations.py`` modules and ``defs.yaml``
    files), in the order it reads them; folders whose name starts with '.' or '__' are not looked into."""
    return [path for path in sorted(root.rglob("*"))
            if not any(part.startswith((".", "__")) for part in path.relative_to(root).parts)
            and (path.name == "declarations.py" or path.name in YAML_NAMES)]


def policy_path() -> Path:
    """The policy file in use (``ONEPATH_POLICY_FILE``; default the project's ``assets/policy.yaml``)."""
    return Path(os.environ.get("ONEPATH_POLICY_FILE", PROJECT_ROOT / "assets" / "policy.yaml")).resolve()


PROFILES = ("development", "production")


def current_profile() -> str:
    """``ONEPATH_PROFILE``: ``development`` (the default) or ``production``. Anything else is read as
    production: a misspelt profile must not quietly allow what production refuses."""
    value = os.environ.get("ONEPATH_PROFILE", "development").strip().lower() or "development"
    return value if value in PROFILES else "production"
