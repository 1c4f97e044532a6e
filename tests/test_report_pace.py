"""The run report says how many requests a connection made and, when the spec's rate limit set the pace,
that only a higher limit makes it faster (not more partitions or workers): the question a person tuning a
slow run asks first. Against the built-in Stripe simulator, pages of 2 invoices."""
from __future__ import annotations

import asyncio
from pathlib import Path

from runner.spec import config
from runner.engine import pipeline
from runner.cli import report
from runner.net.http import reset_limiters
from runner.state.sqlite import Store

from conftest import page_size, stripe_workspace


def _plan(tmp: Path, rate_limit: dict | None):
    def edit(spec: dict) -> None:
        page_size(2)(spec)
        if rate_limit is None:
            spec["environments"]["sandbox"].pop("rate_limit", None)
        else:
            spec["environments"]["sandbox"]["rate_limit"] = rate_limit

    cfg = stripe_workspace(tmp, edit=edit, extra="    server_filters: false\n")
    reset_limiters()
    store = Store(":memory:")
    try:
        return asyncio.run(pipeline.sync(config.load(cfg), mode="plan", store=store))
    finally:
        store.close()


def _printed(result) -> str:
    from rich.console import Console

    out = Console(width=300, record=True, file=open("/dev/null", "w"))
    report.render_run(result, out=out)
    return out.export_text()


def test_a_run_held_to_the_specs_rate_limit_says_so(tmp_path):
    result = _plan(tmp_path, {"requests_per_second": 20, "concurrency": 4})
    (c,) = result.connections
    assert c.requests >= 10 and c.rate_limit == 20
    assert c.requests / c.seconds <= 20 * 1.1  # the limit held
    text = _printed(result)
    assert f"{c.requests} requests to the provider · " in text
    assert "paced by the stripe spec's rate limit (20 requests/s)" in text
    assert result.as_dict()["connections"][0]["paced_by_rate_limit"] is True


def test_a_run_without_a_limit_shows_its_requests_and_blames_no_limit(tmp_path):
    result = _plan(tmp_path, None)
    (c,) = result.connections
    assert c.requests >= 10 and c.rate_limit is None
    text = _printed(result)
    assert f"{c.requests} requests to the provider · " in text and "rate limit" not in text
    assert result.as_dict()["connections"][0]["paced_by_rate_limit"] is False
