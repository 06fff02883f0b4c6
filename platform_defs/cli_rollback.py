"""``onepath rollback ENDPOINT --env ENV [--to VERSION] --reason "..." [--as NAME]``.

Redeploys the previous governed version (or ``--to VERSION``, which must have served that environment
before and still pass its gate there, with its registered digest) at the environment's stable address, moves the MLflow alias and records the rollback in the
ledger. Errors are one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


def default_actor() -> str:
    """``$ONEPATH_IDENTITY``, else the OS user."""
    ident = os.environ.get("ONEPATH_IDENTITY", "").strip()
    if ident:
        return ident
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def cmd_rollback(args: argparse.Namespace) -> int:
    from platform_defs.policy import PolicyError
    from platform_defs.promotion import PromotionError, Services, roll_back
    from platform_defs.settings import load_settings
    from platform_defs.specs import DeclarationError

    if not args.env:
        return _fail("say which environment to roll back: --env ENV")
    if not (args.reason or "").strip():
        return _fail(f"a rollback needs a reason: onepath rollback {args.endpoint} --env {args.env} --reason \"...\"")
    actor = (args.as_ or "").strip() or default_actor()
    try:
        from platform_defs.wiring import build_resources
        from platform_defs.loader import load_governed

        org, policy = load_governed()
    except (DeclarationError, PolicyError) as err:
        return _fail(str(err).splitlines()[0])
    resources = build_resources(load_settings())
    try:
        result = roll_back(org, policy, args.endpoint, args.env, to_version=args.to, reason=args.reason, actor=actor,
                           services=Services(mlflow=resources["mlflow"], deployer=resources["deployer_local"].deployer(),
                                             ledger=resources["ledger"].ledger(), data_store=resources["data_store"],
                                             ))
    except PromotionError as err:
        return _fail(str(err))
    print(result.summary())
    return 0


import click  # noqa: E402

from platform_defs.cli_base import verb  # noqa: E402


@click.command("rollback")  # its help: platform_defs.cli.VERBS
@click.argument("endpoint")
@click.option("--env", help="environment to roll back (e.g. prod); required")
@click.option("--to", metavar="VERSION",
              help="version to restore (must have been deployed to ENV before); default: the previous one")
@click.option("--reason", help="why; recorded in the ledger; required")
@click.option("--as", "as_", metavar="NAME", help="who rolls back (default $ONEPATH_IDENTITY, else the OS user)")
def rollback(**kw):  # noqa: ANN003
    return verb(cmd_rollback)(**kw)
