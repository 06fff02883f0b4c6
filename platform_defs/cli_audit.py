"""``onepath audit verify [--full]`` and ``onepath audit export --out DIR``: the platform ledger from the shell.

``verify`` prints one line per finding (the chain, the head signatures under the pinned key, the
witness, the recorded policy chain and whether the policy file matches it) and exits 1 when the ledger
or its policy chain is not intact. Errors are one line on stderr and a non-zero
exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from platform_defs.settings import load_settings


def _ledger():
    return load_settings().ledger()


def _store_errors() -> tuple[type[BaseException], ...]:
    from resources.ledger import STORE_ERRORS

    return STORE_ERRORS


def _error_text(err: BaseException) -> str:
    from resources.ledger import store_error_text

    return store_error_text(err) if isinstance(err, _store_errors()) else str(err)


def _witness_line(ledger, v) -> str:
    if ledger.witness_socket is None:
        return "witness: none configured (ONEPATH_WITNESS_SOCKET)"
    if v.witness_seq is None:
        return f"witness at {ledger.witness_socket}: unreachable"
    return (f"witness at {ledger.witness_socket}: countersigned up to #{v.witness_seq}"
            + (f", {v.unwitnessed} not yet" if v.unwitnessed else ""))


def _ledger_findings(ledger, v, full: bool) -> tuple[bool, list[str], list[str]]:
    """(ok, lines for stdout, lines for stderr) of the ledger check ``v`` (a ``Verification``)."""
    if v.unreadable:  # not tampering: nothing could be judged
        return False, [], [f"ledger UNREADABLE: {v.reason}", _witness_line(ledger, v)]
    if not v.ok:
        where = f" at entry #{v.first_bad_seq}" if v.first_bad_seq is not None else ""
        first, *rest = v.findings or (v.reason,)
        return False, [], [f"ledger TAMPERED{where}: {first}", *rest, _witness_line(ledger, v)]
    if v.entries == 0:
        return True, [f"ledger intact: 0 entries ({ledger.location})"], []
    key = (f"head signed by the platform key pinned in policy #{v.pinned_in}" if v.signed_by_pin
           else "head signed by the platform key (not pinned: no policy recorded yet)")
    return True, [f"ledger intact: {v.entries} entries, head #{v.head_seq} {(v.head_hash or '')[:12]}, {key}"
                  + (", every signature checked" if full else ""), *v.findings, _witness_line(ledger, v)], []


def _policy_findings(ledger, pinned_in: int | None) -> tuple[bool, list[str], list[str]]:
    """(ok, stdout lines, stderr lines) of the recorded policy chain: every ``policy_recorded`` entry signed by a
    platform admin of the one before (the first by one of its own), and the key the ledger checked its head
    with pinned by the newest of them. Whether the policy FILE matches is said, but is not the ledger's integrity."""
    from platform_defs.policy import PolicyError, load_policy
    from platform_defs.policy_record import PolicyRecordError, policy_standing, recorded_policies

    try:
        records = recorded_policies(ledger)
    except PolicyRecordError as err:
        return False, [], [f"policy chain BROKEN: {err}"]
    if not records:
        return True, ["policy: none recorded yet (onepath policy init --as <platform admin>): nothing promotes"], []
    newest = records[-1]
    if pinned_in is not None and pinned_in != newest.seq:
        return False, [], [f"policy chain BROKEN: the ledger's head is checked with the key pinned in #{pinned_in}, "
                           f"but the newest policy record that verifies is #{newest.seq}"]
    out = [f"policy in force: ledger #{newest.seq} sha256 {newest.hash[:12]}, signed by {newest.signed_by} at "
           f"{newest.signed_at}; {len(records)} record(s), each signed by a platform admin of the one before"
           + ("; demo mode ON" if newest.demo else "")]
    try:
        standing = policy_standing(ledger, load_policy())
        out.append("policy file: matches the policy in force" if standing.ok else f"policy file: {standing.problem}")
    except PolicyError as err:
        out.append(f"policy file: {str(err).splitlines()[0]}")
    return True, out, []


def cmd_audit_verify(args: argparse.Namespace) -> int:
    ledger = _ledger()
    try:
        full = bool(getattr(args, "full", False))
        v = ledger.verify(full=full)
        ok, out, err = _ledger_findings(ledger, v, full)
        # the policy records are judged only from an intact ledger (a broken one vouches for none of them)
        policy_ok, policy_out, policy_err = _policy_findings(ledger, v.pinned_in) if v.ok else (True, [], [])
    except (OSError, *_store_errors()) as e:
        print(f"onepath: audit verify failed: {_error_text(e)}", file=sys.stderr)
        return 1
    ok, out, err = ok and policy_ok, out + policy_out, err + policy_err
    for line in out:
        print(line)
    for line in err:
        print(line, file=sys.stderr)
    return 0 if ok else 1


def _when(flag: str, text: str | None):
    """An ISO time (``2026-02-01``, ``2026-02-01T10:00``, with or without a zone; none means UTC), or None."""
    from datetime import UTC, datetime

    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--{flag} {text!r} is not an ISO time: write e.g. 2026-02-01 or 2026-02-01T10:00:00Z")
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def export_filter(asset: str | None, env: str | None, since: str | None, until: str | None):
    """The entries ``audit export`` keeps: of ``asset`` (an entry's subject; an endpoint's or app's environment
    asset ``<name>_<env>`` too), in ``env``, recorded at or after ``since`` and before ``until``."""
    from datetime import datetime

    lo, hi = _when("since", since), _when("until", until)

    def keep(e) -> bool:  # noqa: ANN001
        if asset and e.subject != asset and not (e.env and f"{e.subject}_{e.env}" == asset):
            return False
        if env and e.env != env:
            return False
        if lo or hi:
            ts = datetime.fromisoformat(e.ts)
            if (lo and ts < lo) or (hi and ts >= hi):
                return False
        return True
    return keep


def cmd_audit_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        keep = export_filter(getattr(args, "asset", None), getattr(args, "env", None),
                             getattr(args, "since", None), getattr(args, "until", None))
    except ValueError as err:
        print(f"onepath: {err}", file=sys.stderr)
        return 2
    try:
        n = _ledger().export(out / "ledger.jsonl", out / "ledger.csv", where=keep)
    except (OSError, *_store_errors()) as err:
        print(f"onepath: audit export failed: {_error_text(err)}", file=sys.stderr)
        return 1
    print(f"exported {n} entries to {out / 'ledger.jsonl'} and {out / 'ledger.csv'}")
    return 0


import click  # noqa: E402

from platform_defs.cli_base import GROUP_SETTINGS, verb  # noqa: E402


@click.group("audit", context_settings=GROUP_SETTINGS)
def audit() -> None:
    pass  # its help: platform_defs.cli.VERBS (one place: `onepath --help` lists it without importing this module)


@audit.command("verify", help="recompute every hash and link, check the head signature under the pinned platform "
                              "key and compare with the witness")
@click.option("--full", is_flag=True, help="check every head signature, not only the newest (slower)")
def _verify(**kw):  # noqa: ANN003
    return verb(cmd_audit_verify)(**kw)


@audit.command("export", help="write ledger.jsonl and ledger.csv to a folder: every entry, or those the filters "
                              "keep (all of them must hold)")
@click.option("--out", required=True, metavar="DIR", help="folder to write the files to")
@click.option("--asset", metavar="NAME", help="only entries about this asset: a dataset, model, endpoint or app "
                                              "(its subject), or an environment asset such as credit_scoring_prod")
@click.option("--env", metavar="ENV", help="only entries recorded for this environment (e.g. prod)")
@click.option("--since", metavar="ISO", help="only entries recorded at or after this time, e.g. 2026-02-01 or "
                                             "2026-02-01T10:00:00Z (no zone: UTC)")
@click.option("--until", metavar="ISO", help="only entries recorded before this time (same form as --since)")
def _export(**kw):  # noqa: ANN003
    return verb(cmd_audit_export)(**kw)
