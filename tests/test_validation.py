"""The invoice validator's fast paths say exactly what the plain jsonschema validator says."""
from __future__ import annotations

import copy
from decimal import Decimal

from hypothesis import given, settings, strategies as st

from runner.spec import schemas
from runner.spec import validation

VALID = {"external_id": "in_1", "number": "A-1", "issue_date": "2026-01-01", "due_date": "2026-01-31",
         "currency": "USD", "amount": Decimal("12.50"),
         "debtor": {"type": "Company", "name": "Acme", "email": "a@example.com",
                    "address": {"street": "1 Main St", "city": "Austin", "postal_code": "78701", "country": "US",
                                "state": "TX"}},
         "source": {"connection": "c", "integration": "i", "account_id": "a"}}

PATHS = [("external_id",), ("number",), ("issue_date",), ("due_date",), ("currency",), ("amount",),
         ("debtor", "type"), ("debtor", "name"), ("debtor", "address"), ("debtor", "address", "street"),
         ("debtor", "address", "city"), ("debtor", "address", "postal_code"), ("debtor", "address", "country"),
         ("debtor", "address", "state"), ("source",)]
VALUES = st.sampled_from([None, "", "x", "usd", "XYZ", "EUR", "JPY", "DK", "Denmark", "2026-13-45", 0, -1,
                          Decimal("0"), 3.5, [], {}, True, "Private", "Person"])


def _mutate(changes):
    inv = copy.deepcopy(VALID)
    for path, value, drop in changes:
        node = inv
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if drop:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return inv


def _reference(inv):
    errs = schemas.validator("invoice").iter_errors(inv)
    return sorted((tuple(map(str, e.absolute_path)), e.validator, e.message) for e in errs)


def _fast(inv):
    return sorted((tuple(map(str, p)), e.validator, e.message) for p, e in validation._errors(inv))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PATHS), VALUES, st.booleans()), max_size=4))
def test_fast_paths_agree_with_jsonschema(changes):
    inv = _mutate(changes)
    reference = _reference(inv)
    assert validation.check(inv).ok == (reference == [])
    if reference:
        assert _fast(inv) == reference


def test_unknown_currency_fails_even_though_the_hot_path_checks_it_with_a_set():
    inv = copy.deepcopy(VALID)
    inv["currency"] = "XYZ"
    out = validation.check(inv)
    assert not out.ok and out.reason == "invalid"
    assert "'XYZ' is not an ISO 4217 currency code" in out.message()


def test_equal_but_differently_typed_address_values_are_explained_each_as_itself():
    """Incomplete addresses are explained from a cache keyed by the address: 0, False and Decimal("0") are
    equal as Python keys but are different JSON, with different errors."""
    messages = []
    for value in (0, False, Decimal("0"), 0.0, ""):
        inv = copy.deepcopy(VALID)
        inv["debtor"]["address"]["city"] = value
        assert _fast(inv) == _reference(inv)
        messages.append(validation.check(inv).message())
    assert len(set(messages[:2])) == 2


FIELD_VALUES = st.one_of(st.none(), st.sampled_from(["", " ", "x", "US", "DK", "us", "USA", "US\n", "TX", "Oslo"]),
                         st.integers(-1, 1), st.booleans(), st.just([]), st.just({}))
ADDRESSES = st.dictionaries(st.sampled_from(["street", "city", "postal_code", "country", "state", "line2"]),
                            FIELD_VALUES, max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(ADDRESSES, min_size=1, max_size=6))
def test_an_address_is_explained_as_jsonschema_explains_it_whatever_was_explained_before(addresses):
    """Addresses whose only fault is missing fields share one explanation per set of missing fields (told
    apart by jsonschema-rs): each must still read exactly as jsonschema's own errors and `explain` of it alone."""
    for address in addresses:
        inv = copy.deepcopy(VALID)
        inv["debtor"]["address"] = address
        warm = validation.check(inv)
        assert _fast(inv) == _reference(inv)
        validation._BY_MISSING.clear()
        validation._address_errors.cache_clear()
        cold = validation.check(inv)
        assert (warm.ok, warm.reason, warm.missing, warm.errors) == (cold.ok, cold.reason, cold.missing, cold.errors)


def test_customers_missing_the_same_fields_get_the_same_explanation_with_their_own_values():
    """The common fault of the seed (a customer without a postal code or country) is explained once per set of
    missing fields, not once per customer."""
    validation._BY_MISSING.clear()
    outcomes = []
    for i in range(50):
        inv = copy.deepcopy(VALID)
        inv["debtor"]["address"] = {"street": f"{i} Main St", "city": f"City {i}", "country": "US"}
        outcomes.append(validation.check(inv))
    assert {o.message() for o in outcomes} == {"the debtor's address is missing postal code, state"}
    assert all(o.reason == "incomplete_address" and o.missing == ["postal_code", "state"] for o in outcomes)
    assert len(validation._BY_MISSING) == 1
