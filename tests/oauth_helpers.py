"""Shared by test_oauth/test_quickbooks/test_zoho: a real-socket sandbox with both OAuth providers, configs
pointing at it, and a "browser" that logs in at the simulator and follows the redirect to the runner."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx

from runner.sandbox.core import SandboxServer
from runner.sandbox.quickbooks import QuickBooksSimulator
from runner.sandbox.zoho import ZohoSimulator

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ROOT / "sandbox-secrets"


class Sandbox:
    def __init__(self):
        self.qbo = QuickBooksSimulator()
        self.zoho = ZohoSimulator()
        self.server = SandboxServer({"quickbooks": self.qbo, "zoho": self.zoho})

    def __enter__(self):
        self.server.start()  # the Zoho simulator builds its data-centre URLs from the Host it is called at
        return self

    def __exit__(self, *a):
        self.server.stop()

    @property
    def qbo_url(self) -> str:
        return self.server.url("quickbooks")

    @property
    def zoho_accounts(self) -> str:
        return self.server.url("zoho") + "/accounts.zoho.com"


def qbo_connection(sb: Sandbox, name: str = "acme-qbo", *, bootstrap: bool = True, extra: str = "") -> str:
    rt = f'\n      refresh_token: "${{file:{SECRETS}/quickbooks_refresh_token}}"' if bootstrap else ""
    realm = '\n    options: {realm_id: "9130357766961111"}' if bootstrap else ""
    return f"""
  - name: {name}
    integration: quickbooks_online
    environment: sandbox
    base_url: "{sb.qbo_url}"
    server_filters: false
    credentials:
      client_id: "${{file:{SECRETS}/quickbooks_client_id}}"
      client_secret: "${{file:{SECRETS}/quickbooks_client_secret}}"{rt}{realm}{extra}
"""


def zoho_connection(sb: Sandbox, name: str = "acme-zoho", *, bootstrap: bool = True, options: str = "",
                    extra: str = "") -> str:
    rt = f'\n      refresh_token: "${{file:{SECRETS}/zoho_refresh_token}}"' if bootstrap else ""
    opts = f'accounts_server: "{sb.zoho_accounts}"' + (f", {options}" if options else "")
    return f"""
  - name: {name}
    integration: zoho_books
    environment: sandbox
    credentials:
      client_id: "${{file:{SECRETS}/zoho_client_id}}"
      client_secret: "${{file:{SECRETS}/zoho_client_secret}}"{rt}
    options: {{{opts}}}{extra}
"""


def write_config(tmp_path: Path, *connections: str, integrations_dir: str | None = None) -> Path:
    body = f"""version: 1
state: state/state.db
destination: {{type: jsonl, path: out/cases.jsonl}}
defaults: {{window: {{last: 90d}}}}
{f'integrations_dir: {integrations_dir}' if integrations_dir else ''}
connections:
{''.join(connections)}"""
    p = tmp_path / "config.yaml"
    p.write_text(body)
    return p


def load(path: Path):
    from runner.spec import config

    return config.load(path)


def run_sync(path: Path, mode: str = "plan", names: list[str] | None = None):
    from runner.engine import pipeline
    from runner.state.sqlite import Store

    cfg = load(path)
    store = Store(cfg.state_path)
    try:
        conns = [cfg.connection(n) for n in names] if names else None
        return asyncio.run(pipeline.sync(cfg, mode=mode, store=store, connections=conns))
    finally:
        store.close()


def by_name(result, name):
    return next(c for c in result.connections if c.name == name)


def play_browser(url: str, user: str | None = None, *, tamper_state: bool = False) -> httpx.Response:
    """Log in at the simulator's authorize page as `user` and follow its redirect to the runner's loopback."""
    if user:
        url += f"&sandbox_user={user}"
    r = httpx.get(url, follow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    if tamper_state:
        import re

        location = re.sub(r"state=[^&]+", "state=forged", location)
    return httpx.get(location, timeout=10)


def runner_cmd(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, env=e,
                          timeout=60, **kw)
