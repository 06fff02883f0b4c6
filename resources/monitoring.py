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

    def log_dir(self, endpoint: str, env: str) -> Path:
        return Path(self.inference_log_dir) / endpoint / env

    def reports_dir(self, endpoint: str, env: str) -> Path:
        return Path(self.drift_reports_dir) / endpoint / env
