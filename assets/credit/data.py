"""A deterministic synthetic world of credit applications for the example lending company.

Realistic enough to govern: numeric and categorical features, protected attributes (gender, age
band), PII (name, national id, email), a default label driven by the features, an application
period, a ``shift`` parameter that moves the population (incomes fall and spread out, debt rises,
applicants get younger, the purpose mix changes: later issues need a world that changes) and a
``biased`` variant whose historical labels penalise one gender through a proxy feature, so a model
trained on it fails fairness checks.
"""

from __future__ import annotations

import hashlib
from datetime import date, timedelta

import numpy as np
import pandas as pd

FIRST = ["Alex", "Sam", "Maria", "John", "Aisha", "Chen", "Olga", "Luis", "Emma", "Noah", "Fatima", "Ivan",
         "Sofia", "Liam", "Mei", "Omar", "Anna", "Kofi", "Lena", "Raj"]
LAST = ["Smith", "Garcia", "Kowalski", "Nguyen", "Okafor", "Muller", "Rossi", "Silva", "Kim", "Haddad",
        "Jensen", "Novak", "Patel", "Dubois", "Tanaka", "Moreau", "Ivanova", "Khan", "Larsen", "Costa"]
EMPLOYMENT = ["salaried", "self_employed", "part_time", "unemployed", "retired"]
HOME = ["rent", "mortgage", "own"]
PURPOSE = ["debt_consolidation", "home_improvement", "car", "education", "medical", "business"]
AGE_BANDS = ["18-25", "26-35", "36-50", "51-65", "65+"]
TERMS = [12, 24, 36, 48, 60]


def _seed(seed: int, *parts: object) -> int:
    h = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little")


def generate_credit_applications(
    rows: int = 6000,
    period_start: str = "2026-01-01",
    period_end: str = "2026-06-30",
    shift: float = 0.0,
    biased: bool = False,
    seed: int = 42,
) -> pd.DataFrame:
    """Applications received in [period_start, period_end]; same arguments, same rows."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    if not 0.0 <= shift <= 1.0:
        raise ValueError("shift must be between 0 and 1")
    start, end = date.fromisoformat(period_start), date.fromisoformat(period_end)
    if end < start:
        raise ValueError("period_end is before period_start")
    rng = np.random.default_rng(_seed(seed, period_start, period_end, shift, biased, rows))
    n = rows

    gender = rng.choice(["F", "M", "X"], n, p=[0.48, 0.49, 0.03])
    age_p = np.array([0.14, 0.28, 0.32, 0.19, 0.07]) * (1 - shift) + np.array([0.34, 0.34, 0.2, 0.09, 0.03]) * shift
    age_band = rng.choice(AGE_BANDS, n, p=age_p / age_p.sum())
    age_idx = pd.Series(age_band).map({b: i for i, b in enumerate(AGE_BANDS)}).to_numpy()

    # employment: in the biased world part-time work is far more common among women (the proxy)
    emp_p = np.tile([0.62, 0.14, 0.12, 0.05, 0.07], (n, 1))
    if biased:
        emp_p[gender == "F"] = [0.30, 0.08, 0.55, 0.03, 0.04]
    emp_p[age_idx == 4] = [0.10, 0.05, 0.10, 0.02, 0.73]
    employment = np.array([rng.choice(EMPLOYMENT, p=p / p.sum()) for p in emp_p])

    # income: log-normal, lower and wider under shift (the shape changes, not only the mean)
    base_income = np.exp(rng.normal(10.9 - 0.35 * shift, 0.45 + 0.25 * shift, n))
    base_income *= np.select(
        [employment == "part_time", employment == "unemployed", employment == "retired"], [0.55, 0.25, 0.6], 1.0
    )
    base_income *= 0.75 + 0.1 * np.minimum(age_idx, 3)
    annual_income = np.round(base_income, 2)

    term = rng.choice(TERMS, n, p=[0.1, 0.2, 0.35, 0.15, 0.2])
    loan_amount = np.round(np.clip(annual_income * rng.gamma(2.0, 0.18 + 0.1 * shift, n), 500, 250000), 2)
    debt_to_income = np.round(np.clip(rng.beta(2 + 2 * shift, 5 - 2 * shift, n) * 1.4, 0, 2), 4)
    credit_history_years = np.round(np.clip(rng.normal(3 + 6 * age_idx, 3, n), 0, 50), 1)
    num_open_accounts = np.clip(rng.poisson(4 + 2 * shift + age_idx, n), 0, 40)
    delinquencies_2y = np.clip(rng.poisson(0.3 + 0.6 * shift, n), 0, 20)
    home_ownership = np.array(
        [rng.choice(HOME, p=[0.6, 0.3, 0.1] if a < 2 else [0.25, 0.5, 0.25]) for a in age_idx]
    )
    purpose_p = np.array([0.35, 0.15, 0.2, 0.1, 0.08, 0.12]) * (1 - shift) + np.array(
        [0.45, 0.05, 0.1, 0.08, 0.2, 0.12]) * shift
    purpose = rng.choice(PURPOSE, n, p=purpose_p / purpose_p.sum())

    # default risk: driven by the features. Credit history length is deliberately not a driver: it
    # tracks age so closely that any weight on it makes decisions differ by age band.
    z = -4.0 + 1.8 * (
        2.4 * (debt_to_income - 0.4)
        + 0.9 * np.log1p(loan_amount / np.maximum(annual_income, 1000))
        + 0.45 * delinquencies_2y
        + np.select([employment == "unemployed", employment == "part_time", employment == "self_employed"],
                    [1.3, 0.35, 0.25], 0.0)
        + 0.25 * (purpose == "medical") + 0.15 * (term >= 48)
        - 0.2 * (home_ownership == "own")
        + 0.4
    )
    if biased:  # historical decisions that penalised women: the label itself is biased
        z = z + 1.8 * (gender == "F")
    defaulted = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)

    span = (end - start).days + 1
    applied = [start + timedelta(days=int(d)) for d in rng.integers(0, span, n)]
    first = rng.choice(FIRST, n)
    last = rng.choice(LAST, n)
    ids = rng.choice(10**9, n, replace=False)
    return pd.DataFrame({
        "application_id": [f"APP-{start:%Y%m}-{i:09d}" for i in ids],
        "applied_on": [d.isoformat() for d in applied],
        "full_name": [f"{a} {b}" for a, b in zip(first, last)],
        "national_id": [f"{int(x):03d}-{int(y):02d}-{int(z):04d}" for x, y, z in
                        zip(rng.integers(100, 999, n), rng.integers(10, 99, n), rng.integers(1000, 9999, n))],
        "email": [f"{a.lower()}.{b.lower()}{i % 1000}@example.com" for a, b, i in zip(first, last, ids)],
        "gender": gender,
        "age_band": age_band,
        "annual_income": annual_income,
        "loan_amount": loan_amount,
        "loan_term_months": term.astype("int64"),
        "debt_to_income": debt_to_income,
        "credit_history_years": credit_history_years,
        "num_open_accounts": num_open_accounts.astype("int64"),
        "delinquencies_2y": delinquencies_2y.astype("int64"),
        "employment_type": employment,
        "home_ownership": home_ownership,
        "purpose": purpose,
        "defaulted": defaulted,
    })
