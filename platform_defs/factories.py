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
import os
import shutil
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
    EndpointSpec,
    ModelSpec,
    Organisation,
    endpoint_asset_name,
)
from resources.data_store import DataStore
from resources.deployers.base import DeployError, Release, Target, serving_version
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import LedgerResource
from resources.mlflow_registry import MlflowRegistry, TAG_PREFIX
from resources.monitoring import MonitoringResource

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


def run_trigger(context: Any) -> str:
    """What started this run, for the ledger: a onepath sensor's reason, declarative automation, or a person."""
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
        lab = labelled_rows(inference_log_dir=monitoring.inference_log_dir, outcomes_dir=monitoring.outcomes_dir,
                            endpoint=fb.endpoint, env=fb.env, max_age_days=fb.max_age_days, max_rows=fb.max_rows)
        rows = dataset_rows_from_feedback(spec, lab.frame)
    except FeedbackError as err:
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
        tags[f"{TAG_PREFIX}author"] = context.run.tags.get("dagster/user", f"team:{spec.owner}")
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
            author=tags[f"{TAG_PREFIX}author"], split_seed=spec.seed, test_size=spec.test_size,
            training_rows=len(X_train), metrics=metrics, actor=f"dagster:{context.run.run_id}")
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
# Gates


def record_gate(book: Any, verdicts: list, *, subject: str, env: str, actor: str, version: str,
                who: dict[str, str], still_serving: str | None,
                trigger: str = "manual run") -> tuple[list[dg.AssetCheckResult], dg.Failure | None]:
    """The gate's verdicts as blocking check results, recorded in the ledger; and the refusal to raise
    (after yielding the results) when any failed. The version serving now keeps serving.

    A version held back only by a missing approval is recorded as ``awaiting_approval`` (naming who
    may approve and the command), not as a refusal: nothing is wrong with it yet."""
    results = [dg.AssetCheckResult(
        check_name=v.check, passed=v.passed, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"model_version" if "model" in who else "release_version": version, "verdict": v.summary,
                  **v.metadata, **{k: dg.MetadataValue.md(text) for k, text in v.markdown.items()}},
    ) for v in verdicts]
    failed = [v for v in verdicts if not v.passed]
    book.append("gate_verdict", subject, {
        **who, "version": version, "passed": not failed, "trigger": trigger,
        "verdicts": {v.check: {"passed": v.passed, "summary": v.summary} for v in verdicts}}, actor, env=env)
    if not failed:
        return results, None
    if [v.check for v in failed] == ["approval"]:
        book.append("awaiting_approval", subject, {
            **who, "version": version, "still_serving": still_serving, "trigger": trigger,
            "approvers": failed[0].metadata.get("approvers"), "command": failed[0].metadata.get("command")},
            actor, env=env)
    else:
        book.append("promotion_refused", subject, {**who, "version": version, "still_serving": still_serving,
                                                   "failed": [v.check for v in failed], "trigger": trigger},
                    actor, env=env)
    return results, dg.Failure(
        description=f"{subject}.{env}: version {version} refused; "
                    + "; ".join(f"{v.check}: {v.summary}" for v in failed)
                    + f". {still_serving or 'Nothing'} keeps serving.",
        metadata={"refused_version": version, "still_serving": still_serving or "nothing",
                  "failed_checks": ", ".join(v.check for v in failed)})


# --------------------------------------------------------------------------------------------
# Endpoints


def endpoint_target(spec: EndpointSpec, env: str) -> Target:
    return Target(spec.name, env, kind="endpoint", port=spec.ports.get(env))


def endpoint_release(spec: EndpointSpec, model: ModelSpec, dataset: DatasetSpec, version: str,
                     artifact: Any, digest: str) -> Release:
    """What a deployer gets to serve ``version`` of ``model`` at ``spec`` (a promotion and a rollback alike).
    ``digest`` is the version's registered digest: the server refuses a folder that does not hash to it."""
    return Release(version=version, artifact=str(artifact), workers=spec.workers, digest=digest, config={
        "model_name": model.name, "pii_columns": dataset.pii_columns, "max_batch": spec.max_batch,
        "expected_digest": digest,
        "model_threads": spec.model_threads, **({} if spec.inference_log else {"log_dir": None}),
    })


def build_endpoint_defs(spec: EndpointSpec, org: Organisation, policy: Policy) -> list[Any]:
    model = org.by_name[spec.model]
    assert isinstance(model, ModelSpec)
    dataset = org.by_name[model.dataset]
    assert isinstance(dataset, DatasetSpec)
    out = []
    for i, env in enumerate(spec.environments):
        upstream_env = spec.environments[i - 1] if i else None
        out.append(_endpoint_env_asset(spec, model, dataset, env, upstream_env, org, policy))
    return out


def _endpoint_env_asset(spec: EndpointSpec, model: ModelSpec, dataset: DatasetSpec, env: str,
                        upstream_env: str | None, org: Organisation, policy: Policy) -> Any:
    from platform_defs.governance.gates import DESCRIPTIONS, ModelGate, model_checks

    features, label = org.model_features(model)
    required = model_checks(policy.track(model.track), env)
    key = endpoint_asset_name(spec.name, env)
    dep = dg.AssetKey(endpoint_asset_name(spec.name, upstream_env)) if upstream_env else dg.AssetKey(model.name)
    source = (f"the version '{upstream_env}' serves" if upstream_env
              else f"the newest registered version of model '{model.name}'")
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
        check_specs=[dg.AssetCheckSpec(c, asset=key, blocking=True, description=DESCRIPTIONS[c]) for c in required],
        **meta,
    )
    def _endpoint(context: dg.AssetExecutionContext, mlflow: MlflowRegistry, deployer_local: LocalDeployerResource,
                  data_store: DataStore, ledger: LedgerResource):
        from platform_defs.registration import NotRegistered, verified_artifact
        from resources.mlflow_registry import ArtifactMismatch
        deployer = deployer_local.deployer()
        book = ledger.ledger()
        actor = f"dagster:{context.run.run_id}"
        target = endpoint_target(spec, env)
        if upstream_env is None:
            version = mlflow.latest_version(model.name)
            if version is None:
                raise dg.Failure(description=f"model '{model.name}' has no registered version: materialize it first")
        else:
            up = deployer.status(endpoint_target(spec, upstream_env))
            if serving_version(up) is None:
                raise dg.Failure(description=f"{spec.name}: nothing healthy serves in '{upstream_env}' to promote "
                                             f"to '{env}'; deploy '{upstream_env}' first")
            version = serving_version(up)
        before = deployer.status(target)
        previous = serving_version(before)
        trigger = run_trigger(context)
        if upstream_env is None and previous and previous != version:
            same = _no_better(mlflow, model.name, version, previous, track.regression_metric)
            if same:
                book.append("promotion_skipped", spec.name, {
                    "model": model.name, "version": version, "still_serving": previous,
                    "reason": same, "trigger": trigger}, actor, env=env)
                raise dg.Failure(description=f"{spec.name}.{env}: version {version} not promoted: {same}. "
                                             f"Version {previous} keeps serving.",
                                 metadata={"skipped_version": version, "still_serving": previous})
        context.log.info(f"{spec.name}.{env}: deploying {model.name} version {version} "
                         f"(serving before: {previous or 'nothing'}) at {deployer.address(target)}")
        gate = ModelGate(endpoint=spec, model=model, dataset=dataset, features=features, label=label,
                         policy=policy, mlflow=mlflow, data_store=data_store, ledger=book, deployer=deployer,
                         instance=context.instance)
        verdicts = gate.evaluate(version, env)
        results, refusal = record_gate(book, verdicts, subject=spec.name, env=env, actor=actor, version=version,
                                       who={"model": model.name}, still_serving=previous,
                                       trigger=trigger)
        if refusal:
            yield from results
            raise refusal
        t0 = time.perf_counter()
        try:
            artifact, digest = verified_artifact(book, mlflow, model.name, version)
            status = deployer.deploy(target, endpoint_release(spec, model, dataset, version, artifact, digest))
        except (DeployError, NotRegistered, ArtifactMismatch) as err:
            book.append("promotion_refused", spec.name, {"model": model.name, "version": version,
                                                         "still_serving": previous,
                                                         "failed": ["deploy"], "error": str(err)[:500]}, actor, env=env)
            yield from results
            raise dg.Failure(description=str(err), metadata={
                "refused_version": version, "still_serving": previous or "nothing"})
        mlflow.set_alias(model.name, env, version)
        entry = book.append("deploy", spec.name, {
            "model": model.name, "version": version, "previous_version": previous, "digest": digest,
            "address": status.address, "promoted_from": upstream_env, "track": model.track,
            "owner": model.owner, "checks": [v.check for v in verdicts], "trigger": trigger,
            "initiated_by": context.run.tags.get("dagster/user")}, actor, env=env)
        bake_meta: dict[str, Any] = {}
        # a bake guards a switch: it watches the new version with the old one to return to. A first release
        # has none (its gate asked for a signed first-release record instead), so it does not bake.
        if env in track.bake.environments and previous and previous != version:
            bake_meta, failure = _bake_or_roll_back(context, org, policy, spec, model, env, version,
                                                    previous, deployer, mlflow, book, actor, trigger)
            if failure is not None:
                yield from results  # the gate passed: its checks stand even though the bake failed
                raise failure
        card_meta = _model_card(context, model, version, verdicts, mlflow, book)
        yield dg.MaterializeResult(
            check_results=results,
            metadata={
                "model_version": version,
                "previous_version": previous or "none",
                "address": dg.MetadataValue.url(status.address or ""),
                "mlflow_alias": f"{model.name}@{env}",
                "mlflow_version": dg.MetadataValue.url(mlflow.version_url(model.name, version)),
                "deploy_seconds": round(time.perf_counter() - t0, 3),
                "deployed_at": datetime.now(timezone.utc).isoformat(),
                "backend": spec.backend,
                "ledger_entry": entry.seq,
                **bake_meta,
                **card_meta,
            },
            data_version=dg.DataVersion(version),
        )

    return _endpoint


def _bake_or_roll_back(context: Any, org: Organisation, policy: Policy, spec: EndpointSpec, model: ModelSpec,
                       env: str, version: str, previous: str, deployer: Any, mlflow: MlflowRegistry,
                       book: Any, actor: str, trigger: str) -> tuple[dict[str, Any], dg.Failure | None]:
    """Watch the freshly switched version for the policy's bake period on its own metrics. If it fails,
    put the previous version back (ledger: ``bake_failed``, then the rollback's entries) and fail the run."""
    from platform_defs.governance.bake import bake
    from platform_defs.rollback import RollbackError, rollback

    bp = policy.track(model.track).bake
    target = endpoint_target(spec, env)
    context.log.info(f"{spec.name}.{env}: baking version {version} for {bp.seconds:g} s "
                     f"(min {bp.min_requests} requests, error rate <= {bp.max_error_rate:.1%}, "
                     f"p99 <= {bp.max_p99_latency_ms:g} ms)")
    verdict = bake(deployer, target, version, bp)
    data = {"model": model.name, "version": version, "previous_version": previous, "trigger": trigger,
            **{k: v for k, v in verdict.as_dict().items() if k not in ("version",)}}
    if verdict.passed:
        book.append("bake_passed", spec.name, data, actor, env=env)
        return verdict.metadata, None
    book.append("bake_failed", spec.name, data, actor, env=env)
    try:  # a bake runs only when a previous version served here: that is the way back
        rb = rollback(org, spec.name, env, to_version=previous, reason=f"bake failed: {verdict.summary}",
                      actor=actor, mlflow=mlflow, ledger=book, deployer=deployer, policy=policy)
        outcome = f"rolled back to version {rb.to_version} (ledger #{rb.rollback_entry})"
    except RollbackError as err:
        outcome = f"automatic rollback failed: {err}"
    context.log.error(f"{spec.name}.{env}: bake of version {version} failed ({verdict.summary}); {outcome}")
    return verdict.metadata, dg.Failure(
        description=f"{spec.name}.{env}: version {version} failed its bake: {verdict.summary}; {outcome}",
        metadata={**verdict.metadata, "outcome": outcome})


def _no_better(mlflow: MlflowRegistry, model: str, candidate: str, serving: str, metric: str) -> str | None:
    """Why ``candidate`` is not worth promoting over ``serving``, or None. Only versions trained on the same
    snapshot are comparable (same held-out rows); on other data the gates decide."""
    try:
        a, b = mlflow.get_version(model, candidate), mlflow.get_version(model, serving)
    except Exception:  # noqa: BLE001 - a serving version unknown to MLflow: let the gates speak
        return None
    key = f"{TAG_PREFIX}data_hash"
    if not a.tags.get(key) or a.tags.get(key) != b.tags.get(key):
        return None
    client = mlflow.client()
    mine = client.get_run(a.run_id).data.metrics.get(metric)
    theirs = client.get_run(b.run_id).data.metrics.get(metric)
    if mine is None or theirs is None or mine > theirs + 1e-9:
        return None
    return (f"trained on the same data (snapshot {a.tags[key][:12]}) as version {serving}, which serves, and no "
            f"better: held-out {metric} {mine:.4f} vs {theirs:.4f}")


def _model_card(context: Any, model: ModelSpec, version: str, verdicts: list, mlflow: MlflowRegistry,
                book: Any) -> dict[str, Any]:
    """Write the version's model card (Markdown and HTML) into its MLflow run; every deploy refreshes
    it with the longer history. The version already serves: a card that cannot be written is a
    warning, not a failed deploy."""
    from platform_defs.governance.model_card import card_data_from, write_model_card

    try:
        mv = mlflow.get_version(model.name, version)
        card = card_data_from(model, mv, mlflow.client().get_run(mv.run_id), verdicts, book.entries())
        with tempfile.TemporaryDirectory() as tmp:
            md_path, html_path = write_model_card(card, Path(tmp))
            for p in (md_path, html_path):
                mlflow.log_run_artifact(mv.run_id, p, "onepath/model_card")
            return {"model_card": dg.MetadataValue.md(md_path.read_text()),
                    "model_card_html": f"runs:/{mv.run_id}/onepath/model_card/{html_path.name}"}
    except Exception as err:  # noqa: BLE001 - see docstring
        context.log.warning(f"model card not written: {type(err).__name__}: {err}")
        return {"model_card": f"not written: {err}"}


# --------------------------------------------------------------------------------------------
# App releases


def source_hash(root: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir() or any(part in ("__pycache__", ".pytest_cache") or part.startswith(".") for part in rel.parts):
            continue
        h.update(str(rel).encode() + b"\0" + p.read_bytes() + b"\0")
        n += 1
    return h.hexdigest(), n


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def app_target(spec: AppSpec, env: str) -> Target:
    return Target(spec.name, env, kind="app", port=spec.ports.get(env))


def build_app_defs(spec: AppSpec, org: Organisation, releases_dir: Path, policy: Policy) -> list[Any]:
    meta = common(spec)

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
        dst = releases_dir / "apps" / spec.name / version
        if not dst.exists():
            tmp = dst.with_name(f".{version}.{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__", ".*"))
            os.replace(tmp, dst)
        context.log.info(f"{spec.name}: release {version} ({files} files) at {dst}")
        book = ledger.ledger()
        if not any(e.data.get("version") == version for e in book.entries(kind="release_built", subject=spec.name)):
            book.append("release_built", spec.name, {"version": version, "content_hash": digest, "files": files,
                                                      "git_sha": git_sha()}, f"dagster:{context.run.run_id}")
        return dg.MaterializeResult(
            metadata={"release_version": version, "content_hash": digest, "files": files,
                      "build_path": str(dst), "git_sha": git_sha() or "unknown"},
            data_version=dg.DataVersion(version),
        )

    out = [_build]
    for i, env in enumerate(spec.environments):
        calls = [endpoint_target(org.by_name[ep], env) for ep in spec.calls]
        out.append(_app_env_asset(spec, env, spec.environments[i - 1] if i else None, releases_dir, calls, policy))
    return out


def _app_env_asset(spec: AppSpec, env: str, upstream_env: str | None, releases_dir: Path,
                   calls: list[Target], policy: Policy) -> Any:
    from platform_defs.governance.gates import APP_DESCRIPTIONS, AppGate, app_checks

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
        check_specs=[dg.AssetCheckSpec(c, asset=key, blocking=True, description=APP_DESCRIPTIONS[c]) for c in required],
        **meta,
    )
    def _deploy(context: dg.AssetExecutionContext, deployer_local: LocalDeployerResource, ledger: LedgerResource):
        deployer = deployer_local.deployer()
        book = ledger.ledger()
        actor = f"dagster:{context.run.run_id}"
        target = app_target(spec, env)
        if upstream_env is None:
            version = latest_metadata(context, dg.AssetKey(spec.name), "app release")["release_version"]
        else:
            up = deployer.status(app_target(spec, upstream_env))
            if serving_version(up) is None:
                raise dg.Failure(description=f"{spec.name}: nothing healthy serves in '{upstream_env}' to promote")
            version = serving_version(up)
        artifact = releases_dir / "apps" / spec.name / version
        if not artifact.is_dir():
            raise dg.Failure(description=f"{spec.name}: release {version} is not built at {artifact}")
        env_vars = {f"ONEPATH_{t.name.upper()}_URL": deployer.address(t) for t in calls}
        before = deployer.status(target)
        previous = serving_version(before)
        context.log.info(f"{spec.name}.{env}: deploying release {version} (before: {previous})")
        gate = AppGate(app=spec, policy=policy, ledger=book, deployer=deployer, source_dir=PROJECT_ROOT / spec.source,
                       repo_root=PROJECT_ROOT)
        verdicts = gate.evaluate(version, artifact, env)
        results, refusal = record_gate(book, verdicts, subject=spec.name, env=env, actor=actor, version=version,
                                       who={"app": spec.name}, still_serving=previous)
        if refusal:
            yield from results
            raise refusal
        try:
            status = deployer.deploy(target, Release(version, str(artifact), config={
                "entrypoint": spec.entrypoint, "env": env_vars}))
        except DeployError as err:
            book.append("promotion_refused", spec.name, {"app": spec.name, "version": version,
                                                         "still_serving": previous,
                                                         "failed": ["deploy"], "error": str(err)[:500]}, actor, env=env)
            yield from results
            raise dg.Failure(description=str(err), metadata={"refused_version": version})
        entry = book.append("deploy", spec.name, {
            "app": spec.name, "version": version, "previous_version": previous,
            "address": status.address, "promoted_from": upstream_env, "track": spec.track, "owner": spec.owner,
            "checks": [v.check for v in verdicts]}, actor, env=env)
        yield dg.MaterializeResult(
            check_results=results,
            metadata={"ledger_entry": entry.seq,"release_version": version, "previous_version": previous or "none",
                      "address": dg.MetadataValue.url(status.address or ""),
                      "calls": dg.MetadataValue.json(env_vars),
                      "deployed_at": datetime.now(timezone.utc).isoformat()},
            data_version=dg.DataVersion(version),
        )

    return _deploy


def build_all(org: Organisation, releases_dir: Path, policy: Policy) -> list[Any]:
    out: list[Any] = []
    for d in org.by_name.values():
        if isinstance(d, DatasetSpec):
            out += build_dataset_defs(d, org)
        elif isinstance(d, ModelSpec):
            out += build_model_defs(d, org, policy)
        elif isinstance(d, EndpointSpec):
            out += build_endpoint_defs(d, org, policy)
        elif isinstance(d, AppSpec):
            out += build_app_defs(d, org, releases_dir, policy)
    return out


__all__ = ["build_all", "build_dataset_defs", "build_model_defs", "build_endpoint_defs", "build_app_defs",
           "endpoint_target", "app_target"]
