"""``onepath doctor``: every configured store, OK or one line naming the store, its address and the fix."""

from __future__ import annotations

import sys

import click

from platform_defs.cli_base import GROUP_SETTINGS


@click.command("doctor", context_settings=GROUP_SETTINGS)
def doctor() -> int:
    from platform_defs.doctor import run_checks
    from platform_defs.settings import load_settings

    failed = 0
    for name, where, problem in run_checks(load_settings()):
        if problem is None:
            print(f"{name}: OK ({where})")
        else:
            failed += 1
            print(problem, file=sys.stderr)
    return 1 if failed else 0
