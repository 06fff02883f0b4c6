"""Custom checks: a track's gate extended with a Python function, without forking onepath.

The contract (``onepath.CheckContext`` in, ``onepath.Verdict`` out)::

    import onepath

    def min_recall(ctx: onepath.CheckContext) -> onepath.Verdict:
        X, y = ctx.held_out                   # the registered held-out rows (loaded on first use)
        recall = recall_score(y, ctx.estimator.predict(X))
        return onepath.Verdict(recall >= ctx.params["min"], f"recall {recall:.3f} (min {ctx.params['min']})",
                               {"recall": recall})

Where a check comes from: a track's ``checks`` in the policy names it, and the name is either declared
once under the policy's ``custom_checks`` (``function: "pkg.mod:fn"``, or ``entry_point: name``), or
provided by an installed package in the ``onepath.checks`` entry-point group
(``[project.entry-points."onepath.checks"] min_recall = "acme_checks:min_recall"``). The policy is signed
and recorded, so a track's checks come from it only: a package can add a check nobody named, and it never
runs; it cannot take a built-in's name (built-in names always resolve to the built-ins, and the policy
refuses a ``custom_checks`` entry named like one); a name two installed packages provide is refused.

How it runs: in the gate, after the built-ins, for the exact version and environment being gated; its
verdict is recorded like theirs (the asset's blocking check, the ``gate_verdict`` ledger entry, the model
card). It fails closed, with one line naming the check and its function, when the function cannot be
imported, raises, returns anything but an ``onepath.Verdict``, or takes longer than its
``timeout_seconds`` (it is then left running in a daemon thread: Python cannot stop a thread; the verdict
does not wait for it). A package's code runs in the platform's process with the platform's rights:
install only packages you would let deploy.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

if TYPE_CHECKING:
    from platform_defs.policy import Policy

GROUP = "onepath.checks"
REASON_LIMIT = 300


@dataclass(frozen=True)
class Verdict:
    """What a custom check returns: passed or not, one line saying why, and numbers worth recording."""

    passed: bool
    reason: str
    metrics: Mapping[str, float | int | str | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.passed) is not bool:
            raise TypeError(f"Verdict.passed must be a bool, got {type(self.passed).__name__}")
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise TypeError("Verdict.reason must be a non-empty string")
        if not isinstance(self.metrics, Mapping):
            raise TypeError(f"Verdict.metrics must be a mapping, got {type(self.metrics).__name__}")
        for k, v in self.metrics.items():
            if not isinstance(k, str) or not isinstance(v, (bool, int, float, str)):
                raise TypeError(f"Verdict.metrics[{k!r}] must be a str key with a bool, int, float or str value")
            if isinstance(v, float) and not math.isfinite(v):
                raise TypeError(f"Verdict.metrics[{k!r}] is {v}: not a finite number")


class CheckContext:
    """What a custom check is given: the declaration, the exact version and environment being gated, the
    policy's ``params`` for it, and (for a model) the verified model and its registered data, each loaded
    on first use the way the built-in checks load them (never from an MLflow tag or run metric)."""

    def __init__(self, *, check: str, kind: Literal["model", "app"], subject: str, version: str, env: str,
                 track: str, params: Mapping[str, Any], spec: Any, model: Any = None, dataset: Any = None,
                 features: list[str] | None = None, label: str | None = None, build: Path | None = None,
                 _version: Any = None):
        self.check, self.kind, self.subject, self.version, self.env, self.track = check, kind, subject, version, env, track
        self.params = dict(params)
        self.spec, self.model, self.dataset = spec, model, dataset  # EndpointSpec/AppSpec, ModelSpec, DatasetSpec
        self.features, self.label = list(features or []), label
        self.build = build  # an app release: its build folder
        self._v = _version

    @classmethod
    def for_test(cls, *, estimator: Any = None, X: Any = None, y: Any = None, params: Mapping[str, Any] | None = None,
                 check: str = "check", subject: str = "test", version: str = "1", env: str = "staging",
                 track: str = "ml-standard", build: Path | None = None) -> "CheckContext":
        """A context over what you give it (a fitted model and held-out rows; or, for an app check, a build
        folder), for your check's own unit tests: ``ctx.estimator``, ``ctx.held_out`` and ``ctx.metrics`` are
        yours. The gate never uses it."""
        given = _Given(estimator, X, y) if build is None else None
        return cls(check=check, kind="model" if build is None else "app", subject=subject, version=version, env=env,
                   track=track, params=params or {}, spec=None, features=list(getattr(X, "columns", [])),
                   label=getattr(y, "name", None), build=build, _version=given)

    def _model_only(self, what: str) -> Any:
        if self._v is None:
            raise TypeError(f"ctx.{what} is for model checks: '{self.subject}' is an app release")
        return self._v

    @property
    def registration(self) -> dict[str, Any]:
        """The version's ``model_registered`` ledger entry (digest, data hashes, split, author, ...)."""
        return dict(self._model_only("registration").require_registration().data)

    @property
    def estimator(self) -> Any:
        """The version's model, built from a copy that hashes to its registered digest (predict/predict_proba)."""
        return self._model_only("estimator").estimator

    @property
    def held_out(self) -> tuple[Any, Any]:
        """``(X, y)``: the held-out rows the version was registered with (features, label)."""
        X, y, _ = self._model_only("held_out").held_out
        return X, y

    @property
    def metrics(self) -> dict[str, float]:
        """Held-out metrics recomputed on the verified model (roc_auc, accuracy, f1, ...)."""
        return dict(self._model_only("metrics").held_out_metrics)

    @property
    def snapshot(self) -> Any:
        """The training snapshot (a DataFrame) by its registered content hash."""
        return self._model_only("snapshot").snapshot


class _Given:
    """What ``CheckContext.for_test`` was given, in the shape of the gate's candidate version."""

    def __init__(self, estimator: Any, X: Any, y: Any):
        self.estimator, self.held_out = estimator, (X, y, X)

    @property
    def held_out_metrics(self) -> dict[str, float]:
        from platform_defs.factories import evaluate_classifier

        return evaluate_classifier(self.estimator, self.held_out[0], self.held_out[1])

    @property
    def snapshot(self) -> Any:
        raise TypeError("ctx.snapshot: CheckContext.for_test was given no snapshot")

    def require_registration(self) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(data={})


@dataclass(frozen=True)
class Provider:
    name: str
    function: str  # what runs: an import path, or "entry point <name> = <value>"
    provided_by: str  # "policy", or the distribution and its version
    load: Callable[[], Any]


def _dist(ep: Any) -> str:
    d = getattr(ep, "dist", None)
    return f"{d.metadata['Name']}=={d.version}" if d is not None else "an unknown distribution"


def _entry_points() -> dict[str, list[Any]]:
    return _entry_points_on(tuple(__import__("sys").path))


@lru_cache(maxsize=8)
def _entry_points_on(path: tuple[str, ...]) -> dict[str, list[Any]]:
    """The ``onepath.checks`` entry points of every installed distribution (on this ``sys.path``); each
    distinct (distribution, value) once: the same dist seen twice on the path is one provider."""
    from importlib.metadata import entry_points

    out: dict[str, dict[tuple[str, str], Any]] = {}
    for ep in entry_points(group=GROUP):
        out.setdefault(ep.name, {}).setdefault((_dist(ep).split("==")[0], ep.value), ep)
    return {name: list(eps.values()) for name, eps in out.items()}


def _import(path: str) -> Any:
    import importlib

    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def provider(policy: "Policy", name: str) -> Provider | str:
    """Who provides custom check ``name``, or a one-line reason nobody (or more than one) does."""
    declared = policy.custom_checks.get(name)
    if declared is not None and declared.function is not None:
        fn = declared.function
        return Provider(name, fn, "policy", lambda: _import(fn))
    ep_name = declared.entry_point if declared is not None else name
    eps = _entry_points().get(ep_name or "", [])
    if not eps:
        return (f"unknown check '{name}': not built in, not declared under custom_checks, and no installed "
                f"package provides '{ep_name}' in entry-point group '{GROUP}'") if declared is None else (
                f"custom check '{name}': no installed package provides entry point '{ep_name}' in group '{GROUP}'")
    if len(eps) > 1:
        return (f"check '{name}': entry point '{ep_name}' in group '{GROUP}' is provided by more than one package "
                f"({', '.join(sorted(f'{_dist(e)} ({e.value})' for e in eps))}); declare it under custom_checks "
                f"with function: instead")
    ep = eps[0]
    return Provider(name, f"{ep.value} (entry point {GROUP}:{ep.name})", _dist(ep), ep.load)


def is_custom(name: str) -> bool:
    from platform_defs.policy import APP_CHECKS, ML_CHECKS

    return name not in APP_CHECKS and name not in ML_CHECKS


def unprovided(policy: "Policy") -> tuple[str, str] | None:
    """``(key, problem)`` for the first check a track names that nothing provides, else None."""
    for track_name, track in policy.tracks.items():
        for i, check in enumerate(track.checks):
            if is_custom(check):
                found = provider(policy, check)
                if isinstance(found, str):
                    if found.startswith("unknown check"):  # most often a typo of a built-in: list them
                        from platform_defs.policy import APP_CHECKS, ML_CHECKS

                        known = APP_CHECKS if track_name == "app" else ML_CHECKS
                        found += f" (built in for track '{track_name}': {', '.join(known)})"
                    return f"tracks.{track_name}.checks.{i}", found
    return None


def importable_problems(policy: "Policy") -> list[str]:
    """One line per custom check a track names whose function does not import or is not callable (what
    ``onepath validate`` adds to the load's checks; the gate fails closed on the same)."""
    from platform_defs.policy import _shown
    from platform_defs.settings import policy_path

    out = []
    for name in dict.fromkeys(c for t in policy.tracks.values() for c in t.checks if is_custom(c)):
        found = provider(policy, name)
        if isinstance(found, str):
            out.append(f"policy {_shown(policy_path())}: {found}")
            continue
        try:
            fn = found.load()
        except BaseException as err:  # noqa: BLE001 - an import can raise anything
            out.append(f"policy {_shown(policy_path())}: custom check '{name}' ({found.function}) could not be "
                       f"imported: {_one_line(f'{type(err).__name__}: {err}')}")
            continue
        if not callable(fn):
            out.append(f"policy {_shown(policy_path())}: custom check '{name}' ({found.function}) is not callable")
    return out


def describe(policy: "Policy", name: str) -> str:
    """The asset check's description: the built-in's, or the custom check's own (with what runs)."""
    from platform_defs.governance.gates import APP_DESCRIPTIONS, DESCRIPTIONS

    if name in DESCRIPTIONS or name in APP_DESCRIPTIONS:
        return DESCRIPTIONS.get(name) or APP_DESCRIPTIONS[name]
    declared = policy.custom_checks.get(name)
    found = provider(policy, name)
    runs = found.function if isinstance(found, Provider) else "unresolved"
    text = declared.description if declared is not None and declared.description else "A custom check."
    return f"{text} (custom check: {runs})"


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= REASON_LIMIT else text[:REASON_LIMIT - 1] + "…"


def run_custom(policy: "Policy", name: str, ctx: CheckContext) -> Any:
    """Run custom check ``name`` on ``ctx``: its verdict, or a failed one naming the check and its function."""
    from platform_defs.governance.gates import Verdict as GateVerdict

    found = provider(policy, name)
    if isinstance(found, str):  # the policy loaded, then the package went away: fail closed
        return GateVerdict(name, False, _one_line(found), {"check_function": "unresolved"})
    meta = {"check_function": found.function, "provided_by": found.provided_by}

    def failed(why: str) -> Any:
        return GateVerdict(name, False, _one_line(f"custom check '{name}' ({found.function}) {why}"), dict(meta))

    try:
        fn = found.load()
    except BaseException as err:  # noqa: BLE001 - an import can raise anything, SystemExit included
        return failed(f"could not be imported: {type(err).__name__}: {err}")
    if not callable(fn):
        return failed(f"is not callable (a {type(fn).__name__})")
    declared = policy.custom_checks.get(name)
    timeout = declared.timeout_seconds if declared is not None else 60.0
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["result"] = fn(ctx)
        except BaseException as err:  # noqa: BLE001 - reported as the verdict
            box["error"] = err

    worker = threading.Thread(target=call, name=f"onepath-check-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return failed(f"did not finish within {timeout:g}s (custom_checks.{name}.timeout_seconds)")
    if "error" in box:
        err = box["error"]
        from platform_defs.governance.gates import _Missing

        if isinstance(err, _Missing):  # what the built-ins say when the version's records are missing
            return failed(f"could not be judged: {err}")
        return failed(f"raised {type(err).__name__}: {err}")
    result = box.get("result")
    if type(result) is not Verdict:
        return failed(f"returned {type(result).__name__}, not onepath.Verdict")
    try:  # fields reassigned after construction (object.__setattr__) are checked again
        Verdict(result.passed, result.reason, dict(result.metrics))
    except TypeError as err:
        return failed(f"returned an invalid onepath.Verdict: {err}")
    return GateVerdict(name, result.passed, _one_line(result.reason), {**dict(result.metrics), **meta})
