"""``onepath card MODEL [--version V] [--html FILE]``: the model card of a version, as the platform wrote it.

Each deploy writes the version's card (Markdown and HTML) into its MLflow run under ``onepath/model_card/``.
Without ``--version`` the card is the one of the version the ledger last recorded deploying, in the furthest
environment it reached (prod before staging). The card names the ledger entries it rests
on; ``onepath audit verify`` is what says that ledger is whole. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _fail(msg: str) -> int:
    print(f"onepath card: {msg}", file=sys.stderr)
    return 1


def deployed_version(book, org, model: str) -> tuple[str, str] | None:
    """``(version, env)`` of the newest deploy of ``model``'s endpoints in the furthest environment it reached
    (the endpoints' own environment order: prod before staging)."""
    endpoints = [d for d in org.of_kind("endpoint") if getattr(d, "model", None) == model]
    names = {d.name for d in endpoints}
    order = list(dict.fromkeys(env for d in endpoints for env in d.environments))
    deploys = [e for e in book.entries(kind="deploy") if e.subject in names and e.data.get("version")]
    for env in reversed(order):
        here = [e for e in deploys if e.env == env]
        if here:
            return str(here[-1].data["version"]), env
    return None


def cmd_card(args: argparse.Namespace) -> int:
    from platform_defs.loader import load_governed
    from platform_defs.policy import PolicyError
    from platform_defs.settings import load_settings
    from platform_defs.specs import DeclarationError

    try:
        org, policy = load_governed()
    except (DeclarationError, PolicyError) as err:
        return _fail(str(err).splitlines()[0])
    spec = org.by_name.get(args.model)
    if spec is None or spec.kind != "model":
        models = ", ".join(sorted(d.name for d in org.of_kind("model"))) or "none"
        return _fail(f"no model '{args.model}' is declared (models: {models})")
    from platform_defs.wiring import build_resources

    resources = build_resources(load_settings())
    version, where = args.version, None
    if version is None:
        found = deployed_version(resources["ledger"].ledger(), org, spec.name)
        if found is None:
            return _fail(f"no version of {spec.name} was ever deployed, so no card was written; "
                         f"name one with --version")
        version, where = found
    from mlflow.exceptions import MlflowException

    from platform_defs.governance.model_card import card_file_stem

    mlflow = resources["mlflow"]
    try:
        mv = mlflow.get_version(spec.name, version)
    except MlflowException:
        return _fail(f"{spec.name} has no version {version}")
    stem = card_file_stem(argparse.Namespace(model=spec.name, version=version))
    import mlflow.artifacts as artifacts

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = artifacts.download_artifacts(run_id=mv.run_id, artifact_path="onepath/model_card",
                                                 dst_path=tmp, tracking_uri=mlflow.tracking_uri)
        except (MlflowException, OSError):
            return _fail(f"{spec.name} version {version} has no model card: a card is written when a version "
                         f"is deployed")
        md, page = Path(local) / f"{stem}.md", Path(local) / f"{stem}.html"
        if not md.is_file():
            return _fail(f"{spec.name} version {version} has no model card: a card is written when a version "
                         f"is deployed")
        if args.html:
            if not page.is_file():
                return _fail(f"{spec.name} version {version}'s card has no HTML page ({page.name}) in its run")
            Path(args.html).write_bytes(page.read_bytes())
        print(f"# {spec.name} version {version}" + (f" (last deployed to {where})" if where else "")
              + f": the card in MLflow run {mv.run_id}, onepath/model_card/{md.name}", file=sys.stderr)
        print(md.read_text(), end="")
    return 0


import click  # noqa: E402

from platform_defs.cli_base import verb  # noqa: E402


@click.command("card")  # its help: platform_defs.cli.VERBS
@click.argument("model")
@click.option("--version", help="the model version (default: the one last deployed, furthest environment first)")
@click.option("--html", metavar="FILE", help="also write the card's standalone HTML page to FILE")
def card(**kw):  # noqa: ANN003
    return verb(cmd_card)(**kw)
