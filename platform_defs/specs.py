"""Typed declarations of what an organisation delivers. Pure: no I/O, no Dagster, no MLflow.

Four kinds share one shape (name, owner team, governance track, description) and add their own
settings. ``Organisation`` checks what single declarations cannot: unique names and asset keys,
references that resolve, tracks that agree along a line. Every failure is a ``DeclarationError``
whose first line names the declaration, the field and what is wrong.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TRACKS = ("app", "ml-standard", "ml-high-risk")
Track = Literal["app", "ml-standard", "ml-high-risk"]
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
TEAM_RE = re.compile(r"^[a-z][a-z0-9-]{1,62}$")
PASS_THROUGH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")  # resources.serving's launch-spec rule
IMPORT_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class DeclarationError(ValueError):
    """A declaration is wrong. ``str(err).splitlines()[0]`` is the one line a person needs."""

    def __init__(self, name: str, field: str, problem: str, source: str | None = None, kind: str | None = None):
        self.name, self.field, self.problem, self.source, self.kind = name, field, problem, source, kind
        where = ", ".join(x for x in (kind, source) if x)
        head = f"declaration '{name}'" + (f" ({where})" if where else "")
        super().__init__(f"{head}: field '{field}': {problem}")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError(
            f"'{v}' is not a valid name: use lowercase letters, digits and '_', starting with a letter"
        )
    return v


class ColumnSpec(_Spec):
    name: str
    dtype: Literal["int", "float", "string", "bool"]
    role: Literal["feature", "label", "id", "timestamp"] = "feature"
    pii: bool = Field(False, description="Personal data: never a model feature, never logged by an endpoint.")
    protected: bool = Field(False, description="A protected attribute that fairness checks slice by.")
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    values: list[str | int | bool] | None = Field(None, description="The allowed values of a categorical column.")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            raise ValueError(f"'{v}' is not a valid column name")
        return v


class _Declaration(_Spec):
    name: str
    owner: str = Field(description="The owning team, as listed in the policy file.")
    track: Track | None = Field(None, description="Governance track; left out, the policy's: the owner team's "
                                                  "default track (see the policy's teams).")
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str) -> str:
        if not TEAM_RE.match(v):
            raise ValueError(f"'{v}' is not a valid team name: use lowercase letters, digits and '-'")
        return v


class DatasetSpec(_Declaration):
    kind: Literal["dataset"] = "dataset"
    generator: str = Field(description="'module:function' that produces the data as a pandas DataFrame.")
    params: dict[str, Any] = Field(default_factory=dict, description="Default generator parameters.")
    columns: list[ColumnSpec]
    min_rows: int = Field(100, ge=1)
    feedback: FeedbackSpec | None = Field(None, description="Rebuild from labelled production data as well.")

    @field_validator("generator")
    @classmethod
    def _generator(cls, v: str) -> str:
        if not IMPORT_PATH_RE.match(v):
            raise ValueError(f"'{v}' is not an import path of the form 'package.module:function'")
        return v

    @model_validator(mode="after")
    def _columns(self) -> "DatasetSpec":
        seen: set[str] = set()
        for c in self.columns:
            if c.name in seen:
                raise ValueError(f"column '{c.name}' is declared twice")
            seen.add(c.name)
        if sum(c.role == "label" for c in self.columns) > 1:
            raise ValueError("more than one column has role 'label'")
        return self

    def column(self, name: str) -> ColumnSpec | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def label(self) -> str | None:
        return next((c.name for c in self.columns if c.role == "label"), None)

    @property
    def pii_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.pii]

    @property
    def protected_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.protected]


class ModelSpec(_Declaration):
    kind: Literal["model"] = "model"
    dataset: str = Field(description="Name of the dataset declaration it trains on.")
    trainer: str = Field(description="'module:function(X, y, params) -> fitted sklearn estimator'.")
    label: str | None = Field(None, description="Label column; defaults to the dataset's label column.")
    features: list[str] | None = Field(
        None, description="Feature columns; defaults to every non-PII feature column of the dataset."
    )
    use_protected_features: bool = Field(
        False, description="Whether protected attributes may be model inputs (they are always kept for fairness)."
    )
    params: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Minimum held-out metric values (roc_auc, accuracy, f1, ...)."
    )
    test_size: float = Field(0.25, gt=0, lt=1)
    seed: int = 7
    purpose: str | None = Field(None, description="What the model decides, as named in the policy's purposes "
                                                  "(e.g. credit_decision); a purpose sets a minimum track.")
    favourable_label: int = Field(0, description="The label value that is the good outcome for the person "
                                                 "(0 = will not default); fairness is judged on it.")

    @field_validator("trainer")
    @classmethod
    def _trainer(cls, v: str) -> str:
        if not IMPORT_PATH_RE.match(v):
            raise ValueError(f"'{v}' is not an import path of the form 'package.module:function'")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(KNOWN_METRICS))
        if unknown:
            raise ValueError(f"unknown metric '{unknown[0]}' (known: {', '.join(KNOWN_METRICS)})")
        return v


KNOWN_METRICS = ("roc_auc", "accuracy", "f1", "precision", "recall", "log_loss_max")


class DriftWindowSpec(_Spec):
    """An endpoint's own drift settings; anything left out comes from its track's policy (``drift``)."""

    window_rows: int | None = Field(None, ge=50, le=5_000_000, description="Newest rows of the serving version compared.")
    window_hours: float | None = Field(None, gt=0, description="Rows logged within this many hours.")
    min_rows: int | None = Field(None, ge=10)
    min_new_rows: int | None = Field(None, ge=1)
    min_check_interval_minutes: float | None = Field(None, ge=0)
    numeric_method: str | None = None
    numeric_threshold: float | None = Field(None, gt=0)
    categorical_method: str | None = None
    categorical_threshold: float | None = Field(None, gt=0)
    drift_share: float | None = Field(None, gt=0, le=1)
    environments: list[str] | None = None

    @model_validator(mode="after")
    def _one_window(self) -> "DriftWindowSpec":
        if self.window_rows is not None and self.window_hours is not None:
            raise ValueError("set window_rows or window_hours, not both")
        return self


class FeedbackSpec(_Spec):
    """Labelled production data: requests an endpoint scored, joined by request id with the outcomes that
    arrived later. A dataset that declares it is rebuilt from its generator's rows plus these."""

    endpoint: str = Field(description="The endpoint whose inference log is joined with outcomes.")
    env: str = Field("prod", description="Its environment.")
    max_age_days: float = Field(90, gt=0, description="Only requests scored within this many days.")
    max_rows: int = Field(50_000, ge=1, description="At most this many of the newest labelled rows.")


class EndpointSpec(_Declaration):
    kind: Literal["endpoint"] = "endpoint"
    model: str = Field(description="Name of the model declaration it serves.")
    purpose: str | None = Field(None, description="Left out: its model's (an endpoint follows its model).")
    environments: list[str] = Field(default_factory=lambda: ["staging", "prod"], min_length=1)
    backend: Literal["local"] = Field("local", description="Deployer backend.")
    workers: int | None = Field(
        None, ge=1, le=16,
        description="Worker processes per environment. Unset (the default): 2 in an environment named prod, so "
                    "a worker that dies loses no request another could answer, and 1 elsewhere; a value given "
                    "here is used in every environment.")
    ports: dict[str, int] = Field(
        default_factory=dict, description="Fixed stable ports per environment (otherwise allocated once and kept)."
    )

    def workers_in(self, env: str) -> int:
        """How many workers serve this endpoint in ``env`` (see ``workers``)."""
        if self.workers is not None:
            return self.workers
        return 2 if env == "prod" else 1

    max_batch: int = Field(64, ge=1, le=4096, description="Most rows scored in one model call.")
    model_threads: int = Field(
        1, ge=1, le=64,
        description="OpenMP/BLAS threads each worker's model may use. 1 (the default): the workers are the "
                    "parallelism, and a model call never waits at a thread barrier for a core that training or "
                    "another worker holds (bench/threads_bench.py: churn's p99 beside a training run, 15 ms vs 1816 ms).")
    inference_log: bool = True
    pass_through: list[str] = Field(
        default_factory=list, max_length=64,
        description="Dataset columns outside the model's features that callers send and the inference log keeps "
                    "as extras (a tracing id, protected attributes for fairness monitoring). Each must be a column "
                    "of the model's dataset, not PII and not a feature (features are logged already); any other "
                    "key a caller sends is dropped from the log and counted.")
    drift: DriftWindowSpec = Field(default_factory=DriftWindowSpec,
                                   description="Drift window and methods; unset fields come from the track's policy.")

    @field_validator("environments")
    @classmethod
    def _envs(cls, v: list[str]) -> list[str]:
        for e in v:
            _check_name(e)
        if len(set(v)) != len(v):
            raise ValueError("an environment is listed twice")
        return v

    @field_validator("pass_through")
    @classmethod
    def _pass_through(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if not PASS_THROUGH_RE.match(name):
                raise ValueError(f"item {i} '{name[:70]}' is not a column name (letters, digits, '_', '.', '-'; "
                                 f"at most 64, starting with a letter or '_')")
            if name in v[:i]:
                raise ValueError(f"item {i} '{name}' is listed twice")
        return v

    @model_validator(mode="after")
    def _ports(self) -> "EndpointSpec":
        for env, port in self.ports.items():
            if env not in self.environments:
                raise ValueError(f"ports names environment '{env}', which is not in environments")
            if not 1024 <= port <= 65535:
                raise ValueError(f"port {port} for '{env}' is outside 1024-65535")
        return self


class AppSpec(_Declaration):
    kind: Literal["app"] = "app"
    source: str = Field(description="Directory of the app's source, relative to the project root.")
    entrypoint: str = Field(description="'module:attribute' of the ASGI app inside source.")
    calls: list[str] = Field(default_factory=list, description="Endpoints the app calls.")
    environments: list[str] = Field(default_factory=lambda: ["staging", "prod"], min_length=1)
    ports: dict[str, int] = Field(default_factory=dict)

    @field_validator("entrypoint")
    @classmethod
    def _entry(cls, v: str) -> str:
        if not IMPORT_PATH_RE.match(v):
            raise ValueError(f"'{v}' is not of the form 'module:attribute'")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"'{v}' must be a path inside the project")
        return v

    @model_validator(mode="after")
    def _track(self) -> "AppSpec":
        if self.track not in (None, "app"):
            raise ValueError(f"an app release is on track 'app', not '{self.track}'")
        return self


def notebook_dataset_name(model: str) -> str:
    """The snapshot-only dataset of a notebook model: the train/test snapshots ``onepath.register`` stored."""
    return f"{model}_data"


def notebook_endpoint_name(model: str) -> str:
    """The endpoint a notebook model is served by."""
    return f"{model}_scoring"


class NotebookDeclSpec(_Declaration):
    """A model trained in a notebook (``source: notebook``), as ``onepath.register`` writes it. The loader
    expands it into a snapshot-only dataset, the model (pinned to ``version``) and its endpoint."""

    kind: Literal["model"] = "model"
    source: Literal["notebook"] = "notebook"
    version: int = Field(ge=1, description="The registered version this declaration pins (deployed, gated).")
    label: str = Field(description="Label column of the train and test frames.")
    pii: list[str] = Field(default_factory=list, description="Personal-data columns: never features.")
    protected: list[str] = Field(default_factory=list, description="Protected attributes fairness slices by.")
    features: list[str] | None = Field(None, description="Feature columns; default: every other column.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Minimum held-out metric values.")
    purpose: str | None = None
    favourable_label: int = 0
    environments: list[str] | None = Field(None, description="The endpoint's environments; default the policy's.")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: dict[str, float]) -> dict[str, float]:
        return ModelSpec._metrics(v)  # type: ignore[operator]

    @model_validator(mode="after")
    def _columns(self) -> "NotebookDeclSpec":
        for field in ("pii", "protected", "features"):
            for c in getattr(self, field) or []:
                if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", c):
                    raise ValueError(f"'{c}' in {field} is not a valid column name")
        for c in self.features or []:
            if c in self.pii:
                raise ValueError(f"feature '{c}' is PII and can never be a model feature")
            if c == self.label:
                raise ValueError(f"feature '{c}' is the label")
        if self.label in self.pii or self.label in self.protected:
            raise ValueError(f"the label '{self.label}' cannot be PII or protected")
        return self

    def expand(self) -> list["_Declaration"]:
        """The three declarations a notebook model stands for: ``<name>_data``, the model, ``<name>_scoring``."""
        cols = [ColumnSpec(name=self.label, dtype="int", role="label")]
        cols += [ColumnSpec(name=c, dtype="string", pii=True) for c in self.pii]
        cols += [ColumnSpec(name=c, dtype="string", protected=True) for c in self.protected if c not in self.pii]
        cols += [ColumnSpec(name=c, dtype="float") for c in self.features or []
                 if c not in self.pii and c not in self.protected]
        shared = {"owner": self.owner, "track": self.track}
        ds = SnapshotDatasetSpec(name=notebook_dataset_name(self.name), columns=cols, min_rows=1,
                                 description=f"Train and test snapshots of notebook model {self.name}", **shared)
        model = NotebookModelSpec(
            name=self.name, dataset=ds.name, label=self.label, features=self.features, metrics=self.metrics,
            purpose=self.purpose, favourable_label=self.favourable_label, version=self.version,
            description=self.description or f"Model {self.name}, trained in a notebook", **shared)
        ep_fields: dict[str, Any] = {"environments": self.environments} if self.environments else {}
        ep = EndpointSpec(name=notebook_endpoint_name(self.name), model=self.name,
                          description=f"Scoring endpoint of {self.name}", **shared, **ep_fields)
        return [ds, model, ep]


class SnapshotDatasetSpec(DatasetSpec):
    """A dataset with no generator: its versions are the snapshots ``onepath.register`` stored."""

    source: Literal["snapshot"] = "snapshot"
    generator: str = ""

    @field_validator("generator")
    @classmethod
    def _generator(cls, v: str) -> str:
        return v


class NotebookModelSpec(ModelSpec):
    """A model with no trainer: its versions are registered by ``onepath.register``; ``version`` is the pin."""

    source: Literal["notebook"] = "notebook"
    trainer: str = ""
    version: int = Field(ge=1)

    @field_validator("trainer")
    @classmethod
    def _trainer(cls, v: str) -> str:
        return v


Declaration = Annotated[Union[DatasetSpec, ModelSpec, EndpointSpec, AppSpec], Field(discriminator="kind")]
SPEC_TYPES: dict[str, type[_Declaration]] = {
    "dataset": DatasetSpec,
    "model": ModelSpec,
    "endpoint": EndpointSpec,
    "app": AppSpec,
}


def error_from_validation(name: str, kind: str | None, source: str | None, err: ValidationError) -> DeclarationError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(declaration)"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if first["type"] not in ("missing", "extra_forbidden") and "input" in first and not isinstance(
        first["input"], (dict, list)
    ):
        msg = f"{msg} (got {first['input']!r})"
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    return DeclarationError(name, loc, msg, source, kind)


def parse_declaration(data: Any, source: str | None = None) -> _Declaration:
    """Build one spec from a mapping, turning pydantic's errors into a ``DeclarationError``."""
    if not isinstance(data, dict):
        raise DeclarationError("?", "(declaration)", f"expected a mapping, got {type(data).__name__}", source)
    name = str(data.get("name", "?"))
    kind = data.get("kind")
    if kind not in SPEC_TYPES:
        raise DeclarationError(
            name, "kind", f"unknown kind {kind!r} (expected one of: {', '.join(SPEC_TYPES)})", source
        )
    spec_type: type[_Declaration] = SPEC_TYPES[kind]
    if kind == "model" and data.get("source") == "notebook":
        spec_type = NotebookDeclSpec
    elif kind == "model" and "source" in data:
        raise DeclarationError(name, "source", f"unknown source {data['source']!r} (a model's source is "
                                               f"'notebook', or left out for a trainer)", source, kind)
    try:
        return spec_type.model_validate(data)
    except ValidationError as err:
        raise error_from_validation(name, kind, source, err) from None


def endpoint_asset_name(endpoint: str, env: str) -> str:
    return f"{endpoint}_{env}"


def promotion_pool(name: str, env: str) -> str:
    """The Dagster concurrency pool of the asset that promotes endpoint (or app) ``name`` into ``env``: on an
    instance whose pools default to a limit of 1 (the production one) Dagster runs one such step at a time; the
    ledger's promotion lease (``promotion:<name>.<env>``) stays the guarantee. Unlimited on the embedded one."""
    return f"promotion.{name}.{env}"


class Organisation:
    """Every declaration of an organisation, cross-checked. Build with ``Organisation(decls, sources)``."""

    def __init__(self, declarations: list[_Declaration], sources: dict[str, str] | None = None):
        self.sources = sources or {}
        # what a tolerant load left out (``load_organisation(tolerant=True)``), one error each
        self.problems: list[DeclarationError] = []
        self.by_name: dict[str, _Declaration] = {}
        for d in declarations:
            if d.name in self.by_name:
                first = self.sources.get(f"{d.name}#0", "")
                raise DeclarationError(
                    d.name, "name", f"duplicate name: already declared{' in ' + first if first else ''}",
                    self.sources.get(d.name), d.kind,
                )
            self.by_name[d.name] = d
            self.sources.setdefault(f"{d.name}#0", self.sources.get(d.name, ""))
        self._check()

    def _err(self, d: _Declaration, field: str, problem: str) -> DeclarationError:
        return DeclarationError(d.name, field, problem, self.sources.get(d.name), d.kind)

    def _ref(self, d: _Declaration, field: str, ref: str, kind: str) -> _Declaration:
        target = self.by_name.get(ref)
        if target is None:
            known = sorted(n for n, x in self.by_name.items() if x.kind == kind)
            raise self._err(d, field, f"unknown {kind} '{ref}' (declared {kind}s: {', '.join(known) or 'none'})")
        if target.kind != kind:
            raise self._err(d, field, f"'{ref}' is a {target.kind}, not a {kind}")
        return target

    def _check(self) -> None:
        asset_names: dict[str, str] = {}
        for d in self.by_name.values():
            for key in self.asset_names(d):
                if key in asset_names and asset_names[key] != d.name:
                    raise self._err(d, "name", f"asset '{key}' clashes with one of '{asset_names[key]}'")
                asset_names[key] = d.name
            if isinstance(d, ModelSpec):
                ds = self._ref(d, "dataset", d.dataset, "dataset")
                assert isinstance(ds, DatasetSpec)
                label = d.label or ds.label
                if label is None:
                    raise self._err(d, "label", f"dataset '{ds.name}' has no label column; name one")
                if ds.column(label) is None:
                    raise self._err(d, "label", f"column '{label}' is not in dataset '{ds.name}'")
                for f in d.features or []:
                    col = ds.column(f)
                    if col is None:
                        raise self._err(d, "features", f"column '{f}' is not in dataset '{ds.name}'")
                    if col.pii:
                        raise self._err(d, "features", f"column '{f}' is PII and can never be a model feature")
                    if col.name == label:
                        raise self._err(d, "features", f"column '{f}' is the label")
                    if col.protected and not d.use_protected_features:
                        raise self._err(
                            d, "features",
                            f"column '{f}' is a protected attribute; set use_protected_features to use it",
                        )
            elif isinstance(d, DatasetSpec) and d.feedback is not None:
                ep = self._ref(d, "feedback.endpoint", d.feedback.endpoint, "endpoint")
                assert isinstance(ep, EndpointSpec)
                if d.feedback.env not in ep.environments:
                    raise self._err(d, "feedback.env", f"endpoint '{ep.name}' has no environment '{d.feedback.env}'")
                if d.label is None:
                    raise self._err(d, "feedback", "a dataset fed by outcomes needs a label column")
            if isinstance(d, EndpointSpec):
                m = self._ref(d, "model", d.model, "model")
                if m.track is not None and d.track is not None and m.track != d.track:
                    raise self._err(d, "track", f"'{d.track}' differs from model '{m.name}' track '{m.track}'")
                if d.pass_through:
                    assert isinstance(m, ModelSpec)
                    ds = self._ref(m, "dataset", m.dataset, "dataset")
                    assert isinstance(ds, DatasetSpec)
                    features = set(self.model_features(m)[0]) if (m.label or ds.label) else set()
                    for i, name in enumerate(d.pass_through):
                        col = ds.column(name)
                        if col is None:
                            raise self._err(d, f"pass_through.{i}", f"'{name}' is not a column of dataset '{ds.name}' "
                                                                    f"(model '{m.name}' learns from it)")
                        if col.pii:
                            raise self._err(d, f"pass_through.{i}", f"column '{name}' is PII and is never logged")
                        if col.role in ("label", "timestamp"):
                            raise self._err(d, f"pass_through.{i}", f"column '{name}' is the dataset's {col.role}: "
                                                                    f"a caller never sends it (the outcome arrives as "
                                                                    f"feedback; the endpoint knows when it scored)")
                        if name in features:
                            raise self._err(d, f"pass_through.{i}", f"column '{name}' is a feature of model "
                                                                    f"'{m.name}': features are logged already")
            elif isinstance(d, AppSpec):
                for i, ref in enumerate(d.calls):
                    ep = self._ref(d, f"calls.{i}", ref, "endpoint")
                    assert isinstance(ep, EndpointSpec)
                    missing = [e for e in d.environments if e not in ep.environments]
                    if missing:
                        raise self._err(d, f"calls.{i}", f"endpoint '{ref}' has no environment '{missing[0]}'")

    @staticmethod
    def asset_names(d: _Declaration) -> list[str]:
        if isinstance(d, (EndpointSpec, AppSpec)):
            base = [d.name] if isinstance(d, AppSpec) else []
            return base + [endpoint_asset_name(d.name, e) for e in d.environments]
        return [d.name]

    def of_kind(self, kind: str) -> list[Any]:
        return [d for d in self.by_name.values() if d.kind == kind]

    def model_features(self, m: ModelSpec) -> tuple[list[str], str]:
        ds = self.by_name[m.dataset]
        assert isinstance(ds, DatasetSpec)
        label = m.label or ds.label
        assert label is not None
        if m.features:
            return list(m.features), label
        feats = [
            c.name for c in ds.columns
            if c.role == "feature" and not c.pii and c.name != label
            and (m.use_protected_features or not c.protected)
        ]
        return feats, label

    def __len__(self) -> int:
        return len(self.by_name)


def targets_of(org: Organisation) -> list[tuple[Any, str, Any]]:
    """``(declaration, env, Target)`` for every endpoint and app release environment, in declaration order."""
    from resources.deployers.base import Target  # here: specs stays importable without the deployers

    out: list[tuple[Any, str, Any]] = []
    for d in org.by_name.values():
        if isinstance(d, EndpointSpec):
            out += [(d, env, Target(d.name, env, "endpoint", d.ports.get(env))) for env in d.environments]
        elif isinstance(d, AppSpec):
            out += [(d, env, Target(d.name, env, "app", d.ports.get(env))) for env in d.environments]
    return out


# --------------------------------------------------------------------------------------------
# The component form: ``type: onepath.Model`` + ``attributes:`` (one YAML document each). The type says
# the kind; the attributes are the spec's fields without it (``platform_defs.components`` derives the
# Dagster component types and their schemas from these same specs: one place for each field).

COMPONENT_TYPES: dict[str, type[_Declaration]] = {
    "onepath.Dataset": DatasetSpec,
    "onepath.Model": ModelSpec,
    "onepath.Endpoint": EndpointSpec,
    "onepath.AppRelease": AppSpec,
    "onepath.ModelLine": NotebookDeclSpec,  # dataset -> model -> endpoint, as ``onepath.register`` writes it
}


def fixed_by_type(spec_type: type[_Declaration]) -> dict[str, str]:
    """The fields a component's ``type:`` says, so its attributes leave them out: the kind (and a model line's
    ``source: notebook``)."""
    fixed = {"kind": spec_type.model_fields["kind"].default}
    if spec_type is NotebookDeclSpec:
        fixed["source"] = "notebook"
    return fixed


def component_type_of(data: dict[str, Any]) -> str | None:
    """The component type an old-form declaration mapping becomes (``kind: model, source: notebook`` is a model
    line); None for a kind no type has."""
    kind = data.get("kind")
    if kind == "model" and data.get("source") == "notebook":
        return "onepath.ModelLine"
    return next((t for t, s in COMPONENT_TYPES.items() if s is not NotebookDeclSpec
                 and s.model_fields["kind"].default == kind), None)


def parse_component(type_name: Any, attributes: Any, source: str | None = None) -> _Declaration:
    """One spec from a component document's ``type`` and ``attributes`` (``DeclarationError`` like
    ``parse_declaration``; ``field`` is the attribute's path)."""
    spec_type = COMPONENT_TYPES.get(type_name) if isinstance(type_name, str) else None
    if spec_type is None:
        raise DeclarationError("?", "type", f"unknown component type {type_name!r} (known: "
                                            f"{', '.join(COMPONENT_TYPES)})", source)
    fixed = fixed_by_type(spec_type)
    kind = fixed["kind"]
    if not isinstance(attributes, dict):
        raise DeclarationError("?", "attributes", f"expected a mapping, got {type(attributes).__name__}", source, kind)
    name = str(attributes.get("name", "?"))
    for key in fixed:
        if key in attributes:
            raise DeclarationError(name, key, f"unknown field (the type {type_name} says it)", source, kind)
    try:
        return spec_type.model_validate({**attributes, **fixed})
    except ValidationError as err:
        raise error_from_validation(name, kind, source, err) from None
