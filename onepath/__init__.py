"""onepath for data scientists: ``import onepath; onepath.register(model, train=df_train, test=df_test, ...)``.

See README, "Registering from a notebook": one call registers the model, then ``onepath promote <name> --to prod``.
"""

from platform_defs.notebook import NotebookError, Registered, predict, register

__all__ = ["register", "predict", "Registered", "NotebookError"]
