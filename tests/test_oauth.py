"""OAuth2 over real sockets: connect flow, refresh before expiry and on 401, rotation that survives a crash,
revoked grants, and no concurrent refreshes of one connection."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from oauth_helpers import (ROOT, Sandbox, by_name, load, play_browser, qbo_connection, run_sync, runner_cmd,
                                 write_config, zoho_connection)
from runner.sandbox import quickbooks as qb

from conftest import use_backend


@pytest.fixture
def sb():
    with Sandbox() as s:
        yield s


def _store(path):
    from conftest import store_of

    return store_of(path)


def test_connect_cli_end_to_end(sb, tmp_path):
    """`runner connect --no-browser` prints the URL; the test plays the browser (logs in as the Danish company's
    user); the runner checks state, uses PKCE, stores the token and the realm id, and shows the company."""
    cfg = write_config(tmp_path, qbo_connection(sb, bootstrap=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "runner", "connect", str(cfg), "acme-qbo", "--no-browser",
                             "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        for line in proc.stdout:
            if line.strip().startswith("http"):
                url = line.strip()
                break
        assert url, "no authorize URL printed"
        q = parse_qs(urlsplit(url).query)
        assert urlsplit(url).path == "/quickbooks/connect/oauth2"
        assert q["code_challenge_method"] == ["S256"] and q["code_challenge"] and q["state"]
        assert q["scope"] == ["com.intuit.quickbooks.accounting"]
        redirect = q["redirect_uri"][0]
        assert redirect.startswith("http://127.0.0.1:") and redirect.endswith("/callback")
        page = play_browser(url, "bjorn")
        assert page.status_code == 200
        out = proc.stdout.read()
        assert proc.wait(timeout=30) == 0, out
    finally:
        proc.kill()
    assert "Nordlys Consulting ApS (9130357766962222)" in out
    store = _store(cfg)
    tok = store.get_token("acme-qbo")
    assert tok["refresh_token"] and tok["access_token"] and tok["connected"]
    assert store.connection("acme-qbo")["data"]["realm_id"] == qb.REALM_DK
    # The secret values never reach the terminal.
    assert tok["access_token"] not in out and tok["refresh_token"] not in out
    assert (ROOT / "sandbox-secrets" / "quickbooks_client_secret").read_text().strip() not in out
    store.close()
    # A run then reads the connected company's invoices.
    res = run_sync(cfg)
    c = by_name(res, "acme-qbo")
    assert c.status == "ok" and c.account_name == "Nordlys Consulting ApS" and c.seen == 7


def test_connect_refuses_forged_state(sb, tmp_path):
    from runner.errors import AuthError
    from runner.cli.connect import connect_flow
    from runner.state.sqlite import Store

    cfg = load(write_config(tmp_path, qbo_connection(sb, bootstrap=False)))
    store = Store(cfg.state_path)
    lines = []

    def browser(url):
        import threading

        threading.Thread(target=play_browser, args=(url, "alice"), kwargs={"tamper_state": True}, daemon=True).start()

    with pytest.raises(AuthError, match="different `state`"):
        asyncio.run(connect_flow(cfg.connection("acme-qbo"), store, open_browser=False, timeout=20, on_url=browser,
                                 echo=lines.append))
    assert store.get_token("acme-qbo") is None
    assert sb.qbo.oauth.token_requests == 0  # the code was never exchanged
    store.close()


def test_refresh_before_expiry_without_a_401(sb, tmp_path):
    cfg = write_config(tmp_path, qbo_connection(sb))
    assert by_name(run_sync(cfg), "acme-qbo").status == "ok"
    assert sb.qbo.oauth.refreshes == 1  # the bootstrap token was exchanged once
    store = _store(cfg)
    tok = store.get_token("acme-qbo")
    tok["expires_at"] = tok["obtained_at"] + 60  # close to expiry: inside the refresh margin
    store.save_token("acme-qbo", tok)
    store.close()
    before = len(sb.qbo.request_log)
    res = by_name(run_sync(cfg), "acme-qbo")
    assert res.status == "ok" and res.seen == 9
    assert sb.qbo.oauth.refreshes == 2
    # Refreshed before it was used: no request was refused.
    paths = [p for _, p in sb.qbo.request_log[before:]]
    assert paths[0].startswith("/oauth2/v1/tokens/bearer")


def test_access_token_expiring_mid_run_loses_no_page(sb, tmp_path):
    """Pages of 2 invoices; the simulator expires every access token after 3 API calls. The 401 on the next
    page is answered by one refresh and the same page is asked again: every invoice is seen once."""
    spec = (ROOT / "integrations.d" / "quickbooks_online.yaml").read_text()
    spec = spec.replace("size: 1000}", "size: 2}").replace("max_page_size: 1000", "max_page_size: 2")
    d = tmp_path / "specs"
    d.mkdir()
    (d / "quickbooks_online.yaml").write_text(spec)
    cfg = write_config(tmp_path, qbo_connection(sb), integrations_dir=str(d))
    sb.qbo.expire_after = 3
    res = by_name(run_sync(cfg), "acme-qbo")
    assert res.status == "ok", res.error
    assert res.seen == 9  # all 9 invoices, in 5 pages, none lost or doubled
    assert sb.qbo.oauth.refreshes == 2  # bootstrap + the one after the 401
    queries = [p for _, p in sb.qbo.request_log if "/query" in p]
    # The page that got the 401 was asked twice (once refused, once answered); the others once.
    starts = [parse_qs(urlsplit(p).query)["query"][0].split("STARTPOSITION ")[1].split()[0] for p in queries]
    assert sorted(set(starts)) == ["1", "3", "5", "7", "9"]
    assert len(starts) == 6


def test_rotated_refresh_token_survives_a_crash(sb, tmp_path, backend):
    """SIGKILL right after the refreshed token is committed (before any request uses it). The provider has
    already killed the old refresh token; the rerun works with the one the store kept."""
    cfg = use_backend(write_config(tmp_path, qbo_connection(sb)), backend)
    r = runner_cmd("plan", str(cfg), env={"RUNNER_TEST_CRASH_AFTER_TOKEN_SAVE": "acme-qbo"})
    assert r.returncode == -9, r.stdout + r.stderr
    assert sb.qbo.oauth.refreshes == 1
    assert not any("/v3/company" in p for _, p in sb.qbo.request_log)  # it died before any API call
    # The old (bootstrap) refresh token is dead at the provider now.
    old = httpx.post(sb.qbo_url + "/oauth2/v1/tokens/bearer", auth=(qb.CLIENT_ID, qb.CLIENT_SECRET),
                     data={"grant_type": "refresh_token", "refresh_token": qb.BOOTSTRAP_REFRESH_TOKEN})
    assert old.status_code == 400 and old.json()["error"] == "invalid_grant"
    # Force the next run to use the stored (rotated) refresh token.
    sb.qbo.oauth.expire_access_tokens()
    r = runner_cmd("plan", str(cfg), "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sb.qbo.oauth.refreshes == 2
    import json

    c = json.loads(r.stdout)["connections"][0]
    assert c["status"] == "ok" and c["seen"] == 9


def test_revoked_grant_needs_reconnect_and_other_connections_go_on(sb, tmp_path, backend):
    cfg = write_config(tmp_path, qbo_connection(sb), zoho_connection(sb, options='organization_id: "60002"'))
    use_backend(cfg, backend)
    r = runner_cmd("apply", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    sb.qbo.oauth.revoke_user("alice")  # the user disconnected the app in QuickBooks
    sb.qbo.oauth.expire_access_tokens()
    requests_before = sb.qbo.oauth.token_requests
    # the whole window, so the Zoho connection shows it read invoices (not only the changes since: none)
    r = runner_cmd("apply", "--full", str(cfg), "-o", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    import json

    out = json.loads(r.stdout)
    qbo, zoho = out["connections"]
    assert qbo["status"] == "needs_reconnect"
    assert qbo["fix"] == "runner connect acme-qbo"
    assert "invalid_grant" in qbo["error"] and "revoked" in qbo["error"]
    assert zoho["status"] == "ok" and zoho["seen"] > 0
    assert sb.qbo.oauth.token_requests - requests_before == 1  # one refused refresh, no retry storm
    store = _store(cfg)
    assert store.connection("acme-qbo")["status"] == "needs_reconnect"
    store.close()
    # The next run does not even try: it says what to do.
    r = runner_cmd("apply", str(cfg))
    assert r.returncode == 1
    assert "runner connect acme-qbo" in r.stdout + r.stderr
    assert sb.qbo.oauth.token_requests - requests_before == 1


def test_two_runs_never_refresh_at_the_same_time(sb, tmp_path, backend):
    """Two sessions on two store handles refresh one connection at once: the lock lets one refresh; the other
    re-reads the token after the lock and uses it (with rotation, a second refresh would have failed)."""
    from runner.net import oauth
    from runner.net.http import Clients
    from conftest import store_of

    cfg = load(use_backend(write_config(tmp_path, qbo_connection(sb)), backend))
    conn = cfg.connection("acme-qbo")

    async def both():
        clients = Clients()
        stores = [store_of(cfg.file), store_of(cfg.file)]
        sessions = [oauth.OAuthSession(conn, {"connection": {"name": conn.name}, "options": dict(conn.options),
                                              "secrets": dict(conn.credentials)}, s, clients) for s in stores]
        try:
            return await asyncio.gather(*(s.headers() for s in sessions))
        finally:
            await clients.aclose()
            for s in stores:
                s.close()

    h1, h2 = asyncio.run(both())
    assert h1 == h2
    assert sb.qbo.oauth.refreshes == 1
    assert sb.qbo.oauth.token_requests == 1


def _connect(cfg_path, name, user, *, force=False, port=0):
    import threading

    from runner.cli.connect import connect_flow
    from runner.state.sqlite import Store

    cfg = load(cfg_path)
    store = Store(cfg.state_path)
    lines: list[str] = []

    def browser(url):
        threading.Thread(target=play_browser, args=(url, user), daemon=True).start()

    try:
        return asyncio.run(connect_flow(cfg.connection(name), store, open_browser=False, timeout=20, on_url=browser,
                                        echo=lines.append, force=force, port=port)), lines
    finally:
        store.close()


def test_connecting_the_wrong_company_keeps_the_working_grant(sb, tmp_path):
    """`runner connect --force` as a user of another company than `expect:` names: the new authorization is
    identified before it replaces anything, so the stored grant is neither overwritten nor revoked."""
    from runner.errors import AccountMismatch

    cfg = write_config(tmp_path, qbo_connection(sb, bootstrap=False, extra=f'\n    expect: {{account_id: "{qb.REALM_DK}"}}'))
    result, _ = _connect(cfg, "acme-qbo", "bjorn")
    assert result["account_id"] == qb.REALM_DK
    store = _store(cfg)
    before = store.get_token("acme-qbo")
    assert store.connection("acme-qbo")["account_id"] == qb.REALM_DK
    store.close()
    with pytest.raises(AccountMismatch) as exc:
        _connect(cfg, "acme-qbo", "alice", force=True)
    assert "Sandbox Company_US_1" in exc.value.message or qb.REALM_US in exc.value.message
    store = _store(cfg)
    after = store.get_token("acme-qbo")
    conn = store.connection("acme-qbo")
    store.close()
    assert after["refresh_token"] == before["refresh_token"]  # not replaced
    assert conn["data"]["realm_id"] == qb.REALM_DK and conn["status"] == "active"
    assert before["refresh_token"] in {g.refresh_token for g in sb.qbo.oauth.live_grants("bjorn")}  # not revoked
    sb.qbo.oauth.expire_access_tokens()
    res = by_name(run_sync(cfg), "acme-qbo")
    assert res.status == "ok" and res.account_name == "Nordlys Consulting ApS"


def test_reconnecting_clears_the_last_error_and_its_time(sb, tmp_path):
    cfg = write_config(tmp_path, qbo_connection(sb, bootstrap=False))
    _connect(cfg, "acme-qbo", "bjorn")
    sb.qbo.oauth.revoke_user("bjorn")
    sb.qbo.oauth.expire_access_tokens()
    assert by_name(run_sync(cfg, mode="apply"), "acme-qbo").status == "needs_reconnect"
    store = _store(cfg)
    assert store.connection("acme-qbo")["last_error_at"]
    store.close()
    sb.qbo.users["bjorn2"] = {"realm": qb.REALM_DK}  # the user reconnects (a new login to the same company)
    result, _ = _connect(cfg, "acme-qbo", "bjorn2")
    store = _store(cfg)
    conn = store.connection("acme-qbo")
    store.close()
    assert conn["status"] == "active" and conn["last_error"] is None and conn["last_error_at"] is None


def test_a_port_in_use_is_a_runner_error_with_a_fix(sb, tmp_path):
    import socket

    from runner.errors import RunnerError

    cfg = write_config(tmp_path, qbo_connection(sb, bootstrap=False))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RunnerError) as exc:
            _connect(cfg, "acme-qbo", "bjorn", port=taken.getsockname()[1])
    assert "--port" in exc.value.fix and "nothing was changed" in exc.value.message
    assert sb.qbo.oauth.token_requests == 0


def test_a_straggler_401_does_not_refresh_again(sb, tmp_path):
    """Request 1 and 2 are sent with token A; 2's 401 renews it to B; 1's 401 arrives later: it was sent with
    A, which is no longer current, so it is retried with B without a second refresh."""
    from runner.net import oauth
    from runner.net.http import Clients
    from runner.state.sqlite import Store

    cfg = load(write_config(tmp_path, qbo_connection(sb)))
    conn = cfg.connection("acme-qbo")

    async def go():
        clients = Clients()
        store = Store(cfg.state_path)
        s = oauth.OAuthSession(conn, {"connection": {"name": conn.name}, "options": dict(conn.options),
                                      "secrets": dict(conn.credentials)}, store, clients)
        try:
            await s.headers()  # this task sends request 1 with token A
            a = s.token["access_token"]

            async def request_2():
                await s.headers()
                await s.unauthorized()

            await asyncio.create_task(request_2())
            assert s.token["access_token"] != a and sb.qbo.oauth.refreshes == 2
            await s.unauthorized()  # request 1's late 401
            assert sb.qbo.oauth.refreshes == 2
            await s.unauthorized(sent=s.token["access_token"])  # the current token refused: renewed
            assert sb.qbo.oauth.refreshes == 3
        finally:
            await clients.aclose()
            store.close()

    asyncio.run(go())


def test_a_new_bootstrap_refresh_token_lifts_needs_reconnect(sb, tmp_path):
    from runner.net import oauth
    from runner.net.http import Clients
    from runner.state.sqlite import Store

    cfg_path = write_config(tmp_path, qbo_connection(sb))
    assert by_name(run_sync(cfg_path, mode="apply"), "acme-qbo").status == "ok"
    sb.qbo.oauth.revoke_user("alice")
    sb.qbo.oauth.expire_access_tokens()
    res = by_name(run_sync(cfg_path, mode="apply"), "acme-qbo")
    assert res.status == "needs_reconnect"
    cfg = load(cfg_path)
    store = Store(cfg.state_path)
    assert not oauth.reconnect_cleared(cfg.connection("acme-qbo"), store)  # the same token: nothing to try
    store.close()
    # A new refresh token (e.g. from the provider's playground) goes into the connection's credentials.
    new_rt = "AB11sandboxQBOsecondRefreshToken000alice"
    sb.qbo.oauth.add_grant(new_rt, qb.CLIENT_ID, "alice", "com.intuit.quickbooks.accounting")
    (tmp_path / "new_rt").write_text(new_rt)
    text = cfg_path.read_text().replace(str(ROOT / "sandbox-secrets" / "quickbooks_refresh_token"),
                                        str(tmp_path / "new_rt"))
    cfg_path.write_text(text)
    cfg = load(cfg_path)
    conn = cfg.connection("acme-qbo")

    async def renew():
        clients = Clients()
        store = Store(cfg.state_path)
        try:
            assert oauth.reconnect_cleared(conn, store)
            s = oauth.OAuthSession(conn, {"connection": {"name": conn.name}, "options": dict(conn.options),
                                          "secrets": dict(conn.credentials)}, store, clients)
            await s.headers()
            return store.connection("acme-qbo")
        finally:
            await clients.aclose()
            store.close()

    saved = asyncio.run(renew())
    assert saved["status"] == "active" and saved["last_error"] is None and saved["last_error_at"] is None
    res = by_name(run_sync(cfg_path, mode="apply"), "acme-qbo")
    assert res.status == "ok", res.error


def test_a_full_run_with_a_new_bootstrap_token_recovers_from_needs_reconnect(sb, tmp_path):
    cfg_path = write_config(tmp_path, qbo_connection(sb))
    assert by_name(run_sync(cfg_path, mode="apply"), "acme-qbo").status == "ok"
    sb.qbo.oauth.revoke_user("alice")
    sb.qbo.oauth.expire_access_tokens()
    assert by_name(run_sync(cfg_path, mode="apply"), "acme-qbo").status == "needs_reconnect"
    assert by_name(run_sync(cfg_path, mode="apply"), "acme-qbo").status == "needs_reconnect"  # stays stopped
    new_rt = "AB11sandboxQBOthirdRefreshToken0000alice"
    sb.qbo.oauth.add_grant(new_rt, qb.CLIENT_ID, "alice", "com.intuit.quickbooks.accounting")
    (tmp_path / "new_rt").write_text(new_rt)
    cfg_path.write_text(cfg_path.read_text().replace(str(ROOT / "sandbox-secrets" / "quickbooks_refresh_token"),
                                                     str(tmp_path / "new_rt")))
    res = by_name(run_sync(cfg_path, mode="apply"), "acme-qbo")
    assert res.status == "ok", res.error
