"""Relay what the local supervisors did on their own into the ledger, once it is authenticated.

A supervisor restarts a worker that died and replaces a crash-looping version by the one that served
before it without asking anyone (``resources.serving.supervisor``); it writes each of these to its
slot's ``events.jsonl``, every line signed with the slot's secret. ``relay_events`` reads those files
from a byte-offset cursor through ``LocalProcessDeployer.read_events``, which returns only the lines
whose signature verifies: a forged or altered line is refused, counted in the cursor and never
recorded. It records:

* ``restart`` -> a ``restart`` entry (worker, exit_code, version),
* ``crashloop`` -> a ``crashloop`` entry (version, restarts, what the supervisor did about it),
* ``crashloop_rollback_failed`` -> a second ``crashloop`` entry (``action: "rollback_failed"``, why),
* ``artifact_refused`` -> an ``artifact_refused`` entry (a worker found bytes that do not hash to the
  release's digest, and refused to serve them),
* ``supervisor_restarted`` -> a ``supervisor_restarted`` entry (the pid before and now, the workers
  adopted, whether it had to relaunch, seconds without a supervisor); when it relaunched (the supervisor
  and all its workers had died) also an ``outage`` entry (``phase: "began"``), and ``serving_restored`` /
  ``relaunch_failed`` -> an ``outage`` entry with ``phase: "ended"`` / ``"unresolved"``,
* ``crashloop_rollback`` -> handed to the promotion flow (``confirm_supervisor_rollback``), the only
  code that writes ``rollback``/``deploy`` entries or moves an alias: it records the way back only
  when the server really answers with that version, with its registered digest, and that version
  passed its gate there under the policy in force; otherwise it stops the environment and records
  ``serving_stopped`` with why. A signature proves the line came from a process holding the slot's
  secret (the platform's own user, attacker tier (b), can hold it too): the confirmation is what
  keeps such a line from making an ungoverned version serve or an alias move.

The actor is ``supervisor:<slot>``. Every entry carries the event's ``event_id``, and an event whose id
the ledger already holds for that subject and environment is not recorded again, so a reset cursor,
or a tick that failed half way, never records anything twice.

An outage fails the environment's ``served_without_outage`` check (``sensors.serving_health``, declared
non-blocking; ``outage_verdict``): the sensor reports the failed evaluation when it records the entry,
and the check, run on demand, reads the same from the ledger until the next deploy or rollback.

``build_supervisor_events_sensor(org, policy)`` is the ``supervisor_events`` sensor that runs it every
few seconds with the cursor kept as the sensor's cursor (JSON).
"""

from __future__ import annotations

import json
from typing import Any

import dagster as dg

from platform_defs.policy import Policy
from platform_defs.promotion import PromotionError, Services, confirm_relaunch, confirm_supervisor_rollback
from platform_defs.specs import AppSpec, EndpointSpec, Organisation, endpoint_asset_name
from resources.data_store import DataStore
from resources.deployers.base import Target
from resources.deployers.resource import LocalDeployerResource
from resources.ledger import Entry, LedgerResource
from resources.mlflow_registry import MlflowRegistry
from sensors.serving_health import outage_evaluation

RELAYED = ("restart", "crashloop", "crashloop_rollback", "crashloop_rollback_failed", "artifact_refused",
           "supervisor_restarted", "serving_restored", "relaunch_failed")


def _targets(org: Organisation) -> list[tuple[Any, Target]]:
    out: list[tuple[Any, Target]] = []
    for d in org.by_name.values():
        if isinstance(d, EndpointSpec):
            out += [(d, Target(d.name, env, "endpoint", d.ports.get(env))) for env in d.environments]
        elif isinstance(d, AppSpec):
            out += [(d, Target(d.name, env, "app", d.ports.get(env))) for env in d.environments]
    return out


def relay_events(org: Organisation, policy: Policy, services: Services,
                 cursor: dict[str, Any]) -> tuple[list[Entry], dict[str, Any]]:
    """Record the new, authenticated supervisor events of every declared target; returns (entries
    written, new cursor). The cursor maps slot -> ``{"offset": bytes read, "refused": lines refused}``;
    the caller keeps the returned one. An error raised half way (the ledger unreachable) propagates:
    the caller keeps its old cursor, and the events recorded before the error are not recorded again
    next time (their ids are in the ledger)."""
    written: list[Entry] = []
    new_cursor = {k: dict(v) for k, v in cursor.items() if isinstance(v, dict)}
    for spec, target in _targets(org):
        slot = target.slot
        pos = {"offset": 0, "refused": 0, **new_cursor.get(slot, {})}
        try:
            got, offset, refused = _relay_slot(org, policy, spec, target, int(pos["offset"]), services)
        except PromotionError as err:
            # this slot waits for the next tick (its cursor stays; event ids keep what was recorded from
            # being recorded twice); the other slots go on
            services.warn(f"supervisor_events: {slot}: left for the next tick: {err}")
            continue
        written += got
        if got or refused or offset != pos["offset"] or slot in new_cursor:
            new_cursor[slot] = {"offset": offset, "refused": int(pos["refused"]) + refused}
    return written, new_cursor


def _relay_slot(org: Organisation, policy: Policy, spec: Any, target: Target, offset: int,
                services: Services) -> tuple[list[Entry], int, int]:
    ledger = services.ledger
    events, offset, refused = services.deployer.read_events(target, offset)
    written: list[Entry] = []
    seen: set[str] | None = None  # event ids the ledger holds for this target, read when needed
    for event in events:
        if not isinstance(event.get("id"), str) or not event["id"]:
            refused += 1  # a supervisor gives every event an id; without one it cannot be told apart
            continue
        if event.get("event") not in RELAYED:
            continue
        if seen is None:
            seen = {str(e.data.get("event_id")) for e in ledger.entries(subject=target.name, env=target.env)
                    if e.data.get("event_id")}
        event_id = str(event.get("id"))
        if event_id not in seen:
            written += _record(org, policy, spec, target, event, event_id, services)
            seen.add(event_id)
    return written, offset, refused


def _record(org: Organisation, policy: Policy, spec: Any, target: Target, event: dict[str, Any], event_id: str,
            services: Services) -> list[Entry]:
    ledger = services.ledger
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
    if kind == "artifact_refused":
        return [ledger.append("artifact_refused", target.name, {
            **common, "version": _str(event.get("version")), "worker": event.get("worker"),
            "expected_digest": event.get("digest"), "error": event.get("log")},
            actor, env=target.env)]
    if kind == "supervisor_restarted":
        entry = ledger.append("supervisor_restarted", target.name, {
            **common, "version": _str(event.get("version")), "pid": event.get("pid"),
            "previous_pid": event.get("previous_pid"), "adopted_pids": event.get("adopted_pids"),
            "respawned": event.get("respawned"), "stopped_pids": event.get("stopped_pids"),
            "relaunched": bool(event.get("relaunched")), "unsupervised_seconds": event.get("unsupervised_seconds"),
            "detail": event.get("detail")}, actor, env=target.env)
        if not event.get("relaunched"):
            return [entry]
        return [entry, ledger.append("outage", target.name, {
            **common, "version": _str(event.get("version")), "phase": "began",
            "unsupervised_seconds": event.get("unsupervised_seconds"),
            "detail": f"the supervisor (pid {event.get('previous_pid')}) and every worker of version "
                      f"{event.get('version')} were gone: nothing served at the stable address; a new supervisor "
                      "relaunches it"}, actor, env=target.env)]
    if kind in ("serving_restored", "relaunch_failed"):
        restored = kind == "serving_restored"
        written = [ledger.append("outage", target.name, {
            **common, "version": _str(event.get("version")), "phase": "ended" if restored else "unresolved",
            "seconds": event.get("seconds"),
            "detail": f"version {event.get('version')} serves again" if restored
                      else f"relaunching version {event.get('version')} failed, nothing serves: {event.get('reason')}"},
            actor, env=target.env)]
        if restored:  # what it relaunched came from state.json: the flow checks it against the ledger
            written += confirm_relaunch(org, policy, spec, target.env, services=services,
                                        event={**event, "id": event_id}, actor=actor)
        return written
    # crashloop_rollback: the supervisor already serves to_version again; the flow confirms and records it
    # a tick does not wait for a promotion in flight (a bake can hold the lock for minutes): next tick
    return confirm_supervisor_rollback(org, policy, spec, target.env, services=services,
                                       event={**event, "id": event_id}, actor=actor, wait_seconds=0)


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def build_supervisor_events_sensor(org: Organisation, policy: Policy) -> dg.SensorDefinition:
    """The ``supervisor_events`` sensor: ``relay_events`` every 5 s, its cursor kept as the sensor's."""

    @dg.sensor(
        name="supervisor_events",
        description="Records worker restarts, crash loops and the supervisors' automatic rollbacks in the ledger "
                    "(and moves the MLflow alias of an endpoint a supervisor rolled back).",
        minimum_interval_seconds=5,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def supervisor_events(context: dg.SensorEvaluationContext, mlflow: MlflowRegistry,
                          deployer_local: LocalDeployerResource, ledger: LedgerResource, data_store: DataStore):
        cursor = json.loads(context.cursor) if context.cursor else {}
        before = {slot: int(pos.get("refused", 0)) for slot, pos in cursor.items() if isinstance(pos, dict)}
        services = Services(mlflow=mlflow, deployer=deployer_local.deployer(), ledger=ledger.ledger(),
                            data_store=data_store, log=context.log.info, warn=context.log.warning)
        written, new_cursor = relay_events(org, policy, services, cursor)
        context.update_cursor(json.dumps(new_cursor, sort_keys=True))
        for slot, pos in new_cursor.items():
            refused = int(pos.get("refused", 0)) - before.get(slot, 0)
            if refused > 0:
                context.log.warning(f"supervisor_events: refused {refused} line(s) of {slot}/events.jsonl whose "
                                    "signature does not verify (forged, altered, or not an event)")
        if not written:
            return dg.SkipReason("no new supervisor events to record")
        observations = [
            dg.AssetObservation(
                asset_key=dg.AssetKey(endpoint_asset_name(e.subject, e.env or "")),
                description=(f"the supervisor rolled back from version {e.data.get('from_version')} to "
                             f"{e.data.get('to_version')} after a crash loop" if e.kind == "rollback"
                             else str(e.data.get("reason")) if e.kind == "serving_stopped"
                             else str(e.data.get("detail")) if e.kind == "outage"
                             else f"version {e.data.get('version')} crash-looped: {e.data.get('action')}"),
                metadata={"ledger_entry": e.seq, "kind": e.kind,
                          **({"serving_version": str(e.data["to_version"])} if e.kind == "rollback" else {})},
            )
            for e in written if e.kind in ("crashloop", "rollback", "serving_stopped", "outage")
        ]
        context.log.info("supervisor_events: recorded " + ", ".join(f"#{e.seq} {e.kind} {e.subject}.{e.env}"
                                                                    for e in written))
        book = services.ledger
        outaged = sorted({(e.subject, e.env or "") for e in written if e.kind == "outage"})
        observations += [outage_evaluation(book, subject, env) for subject, env in outaged]
        if not observations:
            return dg.SkipReason(f"recorded {len(written)} restart(s) in the ledger")
        return dg.SensorResult(asset_events=observations)

    return supervisor_events


__all__ = ["build_supervisor_events_sensor", "relay_events"]
