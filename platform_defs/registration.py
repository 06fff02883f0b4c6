"""A model version's registration, fixed in the ledger: the one record of what a version IS.

MLflow's tags, run metrics and run artifacts can be written by any client of its unauthenticated
server, and Dagster's materialization metadata by any GraphQL client; the ledger is append-only,
hash-chained and its head signed by the platform key. So when a version is registered the platform
appends a ``model_registered`` entry holding the content digest of the model folder as MLflow serves
it (``resources.artifact_digest``), the lineage facts (data and code hash, dataset, split, author),
the held-out metrics it measured and the sha256 of the reference sample it logged. Everything that
later judges or serves the version reads these facts from here (``registration``) and checks the
files it fetches against them; a tag that no longer matches was changed after registration.

Two ways in: the model asset (``build_model_defs``), right after it registered the version, and the
handoff sensor, for versions registered outside onepath (``"via": "handoff"``: the digest at handoff
and the facts the version's tags carried then). The first entry for a version is the record; a
second call returns it and appends nothing.

Also here: the digest of the explainability report the gate computed (``record_explainability`` /
``explainability_record``), so a report read back from MLflow is believed only if it still hashes to it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from resources.artifact_digest import bytes_digest, folder_digest

KIND = "model_registered"
EXPLAINABILITY_KIND = "explainability_report"
REFERENCE_SAMPLE = "onepath/reference_sample.parquet"
# a notebook's (or adopted version's) code record on the version's run: the gates' lineage check re-hashes it
CODE_RECORD = "onepath/code/source.py"
HOW_TO_REGISTER = ("train it through the graph (materialize the model asset) or let the registry_handoff "
                   "sensor pick it up (it records versions registered outside onepath)")


def registration(book: Any, model: str, version: str) -> Any | None:
    """The ``model_registered`` ledger entry of ``version`` of ``model`` (the first one), or None."""
    for e in book.entries(kind=KIND, subject=model):
        if str(e.data.get("version")) == str(version):
            return e
    return None


def registered_digest(book: Any, model: str, version: str) -> str | None:
    entry = registration(book, model, version)
    return entry.data.get("digest") if entry is not None else None


def _reference_digest(mlflow: Any, run_id: str | None) -> str | None:
    if not run_id:  # a version registered without a run has no reference sample
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.run_artifact(run_id, REFERENCE_SAMPLE, Path(tmp))
        return bytes_digest(path.read_bytes()) if path is not None else None


# the only modules whose types a version registered outside onepath may ask skops to trust: their
# classes rebuild estimators; nothing else (a function, a class from elsewhere) is ever reconstructed
SKOPS_TRUSTED_MODULES = ("sklearn.", "numpy.", "scipy.")


class NotServable(ValueError):
    """A version registered outside onepath whose files onepath will never load (one line: why)."""


def refuse_outside_content(folder: Path) -> None:
    """Raise :class:`NotServable` unless the model folder is one onepath may load although a client it does
    not trust wrote it: the sklearn flavour in skops format (a pickle runs code when it is loaded), asking
    skops to trust only types of sklearn, numpy and scipy (the MLmodel file, which the client wrote,
    names the types to trust)."""
    import yaml

    try:
        mlmodel = yaml.safe_load((Path(folder) / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as err:
        raise NotServable(f"its MLmodel file cannot be read ({err})") from None
    sk = ((mlmodel or {}).get("flavors") or {}).get("sklearn") if isinstance(mlmodel, dict) else None
    if not isinstance(sk, dict):
        raise NotServable("it is not an sklearn model: a version registered outside onepath is loaded only as an "
                          "sklearn model in skops format (log it with serialization_format=\"skops\")")
    fmt = sk.get("serialization_format")
    if fmt != "skops":
        raise NotServable(f"it is serialized as {fmt!r}, which runs code when loaded: log it with "
                          f"serialization_format=\"skops\"")
    trusted = sk.get("skops_trusted_types") or []
    bad = [t for t in trusted if not isinstance(t, str) or not t.startswith(SKOPS_TRUSTED_MODULES)]
    if bad:
        raise NotServable(f"its MLmodel asks skops to trust {bad[0]!r}: only types of sklearn, numpy and scipy "
                          f"may be trusted")


def record_registration(book: Any, mlflow: Any, *, model: str, version: str, run_id: str | None,
                        data_hash: str | None, code_hash: str | None, code_path: str | None,
                        dataset_key: str | None, author: str | None, split_seed: int | str | None,
                        test_size: float | str | None, training_rows: int | str | None,
                        metrics: dict[str, float] | None, via: str = "graph", actor: str = "onepath",
                        registered_by: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
                        policy: Any = None, signed_by: str | None = None,
                        registration_signature: str | None = None, test_data_hash: str | None = None,
                        code_known: bool | None = None) -> Any:
    """Append the ``model_registered`` entry of ``version``: the digest of its model folder as MLflow
    serves it now (a fresh download, not the cache), the lineage facts given, the held-out ``metrics``
    and the sha256 of its logged reference sample. Returns the entry (the existing one if already
    recorded: the first record stands). A version handed off from outside onepath (``via="handoff"``) must
    pass :func:`refuse_outside_content`, or :class:`NotServable` and nothing is recorded.

    The author recorded is authenticated or absent. The graph passes ``author="team:<owner>"`` and
    ``registered_by`` (the platform run that trained it: the ledger entry is the platform's, signed with
    its head). A handoff's author is ``signed_by`` only when ``registration_signature`` verifies with that
    identity's key in the RECORDED policy in force over ``{model, version, run_id, digest}`` (the digest
    computed here), and only while ``policy`` (the file handed in; default the policy file) is that policy;
    otherwise ``None``, and what the client said goes to ``claims``, never used (``signature_unverified``
    says why no signature was checked). ``code_known=False`` records that the code behind ``code_hash`` is
    not known (a version adopted from plain MLflow whose run names no git commit, or an interactive session
    with no source): the lineage check refuses such a version rather than vouch for its code."""
    existing = registration(book, model, version)
    if existing is not None:
        return existing
    with tempfile.TemporaryDirectory() as tmp:
        folder = mlflow.fresh_copy(model, str(version), Path(tmp))
        if via == "handoff":  # written by a client onepath does not trust: raises NotServable
            refuse_outside_content(folder)
        digest = folder_digest(folder)

    def _opt(v: Any, cast: Any) -> Any:
        return None if v in (None, "") else cast(v)

    claims = {k: v for k, v in (claims or {}).items() if v not in (None, "")}
    if via == "graph" or registered_by:  # the platform registers it, and vouches for the author it names
        author_verified = bool(author)
    else:  # a client onepath does not trust: its author is whoever signed the registration, or nobody
        author, author_verified = None, False
        if signed_by or registration_signature:
            from resources.approvals import ApprovalError, verify_registration

            from platform_defs.policy_record import policy_in_force, policy_standing

            claims["onepath.signed_by"] = signed_by
            if policy is None:
                from platform_defs.policy import load_policy

                policy = load_policy()
            # the identities that may sign are the recorded policy's, never the file's: whoever can edit the
            # file could add an identity and sign as it. A file that is not the recorded policy vouches for nobody
            standing = policy_standing(book, policy)
            recorded = policy_in_force(book) if standing.ok else None
            if recorded is None:
                claims["signature_unverified"] = standing.problem or "no policy is recorded in the ledger yet"
            else:
                try:
                    verify_registration(recorded.policy, signed_by=str(signed_by or ""),
                                        signature=str(registration_signature or ""), model=model,
                                        version=str(version), run_id=run_id, digest=digest)
                    author, author_verified = str(signed_by), True
                except ApprovalError as err:
                    claims["signature_refused"] = str(err)
    extra: dict[str, Any] = {"author_verified": author_verified}
    if registered_by:
        extra["registered_by"] = registered_by
    if claims:
        extra["claims"] = claims
    return book.append(KIND, model, {
        "model": model, "version": str(version), "run_id": run_id, "digest": digest, **extra,
        "data_hash": data_hash or None, "code_hash": code_hash or None, "code_path": code_path or None,
        "dataset_key": dataset_key or None, "author": author or None,
        "split_seed": _opt(split_seed, int), "test_size": _opt(test_size, float),
        "training_rows": _opt(training_rows, int),
        **({"test_data_hash": test_data_hash} if test_data_hash else {}),
        **({"code_known": bool(code_known)} if code_known is not None else {}),
        "metrics": {k: float(x) for k, x in (metrics or {}).items()},
        "reference_digest": _reference_digest(mlflow, run_id), "via": via,
    }, actor)


def record_explainability(book: Any, *, model: str, version: str, report_digest: str, chart_digest: str,
                          actor: str = "onepath") -> Any:
    """Record the digests of the explainability report and chart just computed for ``version``."""
    return book.append(EXPLAINABILITY_KIND, model, {"model": model, "version": str(version),
                                                    "report_digest": report_digest,
                                                    "chart_digest": chart_digest}, actor)


def explainability_record(book: Any, model: str, version: str) -> Any | None:
    """The latest explainability digests recorded for ``version`` of ``model``, or None."""
    found = [e for e in book.entries(kind=EXPLAINABILITY_KIND, subject=model)
             if str(e.data.get("version")) == str(version)]
    return found[-1] if found else None


HOW_TO_SIGN = "README: Registering from a notebook"


def registered_author(entry: Any) -> tuple[str | None, bool]:
    """``(author, known)`` of a ``model_registered`` entry: the graph's own registration names its owner team
    (``team:<owner>``, written and signed by the platform); a handoff names an identity only when its
    registration signature verified (``author_verified``). Never a run tag or ``mlflow.user``."""
    data = entry.data
    if "author_verified" in data:
        return (str(data["author"]), True) if data["author_verified"] and data.get("author") else (None, False)
    if data.get("via", "graph") == "graph":
        # recorded before authors were authenticated: the platform's own registration, but its author field
        # may hold a dagster/user run tag; only a team name is kept (the owning team is refused anyway)
        author = data.get("author")
        return (author if isinstance(author, str) and author.startswith("team:") else None), True
    return None, False


def unknown_author_text(model: str, version: str) -> str:
    return (f"version {version} of {model} was registered from outside onepath without a registration signature, "
            f"so its author is unknown and independence cannot be checked: sign it with onepath sign-version "
            f"{model} --version {version} --as <you> ({HOW_TO_SIGN})")


class NotRegistered(LookupError):
    """A version with no ``model_registered`` entry: nothing vouches for its files."""


def verified_artifact(book: Any, mlflow: Any, model: str, version: str) -> tuple[Path, str]:
    """``(local folder, digest)`` of ``version``: fetched and checked against its registered digest
    (``MlflowRegistry.fetch_verified``; raises ``ArtifactMismatch``), for a deploy or a rollback."""
    digest = registered_digest(book, model, version)
    if not digest:
        raise NotRegistered(f"model '{model}' version {version} has no {KIND} ledger entry, so no digest to "
                            f"check its files against: {HOW_TO_REGISTER}")
    return mlflow.fetch_verified(model, str(version), digest), digest


__all__ = ["CODE_RECORD", "EXPLAINABILITY_KIND", "HOW_TO_REGISTER", "HOW_TO_SIGN", "KIND", "registered_author", "unknown_author_text", "NotRegistered", "NotServable", "refuse_outside_content", "explainability_record",
           "record_explainability", "record_registration", "registered_digest", "registration",
           "verified_artifact"]
