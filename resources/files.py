"""Owner-only files: the one atomic-write helper and the private umask every entry point sets.

Standard library only (the supervisor and the model workers import it at start). Any other local
user is an attacker (README, *What each guarantee rests on*): state, keys, databases, snapshots and
logs under ``$ONEPATH_HOME`` are readable and writable by the platform's user alone, so every
process onepath starts creates what it creates with mode 0600 (files) or 0700 (folders).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path
from typing import Iterator

PRIVATE_UMASK = 0o077


def use_private_umask() -> None:
    """Make everything this process (and every process it starts) creates owner-only."""
    os.umask(PRIVATE_UMASK)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Owner-only creation for the length of a block, in a process that is not onepath's own (a notebook's
    kernel keeps Jupyter's umask, usually 022, for everything else it does)."""
    before = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(before)


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter (created with its parents if missing)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o700)
    return path


def atomic_write(path: Path, content: bytes, mode: int = 0o600) -> None:
    """Write ``content`` to ``path`` so readers see the old file or the new one, never a part; durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)  # never through a planted link
    try:
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_private(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a link) of this user that no one else may write or
    read; else None. For what a process keeps for itself under the home (a cache) and trusts as its own."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (so a library that opens it later, such as
    sqlite, finds an owner-only file instead of making one with the process's umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def tighten_tree(root: Path) -> int:
    """Take every group and other permission off everything below ``root`` (a home made before
    onepath was private, or by a tool with a looser umask); returns how many entries changed.
    Symbolic links are left alone (their own mode means nothing)."""
    changed = 0
    root = Path(root)
    if not root.exists():
        return 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *filenames]:
            p = Path(dirpath) if name is None else Path(dirpath) / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                p.chmod(mode & 0o700)
                changed += 1
    return changed
