"""``onepath policy init|apply|show``: the policy in force is the one recorded, signed, in the ledger.

``init`` records the first policy (trust on first use: signed by a platform admin that policy names);
``apply`` records a change to the policy file, signed by a platform admin of the policy recorded before;
``show`` says which policy is in force and whether the file in use matches it. The signing key defaults
to ``$ONEPATH_HOME/keys/identities/NAME.key`` and is never looked up among the shipped demo keys: pass
``--key assets/demo_identities/pat.key`` to sign as a demo identity (accepted only in demo mode).

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _fail(msg: str) -> int:
    print(f"onepath: {msg}", file=sys.stderr)
    return 1


def _ledger() -> Any:
    from platform_defs.settings import load_settings
    from platform_defs.wiring import build_resources

    return build_resources(load_settings())["ledger"].ledger()


def _record(args: argparse.Namespace, *, initial: bool) -> int:
    from platform_defs.cli_governance import identity_key_path
    from platform_defs.policy import PolicyError, policy_path
    from platform_defs.policy_record import PolicyRecordError, policy_in_force, record_policy
    from resources.approvals import ApprovalError, load_private_key
    from resources.witness import WitnessError

    signer = (args.as_ or "").strip()
    if not signer:
        return _fail(f"say who signs: onepath policy {'init' if initial else 'apply'} --as NAME (a platform admin)")
    path = policy_path()
    key_path = Path(args.key) if args.key else identity_key_path(signer)
    try:
        key = load_private_key(key_path)
        book = _ledger()
        before = policy_in_force(book)
        entry = record_policy(book, path, signer=signer, key=key, initial=initial,
                              change_witness=bool(getattr(args, "change_witness", False)))
    except (PolicyError, PolicyRecordError, ApprovalError, WitnessError) as err:
        return _fail(str(err).splitlines()[0])
    d = entry.data
    if initial:
        print(f"recorded {path} (sha256 {d['hash'][:12]}…) as the policy in force: ledger #{entry.seq}, signed by "
              f"{signer} (trust on first use: the first policy is signed by an admin it names itself)")
    else:
        if d["diff"]:
            print(d["diff"], end="" if d["diff"].endswith("\n") else "\n")
        if before is not None and before.witness_key != d.get("witness_key"):
            print(f"witness: {_key_or_none(before.witness_key)} -> {_key_or_none(d.get('witness_key'))} (pinned from "
                  f"this record on)")
        print(f"recorded the change to {path} (sha256 {d['hash'][:12]}…, was {d['previous_hash'][:12]}… in ledger "
              f"#{d['previous_entry']}): ledger #{entry.seq}, signed by {signer}")
    if d.get("demo"):
        print("demo mode is on in this policy: demo identities and the shipped demo keys are accepted")
    return 0


def _key_or_none(key: str | None) -> str:
    return f"{key[:12]}…" if key else "none"


def cmd_policy_init(args: argparse.Namespace) -> int:
    return _record(args, initial=True)


def cmd_policy_apply(args: argparse.Namespace) -> int:
    return _record(args, initial=False)


def cmd_policy_show(args: argparse.Namespace) -> int:
    from platform_defs.policy import PolicyError, load_policy, policy_hash, policy_path
    from platform_defs.policy_record import PolicyRecordError, file_diff, policy_standing, recorded_policies

    path = policy_path()
    try:
        book = _ledger()
        records = recorded_policies(book)
    except PolicyRecordError as err:
        return _fail(f"the recorded policy chain is broken: {err}")
    try:
        policy = load_policy(path)
    except PolicyError as err:
        policy = None
        file_problem = str(err).splitlines()[0]
    if not records:
        print("no policy is recorded in the ledger yet: run onepath policy init --as <platform admin>")
    else:
        r = records[-1]
        print(f"in force: ledger #{r.seq}, sha256 {r.hash}, signed by {r.signed_by} at {r.signed_at}"
              f"{', demo mode on' if r.demo else ''}; {len(records)} record(s)")
        print(f"platform key pinned: {r.platform_key or 'none'}; witness key: {r.witness_key or 'none'}")
    if policy is None:
        print(f"file {path}: {file_problem}")
        return 1
    standing = policy_standing(book, policy, path)
    if standing.ok:
        print(f"file {path} (sha256 {policy_hash(policy)[:12]}…) is the policy in force")
        return 0
    print(standing.problem)
    diff = file_diff(book, path) if records else ""
    if diff:
        print(diff, end="" if diff.endswith("\n") else "\n")
    return 1


import click  # noqa: E402

from platform_defs.cli_base import GROUP_SETTINGS, verb  # noqa: E402


@click.group("policy", context_settings=GROUP_SETTINGS)
def policy() -> None:
    pass  # its help: platform_defs.cli.VERBS (one place: `onepath --help` lists it without importing this module)


_AS = click.option("--as", "as_", metavar="NAME",
                   help="the platform admin who signs (of the policy recorded before, for apply)")
_KEY = click.option("--key", help="private key file (default $ONEPATH_HOME/keys/identities/NAME.key)")


@policy.command("init", help="record the first policy (trust on first use)")
@_AS
@_KEY
def _init(**kw):  # noqa: ANN003
    return verb(cmd_policy_init)(**kw)


@policy.command("apply", help="record a change to the policy file")
@_AS
@_KEY
@click.option("--change-witness", is_flag=True,
              help="pin the configured witness (ONEPATH_WITNESS_SOCKET), or none, instead of the one pinned in the "
                   "recorded policy")
def _apply(**kw):  # noqa: ANN003
    return verb(cmd_policy_apply)(**kw)


@policy.command("show", help="the policy in force, and whether the policy file matches it")
def _show(**kw):  # noqa: ANN003
    return verb(cmd_policy_show)(**kw)
