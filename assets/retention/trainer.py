"""Trainer of the churn model (owned by the retention team)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier

from platform_defs.training import tabular_pipeline


def train_churn(X: pd.DataFrame, y: pd.Series, params: dict[str, Any]):
    est = HistGradientBoostingClassifier(max_iter=int(params.get("max_iter", 150)),
                                         learning_rate=float(params.get("learning_rate", 0.08)),
                                         random_state=0)
    return tabular_pipeline(X, est, scale=False).fit(X, y)
