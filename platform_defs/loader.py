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


# -- the parse cache ----------------------------------------------------------------------------
# A YAML file's parse (its data and each declaration's line) kept as JSON under the owner-only home, named by
# the sha256 of the exact text parsed (and of this format and PyYAML's version): a file read again with the
# same bytes is not parsed again (PyYAML's constructor is Python: 0.4 s for 2,000 declarations), one with
# other bytes is, and its parse replaces nothing (it is another name). Only what JSON carries exactly is kept
# (mappings with string keys, lists, strings, finite numbers, booleans, null): a file holding a date or a
# binary value is parsed every time. What comes out goes through the same validation as a fresh parse.
PARSE_CACHE_FORMAT = "onepath-yaml-parse/1"
PARSE_CACHE_KEEP = 256  # entries; the oldest go first


def parse_cache_dir(home: Path) -> Path:
    return Path(home) / "cache" / "declarations"


def _json_exact(x: object) -> bool:
    if x is None or isinstance(x, (str, bool, int)):
        return True
    if isinstance(x, float):
        return x == x and x not in (float("inf"), float("-inf"))
    if isinstance(x, list):
        return all(_json_exact(v) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _json_exact(v) for k, v in x.items())
    return False


def _cache_key(text: str) -> str:
    import hashlib

    h = hashlib.sha256(f"{PARSE_CACHE_FORMAT}\0{yaml.__version__}\0".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _cache_read(cache: Path, key: str) -> tuple[object, list[int] | None] | None:
    """The cached parse named ``key``, if its file is a regular file of ours that no one else may write, and
    says it is the parse of ``key``; else None (the file is parsed)."""
    import json
    import stat

    try:
        fd = os.open(cache / f"{key}.json", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            doc = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(doc, dict) or doc.get("format") != PARSE_CACHE_FORMAT or doc.get("key") != key:
        return None
    data, lines = doc.get("data"), doc.get("lines")
    if _declarations_shaped(data):
        if not (isinstance(lines, list) and len(lines) == len(data["declarations"])  # type: ignore[index]
                and all(type(n) is int for n in lines)):
            return None
    elif lines is not None:
        return None
    return data, lines


def _declarations_shaped(data: object) -> bool:
    return isinstance(data, dict) and set(data) == {"declarations"} and isinstance(data["declarations"], list)


def _cache_write(cache: Path, key: str, data: object, lines: list[int] | None) -> None:
    """Keep a parse (best effort: a cache that cannot be written is a slower next load, nothing else)."""
    import json

    from resources.files import atomic_write, private_dir

    try:
        private_dir(cache.parent)
        private_dir(cache)
        atomic_write(cache / f"{key}.json", json.dumps({"format": PARSE_CACHE_FORMAT, "key": key, "data": data,
                                                        "lines": lines}).encode(), mode=0o600)
        kept = sorted(cache.glob("*.json"), key=lambda q: q.stat().st_mtime)
        for old in kept[:-PARSE_CACHE_KEEP]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _parse_yaml(text: str, source: str, cache: Path | None) -> tuple[object, list[int] | None]:
    """``(data, lines)``: the file's data and, when it has the shape of a declarations file, the line of each
    declaration; from ``cache`` when it holds this exact text's parse."""
    key = _cache_key(text) if cache is not None else ""
    if cache is not None:
        hit = _cache_read(cache, key)
        if hit is not None:
            return hit
    try:
        data, node = strict_yaml.load_with_node(text)  # one parse, libyaml's (the pure-Python one costs seconds)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise DeclarationError("?", "(yaml)", f"not valid YAML: {getattr(err, 'problem', err)}", where) from None
    lines = None
    if _declarations_shaped(data):
        items_nodes = next(v for k, v in node.value if k.value == "declarations").value
        lines = [n.start_mark.line + 1 for n in items_nodes]
    if cache is not None and _json_exact(data):
        _cache_write(cache, key, data, lines)
    return data, lines


def _load_yaml(path: Path, problems: list | None = None, cache: Path | None = None) -> list:
    """Every declaration of one YAML file; with ``problems`` (a tolerant load) a declaration that does not
    parse is added there and left out, and the rest of the file still loads. ``cache``: where parses are
    kept (see ``_parse_yaml``)."""
    source = _rel(path)
    text = path.read_text()
    data, lines = _parse_yaml(text, source, cache)
    if data is None:
        return []
    if not _declarations_shaped(data) or lines is None:
        raise DeclarationError("?", "declarations", "the file must hold one key, 'declarations', with a list", source)
    out = []
    for item, line in zip(data["declarations"], lines):
        where = f"{source}:{line}"
        try:
            out.append((parse_declaration(item, where), where))
        except DeclarationError as err:
            if problems is None:
                raise
            problems.append(err)
    return out


def load_organisation(root: Path | None = None, policy: "Policy | None" = None, *, tolerant: bool = False,
                      check_imports: bool = False, parse_cache: Path | None = None) -> Organisation:
    """Every declaration under ``root``, checked, with its track decided by ``policy`` (default: the
    policy file in use): an owner the policy does not know, a track the team may not use, or a purpose
    below its minimum track fails here, for every entry point.

    ``tolerant=True`` (the code location's load): a declaration that fails is left out, with its error in
    ``org.problems``, and so is every declaration that depends on it (its own error: "left out: depends on
    'x', which is broken"); everything else loads. A broken policy file still fails the whole load.

    ``check_imports=True`` (``onepath validate``, CI) imports every trainer and generator; a load only
    checks that the module exists and defines the name (importing sklearn-heavy trainers cost most of a
    code location's load, and every run worker paid it).

    ``parse_cache`` (a folder under the owner-only home, ``parse_cache_dir``): YAML files whose exact text was
    parsed before are read from there (see ``_parse_yaml``); the result is the same."""
    root = root or declarations_dir()
    if not root.is_dir():
        raise DeclarationError("?", "(folder)", f"declarations folder {root} does not exist")
    problems: list[DeclarationError] | None = [] if tolerant else None
    found = []
    for path in sorted(root.rglob("*")):
        if any(part.startswith((".", "__")) for part in path.relative_to(root).parts):
            continue
        try:
            if path.name == "declarations.py":
                found += _load_python(path)
            elif path.name in YAML_NAMES:
                found += _load_yaml(path, problems, parse_cache)
        except DeclarationError as err:
            if problems is None:
                raise
            problems.append(err)
    sources: dict[str, str] = {}
    decls = []
    from platform_defs.specs import NotebookDeclSpec

    found = [(x, source) for d, source in found
             for x in (d.expand() if isinstance(d, NotebookDeclSpec) else [d])]
    for d, source in found:
        if d.name not in sources:
            sources[d.name] = source
        elif problems is not None:  # the second one is left out, the first loads
            problems.append(DeclarationError(d.name, "name", f"duplicate name: already declared in {sources[d.name]}",
                                             source, d.kind))
            continue
        else:
            # keep the first place for the message, name the second as the offender
            sources[f"{d.name}#dup"] = source
        decls.append(d)
    from platform_defs.policy import load_policy, resolve_organisation

    policy = policy or load_policy()
    if problems is None:
        return resolve_organisation(_organisation(decls, sources, check_imports), policy)
    return _tolerant(decls, sources, policy, problems, check_imports)


def _refs(d) -> list[str]:
    """The declarations ``d`` names (what it cannot load without)."""
    out = [getattr(d, f) for f in ("dataset", "model") if isinstance(getattr(d, f, None), str)]
    feedback = getattr(d, "feedback", None)
    if feedback is not None:
        out.append(feedback.endpoint)
    return out + list(getattr(d, "calls", None) or [])


def _tolerant(decls: list, sources: dict[str, str], policy: "Policy", problems: list,
              check_imports: bool) -> Organisation:
    """The organisation of every declaration that loads: build, and on each error leave the declaration it
    names out (a dependent of one left out gets its own line) and build again."""
    from platform_defs.policy import resolve_organisation

    broken = {p.name for p in problems if p.name != "?"}
    kept = list(decls)
    memo = _CodeRefMemo()
    for d in kept:
        try:
            _check_code_refs_one(d, sources, check_imports, memo)
        except DeclarationError as err:
            problems.append(err)
            broken.add(d.name)
    while True:
        kept = [d for d in kept if d.name not in broken]
        try:
            org = resolve_organisation(
                _organisation(kept, {n: s for n, s in sources.items() if n in {d.name for d in kept}}, None),
                policy)
        except DeclarationError as err:
            culprit = next((d for d in kept if d.name == err.name), None)
            if culprit is None:  # not one declaration's fault: nothing to leave out
                raise
            gone = next((r for r in _refs(culprit) if r in broken), None)
            problems.append(err if gone is None else DeclarationError(
                culprit.name, "(depends)", f"left out: depends on '{gone}', which is broken",
                sources.get(culprit.name), culprit.kind))
            broken.add(culprit.name)
            continue
        org.problems = problems
        return org


def load_governed(root: Path | None = None, parse_cache: Path | None = None) -> "tuple[Organisation, Policy]":
    """``(organisation, policy)``: the policy file in use and the declarations resolved against it."""
    from platform_defs.policy import load_policy

    policy = load_policy()
    return load_organisation(root, policy, parse_cache=parse_cache), policy


def _top_level_names(origin: str | None) -> set[str] | None:
    """The names a module's source defines at top level (a def, a class, an assignment or an import), read
    without importing it; None when only an import can tell (compiled, namespace, unreadable, a syntax error:
    the import check in validate says what is wrong)."""
    import ast

    if not origin or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_text())
    except (OSError, SyntaxError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
    return names


class _CodeRefMemo:
    """What one load learnt about code references, asked once per module and once per source file: a
    thousand models naming one trainer parsed its file a thousand times (0.6 s of a 1,000-model load)."""

    def __init__(self) -> None:
        self.specs: dict[str, object] = {}
        self.names: dict[str | None, set[str] | None] = {}

    def find_spec(self, module: str):
        if module not in self.specs:
            try:
                self.specs[module] = importlib.util.find_spec(module)
            except (ImportError, ValueError):
                self.specs[module] = None
        return self.specs[module]

    def defines(self, origin: str | None, attr: str) -> bool:
        if origin not in self.names:
            self.names[origin] = _top_level_names(origin)
        names = self.names[origin]
        return names is None or attr in names


def _check_code_refs_one(d, sources: dict[str, str], check_imports: bool = True,
                         memo: _CodeRefMemo | None = None) -> None:
    """Generators and trainers must exist (and, with ``check_imports``, import and be callable); app source
    folders must exist. ``memo``: what this load already found out about a module."""
    memo = memo or _CodeRefMemo()
    for field in ("generator", "trainer"):
        if not getattr(d, field, None):  # a notebook model and its snapshot dataset have neither
            continue
        module, attr = getattr(d, field).split(":")
        found = memo.find_spec(module)
        if found is None:
            raise DeclarationError(d.name, field, f"module '{module}' not found", sources.get(d.name), d.kind)
        if not check_imports:
            if not memo.defines(found.origin, attr):
                raise DeclarationError(d.name, field, f"'{attr}' is not a function in module '{module}'",
                                       sources.get(d.name), d.kind)
            continue
        try:
            target = getattr(importlib.import_module(module), attr, None)
        except Exception as err:  # someone's module failed to import: one line, not a traceback
            raise DeclarationError(d.name, field, f"importing '{module}' failed: {type(err).__name__}: {err}",
                                   sources.get(d.name), d.kind) from None
        if not callable(target):
            raise DeclarationError(d.name, field, f"'{attr}' is not a function in module '{module}'",
                                   sources.get(d.name), d.kind)
    if d.kind == "app" and not (PROJECT_ROOT / d.source).is_dir():
        raise DeclarationError(d.name, "source", f"folder '{d.source}' does not exist in the project",
                               sources.get(d.name), d.kind)


def _check_code_refs(org: Organisation, check_imports: bool = True) -> None:
    memo = _CodeRefMemo()
    for d in org.by_name.values():
        _check_code_refs_one(d, org.sources, check_imports, memo)


def _organisation(decls: list, sources: dict[str, str], check_imports: bool | None = True) -> Organisation:
    """``check_imports=None``: the code references are checked by the caller."""
    seen: dict[str, str] = {}
    for d in decls:
        if d.name in seen:
            raise DeclarationError(
                d.name, "name", f"duplicate name: already declared in {seen[d.name]}",
                sources.get(f"{d.name}#dup"), d.kind,
            )
        seen[d.name] = sources[d.name]
    org = Organisation(decls, {k: v for k, v in sources.items() if "#" not in k})
    if check_imports is not None:
        _check_code_refs(org, check_imports)
    return org
