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

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson
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


def copy_mlflow(source_uri: str, target_uri: str, artifacts_from: Path, artifacts_to: str,
                dry_run: bool = False) -> MlflowCopy:
    """Copy the MLflow store at ``source_uri`` (with its artifacts under the local folder ``artifacts_from``) into
    ``target_uri`` (with artifacts under ``artifacts_to``, an ``s3://`` URI). Rows the target already holds
    identically are kept (a re-run copies only what is new); a target row the source does not hold, or holds
    otherwise, is refused, and nothing is written. A fresh store's own rows (its Default experiment) give way.
    ``dry_run``: the same checks and counts, nothing written (the target's transaction is rolled back; a target
    without MLflow's tables is not given them: every row would be copied)."""
    src_root = artifacts_from.resolve().as_uri()  # how the embedded store names its artifacts: file:///...
    if dry_run and not _has_tables(target_uri):
        return _would_copy_all(source_uri, artifacts_from, artifacts_to)
    if not dry_run:
        # an artifact there with other bytes is refused before any row is written (the artifacts go last)
        _copy_artifacts(artifacts_from, artifacts_to, dry_run=True)
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
        with src_engine.connect() as src, dst_engine.connect() as dst, dst.begin() as tx:  # all or nothing
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
            if dry_run:
                tx.rollback()
    finally:
        src_engine.dispose()
        dst_engine.dispose()
    return MlflowCopy(counts, _copy_artifacts(artifacts_from, artifacts_to, dry_run))


def _has_tables(uri: str) -> bool:
    engine = _engine(uri)
    try:
        return bool(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _would_copy_all(source_uri: str, artifacts_from: Path, artifacts_to: str) -> MlflowCopy:
    """What a copy into an empty store copies: every row of the source, every artifact file."""
    engine = _engine(source_uri)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            counts = {t.name: n for t in meta.sorted_tables if t.name not in _MLFLOW_OWN
                      and (n := conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())}
    finally:
        engine.dispose()
    return MlflowCopy(counts, _copy_artifacts(artifacts_from, artifacts_to, dry_run=True))


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


def _copy_artifacts(folder: Path, to: str, dry_run: bool = False) -> int:
    """Every file under ``folder`` to the same relative key under ``to``; one already there is kept when it has
    the same bytes, refused otherwise. Returns how many were written (``dry_run``: would be)."""
    if not object_store.is_s3(to):
        raise MigrationRefused(f"the artifacts' target {to!r} is not an s3:// URI")
    written = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        uri = object_store.join(to, path.relative_to(folder).as_posix())
        data = path.read_bytes()
        there = object_store.get_bytes(uri)
        if there is None:
            if not dry_run:
                object_store.put_bytes(uri, data)
            written += 1
        elif there != data:
            raise MigrationRefused(f"{uri} exists with other bytes than {path}: not overwritten")
    return written


def _display(uri: str) -> str:
    from resources.ledger_store import display_url

    return display_url(uri)


# --------------------------------------------------------------------------------------------
# What one step did (or, in a dry run, would do)


@dataclass(frozen=True)
class Copied:
    """A step's outcome: what it copied (``what -> count``; nothing: the target was up to date), and notes.
    ``nothing``: why there was nothing to copy at all (no such embedded store)."""

    counts: dict[str, int]
    notes: tuple[str, ...] = ()
    nothing: str = ""

    @property
    def up_to_date(self) -> bool:
        return not any(self.counts.values())

    def summary(self, dry_run: bool = False) -> str:
        if self.nothing:
            text = f"nothing to copy ({self.nothing})"
        elif self.up_to_date:
            text = "already up to date"
        else:
            text = ("would copy " if dry_run else "copied ") + ", ".join(f"{n} {what}" for what, n in self.counts.items())
        return "; ".join([text, *self.notes])


def reroot(value: str, roots: dict[str, str]) -> str:
    """``value`` with the first source root it starts with (a local folder, or its ``file://`` URI) replaced by
    that root's target (an ``s3://`` URI); unchanged when it names none of them."""
    for src, dst in roots.items():
        for form in (src, Path(src).as_uri()):
            if value == form or value.startswith(form.rstrip("/") + "/"):
                return dst.rstrip("/") + value[len(form.rstrip("/")):]
    return value


# --------------------------------------------------------------------------------------------
# Dagster: the latest materialization of every asset and the latest evaluation of every check


MIGRATED_FROM = "onepath/migrated_from"  # tag (materialization) / metadata (check): the source event's run id
MIGRATED_EVENT = "onepath/migrated_event"  # the source event's storage id
# tags that point at the source instance's own event ids: meaningless in the target
_POINTER_TAG = "dagster/input_event_pointer/"
_PAGE = 1000


def sqlite_instance(dagster_home: Path, scratch: Path) -> Any:
    """The embedded (sqlite) Dagster instance whose storage is under ``dagster_home``, whatever its
    ``dagster.yaml`` says now (it may already name the production instance): the config is written to
    ``scratch``, naming the sqlite storage under ``dagster_home`` explicitly."""
    import dagster as dg

    (scratch / "dagster.yaml").write_text(f"telemetry:\n  enabled: false\nstorage:\n  sqlite:\n"
                                          f"    base_dir: {json.dumps(str(dagster_home))}\n")
    return dg.DagsterInstance.from_config(str(scratch))


def postgres_instance(pg: Any, scratch: Path) -> Any:
    """The production Dagster instance of ``pg`` (``settings.DagsterPostgres``), from onepath's own production
    ``dagster.yaml`` written to ``scratch``: it names the ``ONEPATH_DAGSTER_PG_*`` variables, never their values."""
    import dagster as dg

    from platform_defs.dagster_instance import production_yaml

    (scratch / "dagster.yaml").write_text(production_yaml(pg))
    return dg.DagsterInstance.from_config(str(scratch))


def _latest_materializations(instance: Any) -> dict[Any, Any]:
    """``asset key -> EventLogRecord`` of its latest materialization (keys with only observations are left out)."""
    out = {}
    for key in instance.get_asset_keys():
        records = instance.fetch_materializations(key, limit=1, ascending=False).records
        if records:
            out[key] = records[0]
    return out


def _check_evaluations(instance: Any) -> dict[Any, Any]:
    """``check key -> EventLogRecord`` of the latest evaluation of every asset check the instance has seen.
    Dagster 1.13 has no public listing of check keys but ``get_event_records`` (deprecated for 2.0; onepath pins
    1.13), read newest first in pages."""
    import warnings

    import dagster as dg

    out: dict[Any, Any] = {}
    before = None
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            page = instance.get_event_records(dg.EventRecordsFilter(
                event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, before_cursor=before),
                limit=_PAGE, ascending=False)
        for record in page:
            ev = record.event_log_entry.asset_check_evaluation
            if ev is not None:
                out.setdefault(dg.AssetCheckKey(ev.asset_key, ev.check_name), record)
        if len(page) < _PAGE:
            return out
        before = page[-1].storage_id


def _meta_text(value: Any) -> Any:
    return getattr(value, "value", value)


def _rerooted_metadata(metadata: dict[str, Any], roots: dict[str, str]) -> dict[str, Any]:
    import dagster as dg

    out = {}
    for k, v in metadata.items():
        text = v.value if isinstance(v, (dg.TextMetadataValue, dg.PathMetadataValue)) else None
        if isinstance(text, str) and text != reroot(text, roots):
            moved = reroot(text, roots)  # a path that names a moved file is now that object's URI, as live
            v = dg.MetadataValue.url(moved) if isinstance(v, dg.PathMetadataValue) else dg.MetadataValue.text(moved)
        out[k] = v
    return out


def _materialization_copy(record: Any, roots: dict[str, str]) -> Any:
    import dagster as dg

    m = record.event_log_entry.asset_materialization
    tags = {k: v for k, v in (m.tags or {}).items() if not k.startswith(_POINTER_TAG)}
    tags.update({MIGRATED_FROM: record.run_id or "runless", MIGRATED_EVENT: str(record.storage_id)})
    return dg.AssetMaterialization(asset_key=m.asset_key, description=m.description, partition=m.partition,
                                   metadata=_rerooted_metadata(dict(m.metadata), roots), tags=tags)


def _check_copy(record: Any, roots: dict[str, str]) -> Any:
    import dagster as dg

    ev = record.event_log_entry.asset_check_evaluation
    meta = {**_rerooted_metadata(dict(ev.metadata), roots),
            MIGRATED_FROM: dg.MetadataValue.text(record.run_id or "runless"),
            MIGRATED_EVENT: dg.MetadataValue.text(str(record.storage_id))}
    return dg.AssetCheckEvaluation(asset_key=ev.asset_key, check_name=ev.check_name, passed=ev.passed,
                                   metadata=meta, severity=ev.severity, description=ev.description,
                                   blocking=ev.blocking, partition=ev.partition)


def _migrated_id(tags_or_meta: dict[str, Any]) -> tuple[str, str] | None:
    a, b = tags_or_meta.get(MIGRATED_FROM), tags_or_meta.get(MIGRATED_EVENT)
    return (str(_meta_text(a)), str(_meta_text(b))) if a is not None and b is not None else None


def copy_dagster(source: Any, target: Any, roots: dict[str, str], where: str, dry_run: bool = False) -> Copied:
    """Into the ``target`` instance, as runless events: the latest materialization of every asset of ``source``
    (its metadata, with values naming a path under a key of ``roots`` re-rooted to its value; its tags, data
    version and code version included, tagged ``onepath/migrated_from`` and ``onepath/migrated_event``) and the
    latest evaluation of every asset check (marked the same in its metadata): what the gates read
    (``factories.latest_metadata``) and what blocking checks hold automation with. Not the run history.

    A key whose target latest already is the copy of the same source event is skipped (a re-run). A target
    holding any materialization or check evaluation that is not such a copy is refused, nothing written.
    ``where``: the target's address for messages."""
    mats, checks = _latest_materializations(source), _check_evaluations(source)
    for key in target.get_asset_keys():
        before = None
        while True:
            page = target.fetch_materializations(key, limit=_PAGE, cursor=before, ascending=False)
            for r in page.records:
                if _migrated_id(r.event_log_entry.asset_materialization.tags or {}) is None:
                    raise MigrationRefused(f"the Dagster instance at {where} already holds a materialization of "
                                           f"'{key.to_user_string()}' that no migration copied (run "
                                           f"{r.run_id or 'runless'}): nothing copied (a target is never "
                                           f"overwritten)")
            if not page.has_more:
                break
            before = page.cursor
    target_checks = _check_evaluations(target)
    for ckey, r in target_checks.items():
        if _migrated_id(dict(r.event_log_entry.asset_check_evaluation.metadata)) is None:
            raise MigrationRefused(f"the Dagster instance at {where} already holds an evaluation of check "
                                   f"'{ckey.name}' of '{ckey.asset_key.to_user_string()}' that no migration copied "
                                   f"(run {r.run_id or 'runless'}): nothing copied (a target is never overwritten)")
    todo_mats = []
    for key, r in mats.items():
        there = target.fetch_materializations(key, limit=1, ascending=False).records
        mine = (r.run_id or "runless", str(r.storage_id))
        if not there or _migrated_id(there[0].event_log_entry.asset_materialization.tags or {}) != mine:
            todo_mats.append(r)
    todo_checks = []
    for ckey, r in checks.items():
        there = target_checks.get(ckey)
        mine = (r.run_id or "runless", str(r.storage_id))
        if there is None or _migrated_id(dict(there.event_log_entry.asset_check_evaluation.metadata)) != mine:
            todo_checks.append(r)
    if not dry_run:
        # materializations first: a check's evaluation is then newer than its asset's materialization, as in a run
        for r in sorted(todo_mats, key=lambda r: r.storage_id):
            target.report_runless_asset_event(_materialization_copy(r, roots))
        for r in sorted(todo_checks, key=lambda r: r.storage_id):
            target.report_runless_asset_event(_check_copy(r, roots))
    return Copied({"latest materializations": len(todo_mats), "check evaluations": len(todo_checks)})


# --------------------------------------------------------------------------------------------
# Dataset snapshots: <root>/<dataset>/<sha256>.parquet, content-addressed


_SNAPSHOT_RE = re.compile(r"^[0-9a-f]{64}$")


def copy_datasets(data_dir: Path, to: str, dry_run: bool = False) -> Copied:
    """Every snapshot under the local ``data_dir`` into the S3 root ``to`` through ``DataStore.write`` (which writes
    the ``_written`` order marker and never overwrites), oldest first so the markers keep their order; each is
    read back through ``DataStore.read`` (it hashes to its name, or the step stops). A snapshot already there is
    kept; one that lacks its marker (a run stopped between the two writes) gets it. A target holding a snapshot
    the source does not is another installation's: refused, nothing written."""
    from resources.data_store import DataStore

    if not object_store.is_s3(to):
        raise MigrationRefused(f"the dataset snapshots' target {to!r} is not an s3:// URI")
    local, remote = DataStore(root=str(data_dir)), DataStore(root=to)
    datasets = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    mine = {(ds, h): loc for ds in datasets for h, loc in local.snapshots(ds) if _SNAPSHOT_RE.match(h)}
    held, marked = set(), set()
    for o in object_store.list_objects(to):
        rel = o.uri[len(to.rstrip("/")) + 1:].split("/")
        if len(rel) == 2 and rel[1].endswith(".parquet"):
            held.add((rel[0], rel[1].removesuffix(".parquet")))
        elif len(rel) == 3 and rel[1] == "_written" and "-" in rel[2]:
            marked.add((rel[0], rel[2].split("-", 1)[1]))
    foreign = sorted(held - set(mine))
    if foreign:
        ds, h = foreign[0]
        raise MigrationRefused(f"{object_store.join(to, ds, h + '.parquet')} is a snapshot this installation does not hold "
                               f"({len(foreign)} such): the target is another installation's, nothing copied")
    todo = [(ds, h) for (ds, h) in mine if (ds, h) not in held]
    unmarked = [(ds, h) for (ds, h) in mine if (ds, h) in held and (ds, h) not in marked]
    if not dry_run:
        for ds, h in unmarked:
            object_store.put_bytes(object_store.join(to, ds, "_written", f"{time.time_ns():020d}-{h}"), b"")
        for ds, h in todo:  # mine is in write order per dataset (DataStore.snapshots: oldest first)
            df = local.read(ds, h)  # raises when the local file does not hash to its name
            where, written = remote.write(ds, df)
            if written != h:
                raise MigrationRefused(f"{mine[(ds, h)]} reads back as {written[:12]}, not its name {h[:12]}")
            remote.read(ds, h)  # on S3, it hashes to its name
    return Copied({"snapshots": len(todo)}, (f"{len(unmarked)} order markers added",) if unmarked else ())


# --------------------------------------------------------------------------------------------
# Inference logs: JSON lines per day -> Parquet segments (resources.serving.segment_log's layout and encoder)


_SEGMENT_ROWS = 100_000
_KINDS = {bool: "boolean", str: "string", int: "integer", float: "number"}


@dataclass(frozen=True)
class _Planned:
    key: str  # the object's URI
    rows: list[tuple]
    model: str
    version: str
    columns: list[tuple[str, str]]


def _writer_id(rel: str) -> str:
    """The segment names' writer id for one source file: drawn from its path, so a re-run names the same segments."""
    return hashlib.sha256(f"onepath-migrate:{rel}".encode()).hexdigest()[:12]


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(name, kind)`` of the inputs of ``rows``: the kind of each column's first non-null value (a number column
    whose values are all whole numbers stays ``number`` once one of them is not); null throughout: number."""
    kinds: dict[str, str] = {}
    for r in rows:
        for name, v in r["inputs"].items():
            if v is None:
                kinds.setdefault(name, "")
                continue
            k = _KINDS.get(type(v), "")
            if not kinds.get(name):
                kinds[name] = k
            elif kinds[name] == "integer" and k == "number":
                kinds[name] = "number"
    return [(n, k or "number") for n, k in kinds.items()]


def _fits(row: dict[str, Any], kinds: dict[str, str]) -> bool:
    for name, v in row["inputs"].items():
        if v is None:
            continue
        k = _KINDS.get(type(v))
        if not (k == kinds[name] or (kinds[name] == "number" and k == "integer")):
            return False
    return True


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """A JSON line as the segment writer's fields, or None when the reader would count it corrupt."""
    try:
        e = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(e, dict) or not all(isinstance(e.get(f), str) for f in ("ts", "request_id", "version")) \
            or not isinstance(e.get("inputs"), dict):
        return None
    try:
        ts = datetime.fromisoformat(e["ts"])
    except ValueError:
        return None
    if ts.tzinfo is None or any(type(v) not in (*_KINDS, type(None)) for v in e["inputs"].values()):
        return None
    delta = ts - datetime(1970, 1, 1, tzinfo=timezone.utc)
    e["ts_us"] = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return e


def _plan_file(path: Path, rel: str, base: str) -> tuple[list[_Planned], int]:
    """The segments one day file becomes (one per model, version and UTC day of its rows, at most
    ``_SEGMENT_ROWS`` rows each), and how many of its lines are skipped (corrupt, or the last one unfinished)."""
    from resources.serving.segment_log import segment_name

    data = path.read_bytes()
    lines = data.split(b"\n")
    skipped = 0 if lines[-1] == b"" else 1  # no newline at the end: a line still being written when it stopped
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for line in lines[:-1]:
        if not line.strip():
            continue
        e = _parse_line(line)
        if e is None:
            skipped += 1
            continue
        day = datetime.fromtimestamp(e["ts_us"] / 1e6, timezone.utc).strftime("%Y-%m-%d")
        groups.setdefault((str(e.get("model") or ""), e["version"], day), []).append(e)
    writer = _writer_id(rel)
    out: list[_Planned] = []
    for (model, version, day), rows in sorted(groups.items()):
        cols = _columns(rows)
        kinds = dict(cols)
        fit = [r for r in rows if _fits(r, kinds)]
        skipped += len(rows) - len(fit)
        for i in range(0, len(fit), _SEGMENT_ROWS):
            part = fit[i:i + _SEGMENT_ROWS]
            # cut = the newest row's time: no row of the segment is newer (what the window reader relies on)
            cut = datetime.fromtimestamp(max(r["ts_us"] for r in part) / 1e6, timezone.utc)
            name = segment_name(cut, writer, len(out))
            out.append(_Planned(object_store.join(base, version, day, name),
                                [(r["ts_us"], r["request_id"], r["inputs"], r.get("extras") or {}, r.get("output"),
                                  float(r.get("latency_ms") or 0.0)) for r in part],
                                model, version, cols))
    return out, skipped


def copy_inference_logs(log_dir: Path, to: str, dry_run: bool = False) -> Copied:
    """Every endpoint environment's JSON-lines log under the local ``log_dir``
    (``<endpoint>/<env>/<YYYY-MM-DD>.jsonl``) as Parquet segments under ``to`` (``ONEPATH_INFERENCE_LOG_URL``):
    ``<to>/inference/<endpoint>/<env>/<version>/<day>/<cut>-<writer>-<n>.parquet``, encoded by the segment
    writer's own ``encode_segment``. A file's segments are named from its path (writer id) and its rows (cut:
    the newest row's time), so a re-run names the same ones and writes only those missing. Refused, nothing
    written: a target holding segments of any other writer (another installation's, or production's own), or a
    segment of one of these files that a copy of it now would not write (the file changed since it was copied)."""
    from resources.serving.segment_log import SEGMENT_RE, encode_segment

    if not object_store.is_s3(to):
        raise MigrationRefused(f"the inference logs' target {to!r} is not an s3:// URI")
    files = sorted(p for p in log_dir.glob("*/*/*.jsonl") if p.is_file()) if log_dir.is_dir() else []
    planned: list[_Planned] = []
    writers: dict[str, str] = {}
    skipped = 0
    for path in files:
        endpoint, env, name = path.relative_to(log_dir).parts
        rel = f"{endpoint}/{env}/{name}"
        segs, bad = _plan_file(path, rel, object_store.join(to, "inference", endpoint, env))
        planned += segs
        skipped += bad
        writers[_writer_id(rel)] = rel
    wanted = {p.key for p in planned}
    held = {o.uri for o in object_store.list_objects(object_store.join(to, "inference"))}
    for uri in sorted(held - wanted):
        m = SEGMENT_RE.match(uri.rsplit("/", 1)[-1])
        writer = m.group(2) if m else None
        if writer in writers:
            raise MigrationRefused(f"{uri} was copied from {writers[writer]}, which has changed since: nothing "
                                   f"copied (a segment is never overwritten; remove this file's segments to copy it "
                                   f"again)")
        raise MigrationRefused(f"{uri} is not a segment of this installation's logs: the target is in use, nothing "
                               f"copied (a target is never overwritten)")
    todo = [p for p in planned if p.key not in held]
    if not dry_run:
        for p in todo:
            object_store.put_bytes(p.key, encode_segment(p.rows, model=p.model, version=p.version, columns=p.columns))
    notes = (f"{skipped} corrupt or unfinished lines left out",) if skipped else ()
    return Copied({"rows": sum(len(p.rows) for p in todo), "segments": len(todo)}, notes)


# --------------------------------------------------------------------------------------------
# The steps of `onepath migrate --to production`, in order


class MigrationFailed(RuntimeError):
    """A step wrote, and what it wrote does not check out (the ledger copy does not verify)."""


def embedded_settings(target: Any) -> Any:
    """The embedded installation under ``target.home``: the same folders, every production store variable
    ignored (the ledger ``ledger.db``, MLflow ``mlflow.db`` with artifacts in the local folder, the sqlite Dagster
    instance, snapshots and logs in their folders)."""
    from dataclasses import replace

    mlflow_db = f"sqlite:///{target.home / 'mlflow.db'}"
    return replace(target, ledger_url=None, data_url=None, dagster_pg=None, mlflow_artifacts_url=None,
                   inference_log_url=None, outcomes_url=None, drift_reports_url=None, releases_url=None,
                   mlflow_tracking_uri=mlflow_db, mlflow_registry_uri=mlflow_db)


def _run_ledger(source: Any, target: Any, dry_run: bool, roots: dict[str, str]) -> Copied:
    from resources.ledger import LedgerCopyRefused

    if not (source.home / "ledger.db").exists():
        return Copied({}, nothing=f"no ledger at {source.home / 'ledger.db'}")
    src, dst = source.ledger(), target.ledger()
    v = src.verify()
    if not v.ok:
        raise MigrationRefused(f"the ledger at {src.location} does not verify ({v.reason}): nothing copied")
    if dry_run:
        have = [(e.seq, e.hash) for e in dst.entries()]
        mine = [(e.seq, e.hash) for e in src.entries()]
        if have != mine[:len(have)]:
            raise MigrationRefused(f"the ledger at {dst.location} is not empty and differs from {src.location}: "
                                   f"nothing would be copied (it is never overwritten)")
        return Copied({"entries": len(mine) - len(have)}, (f"source head #{v.head_seq} {v.head_hash}",))
    try:
        n = src.copy_to(dst)
    except LedgerCopyRefused as err:
        raise MigrationRefused(str(err)) from None
    t = dst.verify()
    if not t.ok or (t.head_seq, t.head_hash) != (v.head_seq, v.head_hash):
        raise MigrationFailed(f"the ledger copied to {dst.location} does not verify as the source does "
                              f"({t.reason or f'head #{t.head_seq}, the source #{v.head_seq}'})")
    return Copied({"entries": n}, (f"the target verifies: head #{t.head_seq} {t.head_hash} "
                                   f"(source head #{v.head_seq} {v.head_hash})",))


def _run_mlflow(source: Any, target: Any, dry_run: bool, roots: dict[str, str]) -> Copied:
    db = Path(source.mlflow_tracking_uri.removeprefix("sqlite:///"))
    if not db.exists():
        return Copied({}, nothing=f"no MLflow store at {db}")
    if target.mlflow_registry_uri != target.mlflow_tracking_uri:
        raise MigrationRefused("MLFLOW_REGISTRY_URI names another store than MLFLOW_TRACKING_URI: the migration "
                               "moves one MLflow store (tracking and registry together)")
    if "://" not in target.mlflow_tracking_uri or target.mlflow_tracking_uri.split("://")[0].split("+")[0] not in (
            "postgresql", "mysql", "sqlite", "mssql"):
        raise MigrationRefused(f"MLFLOW_TRACKING_URI ({_display_any(target.mlflow_tracking_uri)}) is not a database "
                               "URL: the migration copies MLflow's tables, into the database itself")
    if not target.mlflow_artifacts_url:
        raise MigrationRefused("ONEPATH_MLFLOW_ARTIFACTS is not an s3:// URI: the production MLflow needs its "
                               "artifacts on S3")
    done = copy_mlflow(source.mlflow_tracking_uri, target.mlflow_tracking_uri, source.mlflow_artifact_root,
                       target.mlflow_artifacts_url, dry_run=dry_run)
    return Copied({"runs": done.tables.get("runs", 0), "model versions": done.tables.get("model_versions", 0),
                   "rows in all": sum(done.tables.values()), "artifact files": done.artifacts})


def _dagster_url(pg: Any) -> sa.URL:
    return sa.URL.create("postgresql+psycopg2", username=pg.user, password=pg.password, host=pg.host, port=pg.port,
                         database=pg.db)


def _run_dagster(source: Any, target: Any, dry_run: bool, roots: dict[str, str]) -> Copied:
    import tempfile

    from resources.files import private_dir

    if not (source.dagster_home / "history" / "runs.db").exists():
        return Copied({}, nothing=f"no Dagster history in {source.dagster_home}")
    scratch = private_dir(source.run_dir / "migrate")
    with tempfile.TemporaryDirectory(dir=scratch) as a, tempfile.TemporaryDirectory(dir=scratch) as b:
        src = sqlite_instance(source.dagster_home, Path(a))
        try:
            if dry_run and not _has_tables(_dagster_url(target.dagster_pg)):  # opening it would create its schema
                return Copied({"latest materializations": len(_latest_materializations(src)),
                               "check evaluations": len(_check_evaluations(src))})
            dst = postgres_instance(target.dagster_pg, Path(b))
            try:
                return copy_dagster(src, dst, roots, target.dagster_pg.address, dry_run)
            finally:
                dst.dispose()
        finally:
            src.dispose()


def _run_datasets(source: Any, target: Any, dry_run: bool, roots: dict[str, str]) -> Copied:
    if not source.data_dir.is_dir():
        return Copied({}, nothing=f"no dataset snapshots in {source.data_dir}")
    return copy_datasets(source.data_dir, target.data_url, dry_run)


def _run_inference_logs(source: Any, target: Any, dry_run: bool, roots: dict[str, str]) -> Copied:
    if not source.inference_log_dir.is_dir():
        return Copied({}, nothing=f"no inference logs in {source.inference_log_dir}")
    return copy_inference_logs(source.inference_log_dir, target.inference_log_url, dry_run)


def copy_files(files: dict[Path, str], under: str, what: str, dry_run: bool = False) -> Copied:
    """Each local file of ``files`` to its object (``path -> s3 URI``, every URI under ``under``). An object that
    is there with the same bytes is kept (a re-run); with other bytes it is refused, and so is an object under
    ``under`` that is none of these (the target is another installation's, or production wrote there already):
    nothing is written then."""
    mine = set(files.values())
    foreign = sorted(o.uri for o in object_store.list_objects(under) if o.uri not in mine)
    if foreign:
        raise MigrationRefused(f"{foreign[0]} is not one of this installation's {what} ({len(foreign)} such under "
                               f"{under}): the target is not empty, nothing copied")
    todo = []
    for path, uri in sorted(files.items()):
        there = object_store.get_bytes(uri)
        if there is None:
            todo.append((path, uri))
        elif there != path.read_bytes():
            raise MigrationRefused(f"{uri} exists with other bytes than {path} (changed since it was copied?): "
                                   "not overwritten")
    if not dry_run:
        for path, uri in todo:
            object_store.put_bytes(uri, path.read_bytes())
    return Copied({what: len(todo)})


def _run_outcomes(source: Any, target: Any, dry_run: bool, roots: dict[str, str]) -> Copied:
    """Each local day file ``<endpoint>/<env>/<day>.jsonl`` as one object of the S3 layout, named for the start
    of its day (so it sorts before anything written there that day, as the file's lines were) and a hash of its
    path (so a re-run finds it)."""
    from resources.feedback import outcomes_root

    folder, root = source.outcomes_dir, outcomes_root(target.outcomes_url, "")
    if not folder.is_dir():
        return Copied({}, nothing=f"no outcomes in {folder}")
    files = {}
    from resources.feedback import _DAY_FILE_RE

    for path in sorted(p for p in folder.glob("*/*/*.jsonl") if _DAY_FILE_RE.match(p.name)):
        endpoint, env, day = path.relative_to(folder).parts[0], path.parent.name, path.stem
        stamp = day.replace("-", "") + "T000000000000Z"
        files[path] = object_store.join(root, endpoint, env, day, f"{stamp}-{_writer_id(str(path.relative_to(folder)))}.jsonl")
    return copy_files(files, root, "outcome files", dry_run)


def _reports_root(target: Any) -> str:
    from resources.monitoring import reports_root

    return str(reports_root(target.drift_reports_url, target.drift_reports_dir))


def _run_drift_reports(source: Any, target: Any, dry_run: bool, roots: dict[str, str]) -> Copied:
    folder = source.drift_reports_dir
    if not folder.is_dir():
        return Copied({}, nothing=f"no drift reports in {folder}")
    files = {p: object_store.join(_reports_root(target), p.relative_to(folder).as_posix())
             for p in folder.glob("*/*/*.html")}
    return copy_files(files, _reports_root(target), "drift reports", dry_run)


def _run_releases(source: Any, target: Any, dry_run: bool, roots: dict[str, str]) -> Copied:
    """Each built app release as its bundle (``ReleaseStore.publish``: written once, checked against the content
    hash the ledger's ``release_built`` entry recorded). A folder the ledger records no build of is left, said so."""
    from resources.release_store import ReleaseError, ReleaseStore, recorded_hash, source_hash

    apps = source.releases_dir / "apps"
    if not apps.is_dir():
        return Copied({}, nothing=f"no app releases in {apps}")
    book, store = source.ledger(), ReleaseStore(target.releases_dir, target.releases_url)
    todo, unrecorded = [], []
    ours = set()
    for folder in sorted(p for p in apps.glob("*/r-*") if p.is_dir()):  # every check first, in a dry run too
        app, version = folder.parent.name, folder.name
        content_hash = recorded_hash(book, app, version)
        if content_hash is None:
            unrecorded.append(f"{app} {version}")
            continue
        found, _ = source_hash(folder)
        if found != content_hash:
            raise MigrationRefused(f"{folder} has content hash {found[:12]}, not the {content_hash[:12]} its "
                                   f"release_built entry recorded: nothing copied")
        ours.add(store.bundle(app, version))
        if object_store.metadata(store.bundle(app, version)) is None:
            todo.append((app, version, folder, content_hash))
    foreign = sorted(o.uri for o in object_store.list_objects(store.where) if o.uri not in ours)
    if foreign:
        raise MigrationRefused(f"{foreign[0]} is not one of this installation's releases ({len(foreign)} such under "
                               f"{store.where}): the target is not empty, nothing copied")
    if not dry_run:
        for app, version, folder, content_hash in todo:
            try:
                store.publish(app, version, folder, content_hash)
            except ReleaseError as err:
                raise MigrationRefused(str(err)) from None
    published = len(todo)
    notes = (f"left {len(unrecorded)} folder(s) no release_built entry records: {', '.join(unrecorded)}",) \
        if unrecorded else ()
    return Copied({"releases": published}, notes)


def _display_any(uri: str) -> str:
    try:
        return _display(uri)
    except Exception:  # noqa: BLE001 - not a database URL: show only its scheme and host
        from urllib.parse import urlsplit

        parts = urlsplit(uri)
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


@dataclass(frozen=True)
class Step:
    """One store's move. ``target``: the production store's address fit to print (never a password), None when
    the environment does not configure it (the step is skipped, and said so; ``variable`` names what would);
    ``run(source, target, dry_run, roots)``: the copy, a :class:`Copied`, raising :class:`MigrationRefused` with
    nothing written. ``roots``: the local folder this store's files were under and the URI they are under now:
    a Dagster metadata value naming a path under it is re-rooted (a dataset's ``path``)."""

    store: str
    variable: str
    target: Callable[[Any], str | None]
    run: Callable[[Any, Any, bool, dict[str, str]], Copied]
    roots: Callable[[Any, Any], dict[str, str]] = lambda source, target: {}


def _ledger_address(t: Any) -> str | None:
    from resources.ledger_store import LedgerStore

    return LedgerStore(t.ledger_url).display if t.ledger_url else None


def _mlflow_address(t: Any) -> str | None:
    if t.mlflow_tracking_uri == embedded_settings(t).mlflow_tracking_uri:
        return None
    return f"{_display_any(t.mlflow_tracking_uri)} + {t.mlflow_artifacts_url or '(no S3 artifact root)'}"


# In order: the ledger first (everything else is bound to it), Dagster after the stores its metadata names.
# Adding a store is one line here.
STEPS: tuple[Step, ...] = (
    Step("ledger", "ONEPATH_LEDGER_URL", _ledger_address, _run_ledger),
    Step("MLflow", "MLFLOW_TRACKING_URI", _mlflow_address, _run_mlflow,
         lambda s, t: {str(s.mlflow_artifact_root): t.mlflow_artifacts_url} if t.mlflow_artifacts_url else {}),
    Step("dataset snapshots", "ONEPATH_DATA_URL", lambda t: t.data_url, _run_datasets,
         lambda s, t: {str(s.data_dir): t.data_url}),
    Step("inference logs", "ONEPATH_INFERENCE_LOG_URL", lambda t: t.inference_log_url, _run_inference_logs),
    Step("outcomes", "ONEPATH_OUTCOMES_URL", lambda t: t.outcomes_url, _run_outcomes),
    Step("drift reports", "ONEPATH_DRIFT_REPORTS_URL", lambda t: t.drift_reports_url, _run_drift_reports,
         lambda s, t: {str(s.drift_reports_dir): _reports_root(t)}),
    Step("app releases", "ONEPATH_RELEASES_URL", lambda t: t.releases_url, _run_releases),
    Step("Dagster", "ONEPATH_DAGSTER_PG_*", lambda t: t.dagster_pg.address if t.dagster_pg else None, _run_dagster),
)
