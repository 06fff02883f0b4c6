"""Where production observations live: inference logs, delivered outcomes and drift reports."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field


class MonitoringResource(dg.ConfigurableResource):
    """Paths of what endpoints observe in production; the drift check and sensor read them."""

    inference_log_dir: str = Field(description="Endpoints' JSON-lines inference logs, <endpoint>/<env>/<day>.jsonl.")
    outcomes_dir: str = Field(description="Outcomes (labels) delivered later, joined by request id.")
    drift_reports_dir: str = Field(description="Evidently HTML drift reports, kept under the policy's retention.")

    inference_log_url: str | None = Field(
        None, description="s3://bucket/prefix (ONEPATH_INFERENCE_LOG_URL): the logs are Parquet segments under "
                          "<prefix>/inference/<endpoint>/<env>/<version>/<day>/ there instead.")

    @property
    def log_root(self) -> Path | str:
        """Where every endpoint's logs are: ``s3://bucket/prefix/inference``, else the local folder."""
        return f"{self.inference_log_url.rstrip('/')}/inference" if self.inference_log_url else Path(self.inference_log_dir)

    def log_dir(self, endpoint: str, env: str) -> Path | str:
        """One endpoint environment's log: what ``resources.inference_log.read_window``/``scan_new`` read."""
        root = self.log_root
        return f"{root}/{endpoint}/{env}" if isinstance(root, str) else root / endpoint / env

    def reports_dir(self, endpoint: str, env: str) -> Path:
        return Path(self.drift_reports_dir) / endpoint / env
