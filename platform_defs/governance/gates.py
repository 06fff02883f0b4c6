"""The gate: every check a track requires, evaluated for one exact model version and environment.

The endpoint asset of an environment runs the gate before it deploys, so the gate holds in every
path (a full-graph run, or the prod asset materialized alone from the UI). Verdicts recompute what
they can instead of trusting tags: the snapshot's content hash, the held-out split, the fairness
numbers, the data-quality suite. Each verdict's metadata says why, with numbers.
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from platform_defs.policy import Policy, TrackPolicy
from platform_defs.specs import DatasetSpec, EndpointSpec, ModelSpec

TAG = "onepath."
LINEAGE_TAGS = ("dataset_key", "data_hash", "code_hash")
DESCRIPTIONS = {
    "data_quality": "The version's training snapshot passes its dataset's declared expectations (re-run).",
    "performance": "Held-out metrics meet the declared minimums.",
    "no_regression": "Not worse than the version prod serves by more than the policy's margin.",
    "fairness": "Demographic parity, equalized odds and disparate impact per protected attribute (fairlearn).",
    "explainability": "A permutation-importance report on held-out data, stored with the version.",
    "lineage": "Dataset key, data hash and code hash on the version match what the graph materialized.",
    "drift_ready": "A reference sample of real training rows, sized by policy, is stored with the version.",
    "rollback_path": "A previous approved version exists in this environment, or a signed first-release record.",
    "approval": "An independent, signed approval of this exact version for this environment.",
}
HOW_TO_LOG_LINEAGE = (
    "log the lineage tags on the MLflow model version: onepath.dataset_key (the dataset asset), "
    "onepath.data_hash (resources.data_store.dataframe_hash of the exact training frame, stored by "
    "materializing the dataset), onepath.code_hash (sha256 of the trainer's source file), plus "
    "onepath.split_seed and onepath.test_size; see README, 'Registering from a notebook'"
)


@dataclass
class Verdict:
    check: str
    passed: bool
    summary: str
    metadata: dict[str, Any] = field(default_factory=dict)
    markdown: dict[str, str] = field(default_factory=dict)


def model_checks(track: TrackPolicy, env: str) -> list[str]:
    """The checks that gate a model version into ``env``: approval and rollback path only where the
    policy asks for approval."""
    per_env = {"approval", "rollback_path"}
    return [c for c in track.checks if c not in per_env or env in track.approval_envs]


def app_checks(track: TrackPolicy, environments: list[str], env: str) -> list[str]:
    """The checks that gate an app release into ``env``: code review only where the policy asks for
    approval, integration tests only where an earlier environment exists to test against."""
    return [c for c in track.checks
            if not (c == "code_review" and env not in track.approval_envs)
            and not (c == "integration_tests" and env == environments[0])]


class ModelGate:
    """Evaluates a model version against its track's policy, for one endpoint environment."""

    def __init__(self, *, endpoint: EndpointSpec, model: ModelSpec, dataset: DatasetSpec, features: list[str],
                 label: str, policy: Policy, mlflow: Any, data_store: Any, ledger: Any, deployer: Any,
                 instance: Any = None):
        self.endpoint, self.model, self.dataset = endpoint, model, dataset
        self.features, self.label = features, label
        self.policy = policy
        self.track: TrackPolicy = policy.track(model.track)
        self.mlflow, self.data_store, self.ledger, self.deployer = mlflow, data_store, ledger, deployer
        self.instance = instance

    # -- which checks ---------------------------------------------------------------------
    def required(self, env: str) -> list[str]:
        return model_checks(self.track, env)

    def approvers(self, owner_team: str) -> list[str]:
        role = self.track.approver_role
        return sorted(n for n, i in self.policy.identities.items() if role in i.roles and i.team != owner_team)

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, version: str, env: str) -> list[Verdict]:
        ctx = _Version(self, str(version))
        out = []
        for check in self.required(env):
            try:
                out.append(getattr(self, f"_check_{check}")(ctx, env))
            except _Missing as err:
                out.append(Verdict(check, False, str(err)))
        return out

    def _check_data_quality(self, v: "_Version", env: str) -> Verdict:
        from resources.gx_validation import validate

        result = validate(v.snapshot, self.dataset)
        failed = result.failed
        return Verdict("data_quality", result.success,
                       f"{len(result.results) - len(failed)}/{len(result.results)} expectations passed on snapshot "
                       f"{v.tag('data_hash')[:12]}",
                       {"failed_expectations": len(failed)},
                       {"failures": "\n".join(f"- {f['expectation']} {f['column'] or ''}: {f['sample']}"
                                              for f in failed)} if failed else {})

    def _check_performance(self, v: "_Version", env: str) -> Verdict:
        rows = []
        for name, bound in self.model.metrics.items():
            metric = name[:-4] if name.endswith("_max") else name
            value = v.run.data.metrics.get(metric)
            if value is None:
                rows.append((name, None, bound, False))
            else:
                rows.append((name, value, bound, value <= bound if name.endswith("_max") else value >= bound))
        passed = all(ok for *_, ok in rows)
        text = ", ".join(f"{n} {'missing' if val is None else f'{val:.4f}'} {'≤' if n.endswith('_max') else '≥'} {b}"
                         for n, val, b, _ in rows) or "no thresholds declared"
        return Verdict("performance", passed, text,
                       {f"held_out_{k}": float(x) for k, x in v.run.data.metrics.items()})

    def _check_no_regression(self, v: "_Version", env: str) -> Verdict:
        metric, margin = self.track.regression_metric, self.track.regression_margin
        prod_env = self.endpoint.environments[-1]
        from resources.deployers.base import Target

        serving = self.deployer.status(Target(self.endpoint.name, prod_env, "endpoint",
                                              self.endpoint.ports.get(prod_env))).serving_version
        mine = v.run.data.metrics.get(metric)
        if mine is None:
            return Verdict("no_regression", False, f"version {v.version} has no '{metric}' metric logged")
        if serving is None or serving == v.version:
            return Verdict("no_regression", True, f"nothing else serves in {prod_env}; {metric} {mine:.4f}",
                           {metric: mine})
        theirs = self.mlflow.client().get_run(self.mlflow.get_version(self.model.name, serving).run_id) \
            .data.metrics.get(metric)
        if theirs is None:
            return Verdict("no_regression", True, f"{prod_env} version {serving} has no '{metric}' to compare",
                           {metric: mine})
        passed = mine >= theirs - margin
        return Verdict("no_regression", passed,
                       f"{metric} {mine:.4f} vs {theirs:.4f} served in {prod_env} (v{serving}); "
                       f"allowed drop {margin}", {metric: mine, f"{prod_env}_{metric}": theirs,
                                                  f"{prod_env}_version": serving, "margin": margin})

    def _check_fairness(self, v: "_Version", env: str) -> Verdict:
        from platform_defs.governance.fairness import apply_decision_threshold, evaluate_fairness

        fp = self.track.fairness
        protected = self.dataset.protected_columns
        if not protected:
            return Verdict("fairness", False, f"dataset '{self.dataset.name}' declares no protected attribute")
        X_test, y_test, test_rows = v.held_out
        proba = v.estimator.predict_proba(X_test)
        classes = list(v.estimator.classes_)
        unfavourable = [c for c in classes if c != self.model.favourable_label]
        p_unfav = proba[:, classes.index(unfavourable[0])]
        decisions = apply_decision_threshold(p_unfav, fp.decision_threshold)
        y_pred = [self.model.favourable_label if d == 0 else unfavourable[0] for d in decisions]
        res = evaluate_fairness(
            y_test.to_numpy(), y_pred, test_rows[protected].reset_index(drop=True),
            favourable_label=self.model.favourable_label,
            max_demographic_parity_difference=fp.max_demographic_parity_difference,
            max_equalized_odds_difference=fp.max_equalized_odds_difference,
            min_disparate_impact_ratio=fp.min_disparate_impact_ratio, min_group_size=fp.min_group_size)
        meta: dict[str, Any] = {"rows": res.n_rows, "decision_threshold": fp.decision_threshold}
        for name, a in res.attributes.items():
            for k, val in (("dpd", a.demographic_parity_difference), ("eod", a.equalized_odds_difference),
                           ("dir", a.disparate_impact_ratio)):
                if val is not None:
                    meta[f"{name}_{k}"] = float(val)
        return Verdict("fairness", res.passed, res.summary, meta, {"per_group": res.to_markdown()})

    def _check_explainability(self, v: "_Version", env: str) -> Verdict:
        import json

        from platform_defs.governance.explainability import JSON_NAME, PNG_NAME, explain

        with tempfile.TemporaryDirectory() as tmp:
            stored = self.mlflow.run_artifact(v.run.info.run_id, f"onepath/explainability/{JSON_NAME}", Path(tmp))
            png = self.mlflow.run_artifact(v.run.info.run_id, f"onepath/explainability/{PNG_NAME}", Path(tmp))
            if stored is None or png is None:
                X_test, y_test, _ = v.held_out
                res = explain(v.estimator, X_test, y_test, out_dir=Path(tmp) / "explainability")
                for path in (res.json_path, res.png_path):
                    self.mlflow.log_run_artifact(v.run.info.run_id, path, "onepath/explainability")
                report, png_bytes, computed = json.loads(res.json_path.read_text()), res.png_path.read_bytes(), True
            else:
                report, png_bytes, computed = json.loads(stored.read_text()), png.read_bytes(), False
        feats = report["features"]
        informative = [f for f in feats if f["importance_mean"] > 0]
        table = ["| rank | feature | mean drop | std |", "|---:|---|---:|---:|"] + [
            f"| {f['rank']} | {f['feature']} | {f['importance_mean']:.4f} | {f['importance_std']:.4f} |"
            for f in feats]
        chart = f"![permutation importance](data:image/png;base64,{base64.b64encode(png_bytes).decode()})"
        return Verdict(
            "explainability", bool(informative),
            f"top features: {', '.join(report['top_features'][:3]) or 'none'} "
            f"({report['scoring']} baseline {report['baseline_score']:.3f}, {report['n_rows_used']} held-out rows)",
            {"report": f"runs:/{v.run.info.run_id}/onepath/explainability/{JSON_NAME}",
             "computed_now": computed, "top_feature": report["top_features"][0] if report["top_features"] else "none"},
            {"importance": "\n".join(table), "chart": chart})

    def _check_lineage(self, v: "_Version", env: str) -> Verdict:
        import dagster as dg

        from resources.data_store import dataframe_hash

        missing = [t for t in LINEAGE_TAGS if not v.tags.get(TAG + t)]
        if missing:
            return Verdict("lineage", False, f"version {v.version} lacks {', '.join(TAG + m for m in missing)}: "
                                             f"{HOW_TO_LOG_LINEAGE}")
        problems = []
        if v.tag("dataset_key") != self.dataset.name:
            problems.append(f"dataset_key is '{v.tag('dataset_key')}', the model is declared on '{self.dataset.name}'")
        recomputed = dataframe_hash(v.snapshot)  # the snapshot, read and hashed again
        if recomputed != v.tag("data_hash"):
            problems.append(f"snapshot hashes to {recomputed[:12]}, tag says {v.tag('data_hash')[:12]}")
        if self.instance is not None:
            ds = [e for e in _materializations(self.instance, dg.AssetKey(self.dataset.name))
                  if e.get("data_hash") == v.tag("data_hash")]
            if not ds:
                problems.append(f"no materialization of '{self.dataset.name}' produced data hash "
                                f"{v.tag('data_hash')[:12]}")
            mats = [e for e in _materializations(self.instance, dg.AssetKey(self.model.name))
                    if str(e.get("model_version")) == v.version]
            if not mats:
                # registered outside the graph (a notebook): the code hash must be the declared trainer's
                current = _trainer_hash(self.model.trainer)
                if current != v.tag("code_hash"):
                    problems.append(f"version {v.version} was registered outside the graph and its code hash "
                                    f"{v.tag('code_hash')[:12]} is not the declared trainer's ({current[:12]}): "
                                    f"{HOW_TO_LOG_LINEAGE}")
            elif mats[0].get("code_hash") != v.tag("code_hash"):
                problems.append(f"code hash {v.tag('code_hash')[:12]} differs from the run's "
                                f"{str(mats[0].get('code_hash'))[:12]}")
        return Verdict("lineage", not problems,
                       "; ".join(problems) or f"dataset {self.dataset.name} @ {v.tag('data_hash')[:12]} (recomputed), "
                                               f"code {v.tag('code_hash')[:12]}",
                       {"data_hash": v.tag("data_hash"), "code_hash": v.tag("code_hash"),
                        "dataset_key": v.tag("dataset_key")})

    def _check_drift_ready(self, v: "_Version", env: str) -> Verdict:
        with tempfile.TemporaryDirectory() as tmp:
            path = self.mlflow.run_artifact(v.run.info.run_id, "onepath/reference_sample.parquet", Path(tmp))
            if path is None:
                return Verdict("drift_ready", False, f"version {v.version} has no reference sample: log "
                               f"{self.track.reference_rows} training rows as onepath/reference_sample.parquet")
            ref = pd.read_parquet(path)
        want = min(self.track.reference_rows, int(v.tags.get(TAG + "training_rows", self.track.reference_rows)))
        problems = []
        if len(ref) < want:
            problems.append(f"{len(ref)} rows, policy wants {want}")
        absent = [f for f in self.features if f not in ref.columns]
        if absent:
            problems.append(f"missing feature columns {', '.join(absent)}")
        pii = [c for c in self.dataset.pii_columns if c in ref.columns]
        if pii:
            problems.append(f"holds PII columns {', '.join(pii)}")
        return Verdict("drift_ready", not problems,
                       "; ".join(problems) or f"{len(ref)} reference rows × {len(ref.columns)} columns",
                       {"reference_rows": len(ref), "policy_rows": want})

    def _approvals(self, v: "_Version", env: str) -> tuple[list[Any], list[str]]:
        from resources.approvals import Approval, ApprovalError, verify

        valid, refused = [], []
        for entry in self.ledger.entries(kind="approval", subject=self.model.name, env=env):
            a = Approval.from_dict(entry.data)
            if a.version != v.version:
                continue
            try:
                verify(a, self.policy, asset=self.model.name, version=v.version, env=env,
                       owner_team=self.model.owner, author=v.author, role=self.track.approver_role)
                valid.append((entry, a))
            except ApprovalError as err:
                refused.append(f"#{entry.seq} by {a.approver}: {err}")
        return valid, refused

    def _check_approval(self, v: "_Version", env: str) -> Verdict:
        valid, refused = self._approvals(v, env)
        if valid:
            entry, a = valid[-1]
            return Verdict("approval", True, f"approved by {a.approver} at {a.approved_at}: {a.reason}",
                           {"approver": a.approver, "ledger_entry": entry.seq})
        who = ", ".join(self.approvers(self.model.owner)) or "nobody (no approver listed in the policy)"
        cmd = (f"onepath approve {self.model.name} --version {v.version} --env {env} --reason \"...\" --as <approver>")
        return Verdict("approval", False, f"waiting for approval by {who}: run {cmd}",
                       {"approvers": who, "command": cmd, "refused": len(refused)},
                       {"refused_approvals": "\n".join(f"- {r}" for r in refused)} if refused else {})

    def _check_rollback_path(self, v: "_Version", env: str) -> Verdict:
        previous = [e for e in self.ledger.entries(kind="deploy", subject=self.endpoint.name, env=env)
                    if str(e.data.get("version")) != v.version]
        if previous:
            p = previous[-1]
            return Verdict("rollback_path", True, f"version {p.data.get('version')} served {env} before "
                           f"(ledger #{p.seq}); rollback target exists", {"rollback_to": str(p.data.get("version"))})
        valid, _ = self._approvals(v, env)
        first = [a for e, a in valid if e.data.get("first_release")]
        if first:
            return Verdict("rollback_path", True, f"first release of {self.endpoint.name} in {env}, "
                           f"recorded and signed by {first[-1].approver}", {"first_release_by": first[-1].approver})
        return Verdict("rollback_path", False,
                       f"no previous version served {env} and no signed first-release record: run onepath approve "
                       f"{self.model.name} --version {v.version} --env {env} --first-release --reason \"...\"")


class _Missing(Exception):
    pass


class _Version:
    """The candidate version's MLflow records, snapshot, estimator and held-out split, loaded lazily."""

    def __init__(self, gate: ModelGate, version: str):
        self.gate, self.version = gate, version
        from mlflow.exceptions import MlflowException

        try:
            self.mv = gate.mlflow.get_version(gate.model.name, version)
        except MlflowException:
            raise ValueError(f"model '{gate.model.name}' has no version {version}") from None
        self.tags = dict(self.mv.tags or {})
        self.run = gate.mlflow.client().get_run(self.mv.run_id)

    def tag(self, name: str) -> str:
        value = self.tags.get(TAG + name)
        if not value:
            raise _Missing(f"version {self.version} lacks {TAG}{name}: {HOW_TO_LOG_LINEAGE}")
        return value

    @property
    def author(self) -> str | None:
        return self.tags.get(TAG + "author") or self.run.info.user_id

    @cached_property
    def snapshot(self) -> pd.DataFrame:
        try:
            return self.gate.data_store.read(self.gate.dataset.name, self.tag("data_hash"))
        except (FileNotFoundError, ValueError) as err:
            raise _Missing(str(err)) from None

    @cached_property
    def estimator(self) -> Any:
        import mlflow.sklearn

        return mlflow.sklearn.load_model(str(self.gate.mlflow.download(self.gate.model.name, self.version)))

    @cached_property
    def held_out(self) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
        """The same held-out rows the version was evaluated on: same snapshot, seed and test size."""
        from sklearn.model_selection import train_test_split

        df = self.snapshot
        seed = int(self.tags.get(TAG + "split_seed", self.gate.model.seed))
        size = float(self.tags.get(TAG + "test_size", self.gate.model.test_size))
        _, test = train_test_split(df, test_size=size, random_state=seed, stratify=df[self.gate.label])
        return test[self.gate.features], test[self.gate.label], test


def _trainer_hash(import_path: str) -> str:
    """The declared trainer's code hash, computed the way the model asset records it."""
    from platform_defs.factories import code_hash, import_string

    return code_hash(import_string(import_path))[0]


def _materializations(instance: Any, key: Any, limit: int = 200) -> list[dict[str, Any]]:
    records = instance.fetch_materializations(key, limit=limit).records
    out = []
    for r in records:
        mat = r.asset_materialization
        if mat is not None:
            out.append({k: v.value for k, v in mat.metadata.items()})
    return out


APP_DESCRIPTIONS = {
    "security_scan": "bandit and detect-secrets over the release's source; high-severity findings and any secret fail.",
    "code_review": "A signed review of this exact release by a listed reviewer who authored none of its changes.",
    "integration_tests": "The release's own integration tests, run against its deployment in the previous environment.",
}


class AppGate:
    """Evaluates an app release (a build folder) against the app track, for one environment."""

    def __init__(self, *, app: Any, policy: Policy, ledger: Any, deployer: Any, source_dir: Path,
                 repo_root: Path):
        self.app, self.policy, self.ledger, self.deployer = app, policy, ledger, deployer
        self.track = policy.track("app")
        self.source_dir, self.repo_root = source_dir, repo_root

    def required(self, env: str) -> list[str]:
        return app_checks(self.track, self.app.environments, env)

    def evaluate(self, version: str, build: Path, env: str) -> list[Verdict]:
        return [getattr(self, f"_check_{c}")(version, build, env) for c in self.required(env)]

    def _check_security_scan(self, version: str, build: Path, env: str) -> Verdict:
        from platform_defs.governance.security_scan import scan_source

        res = scan_source(build, fail_on=self.track.security_fail_on)
        rows = ["| tool | file | line | severity | rule | blocking |", "|---|---|---:|---|---|---|"] + [
            f"| {r['tool']} | {r['file']} | {r['line']} | {r['severity']} | {r['rule']} | {'yes' if r['blocking'] else ''} |"
            for r in res.records()]
        return Verdict("security_scan", res.passed, res.summary,
                       {"findings": len(res.findings), "blocking": len(res.blocking),
                        "files_scanned": len(res.files_scanned)},
                       {"findings_table": "\n".join(rows)} if res.findings else {})

    def authors(self) -> set[str]:
        """Commit author emails of every commit that touched the app's source."""
        import subprocess

        try:
            out = subprocess.run(["git", "log", "--format=%ae", "--", str(self.source_dir)], cwd=self.repo_root,
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return set()
        return {line.strip().lower() for line in out.stdout.splitlines() if line.strip()} if out.returncode == 0 else set()

    def _check_code_review(self, version: str, build: Path, env: str) -> Verdict:
        from resources.approvals import Approval, ApprovalError, verify

        authors = self.authors()
        valid, refused = [], []
        for entry in self.ledger.entries(kind="approval", subject=self.app.name, env=env):
            a = Approval.from_dict(entry.data)
            if a.version != version:
                continue
            try:
                verify(a, self.policy, asset=self.app.name, version=version, env=env, owner_team=self.app.owner,
                       author=None, role=self.track.approver_role, other_team=False, author_emails=authors)
                valid.append(a)
            except ApprovalError as err:
                refused.append(f"#{entry.seq} by {a.approver}: {err}")
        if valid:
            return Verdict("code_review", True, f"reviewed by {valid[-1].approver}: {valid[-1].reason}",
                           {"reviewer": valid[-1].approver, "authors": len(authors)})
        who = ", ".join(sorted(n for n, i in self.policy.identities.items() if self.track.approver_role in i.roles))
        cmd = f"onepath approve {self.app.name} --version {version} --env {env} --reason \"...\" --as <reviewer>"
        return Verdict("code_review", False, f"waiting for a code review by {who or 'nobody listed'}: run {cmd}",
                       {"command": cmd, "refused": len(refused)},
                       {"refused_reviews": "\n".join(f"- {r}" for r in refused)} if refused else {})

    def _check_integration_tests(self, version: str, build: Path, env: str) -> Verdict:
        import os
        import subprocess
        import sys

        from resources.deployers.base import Target

        i = self.app.environments.index(env)
        previous = self.app.environments[i - 1]
        st = self.deployer.status(Target(self.app.name, previous, "app", self.app.ports.get(previous)))
        if st.serving_version != version:
            return Verdict("integration_tests", False,
                           f"release {version} is not what {previous} serves ({st.serving_version or 'nothing'}): "
                           f"deploy it to {previous} first")
        suite = build / "integration_tests"
        if not suite.is_dir():
            return Verdict("integration_tests", False, f"release {version} ships no integration_tests/ folder")
        env_vars = {**os.environ, "ONEPATH_APP_URL": st.address or "", "ONEPATH_RELEASE_VERSION": version}
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                             cwd=build, env=env_vars, capture_output=True, text=True, timeout=600)
        tail = [line for line in out.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
        return Verdict("integration_tests", out.returncode == 0,
                       f"{tail[0]} against {previous} at {st.address}",
                       {"exit_code": out.returncode, "tested_env": previous},
                       {} if out.returncode == 0 else {"output": "```\n" + out.stdout[-3000:] + "\n```"})
