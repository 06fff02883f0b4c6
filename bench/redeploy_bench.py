"""Redeploy benchmark: does a switch at the stable address drop or stall requests under load?

    .venv/bin/python bench/redeploy_bench.py [--redeploys 20] [--connections 16]
        [--capacity-seconds 10] [--load-share 0.5] [--gap 1.5] [--json results.json]

What it does, all inside a fresh temporary directory:

1. trains the credit model twice (two seeds) with the team's trainer and saves both in MLflow's
   format; deploys version 1 with ``LocalProcessDeployer`` (one worker) at a stable address;
2. measures capacity with wrk: ``--connections`` keep-alive connections, closed loop,
   ``--capacity-seconds``, ``POST /predict {"records": [row]}`` with ~1000 different dataset rows
   (``bench/post_bodies.lua``);
3. runs wrk again, paced at ``--load-share`` of that capacity (wrk has no rate flag: the Lua
   ``delay()`` hook hands out send slots ``1/rate`` apart to whichever connection asks next, so
   the rate holds whatever the latency is, and a connection that is behind its slot sends at once:
   open loop over a pool of keep-alive connections), and while it runs redeploys ``--redeploys``
   times, alternating versions 2 and 1, with ``--gap`` seconds between deploys;
4. reports requests, non-2xx, wrk's socket errors (connect/read/write/timeout; the target is 0 for
   all), the achieved rate against capacity, and latency around each switch.

Latency per switch: every request carries an ``x-request-id``, which the model server echoes; the
Lua ``request()`` hook notes the send time by id and ``response()`` writes (send time, latency,
status, version) per response to a file per wrk thread. A switch window runs from the ``deploy()``
call to its return plus the drain's idle grace (1 s): the worst latency of a switch is the largest
among requests in flight at any moment of its window. Latency is measured from the moment wrk
writes the request; when the server falls behind the pace, requests wait for a free connection
first, which the ``delay()`` hook records as schedule lag (reported separately).

A run with any non-2xx, any socket error, or an achieved rate below 90 % of the target is reported
as INVALID and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CAPACITY_LUA = Path(__file__).resolve().parent / "post_bodies.lua"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FEATURES = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
            "num_open_accounts", "delinquencies_2y", "employment_type", "home_ownership", "purpose"]
IDLE_GRACE = 1.0  # the child's default ONEPATH_DRAIN_IDLE_SECONDS: the old version's drain tail

PACED_LUA = r"""
-- paced POSTs for bench/redeploy_bench.py (written to its temp dir at run time)
--   wrk -s paced.lua URL -- BODIES_FILE PATH RATE_PER_THREAD SAMPLES_PREFIX
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } onepath_timespec;
int clock_gettime(int clk_id, onepath_timespec *tp);
]]
local ts = ffi.new("onepath_timespec")
local function now_us()  -- CLOCK_REALTIME, the clock of Python's time.time()
  ffi.C.clock_gettime(0, ts)
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local bodies, path, idx = {}, "/", 0
local interval_us, next_due = 0, nil
local started, seq, out = {}, 0, nil
local headers = {}
non2xx = 0
max_lag_us = 0
local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  path = args[2]
  interval_us = 1000000 / tonumber(args[3])
  for line in io.lines(args[1]) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
  idx = ((thread_index or 0) * 7919) % #bodies
  out = io.open(args[4] .. "." .. (thread_index or 0), "w")
  out:setvbuf("full")
  headers["Content-Type"] = "application/json"
end

-- called before each request of each connection: hand out the next send slot
function delay()
  local now = now_us()
  if next_due == nil then next_due = now end
  local due = next_due
  next_due = next_due + interval_us
  if due <= now then
    local lag = now - due
    if lag > max_lag_us then max_lag_us = lag end
    if lag > 1000 then out:write(string.format("L %.0f %.0f\n", now, lag)) end
    return 0
  end
  return math.floor((due - now) / 1000)
end

function request()
  idx = idx % #bodies + 1
  seq = seq + 1
  local id = (thread_index or 0) .. "-" .. seq
  headers["x-request-id"] = id
  started[id] = now_us()
  return wrk.format("POST", path, headers, bodies[idx])
end

function response(status, hdrs, body)
  local t = now_us()
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
  local id = hdrs["x-request-id"]
  local t0 = id and started[id]
  if t0 then
    started[id] = nil
    out:write(string.format("R %.0f %.0f %d %s\n", t0, t - t0, status, hdrs["x-model-version"] or "-"))
  else
    out:write(string.format("U %.0f 0 %d -\n", t, status))
  end
end

function done(summary, latency, requests)
  local bad, lag = 0, 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
    lag = math.max(lag, t:get("max_lag_us") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"max_lag_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, bad,
    latency:percentile(50), latency:percentile(99), latency.max, lag))
end
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


from serve_bench import free_port, loadavg  # noqa: E402  (bench/ is the script's own folder)


# ------------------------------------------------------------------------------------------------
# models and bodies


def build_models(tmp: Path, rows: int, n_bodies: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from assets.credit.data import generate_credit_applications
    from assets.credit.trainer import train_credit_risk
    from resources.mlflow_registry import trusted_types

    dirs = {}
    for version, seed in (("1", 1), ("2", 2)):
        t = time.perf_counter()
        df = generate_credit_applications(rows=rows, seed=seed)
        est = train_credit_risk(df[FEATURES], df["defaulted"], {})
        dst = tmp / f"model_v{version}"
        mlflow.sklearn.save_model(est, str(dst), signature=infer_signature(df[FEATURES], est.predict(df[FEATURES])),
                                  input_example=df[FEATURES].head(3), serialization_format="skops",
                                  skops_trusted_types=trusted_types(est))
        dirs[version] = dst
        log(f"version {version}: trained on {len(df)} rows (seed {seed}) and saved in {time.perf_counter() - t:.1f} s")
    df = generate_credit_applications(rows=max(rows, n_bodies), seed=99)
    sample = df.sample(n=min(n_bodies, len(df)), random_state=7)
    records = json.loads(sample[["application_id", *FEATURES]].to_json(orient="records"))
    bodies = tmp / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"records": [r]}) + "\n" for r in records))
    return {"dirs": dirs, "bodies": bodies, "n_bodies": len(records)}


# ------------------------------------------------------------------------------------------------
# wrk


def parse_wrk(stdout: str) -> dict[str, Any]:
    m = re.search(r"^WRK_JSON (\{.*\})$", stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{stdout}")
    res = json.loads(m.group(1))
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["socket_errors"] = res["connect_errors"] + res["read_errors"] + res["write_errors"] + res["timeouts"]
    return res


def wrk_capacity(port: int, bodies: Path, connections: int, seconds: float, timeout: float) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout:g}s", "-s",
           str(CAPACITY_LUA), f"http://127.0.0.1:{port}", "--", str(bodies), "/predict"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return parse_wrk(r.stdout)


def start_paced_wrk(tmp: Path, port: int, bodies: Path, connections: int, rate: float,
                    timeout: float) -> tuple[subprocess.Popen, Path]:
    lua = tmp / "paced.lua"
    lua.write_text(PACED_LUA)
    prefix = tmp / "samples"
    cmd = ["wrk", "-t1", f"-c{connections}", "-d1h", f"--timeout={timeout:g}s", "-s", str(lua),
           f"http://127.0.0.1:{port}", "--", str(bodies), "/predict", f"{rate:.3f}", str(prefix)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, prefix


def stop_wrk(proc: subprocess.Popen) -> dict[str, Any]:
    """wrk stops on SIGINT and still prints its summary and runs ``done()``."""
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip() or out.strip()}")
    return parse_wrk(out)


def read_samples(prefix: Path) -> tuple[list[tuple[float, float, int, str]], list[tuple[float, float]]]:
    """(send time s, latency s, status, version) per response; (time s, lag s) per late send."""
    responses, lags = [], []
    for path in sorted(prefix.parent.glob(prefix.name + ".*")):
        for line in path.read_text().splitlines():
            kind, a, b, *rest = line.split()
            if kind == "R":
                responses.append((float(a) / 1e6, float(b) / 1e6, int(rest[0]), rest[1]))
            elif kind == "L":
                lags.append((float(a) / 1e6, float(b) / 1e6))
    return responses, lags


# ------------------------------------------------------------------------------------------------
# the run


def analyse(responses: list, lags: list, switches: list[dict[str, Any]]) -> dict[str, Any]:
    in_any = [False] * len(responses)
    for sw in switches:
        lo, hi = sw["t_start"], sw["t_end"] + IDLE_GRACE
        worst, n, versions = 0.0, 0, set()
        for i, (t0, lat, status, ver) in enumerate(responses):
            if t0 <= hi and t0 + lat >= lo:  # in flight at some moment of the window
                in_any[i] = True
                n += 1
                worst = max(worst, lat)
                versions.add(ver)
        sw["requests"] = n
        sw["worst_latency_ms"] = worst * 1000
        sw["versions_answering"] = sorted(versions)
        sw["max_lag_ms"] = max((lag for t, lag in lags if lo <= t <= hi), default=0.0) * 1000
    outside = sorted(lat for (t0, lat, *_), inside in zip(responses, in_any) if not inside)
    return {
        "baseline_requests": len(outside),
        "baseline_p50_ms": outside[len(outside) // 2] * 1000 if outside else None,
        "baseline_p99_ms": outside[int(len(outside) * 0.99)] * 1000 if outside else None,
        "baseline_max_ms": outside[-1] * 1000 if outside else None,
        "worst_switch_latency_ms": max((s["worst_latency_ms"] for s in switches), default=None),
        "median_switch_worst_ms": statistics.median([s["worst_latency_ms"] for s in switches]) if switches else None,
        "max_lag_ms": max((lag for _, lag in lags), default=0.0) * 1000,
    }


def table(rows: list[tuple[str, ...]]) -> str:
    head, *body = rows
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redeploys", type=int, default=20)
    ap.add_argument("--connections", "-c", type=int, default=16)
    ap.add_argument("--capacity-seconds", type=float, default=10.0)
    ap.add_argument("--load-share", type=float, default=0.5, help="paced rate as a share of capacity")
    ap.add_argument("--gap", type=float, default=1.5, help="seconds between one deploy's return and the next")
    ap.add_argument("--wrk-timeout", type=float, default=5.0, help="wrk per-request timeout, seconds")
    ap.add_argument("--rows", type=int, default=3000, help="training rows per model version")
    ap.add_argument("--bodies", type=int, default=1000, help="different request bodies")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, samples)")
    args = ap.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is not installed", file=sys.stderr)
        return 2

    from resources.artifact_digest import folder_digest
    from resources.deployers.base import Release, Target
    from resources.deployers.local import LocalProcessDeployer

    tmp = Path(tempfile.mkdtemp(prefix="onepath-redeploy-bench-"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    deployer = LocalProcessDeployer(tmp / "run", port_base=free_port(), inference_log_dir=tmp / "inference",
                                    artifact_roots=[tmp])
    target = Target("credit_risk", "bench", kind="endpoint")
    wrk: subprocess.Popen | None = None

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        log(f"temp dir {tmp}; {os.cpu_count()} CPUs; load average {loadavg()}")
        m = build_models(tmp, args.rows, args.bodies)

        def release(v: str) -> Release:
            digest = folder_digest(m["dirs"][v])  # the server refuses a folder without its digest
            return Release(version=v, artifact=str(m["dirs"][v]), digest=digest,
                           config={"model_name": "credit_risk", "pii_columns": []})

        st = deployer.deploy(target, release("1"))
        port = int(st.address.rsplit(":", 1)[1])
        log(f"version 1 serves at {st.address}")
        wrk_capacity(port, m["bodies"], args.connections, 2, args.wrk_timeout)  # warm-up
        cap = wrk_capacity(port, m["bodies"], args.connections, args.capacity_seconds, args.wrk_timeout)
        log(f"capacity: {cap['rps']:.0f} req/s ({args.connections} connections, closed loop, "
            f"{args.capacity_seconds:g} s), p50 {cap['p50_us'] / 1000:.2f} ms, p99 {cap['p99_us'] / 1000:.2f} ms, "
            f"non-2xx {cap['non2xx']}, socket errors {cap['socket_errors']}")
        rate = cap["rps"] * args.load_share
        wrk, prefix = start_paced_wrk(tmp, port, m["bodies"], args.connections, rate, args.wrk_timeout)
        time.sleep(args.gap)  # a stretch of plain load first: the baseline
        if wrk.poll() is not None:
            raise RuntimeError(f"wrk exited early: {wrk.communicate()}")
        switches = []
        for i in range(args.redeploys):
            v = "2" if i % 2 == 0 else "1"
            t0 = time.time()
            st = deployer.deploy(target, release(v))
            t1 = time.time()
            if st.serving_version != v:
                raise RuntimeError(f"redeploy {i + 1}: expected version {v}, status says {st.serving_version}")
            switches.append({"n": i + 1, "to": v, "t_start": t0, "t_end": t1, "deploy_s": t1 - t0})
            log(f"redeploy {i + 1}/{args.redeploys}: version {v} serves ({t1 - t0:.2f} s)")
            time.sleep(args.gap)  # steady paced load between switches: the baseline samples
        run = stop_wrk(wrk)
        wrk = None
        responses, lags = read_samples(prefix)
        summary = analyse(responses, lags, switches)
        achieved = run["rps"]
        valid = (run["non2xx"] == 0 and run["socket_errors"] == 0 and cap["non2xx"] == 0
                 and cap["socket_errors"] == 0 and achieved >= 0.9 * rate)

        print()
        print(f"onepath redeploy bench: model server (1 worker), wrk 1 thread x {args.connections} keep-alive "
              f"connections, {m['n_bodies']} different bodies; {os.cpu_count()} CPUs, load average {loadavg()} "
              f"at the end")
        print()
        print(table([
            ("metric", "value"),
            ("capacity (closed loop, wrk)", f"{cap['rps']:.0f} req/s"),
            ("paced target", f"{rate:.0f} req/s ({args.load_share:.0%} of capacity)"),
            ("achieved rate", f"{achieved:.0f} req/s ({achieved / cap['rps']:.0%} of capacity, "
                              f"{achieved / rate:.0%} of target)"),
            ("redeploys (alternating 2, 1)", f"{len(switches)} in {run['duration_us'] / 1e6:.1f} s of load"),
            ("requests", str(run["requests"])),
            ("non-2xx", str(run["non2xx"])),
            ("socket errors (connect/read/write/timeout)",
             f"{run['socket_errors']} ({run['connect_errors']}/{run['read_errors']}/{run['write_errors']}/"
             f"{run['timeouts']})"),
            ("latency outside switches p50 / p99 / max",
             f"{summary['baseline_p50_ms']:.2f} / {summary['baseline_p99_ms']:.2f} / "
             f"{summary['baseline_max_ms']:.2f} ms"),
            ("worst latency during a switch (max / median over switches)",
             f"{summary['worst_switch_latency_ms']:.2f} / {summary['median_switch_worst_ms']:.2f} ms"),
            ("max schedule lag (waited for a free connection)", f"{summary['max_lag_ms']:.2f} ms"),
            ("deploy() duration min / median / max",
             " / ".join(f"{f([s['deploy_s'] for s in switches]):.2f}" for f in (min, statistics.median, max))
             + " s"),
        ]))
        print()
        print(table([("switch", "to", "deploy s", "requests in window", "worst latency ms", "max lag ms",
                      "versions answering")] + [
            (str(s["n"]), s["to"], f"{s['deploy_s']:.2f}", str(s["requests"]), f"{s['worst_latency_ms']:.2f}",
             f"{s['max_lag_ms']:.2f}", ",".join(s["versions_answering"])) for s in switches]))
        print()
        print("Switch window = deploy() call to its return + 1 s (the old version's idle grace); worst latency = "
              "largest send-to-response time (wrk Lua response() hook, matched by x-request-id) of requests in "
              "flight in the window.")
        print("RESULT:", "VALID" if valid else "INVALID (non-2xx, socket errors, or the paced rate was not reached)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "capacity": cap, "paced": run, "target_rate": rate, "summary": summary, "switches": switches,
                "valid": valid, "meta": {"python": sys.version.split()[0], "platform": platform.platform(),
                                         "cpus": os.cpu_count(), "connections": args.connections}},
                indent=2, default=str))
            log(f"wrote {args.json}")
        return 0 if valid else 1
    except KeyboardInterrupt as err:
        log(f"interrupted ({str(err) or 'Ctrl-C'}); cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
            wrk.wait()
        deployer.delete(target)
        deployer.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
