"""SOQL literals: every value renders as one token, and user input cannot inject."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfrtr import Client, MalformedQuery, format_soql, soql_literal
from sfrtr.emulator import Emulator
from sfrtr.emulator.soql import Condition, parse
from sfrtr.salesforce.soql import Like, in_list, like_contains, like_prefix, quote_string
from tests.conftest import emulator_grant

INJECTIONS = [
    "x' OR Name != '",
    "x\\' OR Name != \\'",
    "\\",
    "'",
    "''",
    "\\'",
    "a'); DELETE FROM Account; --",
    "Robert'); DROP TABLE Students;--",
    "line\nbreak",
    "tab\tand\rreturn",
    "\\n is not a newline",
    "' AND Name = 'x",
    '"double" quotes',
    "é ü 中文 emoji 🎉",
    "%_wild_%",
    "{braces} {0} {name}",
]


@pytest.mark.parametrize("text", INJECTIONS)
def test_a_string_is_one_literal_equal_to_the_input(text):
    q = parse(format_soql("SELECT Id FROM Account WHERE Name = {} LIMIT 5", text))
    assert q.where == (Condition("Name", False, text),)
    assert q.limit == 5


@given(st.text(alphabet=st.characters(blacklist_characters="\x00")))
def test_any_text_round_trips_through_the_emulators_parser(text):
    q = parse(f"SELECT Id FROM Account WHERE Name != {soql_literal(text)} AND Industry = 'x'")
    assert q.where == (Condition("Name", True, text), Condition("Industry", False, "x"))


@given(st.lists(st.one_of(st.text(alphabet=st.characters(blacklist_characters="\x00")),
                          st.integers(), st.booleans(), st.none()), min_size=1))
def test_in_lists_round_trip(values):
    q = parse(f"SELECT Id FROM Account WHERE Name IN {in_list(values)}")
    assert q.where == (Condition("Name", False, tuple(values), in_list=True),)


def test_scalar_renderings():
    assert soql_literal(None) == "null"
    assert soql_literal(True) == "true"
    assert soql_literal(False) == "false"
    assert soql_literal(42) == "42"
    assert soql_literal(-1.5) == "-1.5"
    assert soql_literal(decimal.Decimal("10.50")) == "10.50"
    assert soql_literal(dt.date(2024, 2, 29)) == "2024-02-29"
    assert soql_literal(dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(
        hours=2)))) == "2024-05-01T12:00:00Z"
    assert soql_literal(dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)) == \
        "2024-05-01T12:00:00.123Z"
    assert soql_literal(["a", 1, None]) == "('a', 1, null)"
    assert soql_literal(("x",)) == "('x')"
    assert soql_literal(frozenset({"b", "a"})) == "('a', 'b')"
    assert quote_string("it's") == "'it\\'s'"
    assert soql_literal("a\\b\n") == "'a\\\\b\\n'"


@pytest.mark.parametrize(("value", "error"), [
    (dt.datetime(2024, 5, 1), ValueError),  # naive: ambiguous
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (decimal.Decimal("NaN"), ValueError),
    ([], ValueError),
    ([[1]], TypeError),
    ({"a": 1}, TypeError),
    (object(), TypeError),
    (b"bytes", TypeError),
    ("nul\x00byte", ValueError),
])
def test_values_without_a_safe_literal_are_refused(value, error):
    with pytest.raises(error):
        soql_literal(value)


def test_templates_refuse_specs_and_conversions():
    with pytest.raises(ValueError, match="format specs"):
        format_soql("SELECT Id FROM A WHERE N = {:>10}", "x")
    with pytest.raises(ValueError, match="conversions"):
        format_soql("SELECT Id FROM A WHERE N = {!r}", "x")
    assert format_soql("FIND {{x}} RETURNING A WHERE N = {n}", n="y") == \
        "FIND {x} RETURNING A WHERE N = 'y'"


def test_like_patterns_escape_the_inputs_wildcards():
    assert soql_literal(like_contains("50%_off")) == "'%50\\%\\_off%'"
    assert soql_literal(like_prefix("O'Re")) == "'O\\'Re%'"
    assert soql_literal(Like("Ac_me%'")) == "'Ac_me%\\''"
    # a backslash in the input stays a literal backslash, its % stays literal
    assert soql_literal(like_contains("a\\%")) == "'%a\\\\\\%%'"


@pytest.mark.anyio
async def test_injection_attempts_over_the_wire_match_nothing(emulator: Emulator, manager):
    await manager.connect("acme", emulator_grant(emulator, "acme"))
    client = Client("acme", manager)
    emulator.seed("acme", "Account", [{"Name": n} for n in ("a", "b", "O'Reilly", "x\ny")])
    for text in INJECTIONS:
        result = await client.query(format_soql("SELECT Name FROM Account WHERE Name = {}",
                                                text))
        assert result.records == []
    for name in ("O'Reilly", "x\ny"):
        found = await client.query(format_soql("SELECT Name FROM Account WHERE Name = {}",
                                               name))
        assert [r["Name"] for r in found.records] == [name]
    both = await client.query(format_soql("SELECT Name FROM Account WHERE Name IN {} "
                                          "ORDER BY Name", ["b", "a", "x' OR Name != '"]))
    assert [r["Name"] for r in both.records] == ["a", "b"]
    # the naive way breaks the query (or worse): what the helper exists for
    with pytest.raises(MalformedQuery):
        await client.query(f"SELECT Name FROM Account WHERE Name = '{INJECTIONS[0]}'")
