"""Signed approvals, revocations and registrations: Ed25519 keys per identity.

An approval is only as good as its verification, which checks everything a person could fake by
setting a variable or signing early: the signature against the approver's public key in the policy,
the approver's role, independence (not in the owning team, not the version's registered author),
that it names exactly this asset, version and environment, and that it binds the version's content:
the run id and content digest its registration recorded in the ledger (``model_registered`` for a
model version, ``release_built`` for an app release, whose run id is ``""``). It must have been signed
after that registration (its ``approved_at`` and its ledger entry both follow the registration
entry), not in the future, and, under a policy with ``approval_valid_days``, not too long ago. A
signed ``approval_revoked`` entry takes it back (:class:`Revocation`). An approval is its signed payload
(:meth:`Approval.identity`), whichever ledger entries carry it: a copy appended again is the same approval,
revoked or not. ``first_release`` (no previous version to roll back to) is part of that signed payload.

A version registered from a notebook names its author by a registration signature
(:func:`sign_registration`): the identity's Ed25519 signature over ``{model, version, run_id, digest}``,
which the handoff sensor checks against the policy (:func:`verify_registration`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from platform_defs.policy import Policy, is_demo_identity

FUTURE_SKEW = timedelta(minutes=5)  # an approved_at further ahead of the verifier's clock is refused


class ApprovalError(ValueError):
    """An approval is refused; the message says why in one line."""


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_time(value: str, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        raise ApprovalError(f"{what} '{value}' is not an ISO 8601 time") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Approval:
    asset: str
    version: str
    env: str
    reason: str
    approver: str
    approved_at: str
    run_id: str = ""  # the registration's MLflow run id ("" for an app release)
    digest: str = ""  # the registration's content digest (an app release: its content hash)
    # signed: no previous version to roll back to is the approver's statement, not a note beside it
    first_release: bool = False
    signature: str = ""

    def payload(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k != "signature"}
        if not self.first_release:  # absent means false: approvals signed before the flag was signed still verify
            del body["first_release"]
        return _canonical(body)

    def identity(self) -> str:
        """What makes two ledger entries the same approval: the sha256 of the signed payload. Not the
        signature's text: base64 decoding skips stray characters, so one signature has many spellings."""
        return hashlib.sha256(self.payload()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Approval":
        # an approval recorded before approvals were bound to content has no run_id/digest: it binds nothing
        return cls(**{f.name: str(d.get(f.name) or "") for f in fields(cls) if f.name != "first_release"},
                   first_release=d.get("first_release") is True)


@dataclass(frozen=True)
class Registered:
    """What an approval must bind: the registration entry of the version (or release) it approves."""

    what: str  # "version 3 of credit_risk" / "release r-1 of loan_portal"
    run_id: str
    digest: str
    ts: str  # the registration entry's time
    seq: int  # the registration entry's ledger seq

    @classmethod
    def of_model(cls, entry: Any) -> "Registered":
        d = entry.data
        return cls(f"version {d.get('version')} of {d.get('model') or entry.subject}", str(d.get("run_id") or ""),
                   str(d.get("digest") or ""), entry.ts, entry.seq)

    @classmethod
    def of_release(cls, entry: Any) -> "Registered":
        d = entry.data
        return cls(f"release {d.get('version')} of {entry.subject}", "", str(d.get("content_hash") or ""),
                   entry.ts, entry.seq)


def generate_key(path: Path) -> str:
    """Write a new Ed25519 private key (PEM, mode 0600) to ``path``; return the public key (base64)."""
    if path.exists():
        raise ApprovalError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return public_key_b64(key)


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ApprovalError(f"no private key at {path}: run 'onepath keys init' first") from None
    except OSError as err:  # a folder, a file this user may not read, ...
        raise ApprovalError(f"cannot read the private key {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise ApprovalError(f"{path} is not a PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ApprovalError(f"{path} is not an Ed25519 key")
    return key


def _verify_signature(policy: Policy, who: str, signature: str, payload: bytes, what: str) -> Any:
    ident = policy.identities.get(who)
    if ident is None:
        raise ApprovalError(f"unknown {what} '{who}': not an identity in the policy")
    if not policy.demo and is_demo_identity(policy, who):
        why = "is marked demo" if ident.demo else "lists a public key whose private key ships in assets/demo_identities"
        raise ApprovalError(f"{who} {why}: demo identities are refused unless the recorded policy is in "
                            f"demo mode (demo: true)")
    try:
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(ident.public_key))
        pub.verify(base64.b64decode(signature), payload)
    except (InvalidSignature, ValueError):
        raise ApprovalError(f"signature does not verify with {who}'s public key in the policy "
                            f"(forged, altered, or signed with an unknown key)") from None
    return ident


# -- approvals ----------------------------------------------------------------------------------


def sign(key: Ed25519PrivateKey, *, asset: str, version: str, env: str, reason: str, approver: str,
         run_id: str, digest: str, approved_at: str | None = None, first_release: bool = False) -> Approval:
    """``first_release``: the approver also signs that this is the first release in ``env`` (no previous
    version to roll back to), which the ``rollback_path`` check accepts in place of one."""
    if not reason.strip():
        raise ApprovalError("an approval needs a reason")
    draft = Approval(asset, str(version), env, reason.strip(), approver, approved_at or now_iso(),
                     str(run_id or ""), str(digest or ""), bool(first_release))
    sig = base64.b64encode(key.sign(draft.payload())).decode()
    return Approval(**{**asdict(draft), "signature": sig})


def signed_flags_only(approval: Approval, policy: Policy) -> Approval:
    """``approval`` without a ``first_release`` flag its signature does not cover. Before the flag was signed,
    ``onepath approve --first-release`` wrote it beside the approval, where anyone appending to the ledger
    could set it too: such an entry is the approval it signed, never a signed first release."""
    if not approval.first_release:
        return approval
    bare = replace(approval, first_release=False)
    try:
        _verify_signature(policy, approval.approver, approval.signature, approval.payload(), "approver")
    except ApprovalError:
        try:
            _verify_signature(policy, bare.approver, bare.signature, bare.payload(), "approver")
        except ApprovalError:
            return approval  # verifies neither way: verify() says why
        return bare
    return approval


def expires_at(approval: Approval, valid_days: float | None) -> datetime | None:
    if valid_days is None:
        return None
    return parse_time(approval.approved_at, "approved_at") + timedelta(days=valid_days)


def verify(approval: Approval, policy: Policy, *, asset: str, version: str, env: str, owner_team: str,
           author: str | None, role: str, registered: Registered, approval_seq: int | None = None,
           valid_days: float | None = None, now: datetime | None = None, other_team: bool = True,
           author_emails: set[str] | None = None) -> None:
    """Raise ``ApprovalError`` unless ``approval`` is a valid, independent, standing approval of exactly this.

    ``registered``: the version's registration (run id, digest, entry time and seq) the approval must bind
    and follow; ``approval_seq``: the seq of the approval's own ledger entry, when it has one;
    ``valid_days``: the track's ``approval_valid_days`` (None: never expires). Model approvals must come
    from outside the owning team (``other_team``); code reviews may come from inside it but never from
    someone whose commit emails are among ``author_emails``."""
    ident = _verify_signature(policy, approval.approver, approval.signature, approval.payload(), "approver")
    if (approval.asset, approval.version, approval.env) != (asset, str(version), env):
        raise ApprovalError(f"approval is for {approval.asset} version {approval.version} in {approval.env}, "
                            f"not {asset} version {version} in {env}")
    if approval.run_id != registered.run_id:
        raise ApprovalError(f"approval binds run '{approval.run_id or '(none)'}', but {registered.what} was "
                            f"registered from run '{registered.run_id or '(none)'}' (ledger #{registered.seq})")
    if approval.digest != registered.digest:
        raise ApprovalError(f"approval binds digest {approval.digest or '(none)'}, but {registered.what} was "
                            f"registered with digest {registered.digest or '(none)'} (ledger #{registered.seq})")
    signed = parse_time(approval.approved_at, "approved_at")
    reg_ts = parse_time(registered.ts, "registration time")
    if signed < reg_ts.replace(microsecond=0):
        raise ApprovalError(f"approval was signed at {approval.approved_at}, before {registered.what} was registered "
                            f"at {registered.ts} (ledger #{registered.seq}): an approval must follow the registration")
    now = now or datetime.now(timezone.utc)
    if signed > now + FUTURE_SKEW:
        raise ApprovalError(f"approval is dated {approval.approved_at}, in the future (now {now.isoformat(timespec='seconds')})")
    if approval_seq is not None and approval_seq < registered.seq:
        raise ApprovalError(f"approval was recorded (ledger #{approval_seq}) before {registered.what} was "
                            f"registered (ledger #{registered.seq}): an approval must follow the registration")
    if author and approval.approver == author:
        raise ApprovalError(f"{approval.approver} authored version {version}: self-approval is not allowed")
    if other_team and ident.team == owner_team:
        raise ApprovalError(f"{approval.approver} is in the owning team '{owner_team}': approval must be independent")
    if role not in ident.roles:
        raise ApprovalError(f"{approval.approver} lacks the role '{role}' (has: {', '.join(ident.roles) or 'none'})")
    shared = {e.lower() for e in ident.git_emails} & {e.lower() for e in (author_emails or set())}
    if shared:
        raise ApprovalError(f"{approval.approver} authored changes in release {version} ({', '.join(sorted(shared))}): "
                            f"a reviewer must have authored none of them")
    ends = expires_at(approval, valid_days)
    if ends is not None and ends < now:
        raise ApprovalExpired(f"approval by {approval.approver} expired on {ends.isoformat(timespec='seconds')} "
                              f"(valid {valid_days:g} days from {approval.approved_at}): approve again", ends)


class ApprovalExpired(ApprovalError):
    """A valid approval older than the track's ``approval_valid_days``."""

    def __init__(self, message: str, ended: datetime):
        super().__init__(message)
        self.ended = ended


# -- revocations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    approval_entry: int | None  # the approval's ledger seq; None: every approval of asset/version/env before it
    asset: str
    version: str
    env: str
    reason: str
    revoker: str
    revoked_at: str
    signature: str = ""

    def payload(self) -> bytes:
        return _canonical({k: v for k, v in asdict(self).items() if k != "signature"})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Revocation":
        entry = d.get("approval_entry")
        return cls(None if entry is None else int(entry),
                   **{f.name: str(d.get(f.name) or "") for f in fields(cls) if f.name != "approval_entry"})

    def covers(self, approval: Approval, approval_seq: int, *, named: str | None, revocation_seq: int,
               recorded_at: str) -> bool:
        """Whether this revocation (recorded in ledger #``revocation_seq`` at ``recorded_at``) takes back
        ``approval`` (its first ledger entry: #``approval_seq``), whatever entry carries it.

        Naming an entry revokes the approval that entry carries (``named``: its :meth:`Approval.identity`),
        so appending the same signed approval again brings nothing back. Revoking all takes back every
        approval recorded before it and every approval signed at or before its ``revoked_at`` (no later than
        its own entry, give or take the clock skew: a revocation cannot be dated ahead to void approvals
        nobody has given yet)."""
        if self.approval_entry is not None:
            return named is not None and approval.identity() == named
        if approval_seq < revocation_seq:
            return True
        try:
            cutoff = min(parse_time(self.revoked_at, "revoked_at"),
                         parse_time(recorded_at, "ledger time") + FUTURE_SKEW)
            return parse_time(approval.approved_at, "approved_at") <= cutoff
        except ApprovalError:
            return False  # an unreadable time covers by ledger order only


def sign_revocation(key: Ed25519PrivateKey, *, asset: str, version: str, env: str, reason: str, revoker: str,
                    approval_entry: int | None = None, revoked_at: str | None = None) -> Revocation:
    if not reason.strip():
        raise ApprovalError("a revocation needs a reason")
    draft = Revocation(approval_entry, asset, str(version), env, reason.strip(), revoker, revoked_at or now_iso())
    sig = base64.b64encode(key.sign(draft.payload())).decode()
    return Revocation(**{**asdict(draft), "signature": sig})


def verify_revocation(rev: Revocation, policy: Policy, *, approval: Approval, role: str) -> None:
    """Raise ``ApprovalError`` unless ``rev`` is signed by someone who may take back ``approval``: its
    approver, an identity holding the track's approver ``role``, or a platform_admin."""
    ident = _verify_signature(policy, rev.revoker, rev.signature, rev.payload(), "revoker")
    if (rev.asset, rev.version, rev.env) != (approval.asset, approval.version, approval.env):
        raise ApprovalError(f"revocation is for {rev.asset} version {rev.version} in {rev.env}, not "
                            f"{approval.asset} version {approval.version} in {approval.env}")
    if rev.revoker != approval.approver and role not in ident.roles and "platform_admin" not in ident.roles:
        raise ApprovalError(f"{rev.revoker} may not revoke {approval.approver}'s approval: only its approver, an "
                            f"identity with the role '{role}' or a platform_admin may "
                            f"(has: {', '.join(ident.roles) or 'none'})")


# -- registration signatures (a version registered from a notebook) ---------------------------------


def registration_payload(*, model: str, version: str, run_id: str | None, digest: str) -> bytes:
    return _canonical({"model": model, "version": str(version), "run_id": str(run_id or ""), "digest": digest})


def sign_registration(key: Ed25519PrivateKey, *, model: str, version: str, run_id: str | None, digest: str) -> str:
    """The b64 Ed25519 signature that makes its signer the author of ``version`` of ``model``: over the
    canonical JSON of ``{model, version, run_id, digest}`` (digest: ``folder_digest`` of the version's folder
    as MLflow serves it). Set it as the version's ``onepath.registration_signature`` tag, the signer's
    identity as ``onepath.signed_by`` (``onepath sign-version`` does both)."""
    return base64.b64encode(key.sign(registration_payload(model=model, version=version, run_id=run_id,
                                                          digest=digest))).decode()


def verify_registration(policy: Policy, *, signed_by: str, signature: str, model: str, version: str,
                        run_id: str | None, digest: str) -> None:
    """Raise ``ApprovalError`` unless ``signature`` is ``signed_by``'s (a policy identity) over exactly this."""
    _verify_signature(policy, signed_by, signature,
                      registration_payload(model=model, version=version, run_id=run_id, digest=digest),
                      "registration signer")
