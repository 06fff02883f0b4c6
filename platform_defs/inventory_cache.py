"""What ``onepath inventory`` needs of the organisation, kept between runs: its ``Subject``s (every endpoint and
app release environment with what the policy requires there), as ``inventory.subjects_of`` computed them from a
full load, in one JSON file under the owner-only home.

Why: a fresh process spent most of its time on the load (pydantic's import and models, PyYAML's constructor,
0.6-0.9 s of 1.6 s at 1,000 models) to learn what had not changed since the last run. The load stays the one
place that reads declarations; this only keeps its result, exactly:

* the entry is named by a sha256 of everything the load reads: the declaration files under the declarations
  folder (each path and its bytes), the policy file (its path and bytes), the source of the modules that turn
  them into subjects (settings, strict_yaml, specs, loader, policy, inventory, this one), the Python version,
  and which pydantic, pydantic-core and PyYAML are installed (their files' paths, sizes and times). Any change,
  and the entry is not used: the organisation is loaded again (and kept again);
* what the load checks outside those files is checked again on every use: that each trainer and generator
  module still resolves to the same file with the same bytes (``importlib.util.find_spec``, no import), and
  each app's source folder still exists;
* a ``declarations.py`` module (Python, which may read anything) turns the cache off: every run loads;
* a load that fails is never kept: its one-line error is printed every time;
* the file is read only if it is a regular file of this user that no other user may read or write
  (``resources.files.read_private``), and only if it names the key computed now. The home is owner-only:
  whoever can write there is the platform's user, who can change the declarations as well.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from platform_defs.settings import PROJECT_ROOT, declaration_files, declarations_dir, policy_path

if TYPE_CHECKING:
    from platform_defs.inventory import Subject

FORMAT = "onepath-inventory-subjects/1"
# the modules whose code decides what a load makes of the declarations and the policy
CODE = ("settings.py", "strict_yaml.py", "specs.py", "loader.py", "policy.py", "inventory.py", "inventory_cache.py")
LIBRARIES = ("pydantic", "pydantic_core", "yaml")


def cache_path(home: Path) -> Path:
    return Path(home) / "cache" / "inventory-subjects.json"


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _library(name: str) -> list[Any]:
    import importlib.util
    import os

    try:
        spec = importlib.util.find_spec(name)  # a top-level package: found, not imported
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None else None
    try:
        st = os.stat(origin) if origin else None
    except OSError:
        st = None
    return [origin, st.st_size if st else None, st.st_mtime_ns if st else None]


def inputs_key(root: Path | None = None) -> str | None:
    """The sha256 naming what a load of ``root`` (default the declarations folder) with the policy file in use
    reads, or None when a ``declarations.py`` module is among them (then nothing is kept)."""
    root = (root or declarations_dir()).resolve()
    h = hashlib.sha256(f"{FORMAT}\0{sys.version}\0{root}\0{PROJECT_ROOT}\0".encode())
    here = Path(__file__).resolve().parent
    for name in CODE:
        h.update(f"code {name} {_sha256_file(here / name)}\0".encode())
    for name in LIBRARIES:
        h.update(f"library {name} {_library(name)}\0".encode())
    try:
        files = declaration_files(root) if root.is_dir() else []
    except OSError:
        return None
    for path in files:
        if path.name == "declarations.py":
            return None
        h.update(f"declarations {path.relative_to(root)} {_sha256_file(path)}\0".encode())
    policy = policy_path()
    h.update(f"policy {policy} {_sha256_file(policy)}\0".encode())
    return h.hexdigest()


def _module_origin(module: str) -> list[str | None]:
    """Where ``module`` resolves now and its file's sha256 (what the load's trainer/generator check reads)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None else None
    return [origin, _sha256_file(Path(origin)) if origin else None]


def _outside(org: Any) -> dict[str, Any]:
    """What the load checked outside the files of the key: code references and app source folders."""
    modules = sorted({getattr(d, f).split(":")[0] for d in org.by_name.values() for f in ("generator", "trainer")
                      if getattr(d, f, None)})
    apps = sorted({d.source for d in org.by_name.values() if d.kind == "app"})
    return {"modules": {m: _module_origin(m) for m in modules}, "app_sources": apps}


def _still(outside: Any) -> bool:
    if not isinstance(outside, dict) or not isinstance(outside.get("modules"), dict) \
            or not isinstance(outside.get("app_sources"), list):
        return False
    if any(_module_origin(m) != v for m, v in outside["modules"].items()):
        return False
    return all(isinstance(s, str) and (PROJECT_ROOT / s).is_dir() for s in outside["app_sources"])


def read(home: Path, key: str) -> list["Subject"] | None:
    """The subjects kept under ``key``, if the entry is ours alone, names ``key``, and what it depends on
    outside the key is as it was; else None."""
    from resources.files import read_private

    raw = read_private(cache_path(home))
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("key") != key \
            or not isinstance(doc.get("subjects"), list) or not _still(doc.get("outside")):
        return None
    from platform_defs.inventory import Subject

    try:
        return [Subject.from_json(s) for s in doc["subjects"]]
    except (TypeError, KeyError):
        return None


def write(home: Path, key: str, subjects: list["Subject"], org: Any) -> None:
    """Keep ``subjects`` under ``key`` (best effort: a cache that cannot be written is a slower next run). Not
    in a home that does not exist: an inventory makes no home of its own."""
    from resources.files import atomic_write, private_dir

    path = cache_path(home)
    if not Path(home).is_dir():
        return
    try:
        private_dir(path.parent)
        doc = {"format": FORMAT, "key": key, "outside": _outside(org), "subjects": [s.as_json() for s in subjects]}
        atomic_write(path, json.dumps(doc).encode(), mode=0o600)
    except OSError:
        pass


def load_subjects(home: Path, root: Path | None = None) -> list["Subject"]:
    """``inventory.subjects_of`` the organisation in use: kept from the last run when nothing it was made of
    changed, else from a full load (``loader.load_governed``; its ``DeclarationError`` / ``PolicyError``
    propagate), then kept."""
    key = inputs_key(root)
    if key is not None:
        hit = read(home, key)
        if hit is not None:
            return hit
    from platform_defs.inventory import subjects_of
    from platform_defs.loader import load_governed

    org, policy = load_governed(root)  # a load imports no trainer (onepath validate does)
    subjects = subjects_of(org, policy)
    if key is not None and inputs_key(root) == key:  # nothing changed while it loaded
        write(home, key, subjects, org)
    return subjects
