"""Compile a parsed JMESPath expression to Python source, once, when a spec loads.

jmespath's TreeInterpreter walks the AST for every record (a visitor call per node, a dict lookup per
node type, argument validation per function call). On the hot path that is most of a sync's CPU time.
This module turns the common subset (fields, sub-expressions, indexes, literals, comparisons, and/or/not,
pipes, multi-selects, projections and function calls whose arguments are plain values) into straight-line
Python statements with the very same semantics as jmespath 1.x's TreeInterpreter, and `exec`s them into a
function. Generated from the AST only (names become string constants in a namespace, never source text),
so a spec cannot inject code. `mapping_function` puts every field of a mapping into one such function.

Exactness: anything outside the subset is not compiled (`compile` returns None and the caller keeps
jmespath). A compiled function that raises for any reason hands the record to jmespath itself (see `_guarded`), so
error types and messages are jmespath's own; the compiled function only has to agree on the values it
returns, and tests/test_fastpath.py property-tests that against jmespath with hypothesis.
"""
from __future__ import annotations

import builtins
import contextlib
from collections import OrderedDict
from decimal import Decimal
from typing import Any, Callable

from jmespath import visitor as _visitor

_ORDER = {"lt": "<", "gt": ">", "lte": "<=", "gte": ">="}
# jmespath checks argument types by type name; the same check by the type itself is cheaper.
_PYTYPES = {"bool": bool, "list": list, "dict": dict, "NoneType": type(None), "str": str, "float": float,
            "int": int, "OrderedDict": OrderedDict, "Decimal": Decimal}


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


def _not(r) -> bool:
    if _visitor._is_actual_number(r) and r == 0:
        return False
    return not r


def _order(a, b, op):
    if not (_visitor._is_comparable(a) and _visitor._is_comparable(b)):
        return None
    return op(a, b)


_BASE_NS = {"_F": _is_false, "_eq": _visitor._equals, "_not": _not, "_comparable": _visitor._is_comparable,
            "_Mismatch": _TypeMismatch, "_NUMSTR": frozenset({int, float, str}), "_LD": frozenset({list, dict}),
            # Types whose jmespath falsiness is Python's `not` (numbers differ: 0 is true in jmespath).
            "_NOT_TYPES": frozenset({str, list, dict, type(None), bool})}
# Functions of runner/spec/functions.py written inline (same results; the property tests compare with jmespath).
_STRING_METHODS = {"_func_upper": "upper", "_func_lower": "lower", "_func_trim": "strip"}


def _literal_kind(node: dict) -> str | None:
    """'str', 'num01' (a number equal to 0 or 1), 'num' or None, for a literal operand of == and !=."""
    if node.get("type") != "literal":
        return None
    v = node["value"]
    if type(v) is str:
        return "str"
    if type(v) in (int, float):
        return "num01" if v in (0, 1) else "num"
    return None


class _Gen:
    """Emits statements; every node's value ends up in a fresh local variable."""

    def __init__(self, fns):
        self.fns = fns
        self.ns: dict[str, Any] = dict(_BASE_NS, _fns=fns)
        self.n = 0
        # (source variable, field name) -> the variable already holding that field, for the statements
        # generated so far in the current block: a mapping reads `customer` for half its fields. Records are
        # not changed while an expression runs, so a field read once has the same value the next time.
        self.memo: dict[tuple[str, str], str] = {}

    @contextlib.contextmanager
    def nested(self):
        """Statements inside a conditional block or a loop: what they read is unknown after the block."""
        saved = dict(self.memo)
        try:
            yield
        finally:
            self.memo = saved

    def var(self) -> str:
        self.n += 1
        return f"_v{self.n}"

    def const(self, value) -> str:
        self.n += 1
        name = f"_c{self.n}"
        self.ns[name] = value
        return name

    # Each method appends lines (indented by `ind`) computing the node applied to variable `src`, and
    # returns the variable that holds the result.
    def node(self, node: dict, src: str, out: list[str], ind: str) -> str:
        t = node["type"]
        children = node.get("children") or []
        if t == "field":
            known = self.memo.get((src, node["value"]))
            if known is not None:
                return known
            r = self.var()
            key = self.const(node["value"])
            out += [f"{ind}try:", f"{ind}    {r} = {src}.get({key})", f"{ind}except AttributeError:",
                    f"{ind}    {r} = None"]
            self.memo[(src, node["value"])] = r
            return r
        if t in ("current", "identity"):
            return src
        if t == "literal":
            return self.const(node["value"])
        if t in ("subexpression", "index_expression", "pipe"):
            for c in children:
                src = self.node(c, src, out, ind)
            return src
        if t == "index":
            r, idx = self.var(), self.const(node["value"])
            out += [f"{ind}{r} = None", f"{ind}if isinstance({src}, list):", f"{ind}    try:",
                    f"{ind}        {r} = {src}[{idx}]", f"{ind}    except IndexError:", f"{ind}        pass"]
            return r
        if t == "slice":
            r, s = self.var(), self.const(slice(*children))
            out.append(f"{ind}{r} = {src}[{s}] if isinstance({src}, list) else None")
            return r
        if t == "comparator":
            op = node["value"]
            a = self.node(children[0], src, out, ind)
            b = self.node(children[1], src, out, ind)
            r = self.var()
            if op in ("eq", "ne"):
                out.append(f"{ind}{r} = {'' if op == 'eq' else 'not '}{self._equals(a, b, children)}")
            else:
                checks = [f"(type({x}) in _NUMSTR or _comparable({x}))" for x, c in ((a, children[0]), (b, children[1]))
                          if not (c["type"] == "literal" and _visitor._is_comparable(c["value"]))]
                cond = " and ".join(checks)
                out.append(f"{ind}{r} = ({a} {_ORDER[op]} {b})" + (f" if {cond} else None" if cond else ""))
            return r
        if t in ("and_expression", "or_expression"):
            a = self.node(children[0], src, out, ind)
            r = self.var()
            # _is_false inline for the types where it is plain `not` (&& and || chains run per record).
            false = f"((not {a}) if type({a}) in _NOT_TYPES else _F({a}))"
            out.append(f"{ind}if {'not ' if t == 'and_expression' else ''}{false}:")
            inner: list[str] = []
            with self.nested():
                b = self.node(children[1], src, inner, ind + "    ")
            out += inner + [f"{ind}    {r} = {b}", f"{ind}else:", f"{ind}    {r} = {a}"]
            return r
        if t == "not_expression":
            a = self.node(children[0], src, out, ind)
            r = self.var()
            out.append(f"{ind}{r} = _not({a})")
            return r
        if t in ("multi_select_list", "multi_select_dict"):
            r = self.var()
            out += [f"{ind}if {src} is None:", f"{ind}    {r} = None", f"{ind}else:"]
            with self.nested():
                if t == "multi_select_list":
                    parts = [self.node(c, src, out, ind + "    ") for c in children]
                    out.append(f"{ind}    {r} = [{', '.join(parts)}]")
                else:
                    items = []
                    for c in children:
                        v = self.node(c["children"][0], src, out, ind + "    ")
                        items.append(f"{self.const(c['value'])}: {v}")
                    out.append(f"{ind}    {r} = {{{', '.join(items)}}}")
            return r
        if t in ("projection", "value_projection", "flatten", "filter_projection"):
            return self._loop(t, children, src, out, ind)
        if t == "function_expression":
            return self._function(node, src, out, ind)
        raise Unsupported(t)

    @staticmethod
    def _equals(a: str, b: str, children: list) -> str:
        """jmespath's _equals(a, b), plain == where a literal operand makes it the same: it only differs from ==
        when one side is 0 or 1 and the other a boolean."""
        kinds = (_literal_kind(children[0]), _literal_kind(children[1]))
        if "str" in kinds or "num" in kinds:
            return f"({a} == {b})"
        if kinds[1] == "num01":
            return f"(type({a}) is not bool and {a} == {b})"
        if kinds[0] == "num01":
            return f"(type({b}) is not bool and {a} == {b})"
        return f"_eq({a}, {b})"

    def _loop(self, t: str, children: list, src: str, out: list[str], ind: str) -> str:
        base = self.node(children[0], src, out, ind)
        with self.nested():
            return self._loop_body(t, children, base, out, ind)

    def _loop_body(self, t: str, children: list, base: str, out: list[str], ind: str) -> str:
        r, e = self.var(), self.var()
        if t == "value_projection":
            out += [f"{ind}try:", f"{ind}    {r} = {base}.values()", f"{ind}except AttributeError:",
                    f"{ind}    {r} = None", f"{ind}if {r} is not None:", f"{ind}    {e}s = {r}"]
        else:
            out += [f"{ind}{r} = None", f"{ind}if isinstance({base}, list):", f"{ind}    {e}s = {base}"]
        body = ind + "        "
        out += [f"{ind}    {r} = []", f"{ind}    for {e} in {e}s:"]
        if t == "flatten":
            out += [f"{body}if isinstance({e}, list):", f"{body}    {r}.extend({e})", f"{body}else:",
                    f"{body}    {r}.append({e})"]
            return r
        if t == "filter_projection":
            cond = self.node(children[2], e, out, body)
            out.append(f"{body}if not _F({cond}):")
            body += "    "
        c = self.node(children[1], e, out, body)
        out += [f"{body}if {c} is not None:", f"{body}    {r}.append({c})"]
        return r

    def _function(self, node: dict, src: str, out: list[str], ind: str) -> str:
        name = node["value"]
        spec = self.fns.FUNCTION_TABLE.get(name)
        if spec is None:
            raise Unsupported(f"unknown function {name}")
        signature = spec["signature"]
        n = len(node["children"])
        # Arity, as the function library checks it (optional trailing and variadic arguments).
        required = sum(1 for s in signature if not s.get("optional") and not s.get("variadic"))
        variadic = bool(signature) and bool(signature[-1].get("variadic"))
        if variadic:
            required += 1
        if n < required or (not variadic and n > len(signature)):
            raise Unsupported("arity")  # jmespath raises its ArityError
        checks: list[tuple[int, str]] = []
        for i in range(min(n, len(signature))):
            types = signature[i]["types"]
            if not types:
                continue
            if any(t == "expref" for t in types):
                raise Unsupported("expref")
            allowed, subtypes = self.fns._get_allowed_pytypes(types)
            if subtypes:
                raise Unsupported("array subtypes")  # element checks: leave them to jmespath
            checks.append((i, self.const(frozenset(_PYTYPES[a] for a in allowed if a in _PYTYPES))))
        args = [self.node(c, src, out, ind) for c in node["children"]]
        impl = spec["function"]
        cls = type(self.fns)
        if impl is getattr(cls, "_func_coalesce", None):  # the first argument that is not blank
            r = self.var()
            out.append(f"{ind}{r} = None")
            for i, a in enumerate(args):
                blank = f"{a} is None or (type({a}) is str and not {a}.strip()) or (type({a}) in _LD and _blank({a}))"
                out += [f"{ind}{'if' if i == 0 else 'elif'} not ({blank}):", f"{ind}    {r} = {a}"]
            self.ns["_blank"] = _functions_module().__dict__["_is_blank"]
            return r
        method = next((m for f, m in _STRING_METHODS.items() if impl is getattr(cls, f, None)), None)
        if method is not None and n == 1:
            r, a = self.var(), args[0]
            out += [f"{ind}if {a} is None:", f"{ind}    {r} = None", f"{ind}elif type({a}) is str:",
                    f"{ind}    {r} = {a}.{method}()", f"{ind}else:", f"{ind}    raise _Mismatch({self.const(name)})"]
            return r
        for i, allowed in checks:
            out += [f"{ind}if type({args[i]}) not in {allowed}:", f"{ind}    raise _Mismatch({self.const(name)})"]
        r, fn = self.var(), self.const(spec["function"])
        out.append(f"{ind}{r} = {fn}(_fns{''.join(', ' + a for a in args)})")
        return r

    def build(self, lines: list[str], name: str) -> Callable:
        code = "\n".join(lines)
        exec(builtins.compile(code, f"<runner.fastpath {name}>", "exec"), self.ns)  # noqa: S102 - source built from the AST only
        return self.ns[name]


def _functions_module():
    from runner.spec import functions

    return functions


def compile(parsed: dict, functions, slow: Callable[[Any], Any] | None = None) -> Callable[[Any], Any] | None:  # noqa: A001
    """A callable equivalent to evaluating the AST `parsed` with `functions`, or None if unsupported. With
    `slow`, a record the generated code raises on is handed to slow(data) from inside it (see `_guarded`)."""
    gen = _Gen(functions)
    body: list[str] = []
    ind = "        " if slow is not None else "    "
    try:
        r = gen.node(parsed, "data", body, ind)
    except Unsupported:
        return None
    return gen.build(_guarded("_search", body + [f"{ind}return {r}"], gen, slow), "_search")


def _guarded(name: str, body: list[str], gen: _Gen, slow: Callable[[Any], Any] | None) -> list[str]:
    """The function's lines: the body as it is, or (with `slow`) inside a try whose except hands the record
    to slow(data): jmespath then raises (or answers) exactly as it would have, without a second Python call per
    record."""
    if slow is None:
        return [f"def {name}(data):", *body]
    return [f"def {name}(data):", "    try:", *body, "    except Exception:", f"        return {gen.const(slow)}(data)"]


def mapping_function(fields: list[tuple[tuple, dict]], functions,
                     slow: Callable[[Any], dict] | None = None) -> Callable[[Any], dict] | None:
    """One function for a whole mapping: (canonical path, AST) pairs in, the nested canonical dict out.
    Missing, null and blank values are left out (strings stripped), exactly as specs.Mapping.apply does.
    `slow`: as for `compile`."""
    gen = _Gen(functions)
    lines = ["    out = {}"]
    try:
        for path, parsed in fields:
            r = gen.node(parsed, "data", lines, "    ")
            node, target = "out", []
            for key in path[:-1]:  # parents are made only when a value is set under them
                k = gen.const(key)
                target.append(f"        _node = {node}.get({k}) or {node}.setdefault({k}, {{}})")
                node = "_node"
            leaf = gen.const(path[-1])
            stripped = gen.var()  # not `r` itself: a later field may read the same value, unstripped
            lines += [f"    if type({r}) is str:", f"        {stripped} = {r}.strip()", f"        if {stripped}:",
                      *["    " + x for x in target], f"            {node}[{leaf}] = {stripped}",
                      f"    elif not ({r} is None or (type({r}) in _LD and not {r})):", *target,
                      f"        {node}[{leaf}] = {r}"]
    except Unsupported:
        return None
    lines.append("    return out")
    if slow is not None:
        lines = ["    " + line for line in lines]
    return gen.build(_guarded("_map", lines, gen, slow), "_map")
