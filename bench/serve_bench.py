"""Serving benchmark: onepath's model server against ``mlflow models serve``, in one run (or against itself:
``--against COMMIT``, ``--log-s3``).

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
   mlflow gets ``POST /invocations {"dataframe_records": [row]}`` (features only). Every route of
   onepath's server but /health needs a credential: before the deploy the bench grants itself one
   (the caller ``bench``, routes predict, version and metrics) through the deployer's
   ``publish_grants``, and every request it makes to onepath (the first-prediction polling, wrk's,
   the /metrics reads) carries ``Authorization: Bearer <token>``; mlflow has no access control and
   gets no header. wrk reads the token from a 0600 file in the temp dir, never from its command line
   (which every user of the machine can read). The server process tree is pinned to CPU 0 and wrk to
   CPU 1 (taskset) when the machine allows it;
4. prints requests/s, p50, p99, non-2xx, cold start for both, the ratios and the targets, and writes
   the same as JSON to ``--json``;
5. stops everything it started, also on Ctrl-C or an error.

A run where either server answered anything but 2xx, or wrk saw socket errors, is reported as
INVALID and the script exits non-zero. Requests/s counts 2xx answers only; a 401/403 (the
credential refused) is counted apart as well, and the first-prediction polling stops at the first
one instead of waiting out ``--start-timeout``.

``--against COMMIT`` compares onepath with itself instead: this tree against the tree of
``COMMIT`` (exported with ``git archive`` into ``--baseline-dir``, the repository's metadata left
alone), interleaved:

    .venv/bin/python bench/serve_bench.py --against f2568f1 [--rounds 8] [--duration 8]

Against a commit before access control (``f2568f1``, issue 11's parent) this is credentials on
against off. A driver whose tree has ``resources/serving/access.py`` grants the caller ``bench`` as
above (through its own deployer's ``publish_grants``, before its deploy) and reports the token;
every request to that tree carries it. A tree without access control gets the same header (the
other tree's token), which it ignores: the bytes on the wire are the same for both, so the
difference is what the server does with the credential (judging it), not wrk or the HTTP parser
handling some 100 bytes more. Each tree is asked once without a credential: a tree with access
control must answer 401 and one without 200, else the run is INVALID (it would not be on against
off). Note that such a baseline differs from this tree by everything else that landed with the
access control too (``/version``'s facts, the pass-through logging, the per-caller counts).

Each tree deploys the same registered model through its own ``LocalProcessDeployer`` (a driver
process per tree with ``PYTHONPATH`` and working directory set to that tree; it reports which
``resources`` it imported and the run stops if that is not its tree); both server trees are pinned
to CPU 0 and only one is under load at a time, wrk on CPU 1. ``--rounds`` rounds of one wrk run
per side, the order alternating per round, so that noise from the rest of the machine hits both
alike. The verdict is a sign test over the paired per-round ratios new/baseline of requests/s:
"within noise" unless every round went the same way (with 8 rounds, p = 2/256 that a real tie
looks like that); it also prints the ratios of the medians of requests/s and of p99 against issue
11's target (within 5 %). It also measures in-process what each input limit costs per request (the
validation's range checks against the baseline's ``validate_records``, the nesting pre-scan, the
request deadline's timer, the HTTP protocol's limits and read timeouts against uvicorn's own
protocol), each as the median of interleaved timing repeats, and, when this tree has access
control, what ``AccessTable.judge`` costs per granted request. ``./dev install`` compiles the venv's
bytecode; on a venv without it (and with PYTHONDONTWRITEBYTECODE=1, as on our machines) every cold
start compiles every imported module from source, which ``--bytecode-cache DIR`` works around for
both servers alike. A run takes about 1.5 minutes with the defaults.

``--log-s3`` compares onepath with itself as well, in this tree: inference logs as Parquet segments on S3
against JSON lines on local disk (issue 14's target: requests/s within 10 %), interleaved as above:

    .venv/bin/python bench/serve_bench.py --log-s3 [--rounds 6] [--duration 8] [--log-settle 30]

It starts moto's server on loopback (``tests.stores.start_moto``; its request log in a file, not a pipe
nobody reads) with a bucket ``bench-logs``, and deploys the same registered model twice through this tree's
``LocalProcessDeployer``, one driver process per side (``start_tree``) with an environment of its own, as
two production hosts would be configured: the local side without ``ONEPATH_INFERENCE_LOG_URL`` (JSON lines
under its run dir, the default), the S3 side with ``ONEPATH_INFERENCE_LOG_URL=s3://bench-logs/serve`` (read
through ``platform_defs.settings``), ``AWS_ENDPOINT_URL_S3`` at moto, ``ONEPATH_S3_ADDRESSING_STYLE=path``
and the log writer's own ``ONEPATH_INFERENCE_LOG_AWS_*`` keys (the platform's ``AWS_*`` keys never reach a
worker). Both sides have access control and get the bench caller's grant. The servers are pinned to CPU 0,
wrk and moto (standing for a store elsewhere) to CPU 1. Before the rounds each side's ``/health`` must name
its store (``s3://bench-logs/serve/inference/...`` for S3, none for local). After the rounds it waits up to
``--log-settle`` seconds until neither side has rows pending, then reads each side's ``/metrics``
(``onepath_inference_log_rows_flushed_total``, ``_pending``, ``_dropped_total``, ``onepath_inference_log_ok``,
``onepath_predictions_total``) and counts what really landed: the rows of every segment in the bucket
(Parquet metadata) and the lines of the local JSON-lines files. The run is INVALID when a side dropped rows,
still has rows pending, logged fewer rows than it scored, or its store holds a different number of rows than
it says it flushed (nothing written included), as well as on any non-2xx answer or socket error. It prints
per side the median requests/s, p50 and p99, the ratio of the medians S3/local against the 10 % target, the
per-round ratios, the sign test's verdict, the load average, and per side the log's flushed/pending/dropped
rows beside what its store holds.
"""

from __future__ import annotations

import argparse
import http.client
import inspect
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


def post(port: int, path: str, body: bytes, timeout: float = 5.0,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get_text(port: int, path: str, headers: dict[str, str]) -> str:
    """GET ``path`` from the server on ``port``; its body, or RuntimeError naming the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{path} on port {port}: HTTP {resp.status}: {text[:300]!r}")
    return text


def wait_first_prediction(port: int, path: str, body: bytes, t0: float, timeout: float,
                          alive: Callable[[], bool], headers: dict[str, str] | None = None) -> tuple[float, bytes]:
    """Poll with a real prediction request (carrying ``headers``) until it succeeds; seconds since
    ``t0``. A 401/403 stops at once: the grant is published before the deploy, so a refused
    credential is a broken run, not a server still starting."""
    deadline = t0 + timeout
    last = ""
    while time.perf_counter() < deadline:
        try:
            code, out = post(port, path, body, timeout=10, headers=headers)
            if code == 200:
                return time.perf_counter() - t0, out
            if code in (401, 403):
                raise RuntimeError(f"the server refused the bench's credential: HTTP {code}: {out[:300]!r}")
            last = f"HTTP {code}: {out[:300]!r}"
        except (OSError, http.client.HTTPException) as err:
            last = f"{type(err).__name__}: {err}"
        if not alive():
            raise RuntimeError(f"the server exited before answering; last: {last}")
        time.sleep(0.005)
    raise RuntimeError(f"no successful prediction within {timeout} s; last: {last}")


# ------------------------------------------------------------------------------------------------
# credentials (a tree without resources/serving/access.py has no access control: every route answers anyone)

BENCH_CALLER, BENCH_ROUTES = "bench", ["predict", "version", "metrics"]


def bench_grant(endpoint: str, env: str) -> tuple[dict, str]:
    """An access table with one grant for the caller ``bench`` (routes predict, version, metrics) at
    ``endpoint`` ``env``, and the token it accepts: ``(table, token)`` (the shape of the conftest's
    ``new_grant``/``access_table``)."""
    import secrets
    from datetime import datetime, timezone

    from resources.serving.access import make_token, token_sha256

    gid = secrets.token_hex(6)
    token = make_token(endpoint, env, gid, secrets.token_urlsafe(32))
    grant = {"id": gid, "caller": BENCH_CALLER, "routes": BENCH_ROUTES, "revoked": None,
             "secrets": [{"sha256": token_sha256(token), "not_after": None}]}
    return ({"version": 1, "endpoint": endpoint, "env": env, "generation": 1,
             "updated_at": datetime.now(timezone.utc).isoformat(), "grants": [grant]}, token)


def grant_bench_caller(deployer: Any, target: Any) -> str | None:
    """Grant the caller ``bench`` at ``target`` through ``deployer.publish_grants`` (before or after
    the deploy: workers read the table on their next request) and return its token; None for a tree
    without access control. ``DRIVER`` carries this source (and ``bench_grant``'s), so each
    ``--against`` tree grants with its own code."""
    import importlib.util

    if importlib.util.find_spec("resources.serving.access") is None:
        return None
    table, token = bench_grant(target.name, target.env)
    deployer.publish_grants(target, table)
    return token


def credential_file(tmp: Path, name: str, token: str | None) -> Path | None:
    """``token`` in ``tmp/credential-<name>`` (0600) for wrk to read (a token on wrk's command line
    would be readable by every user of the machine); None without a token."""
    if token is None:
        return None
    path = tmp / f"credential-{name}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def auth_headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


# ------------------------------------------------------------------------------------------------
# wrk


def run_wrk(port: int, path: str, bodies: Path, args: argparse.Namespace, duration: float,
            pin: bool, credential: Path | None = None) -> dict[str, Any]:
    """One wrk run; with ``credential`` (a file holding a token) every request carries it. ``rps``
    counts 2xx answers only: a refused (401/403, also in ``denied``) or failed request is no
    throughput, and any makes the run INVALID."""
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency",
           f"--timeout={args.wrk_timeout:g}s", "-s", str(LUA), f"http://127.0.0.1:{port}", "--",
           str(bodies), path, *([str(credential)] if credential else [])]
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
    res["rps"] = (res["requests"] - res["non2xx"]) / (res["duration_us"] / 1e6)
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
    token = grant_bench_caller(deployer, target)  # before the deploy, as the platform grants an app's calls
    headers = auth_headers(token)

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
                                        alive=lambda: True, headers=headers)
    log(f"onepath: deploy() returned in {deploy_s:.2f} s, first prediction at {cold:.2f} s: {first[:160]!r}")
    pinning = pin_tree(int(sup_pid), 0) if pin and sup_pid else {"ok": False, "processes": []}
    def stats() -> tuple[int, int]:  # (rows scored, model calls) from the server's /metrics
        text = get_text(port, "/metrics", headers)
        get = lambda name: int(float(re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M).group(1)))
        return get("onepath_predictions_total"), get("onepath_batches_total")

    return {"port": port, "cold_start_s": cold, "deploy_returned_s": deploy_s, "root_pid": sup_pid, "stats": stats,
            "pinning": pinning, "path": "/predict", "bodies": m["bodies_onepath"],
            "credential": credential_file(tmp, "onepath", token),
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
        w = run_wrk(srv["port"], srv["path"], srv["bodies"], args, args.warmup, pin, srv.get("credential"))
        log(f"{name}: warm-up {args.warmup:g} s: {w['rps']:.0f} req/s, non-2xx {w['non2xx']}")
        srv["warmup"] = {k: v for k, v in w.items() if k != "stdout"}
    before = srv["stats"]() if srv.get("stats") else None
    r = run_wrk(srv["port"], srv["path"], srv["bodies"], args, args.duration, pin, srv.get("credential"))
    if before is not None:
        after = srv["stats"]()
        rows, batches = after[0] - before[0], after[1] - before[1]
        srv["server_stats"] = {"rows": rows, "model_calls": batches,
                               "rows_per_model_call": rows / batches if batches else None}
        log(f"{name}: server scored {rows} rows in {batches} model calls "
            f"({rows / max(batches, 1):.1f} rows per call)")
    log(f"{name}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
        f"non-2xx {r['non2xx']} (credential refused {r['denied']}), socket errors {r['socket_errors']}")
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
        ("of which 401/403", str(o["denied"]), str(t["denied"]), "", "0",
         "OK" if o["denied"] == t["denied"] == 0 else "BAD"),
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
    cred = ("on (every request carries the bench caller's grant)" if ours.get("credential") else
            "off (no access control)")
    print(f"credentials: onepath {cred}; mlflow serve has no access control and gets no header")
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
    print("RESULT:", "VALID" if valid else "INVALID (non-2xx responses, 401/403 among them, or socket errors)")
    return {"ratios": ratios, "valid": valid,
            "verdicts": {k: verdict(k, v) for k, v in ratios.items()},
            "targets": {k: f"{op} {b}" for k, (op, b) in TARGETS.items()}}


# ------------------------------------------------------------------------------------------------
# --against: this tree against a baseline commit, interleaved

DRIVER = r"""
import json, os, sys
from pathlib import Path
import resources
from resources.deployers.base import Release, Target
from resources.deployers.local import LocalProcessDeployer
from resources.artifact_digest import folder_digest
args = json.loads(sys.argv[1])
# ONEPATH_INFERENCE_LOG_URL (--log-s3's S3 side) read the way the platform reads it; unset (every other
# driver, and trees from before the S3 log) the deployer is built exactly as before
log_kw = {}
if os.environ.get("ONEPATH_INFERENCE_LOG_URL"):
    from platform_defs.settings import load_settings
    log_kw["inference_log_url"] = load_settings().inference_log_url
deployer = LocalProcessDeployer(Path(args["run_dir"]), host="127.0.0.1", port_base=args["port_base"],
                                artifact_roots=[Path(args["model"]).parent], **log_kw)
target = Target(args["name"], "bench", kind="endpoint")
release = Release(version="1", artifact=args["model"], digest=folder_digest(args["model"]), workers=1,
                  config={"model_name": args["name"], "pii_columns": args["pii"], "max_batch": 64})
token = grant_bench_caller(deployer, target)
st = deployer.deploy(target, release)
sup = (st.detail.get("supervisor") or {}).get("pid")
print(json.dumps({"address": st.address, "supervisor_pid": sup, "resources": os.path.dirname(resources.__file__),
                  "token": token}), flush=True)
try:
    sys.stdin.read()  # until the bench closes our stdin
finally:
    deployer.delete(target)
"""




def driver_source() -> str:
    """``DRIVER`` with the grant functions it calls (their source, run with the driver's tree)."""
    funcs = "\n\n".join(inspect.getsource(f) for f in (bench_grant, grant_bench_caller))
    consts = f"BENCH_CALLER, BENCH_ROUTES = {BENCH_CALLER!r}, {BENCH_ROUTES!r}\n"
    return f"from __future__ import annotations\nfrom typing import Any\n{consts}\n{funcs}\n{DRIVER}"


def export_tree(commit: str, path: Path) -> str:
    """``commit``'s tree at ``path`` (``git archive``, made once, reused after); its full commit id."""
    want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    marker = path / ".onepath-baseline-commit"
    if marker.exists() and marker.read_text().strip() == want:
        log(f"baseline: reusing the tree of {want[:7]} at {path}")
        return want
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", want], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    marker.write_text(want + "\n")
    log(f"baseline: exported {want[:7]} to {path}")
    return want


def start_tree(name: str, tree: Path, tmp: Path, m: dict[str, Any], port_base: int,
               cleanup: Cleanup, env_overrides: dict[str, str | None] | None = None) -> dict[str, Any]:
    """A driver process that deploys the model with ``tree``'s deployer (``PYTHONPATH`` and working
    directory ``tree``), in this process's environment with ``env_overrides`` applied (None: unset), and
    the server it deployed, answering with a credential."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for k, v in (env_overrides or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["PYTHONPATH"] = str(tree)
    cfg = {"run_dir": str(tmp / f"run-{name}"), "port_base": port_base, "model": str(m["local"]),
           "name": MODEL_NAME, "pii": PII}
    proc = subprocess.Popen([sys.executable, "-c", driver_source(), json.dumps(cfg)], cwd=str(tree), env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)

    def stop() -> None:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_process_group(proc)

    cleanup.push(f"{name} tree", stop)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        raise RuntimeError(f"the {name} driver exited ({proc.wait()}) without deploying")
    info = json.loads(line)
    if Path(info["resources"]).resolve() != (tree / "resources").resolve():
        raise RuntimeError(f"the {name} driver imported {info['resources']}, not {tree / 'resources'}")
    port = int(info["address"].rsplit(":", 1)[1])
    token = info.get("token")
    wait_first_prediction(port, "/predict", m["first_onepath"], time.perf_counter(), 120, alive=lambda: True,
                          headers=auth_headers(token))
    anonymous, _ = post(port, "/predict", m["first_onepath"])  # what credentials on/off means: 401 / 200
    return {"port": port, "root_pid": info["supervisor_pid"], "path": "/predict", "bodies": m["bodies_onepath"],
            "access_control": token is not None, "anonymous_status": anonymous, "token": token,
            "run_dir": Path(cfg["run_dir"]), "credential": credential_file(tmp, name, token)}


def limit_costs(base_tree: Path, m: dict[str, Any], repeats: int = 7) -> dict[str, float]:
    """What each input limit costs per request, in microseconds (in-process; median of ``repeats``
    interleaved timings of the new and the baseline way of doing the same step)."""
    import asyncio
    import importlib.util
    import statistics
    import timeit

    from resources.serving import model_server as new

    spec = importlib.util.spec_from_file_location("baseline_model_server",
                                                  base_tree / "resources" / "serving" / "model_server.py")
    assert spec and spec.loader
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up there
    spec.loader.exec_module(old)
    bodies = [line.encode() for line in Path(m["bodies_onepath"]).read_text().splitlines() if line]
    records = [json.loads(b)["records"] for b in bodies]
    mlmodel = __import__("yaml").safe_load((m["local"] / "MLmodel").read_text())
    cols_new, cols_old = new.read_signature(mlmodel), old.read_signature(mlmodel)

    def per_request(fn: Callable[[], None], n: int) -> float:
        return timeit.timeit(fn, number=1) / n * 1e6

    def validate(mod: Any, cols: Any, **kw: Any) -> Callable[[], None]:
        return lambda: [mod.validate_records(r, cols, **kw) for r in records]

    def prescan() -> None:
        for b in bodies:
            if b.count(b"[") + b.count(b"{") > 32:
                pass

    async def deadlines(n: int) -> None:  # what _submit adds per request: one append to the deadline queue
        from collections import deque

        loop, dl = asyncio.get_running_loop(), deque()
        futs = [loop.create_future() for _ in range(n)]
        t = time.perf_counter()
        for f in futs:
            dl.append((t + 10.0, f))

    out: dict[str, list[float]] = {k: [] for k in ("validate_base", "validate_new", "depth_prescan",
                                                    "deadline_timer", "protocol_base", "protocol_new")}
    for i in range(repeats):
        out["validate_base"].append(per_request(validate(old, cols_old), len(records)))
        out["validate_new"].append(per_request(validate(new, cols_new, max_rows=1000, max_depth=None), len(records)))
        out["depth_prescan"].append(per_request(prescan, len(bodies)))
        out["deadline_timer"].append(per_request(lambda: asyncio.run(deadlines(10000)), 10000))
        base_us, new_us = protocol_cost(bodies[0], order=i % 2)
        out["protocol_base"].append(base_us)
        out["protocol_new"].append(new_us)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {**med, "validation_cost": med["validate_new"] - med["validate_base"],
            "protocol_cost": med["protocol_new"] - med["protocol_base"]}


def protocol_cost(body: bytes, n: int = 5000, order: int = 0) -> tuple[float, float]:
    """Microseconds per keep-alive request through uvicorn's httptools protocol and through onepath's
    (parse, start the ASGI task, a 200 answer), in one event loop, on a transport that discards."""
    import asyncio

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from resources.serving.http_limits import protocol_for

    request = (b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(body), body))

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.closing = False

        def write(self, data: Any) -> None:
            pass

        def is_closing(self) -> bool:
            return self.closing

        def close(self) -> None:
            self.closing = True

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 9) if name in ("sockname", "peername") else default

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def run(cls: type) -> float:
        config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning")
        config.load()
        proto = cls(config=config, server_state=ServerState(), app_state={})
        proto.connection_made(Transport())
        t = time.perf_counter()
        for _ in range(n):
            proto.data_received(request)
            await asyncio.sleep(0)  # the ASGI task runs and answers
            await asyncio.sleep(0)
        dt = time.perf_counter() - t
        proto.connection_lost(None)
        return dt / n * 1e6

    classes = [HttpToolsProtocol, protocol_for(object())]
    if order:  # alternate which one runs first: the second of a pair runs on a warmer process
        return tuple(reversed([asyncio.run(run(c)) for c in reversed(classes)]))  # type: ignore[return-value]
    return asyncio.run(run(classes[0])), asyncio.run(run(classes[1]))


def pin_and_warm(name: str, srv: dict[str, Any], args: argparse.Namespace, pin: bool) -> None:
    """Pin a deployed side's process tree to CPU 0, then ``--warmup`` seconds of unmeasured load."""
    if pin and srv["root_pid"]:
        srv["pinning"] = pin_tree(int(srv["root_pid"]), 0)
        log(f"{name}: pinned to CPU 0: {'ok' if srv['pinning']['ok'] else 'FAILED'}")
    if args.warmup > 0:
        run_wrk(srv["port"], srv["path"], srv["bodies"], args, args.warmup, pin, srv["credential"])


def interleaved_rounds(sides: dict[str, dict[str, Any]], base: str, new: str, args: argparse.Namespace,
                       pin: bool) -> list[dict[str, Any]]:
    """``--rounds`` rounds of one wrk run per side, the order alternating per round (so that noise from
    the rest of the machine hits both alike); per round the ratios new/base of requests/s and of p99."""
    rounds = []
    for i in range(args.rounds):
        order = [base, new] if i % 2 == 0 else [new, base]
        row: dict[str, Any] = {"order": order}
        for name in order:
            r = run_wrk(sides[name]["port"], sides[name]["path"], sides[name]["bodies"], args, args.duration, pin,
                        sides[name]["credential"])
            row[name] = {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "non2xx", "denied", "socket_errors")}
            row[name]["loadavg"] = loadavg()
        row["rps_ratio"] = row[new]["rps"] / row[base]["rps"] if row[base]["rps"] else float("inf")
        row["p99_ratio"] = row[new]["p99_ms"] / row[base]["p99_ms"]
        refused = row[base]["denied"] + row[new]["denied"]
        log(f"round {i + 1}/{args.rounds} ({' then '.join(order)}): {base} {row[base]['rps']:.0f} req/s "
            f"p99 {row[base]['p99_ms']:.2f} ms | {new} {row[new]['rps']:.0f} req/s p99 "
            f"{row[new]['p99_ms']:.2f} ms | {new}/{base} {row['rps_ratio']:.3f} | load {loadavg()}"
            + (f" | {refused} requests REFUSED (401/403)" if refused else ""))
        rounds.append(row)
    return rounds


def sign_test(ratios: list[float]) -> tuple[bool, str]:
    """(within noise, verdict) of the paired per-round ratios: within noise unless every round went the
    same way (with n rounds a real tie looks like that with p = 2 / 2**n)."""
    same_way = all(x < 1 for x in ratios) or all(x > 1 for x in ratios)
    if not same_way:
        return True, "WITHIN NOISE (the rounds went both ways)"
    return False, (f"{'SLOWER' if ratios[0] < 1 else 'FASTER'} in every round "
                   f"(sign test p = {2 / 2 ** len(ratios):.3g} for a real tie)")


def bench_against(args: argparse.Namespace, tmp: Path, pin: bool, cleanup: Cleanup) -> dict[str, Any]:
    import statistics

    base_commit = export_tree(args.against, args.baseline_dir)
    here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "resources", "bench"],
                                capture_output=True, text=True).stdout.strip())
    m = build_model(tmp, args.rows, args.bodies)
    sides = {"baseline": start_tree("baseline", args.baseline_dir, tmp, m, args.port_base, cleanup),
             "new": start_tree("new", ROOT, tmp, m, args.port_base + 100, cleanup)}
    shared = sides["new"]["credential"] or sides["baseline"]["credential"]
    for name, srv in sides.items():
        # a tree without access control gets the other's header too (it ignores it): both sides get the
        # same bytes on the wire, so the difference is what the server does with the credential
        srv["credential"] = srv["credential"] or shared
        want = 401 if srv["access_control"] else 200
        log(f"{name}: credentials {'on' if srv['access_control'] else 'off'} (a request without one: HTTP "
            f"{srv['anonymous_status']}{'' if srv['anonymous_status'] == want else f', expected {want}'}); "
            f"wrk sends {'its own grant' if srv['access_control'] else 'the same header' if shared else 'none'}")
        pin_and_warm(name, srv, args, pin)
    access_ok = all(s["anonymous_status"] == (401 if s["access_control"] else 200) for s in sides.values())
    rounds = interleaved_rounds(sides, "baseline", "new", args, pin)
    log("measuring what each limit costs in-process")
    costs = {**limit_costs(args.baseline_dir, m), "judge": judge_cost(tmp)}

    def med(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)

    ratios = [r["rps_ratio"] for r in rounds]
    p99_ratios = [r["p99_ratio"] for r in rounds]
    denied = sum(r[s]["denied"] for r in rounds for s in ("baseline", "new"))
    valid = access_ok and all(r[s]["non2xx"] == 0 and r[s]["socket_errors"] == 0
                              for r in rounds for s in ("baseline", "new"))
    summary = {
        "baseline_commit": base_commit, "new_commit": here + (" (+ uncommitted changes)" if dirty else ""),
        "rounds": rounds, "costs_us": costs, "valid": valid, "denied": denied,
        "credentials": {s: {"on": sides[s]["access_control"], "anonymous_status": sides[s]["anonymous_status"],
                            "header_sent": sides[s]["credential"] is not None} for s in sides},
        "median": {s: {k: med(s, k) for k in ("rps", "p50_ms", "p99_ms")} for s in ("baseline", "new")},
        "rps_ratio_median": statistics.median(ratios), "rps_ratio_range": [min(ratios), max(ratios)],
        "p99_ratio_median": statistics.median(p99_ratios), "p99_ratio_range": [min(p99_ratios), max(p99_ratios)],
        "within_noise": sign_test(ratios)[0],
    }
    b, n = summary["median"]["baseline"], summary["median"]["new"]
    summary["within_5pct"] = {"rps": n["rps"] / b["rps"] >= 0.95, "p99": n["p99_ms"] / b["p99_ms"] <= 1.05}
    onoff = lambda s: "on" if sides[s]["access_control"] else "off"  # noqa: E731
    print()
    print(f"onepath serve bench, {args.rounds} interleaved rounds of {args.duration:g} s per side, wrk "
          f"{args.threads} thread(s) x {args.connections} connections, {m['n_bodies']} bodies; "
          f"baseline {base_commit[:7]}, new {summary['new_commit']}; pinning {'on' if pin else 'off'}")
    sent = "the bench caller's grant" if shared else "no header"
    print(f"  credentials  baseline {onoff('baseline')}, new {onoff('new')}; every request to both carries {sent}"
          + ("" if access_ok else " -- a tree's answer without a credential contradicts that (see above)"))
    print(f"  requests/s   median baseline {b['rps']:.0f}  new {n['rps']:.0f}  ratio of medians "
          f"{n['rps'] / b['rps']:.3f}; per-round ratios {min(ratios):.3f}..{max(ratios):.3f}, median "
          f"{statistics.median(ratios):.3f}, {sum(x < 1 for x in ratios)} of {len(ratios)} rounds slower")
    print(f"  p50 latency  median baseline {b['p50_ms']:.2f} ms  new {n['p50_ms']:.2f} ms")
    print(f"  p99 latency  median baseline {b['p99_ms']:.2f} ms  new {n['p99_ms']:.2f} ms  ratio of medians "
          f"{n['p99_ms'] / b['p99_ms']:.3f}; per-round ratios {min(p99_ratios):.3f}..{max(p99_ratios):.3f}")
    passed = {k: "PASS" if ok else "MISS" for k, ok in summary["within_5pct"].items()}
    print(f"  within 5 % (issue 11's target, ratio of medians): requests/s {passed['rps']}, p99 {passed['p99']}")
    print("  what each limit costs per request (in-process, microseconds; medians of 7 interleaved repeats):")
    print(f"    validation with int64/float32 ranges + row limit   {costs['validate_new']:.2f}  "
          f"(baseline's {costs['validate_base']:.2f}: {costs['validation_cost']:+.2f})")
    print(f"    nesting pre-scan (count of brackets in the body)   {costs['depth_prescan']:.2f}")
    print(f"    request deadline (one deque append; upper bound)   {costs['deadline_timer']:.2f}")
    print(f"    HTTP protocol with header/URL limits and timeouts  {costs['protocol_new']:.2f}  "
          f"(uvicorn's own {costs['protocol_base']:.2f}: {costs['protocol_cost']:+.2f})")
    if costs["judge"] is not None:
        print(f"    credential check (AccessTable.judge: stat, sha256, compare) {costs['judge']:.2f}")
    print("  body size / row limits: one header scan and one len() per request (not measurable here)")
    verdict = sign_test(ratios)[1]
    why = ("a tree's credentials are not what they claim" if not access_ok else
           f"{denied} requests refused a credential (401/403), counted as no throughput" if denied else
           "non-2xx responses or socket errors")
    print("RESULT:", verdict if valid else f"INVALID ({why})")
    return summary


def judge_cost(tmp: Path, n: int = 20000, repeats: int = 7) -> float | None:
    """Microseconds per ``AccessTable.judge`` of a granted ``/predict`` over TCP, the authorization
    header last (what a worker adds per request with credentials on), median of ``repeats``; None for
    a tree without access control."""
    import importlib.util
    import statistics
    import timeit

    if importlib.util.find_spec("resources.serving.access") is None:
        return None
    from resources.serving.access import TABLE_FILE, AccessTable

    table, token = bench_grant(MODEL_NAME, "bench")
    (tmp / "judge").mkdir(mode=0o700)
    path = tmp / "judge" / TABLE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(table, f)
    judge = AccessTable(MODEL_NAME, "bench", path).judge
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"250"),
               (b"authorization", f"Bearer {token}".encode())]
    if not judge(headers, "/predict", False, time.time()).ok:
        raise RuntimeError("the judge refused the bench's own grant")
    return statistics.median(timeit.timeit(lambda: judge(headers, "/predict", False, time.time()), number=n) / n * 1e6
                             for _ in range(repeats))


# ------------------------------------------------------------------------------------------------
# --log-s3: the same tree deployed twice, inference logs as JSON lines on local disk against Parquet
# segments on S3 (moto's server on loopback), interleaved

LOG_BUCKET, LOG_PREFIX = "bench-logs", "serve"
LOG_METRICS = {"pending": "onepath_inference_log_rows_pending", "flushed": "onepath_inference_log_rows_flushed_total",
               "dropped": "onepath_inference_log_rows_dropped_total", "ok": "onepath_inference_log_ok",
               "log_errors": "onepath_inference_log_errors_total", "scored": "onepath_predictions_total"}


def server_metrics(port: int, token: str | None) -> dict[str, int]:
    """The inference log's rows (``LOG_METRICS``) from a server's /metrics."""
    text = get_text(port, "/metrics", auth_headers(token))
    out = {}
    for key, name in LOG_METRICS.items():
        found = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
        if not found:
            raise RuntimeError(f"/metrics has no {name}")
        out[key] = int(float(found.group(1)))
    return out


def health(port: int, token: str | None) -> dict[str, Any]:
    """A server's /health as a caller of the endpoint hears it (anyone else hears only ``status``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health", headers=auth_headers(token))
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def settle_log(name: str, srv: dict[str, Any], timeout: float) -> dict[str, int]:
    """The log's metrics once nothing is pending (the segment writer cuts the last buffer after
    ``ONEPATH_INFERENCE_LOG_FLUSH_SECONDS``), or as they are at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = server_metrics(srv["port"], srv["token"])
        if got["pending"] == 0 or time.monotonic() > deadline:
            log(f"{name}: inference log rows flushed {got['flushed']}, pending {got['pending']}, dropped "
                f"{got['dropped']} (rows scored {got['scored']}, log ok {got['ok']}, write errors {got['log_errors']})")
            return got
        time.sleep(0.5)


def s3_rows(client: Any, prefix: str) -> tuple[int, int, int]:
    """(segments, rows, bytes) of the Parquet segments under ``prefix`` in the bench's bucket."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    segments = rows = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=LOG_BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=LOG_BUCKET, Key=obj["Key"])["Body"].read()
            rows += pq.ParquetFile(pa.BufferReader(body)).metadata.num_rows
            segments += 1
            size += obj["Size"]
    return segments, rows, size


def local_rows(folder: Path) -> tuple[int, int, int]:
    """(files, lines, bytes) of the JSON-lines inference log under ``folder``."""
    files = lines = size = 0
    for f in sorted(folder.rglob("*.jsonl")):
        data = f.read_bytes()
        files, lines, size = files + 1, lines + data.count(b"\n"), size + len(data)
    return files, lines, size


def bench_log_s3(args: argparse.Namespace, tmp: Path, pin: bool, cleanup: Cleanup) -> dict[str, Any]:
    import statistics

    from tests.stores import start_moto

    here = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "resources", "bench"],
                      capture_output=True, text=True).stdout.strip():
        here += " (+ uncommitted changes)"
    moto = start_moto()
    cleanup.push("moto server", moto.stop)
    moto_pin = pin_tree(moto.proc.pid, 1) if pin else {"ok": False, "processes": []}
    if pin:  # S3 stands for a service elsewhere: it shares wrk's CPU, never the servers'
        log(f"moto: pinned to CPU 1 (with wrk): {'ok' if moto_pin['ok'] else 'FAILED'}")
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=LOG_BUCKET)
    m = build_model(tmp, args.rows, args.bodies)
    url = f"s3://{LOG_BUCKET}/{LOG_PREFIX}"
    # the platform's settings as a production host sets them; the worker gets only the log writer's keys
    # (served_environment strips the platform's credentials), so the S3 side gets those and no AWS_* keys
    s3_env: dict[str, str | None] = {
        "ONEPATH_INFERENCE_LOG_URL": url, "AWS_ENDPOINT_URL_S3": moto.endpoint_url,
        "ONEPATH_S3_ADDRESSING_STYLE": "path", "AWS_DEFAULT_REGION": "us-east-1",
        "ONEPATH_INFERENCE_LOG_AWS_ACCESS_KEY_ID": "bench", "ONEPATH_INFERENCE_LOG_AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None}
    local_env = {k: None for k in s3_env}  # the default: JSON lines under the run dir
    sides = {"local": start_tree("local", ROOT, tmp, m, args.port_base, cleanup, local_env),
             "s3": start_tree("s3", ROOT, tmp, m, args.port_base + 100, cleanup, s3_env)}
    problems: list[str] = []
    for name, srv in sides.items():
        facts = health(srv["port"], srv["token"]).get("inference_log")
        store = (facts or {}).get("store")
        srv["store"] = store or str(srv["run_dir"] / "inference_logs")
        want_s3 = name == "s3"
        if facts is None:
            problems.append(f"{name}: /health does not say where the inference log goes")
        elif want_s3 != bool(store and store.startswith(f"{url}/")):
            problems.append(f"{name}: the server logs to {srv['store']}, not to {'S3' if want_s3 else 'local disk'}")
        if srv["anonymous_status"] != 401:
            problems.append(f"{name}: a request without a credential got HTTP {srv['anonymous_status']}, not 401")
        log(f"{name}: inference log at {srv['store']}; a request without a credential: HTTP "
            f"{srv['anonymous_status']}")
        pin_and_warm(name, srv, args, pin)
    load_before = loadavg()
    rounds = interleaved_rounds(sides, "local", "s3", args, pin)
    load_after = loadavg()

    logs = {name: settle_log(name, srv, args.log_settle) for name, srv in sides.items()}
    key_prefix = f"{LOG_PREFIX}/inference/{MODEL_NAME}/bench/"
    segments, bucket_rows, bucket_bytes = s3_rows(s3, key_prefix)
    files, lines, local_bytes = local_rows(sides["local"]["run_dir"] / "inference_logs")
    stored = {"local": {"where": sides["local"]["store"], "files": files, "rows": lines, "bytes": local_bytes},
              "s3": {"where": f"s3://{LOG_BUCKET}/{key_prefix}", "segments": segments, "rows": bucket_rows,
                     "bytes": bucket_bytes}}
    for name, got in logs.items():
        if got["dropped"] or got["pending"] or not got["ok"] or got["log_errors"]:
            problems.append(f"{name}: the log dropped {got['dropped']} rows, {got['pending']} still pending, "
                            f"ok {got['ok']}, {got['log_errors']} write errors")
        if got["flushed"] != got["scored"]:
            problems.append(f"{name}: {got['scored']} rows scored but {got['flushed']} logged")
        if stored[name]["rows"] != got["flushed"] or not got["flushed"]:
            problems.append(f"{name}: the server says {got['flushed']} rows stored, {stored[name]['where']} holds "
                            f"{stored[name]['rows']}")
    for r in rounds:
        for name in sides:
            if r[name]["non2xx"] or r[name]["socket_errors"]:
                problems.append(f"a round's {name} run had {r[name]['non2xx']} non-2xx answers "
                                f"({r[name]['denied']} refused) and {r[name]['socket_errors']} socket errors")

    def med(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)

    ratios = [r["rps_ratio"] for r in rounds]
    p99_ratios = [r["p99_ratio"] for r in rounds]
    within_noise, verdict = sign_test(ratios)
    summary = {
        "commit": here, "rounds": rounds, "valid": not problems, "problems": problems,
        "median": {s: {k: med(s, k) for k in ("rps", "p50_ms", "p99_ms")} for s in sides},
        "rps_ratio_range": [min(ratios), max(ratios)], "p99_ratio_range": [min(p99_ratios), max(p99_ratios)],
        "within_noise": within_noise, "verdict": verdict, "log_metrics": logs, "stored": stored,
        "loadavg": {"start": args.loadavg_start, "before_rounds": load_before, "after_rounds": load_after},
        "moto_pinning": moto_pin["ok"],
    }
    lo, s = summary["median"]["local"], summary["median"]["s3"]
    summary["rps_ratio_of_medians"] = s["rps"] / lo["rps"]
    summary["p99_ratio_of_medians"] = s["p99_ms"] / lo["p99_ms"]
    summary["within_10pct"] = summary["rps_ratio_of_medians"] >= 0.90
    print()
    print(f"onepath serve bench --log-s3, {args.rounds} interleaved rounds of {args.duration:g} s per side, wrk "
          f"{args.threads} thread(s) x {args.connections} connections, {m['n_bodies']} bodies; tree {here}; "
          f"pinning {'on (servers CPU 0; wrk and moto CPU 1)' if pin else 'off'}")
    print(f"  1-min load average: at start {args.loadavg_start}, before the rounds {load_before}, after {load_after}")
    print(f"  requests/s   median local {lo['rps']:.0f}  s3 {s['rps']:.0f}  ratio of medians "
          f"{summary['rps_ratio_of_medians']:.3f}; per-round ratios {min(ratios):.3f}..{max(ratios):.3f}, "
          f"{sum(x < 1 for x in ratios)} of {len(ratios)} rounds slower")
    print(f"  p50 latency  median local {lo['p50_ms']:.2f} ms  s3 {s['p50_ms']:.2f} ms")
    print(f"  p99 latency  median local {lo['p99_ms']:.2f} ms  s3 {s['p99_ms']:.2f} ms  ratio of medians "
          f"{summary['p99_ratio_of_medians']:.3f}; per-round ratios {min(p99_ratios):.3f}..{max(p99_ratios):.3f}")
    print(f"  within 10 % (issue 14's target, requests/s ratio of medians >= 0.90): "
          f"{'PASS' if summary['within_10pct'] else 'MISS'}")
    for name in sides:
        g, st = logs[name], stored[name]
        held = (f"{st['segments']} segments, {st['rows']} rows, {st['bytes']} bytes" if name == "s3" else
                f"{st['files']} file(s), {st['rows']} lines, {st['bytes']} bytes")
        print(f"  log {name:<5}  /metrics flushed {g['flushed']}  pending {g['pending']}  dropped {g['dropped']}  "
              f"(rows scored {g['scored']}); {st['where']} holds {held}")
    print(f"  sign test: {verdict}")
    for p in problems:
        print(f"  INVALID: {p}")
    print("RESULT:", verdict if not problems else "INVALID (see above)")
    return summary


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
    ap.add_argument("--against", metavar="COMMIT",
                    help="compare this tree with COMMIT's, interleaved (no mlflow); e.g. 0f2ba97")
    ap.add_argument("--log-s3", action="store_true",
                    help="compare this tree with itself: inference logs on S3 (moto on loopback) against "
                         "local JSON lines, interleaved (no mlflow)")
    ap.add_argument("--log-settle", type=float, default=30.0,
                    help="--log-s3: seconds allowed after the rounds for the pending log rows to be written")
    ap.add_argument("--rounds", type=int, default=8, help="--against, --log-s3: interleaved rounds")
    ap.add_argument("--baseline-dir", type=Path, default=Path(tempfile.gettempdir()) / "onepath-serve-baseline",
                    help="--against: where the baseline commit's tree is exported (reused if there)")
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
        if args.against and args.log_s3:
            print("--against and --log-s3 are two different comparisons: give one", file=sys.stderr)
            return 2
        args.loadavg_start = loadavg()
        if args.against or args.log_s3:
            results = (bench_against if args.against else bench_log_s3)(args, tmp, pin, cleanup)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2, default=str))
            return 0 if results["valid"] else 1
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
