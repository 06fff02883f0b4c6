"""``onepath register models:/NAME/VERSION``: a version already logged with plain MLflow becomes the platform's
version, adopted and not copied (``platform_defs.notebook.adopt``): the same refusals and checks as
``onepath.register`` from a notebook (its train and test rows given as files), onepath's artifacts and tags put on
that version's run, and that version signed, recorded in the ledger and pinned in the declaration."""

from __future__ import annotations

import argparse
import re
import shlex
import sys

import click

from platform_defs.cli_base import verb

URI_RE = re.compile(r"^models:/([a-z][a-z0-9_]{1,62})/(\d+)$")


def _frame(path: str):
    import pandas as pd

    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def cmd_register(args: argparse.Namespace) -> int:
    from platform_defs.notebook import NotebookError, adopt

    m = URI_RE.match(args.uri)
    if not m:
        print(f"onepath register: '{args.uri}' is not models:/NAME/VERSION", file=sys.stderr)
        return 2
    name, version = m.groups()
    if args.name and args.name != name:
        print(f"onepath register: {args.uri} is adopted under its MLflow name '{name}', not copied to "
              f"'{args.name}': drop --name (or log the model under '{args.name}' with MLflow)", file=sys.stderr)
        return 2
    # the code record of an adopted version names how it was registered (its own code onepath never saw)
    invocation = shlex.join(["onepath", "register", args.uri, "--train", args.train]
                            + (["--test", args.test] if args.test else []) + ["--label", args.label])
    try:
        train, test = _frame(args.train), _frame(args.test) if args.test else None
        out = adopt(name, version, train=train, test=test, label=args.label, owner=args.owner,
                    pii=args.pii or [], protected=args.protected or [], id_column=args.id_column,
                    identity=args.as_, key=args.key, declarations=args.declaration, quiet=True,
                    invocation=invocation)
    except NotebookError as err:
        print(f"onepath register: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"onepath register: {args.uri}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"{args.uri} adopted: registered as {out.name} version {out.version}, pinned in {out.declaration}")
    print("\n".join(str(out).splitlines()[1:]))
    return 0


@click.command("register")  # its help: platform_defs.cli.VERBS
@click.argument("uri")
@click.option("--train", required=True, help="the training rows (.parquet or .csv)")
@click.option("--test", help="the held-out rows the model never saw (.parquet or .csv)")
@click.option("--label", required=True)
@click.option("--owner", help="your team (default $ONEPATH_TEAM)")
@click.option("--name", help="the model's name on the platform: the MLflow name (the version is adopted, not copied)")
@click.option("--pii", multiple=True)
@click.option("--protected", multiple=True)
@click.option("--id-column")
@click.option("--declaration", help="the declaration file to write (default assets/<owner>/defs.yaml)")
@click.option("--as", "as_", metavar="NAME", help="your identity (default $ONEPATH_IDENTITY)")
@click.option("--key", help="your private key file (default $ONEPATH_KEY)")
def register(**kw):  # noqa: ANN003
    return verb(cmd_register)(**kw)
