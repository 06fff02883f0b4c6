"""``onepath witness init --dir D --platform-key B64`` and ``onepath witness serve --dir D --socket PATH``.

Run both as the witness's own OS user (not the platform's): the witness's folder, key and log are
then out of the platform user's reach, which is the whole point (see ``resources.witness``).
Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def cmd_witness_init(args: argparse.Namespace) -> int:
    from resources.witness import WitnessError, init_witness

    try:
        key = init_witness(Path(args.dir), args.platform_key)
    except (WitnessError, OSError) as err:
        print(f"onepath: witness init: {err}", file=sys.stderr)
        return 1
    print(key)
    return 0


def cmd_witness_serve(args: argparse.Namespace) -> int:
    from resources.witness import WitnessError, make_server

    try:
        server = make_server(Path(args.dir), Path(args.socket))
    except (WitnessError, OSError) as err:
        print(f"onepath: witness serve: {err}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"witness serving on {args.socket}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        Path(args.socket).unlink(missing_ok=True)
    return 0


import click  # noqa: E402

from platform_defs.cli_base import GROUP_SETTINGS, verb  # noqa: E402


@click.group("witness", context_settings=GROUP_SETTINGS)
def witness() -> None:
    pass  # its help: platform_defs.cli.VERBS (one place: `onepath --help` lists it without importing this module)


@witness.command("init", help="create the witness's folder (0700), key (0600) and log; print its public key")
@click.option("--dir", "dir", required=True, metavar="D")
@click.option("--platform-key", required=True, metavar="B64",
              help="the platform's public key, b64 raw 32 bytes (onepath's Ledger.platform_public_key_b64)")
def _init(**kw):  # noqa: ANN003
    return verb(cmd_witness_init)(**kw)


@witness.command("serve", help="answer the ledger on a unix socket (one JSON line per request)")
@click.option("--dir", "dir", required=True, metavar="D")
@click.option("--socket", required=True, metavar="PATH",
              help="socket path, inside a folder only the witness's user can write")
def _serve(**kw):  # noqa: ANN003
    return verb(cmd_witness_serve)(**kw)
