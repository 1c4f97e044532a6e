"""QuickBooks Online: the query language, unpaid meaning the whole balance, free-text countries, the company
that is connected (read every run, pinned with `expect:`), over real sockets."""
from __future__ import annotations

import json

import pytest

from runner.sandbox import quickbooks as qb
from oauth_helpers import ROOT, Sandbox, by_name, qbo_connection, run_sync, write_config


@pytest.fixture
def sb():
    with Sandbox() as s:
        yield s


def _verdicts(res):
    return {v.number: v for v in res.verdicts}


def test_invoices_verdicts_and_company(sb, tmp_path):
    from runner.engine import pipeline
    from runner.state.sqlite import Store
    from oauth_helpers import load
    import asyncio

    cfg = load(write_config(tmp_path, qbo_connection(sb)))
    store = Store(cfg.state_path)
    res = asyncio.run(pipeline.sync(cfg, mode="plan", store=store, details=True)).connections[0]
    store.close()
    assert res.status == "ok", res.error
    assert (res.account_id, res.account_name) == (qb.REALM_US, "Sandbox Company_US_1")
    v = _verdicts(res)
    assert v["1001"].verdict == "imported" and v["1001"].invoice["debtor"]["address"]["country"] == "US"  # "USA"
    assert v["1006"].verdict == "imported" and v["1006"].invoice["debtor"]["address"]["country"] == "US"  # "U.S.A."
    # A sparse BillAddr on the invoice: the customer's full address is used ("United States" -> US).
    assert v["1002"].verdict == "imported"
    assert v["1002"].invoice["debtor"]["address"] == {"street": "12 Ocean Dr.", "city": "Half Moon Bay",
                                                       "postal_code": "94213", "state": "CA", "country": "US"}
    # No country anywhere / a country nobody knows: a clear address verdict, never a guess.
    assert v["1003"].reason == "incomplete_address" and "country" in v["1003"].message
    assert v["1007"].reason == "incomplete_address" and "country" in v["1007"].message
    # Partially paid (balance below the total) and paid are not imported.
    assert v["1004"].reason == "not_unpaid" and "partially paid" in v["1004"].message
    assert v["1005"].reason == "not_unpaid"
    assert v["1009"].reason == "outside_date_window"
    # Customers are fetched once each, and only for invoices whose own address is incomplete.
    customer_calls = [p for _, p in sb.qbo.request_log if "/customer/" in p]
    assert len(customer_calls) == len(set(customer_calls)) == 2


def test_server_side_query_and_empty_result(sb, tmp_path):
    """With server filters the query carries `Balance > '0'` and the TxnDate window; a window with nothing in
    it answers without an `Invoice` key at all, which is an empty result, not an error."""
    conn = qbo_connection(sb).replace("    server_filters: false\n", "    window: {from: 2001-01-01, to: 2001-12-31}\n")
    res = by_name(run_sync(write_config(tmp_path, conn)), "acme-qbo")
    assert res.status == "ok" and res.seen == 0
    q = [p for _, p in sb.qbo.request_log if "/query" in p][0]
    from urllib.parse import parse_qs, urlsplit

    text = parse_qs(urlsplit(q).query)["query"][0]
    assert "Balance > '0'" in text and "TxnDate >= '2001-01-01'" in text and "TxnDate <= '2001-12-31'" in text
    assert "STARTPOSITION 1 MAXRESULTS 1000" in text
    assert "why" not in (res.error or "")
    assert "no invoices" in res.why_zero()


def test_pinned_company_mismatch_names_both(sb, tmp_path):
    conn = qbo_connection(sb, extra=f'\n    expect: {{account_id: "{qb.REALM_DK}", account_name: "Nordlys Consulting ApS"}}')
    res = by_name(run_sync(write_config(tmp_path, conn), mode="apply"), "acme-qbo")
    assert res.status == "failed" and res.seen == 0
    assert "Sandbox Company_US_1" in res.error and qb.REALM_US in res.error  # the connected company
    assert "Nordlys Consulting ApS" in res.error and qb.REALM_DK in res.error  # the expected one
    assert "runner connect acme-qbo" in res.fix
    assert not any("/query" in p for _, p in sb.qbo.request_log)  # not one invoice was read


def test_pinned_company_by_name_only(sb, tmp_path):
    conn = qbo_connection(sb, extra='\n    expect: {account_name: "Sandbox Company_US_1"}')
    res = by_name(run_sync(write_config(tmp_path, conn)), "acme-qbo")
    assert res.status == "ok" and res.seen == 9


def test_query_language_simulator():
    rows = [{"Id": str(i), "Balance": float(i % 3), "TxnDate": f"2024-01-{i:02d}"} for i in range(1, 21)]
    got = qb.run_query("select * from Invoice where Balance > '0' and TxnDate >= '2024-01-05' "
                       "ORDERBY Id STARTPOSITION 1 MAXRESULTS 4", {"Invoice": rows})
    assert [r["Id"] for r in got["Invoice"]] == ["5", "7", "8", "10"]
    assert qb.run_query("select * from Invoice where Balance > '5'", {"Invoice": rows}) == {}
    with pytest.raises(qb.QueryError):
        qb.run_query("select * from Invoice where Balance > 0 or Id = '1'", {"Invoice": rows})


def test_unknown_company_is_an_error_with_the_fix(sb, tmp_path):
    """A bootstrap refresh token without the realm id: the runner cannot know the company, and says so."""
    conn = qbo_connection(sb).replace('    options: {realm_id: "9130357766961111"}', "")
    res = by_name(run_sync(write_config(tmp_path, conn), mode="apply"), "acme-qbo")
    assert res.status == "failed" and "realm_id" in res.error
    assert res.fix.startswith("runner connect acme-qbo")
    assert not any("/v3/company" in p for _, p in sb.qbo.request_log)


def test_pin_is_checked_against_the_company_not_a_configured_ledger_name(sb, tmp_path):
    conn = qbo_connection(sb, extra=f'\n    account_id: books-us\n    expect: {{account_id: "{qb.REALM_US}"}}')
    res = by_name(run_sync(write_config(tmp_path, conn)), "acme-qbo")
    assert res.status == "ok" and res.seen == 9
    assert res.account_id == "books-us"


def test_connections_to_the_same_company_share_its_rate_limit(sb, tmp_path):
    from runner.spec import config as config_mod
    from runner.engine import pipeline
    from runner.net.http import Clients, reset_limiters

    reset_limiters()
    path = write_config(tmp_path, qbo_connection(sb, "books-1"), qbo_connection(sb, "books-2"),
                        qbo_connection(sb, "books-other", extra=""))
    text = path.read_text()
    # the third connection names another company
    i = text.rindex('realm_id: "9130357766961111"')
    path.write_text(text[:i] + 'realm_id: "4620816365257778"' + text[i + len('realm_id: "9130357766961111"'):])
    cfg = config_mod.load(path)
    clients = Clients()
    a, b, other = (pipeline.Source(cfg.connection(n), clients) for n in ("books-1", "books-2", "books-other"))
    assert a.http.limiter is b.http.limiter  # QuickBooks limits per company (realm), not per connection
    assert a.http.limiter is not other.http.limiter


def test_single_currency_company_invoices_get_the_home_currency(sb, tmp_path):
    rt = "AB11sandboxQBOrefreshTokenForBjorn00000"
    sb.qbo.oauth.add_grant(rt, qb.CLIENT_ID, "bjorn", "com.intuit.quickbooks.accounting")
    (tmp_path / "rt").write_text(rt)
    conn = qbo_connection(sb).replace(str(ROOT / "sandbox-secrets" / "quickbooks_refresh_token"), str(tmp_path / "rt"))
    conn = conn.replace('realm_id: "9130357766961111"', f'realm_id: "{qb.REALM_DK}"')
    sb.qbo.request_log.clear()
    path = write_config(tmp_path, conn)
    res = by_name(run_sync(path, mode="apply"), "acme-qbo")
    assert res.status == "ok", res.error and res.imported > 0
    cases = [json.loads(line) for line in (tmp_path / "out" / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == res.imported
    assert {c["invoice"]["currency"] for c in cases} == {"DKK"} == {c["case"]["currencyCode"] for c in cases}
    assert sum("/preferences" in p for _, p in sb.qbo.request_log) == 1  # once per run, not per invoice
