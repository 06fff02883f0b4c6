"""Content-addressed dataset snapshots on the local disk or on S3 (the settings name the root)."""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from resources import object_store
from resources.files import create_private_file, private_dir
from resources.object_store import is_s3, join


def dataframe_hash(df: pd.DataFrame) -> str:
    """A content hash of a frame: column names, dtypes and every value, independent of file format."""
    h = hashlib.sha256()
    h.update(repr([(str(c), str(t)) for c, t in df.dtypes.items()]).encode())
    h.update(np.ascontiguousarray(pd.util.hash_pandas_object(df, index=False).to_numpy()).tobytes())
    return h.hexdigest()


class DataStore(dg.ConfigurableResource):
    """Writes each dataset materialization once, named by its content hash: ``<root>/<dataset>/<sha256>.parquet``
    under a local folder (owner-only files) or an ``s3://bucket/prefix`` root (``resources.object_store``: the
    standard AWS variables configure the client). A snapshot is read back only if it still hashes to its name."""

    root: str = Field(description="Folder, or s3://bucket/prefix, holding <dataset>/<sha256>.parquet snapshots.")

    def location(self, dataset: str, data_hash: str) -> Path | str:
        if is_s3(self.root):
            return join(self.root, dataset, f"{data_hash}.parquet")
        return Path(self.root) / dataset / f"{data_hash}.parquet"

    def path(self, dataset: str, data_hash: str) -> Path:
        found = self.location(dataset, data_hash)
        if not isinstance(found, Path):
            raise ValueError(f"dataset snapshots are on S3 ({self.root}): {found} is not a local path")
        return found

    def write(self, dataset: str, df: pd.DataFrame) -> tuple[Path | str, str]:
        data_hash = dataframe_hash(df)
        where = self.location(dataset, data_hash)
        if isinstance(where, str):
            if not object_store.exists(where):  # content-addressed: an existing object is this very frame
                buf = io.BytesIO()
                df.to_parquet(buf, index=False)
                object_store.put_bytes(where, buf.getvalue())
                # S3 lists keys, not write times (LastModified is whole seconds): a marker keyed by the write's
                # time orders the snapshots
                object_store.put_bytes(join(self.root, dataset, "_written", f"{time.time_ns():020d}-{data_hash}"),
                                       b"")
            return where, data_hash
        if not where.exists():
            private_dir(where.parent)
            tmp = where.with_suffix(f".{os.getpid()}.tmp")
            create_private_file(tmp)  # snapshots hold PII: owner-only whatever the process's umask
            df.to_parquet(tmp, index=False)
            os.replace(tmp, where)
        return where, data_hash

    def read(self, dataset: str, data_hash: str) -> pd.DataFrame:
        where = self.location(dataset, data_hash)
        if isinstance(where, str):
            data = object_store.get_bytes(where)
            if data is None:
                raise FileNotFoundError(f"dataset '{dataset}' snapshot {data_hash[:12]} is missing at {where}")
            df = pd.read_parquet(io.BytesIO(data))
        else:
            if not where.exists():
                raise FileNotFoundError(f"dataset '{dataset}' snapshot {data_hash[:12]} is missing at {where}")
            df = pd.read_parquet(where)
        actual = dataframe_hash(df)
        if actual != data_hash:
            raise ValueError(f"dataset '{dataset}' snapshot {where} does not match its hash "
                             f"(expected {data_hash[:12]}, found {actual[:12]}): it was modified")
        return df

    def snapshots(self, dataset: str) -> list[tuple[str, str]]:
        """``(data_hash, location)`` of every snapshot of ``dataset``, oldest first (by when it was written)."""
        if is_s3(self.root):
            markers = object_store.list_objects(join(self.root, dataset, "_written"))
            return [(h, self.location(dataset, h)) for h in  # type: ignore[misc]
                    (m.uri.rsplit("/", 1)[-1].split("-", 1)[1] for m in markers)]
        else:
            folder = Path(self.root) / dataset
            found = [(p.stat().st_mtime, str(p)) for p in folder.glob("*.parquet")] if folder.is_dir() else []
        return [(loc.rsplit("/", 1)[-1].removesuffix(".parquet"), loc) for _, loc in sorted(found)]
