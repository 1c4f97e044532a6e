"""Paginators: small interchangeable classes that say what to ask for next.

Each takes the decoded response and its records and returns the next `Step`, or None when done. All of
them refuse an endless paginator (the same cursor, link or page twice) instead of looping forever.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.errors import ProviderError
from runner.specs import Paginate


@dataclass
class Step:
    params: dict = field(default_factory=dict)  # added to the request's params
    url: str | None = None  # a full next-page URL (next_url paginators)
    page: dict = field(default_factory=dict)  # what templates see as `page`


class _Endless(ProviderError):
    pass


def _endless(what: str) -> ProviderError:
    return _Endless(f"the provider's paginator is looping: it returned {what} twice; stopping to avoid an endless run",
                    fix="this is a provider bug or a wrong `paginate` setting in the spec; what was fetched before is kept")


class NoPaging:
    def __init__(self, spec: Paginate):
        self.spec = spec

    def first(self) -> Step:
        return Step()

    def next(self, body: Any, records: list, content: bytes) -> Step | None:
        return None


class CursorPaging:
    def __init__(self, spec: Paginate):
        self.spec = spec
        self.seen: set = set()

    def first(self) -> Step:
        return Step(page={"cursor": None, "number": 1})

    def next(self, body, records, content) -> Step | None:
        more = self.spec.more is not None
        if more and not self.spec.more.search(body):
            return None
        cursor = self.spec.value.search(body) if records else None
        if cursor in (None, ""):
            if more:  # "there is more" without a way to ask for it: stopping quietly would lose invoices
                raise ProviderError(
                    f"the provider says there are more invoices ({self.spec.more.source}) but the page gives no "
                    f"cursor at '{self.spec.value.source}'; what was fetched before is kept",
                    fix="check `paginate.value` in the integration spec against the provider's answer")
            return None
        if cursor in self.seen:
            raise _endless(f"the cursor {cursor!r}")
        self.seen.add(cursor)
        params = {self.spec.param: cursor} if self.spec.param else {}
        return Step(params=params, page={"cursor": cursor, "number": len(self.seen) + 1})


class NextUrlPaging:
    def __init__(self, spec: Paginate):
        self.spec = spec
        self.seen: set = set()

    def first(self) -> Step:
        return Step(page={"number": 1})

    def next(self, body, records, content) -> Step | None:
        url = self.spec.value.search(body)
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

    def next(self, body, records, content) -> Step | None:
        if content == self.last_content and records:
            raise _endless(f"page {self.number} with the same content as page {self.number - 1}")
        self.last_content = content
        if not records:
            return None
        if self.spec.more is not None:
            if not self.spec.more.search(body):
                return None
        elif len(records) < self.spec.size:
            return None
        self.number += 1
        self._advance(len(records))
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
