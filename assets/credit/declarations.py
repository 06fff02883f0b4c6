"""The lending company's credit line: applications -> credit_risk model -> credit_scoring endpoint -> loan_portal."""

from platform_defs.declare import app, dataset, endpoint, model

credit_applications = dataset(
    name="credit_applications",
    owner="credit-risk",
    track="ml-high-risk",
    description="Loan applications with their repayment outcome, per application period.",
    generator="assets.credit.data:generate_credit_applications",
    params={"rows": 6000, "period_start": "2026-01-01", "period_end": "2026-06-30", "shift": 0.0, "biased": False},
    min_rows=500,
    # labelled production data: what credit_scoring scored in prod, joined with repayment outcomes
    feedback={"endpoint": "credit_scoring", "env": "prod"},
    columns=[
        {"name": "application_id", "dtype": "string", "role": "id"},
        {"name": "applied_on", "dtype": "string", "role": "timestamp"},
        # PII is nullable: rows learned from production carry none (endpoints never log it)
        {"name": "full_name", "dtype": "string", "pii": True, "nullable": True},
        {"name": "national_id", "dtype": "string", "pii": True, "nullable": True},
        {"name": "email", "dtype": "string", "pii": True, "nullable": True},
        {"name": "gender", "dtype": "string", "protected": True, "values": ["F", "M", "X"]},
        {"name": "age_band", "dtype": "string", "protected": True,
         "values": ["18-25", "26-35", "36-50", "51-65", "65+"]},
        {"name": "annual_income", "dtype": "float", "min": 0, "max": 5_000_000},
        {"name": "loan_amount", "dtype": "float", "min": 100, "max": 1_000_000},
        {"name": "loan_term_months", "dtype": "int", "values": [12, 24, 36, 48, 60]},
        {"name": "debt_to_income", "dtype": "float", "min": 0, "max": 5},
        {"name": "credit_history_years", "dtype": "float", "min": 0, "max": 80},
        {"name": "num_open_accounts", "dtype": "int", "min": 0, "max": 100},
        {"name": "delinquencies_2y", "dtype": "int", "min": 0, "max": 50},
        {"name": "employment_type", "dtype": "string",
         "values": ["salaried", "self_employed", "part_time", "unemployed", "retired"]},
        {"name": "home_ownership", "dtype": "string", "values": ["rent", "mortgage", "own"]},
        {"name": "purpose", "dtype": "string",
         "values": ["debt_consolidation", "home_improvement", "car", "education", "medical", "business"]},
        {"name": "defaulted", "dtype": "int", "role": "label", "values": [0, 1]},
    ],
)

credit_risk = model(
    name="credit_risk",
    owner="credit-risk",
    track="ml-high-risk",
    purpose="credit_decision",  # the policy's purposes: a credit decision needs ml-high-risk or stricter
    description="Probability that an applicant defaults; drives credit decisions.",
    dataset="credit_applications",
    trainer="assets.credit.trainer:train_credit_risk",
    params={"C": 0.5},
    metrics={"roc_auc": 0.70},
)

credit_scoring = endpoint(
    name="credit_scoring",
    owner="credit-risk",  # no track: an endpoint follows its model (ml-high-risk, purpose credit_decision)
    description="Online credit scoring for the loan portal.",
    model="credit_risk",
    environments=["staging", "prod"],
    # logged beside the features: the tracing id (feedback joins outcomes by it) and the protected attributes
    # (fairness monitoring). Anything else a caller sends is dropped from the inference log and counted.
    pass_through=["application_id", "gender", "age_band"],
)

loan_portal = app(
    name="loan_portal",
    owner="digital-lending",
    track="app",
    description="The customer-facing loan application site.",
    source="apps/loan_portal",
    entrypoint="loan_portal.main:app",
    calls=["credit_scoring"],
)

DECLARATIONS = [credit_applications, credit_risk, credit_scoring, loan_portal]
