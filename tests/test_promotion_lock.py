"""The promotion lease in the ledger's database: one holder per environment, fencing tokens that only
grow, and a holder that lost its lease can record nothing. Each test runs on sqlite and on PostgreSQL
(the ``backend`` fixture), where the racing processes share no file at all."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from resources.ledger import Lease, LeaseHeld, LeaseLost, Ledger
from tests.stores import LedgerBackend


def test_one_holder_at_a_time_and_tokens_grow(backend: LedgerBackend) -> None:
    book = backend.ledger()
    a = book.acquire_lease("promotion:x.prod", "run-a", ttl=30)
    with pytest.raises(LeaseHeld, match="run-a"):
        book.acquire_lease("promotion:x.prod", "run-b", ttl=30)
    other = book.acquire_lease("promotion:x.staging", "run-b", ttl=30)  # another environment is free
    assert other.token == 1
    book.release_lease(a)
    b = book.acquire_lease("promotion:x.prod", "run-b", ttl=30)
    assert b.token == a.token + 1
    assert book.lease("promotion:x.prod") == b


def test_an_expired_lease_is_granted_again_and_the_old_holder_is_fenced_out(backend: LedgerBackend) -> None:
    book = backend.ledger()
    stale = book.acquire_lease("promotion:x.prod", "run-a", ttl=0.2)
    deadline = time.monotonic() + 5
    while book.lease("promotion:x.prod") is not None:  # wait for the expiry the test set, not a guess
        assert time.monotonic() < deadline
        time.sleep(0.02)
    fresh = book.acquire_lease("promotion:x.prod", "run-b", ttl=30)
    assert fresh.token == stale.token + 1
    with pytest.raises(LeaseLost):
        book.renew_lease(stale, ttl=30)
    with pytest.raises(LeaseLost, match="was lost"):
        book.append("deploy", "x", {"version": "9"}, "run-a", env="prod", fence=stale)
    assert book.entries(kind="deploy") == []  # nothing was written for the stale holder
    entry = book.append("deploy", "x", {"version": "2"}, "run-b", env="prod", fence=fresh)
    assert entry.data["version"] == "2"
    book.release_lease(stale)  # a stale holder's release does not free the new holder's lease
    assert book.lease("promotion:x.prod") == fresh
    assert book.verify().ok


def test_a_forged_lease_object_is_refused(backend: LedgerBackend) -> None:
    book = backend.ledger()
    real = book.acquire_lease("promotion:x.prod", "run-a", ttl=30)
    forged = Lease(real.name, "attacker", real.token, real.expires_at)
    with pytest.raises(LeaseLost):
        book.append("deploy", "x", {"version": "9"}, "attacker", env="prod", fence=forged)


def _race(db: str, key: str, holder: str, start: "multiprocessing.synchronize.Event", out: "multiprocessing.Queue") -> None:
    book = Ledger(db, Path(key))
    start.wait()
    try:
        out.put((holder, book.acquire_lease("promotion:x.prod", holder, ttl=30).token))
    except LeaseHeld:
        out.put((holder, None))


def test_of_many_processes_racing_exactly_one_gets_the_lease(backend: LedgerBackend) -> None:
    book = backend.ledger()
    book.append("genesis", "x", {}, "test")  # the database exists before the race
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(book.store.url, str(book.key_path), f"run-{i}", start, out))
             for i in range(6)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [(h, t) for h, t in results if t is not None]
    assert len(winners) == 1 and winners[0][1] == 1, results
