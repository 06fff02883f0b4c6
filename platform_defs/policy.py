"""The governance policy: which checks each track requires, with what thresholds, and who may approve.

The policy is a reviewed YAML file (``assets/policy.yaml``, or ``ONEPATH_POLICY_FILE``). It is
validated at load: an unknown key, a wrong type or a dangling reference fails with one line naming
the file and the key path. Pure: parsing and validation only, no signatures checked here.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from platform_defs import strict_yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from platform_defs.settings import policy_path  # one place, in settings (no pydantic there)

if TYPE_CHECKING:
    from platform_defs.specs import EndpointSpec, Organisation

APP_CHECKS = ("security_scan", "code_review", "integration_tests")
ML_CHECKS = ("data_quality", "performance", "no_regression", "fairness", "explainability", "lineage",
             "drift_ready", "rollback_path", "approval")
Role = Literal["model_approver", "code_reviewer", "platform_admin"]


class PolicyError(ValueError):
    def __init__(self, source: str, key: str, problem: str):
        self.source, self.key, self.problem = source, key, problem
        super().__init__(f"policy {source}: key '{key}': {problem}")


class _P(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FairnessPolicy(_P):
    max_demographic_parity_difference: float = Field(0.15, ge=0, le=1)
    max_equalized_odds_difference: float = Field(0.20, ge=0, le=1)
    min_disparate_impact_ratio: float = Field(0.8, ge=0, le=1)
    decision_threshold: float = Field(0.2, gt=0, lt=1, description="Score at or above which the outcome is unfavourable.")
    min_group_size: int = Field(60, ge=1, description="Smaller groups are listed, not compared.")


NUMERIC_DRIFT_METHODS = ("ks", "anderson", "cramer_von_mises", "es", "mannw", "t_test", "empirical_mmd",
                         "wasserstein", "ed", "jensenshannon", "hellinger", "kl_div", "psi")
# not g_test (Evidently does not scale its expected counts when window and reference differ in size) nor
# fisher_exact (two categories and equal sizes only): both fail on real windows
CATEGORICAL_DRIFT_METHODS = ("chisquare", "z", "TVD", "jensenshannon", "hellinger", "kl_div", "psi")


class DriftPolicy(_P):
    """How production inputs are compared with a version's reference sample. Methods and thresholds are
    always explicit: Evidently's own default changes with the reference size."""

    environments: list[str] = Field(default_factory=lambda: ["prod"], description="Environments watched for drift.")
    window_rows: int | None = Field(2000, ge=50, le=5_000_000,
                                    description="Newest logged rows of the serving version compared (None: use window_hours).")
    window_hours: float | None = Field(None, gt=0, description="Rows logged within this many hours (instead of window_rows).")
    min_rows: int = Field(300, ge=10, description="Fewer rows in the window than this: no verdict.")
    min_new_rows: int = Field(500, ge=1, description="New rows the sensor waits for before asking for a drift check.")
    min_check_interval_minutes: float = Field(5, ge=0, description="At most one drift check per this many minutes.")
    numeric_method: Literal[NUMERIC_DRIFT_METHODS] = "ks"  # type: ignore[valid-type]
    numeric_threshold: float = Field(0.01, gt=0)
    # a distance, not Evidently's chisquare: that one takes the reference's proportions as exact, so a large
    # window against a 1,000-row reference flags unchanged categories
    categorical_method: Literal[CATEGORICAL_DRIFT_METHODS] = "jensenshannon"  # type: ignore[valid-type]
    categorical_threshold: float = Field(0.1, gt=0)
    drift_share: float = Field(0.3, gt=0, le=1, description="Share of drifted columns that counts as drift.")
    cooldown_minutes: float = Field(60, ge=0, description="After a retrain request, no other for this long.")
    retrain: bool = Field(True, description="Whether detected drift requests a retraining run.")
    report_keep_last: int = Field(30, ge=1, description="HTML reports kept per endpoint environment.")
    report_max_age_days: float = Field(30, gt=0, description="Older HTML reports are deleted.")

    @model_validator(mode="after")
    def _window(self) -> "DriftPolicy":
        if (self.window_rows is None) == (self.window_hours is None):
            raise ValueError("window_rows: set exactly one of window_rows and window_hours")
        return self


class BakePolicy(_P):
    """What a freshly switched version must show, read from its own metrics, before it counts as good."""

    environments: list[str] = Field(default_factory=lambda: ["prod"], description="Environments that bake.")
    seconds: float = Field(120, gt=0, le=86_400, description="How long the new version is watched.")
    min_requests: int = Field(50, ge=0, description="Prediction requests it must answer in that time.")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Most 5xx answers per prediction request.")
    max_p99_latency_ms: float = Field(250, gt=0, description="Highest 99th-percentile prediction latency.")
    pass_without_traffic: bool = Field(False, description="Whether a bake with too few requests passes.")
    poll_seconds: float = Field(1.0, gt=0, le=60)


class TrackPolicy(_P):
    checks: list[str]
    regression_margin: float = Field(0.02, ge=0, le=1, description="How much worse than prod a version may be.")
    regression_metric: str = "roc_auc"
    reference_rows: int = Field(1000, ge=50, le=100_000, description="Training rows kept for drift monitoring.")
    fairness: FairnessPolicy = Field(default_factory=FairnessPolicy)
    pii_allowed: bool = Field(True, description="Whether a dataset with declared PII may feed this track.")
    approval_envs: list[str] = Field(default_factory=lambda: ["prod"], description="Environments needing approval.")
    approver_role: Role = "model_approver"
    approval_valid_days: float | None = Field(
        None, gt=0, description="An approval older than this many days no longer counts (None: never expires).")
    security_fail_on: Literal["low", "medium", "high"] = "high"
    auto_promote: bool = Field(False, description="Whether automation may promote past staging.")
    drift: DriftPolicy = Field(default_factory=DriftPolicy)
    bake: BakePolicy = Field(default_factory=BakePolicy)


class CustomCheck(_P):
    """A check the built-ins do not have, declared once and named in a track's ``checks`` like a built-in one
    (``platform_defs.governance.custom_checks``: the contract, and how it runs and fails closed)."""

    function: str | None = Field(None, description="'package.module:function(ctx: onepath.CheckContext) -> onepath.Verdict'.")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                               description="With function: the sha256 of its module's file; other code fails the check.")
    entry_point: str | None = Field(None, description="Instead of function: the name an installed package gives it in "
                                                      "the 'onepath.checks' entry-point group.")
    distribution: str | None = Field(None, description="With entry_point (required): the distribution that must "
                                                       "provide it (another package's entry point of that name never runs).")
    version: str | None = Field(None, description="With entry_point: the distribution's version; another fails the check.")
    applies_to: list[Literal["model", "app"]] = Field(default_factory=lambda: ["model"],
                                                      description="What it judges: model versions, app releases.")
    description: str = Field("", description="One line, shown on the asset check.")
    timeout_seconds: float = Field(60, gt=0, le=3600, description="Longer than this: the check fails.")
    params: dict[str, Any] = Field(default_factory=dict, description="Given to the check as ctx.params.")

    @field_validator("function")
    @classmethod
    def _function(cls, v: str | None) -> str | None:
        from platform_defs.specs import IMPORT_PATH_RE

        if v is not None and not IMPORT_PATH_RE.match(v):
            raise ValueError(f"'{v}' is not an import path of the form 'package.module:function'")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "CustomCheck":
        if (self.function is None) == (self.entry_point is None):
            raise ValueError("set exactly one of function and entry_point")
        if self.function is not None and (self.distribution is not None or self.version is not None):
            raise ValueError("distribution and version pin an entry_point; a function is pinned by sha256")
        if self.entry_point is not None and self.sha256 is not None:
            raise ValueError("sha256 pins a function's module; an entry_point is pinned by distribution and version")
        return self


class Identity(_P):
    team: str
    roles: list[Role] = Field(default_factory=list)
    public_key: str = Field(description="Ed25519 public key, base64 of the 32 raw bytes.")
    demo: bool = Field(False, description="A demo identity whose private key ships with the example.")
    git_emails: list[str] = Field(default_factory=list,
                                  description="Commit author emails, to tell reviewers from authors of a change.")

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        try:
            raw = base64.b64decode(v, validate=True)
        except ValueError:
            raise ValueError("is not base64") from None
        if len(raw) != 32:
            raise ValueError(f"must be 32 bytes of Ed25519 public key, got {len(raw)}")
        return v


TrackName = Literal["app", "ml-standard", "ml-high-risk"]
MlTrack = Literal["ml-standard", "ml-high-risk"]
# how strict an ML track is: a purpose's min_track is met by its track or a stricter one. 'app' is apart:
# only app releases are on it, and an app release is on nothing else
ML_TRACK_ORDER = ("ml-standard", "ml-high-risk")


class Team(_P):
    members: list[str] = Field(default_factory=list)
    tracks: list[TrackName] = Field(default_factory=list,
                                    description="Tracks this team's declarations may use; empty: it may own none.")
    default_track: TrackName | None = Field(None, description="Track of a declaration that names none (default: "
                                                              "the team's only track, when it has one).")

    @model_validator(mode="after")
    def _default(self) -> "Team":
        if self.default_track is not None and self.default_track not in self.tracks:
            raise ValueError(f"default_track: '{self.default_track}' is not one of this team's tracks "
                             f"({', '.join(self.tracks) or 'none'})")
        return self

    def track_for(self) -> str | None:
        """The track a declaration of this team gets when it names none."""
        if self.default_track is not None:
            return self.default_track
        return self.tracks[0] if len(self.tracks) == 1 else None


class Purpose(_P):
    min_track: MlTrack = Field(description="The least strict track a model or endpoint with this purpose may use.")
    description: str = ""


GrantRoute = Literal["predict", "version", "metrics"]
CALLER_NAME_RE = r"^[a-z][a-z0-9_-]{1,62}$"
SCOPE_NAME_RE = r"^[a-z][a-z0-9_]{1,62}$"  # an endpoint or environment, as a credential names it


class AccessCaller(_P):
    """A caller the policy grants (a person's CLI, a batch job, the metrics scraper): which routes of which
    endpoints in which environments. Each (endpoint, environment) it reaches is its own grant, its own secret."""

    description: str = ""
    routes: list[GrantRoute] = Field(min_length=1, description="Routes it may call: predict, version, metrics.")
    endpoints: Literal["all"] | list[str] = Field("all", description="Endpoint names, or all.")
    environments: Literal["all"] | list[str] = Field("all", description="Environment names, or all.")

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a route is listed twice")
        return v

    @field_validator("endpoints", "environments")
    @classmethod
    def _names(cls, v: str | list[str]) -> str | list[str]:
        import re

        if isinstance(v, list):
            for i, name in enumerate(v):
                if not re.match(SCOPE_NAME_RE, name):
                    raise ValueError(f"'{name}' (item {i}) is not an endpoint or environment name "
                                     f"(lowercase letters, digits and '_', starting with a letter)")
            if len(set(v)) != len(v):
                raise ValueError("a name is listed twice")
        return v

    def reaches(self, endpoint: str, env: str) -> bool:
        return ((self.endpoints == "all" or endpoint in self.endpoints)
                and (self.environments == "all" or env in self.environments))


class AccessPolicy(_P):
    """Who may call the endpoints besides the app releases that declare ``calls`` (``platform_defs.access``)."""

    callers: dict[str, AccessCaller] = Field(default_factory=dict, description="Callers granted by policy.")
    overlap_seconds: float = Field(60, ge=1, le=86_400,
                                   description="After a rotation the old secret keeps working this long.")
    rotate_after_days: float = Field(30, gt=0, le=3650, description="A secret older than this is rotated.")

    @field_validator("callers")
    @classmethod
    def _callers(cls, v: dict[str, AccessCaller]) -> dict[str, AccessCaller]:
        import re

        for name in v:
            if not re.match(CALLER_NAME_RE, name):
                raise ValueError(f"'{name}' is not a caller name (lowercase letters, digits, '-' and '_', "
                                 f"starting with a letter; 'app:...' callers come from declarations)")
        return v


class Policy(_P):
    tracks: dict[Literal["app", "ml-standard", "ml-high-risk"], TrackPolicy]
    teams: dict[str, Team]
    identities: dict[str, Identity] = Field(default_factory=dict)
    platform_team: str = "platform"
    purposes: dict[str, Purpose] = Field(default_factory=dict,
                                         description="Declared purposes (credit_decision, ...) and the track each needs.")
    demo: bool = Field(False, description="Demo mode: identities marked demo, and the keys shipped in "
                                          "assets/demo_identities, may sign. Never in production.")
    access: AccessPolicy = Field(default_factory=AccessPolicy,
                                 description="Callers the policy grants, rotation and overlap (platform_defs.access).")
    custom_checks: dict[str, CustomCheck] = Field(
        default_factory=dict, description="Checks beyond the built-in ones, by the name a track's checks use.")

    @model_validator(mode="after")
    def _refs(self) -> "Policy":
        import re

        builtin = set(APP_CHECKS) | set(ML_CHECKS)
        for name in self.custom_checks:  # a declaration may add a check, never stand in for a built-in one
            if name in builtin:
                raise ValueError(f"custom_checks.{name}: '{name}' is a built-in check; a custom check cannot "
                                 f"replace it (choose another name)")
            if not re.match(r"^[a-z][a-z0-9_]{0,63}$", name):
                raise ValueError(f"custom_checks.{name}: not a check name (lowercase letters, digits and '_', "
                                 f"starting with a letter)")
        for name, track in self.tracks.items():
            allowed = APP_CHECKS if name == "app" else ML_CHECKS
            other = ML_CHECKS if name == "app" else APP_CHECKS
            kind = "app" if name == "app" else "model"
            for i, check in enumerate(track.checks):
                if check in other and check not in allowed:
                    raise ValueError(f"tracks.{name}.checks.{i}: unknown check '{check}' for track '{name}' "
                                     f"(known: {', '.join(allowed)})")
                custom = self.custom_checks.get(check)
                if custom is not None and kind not in custom.applies_to:
                    raise ValueError(f"tracks.{name}.checks.{i}: custom check '{check}' applies to "
                                     f"{', '.join(custom.applies_to)}, not to the {kind}s of track '{name}' "
                                     f"(custom_checks.{check}.applies_to)")
                # any other name must be declared and provided: load_policy looks it up (use_problem)
        for who, ident in self.identities.items():
            if ident.team not in self.teams:
                raise ValueError(f"identities.{who}.team: unknown team '{ident.team}'")
            if who not in self.teams[ident.team].members:
                raise ValueError(f"identities.{who}.team: '{who}' is not listed in teams.{ident.team}.members")
        holders: dict[str, str] = {}
        for who, ident in self.identities.items():  # one key, one identity: else its holder signs as either
            if ident.public_key in holders:
                raise ValueError(f"identities.{who}.public_key: the same key as identities.{holders[ident.public_key]}"
                                 f" (whoever holds it could sign as either)")
            holders[ident.public_key] = who
        for team, t in self.teams.items():
            for m in t.members:
                owners = [x for x, tt in self.teams.items() if m in tt.members]
                if len(owners) > 1:
                    raise ValueError(f"teams.{team}.members: '{m}' is in more than one team ({', '.join(owners)})")
        if self.platform_team not in self.teams:
            raise ValueError(f"platform_team: unknown team '{self.platform_team}'")
        missing = {"app", "ml-standard", "ml-high-risk"} - set(self.tracks)
        if missing:
            raise ValueError(f"tracks: track '{sorted(missing)[0]}' has no policy")
        return self

    def team_of(self, identity: str) -> str | None:
        return next((t for t, team in self.teams.items() if identity in team.members), None)

    def track(self, name: str) -> TrackPolicy:
        return self.tracks[name]  # type: ignore[index]


def resolve_organisation(org: "Organisation", policy: Policy, policy_file: Path | None = None) -> "Organisation":
    """The organisation with every track decided by the policy, checked against it; the one place a
    declaration meets the policy (every entry point loads through it: ``loader.load_organisation``).

    A declaration's owner must be a team of the policy, its track one the team may use (a declaration
    that names none gets the team's default), an ML model's or endpoint's purpose one the policy lists,
    on at least that purpose's ``min_track``; an endpoint follows its model. PII may not feed a model on a
    track that forbids it. Anything else is a ``DeclarationError`` naming the file, the declaration, the
    field and the policy rule."""
    from platform_defs.specs import AppSpec, DatasetSpec, DeclarationError, EndpointSpec, ModelSpec, Organisation

    where = _shown(policy_file or policy_path())

    def err(d, field: str, problem: str) -> DeclarationError:
        return DeclarationError(d.name, field, problem, org.sources.get(d.name), d.kind)

    def team_of(d) -> Team:
        team = policy.teams.get(d.owner)
        if team is None:
            raise err(d, "owner", f"team '{d.owner}' is not a team of the policy (policy {where} teams: "
                                  f"{', '.join(sorted(policy.teams))})")
        return team

    def track_of(d, team: Team, ml: bool) -> str:
        rule = f"policy {where} teams.{d.owner}.tracks is [{', '.join(team.tracks)}]"
        track = d.track
        if track is None:
            track = team.track_for()
            if track is None:
                raise err(d, "track", f"no track declared and team '{d.owner}' has no default ({rule}"
                                      f"{'' if not team.tracks else f'; set teams.{d.owner}.default_track'}): "
                                      f"declare the track")
        if track not in team.tracks:
            raise err(d, "track", f"team '{d.owner}' may not use track '{track}' ({rule})")
        if ml and track == "app":
            raise err(d, "track", f"a {d.kind} is on an ML track, not 'app' (only app releases are on track 'app')")
        return track

    def check_purpose(d, track: str) -> None:
        if d.purpose is None:
            return
        purpose = policy.purposes.get(d.purpose)
        if purpose is None:
            raise err(d, "purpose", f"unknown purpose '{d.purpose}' (policy {where} purposes: "
                                    f"{', '.join(sorted(policy.purposes)) or 'none'})")
        if ML_TRACK_ORDER.index(track) < ML_TRACK_ORDER.index(purpose.min_track):
            raise err(d, "track", f"purpose '{d.purpose}' needs track '{purpose.min_track}' or stricter, not "
                                  f"'{track}' (policy {where} purposes.{d.purpose}.min_track is {purpose.min_track})")

    resolved: dict[str, object] = {}
    order = {"dataset": 0, "model": 1, "endpoint": 2, "app": 3}
    for d in sorted(org.by_name.values(), key=lambda x: order[x.kind]):
        team = team_of(d)
        update: dict[str, object] = {}
        if isinstance(d, EndpointSpec):
            model = resolved[d.model]
            assert isinstance(model, ModelSpec)
            if d.track is not None and d.track != model.track:
                raise err(d, "track", f"'{d.track}' differs from model '{model.name}' track '{model.track}' "
                                      f"(an endpoint follows its model)")
            if d.purpose is not None and d.purpose != model.purpose:
                raise err(d, "purpose", f"'{d.purpose}' differs from model '{model.name}' purpose "
                                        f"'{model.purpose}' (an endpoint follows its model)")
            track = model.track
            if track not in team.tracks:
                raise err(d, "owner", f"team '{d.owner}' may not use track '{track}' of model '{model.name}' "
                                      f"(policy {where} teams.{d.owner}.tracks is [{', '.join(team.tracks)}])")
            update = {"track": track, "purpose": model.purpose}
        elif isinstance(d, AppSpec):
            if "app" not in team.tracks:
                raise err(d, "owner", f"team '{d.owner}' may not use track 'app' (policy {where} "
                                      f"teams.{d.owner}.tracks is [{', '.join(team.tracks)}])")
            update = {"track": "app"}
        else:
            track = track_of(d, team, ml=True)
            if isinstance(d, ModelSpec):
                check_purpose(d, track)
            update = {"track": track}
        resolved[d.name] = d.model_copy(update=update) if any(getattr(d, k) != v for k, v in update.items()) else d
    for m in resolved.values():
        if not isinstance(m, ModelSpec):
            continue
        ds = resolved[m.dataset]
        assert isinstance(ds, DatasetSpec)
        if ds.pii_columns and not policy.track(m.track).pii_allowed:
            raise err(m, "dataset",
                      f"dataset '{ds.name}' declares PII ({', '.join(ds.pii_columns)}) and the policy forbids PII "
                      f"on track '{m.track}': feed the model a de-identified dataset")
    endpoints = {d.name: d for d in resolved.values() if isinstance(d, EndpointSpec)}
    envs = {e for d in endpoints.values() for e in d.environments}
    for name, caller in policy.access.callers.items():  # a caller naming what nothing declares grants nothing, silently
        for i, ep in enumerate(caller.endpoints if isinstance(caller.endpoints, list) else []):
            if ep not in endpoints:
                raise PolicyError(where, f"access.callers.{name}.endpoints.{i}",
                                  f"'{ep}' is not a declared endpoint (declared: {', '.join(sorted(endpoints)) or 'none'})")
        for i, env in enumerate(caller.environments if isinstance(caller.environments, list) else []):
            if env not in envs:
                raise PolicyError(where, f"access.callers.{name}.environments.{i}",
                                  f"'{env}' is no environment of any declared endpoint "
                                  f"(they have: {', '.join(sorted(envs)) or 'none'})")
    if all(resolved[n] is d for n, d in org.by_name.items()):
        return org
    return Organisation([resolved[n] for n in org.by_name], {k: v for k, v in org.sources.items() if "#" not in k})


def check_organisation(org: "Organisation", policy: Policy) -> "Organisation":
    """``resolve_organisation`` (kept under its old name for callers that only check)."""
    return resolve_organisation(org, policy)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_policy(path: Path | None = None) -> Policy:
    path = path or policy_path()
    shown = _shown(path)
    if not path.exists():
        raise PolicyError(shown, "(file)", "does not exist")
    policy = parse_policy(path.read_text(), shown)
    problem = use_problem(policy)
    if problem is not None:
        raise PolicyError(shown, *problem)
    return policy


def use_problem(policy: Policy) -> tuple[str, str] | None:
    """``(key, problem)`` for what a policy loaded for use (the gate, ``onepath validate``, ``policy apply``)
    must also satisfy, beyond ``parse_policy``'s structure: rules added after policies were recorded (a check
    listed twice) and what the installed packages provide. Never applied to recorded history: uninstalling a
    package, or a newer rule, must not break the recorded chain (the gate fails closed at run time anyway)."""
    for name, track in policy.tracks.items():
        if len(set(track.checks)) != len(track.checks):
            return f"tracks.{name}.checks", "a check is listed twice"
    for name, check in policy.custom_checks.items():
        if check.entry_point is not None and check.distribution is None:
            return (f"custom_checks.{name}", "entry_point needs distribution: (the installed distribution that must "
                                             "provide it; another package's entry point of that name never runs)")
    from platform_defs.governance.custom_checks import unprovided

    return unprovided(policy)  # every check a track names is built in, or declared and provided


def parse_policy(text: str, shown: str) -> Policy:
    """Validate a policy's YAML ``text``, structurally (no I/O: recorded history is re-parsed with it); errors
    name ``shown`` (a file, or a ledger entry) and the key. A policy for use goes through ``load_policy``."""
    try:
        data = strict_yaml.load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise PolicyError(f"{shown}:{mark.line + 1}" if mark else shown, "(yaml)",
                          f"not valid YAML: {getattr(err, 'problem', err)}") from None
    try:
        policy = Policy.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key"
        elif first["type"] == "value_error" and ": " in msg and not loc:
            loc, msg = msg.split(": ", 1)
        elif first["type"] not in ("missing",) and "input" in first and not isinstance(first["input"], (dict, list)):
            msg = f"{msg} (got {first['input']!r})"
        raise PolicyError(shown, loc or "(root)", msg) from None
    return policy




# The public keys (base64 raw) of the private keys shipped in assets/demo_identities (mira, rob, carla, pat):
# anyone with the repository holds them, so an identity listing one is a demo identity whatever its name or
# flag says. Constants, not read from the folder at run time: a stripped install, or a shipped file
# overwritten with garbage, must not make them look unknown (tests/test_approvals.py checks them against
# the files).
SHIPPED_DEMO_KEYS: frozenset[str] = frozenset({
    "ISKeMx7KSOe3Z0XI6eEVr5LccV5ihTq/BMSueQu5Q08=",
    "aOawIE/Iw6bEixRXbmAsI1IKRvEor5ut5xNm1LDBEp0=",
    "Yai5js7FY+mIMa1IkvdNUiKfygEJxzHfkFifSIhR3sA=",
    "W5AhSNCYQ2mSEcR+4EfCZ3Kd8w3I+PBvS8urqeDTomM=",
})


def shipped_demo_keys() -> frozenset[str]:
    return SHIPPED_DEMO_KEYS


def is_demo_identity(policy: Policy, name: str) -> bool:
    """Marked ``demo: true``, or holding a public key whose private half ships with the repository."""
    ident = policy.identities.get(name)
    return ident is not None and (ident.demo or ident.public_key in shipped_demo_keys())


def policy_hash(policy: Policy) -> str:
    """sha256 of the policy's content (canonical JSON of the validated model): what a gate verdict was
    judged under, so a way back can tell whether the policy changed since."""
    import hashlib
    import json

    data = policy.model_dump(mode="json")
    if not data["custom_checks"]:  # a policy with none hashes as it did before custom checks existed
        del data["custom_checks"]
    for check in data.get("custom_checks", {}).values():  # pins unset: hashes as before pins existed
        for pin in ("sha256", "distribution", "version"):
            if check[pin] is None:
                del check[pin]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def effective_drift(endpoint: "EndpointSpec", policy: Policy, source: str | None = None) -> DriftPolicy:
    """The track's drift policy with the endpoint's own settings laid over it (window, methods, ...).

    A bad combination (an unknown method, both windows) is a ``DeclarationError`` naming the endpoint."""
    from platform_defs.specs import DeclarationError

    base = policy.track(endpoint.track).drift.model_dump()
    own = endpoint.drift.model_dump(exclude_none=True)
    if "window_rows" in own:
        base["window_hours"] = None
    if "window_hours" in own:
        base["window_rows"] = None
    try:
        return DriftPolicy.model_validate({**base, **own})
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "drift"
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "literal_error":
            msg = f"{msg} (got {first.get('input')!r})"
        raise DeclarationError(endpoint.name, f"drift.{loc}", msg, source, "endpoint") from None
