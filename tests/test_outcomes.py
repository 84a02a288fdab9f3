"""The outcome of presenting a refresh token: its kinds and what an outcome carries."""

from __future__ import annotations

import pytest

from sfrtr.oauth.outcome import OutcomeKind, RefreshOutcome


def test_the_outcome_kinds_and_their_names():
    """Logs, metrics and worker events print ``kind.value``: the names are an interface."""
    assert {kind.name: kind.value for kind in OutcomeKind} == {
        "OK": "ok", "REJECTED": "rejected", "BUSY": "busy", "NOT_SENT": "not_sent",
        "INDETERMINATE": "indeterminate", "INVALID": "invalid"}
    assert OutcomeKind("not_sent") is OutcomeKind.NOT_SENT
    assert f"{OutcomeKind.BUSY}" == "busy"


def test_an_outcome_carries_nothing_it_was_not_given():
    outcome = RefreshOutcome(OutcomeKind.NOT_SENT)
    assert outcome.grant is None
    assert outcome.salvaged is None
    assert (outcome.error, outcome.description) == ("", "")


def test_an_outcome_is_a_frozen_value():
    outcome = RefreshOutcome(OutcomeKind.REJECTED, error="invalid_grant",
                             description="expired access/refresh token")
    assert outcome == RefreshOutcome(OutcomeKind.REJECTED, error="invalid_grant",
                                     description="expired access/refresh token")
    with pytest.raises(AttributeError):
        outcome.error = "other"  # type: ignore[misc]
