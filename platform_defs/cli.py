"""The ``onepath`` command: ``up``, ``status``, ``validate``, ``down``, ``approve``, ``revoke``, ``sign-version``, ``keys``,
``audit``, ``rollback``, ``inventory``, ``policy``, ``witness``, ``access``, ``migrate-declarations``, ...

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from platform_defs.cli_base import GROUP_SETTINGS, verb
from platform_defs.dagster_instance import ensure_instance
from platform_defs.settings import PROJECT_ROOT, Settings, SettingsError, load_settings
from resources.files import atomic_write, tighten_tree, use_private_umask
from resources.processes import group_alive


def _die(msg: str, code: int = 1) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return code


# -- validate -----------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from platform_defs.loader import declarations_dir
    from platform_defs.specs import DeclarationError

    root = Path(args.path).resolve() if args.path else declarations_dir()
    from platform_defs.policy import PolicyError

    try:
        problems, org = validate_declarations(root)
    except (DeclarationError, PolicyError) as err:
        print(str(err).splitlines()[0], file=sys.stderr)
        return 1
    for line in problems:
        print(line, file=sys.stderr)
    counts: dict[str, int] = {}
    for d in org.by_name.values():
        counts[d.kind] = counts.get(d.kind, 0) + 1
    summary = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in sorted(counts.items()))
    if problems:
        print(f"{len(problems)} problem(s); {len(org)} declarations load in {root} ({summary or 'none'})",
              file=sys.stderr)
        return 1
    print(f"ok: {len(org)} declarations in {root} ({summary})")
    return 0


def validate_declarations(root: Path) -> "tuple[list[str], Any]":
    """Every problem of the declarations under ``root``, one line each, and the organisation of what loads:
    the code location's tolerant load plus what only validate (and CI) checks: that every trainer and
    generator imports and is callable, and each endpoint's drift settings. A broken policy file raises."""
    from platform_defs.loader import load_organisation
    from platform_defs.policy import effective_drift, load_policy
    from platform_defs.specs import DeclarationError

    policy = load_policy()
    org = load_organisation(root, policy, tolerant=True, check_imports=True)
    lines = [str(p).splitlines()[0] for p in org.problems]
    for ep in org.of_kind("endpoint"):
        try:
            effective_drift(ep, policy, org.sources.get(ep.name))
        except DeclarationError as err:
            lines.append(str(err).splitlines()[0])
    from platform_defs.governance.custom_checks import importable_problems

    lines += importable_problems(policy, root)  # like a trainer: a custom check a track names must import
    return lines, org


# -- status -------------------------------------------------------------------------------------


def _status_rows(settings: Settings, env: str | None) -> list[dict[str, Any]]:
    from platform_defs.loader import load_organisation
    from platform_defs.wiring import build_resources
    from sensors.endpoint_status import revive_supervisors, targets_of

    org = load_organisation()
    # the platform's own deployer (its artifact roots too: a supervisor revived here relaunches only from them)
    deployer = build_resources(settings)["deployer_local"].deployer()
    from platform_defs.registration import registered_digest

    targets = [t for t in targets_of(org) if env is None or t[1] == env]
    for r in revive_supervisors(deployer, [t for _, _, t in targets]):
        print(f"onepath status: {r['slot']}: " + (f"its supervisor is gone and could not be started again: "
                                                  f"{r['error']}" if "error" in r else
                                                  f"its supervisor (pid {r['previous_pid']}) was gone; started "
                                                  f"pid {r['pid']}, which adopts what still serves"),
              file=sys.stderr)
    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(lambda t: deployer.status(t[2]), targets))
    book = settings.ledger()
    rows = []
    for (d, e, target), st in zip(targets, statuses):
        sup = st.detail.get("supervisor") or {}
        model = getattr(d, "model", None)
        registered = (registered_digest(book, model, st.serving_version)
                      if model and st.serving_version is not None else None)
        rows.append({
            "name": d.name, "kind": target.kind, "env": e, "track": d.track, "owner": d.owner,
            "version": st.serving_version, "address": st.address, "healthy": st.healthy,
            "health": st.health, "problems": st.problems,
            "supervisor_state": sup.get("state"), "restarts": sup.get("restarts"),
            "model": model, "digest": st.serving_digest, "registered_digest": registered,
            # what serves compared by content: its digest against the served version's registration
            "digest_ok": (st.serving_digest is not None and st.serving_digest == registered)
            if model and st.serving_version is not None else None,
        })
    return rows


def _digest_cell(r: dict[str, Any]) -> str:
    short = (r["digest"] or "none")[:19]
    if r["digest_ok"] is False:
        return f"MISMATCH served={short} registered={(r['registered_digest'] or 'none')[:19]}"
    return short if r["digest"] else "-"


def cmd_status(args: argparse.Namespace) -> int:
    from platform_defs.specs import DeclarationError

    from platform_defs.policy import PolicyError

    settings = load_settings()
    try:
        rows = _status_rows(settings, args.env)
    except (DeclarationError, PolicyError) as err:
        return _die(str(err).splitlines()[0])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("NAME", "KIND", "ENV", "VERSION", "DIGEST", "HEALTH", "ADDRESS", "TRACK", "OWNER")
    table = [header] + [(
        r["name"], r["kind"], r["env"], r["version"] or "-", _digest_cell(r),
        r["health"], r["address"] or "-", r["track"], r["owner"],
    ) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    for r in rows:  # what is wrong, in words, under the table
        for problem in r["problems"]:
            print(f"{r['name']}.{r['env']}: {problem}")
    return 0


# -- down ---------------------------------------------------------------------------------------


def cmd_down(args: argparse.Namespace) -> int:
    from resources.deployers.local import LocalProcessDeployer

    settings = load_settings()
    if not settings.run_dir.exists():
        print("nothing is running")
        return 0
    stopped = LocalProcessDeployer(settings.run_dir).stop_all()
    print(f"stopped {len(stopped)} environment(s){': ' + ', '.join(stopped) if stopped else ''}")
    return 0


# -- up -----------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from platform_defs.loader import load_organisation
    from platform_defs.specs import DeclarationError

    if args.profile:
        os.environ["ONEPATH_PROFILE"] = args.profile  # this process's settings and every process it starts
    settings = load_settings()
    if settings.profile == "production":
        from platform_defs.doctor import production_refusals

        refusals = production_refusals(settings)
        if refusals:
            for line in refusals:
                print(f"onepath: {line}", file=sys.stderr)
            return _die(f"the production profile does not start: {len(refusals)} problem(s) above")
    loose = tighten_tree(settings.home)  # a home made by an older onepath, or by hand, with a loose umask
    if loose:
        print(f"onepath: took group and other permissions off {loose} entries under {settings.home}")
    ensure_instance(settings)
    from platform_defs.policy import PolicyError

    try:
        org = load_organisation(tolerant=True)  # as the code location loads: a broken declaration is left out
        policy_line = _policy_on_start(settings)
    except (DeclarationError, PolicyError) as err:
        return _die(str(err).splitlines()[0])
    from platform_defs.wiring import build_resources

    build_resources(settings)["mlflow"].ready()  # its tables exist before any other process (UI, daemon) uses it
    env = dict(os.environ)
    env.update({
        "DAGSTER_HOME": str(settings.dagster_home),
        "ONEPATH_HOME": str(settings.home),
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "GX_ANALYTICS_ENABLED": "false",
    })
    bindir = Path(sys.executable).parent
    procs: list[subprocess.Popen] = []
    if not args.no_mlflow_ui:
        port = settings.mlflow_ui_url.rsplit(":", 1)[-1].strip("/")
        argv, server_env = mlflow_server_command(settings, port)
        procs.append(subprocess.Popen(
            argv, env={**env, **server_env}, cwd=PROJECT_ROOT, stdout=open(settings.home / "mlflow-ui.log", "ab"),
            stderr=subprocess.STDOUT, start_new_session=True))
    dg_cmd = [str(bindir / "dg"), "dev", "--host", args.host, "--port", str(args.port)]
    if not shutil.which(dg_cmd[0]):
        dg_cmd = [str(bindir / "dagster"), "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                  "-h", args.host, "-p", str(args.port)]
    print(f"onepath: {len(org)} declarations loaded; Dagster UI on http://{args.host}:{args.port}"
          f"{'' if args.no_mlflow_ui else f', MLflow UI on {settings.mlflow_ui_url}'}; state in {settings.home}")
    print(f"onepath: {policy_line}", flush=True)
    for problem in org.problems:
        print(f"onepath: left out: {str(problem).splitlines()[0]}", flush=True)
    # dg dev runs in its own process group, so stopping it reaches its webserver, daemon and code
    # servers too: first a Ctrl-C, as a terminal would send, then SIGTERM, then SIGKILL.
    dagster = subprocess.Popen(dg_cmd, env=env, cwd=PROJECT_ROOT, start_new_session=True)
    procs.append(dagster)
    # what `onepath migrate` reads to refuse moving the stores under a running platform
    running = settings.run_dir / "up.json"
    atomic_write(running, json.dumps({"pid": os.getpid(), "dagster_pgid": dagster.pid}).encode())
    try:
        watcher = _start_watcher(args.host, args.port)
        stopping: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
        signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
        while dagster.poll() is None and not stopping:
            time.sleep(0.2)
        watcher.stop.set()
    finally:
        for p in procs:
            _stop_group(p)
        running.unlink(missing_ok=True)
    code = 0 if stopping else (dagster.returncode or 0)
    print("onepath: Dagster stopped; endpoints keep serving (onepath down stops them)")
    return code


def mlflow_server_command(settings: Settings, port: str | int) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` command line `onepath up` runs for ``settings`` on 127.0.0.1:``port``, and what its
    environment adds. Embedded (sqlite): the store on the command line and ``--default-artifact-root`` the local
    folder, as always. A store that is not a sqlite file (PostgreSQL: its URL holds a password) goes through the
    variables the server reads for the same options (``MLFLOW_BACKEND_STORE_URI``, ``MLFLOW_REGISTRY_STORE_URI``)
    so that it never shows in a process list. Artifacts on S3: the server proxies them (``--serve-artifacts``,
    ``--artifacts-destination``), so a client of the server needs no S3 credentials of its own; the server reads
    the standard AWS variables (and ``MLFLOW_S3_ENDPOINT_URL``) from its environment."""
    from resources.object_store import is_s3

    argv = [str(Path(sys.executable).parent / "mlflow"), "server"]
    env: dict[str, str] = {}
    if settings.mlflow_tracking_uri.startswith("sqlite:"):
        argv += ["--backend-store-uri", settings.mlflow_tracking_uri]
    else:
        env["MLFLOW_BACKEND_STORE_URI"] = settings.mlflow_tracking_uri
    if settings.mlflow_registry_uri and settings.mlflow_registry_uri != settings.mlflow_tracking_uri:
        if settings.mlflow_registry_uri.startswith("sqlite:"):
            argv += ["--registry-store-uri", settings.mlflow_registry_uri]
        else:
            env["MLFLOW_REGISTRY_STORE_URI"] = settings.mlflow_registry_uri
    if is_s3(settings.mlflow_artifacts):
        argv += ["--artifacts-destination", settings.mlflow_artifacts, "--serve-artifacts"]
    else:
        argv += ["--default-artifact-root", settings.mlflow_artifact_root.as_uri()]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return argv, env


def _start_watcher(host: str, port: int):
    """The thread that reloads the code location when a declaration or the policy file changes."""
    from platform_defs.loader import declarations_dir
    from platform_defs.policy import policy_path
    from platform_defs.instance_client import InstanceClient
    from platform_defs.reload import Watcher

    addr = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    watched = [declarations_dir(), policy_path()]
    client = InstanceClient(addr, port, timeout=120.0)
    watcher = Watcher(watched, client, lambda line: print(f"onepath: {line}", flush=True))
    watcher.start()
    print(f"onepath: watching {watched[0]} and {watched[1]}: a change reloads the code location", flush=True)
    return watcher


def _policy_on_start(settings: Settings) -> str:
    """On the first start of a demo organisation (the example's policy turns demo mode on), record its policy,
    signed by its first demo platform admin with the shipped key, so the tour promotes; otherwise say what
    records it. One line either way: the gates say the rest."""
    from platform_defs.policy import is_demo_identity, load_policy, policy_path, shipped_demo_keys
    from platform_defs.policy_record import PolicyRecordError, policy_standing, recorded_policies, record_policy
    from platform_defs.settings import current_profile
    from platform_defs.wiring import build_resources
    from resources.approvals import load_private_key, public_key_b64

    path = policy_path()
    policy = load_policy(path)
    book = build_resources(settings)["ledger"].ledger()
    try:
        records = recorded_policies(book)
    except PolicyRecordError as err:
        return f"the recorded policy chain is broken ({err}): nothing promotes"
    if not records and policy.demo and current_profile() != "production":
        demo_keys = PROJECT_ROOT / "assets" / "demo_identities"
        for name, ident in policy.identities.items():
            key_file = demo_keys / f"{name}.key"
            if "platform_admin" not in ident.roles or not is_demo_identity(policy, name) or not key_file.exists():
                continue
            key = load_private_key(key_file)
            if public_key_b64(key) != ident.public_key or ident.public_key not in shipped_demo_keys():
                continue
            entry = record_policy(book, path, signer=name, key=key, initial=True)
            return (f"recorded the demo policy {path} as the policy in force (ledger #{entry.seq}), signed by the "
                    f"demo platform admin {name} with its shipped key (demo mode: never for anything real)")
    standing = policy_standing(book, policy, path)
    if standing.ok:
        return f"policy in force: ledger #{standing.entry_seq} (sha256 {standing.hash[:12]}…)"
    return f"{standing.problem}; until then every gate says why nothing promotes"


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group(p: subprocess.Popen) -> None:
    """End every process of ``p``'s group: SIGINT, then SIGTERM, then SIGKILL, 10 s apart."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if not group_alive(p.pid):
            break
        _signal_group(p, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and group_alive(p.pid):
            time.sleep(0.2)
    try:
        p.wait(timeout=1)
    except subprocess.TimeoutExpired:
        pass


# The verbs kept in modules of their own: name -> (module, command, help). A verb's module is imported only
# when that verb runs (`onepath inventory` imports platform_defs.cli_inventory and no other verb's module:
# importing all of them cost a fresh process 0.2 s), and this table is the one place of each verb's help:
# `onepath --help` lists it from here, and the command gets it when it is loaded.
VERBS: dict[str, tuple[str, str, str]] = {
    "access": ("platform_defs.cli_access", "access", "Grants and credentials: who may call which endpoint."),
    "approve": ("platform_defs.cli_governance", "approve",
                "sign an approval of one model version (or a code review of one app release) for one environment"),
    "audit": ("platform_defs.cli_audit", "audit", "Check or export the tamper-evident platform ledger."),
    "card": ("platform_defs.cli_card", "card",
             "print a model version's model card (default: the version last deployed); --html FILE writes its page"),
    "doctor": ("platform_defs.cli_doctor", "doctor",
               "check every configured store: OK, or one line naming the store, its address and the fix"),
    "inventory": ("platform_defs.cli_inventory", "inventory",
                  "every endpoint and app release per environment: recorded version, approvals, gates, lineage, "
                  "and what answers live"),
    "keys": ("platform_defs.cli_governance", "keys", "Manage signing keys."),
    "materialize": ("platform_defs.cli_runs", "materialize",
                    "submit a run of the named assets (and their checks) to the running platform. --param "
                    "NAME=VALUE sets a dataset's generator parameter (e.g. period_start=2026-02-01) or an "
                    "environment's version; --no-follow returns the run id at once"),
    "migrate": ("platform_defs.cli_migrate", "migrate_stores",
                "move the embedded installation (ledger, MLflow, Dagster's latest asset state, snapshots, logs, "
                "outcomes, drift reports, app releases) "
                "onto the production stores the environment names: --to production; --dry-run writes nothing"),
    "migrate-declarations": ("platform_defs.cli_migrate", "migrate_declarations",
                             "rewrite old-form declaration files (declarations: [...]) as Dagster components "
                             "(type: onepath.Model); --check only says whether any is left"),
    "policy": ("platform_defs.cli_policy", "policy",
               "Record the policy file as the policy in force (signed), or show it."),
    "promote": ("platform_defs.cli_promote", "promote",
                "deploy a model's version (or an app's release) through each environment in order up to --to, on "
                "the running platform; shows each check, then the stable address and a ready curl line, or what "
                "to do about a refusal"),
    "register": ("platform_defs.cli_register", "register",
                 "adopt a model version logged with plain MLflow (models:/NAME/VERSION) as the platform's "
                 "version, with its train and test rows: checked, signed, recorded and pinned as it is"),
    "revoke": ("platform_defs.cli_governance", "revoke",
               "take back approvals of one version (or release) in one environment"),
    "rollback": ("platform_defs.cli_rollback", "rollback", "redeploy the version an endpoint environment served before"),
    "runs": ("platform_defs.cli_runs", "runs", "Runs on the running platform: list them, show one, follow one."),
    "sign-version": ("platform_defs.cli_governance", "sign_version",
                     "sign a model version registered from a notebook as its author"),
    "simulate-traffic": ("platform_defs.cli_simulate", "simulate_traffic",
                         "send realistic requests to an endpoint and deliver their outcomes later"),
    "why": ("platform_defs.cli_why", "why",
            "each failing check of an asset's latest evaluation: its numbers, what it says, and what to do next "
            "(an approval: who may approve and the exact command)"),
    "witness": ("platform_defs.cli_witness", "witness", "The ledger's witness: run it as its own OS user."),
}


class LazyGroup(click.Group):
    """A group whose ``VERBS`` are imported on first use (Click's documented LazyGroup pattern): listing them
    (``--help``, a misspelt verb's suggestion) imports none."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str, str]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            self.add_command(self._load(name), name)
        return super().get_command(ctx, name)

    def _load(self, name: str) -> click.Command:
        module, attr, help_text = self.lazy[name]
        # __import__, not importlib.import_module: it goes through the interpreter's own import, so that
        # `-X importtime` (the tests', the bench's) sees the verb module
        cmd = getattr(__import__(module, fromlist=[attr]), attr)
        if not isinstance(cmd, click.Command) or cmd.name != name or cmd.help is not None:
            raise RuntimeError(f"{module}.{attr} is not the click command '{name}' without a help of its own "
                               f"(its help is platform_defs.cli.VERBS['{name}'])")
        cmd.help = help_text
        return cmd

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.NoSuchCommand as err:  # its "Did you mean" looks at loaded commands only
            raise click.exceptions.NoSuchCommand(err.command_name, possibilities=self.list_commands(ctx),
                                                 ctx=ctx) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click.Group.format_commands, with each verb not loaded yet standing in as a bare command with its help
        names = self.list_commands(ctx)
        rows = [(n, self.commands.get(n) or click.Command(n, help=self.lazy[n][2])) for n in names]
        rows = [(n, c) for n, c in rows if not c.hidden]
        if rows:
            limit = formatter.width - 6 - max(len(n) for n, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(n, c.get_short_help_str(limit)) for n, c in rows])


@click.group("onepath", cls=LazyGroup, lazy=VERBS, context_settings=GROUP_SETTINGS)
def onepath() -> None:
    """One delivery path for data, models, endpoints and apps."""


@onepath.command("up", help="start the platform: Dagster UI (with sensors) and the MLflow UI")
@click.option("--host", default=lambda: os.environ.get("ONEPATH_UI_HOST", "127.0.0.1"), show_default="127.0.0.1")
@click.option("--port", type=int, default=lambda: int(os.environ.get("ONEPATH_UI_PORT", "3000")),
              show_default="3000")
@click.option("--no-mlflow-ui", is_flag=True)
@click.option("--profile", type=click.Choice(["development", "production"]), default=None,
              help="production: every store off this host (PostgreSQL, S3), a witness, no demo mode; checked first "
                   "(default: ONEPATH_PROFILE, else development)")
def _up(**kw):  # noqa: ANN003
    return verb(cmd_up)(**kw)


@onepath.command("status", help="every endpoint and app release per environment, asked live")
@click.option("--env")
@click.option("--json", "json", is_flag=True)
def _status(**kw):  # noqa: ANN003
    return verb(cmd_status)(**kw)


@onepath.command("validate", help="load and check every declaration; print every problem, one line each")
@click.argument("path", required=False)
def _validate(**kw):  # noqa: ANN003
    return verb(cmd_validate)(**kw)


@onepath.command("down", help="stop every endpoint and app process onepath started")
def _down(**kw):  # noqa: ANN003
    return verb(cmd_down)(**kw)


def main(argv: list[str] | None = None) -> int:
    """Run ``onepath`` on ``argv`` (default: the process's arguments); every error is one line on stderr and an
    exit code: 2 for a usage error, 1 for the rest, never a traceback."""
    use_private_umask()  # everything this command, and every server it starts, creates is owner-only
    import sqlite3

    try:
        return int(onepath.main(args=argv, prog_name="onepath", standalone_mode=False) or 0)
    except click.exceptions.NoArgsIsHelpError as err:  # `onepath` or `onepath access` alone: its help, and 2
        print(err.ctx.get_help() if err.ctx is not None else "onepath --help", file=sys.stderr)
        return 2
    except click.UsageError as err:
        where = err.ctx.command_path if err.ctx is not None else "onepath"
        print(f"{where}: {err.format_message()} (onepath {'' if where == 'onepath' else where[8:] + ' '}--help)",
              file=sys.stderr)
        return 2
    except click.Abort:
        return 130
    except click.ClickException as err:
        print(f"onepath: {err.format_message()}", file=sys.stderr)
        return err.exit_code or 1
    except KeyboardInterrupt:
        return 130
    except SettingsError as err:  # a setting that cannot be used: its one line names the variable or the file
        print(f"onepath: {err}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as err:
        print(f"onepath: the ledger database cannot be read ({err}): nothing was recorded", file=sys.stderr)
        return 1
    except Exception as err:
        # any command that appends refuses a ledger it did not write, in one line. The class is looked up, not
        # imported: resources.ledger imports Dagster, and `onepath witness` must start without it (it runs as
        # its own OS user, which may read nothing but the standard library and cryptography)
        ledger = sys.modules.get("resources.ledger")
        if ledger is not None and isinstance(err, ledger.LedgerTampered):
            print(f"onepath: {err}; nothing was recorded (onepath audit verify names what changed)", file=sys.stderr)
            return 1
        if ledger is not None and isinstance(err, ledger.LedgerUnavailable):  # names the store, never a password
            print(f"onepath: {err}: nothing was recorded (onepath doctor checks every store)", file=sys.stderr)
            return 1
        if ledger is not None and isinstance(err, ledger.STORE_ERRORS):
            print(f"onepath: the ledger database cannot be read ({ledger.store_error_text(err)}): nothing was "
                  f"recorded", file=sys.stderr)
            return 1
        if os.environ.get("ONEPATH_DEBUG"):
            raise
        # anything else (MLflow or the platform down mid-verb, a disk full): one line naming it, never a traceback
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"onepath: {type(err).__name__}: {first or 'no message'} (ONEPATH_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
