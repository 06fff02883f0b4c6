"""`onepath up` reloads the code location while the platform runs: a thread polls the declarations folder
and the policy file (names, sizes, mtimes: a stat each, no reads) about once a second, and on a change
that has settled asks the running webserver to reload the location through its public GraphQL mutation
``reloadRepositoryLocation``. A reload replaces the code server; the daemon's sensors and schedules keep
their state and keep ticking, and endpoints are separate processes that never notice.

One line per reload: ``reloaded: 7 declarations, 1 left out: declaration 'x' (...): ...``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable


def snapshot(paths: list[Path]) -> tuple:
    """What the watcher compares: every file under the folders (and the files) with its size and mtime."""
    out = []
    for root in paths:
        if root.is_file():
            st = root.stat()
            out.append((str(root), st.st_size, st.st_mtime_ns))
            continue
        if not root.is_dir():
            out.append((str(root), -1, -1))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            for f in sorted(filenames):
                if f.startswith(".") or f.endswith((".pyc", ".swp", "~")):
                    continue
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                out.append((p, st.st_size, st.st_mtime_ns))
    return tuple(out)


def summary_line(errors: list[str]) -> str:
    """``reloaded: N declarations, k left out: ...`` from a tolerant load in this process (the code server
    loads the same folder and policy), or the location's own error."""
    if errors:
        return "reload failed: " + "; ".join(errors)
    from platform_defs.loader import load_organisation
    from platform_defs.policy import PolicyError
    from platform_defs.specs import DeclarationError

    try:
        org = load_organisation(tolerant=True)
    except (DeclarationError, PolicyError) as err:
        return "reloaded, and the location does not load: " + str(err).splitlines()[0]
    lines = [str(p).splitlines()[0] for p in org.problems]
    return (f"reloaded: {len(org)} declarations" + (f", {len(lines)} left out: " + "; ".join(lines) if lines else ""))


class Watcher(threading.Thread):
    """Polls ``paths`` every ``interval`` seconds; a change that holds still for one more poll reloads."""

    def __init__(self, paths: list[Path], client, say: Callable[[str], None], interval: float = 1.0):
        super().__init__(name="onepath-reload", daemon=True)
        self.paths, self.client, self.say, self.interval = paths, client, say, interval
        self.stop = threading.Event()

    def run(self) -> None:
        seen = snapshot(self.paths)
        while not self.stop.wait(self.interval):
            try:
                now = snapshot(self.paths)
                if now == seen:
                    continue
                while not self.stop.wait(min(self.interval, 0.3)):  # an editor's save settles first
                    settled = snapshot(self.paths)
                    if settled == now:
                        break
                    now = settled
                seen = now
                started = time.monotonic()
                errors: list[str] = []
                try:
                    self.client.reload_location()  # instance_client.InstanceClient: reloadRepositoryLocation
                except Exception as err:  # PlatformNotRunning, InstanceError: one line each
                    errors.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
                self.say(f"{summary_line(errors)} ({time.monotonic() - started:.1f} s)")
            except Exception as err:  # the webserver may still be starting: say it, keep watching
                self.say(f"reload failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
