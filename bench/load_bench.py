"""Code-location load benchmark: onepath's ``defs`` for N generated model lines against a bare Dagster
graph of the same shape and checks, both built in one run.

    .venv/bin/python bench/load_bench.py [--lines 50 500] [--repeat 1] [--profile N] [--json out.json]

For each N, inside a fresh temporary directory (removed at the end):

1. onepath: a declarations folder with one ``defs.yaml`` holding N lines, each the retention example's
   shape (dataset -> model -> endpoint with staging and prod), the example policy, and a fresh
   ONEPATH_HOME;
2. bare: a Python module with the same asset keys and dependencies (dataset -> model -> <line>_staging ->
   <line>_prod) and, on each asset, as many ``@dg.asset_check``s with the same names as onepath attaches to
   that asset (counted from the onepath load of step 1, so "same checks" is measured, not assumed);
3. each is loaded in a FRESH Python process the way a code server or run worker loads it: import the
   module (time to ``Definitions``), then ``defs.get_repository_def()`` (a resolved repository: every
   asset, check, job and sensor); both times are printed, with the ratio onepath / bare.

``--profile N`` runs the onepath load of N lines once under cProfile and prints the 25 most expensive
functions by cumulative time (what it spends beyond the bare graph).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LINE = """\
---
type: onepath.Dataset
attributes:
  name: {p}_activity
  owner: retention
  generator: assets.retention.data:generate_customer_activity
  params: {{rows: 4000, as_of: "2026-06-30"}}
  feedback: {{endpoint: {p}_scoring, env: prod}}
  columns:
    - {{name: customer_id, dtype: string, role: id}}
    - {{name: tenure_months, dtype: float, min: 0, max: 600}}
    - {{name: plan, dtype: string, values: [basic, plus, premium]}}
    - {{name: monthly_fee, dtype: float, min: 0}}
    - {{name: logins_30d, dtype: int, min: 0}}
    - {{name: avg_balance, dtype: float, min: 0}}
    - {{name: complaints_90d, dtype: int, min: 0}}
    - {{name: primary_channel, dtype: string, values: [app, web, branch, phone]}}
    - {{name: churned, dtype: int, role: label, values: [0, 1]}}
---
type: onepath.Model
attributes:
  name: {p}
  owner: retention
  track: ml-standard
  dataset: {p}_activity
  trainer: assets.retention.trainer:train_churn
  metrics: {{roc_auc: 0.65}}
---
type: onepath.Endpoint
attributes:
  name: {p}_scoring
  owner: retention
  track: ml-standard
  model: {p}
  pass_through: [customer_id]
"""

# run in a fresh process: the time to Definitions (import), then to a resolved repository
LOADER = """
import importlib, json, sys, time
t0 = time.perf_counter()
mod = importlib.import_module(sys.argv[1])
t1 = time.perf_counter()
repo = mod.defs.get_repository_def()
t2 = time.perf_counter()
checks = {}
for spec in repo.asset_graph.asset_check_keys:
    checks.setdefault("/".join(spec.asset_key.path), []).append(spec.name)
print(json.dumps({"definitions_s": t1 - t0, "repository_s": t2 - t0, "assets": len(repo.asset_graph.get_all_asset_keys()),
                  "checks": checks, "sensors": len(repo.sensor_defs)}))
"""


def write_onepath(work: Path, n: int) -> dict[str, str]:
    decl = work / "declarations" / "bench"
    decl.mkdir(parents=True)
    (decl / "defs.yaml").write_text("".join(LINE.format(p=f"line{i:04d}") for i in range(n)))  # components
    home = work / "home"
    return {"ONEPATH_DECLARATIONS_DIR": str(work / "declarations"), "ONEPATH_HOME": str(home),
            "DAGSTER_HOME": str(home / "dagster_home"), "ONEPATH_POLICY_FILE": str(ROOT / "assets" / "policy.yaml"),
            "GX_ANALYTICS_ENABLED": "false"}


def write_bare(work: Path, n: int, checks: dict[str, list[str]]) -> None:
    """Same asset keys, same deps, same check names per asset, as plain Dagster."""
    def names(key: str) -> list[str]:
        return checks.get(key, [])

    template = {"activity": names("line0000_activity"), "model": names("line0000"),
                "staging": names("line0000_scoring_staging"), "prod": names("line0000_scoring_prod")}
    src = textwrap.dedent(f"""\
        import dagster as dg

        CHECKS = {json.dumps(template)}
        N = {n}

        def line(p):
            keys = {{"activity": f"{{p}}_activity", "model": p, "staging": f"{{p}}_scoring_staging",
                    "prod": f"{{p}}_scoring_prod"}}
            deps = {{"activity": [], "model": ["activity"], "staging": ["model"], "prod": ["staging"]}}
            assets, checks = [], []
            for role, key in keys.items():
                @dg.asset(name=key, deps=[keys[d] for d in deps[role]], group_name=p,
                          description=f"{{role}} of {{p}}")
                def _a(context):
                    return None
                assets.append(_a)
                for c in CHECKS[role]:
                    @dg.asset_check(name=c, asset=key, blocking=True)
                    def _c():
                        return dg.AssetCheckResult(passed=True)
                    checks.append(_c)
            return assets, checks

        assets, checks = [], []
        for i in range(N):
            a, c = line(f"line{{i:04d}}")
            assets += a
            checks += c
        defs = dg.Definitions(assets=assets, asset_checks=checks)
        """)
    (work / "bare_defs.py").write_text(src)


def load(module: str, env: dict[str, str], cwd: Path, pythonpath: str) -> dict:
    full = {**os.environ, **env, "PYTHONPATH": pythonpath}
    out = subprocess.run([sys.executable, "-c", LOADER, module], env=full, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loading {module} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(n: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="onepath-load-prof-"))
    try:
        env = {**os.environ, **write_onepath(work, n), "PYTHONPATH": str(ROOT)}
        code = ("import cProfile, pstats; cProfile.run('import platform_defs.definitions as d; "
                "d.defs.get_repository_def()', 'prof.out'); pstats.Stats('prof.out').sort_stats('cumulative')"
                ".print_stats(40)")
        subprocess.run([sys.executable, "-c", code], env=env, cwd=work, check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--profile", type=int)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.profile:
        profile(args.profile)
        return 0
    results = []
    for n in args.lines:
        work = Path(tempfile.mkdtemp(prefix="onepath-load-"))
        try:
            env = write_onepath(work, n)
            one = [load("platform_defs.definitions", env, work, str(ROOT)) for _ in range(args.repeat)]
            write_bare(work, n, one[0]["checks"])
            bare = [load("bare_defs", {"GX_ANALYTICS_ENABLED": "false"}, work, str(work)) for _ in range(args.repeat)]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        o = min(r["repository_s"] for r in one)
        b = min(r["repository_s"] for r in bare)
        nchecks = sum(len(v) for v in one[0]["checks"].values())
        row = {"lines": n, "onepath_definitions_s": round(min(r["definitions_s"] for r in one), 2),
               "onepath_repository_s": round(o, 2),
               "bare_definitions_s": round(min(r["definitions_s"] for r in bare), 2), "bare_repository_s": round(b, 2),
               "ratio": round(o / b, 2), "assets": one[0]["assets"], "checks": nchecks,
               "bare_assets": bare[0]["assets"], "sensors": one[0]["sensors"]}
        results.append(row)
        print(f"{n:4d} lines: onepath {o:6.2f} s (Definitions {row['onepath_definitions_s']:.2f} s)  "
              f"bare {b:6.2f} s (Definitions {row['bare_definitions_s']:.2f} s)  ratio {row['ratio']:.2f}x  "
              f"[{row['assets']} assets, {nchecks} checks, {row['sensors']} sensors; bare {row['bare_assets']} assets]"
              f"  {'PASS' if row['ratio'] <= 1.3 else 'MISS'} (target 1.3x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
