"""Find and validate an organisation's declarations: ``declarations.py`` modules and ``defs.yaml`` files
(Dagster components, ``type: onepath.Model`` + ``attributes:``, one YAML document each; or the old
``declarations: [...]`` form, which ``onepath migrate-declarations`` converts).

The declarations folder defaults to the project's ``assets/`` and can be moved with
``ONEPATH_DECLARATIONS_DIR``. Every problem surfaces as a ``DeclarationError`` whose first line names
the declaration, its file, the field and what is wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from platform_defs import strict_yaml

from platform_defs.settings import PROJECT_ROOT, YAML_NAMES, declaration_files, declarations_dir  # noqa: F401
from platform_defs.specs import DeclarationError, NotebookDeclSpec, Organisation, parse_component, parse_declaration

if TYPE_CHECKING:
    from platform_defs.policy import Policy


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


def _yaml_error(err: yaml.YAMLError, source: str) -> DeclarationError:
    mark = getattr(err, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark else source
    return DeclarationError("?", "(yaml)", f"not valid YAML: {getattr(err, 'problem', err)}", where)


def is_old_form(docs: list) -> bool:
    """Whether a YAML file's documents are the old ``declarations: [...]`` form (not components)."""
    return len(docs) == 1 and isinstance(docs[0][0], dict) and "declarations" in docs[0][0]


def _load_yaml(path: Path, problems: list | None = None, lines: dict | None = None, text: str | None = None) -> list:
    """Every declaration of one YAML file; with ``problems`` (a tolerant load) a declaration that does not
    parse is added there and left out, and the rest of the file still loads.

    Two forms: components (one YAML document each, ``type: onepath.Model`` and ``attributes:``), and the old
    ``declarations:`` list (``onepath migrate-declarations`` converts it). A component's error names the line
    of the field; ``lines`` (when given) gets each component declaration's ``(file, attributes node)`` so
    that later errors (references, policy) can name their field's line too. ``text``: read that instead of
    the file (what the file would become)."""
    source = _rel(path)
    try:
        docs = strict_yaml.load_all_with_nodes(path.read_text() if text is None else text)  # libyaml's parse (the pure-Python one costs seconds)
    except yaml.YAMLError as err:
        raise _yaml_error(err, source) from None
    if not docs:
        return []
    if is_old_form(docs):
        return _load_old_form(docs[0], source, problems)
    out = []
    for data, node in docs:
        where = f"{source}:{node.start_mark.line + 1}"
        try:
            if not isinstance(data, dict) or "type" not in data:
                raise DeclarationError("?", "type", "expected a component (type: onepath.Model, attributes: ...) "
                                                    "or the old form (declarations: [...])", where)
            # a key of any YAML type (``1: 2``, ``~: x``, ``true: y``) is named as text, the first in the file
            extra = sorted((kn.start_mark.line + 1, str(k)) for k, kn in strict_yaml.key_nodes(node).items()
                           if k not in ("type", "attributes"))
            if extra:
                raise DeclarationError("?", extra[0][1], "unknown key (a component has 'type' and 'attributes')",
                                       f"{source}:{extra[0][0]}")
            attrs_node = next((v for k, v in node.value if k.value == "attributes"), node)
            try:
                spec = parse_component(data["type"], data.get("attributes"), where)
            except DeclarationError as err:
                raise _at_field(err, source, attrs_node) from None
            if lines is not None:
                for d in (spec.expand() if isinstance(spec, NotebookDeclSpec) else [spec]):
                    lines[d.name] = (source, attrs_node)
            out.append((spec, where))
        except DeclarationError as err:
            if problems is None:
                raise
            problems.append(err)
    return out


def _at_field(err: DeclarationError, source: str, attrs_node) -> DeclarationError:
    """``err`` with its place the line of its field in a component's attributes."""
    if err.field in ("type", "attributes", "(yaml)"):
        return err
    line = strict_yaml.line_of(attrs_node, err.field.split("."))
    return DeclarationError(err.name, err.field, err.problem, f"{source}:{line}", err.kind)


def _located(err: DeclarationError, lines: dict) -> DeclarationError:
    """A load's error on a component declaration, placed at its field's line (the file's own check placed it
    at the document)."""
    place = lines.get(err.name)
    same_file = place is not None and (err.source or "").rsplit(":", 1)[0] == place[0]
    return _at_field(err, *place) if same_file else err


def _load_old_form(doc: tuple, source: str, problems: list | None) -> list:
    data, node = doc
    if set(data) - {"declarations"} or not isinstance(data.get("declarations"), list):
        raise DeclarationError("?", "declarations", "the file must hold one key, 'declarations', with a list", source)
    items_nodes = next(v for k, v in node.value if k.value == "declarations").value
    out = []
    for item, item_node in zip(data["declarations"], items_nodes):
        where = f"{source}:{item_node.start_mark.line + 1}"
        try:
            out.append((parse_declaration(item, where), where))
        except DeclarationError as err:
            if problems is None:
                raise
            problems.append(err)
    return out


def load_organisation(root: Path | None = None, policy: "Policy | None" = None, *, tolerant: bool = False,
                      check_imports: bool = False) -> Organisation:
    """Every declaration under ``root``, checked, with its track decided by ``policy`` (default: the
    policy file in use): an owner the policy does not know, a track the team may not use, or a purpose
    below its minimum track fails here, for every entry point.

    ``tolerant=True`` (the code location's load): a declaration that fails is left out, with its error in
    ``org.problems``, and so is every declaration that depends on it (its own error: "left out: depends on
    'x', which is broken"); everything else loads. A broken policy file still fails the whole load.

    ``check_imports=True`` (``onepath validate``, CI) imports every trainer and generator; a load only
    checks that the module exists and defines the name (importing sklearn-heavy trainers cost most of a
    code location's load, and every run worker paid it)."""
    root = root or declarations_dir()
    if not root.is_dir():
        raise DeclarationError("?", "(folder)", f"declarations folder {root} does not exist")
    problems: list[DeclarationError] | None = [] if tolerant else None
    found = []
    lines: dict = {}  # a component declaration's (file, attributes node): its errors name their field's line
    for path in declaration_files(root):
        try:
            if path.name == "declarations.py":
                found += _load_python(path)
            else:
                found += _load_yaml(path, problems, lines)
        except DeclarationError as err:
            if problems is None:
                raise
            problems.append(err)
    sources: dict[str, str] = {}
    decls = []
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
        try:
            return resolve_organisation(_organisation(decls, sources, check_imports), policy)
        except DeclarationError as err:
            raise _located(err, lines) from None
    org = _tolerant(decls, sources, policy, problems, check_imports)
    org.problems = [_located(p, lines) for p in org.problems]
    return org


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


def load_governed(root: Path | None = None) -> "tuple[Organisation, Policy]":
    """``(organisation, policy)``: the policy file in use and the declarations resolved against it."""
    from platform_defs.policy import load_policy

    policy = load_policy()
    return load_organisation(root, policy), policy


def _top_level_names(origin: str | None) -> set[str] | None:
    """The names a module's source defines at top level (a def, a class, an assignment or an import), read
    without importing it; None when only an import can tell (compiled, namespace, unreadable, a syntax error,
    a module ``__getattr__``: the import check in validate says what is wrong)."""
    import ast

    if not origin or not origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(origin).read_text())
    except (OSError, SyntaxError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__getattr__":
            return None  # a module __getattr__ (onepath.trainers: entry points) answers only when imported
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
            mod = importlib.import_module(module)
        except Exception as err:  # someone's module failed to import: one line, not a traceback
            raise DeclarationError(d.name, field, f"importing '{module}' failed: {type(err).__name__}: {err}",
                                   sources.get(d.name), d.kind) from None
        try:
            target = getattr(mod, attr)
        except AttributeError as err:  # a module __getattr__ (onepath.trainers) says why it has no such name
            if hasattr(mod, "__getattr__"):
                raise DeclarationError(d.name, field, str(err), sources.get(d.name), d.kind) from None
            target = None
        except Exception as err:  # noqa: BLE001 - an entry point's module failed to import
            raise DeclarationError(d.name, field, f"'{module}:{attr}' failed to load: {type(err).__name__}: {err}",
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
