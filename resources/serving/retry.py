"""One retry rule for onepath's own callers of an endpoint (standard library only; no HTTP client
imported: it judges the exceptions of ``http.client`` and httpx alike).

A prediction is a pure function of its input, so a POST whose connection failed before its response
arrived can be sent once more, on a new connection, with the same ``x-request-id``: a worker that
dies (SIGKILL, OOM) takes the requests it had already read with it, and the other worker, or the
one restarted, answers the copy. What is retried: the server closed or reset the connection without
an answer (``http.client.RemoteDisconnected``, ``ConnectionResetError``, ``BrokenPipeError``,
``ConnectionAbortedError``; httpx's ``RemoteProtocolError``, ``ReadError``, ``WriteError``,
``ConnectError``), or with an answer cut short (``http.client.IncompleteRead``: the worker died
while writing it; measured once in 6,461 raw requests over five kills). Never retried: an HTTP answer of any status (a 4xx or 5xx is the answer), and a
timeout (the server may still be working on it; a second copy would only add load).

Used by ``onepath simulate-traffic`` (``platform_defs.cli_simulate.PredictClient``) and by
``apps/loan_portal`` when it calls its scoring endpoint.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")
RETRIES = 1
_UNANSWERED = frozenset({"RemoteDisconnected", "ConnectionResetError", "BrokenPipeError", "ConnectionAbortedError",
                         "IncompleteRead", "RemoteProtocolError", "ReadError", "WriteError", "ConnectError"})


def unanswered(err: BaseException) -> bool:
    """Whether ``err`` says the connection failed before an answer came (so sending again is safe)."""
    if any(c.__name__ in ("TimeoutError", "TimeoutException") for c in type(err).__mro__):
        return False
    return any(c.__name__ in _UNANSWERED for c in type(err).__mro__)


def call_with_retry(send: Callable[[], T]) -> T:
    """``send()``, once more if it failed ``unanswered`` (``send`` opens a new connection then)."""
    for attempt in range(RETRIES + 1):
        try:
            return send()
        except Exception as err:
            if attempt == RETRIES or not unanswered(err):
                raise
    raise AssertionError("unreachable")


async def acall_with_retry(send: Callable[[], Awaitable[Any]]) -> Any:
    """``await send()``, once more if it failed ``unanswered``."""
    for attempt in range(RETRIES + 1):
        try:
            return await send()
        except Exception as err:
            if attempt == RETRIES or not unanswered(err):
                raise
    raise AssertionError("unreachable")
