"""How long a new declaration takes to appear in the running UI, against restarting `onepath up` for it.

    PYTHONPATH=. python bench/reload_bench.py [--rounds 5]

Starts `onepath up` on a fresh ONEPATH_HOME with a copy of the example declarations. Each round writes one
more declaration (a copy of the retention line under new names) and times from the write until the
webserver's GraphQL answers with its prod asset (what the UI shows): the watcher notices the change and
reloads the code location. The baseline, in the same run, is what a user had to do before: stop `onepath
up` and start it again, timed from the stop until the same asset is there. Prints each round, the median
and the load average (the target, < 10 s, is for a quiet machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import onepath_env, start_onepath_up  # noqa: E402

RETENTION = (ROOT / "assets" / "retention" / "defs.yaml").read_text()


def _line(i: int) -> str:
    """The retention line (dataset, model, endpoint) under names of its own."""
    return (RETENTION.replace(": customer_activity", f": activity_{i}").replace("churn_scoring", f"scoring_{i}")
            .replace("name: churn\n", f"name: churn_{i}\n").replace("model: churn\n", f"model: churn_{i}\n"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Platform:
    def __init__(self, base: Path, decl: Path):
        self.base, self.port = base, _free_port()
        self.env = onepath_env(base / "home", self.port, decl)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_onepath_up(self.env, self.base / "up.log")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=120)

    def has(self, asset: str) -> bool:
        import httpx

        q = {"query": '{ assetNodeOrError(assetKey: {path: ["%s"]}) { __typename } }' % asset}
        try:
            got = httpx.post(f"http://127.0.0.1:{self.port}/graphql", json=q, timeout=5).json()
            return got["data"]["assetNodeOrError"]["__typename"] == "AssetNode"
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return False

    def wait_for(self, asset: str, seconds: float = 300) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            if self.proc.poll() is not None:
                raise SystemExit(f"onepath up exited: see {self.base / 'up.log'}")
            if self.has(asset):
                return time.perf_counter() - t0
            time.sleep(0.1)  # polling the webserver: the latency is measured to a tenth of a second
        raise SystemExit(f"{asset} did not appear in {seconds:.0f} s: see {self.base / 'up.log'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="onepath_reload_bench_"))
    decl = base / "assets"
    for team in (d for d in (ROOT / "assets").iterdir() if (d / "defs.yaml").is_file()):  # the example org
        shutil.copytree(team, decl / team.name)
    platform = Platform(base, decl)
    platform.start()
    print(f"platform up in {platform.wait_for('churn_scoring_prod'):.1f} s", flush=True)
    reloads, restarts = [], []
    try:
        for i in range(args.rounds):
            (decl / f"bench{i}").mkdir()
            t0 = time.perf_counter()
            (decl / f"bench{i}" / "defs.yaml").write_text(_line(i))
            platform.wait_for(f"scoring_{i}_prod")
            reloads.append(time.perf_counter() - t0)
            print(f"round {i + 1}: reload {reloads[-1]:.1f} s", flush=True)
        for i in range(min(2, args.rounds)):  # the baseline: a restart, from the stop to the asset back
            t0 = time.perf_counter()
            platform.stop()
            platform.start()
            platform.wait_for("scoring_0_prod")
            restarts.append(time.perf_counter() - t0)
            print(f"restart {i + 1}: {restarts[-1]:.1f} s", flush=True)
    finally:
        platform.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{'measure':<46} {'median':>8}  {'max':>6}  target")
    print(f"{'new declaration visible, watcher reload (s)':<46} {statistics.median(reloads):>8.1f}  "
          f"{max(reloads):>6.1f}  < 10")
    print(f"{'the same by restarting onepath up (s)':<46} {statistics.median(restarts):>8.1f}  {max(restarts):>6.1f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores: {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
