"""What every ``onepath`` verb shares: a Click command that calls a ``cmd_*(args) -> int`` function.

A verb's logic stays a plain function of an ``argparse.Namespace``-like object (its tests call it that way);
``verb(fn)`` turns the Click parameters into that object and returns the function's exit code, which
``platform_defs.cli.main`` hands back. Only the standard library and Click are imported here: the CLI's
start costs what a verb needs, no more.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import click


def verb(fn: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """A Click callback running ``fn`` with the parsed parameters as attributes; returns its exit code."""
    def callback(**kwargs: Any) -> int:
        return int(fn(argparse.Namespace(**kwargs)) or 0)
    callback.__name__ = fn.__name__
    callback.__doc__ = fn.__doc__
    return callback


def exclusive(**names: Any) -> None:
    """Refuse two of mutually exclusive options given together, as a usage error (exit 2)."""
    given = [f"--{k.replace('_', '-')}" for k, v in names.items() if v is not None]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} cannot be given together")


GROUP_SETTINGS = {"help_option_names": ["-h", "--help"]}
