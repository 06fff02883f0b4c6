"""Custom checks: a track's gate extended with a Python function, without forking onepath.

The contract (``onepath.CheckContext`` in, ``onepath.Verdict`` out)::

    import onepath

    def min_recall(ctx: onepath.CheckContext) -> onepath.Verdict:
        X, y = ctx.held_out                   # the registered held-out rows (loaded on first use)
        recall = recall_score(y, ctx.estimator.predict(X))
        return onepath.Verdict(recall >= ctx.params["min"], f"recall {recall:.3f} (min {ctx.params['min']})",
                               {"recall": recall})

Where a check comes from: a track's ``checks`` in the policy names it, and it is declared once under the
policy's ``custom_checks``: ``function: "pkg.mod:fn"`` from a platform-owned module outside the declarations
folder, optionally pinned by ``sha256:`` of its file; or ``entry_point: name`` with the ``distribution:`` that
must provide it in the ``onepath.checks`` entry-point group (``[project.entry-points."onepath.checks"]
min_recall = "acme_checks:min_recall"``), optionally pinned by ``version:``. Either way, a module whose file
(or a package ``__init__`` on its way) lies under the declarations folder is refused at load and at run time,
unimported: the signed policy cannot name a team's file as a governance check, so the pin and ``check_sha256``
mean something. It is no boundary against a team's Python: a ``declarations.py``, trainer or generator module
there is imported by the processes that run the gates, trusted like an installed package (README, "Team
Python"). The policy is signed and recorded, so a track's checks come from it only: a package can add a check
nobody declared, and it never runs; it cannot
take a built-in's name (built-in names always resolve to the built-ins, and the policy refuses a
``custom_checks`` entry named like one); another package's entry point of the same name never stands in
for the declared distribution. Every verdict records what ran: ``check_function``, ``provided_by``
(``name==version``) and ``check_sha256`` (of the module's bytes: read once, hashed, compared with the pin, and
run as a fresh module, never a copy already imported); code other than the pinned fails closed.

How it runs: in the gate, after every built-in, for the exact version and environment being gated, on
copies of what the gate loaded (``Copies``; an app check gets a copy of the release folder, removed after:
what it writes is never served); its
verdict is recorded like theirs (the asset's blocking check, the ``gate_verdict`` ledger entry, the model
card). It fails closed, with one line naming the check and its function, when the function cannot be
imported, raises, returns anything but an ``onepath.Verdict``, or takes longer than its
``timeout_seconds`` (it is then left running in a daemon thread: Python cannot stop a thread; the verdict
does not wait for it). A package's code runs in the platform's process with the platform's rights:
install only packages you would let deploy.
"""

from __future__ import annotations

import copy
import math
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

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
        self.params = copy.deepcopy(dict(params))  # a check that edits its params edits only its own
        # EndpointSpec/AppSpec, ModelSpec, DatasetSpec: copies, never the gate's own objects
        self.spec, self.model, self.dataset = copy.deepcopy(spec), copy.deepcopy(model), copy.deepcopy(dataset)
        self.features, self.label = list(features or []), label
        self.build = build  # an app release: a copy of its build folder (the gate's own is never given)
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


class Copies:
    """What a custom check reads of the gate's candidate version: copies (DataFrames ``.copy()``, the estimator
    and records ``copy.deepcopy``), each made on first use and kept for that check only, never the gate's
    cached objects nor the gate itself (the built-ins that run after nothing, and judge what was loaded)."""

    __slots__ = ("_get",)

    def __init__(self, version: Any):
        made: dict[str, Any] = {}

        def get(what: str) -> Any:
            if what not in made:
                if what == "estimator":
                    made[what] = copy.deepcopy(version.estimator)
                elif what == "held_out":
                    made[what] = tuple(_copied(part) for part in version.held_out)
                elif what == "snapshot":
                    made[what] = _copied(version.snapshot)
                elif what == "held_out_metrics":
                    made[what] = copy.deepcopy(dict(version.held_out_metrics))
                else:  # the registration entry
                    from types import SimpleNamespace

                    made[what] = SimpleNamespace(data=copy.deepcopy(dict(version.require_registration().data)))
            return made[what]

        self._get = get

    estimator = property(lambda self: self._get("estimator"))
    held_out = property(lambda self: self._get("held_out"))
    snapshot = property(lambda self: self._get("snapshot"))
    held_out_metrics = property(lambda self: self._get("held_out_metrics"))

    def require_registration(self) -> Any:
        return self._get("registration")


def _copied(value: Any) -> Any:
    return value.copy() if hasattr(value, "to_numpy") else copy.deepcopy(value)  # a DataFrame or Series


@dataclass(frozen=True)
class Provider:
    name: str
    function: str  # what runs: an import path, or "<value> (entry point onepath.checks:<name>)"
    provided_by: str  # "policy", or the distribution and its version
    module: str  # the module holding the check
    attr: str | None  # the check in it ("a.b" for a nested attribute); None: the module itself
    chain: tuple[tuple[str, Path], ...] = ()  # (module, file) importing it runs, found once; its own file last
    spec: Any = None  # the module's own spec from that same lookup (None: not found)

    @property
    def file(self) -> Path | None:
        """The module's source file: its bytes are what is pinned, recorded and run."""
        s = self.spec
        return Path(s.origin).resolve() if s is not None and s.origin and s.has_location else None


def dist_of(ep: Any) -> str:  # "name==version" of the distribution providing ep
    d = getattr(ep, "dist", None)
    return f"{d.metadata['Name']}=={d.version}" if d is not None else "an unknown distribution"


def _normal(dist: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", dist).lower()


def entry_points_named(group: str, name: str) -> list[Any]:
    """The installed entry points called ``name`` in ``group`` (each distinct (distribution, value) once: the
    same distribution seen twice on ``sys.path`` is one provider). Looked up on every call, never cached: a
    long-lived process sees a package installed or removed since (shared with ``onepath.trainers``)."""
    from importlib.metadata import entry_points

    out: dict[tuple[str, str], Any] = {}
    for ep in entry_points(group=group, name=name):
        out.setdefault((_normal(dist_of(ep).split("==")[0]), ep.value), ep)
    return list(out.values())


def module_files(module: str) -> list[Path]:
    """The source files importing ``module`` runs (each parent package's ``__init__`` and the module),
    found the way the import system finds them, without running any of them; [] when it is not found."""
    return [f for _, f in _locate(module)[0]]


def _locate(module: str) -> tuple[list[tuple[str, Path]], Any]:
    """``([(name, file), ...], spec)``: the files importing ``module`` runs, each with the module it is, and the
    module's own spec (None, and no files, when it is not found), found without running any of them."""
    files, search, spec = [], None, None
    parts = module.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[:i + 1])
        try:
            spec = _find_spec(name, search)
            namespace = spec is not None and spec.origin is None and spec.submodule_search_locations is not None
        except KeyError:  # a namespace package inside one not imported yet (importlib looks its parent up)
            spec, namespace = None, True
        if namespace:  # its folders of that name on the search path
            search = [str(Path(p) / parts[i]) for p in (search if search is not None else sys.path)
                      if (Path(p) / parts[i]).is_dir()]
            continue
        if spec is None:
            return [], None
        if spec.origin and spec.has_location:
            files.append((name, Path(spec.origin).resolve()))
        search = list(spec.submodule_search_locations or [])
    return files, spec


def _find_spec(fullname: str, search: list[str] | None) -> Any:
    """The spec the import system would use for ``fullname``: the module already imported, else the first
    finder on ``sys.meta_path`` that finds it (an editable install's finder included, not only sys.path)."""
    loaded = sys.modules.get(fullname)
    if loaded is not None and getattr(loaded, "__spec__", None) is not None:
        return loaded.__spec__
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(fullname, search) if find is not None else None
        if spec is not None:
            return spec
    return None


def source_of(found: Provider) -> bytes | None:
    """The check module's bytes, read once: what ``check_sha256`` records, the ``sha256:`` pin compares and
    :func:`load` runs (None: no readable source file)."""
    try:
        return found.file.read_bytes() if found.file is not None else None
    except OSError:
        return None


def _team_written(files: list[tuple[str, Path]], also: tuple[Path, ...] = ()) -> Path | None:
    """The first of ``files`` (what importing a check's module runs) that lies under the declarations folder
    (teams write it: a check from there could pass itself, or patch the built-ins at import time), else None."""
    from platform_defs.settings import declarations_dir

    roots = (declarations_dir(), *(Path(r).resolve() for r in also))
    return next((f for _, f in reversed(files) if any(f.is_relative_to(r) for r in roots)), None)


def provider(policy: "Policy", name: str, also: tuple[Path, ...] = ()) -> Provider | str:
    """Who provides custom check ``name``, or a one-line reason nobody (or not the pinned code) does. Only a
    check declared under ``custom_checks`` runs: from a platform-owned module (``function:``, optionally pinned
    by ``sha256:``) or from the named installed distribution (``entry_point:`` + ``distribution:``, optionally
    ``version:``); either way from a module outside the declarations folder."""
    declared = policy.custom_checks.get(name)
    if declared is None:
        return (f"unknown check '{name}': not built in and not declared under custom_checks (a custom check is "
                f"declared there with function: or entry_point: and distribution:)")
    if declared.function is not None:
        fn = declared.function
        module, attr = fn.split(":")
        return _checked(Provider(name, fn, "policy", module, attr), also)
    eps = entry_points_named(GROUP, declared.entry_point or "")
    want = _normal(declared.distribution or "")
    mine = [e for e in eps if _normal(dist_of(e).split("==")[0]) == want]
    if not mine:
        others = f" (provided by {', '.join(sorted(dist_of(e) for e in eps))})" if eps else ""
        return (f"custom check '{name}': distribution '{declared.distribution}' is not installed with entry "
                f"point '{declared.entry_point}' in group '{GROUP}'{others}")
    if len(mine) > 1:
        return (f"custom check '{name}': distribution '{declared.distribution}' provides entry point "
                f"'{declared.entry_point}' in group '{GROUP}' more than once "
                f"({', '.join(sorted(e.value for e in mine))})")
    ep = mine[0]  # where its module's file is, found without importing it, is refused like a function:'s
    return _checked(Provider(name, f"{ep.value} (entry point {GROUP}:{ep.name})", dist_of(ep), ep.module, ep.attr),
                    also)


def _checked(found: Provider, also: tuple[Path, ...]) -> Provider | str:
    """``found`` with its module located (one lookup: the files refused here are the files run), or why it
    is refused: a file importing it runs lies under the declarations folder (or ``also``: a declarations
    folder given to ``onepath validate``)."""
    import dataclasses

    files, spec = _locate(found.module)
    bad = _team_written(files, also)
    if bad is not None:
        from platform_defs.policy import _shown

        return (f"custom check '{found.name}' ({found.function}): {_shown(bad)} is under the declarations folder, "
                f"which teams write; a custom check comes from an installed package or a platform-owned module "
                f"outside it")
    return dataclasses.replace(found, chain=tuple(files), spec=spec)


def pin_problem(policy: "Policy", found: Provider, source: bytes | None) -> tuple[dict[str, Any], str | None]:
    """What a verdict records about the code that runs (function, distribution, sha256 of ``source``, the
    module's bytes :func:`load` runs), and the reason it must not run when that is not what the policy pins
    (``sha256:``, ``version:``)."""
    import hashlib

    declared = policy.custom_checks[found.name]
    meta: dict[str, Any] = {"check_function": found.function, "provided_by": found.provided_by}
    digest = hashlib.sha256(source).hexdigest() if source is not None else None
    meta["check_sha256"] = digest or "unknown"
    if declared.sha256 is not None and digest != declared.sha256:
        return meta, (f"is not the pinned code: custom_checks.{found.name}.sha256 expects {declared.sha256}, "
                      f"found {digest or 'no module file'}")
    if declared.version is not None:
        found_version = found.provided_by.split("==", 1)[-1]
        if found_version != declared.version:
            return meta, (f"is not the pinned distribution: custom_checks.{found.name}.version expects "
                          f"{declared.distribution}=={declared.version}, found {found.provided_by}")
    return meta, None


def load(found: Provider, source: bytes | None) -> Any:
    """The check ``found`` names, from a fresh module object made of ``source`` (the bytes hashed and pinned),
    every time: never the module in ``sys.modules`` (which a long-lived process imported from older bytes; it is
    that module's entry only while the fresh one's code runs), and
    never a second lookup, which could find a file created since the first was checked. Its parent packages
    are imported the usual way, and must be the files that lookup found."""
    import functools
    import importlib
    import importlib.util

    if found.spec is None:
        raise ModuleNotFoundError(f"No module named '{found.module}'")
    if source is None or found.file is None or found.file.suffix != ".py":
        raise ImportError(f"module '{found.module}' has no Python source file to run ({found.spec.origin})")
    parent = found.module.rpartition(".")[0]
    if parent:
        importlib.import_module(parent)
    for name, file in (c for c in found.chain if c[0] != found.module):  # its packages: from the files checked
        loaded = getattr(getattr(sys.modules.get(name), "__spec__", None), "origin", None)
        if loaded is None or Path(loaded).resolve() != file:
            raise ImportError(f"package '{name}' was imported from {loaded}, not the checked {file}")
    module = importlib.util.module_from_spec(found.spec)  # a .py spec: a new, empty module object
    # while its code runs, the module is sys.modules' entry for its name, as an import makes it: a dataclass, a
    # typing.get_type_hints or an enum looks its own module up there; the entry before is put back after, so a
    # module imported earlier stays what importing it gives
    before = sys.modules.get(found.module)
    sys.modules[found.module] = module
    try:
        exec(compile(source, str(found.file), "exec", dont_inherit=True), module.__dict__)
    finally:
        if before is None:
            sys.modules.pop(found.module, None)
        else:
            sys.modules[found.module] = before
    return functools.reduce(getattr, found.attr.split("."), module) if found.attr else module


def is_custom(name: str) -> bool:
    from platform_defs.policy import APP_CHECKS, ML_CHECKS

    return name not in APP_CHECKS and name not in ML_CHECKS


def unprovided(policy: "Policy") -> tuple[str, str] | None:
    """``(key, problem)`` for the first check a track names that nothing provides, else None."""
    for track_name, track in policy.tracks.items():
        for i, check in enumerate(track.checks):
            if is_custom(check):
                found = provider(policy, check)
                if isinstance(found, Provider):  # provided: is it the code the policy pins?
                    pinned = pin_problem(policy, found, source_of(found))[1]
                    if pinned is not None:
                        return f"custom_checks.{check}", f"custom check '{check}' ({found.function}) {pinned}"
                    continue
                if found.startswith("unknown check"):  # most often a typo of a built-in: list them
                    from platform_defs.policy import APP_CHECKS, ML_CHECKS

                    known = APP_CHECKS if track_name == "app" else ML_CHECKS
                    found += f" (built in for track '{track_name}': {', '.join(known)})"
                return f"tracks.{track_name}.checks.{i}", found
    return None


def importable_problems(policy: "Policy", declarations: Path | None = None) -> list[str]:
    """One line per custom check a track names whose function does not import or is not callable, or lies
    under ``declarations`` (the folder validated) (what ``onepath validate`` adds to the load's checks; the
    gate fails closed on the same)."""
    from platform_defs.policy import _shown
    from platform_defs.settings import policy_path

    out = []
    for name in dict.fromkeys(c for t in policy.tracks.values() for c in t.checks if is_custom(c)):
        found = provider(policy, name, () if declarations is None else (declarations,))
        if isinstance(found, str):
            out.append(f"policy {_shown(policy_path())}: {found}")
            continue
        try:
            fn = load(found, source_of(found))
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
    if isinstance(found, str):  # the policy loaded, then the package or file changed: fail closed
        return GateVerdict(name, False, _one_line(found), {"check_function": "unresolved"})
    source = source_of(found)  # read once: hashed, compared with the pin, and run
    meta, pinned = pin_problem(policy, found, source)

    def failed(why: str) -> Any:
        return GateVerdict(name, False, _one_line(f"custom check '{name}' ({found.function}) {why}"), dict(meta))

    if pinned is not None:
        return failed(pinned)
    try:
        fn = load(found, source)
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
    try:  # fields reassigned after construction (object.__setattr__) are checked again; metrics copied once
        metrics = dict(result.metrics)
        checked = Verdict(result.passed, result.reason, metrics)
    except Exception as err:  # noqa: BLE001 - a hostile Mapping can raise anything
        return failed(f"returned an invalid onepath.Verdict: {_one_line(f'{type(err).__name__}: {err}')}")
    return GateVerdict(name, checked.passed, _one_line(checked.reason), {**metrics, **meta})
