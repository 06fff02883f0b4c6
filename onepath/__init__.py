"""onepath for data scientists and ML engineers.

``import onepath; onepath.register(model, train=df_train, test=df_test, ...)`` registers a model from a notebook
(README, "Registering from a notebook"), then ``onepath promote <name> --to prod``; ``onepath.predict(name, rows)``
calls its endpoint. ``onepath.CheckContext`` and ``onepath.Verdict`` are the contract of a custom check
(docs/guides/ml-engineer.md; ``platform_defs.governance.custom_checks``).

``onepath.Dataset``, ``Model``, ``Endpoint``, ``AppRelease`` and ``ModelLine`` are the Dagster component types
of a declaration file (``type: onepath.Model``); they are imported on first use (``platform_defs.components``
imports Dagster, which a notebook's ``import onepath`` need not pay for).
"""

from platform_defs.governance.custom_checks import CheckContext, Verdict
from platform_defs.notebook import NotebookError, Registered, predict, register

COMPONENT_TYPES = ("Dataset", "Model", "Endpoint", "AppRelease", "ModelLine")
__all__ = ["register", "predict", "Registered", "NotebookError", "CheckContext", "Verdict", *COMPONENT_TYPES]


def __getattr__(name: str):
    if name in COMPONENT_TYPES:
        from platform_defs import components

        return getattr(components, name)
    raise AttributeError(f"module 'onepath' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(COMPONENT_TYPES))
