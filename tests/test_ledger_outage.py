"""The ledger's PostgreSQL goes away in the middle of a promotion: traffic never stays on a version the ledger
does not record. A real world (churn materialized, real endpoint processes, the ledger on a PostgreSQL server of
this module's own, which the tests stop and start) and the real deployer, of which one step is wrapped to stop
the server at the moment named."""

from __future__ import annotations

import dataclasses
import shutil

import dagster as dg
import pytest

from platform_defs.definitions import build_definitions
from platform_defs.promotion import PromotionError, Services, endpoint_target, promote_endpoint, resolve_endpoint
from platform_defs.wiring import build_resources
from resources.deployers.base import serving_version
from tests.conftest import isolated_settings, quick_policy, record_policy
from tests.stores import start_postgres
from tests.test_promotion_flow import materialize, newer_data


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    """churn v1 serving staging, v2 registered and not deployed; the ledger on this module's PostgreSQL."""
    server = start_postgres()
    try:
        s = dataclasses.replace(isolated_settings(settings, tmp_path_factory.mktemp("outage_home"), port_offset=210),
                                ledger_url=server.create_database("outage"))
        policy = quick_policy()
        defs = build_definitions(settings=s, policy=policy)
        resources = build_resources(s)
        book = resources["ledger"].ledger()
        assert book.store.dialect == "postgresql"
        record_policy(book, policy)
        with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("outage_instance"))) as instance:
            materialize(defs, instance, ["customer_activity", "churn", "churn_scoring_staging"])
            materialize(defs, instance, ["customer_activity", "churn"], newer_data("2026-09-30"))
            from platform_defs.loader import load_organisation

            services = Services(mlflow=resources["mlflow"], deployer=resources["deployer_local"].deployer(),
                                ledger=book, data_store=resources["data_store"])
            try:
                yield {"org": load_organisation(), "policy": policy, "services": services, "server": server}
            finally:
                services.deployer.stop_all()
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)


def staging(world):
    spec, _, _ = resolve_endpoint(world["org"], "churn_scoring", "staging")
    return endpoint_target(spec, "staging")


def serving(world) -> str | None:
    return serving_version(world["services"].deployer.status(staging(world)))


def recorded(world) -> str | None:
    deploys = world["services"].ledger.entries(kind="deploy", subject="churn_scoring", env="staging")
    return str(deploys[-1].data["version"]) if deploys else None


def promote_v2(world):
    return promote_endpoint(world["org"], world["policy"], "churn_scoring", "staging", services=world["services"],
                            actor="run-outage", trigger="test", version="2")


@pytest.mark.parametrize("when", ["healthy", "switched"])
def test_postgresql_stopped_at_the_cutover_leaves_traffic_on_what_the_ledger_records(world, monkeypatch, when):
    """``healthy``: the server stops once v2 is healthy and before it takes traffic: no switch, v1 answers
    throughout. ``switched``: it stops right after the cutover, before the deploy entry: the flow puts v1 back
    (v2 answered for the moment between). Either way v1 serves when the promotion returns, and once the server
    is back the ledger and what serves agree (v1), and the ledger is intact."""
    import time

    from platform_defs import promotion

    deployer, server = world["services"].deployer, world["server"]
    assert (serving(world), recorded(world)) == ("1", "1")
    # the lease cannot be released while the store is away: it expires by itself, sooner here than the 30 s
    monkeypatch.setattr(promotion, "LEASE_TTL_SECONDS", 4.0)
    monkeypatch.setattr(promotion, "LEASE_RENEW_SECONDS", 1.0)
    step = "_await_healthy" if when == "healthy" else "_cutover"
    original = getattr(deployer, step)

    def then_stop_postgres(*args, **kwargs):
        out = original(*args, **kwargs)
        server.stop()
        return out

    monkeypatch.setattr(deployer, step, then_stop_postgres)
    try:
        with pytest.raises(PromotionError) as err:
            promote_v2(world)
    finally:
        monkeypatch.setattr(deployer, step, original)
        server.start()
    message = str(err.value)
    assert "the ledger cannot record it" in message and server.password not in message, message
    assert ("not switched to" if when == "healthy" else "switched back to version 1") in message, message
    assert serving(world) == "1"
    assert recorded(world) == "1" and world["services"].ledger.verify().ok
    deadline = time.monotonic() + 30
    while world["services"].ledger.lease("promotion:churn_scoring.staging") is not None:  # the stale grant
        assert time.monotonic() < deadline, "the lease the outage left behind never expired"
        time.sleep(0.2)
