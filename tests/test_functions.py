"""Tests for runner.functions, exercised through real JMESPath expressions."""

from decimal import Decimal

import jmespath
import pytest
from jmespath import exceptions as jexc

from runner.spec import functions as fn
from runner.spec.functions import FUNCTION_DOCS, OPTIONS, RunnerFunctions, compile, search


def ev(expression, data=None):
    return search(compile(expression), data if data is not None else {})


def assert_decimal(value, expected: str):
    assert isinstance(value, Decimal), f"{value!r} is not a Decimal"
    assert value == Decimal(expected)
    assert str(value) == expected  # exact representation, scale included


# --- minor_to_major -------------------------------------------------------


@pytest.mark.parametrize(
    "amount, currency, expected",
    [
        (1999, "USD", "19.99"),
        (150000, "JPY", "150000"),
        (12345, "KWD", "12.345"),
        (12345, "BHD", "12.345"),
        (123456, "CLF", "12.3456"),
        (5000, "KRW", "5000"),
        (5000, "XOF", "5000"),
        (-250, "EUR", "-2.50"),
        (0, "USD", "0.00"),
        ("1999", "USD", "19.99"),
        (" 150000 ", "JPY", "150000"),
        ("1999.5", "USD", "19.995"),  # Stripe *_decimal fields carry fractional minor units
    ],
)
def test_minor_to_major_uses_real_exponents(amount, currency, expected):
    out = ev("minor_to_major(amount_remaining, currency)", {"amount_remaining": amount, "currency": currency})
    assert_decimal(out, expected)


def test_minor_to_major_lower_case_currency_as_stripe_sends_it():
    data = {"amount_due": 1999, "currency": "usd"}
    assert_decimal(ev("minor_to_major(amount_due, currency)", data), "19.99")
    assert_decimal(ev("minor_to_major(`150000`, 'jpy')"), "150000")
    assert_decimal(ev("minor_to_major(`12345`, 'kwd')"), "12.345")


def test_minor_to_major_is_exact_for_large_amounts():
    big = 12345678901234567890123456789012345
    assert_decimal(ev("minor_to_major(a, 'USD')", {"a": big}), "123456789012345678901234567890123.45")


@pytest.mark.parametrize(
    "data",
    [
        {"a": 1999, "c": "ZZZ"},  # unknown currency: never guess
        {"a": 1999, "c": "XAU"},  # ISO defines no minor unit
        {"a": 1999, "c": None},
        {"a": None, "c": "USD"},
        {"c": "USD"},
        {"a": "12abc", "c": "USD"},
        {"a": "", "c": "USD"},
    ],
)
def test_minor_to_major_null_cases(data):
    assert ev("minor_to_major(a, c)", data) is None


def test_minor_to_major_overrides_for_provider_quirks():
    # ISO says ISK has 0 decimals; Stripe sends ISK amounts as 2-decimal values.
    assert_decimal(ev("minor_to_major(`500`, 'isk')"), "500")
    assert_decimal(ev("minor_to_major(`500`, 'isk', `{\"ISK\": 2}`)"), "5.00")
    assert_decimal(ev("minor_to_major(`500`, 'ISK', `{\"isk\": 2}`)"), "5.00")
    # overrides for other currencies leave the rest alone; null overrides is allowed
    assert_decimal(ev("minor_to_major(`1999`, 'usd', `{\"ISK\": 2}`)"), "19.99")
    assert_decimal(ev("minor_to_major(`1999`, 'usd', `null`)"), "19.99")


def test_minor_to_major_bad_override_is_a_spec_error():
    with pytest.raises(jexc.JMESPathError):
        ev("minor_to_major(`500`, 'ISK', `{\"ISK\": \"two\"}`)")


def test_minor_to_major_arity_checked():
    with pytest.raises(jexc.ArityError):
        ev("minor_to_major(`500`)")
    with pytest.raises(jexc.ArityError):
        ev("minor_to_major(`500`, 'USD', `{}`, `1`)")
    with pytest.raises(jexc.JMESPathTypeError):
        ev("minor_to_major(`true`, 'USD')")


def test_currency_exponent():
    assert ev("currency_exponent('USD')") == 2
    assert ev("currency_exponent('jpy')") == 0
    assert ev("currency_exponent('KWD')") == 3
    assert ev("currency_exponent('UYW')") == 4
    assert ev("currency_exponent('HUF')") == 2
    assert ev("currency_exponent('UGX')") == 0
    assert ev("currency_exponent('HRK')") == 2  # withdrawn 2023, kept for historical invoices
    assert ev("currency_exponent('XXX')") is None
    assert ev("currency_exponent('NOPE')") is None
    assert ev("currency_exponent(missing)") is None


def test_currency_table_matches_iso_for_known_values():
    expected = {
        "USD": 2, "EUR": 2, "GBP": 2, "DKK": 2, "JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0,
        "XOF": 0, "XAF": 0, "XPF": 0, "PYG": 0, "KWD": 3, "BHD": 3, "OMR": 3, "JOD": 3, "TND": 3,
        "LYD": 3, "IQD": 3, "CLF": 4, "UYW": 4, "MGA": 2, "TWD": 2, "IDR": 2,
    }
    for code, exp in expected.items():
        assert fn.currency_exponent(code) == exp, code
    assert len(fn._exponents()) > 160


# --- to_decimal -----------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1,234.50", "1234.50"),
        ("12.5", "12.5"),
        (" -7 ", "-7"),
        ("1.234,50", "1234.50"),
        ("1 234,50", "1234.50"),
        ("(1,234.50)", "-1234.50"),
        ("12,5", "12.5"),
        (42, "42"),
        (0.1, "0.1"),
        (1234.5, "1234.5"),
    ],
)
def test_to_decimal_parses(value, expected):
    assert_decimal(ev("to_decimal(v)", {"v": value}), expected)


@pytest.mark.parametrize("value", [None, "", "   ", "abc", "12.3.4", "NaN", "Infinity", "1,2,3"])
def test_to_decimal_garbage_is_null(value):
    assert ev("to_decimal(v)", {"v": value}) is None


def test_decimals_flow_into_builtin_functions():
    data = {"lines": [{"amount": "1,000.10"}, {"amount": "0.20"}, {"amount": None}]}
    out = ev("sum(lines[].to_decimal(amount))", data)
    assert_decimal(out, "1000.30")
    assert_decimal(ev("max([to_decimal('2.5'), minor_to_major(`300`, 'USD')])"), "3.00")


# --- dates ------------------------------------------------------------------


def test_unix_to_date_utc_and_zone():
    # 1761955200 == 2025-11-01T00:00:00Z, which is still Oct 31 in New York
    assert ev("unix_to_date(created)", {"created": 1761955200}) == "2025-11-01"
    assert ev("unix_to_date(created, 'America/New_York')", {"created": 1761955200}) == "2025-10-31"
    assert ev("unix_to_date(created, 'Asia/Tokyo')", {"created": 1761955200 - 3600}) == "2025-11-01"
    assert ev("unix_to_date(created)", {"created": 1761955200 - 1}) == "2025-10-31"
    assert ev("unix_to_date(created)", {"created": "1761955200"}) == "2025-11-01"
    assert ev("unix_to_date(created)", {"created": None}) is None
    assert ev("unix_to_date(due_date, 'Europe/Copenhagen')", {}) is None


def test_unix_to_date_unknown_zone_is_a_spec_error():
    with pytest.raises(jexc.JMESPathError):
        ev("unix_to_date(`1761955200`, 'Mars/Olympus_Mons')")


def test_unix_to_datetime():
    assert ev("unix_to_datetime(`1761955200`)") == "2025-11-01T00:00:00Z"
    assert ev("unix_to_datetime(`1761955261`)") == "2025-11-01T00:01:01Z"
    assert ev("unix_to_datetime(missing)") is None


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2026-11-02", "2026-11-02"),
        ("2026-11-02T10:00:00Z", "2026-11-02"),
        # the date as written in its own offset, on both sides of UTC midnight
        ("2026-11-01T23:30:00-05:00", "2026-11-01"),  # 04:30Z on Nov 2
        ("2026-11-02T00:30:00+02:00", "2026-11-02"),  # 22:30Z on Nov 1
        ("2026-11-02T10:00:00.123456+00:00", "2026-11-02"),
        ("2026-11-02 10:00:00", "2026-11-02"),
        ("  2026-11-02  ", "2026-11-02"),
        ("2026-02-30", None),
        ("02/11/2026", None),  # ambiguous without a format: never guess
        ("not a date", None),
        ("", None),
        (None, None),
    ],
)
def test_to_date(value, expected):
    assert ev("to_date(d)", {"d": value}) == expected


def test_to_date_with_format():
    assert ev("to_date(d, '%d/%m/%Y')", {"d": "02/11/2026"}) == "2026-11-02"
    assert ev("to_date(d, '%m/%d/%Y')", {"d": "02/11/2026"}) == "2026-02-11"
    assert ev("to_date(d, '%d/%m/%Y')", {"d": "2026-11-02"}) is None


# --- strings ----------------------------------------------------------------


def test_string_helpers_are_null_safe():
    data = {"s": "  Acme ApS  ", "n": None}
    assert ev("upper(s)", data) == "  ACME APS  "
    assert ev("lower(trim(s))", data) == "acme aps"
    assert ev("trim(s)", data) == "Acme ApS"
    assert ev("[upper(n), lower(n), trim(n), upper(missing)]", data) == [None, None, None, None]


# --- country_code -------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("DK", "DK"),
        ("dk", "DK"),
        (" de ", "DE"),
        ("USA", "US"),
        ("U.S.A.", "US"),
        ("United States", "US"),
        ("united states of america", "US"),
        ("Danmark", "DK"),
        ("deutschland", "DE"),
        ("Österreich", "AT"),
        ("OSTERREICH", "AT"),
        ("GBR", "GB"),
        ("dnk", "DK"),
        ("england", "GB"),
        ("UK", "GB"),
        ("Great Britain", "GB"),
        ("The Netherlands", "NL"),
        ("Holland", "NL"),
        ("España", "ES"),
        ("Espana", "ES"),
        ("België", "BE"),
        ("Schweiz", "CH"),
        ("Suisse", "CH"),
        ("Česko", "CZ"),
        ("Türkiye", "TR"),
        ("Turkey", "TR"),
        ("Éire", "IE"),
        ("Россия", "RU"),
        ("South Korea", "KR"),
        ("Korea, Republic of", "KR"),
        ("Viet Nam", "VN"),
        ("UAE", "AE"),
        ("日本", "JP"),
        ("中国", "CN"),
        ("Brasil", "BR"),
        ("México", "MX"),
        ("Canada", "CA"),
        ("Côte d'Ivoire", "CI"),
        ("Narnia", None),
        ("Korea", None),  # ambiguous (KR/KP): never guess
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_country_code(value, expected):
    assert ev("country_code(address.country)", {"address": {"country": value}}) == expected


def test_country_table_has_every_alpha2():
    (alpha2, alpha3), names = fn._codes(), fn._names()
    assert len(alpha2) == 249
    assert len(alpha3) == 249
    assert all(code in alpha2 for code in alpha3.values())
    assert all(code in alpha2 for code in names.values())


# --- coalesce / non_empty / concat_ws -------------------------------------------


def test_coalesce_falls_back_from_all_null_invoice_address_to_customer_address():
    data = {
        "customer_address": {"line1": None, "line2": "", "city": None, "country": None},
        "customer": {"address": {"line1": "Vesterbrogade 1", "line2": None, "city": "København", "country": "DK"}},
    }
    out = ev("coalesce(customer_address, customer.address)", data)
    assert out == data["customer"]["address"]
    assert ev("coalesce(customer_address, customer.address).city", data) == "København"


def test_coalesce_picks_first_filled_value():
    assert ev("coalesce(a, b, c)", {"a": None, "b": "", "c": "x"}) == "x"
    assert ev("coalesce(a, b)", {"a": "first", "b": "second"}) == "first"
    assert ev("coalesce(a, b)", {"a": 0, "b": 5}) == 0  # 0 and false are values, not blanks
    assert ev("coalesce(a, b)", {"a": {"x": None}, "b": {}}) is None
    assert ev("coalesce(missing)", {}) is None


def test_non_empty():
    assert ev("non_empty(v)", {"v": "x"}) == "x"
    for blank in (None, "", [], {}, {"a": None}):
        assert ev("non_empty(v)", {"v": blank}) is None
    assert ev("non_empty(v)", {"v": [1]}) == [1]


def test_concat_ws():
    data = {"a": {"line1": "Vesterbrogade 1", "line2": None, "line3": " 2. sal "}}
    assert ev("concat_ws(', ', a.line1, a.line2, a.line3)", data) == "Vesterbrogade 1, 2. sal"
    assert ev("concat_ws(', ', a.line2, '')", data) is None
    assert ev("concat_ws(' ', ['x', `null`, 'y'], 'z')", data) == "x y z"
    assert ev("concat_ws('-', `12`, 'b')", data) == "12-b"


# --- module surface -------------------------------------------------------------


def test_function_docs_cover_every_custom_function():
    custom = set(RunnerFunctions.FUNCTION_TABLE) - set(jmespath.functions.Functions.FUNCTION_TABLE)
    assert custom == set(FUNCTION_DOCS)
    assert all(isinstance(v, str) and v and "\n" not in v for v in FUNCTION_DOCS.values())


def test_compile_returns_parsed_result_usable_both_ways():
    parsed = compile("minor_to_major(amount, currency)")
    assert isinstance(parsed, jmespath.parser.ParsedResult)
    data = {"amount": 1999, "currency": "usd"}
    assert parsed.search(data) == Decimal("19.99")
    assert parsed.search(data, options=OPTIONS) == Decimal("19.99")
    assert compile("minor_to_major(amount, currency)") is parsed  # cached
    with pytest.raises(jexc.UnknownFunctionError):
        jmespath.compile("minor_to_major(amount, currency)").search(data)  # plain jmespath lacks them
