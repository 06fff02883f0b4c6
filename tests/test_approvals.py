"""The policy file validates with file-and-key errors; approvals cannot be forged by setting a variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from platform_defs.policy import PolicyError, load_policy
from resources.approvals import ApprovalError, Approval, generate_key, load_private_key, sign, verify

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "assets" / "policy.yaml"
KEYS = ROOT / "assets" / "demo_identities"


@pytest.fixture(scope="module")
def policy():
    return load_policy(POLICY)


def check(policy, approval: Approval, **over):
    args = {"asset": "credit_scoring", "version": "3", "env": "prod", "owner_team": "credit-risk",
            "author": "carla", "role": "model_approver", **over}
    verify(approval, policy, **args)


def mira_signs(**over) -> Approval:
    args = {"asset": "credit_scoring", "version": "3", "env": "prod", "reason": "fairness reviewed",
            "approver": "mira", **over}
    return sign(load_private_key(KEYS / "mira.key"), **args)


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
    a = {"pat": lambda: sign(load_private_key(KEYS / "pat.key"), asset="credit_scoring", version="3", env="prod",
                             reason="ok", approver="pat"),
         "mira": mira_signs,
         "mira-staging": lambda: mira_signs(env="staging"),
         "carla": lambda: sign(load_private_key(KEYS / "carla.key"), asset="credit_scoring", version="3",
                               env="prod", reason="ok", approver="carla")}[approval]()
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
             reason="trust me", approver="mira")
    with pytest.raises(ApprovalError, match="signature does not verify with mira's public key"):
        check(policy, a)


def test_unknown_approver_is_refused(policy, tmp_path):
    generate_key(tmp_path / "x.key")
    a = sign(load_private_key(tmp_path / "x.key"), asset="credit_scoring", version="3", env="prod",
             reason="r", approver="mallory")
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
    text = text.rstrip("\n") + f'\n  moira: {{team: model-risk, roles: [model_approver], public_key: "{mira_key}"}}\n'
    strict = demo_off(text)
    assert strict.identities["moira"].demo is False
    with pytest.raises(ApprovalError, match="moira lists a public key whose private key ships in assets/demo_identities"):
        check(strict, mira_signs(approver="moira"))


def test_the_cli_never_falls_back_to_a_shipped_key(monkeypatch, tmp_path):
    from platform_defs.cli_governance import identity_key_path

    monkeypatch.setenv("ONEPATH_HOME", str(tmp_path))
    assert identity_key_path("mira") == tmp_path.resolve() / "keys" / "identities" / "mira.key"
    assert (KEYS / "mira.key").exists()
