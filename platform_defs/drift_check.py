"""The input-drift check of every monitored endpoint environment.

``input_drift`` (non-blocking, on ``<endpoint>_<env>``) compares the inputs logged by the version that
serves there now -- rows of earlier versions are excluded -- over the window the endpoint declares
(rows or hours; the track's policy fills what it leaves out) with the reference sample stored with
that version in MLflow (``onepath/reference_sample.parquet``), using Evidently 0.7 with the method
and threshold per column type set explicitly by spec or policy. The HTML report is kept under
``<drift_reports_dir>/<endpoint>/<env>/`` (retention from policy) and linked from the metadata; with
``ONEPATH_DRIFT_REPORTS_URL`` it is rendered to a private temporary file and uploaded to
``<prefix>/drift_reports/<endpoint>/<env>/<YYYYmmddTHHMMSSZ>-v<version>.html`` (``text/html``), and
retention prunes there by the time in the key (S3's ``LastModified`` says when an object was written,
which a copy or a restore changes).

On drift it appends a ``drift_detected`` ledger entry; the ``drift`` sensor turns that into one
retraining run (and holds off for the policy's cooldown). The heavy statistics run here, in a run,
never in a sensor tick.
"""


import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from resources.serving.model_server import FLOAT32_MAX  # what the server accepts: tree models compute in float32

import dagster as dg

from platform_defs.policy import DriftPolicy, Policy, effective_drift
from platform_defs.specs import EndpointSpec, ModelSpec, Organisation, endpoint_asset_name
from resources import object_store
from resources.deployers.base import Target, serving_version
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource
from resources.mlflow_registry import MlflowRegistry
from resources.monitoring import MonitoringResource

CHECK_NAME = "input_drift"
REFERENCE_ARTIFACT = "onepath/reference_sample.parquet"


@dataclass(frozen=True)
class Monitored:
    endpoint: EndpointSpec
    model: ModelSpec
    env: str
    drift: DriftPolicy
    features: list[str]

    @property
    def asset_key(self) -> dg.AssetKey:
        return dg.AssetKey(endpoint_asset_name(self.endpoint.name, self.env))

    @property
    def check_key(self) -> dg.AssetCheckKey:
        return dg.AssetCheckKey(self.asset_key, CHECK_NAME)

    @property
    def target(self) -> Target:
        return Target(self.endpoint.name, self.env, "endpoint", self.endpoint.ports.get(self.env))

    @property
    def label(self) -> str:
        return f"{self.endpoint.name}.{self.env}"


def monitored(org: Organisation, policy: Policy) -> list[Monitored]:
    """Every endpoint environment its drift policy watches."""
    out = []
    for ep in org.of_kind("endpoint"):
        assert isinstance(ep, EndpointSpec)
        drift = effective_drift(ep, policy, org.sources.get(ep.name))
        model = org.by_name[ep.model]
        assert isinstance(model, ModelSpec)
        features, _ = org.model_features(model)
        for env in ep.environments:
            if env in drift.environments and ep.inference_log:
                out.append(Monitored(ep, model, env, drift, features))
    return out


_REPORT_RE = re.compile(r"^(\d{8}T\d{6}Z)-v[^/]*\.html$")


def prune_reports(directory: Path | str, keep_last: int, max_age_days: float,
                  now: float | None = None) -> list[Path | str]:
    """Delete reports beyond the newest ``keep_last`` or older than ``max_age_days``; returns the deleted. A folder's
    reports are aged by their files' times; an S3 location's (``s3://...``) by the time their key starts with
    (``<YYYYmmddTHHMMSSZ>-v<version>...html``: objects not named so were not written here and are left alone)."""
    now = time.time() if now is None else now
    if isinstance(directory, str):
        return _prune_s3(directory, keep_last, max_age_days, now)
    reports = sorted(directory.glob("*.html"), key=lambda p: p.stat().st_mtime, reverse=True)
    gone = []
    for i, p in enumerate(reports):
        if i >= keep_last or now - p.stat().st_mtime > max_age_days * 86400:
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _prune_s3(location: str, keep_last: int, max_age_days: float, now: float) -> list[Path | str]:
    reports = []
    for o in object_store.list_objects(location):
        m = _REPORT_RE.match(o.uri.rsplit("/", 1)[-1])
        if m and o.uri.rsplit("/", 1)[0] == location.rstrip("/"):
            written = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
            reports.append((written, o.uri))
    reports.sort(reverse=True)
    gone: list[Path | str] = []
    for i, (written, uri) in enumerate(reports):
        if i >= keep_last or now - written > max_age_days * 86400:
            object_store.delete(uri)
            gone.append(uri)
    return gone




def within_model_range(frame: Any, columns: list[str]) -> tuple[Any, int]:
    """Drift statistics cannot bin a column spanning more than a model input may (Evidently fails on
    +-1e308): ``frame`` without the rows whose numeric inputs are infinite or beyond +-FLOAT32_MAX (a log written
    before the server refused them), and how many rows that took out."""
    import numpy as np

    keep = np.ones(len(frame), dtype=bool)
    for c in columns:
        col = frame[c]
        if col.dtype.kind == "f":
            values = col.to_numpy()
            keep &= np.isnan(values) | (np.abs(values) <= FLOAT32_MAX)
    dropped = int((~keep).sum())
    return (frame[keep].reset_index(drop=True) if dropped else frame), dropped


def evaluate(m: Monitored, *, mlflow: MlflowRegistry, deployer: Any, monitoring: MonitoringResource,
             ledger: Any, actor: str, trigger: str = "manual run", now: datetime | None = None) -> dg.AssetCheckResult:
    """Run the drift comparison for one endpoint environment and record it (report, ledger)."""
    import pandas as pd

    from platform_defs.governance.drift import evaluate_drift
    from resources.inference_log import read_window

    now = now or datetime.now(timezone.utc)
    version = serving_version(deployer.status(m.target))
    if version is None:
        return dg.AssetCheckResult(check_name=CHECK_NAME, passed=True, severity=dg.AssetCheckSeverity.WARN,
                                   metadata={"verdict": "no verdict: nothing serves here"})
    window = read_window(monitoring.log_dir(m.endpoint.name, m.env), version=version, columns=m.features,
                         window_rows=m.drift.window_rows, window_hours=m.drift.window_hours, now=now)
    current, out_of_range = within_model_range(window.frame, m.features)
    common = {
        "model_version": version,
        "window": (f"newest {m.drift.window_rows} rows" if m.drift.window_rows
                   else f"last {m.drift.window_hours:g} hours"),
        "window_rows": len(current),
        "excluded_other_version_rows": window.other_version_rows,
        "excluded_out_of_range_rows": out_of_range,
        "corrupt_log_lines": window.corrupt_lines,
    }
    if len(current) < m.drift.min_rows:
        return dg.AssetCheckResult(
            check_name=CHECK_NAME, passed=True, severity=dg.AssetCheckSeverity.WARN,
            metadata={**common, "verdict": f"no verdict: {len(current)} rows logged by version {version} in the "
                                           f"window, the policy needs {m.drift.min_rows}"})
    mv = mlflow.get_version(m.model.name, version)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = mlflow.run_artifact(mv.run_id, REFERENCE_ARTIFACT, Path(tmp))
        if ref_path is None:
            return dg.AssetCheckResult(
                check_name=CHECK_NAME, passed=False, severity=dg.AssetCheckSeverity.WARN,
                metadata={**common, "verdict": f"version {version} has no {REFERENCE_ARTIFACT} in its MLflow run: "
                                               f"drift cannot be judged"})
        reference = pd.read_parquet(ref_path)
    reports = monitoring.reports_dir(m.endpoint.name, m.env)
    name = f"{now:%Y%m%dT%H%M%SZ}-v{version}.html"
    with tempfile.TemporaryDirectory() as tmp:  # on S3 the report is rendered here (0700), then uploaded
        t0 = time.perf_counter()
        result = evaluate_drift(
            reference, current, columns=m.features,
            numeric_method=m.drift.numeric_method, numeric_threshold=m.drift.numeric_threshold,
            categorical_method=m.drift.categorical_method, categorical_threshold=m.drift.categorical_threshold,
            drift_share=m.drift.drift_share,
            report_html=Path(tmp) / name if isinstance(reports, str) else reports / name,
        )
        seconds = round(time.perf_counter() - t0, 3)
        saved = result.report_html  # the name the report was written under (a sampled report says so in it)
        assert saved is not None
        report_problem = None  # a report the store would not take: the verdict stands and is recorded without it
        if isinstance(reports, str):
            report = object_store.join(reports, saved.name)
            try:
                object_store.put_bytes(report, saved.read_bytes(), content_type="text/html")
            except object_store.ObjectStoreError as err:
                report_problem = f"report not stored: {err}"
        else:
            report = str(saved)
    per_column = {c.column: {"method": c.method, "threshold": c.threshold, "value": round(c.value, 6),
                             "value_kind": c.value_kind, "drifted": c.drifted} for c in result.columns}
    metadata = {
        **common,
        "verdict": result.summary,
        "drifted_share": round(result.drifted_share, 4),
        "drifted_columns": ", ".join(result.drifted_columns) or "none",
        "drift_share_threshold": result.drift_share,
        "methods": dg.MetadataValue.json({k: {"method": mt, "threshold": th}
                                          for k, (mt, th) in result.method_by_type.items()}),
        "columns": dg.MetadataValue.md(result.to_markdown()),
        "per_column": dg.MetadataValue.json(per_column),
        "reference_rows": result.reference_rows,
        "report": report_problem or (dg.MetadataValue.url(report) if isinstance(reports, str)
                                     else dg.MetadataValue.path(report)),
        "evaluation_seconds": seconds,
    }
    no_trainer = None
    if result.dataset_drift and not getattr(m.model, "trainer", ""):
        # a notebook model: nothing here can retrain it; its owner registers a new version
        no_trainer = (f"model '{m.model.name}' has no trainer (registered from a notebook): drift cannot retrain "
                      f"it; team '{m.model.owner}', please train on fresh data and run onepath.register(...) again "
                      f"for a new version")
        metadata["action"] = no_trainer
    if result.dataset_drift:
        from platform_defs.promotion import client_claims

        entry = ledger.append("drift_detected", m.endpoint.name, {
            **({"no_trainer": True, "action": no_trainer, "ask": m.model.owner} if no_trainer else {}),
            "model": m.model.name, "version": version, "drifted_share": result.drifted_share,
            "drifted_columns": result.drifted_columns, "window_rows": window.rows,
            "report": None if report_problem else report, **({"report_error": report_problem} if report_problem else {}),
            "methods": {k: [mt, th] for k, (mt, th) in result.method_by_type.items()},
            "claims": client_claims(trigger),  # what the run's tags say started it: a claim, not a fact
        }, actor, env=m.env)
        metadata["ledger_entry"] = entry.seq
    try:  # after the verdict is recorded: a store that refuses deletes (no s3:DeleteObject, object lock) costs none
        metadata["reports_pruned"] = len(prune_reports(reports, m.drift.report_keep_last, m.drift.report_max_age_days))
    except (OSError, object_store.ObjectStoreError) as err:
        metadata["reports_pruned"] = f"old reports not pruned: {(str(err).splitlines() or [type(err).__name__])[0]}"
    return dg.AssetCheckResult(check_name=CHECK_NAME, passed=not result.dataset_drift,
                               severity=dg.AssetCheckSeverity.WARN, metadata=metadata,
                               **({"description": no_trainer} if no_trainer else {}))


def build_drift_checks(org: Organisation, policy: Policy) -> list[dg.AssetChecksDefinition]:
    return [_check(m) for m in monitored(org, policy)]


def _check(m: Monitored) -> dg.AssetChecksDefinition:
    how = (f"{m.drift.numeric_method}@{m.drift.numeric_threshold:g} for numeric, "
           f"{m.drift.categorical_method}@{m.drift.categorical_threshold:g} for categorical columns; drift when "
           f"at least {m.drift.drift_share:g} of the columns drifted")

    @dg.asset_check(
        asset=m.asset_key, name=CHECK_NAME, blocking=False,
        description=f"Inputs logged by the version serving {m.label} (window: "
                    f"{m.drift.window_rows or m.drift.window_hours} {'rows' if m.drift.window_rows else 'hours'}) "
                    f"against that version's reference sample, with Evidently: {how}. Requested by the drift "
                    f"sensor when enough new rows arrived.",
    )
    def _drift(context: dg.AssetCheckExecutionContext, mlflow: MlflowRegistry,
               deployer_local: LocalDeployerResource, monitoring: MonitoringResource,
               ledger: LedgerResource) -> dg.AssetCheckResult:
        from platform_defs.factories import run_trigger

        return evaluate(m, mlflow=mlflow, deployer=deployer_local.deployer(), monitoring=monitoring,
                        ledger=ledger.ledger(), actor=f"dagster:{context.run.run_id}", trigger=run_trigger(context))

    return _drift


__all__ = ["CHECK_NAME", "Monitored", "build_drift_checks", "evaluate", "monitored", "prune_reports"]
