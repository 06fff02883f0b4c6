"""HTTP-level limits for every onepath worker (model servers and app releases alike).

uvicorn's httptools protocol has no limit on the size or number of request headers or on the URL's
length, and no read timeout at all: a client that opens a connection and sends nothing, stops in
the middle of its headers, or sends part of a body and stalls holds the connection (and, for a
body, its task and buffers) for as long as it likes. ``LimitedHttpToolsProtocol`` is uvicorn's own
``HttpToolsProtocol`` (passed as ``http=`` to ``uvicorn.Config``, which takes a protocol class) with
exactly these additions, each answered at once with a JSON error and ``connection: close``:

- URL longer than ``max_url_bytes``: 414; more than ``max_headers`` header fields, or headers
  (names + values) larger than ``max_header_bytes`` in all: 431; a request the parser refuses: 400
  (JSON instead of uvicorn's plain text);
- headers that do not arrive within ``header_timeout`` seconds of the request's first byte (or a
  fresh connection that sends no byte within it): 408, or a silent close when nothing was sent;
- a body that brings no byte for ``body_timeout`` seconds, or is not complete ``body_deadline``
  seconds after its headers: 408 (not while uvicorn itself has paused reading because the app has
  not consumed what it got: that is not the client's stall).

Keep-alive idleness between requests stays uvicorn's ``timeout_keep_alive``. One timer per
connection at most, armed at the end of ``data_received`` only while a request is incomplete, and
the size limits are checked once per request when its headers are complete (a head still arriving
is bounded per read), never per header: a request that arrives in one read costs a few attribute
writes and three comparisons. Limits on the body's size, rows and
JSON depth belong to the app (the model server checks them before scoring).

An app may count what the protocol answers: if it has a callable attribute
``onepath_protocol_response(path, status)`` (``path`` is the request's path, or None when the URL
was not read), it is called for every response sent here, so what its metrics count is what
clients saw. ``protocol_for(app)`` builds the class from the app's optional ``onepath_http_limits``
(a ``Limits``) and that hook.

This subclasses ``uvicorn.protocols.http.httptools_impl.HttpToolsProtocol``, the class uvicorn
itself names for ``http="httptools"``, and overrides its parser callbacks; tests/test_server_input.py
drives every limit over real sockets, so a uvicorn release that changes them fails there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class Limits:
    max_url_bytes: int = 8 * 1024
    max_headers: int = 100
    max_header_bytes: int = 16 * 1024
    header_timeout: float = 5.0
    body_timeout: float = 5.0
    body_deadline: float = 30.0


REASONS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long",
           431: b"Request Header Fields Too Large"}


class _Refused(Exception):
    """Raised inside a parser callback: httptools stops parsing and ``data_received`` answers."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    onepath_limits: Limits = Limits()
    onepath_observe: Callable[[str | None, int], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._op_refusal: tuple[int, str] | None = None
        self._op_phase: str | None = "new"  # new | headers | body | None (nothing incomplete)
        self._op_since = 0.0   # when the phase began
        self._op_last = 0.0    # last byte read
        self._op_timer: Any = None
        self._op_head_bytes = 0  # bytes read while the current request's head was incomplete
        self._op_read = 0        # size of the read being parsed
        lim = self.onepath_limits
        self._op_head_max = lim.max_url_bytes + lim.max_header_bytes + 4096  # + request line, separators

    # -- the connection -----------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._op_since = self._op_last = self.loop.time()
        self._op_arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._op_timer is not None:
            self._op_timer.cancel()
            self._op_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._op_last = self.loop.time()
        self._op_read = len(data)
        super().data_received(data)
        phase = self._op_phase
        if phase is None:
            # Bytes that began no request (the blank lines httptools skips between requests) made
            # uvicorn cancel its keep-alive timer: without ours too the connection would live for good.
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.timeout_keep_alive_task is None and not self.transport.is_closing():
                self._op_phase, self._op_since = "new", self._op_last
                if self._op_timer is None:
                    self._op_arm()
            return
        if phase == "body" and not (self.cycle is not None and self.cycle.more_body):
            self._op_phase = None  # the message is complete (uvicorn's on_message_complete ran)
            return
        if phase == "headers":  # a head arriving in pieces: bounded while it arrives, not at its end
            self._op_head_bytes += len(data)
            if self._op_head_bytes > self._op_head_max and not self.transport.is_closing():
                self._op_answer(431, f"request headers larger than {self.onepath_limits.max_header_bytes} bytes")
                return
        if self._op_timer is None and not self.transport.is_closing():
            self._op_arm()

    # -- parser callbacks (per request, never per header) ---------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._op_phase, self._op_since, self._op_head_bytes = "headers", self._op_last, 0

    def on_headers_complete(self) -> None:
        lim = self.onepath_limits
        if len(self.url) > lim.max_url_bytes:
            self._op_refuse(414, f"URL longer than {lim.max_url_bytes} bytes")
        if len(self.headers) > lim.max_headers:
            self._op_refuse(431, f"more than {lim.max_headers} header fields")
        # the head is at most what was read for it: only a large one is summed
        if (self._op_head_bytes + self._op_read > lim.max_header_bytes
                and sum(len(k) + len(v) for k, v in self.headers) > lim.max_header_bytes):
            self._op_refuse(431, f"request headers larger than {lim.max_header_bytes} bytes")
        self._op_phase, self._op_since = "body", self._op_last
        super().on_headers_complete()

    # -- answers ---------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:  # uvicorn calls it when the parser refuses
        status, message = self._op_refusal or (400, f"invalid HTTP request: {msg}")
        self._op_answer(status, message)

    def _op_refuse(self, status: int, message: str) -> None:
        self._op_refusal = (status, message)
        raise _Refused(message)

    def _op_path(self) -> str | None:
        try:
            return self.scope["path"]
        except (TypeError, KeyError):
            return None

    def _op_answer(self, status: int, message: str) -> None:
        self._op_phase = None
        if self.transport.is_closing():
            return
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"".join([
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body),
            body]))
        self.transport.close()
        observe = type(self).onepath_observe
        if observe is not None:
            try:
                observe(self._op_path(), status)
            except Exception:  # counting must never take the answer down
                pass

    # -- read timeouts -------------------------------------------------------------------------
    def _op_due(self) -> float:
        lim = self.onepath_limits
        if self._op_phase == "body":
            return min(self._op_last + lim.body_timeout, self._op_since + lim.body_deadline)
        return self._op_since + lim.header_timeout

    def _op_arm(self) -> None:
        self._op_timer = self.loop.call_at(self._op_due(), self._op_expire)

    def _op_expire(self) -> None:
        self._op_timer = None
        phase = self._op_phase
        if phase is None or self.transport.is_closing():
            return
        if phase == "body" and self.flow.read_paused:  # we stopped reading, not the client
            self._op_last = self.loop.time()
        if self.loop.time() < self._op_due():
            self._op_arm()
            return
        lim = self.onepath_limits
        if phase == "new":  # a connection that never sent a byte: nothing to answer
            self._op_phase = None
            self.transport.close()
            return
        if phase == "headers":
            self._op_answer(408, f"request headers not received within {lim.header_timeout:g} s")
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:  # the app answers already; just stop
            self.transport.close()
            return
        if cycle is not None:  # the app's receive() sees a disconnect, its send() is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        stalled = self.loop.time() - self._op_last >= lim.body_timeout
        self._op_answer(408, f"request body stalled: no byte for {lim.body_timeout:g} s" if stalled else
                        f"request body not complete within {lim.body_deadline:g} s")


def protocol_for(app: Any) -> type:
    """The protocol class for ``uvicorn.Config(http=...)``: the app's ``onepath_http_limits`` (default
    ``Limits()``) and its ``onepath_protocol_response`` hook, if it has them."""
    limits = getattr(app, "onepath_http_limits", None) or Limits()
    observe = getattr(app, "onepath_protocol_response", None)
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,),
                {"onepath_limits": limits, "onepath_observe": staticmethod(observe) if observe else None})
