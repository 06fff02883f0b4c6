"""Trainers from installed packages: a model declares ``trainer: "onepath.trainers:NAME"`` and NAME is looked
up in the ``onepath.trainers`` entry-point group (``[project.entry-points."onepath.trainers"] gbm =
"acme_trainers:train_gbm"``). What it resolves to is an ordinary trainer: ``(X, y, params) -> fitted
estimator``, whose source file's hash is the version's code hash, as for a trainer in the project.

A name no installed package provides, or one two packages provide, is an ``AttributeError`` naming the group
(``onepath validate`` shows it as the declaration's ``trainer`` problem)."""

from __future__ import annotations

from typing import Any

GROUP = "onepath.trainers"


def __getattr__(name: str) -> Any:  # PEP 562: every attribute is an entry point's name
    if name.startswith("__"):
        raise AttributeError(name)
    from platform_defs.governance.custom_checks import dist_of, entry_points_named  # one lookup for both groups

    found = entry_points_named(GROUP, name)
    if not found:
        raise AttributeError(f"no installed package provides trainer '{name}' in entry-point group '{GROUP}'")
    if len(found) > 1:
        raise AttributeError(f"trainer '{name}' in entry-point group '{GROUP}' is provided by more than one package "
                             f"({', '.join(sorted(f'{dist_of(e)} ({e.value})' for e in found))}): name its "
                             f"module:function instead")
    return found[0].load()
