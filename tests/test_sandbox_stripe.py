"""Tests of the Stripe sandbox simulator (in-process, through runner.sandbox.core.transport)."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from datetime import datetime, timezone

import httpx
import pytest

from runner.sandbox.core import Faults, transport
from runner.sandbox.stripe import (
    LIVE_SECRET_KEY,
    TEST_RESTRICTED_KEY,
    TEST_RESTRICTED_NO_INVOICES_KEY,
    TEST_REVOKED_KEY,
    TEST_SECRET_KEY,
    StripeSimulator,
    build_dataset,
    mask_key,
)

ANCHOR = datetime(2026, 3, 15, tzinfo=timezone.utc)
ANCHOR_TS = int(ANCHOR.timestamp())
DAY = 86400


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sim() -> StripeSimulator:
    return StripeSimulator(anchor=ANCHOR)


def call(sim, path, params=None, key: str | None = TEST_SECRET_KEY, headers=None, auth=None, prefix=""):
    async def go():
        h = dict(headers or {})
        if key is not None and auth is None:
            h["Authorization"] = f"Bearer {key}"
        async with httpx.AsyncClient(transport=transport(sim, prefix=prefix),
                                     base_url="https://api.stripe.com") as client:
            return await client.get(path, params=params, headers=h, auth=auth)

    return asyncio.run(go())


def list_all(sim, params=None, limit=7, key=TEST_SECRET_KEY):
    seen, after, pages = [], None, 0
    while True:
        p = dict(params or {}, limit=limit)
        if after:
            p["starting_after"] = after
        r = call(sim, "/v1/invoices", p, key=key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["url"] == "/v1/invoices"
        seen.extend(body["data"])
        pages += 1
        if not body["has_more"]:
            return seen, pages
        after = body["data"][-1]["id"]


def test_dataset_counts_and_kinds():
    data = build_dataset(ANCHOR)
    inv = data["test"]["invoices"]
    kinds = Counter(i["_sandbox_kind"] for i in inv)
    assert kinds == {"open": 12, "open_address_on_customer": 1, "open_partial": 2, "paid": 3, "void": 2,
                     "draft": 2, "uncollectible": 1, "open_incomplete_address": 3, "open_old": 3}
    currencies = {i["currency"] for i in inv if i["_sandbox_kind"] == "open"}
    assert {"usd", "eur", "jpy", "kwd"} <= currencies
    countries = {i["customer_address"]["country"] for i in inv if i["_sandbox_kind"] == "open"}
    assert {"DE", "DK", "US", "GB", "FR", "JP"} <= countries
    for i in inv:
        if i["_sandbox_kind"] == "open":
            assert i["amount_paid"] == 0 and i["amount_remaining"] == i["amount_due"] > 0
            assert ANCHOR_TS - 60 * DAY <= i["created"] < ANCHOR_TS
            assert i["due_date"] < ANCHOR_TS
            if i["customer_address"]["country"] == "US":
                assert i["customer_address"]["state"]
        if i["_sandbox_kind"] == "open_old":
            assert ANCHOR_TS - 400 * DAY <= i["created"] <= ANCHOR_TS - 200 * DAY
        if i["_sandbox_kind"] == "open_partial":
            assert 0 < i["amount_paid"] and 0 < i["amount_remaining"] == i["amount_due"] - i["amount_paid"]
        if i["status"] == "draft":
            assert i["number"] is None
        else:
            assert i["number"].startswith("SBX-")
        if i["collection_method"] == "charge_automatically":
            assert i["due_date"] is None
    # deterministic: same anchor -> same ids
    assert [i["id"] for i in build_dataset(ANCHOR)["test"]["invoices"]] == [i["id"] for i in inv]
    live = data["live"]["invoices"]
    assert len(live) == 3 and all(i["livemode"] and i["status"] == "open" for i in live)


def test_pagination_starting_after_covers_everything_newest_first(sim):
    seen, pages = list_all(sim, limit=7)
    assert len(seen) == 29 and pages == 5
    assert len({i["id"] for i in seen}) == 29
    created = [i["created"] for i in seen]
    assert created == sorted(created, reverse=True)
    assert all("_sandbox_kind" not in i for i in seen)
    assert all(i["object"] == "invoice" and i["livemode"] is False for i in seen)


def test_default_limit_is_10_and_ending_before_goes_back(sim):
    first = call(sim, "/v1/invoices").json()
    assert len(first["data"]) == 10 and first["has_more"] is True
    second = call(sim, "/v1/invoices", {"starting_after": first["data"][-1]["id"], "limit": 5}).json()
    back = call(sim, "/v1/invoices", {"ending_before": second["data"][0]["id"], "limit": 3}).json()
    assert [i["id"] for i in back["data"]] == [i["id"] for i in first["data"][-3:]]
    assert back["has_more"] is True


def test_limit_validation(sim):
    for value, fragment in (("0", "greater than or equal to 1"), ("101", "less than or equal to 100"),
                            ("abc", "Invalid integer: abc")):
        r = call(sim, "/v1/invoices", {"limit": value})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "limit" and fragment in err["message"] and err["type"] == "invalid_request_error"
    r = call(sim, "/v1/invoices", {"bogus": "1"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "Received unknown parameter: bogus"


def test_status_filter(sim):
    counts = {s: len(list_all(sim, {"status": s}, limit=100)[0])
              for s in ("open", "paid", "void", "draft", "uncollectible")}
    assert counts == {"open": 21, "paid": 3, "void": 2, "draft": 2, "uncollectible": 1}
    r = call(sim, "/v1/invoices", {"status": "unpaid"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "status"


def test_created_range_filters(sim):
    gte = ANCHOR_TS - 90 * DAY
    recent, _ = list_all(sim, {"status": "open", "created[gte]": gte}, limit=4)
    assert len(recent) == 18
    assert all(i["created"] >= gte for i in recent)
    old = call(sim, "/v1/invoices", {"status": "open", "created[lte]": gte, "limit": 100}).json()["data"]
    assert len(old) == 3
    assert {i["id"] for i in old}.isdisjoint({i["id"] for i in recent})
    window = call(sim, "/v1/invoices", {"created[gt]": ANCHOR_TS - 30 * DAY, "created[lt]": ANCHOR_TS - 20 * DAY,
                                        "limit": 100}).json()["data"]
    assert window and all(ANCHOR_TS - 30 * DAY < i["created"] < ANCHOR_TS - 20 * DAY for i in window)
    exact = call(sim, "/v1/invoices", {"created": old[0]["created"]}).json()["data"]
    assert [i["id"] for i in exact] == [old[0]["id"]]
    r = call(sim, "/v1/invoices", {"created[gte]": "yesterday"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "created[gte]"


def test_collection_method_and_customer_filters(sim):
    auto = call(sim, "/v1/invoices", {"collection_method": "charge_automatically", "limit": 100}).json()["data"]
    assert len(auto) == 3 and all(i["due_date"] is None for i in auto)
    some = auto[0]["customer"]
    mine = call(sim, "/v1/invoices", {"customer": some, "limit": 100}).json()["data"]
    assert mine and all(i["customer"] == some for i in mine)


def test_expand_customer_and_address_fallback(sim):
    data = call(sim, "/v1/invoices", {"status": "open", "limit": 100, "expand[]": "data.customer"}).json()["data"]
    assert all(isinstance(i["customer"], dict) and i["customer"]["object"] == "customer" for i in data)
    fallback = [i for i in data if i["customer_address"] is not None
                and all(v is None for v in i["customer_address"].values())]
    assert len(fallback) == 1
    addr = fallback[0]["customer"]["address"]
    assert addr["line1"] and addr["city"] and addr["postal_code"] and addr["country"]
    no_addr = [i for i in data if i["customer_address"] is None]
    assert len(no_addr) == 1 and no_addr[0]["customer"]["address"] is None
    assert any(i["customer_address"] and i["customer_address"]["city"] == "" for i in data)
    assert any(i["customer_address"] and i["customer_address"]["country"] and
               i["customer_address"]["postal_code"] is None for i in data)
    # without expand the customer is an id
    plain = call(sim, "/v1/invoices", {"limit": 1}).json()["data"][0]
    assert plain["customer"].startswith("cus_")
    bad = call(sim, "/v1/invoices", {"expand[]": "data.nope"})
    assert bad.status_code == 400


def test_retrieve_invoice_customer_and_404(sim):
    inv = call(sim, "/v1/invoices", {"limit": 1}).json()["data"][0]
    one = call(sim, f"/v1/invoices/{inv['id']}")
    assert one.status_code == 200 and one.json()["id"] == inv["id"]
    cust = call(sim, f"/v1/customers/{inv['customer']}")
    assert cust.status_code == 200 and cust.json()["object"] == "customer"
    r = call(sim, "/v1/invoices/in_x")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["message"] == "No such invoice: 'in_x'" and err["code"] == "resource_missing"
    assert r.headers["Request-Id"].startswith("req_")
    r = call(sim, "/v1/customers/cus_nope")
    assert r.status_code == 404 and r.json()["error"]["message"] == "No such customer: 'cus_nope'"


def test_search_by_number_and_customer(sim):
    r = call(sim, "/v1/invoices/search", {"query": "number:'SBX-0001'"})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "search_result" and body["url"] == "/v1/invoices/search"
    assert [i["number"] for i in body["data"]] == ["SBX-0001"] and body["has_more"] is False
    assert body["next_page"] is None
    cust = body["data"][0]["customer"]
    by_cust = call(sim, "/v1/invoices/search", {"query": f'customer:"{cust}" AND status:"open"', "limit": 1}).json()
    assert by_cust["data"][0]["customer"] == cust and by_cust["has_more"] is True
    nxt = call(sim, "/v1/invoices/search", {"query": f'customer:"{cust}" AND status:"open"', "limit": 1,
                                            "page": by_cust["next_page"]}).json()
    assert nxt["data"][0]["id"] != by_cust["data"][0]["id"]
    assert call(sim, "/v1/invoices/search").status_code == 400
    assert call(sim, "/v1/invoices/search", {"query": "nonsense"}).status_code == 400


def test_auth_errors_and_basic_auth(sim):
    r = call(sim, "/v1/invoices", key=None)
    assert r.status_code == 401
    assert r.json()["error"]["message"].startswith("You did not provide an API key.")
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = call(sim, "/v1/invoices", key="sk_test_unknownkeyxxxx9876")
    assert r.status_code == 401
    assert r.json() == {"error": {"message": f"Invalid API Key provided: {mask_key('sk_test_unknownkeyxxxx9876')}",
                                  "type": "invalid_request_error"}}
    assert mask_key("sk_test_unknownkeyxxxx9876").endswith("9876")
    assert "unknownkey" not in mask_key("sk_test_unknownkeyxxxx9876")
    assert call(sim, "/v1/invoices", key=TEST_REVOKED_KEY).status_code == 401
    # HTTP Basic with the key as user name
    assert call(sim, "/v1/invoices", key=None, auth=(TEST_SECRET_KEY, "")).status_code == 200
    assert call(sim, "/v1/invoices", key=TEST_RESTRICTED_KEY).status_code == 200
    # runtime revoke and add
    sim.revoke(TEST_RESTRICTED_KEY)
    assert call(sim, "/v1/invoices", key=TEST_RESTRICTED_KEY).status_code == 401
    sim.add_key("sk_test_added_0001")
    assert call(sim, "/v1/invoices", key="sk_test_added_0001").status_code == 200


def test_restricted_key_without_invoice_read_gets_403(sim):
    r = call(sim, "/v1/invoices", key=TEST_RESTRICTED_NO_INVOICES_KEY)
    assert r.status_code == 403
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith("The provided key 'rk_test_")
    assert "77Qa'" in err["message"] and "on account 'acct_" in err["message"]
    assert "Having the 'rak_invoice_read' permission would allow this request to continue." in err["message"]
    inv = call(sim, "/v1/invoices", {"limit": 1}).json()["data"][0]
    assert call(sim, f"/v1/customers/{inv['customer']}", key=TEST_RESTRICTED_NO_INVOICES_KEY).status_code == 200


def test_live_key_sees_live_data_only(sim):
    seen, _ = list_all(sim, key=LIVE_SECRET_KEY)
    assert len(seen) == 3 and all(i["livemode"] is True for i in seen)
    r = call(sim, f"/v1/invoices/{seen[0]['id']}", key=TEST_SECRET_KEY)
    assert r.status_code == 404 and "exists in live mode" in r.json()["error"]["message"]


def test_rate_limit_429_with_tiny_limit(sim):
    clock = FakeClock()
    sim.clock = clock
    sim.set_faults({"rate_limit_per_s": 1})
    assert call(sim, "/v1/invoices", {"limit": 1}).status_code == 200
    r = call(sim, "/v1/invoices", {"limit": 1})
    assert r.status_code == 429
    assert r.json() == {"error": {"code": "rate_limit", "doc_url": "https://stripe.com/docs/error-codes/rate-limit",
                                  "message": r.json()["error"]["message"], "type": "invalid_request_error"}}
    assert r.json()["error"]["message"].startswith("Request rate limit exceeded")
    assert "retry-after" not in r.headers
    clock.t += 1.0
    assert call(sim, "/v1/invoices", {"limit": 1}).status_code == 200


def test_default_test_mode_limit_is_25_per_second(sim):
    sim.clock = FakeClock()
    codes = [call(sim, "/v1/invoices", {"limit": 1}).status_code for _ in range(26)]
    assert codes[:25] == [200] * 25 and codes[25] == 429


def test_fail_next_latency_counters_and_prefix(sim):
    sim.set_faults({"fail_next": [500, 429]})
    r1 = call(sim, "/v1/invoices")
    r2 = call(sim, "/v1/invoices")
    r3 = call(sim, "/stripe/v1/invoices", {"limit": 2}, prefix="/stripe")
    assert r1.status_code == 500 and r1.json()["error"]["type"] == "api_error"
    assert r2.status_code == 429 and r2.json()["error"]["code"] == "rate_limit"
    assert r3.status_code == 200 and len(r3.json()["data"]) == 2
    assert sim.faults.requests == 3 and sim.requests == 3
    assert sim.request_log[-1] == ("GET", "/v1/invoices?limit=2")
    with pytest.raises(ValueError):
        sim.set_faults({"nope": 1})


def test_request_log_is_bounded():
    f = Faults()
    for i in range(1005):
        f.record("GET", f"/{i}")
    assert f.requests == 1005 and len(f.request_log) == 1000 and f.request_log[0] == ("GET", "/5")


def test_basic_auth_header_raw(sim):
    token = base64.b64encode(f"{TEST_SECRET_KEY}:".encode()).decode()
    r = call(sim, "/v1/invoices", key=None, headers={"Authorization": f"Basic {token}"})
    assert r.status_code == 200
