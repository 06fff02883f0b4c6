"""Trainer of the credit_risk model (owned by the credit-risk team)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from sklearn.linear_model import LogisticRegression

from platform_defs.training import tabular_pipeline


def train_credit_risk(X: pd.DataFrame, y: pd.Series, params: dict[str, Any]):
    est = LogisticRegression(C=float(params.get("C", 0.5)), max_iter=2000,
                             class_weight=params.get("class_weight"))
    return tabular_pipeline(X, est).fit(X, y)
