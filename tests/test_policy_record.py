"""The policy in force is the signed record in the ledger (platform_defs/policy_record.py), not the file.

Driven as the attacker would: the platform's own user edits ``policy.yaml`` to add an approver (tier (b)),
writes a ``policy_recorded`` entry straight into the ledger, or signs a change with an admin key that only
the new policy names; each is refused, and an unrecorded edit blocks the real promotion flow until a
platform admin of the recorded policy applies it with ``onepath policy apply``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from platform_defs.governance.gates import model_checks
from platform_defs.policy import load_policy, policy_hash
from platform_defs.policy_record import (PolicyRecordError, policy_standing, record_policy, recorded_policies,
                                         signed_payload)
from resources.approvals import generate_key, load_private_key
from resources.ledger import Ledger
from tests.conftest import DEMO_KEYS, isolated_settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = (ROOT / "assets" / "policy.yaml").read_text()


def with_identity(text: str, name: str, team: str, roles: list[str], public_key: str, demo: bool = False) -> str:
    """The policy text with one more identity (and team member): the edit an attacker makes."""
    out = re.sub(rf"(\n  {team}: {{members: \[[^\]]*)\]", rf"\1, {name}]", text, count=1)
    assert out != text
    flag = ", demo: true" if demo else ""
    return out.rstrip("\n") + f'\n  {name}: {{team: {team}, roles: [{", ".join(roles)}]{flag}, public_key: "{public_key}"}}\n'


def production_text(admin_key: str) -> str:
    """The example policy out of demo mode, with a real (non-demo) platform admin, ada."""
    text = EXAMPLE.replace("\ndemo: true\n", "\ndemo: false\n", 1)
    assert "demo: false" in text
    return with_identity(text, "ada", "platform", ["platform_admin"], admin_key)


@pytest.fixture
def book(backend) -> Ledger:
    """The ledger, on sqlite and then on PostgreSQL (its keys under tmp_path/keys)."""
    return backend.ledger()


@pytest.fixture
def ada(tmp_path):
    path = tmp_path / "ada.key"
    return path, generate_key(path)


def test_first_record_is_trust_on_first_use_and_a_second_init_is_refused(book, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    with pytest.raises(PolicyRecordError, match="'mira' is not a platform_admin of .* rule: a policy is signed by"):
        record_policy(book, path, signer="mira", key=load_private_key(DEMO_KEYS / "mira.key"), initial=True)
    assert not policy_standing(book, load_policy(path)).ok
    entry = record_policy(book, path, signer="pat", key=load_private_key(DEMO_KEYS / "pat.key"), initial=True)
    d = entry.data
    assert entry.kind == "policy_recorded" and d["hash"] == policy_hash(load_policy(path)) and d["diff"] == ""
    assert d["previous_hash"] is None and d["previous_entry"] is None and d["text"] == EXAMPLE and d["demo"] is True
    assert len(base64.b64decode(d["platform_key"])) == 32
    standing = policy_standing(book, load_policy(path))
    assert standing.ok and standing.entry_seq == entry.seq and standing.hash == d["hash"]
    with pytest.raises(PolicyRecordError, match=f"a policy is already recorded \\(ledger #{entry.seq}"):
        record_policy(book, path, signer="pat", key=load_private_key(DEMO_KEYS / "pat.key"), initial=True)
    with pytest.raises(PolicyRecordError, match="nothing changed"):
        record_policy(book, path, signer="pat", key=load_private_key(DEMO_KEYS / "pat.key"), initial=False)


def test_a_change_signed_by_an_admin_only_the_new_policy_names_is_refused(book, tmp_path, ada):
    key_file, public = ada
    path = tmp_path / "policy.yaml"
    path.write_text(production_text(public))
    first = record_policy(book, path, signer="ada", key=load_private_key(key_file), initial=True)
    # the attacker makes themselves a platform admin in the file, and signs the change with their own key
    generate_key(tmp_path / "eve.key")
    eve_public = load_policy_key(tmp_path / "eve.key")
    path.write_text(with_identity(production_text(public), "eve", "model-risk", ["platform_admin", "model_approver"],
                                  eve_public))
    with pytest.raises(PolicyRecordError) as err:
        record_policy(book, path, signer="eve", key=load_private_key(tmp_path / "eve.key"), initial=False)
    assert str(err.value).startswith(f"'eve' is not a platform_admin of the policy recorded in ledger #{first.seq} "
                                     f"(its platform admins: ada")
    assert "rule: a policy is signed by a platform admin of the policy recorded before it" in str(err.value)
    assert [r.seq for r in recorded_policies(book)] == [first.seq]
    # ada's key, claimed under ada's name, by anyone without it: refused
    with pytest.raises(PolicyRecordError, match="the key given is not ada's"):
        record_policy(book, path, signer="ada", key=load_private_key(tmp_path / "eve.key"), initial=False)
    # a platform admin of the recorded policy applies it: recorded, with its diff, and in force
    second = record_policy(book, path, signer="ada", key=load_private_key(key_file), initial=False)
    assert second.data["previous_entry"] == first.seq and second.data["previous_hash"] == first.data["hash"]
    assert "+  eve: {team: model-risk" in second.data["diff"]
    assert policy_standing(book, load_policy(path)).entry_seq == second.seq


def load_policy_key(path: Path) -> str:
    from resources.approvals import public_key_b64

    return public_key_b64(load_private_key(path))


def test_a_policy_record_written_straight_into_the_ledger_breaks_the_standing_naming_the_entry(book, tmp_path, ada):
    """Tier (b): the platform's user appends a policy_recorded entry of its own (well linked, correctly
    hashed, claiming ada) with a signature it made without ada's key."""
    key_file, public = ada
    path = tmp_path / "policy.yaml"
    path.write_text(production_text(public))
    first = record_policy(book, path, signer="ada", key=load_private_key(key_file), initial=True)
    generate_key(tmp_path / "mallory.key")
    forged_text = with_identity(production_text(public), "mallory", "model-risk", ["model_approver"],
                                load_policy_key(tmp_path / "mallory.key"))
    (tmp_path / "forged.yaml").write_text(forged_text)
    forged_policy = load_policy(tmp_path / "forged.yaml")
    data = {**first.data, "hash": policy_hash(forged_policy), "previous_hash": first.data["hash"],
            "previous_entry": first.seq, "text": forged_text, "diff": "", "signed_by": "ada",
            "text_sha256": hashlib.sha256(forged_text.encode()).hexdigest()}
    data["signature"] = base64.b64encode(load_private_key(tmp_path / "mallory.key").sign(signed_payload(data))).decode()
    forged = book.append("policy_recorded", "policy", data, "ada")
    standing = policy_standing(book, forged_policy, tmp_path / "forged.yaml")
    assert not standing.ok
    assert standing.problem.startswith(f"the recorded policy chain is broken: policy record ledger #{forged.seq}: "
                                       f"the signature does not verify with ada's public key")
    # nor does the file the attacker wanted stand on the genuine record any more: the chain is broken
    assert not policy_standing(book, load_policy(path), path).ok


def test_demo_identities_sign_only_under_a_demo_policy(book, tmp_path, ada):
    _, public = ada
    path = tmp_path / "policy.yaml"
    path.write_text(production_text(public))
    with pytest.raises(PolicyRecordError, match="'pat' is a demo identity .* rule: demo identities sign only under"):
        record_policy(book, path, signer="pat", key=load_private_key(DEMO_KEYS / "pat.key"), initial=True)
    # the same shipped key under another name, without the demo flag: still a demo identity
    pat_public = load_policy_key(DEMO_KEYS / "pat.key")
    without_pat = re.sub(r"\n  pat: \{[^}]*\}", "", production_text(public), count=1)  # one key, one identity
    path.write_text(with_identity(without_pat, "ops", "platform", ["platform_admin"], pat_public))
    with pytest.raises(PolicyRecordError, match="'ops' is a demo identity"):
        record_policy(book, path, signer="ops", key=load_private_key(DEMO_KEYS / "pat.key"), initial=True)
    assert recorded_policies(book) == []


def test_the_production_profile_refuses_a_demo_policy(book, tmp_path, monkeypatch):
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    record_policy(book, path, signer="pat", key=load_private_key(DEMO_KEYS / "pat.key"), initial=True)
    assert policy_standing(book, load_policy(path), path).ok
    monkeypatch.setenv("ONEPATH_PROFILE", "production")
    standing = policy_standing(book, load_policy(path), path)
    assert not standing.ok and "demo mode on (demo: true)" in standing.problem
    assert "ONEPATH_PROFILE=production" in standing.problem


def test_the_production_profile_needs_a_pinned_witness(book, tmp_path, ada, monkeypatch):
    """Out of demo mode, but no witness pinned: an insider with the platform key could rewrite history
    undetected, which the production profile does not accept."""
    key_file, public = ada
    path = tmp_path / "policy.yaml"
    path.write_text(production_text(public))
    record_policy(book, path, signer="ada", key=load_private_key(key_file), initial=True)
    assert policy_standing(book, load_policy(path), path).ok
    monkeypatch.setenv("ONEPATH_PROFILE", "production")
    standing = policy_standing(book, load_policy(path), path)
    assert not standing.ok and standing.problem.startswith("the production profile (ONEPATH_PROFILE=production) needs "
                                                           "a ledger witness pinned in the recorded policy (ledger #1")


def test_a_different_platform_key_is_refused(book, tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    first = record_policy(book, path, signer="pat", key=load_private_key(DEMO_KEYS / "pat.key"), initial=True)
    path.write_text(EXAMPLE.replace("seconds: 60\n", "seconds: 90\n", 1))
    swapped = Ledger(book.store.url, tmp_path / "other-keys" / "platform.key")  # the key pair replaced
    with pytest.raises(PolicyRecordError, match=f"is not the one pinned in ledger #{first.seq} .*restore the pinned key pair"):
        record_policy(swapped, path, signer="pat", key=load_private_key(DEMO_KEYS / "pat.key"), initial=False)


# --------------------------------------------------------------------------------------------
# Through the real promotion flow and the command line


def onepath(world, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONEPATH_HOME": str(world["settings"].home),
           "ONEPATH_POLICY_FILE": str(world["policy_file"])}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DAGSTER_HOME", None)
    return subprocess.run([sys.executable, "-m", "platform_defs.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    """churn v1 serving staging under the recorded example policy (a copy of the file, in use)."""
    from platform_defs.definitions import build_definitions
    from platform_defs.loader import load_organisation
    from platform_defs.promotion import Services
    from platform_defs.wiring import build_resources
    from tests.conftest import record_policy as record_test_policy

    s = isolated_settings(settings, tmp_path_factory.mktemp("policy_home"), port_offset=130)
    policy_file = s.home / "policy.yaml"
    policy_file.write_text(EXAMPLE)
    saved = os.environ.get("ONEPATH_POLICY_FILE")
    os.environ["ONEPATH_POLICY_FILE"] = str(policy_file)
    resources = build_resources(s)
    book = resources["ledger"].ledger()
    try:
        policy = load_policy()
        record_test_policy(book, path=policy_file)
        defs = build_definitions(settings=s, policy=policy)
        with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("policy_instance"))) as instance:
            dg.materialize(list(defs.assets), selection=["customer_activity", "churn", "churn_scoring_staging"],
                           resources=defs.resources, instance=instance)
            services = Services(mlflow=resources["mlflow"], deployer=resources["deployer_local"].deployer(),
                                ledger=book, data_store=resources["data_store"])
            yield {"org": load_organisation(), "services": services, "book": book, "settings": s,
                   "policy_file": policy_file, "instance": instance}
            services.deployer.stop_all()
    finally:
        if saved is None:
            os.environ.pop("ONEPATH_POLICY_FILE", None)
        else:
            os.environ["ONEPATH_POLICY_FILE"] = saved


def test_approve_never_falls_back_to_a_shipped_demo_key(world):
    out = onepath(world, "approve", "churn", "--version", "1", "--env", "prod", "--as", "mira", "--reason", "ok")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    own = world["settings"].home / "keys" / "identities" / "mira.key"
    assert out.stderr.strip() == f"onepath: approval refused: no private key at {own}: run 'onepath keys init' first"
    assert not world["book"].entries(kind="approval")


def test_an_unrecorded_edit_of_the_policy_blocks_promotion_until_an_admin_applies_it(world, tmp_path):
    """Tier (b): the platform's user adds an approver to policy.yaml. Nothing promotes under it: every
    check of the prod gate fails saying which command records it; once pat (an admin of the recorded
    policy) applies it, the same promotion goes through, judged under the recorded change."""
    from platform_defs.promotion import PromotionError, endpoint_target, promote_endpoint
    from resources.deployers.base import serving_version

    book, services, path = world["book"], world["services"], world["policy_file"]
    generate_key(tmp_path / "eve.key")
    path.write_text(with_identity(EXAMPLE, "eve", "model-risk", ["model_approver"],
                                  load_policy_key(tmp_path / "eve.key")))
    edited = load_policy(path)
    with pytest.raises(PromotionError) as err:
        promote_endpoint(world["org"], edited, "churn_scoring", "prod", services=services, actor="run-1",
                         trigger="test")
    verdicts = err.value.verdicts
    assert [v.check for v in verdicts] == model_checks(edited.track("ml-standard"), "prod")
    for v in verdicts:
        assert not v.passed and f"{path} (sha256 {policy_hash(edited)[:12]}…) differs from the policy recorded in " \
                                f"ledger #" in v.summary
        assert "onepath policy apply --as <an admin of the recorded policy: pat>, or restore the file" in v.summary
    gate = book.entries(kind="gate_verdict", subject="churn_scoring", env="prod")[-1]
    assert gate.data["passed"] is False and gate.data["policy_entry"] is None
    assert gate.data["policy_hash"] == policy_hash(edited) and "onepath policy apply" in gate.data["policy_problem"]
    assert serving_version(services.deployer.status(endpoint_target(world["org"].by_name["churn_scoring"], "prod"))) \
        is None

    # the same through the graph (what the UI runs): the prod asset's blocking checks fail, saying why
    from platform_defs.definitions import build_definitions

    defs = build_definitions(settings=world["settings"], policy=edited)
    run = dg.materialize(list(defs.assets), selection=["churn_scoring_prod"], resources=defs.resources,
                         instance=world["instance"], raise_on_error=False)
    checks = run.get_asset_check_evaluations()
    assert not run.success and checks and all(not c.passed for c in checks)
    assert all("onepath policy apply --as" in c.metadata["verdict"].value for c in checks)

    shown = onepath(world, "policy", "show")
    assert shown.returncode == 1 and "differs from the policy recorded in ledger #" in shown.stdout
    assert "+  eve: {team: model-risk" in shown.stdout
    refused = onepath(world, "policy", "apply", "--as", "eve", "--key", str(tmp_path / "eve.key"))
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert "'eve' is not a platform_admin of the policy recorded in ledger #" in refused.stderr
    applied = onepath(world, "policy", "apply", "--as", "pat", "--key", str(DEMO_KEYS / "pat.key"))
    assert applied.returncode == 0, applied.stderr
    assert "+  eve: {team: model-risk" in applied.stdout and "recorded the change to" in applied.stdout
    record = book.entries(kind="policy_recorded")[-1]
    assert record.data["hash"] == policy_hash(edited) and record.data["signed_by"] == "pat"

    result = promote_endpoint(world["org"], edited, "churn_scoring", "prod", services=services, actor="run-2",
                              trigger="test")
    assert result.outcome == "deployed" and result.version == "1"
    gate = book.entries(kind="gate_verdict", subject="churn_scoring", env="prod")[-1]
    assert gate.data["passed"] is True and gate.data["policy_entry"] == record.seq
    assert gate.data["policy_hash"] == policy_hash(edited)


def test_audit_verify_catches_a_forged_record_that_pins_a_swapped_platform_key(backend, tmp_path, ada, monkeypatch,
                                                                              capsys):
    """Tier (b) with the platform key: append a policy record (correctly linked, signed with a key of its own)
    that pins a NEW platform key, swap the key pair under keys/, and go on appending with the new key. The
    ledger, which reads pins as data, accepts the new key; ``onepath audit verify`` checks the policy chain
    and fails, naming the record."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from platform_defs.cli import main
    from tests.stores import ledger_env

    book = backend.ledger("home")
    for var, value in ledger_env(book).items():
        monkeypatch.setenv(var, value)
    key_path = book.key_path
    key_file, public = ada
    path = tmp_path / "policy.yaml"
    path.write_text(production_text(public))
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(path))
    first = record_policy(book, path, signer="ada", key=load_private_key(key_file), initial=True)
    book.append("deploy", "credit_scoring", {"version": "1"}, "dagster:r1", env="prod")
    assert main(["audit", "verify"]) == 0
    assert "policy in force: ledger #1" in capsys.readouterr().out

    new = Ed25519PrivateKey.generate()
    raw = new.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    data = {**first.data, "previous_hash": first.data["hash"], "previous_entry": first.seq, "diff": "",
            "platform_key": base64.b64encode(raw).decode()}
    data["signature"] = base64.b64encode(new.sign(signed_payload(data))).decode()  # not ada's key
    forged = book.append("policy_recorded", "policy", data, "ada")
    key_path.write_bytes(new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.with_suffix(".pub").write_bytes(new.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    Ledger(book.store.url, key_path).append("deploy", "credit_scoring", {"version": "666"}, "dagster:r2", env="prod")
    assert main(["audit", "verify"]) == 1
    err = capsys.readouterr().err
    assert f"policy chain BROKEN: policy record ledger #{forged.seq}" in err
    assert not policy_standing(book, load_policy(path), path).ok  # and nothing promotes


def test_a_record_deleted_beneath_the_head_takes_no_effect(book, tmp_path, ada):
    """Tier (b) without the key: policy v2 is recorded, then its row is deleted with sqlite or psql (the
    triggers dropped) and the v1 file put back. The chain of the remaining records would say v1 is in force; the
    standing reads them only from an intact ledger, so nothing promotes until the ledger is restored."""
    from tests.test_ledger import tamper

    key_file, public = ada
    path = tmp_path / "policy.yaml"
    v1 = production_text(public)
    path.write_text(v1)
    record_policy(book, path, signer="ada", key=load_private_key(key_file), initial=True)
    path.write_text(v1.replace("seconds: 60\n", "seconds: 90\n", 1))
    v2 = record_policy(book, path, signer="ada", key=load_private_key(key_file), initial=False)
    book.append("deploy", "credit_scoring", {"version": "1"}, "dagster:r1", env="prod")
    path.write_text(v1)
    tamper(book, ("DELETE FROM ledger_entries WHERE seq = ?", (v2.seq,)))
    standing = policy_standing(book, load_policy(path), path)
    assert not standing.ok
    assert standing.problem.startswith(f"the ledger is not intact at entry #{v2.seq} (")
    assert standing.problem.endswith("nothing promotes until it is restored (onepath audit verify)")


def test_bad_keys_and_a_tampered_ledger_are_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    import sqlite3

    from platform_defs.cli import main
    from resources.ledger import ledger_paths

    home = tmp_path / "home"
    monkeypatch.setenv("ONEPATH_HOME", str(home))
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(ROOT / "assets" / "policy.yaml"))
    assert main(["policy", "init", "--as", "pat", "--key", str(tmp_path)]) == 1  # a folder, not a key
    err = capsys.readouterr().err.strip()
    assert err.startswith("onepath: ") and "cannot read the private key" in err and "\n" not in err
    assert main(["policy", "init", "--as", "pat", "--key", str(DEMO_KEYS / "pat.key")]) == 0
    db, _ = ledger_paths(home)
    conn = sqlite3.connect(db)  # tier (b) without the key: a correctly linked row inserted with sqlite
    seq, h = conn.execute("SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1").fetchone()
    conn.execute("INSERT INTO ledger_entries VALUES (?,?,?,?,?,?,?,?,?)",
                 (seq + 1, "2026-12-01T00:00:00+00:00", "approval", "x", None, "mallory", "{}", h, "f" * 64))
    conn.commit()
    conn.close()
    capsys.readouterr()
    edited = tmp_path / "policy.yaml"
    edited.write_text(EXAMPLE.replace("seconds: 60\n", "seconds: 90\n", 1))
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(edited))
    assert main(["policy", "apply", "--as", "pat", "--key", str(DEMO_KEYS / "pat.key")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("onepath: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
