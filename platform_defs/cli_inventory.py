"""``onepath inventory [--env ENV] [--json]``: what is in production, in one call.

Every endpoint and app release per environment: the version the ledger records, its approvals,
gate verdict, lineage and deploy time, and what its server answers now (asked in parallel). A
mismatch between recorded and live shows in the table as ``MISMATCH live=3 recorded=2``.

Errors are one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys

from platform_defs.settings import load_settings


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


def cmd_inventory(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from platform_defs.inventory import build_inventory, summarize, text_table
    from platform_defs.loader import load_governed
    from platform_defs.policy import PolicyError
    from platform_defs.specs import AppSpec, DeclarationError, EndpointSpec
    from platform_defs.wiring import build_resources

    try:
        org, policy = load_governed()
    except (DeclarationError, PolicyError) as err:
        return _fail(str(err).splitlines()[0])
    envs = sorted({e for d in org.by_name.values() if isinstance(d, (EndpointSpec, AppSpec))
                   for e in d.environments})
    if args.env is not None and args.env not in envs:
        return _fail(f"no endpoint or app has an environment '{args.env}' (environments: {', '.join(envs) or 'none'})")
    if args.timeout <= 0:
        return _fail(f"--timeout must be positive (got {args.timeout})")
    resources = build_resources(load_settings())
    try:
        rows = build_inventory(org, policy, resources["mlflow"], resources["ledger"].ledger(),
                               resources["deployer_local"].deployer(), env=args.env, timeout=args.timeout)
    except (MlflowException, sqlite3.Error, OSError) as err:
        first = (str(err).splitlines() or [""])[0]
        return _fail(f"inventory failed: {type(err).__name__}: {first}")
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    if not rows:
        print("no endpoint or app release is declared")
        return 0
    print(text_table(rows))
    counts = summarize(rows)
    print(f"\n{counts['total']} rows: {counts['serving']} answering, {counts['mismatches']} mismatch(es), "
          f"{counts['unhealthy']} down, {counts['unrecorded']} unrecorded, {counts['not_deployed']} not deployed")
    return 0


import click  # noqa: E402

from platform_defs.cli_base import verb  # noqa: E402


@click.command("inventory", help="every endpoint and app release per environment: recorded version, approvals, "
                                 "gates, lineage, and what answers live")
@click.option("--env", help="only this environment (e.g. prod)")
@click.option("--json", "json", is_flag=True, help="one JSON object per row instead of a table")
@click.option("--timeout", type=float, default=1.0, metavar="S",
              help="seconds to wait for each server's /health and /version (default 1.0)")
def inventory(**kw):  # noqa: ANN003
    return verb(cmd_inventory)(**kw)
