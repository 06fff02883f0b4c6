"""onepath for data scientists and ML engineers.

``import onepath; onepath.register(model, train=df_train, test=df_test, ...)`` registers a model from a notebook
(README, "Registering from a notebook"). ``onepath.CheckContext`` and ``onepath.Verdict`` are the contract of a
custom check (docs/guides/ml-engineer.md; ``platform_defs.governance.custom_checks``).
"""

from platform_defs.governance.custom_checks import CheckContext, Verdict
from platform_defs.notebook import NotebookError, Registered, register

__all__ = ["register", "Registered", "NotebookError", "CheckContext", "Verdict"]
