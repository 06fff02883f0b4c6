"""The deployer contract, run against every backend that can run on one machine.

deploy returns only when the new version answers at the stable address, or raises and leaves the
previous version serving; delete is idempotent; status tells the truth, also from a fresh deployer
(as after a `dagster dev` restart).
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import pytest

from resources.deployers.base import DeployError, Release, Target
from resources.deployers.local import LocalProcessDeployer
from tests.conftest import artifact_roots, granted, headers_at, model_release, save_credit_model

ROW = {"annual_income": 52000.0, "loan_amount": 12000.0, "loan_term_months": 36, "debt_to_income": 0.3,
       "credit_history_years": 7.5, "num_open_accounts": 4, "delinquencies_2y": 0,
       "employment_type": "salaried", "home_ownership": "mortgage", "purpose": "car"}


def local_backend(settings) -> LocalProcessDeployer:
    return LocalProcessDeployer(settings.run_dir, host=settings.host, port_base=settings.port_base,
                                inference_log_dir=settings.inference_log_dir, artifact_roots=artifact_roots(settings))


BACKENDS = {"local": local_backend}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    good1 = save_credit_model(root / "v1", seed=1)
    good2 = save_credit_model(root / "v2", seed=2)
    broken = root / "v3"
    shutil.copytree(good2, broken)
    (broken / "model.skops").write_bytes(b"this is not a model")
    return {"1": good1, "2": good2, "3": broken}


def predict(address: str) -> dict:
    req = urllib.request.Request(address + "/predict", data=json.dumps(ROW).encode(),
                                 headers={"content-type": "application/json", **headers_at(address)})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def release(models, v: str) -> Release:
    return model_release(v, models[v], {"model_name": "credit_risk", "pii_columns": []})


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_deployer_contract(backend, settings, models):
    deployer = BACKENDS[backend](settings)
    target = Target("contract", f"c{backend}", kind="endpoint")
    granted(deployer, target)
    try:
        st = deployer.deploy(target, release(models, "1"))
        assert st.healthy and st.serving_version == "1"
        address = st.address
        assert predict(address)["version"] == "1"

        st = deployer.deploy(target, release(models, "2"))
        assert st.address == address, "the stable address must not change with the version"
        assert predict(address)["version"] == "2"

        # a version that cannot load: deploy raises, and the previous version keeps answering,
        # also while the broken one is trying to start
        answers: list[str] = []
        stop = threading.Event()

        def keep_calling():
            while not stop.is_set():
                answers.append(predict(address)["version"])

        caller = threading.Thread(target=keep_calling)
        caller.start()
        try:
            with pytest.raises(DeployError, match="version 3 failed to start"):
                deployer.deploy(target, release(models, "3"))
        finally:
            stop.set()
            caller.join()
        assert answers and set(answers) == {"2"}
        assert predict(address)["version"] == "2"

        # status from a new deployer object (the orchestrator restarted) asks the server itself
        fresh = BACKENDS[backend](settings)
        st = fresh.status(target)
        assert st.healthy and st.serving_version == "2" and st.address == address
        assert st.detail["server"]["version"] == "2"
    finally:
        deployer.delete(target)
    deployer.delete(target)  # idempotent
    st = deployer.status(target)
    assert not st.healthy and st.serving_version is None


def test_deploy_to_a_target_that_never_served_and_fails_leaves_nothing_half_up(settings, models):
    deployer = local_backend(settings)
    target = Target("contract", "never", kind="endpoint")
    try:
        with pytest.raises(DeployError):
            deployer.deploy(target, release(models, "3"))
        st = deployer.status(target)
        assert not st.healthy and st.serving_version is None
    finally:
        deployer.delete(target)


def test_missing_artifact_fails_clearly(settings, tmp_path):
    deployer = local_backend(settings)
    target = Target("contract", "missing", kind="endpoint")
    try:
        with pytest.raises(DeployError, match="nowhere is not a directory"):
            deployer.deploy(target, Release("9", str(tmp_path / "nowhere"), {"model_name": "x"}))
    finally:
        deployer.delete(target)


def test_killed_worker_is_restarted_by_the_supervisor(settings, models):
    import os
    import signal

    deployer = local_backend(settings)
    target = Target("contract", "restart", kind="endpoint")
    try:
        st = deployer.deploy(target, release(models, "1"))
        pid = st.detail["supervisor"]["pids"][0]
        os.kill(pid, signal.SIGKILL)
        # the supervisor respawns the worker on the same stable socket; wait for a new pid to answer
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = deployer.status(target)
            if now.healthy and now.detail["supervisor"]["pids"][0] != pid:
                break
            time.sleep(0.05)
        assert now.healthy and now.serving_version == "1" and now.detail["supervisor"]["pids"][0] != pid
        assert now.detail["supervisor"]["restarts"] == 1
    finally:
        deployer.delete(target)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_cutover_with_a_stale_fencing_token_changes_nothing(backend, settings, models):
    """A deployer that lost its lease (a lower token than the backend has seen) cannot cut over."""
    deployer = BACKENDS[backend](settings)
    target = Target("contract", f"fence{backend}", kind="endpoint")
    granted(deployer, target)
    try:
        st = deployer.deploy(target, release(models, "1"), fencing_token=2)
        with pytest.raises(DeployError, match="fencing token 1 is lower than the highest token seen 2"):
            deployer.deploy(target, release(models, "2"), fencing_token=1)
        assert predict(st.address)["version"] == "1" and deployer.status(target).serving_version == "1"
        deployer.fence(target, 3)
        with pytest.raises(DeployError, match="fencing token 2 is lower than the highest token seen 3"):
            deployer.deploy(target, release(models, "2"), fencing_token=2)
        assert deployer.deploy(target, release(models, "2"), fencing_token=3).serving_version == "2"
    finally:
        deployer.delete(target)
