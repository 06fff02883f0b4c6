"""``onepath migrate-declarations [PATH] [--check]``: old-form declaration files (``declarations: [...]``)
rewritten as Dagster components (``platform_defs.migrate``). ``--check`` writes nothing and exits 1 while a file
is still in the old form (CI)."""

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
