"""The change feeds of QuickBooks Online (change data capture, deletions included, at most 1,000 objects) and
Zoho Books (last_modified_time), against their simulators over real sockets."""
from __future__ import annotations

import pytest

from oauth_helpers import Sandbox, by_name, qbo_connection, run_sync, write_config, zoho_connection
from runner.sandbox import quickbooks as qb


@pytest.fixture
def sb():
    with Sandbox() as s:
        yield s


def _filtered(conn: str) -> str:
    return conn.replace("    server_filters: false\n", "")


def test_quickbooks_reads_cdc_after_the_first_run_and_hands_deletions_to_the_recheck(sb, tmp_path):
    cfg = write_config(tmp_path, _filtered(qbo_connection(sb)))
    first = by_name(run_sync(cfg, "apply"), "acme-qbo")
    assert first.status == "ok", first.error
    assert first.scan.mode == "full"
    invoices = sb.qbo.data[qb.REALM_US]["Invoice"]
    changed = next(i for i in invoices if i["DocNumber"] == "1001")
    changed["Balance"] = 0  # paid at the source
    sb.qbo.record_change(qb.REALM_US, changed)
    gone = next(i for i in invoices if i["DocNumber"] == "1006")
    sb.qbo.record_change(qb.REALM_US, gone, deleted=True)
    sb.qbo.request_log.clear()
    second = by_name(run_sync(cfg, "apply"), "acme-qbo")
    assert second.status == "ok", second.error
    assert second.scan.mode == "changes", second.scan.reason
    assert second.scan.changed == {changed["Id"], gone["Id"]} and second.scan.deleted == {gone["Id"]}
    assert second.seen == 1  # the deleted invoice has nothing to classify
    cdc = [p for _, p in sb.qbo.request_log if "/cdc?" in p]
    assert len(cdc) == 1 and "entities=Invoice" in cdc[0] and "changedSince=" in cdc[0]
    assert not [p for _, p in sb.qbo.request_log if "/query?" in p]


def test_quickbooks_cdc_answer_at_its_limit_turns_the_run_into_a_full_scan(sb, tmp_path):
    cfg = write_config(tmp_path, _filtered(qbo_connection(sb)))
    first = by_name(run_sync(cfg, "apply"), "acme-qbo")
    invoices = sb.qbo.data[qb.REALM_US]["Invoice"]
    template = dict(invoices[0])
    for n in range(1000):  # 1,000 changes: CDC's most in one answer, so it may have left some out
        inv = dict(template, Id=str(90000 + n), DocNumber=f"B{n}")
        invoices.append(inv)
        sb.qbo.record_change(qb.REALM_US, inv)
    second = by_name(run_sync(cfg, "apply"), "acme-qbo")
    assert second.status == "ok", second.error
    assert second.scan.mode == "full" and "its most in one answer" in second.scan.reason
    assert second.seen > first.seen


def test_zoho_reads_invoices_modified_since_the_last_run(sb, tmp_path):
    cfg = write_config(tmp_path, zoho_connection(sb, options='organization_id: "60001"'))
    first = by_name(run_sync(cfg, "apply"), "acme-zoho")
    assert first.status == "ok", first.error
    assert first.scan.mode == "full"
    inv = sb.zoho.orgs["60001"]["invoices"][0]
    inv["status"], inv["balance"] = "paid", 0.0
    sb.zoho.record_change("60001", inv)
    sb.zoho.request_log.clear()
    contacts = sum(sb.zoho.contact_fetches.values())
    second = by_name(run_sync(cfg, "apply"), "acme-zoho")
    assert second.status == "ok", second.error
    assert second.scan.mode == "changes", second.scan.reason
    assert second.seen == 1 and second.scan.changed == {inv["invoice_id"]}
    lists = [p for _, p in sb.zoho.request_log if p.split("?")[0].endswith("/books/v3/invoices")]
    assert len(lists) == 1 and "last_modified_time=" in lists[0]
    # a paid invoice gets its verdict without its customer: Zoho counts every call against a daily budget
    assert sum(sb.zoho.contact_fetches.values()) == contacts
    assert [p for _, p in sb.zoho.request_log if "/books/v3/" in p] == [
        p for _, p in sb.zoho.request_log if "/organizations" in p or "/invoices?" in p]
