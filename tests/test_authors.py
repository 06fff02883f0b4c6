"""A version's author is the identity that signed its registration; run tags are claims.

One real world (MLflow on sqlite, the churn line materialized by Dagster): the run that trains and
promotes it is launched with spoofed tags -- ``dagster/user: mira`` and an ``onepath/trigger`` -- as any
launcher may set them, and the ml-standard track is made to hold staging for an approval, so the gate
runs and records its verdict without starting a server. Versions of ``credit_risk`` are registered
straight in MLflow, as from a notebook: one with only a client-set ``onepath.author``, one signed with
``onepath sign-version`` by carla, one whose signature was made over other bytes.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from platform_defs.definitions import build_definitions
from platform_defs.governance.gates import ModelGate, _Version
from platform_defs.loader import load_organisation
from platform_defs.registration import registration
from resources.approvals import load_private_key, sign, sign_revocation
from tests.conftest import isolated_settings, quick_policy, record_policy, save_credit_model

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT / "assets" / "demo_identities"
SPOOFED = {"dagster/user": "mira", "onepath/trigger": "drift", "onepath/drift_entry": "41"}


def held_policy():
    """The example policy, with ml-standard holding staging for an approval (and checking nothing else)."""
    policy = quick_policy()
    tracks = dict(policy.tracks)
    tracks["ml-standard"] = tracks["ml-standard"].model_copy(update={"checks": ["approval"],
                                                                     "approval_envs": ["staging"]})
    return policy.model_copy(update={"tracks": tracks})


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    iso = isolated_settings(settings, tmp_path_factory.mktemp("authors_home"), port_offset=130)
    policy = held_policy()
    defs = build_definitions(settings=iso, policy=policy)
    record_policy(defs.resources["ledger"].ledger(), policy)  # the policy the gates judge under is the recorded one
    with dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("authors_instance"))) as instance:
        result = dg.materialize(list(defs.assets), selection=["customer_activity", "churn", "churn_scoring_staging"],
                                resources=defs.resources, instance=instance, tags=SPOOFED, raise_on_error=False)
        res = defs.resources
        deployer = res["deployer_local"].deployer()
        book = res["ledger"].ledger()
        version = str(registration(book, "churn", "1").data["version"]) if registration(book, "churn", "1") else None
        yield {"settings": iso, "policy": policy, "result": result, "mlflow": res["mlflow"], "book": book,
               "deployer": deployer, "org": load_organisation(), "version": version}
        deployer.stop_all()


def gate(world, endpoint: str, model: str, dataset: str) -> ModelGate:
    org = world["org"]
    features, label = org.model_features(org.by_name[model])
    return ModelGate(endpoint=org.by_name[endpoint], model=org.by_name[model], dataset=org.by_name[dataset],
                     features=features, label=label, policy=world["policy"], mlflow=world["mlflow"],
                     data_store=None, ledger=world["book"], deployer=world["deployer"])


def approval_verdict(world, version: str, *, endpoint="churn_scoring", model="churn", dataset="customer_activity",
                     env="staging"):
    g = gate(world, endpoint, model, dataset)
    return g._check_approval(_Version(g, version), env)


def approve(world, model: str, version: str, who: str, env: str):
    reg = registration(world["book"], model, version).data
    a = sign(load_private_key(KEYS / f"{who}.key"), asset=model, version=version, env=env, reason="reviewed",
             approver=who, run_id=reg["run_id"] or "", digest=reg["digest"])
    return world["book"].append("approval", model, a.as_dict(), who, env=env)


def test_spoofed_run_tags_are_recorded_only_as_claims(world):
    run_id = world["result"].run_id
    reg = registration(world["book"], "churn", world["version"])
    assert reg is not None and reg.actor == f"dagster:{run_id}"
    assert reg.data["author"] == "team:retention" and reg.data["author_verified"] is True
    assert reg.data["registered_by"] == {"principal": "onepath", "run": run_id, "owner": "retention"}
    assert reg.data["claims"] == {"dagster/user": "mira"}
    assert world["mlflow"].get_version("churn", world["version"]).tags["onepath.author"] == "team:retention"
    recorded = [e for e in world["book"].entries(subject="churn_scoring", env="staging")
                if e.kind in ("gate_verdict", "awaiting_approval")]
    assert [e.kind for e in recorded] == ["gate_verdict", "awaiting_approval"]
    for e in recorded:
        assert e.actor == f"dagster:{run_id}"
        assert "trigger" not in e.data and "initiated_by" not in e.data
        assert e.data["claims"] == {"trigger": "drift #41", "initiated_by": "mira",
                                    "from": "dagster run tags (unauthenticated)"}


def test_an_approval_by_the_claimed_user_is_judged_by_the_registered_author_and_a_revocation_stops_it(world):
    """The run claimed mira started it; the registered author is the retention team, so mira's approval
    is independent. Revoked, the gate no longer counts it and says so."""
    version = world["version"]
    v = approval_verdict(world, version)
    assert not v.passed and v.summary.startswith("waiting for approval by mira, pat")
    entry = approve(world, "churn", version, "mira", "staging")
    v = approval_verdict(world, version)
    assert v.passed and v.metadata["approver"] == "mira" and v.metadata["ledger_entry"] == entry.seq
    rev = sign_revocation(load_private_key(KEYS / "mira.key"), asset="churn", version=version, env="staging",
                          reason="wrong holdout", revoker="mira", approval_entry=entry.seq)
    rev_entry = world["book"].append("approval_revoked", "churn", rev.as_dict(), "mira", env="staging")
    v = approval_verdict(world, version)
    assert not v.passed and v.metadata["revoked"] == 1
    assert v.summary.startswith(f"approval #{entry.seq} of churn version {version} in staging was revoked by mira")
    assert f"ledger #{rev_entry.seq}" in v.summary and "waiting for approval by" in v.summary
    assert f"#{entry.seq} by mira: revoked by mira" in v.markdown["refused_approvals"]


def notebook_version(world, tmp_path: Path, seed: int, tags: dict[str, str]) -> str:
    """A credit_risk version registered straight in MLflow (skops: a format onepath may load from outside)."""
    from mlflow.exceptions import MlflowException

    client = world["mlflow"].client()
    try:
        client.create_registered_model("credit_risk")
    except MlflowException:
        pass
    saved = save_credit_model(tmp_path / f"nb{seed}", rows=300, seed=seed)
    return str(client.create_model_version("credit_risk", source=str(saved), tags=tags).version)


def hand_off(world) -> None:
    from sensors.handoff import tick

    tick(world["org"], mlflow=world["mlflow"], book=world["book"], cursor={}, policy=world["policy"])


def credit_verdict(world, version: str):
    return approval_verdict(world, version, endpoint="credit_scoring", model="credit_risk",
                            dataset="credit_applications", env="prod")


def test_an_unsigned_notebook_version_has_no_author_and_fails_its_approval_check(world, tmp_path):
    version = notebook_version(world, tmp_path, 11, {"onepath.author": "mira"})  # the client says mira: a claim
    hand_off(world)
    reg = registration(world["book"], "credit_risk", version)
    assert reg.data["via"] == "handoff" and reg.data["author"] is None and reg.data["author_verified"] is False
    assert reg.data["claims"]["onepath.author"] == "mira"
    approve(world, "credit_risk", version, "pat", "prod")  # an approval does not make up for the unknown author
    v = credit_verdict(world, version)
    assert not v.passed
    assert v.summary == (f"version {version} of credit_risk was registered from outside onepath without a registration "
                         f"signature, so its author is unknown and independence cannot be checked: sign it with "
                         f"onepath sign-version credit_risk --version {version} --as <you> "
                         f"(README: Registering from a notebook)")


def test_a_notebook_version_signed_by_carla_has_carla_as_author(world, tmp_path, monkeypatch, capsys):
    from platform_defs.cli import main

    version = notebook_version(world, tmp_path, 12, {"onepath.author": "someone-else"})
    monkeypatch.setenv("ONEPATH_HOME", str(world["settings"].home))  # the CLI on this world's MLflow
    assert main(["sign-version", "credit_risk", "--version", version, "--as", "carla",
                 "--key", str(KEYS / "carla.key")]) == 0, capsys.readouterr().err
    hand_off(world)
    reg = registration(world["book"], "credit_risk", version)
    assert (reg.data["author"], reg.data["author_verified"]) == ("carla", True)
    carla = approve(world, "credit_risk", version, "carla", "prod")
    v = credit_verdict(world, version)
    assert not v.passed and f"#{carla.seq} by carla: carla authored version {version}: self-approval is not allowed" \
        in v.markdown["refused_approvals"]
    approve(world, "credit_risk", version, "pat", "prod")
    v = credit_verdict(world, version)
    assert v.passed and v.metadata["approver"] == "pat"


def test_an_identity_added_to_the_policy_file_but_not_recorded_signs_nothing(world, tmp_path, monkeypatch, capsys):
    """Tier (b): the platform's own user adds an identity ``ghost`` to the policy file, reloads it, and signs a
    notebook version as ghost. The sensor judges signatures against the recorded policy, which names no ghost,
    and a file that is not the recorded policy vouches for nobody: ghost is only a claim."""
    import yaml

    from platform_defs.cli import main
    from platform_defs.policy import Identity, load_policy
    from resources.approvals import generate_key

    public = generate_key(tmp_path / "ghost.key")
    doc = world["policy"].model_dump(mode="json")
    doc["identities"]["ghost"] = Identity(team="model-risk", roles=["model_approver"], public_key=public).model_dump(
        mode="json")
    doc["teams"]["model-risk"]["members"].append("ghost")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(doc, sort_keys=True))
    reloaded = load_policy(tmp_path / "policy.yaml")
    assert "ghost" in reloaded.identities
    version = notebook_version(world, tmp_path, 14, {})
    monkeypatch.setenv("ONEPATH_HOME", str(world["settings"].home))
    assert main(["sign-version", "credit_risk", "--version", version, "--as", "ghost",
                 "--key", str(tmp_path / "ghost.key")]) == 0, capsys.readouterr().err
    from sensors.handoff import tick

    tick(world["org"], mlflow=world["mlflow"], book=world["book"], cursor={}, policy=reloaded)
    reg = registration(world["book"], "credit_risk", version)
    assert (reg.data["author"], reg.data["author_verified"]) == (None, False)
    assert reg.data["claims"]["onepath.signed_by"] == "ghost"
    assert "differs from the policy recorded in ledger #" in reg.data["claims"]["signature_unverified"]
    handoff = [e for e in world["book"].entries(kind="handoff", subject="credit_risk")
               if e.data["version"] == version][-1]
    assert handoff.data["author"] is None and handoff.data["author_verified"] is False
    assert not credit_verdict(world, version).passed


def test_a_registration_signature_over_other_bytes_names_no_author(world, tmp_path):
    from resources.approvals import sign_registration

    version = notebook_version(world, tmp_path, 13, {})
    client = world["mlflow"].client()
    forged = sign_registration(load_private_key(KEYS / "carla.key"), model="credit_risk", version=version,
                               run_id=None, digest="0" * 64)  # not the digest of what MLflow serves
    client.set_model_version_tag("credit_risk", version, "onepath.signed_by", "carla")
    client.set_model_version_tag("credit_risk", version, "onepath.registration_signature", forged)
    hand_off(world)
    reg = registration(world["book"], "credit_risk", version)
    assert reg.data["author"] is None and reg.data["author_verified"] is False
    assert reg.data["claims"]["onepath.signed_by"] == "carla"
    assert "signature does not verify with carla's public key" in reg.data["claims"]["signature_refused"]
    assert not credit_verdict(world, version).passed
