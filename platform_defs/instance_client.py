"""The running onepath platform, asked over its webserver's GraphQL API (what the UI itself calls).

``InstanceClient.from_settings()`` is the one place that knows the address: ``ONEPATH_UI_HOST`` (default
127.0.0.1) and ``ONEPATH_UI_PORT`` (default 3000), the same settings ``onepath up`` starts the webserver on.
Runs are submitted to that instance and executed by its run launcher, never in the calling process.
Dagster's public ``dagster_graphql.DagsterGraphQLClient`` answers what it covers (run status, location
reload); plain GraphQL documents the rest (launch with tags, a run's events, its check evaluations).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

DONE = ("SUCCESS", "FAILURE", "CANCELED")

_LOCATION = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name
  locationOrLoadError { __typename ... on PythonError { message }
    ... on RepositoryLocation { repositories { name } } } } } ... on PythonError { message } } }"""
_LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message reason } }
  ... on InvalidSubsetError { message } ... on PipelineNotFoundError { message } ... on RunConflict { message }
  ... on UnauthorizedError { message } ... on InvalidStepError { invalidStepKey }
  ... on InvalidOutputError { invalidOutputName } } }"""
_META = """metadataEntries { label description __typename
  ... on FloatMetadataEntry { floatValue } ... on IntMetadataEntry { intValue }
  ... on TextMetadataEntry { text } ... on JsonMetadataEntry { jsonString } ... on BoolMetadataEntry { boolValue }
  ... on MarkdownMetadataEntry { mdStr } ... on PathMetadataEntry { path } ... on UrlMetadataEntry { url } }"""
_EVENTS = """query($id: ID!, $after: String) { logsForRun(runId: $id, afterCursor: $after, limit: 1000) {
  __typename ... on EventConnection { cursor hasMore events { __typename
    ... on MessageEvent { message timestamp level }
    ... on StepEvent { stepKey }
    ... on MaterializationEvent { assetKey { path } }
    ... on AssetCheckEvaluationEvent { evaluation { checkName assetKey { path } success severity description
      %s } }
    ... on ExecutionStepFailureEvent { error { message } } } }
  ... on RunNotFoundError { message } ... on PythonError { message } } }""" % _META
_RUN = """query($id: ID!) { runOrError(runId: $id) { __typename
  ... on Run { runId status startTime endTime tags { key value } assetSelection { path } }
  ... on RunNotFoundError { message } ... on PythonError { message } } }"""
_NODE = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename } }"""
_RUNS = """query($limit: Int) { runsOrError(limit: $limit) { __typename
  ... on Runs { results { runId status startTime endTime tags { key value } assetSelection { path } } }
  ... on PythonError { message } } }"""


class PlatformNotRunning(RuntimeError):
    """No onepath platform answers at the configured address."""


class InstanceError(RuntimeError):
    """The platform answered, and refused or failed what was asked (one line)."""


def _metadata(entries: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in entries or []:
        value = next((e[k] for k in ("floatValue", "intValue", "text", "jsonString", "boolValue", "mdStr", "path",
                                     "url") if k in e), e.get("description"))
        if "jsonString" in e:
            import json

            try:
                value = json.loads(e["jsonString"])
            except ValueError:
                pass
        out[e["label"]] = value
    return out


def _event(e: dict[str, Any]) -> dict[str, Any]:
    """One run event as the CLI shows it: ``type``, ``message``, ``step`` and, for a materialization or a check
    evaluation, ``asset`` (and ``check``, ``passed``, ``severity``, ``description``, ``metadata``)."""
    out: dict[str, Any] = {"type": e["__typename"], "message": e.get("message") or "", "step": e.get("stepKey"),
                           "timestamp": e.get("timestamp")}
    if "assetKey" in e and e["assetKey"]:
        out["asset"] = "/".join(e["assetKey"]["path"])
    if "evaluation" in e:
        ev = e["evaluation"]
        out.update({"asset": "/".join(ev["assetKey"]["path"]), "check": ev["checkName"], "passed": ev["success"],
                    "severity": ev["severity"], "description": ev.get("description"),
                    "metadata": _metadata(ev.get("metadataEntries"))})
    if e.get("error"):
        out["error"] = (e["error"].get("message") or "").strip().splitlines()[0:1]
    return out


class InstanceClient:
    """The running webserver's GraphQL endpoint at ``url`` (``http://host:port/graphql``)."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, int(port), timeout
        self.url = f"http://{host}:{self.port}/graphql"
        self._location: tuple[str, str] | None = None

    @classmethod
    def from_settings(cls, settings: Any = None) -> "InstanceClient":
        """The platform ``onepath up`` runs with these settings (``ONEPATH_UI_HOST``/``ONEPATH_UI_PORT``)."""
        host = getattr(settings, "ui_host", None) or os.environ.get("ONEPATH_UI_HOST") or "127.0.0.1"
        port = getattr(settings, "ui_port", None) or os.environ.get("ONEPATH_UI_PORT") or "3000"
        return cls(host, int(port))

    # -- transport ----------------------------------------------------------------------------------

    def query(self, document: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            r = httpx.post(self.url, json={"query": document, "variables": dict(variables or {})},
                           timeout=self.timeout)
        except httpx.TransportError:
            raise PlatformNotRunning(f"no onepath platform answers at {self.url}: start it with ./dev up") from None
        if r.status_code != 200:
            raise InstanceError(f"the platform at {self.url} answered HTTP {r.status_code}")
        body = r.json()
        if body.get("errors"):
            raise InstanceError(f"the platform refused the query: {body['errors'][0].get('message', '')}")
        return body["data"]

    def _graphql_client(self) -> Any:
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient(self.host, port_number=self.port, timeout=int(self.timeout))

    def location(self) -> tuple[str, str]:
        """(code location name, repository name) of the platform's one code location."""
        if self._location is None:
            ws = self.query(_LOCATION)["workspaceOrError"]
            if ws["__typename"] != "Workspace":
                raise InstanceError(f"the platform's workspace did not load: {ws.get('message', '')}")
            for entry in ws["locationEntries"]:
                loc = entry["locationOrLoadError"] or {}
                if loc.get("__typename") == "RepositoryLocation" and loc["repositories"]:
                    self._location = (entry["name"], loc["repositories"][0]["name"])
                    break
                if loc.get("__typename") == "PythonError":
                    first = (loc.get("message") or "").strip().splitlines()[:1]
                    raise InstanceError(f"the code location '{entry['name']}' does not load: "
                                        f"{first[0] if first else 'see the UI'} (onepath validate says why)")
            else:
                raise InstanceError("the platform has no code location loaded yet: wait for onepath up to finish")
        return self._location

    # -- the contract -------------------------------------------------------------------------------

    def launch(self, asset_names: list[str], *, run_config: dict | None = None, tags: dict | None = None) -> str:
        """Submit a run materializing ``asset_names`` (with their checks) to the instance; its run id."""
        location, repo = self.location()
        params: dict[str, Any] = {
            "selector": {"repositoryLocationName": location, "repositoryName": repo, "jobName": "__ASSET_JOB",
                         "assetSelection": [{"path": n.split("/")} for n in asset_names],
                         "assetCheckSelection": []},
            "mode": "default", "runConfigData": run_config or {},
            "executionMetadata": {"tags": [{"key": k, "value": str(v)} for k, v in (tags or {}).items()]},
        }
        params["selector"].pop("assetCheckSelection")  # every check of the selected assets runs with them
        got = self.query(_LAUNCH, {"p": params})["launchRun"]
        if got["__typename"] == "LaunchRunSuccess":
            return got["run"]["runId"]
        if got["__typename"] == "RunConfigValidationInvalid":
            why = "; ".join(e["message"] for e in got["errors"][:3])
            raise InstanceError(f"the platform refused the run's parameters: {why}")
        raise InstanceError(f"the platform refused the run ({got['__typename']}): "
                            f"{(got.get('message') or '').strip().splitlines()[:1] or ''}")

    def events(self, run_id: str, after: str | None = None) -> tuple[list[dict[str, Any]], str | None, bool]:
        """(events after cursor ``after``, in order; the new cursor; whether more are waiting)."""
        got = self.query(_EVENTS, {"id": run_id, "after": after})["logsForRun"]
        if got["__typename"] != "EventConnection":
            raise InstanceError(f"run {run_id}: {got.get('message', got['__typename'])}")
        return [_event(e) for e in got["events"]], got["cursor"], got["hasMore"]

    def _run_header(self, run_id: str) -> dict[str, Any]:
        got = self.query(_RUN, {"id": run_id})["runOrError"]
        if got["__typename"] != "Run":
            raise InstanceError(f"no run {run_id} on this platform (onepath runs list shows them)")
        return got

    def run(self, run_id: str) -> dict[str, Any]:
        """The run: ``run_id``, ``status``, ``assets`` selected, ``tags``, ``materializations`` (asset names),
        ``checks`` (each evaluation: asset, check, passed, severity, description, metadata), ``failures``."""
        head = self._run_header(run_id)
        events: list[dict[str, Any]] = []
        cursor, more = None, True
        while more:
            batch, cursor, more = self.events(run_id, cursor)
            events += batch
        return self._shape(head, events)

    @staticmethod
    def _shape(head: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "run_id": head["runId"], "status": head["status"], "start_time": head.get("startTime"),
            "end_time": head.get("endTime"), "tags": {t["key"]: t["value"] for t in head.get("tags") or []},
            "assets": ["/".join(a["path"]) for a in head.get("assetSelection") or []],
            "materializations": [e["asset"] for e in events if e["type"] == "MaterializationEvent"],
            "checks": [{k: e.get(k) for k in ("asset", "check", "passed", "severity", "description", "metadata")}
                       for e in events if e["type"] == "AssetCheckEvaluationEvent"],
            "failures": [{"step": e["step"], "message": (e.get("error") or [e["message"]])[0]}
                         for e in events if e["type"] == "ExecutionStepFailureEvent"],
        }

    def follow(self, run_id: str, on_event: Callable[[dict], None], *, poll: float = 0.5,
               timeout: float | None = None) -> dict[str, Any]:
        """Call ``on_event`` with each event of the run, in order, until the run ends; then ``run(run_id)``."""
        cursor: str | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self._run_header(run_id)["status"]
            more = True
            while more:
                batch, cursor, more = self.events(run_id, cursor)
                for e in batch:
                    on_event(e)
            if status in DONE:
                return self.run(run_id)
            if deadline is not None and time.monotonic() > deadline:
                raise InstanceError(f"run {run_id} is still {status} after {timeout:.0f} s "
                                    f"(onepath runs follow {run_id} keeps watching)")
            time.sleep(poll)

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest runs: run_id, status, assets, tags, start/end times."""
        got = self.query(_RUNS, {"limit": limit})["runsOrError"]
        if got["__typename"] != "Runs":
            raise InstanceError(f"the platform could not list its runs: {got.get('message', '')}")
        return [self._shape(r, []) for r in got["results"]]

    def has_asset(self, name: str) -> bool:
        return self.query(_NODE, {"key": {"path": name.split("/")}})["assetNodeOrError"]["__typename"] == "AssetNode"

    def ensure_assets(self, names: list[str]) -> None:
        """The running code location has every one of ``names``. A declaration written a moment ago (by
        ``onepath.register``, or by hand) may not be loaded there yet: reload once, then name what is missing."""
        missing = [n for n in names if not self.has_asset(n)]
        if missing:
            self.reload_location()
            missing = [n for n in names if not self.has_asset(n)]
        if missing:
            raise InstanceError(f"the running platform has no asset '{missing[0]}' even after a reload: its "
                                f"declaration did not load there (onepath validate says why)")

    def reload_location(self) -> None:
        """Reload the platform's code location (the declarations), as the UI's Reload button does."""
        from dagster_graphql import DagsterGraphQLClientError, ReloadRepositoryLocationStatus

        location, _ = self.location()
        try:
            info = self._graphql_client().reload_repository_location(location)
        except DagsterGraphQLClientError as err:
            raise PlatformNotRunning(f"no onepath platform answers at {self.url}: start it with ./dev up "
                                     f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        if info.status != ReloadRepositoryLocationStatus.SUCCESS:
            raise InstanceError(f"the code location '{location}' did not reload: "
                                f"{(info.message or '').strip().splitlines()[:1] or info.failure_type}")
        self._location = None


_CHECKS = """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { __typename
  ... on AssetNode { assetChecksOrError { __typename ... on AssetChecks { checks { name description } } } } } }"""
_CHECK_RUNS = """query($key: AssetKeyInput!, $check: String!) {
  assetCheckExecutions(assetKey: $key, checkName: $check, limit: 10) { runId status timestamp
    evaluation { checkName success severity description %s } } }""" % _META


def latest_check_evaluations(client: InstanceClient, asset: str) -> list[dict[str, Any]]:
    """Each check of ``asset`` with its latest evaluated execution: check, description, run_id, status, passed,
    severity, metadata (passed None when it never ran); ``running``: the run of a newer execution not yet evaluated
    (a run in progress, e.g. automation's next attempt), else None; ``failed_since``: the newest run that failed
    before evaluating it (its result below is older), else None."""
    key = {"path": asset.split("/")}
    node = client.query(_CHECKS, {"key": key})["assetNodeOrError"]
    if node["__typename"] != "AssetNode":
        raise InstanceError(f"the running platform has no asset '{asset}' (onepath inventory lists what is declared)")
    checks = (node.get("assetChecksOrError") or {}).get("checks") or []
    out = []
    for c in checks:
        runs = client.query(_CHECK_RUNS, {"key": key, "check": c["name"]})["assetCheckExecutions"]
        ex = next((r for r in runs if r.get("evaluation")), None)
        # newer executions that gave no evaluation: one still in progress (a run evaluating it now), or one whose
        # run failed before evaluating it (EXECUTION_FAILED); a run that finished without it is SKIPPED
        after = runs[:runs.index(ex)] if ex is not None else runs
        newer = [r for r in after if r["status"] == "IN_PROGRESS"]
        failed = [r for r in after if r["status"] == "EXECUTION_FAILED"]
        ev = (ex or {}).get("evaluation") or {}
        out.append({"asset": asset, "check": c["name"], "description": c.get("description"),
                    "run_id": ex and ex["runId"], "status": ex and ex["status"],
                    "passed": ev.get("success") if ev else None, "severity": ev.get("severity"),
                    "summary": ev.get("description"), "metadata": _metadata(ev.get("metadataEntries") or []),
                    "running": newer[0]["runId"] if newer else None,
                    "failed_since": failed[0]["runId"] if failed else None})
    return out
