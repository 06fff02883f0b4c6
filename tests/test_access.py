"""Only declared callers reach an endpoint (issue 11), tried the way an attacker on the host would.

Real parts: a ledger with the example policy recorded, the local deployer with its supervisors, a real
credit model served by model-server workers, and the loan_portal app release deployed by the promotion
flow (``promote_app``), which issues its grant and hands it its credential. The `onepath` CLI runs as a
subprocess on the same world. A few rules (rotation by age, a caller the policy dropped) are checked on
a ledger of their own with a deployer that only records what it is asked to publish.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from platform_defs.access import Access, AccessError, CLI_CALLER, grants, table
from platform_defs.loader import load_organisation
from platform_defs.policy import PolicyError, load_policy, parse_policy, policy_hash
from platform_defs.promotion import Services, promote_app
from platform_defs.specs import DeclarationError, Organisation
from platform_defs.wiring import build_resources
from resources.deployers.base import Target
from resources.serving.access import token_sha256
from tests.conftest import isolated_settings, model_release, quick_policy, record_policy, save_credit_model

ROOT = Path(__file__).resolve().parents[1]
EP = Target("credit_scoring", "staging", "endpoint")
APP = Target("loan_portal", "staging", "app")
APPLICATION = {
    "full_name": "Ada Lovelace", "national_id": "NI-1", "email": "ada@example.org", "gender": "F",
    "age_band": "36-50", "annual_income": 52000, "loan_amount": 12000, "loan_term_months": 36,
    "debt_to_income": 0.31, "credit_history_years": 7.5, "num_open_accounts": 4, "delinquencies_2y": 0,
    "employment_type": "salaried", "home_ownership": "mortgage", "purpose": "car",
}
FEATURES = {k: v for k, v in APPLICATION.items() if k not in ("full_name", "national_id", "email", "gender", "age_band")}


def call(url: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url.rstrip("/") + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            raw = r.read()
            try:
                return r.status, json.loads(raw or b"{}")
            except ValueError:  # /metrics: Prometheus text
                return r.status, {"raw": raw.decode("utf-8", "replace")}
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw or b"{}")
        except ValueError:
            return err.code, {"raw": raw.decode("utf-8", "replace")}


SEARCH = """
import os, sys
needle = sys.stdin.buffer.read()
for dirpath, _, files in os.walk(sys.argv[1]):
    for name in files:
        p = os.path.join(dirpath, name)
        try:
            with open(p, "rb") as f:
                if needle in f.read():
                    print(p)
        except OSError:
            pass
"""


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("access_home")
    s = isolated_settings(settings, root, port_offset=60)
    res = build_resources(s)
    book, deployer = res["ledger"].ledger(), res["deployer_local"].deployer()
    policy = quick_policy()
    record_policy(book, policy)
    policy_file = Path(book.db_path).parent / f"policy-{policy_hash(policy)[:16]}.yaml"
    org = load_organisation(policy=policy)
    dataset = org.by_name["credit_applications"]
    model_dir = save_credit_model(s.releases_dir / "models" / "credit_risk-1", rows=400)
    Access(book, deployer).publish_table(EP)  # as every endpoint deploy does first
    st = deployer.deploy(EP, model_release("1", model_dir, {
        "model_name": "credit_risk", "pii_columns": dataset.pii_columns,
        "pass_through": list(org.by_name["credit_scoring"].pass_through)}))
    assert st.healthy, st.problems
    for version in ("r1", "r2"):
        shutil.copytree(ROOT / "apps" / "loan_portal", s.releases_dir / "apps" / "loan_portal" / version,
                        ignore=shutil.ignore_patterns("__pycache__"))
    services = Services(mlflow=None, deployer=deployer, ledger=book, releases_dir=s.releases_dir)
    newest = ["r1"]

    def deploy_app(o: Organisation = org):
        return promote_app(o, policy, "loan_portal", "staging", services=services, actor="test", trigger="test",
                           newest_build=lambda: newest[0], repo_root=ROOT)

    promoted = deploy_app()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONEPATH_HOME": str(root), "DAGSTER_HOME": str(root / "dagster_home"),
           "ONEPATH_PORT_BASE": str(s.port_base), "ONEPATH_POLICY_FILE": str(policy_file)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "platform_defs.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=180, env=env)

    try:
        yield {"settings": s, "book": book, "deployer": deployer, "org": org, "policy": policy, "root": root,
               "endpoint": st.address, "promoted": promoted, "deploy_app": deploy_app, "newest": newest, "cli": cli}
    finally:
        deployer.stop_all()


def app_grant(world) -> object:
    live = [g for g in grants(world["book"]).values() if g.caller == "app:loan_portal" and g.env == "staging" and g.live]
    assert len(live) == 1, live
    return live[0]


def app_token(world) -> str:
    return (world["deployer"].slot_dir(APP) / "private" / "credentials" / "CREDIT_SCORING").read_text().strip()


def apply(world) -> tuple[int, dict]:
    return call(world["promoted"].address, "/api/apply", APPLICATION)


def pids(world, target: Target) -> list[int]:
    return list(world["deployer"].status(target).detail["supervisor"]["pids"])


def test_the_app_deploy_issues_its_grant_and_its_credential_reaches_only_the_app(world):
    book, g = world["book"], app_grant(world)
    assert (g.endpoint, g.routes) == ("credit_scoring", ["predict", "version"])
    assert "declares calls: [credit_scoring]" in g.because
    deploy = book.entries(kind="deploy", subject="loan_portal", env="staging")[-1]
    assert deploy.data["grants"] == [g.id] and deploy.seq > g.granted_seq  # issued before the release served
    status, body = apply(world)  # its first call works: the credential was there before its workers started
    assert status == 200 and body["decision"] in ("approve", "refer", "decline"), body

    token = app_token(world)
    creds = world["deployer"].slot_dir(APP) / "private" / "credentials"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700 and stat.S_IMODE((creds / "CREDIT_SCORING").stat().st_mode) == 0o600
    # nowhere else: no other file of the platform's home (ledger, launch spec, state.json, events.jsonl, logs) ...
    secret = token.rsplit(".", 1)[1].encode()
    # searched from another process: opening and closing the ledger's files here would drop this process's
    # sqlite locks on them (POSIX locks are per process), and the ledger's connection with them
    found = subprocess.run([sys.executable, "-c", SEARCH, str(world["root"])], input=secret, capture_output=True,
                           timeout=120, check=True)
    holders = [Path(p) for p in found.stdout.decode().splitlines()]
    assert holders == [creds / "CREDIT_SCORING"], holders
    # ... nor the environment of any process on the host (the app's workers, the endpoint's, the supervisors)
    workers = pids(world, APP) + pids(world, EP)
    assert workers
    seen = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            seen += int(proc.name) in workers
            assert secret not in environ, f"the app's secret is in the environment of pid {proc.name}"
    assert seen == len(workers)
    # nor in any ledger entry, as text or hash-of-nothing: only its sha256
    entries = json.dumps([e.as_dict() for e in book.entries()])
    assert secret.decode() not in entries
    import hashlib
    assert hashlib.sha256(token.encode()).hexdigest() in entries


def test_what_an_attacker_sends_is_refused(world):
    url, token = world["endpoint"], app_token(world)
    status, body = call(url, "/predict", {"records": [FEATURES]})
    assert (status, body.get("credential")) == (401, "missing")
    status, body = call(url, "/predict", {"records": [FEATURES]}, bearer("op1.credit_scoring.staging.000000000000."
                                                                          + "x" * 43))
    assert (status, body.get("credential")) == (401, "invalid")
    assert call(url, "/metrics", headers=bearer(token))[0] == 403  # the app's grant: predict and version only
    assert call(url, "/predict", {"records": [FEATURES]}, bearer(token))[0] == 200
    assert token.rsplit(".", 1)[1] not in json.dumps(call(url, "/metrics", headers=bearer(token))[1])


def test_a_revocation_through_the_cli_takes_effect_on_the_apps_next_call_without_a_redeploy(world):
    g, before = app_grant(world), (pids(world, APP), pids(world, EP))
    assert apply(world)[0] == 200
    out = world["cli"]("access", "revoke", g.id, "--why", "leaked into a support ticket")
    assert out.returncode == 0, out.stderr
    assert f"revoked grant {g.id}" in out.stdout
    revoked = world["book"].entries(kind="credential_revoked")[-1]
    assert revoked.data == {"grant": g.id, "why": "leaked into a support ticket"}
    status, _ = apply(world)  # the app's very next call: the endpoint refuses its credential
    assert status == 503
    status, body = call(world["endpoint"], "/predict", {"records": [FEATURES]}, bearer(app_token(world)))
    assert status == 403 and "revoked" in json.dumps(body).lower() and "leaked into a support ticket" in json.dumps(body)
    assert (pids(world, APP), pids(world, EP)) == before  # nothing was redeployed
    listed = world["cli"]("access", "list", "--all", "--endpoint", "credit_scoring")
    assert listed.returncode == 0 and f"{g.id}" in listed.stdout and "revoked" in listed.stdout
    # the app's next deploy issues it a new grant (the declaration still justifies one)
    world["newest"][0] = "r2"
    world["deploy_app"]()
    assert app_grant(world).id != g.id and apply(world)[0] == 200


def test_onepath_cli_gets_its_own_credential_and_a_caller_the_policy_does_not_grant_is_refused(world):
    book, org = world["book"], world["org"]
    out = world["cli"]("access", "issue", "--caller", CLI_CALLER, "--endpoint", "credit_scoring", "--env", "staging")
    assert out.returncode == 0, out.stderr
    path = Path(world["root"]) / "access" / "callers" / f"{CLI_CALLER}.credit_scoring.staging"
    assert str(path) in out.stdout and "op1." not in out.stdout  # the path, never the token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text().strip()
    assert call(world["endpoint"], "/metrics", headers=bearer(token))[0] == 200
    assert call(world["endpoint"], "/predict", {"records": [FEATURES]}, bearer(token))[0] == 200
    mine = [g for g in grants(book).values() if g.caller == CLI_CALLER and g.env == "staging"]
    assert len(mine) == 1
    assert "access.callers.onepath-cli" in mine[0].because
    # the same caller asking again gets the same credential: one grant, not one per use
    assert Access(book, world["deployer"]).caller_token(org, CLI_CALLER, "credit_scoring", "staging") == token
    # the app's credential is for another caller: it cannot read metrics, and another endpoint refuses it
    refused = world["cli"]("access", "issue", "--caller", "batch-job", "--endpoint", "credit_scoring", "--env", "staging")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "batch-job may not call credit_scoring.staging" in refused.stderr
    assert "access.callers.batch-job in " in refused.stderr and "policy-" in refused.stderr  # the policy file named
    with pytest.raises(AccessError, match="grants it no access there"):
        Access(book, world["deployer"]).caller_token(org, "metrics-scraper", "credit_scoring", "staging")


def test_reconcile_revokes_the_grant_when_the_app_stops_declaring_the_call(world):
    book, org = world["book"], world["org"]
    g = app_grant(world)
    assert apply(world)[0] == 200
    app = org.by_name["loan_portal"]
    without = Organisation([d.model_copy(update={"calls": []}) if d.name == "loan_portal" else d
                            for d in org.by_name.values()], org.sources)
    # the access sensor's tick, as the daemon runs it, on definitions built from the changed declarations
    import dagster as dg

    from sensors.access import build_access_sensor

    res = build_resources(world["settings"])
    sensor = build_access_sensor(without)
    with dg.build_sensor_context(resources={"ledger": res["ledger"], "deployer_local": res["deployer_local"]}) as ctx:
        tick = sensor.evaluate_tick(ctx)
    assert "1 revoked" in tick.skip_message, tick.skip_message
    revoked = book.entries(kind="credential_revoked")[-1]
    assert revoked.data["grant"] == g.id and revoked.actor == "sensor:access"
    assert "no longer declares calls: [credit_scoring]" in revoked.data["why"]
    assert apply(world)[0] == 503  # the running release is refused on its next call
    again = Access(book, world["deployer"], actor="test").reconcile(without, published=json.loads(tick.cursor))
    assert again.revoked == [] and again.published == []  # nothing left to do, nothing rewritten
    world["deploy_app"](org)  # declared again: its deploy issues a new grant
    assert app_grant(world).id != g.id and apply(world)[0] == 200
    assert app.calls == ["credit_scoring"]


def test_a_release_built_on_another_host_deploys_from_s3_into_an_empty_cache_and_a_replaced_bundle_is_refused(
        world, moto_s3, monkeypatch, tmp_path):
    """ONEPATH_RELEASES_URL: the build host publishes the release to the bucket; the deploying host, whose cache is
    empty, fetches it, checks it against the release_built entry and the promotion flow deploys it (the app's
    workers run from the fetched folder and score). A bundle replaced in the bucket after its build is refused
    before any gate or deploy, recorded, and the release before keeps serving."""
    import uuid

    from platform_defs.promotion import PromotionError
    from resources.release_store import ReleaseStore, source_hash

    from tests.conftest import s3_environment

    s3_environment(monkeypatch, moto_s3)
    bucket = f"releases-{uuid.uuid4().hex[:10]}"
    moto_s3.client("s3").create_bucket(Bucket=bucket)
    url, book = f"s3://{bucket}/onepath", world["book"]

    def build(marker: str) -> str:  # what the build asset does, on the build host
        src = tmp_path / marker
        shutil.copytree(ROOT / "apps" / "loan_portal", src, ignore=shutil.ignore_patterns("__pycache__"))
        (src / "BUILD").write_text(marker + "\n")
        digest, files = source_hash(src)
        ReleaseStore(tmp_path / "build-host", url).publish("loan_portal", f"r-{digest[:12]}", src, digest)
        book.append("release_built", "loan_portal", {"version": f"r-{digest[:12]}", "content_hash": digest,
                                                     "files": files}, "dagster:test")
        return f"r-{digest[:12]}"

    cache = world["settings"].releases_dir / f"deploy-host-{uuid.uuid4().hex[:6]}"  # inside the deployer's roots
    services = Services(mlflow=None, deployer=world["deployer"], ledger=book, releases_dir=cache, releases_url=url)

    def promote(version: str):
        return promote_app(world["org"], world["policy"], "loan_portal", "staging", services=services, actor="test",
                           trigger="test", newest_build=lambda: version, repo_root=ROOT)

    first = build("one")
    assert not cache.exists()
    result = promote(first)
    assert (result.version, result.outcome) == (first, "deployed")
    folder = cache / "apps" / "loan_portal" / first
    assert source_hash(folder)[0] == book.entries(kind="release_built", subject="loan_portal")[-1].data["content_hash"]
    workers = pids(world, APP)
    assert workers and all(str(folder) in Path(f"/proc/{pid}/cmdline").read_bytes().decode() for pid in workers)
    assert apply(world)[0] == 200

    second = build("two")
    body = moto_s3.client("s3").get_object(Bucket=bucket, Key=f"onepath/releases/apps/loan_portal/{first}.tar.gz")
    moto_s3.client("s3").put_object(Bucket=bucket, Key=f"onepath/releases/apps/loan_portal/{second}.tar.gz",
                                    Body=body["Body"].read())  # someone with write access to the bucket
    with pytest.raises(PromotionError, match=f"loan_portal: the bundle s3://{bucket}/onepath/releases/apps/"
                                             f"loan_portal/{second}.tar.gz has content hash .* refused"):
        promote(second)
    refused = book.entries(kind="artifact_refused", subject="loan_portal")[-1]
    assert refused.data["version"] == second and refused.env == "staging"
    assert not (cache / "apps" / "loan_portal" / second).exists()
    assert world["deployer"].status(APP).serving_version == first and apply(world)[0] == 200


# ------------------------------------------------------------------------------------------------
# rules on a ledger of their own


class RecordingDeployer:
    """Stands in for a backend: keeps what it is asked to publish, in order (nothing serves)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []
        self.tables: dict[str, dict] = {}
        self.credentials: dict[str, dict[str, str]] = {}

    def publish_grants(self, target: Target, doc: dict) -> None:
        from resources.serving.access import parse_table

        parse_table(doc, target.name, target.env)  # what a worker would accept
        self.calls.append(("grants", target.slot, doc))
        self.tables[target.slot] = doc

    def publish_credentials(self, target: Target, creds: dict[str, str]) -> None:
        if getattr(self, "fail_credentials", False):
            raise OSError("disk full")
        self.calls.append(("credentials", target.slot, dict(creds)))
        self.credentials[target.slot] = dict(creds)

    def held_credentials(self, target: Target) -> dict[str, str] | None:
        from resources.serving.access import token_sha256

        held = self.credentials.get(target.slot)
        return None if held is None else {k: token_sha256(v) for k, v in held.items()}


@pytest.fixture
def lone(tmp_path):
    from resources.ledger import Ledger

    book = Ledger(tmp_path / "ledger.db", tmp_path / "keys" / "platform.key")
    record_policy(book)
    # the test's clock starts now: a secret's issue time is its ledger entry's, stamped with the real time
    # (a fixed date stopped being "31 days later" once the real date passed it)
    clock = [datetime.now(timezone.utc).replace(microsecond=0)]
    dep = RecordingDeployer()
    return {"book": book, "org": load_organisation(), "deployer": dep, "clock": clock, "tmp": tmp_path,
            "access": Access(book, dep, actor="test", clock=lambda: clock[0])}


def test_an_app_deploy_publishes_tables_before_credentials_and_rotates_with_an_overlap(lone):
    access, dep, org = lone["access"], lone["deployer"], lone["org"]
    ids = access.prepare_app(org, org.by_name["loan_portal"], "prod")
    assert [c[0] for c in dep.calls] == ["grants", "credentials"]  # the endpoint accepts it before the app holds it
    token = dep.credentials["loan_portal.prod"]["CREDIT_SCORING"]
    assert token.startswith(f"op1.credit_scoring.prod.{ids[0]}.")
    assert token not in json.dumps(dep.tables) and token not in json.dumps([e.as_dict() for e in lone["book"].entries()])
    again = access.prepare_app(org, org.by_name["loan_portal"], "prod")
    assert again == ids  # the grant is kept; its secret is new, the old one works for overlap_seconds
    g = grants(lone["book"])[ids[0]]
    assert len(g.secrets) == 2 and g.secrets[0].not_after == (lone["clock"][0] + timedelta(seconds=60)).isoformat(
        timespec="seconds")
    row = dep.tables["credit_scoring.prod"]["grants"][0]
    assert [s["not_after"] for s in row["secrets"]] == [g.secrets[0].not_after, None]
    assert dep.credentials["loan_portal.prod"]["CREDIT_SCORING"] != token


def test_reconcile_rotates_what_is_older_than_rotate_after_days_and_revokes_what_the_policy_dropped(lone):
    access, dep, org, book, clock = lone["access"], lone["deployer"], lone["org"], lone["book"], lone["clock"]
    [gid] = access.prepare_app(org, org.by_name["loan_portal"], "prod")
    cli = access.caller_token(org, CLI_CALLER, "churn_scoring", "prod")
    assert access.reconcile(org, published=None).rotated == []
    clock[0] += timedelta(days=31)  # past the policy's rotate_after_days (30)
    out = access.reconcile(org)
    assert {r["grant"] for r in out.rotated} == {gid, cli.split(".")[3]}
    assert access.caller_file(CLI_CALLER, "churn_scoring", "prod").read_text() != cli  # the store holds the new one
    assert len(dep.credentials["loan_portal.prod"]) == 1
    # the policy drops onepath-cli: its grants are revoked on the next reconcile
    doc = yaml.safe_load((ROOT / "assets" / "policy.yaml").read_text())
    doc["access"]["callers"].pop(CLI_CALLER)
    path = lone["tmp"] / "narrow.yaml"
    path.write_text(yaml.safe_dump(doc))
    record_policy(book, path=path)
    out = access.reconcile(org)
    assert [r["caller"] for r in out.revoked] == [CLI_CALLER]
    assert "no longer grants onepath-cli churn_scoring.prod" in out.revoked[0]["why"]
    assert dep.tables["churn_scoring.prod"]["grants"][0]["revoked"]["why"] == out.revoked[0]["why"]
    with pytest.raises(AccessError, match=r"onepath-cli may not call churn_scoring.prod: the recorded policy"):
        access.caller_token(org, CLI_CALLER, "churn_scoring", "prod")
    assert table(grants(book), "churn_scoring", "prod") == dep.tables["churn_scoring.prod"]


def test_a_hand_over_that_failed_is_repaired_by_the_next_reconcile(lone):
    # a rotation whose tables were written but whose credentials never reached the app: the app's old
    # secret runs out after the overlap, so reconcile must see the app does not hold the current one
    access, dep, org, book = lone["access"], lone["deployer"], lone["org"], lone["book"]
    [gid] = access.prepare_app(org, org.by_name["loan_portal"], "prod")
    dep.fail_credentials = True
    with pytest.raises(OSError):
        access.rotate(org, gid)
    held = dep.credentials["loan_portal.prod"]["CREDIT_SCORING"]
    assert grants(book)[gid].current.sha256 != token_sha256(held)  # the app holds the secret on its way out
    dep.fail_credentials = False
    out = access.reconcile(org)
    assert [r["grant"] for r in out.rotated] == [gid]
    assert token_sha256(dep.credentials["loan_portal.prod"]["CREDIT_SCORING"]) == grants(book)[gid].current.sha256
    assert access.reconcile(org).rotated == []  # held: nothing more to do


def test_the_access_sensor_is_registered_and_running_by_default(settings):
    import dagster as dg

    from platform_defs.definitions import build_definitions

    sensor = build_definitions(settings=settings, policy=quick_policy()).resolve_sensor_def("access")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


@pytest.mark.parametrize("access, key", [
    ({"callers": {"cli": {"routes": ["admin"]}}}, "access.callers.cli.routes.0"),
    ({"callers": {"cli": {"routes": []}}}, "access.callers.cli.routes"),
    ({"callers": {"cli": {"routes": ["predict"], "endpoints": ["No Such"]}}}, "access.callers.cli.endpoints"),
    ({"callers": {"cli": {"routes": ["predict"], "scope": "all"}}}, "access.callers.cli.scope"),
    ({"callers": {"Bad Name": {"routes": ["predict"]}}}, "access.callers"),
    ({"overlap_seconds": 0}, "access.overlap_seconds"),
    ({"rotate_after": 3}, "access.rotate_after"),
])
def test_bad_access_policy_input_names_file_and_field(access, key, tmp_path, monkeypatch):
    doc = yaml.safe_load((ROOT / "assets" / "policy.yaml").read_text())
    doc["access"] = access
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert f"policy {path}: key '{key}': " in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(path))
    out = subprocess.run([sys.executable, "-m", "platform_defs.cli", "validate"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1 and f"key '{key}'" in out.stderr and out.stderr.count("\n") == 1

@pytest.mark.parametrize("caller, key, problem", [
    ({"routes": ["predict"], "endpoints": ["credit_scorng"]}, "access.callers.batch.endpoints.0",
     "'credit_scorng' is not a declared endpoint"),
    ({"routes": ["predict"], "environments": ["prd"]}, "access.callers.batch.environments.0",
     "'prd' is no environment of any declared endpoint"),
])
def test_a_policy_caller_naming_what_nothing_declares_is_refused_at_load(caller, key, problem, tmp_path, monkeypatch):
    # it would load and silently grant nothing, to be found out only when the batch job gets a 403
    doc = yaml.safe_load((ROOT / "assets" / "policy.yaml").read_text())
    doc["access"]["callers"]["batch"] = caller
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("ONEPATH_POLICY_FILE", str(path))
    out = subprocess.run([sys.executable, "-m", "platform_defs.cli", "validate"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1 and f"key '{key}': {problem}" in out.stderr and out.stderr.count("\n") == 1



@pytest.mark.parametrize("names, problem", [
    (["phone"], "'phone' is not a column of dataset 'credit_applications'"),
    (["email"], "column 'email' is PII and is never logged"),
    (["annual_income"], "column 'annual_income' is a feature of model 'credit_risk'"),
    (["defaulted"], "column 'defaulted' is the dataset's label"),
    (["applied_on"], "column 'applied_on' is the dataset's timestamp"),
])
def test_a_pass_through_column_is_checked_at_load(names, problem):
    org = load_organisation()
    with pytest.raises(DeclarationError) as err:
        Organisation([d.model_copy(update={"pass_through": names}) if d.name == "credit_scoring" else d
                      for d in org.by_name.values()], org.sources)
    assert "field 'pass_through.0'" in str(err.value) and problem in str(err.value)
    assert "assets/credit/declarations.py" in str(err.value)


def test_the_declared_pass_through_keeps_what_feedback_and_fairness_read():
    from platform_defs.cli_simulate import sent_columns

    org = load_organisation()
    for ep in org.of_kind("endpoint"):
        model = org.by_name[ep.model]
        dataset = org.by_name[model.dataset]
        features = set(org.model_features(model)[0])
        extras = set(sent_columns(dataset)) - features
        assert extras == set(ep.pass_through), ep.name  # what a caller sends beside the features is declared
        assert not set(ep.pass_through) & set(dataset.pii_columns)
    assert parse_policy((ROOT / "assets" / "policy.yaml").read_text(), "x").access.callers[CLI_CALLER].routes == \
        ["predict", "version", "metrics"]


def test_a_long_running_cli_caller_reads_its_rotated_credential_from_the_store(lone):
    access, org = lone["access"], lone["org"]
    current = access.stored_credential(org, CLI_CALLER, "credit_scoring", "prod")
    first = current()
    [g] = [g for g in grants(lone["book"]).values() if g.caller == CLI_CALLER]
    access.rotate(org, g.id)
    assert current() != first and current() == access.caller_file(CLI_CALLER, "credit_scoring", "prod").read_text()
    assert stat.S_IMODE(access.caller_file(CLI_CALLER, "credit_scoring", "prod").stat().st_mode) == 0o600
