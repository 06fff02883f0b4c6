"""Synthetic customer activity of the lending company's deposit customers (the retention team's data)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from assets.credit.data import _seed

PLANS = ["basic", "plus", "premium"]
CHANNELS = ["app", "web", "branch", "phone"]


def generate_customer_activity(rows: int = 4000, as_of: str = "2026-06-30", shift: float = 0.0,
                               seed: int = 11) -> pd.DataFrame:
    if rows < 1:
        raise ValueError("rows must be at least 1")
    if not 0.0 <= shift <= 1.0:
        raise ValueError("shift must be between 0 and 1")
    rng = np.random.default_rng(_seed(seed, as_of, shift, rows))
    n = rows
    tenure = np.round(np.clip(rng.gamma(2.0, 18 - 8 * shift, n), 0, 240), 1)
    plan = rng.choice(PLANS, n, p=[0.55, 0.3, 0.15])
    fee = np.select([plan == "basic", plan == "plus"], [0.0, 4.99], 12.99)
    logins = np.clip(rng.poisson(12 - 5 * shift, n), 0, 200)
    balance = np.round(np.exp(rng.normal(8.2 - 0.4 * shift, 1.1, n)), 2)
    complaints = np.clip(rng.poisson(0.2 + 0.5 * shift, n), 0, 20)
    channel = rng.choice(CHANNELS, n, p=[0.5, 0.3, 0.1, 0.1])
    z = (2.0 - 0.03 * tenure - 0.1 * logins + 0.9 * complaints + 0.08 * fee
         - 0.2 * np.log1p(balance) + 0.6 * (channel == "branch"))
    churned = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    ids = rng.choice(10**8, n, replace=False)
    return pd.DataFrame({
        "customer_id": [f"C{i:08d}" for i in ids],
        "tenure_months": tenure,
        "plan": plan,
        "monthly_fee": fee,
        "logins_30d": logins.astype("int64"),
        "avg_balance": balance,
        "complaints_90d": complaints.astype("int64"),
        "primary_channel": channel,
        "churned": churned,
    })
