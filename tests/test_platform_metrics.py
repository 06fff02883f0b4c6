"""Platform metrics from a real ledger: each metric on a scenario with known answers, the cases where a
metric is undefined, and the asset materialized with real resources (ledger on tmp, MLflow on sqlite).

Entries are appended to a real :class:`~resources.ledger.Ledger`; their timestamps come from a
controlled clock (the ledger's own ``_utc_now``, patched), so a scenario spans days without any
waiting, and the chain still verifies (the hashes cover the planted times).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

import resources.ledger as ledger_mod
from platform_defs.platform_metrics import (
    DEFINITIONS,
    PlatformMetrics,
    build_platform_metrics_asset,
    build_platform_metrics_schedule,
    compute_platform_metrics,
)
from platform_defs.policy import Policy
from resources.ledger import Ledger, LedgerResource

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=10)
PLATFORM = {"pat"}
TEAMS = {"credit-risk": {"carla"}, "model-risk": {"mira"}, "platform": {"pat"}, "retention": {"ravi"}}
EP, MODEL, OWNER = "credit_scoring", "credit_risk", "credit-risk"
CHECKS = ["data_quality", "performance", "fairness", "approval"]


def h(hours: float) -> timedelta:
    return timedelta(hours=hours)


def d(days: float) -> timedelta:
    return timedelta(days=days)


class Book:
    """A real ledger on tmp whose entries are stamped with chosen times."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        self.ledger = Ledger(tmp / "l.db", tmp / "keys" / "p.key")
        self.db, self.key = tmp / "l.db", tmp / "keys" / "p.key"
        self._at: datetime | None = None
        monkeypatch.setattr(ledger_mod, "_utc_now", self._now)

    def _now(self) -> str:
        assert self._at is not None, "every test entry names its time"
        return self._at.isoformat(timespec="microseconds")

    def add(self, at: datetime, kind: str, subject: str, data: dict, actor: str = "dagster:run", env: str | None = "prod"):
        self._at = at
        entry = self.ledger.append(kind, subject, data, actor, env=env)
        assert entry.ts == at.isoformat(timespec="microseconds")  # the clock really was used
        return entry

    # the shapes the endpoint asset writes
    def gate(self, at, version, env="prod", passed=True, failed=(), ep=EP, model=MODEL):
        verdicts = {c: {"passed": c not in failed, "summary": "x"} for c in CHECKS}
        return self.add(at, "gate_verdict", ep, {"model": model, "version": version, "passed": passed and not failed,
                                                 "verdicts": verdicts}, env=env)

    def deploy(self, at, version, env="prod", initiated_by=None, actor="dagster:run", ep=EP, model=MODEL,
               owner=OWNER, checks=CHECKS, previous=None):
        data = {"model": model, "version": version, "previous_version": previous, "address": "http://x",
                "promoted_from": "staging", "track": "ml-high-risk", "owner": owner, "checks": list(checks)}
        if initiated_by:  # what the promotion flow records from the run's tags: a claim
            data["claims"] = {"trigger": "manual run", "initiated_by": initiated_by,
                              "from": "dagster run tags (unauthenticated)"}
        return self.add(at, "deploy", ep, data, actor=actor, env=env)

    def refused(self, at, version, failed, env="prod", ep=EP, model=MODEL):
        return self.add(at, "promotion_refused", ep, {"model": model, "version": version, "still_serving": "1",
                                                      "failed": list(failed)}, env=env)

    def rollback(self, at, from_version, to_version, env="prod", ep=EP, model=MODEL):
        """What platform_defs.rollback records: the rollback, then the deploy of the restored version."""
        rb = self.add(at, "rollback", ep, {"model": model, "from_version": from_version, "to_version": to_version,
                                           "reason": "test"}, actor="pat", env=env)
        self.add(at, "deploy", ep, {"model": model, "version": to_version, "previous_version": from_version,
                                    "owner": OWNER, "checks": CHECKS, "via": "rollback", "rollback_entry": rb.seq},
                 actor="pat", env=env)
        return rb

    def entries(self):
        return self.ledger.entries()


@pytest.fixture
def book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Book:
    return Book(tmp_path, monkeypatch)


def compute(book: Book, **kw) -> PlatformMetrics:
    args = {"now": NOW, "platform_team_members": PLATFORM, "team_members": TEAMS, **kw}
    return compute_platform_metrics(book.entries(), **args)


def delivery_scenario(book: Book) -> dict[tuple[str, str], datetime]:
    """Ten days, four prod deploys of credit_risk (v1..v4), one rolled back an hour after it went out.

    Returns registration times (v4's is unknown).
    """
    book.gate(T0, "1", env="staging")                                    # first entry: the ledger starts here
    book.gate(T0 + h(1), "1")
    book.deploy(T0 + h(2), "1", initiated_by="carla")                  # D1: owning team
    book.gate(T0 + d(3) - h(1), "2", env="staging")
    book.gate(T0 + d(3) - h(0.5), "2")
    book.deploy(T0 + d(3), "2", initiated_by="pat", previous="1")      # D2: platform team
    book.rollback(T0 + d(3) + h(1), "2", "1")                          # D2 failed, restored after 1 h
    book.gate(T0 + d(5) - h(3), "3", env="staging")                    # v3: no prod gate verdict at all
    book.deploy(T0 + d(5), "3", previous="1")                          # D3: automation, no initiator
    book.add(T0 + d(6), "crashloop", EP, {"version": "3", "restarts": 5})   # incident, 25 h after D3
    book.rollback(T0 + d(6) + h(3), "3", "1")                          # restores it, outside D3's bake window
    book.add(T0 + d(7), "crashloop", EP, {"version": "1"}, env="staging")   # staging: not a prod incident
    book.gate(T0 + d(8) - h(0.5), "4")
    book.deploy(T0 + d(8), "4", initiated_by="mira", previous="1")     # D4: another team (not platform)
    book.refused(T0 + d(9), "5", ["approval"])                         # governance refused: attempted
    book.refused(T0 + d(9) + h(1), "4", ["deploy"])                    # deployer failure: not governance
    return {(MODEL, "1"): T0 - h(2), (MODEL, "2"): T0 + d(3) - h(10), (MODEL, "3"): T0 + d(5) - h(6)}


def test_delivery_scenario_has_known_answers(book):
    registered = delivery_scenario(book)
    assert book.ledger.verify().ok  # planted times are part of a valid chain
    m = compute(book, registered_at=registered)

    assert m.counts["prod_deploys"] == 4 and m.counts["prod_rollback_redeploys"] == 2
    assert m.observed_days == pytest.approx(10)
    assert m.deployment_frequency_per_day == pytest.approx(0.4)
    # CFR: only D2 was rolled back within the 24 h bake window (D3's rollback came 27 h later)
    assert m.counts["failed_deploys"] == 1 and m.counts["judged_deploys"] == 4
    assert m.change_failure_rate == pytest.approx(0.25)
    # lead time: 4 h (v1), 10 h (v2), 6 h (v3); v4 has no registration time
    assert m.lead_time_model_hours == pytest.approx(6)
    assert m.lead_time_hours == pytest.approx(6)
    assert m.counts["lead_time_unknown_registration"] == 1
    assert m.lead_time_app_hours is None and "release_built" in m.undefined["lead_time_app_hours"]
    # validation -> prod: 2 h (v1 from its staging verdict), 1 h, 3 h, 0.5 h
    assert m.validation_to_prod_hours == pytest.approx(1.5)
    # restore: the unsignalled rollback of v2 (1 h after it went out), the crashloop (3 h)
    assert m.counts["incidents"] == 2 and m.counts["incidents_open"] == 0
    assert m.time_to_restore_hours == pytest.approx(2.0)
    # four versions of one model reached prod in 10 observed days
    assert m.model_update_frequency_by_model == {MODEL: pytest.approx(12.0)}
    assert m.model_update_frequency_per_30d == pytest.approx(12.0)
    # self-service: carla (owner), automation, mira count; pat does not
    assert m.self_service_share == pytest.approx(0.75)
    assert (m.counts["deploys_by_platform_team"], m.counts["deploys_by_owning_team"],
            m.counts["deploys_automated_no_initiator"]) == (1, 1, 1)
    # compliance: D1, D2, D4 passed every listed check; D3 has no gate verdict; the approval refusal
    # is an attempt; the deployer failure is not a governance event
    assert m.counts["attempted_prod_deploys"] == 5 and m.counts["compliant_prod_deploys"] == 3
    assert m.counts["deployer_failures"] == 1
    assert m.governance_compliance_rate == pytest.approx(0.6)
    assert set(m.undefined) == {"lead_time_app_hours"}
    assert set(DEFINITIONS) == set(m.METRICS)


def test_a_refused_promotion_lowers_compliance(book):
    book.gate(T0, "1")
    book.deploy(T0 + h(1), "1")
    assert compute(book).governance_compliance_rate == pytest.approx(1.0)
    book.gate(T0 + d(1), "2", failed=["fairness"])
    book.refused(T0 + d(1) + h(0.1), "2", ["fairness"])
    assert compute(book).governance_compliance_rate == pytest.approx(0.5)


def test_a_deploy_is_compliant_only_if_every_listed_check_passed_for_that_version(book):
    book.gate(T0, "1", failed=["approval"])          # a verdict with a failed check...
    book.deploy(T0 + h(1), "1")                     # ...recorded before a deploy that lists it
    book.gate(T0 + h(2), "2")                       # a passing verdict of another version
    book.deploy(T0 + h(3), "3")                     # does not cover version 3
    book.gate(T0 + h(4), "4")
    book.deploy(T0 + h(5), "4", checks=[])          # a deploy listing no checks demonstrates nothing
    book.gate(T0 + h(6), "6", env="staging")        # staging's verdict does not cover prod
    book.deploy(T0 + h(7), "6")
    book.gate(T0 + h(8), "7")
    book.deploy(T0 + h(9), "7")
    m = compute(book)
    assert (m.counts["compliant_prod_deploys"], m.counts["attempted_prod_deploys"]) == (1, 5)
    assert m.governance_compliance_rate == pytest.approx(0.2)


def test_change_failure_window_target_and_baking(book):
    book.deploy(T0, "1")
    book.rollback(T0 + h(25), "1", "0")                                     # 25 h later: outside the bake window
    book.deploy(T0 + d(2), "2")
    book.rollback(T0 + d(2) + h(1), "2", "1", ep="churn_scoring", model="churn")  # another target
    book.rollback(T0 + d(2) + h(2), "9", "1")                               # another version
    book.deploy(T0 + d(4), "3")
    book.add(T0 + d(4) + h(5), "bake_failed", EP, {"model": MODEL, "version": "3"})   # failed bake
    book.deploy(T0 + d(6), "4", env="staging")                              # not prod
    book.deploy(NOW - h(2), "5")                                           # still baking
    m = compute(book)
    assert (m.counts["failed_deploys"], m.counts["judged_deploys"], m.counts["deploys_baking"]) == (1, 3, 1)
    assert m.change_failure_rate == pytest.approx(1 / 3)
    # a shorter bake window judges the last one too, and nothing changes for the rest
    m = compute(book, bake_window_hours=1)
    assert (m.counts["failed_deploys"], m.counts["judged_deploys"]) == (0, 4)
    assert m.change_failure_rate == 0.0


def test_time_to_restore_counts_open_incidents_without_timing_them(book):
    book.deploy(T0, "1")
    book.add(T0 + d(1), "alias_moved", MODEL, {"model": MODEL, "alias": "prod", "expected": "1", "actual": "2"})
    book.add(T0 + d(1) + h(1), "crashloop", EP, {"version": "1"})   # same target, already open: one incident
    book.deploy(T0 + d(1) + h(4), "2")                               # restores after 4 h
    book.add(T0 + d(2), "crashloop", EP, {"version": "2"})           # never restored
    m = compute(book)
    assert (m.counts["incidents"], m.counts["incidents_restored"], m.counts["incidents_open"]) == (2, 1, 1)
    assert m.time_to_restore_hours == pytest.approx(4.0)


def test_app_lead_time_comes_from_release_built_entries(book):
    book.add(T0, "release_built", "loan_portal", {"version": "r-aaa"}, env=None)
    book.add(T0 + h(1), "deploy", "loan_portal", {"version": "r-aaa"}, env="staging")
    book.add(T0 + h(5), "deploy", "loan_portal", {"version": "r-aaa"})
    book.add(T0 + d(1), "deploy", "loan_portal", {"version": "r-aaa"})       # a redeploy: not a new lead time
    book.gate(T0 + d(2), "1")
    book.deploy(T0 + d(2) + h(1), "1")
    m = compute(book, registered_at={(MODEL, "1"): T0 + d(2) - h(2)})
    assert m.lead_time_app_hours == pytest.approx(5.0)
    assert m.lead_time_model_hours == pytest.approx(3.0)
    assert m.lead_time_hours == pytest.approx(4.0)
    assert m.counts["lead_time_app_samples"] == 1


def test_window_excludes_old_deploys_and_later_entries(book):
    registered = delivery_scenario(book)
    m = compute(book, registered_at=registered, now=T0 + d(10), window_days=4)   # (day 6, day 10]
    assert m.counts["prod_deploys"] == 1                      # D4 only
    assert m.deployment_frequency_per_day == pytest.approx(0.25)
    assert m.lead_time_model_hours is None                    # v4's registration is unknown
    assert m.undefined["lead_time_model_hours"] == "no registration time known for the versions that did"
    m = compute(book, registered_at=registered, now=T0 + d(4))  # as of day 4: D3 and D4 had not happened
    assert m.counts["prod_deploys"] == 2
    assert m.lead_time_model_hours == pytest.approx(7.0)


def test_undefined_metrics_are_none_with_a_reason(book):
    empty = compute(book)
    assert all(v is None for v in empty.values().values())
    assert set(empty.undefined) == set(empty.METRICS)
    assert empty.undefined["deployment_frequency_per_day"] == "the ledger is empty"

    book.deploy(NOW - h(5), "1", env="staging")      # a ledger only hours old
    young = compute(book)
    assert young.deployment_frequency_per_day is None
    assert "under one day" in young.undefined["deployment_frequency_per_day"]

    book.deploy(NOW - d(3), "1", env="staging")      # older now, but nothing in prod
    staging_only = compute(book)
    assert staging_only.deployment_frequency_per_day == 0.0   # measured: zero prod deploys in 3 days
    for name in ("change_failure_rate", "governance_compliance_rate", "self_service_share",
                 "time_to_restore_hours", "validation_to_prod_hours", "lead_time_hours",
                 "model_update_frequency_per_30d"):
        assert getattr(staging_only, name) is None, name
        assert staging_only.undefined[name], name


def test_self_service_is_undefined_without_a_platform_team(book):
    book.deploy(T0, "1")
    m = compute(book, platform_team_members=set())
    assert m.self_service_share is None
    assert m.undefined["self_service_share"] == "the platform team has no members listed"
    assert compute(book).self_service_share == 1.0


def test_now_must_be_timezone_aware(book):
    with pytest.raises(ValueError, match="timezone-aware"):
        compute(book, now=datetime(2025, 3, 1))


# -- the asset ----------------------------------------------------------------------------------


def small_policy() -> Policy:
    return Policy.model_validate({
        "platform_team": "platform",
        "tracks": {"app": {"checks": ["security_scan"]}, "ml-standard": {"checks": ["performance"]},
                   "ml-high-risk": {"checks": ["performance", "approval"]}},
        "teams": {"platform": {"members": ["pat"]}, "credit-risk": {"members": ["carla"]}},
    })


def registry(settings):
    from resources.mlflow_registry import MlflowRegistry

    return MlflowRegistry(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri,
                          artifact_root=str(settings.mlflow_artifact_root), ui_url=settings.mlflow_ui_url,
                          cache_dir=str(settings.releases_dir / "models"))


def register_version(mlflow, model: str) -> tuple[str, datetime]:
    """A real registered version (a run with a metric); returns its version and creation time."""
    client = mlflow.client()
    exp = mlflow.experiment_id(f"onepath-test/{model}")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "roc_auc", 0.8)
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    mv = client.create_model_version(model, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return str(mv.version), datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC)


def test_asset_materializes_numeric_metadata_with_real_resources(settings, book):
    mlflow = registry(settings)
    model = "metrics_asset_model"
    version, created = register_version(mlflow, model)
    book.gate(created + h(1), version, ep="metrics_ep", model=model)
    book.deploy(created + h(3), version, ep="metrics_ep", model=model, initiated_by="carla")
    book.refused(created + h(4), "99", ["approval"], ep="metrics_ep", model=model)
    as_of = created + d(2)

    asset = build_platform_metrics_asset(small_policy())
    assert asset.key == dg.AssetKey("platform_metrics")
    assert asset.group_names_by_key[asset.key] == "platform"
    resources = {"ledger": LedgerResource(location=str(book.db), key_path=str(book.key)), "mlflow": mlflow}
    defs = dg.Definitions(assets=[asset], schedules=[build_platform_metrics_schedule()], resources=resources)
    dg.Definitions.validate_loadable(defs)
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], resources=resources, instance=instance, run_config={
            "ops": {"platform_metrics": {"config": {"as_of": as_of.isoformat()}}}})
    assert result.success
    meta = result.asset_materializations_for_node("platform_metrics")[0].metadata

    def num(key):
        value = meta[key]
        assert isinstance(value, dg.FloatMetadataValue), (key, value)
        return value.value

    assert num("lead_time_model_hours") == pytest.approx(3.0, abs=1e-6)   # registration read from MLflow
    assert num("validation_to_prod_hours") == pytest.approx(2.0)
    assert num("governance_compliance_rate") == pytest.approx(0.5)
    assert num("self_service_share") == pytest.approx(1.0)
    assert num("deployment_frequency_per_day") == pytest.approx(1 / (2 - 1 / 24))  # 1 deploy; ledger 47 h old
    assert num("change_failure_rate") == 0.0
    assert isinstance(meta["count_prod_deploys"], dg.IntMetadataValue) and meta["count_prod_deploys"].value == 1
    # undefined ones are absent as numbers and named in text
    for missing in ("time_to_restore_hours", "lead_time_app_hours"):
        assert missing not in meta
        assert missing in meta["undefined"].value
    assert "| change_failure_rate |" in meta["definitions"].value
