"""Serving benchmark: onepath's model server against ``mlflow models serve``, in one run.

    .venv/bin/python bench/serve_bench.py [--connections 16] [--duration 15]
        [--threads 1] [--warmup 2] [--json results.json]

What it does, all inside a fresh temporary directory:

1. generates the synthetic credit dataset, trains ``credit_risk`` with the team's trainer, logs it
   with ``mlflow.sklearn.log_model`` (signature, input example) to an MLflow sqlite store in the temp
   dir and registers version 1;
2. serves that same registered version two ways, each from cold: (a) onepath's
   ``LocalProcessDeployer.deploy`` (one worker) at its stable address, (b) ``mlflow models serve -m
   models:/credit_risk/1 --env-manager local -w 1``. Cold start = from the deploy call (from
   ``Popen`` for mlflow) to the first successful prediction, polled with a real request;
3. drives each with wrk, same settings, bodies drawn from ~1000 different dataset rows: onepath gets
   ``POST /predict {"records": [row]}`` (row carries ``application_id`` as a pass-through column),
   mlflow gets ``POST /invocations {"dataframe_records": [row]}`` (features only). The server
   process tree is pinned to CPU 0 and wrk to CPU 1 (taskset) when the machine allows it;
4. prints requests/s, p50, p99, non-2xx, cold start for both, the ratios and the targets, and writes
   the same as JSON to ``--json``;
5. stops everything it started, also on Ctrl-C or an error.

A run where either server answered anything but 2xx, or wrk saw socket errors, is reported as
INVALID and the script exits non-zero. ``./dev install`` compiles the venv's bytecode; on a venv
without it (and with PYTHONDONTWRITEBYTECODE=1, as on our machines) every cold start compiles every
imported module from source, which ``--bytecode-cache DIR`` works around for both servers alike. A
run takes about 1.5 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "post_bodies.lua"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FEATURES = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
            "num_open_accounts", "delinquencies_2y", "employment_type", "home_ownership", "purpose"]
PII = ["full_name", "national_id", "email"]
MODEL_NAME = "credit_risk"
TARGETS = {  # ours / mlflow
    "rps": (">=", 5.0),
    "p99": ("<=", 0.25),
    "cold_start": ("<=", 0.5),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# process helpers


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in parents.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def process_tree(pid: int) -> list[int]:
    return [pid, *children_of(pid)]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def allowed_cpus(pid: int) -> set[str]:
    """The CPU lists of all threads of ``pid``."""
    out = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("Cpus_allowed_list:"):
                        out.add(line.split(":", 1)[1].strip())
        except OSError:
            pass
    return out


def can_pin() -> tuple[bool, str]:
    if not shutil.which("taskset"):
        return False, "taskset not found"
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return False, "no sched_getaffinity"
    if not {0, 1} <= cpus:
        return False, f"CPUs 0 and 1 are not both available (have {sorted(cpus)})"
    return True, "ok"


def pin_tree(root_pid: int, cpu: int) -> dict[str, Any]:
    """Pin every thread of every process in the tree to ``cpu``; report what it really got."""
    pids = process_tree(root_pid)
    procs = []
    ok = True
    for pid in pids:
        r = subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], capture_output=True, text=True)
        got = allowed_cpus(pid)
        pinned = r.returncode == 0 and got == {str(cpu)}
        ok = ok and pinned
        procs.append({"pid": pid, "cmd": cmdline(pid)[:160], "pinned": pinned, "cpus_allowed": sorted(got),
                      **({"taskset_error": r.stderr.strip()} if r.returncode else {})})
    return {"cpu": cpu, "ok": ok and bool(pids), "processes": procs}


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except OSError:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.wait(5)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# HTTP probing


def post(port: int, path: str, body: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_first_prediction(port: int, path: str, body: bytes, t0: float, timeout: float,
                          alive: Callable[[], bool]) -> tuple[float, bytes]:
    """Poll with a real prediction request until it succeeds; seconds since ``t0``."""
    deadline = t0 + timeout
    last = ""
    while time.perf_counter() < deadline:
        try:
            code, out = post(port, path, body, timeout=10)
            if code == 200:
                return time.perf_counter() - t0, out
            last = f"HTTP {code}: {out[:300]!r}"
        except (OSError, http.client.HTTPException) as err:
            last = f"{type(err).__name__}: {err}"
        if not alive():
            raise RuntimeError(f"the server exited before answering; last: {last}")
        time.sleep(0.005)
    raise RuntimeError(f"no successful prediction within {timeout} s; last: {last}")


# ------------------------------------------------------------------------------------------------
# wrk


def run_wrk(port: int, path: str, bodies: Path, args: argparse.Namespace, duration: float,
            pin: bool) -> dict[str, Any]:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency",
           f"--timeout={args.wrk_timeout:g}s", "-s", str(LUA), f"http://127.0.0.1:{port}", "--",
           str(bodies), path]
    if pin:
        cmd = ["taskset", "-c", "1", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    m = re.search(r"^WRK_JSON (\{.*\})$", r.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{r.stdout}\n{r.stderr}")
    res = json.loads(m.group(1))
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", r.stdout, re.M)
    non2xx_line = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", r.stdout)
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["rps_wrk_line"] = float(rps.group(1)) if rps else None
    res["non2xx_wrk_line"] = int(non2xx_line.group(1)) if non2xx_line else 0
    res["socket_errors"] = res["connect_errors"] + res["read_errors"] + res["write_errors"] + res["timeouts"]
    res["p50_ms"], res["p99_ms"] = res["p50_us"] / 1000, res["p99_us"] / 1000
    res["stdout"] = r.stdout
    return res


# ------------------------------------------------------------------------------------------------
# the model


def build_model(tmp: Path, rows: int, n_bodies: int) -> dict[str, Any]:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
    import mlflow
    from mlflow.models import infer_signature

    from assets.credit.data import generate_credit_applications
    from assets.credit.trainer import train_credit_risk

    t = time.perf_counter()
    df = generate_credit_applications(rows=rows)
    X, y = df[FEATURES], df["defaulted"]
    model = train_credit_risk(X, y, {})
    log(f"dataset {len(df)} rows, trained in {time.perf_counter() - t:.1f} s")

    exp = mlflow.create_experiment("serve_bench", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.sklearn.log_model(
            model, name="model", signature=infer_signature(X, model.predict(X)), input_example=X.head(5),
            registered_model_name=MODEL_NAME,
        )
    version = str(info.registered_model_version)
    if version != "1":
        raise RuntimeError(f"expected version 1 of a fresh registry, got {version}")
    uri = f"models:/{MODEL_NAME}/{version}"
    t = time.perf_counter()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / "model_v1")))
    download_s = time.perf_counter() - t
    mlmodel = (local / "MLmodel").read_text()
    fmt = re.search(r"serialization_format:\s*(\S+)", mlmodel)

    # request bodies: n different rows of the dataset, with the natural JSON types
    sample = df.sample(n=min(n_bodies, len(df)), random_state=7)
    records = json.loads(sample[["application_id", *FEATURES]].to_json(orient="records"))
    ours = tmp / "bodies_onepath.jsonl"
    theirs = tmp / "bodies_mlflow.jsonl"
    with open(ours, "w") as fo, open(theirs, "w") as ft:
        for rec in records:
            fo.write(json.dumps({"records": [rec]}) + "\n")
            ft.write(json.dumps({"dataframe_records": [{k: rec[k] for k in FEATURES}]}) + "\n")
    return {"uri": uri, "version": version, "local": local, "download_s": download_s,
            "serialization_format": fmt.group(1) if fmt else None, "bodies_onepath": ours,
            "bodies_mlflow": theirs, "n_bodies": len(records),
            "first_onepath": json.dumps({"records": [records[0]]}).encode(),
            "first_mlflow": json.dumps({"dataframe_records": [{k: records[0][k] for k in FEATURES}]}).encode(),
            "mlflow_version": mlflow.__version__}


# ------------------------------------------------------------------------------------------------
# the two servers


class Cleanup:
    def __init__(self) -> None:
        self.actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, name: str, fn: Callable[[], None]) -> None:
        self.actions.append((name, fn))

    def run(self) -> None:
        while self.actions:
            name, fn = self.actions.pop()
            try:
                fn()
            except BaseException as err:  # keep cleaning up
                log(f"cleanup {name}: {type(err).__name__}: {err}")


def bench_onepath(tmp: Path, m: dict[str, Any], args: argparse.Namespace, pin: bool,
                  cleanup: Cleanup) -> dict[str, Any]:
    from resources.artifact_digest import folder_digest
    from resources.deployers.base import Release, Target
    from resources.deployers.local import LocalProcessDeployer

    deployer = LocalProcessDeployer(tmp / "run", host="127.0.0.1", port_base=args.port_base,
                                    artifact_roots=[m["local"].parent])
    target = Target(MODEL_NAME, "bench", kind="endpoint")

    def stop() -> None:
        deployer.delete(target)
        try:  # belt and braces: the supervisor runs in its own session (process group = its pid)
            slot = deployer.slot_dir(target)
            pid = int(json.loads((slot / "state.json").read_text())["pid"])
            if "resources.serving.supervisor" in cmdline(pid) and str(slot) in cmdline(pid):  # still ours
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass

    cleanup.push("onepath endpoint", stop)
    digest = folder_digest(m["local"])  # the server refuses a folder without its digest
    release = Release(version=m["version"], artifact=str(m["local"]), digest=digest,
                      config={"model_name": MODEL_NAME, "pii_columns": PII, "max_batch": 64}, workers=1)
    t0 = time.perf_counter()
    st = deployer.deploy(target, release)
    deploy_s = time.perf_counter() - t0
    port = int(st.address.rsplit(":", 1)[1])
    sup = (st.detail.get("supervisor") or {})
    sup_pid = sup.get("pid")
    cold, first = wait_first_prediction(port, "/predict", m["first_onepath"], t0, args.start_timeout,
                                        alive=lambda: True)
    log(f"onepath: deploy() returned in {deploy_s:.2f} s, first prediction at {cold:.2f} s: {first[:160]!r}")
    pinning = pin_tree(int(sup_pid), 0) if pin and sup_pid else {"ok": False, "processes": []}
    def stats() -> tuple[int, int]:  # (rows scored, model calls) from the server's /metrics
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        get = lambda name: int(float(re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M).group(1)))
        return get("onepath_predictions_total"), get("onepath_batches_total")

    return {"port": port, "cold_start_s": cold, "deploy_returned_s": deploy_s, "root_pid": sup_pid, "stats": stats,
            "pinning": pinning, "path": "/predict", "bodies": m["bodies_onepath"],
            "first_response": first.decode(errors="replace")[:400]}


def bench_mlflow(tmp: Path, m: dict[str, Any], args: argparse.Namespace, pin: bool,
                 cleanup: Cleanup) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # `uvicorn` is run by name
    mlflow_bin = shutil.which("mlflow", path=venv_bin) or "mlflow"
    logf = open(tmp / "mlflow_serve.log", "wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [mlflow_bin, "models", "serve", "-m", m["uri"], "--env-manager", "local", "-w", "1", "-p", str(port),
         "-h", "127.0.0.1"],
        env=env, cwd=str(tmp), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    cleanup.push("mlflow models serve", lambda: (stop_process_group(proc), logf.close()))
    try:
        cold, first = wait_first_prediction(port, "/invocations", m["first_mlflow"], t0, args.start_timeout,
                                            alive=lambda: proc.poll() is None)
    except RuntimeError as err:
        raise RuntimeError(f"mlflow models serve: {err}\n{(tmp / 'mlflow_serve.log').read_text()[-2000:]}")
    log(f"mlflow: first prediction at {cold:.2f} s: {first[:160]!r}")
    pinning = pin_tree(proc.pid, 0) if pin else {"ok": False, "processes": []}
    return {"port": port, "cold_start_s": cold, "root_pid": proc.pid, "pinning": pinning,
            "path": "/invocations", "bodies": m["bodies_mlflow"],
            "first_response": first.decode(errors="replace")[:400]}


def drive(name: str, srv: dict[str, Any], args: argparse.Namespace, pin: bool) -> None:
    srv["loadavg_before"] = loadavg()
    if args.warmup > 0:
        w = run_wrk(srv["port"], srv["path"], srv["bodies"], args, args.warmup, pin)
        log(f"{name}: warm-up {args.warmup:g} s: {w['rps']:.0f} req/s, non-2xx {w['non2xx']}")
        srv["warmup"] = {k: v for k, v in w.items() if k != "stdout"}
    before = srv["stats"]() if srv.get("stats") else None
    r = run_wrk(srv["port"], srv["path"], srv["bodies"], args, args.duration, pin)
    if before is not None:
        after = srv["stats"]()
        rows, batches = after[0] - before[0], after[1] - before[1]
        srv["server_stats"] = {"rows": rows, "model_calls": batches,
                               "rows_per_model_call": rows / batches if batches else None}
        log(f"{name}: server scored {rows} rows in {batches} model calls "
            f"({rows / max(batches, 1):.1f} rows per call)")
    log(f"{name}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
        f"non-2xx {r['non2xx']}, socket errors {r['socket_errors']}")
    if args.verbose:
        print(r["stdout"])
    srv["wrk"] = {k: v for k, v in r.items() if k != "stdout"}
    srv["wrk_output"] = r["stdout"]
    srv["loadavg_after"] = loadavg()


# ------------------------------------------------------------------------------------------------
# report


def verdict(kind: str, ratio: float) -> str:
    op, bound = TARGETS[kind]
    ok = ratio >= bound if op == ">=" else ratio <= bound
    return "PASS" if ok else "MISS"


def report(ours: dict[str, Any], theirs: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    o, t = ours["wrk"], theirs["wrk"]
    ratios = {
        "rps": o["rps"] / t["rps"] if t["rps"] else float("inf"),
        "p99": o["p99_us"] / t["p99_us"] if t["p99_us"] else float("inf"),
        "cold_start": ours["cold_start_s"] / theirs["cold_start_s"],
    }
    valid = all(s["wrk"]["non2xx"] == 0 and s["wrk"]["non2xx_wrk_line"] == 0 and s["wrk"]["socket_errors"] == 0
                for s in (ours, theirs))
    rows = [
        ("requests/s", f"{o['rps']:.0f}", f"{t['rps']:.0f}", f"{ratios['rps']:.2f}x", ">= 5x",
         verdict("rps", ratios["rps"])),
        ("p50 latency", f"{o['p50_ms']:.2f} ms", f"{t['p50_ms']:.2f} ms", f"{o['p50_us'] / t['p50_us']:.2f}x", "",
         ""),
        ("p99 latency", f"{o['p99_ms']:.2f} ms", f"{t['p99_ms']:.2f} ms", f"{ratios['p99']:.2f}x", "<= 0.25x",
         verdict("p99", ratios["p99"])),
        ("non-2xx", str(o["non2xx"]), str(t["non2xx"]), "", "0", "OK" if o["non2xx"] == t["non2xx"] == 0 else "BAD"),
        ("socket errors", str(o["socket_errors"]), str(t["socket_errors"]), "", "0",
         "OK" if o["socket_errors"] == t["socket_errors"] == 0 else "BAD"),
        ("cold start", f"{ours['cold_start_s']:.2f} s", f"{theirs['cold_start_s']:.2f} s",
         f"{ratios['cold_start']:.2f}x", "<= 0.5x", verdict("cold_start", ratios["cold_start"])),
    ]
    head = ("metric", "onepath", "mlflow serve", "ours/mlflow", "target", "")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print()
    print(f"wrk: {meta['threads']} thread(s), {meta['connections']} connections, {meta['duration']:g} s "
          f"(+{meta['warmup']:g} s warm-up), {meta['n_bodies']} different request bodies; "
          f"model {MODEL_NAME} v1 ({meta['serialization_format']}), mlflow {meta['mlflow_version']}")
    print(f"pinning: servers -> CPU 0, wrk -> CPU 1: {meta['pinning']}")
    print(f"1-min load average before/after each measurement (other work on this machine skews both): onepath "
          f"{ours.get('loadavg_before')} / {ours.get('loadavg_after')}, mlflow {theirs.get('loadavg_before')} / "
          f"{theirs.get('loadavg_after')}")
    if meta.get("bytecode_cache"):
        print(f"bytecode cache: both servers ran with PYTHONPYCACHEPREFIX={meta['bytecode_cache']}")
    print(line)
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
    print(line)
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(line)
    print(f"cold start = deploy() call (mlflow: Popen) -> first 200 prediction. onepath deploy() returned "
          f"after {ours['deploy_returned_s']:.2f} s; downloading the model from the registry beforehand "
          f"took {meta['download_s']:.2f} s (mlflow serve does its download inside its cold start).")
    print("RESULT:", "VALID" if valid else "INVALID (non-2xx responses or socket errors)")
    return {"ratios": ratios, "valid": valid,
            "verdicts": {k: verdict(k, v) for k, v in ratios.items()},
            "targets": {k: f"{op} {b}" for k, (op, b) in TARGETS.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", "-c", type=int, default=16)
    ap.add_argument("--duration", "-d", type=float, default=15.0, help="seconds of measured load")
    ap.add_argument("--threads", "-t", type=int, default=1, help="wrk threads")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load before (0: none)")
    ap.add_argument("--wrk-timeout", type=float, default=5.0, help="wrk per-request timeout, seconds")
    ap.add_argument("--rows", type=int, default=6000, help="dataset rows to generate and train on")
    ap.add_argument("--bodies", type=int, default=1000, help="different request bodies")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds allowed for a cold start")
    ap.add_argument("--port-base", type=int, default=19400, help="first stable port tried for onepath")
    ap.add_argument("--only", choices=["onepath", "mlflow"], help="run one server only (no ratios)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--bytecode-cache", type=Path, metavar="DIR",
                    help="run BOTH servers with Python's bytecode cache in DIR (PYTHONPYCACHEPREFIX, writes "
                         "allowed), as an image with compiled bytecode would; the first run fills DIR. "
                         "Default: the environment as it is")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, inference log)")
    ap.add_argument("--verbose", "-v", action="store_true", help="print wrk's own output")
    args = ap.parse_args(argv)

    if not shutil.which("wrk"):
        print("wrk is not installed", file=sys.stderr)
        return 2
    pin, why = (False, "disabled by --no-pin") if args.no_pin else can_pin()
    tmp = Path(tempfile.mkdtemp(prefix="onepath-serve-bench-"))
    cleanup = Cleanup()
    cleanup.push("temp dir", lambda: None if args.keep else shutil.rmtree(tmp, ignore_errors=True))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    results: dict[str, Any] = {}
    try:
        log(f"temp dir {tmp}; pinning {'on' if pin else 'off'} ({why}); load average {loadavg()}")
        if args.bytecode_cache:  # inherited by both servers' processes (not by this one)
            args.bytecode_cache.mkdir(parents=True, exist_ok=True)
            os.environ["PYTHONPYCACHEPREFIX"] = str(args.bytecode_cache.resolve())
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        m = build_model(tmp, args.rows, args.bodies)
        log(f"registered {m['uri']} ({m['serialization_format']}), {m['n_bodies']} request bodies")
        servers: dict[str, dict[str, Any]] = {}
        for name, fn in (("onepath", bench_onepath), ("mlflow", bench_mlflow)):
            if args.only and args.only != name:
                continue
            mark = len(cleanup.actions)
            servers[name] = fn(tmp, m, args, pin, cleanup)
            p = servers[name]["pinning"]
            if pin:
                log(f"{name}: pinned {len(p['processes'])} process(es) to CPU 0: {'ok' if p['ok'] else 'FAILED'}")
            drive(name, servers[name], args, pin)
            while len(cleanup.actions) > mark:  # stop this server before the next one starts cold
                cleanup.actions.pop()[1]()
        pin_ok = pin and all(s["pinning"]["ok"] for s in servers.values())
        meta = {"connections": args.connections, "duration": args.duration, "threads": args.threads,
                "warmup": args.warmup, "n_bodies": m["n_bodies"], "mlflow_version": m["mlflow_version"],
                "serialization_format": m["serialization_format"], "download_s": m["download_s"],
                "bytecode_cache": str(args.bytecode_cache) if args.bytecode_cache else None,
                "pinning": ("worked (every thread of every server process allowed only CPU 0; wrk under "
                            "taskset -c 1)") if pin_ok else f"NOT done/incomplete ({why})"}
        results = {"meta": {**meta, "python": sys.version.split()[0], "platform": platform.platform(),
                            "cpus": os.cpu_count(), "model_uri": m["uri"], "temp_dir": str(tmp)},
                   "servers": {k: {kk: (str(vv) if isinstance(vv, Path) else vv) for kk, vv in v.items()
                                   if not callable(vv)} for k, v in servers.items()}}
        if "onepath" in servers and "mlflow" in servers:
            results["summary"] = report(servers["onepath"], servers["mlflow"], meta)
        else:
            for k, s in servers.items():
                print(f"{k}: {s['wrk']['rps']:.0f} req/s, p50 {s['wrk']['p50_ms']:.2f} ms, p99 "
                      f"{s['wrk']['p99_ms']:.2f} ms, non-2xx {s['wrk']['non2xx']}, cold start "
                      f"{s['cold_start_s']:.2f} s")
            results["summary"] = {"valid": all(s["wrk"]["non2xx"] == 0 and s["wrk"]["socket_errors"] == 0
                                               for s in servers.values())}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=str))
            log(f"wrote {args.json}")
        return 0 if results["summary"]["valid"] else 1
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
