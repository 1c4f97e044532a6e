"""Compile a parsed JMESPath expression to plain Python closures, once, when a spec loads.

jmespath's TreeInterpreter walks the AST for every record (a visitor call per node, a dict lookup per
node type, argument validation per function call). On the hot path that is most of a sync's CPU time.
This module turns the common subset (fields, sub-expressions, indexes, literals, comparisons, and/or/not,
pipes, multi-selects, projections and function calls whose arguments are plain values) into nested
closures with the very same semantics as jmespath 1.x's TreeInterpreter.

Exactness: anything outside the subset is not compiled (`compile` returns None and the caller keeps
jmespath). A compiled function that raises for any reason is re-run by jmespath itself (see `wrap`), so
error types and messages are jmespath's own; the compiled function only has to agree on the values it
returns, and tests/test_fastpath.py property-tests that against jmespath with hypothesis.
"""
from __future__ import annotations

from typing import Any, Callable

from jmespath import visitor as _visitor

_equals = _visitor._equals
_is_comparable = _visitor._is_comparable
_is_actual_number = _visitor._is_actual_number
_ORDER = {"lt": lambda a, b: a < b, "gt": lambda a, b: a > b, "lte": lambda a, b: a <= b, "gte": lambda a, b: a >= b}


class Unsupported(Exception):
    """The expression uses something this compiler does not handle; jmespath evaluates it."""


class _TypeMismatch(Exception):
    """A function argument failed the quick type check: let jmespath raise its own error."""


def _is_false(v) -> bool:
    t = type(v)
    if t is str or t is list or t is dict:
        return not v
    # Exactly TreeInterpreter._is_false for everything else.
    return v == '' or v == [] or v == {} or v is None or v is False


def compile(parsed: dict, functions) -> Callable[[Any], Any] | None:  # noqa: A001
    """A callable equivalent to evaluating the AST `parsed` with `functions`, or None if unsupported."""
    try:
        return _node(parsed, functions)
    except Unsupported:
        return None


def wrap(fast: Callable[[Any], Any] | None, slow: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """fast(data), and on any exception slow(data): jmespath raises (or answers) exactly as it would have."""
    if fast is None:
        return slow

    def search(data):
        try:
            return fast(data)
        except Exception:
            return slow(data)

    return search


def _field_chain(node) -> list[str] | None:
    """['a', 'b', 'c'] for a.b.c (fields only), else None."""
    t = node["type"]
    if t == "field":
        return [node["value"]]
    if t == "subexpression":
        out = []
        for child in node["children"]:
            sub = _field_chain(child)
            if sub is None:
                return None
            out += sub
        return out
    return None


def _node(node: dict, fns) -> Callable[[Any], Any]:
    t = node["type"]
    children = node.get("children") or []

    chain = _field_chain(node)
    if chain is not None:
        if len(chain) == 1:
            key = chain[0]

            def field(v):
                try:
                    return v.get(key)
                except AttributeError:
                    return None

            return field
        if len(chain) == 2:
            k1, k2 = chain

            def field2(v):
                try:
                    v = v.get(k1)
                except AttributeError:
                    return None
                try:
                    return v.get(k2)
                except AttributeError:
                    return None

            return field2
        keys = tuple(chain)

        def fields(v):
            for k in keys:
                try:
                    v = v.get(k)
                except AttributeError:
                    v = None
            return v

        return fields

    if t in ("current", "identity"):
        return lambda v: v
    if t == "literal":
        lit = node["value"]
        return lambda v: lit
    if t in ("subexpression", "index_expression", "pipe"):
        parts = [_node(c, fns) for c in children]
        if len(parts) == 2:
            a, b = parts
            return lambda v: b(a(v))

        def chain_(v):
            for p in parts:
                v = p(v)
            return v

        return chain_
    if t == "index":
        idx = node["value"]

        def index(v):
            if not isinstance(v, list):
                return None
            try:
                return v[idx]
            except IndexError:
                return None

        return index
    if t == "slice":
        s = slice(*children)

        def slice_(v):
            if not isinstance(v, list):
                return None
            return v[s]

        return slice_
    if t == "comparator":
        op = node["value"]
        left, right = (_node(c, fns) for c in children)
        if op == "eq":
            return lambda v: _equals(left(v), right(v))
        if op == "ne":
            return lambda v: not _equals(left(v), right(v))
        cmp = _ORDER[op]

        def compare(v):
            a, b = left(v), right(v)
            if not (_is_comparable(a) and _is_comparable(b)):
                return None
            return cmp(a, b)

        return compare
    if t == "and_expression":
        left, right = (_node(c, fns) for c in children)

        def and_(v):
            m = left(v)
            if _is_false(m):
                return m
            return right(v)

        return and_
    if t == "or_expression":
        left, right = (_node(c, fns) for c in children)

        def or_(v):
            m = left(v)
            if _is_false(m):
                m = right(v)
            return m

        return or_
    if t == "not_expression":
        inner = _node(children[0], fns)

        def not_(v):
            r = inner(v)
            if _is_actual_number(r) and r == 0:
                return False
            return not r

        return not_
    if t == "multi_select_list":
        parts = [_node(c, fns) for c in children]

        def msl(v):
            if v is None:
                return None
            return [p(v) for p in parts]

        return msl
    if t == "multi_select_dict":
        pairs = [(c["value"], _node(c["children"][0], fns)) for c in children]

        def msd(v):
            if v is None:
                return None
            return {k: p(v) for k, p in pairs}

        return msd
    if t == "projection":
        base, each = (_node(c, fns) for c in children)

        def projection(v):
            b = base(v)
            if not isinstance(b, list):
                return None
            out = []
            for e in b:
                c = each(e)
                if c is not None:
                    out.append(c)
            return out

        return projection
    if t == "value_projection":
        base, each = (_node(c, fns) for c in children)

        def value_projection(v):
            b = base(v)
            try:
                b = b.values()
            except AttributeError:
                return None
            out = []
            for e in b:
                c = each(e)
                if c is not None:
                    out.append(c)
            return out

        return value_projection
    if t == "flatten":
        base = _node(children[0], fns)

        def flatten(v):
            b = base(v)
            if not isinstance(b, list):
                return None
            out = []
            for e in b:
                if isinstance(e, list):
                    out.extend(e)
                else:
                    out.append(e)
            return out

        return flatten
    if t == "filter_projection":
        base, each, cond = (_node(c, fns) for c in children)

        def filter_projection(v):
            b = base(v)
            if not isinstance(b, list):
                return None
            out = []
            for e in b:
                if not _is_false(cond(e)):
                    c = each(e)
                    if c is not None:
                        out.append(c)
            return out

        return filter_projection
    if t == "function_expression":
        return _function(node, fns)
    raise Unsupported(t)


def _function(node: dict, fns) -> Callable[[Any], Any]:
    name = node["value"]
    spec = fns.FUNCTION_TABLE.get(name)
    if spec is None:
        raise Unsupported(f"unknown function {name}")
    signature = spec["signature"]
    args = [_node(c, fns) for c in node["children"]]
    n = len(args)
    # Arity, as the function library checks it (optional trailing and variadic arguments).
    required = sum(1 for s in signature if not s.get("optional") and not s.get("variadic"))
    variadic = bool(signature) and bool(signature[-1].get("variadic"))
    if variadic:
        required += 1
    if n < required or (not variadic and n > len(signature)):
        raise Unsupported("arity")  # jmespath raises its ArityError
    checks = []
    for i in range(min(n, len(signature))):
        types = signature[i]["types"]
        if not types:
            continue
        if any(t == "expref" for t in types):
            raise Unsupported("expref")
        allowed, subtypes = fns._get_allowed_pytypes(types)
        if subtypes:
            raise Unsupported("array subtypes")  # element checks: leave them to jmespath
        checks.append((i, frozenset(allowed)))
    fn = spec["function"]

    if n == 1:
        a0 = args[0]
        allowed0 = checks[0][1] if checks else None

        def call1(v):
            x = a0(v)
            if allowed0 is not None and type(x).__name__ not in allowed0:
                raise _TypeMismatch(name)
            return fn(fns, x)

        return call1

    by_index = dict(checks)
    if n in (2, 3) and set(by_index) <= set(range(n)):
        # The common arities without building a list per call (this runs for most mapped fields).
        a0, a1 = args[0], args[1]
        k0, k1 = by_index.get(0), by_index.get(1)
        if n == 2:
            def call2(v):
                x, y = a0(v), a1(v)
                if (k0 is not None and type(x).__name__ not in k0) or (k1 is not None and type(y).__name__ not in k1):
                    raise _TypeMismatch(name)
                return fn(fns, x, y)

            return call2
        a2, k2 = args[2], by_index.get(2)

        def call3(v):
            x, y, z = a0(v), a1(v), a2(v)
            if ((k0 is not None and type(x).__name__ not in k0) or (k1 is not None and type(y).__name__ not in k1)
                    or (k2 is not None and type(z).__name__ not in k2)):
                raise _TypeMismatch(name)
            return fn(fns, x, y, z)

        return call3

    def call(v):
        values = [a(v) for a in args]
        for i, allowed in checks:
            if type(values[i]).__name__ not in allowed:
                raise _TypeMismatch(name)
        return fn(fns, *values)

    return call
