"""Security scan of a source folder with the real tools: bandit (code) and detect-secrets (secrets).

``scan_source(path)`` lists the files under ``path`` once (skipping ``__pycache__`` and hidden
directories; hidden *files* such as ``.env`` are scanned, that is where secrets live), then runs

- ``python -m bandit -f json -q <the .py files>`` and
- ``python -m detect_secrets scan --all-files <all the files>``

with ``cwd=path``, so every finding names its file relative to ``path``. Exit code 1 from bandit
only means "findings"; what decides is the JSON each tool prints.

Verdict: a bandit finding at or above ``fail_on`` severity (``low`` < ``medium`` < ``high``) fails,
and so does **any** detected secret. Findings below the bar are reported, not blocking.

Fail closed: a tool that crashes, times out, prints something that is not its JSON report, or
could not parse a file (bandit lists such files under ``errors``) fails the scan with a summary
naming the tool and the tail of its stderr. An unscanned file never passes silently.

Files are passed to the tools explicitly instead of ``bandit -r .``: with ``-r`` bandit looks for
a ``.bandit`` file inside the scanned tree and takes its ``skips`` and ``exclude``, so the code
under review could switch its own scanner off. Inline ``# nosec`` and
``pragma: allowlist secret`` markers are honoured (they are reviewed like code) and counted in
the result and its summary.

Pure: no Dagster, no MLflow. Subprocesses only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

SEVERITIES = ("low", "medium", "high")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}
STDERR_TAIL_CHARS = 600
_CHUNK = 500  # files per tool invocation (keeps argv far below the OS limit)


@dataclass(frozen=True)
class Finding:
    tool: str  # "bandit" | "detect-secrets"
    file: str  # relative to the scanned folder, "/"-separated
    line: int
    severity: str  # "LOW" | "MEDIUM" | "HIGH" (every secret is HIGH)
    rule: str  # bandit test id (B602) or detect-secrets secret type ("AWS Access Key")
    message: str
    confidence: str | None = None
    blocking: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class ToolRun:
    tool: str
    command: list[str]
    returncode: int | None
    seconds: float
    files: int
    error: str | None = None  # why this tool's result cannot be trusted; None when it can


@dataclass(frozen=True)
class ScanResult:
    passed: bool
    summary: str
    path: Path
    fail_on: str
    findings: list[Finding]
    files_scanned: list[str]
    python_files: int
    tools: list[ToolRun]
    suppressed: dict[str, int] = field(default_factory=dict)  # "nosec" / "allowlist" -> count
    seconds: float = 0.0

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    @property
    def errors(self) -> list[str]:
        return [f"{t.tool}: {t.error}" for t in self.tools if t.error]

    def records(self) -> list[dict[str, Any]]:
        """Findings as plain records (for a metadata table), blocking ones first."""
        return [f.as_dict() for f in sorted(self.findings, key=lambda f: (not f.blocking, f.file, f.line, f.rule))]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["errors"] = self.errors
        return d

    def to_markdown(self) -> str:
        lines = [f"**Security scan: {'PASSED' if self.passed else 'FAILED'}**: {self.summary}", ""]
        if self.findings:
            lines += ["| blocking | tool | file:line | severity | rule | message |", "|---|---|---|---|---|---|"]
            for r in self.records():
                msg = str(r["message"]).replace("|", "\\|")
                lines.append(f"| {'yes' if r['blocking'] else 'no'} | {r['tool']} | {r['file']}:{r['line']} | "
                             f"{r['severity']} | {r['rule']} | {msg} |")
        return "\n".join(lines) + "\n"


def scan_source(
    path: Path,
    *,
    fail_on: str = "high",
    python: str | Sequence[str] | None = None,
    timeout_s: float = 300.0,
) -> ScanResult:
    """Scan the folder ``path``; see the module docstring for what passes.

    ``python`` is the interpreter (or command prefix) that runs the tools, ``sys.executable`` by
    default; point it at a dedicated tools environment to keep the scanners apart from the app.
    """
    fail_on = str(fail_on).lower()
    if fail_on not in _RANK:
        raise ValueError(f"fail_on must be one of {', '.join(SEVERITIES)}, got {fail_on!r}")
    root = Path(path)
    started = time.perf_counter()
    if not root.is_dir():
        return ScanResult(False, f"cannot scan {root}: not a directory", root, fail_on, [], [], 0, [],
                          seconds=time.perf_counter() - started)
    root = root.resolve()
    prefix = [python] if isinstance(python, str) else list(python) if python else [sys.executable]
    files = _list_files(root)
    py_files = [f for f in files if f.endswith(".py")]

    findings: list[Finding] = []
    tools: list[ToolRun] = []
    suppressed = {"nosec": 0, "allowlist": _count_allowlisted(root, files)}

    # bandit
    if py_files:
        run, bandit_findings, nosec = _bandit(prefix, root, py_files, fail_on, timeout_s)
        tools.append(run)
        findings += bandit_findings
        suppressed["nosec"] = nosec
    else:
        tools.append(ToolRun("bandit", [], None, 0.0, 0))  # nothing to analyse; not an error
    # detect-secrets
    if files:
        run, secret_findings = _detect_secrets(prefix, root, files, timeout_s)
        tools.append(run)
        findings += secret_findings
    else:
        tools.append(ToolRun("detect-secrets", [], None, 0.0, 0))

    findings.sort(key=lambda f: (f.file, f.line, f.tool, f.rule))
    errors = [t for t in tools if t.error]
    blocking = [f for f in findings if f.blocking]
    passed = not errors and not blocking
    seconds = time.perf_counter() - started
    return ScanResult(
        passed=passed,
        summary=_summary(root, files, py_files, findings, blocking, errors, suppressed, fail_on, seconds),
        path=root, fail_on=fail_on, findings=findings, files_scanned=files, python_files=len(py_files),
        tools=tools, suppressed=suppressed, seconds=seconds,
    )


def _list_files(root: Path) -> list[str]:
    """Regular files under ``root``, relative and sorted; no ``__pycache__``, no hidden directories,
    no symlinks (a link could point outside the folder under review)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                             and not os.path.islink(os.path.join(dirpath, d)))
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            out.append(Path(os.path.relpath(full, root)).as_posix())
    return sorted(out)


def _run(cmd: list[str], cwd: Path, timeout_s: float) -> tuple[subprocess.CompletedProcess | None, str | None]:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    except OSError as e:
        return None, f"could not start {cmd[0]!r}: {e}"
    return proc, None


def _tail(text: str | None) -> str:
    t = (text or "").strip()
    return ("..." + t[-STDERR_TAIL_CHARS:]) if len(t) > STDERR_TAIL_CHARS else (t or "(no stderr)")


def _parse_json(proc: subprocess.CompletedProcess, ok_codes: tuple[int, ...]) -> tuple[Any, str | None]:
    if proc.returncode not in ok_codes:
        return None, f"exited with {proc.returncode}: {_tail(proc.stderr)}"
    try:
        return json.loads(proc.stdout), None
    except ValueError:
        return None, (f"exited with {proc.returncode} without a JSON report: "
                      f"{_tail(proc.stderr) if proc.stderr.strip() else _tail(proc.stdout)}")


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)] or [[]]


def _bandit(prefix: list[str], root: Path, py_files: list[str], fail_on: str,
            timeout_s: float) -> tuple[ToolRun, list[Finding], int]:
    findings: list[Finding] = []
    problems: list[str] = []
    nosec = 0
    t0 = time.perf_counter()
    base = [*prefix, "-m", "bandit", "-f", "json", "-q"]
    shown = base + ["--", f"<{len(py_files)} files>"]
    rc: int | None = None
    bar = _RANK[fail_on]
    for chunk in _chunks(py_files):
        proc, err = _run([*base, "--", *chunk], root, timeout_s)
        if err is None:
            rc = proc.returncode
            data, err = _parse_json(proc, (0, 1))  # 1 = "issues found"
        if err is None and (not isinstance(data, dict) or not isinstance(data.get("results"), list)):
            err = f"unexpected report shape: {_tail(proc.stdout)}"
        if err is not None:  # the tool itself failed: nothing it said can be trusted
            return ToolRun("bandit", shown, rc, time.perf_counter() - t0, len(py_files), err), findings, nosec
        for r in data["results"]:
            sev = str(r.get("issue_severity", "UNDEFINED")).upper()
            findings.append(Finding(
                tool="bandit", file=_rel(r.get("filename", "?")), line=int(r.get("line_number") or 0),
                severity=sev, rule=str(r.get("test_id", "?")),
                message=f"{r.get('test_name', '')}: {r.get('issue_text', '')}".strip(": "),
                confidence=str(r.get("issue_confidence", "")).upper() or None,
                blocking=_RANK.get(sev.lower(), -1) >= bar,
            ))
        totals = (data.get("metrics") or {}).get("_totals") or {}
        # bare "# nosec" counts as nosec, "# nosec B602" as skipped_tests
        nosec += int(totals.get("nosec", 0) or 0) + int(totals.get("skipped_tests", 0) or 0)
        # files bandit could not analyse (syntax error, unreadable): not scanned means not passed
        problems += [f"{_rel(e.get('filename', '?'))}: {e.get('reason', '?')}" for e in data.get("errors") or []]
    error = ("could not scan " + "; ".join(problems)) if problems else None
    return ToolRun("bandit", shown, rc, time.perf_counter() - t0, len(py_files), error), findings, nosec


def _detect_secrets(prefix: list[str], root: Path, files: list[str], timeout_s: float) -> tuple[ToolRun, list[Finding]]:
    findings: list[Finding] = []
    t0 = time.perf_counter()
    base = [*prefix, "-m", "detect_secrets", "scan", "--all-files"]
    rc: int | None = None
    for chunk in _chunks(files):
        proc, err = _run([*base, "--", *chunk], root, timeout_s)
        if err is None:
            rc = proc.returncode
            data, err = _parse_json(proc, (0,))
        if err is None and (not isinstance(data, dict) or not isinstance(data.get("results"), dict)):
            err = f"unexpected report shape: {_tail(proc.stdout)}"
        if err is not None:
            return ToolRun("detect-secrets", base + ["--", f"<{len(files)} files>"], rc,
                           time.perf_counter() - t0, len(files), err), findings
        for fname, secrets in data["results"].items():
            for s in secrets:
                findings.append(Finding(
                    tool="detect-secrets", file=_rel(s.get("filename", fname)), line=int(s.get("line_number") or 0),
                    severity="HIGH", rule=str(s.get("type", "secret")),
                    message=f"possible {s.get('type', 'secret')} (sha1 {str(s.get('hashed_secret', ''))[:12]})",
                    confidence=None, blocking=True,
                ))
    return ToolRun("detect-secrets", base + ["--", f"<{len(files)} files>"], rc, time.perf_counter() - t0,
                   len(files)), findings


def _count_allowlisted(root: Path, files: list[str]) -> int:
    n = 0
    for f in files:
        try:
            with open(root / f, "rb") as fh:
                n += fh.read().count(b"pragma: allowlist")
        except OSError:
            pass
    return n


def _rel(name: str) -> str:
    name = str(name).replace(os.sep, "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _summary(root: Path, files: list[str], py_files: list[str], findings: list[Finding], blocking: list[Finding],
             errors: list[ToolRun], suppressed: dict[str, int], fail_on: str, seconds: float) -> str:
    scope = f"{len(files)} files ({len(py_files)} Python) in {seconds:.1f} s"
    extra = []
    nonblocking = len(findings) - len(blocking)
    if nonblocking:
        extra.append(f"{nonblocking} below the bar")
    if suppressed.get("nosec"):
        extra.append(f"{suppressed['nosec']} suppressed by nosec")
    if suppressed.get("allowlist"):
        extra.append(f"{suppressed['allowlist']} allowlist pragma(s)")
    tail = f"; {', '.join(extra)}" if extra else ""
    if errors:
        head = "; ".join(f"{t.tool} failed: {t.error}" for t in errors)
        found = f"; {len(blocking)} blocking finding(s) from the tools that ran" if blocking else ""
        return f"{head}{found}; {scope}{tail}"
    if blocking:
        shown = ", ".join(f"{f.tool} {f.rule} at {f.where()}" for f in blocking[:5])
        more = f" (+{len(blocking) - 5} more)" if len(blocking) > 5 else ""
        return f"{len(blocking)} blocking finding(s) (fail_on={fail_on}, any secret): {shown}{more}; {scope}{tail}"
    return f"clean: no bandit finding at {fail_on} or above, no secrets; {scope}{tail}"
