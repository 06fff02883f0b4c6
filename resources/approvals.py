"""Signed approvals: Ed25519 keys per identity, signatures over (asset, version, env, reason, time).

An approval is only as good as its verification, which checks everything a person could fake by
setting a variable: the signature against the approver's public key in the reviewed policy, the
approver's role, independence (not in the owning team, not the version's author), and that the
approval names exactly this asset, version and environment.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from platform_defs.policy import Policy, is_demo_identity


class ApprovalError(ValueError):
    """An approval is refused; the message says why in one line."""


@dataclass(frozen=True)
class Approval:
    asset: str
    version: str
    env: str
    reason: str
    approver: str
    approved_at: str
    signature: str = ""

    def payload(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Approval":
        return cls(**{k: str(d[k]) for k in ("asset", "version", "env", "reason", "approver", "approved_at",
                                               "signature")})


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
    except ValueError as err:
        raise ApprovalError(f"{path} is not a PEM private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ApprovalError(f"{path} is not an Ed25519 key")
    return key


def sign(key: Ed25519PrivateKey, *, asset: str, version: str, env: str, reason: str, approver: str,
         approved_at: str | None = None) -> Approval:
    if not reason.strip():
        raise ApprovalError("an approval needs a reason")
    draft = Approval(asset, str(version), env, reason.strip(), approver,
                     approved_at or datetime.now(timezone.utc).isoformat(timespec="seconds"))
    sig = base64.b64encode(key.sign(draft.payload())).decode()
    return Approval(**{**asdict(draft), "signature": sig})


def verify(approval: Approval, policy: Policy, *, asset: str, version: str, env: str, owner_team: str,
           author: str | None, role: str, other_team: bool = True, author_emails: set[str] | None = None) -> None:
    """Raise ``ApprovalError`` unless ``approval`` is a valid, independent approval of exactly this.

    Model approvals must come from outside the owning team (``other_team``); code reviews may come
    from inside it but never from someone whose commit emails are among ``author_emails``."""
    ident = policy.identities.get(approval.approver)
    if ident is None:
        raise ApprovalError(f"unknown approver '{approval.approver}': not an identity in the policy")
    if not policy.demo and is_demo_identity(policy, approval.approver):
        why = "is marked demo" if ident.demo else "lists a public key whose private key ships in assets/demo_identities"
        raise ApprovalError(f"{approval.approver} {why}: demo identities are refused unless the recorded policy is in "
                            f"demo mode (demo: true)")
    try:
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(ident.public_key))
        pub.verify(base64.b64decode(approval.signature), approval.payload())
    except (InvalidSignature, ValueError):
        raise ApprovalError(f"signature does not verify with {approval.approver}'s public key in the policy "
                            f"(forged, altered, or signed with an unknown key)") from None
    if (approval.asset, approval.version, approval.env) != (asset, str(version), env):
        raise ApprovalError(f"approval is for {approval.asset} version {approval.version} in {approval.env}, "
                            f"not {asset} version {version} in {env}")
    if role not in ident.roles:
        raise ApprovalError(f"{approval.approver} lacks the role '{role}' (has: {', '.join(ident.roles) or 'none'})")
    if other_team and ident.team == owner_team:
        raise ApprovalError(f"{approval.approver} is in the owning team '{owner_team}': approval must be independent")
    if author and approval.approver == author:
        raise ApprovalError(f"{approval.approver} authored version {version}: self-approval is not allowed")
    shared = {e.lower() for e in ident.git_emails} & {e.lower() for e in (author_emails or set())}
    if shared:
        raise ApprovalError(f"{approval.approver} authored changes in release {version} ({', '.join(sorted(shared))}): "
                            f"a reviewer must have authored none of them")
