"""``onepath promote <model|endpoint|app> --to ENV [--version N] [--json]``: through each environment in order.

Each environment up to ``--to`` is a run submitted to the running platform (its ``<name>_<env>`` asset with
``version`` as its parameter), skipped where that environment already serves the version; each check is shown
as it passes or fails. On success: the stable address and a ready ``curl`` line reading the caller's credential
through a file descriptor (issued with the Access API for the platform's own caller ``onepath-cli``). On a
refusal: each failing check with its numbers and what to do next (who must approve, the exact command).
Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


def _newest_release(settings: Any, app: str, ledger: Any) -> tuple[str, str, list[str]]:
    from resources.object_store import ObjectStoreError
    from resources.release_store import ReleaseError

    try:
        known = settings.releases.versions(app, ledger)
    except (ReleaseError, ObjectStoreError) as err:
        raise click.ClickException(str(err)) from None
    if not known:
        raise click.ClickException(f"app '{app}' has no built release yet: onepath materialize {app}")
    return known[0], "the newest built release", []


def _resolve(org: Any, name: str) -> Any:
    decl = org.by_name.get(name)
    if decl is not None and decl.kind in ("endpoint", "app"):
        return decl
    serving = [d for d in org.of_kind("endpoint") if getattr(d, "model", None) == name]
    if len(serving) == 1:
        return serving[0]
    if len(serving) > 1:
        raise click.ClickException(f"model '{name}' is served by {', '.join(d.name for d in serving)}: name the "
                                   f"endpoint to promote")
    raise click.ClickException(f"no endpoint, app or served model is named '{name}' (onepath inventory lists them)")


def _launch_version(client: Any, org: Any, decl: Any, asset: str, version: str) -> str:
    """Submit ``asset`` deploying exactly ``version``: an endpoint's environment takes it as its ``version``; an
    app's deploys what the environment before it serves (its first, the newest build), which the caller checks."""
    from platform_defs.run_params import run_config_for

    tags = {"onepath/trigger": "onepath promote", "onepath/requested_version": version}
    config = run_config_for(org, asset, {"version": version}) if decl.kind == "endpoint" else None
    return client.launch([asset], run_config=config, tags=tags)


@click.command("promote")  # its help: platform_defs.cli.VERBS
@click.argument("name")
@click.option("--to", "to", required=True, metavar="ENV", help="the last environment (e.g. prod)")
@click.option("--version", metavar="N", help="the version or release (default: what the platform says to deploy)")
@click.option("--json", "as_json", is_flag=True, help="the result (each environment's run and checks) as JSON")
def promote(name: str, to: str, version: str | None, as_json: bool) -> int:
    from platform_defs.access import CLI_CALLER
    from platform_defs.cli_runs import describe
    from platform_defs.cli_why import next_step
    from platform_defs.instance_client import InstanceClient, InstanceError, PlatformNotRunning
    from platform_defs.loader import load_organisation
    from platform_defs.policy import PolicyError
    from platform_defs.settings import load_settings
    from platform_defs.specs import DeclarationError, endpoint_asset_name
    from platform_defs.wiring import build_resources
    from resources.deployers.base import Target, serving_version

    try:
        org = load_organisation()
    except (DeclarationError, PolicyError) as err:
        return _fail(str(err).splitlines()[0])
    decl = _resolve(org, name)
    if to not in decl.environments:
        return _fail(f"'{to}' is not an environment of {decl.name} (environments: {', '.join(decl.environments)})")
    settings = load_settings()
    resources = build_resources(settings)
    deployer = resources["deployer_local"].deployer()
    why, newer = "named with --version", []
    if version is None:
        if decl.kind == "endpoint":
            from platform_defs.notebook import NotebookError, version_to_promote

            try:
                version, why, newer = version_to_promote(org, decl.model, resources["ledger"].ledger(),
                                                         resources["mlflow"])
            except NotebookError as err:
                return _fail(str(err))
        else:
            version, why, newer = _newest_release(settings, decl.name,
                                                  resources["ledger"].ledger() if settings.releases_url else None)
    say = (lambda *a: None) if as_json else print
    say(f"promoting {decl.name} {'version' if decl.kind == 'endpoint' else 'release'} {version} ({why}) to "
        f"{', '.join(decl.environments[:decl.environments.index(to) + 1])}")
    for v in newer:
        say(f"note: version {v} exists and is NOT deployed (onepath promote {name} --to {to} --version {v} "
            f"deploys it)")
    client = InstanceClient.from_settings()
    out: dict[str, Any] = {"name": decl.name, "version": version, "why": why, "newer": newer, "environments": []}
    try:
        client.ensure_assets([endpoint_asset_name(decl.name, env)
                              for env in decl.environments[:decl.environments.index(to) + 1]])
        for env in decl.environments[:decl.environments.index(to) + 1]:
            target = Target(decl.name, env, decl.kind, decl.ports.get(env))
            if serving_version(deployer.status(target)) == version:
                say(f"{env}: already serves {version}")
                out["environments"].append({"env": env, "skipped": "already serves it"})
                continue
            asset = endpoint_asset_name(decl.name, env)
            run_id = _launch_version(client, org, decl, asset, version)
            say(f"{env}: run {run_id}")

            def on_event(e: dict[str, Any]) -> None:
                line = describe(e) if e["type"] in ("AssetCheckEvaluationEvent", "ExecutionStepFailureEvent") \
                    else None
                if line:
                    say(f"  {line}")
            result = client.follow(run_id, on_event)
            out["environments"].append({"env": env, "run_id": run_id, "status": result["status"],
                                        "checks": result["checks"]})
            failing = [c for c in result["checks"] if not c["passed"]]
            if result["status"] != "SUCCESS" or failing:
                out["refused"] = env
                if as_json:
                    print(json.dumps(out, indent=2, default=str))
                    return 1
                print(f"{decl.name} did not reach {env}:")
                for c in failing:
                    md = c["metadata"] or {}
                    print(f"  {c['check']}: {md.get('verdict') or c.get('description') or 'failed'}")
                    print(f"    next: {next_step(c)}")
                for f in result["failures"] if not failing else []:
                    print(f"  step {f['step']}: {f['message']}")
                return 1
            served = serving_version(deployer.status(target))
            if served != version:  # what the run deployed is not what was asked: said, never substituted silently
                out["refused"] = env
                return _fail(f"{decl.name}.{env} serves {served or 'nothing'} after run {run_id}, not {version}: "
                             f"nothing further is promoted (onepath runs show {run_id})")
        st = deployer.status(Target(decl.name, to, decl.kind, decl.ports.get(to)))
        out["address"] = st.address
        if decl.kind == "endpoint":
            from platform_defs.access import access_for

            access = access_for(settings, actor="onepath promote")
            access.caller_token(org, CLI_CALLER, decl.name, to)
            cred = access.caller_file(CLI_CALLER, decl.name, to)
            out["curl"] = (f"curl -s -X POST {st.address}/predict -H 'content-type: application/json' -H @<(printf "
                           f"'authorization: Bearer %s\\n' \"$(cat {cred})\") -d '{{...}}'")
    except (PlatformNotRunning, InstanceError) as err:
        return _fail(str(err))
    except Exception as err:  # the Access API refusing the platform's caller is one line too
        if type(err).__name__ == "AccessError":
            out["curl"] = None
            say(f"note: no credential for {CLI_CALLER} on {decl.name}.{to}: {str(err).splitlines()[0]}")
        else:
            raise
    if as_json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"{decl.name}.{to} serves {version} at {out.get('address') or 'its stable address (onepath status)'}")
    if out.get("curl"):
        print(out["curl"])
    return 0
