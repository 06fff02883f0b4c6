"""Bake: watch a freshly switched version through its own metrics before it counts as good.

``bake(deployer, target, version, policy)`` snapshots the counters of every worker of the version now
current right after the switch (the baseline), then reads them again every ``policy.poll_seconds``
for ``policy.seconds``. Only what happened after the baseline counts, and only on the prediction
routes (``/predict``, ``/invocations``):

* requests: ``onepath_requests_total`` over those routes (any status),
* errors: the 5xx among them (a 4xx is the caller's mistake, not the version's),
* p99 latency: from the deltas of the ``onepath_request_latency_seconds`` histogram, the upper bound
  of the bucket that holds the 99th percentile (so it is never under the true value; ``+Inf`` means
  above the largest bucket and is reported as such).

A worker's counters start again from zero when it is restarted. Each worker is told apart by its
position and ``onepath_process_start_time_seconds``: a new start time (or a counter that went down)
closes the old process's count (what it was last seen with) and counts the new process from zero.
Requests a worker answered between the last read and its death are not seen.

The verdict fails early as soon as failure is certain: the version no longer serves (nothing is
current, or the workers report another version: it crashed and was rolled back, or was replaced),
or ``min_requests`` were answered and the error rate is already over ``max_error_rate``. At the end:
too few requests fails unless ``pass_without_traffic``; a p99 over ``max_p99_latency_ms`` or an error
rate over ``max_error_rate`` fails. Pure: the deployer is only asked for ``worker_metrics``; the clock
and the sleep are parameters.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from platform_defs.policy import BakePolicy

PREDICTION_ROUTES = ("/predict", "/invocations")
REQUESTS = "onepath_requests_total"
LATENCY_BUCKET = "onepath_request_latency_seconds_bucket"
START_TIME = "onepath_process_start_time_seconds"
MODEL_INFO = "onepath_model_info"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (format 0.0.4). Comments and blank lines are
    skipped; a line that is not a sample raises ``ValueError`` naming its line number."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            raise ValueError(f"metrics line {n} is not a sample: {line[:120]!r}")
        labels: dict[str, str] = {}
        body = m.group(3) or ""
        pos = 0
        while pos < len(body):
            lm = _LABEL.match(body, pos)
            if not lm:
                raise ValueError(f"metrics line {n} has malformed labels: {line[:120]!r}")
            labels[lm.group(1)] = (lm.group(2).replace("\\\\", "\x00").replace('\\"', '"')
                                   .replace("\\n", "\n").replace("\x00", "\\"))
            pos = lm.end()
        try:
            value = float(m.group(4))  # float() reads +Inf, -Inf and NaN too
        except ValueError:
            raise ValueError(f"metrics line {n} has a value that is not a number: {line[:120]!r}") from None
        out.append(Sample(m.group(1), labels, value))
    return out


# --------------------------------------------------------------------------------------------
# One worker's counters


@dataclass
class Counters:
    """What one worker process has counted on the prediction routes since it started."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    started: float | None = None
    versions: set[str] = field(default_factory=set)

    @classmethod
    def from_text(cls, text: str) -> "Counters":
        c = cls()
        for s in parse_prometheus(text):
            if s.name == REQUESTS and s.labels.get("route") in PREDICTION_ROUTES:
                c.requests += s.value
                if s.labels.get("status", "").startswith("5"):
                    c.errors += s.value
            elif s.name == LATENCY_BUCKET and s.labels.get("route", PREDICTION_ROUTES[0]) in PREDICTION_ROUTES:
                le = float(s.labels.get("le", "+Inf"))
                c.buckets[le] = c.buckets.get(le, 0.0) + s.value
            elif s.name == START_TIME:
                c.started = s.value
            elif s.name == MODEL_INFO and "version" in s.labels:
                c.versions.add(s.labels["version"])
        return c

    def minus(self, base: "Counters") -> "Counters":
        return Counters(self.requests - base.requests, self.errors - base.errors,
                        {le: n - base.buckets.get(le, 0.0) for le, n in self.buckets.items()})

    def plus(self, other: "Counters") -> "Counters":
        les = set(self.buckets) | set(other.buckets)
        return Counters(self.requests + other.requests, self.errors + other.errors,
                        {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in les})

    def went_down(self, before: "Counters") -> bool:
        return (self.requests < before.requests or self.errors < before.errors
                or any(self.buckets.get(le, 0.0) < n for le, n in before.buckets.items()))


def p99_upper_bound(buckets: dict[float, float]) -> float | None:
    """The upper bound (seconds) of the bucket holding the 99th percentile of a cumulative histogram;
    ``inf`` when it is above the largest finite bucket; None when the histogram is empty."""
    if not buckets:
        return None
    total = buckets.get(math.inf, max(buckets.values()))
    if total <= 0:
        return None
    rank = math.ceil(0.99 * total)
    for le in sorted(buckets):
        if buckets[le] >= rank:
            return le
    return math.inf


class Tracker:
    """Deltas since the baseline across the workers of one version, surviving worker restarts."""

    def __init__(self) -> None:
        self.base: dict[int, Counters] = {}  # per position: the counters the window starts from
        self.last: dict[int, Counters] = {}  # per position: the counters last seen
        self.closed = Counters()  # what processes that are gone counted inside the window
        self.restarts = 0

    def observe(self, texts: list[str], baseline: bool = False) -> None:
        for i, text in enumerate(texts):
            if not text:
                continue  # that worker is being restarted: it is counted again once it answers
            now = Counters.from_text(text)
            last = self.last.get(i)
            if last is None:
                # seen for the first time: at the baseline it starts the window; later it is a worker
                # that was down at the baseline (or a new one), counted from its start
                self.base[i] = now if baseline else Counters(buckets={le: 0.0 for le in now.buckets})
            elif (now.started != last.started and now.started is not None) or now.went_down(last):
                self.closed = self.closed.plus(last.minus(self.base[i]))
                self.base[i] = Counters(buckets={le: 0.0 for le in now.buckets})
                self.restarts += 1
            self.last[i] = now

    def total(self) -> Counters:
        out = self.closed
        for i, last in self.last.items():
            out = out.plus(last.minus(self.base[i]))
        return out


# --------------------------------------------------------------------------------------------
# The verdict


@dataclass(frozen=True)
class BakeVerdict:
    passed: bool
    summary: str  # one line
    requests: int
    errors: int  # 5xx answers
    error_rate: float
    p99_ms: float | None  # upper bound of the bucket holding the 99th percentile; inf: above the largest
    seconds: float
    reason: str  # passed | passed_without_traffic | too_little_traffic | error_rate | p99_latency | not_serving
    version: str = ""
    worker_restarts: int = 0
    largest_bucket_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON (the ledger refuses NaN and infinity): an infinite p99 is ``None`` here, with
        ``p99_above_largest_bucket`` true."""
        d = asdict(self)
        above = self.p99_ms is not None and math.isinf(self.p99_ms)
        d["p99_above_largest_bucket"] = above
        if above:
            d["p99_ms"] = None
        return d

    @property
    def metadata(self) -> dict[str, Any]:
        """For ``dg.MaterializeResult``/``dg.AssetCheckResult`` metadata: plain JSON values only."""
        return {
            "bake_passed": self.passed, "bake_summary": self.summary, "bake_reason": self.reason,
            "bake_version": self.version, "bake_requests": self.requests, "bake_5xx": self.errors,
            "bake_error_rate": round(self.error_rate, 6), "bake_p99_latency_ms": _p99_text(self),
            "bake_seconds": round(self.seconds, 3), "bake_worker_restarts": self.worker_restarts,
        }


def _p99_text(v: BakeVerdict) -> str:
    if v.p99_ms is None:
        return "no requests"
    if math.isinf(v.p99_ms):
        return f"above {v.largest_bucket_ms:g} ms" if v.largest_bucket_ms else "above the largest bucket"
    return f"<= {v.p99_ms:g} ms"


def _version_problem(texts: list[str], version: str) -> str | None:
    if not texts:
        return f"version {version} no longer serves: no version is current (it crashed or was stopped)"
    seen: set[str] = set()
    for t in texts:
        if t:
            seen |= Counters.from_text(t).versions
    if seen and version not in seen:
        return f"version {version} no longer serves: the current workers serve version {', '.join(sorted(seen))}"
    return None


def evaluate(total: Counters, policy: BakePolicy, *, final: bool) -> tuple[bool | None, str, list[str]]:
    """(passed, reason, problems): passed is None while the bake is not over and failure not certain."""
    requests, errors = int(total.requests), int(total.errors)
    rate = errors / requests if requests else 0.0
    rate_bad = requests > 0 and rate > policy.max_error_rate
    if not final:
        if requests >= policy.min_requests and rate_bad:
            return False, "error_rate", [_rate_problem(errors, requests, policy)]
        return None, "", []
    problems: list[tuple[str, str]] = []
    if requests < policy.min_requests and not policy.pass_without_traffic:
        problems.append(("too_little_traffic", f"too little traffic: {requests} of {policy.min_requests} requests"))
    if rate_bad:
        problems.append(("error_rate", _rate_problem(errors, requests, policy)))
    p99 = p99_upper_bound(total.buckets)
    if p99 is not None and p99 * 1000 > policy.max_p99_latency_ms:
        shown = "above the largest bucket" if math.isinf(p99) else f"{p99 * 1000:g} ms"
        problems.append(("p99_latency", f"p99 latency {shown} over {policy.max_p99_latency_ms:g} ms"))
    if problems:
        return False, problems[0][0], [p for _, p in problems]
    if requests < policy.min_requests:
        return True, "passed_without_traffic", [
            f"too little traffic: {requests} of {policy.min_requests} requests, passed (pass_without_traffic)"]
    return True, "passed", []


def _rate_problem(errors: int, requests: int, policy: BakePolicy) -> str:
    return (f"error rate {errors / requests:.1%} ({errors} 5xx of {requests} requests) over "
            f"{policy.max_error_rate:.1%}")


def bake(deployer: Any, target: Any, version: str, policy: BakePolicy, *,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> BakeVerdict:
    """Watch ``version`` at ``target`` for ``policy.seconds`` and judge it (see the module docstring).

    Call it right after the switch: requests answered before the baseline are not counted."""
    version = str(version)
    label = f"{getattr(target, 'slot', target)}"
    t0 = clock()
    tracker = Tracker()
    texts = deployer.worker_metrics(target)
    gone = _version_problem(texts, version)
    tracker.observe(texts, baseline=True)
    passed: bool | None = None
    reason, problems = "", []
    if gone:
        passed, reason, problems = False, "not_serving", [gone]
    while passed is None:
        left = policy.seconds - (clock() - t0)
        if left <= 0:
            passed, reason, problems = evaluate(tracker.total(), policy, final=True)
            break
        sleep(min(policy.poll_seconds, left))
        texts = deployer.worker_metrics(target)
        gone = _version_problem(texts, version)
        if gone:
            passed, reason, problems = False, "not_serving", [gone]
            break
        tracker.observe(texts)
        passed, reason, problems = evaluate(tracker.total(), policy, final=False)
    return _verdict(label, version, tracker, policy, passed, reason, problems, clock() - t0)


def _verdict(label: str, version: str, tracker: Tracker, policy: BakePolicy, passed: bool, reason: str,
             problems: Iterable[str], seconds: float) -> BakeVerdict:
    total = tracker.total()
    requests, errors = int(total.requests), int(total.errors)
    p99 = p99_upper_bound(total.buckets)
    finite = [le for le in total.buckets if not math.isinf(le)]
    draft = BakeVerdict(
        passed=passed, summary="", requests=requests, errors=errors,
        error_rate=errors / requests if requests else 0.0, p99_ms=None if p99 is None else p99 * 1000,
        seconds=seconds, reason=reason, version=version, worker_restarts=tracker.restarts,
        largest_bucket_ms=max(finite) * 1000 if finite else None,
    )
    stats = (f"{requests} requests, {errors} 5xx ({draft.error_rate:.1%}), p99 {_p99_text(draft)} "
             f"in {seconds:.1f} of {policy.seconds:g} s")
    head = f"bake of {label} version {version} {'passed' if passed else 'failed'}"
    summary = f"{head}: {'; '.join(problems)} ({stats})" if problems else f"{head}: {stats}"
    return BakeVerdict(**{**asdict(draft), "summary": summary})


__all__ = ["BakeVerdict", "Sample", "bake", "evaluate", "p99_upper_bound", "parse_prometheus"]
