"""Ledger benchmark: append throughput and ``verify`` over 100,000 entries, this tree against a baseline.

    .venv/bin/python bench/ledger_bench.py --against 67569ae [--entries 100000] [--appends 300] [--rounds 3]

For each tree (this one, and ``COMMIT`` checked out with ``git worktree add --detach`` into a temp
dir, removed afterwards) a driver process runs with ``PYTHONPATH`` and working directory set to that
tree, imports that tree's own ``resources.ledger`` (it reports the file, and the run stops if it is
not its tree) and measures:

* **append**: ``--appends`` appends in one process to a fresh ledger (for this tree also with the
  witness on: a witness process the driver starts, ``onepath witness serve`` from the same tree,
  so every append also submits its row and gets a countersignature);
* **verify**: ``--entries`` entries built in bulk with the tree's own ``entry_hash`` (inserted with
  one ``executemany``, as an append would have chained them), then the head signed the way that tree
  signs (baseline: its anchor file write; this tree: one head signature plus one witness submission
  of all rows, through the ledger's own catch-up code), then ``verify()`` timed ``--rounds`` times
  (best and median; with the witness ON for this tree), plus ``verify(full=True)`` where the tree
  has it (only the one head is signed in a bulk-built ledger, so that is the walk plus one signature).

Prints a small table; ``--json`` writes the numbers. The target: verify over 100,000 entries < 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r'''
import base64, json, os, statistics, subprocess, sys, time
from pathlib import Path
cfg = json.loads(sys.argv[1])
import resources.ledger as L
out = {"module": L.__file__, "new": hasattr(L, "SIGS")}
tmp = Path(cfg["tmp"])

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
    assert proc.stdout.readline().startswith("witness serving")
    return proc, sock

procs = []
try:
    # -- append throughput ------------------------------------------------------------------
    variants = [("append", False)] + ([("append_witness", True)] if out["new"] else [])
    for name, with_witness in variants:
        home = tmp / name
        db, key = L.ledger_paths(home)
        sock = None
        if with_witness:
            pk = L.Ledger(db, key).platform_public_key_b64()
            proc, sock = start_witness(name, pk)
            procs.append(proc)
        ledger = L.Ledger(db, key, witness_socket=sock) if out["new"] else L.Ledger(db, key)
        ledger.append("deploy", "warmup", {}, actor="bench")
        t = time.perf_counter()
        for i in range(cfg["appends"]):
            ledger.append("deploy", "credit_scoring", data(i), actor="bench", env="prod")
        dt = time.perf_counter() - t
        out[name] = cfg["appends"] / dt
        if with_witness:
            v = ledger.verify()
            assert v.ok and v.unwitnessed == 0 and v.witness_seq == cfg["appends"] + 1, v

    # -- verify over N bulk-built entries --------------------------------------------------
    home = tmp / "verify"
    db, key = L.ledger_paths(home)
    n = cfg["entries"]
    sock = None
    if out["new"]:
        pk = L.Ledger(db, key).platform_public_key_b64()
        proc, sock = start_witness("verify", pk)
        procs.append(proc)
        ledger = L.Ledger(db, key, witness_socket=sock)
    else:
        ledger = L.Ledger(db, key)
    with ledger._exclusive():
        conn = ledger._connection(create=True)
        prev, batch = L.GENESIS_HASH, []
        ts0 = "2026-12-01T00:00:00.000000+00:00"
        for seq in range(1, n + 1):
            d = data(seq)
            ts = ts0[:20] + format(seq % 1000000, "06d") + "+00:00"
            h = L.entry_hash(seq, ts, "deploy", "credit_scoring", "prod", "bench", d, prev)
            batch.append((seq, ts, "deploy", "credit_scoring", "prod", "bench", L.canonical_json(d), prev, h))
            prev = h
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(f"INSERT INTO {L.TABLE} VALUES (?,?,?,?,?,?,?,?,?)", batch)
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
        out["sign_bulk_head_s"] = time.perf_counter() - t
    times = []
    for _ in range(cfg["rounds"]):
        t = time.perf_counter()
        v = ledger.verify()
        times.append(time.perf_counter() - t)
        assert v.ok and v.entries == n, v
        if out["new"]:
            assert v.witness_seq == n and v.unwitnessed == 0, v
    out["verify_best_s"], out["verify_median_s"] = min(times), statistics.median(times)
    if out["new"]:
        t = time.perf_counter()
        assert ledger.verify(full=True).ok
        out["verify_full_s"] = time.perf_counter() - t
finally:
    for p in procs:
        p.terminate()
        p.wait(10)
print(json.dumps(out), flush=True)
'''


def run_tree(name: str, tree: Path, tmp: Path, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ONEPATH_WITNESS_SOCKET")}
    env["PYTHONPATH"] = str(tree)
    work = tmp / name
    work.mkdir()
    cfg = {"tmp": str(work), "entries": args.entries, "appends": args.appends, "rounds": args.rounds}
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cfg)], cwd=str(tree), env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{name} driver failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(out["module"]).resolve() != (tree / "resources" / "ledger.py").resolve():
        raise SystemExit(f"{name}: imported {out['module']}, not its own tree {tree}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", metavar="COMMIT", help="baseline commit measured in the same run")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--appends", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    baseline_dir = tmp / "baseline-tree"
    results: dict[str, dict] = {}
    try:
        if args.against:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline_dir), args.against],
                           check=True, capture_output=True)
            results["baseline " + args.against] = run_tree("baseline", baseline_dir, tmp, args)
        results["this tree"] = run_tree("new", ROOT, tmp, args)
    finally:
        if baseline_dir.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_dir)],
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    def cell(v: object, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    header = ("tree", "appends/s", "appends/s +witness", f"verify {args.entries} best s", "median s",
              "verify --full s", "sign bulk head s")
    table = [header] + [(name, cell(r.get("append"), ".0f"), cell(r.get("append_witness"), ".0f"),
                         cell(r.get("verify_best_s"), ".3f"), cell(r.get("verify_median_s"), ".3f"),
                         cell(r.get("verify_full_s"), ".3f"), cell(r.get("sign_bulk_head_s"), ".3f"))
                        for name, r in results.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    new = results["this tree"]
    verdict = "met" if new["verify_best_s"] < 2.0 else "NOT met"
    print(f"target verify({args.entries}) < 2 s with the witness on: {verdict} ({new['verify_best_s']:.3f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if new["verify_best_s"] < 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
