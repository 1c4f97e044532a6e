"""Faults and garbage over real sockets: what the network, the provider and the destination can do wrong.

Every test runs `pipeline.sync` in-process against simulators served by a real `SandboxServer` on 127.0.0.1
(the config points `base_url` at it), injects one kind of fault, and checks the verdicts, the ledger and the
cases the Debitura simulator holds. A summary line with the number of faults injected per kind is printed at
the end:  pytest -q -s tests/test_faults.py
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter

import httpx
import pytest

from runner.spec import config
from runner.net import http
from runner.engine import pipeline
from runner.sandbox.core import SandboxServer, Simulator, json_response
from runner.sandbox.debitura import DebituraSimulator
from runner.sandbox.stripe import StripeSimulator, build_dataset, today_anchor
from runner.state.sqlite import Store

try:
    from tests.conftest import DEBITURA_KEY, ROOT, STRIPE_KEY
except ImportError:  # tests/ without __init__.py
    from conftest import DEBITURA_KEY, ROOT, STRIPE_KEY

INJECTED: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print("\nFAULT SUMMARY " + " ".join(f"{k}={v}" for k, v in sorted(INJECTED.items())) +
          f" total={sum(INJECTED.values())}")


@pytest.fixture
def fast_backoff(monkeypatch):
    """Backoff without Retry-After shrinks to milliseconds: the budget logic is what is under test here."""
    monkeypatch.setattr(http.Http, "_backoff", lambda self, attempt: 0.005)


class HostileStripe(StripeSimulator):
    """The Stripe simulator, with its invoice list answers spoiled in one of several ways."""

    def __init__(self, mode=None, synthetic=0, **kw):
        super().__init__(synthetic=synthetic)
        self.mode = mode
        self.kw = kw
        self.times: list[tuple[float, str, str]] = []
        self.list_calls = 0
        self.statuses: list[int] = []

    async def handle(self, request):
        self.times.append((time.monotonic(), request.method, str(request.url.raw_path.decode())))
        resp = await super().handle(request)
        self.statuses.append(resp.status_code)
        return resp

    async def dispatch(self, request):
        if request.url.path != "/v1/invoices" or self.mode is None:
            return await super().dispatch(request)
        self.list_calls += 1
        mode = self.mode
        if mode == "retry_after_header" and self.list_calls == 1:
            INJECTED["429_retry_after_header"] += 1
            return json_response(429, {"error": {"type": "invalid_request_error", "message": "Too many requests"}},
                                 {"Retry-After": str(self.kw["wait"])})
        if mode == "html_200":
            INJECTED["html_error_page"] += 1
            return httpx.Response(200, content=b"<!DOCTYPE html><html><body><h1>Maintenance</h1></body></html>",
                                  headers={"Content-Type": "text/html"})
        if mode == "html_502":
            INJECTED["html_error_page"] += 1
            return httpx.Response(502, content=b"<html><head><title>502 Bad Gateway</title></head></html>",
                                  headers={"Content-Type": "text/html"})
        if mode == "non_json":
            INJECTED["non_json"] += 1
            return httpx.Response(200, content=b"OK", headers={"Content-Type": "text/plain"})
        resp = await super().dispatch(request)
        body = json.loads(resp.content)
        if mode == "truncated":
            INJECTED["truncated_body"] += 1
            return httpx.Response(200, content=resp.content[: len(resp.content) // 2],
                                  headers={"Content-Type": "application/json"})
        if mode == "mutate":
            for inv in body["data"]:
                if inv["id"] in self.kw["changes"]:
                    INJECTED[self.kw["kind"]] += 1
                    self.kw["changes"][inv["id"]](inv)
        elif mode == "endless" and "starting_after" in request.url.params:
            INJECTED["endless_paginator"] += 1
            self.mode = None  # answer page 1 again, once: the cursor repeats
            body = json.loads((await super().dispatch(httpx.Request("GET", str(request.url.copy_remove_param(
                "starting_after")), headers=request.headers))).content)
            self.mode = "endless"
        elif mode == "oversize":
            INJECTED["page_larger_than_declared"] += 1
            body["data"] = body["data"] + body["data"][:50]
        elif mode == "next_url":
            INJECTED["next_page_on_other_host"] += 1
            body["next_page"] = self.kw["next"]
        return json_response(200, body)


class TimedDebitura(DebituraSimulator):
    def __init__(self, fail_refs=()):
        super().__init__("production")
        self.times: list[tuple[float, str, str]] = []
        self.fail_refs = set(fail_refs)
        self.statuses: list[int] = []

    async def handle(self, request):
        self.times.append((time.monotonic(), request.method, request.url.path))
        if request.method == "POST" and request.url.path == "/cases" and self.fail_refs:  # not chats or files
            ref = json.loads(request.content).get("creditorReference")
            if ref in self.fail_refs:
                INJECTED["destination_503"] += 1
                self.faults.record(request.method, request.url.path)
                return self.fault_response(503)
        resp = await super().handle(request)
        self.statuses.append(resp.status_code)
        return resp


class Counting(Simulator):
    """An 'evil' host: it only counts what reaches it."""

    async def dispatch(self, request):
        return json_response(200, {"object": "list", "data": [], "has_more": False})


CONFIG = """
state: state/state.db
integrations_dir: specs
destination:
  type: debitura
  environment: sandbox
  base_url: {dest}
  api_key: "${{DEBITURA_API_KEY}}"
connections:
  - name: faulty
    integration: {integration}
    environment: sandbox
    base_url: {src}
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
    server_filters: false
"""


def _spec(tmp_path, name, **edits):
    """A copy of the Stripe spec under another id, with some lines changed (retry, paginate)."""
    text = (ROOT / "integrations.d" / "stripe.yaml").read_text().replace("id: stripe", f"id: {name}", 1)
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    d = tmp_path / "specs"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(text)


def _config(tmp_path, monkeypatch, src, dest, integration="stripe"):
    monkeypatch.setenv("STRIPE_API_KEY", STRIPE_KEY)
    monkeypatch.setenv("DEBITURA_API_KEY", DEBITURA_KEY)
    (tmp_path / "specs").mkdir(exist_ok=True)
    p = tmp_path / "config.yaml"
    p.write_text(CONFIG.format(src=src, dest=dest, integration=integration))
    return p


def _apply(cfg_path):
    cfg = config.load(cfg_path)
    store = Store(cfg.state_path)
    try:
        result = asyncio.run(pipeline.sync(cfg, mode="apply", store=store, details=True))
        ledger = Counter(dict(store.db.execute("SELECT status, COUNT(*) FROM ledger GROUP BY status").fetchall()))
        return result, result.connections[0], ledger
    finally:
        store.close()


def _eligible(sim: StripeSimulator) -> set[str]:
    return {i["number"] for i in sim.data["test"]["invoices"] if i["_sandbox_kind"] in ("open", "open_address_on_customer")}


def _refs(deb: DebituraSimulator) -> Counter:
    return Counter(c["creditorReference"] for c in deb.cases())


@pytest.fixture
def served():
    servers = []

    def serve(**mounts):
        s = SandboxServer(mounts)
        s.start()
        servers.append(s)
        return s

    yield serve
    for s in servers:
        s.stop()


# --- retries: 429 with Retry-After, Debitura's retryAfter in the body, 5xx, connection errors, timeouts -------

def test_429_retry_after_header_is_honoured(tmp_path, monkeypatch, served):
    stripe, deb = HostileStripe("retry_after_header", wait=0.4), TimedDebitura()
    s = served(stripe=stripe, debitura=deb)
    _, conn, _ = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura")))
    assert conn.status == "ok", conn.error
    lists = [t for t, m, p in stripe.times if p.startswith("/v1/invoices")]
    assert lists[1] - lists[0] >= 0.4, "the retry came before the Retry-After the provider asked for"
    assert _refs(deb) == Counter({n: 1 for n in _eligible(stripe)})


def test_debitura_retry_after_in_the_body_is_honoured(tmp_path, monkeypatch, served):
    stripe, deb = HostileStripe(), TimedDebitura()
    deb.set_faults({"fail_next": [429]})  # the real 429 body: {"retryAfter": 1.0}, no header
    INJECTED["429_retryAfter_body"] += 1
    s = served(stripe=stripe, debitura=deb)
    result, conn, _ = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura")))
    assert result.ok, (result.destination_error, conn.error)
    me = [t for t, m, p in deb.times if p == "/me"]
    assert len(me) == 2 and me[1] - me[0] >= 1.0
    assert _refs(deb) == Counter({n: 1 for n in _eligible(stripe)})


def test_5xx_are_retried_and_nothing_is_lost(tmp_path, monkeypatch, served, fast_backoff):
    stripe, deb = HostileStripe(), TimedDebitura()
    stripe.set_faults({"fail_next": [500, 502, 503]})
    deb.set_faults({"fail_next": [503, 500]})
    INJECTED["5xx"] += 5
    s = served(stripe=stripe, debitura=deb)
    result, conn, ledger = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura")))
    assert result.ok and conn.failed == 0
    assert stripe.requests == 5 and conn.requests == 5  # 3 refused + the account + the page
    assert _refs(deb) == Counter({n: 1 for n in _eligible(stripe)})
    assert ledger == Counter({"delivered": len(_eligible(stripe))})


def _closing_server():
    """Accepts connections and closes them at once: every request is a connection error."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()

    def loop():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            INJECTED["connection_reset"] += 1
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", lambda: (stop.set(), srv.close())


def test_provider_connection_errors_fail_the_connection_with_a_clear_error(tmp_path, monkeypatch, served,
                                                                          fast_backoff):
    url, close = _closing_server()
    deb = TimedDebitura()
    s = served(debitura=deb)
    try:
        result, conn, _ = _apply(_config(tmp_path, monkeypatch, url + "/stripe", s.url("debitura")))
    finally:
        close()
    assert conn.status == "failed"
    assert "could not be reached after 6 attempts" in conn.error
    assert conn.why_zero().startswith("nothing was imported because the connection failed")
    assert deb.cases() == []


def test_destination_unreachable_then_every_invoice_is_delivered_by_the_next_run(tmp_path, monkeypatch, served,
                                                                                 fast_backoff):
    url, close = _closing_server()
    stripe, deb = HostileStripe(), TimedDebitura()
    s = served(stripe=stripe, debitura=deb)
    try:
        result, conn, ledger = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), url + "/debitura"))
    finally:
        close()
    eligible = _eligible(stripe)
    assert not result.ok and "could not be reached" in result.destination_error
    assert conn.failed == len(eligible) and conn.imported == 0
    assert {v.reason for v in conn.verdicts if v.verdict == "failed"} == {"destination_unavailable"}
    result, conn, ledger = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura")))
    assert result.ok and conn.imported == len(eligible)
    assert _refs(deb) == Counter({n: 1 for n in eligible})


def test_timeouts_are_retried_then_fail_the_connection(tmp_path, monkeypatch, served, fast_backoff):
    _spec(tmp_path, "slowstripe", **{"retry: {attempts: 6, backoff_s: 0.5, max_backoff_s: 20}":
                                     "retry: {attempts: 2, backoff_s: 0.5, max_backoff_s: 20, timeout_s: 0.2}"})
    stripe, deb = HostileStripe(), TimedDebitura()
    stripe.set_faults({"latency_s": 0.6})
    s = served(stripe=stripe, debitura=deb)
    cfg = _config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura"), integration="slowstripe")
    _, conn, _ = _apply(cfg)
    INJECTED["timeout"] += 2
    assert conn.status == "failed" and "after 2 attempts" in conn.error and "Timeout" in conn.error
    stripe.set_faults({"latency_s": 0})
    _, conn, _ = _apply(cfg)
    assert conn.status == "ok" and conn.imported == len(_eligible(stripe))


def test_retry_budget_exhausted_gives_failed_verdicts_retried_by_the_next_run(tmp_path, monkeypatch, served,
                                                                             fast_backoff):
    stripe = HostileStripe()
    eligible = _eligible(stripe)
    broken = set(sorted(eligible)[:3])
    deb = TimedDebitura(fail_refs=broken)
    s = served(stripe=stripe, debitura=deb)
    cfg = _config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura"))
    result, conn, ledger = _apply(cfg)
    failed = {v.number: v for v in conn.verdicts if v.verdict == "failed"}
    assert set(failed) == broken
    assert all(v.reason == "delivery_failed" and "503" in v.message and "after 6 attempts" in v.message
               for v in failed.values())
    assert ledger == Counter({"delivered": len(eligible) - 3, "failed": 3})
    assert not result.ok
    deb.fail_refs = set()
    result, conn, ledger = _apply(cfg)
    assert result.ok
    assert {v.number for v in conn.verdicts if v.verdict == "imported"} == broken
    assert _refs(deb) == Counter({n: 1 for n in eligible})
    assert ledger == Counter({"delivered": len(eligible)})


# --- garbage from the provider -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, words", [
    ("html_200", "was an HTML page, not JSON"),
    ("html_502", "answered HTTP 502 after 6 attempts"),
    ("non_json", "is not valid JSON"),
    ("truncated", "is not valid JSON"),
])
def test_garbage_answers_fail_the_connection_with_a_clear_error(tmp_path, monkeypatch, served, fast_backoff, mode,
                                                               words):
    stripe, deb = HostileStripe(mode), TimedDebitura()
    s = served(stripe=stripe, debitura=deb)
    result, conn, _ = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura")))
    assert conn.status == "failed" and words in conn.error, conn.error
    assert conn.error.startswith("Stripe")
    assert deb.cases() == [] and not result.ok


def _ids_by_kind(sim, kind, n):
    return [i["id"] for i in sim.data["test"]["invoices"] if i["_sandbox_kind"] == kind][:n]


def test_wrong_types_and_missing_fields_give_precise_verdicts_and_the_rest_is_imported(tmp_path, monkeypatch,
                                                                                       served):
    stripe = HostileStripe("mutate")
    a, b, c, d, e, f, g = _ids_by_kind(stripe, "open", 7)
    changes = {
        a: lambda inv: inv.update(amount_remaining="lots"),
        b: lambda inv: inv.update(created="yesterday"),
        c: lambda inv: inv.update(currency=42),
        d: lambda inv: inv.update(customer_name=["not", "a", "name"], customer=None),
        e: lambda inv: inv.pop("id"),
        f: lambda inv: inv.pop("number"),
        g: lambda inv: inv.pop("currency"),
    }
    stripe.kw = {"changes": changes, "kind": "wrong_type_or_missing_field"}
    deb = TimedDebitura()
    s = served(stripe=stripe, debitura=deb)
    result, conn, _ = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura")))
    assert conn.status == "ok", conn.error
    by_id = {v.invoice_id: v for v in conn.verdicts}
    for i in (a, b, c, d, f, g):
        assert (by_id[i].verdict, by_id[i].reason) == ("skipped", "invalid"), (i, by_id[i])
        assert by_id[i].message
    assert "date cannot be read" in by_id[b].message
    assert "<no id>" in by_id and by_id["<no id>"].reason == "invalid"
    spoiled_numbers = {i["number"] for i in stripe.data["test"]["invoices"] if i["id"] in changes}
    assert _refs(deb) == Counter({n: 1 for n in _eligible(stripe) - spoiled_numbers})


def test_endless_paginator_is_stopped_and_what_was_delivered_is_kept(tmp_path, monkeypatch, served):
    stripe, deb = HostileStripe("endless", synthetic=150), TimedDebitura()
    s = served(stripe=stripe, debitura=deb)
    cfg = _config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura"))
    result, conn, ledger = _apply(cfg)
    assert conn.status == "failed" and "looping" in conn.error and "cursor" in conn.error
    page1 = {i["number"] for i in stripe.data["test"]["invoices"][:100]} & _eligible(stripe)
    assert conn.imported == len(page1) > 0
    assert _refs(deb) == Counter({n: 1 for n in page1})
    assert ledger == Counter({"delivered": len(page1)})
    stripe.mode = None  # the provider is fixed: the next run delivers the rest, nothing twice
    result, conn, _ = _apply(cfg)
    assert result.ok and _refs(deb) == Counter({n: 1 for n in _eligible(stripe)})


def test_page_larger_than_declared_is_refused(tmp_path, monkeypatch, served):
    stripe, deb = HostileStripe("oversize", synthetic=120), TimedDebitura()
    s = served(stripe=stripe, debitura=deb)
    _, conn, _ = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura")))
    assert conn.status == "failed" and "a page of 150 invoices, more than the 100" in conn.error
    assert deb.cases() == []


@pytest.mark.parametrize("where", ["other_host", "same_host_other_path", "same_host_sibling_path"])
def test_next_page_link_outside_the_base_url_is_never_followed(tmp_path, monkeypatch, served, where):
    _spec(tmp_path, "linkstripe", **{
        'paginate: {type: cursor, param: starting_after, value: "data[-1].id", more: has_more}':
            "paginate: {type: next_url, value: next_page}"})
    evil = Counting()
    e = served(stripe=evil, debitura=Counting())
    stripe, deb = HostileStripe("next_url"), TimedDebitura()
    s = served(stripe=stripe, debitura=deb)
    stripe.kw = {"next": {"other_host": e.url("stripe"), "same_host_other_path": s.url("debitura"),
                          "same_host_sibling_path": s.url("stripe-evil")}[where] + "/v1/invoices?page=2"}
    _, conn, _ = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura"), integration="linkstripe"))
    assert conn.status == "failed" and "outside its declared address" in conn.error and "does not follow" in conn.error
    assert evil.requests == 0 and all(p != "/v1/invoices" for _, _, p in deb.times)
    # page 1 was delivered before the bad link was seen, and stays delivered
    assert _refs(deb) == Counter({n: 1 for n in _eligible(stripe)})


# --- rate limits ---------------------------------------------------------------------------------------------

def test_connections_sharing_an_account_share_its_rate_limit_without_a_429_storm(tmp_path, monkeypatch, served):
    """Two connections on the same key, small pages, and a simulator enforcing exactly the declared rate."""
    _spec(tmp_path, "tinypages", **{'limit: "100"': 'limit: "1"',
                                    "rate_limit: {requests_per_second: 22, concurrency: 8}\n\nretry":
                                        "rate_limit: {requests_per_second: 20, concurrency: 8}\n\nretry"})
    text = (tmp_path / "specs" / "tinypages.yaml").read_text()
    assert "requests_per_second: 20" in text
    stripe = HostileStripe()
    stripe.set_faults({"rate_limit_per_s": 20})
    s = served(stripe=stripe, debitura=TimedDebitura())
    cfg = _config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura"), integration="tinypages")
    body = cfg.read_text()
    second = body[body.index("  - name: faulty"):].replace("name: faulty", "name: faulty-too")
    cfg.write_text(body + second)
    conf = config.load(cfg)
    store = Store(conf.state_path)
    try:
        result = asyncio.run(pipeline.sync(conf, mode="plan", store=store))
    finally:
        store.close()
    assert all(c.status == "ok" for c in result.connections), [c.error for c in result.connections]
    pages = stripe.statuses.count(200)
    assert pages >= 30
    limited = stripe.statuses.count(429)
    print(f"\nRATE LIMIT requests={len(stripe.statuses)} 429s={limited}")
    assert limited <= 1, f"{limited} requests were refused with 429: the declared limit is not respected"


# Documented limits (reference/API-FACTS.md): Stripe 100/s live and 25/s test, and 25/s per endpoint;
# QuickBooks 500/min and 10 concurrent per company; Zoho Books about 100/min per organization;
# Debitura 2,000/min, 20,000/hour, 100,000/day per key.
FACTS = {"stripe": {"per_second": 25.0}, "quickbooks_online": {"per_second": 500 / 60, "concurrency": 10},
         "zoho_books": {"per_second": 100 / 60}}


def _per_second(rl: dict) -> float | None:
    if rl.get("requests_per_second"):
        return float(rl["requests_per_second"])
    if rl.get("requests_per_minute"):
        return rl["requests_per_minute"] / 60.0
    return None


@pytest.mark.parametrize("spec_id", sorted(FACTS))
def test_declared_rate_limits_respect_the_documented_limits(spec_id):
    from runner.spec import loader as specs

    try:
        spec = specs.load_spec(spec_id)
    except KeyError:
        pytest.skip(f"no {spec_id} spec yet")
    fact = FACTS[spec_id]
    checked = 0
    for name, env in spec.environments.items():
        if name == "sandbox" or (env.base_url is not None and "sandbox://" in env.base_url.source):
            continue  # the built-in simulators: not the provider's servers
        rl = env.rate_limit or spec.rate_limit or {}
        rps = _per_second(rl)
        assert rps is not None, f"{spec_id}/{name} declares no rate limit"
        assert rps <= fact["per_second"], f"{spec_id}/{name}: {rps}/s is over the documented {fact['per_second']:.2f}/s"
        if "concurrency" in fact:
            assert rl.get("concurrency") and rl["concurrency"] <= fact["concurrency"], f"{spec_id}/{name} concurrency"
        checked += 1
    assert checked


def test_debitura_limits_cover_minute_hour_and_day():
    from runner.engine.destinations import DEBITURA_RATE

    assert DEBITURA_RATE["requests_per_minute"] <= 2000
    assert DEBITURA_RATE["requests_per_hour"] <= 20000 and DEBITURA_RATE["requests_per_day"] <= 100000
    lim = http.limiter_for("debitura:test", DEBITURA_RATE)
    assert [w[:2] for w in lim.windows] == [(20000, 3600.0), (100000, 86400.0)]


def test_quota_windows_are_never_exceeded():
    """A quota over a window (like Debitura's hourly one), scaled down: 5 requests per 0.4 s."""
    lim = http.Limiter(None, None, [(5, 0.4)])
    stamps = []

    async def go():
        for _ in range(12):
            await lim.acquire()
            stamps.append(time.monotonic())

    asyncio.run(go())
    assert stamps[-1] - stamps[0] >= 0.8  # 5 + 5 + 2: two full windows must pass
    for i, t in enumerate(stamps):
        assert sum(1 for u in stamps[i:] if u < t + 0.4) <= 5


# --- the destination's answers that exactly-once depends on ------------------------------------------------

class LosingDebitura(TimedDebitura):
    """Creates the case, then loses the answer (a 503 instead of the 200), once per invoice."""

    def __init__(self):
        super().__init__()
        self.lost: set[str] = set()

    async def handle(self, request):
        resp = await super().handle(request)
        if request.method == "POST" and request.url.path == "/cases" and resp.status_code == 200:
            ref = json.loads(request.content)["creditorReference"]
            if ref not in self.lost:
                self.lost.add(ref)
                INJECTED["destination_answer_lost_after_create"] += 1
                return self.fault_response(503)
        return resp


def test_a_lost_answer_after_the_case_was_created_is_replayed_not_duplicated(tmp_path, monkeypatch, served,
                                                                              fast_backoff):
    stripe, deb = HostileStripe(), LosingDebitura()
    s = served(stripe=stripe, debitura=deb)
    result, conn, ledger = _apply(_config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura")))
    eligible = _eligible(stripe)
    assert result.ok and conn.imported == len(eligible) and deb.lost == eligible
    assert _refs(deb) == Counter({n: 1 for n in eligible}), "the retry (same key, same body) was replayed"
    posts = [p for _, m, p in deb.times if m == "POST" and p == "/cases"]  # each case's document follows
    assert len(posts) == 2 * len(eligible)


def test_a_case_that_exists_under_the_same_key_or_reference_is_found_not_created_again(tmp_path, monkeypatch,
                                                                                       served):
    from runner.engine.destinations import idempotency_key
    from runner.sandbox.stripe import ACCOUNT_ID

    stripe, deb = HostileStripe(), TimedDebitura()
    s = served(stripe=stripe, debitura=deb)
    cfg = _config(tmp_path, monkeypatch, s.url("stripe"), s.url("debitura"))
    opens = [i for i in stripe.data["test"]["invoices"] if i["_sandbox_kind"] == "open"]
    same_key, same_ref = opens[0], opens[1]
    body = {"currencyCode": "EUR", "amountToRecover": 1.0, "date": "2026-01-01T00:00:00Z",
            "dueDate": "2026-01-15T00:00:00Z", "debtor": {"type": "Company", "name": "X", "address": "Y 1",
                                                         "zipCode": "1000", "city": "Z", "countryAlpha2": "DK"}}
    with httpx.Client(base_url=s.url("debitura"), headers={"XApiKey": DEBITURA_KEY}) as c:
        # An earlier attempt under the runner's key, with a different body (the invoice changed since):
        # Debitura answers IdempotencyConflict to the runner's request.
        key = idempotency_key(f"stripe:{ACCOUNT_ID}", same_key["id"])
        assert c.post("/cases", json={**body, "creditorReference": same_key["number"]},
                      headers={"Idempotency-Key": key}).status_code == 200
        # A case made by hand for the same invoice (same reference and debtor): Debitura answers DuplicateReference.
        by_hand = {**body, "creditorReference": same_ref["number"],
                   "debtor": {**body["debtor"], "name": same_ref["customer_name"]}}
        assert c.post("/cases", json=by_hand).status_code == 200
    INJECTED["idempotency_conflict"] += 1
    INJECTED["duplicate_reference"] += 1
    result, conn, ledger = _apply(cfg)
    assert result.ok, [v.message for v in conn.verdicts if v.verdict == "failed"]
    assert deb.statuses.count(422) == 1 and deb.statuses.count(400) == 1  # IdempotencyConflict, DuplicateReference
    by_number = {v.number: v for v in conn.verdicts}
    for inv in (same_key, same_ref):
        v = by_number[inv["number"]]
        assert (v.verdict, v.reason) == ("skipped", "duplicate") and "already has this case" in v.message, v
    eligible = _eligible(stripe)
    assert _refs(deb) == Counter({n: 1 for n in eligible})
    assert ledger == Counter({"delivered": len(eligible)})
    # The run's recorded verdicts say the same: one each, a duplicate, not also "imported" by this run (the
    # ledger credited a case the runner never made to the run that found it).
    store = Store(config.load(cfg).state_path)
    try:
        recorded = [(r["number"], r["verdict"], r["reason"]) for r in store.run_verdicts(result.run_id)]
    finally:
        store.close()
    for inv in (same_key, same_ref):
        assert [(v, r) for n, v, r in recorded if n == inv["number"]] == [("skipped", "duplicate")]
