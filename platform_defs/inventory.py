"""What is in production, in one call: every endpoint and app release per environment, with what the
platform recorded about it and what its server says right now.

``build_inventory`` joins three sources, each read once:

* the **ledger** (one ``entries()`` read of the four kinds below, indexed in memory): the version the platform believes
  serves (the latest ``deploy`` entry for the subject and environment; a rollback records one
  too), when and by whom it was deployed, the ``approval`` entries for that model (or app),
  version and environment, and the latest ``gate_verdict`` for that subject, environment and
  version (whether each approval counted is the gate's ``approval`` / ``code_review`` verdict);
* the **MLflow registry**, only for what the ledger lacks (so a fresh ``onepath inventory`` of a
  platform whose versions were registered and deployed through it never opens it), batched: one
  ``search_model_versions`` per 200 model names (paged) for the lineage tags
  (``onepath.dataset_key``, ``onepath.data_hash``, ``onepath.code_hash``) of a recorded version
  without a ``model_registered`` ledger entry (one with it shows its recorded lineage), and one
  ``search_registered_models`` per 200 names for the aliases, only of models that have an
  environment with a stable address but no ledger deploy entry: the alias named after the
  environment is then the recorded version (something deployed before the ledger existed), unless
  several endpoints serve that model in that environment (the alias cannot tell them apart);
* the **servers**: ``probe_many`` (asyncio) at every known stable address, all at once
  (a thread pool started before the ledger and registry reads, so the three overlap).

Endpoints are compared by content too: ``live_digest`` (what the server reports it loaded, from
``/version``) against the ``model_registered`` digest of the version it serves (``registered_digest``);
``digest_agrees`` False makes the row a ``mismatch`` whatever the label says.

A row ``agrees`` when the live version equals the recorded one; it is ``False`` (a mismatch) when
something else answers, and ``None`` when nothing answers or nothing was recorded (so there is
nothing to compare). ``state`` says it in one word: ``ok``, ``mismatch``, ``down``, ``unrecorded``
(something answers and the platform has no record of it: deployed around the platform) or
``not deployed``.

``build_inventory_asset(org, policy)`` wraps the same call as the ``production_inventory`` asset.
"""


import json
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

# Only what a fresh ``onepath inventory`` needs is imported here: the ledger (sqlite) and the probes. The specs
# and the policy (pydantic) only where declarations become ``Subject``s (``subjects_of``; a fresh inventory
# whose organisation is unchanged reads them from ``platform_defs.inventory_cache``), Dagster by the asset and
# the schedule, MLflow only when the ledger lacks something.
from resources.deployers.base import Deployer, Target, probe_many
from resources.ledger import Entry, Ledger

if TYPE_CHECKING:
    import dagster as dg

    from platform_defs.policy import Policy
    from platform_defs.specs import Organisation
    from resources.mlflow_registry import MlflowRegistry

TAG_PREFIX = "onepath."  # resources.mlflow_registry.TAG_PREFIX (that module imports Dagster and MLflow)

LINEAGE_TAGS = ("dataset_key", "data_hash", "code_hash")
NAMES_PER_QUERY = 200  # model names per MLflow "name IN (...)" filter

STATES = ("ok", "mismatch", "down", "unrecorded", "not deployed")


@dataclass
class InventoryRow:
    """One endpoint or app release in one environment."""

    name: str
    kind: str  # endpoint | app
    env: str
    track: str
    owner: str
    model: str | None = None  # endpoints: the model declaration it serves
    recorded_version: str | None = None  # what the platform believes serves
    version_source: str | None = None  # "ledger" | "mlflow_alias" | None (nothing recorded)
    deployed_at: str | None = None  # ts of the ledger entry that recorded the version
    deployed_by: str | None = None
    deploy_entry: int | None = None  # its ledger seq
    previous_version: str | None = None
    approvals: list[dict[str, Any]] = field(default_factory=list)
    approval_required: bool = True  # False: the track's policy requires no approval in this environment
    gate: dict[str, Any] | None = None
    lineage: dict[str, str | None] | None = None
    address: str | None = None
    live_version: str | None = None
    registered_digest: str | None = None  # endpoints: the recorded version's digest (model_registered entry)
    live_digest: str | None = None  # the digest the server reports it loaded
    healthy: bool = False
    agrees: bool | None = None
    digest_agrees: bool | None = None  # False: what serves is not the registered content, whatever its label
    notes: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.healthy:
            if self.recorded_version is None:
                return "unrecorded"
            return "ok" if self.agrees and self.digest_agrees is not False else "mismatch"
        if self.recorded_version is not None:
            return "down"
        return "not deployed"

    @property
    def mismatch(self) -> bool:
        return self.agrees is False or self.digest_agrees is False

    def state_text(self) -> str:
        """The state as a person reads it in a table: ``MISMATCH live=3 recorded=2``."""
        s = self.state
        if s == "mismatch" and self.agrees:
            return f"MISMATCH digest live={_short(self.live_digest)} registered={_short(self.registered_digest)}"
        if s == "mismatch":
            return f"MISMATCH live={self.live_version} recorded={self.recorded_version}"
        if s == "down":
            return f"DOWN (recorded {self.recorded_version or '-'})"
        if s == "unrecorded":
            return f"unrecorded live={self.live_version}"
        return s

    def as_dict(self) -> dict[str, Any]:
        # field by field, not dataclasses.asdict: its deep copy cost ~1 s for 2,000 rows (the values are JSON's)
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["state"] = self.state
        d["mismatch"] = self.mismatch
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


# --------------------------------------------------------------------------------------------
# The ledger, read once


def _short(digest: str | None) -> str:
    return digest[:19] if digest else "none"


class _LedgerIndex:
    KINDS = ("deploy", "approval", "gate_verdict", "model_registered")  # what it reads (ledger.entries(kinds=))

    def __init__(self, entries: Iterable[Entry]):
        self.registrations: dict[tuple[str, str], Entry] = {}
        self.deploys: dict[tuple[str, str | None], Entry] = {}
        self.approvals: dict[tuple[str, str | None, str], list[Entry]] = defaultdict(list)
        self.gates: dict[tuple[str, str | None, str], Entry] = {}
        for e in entries:  # oldest first: later entries overwrite
            version = e.data.get("version") if isinstance(e.data, dict) else None
            if version is None:
                continue
            version = str(version)
            if e.kind == "deploy":  # a rollback records a deploy too (data["via"] == "rollback")
                self.deploys[(e.subject, e.env)] = e
            elif e.kind == "approval":
                self.approvals[(e.subject, e.env, version)].append(e)
            elif e.kind == "gate_verdict":
                self.gates[(e.subject, e.env, version)] = e
            elif e.kind == "model_registered":  # the first record of a version stands
                self.registrations.setdefault((e.subject, version), e)


# --------------------------------------------------------------------------------------------
# The registry, batched


def _name_filter(names: list[str]) -> str:
    # declaration names match ^[a-z][a-z0-9_]*$ (specs.NAME_RE): nothing to escape
    return "name IN (" + ", ".join(f"'{n}'" for n in names) + ")"


def _paged(call: Any, **kwargs: Any) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = call(page_token=token, **kwargs)
        out += list(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def _aliases(client: Any, models: set[str]) -> dict[str, dict[str, str]]:
    """model -> alias -> version (``search_model_versions`` leaves aliases empty; models carry them)."""
    out: dict[str, dict[str, str]] = {}
    names = sorted(models)
    for i in range(0, len(names), NAMES_PER_QUERY):
        for rm in _paged(client.search_registered_models, filter_string=_name_filter(names[i:i + NAMES_PER_QUERY]),
                         max_results=1000):
            out[rm.name] = {a: str(v) for a, v in (rm.aliases or {}).items()}
    return out


def _version_tags(client: Any, models: set[str]) -> dict[tuple[str, str], dict[str, str]]:
    """(model, version) -> the version's tags, for every version of ``models``."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    names = sorted(models)
    for i in range(0, len(names), NAMES_PER_QUERY):
        for mv in _paged(client.search_model_versions, filter_string=_name_filter(names[i:i + NAMES_PER_QUERY]),
                         max_results=10000):
            out[(mv.name, str(mv.version))] = dict(mv.tags or {})
    return out


# --------------------------------------------------------------------------------------------
# Addresses and probes


@dataclass(frozen=True)
class Subject:
    """What the inventory needs of one endpoint or app release environment: its declaration's facts and what
    the policy requires of it there (``subjects_of``, the one place that computes them)."""

    name: str
    kind: str  # endpoint | app
    env: str
    track: str
    owner: str
    model: str | None  # endpoints: the model it serves
    port: int | None  # a fixed stable port, if declared
    required_checks: tuple[str, ...]  # what the gate requires here (as ModelGate / AppGate decide)
    approval_required: bool  # whether the policy asks an approval (a code review for an app) here

    @property
    def target(self) -> Target:
        return Target(self.name, self.env, self.kind, self.port)

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Subject":
        return cls(**{**d, "required_checks": tuple(d["required_checks"])})


def subjects_of(org: "Organisation", policy: "Policy") -> list[Subject]:
    """Every endpoint and app release environment of ``org``, in declaration order, with what ``policy``
    requires of it."""
    from platform_defs.specs import targets_of

    out = []
    for d, env, t in targets_of(org):
        checks = tuple(_required_checks(policy, d, env))
        out.append(Subject(name=d.name, kind=t.kind, env=env, track=d.track, owner=d.owner,
                           model=d.model if t.kind == "endpoint" else None, port=t.port, required_checks=checks,
                           approval_required=("code_review" if t.kind == "app" else "approval") in checks))
    return out


def known_addresses(deployer: Deployer, targets: list[Target]) -> list[str | None]:
    """Each target's stable address if one was ever allocated, else None. Never allocates one.

    A deployer may offer ``addresses_if_known(targets)`` for a bulk answer; the local backend's
    port registry is read once here (``_address_if_known`` per target would lock and parse it
    per target); any other backend is asked per target.
    """
    bulk = getattr(deployer, "addresses_if_known", None)
    if callable(bulk):
        return list(bulk(targets))
    from resources.deployers.local import LocalProcessDeployer

    if isinstance(deployer, LocalProcessDeployer):
        ports = deployer._ports()
        out: list[str | None] = []
        for t in targets:
            port = t.port if t.port is not None else ports.get(t.slot)
            out.append(f"http://{deployer.host}:{port}" if port else None)
        return out
    return [deployer._address_if_known(t) for t in targets]


# --------------------------------------------------------------------------------------------
# The inventory


def _approvals(index: _LedgerIndex, subject: str, env: str, version: str) -> list[dict[str, Any]]:
    """The approval entries for exactly this subject, version and environment, as recorded.

    Whether one counted (signature, role, independence) is the gate's verdict, also in the row."""
    out = []
    for e in index.approvals.get((subject, env, version), []):
        d = e.data
        out.append({"approver": d.get("approver") or e.actor, "approved_at": d.get("approved_at") or e.ts,
                    "reason": d.get("reason"), "first_release": bool(d.get("first_release")),
                    "ledger_entry": e.seq})
    return out


def _required_checks(policy: "Policy", d: Any, env: str) -> list[str]:
    """The checks the gate requires for this declaration in ``env`` (as ModelGate / AppGate decide)."""
    from platform_defs.specs import AppSpec

    tp = policy.track(d.track)
    if isinstance(d, AppSpec):
        first = env == d.environments[0]
        return [c for c in tp.checks if not (c == "code_review" and env not in tp.approval_envs)
                and not (c == "integration_tests" and first)]
    return [c for c in tp.checks if c not in ("approval", "rollback_path") or env in tp.approval_envs]


def _gate(index: _LedgerIndex, s: Subject, version: str) -> dict[str, Any] | None:
    e = index.gates.get((s.name, s.env, version))
    if e is None:
        return None
    checks = {str(k): {"passed": bool(v.get("passed")), "summary": v.get("summary")}
              for k, v in (e.data.get("verdicts") or {}).items() if isinstance(v, dict)}
    return {"passed": bool(e.data.get("passed")), "checks": checks, "ledger_entry": e.seq, "at": e.ts,
            "missing": [c for c in s.required_checks if c not in checks]}


def build_inventory(org: "Organisation", policy: "Policy", mlflow: "MlflowRegistry", ledger: Ledger,
                    deployer: Deployer, env: str | None = None, timeout: float = 1.0) -> list[InventoryRow]:
    """Every endpoint and app release per environment (only ``env`` if given): recorded vs live.

    Reads the ledger once, asks MLflow for the versions (lineage) of every model in one batched
    search per 200 names, and for aliases only of models with an environment the ledger has no
    deploy entry for; probes every known stable address in parallel, each with ``timeout``.
    """
    return inventory_of(subjects_of(org, policy), mlflow, ledger, deployer, env=env, timeout=timeout)


def inventory_of(subjects: list[Subject], mlflow: "MlflowRegistry", ledger: Ledger, deployer: Deployer,
                 env: str | None = None, timeout: float = 1.0) -> list[InventoryRow]:
    """``build_inventory`` of the organisation's ``subjects_of`` (every environment: an alias is judged against
    all of them)."""
    # an alias names what serves one model in one environment: a stand-in for a missing deploy entry
    # only where a single endpoint serves that model there
    sharing: dict[tuple[str, str], int] = defaultdict(int)
    for s in subjects:
        if s.kind == "endpoint":
            sharing[(s.model, s.env)] += 1  # type: ignore[index]
    chosen = [s for s in subjects if env is None or s.env == env]
    targets = [s.target for s in chosen]
    addresses = known_addresses(deployer, targets)
    unique = sorted({a for a in addresses if a})
    # an endpoint's /version needs a credential: the backend's own probe token for each endpoint address, read
    # only for a server that accepts the connection (a slot secret per address cost 0.2 s at 2,000 addresses)
    probed = {a: t for t, a in zip(targets, addresses) if a and t.kind == "endpoint"}

    def credentials(address: str) -> str | None:
        return deployer.probe_credential(probed[address]) if address in probed else None
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inventory-probe")
    try:
        # the probes (one asyncio loop, all addresses at once) run while the ledger and registry are read
        probing: Future = pool.submit(probe_many, unique, timeout, 256, False, credentials)
        index = _LedgerIndex(ledger.entries(kinds=_LedgerIndex.KINDS))
        endpoints = [(s, s.env) for s in chosen if s.kind == "endpoint"]
        # an alias stands in only where something was ever deployed: a stable address is allocated by the first
        # deploy, so without one the alias names nothing that serves here
        placed = {(s.name, s.env) for s, a in zip(chosen, addresses) if a}
        unrecorded = {d.model for d, e in endpoints if (d.name, e) not in index.deploys
                      and sharing[(d.model, e)] == 1 and (d.name, e) in placed}
        # the registry is asked only what the ledger does not know (a fresh `onepath inventory` of a platform
        # whose versions were all registered through it never imports MLflow): the alias standing in for a
        # missing deploy entry, and the lineage tags of a recorded version without a model_registered entry
        unregistered = {d.model for d, e in endpoints if (d.name, e) in index.deploys
                        and (d.model, str(index.deploys[(d.name, e)].data["version"])) not in index.registrations}
        aliases: dict[str, dict[str, str]] = {}
        tags: dict[tuple[str, str], dict[str, str]] = {}
        if unrecorded or unregistered:
            client = mlflow.client()
            aliases = _aliases(client, unrecorded) if unrecorded else {}
            tags = _version_tags(client, unrecorded | unregistered)
        live = probing.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

    rows = []
    for d, address in zip(chosen, addresses):
        e = d.env
        row = InventoryRow(name=d.name, kind=d.kind, env=e, track=d.track, owner=d.owner, address=address)
        is_endpoint = d.kind == "endpoint"
        if is_endpoint:
            row.model = d.model
        deploy = index.deploys.get((d.name, e))
        if deploy is not None:
            row.recorded_version = str(deploy.data["version"])
            row.version_source = "ledger"
            row.deployed_at, row.deployed_by, row.deploy_entry = deploy.ts, deploy.actor, deploy.seq
            prev = deploy.data.get("previous_version")
            row.previous_version = str(prev) if prev is not None else None
            if deploy.data.get("via") == "rollback":
                row.notes.append(f"deployed by a rollback (ledger #{deploy.data.get('rollback_entry', deploy.seq)})")
        elif is_endpoint and (d.name, e) in placed and aliases.get(d.model, {}).get(e) is not None:
            row.recorded_version, row.version_source = aliases[d.model][e], "mlflow_alias"
            row.notes.append(f"no deploy entry in the ledger; version from MLflow alias {d.model}@{e}")
        elif is_endpoint and sharing[(d.model, e)] > 1:
            row.notes.append(f"no deploy entry in the ledger; MLflow alias {d.model}@{e} is shared by "
                             f"{sharing[(d.model, e)]} endpoints, so it says nothing about this one")
        version = row.recorded_version
        if version is not None and is_endpoint:
            reg = index.registrations.get((d.model, version))
            if reg is not None:
                row.registered_digest = reg.data.get("digest")
            else:
                row.notes.append(f"version {version} of '{d.model}' has no model_registered ledger entry "
                                 f"(no digest to compare what serves with)")
            # lineage as registration recorded it (tags are client-writable); the registry's tags only without one
            if reg is not None:
                row.lineage = {k: reg.data.get(k) for k in LINEAGE_TAGS}
            elif (d.model, version) in tags:
                row.lineage = {k: tags[(d.model, version)].get(TAG_PREFIX + k) for k in LINEAGE_TAGS}
            else:
                row.notes.append(f"MLflow has no version {version} of model '{d.model}'")
        row.approval_required = d.approval_required
        if version is not None:
            row.approvals = _approvals(index, d.model if is_endpoint else d.name, e, version)
            row.gate = _gate(index, d, version)
        seen = live.get(address) if address else None
        if seen is not None:
            row.healthy = True
            row.live_version = str(seen["version"]) if seen.get("version") is not None else None
            row.live_digest = seen.get("digest") or None
            if is_endpoint and seen.get("model") not in (None, d.model):
                row.notes.append(f"the server at {address} says it serves model '{seen.get('model')}'")
            if version is not None:
                row.agrees = row.live_version == version
            if is_endpoint and row.live_version is not None:
                # the served content against the served version's registration (not the label's say-so)
                reg = index.registrations.get((d.model, row.live_version))
                row.registered_digest = reg.data.get("digest") if reg is not None else row.registered_digest
                row.digest_agrees = (row.live_digest is not None and reg is not None
                                     and row.live_digest == reg.data.get("digest"))
                if not row.digest_agrees:
                    row.notes.append(f"served digest {row.live_digest or 'not reported'} is not the registered "
                                     f"digest {reg.data.get('digest') if reg else 'none'} of version "
                                     f"{row.live_version}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Presenting it


def summarize(rows: list[InventoryRow]) -> dict[str, int]:
    states = [r.state for r in rows]
    return {"total": len(rows), "serving": sum(r.healthy for r in rows), "unhealthy": states.count("down"),
            "mismatches": states.count("mismatch"), "unrecorded": states.count("unrecorded"),
            "not_deployed": states.count("not deployed")}


def _approved(r: InventoryRow) -> str:
    if not r.approvals and not r.approval_required:
        return "not required by track"
    return ", ".join(a["approver"] for a in r.approvals) or "-"


def _gate_text(r: InventoryRow) -> str:
    if r.gate is None:
        return "-"
    failed = [c for c, v in r.gate["checks"].items() if not v["passed"]]
    if failed:
        return "failed: " + ",".join(failed)
    return "passed" if r.gate["passed"] else "failed"


def table_rows(rows: list[InventoryRow]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    header = ("NAME", "KIND", "ENV", "MODEL", "RECORDED", "LIVE", "DIGEST", "STATE", "APPROVED BY", "GATE",
              "DEPLOYED AT", "ADDRESS", "OWNER", "TRACK")
    body = [(r.name, r.kind, r.env, r.model or "-", r.recorded_version or "-", r.live_version or "-",
             r.live_digest[:19] if r.live_digest else "-", r.state_text(), _approved(r), _gate_text(r), (r.deployed_at or "-")[:19], r.address or "-",
             r.owner, r.track) for r in rows]
    return header, body


def text_table(rows: list[InventoryRow]) -> str:
    header, body = table_rows(rows)
    table = [header] + body
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def markdown_table(rows: list[InventoryRow]) -> str:
    header, body = table_rows(rows)

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(h.lower() for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The asset


def build_inventory_asset(org: "Organisation", policy: "Policy") -> "dg.AssetsDefinition":
    """``production_inventory``: the inventory as an asset, refreshed on demand or by a schedule."""
    import dagster as dg

    from resources.deployers.resource import LocalDeployerResource
    from resources.ledger import LedgerResource
    from resources.mlflow_registry import MlflowRegistry

    @dg.asset(
        key="production_inventory",
        group_name="platform",
        kinds={"inventory"},
        owners=[f"team:{policy.platform_team}"],
        tags={"onepath/kind": "inventory"},
        description="Every endpoint and app release per environment: the version the ledger records, its "
                    "approvals, gate verdicts and lineage, and what the server at its stable address "
                    "answers now. A mismatch between recorded and live is flagged.",
    )
    def production_inventory(context: dg.AssetExecutionContext, mlflow: MlflowRegistry,
                             ledger: LedgerResource, deployer_local: LocalDeployerResource) -> dg.MaterializeResult:
        rows = build_inventory(org, policy, mlflow, ledger.ledger(), deployer_local.deployer())
        counts = summarize(rows)
        context.log.info(", ".join(f"{k}={v}" for k, v in counts.items()))
        for r in rows:
            if r.state in ("mismatch", "down"):
                context.log.warning(f"{r.name}.{r.env}: {r.state_text()}")
        return dg.MaterializeResult(metadata={
            **counts,
            "inventory": dg.MetadataValue.md(markdown_table(rows)),
            "rows": dg.MetadataValue.json([r.as_dict() for r in rows]),
        })

    return production_inventory


def build_inventory_schedule(cron: str = "*/15 * * * *") -> "dg.ScheduleDefinition":
    """Refresh ``production_inventory`` on a cron (every 15 minutes by default)."""
    import dagster as dg

    return dg.ScheduleDefinition(name="production_inventory_schedule", cron_schedule=cron,
                                 target=dg.AssetSelection.assets("production_inventory"),
                                 default_status=dg.DefaultScheduleStatus.RUNNING)


__all__ = ["InventoryRow", "Subject", "build_inventory", "build_inventory_asset",
           "build_inventory_schedule", "inventory_of", "known_addresses", "markdown_table", "subjects_of", "summarize",
           "text_table"]
