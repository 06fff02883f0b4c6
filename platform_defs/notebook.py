"""A model trained in a notebook reaches the platform in one call: ``onepath.register(model, train=..., test=...)``.

It snapshots the train and test frames as versions of the model's snapshot-only dataset (``<name>_data``, by
content hash), refuses when it cannot tell which rows the model never saw, evaluates the model on the test rows
with the evaluators the gates use and prints a verdict per check, stores the reference sample drift compares
production with, logs the model with its signature and the lineage facts the gates read (its held-out rows are
the TEST snapshot), records the code that produced it, signs the registration with the data scientist's
identity and writes (or updates) the model's declaration with the version it registered: the pin that
``onepath promote`` deploys. The data scientist never sees MLflow tags, artifact folders or split seeds.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from platform_defs import strict_yaml
from platform_defs.specs import (ModelSpec, NotebookModelSpec, notebook_dataset_name, notebook_endpoint_name)


class NotebookError(ValueError):
    """Why a registration was refused, in one line that says what to do."""


@dataclass
class Check:
    name: str
    passed: bool
    summary: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name}: {self.summary}"


@dataclass
class Registered:
    """What ``onepath.register`` did: the version, the declaration that pins it, the checks and what to run next."""

    name: str
    version: str
    declaration: Path
    checks: list[Check] = field(default_factory=list)
    next: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __str__(self) -> str:
        lines = [f"registered {self.name} version {self.version}, pinned in {self.declaration}"]
        lines += [f"  {c}" for c in self.checks]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"next: {self.next}")
        return "\n".join(lines)

    _repr_pretty_ = lambda self, p, cycle: p.text(str(self))  # noqa: E731 - IPython shows the summary


# --------------------------------------------------------------------------------------------
# Which rows the model never saw


def _row_hashes(df: Any, columns: list[str]) -> set[int]:
    import pandas as pd

    return set(pd.util.hash_pandas_object(df[columns], index=False).tolist())


def held_out_problem(train: Any, test: Any, label: str, id_column: str | None = None) -> str | None:
    """Why ``test`` cannot be trusted as rows the model never saw, or None."""
    if test is None:
        return ("no test rows given: pass test=<the rows you held out> (onepath evaluates and gates the model on "
                "rows it never saw, and cannot tell which those are otherwise)")
    if len(test) == 0:
        return "the test frame is empty: pass the rows you held out from training"
    if label not in test.columns or label not in train.columns:
        return f"label column '{label}' is missing from the {'test' if label not in test.columns else 'train'} frame"
    if id_column is not None:
        if id_column not in train.columns or id_column not in test.columns:
            return f"id column '{id_column}' is not in both frames"
        shared = set(train[id_column]) & set(test[id_column])
        if shared:
            return (f"train and test share {len(shared)} id(s) in '{id_column}' (e.g. {sorted(shared, key=str)[0]!r}):"
                    f" the test rows must be rows the model never saw; split again so no id is in both")
    common = [c for c in train.columns if c in test.columns]
    overlap = len(_row_hashes(train, common) & _row_hashes(test, common))
    if overlap:
        return (f"{overlap} test row(s) are also in the train frame: the test rows must be rows the model never "
                f"saw; split again (e.g. sklearn's train_test_split) and train on the train part only")
    return None


# --------------------------------------------------------------------------------------------
# The code that produced the model


NO_SOURCE = "interactive (no source)"


def code_record() -> tuple[str, str, str]:
    """``(sha256, where, text)``: in IPython the source of the cells that ran (the shell's ``In``), in a script
    the file's bytes."""
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None and "In" in shell.user_ns:
        cells = [c for c in shell.user_ns["In"] if c]
        text = "\n\n# ---- cell ----\n".join(cells) + "\n"
        return hashlib.sha256(text.encode()).hexdigest(), f"notebook cells ({len(cells)})", text
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and Path(main).is_file():
        # the hash is of the text stored as the code record (the file's bytes when it is UTF-8), so the lineage
        # check's re-hash of that record agrees with it
        text = Path(main).read_bytes().decode(errors="replace")
        return hashlib.sha256(text.encode()).hexdigest(), str(Path(main).resolve()), text
    return hashlib.sha256(b"").hexdigest(), NO_SOURCE, ""


# --------------------------------------------------------------------------------------------
# The declaration


def _scalar(value: str) -> str:
    """``value`` as a YAML scalar that reads back as exactly that string (``on``, ``#x``, ``a: b`` quoted)."""
    import json

    import yaml

    plain = str(value)
    try:
        if yaml.safe_load(f"k: {plain}") == {"k": plain} and not plain.startswith(("[", "{", "'", '"')):
            return plain
    except yaml.YAMLError:
        pass
    return json.dumps(plain)  # a JSON string is a YAML double-quoted scalar


MODEL_LINE = "onepath.ModelLine"


def render_declaration(*, name: str, owner: str, version: str, label: str, pii: list[str], protected: list[str],
                       features: list[str] | None) -> str:
    """The model line's component document (``type: onepath.ModelLine``): at most 10 lines for a short list of
    columns."""
    lines = [f"type: {MODEL_LINE}", "attributes:", f"  name: {name}", f"  owner: {owner}",
             f"  version: {version}", f"  label: {_scalar(label)}"]
    text = "\n".join(lines) + "\n"
    for key, cols in (("pii", pii), ("protected", protected), ("features", features)):
        if cols:
            text += _key_lines(key, cols, "  ")
    return text


def check_declaration(block: str, where: str) -> None:
    """Parse ``block`` as the loader will, before anything is logged, snapshotted or signed: a column name the
    declaration cannot carry is one line here, not a broken file after the registration."""
    import yaml

    from platform_defs.specs import DeclarationError, parse_component

    try:
        doc = yaml.safe_load(block)
        parse_component(doc["type"], doc["attributes"], where)
    except (DeclarationError, yaml.YAMLError) as err:
        raise NotebookError(f"the declaration this would write is not valid: {str(err).splitlines()[0]}") from None


OWNED_KEYS = ("version", "label", "pii", "protected", "features")  # what a register says; the rest is the team's


def _attributes_of(doc: Any) -> Any:
    return doc.get("attributes") if isinstance(doc, dict) else None


def _is_line(doc: Any, name: str) -> bool:
    """Whether a parsed document is ``name``'s model line (however the team laid it out: flow or block style,
    quoted, any key order or indentation)."""
    attrs = _attributes_of(doc)
    return doc.get("type") == MODEL_LINE and isinstance(attrs, dict) and attrs.get("name") == name


# The model line's document is edited as text, at the places its parse gives (every node's start and end): only
# the values a register owns change, so every comment, blank line, quote and layout of the team's stays where it
# was, the document separators (``---`` and a flow mapping on its line) included.


def _content_end(node: Any) -> int:
    """Where ``node``'s text ends: a block collection's own end is past the comments that follow it."""
    while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        node = node.value[-1][1] if isinstance(node, yaml.MappingNode) else node.value[-1]
    return node.end_mark.index


def _line_start(text: str, i: int) -> int:
    return text.rfind("\n", 0, i) + 1


def _line_end(text: str, i: int) -> int:
    """The start of the line after the one ``i`` is on (a block scalar's text already ends at one)."""
    if i > 0 and text[i - 1] == "\n":
        return i
    nl = text.find("\n", i)
    return len(text) if nl < 0 else nl + 1


def _kept_comments(text: str, start: int, end: int, content_ends: list[int]) -> str:
    """The comments of the lines ``[start, end)`` that are going, as comment lines of their own: a comment line
    as it was, a comment after a value (after one of ``content_ends``) at the indentation of its line."""
    kept = []
    for line in text[start:end].splitlines(keepends=True):
        at = start
        start += len(line)
        body = line.rstrip("\r\n")
        if body.lstrip().startswith("#"):
            kept.append(body + "\n")
            continue
        after = max((e for e in content_ends if at <= e <= at + len(body)), default=None)
        rest = "" if after is None else text[after:at + len(body)].strip().removeprefix(":").strip()  # key: # x
        if rest.startswith("#"):
            kept.append(body[:len(body) - len(body.lstrip())] + rest + "\n")
    return "".join(kept)


def _flow(value: Any) -> str:
    """``value`` (a column list, a name or a version) as YAML on one line."""
    import json

    if isinstance(value, list):
        return f"[{', '.join(_scalar(c) for c in value)}]"
    return _scalar(value) if isinstance(value, str) else json.dumps(value)


def _key_lines(key: str, value: Any, indent: str) -> str:
    """``key: value`` at ``indent``: a list in flow style within 100 characters a line, else one item a line."""
    flow = f"{indent}{key}: {_flow(value)}"
    if len(flow) <= 100 or not isinstance(value, list):
        return flow + "\n"
    return f"{indent}{key}:\n" + "".join(f"{indent}  - {_scalar(c)}\n" for c in value)


def _inserted(text: str, at: int, lines: str) -> tuple[int, int, str]:
    return at, at, ("\n" if at == len(text) and text and not text.endswith("\n") else "") + lines


def _value_edits(text: str, node: Any, old: Any, new: Any) -> list[tuple[int, int, str]]:
    """The edits that make ``node`` (holding ``old``) read ``new``: a list item by item, so the comments between
    and after its items stay."""
    items = node.value if isinstance(node, yaml.SequenceNode) else []
    if not (isinstance(new, list) and isinstance(old, list) and items
            and all(isinstance(i, yaml.ScalarNode) for i in items)):
        return [(node.start_mark.index, _content_end(node), _flow(new))]
    edits = [(i.start_mark.index, i.end_mark.index, _scalar(v))
             for i, was, v in zip(items, old, new) if was != v]
    last = items[min(len(items), len(new)) - 1]
    if node.flow_style:
        if len(items) > len(new):
            edits.append((last.end_mark.index, items[-1].end_mark.index, ""))
        elif len(new) > len(items):
            edits.append((last.end_mark.index, last.end_mark.index,
                          "".join(f", {_scalar(v)}" for v in new[len(items):])))
        return edits
    for gone in items[len(new):]:
        start, end = _line_start(text, gone.start_mark.index), _line_end(text, gone.end_mark.index)
        edits.append((start, end, _kept_comments(text, start, end, [gone.end_mark.index])))
    if len(new) > len(items):
        dash = text[_line_start(text, last.start_mark.index):last.start_mark.index].split("-")[0]
        edits.append(_inserted(text, _line_end(text, last.end_mark.index),
                               "".join(f"{dash}- {_scalar(v)}\n" for v in new[len(items):])))
    return edits


def _updated_document(text: str, attrs: Any, current: dict, block: str) -> str:
    """``text`` with the keys a register owns in one model line's ``attributes`` (``attrs``, its node; ``current``,
    its data) taken from ``block``. Declared ``pii``/``protected`` columns stay when this register names none; a
    ``features`` it no longer names goes. Everything else a person wrote stays as they wrote it: ``metrics``
    minimums, ``purpose``, ``track``, ``environments``, ``favourable_label``, ``description`` and every comment."""
    ours = yaml.safe_load(block)["attributes"]
    pairs = [(k.value, k, v) for k, v in attrs.value if isinstance(k, yaml.ScalarNode)]
    node_of = {key: (k, v) for key, k, v in pairs}
    edits = []
    for key in OWNED_KEYS:
        if key in ours and key in node_of:
            if current.get(key) != ours[key]:
                edits += _value_edits(text, node_of[key][1], current.get(key), ours[key])
        elif key in node_of and key not in ("pii", "protected"):
            k, v = node_of[key]
            if attrs.flow_style:  # ", key: value" (the first pair: "key: value, ")
                at = [p for p, _, _ in pairs].index(key)
                start, end = ((pairs[at - 1][2].end_mark.index, v.end_mark.index) if at else
                              (k.start_mark.index, pairs[1][1].start_mark.index))
                edits.append((start, end, ""))
            else:
                start, end = _line_start(text, k.start_mark.index), _line_end(text, _content_end(v))
                ends = [k.end_mark.index] + [n.end_mark.index for n in ([v] + list(v.value if isinstance(
                    v, yaml.SequenceNode) else []))]
                edits.append((start, end, _kept_comments(text, start, end, ends)))
    added = [key for key in OWNED_KEYS if key in ours and key not in node_of]
    if added:
        if attrs.flow_style:
            at = pairs[-1][2].end_mark.index
            edits.append((at, at, "".join(f", {key}: {_flow(ours[key])}" for key in added)))
        else:
            indent = " " * pairs[-1][1].start_mark.column  # the last pair is the mapping's own (a merge's come first)
            edits.append(_inserted(text, _line_end(text, _content_end(attrs)),
                                   "".join(_key_lines(key, ours[key], indent) for key in added)))
    for start, end, new in sorted(edits, key=lambda e: e[:2], reverse=True):
        text = text[:start] + new + text[end:]
    return text


def plan_declaration(path: Path, block: str, name: str) -> str:
    """The text ``path`` would hold after this register (``block`` is its model line's document), checked:
    it loads, and to the same declarations as before except the keys of ``name``'s model line that a register
    owns (or that line added). Any problem is ``NotebookError`` (one line), and nothing is written; call it
    before anything is logged, so a register that cannot update the file changes nothing anywhere.

    The model line's document is found by parsing (``type: onepath.ModelLine`` and ``attributes.name``), and
    only the text of the values a register owns is rewritten: every comment (a file that would lose one is
    refused), the other documents and the team's layout stay as they are. An
    old-form file (``declarations: [...]``) is converted as ``onepath migrate-declarations`` would (and only if
    the components load to the same declarations)."""
    from platform_defs.loader import _load_yaml, is_old_form
    from platform_defs.migrate import checked_components
    from platform_defs.specs import DeclarationError

    if not path.exists():
        text, old = "", []
    else:
        text = path.read_text()
        try:
            docs = strict_yaml.load_all_with_nodes(text)
            if is_old_form(docs):
                text = checked_components(path, text)
                docs = strict_yaml.load_all_with_nodes(text)
            old = [d for d, _ in _load_yaml(path, text=text)]
        except (DeclarationError, yaml.YAMLError) as err:
            raise NotebookError(f"{path}: fix this declaration file first (nothing was registered): "
                                f"{str(err).splitlines()[0]}") from None
    mine = [(data, node) for data, node in docs if _is_line(data, name)] if text else []
    if len(mine) > 1:
        raise NotebookError(f"{path}: model line '{name}' is declared {len(mine)} times (lines "
                            f"{', '.join(str(n.start_mark.line + 1) for _, n in mine)}): keep one")
    if mine:
        (data, node), = mine
        attrs = next(v for k, v in node.value if getattr(k, "value", None) == "attributes")
        new = _updated_document(text, attrs, data["attributes"], block)
    elif text.strip():
        new = (text if text.endswith("\n") else text + "\n") + "---\n" + block
    else:
        new = block
    try:
        after = [d for d, _ in _load_yaml(path, text=new)]
    except (DeclarationError, yaml.YAMLError) as err:
        raise NotebookError(f"{path}: the file this register would write does not load, so nothing was "
                            f"registered: {str(err).splitlines()[0]}") from None
    target = next((d for d in after if d.name == name), None)
    wanted = yaml.safe_load(block)["attributes"]
    unchanged = [_plain(d) for d in old if d.name != name] == [_plain(d) for d in after if d.name != name]
    before_line = next((d for d in old if d.name == name), None)
    comments = iter(_comment_lines(new))  # every comment line of the file is still there, in the same order
    ok = (unchanged and all(c in comments for c in _comment_lines(text))
          and target is not None and len(after) == len(old) + (before_line is None)
          and all(getattr(target, k) == v for k, v in wanted.items())
          and (before_line is None or _plain(before_line, OWNED_KEYS) == _plain(target, OWNED_KEYS)))
    if not ok:
        raise NotebookError(f"{path}: updating model line '{name}' would change more than its "
                            f"{'/'.join(OWNED_KEYS)} (or drop a comment), so nothing was registered: edit the file "
                            f"by hand")
    return new


def _comment_lines(text: str) -> list[str]:
    """Every comment of ``text``, in order: a comment line, and the comment at the end of a line (a ``#`` after
    a blank, outside quotes), so an edit that loses either is seen."""
    out = []
    for line in text.splitlines():
        quote = None
        for i, ch in enumerate(line):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"" and (i == 0 or line[i - 1] in " \t[{,:-"):
                quote = ch
            elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
                out.append(line[i:].strip())
                break
    return out


def _plain(decl: Any, leave_out: tuple = ()) -> tuple:
    return type(decl).__name__, {k: v for k, v in decl.model_dump().items() if k not in leave_out}


def write_declaration(path: Path, block: str, name: str) -> None:
    """Create ``path`` with ``block``, or update the model line's document in it (``plan_declaration``: the keys
    a register owns; the rest of that document and the other declarations are left as they are), or add it as a
    document of its own. Written atomically: the reload watcher and a code server may read the folder at any
    moment."""
    from resources.files import atomic_write

    text = plan_declaration(path, block, name)
    if path.exists():
        atomic_write(path, text.encode(), mode=path.stat().st_mode & 0o777)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode())


def declaration_path(owner: str, declarations: str | Path | None = None) -> Path:
    from platform_defs.loader import declarations_dir

    return Path(declarations) if declarations else declarations_dir() / owner / "defs.yaml"


# --------------------------------------------------------------------------------------------
# The identity that signs


def signing_key(identity: str | None, key: str | Path | None) -> tuple[str, Any]:
    from resources.approvals import ApprovalError, load_private_key

    from platform_defs.cli_governance import identity_key_path

    who = identity or os.environ.get("ONEPATH_IDENTITY")
    if not who:
        raise NotebookError("say who you are: register(..., identity='NAME') or set ONEPATH_IDENTITY (your name in "
                            "the policy's identities)")
    path = Path(key or os.environ.get("ONEPATH_KEY") or identity_key_path(who))
    if not path.is_file():
        raise NotebookError(f"no signing key for '{who}' at {path}: ask your platform engineer to create it "
                            f"(onepath keys init NAME) and add its public key to the policy's identities, then set "
                            f"ONEPATH_KEY to the file")
    try:
        return who, load_private_key(path)
    except ApprovalError as err:
        raise NotebookError(str(err).splitlines()[0]) from None


# --------------------------------------------------------------------------------------------
# register


def _checks(estimator: Any, X_test: Any, y_test: Any, test: Any, protected: list[str], thresholds: dict[str, float],
            track: Any, favourable_label: int) -> tuple[list[Check], dict[str, float]]:
    from platform_defs.factories import evaluate_classifier, metric_verdicts
    from platform_defs.governance.fairness import apply_decision_threshold, evaluate_fairness

    metrics = evaluate_classifier(estimator, X_test, y_test)
    verdicts = metric_verdicts(metrics, thresholds)
    shown = ", ".join(f"{m} {v:.3f}" for m, v in metrics.items() if m in ("roc_auc", "accuracy", "f1"))
    if verdicts:
        failed = [f"{m} {v:.3f} < {t}" for m, v, t, ok in verdicts if not ok]
        checks = [Check("performance", not failed, "; ".join(failed) if failed else f"{shown} (minimums met)")]
    else:
        checks = [Check("performance", True, f"{shown} (no minimums declared)")]
    if protected:
        fp = track.fairness
        proba = estimator.predict_proba(X_test)
        classes = list(estimator.classes_)
        unfavourable = [c for c in classes if c != favourable_label]
        decisions = apply_decision_threshold(proba[:, classes.index(unfavourable[0])], fp.decision_threshold)
        y_pred = [favourable_label if d == 0 else unfavourable[0] for d in decisions]
        res = evaluate_fairness(
            y_test.to_numpy(), y_pred, test[protected].reset_index(drop=True), favourable_label=favourable_label,
            max_demographic_parity_difference=fp.max_demographic_parity_difference,
            max_equalized_odds_difference=fp.max_equalized_odds_difference,
            min_disparate_impact_ratio=fp.min_disparate_impact_ratio, min_group_size=fp.min_group_size)
        checks.append(Check("fairness", res.passed, res.summary))
    return checks, metrics


@dataclass(frozen=True)
class Existing:
    """A version already in MLflow's registry (logged with plain MLflow) that registration adopts as it is."""

    version: str
    run_id: str
    features: list[str]  # the model's signature: the columns it was trained on
    code: tuple[str, str, str, bool]  # (sha256, where, text, known): see adopted_code_record
    uri: str


def register(model: Any, *, train: Any, test: Any = None, label: str, name: str, owner: str | None = None,
             pii: list[str] | tuple[str, ...] = (), protected: list[str] | tuple[str, ...] = (),
             features: list[str] | None = None, id_column: str | None = None, identity: str | None = None,
             key: str | Path | None = None, declarations: str | Path | None = None, quiet: bool = False,
             settings: Any = None, policy: Any = None) -> Registered:
    """Register a model trained in a notebook (see the module's docstring); returns what it did. What it
    creates (snapshots, the code record, a first MLflow database) is owner-only whatever the kernel's umask."""
    from resources.files import private_umask

    with private_umask():
        return _register(model, train=train, test=test, label=label, name=name, owner=owner, pii=pii,
                         protected=protected, features=features, id_column=id_column, identity=identity, key=key,
                         declarations=declarations, quiet=quiet, settings=settings, policy=policy)


def _register(model: Any, *, train: Any, test: Any, label: str, name: str, owner: str | None,
              pii: list[str] | tuple[str, ...], protected: list[str] | tuple[str, ...], features: list[str] | None,
              id_column: str | None, identity: str | None, key: str | Path | None,
              declarations: str | Path | None, quiet: bool, settings: Any, policy: Any,
              existing: Existing | None = None, resources: Any = None) -> Registered:
    """The one registration path. Without ``existing`` it logs ``model`` as a new MLflow version; with it, it
    adopts that version (``model`` is its estimator, loaded from its verified files): the same refusals and
    checks, onepath's artifacts and tags put on the version's own run, and that version signed, recorded and
    pinned."""
    from platform_defs.factories import TAG_PREFIX
    from platform_defs.policy import load_policy
    from platform_defs.registration import CODE_RECORD, record_registration
    from platform_defs.settings import load_settings
    from platform_defs.specs import NAME_RE, TEAM_RE
    from platform_defs.wiring import build_resources
    from resources.approvals import sign_registration
    from resources.artifact_digest import folder_digest

    owner = owner or os.environ.get("ONEPATH_TEAM")
    if not owner or not TEAM_RE.match(owner):
        raise NotebookError(f"owner {owner!r} is not a team: pass owner='<your team in the policy>'")
    if not NAME_RE.match(name):
        raise NotebookError(f"name '{name}' is not valid: lowercase letters, digits and '_', starting with a letter")
    pii, protected = list(pii), list(protected)
    problem = held_out_problem(train, test, label, id_column)
    if problem:
        raise NotebookError(f"{name}: {problem}")
    if existing is not None:  # the columns the logged model was trained on, as its signature names them
        feats = list(existing.features)
        for c in feats + protected + pii:
            for frame, df in (("train", train), ("test", test)):
                if c not in df.columns:
                    whose = "of the model's signature " if c in feats else ""
                    raise NotebookError(f"{existing.uri}: column '{c}' {whose}is not in the {frame} frame")
    else:
        feats = list(features) if features else [c for c in train.columns
                                                 if c not in (label, id_column) and c not in pii and c not in protected]
        missing = [c for c in feats + protected + pii if c not in train.columns or c not in test.columns]
        if missing:
            raise NotebookError(f"{name}: column '{missing[0]}' is not in both the train and the test frame")
    leaked = [c for c in feats if c in pii]
    if leaked:
        raise NotebookError(f"{name}: feature '{leaked[0]}' is PII and can never be a model feature")
    path = declaration_path(owner, declarations)
    check_declaration(render_declaration(name=name, owner=owner, version="1", label=label, pii=pii,
                                         protected=protected, features=feats), str(path))
    # the file this register would write, checked before anything is logged, snapshotted or signed (the version
    # is MLflow's, known later; the check compares everything but the keys a register owns)
    plan_declaration(path, render_declaration(name=name, owner=owner, version="1", label=label, pii=pii,
                                              protected=protected, features=feats), name)
    who, private_key = signing_key(identity, key)
    policy = policy or load_policy()
    if owner not in policy.teams:
        raise NotebookError(f"team '{owner}' is not in the policy: your platform engineer adds it under 'teams' "
                            f"in assets/policy.yaml")
    track_name = policy.teams[owner].track_for()
    if track_name is None:
        raise NotebookError(f"team '{owner}' has no default track in the policy: your platform engineer sets "
                            f"'default_track' for it in assets/policy.yaml")
    track = policy.track(track_name)
    resources = resources or build_resources(settings or load_settings())
    mlflow, data_store, ledger = resources["mlflow"], resources["data_store"], resources["ledger"]
    dataset = notebook_dataset_name(name)
    keep = [c for c in dict.fromkeys(feats + protected + pii + [label]) if c in train.columns]
    _, train_hash = data_store.write(dataset, train[keep].reset_index(drop=True))
    _, test_hash = data_store.write(dataset, test[keep].reset_index(drop=True))
    X_test, y_test = test[feats], test[label]
    checks, metrics = _checks(model, X_test, y_test, test.reset_index(drop=True), protected, {}, track, 0)
    if existing is not None:
        c_hash, c_where, c_text, c_known = existing.code
    else:
        c_hash, c_where, c_text = code_record()
        c_known = c_where != NO_SOURCE
    reference = train[feats + [c for c in protected if c not in feats]].sample(
        n=min(track.reference_rows, len(train)), random_state=0)
    tags = {f"{TAG_PREFIX}declaration": name, f"{TAG_PREFIX}dataset_key": dataset,
            f"{TAG_PREFIX}data_hash": train_hash, f"{TAG_PREFIX}test_data_hash": test_hash,
            f"{TAG_PREFIX}code_hash": c_hash, f"{TAG_PREFIX}code_path": c_where, f"{TAG_PREFIX}owner": owner,
            f"{TAG_PREFIX}training_rows": str(len(train)), f"{TAG_PREFIX}test_rows": str(len(test)),
            f"{TAG_PREFIX}source": "notebook" if existing is None else "mlflow"}
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / "reference_sample.parquet"
        reference.to_parquet(ref_path, index=False)
        code_path = Path(tmp) / CODE_RECORD
        code_path.parent.mkdir(parents=True)
        code_path.write_bytes(c_text.encode())  # exactly the bytes c_hash is of
        artifacts = {"onepath": str(ref_path), str(Path(CODE_RECORD).parent): str(code_path)}
        if existing is None:
            logged = mlflow.log_and_register(
                model_name=name, estimator=model, X_example=train[feats],
                y_pred_example=model.predict(train[feats].head(50)), metrics=metrics,
                params={"features": ",".join(feats), "label": label}, tags=tags, experiment=f"onepath/{name}",
                artifacts=artifacts)
            version, run_id = logged.version, logged.run_id
        else:  # adopted: onepath's files go onto the version's own run, its model folder stays as it was
            version, run_id = existing.version, existing.run_id
            mlflow.attach_to_version(model_name=name, version=version, run_id=run_id, tags=tags, artifacts=artifacts)
        # the digest signed is the one the ledger records and every deploy verifies: the folder MLflow serves
        digest = folder_digest(mlflow.fresh_copy(name, version, Path(tmp) / "copy"))
    signature = sign_registration(private_key, model=name, version=version, run_id=run_id, digest=digest)
    entry = record_registration(
        ledger.ledger(), mlflow, model=name, version=version, run_id=run_id, data_hash=train_hash,
        code_hash=c_hash, code_path=c_where, dataset_key=dataset, author=None, split_seed=None, test_size=None,
        training_rows=len(train), metrics=metrics, via="handoff", actor=f"notebook:{who}", policy=policy,
        signed_by=who, registration_signature=signature, test_data_hash=test_hash, code_known=c_known)
    if entry.data.get("test_data_hash") != test_hash or entry.data.get("digest") != digest:
        # record_registration keeps the first entry of a version: one written by something else is not ours
        raise NotebookError(f"{name} version {version} was already recorded (ledger #{entry.seq}) with other "
                            f"facts than this registration's: nothing was signed for it; register again")
    # the tags only mirror the ledger entry (the ledger decides whether a version is registered)
    client = mlflow.client()
    client.set_model_version_tag(name, version, TAG_PREFIX + "signed_by", who)
    client.set_model_version_tag(name, version, TAG_PREFIX + "registration_signature", signature)
    write_declaration(path, render_declaration(name=name, owner=owner, version=version, label=label, pii=pii,
                                               protected=protected, features=feats), name)
    out = Registered(name, version, path, checks, f"onepath promote {name} --to prod")
    if not c_known:
        out.notes.append(f"code unknown: {c_where} (a track with the lineage check refuses this version)")
    if not quiet:
        print(out)
    return out


# --------------------------------------------------------------------------------------------
# Adopting a version logged with plain MLflow


def adopted_code_record(run_tags: dict[str, str], uri: str, invocation: str) -> tuple[str, str, str, bool]:
    """``(sha256, where, text, known)`` for a version logged outside onepath: onepath never saw its code, so the
    record holds what the MLflow run says of it (``mlflow.source.*`` tags). The code is known only when the run
    names a git commit: a source file's name alone does not say which version of it ran."""
    src = run_tags.get("mlflow.source.name")
    commit = run_tags.get("mlflow.source.git.commit")
    lines = [f"# code record of {uri}, adopted by onepath: the model was logged with plain MLflow, and onepath",
             "# did not see its code. What its MLflow run says of it:"]
    lines += [f"# {k}: {run_tags[k]}" for k in sorted(run_tags) if k.startswith("mlflow.source.")]
    lines.append(f"# registered with: {invocation}")
    text = "\n".join(lines) + "\n"
    if commit:
        where = f"{src or 'a source the run does not name'} at git commit {commit}"
    elif src:
        where = f"{src} as its MLflow run names it, with no git commit (which version of it ran is unknown)"
    else:
        where = f"unknown: its MLflow run records no source ({invocation})"
    return hashlib.sha256(text.encode()).hexdigest(), where, text, bool(commit)


def adopt(name: str, version: str | int, *, train: Any, test: Any = None, label: str, owner: str | None = None,
          pii: list[str] | tuple[str, ...] = (), protected: list[str] | tuple[str, ...] = (),
          id_column: str | None = None, identity: str | None = None, key: str | Path | None = None,
          declarations: str | Path | None = None, quiet: bool = False, settings: Any = None, policy: Any = None,
          invocation: str | None = None) -> Registered:
    """Make ``models:/name/version``, logged with plain MLflow, the platform's version: adopted, not copied.

    Refuses (one line) a version onepath already registered, one without a run, one onepath will not load
    (``refuse_outside_content``: sklearn in skops format only) or without an input signature; then registers
    it through the same path as :func:`register`, with the signature's columns as its features."""
    import yaml
    from mlflow.exceptions import MlflowException

    from platform_defs.registration import NotServable, refuse_outside_content, registration
    from platform_defs.settings import load_settings
    from platform_defs.wiring import build_resources
    from resources.artifact_digest import folder_digest
    from resources.serving.model_server import load_estimator, read_signature

    version = str(version)
    uri = f"models:/{name}/{version}"
    resources = build_resources(settings or load_settings())
    mlflow = resources["mlflow"]
    try:
        mv = mlflow.get_version(name, version)
    except MlflowException:
        known = sorted(int(v.version) for v in mlflow.client().search_model_versions(f"name = '{name}'"))
        raise NotebookError(f"{uri} is not in MLflow's registry (versions of '{name}': "
                            f"{', '.join(map(str, known)) or 'none'})") from None
    entry = registration(resources["ledger"].ledger(), name, version)
    if entry is not None:  # the ledger decides (a tag is anyone's to write)
        by = entry.data.get("author") if entry.data.get("author_verified") else None
        how = f"signed by {by}" if by else f"recorded via {entry.data.get('via')}"
        raise NotebookError(f"already registered by onepath: {uri} ({how}, ledger #{entry.seq}); promote it with "
                            f"`onepath promote {name} --version {version}`, or log a new version to register")
    if not mv.run_id:
        raise NotebookError(f"{uri} has no MLflow run: onepath stores its reference sample and code record on the "
                            f"version's run; log the model inside mlflow.start_run()")
    with tempfile.TemporaryDirectory() as tmp:
        folder = mlflow.fresh_copy(name, version, Path(tmp))
        try:
            refuse_outside_content(folder)
        except NotServable as err:
            raise NotebookError(f"{uri}: onepath will not load it: {err}") from None
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        try:
            features = [c.name for c in read_signature(mlmodel)]
        except RuntimeError as err:
            raise NotebookError(f"{uri}: {str(err).splitlines()[0]}") from None
        estimator = load_estimator(folder, name, version, folder_digest(folder))
    run_tags = dict(mlflow.client().get_run(mv.run_id).data.tags)
    code = adopted_code_record(run_tags, uri, invocation or f"onepath.adopt({name!r}, {version!r})")
    return _register(estimator, train=train, test=test, label=label, name=name, owner=owner, pii=pii,
                     protected=protected, features=None, id_column=id_column, identity=identity, key=key,
                     declarations=declarations, quiet=quiet, settings=settings, policy=policy,
                     existing=Existing(version, str(mv.run_id), features, code, uri), resources=resources)


# --------------------------------------------------------------------------------------------
# Which version promote deploys


def version_to_promote(org: Any, model_name: str, book: Any, mlflow: Any) -> tuple[str, str, list[str]]:
    """``(version, why, newer)``: for a notebook model the version its declaration pins, otherwise the newest
    registered version; ``newer`` lists registered versions above it that are NOT deployed by this."""
    model = org.by_name.get(model_name)
    if model is None or not isinstance(model, ModelSpec):
        endpoint = org.by_name.get(model_name)
        model = org.by_name.get(getattr(endpoint, "model", "")) if endpoint is not None else None
    if model is None:
        raise NotebookError(f"'{model_name}' is not a declared model or endpoint")
    versions = sorted((int(v.version) for v in mlflow.client().search_model_versions(f"name = '{model.name}'")))
    if isinstance(model, NotebookModelSpec):
        pin = int(model.version)
        if pin not in versions:
            raise NotebookError(f"{model.name}: version {pin} pinned by {org.sources.get(model.name, '?')} is not "
                                f"registered (registered: {', '.join(map(str, versions)) or 'none'})")
        return str(pin), f"pinned by {org.sources.get(model.name, 'its declaration').rsplit(':', 1)[0]}", \
            [str(v) for v in versions if v > pin]
    if not versions:
        raise NotebookError(f"model '{model.name}' has no registered version yet: materialize {model.name} first")
    return str(versions[-1]), "the newest registered version", []


def endpoint_of(model_name: str) -> str:
    return notebook_endpoint_name(model_name)


# --------------------------------------------------------------------------------------------
# Calling the endpoint (step 3)


def _json_value(value: Any, where: str) -> Any:
    """One cell as JSON carries it, exactly (no rounding: ``json`` writes a float's shortest exact repr): numpy
    scalars as their Python values, NaN/NaT/None as null, timestamps and dates as ISO text; anything else is one
    NotebookError line naming where it is."""
    import datetime as dt
    import math

    import numpy as np
    import pandas as pd

    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, (dt.datetime, dt.date)):  # datetime64 items
            return value.isoformat()
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (pd.Timestamp, dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    raise NotebookError(f"rows: {where} holds {type(value).__name__} values, which JSON cannot carry: convert them "
                        f"first (e.g. to str or numbers)")


def _json_records(rows: Any) -> list[dict[str, Any]]:
    """``rows`` (a DataFrame, or an iterable of records: dicts of column: value) as the JSON records ``/predict``
    takes, every value exactly as it was (``_json_value``); what JSON cannot carry is one NotebookError line
    naming its column (and record)."""
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        if not rows.columns.is_unique:
            raise NotebookError(f"rows: the DataFrame has columns of one name: "
                                f"{', '.join(map(str, rows.columns[rows.columns.duplicated()].unique()))}")
        columns = [str(c) for c in rows.columns]
        return [{c: _json_value(v, f"column '{c}'") for c, v in zip(columns, row)}
                for row in rows.itertuples(index=False, name=None)]
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
        one = ": pass [record] for one row" if isinstance(rows, dict) else ""
        raise NotebookError(f"rows must be a DataFrame or a list of records (dicts of column: value), not "
                            f"{type(rows).__name__}{one}")
    records = list(rows)
    odd = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if odd is not None:
        raise NotebookError(f"rows: record {odd} is not a dict of column: value (got {type(records[odd]).__name__})")
    return [{str(k): _json_value(v, f"record {i}, column '{k}'") for k, v in r.items()} for i, r in enumerate(records)]


def predict(name: str, rows: Any, *, env: str = "prod", timeout: float = 30.0) -> list[dict[str, Any]]:
    """Score ``rows`` (a DataFrame or a list of records) at the stable address of the endpoint serving model
    ``name`` (or of the endpoint ``name``) in ``env``, as the platform's own caller (``onepath-cli``, which the
    recorded policy must grant): the ``predictions`` the endpoint answered, one per row. What it does is what
    the ``curl`` line ``onepath promote`` prints does; every refusal (rows JSON cannot carry, not declared, two
    endpoints serve the model, no policy recorded or ``onepath-cli`` not granted, not answering, an HTTP error,
    an answer that is not the endpoint's) is one NotebookError line."""
    import httpx

    from platform_defs.access import CLI_CALLER, AccessError, access_for, cli_token, endpoint_target
    from platform_defs.loader import load_organisation
    from platform_defs.settings import load_settings

    org = load_organisation(tolerant=True)
    decl = org.by_name.get(name)
    if decl is None or decl.kind != "endpoint":
        serving = sorted(d.name for d in org.of_kind("endpoint") if getattr(d, "model", None) == name)
        if len(serving) > 1:
            raise NotebookError(f"two endpoints serve '{name}' ({', '.join(serving)}): name the one to call "
                                f"(onepath.predict('{serving[0]}', rows))")
        decl = org.by_name[serving[0]] if serving else None
    if decl is None:
        raise NotebookError(f"no endpoint serves '{name}': register it first (onepath.register), then promote it")
    records = _json_records(rows)
    settings = load_settings()
    access = access_for(settings, actor="onepath.predict")
    try:
        access.granted(org, CLI_CALLER, decl.name, env)  # the recorded policy must grant it (only read here)
        status = access.deployer.status(endpoint_target(decl, env))
        if not status.address or not status.healthy:
            raise NotebookError(f"{decl.name}.{env} does not answer: promote it first (onepath promote {name} "
                                f"--to {env})")
        # issued only for an endpoint that answers: a first use records a grant, publishes the access table and
        # stores the token
        token = cli_token(settings, org, decl.name, env)
    except AccessError as err:
        raise NotebookError(str(err).splitlines()[0]) from None
    try:
        resp = httpx.post(f"{status.address}/predict", json={"records": records}, timeout=timeout,
                          headers={"authorization": f"Bearer {token}"})
    except httpx.HTTPError as err:
        raise NotebookError(f"{decl.name}.{env} at {status.address}: {type(err).__name__}: {err}") from None
    if resp.status_code != 200:
        raise NotebookError(f"{decl.name}.{env} answered {resp.status_code}: {' '.join(resp.text[:300].split())}")
    try:
        return resp.json()["predictions"]
    except (ValueError, KeyError, TypeError):
        raise NotebookError(f"{decl.name}.{env} answered 200 without a JSON 'predictions' list: "
                            f"{' '.join(resp.text[:300].split())}") from None
