"""Inventory benchmark: ``build_inventory`` against a naive loop over the same world, in one run.

    .venv/bin/python bench/inventory_bench.py [--models 1000] [--answering 10] [--timeout 1.0]
        [--repeat 3] [--seed 7] [--json results.json]

What it does, all inside a fresh temporary directory (removed at the end):

1. a fresh MLflow sqlite store: one tiny logged model (a DummyClassifier) and ``--models``
   registered models with 1-3 versions each, all pointing at that one logged model (so registering
   is fast), each version tagged with lineage (``onepath.dataset_key/data_hash/code_hash``, author),
   aliases ``staging`` (newest version) and ``prod`` (the one before, or the newest);
2. a real ledger (``resources.ledger.Ledger``, hash-chained and signed) with what the endpoint asset
   writes per model and environment: a ``gate_verdict`` and a ``deploy`` entry; high-risk models get
   a signed ``approval`` for prod (the demo identity mira);
3. an organisation built in memory with ``platform_defs.specs``: one dataset, ``--models`` models and
   one endpoint per model (staging + prod), so 2 x ``--models`` rows; no loader import checks;
4. stable addresses: the local deployer's port registry (``run/ports.json``) maps every endpoint
   environment to its own loopback port. The answering servers are ONE helper process (this script
   with ``--serve``, asyncio) listening on many ports and answering ``/health`` and ``/version``
   like a model server, with the recorded version except on every 50th port (a deliberate
   mismatch). Two scenarios, each timed separately:
   * ``handful``: the helper listens on ``--answering`` ports; every other port is closed
     (connection refused at once);
   * ``all``: the helper listens on every port (2 x ``--models`` sockets), so every probe makes two
     real HTTP requests. Client and helper share this machine's CPUs.
5. per scenario: ``build_inventory`` once (``first``: the first call of the scenario; the MLflow
   store of this process is already open from the setup) and ``--repeat`` times more (``warm``,
   median), and once the NAIVE loop: per model ``get_registered_model``,
   ``search_model_versions``, ``get_model_version`` per version, then per environment three ledger
   queries (deploy, approval, gate_verdict for that subject/env) and a sequential ``probe``. Both
   results are checked against each other and against what was set up (answering, mismatches);
6. prints both times, the ratio, and PASS/MISS against the 1 s target.

The servers are not model servers (2000 of those would need 2000 processes): they answer the same
two routes with the same JSON shapes, which is all ``probe`` reads. A run takes 1-3 minutes with
the defaults, most of it registering models and appending ledger entries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_SECONDS = 1.0
MISMATCH_EVERY = 50


# --------------------------------------------------------------------------------------------
# the helper server (this script with --serve MAPPING): /health and /version on many ports


def serve(mapping_path: str) -> None:
    mapping: dict[str, list[str]] = json.loads(Path(mapping_path).read_text())  # port -> [endpoint, model, version]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: str) -> None:
        try:
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.split()
            path = parts[1].decode() if len(parts) > 1 else "/"
            endpoint, model, version = mapping[port]
            if path == "/health":
                status, body = b"200 OK", {"status": "ok", "version": version}
            elif path == "/version":
                status, body = b"200 OK", {"endpoint": endpoint, "env": "bench", "model": model,
                                           "version": version, "pid": os.getpid()}
            else:
                status, body = b"404 Not Found", {"error": "not found"}
            raw = json.dumps(body).encode()
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(raw)).encode() + b"\r\nconnection: close\r\n\r\n" + raw)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        servers = []
        for port in mapping:
            servers.append(await asyncio.start_server(lambda r, w, p=port: handle(r, w, p), "127.0.0.1",
                                                      int(port), backlog=1024))
        print(f"ready {len(servers)}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(main())


def start_helper(mapping: dict[int, tuple[str, str, str]], workdir: Path, name: str) -> subprocess.Popen:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps({str(p): list(v) for p, v in mapping.items()}))
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()  # blocks until every socket is bound (or the helper died)
    if not line.startswith("ready"):
        proc.wait(timeout=10)
        raise RuntimeError(f"helper server did not start: {proc.stderr.read()[-800:]}")
    return proc


def stop_helper(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_ports(n: int, start: int = 20000, end: int = 32000) -> list[int]:
    """``n`` loopback ports below the ephemeral range that nothing listens on now (bind-checked)."""
    out = []
    for port in range(start, end):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            out.append(port)
        except OSError:
            continue
        finally:
            s.close()
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} free ports in {start}-{end}, need {n}")


# --------------------------------------------------------------------------------------------
# the world


def build_world(tmp: Path, n_models: int, seed: int) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.sklearn
    import numpy as np
    from sklearn.dummy import DummyClassifier

    from platform_defs.policy import load_policy
    from platform_defs.specs import DatasetSpec, EndpointSpec, ModelSpec, Organisation
    from resources.approvals import load_private_key, sign
    from resources.deployers.local import LocalProcessDeployer
    from resources.ledger import Ledger
    from resources.mlflow_registry import MlflowRegistry

    rng = random.Random(seed)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    registry = MlflowRegistry(tracking_uri=uri, artifact_root=str(tmp / "mlartifacts"),
                              cache_dir=str(tmp / "cache"))
    client = registry.client()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    t0 = time.perf_counter()
    exp = registry.experiment_id("onepath/bench")
    with mlflow.start_run(experiment_id=exp) as run:
        info = mlflow.sklearn.log_model(DummyClassifier().fit(np.zeros((4, 1)), [0, 1, 0, 1]), name="model")
    source, model_id, run_id = f"models:/{info.model_id}", info.model_id, run.info.run_id

    policy = load_policy()
    mira = load_private_key(ROOT / "assets" / "demo_identities" / "mira.key")
    ledger = Ledger(tmp / "ledger.db", tmp / "keys" / "platform.key")
    dataset = DatasetSpec(name="bench_data", owner="credit-risk", track="ml-high-risk",
                          generator="bench.data:generate", columns=[
                              {"name": "x", "dtype": "float"}, {"name": "y", "dtype": "int", "role": "label"}])
    decls: list[Any] = [dataset]
    expected: dict[tuple[str, str], str] = {}  # (endpoint, env) -> recorded version
    t_models = time.perf_counter()
    n_versions = 0
    for i in range(n_models):
        model, endpoint = f"bench_m{i:04d}", f"bench_e{i:04d}"
        track, owner = ("ml-high-risk", "credit-risk") if i % 2 else ("ml-standard", "retention")
        decls.append(ModelSpec(name=model, owner=owner, track=track, dataset="bench_data",
                               trainer="bench.trainer:train"))
        decls.append(EndpointSpec(name=endpoint, owner=owner, track=track, model=model))
        client.create_registered_model(model)
        versions = rng.randint(1, 3)
        for v in range(1, versions + 1):
            client.create_model_version(model, source, run_id=run_id, model_id=model_id, tags={
                "onepath.dataset_key": "bench_data", "onepath.data_hash": f"{rng.getrandbits(256):064x}",
                "onepath.code_hash": f"{rng.getrandbits(256):064x}", "onepath.author": owner.split("-")[0],
                "onepath.track": track})
        n_versions += versions
        staging, prod = str(versions), str(max(1, versions - 1))
        client.set_registered_model_alias(model, "staging", staging)
        client.set_registered_model_alias(model, "prod", prod)
        expected[(endpoint, "staging")], expected[(endpoint, "prod")] = staging, prod
    t_ledger = time.perf_counter()
    checks = policy.track("ml-high-risk").checks
    for i in range(n_models):
        model, endpoint = f"bench_m{i:04d}", f"bench_e{i:04d}"
        track = "ml-high-risk" if i % 2 else "ml-standard"
        for env in ("staging", "prod"):
            version = expected[(endpoint, env)]
            if env == "prod" and track == "ml-high-risk":
                # the inventory lists approvals as recorded: what they bind is the gates' business, not timed here
                a = sign(mira, asset=model, version=version, env=env, reason="bench", approver="mira",
                         run_id=run_id, digest="0" * 64, first_release=True)
                ledger.append("approval", model, a.as_dict(), "mira", env=env)
            ledger.append("gate_verdict", endpoint, {
                "model": model, "version": version, "passed": True,
                "verdicts": {c: {"passed": True, "summary": "ok"} for c in checks}}, "bench", env=env)
            ledger.append("deploy", endpoint, {"model": model, "version": version, "previous_version": None,
                                               "track": track, "owner": "bench", "checks": checks}, "bench", env=env)
    t_done = time.perf_counter()

    ports = free_ports(2 * n_models)
    run_dir = tmp / "run"
    deployer = LocalProcessDeployer(run_dir, inference_log_dir=tmp / "logs")
    slots: dict[str, int] = {}
    serving: dict[int, tuple[str, str, str]] = {}  # port -> (endpoint, model, version it answers)
    for k, ((endpoint, env), version) in enumerate(sorted(expected.items())):
        port = ports[k]
        slots[f"{endpoint}.{env}"] = port
        live = version if k % MISMATCH_EVERY else str(int(version) + 1)  # every 50th: a mismatch
        serving[port] = (endpoint, endpoint.replace("_e", "_m"), live)
    (run_dir / "ports.json").write_text(json.dumps(slots, indent=1, sort_keys=True))
    org = Organisation(decls)
    return {"registry": registry, "ledger": ledger, "deployer": deployer, "org": org, "policy": policy,
            "expected": expected, "serving": serving, "slots": slots, "versions": n_versions,
            "entries": len(ledger.entries()),
            "setup": {"log_model": t_models - t0, "register": t_ledger - t_models, "ledger": t_done - t_ledger}}


# --------------------------------------------------------------------------------------------
# the naive loop


def naive_inventory(world: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
    from resources.deployers.base import probe
    from resources.mlflow_registry import TAG_PREFIX

    client = world["registry"].client()
    ledger, slots = world["ledger"], world["slots"]
    rows = []
    for d in world["org"].of_kind("endpoint"):
        rm = client.get_registered_model(d.model)
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        versions = client.search_model_versions(f"name = '{d.model}'")
        tags = {str(mv.version): client.get_model_version(d.model, str(mv.version)).tags for mv in versions}
        for env in d.environments:
            deploys = [e for e in ledger.entries(kind="deploy", subject=d.name, env=env) if "version" in e.data]
            recorded = str(deploys[-1].data["version"]) if deploys else aliases.get(env)
            approvals = [e for e in ledger.entries(kind="approval", subject=d.model, env=env)
                         if str(e.data.get("version")) == recorded]
            gates = [e for e in ledger.entries(kind="gate_verdict", subject=d.name, env=env)
                     if str(e.data.get("version")) == recorded]
            port = slots.get(f"{d.name}.{env}")
            seen = probe(f"http://127.0.0.1:{port}", timeout) if port else None
            live = str(seen["version"]) if seen else None
            rows.append({"name": d.name, "env": env, "recorded_version": recorded, "live_version": live,
                         "approvals": [e.data.get("approver") for e in approvals],
                         "gate": gates[-1].data.get("passed") if gates else None,
                         "lineage": {k: (tags.get(recorded) or {}).get(TAG_PREFIX + k)
                                     for k in ("dataset_key", "data_hash", "code_hash")},
                         "agrees": (live == recorded) if live is not None and recorded else None})
    return rows


# --------------------------------------------------------------------------------------------


def fast(world: dict[str, Any], timeout: float) -> tuple[float, list[Any]]:
    from platform_defs.inventory import build_inventory

    t = time.perf_counter()
    rows = build_inventory(world["org"], world["policy"], world["registry"], world["ledger"], world["deployer"],
                           timeout=timeout)
    return time.perf_counter() - t, rows


def parts(world: dict[str, Any], timeout: float) -> dict[str, float]:
    """Each part of build_inventory alone, to show where the time goes."""

    from platform_defs import inventory as inv
    from resources.deployers.base import probe_many

    out = {}
    t = time.perf_counter()
    inv._LedgerIndex(world["ledger"].entries())
    out["part_ledger_s"] = time.perf_counter() - t
    t = time.perf_counter()
    inv._version_tags(world["registry"].client(), {d.model for d in world["org"].of_kind("endpoint")})
    out["part_mlflow_s"] = time.perf_counter() - t
    addresses = [f"http://127.0.0.1:{p}" for p in world["slots"].values()]
    t = time.perf_counter()
    probe_many(addresses, timeout, 256, False)
    out["part_probes_s"] = time.perf_counter() - t
    return out


def check(world: dict[str, Any], rows: list[Any], naive: list[dict[str, Any]], answering: set[int]) -> list[str]:
    """Where the fast inventory disagrees with the naive loop or with what was set up."""
    problems = []
    by_key = {(r.name, r.env): r for r in rows}
    nv = {(r["name"], r["env"]): r for r in naive}
    if set(by_key) != set(nv) or set(by_key) != set(world["expected"]):
        problems.append(f"row sets differ: fast {len(by_key)}, naive {len(nv)}, expected {len(world['expected'])}")
    want_mismatch = set()
    for slot, port in world["slots"].items():
        endpoint, env = slot.rsplit(".", 1)
        if port in answering and world["serving"][port][2] != world["expected"][(endpoint, env)]:
            want_mismatch.add((endpoint, env))
    for key, r in by_key.items():
        n = nv.get(key, {})
        if r.recorded_version != world["expected"].get(key) or r.recorded_version != n.get("recorded_version"):
            problems.append(f"{key}: recorded {r.recorded_version}, naive {n.get('recorded_version')}")
        if r.live_version != n.get("live_version") or r.agrees != n.get("agrees"):
            problems.append(f"{key}: live {r.live_version}/{r.agrees}, naive {n.get('live_version')}/{n.get('agrees')}")
        if r.lineage != n.get("lineage"):
            problems.append(f"{key}: lineage differs")
        if [a["approver"] for a in r.approvals] != n.get("approvals"):
            problems.append(f"{key}: approvals {r.approvals} vs {n.get('approvals')}")
        if (r.gate or {}).get("passed") != n.get("gate"):
            problems.append(f"{key}: gate differs")
        if (r.state == "mismatch") != (key in want_mismatch):
            problems.append(f"{key}: state {r.state}, expected mismatch={key in want_mismatch}")
    return problems[:10]


def run_scenario(name: str, world: dict[str, Any], listen: list[int], tmp: Path, timeout: float,
                 repeat: int) -> dict[str, Any]:
    from platform_defs.inventory import summarize

    helper = start_helper({p: world["serving"][p] for p in listen}, tmp, name)
    try:
        cold, rows = fast(world, timeout)
        t = time.perf_counter()
        naive = naive_inventory(world, timeout)
        naive_s = time.perf_counter() - t
        warm = []
        for _ in range(repeat):
            s, rows = fast(world, timeout)
            warm.append(s)
        floors = parts(world, timeout)
    finally:
        stop_helper(helper)
    counts = summarize(rows)
    return {"scenario": name, "listening": len(listen), "counts": counts, "fast_first_s": cold,
            "fast_warm_s": statistics.median(warm), "fast_warm_all_s": warm, "naive_s": naive_s, **floors,
            "load_avg_1m": os.getloadavg()[0],
            "problems": check(world, rows, naive, set(listen))}


def fresh_process_store_init(uri: str) -> dict[str, float]:
    """What a new process pays before its first registry answer: import mlflow, open the sqlite store."""
    code = ("import time, json; t = time.perf_counter(); from mlflow import MlflowClient; i = time.perf_counter(); "
            f"MlflowClient(tracking_uri={uri!r}).search_registered_models(max_results=1); "
            "print(json.dumps({'import_s': i - t, 'open_s': time.perf_counter() - i}))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    if out.returncode != 0:
        raise RuntimeError(f"measuring MLflow store init failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--answering", type=int, default=10, help="ports that answer in the 'handful' scenario")
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="onepath-inventory-bench-"))
    store_init = None
    try:
        t = time.perf_counter()
        print(f"building: {args.models} models in {tmp} ...", flush=True)
        world = build_world(tmp, args.models, args.seed)
        setup = world["setup"]
        print(f"  {args.models} registered models, {world['versions']} versions, {world['entries']} ledger entries, "
              f"{2 * args.models} endpoint environments ({time.perf_counter() - t:.1f} s: log model "
              f"{setup['log_model']:.1f}, register {setup['register']:.1f}, ledger {setup['ledger']:.1f})", flush=True)
        store_init = fresh_process_store_init(world["registry"].tracking_uri)
        ports = sorted(world["serving"])
        handful = sorted(random.Random(args.seed).sample(ports, min(args.answering, len(ports))))
        results = [run_scenario("handful", world, handful, tmp, args.timeout, args.repeat),
                   run_scenario("all", world, ports, tmp, args.timeout, args.repeat)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\ninventory of {args.models} models = {2 * args.models} rows (probe timeout {args.timeout} s, "
          f"target < {TARGET_SECONDS:.0f} s)")
    print(f"(a fresh process, as `onepath inventory` is, also pays once: importing mlflow and opening its "
          f"store = {store_init['import_s']:.2f} s + {store_init['open_s']:.2f} s, measured in a subprocess)")
    bad = False
    for r in results:
        c = r["counts"]
        print(f"\n[{r['scenario']}] {r['listening']} of {2 * args.models} stable addresses answering (one helper "
              f"process); inventory saw {c['serving']} answering, {c['mismatches']} mismatches, {c['unhealthy']} down")
        for label, key in (("first", "fast_first_s"), ("warm", "fast_warm_s")):
            s = r[key]
            print(f"  build_inventory {label:>4}: {s:7.3f} s   naive loop: {r['naive_s']:7.3f} s   "
                  f"ratio {r['naive_s'] / s:6.1f}x   {'PASS' if s < TARGET_SECONDS else 'MISS'} (< 1 s)")
        print(f"  parts alone: ledger read+index {r['part_ledger_s']:.3f} s, MLflow version search "
              f"{r['part_mlflow_s']:.3f} s, {2 * args.models} probes ({r['listening']} answering) "
              f"{r['part_probes_s']:.3f} s; all {len(r['fast_warm_all_s'])} warm runs: "
              f"{', '.join(f'{x:.3f}' for x in r['fast_warm_all_s'])} s; 1-min load average {r['load_avg_1m']:.1f} "
              f"on {os.cpu_count()} CPUs")
        if r["problems"]:
            bad = True
            print("  DISAGREEMENT: " + "; ".join(r["problems"]))
        else:
            print("  fast and naive results agree row for row (recorded, live, agrees, lineage, approvals, gate)")
    if args.json:
        Path(args.json).write_text(json.dumps({"models": args.models, "timeout": args.timeout,
                                               "fresh_process_store_init": store_init,
                                               "results": results}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
