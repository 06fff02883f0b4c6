"""Find and validate an organisation's declarations: ``declarations.py`` modules and ``defs.yaml`` files.

The declarations folder defaults to the project's ``assets/`` and can be moved with
``ONEPATH_DECLARATIONS_DIR``. Every problem surfaces as a ``DeclarationError`` whose first line names
the declaration, its file, the field and what is wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from platform_defs import strict_yaml

from platform_defs.settings import PROJECT_ROOT
from platform_defs.specs import DeclarationError, Organisation, parse_declaration

if TYPE_CHECKING:
    from platform_defs.policy import Policy

YAML_NAMES = ("defs.yaml", "defs.yml")


def declarations_dir() -> Path:
    return Path(os.environ.get("ONEPATH_DECLARATIONS_DIR", PROJECT_ROOT / "assets")).resolve()


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        try:
            return str(p.resolve().relative_to(PROJECT_ROOT))
        except ValueError:
            return str(p)


def _module_for(path: Path):
    """Import a declarations module by package name when it lives in the project, else by path."""
    try:
        rel = path.resolve().relative_to(PROJECT_ROOT).with_suffix("")
        return importlib.import_module(".".join(rel.parts))
    except ValueError:
        name = "onepath_decl_" + "_".join(path.resolve().with_suffix("").parts[-3:])
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod


def _load_python(path: Path) -> list:
    source = _rel(path)
    try:
        mod = _module_for(path)
    except DeclarationError as err:
        if not err.source:
            raise DeclarationError(err.name, err.field, err.problem, source, err.kind) from None
        raise
    except SyntaxError as err:
        raise DeclarationError("?", "(module)", f"syntax error at line {err.lineno}: {err.msg}", source) from None
    except Exception as err:  # an import error in someone's module must still read as one line
        raise DeclarationError("?", "(module)", f"{type(err).__name__}: {err}", source) from None
    decls = getattr(mod, "DECLARATIONS", None)
    if not isinstance(decls, (list, tuple)):
        raise DeclarationError("?", "DECLARATIONS", "a declarations module must define a DECLARATIONS list", source)
    return [(d, source) for d in decls]


def _load_yaml(path: Path) -> list:
    source = _rel(path)
    text = path.read_text()
    try:
        data, node = strict_yaml.load_with_node(text)  # one parse, libyaml's (the pure-Python one costs seconds)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise DeclarationError("?", "(yaml)", f"not valid YAML: {getattr(err, 'problem', err)}", where) from None
    if data is None:
        return []
    if not isinstance(data, dict) or set(data) - {"declarations"} or not isinstance(data.get("declarations"), list):
        raise DeclarationError("?", "declarations", "the file must hold one key, 'declarations', with a list", source)
    items_nodes = next(v for k, v in node.value if k.value == "declarations").value
    out = []
    for item, item_node in zip(data["declarations"], items_nodes):
        where = f"{source}:{item_node.start_mark.line + 1}"
        out.append((parse_declaration(item, where), where))
    return out


def load_organisation(root: Path | None = None, policy: "Policy | None" = None, *,
                      check_code: bool = True) -> Organisation:
    """Every declaration under ``root``, checked, with its track decided by ``policy`` (default: the
    policy file in use): an owner the policy does not know, a track the team may not use, or a purpose
    below its minimum track fails here, for every entry point. ``check_code=False`` leaves out importing each
    generator and trainer (a reader such as ``onepath inventory`` runs none, and they import pandas/sklearn)."""
    root = root or declarations_dir()
    if not root.is_dir():
        raise DeclarationError("?", "(folder)", f"declarations folder {root} does not exist")
    found = []
    for path in sorted(root.rglob("*")):
        if any(part.startswith((".", "__")) for part in path.relative_to(root).parts):
            continue
        if path.name == "declarations.py":
            found += _load_python(path)
        elif path.name in YAML_NAMES:
            found += _load_yaml(path)
    sources: dict[str, str] = {}
    decls = []
    for d, source in found:
        if d.name not in sources:
            sources[d.name] = source
        else:
            # keep the first place for the message, name the second as the offender
            sources[f"{d.name}#dup"] = source
        decls.append(d)
    from platform_defs.policy import load_policy, resolve_organisation

    return resolve_organisation(_organisation(decls, sources, check_code), policy or load_policy())


def load_governed(root: Path | None = None, *, check_code: bool = True) -> "tuple[Organisation, Policy]":
    """``(organisation, policy)``: the policy file in use and the declarations resolved against it."""
    from platform_defs.policy import load_policy

    policy = load_policy()
    return load_organisation(root, policy, check_code=check_code), policy


def _check_code_refs(org: Organisation) -> None:
    """Generators and trainers must import and be callable; app source folders must exist."""
    for d in org.by_name.values():
        for field in ("generator", "trainer"):
            if not hasattr(d, field):
                continue
            module, attr = getattr(d, field).split(":")
            try:
                found = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                found = None
            if found is None:
                raise DeclarationError(d.name, field, f"module '{module}' not found", org.sources.get(d.name), d.kind)
            try:
                target = getattr(importlib.import_module(module), attr, None)
            except Exception as err:  # someone's module failed to import: one line, not a traceback
                raise DeclarationError(d.name, field, f"importing '{module}' failed: {type(err).__name__}: {err}",
                                       org.sources.get(d.name), d.kind) from None
            if not callable(target):
                raise DeclarationError(d.name, field, f"'{attr}' is not a function in module '{module}'",
                                       org.sources.get(d.name), d.kind)
        if d.kind == "app" and not (PROJECT_ROOT / d.source).is_dir():
            raise DeclarationError(d.name, "source", f"folder '{d.source}' does not exist in the project",
                                   org.sources.get(d.name), d.kind)


def _organisation(decls: list, sources: dict[str, str], check_code: bool = True) -> Organisation:
    seen: dict[str, str] = {}
    for d in decls:
        if d.name in seen:
            raise DeclarationError(
                d.name, "name", f"duplicate name: already declared in {seen[d.name]}",
                sources.get(f"{d.name}#dup"), d.kind,
            )
        seen[d.name] = sources[d.name]
    org = Organisation(decls, {k: v for k, v in sources.items() if "#" not in k})
    if check_code:
        _check_code_refs(org)
    return org
