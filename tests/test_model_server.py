"""The endpoint server over real HTTP: request validation, shapes, metrics and the inference log."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from resources.deployers.base import Target
from resources.deployers.local import LocalProcessDeployer
from tests.conftest import artifact_roots, grant_caller, model_release, worker_facts

# the credential the module's server was granted (every route but /health needs one)
AUTH: dict[str, str] = {}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A bare LogisticRegression fitted on a DataFrame: sklearn itself refuses unknown columns, so a
    200 with extra columns proves they never reached the model."""
    import mlflow.sklearn
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = pd.DataFrame({"income": rng.normal(50, 10, 300), "accounts": rng.integers(0, 9, 300)})
    y = (X.income + rng.normal(0, 5, 300) > 50).astype(int)
    est = LogisticRegression().fit(X, y)
    with pytest.raises(ValueError):  # the premise of the extra-column test
        est.predict(X.assign(application_id=1.0))
    model_dir = tmp_path_factory.mktemp("srv") / "m"
    mlflow.sklearn.save_model(est, str(model_dir), signature=infer_signature(X, est.predict(X)),
                              input_example=X.head(2))
    return model_dir


def tiny_deployer(settings) -> LocalProcessDeployer:
    return LocalProcessDeployer(settings.run_dir, port_base=settings.port_base,
                                inference_log_dir=settings.inference_log_dir, artifact_roots=artifact_roots(settings))


@pytest.fixture(scope="module")
def server(settings, tiny_model):
    deployer = tiny_deployer(settings)
    target = Target("validation", "test", kind="endpoint")
    AUTH.update(grant_caller(deployer, target))
    st = deployer.deploy(target, model_release("7", tiny_model, {
        "model_name": "tiny", "pii_columns": ["full_name", "national_id"], "pass_through": ["application_id"]}))
    yield st.address, settings.inference_log_dir / "validation" / "test"
    deployer.delete(target)
    AUTH.clear()


def call(address: str, path: str, body: bytes | str | dict | list, headers: dict | None = None):
    data = body if isinstance(body, bytes) else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
    req = urllib.request.Request(address + path, data=data, method="POST",
                                 headers={"content-type": "application/json", **AUTH, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(address: str, path: str):
    with urllib.request.urlopen(urllib.request.Request(address + path, headers=AUTH), timeout=5) as r:
        return r.status, r.read().decode()


def log_lines(log_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(log_dir.glob("*.jsonl")) for line in f.read_text().splitlines()]


GOOD = {"income": 61.5, "accounts": 3}


def test_predict_one_record_and_many(server):
    address, _ = server
    code, out = call(address, "/predict", GOOD)
    assert code == 200 and out["version"] == "7" and out["model"] == "tiny"
    assert out["predictions"][0]["prediction"] in (0, 1) and 0 <= out["predictions"][0]["probability"] <= 1
    code, out = call(address, "/predict", {"records": [GOOD, {"income": 10.0, "accounts": 1}]})
    assert code == 200 and len(out["predictions"]) == 2


def test_mlflow_invocations_shapes(server):
    address, _ = server
    code, out = call(address, "/invocations", {"dataframe_records": [GOOD]})
    assert code == 200 and out["predictions"][0] in (0, 1)
    code, out = call(address, "/invocations", {"dataframe_split": {"columns": ["income", "accounts"],
                                                                   "data": [[61.5, 3], [20.0, 1]]}})
    assert code == 200 and len(out["predictions"]) == 2


@pytest.mark.parametrize("body,status,column,fragment", [
    ({"income": 61.5}, 422, "accounts", "missing"),
    ({"income": "rich", "accounts": 3}, 422, "income", "must be number"),
    ({"income": 61.5, "accounts": 2.5}, 422, "accounts", "must be integer"),
    ({"income": None, "accounts": 3}, 422, "income", "null"),
    ({"income": True, "accounts": 3}, 422, "income", "must be number"),
    ({"records": [GOOD, {"income": 1.0}]}, 422, "accounts", "record 1"),
    ('{"income": 61.5, "accounts"', 400, None, "not valid JSON"),
    ("42", 400, None, "expected"),
    ({"records": []}, 400, None, "non-empty"),
    ({"records": [1, 2]}, 400, None, "not a JSON object"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, body, status, column, fragment):
    address, _ = server
    code, out = call(address, "/predict", body)
    assert code == status
    assert fragment in out["error"]
    assert out.get("column") == column
    assert get(address, "/health")[0] == 200  # the server stays up


def test_invocations_malformed_split_is_400(server):
    address, _ = server
    code, out = call(address, "/invocations", {"dataframe_split": {"columns": ["income"], "data": [[1, 2]]}})
    assert code == 400 and "row length" in out["error"]


def test_extra_columns_never_reach_the_model_and_pii_is_never_logged(server):
    address, log_dir = server
    body = {**GOOD, "application_id": "APP-1", "full_name": "Ada Lovelace", "national_id": "123-45-6789"}
    code, out = call(address, "/predict", body, headers={"x-request-id": "req-extra-1"})
    assert code == 200 and out["request_id"] == "req-extra-1"
    lines = [entry for entry in log_dir.glob("*.jsonl") for entry in entry.read_text().splitlines()]
    assert not any("Ada Lovelace" in entry or "123-45-6789" in entry for entry in lines)
    mine = [e for e in log_lines(log_dir) if e["request_id"] == "req-extra-1"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["inputs"] == GOOD and entry["extras"] == {"application_id": "APP-1"}
    assert entry["version"] == "7" and entry["model"] == "tiny"
    assert set(entry) >= {"ts", "request_id", "inputs", "output", "latency_ms", "version"}
    assert "full_name" not in entry["extras"] and "national_id" not in entry["extras"]


def test_health_version_and_metrics(server):
    address, _ = server
    code, body = get(address, "/version")
    info = json.loads(body)
    assert code == 200 and info["version"] == "7" and info["features"] == ["income", "accounts"]
    call(address, "/predict", {"income": "x", "accounts": 1})
    code, text = get(address, "/metrics")
    assert code == 200
    assert 'onepath_model_info{endpoint="validation",env="test",version="7"} 1' in text
    assert 'onepath_requests_total{endpoint="validation",env="test",route="/predict",status="200"}' in text
    assert 'status="422"' in text
    assert "onepath_request_latency_seconds_bucket" in text and 'le="+Inf"' in text
    errors = [line for line in text.splitlines() if line.startswith("onepath_request_errors_total")]
    assert errors and int(errors[0].split()[-1]) >= 1


def test_native_thread_pools_have_the_releases_model_threads(server, settings, tiny_model):
    """Workers are the parallelism: each worker's OpenMP/BLAS pools have ``model_threads`` threads
    (default 1), as the libraries themselves report them (threadpoolctl), whatever the machine's cores."""
    deployer = tiny_deployer(settings)
    pools = worker_facts(deployer, Target("validation", "test", kind="endpoint"))[0]["native_threads"]
    assert "blas" in pools and set(pools.values()) == {1}, pools
    target = Target("validation", "threads", kind="endpoint")
    try:
        deployer.deploy(target, model_release("7", tiny_model, {
            "model_name": "tiny", "pii_columns": [], "model_threads": 2}))
        pools = worker_facts(deployer, target)[0]["native_threads"]
        # OpenMP takes what it is told; OpenBLAS caps its pool at the machine's cores
        assert pools == {"openmp": 2, "blas": min(2, os.cpu_count() or 1)}, pools
    finally:
        deployer.delete(target)


def test_wrong_method_and_unknown_path(server):
    address, _ = server
    with pytest.raises(urllib.error.HTTPError) as err:
        get(address, "/predict")
    assert err.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as err:
        get(address, "/nope")
    assert err.value.code == 404
