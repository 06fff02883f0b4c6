"""``onepath materialize ASSET... [--param k=v] [--follow/--no-follow]`` and ``onepath runs list|show|follow``.

Runs are submitted to the running platform (``onepath up``) through its GraphQL API and executed there, never
in this process; ``--follow`` (the default) shows each step and check as the run reports it, then its result.
Parameters are in the platform's terms (a dataset's generator parameters, ``version`` for an environment);
``platform_defs.run_params`` maps them to op config. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


def _client() -> Any:
    from platform_defs.instance_client import InstanceClient

    return InstanceClient.from_settings()


def describe(e: dict[str, Any]) -> str | None:
    """One line for a run event worth a person's attention, or None."""
    t = e["type"]
    if t == "AssetCheckEvaluationEvent":
        mark = "passed" if e["passed"] else ("FAILED" if e["severity"] == "ERROR" else "warned")
        return f"check {e['asset']}:{e['check']} {mark}" + (f": {e['description']}" if e.get("description") else "")
    if t == "MaterializationEvent":
        return f"materialized {e['asset']}"
    if t == "ExecutionStepFailureEvent":
        # a refusal is raised as dagster.Failure: its message is the platform's own line, not an internal class name
        first = (e.get("error") or [e["message"]])[0]
        return f"step {e['step']} FAILED: {re.sub(r'^dagster(?:[.][A-Za-z_]+)*[.]Failure: ', '', first)}"
    if t in ("ExecutionStepStartEvent",):
        return f"step {e['step']} started"
    if t in ("RunStartEvent", "RunSuccessEvent", "RunFailureEvent", "RunCanceledEvent"):
        return e["message"]
    return None


def follow_run(client: Any, run_id: str, *, as_json: bool) -> int:
    """Show the run's events as they come (Rich status line on a terminal), then its result; exit 0 on SUCCESS."""
    from rich.console import Console

    console = Console(stderr=as_json, highlight=False, soft_wrap=True)
    with console.status(f"run {run_id}: waiting for the platform to start it", spinner="dots") as status:
        def on_event(e: dict[str, Any]) -> None:
            line = describe(e)
            if line:
                console.print(line, markup=False)
            if e.get("step"):
                status.update(f"run {run_id}: {e['step']}")
        result = client.follow(run_id, on_event)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        failing = [c for c in result["checks"] if not c["passed"]]
        print(f"run {run_id}: {result['status']}"
              + (f"; {len(failing)} check(s) did not pass (onepath why <asset> says what to do)" if failing else ""))
    return 0 if result["status"] == "SUCCESS" else 1


@click.command("materialize")  # its help: platform_defs.cli.VERBS
@click.argument("assets", nargs=-1, required=True)
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="a parameter in the platform's terms")
@click.option("--follow/--no-follow", default=True, help="show the run's steps and checks until it ends (default)")
@click.option("--json", "as_json", is_flag=True, help="print the run (status, materializations, checks) as JSON")
def materialize(assets: tuple[str, ...], params: tuple[str, ...], follow: bool, as_json: bool) -> int:
    from platform_defs.instance_client import InstanceError, PlatformNotRunning
    from platform_defs.loader import load_organisation
    from platform_defs.policy import PolicyError
    from platform_defs.run_params import RunParamError, parse_params, run_config_for
    from platform_defs.specs import DeclarationError

    try:
        parsed = parse_params(params)
        run_config: dict[str, Any] = {}
        if parsed:
            org = load_organisation()
            for a in assets:
                ops = run_config_for(org, a, parsed).get("ops", {})
                run_config.setdefault("ops", {}).update(ops)
        client = _client()
        run_id = client.launch(list(assets), run_config=run_config,
                               tags={"onepath/trigger": "onepath materialize"})
        if not follow:
            print(json.dumps({"run_id": run_id}) if as_json else
                  f"submitted run {run_id} (onepath runs follow {run_id} shows it)")
            return 0
        if not as_json:
            print(f"submitted run {run_id} materializing {', '.join(assets)}")
        return follow_run(client, run_id, as_json=as_json)
    except (RunParamError, PlatformNotRunning, InstanceError, DeclarationError, PolicyError) as err:
        return _fail(str(err).splitlines()[0])


@click.group("runs")
def runs() -> None:
    pass  # its help: platform_defs.cli.VERBS (one place: `onepath --help` lists it without importing this module)


@runs.command("list", help="the newest runs: id, status, assets, trigger")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="the same rows as JSON objects")
def _list(limit: int, as_json: bool) -> int:
    from platform_defs.instance_client import InstanceError, PlatformNotRunning

    try:
        rows = _client().runs(limit)
    except (PlatformNotRunning, InstanceError) as err:
        return _fail(str(err))
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("RUN", "STATUS", "ASSETS", "TRIGGER"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["run_id"], r["status"], ", ".join(r["assets"]) or "-",
                      r["tags"].get("onepath/trigger") or r["tags"].get("dagster/sensor_name") or "-")
    Console(highlight=False).print(table)
    return 0


@runs.command("show", help="one run: status, what it materialized, each check with its result")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
def _show(run_id: str, as_json: bool) -> int:
    from platform_defs.instance_client import InstanceError, PlatformNotRunning

    try:
        r = _client().run(run_id)
    except (PlatformNotRunning, InstanceError) as err:
        return _fail(str(err))
    if as_json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"run {r['run_id']}: {r['status']}; assets {', '.join(r['assets']) or '-'}")
    for a in r["materializations"]:
        print(f"  materialized {a}")
    for c in r["checks"]:
        print(f"  check {c['asset']}:{c['check']} {'passed' if c['passed'] else 'FAILED'}"
              + (f": {c['description']}" if c.get("description") else ""))
    for f in r["failures"]:
        print(f"  step {f['step']} FAILED: {f['message']}")
    return 0 if r["status"] in ("SUCCESS", "STARTED", "QUEUED", "STARTING", "NOT_STARTED") else 1


@runs.command("follow", help="show a run's steps and checks as they happen, until it ends")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="print the finished run as JSON")
def _follow(run_id: str, as_json: bool) -> int:
    from platform_defs.instance_client import InstanceError, PlatformNotRunning

    try:
        return follow_run(_client(), run_id, as_json=as_json)
    except (PlatformNotRunning, InstanceError) as err:
        return _fail(str(err))
