"""Model cards: every section from real inputs (a ModelSpec, MLflow records, gate verdicts, a real
ledger), HTML that is standalone and escaped, and the files written."""

from __future__ import annotations

import base64
import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from platform_defs.governance.fairness import evaluate_fairness
from platform_defs.governance.gates import Verdict
from platform_defs.governance.model_card import (
    ModelCardData,
    card_data_from,
    markdown_block_to_html,
    render_model_card,
    write_model_card,
)
from platform_defs.specs import ModelSpec
from resources.ledger import Ledger

SPEC = ModelSpec(name="credit_risk", owner="credit-risk", track="ml-high-risk", dataset="credit_applications",
                 trainer="assets.credit.trainer:train_credit_risk", metrics={"roc_auc": 0.70, "log_loss_max": 0.6},
                 description="Scores the probability that a loan applicant defaults within 24 months; "
                             "used to decline or refer applications, never to price them.")
RUN_ID = "0123456789abcdef0123456789abcdef"
EVIL = "<script>alert('x')</script>"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake image bytes").decode()
GENERATED = datetime(2025, 3, 11, 9, 30, tzinfo=UTC)


def version_record(version: str = "3") -> dict:
    return {"name": "credit_risk", "version": version, "run_id": RUN_ID, "creation_timestamp": 1740816000000,
            "tags": {"onepath.dataset_key": "credit_applications", "onepath.data_hash": "d" * 64,
                     "onepath.code_hash": "c" * 64, "onepath.code_path": "assets/credit/trainer.py",
                     "onepath.training_rows": "4500", "onepath.test_rows": "1500", "onepath.split_seed": "7",
                     "onepath.dagster_run_id": "run-42", "onepath.author": "carla"}}


def run_record() -> dict:
    return {"run_id": RUN_ID, "metrics": {"roc_auc": 0.7712, "log_loss": 0.48, "accuracy": 0.81, "train_seconds": 2.5},
            "tags": {"onepath.owner": "credit-risk"}}


def fairness_verdict() -> Verdict:
    rng = np.random.default_rng(0)
    n = 600
    gender = rng.choice(["female", "male"], n)
    age = rng.choice(["18-30", "31-50", "51+"], n)
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < 0.8, y, 1 - y)
    res = evaluate_fairness(y, pred, pd.DataFrame({"gender": gender, "age_band": age}), favourable_label=0)
    meta = {"rows": res.n_rows}
    for name, a in res.attributes.items():
        for k, v in (("dpd", a.demographic_parity_difference), ("eod", a.equalized_odds_difference),
                     ("dir", a.disparate_impact_ratio)):
            if v is not None:
                meta[f"{name}_{k}"] = float(v)
    return Verdict("fairness", res.passed, res.summary, meta, {"per_group": res.to_markdown()})


def verdicts() -> list[Verdict]:
    importance = "\n".join(["| rank | feature | mean drop | std |", "|---:|---|---:|---:|",
                            "| 1 | debt_to_income | 0.0812 | 0.0041 |", "| 2 | delinquencies_2y | 0.0433 | 0.0020 |",
                            "| 3 | annual_income | 0.0101 | 0.0012 |"])
    return [
        Verdict("performance", True, "roc_auc 0.7712 ≥ 0.7", {"held_out_roc_auc": 0.7712}),
        fairness_verdict(),
        Verdict("explainability", True, "top features: debt_to_income, delinquencies_2y, annual_income (roc_auc "
                "baseline 0.771, 1500 held-out rows)", {"top_feature": "debt_to_income"},
                {"importance": importance, "chart": f"![permutation importance](data:image/png;base64,{PNG})"}),
        Verdict("lineage", True, "dataset credit_applications @ dddddddddddd (recomputed)",
                {"data_hash": "d" * 64, "code_hash": "c" * 64, "dataset_key": "credit_applications"}),
        Verdict("approval", True, f"approved by mira: {EVIL}", {"approver": "mira"}),
    ]


@pytest.fixture
def ledger_entries(tmp_path: Path):
    book = Ledger(tmp_path / "l.db", tmp_path / "keys" / "p.key")
    actor = "dagster:run-1"
    book.append("approval", "credit_risk", {"asset": "credit_risk", "version": "3", "env": "prod", "reason": EVIL,
                                             "approver": "mira", "approved_at": "2025-03-10T10:00:00+00:00",
                                             "signature": "sig", "first_release": True}, "mira", env="prod")
    book.append("approval", "credit_risk", {"asset": "credit_risk", "version": "2", "env": "prod",
                                             "reason": "older version", "approver": "mira",
                                             "approved_at": "2025-02-01T10:00:00+00:00", "signature": "sig",
                                             "first_release": False}, "mira", env="prod")
    book.append("approval", "churn", {"asset": "churn", "version": "3", "env": "prod", "reason": "other model",
                                      "approver": "mira", "approved_at": "2025-03-10T10:00:00+00:00",
                                      "signature": "sig", "first_release": False}, "mira", env="prod")
    book.append("deploy", "credit_scoring", {"model": "credit_risk", "version": "2", "previous_version": None,
                                             "address": "http://127.0.0.1:1", "promoted_from": "staging",
                                             "track": "ml-high-risk", "owner": "credit-risk", "checks": []},
                actor, env="prod")
    book.append("deploy", "credit_scoring", {"model": "credit_risk", "version": "3", "previous_version": "2",
                                             "address": "http://127.0.0.1:2", "promoted_from": None,
                                             "track": "ml-high-risk", "owner": "credit-risk", "checks": []},
                actor, env="staging")
    book.append("promotion_refused", "credit_scoring", {"model": "credit_risk", "version": "3", "still_serving": "2",
                                                        "failed": ["approval"]}, actor, env="prod")
    book.append("deploy", "credit_scoring", {"model": "credit_risk", "version": "3", "previous_version": "2",
                                             "address": "http://127.0.0.1:1", "promoted_from": "staging",
                                             "track": "ml-high-risk", "owner": "credit-risk", "checks": [],
                                             "claims": {"trigger": "manual run", "initiated_by": "carla",
                                                        "from": "dagster run tags (unauthenticated)"}},
                actor, env="prod")
    rb = book.append("rollback", "credit_scoring", {"model": "credit_risk", "from_version": "3", "to_version": "2",
                                                    "reason": "latency"}, "pat", env="prod")
    book.append("deploy", "credit_scoring", {"model": "credit_risk", "version": "2", "previous_version": "3",
                                             "checks": [], "via": "rollback", "rollback_entry": rb.seq}, "pat",
                env="prod")
    book.append("deploy", "churn_scoring", {"model": "churn", "version": "3"}, actor, env="prod")
    book.append("gate_verdict", "credit_scoring", {"model": "credit_risk", "version": "3", "passed": True,
                                                   "verdicts": {}}, actor, env="prod")
    return book.entries()


def full_card(entries) -> ModelCardData:
    return card_data_from(SPEC, version_record(), run_record(), verdicts(), entries, generated_at=GENERATED)


def test_card_data_gathers_every_section(ledger_entries):
    card = full_card(ledger_entries)
    assert (card.model, card.version, card.owner, card.track, card.run_id) == (
        "credit_risk", "3", "credit-risk", "ml-high-risk", RUN_ID)
    assert card.description.startswith("Scores the probability")
    # no registration entry among these: MLflow's onepath.author tag is shown only as a claim
    assert card.registered_at == "2025-03-01T08:00:00+00:00" and card.author == "claimed: carla"
    metrics = {m.name: m for m in card.metrics}
    assert set(metrics) == {"accuracy", "log_loss", "roc_auc"}            # train_seconds is not held-out
    assert metrics["roc_auc"].bound == 0.70 and metrics["roc_auc"].meets is True
    assert metrics["log_loss"].is_max and metrics["log_loss"].meets is True
    assert metrics["accuracy"].bound is None and metrics["accuracy"].meets is None
    assert {f.attribute for f in card.fairness} == {"gender", "age_band"}
    gender = next(f for f in card.fairness if f.attribute == "gender")
    assert gender.dpd is not None and gender.dir is not None and gender.passed is not None
    assert card.fairness_per_group_markdown and "### gender" in card.fairness_per_group_markdown
    assert [f.feature for f in card.top_features] == ["debt_to_income", "delinquencies_2y", "annual_income"]
    assert card.top_features[0].importance_mean == pytest.approx(0.0812)
    assert card.importance_chart == f"data:image/png;base64,{PNG}"
    assert card.lineage["data_hash"] == "d" * 64 and card.lineage["training_rows"] == "4500"
    assert [(a.approver, a.env, a.reason, a.first_release) for a in card.approvals] == [("mira", "prod", EVIL, True)]
    assert [(d.event, d.env, d.version, d.actor) for d in card.deployments] == [
        ("deploy", "prod", "2", "dagster:run-1"),
        ("deploy", "staging", "3", "dagster:run-1"),
        ("refused", "prod", "3", "dagster:run-1"),
        ("deploy", "prod", "3", "dagster:run-1 (claimed: carla)"),  # the run, and who its tags claim started it
        ("rollback", "prod", "2", "pat"),
        ("deploy", "prod", "2", "pat"),                      # what the rollback records after itself
    ]
    assert card.deployments[-2].detail == "rolled back from 3: latency"
    assert card.deployments[-1].detail == f"serves again after a rollback (ledger #{card.deployments[-2].ledger_seq})"
    assert all(d.ts and d.ledger_seq for d in card.deployments)


def test_the_card_names_the_registered_author_never_the_tag(tmp_path):
    """The author shown is the one the version's registration authenticated; an unsigned notebook version's
    author is unknown, whatever its onepath.author tag (or its registration's claims) say."""
    book = Ledger(tmp_path / "l.db", tmp_path / "keys" / "p.key")
    book.append("model_registered", "credit_risk", {"model": "credit_risk", "version": "3", "via": "graph",
                                                    "author": "team:credit-risk", "author_verified": True,
                                                    "claims": {"dagster/user": "mira"}}, "dagster:run-1")
    book.append("model_registered", "credit_risk", {"model": "credit_risk", "version": "4", "via": "handoff",
                                                    "author": None, "author_verified": False,
                                                    "claims": {"onepath.author": "mira"}}, "sensor:registry_handoff")
    card3 = card_data_from(SPEC, version_record(), run_record(), verdicts(), book.entries(), generated_at=GENERATED)
    assert card3.author == "team:credit-risk"  # not carla (the tag) nor mira (the run's claim)
    card4 = card_data_from(SPEC, version_record("4"), run_record(), verdicts(), book.entries(), generated_at=GENERATED)
    assert card4.author == "unknown: registered without a registration signature (claimed: mira)"


def test_render_has_all_sections_in_both_formats(ledger_entries):
    md, page = render_model_card(full_card(ledger_entries))
    sections = ["Intended use", "Ownership", "Version", "Held-out metrics", "Governance checks", "Fairness",
                "Top features", "Data lineage", "Approvals", "Deployment history"]
    assert re.findall(r"^## (.+)$", md, re.M) == sections
    assert re.findall(r"<h2>(.+?)</h2>", page) == sections
    for text in ("credit-risk", "ml-high-risk", RUN_ID, "0.7712", "debt_to_income", "d" * 64, "c" * 64,
                 "credit_applications", "2025-03-10T10:00:00+00:00", "rolled back from 3: latency", "4500",
                 "Scores the probability that a loan applicant defaults"):
        assert text in md, text
        assert text in page, text
    gender = next(f for f in full_card(ledger_entries).fairness if f.attribute == "gender")
    assert f"{gender.dpd:.3f}" in md and f"{gender.dpd:.3f}" in page
    assert "older version" not in md and "other model" not in md   # other versions' / models' approvals
    assert "| favourable rate (95% CI)" in md                        # the per-group table, as given
    assert "<th>favourable rate (95% CI)</th>" in page               # ...and as an HTML table


def test_html_is_standalone_and_escaped(ledger_entries):
    md, page = render_model_card(full_card(ledger_entries))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<style>" in page and '<meta charset="utf-8">' in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)   # no external assets
    assert "<link" not in page
    assert f'src="data:image/png;base64,{PNG}"' in page                 # the chart is inline
    # Markdown: the reason is text wherever it is rendered, not a tag
    assert EVIL not in md and r"\<script\>" in md


def test_every_value_is_escaped_and_a_bad_chart_is_dropped(ledger_entries):
    card = full_card(ledger_entries)
    hostile = dataclasses.replace(
        card, model="m<b>", description='"><img src=x onerror=alert(1)>', owner="<i>team</i>",
        lineage={"data_hash": "</td><script>1</script>"},
        importance_chart='data:image/png;base64,AAAA" onerror="alert(1)')
    _, page = render_model_card(hostile)
    assert "<script" not in page.lower() and "<img src=x" not in page and "<i>team" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "m&lt;b&gt;" in page
    assert "onerror=&quot;alert" not in page and 'class="chart"' not in page   # not a plain base64 URI: left out
    # per-group markdown (group names come from data) is escaped too
    snippet = markdown_block_to_html("### <b>x</b>: pass\n\n| group | rows |\n|---|---:|\n| <script>a | 3 |\n")
    assert "<script" not in snippet and "&lt;script&gt;a" in snippet and "<h4>&lt;b&gt;x&lt;/b&gt;: pass</h4>" in snippet


def test_empty_sections_say_so_and_invent_nothing():
    bare = ModelSpec(name="churn", owner="retention", track="ml-standard", dataset="customer_activity",
                     trainer="assets.retention.trainer:train_churn")
    card = card_data_from(bare, {"version": "1", "run_id": None, "tags": {}}, None, [], [], generated_at=GENERATED)
    md, page = render_model_card(card)
    for text in ("No description declared", "No held-out metrics recorded", "Not evaluated: no fairness verdict was "
                 "recorded for this version", "Not evaluated: no explainability report",
                 "No lineage tags recorded", "None recorded for this version",
                 "None recorded: this model has not been deployed"):
        assert text in md and text in page
    assert card.metrics == [] and card.fairness == [] and card.top_features == []


def test_performance_verdict_supplies_metrics_when_the_run_is_not_given():
    card = card_data_from(SPEC, version_record(), None, verdicts(), [], generated_at=GENERATED)
    roc = next(m for m in card.metrics if m.name == "roc_auc")
    assert roc.value == pytest.approx(0.7712)
    missing = next(m for m in card.metrics if m.name == "log_loss")   # declared, never logged: shown as missing
    assert missing.meets is False
    assert card.run_id == RUN_ID


def test_real_mlflow_records_and_written_files(settings, tmp_path, ledger_entries):
    from resources.mlflow_registry import MlflowRegistry

    mlflow = MlflowRegistry(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri,
                            artifact_root=str(settings.mlflow_artifact_root), ui_url=settings.mlflow_ui_url,
                            cache_dir=str(settings.releases_dir / "models"))
    client = mlflow.client()
    run = client.create_run(mlflow.experiment_id("onepath-test/model-card"), tags={"onepath.author": "carla"})
    client.log_metric(run.info.run_id, "roc_auc", 0.75)
    client.log_metric(run.info.run_id, "train_seconds", 1.0)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("model_card_model")
    mv = client.create_model_version("model_card_model", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                     tags={"onepath.data_hash": "e" * 64, "onepath.training_rows": "900"})
    spec = SPEC.model_copy(update={"name": "model_card_model"})
    card = card_data_from(spec, client.get_model_version("model_card_model", mv.version),
                          client.get_run(run.info.run_id), verdicts(), ledger_entries)
    assert card.run_id == run.info.run_id and card.version == str(mv.version)
    assert [(m.name, m.value) for m in card.metrics if m.name == "roc_auc"] == [("roc_auc", 0.75)]
    assert card.lineage["data_hash"] == "e" * 64 and card.author == "claimed: carla"
    assert card.registered_at is not None and card.deployments == []   # the ledger holds other models only

    md_path, html_path = write_model_card(card, tmp_path / "cards")
    assert md_path.name == f"model_card-model_card_model-v{mv.version}.md" and html_path.suffix == ".html"
    md, page = render_model_card(card)
    assert md_path.read_text() == md and html_path.read_text() == page
    assert sorted(p.name for p in (tmp_path / "cards").iterdir()) == sorted([md_path.name, html_path.name])
