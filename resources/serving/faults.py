"""A fault-injecting model: a real sklearn model behind an MLflow pyfunc wrapper that misbehaves on purpose.

Tests (and drills) use it to make a version fail the way production versions fail, through the real
model server and supervisor, with no stub anywhere:

* ``error_rate``: the share of model calls that raise (so every request of that micro-batch is
  answered 500 and counted in ``/metrics``). Deterministic, not random: call *k* (1-based) raises
  when ``floor(k * rate) > floor((k - 1) * rate)``, so after *n* calls exactly ``floor(n * rate)``
  raised and the first call (the model server's self-test on the input example) succeeds whenever
  ``rate < 1``. ``error_rate=1`` therefore fails the self-test at start: a version that never starts.
* ``latency_ms``: added to every call (the model's own compute, so it blocks the worker's loop).
* ``fail_on_load``: ``load_context`` raises: the server exits while loading, the deploy fails.
* ``exit_after_s``: the serving process exits (code 70) this many seconds after the model loaded,
  every time it is started: a version that crash-loops. Only inside a worker started by the
  supervisor (``ONEPATH_WORKER_INDEX`` set), never in the process that saves or inspects the model.

``save_fault_model(dst, base_model_dir=... | estimator=..., ...)`` writes an MLflow model directory
(flavour ``python_function`` only, so the model server loads it through ``mlflow.pyfunc``) with the
base model's signature and input example; it can be registered in MLflow like any model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

FAULT_EXIT_CODE = 70
_FAULTS = ("error_rate", "latency_ms", "fail_on_load", "exit_after_s")


class FaultInjected(RuntimeError):
    """Raised by the fault model on purpose."""


class FaultModel(mlflow.pyfunc.PythonModel):
    """Wraps the sklearn model stored as the artifact ``base_model``; faults come from ``faults.json``."""

    def load_context(self, context: Any) -> None:
        from mlflow.sklearn import load_model as load_sklearn

        cfg = json.loads(Path(context.artifacts["faults"]).read_text())
        unknown = set(cfg) - set(_FAULTS)
        if unknown:
            raise ValueError(f"faults.json: unknown fault {sorted(unknown)[0]!r} (known: {', '.join(_FAULTS)})")
        self.error_rate = float(cfg.get("error_rate", 0.0))
        self.latency_s = float(cfg.get("latency_ms", 0.0)) / 1000.0
        self.calls = 0
        self.lock = threading.Lock()
        if cfg.get("fail_on_load"):
            raise FaultInjected("fault injected: fail_on_load")
        self.estimator = load_sklearn(context.artifacts["base_model"])
        exit_after = cfg.get("exit_after_s")
        if exit_after is not None and os.environ.get("ONEPATH_WORKER_INDEX") is not None:
            timer = threading.Timer(float(exit_after), _die)
            timer.daemon = True
            timer.start()

    # a DataFrame in, a DataFrame out; the model server has already validated the columns
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        with self.lock:
            self.calls += 1
            k = self.calls
        if self.latency_s:
            time.sleep(self.latency_s)
        if math.floor(k * self.error_rate) > math.floor((k - 1) * self.error_rate):
            raise FaultInjected(f"fault injected: call {k} fails (error_rate {self.error_rate})")
        est = self.estimator
        classes = list(getattr(est, "classes_", []))
        if hasattr(est, "predict_proba") and len(classes) == 2:
            proba = est.predict_proba(model_input)[:, 1]
            labels = [classes[1] if p >= 0.5 else classes[0] for p in proba]
            return pd.DataFrame({"prediction": [_plain(v) for v in labels], "probability": proba.tolist()})
        return pd.DataFrame({"prediction": [_plain(v) for v in est.predict(model_input)]})


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _die() -> None:
    print(f"fault injected: exit_after_s reached, exiting with {FAULT_EXIT_CODE}", flush=True)
    os._exit(FAULT_EXIT_CODE)


def save_fault_model(dst: Path | str, *, base_model_dir: Path | str | None = None, estimator: Any = None,
                     signature: Any = None, input_example: Any = None, error_rate: float = 0.0,
                     latency_ms: float = 0.0, fail_on_load: bool = False,
                     exit_after_s: float | None = None) -> Path:
    """Write a fault-injecting MLflow model at ``dst`` and return ``dst``.

    The real model is either an MLflow sklearn model directory (``base_model_dir``; its signature
    and input example are reused) or an ``estimator`` (then pass ``signature`` and, if the server
    should self-test it, ``input_example``).
    """
    from mlflow.models import Model

    if (base_model_dir is None) == (estimator is None):
        raise ValueError("save_fault_model: give exactly one of base_model_dir and estimator")
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"save_fault_model: error_rate must be within 0..1, got {error_rate}")
    if latency_ms < 0 or (exit_after_s is not None and exit_after_s <= 0):
        raise ValueError("save_fault_model: latency_ms must be >= 0 and exit_after_s > 0")
    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="onepath-fault-") as tmp:
        if base_model_dir is not None:
            base = Path(base_model_dir)
            if not (base / "MLmodel").exists():
                raise ValueError(f"save_fault_model: {base} is not an MLflow model directory (no MLmodel file)")
            meta = Model.load(str(base / "MLmodel"))
            if "sklearn" not in meta.flavors:
                raise ValueError(f"save_fault_model: {base} is not an sklearn model (flavours: "
                                 f"{', '.join(meta.flavors)})")
            signature = signature if signature is not None else meta.signature
            if input_example is None:
                input_example = _input_example(base, meta)
        else:
            from mlflow.sklearn import save_model as save_sklearn

            from resources.mlflow_registry import trusted_types

            base = Path(tmp) / "base_model"
            save_sklearn(estimator, str(base), serialization_format="skops",
                                      skops_trusted_types=trusted_types(estimator))
        if signature is None:
            raise ValueError("save_fault_model: the model needs a signature (the server validates requests with it)")
        faults = Path(tmp) / "faults.json"
        cfg: dict[str, Any] = {"error_rate": error_rate, "latency_ms": latency_ms, "fail_on_load": fail_on_load}
        if exit_after_s is not None:
            cfg["exit_after_s"] = exit_after_s
        faults.write_text(json.dumps(cfg))
        if dst.exists():
            shutil.rmtree(dst)
        mlflow.pyfunc.save_model(
            str(dst), python_model=FaultModel(), artifacts={"base_model": str(base), "faults": str(faults)},
            signature=signature, input_example=input_example, pip_requirements=_requirements(),
        )
    return dst


def _requirements() -> list[str]:
    """What the model needs, stated (MLflow would otherwise load the model in a subprocess to guess)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "scikit-learn", "skops", "pandas", "cloudpickle")]


def _input_example(base: Path, meta: Any) -> Any:
    """The base model's saved input example as a DataFrame, or None."""
    import pandas as pd

    info = getattr(meta, "saved_input_example_info", None) or {}
    path = base / info.get("artifact_path", "input_example.json")
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "dataframe_split" in data:
        data = data["dataframe_split"]
    if isinstance(data, dict) and "columns" in data and "data" in data:
        return pd.DataFrame(data["data"], columns=data["columns"])
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return pd.DataFrame(data)
    return None
