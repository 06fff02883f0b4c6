"""``onepath audit verify`` and ``onepath audit export --out DIR``: the platform ledger from the shell.

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from platform_defs.settings import load_settings


def _ledger():
    from resources.ledger import Ledger, ledger_paths

    db, key = ledger_paths(load_settings().home)
    return Ledger(db, key)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    ledger = _ledger()
    try:
        v = ledger.verify()
    except (OSError, sqlite3.Error) as err:
        print(f"onepath: audit verify failed: {err}", file=sys.stderr)
        return 1
    if not v.ok:
        where = f" at entry #{v.first_bad_seq}" if v.first_bad_seq is not None else ""
        print(f"ledger TAMPERED{where}: {v.reason}", file=sys.stderr)
        return 1
    if v.entries == 0:
        print(f"ledger intact: 0 entries ({ledger.db_path})")
        return 0
    line = (f"ledger intact: {v.entries} entries, head #{v.head_seq} {(v.head_hash or '')[:12]}, "
            f"anchor signed at {v.anchor_signed_at}")
    if v.unanchored:
        line += f" ({v.reason})"
    print(line)
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        n = _ledger().export(out / "ledger.jsonl", out / "ledger.csv")
    except (OSError, sqlite3.Error) as err:
        print(f"onepath: audit export failed: {err}", file=sys.stderr)
        return 1
    print(f"exported {n} entries to {out / 'ledger.jsonl'} and {out / 'ledger.csv'}")
    return 0


def add_audit_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``audit verify`` and ``audit export --out DIR`` to ``onepath``'s subcommands."""
    audit = sub.add_parser("audit", help="check or export the tamper-evident platform ledger")
    asub = audit.add_subparsers(dest="audit_cmd", required=True)
    p = asub.add_parser("verify", help="recompute every hash and link and check the signed anchor")
    p.set_defaults(fn=cmd_audit_verify)
    p = asub.add_parser("export", help="write ledger.jsonl and ledger.csv to a folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the files to")
    p.set_defaults(fn=cmd_audit_export)
    return audit
