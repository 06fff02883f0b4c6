"""Where production observations live: inference logs, delivered outcomes and drift reports."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field


class MonitoringResource(dg.ConfigurableResource):
    """Where what endpoints observe in production is (local folders, or S3 where a ``*_url`` is set); the drift
    check, the drift sensor and the feedback join read them."""

    inference_log_dir: str = Field(description="Endpoints' JSON-lines inference logs, <endpoint>/<env>/<day>.jsonl.")
    outcomes_dir: str = Field(description="Outcomes (labels) delivered later, joined by request id.")
    drift_reports_dir: str = Field(description="Evidently HTML drift reports, kept under the policy's retention.")

    inference_log_url: str | None = Field(
        None, description="s3://bucket/prefix (ONEPATH_INFERENCE_LOG_URL): the logs are Parquet segments under "
                          "<prefix>/inference/<endpoint>/<env>/<version>/<day>/ there instead.")

    outcomes_url: str | None = Field(
        None, description="s3://bucket/prefix (ONEPATH_OUTCOMES_URL): outcomes are objects under "
                          "<prefix>/outcomes/<endpoint>/<env>/<day>/ there instead (one per delivery).")
    drift_reports_url: str | None = Field(
        None, description="s3://bucket/prefix (ONEPATH_DRIFT_REPORTS_URL): drift reports are objects under "
                          "<prefix>/drift_reports/<endpoint>/<env>/ there instead.")

    @property
    def log_root(self) -> Path | str:
        """Where every endpoint's logs are: ``s3://bucket/prefix/inference``, else the local folder."""
        return f"{self.inference_log_url.rstrip('/')}/inference" if self.inference_log_url else Path(self.inference_log_dir)

    def log_dir(self, endpoint: str, env: str) -> Path | str:
        """One endpoint environment's log: what ``resources.inference_log.read_window``/``scan_new`` read."""
        root = self.log_root
        return f"{root}/{endpoint}/{env}" if isinstance(root, str) else root / endpoint / env

    @property
    def outcomes_root(self) -> Path | str:
        """Where every endpoint's outcomes are: ``s3://bucket/prefix/outcomes``, else the local folder (what
        ``resources.feedback.record_outcomes`` and ``labelled_rows`` take)."""
        from resources.feedback import outcomes_root

        return outcomes_root(self.outcomes_url, self.outcomes_dir)

    @property
    def reports_root(self) -> Path | str:
        """Where every endpoint's drift reports are: ``s3://bucket/prefix/drift_reports``, else the local folder."""
        return reports_root(self.drift_reports_url, self.drift_reports_dir)

    def reports_dir(self, endpoint: str, env: str) -> Path | str:
        """One endpoint environment's drift reports: what ``platform_defs.drift_check`` writes and prunes."""
        root = self.reports_root
        return f"{root}/{endpoint}/{env}" if isinstance(root, str) else root / endpoint / env


def reports_root(drift_reports_url: str | None, drift_reports_dir: str | Path) -> Path | str:
    """Where every endpoint's drift reports are: ``<drift_reports_url>/drift_reports`` on S3
    (``ONEPATH_DRIFT_REPORTS_URL``), else the folder."""
    from resources import object_store

    return object_store.join(drift_reports_url, "drift_reports") if drift_reports_url else Path(drift_reports_dir)
