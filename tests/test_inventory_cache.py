"""``platform_defs.inventory_cache``: what ``onepath inventory`` keeps of the organisation between runs is exactly
what a load makes of it, is used only while nothing it was made of changed, and only from an owner-only file
that names what it was made of."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from platform_defs import inventory_cache, loader
from platform_defs.inventory import subjects_of
from platform_defs.specs import DeclarationError

ROOT = Path(__file__).resolve().parents[1]
RETENTION = (ROOT / "assets" / "retention" / "defs.yaml").read_text()
APP = """\
---
type: onepath.AppRelease
attributes:
  name: cache_portal
  owner: digital-lending
  source: apps/loan_portal
  entrypoint: app:app
  calls: [churn_scoring]
"""


@pytest.fixture
def org(tmp_path, monkeypatch):
    """A YAML organisation (retention's line and an app calling it), its own policy file, a trainer module of
    its own on sys.path, and a home."""
    root = tmp_path / "decls"
    (root / "retention").mkdir(parents=True)
    (root / "retention" / "defs.yaml").write_text(
        RETENTION.replace("assets.retention.trainer:train_churn", "cache_trainers:train_churn") + APP)
    code = tmp_path / "code"
    code.mkdir()
    (code / "cache_trainers.py").write_text("def train_churn(X, y, params):\n    return None\n")
    monkeypatch.syspath_prepend(str(code))
    policy = tmp_path / "policy.yaml"
    policy.write_text((ROOT / "assets" / "policy.yaml").read_text())
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(policy))
    monkeypatch.setenv("ONEPATH_DECLARATIONS_DIR", str(root))
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return {"root": root, "home": home, "policy": policy, "trainers": code / "cache_trainers.py"}


def loaded(root: Path):
    return subjects_of(*loader.load_governed(root))


class Loads:
    """Counts full loads (what the cache saves)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = loader.load_governed

        def counting(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setattr(loader, "load_governed", counting)


def test_what_is_kept_is_what_a_load_makes_and_a_second_run_loads_nothing(org, monkeypatch):
    want = loaded(org["root"])
    assert {s.kind for s in want} == {"endpoint", "app"} and any(s.approval_required for s in want)
    loads = Loads(monkeypatch)
    assert inventory_cache.load_subjects(org["home"]) == want and loads.n == 1
    path = inventory_cache.cache_path(org["home"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert inventory_cache.load_subjects(org["home"]) == want and loads.n == 1  # kept: no load


@pytest.mark.parametrize("change", ["declaration", "policy", "trainer_module"])
def test_a_change_to_anything_it_was_made_of_loads_again(org, monkeypatch, change):
    inventory_cache.load_subjects(org["home"])
    decls = org["root"] / "retention" / "defs.yaml"
    if change == "declaration":  # churn_scoring gets a third environment
        decls.write_text(decls.read_text().replace("  model: churn\n",
                                                   "  model: churn\n  environments: [dev, staging, prod]\n", 1))
    elif change == "policy":  # an app release needs its code review in staging as well
        text = org["policy"].read_text()
        org["policy"].write_text(text.replace("approval_envs: [prod]", "approval_envs: [staging, prod]"))
    else:  # the trainer is gone from its module: the load refuses, the kept organisation is not used
        org["trainers"].write_text("def something_else():\n    return None\n")
        with pytest.raises(DeclarationError, match="'train_churn' is not a function"):
            inventory_cache.load_subjects(org["home"])
        return
    loads = Loads(monkeypatch)
    got = inventory_cache.load_subjects(org["home"])
    assert loads.n == 1 and got == loaded(org["root"])
    if change == "declaration":
        assert ("churn_scoring", "dev") in {(s.name, s.env) for s in got}
    else:
        assert next(s for s in got if (s.name, s.env) == ("cache_portal", "staging")).approval_required


def test_an_entry_is_used_only_if_ours_alone_and_naming_what_it_was_made_of(org, monkeypatch):
    """An entry another user may write or read, a link, or one naming other inputs is not read: the
    organisation is loaded (and says what the files say)."""
    want = inventory_cache.load_subjects(org["home"])
    path = inventory_cache.cache_path(org["home"])
    doc = json.loads(path.read_text())
    forged = json.loads(json.dumps(doc))
    for s in forged["subjects"]:
        s["owner"] = "mallory"
    planted = org["home"].parent / "planted.json"
    planted.write_text(json.dumps(forged))
    planted.chmod(0o600)

    def group_writable():
        path.write_text(json.dumps(forged))
        path.chmod(0o620)

    def a_link():
        path.symlink_to(planted)

    def other_inputs():
        path.write_text(json.dumps({**forged, "key": "0" * 64}))
        path.chmod(0o600)

    for setup in (group_writable, a_link, other_inputs):
        path.unlink(missing_ok=True)
        setup()
        loads = Loads(monkeypatch)
        assert inventory_cache.load_subjects(org["home"]) == want and loads.n == 1, setup.__name__
    # the control: the same forged entry, ours alone and naming these inputs, is what the cache says (the home
    # is owner-only: who can write there is the platform's user, who can write the declarations too)
    path.unlink()
    path.write_text(json.dumps(forged))
    path.chmod(0o600)
    assert {s.owner for s in inventory_cache.load_subjects(org["home"])} == {"mallory"}


def test_a_failed_load_and_a_python_declarations_module_are_never_kept(org):
    decls = org["root"] / "retention" / "defs.yaml"
    good = decls.read_text()
    decls.write_text(good.replace("model: churn\n", "model: chrun\n", 1))
    for _ in range(2):  # the error every time, nothing kept
        with pytest.raises(DeclarationError, match="unknown model 'chrun'"):
            inventory_cache.load_subjects(org["home"])
    assert not inventory_cache.cache_path(org["home"]).exists()
    decls.write_text(good)
    (org["root"] / "extra").mkdir()
    (org["root"] / "extra" / "declarations.py").write_text("DECLARATIONS = []\n")
    assert inventory_cache.inputs_key(org["root"]) is None  # Python may read anything: no key covers it
    assert inventory_cache.load_subjects(org["home"]) == loaded(org["root"])
    assert not inventory_cache.cache_path(org["home"]).exists()


def test_an_inventory_makes_no_home_of_its_own(org, tmp_path):
    nowhere = tmp_path / "no-home"
    assert inventory_cache.load_subjects(nowhere) == loaded(org["root"])
    assert not nowhere.exists()
