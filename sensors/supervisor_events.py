"""Relay what the local supervisors did on their own into the ledger.

A supervisor restarts a worker that died and replaces a crash-looping version by the one that served
before it without asking anyone (``resources.serving.supervisor``); it writes each of these to its
slot's ``events.jsonl``. ``relay_events`` reads those files from a byte-offset cursor and records:

* ``restart`` -> a ``restart`` entry (worker, exit_code, version),
* ``crashloop`` -> a ``crashloop`` entry (version, restarts, what the supervisor did about it),
* ``crashloop_rollback_failed`` -> a second ``crashloop`` entry (``action: "rollback_failed"``, why):
  the previous version did not come back either, nothing serves,
* ``crashloop_rollback`` -> a ``rollback`` entry and a ``deploy`` entry of the restored version,
  written the way ``platform_defs.rollback`` writes them (``via: "rollback"``, so delivery metrics
  count it as a restore, not a change; ``rolled_back_by: "supervisor"``), and for an endpoint the
  MLflow alias named after the environment moves to the restored version.

The actor is ``supervisor:<slot>``. Only complete lines are read (a line being written is read next
time); a line that is not a JSON event signed with the slot's secret (``sig``, see
``resources.serving.protocol.verify_event``: a forged or altered line) is counted in the cursor
(``corrupt``) and skipped, never recorded. Every
entry carries the event's ``event_id``, and an event whose id the ledger already holds for that
subject and environment is not recorded again, so a reset cursor, or a tick that failed half way,
never records anything twice.

``build_supervisor_events_sensor(org)`` is the ``supervisor_events`` sensor that runs it every few
seconds with the cursor kept as the sensor's cursor (JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from platform_defs.specs import AppSpec, EndpointSpec, ModelSpec, Organisation, endpoint_asset_name
from resources.deployers.base import Target
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import Entry, Ledger, LedgerResource
from resources.mlflow_registry import MlflowRegistry
from resources.serving.protocol import verify_event

RELAYED = ("restart", "crashloop", "crashloop_rollback", "crashloop_rollback_failed")
MAX_READ = 4 * 1024 * 1024  # bytes read per slot and call; the rest is read on the next call


def _targets(org: Organisation) -> list[tuple[Any, Target]]:
    out: list[tuple[Any, Target]] = []
    for d in org.by_name.values():
        if isinstance(d, EndpointSpec):
            out += [(d, Target(d.name, env, "endpoint", d.ports.get(env))) for env in d.environments]
        elif isinstance(d, AppSpec):
            out += [(d, Target(d.name, env, "app", d.ports.get(env))) for env in d.environments]
    return out


def _read_new_lines(path: Path, pos: dict[str, Any]) -> tuple[list[tuple[int, bytes]], dict[str, Any]]:
    """Complete lines after the cursor position, each with its byte offset; and the new position.

    The position is ``{"offset", "ino", "corrupt"}``; a file that was replaced (another inode) or cut
    shorter than the offset is read again from its start (the ledger's event ids prevent doubles)."""
    pos = {"offset": 0, "ino": None, "corrupt": 0, **pos}
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return [], pos
    with fh:
        st = os.fstat(fh.fileno())
        if pos["ino"] != st.st_ino or st.st_size < pos["offset"]:
            pos.update(offset=0, ino=st.st_ino)
        fh.seek(pos["offset"])
        data = fh.read(MAX_READ)
    end = data.rfind(b"\n")
    if end < 0:
        return [], pos
    lines, at = [], pos["offset"]
    for raw in data[: end + 1].split(b"\n")[:-1]:
        lines.append((at, raw))
        at += len(raw) + 1
    pos["offset"] = at
    return lines, pos


def relay_events(org: Organisation, deployer: Any, ledger: Ledger, mlflow: MlflowRegistry,
                 cursor: dict[str, Any]) -> tuple[list[Entry], dict[str, Any]]:
    """Record the new supervisor events of every declared target; returns (entries written, new cursor).

    ``deployer`` is the local backend (it knows each slot's directory and stable address). The cursor
    maps slot -> ``{"offset": bytes read, "ino": the file's inode, "corrupt": lines skipped}``; the
    caller keeps the returned one. An error raised half way (the ledger unreachable) propagates: the
    caller keeps its old cursor, and the events recorded before the error are not recorded again next
    time (their ids are in the ledger)."""
    written: list[Entry] = []
    new_cursor = {k: dict(v) for k, v in cursor.items() if isinstance(v, dict)}
    for spec, target in _targets(org):
        slot = target.slot
        lines, pos = _read_new_lines(deployer.slot_dir(target) / "events.jsonl", new_cursor.get(slot, {}))
        seen: set[str] | None = None  # event ids the ledger holds for this target, read when needed
        done = pos["offset"]
        secret = deployer.slot_secret(target) if lines else None  # no secret: nothing verifies
        for offset, raw in lines:
            event = verify_event(secret, raw) if secret is not None else None
            if event is None or not isinstance(event.get("event"), str):
                pos["corrupt"] += 1
                continue
            if event["event"] in RELAYED:
                if seen is None:
                    seen = {str(e.data.get("event_id")) for e in ledger.entries(subject=target.name, env=target.env)
                            if e.data.get("event_id")}
                event_id = str(event.get("id") or f"{slot}@{offset}")
                if event_id not in seen:
                    model_spec = org.by_name.get(spec.model) if isinstance(spec, EndpointSpec) else None
                    written += _record(spec, model_spec, target, event, event_id, deployer, ledger, mlflow)
                    seen.add(event_id)
        pos["offset"] = done
        if lines or slot in new_cursor or pos["corrupt"]:
            new_cursor[slot] = pos
    return written, new_cursor


def _record(spec: Any, model_spec: Any, target: Target, event: dict[str, Any], event_id: str, deployer: Any,
            ledger: Ledger, mlflow: MlflowRegistry) -> list[Entry]:
    actor = f"supervisor:{target.slot}"
    model = spec.model if isinstance(spec, EndpointSpec) else None
    common: dict[str, Any] = {"event_id": event_id, "event_ts": event.get("ts"), "group": event.get("group"),
                              **({"model": model} if model else {})}
    kind = event["event"]
    if kind == "restart":
        return [ledger.append("restart", target.name, {
            **common, "worker": event.get("worker"), "exit_code": event.get("exit_code"),
            "version": _str(event.get("version")), "restarts": event.get("restarts")}, actor, env=target.env)]
    if kind == "crashloop":
        return [ledger.append("crashloop", target.name, {
            **common, "version": _str(event.get("version")), "restarts": event.get("restarts"),
            "exit_code": event.get("exit_code"), "action": event.get("action"),
            "rollback_to": _str(event.get("rollback_to")), "detail": event.get("detail")}, actor, env=target.env)]
    if kind == "crashloop_rollback_failed":
        return [ledger.append("crashloop", target.name, {
            **common, "version": _str(event.get("from_version")), "action": "rollback_failed",
            "rollback_to": _str(event.get("to_version")),
            "detail": f"rolling back to version {event.get('to_version')} failed, nothing serves: "
                      f"{event.get('reason')}"}, actor, env=target.env)]
    # crashloop_rollback: the supervisor already serves to_version again; record it like a rollback
    from_version, to_version = _str(event.get("from_version")), str(event.get("to_version"))
    address = deployer.address(target)
    alias_error = None
    if model:
        from mlflow.exceptions import MlflowException

        try:
            mlflow.set_alias(model, target.env, to_version)
        except MlflowException as err:
            alias_error = " ".join(str(err).split())[:200]
    restored = [e for e in ledger.entries(kind="deploy", subject=target.name, env=target.env)
                if str(e.data.get("version")) == to_version]
    rb = ledger.append("rollback", target.name, {
        **common, "from_version": from_version, "to_version": to_version,
        "reason": f"crash loop: version {from_version} kept dying; the supervisor restored version {to_version}",
        "address": address, "serving_before": None, "restored_deploy_entry": restored[-1].seq if restored else None,
        "rolled_back_by": "supervisor", **({"alias_error": alias_error} if alias_error else {}),
    }, actor, env=target.env)
    owned = model_spec if isinstance(model_spec, ModelSpec) else spec  # a model endpoint: its model's
    track, owner = owned.track, owned.owner
    dep = ledger.append("deploy", target.name, {
        **common, "version": to_version, "previous_version": from_version, "address": address,
        "promoted_from": None, "track": track, "owner": owner,
        "checks": list(restored[-1].data.get("checks") or []) if restored else [],
        "via": "rollback", "rolled_back_by": "supervisor", "rollback_entry": rb.seq,
    }, actor, env=target.env)
    return [rb, dep]


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def build_supervisor_events_sensor(org: Organisation) -> dg.SensorDefinition:
    """The ``supervisor_events`` sensor: ``relay_events`` every 5 s, its cursor kept as the sensor's."""

    @dg.sensor(
        name="supervisor_events",
        description="Records worker restarts, crash loops and the supervisors' automatic rollbacks in the ledger "
                    "(and moves the MLflow alias of an endpoint a supervisor rolled back).",
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def supervisor_events(context: dg.SensorEvaluationContext, mlflow: MlflowRegistry,
                          deployer_local: LocalDeployerResource, ledger: LedgerResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        before = {slot: int(pos.get("corrupt", 0)) for slot, pos in cursor.items() if isinstance(pos, dict)}
        written, new_cursor = relay_events(org, deployer_local.deployer(), ledger.ledger(), mlflow, cursor)
        context.update_cursor(json.dumps(new_cursor, sort_keys=True))
        for slot, pos in new_cursor.items():
            skipped = int(pos.get("corrupt", 0)) - before.get(slot, 0)
            if skipped > 0:
                context.log.warning(f"supervisor_events: skipped {skipped} line(s) of {slot}/events.jsonl that are "
                                    "not JSON events signed by the slot's supervisor")
        if not written:
            return dg.SkipReason("no new supervisor events to record")
        observations = [
            dg.AssetObservation(
                asset_key=dg.AssetKey(endpoint_asset_name(e.subject, e.env or "")),
                description=(f"the supervisor rolled back from version {e.data.get('from_version')} to "
                             f"{e.data.get('to_version')} after a crash loop" if e.kind == "rollback"
                             else f"version {e.data.get('version')} crash-looped: {e.data.get('action')}"),
                metadata={"ledger_entry": e.seq, "kind": e.kind,
                          **({"serving_version": str(e.data["to_version"])} if e.kind == "rollback" else {})},
            )
            for e in written if e.kind in ("crashloop", "rollback")
        ]
        context.log.info("supervisor_events: recorded " + ", ".join(f"#{e.seq} {e.kind} {e.subject}.{e.env}"
                                                                    for e in written))
        if not observations:
            return dg.SkipReason(f"recorded {len(written)} restart(s) in the ledger")
        return dg.SensorResult(asset_events=observations)

    return supervisor_events


__all__ = ["build_supervisor_events_sensor", "relay_events"]
