"""The SOQL subset parser: what it accepts, and that it only ever fails cleanly."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfrtr.emulator.soql import Condition, Query, SoqlError, parse


def test_full_grammar():
    q = parse("select Id, Name from Account where Industry = 'O\\'Reilly' and "
              "Amount != 5 and Active = true and Owner = null order by Name desc limit 10")
    assert q == Query(("Id", "Name"), "Account",
                      (Condition("Industry", False, "O'Reilly"), Condition("Amount", True, 5),
                       Condition("Active", False, True), Condition("Owner", False, None)),
                      "Name", True, 10)


@pytest.mark.parametrize("text", [
    "", "   ", "SELECT FROM Account", "SELECT Id Account", "SELECT Id FROM",
    "SELECT Id FROM Account WHERE", "SELECT Id FROM Account WHERE Name > 'a'",
    "SELECT Id FROM Account LIMIT -1", "SELECT Id FROM Account LIMIT 1.5",
    "SELECT Id FROM Account ORDER Name", "SELECT Id, FROM Account", "DELETE FROM Account",
    "SELECT Id FROM Account WHERE Name = 'unterminated",
    "SELECT Id FROM Account extra",
])
def test_rejects_outside_the_subset(text):
    with pytest.raises(SoqlError):
        parse(text)


@given(st.text(max_size=80))
def test_arbitrary_text_only_raises_soql_error(text):
    with contextlib.suppress(SoqlError):
        parse(text)


@given(st.text(alphabet="SELECTFROMWHEREANDORDBYLIMIT Id,'=!0123456789ab", max_size=60))
def test_keyword_soup_only_raises_soql_error(text):
    with contextlib.suppress(SoqlError):
        parse("SELECT " + text)


def test_escapes_in_and_dates():
    q = parse("SELECT Id FROM Account WHERE Name = 'a\\nb\\t\\\\\\'\\\"' AND Industry IN "
              "('x', 'y') AND Type NOT IN (null) AND CreatedDate != 2024-05-01T12:00:00Z "
              "AND CloseDate = 2024-05-01")
    assert q.where == (
        Condition("Name", False, "a\nb\t\\'\""),
        Condition("Industry", False, ("x", "y"), in_list=True),
        Condition("Type", True, (None,), in_list=True),
        Condition("CreatedDate", True, "2024-05-01T12:00:00Z"),
        Condition("CloseDate", False, "2024-05-01"),
    )
    assert q.where[1].matches("y")
    assert not q.where[2].matches(None)


@pytest.mark.parametrize("text", [
    "SELECT Id FROM Account WHERE Name = 'bad \\q escape'",
    "SELECT Id FROM Account WHERE Name IN ()",
    "SELECT Id FROM Account WHERE Name IN ('a'",
    "SELECT Id FROM Account WHERE Name NOT = 'a'",
    "SELECT Id FROM Account WHERE Name IN 'a'",
])
def test_malformed_conditions_are_soql_errors(text):
    with pytest.raises(SoqlError):
        parse(text)
