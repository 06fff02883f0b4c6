"""Moving an embedded installation's stores onto the production ones (``onepath migrate --to production``).

Each store moves with what binds it kept exactly: the ledger with its entry numbers, hashes and head signatures
(``Ledger.copy_to``); the MLflow registry with its run ids, experiment ids, versions, aliases and tags (approvals
and digests name them), table for table, and its artifacts byte for byte. Every step is safe to re-run and never
overwrites a target that holds something else.

MLflow has no tool that keeps ids across stores (``mlflow-export-import`` makes new runs), so its tables are
copied: the target's schema is MLflow's own (MLflow creates and upgrades it when it opens the store), the rows
are the source's, inserted parents first, and every value naming the source's artifact root names the target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from resources import object_store


class MigrationRefused(RuntimeError):
    """A step wrote nothing: the target holds something else, or the source is not what it must be."""


@dataclass(frozen=True)
class MlflowCopy:
    tables: dict[str, int]  # rows copied per table
    artifacts: int  # files copied

    def summary(self) -> str:
        runs, versions = self.tables.get("runs", 0), self.tables.get("model_versions", 0)
        return f"{runs} runs, {versions} model versions, {self.artifacts} artifact files"


# Tables MLflow fills by itself in a fresh store (its schema version, the Default experiment): never copied over
_MLFLOW_OWN = {"alembic_version"}


def _engine(uri: str) -> sa.Engine:
    return sa.create_engine(uri)


def _open_mlflow(uri: str) -> None:
    """Have MLflow create (or upgrade) its schema in ``uri``: the target's tables are MLflow's own."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def copy_mlflow(source_uri: str, target_uri: str, artifacts_from: Path, artifacts_to: str) -> MlflowCopy:
    """Copy the MLflow store at ``source_uri`` (with its artifacts under the local folder ``artifacts_from``) into
    ``target_uri`` (with artifacts under ``artifacts_to``, an ``s3://`` URI). Rows the target already holds
    identically are kept (a re-run copies only what is new); a target row the source does not hold, or holds
    otherwise, is refused, and nothing is written. A fresh store's own rows (its Default experiment) give way."""
    src_root = artifacts_from.resolve().as_uri()  # how the embedded store names its artifacts: file:///...
    _open_mlflow(target_uri)
    src_engine, dst_engine = _engine(source_uri), _engine(target_uri)
    counts: dict[str, int] = {}
    try:
        src_meta, dst_meta = sa.MetaData(), sa.MetaData()
        src_meta.reflect(src_engine)
        dst_meta.reflect(dst_engine)
        missing = sorted(set(src_meta.tables) - set(dst_meta.tables) - _MLFLOW_OWN)
        if missing:
            raise MigrationRefused(f"the MLflow store at {_display(target_uri)} lacks the tables {missing} of "
                                   f"{_display(source_uri)}: are both on the same MLflow version?")
        with src_engine.connect() as src, dst_engine.begin() as dst:  # one transaction: all or nothing
            for table in src_meta.sorted_tables:  # parents before children
                if table.name in _MLFLOW_OWN:
                    continue
                target = dst_meta.tables[table.name]
                pk = [c.name for c in table.primary_key.columns] or [c.name for c in table.columns]
                mine = {tuple(r[c] for c in pk): r for r in
                        (_rehome(dict(m._mapping), src_root, artifacts_to) for m in src.execute(sa.select(table)))}
                theirs = {tuple(r[c] for c in pk): r for r in (dict(m._mapping) for m in dst.execute(sa.select(target)))}
                if table.name == "experiments" and (0,) in theirs and theirs[(0,)] != mine.get((0,)):
                    # a fresh store's own Default experiment: the source's takes its place (nothing refers to it yet)
                    if len(theirs) > 1 or _refers_to_default(dst, dst_meta):
                        raise MigrationRefused(_not_empty(target_uri, table.name, (0,)))
                    dst.execute(sa.delete(target).where(target.c.experiment_id == 0))
                    del theirs[(0,)]
                for key, row in theirs.items():
                    if mine.get(key) != row:
                        raise MigrationRefused(_not_empty(target_uri, table.name, key))
                new = [row for key, row in mine.items() if key not in theirs]
                if new:
                    dst.execute(sa.insert(target), new)
                    counts[table.name] = len(new)
            if dst_engine.dialect.name == "postgresql":  # the next experiment MLflow creates gets a free id
                dst.execute(sa.text("SELECT setval(pg_get_serial_sequence('experiments', 'experiment_id'), "
                                    "GREATEST((SELECT MAX(experiment_id) FROM experiments), 1))"))
    finally:
        src_engine.dispose()
        dst_engine.dispose()
    return MlflowCopy(counts, _copy_artifacts(artifacts_from, artifacts_to))


def _refers_to_default(conn: sa.Connection, meta: sa.MetaData) -> bool:
    """Whether anything in the target hangs off its Default experiment (a run, a tag): then it is in use."""
    for name in ("runs", "experiment_tags", "logged_models"):
        table = meta.tables.get(name)
        if table is not None and "experiment_id" in table.c and conn.execute(
                sa.select(sa.func.count()).select_from(table).where(table.c.experiment_id == 0)).scalar_one():
            return True
    return False


def _not_empty(uri: str, table: str, key: tuple) -> str:
    return (f"the MLflow store at {_display(uri)} holds other data than the source (table {table}, key "
            f"{', '.join(map(str, key))}): nothing copied (a target is never overwritten)")


def _rehome(row: dict[str, Any], src_root: str, dst_root: str) -> dict[str, Any]:
    """The row with every value naming the source's artifact root naming the target's instead."""
    for k, v in row.items():
        if isinstance(v, str) and v.startswith(src_root):
            row[k] = dst_root.rstrip("/") + v[len(src_root):]
    return row


def _copy_artifacts(folder: Path, to: str) -> int:
    """Every file under ``folder`` to the same relative key under ``to``; one already there is kept when it has
    the same bytes, refused otherwise. Returns how many were written."""
    if not object_store.is_s3(to):
        raise MigrationRefused(f"the artifacts' target {to!r} is not an s3:// URI")
    written = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        uri = object_store.join(to, path.relative_to(folder).as_posix())
        data = path.read_bytes()
        there = object_store.get_bytes(uri)
        if there is None:
            object_store.put_bytes(uri, data)
            written += 1
        elif there != data:
            raise MigrationRefused(f"{uri} exists with other bytes than {path}: not overwritten")
    return written


def _display(uri: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(uri).render_as_string(hide_password=True)
