"""Each paginator kind, end to end over a real socket, against a small generic invoice API."""
from __future__ import annotations

import asyncio
import json
from datetime import date, timedelta

import httpx
import pytest

from runner.spec import config
from runner.engine import pipeline
from runner.sandbox.core import SandboxServer
from runner.state.sqlite import Store

N = 23
SIZE = 5


def _invoices():
    today = date.today()
    return [{"id": f"inv-{i:03d}", "no": f"N-{i:03d}", "state": "unpaid", "total": "100.50", "cur": "EUR",
             "issued": (today - timedelta(days=40 + i)).isoformat(), "due": (today - timedelta(days=10)).isoformat(),
             "customer": {"name": f"Debtor {i} GmbH", "street": "Hauptstr. 1", "zip": "10115", "city": "Berlin",
                          "country": "Germany"}} for i in range(N)]


class GenericApi:
    """Answers /page, /offset, /cursor, /links and /query in the style each paginator expects."""

    def __init__(self):
        self.data = _invoices()
        self.calls = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        q = dict(request.url.params)
        self.calls.append((request.url.path, q))
        path = request.url.path
        if path == "/page":
            p, size = int(q.get("page", 1)), int(q["per_page"])
            chunk = self.data[(p - 1) * size:p * size]
            body = {"items": chunk, "meta": {"more": p * size < N}}
        elif path == "/offset":
            o, size = int(q.get("offset", 0)), int(q["limit"])
            body = {"items": self.data[o:o + size]}
        elif path == "/cursor":
            after = q.get("after")
            start = 0 if not after else next(i for i, x in enumerate(self.data) if x["id"] == after) + 1
            chunk = self.data[start:start + SIZE]
            body = {"items": chunk, "has_more": start + SIZE < N}
        elif path == "/links":
            o = int(q.get("o", 0))
            nxt = f"{request.url.scheme}://{request.url.netloc.decode()}/api/links?o={o + SIZE}" if o + SIZE < N else None
            body = {"items": self.data[o:o + SIZE], "next": nxt}
        elif path in ("/qlinks", "/rlinks", "/plinks"):  # relative next-page links, in the three forms
            o = int(q.get("o", 0))
            form = {"/qlinks": "?o={}", "/rlinks": "rlinks?o={}", "/plinks": "/api/plinks?o={}"}[path]
            body = {"items": self.data[o:o + SIZE], "next": form.format(o + SIZE) if o + SIZE < N else None}
        elif path == "/query":
            m = q["q"]  # e.g. "select * STARTPOSITION 6 MAXRESULTS 5"
            parts = m.split()
            start, size = int(parts[parts.index("STARTPOSITION") + 1]), int(parts[parts.index("MAXRESULTS") + 1])
            chunk = self.data[start - 1:start - 1 + size]
            body = {"Response": {"Invoice": chunk} if chunk else {}}
        else:
            return httpx.Response(404, json={"error": "no such path"})
        return httpx.Response(200, json=body)


SPEC = """
id: generic
name: Generic API
auth: {{type: none}}
environments:
  local: {{base_url: "http://127.0.0.1:1/api"}}
invoices:
  request: {{method: GET, path: "{path}"{params}}}
  records: "{records}"
  paginate: {paginate}
  unpaid: "state == 'unpaid'"
  map:
    external_id: id
    number: "no"
    issue_date: to_date(issued)
    due_date: to_date(due)
    currency: cur
    amount: to_decimal(total)
    debtor:
      name: customer.name
      address: {{street: customer.street, postal_code: customer.zip, city: customer.city, country: country_code(customer.country)}}
"""

CASES = {
    "page_with_more": ("/page", "", "items", "{type: page, param: page, size_param: per_page, size: 5, more: meta.more}", 5),
    "page_short_page": ("/page", "", "items", "{type: page, param: page, size_param: per_page, size: 5}", 5),
    "offset_short_page": ("/offset", "", "items", "{type: offset, param: offset, size_param: limit, size: 5}", 5),
    "cursor": ("/cursor", "", "items", "{type: cursor, param: after, value: 'items[-1].id', more: has_more}", 5),
    "next_url": ("/links", "", "items", "{type: next_url, value: next}", 5),
    # relative links are relative to the page's URL, as a browser reads them (the base URL has a path: /api)
    "next_url_query_only": ("/qlinks", "", "items", "{type: next_url, value: next}", 5),
    "next_url_relative_path": ("/rlinks", "", "items", "{type: next_url, value: next}", 5),
    "next_url_absolute_path": ("/plinks", "", "items", "{type: next_url, value: next}", 5),
    # query-language APIs: no param, the template reads page.offset/page.size; a full page (23 of 23) asks
    # once more, and the empty answer has no list key at all, which ends paging without an error
    "query_language": ("/query", ", params: {q: 'select * STARTPOSITION {{ page.offset }} MAXRESULTS {{ page.size }}'}",
                       "Response.Invoice", "{type: offset, start: 1, size: 23}", 2),
}


@pytest.fixture(scope="module")
def server():
    api = GenericApi()
    srv = SandboxServer({"api": api})
    base = srv.start()
    yield api, base
    srv.stop()


@pytest.mark.parametrize("name", list(CASES))
def test_paginator_fetches_every_invoice_once(tmp_path, server, name):
    api, base = server
    path, params, records, paginate, requests = CASES[name]
    (tmp_path / "integrations.d").mkdir()
    (tmp_path / "integrations.d" / "generic.yaml").write_text(
        SPEC.format(path=path, params=params, records=records, paginate=paginate))
    (tmp_path / "config.yaml").write_text(f"""
destination: {{type: jsonl, path: out/cases.jsonl}}
connections:
  - name: gen
    integration: generic
    account_id: gen
    base_url: {base}/api
    window: {{from: "2000-01-01"}}
""")
    cfg = config.load(tmp_path / "config.yaml")
    store = Store(cfg.state_path)
    api.calls.clear()
    result = asyncio.run(pipeline.sync(cfg, mode="apply", store=store, details=True))
    store.close()
    (conn,) = result.connections
    assert conn.status == "ok", conn.error
    assert conn.imported == N
    assert len(api.calls) == requests
    lines = [json.loads(l) for l in (tmp_path / "out" / "cases.jsonl").read_text().splitlines()]
    assert sorted(l["invoice"]["external_id"] for l in lines) == [f"inv-{i:03d}" for i in range(N)]
    assert lines[0]["case"]["debtor"]["countryAlpha2"] == "DE"


def test_more_pages_without_a_cursor_is_an_error_not_a_silent_stop(tmp_path, server):
    api, base = server
    (tmp_path / "integrations.d").mkdir()
    (tmp_path / "integrations.d" / "generic.yaml").write_text(SPEC.format(
        path="/cursor", params="", records="items",
        paginate="{type: cursor, param: after, value: 'items[-1].idd', more: has_more}"))
    (tmp_path / "config.yaml").write_text(f"""
destination: {{type: jsonl, path: out/cases.jsonl}}
connections:
  - {{name: gen, integration: generic, account_id: gen, base_url: "{base}/api", window: {{from: "2000-01-01"}}}}
""")
    cfg = config.load(tmp_path / "config.yaml")
    store = Store(cfg.state_path)
    result = asyncio.run(pipeline.sync(cfg, mode="apply", store=store))
    store.close()
    (conn,) = result.connections
    assert conn.status == "failed" and "gives no cursor at 'items[-1].idd'" in conn.error
    assert conn.imported == SIZE  # the first page is kept


# --- reading a page's facts from its bytes (pagination.facts_reader) ---------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402
import orjson  # noqa: E402

from runner.spec import loader as specs  # noqa: E402
from runner.engine import pagination

_json = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=3),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                     max_leaves=8)
_record = st.dictionaries(st.sampled_from(["id", "number", "total"]), _json, max_size=3) | _json
_records = st.none() | st.lists(_record, max_size=6) | _record
_more = st.none() | st.booleans() | _json


def _bodies():
    # Shaped like each built-in spec's answers, with anything (or nothing) where its paths go.
    return st.one_of(
        st.fixed_dictionaries({}, optional={"data": _records, "has_more": _more, "object": st.just("list")}),
        st.fixed_dictionaries({}, optional={"invoices": _records, "page_context": st.none() | _json | st.fixed_dictionaries(
            {}, optional={"has_more_page": _more, "page": st.integers(1, 3)})}),
        st.fixed_dictionaries({}, optional={"QueryResponse": st.none() | _json | st.fixed_dictionaries(
            {}, optional={"Invoice": _records, "startPosition": st.integers(1, 3)})}),
        _json)


@pytest.mark.parametrize("spec_id", ["stripe", "zoho_books", "quickbooks_online"])
@settings(max_examples=300, deadline=None)
@given(body=_bodies())
def test_facts_read_from_the_bytes_are_the_facts_of_the_decoded_page(spec_id, body):
    """The engine hands a page to a worker undecoded and reads only what its paginator needs from the bytes:
    for any answer, that gives exactly what decoding it all gives, or it raises (and the engine then decodes
    the answer in full, which says what is wrong with it)."""
    stream = specs.load_spec(spec_id).invoices
    read = pagination.facts_reader(stream)
    assert read is not None
    try:
        expected = pagination.facts(stream.paginate, body, stream.page_records(body))
    except Exception:  # noqa: BLE001 - an answer the engine refuses: the reader must not accept it either
        with pytest.raises(Exception):
            read(orjson.dumps(body))
        return
    try:
        got = read(orjson.dumps(body))
    except Exception:  # noqa: BLE001 - allowed: the engine decodes it in full instead
        return
    assert got == expected


def test_facts_of_a_real_stripe_page_are_read_without_decoding_the_invoices():
    stream = specs.load_spec("stripe").invoices
    page = {"object": "list", "has_more": True, "url": "/v1/invoices",
            "data": [{"id": f"in_{i}", "lines": {"data": [{"amount": i}] * 3}, "customer": {"address": None}}
                     for i in range(100)]}
    assert pagination.facts_reader(stream)(orjson.dumps(page)) == pagination.PageFacts(100, True, "in_99")
    with pytest.raises(Exception):
        pagination.facts_reader(stream)(b"<!DOCTYPE html><html>502 Bad Gateway</html>")


def test_no_reader_when_a_paginator_expression_is_more_than_a_plain_path():
    from dataclasses import replace

    stream = specs.load_spec("stripe").invoices  # a cached spec: changed copies only
    either = replace(stream, paginate=replace(stream.paginate, value=specs.Expression("data[-1].id || data[0].id")))
    assert pagination.facts_reader(either) is None
    assert pagination.facts_reader(replace(stream, records=specs.Expression("not_null(data, @)"))) is None
    assert pagination.facts_reader(stream) is not None
