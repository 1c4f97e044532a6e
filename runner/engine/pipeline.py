"""The engine: fetch → map → filter → validate → dedupe → deliver → record a verdict for every invoice.

`Source` is one connection's provider side (auth, requests, pages, mapping, filters) and knows nothing of
state or destinations; `sync` runs every connection concurrently and records one verdict per invoice seen.
No code here knows any particular integration: everything specific comes from the spec.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Callable
from urllib.parse import urljoin

from loguru import logger

from runner import metrics, state
from runner.net import auth as auth_mod
from runner.engine import incremental, localsink, pagination
from runner.spec import secrets
from runner.spec.config import Config, Connection
from runner.state.sqlite import RECENT_RUNS
from runner.engine.classify import (ELIGIBLE, FAILED, IMPORTED, REASONS, SKIPPED, Classifier, Verdict,  # noqa: F401
                             Tally, _truthy, delivered, merge, tally, to_deliver, verdict_rows)
from runner.errors import (AccountMismatch, AuthError, DestinationError, NeedsReconnect, ProviderError, RunnerError,
                           UnsafeRequest, failure_words)
from runner.net.http import Clients, Http, Policy, is_link, limiter_for, parse_json
from runner.spec.loader import PageTooLarge
from runner.engine.workers import Workers


@dataclass
class ConnectionResult:
    name: str
    integration: str
    environment: str
    window: dict
    window_text: str
    account_id: str | None = None
    account_name: str | None = None
    status: str = "ok"  # ok | failed | needs_reconnect | partial | interrupted (a stop signal)
    error: str | None = None
    fix: str | None = None
    counts: Counter = field(default_factory=Counter)  # "imported" | "skipped:<reason>" | "failed"
    samples: dict = field(default_factory=dict)  # reason -> a few verdicts, for summaries and support
    verdicts: list = field(default_factory=list)  # every verdict, only when details were asked for
    requests: int = 0
    seen: int = 0
    seconds: float = 0.0
    rate_limit: float | None = None  # the requests per second the spec allows this connection, if it says
    statuses: Counter = field(default_factory=Counter)  # not_unpaid invoices by their status ("paid": 3)
    scan: Any = None  # incremental.Scan: full scan or change feed, and why
    after_case: dict = field(default_factory=dict)  # documents uploaded, open cases re-checked (engine/lifecycle.py)

    @property
    def imported(self) -> int:
        return self.counts.get(IMPORTED, 0)

    def skipped(self) -> dict:
        return {k.split(":", 1)[1]: v for k, v in self.counts.items() if k.startswith("skipped:")}

    @property
    def failed(self) -> int:
        return self.counts.get(FAILED, 0)

    def paced_by_limit(self) -> bool:
        """Whether the spec's rate limit set this connection's pace: it sent nearly as many requests a second
        as the limit allows (then more partitions or workers would not make it faster; the limit would)."""
        return bool(self.rate_limit and self.requests >= 5 and self.seconds > 0
                    and self.requests / self.seconds >= 0.85 * self.rate_limit)

    def why_zero(self) -> str | None:
        """When nothing was imported, say why: a sync that 'found 0 invoices' is never left unexplained."""
        if self.imported:
            return None
        if self.status == "interrupted":
            return "nothing was imported before the run was stopped"
        if self.status != "ok":
            return f"nothing was imported because the connection failed: {self.error}"
        if self.seen == 0 and self.scan is not None and self.scan.mode == "changes":
            return (f"no invoice changed since the last run ({self.scan.reason}); `runner apply --full` reads the whole "
                    f"window")
        if self.seen == 0:
            return ("the provider returned no invoices for this window and filter: nothing unpaid was created in "
                    f"{self.window_text}; widen `window:` if you expected some")
        sk = self.skipped()
        if self.failed:
            ex = next((s for k in ("delivery_failed", "destination_unavailable") for s in self.samples.get(k, [])), None)
            return (f"{self.failed} eligible invoice(s) failed to deliver"
                    + (f": {ex.number or ex.invoice_id}: {ex.message}" if ex else "; see the errors above"))
        if sk and set(sk) == {"duplicate"}:
            return "every eligible invoice was already imported before (duplicates); nothing new to send"
        parts = ", ".join(f"{n} {REASONS.get(r, r)}" for r, n in sorted(sk.items(), key=lambda x: -x[1]))
        if sk and set(sk) <= {"not_unpaid", "outside_date_window"}:
            return (f"nothing unpaid in the window {self.window_text}: {parts}"
                    + ("; widen `window:` to include the older unpaid ones" if "outside_date_window" in sk else ""))
        top = max(sk, key=sk.get) if sk else None
        ex = (self.samples.get(top) or [None])[0] if top else None
        return f"every invoice seen was skipped: {parts}" + (
            f" (e.g. {ex.number or ex.invoice_id}: {ex.message})" if ex is not None and ex.message else "")

    def as_dict(self, samples: bool = True) -> dict:
        out = {"name": self.name, "integration": self.integration, "environment": self.environment,
                "account_id": self.account_id, "account_name": self.account_name, "status": self.status,
                "error": self.error, "fix": self.fix, "window": self.window, "seen": self.seen,
                "imported": self.imported, "skipped": self.skipped(), "failed": self.failed,
                "why_zero": self.why_zero(), "requests": self.requests, "seconds": round(self.seconds, 3),
                "rate_limit_per_second": self.rate_limit, "paced_by_rate_limit": self.paced_by_limit(),
                "not_unpaid_by_status": dict(self.statuses),
                "scan": self.scan.as_dict() if self.scan is not None else None, "after_case": self.after_case}
        if samples:
            out["samples"] = {k: [v.as_dict() for v in vs] for k, vs in self.samples.items()}
        return out


def _own_pending(row) -> bool:
    return row is not None and row.status == "pending"


def _text(expr, view) -> str | None:
    """A spec expression's value as an account id or name (None when absent)."""
    if expr is None:
        return None
    v = expr.search(view)
    return None if v is None or v == "" else str(v)


def _share_budget(store, http: Http | None) -> None:
    """A store other processes use too (PostgreSQL) keeps the request budgets of the accounts this run calls,
    so runners side by side stay within each account's limits together."""
    budget = store.rate_budget() if store is not None else None
    if http is not None and http.limiter is not None:
        http.limiter.share(budget)  # None too: the limiter may be an earlier run's, on another store


def credential_fingerprint(conn: Connection) -> str | None:
    """One short, non-reversible name for a connection's credentials: a rotated key shows up as a change,
    and connections with the same credentials share one rate limit."""
    return secrets.fingerprint("|".join(sorted(conn.credentials.values()))) if conn.credentials else None


class Source:
    """One connection's provider side: authenticate, page through invoices, map and classify each record."""

    def __init__(self, conn: Connection, clients: Clients, store=None):
        self.conn = conn
        self.spec = conn.spec
        self.stream = conn.spec.invoices
        self.clients = clients
        self.store = store
        self.account_id: str | None = None
        self.account_name: str | None = None
        self.accounts: list[dict] = []  # companies/organizations the credential can see (choose)
        self._detail_cache: dict[tuple, Any] = {}
        self.document_links: dict[str, str] = {}  # invoice id -> its document's link, from this run's pages
        saved = store.connection(conn.name) if store is not None else {"data": {}}
        self.saved = saved
        self.options = dict(conn.options)
        self._ctx_base = {"secrets": dict(conn.credentials), "options": self.options,
                          "connection": {"name": conn.name, "account_id": conn.account_id, **(saved.get("data") or {})},
                          "environment": conn.environment, "window": conn.window.context()}
        env = self.spec.environments[conn.environment]
        # An inbound-only spec has no base URL: nothing is fetched, posted payloads are only evaluated.
        self.base_url = conn.base_url or (env.base_url.render(self._ctx_base) if env.base_url is not None else "")
        # Templates that mean the API's address (an OAuth2 URL, a request) get the connection's, its `base_url:`
        # when it sets one: a connection pointed at a mock or a proxy sends everything there.
        self._ctx_base["base_url"] = self.base_url
        rl = self.rate_limit = env.rate_limit or self.spec.rate_limit or {}
        scope = rl.get("scope")
        scope_value = self.spec.id + ":" + (credential_fingerprint(conn) or conn.name)
        if scope:
            from runner.spec.templates import Template

            scope_value = self.spec.id + ":" + Template(scope).render(self._ctx_base)
        self.http = Http(clients, self.base_url, policy=Policy.from_spec(self.spec.retry, self.spec.retry_after),
                         limiter=limiter_for(scope_value, rl), label=self.spec.name, pool=conn.name,
                         advice=self.spec.auth.advice)
        _share_budget(store, self.http)
        self.auth = None
        self.today = datetime.now(conn.window.zone).date()
        self.today_iso = self.today.isoformat()
        self._classifier: Classifier | None = None
        self._facts = False  # pagination.facts_reader, made on first use (None: the spec's paths need a full decode)
        # Whether there is a ledger with rows of this account when the connection starts (see open): only
        # then are its invoices looked up before classification. For an account it has none of, all a lookup
        # could find is what this run delivers, and delivery looks every invoice up again (under the local
        # sink's lock, or before each request).
        self.known = store is not None

    # --- context and requests --------------------------------------------------------------------------
    def context(self, **extra) -> dict:
        return {**self._ctx_base, **extra} if extra else self._ctx_base

    async def open(self) -> None:
        if self.store is not None and self.saved.get("status") == "needs_reconnect" and not self._reconnect_cleared():
            # This message is saved as last_error in turn: wrap the original cause, not an earlier wrapping of
            # it, so the saved error stays the same from run to run.
            prefix = f"the connection '{self.conn.name}' needs to be reconnected: "
            cause = self.saved.get("last_error") or ""
            while cause.startswith(prefix):
                cause = cause[len(prefix):]
            raise NeedsReconnect(prefix + (cause or "its authorization was revoked or expired"),
                                 fix=f"runner connect {self.conn.name}")
        self.auth = auth_mod.make(self.conn, self._ctx_base, self.store, self.clients)
        if hasattr(self.auth, "prepare"):  # e.g. OAuth: what the token response taught us (an API domain)
            learned = await self.auth.prepare()
            if learned and not self.conn.base_url:
                self._ctx_base["connection"].update(learned)
                base = self.spec.environments[self.conn.environment].base_url.render(self._ctx_base)
                if base != self.base_url:
                    self.base_url = base
                    self._ctx_base["base_url"] = base
                    self.http = Http(self.clients, base, policy=self.http.policy, limiter=self.http.limiter,
                                     label=self.http.label, pool=self.conn.name, advice=self.http.advice)
        await self._identify()
        if self.store is not None:
            # Ledgers from before sources were keyed by the provider's account keyed them by the connection's name.
            self.store.adopt_account(self.account_key, (f"{self.spec.id}:{self.conn.name}",
                                                        f"{self.spec.id}:{self.conn.name}:{self.conn.environment}"))
            self.known = self.store.has_ledger(self.account_key)

    def _reconnect_cleared(self) -> bool:
        """A new bootstrap refresh token in the config is worth one try before insisting on `runner connect`."""
        if self.spec.auth.type != "oauth2":
            return False
        from runner.net import oauth

        return oauth.reconnect_cleared(self.conn, self.store)

    async def send(self, method: str, path: str, *, params=None, headers=None, json=None, ok=()) -> Any:
        hdrs = {**(await self.auth.headers()), **(headers or {})}
        try:
            return await self.http.request(method, path, params=params, headers=hdrs, json=json, ok=ok)
        except AuthError as exc:
            if exc.status == 401 and await self.auth.unauthorized():
                hdrs = {**(await self.auth.headers()), **(headers or {})}
                return await self.http.request(method, path, params=params, headers=hdrs, json=json, ok=ok)
            raise

    async def send_spec(self, req_spec, ctx: dict, extra_params: dict | None = None, url: str | None = None, ok=()):
        req = req_spec.render(ctx, extra_params)
        return await self.send(req["method"], url or req["path"], params=None if url else (req["params"] or None),
                               headers=req["headers"] or None, json=req["json"], ok=ok)

    async def _identify(self) -> None:
        """Which account of the provider this connection reads: the ledger's key for its invoices."""
        acc = self.spec.account
        if "request" in acc:
            refused = acc.get("refused")
            resp = await self.send_spec(acc["request"], self.context(), ok=tuple(refused["status"]) if refused else ())
            body = resp.json(f"{self.spec.name}'s account answer")
            if refused and resp.status in refused["status"]:
                # e.g. a restricted key that may read invoices but not the account: the refusal may still name it
                view = {"response": body, "status": resp.status}
                self.account_id, self.account_name = _text(refused.get("id"), view), _text(refused.get("name"), view)
            else:
                view = {"response": body, "connection": self.context()["connection"], "options": self.options}
                if "choose" in acc:
                    self._choose(acc["choose"], view["response"])
                    view["options"] = self.options
                self.account_id = _text(acc.get("id"), view)
                self.account_name = _text(acc.get("name"), view)
                if acc.get("name") is None and "choose" in acc:  # the chosen entry's name
                    chosen = str(self.options.get(acc["choose"].get("option")))
                    self.account_name = next((a["name"] for a in self.accounts if a["id"] == chosen), None)
        else:
            if acc.get("id") is not None:
                self.account_id = acc["id"].render(self.context()) or None
            if acc.get("name") is not None:
                self.account_name = acc["name"].render(self.context()) or None
        # `expect:` pins what the provider says it is connected to, so compare before a configured
        # `account_id:` (the user's own stable name for the source) replaces it. Never the connection's name:
        # renaming a connection must not make its invoices new.
        reported = self.account_id
        if not acc.get("from_config"):
            self.account_id = self.conn.account_id or reported
        if self.account_id is None:
            raise AccountMismatch(
                f"{self.spec.name} did not say which account '{self.conn.name}' is connected to, and the ledger keys "
                f"every invoice by its account; nothing was imported from it",
                fix=f"set `account_id:` on the connection '{self.conn.name}' to the provider's account id (or another "
                    f"stable name for this source)")
        exp = self.conn.expect
        if exp.get("account_id") and exp["account_id"] != (reported or self.account_id) or (
                exp.get("account_name") and exp["account_name"] != self.account_name):
            want = " / ".join(x for x in (exp.get("account_id"), exp.get("account_name")) if x)
            got = " / ".join(x for x in (reported, self.account_name) if x) or "an account it does not name"
            fix = (f"run `runner connect {self.conn.name}` and choose {want!r}" if self.spec.auth.type == "oauth2" else
                   f"use credentials of the account {want!r} for '{self.conn.name}'")
            raise AccountMismatch(
                f"'{self.conn.name}' is connected to {self.spec.name} account {got!r}, but the config expects {want!r}; "
                f"nothing was imported from it", fix=f"{fix}, or change `expect:` if the connected account is the right one")

    def _choose(self, choose: dict, body: Any) -> None:
        items = choose["list"].search(body) or []
        self.accounts = [{"id": str(choose["id"].search(i)), "name": choose["name"].search(i)} for i in items]
        option = choose.get("option")
        pinned = self.options.get(option) if option else None
        listing = "; ".join(f"{a['id']} ({a['name']})" for a in self.accounts) or "none"
        if pinned:
            if not any(a["id"] == str(pinned) for a in self.accounts):
                raise AccountMismatch(
                    f"'{self.conn.name}' pins {option} {pinned}, which this authorization cannot see; it can see: {listing}",
                    fix=f"set options: {{{option}: ...}} to one of those, or run `runner connect {self.conn.name}` as a "
                        f"user with access to {pinned}")
            return
        if len(self.accounts) == 1:
            self.options[option] = self.accounts[0]["id"]
            return
        if not self.accounts:
            raise AccountMismatch(f"the authorization for '{self.conn.name}' cannot see any account to import from")
        lines = "\n".join(f"      options: {{{option}: \"{a['id']}\"}}   # {a['name']}" for a in self.accounts)
        raise AccountMismatch(
            f"'{self.conn.name}' can see {len(self.accounts)} accounts and the config pins none, so the runner will not "
            f"guess (taking the first one silently is how invoices go missing): {listing}",
            fix=f"add one of these lines to the connection '{self.conn.name}' in the config:\n{lines}")

    @property
    def account_key(self) -> str:
        return f"{self.spec.id}:{self.account_id}"

    # --- pages -----------------------------------------------------------------------------------------
    def _server_params(self) -> dict:
        if not self.conn.server_filters:
            return {}
        params = {}
        for kind in ("status", "window"):
            params.update(self.stream.server_filters.get(kind, {}))
        return params

    def partitions(self) -> list[dict | None]:
        """The sub-windows (template `window` values) the spec's `partition` asks for; [None] for one fetch.

        Boundaries are whole seconds and each sub-window ends one second before the next starts, so
        inclusive bounds (created[gte] / created[lte]) never return an invoice twice."""
        part = self.stream.partition
        if not part or not self.conn.server_filters or "window" not in self.stream.server_filters:
            return [None]
        rl = self.rate_limit
        w = self.conn.window
        first, last = math.ceil(w.start.timestamp()), int(w.end.timestamp())
        span = last - first
        n = min(part.get("parts") or rl.get("concurrency") or 4, max(1, span // part.get("min_seconds", 3600)))
        if n <= 1:
            return [None]
        zone = w.zone
        cuts = [first + span * i // n for i in range(n + 1)]
        out = []
        for i in range(n):
            start = w.start if i == 0 else datetime.fromtimestamp(cuts[i], zone)
            end = w.end if i == n - 1 else datetime.fromtimestamp(cuts[i + 1] - 1, zone)
            out.append({"start": start, "end": end, "start_date": start.astimezone(zone).date().isoformat(),
                        "end_date": end.astimezone(zone).date().isoformat(), "timezone": w.tz})
        return out

    async def pages(self) -> AsyncIterator[list]:
        """Every page's records, in the order fetched (see `pages_with_answers`)."""
        async for records, _, _, _ in self.pages_with_answers():
            yield records

    async def pages_with_answers(self, hand_over: Callable | None = None) -> AsyncIterator[tuple]:
        """(records, the answer's bytes, None, more) for every page; the bytes are None when the records were
        enriched after the answer (detail lookups), so the answer alone no longer holds them; `more`: another
        page follows (always true with several sub-windows).

        `hand_over(answer bytes, record count, more)`, when given, may take an answer undecoded
        (Workers.take): the engine then reads only what its paginator needs from the bytes
        (pagination.facts_reader), and the page comes as (None, the answer's bytes, a future of its
        classification, more). It returns None for a page it does not take, which is decoded here."""
        windows = self.partitions()
        if len(windows) == 1:
            async for page in self._pages_in(None, hand_over):
                yield page
            return
        # Sub-windows fetched at once (the limiter keeps them within the rate limit); pages are handed over
        # through a small queue, so memory stays flat while processing overlaps the next requests.
        queue: asyncio.Queue = asyncio.Queue(maxsize=len(windows))
        done = object()
        held: list[tuple] = []  # pages a sub-window had fetched when it was stopped, not yet queued

        async def produce(window: dict) -> None:
            page = None
            try:
                async for records, answer, classified, _ in self._pages_in(window, hand_over):
                    page = (records, answer, classified, True)
                    await queue.put(page)
                    page = None
                await queue.put(done)
            except asyncio.CancelledError:
                if page is not None:
                    held.append(page)
                raise
            except Exception as exc:
                await queue.put(exc)

        tasks = [asyncio.create_task(produce(w)) for w in windows]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is done:
                    left -= 1
                elif isinstance(item, BaseException):
                    # One sub-window failed: the others stop fetching, and the pages they had fetched are
                    # finished before the failure is raised, like the pages before a failure in one window. A
                    # worker may have such a page already, and delivers and records it whatever happens:
                    # dropped here, it would be missing from the run's summary.
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    while not queue.empty():
                        page = queue.get_nowait()
                        if page is not done and not isinstance(page, BaseException):
                            yield page
                    for page in held:
                        yield page
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pages_in(self, window: dict | None, hand_over: Callable | None = None) -> AsyncIterator[tuple]:
        pag = pagination.paginator(self.stream.paginate)
        if self.stream.details:
            hand_over = None  # the engine enriches the records: it decodes every page
        step = pag.first()
        extra = self._server_params()
        count = 0
        while True:
            count += 1
            if count > self.stream.paginate.max_pages:
                raise ProviderError(f"stopped after {count - 1} pages (max_pages in the spec)",
                                    fix="raise paginate.max_pages in the spec if the account really has this many")
            ctx = self.context(page=step.page) if window is None else self.context(page=step.page, window=window)
            resp = await self.send_spec(self.stream.request, ctx, {**extra, **step.params}, url=step.url)
            records, facts = None, None
            if hand_over is not None and self._facts_reader() is not None:
                try:
                    facts = self._facts(resp.content)
                except Exception:  # noqa: BLE001 - decoded in full below, which says what is wrong with it
                    pass
            if facts is None:
                records = self.page_records(resp)
                facts = pagination.facts(self.stream.paginate, resp.json(), records)
            # The next page is known before this one is handed on, so a first page followed by others can go
            # to the worker; a paginator that refuses to go on (a link off the host, say) does so after it.
            try:
                step, refused = pag.next(facts, resp.content), None
            except Exception as exc:  # noqa: BLE001 - raised below, once this page is on its way
                if pagination.repeats_a_page(exc):  # a page fetched before, again: not handed on a second time
                    raise
                step, refused = None, exc
            if step is not None and step.url and not is_link(step.url):
                # A relative next-page link ("?page=2", "/v3/invoices?page=2") is relative to this page's URL,
                # as a browser reads it, not to the base URL; the result is then held to the base URL (Http.url).
                step.url = urljoin(resp.url, step.url)
            classified = None
            if records is None:
                classified = hand_over(resp.content, facts.count, step is not None)
                if classified is None:  # not taken: the engine classifies it
                    records = self.page_records(resp)
            if self.stream.details:
                await self.enrich(records)
                yield records, None, None, step is not None  # enriched: the answer alone no longer holds them
            else:
                yield records, resp.content, classified, step is not None
            if refused is not None:
                raise refused
            if step is None:
                return

    def _facts_reader(self):
        if self._facts is False:
            self._facts = pagination.facts_reader(self.stream)
        return self._facts

    def page_records(self, answer) -> list:
        """The invoices of a list answer (the Response, or its bytes as a worker was given them), or a
        ProviderError that says in plain words what is wrong with it."""
        what = f"{self.spec.name}'s invoice list"
        body = parse_json(answer, "", what) if isinstance(answer, (bytes, bytearray)) else answer.json(what)
        try:
            return self.stream.page_records(body)
        except TypeError as exc:
            raise ProviderError(f"{self.spec.name}'s invoice list has {exc} where a list of "
                                f"invoices was expected (at '{self.stream.records.source}')") from None
        except PageTooLarge as exc:
            raise ProviderError(f"{self.spec.name} sent a page of {exc.args[0]} invoices, more than the "
                                f"{self.stream.max_page_size} the spec allows; refusing it") from None

    async def enrich(self, records: list, details: list | None = None) -> None:
        """Per-record detail lookups (e.g. the customer's address), each distinct key fetched once per run.
        `details`: others than the stream's (a change feed's, runner/engine/incremental.py)."""
        for d in self.stream.details if details is None else details:
            todo: dict[tuple, list] = {}
            for rec in records:
                if not isinstance(rec, dict) or (d.when is not None and not _truthy(d.when.search(rec))):
                    continue
                key = (d.name, d.key.render(self.context(record=rec)))
                if key in self._detail_cache:
                    rec[d.name] = self._detail_cache[key]
                else:
                    todo.setdefault(key, []).append(rec)

            async def fetch(key, recs):
                resp = await self.send_spec(d.request, self.context(record=recs[0]), ok=(404,))
                value = None if resp.status == 404 else resp.json(f"{self.spec.name}'s {d.name} answer")
                if value is not None and d.select is not None:
                    value = d.select.search(value)
                self._detail_cache[key] = value
                for r in recs:
                    r[d.name] = value

            await asyncio.gather(*(fetch(k, v) for k, v in todo.items()))

    # --- classification (runner/engine/classify.py) ---------------------------------------------------------
    def classifier(self) -> Classifier:
        c = self._classifier
        if c is None or c.account_id != self.account_id:
            c = self._classifier = Classifier(self.conn, self.account_id, self.today)
        return c

    def evaluate(self, rec: Any) -> Verdict:
        return self.classifier().evaluate(rec)

    def record_date(self, rec: Any, inv: dict | None = None):
        return self.classifier().record_date(rec, inv)

    def window_position(self, rec: Any) -> str | None:
        return self.classifier().window_position(rec)



# --- the run ---------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    run_id: int | None
    mode: str  # plan | apply
    destination: str
    connections: list[ConnectionResult]
    started: float
    finished: float
    destination_error: str | None = None
    inbound: list[str] = field(default_factory=list)  # connections that receive pushes (`runner serve`)
    interrupted: str | None = None  # the stop signal that ended the run early ("SIGTERM"), see StopRequest

    @property
    def ok(self) -> bool:
        return not self.destination_error and not self.interrupted and all(
            c.status == "ok" and not c.failed for c in self.connections)

    def totals(self) -> dict:
        c = Counter()
        for r in self.connections:
            c.update(r.counts)
        return {"seen": sum(r.seen for r in self.connections), "imported": c.get(IMPORTED, 0),
                "skipped": {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("skipped:")},
                "failed": c.get(FAILED, 0),
                "connections_failed": sum(1 for r in self.connections if r.status not in ("ok", "interrupted"))}

    def as_dict(self, samples: bool = True) -> dict:
        return {"mode": self.mode, "run_id": self.run_id, "destination": self.destination, "ok": self.ok,
                "destination_error": self.destination_error, "interrupted": self.interrupted, "totals": self.totals(),
                "seconds": round(self.finished - self.started, 3), "inbound_connections": self.inbound,
                "connections": [c.as_dict(samples) for c in self.connections]}

    def stored(self) -> dict:
        """The run's summary as the state store keeps it: without the examples of each reason, which repeat
        the run's verdict rows (what explain, status and support bundles read) and were 85 % of it (170 KB
        for a run of 50 connections: a run every five minutes grew the store by 50 MB a day)."""
        return self.as_dict(samples=False)


# Pages fetched ahead of the one being delivered, for the whole run: each worker always has a next page
# waiting, and with many connections each keeps fewer (one at least). So do the syncs of a `runner worker`,
# which share its classification workers (sync's `peers`).
PAGES_AHEAD = 8
# Pages fetched and not finished yet (classified, delivered, recorded), all connections together. Enough for
# the requests in flight to keep every worker busy (a page is ~3 ms of a worker, a request 50-150 ms); it
# is what keeps memory flat with hundreds of connections, each of which would otherwise hold a page or two
# (500 connections held 350 MiB of pages waiting for the workers).
PAGES_IN_FLIGHT = 64


class StopRequest:
    """A stop signal (SIGTERM, Ctrl-C) received during a run (set by cli.run): each connection stops fetching,
    the pages it has are finished (delivered, recorded), and the run ends with its summary. A second signal
    cancels the run at once (what was committed stays)."""

    def __init__(self):
        self.event = asyncio.Event()
        self.why: str | None = None  # the signal's name

    def set(self, why: str) -> None:
        self.why = self.why or why
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


class Stopped(Exception):
    """A connection stopped fetching because the run was asked to stop (StopRequest)."""


async def _unless_stopped(stop: StopRequest | None, awaitable):
    """Await `awaitable` (a coroutine), or raise Stopped when a stop is requested first; a request or a
    backoff wait still going on is cancelled: a provider that answers slowly must not hold the stop."""
    if stop is None:
        return await awaitable
    if stop.is_set():
        awaitable.close()
        raise Stopped
    task = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(stop.event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise Stopped
    return task.result()


class _RunState:
    def __init__(self, stop: StopRequest | None = None):
        self.stop = stop
        self.allow: Callable | None = None  # see sync(allow=)
        self.pages = asyncio.Semaphore(PAGES_IN_FLIGHT)  # see PAGES_IN_FLIGHT
        self.fatal: DestinationError | None = None
        self.sink_marked = False  # this run has marked its local sink (see Store.mark_sink)
        self.unrecorded = 0  # pages written to the local sink whose ledger rows are not committed yet
        # The commit of the last page the engine wrote to a local sink (in the ledger thread): any connection's
        # next page waits for it before its lookup, or two connections of one account would both write an
        # invoice that both windows hold.
        self.sink_recording: asyncio.Future | None = None

    async def sink_recorded(self) -> None:
        """Until no page written to the local sink by the engine waits for its commit."""
        while self.sink_recording is not None and not self.sink_recording.done():
            await asyncio.wait([self.sink_recording])  # its error is its own connection's to report

    def mark_sink(self, store, destination, run_id: int | None) -> None:
        """A local sink is written without a pending row per invoice: the file's length is marked once, before
        the run's first write (the engine's or the worker's), so a crash before the pages are recorded is
        repaired by the next run."""
        if not self.sink_marked:
            store.mark_sink(destination.length(), run_id)
            self.sink_marked = True

    def before_local_write(self, store, destination, run_id: int | None) -> None:
        self.mark_sink(store, destination, run_id)
        self.unrecorded += 1


def _recover_local_sink(store, destination, *, clear: bool = True) -> None:
    """A run that stopped (killed, power cut) after writing cases to a local file and before recording them
    left its mark: record what the file holds past it, so nothing there is written twice. Mid-run (`clear`
    false: the run goes on writing under its mark), for pages the classification worker wrote and could not
    record; the engine's own handle is reopened, so a line the worker left torn is ended before the next."""
    if not clear:
        destination.reopen()
    if getattr(store, "remote", False):  # other runs may be writing it: see runner/engine/localsink.py
        localsink.repair_shared(store, destination)
        return
    mark = store.sink_mark()
    if mark is None:
        return
    offset, run_id = mark  # what the file holds past the mark was written, and so imported, by that run
    rows, n = [], 0
    for row in destination.recover(offset):
        rows.append(row)
        if len(rows) == 1000:
            store.record_imported(rows, run_id)
            n, rows = n + len(rows), []
    if rows:
        store.record_imported(rows, run_id)
        n += len(rows)
    if not clear:
        logger.debug("{} case(s) the worker wrote to {} are now in the ledger", n, destination.describe())
        return
    store.clear_sink_mark()
    logger.info("the last run stopped while writing {}: the {} case(s) it wrote after its last record are now in "
                "the ledger", destination.describe(), n)


async def _deliver_page(source: Source, result: ConnectionResult, eligible: list[Verdict], store, destination,
                        run: _RunState, sem: asyncio.Semaphore, deferred: list | None = None,
                        writer: ThreadPoolExecutor | None = None, run_id: int | None = None,
                        own: tuple[int, str] | None = None) -> None:
    """Dedupe against the ledger and deliver. With `deferred`, a local sink's page is written without pending
    rows (the run's mark covers it) and its ledger rows are left there for the caller to record with the
    page's verdicts."""
    if (run_id is not None and getattr(store, "remote", False) and hasattr(destination, "write_many")
            and run.fatal is None):  # an apply's, a worker's and `runner serve`'s pages alike
        # Other runs may write the same file at this moment: recorded and written in a turn at it (localsink)
        run.mark_sink(store, destination, run_id)
        await asyncio.to_thread(localsink.write_shared, store, destination, source.conn.name, source.account_key,
                                run_id, eligible, own)
        for v in eligible:
            if v.verdict == IMPORTED and v.link:
                source.document_links[v.invoice_id] = v.link
        return
    # Looked up again, not taken from the lookup before classifying: the page before this one may have delivered
    # the same invoice since (offset paging shifts under changes).
    # A server's store waits for its answer off the event loop: a `runner worker`'s syncs all share it.
    ledger = (await state.off_loop(store, store.ledger_lookup, source.account_key, [v.invoice_id for v in eligible])
              if store else {})
    to_send = to_deliver(eligible, ledger, source.account_key, own)
    if destination is None:  # plan: say what would happen, touch nothing
        for v, _ in to_send:
            v.verdict = IMPORTED
            v.message = "would be imported" + (" (retrying an unfinished delivery)" if ledger.get(v.invoice_id) else "")
        return
    if not to_send:
        return
    if run.fatal is not None:
        for v, _ in to_send:
            v.verdict, v.reason, v.message = FAILED, "destination_unavailable", run.fatal.message
        return
    local = hasattr(destination, "write_many")  # a local sink (a file)
    if local and deferred is not None:
        run.before_local_write(store, destination, run_id)
    else:
        # Exactly once: pending (with its key) is committed before the call, delivered after it.
        pending = [(source.account_key, v.invoice_id, source.conn.name, v.number, k) for v, k in to_send]
        if writer is not None:  # committed without holding the event loop (other pages go on meanwhile)
            await asyncio.get_running_loop().run_in_executor(writer, store.mark_pending, pending)
        else:
            store.mark_pending(pending)
    if hasattr(destination, "prepare") and any(ledger.get(v.invoice_id) for v, _ in to_send):
        destination.prepare({k for v, k in to_send if ledger.get(v.invoice_id)})

    # Deliveries are recorded as soon as they are known (a crash later in this page must not make the next run
    # re-send, and re-spend rate limit on, what was already delivered), in one transaction per event-loop turn:
    # every delivery that finished in the same turn shares the commit, which runs before the loop waits again.
    batch: list[tuple] = []
    commit_error: list[BaseException] = []

    def commit() -> None:
        if not batch:
            return
        rows = batch[:]
        batch.clear()
        try:
            if hasattr(destination, "flush"):
                destination.flush()
            # A case the destination already had (found by reference, or an idempotency replay of an earlier
            # run's) was not made by this run: its verdict here is the duplicate one, not the ledger's.
            store.mark_delivered([r[:4] for r in rows if not r[4]], run_id)
            store.mark_delivered([r[:4] for r in rows if r[4]], None)
        except BaseException as exc:  # raised after the gather below, as it would have been in place
            commit_error.append(exc)

    loop = asyncio.get_running_loop()

    async def one(v: Verdict, key: str):
        if run.fatal is not None:
            return v, None, run.fatal
        async with sem:
            try:
                delivery = await destination.deliver(v.invoice, key)
                if delivery.replayed and not _own_pending(ledger.get(v.invoice_id)):
                    # Made by an earlier request that this ledger never sent (another state store's run): a
                    # duplicate here. A pending row of ours is this ledger's own unfinished delivery: imported.
                    delivery.existing = True
                if not batch:
                    loop.call_soon(commit)
                batch.append((source.account_key, v.invoice_id, delivery.case_id, delivery.case_reference,
                              delivery.existing))
                return v, delivery, None
            except DestinationError as exc:
                if exc.fatal:
                    run.fatal = exc
                return v, None, exc
            except RunnerError as exc:
                return v, None, exc

    failed = []
    if local:  # the page in one write, flushed, then recorded
        deliveries = destination.write_many([(v.invoice, k, v.payload) for v, k in to_send])
        destination.flush()
        outcomes = [(v, d, None) for (v, _), d in zip(to_send, deliveries)]
        if deferred is not None:  # recorded by the caller, in one transaction with the page's verdicts
            deferred.extend((source.account_key, v.invoice_id, source.conn.name, v.number, k, d.case_id,
                             d.case_reference) for (v, k), d in zip(to_send, deliveries))
        else:
            batch[:] = [(source.account_key, v.invoice_id, d.case_id, d.case_reference, d.existing)
                        for (v, _), d in zip(to_send, deliveries)]
    else:
        outcomes = await asyncio.gather(*(one(v, k) for v, k in to_send))
    commit()
    if commit_error:
        raise commit_error[0]
    for v, delivery, err in outcomes:
        if err is not None:
            v.verdict, v.reason, v.message = FAILED, "delivery_failed", err.message
            if err.fix:
                v.detail = {"fix": err.fix}
            failed.append((source.account_key, v.invoice_id, err.message))
            continue
        delivered(v, delivery)
        if v.link:  # the document phase fetches it without looking the invoice up again (engine/documents.py)
            source.document_links[v.invoice_id] = v.link
    if failed:
        store.mark_failed(failed)


async def sync_connection(conn: Connection, *, clients: Clients, store, destination, run_id: int | None,
                          run: _RunState, details: bool = False, progress: Callable | None = None,
                          sem: asyncio.Semaphore | None = None, workers: Workers | None = None,
                          writer: ThreadPoolExecutor | None = None, connections: int = 1,
                          full: bool = False) -> ConnectionResult:
    started = time.monotonic()
    result = ConnectionResult(name=conn.name, integration=conn.integration, environment=conn.environment,
                              window=conn.window.as_dict(), window_text=conn.window.describe())
    source = None
    sem = sem or asyncio.Semaphore(8)
    try:
        source = Source(conn, clients, store)
        await _unless_stopped(run.stop, source.open())
        result.account_id, result.account_name = source.account_id, source.account_name
        scan = result.scan = incremental.decide(source, store, full=full)

        recording: asyncio.Future | None = None
        recording_writes = False  # the page being recorded was written to a local sink
        local_sink = destination is not None and hasattr(destination, "write_many")

        async def recorded() -> None:
            nonlocal recording
            if recording is not None:
                r, recording = recording, None
                await r
                if recording_writes:
                    run.unrecorded -= 1

        async def finish(verdicts: list[Verdict], counted: Tally | None, again: bool = False) -> None:
            """Deliver the eligible, count and record the verdicts (those the worker has not recorded). `again`:
            a page the worker may have recorded (and delivered) before it died, classified by the engine."""
            nonlocal recording, recording_writes
            eligible = [v for v in verdicts if v.verdict == ELIGIBLE]
            if run.allow is not None and eligible:  # applying a saved plan: only what it holds, unchanged
                eligible = _allowed(run.allow, conn.name, eligible)
            written: list[tuple] = []
            again = again and run_id is not None and destination is not None  # only an apply records pages
            await recorded()  # the page before is in the ledger before this page is looked up in it
            if eligible and local_sink:
                await run.sink_recorded()  # and so is every other connection's page written before it
            if eligible:
                await _deliver_page(source, result, eligible, store, destination, run, sem, written, writer, run_id,
                                    own=(run_id, conn.name) if again else None)
            _count(result, verdicts, details)
            if counted is not None:
                merge(result, counted)
            rows = verdict_rows(conn.name, source.account_key, verdicts) if (
                run_id is not None and destination is not None) else []
            replacing = (conn.name, source.account_key, [v.invoice_id for v in verdicts]) if again else None
            if store is not None and (rows or written or replacing):
                if writer is not None:  # SQLite works without the GIL: the next page is fetched meanwhile
                    recording = asyncio.get_running_loop().run_in_executor(writer, store.record_page, run_id, rows,
                                                                           written, replacing)
                    recording_writes = bool(written)
                    if written:
                        run.sink_recording = recording
                else:
                    store.record_page(run_id, rows, written, replacing)
                    if written:
                        run.unrecorded -= 1
            if progress:
                progress(conn.name, result)
            if run.fatal is not None:
                raise run.fatal

        # Pages in flight: while a page is classified (by the worker, when there is one), the engine fetches
        # the next ones, up to PAGES_AHEAD; each page is then delivered and recorded by a task of its own that
        # first waits for the page before it, so pages are finished in order, one at a time.
        inflight: collections.deque[asyncio.Future] = collections.deque()

        async def finish_page(classified, before: asyncio.Future | None) -> None:
            if before is not None:
                await before  # raises what the page before raised: no page after a failed one is finished
            await finish(*(await classified if isinstance(classified, asyncio.Future) else classified))

        # The worker records the verdicts that end with it (skipped ones) itself, unless every verdict is kept.
        recording_run = run_id if destination is not None and not details else None
        ahead = max(1, PAGES_AHEAD // (connections or 1))
        page = fetched = 0

        # A local sink with the verdicts recorded by the worker: it delivers and records its pages itself
        # (runner/engine/workers.py), under the run's mark of the sink, and sends back only each page's Tally.
        deliver = (functools.partial(run.mark_sink, store, destination, run_id)
                   if recording_run is not None and store is not None and hasattr(destination, "write_many") else None)

        def hand_over(answer: bytes, count: int, more: bool):
            nonlocal fetched
            fetched += 1
            return workers.take(source, store, answer, count, fetched, more, recording_run, deliver)

        pages = incremental.pages(source, scan, hand_over if workers else None)
        try:
            while True:
                await run.pages.acquire()  # a page of the run's PAGES_IN_FLIGHT, given back when it is finished
                try:
                    records, answer, classified, more = await _unless_stopped(run.stop, _next(pages))
                except StopAsyncIteration:  # the last page was fetched before
                    run.pages.release()
                    break
                except BaseException:
                    run.pages.release()
                    raise
                page += 1
                try:
                    # Looked up in the ledger and classified, by the worker when there is one (runner/engine/workers.py)
                    if classified is None:
                        classified = (workers.classify(source, store, records, answer, page, recording_run, deliver,
                                                       more)
                                      if workers else (Workers.here(source, store, records), None))
                    finishing = asyncio.ensure_future(finish_page(classified, inflight[-1] if inflight else None))
                except BaseException:
                    run.pages.release()
                    raise
                finishing.add_done_callback(lambda _: run.pages.release())
                inflight.append(finishing)
                while inflight and (len(inflight) > ahead or inflight[0].done()):
                    await inflight.popleft()  # a failure surfaces here, before more is fetched
        finally:
            await pages.aclose()
            try:  # a page fetched before a failure is still delivered and recorded
                first: BaseException | None = None
                while inflight:
                    try:
                        await inflight.popleft()
                    except BaseException as exc:  # the pages after it raise it again: report it once
                        first = first or exc
                if first is not None:
                    raise first
            finally:
                await recorded()  # whatever happened, what was delivered is recorded before the connection ends
        if destination is not None and store is not None:  # every page is recorded: the next run starts here
            incremental.commit(store, source, scan, failed=bool(result.failed))
        if store is not None and (conn.spec.recheck is not None or conn.spec.document is not None):
            from runner.engine import lifecycle  # after the cases: documents, re-checks at the source

            synced = source.http.requests
            result.after_case = await _unless_stopped(run.stop, lifecycle.after_run(
                source, store, destination, run_id, destination_down=run.fatal is not None, scan=scan))
            source.http.requests = synced  # `requests` are the sync's; after_case counts its own
    except Stopped:
        result.status = "interrupted"
        result.error = (f"the run was stopped ({run.stop.why}) before this connection finished; every page it had "
                        f"fetched was finished and recorded")
        result.fix = "run the same command again to continue"
    except NeedsReconnect as exc:
        result.status, result.error, result.fix = "needs_reconnect", exc.message, exc.fix or f"runner connect {conn.name}"
    except (RunnerError, UnsafeRequest) as exc:
        result.status, result.error, result.fix = "failed", exc.message, exc.fix
    except Exception as exc:  # never lose what was done because of an unexpected error: record it and go on
        # The summary carries the message; the traceback is for a developer (-vv), never for the person reading.
        logger.opt(exception=exc).debug("unexpected error in connection {}", conn.name)
        result.status, result.error = "failed", failure_words(exc)
    result.requests = source.http.requests if source is not None else 0
    result.seconds = time.monotonic() - started
    if source is not None and source.http.limiter is not None:
        result.rate_limit = source.http.limiter.rate
    if result.status == "ok" and result.seen and source.account_id:
        result.account_id = source.account_id
    if store is not None and destination is not None and result.status != "interrupted":  # not the connection's fault
        _record_health(store, conn, source, result, run_id)
    return result


async def _next(pages: AsyncIterator):
    """The next page, as a coroutine (for _unless_stopped)."""
    return await pages.__anext__()


def _allowed(allow: Callable, connection: str, eligible: list[Verdict]) -> list[Verdict]:
    """The eligible invoices `allow(connection, verdict)` lets through (it returns None); each other one is
    skipped with the reason and words it returns ((reason, message))."""
    out = []
    for v in eligible:
        refused = allow(connection, v)
        if refused is None:
            out.append(v)
        else:
            v.verdict, (v.reason, v.message) = SKIPPED, refused
    return out


def _record_unfinished(store, run_id: int, mode: str, started: float, exc: BaseException) -> None:
    if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
        why = "interrupted (Ctrl-C or a stop signal); everything committed so far is kept"
    else:
        why = failure_words(exc)
    try:
        store.finish_run(run_id, "failed", {"run_id": run_id, "mode": mode, "started": started,
                                            "finished": time.time(), "error": why})
    except Exception as inner:  # noqa: BLE001 - the original error is the one to report
        logger.opt(exception=inner).debug("could not record the end of run {}", run_id)


def _count(result: ConnectionResult, verdicts: list[Verdict], details: bool) -> None:
    tally(result, verdicts)
    if details:
        result.verdicts.extend(verdicts)


def _record_health(store, conn: Connection, source: Source, result: ConnectionResult, run_id) -> None:
    fields: dict = {"integration": conn.integration, "last_run_id": run_id}
    if source is not None and source.account_id:
        fields["account_id"] = source.account_id
    if source is not None and source.account_name:
        fields["account_name"] = source.account_name
    if conn.credentials:
        fields["credential_fingerprint"] = credential_fingerprint(conn)
    if result.status == "ok":
        fields["last_success"] = time.time()
    else:
        fields["last_error"] = result.error
        fields["last_error_at"] = time.time()
        if result.status == "needs_reconnect":
            fields["status"] = "needs_reconnect"
    store.update_connection(conn.name, **fields)


_collecting = {"runs": 0, "old": None}  # the runs inside _few_collections, and the thresholds before the first
_collecting_lock = threading.Lock()


@contextlib.contextmanager
def _few_collections():
    """A sync allocates millions of short-lived objects without cycles (parsed pages, mapped invoices). With
    the cyclic collector's defaults (a pass every 700 allocations, and full passes over every live object)
    parsing JSON cost twice as much with fifty connections in flight. The objects that exist before the
    run (config, compiled specs, modules) are frozen out of collection; collections are rarer meanwhile.
    Runs side by side (a `runner worker`'s syncs) share one such stretch, from the first run's start to the
    last one's end: the first sync to end gave the defaults back to the fifteen still running."""
    with _collecting_lock:
        if _collecting["runs"] == 0:
            _collecting["old"] = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(50_000, 20, 20)
        _collecting["runs"] += 1
    try:
        yield
    finally:
        with _collecting_lock:
            _collecting["runs"] -= 1
            if _collecting["runs"] == 0:
                gc.set_threshold(*_collecting["old"])
                gc.unfreeze()


async def _logged(coro, **context):
    """Run a connection's sync with its name and the run's id on every log line it writes (--log-format json)."""
    with logger.contextualize(**context):
        return await coro


async def sync(cfg: Config, *, mode: str, store, connections: list[Connection] | None = None, details: bool = False,
               progress: Callable | None = None, command: str | None = None,
               stop: StopRequest | None = None, allow: Callable | None = None, full: bool = False,
               workers: Workers | None = None, peers: int = 1) -> RunResult:
    """Run every (enabled) connection concurrently. mode 'plan' creates nothing; 'apply' delivers. `stop`: set
    by a stop signal, ends the run early with every page fetched finished (RunResult.interrupted). `allow`
    (connection name, eligible Verdict) -> None to deliver it, or (reason, message) to skip it: applying a
    saved plan (runner/engine/plan.py); it needs details=True (the engine, not a worker, then delivers).
    `full`: read the whole window even where a change feed would do (runner/engine/incremental.py).
    `workers`: classification workers the caller keeps across runs (a `runner worker`'s, shared by its
    syncs; runner/engine/workers.py), else the run forks its own. `peers`: the runs this process runs beside
    this one on the same workers (a worker's --concurrency): each connection then keeps fewer pages ahead."""
    with _few_collections():
        return await _sync(cfg, mode=mode, store=store, connections=connections, details=details, progress=progress,
                           command=command, stop=stop, allow=allow, full=full, workers=workers, peers=peers)


async def _sync(cfg: Config, *, mode: str, store, connections: list[Connection] | None, details: bool,
                progress: Callable | None, command: str | None, stop: StopRequest | None = None,
                allow: Callable | None = None, full: bool = False, workers: Workers | None = None,
                peers: int = 1) -> RunResult:
    from runner.engine import destinations

    started = time.time()
    chosen = [c for c in (connections or cfg.connections) if c.enabled]
    conns = [c for c in chosen if c.spec.pull]
    inbound = [c.name for c in chosen if not c.spec.pull]  # they receive invoices through `runner serve`
    clients = Clients(sandbox_dir=cfg.state_path.parent / "sandbox")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-ledger")  # see sync_connection
    run = _RunState(stop)
    run.allow = allow
    dest = destinations.make(cfg.destination, clients)
    if store is not None:
        store.destination = destinations.ledger_id(cfg.destination)
        _share_budget(store, getattr(dest, "http", None))
    pool = workers or Workers(conns, dest if mode == "apply" else None, store,
                              recover=(lambda: _recover_local_sink(store, dest, clear=False))
                              if hasattr(dest, "recover") else None)
    run_id = None
    dest_error = None
    try:
        if mode == "apply":
            if hasattr(dest, "recover"):
                _recover_local_sink(store, dest)
            run_id = store.begin_run(command or "apply", str(cfg.file))
            try:
                await _unless_stopped(stop, dest.check())
            except Stopped:  # every connection then stops before its first request
                pass
            except DestinationError as exc:
                # A refused key or an unreachable destination stops every delivery; anything else is only
                # reported, and each delivery then succeeds or fails on its own.
                if exc.fatal or exc.status is None or exc.status >= 500:
                    run.fatal = exc
                dest_error = exc.render()
        sem = asyncio.Semaphore(max(1, getattr(cfg.destination, "concurrency", 8)))
        results = await asyncio.gather(*(
            _logged(sync_connection(c, clients=clients, store=store, destination=dest if mode == "apply" else None,
                                    run_id=run_id, run=run, details=details, progress=progress, sem=sem,
                                    workers=pool, writer=writer, connections=len(conns) * max(1, peers),
                                    full=full),
                    connection=c.name, run_id=run_id)
            for c in conns))
    except BaseException as exc:
        if run_id is not None:  # never leave the run's row 'running': say how it ended (redacted)
            _record_unfinished(store, run_id, mode, started, exc)
        raise
    finally:
        if pool is not workers:  # a pool kept across runs is its owner's to close
            pool.close()
        writer.shutdown(wait=True)
        await dest.close()
        await clients.aclose()
    if run.sink_marked and not run.unrecorded and not pool.unsure and not getattr(store, "remote", False):
        # Every page written is recorded: the mark has done its job (on PostgreSQL it stays: see localsink)
        store.clear_sink_mark()
    if run.fatal is not None and dest_error is None:
        dest_error = run.fatal.render()
    result = RunResult(run_id=run_id, mode=mode, destination=dest.describe(), connections=list(results),
                       started=started, finished=time.time(), destination_error=dest_error, inbound=inbound,
                       interrupted=stop.why if stop is not None and stop.is_set() else None)
    # By kind of command: a worker's runs are named after their connection, which is the connection label's.
    metrics.record_run(result, (command or mode).split(" ", 1)[0])
    if run_id is not None:
        working = [c for c in result.connections if c.status == "ok"]
        status = ("interrupted" if result.interrupted else "ok" if result.ok
                  else "partial" if working and not result.destination_error else "failed")
        store.finish_run(run_id, status, result.stored(),
                         keep=(command or "apply", cfg.keep_runs, max(cfg.keep_runs, RECENT_RUNS)))
    return result
