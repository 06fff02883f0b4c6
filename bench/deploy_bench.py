"""Deploy benchmark: redeploy time with the content-digest check against the commit before it.

    .venv/bin/python bench/deploy_bench.py [--rounds 15] [--gap 2] [--warmup 1]
        [--baseline-commit 1aea06b] [--baseline-dir /tmp/onepath-baseline] [--json out.json] [--keep]

Why: content digests made every model deploy hash the whole model folder twice, once in the
promotion flow (``fetch_verified`` checks the cached copy against the ledger's digest) and once in
the worker (``load_model`` reads the folder, hashes it and loads exactly those bytes); the
supervisor's control channel moved to a Unix socket at the same time. The target: a redeploy,
digest check included, within 10 % of the commit before.

What it does:

1. makes (once) a git worktree of ``--baseline-commit`` at ``--baseline-dir`` (reused if it is
   already there at that commit);
2. in a fresh temporary directory, trains the credit model twice (two seeds) and saves both in
   MLflow's format (skops) with ``tests/conftest.py``'s ``save_credit_model``: versions "1" and "2";
3. starts two driver processes, one per tree, each with ``PYTHONPATH`` and its working directory set
   to its own tree, so each imports its own code (the driver reports which ``resources`` it
   imported, and the run stops if that is not its tree). Each driver keeps one
   ``LocalProcessDeployer`` (its own run dir and port range) and one endpoint alive for the whole
   run and answers one JSON line per command over stdin/stdout;
4. each driver deploys version 1 from cold and then ``--warmup`` redeploys, none measured; then
   ``--rounds`` rounds, each one redeploy per side (alternating versions 2 and 1), the order
   baseline/new alternating per round so that noise from the rest of the machine hits both alike,
   with ``--gap`` seconds after each deploy (the old version's drain: 1 s idle grace);
5. deploy = wall time of ``deploy(target, release)`` returning: the new version healthy and
   answering at the stable address. The new side's release carries ``digest=folder_digest(dir)``
   and its deployer ``artifact_roots=[temp dir]``; the baseline's has neither (it has no such
   fields). "verify" is the new side's ``folder_digest`` of the folder just before each deploy, the
   step the flow's ``fetch_verified`` adds; "new incl. verify" is the sum;
6. prints median, p90, mean, min and max per column, the ratio of the medians new/baseline, a table
   per round and a one-line verdict; stops both endpoints at the end, also on Ctrl-C or an error.

The verdict uses "new incl. verify" against the baseline (target: ratio of medians <= 1.10). Both
trees start the same way: the venv's bytecode is compiled, neither tree has a ``__pycache__`` (with
``PYTHONDONTWRITEBYTECODE=1``, as on our machines, every worker compiles the repo's own modules).
A run takes about 4 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TARGET_RATIO = 1.10
PROTO = "DEPLOYBENCH "

# The driver runs in its own tree's interpreter path (cwd and PYTHONPATH = the tree), never from this
# file: this file puts /work/main first on sys.path, which would hand the baseline the new code.
DRIVER = r'''
import json, os, signal, sys, time, traceback
from pathlib import Path

proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies only; anything a library prints goes to the log
os.dup2(2, 1)
cfg = json.loads(sys.argv[1])

def reply(**kw):
    proto.write("DEPLOYBENCH " + json.dumps(kw) + "\n")
    proto.flush()

def on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)

import dataclasses
import resources
from resources.deployers.base import Release, Target
from resources.deployers.local import LocalProcessDeployer

fields = [f.name for f in dataclasses.fields(Release)]
new = cfg["side"] == "new"
kw = {"artifact_roots": cfg["artifact_roots"]} if new else {}
deployer = LocalProcessDeployer(Path(cfg["run_dir"]), host="127.0.0.1", port_base=cfg["port_base"],
                                inference_log_dir=Path(cfg["run_dir"]) / "inference", **kw)
target = Target("credit_risk", "bench", kind="endpoint")
if new:
    from resources.artifact_digest import folder_digest
reply(ready=True, resources=str(Path(resources.__file__).resolve().parent.parent), release_fields=fields,
      pid=os.getpid())
try:
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "stop":
            break
        v = cmd["version"]
        folder = cfg["dirs"][v]
        try:
            extra, verify_s = {}, None
            if new:
                t = time.perf_counter()
                extra["digest"] = folder_digest(folder)  # what fetch_verified does to the cached copy
                verify_s = time.perf_counter() - t
            release = Release(version=v, artifact=folder, config={"model_name": "credit_risk", "pii_columns": []},
                              **extra)
            t = time.perf_counter()
            st = deployer.deploy(target, release, timeout=cfg["timeout"])
            deploy_s = time.perf_counter() - t
            if st.serving_version != v or not st.healthy:
                raise RuntimeError(f"after deploy of {v}: serving {st.serving_version}, healthy {st.healthy}")
            reply(ok=True, version=v, deploy_s=deploy_s, verify_s=verify_s, address=st.address,
                  digest=getattr(st, "serving_digest", None))
        except Exception as err:
            reply(ok=False, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-3000:])
except KeyboardInterrupt:
    pass
finally:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        deployer.delete(target)
    finally:
        stopped = deployer.stop_all()
    try:
        reply(stopped=True, slots=stopped)
    except OSError:
        pass
'''

from redeploy_bench import table  # noqa: E402  (bench/ is the script's own folder)
from serve_bench import Cleanup, cmdline, loadavg, log  # noqa: E402


# ------------------------------------------------------------------------------------------------
# the two trees


def ensure_worktree(commit: str, path: Path) -> str:
    """A worktree of ``commit`` at ``path`` (made once, reused after); returns its full commit id."""
    want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", f"{commit}^{{commit}}"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if path.exists():
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode != 0 or head.stdout.strip() != want:
            found = head.stdout.strip() or head.stderr.strip()
            raise SystemExit(f"{path} exists but is not a worktree at {commit} ({found}); "
                             f"remove it (git -C {ROOT} worktree remove --force {path}) or pass --baseline-dir")
        log(f"baseline: reusing the worktree at {path} ({want[:7]})")
    else:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), want], check=True,
                       capture_output=True, text=True)
        log(f"baseline: made a worktree of {want[:7]} at {path}")
    return want


class Driver:
    """One tree's driver process: one deployer, one endpoint, one JSON line per command."""

    def __init__(self, side: str, tree: Path, cfg: dict[str, Any], logfile: Path):
        self.side, self.tree, self.logfile = side, tree, logfile
        env = dict(os.environ)
        env["PYTHONPATH"] = str(tree)  # its own code only
        self._log = open(logfile, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps({**cfg, "side": side})],
                                     cwd=str(tree), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, start_new_session=True)
        hello = self._read()
        if Path(hello["resources"]) != tree.resolve():
            raise RuntimeError(f"{side}: the driver imported resources from {hello['resources']}, not {tree}")
        self.release_fields = hello["release_fields"]

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.side} driver exited ({self.proc.poll()}); log tail:\n{self.tail()}")
            if line.startswith(PROTO):
                return json.loads(line[len(PROTO):])

    def tail(self, n: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def deploy(self, version: str) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"cmd": "deploy", "version": version}) + "\n")
        self.proc.stdin.flush()
        res = self._read()
        if not res.get("ok"):
            raise RuntimeError(f"{self.side}: deploy of version {version} failed: {res.get('error')}\n"
                               f"{res.get('trace', '')}\nlog tail:\n{self.tail()}")
        return res

    def stop(self, run_dir: Path) -> None:
        """Ask the driver to delete its endpoint and stop_all; then make sure, by pid, nothing is left."""
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
                    self.proc.stdin.close()
                except OSError:
                    pass
                try:
                    self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()  # its handler still deletes and stops
                    try:
                        self.proc.wait(30)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            self._log.close()
            kill_leftover_supervisors(run_dir)


def kill_leftover_supervisors(run_dir: Path) -> None:
    """Belt and braces: a supervisor runs in its own session (process group = its pid)."""
    for state in run_dir.glob("*/state.json"):
        try:
            pid = int(json.loads(state.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if "resources.serving.supervisor" in cmdline(pid) and str(state.parent) in cmdline(pid):
            log(f"cleanup: supervisor {pid} of {state.parent} still ran; killing its process group")
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------
# numbers


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[8] if len(xs) > 1 else xs[0]


def describe(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "p90": p90(xs), "mean": statistics.fmean(xs), "min": min(xs),
            "max": max(xs)}


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", "-n", type=int, default=15, help="measured rounds (one deploy per side each)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured redeploys per side after the cold deploy")
    ap.add_argument("--gap", type=float, default=2.0, help="seconds after each deploy (the old version's drain)")
    ap.add_argument("--rows", type=int, default=3000, help="training rows per model version")
    ap.add_argument("--timeout", type=float, default=120.0, help="deploy timeout, seconds")
    ap.add_argument("--baseline-commit", default="1aea06b")
    ap.add_argument("--baseline-dir", type=Path, default=Path("/tmp/onepath-baseline"),
                    help="the baseline's git worktree (made if missing, reused if present)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (driver and supervisor logs)")
    args = ap.parse_args(argv)

    cleanup = Cleanup()
    tmp = Path(tempfile.mkdtemp(prefix="onepath-deploy-bench-"))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    cleanup.push("temp dir", lambda: log(f"kept {tmp}") if args.keep else shutil.rmtree(tmp, ignore_errors=True))
    try:
        log(f"temp dir {tmp}; {os.cpu_count()} CPUs; load average {loadavg()}")
        base_commit = ensure_worktree(args.baseline_commit, args.baseline_dir)
        new_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.split("\n")
        dirty = [d[3:] for d in dirty if d.strip()]

        import warnings

        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from tests.conftest import _free_port_base, save_credit_model

        dirs = {}
        for version, seed in (("1", 1), ("2", 2)):
            t = time.perf_counter()
            dirs[version] = save_credit_model(tmp / "models" / f"credit_v{version}", rows=args.rows, seed=seed)
            n_files, n_bytes = folder_size(dirs[version])
            log(f"version {version}: trained (seed {seed}, {args.rows} rows) and saved in "
                f"{time.perf_counter() - t:.1f} s: {n_files} files, {n_bytes / 1024:.0f} KiB")

        port_base = _free_port_base(400)
        sides = {"baseline": (args.baseline_dir.resolve(), port_base), "new": (ROOT, port_base + 200)}
        drivers: dict[str, Driver] = {}
        for side, (tree, base) in sides.items():
            run_dir = tmp / f"run-{side}"
            cfg = {"run_dir": str(run_dir), "port_base": base, "artifact_roots": [str(tmp / "models")],
                   "dirs": {v: str(d) for v, d in dirs.items()}, "timeout": args.timeout}
            drv = Driver(side, tree, cfg, tmp / f"driver-{side}.log")
            cleanup.push(f"{side} endpoint", lambda drv=drv, run_dir=run_dir: drv.stop(run_dir))
            drivers[side] = drv
            log(f"{side}: driver {drv.proc.pid} imports from {tree}; Release fields {drv.release_fields}; "
                f"ports from {base}")
        if "digest" in drivers["baseline"].release_fields or "digest" not in drivers["new"].release_fields:
            raise RuntimeError("the baseline's Release has a digest field or the new one has none: wrong trees?")

        current = {}
        for side, drv in drivers.items():  # cold start, not measured
            res = drv.deploy("1")
            current[side] = "1"
            log(f"{side}: version 1 serves at {res['address']} (cold deploy {res['deploy_s']:.2f} s, not measured)")
            time.sleep(args.gap)

        def flip(v: str) -> str:
            return "2" if v == "1" else "1"

        for i in range(args.warmup):
            for side, drv in drivers.items():
                current[side] = flip(current[side])
                res = drv.deploy(current[side])
                log(f"{side}: warm-up redeploy {i + 1}/{args.warmup} to version {current[side]} "
                    f"({res['deploy_s']:.2f} s, not measured)")
                time.sleep(args.gap)

        rounds = []
        for i in range(args.rounds):
            order = ["baseline", "new"] if i % 2 == 0 else ["new", "baseline"]
            row: dict[str, Any] = {"round": i + 1, "order": "/".join(order)}
            for side in order:
                current[side] = flip(current[side])
                res = drivers[side].deploy(current[side])
                row[side] = res["deploy_s"]
                row["version"] = current[side]
                if side == "new":
                    row["verify"] = res["verify_s"]
                time.sleep(args.gap)
            row["new_incl"] = row["new"] + row["verify"]
            rounds.append(row)
            log(f"round {i + 1}/{args.rounds} ({row['order']}, to version {row['version']}): baseline "
                f"{row['baseline']:.3f} s, new {row['new']:.3f} s + verify {row['verify'] * 1000:.1f} ms")

        cols = {"baseline": [r["baseline"] for r in rounds], "new": [r["new"] for r in rounds],
                "verify": [r["verify"] for r in rounds], "new incl. verify": [r["new_incl"] for r in rounds]}
        stats = {k: describe(v) for k, v in cols.items()}
        ratio = stats["new incl. verify"]["median"] / stats["baseline"]["median"]
        ratio_deploy = stats["new"]["median"] / stats["baseline"]["median"]
        paired = statistics.median(r["new_incl"] / r["baseline"] for r in rounds)
        met = ratio <= TARGET_RATIO

        print()
        print(f"onepath deploy bench: {args.rounds} interleaved rounds of one redeploy per side (credit model, "
              f"skops, 1 worker, alternating versions 2/1), gap {args.gap:g} s; baseline {base_commit[:7]} "
              f"({args.baseline_dir}), new {new_commit[:7]} ({ROOT}"
              f"{', uncommitted changes in ' + ', '.join(dirty) if dirty else ''}); {os.cpu_count()} CPUs, "
              f"load average {loadavg()} at the end")
        print()
        print(table([("seconds", "baseline", "new", "verify", "new incl. verify")] + [
            (stat, *(f"{stats[c][stat]:.3f}" if c != "verify" else f"{stats[c][stat]:.4f}" for c in cols))
            for stat in ("median", "p90", "mean", "min", "max")]))
        print()
        print(table([("round", "order", "to", "baseline s", "new s", "verify ms", "new incl. verify s",
                      "new incl./baseline")] + [
            (str(r["round"]), r["order"], r["version"], f"{r['baseline']:.3f}", f"{r['new']:.3f}",
             f"{r['verify'] * 1000:.1f}", f"{r['new_incl']:.3f}", f"{r['new_incl'] / r['baseline']:.3f}")
            for r in rounds]))
        print()
        print(f"ratio of medians new/baseline: deploy only {ratio_deploy:.3f}, incl. verify {ratio:.3f} "
              f"(median of per-round ratios {paired:.3f})")
        print(f"RESULT: {'MET' if met else 'NOT MET'}: a redeploy with the digest check takes {ratio:.3f}x the "
              f"baseline's (median {stats['new incl. verify']['median']:.3f} s vs "
              f"{stats['baseline']['median']:.3f} s; target <= {TARGET_RATIO:.2f}x)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "rounds": rounds, "stats": stats, "ratio_median": ratio, "ratio_median_deploy_only": ratio_deploy,
                "ratio_paired_median": paired, "target_met": met,
                "meta": {"baseline_commit": base_commit, "new_commit": new_commit, "new_uncommitted": dirty,
                         "gap": args.gap, "rows": args.rows, "python": sys.version.split()[0],
                         "platform": platform.platform(), "cpus": os.cpu_count()}}, indent=2))
            log(f"wrote {args.json}")
        return 0 if met else 1
    except KeyboardInterrupt as err:
        log(f"interrupted ({str(err) or 'Ctrl-C'}); cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup.run()
        log(f"the baseline worktree stays at {args.baseline_dir} for the next run "
            f"(git -C {ROOT} worktree remove --force {args.baseline_dir})")


if __name__ == "__main__":
    sys.exit(main())
