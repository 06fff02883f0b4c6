"""The alias_drift sensor and the alias_matches_serving check, against real MLflow (sqlite), real endpoint
processes and the session's ledger. Each sensor tick's events are reported to a real Dagster instance the
way the sensor daemon does (``instance.report_runless_asset_event``)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from platform_defs.promotion import endpoint_target
from platform_defs.loader import load_organisation
from sensors.alias_drift import CHECK_NAME, build_alias_checks, build_alias_drift_sensor
from tests.conftest import model_release, save_credit_model
from tests.test_rollback import deploy_like_factories, drained, register, write_org


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ad_models")
    return {"1": save_credit_model(root / "a", seed=1), "2": save_credit_model(root / "b", seed=3)}


@pytest.fixture
def line(settings, tmp_path, saved_models, request):
    """One endpoint (its own model with versions 1 and 2) in an organisation of its own."""
    from platform_defs.wiring import build_resources

    name = request.param
    org = load_organisation(write_org(tmp_path / "org", [name], name))
    res = build_resources(settings)
    mlflow = res["mlflow"]
    assert [register(mlflow, f"{name}_model", saved_models[v], res["ledger"].ledger())
            for v in ("1", "2")] == ["1", "2"]
    deployer = res["deployer_local"].deployer()
    (tmp_path / "instance").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "instance")) as instance:
        yield {"name": name, "model": f"{name}_model", "org": org, "res": res, "mlflow": mlflow,
               "ledger": res["ledger"].ledger(), "deployer": deployer, "instance": instance}
    for env in ("staging", "prod"):
        deployer.delete(endpoint_target(org.by_name[name], env))


def declared_defs(line) -> dg.Definitions:
    """The endpoint's environment assets with the check declared on them (as factories.py will)."""
    assets = []
    for env in ("staging", "prod"):
        key = f"{line['name']}_{env}"

        @dg.asset(key=key, check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset=key, blocking=False)])
        def _env_asset():
            return None

        assets.append(_env_asset)
    return dg.Definitions(assets=assets, sensors=[build_alias_drift_sensor(line["org"])], resources=line["res"])


class Ticker:
    def __init__(self, line):
        self.line = line
        self.defs = declared_defs(line)
        self.sensor = self.defs.resolve_sensor_def("alias_drift")
        self.cursor: str | None = None

    def __call__(self, reset: bool = False):
        """One tick: returns {asset: (passed, metadata, description)} or the skip message."""
        ctx = dg.build_sensor_context(instance=self.line["instance"], cursor=None if reset else self.cursor,
                                      resources=self.line["res"], definitions=self.defs)
        result = self.sensor(ctx)
        self.cursor = ctx.cursor
        if isinstance(result, dg.SkipReason):
            return result.skip_message
        assert isinstance(result, dg.SensorResult) and not result.run_requests
        out = {}
        for ev in result.asset_events:
            assert isinstance(ev, dg.AssetCheckEvaluation) and ev.check_name == CHECK_NAME
            assert ev.blocking is False
            self.line["instance"].report_runless_asset_event(ev)  # what the sensor daemon does with them
            out[ev.asset_key.to_user_string()] = (ev.passed, {k: v.value for k, v in ev.metadata.items()},
                                                  ev.description)
        return out


def moved(line) -> list:
    return line["ledger"].entries(kind="alias_moved", subject=line["name"])


def test_sensor_definition(settings, tmp_path):
    org = load_organisation(write_org(tmp_path, ["ad_def"], "ad_def"))
    sensor = build_alias_drift_sensor(org)
    assert sensor.name == "alias_drift" and sensor.minimum_interval_seconds == 60
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.required_resource_keys == {"mlflow", "ledger", "deployer_local"}


@pytest.mark.parametrize("line", ["ad_hand"], indirect=True)
def test_hand_moved_alias_is_reported_once_and_its_recovery_too(line):
    name, model, mlflow = line["name"], line["model"], line["mlflow"]
    deploy_like_factories(line["org"], name, "prod", "1", line["res"])
    tick = Ticker(line)
    first = tick()
    assert {k: v[0] for k, v in first.items()} == {f"{name}_prod": True}  # staging never deployed: nothing to say
    assert tick().startswith("aliases unchanged across 2 endpoint environments")

    mlflow.client().set_registered_model_alias(model, "prod", "2")  # by hand, outside onepath
    report = tick()
    assert list(report) == [f"{name}_prod"]
    passed, meta, description = report[f"{name}_prod"]
    assert passed is False
    assert (meta["alias_version"], meta["serving_version"], meta["ledger_version"]) == ("2", "1", "1")
    assert description.startswith(f"MLflow alias {model}@prod points to version 2, but version 1 serves at http://")
    [entry] = moved(line)
    assert entry.env == "prod" and entry.actor == "sensor:alias_drift"
    assert {k: entry.data[k] for k in ("model", "alias", "alias_version", "serving_version", "ledger_version")} == {
        "model": model, "alias": "prod", "alias_version": "2", "serving_version": "1", "ledger_version": "1"}

    assert tick().startswith("aliases unchanged")  # not repeated on the next tick
    assert len(moved(line)) == 1
    again = tick(reset=True)  # a reset cursor reports the state, but the ledger already holds this drift
    assert again[f"{name}_prod"][0] is False and len(moved(line)) == 1

    mlflow.set_alias(model, "prod", "1")  # fixed
    fixed = tick()
    assert {k: v[0] for k, v in fixed.items()} == {f"{name}_prod": True}
    assert fixed[f"{name}_prod"][1]["verdict"] == "alias, server and ledger agree"
    assert tick().startswith("aliases unchanged") and len(moved(line)) == 1

    mlflow.client().set_registered_model_alias(model, "prod", "2")  # the same move again is a new drift
    assert tick()[f"{name}_prod"][0] is False and len(moved(line)) == 2
    mlflow.client().delete_registered_model_alias(model, "prod")  # removing the alias is a drift too
    removed = tick()
    assert removed[f"{name}_prod"][0] is False
    assert removed[f"{name}_prod"][2].startswith(f"MLflow alias {model}@prod was removed, while 1 serves")
    assert [e.data["alias_version"] for e in moved(line)] == ["2", "2", None]
    assert line["ledger"].verify().ok


@pytest.mark.parametrize("line", ["ad_oob"], indirect=True)
def test_server_ahead_of_the_ledger_is_confirmed_on_the_next_tick_and_an_outage_is_not_an_alias_move(line):
    name, model, mlflow, deployer = line["name"], line["model"], line["mlflow"], line["deployer"]
    spec = line["org"].by_name[name]
    deploy_like_factories(line["org"], name, "prod", "1", line["res"])
    tick = Ticker(line)
    assert tick()[f"{name}_prod"][0] is True

    # version 2 cut over without its ledger entry and alias yet: what a deploy looks like for a few
    # milliseconds, or a deploy made outside onepath. Reported only if still so on the next tick.
    target = endpoint_target(spec, "prod")
    pids = deployer.status(target).detail["supervisor"]["pids"]  # /version names no pid
    deployer.deploy(target, model_release("2", mlflow.download(model, "2"), {"model_name": model}))
    drained(*pids)
    waiting = tick()
    assert isinstance(waiting, str) and "1 mismatch(es) to confirm next tick" in waiting and not moved(line)
    confirmed = tick()
    passed, meta, description = confirmed[f"{name}_prod"]
    assert passed is False and (meta["alias_version"], meta["serving_version"], meta["ledger_version"]) == \
        ("1", "2", "1")
    assert "points to version 1, but version 2 serves" in description and len(moved(line)) == 1

    # the platform catches up (alias and ledger), so the check passes again
    mlflow.set_alias(model, "prod", "2")
    line["ledger"].append("deploy", name, {"model": model, "version": "2", "previous_version": "1",
                                           "address": deployer.address(target), "promoted_from": None,
                                           "track": "ml-high-risk", "owner": "credit-risk", "checks": []},
                          "dagster:test-run", env="prod")
    assert tick()[f"{name}_prod"][0] is True

    # nothing answers any more: an outage, not an alias move (alias and ledger still agree)
    deployer.delete(target)
    assert tick().startswith("aliases unchanged") and len(moved(line)) == 1


@pytest.mark.parametrize("line", ["ad_check"], indirect=True)
def test_declared_check_runs_the_same_comparison(line):
    name, model = line["name"], line["model"]
    deploy_like_factories(line["org"], name, "prod", "1", line["res"])
    checks = build_alias_checks(line["org"])
    assert all(spec.blocking is False for c in checks for spec in c.check_specs)
    keys = sorted(k.to_user_string() for c in checks for k in c.check_keys)
    assert keys == [f"{name}_prod:{CHECK_NAME}", f"{name}_staging:{CHECK_NAME}"]
    dg.Definitions.validate_loadable(dg.Definitions(
        assets=[dg.AssetSpec(f"{name}_{e}") for e in ("staging", "prod")], asset_checks=checks,
        resources=line["res"]))

    @dg.asset(key=f"{name}_prod")
    def prod_asset():
        return None

    prod_check = [c for c in checks if any(k.asset_key.path == [f"{name}_prod"] for k in c.check_keys)]

    def run():
        r = dg.materialize([prod_asset, *prod_check], resources=line["res"], instance=line["instance"])
        [ev] = r.get_asset_check_evaluations()
        assert ev.check_name == CHECK_NAME and ev.asset_key == dg.AssetKey(f"{name}_prod")
        return ev

    ok = run()
    assert ok.passed is True and ok.metadata["alias_version"].value == "1"
    line["mlflow"].client().set_registered_model_alias(model, "prod", "2")
    bad = run()  # non-blocking: the run succeeds, the check fails
    assert bad.passed is False and bad.description.startswith(f"MLflow alias {model}@prod points to version 2")
    assert not moved(line)  # reporting to the ledger is the sensor's job


@pytest.mark.parametrize("line", ["ad_digest"], indirect=True)
def test_served_content_that_is_not_the_registered_digest_fails_the_check_once(line):
    """Alias, server and ledger all say version 1, but the bytes serving are version 2's: the check
    compares the digest the server reports with the ledger's registration of version 1, names both,
    and records it once as digest_mismatch."""
    from platform_defs.registration import registered_digest

    name, model, mlflow, deployer, book = line["name"], line["model"], line["mlflow"], line["deployer"], line["ledger"]
    deploy_like_factories(line["org"], name, "prod", "1", line["res"])
    tick = Ticker(line)
    ok = tick()[f"{name}_prod"]
    assert ok[0] is True and ok[1]["serving_digest"] == registered_digest(book, model, "1") != "none"

    target = endpoint_target(line["org"].by_name[name], "prod")
    pids = deployer.status(target).detail["supervisor"]["pids"]  # /version names no pid
    # labelled 1, content of 2 (a release assembled around the platform, its own digest passed along)
    deployer.deploy(target, model_release("1", mlflow.download(model, "2"), {"model_name": model}))
    drained(*pids)
    one, two = registered_digest(book, model, "1"), registered_digest(book, model, "2")
    assert one != two
    passed, meta, description = tick()[f"{name}_prod"]
    assert passed is False and (meta["alias_version"], meta["serving_version"], meta["ledger_version"]) == \
        ("1", "1", "1")
    assert (meta["serving_digest"], meta["registered_digest"]) == (two, one)
    assert one in description and two in description and "version 1" in description
    [entry] = book.entries(kind="digest_mismatch", subject=name)
    assert (entry.data["serving_digest"], entry.data["registered_digest"]) == (two, one) and not moved(line)
    assert tick().startswith("aliases unchanged")  # reported once
    assert tick(reset=True)[f"{name}_prod"][0] is False  # a reset cursor: the ledger already holds it
    assert len(book.entries(kind="digest_mismatch", subject=name)) == 1
