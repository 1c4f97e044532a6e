"""Request templates: Jinja2 in a sandboxed environment where an undefined name is an error.

Templates come from YAML files that people edit and share, so they run sandboxed (no attribute escapes,
no file access) and are compiled when the spec loads, so `runner validate` finds a broken one.
"""
from __future__ import annotations

import functools
import re
import string
import threading
import time
from datetime import date, datetime, timezone

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, nodes
from jinja2.visitor import NodeTransformer
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from runner.errors import RunnerError


def _unix(value) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, date):
        return int(datetime(value.year, value.month, value.day, tzinfo=timezone.utc).timestamp())
    return int(value)


def _date(value, fmt: str = "%Y-%m-%d") -> str:
    if isinstance(value, (datetime, date)):
        return value.strftime(fmt)
    return str(value)


def _isoformat(value) -> str:
    return value.isoformat() if isinstance(value, (datetime, date)) else str(value)


def _utc(value):
    return value.astimezone(timezone.utc) if isinstance(value, datetime) else value


def _sql_quote(value) -> str:
    """Quote a value for a provider's query language (SQL-like query languages): 'O''Brien'."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


# Bounds on one rendering. A template builds a request value of a few hundred characters in microseconds; a
# spec from anyone's pull request could otherwise loop range(100000) inside range(100000), build 'x' * 3000000000
# or double a string 60 times, and hang or exhaust the run. Each bound is far above any real template's use.
MAX_RANGE = 10_000  # items in one range()
MAX_VALUE = 1_000_000  # characters (or items) in any one value a template builds, and in its result
MAX_PRODUCED = 16_000_000  # characters built in one rendering, all values and loop rounds together
MAX_STEPS = 100_000  # loop rounds, calls, filters and operators in one rendering
MAX_SECONDS = 5.0  # wall time of one rendering
_MAX_INT_BITS = 20_000  # numbers of about 6,000 digits


class TemplateBound(Exception):
    """A rendering went past one of the bounds above; the message says which, in words."""


class _Budget:
    __slots__ = ("steps", "produced", "deadline")

    def __init__(self) -> None:
        self.steps = self.produced = 0
        self.deadline = time.monotonic() + MAX_SECONDS


_local = threading.local()


def _budget() -> _Budget:
    # Outside a rendering (none happens there today) each operation is still bounded on its own.
    return getattr(_local, "budget", None) or _Budget()


def _step() -> None:
    b = _budget()
    b.steps += 1
    if b.steps > MAX_STEPS:
        raise TemplateBound(f"it takes more than {MAX_STEPS:,} steps (loop rounds, calls, filters, operations)")
    if time.monotonic() > b.deadline:
        raise TemplateBound(f"it runs for more than {MAX_SECONDS:g} seconds")


def _measure(value, limit: int = MAX_VALUE) -> int:
    """The size of a value as text, counted only until it passes `limit` (a list of many references to one long
    string is small in memory and enormous once written out)."""
    total, todo = 0, [value]
    while todo:
        v = todo.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, dict):
            total += 2 + len(v)
            if total <= limit:
                todo.extend(v.keys())
                todo.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + len(v)
            if total <= limit:
                todo.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() // 3 + 1
        else:
            total += 1
        if total > limit:
            break
    return total


def _produce(size: int) -> None:
    if size > MAX_VALUE:
        raise TemplateBound(f"it builds a value longer than {MAX_VALUE:,} characters")
    b = _budget()
    b.produced += size
    if b.produced > MAX_PRODUCED:
        raise TemplateBound(f"it builds more than {MAX_PRODUCED:,} characters in all")


def _result(value):
    _produce(_measure(value, MAX_VALUE))
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        raise TemplateBound("it computes a number of thousands of digits")
    return value


def _refuse_size(size: int, what: str) -> None:
    if size > MAX_VALUE:
        raise TemplateBound(f"{what} would be longer than {MAX_VALUE:,} characters")


_PRINTF = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_format(fmt, braces: bool) -> None:
    """A width or precision in a format string pads the text to that size: '%3000000000s', '{:>3000000000}'."""
    if not isinstance(fmt, str):
        return
    specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec] if braces else [
        m.group(0) for m in _PRINTF.finditer(fmt)]
    for spec in specs:
        if "*" in spec or "{" in spec or any(int(n) > MAX_VALUE for n in re.findall(r"\d+", spec)):
            raise TemplateBound(f"the format {_short(fmt)} pads to more than {MAX_VALUE:,} characters "
                                "(or by a width given as a value)")


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _materialize(items) -> list:
    """The items of an iterable for a join, refused as soon as they add up to too much."""
    out, total = [], 0
    for item in items:
        out.append(item)
        total += 1 + _measure(item, MAX_VALUE)
        _refuse_size(total, "the joined text")
    return out


def _check_call(target, args: tuple, kwargs: dict) -> tuple:
    """Refuse, before running it, a method call of a text that would build a text too large to hold."""
    owner = getattr(target, "__self__", None)
    name = getattr(target, "__name__", "")
    if not isinstance(owner, str):
        return args
    if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        _refuse_size(args[0], f"the text padded by {name}()")
    elif name == "expandtabs":
        size = args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8)
        _refuse_size(len(owner) + owner.count("\t") * max(0, int(size)), "the text with its tabs expanded")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = (len(owner) + 1) if args[0] == "" else owner.count(args[0])
        _refuse_size(len(owner) + count * max(0, len(args[1]) - len(args[0])), "the text with its replacements")
    elif name == "join" and args:
        items = _materialize(args[0])
        _refuse_size(sum(len(i) for i in items if isinstance(i, str)) + len(owner) * len(items), "the joined text")
        return (items,) + args[1:]
    elif name in ("format", "format_map"):
        _check_format(owner, braces=True)
    elif name == "translate":
        table = args[0] if args else None
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1) if isinstance(
            table, dict) else 1
        _refuse_size(len(owner) * longest, "the translated text")
    return args


def _check_filter(name: str, args: tuple, kwargs: dict) -> tuple:
    value = args[0] if args else None
    if name == "center":
        width = args[1] if len(args) > 1 else kwargs.get("width", 80)
        if isinstance(width, int):
            _refuse_size(width, "the centred text")
    elif name == "indent" and isinstance(value, str):
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _refuse_size(len(value) + (value.count("\n") + 1) * max(0, per_line), "the indented text")
    elif name == "replace" and isinstance(value, str) and len(args) >= 3:
        return (value,) + _check_call(value.replace, args[1:], kwargs)
    elif name == "join" and value is not None:
        items = _materialize(value)
        sep = args[1] if len(args) > 1 else kwargs.get("d", "")
        _refuse_size(sum(len(i) for i in items if isinstance(i, str)) + len(str(sep)) * len(items), "the joined text")
        return (items,) + args[1:]
    elif name == "format":
        _check_format(value, braces=False)
    elif name in ("batch", "slice"):
        size = args[1] if len(args) > 1 else kwargs.get("linecount", kwargs.get("slices"))
        if isinstance(size, int):
            _refuse_size(size, f"the lists made by {name}")
    return args


def _guard_filter(name: str, f):
    # A filter marked pass_context/pass_eval_context/pass_environment gets that first; the value comes next.
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(f)
    def guarded(*args, **kwargs):
        _step()
        args = args[:skip] + _check_filter(name, args[skip:], kwargs)
        return _result(f(*args, **kwargs))

    return guarded


def _loop_guard(iterable, body_chars: int = 0):
    """Every `for` loop iterates through this (added when the template is parsed): each round is a step, and
    the literal text of its body is counted as built."""
    for item in iterable:
        _step()
        _produce(body_chars)
        yield item


def _concat_guard(parts) -> str:
    """The `~` operator, as Jinja joins its parts (str of each), once the result is known to fit."""
    _step()
    _produce(sum(_measure(p, MAX_VALUE) for p in parts))
    return "".join(map(str, parts))


def _finalize(value):
    """Every {{ value }} written, in macros and `set` blocks too, is counted as built."""
    _produce(_measure(value, MAX_VALUE))
    return value


def _range(*args):
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateBound(f"range() of {len(r):,} numbers; at most {MAX_RANGE:,}")
    return r


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100):  # noqa: A002 (Jinja's names)
    from jinja2.utils import generate_lorem_ipsum

    if n * max > MAX_RANGE:
        raise TemplateBound("lipsum() of that many words")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with every operation that can grow a value or repeat work checked against the bounds."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context, operator, left, right):
        _step()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    _refuse_size(len(seq) * n, "the repeated value")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise TemplateBound("it computes a number of thousands of digits")
        elif operator == "+" and isinstance(left, (str, bytes, list, tuple)) and isinstance(right, type(left)):
            _refuse_size(len(left) + len(right), "the joined value")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * (abs(left).bit_length() - 1) > _MAX_INT_BITS:
                raise TemplateBound("it computes a number of thousands of digits")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, braces=False)
        return _result(super().call_binop(context, operator, left, right))

    def call(self, context, obj, /, *args, **kwargs):
        _step()
        target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format to check its fields
        args = _check_call(target, args, kwargs)
        return _result(super().call(context, obj, *args, **kwargs))


@functools.cache
def environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False, finalize=_finalize)
    env.filters.update(unix=_unix, date=_date, isoformat=_isoformat, utc=_utc, sql_quote=_sql_quote)
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters.update(_loop_guard=_loop_guard, _concat_guard=_concat_guard)
    env.globals.update(range=_range, lipsum=_lipsum)
    return env


class _Guard(NodeTransformer):
    """Routes every loop and every `~` through the bounds (Jinja gives no hook for them)."""

    def visit_For(self, node: nodes.For):
        self.generic_visit(node)
        body = sum(len(d.data) for n in node.body for d in n.find_all(nodes.TemplateData))
        node.iter = nodes.Filter(node.iter, "_loop_guard", [nodes.Const(body)], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat):
        self.generic_visit(node)
        return nodes.Filter(nodes.Tuple(node.nodes, "load", lineno=node.lineno), "_concat_guard", [], [], None, None,
                            lineno=node.lineno)


class TemplateError(RunnerError):
    """A template failed to compile or render; the message is meant for the person who wrote it."""

    def __init__(self, message: str, *, fix: str | None = None):
        super().__init__(message, fix=fix or "fix the template in the integration spec (`runner validate` "
                                              "checks every template)")


def _refuse_hostile(source: str, tree) -> None:
    """What the sandbox would refuse at render time, refused when the spec loads (so `validate` finds it):
    private or dunder attributes (the classic sandbox escapes), file access (include/import/extends) and
    recursive loops."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Include, nodes.Import, nodes.FromImport,
                               nodes.Extends)):
        if isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            raise TemplateError(f"template {source!r} may not include, import or extend other files")
        name = node.attr if isinstance(node, nodes.Getattr) else (
            node.arg.value if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) else "")
        if name.startswith("_"):
            raise TemplateError(f"template {source!r} reads the private attribute {name!r}, which templates may not")
    for loop in tree.find_all(nodes.For):
        if loop.recursive:  # its inner rounds would escape the loop bounds (a request value needs no tree walk)
            raise TemplateError(f"template {source!r} uses a recursive loop, which templates may not")


def _refuse_unknown(source: str, tree) -> None:
    """A filter or test Jinja does not know fails when the template is compiled, which is deferred to its
    first use: say so when the spec loads, with the likely intended name."""
    import difflib

    env = environment()
    for kind, known in ((nodes.Filter, env.filters), (nodes.Test, env.tests)):
        for node in tree.find_all(kind):
            if node.name not in known:
                what = "filter" if kind is nodes.Filter else "test"
                close = difflib.get_close_matches(node.name, list(known), n=1)
                raise TemplateError(f"template {source!r} uses an unknown {what} '{node.name}'"
                                    + (f" (did you mean '{close[0]}'?)" if close else ""))


class Template:
    """Parsed (and checked) when the spec loads; compiled to Python on first use, since most templates of a
    spec are never rendered by a given command (start-up time of `runner validate`)."""

    __slots__ = ("source", "where", "_tpl", "_tree", "_names", "constant")

    def __init__(self, source: str, where: str | None = None):
        self.source = source
        self.where = where  # the spec's file:line and key path, for errors at render time
        # Most values in a spec are plain strings; skip Jinja for them (hot path: every request).
        self.constant = "{{" not in source and "{%" not in source
        self._tpl = self._tree = self._names = None
        if self.constant:
            return
        try:
            self._tree = environment().parse(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"template {source!r} does not compile: {exc.message} (line {exc.lineno})") from None
        _refuse_hostile(source, self._tree)
        _refuse_unknown(source, self._tree)
        _Guard().visit(self._tree)  # keeps every name the template reads (names() is the same after it)

    def render(self, context: dict) -> str:
        if self.constant:
            return self.source
        where = f" (at {self.where})" if self.where else ""
        _local.budget = _Budget()
        try:
            if self._tpl is None:
                self._tpl = environment().from_string(self._tree)
            return _result(self._tpl.render(context))
        except TemplateBound as exc:
            raise TemplateError(
                f"template {_short(self.source)}{where} was stopped: {exc}",
                fix="a template builds one request value: check the loops, repetitions and paddings in this "
                    "template; the bounds are in docs/reliability.md (hostile input bounds)") from None
        except UndefinedError as exc:
            raise TemplateError(f"template {self.source!r}{where}: {exc.message}") from None
        except SecurityError as exc:
            raise TemplateError(f"template {self.source!r}{where} tried something not allowed: {exc}") from None
        except RecursionError:
            raise TemplateError(f"template {_short(self.source)}{where} was stopped: a macro calls itself without "
                                "end") from None
        except Exception as exc:  # a filter given the wrong type, etc.
            raise TemplateError(f"template {self.source!r}{where} failed: {exc}") from None
        finally:
            _local.budget = None

    def names(self) -> set[str]:
        """Top-level names the template reads (to check them against what the context will hold)."""
        if self.constant:
            return set()
        if self._names is None:
            from jinja2 import meta

            self._names = meta.find_undeclared_variables(self._tree)
        return self._names

    def __repr__(self) -> str:
        return f"Template({self.source!r})"
