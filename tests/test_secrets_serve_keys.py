"""The secrets sweep for the commands of the inbound server: `runner keys` and `runner serve`.

A key is shown once, by `keys create`, and never again: not by `keys list`, not in the server's logs, not in
its answers; the destination key never appears anywhere.
"""
from __future__ import annotations

import json

from conftest import DEBITURA_KEY, ROOT, run_cli
from test_inbound import Server, invoice

CONFIG = """
state: state/state.db
destination: {type: debitura, environment: sandbox, api_key: "${DEBITURA_API_KEY}"}
connections:
  - {name: zaps, integration: zapier, environment: production, account_id: acme-crm}
"""


def _clean(text: str, *secrets: str) -> None:
    for s in secrets:
        assert s not in text and s[-16:] not in text, text[-2000:]


def test_keys_and_serve_never_print_a_key_after_creating_it(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG)
    env = {"DEBITURA_API_KEY": DEBITURA_KEY}
    created = run_cli("keys", "create", str(cfg), "--environment", "production", "-o", "json", env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    _clean(created.stdout + created.stderr, DEBITURA_KEY)
    listed = run_cli("keys", "list", str(cfg), "--all", env=env)
    assert listed.returncode == 0
    _clean(listed.stdout + listed.stderr, key, DEBITURA_KEY)

    server = Server(cfg)
    try:
        assert server.get("/v1/me", key).status_code == 200
        bad = server.get("/v1/me", key[:-4] + "0000")
        assert bad.status_code == 401
        answer = server.post(key, invoice(1))
        assert answer.status_code == 200
        _clean(bad.text + answer.text, key, DEBITURA_KEY)
    finally:
        server.http.close()
        server.proc.terminate()
        out, err = server.proc.communicate(timeout=20)
    _clean(out + err, key, DEBITURA_KEY)  # the server's own log lines
    status = run_cli("status", str(cfg), "-o", "json", env=env)
    _clean(status.stdout + status.stderr, key, DEBITURA_KEY)
    key_id = key.split("_")[2]
    revoked = run_cli("keys", "revoke", str(cfg), key_id, env=env)
    assert revoked.returncode == 0, revoked.stderr
    _clean(revoked.stdout + revoked.stderr, key, DEBITURA_KEY)
