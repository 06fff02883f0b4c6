"""Run a getting-started guide (docs/guides/*.md) the way its reader would, so the guides cannot rot.

The format (shared by every guide):

- a ```console block holds commands the reader types, one a line starting with ``$ `` (a trailing ``\\``
  continues it on the next line); every other line is illustrative output, not checked. ``console refused``:
  each command is expected to be refused (exit non-zero, but not a usage error, a missing program or a
  traceback), for the reason the guide shows: every line the guide shows under the command must be a line the
  command printed, in the same order (within stdout, and within stderr), the first of them its first line (of
  stdout or of stderr), whitespace-normalised; ``...`` in a guide's line stands for anything, so a line of only
  ``...`` stands for any one line.
  ``console live``: the command needs the running platform (see LIVE below).
- a fenced block whose info string has ``file=PATH`` (```yaml file=assets/fraud/defs.yaml) is a file the reader
  writes, relative to the project; the runner writes it.
- a ```python block is code the reader runs in a notebook: the blocks of one guide run in one Jupyter kernel,
  in order, with the kernel's working directory the project.
- a command named only in prose (`inline code`) or a ```text block must be run by a block of the guide or be
  listed in RUN_ELSEWHERE (the test that runs it, or "NOT RUN"): ``unrun_commands``.
- a ```bash / ```sh / ```shell block is refused (a command goes in a console block, so that it is run); any
  other block (```yaml, ```text, ```json without ``file=``) is illustrative. ``python refused``: the block is
  expected to stop with onepath's one-line refusal (``onepath.NotebookError``), not any other exception, and the
  ```text block after it shows that refusal's line (``NotebookError: ...``, compared as for console blocks).

Everything is run in order, in a fresh copy of the example project with its own ``ONEPATH_HOME``, ``onepath``
on ``PATH`` and the working directory the project copy (tests/test_guides.py). A guide with a ``live`` block
runs whole on a running platform, by the test ``LIVE_GUIDES`` names for it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ROOT / "docs" / "guides"
FLAGS = {"refused", "live"}
SHELL_LANGS = {"bash", "sh", "shell", "zsh"}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>[^`]*)$")
# a refusal is the program saying no, not the shell or Click failing to run it
NOT_A_REFUSAL = {2: "a usage error (wrong flag or argument)", 126: "not executable", 127: "command not found"}


# A command a guide names in prose (`inline code`) or in a ```text block is not run by the guide's test. Each
# must be run by one of the guide's own blocks, or be listed here under the test that runs it, or under
# "NOT RUN" (tests/test_guides.py prints those, so the gap stays visible). An entry covers the commands it
# starts (`onepath up` covers `onepath up --no-mlflow-ui`).
RUN_ELSEWHERE: dict[str, tuple[str, ...]] = {
    # ./dev up by test_stopping_up_leaves_no_dagster_process; onepath up is the module's platform
    "tests/test_platform_up.py": ("./dev up", "onepath up"),
    "tests/test_graph.py": ("onepath down",),
    # test_policy_apply_change_witness_pins_the_witness_and_unpins_it_from_the_command_line
    "tests/test_witness.py": ("onepath witness serve", "onepath policy apply --change-witness"),
    "tests/test_approvals.py": ("onepath approve",),  # the verb, on a model version (data-scientist.md)
    "NOT RUN": (),  # none today
}
# A guide with a ``live`` block (it needs the running platform) runs whole, in order, on the platform of the test
# named here (tests/test_guides.py checks that the test exists); ``live_guide`` gives a test its guide.
LIVE_GUIDES: dict[str, str] = {
    "data-scientist.md": "tests/test_declarations_live.py::test_three_steps_from_a_jupyter_kernel_to_prod",
    "auditor.md": "tests/test_declarations_live.py::test_the_auditors_guide_on_what_the_data_scientist_promoted",
    "app-developer.md": "tests/test_platform_up.py::test_the_app_developers_guide_takes_loan_portal_to_prod",
}
PROSE_COMMAND = re.compile(r"^(?:\$ )?(?P<cmd>onepath [a-z][a-z-]*\b.*|\./dev\b.*)$")


class GuideError(Exception):
    """A guide that does not follow the format, or a step of it that did not do what the guide says."""


@dataclass
class Block:
    guide: Path
    line: int  # 1-based line of the opening fence
    lang: str
    flags: set[str]
    file: str | None
    body: str
    commands: list[str] = field(default_factory=list)
    shown: list[list[str]] = field(default_factory=list)  # per command: the output lines the guide shows

    @property
    def where(self) -> str:
        return f"{self.guide.name}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.file is not None or self.lang in ("console", "python")

    @property
    def live(self) -> bool:
        return "live" in self.flags


@dataclass
class Said:
    """What one command did: its exit status and what it printed, stdout and stderr apart."""

    cmd: str
    returncode: int
    stdout: str
    stderr: str

    @property
    def both(self) -> str:
        return self.stdout + self.stderr


def _norm(line: str) -> str:
    return " ".join(line.split())


def _first_line(text: str) -> str | None:
    return next((line for line in text.splitlines() if line.strip()), None)


def _matches(shown: str, printed: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in _norm(shown).split("..."))
    return re.fullmatch(pattern, _norm(printed)) is not None


def unshown(shown: list[str], stdout: str, stderr: str) -> str | None:
    """The first of the guide's lines ``shown`` that the command did not print, in order (the first one must be
    the first line of stdout or of stderr; each later one is looked for after the last one matched in the same
    stream: stdout and stderr are captured apart, so their interleaving is unknown); None when every line was
    printed."""
    streams = [[line for line in s.splitlines() if line.strip()] for s in (stdout, stderr)]
    at = [0, 0]
    for k, line in enumerate(shown):
        for n, lines in enumerate(streams):
            # the first line shown is the first the command printed (on stdout or on stderr)
            hit = next((i for i in range(at[n], len(lines) if k else min(1, len(lines))) if _matches(line, lines[i])),
                       None)
            if hit is not None:
                at[n] = hit + 1
                break
        else:
            return line
    return None


def _commands(body: str, where: str) -> tuple[list[str], list[list[str]]]:
    out: list[str] = []
    shown: list[list[str]] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            cmd = [line[2:]]
            while cmd[-1].endswith("\\"):
                i += 1
                if i >= len(lines):
                    raise GuideError(f"{where}: a command ends in '\\' with no line after it")
                cmd.append(lines[i])
            out.append("\n".join(cmd))
            shown.append([])
        elif out and line.strip():
            shown[-1].append(line)
        i += 1
    if not out:
        raise GuideError(f"{where}: a console block with no command (a command line starts with '$ ')")
    return out, shown


def parse(guide: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of ``guide``, in order; GuideError (naming file and line) for one off the format."""
    text = guide.read_text() if text is None else text
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent, fence = i + 1, len(m["indent"]), m["fence"]
        tokens = m["info"].split()
        where = f"{guide.name}:{start}"
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i])
            i += 1
        if i >= len(lines):
            raise GuideError(f"{where}: a fenced block that is never closed")
        i += 1
        lang = tokens[0] if tokens else ""
        file = None
        flags: set[str] = set()
        for tok in tokens[1:]:
            if tok.startswith("file="):
                file = tok[len("file="):]
            elif tok in FLAGS:
                flags.add(tok)
            else:
                raise GuideError(f"{where}: unknown word '{tok}' in the info string (known: file=PATH, "
                                 f"{', '.join(sorted(FLAGS))})")
        if lang in SHELL_LANGS:
            raise GuideError(f"{where}: a ```{lang} block: a command the reader types goes in a ```console block "
                             f"('$ ' before it), so that the guide's test runs it")
        if flags and lang not in ("console", "python"):
            raise GuideError(f"{where}: '{' '.join(sorted(flags))}' only applies to console or python blocks")
        text_body = textwrap.dedent("\n".join(line[indent:] if line[:indent].strip() == "" else line
                                              for line in body))
        block = Block(guide, start, lang, flags, file, text_body + ("\n" if text_body else ""))
        if file is None and lang == "console":
            block.commands, block.shown = _commands(text_body, where)
        blocks.append(block)
    for n, block in enumerate(blocks):
        if block.lang == "python" and "refused" in block.flags:
            after = blocks[n + 1] if n + 1 < len(blocks) else None
            if after is None or after.lang != "text" or _first_line(after.body) is None:
                raise GuideError(f"{block.where}: a python refused block needs a ```text block after it showing "
                                 f"the refusal's line (NotebookError: ...)")
            block.shown = [[_first_line(after.body)]]
    return blocks


def unrun_commands(guide: Path, text: str | None = None) -> list[str]:
    """``guide:line: `command` `` for each command named in prose or a ```text block that none of the guide's
    blocks runs and RUN_ELSEWHERE does not list: a command the reader is told to type that no test types."""
    text = guide.read_text() if text is None else text
    blocks = parse(guide, text)
    ran = [c for b in blocks for c in b.commands]
    listed = [c for cmds in RUN_ELSEWHERE.values() for c in cmds]
    out: list[str] = []
    fence: str | None = None
    lang = ""
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence, lang = m["fence"], (m["info"].split() or [""])[0]
            continue
        if fence is not None:
            if line.strip() == fence:
                fence = None
                continue
            named = [line.strip()] if lang == "text" else []
        else:
            named = [span.strip() for span in re.findall(r"`([^`]+)`", line)]
        for cmd in (PROSE_COMMAND.match(x)["cmd"] for x in named if PROSE_COMMAND.match(x)):
            if any(c == cmd or c.startswith(cmd + " ") for c in ran):
                continue  # the guide's own blocks run it
            if any(cmd == c or cmd.startswith(c + " ") for c in listed):
                continue
            out.append(f"{guide.name}:{n}: `{cmd}`")
    return out


def not_run() -> list[str]:
    """The commands the guides name that no test runs (RUN_ELSEWHERE["NOT RUN"])."""
    return list(RUN_ELSEWHERE["NOT RUN"])


def live_guide(test: str) -> Path:
    """The guide that the test named ``test`` (its function's name) runs live (LIVE_GUIDES)."""
    (name,) = [g for g, t in LIVE_GUIDES.items() if t.endswith(f"::{test}")]
    return GUIDES / name


def discover() -> list[Path]:
    return sorted(GUIDES.glob("*.md"))


def project_copy(dest: Path) -> Path:
    """A fresh copy of the example project: declarations folder and policy (assets/), apps, the project file."""
    dest.mkdir(parents=True)
    for name in ("assets", "apps"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "workspace.yaml"):
        shutil.copy2(ROOT / name, dest / name)
    return dest


def guide_env(project: Path, home: Path, **extra: str) -> dict[str, str]:
    """The reader's environment: ``onepath`` on PATH, their own ONEPATH_HOME, the project's declarations and
    policy (nothing of the developer's own environment that names another home or MLflow)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ONEPATH_", "MLFLOW_", "DAGSTER_")) and k != "PYTEST_CURRENT_TEST"}
    env.update({"ONEPATH_HOME": str(home), "ONEPATH_DECLARATIONS_DIR": str(project / "assets"),
                "ONEPATH_POLICY_FILE": str(project / "assets" / "policy.yaml"),
                # the project's own packages (assets/, apps/: what a guide writes there) before onepath's
                "PYTHONPATH": f"{project}{os.pathsep}{ROOT}",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    env.update(extra)
    return env


class Session:
    """One reader going through guides: a project folder, an environment, and (on first python block) a
    Jupyter kernel whose state carries from block to block."""

    def __init__(self, project: Path, env: dict[str, str], timeout: float = 900):
        self.project, self.env, self.timeout = project, env, timeout
        self.km: Any = None
        self.kc: Any = None
        self.log: list[str] = []
        self.timings: list[tuple[str, float]] = []  # (where, seconds) per block run: what a guide costs CI

    # -- the three kinds of step
    def write(self, block: Block) -> None:
        rel = Path(block.file or "")
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise GuideError(f"{block.where}: file={block.file} must be a path inside the project")
        path = self.project / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.body)

    def console(self, block: Block) -> list[Said]:
        outputs = []
        for cmd, expected in zip(block.commands, block.shown):
            p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", cmd], cwd=self.project, env=self.env,
                               text=True, capture_output=True, timeout=self.timeout, check=False)
            said = p.stdout + p.stderr
            self.log.append(f"$ {cmd}\n{said}")
            shown = f"{block.where}: `{cmd}` exited {p.returncode}"
            if "Traceback (most recent call last)" in said:
                raise GuideError(f"{shown} with a traceback:\n{said[-4000:]}")
            if "refused" in block.flags:
                if p.returncode == 0:
                    raise GuideError(f"{shown}; the guide says it is refused:\n{said[-4000:]}")
                if p.returncode in NOT_A_REFUSAL:
                    raise GuideError(f"{shown}, {NOT_A_REFUSAL[p.returncode]}, not a refusal:\n{said[-4000:]}")
                if not expected:
                    raise GuideError(f"{shown}: a refused command needs what it prints (its reason) shown under it")
                missing = unshown(expected, p.stdout, p.stderr)
                if missing is not None:
                    raise GuideError(f"{shown}, refused for another reason than the guide shows: it did not print "
                                     f"{missing!r} (after the lines before it):\n{said[-4000:]}")
            elif p.returncode != 0:
                raise GuideError(f"{shown}:\n{said[-4000:]}")
            outputs.append(Said(cmd, p.returncode, p.stdout, p.stderr))
        return outputs

    def python(self, block: Block) -> str:
        if self.kc is None:
            from jupyter_client import KernelManager

            self.km = KernelManager(kernel_name="python3")
            self.km.start_kernel(cwd=str(self.project), env=self.env)
            self.kc = self.km.client()
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=120)
        out: list[str] = []

        def hook(msg: dict) -> None:
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                out.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                out.append("\n".join(content["traceback"]))

        reply = self.kc.execute_interactive(block.body, timeout=self.timeout, output_hook=hook)
        said = re.sub(r"\x1b\[[0-9;]*m", "", "".join(out))
        self.log.append(f">>> {block.where}\n{said}")
        content = reply["content"]
        if "refused" in block.flags:
            if content["status"] == "ok":
                raise GuideError(f"{block.where}: the python block ran; the guide says it is refused:\n{said[-4000:]}")
            if content.get("ename") != "NotebookError":
                raise GuideError(f"{block.where}: the python block failed with {content.get('ename')}, not onepath's "
                                 f"refusal (NotebookError):\n{said[-4000:]}")
            refusal = f"{content.get('ename')}: {content.get('evalue', '')}"
            if unshown(block.shown[0], refusal, "") is not None:
                raise GuideError(f"{block.where}: refused for another reason than the guide shows "
                                 f"({block.shown[0][0]!r}):\n{refusal[-4000:]}")
        elif content["status"] != "ok":
            raise GuideError(f"{block.where}: the python block failed:\n{said[-4000:]}")
        return said

    def run(self, block: Block) -> Any:
        started = time.monotonic()
        try:
            if block.file is not None:
                return self.write(block)
            if block.lang == "console":
                return self.console(block)
            if block.lang == "python":
                return self.python(block)
            return None
        finally:
            if block.runs:
                self.timings.append((block.where, time.monotonic() - started))

    def report(self) -> str:
        return "\n".join(f"{t:6.1f} s  {where}" for where, t in self.timings)

    def run_guide(self, guide: Path, live_ok: bool = False) -> None:
        for block in parse(guide):
            if block.live and not live_ok:
                raise GuideError(f"{block.where}: a live block, and this run has no platform running")
            self.run(block)

    def close(self) -> None:
        if self.kc is not None:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)
            self.kc = self.km = None
