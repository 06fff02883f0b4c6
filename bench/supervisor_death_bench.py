"""Supervisor-death benchmark: what a SIGKILLed supervisor costs clients, and how long the way back takes.

    .venv/bin/python bench/supervisor_death_bench.py [--kills 5] [--relaunches 3] [--rate 150] [--json out.json]

All inside a fresh temporary directory (removed at the end): trains and saves the credit model, deploys it with
``LocalProcessDeployer`` (two workers), then

1. ``--kills`` times: a client at ``--rate`` requests/s through the stable address (a new connection
   each, ``tests.test_supervisor_death.Load``), SIGKILL the supervisor, wait until it is gone, call
   ``revive`` (what the ``endpoint_status`` sensor calls) and time it until the new supervisor answers
   having adopted the workers; keep the load on for 50 more answers. Reports failed requests (the
   target is 0) and the revive times;
2. ``--relaunches`` times: SIGKILL the supervisor and both workers, ``revive``, and time it to the
   first answer at the stable address (an outage: the model loads again).

No baseline to compare with: before adoption a dead supervisor left its address refusing until the
next deploy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resources.deployers.base import Target, probe  # noqa: E402
from resources.deployers.local import LocalProcessDeployer  # noqa: E402
from resources.processes import pid_alive  # noqa: E402
from tests.conftest import _free_port_base, model_release, save_credit_model, wait_for  # noqa: E402
from tests.test_supervisor_death import Load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--relaunches", type=int, default=3)
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.umask(0o077)
    root = Path(tempfile.mkdtemp(prefix="onepath-death-bench-"))
    model = save_credit_model(root / "model", seed=1)
    deployer = LocalProcessDeployer(root / "run", port_base=_free_port_base(), artifact_roots=[root])
    target = Target("death_bench", "prod", "endpoint")
    state = lambda: json.loads((deployer.slot_dir(target) / "state.json").read_text())  # noqa: E731
    try:
        st = deployer.deploy(target, model_release("1", model, {"model_name": "m", "inference_log": False}, workers=2))
        adopt, relaunch, failures, requests = [], [], [], 0
        for _ in range(args.kills):
            load = Load(st.address, rate=args.rate)
            wait_for("the load answered", load.more(50), 30)
            sup = state()["pid"]
            os.kill(sup, signal.SIGKILL)
            wait_for("the supervisor gone", lambda: not pid_alive(sup), 10)
            t0 = time.monotonic()
            deployer.revive(target)
            adopt.append(round(time.monotonic() - t0, 3))
            wait_for("50 more answers", load.more(50), 30)
            load.stop()
            failures += load.failures
            requests += load.ok + len(load.failures)
        for _ in range(args.relaunches):
            pids = [state()["pid"], *state()["current"]["pids"]]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            wait_for("all gone", lambda: not any(pid_alive(p) for p in pids), 10)
            t0 = time.monotonic()
            deployer.revive(target)
            wait_for("an answer at the stable address", lambda: probe(st.address), 120, poll=0.01)
            relaunch.append(round(time.monotonic() - t0, 3))
            wait_for("current again", lambda: (state().get("current") or {}).get("state") == "current", 120)
        out = {"revive_to_adopted_seconds": adopt, "requests": requests, "failed": len(failures),
               "failures": failures[:5], "revive_to_first_answer_after_relaunch_seconds": relaunch}
        print(json.dumps(out, indent=2))
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        deployer.stop_all()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
