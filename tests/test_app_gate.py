"""The app track's gate on real releases: a planted secret or shell injection refuses the release;
a reviewer who authored changes in it cannot review it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from platform_defs.governance.gates import AppGate
from platform_defs.loader import load_organisation
from platform_defs.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gate():
    org = load_organisation(ROOT / "assets")
    return AppGate(app=org.by_name["loan_portal"], policy=load_policy(), ledger=None, deployer=None,
                   source_dir=ROOT / "apps" / "loan_portal", repo_root=ROOT)


def build(tmp_path: Path) -> Path:
    dst = tmp_path / "r-test"
    shutil.copytree(ROOT / "apps" / "loan_portal", dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_the_real_app_passes_the_scan(gate, tmp_path):
    verdict = gate._check_security_scan("r-test", build(tmp_path), "staging")
    assert verdict.passed, verdict.summary


def test_planted_shell_injection_refuses_the_release(gate, tmp_path):
    b = build(tmp_path)
    (b / "loan_portal" / "ops.py").write_text("import subprocess\n\n\ndef run(cmd):\n"
                                              "    return subprocess.call(cmd, shell=True)\n")
    verdict = gate._check_security_scan("r-test", b, "staging")
    assert not verdict.passed
    table = verdict.markdown["findings_table"]
    assert "loan_portal/ops.py | 5 | HIGH | B602" in table


def test_planted_secret_refuses_the_release(gate, tmp_path):
    b = build(tmp_path)
    key = "AKIA" + "IOSFODNN7" + "EXAMPLE"  # assembled so this file holds no secret itself
    (b / "loan_portal" / "settings_local.py").write_text(f'AWS_ACCESS_KEY_ID = "{key}"\n')
    verdict = gate._check_security_scan("r-test", b, "staging")
    assert not verdict.passed
    assert "loan_portal/settings_local.py | 1" in verdict.markdown["findings_table"]
    assert "AWS Access Key" in verdict.markdown["findings_table"]


def test_a_reviewer_who_authored_a_change_cannot_review(tmp_path, monkeypatch):
    """rob's commit email is among the authors of the app's source: his review is refused."""
    from resources.approvals import ApprovalError, load_private_key, sign, verify

    from datetime import datetime, timedelta, timezone

    from resources.approvals import Registered

    policy = load_policy()
    authors = {"rob@lending.example", "someone@lending.example"}
    # the release as its release_built entry recorded it: the review binds its content hash (run id "")
    built = Registered("release r-1 of loan_portal", "", "c" * 64,
                       (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat(), 3)
    a = sign(load_private_key(ROOT / "assets" / "demo_identities" / "rob.key"), asset="loan_portal",
             version="r-1", env="prod", reason="lgtm", approver="rob", run_id="", digest="c" * 64)
    with pytest.raises(ApprovalError, match="authored changes in release r-1"):
        verify(a, policy, asset="loan_portal", version="r-1", env="prod", owner_team="digital-lending",
               author=None, role="code_reviewer", registered=built, other_team=False, author_emails=authors)
    # from the same team, but not an author: accepted
    verify(a, policy, asset="loan_portal", version="r-1", env="prod", owner_team="digital-lending",
           author=None, role="code_reviewer", registered=built, other_team=False,
           author_emails={"dana@lending.example"})
    # ... for that content only
    with pytest.raises(ApprovalError, match=f"binds digest {'c' * 64}, but release r-1 of loan_portal was registered with digest {'b' * 64}"):
        verify(a, policy, asset="loan_portal", version="r-1", env="prod", owner_team="digital-lending",
               author=None, role="code_reviewer", registered=Registered(built.what, "", "b" * 64, built.ts, 3),
               other_team=False, author_emails={"dana@lending.example"})


def test_authors_come_from_git_history(gate):
    emails = gate.authors()
    expected = subprocess.run(["git", "log", "--format=%ae", "--", "apps/loan_portal"], cwd=ROOT,
                              capture_output=True, text=True).stdout.split()
    assert emails and emails == {e.lower() for e in expected}


def test_code_review_fails_closed_when_git_cannot_list_the_authors(tmp_path):
    """rob authored a change to the release, so his review never counts; removing the checkout's .git (the
    platform's own user can) leaves git unable to say who authored what: no list is not an empty list, so
    the review still does not count and the verdict names git's error."""
    from resources.approvals import load_private_key, sign
    from resources.ledger import Ledger

    app = load_organisation(ROOT / "assets").by_name["loan_portal"]
    repo = tmp_path / "checkout"
    source = repo / "apps" / "loan_portal"
    shutil.copytree(ROOT / "apps" / "loan_portal", source, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=rob", "-c", "user.email=rob@lending.example", "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "rob's change"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True)
    book = Ledger(tmp_path / "ledger.db", tmp_path / "platform.key")
    book.append("release_built", "loan_portal", {"version": "r-1", "content_hash": "c" * 64, "files": 1}, "dagster")
    review = sign(load_private_key(ROOT / "assets" / "demo_identities" / "rob.key"), asset="loan_portal",
                  version="r-1", env="prod", reason="lgtm", approver="rob", run_id="", digest="c" * 64)
    book.append("approval", "loan_portal", review.as_dict(), "rob", env="prod")
    gate = AppGate(app=app, policy=load_policy(), ledger=book, deployer=None, source_dir=source, repo_root=repo)
    v = gate._check_code_review("r-1", source, "prod")
    assert gate.authors() == {"rob@lending.example"}
    assert not v.passed and "authored changes in release r-1" in v.markdown["refused_reviews"]
    shutil.rmtree(repo / ".git")
    v = gate._check_code_review("r-1", source, "prod")
    assert not v.passed and v.metadata["authors"] == "unknown"
    assert v.summary.startswith("git could not list the commit authors of release r-1 of loan_portal, so no reviewer "
                                "can be shown independent of them: git log exited 128 in ")
    assert "not a git repository" in v.summary


def test_an_app_way_back_needs_the_recorded_policy_a_gate_under_it_and_a_review_that_was_not_revoked(tmp_path,
                                                                                                   monkeypatch):
    """The release the backend may put back on its own when the new one crash-loops (and the one a supervisor
    reports restoring) is judged like a model's way back: not under a policy file that is not the recorded
    one, not on a gate passed under another policy, not when its code review in that environment was revoked."""
    import yaml

    from platform_defs.policy import policy_hash
    from platform_defs.promotion import Services, _app_fallback, app_governed
    from resources.approvals import load_private_key, sign, sign_revocation
    from resources.ledger import Ledger
    from tests.conftest import record_policy

    app = load_organisation(ROOT / "assets").by_name["loan_portal"]
    policy = load_policy()
    book = Ledger(tmp_path / "ledger.db", tmp_path / "platform.key")
    record_policy(book)
    releases = tmp_path / "releases"
    for r in ("r-1", "r-2"):
        (releases / "apps" / "loan_portal" / r).mkdir(parents=True)
        book.append("release_built", "loan_portal", {"version": r, "content_hash": r[-1] * 64, "files": 1}, "dagster")
    gate_passed = {"app": "loan_portal", "version": "r-1", "passed": True, "policy_hash": policy_hash(policy),
                   "verdicts": {}}
    book.append("gate_verdict", "loan_portal", gate_passed, "dagster", env="prod")
    book.append("deploy", "loan_portal", {"app": "loan_portal", "version": "r-1"}, "dagster", env="prod")
    rob = load_private_key(ROOT / "assets" / "demo_identities" / "rob.key")
    review = book.append("approval", "loan_portal", sign(rob, asset="loan_portal", version="r-1", env="prod",
                                                         reason="lgtm", approver="rob", run_id="",
                                                         digest="1" * 64).as_dict(), "rob", env="prod")
    services = Services(mlflow=None, deployer=None, ledger=book, releases_dir=releases)

    def fallback(p=policy):
        return _app_fallback(p, app, "prod", "r-2", services, {}, repo_root=ROOT)

    assert fallback().version == "r-1" and app_governed(policy, app, "prod", "r-1", services=services) is None
    # the policy file edited, not recorded: nothing is governed
    doc = yaml.safe_load((ROOT / "assets" / "policy.yaml").read_text())
    doc["tracks"]["app"]["approval_envs"] = []
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(tmp_path / "policy.yaml"))
    edited = load_policy()
    assert fallback(edited) is None
    why = app_governed(edited, app, "prod", "r-1", services=services)
    assert why.startswith("release r-1 cannot be judged: ") and "differs from the policy recorded in ledger #" in why
    monkeypatch.delenv("ONEPATH_POLICY_FILE")
    # a gate passed under another policy: an app's way back runs no gate again, so it refuses
    book.append("gate_verdict", "loan_portal", {**gate_passed, "policy_hash": "0" * 64}, "dagster", env="prod")
    assert fallback() is None
    assert "under another policy than the one in force" in app_governed(policy, app, "prod", "r-1", services=services)
    book.append("gate_verdict", "loan_portal", gate_passed, "dagster", env="prod")
    assert fallback().version == "r-1"
    # its code review in prod revoked: it does not come back
    rev = sign_revocation(rob, asset="loan_portal", version="r-1", env="prod", reason="missed a bug", revoker="rob",
                          approval_entry=review.seq)
    book.append("approval_revoked", "loan_portal", rev.as_dict(), "rob", env="prod")
    assert fallback() is None
    assert app_governed(policy, app, "prod", "r-1", services=services).startswith(
        "release r-1's code review in prod was revoked: ")


def test_an_app_release_approved_for_prod_is_promoted_by_the_approved_promotions_sensor(tmp_path):
    """The review of a release staging serves asks the sensor for exactly that release in prod, as an approval
    of a model's version does (it used to skip it: 'no new approvals'); a release staging does not serve
    waits, saying why."""
    from types import SimpleNamespace

    import dagster as dg

    from resources.approvals import load_private_key, sign
    from resources.ledger import Ledger, ledger_paths
    from sensors.approval_promotion import build_approval_promotion_sensor

    org = load_organisation(ROOT / "assets")
    book = Ledger(*ledger_paths(tmp_path / "home"))
    serves = {("loan_portal", "staging"): "r-1"}

    class Deployer:  # what each environment serves, as the supervisor reports it
        def status(self, target):
            version = serves.get((target.name, target.env))
            return SimpleNamespace(detail={"supervisor": {"state": "current", "version": version} if version else {}},
                                   healthy=bool(version), serving_version=version)

    resources = {"ledger": SimpleNamespace(ledger=lambda: book),
                 "deployer_local": SimpleNamespace(deployer=lambda: Deployer())}
    sensor = build_approval_promotion_sensor(org)
    rob = load_private_key(ROOT / "assets" / "demo_identities" / "rob.key")
    for version in ("r-0", "r-1"):
        book.append("approval", "loan_portal", sign(rob, asset="loan_portal", version=version, env="prod",
                                                    reason="lgtm", approver="rob", run_id="",
                                                    digest="1" * 64).as_dict(), "rob", env="prod")
    with dg.build_sensor_context(resources=resources) as ctx:
        result = sensor.evaluate_tick(ctx)
    (request,) = result.run_requests
    assert request.asset_selection == [dg.AssetKey("loan_portal_prod")]
    assert request.tags["onepath/approved_version"] == "r-1" and request.tags["onepath/approver"] == "rob"
    serves[("loan_portal", "prod")] = "r-1"
    book.append("approval", "loan_portal", sign(rob, asset="loan_portal", version="r-1", env="prod", reason="again",
                                                approver="rob", run_id="", digest="1" * 64).as_dict(), "rob",
                env="prod")
    with dg.build_sensor_context(resources=resources, cursor=result.cursor) as ctx:
        again = sensor.evaluate_tick(ctx)
    assert again.run_requests == [] and "loan_portal.prod already serves r-1" in again.skip_message
