"""Notebook -> prod answering, on a running platform with the example organisation and policy.

    PYTHONPATH=. python bench/notebook_bench.py

Starts `onepath up` on a fresh ONEPATH_HOME with a copy of the example declarations (the platform engineer's
side, not timed: the platform running, the policy it records, the demo identity's key), then times the data
scientist's three steps as a user runs them: `onepath.register(...)` in this process (the notebook), `onepath
promote fraud --to prod` as its own process against the running platform (staging, then prod, each a run the
platform executes), and a POST to the prod endpoint with the credential the promote's curl line names. It
prints the steps, the lines of YAML the register wrote, and the wall time of each step and in all.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _platform(base: Path, decl: Path, port: int) -> tuple[subprocess.Popen, dict[str, str]]:
    import httpx

    from tests.conftest import onepath_env, start_onepath_up

    env = onepath_env(base / "home", port, decl)
    proc = start_onepath_up(env, base / "up.log")
    query = {"query": "{ assetNodeOrError(assetKey: {path: [\"churn_scoring_prod\"]}) { __typename } }"}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"onepath up exited: see {base / 'up.log'}")
        try:
            got = httpx.post(f"http://127.0.0.1:{port}/graphql", json=query, timeout=5).json()
            if got["data"]["assetNodeOrError"]["__typename"] == "AssetNode":
                return proc, env
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            pass
        time.sleep(0.5)  # polling the webserver until its code location loaded
    raise SystemExit(f"onepath up did not serve its code location in 300 s: see {base / 'up.log'}")


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="onepath_nb_bench_"))
    decl = base / "assets"
    for team in (d for d in (ROOT / "assets").iterdir() if (d / "defs.yaml").is_file()):  # the example org
        shutil.copytree(team, decl / team.name)
    port = _free_port()
    started = time.perf_counter()
    proc, env = _platform(base, decl, port)
    print(f"platform up in {time.perf_counter() - started:.1f} s (not counted)", flush=True)
    os.environ.update({k: env[k] for k in ("ONEPATH_HOME", "ONEPATH_DECLARATIONS_DIR")})
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # this process is the notebook, on that home
        os.environ.pop(var, None)
    import httpx
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    import onepath

    rng = np.random.default_rng(3)
    n = 1200
    df = pd.DataFrame({"amount": rng.gamma(2, 50, n), "hour": rng.integers(0, 24, n).astype(float),
                       "age_band": rng.choice(["18-30", "31-50", "51+"], n)})
    df["is_fraud"] = ((df.amount > 150) | (rng.random(n) < 0.1)).astype(int)
    df_train, df_test = train_test_split(df, test_size=0.3, random_state=1, stratify=df.is_fraud)
    model = LogisticRegression().fit(df_train[["amount", "hour"]], df_train.is_fraud)
    before = {p: p.read_text() for p in decl.rglob("defs.yaml")}

    steps, outcome, times = 0, "answered", {}
    t0 = time.perf_counter()
    try:
        reg = onepath.register(model, train=df_train, test=df_test, label="is_fraud", name="fraud",
                               owner="retention", protected=["age_band"], identity="carla", quiet=True,
                               key=ROOT / "assets/demo_identities/carla.key")
        steps, times["register"] = 1, time.perf_counter() - t0
        yaml_lines = len(reg.declaration.read_text().splitlines()) - len(before.get(reg.declaration, "").splitlines())
        t1 = time.perf_counter()
        promoted = subprocess.run([sys.executable, "-m", "platform_defs.cli", *reg.next.split()[1:]], cwd=ROOT,
                                  env=env, text=True, capture_output=True, timeout=1200, check=False)
        times["promote"] = time.perf_counter() - t1
        said = promoted.stdout + promoted.stderr
        if promoted.returncode != 0:
            raise RuntimeError(f"promote refused: {said.strip().splitlines()[-1] if said.strip() else '?'}")
        steps = 2
        t2 = time.perf_counter()
        address = re.search(r"curl -s -X POST (http://\S+)/predict", said).group(1)
        credential = Path(re.search(r"\$\(cat ([^)\s]+)\)", said).group(1)).read_text().strip()
        resp = httpx.post(f"{address}/predict", headers={"authorization": f"Bearer {credential}"}, timeout=30,
                          json={"records": df_test.head(3)[["amount", "hour"]].to_dict(orient="records")})
        resp.raise_for_status()
        steps, times["call"] = 3, time.perf_counter() - t2
    except Exception as err:  # noqa: BLE001 - the bench reports where the path stopped
        outcome = f"stopped after {steps} step(s): {str(err).splitlines()[0][:160]}"
        yaml_lines = locals().get("yaml_lines", 0)
    finally:
        wall = time.perf_counter() - t0
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        from resources.deployers.local import LocalProcessDeployer

        LocalProcessDeployer(base / "home" / "run").stop_all()  # the endpoints it deployed serve on without it
    print(f"{'measure':<40} {'value':>10}  target")
    print(f"{'steps (register, promote, call)':<40} {steps:>10}  3")
    print(f"{'lines of YAML written':<40} {yaml_lines:>10}  <= 10")
    for name, secs in times.items():
        print(f"{name + ' (s)':<40} {secs:>10.1f}")
    print(f"{'wall time, register to prod answering (s)':<40} {wall:>10.1f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; outcome: {outcome}")
    shutil.rmtree(base, ignore_errors=True)
    return 0 if outcome == "answered" else 1


if __name__ == "__main__":
    raise SystemExit(main())
