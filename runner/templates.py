"""Request templates: Jinja2 in a sandboxed environment where an undefined name is an error.

Templates come from YAML files that people edit and share, so they run sandboxed (no attribute escapes,
no file access) and are compiled when the spec loads, so `runner validate` finds a broken one.
"""
from __future__ import annotations

import functools
from datetime import date, datetime, timezone

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError
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


@functools.cache
def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
    env.filters.update(unix=_unix, date=_date, isoformat=_isoformat, utc=_utc, sql_quote=_sql_quote)
    return env


class TemplateError(RunnerError):
    """A template failed to compile or render; the message is meant for the person who wrote it."""

    def __init__(self, message: str, *, fix: str | None = None):
        super().__init__(message, fix=fix or "fix the template in the integration spec (`runner validate` "
                                              "checks every template)")


def _refuse_hostile(source: str, tree) -> None:
    """What the sandbox would refuse at render time, refused when the spec loads (so `validate` finds it):
    private or dunder attributes (the classic sandbox escapes) and file access (include/import/extends)."""
    from jinja2 import nodes

    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Include, nodes.Import, nodes.FromImport,
                               nodes.Extends)):
        if isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            raise TemplateError(f"template {source!r} may not include, import or extend other files")
        name = node.attr if isinstance(node, nodes.Getattr) else (
            node.arg.value if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) else "")
        if name.startswith("_"):
            raise TemplateError(f"template {source!r} reads the private attribute {name!r}, which templates may not")


def _refuse_unknown(source: str, tree) -> None:
    """A filter or test Jinja does not know fails when the template is compiled, which is deferred to its
    first use: say so when the spec loads, with the likely intended name."""
    import difflib

    from jinja2 import nodes

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

    __slots__ = ("source", "_tpl", "_tree", "_names", "constant")

    def __init__(self, source: str):
        self.source = source
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

    def render(self, context: dict) -> str:
        if self.constant:
            return self.source
        try:
            if self._tpl is None:
                self._tpl = environment().from_string(self._tree)
            return self._tpl.render(context)
        except UndefinedError as exc:
            raise TemplateError(f"template {self.source!r}: {exc.message}") from None
        except SecurityError as exc:
            raise TemplateError(f"template {self.source!r} tried something not allowed: {exc}") from None
        except Exception as exc:  # a filter given the wrong type, etc.
            raise TemplateError(f"template {self.source!r} failed: {exc}") from None

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
