"""``onepath migrate-declarations [PATH] [--check]``: old-form declaration files (``declarations: [...]``)
rewritten as Dagster components (``platform_defs.migrate``). ``--check`` writes nothing and exits 1 while a file
is still in the old form (CI).

``onepath migrate --to production [--dry-run]``: the embedded installation under ``$ONEPATH_HOME`` moved onto
the production stores the environment names, one step per store (``platform_defs.store_migration.STEPS``), one
line per store; the first refusal stops it (exit 1) naming the store and its address, never a password."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

from platform_defs.cli_base import verb


def cmd_migrate(args: argparse.Namespace) -> int:
    from platform_defs.loader import _rel, declarations_dir
    from platform_defs.migrate import migrate

    root = Path(args.path).resolve() if args.path else declarations_dir()
    if not root.is_dir():
        print(f"onepath migrate-declarations: declarations folder {root} does not exist", file=sys.stderr)
        return 1
    result = migrate(root, check=args.check)
    for line in result.refused:
        print(line, file=sys.stderr)
    for path in result.converted:
        print(f"{_rel(path)}: {'still in the old form' if args.check else 'converted to components'}")
    if args.check and (result.converted or result.refused):
        print(f"{len(result.converted) + len(result.refused)} file(s) in the old form: run "
              f"onepath migrate-declarations", file=sys.stderr)
        return 1
    if result.refused:
        return 1
    if not result.converted:
        print(f"ok: every declaration file in {_rel(root)} is in the component form")
    return 0


@click.command("migrate-declarations")  # its help: platform_defs.cli.VERBS
@click.argument("path", required=False)
@click.option("--check", is_flag=True, help="write nothing; exit 1 while a file is in the old form")
def migrate_declarations(**kw):  # noqa: ANN003
    return verb(cmd_migrate)(**kw)


# -- migrate --to production --------------------------------------------------------------------

HEARTBEAT_FRESH_SECONDS = 60  # a Dagster daemon beats every 30 s: one heard from within this is running


def platform_running(settings) -> str | None:  # noqa: ANN001
    """Why the embedded platform is not stopped (one line), or None: ``onepath up`` running (its pid file under
    run_dir), an endpoint environment's supervisor not stopped (``onepath down`` stops them), or a Dagster
    daemon of the embedded instance that beat within the last minute (started some other way)."""
    import json
    import tempfile
    import time

    from platform_defs.store_migration import sqlite_instance
    from resources.deployers.local import LocalProcessDeployer
    from resources.processes import group_alive, pid_alive

    up = settings.run_dir / "up.json"
    try:
        facts = json.loads(up.read_text())
    except (OSError, ValueError):
        facts = None
    if isinstance(facts, dict):
        if pid_alive(int(facts.get("pid") or 0)) or group_alive(int(facts.get("dagster_pgid") or 0)):
            return f"onepath up is running (pid {facts.get('pid')}, {up}): stop it first"
    if settings.run_dir.is_dir():
        live = LocalProcessDeployer(settings.run_dir).live_slots()
        if live:
            return (f"endpoint environment(s) {', '.join(live)} may still be serving and logging: stop them first "
                    f"(onepath down)")
    if (settings.dagster_home / "history" / "runs.db").exists():
        from resources.files import private_dir

        with tempfile.TemporaryDirectory(dir=private_dir(settings.run_dir / "migrate")) as scratch:
            instance = sqlite_instance(settings.dagster_home, Path(scratch))
            try:
                beats = instance.get_daemon_heartbeats()
            finally:
                instance.dispose()
        newest = max((b.timestamp for b in beats.values()), default=None)
        if newest is not None and time.time() - newest < HEARTBEAT_FRESH_SECONDS:
            return (f"a Dagster daemon of the instance in {settings.dagster_home} beat {time.time() - newest:.0f} s "
                    f"ago: stop it first (or wait a minute after it stopped)")
    return None


def cmd_migrate_stores(args: argparse.Namespace) -> int:
    from platform_defs.settings import load_settings
    from platform_defs.store_migration import STEPS, MigrationFailed, MigrationRefused, embedded_settings

    target = load_settings()
    source = embedded_settings(target)
    try:
        why = platform_running(source)
    except Exception as err:  # noqa: BLE001 - a Dagster instance that cannot be opened: its one line, no traceback
        print(f"onepath migrate: cannot tell whether the embedded platform is stopped (its Dagster instance in "
              f"{source.dagster_home}: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]})",
              file=sys.stderr)
        return 1
    if why:
        print(f"onepath migrate: {why}: the platform must be stopped while its stores move", file=sys.stderr)
        return 1
    configured = [(step, step.target(target)) for step in STEPS]
    roots: dict[str, str] = {}
    for step, where in configured:
        if where is not None:
            roots.update(step.roots(source, target))
    print(f"onepath migrate: the embedded installation in {source.home} onto the production stores"
          f"{' (dry run: nothing is written)' if args.dry_run else ''}")
    for step, where in configured:
        if where is None:
            print(f"{step.store}: not configured ({step.variable} is not set): skipped")
            continue
        try:
            done = step.run(source, target, args.dry_run, roots)
        except MigrationRefused as err:
            print(f"onepath migrate: {step.store} at {where}: refused: {err}", file=sys.stderr)
            return 1
        except MigrationFailed as err:
            print(f"onepath migrate: {step.store} at {where}: {err}", file=sys.stderr)
            return 1
        except Exception as err:  # a store that does not answer, a bucket that is not there: its one line
            first = (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0][:300]
            for secret in _secrets(target):
                first = first.replace(secret, "***")
            print(f"onepath migrate: {step.store} at {where}: failed: {type(err).__name__}: {first}",
                  file=sys.stderr)
            return 1
        print(f"{step.store} -> {where}: {done.summary(args.dry_run)}", flush=True)
    return 0


def _secrets(target) -> list[str]:  # noqa: ANN001
    """The passwords the production settings hold: never printed, should a driver ever echo one."""
    from sqlalchemy.engine import make_url

    out = [target.dagster_pg.password] if target.dagster_pg else []
    for url in (target.ledger_url, target.mlflow_tracking_uri):
        try:
            password = make_url(url).password if url else None
        except Exception:  # noqa: BLE001 - not a database URL
            password = None
        if password:
            out.append(str(password))
    return [s for s in out if s]


@click.command("migrate")  # its help: platform_defs.cli.VERBS
@click.option("--to", "to", type=click.Choice(["production"]), required=True,
              help="production: the stores the environment names (ONEPATH_LEDGER_URL, MLFLOW_TRACKING_URI, ...)")
@click.option("--dry-run", is_flag=True, help="write nothing; say what would be copied")
def migrate_stores(**kw):  # noqa: ANN003
    return verb(cmd_migrate_stores)(**kw)
