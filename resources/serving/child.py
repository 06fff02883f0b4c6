"""Run an ASGI app on sockets handed down by the supervisor.

The supervisor passes listening sockets as inherited file descriptors named in
``ONEPATH_LISTEN_FDS`` (the shared stable TCP socket, then this process's private health socket: a
Unix socket in the slot's owner-only private directory, which only the supervisor talks to). All
processes of an environment accept from the same stable socket, and an old version drains by
closing only its own copy: no connection waiting in the queue is lost. A child given both sockets
serves only the private one until the supervisor activates it (``Activation``: ``POST
protocol.ACTIVATE_ROUTE`` on the private socket, at promote): a candidate takes no client
connection before it is promoted. A child given one socket serves it at once. A child whose
supervisor has gone keeps serving: it offers its stable socket to the next supervisor of the slot
(``offer_handoff``), which adopts it.

Draining (on SIGTERM or SIGINT) drops no request, also on keep-alive connections:

1. the process closes its listening sockets at once, so every new connection reaches the new
   version (the supervisor's promote waits for exactly this);
2. it keeps answering requests that arrive on the connections it already has, each with
   ``connection: close``, so the client sends its next request on a new connection;
3. a connection that brings no request within ``ONEPATH_DRAIN_IDLE_SECONDS`` (default 1) of the
   drain's start is closed (uvicorn's own shutdown would close idle keep-alive connections at
   once, and a client sending on one at that instant would get a reset);
4. the process exits when no connection is left, or when the drain budget
   (``ONEPATH_DRAIN_SECONDS``, default 30, less a small margin so it ends before the supervisor's
   SIGKILL) is spent.

Step 2 is an ASGI middleware around the app (apps are arbitrary ASGI apps); the rest is uvicorn's
public ``Server`` with its shutdown preceded by steps 1 and 3.

``python -m resources.serving.child --app-dir DIR --app module:attr`` serves an app release.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

DRAIN_SECONDS_DEFAULT = 30.0
IDLE_GRACE_DEFAULT = 1.0


def inherited_sockets() -> list[socket.socket]:
    fds = os.environ.get("ONEPATH_LISTEN_FDS", "")
    if not fds:
        raise SystemExit("ONEPATH_LISTEN_FDS is not set: this process is started by the onepath supervisor")
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",")]


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise SystemExit(f"{name}={raw!r} must not be negative")
    return value


class Drain:
    """Whether (and since when) this process drains; the response wrapper reads it per response."""

    def __init__(self) -> None:
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None


def close_when_draining(app: Any, drain: Drain) -> Callable:
    """ASGI middleware: while ``drain`` is active, every HTTP response carries ``connection: close``
    (replacing any ``connection`` header of the app's), so the server closes the connection after
    the response and the client opens a new one, which reaches the new version. Other scopes
    (lifespan, websocket) pass through untouched."""

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_closing(message: dict) -> None:
            if drain.since is not None and message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"connection"]
                headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_closing)

    return wrapped


class Activation:
    """The stable socket this process accepts on only once the supervisor says so (``activate``).

    A worker starts serving its private health socket alone: a candidate must not take a single
    client connection before it is promoted (an interrupted deploy would leave it answering). On
    promote the supervisor POSTs ``protocol.ACTIVATE_ROUTE`` on the private socket; the worker then
    accepts on the inherited stable socket too and answers 200, the acknowledgement the supervisor
    waits for before it drains the old version."""

    def __init__(self, stable: socket.socket | None):
        self.stable = stable
        self.server: Any = None  # the DrainingServer, set once it exists
        self.active = stable is None  # nothing to activate: a process serving one socket serves it at once

    async def activate(self) -> tuple[int, str]:
        server = self.server
        if server is None or not server.started:
            return 503, "not started yet"
        if server.onepath_drain.active or server.should_exit:
            return 409, "this worker is draining: it accepts no new connections"
        if not self.active:
            loop = asyncio.get_running_loop()
            listener = await loop.create_server(server.onepath_protocol, sock=self.stable,
                                                backlog=server.config.backlog)
            server.servers.append(listener)  # closed with the others when the drain begins
            self.active = True
        return 200, "active"


def serve_activation(app: Any, activation: Activation) -> Callable:
    """ASGI middleware: ``POST protocol.ACTIVATE_ROUTE`` on the private Unix socket (where ASGI's
    ``scope["server"]`` is ``[path, None]`` or None, never a host and port) activates the stable
    socket; everything else goes to ``app``. On the stable TCP socket the route is the app's like any
    other path."""
    from resources.serving.protocol import ACTIVATE_ROUTE

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != ACTIVATE_ROUTE:
            await app(scope, receive, send)
            return
        server = scope.get("server")
        if server is not None and server[1] is not None:  # a TCP connection: not ours to answer
            await app(scope, receive, send)
            return
        if scope["method"] != "POST":
            status, why = 405, "POST only"
        else:
            status, why = await activation.activate()
        body = ('{"active": %s, "pid": %d, "detail": "%s"}'
                % ("true" if activation.active else "false", os.getpid(), why)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _draining_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's ``Server`` whose shutdown first stops accepting and lets keep-alive clients
        move (see the module docstring); the rest of the shutdown is uvicorn's own."""

        def __init__(self, config: Any, drain: Drain, budget: float, idle_grace: float):
            super().__init__(config)
            self.onepath_drain = drain
            self.onepath_budget = budget
            self.onepath_idle_grace = min(idle_grace, budget)
            self.onepath_loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self.onepath_loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def onepath_protocol(self, _loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            """A connection's protocol, made as uvicorn's ``startup`` makes it for its own listeners
            (uvicorn has no public call to add a listener to a running server)."""
            return self.config.http_protocol_class(config=self.config, server_state=self.server_state,
                                                   app_state=self.lifespan.state, _loop=_loop)

        def stop_soon(self) -> None:
            """Begin the drain now (from any thread): uvicorn itself notices ``should_exit`` only on
            its next 0.1 s tick, and until then the process would still accept connections."""
            self.should_exit = True
            loop = self.onepath_loop
            if self.started and loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self.begin_drain)
                except RuntimeError:  # the loop closed in between: the process is ending anyway
                    pass

        def handle_exit(self, sig: int, frame: Any) -> None:  # the signal handler uvicorn installs
            super().handle_exit(sig, frame)
            self.stop_soon()

        def begin_drain(self) -> None:
            if self.onepath_drain.active:
                return
            self.onepath_drain.since = time.monotonic()
            for server in self.servers:  # closes the listening fds on the loop's next iteration
                server.close()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            self.begin_drain()
            since = self.onepath_drain.since or time.monotonic()
            # every connection that brings a request is answered with connection: close and goes;
            # wait for that while connections are left, for at most the idle grace
            idle_end = since + self.onepath_idle_grace
            while self.server_state.connections and time.monotonic() < idle_end and not self.force_exit:
                await asyncio.sleep(0.01)
            # uvicorn's shutdown: close the idle connections left, let the busy ones finish (they
            # close after their response) within what is left of the budget, then the lifespan
            self.config.timeout_graceful_shutdown = max(0.0, since + self.onepath_budget - time.monotonic())
            await super().shutdown(sockets=sockets)

    return DrainingServer


def serve(app: Any) -> None:
    import uvicorn

    sockets = inherited_sockets()
    stable = sockets[0]
    # [stable, private]: serve the private one now, the stable one once activated (Activation)
    activation = Activation(stable if len(sockets) > 1 else None)
    if activation.stable is not None:
        sockets = sockets[1:]
    from resources.serving.http_limits import protocol_for  # header/URL limits, read timeouts

    protocol = protocol_for(app)  # the app's own limits and response counting (before any wrapper)
    app = serve_activation(app, activation)
    drain_seconds = _seconds("ONEPATH_DRAIN_SECONDS", DRAIN_SECONDS_DEFAULT)
    # end before the supervisor's SIGKILL at the same deadline, with the lifespan shutdown done
    budget = max(0.0, drain_seconds - min(0.5, drain_seconds * 0.1))
    drain = Drain()
    config = uvicorn.Config(
        close_when_draining(app, drain), lifespan="on", access_log=False, log_level="warning",
        loop="uvloop", http=protocol, timeout_graceful_shutdown=budget, timeout_keep_alive=5,
        proxy_headers=False,  # nothing is proxied to a worker: a local peer cannot claim another address
    )
    server = _draining_server_class()(config, drain, budget,
                                      _seconds("ONEPATH_DRAIN_IDLE_SECONDS", IDLE_GRACE_DEFAULT))
    activation.server = server
    offer_handoff(stable, drain)
    server.run(sockets=sockets)


def offer_handoff(stable: socket.socket, drain: Drain) -> None:
    """Offer ``stable`` to a new supervisor of the slot on the handoff socket the supervisor passed
    down (``ONEPATH_HANDOFF_FD``; ``resources.serving.protocol.offer_listening_socket``), so that a
    supervisor that died is replaced without the address ever closing. Only while not draining, and
    only the socket this process inherited (checked by inode: once uvicorn closed it on a drain, the
    fd number may name something else). Without a handoff fd or a readable secret nothing is offered:
    the worker serves all the same, and a new supervisor that cannot adopt it starts afresh."""
    raw, slot_dir = os.environ.get("ONEPATH_HANDOFF_FD", ""), os.environ.get("ONEPATH_SLOT_DIR", "")
    if not raw or not slot_dir:
        return
    listener = socket.socket(fileno=int(raw))
    fd, inode = stable.fileno(), os.fstat(stable.fileno()).st_ino

    def current_fd() -> int | None:
        if drain.active:
            return None
        try:
            return fd if os.fstat(fd).st_ino == inode else None
        except OSError:
            return None

    def run() -> None:  # in its thread: the protocol module (and its HTTP client) stays off the start path
        from resources.serving import protocol

        try:
            secret = protocol.read_secret(slot_dir)
        except protocol.ControlError as err:
            print(f"onepath worker: no socket handoff: {err}", file=sys.stderr)
            listener.close()
            return
        protocol.offer_listening_socket(listener, secret, current_fd)

    threading.Thread(target=run, name="onepath-handoff", daemon=True).start()


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
