"""Shared fixtures: configs that run against the built-in sandbox, in a temporary folder per test."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STRIPE_KEY = "sk_test_sandbox_4eC39HqLyjWDarjtT1zdp7dc"
DEBITURA_KEY = "dbt_sandbox_live_Hq7Xv2Lm9Pz4"


@pytest.fixture(autouse=True)
def _fresh_sandbox():
    from runner import sandbox

    sandbox.reset_cache()
    yield
    sandbox.reset_cache()


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(body)
    return path


SANDBOX_CONFIG = """
state: state/state.db
destination:
  type: debitura
  environment: sandbox
  api_key: "${{DEBITURA_API_KEY}}"
connections:
  - name: acme-stripe
    integration: stripe
    environment: sandbox
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
    server_filters: {server_filters}
"""


def stripe_workspace(tmp: Path, edit=None, window: str = "{last: 3y}", extra: str = "") -> Path:
    """A config beside a copy of the built-in Stripe spec (changed by `edit(spec)` first) and the sandbox's
    secrets: one connection `s` to the Stripe simulator, cases to a jsonl file. `extra`: more of its keys."""
    import yaml

    (tmp / "integrations.d").mkdir(parents=True)
    spec = yaml.safe_load((ROOT / "integrations.d" / "stripe.yaml").read_text())
    if edit is not None:
        edit(spec)
    (tmp / "integrations.d" / "stripe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copytree(ROOT / "sandbox-secrets", tmp / "sandbox-secrets")
    cfg = tmp / "config.yaml"
    cfg.write_text(f"""version: 1
state: state.db
integrations_dir: integrations.d
destination: {{type: jsonl, path: out.jsonl}}
connections:
  - name: s
    integration: stripe
    environment: sandbox
    credentials: {{api_key: "${{file:sandbox-secrets/stripe_api_key}}"}}
    window: {window}
{extra}""")
    return cfg


def page_size(n: int):
    """An edit for stripe_workspace: pages of n invoices."""
    def edit(spec: dict) -> None:
        spec["invoices"]["request"]["params"]["limit"] = str(n)
        spec["invoices"]["max_page_size"] = n
    return edit


@pytest.fixture
def sandbox_env(monkeypatch):
    monkeypatch.setenv("STRIPE_API_KEY", STRIPE_KEY)
    monkeypatch.setenv("DEBITURA_API_KEY", DEBITURA_KEY)
    return {"STRIPE_API_KEY": STRIPE_KEY, "DEBITURA_API_KEY": DEBITURA_KEY}


@pytest.fixture
def sandbox_config(tmp_path, sandbox_env):
    return write_config(tmp_path, SANDBOX_CONFIG.format(server_filters="false"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd or ROOT, timeout=timeout)


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


# --- the state store's backends: SQLite, and a real PostgreSQL server ------------------------------------------

@pytest.fixture(scope="session")
def pg_server():
    """The URL of a PostgreSQL server's admin database: RUNNER_TEST_PG_URL (as .ci/run exports it), else one
    this session starts (tests/pgserver.py) and stops by its PID at the end. Skips when neither is possible."""
    url = os.environ.get("RUNNER_TEST_PG_URL")
    if url:
        yield url
        return
    from tests import pgserver

    if pgserver.binaries() is None:
        pytest.skip("no PostgreSQL: set RUNNER_TEST_PG_URL or install initdb/pg_ctl (Debian: postgresql)")
    url, pid, root = pgserver.start()
    try:
        yield url
    finally:
        pgserver.stop(pid, root)


def _database_url(server: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture
def pg_databases(pg_server):
    """A maker of fresh, empty databases on the test server (each call, a new one), dropped after the test."""
    import uuid

    import psycopg

    made = []

    def make() -> str:
        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return _database_url(pg_server, name)

    yield make
    with psycopg.connect(pg_server, autocommit=True) as admin:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_databases):
    """A fresh, empty database of its own on the test server, dropped after the test."""
    return pg_databases()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request):
    """The state store a test runs on: "sqlite" (the config's file), or the URL of a fresh PostgreSQL
    database. Use with use_backend(config_path, backend)."""
    if request.param == "sqlite":
        return "sqlite"
    return request.getfixturevalue("pg_url")


def use_backend(config_path: Path, backend: str) -> Path:
    """Point a test config's `state:` at the backend (a PostgreSQL URL); "sqlite" leaves it as it is."""
    import re

    if backend == "sqlite":
        return config_path
    text = config_path.read_text()
    keep = re.search(r"(?m)^state:.*keep_runs: *(\d+)", text)
    line = f"state: {{type: postgresql, url: \"{backend}\", keep_runs: {keep.group(1)}}}" if keep else f"state: {backend}"
    text, n = re.subn(r"(?m)^state:.*$", line, text)
    if not n:
        text = line + "\n" + text
    config_path.write_text(text)
    return config_path


def store_of(config_path, **kw):
    """The state store a test config names (either backend), opened as the runner opens it."""
    from runner.engine.destinations import ledger_id
    from runner.spec import config
    from runner.state import open_store

    cfg = config.load(config_path, strict=False, **kw)
    return open_store(cfg, destination=ledger_id(cfg.destination))


def query(store, sql: str, args=()) -> list[tuple]:
    """Rows of a read-only query on either backend's store (SQLite's `?` placeholders)."""
    if store.kind == "sqlite":
        return store.db.execute(sql, args).fetchall()
    with store._db() as db:
        return db.execute(sql.replace("?", "%s"), args).fetchall()
