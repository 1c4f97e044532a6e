"""The example Zapier app (examples/zapier-app) driven by Zapier's own test harness, zapier-platform-core's
`createAppTester`, against real `runner serve` processes over real sockets: a production server and a test
server, keys made with `runner keys create`. Needs node and npm (one `npm ci`, by one test process at a time,
skipped when the installed packages already match package-lock.json)."""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from runner import sandbox

try:
    from conftest import DEBITURA_KEY, ROOT, run_cli
    from test_inbound import Server
except ModuleNotFoundError:  # tests/ as a package
    from tests.conftest import DEBITURA_KEY, ROOT, run_cli
    from tests.test_inbound import Server

APP = ROOT / "examples" / "zapier-app"
NODE, NPM = shutil.which("node"), shutil.which("npm")
pytestmark = pytest.mark.skipif(not (NODE and NPM), reason="node and npm are needed to run Zapier's app tester "
                                                           "(zapier-platform-core); install Node.js 18 or later")

CONFIG = """
state: state/state.db
destination:
  type: debitura
  environment: sandbox
  api_key: "${DEBITURA_API_KEY}"
connections:
  - name: zaps
    integration: zapier
    environment: production
    account_id: acme-crm
  - name: zaps-test
    integration: zapier
    environment: test
    account_id: acme-crm
"""


def _installed() -> bool:
    """node_modules matches package-lock.json (npm writes node_modules/.package-lock.json when it installs)."""
    marker = APP / "node_modules" / ".package-lock.json"
    return marker.exists() and marker.stat().st_mtime >= (APP / "package-lock.json").stat().st_mtime


@pytest.fixture(scope="session")
def zapier_app():
    # Each test process (pytest -n 3) has a session of its own: they take turns, or one's `npm ci` (which
    # deletes node_modules first) pulls mocha from under another's tests (MODULE_NOT_FOUND).
    lock = Path(tempfile.gettempdir()) / f"runner-zapier-app-{hashlib.sha256(str(APP).encode()).hexdigest()[:12]}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if not _installed():
            done = subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=APP,
                                  capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                pytest.skip(f"npm ci failed (no registry access?): {done.stderr[-1500:]}")
    return APP


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zapier")
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG)
    env = {"DEBITURA_API_KEY": DEBITURA_KEY}
    keys = {}
    for environment in ("production", "test"):
        out = run_cli("keys", "create", str(cfg), "--environment", environment, "--label", "zapier app tester",
                      "-o", "json", env=env)
        assert out.returncode == 0, out.stderr
        keys[environment] = json.loads(out.stdout)["key"]
    production = Server(cfg, "--connection", "zaps")
    test = Server(cfg, "--connection", "zaps-test")
    try:
        yield {"STATE_DIR": str(tmp / "state"), "RUNNER_URL": production.url, "RUNNER_KEY": keys["production"],
               "RUNNER_TEST_URL": test.url, "RUNNER_TEST_KEY": keys["test"], "RUNNER_RUN": str(int(time.time()))}
    finally:
        production.stop()
        test.stop()


def mocha(app, servers, *args: str) -> subprocess.CompletedProcess:
    # Without a LOGGING_TOKEN, zapier-platform-core keeps its logs local: nothing leaves the machine.
    env = {**{k: v for k, v in os.environ.items() if k not in ("LOGGING_TOKEN", "LOGGING_ENDPOINT")}, **servers}
    return subprocess.run([NODE, str(app / "node_modules" / "mocha" / "bin" / "mocha.js"), "--timeout", "60000",
                           "test", *args], cwd=app, env=env, capture_output=True, text=True, timeout=600)


def test_zapier_app_tester_auth_create_skip_correction_and_paged_triggers(zapier_app, servers):
    done = mocha(zapier_app, servers, "--grep", "test server, then production", "--invert")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "9 passing" in done.stdout, done.stdout[-3000:]
    for secret in (servers["RUNNER_KEY"], servers["RUNNER_TEST_KEY"], DEBITURA_KEY):
        assert secret not in done.stdout + done.stderr


def test_zapier_app_tester_test_server_then_production(zapier_app, servers):
    """An invoice tried through the test server (a Debitura test case) is refused by the production server with
    the test case named (never answered as a duplicate of it); once the user deletes the test case, as the fix
    says, the production server imports it for real."""
    refused = mocha(zapier_app, servers, "--grep", "refused by production")
    assert refused.returncode == 0 and "1 passing" in refused.stdout, refused.stdout[-3000:]
    state = Path(servers["STATE_DIR"])
    debitura = sandbox.get_simulator("debitura", state / "sandbox")
    tried = [c for c in debitura.cases() if c.get("creditorReference") == f"Z{servers['RUNNER_RUN']}-50"]
    assert [c.get("isTestCase") for c in tried] == [True]  # the test case only: no production case was made
    test_cases = tried
    async def delete():
        async with httpx.AsyncClient(transport=sandbox.get_transport("debitura", state / "sandbox"),
                                     base_url="https://customer-api.debitura.com") as client:
            return await client.delete(f"/test/cases/{test_cases[0]['id']}", headers={"XApiKey": DEBITURA_KEY})
    sandbox.reset_cache()
    assert asyncio.run(delete()).status_code == 204
    imported = mocha(zapier_app, {**servers, "RUNNER_TEST_CASE_DELETED": "1"}, "--grep", "production imports")
    assert imported.returncode == 0 and "1 passing" in imported.stdout, imported.stdout[-3000:]
