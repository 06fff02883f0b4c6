"""``onepath migrate-declarations``: old-form ``defs.yaml`` files (``declarations: [...]``) rewritten as Dagster
components (one ``type: onepath.X`` / ``attributes:`` document each), comments and field order kept (ruamel.yaml's
round trip). A file is rewritten only when the new text loads to exactly the same declarations; otherwise it is
left as it was, with one line saying why. Running it again changes nothing."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from platform_defs import strict_yaml
from platform_defs.settings import declaration_files
from platform_defs.specs import COMPONENT_TYPES, DeclarationError, component_type_of, fixed_by_type


@dataclass
class Migration:
    converted: list[Path] = field(default_factory=list)  # rewritten (or, with check, would be)
    current: list[Path] = field(default_factory=list)    # already components (or empty)
    refused: list[str] = field(default_factory=list)     # one line each: file and why it was left alone


def old_form_files(root: Path) -> list[Path]:
    from platform_defs.loader import is_old_form

    out = []
    for path in declaration_files(root):
        if path.suffix in (".yaml", ".yml"):
            try:
                docs = strict_yaml.load_all_with_nodes(path.read_text())
            except Exception:  # noqa: BLE001 - a file that does not parse is reported by migrate itself
                out.append(path)
                continue
            if is_old_form(docs):
                out.append(path)
    return out


def render_components(text: str) -> str:
    """``text`` (an old-form file) as component documents; raises ``DeclarationError`` for an entry no
    component type has."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 120
    rt.indent(mapping=2, sequence=4, offset=2)
    data = rt.load(text)
    # the file's leading comments (``# team file``) and the one on ``declarations:`` go before the first document
    leading = [line.strip().lstrip("#").strip() for tok in ((data.ca.comment or [None, None])[1] or [])
               for line in tok.value.splitlines() if line.strip()]
    head = "\n".join(c for c in [*leading, _comment_of(data, "declarations")] if c)
    docs = []
    for i, item in enumerate(data["declarations"]):
        if not isinstance(item, dict):
            raise DeclarationError("?", f"declarations.{i}", "not a mapping")
        type_name = component_type_of(dict(item))
        if type_name is None:
            raise DeclarationError(str(item.get("name", "?")), "kind", f"unknown kind {item.get('kind')!r}")
        fixed = set(fixed_by_type(COMPONENT_TYPES[type_name]))  # what the type says, left out of its attributes
        attrs = CommentedMap()
        for k in item:
            if k not in fixed:
                attrs[k] = item[k]
        _copy_comments(item, attrs, fixed)
        doc = CommentedMap()
        doc["type"] = type_name
        doc["attributes"] = attrs
        if i == 0 and head:
            doc.yaml_set_start_comment(head)
        docs.append(doc)
    out = io.StringIO()
    rt.dump_all(docs, out)
    return out.getvalue()


def _comment_of(data, key: str) -> str:
    """The end-of-line comment on ``key`` in a ruamel mapping, without its '#'."""
    tokens = getattr(data, "ca", None) and data.ca.items.get(key)
    for tok in tokens or []:
        value = getattr(tok, "value", None) if tok is not None and not isinstance(tok, list) else None
        if value and value.strip().startswith("#"):
            return value.strip().lstrip("#").strip()
    return ""


def _copy_comments(src, dst, dropped: set) -> None:
    """The comments of ``src``'s kept keys onto ``dst`` (ruamel keeps them per key); a comment on a dropped key
    goes on the first kept one, before it."""
    for k, tok in src.ca.items.items():
        if k not in dropped:
            dst.ca.items[k] = tok
    if src.ca.comment:
        dst.ca.comment = src.ca.comment
    lost = [_comment_of(src, k) for k in dropped if k in src.ca.items]
    lost = [c for c in lost if c]
    if lost and len(dst):
        dst.yaml_set_comment_before_after_key(next(iter(dst)), before="; ".join(lost), indent=2)


def checked_components(path: Path, text: str) -> str:
    """``text`` (an old-form file at ``path``) as components, only if they load to exactly the same declarations
    (``DeclarationError`` otherwise, or for an entry that does not load)."""
    from platform_defs.loader import _load_yaml, _rel

    before = [d for d, _ in _load_yaml(path, text=text)]
    new = render_components(text)
    after = [d for d, _ in _load_yaml(path, text=new)]
    if _plain(before) != _plain(after):
        raise DeclarationError("?", "declarations", "the component form would not load the same declarations",
                               _rel(path))
    return new


def migrate(root: Path, check: bool = False) -> Migration:
    from platform_defs.loader import _rel
    from resources.files import atomic_write

    result = Migration()
    old = set(old_form_files(root))
    for path in declaration_files(root):
        if path.suffix not in (".yaml", ".yml"):
            continue
        if path not in old:
            result.current.append(path)
            continue
        try:
            new = checked_components(path, path.read_text())
        except DeclarationError as err:
            result.refused.append(f"{_rel(path)}: not converted, left as it was: {str(err).splitlines()[0]}")
            continue
        if not check:
            atomic_write(path, new.encode(), mode=path.stat().st_mode & 0o777)
        result.converted.append(path)
    return result


def _plain(decls: list) -> list:
    return [(type(d).__name__, d.model_dump()) for d in decls]


__all__ = ["migrate", "render_components", "old_form_files"]
