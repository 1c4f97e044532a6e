"""Messages and state that must not mislead: an unreadable value is not called missing, a saved error does not
grow run after run, a library's notice does not reach the terminal, doctor says what it did not check, and
explain shows what the last apply recorded."""
from __future__ import annotations

import json

import pytest

from oauth_helpers import Sandbox, load, qbo_connection, runner_cmd, write_config as oauth_config


@pytest.fixture
def sb():
    with Sandbox() as s:
        yield s


def _connection_row(cfg, name):
    from runner.state import Store

    store = Store(load(cfg).state_path)
    try:
        return store.connection(name)
    finally:
        store.close()


# --- 19.13 / 19.14: OAuth runs ------------------------------------------------------------------------------

def test_an_oauth_run_prints_no_library_deprecation_notice(sb, tmp_path):
    cfg = oauth_config(tmp_path, qbo_connection(sb))
    r = runner_cmd("apply", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Deprecat" not in r.stderr and "httpx module" not in r.stderr, r.stderr


def test_a_revoked_grants_saved_error_does_not_grow_run_after_run(sb, tmp_path):
    cfg = oauth_config(tmp_path, qbo_connection(sb))
    assert runner_cmd("apply", str(cfg)).returncode == 0
    sb.qbo.oauth.revoke_user("alice")
    sb.qbo.oauth.expire_access_tokens()
    errors = []
    for _ in range(3):
        r = runner_cmd("apply", str(cfg))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "runner connect acme-qbo" in r.stdout + r.stderr
        errors.append(_connection_row(cfg, "acme-qbo")["last_error"])
    assert "revoked" in errors[-1]
    assert errors[1] == errors[2], errors
    assert errors[-1].count("needs to be reconnected") <= 1, errors[-1]
