"""Which approvals of one version (or release) in one environment stand: verified, not revoked, not expired.

One function, :func:`standing`, read by the gate (``approval`` / ``code_review``: does anything allow a
promotion now?) and by the ``approval_in_force`` check (does what serves still have an approval?). It
reads the ``approval`` and ``approval_revoked`` entries of the ledger and verifies each against the
policy (``resources.approvals``): an approval is *valid* when it verifies and binds the registration,
*revoked* when a revocation that verifies (signed by its approver, an approver of the track or a
platform_admin) covers it, *expired* when it verifies but is older than the track's
``approval_valid_days``; anything else is *refused*, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from platform_defs.policy import Policy
from resources.approvals import (Approval, ApprovalError, ApprovalExpired, Registered, Revocation,
                                 signed_flags_only, verify, verify_revocation)

REVOKED_KIND = "approval_revoked"


@dataclass
class Standing:
    valid: list[tuple[Any, Approval]] = field(default_factory=list)
    revoked: list[tuple[Any, Approval, Any, Revocation]] = field(default_factory=list)
    expired: list[tuple[Any, Approval, datetime]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    ignored_revocations: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # entries carrying an approval an earlier entry carries

    def lapsed(self) -> list[str]:
        """One line per revoked or expired approval."""
        return ([revoked_line(e, a, re, r) for e, a, re, r in self.revoked]
                + [f"approval #{e.seq} by {a.approver} expired on {ended.isoformat(timespec='seconds')}"
                   for e, a, ended in self.expired])

    def not_counted(self) -> list[str]:
        """Everything that does not count, one line each (for the failed check's metadata)."""
        return ([f"#{e.seq} by {a.approver}: revoked by {r.revoker} at {r.revoked_at} (ledger #{re.seq}): {r.reason}"
                 for e, a, re, r in self.revoked]
                + [f"#{e.seq} by {a.approver}: expired on {ended.isoformat(timespec='seconds')}: approve again"
                   for e, a, ended in self.expired]
                + self.refused + self.duplicates + [f"ignored {x}" for x in self.ignored_revocations])


def revoked_line(entry: Any, a: Approval, rev_entry: Any, r: Revocation) -> str:
    return (f"approval #{entry.seq} of {a.asset} version {a.version} in {a.env} was revoked by {r.revoker} at "
            f"{r.revoked_at} ({r.reason}; ledger #{rev_entry.seq})")


def standing(book: Any, policy: Policy, *, asset: str, version: str, env: str, owner_team: str,
             author: str | None, role: str, registered: Registered, valid_days: float | None,
             other_team: bool = True, author_emails: set[str] | None = None,
             now: datetime | None = None) -> Standing:
    """Approvals are judged under ``policy`` (the one in force), each once: an entry carrying an approval an
    earlier entry already carries (the same signed payload, :meth:`Approval.identity`) adds nothing and is
    judged as that first entry. A revocation is judged under the policy recorded when it was appended (the
    newest ``policy_recorded`` entry before it; ``policy`` when none precedes it), so a later change of
    policy (its revoker losing the role, demo mode switched off) never cancels it."""
    out = Standing()
    version = str(version)
    revocations = [(e, Revocation.from_dict(e.data)) for e in book.entries(kind=REVOKED_KIND, subject=asset, env=env)
                   if str(e.data.get("version")) == version]
    approvals = [(e, signed_flags_only(Approval.from_dict(e.data), policy))
                 for e in book.entries(kind="approval", subject=asset, env=env)
                 if str(e.data.get("version")) == version]
    identity_at = {e.seq: a.identity() for e, a in approvals}
    records: list[Any] | None = None

    def policy_at(seq: int) -> Policy:
        nonlocal records
        if records is None:
            from platform_defs.policy_record import PolicyRecordError, recorded_policies

            try:
                records = recorded_policies(book)
            except PolicyRecordError as err:  # the gates refuse on a broken chain; here: judge under policy
                records = []
                out.ignored_revocations.append(f"the recorded policy chain does not verify ({err}): revocations "
                                               f"judged under the policy in force")
        before = [r for r in records if r.seq < seq]
        return before[-1].policy if before else policy

    first_entry: dict[str, int] = {}
    for entry, a in approvals:
        ident = a.identity()
        if ident in first_entry:
            out.duplicates.append(f"#{entry.seq} by {a.approver}: a copy of approval #{first_entry[ident]} "
                                  f"(the same signed approval adds nothing)")
            continue
        first_entry[ident] = entry.seq
        ended = None
        try:
            verify(a, policy, asset=asset, version=version, env=env, owner_team=owner_team, author=author, role=role,
                   registered=registered, approval_seq=entry.seq, valid_days=valid_days, now=now,
                   other_team=other_team, author_emails=author_emails)
        except ApprovalExpired as err:
            ended = err.ended
        except ApprovalError as err:
            out.refused.append(f"#{entry.seq} by {a.approver}: {err}")
            continue
        revoked = None
        for rev_entry, rev in revocations:
            if not rev.covers(a, entry.seq, named=identity_at.get(rev.approval_entry), revocation_seq=rev_entry.seq,
                              recorded_at=rev_entry.ts):
                continue
            try:
                verify_revocation(rev, policy_at(rev_entry.seq), approval=a, role=role)
            except ApprovalError as err:
                out.ignored_revocations.append(f"revocation #{rev_entry.seq} by {rev.revoker}: {err}")
                continue
            revoked = (rev_entry, rev)
            break
        if revoked is not None:
            out.revoked.append((entry, a, *revoked))
        elif ended is not None:
            out.expired.append((entry, a, ended))
        else:
            out.valid.append((entry, a))
    return out


__all__ = ["REVOKED_KIND", "Standing", "revoked_line", "standing"]
