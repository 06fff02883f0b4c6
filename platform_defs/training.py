"""Helpers for trainers: the usual tabular preprocessing, so a trainer is a few lines."""

from __future__ import annotations

from typing import Any

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


def tabular_pipeline(X: pd.DataFrame, estimator: Any, scale: bool = True) -> Pipeline:
    """Scale numeric columns, one-hot encode the others (unknown categories ignored), then ``estimator``."""
    numeric = [c for c in X.columns if pd.api.types.is_numeric_dtype(X[c]) and not pd.api.types.is_bool_dtype(X[c])]
    categorical = [c for c in X.columns if c not in numeric]
    steps = []
    if numeric:
        steps.append(("num", StandardScaler() if scale else "passthrough", numeric))
    if categorical:
        steps.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False), categorical))
    return Pipeline([("prep", ColumnTransformer(steps)), ("model", estimator)])
