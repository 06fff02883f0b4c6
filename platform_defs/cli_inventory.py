"""``onepath inventory [--env ENV] [--json]``: what is in production, in one call.

Every endpoint and app release per environment: the version the ledger records, its approvals,
gate verdict, lineage and deploy time, and what its server answers now (asked in parallel). A
mismatch between recorded and live shows in the table as ``MISMATCH live=3 recorded=2``.

Errors are one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from platform_defs.settings import load_settings


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


class _Registry:
    """The MLflow registry, opened only if the inventory asks it something (the ledger lacks a deploy entry
    or a registration): a fresh ``onepath inventory`` of versions registered through the platform never
    imports MLflow or Dagster."""

    def __init__(self, settings: Any):
        self.settings = settings

    def client(self) -> Any:
        from platform_defs.wiring import build_resources

        return build_resources(self.settings)["mlflow"].client()


def _load_error(err: BaseException) -> bool:
    """Whether ``err`` is a declaration's or the policy's one-line error. Looked up, not imported: both modules
    import pydantic, which an inventory of an unchanged organisation never needs."""
    specs, policy = sys.modules.get("platform_defs.specs"), sys.modules.get("platform_defs.policy")
    return ((specs is not None and isinstance(err, specs.DeclarationError))
            or (policy is not None and isinstance(err, policy.PolicyError)))


def cmd_inventory(args: argparse.Namespace) -> int:
    from platform_defs.inventory import inventory_of, summarize, text_table
    from platform_defs.inventory_cache import load_subjects
    from resources.deployers.local import from_config, settings_config
    from resources.ledger import STORE_ERRORS, store_error_text

    settings = load_settings()
    try:
        # the organisation's endpoints and apps as the last run found them when nothing they come from changed
        # (platform_defs.inventory_cache), else from a load (which imports no trainer: onepath validate does)
        subjects = load_subjects(settings.home)
    except Exception as err:
        if not _load_error(err):
            raise
        return _fail(str(err).splitlines()[0])
    envs = sorted({s.env for s in subjects})
    if args.env is not None and args.env not in envs:
        return _fail(f"no endpoint or app has an environment '{args.env}' (environments: {', '.join(envs) or 'none'})")
    if args.timeout <= 0:
        return _fail(f"--timeout must be positive (got {args.timeout})")
    book = settings.ledger()
    try:
        rows = inventory_of(subjects, _Registry(settings), book, from_config(**settings_config(settings)),
                            env=args.env, timeout=args.timeout)
    except STORE_ERRORS as err:
        return _fail(f"inventory failed: the ledger {book.location}: {store_error_text(err)}")
    except OSError as err:
        return _fail(f"inventory failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    except Exception as err:  # MLflow's errors, without importing MLflow to name them
        if type(err).__module__.split(".")[0] != "mlflow":
            raise
        return _fail(f"inventory failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    if args.json:
        print(json.dumps([r.as_dict() for r in rows]))  # no indent: json's C encoder (indent takes the Python one)
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

# the keys of each --json object, in order (InventoryRow.as_dict; tests/test_inventory.py holds them equal):
# named here so that `onepath --help` does not import the inventory
JSON_KEYS = ("name", "kind", "env", "track", "owner", "model", "recorded_version", "version_source",
             "deployed_at", "deployed_by", "deploy_entry", "previous_version", "approvals", "approval_required",
             "gate", "lineage", "address", "live_version", "registered_digest", "live_digest", "healthy", "agrees",
             "digest_agrees", "notes", "state", "mismatch")


@click.command("inventory")  # its help: platform_defs.cli.VERBS
@click.option("--env", help="only this environment (e.g. prod)")
@click.option("--json", "json", is_flag=True,
              help="print a JSON array instead of the table, one object per row with the keys "
                   + ", ".join(JSON_KEYS))
@click.option("--timeout", type=float, default=1.0, metavar="S",
              help="seconds to wait for each server's /version (all asked at once; default 1.0)")
def inventory(**kw):  # noqa: ANN003
    return verb(cmd_inventory)(**kw)
