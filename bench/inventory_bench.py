"""Inventory benchmark: ``onepath inventory --json`` as a FRESH PROCESS, this tree against a baseline commit.

    .venv/bin/python bench/inventory_bench.py [--against ebcb2bc] [--models 1000] [--answering 10]
        [--rounds 3] [--timeout 1.0] [--seed 7] [--baseline-dir DIR] [--json results.json]

What a person pays is a new process: ``python -m platform_defs.cli inventory --json`` from its first
import to its last byte of output. The bench builds one world, all inside a fresh temporary directory
(removed at the end), and times that command in both trees against it, interleaved:

1. a fresh MLflow sqlite store: one tiny logged model (a DummyClassifier) and ``--models``
   registered models with 1-3 versions each, all pointing at that one logged model, each version
   tagged with lineage (``onepath.dataset_key/data_hash/code_hash``), aliases ``staging`` and ``prod``;
2. the platform ledger (``resources.ledger.Ledger`` at ``$ONEPATH_HOME/ledger.db``, hash-chained and
   signed) with what the platform writes: a ``model_registered`` entry per version (its digest and
   lineage, as the model asset records them), then per endpoint and environment a ``gate_verdict`` and
   a ``deploy``; high-risk models get a signed ``approval`` for prod (the demo identity mira);
3. declarations on disk (``$ONEPATH_DECLARATIONS_DIR``): one dataset, ``--models`` models (the credit
   example's generator and trainer) and one endpoint per model (staging + prod): 2 x ``--models`` rows;
4. stable addresses: the local deployer's port registry (``run/ports.json``) maps every endpoint
   environment to its own loopback port; ONE helper process (this script with ``--serve``, asyncio)
   answers ``/health`` and ``/version`` like a model server on ``--answering`` of them (the recorded
   version and its registered digest, except every 50th port: a deliberate mismatch); every other
   port is closed (connection refused at once);
5. ``--rounds`` rounds, the order alternating per round: the command in this tree and in the tree of
   ``--against`` (exported with ``git archive`` into ``--baseline-dir``, the repository left alone),
   each with ``PYTHONPATH`` and working directory set to its tree (each child reports which
   ``platform_defs`` it imported; the run stops if that is not its tree). Both outputs are checked
   against what was set up (2 x ``--models`` rows, recorded versions, answering, mismatches) and
   against each other row for row;
6. prints the median and every round for both, the ratio, and PASS/MISS against the 1 s target, and
   which of dagster, mlflow, pandas, sklearn the new tree's process imported (a child with
   ``-X importtime``, not timed).

Each child's CPU time (user + system, from ``getrusage``) is reported next to its wall time: on
a shared machine the wall time carries the other tenants' load, the CPU time much less.
An inventory keeps what it needs of the organisation in the home between runs (``platform_defs.inventory_cache``):
by default an untimed run fills it and the timed ones find it, as a person's second run does; ``--cold``
removes it before every timed run (the first inventory after a declaration, the policy or the code changed).
``--world DIR`` keeps the world (and reuses it on the next run). Without ``--against`` only this
tree is timed. ``--bytecode-cache DIR`` runs both as an installed image would (see
its help). A run takes 3-8 minutes with the defaults, most of it
registering models and appending ledger entries.
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
BYTECODE_CACHE: Path | None = None  # --bytecode-cache
COLD = False  # --cold
CPU: list[float] = []  # CPU seconds (user + system) of each timed child, in order


# --------------------------------------------------------------------------------------------
# the helper server (this script with --serve MAPPING): /health and /version on many ports


def serve(mapping_path: str) -> None:
    mapping: dict[str, list[Any]] = json.loads(Path(mapping_path).read_text())  # port -> [endpoint, model, version, digest]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: str) -> None:
        try:
            line = await reader.readline()
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.split()
            path = parts[1].decode() if len(parts) > 1 else "/"
            endpoint, model, version, digest = mapping[port]
            if path == "/health":
                status, body = b"200 OK", {"status": "ok", "version": version}
            elif path == "/version":
                status, body = b"200 OK", {"endpoint": endpoint, "env": "bench", "model": model,
                                           "version": version, "digest": digest, "pid": os.getpid()}
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


def start_helper(mapping: dict[int, tuple[Any, ...]], workdir: Path, name: str) -> subprocess.Popen:
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

DATASET = """\
type: onepath.Dataset
attributes:
  name: bench_data
  owner: credit-risk
  track: ml-high-risk
  generator: assets.credit.data:generate_credit_applications
  columns:
    - {name: application_id, dtype: string, role: id}
    - {name: annual_income, dtype: float}
    - {name: defaulted, dtype: int, role: label}
"""


def build_world(tmp: Path, n_models: int, seed: int) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    import mlflow.sklearn
    import numpy as np
    from sklearn.dummy import DummyClassifier

    from platform_defs.policy import load_policy
    from resources.approvals import load_private_key, sign
    from resources.ledger import Ledger, ledger_paths
    from resources.mlflow_registry import MlflowRegistry

    rng = random.Random(seed)
    home = tmp / "home"
    home.mkdir(mode=0o700)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    registry = MlflowRegistry(tracking_uri=uri, artifact_root=str(home / "mlartifacts"),
                              cache_dir=str(home / "releases" / "models"))
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
    ledger = Ledger(*ledger_paths(home))
    yaml_lines = [DATASET.rstrip("\n")]  # one component document each
    expected: dict[tuple[str, str], str] = {}  # (endpoint, env) -> recorded version
    digests: dict[tuple[str, str], str] = {}  # (model, version) -> registered digest
    lineage: dict[tuple[str, str], dict[str, str]] = {}
    t_models = time.perf_counter()
    n_versions = 0
    for i in range(n_models):
        model, endpoint = f"bench_m{i:04d}", f"bench_e{i:04d}"
        track, owner = ("ml-high-risk", "credit-risk") if i % 2 else ("ml-standard", "retention")
        yaml_lines.append(f"---\ntype: onepath.Model\nattributes: {{name: {model}, owner: {owner}, track: {track}, "
                          f"dataset: bench_data, trainer: 'assets.credit.trainer:train_credit_risk'}}")
        yaml_lines.append(f"---\ntype: onepath.Endpoint\nattributes: {{name: {endpoint}, owner: {owner}, track: {track}, "
                          f"model: {model}}}")
        client.create_registered_model(model)
        versions = rng.randint(1, 3)
        for v in range(1, versions + 1):
            facts = {"dataset_key": "bench_data", "data_hash": f"{rng.getrandbits(256):064x}",
                     "code_hash": f"{rng.getrandbits(256):064x}"}
            lineage[(model, str(v))] = facts
            digests[(model, str(v))] = f"sha256:{rng.getrandbits(256):064x}"
            client.create_model_version(model, source, run_id=run_id, model_id=model_id, tags={
                **{f"onepath.{k}": x for k, x in facts.items()}, "onepath.author": owner.split("-")[0],
                "onepath.track": track})
        n_versions += versions
        staging, prod = str(versions), str(max(1, versions - 1))
        client.set_registered_model_alias(model, "staging", staging)
        client.set_registered_model_alias(model, "prod", prod)
        expected[(endpoint, "staging")], expected[(endpoint, "prod")] = staging, prod
    decls = tmp / "declarations"
    (decls / "bench").mkdir(parents=True)
    (decls / "bench" / "defs.yaml").write_text("\n".join(yaml_lines) + "\n")
    t_ledger = time.perf_counter()
    for (model, version), digest in sorted(digests.items()):  # what the model asset records per version
        ledger.append("model_registered", model, {"model": model, "version": version, "digest": digest,
                                                  "run_id": run_id, "author": "bench", **lineage[(model, version)]},
                      "bench")
    checks = policy.track("ml-high-risk").checks
    for i in range(n_models):
        model, endpoint = f"bench_m{i:04d}", f"bench_e{i:04d}"
        track = "ml-high-risk" if i % 2 else "ml-standard"
        for env in ("staging", "prod"):
            version = expected[(endpoint, env)]
            if env == "prod" and track == "ml-high-risk":
                a = sign(mira, asset=model, version=version, env=env, reason="bench", approver="mira",
                         run_id=run_id, digest=digests[(model, version)], first_release=True)
                ledger.append("approval", model, a.as_dict(), "mira", env=env)
            ledger.append("gate_verdict", endpoint, {
                "model": model, "version": version, "passed": True,
                "verdicts": {c: {"passed": True, "summary": "ok"} for c in checks}}, "bench", env=env)
            ledger.append("deploy", endpoint, {"model": model, "version": version, "previous_version": None,
                                               "track": track, "owner": "bench", "checks": checks}, "bench", env=env)
    t_done = time.perf_counter()

    ports = free_ports(2 * n_models)
    run_dir = home / "run"
    run_dir.mkdir(mode=0o700)
    slots = {f"{endpoint}.{env}": ports[k] for k, (endpoint, env) in enumerate(sorted(expected))}
    (run_dir / "ports.json").write_text(json.dumps(slots, indent=1, sort_keys=True))
    world = load_world(tmp)
    world["setup"] = {"log_model": t_models - t0, "register": t_ledger - t_models, "ledger": t_done - t_ledger}
    return world


def load_world(tmp: Path) -> dict[str, Any]:
    """The world ``build_world`` made in ``tmp``, read back from disk (the ledger, the port registry): what
    the inventory must say about it. ``--world DIR`` reuses one this way."""
    from resources.ledger import Ledger, ledger_paths

    home = tmp / "home"
    book = Ledger(*ledger_paths(home))
    entries = book.entries()
    expected = {(e.subject, e.env): str(e.data["version"]) for e in entries if e.kind == "deploy"}
    digests = {(e.subject, str(e.data["version"])): e.data["digest"] for e in entries if e.kind == "model_registered"}
    slots = json.loads((home / "run" / "ports.json").read_text())
    serving: dict[int, tuple[str, str, str, str | None]] = {}  # port -> (endpoint, model, version, digest)
    for k, ((endpoint, env), version) in enumerate(sorted(expected.items())):
        model = endpoint.replace("_e", "_m")
        live = version if k % MISMATCH_EVERY else str(int(version) + 1)  # every 50th: a mismatch
        serving[slots[f"{endpoint}.{env}"]] = (endpoint, model, live, digests.get((model, live)))
    uri = f"sqlite:///{home / 'mlflow.db'}"
    env = {"ONEPATH_HOME": str(home), "ONEPATH_DECLARATIONS_DIR": str(tmp / "declarations"),
           "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "GX_ANALYTICS_ENABLED": "false"}
    return {"expected": expected, "serving": serving, "slots": slots, "versions": len(digests), "env": env,
            "entries": len(entries), "models": len({e for e, _ in expected})}


# --------------------------------------------------------------------------------------------
# one fresh process


def export_tree(commit: str, into: Path) -> str:
    """``commit``'s tree exported with git archive into ``into`` (reused if it holds that commit)."""
    full = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()
    stamp = into / ".bench-commit"
    if stamp.exists() and stamp.read_text().strip() == full:
        return full
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", full], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    stamp.write_text(full + "\n")
    return full


def child_env(world: dict[str, Any], tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEPATH_", "MLFLOW_", "DAGSTER_"))}
    env.update(world["env"])
    env["PYTHONPATH"] = str(tree)
    if BYTECODE_CACHE is not None:  # as an installed image with compiled bytecode would run, both trees alike
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(BYTECODE_CACHE)
    return env


def check_tree(world: dict[str, Any], tree: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import platform_defs; print(platform_defs.__file__)"],
                         cwd=tree, env=child_env(world, tree), check=True, capture_output=True, text=True)
    got = Path(out.stdout.strip()).resolve()
    if not got.is_relative_to(tree.resolve()):
        raise RuntimeError(f"the child for {tree} imported platform_defs from {got}, not from its tree")


def fresh_inventory(world: dict[str, Any], tree: Path, timeout: float) -> tuple[float, list[dict[str, Any]]]:
    """Wall time of ``python -m platform_defs.cli inventory --json`` in ``tree``, and its rows. With ``--cold``
    the home's ``cache`` folder (what an inventory keeps of the organisation) is removed first: the first run
    after a declaration, the policy or the code changed."""
    import resource

    if COLD:
        shutil.rmtree(Path(world["env"]["ONEPATH_HOME"]) / "cache", ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "platform_defs.cli", "inventory", "--json", "--timeout", str(timeout)],
                         cwd=tree, env=child_env(world, tree), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
    if out.returncode != 0:
        raise RuntimeError(f"onepath inventory in {tree} exited {out.returncode}: {out.stderr.strip()[-800:]}")
    return wall, json.loads(out.stdout)


def heavy_imports(world: dict[str, Any], tree: Path, timeout: float) -> list[str]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "platform_defs.cli", "inventory", "--json",
                          "--timeout", str(timeout)], cwd=tree, env=child_env(world, tree), capture_output=True,
                         text=True, timeout=600)
    names = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return sorted(names & {"dagster", "mlflow", "pandas", "sklearn"})


def check(world: dict[str, Any], rows: list[dict[str, Any]], answering: set[int]) -> list[str]:
    """Where an inventory's rows disagree with what was set up."""
    problems = []
    by_key = {(r["name"], r["env"]): r for r in rows}
    if set(by_key) != set(world["expected"]):
        problems.append(f"rows: {len(by_key)}, expected {len(world['expected'])}")
    for key, r in by_key.items():
        port = world["slots"].get(f"{key[0]}.{key[1]}")
        live = world["serving"][port][2] if port in answering else None
        want = "down" if live is None else ("ok" if live == world["expected"].get(key) else "mismatch")
        if r["recorded_version"] != world["expected"].get(key):
            problems.append(f"{key}: recorded {r['recorded_version']}, set up {world['expected'].get(key)}")
        if r["live_version"] != live or r["state"] != want:
            problems.append(f"{key}: live {r['live_version']} state {r['state']}, set up {live} {want}")
    return problems[:10]


def compare(new: list[dict[str, Any]], old: list[dict[str, Any]]) -> list[str]:
    """Where the two trees' rows differ on what both report."""
    keys = ("recorded_version", "live_version", "state", "lineage", "healthy", "agrees", "deployed_at")
    a = {(r["name"], r["env"]): r for r in new}
    b = {(r["name"], r["env"]): r for r in old}
    out = [f"{k}: {f} {a[k][f]!r} vs {b[k][f]!r}" for k in sorted(set(a) & set(b)) for f in keys if a[k][f] != b[k][f]]
    out += [f"{k}: approvals differ" for k in sorted(set(a) & set(b))
            if [x["approver"] for x in a[k]["approvals"]] != [x["approver"] for x in b[k]["approvals"]]]
    return ([f"row sets differ: {len(a)} vs {len(b)}"] if set(a) != set(b) else []) + out[:10]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--answering", type=int, default=10, help="ports that answer (the rest are closed)")
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--against", metavar="COMMIT", help="also time the command in this commit's tree")
    ap.add_argument("--baseline-dir", help="where --against's tree is exported (default: in the temp dir)")
    ap.add_argument("--bytecode-cache", type=Path, metavar="DIR",
                    help="run both trees' commands with Python's bytecode cache in DIR (PYTHONPYCACHEPREFIX, writes "
                         "allowed), as an image with compiled bytecode would; an untimed run of each fills it. "
                         "Default: the environment as it is (PYTHONDONTWRITEBYTECODE=1 compiles every module "
                         "from source in every process)")
    ap.add_argument("--cold", action="store_true",
                    help="remove the home's cache folder before every timed run: the first inventory after a change "
                         "(default: as a person runs it again, the organisation kept by the previous run)")
    ap.add_argument("--world", metavar="DIR", help="build the world in DIR and keep it; reuse the one there if any "
                                                  "(its setup takes minutes; --models and --seed then do not apply)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    tmp = Path(args.world) if args.world else Path(tempfile.mkdtemp(prefix="onepath-inventory-bench-"))
    helper = None
    trees = {"new": ROOT}
    times: dict[str, list[float]] = {"new": []}
    cpu: dict[str, list[float]] = {"new": []}
    problems: list[str] = []
    try:
        if args.against:
            base = Path(args.baseline_dir) if args.baseline_dir else tmp / "baseline"
            base_commit = export_tree(args.against, base)
            trees["baseline"], times["baseline"], cpu["baseline"] = base, [], []
        t = time.perf_counter()
        if (tmp / "home" / "run" / "ports.json").exists():
            world = load_world(tmp)
            args.models = world["models"]
            print(f"reusing the world in {tmp}: {args.models} models, {world['versions']} versions, "
                  f"{world['entries']} ledger entries", flush=True)
        else:
            tmp.mkdir(parents=True, exist_ok=True)
            print(f"building: {args.models} models in {tmp} ...", flush=True)
            world = build_world(tmp, args.models, args.seed)
            setup = world["setup"]
            print(f"  {args.models} registered models, {world['versions']} versions, {world['entries']} ledger "
                  f"entries, {2 * args.models} endpoint environments ({time.perf_counter() - t:.1f} s: log model "
                  f"{setup['log_model']:.1f}, register {setup['register']:.1f}, ledger {setup['ledger']:.1f})",
                  flush=True)
        global BYTECODE_CACHE, COLD
        BYTECODE_CACHE, COLD = args.bytecode_cache, args.cold
        for tree in trees.values():
            check_tree(world, tree)
        ports = sorted(world["serving"])
        listen = sorted(random.Random(args.seed).sample(ports, min(args.answering, len(ports))))
        helper = start_helper({p: world["serving"][p] for p in listen}, tmp, "helper")
        last: dict[str, list[dict[str, Any]]] = {}
        if BYTECODE_CACHE is not None:
            for tree in trees.values():  # fills the cache, untimed
                fresh_inventory(world, tree, args.timeout)
        elif not COLD:  # what a person's second run finds: the organisation kept by a first one (untimed)
            fresh_inventory(world, trees["new"], args.timeout)
        for i in range(args.rounds):
            order = list(trees) if i % 2 == 0 else list(reversed(trees))
            for side in order:
                wall, rows = fresh_inventory(world, trees[side], args.timeout)
                times[side].append(wall)
                cpu[side].append(CPU[-1])
                last[side] = rows
                problems += [f"{side}: {p}" for p in check(world, rows, set(listen))]
                print(f"  round {i + 1} {side:>8}: {wall:6.2f} s wall, {CPU[-1]:5.2f} s CPU ({len(rows)} rows)",
                      flush=True)
        if "baseline" in last:
            problems += [f"new vs baseline: {p}" for p in compare(last["new"], last["baseline"])]
        imported = {side: heavy_imports(world, tree, args.timeout) for side, tree in trees.items()}
    finally:
        stop_helper(helper)
        if not args.world:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nonepath inventory --json as a fresh process, {args.models} models = {2 * args.models} rows, "
          f"{len(listen)} answering (probe timeout {args.timeout} s, target < {TARGET_SECONDS:.0f} s"
          f"{'; --cold: no kept organisation' if COLD else ''}); "
          f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for side in trees:
        label = "this tree" if side == "new" else f"baseline {base_commit[:7]}"
        m = statistics.median(times[side])
        print(f"  {label:>16}: median {m:6.2f} s wall, {statistics.median(cpu[side]):5.2f} s CPU  "
              f"(rounds: {', '.join(f'{x:.2f}' for x in times[side])})  "
              f"{'PASS' if m < TARGET_SECONDS else 'MISS'} (< 1 s); of dagster, mlflow, pandas, sklearn it imports: "
              f"{', '.join(imported[side]) or 'none'}")
    if "baseline" in times:
        print(f"  ratio baseline/this tree (medians): "
              f"{statistics.median(times['baseline']) / statistics.median(times['new']):.1f}x")
    if problems:
        print("  DISAGREEMENT: " + "; ".join(problems[:10]))
    else:
        print("  every output agrees with what was set up" + (" and the two trees agree row for row"
                                                               if "baseline" in times else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"models": args.models, "timeout": args.timeout,
                                               "answering": len(listen), "times": times, "cpu": cpu, "imports": imported,
                                               "against": args.against, "problems": problems}, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
