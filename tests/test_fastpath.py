"""runner/spec/fastpath.py must give exactly jmespath's answers: property-tested with hypothesis.

Expressions are generated from a small grammar over the node types the compiler handles (and some it
leaves to jmespath), data from JSON-like values; each pair is evaluated by the compiled closure (through
specs.Expression, as the engine does) and by jmespath's TreeInterpreter with the same functions.
"""
from __future__ import annotations

import json

import jmespath
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runner.spec import fastpath
from runner.spec import functions
from runner.spec.loader import Expression

KEYS = ["a", "b", "c", "id", "status", "created"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-2, 2, allow_nan=False),
                    st.sampled_from(["", " ", "open", "x", "US", "Denmark", "usd", "1700000000"]))
data = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
                    max_leaves=12)


def _lit(v) -> str:
    return "`" + json.dumps(v) + "`"


field = st.sampled_from(KEYS)
literal = st.one_of(scalars.map(_lit), st.sampled_from(["'open'", "''", "`[]`", "`{}`", "`0`", "`1`"]))


def _expr(children):
    c = children
    return st.one_of(
        st.tuples(c, field).map(lambda t: f"{t[0]}.{t[1]}"),
        st.tuples(c, st.integers(-2, 2)).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(c, c).map(lambda t: f"({t[0]} && {t[1]})"),
        st.tuples(c, c).map(lambda t: f"({t[0]} || {t[1]})"),
        c.map(lambda x: f"!{x}"),
        st.tuples(c, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), c).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(c, c).map(lambda t: f"[{t[0]}, {t[1]}]"),
        st.tuples(c, c).map(lambda t: "{x: " + t[0] + ", y: " + t[1] + "}"),
        st.tuples(c, field).map(lambda t: f"{t[0]}[*].{t[1]}"),
        st.tuples(c, field).map(lambda t: f"{t[0]}.*.{t[1]}"),
        c.map(lambda x: f"{x}[]"),
        st.tuples(c, field, c).map(lambda t: f"{t[0]}[?{t[1]} == {t[2]}]"),
        st.tuples(c, c).map(lambda t: f"{t[0]} | {t[1]}"),
        c.map(lambda x: f"{x}[1:]"),
        st.tuples(st.sampled_from(["upper", "lower", "trim", "country_code", "to_decimal", "unix_to_date",
                                   "non_empty", "length", "to_string", "type", "not_null"]), c)
          .map(lambda t: f"{t[0]}({t[1]})"),
        st.lists(c, min_size=1, max_size=3).map(lambda xs: f"coalesce({', '.join(xs)})"),
        st.lists(c, min_size=0, max_size=3).map(lambda xs: "concat_ws(', '" + "".join(", " + x for x in xs) + ")"),
        st.tuples(c, c).map(lambda t: f"minor_to_major({t[0]}, {t[1]})"),
        st.tuples(c, c).map(lambda t: f"upper({t[0]}, {t[1]})"),  # arity error: jmespath must raise it
    )


leaf = st.one_of(field, literal, st.just("@"))
expressions = st.recursive(leaf, _expr, max_leaves=6)


def _outcome(fn, value):
    try:
        return "ok", fn(value)
    except Exception as exc:  # the compiled path must raise what jmespath raises
        return "error", type(exc).__name__


def _same(a, b) -> bool:
    return repr(a) == repr(b)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions, data)
def test_compiled_equals_jmespath(source, value):
    try:
        parsed = functions.compile(source)
    except jmespath.exceptions.JMESPathError:
        return  # not an expression (the grammar can produce a few); nothing to compare
    slow = _outcome(lambda v: parsed.search(v, options=functions.OPTIONS), value)
    fast_fn = fastpath.compile(parsed.parsed, functions.OPTIONS.custom_functions,
                               lambda v: parsed.search(v, options=functions.OPTIONS))
    if fast_fn is not None:
        assert _same(_outcome(fast_fn, value), slow), source
    try:
        expr = Expression(source)
    except ValueError:
        return  # an unknown function: the spec compiler rejects it before any record is seen
    assert _same(_outcome(expr.search, value), slow), source


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions, data)
@example("to_string(!a[1:])", [])  # an unreadable argument of a function is still its usual value (null there)
def test_strict_evaluation_only_explains_and_never_changes_a_value(source, value):
    """functions.unreadable evaluates strictly to say why a value is null: where it finishes, its answer is
    jmespath's own; where jmespath gives a value other than null, it only ever stops on a value it can name."""
    try:
        parsed = functions.compile(source)
    except jmespath.exceptions.JMESPathError:
        return
    slow = _outcome(lambda v: parsed.search(v, options=functions.OPTIONS), value)
    strict = functions._StrictInterpreter(functions._STRICT_OPTIONS)
    try:
        got = ("ok", strict.visit(parsed.parsed, value))
    except functions.Unreadable as exc:
        assert exc.value is not None and exc.what
        assert functions.unreadable(parsed.parsed, value) is not None
        return
    except Exception as exc:  # noqa: BLE001
        got = ("error", type(exc).__name__)
    assert _same(got, slow), source
    assert functions.unreadable(parsed.parsed, value) is None


SPEC_EXPRESSIONS = [
    "id", "number", "unix_to_date(coalesce(effective_at, created))", "upper(currency)",
    "minor_to_major(amount_remaining, currency, `{\"ISK\": 2}`)", "coalesce(customer.id, customer)",
    "coalesce(customer.metadata.debtor_type, length(customer_tax_ids || `[]`) > `0` && 'Company' || null)",
    "_address.line1 && concat_ws(', ', _address.line1, _address.line2)", "country_code(_address.country)",
    "status == 'open' && amount_paid == `0` && amount_remaining > `0`", "data[-1].id", "has_more",
    "status == 'open' && amount_paid > `0` && 'open, partially paid' || status",
    # The debtor's type and contact person (integrations.d/stripe.yaml, zoho_books.yaml, quickbooks_online.yaml).
    "customer.metadata.debtor_type && (contains(['company', 'business'], lower(customer.metadata.debtor_type)) "
    "&& 'Company' || contains(['private', 'individual', 'person'], lower(customer.metadata.debtor_type)) && "
    "'Private' || customer.metadata.debtor_type) || customer.business_name && 'Company' || "
    "length(customer_tax_ids || `[]`) > `0` && 'Company' || customer.individual_name && 'Private' || null",
    "coalesce(customer.metadata.contact_person, customer.business_name && customer.individual_name)",
    "(contact.contact_persons[?is_primary_contact] | [0]) || contact.contact_persons[0]",
    "concat_ws(' ', _contact_person.first_name, _contact_person.last_name)",
    "customer.CompanyName && 'Company' || (customer.GivenName || customer.FamilyName) && 'Private' || null",
]


@pytest.mark.parametrize("source", SPEC_EXPRESSIONS)
def test_spec_expressions_are_compiled(source):
    """The expressions of the real specs run on the fast path (not silently on the slow one)."""
    parsed = functions.compile(source)
    assert fastpath.compile(parsed.parsed, functions.OPTIONS.custom_functions) is not None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SPEC_EXPRESSIONS), st.dictionaries(
    st.sampled_from(["id", "number", "created", "effective_at", "currency", "amount_remaining", "amount_paid",
                     "status", "customer", "customer_tax_ids", "_address", "data", "has_more", "contact",
                     "_contact_person"]),
    st.one_of(data, st.sampled_from(["usd", "ISK", "open", 1700000000, 0, 1999]),
              st.fixed_dictionaries({"line1": scalars, "line2": scalars, "country": scalars}),
              # a customer or contact: debtor type, names and contact persons
              st.fixed_dictionaries({}, optional={
                  "metadata": st.fixed_dictionaries({}, optional={
                      "debtor_type": st.one_of(scalars, st.sampled_from(["Private", "company", "LLC"])),
                      "contact_person": scalars}),
                  "business_name": scalars, "individual_name": scalars, "CompanyName": scalars,
                  "GivenName": scalars, "FamilyName": scalars, "first_name": scalars, "last_name": scalars,
                  "contact_persons": st.lists(st.fixed_dictionaries({}, optional={
                      "is_primary_contact": st.one_of(st.booleans(), scalars), "first_name": scalars,
                      "last_name": scalars}), max_size=3)})), max_size=8))
def test_spec_expressions_equal_jmespath(source, record):
    parsed = functions.compile(source)
    slow = _outcome(lambda v: parsed.search(v, options=functions.OPTIONS), record)
    assert _same(_outcome(Expression(source).search, record), slow), source


def test_errors_come_from_jmespath():
    """A wrong argument type raises jmespath's own error type, not the compiler's."""
    with pytest.raises(jmespath.exceptions.JMESPathTypeError):
        Expression("upper(a)").search({"a": 5})


def _reference_mapping(fields, record):
    """What a mapping means, with jmespath alone: blank values left out, parents made only when needed."""
    out: dict = {}
    for path, source in fields:
        value = functions.compile(source).search(record, options=functions.OPTIONS)
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "" or (isinstance(value, (dict, list)) and not value):
            continue
        node = out
        for key in path[:-1]:
            node = node.get(key) or node.setdefault(key, {})
        node[path[-1]] = value
    return out


PATHS = [("external_id",), ("number",), ("debtor", "name"), ("debtor", "address", "city"), ("debtor", "id"),
         ("amount",)]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(st.sampled_from(SPEC_EXPRESSIONS), expressions)),
                min_size=1, max_size=6, unique_by=lambda f: f[0]), data)
def test_generated_mapping_equals_field_by_field_jmespath(fields, record):
    """One generated function per mapping gives the same canonical invoice as jmespath field by field."""
    from runner.spec.loader import Mapping

    try:
        mapping = Mapping(fields=[(path, Expression(source)) for path, source in fields])
    except (ValueError, jmespath.exceptions.JMESPathError):
        return  # not a valid spec expression: rejected when the spec loads
    assert _same(_outcome(mapping.apply, record), _outcome(lambda r: _reference_mapping(fields, r), record))


def test_the_stripe_mapping_is_one_generated_function():
    from runner.spec.loader import Mapping

    fields = [(p, Expression(s)) for p, s in zip(PATHS, SPEC_EXPRESSIONS)]
    assert fastpath.mapping_function([(p, e.ast) for p, e in fields], functions.OPTIONS.custom_functions)
    mapping = Mapping(fields=fields)
    mapping.apply({"id": "in_1"})  # made on first use
    assert mapping.apply.__name__ == "_map"  # the generated function itself, jmespath as its fallback
    # A record the generated code raises on (a list where minor_to_major wants a number) goes to jmespath
    # from inside it: the same error as mapping field by field.
    hostile = {"id": "in_2", "amount_remaining": [1], "currency": "eur"}
    assert _outcome(mapping.apply, hostile) == _outcome(mapping.apply_each, hostile) == ("error", "JMESPathTypeError")


def test_a_field_read_by_several_expressions_is_read_once_and_never_changed_by_the_mapping():
    """Fields a mapping reads more than once (the customer, say) are read once per record. The value stored
    for one canonical field is stripped, but another expression reading the same field sees it as it is."""
    from runner.spec.loader import Mapping

    fields = [(("number",), "name"), (("amount",), "length(name)"), (("debtor", "name"), "customer.name"),
              (("debtor", "id"), "coalesce(customer.id, customer)"),
              (("external_id",), "customer.name && customer.id || 'none'")]
    mapping = Mapping(fields=[(path, Expression(source)) for path, source in fields])
    record = {"name": "  x  ", "customer": {"name": " Ada ", "id": "cus_1"}}
    assert mapping.apply(record) == _reference_mapping(fields, record) == {
        "number": "x", "amount": 5, "debtor": {"name": "Ada", "id": "cus_1"}, "external_id": "cus_1"}
    assert mapping.apply({"name": "y", "customer": "cus_2"}) == {"number": "y", "amount": 1, "debtor": {"id": "cus_2"},
                                                                 "external_id": "none"}
    source = []
    real = fastpath._Gen.build
    fastpath._Gen.build = lambda self, lines, name: source.extend(lines) or real(self, lines, name)
    try:
        fastpath.mapping_function([(p, Expression(s).ast) for p, s in fields], functions.OPTIONS.custom_functions)
    finally:
        fastpath._Gen.build = real
    reads = [line for line in source if ".get(" in line and line.strip().startswith("_v")]
    assert len(reads) == 4  # name, customer, customer.name, customer.id: each once
