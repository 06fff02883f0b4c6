"""The content digest of a model folder: what the ledger records at registration and what a server
checks before it serves a byte.

The digest covers the WHOLE folder, not just the weights (``MLmodel`` names the file to load and
the flavour, which can be a pickle): every regular file, sorted by its relative POSIX path, fed to
one sha256 as ``path NUL size NUL bytes`` with the path and the size framed by length, so no two
different folders hash alike (moving a byte from one file's end to the next file's name changes
the framing). A symlink, a device, a FIFO or a socket anywhere in the folder is refused: what it
points at could change after hashing. Empty directories carry no bytes and are not part of it.

``read_folder`` returns the digest together with the very bytes it hashed, so a loader can load
what it checked rather than re-reading files that may have changed in between. Standard library
only: the model server imports it at start.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

PREFIX = "sha256:"


class ArtifactError(ValueError):
    """A model folder that cannot be digested (a symlink or special file in it, or no folder)."""


def _walk(root: Path) -> list[tuple[str, Path]]:
    if root.is_symlink():
        raise ArtifactError(f"model folder {root} is a symlink: refused (digest a real folder)")
    if not root.is_dir():
        raise ArtifactError(f"model folder {root} does not exist or is not a directory")
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in list(dirnames) + filenames:
            p = base / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                raise ArtifactError(f"model folder {root}: {p.relative_to(root).as_posix()} is a symlink: "
                                    f"refused (a link's target can change after hashing)")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ArtifactError(f"model folder {root}: {p.relative_to(root).as_posix()} is not a regular "
                                    f"file: refused")
            files.append((p.relative_to(root).as_posix(), p))
    files.sort(key=lambda item: item[0].encode())
    return files


def _update(h: "hashlib._Hash", rel: str, data: bytes) -> None:
    name = rel.encode()
    h.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big"))
    h.update(data)


def read_folder(path: Path | str) -> tuple[str, dict[str, bytes]]:
    """``(digest, {relative posix path: bytes})`` of every regular file of the folder at ``path``,
    read once: the digest is of exactly the bytes returned."""
    root = Path(path)
    h = hashlib.sha256()
    contents: dict[str, bytes] = {}
    for rel, p in _walk(root):
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since the walk
                raise ArtifactError(f"model folder {root}: {rel} is not a regular file: refused")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read()
        finally:
            os.close(fd)
        _update(h, rel, data)
        contents[rel] = data
    return PREFIX + h.hexdigest(), contents


def folder_digest(path: Path | str) -> str:
    """``"sha256:<hex>"`` of the model folder at ``path`` (see the module docstring for what it covers)."""
    return read_folder(path)[0]


def bytes_digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of one file's bytes (a reference sample, a report)."""
    return PREFIX + hashlib.sha256(data).hexdigest()


__all__ = ["ArtifactError", "PREFIX", "bytes_digest", "folder_digest", "read_folder"]
