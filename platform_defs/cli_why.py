"""``onepath why ASSET [--env ENV] [--json]``: why an asset's checks did not pass, and what to do next.

Reads the latest evaluation of each of the asset's checks from the running platform, and prints each one that
failed with its numbers (the check's metadata), its description and the next step in the user's terms (for an
approval: who may approve and the exact command). ``--env prod`` with an endpoint or app name means its
``<name>_prod`` asset. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

_NOT_NUMBERS = {"verdict", "command", "approvers"}


def next_step(c: dict[str, Any]) -> str:
    """What to do about a failing check, in the user's terms."""
    md = c["metadata"]
    if md.get("command"):
        who = md.get("approvers")
        return (f"ask {who} to run: {md['command']}" if who and c["check"] == "approval" else f"run: {md['command']}")
    if c["check"] in ("expectations", "data_quality"):
        return f"fix the data (the failures above), then: onepath materialize {c['asset']}"
    if c["check"] in ("performance", "fairness", "explainability"):
        return "train a better version (or change the threshold in the declaration), then materialize again"
    return f"fix what the check says, then: onepath materialize {c['asset']}"


@click.command("why")  # its help: platform_defs.cli.VERBS
@click.argument("asset")
@click.option("--env", help="an endpoint's or app's environment: `why credit_scoring --env prod` is "
                            "`why credit_scoring_prod`")
@click.option("--json", "as_json", is_flag=True, help="every check of the latest evaluation as JSON objects")
def why(asset: str, env: str | None, as_json: bool) -> int:
    from platform_defs.instance_client import InstanceClient, InstanceError, PlatformNotRunning, \
        latest_check_evaluations

    name = f"{asset}_{env}" if env and not asset.endswith(f"_{env}") else asset
    try:
        checks = latest_check_evaluations(InstanceClient.from_settings(), name)
    except (PlatformNotRunning, InstanceError) as err:
        print(f"onepath: {err}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps([{**c, "next": None if c["passed"] is not False else next_step(c)} for c in checks],
                         indent=2, default=str))
        return 0
    failing = [c for c in checks if c["passed"] is False]
    never = [c["check"] for c in checks if c["passed"] is None]
    if not checks:
        print(f"{name} has no checks")
        return 0
    running = sorted({c["running"] for c in checks if c.get("running")})
    if running:  # what follows is the latest result; a newer attempt has not given one yet
        print(f"{name}: run {', '.join(running)} is evaluating it again now (onepath runs follow {running[0]})")
    # a newer run that failed before evaluating any of the asset's checks (a run that evaluated some, then
    # stopped, is shown below by what it evaluated): what follows is older than it
    shown = {c["run_id"] for c in checks}
    broke = sorted({c["failed_since"] for c in checks if c.get("failed_since") and c["failed_since"] not in shown})
    if broke:
        print(f"{name}: run {', '.join(broke)} failed before evaluating its checks, so the results below are from "
              f"before it (onepath runs show {broke[0]} says why)")
    if not failing and not broke:
        print(f"{name}: every check of its latest evaluation passed"
              + (f" ({', '.join(never)} never ran: onepath materialize {name})" if never else ""))
        return 0
    for c in failing:
        print(f"{name}:{c['check']} FAILED (run {c['run_id']})")
        if c.get("description"):
            print(f"  checks: {c['description']}")
        verdict = c["metadata"].get("verdict") or c.get("summary")
        if verdict:
            print(f"  says: {verdict}")
        numbers = {k: v for k, v in c["metadata"].items() if k not in _NOT_NUMBERS}
        for k, v in numbers.items():
            text = str(v).strip().replace("\n", "\n    ")
            print(f"  {k}: {text}")
        print(f"  next: {next_step(c)}")
    if never:
        print(f"never ran: {', '.join(never)}")
    return 1
