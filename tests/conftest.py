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
