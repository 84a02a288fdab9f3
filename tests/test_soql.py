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
