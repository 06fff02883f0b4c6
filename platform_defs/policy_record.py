"""The policy in force is a signed record in the ledger, not whatever ``policy.yaml`` says today.

``onepath policy init`` records the first policy (trust on first use: its signer must be a platform
administrator the policy itself names); ``onepath policy apply`` records a change, signed by a platform
administrator of the policy recorded BEFORE it, so nobody can grant themselves the right to sign by
writing their own name into the file. Each record is a ``policy_recorded`` ledger entry holding the
policy's hash and full text, its diff against the previous record, the platform's public key (and the
witness's) pinned, whether demo mode is on, and the signer's Ed25519 signature over

    canonical_json({hash, text_sha256, previous_hash, previous_entry, platform_key, witness_key, demo, signed_by,
                    signed_at})

``text_sha256`` (the sha256 of the recorded text's bytes) is what proves a record's text intact; ``hash``
(``policy_hash``, the canonical JSON of the validated policy, defaults included) is what a file is
compared with and what gate verdicts name. A later release that adds a defaulted field changes the
file's ``hash`` (so the policy must be recorded again, by an admin: what it means changed) but never
makes an old record look tampered with.

:func:`policy_standing` is what every gate asks: the chain of records verifies, and the newest record's
hash is the hash of the policy file in use. Otherwise nothing promotes, and the problem says which
command records the file. Takes a ledger object; no Dagster.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from platform_defs.policy import (Policy, PolicyError, _shown, is_demo_identity, load_policy, parse_policy,
                                  policy_hash, policy_path)
from platform_defs.settings import current_profile

KIND = "policy_recorded"
SUBJECT = "policy"
ADMIN_ROLE = "platform_admin"
SIGNED_FIELDS = ("hash", "text_sha256", "previous_hash", "previous_entry", "platform_key", "witness_key", "demo",
                 "signed_by", "signed_at")


class PolicyRecordError(ValueError):
    """A policy cannot be recorded, or a recorded one does not verify; one line says why."""


@dataclass(frozen=True)
class RecordedPolicy:
    seq: int  # the ledger entry
    hash: str
    text: str
    policy: Policy
    signed_by: str
    signed_at: str
    platform_key: str | None
    witness_key: str | None
    demo: bool


@dataclass(frozen=True)
class PolicyStanding:
    ok: bool
    problem: str | None  # one line: the file, both hashes, the command that records it
    entry_seq: int | None  # the recorded policy in force (its ledger seq)
    hash: str | None  # the recorded policy's hash
    file_hash: str | None = None


# --------------------------------------------------------------------------------------------
# Signing


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def signed_payload(data: dict[str, Any]) -> bytes:
    from resources.ledger import canonical_json

    return canonical_json({k: data.get(k) for k in SIGNED_FIELDS}).encode()


def _platform_key(book: Any) -> str:
    """The ledger's public key (base64 raw), creating the key pair on first use."""
    return book.platform_public_key_b64()


def _witness_key(book: Any) -> str | None:
    """The configured witness's key (None without a witness); a witness that is configured but does not
    answer is an error: a policy recorded then would pin no witness."""
    return book.witness_public_key_b64()


def _admin_check(consulted: Policy, signer: str, where: str) -> None:
    """``signer`` may sign a policy record when ``consulted`` names it a platform admin (a demo identity only
    when ``consulted`` is in demo mode)."""
    ident = consulted.identities.get(signer)
    admins = sorted(n for n, i in consulted.identities.items() if ADMIN_ROLE in i.roles)
    if ident is None or ADMIN_ROLE not in ident.roles:
        raise PolicyRecordError(
            f"'{signer}' is not a platform_admin of {where} (its platform admins: {', '.join(admins) or 'none'}): "
            f"rule: a policy is signed by a platform admin of the policy recorded before it")
    if is_demo_identity(consulted, signer) and not consulted.demo:
        raise PolicyRecordError(
            f"'{signer}' is a demo identity (its private key ships with the repository) and {where} is not in demo "
            f"mode (demo: true): rule: demo identities sign only under a demo policy")


def _verify_signature(consulted: Policy, data: dict[str, Any]) -> bool:
    ident = consulted.identities.get(str(data.get("signed_by")))
    if ident is None:
        return False
    try:
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(ident.public_key))
        pub.verify(base64.b64decode(str(data.get("signature", "")), validate=True), signed_payload(data))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# Reading the chain


def recorded_policies(book: Any) -> list[RecordedPolicy]:
    """Every recorded policy, oldest first, each verified: its text hashes to its hash, it links to the
    record before it, and it is signed by a platform admin of the record before it (the first by one of
    its own). A record that does not verify raises :class:`PolicyRecordError` naming the ledger entry."""
    out: list[RecordedPolicy] = []
    for entry in book.entries(kind=KIND):
        d = entry.data
        label = f"policy record ledger #{entry.seq}"
        try:
            text = str(d["text"])
            policy = parse_policy(text, label)
        except KeyError:
            raise PolicyRecordError(f"{label} holds no policy text") from None
        except PolicyError as err:
            raise PolicyRecordError(f"{label} does not hold a valid policy: {err}") from None
        if d.get("text_sha256") != _text_sha256(text):
            raise PolicyRecordError(f"{label}: its text does not hash to its signed sha256 "
                                    f"{str(d.get('text_sha256'))[:12]} (altered)")
        prev = out[-1] if out else None
        want = (prev.seq, prev.hash) if prev else (None, None)
        if (d.get("previous_entry"), d.get("previous_hash")) != want:
            raise PolicyRecordError(
                f"{label} does not follow the policy recorded before it (it names #{d.get('previous_entry')}, "
                f"the chain has {'#' + str(prev.seq) if prev else 'none'})")
        consulted = prev.policy if prev else policy
        where = f"the policy recorded in ledger #{prev.seq}" if prev else f"the policy it records (#{entry.seq})"
        signer = str(d.get("signed_by"))
        try:
            _admin_check(consulted, signer, where)
        except PolicyRecordError as err:
            raise PolicyRecordError(f"{label} is signed by {signer}, who may not sign it: {err}") from None
        if not _verify_signature(consulted, d):
            raise PolicyRecordError(f"{label}: the signature does not verify with {signer}'s public key in {where} "
                                    f"(forged, altered, or signed with another key)")
        if bool(d.get("demo")) != policy.demo:
            raise PolicyRecordError(f"{label}: its signed demo flag differs from the policy it records")
        out.append(RecordedPolicy(seq=entry.seq, hash=d["hash"], text=text, policy=policy, signed_by=signer,
                                  signed_at=str(d.get("signed_at")), platform_key=d.get("platform_key"),
                                  witness_key=d.get("witness_key"), demo=policy.demo))
    return out


def policy_in_force(book: Any) -> RecordedPolicy | None:
    records = recorded_policies(book)
    return records[-1] if records else None


def _admins(policy: Policy) -> str:
    return ", ".join(sorted(n for n, i in policy.identities.items() if ADMIN_ROLE in i.roles)) or "none"


def policy_standing(book: Any, policy: Policy, path: Path | None = None) -> PolicyStanding:
    """Whether ``policy`` (read from ``path``, default the policy file in use) is the policy in force: the
    records verify and the newest one's hash is ``policy_hash(policy)``. Otherwise ``problem`` says, in
    one line, what is wrong and which command records it; nothing promotes."""
    shown = _shown(path or policy_path())
    mine = policy_hash(policy)
    if policy.demo and current_profile() == "production":
        return PolicyStanding(False, f"{shown} turns demo mode on (demo: true) and this is the production profile "
                                     f"(ONEPATH_PROFILE=production): demo identities and the shipped keys are never "
                                     f"trusted in production; set demo: false and record it with onepath policy "
                                     f"apply", None, None, mine)
    # what the records (and every registration, approval and revocation the gates read next) say counts only
    # when the ledger is intact: a row written with sqlite without the key, or a record deleted beneath the
    # head, must not take effect before anyone runs audit verify
    checked = book.verify()
    if not checked.ok:
        where = f" at entry #{checked.first_bad_seq}" if checked.first_bad_seq is not None else ""
        return PolicyStanding(False, f"the ledger is not intact{where} ({checked.reason}): nothing promotes until it "
                                     f"is restored (onepath audit verify)", None, None, mine)
    try:
        records = recorded_policies(book)
    except PolicyRecordError as err:
        return PolicyStanding(False, f"the recorded policy chain is broken: {err}: nothing promotes until the "
                                     f"ledger is restored (onepath audit verify)", None, None, mine)
    if not records:
        return PolicyStanding(False, "no policy is recorded in the ledger yet: run onepath policy init --as "
                                     "<platform admin>", None, None, mine)
    newest = records[-1]
    if current_profile() == "production" and not newest.witness_key:
        return PolicyStanding(False, f"the production profile (ONEPATH_PROFILE=production) needs a ledger witness pinned "
                                     f"in the recorded policy (ledger #{newest.seq} pins none): run onepath witness serve "
                                     f"as its own user, set ONEPATH_WITNESS_SOCKET and record it with onepath policy "
                                     f"apply --change-witness", newest.seq, newest.hash, mine)
    if newest.hash != mine:
        return PolicyStanding(False, (
            f"{shown} (sha256 {mine[:12]}…) differs from the policy recorded in ledger #{newest.seq} (sha256 "
            f"{newest.hash[:12]}…): nothing promotes until it is recorded: onepath policy apply --as <an admin of "
            f"the recorded policy: {_admins(newest.policy)}>, or restore the file"), newest.seq, newest.hash, mine)
    return PolicyStanding(True, None, newest.seq, newest.hash, mine)


# --------------------------------------------------------------------------------------------
# Recording


def record_policy(book: Any, path: Path, *, signer: str, key: Ed25519PrivateKey, initial: bool,
                  change_witness: bool = False) -> Any:
    """Record the policy in ``path`` as the one in force, signed by ``signer`` with ``key``; returns the
    ledger entry. ``initial``: the first record (refused when one exists; the signer is a platform admin
    of this policy). Otherwise a change (refused when none is recorded, when nothing changed, or when the
    signer is not a platform admin of the policy recorded before). The record pins the ledger's platform
    key (another key than the one pinned before is refused: rotation is not supported, and the ledger
    refuses to append under it anyway) and the configured witness's key (a witness other than the one
    pinned before, or none, only with ``change_witness``: a shell without ONEPATH_WITNESS_SOCKET must not
    unpin the witness by accident). An unchanged policy may be recorded again to pin a new witness."""
    path = Path(path)
    policy = load_policy(path)
    text = path.read_text()
    shown = _shown(path)
    records = recorded_policies(book)
    previous = records[-1] if records else None
    if initial and previous is not None:
        raise PolicyRecordError(f"a policy is already recorded (ledger #{previous.seq}, signed by "
                                f"{previous.signed_by}): record a change with onepath policy apply")
    if not initial and previous is None:
        raise PolicyRecordError("no policy is recorded in the ledger yet: run onepath policy init --as "
                                "<platform admin> first")
    consulted = previous.policy if previous else policy
    where = f"the policy recorded in ledger #{previous.seq}" if previous else f"{shown} (the first policy)"
    _admin_check(consulted, signer, where)
    ident = consulted.identities[signer]
    from resources.approvals import public_key_b64

    if public_key_b64(key) != ident.public_key:
        raise PolicyRecordError(f"the key given is not {signer}'s: its public key differs from the one {where} "
                                f"lists for {signer}")
    digest = policy_hash(policy)
    platform_key = _platform_key(book)
    if previous is not None and previous.platform_key and previous.platform_key != platform_key:
        raise PolicyRecordError(
            f"the ledger's platform key ({platform_key[:12]}…) is not the one pinned in ledger #{previous.seq} "
            f"({previous.platform_key[:12]}…): refused (the key pair was replaced; rotating it is not supported: "
            f"restore the pinned key pair)")
    witness_key = _witness_key(book)
    if previous is not None and previous.witness_key != witness_key and not change_witness:
        raise PolicyRecordError(
            f"the configured witness ({(witness_key or 'none')[:12]}) is not the one pinned in ledger #{previous.seq} "
            f"({(previous.witness_key or 'none')[:12]}): refused; set ONEPATH_WITNESS_SOCKET to the pinned witness, "
            f"or say --change-witness to pin this one")
    if previous is not None and previous.hash == digest and previous.witness_key == witness_key:
        raise PolicyRecordError(f"{shown} is the policy recorded in ledger #{previous.seq} (sha256 {digest[:12]}…): "
                                f"nothing changed, nothing recorded")
    diff = "" if previous is None else "".join(difflib.unified_diff(
        previous.text.splitlines(keepends=True), text.splitlines(keepends=True),
        fromfile=f"recorded (ledger #{previous.seq})", tofile=shown))
    data: dict[str, Any] = {
        "hash": digest, "text_sha256": _text_sha256(text), "previous_hash": previous.hash if previous else None,
        "previous_entry": previous.seq if previous else None, "text": text, "diff": diff,
        "platform_key": platform_key, "witness_key": witness_key, "demo": policy.demo,
        "signed_by": signer, "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    data["signature"] = base64.b64encode(key.sign(signed_payload(data))).decode()
    return book.append(KIND, SUBJECT, data, signer)


def file_diff(book: Any, path: Path | None = None) -> str:
    """Unified diff from the recorded policy in force to the file (empty when they match or none is recorded)."""
    path = path or policy_path()
    newest = policy_in_force(book)
    if newest is None:
        return ""
    return "".join(difflib.unified_diff(newest.text.splitlines(keepends=True),
                                        path.read_text().splitlines(keepends=True),
                                        fromfile=f"recorded (ledger #{newest.seq})", tofile=_shown(path)))


__all__ = ["PolicyRecordError", "PolicyStanding", "RecordedPolicy", "file_diff", "policy_in_force", "policy_standing",
           "record_policy", "recorded_policies", "signed_payload"]
