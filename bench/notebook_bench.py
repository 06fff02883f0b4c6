"""Notebook -> prod answering, with the example policy, from a fresh ONEPATH_HOME.

    PYTHONPATH=. python bench/notebook_bench.py

Counts the data scientist's steps (register, promote, call), the lines of YAML written (the declaration
onepath.register wrote) and the wall time from the register call to the prod endpoint answering. The
promotion is driven in-process through the same flow the env assets run (platform_defs.promotion), with a
short bake (no traffic in a bench); the platform engineer's one-time setup (the policy recorded, the demo
identity) is done before the clock starts and not counted.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="onepath_nb_bench_"))
    decl = home / "assets"
    os.environ.update({"ONEPATH_HOME": str(home / "home"), "ONEPATH_DECLARATIONS_DIR": str(decl)})
    import shutil

    for team in ("credit", "retention"):
        shutil.copytree(ROOT / "assets" / team, decl / team)
    import httpx
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    import onepath
    from platform_defs.loader import load_organisation
    from platform_defs.promotion import Services, promote_endpoint
    from platform_defs.settings import load_settings
    from platform_defs.wiring import build_resources
    from tests.conftest import cli_headers, quick_policy, record_policy

    settings = load_settings().ensure_dirs()
    resources = build_resources(settings)
    book = resources["ledger"].ledger()
    policy = quick_policy()
    record_policy(book, policy)  # one-time setup: the platform engineer records the policy
    rng = np.random.default_rng(3)
    n = 1200
    df = pd.DataFrame({"amount": rng.gamma(2, 50, n), "hour": rng.integers(0, 24, n).astype(float),
                       "age_band": rng.choice(["18-30", "31-50", "51+"], n)})
    df["is_fraud"] = ((df.amount > 150) | (rng.random(n) < 0.1)).astype(int)
    df_train, df_test = train_test_split(df, test_size=0.3, random_state=1, stratify=df.is_fraud)
    model = LogisticRegression().fit(df_train[["amount", "hour"]], df_train.is_fraud)
    before = {p: p.read_text() for p in decl.rglob("defs.yaml")}

    t0 = time.perf_counter()
    steps = 0
    reg = onepath.register(model, train=df_train, test=df_test, label="is_fraud", name="fraud", owner="retention",
                           protected=["age_band"], identity="carla", policy=policy, quiet=True,
                           key=ROOT / "assets/demo_identities/carla.key")
    steps += 1
    t_reg = time.perf_counter() - t0
    text = reg.declaration.read_text()
    yaml_lines = len(text.splitlines()) - len(before.get(reg.declaration, "").splitlines())
    org = load_organisation(decl, policy)
    services = Services(mlflow=resources["mlflow"], deployer=resources["deployer_local"].deployer(), ledger=book,
                        data_store=resources["data_store"])
    outcome = "answered"
    try:
        steps += 1  # onepath promote fraud --to prod
        for env in ("staging", "prod"):
            result = promote_endpoint(org, policy, "fraud_scoring", env, services=services, actor="bench",
                                      trigger="bench")
        headers = cli_headers(book, services.deployer, "fraud_scoring", "prod", org)
        resp = httpx.post(f"{result.address}/predict", headers=headers, timeout=30,
                          json={"records": df_test.head(3)[["amount", "hour"]].to_dict(orient="records")})
        steps += 1
        resp.raise_for_status()
    except Exception as err:  # noqa: BLE001 - the bench reports where the path stopped
        outcome = f"stopped: {str(err).splitlines()[0][:120]}"
    finally:
        wall = time.perf_counter() - t0
        services.deployer.stop_all()
    print(f"{'measure':<34} {'value':>10}  target")
    print(f"{'steps (register, promote, call)':<34} {steps:>10}  3")
    print(f"{'lines of YAML written':<34} {yaml_lines:>10}  <= 10")
    print(f"{'register (s)':<34} {t_reg:>10.1f}")
    print(f"{'wall time to prod answering (s)':<34} {wall:>10.1f}")
    print(f"outcome: {outcome}")
    return 0 if outcome == "answered" else 1


if __name__ == "__main__":
    raise SystemExit(main())
