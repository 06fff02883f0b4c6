"""The MLflow model registry as a Dagster resource (MLflow 3: aliases, not stages)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

# MLflow reads these at import; keep its noise and telemetry out of runs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

TAG_PREFIX = "onepath."


class ArtifactMismatch(RuntimeError):
    """A model version's files do not hash to the digest recorded for it, even as MLflow serves them."""

    def __init__(self, model: str, version: str, expected: str, found: str):
        super().__init__(f"model '{model}' version {version}: artifact digest mismatch: expected {expected}, "
                         f"found {found} (MLflow's copy was changed after registration)")
        self.model, self.version, self.expected, self.found = model, str(version), expected, found


def _private_dirs(root: Path, leaf: Path) -> None:
    """Create ``root`` .. ``leaf`` owner-only (0700), tightening those that exist."""
    leaf.mkdir(parents=True, exist_ok=True, mode=0o700)
    for d in [leaf, *leaf.parents]:
        if d != root and root not in d.parents:
            break
        os.chmod(d, 0o700)


def _owner_only(folder: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(folder):
        os.chmod(dirpath, 0o700)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o600)


_READY: set[str] = set()


def artifact_location(root: str | Path, *parts: str) -> str:
    """The artifact URI of ``parts`` under ``root``: an ``s3://bucket/prefix`` root joined as a URI (no folder
    to make), a local folder as its ``file://`` URI."""
    from resources.object_store import is_s3, join

    if is_s3(str(root)):
        return join(str(root), *parts)
    return Path(root, *parts).as_uri()


def ready_store(uri: str, artifact_root: str | Path) -> None:
    """Create (or upgrade) a database MLflow store's tables once per process, under an exclusive lock. MLflow
    creates them on a store's first use, and two processes doing so at once fail ("table ... already exists"):
    `onepath up`'s daemon and a notebook's first `onepath.register` did. The lock is a file beside a sqlite
    database, and a PostgreSQL advisory lock for a PostgreSQL store (processes on several hosts share no file).
    The store is made with ``artifact_root`` (in the owner-only home, or the S3 prefix) as its default, so its
    Default experiment never points at ``./mlruns`` of whatever folder the first process ran in. Any other URI
    (an MLflow server over http) is that server's to ready."""
    if uri in _READY:
        return
    if uri.startswith("sqlite:///"):
        _ready_sqlite(uri, artifact_root)
    elif uri.startswith("postgresql"):
        _ready_postgresql(uri, artifact_root)
    else:
        return
    _READY.add(uri)


def _make_tables(uri: str, artifact_root: str | Path) -> None:
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    chatty = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..." on stderr
    level = chatty.level
    try:
        chatty.setLevel(logging.WARNING)
        SqlAlchemyStore(uri, artifact_location(artifact_root))  # the tracking tables and the Default experiment
        RegistryStore(uri)  # the registry's (same database)
    finally:
        chatty.setLevel(level)


def _ready_sqlite(uri: str, artifact_root: str | Path) -> None:
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(f"{db}.init-lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _make_tables(uri, artifact_root)
    finally:
        os.close(fd)  # closing releases the lock


# the advisory lock key every onepath process takes while it readies an MLflow PostgreSQL store (any bigint)
_PG_INIT_LOCK = 0x6F6E_6D6C_666C  # "onmlfl"


def _ready_postgresql(uri: str, artifact_root: str | Path) -> None:
    """The tables of a PostgreSQL store, made while this session holds an advisory lock: a second process
    waits, then finds them. Errors name the store without its password."""
    import sqlalchemy as sa

    # autocommit: the lock is the session's; an open transaction would hold back MLflow's own migrations
    engine = sa.create_engine(uri, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_INIT_LOCK})
            try:
                _make_tables(uri, artifact_root)
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_INIT_LOCK})
    except sa.exc.OperationalError as err:
        raise RuntimeError(f"MLflow store {where}: cannot connect: {str(err.orig).strip().splitlines()[0]}") from None
    finally:
        engine.dispose()


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str
    source: str


def trusted_types(estimator: Any) -> list[str]:
    """The types skops does not trust by default that this estimator holds.

    onepath stores sklearn models in skops' safe format (no arbitrary code on load). The model was
    just trained by the declared trainer, so its own types are recorded as the version's allow-list;
    anything else in a tampered file is still refused at load.
    """
    import skops.io

    return list(skops.io.get_untrusted_types(data=skops.io.dumps(estimator)))


class MlflowRegistry(dg.ConfigurableResource):
    """Registers, tags, aliases and fetches model versions."""

    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///... by default).")
    registry_uri: str | None = Field(None, description="Registry URI; defaults to the tracking URI.")
    artifact_root: str = Field(description="Where artifacts of experiments onepath creates go: a local directory, "
                                           "or s3://bucket/prefix (credentials from the standard AWS variables).")
    ui_url: str = Field("http://127.0.0.1:5000", description="MLflow UI base URL, for links in metadata.")
    cache_dir: str = Field(description="Where downloaded model versions are kept (immutable per version).")

    def ready(self) -> None:
        """The store exists with its tables (see :func:`ready_store`); every use below calls it first."""
        ready_store(self.tracking_uri, self.artifact_root)
        if self.registry_uri and self.registry_uri != self.tracking_uri:
            ready_store(self.registry_uri, self.artifact_root)

    def client(self):
        from mlflow import MlflowClient

        self.ready()
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)

    def _use(self) -> None:
        import mlflow

        self.ready()
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)

    def experiment_id(self, name: str) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        from resources.object_store import is_s3

        if not is_s3(self.artifact_root):
            (Path(self.artifact_root) / name).mkdir(parents=True, exist_ok=True)
        try:
            return client.create_experiment(name, artifact_location=artifact_location(self.artifact_root, name))
        except Exception:  # created concurrently by another run
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def log_and_register(
        self, *, model_name: str, estimator: Any, X_example: Any, y_pred_example: Any,
        metrics: dict[str, float], params: dict[str, Any], tags: dict[str, str], experiment: str,
        artifacts: dict[str, str] | None = None,
    ) -> RegisteredVersion:
        """Log a run with the estimator, metrics and ``artifacts`` ({run artifact dir: local file}),
        register it as the next version of ``model_name`` and put ``tags`` on that version."""
        import mlflow
        import mlflow.sklearn
        from mlflow.models import infer_signature

        self._use()
        exp_id = self.experiment_id(experiment)
        signature = infer_signature(X_example, y_pred_example)
        with mlflow.start_run(experiment_id=exp_id, tags=tags) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics(metrics)
            for artifact_dir, path in (artifacts or {}).items():
                mlflow.log_artifact(path, artifact_path=artifact_dir)
            info = mlflow.sklearn.log_model(
                estimator, name="model", signature=signature, input_example=X_example.head(5),
                registered_model_name=model_name, serialization_format="skops",
                skops_trusted_types=trusted_types(estimator),
            )
        version = str(info.registered_model_version)
        self._tag_version(model_name, version, tags)
        return RegisteredVersion(model_name, version, run.info.run_id, f"models:/{model_name}/{version}",
                                 info.model_uri)

    def _tag_version(self, model_name: str, version: str, tags: dict[str, str]) -> None:
        client = self.client()
        for k, v in tags.items():
            client.set_model_version_tag(model_name, version, k, v)

    def attach_to_version(self, *, model_name: str, version: str, run_id: str, tags: dict[str, str],
                          artifacts: dict[str, str]) -> None:
        """Put ``artifacts`` ({run artifact dir: local file}) on the run of an EXISTING version and ``tags`` on
        that version: what :meth:`log_and_register` adds to a version it logs, for one logged elsewhere. The
        model folder itself is not touched (its digest stays what it was)."""
        for artifact_dir, path in artifacts.items():
            self.log_run_artifact(run_id, Path(path), artifact_dir)
        self._tag_version(model_name, version, tags)

    def latest_version(self, name: str) -> str | None:
        versions = self.client().search_model_versions(f"name = '{name}'", order_by=["version_number DESC"],
                                                       max_results=1)
        return str(versions[0].version) if versions else None

    def get_version(self, name: str, version: str):
        return self.client().get_model_version(name, version)

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version. (``search_model_versions`` leaves aliases empty; the registered model has them.)"""
        from mlflow.exceptions import MlflowException

        try:
            rm = self.client().get_registered_model(name)
        except MlflowException:
            return {}
        return {a: str(v) for a, v in (rm.aliases or {}).items()}

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(name, alias, version)

    def download(self, name: str, version: str) -> Path:
        """A local copy of the version's model directory (cached, owner-only). The cache is only a
        cache: anything that serves or is judged goes through :meth:`fetch_verified`."""
        dst = Path(self.cache_dir) / name / str(version)
        if (dst / "MLmodel").exists():
            return dst
        tmp = self.fresh_copy(name, version, dst.parent)
        try:
            os.replace(tmp, dst)
        except OSError:  # another process won the race; fetch_verified checks whichever copy stands
            shutil.rmtree(tmp, ignore_errors=True)
        return dst

    def fresh_copy(self, name: str, version: str, parent: Path) -> Path:
        """Download the version's model directory as MLflow serves it into a new private (0700)
        directory under ``parent``; files 0600."""
        import mlflow.artifacts

        self._use()
        _private_dirs(Path(self.cache_dir), parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=parent))  # 0700, unique
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp),
                                            tracking_uri=self.tracking_uri)
        _owner_only(tmp)
        return tmp

    def fetch_verified(self, name: str, version: str, digest: str) -> Path:
        """A local copy of version ``version`` of ``name`` whose folder digest is ``digest`` (the one the
        ledger recorded at registration). A cached copy that does not match is replaced by a fresh
        download; if MLflow's own copy does not match either, :class:`ArtifactMismatch`."""
        from resources.artifact_digest import ArtifactError, folder_digest

        if not digest:
            raise ArtifactMismatch(name, version, "(none recorded)", "(not checked)")
        cached = self.download(name, version)
        try:
            if folder_digest(cached) == digest:
                return cached
        except ArtifactError:
            pass  # a symlink planted in the cache: replace the copy like any other mismatch
        fresh = self.fresh_copy(name, version, cached.parent)
        try:
            found = folder_digest(fresh)
        except ArtifactError as err:
            shutil.rmtree(fresh, ignore_errors=True)
            raise ArtifactMismatch(name, version, digest, f"unreadable ({err})") from None
        if found != digest:
            shutil.rmtree(fresh, ignore_errors=True)
            raise ArtifactMismatch(name, version, digest, found)
        # swap the verified copy in for the bad cache (the bad one is moved aside, then removed)
        stale = cached.with_name(f".{version}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.replace(cached, stale)
        except OSError:
            pass
        try:
            os.replace(fresh, cached)
        except OSError:  # another process put a copy there in between: serve our verified one
            return fresh
        finally:
            shutil.rmtree(stale, ignore_errors=True)
        return cached

    def run_artifact(self, run_id: str, path: str, dst: Path) -> Path | None:
        """Download one artifact of a run, or None if the run has no such artifact."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        self._use()
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                            tracking_uri=self.tracking_uri))
        except (MlflowException, OSError):
            return None

    def log_run_artifact(self, run_id: str, local_path: Path, artifact_dir: str) -> None:
        self.client().log_artifact(run_id, str(local_path), artifact_path=artifact_dir)

    def version_url(self, name: str, version: str) -> str:
        return f"{self.ui_url}/#/models/{name}/versions/{version}"

    def run_url(self, run_id: str) -> str:
        run = self.client().get_run(run_id)
        return f"{self.ui_url}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
