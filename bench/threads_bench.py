"""Native threads benchmark: a model worker with 1 OpenMP/BLAS thread against the libraries' default.

    .venv/bin/python bench/threads_bench.py [--seconds 20] [--rate 40] [--train-rows 200000]
        [--json out.json] [--keep]

Why: the churn model (a HistGradientBoostingClassifier pipeline) predicts inside an OpenMP parallel
region. With one thread per core, a single-row prediction waits at OpenMP barriers for cores that a
training run (or another worker) holds. The local deployer therefore sizes a worker's native pools
with the release's ``model_threads`` (default 1); this measures that through the real server.

What it does, all inside a fresh temporary directory (removed at the end, also on Ctrl-C/errors):

1. generates the ``customer_activity`` dataset (``assets.retention.data``), trains ``train_churn``
   on it and saves it with ``mlflow.sklearn.save_model`` (signature, input example);
2. deploys it twice with ``LocalProcessDeployer``, one worker each: "ours" (``model_threads: 1``)
   and "baseline" (``model_threads: os.cpu_count()``, what the libraries take by default), and
   reads ``native_threads`` from each server's ``GET /version``;
3. runs four phases, one server at a time: idle (ours, baseline), then under training (ours,
   baseline). A training phase starts a background process that loops ``train_churn`` on
   ``--train-rows`` generated rows with the libraries' DEFAULT threads (no thread variables), waits
   until it is fitting, and kills it after the phase. A phase sends single-row ``POST /predict``
   at ``--rate`` per second for ``--seconds`` over one keep-alive connection, paced on a fixed
   schedule, after 20 unmeasured warm-up requests (their failures count). Latency runs from sending
   to the full response. One connection: a request that is late (the previous answer came after its
   slot) is sent at once, so a slow server gets fewer requests; the sent rate and the largest
   schedule lag are reported. The server's latency histogram delta comes from ``/metrics``;
4. prints requests, client p50/p99/max, the server's p99 bucket upper bound, non-2xx per server per
   phase, and the ratio baseline/ours of the client p99 under training; ``--json`` writes it all.

INVALID (exit code 1): any non-2xx response or connection error, a server-side 5xx, or a server whose
``native_threads`` are not the ``model_threads`` it was deployed with. Takes about 2 minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FEATURES = ["tenure_months", "plan", "monthly_fee", "logins_30d", "avg_balance", "complaints_90d", "primary_channel"]
TRAINER = """
import sys; sys.path.insert(0, {root!r})
from assets.retention.data import generate_customer_activity
from assets.retention.trainer import train_churn
df = generate_customer_activity(rows={rows}, seed=5)
X, y = df[{features!r}], df["churned"]
print("fitting", flush=True)
while True:
    train_churn(X, y, {{}})
"""

from redeploy_bench import table  # noqa: E402  (bench/ is the script's own folder)
from serve_bench import Cleanup, free_port, loadavg, log, stop_process_group  # noqa: E402


def build_model(tmp: Path, rows: int, n_bodies: int) -> tuple[Path, list[bytes]]:
    import warnings

    warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from assets.retention.data import generate_customer_activity
    from assets.retention.trainer import train_churn
    from resources.mlflow_registry import trusted_types

    t = time.perf_counter()
    df = generate_customer_activity(rows=rows)
    X = df[FEATURES]
    est = train_churn(X, df["churned"], {})
    dst = tmp / "churn_model"
    mlflow.sklearn.save_model(est, str(dst), signature=infer_signature(X, est.predict(X)), input_example=X.head(3),
                              serialization_format="skops", skops_trusted_types=trusted_types(est))
    log(f"churn model: trained on {len(df)} rows and saved in {time.perf_counter() - t:.1f} s")
    sample = df.sample(n=min(n_bodies, len(df)), random_state=7)
    records = json.loads(sample[["customer_id", *FEATURES]].to_json(orient="records"))
    return dst, [json.dumps({"records": [r]}).encode() for r in records]


def get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:300]}")
    return body


def start_trainer(tmp: Path, rows: int, cleanup: Cleanup) -> subprocess.Popen:
    """A process looping ``train_churn`` with the libraries' default threads; returns once it fits."""
    from resources.deployers.base import THREAD_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    logf = open(tmp / "trainer.log", "ab")
    proc = subprocess.Popen([sys.executable, "-c", TRAINER.format(root=str(ROOT), rows=rows, features=FEATURES)],
                            env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    cleanup.push("trainer", lambda: (stop_process_group(proc, grace=5), logf.close()))
    if proc.stdout.readline().strip() != b"fitting":
        raise RuntimeError(f"the trainer did not start: {(tmp / 'trainer.log').read_text()[-1500:]}")
    time.sleep(1.0)  # well into the first fit
    return proc


def drive(port: int, bodies: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Single-row POSTs on a fixed schedule over one keep-alive connection; client + server latency."""
    from platform_defs.governance.bake import Counters, p99_upper_bound

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat, statuses, conn_errors, max_lag = [], {}, [], 0.0

    def one(body: bytes) -> None:
        nonlocal conn
        t = time.perf_counter()
        try:
            conn.request("POST", "/predict", body=body, headers={"content-type": "application/json"})
            (resp := conn.getresponse()).read()
        except (OSError, http.client.HTTPException) as err:
            conn_errors.append(f"{type(err).__name__}: {err}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            return
        lat.append(time.perf_counter() - t)
        statuses[resp.status] = statuses.get(resp.status, 0) + 1

    for i in range(20):  # warm-up, not counted
        one(bodies[i % len(bodies)])
    lat.clear()
    before = Counters.from_text(get(port, "/metrics"))
    t0 = due = time.monotonic()
    i = 0
    while True:  # fixed schedule; a late send goes at once
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
            now = due
        if now >= t0 + seconds:
            break
        max_lag = max(max_lag, now - due)
        one(bodies[i % len(bodies)])
        i += 1
        due += 1.0 / rate
    elapsed = time.monotonic() - t0
    conn.close()
    d = Counters.from_text(get(port, "/metrics")).minus(before)
    lat, n = sorted(lat), len(lat)
    return {"requests": i, "achieved_rate": i / elapsed, "max_schedule_lag_ms": max_lag * 1000,
            "p50_ms": lat[n // 2] * 1000 if n else None, "p99_ms": lat[int(n * 0.99)] * 1000 if n else None,
            "max_ms": lat[-1] * 1000 if n else None, "statuses": statuses,
            "non2xx": sum(c for s, c in statuses.items() if not 200 <= s < 300),
            "connection_errors": len(conn_errors), "connection_error_samples": conn_errors[:5],
            "server_requests": int(d.requests), "server_5xx": int(d.errors),
            "server_p99_le_ms": (p99_upper_bound(d.buckets) or 0.0) * 1000,
            "server_buckets": {str(le): int(v) for le, v in sorted(d.buckets.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per phase")
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second")
    ap.add_argument("--rows", type=int, default=4000, help="rows the served model is trained on")
    ap.add_argument("--train-rows", type=int, default=200000, help="rows of the background training loop")
    ap.add_argument("--bodies", type=int, default=500, help="different request bodies")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args(argv)

    from resources.artifact_digest import folder_digest
    from resources.deployers.base import Release, Target
    from resources.deployers.local import LocalProcessDeployer

    tmp, cleanup = Path(tempfile.mkdtemp(prefix="onepath-threads-bench-")), Cleanup()
    cleanup.push("temp dir", lambda: None if args.keep else shutil.rmtree(tmp, ignore_errors=True))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    cpus = os.cpu_count() or 1
    try:
        log(f"temp dir {tmp}; {cpus} CPUs; load average {loadavg()}")
        model_dir, bodies = build_model(tmp, args.rows, args.bodies)
        deployer = LocalProcessDeployer(tmp / "run", port_base=free_port(), inference_log_dir=tmp / "inference",
                                        artifact_roots=[model_dir.parent])
        cleanup.push("deployer", deployer.stop_all)
        servers: dict[str, dict[str, Any]] = {}
        for name, env, threads in (("ours", "threads1", 1), ("baseline", "threadsN", cpus)):
            target = Target("churn_bench", env, kind="endpoint")
            cleanup.push(f"{name} endpoint", lambda t=target: deployer.delete(t))
            st = deployer.deploy(target, Release("1", str(model_dir), {
                "model_name": "churn", "pii_columns": [], "model_threads": threads},
                digest=folder_digest(model_dir)))
            port = int(st.address.rsplit(":", 1)[1])
            native = json.loads(get(port, "/version"))["native_threads"]
            ok = native.get("openmp") == threads and native.get("blas") == threads
            servers[name] = {"model_threads": threads, "address": st.address, "port": port,
                             "native_threads": native, "native_threads_ok": ok, "phases": {}}
            log(f"{name}: model_threads {threads} at {st.address}; native_threads {native} "
                f"({'as asked' if ok else 'NOT as asked'})")
        for phase in ("idle", "training"):
            for name, srv in servers.items():
                mark = len(cleanup.actions)
                load_before = loadavg()
                if phase == "training":
                    start_trainer(tmp, args.train_rows, cleanup)
                r = drive(srv["port"], bodies, args.rate, args.seconds)
                while len(cleanup.actions) > mark:  # stop the trainer now
                    cleanup.actions.pop()[1]()
                r["loadavg_before"], r["loadavg_after"] = load_before, loadavg()
                srv["phases"][phase] = r
                log(f"{name} {phase}: {r['requests']} requests ({r['achieved_rate']:.1f}/s), p50/p99/max "
                    f"{r['p50_ms']:.2f}/{r['p99_ms']:.2f}/{r['max_ms']:.2f} ms, server p99 <= {r['server_p99_le_ms']:g}"
                    f" ms, non-2xx {r['non2xx']}, connection errors {r['connection_errors']}")

        valid = all(s["native_threads_ok"] and all(p["non2xx"] == 0 and p["connection_errors"] == 0
                                                    and p["server_5xx"] == 0 for p in s["phases"].values())
                    for s in servers.values())
        o, b = servers["ours"]["phases"]["training"], servers["baseline"]["phases"]["training"]
        ratio = b["p99_ms"] / o["p99_ms"] if o["p99_ms"] else float("inf")
        rows = [("server", "model_threads", "native_threads", "phase", "requests", "sent/s", "p50 ms", "p99 ms",
                 "max ms", "server p99 <= ms", "non-2xx", "load avg before/after")]
        for phase in ("idle", "training"):
            for name, s in servers.items():
                p = s["phases"][phase]
                rows.append((name, str(s["model_threads"]), json.dumps(s["native_threads"]), phase,
                             str(p["requests"]), f"{p['achieved_rate']:.1f}",
                             *(f"{p[k]:.2f}" for k in ("p50_ms", "p99_ms", "max_ms")), f"{p['server_p99_le_ms']:g}",
                             str(p["non2xx"] + p["connection_errors"]), f"{p['loadavg_before']} / {p['loadavg_after']}"))
        print()
        print(f"onepath threads bench: churn model, 1 worker per server, single-row POST /predict at "
              f"{args.rate:g}/s for {args.seconds:g} s per phase over one keep-alive connection; training phase = "
              f"train_churn looping on {args.train_rows} rows with default threads; {cpus} CPUs")
        print()
        print(table(rows))
        print()
        print(f"p99 under training, baseline / ours: {b['p99_ms']:.2f} / {o['p99_ms']:.2f} ms = {ratio:.1f}x")
        print("RESULT:", "VALID" if valid else "INVALID (non-2xx, connection errors, 5xx, or wrong native_threads)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "servers": servers, "p99_training_ratio_baseline_over_ours": ratio, "valid": valid,
                "meta": {"seconds": args.seconds, "rate": args.rate, "rows": args.rows, "train_rows": args.train_rows,
                         "bodies": len(bodies), "cpus": cpus, "python": sys.version.split()[0],
                         "platform": platform.platform()}}, indent=2, default=str))
            log(f"wrote {args.json}")
        return 0 if valid else 1
    except KeyboardInterrupt as err:
        log(f"interrupted ({str(err) or 'Ctrl-C'}); cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        cleanup.run()
        if args.keep:
            log(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
