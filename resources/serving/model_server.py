"""onepath's model server: one model version, loaded once, behind a lean ASGI app on uvicorn.

Routes: ``POST /predict`` (one record object or ``{"records": [...]}``), ``POST /invocations``
(MLflow's ``dataframe_records`` / ``dataframe_split`` / ``inputs`` shapes), ``GET /health``
(``ModelApp.health``: "ok" or "degraded"; to a caller holding a credential of this endpoint also its
problems, the version, the inference log's state, the recent model errors, an access table that
cannot be read), ``GET /version`` (endpoint, env, model, version,
digest, flavor, features: what a caller needs), ``GET /metrics`` (Prometheus text) and ``GET
/onepath/worker`` (``protocol.WORKER_ROUTE``: pid, run id, load time, native thread pools, version,
digest; for the supervisor alone).

Only declared callers get an answer. Every route but ``/health`` (an unknown path too) is judged
first by ``resources.serving.access.AccessTable``: the endpoint's access table (config
``access_file``, re-read on the next request whenever the file changes, so a revocation needs no
redeploy) plus the backend's own credentials (config ``backend_credentials``: hashes only; the
``supervisor`` one is accepted only on the private Unix socket, which uvicorn reports as a
``scope["server"]`` of ``(path, None)``). No credential or one that is not this endpoint's is a 401
with ``www-authenticate: Bearer realm="onepath"``; one for another endpoint or environment, revoked,
rotated out, or not granted the route is a 403; no message repeats a token. Every judged response is
counted by caller in ``onepath_caller_requests_total``. There is no setting that turns this off. A
refused request never reached the version, so it is counted there (and in
``onepath_request_errors_total``) only: not in ``onepath_requests_total`` nor the latency histogram,
which describe what the version answered and are what a bake judges it by (anonymous traffic must
not make a failing or slow version's bake pass, nor dilute its error rate and p99).

Every request is judged alone. It is validated against the model's MLflow signature before it
reaches the model, so that what passes can be framed and scored (``validate_records``: integers
within int64, numbers finite and within float32's range): a missing column or a wrong type is a 422
naming the record and the column, a malformed body or shape a 400 naming the field; a body, a row
count or a nesting depth past its limit (``DEFAULT_LIMITS``, each settable in the config) a 413/422
before any scoring. Columns outside the signature (an application id passed through for tracing)
never reach the model; they reach the inference log only when the endpoint declares them as
pass-through (config ``pass_through_columns``; never a PII column), and every other one is dropped from
the log and counted (``onepath_inference_log_undeclared_fields_total``, one per field per record). Rows of concurrent
requests are scored together in one model call (micro-batching), which is where most of the
throughput comes from: a batch closes when an event-loop iteration brings no new request, after
``batch_wait_ms`` (config, default 2) or at ``max_batch`` rows, whichever comes first; a lone request
does not wait. A batch whose model call raises is bisected down to single requests, so only a
request the model refuses alone gets a 500; every future of a batch is resolved whatever happens,
and a request-level deadline answers 503 should one ever not be. Every response but a refusal for the
credential is counted by route and status (the HTTP protocol's own answers too: ``resources.serving.http_limits``), and an
unexpected exception is a counted JSON 500. The inference log degrades (``InferenceLog``), never
the predictions.

This module imports neither Dagster nor MLflow on its normal path: the sklearn flavour is loaded
straight from its bytes. Other flavours go through ``mlflow.pyfunc``. Before anything is loaded
the whole model folder is read once and hashed (``resources.artifact_digest.read_folder``); unless it
matches the config's ``expected_digest`` the worker prints one line and exits with
``EXIT_ARTIFACT_REFUSED``, and what it loads are those very bytes (a pyfunc model from a private
copy of them), so a file swapped on disk after the check is never what serves. ``/version``
reports the digest.

Run as ``python -m resources.serving.model_server CONFIG.json``; the supervisor hands it the
listening sockets (see ``resources.serving.child``).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson

from resources.serving.access import ANONYMOUS, AccessTable, Verdict
from resources.serving.exit_codes import EXIT_ARTIFACT_REFUSED
from resources.serving.protocol import WORKER_ROUTE

JSON_HEADERS = [(b"content-type", b"application/json")]
SIGNATURE_TYPES = {
    "double": "number", "float": "number", "long": "integer", "integer": "integer",
    "string": "string", "boolean": "boolean", "datetime": "string",
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# What a validated request is guaranteed to be, so that it can be framed and scored: integers fit
# int64, numbers fit float32 (tree models compute in float32), nesting stays shallow.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
FLOAT32_MAX = 3.4028234e38
DEFAULT_LIMITS = {
    "max_body_bytes": 1024 * 1024,   # 413 from the content-length, before a byte of the body is read
    "max_request_rows": 1000,        # 413: one caller's rows never hold the others' batch for long
    "max_json_depth": 32,            # 422: what is logged must be writable (orjson stops at 254)
    "request_deadline_s": 10.0,      # 503 if a request is ever not answered within it
}
ROUTES = ("/predict", "/invocations", "/health", "/version", "/metrics", WORKER_ROUTE)  # metric labels; else "other"
UNAUTHORIZED_HEADERS = [(b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="onepath"')]


class RequestError(Exception):
    def __init__(self, status: int, message: str, column: str | None = None, record: int | None = None):
        super().__init__(message)
        self.status, self.message, self.column, self.record = status, message, column, record

    def body(self) -> bytes:
        out: dict[str, Any] = {"error": self.message}
        if self.record is not None:
            out["record"] = self.record
        if self.column is not None:
            out["column"] = self.column
        return orjson.dumps(out)


# --------------------------------------------------------------------------------------------
# Model loading


@dataclass
class Column:
    name: str
    kind: str  # number | integer | string | boolean
    required: bool = True


@dataclass
class LoadedModel:
    name: str
    version: str
    columns: list[Column]
    predict: Callable[[Any], list[dict[str, Any]]]
    run_id: str | None = None
    flavor: str = "sklearn"
    input_example: list[dict[str, Any]] | None = None
    digest: str | None = None


def read_signature(mlmodel: dict[str, Any]) -> list[Column]:
    sig = (mlmodel.get("signature") or {}).get("inputs")
    if not sig:
        raise RuntimeError("the model has no input signature: log it with a signature to serve it")
    cols = []
    for spec in json.loads(sig):
        if spec.get("type") not in SIGNATURE_TYPES or "name" not in spec:
            raise RuntimeError(f"unsupported signature entry {spec!r}: onepath serves column-based signatures")
        cols.append(Column(spec["name"], SIGNATURE_TYPES[spec["type"]], bool(spec.get("required", True))))
    return cols


def _read_input_example(files: dict[str, bytes], mlmodel: dict[str, Any]) -> list[dict[str, Any]] | None:
    info = mlmodel.get("saved_input_example_info") or {}
    raw = files.get(info.get("artifact_path", "input_example.json"))
    if raw is None:
        return None
    data = json.loads(raw)
    if isinstance(data, dict) and "columns" in data and "data" in data:
        return [dict(zip(data["columns"], row)) for row in data["data"]]
    if isinstance(data, dict) and "dataframe_split" in data:
        d = data["dataframe_split"]
        return [dict(zip(d["columns"], row)) for row in d["data"]]
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data
    return None


def _classifier_predict(est: Any) -> Callable[[Any], list[dict[str, Any]]]:
    classes = list(getattr(est, "classes_", []))
    if hasattr(est, "predict_proba") and len(classes) == 2:
        positive, negative = _plain(classes[1]), _plain(classes[0])

        def predict(frame: Any) -> list[dict[str, Any]]:
            proba = est.predict_proba(frame)[:, 1].tolist()  # plain Python floats in one call
            return [{"prediction": positive if p >= 0.5 else negative, "probability": p} for p in proba]

        return predict

    def predict_plain(frame: Any) -> list[dict[str, Any]]:
        return [{"prediction": _plain(v)} for v in est.predict(frame)]

    return predict_plain


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


class ArtifactRefused(RuntimeError):
    """The model folder does not hash to the digest this server was told to serve (or none was given)."""


def _private_copy(files: dict[str, bytes]) -> Path:
    """The hashed bytes written into a fresh owner-only (0700) temp dir, for loaders that need paths."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="onepath-model-"))
    atexit.register(shutil.rmtree, root, True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return root


def _verified_files(model_dir: Path, name: str, version: str,
                    expected_digest: str | None) -> tuple[str, dict[str, bytes], dict[str, Any]]:
    """``(digest, files, MLmodel)`` of the folder, read once, or ArtifactRefused unless it hashes to
    ``expected_digest``."""
    import yaml

    from resources.artifact_digest import ArtifactError, read_folder

    if not expected_digest:
        raise ArtifactRefused(f"model {name} version {version} at {model_dir}: no expected_digest in the server "
                              f"config; refusing to serve an artifact nobody vouched for")
    try:
        digest, files = read_folder(model_dir)
    except ArtifactError as err:
        raise ArtifactRefused(f"model {name} version {version}: {err}") from None
    if digest != expected_digest:
        raise ArtifactRefused(f"model {name} version {version} at {model_dir}: artifact digest mismatch: "
                              f"expected {expected_digest}, found {digest}")
    if "MLmodel" not in files:
        raise RuntimeError(f"{model_dir} has no MLmodel file")
    return digest, files, yaml.safe_load(files["MLmodel"].decode())


def _sklearn_estimator(files: dict[str, bytes], mlmodel: dict[str, Any], model_dir: Path) -> tuple[Any, str] | None:
    """The sklearn estimator rebuilt from the in-memory bytes and its serialization format, or None
    for another flavour."""
    sk = mlmodel.get("flavors", {}).get("sklearn")
    fmt = (sk or {}).get("serialization_format")
    if not (sk and sk.get("pickled_model") and fmt in ("skops", "cloudpickle", "pickle")):
        return None
    data = files.get(sk["pickled_model"])
    if data is None:
        raise RuntimeError(f"MLmodel names {sk['pickled_model']}, which is not in {model_dir}")
    if fmt == "skops":  # safe format: only allow-listed types are rebuilt
        import skops.io

        return skops.io.loads(data, trusted=sk.get("skops_trusted_types")), fmt
    import cloudpickle

    return cloudpickle.loads(data), fmt


class NotSklearn(RuntimeError):
    """The verified folder holds another flavour (load it with ``load_pyfunc``)."""


def load_estimator(model_dir: Path, name: str, version: str, expected_digest: str | None) -> Any:
    """The sklearn estimator of a verified model folder (what a gate judges), built from the bytes hashed."""
    _, files, mlmodel = _verified_files(Path(model_dir), name, version, expected_digest)
    found = _sklearn_estimator(files, mlmodel, Path(model_dir))
    if found is None:
        raise NotSklearn(f"model {name} version {version} is not an sklearn model (flavors: "
                         f"{', '.join(mlmodel.get('flavors', {}))})")
    return found[0]


def load_pyfunc(model_dir: Path, name: str, version: str, expected_digest: str | None) -> Any:
    """The ``mlflow.pyfunc`` model of a verified folder, loaded from a private copy of the bytes hashed."""
    import mlflow.pyfunc

    _, files, _ = _verified_files(Path(model_dir), name, version, expected_digest)
    return mlflow.pyfunc.load_model(str(_private_copy(files)))


def load_model(model_dir: Path, name: str, version: str, expected_digest: str | None) -> LoadedModel:
    """Load ``version`` of ``name`` from exactly the bytes of ``model_dir`` that hash to ``expected_digest``
    (read once with ``read_folder``; nothing is read from the folder again), or raise ArtifactRefused."""
    digest, files, mlmodel = _verified_files(model_dir, name, version, expected_digest)
    columns = read_signature(mlmodel)
    found = _sklearn_estimator(files, mlmodel, model_dir)
    if found is not None:
        est, fmt = found
        predict = _classifier_predict(est)
        flavor = f"sklearn/{fmt}"
    else:
        import mlflow.pyfunc

        pyf = mlflow.pyfunc.load_model(str(_private_copy(files)))

        def predict(frame: Any) -> list[dict[str, Any]]:
            out = pyf.predict(frame)
            if hasattr(out, "to_dict"):
                return [dict(r) for r in out.to_dict(orient="records")] if hasattr(out, "columns") else [
                    {"prediction": _plain(v)} for v in out
                ]
            return [{"prediction": _plain(v)} for v in out]

        flavor = "pyfunc"
    return LoadedModel(
        name=name, version=version, columns=columns, predict=predict, run_id=mlmodel.get("run_id"),
        flavor=flavor, input_example=_read_input_example(files, mlmodel), digest=digest,
    )


# --------------------------------------------------------------------------------------------
# Validation


_KIND_RULES = {
    "number": f"number (finite, within \u00b1{FLOAT32_MAX:.8g}, the float32 range)",
    "integer": f"integer (within int64, {INT64_MIN}..{INT64_MAX})",
    "string": "string", "boolean": "boolean",
}


def validate_records(records: Any, columns: list[Column], max_rows: int | None = None,
                     max_depth: int | None = None) -> list[dict[str, Any]]:
    """Check ``records`` against the signature; a RequestError naming the record and column otherwise.

    What passes can be framed and scored: required values present, integers within int64 (also a
    float such as 1e308 that ``is_integer``), numbers finite and within the float32 range (NaN and
    infinities fail the comparison), booleans and strings of their own type. With ``max_depth``, a
    pass-through value nested deeper than that is refused (it is logged, and must be writable)."""
    if not isinstance(records, list) or not records:
        raise RequestError(400, "expected a non-empty list of records")
    _row_limit(len(records), max_rows)
    names = {c.name for c in columns} if max_depth is not None else set()
    for i, rec in enumerate(records):
        if type(rec) is not dict:
            raise RequestError(400, f"record {i} is not a JSON object", record=i)
        for col in columns:
            v = rec.get(col.name, _MISSING)
            if v is _MISSING or v is None:
                if col.required:
                    what = "missing" if v is _MISSING else "null"
                    raise RequestError(422, f"record {i}: column '{col.name}' is {what}", col.name, i)
                continue
            k, t = col.kind, type(v)
            ok = (
                (k == "number" and (t is float or t is int) and -FLOAT32_MAX <= v <= FLOAT32_MAX)
                or (k == "integer" and (t is int or (t is float and v.is_integer())) and INT64_MIN <= v <= INT64_MAX)
                or (k == "string" and t is str)
                or (k == "boolean" and t is bool)
            )
            if not ok:
                shown = repr(v) if t in (int, float, bool, str) else f"of {len(v)} items"  # never a deep repr
                shown = shown if len(shown) <= 64 else f"{shown[:60]}..."
                raise RequestError(
                    422, f"record {i}: column '{col.name}' must be {_KIND_RULES[k]}, got {t.__name__} {shown}",
                    col.name, i,
                )
        if max_depth is not None:
            for key, v in rec.items():
                if key not in names and (type(v) is dict or type(v) is list) and _too_deep(v, max_depth - 1):
                    raise RequestError(422, f"record {i}: field '{key}' is nested deeper than {max_depth} "
                                            f"levels (the limit)", key, i)
    return records


def _too_deep(value: Any, budget: int) -> bool:
    """Whether the container ``value`` nests more than ``budget`` further levels below itself."""
    if budget <= 0:
        return True
    items = value.values() if type(value) is dict else value
    return any((type(x) is dict or type(x) is list) and _too_deep(x, budget - 1) for x in items)


_MISSING = object()


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as err:
        if "depth" in str(err) or "recursion" in str(err):
            raise RequestError(422, f"body is nested too deeply: {err}") from None
        raise RequestError(400, f"body is not valid JSON: {err}") from None


def parse_predict_body(body: bytes) -> list[dict[str, Any]]:
    data = _loads(body)
    if isinstance(data, dict) and "records" in data:
        if not isinstance(data["records"], list):
            raise RequestError(400, "'records' must be a list of record objects")
        return data["records"]
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return data
    raise RequestError(400, "expected a JSON object (one record) or {\"records\": [...]}")


def parse_invocations_body(body: bytes, max_rows: int | None = None) -> list[dict[str, Any]]:
    """Records from MLflow's shapes; every shape error a 400 naming the field. ``max_rows`` bounds the
    rows built from the column-wise shapes before they are built (a 413)."""
    data = _loads(body)
    if not isinstance(data, dict):
        raise RequestError(400, "expected a JSON object with dataframe_records, dataframe_split or inputs")
    if "dataframe_records" in data:
        if not isinstance(data["dataframe_records"], list):
            raise RequestError(400, "'dataframe_records' must be a list of record objects")
        return data["dataframe_records"]
    if "dataframe_split" in data:
        split = data["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("columns"), list) or not isinstance(
            split.get("data"), list
        ):
            raise RequestError(400, "dataframe_split needs 'columns' and 'data' lists")
        cols = split["columns"]
        for j, c in enumerate(cols):
            if type(c) is not str:
                raise RequestError(400, f"dataframe_split.columns[{j}] must be a string (a column name), got "
                                        f"{type(c).__name__}")
        if len(set(cols)) != len(cols):
            raise RequestError(400, "dataframe_split.columns names a column twice")
        rows = split["data"]
        _row_limit(len(rows), max_rows)
        out = []
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(cols):
                raise RequestError(400, f"dataframe_split.data[{i}]: row length differs from 'columns' "
                                        f"({len(cols)}); each row must be a list of one value per column", record=i)
            out.append(dict(zip(cols, row)))
        return out
    if "inputs" in data:
        inputs = data["inputs"]
        if isinstance(inputs, dict):
            lengths = {len(v) for v in inputs.values() if isinstance(v, list)}
            if len(lengths) != 1 or len(inputs) != sum(isinstance(v, list) for v in inputs.values()):
                raise RequestError(400, "'inputs' as columns needs a list per column, all of one length")
            n = lengths.pop()
            _row_limit(n, max_rows)
            return [{k: v[i] for k, v in inputs.items()} for i in range(n)]
        if not isinstance(inputs, list):
            raise RequestError(400, "'inputs' must be a list of record objects or an object of column lists")
        return inputs
    raise RequestError(400, "expected dataframe_records, dataframe_split or inputs")


def _row_limit(n: int, max_rows: int | None) -> None:
    if max_rows is not None and n > max_rows:
        raise RequestError(413, f"{n} records in one request; the limit is {max_rows} (max_request_rows): "
                                f"send them in several requests")


# --------------------------------------------------------------------------------------------
# Metrics


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    rows: int = 0
    errors: int = 0
    model_errors: int = 0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    latency_count: int = 0
    batches: int = 0
    batch_splits: int = 0
    log_errors: int = 0
    log_rows_dropped: int = 0
    undeclared_fields: int = 0
    # judged responses by (caller, route, status): who called, not only what was answered
    callers: dict[tuple[str, str, int], int] = field(default_factory=dict)

    def count_caller(self, caller: str, route: str, status: int) -> None:
        key = (caller, route, status)
        self.callers[key] = self.callers.get(key, 0) + 1

    def refused(self, route: str, status: int, caller: str) -> None:
        """A request the access judge refused (401/403): an error the client saw, counted by caller,
        never as traffic of the version (``requests``, the latency histogram)."""
        self.errors += 1
        self.count_caller(caller, route, status)

    def count(self, route: str, status: int) -> None:
        """One response sent (any route, also the protocol layer's): what the client saw."""
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if status >= 400:
            self.errors += 1

    def observe(self, route: str, status: int, seconds: float) -> None:
        """A prediction response: counted, and its latency in the histogram."""
        self.count(route, status)
        i = 0
        while i < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[i]:
            i += 1
        self.bucket_counts[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def render(self, labels: str, version: str, started: float, log_ok: bool = True, log: Any = None) -> bytes:
        lines = [
            "# HELP onepath_requests_total HTTP requests the version answered, by route and status (requests "
            "refused for their credential are only in onepath_caller_requests_total).",
            "# TYPE onepath_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'onepath_requests_total{{{labels},route="{route}",status="{status}"}} {n}')
        lines += [
            "# HELP onepath_caller_requests_total Requests judged for a credential, by caller (the grant's caller, "
            "anonymous without a credential, unrecognised for one that is not this endpoint's), route and status.",
            "# TYPE onepath_caller_requests_total counter",
        ]
        for (caller, route, status), n in sorted(self.callers.items()):
            lines.append(f'onepath_caller_requests_total{{{labels},caller="{_label(caller)}",route="{route}",'
                         f'status="{status}"}} {n}')
        lines += [
            "# HELP onepath_inference_log_undeclared_fields_total Record fields outside the signature and the "
            "declared pass-through columns, dropped from the inference log (one per field per record).",
            "# TYPE onepath_inference_log_undeclared_fields_total counter",
            f"onepath_inference_log_undeclared_fields_total{{{labels}}} {self.undeclared_fields}",
            "# HELP onepath_request_errors_total Requests answered with a 4xx or 5xx.",
            "# TYPE onepath_request_errors_total counter",
            f"onepath_request_errors_total{{{labels}}} {self.errors}",
            "# HELP onepath_model_errors_total Model calls that raised.",
            "# TYPE onepath_model_errors_total counter",
            f"onepath_model_errors_total{{{labels}}} {self.model_errors}",
            "# HELP onepath_predictions_total Rows scored.",
            "# TYPE onepath_predictions_total counter",
            f"onepath_predictions_total{{{labels}}} {self.rows}",
            "# HELP onepath_inference_log_errors_total Inference log writes that failed.",
            "# TYPE onepath_inference_log_errors_total counter",
            f"onepath_inference_log_errors_total{{{labels}}} {self.log_errors}",
            "# HELP onepath_inference_log_ok 1 while the inference log is written (or is off), 0 while it fails.",
            "# TYPE onepath_inference_log_ok gauge",
            f"onepath_inference_log_ok{{{labels}}} {int(log_ok)}",
            "# HELP onepath_inference_log_rows_pending Logged rows not yet stored (buffered, or in segments "
            "waiting for the store); what a SIGKILL would lose.",
            "# TYPE onepath_inference_log_rows_pending gauge",
            f"onepath_inference_log_rows_pending{{{labels}}} {getattr(log, 'pending', 0)}",
            "# HELP onepath_inference_log_rows_flushed_total Logged rows stored (segments written, or lines appended).",
            "# TYPE onepath_inference_log_rows_flushed_total counter",
            f"onepath_inference_log_rows_flushed_total{{{labels}}} {getattr(log, 'lines_written', 0)}",
            "# HELP onepath_inference_log_rows_dropped_total Logged rows dropped: the store failed, or the pending "
            "cap was reached while it was unreachable.",
            "# TYPE onepath_inference_log_rows_dropped_total counter",
            f"onepath_inference_log_rows_dropped_total{{{labels}}} "
            f"{getattr(log, 'dropped', None) if getattr(log, 'dropped', None) is not None else self.log_rows_dropped}",
            "# HELP onepath_batches_total Model calls (each scores one micro-batch).",
            "# TYPE onepath_batches_total counter",
            f"onepath_batches_total{{{labels}}} {self.batches}",
            "# HELP onepath_batch_splits_total Model calls on several requests that raised and were split "
            "to find the failing request.",
            "# TYPE onepath_batch_splits_total counter",
            f"onepath_batch_splits_total{{{labels}}} {self.batch_splits}",
            "# HELP onepath_request_latency_seconds Prediction request latency.",
            "# TYPE onepath_request_latency_seconds histogram",
        ]
        cum = 0
        for le, n in zip(LATENCY_BUCKETS, self.bucket_counts):
            cum += n
            lines.append(f'onepath_request_latency_seconds_bucket{{{labels},le="{le}"}} {cum}')
        cum += self.bucket_counts[-1]
        lines.append(f'onepath_request_latency_seconds_bucket{{{labels},le="+Inf"}} {cum}')
        lines.append(f"onepath_request_latency_seconds_sum{{{labels}}} {self.latency_sum:.6f}")
        lines.append(f"onepath_request_latency_seconds_count{{{labels}}} {self.latency_count}")
        lines += [
            "# HELP onepath_model_info The model version this process serves.",
            "# TYPE onepath_model_info gauge",
            f'onepath_model_info{{{labels},version="{version}"}} 1',
            "# HELP onepath_process_start_time_seconds Start time of the process.",
            "# TYPE onepath_process_start_time_seconds gauge",
            f"onepath_process_start_time_seconds {started:.3f}",
        ]
        return ("\n".join(lines) + "\n").encode()


def _label(value: str) -> str:
    """A Prometheus label value (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --------------------------------------------------------------------------------------------
# Inference log


class InferenceLog:
    """Appends JSON lines, one per scored row, to ``<dir>/<YYYY-MM-DD>.jsonl``; never a PII column.

    Logging degrades, it never stops predictions: a folder that cannot be created or a file that
    cannot be written leaves ``ok`` False and ``error`` saying what failed (path and errno text); the
    lines of that moment are dropped (and counted) and the log is tried again at most once every
    ``RETRY_SECONDS``, so it recovers by itself once the disk or the permissions do."""

    RETRY_SECONDS = 1.0

    def __init__(self, directory: Path | None, pii: set[str]):
        self.dir = directory
        self.pii = pii
        self._day = ""
        self._fh: Any = None
        self.ok = True
        self.error: str | None = None
        self.lines_written = 0
        self._retry_at = 0.0
        if directory:
            self._ensure_dir()

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def _fail(self, what: str, path: Path, err: OSError) -> None:
        self.ok = False
        self.error = f"cannot {what} {path}: {err.strerror or err}"
        self._retry_at = time.monotonic() + self.RETRY_SECONDS
        if self._fh:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh, self._day = None, ""

    def _ensure_dir(self) -> bool:
        assert self.dir is not None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            return True
        except OSError as err:
            self._fail("create the folder", self.dir, err)
            return False

    def _file(self, now: datetime) -> Any:
        day = now.strftime("%Y-%m-%d")
        if day != self._day:
            if self._fh:
                self._fh.close()
                self._fh = None
            assert self.dir is not None
            self._fh = open(self.dir / f"{day}.jsonl", "ab", buffering=0)
            self._day = day
        return self._fh

    def write(self, entries: list[bytes]) -> int:
        """Append ``entries``; returns how many lines were dropped because the log cannot be written."""
        if not self.dir or not entries:
            return 0
        if not self.ok and time.monotonic() < self._retry_at:
            return len(entries)
        if not self.ok and not self._ensure_dir():
            return len(entries)
        now = datetime.now(timezone.utc)
        data = b"".join(entries)
        try:
            fh = self._file(now)
            n = fh.write(data)
            while n < len(data):  # an unbuffered write may be short (a full disk): say so
                k = fh.write(memoryview(data)[n:])
                if not k:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                n += k
        except OSError as err:
            self._fail("write", self.dir / f"{now.strftime('%Y-%m-%d')}.jsonl", err)
            return len(entries)
        if not self.ok:
            self.ok, self.error = True, None
        self.lines_written += len(entries)
        return 0

    def close(self) -> None:
        if self._fh:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None


# --------------------------------------------------------------------------------------------
# The app


def native_threads() -> dict[str, int]:
    """The size of each native thread pool loaded in this process (``openmp``, ``blas``), as
    threadpoolctl reads it from the libraries themselves: the deployer sizes them through the
    environment (``model_threads``), and ``/version`` shows what the libraries actually took."""
    from threadpoolctl import threadpool_info

    out: dict[str, int] = {}
    for pool in threadpool_info():
        api = str(pool.get("user_api"))
        out[api] = max(out.get(api, 0), int(pool.get("num_threads") or 0))
    return out


class ModelApp:
    RECENT = 200           # /health's "recent" window: the last scored requests
    ALL_FAILING_MIN = 20   # degraded when the model raised on every one of at least this many

    def __init__(self, model: LoadedModel, *, endpoint: str, env: str, pii: list[str],
                 log_dir: Path | None, max_batch: int = 64, batch_wait_ms: float = 2.0,
                 limits: dict[str, Any] | None = None, http_limits: Any = None,
                 access: AccessTable | None = None, pass_through: list[str] | None = None,
                 log_url: str | None = None, log_settings: dict[str, Any] | None = None):
        import pandas as pd

        self._pd = pd
        self.model = model
        self.endpoint, self.env = endpoint, env
        self.feature_names = [c.name for c in model.columns]
        self.pii = set(pii)
        self.log: Any
        if log_url:  # Parquet segments on S3, written by a thread (resources.serving.segment_log)
            from resources.serving.segment_log import SegmentLog

            self.log = SegmentLog(log_url, model=model.name, version=model.version,
                                  columns=[(c.name, c.kind) for c in model.columns if c.name not in self.pii],
                                  **(log_settings or {}))
        else:
            self.log = InferenceLog(log_dir, self.pii)
        self._log_on = self.log.enabled
        self._log_rows = log_url is not None  # rows (tuples) for the segment writer, not JSON lines
        self.max_batch = max_batch
        lim = {**DEFAULT_LIMITS, **(limits or {})}
        self.max_body = int(lim["max_body_bytes"])
        self.max_rows = int(lim["max_request_rows"])
        self.max_depth = int(lim["max_json_depth"])
        self.deadline = float(lim["request_deadline_s"])
        self.onepath_http_limits = http_limits  # read by resources.serving.http_limits.protocol_for
        self.metrics = Metrics()
        self._trimmer = _HeapTrimmer()
        self.recent: deque[bool] = deque(maxlen=self.RECENT)  # True: the model raised on that request
        self.started = time.time()
        self.labels = f'endpoint="{endpoint}",env="{env}"'
        # who may call: every route but /health is judged; no table given means the backend's own
        # credentials only (there is no way to serve without a judge)
        self.access = access if access is not None else AccessTable(endpoint, env, None, [])
        self._pending: list[tuple[list[dict[str, Any]], asyncio.Future, str, float]] = []
        self._pending_rows = 0
        self._arrivals = 0  # requests submitted so far; _collect watches it move
        self._arrivals_seen = 0
        self._batch_opened = 0.0
        self._collecting: asyncio.Handle | None = None
        self._deadlines: deque[tuple[float, asyncio.Future]] = deque()  # (due, future) in arrival order
        self._sweeping: asyncio.TimerHandle | None = None
        self.batch_wait = batch_wait_ms / 1000.0
        # what a caller needs to know; the process facts are the supervisor's alone (WORKER_ROUTE)
        self._version_body = orjson.dumps({
            "endpoint": endpoint, "env": env, "model": model.name, "version": model.version,
            "digest": model.digest, "flavor": model.flavor, "features": self.feature_names,
        })
        self._worker_body = orjson.dumps({
            "pid": os.getpid(), "run_id": model.run_id,
            "loaded_at": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "native_threads": native_threads(), "version": model.version, "digest": model.digest,
        })
        dtypes = {"number": "float64", "integer": "int64", "string": "object", "boolean": "bool"}
        self._dtypes = {c.name: dtypes[c.kind] for c in model.columns if c.required}
        import numpy as np

        self._np = np
        # inference log: which inputs are logged; which keys of a record outside the signature are logged
        # (declared pass-through, never PII); every other key is dropped from the log and counted
        self._logged_features = [k for k in self.feature_names if k not in self.pii]
        self._features = set(self.feature_names)
        self.pass_through = [c for c in (pass_through or []) if c not in self.pii and c not in self._features]
        self._pass = frozenset(self.pass_through)
        self._columns_typed = [(c.name, np.dtype(self._dtypes[c.name]) if c.name in self._dtypes else None)
                               for c in model.columns]

    # -- health -----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """What ``/health`` answers a caller of this endpoint (200 whenever the worker serves; anyone else
        hears only ``status``). ``status`` is "degraded", with each reason in ``problems``, while the
        inference log cannot be written or while the model raised on every one of the last (at least
        ``ALL_FAILING_MIN``) requests."""
        self.access.refresh()  # /health is not judged: look at the table here, so it reports what serves
        problems = list(self.access.problems)
        log = self.log
        if log.enabled and not log.ok:
            problems.append(f"inference log: {log.error}")
        n, failed = len(self.recent), sum(self.recent)
        if n >= self.ALL_FAILING_MIN and failed == n:
            problems.append(f"model errors: {failed} of the last {n} requests failed")
        return {
            "status": "degraded" if problems else "ok", "version": self.model.version, "problems": problems,
            "inference_log": {"enabled": log.enabled, "ok": log.ok, "error": log.error,
                              "lines_written": log.lines_written,
                              **({"store": log.store, "rows_pending": log.pending, "rows_flushed": log.flushed,
                                  "rows_dropped": log.dropped} if self._log_rows else {})},
            "recent": {"predictions": n - failed, "model_errors": failed},
        }

    # -- scoring ----------------------------------------------------------------------------
    def frame(self, records: list[dict[str, Any]]) -> Any:
        """The model's input: exactly the signature's columns, in order, typed; nothing else.

        Required columns become typed numpy arrays directly (validation has already checked every
        value), which is ~15x cheaper per batch than building an untyped frame and ``astype``-ing
        it; optional columns (which may hold nulls) keep pandas' own inference.
        """
        np = self._np
        data = {}
        for name, dtype in self._columns_typed:
            values = [r.get(name) for r in records]
            data[name] = np.array(values, dtype=dtype) if dtype is not None else values
        return self._pd.DataFrame(data, columns=self.feature_names, copy=False)

    def score_now(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = self.model.predict(self.frame(records))
        if len(out) != len(records):
            raise RuntimeError(f"the model returned {len(out)} rows for {len(records)}")
        return out

    def self_test(self) -> None:
        if self.model.input_example:
            records = validate_records(self.model.input_example, self.model.columns)
            self.score_now(records)

    def _submit(self, records: list[dict[str, Any]], request_id: str, t0: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((records, fut, request_id, t0))
        dl = self._deadlines
        while dl and dl[0][1].done():  # answered ones go at once: nothing outlives its request here
            dl.popleft()
        dl.append((t0 + self.deadline, fut))
        if self._sweeping is None:
            self._sweeping = loop.call_later(1.0, self._sweep)
        self._pending_rows += len(records)
        self._arrivals += 1
        if self._pending_rows >= self.max_batch:  # a full batch does not wait
            if self._collecting is not None:
                self._collecting.cancel()
                self._collecting = None
            self._flush()
        elif self._collecting is None:
            self._batch_opened = time.perf_counter()
            self._arrivals_seen = self._arrivals
            self._collecting = loop.call_soon(self._collect)
        return fut

    def _sweep(self) -> None:
        """The request deadline: once a second, a request still unanswered ``deadline`` seconds after
        it arrived gets a 503 (scoring resolves every future it takes, so this is the net under a
        bug, not a path). Requests arrive in deadline order: the sweep looks at the oldest only."""
        self._sweeping = None
        now, dl = time.perf_counter(), self._deadlines
        while dl and (dl[0][1].done() or dl[0][0] <= now):
            due, fut = dl.popleft()
            if not fut.done():
                fut.set_exception(RequestError(503, f"no answer within {self.deadline:g} s (the request "
                                                    f"deadline); try again"))
        if dl:
            self._sweeping = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def _collect(self) -> None:
        """Score the pending rows once a loop iteration brought no new request, or after batch_wait.

        Concurrent clients' requests reach the socket a few microseconds apart, so flushing on the
        very next loop iteration splits them into several small batches, each paying the model's
        fixed per-call cost (pandas + sklearn, ~3 ms here). Waiting while requests are still
        arriving, never longer than ``batch_wait`` and never when none arrive, keeps them together;
        a lone request is scored on the next iteration, as before.
        """
        self._collecting = None
        if not self._pending:
            return
        if self._arrivals != self._arrivals_seen and time.perf_counter() - self._batch_opened < self.batch_wait:
            self._arrivals_seen = self._arrivals
            self._collecting = asyncio.get_running_loop().call_soon(self._collect)
            return
        self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._pending_rows = 0
        i = 0
        try:
            while i < len(pending):
                chunk, n = [], 0
                while i < len(pending) and (not chunk or n + len(pending[i][0]) <= self.max_batch):
                    chunk.append(pending[i])
                    n += len(pending[i][0])
                    i += 1
                self._score_chunk(chunk)
        finally:  # whatever happened, no request taken off the queue is left unanswered
            for _, fut, _, _ in pending:
                if not fut.done():
                    fut.set_exception(RequestError(500, "internal error: the request was not scored"))

    def _score_chunk(self, chunk: list) -> None:
        """Score one micro-batch and resolve every future of it, whatever happens.

        Each request is judged alone: if the batch's model call raises, the chunk is split in halves
        and each half scored again, down to single requests, so only a request the model raises on
        by itself gets the 500 (counted in ``model_errors``) and the others get exactly the answer
        they would have got alone (one bad request among n costs about 2*log2(n) extra model
        calls, not n). A log line that cannot be built or written never touches an answer."""
        try:
            results = self._score_requests([recs for recs, *_ in chunk])
            lines: list[bytes] = []
            now = datetime.now(timezone.utc) if self._log_on else None
            ts = now.isoformat() if now is not None and not self._log_rows else ""
            ts_us = _epoch_us(now) if now is not None and self._log_rows else 0
            for (recs, fut, request_id, t0), res in zip(chunk, results):
                if isinstance(res, RequestError):
                    self.recent.append(True)
                    if not fut.done():
                        fut.set_exception(res)
                    continue
                self.recent.append(False)
                self.metrics.rows += len(recs)
                if not fut.done():
                    fut.set_result(res)
                if self._log_rows:
                    self._log_rows_of(lines, ts_us, recs, res, request_id, t0)
                elif self._log_on:
                    self._log_lines(lines, ts, recs, res, request_id, t0)
            dropped = self.log.write(lines)
            if dropped:  # a full disk must not take predictions down; it shows in /health and metrics
                self.metrics.log_errors += 1
                self.metrics.log_rows_dropped += dropped
        finally:
            for _, fut, _, _ in chunk:
                if not fut.done():
                    fut.set_exception(RequestError(500, "internal error: the request was not scored"))

    def _score_requests(self, requests: list[list[dict[str, Any]]]) -> list[Any]:
        """Per request, its predictions or the RequestError (500) the model gave it alone."""
        try:
            out = self.score_now([r for recs in requests for r in recs])
        except Exception as err:
            if len(requests) > 1:
                self.metrics.batch_splits += 1
                half = len(requests) // 2
                return self._score_requests(requests[:half]) + self._score_requests(requests[half:])
            self.metrics.model_errors += 1
            return [RequestError(500, f"model error: {type(err).__name__}: {str(err)[:500]}")]
        self.metrics.batches += 1
        results, pos = [], 0
        for recs in requests:
            results.append(out[pos:pos + len(recs)])
            pos += len(recs)
        return results

    def _log_rows_of(self, rows: list[tuple], ts_us: int, recs: list[dict[str, Any]], res: list[Any],
                     request_id: str, t0: float) -> None:
        """The segment writer's rows: what ``_log_lines`` logs (the same PII and pass-through rules), as
        ``(ts_us, request_id, inputs, extras, output, latency_ms)`` tuples; the writer's thread encodes them."""
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        one = len(recs) == 1
        for j, (rec, o) in enumerate(zip(recs, res)):
            inputs, extras = self._logged_parts(rec)
            rows.append((ts_us, request_id if one else f"{request_id}:{j}", inputs, extras, o, latency_ms))

    def _logged_parts(self, rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the log keeps of one record, for either log: ``(inputs, extras)``, the logged signature columns
        (never a PII column) and the declared pass-through columns; a field that is neither is counted as
        undeclared and not logged."""
        extras, undeclared = {}, 0
        passed, features = self._pass, self._features
        for k, v in rec.items():
            if k in passed:
                extras[k] = v
            elif k not in features:
                undeclared += 1
        if undeclared:
            self.metrics.undeclared_fields += undeclared
        return {k: rec.get(k) for k in self._logged_features}, extras

    def _log_lines(self, lines: list[bytes], ts: str, recs: list[dict[str, Any]], res: list[Any],
                   request_id: str, t0: float) -> None:
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        for j, (rec, o) in enumerate(zip(recs, res)):
            inputs, extras = self._logged_parts(rec)
            entry = {
                "ts": ts, "request_id": request_id if len(recs) == 1 else f"{request_id}:{j}",
                "model": self.model.name, "version": self.model.version,
                "inputs": inputs, "extras": extras, "output": o, "latency_ms": latency_ms,
            }
            try:
                lines.append(orjson.dumps(entry) + b"\n")
            except (TypeError, orjson.JSONEncodeError) as err:  # validation keeps this out; never an answer
                entry["extras"] = {"_not_logged": f"{type(err).__name__}: {err}"}
                lines.append(orjson.dumps(entry, default=str) + b"\n")

    # -- ASGI -------------------------------------------------------------------------------
    def onepath_protocol_response(self, path: str | None, status: int) -> None:
        """A response the HTTP protocol layer sent itself (414/431/408/400): counted like ours."""
        self.metrics.count(path if path in ROUTES else "other", status)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    self.log.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = scope["path"]
        route = path if path in ROUTES else "other"
        t0 = time.perf_counter()
        caller = None
        try:
            server = scope.get("server")
            # uvicorn's scope["server"] is (path, None) on a Unix socket, (host, port) on TCP
            over_unix = server is not None and server[1] is None
            if route == "/health":  # open to anyone, but only a caller of this endpoint hears more than ok/degraded
                full = self.access.judge(scope["headers"], "/version", over_unix, time.time()).ok
                doc = self.health()
                await self._send(send, route, 200, orjson.dumps(doc if full else {"status": doc["status"]}), t0)
                return
            # every other route, an unknown one too, needs a credential
            verdict = self.access.judge(scope["headers"], path, over_unix, time.time())
            caller = verdict.caller
            if verdict.status != 200:
                await self._refuse(send, route, verdict, t0)
                return
            await self._route(scope, receive, send, route, t0, caller)
        except Exception as err:  # a JSON 500 that is counted, never uvicorn's bare one
            print(f"onepath model server: unexpected {type(err).__name__} on {route}: {err}", file=sys.stderr)
            try:
                await self._send(send, route, 500, orjson.dumps(
                    {"error": f"internal error: {type(err).__name__}"}), t0, caller=caller)
            except Exception:  # the response had started: uvicorn closes the connection
                pass

    async def _refuse(self, send: Callable, route: str, verdict: Verdict, t0: float) -> None:
        """401 (no credential, or not one of ours) or 403 (ours, but not for this): a message that never
        repeats the token; a 401 says how to authenticate."""
        body = orjson.dumps({"error": verdict.message, "credential": verdict.credential or "refused"})
        await self._send(send, route, verdict.status, body, t0,
                         UNAUTHORIZED_HEADERS if verdict.status == 401 else None, caller=verdict.caller, refused=True)

    async def _route(self, scope: dict, receive: Callable, send: Callable, route: str, t0: float,
                     caller: str | None = None) -> None:
        method = scope["method"]
        if route in ("/predict", "/invocations"):
            if method != "POST":
                await self._send(send, route, 405, b'{"error":"use POST"}', t0, caller=caller)
                return
            await self._predict(scope, receive, send, route, t0, caller)
        elif route == "/version":
            await self._send(send, route, 200, self._version_body, t0, caller=caller)
        elif route == WORKER_ROUTE:
            await self._send(send, route, 200, self._worker_body, t0, caller=caller)
        elif route == "/metrics":
            body = self.metrics.render(self.labels, self.model.version, self.started,
                                       log_ok=self.log.ok or not self.log.enabled, log=self.log)
            await self._send(send, route, 200, body, t0, [(b"content-type", b"text/plain; version=0.0.4")],
                             caller=caller)
        else:
            await self._send(send, route, 404, b'{"error":"not found"}', t0, caller=caller)

    async def _read_body(self, scope: dict, receive: Callable) -> bytes | None:
        """The request body, or None if the client went away; a RequestError (413) past the limit,
        from the content-length before a byte is read, or as soon as a chunked body passes it."""
        limit = self.max_body
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    size = int(v)
                except ValueError:
                    raise RequestError(400, f"content-length {v[:40]!r} is not a number") from None
                if size > limit:
                    raise RequestError(413, f"body of {size} bytes; the limit is {limit} (max_body_bytes)")
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        if not msg.get("more_body", False):  # the usual case: the whole body in one message
            return msg.get("body", b"")
        parts, size = [msg.get("body", b"")], len(msg.get("body", b""))
        try:
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return None  # the client went away: nothing is answered, nothing is kept
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"body larger than {limit} bytes (max_body_bytes)")
                parts.append(chunk)
                if not msg.get("more_body", False):
                    return b"".join(parts)
        finally:
            if size >= _TRIM_AFTER_BYTES:
                self._trimmer.soon()

    async def _predict(self, scope: dict, receive: Callable, send: Callable, route: str, t0: float,
                       caller: str | None = None) -> None:
        request_id = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v.decode("latin-1")[:128]
        request_id = request_id or uuid.uuid4().hex
        try:
            body = await self._read_body(scope, receive)
            if body is None:
                return
            records = (parse_predict_body(body) if route == "/predict"
                       else parse_invocations_body(body, self.max_rows))
            validate_records(records, self.model.columns, self.max_rows,
                             self.max_depth if (body.count(b"[") + body.count(b"{")) > self.max_depth else None)
            out = await self._submit(records, request_id, t0)
        except RequestError as err:
            await self._send(send, route, err.status, err.body(), t0, request_id=request_id, caller=caller)
            return
        if route == "/predict":
            payload = {"request_id": request_id, "model": self.model.name, "version": self.model.version,
                       "predictions": out}
        else:
            payload = {"predictions": [o.get("prediction") for o in out]}
        await self._send(send, route, 200, orjson.dumps(payload), t0, request_id=request_id, caller=caller)

    async def _send(self, send: Callable, route: str, status: int, body: bytes, t0: float,
                    headers: list | None = None, request_id: str | None = None, caller: str | None = None,
                    refused: bool = False) -> None:
        hdrs = list(headers or JSON_HEADERS)
        hdrs.append((b"content-length", str(len(body)).encode()))
        if not refused:  # a caller refused learns nothing of what serves here
            hdrs.append((b"x-model-version", self.model.version.encode()))
        if request_id:
            hdrs.append((b"x-request-id", request_id.encode("latin-1", "replace")))
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})
        if refused:
            self.metrics.refused(route, status, caller or ANONYMOUS)
            return
        if route in ("/predict", "/invocations"):
            self.metrics.observe(route, status, time.perf_counter() - t0)
        else:
            self.metrics.count(route, status)
        if caller is not None:
            self.metrics.count_caller(caller, route, status)


_TRIM_AFTER_BYTES = 16 * 1024


class _HeapTrimmer:
    """Give the C heap's free pages back to the system a second after large bodies were freed.

    Bodies arrive in pieces of up to 64 KiB, below glibc's mmap threshold, so they live on the heap
    and, once freed, stay in the process's RSS (300 clients that sent part of a 100 KB body and
    gave up left a worker ~20-65 MB larger for good). ``malloc_trim(0)`` returns those pages; it runs
    at most once a second and only after a body of 16 KiB or more, never on the small-request path.
    No-op where glibc is not the allocator."""

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        self._trim: Callable[[int], int] | None = None
        try:
            import ctypes

            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            pass

    def soon(self) -> None:
        if self._trim is not None and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(1.0, self._run)

    def _run(self) -> None:
        self._handle = None
        assert self._trim is not None
        self._trim(0)


def build_app(config: dict[str, Any]) -> ModelApp:
    model = load_model(Path(config["model_dir"]), config["model_name"], str(config["version"]),
                       config.get("expected_digest"))
    access = AccessTable(config["endpoint"], config["env"], config.get("access_file"),
                         config.get("backend_credentials") or [])
    app = ModelApp(
        model, endpoint=config["endpoint"], env=config["env"], pii=config.get("pii_columns", []),
        log_dir=Path(config["log_dir"]) if config.get("log_dir") else None,
        log_url=config.get("log_url") or None,
        log_settings=_segment_settings() if config.get("log_url") else None,
        max_batch=int(config.get("max_batch", 64)),
        batch_wait_ms=float(config.get("batch_wait_ms", 2.0)),
        limits={k: config[k] for k in DEFAULT_LIMITS if config.get(k) is not None},
        http_limits=_http_limits(config), access=access,
        pass_through=list(config.get("pass_through_columns") or []),
    )
    app.self_test()
    return app


def _segment_settings() -> dict[str, Any]:
    from resources.serving.segment_log import settings_from_env

    return settings_from_env()


def _epoch_us(t: datetime) -> int:
    delta = t - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _http_limits(config: dict[str, Any]) -> Any:
    """The protocol layer's limits (``resources.serving.http_limits.Limits``), any field overridden by
    the config key of the same name."""
    from dataclasses import fields, replace

    from resources.serving.http_limits import Limits

    over = {f.name: config[f.name] for f in fields(Limits) if config.get(f.name) is not None}
    return replace(Limits(), **over)


def main(argv: list[str] | None = None) -> None:
    from resources.serving.child import serve

    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 1:
        print("usage: python -m resources.serving.model_server CONFIG.json", file=sys.stderr)
        raise SystemExit(2)
    config = json.loads(Path(argv[0]).read_text())
    try:
        app = build_app(config)
    except ArtifactRefused as err:  # not a crash: the supervisor must not restart it into the same refusal
        print(f"onepath model server: refused: {err}", file=sys.stderr)
        raise SystemExit(EXIT_ARTIFACT_REFUSED) from None
    except Exception as err:
        print(f"onepath model server: cannot load {config.get('model_name')} version "
              f"{config.get('version')}: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    # Everything loaded so far (modules, the model) lives as long as the process: keep it out of
    # the collector's full passes, which otherwise walk ~150k objects (~80 ms) mid-request.
    gc.freeze()
    serve(app)


if __name__ == "__main__":
    main()
