"""onepath's model server: one model version, loaded once, behind a lean ASGI app on uvicorn.

Routes: ``POST /predict`` (one record object or ``{"records": [...]}``), ``POST /invocations``
(MLflow's ``dataframe_records`` / ``dataframe_split`` / ``inputs`` shapes), ``GET /health``,
``GET /version``, ``GET /metrics`` (Prometheus text).

Every request is validated against the model's MLflow signature before it reaches the model: a
missing column or a wrong type is a 422 naming the column, a malformed body a 400. Columns outside
the signature (an application id passed through for tracing) never reach the model; they are kept
in the inference log unless declared PII. Rows of concurrent requests are scored together in one
model call (micro-batching), which is where most of the throughput comes from: a batch closes when
an event-loop iteration brings no new request, after ``batch_wait_ms`` (config, default 2) or at
``max_batch`` rows, whichever comes first; a lone request does not wait.

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
import gc
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson

from resources.serving.exit_codes import EXIT_ARTIFACT_REFUSED

JSON_HEADERS = [(b"content-type", b"application/json")]
SIGNATURE_TYPES = {
    "double": "number", "float": "number", "long": "integer", "integer": "integer",
    "string": "string", "boolean": "boolean", "datetime": "string",
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RequestError(Exception):
    def __init__(self, status: int, message: str, column: str | None = None):
        super().__init__(message)
        self.status, self.message, self.column = status, message, column

    def body(self) -> bytes:
        out: dict[str, Any] = {"error": self.message}
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


def validate_records(records: Any, columns: list[Column]) -> list[dict[str, Any]]:
    if not isinstance(records, list) or not records:
        raise RequestError(400, "expected a non-empty list of records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise RequestError(400, f"record {i} is not a JSON object")
        for col in columns:
            v = rec.get(col.name, _MISSING)
            if v is _MISSING or v is None:
                if col.required:
                    what = "missing" if v is _MISSING else "null"
                    raise RequestError(422, f"record {i}: column '{col.name}' is {what}", col.name)
                continue
            k = col.kind
            ok = (
                (k == "number" and type(v) in (int, float) and math.isfinite(v))
                or (k == "integer" and (type(v) is int or (type(v) is float and v.is_integer())))
                or (k == "string" and type(v) is str)
                or (k == "boolean" and type(v) is bool)
            )
            if not ok:
                raise RequestError(
                    422, f"record {i}: column '{col.name}' must be {k}, got {type(v).__name__} {v!r}", col.name
                )
    return records


_MISSING = object()


def parse_predict_body(body: bytes) -> list[dict[str, Any]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    if isinstance(data, dict) and "records" in data and isinstance(data["records"], list):
        return data["records"]
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return data
    raise RequestError(400, "expected a JSON object (one record) or {\"records\": [...]}")


def parse_invocations_body(body: bytes) -> list[dict[str, Any]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "expected a JSON object with dataframe_records, dataframe_split or inputs")
    if "dataframe_records" in data:
        return data["dataframe_records"]
    if "dataframe_split" in data:
        split = data["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("columns"), list) or not isinstance(
            split.get("data"), list
        ):
            raise RequestError(400, "dataframe_split needs 'columns' and 'data' lists")
        cols = split["columns"]
        out = []
        for row in split["data"]:
            if not isinstance(row, list) or len(row) != len(cols):
                raise RequestError(400, "dataframe_split row length differs from 'columns'")
            out.append(dict(zip(cols, row)))
        return out
    if "inputs" in data:
        inputs = data["inputs"]
        if isinstance(inputs, dict):
            lengths = {len(v) for v in inputs.values() if isinstance(v, list)}
            if len(lengths) != 1 or len(inputs) != sum(isinstance(v, list) for v in inputs.values()):
                raise RequestError(400, "'inputs' as columns needs lists of one length")
            n = lengths.pop()
            return [{k: v[i] for k, v in inputs.items()} for i in range(n)]
        return inputs
    raise RequestError(400, "expected dataframe_records, dataframe_split or inputs")


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
    log_errors: int = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if status >= 400:
            self.errors += 1
        i = 0
        while i < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[i]:
            i += 1
        self.bucket_counts[i] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def render(self, labels: str, version: str, started: float) -> bytes:
        lines = [
            "# HELP onepath_requests_total HTTP requests by route and status.",
            "# TYPE onepath_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'onepath_requests_total{{{labels},route="{route}",status="{status}"}} {n}')
        lines += [
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
            "# HELP onepath_batches_total Model calls (each scores one micro-batch).",
            "# TYPE onepath_batches_total counter",
            f"onepath_batches_total{{{labels}}} {self.batches}",
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


# --------------------------------------------------------------------------------------------
# Inference log


class InferenceLog:
    """Appends JSON lines, one per scored row, to ``<dir>/<YYYY-MM-DD>.jsonl``; never a PII column."""

    def __init__(self, directory: Path | None, pii: set[str]):
        self.dir = directory
        self.pii = pii
        self._day = ""
        self._fh: Any = None
        if directory:
            directory.mkdir(parents=True, exist_ok=True)

    def _file(self, now: datetime) -> Any:
        day = now.strftime("%Y-%m-%d")
        if day != self._day:
            if self._fh:
                self._fh.close()
            assert self.dir is not None
            self._fh = open(self.dir / f"{day}.jsonl", "ab", buffering=0)
            self._day = day
        return self._fh

    def write(self, entries: list[bytes]) -> None:
        if not self.dir or not entries:
            return
        self._file(datetime.now(timezone.utc)).write(b"".join(entries))

    def close(self) -> None:
        if self._fh:
            self._fh.close()
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
    def __init__(self, model: LoadedModel, *, endpoint: str, env: str, pii: list[str],
                 log_dir: Path | None, max_batch: int = 64, batch_wait_ms: float = 2.0):
        import pandas as pd

        self._pd = pd
        self.model = model
        self.endpoint, self.env = endpoint, env
        self.feature_names = [c.name for c in model.columns]
        self.pii = set(pii)
        self.log = InferenceLog(log_dir, self.pii)
        self.max_batch = max_batch
        self.metrics = Metrics()
        self.started = time.time()
        self.labels = f'endpoint="{endpoint}",env="{env}"'
        self._pending: list[tuple[list[dict[str, Any]], asyncio.Future, str, float]] = []
        self._pending_rows = 0
        self._arrivals = 0  # requests submitted so far; _collect watches it move
        self._arrivals_seen = 0
        self._batch_opened = 0.0
        self._collecting: asyncio.Handle | None = None
        self.batch_wait = batch_wait_ms / 1000.0
        self._version_body = orjson.dumps({
            "endpoint": endpoint, "env": env, "model": model.name, "version": model.version,
            "run_id": model.run_id, "digest": model.digest, "flavor": model.flavor, "pid": os.getpid(),
            "loaded_at": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "features": self.feature_names, "native_threads": native_threads(),
        })
        self._health_body = orjson.dumps({"status": "ok", "version": model.version})
        dtypes = {"number": "float64", "integer": "int64", "string": "object", "boolean": "bool"}
        self._dtypes = {c.name: dtypes[c.kind] for c in model.columns if c.required}
        import numpy as np

        self._np = np
        # inference log: which inputs are logged, which keys of a record are pass-through extras
        self._logged_features = [k for k in self.feature_names if k not in self.pii]
        self._not_extra = set(self._dtypes) | self.pii | set(self.feature_names)
        self._columns_typed = [(c.name, np.dtype(self._dtypes[c.name]) if c.name in self._dtypes else None)
                               for c in model.columns]

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
        return self.model.predict(self.frame(records))

    def self_test(self) -> None:
        if self.model.input_example:
            records = validate_records(self.model.input_example, self.model.columns)
            out = self.score_now(records)
            if len(out) != len(records):
                raise RuntimeError("self-test: the model returned a different number of rows")

    def _submit(self, records: list[dict[str, Any]], request_id: str, t0: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((records, fut, request_id, t0))
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
        while i < len(pending):
            chunk, n = [], 0
            while i < len(pending) and (not chunk or n + len(pending[i][0]) <= self.max_batch):
                chunk.append(pending[i])
                n += len(pending[i][0])
                i += 1
            self._score_chunk(chunk)

    def _score_chunk(self, chunk: list) -> None:
        rows = [r for recs, *_ in chunk for r in recs]
        try:
            out = self.score_now(rows)
        except Exception as err:  # the model raised: every request of the batch gets a 500
            self.metrics.model_errors += 1
            for _, fut, _, _ in chunk:
                if not fut.done():
                    fut.set_exception(RequestError(500, f"model error: {type(err).__name__}: {err}"))
            return
        self.metrics.batches += 1
        self.metrics.rows += len(rows)
        pos = 0
        now = time.time()
        ts = datetime.fromtimestamp(now, timezone.utc).isoformat()
        lines: list[bytes] = []
        for recs, fut, request_id, t0 in chunk:
            res = out[pos:pos + len(recs)]
            pos += len(recs)
            if self.log.dir:
                latency_ms = round((time.perf_counter() - t0) * 1000, 3)
                not_extra, logged = self._not_extra, self._logged_features
                for j, (rec, o) in enumerate(zip(recs, res)):
                    lines.append(orjson.dumps({
                        "ts": ts, "request_id": request_id if len(recs) == 1 else f"{request_id}:{j}",
                        "model": self.model.name, "version": self.model.version,
                        "inputs": {k: rec.get(k) for k in logged},
                        "extras": {k: v for k, v in rec.items() if k not in not_extra},
                        "output": o, "latency_ms": latency_ms,
                    }) + b"\n")
            if not fut.done():
                fut.set_result(res)
        try:
            self.log.write(lines)
        except OSError as err:  # a full disk must not take predictions down; it shows in metrics
            self.metrics.log_errors += 1
            print(f"inference log write failed: {err}", file=sys.stderr)

    # -- ASGI -------------------------------------------------------------------------------
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
        path, method = scope["path"], scope["method"]
        if path in ("/predict", "/invocations"):
            if method != "POST":
                await self._send(send, 405, b'{"error":"use POST"}')
                return
            await self._predict(scope, receive, send, path)
        elif path == "/health":
            await self._send(send, 200, self._health_body)
        elif path == "/version":
            await self._send(send, 200, self._version_body)
        elif path == "/metrics":
            body = self.metrics.render(self.labels, self.model.version, self.started)
            await self._send(send, 200, body, [(b"content-type", b"text/plain; version=0.0.4")])
        else:
            await self._send(send, 404, b'{"error":"not found"}')

    async def _predict(self, scope: dict, receive: Callable, send: Callable, route: str) -> None:
        t0 = time.perf_counter()
        request_id = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                request_id = v.decode("latin-1")[:128]
        request_id = request_id or uuid.uuid4().hex
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > 8 * 1024 * 1024:
                await self._finish(send, route, t0, RequestError(413, "body larger than 8 MiB"), request_id)
                return
        try:
            records = parse_predict_body(body) if route == "/predict" else parse_invocations_body(body)
            validate_records(records, self.model.columns)
            out = await self._submit(records, request_id, t0)
        except RequestError as err:
            await self._finish(send, route, t0, err, request_id)
            return
        if route == "/predict":
            payload = {"request_id": request_id, "model": self.model.name, "version": self.model.version,
                       "predictions": out}
        else:
            payload = {"predictions": [o.get("prediction") for o in out]}
        await self._send(send, 200, orjson.dumps(payload), request_id=request_id)
        self.metrics.observe(route, 200, time.perf_counter() - t0)

    async def _finish(self, send: Callable, route: str, t0: float, err: RequestError, request_id: str) -> None:
        await self._send(send, err.status, err.body(), request_id=request_id)
        self.metrics.observe(route, err.status, time.perf_counter() - t0)

    async def _send(self, send: Callable, status: int, body: bytes, headers: list | None = None,
                    request_id: str | None = None) -> None:
        hdrs = list(headers or JSON_HEADERS)
        hdrs.append((b"content-length", str(len(body)).encode()))
        hdrs.append((b"x-model-version", self.model.version.encode()))
        if request_id:
            hdrs.append((b"x-request-id", request_id.encode()))
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})


def build_app(config: dict[str, Any]) -> ModelApp:
    model = load_model(Path(config["model_dir"]), config["model_name"], str(config["version"]),
                       config.get("expected_digest"))
    app = ModelApp(
        model, endpoint=config["endpoint"], env=config["env"], pii=config.get("pii_columns", []),
        log_dir=Path(config["log_dir"]) if config.get("log_dir") else None,
        max_batch=int(config.get("max_batch", 64)),
        batch_wait_ms=float(config.get("batch_wait_ms", 2.0)),
    )
    app.self_test()
    return app


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
