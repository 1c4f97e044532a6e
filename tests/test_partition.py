"""`invoices.partition: {by: window}`: the date window fetched as concurrent sub-windows, nothing twice.

Runs against the built-in Stripe simulator (its created[gte]/[lte] filters and cursor paging), with the
real integrations.d/stripe.yaml plus a partition, and compares with the same sync unpartitioned.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from runner import sandbox
from runner.spec import config
from runner.engine import pipeline
from runner.engine import workers
from runner.errors import ProviderError
from runner.net.http import Clients, reset_limiters
from runner.state.sqlite import Store

from conftest import page_size, stripe_workspace


def _workspace(tmp: Path, partition: dict | None, window: str = "{last: 3y}") -> Path:
    def edit(spec: dict) -> None:
        if partition is not None:
            spec["invoices"]["partition"] = partition

    return stripe_workspace(tmp, edit=edit, window=window)


def _plan(cfg_path: Path):
    reset_limiters()
    cfg = config.load(cfg_path)
    store = Store(":memory:")
    try:
        return asyncio.run(pipeline.sync(cfg, mode="plan", store=store, details=True))
    finally:
        store.close()


def test_sub_windows_are_disjoint_whole_seconds_and_cover_the_window(tmp_path):
    cfg = config.load(_workspace(tmp_path, {"by": "window", "parts": 7, "min_seconds": 60}))
    conn = cfg.connections[0]
    src = pipeline.Source(conn, Clients(), None)
    parts = src.partitions()
    assert len(parts) == 7
    assert parts[0]["start"] == conn.window.start and parts[-1]["end"] == conn.window.end
    for a, b in zip(parts, parts[1:]):
        # created[lte] of one is exactly one second before created[gte] of the next: no overlap, no gap
        assert int(b["start"].timestamp()) - int(a["end"].timestamp()) == 1
        assert b["start"].timestamp() == int(b["start"].timestamp())


def test_short_window_is_not_split_below_min_seconds(tmp_path):
    cfg = config.load(_workspace(tmp_path, {"by": "window", "parts": 8, "min_seconds": 43200}, "{last: 2d}"))
    assert len(pipeline.Source(cfg.connections[0], Clients(), None).partitions()) == 3  # 2 days less a fraction of a second, 12 h minimum


def test_no_partition_without_server_side_window(tmp_path):
    path = _workspace(tmp_path, {"by": "window", "parts": 4})
    path.write_text(path.read_text() + "    server_filters: false\n")
    cfg = config.load(path)
    assert pipeline.Source(cfg.connections[0], Clients(), None).partitions() == [None]


def test_partitioned_sync_sees_exactly_the_same_invoices(tmp_path):
    one = _plan(_workspace(tmp_path / "one", None))
    split = _plan(_workspace(tmp_path / "split", {"by": "window", "parts": 6, "min_seconds": 60}))
    a, b = one.connections[0], split.connections[0]
    assert a.status == b.status == "ok", (a.error, b.error)
    ids_a = sorted(v.invoice_id for v in a.verdicts)
    ids_b = sorted(v.invoice_id for v in b.verdicts)
    assert ids_a and ids_a == ids_b  # nothing lost, nothing twice
    assert a.counts == b.counts
    assert b.requests >= 6  # one paginator per sub-window


@pytest.mark.skipif(not workers._wanted(), reason="needs fork and a second core")
def test_a_sub_window_failing_mid_run_leaves_a_summary_that_counts_every_page_delivered(tmp_path, monkeypatch):
    """One sub-window fails on its third page while the other sub-windows have pages fetched and handed to the
    workers, queued behind the failure (slow workers keep the queue full). The connection fails, and every page
    fetched before the failure is still finished: what the run's summary counts is exactly what it delivered
    and recorded (such pages used to be dropped from the summary while a worker wrote and recorded them)."""
    monkeypatch.delenv("RUNNER_WORKERS", raising=False)
    real_send, real_classify = pipeline.Source.send_spec, workers._classify_page
    failing: list = []

    async def one_window_fails_on_page_3(self, req_spec, ctx, extra_params=None, url=None, ok=()):
        window, page = ctx.get("window") or {}, (ctx.get("page") or {}).get("number")
        if page == 3 and (not failing or failing[0] == window.get("start")):
            failing[:] = [window.get("start")]
            await asyncio.sleep(0.3)  # the other sub-windows fill the queue meanwhile
            raise ProviderError("the provider refused this page (injected)")
        return await real_send(self, req_spec, ctx, extra_params, url, ok)

    def slow_worker(*args, **kwargs):
        time.sleep(0.05)
        return real_classify(*args, **kwargs)

    monkeypatch.setattr(pipeline.Source, "send_spec", one_window_fails_on_page_3)
    monkeypatch.setattr(workers, "_classify_page", slow_worker)

    def edit(spec: dict) -> None:
        page_size(3)(spec)
        spec["invoices"]["partition"] = {"by": "window", "parts": 3, "min_seconds": 60}
        spec["environments"]["sandbox"].pop("rate_limit", None)  # the other sub-windows fetch at once

    cfg = config.load(stripe_workspace(tmp_path, edit=edit, window="{last: 80d}"))
    sandbox.get_simulator("stripe", cfg.state_path.parent / "sandbox").set_synthetic(120)
    reset_limiters()
    store = Store(cfg.state_path)
    try:
        result = asyncio.run(pipeline.sync(cfg, mode="apply", store=store))
        (c,) = result.connections
        recorded = store.db.execute("SELECT count(*) FROM verdicts WHERE run_id=?", (result.run_id,)).fetchone()[0]
        imported = store.db.execute("SELECT count(*) FROM ledger WHERE run_id=? AND status='delivered'",
                                    (result.run_id,)).fetchone()[0]
    finally:
        store.close()
    assert failing and c.status == "failed" and "injected" in c.error
    lines = (cfg.state_path.parent / "out.jsonl").read_bytes().splitlines()
    assert c.imported == imported == len(lines) > 0
    assert c.seen == recorded + imported
