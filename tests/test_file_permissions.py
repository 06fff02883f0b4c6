"""Attacker tier (a), another local user: every file onepath keeps is owner-only.

CI runs as root, which ignores file permissions, so the attacker here is a real other user: each
attempt runs as ``nobody`` through ``setpriv``. The platform's home is put where ``nobody`` can reach
its parent (pytest's own temporary folders are 0700 and would stop the attacker for us).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

SETPRIV = shutil.which("setpriv")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=60)


def loose_files(root: Path) -> list[str]:
    """Every file or folder below ``root`` that its group or others may read, write or enter."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for p in [Path(dirpath), *(Path(dirpath) / f for f in filenames)]:
            st = p.lstat()
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                out.append(f"{p.relative_to(root)} {oct(stat.S_IMODE(st.st_mode))}")
    return out


@pytest.fixture
def public_parent():
    """A folder every user can enter, as a home's parent usually is (/home, /srv, a project checkout)."""
    parent = Path(tempfile.mkdtemp(prefix="onepath-perm-", dir="/tmp"))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_a_home_written_by_the_platform_is_owner_only(settings, public_parent: Path) -> None:
    from tests.conftest import isolated_settings
    from resources.data_store import DataStore
    from resources.ledger import Ledger, ledger_paths

    world = isolated_settings(settings, public_parent / "home", port_offset=190)
    snapshot, _ = DataStore(root=str(world.data_dir)).write(
        "people", pd.DataFrame({"ssn": ["123-45-6789"], "income": [50_000.0]}))
    db, key = ledger_paths(world.home)
    Ledger(db, key).append("deploy", "x", {"version": "1"}, "test", env="prod")
    assert loose_files(world.home) == []
    for secret in (snapshot, db, key, world.home / "mlflow.db"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


def test_another_local_user_reads_nothing(settings, public_parent: Path) -> None:
    assert SETPRIV and os.getuid() == 0, "acting as another user needs root and setpriv (util-linux), as on CI"
    from tests.conftest import isolated_settings
    from resources.data_store import DataStore
    from resources.ledger import Ledger, ledger_paths

    world = isolated_settings(settings, public_parent / "home", port_offset=191)
    snapshot, _ = DataStore(root=str(world.data_dir)).write(
        "people", pd.DataFrame({"ssn": ["123-45-6789"], "income": [50_000.0]}))
    db, key = ledger_paths(world.home)
    Ledger(db, key).append("deploy", "x", {"version": "1"}, "test", env="prod")
    # the attacker can reach the home's parent, as on a real host
    assert as_nobody("ls", str(public_parent)).returncode == 0
    for target in (snapshot, db, key, world.home / "mlflow.db"):
        seen = as_nobody("cat", str(target))
        assert seen.returncode != 0 and "Permission denied" in seen.stderr, (target, seen)
        assert "123-45-6789" not in seen.stdout
    listing = as_nobody("ls", str(world.home))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    write = as_nobody("sh", "-c", f"echo forged >> {db}")
    assert write.returncode != 0
    assert Ledger(db, key).verify().ok


def test_onepath_up_tightens_a_home_made_with_a_loose_umask(public_parent: Path) -> None:
    from resources.files import tighten_tree

    home = public_parent / "old-home"
    (home / "data" / "people").mkdir(parents=True)
    (home / "data" / "people" / "x.parquet").write_bytes(b"PII")
    for p, mode in ((home, 0o755), (home / "data", 0o755), (home / "data" / "people", 0o755),
                    (home / "data" / "people" / "x.parquet", 0o644)):
        p.chmod(mode)
    assert tighten_tree(home) == 4
    assert loose_files(home) == []
    assert (home / "data" / "people" / "x.parquet").read_bytes() == b"PII"  # nothing else changed
