"""FreshBooks: the built-in spec (integrations.d/freshbooks.yaml) against its simulator: verdicts, single-use
refresh tokens, the business chosen among the user's memberships, and spec-wide headers beside OAuth2."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from runner.sandbox import freshbooks as fb

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ROOT / "sandbox-secrets"


def _config(tmp: Path, *, options: str = "{account_id: xZ3q7}", refresh_token_file: Path | None = None,
            base_url: str | None = None, server_filters: bool = False, bootstrap: bool = True) -> Path:
    rt = refresh_token_file or SECRETS / "freshbooks_refresh_token"
    rt_line = f'{chr(10)}      refresh_token: "${{file:{rt}}}"' if bootstrap else ""
    cfg = tmp / "config.yaml"
    cfg.write_text(f"""version: 1
state: state.db
destination: {{type: jsonl, path: out.jsonl}}
connections:
  - name: fb
    integration: freshbooks
    environment: sandbox
    server_filters: {str(server_filters).lower()}{f'{chr(10)}    base_url: "{base_url}"' if base_url else ''}
    options: {options}
    credentials:
      client_id: "${{file:{SECRETS}/freshbooks_client_id}}"
      client_secret: "${{file:{SECRETS}/freshbooks_client_secret}}"{rt_line}
    window: {{last: 1y}}
""")
    return cfg


def _sync(cfg_path: Path, mode: str = "apply"):
    from runner.engine import pipeline
    from runner.spec import config
    from runner.state.sqlite import Store

    cfg = config.load(cfg_path)
    store = Store(cfg.state_path)
    try:
        return asyncio.run(pipeline.sync(cfg, mode=mode, store=store, details=True))
    finally:
        store.close()


def _verdicts(result) -> dict[str, tuple]:
    """invoice number -> (verdict, reason, detail) of the run's first connection."""
    return {v.number: (v.verdict, v.reason, v.detail or {}) for v in result.connections[0].verdicts}


def _simulator(cfg_path: Path):
    from runner import sandbox

    return sandbox.get_simulator("freshbooks", cfg_path.parent / "sandbox")


def _token(cfg_path: Path) -> dict:
    from runner.state.sqlite import Store

    store = Store(cfg_path.parent / "state.db")
    try:
        return store.get_token("fb")
    finally:
        store.close()


def test_apply_imports_unpaid_and_skips_partial_paid_draft_and_incomplete_addresses(tmp_path):
    cfg = _config(tmp_path)
    result = _sync(cfg)
    conn = result.connections[0]
    assert conn.error is None, conn.error
    assert conn.account_id == "xZ3q7" and conn.account_name == "Fiona's Flowers Ltd"
    v = _verdicts(result)
    assert len(v) == 15
    imported = {n for n, x in v.items() if x[0] == "imported"}
    assert imported == {"0000001", "0000002", "0000003", "0000004", "0000005", *(f"{n:07d}" for n in range(10, 16))}
    assert v["0000007"][:2] == ("skipped", "not_unpaid") and v["0000007"][2]["status"] == "partially paid"
    assert v["0000008"][:2] == ("skipped", "not_unpaid") and v["0000008"][2]["status"] == "paid"
    assert v["0000009"][:2] == ("skipped", "not_unpaid") and v["0000009"][2]["status"] == "draft"
    assert v["0000006"][:2] == ("skipped", "incomplete_address") and v["0000006"][2]["missing"] == ["street"]
    cases = {json.loads(line)["invoice"]["number"]: json.loads(line)["invoice"]
             for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert cases["0000001"]["amount"] == 1200.0 and cases["0000001"]["currency"] == "CAD"
    assert cases["0000001"]["debtor"]["contact_person"] == "Anne Shirley"
    assert cases["0000004"]["debtor"]["address"]["country"] == "DK"  # "Danmark", free text
    # The invoice's own address was empty: the client's primary address, read once for that client.
    assert cases["0000005"]["debtor"]["address"]["street"] == "88 Water St"
    assert _simulator(cfg).client_fetches == {"xZ3q7/502": 1, "xZ3q7/504": 1}


def test_the_api_version_header_of_auth_headers_goes_with_every_oauth2_request(tmp_path):
    cfg = _config(tmp_path)
    assert _sync(cfg, mode="plan").connections[0].error is None
    sim = _simulator(cfg)
    assert sim.faults.requests > 3 and sim.without_api_version == 0


def test_single_use_refresh_tokens_rotate_and_the_new_one_is_saved_before_use(tmp_path):
    cfg = _config(tmp_path)
    assert _sync(cfg, mode="plan").connections[0].error is None
    sim = _simulator(cfg)
    first = _token(cfg)["refresh_token"]
    assert first != fb.BOOTSTRAP_REFRESH_TOKEN
    assert not sim.oauth.grants[fb.BOOTSTRAP_REFRESH_TOKEN].active  # used once, dead at FreshBooks
    # The access token runs out: the next run refreshes with the saved (rotated) token, not the config's.
    from runner.state.sqlite import Store

    store = Store(tmp_path / "state.db")
    try:
        tok = store.get_token("fb")
        tok["expires_at"] = time.time() - 1
        store.save_token("fb", tok)
    finally:
        store.close()
    refreshes = sim.oauth.refreshes
    result = _sync(cfg, mode="plan")
    assert result.connections[0].error is None, result.connections[0].error
    sim = _simulator(cfg)
    assert sim.oauth.refreshes == refreshes + 1
    second = _token(cfg)["refresh_token"]
    assert second not in (first, fb.BOOTSTRAP_REFRESH_TOKEN) and not sim.oauth.grants[first].active


def test_a_user_with_two_businesses_must_choose_one(tmp_path):
    cfg = _config(tmp_path, options="{}")
    conn = _sync(cfg, mode="plan").connections[0]
    assert conn.status == "failed" and conn.seen == 0
    assert "xZ3q7 (Fiona's Flowers Ltd)" in conn.error and "bR8m2 (Fiona Consulting Inc)" in conn.error
    assert 'options: {account_id: "bR8m2"}' in conn.fix


def test_a_pinned_business_the_user_cannot_see_is_refused(tmp_path):
    conn = _sync(_config(tmp_path, options="{account_id: pL5n1}"), mode="plan").connections[0]
    assert conn.status == "failed" and "pL5n1" in conn.error and "xZ3q7" in conn.error


def test_the_only_business_of_a_user_is_taken(tmp_path):
    (tmp_path / "rt").write_text(fb.GUS_REFRESH_TOKEN)
    conn = _sync(_config(tmp_path, options="{}", refresh_token_file=tmp_path / "rt"), mode="plan").connections[0]
    assert conn.error is None and conn.account_id == "pL5n1" and conn.account_name == "Gus Plumbing LLC"
    assert conn.seen == 1


def test_token_calls_go_to_the_connections_base_url(tmp_path):
    """The sandbox environment's OAuth2 URLs are `{{ base_url }}/...`: a connection whose `base_url:` points at a
    server of its own (a mock, a proxy) has its token calls sent there too, not to the spec's address."""
    from runner.sandbox.core import SandboxServer

    sim = fb.FreshBooksSimulator()
    server = SandboxServer({"fbproxy": sim})
    server.start()
    try:
        cfg = _config(tmp_path, base_url=server.url("fbproxy"))
        conn = _sync(cfg, mode="plan").connections[0]
    finally:
        server.stop()
    assert conn.error is None, conn.error
    assert sim.oauth.refreshes == 1 and sim.faults.requests >= 3


def test_explain_finds_an_invoice_by_number_and_names_its_partial_payment(tmp_path):
    from runner.diagnostics import checks
    from runner.spec import config
    from runner.state.sqlite import Store

    cfg = config.load(_config(tmp_path))
    store = Store(cfg.state_path)
    try:
        [ex] = asyncio.run(checks.explain(cfg, store, "0000007"))
    finally:
        store.close()
    assert ex.found and ex.error is None, ex.error
    status = next(s for s in ex.stages if s["stage"] == "status filter")
    assert status["result"] == "skipped" and "partially paid" in status["text"]


def test_connect_as_a_user_with_two_businesses_lists_them_and_one_line_chooses(tmp_path):
    """`runner connect`: the browser logs in at FreshBooks (the simulator), the code is exchanged for tokens,
    and the business is chosen among the user's memberships: never guessed when there are two."""
    import threading

    import pytest

    from oauth_helpers import play_browser
    from runner.cli.connect import connect_flow
    from runner.errors import AccountMismatch
    from runner.sandbox.core import SandboxServer
    from runner.spec import config
    from runner.state.sqlite import Store

    sim = fb.FreshBooksSimulator()
    server = SandboxServer({"freshbooks": sim})
    server.start()
    try:
        def connect(cfg_path, user):
            cfg = config.load(cfg_path)
            store = Store(cfg.state_path)
            try:
                return asyncio.run(connect_flow(
                    cfg.connection("fb"), store, open_browser=False, timeout=20, echo=lambda line: None,
                    on_url=lambda url: threading.Thread(target=play_browser, args=(url, user), daemon=True).start()))
            finally:
                store.close()

        cfg = _config(tmp_path, options="{}", bootstrap=False, base_url=server.url("freshbooks"))
        with pytest.raises(AccountMismatch) as exc:
            connect(cfg, "fiona")
        assert "xZ3q7 (Fiona's Flowers Ltd)" in exc.value.message and 'options: {account_id: "bR8m2"}' in exc.value.fix
        # The authorization was saved: with the business chosen, a run works without connecting again.
        cfg = _config(tmp_path, options="{account_id: bR8m2}", bootstrap=False, base_url=server.url("freshbooks"))
        conn = _sync(cfg, mode="plan").connections[0]
        assert conn.error is None, conn.error
        assert conn.account_id == "bR8m2" and conn.account_name == "Fiona Consulting Inc" and conn.seen == 2
    finally:
        server.stop()
