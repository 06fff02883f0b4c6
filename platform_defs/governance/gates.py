"""The gate: every check a track requires, evaluated for one exact model version and environment.

The endpoint asset of an environment runs the gate before it deploys, so the gate holds in every
path (a full-graph run, or the prod asset materialized alone from the UI). Verdicts recompute what
they can instead of trusting tags: the snapshot's content hash, the held-out split, the fairness
numbers, the data-quality suite. Each verdict's metadata says why, with numbers.

What a verdict relies on comes from the version's ``model_registered`` ledger entry
(``platform_defs.registration``), never from what a client of MLflow's or Dagster's unauthenticated
servers can write: lineage facts and the author from the entry (an MLflow tag that differs fails
lineage, naming it), the estimator from a copy that hashes to the registered digest, performance and
no_regression recomputed on the registered held-out rows (run metrics are never read), the reference
sample checked against its registered sha256, the explainability report against the digest the
ledger recorded when it was computed. A version without the entry fails.
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
# facts fixed in the version's model_registered ledger entry that an MLflow tag may repeat: a tag that
# differs from its entry was changed after registration
REGISTERED_TAGS = ("dataset_key", "data_hash", "code_hash", "code_path", "author", "split_seed", "test_size",
                   "training_rows", "test_data_hash")
DESCRIPTIONS = {
    "data_quality": "The version's training snapshot passes its dataset's declared expectations (re-run).",
    "performance": "Held-out metrics meet the declared minimums.",
    "no_regression": "Not worse than the version prod serves by more than the policy's margin.",
    "fairness": "Demographic parity, equalized odds and disparate impact per protected attribute (fairlearn).",
    "explainability": "A permutation-importance report on held-out data, stored with the version.",
    "lineage": "Dataset key, data hash and code hash recorded in the ledger at registration hold: the snapshot "
               "re-hashes to it and no MLflow tag has changed since.",
    "drift_ready": "A reference sample of real training rows, sized by policy, is stored with the version "
                   "and still hashes to what registration recorded.",
    "rollback_path": "A previous approved version exists in this environment, or a signed first-release record.",
    "approval": "An independent, signed approval of this exact version (its registered run id and digest) for this "
                "environment, signed after its registration, not revoked and not expired.",
}
from platform_defs.registration import HOW_TO_REGISTER  # noqa: E402

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
        # accepted for callers that still pass it; no verdict reads Dagster materialization metadata
        # (any GraphQL client can report a materialization): the model_registered entry replaced it
        self.instance = instance

    # -- which checks ---------------------------------------------------------------------
    def required(self, env: str) -> list[str]:
        return model_checks(self.track, env)

    def approvers(self, owner_team: str) -> list[str]:
        role = self.track.approver_role
        return sorted(n for n, i in self.policy.identities.items() if role in i.roles and i.team != owner_team)

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self, version: str, env: str) -> list[Verdict]:
        from platform_defs.governance.custom_checks import is_custom

        ctx = _Version(self, str(version))
        required = self.required(env)
        out: dict[str, Verdict] = {}
        for check in required:  # every built-in first: a custom check runs after them, on copies
            if not is_custom(check):
                try:
                    out[check] = getattr(self, f"_check_{check}")(ctx, env)
                except _Missing as err:
                    out[check] = Verdict(check, False, str(err))
        for check in required:  # named by the track in the signed policy; see governance.custom_checks
            if is_custom(check):
                out[check] = self._custom(check, ctx, env)
        return [out[c] for c in required]  # in the order the policy lists them

    def _custom(self, check: str, v: "_Version", env: str) -> Verdict:
        from platform_defs.governance.custom_checks import CheckContext, Copies, run_custom

        declared = self.policy.custom_checks.get(check)
        ctx = CheckContext(check=check, kind="model", subject=self.endpoint.name, version=v.version, env=env,
                           track=self.model.track, params=declared.params if declared else {}, spec=self.endpoint,
                           model=self.model, dataset=self.dataset, features=self.features, label=self.label,
                           _version=Copies(v))  # copies, never the gate's cached objects or the gate
        return run_custom(self.policy, check, ctx)

    def _check_data_quality(self, v: "_Version", env: str) -> Verdict:
        from resources.gx_validation import validate

        result = validate(v.snapshot, self.dataset)
        failed = result.failed
        return Verdict("data_quality", result.success,
                       f"{len(result.results) - len(failed)}/{len(result.results)} expectations passed on snapshot "
                       f"{v.fact('data_hash')[:12]}",
                       {"failed_expectations": len(failed)},
                       {"failures": "\n".join(f"- {f['expectation']} {f['column'] or ''}: {f['sample']}"
                                              for f in failed)} if failed else {})

    def _check_performance(self, v: "_Version", env: str) -> Verdict:
        metrics = v.held_out_metrics  # recomputed: the verified estimator on the registered held-out rows
        rows = []
        for name, bound in self.model.metrics.items():
            metric = name[:-4] if name.endswith("_max") else name
            value = metrics.get(metric)
            if value is None:
                rows.append((name, None, bound, False))
            else:
                rows.append((name, value, bound, value <= bound if name.endswith("_max") else value >= bound))
        passed = all(ok for *_, ok in rows)
        text = ", ".join(f"{n} {'missing' if val is None else f'{val:.4f}'} {'≤' if n.endswith('_max') else '≥'} {b}"
                         for n, val, b, _ in rows) or "no thresholds declared"
        return Verdict("performance", passed, f"{text} (recomputed on {len(v.held_out[1])} held-out rows)",
                       {f"held_out_{k}": float(x) for k, x in metrics.items()})

    def _check_no_regression(self, v: "_Version", env: str) -> Verdict:
        metric, margin = self.track.regression_metric, self.track.regression_margin
        prod_env = self.endpoint.environments[-1]
        from resources.deployers.base import Target

        serving = self.deployer.status(Target(self.endpoint.name, prod_env, "endpoint",
                                              self.endpoint.ports.get(prod_env))).serving_version
        mine = v.held_out_metrics.get(metric)
        if mine is None:
            return Verdict("no_regression", False, f"version {v.version} has no '{metric}' (recomputed)")
        if serving is None or serving == v.version:
            return Verdict("no_regression", True, f"nothing else serves in {prod_env}; {metric} {mine:.4f}",
                           {metric: mine})
        try:  # the served version's metric, recomputed the same way (never its client-writable run metrics)
            theirs = _Version(self, str(serving)).held_out_metrics.get(metric)
        except (_Missing, ValueError) as err:
            return Verdict("no_regression", False, f"{prod_env} serves version {serving}, whose {metric} cannot be "
                                                   f"recomputed to compare with: {err}", {metric: mine})
        if theirs is None:
            return Verdict("no_regression", True, f"{prod_env} version {serving} has no '{metric}' to compare",
                           {metric: mine})
        passed = mine >= theirs - margin
        return Verdict("no_regression", passed,
                       f"{metric} {mine:.4f} vs {theirs:.4f} served in {prod_env} (v{serving}), both recomputed; "
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
        from platform_defs.registration import explainability_record, record_explainability
        from resources.artifact_digest import bytes_digest

        run_id = v.run_id
        why = None
        with tempfile.TemporaryDirectory() as tmp:
            stored = self.mlflow.run_artifact(run_id, f"onepath/explainability/{JSON_NAME}", Path(tmp))
            png = self.mlflow.run_artifact(run_id, f"onepath/explainability/{PNG_NAME}", Path(tmp))
            record = explainability_record(self.ledger, self.model.name, v.version)
            if stored is not None and png is not None:
                if record is None:
                    why = "the stored report has no digest in the ledger"
                elif (bytes_digest(stored.read_bytes()) != record.data.get("report_digest")
                      or bytes_digest(png.read_bytes()) != record.data.get("chart_digest")):
                    why = f"the stored report does not match the digest recorded in ledger #{record.seq}"
            if stored is None or png is None or why:
                X_test, y_test, _ = v.held_out
                res = explain(v.estimator, X_test, y_test, out_dir=Path(tmp) / "explainability")
                for path in (res.json_path, res.png_path):
                    self.mlflow.log_run_artifact(run_id, path, "onepath/explainability")
                report_bytes, png_bytes, computed = res.json_path.read_bytes(), res.png_path.read_bytes(), True
                record_explainability(self.ledger, model=self.model.name, version=v.version,
                                      report_digest=bytes_digest(report_bytes), chart_digest=bytes_digest(png_bytes))
            else:
                report_bytes, png_bytes, computed = stored.read_bytes(), png.read_bytes(), False
            report = json.loads(report_bytes)
        feats = report["features"]
        informative = [f for f in feats if f["importance_mean"] > 0]
        table = ["| rank | feature | mean drop | std |", "|---:|---|---:|---:|"] + [
            f"| {f['rank']} | {f['feature']} | {f['importance_mean']:.4f} | {f['importance_std']:.4f} |"
            for f in feats]
        chart = f"![permutation importance](data:image/png;base64,{base64.b64encode(png_bytes).decode()})"
        return Verdict(
            "explainability", bool(informative),
            f"top features: {', '.join(report['top_features'][:3]) or 'none'} "
            f"({report['scoring']} baseline {report['baseline_score']:.3f}, {report['n_rows_used']} held-out rows)"
            + (f"; recomputed: {why}" if why else ""),
            {"report": f"runs:/{run_id}/onepath/explainability/{JSON_NAME}", "report_digest": bytes_digest(report_bytes),
             "computed_now": computed, "top_feature": report["top_features"][0] if report["top_features"] else "none"},
            {"importance": "\n".join(table), "chart": chart})

    def _check_lineage(self, v: "_Version", env: str) -> Verdict:
        from resources.data_store import dataframe_hash

        reg = v.registration
        if reg is None:
            return Verdict("lineage", False, f"version {v.version} of '{self.model.name}' has no model_registered "
                                             f"ledger entry, so nothing vouches for its lineage: {HOW_TO_REGISTER}")
        facts = reg.data
        missing = [t for t in LINEAGE_TAGS if not facts.get(t)]
        if missing:
            return Verdict("lineage", False, f"version {v.version} was registered (ledger #{reg.seq}) without "
                                             f"{', '.join(TAG + m for m in missing)}: {HOW_TO_LOG_LINEAGE}")
        problems = []
        for name in REGISTERED_TAGS:  # MLflow tags are client-writable: any change since registration fails
            if name == "author" and facts.get("via") != "graph":
                continue  # from outside onepath the tag is the client's claim; the author is the registration's signer
            tag, recorded = v.tags.get(TAG + name), facts.get(name)
            if recorded is None and tag is None:
                continue
            if tag is None:
                problems.append(f"MLflow tag {TAG}{name} was removed after registration (ledger #{reg.seq} "
                                f"recorded '{recorded}')")
            elif recorded is None or not _same(tag, recorded):
                problems.append(f"MLflow tag {TAG}{name} is '{tag}' but registration (ledger #{reg.seq}) recorded "
                                f"'{recorded}': the tag was changed after registration")
        if str(v.mv.run_id) != str(facts.get("run_id")):
            problems.append(f"the version's run is {v.mv.run_id}, registration recorded {facts.get('run_id')}")
        if facts["dataset_key"] != self.dataset.name:
            problems.append(f"dataset_key is '{facts['dataset_key']}', the model is declared on '{self.dataset.name}'")
        recomputed = dataframe_hash(v.snapshot)  # the snapshot, read and hashed again
        if recomputed != facts["data_hash"]:
            problems.append(f"snapshot hashes to {recomputed[:12]}, registration says {facts['data_hash'][:12]}")
        if facts.get("via") != "graph" and self.model.trainer:
            # registered outside the graph: the code hash must be the declared trainer's
            current = _trainer_hash(self.model.trainer)
            if current != facts["code_hash"]:
                problems.append(f"version {v.version} was registered outside the graph and its code hash "
                                f"{facts['code_hash'][:12]} is not the declared trainer's ({current[:12]}): "
                                f"{HOW_TO_LOG_LINEAGE}")
        elif facts.get("via") != "graph":  # no trainer (a notebook model): the code record it was registered with
            problems += self._code_record_problems(v, facts)
        return Verdict("lineage", not problems,
                       "; ".join(problems) or f"dataset {self.dataset.name} @ {facts['data_hash'][:12]} (recomputed), "
                                               f"code {facts['code_hash'][:12]}, registered in ledger #{reg.seq}",
                       {"data_hash": facts["data_hash"], "code_hash": facts["code_hash"],
                        "dataset_key": facts["dataset_key"], "registration_entry": reg.seq,
                        "digest": facts.get("digest")})

    def _code_record_problems(self, v: "_Version", facts: dict[str, Any]) -> list[str]:
        """A trainer-less version's code: known at registration, and its code record on the run (the notebook's
        cells, the script, or what an adopted version's run said of its source) still hashes to code_hash."""
        import hashlib

        from platform_defs.registration import CODE_RECORD

        if facts.get("code_known") is not True:  # fail closed: only a register that saw the code says it is known
            return [f"version {v.version} was registered without knowing its code ({facts.get('code_path')}): "
                    f"register it from the notebook or script that trained it (onepath.register), or log it "
                    f"with MLflow from a git checkout so its run records the commit"]
        if not facts.get("run_id"):
            return [f"version {v.version} was registered without an MLflow run, so it has no code record"]
        with tempfile.TemporaryDirectory() as tmp:
            path = self.mlflow.run_artifact(str(facts["run_id"]), CODE_RECORD, Path(tmp))
            found = hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None
        if found is None:
            return [f"version {v.version}'s code record {CODE_RECORD} is missing from its run {facts['run_id']}"]
        if found != facts["code_hash"]:
            return [f"version {v.version}'s code record hashes to {found[:12]}, registration (ledger "
                    f"#{v.registration.seq}) recorded {facts['code_hash'][:12]}: it was changed after registration"]
        return []

    def _check_drift_ready(self, v: "_Version", env: str) -> Verdict:
        import io

        from resources.artifact_digest import bytes_digest

        reg = v.require_registration()
        with tempfile.TemporaryDirectory() as tmp:
            path = self.mlflow.run_artifact(v.run_id, "onepath/reference_sample.parquet", Path(tmp))
            if path is None:
                return Verdict("drift_ready", False, f"version {v.version} has no reference sample: log "
                               f"{self.track.reference_rows} training rows as onepath/reference_sample.parquet")
            data = path.read_bytes()
        found, recorded = bytes_digest(data), reg.data.get("reference_digest")
        if found != recorded:
            return Verdict("drift_ready", False,
                           f"version {v.version}'s reference sample hashes to {found}, registration (ledger "
                           f"#{reg.seq}) recorded {recorded or 'none'}: it was replaced or added after registration",
                           {"reference_digest": found, "registered_reference_digest": recorded or "none"})
        ref = pd.read_parquet(io.BytesIO(data))  # the bytes just checked
        rows = reg.data.get("training_rows")
        want = min(self.track.reference_rows, int(rows) if rows is not None else self.track.reference_rows)
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

    def _standing(self, v: "_Version", env: str) -> Any:
        """The approvals of this version in ``env`` that stand (``approval_standing.standing``), judged
        against its registration (run id, digest, time) and its registered author, never a writable tag."""
        from platform_defs.governance.approval_standing import standing
        from platform_defs.registration import registered_author
        from resources.approvals import Registered

        reg = v.require_registration()
        author, _ = registered_author(reg)
        return standing(self.ledger, self.policy, asset=self.model.name, version=v.version, env=env,
                        owner_team=self.model.owner, author=author, role=self.track.approver_role,
                        registered=Registered.of_model(reg), valid_days=self.track.approval_valid_days)

    def _approvals(self, v: "_Version", env: str) -> tuple[list[Any], list[str]]:
        s = self._standing(v, env)
        return s.valid, s.not_counted()

    def _check_approval(self, v: "_Version", env: str) -> Verdict:
        from platform_defs.registration import registered_author, unknown_author_text

        cmd = (f"onepath approve {self.model.name} --version {v.version} --env {env} --reason \"...\" --as <approver>")
        who = ", ".join(self.approvers(self.model.owner)) or "nobody (no approver listed in the policy)"
        reg = v.require_registration()
        if not registered_author(reg)[1]:
            sign = f"onepath sign-version {self.model.name} --version {v.version} --as <you>"
            return Verdict("approval", False, unknown_author_text(self.model.name, v.version),
                           {"approvers": who, "command": sign, "registration_entry": reg.seq})
        s = self._standing(v, env)
        if s.valid:
            entry, a = s.valid[-1]
            return Verdict("approval", True, f"approved by {a.approver} at {a.approved_at}: {a.reason}",
                           {"approver": a.approver, "ledger_entry": entry.seq, "digest": a.digest,
                            "revoked": len(s.revoked), "expired": len(s.expired)})
        lapsed = s.lapsed()
        text = (("; ".join(lapsed) + ", so it no longer counts; ") if lapsed else "") + f"waiting for approval by {who}: run {cmd}"
        return Verdict("approval", False, text,
                       {"approvers": who, "command": cmd, "refused": len(s.refused), "revoked": len(s.revoked),
                        "expired": len(s.expired)},
                       {"refused_approvals": "\n".join(f"- {r}" for r in s.not_counted())} if s.not_counted() else {})

    def _check_rollback_path(self, v: "_Version", env: str) -> Verdict:
        previous = [e for e in self.ledger.entries(kind="deploy", subject=self.endpoint.name, env=env)
                    if str(e.data.get("version")) != v.version]
        if previous:
            p = previous[-1]
            return Verdict("rollback_path", True, f"version {p.data.get('version')} served {env} before "
                           f"(ledger #{p.seq}); rollback target exists", {"rollback_to": str(p.data.get("version"))})
        valid, _ = self._approvals(v, env)
        first = [a for _, a in valid if a.first_release]  # the signed flag of a verified approval only
        if first:
            return Verdict("rollback_path", True, f"first release of {self.endpoint.name} in {env}, "
                           f"recorded and signed by {first[-1].approver}", {"first_release_by": first[-1].approver})
        return Verdict("rollback_path", False,
                       f"no previous version served {env} and no signed first-release record: run onepath approve "
                       f"{self.model.name} --version {v.version} --env {env} --first-release --reason \"...\"")


class _Missing(Exception):
    pass


class _Version:
    """The candidate version: its ``model_registered`` ledger entry (the facts that count), its MLflow
    records (tags, only to compare with the entry), and its snapshot, verified estimator, held-out
    split and recomputed metrics, loaded lazily."""

    def __init__(self, gate: ModelGate, version: str):
        from platform_defs.registration import registration

        self.gate, self.version = gate, version
        from mlflow.exceptions import MlflowException

        try:
            self.mv = gate.mlflow.get_version(gate.model.name, version)
        except MlflowException:
            raise ValueError(f"model '{gate.model.name}' has no version {version}") from None
        self.tags = dict(self.mv.tags or {})
        self.registration = registration(gate.ledger, gate.model.name, version)

    def require_registration(self) -> Any:
        if self.registration is None:
            raise _Missing(f"version {self.version} of '{self.gate.model.name}' has no model_registered ledger "
                           f"entry (no digest or lineage recorded for it): {HOW_TO_REGISTER}")
        return self.registration

    @property
    def run_id(self) -> str:
        run_id = self.require_registration().data.get("run_id")
        if not run_id:
            raise _Missing(f"version {self.version} was registered without an MLflow run: its reports and "
                           f"reference sample have nowhere to live; log the model in a run")
        return str(run_id)

    def fact(self, name: str) -> Any:
        """A lineage fact as registration recorded it (never the MLflow tag)."""
        value = self.require_registration().data.get(name)
        if value in (None, ""):
            raise _Missing(f"version {self.version} was registered without {TAG}{name}: {HOW_TO_LOG_LINEAGE}")
        return value

    @cached_property
    def snapshot(self) -> pd.DataFrame:
        try:
            return self.gate.data_store.read(self.gate.dataset.name, self.fact("data_hash"))
        except (FileNotFoundError, ValueError) as err:
            raise _Missing(str(err)) from None

    @cached_property
    def estimator(self) -> Any:
        """Built from the bytes of a copy whose folder digest is the registered one."""
        from resources.artifact_digest import ArtifactError
        from resources.mlflow_registry import ArtifactMismatch
        from resources.serving.model_server import ArtifactRefused, NotSklearn, load_estimator, load_pyfunc

        name, digest = self.gate.model.name, self.fact("digest")
        try:
            path = self.gate.mlflow.fetch_verified(name, self.version, digest)
            try:
                return load_estimator(path, name, self.version, digest)
            except NotSklearn:  # another flavour: judged through pyfunc, from the same verified bytes
                return _PyfuncClassifier(load_pyfunc(path, name, self.version, digest),
                                         sorted(self.snapshot[self.gate.label].unique().tolist()))
        except (ArtifactMismatch, ArtifactRefused, ArtifactError) as err:
            raise _Missing(str(err)) from None

    @cached_property
    def held_out(self) -> tuple[pd.DataFrame, pd.Series, pd.DataFrame]:
        """The same held-out rows the version was evaluated on: same snapshot, seed and test size (as registered)."""
        from sklearn.model_selection import train_test_split

        reg = self.require_registration().data
        if reg.get("test_data_hash"):  # registered from a notebook: its held-out rows are the TEST snapshot
            try:
                test = self.gate.data_store.read(self.gate.dataset.name, reg["test_data_hash"])
            except (FileNotFoundError, ValueError) as err:
                raise _Missing(str(err)) from None
            return test[self.gate.features], test[self.gate.label], test
        df = self.snapshot
        seed = int(reg["split_seed"] if reg.get("split_seed") is not None else self.gate.model.seed)
        size = float(reg["test_size"] if reg.get("test_size") is not None else self.gate.model.test_size)
        _, test = train_test_split(df, test_size=size, random_state=seed, stratify=df[self.gate.label])
        return test[self.gate.features], test[self.gate.label], test

    @cached_property
    def held_out_metrics(self) -> dict[str, float]:
        from platform_defs.factories import evaluate_classifier

        X_test, y_test, _ = self.held_out
        return evaluate_classifier(self.estimator, X_test, y_test)


class _PyfuncClassifier:
    """A pyfunc model seen as a binary classifier (``predict`` / ``predict_proba`` / ``classes_``) from its
    ``prediction`` and ``probability`` output columns; one model call per frame (a model may count calls)."""

    def __init__(self, pyf: Any, classes: list[Any]):
        self.pyf, self.classes_ = pyf, classes
        self._last: tuple[Any, Any] | None = None

    def _out(self, X: Any) -> Any:
        if self._last is None or self._last[0] is not X:
            out = self.pyf.predict(X)
            self._last = (X, out if hasattr(out, "columns") else pd.DataFrame({"prediction": list(out)}))
        return self._last[1]

    def predict(self, X: Any) -> Any:
        return self._out(X)["prediction"].to_numpy()

    def predict_proba(self, X: Any) -> Any:
        import numpy as np

        out = self._out(X)
        if "probability" not in out.columns:
            raise _Missing("the model's output has no 'probability' column to score it on")
        p = out["probability"].to_numpy(dtype=float)
        return np.column_stack([1 - p, p])


def _same(tag: str, recorded: Any) -> bool:
    """An MLflow tag (always a string) against the fact registration recorded (str, int or float)."""
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)):
        return tag == str(recorded)
    try:
        return float(tag) == float(recorded)
    except ValueError:
        return False


def _trainer_hash(import_path: str) -> str:
    """The declared trainer's code hash, computed the way the model asset records it."""
    from platform_defs.factories import code_hash, import_string

    return code_hash(import_string(import_path))[0]


APP_DESCRIPTIONS = {
    "security_scan": "bandit and detect-secrets over the release's source; high-severity findings and any secret fail.",
    "code_review": "A signed review of this exact release (its recorded content hash) by a listed reviewer who "
                   "authored none of its changes, not revoked and not expired.",
    "integration_tests": "The release's own integration tests, run against its deployment in the previous environment.",
}


class AuthorsUnknown(RuntimeError):
    """git could not list an app release's commit authors; one line says why."""


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
        from platform_defs.governance.custom_checks import is_custom

        required = self.required(env)
        out = {c: getattr(self, f"_check_{c}")(version, build, env) for c in required if not is_custom(c)}
        for c in required:  # after every built-in; named by the app track in the signed policy
            if is_custom(c):
                out[c] = self._custom(c, str(version), Path(build), env)
        return [out[c] for c in required]  # in the order the policy lists them

    def _custom(self, check: str, version: str, build: Path, env: str) -> Verdict:
        """Custom check ``check`` on a copy of the release (a temporary folder it may write, removed after),
        like a model check on copies: what it writes never reaches the release the built-ins scanned and that
        serves. A check that outlives its time limit may still write there; nothing reads it."""
        import shutil

        from platform_defs.governance.custom_checks import CheckContext, run_custom

        declared = self.policy.custom_checks.get(check)
        with tempfile.TemporaryDirectory(prefix=f"onepath-check-{check}-", ignore_cleanup_errors=True) as tmp:
            copy = Path(tmp) / build.name
            shutil.copytree(build, copy, symlinks=True)  # links stay links: nothing outside the release is copied
            return run_custom(self.policy, check, CheckContext(
                check=check, kind="app", subject=self.app.name, version=version, env=env, track="app",
                params=declared.params if declared else {}, spec=self.app, build=copy))

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
        """Commit author emails of every commit that touched the app's source. Raises :class:`AuthorsUnknown`
        when git cannot say (not a checkout, git missing, failing or too slow): no list is not an empty list,
        and a review judged against an empty one would count whoever wrote the changes."""
        import subprocess

        try:
            out = subprocess.run(["git", "log", "--format=%ae", "--", str(self.source_dir)], cwd=self.repo_root,
                                 capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise AuthorsUnknown(f"git log timed out after 30s in {self.repo_root}") from None
        except OSError as err:
            raise AuthorsUnknown(f"git could not run in {self.repo_root}: {err}") from None
        if out.returncode != 0:
            why = next((line.strip() for line in out.stderr.splitlines() if line.strip()), "no message")
            raise AuthorsUnknown(f"git log exited {out.returncode} in {self.repo_root}: {why}")
        return {line.strip().lower() for line in out.stdout.splitlines() if line.strip()}

    def release_registration(self, version: str) -> Any | None:
        """The ``release_built`` entry of ``version`` (the first): its content hash is what a review binds."""
        return next((e for e in self.ledger.entries(kind="release_built", subject=self.app.name)
                     if str(e.data.get("version")) == str(version)), None)

    def review_standing(self, version: str, env: str) -> Any:
        from platform_defs.governance.approval_standing import standing
        from resources.approvals import Registered

        built = self.release_registration(version)
        if built is None:
            return None
        return standing(self.ledger, self.policy, asset=self.app.name, version=version, env=env,
                        owner_team=self.app.owner, author=None, role=self.track.approver_role,
                        registered=Registered.of_release(built), valid_days=self.track.approval_valid_days,
                        other_team=False, author_emails=self.authors())

    def _check_code_review(self, version: str, build: Path, env: str) -> Verdict:
        try:
            s = self.review_standing(version, env)
        except AuthorsUnknown as err:
            return Verdict("code_review", False, f"git could not list the commit authors of release {version} of "
                                                 f"{self.app.name}, so no reviewer can be shown independent of them: "
                                                 f"{err}", {"authors": "unknown"})
        if s is None:
            return Verdict("code_review", False, f"release {version} of {self.app.name} has no release_built ledger "
                                                 f"entry, so no content hash a review could bind: build it through "
                                                 f"the graph (materialize the {self.app.name} asset)")
        if s.valid:
            entry, a = s.valid[-1]
            return Verdict("code_review", True, f"reviewed by {a.approver}: {a.reason}",
                           {"reviewer": a.approver, "ledger_entry": entry.seq, "digest": a.digest,
                            "revoked": len(s.revoked), "expired": len(s.expired)})
        who = ", ".join(sorted(n for n, i in self.policy.identities.items() if self.track.approver_role in i.roles))
        cmd = f"onepath approve {self.app.name} --version {version} --env {env} --reason \"...\" --as <reviewer>"
        lapsed = s.lapsed()
        text = ((("; ".join(lapsed) + ", so it no longer counts; ") if lapsed else "")
                + f"waiting for a code review by {who or 'nobody listed'}: run {cmd}")
        return Verdict("code_review", False, text,
                       {"command": cmd, "refused": len(s.refused), "revoked": len(s.revoked), "expired": len(s.expired)},
                       {"refused_reviews": "\n".join(f"- {r}" for r in s.not_counted())} if s.not_counted() else {})

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
