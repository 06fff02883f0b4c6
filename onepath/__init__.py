"""onepath for data scientists: ``import onepath; onepath.register(model, train=df_train, test=df_test, ...)``.

See README, "Registering from a notebook": one call registers the model, then ``onepath promote <name> --to prod``.

``onepath.Dataset``, ``Model``, ``Endpoint``, ``AppRelease`` and ``ModelLine`` are the Dagster component types
of a declaration file (``type: onepath.Model``); they are imported on first use (``platform_defs.components``
imports Dagster, which a notebook's ``import onepath`` need not pay for).
"""

from platform_defs.notebook import NotebookError, Registered, predict, register

COMPONENT_TYPES = ("Dataset", "Model", "Endpoint", "AppRelease", "ModelLine")
__all__ = ["register", "predict", "Registered", "NotebookError", *COMPONENT_TYPES]


def __getattr__(name: str):
    if name in COMPONENT_TYPES:
        from platform_defs import components

        return getattr(components, name)
    raise AttributeError(f"module 'onepath' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(COMPONENT_TYPES))
