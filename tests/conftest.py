"""Shared fixtures: an isolated onepath world per test session (its own ONEPATH_HOME, MLflow sqlite
store, Dagster instance and port range), and helpers that build real MLflow models on disk.

Everything a test starts is stopped at the end of the session (``stop_all`` on its run dir).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from tests.stores import LedgerBackend, MotoServer, PostgresServer

ROOT = Path(__file__).resolve().parents[1]


def _free_port_base(span: int = 200) -> int:
    """A base port whose next ``span`` ports are currently free (checked, not guessed)."""
    # start at a random place so concurrent sessions (a developer's and a helper's) rarely meet;
    # the deployer still moves a never-served address whose port got taken in between
    start = 21000 + random.randrange(0, 150) * span
    for base in list(range(start, 60000, span)) + list(range(21000, start, span)):
        ok = True
        for p in range(base, base + span, 7):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                ok = False
                break
            finally:
                s.close()
        if ok:
            return base
    raise RuntimeError("no free port range")


@pytest.fixture(scope="session", autouse=True)
def private_umask() -> None:
    """The test process is an entry point like ``onepath``: what it creates is owner-only."""
    from resources.files import use_private_umask

    use_private_umask()


# what the test process's own environment may carry that a platform started for a test (or a bench) must not
# inherit: another home's Dagster, policy file or MLflow store
NOT_INHERITED = ("DAGSTER_HOME", "ONEPATH_POLICY_FILE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                 "ONEPATH_LEDGER_URL")


def onepath_env(home: Path, port: int, declarations: Path | None = None) -> dict[str, str]:
    """The environment of an `onepath` process (the platform, or a CLI verb against it) on ``home``, with the UI
    on ``port`` and, if given, its own declarations folder."""
    env = {**os.environ, "ONEPATH_HOME": str(home), "ONEPATH_UI_PORT": str(port), "PYTHONPATH": str(ROOT),
           **({"ONEPATH_DECLARATIONS_DIR": str(declarations)} if declarations else {})}
    for var in NOT_INHERITED:
        env.pop(var, None)
    return env


def start_onepath_up(env: dict[str, str], log: Path) -> subprocess.Popen:
    """`onepath up --no-mlflow-ui` in its own session (stop it with os.killpg), its output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "platform_defs.cli", "up", "--no-mlflow-ui"], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(autouse=True)
def no_mlflow_uri_leaks_to_the_next_test() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` / ``set_registry_uri`` (the MLflow resource calls them) also set
    ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` in this process's environment "so that subprocess can
    inherit it", and ``load_settings`` honours them: a later test's ``onepath up`` ran on an earlier test's
    MLflow (test_cli found credit_risk versions it never trained). The session starts without them
    (``onepath_home``); after each test they are gone again, and MLflow's own globals are cleared with them
    so that the next ``_use()`` sets both again. A module-scoped world that set them in its setup is cleared
    at its first test's end, before any other module's test starts."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)  # clears the global (and the variable, again)
        mlflow.set_registry_uri(None)  # clears the global; sets no variable for None


@pytest.fixture(scope="session")
def onepath_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("onepath")
    saved = dict(os.environ)
    os.environ.update({
        "ONEPATH_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster_home"),
        "ONEPATH_PORT_BASE": str(_free_port_base()),
        "GX_ANALYTICS_ENABLED": "false",
        "ONEPATH_DRAIN_SECONDS": "5",
    })
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("ONEPATH_DECLARATIONS_DIR", None)
    (home / "dagster_home").mkdir()
    (home / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    try:
        yield home
    finally:
        from resources.deployers.local import LocalProcessDeployer

        run_dir = home / "run"
        if run_dir.exists():
            LocalProcessDeployer(run_dir).stop_all()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def acme_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """acme-checks (tests/fixtures/acme_checks) installed with pip into a folder of its own, once a session
    (the shared environment is not touched); ``acme`` puts it on sys.path for a module."""
    import shutil

    target, source = tmp_path_factory.mktemp("acme_site"), tmp_path_factory.mktemp("acme_src") / "acme_checks"
    shutil.copytree(ROOT / "tests" / "fixtures" / "acme_checks", source)  # a build writes next to its source
    return pip_install_into(target, source)


def check_package(src: Path, name: str, entry_points: dict[str, str], packages: list[str]) -> Path:
    """The source folder ``src`` of a package ``name`` whose ``onepath.checks`` entry points are ``entry_points``
    (name -> "module:function") and whose packages are ``packages`` (their files the caller writes in ``src``)."""
    src.mkdir(parents=True, exist_ok=True)
    points = "".join(f'{k} = "{v}"\n' for k, v in entry_points.items())
    (src / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "0.1"\n\n[project.entry-points."onepath.checks"]\n{points}\n'
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[tool.setuptools]\npy-modules = []\npackages = {packages!r}\n'.replace("'", '"'))
    return src


def pip_install_into(target: Path, source: Path) -> Path:
    """The package at ``source`` installed with pip into the folder ``target`` only (never the shared venv)."""
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return target


@pytest.fixture(scope="module")
def acme(acme_site: Path) -> Iterator[Path]:
    """acme-checks installed (``acme_site``) for the module's tests: its folder on sys.path, so its entry points
    are what importlib.metadata sees; gone again after the module (another module's "not installed" holds)."""
    import importlib

    sys.path.insert(0, str(acme_site))
    importlib.invalidate_caches()
    yield acme_site
    sys.path.remove(str(acme_site))
    sys.modules.pop("acme_checks", None)
    importlib.invalidate_caches()


def artifact_roots(settings) -> list[Path]:
    """Where a test deployer's supervisors may launch artifacts from: pytest's base temp directory,
    which holds every test's models and releases (the session's home is one of its directories)."""
    return [settings.home.parent]


@pytest.fixture(scope="session")
def settings(onepath_home: Path):
    from platform_defs.settings import load_settings

    return load_settings().ensure_dirs()


def save_credit_model(dst: Path, *, rows: int = 800, seed: int = 1) -> Path:
    """A real sklearn pipeline trained on the credit data, saved in MLflow's format at ``dst``."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from assets.credit.data import generate_credit_applications
    from assets.credit.trainer import train_credit_risk
    from resources.mlflow_registry import trusted_types

    df = generate_credit_applications(rows=rows, seed=seed)
    feats = ["annual_income", "loan_amount", "loan_term_months", "debt_to_income", "credit_history_years",
             "num_open_accounts", "delinquencies_2y", "employment_type", "home_ownership", "purpose"]
    est = train_credit_risk(df[feats], df["defaulted"], {})
    mlflow.sklearn.save_model(est, str(dst), signature=infer_signature(df[feats], est.predict(df[feats])),
                              input_example=df[feats].head(3), serialization_format="skops",
                              skops_trusted_types=trusted_types(est))
    return dst


def quick_policy(**bake):
    """The example policy with a short bake that passes without traffic (for worlds that send none);
    ``bake`` overrides more fields of every track's bake policy."""
    from platform_defs.policy import load_policy

    policy = load_policy()
    tracks = {}
    for name, t in policy.tracks.items():
        b = t.bake.model_copy(update={"seconds": 0.3, "poll_seconds": 0.1, "pass_without_traffic": True, **bake})
        tracks[name] = t.model_copy(update={"bake": b})
    return policy.model_copy(update={"tracks": tracks})


def isolated_settings(settings, root: Path, port_offset: int):
    """A second, independent onepath world inside the session: its own home (ledger, MLflow store,
    data, logs, processes) and its own stable ports, so a test module cannot disturb another's."""
    import dataclasses

    root.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{root / 'mlflow.db'}"
    return dataclasses.replace(
        settings, home=root, dagster_home=root / "dagster_home", mlflow_tracking_uri=store, mlflow_registry_uri=store,
        mlflow_artifact_root=root / "mlartifacts", data_dir=root / "data", inference_log_dir=root / "inference_logs",
        outcomes_dir=root / "outcomes", drift_reports_dir=root / "drift_reports", run_dir=root / "run",
        releases_dir=root / "releases", port_base=settings.port_base + port_offset,
    ).ensure_dirs()


def model_release(version: str, model_dir: Path | str, config: dict | None = None, workers: int = 1):
    """A Release of a model folder a test built itself, carrying its digest the way a promotion does
    (``Release.digest``, which the supervisor gives the server as ``expected_digest``): the server
    refuses one without."""
    from resources.artifact_digest import folder_digest
    from resources.deployers.base import Release

    digest = folder_digest(model_dir)
    return Release(version=str(version), artifact=str(model_dir), workers=workers, digest=digest,
                   config=dict(config or {}))


def record_test_registration(book, mlflow, model: str, version: str, **facts):
    """The ``model_registered`` entry for a version a test registered straight in MLflow (what the model
    asset or the handoff sensor records): its digest as MLflow serves it, and the lineage ``facts`` given."""
    from platform_defs.registration import record_registration

    mv = mlflow.get_version(model, version)
    args = {"data_hash": None, "code_hash": None, "code_path": None, "dataset_key": None, "author": None,
            "split_seed": None, "test_size": None, "training_rows": None, "metrics": None, **facts}
    # an author given is one the platform vouches for (as the model asset does for its owner team)
    vouched = {"principal": "onepath", "run": "test", "owner": None} if args["author"] else None
    return record_registration(book, mlflow, model=model, version=str(version), run_id=mv.run_id, via="test",
                               actor="test", registered_by=vouched, **args)


def wait_for(what: str, condition, seconds: float = 180.0, poll: float = 0.05):
    """Poll ``condition`` until it returns something truthy and return that; fail naming ``what`` at the
    deadline (a condition with a deadline, never a sleep that hopes)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = condition()
        if out:
            return out
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {seconds:g} s")


DEMO_KEYS = ROOT / "assets" / "demo_identities"
DEMO_ADMIN_KEY = DEMO_KEYS / "pat.key"


def record_policy(book, policy=None, path: Path | None = None):
    """Make ``policy`` (a Policy object, e.g. ``quick_policy()``), or the policy file at ``path`` (default: the
    example policy in use), the policy recorded in ``book``, as ``onepath policy init`` (or ``apply``, when
    another one is recorded) would, signed by the example's demo platform admin pat with its shipped key.
    Returns the ``policy_recorded`` entry, or None when it is already the policy in force."""
    import yaml

    from platform_defs.policy import policy_hash, policy_path
    from platform_defs.policy_record import policy_in_force, record_policy as record
    from resources.approvals import load_private_key

    if policy is not None:
        folder = Path(book.db_path).parent if book.db_path is not None else book.key_path.parent.parent  # PG: home
        path = folder / f"policy-{policy_hash(policy)[:16]}.yaml"
        if not path.exists():
            path.write_text(yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=True))
    path = Path(path or policy_path())
    from platform_defs.policy import load_policy

    in_force = policy_in_force(book)
    if in_force is not None and in_force.hash == policy_hash(load_policy(path)):
        return None
    return record(book, path, signer="pat", key=load_private_key(DEMO_ADMIN_KEY), initial=in_force is None)


# -- credentials (issue 11): every route of an endpoint but /health needs one ---------------------
ALL_ROUTES = ("predict", "version", "metrics")


def new_grant(target, caller: str = "test", routes=ALL_ROUTES, *, not_after: str | None = None,
              revoked: dict | None = None) -> tuple[dict, str]:
    """A grant for ``target`` (an endpoint Target) and the token it accepts: ``(grant, token)``."""
    import secrets

    from resources.serving.access import make_token, token_sha256

    gid = secrets.token_hex(6)
    token = make_token(target.name, target.env, gid, secrets.token_urlsafe(32))
    return ({"id": gid, "caller": caller, "routes": list(routes), "revoked": revoked,
             "secrets": [{"sha256": token_sha256(token), "not_after": not_after}]}, token)


def access_table(target, grants: list[dict], generation: int = 1) -> dict:
    """An access table document for ``target`` listing ``grants``."""
    from datetime import datetime, timezone

    return {"version": 1, "endpoint": target.name, "env": target.env, "generation": generation,
            "updated_at": datetime.now(timezone.utc).isoformat(), "grants": grants}


def grant_caller(deployer, target, caller: str = "test", routes=ALL_ROUTES) -> dict[str, str]:
    """Publish an access table with one grant for ``caller`` at ``target`` (before or after its
    deploy: workers read it on their next request) and return the headers that carry its token."""
    grant, token = new_grant(target, caller, routes)
    deployer.publish_grants(target, access_table(target, [grant]))
    return {"authorization": f"Bearer {token}"}


def worker_facts(deployer, target) -> list[dict | None]:
    """Each current worker's process facts (pid, run_id, native_threads, ...: ``protocol.WORKER_ROUTE``),
    asked as the supervisor asks them: on the worker's private Unix socket with the slot's own
    supervisor credential (derived from the slot secret, which this test process, the platform's
    user, may read)."""
    import json as _json

    from resources.serving import protocol
    from resources.serving.access import backend_token, bearer

    slot = deployer.slot_dir(target)
    cur = protocol.control_call(slot, "/status")["current"]
    headers = bearer(backend_token(protocol.read_secret(slot), target.name, target.env, "supervisor"))
    out = []
    for i in range(cur["workers"]):
        got = protocol.unix_get(protocol.worker_socket(slot, cur["id"], i), protocol.WORKER_ROUTE, 5.0,
                                headers=headers)
        out.append(_json.loads(got[1]) if got is not None and got[0] == 200 else None)
    return out


_GRANTED: dict[tuple[str, str], dict[str, str]] = {}


def caller_headers(deployer, target, caller: str = "test") -> dict[str, str]:
    """The test's credential for the endpoint ``target`` of ``deployer``'s run dir: granted (one grant,
    all routes, ``grant_caller``) the first time it is asked for, the same headers after."""
    key = (str(deployer.run_dir), target.slot)
    if key not in _GRANTED:
        _GRANTED[key] = grant_caller(deployer, target, caller)
    return _GRANTED[key]


_BY_ADDRESS: dict[str, dict[str, str]] = {}


def granted(deployer, target, caller: str = "test") -> dict[str, str]:
    """``caller_headers`` for ``target``, also remembered by its stable address (``headers_at``), for
    helpers that only know the address."""
    headers = caller_headers(deployer, target, caller)
    _BY_ADDRESS[deployer.address(target)] = headers
    return headers


def headers_at(address: str) -> dict[str, str]:
    """The credential ``granted`` for the endpoint at ``address`` (KeyError if none was: a test must
    hold one to be answered)."""
    return _BY_ADDRESS[address.rstrip("/")]


def cli_token(book, deployer, endpoint: str, env: str, org=None) -> str:
    """``onepath-cli``'s credential for ``endpoint.env``, got the way the CLI gets it (issued on first use
    while the recorded policy in ``book`` grants it, kept in the callers' store beside the ledger). ``org``:
    the test's own organisation when its endpoints are not the example's."""
    from platform_defs.access import CLI_CALLER, Access
    from platform_defs.loader import load_organisation

    return Access(book, deployer).caller_token(org if org is not None else load_organisation(), CLI_CALLER,
                                               endpoint, env)


def cli_headers(book, deployer, endpoint: str, env: str, org=None) -> dict[str, str]:
    """The ``authorization`` header carrying :func:`cli_token`."""
    return {"authorization": f"Bearer {cli_token(book, deployer, endpoint, env, org)}"}


def endpoint_of(deployer, org, address: str):
    """The endpoint ``Target`` of ``org`` served at ``address`` by ``deployer`` (None: an app's, or nobody's)."""
    from resources.deployers.base import Target

    for ep in org.of_kind("endpoint"):
        for env in ep.environments:
            t = Target(ep.name, env, "endpoint", ep.ports.get(env))
            if deployer.address(t).rstrip("/") == address.rstrip("/"):
                return t
    return None


@pytest.fixture(scope="session")
def postgres() -> Iterator["PostgresServer"]:
    """A real PostgreSQL 15 server for the session (tests/stores.py); ``create_database`` gives a test its own."""
    from tests.stores import start_postgres

    server = start_postgres()
    try:
        yield server
    finally:
        server.stop("immediate")  # its data is thrown away next: nothing to flush, no session to wait for
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path: Path) -> "LedgerBackend":
    """A ledger test runs on both stores: a sqlite file, and a fresh database of the session's PostgreSQL."""
    from tests.stores import LedgerBackend

    return LedgerBackend(request.param, tmp_path,
                         request.getfixturevalue("postgres") if request.param == "postgresql" else None)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator["MotoServer"]:
    """moto's S3 server for the session, its own process on loopback (its state is in memory)."""
    from tests.stores import start_moto

    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


def s3_environment(monkeypatch: pytest.MonkeyPatch, server: "MotoServer") -> None:
    """The AWS variables onepath's S3 clients (and MLflow's) read, pointing at ``server``."""
    for var, value in {"AWS_ENDPOINT_URL_S3": server.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": server.endpoint_url,
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "ONEPATH_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(var, value)


@pytest.fixture
def bucket(moto_s3, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the session's moto server, with the AWS variables set for it (``s3_environment``)."""
    import uuid

    s3_environment(monkeypatch, moto_s3)
    name = f"onepath-{uuid.uuid4().hex[:12]}"
    moto_s3.client("s3").create_bucket(Bucket=name)
    return name


def pytest_terminal_summary(terminalreporter) -> None:
    """Seconds per test file (setup, call and teardown together), slowest first: where CI's time goes, which
    the per-test durations above scatter."""
    per_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if isinstance(getattr(report, "duration", None), float) and getattr(report, "nodeid", ""):
                path = report.nodeid.split("::")[0]
                per_file[path] = per_file.get(path, 0.0) + report.duration
    if per_file:
        terminalreporter.write_sep("=", "slowest 15 test files")
        for path, seconds in sorted(per_file.items(), key=lambda kv: -kv[1])[:15]:
            terminalreporter.write_line(f"{seconds:8.1f}s {path}")
