"""Paginators: small interchangeable classes that say what to ask for next.

Each takes what a page says about paging (`PageFacts`: read from the decoded answer by `facts`, or
straight from its bytes by a `facts_reader`) and returns the next `Step`, or None when done. All of them
refuse an endless paginator (the same cursor, link or page twice) instead of looping forever.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from runner.errors import ProviderError
from runner.spec.loader import Paginate


@dataclass
class Step:
    params: dict = field(default_factory=dict)  # added to the request's params
    url: str | None = None  # a full next-page URL (next_url paginators)
    page: dict = field(default_factory=dict)  # what templates see as `page`


@dataclass(slots=True)
class PageFacts:
    """What the paginators need of one answer: how many records it had, the spec's `more` expression's value
    (None without one) and its `value` expression's (cursor or next-page link; None for counting paginators)."""

    count: int
    more: Any = None
    value: Any = None


def facts(spec: Paginate, body: Any, records: list) -> PageFacts:
    """PageFacts of a decoded answer: each expression is evaluated only where its paginator reads it (a
    cursor on a page with records, `more` of a counting paginator on a page with records)."""
    kind, more, value = spec.type, None, None
    if spec.more is not None and (kind == "cursor" or (kind in ("page", "offset") and records)):
        more = spec.more.search(body)
    if spec.value is not None and ((kind == "cursor" and records and (spec.more is None or more))
                                   or kind == "next_url"):
        value = spec.value.search(body)
    return PageFacts(len(records), more, value)


def facts_reader(stream) -> Callable[[bytes], PageFacts] | None:
    """For a stream whose `records` and paginator expressions are plain paths (`data`, `data[-1].id`,
    `page_context.has_more_page`): a function from an answer's bytes to its PageFacts that decodes only the
    fields those paths read (msgspec, with a type made from the paths: the rest of each invoice is skipped,
    a third of the time of decoding it all). It gives exactly what `facts` gives on the decoded answer, or
    raises (anything unexpected: not JSON, another type where a path goes), and the caller then decodes the
    answer in full and says what is wrong with it. None when some expression is not a plain path."""
    shape = _Shape()
    spec = stream.paginate
    if not shape.add(stream.records.ast, records=True):
        return None
    for expr in (spec.more, spec.value):
        if expr is not None and not shape.add(expr.ast):
            return None
    import msgspec

    kind = shape.type(msgspec, "Page")
    if kind is None or kind is Any:
        return None
    decode, to_builtins = msgspec.json.Decoder(kind).decode, msgspec.to_builtins

    def read(content: bytes) -> PageFacts:
        body = to_builtins(decode(content))
        return facts(spec, body, stream.page_records(body))

    return read


class _Shape:
    """The part of an answer some plain paths read: the fields of an object, the items of a list, or the
    whole value (a leaf); `records` marks the invoice list (a list of objects, or one object alone)."""

    def __init__(self):
        self.fields: dict[str, _Shape] = {}
        self.items: _Shape | None = None
        self.leaf = False
        self.records = False

    def add(self, ast: dict, records: bool = False) -> bool:
        steps = _steps(ast)
        if not steps:
            return False
        node = self
        for kind, key in steps:
            if kind == "field":
                node = node.fields.setdefault(key, _Shape())
            else:
                node.items = node.items or _Shape()
                node = node.items
        node.records, node.leaf = node.records or records, node.leaf or not records
        return True

    def type(self, msgspec, name: str):
        """The msgspec type that decodes this shape (None: one no type can say, such as a value read both
        as a list and as an object)."""
        if self.leaf:
            return Any
        item = self.items.type(msgspec, name + "Item") if self.items is not None else None
        if self.records:
            if self.fields or (self.items is not None and item is None):
                return None
            record = item if item is not None else msgspec.defstruct(name + "Record", [], omit_defaults=True)
            return list[record] | record | None
        if self.items is not None:
            return None if self.fields or item is None else list[item] | None
        fields = []
        for i, (key, child) in enumerate(self.fields.items()):
            kind = child.type(msgspec, f"{name}{i}")
            if kind is None:
                return None
            fields.append((f"f{i}", kind, None))
        # Field names as the provider spells them (any JSON key), under Python names of their own.
        struct = msgspec.defstruct(name, fields, rename={f"f{i}": k for i, k in enumerate(self.fields)},
                                   omit_defaults=True)
        return struct | None


def _steps(ast: dict) -> list[tuple[str, Any]] | None:
    """A plain path's steps, ("field", name) and ("index", n); None for anything else."""
    kind = ast.get("type")
    if kind == "field":
        return [("field", ast["value"])]
    if kind == "index_expression":
        left, index = ast["children"]
        steps = _steps(left)
        return steps + [("index", index["value"])] if steps and index.get("type") == "index" else None
    if kind == "subexpression":
        out: list = []
        for child in ast["children"]:
            steps = _steps(child)
            if steps is None:
                return None
            out += steps
        return out
    return None


class _Endless(ProviderError):
    """A looping paginator. `repeated`: the page that showed it is itself one seen before (a cursor or
    content that repeats), so it is not handed on: its invoices would get a second verdict in the run
    (imported from the first copy, then duplicate from the second)."""

    repeated = False


def _endless(what: str, repeated: bool = False) -> ProviderError:
    exc = _Endless(f"the provider's paginator is looping: it returned {what} twice; stopping to avoid an endless run",
                   fix="this is a provider bug or a wrong `paginate` setting in the spec; what was fetched before is kept")
    exc.repeated = repeated
    return exc


def repeats_a_page(exc: BaseException) -> bool:
    """Whether a paginator's refusal says the page it was given repeats one fetched before."""
    return isinstance(exc, _Endless) and exc.repeated


class NoPaging:
    def __init__(self, spec: Paginate):
        self.spec = spec

    def first(self) -> Step:
        return Step()

    def next(self, page: PageFacts, content: bytes) -> Step | None:
        return None


class CursorPaging:
    def __init__(self, spec: Paginate):
        self.spec = spec
        self.seen: set = set()

    def first(self) -> Step:
        return Step(page={"cursor": None, "number": 1})

    def next(self, page: PageFacts, content: bytes) -> Step | None:
        more = self.spec.more is not None
        if more and not page.more:
            return None
        cursor = page.value if page.count else None
        if cursor in (None, ""):
            if more:  # "there is more" without a way to ask for it: stopping quietly would lose invoices
                raise ProviderError(
                    f"the provider says there are more invoices ({self.spec.more.source}) but the page gives no "
                    f"cursor at '{self.spec.value.source}'; what was fetched before is kept",
                    fix="check `paginate.value` in the integration spec against the provider's answer")
            return None
        if cursor in self.seen:  # this answer ends where an earlier one did: the cursor did not move it on
            raise _endless(f"the cursor {cursor!r}", repeated=True)
        self.seen.add(cursor)
        params = {self.spec.param: cursor} if self.spec.param else {}
        return Step(params=params, page={"cursor": cursor, "number": len(self.seen) + 1})


class NextUrlPaging:
    def __init__(self, spec: Paginate):
        self.spec = spec
        self.seen: set = set()

    def first(self) -> Step:
        return Step(page={"number": 1})

    def next(self, page: PageFacts, content: bytes) -> Step | None:
        url = page.value
        if not url:
            return None
        if url in self.seen:
            raise _endless(f"the next-page link {url!r}")
        self.seen.add(url)
        return Step(url=url, page={"number": len(self.seen) + 1})


class _Counting:
    """page and offset paginators: stop on `more` false, or on a short or empty page."""

    default_start = 0

    def __init__(self, spec: Paginate):
        self.spec = spec
        self.position = spec.start if spec.start is not None else self.default_start
        self.number = 1
        self.last_content: bytes | None = None

    def _step(self) -> Step:
        params = {}
        if self.spec.param:
            params[self.spec.param] = self.position
        if self.spec.size_param:
            params[self.spec.size_param] = self.spec.size
        return Step(params=params, page=self._page())

    def first(self) -> Step:
        return self._step()

    def next(self, page: PageFacts, content: bytes) -> Step | None:
        if content == self.last_content and page.count:
            raise _endless(f"page {self.number} with the same content as page {self.number - 1}", repeated=True)
        self.last_content = content
        if not page.count:
            return None
        if self.spec.more is not None:
            if not page.more:
                return None
        elif page.count < self.spec.size:
            return None
        self.number += 1
        self._advance(page.count)
        return self._step()


class PagePaging(_Counting):
    default_start = 1

    def _advance(self, n: int) -> None:
        self.position += 1

    def _page(self) -> dict:
        return {"number": self.position, "size": self.spec.size, "offset": (self.position - 1) * self.spec.size}


class OffsetPaging(_Counting):
    default_start = 0

    def _advance(self, n: int) -> None:
        self.position += n

    def _page(self) -> dict:
        return {"number": self.number, "size": self.spec.size, "offset": self.position}


KINDS = {"none": NoPaging, "cursor": CursorPaging, "next_url": NextUrlPaging, "page": PagePaging,
         "offset": OffsetPaging}


def paginator(spec: Paginate):
    return KINDS[spec.type](spec)
