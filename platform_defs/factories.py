"""Asset factories: one declaration in, Dagster asset definitions out.

``build_dataset_defs``, ``build_model_defs``, ``build_endpoint_defs`` and ``build_app_defs`` hold the
real logic; Python declarations and ``defs.yaml`` files both end up here.

Lineage in the graph: app release -> endpoint (per environment) -> model -> dataset. Promotion is
materializing the next environment's asset: staging deploys the model's newest registered
version, every later environment deploys exactly what the environment before it serves.
"""


import hashlib
import importlib
import inspect
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import dagster as dg

from platform_defs.policy import Policy
from platform_defs.settings import PROJECT_ROOT
from platform_defs.specs import (
    AppSpec,
    DatasetSpec,
    NotebookModelSpec,
    SnapshotDatasetSpec,
    EndpointSpec,
    ModelSpec,
    Organisation,
    endpoint_asset_name,
    promotion_pool,
)
from resources.data_store import DataStore
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource
from resources.mlflow_registry import MlflowRegistry, TAG_PREFIX
from resources.monitoring import MonitoringResource
from resources.object_store import ObjectStoreError
from resources.release_store import ReleaseError, ReleaseStore, source_hash

KINDS = {"dataset": {"dataset", "pandas", "greatexpectations"},
         "model": {"model", "mlflow", "scikitlearn"}}


def group_of(owner: str) -> str:
    return owner.replace("-", "_")


def common(d: Any) -> dict[str, Any]:
    return {
        "group_name": group_of(d.owner),
        "owners": [f"team:{d.owner}"],
        "tags": {"onepath/kind": d.kind, "onepath/track": d.track, "onepath/team": d.owner},
    }


def import_string(path: str) -> Callable[..., Any]:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def latest_metadata(context: Any, key: dg.AssetKey, what: str) -> dict[str, Any]:
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        raise dg.Failure(description=f"{what} '{key.to_user_string()}' has never been materialized: "
                                     f"materialize it first")
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def run_asked_at(context: Any) -> Any:
    """When this run was asked for (its record's creation time, UTC), or None: a promotion asked before another
    one deployed the same version deploys nothing (``promotion.superseded``)."""
    record = context.instance.get_run_record_by_id(context.run.run_id)
    return record.create_timestamp if record is not None else None


def run_trigger(context: Any) -> str:
    """What started this run, as its tags say: a onepath sensor's reason, declarative automation, or a person.

    Run tags are set by whoever launches the run, so this is a claim: the promotion flow records it under
    ``claims`` (``promotion.client_claims``), never as a fact; the fact is the entry's actor."""
    tags = context.run.tags
    if tags.get("onepath/trigger"):
        extra = tags.get("onepath/drift_entry") or tags.get("onepath/approval_entry")
        if extra:
            return f"{tags['onepath/trigger']} #{extra}"
        if tags.get("onepath/handoff_version"):
            return f"{tags['onepath/trigger']} of version {tags['onepath/handoff_version']}"
        if tags.get("onepath/new_rows"):
            return f"{tags['onepath/trigger']}: {tags['onepath/new_rows']} new rows"
        return tags["onepath/trigger"]
    if any(k.startswith(("dagster/from_automation", "dagster/auto_materialize")) for k in tags):
        return "declarative automation"  # (launched by the automation sensor, which also tags its name)
    if tags.get("dagster/sensor_name"):
        return f"sensor:{tags['dagster/sensor_name']}"
    if tags.get("dagster/user"):
        return f"user:{tags['dagster/user']}"
    return "manual run"


def follows_upstream() -> dg.AutomationCondition:
    """Materialize when an upstream asset was updated and every blocking check upstream passed."""
    return dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


def code_hash(fn: Callable[..., Any]) -> tuple[str, str]:
    """sha256 of the source file that defines ``fn`` (the trainer's code), and its project path."""
    path = Path(inspect.getsourcefile(fn) or "")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        shown = str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        shown = str(path)
    return digest, shown


# --------------------------------------------------------------------------------------------
# Datasets


def build_dataset_defs(spec: DatasetSpec, org: Organisation) -> list[Any]:
    check_name = "expectations"

    @dg.asset(
        key=spec.name,
        description=spec.description or f"Dataset {spec.name}",
        kinds=KINDS["dataset"],
        check_specs=[dg.AssetCheckSpec(check_name, asset=spec.name, blocking=True,
                                       description="The dataset's declared Great Expectations suite.")],
        config_schema={"params": dg.Field(dg.Permissive(), default_value={}, is_required=False,
                                          description="Overrides of the generator's parameters.")},
        metadata={"onepath/pii_columns": ", ".join(spec.pii_columns) or "none",
                  "onepath/protected_columns": ", ".join(spec.protected_columns) or "none",
                  "onepath/generator": spec.generator},
        **common(spec),
    )
    def _dataset(context: dg.AssetExecutionContext, data_store: DataStore, monitoring: MonitoringResource):
        from resources.gx_validation import validate

        overrides = dict(context.op_execution_context.op_config.get("params") or {})
        generator = import_string(spec.generator)
        accepted = set(inspect.signature(generator).parameters)
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise dg.Failure(description=f"dataset '{spec.name}': unknown parameter '{unknown[0]}' in run config "
                                         f"params (the generator takes: {', '.join(sorted(accepted))})")
        params = {**spec.params, **overrides}
        try:
            df = generator(**params)
        except (TypeError, ValueError) as err:
            raise dg.Failure(description=f"dataset '{spec.name}': generator rejected its parameters: {err}")
        feedback_meta: dict[str, Any] = {}
        if spec.feedback is not None:
            df, feedback_meta = _with_feedback(spec, df, monitoring)
            context.log.info(f"{spec.name}: {feedback_meta['feedback_rows']} labelled production rows from "
                             f"{spec.feedback.endpoint}.{spec.feedback.env} added")
        path, data_hash = data_store.write(spec.name, df)
        result = validate(df, spec)
        context.log.info(f"{spec.name}: {len(df)} rows, hash {data_hash[:12]}, expectations "
                         f"{'passed' if result.success else 'FAILED'}")
        failed = result.failed
        check = dg.AssetCheckResult(
            check_name=check_name, passed=result.success,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "evaluated": len(result.results), "failed": len(failed),
                "failures": dg.MetadataValue.md(_failures_md(failed)) if failed else "none",
                "data_hash": data_hash,
            },
        )
        return dg.MaterializeResult(
            metadata={
                "rows": len(df), "columns": len(df.columns), "data_hash": data_hash,
                "path": str(path), "params": dg.MetadataValue.json(_jsonable(params)),
                "expectations_passed": result.success, **feedback_meta,
                "label_rate": float(df[spec.label].mean()) if spec.label and spec.label in df else None,
                "preview": dg.MetadataValue.md(df.drop(columns=spec.pii_columns).head(5).to_markdown(index=False)),
            },
            check_results=[check],
            data_version=dg.DataVersion(data_hash[:16]),
        )

    return [_dataset]


def _with_feedback(spec: DatasetSpec, df: Any, monitoring: MonitoringResource) -> tuple[Any, dict[str, Any]]:
    """The generator's rows plus recent labelled production rows: what the endpoint scored, joined by
    request id with the outcomes that arrived since (PII columns empty: the inference log never holds PII)."""
    import pandas as pd

    from resources.feedback import FeedbackError, dataset_rows_from_feedback, labelled_rows

    fb = spec.feedback
    assert fb is not None
    try:
        lab = labelled_rows(inference_log_dir=monitoring.log_root, outcomes_dir=monitoring.outcomes_root,
                            endpoint=fb.endpoint, env=fb.env, max_age_days=fb.max_age_days, max_rows=fb.max_rows)
        rows = dataset_rows_from_feedback(spec, lab.frame)
    except (FeedbackError, ObjectStoreError) as err:  # one line naming what and where (an S3 store: its object)
        raise dg.Failure(description=str(err)) from None
    meta = {"feedback_rows": len(rows), "feedback_source": f"{fb.endpoint}.{fb.env}",
            "feedback_logged_rows": lab.logged, "feedback_outcomes": lab.outcomes,
            "feedback_unmatched_outcomes": lab.unmatched_outcomes,
            "feedback_corrupt_lines": lab.corrupt_log_lines + lab.corrupt_outcome_lines}
    if len(rows):
        df = pd.concat([df, rows[list(df.columns)]], ignore_index=True)
        ids = [c.name for c in spec.columns if c.role == "id"]
        if ids:  # a production row whose id the generator also drew: the production row wins
            before = len(df)
            df = df.drop_duplicates(subset=ids, keep="last").reset_index(drop=True)
            meta["feedback_id_collisions"] = before - len(df)
    return df, meta


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)) for k, v in d.items()}


def _failures_md(failed: list[dict[str, Any]]) -> str:
    lines = ["| expectation | column | unexpected | sample |", "|---|---|---|---|"]
    for f in failed:
        lines.append(f"| {f['expectation']} | {f['column'] or ''} | {f['unexpected_count'] or f['observed'] or ''} "
                     f"| {', '.join(f['sample'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Models


def evaluate_classifier(est: Any, X: Any, y: Any) -> dict[str, float]:
    from sklearn import metrics as m

    pred = est.predict(X)
    out = {
        "accuracy": float(m.accuracy_score(y, pred)),
        "f1": float(m.f1_score(y, pred, zero_division=0)),
        "precision": float(m.precision_score(y, pred, zero_division=0)),
        "recall": float(m.recall_score(y, pred, zero_division=0)),
    }
    if hasattr(est, "predict_proba"):
        proba = est.predict_proba(X)[:, 1]
        out["roc_auc"] = float(m.roc_auc_score(y, proba))
        out["log_loss"] = float(m.log_loss(y, proba))
    return out


def metric_verdicts(metrics: dict[str, float], thresholds: dict[str, float]) -> list[tuple[str, float, float, bool]]:
    rows = []
    for name, bound in thresholds.items():
        if name.endswith("_max"):
            value = metrics.get(name[:-4], float("inf"))
            rows.append((name, value, bound, value <= bound))
        else:
            value = metrics.get(name, float("-inf"))
            rows.append((name, value, bound, value >= bound))
    return rows


def build_model_defs(spec: ModelSpec, org: Organisation, policy: Policy) -> list[Any]:
    dataset = org.by_name[spec.dataset]
    assert isinstance(dataset, DatasetSpec)
    features, label = org.model_features(spec)

    @dg.asset(
        key=spec.name,
        deps=[dg.AssetKey(spec.dataset)],
        description=spec.description or f"Model {spec.name}",
        kinds=KINDS["model"],
        check_specs=[dg.AssetCheckSpec("performance", asset=spec.name, blocking=True,
                                       description="Held-out metrics meet the declared minimums.")],
        metadata={"onepath/trainer": spec.trainer, "onepath/features": ", ".join(features),
                  "onepath/label": label},
        automation_condition=follows_upstream(),
        **common(spec),
    )
    def _model(context: dg.AssetExecutionContext, mlflow: MlflowRegistry, data_store: DataStore,
               ledger: LedgerResource):
        from sklearn.model_selection import train_test_split

        from platform_defs.registration import record_registration

        ds_meta = latest_metadata(context, dg.AssetKey(spec.dataset), "dataset")
        if ds_meta.get("expectations_passed") is False:
            raise dg.Failure(description=f"model '{spec.name}': the latest '{spec.dataset}' snapshot failed its "
                                         f"expectations; fix the data and materialize it again")
        data_hash = ds_meta["data_hash"]
        df = data_store.read(spec.dataset, data_hash)
        X, y = df[features], df[label]
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=spec.test_size, random_state=spec.seed, stratify=y)
        trainer = import_string(spec.trainer)
        c_hash, c_path = code_hash(trainer)
        t0 = time.perf_counter()
        est = trainer(X_train, y_train, dict(spec.params))
        train_seconds = time.perf_counter() - t0
        metrics = evaluate_classifier(est, X_test, y_test)
        tags = {
            f"{TAG_PREFIX}declaration": spec.name,
            f"{TAG_PREFIX}dataset_key": dg.AssetKey(spec.dataset).to_user_string(),
            f"{TAG_PREFIX}data_hash": data_hash,
            f"{TAG_PREFIX}code_hash": c_hash,
            f"{TAG_PREFIX}code_path": c_path,
            f"{TAG_PREFIX}dagster_run_id": context.run.run_id,
            f"{TAG_PREFIX}track": spec.track,
            f"{TAG_PREFIX}owner": spec.owner,
            f"{TAG_PREFIX}training_rows": str(len(X_train)),
            f"{TAG_PREFIX}test_rows": str(len(X_test)),
            f"{TAG_PREFIX}split_seed": str(spec.seed),
            f"{TAG_PREFIX}test_size": str(spec.test_size),
        }
        # the author is the platform's run on behalf of the owner team, never a run tag: dagster/user is set by
        # whoever launches the run (Dagster OSS never sets it), so it is recorded as a claim, and never used
        author = f"team:{spec.owner}"
        tags[f"{TAG_PREFIX}author"] = author
        claimed_user = context.run.tags.get("dagster/user")
        # the reference sample drift monitoring compares production inputs with: real training rows
        # (features and protected attributes, never PII), as many as the track's policy asks for
        reference_rows = policy.track(spec.track).reference_rows
        keep = features + [c for c in dataset.protected_columns if c not in features]
        reference = df.loc[X_train.index, keep].sample(n=min(reference_rows, len(X_train)), random_state=spec.seed)
        with tempfile.TemporaryDirectory() as tmp:
            ref_path = Path(tmp) / "reference_sample.parquet"
            reference.to_parquet(ref_path, index=False)
            registered = mlflow.log_and_register(
                model_name=spec.name, estimator=est, X_example=X_train,
                y_pred_example=est.predict(X_train.head(50)),
                metrics={**metrics, "train_seconds": train_seconds},
                params={**spec.params, "features": ",".join(features), "label": label},
                tags=tags, experiment=f"onepath/{spec.name}", artifacts={"onepath": str(ref_path)},
            )
        context.log.info(f"registered {spec.name} version {registered.version} (run {registered.run_id})")
        # the version's digest and lineage, fixed in the ledger: what gates and servers check it against
        reg = record_registration(
            ledger.ledger(), mlflow, model=spec.name, version=registered.version, run_id=registered.run_id,
            data_hash=data_hash, code_hash=c_hash, code_path=c_path, dataset_key=tags[f"{TAG_PREFIX}dataset_key"],
            author=author, split_seed=spec.seed, test_size=spec.test_size,
            training_rows=len(X_train), metrics=metrics, actor=f"dagster:{context.run.run_id}",
            registered_by={"principal": "onepath", "run": context.run.run_id, "owner": spec.owner},
            claims={"dagster/user": claimed_user} if claimed_user else None)
        verdicts = metric_verdicts(metrics, spec.metrics)
        passed = all(ok for *_, ok in verdicts)
        check = dg.AssetCheckResult(
            check_name="performance", passed=passed, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"model_version": registered.version,
                      "verdicts": dg.MetadataValue.md(_verdicts_md(verdicts) if verdicts else "no thresholds declared"),
                      **{f"held_out_{k}": v for k, v in metrics.items()}},
        )
        return dg.MaterializeResult(
            metadata={
                "model_version": registered.version,
                "model_uri": registered.model_uri,
                "mlflow_version": dg.MetadataValue.url(mlflow.version_url(spec.name, registered.version)),
                "mlflow_run_id": registered.run_id,
                "data_hash": data_hash,
                "code_hash": c_hash,
                "training_rows": len(X_train),
                "reference_rows": len(reference),
                "digest": reg.data["digest"], "registration_entry": reg.seq,
                **{f"held_out_{k}": v for k, v in metrics.items()},
            },
            check_results=[check],
            data_version=dg.DataVersion(registered.version),
        )

    return [_model]


def _verdicts_md(verdicts: list[tuple[str, float, float, bool]]) -> str:
    lines = ["| metric | value | bound | passed |", "|---|---|---|---|"]
    lines += [f"| {n} | {v:.4f} | {b} | {'yes' if ok else 'NO'} |" for n, v, b, ok in verdicts]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Endpoints and app environments: thin adapters over the one promotion flow (platform_defs.promotion)


def check_results(verdicts: list, version: str, who: str) -> list[dg.AssetCheckResult]:
    """The gate's verdicts as the asset's blocking check results."""
    return [dg.AssetCheckResult(
        check_name=v.check, passed=v.passed, severity=dg.AssetCheckSeverity.ERROR,
        # the version and verdict last: a custom check's metrics cannot stand in for them
        metadata={**v.metadata, **{k: dg.MetadataValue.md(text) for k, text in v.markdown.items()},
                  f"{who}_version": version, "verdict": v.summary},
    ) for v in verdicts]


def flow_services(context: Any, mlflow: MlflowRegistry, deployer_local: LocalDeployerResource,
                  ledger: LedgerResource, data_store: DataStore | None = None,
                  releases_dir: Path | None = None, releases_url: str | None = None) -> Any:
    from platform_defs.promotion import Services

    return Services(mlflow=mlflow, deployer=deployer_local.deployer(), ledger=ledger.ledger(), data_store=data_store,
                    releases_dir=releases_dir, releases_url=releases_url, log=context.log.info,
                    warn=context.log.warning)


def build_endpoint_defs(spec: EndpointSpec, org: Organisation, policy: Policy) -> list[Any]:
    model = org.by_name[spec.model]
    assert isinstance(model, ModelSpec)
    return [_endpoint_env_asset(spec, model, env, spec.environments[i - 1] if i else None, org, policy)
            for i, env in enumerate(spec.environments)]


def _endpoint_env_asset(spec: EndpointSpec, model: ModelSpec, env: str, upstream_env: str | None,
                        org: Organisation, policy: Policy) -> Any:
    from platform_defs.governance.custom_checks import describe
    from platform_defs.governance.gates import model_checks

    required = model_checks(policy.track(model.track), env)
    key = endpoint_asset_name(spec.name, env)
    dep = dg.AssetKey(endpoint_asset_name(spec.name, upstream_env)) if upstream_env else dg.AssetKey(model.name)
    source = (f"the version '{upstream_env}' serves" if upstream_env
              else f"the version model '{model.name}' pins ({org.sources.get(model.name, 'its declaration')})"
              if isinstance(model, NotebookModelSpec) else f"the newest registered version of model '{model.name}'")
    meta = common(spec)
    meta["tags"] = {**meta["tags"], "onepath/env": env}
    track = policy.track(model.track)
    # staging follows every new model version; later environments follow the one before them when the
    # policy lets automation promote, or when an approval check will hold the version for a person
    automated = upstream_env is None or track.auto_promote or "approval" in required
    automation = follows_upstream() if automated else None

    @dg.asset(
        key=key, deps=[dep], automation_condition=automation,
        description=f"{spec.description or spec.name} — {env}. Materializing deploys {source} at the "
                    f"environment's stable address and moves MLflow alias '{env}' to it.",
        kinds={"endpoint", spec.backend, "mlflow"},
        metadata={"onepath/endpoint": spec.name, "onepath/env": env, "onepath/model": model.name,
                  "onepath/deploys": source, "onepath/gate": ", ".join(required)},
        check_specs=[dg.AssetCheckSpec(c, asset=key, blocking=True, description=describe(policy, c)) for c in required],
        pool=promotion_pool(spec.name, env),
        config_schema={"version": dg.Field(str, is_required=False, description=(
            "Deploy exactly this registered version (first environment); in a later one it must be what the "
            "environment before serves, or the run is refused."))},
        **meta,
    )
    def _endpoint(context: dg.AssetExecutionContext, mlflow: MlflowRegistry, deployer_local: LocalDeployerResource,
                  data_store: DataStore, ledger: LedgerResource):
        from platform_defs.promotion import PromotionError, promote_endpoint

        try:
            result = promote_endpoint(
                org, policy, spec.name, env,
                services=flow_services(context, mlflow, deployer_local, ledger, data_store),
                actor=f"dagster:{context.run.run_id}", trigger=run_trigger(context),
                initiated_by=context.run.tags.get("dagster/user"),
                version=(context.op_execution_context.op_config or {}).get("version"), asked_at=run_asked_at(context))
        except PromotionError as err:
            if err.verdicts:
                yield from check_results(err.verdicts, str(err.metadata.get("refused_version", "")), "model")
            raise dg.Failure(description=str(err), metadata=err.metadata) from None
        card = ({"model_card": dg.MetadataValue.md(result.card["markdown"]), "model_card_html": result.card["html_uri"]}
                if "markdown" in result.card else {"model_card": f"not written: {result.card.get('error')}"}
                if result.card else {})
        yield dg.MaterializeResult(
            check_results=check_results(result.verdicts, result.version, "model"),
            metadata={
                "model_version": result.version,
                "outcome": result.outcome,
                "previous_version": result.previous or "none",
                "digest": result.digest or "unknown",
                "address": dg.MetadataValue.url(result.address or ""),
                "mlflow_alias": f"{model.name}@{env}",
                "mlflow_version": dg.MetadataValue.url(mlflow.version_url(model.name, result.version)),
                "deploy_seconds": result.seconds,
                "deployed_at": datetime.now(timezone.utc).isoformat(),
                "backend": spec.backend,
                **({"ledger_entry": result.deploy_entry} if result.deploy_entry else {}),
                **result.bake,
                **card,
            },
            data_version=dg.DataVersion(result.version),
        )

    return _endpoint


# --------------------------------------------------------------------------------------------
# App releases


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def build_app_defs(spec: AppSpec, org: Organisation, releases_dir: Path, policy: Policy,
                   releases_url: str | None = None) -> list[Any]:
    """The app's build asset and one asset per environment. Releases are kept by :class:`ReleaseStore`: folders
    under ``releases_dir``, and bundles on S3 when ``releases_url`` (``ONEPATH_RELEASES_URL``) names a bucket."""
    meta = common(spec)
    store = ReleaseStore(releases_dir, releases_url)

    @dg.asset(
        key=spec.name,
        description=f"{spec.description or spec.name} — a versioned build (content hash of {spec.source}).",
        kinds={"app", "python"},
        metadata={"onepath/source": spec.source, "onepath/entrypoint": spec.entrypoint},
        **meta,
    )
    def _build(context: dg.AssetExecutionContext, ledger: LedgerResource):
        src = PROJECT_ROOT / spec.source
        if not src.is_dir():
            raise dg.Failure(description=f"app '{spec.name}': source folder {spec.source} does not exist")
        digest, files = source_hash(src)
        version = f"r-{digest[:12]}"
        try:  # published before it is recorded: a release_built entry always names a release there is
            dst = store.publish(spec.name, version, src, digest)
        except (ReleaseError, ObjectStoreError) as err:
            raise dg.Failure(description=f"app '{spec.name}': {err}") from None
        where = f"{dst} and {store.bundle(spec.name, version)}" if store.on_s3 else str(dst)
        context.log.info(f"{spec.name}: release {version} ({files} files) at {where}")
        book = ledger.ledger()
        if not any(e.data.get("version") == version for e in book.entries(kind="release_built", subject=spec.name)):
            book.append("release_built", spec.name, {"version": version, "content_hash": digest, "files": files,
                                                      "git_sha": git_sha()}, f"dagster:{context.run.run_id}")
        return dg.MaterializeResult(
            metadata={"release_version": version, "content_hash": digest, "files": files,
                      "build_path": str(dst), "git_sha": git_sha() or "unknown",
                      **({"bundle": store.bundle(spec.name, version)} if store.on_s3 else {})},
            data_version=dg.DataVersion(version),
        )

    out = [_build]
    for i, env in enumerate(spec.environments):
        out.append(_app_env_asset(spec, env, spec.environments[i - 1] if i else None, org, releases_dir, policy,
                                  releases_url))
    return out


def _app_env_asset(spec: AppSpec, env: str, upstream_env: str | None, org: Organisation, releases_dir: Path,
                   policy: Policy, releases_url: str | None = None) -> Any:
    from platform_defs.governance.custom_checks import describe
    from platform_defs.governance.gates import app_checks

    required = app_checks(policy.track("app"), spec.environments, env)
    key = endpoint_asset_name(spec.name, env)
    deps = [dg.AssetKey(endpoint_asset_name(spec.name, upstream_env)) if upstream_env else dg.AssetKey(spec.name)]
    deps += [dg.AssetKey(endpoint_asset_name(ep, env)) for ep in spec.calls]
    source = f"the release '{upstream_env}' serves" if upstream_env else "the newest build"
    meta = common(spec)
    meta["tags"] = {**meta["tags"], "onepath/env": env}

    @dg.asset(
        key=key, deps=deps,
        description=f"{spec.description or spec.name} — {env}. Materializing deploys {source}; it calls "
                    f"{', '.join(spec.calls) or 'no endpoint'} at their stable '{env}' addresses, so a model "
                    f"redeploy never needs an app redeploy.",
        kinds={"app", "local"},
        metadata={"onepath/app": spec.name, "onepath/env": env, "onepath/deploys": source,
                  "onepath/gate": ", ".join(required)},
        check_specs=[dg.AssetCheckSpec(c, asset=key, blocking=True, description=describe(policy, c)) for c in required],
        pool=promotion_pool(spec.name, env),
        **meta,
    )
    def _deploy(context: dg.AssetExecutionContext, mlflow: MlflowRegistry, deployer_local: LocalDeployerResource,
                ledger: LedgerResource):
        from platform_defs.promotion import PromotionError, promote_app

        try:
            result = promote_app(
                org, policy, spec.name, env,
                services=flow_services(context, mlflow, deployer_local, ledger, releases_dir=releases_dir,
                                       releases_url=releases_url),
                actor=f"dagster:{context.run.run_id}", trigger=run_trigger(context), repo_root=PROJECT_ROOT,
                asked_at=run_asked_at(context),
                newest_build=lambda: latest_metadata(context, dg.AssetKey(spec.name), "app release")["release_version"])
        except PromotionError as err:
            if err.verdicts:
                yield from check_results(err.verdicts, str(err.metadata.get("refused_version", "")), "release")
            raise dg.Failure(description=str(err), metadata=err.metadata) from None
        yield dg.MaterializeResult(
            check_results=check_results(result.verdicts, result.version, "release"),
            metadata={**({"ledger_entry": result.deploy_entry} if result.deploy_entry else {}),
                      "release_version": result.version, "outcome": result.outcome,
                      "calls": dg.MetadataValue.json(result.calls),
                      "previous_version": result.previous or "none",
                      "address": dg.MetadataValue.url(result.address or ""),
                      "deployed_at": datetime.now(timezone.utc).isoformat()},
            data_version=dg.DataVersion(result.version),
        )

    return _deploy


# --------------------------------------------------------------------------------------------
# Notebook models: a snapshot-only dataset and a model with no trainer


def build_snapshot_dataset_defs(spec: SnapshotDatasetSpec, org: Organisation) -> list[Any]:
    """The snapshots ``onepath.register`` stored (by content hash); materializing lists them, never generates."""

    @dg.asset(
        key=spec.name, description=spec.description, kinds=KINDS["dataset"],
        metadata={"onepath/pii_columns": ", ".join(spec.pii_columns) or "none",
                  "onepath/protected_columns": ", ".join(spec.protected_columns) or "none",
                  "onepath/generator": "none: snapshots stored by onepath.register"},
        **common(spec),
    )
    def _snapshots(context: dg.AssetExecutionContext, data_store: DataStore):
        snaps = data_store.snapshots(spec.name)
        if not snaps:
            raise dg.Failure(description=f"dataset '{spec.name}' has no snapshot yet: run onepath.register(...) "
                                         f"in the notebook that trains the model")
        newest, where = snaps[-1]
        return dg.MaterializeResult(
            # no expectations run on a notebook's snapshot (said so; the gates' data_quality reads the rows)
            metadata={"snapshots": len(snaps), "data_hash": newest, "expectations": "none declared (a snapshot "
                      "onepath.register wrote)", "path": where},
            data_version=dg.DataVersion(newest[:16]))

    return [_snapshots]


def build_notebook_model_defs(spec: NotebookModelSpec, org: Organisation, policy: Policy) -> list[Any]:
    """The pinned version of a notebook model: reported, never trained (the notebook registered it)."""
    features, label = org.model_features(spec)

    @dg.asset(
        key=spec.name, deps=[dg.AssetKey(spec.dataset)],
        description=(spec.description or f"Model {spec.name}") + f" (pinned version {spec.version})",
        kinds=KINDS["model"],
        metadata={"onepath/trainer": "none: registered from a notebook", "onepath/label": label,
                  "onepath/features": ", ".join(features) or "every column but the label and PII",
                  "onepath/pinned_version": str(spec.version)},
        **common(spec),
    )
    def _pinned(context: dg.AssetExecutionContext, mlflow: MlflowRegistry):
        version = str(spec.version)
        try:
            mv = mlflow.get_version(spec.name, version)
        except Exception:  # noqa: BLE001 - MLflow says "not found" in several ways
            raise dg.Failure(description=f"model '{spec.name}': pinned version {version} is not registered "
                                         f"(run onepath.register(...) again, or fix 'version' in "
                                         f"{org.sources.get(spec.name, 'its declaration')})") from None
        newest = mlflow.latest_version(spec.name)
        return dg.MaterializeResult(
            metadata={"model_version": version, "pinned_by": org.sources.get(spec.name, ""),
                      "newest_registered": newest or "none",
                      "mlflow_version": dg.MetadataValue.url(mlflow.version_url(spec.name, version)),
                      "mlflow_run_id": getattr(mv, "run_id", "") or ""},
            data_version=dg.DataVersion(version))

    return [_pinned]


def build_all(org: Organisation, releases_dir: Path, policy: Policy, releases_url: str | None = None) -> list[Any]:
    out: list[Any] = []
    for d in org.by_name.values():
        if isinstance(d, SnapshotDatasetSpec):
            out += build_snapshot_dataset_defs(d, org)
        elif isinstance(d, NotebookModelSpec):
            out += build_notebook_model_defs(d, org, policy)
        elif isinstance(d, DatasetSpec):
            out += build_dataset_defs(d, org)
        elif isinstance(d, ModelSpec):
            out += build_model_defs(d, org, policy)
        elif isinstance(d, EndpointSpec):
            out += build_endpoint_defs(d, org, policy)
        elif isinstance(d, AppSpec):
            out += build_app_defs(d, org, releases_dir, policy, releases_url)
    return out


__all__ = ["build_all", "build_dataset_defs", "build_model_defs", "build_endpoint_defs", "build_app_defs"]
