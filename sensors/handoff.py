"""Registry handoff: a version registered in MLflow from a notebook or script enters the graph by itself.

Data scientists register versions of a declared model however they like (``mlflow.sklearn.log_model(...,
registered_model_name="churn")``). Each tick this sensor lists the versions of every declared model
newer than its cursor; a version that no onepath materialization produced (no ``onepath.dagster_run_id``
tag) is reported as a materialization of the model asset -- it appears in the graph as the model's new
version, with what it carries and what it lacks -- and gets a ``handoff`` ledger entry and, once per
version, a ``model_registered`` entry (``platform_defs.registration``: its folder digest at handoff and
the facts its tags carried then, ``"via": "handoff"``) that the gates and servers check it against; the sensor
requests the first environment of every endpoint serving the model (run key per version): the same
gates as any version. A version without the lineage the gates need fails there, and each failing check
says exactly what to log and how. (Declarative automation would not: the model's blocking
``performance`` check was never evaluated for a version trained outside the graph.)
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg

from platform_defs.registration import NotServable, record_registration
from platform_defs.specs import EndpointSpec, ModelSpec, NotebookModelSpec, Organisation, endpoint_asset_name
from resources.ledger import Ledger, LedgerResource
from resources.mlflow_registry import TAG_PREFIX, MlflowRegistry

SENSOR_NAME = "registry_handoff"
LINEAGE = ("dataset_key", "data_hash", "code_hash")


def _int_or_none(v: str | None) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except ValueError:
        return None


def _float_or_none(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def _vkey(v: str) -> int:
    return int(v) if str(v).isdigit() else 0


def tick(org: Organisation, *, mlflow: MlflowRegistry, book: Ledger, cursor: dict,
         policy: Any = None) -> tuple[list, list[dg.RunRequest], list[str], dict]:
    """One pass over the registry. ``policy`` is the policy file in use (default: loaded); a registration
    signature names a version's author only when it verifies with an identity of the RECORDED policy in
    force, and only while ``policy`` is that policy (``record_registration`` checks it)."""
    if policy is None:
        from platform_defs.policy import load_policy

        policy = load_policy()
    # A notebook model's versions are registered by onepath.register / `onepath register` (which record them
    # themselves, with their held-out rows and code) and deployed by the pin in its declaration: handing them off
    # here would record a registration from tags alone (racing the register's own record) and send each new
    # version to staging over the pin.
    models = [d for d in org.of_kind("model") if isinstance(d, ModelSpec) and not isinstance(d, NotebookModelSpec)]
    if not models:
        return [], [], ["no declared models"], cursor
    names = ", ".join(f"'{m.name}'" for m in models)
    found = mlflow.client().search_model_versions(f"name IN ({names})")
    by_model: dict[str, list] = {}
    for mv in found:
        by_model.setdefault(mv.name, []).append(mv)
    events, requests, notes, new_cursor = [], [], [], dict(cursor)
    endpoints = [d for d in org.of_kind("endpoint") if isinstance(d, EndpointSpec)]
    for m in models:
        last = int(cursor.get(m.name) or 0)
        fresh = sorted((mv for mv in by_model.get(m.name, []) if _vkey(mv.version) > last), key=lambda x: _vkey(x.version))
        if not fresh:
            continue
        new_cursor[m.name] = _vkey(fresh[-1].version)
        handed = {str(e.data.get("version")) for e in book.entries(kind="handoff", subject=m.name)}
        for mv in fresh:
            tags = dict(mv.tags or {})
            if tags.get(TAG_PREFIX + "dagster_run_id") or str(mv.version) in handed:
                continue
            run = mlflow.client().get_run(mv.run_id) if mv.run_id else None  # a version may have no run
            if run is not None and run.data.tags.get(TAG_PREFIX + "dagster_run_id"):
                continue  # the graph's own version, whose tags are being set right now: the model asset records it
            missing = [TAG_PREFIX + t for t in LINEAGE if not tags.get(TAG_PREFIX + t)]
            # what the client says about authorship is a claim: MLflow's user and tags are set by the client.
            # The author is the identity whose registration signature verifies (record_registration checks it)
            claims = {"onepath.author": tags.get(TAG_PREFIX + "author"),
                      "mlflow.user": run.info.user_id if run is not None else None}
            # the version's digest now, and the facts its tags carry now, fixed in the ledger (once), if
            # its files are ones onepath may load at all
            try:
                reg = record_registration(
                    book, mlflow, model=m.name, version=str(mv.version), run_id=mv.run_id,
                    data_hash=tags.get(TAG_PREFIX + "data_hash"), code_hash=tags.get(TAG_PREFIX + "code_hash"),
                    code_path=tags.get(TAG_PREFIX + "code_path"), dataset_key=tags.get(TAG_PREFIX + "dataset_key"),
                    author=None, split_seed=_int_or_none(tags.get(TAG_PREFIX + "split_seed")),
                    test_size=_float_or_none(tags.get(TAG_PREFIX + "test_size")),
                    training_rows=_int_or_none(tags.get(TAG_PREFIX + "training_rows")), metrics=None,
                    via="handoff", actor=f"sensor:{SENSOR_NAME}", claims=claims, policy=policy,
                    signed_by=tags.get(TAG_PREFIX + "signed_by"),
                    registration_signature=tags.get(TAG_PREFIX + "registration_signature"))
            except NotServable as err:
                book.append("handoff", m.name, {
                    "model": m.name, "version": str(mv.version), "run_id": mv.run_id, "author": None,
                    "claims": {k: v for k, v in claims.items() if v}, "source": mv.source, "refused": str(err)},
                    f"sensor:{SENSOR_NAME}")
                notes.append(f"{m.name} version {mv.version} refused: {err}")
                continue
            author = reg.data.get("author") if reg.data.get("author_verified") else None
            shown = author or ("unknown (claimed: " + (claims["onepath.author"] or claims["mlflow.user"] or "nobody")
                               + "; not signed)")
            entry = book.append("handoff", m.name, {
                "model": m.name, "version": str(mv.version), "run_id": mv.run_id, "author": author,
                "author_verified": bool(author), "claims": {k: v for k, v in claims.items() if v},
                "source": mv.source, "missing_lineage": missing, "digest": reg.data["digest"],
                "registration_entry": reg.seq}, f"sensor:{SENSOR_NAME}")
            events.append(dg.AssetMaterialization(
                asset_key=dg.AssetKey(m.name),
                description=f"version {mv.version} registered outside onepath (notebook or script); author: {shown}",
                metadata={
                    "model_version": str(mv.version), "mlflow_run_id": mv.run_id,
                    "mlflow_version": dg.MetadataValue.url(mlflow.version_url(m.name, str(mv.version))),
                    "registered_by": shown, "source": "registered outside onepath",
                    "missing_lineage": ", ".join(missing) or "none",
                    "next": "staging deploys it through its track's gates",
                    "ledger_entry": entry.seq, "digest": reg.data["digest"],
                },
                tags={"onepath/handoff": "true"},
            ))
            notes.append(f"{m.name} version {mv.version} handed off")
            for ep in endpoints:
                if ep.model == m.name:
                    first = endpoint_asset_name(ep.name, ep.environments[0])
                    # the run deploys exactly the version handed off: without it the first environment took the
                    # newest registered version, and a version 7 registered meanwhile was deployed under a
                    # "handoff of version 6" (the request named one version, the asset chose another)
                    requests.append(dg.RunRequest(
                        run_key=f"handoff:{m.name}:{mv.version}:{ep.name}",
                        asset_selection=[dg.AssetKey(first)],
                        run_config={"ops": {first: {"config": {"version": str(mv.version)}}}},
                        tags={"onepath/trigger": "handoff", "onepath/handoff_version": str(mv.version),
                              "onepath/model": m.name, "onepath/registered_by": str(author or "unknown")}))
    return events, requests, notes, new_cursor


def build_handoff_sensor(org: Organisation, policy: Any = None) -> dg.SensorDefinition:
    @dg.sensor(
        name=SENSOR_NAME,
        description="Picks up model versions registered in MLflow outside onepath (notebooks, scripts) and puts "
                    "them into the graph; automation takes them to staging through the gates.",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        target=dg.AssetSelection.all(),  # its run requests select the environment assets to deploy
    )
    def registry_handoff(context: dg.SensorEvaluationContext, mlflow: MlflowRegistry, ledger: LedgerResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        events, requests, notes, new = tick(org, mlflow=mlflow, book=ledger.ledger(), cursor=cursor, policy=policy)
        context.update_cursor(json.dumps(new, sort_keys=True))
        if not events:
            return dg.SkipReason("no model version registered outside onepath since the last tick")
        return dg.SensorResult(asset_events=events, run_requests=requests)

    return registry_handoff


__all__ = ["SENSOR_NAME", "build_handoff_sensor", "tick"]
