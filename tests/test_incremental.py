"""Runs that cost what changed: a spec's change feed (`changes:`), the per-stream cursor, full scans at an
interval, on --full and when the cursor is older than the provider keeps changes."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from runner import sandbox
from runner.engine import pipeline
from runner.spec import config
from runner.state import open_store as Store  # the store a config names, on either backend

from conftest import run_cli, stripe_workspace, use_backend


def _apply(cfg_path, mode="apply", full=False):
    cfg = config.load(cfg_path)
    store = Store(cfg)
    try:
        result = asyncio.run(pipeline.sync(cfg, mode=mode, store=store, details=True, full=full))
    finally:
        store.close()
    (conn,) = result.connections
    assert conn.status == "ok", conn.error
    return cfg, conn


def _stripe(cfg):
    return sandbox.get_simulator("stripe", cfg.state_path.parent / "sandbox")


def _cases(cfg_path):
    out = cfg_path.parent / "out.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def _pay(sim, inv_id):
    inv = sim._find_invoice("test", inv_id)
    return sim.update_invoice(inv_id, "invoice.paid", status="paid", amount_paid=inv["amount_due"],
                              amount_remaining=0)


def _finalize(sim, inv_id):
    # finalizing gives a draft its number
    return sim.update_invoice(inv_id, "invoice.finalized", status="open", number=f"FIN-{inv_id[-6:]}",
                              due_date=int(time.time()) - 86400)


def test_second_run_reads_only_what_changed_and_each_changed_invoice_gets_one_verdict(tmp_path, backend):
    cfg_path = use_backend(stripe_workspace(tmp_path), backend)
    cfg, first = _apply(cfg_path)
    assert first.scan.mode == "full" and "no change cursor" in first.scan.reason
    sim = _stripe(cfg)
    imported = [v.invoice_id for v in first.verdicts if v.verdict == "imported"]
    draft = next(i["id"] for i in sim.data["test"]["invoices"] if i["status"] == "draft"
                 and i["customer"] in {i2["customer"] for i2 in sim.data["test"]["invoices"]
                                       if i2["id"] in imported})
    paid = imported[0]
    _pay(sim, paid)
    _pay(sim, paid)  # two events for one invoice: still one verdict
    _finalize(sim, draft)
    before = sim.requests
    cfg, second = _apply(cfg_path)
    assert second.scan.mode == "changes", second.scan.reason
    verdicts = {v.invoice_id: v for v in second.verdicts}
    assert sorted(verdicts) == sorted([paid, draft]) and len(second.verdicts) == 2
    # already imported: a duplicate here, as in a full scan; its re-check starts from scan.changed
    assert (verdicts[paid].verdict, verdicts[paid].reason) == ("skipped", "duplicate")
    assert verdicts[draft].verdict == "imported", verdicts[draft]
    assert second.scan.changed == {paid, draft}
    # the account, one page of events, and at most one customer look-up per changed invoice
    assert sim.requests - before <= 4, sim.request_log[-6:]
    assert any(path.startswith("/v1/events?") and "created%5Bgt%5D=" in path for _, path in sim.request_log[-4:])
    assert len(_cases(cfg_path)) == first.imported + 1
    # a third run with nothing changed reads one page of events: the changes within the spec's overlap (5
    # minutes, for clock differences) again, which are duplicates now; nothing new is sent
    before = sim.requests
    cfg, third = _apply(cfg_path)
    assert third.scan.mode == "changes" and {v.reason for v in third.verdicts} == {"duplicate"}
    assert len(_cases(cfg_path)) == first.imported + 1 and sim.requests - before <= 4


def test_full_flag_and_the_full_scan_interval_read_the_whole_window(tmp_path, backend):
    cfg_path = use_backend(stripe_workspace(tmp_path, extra="    full_scan_every: 12h\n"), backend)
    cfg, first = _apply(cfg_path)
    cfg, forced = _apply(cfg_path, full=True)
    assert forced.scan.mode == "full" and "--full" in forced.scan.reason
    assert forced.seen == first.seen
    store = Store(cfg)
    try:
        saved = store.cursor("s", "invoices")
        store.save_cursor("s", "invoices", saved["cursor"], saved["scope"], saved["full_at"] - 13 * 3600)
    finally:
        store.close()
    cfg, scheduled = _apply(cfg_path)
    assert scheduled.scan.mode == "full" and "full_scan_every is 12.0 hours" in scheduled.scan.reason
    cfg, after = _apply(cfg_path)
    assert after.scan.mode == "changes"


def test_a_cursor_older_than_the_providers_retention_means_a_full_scan_and_the_report_says_so(tmp_path, sandbox_env,
                                                                                             backend):
    cfg_path = use_backend(stripe_workspace(tmp_path), backend)
    cfg, first = _apply(cfg_path)
    store = Store(cfg)
    try:
        saved = store.cursor("s", "invoices")
        store.save_cursor("s", "invoices", saved["cursor"] - 31 * 86400, saved["scope"], saved["full_at"])
    finally:
        store.close()
    out = run_cli("apply", str(cfg_path), cwd=tmp_path, env=sandbox_env)
    assert "full scan of the window" in out.stdout and "longer than Stripe keeps changes (30.0 days)" in out.stdout


def test_a_run_that_fails_leaves_the_cursor_so_no_change_is_skipped(tmp_path, backend):
    cfg_path = use_backend(stripe_workspace(tmp_path), backend)
    cfg, first = _apply(cfg_path)
    store = Store(cfg)
    try:
        saved = store.cursor("s", "invoices")
    finally:
        store.close()
    sim = _stripe(cfg)
    paid = next(v.invoice_id for v in first.verdicts if v.verdict == "imported")
    _pay(sim, paid)
    sim.set_faults({"fail_next": [400]})  # the account request of the next run fails
    c = config.load(cfg_path)
    store = Store(c)
    try:
        failed = asyncio.run(pipeline.sync(c, mode="apply", store=store, details=True))
        assert failed.connections[0].status == "failed"
        assert store.cursor("s", "invoices") == saved
    finally:
        store.close()
    cfg, again = _apply(cfg_path)
    assert again.scan.mode == "changes" and {v.invoice_id for v in again.verdicts} == {paid}


def test_a_spec_without_a_change_feed_always_scans_fully(tmp_path, backend):
    cfg_path = use_backend(stripe_workspace(tmp_path, edit=lambda spec: spec.pop("changes")), backend)
    cfg, first = _apply(cfg_path)
    cfg, second = _apply(cfg_path)
    assert second.scan.mode == "full" and second.seen == first.seen
    store = Store(cfg)
    try:
        assert store.cursor("s", "invoices") is None
    finally:
        store.close()


def test_a_plan_reads_changes_but_never_moves_the_cursor(tmp_path, backend):
    cfg_path = use_backend(stripe_workspace(tmp_path), backend)
    cfg, first = _apply(cfg_path)
    sim = _stripe(cfg)
    paid = next(v.invoice_id for v in first.verdicts if v.verdict == "imported")
    _pay(sim, paid)
    for _ in range(2):
        cfg, plan = _apply(cfg_path, mode="plan")
        assert plan.scan.mode == "changes" and [v.invoice_id for v in plan.verdicts] == [paid]


def test_full_scan_every_is_checked_by_the_config_schema(tmp_path, sandbox_env):
    cfg_path = stripe_workspace(tmp_path, extra="    full_scan_every: daily\n")
    out = run_cli("validate", str(cfg_path), cwd=tmp_path, env=sandbox_env)
    assert out.returncode != 0
    assert "full_scan_every" in out.stdout + out.stderr and "1d" in out.stdout + out.stderr


def test_a_new_destination_reads_the_whole_window_again(tmp_path, backend):
    """The ledger is per destination: after runs into one file, a config that sends cases elsewhere has
    imported nothing there, so its first run there is a full scan, not the (empty) changes since."""
    cfg_path = use_backend(stripe_workspace(tmp_path), backend)
    cfg, first = _apply(cfg_path)
    cfg, second = _apply(cfg_path)
    assert second.scan.mode == "changes"
    cfg_path.write_text(cfg_path.read_text().replace("path: out.jsonl", "path: elsewhere.jsonl"))
    cfg, moved = _apply(cfg_path)
    assert moved.scan.mode == "full" and "destination" in moved.scan.reason
    assert moved.imported == first.imported


def test_a_key_that_may_not_read_events_gets_a_full_scan_that_says_why(tmp_path):
    from runner.sandbox import stripe as stripe_sim

    cfg_path = stripe_workspace(tmp_path)
    cfg, first = _apply(cfg_path)
    # a restricted key with read access to invoices and customers only: Stripe answers 403 on /v1/events
    (tmp_path / "sandbox-secrets" / "stripe_api_key").write_text(stripe_sim.TEST_RESTRICTED_KEY)
    cfg, second = _apply(cfg_path)
    assert second.scan.mode == "full" and "may not read Stripe's change feed" in second.scan.reason
    assert second.seen == first.seen and second.imported == 0
