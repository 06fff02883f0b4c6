"""Where app release bundles live: the one place that knows.

Embedded default (no ``ONEPATH_RELEASES_URL``): a release is the folder ``releases_dir/apps/<app>/<version>``,
copied there by the build and deployed from there, exactly as before this module existed.

On S3 (``ONEPATH_RELEASES_URL=s3://BUCKET/PREFIX``), so that a release built on one host deploys from another:
the build still makes the local folder, and publishes it once as ``PREFIX/releases/apps/<app>/<version>.tar.gz``
(the files ``source_hash`` covers, as regular files; its content hash as the object's ``content-hash`` metadata,
for people: nothing trusts it). The key is written once: S3's conditional write, so an existing bundle is never
replaced by a publish. A deploying host fetches the bundle into the same local folder, which is then a cache:
downloaded and unpacked into a temporary folder beside it, checked, then moved into place (``os.replace``), so a
half-fetched release is never there. The check is the integrity guarantee: ``source_hash`` of what was unpacked
must equal the content hash the ledger's ``release_built`` entry recorded at build. The hash comes from the
ledger (hash-chained, signed), never from the bucket: anyone who can write the bucket can replace a bundle and
its metadata, not the ledger. A cached folder is checked the same way each time it is used. The tar is unpacked
only when every member is a regular file or a folder with a relative name and no ``..`` (no links, no devices),
and then with ``tarfile``'s ``data`` filter as a second guard.

Which releases exist, newest first: on S3 the ledger's ``release_built`` entries (their order is the ledger's,
S3 lists keys, not times) that have a bundle in the bucket; locally the folders by modification time, as before.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from resources import object_store
from resources.files import private_dir

BUNDLE_SUFFIX = ".tar.gz"
HASH_META = "content-hash"  # the object's x-amz-meta-content-hash: informative only


def _skipped(rel: Path) -> bool:
    return any(part in ("__pycache__", ".pytest_cache") or part.startswith(".") for part in rel.parts)


def source_hash(root: Path) -> tuple[str, int]:
    """The content hash of a release folder (or an app's source): every file but hidden ones and caches, by
    relative path and bytes; and how many files it covers. Each file is framed by lengths (its path's, then the
    sha256 of its bytes), so no two folders hash alike by moving bytes between a name and a file or between two
    files (a plain ``path NUL bytes NUL`` stream let one binary file stand for two)."""
    h = hashlib.sha256(b"onepath-release-v2\0")
    n = 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir() or _skipped(rel):
            continue
        name = rel.as_posix().encode()
        h.update(len(name).to_bytes(8, "big") + name + hashlib.sha256(p.read_bytes()).digest())
        n += 1
    h.update(n.to_bytes(8, "big"))
    return h.hexdigest(), n


class ReleaseError(RuntimeError):
    """A release cannot be published or fetched: one line naming the release and where it was looked for."""


class ReleaseMismatch(ReleaseError):
    """What was fetched (or is cached) does not hash to the content hash the ledger recorded at build."""

    def __init__(self, message: str, *, expected: str, found: str):
        super().__init__(message)
        self.expected, self.found = expected, found


def recorded_hash(ledger: Any, app: str, version: str) -> str | None:
    """The content hash the first ``release_built`` ledger entry of ``app`` ``version`` recorded (None: none)."""
    built = next((e for e in ledger.entries(kind="release_built", subject=app)
                  if str(e.data.get("version")) == str(version)), None)
    return str(built.data.get("content_hash") or "") or None if built is not None else None


@dataclass(frozen=True)
class ReleaseStore:
    """App release bundles: local folders under ``releases_dir`` (on S3, the local cache) and, when ``url`` is an
    ``s3://`` URI, the bundles in the bucket. A value: nothing is read or made until a method is called."""

    releases_dir: Path
    url: str | None = None

    @property
    def on_s3(self) -> bool:
        return object_store.is_s3(self.url)

    @property
    def where(self) -> str:
        """Where the bundles are, for a message."""
        return object_store.join(self.url, "releases", "apps") if self.on_s3 else str(Path(self.releases_dir) / "apps")

    def folder(self, app: str, version: str) -> Path:
        """The release's local folder (on S3: its place in the cache)."""
        return Path(self.releases_dir) / "apps" / app / version

    def bundle(self, app: str, version: str) -> str:
        """The release's object on S3."""
        assert self.url is not None
        return object_store.join(self.url, "releases", "apps", app, version + BUNDLE_SUFFIX)

    # -- build ---------------------------------------------------------------------------------------------

    def publish(self, app: str, version: str, folder: Path, content_hash: str) -> Path:
        """Make ``app`` ``version`` from ``folder`` (the app's source): its local folder (copied once, atomically)
        and, on S3, its bundle (written once). Returns the local folder. A bundle already in the bucket that is not
        the bytes this folder packs to is refused: the build must not record a release it cannot deploy."""
        dst = self.folder(app, version)
        if not dst.exists():
            tmp = dst.with_name(f".{version}.{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("__pycache__", ".*"))
            os.replace(tmp, dst)
        if not self.on_s3:
            return dst
        uri = self.bundle(app, version)
        self._check(dst, content_hash, f"the local copy {dst} of release {version} of {app}",
                    "it is not what was built; remove the folder and build again")
        tmp_file = dst.parent / f".{version}.{os.getpid()}.{uuid.uuid4().hex[:8]}{BUNDLE_SUFFIX}"
        try:
            _pack(dst, tmp_file)  # the same folder packs to the same bytes
            if object_store.put_file_once(uri, tmp_file, {HASH_META: content_hash}):
                return dst
            # there already (an earlier build, another host, a re-run): kept only if it is these very bytes; its
            # metadata is anyone's to write, so it proves nothing
            if object_store.get_bytes(uri) != tmp_file.read_bytes():
                raise ReleaseError(f"release {version} of {app}: {uri} already holds another bundle than this build "
                                   f"packs (content hash {content_hash[:12]}); it is not rewritten: remove the "
                                   f"object if it is not a release anyone deploys")
        finally:
            tmp_file.unlink(missing_ok=True)
        return dst

    # -- deploy --------------------------------------------------------------------------------------------

    def fetch(self, app: str, version: str, content_hash: str | None) -> Path:
        """The release's local folder, ready to deploy. Locally: the folder, as built (as before). On S3: the
        cached folder or the bundle fetched into the cache, either checked against ``content_hash`` (the one the
        ledger's ``release_built`` entry recorded; without one nothing is fetched)."""
        dst = self.folder(app, version)
        if not self.on_s3:
            if not dst.is_dir():
                raise ReleaseError(f"release {version} is not built at {dst}")
            return dst
        if not content_hash:
            raise ReleaseError(f"release {version} has no release_built ledger entry, so no content hash to check "
                               f"its bundle against: build it through the graph (materialize the {app} asset)")
        if dst.is_dir():
            self._check(dst, content_hash, f"the cached copy {dst} of release {version} of {app}",
                        "remove the folder and it is fetched again")
            return dst
        uri = self.bundle(app, version)
        parent = private_dir(dst.parent)
        stem = f".{version}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp_file, tmp_dir = parent / (stem + BUNDLE_SUFFIX), parent / stem
        try:
            if not object_store.download(uri, tmp_file):
                raise ReleaseError(f"release {version} of {app} is not published: no object {uri}")
            _unpack(tmp_file, tmp_dir, uri)
            self._check(tmp_dir, content_hash, f"the bundle {uri}",
                        "it was replaced in the bucket after the build; nothing was deployed from it")
            try:
                os.replace(tmp_dir, dst)
            except OSError:
                if not dst.is_dir():  # another fetch put it there first: that one is checked like any cached copy
                    raise
                self._check(dst, content_hash, f"the cached copy {dst} of release {version} of {app}",
                            "remove the folder and it is fetched again")
        finally:
            tmp_file.unlink(missing_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return dst

    def fetch_recorded(self, app: str, version: str, ledger: Any) -> Path:
        """:meth:`fetch`, checked (on S3) against the content hash ``ledger``'s ``release_built`` entry recorded."""
        return self.fetch(app, version, recorded_hash(ledger, app, version) if self.on_s3 else None)

    @staticmethod
    def _check(folder: Path, expected: str, what: str, then: str) -> None:
        found, _ = source_hash(folder)
        if found != expected:
            raise ReleaseMismatch(f"{what} has content hash {found[:12]}, not the {expected[:12]} its release_built "
                                  f"ledger entry recorded: refused ({then})", expected=expected, found=found)

    # -- which releases ------------------------------------------------------------------------------------

    def versions(self, app: str, ledger: Any = None) -> list[str]:
        """The releases of ``app`` there are, newest first. On S3 (``ledger`` needed): the versions of its
        ``release_built`` entries in ledger order that have a bundle in the bucket; locally: the built folders
        by modification time."""
        if not self.on_s3:
            builds = Path(self.releases_dir) / "apps" / app
            found = [p for p in builds.glob("r-*") if p.is_dir()] if builds.is_dir() else []
            return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]
        if ledger is None:
            raise ReleaseError(f"which releases of {app} there are on S3 is the ledger's to say: no ledger given")
        published = {o.uri for o in object_store.list_objects(object_store.join(self.url or "", "releases", "apps",
                                                                                 app))}
        out: list[str] = []
        for entry in reversed(ledger.entries(kind="release_built", subject=app)):
            version = str(entry.data.get("version"))
            if version not in out and self.bundle(app, version) in published:
                out.append(version)
        return out


def _pack(folder: Path, out: Path) -> None:
    """The files ``source_hash`` covers, as regular files (a link's target's bytes), in a gzip'd tar with no
    times, owners or file name in it: the same folder packs to the same bytes."""
    with open(out, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if p.is_dir() or _skipped(rel):
                continue
            info = tarfile.TarInfo(rel.as_posix())
            info.size = p.stat().st_size
            info.mode = 0o755 if os.access(p, os.X_OK) else 0o644
            with open(p, "rb") as f:
                tar.addfile(info, f)


def max_unpacked_bytes() -> int:
    """``ONEPATH_RELEASE_MAX_BYTES``: the most a release may unpack to (default 1 GiB), so a bundle planted in the
    bucket that expands without end (a gzip bomb) cannot fill the disk of every host that fetches it."""
    return int(os.environ.get("ONEPATH_RELEASE_MAX_BYTES", str(1 << 30)))


def _unpack(bundle: Path, into: Path, uri: str) -> None:
    """Unpack a bundle into a new folder ``into``, refusing (one line naming the object and the member) any member
    that is not a regular file or folder, or whose name is absolute or climbs out with ``..``, and a bundle that
    unpacks to more than :func:`max_unpacked_bytes` (counted from the headers before anything is written)."""
    try:
        with tarfile.open(bundle, mode="r:gz") as tar:
            members = tar.getmembers()
            total, cap = sum(m.size for m in members), max_unpacked_bytes()
            if total > cap:
                raise ReleaseError(f"bundle {uri} refused: it unpacks to {total} bytes, more than the {cap} "
                                   f"ONEPATH_RELEASE_MAX_BYTES allows")
            for m in members:
                name = PurePosixPath(m.name)
                if not (m.isreg() or m.isdir()):
                    kind = "a link" if (m.issym() or m.islnk()) else "a device or other special file"
                    raise ReleaseError(f"bundle {uri} refused: member {m.name!r} is {kind}; a release holds only "
                                       f"files")
                if name.is_absolute() or m.name.startswith(("/", "\\")) or ".." in name.parts or "\\" in m.name:
                    raise ReleaseError(f"bundle {uri} refused: member {m.name!r} names a path outside the release")
            private_dir(into)
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as err:
        raise ReleaseError(f"bundle {uri} cannot be unpacked: {(str(err).splitlines() or [type(err).__name__])[0]}") \
            from None
