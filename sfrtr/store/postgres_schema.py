"""The Postgres store's schema: its SQL, for the store and for ``sfrtr migrate``.

Kept apart from the store so a team that applies DDL itself can print it
(``sfrtr migrate --postgres DSN --print-sql``) without asyncpg installed.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

SCHEMA_VERSION = 1

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,40}")


@dataclass(frozen=True)
class Names:
    """The quoted names of everything the store keeps in one schema, under one prefix."""

    schema: str
    prefix: str

    def __post_init__(self) -> None:
        for value in (self.schema, self.prefix):
            if not _IDENTIFIER.fullmatch(value):
                raise ValueError(f"{value!r} is not a plain lowercase SQL identifier "
                                 "(letters, digits, underscores; at most 41 characters)")

    def _q(self, suffix: str) -> str:
        return f'"{self.schema}"."{self.prefix}_{suffix}"'

    @property
    def tokens(self) -> str:
        return self._q("tokens")

    @property
    def rescues(self) -> str:
        return self._q("rescues")

    @property
    def meta(self) -> str:
        return self._q("meta")

    @property
    def seq(self) -> str:
        """Versions and stamps: one counter for every write of this store."""
        return self._q("seq")

    @property
    def holders(self) -> str:
        """Holder numbers: one per store instance (a process's presence)."""
        return self._q("holders")

    @property
    def claims(self) -> str:
        """Keys claimed once until they expire (``claim_once``: OAuth state nonces)."""
        return self._q("claims")

    @property
    def key(self) -> int:
        """The first key of this store's advisory locks (the second is a holder number),
        so two stores in one database (two schemas or prefixes) never collide."""
        return zlib.crc32(f"sfrtr:{self.schema}.{self.prefix}".encode()) & 0x7FFFFFFF or 1

    @property
    def channel(self) -> str:
        """The NOTIFY channel of this store's changes."""
        return f"sfrtr_{self.key:08x}"


def schema_sql(names: Names) -> list[str]:
    """The statements that create the schema (idempotent: ``IF NOT EXISTS``).

    Records are ``jsonb`` (the tokens inside are secrets: grant the tables to the
    workers' role only). ``record IS NULL``: deleted; the row stays so that other
    processes see the delete by its stamp.
    """
    n = names
    return [
        f'CREATE SCHEMA IF NOT EXISTS "{n.schema}"',
        f"CREATE TABLE IF NOT EXISTS {n.meta} (key text PRIMARY KEY, value bigint NOT NULL)",
        f"CREATE SEQUENCE IF NOT EXISTS {n.seq}",
        f"CREATE SEQUENCE IF NOT EXISTS {n.holders} MAXVALUE 2147483647 CYCLE",
        f"CREATE TABLE IF NOT EXISTS {n.tokens} ("
        "customer text PRIMARY KEY, "
        "record jsonb, "
        "version bigint NOT NULL, "
        "holder bigint, "  # the store instance whose advisory lock makes the lock live
        "stamp bigint NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS {n.rescues} ("
        "customer text NOT NULL, fence bigint NOT NULL, record jsonb NOT NULL, "
        "PRIMARY KEY (customer, fence))",
        # Added within schema version 1 (IF NOT EXISTS: a store that creates its
        # schema adds it; one migrated by hand needs `sfrtr migrate` again).
        f"CREATE TABLE IF NOT EXISTS {n.claims} ("
        "key text PRIMARY KEY, expires_at double precision NOT NULL)",
        f"INSERT INTO {n.meta} VALUES ('schema', {SCHEMA_VERSION}) ON CONFLICT (key) DO NOTHING",
    ]


def migration_script(names: Names) -> str:
    """The schema as one SQL script, in a transaction."""
    body = ";\n".join(schema_sql(names))
    return f"BEGIN;\n{body};\nCOMMIT;\n"


__all__ = ["SCHEMA_VERSION", "Names", "migration_script", "schema_sql"]
