"""Platform metrics: DORA-style delivery numbers and governance numbers, from the ledger alone.

:func:`compute_platform_metrics` is pure: ledger entries (plus the registration time of each model
version, which the registry holds) in, :class:`PlatformMetrics` out. Each metric has one written
definition (:data:`DEFINITIONS`) and is ``None`` whenever the ledger cannot support it (nothing to
measure, or a population of zero); ``undefined`` says why. Nothing is estimated or defaulted.

Entries read (kind: subject / data the metrics use):

- ``deploy`` (subject = endpoint or app, env): ``version``, ``model`` (model endpoints), ``owner``,
  ``checks`` (the checks the gate evaluated), ``claims.initiated_by`` (optional: the person the run's tags
  claim started it; unauthenticated),
  ``via`` (``"rollback"`` on the deploy a rollback records after its ``rollback`` entry). Where the
  definitions say *prod deploys* they mean deploys of a change: entries with ``via: rollback``
  re-serve an old version and are left out of every count except where a deploy ends another
  deploy's tenure (change failure) or restores service (time to restore).
- ``promotion_refused`` (env): ``version``, ``model``, ``failed`` (the failed checks, or ``["deploy"]``
  when the deployer, not governance, refused).
- ``gate_verdict`` (env): ``model``, ``version``, ``passed``, ``verdicts`` {check: {passed, summary}}.
- ``rollback`` (env): ``from_version`` (the version taken out), ``to_version``, ``model``.
- ``bake_failed`` (env, optional kind): ``version`` (optional).
- ``crashloop``, ``alias_moved`` (env): incidents.
- ``release_built`` (subject = app, optional kind): ``version`` (the release).

Two entries concern the same *target* when they share the environment and their names meet: an
entry's names are its subject and its model (``data.model``, or the model the ledger's other
entries record for that subject), so a ``crashloop`` of endpoint ``credit_scoring`` and an
``alias_moved`` of model ``credit_risk`` concern the same prod target. Names are unique across
declaration kinds, so an endpoint name and a model name never collide.

Time: every entry's ``ts`` (UTC ISO). The window is ``(now - window_days, now]``; entries after
``now`` are ignored, so a computation "as of" a past time is reproducible.
"""


import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from platform_defs.policy import Policy
from resources.ledger import Entry, LedgerResource
from resources.mlflow_registry import MlflowRegistry

INCIDENT_KINDS = ("bake_failed", "crashloop", "alias_moved")
HOUR = 3600.0
DAY = 86400.0

DEFINITIONS: dict[str, str] = {
    "deployment_frequency_per_day":
        "'deploy' entries in the prod environment with ts in the window, divided by the days observed: the "
        "window, cut at the ledger's first entry when the ledger is younger (undefined when that is under one "
        "day). Rollbacks (and the deploy entry a rollback records, data.via = 'rollback') are not counted.",
    "lead_time_hours":
        "Median over both samples below (model and app changes together).",
    "lead_time_model_hours":
        "Median, over model versions whose first prod 'deploy' falls in the window, of hours from the "
        "version's registration in MLflow (registered_at) to that deploy. Versions without a known "
        "registration time are left out (counted in lead_time_unknown_registration).",
    "lead_time_app_hours":
        "Median, over app releases whose first prod 'deploy' falls in the window, of hours from the "
        "'release_built' entry (same subject, same data.version) to that deploy. Undefined while no "
        "'release_built' entries are recorded.",
    "change_failure_rate":
        "Failed / judged prod deploys in the window. A deploy failed when, within bake_window_hours after it "
        "and before the next deploy of the same target, a 'rollback' with data.from_version equal to its "
        "version or a 'bake_failed' of its version (or naming no version) is recorded for that target. A deploy "
        "is judged once it failed or its bake window has passed; deploys still baking are left out "
        "(deploys_baking).",
    "time_to_restore_hours":
        "Median, over prod incidents starting in the window that were restored, of hours from the incident "
        "to the next 'deploy' or 'rollback' of the same target (both only happen once the restored version "
        "answers its health check). An incident is a 'bake_failed', 'crashloop' or 'alias_moved' entry, "
        "which opens one unless one is already open on that target; a 'rollback' with no open incident is "
        "an incident that started when its from_version was deployed there and is restored by the rollback "
        "itself (a rollback of a version the ledger never saw deployed there has no start and is only "
        "counted). Unrestored incidents are counted (incidents_open), not timed.",
    "validation_to_prod_hours":
        "Median, over model versions whose first prod 'deploy' falls in the window, of hours from the first "
        "'gate_verdict' with passed = true for that model and version (any environment) to that deploy.",
    "model_update_frequency_per_30d":
        "Mean over models that have ever served in prod of (distinct versions with a prod 'deploy' in the "
        "window) / days observed x 30. Per model in model_update_frequency_by_model.",
    "self_service_share":
        "Share of prod deploys in the window not performed by the platform team. The person is the "
        "initiator the run's tags claimed (data.claims.initiated_by: a claim, unauthenticated, counted in "
        "deploys_with_claimed_initiator) when the deploy records one, else the entry's actor; runs record actor "
        "'dagster:<run id>', so an automated deploy with no recorded initiator counts as self-service "
        "(no platform engineer stepped in). Undefined when the platform team has no members listed.",
    "governance_compliance_rate":
        "Compliant / attempted prod deploys in the window. Attempted: every prod 'deploy' and every prod "
        "'promotion_refused' that a check refused (a refusal whose only failure is 'deploy' was the "
        "deployer failing after the gate passed, not a governance event, and is left out). Compliant: a "
        "deploy whose data.checks is non-empty and each of them passed in the latest 'gate_verdict' of the "
        "same target and version recorded before it.",
}


# --------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class PlatformMetrics:
    as_of: str
    window_days: float
    observed_days: float | None
    deployment_frequency_per_day: float | None
    lead_time_hours: float | None
    lead_time_model_hours: float | None
    lead_time_app_hours: float | None
    change_failure_rate: float | None
    time_to_restore_hours: float | None
    validation_to_prod_hours: float | None
    model_update_frequency_per_30d: float | None
    model_update_frequency_by_model: dict[str, float]
    self_service_share: float | None
    governance_compliance_rate: float | None
    counts: dict[str, int]
    undefined: dict[str, str] = field(default_factory=dict)  # metric -> why it is None

    METRICS = ("deployment_frequency_per_day", "lead_time_hours", "lead_time_model_hours", "lead_time_app_hours",
               "change_failure_rate", "time_to_restore_hours", "validation_to_prod_hours",
               "model_update_frequency_per_30d", "self_service_share", "governance_compliance_rate")

    def values(self) -> dict[str, float | None]:
        return {m: getattr(self, m) for m in self.METRICS}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Helpers


def parse_ts(ts: str) -> datetime:
    t = datetime.fromisoformat(ts)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _aware(t: datetime, what: str) -> datetime:
    if t.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (got naive {t.isoformat()})")
    return t


def _names(e: Entry, model_of: Mapping[str, str]) -> set[str]:
    names = {e.subject}
    model = (e.data or {}).get("model") or model_of.get(e.subject)
    if model:
        names.add(str(model))
    return names


def same_target(a: Entry, b: Entry, model_of: Mapping[str, str] | None = None) -> bool:
    """Same environment, and the same endpoint/app or model (``model_of``: endpoint -> model)."""
    model_of = model_of or {}
    return a.env == b.env and bool(_names(a, model_of) & _names(b, model_of))


def _v(x: Any) -> str | None:
    return None if x is None else str(x)


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _hours(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() / HOUR


@dataclass
class _E:
    """An entry with its parsed time."""

    e: Entry
    t: datetime

    @property
    def data(self) -> dict[str, Any]:
        return self.e.data or {}


def _claimed_initiator(e: Entry) -> str | None:
    """The initiator the run's tags claimed (``claims.initiated_by``; older entries: ``initiated_by``):
    unauthenticated, so the metrics built on it say they count claims."""
    data = e.data or {}
    return (data.get("claims") or {}).get("initiated_by") or data.get("initiated_by")


def _person(e: Entry) -> str:
    return str(_claimed_initiator(e) or e.actor)


# --------------------------------------------------------------------------------------------
# The computation


def compute_platform_metrics(
    entries: Iterable[Entry],
    *,
    now: datetime,
    window_days: float = 30,
    bake_window_hours: float = 24,
    prod_env: str = "prod",
    platform_team_members: set[str] | frozenset[str] = frozenset(),
    team_members: Mapping[str, set[str]] | None = None,
    registered_at: Mapping[tuple[str, str], datetime] | None = None,
    validated_at: Mapping[tuple[str, str], datetime] | None = None,
) -> PlatformMetrics:
    """Compute every metric of :data:`DEFINITIONS` as of ``now`` over the last ``window_days``.

    ``registered_at``: ``{(model, version): registration time}`` (from MLflow). ``validated_at``:
    overrides the first all-passed gate verdict per ``(model, version)`` when given. ``team_members``:
    ``{team: members}``, used to split self-service deploys into the owning team's and others'.
    """
    now = _aware(now, "now")
    if window_days <= 0:
        raise ValueError(f"window_days must be positive, got {window_days}")
    registered_at = {(str(m), str(v)): _aware(t, f"registered_at[{m}, {v}]")
                     for (m, v), t in (registered_at or {}).items()}
    team_members = team_members or {}
    start = now - timedelta(days=window_days)
    bake = timedelta(hours=bake_window_hours)

    all_ = sorted((_E(e, parse_ts(e.ts)) for e in entries), key=lambda x: x.e.seq)
    all_ = [x for x in all_ if x.t <= now]
    model_of = {x.e.subject: str(x.data["model"]) for x in all_ if x.data.get("model")}

    def same(a: Entry, b: Entry) -> bool:
        return same_target(a, b, model_of)

    in_window = [x for x in all_ if x.t > start]
    prod = [x for x in all_ if x.e.env == prod_env]
    prod_deploys_all = [x for x in prod if x.e.kind == "deploy"]  # every version that started serving
    changes_all = [x for x in prod_deploys_all if x.data.get("via") != "rollback"]  # deploys of a change
    prod_deploys = [x for x in changes_all if x.t > start]
    undefined: dict[str, str] = {}
    counts: dict[str, int] = {"ledger_entries": len(all_), "entries_in_window": len(in_window),
                              "prod_deploys": len(prod_deploys),
                              "prod_rollback_redeploys": sum(1 for x in prod_deploys_all
                                                             if x.t > start and x.data.get("via") == "rollback")}

    # -- observed span ----------------------------------------------------------------------
    observed_days: float | None = None
    if all_:
        first = min(x.t for x in all_)
        observed_days = (now - max(start, first)).total_seconds() / DAY
    if observed_days is None or observed_days < 1:
        observed_ok = False
        why_span = ("the ledger is empty" if observed_days is None
                    else f"the ledger covers {observed_days * 24:.1f} h, under one day")
    else:
        observed_ok, why_span = True, ""

    # -- deployment frequency ---------------------------------------------------------------
    deployment_frequency = len(prod_deploys) / observed_days if observed_ok and observed_days else None
    if deployment_frequency is None:
        undefined["deployment_frequency_per_day"] = why_span

    # -- first prod deploy of each version -------------------------------------------------
    first_prod: dict[tuple[str, str, str], _E] = {}  # (kind, name, version) -> first prod deploy
    for x in changes_all:
        model = x.data.get("model")
        key = ("model", str(model), str(x.data.get("version"))) if model else \
              ("app", x.e.subject, str(x.data.get("version")))
        first_prod.setdefault(key, x)
    first_in_window = {k: x for k, x in first_prod.items() if x.t > start}

    # -- lead time --------------------------------------------------------------------------
    model_leads, app_leads = [], []
    unknown_reg = 0
    builds: dict[tuple[str, str], datetime] = {}
    for x in all_:
        if x.e.kind == "release_built" and x.data.get("version") is not None:
            builds.setdefault((x.e.subject, str(x.data["version"])), x.t)
    for (kind, name, version), x in first_in_window.items():
        if kind == "model":
            reg = registered_at.get((name, version))
            if reg is None or reg > x.t:
                unknown_reg += 1
                continue
            model_leads.append(_hours(reg, x.t))
        else:
            built = builds.get((name, version))
            if built is not None and built <= x.t:
                app_leads.append(_hours(built, x.t))
    counts.update(lead_time_model_samples=len(model_leads), lead_time_app_samples=len(app_leads),
                  lead_time_unknown_registration=unknown_reg)
    lead_model, lead_app = _median(model_leads), _median(app_leads)
    lead_all = _median(model_leads + app_leads)
    if lead_model is None:
        undefined["lead_time_model_hours"] = ("no model version reached prod in the window" if not any(
            k[0] == "model" for k in first_in_window) else "no registration time known for the versions that did")
    if lead_app is None:
        undefined["lead_time_app_hours"] = ("no 'release_built' entries are recorded" if not builds
                                            else "no built app release reached prod in the window")
    if lead_all is None:
        undefined["lead_time_hours"] = "neither a model nor an app lead time is defined"

    # -- change failure rate ----------------------------------------------------------------
    failed, judged, baking = 0, 0, 0
    for x in prod_deploys:
        nxt = next((y for y in prod_deploys_all if y.e.seq > x.e.seq and same(x.e, y.e)), None)
        until = x.t + bake
        if nxt is not None and nxt.t < until:
            until = nxt.t
        version = str(x.data.get("version"))
        is_failed = False
        for y in prod:
            if y.e.seq <= x.e.seq or y.t > until or (nxt is not None and y.e.seq > nxt.e.seq):
                continue
            if not same(x.e, y.e):
                continue
            if y.e.kind == "rollback" and _v(y.data.get("from_version")) == version:
                is_failed = True
            elif y.e.kind == "bake_failed" and _v(y.data.get("version")) in (None, version):
                is_failed = True
        if is_failed:
            failed += 1
            judged += 1
        elif now >= x.t + bake or nxt is not None:
            judged += 1  # its bake window passed (or another deploy replaced it) without a failure
        else:
            baking += 1
    counts.update(failed_deploys=failed, judged_deploys=judged, deploys_baking=baking)
    cfr = failed / judged if judged else None
    if cfr is None:
        undefined["change_failure_rate"] = ("no prod deploy in the window" if not prod_deploys
                                            else "every prod deploy in the window is still in its bake window")

    # -- time to restore --------------------------------------------------------------------
    restore_times: list[float] = []
    incidents, open_incidents, untimed = 0, 0, 0
    open_: list[_E] = []  # open incidents (their opening entries)
    for y in prod:
        kind = y.e.kind
        if kind in INCIDENT_KINDS:
            if not any(same(o.e, y.e) for o in open_):
                open_.append(y)
            continue
        if kind not in ("deploy", "rollback"):
            continue
        closed = [o for o in open_ if same(o.e, y.e)]
        for o in closed:
            open_.remove(o)
            if o.t > start:
                incidents += 1
                restore_times.append(_hours(o.t, y.t))
        if kind == "rollback" and not closed:
            # a rollback nobody signalled: the failed change began when from_version was deployed here
            bad = [d for d in prod_deploys_all if d.e.seq < y.e.seq and same(d.e, y.e)
                   and _v(d.data.get("version")) == _v(y.data.get("from_version"))]
            if not bad:
                untimed += 1  # the version it took out was never deployed here per the ledger: no start
            elif bad[-1].t > start:
                incidents += 1
                restore_times.append(_hours(bad[-1].t, y.t))
    for o in open_:
        if o.t > start:
            incidents += 1
            open_incidents += 1
    counts.update(incidents=incidents, incidents_restored=len(restore_times), incidents_open=open_incidents,
                  rollbacks_without_known_deploy=untimed)
    ttr = _median(restore_times)
    if ttr is None:
        undefined["time_to_restore_hours"] = ("no prod incident in the window" if not incidents
                                              else "no prod incident in the window has been restored yet")

    # -- validation to prod -----------------------------------------------------------------
    validated: dict[tuple[str, str], datetime] = {}
    for x in all_:
        if x.e.kind == "gate_verdict" and x.data.get("passed") is True and x.data.get("model"):
            validated.setdefault((str(x.data["model"]), str(x.data.get("version"))), x.t)
    for k, t in (validated_at or {}).items():
        validated[(str(k[0]), str(k[1]))] = _aware(t, f"validated_at[{k}]")
    v2p = []
    for (kind, name, version), x in first_in_window.items():
        t = validated.get((name, version)) if kind == "model" else None
        if t is not None and t <= x.t:
            v2p.append(_hours(t, x.t))
    counts["validation_to_prod_samples"] = len(v2p)
    validation_to_prod = _median(v2p)
    if validation_to_prod is None:
        undefined["validation_to_prod_hours"] = ("no model version reached prod in the window" if not any(
            k[0] == "model" for k in first_in_window) else "no passing gate verdict precedes those deploys")

    # -- model update frequency ------------------------------------------------------------
    models = sorted({str(x.data["model"]) for x in prod_deploys_all if x.data.get("model")})
    by_model: dict[str, float] = {}
    if models and observed_ok and observed_days:
        for m in models:
            versions = {str(x.data.get("version")) for x in prod_deploys if x.data.get("model") == m}
            by_model[m] = len(versions) / observed_days * 30
    update_freq = statistics.fmean(by_model.values()) if by_model else None
    counts["models_in_prod"] = len(models)
    if update_freq is None:
        undefined["model_update_frequency_per_30d"] = why_span if not observed_ok else "no model has served in prod"

    # -- self-service share ----------------------------------------------------------------
    platform = set(platform_team_members)
    by_platform = sum(1 for x in prod_deploys if _person(x.e) in platform)
    by_owner = sum(1 for x in prod_deploys
                   if _person(x.e) in team_members.get(str(x.data.get("owner")), set()))
    automated = sum(1 for x in prod_deploys if not _claimed_initiator(x.e) and x.e.actor.startswith("dagster:"))
    claimed = sum(1 for x in prod_deploys if _claimed_initiator(x.e))
    counts.update(deploys_by_platform_team=by_platform, deploys_by_owning_team=by_owner,
                  deploys_automated_no_initiator=automated, deploys_with_claimed_initiator=claimed)
    if not platform:
        self_service = None
        undefined["self_service_share"] = "the platform team has no members listed"
    elif not prod_deploys:
        self_service = None
        undefined["self_service_share"] = "no prod deploy in the window"
    else:
        self_service = (len(prod_deploys) - by_platform) / len(prod_deploys)

    # -- governance compliance --------------------------------------------------------------
    compliant = 0
    for x in prod_deploys:
        checks = list(x.data.get("checks") or [])
        version = str(x.data.get("version"))
        verdict = None
        for y in prod:
            if y.e.seq >= x.e.seq:
                break
            if y.e.kind == "gate_verdict" and same(x.e, y.e) and _v(y.data.get("version")) == version:
                verdict = y
        if verdict is None or not checks:
            continue
        results = verdict.data.get("verdicts") or {}
        if all((results.get(c) or {}).get("passed") is True for c in checks):
            compliant += 1
    refused = [x for x in prod if x.e.kind == "promotion_refused" and x.t > start]
    governance_refused = [x for x in refused if list(x.data.get("failed") or []) != ["deploy"]]
    attempted = len(prod_deploys) + len(governance_refused)
    counts.update(attempted_prod_deploys=attempted, compliant_prod_deploys=compliant,
                  refused_prod_promotions=len(governance_refused),
                  deployer_failures=len(refused) - len(governance_refused))
    compliance = compliant / attempted if attempted else None
    if compliance is None:
        undefined["governance_compliance_rate"] = "no prod deploy was attempted in the window"

    return PlatformMetrics(
        as_of=now.isoformat(), window_days=float(window_days), observed_days=observed_days,
        deployment_frequency_per_day=deployment_frequency,
        lead_time_hours=lead_all, lead_time_model_hours=lead_model, lead_time_app_hours=lead_app,
        change_failure_rate=cfr, time_to_restore_hours=ttr, validation_to_prod_hours=validation_to_prod,
        model_update_frequency_per_30d=update_freq, model_update_frequency_by_model=by_model,
        self_service_share=self_service, governance_compliance_rate=compliance,
        counts=counts, undefined=undefined,
    )


# --------------------------------------------------------------------------------------------
# Markdown


def _fmt(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.3f}"


def definitions_markdown(m: PlatformMetrics) -> str:
    lines = [f"Platform metrics as of {m.as_of}, window {m.window_days:g} days "
             f"(observed {_fmt(m.observed_days)} days), computed from the ledger only.", "",
             "| metric | value | definition |", "|---|---:|---|"]
    for name in m.METRICS:
        value = getattr(m, name)
        shown = _fmt(value) if value is not None else f"undefined: {m.undefined.get(name, '')}"
        lines.append(f"| {name} | {shown.replace('|', '/')} | {DEFINITIONS[name]} |")
    lines += ["", "| count | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in m.counts.items()]
    if m.model_update_frequency_by_model:
        lines += ["", "| model | versions to prod per 30 days |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in sorted(m.model_update_frequency_by_model.items())]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The asset


class PlatformMetricsConfig(dg.Config):
    as_of: str | None = Field(None, description="Compute as of this UTC ISO time (default: now). Entries "
                                                "after it are ignored, so a past value can be recomputed.")
    window_days: float = Field(30, gt=0, description="Length of the window, in days.")
    bake_window_hours: float = Field(24, ge=0, description="How long after a deploy a rollback or failed bake "
                                                           "counts against it.")
    prod_env: str = Field("prod", description="The production environment's name.")


def registration_times(mlflow: MlflowRegistry, entries: Iterable[Entry],
                       prod_env: str = "prod") -> tuple[dict[tuple[str, str], datetime], list[str]]:
    """MLflow creation time of every model version a prod deploy names; and versions MLflow no longer has."""
    from mlflow.exceptions import MlflowException

    wanted = sorted({(str(e.data["model"]), str(e.data.get("version"))) for e in entries
                     if e.kind == "deploy" and e.env == prod_env and (e.data or {}).get("model")})
    out: dict[tuple[str, str], datetime] = {}
    missing: list[str] = []
    client = mlflow.client() if wanted else None
    for model, version in wanted:
        try:
            mv = client.get_model_version(model, version)
        except MlflowException:
            missing.append(f"{model} v{version}")
            continue
        if mv.creation_timestamp is not None:
            out[(model, version)] = datetime.fromtimestamp(int(mv.creation_timestamp) / 1000, tz=UTC)
    return out, missing


def build_platform_metrics_asset(policy: Policy) -> dg.AssetsDefinition:
    platform = frozenset(policy.teams[policy.platform_team].members) if policy.platform_team in policy.teams \
        else frozenset()
    teams = {name: set(t.members) for name, t in policy.teams.items()}

    @dg.asset(
        key="platform_metrics",
        group_name="platform",
        kinds={"metrics"},
        description="Delivery and governance metrics of the whole platform (deployment frequency, lead time, "
                    "change failure rate, time to restore, validation-to-prod, model update frequency, "
                    "self-service share, governance compliance), computed from the ledger alone. Numeric "
                    "metadata per metric, plotted over time; undefined metrics are listed, never guessed.",
        owners=[f"team:{policy.platform_team}"],
        tags={"onepath/kind": "metrics"},
    )
    def platform_metrics(context: dg.AssetExecutionContext, config: PlatformMetricsConfig,
                         ledger: LedgerResource, mlflow: MlflowRegistry) -> dg.MaterializeResult:
        now = parse_ts(config.as_of) if config.as_of else datetime.now(UTC)
        entries = ledger.ledger().entries()
        registered, missing = registration_times(mlflow, entries, config.prod_env)
        if missing:
            context.log.warning(f"MLflow has no record of {len(missing)} deployed version(s): {', '.join(missing)}")
        m = compute_platform_metrics(
            entries, now=now, window_days=config.window_days, bake_window_hours=config.bake_window_hours,
            prod_env=config.prod_env, platform_team_members=platform, team_members=teams,
            registered_at=registered)
        metadata: dict[str, Any] = {}
        for name, value in m.values().items():
            if value is not None:
                metadata[name] = dg.MetadataValue.float(float(value))
        for name, value in m.counts.items():
            metadata[f"count_{name}"] = dg.MetadataValue.int(int(value))
        if m.observed_days is not None:
            metadata["observed_days"] = dg.MetadataValue.float(float(m.observed_days))
        metadata["undefined"] = dg.MetadataValue.md(
            "\n".join(f"- **{k}**: {v}" for k, v in m.undefined.items()) or "none: every metric is defined")
        metadata["definitions"] = dg.MetadataValue.md(definitions_markdown(m))
        metadata["as_of"] = m.as_of
        context.log.info("platform metrics: " + ", ".join(f"{k}={_fmt(v)}" for k, v in m.values().items()))
        return dg.MaterializeResult(metadata=metadata)

    return platform_metrics


def build_platform_metrics_schedule(cron: str = "0 * * * *") -> dg.ScheduleDefinition:
    """Materialize ``platform_metrics`` on a cron (hourly by default) so its metadata plots over time."""
    return dg.ScheduleDefinition(name="platform_metrics_schedule", cron_schedule=cron,
                                 target=dg.AssetSelection.assets("platform_metrics"),
                                 default_status=dg.DefaultScheduleStatus.RUNNING)


__all__ = ["PlatformMetrics", "DEFINITIONS", "compute_platform_metrics", "definitions_markdown",
           "build_platform_metrics_asset", "build_platform_metrics_schedule", "registration_times",
           "PlatformMetricsConfig", "same_target", "parse_ts"]
