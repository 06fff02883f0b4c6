"""Whether what serves in an environment that needs approval still has an approval that stands.

``approval_in_force`` is a declared, non-blocking check on every endpoint and app environment asset
whose track asks for an approval there (``track.approval_envs``). It passes while the version the
ledger last deployed there has an approval that verifies against its registration and the policy
and is neither revoked (a signed ``approval_revoked`` entry) nor expired (``approval_valid_days``).
It fails, saying what happens next, when that approval was revoked or lapsed: the version keeps
serving until it is rolled back or approved again, and nothing newer promotes without a new approval
(the gate holds that). Nothing deployed there: it passes. Under a policy file that is not the recorded
policy in force (``policy_standing``) it fails with that problem, like every check.

The ``approved_promotions`` sensor reports it (:func:`evaluate_in_force`) on every change, each tick
(an approval expires by the clock, not by a ledger entry), and appends ``approval_lapsed`` once per
lapse; running the check by hand evaluates it again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import dagster as dg

from platform_defs.policy import Policy
from platform_defs.specs import AppSpec, EndpointSpec, ModelSpec, Organisation, endpoint_asset_name
from resources.ledger import LedgerResource

CHECK_NAME = "approval_in_force"
CHECK_DESCRIPTION = ("The version serving here still has an approval that stands: signed for its registered content, "
                     "not revoked, not expired under the policy. Non-blocking: a lapse does not stop what serves, "
                     "it says what happens next. Reported by approved_promotions.")
LAPSED_KIND = "approval_lapsed"
ACTOR = "sensor:approved_promotions"


def targets(org: Organisation, policy: Policy) -> list[tuple[Any, str]]:
    """``(endpoint or app spec, env)`` for every environment whose track requires an approval there."""
    out: list[tuple[Any, str]] = []
    for d in org.by_name.values():
        if isinstance(d, EndpointSpec):
            model = org.by_name[d.model]
            assert isinstance(model, ModelSpec)
            track = policy.track(model.track)
            if "approval" in track.checks:
                out += [(d, env) for env in d.environments if env in track.approval_envs]
        elif isinstance(d, AppSpec):
            track = policy.track("app")
            if "code_review" in track.checks:
                out += [(d, env) for env in d.environments if env in track.approval_envs]
    return out


def ledger_serving_version(book: Any, subject: str, env: str) -> str | None:
    """What the ledger says serves ``subject.env``: the last deploy, unless the environment was stopped since."""
    last = None
    for e in book.entries(subject=subject, env=env):
        if e.kind == "deploy":
            last = str(e.data.get("version"))
        elif e.kind == "serving_stopped":
            last = None
    return last


def in_force_verdict(org: Organisation, policy: Policy, book: Any, spec: Any, env: str, *,
                     now: datetime | None = None, authors: set[str] | None = None) -> tuple[bool, str, dict[str, Any]]:
    """``(passed, description, metadata)`` of ``approval_in_force`` for ``spec.env``, from the ledger and the policy."""
    from platform_defs.governance.approval_standing import standing
    from platform_defs.registration import registered_author, registration, unknown_author_text
    from resources.approvals import Registered

    from platform_defs.policy_record import policy_standing

    version = ledger_serving_version(book, spec.name, env)
    in_force = policy_standing(book, policy)
    if not in_force.ok:  # what every check says under a policy that is not the recorded one
        return False, str(in_force.problem), {"serving_version": version or "none", "policy_problem": True}
    if version is None:
        return True, "nothing serves here", {"serving_version": "none"}
    is_app = isinstance(spec, AppSpec)
    if is_app:
        from platform_defs.governance.gates import AppGate
        from platform_defs.settings import PROJECT_ROOT

        gate = AppGate(app=spec, policy=policy, ledger=book, deployer=None, source_dir=PROJECT_ROOT / spec.source,
                       repo_root=PROJECT_ROOT)
        built = gate.release_registration(version)
        asset, owner, role, track = spec.name, spec.owner, gate.track.approver_role, gate.track
        if built is None:
            return False, (f"release {version} serves in {env} but has no release_built ledger entry, so no review "
                           f"can bind it"), {"serving_version": version}
        if authors is None:
            from platform_defs.governance.gates import AuthorsUnknown

            try:
                authors = gate.authors()
            except AuthorsUnknown as err:
                return False, (f"git could not list the commit authors of release {version} of {spec.name}, so no "
                               f"review of it can be shown independent: {err}"), {"serving_version": version}
        s = standing(book, policy, asset=asset, version=version, env=env, owner_team=owner, author=None, role=role,
                     registered=Registered.of_release(built), valid_days=track.approval_valid_days, other_team=False,
                     author_emails=authors, now=now)
        what = f"release {version}"
    else:
        model = org.by_name[spec.model]
        track = policy.track(model.track)
        asset, owner, role = model.name, model.owner, track.approver_role
        reg = registration(book, model.name, version)
        if reg is None:
            return False, (f"version {version} of {model.name} serves in {env} but has no model_registered ledger "
                           f"entry, so no approval can bind it"), {"serving_version": version}
        author, known = registered_author(reg)
        if not known:
            return False, unknown_author_text(model.name, version), {"serving_version": version}
        s = standing(book, policy, asset=asset, version=version, env=env, owner_team=owner, author=author, role=role,
                     registered=Registered.of_model(reg), valid_days=track.approval_valid_days, now=now)
        what = f"version {version}"
    meta: dict[str, Any] = {"serving_version": version, "revoked": len(s.revoked), "expired": len(s.expired),
                            "refused": len(s.refused)}
    if s.valid:
        entry, a = s.valid[-1]
        from resources.approvals import expires_at

        ends = expires_at(a, track.approval_valid_days)
        return True, (f"{what} serves under approval #{entry.seq} by {a.approver} at {a.approved_at}"
                      + (f", valid until {ends.isoformat(timespec='seconds')}" if ends else "")), {
            **meta, "approval_entry": entry.seq, "approver": a.approver}
    rollback = (f"onepath rollback {spec.name} --env {env} --reason \"...\"" if not is_app
                else f"materialize {endpoint_asset_name(spec.name, env)} with an earlier reviewed release")
    approve = f"onepath approve {asset} --version {version} --env {env} --reason \"...\" --as <approver>"
    if s.revoked or s.expired:
        lapses = s.lapsed()
        why = lapses[-1]
        if not s.revoked:
            e, a, ended = s.expired[-1]
            why = (f"approval #{e.seq} of {asset} {what} in {env} by {a.approver} expired on "
                   f"{ended.isoformat(timespec='seconds')}")
            meta["approval_entry"] = e.seq
        else:
            meta["approval_entry"] = s.revoked[-1][0].seq
            meta["revocation_entry"] = s.revoked[-1][2].seq
    else:
        why = f"{what} serves in {env} with no approval that stands ({len(s.refused)} refused)"
    text = (f"{why}: {what} keeps serving until it is rolled back ({rollback}) or approved again ({approve}); "
            f"nothing newer promotes without a new approval")
    meta["not_counted"] = "\n".join(s.not_counted()) or "none"
    return False, text, meta


def evaluation(key: str, passed: bool, description: str, metadata: dict[str, Any]) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(asset_key=dg.AssetKey(key), check_name=CHECK_NAME, passed=passed,
                                   severity=dg.AssetCheckSeverity.ERROR, blocking=False, description=description,
                                   metadata=metadata)


def evaluate_in_force(org: Organisation, policy: Policy, book: Any, reported: dict[str, str], *,
                      now: datetime | None = None) -> list[dg.AssetCheckEvaluation]:
    """Evaluations for the environments whose verdict changed since ``reported`` (asset key -> ``"ok"`` or the
    failing text last reported; updated in place); appends ``approval_lapsed`` when one turns failed."""
    events = []
    authors: dict[str, set[str]] = {}
    for spec, env in targets(org, policy):
        if isinstance(spec, AppSpec) and spec.name not in authors:
            from platform_defs.governance.gates import AppGate
            from platform_defs.settings import PROJECT_ROOT

            from platform_defs.governance.gates import AuthorsUnknown

            try:
                authors[spec.name] = AppGate(app=spec, policy=policy, ledger=book, deployer=None,
                                             source_dir=PROJECT_ROOT / spec.source, repo_root=PROJECT_ROOT).authors()
            except AuthorsUnknown:
                pass  # in_force_verdict asks again and fails, saying why
        passed, text, meta = in_force_verdict(org, policy, book, spec, env, now=now, authors=authors.get(spec.name))
        key = endpoint_asset_name(spec.name, env)
        state = "ok" if passed else text
        if reported.get(key) == state:
            continue
        before = reported.get(key)
        reported[key] = state
        events.append(evaluation(key, passed, text, meta))
        if not passed and before in (None, "ok") and not meta.get("policy_problem") and \
                not _on_record(book, spec.name, env, meta):  # an unrecorded policy is no lapse of the approval
            book.append(LAPSED_KIND, spec.name, {
                "version": meta.get("serving_version"), "reason": text,
                **{k: meta[k] for k in ("approval_entry", "revocation_entry") if k in meta}}, ACTOR, env=env)
    return events


def _on_record(book: Any, subject: str, env: str, meta: dict[str, Any]) -> bool:
    """Whether this lapse (same version, same approval) is already the last ``approval_lapsed`` entry of
    ``subject.env`` with no deploy since (a sensor whose cursor was reset does not record it twice)."""
    last = None
    for e in book.entries(subject=subject, env=env):
        if e.kind == LAPSED_KIND:
            last = e
        elif e.kind == "deploy":
            last = None
    return last is not None and str(last.data.get("version")) == str(meta.get("serving_version")) and \
        last.data.get("approval_entry") == meta.get("approval_entry")


def build_approval_in_force_checks(org: Organisation, policy: Policy) -> list[dg.AssetChecksDefinition]:
    return [_check(org, policy, spec, env) for spec, env in targets(org, policy)]


def _check(org: Organisation, policy: Policy, spec: Any, env: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=endpoint_asset_name(spec.name, env), name=CHECK_NAME, blocking=False,
                    description=CHECK_DESCRIPTION)
    def _approval_in_force(ledger: LedgerResource) -> dg.AssetCheckResult:
        passed, text, meta = in_force_verdict(org, policy, ledger.ledger(), spec, env)
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR, description=text,
                                   metadata=meta)

    return _approval_in_force


__all__ = ["CHECK_NAME", "LAPSED_KIND", "build_approval_in_force_checks", "evaluate_in_force", "in_force_verdict",
           "ledger_serving_version", "targets"]
