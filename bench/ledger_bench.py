"""Ledger benchmark: appends/s (1 and 4 writer processes, witness off and on) and ``verify`` over 100,000
entries, on sqlite and PostgreSQL, this tree against an optional baseline commit, in one run.

    .venv/bin/python bench/ledger_bench.py [--against COMMIT] [--entries 100000] [--appends 300] [--rounds 3]
                                           [--writers 4] [--json FILE]

Needs PostgreSQL 15's binaries (``tests/stores.py`` ``start_postgres()``: a real server, started as the
``postgres`` OS user on a free loopback port, stopped and removed at the end; one fresh database per
measurement) and root (for that ``setpriv``), like the tests.

Each tree (this one, and ``COMMIT`` checked out with ``git worktree add --detach`` into a temp dir, removed
afterwards) gets a driver process with ``PYTHONPATH`` and working directory set to that tree; it imports that
tree's own ``resources.ledger`` (it reports the file, and the run stops if it is not its tree). This tree (it has
``resources.ledger_store``) is measured on sqlite and on PostgreSQL, the baseline on sqlite only (its ledger is
sqlite-only and is built with its own private API, as before the storage layer existed).

* **appends/s**: writer processes (``--writers`` of them, and 1), each its own Python process with its own
  ``Ledger``, each making one untimed warm-up append, then waiting for a common start signal, then making
  ``--appends`` appends; appends/s = all timed appends / wall time from the start signal to the last writer's
  last append. Witness off, and on (a witness process the driver starts, ``onepath witness serve`` from the same
  tree, so every append also submits its row and gets a countersignature). sqlite: the writers share one
  ``ledger.db`` and key folder (one host); PostgreSQL: one database, and each writer gets its own copy of the key
  folder (as on separate hosts). Afterwards the ledger must verify with every entry there (and witnessed).
  The writers' own CPU time per append is reported too (on stderr and in ``--json``).
* **verify**: ``--entries`` entries built in bulk with the tree's own ``entry_hash`` (as appends would have
  chained them; this tree: ``store.exclusive()`` and one ``Conn.insert_rows``; the baseline: its sqlite ``executemany``),
  the head signed the way that tree signs (one head signature and one witness submission of every row, through
  the ledger's own catch-up code; a tree from before head signatures: its anchor file), then ``verify()`` timed
  ``--rounds`` times with the witness on (best and median), plus ``verify(full=True)`` (a bulk-built ledger has
  one signed head, so that is the walk plus one signature).

Also printed: the load average before and after, and ``pg_test_fsync``'s fdatasync ops/sec for the folder the
server's data is in (an append commits durably: a slow disk shows there, not in the code).

Targets (exit 0 only if both are met): verify over 100,000 entries < 2 s (best) on both stores, and >= 500
appends/s with 4 writers on PostgreSQL (witness off; the +witness figure is printed next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PG_URLS_ENV = "LEDGER_BENCH_PG_URLS"  # the driver's PostgreSQL databases (URLs carry the password: env, not argv)
LOCATION_ENV = "LEDGER_BENCH_LOCATION"  # a writer's ledger location

# One writer process: one warm-up append, "ready", then (on a line on stdin) the timed appends, then its end time.
WRITER = r'''
import json, os, sys, time
from pathlib import Path
cfg = json.loads(sys.argv[1])
import resources.ledger as L
loc = os.environ["LEDGER_BENCH_LOCATION"]
loc = loc if "://" in loc else Path(loc)
kw = {"witness_socket": cfg["sock"]} if cfg["sock"] else {}
ledger = L.Ledger(loc, Path(cfg["key"]), **kw)
def data(i):
    return {"version": str(i % 97), "model": "credit_scoring", "digest": "sha256:" + format(i, "064x"),
            "checks": {"roc_auc": 0.81, "ks": 0.42}, "run_id": format(i * 7919, "032x")}
ledger.append("deploy", "warmup", {"writer": cfg["i"]}, actor="bench")
print("ready", flush=True)
sys.stdin.readline()
cpu = time.process_time()
for i in range(cfg["appends"]):
    ledger.append("deploy", "credit_scoring", data(i), actor=f"bench-{cfg['i']}", env="prod")
print(json.dumps({"end": time.monotonic(), "cpu": time.process_time() - cpu}), flush=True)
'''

DRIVER = r'''
import base64, json, os, shutil, statistics, subprocess, sys, time
from pathlib import Path
cfg = json.loads(sys.argv[1])
WRITER = sys.argv[2]
import resources.ledger as L
store_layer = hasattr(L, "LedgerStore")  # this tree: one storage layer, sqlite and PostgreSQL
out = {"module": L.__file__, "new": hasattr(L, "SIGS"), "store_layer": store_layer, "stores": {}}
tmp = Path(cfg["tmp"])
pg_urls = json.loads(os.environ.get("LEDGER_BENCH_PG_URLS", "{}"))

def data(i):
    return {"version": str(i % 97), "model": "credit_scoring", "digest": "sha256:" + format(i, "064x"),
            "checks": {"roc_auc": 0.81, "ks": 0.42}, "run_id": format(i * 7919, "032x")}

def start_witness(name, platform_key):
    from resources.witness import init_witness
    wdir = tmp / f"{name}-witness"
    sockdir = tmp / f"{name}-sock"
    sockdir.mkdir(mode=0o700)
    init_witness(wdir, platform_key)
    sock = sockdir / "w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "platform_defs.cli", "witness", "serve", "--dir", str(wdir),
                             "--socket", str(sock)], stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    line = proc.stdout.readline()
    assert line.startswith("witness serving"), f"witness did not start: {line!r}"
    return sock

def place(store, name):
    """(location, key path) of a fresh ledger for one measurement."""
    home = tmp / store / name
    db, key = L.ledger_paths(home)
    if store == "sqlite":
        return db, key
    return pg_urls[name], key

def open_ledger(loc, key, sock):
    return L.Ledger(loc, key, witness_socket=sock) if out["new"] else L.Ledger(loc, key)

def appends(store, name, writers, with_witness):
    loc, key = place(store, name)
    ledger = open_ledger(loc, key, None)
    sock = start_witness(f"{store}-{name}", ledger.platform_public_key_b64()) if with_witness else None
    ledger = open_ledger(loc, key, sock)
    ledger.append("deploy", "warmup", {}, actor="bench")  # the schema and the key pair exist before the writers
    env = dict(os.environ, LEDGER_BENCH_LOCATION=str(loc))
    ps = []
    try:
        for i in range(writers):
            wkey = key
            if store != "sqlite" and writers > 1:  # as on separate hosts: each its own copy of the key folder
                kdir = key.parent.parent / f"keys-{i}"
                shutil.copytree(key.parent, kdir)
                wkey = kdir / key.name
            wcfg = {"i": i, "key": str(wkey), "sock": str(sock) if sock else None, "appends": cfg["appends"]}
            ps.append(subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(wcfg)], env=env, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for p in ps:
            line = p.stdout.readline()
            assert line.strip() == "ready", f"writer did not start ({line!r}, rc {p.poll()})"
        t0 = time.monotonic()
        for p in ps:
            p.stdin.write("go\n")
            p.stdin.flush()
        ends, cpu = [], 0.0
        for p in ps:
            line = p.stdout.readline()
            assert p.wait(600) == 0 and line, f"writer failed (rc {p.returncode})"
            ends.append(json.loads(line)["end"])
            cpu += json.loads(line)["cpu"]
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    wall = max(ends) - t0
    total = 1 + writers + writers * cfg["appends"]
    v = ledger.verify()
    assert v.ok and v.entries == total, v
    if with_witness:
        assert v.unwitnessed == 0 and v.witness_seq == total, v
    return writers * cfg["appends"] / wall, 1000 * cpu / (writers * cfg["appends"])

def build_bulk(ledger, n):
    """n entries chained by the tree's own entry_hash, inserted in bulk; the head signed as that tree signs."""
    rows, prev = [], L.GENESIS_HASH
    ts0 = "2026-12-01T00:00:00.000000+00:00"
    for seq in range(1, n + 1):
        d = data(seq)
        ts = ts0[:20] + format(seq % 1000000, "06d") + "+00:00"
        h = L.entry_hash(seq, ts, "deploy", "credit_scoring", "prod", "bench", d, prev)
        rows.append((seq, ts, "deploy", "credit_scoring", "prod", "bench", L.canonical_json(d), prev, h))
        prev_of_head, prev = prev, h
    if store_layer:
        with ledger.store.exclusive() as conn:
            conn.begin(write=True)
            conn.insert_rows(L.TABLE, [dict(zip(L.COLUMNS, r)) for r in rows])
            conn.commit()
            k = ledger._private_key(create=True)
            t = time.perf_counter()
            sig = base64.b64encode(k.sign(L.anchor_message(n, prev))).decode()
            conn.execute(f"INSERT INTO {L.SIGS} (seq, key, sig) VALUES (:seq, :key, :sig)",
                         seq=n, key=L._raw_b64(k.public_key()), sig=sig)
            ledger._witness_catch_up(conn, [n, prev_of_head, prev], sig, ledger._pins(conn), 0)
            return time.perf_counter() - t
    # an older tree (sqlite only): its own private API, exactly as this bench always built it
    with ledger._exclusive():
        conn = ledger._connection(create=True)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(f"INSERT INTO {L.TABLE} VALUES (?,?,?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")
        k = ledger._private_key(create=True)
        if not ledger.pub_path.exists():
            L.atomic_write(ledger.pub_path, L._public_pem(k.public_key()), mode=0o600)
        t = time.perf_counter()
        if out["new"]:
            sig = base64.b64encode(k.sign(L.anchor_message(n, prev))).decode()
            conn.execute(f"INSERT INTO {L.SIGS} VALUES (?,?,?)", (n, L._raw_b64(k.public_key()), sig))
            ledger._witness_catch_up(conn, n, sig)
        else:
            ledger._write_anchor(k, n, prev)
        return time.perf_counter() - t

def verify(store, r):
    loc, key = place(store, "verify")
    n = cfg["entries"]
    ledger = open_ledger(loc, key, None)
    sock = start_witness(f"{store}-verify", ledger.platform_public_key_b64()) if out["new"] else None
    ledger = open_ledger(loc, key, sock)
    t = time.perf_counter()
    r["sign_bulk_head_s"] = build_bulk(ledger, n)
    r["build_s"] = time.perf_counter() - t
    times = []
    for _ in range(cfg["rounds"]):
        t = time.perf_counter()
        v = ledger.verify()
        times.append(time.perf_counter() - t)
        assert v.ok and v.entries == n, v
        if out["new"]:
            assert v.witness_seq == n and v.unwitnessed == 0, v
    r["verify_best_s"], r["verify_median_s"] = min(times), statistics.median(times)
    if out["new"]:
        t = time.perf_counter()
        assert ledger.verify(full=True).ok
        r["verify_full_s"] = time.perf_counter() - t

procs = []
try:
    for store in (["sqlite", "postgresql"] if store_layer else ["sqlite"]):
        r = out["stores"][store] = {}
        loads = r["load_1min_at_start"] = {}
        cpu_ms = r["writer_cpu_ms_per_append"] = {}  # the writer processes' own CPU (not the server's, the witness's)
        witness = [False, True] if out["new"] else [False]
        for writers in (1, cfg["writers"]):
            for w in witness:
                name = f"append_{writers}{'_witness' if w else ''}"
                loads[name] = os.getloadavg()[0]
                r[name], cpu_ms[name] = appends(store, name, writers, w)
                print(f"{store} {name}: {r[name]:.0f} appends/s (writer CPU {cpu_ms[name]:.2f} ms per append; "
                      f"load {loads[name]:.2f} at its start)",
                      file=sys.stderr, flush=True)
        loads["verify"] = os.getloadavg()[0]
        verify(store, r)
        print(f"{store} verify: best {r['verify_best_s']:.3f} s (load {loads['verify']:.2f} at its start; "
              f"bulk build {r['build_s']:.1f} s)", file=sys.stderr, flush=True)
finally:
    for p in procs:
        p.terminate()
        p.wait(10)
print(json.dumps(out), flush=True)
'''


def pg_databases(writers: int) -> list[str]:
    """The databases the driver of this tree uses on PostgreSQL: one per measurement."""
    return [f"append_{n}{w}" for n in (1, writers) for w in ("", "_witness")] + ["verify"]


def run_tree(name: str, tree: Path, tmp: Path, args: argparse.Namespace, pg_urls: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "ONEPATH_WITNESS_SOCKET", "ONEPATH_LEDGER_URL", "ONEPATH_PLATFORM_KEY")}
    env["PYTHONPATH"] = str(tree)
    env[PG_URLS_ENV] = json.dumps(pg_urls)
    work = tmp / name
    work.mkdir()
    cfg = {"tmp": str(work), "entries": args.entries, "appends": args.appends, "rounds": args.rounds,
           "writers": args.writers}
    print(f"[{name}] {tree}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg), WRITER], cwd=str(tree), env=env,
                          stdout=subprocess.PIPE, text=True, timeout=3600)  # its progress and errors: on stderr
    if done.returncode != 0:
        raise SystemExit(f"{name} driver failed (exit {done.returncode}; its error is above)")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(out["module"]).resolve() != (tree / "resources" / "ledger.py").resolve():
        raise SystemExit(f"{name}: imported {out['module']}, not its own tree {tree}")
    return out


def fdatasync_ops(folder: Path) -> float | None:
    """pg_test_fsync's fdatasync ops/sec (one 8kB write) for a file in ``folder``; None when it cannot run."""
    tool = Path(os.environ.get("ONEPATH_PG_BIN", "/usr/lib/postgresql/15/bin")) / "pg_test_fsync"
    probe = folder / "pg_test_fsync.out"
    try:
        done = subprocess.run([str(tool), "-s", "1", "-f", str(probe)], capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r"^\s*fdatasync\s+([0-9.]+) ops/sec", done.stdout, re.M)  # the first: "one 8kB write"
    return float(m.group(1)) if m else None


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="COMMIT", help="baseline commit measured in the same run (sqlite only)")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--appends", type=int, default=300, help="timed appends per writer process")
    ap.add_argument("--writers", type=int, default=4, help="writer processes at once (besides the 1-writer case)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.stores import start_postgres

    load_before = load()
    print(f"load average before (1, 5, 15 min): {load_before} on {os.cpu_count()} CPUs", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    baseline_dir = tmp / "baseline-tree"
    results: dict[str, dict] = {}
    server = None
    try:
        server = start_postgres()
        fsync = fdatasync_ops(server.base)  # the server's own folder: the disk its WAL is on
        pg_urls = {name: server.create_database(name) for name in pg_databases(args.writers)}
        if args.against:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline_dir), args.against],
                           check=True, capture_output=True)
            base = run_tree("baseline", baseline_dir, tmp, args, {})
            for store, r in base["stores"].items():
                results[f"{args.against} / {store}"] = r
        new = run_tree("new", ROOT, tmp, args, pg_urls)
        for store, r in new["stores"].items():
            results[f"this tree / {store}"] = r
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.base, ignore_errors=True)
        if baseline_dir.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_dir)],
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = load()

    def cell(v: object, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    w = args.writers
    header = ("tree / store", "appends/s 1 writer", "+witness", f"{w} writers", f"{w} writers +witness",
              f"verify {args.entries} best s", "median s", "verify full s")
    table = [header] + [(name, cell(r.get("append_1"), ".0f"), cell(r.get("append_1_witness"), ".0f"),
                         cell(r.get(f"append_{w}"), ".0f"), cell(r.get(f"append_{w}_witness"), ".0f"),
                         cell(r.get("verify_best_s"), ".3f"), cell(r.get("verify_median_s"), ".3f"),
                         cell(r.get("verify_full_s"), ".3f"))
                        for name, r in results.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print()
    for row in table:
        print("  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip())
    print()
    sq, pg = results["this tree / sqlite"], results["this tree / postgresql"]
    n = f"{args.entries // 1000}k" if args.entries % 1000 == 0 else str(args.entries)
    verify_met = sq["verify_best_s"] < 2.0 and pg["verify_best_s"] < 2.0
    print(f"verify {n} < 2 s on both stores: {'met' if verify_met else 'NOT met'} (sqlite "
          f"{sq['verify_best_s']:.3f} s, postgresql {pg['verify_best_s']:.3f} s; best of {args.rounds})")
    appends_met = pg[f"append_{w}"] >= 500
    print(f">= 500 appends/s with {w} writers on PostgreSQL: {'met' if appends_met else 'NOT met'} "
          f"({pg[f'append_{w}']:.0f} appends/s; {pg[f'append_{w}_witness']:.0f} with the witness on)")
    print(f"disk: pg_test_fsync fdatasync {cell(fsync, '.0f')} ops/sec (one 8kB write, in the server's folder); "
          f"load average after: {load_after} (before: {load_before})")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "fdatasync_ops_per_s": fsync,
                                               "load_before": load_before, "load_after": load_after}, indent=2))
    return 0 if verify_met and appends_met else 1


if __name__ == "__main__":
    sys.exit(main())
