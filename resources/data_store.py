"""Content-addressed dataset snapshots on the local disk (or any path the settings name)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from resources.files import create_private_file, private_dir


def dataframe_hash(df: pd.DataFrame) -> str:
    """A content hash of a frame: column names, dtypes and every value, independent of file format."""
    h = hashlib.sha256()
    h.update(repr([(str(c), str(t)) for c, t in df.dtypes.items()]).encode())
    h.update(np.ascontiguousarray(pd.util.hash_pandas_object(df, index=False).to_numpy()).tobytes())
    return h.hexdigest()


class DataStore(dg.ConfigurableResource):
    """Writes each dataset materialization once, named by its content hash."""

    root: str = Field(description="Directory holding <dataset>/<sha256>.parquet snapshots.")

    def path(self, dataset: str, data_hash: str) -> Path:
        return Path(self.root) / dataset / f"{data_hash}.parquet"

    def write(self, dataset: str, df: pd.DataFrame) -> tuple[Path, str]:
        data_hash = dataframe_hash(df)
        path = self.path(dataset, data_hash)
        if not path.exists():
            private_dir(path.parent)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            create_private_file(tmp)  # snapshots hold PII: owner-only whatever the process's umask
            df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        return path, data_hash

    def read(self, dataset: str, data_hash: str) -> pd.DataFrame:
        path = self.path(dataset, data_hash)
        if not path.exists():
            raise FileNotFoundError(f"dataset '{dataset}' snapshot {data_hash[:12]} is missing at {path}")
        df = pd.read_parquet(path)
        actual = dataframe_hash(df)
        if actual != data_hash:
            raise ValueError(f"dataset '{dataset}' snapshot {path} does not match its hash "
                             f"(expected {data_hash[:12]}, found {actual[:12]}): it was modified")
        return df
