"""Counters the emulator keeps so tests and benchmarks can assert on outcomes.

Every number a caller cares about ("reuse 0, revocations 0") lives here, per
token family and in total, so a benchmark never has to infer it from logs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

#: The events the ledger counts. Kept as one tuple so the admin endpoint, the
#: Python API and the tests agree on the names.
EVENTS = (
    "redemptions",  # refresh grants that rotated (or re-issued) tokens
    "code_exchanges",  # authorization codes turned into grants
    "reuse",  # a rotated-out refresh token was presented
    "reuse_in_window",  # a rotated-out token accepted inside a reuse window
    "concurrent_rejections",  # "token request is already being processed"
    "rejected_refreshes",  # invalid_grant for a dead, unknown or revoked token
    "revocations",  # families revoked (by reuse or by /revoke)
    "api_served",  # REST calls answered with a 2xx
    "api_refused",  # REST calls refused (401, 403 limit, faults)
    "dropped_after_rotation",  # fault: rotated, then closed without answering
)


@dataclass
class Ledger:
    """Totals plus a per-family breakdown of the events in :data:`EVENTS`."""

    totals: Counter[str] = field(default_factory=Counter)
    per_family: dict[str, Counter[str]] = field(default_factory=dict)

    def count(self, event: str, family_id: str | None = None, n: int = 1) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown ledger event {event!r}")
        self.totals[event] += n
        if family_id is not None:
            self.per_family.setdefault(family_id, Counter())[event] += n

    def __getitem__(self, event: str) -> int:
        return self.totals[event]

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready copy: every event appears in ``totals``, even at zero."""
        return {
            "totals": {name: self.totals[name] for name in EVENTS},
            "families": {fid: dict(c) for fid, c in self.per_family.items()},
        }

    def reset(self) -> None:
        self.totals.clear()
        self.per_family.clear()
