"""Run an ASGI app on sockets handed down by the supervisor.

The supervisor passes listening sockets as inherited file descriptors named in
``ONEPATH_LISTEN_FDS`` (the shared stable socket, then this process's private health socket). All
processes of an environment accept from the same stable socket, so a new version starts taking
connections the moment it listens and an old one drains by closing only its own copy: no
connection waiting in the queue is lost. A child whose supervisor has gone stops by itself.

``python -m resources.serving.child --app-dir DIR --app module:attr`` serves an app release.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
import threading
import time
from typing import Any


def inherited_sockets() -> list[socket.socket]:
    fds = os.environ.get("ONEPATH_LISTEN_FDS", "")
    if not fds:
        raise SystemExit("ONEPATH_LISTEN_FDS is not set: this process is started by the onepath supervisor")
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",")]


def serve(app: Any) -> None:
    import uvicorn

    sockets = inherited_sockets()
    config = uvicorn.Config(
        app, lifespan="on", access_log=False, log_level="warning", loop="uvloop", http="httptools",
        timeout_graceful_shutdown=float(os.environ.get("ONEPATH_DRAIN_SECONDS", "30")),
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    parent = os.getppid()

    def watch_parent() -> None:
        while not server.should_exit:
            if os.getppid() != parent:
                server.should_exit = True
                return
            time.sleep(0.5)

    threading.Thread(target=watch_parent, daemon=True).start()
    server.run(sockets=sockets)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m resources.serving.child")
    ap.add_argument("--app-dir", required=True)
    ap.add_argument("--app", required=True, help="module:attribute of the ASGI app")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.app_dir)
    module, attr = args.app.split(":")
    try:
        app = getattr(importlib.import_module(module), attr)
    except Exception as err:
        print(f"onepath: cannot load app {args.app} from {args.app_dir}: {type(err).__name__}: {err}",
              file=sys.stderr)
        raise SystemExit(3) from None
    serve(app)


if __name__ == "__main__":
    main()
