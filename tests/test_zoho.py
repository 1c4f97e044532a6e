"""Zoho Books: the data centre comes from the OAuth redirect and token response, organizations are never guessed,
unpaid excludes partially paid, each contact is fetched once, and the 20-refresh-token limit is respected."""
from __future__ import annotations

import asyncio
import threading

import pytest

from oauth_helpers import Sandbox, by_name, load, play_browser, run_sync, write_config, zoho_connection
from runner.errors import AccountMismatch


@pytest.fixture
def sb():
    with Sandbox() as s:
        yield s


def _connect(cfg_path, name, user, *, force=False):
    from runner.cli.connect import connect_flow
    from runner.state.sqlite import Store

    cfg = load(cfg_path)
    store = Store(cfg.state_path)
    lines: list[str] = []

    def browser(url):
        threading.Thread(target=play_browser, args=(url, user), daemon=True).start()

    try:
        result = asyncio.run(connect_flow(cfg.connection(name), store, open_browser=False, timeout=20,
                                          on_url=browser, echo=lines.append, force=force))
        return result, lines
    finally:
        store.close()


def test_eu_account_connect_then_every_call_goes_to_the_eu(sb, tmp_path):
    cfg = write_config(tmp_path, zoho_connection(sb, bootstrap=False))
    # The EU user has two organizations and the config pins none: connect saves the authorization but stops
    # with the list and the exact line to add.
    with pytest.raises(AccountMismatch) as exc:
        _connect(cfg, "acme-zoho", "ulla")
    err = exc.value
    assert "2 accounts" in err.message and "20001 (Ulla's Nordic Trading ApS)" in err.message
    assert "20002 (Ulla Holding GmbH)" in err.message
    assert 'options: {organization_id: "20001"}' in err.fix and 'options: {organization_id: "20002"}' in err.fix
    from runner.state.sqlite import Store

    store = Store(load(cfg).state_path)
    data = store.connection("acme-zoho")["data"]
    store.close()
    assert data["accounts_server"] == sb.server.url("zoho") + "/accounts.zoho.eu"  # from the redirect
    assert data["api_domain"] == sb.server.url("zoho") + "/www.zohoapis.eu"  # from the token response
    assert data["location"] == "eu"
    # The same config with one line added runs; every call after the login went to the EU hosts.
    cfg = write_config(tmp_path, zoho_connection(sb, bootstrap=False, options='organization_id: "20001"'))
    sb.zoho.calls_by_host.clear()
    sb.zoho.oauth.expire_access_tokens()  # so the run refreshes too
    res = by_name(run_sync(cfg), "acme-zoho")
    assert res.status == "ok", res.error
    assert res.account_name == "Ulla's Nordic Trading ApS" and res.account_id == "20001"
    assert res.seen == 7  # 6 unpaid + 1 partially paid in the window (server-side filters)
    assert set(sb.zoho.calls_by_host) == {"accounts.zoho.eu", "www.zohoapis.eu"}
    assert sb.zoho.calls_by_host["www.zohoapis.eu"] > 3


def test_pinned_organization_the_token_cannot_see(sb, tmp_path):
    cfg = write_config(tmp_path, zoho_connection(sb, options='organization_id: "20002"'))  # sam's token
    res = by_name(run_sync(cfg), "acme-zoho")
    assert res.status == "failed"
    assert "organization_id 20002" in res.error and "cannot see" in res.error
    assert "60001 (Sam's Shop LLC)" in res.error and "60002 (Sam's Side Hustle)" in res.error
    assert not any("/invoices" in p for _, p in sb.zoho.request_log)


def test_unpaid_pages_and_contacts_fetched_once(sb, tmp_path):
    from runner.engine import pipeline
    from runner.state.sqlite import Store

    cfg = load(write_config(tmp_path, zoho_connection(sb, options='organization_id: "60001"')))
    store = Store(cfg.state_path)
    res = asyncio.run(pipeline.sync(cfg, mode="plan", store=store, details=True)).connections[0]
    store.close()
    assert res.status == "ok", res.error
    lists = [p for _, p in sb.zoho.request_log if p.split("?")[0].endswith("/books/v3/invoices")]
    assert len(lists) == 2  # 232 unpaid-view invoices in pages of 200, until has_more_page is false
    assert all("status=unpaid" in p and "date_start=" in p and "per_page=200" in p for p in lists)
    assert "page=2" in lists[1]
    # Four customers: four contact fetches, however many invoices each has.
    assert sorted(sb.zoho.contact_fetches.values()) == [1, 1, 1, 1]
    v = {x.number: x for x in res.verdicts}
    partial = [x for x in res.verdicts if x.reason == "not_unpaid"]
    assert len(partial) == 1 and "partially paid" in partial[0].message
    assert not any(x.number in v and x.reason == "not_unpaid" and "draft" in x.message for x in res.verdicts)
    ok = next(x for x in res.verdicts if x.verdict == "imported")
    assert ok.invoice["debtor"]["address"]["country"] in ("US", "GB")
    missing = [x for x in res.verdicts if x.reason == "incomplete_address"]
    assert missing and all("country" in x.message for x in missing)  # Initech has no country


def test_connect_warns_about_the_token_limit_and_reuses_the_grant(sb, tmp_path):
    cfg = write_config(tmp_path, zoho_connection(sb, bootstrap=False, options='organization_id: "60001"'))
    result, lines = _connect(cfg, "acme-zoho", "sam")
    assert result["account_name"] == "Sam's Shop LLC" and not result["reused"]
    assert any("20 refresh tokens" in line for line in lines)
    live = len(sb.zoho.oauth.live_grants("sam"))
    # Connecting again while the stored grant works makes no new refresh token.
    result, lines = _connect(cfg, "acme-zoho", "sam")
    assert result["reused"] and len(sb.zoho.oauth.live_grants("sam")) == live
    # --force makes a new one and gives the replaced one back (revoked), so the count stays the same.
    result, lines = _connect(cfg, "acme-zoho", "sam", force=True)
    assert not result["reused"] and len(sb.zoho.oauth.live_grants("sam")) == live


def test_simulator_deletes_the_oldest_of_21_refresh_tokens(sb):
    from runner.sandbox.zoho import CLIENT_ID

    for i in range(21):
        sb.zoho.oauth.add_grant(f"1000.t{i}", CLIENT_ID, "ines", "x")
        sb.zoho.oauth._enforce_limit("ines")
    live = {g.refresh_token for g in sb.zoho.oauth.live_grants("ines")}
    assert len(live) == 20 and "1000.t0" not in live and "1000.t20" in live


def test_a_self_client_token_from_another_data_centre_is_named_as_such(sb, tmp_path):
    """A refresh token made outside `runner connect` in the EU data centre, with no accounts server set: the
    default (.com) accounts server refuses it with invalid_code, which is not "revoked": the runner says which
    server it asked and how to name the right one, and does not block the next run."""
    from oauth_helpers import ROOT, SECRETS
    from runner.sandbox import zoho as zs
    from runner.state.sqlite import Store

    spec = (ROOT / "integrations.d" / "zoho_books.yaml").read_text()
    d = tmp_path / "specs"
    d.mkdir()
    # The spec's built-in default accounts server is the simulator's .com one (as accounts.zoho.com in production).
    (d / "zoho_books.yaml").write_text(spec.replace("sandbox://zoho/accounts.zoho.com", sb.zoho_accounts))
    rt = "1000.selfclient.ulla.eu00000000000000000000"
    sb.zoho.oauth.add_grant(rt, zs.CLIENT_ID, "ulla", "ZohoBooks.fullaccess.all")
    (tmp_path / "rt").write_text(rt)

    def conn(options: str) -> str:
        return f"""
  - name: acme-zoho
    integration: zoho_books
    environment: sandbox
    credentials:
      client_id: "${{file:{SECRETS}/zoho_client_id}}"
      client_secret: "${{file:{SECRETS}/zoho_client_secret}}"
      refresh_token: "${{file:{tmp_path}/rt}}"
    options: {{{options}}}
"""

    cfg = write_config(tmp_path, conn('organization_id: "20001"'), integrations_dir=str(d))
    res = by_name(run_sync(cfg, mode="apply"), "acme-zoho")
    assert res.status == "failed", res.error
    assert "invalid_code" in res.error and "data centre" in res.error and sb.zoho_accounts in res.error
    assert "revoked, it expired" not in res.error
    assert "options: {accounts_server: ...}" in res.fix and "runner connect acme-zoho" in res.fix
    assert rt not in res.error + res.fix
    store = Store(load(cfg).state_path)
    assert store.connection("acme-zoho")["status"] != "needs_reconnect"
    store.close()
    # Naming the EU accounts server is all it takes.
    eu = sb.server.url("zoho") + "/accounts.zoho.eu"
    cfg = write_config(tmp_path, conn(f'organization_id: "20001", accounts_server: "{eu}"'), integrations_dir=str(d))
    res = by_name(run_sync(cfg, mode="apply"), "acme-zoho")
    assert res.status == "ok", res.error
    assert res.account_name == "Ulla's Nordic Trading ApS"
