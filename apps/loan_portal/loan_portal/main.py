"""loan_portal: the customer-facing loan application site of Example Lending.

Collects an application, sends only the model features (never the applicant's name, national ID
or email) to the credit scoring endpoint, and turns the probability of default into a decision.
Configuration is read from the environment on every request:

- ``ONEPATH_RELEASE_VERSION`` release version (default ``dev``), reported by /health and /version
- ``ONEPATH_ENV``             environment name (default ``dev``)
- ``ONEPATH_CREDIT_SCORING_URL`` base URL of the scoring endpoint; without it nothing is scored
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from resources.serving.access import credential_header  # the credential onepath issued this release, re-read when rotated
from resources.serving.retry import acall_with_retry  # onepath's worker runs this app with the platform on its path

log = logging.getLogger("loan_portal")

SCORING_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 64 * 1024
APPROVE_BELOW, REFER_BELOW = 0.2, 0.4
DECISION_TEXT = {"approve": "Approved", "refer": "Referred to an underwriter", "decline": "Declined"}


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    kind: str = "str"  # "str" | "float" | "int"
    choices: tuple[Any, ...] = ()
    lo: float = 0.0
    hi: float = math.inf
    pii: bool = False
    pattern: str | None = None


FIELDS = (
    Field("full_name", "Full name", pii=True),
    Field("national_id", "National ID", pii=True),
    Field("email", "Email", pii=True, pattern=r"[^@\s]+@[^@\s]+\.[^@\s]+"),
    Field("gender", "Gender", choices=("F", "M", "X")),
    Field("age_band", "Age band", choices=("18-25", "26-35", "36-50", "51-65", "65+")),
    Field("annual_income", "Annual income", "float", hi=1e9),
    Field("loan_amount", "Loan amount", "float", lo=1.0, hi=1e8),
    Field("loan_term_months", "Loan term (months)", "int", choices=(12, 24, 36, 48, 60)),
    Field("debt_to_income", "Debt-to-income ratio", "float", hi=100.0),
    Field("credit_history_years", "Credit history (years)", "float", hi=100.0),
    Field("num_open_accounts", "Open credit accounts", "int", hi=1000),
    Field("delinquencies_2y", "Delinquencies in the last 2 years", "int", hi=1000),
    Field("employment_type", "Employment",
          choices=("salaried", "self_employed", "part_time", "unemployed", "retired")),
    Field("home_ownership", "Home ownership", choices=("rent", "mortgage", "own")),
    Field("purpose", "Purpose",
          choices=("debt_consolidation", "home_improvement", "car", "education", "medical", "business")),
)
FIELD_NAMES = frozenset(f.name for f in FIELDS)
SCORED = tuple(f.name for f in FIELDS if not f.pii)  # the only applicant data that leaves the portal


class FieldError(ValueError):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field


class ScoringUnavailable(Exception):
    pass


class BodyTooLarge(Exception):
    pass


def settings() -> tuple[str, str, str | None]:
    """(release version, env, scoring URL or None), read now so a restart is never needed to test."""
    env = os.environ
    return (env.get("ONEPATH_RELEASE_VERSION") or "dev", env.get("ONEPATH_ENV") or "dev",
            env.get("ONEPATH_CREDIT_SCORING_URL") or None)


def _to_int(raw: Any) -> int:
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(raw)
        return int(raw)
    return int(raw.strip()) if isinstance(raw, str) else int(raw)


def coerce(f: Field, raw: Any) -> Any:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise FieldError(f.name, f"{f.name} is required")
    if f.kind == "str":
        if not isinstance(raw, str):
            raise FieldError(f.name, f"{f.name} must be a string")
        value: Any = raw.strip()
        if len(value) > 200:
            raise FieldError(f.name, f"{f.name} must be at most 200 characters")
        if f.pattern and not re.fullmatch(f.pattern, value):
            raise FieldError(f.name, f"{f.name} must be a valid {f.label.lower()} address")
    else:
        what = "a number" if f.kind == "float" else "a whole number"
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise FieldError(f.name, f"{f.name} must be {what}")
        try:
            value = float(raw) if f.kind == "float" else _to_int(raw)
        except (ValueError, OverflowError):
            raise FieldError(f.name, f"{f.name} must be {what}, got {str(raw)[:40]!r}") from None
        if not f.choices and not (math.isfinite(value) and f.lo <= value <= f.hi):
            raise FieldError(f.name, f"{f.name} must be between {f.lo:g} and {f.hi:g}")
    if f.choices and value not in f.choices:
        raise FieldError(f.name, f"{f.name} must be one of: {', '.join(map(str, f.choices))}")
    return value


def validate(data: Any, *, strict: bool = False) -> dict[str, Any]:
    """Clean applicant dict, or FieldError naming the first bad field. strict: unknown keys are errors."""
    if not isinstance(data, dict):
        raise FieldError(None, "the application must be a JSON object")
    if strict:
        for key in data:
            if key not in FIELD_NAMES:
                raise FieldError(str(key), f"unknown field {str(key)[:40]!r}")
    return {f.name: coerce(f, data.get(f.name)) for f in FIELDS}


def decide(probability: float) -> str:
    return "approve" if probability < APPROVE_BELOW else "refer" if probability < REFER_BELOW else "decline"


async def score(applicant: dict[str, Any]) -> dict[str, Any]:
    """Score one applicant: {application_id, decision, probability_of_default, model_version}."""
    app_id = f"WEB-{secrets.token_hex(6)}"
    url = settings()[2]
    if not url:
        raise ScoringUnavailable("credit scoring is not configured")
    record = {"application_id": app_id, **{name: applicant[name] for name in SCORED}}
    try:
        async with httpx.AsyncClient(timeout=SCORING_TIMEOUT_S) as client:
            # a scoring worker that died holding the request: once more, same request id (a score is a
            # pure function of its input; resources.serving.retry says when)
            # the endpoint answers only a declared caller: this release's own credential, asked on every call
            # (a rotation reaches it on the next one)
            resp = await acall_with_retry(lambda: client.post(f"{url.rstrip('/')}/predict", json={"records": [record]},
                                                              headers={"X-Request-ID": app_id,
                                                                       **credential_header("CREDIT_SCORING")}))
        resp.raise_for_status()
        body = resp.json()
        prob, version = body["predictions"][0]["probability"], body["version"]
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, LookupError, TypeError) as err:
        log.warning("scoring failed for %s: %s: %s", app_id, type(err).__name__, err)
        raise ScoringUnavailable("credit scoring is unavailable") from None
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        log.warning("scoring for %s returned an invalid probability %r", app_id, prob)
        raise ScoringUnavailable("credit scoring is unavailable")
    decision = decide(float(prob))
    log.info("application %s scored %.4f by model version %s: %s", app_id, prob, version, decision)
    return {"application_id": app_id, "decision": decision, "probability_of_default": float(prob),
            "model_version": str(version)}


async def read_body(request: Request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------- HTML

STYLE = """body{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#222}
label{display:block;margin:.6rem 0 .2rem}input,select{width:100%;padding:.3rem;box-sizing:border-box}
.error{background:#fde8e8;border:1px solid #e0a0a0;padding:.6rem}.note{color:#555}
button{margin-top:1rem;padding:.5rem 1.5rem}footer{margin-top:3rem;color:#888;font-size:.85rem}"""


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    version, env, _ = settings()
    return HTMLResponse(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · '
        f'Example Lending</title><meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<style>{STYLE}</style></head><body><main><h1>{escape(title)}</h1>{body}</main>"
        f"<footer>Example Lending loan portal · release {escape(version)} · env {escape(env)}</footer>"
        f"</body></html>", status_code=status)


def control(f: Field, value: Any) -> str:
    name = escape(f.name)
    if f.choices:
        opts = "".join(f'<option value="{escape(str(c))}"{" selected" if str(c) == str(value) else ""}>'
                       f"{escape(str(c))}</option>" for c in f.choices)
        return f'<select id="{name}" name="{name}" required><option value="">choose…</option>{opts}</select>'
    step = {"float": "any", "int": "1"}.get(f.kind)
    typ = f'type="number" step="{step}" min="{f.lo:g}"' if step else f'type="{"email" if f.pattern else "text"}"'
    return f'<input id="{name}" name="{name}" {typ} value="{escape(str(value))}" required>'


def form(values: dict[str, Any] | None = None, error: str | None = None) -> str:
    values = values or {}
    parts = [f'<p class="error" role="alert">{escape(error)}</p>' if error else ""]
    if not settings()[2]:
        parts.append('<p class="error">Credit scoring is not configured: applications cannot be '
                     "decided right now.</p>")
    parts.append('<p class="note">Your name, national ID and email stay with your application; '
                  "they are never sent to the credit model.</p><form method=\"post\" action=\"/apply\">")
    parts += [f'<label for="{escape(f.name)}">{escape(f.label)}</label>{control(f, values.get(f.name, ""))}'
              for f in FIELDS]
    parts.append('<button type="submit">Apply</button></form>')
    return "".join(parts)


def result(outcome: dict[str, Any]) -> str:
    return (f"<p><strong>{escape(DECISION_TEXT[outcome['decision']])}</strong></p><dl>"
            f"<dt>Application</dt><dd>{escape(outcome['application_id'])}</dd>"
            f"<dt>Probability of default</dt><dd>{outcome['probability_of_default']:.1%}</dd>"
            f"<dt>Model version</dt><dd>{escape(outcome['model_version'])}</dd></dl>"
            '<p><a href="/">New application</a></p>')


# ---------------------------------------------------------------- routes

async def index(request: Request) -> HTMLResponse:
    return page("Apply for a loan", form())


async def apply_form(request: Request) -> HTMLResponse:
    try:
        raw = dict(parse_qsl((await read_body(request)).decode("utf-8", "replace"),
                             keep_blank_values=True, max_num_fields=100))
    except (BodyTooLarge, ValueError):
        return page("Apply for a loan", form(error="The form submission is too large."), 413)
    try:
        applicant = validate(raw)
    except FieldError as err:
        return page("Apply for a loan", form(raw, str(err)), 400)
    try:
        outcome = await score(applicant)
    except ScoringUnavailable as err:
        return page("Scoring unavailable", f"<p>Sorry: {escape(str(err))}. Nothing was decided; please "
                    'try again in a few minutes.</p><p><a href="/">Back to the form</a></p>', 503)
    return page("Your decision", result(outcome))


async def apply_api(request: Request) -> JSONResponse:
    try:
        data = json.loads(await read_body(request))
    except BodyTooLarge:
        return JSONResponse({"error": "request body too large", "field": None}, 413)
    except ValueError:
        return JSONResponse({"error": "body must be valid JSON", "field": None}, 422)
    try:
        applicant = validate(data, strict=True)
    except FieldError as err:
        return JSONResponse({"error": str(err), "field": err.field}, 422)
    try:
        return JSONResponse(await score(applicant))
    except ScoringUnavailable as err:
        return JSONResponse({"error": str(err)}, 503)


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "version": settings()[0]})


async def version(request: Request) -> JSONResponse:
    release, env, url = settings()
    return JSONResponse({"app": "loan_portal", "version": release, "env": env, "scoring_url": url})


app = Starlette(routes=[
    Route("/", index, methods=["GET"]),
    Route("/apply", apply_form, methods=["POST"]),
    Route("/api/apply", apply_api, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/version", version, methods=["GET"]),
])
