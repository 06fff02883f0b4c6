"""Model cards: one page per model version that says what it is for, how good and how fair it is,
where it came from, who approved it and where it has served.

Three steps, the first two pure (no I/O, no MLflow client, no Dagster):

- :func:`card_data_from` gathers a :class:`ModelCardData` from what the platform already holds: the
  model's declaration (:class:`~platform_defs.specs.ModelSpec`), its MLflow model version and run
  (the MLflow objects, or plain dicts with the same fields), the gate's
  :class:`~platform_defs.governance.gates.Verdict` list, and ledger :class:`~resources.ledger.Entry`
  objects (approvals of this version; deploys, rollbacks and refusals of this model).
- :func:`render_model_card` turns it into ``(markdown, html)``. The HTML is a standalone page:
  inline styles, no script, no external asset (the importance chart, when known, is an inline
  ``data:image/png`` URI checked to be nothing but base64). Every value is escaped
  (``html.escape`` in HTML; in Markdown ``<``, ``>`` and ``|`` are backslash-escaped so a reason
  like ``<script>`` shows as text wherever the Markdown is rendered).
- :func:`write_model_card` writes both next to each other (atomically) and returns their paths.

Sections: intended use, owner and track, version and MLflow run, held-out metrics, governance
checks, fairness, top features, data lineage, approvals, deployment history. A section with nothing
to show says so ("not evaluated", "none recorded"); it never invents a value.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from resources.files import atomic_write

TAG = "onepath."
HISTORY_KINDS = ("deploy", "rollback", "promotion_refused")
NOT_HELD_OUT = ("train_seconds",)  # run metrics that are not held-out evaluation numbers
TOP_FEATURES = 10
_PNG_DATA_URI = re.compile(r"^data:image/png;base64,[A-Za-z0-9+/]+={0,2}$")


# --------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class MetricRow:
    name: str
    value: float
    bound: float | None = None  # the declared minimum (or maximum, when ``is_max``)
    is_max: bool = False

    @property
    def meets(self) -> bool | None:
        if self.bound is None:
            return None
        return self.value <= self.bound if self.is_max else self.value >= self.bound


@dataclass(frozen=True)
class CheckRow:
    check: str
    passed: bool
    summary: str


@dataclass(frozen=True)
class FairnessRow:
    attribute: str
    dpd: float | None
    eod: float | None
    dir: float | None
    passed: bool | None  # None when the verdict does not say per attribute


@dataclass(frozen=True)
class FeatureRow:
    rank: int
    feature: str
    importance_mean: float | None
    importance_std: float | None


@dataclass(frozen=True)
class ApprovalRow:
    approver: str
    approved_at: str
    env: str
    reason: str
    first_release: bool = False
    ledger_seq: int | None = None


@dataclass(frozen=True)
class DeploymentRow:
    ts: str
    event: str  # deploy | rollback | refused
    env: str
    version: str
    actor: str
    detail: str = ""
    ledger_seq: int | None = None


@dataclass(frozen=True)
class ModelCardData:
    """Everything a model card shows, already resolved to plain values."""

    model: str
    version: str
    description: str = ""
    owner: str = ""
    track: str = ""
    run_id: str | None = None
    registered_at: str | None = None
    author: str | None = None
    metrics: list[MetricRow] = field(default_factory=list)
    checks: list[CheckRow] = field(default_factory=list)
    fairness_evaluated: bool = False
    fairness_passed: bool | None = None
    fairness_summary: str = ""
    fairness: list[FairnessRow] = field(default_factory=list)
    fairness_per_group_markdown: str | None = None
    explainability_summary: str = ""
    top_features: list[FeatureRow] = field(default_factory=list)
    importance_chart: str | None = None  # data:image/png;base64,... (validated at render)
    lineage: dict[str, str] = field(default_factory=dict)
    approvals: list[ApprovalRow] = field(default_factory=list)
    deployments: list[DeploymentRow] = field(default_factory=list)
    generated_at: str = ""

    @property
    def title(self) -> str:
        return f"Model card: {self.model} version {self.version}"


LINEAGE_FIELDS = (
    ("dataset_key", "dataset"),
    ("data_hash", "data hash"),
    ("code_hash", "code hash"),
    ("code_path", "trainer source"),
    ("training_rows", "training rows"),
    ("test_rows", "held-out rows"),
    ("split_seed", "split seed"),
    ("dagster_run_id", "Dagster run"),
)


# --------------------------------------------------------------------------------------------
# Gathering


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _run_parts(run: Any) -> tuple[str | None, dict[str, float], dict[str, str]]:
    """``(run_id, metrics, tags)`` of an MLflow ``Run`` or a dict ``{run_id, metrics, tags}``."""
    if run is None:
        return None, {}, {}
    if isinstance(run, Mapping):
        return run.get("run_id"), dict(run.get("metrics") or {}), dict(run.get("tags") or {})
    info, data = getattr(run, "info", None), getattr(run, "data", None)
    return (_field(info, "run_id"), dict(_field(data, "metrics") or {}), dict(_field(data, "tags") or {}))


def _iso_ms(ms: Any) -> str | None:
    if ms is None:
        return None
    try:
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``markdown`` (cells unescaped)."""
    rows: list[list[str]] = []
    lines = [ln.strip() for ln in markdown.splitlines()]
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        if i + 1 < len(lines) and _is_separator(lines[i + 1]):
            continue  # the header
        if _is_separator(line):
            continue
        rows.append(_cells(line))
    return rows


def _is_separator(line: str) -> bool:
    return bool(line.startswith("|")) and bool(re.fullmatch(r"\|?(\s*:?-{3,}:?\s*\|)+\s*:?-*:?\s*", line))


def _cells(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def _float(s: Any) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def _fairness_rows(v: Any) -> list[FairnessRow]:
    meta = dict(_field(v, "metadata") or {})
    values: dict[str, dict[str, float]] = {}
    for key, val in meta.items():
        for suffix in ("dpd", "eod", "dir"):
            if key.endswith("_" + suffix) and _float(val) is not None:
                values.setdefault(key[: -len(suffix) - 1], {})[suffix] = float(val)
    per_group = (_field(v, "markdown") or {}).get("per_group") or ""
    verdicts = {m.group(1).strip(): m.group(2) == "pass"
                for m in re.finditer(r"^###\s+(.+?):\s+(pass|FAIL)\s*$", per_group, re.M)}
    for part in str(_field(v, "summary", "")).split("; "):
        attr, _, rest = part.partition(": ")
        if attr and rest and attr not in verdicts and attr in values:
            verdicts[attr] = rest.startswith("ok")
    attrs = list(dict.fromkeys([*values, *verdicts]))
    return [FairnessRow(a, values.get(a, {}).get("dpd"), values.get(a, {}).get("eod"),
                        values.get(a, {}).get("dir"), verdicts.get(a)) for a in attrs]


def _feature_rows(v: Any) -> list[FeatureRow]:
    md = (_field(v, "markdown") or {}).get("importance") or ""
    rows = []
    for cells in _table_rows(md):
        if len(cells) >= 2 and cells[0].isdigit():
            rows.append(FeatureRow(int(cells[0]), cells[1], _float(cells[2]) if len(cells) > 2 else None,
                                   _float(cells[3]) if len(cells) > 3 else None))
    if not rows:  # no table: the summary names the top ones ("top features: a, b, c (...)")
        m = re.match(r"top features: ([^()]*)", str(_field(v, "summary", "")))
        names = [n.strip() for n in m.group(1).split(",") if n.strip() and n.strip() != "none"] if m else []
        rows = [FeatureRow(i + 1, n, None, None) for i, n in enumerate(names)]
    return sorted(rows, key=lambda r: r.rank)[:TOP_FEATURES]


def _chart(v: Any) -> str | None:
    md = (_field(v, "markdown") or {}).get("chart") or ""
    m = re.search(r"\((data:image/png;base64,[A-Za-z0-9+/=]+)\)", md)
    return m.group(1) if m and _PNG_DATA_URI.match(m.group(1)) else None


def _person(entry: Any) -> str:
    """Who did it: the entry's actor (the fact), with the initiator the run's tags claimed, shown as a claim
    (``claims.initiated_by``; older entries: ``initiated_by``), never in place of the actor."""
    data = entry.data or {}
    claimed = (data.get("claims") or {}).get("initiated_by") or data.get("initiated_by")
    return f"{entry.actor} (claimed: {claimed})" if claimed else str(entry.actor)


def _author(model: str, version: str, entries: Sequence[Any], tags: dict[str, Any]) -> str | None:
    """The version's author as its ``model_registered`` entry records it (authenticated, or said to be
    unknown); without the entry, an MLflow tag is shown only as a claim."""
    reg = next((e for e in entries if e.kind == "model_registered" and e.subject == model
                and str((e.data or {}).get("version")) == version), None)
    if reg is not None:
        from platform_defs.registration import registered_author

        author, known = registered_author(reg)
        if known:
            return str(author)
        claimed = (reg.data.get("claims") or {}).get("onepath.author") or (reg.data.get("claims") or {}).get("mlflow.user")
        return "unknown: registered without a registration signature" + (f" (claimed: {claimed})" if claimed else "")
    tag = tags.get(TAG + "author")
    return f"claimed: {tag}" if tag else None


def card_data_from(spec: Any, model_version: Any, run: Any = None, verdicts: Sequence[Any] = (),
                   entries: Iterable[Any] = (), *, generated_at: datetime | None = None) -> ModelCardData:
    """Build a card for one model version from what the platform holds.

    ``spec``: the model's ``ModelSpec``. ``model_version``: MLflow ``ModelVersion`` or a dict with
    ``version``, ``run_id``, ``tags``, ``creation_timestamp`` (ms). ``run``: MLflow ``Run`` or a dict
    with ``run_id``, ``metrics``, ``tags`` (optional: metrics then come from the performance verdict).
    ``verdicts``: the gate's verdicts for this version. ``entries``: ledger entries, any subset of
    the ledger (pass ``ledger.entries()``): only approvals of this model version (subject = model)
    and deploys / rollbacks / refusals of this model (``data.model``) are used.
    """
    version = str(_field(model_version, "version"))
    run_id, metrics, run_tags = _run_parts(run)
    tags = {**run_tags, **dict(_field(model_version, "tags") or {})}
    run_id = run_id or _field(model_version, "run_id")
    by_check = {_field(v, "check"): v for v in verdicts}

    if not metrics and "performance" in by_check:
        metrics = {k[len("held_out_"):]: float(x) for k, x in (_field(by_check["performance"], "metadata") or {}).items()
                   if k.startswith("held_out_") and _float(x) is not None}
    declared = dict(getattr(spec, "metrics", {}) or {})
    metric_rows = []
    for name in sorted(k for k in metrics if k not in NOT_HELD_OUT):
        if f"{name}_max" in declared:
            metric_rows.append(MetricRow(name, float(metrics[name]), float(declared[f"{name}_max"]), True))
        else:
            bound = declared.get(name)
            metric_rows.append(MetricRow(name, float(metrics[name]), None if bound is None else float(bound)))
    for name in sorted(declared):  # a declared minimum with no logged value is shown, as missing
        base = name[:-4] if name.endswith("_max") else name
        if base not in metrics:
            metric_rows.append(MetricRow(base, float("nan"), float(declared[name]), name.endswith("_max")))

    lineage_meta = dict(_field(by_check.get("lineage"), "metadata") or {})
    lineage = {}
    for key, _label in LINEAGE_FIELDS:
        value = tags.get(TAG + key) or lineage_meta.get(key)
        if value not in (None, ""):
            lineage[key] = str(value)

    fair = by_check.get("fairness")
    expl = by_check.get("explainability")

    model = str(getattr(spec, "name", _field(model_version, "name", "")))
    entries = list(entries)
    approvals, deployments = [], []
    for e in sorted(entries, key=lambda x: x.seq):
        data = e.data or {}
        if e.kind == "approval" and e.subject == model and str(data.get("version")) == version:
            approvals.append(ApprovalRow(
                approver=str(data.get("approver") or e.actor), approved_at=str(data.get("approved_at") or e.ts),
                env=str(data.get("env") or e.env or ""), reason=str(data.get("reason") or ""),
                first_release=bool(data.get("first_release")), ledger_seq=e.seq))
        elif e.kind in HISTORY_KINDS and data.get("model") == model:
            if e.kind == "deploy" and data.get("via") == "rollback":
                row_version = str(data.get("version"))
                detail = "serves again after a rollback" + (
                    f" (ledger #{data['rollback_entry']})" if data.get("rollback_entry") else "")
            elif e.kind == "deploy":
                prev = data.get("previous_version")
                detail = (f"promoted from {data['promoted_from']}" if data.get("promoted_from") else "first environment")
                detail += f"; replaced {prev}" if prev else "; nothing served before"
                row_version = str(data.get("version"))
            elif e.kind == "rollback":
                row_version = str(data.get("to_version") or data.get("version") or "")
                detail = f"rolled back from {data.get('from_version', '?')}"
                if data.get("reason"):
                    detail += f": {data['reason']}"
            else:
                row_version = str(data.get("version"))
                detail = "refused: " + ", ".join(map(str, data.get("failed") or [])) + (
                    f"; {data.get('still_serving')} kept serving" if data.get("still_serving") else "")
            deployments.append(DeploymentRow(
                ts=e.ts, event="refused" if e.kind == "promotion_refused" else e.kind, env=str(e.env or ""),
                version=row_version, actor=_person(e), detail=detail, ledger_seq=e.seq))

    return ModelCardData(
        model=model, version=version,
        description=str(getattr(spec, "description", "") or ""),
        owner=str(getattr(spec, "owner", "") or tags.get(TAG + "owner", "")),
        track=str(getattr(spec, "track", "") or tags.get(TAG + "track", "")),
        run_id=run_id, registered_at=_iso_ms(_field(model_version, "creation_timestamp")),
        author=_author(model, version, entries, tags),
        metrics=metric_rows,
        checks=[CheckRow(str(_field(v, "check")), bool(_field(v, "passed")), str(_field(v, "summary", "")))
                for v in verdicts],
        fairness_evaluated=fair is not None,
        fairness_passed=None if fair is None else bool(_field(fair, "passed")),
        fairness_summary="" if fair is None else str(_field(fair, "summary", "")),
        fairness=[] if fair is None else _fairness_rows(fair),
        fairness_per_group_markdown=None if fair is None else ((_field(fair, "markdown") or {}).get("per_group") or None),
        explainability_summary="" if expl is None else str(_field(expl, "summary", "")),
        top_features=[] if expl is None else _feature_rows(expl),
        importance_chart=None if expl is None else _chart(expl),
        lineage=lineage, approvals=approvals, deployments=deployments,
        generated_at=(generated_at or datetime.now(UTC)).isoformat(timespec="seconds"),
    )


# --------------------------------------------------------------------------------------------
# Rendering


def _num(x: float | None, digits: int = 4) -> str:
    if x is None or x != x:  # None or NaN
        return "n/a"
    return f"{x:.{digits}f}"


def _yes(x: bool | None) -> str:
    return "n/a" if x is None else ("yes" if x else "NO")


def _md(value: Any) -> str:
    """A value as Markdown text: one line, and nothing a renderer would take as HTML or a cell break."""
    s = " ".join(str(value).split())
    s = s.replace("\\", "\\\\")
    for ch in ("|", "<", ">", "`", "[", "]"):
        s = s.replace(ch, "\\" + ch)
    return s


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _sections(card: ModelCardData) -> list[tuple[str, list[str], list[list[str]], str]]:
    """Each section as ``(title, paragraphs, table rows (first = header), extra)``, values raw."""
    out: list[tuple[str, list[str], list[list[str]], str]] = []
    out.append(("Intended use", [card.description or "No description declared (add `description` to the "
                                 "model's declaration)."], [], ""))
    out.append(("Ownership", [], [["owner team", "governance track", "author"],
                                  [card.owner or "unknown", card.track or "unknown", card.author or "unknown"]], ""))
    out.append(("Version", [], [["model", "version", "MLflow run id", "registered at"],
                                [card.model, card.version, card.run_id or "unknown",
                                 card.registered_at or "unknown"]], ""))
    if card.metrics:
        rows = [["metric", "value", "declared bound", "meets bound"]]
        rows += [[m.name, _num(m.value), "" if m.bound is None else f"{'≤' if m.is_max else '≥'} {m.bound:g}",
                  _yes(m.meets)] for m in card.metrics]
        out.append(("Held-out metrics", [], rows, ""))
    else:
        out.append(("Held-out metrics", ["No held-out metrics recorded for this version."], [], ""))
    if card.checks:
        out.append(("Governance checks", [], [["check", "passed", "verdict"]] +
                    [[c.check, _yes(c.passed), c.summary] for c in card.checks], ""))
    if not card.fairness_evaluated:
        out.append(("Fairness", ["Not evaluated: no fairness verdict was recorded for this version "
                                 "(its track may not require the check)."],
                    [], ""))
    else:
        paras = [f"Fairness check {'passed' if card.fairness_passed else 'FAILED'}: {card.fairness_summary}"]
        rows = [["attribute", "demographic parity difference", "equalized odds difference",
                 "disparate impact ratio", "passed"]]
        rows += [[f.attribute, _num(f.dpd, 3), _num(f.eod, 3), _num(f.dir, 3), _yes(f.passed)] for f in card.fairness]
        out.append(("Fairness", paras, rows if card.fairness else [], card.fairness_per_group_markdown or ""))
    if card.top_features:
        rows = [["rank", "feature", "mean score drop", "std"]]
        rows += [[str(f.rank), f.feature, _num(f.importance_mean), _num(f.importance_std)] for f in card.top_features]
        out.append(("Top features", [card.explainability_summary] if card.explainability_summary else [], rows, ""))
    else:
        out.append(("Top features", ["Not evaluated: no explainability report for this version."
                                     if not card.explainability_summary else card.explainability_summary], [], ""))
    if card.lineage:
        labels = dict(LINEAGE_FIELDS)
        rows = [["", "value"]] + [[labels[k], card.lineage[k]] for k, _ in LINEAGE_FIELDS if k in card.lineage]
        out.append(("Data lineage", [], rows, ""))
    else:
        out.append(("Data lineage", ["No lineage tags recorded on this version."], [], ""))
    if card.approvals:
        rows = [["approver", "approved at", "environment", "reason", "first release", "ledger"]]
        rows += [[a.approver, a.approved_at, a.env, a.reason, "yes" if a.first_release else "",
                  f"#{a.ledger_seq}" if a.ledger_seq is not None else ""] for a in card.approvals]
        out.append(("Approvals", [], rows, ""))
    else:
        out.append(("Approvals", ["None recorded for this version."], [], ""))
    if card.deployments:
        rows = [["time (UTC)", "event", "environment", "version", "by", "detail", "ledger"]]
        rows += [[d.ts, d.event, d.env, d.version + (" (this version)" if d.version == card.version else ""),
                  d.actor, d.detail, f"#{d.ledger_seq}" if d.ledger_seq is not None else ""]
                 for d in card.deployments]
        out.append(("Deployment history", [f"Every deploy, rollback and refused promotion of {card.model} "
                                           f"recorded in the ledger."], rows, ""))
    else:
        out.append(("Deployment history", ["None recorded: this model has not been deployed."], [], ""))
    return out


def render_markdown(card: ModelCardData) -> str:
    lines = [f"# {_md(card.title)}", "", f"_Generated {_md(card.generated_at)} from the MLflow registry, "
             f"the governance gate and the onepath ledger._"]
    for title, paras, rows, extra in _sections(card):
        while lines and not lines[-1]:
            lines.pop()
        lines += ["", f"## {title}", ""]
        for p in paras:
            lines += [_md(p), ""]
        if rows:
            lines.append("| " + " | ".join(_md(c) for c in rows[0]) + " |")
            lines.append("|" + "|".join("---" for _ in rows[0]) + "|")
            lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows[1:]]
            lines.append("")
        if extra:
            safe = extra.strip().replace("<", "\\<").replace(">", "\\>")
            lines += ["**Per-group rates**", "", safe, ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:#1f2328;background:#f6f8fa;margin:0;padding:2rem}
main{max-width:980px;margin:0 auto;background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:2rem 2.5rem}
h1{font-size:1.7rem;margin:0 0 .25rem}h2{font-size:1.2rem;margin:2rem 0 .6rem;padding-bottom:.3rem;
border-bottom:1px solid #d8dee4}h4{margin:1.2rem 0 .4rem}
.meta{color:#57606a;font-size:.9rem}
table{border-collapse:collapse;width:100%;margin:.4rem 0 1rem;font-size:.92rem}
th,td{border:1px solid #d0d7de;padding:.35rem .6rem;text-align:left;vertical-align:top;word-break:break-word}
th{background:#f6f8fa;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.yes{color:#1a7f37;font-weight:600}.no{color:#cf222e;font-weight:700}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.88em}
details{margin:.5rem 0 1rem}summary{cursor:pointer;color:#0969da}
img.chart{max-width:100%;border:1px solid #d0d7de;border-radius:6px}
""".strip()

_NUM = re.compile(r"^[-+]?\d+(\.\d+)?$")


def _td(cell: str) -> str:
    cls = ""
    if cell == "yes":
        cls = ' class="yes"'
    elif cell == "NO":
        cls = ' class="no"'
    elif _NUM.match(cell):
        cls = ' class="num"'
    return f"<td{cls}>{_e(cell)}</td>"


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_block_to_html(text: str) -> str:
    """The small Markdown subset our verdicts use (headings, tables, paragraphs, **bold**), escaped."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if not line:
            i += 1
            continue
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i].strip())
                i += 1
            rows = [_cells(b) for b in block if not _is_separator(b)]
            if rows:
                out.append(_html_table(rows))
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            out.append(f"<h4>{_inline(m.group(2))}</h4>")
        else:
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _e(text))


def render_html(card: ModelCardData) -> str:
    parts = [f"<h1>{_e(card.title)}</h1>",
             f'<p class="meta">Generated {_e(card.generated_at)} from the MLflow registry, the governance gate '
             f"and the onepath ledger.</p>"]
    for title, paras, rows, extra in _sections(card):
        parts.append(f"<section><h2>{_e(title)}</h2>")
        parts += [f"<p>{_e(p)}</p>" for p in paras]
        if rows:
            parts.append(_html_table(rows))
        if extra:
            parts.append(f"<details><summary>Per-group rates</summary>{markdown_block_to_html(extra)}</details>")
        if title == "Top features" and card.importance_chart and _PNG_DATA_URI.match(card.importance_chart):
            parts.append(f'<img class="chart" alt="permutation importance" src="{_e(card.importance_chart)}">')
        parts.append("</section>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_e(card.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n"
            f"</main>\n</body>\n</html>\n")


def render_model_card(card: ModelCardData) -> tuple[str, str]:
    """``(markdown, html)`` of one model version's card. Pure."""
    return render_markdown(card), render_html(card)


def card_file_stem(card: ModelCardData) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{card.model}-v{card.version}")
    return f"model_card-{safe}"


def write_model_card(card: ModelCardData, out_dir: Path | str) -> tuple[Path, Path]:
    """Render and write ``model_card-<model>-v<version>.md`` and ``.html`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, page = render_model_card(card)
    stem = card_file_stem(card)
    md_path, html_path = out / f"{stem}.md", out / f"{stem}.html"
    atomic_write(md_path, md.encode("utf-8"))
    atomic_write(html_path, page.encode("utf-8"))
    return md_path, html_path


__all__ = ["ModelCardData", "MetricRow", "CheckRow", "FairnessRow", "FeatureRow", "ApprovalRow", "DeploymentRow",
           "card_data_from", "render_model_card", "render_markdown", "render_html", "write_model_card",
           "markdown_block_to_html"]
