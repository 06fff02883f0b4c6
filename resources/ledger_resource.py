"""The ledger as a Dagster resource (``resources.ledger`` itself imports no Dagster: reading it stays cheap)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from resources.ledger import Ledger


class LedgerResource(dg.ConfigurableResource):
    """The platform ledger: append-only, hash-chained, each head signed by the platform key and
    countersigned by the witness when one is configured."""

    location: str = Field(
        description="Where the entries are: a sqlite file (default $ONEPATH_HOME/ledger.db) or a PostgreSQL URL "
                    "(postgresql+psycopg2://user:password@host:port/db), which carries a password: give it as "
                    "dg.EnvVar(\"ONEPATH_LEDGER_URL\"), never as a literal (the settings do).")
    key_path: str = Field(
        description="Ed25519 platform signing key (PEM, mode 0600), kept outside the database; "
                    "created on first append; its public key is written next to it as .pub.")
    platform_key: str | None = Field(
        None, description="The platform signing key itself (PEM), for a host that must not keep it in a file: give "
                          "it as dg.EnvVar(\"ONEPATH_PLATFORM_KEY\") (the settings do); unset: the key file.")
    witness_socket: str | None = Field(
        None, description="Unix socket of the ledger's witness (onepath witness serve), a service running as "
                          "its own OS user that countersigns every head (env ONEPATH_WITNESS_SOCKET).")

    def ledger(self) -> Ledger:
        socket = self.witness_socket
        if not socket:  # a run config may set the field to null: the configured witness still counts
            from platform_defs.settings import load_settings  # here: platform_defs imports this module

            socket = load_settings().witness_socket
        return Ledger(self.location, Path(self.key_path), Path(socket) if socket else None,
                      private_key_pem=self.platform_key or None)
