"""``onepath access list|rotate|revoke|reconcile|issue``: who may call which endpoint, and their credentials.

``list`` shows every grant (``--all``: the revoked ones too) with why it exists; ``rotate`` gives a grant a new
secret (the old one keeps working ``overlap_seconds``, then is refused); ``revoke`` ends a grant at once,
recorded with ``--why``, without redeploying anything; ``reconcile`` does now what the ``access`` sensor does
each tick; ``issue`` writes a policy caller's credential into the callers' store and prints its path (for a
scraper run by the platform's OS user), never the token.

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


def _world(need_org: bool = True) -> tuple[Any, Any, Any]:
    """(settings, organisation, Access) of the platform in use. Without ``need_org`` (a revocation), a
    declaration or policy file that does not load leaves the organisation None: a leaked credential is
    revoked whatever state the declarations are in."""
    from platform_defs.access import access_for
    from platform_defs.cli_rollback import default_actor
    from platform_defs.loader import load_organisation
    from platform_defs.policy import PolicyError, load_policy
    from platform_defs.settings import load_settings
    from platform_defs.specs import DeclarationError

    settings = load_settings().ensure_dirs()
    try:
        org = load_organisation(policy=load_policy())
    except (DeclarationError, PolicyError):
        if need_org:
            raise
        org = None
    return settings, org, access_for(settings, actor=default_actor())


def _guard(fn):  # noqa: ANN001
    def run(args: argparse.Namespace) -> int:
        from platform_defs.access import AccessError
        from platform_defs.policy import PolicyError
        from platform_defs.specs import DeclarationError
        from resources.deployers.base import DeployError

        try:
            return fn(args)
        except (AccessError, DeclarationError, PolicyError, DeployError, OSError) as err:
            return _fail(str(err).splitlines()[0])
    return run


def _state_of(g: Any, now: Any) -> str:
    if g.revoked:
        return f"revoked {g.revoked['at']}: {g.revoked['why']}"
    days = g.secret_age(now).total_seconds() / 86400
    return f"live, secret {days:.1f} days old"


@_guard
def cmd_list(args: argparse.Namespace) -> int:
    from platform_defs.access import _now

    _, _, access = _world()
    rows = [g for g in access.state().values()
            if (args.all or g.live) and (not args.caller or g.caller == args.caller)
            and (not args.endpoint or g.endpoint == args.endpoint) and (not args.env or g.env == args.env)]
    if args.json:
        print(json.dumps([g.as_dict() for g in rows], indent=2))
        return 0
    if not rows:
        print("no grants" + ("" if args.all else " in force (--all shows revoked ones)"))
        return 0
    now = _now()
    for g in sorted(rows, key=lambda g: (g.endpoint, g.env, g.caller, g.granted_seq)):
        print(f"{g.id}  {g.endpoint}.{g.env:<8} {g.caller:<22} [{', '.join(g.routes)}]  {_state_of(g, now)}; "
              f"because {g.because}")
    return 0


def _pick(access: Any, args: argparse.Namespace) -> str:
    from platform_defs.access import AccessError

    if args.grant:
        if args.caller or args.endpoint or args.env:
            raise AccessError("name a grant id, or --caller/--endpoint/--env, not both")
        return args.grant
    if not (args.caller and args.endpoint and args.env):
        raise AccessError("name the grant: onepath access rotate GRANT, or --caller C --endpoint E --env ENV "
                          "(onepath access list shows them)")
    live = [g for g in access.state().values() if g.live and g.caller == args.caller
            and g.endpoint == args.endpoint and g.env == args.env]
    if not live:
        raise AccessError(f"{args.caller} holds no grant in force on {args.endpoint}.{args.env} "
                          f"(onepath access list shows them)")
    return live[-1].id


@_guard
def cmd_rotate(args: argparse.Namespace) -> int:
    _, org, access = _world()
    g = access.rotate(org, _pick(access, args))
    old = g.secrets[-2].not_after if len(g.secrets) > 1 else None
    print(f"rotated grant {g.id} ({g.caller} on {g.endpoint}.{g.env}): new secret handed to its holder; the old "
          f"one is refused after {old}")
    return 0


@_guard
def cmd_revoke(args: argparse.Namespace) -> int:
    _, org, access = _world(need_org=False)
    g = access.revoke(org, args.grant, args.why or "")
    print(f"revoked grant {g.id} ({g.caller} on {g.endpoint}.{g.env}) at {g.revoked['at']} (ledger "
          f"#{g.revoked['seq']}): its next request is refused (403); nothing was redeployed")
    return 0


@_guard
def cmd_reconcile(args: argparse.Namespace) -> int:
    _, org, access = _world()
    out = access.reconcile(org)
    for r in out.revoked:
        print(f"revoked {r['grant']} ({r['caller']} on {r['endpoint']}.{r['env']}): {r['why']}")
    for r in out.rotated:
        print(f"rotated {r['grant']} ({r['caller']} on {r['endpoint']}.{r['env']})")
    for e in out.errors:
        print(f"error: {e}", file=sys.stderr)
    print(out.summary())
    return 1 if out.errors else 0


@_guard
def cmd_issue(args: argparse.Namespace) -> int:
    from platform_defs.access import AccessError

    if args.caller.startswith("app:"):
        raise AccessError("an app's credentials are issued by its deploy, into its own slot only")
    _, org, access = _world()
    access.caller_token(org, args.caller, args.endpoint, args.env)
    print(f"{access.caller_file(args.caller, args.endpoint, args.env)} holds {args.caller}'s credential for "
          f"{args.endpoint}.{args.env} (owner-only; send it as Authorization: Bearer <its content>)")
    return 0


import click  # noqa: E402

from platform_defs.cli_base import GROUP_SETTINGS, verb  # noqa: E402


@click.group("access", context_settings=GROUP_SETTINGS)
def access() -> None:
    pass  # its help: platform_defs.cli.VERBS (one place: `onepath --help` lists it without importing this module)


def _pick_options(f):  # noqa: ANN001
    for name in ("env", "endpoint", "caller"):
        f = click.option(f"--{name}")(f)
    return f


access.command("list", help="every grant in force (--all: revoked ones too) and why it exists")(
    click.option("--json", "json", is_flag=True)(_pick_options(click.option("--all", "all", is_flag=True)(
        verb(cmd_list)))))
access.command("rotate", help="a new secret for a grant; the old one works for overlap_seconds more")(
    _pick_options(click.argument("grant", required=False)(verb(cmd_rotate))))
access.command("revoke", help="end a grant now (recorded; its next request is refused)")(
    click.argument("grant")(click.option("--why", required=True, help="recorded in the ledger")(verb(cmd_revoke))))
access.command("reconcile", help="revoke what nothing justifies, rotate what is old, publish the tables")(
    verb(cmd_reconcile))
access.command("issue", help="write a policy caller's credential to the callers' store; prints its path")(
    click.option("--caller", required=True)(click.option("--endpoint", required=True)(
        click.option("--env", required=True)(verb(cmd_issue)))))
