"""``onepath approve`` and ``onepath keys init``: signed approvals from the shell.

Errors are one line on stderr and a non-zero exit, never a traceback. Only an approval that
verifies (signature, role, independence, existing version, valid environment) is recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from platform_defs.settings import PROJECT_ROOT, load_settings

def identity_key_path(name: str) -> Path:
    """``$ONEPATH_HOME/keys/identities/NAME.key``. Never a shipped demo key: whoever signs with one of
    those names it with ``--key`` (and only a policy in demo mode accepts it)."""
    return load_settings().home / "keys" / "identities" / f"{name}.key"


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


def cmd_keys_init(args: argparse.Namespace) -> int:
    from resources.approvals import ApprovalError, generate_key

    path = Path(args.out) if args.out else load_settings().home / "keys" / "identities" / f"{args.identity}.key"
    try:
        public = generate_key(path)
    except ApprovalError as err:
        return _fail(str(err))
    print(f"private key written to {path} (keep it; mode 0600)")
    print("add this identity to the policy file (identities:), in a reviewed change:")
    print(f'  {args.identity}: {{team: <team>, roles: [<role>], public_key: "{public}"}}')
    print("then record the change (nothing promotes until it is): onepath policy apply --as <platform admin>")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from platform_defs.loader import load_governed
    from platform_defs.policy import PolicyError
    from platform_defs.specs import AppSpec, DeclarationError, EndpointSpec, ModelSpec
    from resources.approvals import ApprovalError, load_private_key, sign, verify

    approver = args.as_ or os.environ.get("ONEPATH_IDENTITY")
    if not approver:
        return _fail("say who approves: --as NAME (or set ONEPATH_IDENTITY)")
    try:
        org, policy = load_governed()
    except (DeclarationError, PolicyError) as err:
        return _fail(str(err).splitlines()[0])
    decl = org.by_name.get(args.asset)
    if isinstance(decl, EndpointSpec):
        decl = org.by_name[decl.model]
    if isinstance(decl, AppSpec):
        return _approve_release(args, decl, policy, approver)
    if not isinstance(decl, ModelSpec):
        known = ", ".join(sorted(d.name for d in org.by_name.values() if d.kind in ("model", "app")))
        return _fail(f"'{args.asset}' is not a declared model, endpoint or app (declared: {known})")
    envs = sorted({e for ep in org.of_kind("endpoint") if ep.model == decl.name for e in ep.environments})
    if args.env not in envs:
        return _fail(f"'{args.env}' is not an environment of {decl.name} (environments: {', '.join(envs) or 'none'})")
    from platform_defs.wiring import build_resources

    settings = load_settings()
    resources = build_resources(settings)
    mlflow = resources["mlflow"]
    try:
        mv = mlflow.get_version(decl.name, str(args.version))
    except MlflowException:
        latest = mlflow.latest_version(decl.name)
        return _fail(f"{decl.name} has no version {args.version} (newest: {latest or 'none'})")
    author = (mv.tags or {}).get("onepath.author") or mlflow.client().get_run(mv.run_id).info.user_id
    key_path = Path(args.key) if args.key else identity_key_path(approver)
    try:
        approval = sign(load_private_key(key_path), asset=decl.name, version=str(args.version), env=args.env,
                        reason=args.reason, approver=approver)
        verify(approval, policy, asset=decl.name, version=str(args.version), env=args.env,
               owner_team=decl.owner, author=author, role=policy.track(decl.track).approver_role)
    except ApprovalError as err:
        return _fail(f"approval refused: {err}")
    book = resources["ledger"].ledger()
    entry = book.append("approval", decl.name, {**approval.as_dict(), "first_release": bool(args.first_release)},
                        approver, env=args.env)
    print(f"approved {decl.name} version {args.version} for {args.env} as {approver} (ledger #{entry.seq}); "
          f"the approved_promotions sensor promotes it once the environment before {args.env} serves it "
          f"(or materialize the {args.env} asset)")
    return 0


def _approve_release(args: argparse.Namespace, app, policy, approver: str) -> int:
    """A code review of one built release of an app, by a reviewer who authored none of its changes."""
    from platform_defs.wiring import build_resources
    from platform_defs.governance.gates import AppGate
    from resources.approvals import ApprovalError, load_private_key, sign, verify

    if args.env not in app.environments:
        return _fail(f"'{args.env}' is not an environment of {app.name} (environments: {', '.join(app.environments)})")
    settings = load_settings()
    builds = settings.releases_dir / "apps" / app.name
    if not (builds / str(args.version)).is_dir():
        known = sorted(p.name for p in builds.glob("r-*")) if builds.is_dir() else []
        return _fail(f"{app.name} has no built release {args.version} (built: {', '.join(known) or 'none'})")
    authors = AppGate(app=app, policy=policy, ledger=None, deployer=None, source_dir=PROJECT_ROOT / app.source,
                      repo_root=PROJECT_ROOT).authors()
    key_path = Path(args.key) if args.key else identity_key_path(approver)
    try:
        approval = sign(load_private_key(key_path), asset=app.name, version=str(args.version), env=args.env,
                        reason=args.reason, approver=approver)
        verify(approval, policy, asset=app.name, version=str(args.version), env=args.env, owner_team=app.owner,
               author=None, role=policy.track("app").approver_role, other_team=False, author_emails=authors)
    except ApprovalError as err:
        return _fail(f"review refused: {err}")
    entry = build_resources(settings)["ledger"].ledger().append("approval", app.name, approval.as_dict(), approver,
                                                                env=args.env)
    print(f"reviewed {app.name} release {args.version} for {args.env} as {approver} (ledger #{entry.seq}); "
          f"the approved_promotions sensor promotes it once the environment before {args.env} serves it "
          f"(or materialize the {args.env} asset)")
    return 0


def add_governance_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("approve", help="sign an approval of one model version (or a code review of one app "
                                       "release) for one environment")
    p.add_argument("asset", help="model, endpoint or app name")
    p.add_argument("--version", required=True)
    p.add_argument("--env", required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--as", dest="as_", metavar="NAME", help="approver identity (default $ONEPATH_IDENTITY)")
    p.add_argument("--key", help="private key file (default $ONEPATH_HOME/keys/identities/NAME.key)")
    p.add_argument("--first-release", action="store_true",
                   help="also record this as the signed first release (no previous version to roll back to)")
    p.set_defaults(fn=cmd_approve)
    keys = sub.add_parser("keys", help="manage signing keys")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    k = ksub.add_parser("init", help="create an Ed25519 key pair for an identity")
    k.add_argument("--identity", required=True)
    k.add_argument("--out", help="where to write the private key")
    k.set_defaults(fn=cmd_keys_init)
