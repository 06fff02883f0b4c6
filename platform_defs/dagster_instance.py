"""The Dagster instance's ``$DAGSTER_HOME/dagster.yaml``, chosen by settings alone.

* Embedded (the default, no ``ONEPATH_DAGSTER_PG_*`` set): run, event-log and schedule storage are sqlite files in
  ``$DAGSTER_HOME`` (Dagster's defaults). The file is exactly what onepath has always written.
* Production (``ONEPATH_DAGSTER_PG_*`` set, see ``settings.DagsterPostgres``): runs, event logs and schedules on
  PostgreSQL through dagster-postgres, a queued run coordinator, and Dagster's concurrency pools with a default
  limit of 1 (each promotion asset has its own pool, ``specs.promotion_pool``, so Dagster itself keeps two
  promotions of one endpoint environment from running at once; the ledger's promotion lease stays the guarantee).
  Every connection value is an ``{env: VAR}`` reference: no password is ever in the file, and each process that
  loads it (webserver, daemon, run workers, on any host) reads the values from its own environment.

The run queue's limit is ``concurrency: runs: max_concurrent_runs``, not ``run_queue: max_concurrent_runs``:
Dagster 1.13 refuses a ``run_queue`` limit beside a ``concurrency`` block (``runs`` or ``pools``), and the pools
must be under ``concurrency``, so every limit is there and ``run_queue`` keeps only how the queue retries.

onepath writes the file when it is missing, or when the file there is one onepath wrote (the same text, byte for
byte): an operator's own ``dagster.yaml``, or one of ours edited by hand, is never overwritten.
"""

from __future__ import annotations

import re
from pathlib import Path

from platform_defs.settings import DagsterPostgres, Settings, SettingsError
from resources.files import atomic_write

EMBEDDED_YAML = """\
# onepath's embedded default instance: run, event-log and schedule storage are sqlite files in
# this folder (Dagster's defaults). A shared instance puts storage on Postgres instead.
telemetry:
  enabled: false
run_monitoring:
  enabled: true
sensors:
  use_threads: true
  num_workers: 4
"""

_PRODUCTION_YAML = """\
# onepath's production instance: runs, event logs and schedules on PostgreSQL (dagster-postgres). Each
# value below is read from the environment of the process that loads this file (the webserver, the
# daemon, every run worker, on every host): no password is written here. onepath rewrites this file
# only while it is exactly as onepath wrote it; edit it and it is yours.
telemetry:
  enabled: false
storage:
  postgres:
    postgres_db:
      hostname:
        env: ONEPATH_DAGSTER_PG_HOST
      port:
        env: ONEPATH_DAGSTER_PG_PORT
      username:
        env: ONEPATH_DAGSTER_PG_USER
      password:
        env: ONEPATH_DAGSTER_PG_PASSWORD
      db_name:
        env: ONEPATH_DAGSTER_PG_DB
      # the driver onepath installs (psycopg2-binary): SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
      scheme: postgresql+psycopg2
# the queued run coordinator: the daemon launches submitted runs within the limits under
# `concurrency` (Dagster refuses a run_queue limit beside that block)
run_queue:
  max_user_code_failure_retries: 3
  user_code_failure_retry_delay: 10
concurrency:
  runs:
    max_concurrent_runs: {max_concurrent_runs}  # ONEPATH_DAGSTER_MAX_CONCURRENT_RUNS
  pools:
    # a pool without a limit of its own (every promotion.<name>.<env> pool) runs one op at a time
    granularity: op
    default_limit: 1
run_monitoring:
  enabled: true
sensors:
  use_threads: true
  num_workers: 4
"""


def production_yaml(pg: DagsterPostgres) -> str:
    """The production ``dagster.yaml`` for these settings (only the run limit is a value; the rest names variables)."""
    return _PRODUCTION_YAML.format(max_concurrent_runs=pg.max_concurrent_runs)


def instance_yaml(settings: Settings) -> str:
    """The ``dagster.yaml`` these settings choose."""
    return production_yaml(settings.dagster_pg) if settings.dagster_pg else EMBEDDED_YAML


def written_by_onepath(text: str) -> str | None:
    """``"embedded"`` or ``"production"`` if ``text`` is exactly a file onepath writes; None for anyone else's."""
    if text == EMBEDDED_YAML:
        return "embedded"
    limit = re.search(r"^    max_concurrent_runs: (-?\d+)  #", text, re.MULTILINE)
    if limit and text == _PRODUCTION_YAML.format(max_concurrent_runs=int(limit.group(1))):
        return "production"
    return None


def ensure_instance(settings: Settings) -> Path:
    """Create the home's folders and ``$DAGSTER_HOME/dagster.yaml`` for ``settings`` if it is missing or onepath's
    own; its path. A file of anyone else's is left as it is. A production file of onepath's is never turned back
    into the embedded one because the ``ONEPATH_DAGSTER_PG_*`` variables are missing (a host without them would
    quietly run on its own sqlite instance beside the shared one): that raises ``SettingsError`` instead."""
    settings.ensure_dirs()
    path = settings.dagster_home / "dagster.yaml"
    wanted = instance_yaml(settings)
    if path.is_symlink():
        return path  # someone pointed it elsewhere on purpose
    if path.exists():
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            return path  # not ours to judge, nor to replace
        ours = written_by_onepath(current)
        if ours is None or current == wanted:
            return path
        if ours == "production" and settings.dagster_pg is None:
            raise SettingsError(f"{path} keeps the Dagster instance on PostgreSQL but ONEPATH_DAGSTER_PG_* are not "
                                "set here: set them (every host needs them), or remove the file for the embedded "
                                "instance")
    atomic_write(path, wanted.encode())
    return path
