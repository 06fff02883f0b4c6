"""The terminal verbs against a real running platform (``onepath up``, started once by test_platform_up's
fixture): materialize a dataset with a parameter and follow its run, ``why`` on a refused prod check naming the
approve command, and promote an endpoint through staging to prod. Each verb runs as its own process, as a user
runs it; the runs execute on the platform."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.test_platform_up import ROOT, platform  # noqa: F401  (the running platform fixture)


def onepath(tmp_path, port: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ONEPATH_HOME": str(tmp_path / "home"), "ONEPATH_UI_PORT": str(port),
           "PYTHONPATH": str(ROOT), "ONEPATH_POLICY_FILE": str(tmp_path / "policy.yaml")}
    env.pop("DAGSTER_HOME", None)
    return subprocess.run([sys.executable, "-m", "platform_defs.cli", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=900, check=False)


def test_materialize_why_and_promote_from_a_terminal(platform):  # noqa: F811
    _client, port, tmp_path = platform
    bad = onepath(tmp_path, port, "materialize", "customer_activity", "--param", "nope=1")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("onepath: dataset 'customer_activity' takes no "
                                                                 "parameter 'nope'"), bad.stderr
    sub = onepath(tmp_path, port, "materialize", "customer_activity", "--param", "rows=800", "--no-follow",
                  "--json")
    assert sub.returncode == 0, sub.stderr
    run_id = json.loads(sub.stdout)["run_id"]
    followed = onepath(tmp_path, port, "runs", "follow", run_id)
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "materialized customer_activity" in followed.stdout
    assert "check customer_activity:expectations passed" in followed.stdout
    shown = json.loads(onepath(tmp_path, port, "runs", "show", run_id, "--json").stdout)
    assert shown["status"] == "SUCCESS" and shown["materializations"] == ["customer_activity"]
    listed = json.loads(onepath(tmp_path, port, "runs", "list", "--json").stdout)
    assert run_id in [r["run_id"] for r in listed]

    # nothing registered yet: promote says what to do, in one line
    early = onepath(tmp_path, port, "promote", "credit_scoring", "--to", "prod")
    assert early.returncode == 1 and early.stderr == ("onepath: model 'credit_risk' has no registered version yet: "
                                                      "materialize credit_risk first\n"), early.stdout + early.stderr
    # a run that failed before any check of the asset was evaluated: why says so, not "passed" or "evaluating"
    failed = onepath(tmp_path, port, "materialize", "credit_scoring_prod")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    why = onepath(tmp_path, port, "why", "credit_scoring_prod")
    assert why.returncode == 1 and why.stdout.startswith("credit_scoring_prod: run ") and \
        "failed before evaluating its checks" in why.stdout.splitlines()[0], why.stdout + why.stderr
    trained = onepath(tmp_path, port, "materialize", "credit_applications", "credit_risk")
    assert trained.returncode == 0 and "check credit_risk:performance passed" in trained.stdout, trained.stdout

    # credit_scoring reaches staging, and prod refuses it: why says who approves and the exact command
    promoted = onepath(tmp_path, port, "promote", "credit_scoring", "--to", "prod")
    assert promoted.returncode == 1, promoted.stdout + promoted.stderr
    assert "credit_scoring did not reach prod:" in promoted.stdout
    why = onepath(tmp_path, port, "why", "credit_scoring", "--env", "prod")
    assert why.returncode == 1, why.stderr
    assert "credit_scoring_prod:approval FAILED" in why.stdout
    assert "next: ask mira, pat to run: onepath approve credit_risk --version 1 --env prod" in why.stdout

    # an approval as the tour gives it, then promote: staging already serves it, prod deploys it
    ok = onepath(tmp_path, port, "approve", "credit_risk", "--version", "1", "--env", "prod", "--first-release",
                 "--reason", "first release", "--as", "mira", "--key",
                 str(ROOT / "assets" / "demo_identities" / "mira.key"))
    assert ok.returncode == 0, ok.stderr
    done = onepath(tmp_path, port, "promote", "credit_scoring", "--to", "prod", "--version", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "staging: already serves 1" in done.stdout
    assert "credit_scoring.prod serves 1 at http://127.0.0.1:" in done.stdout
    assert "-H @<(printf 'authorization: Bearer %s\\n'" in done.stdout
