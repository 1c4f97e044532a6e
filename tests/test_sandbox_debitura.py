"""Tests of the Debitura sandbox simulator, plus the real-socket SandboxServer."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from runner.sandbox import SIMULATORS, get_simulator, get_transport, reset_cache
from runner.sandbox.core import SandboxServer, SlidingWindow, transport
from runner.sandbox.debitura import PRODUCTION_KEY, REVOKED_KEY, TEST_KEY, DebituraSimulator
from runner.sandbox.stripe import TEST_SECRET_KEY, StripeSimulator

NOW = datetime.now(timezone.utc)


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sim() -> DebituraSimulator:
    return DebituraSimulator("production")


def case_body(ref: str = "SBX-0001", **over) -> dict:
    body = {
        "currencyCode": "EUR",
        "amountToRecover": 1840.50,
        "date": (NOW - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "dueDate": (NOW - timedelta(days=16)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "creditorReference": ref,
        "isTest": True,
        "debtor": {"type": "Company", "name": "Müller Maschinenbau GmbH", "address": "Industriestraße 12",
                   "zipCode": "70565", "city": "Stuttgart", "countryAlpha2": "DE",
                   "email": "buchhaltung@mueller-maschinenbau.example"},
    }
    for k, v in over.items():
        if k == "debtor" and v is not None:
            body["debtor"] = {**body["debtor"], **v}
        else:
            body[k] = v
    return body


def req(sim, method, path, body=None, key: str | None = PRODUCTION_KEY, headers=None, params=None):
    async def go():
        h = {"Accept": "application/json"}
        if key is not None:
            h["XApiKey"] = key
        h.update(headers or {})
        async with httpx.AsyncClient(transport=transport(sim), base_url="https://customer-api.debitura.com") as c:
            return await c.request(method, path, json=body, headers=h, params=params)

    return asyncio.run(go())


def test_me_and_auth(sim):
    r = req(sim, "GET", "/me")
    assert r.status_code == 200 and r.json()["companyName"] == "Sandbox Creditor ApS"
    assert uuid.UUID(r.json()["id"])
    missing = req(sim, "GET", "/me", key=None)
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    assert req(sim, "GET", "/me", key="nope").status_code == 401
    revoked = req(sim, "GET", "/me", key=REVOKED_KEY)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["message"]


def test_environment_mismatch_401_names_the_environment(sim):
    r = req(sim, "GET", "/me", key=TEST_KEY)
    assert r.status_code == 401 and "test environment" in r.json()["message"]
    test_sim = DebituraSimulator("test")
    r = req(test_sim, "GET", "/me", key=PRODUCTION_KEY)
    assert r.status_code == 401 and "production environment" in r.json()["message"]
    assert req(test_sim, "GET", "/me", key=TEST_KEY).status_code == 200


def test_create_case_success_shape(sim):
    r = req(sim, "POST", "/cases", case_body())
    assert r.status_code == 200, r.text
    c = r.json()
    assert uuid.UUID(c["id"]).version == 4
    assert re.fullmatch(r"[A-Z0-9]{8}", c["reference"])
    assert c["creditorReference"] == "SBX-0001" and c["lifecycle"] == "Active"
    assert c["grossAmount"] == 1840.50 == c["remainder"] and c["currency"] == "EUR"
    assert c["isTestCase"] is True and c["debtor"]["city"] == "Stuttgart" and c["dateCreated"]
    assert sim.cases() == [c]
    assert req(sim, "GET", f"/cases/{c['id']}").json() == c
    assert req(sim, "GET", "/cases/by-creditor-reference/SBX-0001").json()["id"] == c["id"]
    r404 = req(sim, "GET", "/cases/by-creditor-reference/NOPE-1")
    assert r404.status_code == 404 and r404.json()["businessErrors"][0]["type"] == "NotFound"
    assert req(sim, "GET", f"/cases/{uuid.uuid4()}").status_code == 404


@pytest.mark.parametrize("over, field", [
    ({"debtor": {"city": None}}, "Debtor.City"),
    ({"debtor": {"city": "  "}}, "Debtor.City"),
    ({"debtor": {"address": None}}, "Debtor.Address"),
    ({"debtor": {"countryAlpha2": "US", "stateAlpha2": None}}, "Debtor.StateAlpha2"),
    ({"debtor": {"countryAlpha2": "Germany"}}, "Debtor.CountryAlpha2"),
    ({"debtor": {"type": "Business"}}, "Debtor.Type"),
    ({"debtor": {"name": ""}}, "Debtor.Name"),
    ({"currencyCode": None}, "CurrencyCode"),
    ({"currencyCode": "EURO"}, "CurrencyCode"),
    ({"amountToRecover": 0}, "AmountToRecover"),
    ({"amountToRecover": -5}, "AmountToRecover"),
    ({"date": (NOW + timedelta(days=2)).isoformat()}, "Date"),
    ({"dueDate": (NOW + timedelta(days=2)).isoformat()}, "DueDate"),
    ({"dueDate": (NOW - timedelta(days=40)).isoformat()}, "DueDate"),  # before date
    ({"dueDate": None}, "DueDate"),
    ({"creditorReference": "X" * 51}, "CreditorReference"),
    ({"debtor": None}, "Debtor"),
])
def test_validation_errors_name_the_field(sim, over, field):
    r = req(sim, "POST", "/cases", case_body(**over))
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["title"] == "One or more validation errors occurred." and body["status"] == 400
    assert body["type"] == "https://tools.ietf.org/html/rfc7231#section-6.5.1"
    assert field in body["errors"] and all(isinstance(m, str) for m in body["errors"][field])
    assert sim.cases() == []


def test_valid_variants_accepted(sim):
    ok = [
        case_body("A-1", debtor={"countryAlpha2": "US", "stateAlpha2": "CA", "type": "Private"}),
        case_body("A-2", debtor={"type": "Person"}),
        case_body("A-3", currencyCode="JPY", amountToRecover=150000),
        case_body("A-4", currencyCode="KWD", amountToRecover=1250.750),
    ]
    for b in ok:
        r = req(sim, "POST", "/cases", b)
        assert r.status_code == 200, r.text
    assert len(sim.cases()) == 4


def test_idempotent_replay_and_conflict(sim):
    h = {"Idempotency-Key": "run-1:SBX-0001"}
    first = req(sim, "POST", "/cases", case_body(), headers=h)
    again = req(sim, "POST", "/cases", case_body(), headers=h)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert len(sim.cases()) == 1
    conflict = req(sim, "POST", "/cases", case_body(amountToRecover=99.0), headers=h)
    assert conflict.status_code == 422
    assert conflict.json()["businessErrors"][0]["type"] == "IdempotencyConflict"
    assert len(sim.cases()) == 1
    long_key = req(sim, "POST", "/cases", case_body("B-1"), headers={"Idempotency-Key": "k" * 256})
    assert long_key.status_code == 400 and "Idempotency-Key" in long_key.json()["errors"]


def test_400_is_not_stored_under_idempotency_key(sim):
    h = {"Idempotency-Key": "fix-and-retry"}
    bad = req(sim, "POST", "/cases", case_body(debtor={"city": None}), headers=h)
    assert bad.status_code == 400
    good = req(sim, "POST", "/cases", case_body(), headers=h)
    assert good.status_code == 200
    assert len(sim.cases()) == 1


def test_duplicate_creditor_reference(sim):
    assert req(sim, "POST", "/cases", case_body("DUP-1")).status_code == 200
    r = req(sim, "POST", "/cases", case_body("DUP-1", amountToRecover=10.0),
            headers={"Idempotency-Key": "another-key"})
    assert r.status_code == 400
    body = r.json()
    assert body["errors"]["CreditorReference"][0].startswith("DuplicateReference")
    assert body["businessErrors"][0]["type"] == "DuplicateReference"
    assert len(sim.cases()) == 1


def test_persistence_across_instances_with_same_data_dir(tmp_path):
    a = DebituraSimulator("production", data_dir=tmp_path)
    first = req(a, "POST", "/cases", case_body("P-1"), headers={"Idempotency-Key": "p1"})
    assert first.status_code == 200
    assert (tmp_path / "debitura-production.sqlite").exists()
    b = DebituraSimulator("production", data_dir=tmp_path)
    assert [c["id"] for c in b.cases()] == [first.json()["id"]]
    assert req(b, "GET", "/cases/by-creditor-reference/P-1").json()["id"] == first.json()["id"]
    replay = req(b, "POST", "/cases", case_body("P-1"), headers={"Idempotency-Key": "p1"})
    assert replay.status_code == 200 and replay.content == first.content
    dup = req(b, "POST", "/cases", case_body("P-1"))
    assert dup.status_code == 400 and "CreditorReference" in dup.json()["errors"]
    # the test environment has its own store
    t = DebituraSimulator("test", data_dir=tmp_path)
    assert t.cases() == []


def test_list_cases_pagination(sim):
    for i in range(3):
        assert req(sim, "POST", "/cases", case_body(f"L-{i}")).status_code == 200
    r = req(sim, "GET", "/cases", params={"Page": 1, "PageSize": 2}).json()
    assert r["page"] == {"totalResults": 3, "pageSize": 2, "currentPage": 1, "responseCount": 2, "totalPages": 2}
    assert [c["creditorReference"] for c in r["cases"]] == ["L-2", "L-1"]
    r2 = req(sim, "GET", "/cases", params={"Page": 2, "PageSize": 2}).json()
    assert [c["creditorReference"] for c in r2["cases"]] == ["L-0"]
    bad = req(sim, "GET", "/cases", params={"PageSize": 101})
    assert bad.status_code == 400 and "PageSize" in bad.json()["errors"]


def test_rate_limit_429_body_without_retry_after_header(sim):
    clock = FakeClock()
    sim.clock = clock
    sim.set_faults({"rate_limit_per_s": 0.5})
    assert req(sim, "GET", "/me").status_code == 200
    r = req(sim, "GET", "/me")
    assert r.status_code == 429
    body = r.json()
    assert body["error"] == "rate_limit_exceeded" and body["message"]
    assert body["retryAfter"] == pytest.approx(2.0, abs=0.01)
    assert "retry-after" not in r.headers
    clock.t += 2.0
    assert req(sim, "GET", "/me").status_code == 200


def test_sliding_window_limiter():
    clock = FakeClock()
    w = SlidingWindow(3, 60.0, clock=clock)
    assert [w.try_take()[0] for _ in range(4)] == [True, True, True, False]
    clock.t += 30
    allowed, wait = w.try_take()
    assert not allowed and wait == pytest.approx(30.0)
    clock.t += 30.001
    assert w.try_take()[0] is True


def test_accept_text_plain_and_fail_next(sim):
    assert req(sim, "GET", "/me", headers={"Accept": "text/plain"}).status_code == 406
    sim.set_faults({"fail_next": [503, 500]})
    r1, r2, r3 = (req(sim, "GET", "/me") for _ in range(3))
    assert r1.status_code == 503 and r2.status_code == 500 and "businessErrors" in r2.json()
    assert r3.status_code == 200
    assert sim.requests == 4


def test_registry_is_cached_and_lazy(tmp_path):
    reset_cache()
    assert set(SIMULATORS) >= {"stripe", "debitura", "debitura-test"}
    a = get_simulator("debitura-test", tmp_path)
    assert a is get_simulator("debitura-test", tmp_path) and a.environment == "test"
    assert get_simulator("debitura", tmp_path) is not a
    assert isinstance(get_transport("stripe"), httpx.AsyncBaseTransport)
    with pytest.raises(KeyError):
        get_simulator("nope")
    reset_cache()


def test_real_socket_server(tmp_path):
    stripe = StripeSimulator()
    deb = DebituraSimulator("production", data_dir=tmp_path)
    deb_test = DebituraSimulator("test", data_dir=tmp_path)
    with SandboxServer({"stripe": stripe, "debitura": deb, "debitura-test": deb_test}) as server:
        base = server.base_url
        assert base.startswith("http://127.0.0.1:") and not base.endswith(":0")
        with httpx.Client(timeout=10) as c:
            r = c.get(f"{base}/stripe/v1/invoices", params={"status": "open", "limit": 3, "expand[]": "data.customer"},
                      headers={"Authorization": f"Bearer {TEST_SECRET_KEY}"})
            assert r.status_code == 200 and len(r.json()["data"]) == 3 and r.headers["Request-Id"].startswith("req_")
            assert isinstance(r.json()["data"][0]["customer"], dict)
            h = {"XApiKey": PRODUCTION_KEY, "Accept": "application/json", "Idempotency-Key": "sock-1"}
            created = c.post(f"{base}/debitura/cases", json=case_body("SOCK-1"), headers=h)
            assert created.status_code == 200, created.text
            replay = c.post(f"{base}/debitura/cases", json=case_body("SOCK-1"), headers=h)
            assert replay.content == created.content
            mism = c.get(f"{base}/debitura-test/me", headers={"XApiKey": PRODUCTION_KEY})
            assert mism.status_code == 401 and "production environment" in mism.json()["message"]
            state = c.get(f"{base}/_sandbox/state").json()["simulators"]
            assert state["debitura"]["cases"] == 1 and state["debitura"]["requests"] == 2
            assert state["stripe"]["requests"] == 1 and state["debitura-test"]["cases"] == 0
            f = c.post(f"{base}/_sandbox/faults/debitura", json={"fail_next": [503], "latency_s": 0})
            assert f.status_code == 200 and deb.faults.fail_next == [503]
            assert c.get(f"{base}/debitura/me", headers={"XApiKey": PRODUCTION_KEY}).status_code == 503
            assert c.get(f"{base}/debitura/me", headers={"XApiKey": PRODUCTION_KEY}).status_code == 200
            assert c.post(f"{base}/_sandbox/faults/debitura", json={"bogus": 1}).status_code == 400
            assert c.get(f"{base}/nothing-here").status_code == 404
            assert c.post(f"{base}/_sandbox/reset").status_code == 200
            assert deb.cases() == [] and deb.requests == 0
    assert server.base_url is None
