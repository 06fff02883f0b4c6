"""The policy file validates with file-and-key errors; approvals cannot be forged by setting a variable,
signed before the version existed, kept after they were taken back, or used past their time; a version's
author is the identity that signed its registration, never a run tag.

Attacks are driven as an attacker would: an approver with the right key signing early (before the
version exists, dated later, recorded earlier), a revocation signed by someone without the right,
a run launched with spoofed ``dagster/user`` / ``onepath/trigger`` tags, a notebook version carrying a
client-set ``onepath.author`` but no registration signature.
"""

from __future__ import annotations

import re

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from platform_defs.policy import PolicyError, load_policy
from resources.approvals import (ApprovalError, ApprovalExpired, Approval, Registered, generate_key, load_private_key,
                                 sign, sign_revocation, verify)

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "assets" / "policy.yaml"
KEYS = ROOT / "assets" / "demo_identities"
DIGEST = "d" * 64
NOW = datetime.now(timezone.utc)
# version 3 as the ledger registered it ten minutes ago
REG = Registered("version 3 of credit_scoring", "run-3", DIGEST, (NOW - timedelta(minutes=10)).isoformat(), 5)


@pytest.fixture(scope="module")
def policy():
    return load_policy(POLICY)


def key(who: str):
    return load_private_key(KEYS / f"{who}.key")


def check(policy, approval: Approval, **over):
    args = {"asset": "credit_scoring", "version": "3", "env": "prod", "owner_team": "credit-risk",
            "author": "carla", "role": "model_approver", "registered": REG, "now": NOW, **over}
    verify(approval, policy, **args)  # judged at NOW, the clock REG and the approvals are dated from


def mira_signs(**over) -> Approval:
    args = {"asset": "credit_scoring", "version": "3", "env": "prod", "reason": "fairness reviewed",
            "approver": "mira", "run_id": "run-3", "digest": DIGEST, **over}
    return sign(key("mira"), **args)


def test_example_policy_loads(policy):
    assert "fairness" in policy.track("ml-high-risk").checks
    assert policy.team_of("mira") == "model-risk"


def test_an_independent_listed_approver_is_accepted(policy):
    check(policy, mira_signs())


@pytest.mark.parametrize("case,approval,over,message", [
    ("self-approval", "pat", {"author": "pat"}, "self-approval is not allowed"),
    ("owning team", "mira", {"owner_team": "model-risk"}, "is in the owning team"),
    ("wrong environment", "mira-staging", {}, "not credit_scoring version 3 in prod"),
    ("wrong version", "mira", {"version": "4"}, "not credit_scoring version 4 in prod"),
    ("missing role", "carla", {"owner_team": "retention", "author": "someone"}, "lacks the role 'model_approver'"),
])
def test_refusals(policy, case, approval, over, message):
    a = {"pat": lambda: sign(key("pat"), asset="credit_scoring", version="3", env="prod", reason="ok",
                             approver="pat", run_id="run-3", digest=DIGEST),
         "mira": mira_signs,
         "mira-staging": lambda: mira_signs(env="staging"),
         "carla": lambda: sign(key("carla"), asset="credit_scoring", version="3", env="prod", reason="ok",
                               approver="carla", run_id="run-3", digest=DIGEST)}[approval]()
    with pytest.raises(ApprovalError, match=message):
        check(policy, a, **over)


def test_altered_approval_is_refused(policy):
    a = mira_signs()
    forged = Approval(**{**a.as_dict(), "version": "4"})
    with pytest.raises(ApprovalError, match="signature does not verify"):
        check(policy, forged, version="4")


def test_unknown_key_claiming_a_listed_identity_is_refused(policy, tmp_path):
    generate_key(tmp_path / "evil.key")
    a = sign(load_private_key(tmp_path / "evil.key"), asset="credit_scoring", version="3", env="prod",
             reason="trust me", approver="mira", run_id="run-3", digest=DIGEST)
    with pytest.raises(ApprovalError, match="signature does not verify with mira's public key"):
        check(policy, a)


def test_unknown_approver_is_refused(policy, tmp_path):
    generate_key(tmp_path / "x.key")
    a = sign(load_private_key(tmp_path / "x.key"), asset="credit_scoring", version="3", env="prod",
             reason="r", approver="mallory", run_id="run-3", digest=DIGEST)
    with pytest.raises(ApprovalError, match="unknown approver 'mallory'"):
        check(policy, a)


def test_a_reason_is_required():
    with pytest.raises(ApprovalError, match="needs a reason"):
        mira_signs(reason="  ")


def test_keys_are_never_overwritten(tmp_path):
    generate_key(tmp_path / "k.key")
    with pytest.raises(ApprovalError, match="refusing to overwrite"):
        generate_key(tmp_path / "k.key")
    assert (tmp_path / "k.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("edit,key,problem", [
    (("security_fail_on: high", "security_fail_on: hihg"), "tracks.app.security_fail_on", "Input should be"),
    (("regression_margin: 0.02", "regresion_margin: 0.02"), "tracks.ml-standard.regresion_margin", "unknown key"),
    (("checks: [security_scan,", "checks: [security_scann,"), "tracks.app.checks.0", "unknown check 'security_scann'"),
    (("mira: {team: model-risk,", "mira: {team: model-rsk,"), "identities.mira.team", "unknown team 'model-rsk'"),
    (("reference_rows: 500", "reference_rows: lots"), "tracks.ml-standard.reference_rows", "valid integer"),
])
def test_policy_typos_name_file_and_key(tmp_path, edit, key, problem):
    text = POLICY.read_text()
    assert edit[0] in text
    bad = tmp_path / "policy.yaml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(PolicyError) as err:
        load_policy(bad)
    line = str(err.value)
    assert line.startswith(f"policy {bad}: key '{key}': ") and problem in line, line


def test_policy_forbidding_pii_on_a_track_refuses_a_model_fed_pii(tmp_path, settings):
    from platform_defs.definitions import build_definitions
    from platform_defs.loader import load_organisation
    from platform_defs.specs import DeclarationError

    strict = tmp_path / "policy.yaml"
    strict.write_text(POLICY.read_text().replace("pii_allowed: true ", "pii_allowed: false "))
    with pytest.raises(DeclarationError) as err:
        build_definitions(org=load_organisation(ROOT / "assets"), settings=settings, policy=load_policy(strict))
    line = str(err.value)
    assert line.startswith("declaration 'credit_risk' (model, assets/credit/declarations.py): field 'dataset': ")
    assert "declares PII (full_name, national_id, email)" in line and "track 'ml-high-risk'" in line


# -- approvals bind the registration ------------------------------------------------------------


def test_an_approval_of_other_content_is_refused_naming_both_digests(policy):
    a = mira_signs(digest="e" * 64)  # signed, with the right key, for other bytes under the same version number
    with pytest.raises(ApprovalError) as err:
        check(policy, a)
    assert f"binds digest {'e' * 64}" in str(err.value) and f"registered with digest {DIGEST}" in str(err.value)


def test_an_approval_of_another_run_is_refused_naming_both(policy):
    with pytest.raises(ApprovalError, match="binds run 'run-2', but version 3 of credit_scoring was registered "
                                            "from run 'run-3'"):
        check(policy, mira_signs(run_id="run-2"))


def test_an_approval_from_before_approvals_were_bound_binds_nothing(policy):
    old = mira_signs()
    legacy = {k: v for k, v in old.as_dict().items() if k not in ("run_id", "digest")}
    with pytest.raises(ApprovalError, match="signature does not verify|binds run"):
        check(policy, Approval.from_dict(legacy))


def test_an_approval_dated_before_the_registration_is_refused(policy):
    early = mira_signs(approved_at=(NOW - timedelta(hours=1)).isoformat())
    with pytest.raises(ApprovalError, match="before version 3 of credit_scoring was registered"):
        check(policy, early)


def test_an_approval_dated_in_the_future_is_refused(policy):
    with pytest.raises(ApprovalError, match="in the future"):
        check(policy, mira_signs(approved_at=(NOW + timedelta(minutes=6)).isoformat()))
    check(policy, mira_signs(approved_at=(NOW + timedelta(minutes=4)).isoformat()))  # within the clock skew


def test_an_approval_older_than_the_policy_allows_is_refused(policy):
    """Registered 40 days ago, approved 31 days ago: valid for 30 days, so it expired yesterday."""
    old = Registered(REG.what, REG.run_id, DIGEST, (NOW - timedelta(days=40)).isoformat(), 5)
    a = mira_signs(approved_at=(NOW - timedelta(days=31)).isoformat())
    valid_days = policy.track("ml-high-risk").approval_valid_days
    assert valid_days == 30 and policy.track("app").approval_valid_days == 14
    with pytest.raises(ApprovalExpired, match=r"expired on (\S+) .*: approve again") as err:
        check(policy, a, registered=old, valid_days=valid_days)
    assert err.value.ended.date() == (NOW - timedelta(days=1)).date()
    check(policy, a, registered=old, valid_days=None)  # a track without approval_valid_days: never expires


# -- the ledger: pre-signed, revoked, expired -----------------------------------------------------


MODEL, ENDPOINT = "credit_risk", "credit_scoring"


def register(book, version: str, *, digest: str = DIGEST, run_id: str | None = None, **extra):
    """The model_registered entry the model asset writes (the platform's, signed with the ledger's head)."""
    return book.append("model_registered", MODEL, {
        "model": MODEL, "version": version, "run_id": run_id or f"run-{version}", "digest": digest, "via": "graph",
        "author": "team:credit-risk", "author_verified": True,
        "registered_by": {"principal": "onepath", "run": "r1", "owner": "credit-risk"}, **extra}, "dagster:r1")


def approve_in_ledger(book, version: str, who: str = "mira", **over):
    """What an approver holding their key can write: a signed approval, appended to the ledger."""
    args = {"asset": MODEL, "version": version, "env": "prod", "reason": "reviewed", "approver": who,
            "run_id": f"run-{version}", "digest": DIGEST, **over}
    return book.append("approval", MODEL, sign(key(who), **args).as_dict(), who, env="prod")


def revoke_in_ledger(book, version: str, who: str, approval_entry: int | None = None):
    rev = sign_revocation(key(who), asset=MODEL, version=version, env="prod", reason="fairness numbers were wrong",
                          revoker=who, approval_entry=approval_entry)
    return book.append("approval_revoked", MODEL, rev.as_dict(), who, env="prod")


def standing_of(book, policy, version: str, **over):
    from platform_defs.governance.approval_standing import standing
    from platform_defs.registration import registration

    reg = registration(book, MODEL, version)
    args = dict(asset=MODEL, version=version, env="prod", owner_team="credit-risk", author="team:credit-risk",
                role="model_approver", registered=Registered.of_model(reg),
                valid_days=policy.track("ml-high-risk").approval_valid_days)
    return standing(book, policy, **{**args, **over})


@pytest.fixture
def book(tmp_path):
    from resources.ledger import Ledger
    from tests.conftest import record_policy

    book = Ledger(tmp_path / "ledger.db", tmp_path / "keys" / "platform.key")
    record_policy(book)  # the example policy is the one in force
    return book


def test_an_approval_presigned_before_the_version_existed_does_not_pass_once_it_is_registered(book, policy):
    """mira, with her own key, signs version 4 before it exists -- even guessing its digest and run id --
    and records it; then version 4 is registered. Dated honestly it precedes the registration; dated
    later it is in the future; dated just inside the clock skew, its ledger entry still precedes it."""
    honest = approve_in_ledger(book, "4")
    later = approve_in_ledger(book, "4", approved_at=(datetime.now(timezone.utc) + timedelta(hours=2)).isoformat())
    skewed = approve_in_ledger(book, "4", approved_at=(datetime.now(timezone.utc) + timedelta(minutes=4)).isoformat())
    reg = register(book, "4")
    s = standing_of(book, policy, "4")
    assert s.valid == [] and len(s.refused) == 3
    why = {int(r.split(" ")[0][1:]): r for r in s.refused}
    assert "before version 4 of credit_risk was registered" in why[honest.seq]
    assert "in the future" in why[later.seq]
    assert f"recorded (ledger #{skewed.seq}) before version 4 of credit_risk was registered (ledger #{reg.seq})" \
        in why[skewed.seq]
    ok = approve_in_ledger(book, "4")  # signed after the registration: counts
    assert [e.seq for e, _ in standing_of(book, policy, "4").valid] == [ok.seq]


def test_a_revoked_approval_no_longer_counts_and_a_revocation_without_the_right_is_ignored(book, policy):
    register(book, "5")
    a = approve_in_ledger(book, "5")
    carla = revoke_in_ledger(book, "5", "carla")  # carla holds no approver role and is not the approver
    s = standing_of(book, policy, "5")
    assert [e.seq for e, _ in s.valid] == [a.seq]
    assert s.ignored_revocations and f"revocation #{carla.seq} by carla: carla may not revoke mira's approval" \
        in s.ignored_revocations[0]
    rev = revoke_in_ledger(book, "5", "mira", approval_entry=a.seq)
    s = standing_of(book, policy, "5")
    assert s.valid == [] and [(e.seq, re.seq) for e, _, re, _ in s.revoked] == [(a.seq, rev.seq)]
    assert any(f"#{a.seq} by mira: revoked by mira" in x and "fairness numbers were wrong" in x for x in s.not_counted())
    again = approve_in_ledger(book, "5", who="pat")  # a new approval after the revocation counts
    assert [e.seq for e, _ in standing_of(book, policy, "5").valid] == [again.seq]
    revoke_in_ledger(book, "5", "pat")  # default: every approval recorded before it (a platform_admin may)
    assert standing_of(book, policy, "5").valid == []


def test_an_expired_approval_no_longer_counts(book, policy):
    register(book, "6")
    approve_in_ledger(book, "6")
    assert standing_of(book, policy, "6").valid
    later = datetime.now(timezone.utc) + timedelta(days=31)
    s = standing_of(book, policy, "6", now=later)
    assert s.valid == [] and len(s.expired) == 1
    assert "expired on" in s.lapsed()[0]


def deploy_in_ledger(book, version: str):
    return book.append("deploy", ENDPOINT, {"model": MODEL, "version": version, "digest": DIGEST}, "dagster:r2",
                       env="prod")


def test_a_serving_version_whose_approval_is_revoked_fails_approval_in_force_saying_what_happens_next(book, policy):
    from platform_defs.loader import load_organisation
    from sensors.approval_in_force import evaluate_in_force, in_force_verdict

    org = load_organisation()
    spec = org.by_name[ENDPOINT]
    register(book, "7")
    a = approve_in_ledger(book, "7")
    deploy_in_ledger(book, "7")
    passed, text, _ = in_force_verdict(org, policy, book, spec, "prod")
    assert passed and f"serves under approval #{a.seq} by mira" in text and "valid until" in text
    reported: dict = {}
    assert [e.passed for e in evaluate_in_force(org, policy, book, reported) if e.asset_key.path == ["credit_scoring_prod"]] == [True]
    rev = revoke_in_ledger(book, "7", "mira")
    passed, text, meta = in_force_verdict(org, policy, book, spec, "prod")
    assert not passed and meta["revocation_entry"] == rev.seq
    assert text.startswith(f"approval #{a.seq} of credit_risk version 7 in prod was revoked by mira at ")
    assert "(fairness numbers were wrong" in text
    assert ("version 7 keeps serving until it is rolled back (onepath rollback credit_scoring --env prod --reason "
            "\"...\") or approved again (onepath approve credit_risk --version 7 --env prod") in text
    assert text.endswith("nothing newer promotes without a new approval")
    events = [e for e in evaluate_in_force(org, policy, book, reported) if e.asset_key.path == ["credit_scoring_prod"]]
    assert [(e.passed, e.description) for e in events] == [(False, text)]
    lapsed = book.entries(kind="approval_lapsed", subject=ENDPOINT)
    assert len(lapsed) == 1 and lapsed[0].data["revocation_entry"] == rev.seq
    assert [e for e in evaluate_in_force(org, policy, book, reported) if e.asset_key.path == ["credit_scoring_prod"]] == []
    evaluate_in_force(org, policy, book, {})  # a sensor whose cursor was reset: the lapse is recorded once
    assert len(book.entries(kind="approval_lapsed", subject=ENDPOINT)) == 1
    approve_in_ledger(book, "7", who="pat")  # approved again: in force again
    assert in_force_verdict(org, policy, book, spec, "prod")[0]


def test_a_serving_version_whose_approval_expired_fails_approval_in_force(book, policy):
    from platform_defs.loader import load_organisation
    from sensors.approval_in_force import in_force_verdict

    org = load_organisation()
    register(book, "8")
    a = approve_in_ledger(book, "8")
    deploy_in_ledger(book, "8")
    passed, text, _ = in_force_verdict(org, policy, book, org.by_name[ENDPOINT], "prod",
                                       now=datetime.now(timezone.utc) + timedelta(days=30, hours=1))
    assert not passed and text.startswith(f"approval #{a.seq} of credit_risk version 8 in prod by mira expired on ")
    assert "version 8 keeps serving until it is rolled back" in text


def test_approval_in_force_fails_under_a_policy_file_that_is_not_the_recorded_one(book, policy, tmp_path):
    """Tier (b): the platform's own user edits the policy file (here: gives rob the model approver role, so his
    approval would count) without recording it. approval_in_force, like every check, fails with the standing's
    problem instead of judging under the edited file; it records no lapse (the approval did not lapse)."""
    import yaml

    from platform_defs.loader import load_organisation
    from platform_defs.policy import parse_policy
    from platform_defs.policy_record import policy_standing
    from sensors.approval_in_force import evaluate_in_force, in_force_verdict

    org = load_organisation()
    spec = org.by_name[ENDPOINT]
    register(book, "9")
    approve_in_ledger(book, "9", who="rob")  # not a model approver under the recorded policy
    deploy_in_ledger(book, "9")
    assert not in_force_verdict(org, policy, book, spec, "prod")[0]
    doc = yaml.safe_load(POLICY.read_text())
    doc["identities"]["rob"]["roles"] = ["code_reviewer", "model_approver"]
    edited = parse_policy(yaml.safe_dump(doc, sort_keys=False), "policy.yaml")
    problem = policy_standing(book, edited).problem
    assert problem and "differs from the policy recorded in ledger #" in problem
    passed, text, meta = in_force_verdict(org, edited, book, spec, "prod")
    assert (passed, text, meta["serving_version"]) == (False, problem, "9")
    events = [e for e in evaluate_in_force(org, edited, book, {}) if e.asset_key.path == ["credit_scoring_prod"]]
    assert [(e.passed, e.description) for e in events] == [(False, problem)]
    assert not book.entries(kind="approval_lapsed")


# -- the CLI: approve binds the registration, revoke checks the right ----------------------------


@pytest.fixture
def cli(settings, capsys, monkeypatch, tmp_path):
    """``onepath`` in this process, on a home of its own (its ledger is the one the commands write)."""
    from platform_defs.cli import main
    from platform_defs.settings import load_settings
    from platform_defs.wiring import build_resources

    from tests.conftest import record_policy

    monkeypatch.setenv("ONEPATH_HOME", str(tmp_path / "home"))
    book = build_resources(load_settings().ensure_dirs())["ledger"].ledger()
    record_policy(book)  # the example policy is the one in force (approve and revoke verify against it)

    def run(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, (out.out + out.err).strip()

    return book, run


def test_approve_binds_the_registration_and_refuses_a_version_without_one(cli):
    book, run = cli
    code, out = run("approve", MODEL, "--version", "7101", "--env", "prod", "--reason", "ok", "--as", "mira",
                    "--key", str(KEYS / "mira.key"))
    assert code == 1 and out.startswith("onepath: credit_risk version 7101 has no model_registered ledger entry")
    assert not [e for e in book.entries(kind="approval", subject=MODEL) if e.data.get("version") == "7101"]
    reg = register(book, "7101", digest="f" * 64)
    code, out = run("approve", MODEL, "--version", "7101", "--env", "prod", "--reason", "ok", "--as", "mira",
                    "--key", str(KEYS / "mira.key"))
    assert code == 0, out
    entry = [e for e in book.entries(kind="approval", subject=MODEL) if e.data.get("version") == "7101"][-1]
    assert (entry.data["run_id"], entry.data["digest"], entry.data["registration_entry"]) == ("run-7101", "f" * 64,
                                                                                              reg.seq)


def test_approve_judges_independence_by_the_registered_author(cli):
    """A notebook version signed by mira: whatever MLflow says, mira authored it and may not approve it."""
    book, run = cli
    book.append("model_registered", MODEL, {"model": MODEL, "version": "7102", "run_id": "run-7102",
                                            "digest": DIGEST, "via": "handoff", "author": "mira",
                                            "author_verified": True}, "sensor:registry_handoff")
    code, out = run("approve", MODEL, "--version", "7102", "--env", "prod", "--reason", "ok", "--as", "mira",
                    "--key", str(KEYS / "mira.key"))
    assert code == 1 and "mira authored version 7102: self-approval is not allowed" in out


def test_revoke_refuses_someone_without_the_right_and_records_the_approver(cli):
    book, run = cli
    register(book, "7103")
    approve_in_ledger(book, "7103")
    n = len(book.entries(kind="approval_revoked"))
    code, out = run("revoke", MODEL, "--version", "7103", "--env", "prod", "--reason", "no", "--as", "carla",
                    "--key", str(KEYS / "carla.key"))
    assert code == 1 and out.startswith("onepath: revocation refused: carla may not revoke mira's approval")
    assert len(book.entries(kind="approval_revoked")) == n
    code, out = run("revoke", MODEL, "--version", "7103", "--env", "prod", "--reason", "numbers wrong", "--as",
                    "mira", "--key", str(KEYS / "mira.key"))
    assert code == 0, out
    rev = book.entries(kind="approval_revoked")[-1]
    assert (rev.data["revoker"], rev.data["version"], rev.data["approval_entry"]) == ("mira", "7103", None)
    code, out = run("revoke", MODEL, "--version", "7199", "--env", "prod", "--reason", "x", "--as", "mira",
                    "--key", str(KEYS / "mira.key"))
    assert code == 1 and "no approval of credit_risk version 7199 in prod" in out


def test_an_identity_added_to_the_policy_file_but_not_recorded_cannot_approve_or_revoke(cli, tmp_path, monkeypatch):
    """Tier (b): the platform's own user copies the policy file, gives a new identity ``ghost`` the approver role
    and its own key, and points onepath at it. approve and revoke verify against the recorded policy, which
    names no ghost: both refuse, saying the file is not the policy in force, and nothing is appended."""
    import yaml

    book, run = cli
    public = generate_key(tmp_path / "ghost.key")
    doc = yaml.safe_load(POLICY.read_text())
    doc["identities"]["ghost"] = {"team": "model-risk", "roles": ["model_approver"], "public_key": public}
    doc["teams"]["model-risk"]["members"].append("ghost")
    edited = tmp_path / "policy.yaml"
    edited.write_text(yaml.safe_dump(doc, sort_keys=False))
    register(book, "7105")
    approve_in_ledger(book, "7105")
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(edited))
    n = len(book.entries())
    code, out = run("approve", MODEL, "--version", "7105", "--env", "prod", "--reason", "ok", "--as", "ghost",
                    "--key", str(tmp_path / "ghost.key"))
    assert code == 1 and out.startswith(f"onepath: approval refused: {edited}") and "differs from the policy " \
        "recorded in ledger #" in out and "onepath policy apply" in out, out
    code, out = run("revoke", MODEL, "--version", "7105", "--env", "prod", "--reason", "mine now", "--as", "ghost",
                    "--key", str(tmp_path / "ghost.key"))
    assert code == 1 and out.startswith(f"onepath: revocation refused: {edited}") and "differs from the policy" in out
    assert len(book.entries()) == n  # nothing appended


def test_approve_refuses_a_notebook_version_nobody_signed(cli):
    """Its client said onepath.author=mira and mlflow.user=carla: claims. With no registration signature the
    author is unknown, so independence cannot be checked and no approval is recorded."""
    book, run = cli
    book.append("model_registered", MODEL, {"model": MODEL, "version": "7104", "run_id": "run-7104",
                                            "digest": DIGEST, "via": "handoff", "author": None,
                                            "author_verified": False,
                                            "claims": {"onepath.author": "mira", "mlflow.user": "carla"}},
                "sensor:registry_handoff")
    code, out = run("approve", MODEL, "--version", "7104", "--env", "prod", "--reason", "ok", "--as", "pat",
                    "--key", str(KEYS / "pat.key"))
    assert code == 1 and "registered from outside onepath without a registration signature" in out
    assert "onepath sign-version credit_risk --version 7104" in out
    assert not book.entries(kind="approval", subject=MODEL)


# -- demo mode: a property of the recorded policy, off unless it turns it on ---------------------------


def demo_off(text: str | None = None):
    from platform_defs.policy import parse_policy

    text = (text or POLICY.read_text()).replace("\ndemo: true\n", "\ndemo: false\n", 1)
    assert "\ndemo: false\n" in text
    return parse_policy(text, "policy.yaml")


def test_with_demo_mode_off_a_demo_identitys_approval_is_refused(policy):
    check(policy, mira_signs())  # the example organisation is a demo: accepted there
    with pytest.raises(ApprovalError, match="mira is marked demo: demo identities are refused unless the recorded "
                                            r"policy is in demo mode \(demo: true\)"):
        check(demo_off(), mira_signs())


def test_a_shipped_demo_key_listed_under_another_name_is_refused(policy):
    """The same attack through another door: mira's shipped public key under a new name, without the flag."""
    mira_key = policy.identities["mira"].public_key
    text = POLICY.read_text().replace("model-risk: {members: [mira]}", "model-risk: {members: [mira, moira]}", 1)
    text = re.sub(r"\n  mira: \{[^}]*\}", "", text, count=1)  # mira is gone: only moira holds that key now
    text = text.rstrip("\n") + f'\n  moira: {{team: model-risk, roles: [model_approver], public_key: "{mira_key}"}}\n'
    strict = demo_off(text)
    assert strict.identities["moira"].demo is False
    with pytest.raises(ApprovalError, match="moira lists a public key whose private key ships in assets/demo_identities"):
        check(strict, mira_signs(approver="moira"))


def test_the_shipped_demo_keys_are_known_without_reading_the_files():
    """The constants are the public halves of exactly the keys shipped in assets/demo_identities."""
    from platform_defs.policy import SHIPPED_DEMO_KEYS
    from resources.approvals import public_key_b64

    assert {public_key_b64(load_private_key(f)) for f in KEYS.glob("*.key")} == SHIPPED_DEMO_KEYS


def test_two_identities_with_one_key_are_refused_at_load(tmp_path):
    """Whoever holds the key could sign as either: one key, one identity."""
    text = POLICY.read_text()
    rob_key = re.search(r'rob: \{[^}]*public_key: "([^"]+)"', text).group(1)
    text = text.replace("model-risk: {members: [mira]}", "model-risk: {members: [mira, robin]}", 1)
    bad = tmp_path / "policy.yaml"
    bad.write_text(text.rstrip("\n") + f'\n  robin: {{team: model-risk, roles: [model_approver], public_key: "{rob_key}"}}\n')
    with pytest.raises(PolicyError, match="identities.robin.public_key.*the same key as identities.rob"):
        load_policy(bad)


# -- an approval is its signed payload: copies, revocations across policy changes, the signed first release ------


def test_a_revoked_approval_appended_again_stays_revoked_and_a_copy_never_counts_twice(book, policy):
    """Whoever can append to the ledger (the platform's user; the approver too) appends mira's revoked approval
    again: once as it was, once with its signature spelled differently (base64 decoding skips a stray
    character, so the copy still verifies). A revocation naming her entry covers both copies, a revocation of
    all covers the copies made after it, and an approval recorded twice is one approval."""
    register(book, "9")
    a = approve_in_ledger(book, "9")
    named = revoke_in_ledger(book, "9", "mira", approval_entry=a.seq)
    book.append("approval", MODEL, dict(a.data), "mira", env="prod")
    book.append("approval", MODEL, {**a.data, "signature": "!" + a.data["signature"]}, "mira", env="prod")
    s = standing_of(book, policy, "9")
    assert s.valid == [] and [(e.seq, re.seq) for e, _, re, _ in s.revoked] == [(a.seq, named.seq)]
    assert len(s.duplicates) == 2 and all(f"a copy of approval #{a.seq}" in d for d in s.duplicates)

    b = approve_in_ledger(book, "9", who="pat")
    book.append("approval", MODEL, dict(b.data), "pat", env="prod")
    s = standing_of(book, policy, "9")
    assert [e.seq for e, _ in s.valid] == [b.seq]  # recorded twice, counted once
    every = revoke_in_ledger(book, "9", "pat")  # all of them
    book.append("approval", MODEL, dict(b.data), "pat", env="prod")  # pat's approval, appended after it
    s = standing_of(book, policy, "9")
    assert s.valid == [] and (b.seq, every.seq) in [(e.seq, re.seq) for e, _, re, _ in s.revoked]
    fresh = approve_in_ledger(book, "9", who="pat")  # signed after the revocation: a new approval counts
    assert [e.seq for e, _ in standing_of(book, policy, "9").valid] == [fresh.seq]


def test_an_approval_presigned_before_the_registration_does_not_pass_by_being_appended_again(book, policy):
    """mira signs version 12 before it exists, dated inside the clock skew, and records it; once version 12
    is registered she appends the same signed approval again, now after the registration entry. It is the
    approval first recorded before the registration, judged as that entry."""
    early = approve_in_ledger(book, "12", approved_at=(datetime.now(timezone.utc) + timedelta(minutes=4)).isoformat())
    reg = register(book, "12")
    book.append("approval", MODEL, dict(early.data), "mira", env="prod")
    s = standing_of(book, policy, "12")
    assert s.valid == [] and len(s.refused) == 1 and len(s.duplicates) == 1
    assert f"recorded (ledger #{early.seq}) before version 12 of credit_risk was registered (ledger #{reg.seq})" \
        in s.refused[0]


def _nadia(tmp_path: Path, demo_text: str) -> tuple[str, Path]:
    """The example policy plus nadia, an approver whose key is her own (not a shipped demo key)."""
    from resources.approvals import generate_key

    nadia_key = tmp_path / "nadia.key"
    public = generate_key(nadia_key)
    text = demo_text.replace("model-risk: {members: [mira]}", "model-risk: {members: [mira, nadia]}", 1)
    assert text != demo_text
    return text.rstrip("\n") + f'\n  nadia: {{team: model-risk, roles: [model_approver], public_key: "{public}"}}\n', \
        nadia_key


@pytest.mark.parametrize("change,why", [
    ("mira: {team: model-risk, roles: [model_approver],", "mira may not revoke nadia's approval"),
    ("\ndemo: true\n", "mira is marked demo"),
])
def test_a_revocation_stands_after_a_policy_change_that_would_refuse_it(book, tmp_path, change, why):
    """nadia approved version 10 and mira, an approver (a demo identity, in a policy in demo mode), revoked
    it. Then pat, a platform admin, records a policy change that would refuse mira's revocation if it were
    signed today: mira loses her role, or demo mode is switched off. The revocation was valid when it was
    appended and stays valid; a revocation mira signs under the new policy is judged under it."""
    from platform_defs.policy import load_policy
    from tests.conftest import record_policy

    text, nadia_key = _nadia(tmp_path, POLICY.read_text())
    before, after = tmp_path / "before.yaml", tmp_path / "after.yaml"
    before.write_text(text)
    assert change in text
    after.write_text(text.replace(change, {"\ndemo: true\n": "\ndemo: false\n"}.get(
        change, "mira: {team: model-risk, roles: [],"), 1))
    record_policy(book, path=before)
    register(book, "10")

    def nadia_approves():
        a = sign(load_private_key(nadia_key), asset=MODEL, version="10", env="prod", reason="reviewed",
                 approver="nadia", run_id="run-10", digest=DIGEST)
        return book.append("approval", MODEL, a.as_dict(), "nadia", env="prod")

    a = nadia_approves()
    rev = revoke_in_ledger(book, "10", "mira", approval_entry=a.seq)
    assert standing_of(book, load_policy(before), "10").valid == []
    record_policy(book, path=after)
    today = load_policy(after)
    s = standing_of(book, today, "10")
    assert s.valid == [] and [(e.seq, re.seq) for e, _, re, _ in s.revoked] == [(a.seq, rev.seq)]
    b = nadia_approves()  # approved again under the new policy
    late = revoke_in_ledger(book, "10", "mira", approval_entry=b.seq)
    s = standing_of(book, today, "10")
    assert [e.seq for e, _ in s.valid] == [b.seq]
    assert any(x.startswith(f"revocation #{late.seq} by mira: ") and why in x for x in s.ignored_revocations)


def test_a_first_release_is_what_the_approver_signed_not_a_flag_beside_it(book, policy):
    """The rollback_path check accepts a first release in place of a previous version only when the approver
    signed it: a flag the platform's user writes next to a signed approval (as ``onepath approve`` used to
    record it) leaves the approval standing and proves no first release; a copy of a signed first release with
    the flag taken off does not verify; the signed one passes."""
    from types import SimpleNamespace

    from platform_defs.governance.gates import ModelGate
    from platform_defs.loader import load_organisation
    from platform_defs.registration import registration

    org = load_organisation()
    model = org.by_name[MODEL]
    features, label = org.model_features(model)
    gate = ModelGate(endpoint=org.by_name[ENDPOINT], model=model, dataset=org.by_name[model.dataset],
                     features=features, label=label, policy=policy, mlflow=None, data_store=None, ledger=book,
                     deployer=None)
    register(book, "11")
    reg = registration(book, MODEL, "11")
    v = SimpleNamespace(version="11", require_registration=lambda: reg)
    plain = sign(key("mira"), asset=MODEL, version="11", env="prod", reason="reviewed", approver="mira",
                 run_id="run-11", digest=DIGEST)
    forged = book.append("approval", MODEL, {**plain.as_dict(), "first_release": True}, "mira", env="prod")
    s = standing_of(book, policy, "11")
    assert [(e.seq, a.first_release) for e, a in s.valid] == [(forged.seq, False)]  # the approval it signed
    verdict = gate._check_rollback_path(v, "prod")
    assert not verdict.passed and "no signed first-release record" in verdict.summary
    signed = sign(key("pat"), asset=MODEL, version="11", env="prod", reason="first release", approver="pat",
                  run_id="run-11", digest=DIGEST, first_release=True)
    assert signed.first_release and signed.as_dict()["first_release"] is True
    stripped = book.append("approval", MODEL, {**signed.as_dict(), "first_release": False}, "pat", env="prod")
    refused = standing_of(book, policy, "11").refused
    assert any(x.startswith(f"#{stripped.seq} by pat: signature does not verify") for x in refused), refused
    book.append("approval", MODEL, signed.as_dict(), "pat", env="prod")
    verdict = gate._check_rollback_path(v, "prod")
    assert verdict.passed and verdict.summary.endswith("recorded and signed by pat")


def test_approve_first_release_signs_the_flag(cli, policy):
    book, run = cli
    reg = register(book, "7105")
    code, out = run("approve", MODEL, "--version", "7105", "--env", "prod", "--reason", "first one", "--as", "mira",
                    "--key", str(KEYS / "mira.key"), "--first-release")
    assert code == 0, out
    entry = [e for e in book.entries(kind="approval", subject=MODEL) if e.data.get("version") == "7105"][-1]
    a = Approval.from_dict(entry.data)
    assert a.first_release is True
    args = dict(asset=MODEL, version="7105", env="prod", owner_team="credit-risk", author="team:credit-risk",
                role="model_approver", registered=Registered.of_model(reg), approval_seq=entry.seq)
    verify(a, policy, **args)
    with pytest.raises(ApprovalError, match="signature does not verify"):  # the flag is under the signature
        verify(Approval.from_dict({**entry.data, "first_release": False}), policy, **args)
