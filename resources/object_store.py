"""Objects on S3 (AWS S3, MinIO, moto's server) for the stores that are files in the embedded default.

A store's location is a local folder or an ``s3://bucket/prefix`` URI; ``is_s3`` is the one test. The client is
boto3's, configured by the standard AWS variables only (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for a server that is not AWS), plus
``ONEPATH_S3_ADDRESSING_STYLE`` (``path`` for MinIO and moto; default ``auto``): credentials never come from a
file of ours. Errors name the bucket, key and endpoint, never a credential.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

_LOCAL = threading.local()


def is_s3(location: Any) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)`` (key without a leading slash; may be empty)."""
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket (expected s3://BUCKET/PREFIX)")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


class ObjectStoreError(RuntimeError):
    """An S3 call failed: one line naming the operation, the object and the endpoint."""


def endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def client() -> Any:
    """This thread's boto3 S3 client (boto3 clients are thread-safe to use, not to create)."""
    style = os.environ.get("ONEPATH_S3_ADDRESSING_STYLE", "auto")
    # a new client when the settings it was made from changed (a test, a long-lived process re-configured)
    key = (os.getpid(), endpoint(), style, os.environ.get("AWS_DEFAULT_REGION"), os.environ.get("AWS_ACCESS_KEY_ID"))
    made = getattr(_LOCAL, "client", None)
    if made is None or made[0] != key:
        import boto3
        from botocore.config import Config

        made = (key, boto3.session.Session().client(
            "s3", config=Config(s3={"addressing_style": style}, retries={"max_attempts": 3, "mode": "standard"},
                                connect_timeout=5, read_timeout=30)))
        _LOCAL.client = made
    return made[1]


def _fail(what: str, uri: str, err: Exception) -> ObjectStoreError:
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        why = f"{err.response.get('Error', {}).get('Code', '?')}: {err.response.get('Error', {}).get('Message', '')}"
    else:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ObjectStoreError(f"cannot {what} {uri} (endpoint {endpoint()}): {why.strip()}")


def put_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data, **({"ContentType": content_type} if content_type else {}))
    except (BotoCoreError, ClientError) as err:
        raise _fail("write", uri, err) from None


def delete(uri: str) -> None:
    """Remove the object (no error when there is none: S3 deletes are idempotent)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        client().delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as err:
        raise _fail("delete", uri, err) from None


def get_bytes(uri: str) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise _fail("read", uri, err) from None
    except BotoCoreError as err:
        raise _fail("read", uri, err) from None


def exists(uri: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return False
        raise _fail("look up", uri, err) from None
    except BotoCoreError as err:
        raise _fail("look up", uri, err) from None


@dataclass(frozen=True)
class Listed:
    uri: str
    size: int
    modified: datetime


def list_objects(prefix_uri: str, start_after: str | None = None) -> list[Listed]:
    """Every object under ``prefix_uri`` (a folder: a ``/`` is added), in key order; with ``start_after`` (a path
    below ``prefix_uri``), only the keys that sort after it (S3 lists from there: an old history is not read)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split(prefix_uri)
    out: list[Listed] = []
    folder = prefix + "/" if prefix else ""
    after = {"StartAfter": folder + start_after.strip("/")} if start_after else {}
    try:
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder, **after):
            out += [Listed(f"s3://{bucket}/{o['Key']}", o["Size"], o["LastModified"]) for o in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as err:
        raise _fail("list", prefix_uri, err) from None
    return out


def metadata(uri: str) -> dict[str, str] | None:
    """The object's user metadata (``x-amz-meta-*``, keys lower-case), or None when there is no such object."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        return dict(client().head_object(Bucket=bucket, Key=key).get("Metadata", {}))
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise _fail("look up", uri, err) from None
    except BotoCoreError as err:
        raise _fail("look up", uri, err) from None


def put_file_once(uri: str, path: str | os.PathLike, meta: dict[str, str] | None = None) -> bool:
    """Write the file as the object unless an object has that key: S3's conditional write (``If-None-Match: *``),
    so of two writers racing exactly one writes. True when this call wrote it, False when one was there."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        with open(path, "rb") as f:
            client().put_object(Bucket=bucket, Key=key, Body=f, Metadata=dict(meta or {}), IfNoneMatch="*")
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return False
        raise _fail("write", uri, err) from None
    except BotoCoreError as err:
        raise _fail("write", uri, err) from None


def download(uri: str, path: str | os.PathLike) -> bool:
    """The object's bytes streamed into ``path`` (created or truncated); False when there is no such object."""
    import shutil

    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        body = client().get_object(Bucket=bucket, Key=key)["Body"]
        with open(path, "wb") as f:
            shutil.copyfileobj(body, f, 1 << 20)
        return True
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return False
        raise _fail("read", uri, err) from None
    except BotoCoreError as err:
        raise _fail("read", uri, err) from None
