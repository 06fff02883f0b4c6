"""``onepath approve``, ``onepath revoke``, ``onepath sign-version`` and ``onepath keys init``.

Errors are one line on stderr and a non-zero exit, never a traceback. Only an approval that
verifies (signature, role, independence, existing registration, valid environment) is recorded; it
binds the run id and digest the version's registration recorded in the ledger (an app release: its
content hash), and the author it is judged independent of is the registration's (never an MLflow tag).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

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


def _recorded(book: Any, policy: Any) -> tuple[Any, str | None]:
    """``(the recorded policy in force, None)`` when ``policy`` (the file) is it, else ``(None, problem)``:
    an approval or revocation is verified against the identities the ledger records, never against a file
    anyone who can edit it could have given a new identity."""
    from platform_defs.policy_record import policy_in_force, policy_standing

    standing = policy_standing(book, policy)
    recorded = policy_in_force(book) if standing.ok else None
    if recorded is None:
        return None, standing.problem or "no policy is recorded in the ledger yet"
    return recorded.policy, None


def _model_of(args: argparse.Namespace, org) -> Any:
    from platform_defs.specs import EndpointSpec

    decl = org.by_name.get(args.asset)
    if isinstance(decl, EndpointSpec):
        decl = org.by_name[decl.model]
    return decl


def cmd_approve(args: argparse.Namespace) -> int:
    from platform_defs.loader import load_governed
    from platform_defs.policy import PolicyError
    from platform_defs.registration import registered_author, registration, unknown_author_text
    from platform_defs.specs import AppSpec, DeclarationError, ModelSpec
    from resources.approvals import ApprovalError, Registered, load_private_key, sign, verify

    approver = args.as_ or os.environ.get("ONEPATH_IDENTITY")
    if not approver:
        return _fail("say who approves: --as NAME (or set ONEPATH_IDENTITY)")
    try:
        org, policy = load_governed()
    except (DeclarationError, PolicyError) as err:
        return _fail(str(err).splitlines()[0])
    decl = _model_of(args, org)
    if isinstance(decl, AppSpec):
        return _approve_release(args, decl, policy, approver)
    if not isinstance(decl, ModelSpec):
        known = ", ".join(sorted(d.name for d in org.by_name.values() if d.kind in ("model", "app")))
        return _fail(f"'{args.asset}' is not a declared model, endpoint or app (declared: {known})")
    envs = sorted({e for ep in org.of_kind("endpoint") if ep.model == decl.name for e in ep.environments})
    if args.env not in envs:
        return _fail(f"'{args.env}' is not an environment of {decl.name} (environments: {', '.join(envs) or 'none'})")
    from platform_defs.wiring import build_resources

    book = build_resources(load_settings())["ledger"].ledger()
    policy, problem = _recorded(book, policy)
    if problem:
        return _fail(f"approval refused: {problem}")
    # what the approval binds and who authored the version: the version's registration in the ledger,
    # never MLflow's tags or its client-set mlflow.user
    reg = registration(book, decl.name, str(args.version))
    if reg is None:
        newest = max((int(e.data["version"]) for e in book.entries(kind="model_registered", subject=decl.name)
                      if str(e.data.get("version", "")).isdigit()), default=None)
        return _fail(f"{decl.name} version {args.version} has no model_registered ledger entry, so nothing an approval "
                     f"could bind (newest registered: {newest or 'none'})")
    author, known = registered_author(reg)
    if not known:
        return _fail(f"approval refused: {unknown_author_text(decl.name, str(args.version))}")
    key_path = Path(args.key) if args.key else identity_key_path(approver)
    registered = Registered.of_model(reg)
    track = policy.track(decl.track)
    try:
        approval = sign(load_private_key(key_path), asset=decl.name, version=str(args.version), env=args.env,
                        reason=args.reason, approver=approver, run_id=registered.run_id, digest=registered.digest,
                        first_release=bool(args.first_release))
        verify(approval, policy, asset=decl.name, version=str(args.version), env=args.env, owner_team=decl.owner,
               author=author, role=track.approver_role, registered=registered, valid_days=track.approval_valid_days)
    except ApprovalError as err:
        return _fail(f"approval refused: {err}")
    entry = book.append("approval", decl.name, {**approval.as_dict(), "registration_entry": reg.seq}, approver,
                        env=args.env)
    print(f"approved {decl.name} version {args.version} (digest {registered.digest[:12]}, registered in ledger "
          f"#{reg.seq}) for {args.env} as {approver} (ledger #{entry.seq}); the approved_promotions sensor promotes "
          f"it once the environment before {args.env} serves it (or materialize the {args.env} asset)")
    return 0


def _approve_release(args: argparse.Namespace, app, policy, approver: str) -> int:
    """A code review of one built release of an app, by a reviewer who authored none of its changes."""
    from platform_defs.wiring import build_resources
    from platform_defs.governance.gates import AppGate, AuthorsUnknown
    from resources.approvals import ApprovalError, Registered, load_private_key, sign, verify
    from resources.object_store import ObjectStoreError
    from resources.release_store import ReleaseError

    if args.env not in app.environments:
        return _fail(f"'{args.env}' is not an environment of {app.name} (environments: {', '.join(app.environments)})")
    settings = load_settings()
    book = build_resources(settings)["ledger"].ledger()
    store = settings.releases
    try:  # the releases there are (on S3: built, recorded and published, on whichever host they were built)
        known = store.versions(app.name, book)
    except (ReleaseError, ObjectStoreError) as err:
        return _fail(str(err))
    if not (str(args.version) in known if store.on_s3 else store.folder(app.name, str(args.version)).is_dir()):
        return _fail(f"{app.name} has no built release {args.version} (built: {', '.join(sorted(known)) or 'none'})")
    policy, problem = _recorded(book, policy)
    if problem:
        return _fail(f"review refused: {problem}")
    gate = AppGate(app=app, policy=policy, ledger=book, deployer=None, source_dir=PROJECT_ROOT / app.source,
                   repo_root=PROJECT_ROOT)
    built = gate.release_registration(str(args.version))
    if built is None:
        return _fail(f"{app.name} release {args.version} has no release_built ledger entry, so no content hash a "
                     f"review could bind: build it through the graph (materialize the {app.name} asset)")
    registered = Registered.of_release(built)
    track = policy.track("app")
    key_path = Path(args.key) if args.key else identity_key_path(approver)
    try:
        authors = gate.authors()
    except AuthorsUnknown as err:
        return _fail(f"review refused: git could not list the commit authors of release {args.version} of "
                     f"{app.name}, so your independence of them cannot be checked: {err}")
    try:
        approval = sign(load_private_key(key_path), asset=app.name, version=str(args.version), env=args.env,
                        reason=args.reason, approver=approver, run_id=registered.run_id, digest=registered.digest)
        verify(approval, policy, asset=app.name, version=str(args.version), env=args.env, owner_team=app.owner,
               author=None, role=track.approver_role, registered=registered, valid_days=track.approval_valid_days,
               other_team=False, author_emails=authors)
    except ApprovalError as err:
        return _fail(f"review refused: {err}")
    entry = book.append("approval", app.name, {**approval.as_dict(), "registration_entry": built.seq}, approver,
                        env=args.env)
    print(f"reviewed {app.name} release {args.version} (content hash {registered.digest[:12]}) for {args.env} as "
          f"{approver} (ledger #{entry.seq}); the approved_promotions sensor promotes it once the environment "
          f"before {args.env} serves it (or materialize the {args.env} asset)")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Take back approvals of one version in one environment: a signed ``approval_revoked`` entry, accepted
    only from the approver, an identity with the track's approver role, or a platform_admin."""
    from platform_defs.loader import load_organisation
    from platform_defs.policy import PolicyError, load_policy
    from platform_defs.specs import AppSpec, DeclarationError, ModelSpec
    from resources.approvals import Approval, ApprovalError, load_private_key, sign_revocation, verify_revocation

    revoker = args.as_ or os.environ.get("ONEPATH_IDENTITY")
    if not revoker:
        return _fail("say who revokes: --as NAME (or set ONEPATH_IDENTITY)")
    if not (args.reason or "").strip():
        return _fail("a revocation needs a reason: --reason \"...\"")
    try:
        org, policy = load_organisation(), load_policy()
    except (DeclarationError, PolicyError) as err:
        return _fail(str(err).splitlines()[0])
    decl = _model_of(args, org)
    if not isinstance(decl, (ModelSpec, AppSpec)):
        known = ", ".join(sorted(d.name for d in org.by_name.values() if d.kind in ("model", "app")))
        return _fail(f"'{args.asset}' is not a declared model, endpoint or app (declared: {known})")
    from platform_defs.wiring import build_resources

    book = build_resources(load_settings())["ledger"].ledger()
    policy, problem = _recorded(book, policy)
    if problem:
        return _fail(f"revocation refused: {problem}")
    role = policy.track("app" if isinstance(decl, AppSpec) else decl.track).approver_role
    approvals = [e for e in book.entries(kind="approval", subject=decl.name, env=args.env)
                 if str(e.data.get("version")) == str(args.version)]
    if args.entry is not None:
        approvals = [e for e in approvals if e.seq == args.entry]
        if not approvals:
            return _fail(f"ledger #{args.entry} is not an approval of {decl.name} version {args.version} in {args.env}")
    if not approvals:
        return _fail(f"no approval of {decl.name} version {args.version} in {args.env} to revoke")
    key_path = Path(args.key) if args.key else identity_key_path(revoker)
    try:
        rev = sign_revocation(load_private_key(key_path), asset=decl.name, version=str(args.version), env=args.env,
                              reason=args.reason, revoker=revoker, approval_entry=args.entry)
        for e in approvals:  # the right to revoke each one it covers, checked as the gate will
            verify_revocation(rev, policy, approval=Approval.from_dict(e.data), role=role)
    except ApprovalError as err:
        return _fail(f"revocation refused: {err}")
    entry = book.append("approval_revoked", decl.name, rev.as_dict(), revoker, env=args.env)
    print(f"revoked approval{'s' if len(approvals) > 1 else ''} {', '.join(f'#{e.seq}' for e in approvals)} of "
          f"{decl.name} version {args.version} in {args.env} as {revoker} (ledger #{entry.seq}); if it serves there, "
          f"it keeps serving until rolled back or approved again, and its approval_in_force check fails")
    return 0


def cmd_sign_version(args: argparse.Namespace) -> int:
    """Sign a model version registered from a notebook as its author: the digest of its folder as MLflow serves
    it, signed with the identity's key, set as the version's onepath.signed_by / onepath.registration_signature
    tags (the registry_handoff sensor verifies them against the policy before it records the author)."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from resources.approvals import ApprovalError, load_private_key, sign_registration
    from resources.artifact_digest import folder_digest
    from resources.mlflow_registry import TAG_PREFIX

    who = args.as_ or os.environ.get("ONEPATH_IDENTITY")
    if not who:
        return _fail("say who signs: --as NAME (or set ONEPATH_IDENTITY)")
    from platform_defs.wiring import build_resources

    mlflow = build_resources(load_settings())["mlflow"]
    try:
        key = load_private_key(Path(args.key) if args.key else identity_key_path(who))
        mv = mlflow.get_version(args.model, str(args.version))
        with tempfile.TemporaryDirectory() as tmp:
            digest = folder_digest(mlflow.fresh_copy(args.model, str(args.version), Path(tmp)))
    except ApprovalError as err:
        return _fail(str(err))
    except MlflowException as err:
        return _fail(f"{args.model} version {args.version}: {str(err).splitlines()[0]}")
    signature = sign_registration(key, model=args.model, version=str(args.version), run_id=mv.run_id, digest=digest)
    client = mlflow.client()
    client.set_model_version_tag(args.model, str(args.version), TAG_PREFIX + "signed_by", who)
    client.set_model_version_tag(args.model, str(args.version), TAG_PREFIX + "registration_signature", signature)
    print(f"signed {args.model} version {args.version} (digest {digest[:12]}) as {who}; the registry_handoff sensor "
          f"records you as its author once it verifies the signature against the policy")
    return 0


import click  # noqa: E402

from platform_defs.cli_base import GROUP_SETTINGS, verb  # noqa: E402

_KEY = click.option("--key", help="private key file (default $ONEPATH_HOME/keys/identities/NAME.key)")


@click.command("approve")  # its help: platform_defs.cli.VERBS
@click.argument("asset")
@click.option("--version", required=True)
@click.option("--env", required=True)
@click.option("--reason", required=True)
@click.option("--as", "as_", metavar="NAME", help="approver identity (default $ONEPATH_IDENTITY)")
@_KEY
@click.option("--first-release", is_flag=True, help="also sign that this is the first release there (no previous version to roll back to)")
def approve(**kw):  # noqa: ANN003
    return verb(cmd_approve)(**kw)


@click.command("revoke")  # its help: platform_defs.cli.VERBS
@click.argument("asset")
@click.option("--version", required=True)
@click.option("--env", required=True)
@click.option("--reason", required=True)
@click.option("--entry", type=int, help="the approval's ledger seq: revokes that approval in every entry carrying it "
                   "(default: every approval of that version in that environment recorded so far or signed before now)")
@click.option("--as", "as_", metavar="NAME", help="revoker identity (default $ONEPATH_IDENTITY)")
@_KEY
def revoke(**kw):  # noqa: ANN003
    return verb(cmd_revoke)(**kw)


@click.command("sign-version")  # its help: platform_defs.cli.VERBS
@click.argument("model")
@click.option("--version", required=True)
@click.option("--as", "as_", metavar="NAME", help="your identity (default $ONEPATH_IDENTITY)")
@_KEY
def sign_version(**kw):  # noqa: ANN003
    return verb(cmd_sign_version)(**kw)


@click.group("keys", context_settings=GROUP_SETTINGS)
def keys() -> None:
    pass  # its help: platform_defs.cli.VERBS (one place: `onepath --help` lists it without importing this module)


@keys.command("init", help="create an Ed25519 key pair for an identity")
@click.option("--identity", required=True)
@click.option("--out", help="where to write the private key")
def _keys_init(**kw):  # noqa: ANN003
    return verb(cmd_keys_init)(**kw)
