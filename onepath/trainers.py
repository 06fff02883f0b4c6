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
    from importlib.metadata import entry_points

    found = {(ep.dist.metadata["Name"] if ep.dist else "?", ep.value): ep for ep in entry_points(group=GROUP, name=name)}
    if not found:
        raise AttributeError(f"no installed package provides trainer '{name}' in entry-point group '{GROUP}'")
    if len(found) > 1:
        raise AttributeError(f"trainer '{name}' in entry-point group '{GROUP}' is provided by more than one package "
                             f"({', '.join(sorted(f'{d} ({v})' for d, v in found))}): name its module:function instead")
    return next(iter(found.values())).load()
