"""``onepath register models:/NAME/VERSION``: a version already logged with plain MLflow, registered the way
``onepath.register`` registers a notebook's model (its train and test rows given as files)."""

from __future__ import annotations

import argparse
import re
import sys

import click

from platform_defs.cli_base import verb

URI_RE = re.compile(r"^models:/([a-z][a-z0-9_]{1,62})/(\d+)$")


def _frame(path: str):
    import pandas as pd

    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def cmd_register(args: argparse.Namespace) -> int:
    from platform_defs.notebook import NotebookError, register
    from platform_defs.settings import load_settings
    from platform_defs.wiring import build_resources

    m = URI_RE.match(args.uri)
    if not m:
        print(f"onepath register: '{args.uri}' is not models:/NAME/VERSION", file=sys.stderr)
        return 2
    name, version = m.groups()
    try:
        import mlflow.sklearn

        build_resources(load_settings())["mlflow"]._use()
        estimator = mlflow.sklearn.load_model(args.uri)
        train, test = _frame(args.train), _frame(args.test) if args.test else None
        out = register(estimator, train=train, test=test, label=args.label, name=args.name or name,
                       owner=args.owner, pii=args.pii or [], protected=args.protected or [],
                       id_column=args.id_column, identity=args.as_, key=args.key, declarations=args.declaration,
                       quiet=True)
    except NotebookError as err:
        print(f"onepath register: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"onepath register: {args.uri}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"{args.uri} registered as {out.name} version {out.version} (from MLflow version {version})")
    print("\n".join(str(out).splitlines()[1:]))
    return 0


@click.command("register")  # its help: platform_defs.cli.VERBS
@click.argument("uri")
@click.option("--train", required=True, help="the training rows (.parquet or .csv)")
@click.option("--test", help="the held-out rows the model never saw (.parquet or .csv)")
@click.option("--label", required=True)
@click.option("--owner", help="your team (default $ONEPATH_TEAM)")
@click.option("--name", help="the model's name on the platform (default: the MLflow name)")
@click.option("--pii", multiple=True)
@click.option("--protected", multiple=True)
@click.option("--id-column")
@click.option("--declaration", help="the declaration file to write (default assets/<owner>/defs.yaml)")
@click.option("--as", "as_", metavar="NAME", help="your identity (default $ONEPATH_IDENTITY)")
@click.option("--key", help="your private key file (default $ONEPATH_KEY)")
def register(**kw):  # noqa: ANN003
    return verb(cmd_register)(**kw)
