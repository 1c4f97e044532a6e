"""Change feeds: a scheduled run reads only the invoices that changed since the last one.

A spec's `changes:` section says how its provider reports changes since a moment (an events list, change
data capture, a last-modified filter on the invoice list). Each connection keeps a cursor per
stream in the state store: the moment its last recorded run started. A run then either

- reads the change feed since the cursor (minus the spec's `overlap`), keeps the newest version of each
  changed invoice, and yields them in pages exactly like a full scan's (the pipeline classifies, delivers and
  records them the same way: every invoice seen gets exactly one verdict), or
- runs a full scan of the window: on `--full`, when the last full scan is older than the connection's
  `full_scan_every`, when there is no cursor yet, when the cursor is older than the provider keeps changes
  (`retention`), when the connection's window or filters changed since, or when the feed's answer may have
  been cut short (`limit`). The run report says which and why.

The cursor is committed only after every page of the run is recorded (`commit`), so a crash never skips a
change: the next run reads from the old cursor again.

For a re-check of invoices that already have cases: in changes mode, `Scan.records` holds each changed invoice
as read (id -> record, the records the pages carried), `Scan.changed` their ids plus `Scan.deleted`, the ids of
invoices deleted at the source (no record to classify). In full mode every invoice of the window passed
through the pages. `ChangeFeed(source, since).collect()` reads a feed on its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable

from loguru import logger

from runner.engine import pagination
from runner.engine.classify import _truthy
from runner.errors import AuthError, ProviderError

STREAM = "invoices"
# Changed invoices held at once before they are handed on in pages: a feed that reports more than this in
# one run is no cheaper than a full scan, which is run instead.
MAX_CHANGES = 50_000


@dataclass
class Scan:
    """How one connection's run reads its invoices."""

    mode: str  # "full" | "changes"
    reason: str  # why this mode, in words for the run report
    started: float  # when the run began reading: the cursor it commits
    since: float | None = None  # changes mode: the moment the feed is read from (cursor minus overlap)
    changed: set = field(default_factory=set)  # changes mode: ids of changed invoices the feed reported
    deleted: set = field(default_factory=set)  # changes mode: ids of invoices deleted at the source
    records: dict = field(default_factory=dict)  # changes mode: invoice id -> the changed invoice as read
    scope: str = ""  # what the cursor is valid for (account, window rule, filters)
    full_at: float | None = None  # when the last full scan started (carried on in changes mode)

    def as_dict(self) -> dict:
        out = {"mode": self.mode, "reason": self.reason}
        if self.mode == "changes":
            out.update(since=_iso(self.since), changed=len(self.changed), deleted=len(self.deleted))
        return out


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _ago(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.1f} days" if days >= 1 else f"{seconds / 3600:.1f} hours"


def scope_of(source, store) -> str:
    """What a cursor is valid for: a change of account, window rule, server filters or destination needs a
    full scan (the invoices the new window or filter takes in were never read; the ledger is per destination,
    so a config moved from Debitura's test environment to production has imported nothing there yet)."""
    conn = source.conn
    return "|".join([source.account_key, conn.window.source, conn.window.tz, f"server_filters={conn.server_filters}",
                     getattr(store, "destination", "") or ""])


def decide(source, store, *, full: bool = False, now: float | None = None) -> Scan:
    """Full scan or change feed for this run of `source` (opened: its account is known)."""
    now = time.time() if now is None else now
    spec = source.spec.changes
    if spec is None:
        return Scan("full", "the integration has no change feed", now)
    if not source.conn.server_filters:
        return Scan("full", "server_filters: false asks for every invoice of the window (an audit run)", now)
    scope = scope_of(source, store)
    saved = store.cursor(source.conn.name, STREAM) if store is not None else None
    if full:
        return Scan("full", "a full scan was asked for (--full)", now, scope=scope)
    if saved is None:
        return Scan("full", ("no change cursor yet (a first run, or the last one had invoices that failed to deliver): "
                                      "the whole window is read"), now, scope=scope)
    if saved["scope"] != scope:
        return Scan("full", "the connection's account, window, filters or destination changed since the last run", now, scope=scope)
    age = now - saved["cursor"]
    if spec.retention_s is not None and age > spec.retention_s - spec.overlap_s:
        return Scan("full", f"the last run was {_ago(age)} ago, longer than {source.spec.name} keeps changes "
                            f"({_ago(spec.retention_s)}): changes may be lost, so the whole window is read", now,
                    scope=scope)
    since_full = now - (saved["full_at"] or 0)
    if since_full >= source.conn.full_scan_every:
        return Scan("full", f"scheduled full scan (the last was {_ago(since_full)} ago; full_scan_every is "
                            f"{_ago(source.conn.full_scan_every)})", now, scope=scope)
    return Scan("changes", f"the last full scan was {_ago(since_full)} ago", now,
                since=saved["cursor"] - spec.overlap_s, scope=scope, full_at=saved["full_at"])


def commit(store, source, scan: Scan, failed: bool = False) -> None:
    """After every page of the run is recorded: the next run reads changes from this run's start. After a run
    with invoices that failed to deliver, the cursor is dropped: the next run is a full scan, which sees them
    again (a change feed would not, unless they changed)."""
    if store is None or source.spec.changes is None:
        return
    if failed:
        store.drop_cursor(source.conn.name, STREAM)
        return
    store.save_cursor(source.conn.name, STREAM, scan.started, scan.scope,
                      scan.started if scan.mode == "full" else scan.full_at)


class _CutShort(Exception):
    """The change feed cannot be trusted for this run (an answer at the provider's limit, too many changes)."""


class ChangeFeed:
    """Reads a spec's `changes:` since a moment: the newest version of each changed invoice."""

    def __init__(self, source, since: float):
        self.source = source
        self.spec = source.spec.changes
        self.since = since

    def context(self, page: dict) -> dict:
        since = datetime.fromtimestamp(self.since, timezone.utc)
        return self.source.context(page=page, changes={"since": since})

    async def collect(self) -> tuple[dict[str, Any], set]:
        """(invoice id -> newest invoice record, ids deleted at the source). Raises _CutShort."""
        spec = self.spec
        pag = pagination.paginator(spec.paginate)
        step = pag.first()
        found: dict[str, Any] = {}
        deleted: set = set()
        pages = 0
        while True:
            pages += 1
            if pages > spec.paginate.max_pages:
                raise ProviderError(f"the change feed stopped after {pages - 1} pages (max_pages in the spec)")
            try:
                resp = await self.source.send_spec(spec.request, self.context(step.page), step.params or None,
                                                   url=step.url)
            except AuthError as exc:
                if exc.status != 403:
                    raise
                raise _CutShort(f"the credentials may not read {self.source.spec.name}'s change feed ({exc.message}): "
                                f"the whole window is read instead; grant read access to it to make runs cheaper")
            body = resp.json(f"{self.source.spec.name}'s change list")
            items = spec.records.search(body)
            items = [] if items is None else items if isinstance(items, list) else [items]
            if spec.max_page_size and len(items) > spec.max_page_size:
                raise ProviderError(f"{self.source.spec.name} sent {len(items)} changes in one answer, more than the "
                                    f"{spec.max_page_size} the spec allows; refusing it")
            if spec.limit and len(items) >= spec.limit:
                raise _CutShort(f"the change feed returned {len(items)} changes, its most in one answer, so some may "
                                f"be missing: the whole window is read instead")
            for item in items:
                key = spec.id.search(item)
                if key is None or key == "":
                    continue
                key = str(key)
                deleting = spec.deleted is not None and bool(spec.deleted.search(item))
                if key in found or key in deleted:
                    if spec.order == "newest_first":
                        continue  # an older version of an invoice already taken
                    found.pop(key, None)
                    deleted.discard(key)
                if deleting:
                    deleted.add(key)
                else:
                    rec = spec.invoice.search(item)
                    if isinstance(rec, dict):
                        found[key] = dict(rec)
                if len(found) + len(deleted) > MAX_CHANGES:
                    raise _CutShort(f"more than {MAX_CHANGES} invoices changed since the last run: the whole window "
                                    f"is read instead")
            step = pag.next(pagination.facts(spec.paginate, body, items), resp.content)
            if step is None:
                return found, deleted

    async def enrich(self, records: list) -> None:
        """The feed's own detail lookups (what a change item lacks), then the invoice list's, for the invoices
        that may be imported: a paid, void or deleted one gets its verdict (and its re-check) from its own
        fields, and a feed of payments must not cost a customer look-up each (providers may count every call)."""
        unpaid = self.source.stream.unpaid
        todo = []
        for rec in records:
            try:
                if not _truthy(unpaid.search(rec)):
                    continue
            except Exception:  # noqa: BLE001 - the classifier says what is wrong with it; look it up anyway
                pass
            todo.append(rec)
        if todo and self.spec.details:
            await self.source.enrich(todo, self.spec.details)
        if todo and self.source.stream.details:
            await self.source.enrich(todo)


async def pages(source, scan: Scan, hand_over: Callable | None = None) -> AsyncIterator[tuple]:
    """The run's pages, as Source.pages_with_answers yields them: the change feed's in changes mode (a
    feed that cannot be trusted turns the run into a full scan, said in `scan.reason`), else the full scan's."""
    if scan.mode == "changes":
        feed = ChangeFeed(source, scan.since)
        try:
            found, deleted = await feed.collect()
        except _CutShort as exc:
            scan.mode, scan.reason = "full", str(exc)
            logger.info("{}: {}", source.conn.name, exc)
        else:
            scan.changed, scan.deleted, scan.records = set(found) | deleted, deleted, found
            records = list(found.values())
            size = source.stream.max_page_size or 100
            if not records:
                return
            for i in range(0, len(records), size):
                page = records[i:i + size]
                await feed.enrich(page)
                yield page, None, None, i + size < len(records)
            return
    async for page in source.pages_with_answers(hand_over):
        yield page
