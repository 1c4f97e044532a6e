"""Debitura's side of a case: `runner webhooks sync`, signed webhooks received by a real `runner serve` over a
socket (posted by the Debitura simulator, or by hand), the polling fallback, and what status and explain show."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import DEBITURA_KEY, ROOT, free_port, query, run_cli, store_of, use_backend, wait_for_port
from runner import sandbox
from runner.inbound.webhooks import ROUTE, sign

SECRET_KEY = "correct horse battery staple"  # RUNNER_SECRET_KEY: the stored signing secret is encrypted with it


def write(tmp_path: Path, port: int, hooks: str | None = None, backend: str = "sqlite") -> Path:
    hooks = hooks if hooks is not None else f"""
  webhooks:
    url: http://127.0.0.1:{port}{ROUTE}"""
    path = tmp_path / "config.yaml"
    path.write_text(f"""
state: state/state.db
destination:
  type: debitura
  environment: sandbox
  api_key: "${{DEBITURA_API_KEY}}"{hooks}
connections:
  - name: acme-stripe
    integration: stripe
    environment: sandbox
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
""")
    return use_backend(path, backend)


def sandbox_dir(cfg: Path) -> Path:
    """Where the simulators keep their data: beside the store's file, or for PostgreSQL beside the config."""
    from runner.spec import config

    return config.load(cfg, strict=False).state_path.parent / "sandbox"


@pytest.fixture
def env(sandbox_env):
    return {**sandbox_env, "RUNNER_SECRET_KEY": SECRET_KEY, "PYTHONPATH": str(ROOT)}


class Served:
    """`runner serve CONFIG` (webhooks only: the config has no inbound connection) on a fixed port."""

    def __init__(self, cfg: Path, port: int, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "runner", "serve", str(cfg), "--port", str(port), "-v"],
                                     cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}{ROUTE}"
        wait_for_port(port)

    def post(self, body: bytes, headers: dict) -> httpx.Response:
        return httpx.post(self.url, content=body, headers={"Content-Type": "application/json", **headers})

    def stop(self) -> str:
        """Stops the server; returns what it logged."""
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err


@pytest.fixture
def serve(env):
    started = []

    def start(cfg, port):
        s = Served(cfg, port, env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def sim(cfg: Path):
    sandbox.reset_cache()  # what the other processes persisted, not a cached copy
    return sandbox.get_simulator("debitura", sandbox_dir(cfg))


def control(cfg: Path, method: str, path: str, body: dict | None = None) -> httpx.Response:
    """A request to the Debitura simulator (as a test or a demo would make it), in this process."""
    async def go():
        transport = sandbox.get_transport("debitura", sandbox_dir(cfg))
        async with httpx.AsyncClient(transport=transport, base_url="http://debitura.sandbox.invalid") as client:
            return await client.request(method, path, json=body, headers={"XApiKey": DEBITURA_KEY})

    sandbox.reset_cache()
    return asyncio.run(go())


def rows(cfg: Path, sql: str) -> list[tuple]:
    store = store_of(cfg)
    try:
        return query(store, sql)
    finally:
        store.close()


def events(cfg: Path) -> list[tuple]:
    return rows(cfg, "SELECT event_id, event, case_id, via FROM case_events ORDER BY received")


def delivered(cfg: Path) -> list[tuple]:
    return rows(cfg, "SELECT invoice_id, case_id, case_reference FROM ledger WHERE status='delivered' "
                     "ORDER BY invoice_id")


def stored_secret(cfg: Path, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", "import sys; from runner.state import open_store; "
                          "from runner.spec import config; from runner.engine.destinations import ledger_id; "
                          "c = config.load(sys.argv[1]); "
                          "print(open_store(c, destination=ledger_id(c.destination)).webhook_subscription()"
                          "['secret'])", str(cfg)],
                         capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# --- webhooks sync ---------------------------------------------------------------------------------------------

def test_sync_creates_once_keeps_the_secret_encrypted_and_follows_the_config(tmp_path, env, backend):
    port = free_port()
    cfg = write(tmp_path, port, backend=backend)
    dry = run_cli("webhooks", "sync", str(cfg), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"would create subscription → http://127.0.0.1:{port}{ROUTE}")
    assert sim(cfg).webhooks.subscriptions() == []

    first = run_cli("webhooks", "sync", str(cfg), "--output", "json", env=env)
    assert first.returncode == 0, first.stderr
    made = json.loads(first.stdout)
    assert made["changed"] and made["actions"][0].startswith("create subscription")
    subs = sim(cfg).webhooks.subscriptions()
    assert [s["id"] for s in subs] == [made["subscription_id"]]
    assert sorted(subs[0]["events"]) == sorted(["case.created", "case.updated", "case.closed", "payment.created",
                                                "payment.deleted", "chat.created"])
    secret = stored_secret(cfg, env)
    assert len(base64.b64decode(secret)) == 32
    raw = rows(cfg, "SELECT secret FROM webhook_subscriptions")[0][0]
    assert raw.startswith("enc:v1:") and secret not in raw
    assert secret not in first.stdout + first.stderr

    again = run_cli("webhooks", "sync", str(cfg), "--output", "json", env=env)
    assert json.loads(again.stdout) == {"dry_run": False, "changed": False, "subscription_id": made["subscription_id"],
                                        "actions": [f"nothing to change: subscription {made['subscription_id']} → "
                                                    f"http://127.0.0.1:{port}{ROUTE} for case.closed, case.created, "
                                                    f"case.updated, chat.created, payment.created, payment.deleted"]}
    assert [s["id"] for s in sim(cfg).webhooks.subscriptions()] == [made["subscription_id"]]
    assert stored_secret(cfg, env) == secret

    # Events cannot be changed at Debitura: fewer events in the config means a new subscription (and secret).
    write(tmp_path, port, f"""
  webhooks:
    url: http://127.0.0.1:{port}{ROUTE}
    events: [case.closed, payment.created]""", backend)
    changed = run_cli("webhooks", "sync", str(cfg), env=env)
    assert changed.returncode == 0, changed.stderr
    lines = changed.stdout.splitlines()
    assert lines[0].startswith(f"delete subscription {made['subscription_id']}") and "differ" in lines[0]
    assert lines[1].startswith("create subscription")
    subs = sim(cfg).webhooks.subscriptions()
    assert len(subs) == 1 and subs[0]["events"] == ["case.closed", "payment.created"]
    assert stored_secret(cfg, env) != secret

    # No webhooks in the config: the runner's subscription goes.
    write(tmp_path, port, "", backend)
    gone = run_cli("webhooks", "sync", str(cfg), env=env)
    assert gone.returncode == 0 and gone.stdout.startswith("delete subscription"), gone.stdout + gone.stderr
    assert sim(cfg).webhooks.subscriptions() == []
    assert "nothing to change" in run_cli("webhooks", "sync", str(cfg), env=env).stdout


def test_the_simulator_refuses_public_plain_http_and_private_addresses(tmp_path, env):
    cfg = write(tmp_path, 1)
    for url, why in (("http://example.com/hook", "HTTPS"), ("https://10.1.2.3/hook", "private"),
                     ("https://192.168.0.9/hook", "private")):
        r = control(cfg, "POST", "/webhooks", {"url": url, "events": ["case.created"]})
        assert r.status_code == 400 and why in json.dumps(r.json()), (url, r.text)
    r = control(cfg, "POST", "/webhooks", {"url": "https://hooks.example.com/x", "events": ["case.made"]})
    assert r.status_code == 400 and "case.made" in r.text


# --- receiving ---------------------------------------------------------------------------------------------------

def _event(case_id: str = "5f0c1ad2-7a5e-4c41-9a52-3d6c3a1c2b11", eid: str = "evt_test_1") -> bytes:
    return json.dumps({"id": eid, "event": "payment.created", "timestamp": "2026-12-01T10:00:00Z",
                       "data": {"caseId": case_id, "reference": "RI5O06GJ", "status": "Active", "currency": "EUR",
                                "payment": {"id": "p-1", "grossAmount": 120.0, "currency": "EUR",
                                            "date": "2026-12-01T00:00:00Z"}}}).encode()


def test_bad_signatures_old_timestamps_and_replays_are_refused_or_not_recorded_twice_and_logged(tmp_path, env, serve):
    port = free_port()
    cfg = write(tmp_path, port)
    assert run_cli("webhooks", "sync", str(cfg), env=env).returncode == 0
    secret = stored_secret(cfg, env)
    srv = serve(cfg, port)
    body, now = _event(), int(time.time())

    wrong = base64.b64encode(b"x" * 32).decode()
    r = srv.post(body, {"X-Debitura-Signature": sign(wrong, now, body)})
    assert r.status_code == 401 and "does not match" in r.json()["message"]
    tampered = body.replace(b"120.0", b"1.0")
    r = srv.post(tampered, {"X-Debitura-Signature": sign(secret, now, body)})
    assert r.status_code == 401
    r = srv.post(body, {"X-Debitura-Signature": sign(secret, int(time.time()) - 301, body)})
    assert r.status_code == 401 and " s old (at most 300 s are accepted)" in r.json()["message"]
    r = srv.post(body, {})
    assert r.status_code == 401 and "no X-Debitura-Signature" in r.json()["message"]
    r = srv.post(body, {"X-Debitura-Signature": "sha256=abc"})
    assert r.status_code == 401
    big = b'{"id": "x", "event": "case.created", "data": {"pad": "' + b"a" * 300_000 + b'"}}'
    r = srv.post(big, {"X-Debitura-Signature": sign(secret, now, big)})
    assert r.status_code == 413
    assert events(cfg) == []
    # The signed ones (meant as Debitura's) are counted for status and doctor; unsigned junk is not.
    refused = json.loads(run_cli("status", str(cfg), "--output", "json", env=env).stdout)["debitura_cases"]["refused"]
    assert refused["count"] == 4 and refused["last_reason"].startswith("the X-Debitura-Signature header is not of")
    warned = _doctor_webhooks(cfg, env)
    assert warned["status"] == "warning" and "refused deliveries" in warned["message"], warned
    assert "NTP" in warned["fix"]

    good = {"X-Debitura-Signature": sign(secret, now, body)}
    r = srv.post(body, good)
    assert r.status_code == 200 and r.json() == {"received": True, "recorded": True}
    r = srv.post(body, good)  # the same delivery again (a retry, or someone replaying what they captured)
    assert r.status_code == 200 and r.json() == {"received": True, "recorded": False}
    later = int(time.time()) + 1
    r = srv.post(body, {"X-Debitura-Signature": sign(secret, later, body), "X-Debitura-Replay": "true"})
    assert r.status_code == 200 and r.json()["recorded"] is False
    assert events(cfg) == [("evt_test_1", "payment.created", "5f0c1ad2-7a5e-4c41-9a52-3d6c3a1c2b11", "webhook")]

    log = srv.stop()
    assert log.count("refused a Debitura webhook") == 6
    for reason in ("does not match the body", " s old (at most 300 s are accepted)", "no X-Debitura-Signature header", "not of the form",
                   "over 256 KB"):
        assert reason in log, reason
    assert "evt_test_1 (payment.created) was recorded before" in log and "(a replay)" in log
    assert secret not in log and base64.b64decode(secret).hex() not in log
    assert _doctor_webhooks(cfg, env)["status"] == "ok"  # an event was recorded after the refusals


def test_v1_in_base64_is_accepted_too():
    from runner.inbound.webhooks import verify
    import hashlib
    import hmac

    secret = base64.b64encode(b"k" * 32).decode()
    body, t = b'{"id":"e"}', 1_700_000_000
    mac = hmac.new(b"k" * 32, f"{t}.".encode() + body, hashlib.sha256).digest()
    assert verify(secret, f"t={t},v1={base64.b64encode(mac).decode()}", body, now=t) is None
    assert verify(secret, f"t={t},v1={mac.hex().upper()}", body, now=t) is None
    assert verify(secret, f"t={t},v1={mac.hex()}", body + b" ", now=t) is not None


# --- end to end: the simulator delivers to a real `runner serve` ---------------------------------------------------

def _story(cfg: Path, invoice_id: str, env: dict) -> str:
    ex = run_cli("explain", str(cfg), invoice_id, "--output", "json", env=env)
    assert ex.returncode == 0, ex.stdout + ex.stderr
    stages = json.loads(ex.stdout)[0]["stages"]
    return next(s["text"] for s in stages if s["stage"] == "Debitura")


def test_simulator_deliveries_to_runner_serve_show_in_explain_and_status(tmp_path, env, serve, backend):
    port = free_port()
    cfg = write(tmp_path, port, backend=backend)
    assert run_cli("webhooks", "sync", str(cfg), env=env).returncode == 0
    srv = serve(cfg, port)
    applied = run_cli("apply", str(cfg), env=env)
    assert applied.returncode == 0, applied.stderr
    cases = delivered(cfg)
    assert len(cases) > 2
    got = events(cfg)
    assert sorted(e[2] for e in got) == sorted(c[1] for c in cases)  # one case.created per case, by webhook
    assert {e[1] for e in got} == {"case.created"} and {e[3] for e in got} == {"webhook"}

    paid_invoice, paid_case, paid_ref = cases[0]
    case = sim(cfg).webhooks._case(paid_case)
    amount = case["grossAmount"]
    r = control(cfg, "POST", f"/_sandbox/cases/{paid_case}/payments", {"amount": amount, "date": "2026-12-01"})
    assert r.status_code == 201, r.text
    r = control(cfg, "POST", f"/_sandbox/cases/{paid_case}/close")
    assert r.status_code == 200 and r.json()["closeCode"] == "Paid"
    # Debitura redelivers one of those events (the replay endpoint): acknowledged, not recorded again.
    evlog = control(cfg, "GET", f"/webhooks/events?caseId={paid_case}").json()
    assert [e["eventType"] for e in evlog] == ["case.closed", "case.updated", "payment.created", "case.created"]
    assert all(e["lastResponseCode"] == 200 and e["deliveredAt"] for e in evlog)
    assert control(cfg, "POST", f"/webhooks/events/{evlog[0]['id']}/replay").status_code == 200
    assert len(events(cfg)) == len(cases) + 3

    expected = f"case {paid_ref}: active → payment {amount:.2f} {case['currency']} on 2026-12-01 → closed (paid)"
    assert _story(cfg, paid_invoice, env) == f"{expected}; collected {amount:.2f} {case['currency']}"
    other_invoice, _, other_ref = cases[1]
    assert _story(cfg, other_invoice, env) == f"case {other_ref}: active"

    st = run_cli("status", str(cfg), "--output", "json", env=env)
    dc = json.loads(st.stdout)["debitura_cases"]
    assert dc["mode"] == "push" and dc["subscription"]["url"] == srv.url
    assert dc["events"] == {"case.created": len(cases), "payment.created": 1, "case.updated": 1, "case.closed": 1}
    assert dc["cases"][0] == f"{expected}; collected {amount:.2f} {case['currency']}"
    text = run_cli("status", str(cfg), env=env).stdout
    assert "● Debitura cases (webhooks, subscription" in text and expected in text
    log = srv.stop()
    assert "recorded before: acknowledged, not recorded again (a replay)" in log


def test_a_test_subscription_gets_the_advance_lifecycle_of_test_cases(tmp_path, env, serve):
    port = free_port()
    cfg = write(tmp_path, port, f"""
  is_test: true
  webhooks:
    url: http://127.0.0.1:{port}{ROUTE}""")
    assert run_cli("webhooks", "sync", str(cfg), env=env).returncode == 0
    assert sim(cfg).webhooks.subscriptions()[0]["isTestMode"] is True
    serve(cfg, port)
    assert run_cli("apply", str(cfg), env=env).returncode == 0
    invoice, case_id, ref = delivered(cfg)[0]
    r = control(cfg, "POST", f"/test/cases/{case_id}/advance", {"to": "Closed:NoPayment"})
    assert r.json() == {"advanced": True, "state": "Closed:NoPayment"}
    assert control(cfg, "POST", f"/test/cases/{case_id}/advance", {"to": "Closed:NoPayment"}).json()["advanced"] is False
    assert _story(cfg, invoice, env) == f"case {ref}: active → closed (no payment, pre-legal collection exhausted)"
    before = len(events(cfg))
    # /test/webhooks/fire: a current-state event, delivered again as a new event (a new id): recorded.
    r = control(cfg, "POST", "/test/webhooks/fire", {"event": "case.closed", "caseId": case_id})
    assert r.json() == {"eventType": "case.closed", "caseId": case_id, "enqueuedCount": 1}
    assert len(events(cfg)) == before + 1
    r = control(cfg, "POST", "/test/webhooks/fire", {"event": "payment.created", "caseId": case_id})
    assert r.status_code == 422  # no payments on this case
    # /webhooks/{id}/test: a synthetic, signed case.created that the server accepts.
    sub = sim(cfg).webhooks.subscriptions()[0]["id"]
    r = control(cfg, "POST", f"/webhooks/{sub}/test")
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["httpStatusCode"] == 200
    assert len(events(cfg)) == before + 2


# --- polling -------------------------------------------------------------------------------------------------------

def test_polling_records_the_same_lifecycle_within_its_request_budget(tmp_path, env, backend):
    cfg = write(tmp_path, 0, """
  webhooks:
    mode: poll""", backend)
    assert run_cli("apply", str(cfg), env=env).returncode == 0
    cases = delivered(cfg)
    n = len(cases)
    part = run_cli("webhooks", "poll", str(cfg), "--max-requests", "2", env=env)
    assert part.returncode == 0, part.stderr
    assert part.stdout.startswith(f"read 2 open case(s) with 2 request(s); recorded 2 new event(s); {n - 2} case(s) "
                                  f"left for the next poll")
    rest = run_cli("webhooks", "poll", str(cfg), "--output", "json", env=env)
    # Every open case is read again (the two read first, last); only the new ones are recorded.
    assert json.loads(rest.stdout) == {"cases": n, "requests": n, "recorded": n - 2, "left": 0, "errors": []}
    assert sorted(e[2] for e in events(cfg)) == sorted(c[1] for c in cases)

    paid_invoice, paid_case, paid_ref = cases[0]
    case = sim(cfg).webhooks._case(paid_case)
    amount = case["grossAmount"]
    control(cfg, "POST", f"/_sandbox/cases/{paid_case}/payments", {"amount": amount, "date": "2026-12-01"})
    control(cfg, "POST", f"/_sandbox/cases/{paid_case}/close")
    third = json.loads(run_cli("webhooks", "poll", str(cfg), "--output", "json", env=env).stdout)
    # Every open case read once; the paid one's payments once more (its amount left changed).
    assert third == {"cases": n, "requests": n + 1, "recorded": 3, "left": 0, "errors": []}
    assert {e[3] for e in events(cfg)} == {"poll"}
    expected = f"case {paid_ref}: active → payment {amount:.2f} {case['currency']} on 2026-12-01 → closed (paid)"
    assert _story(cfg, paid_invoice, env) == f"{expected}; collected {amount:.2f} {case['currency']}"
    # The closed case is no longer read; nothing new is recorded.
    fourth = json.loads(run_cli("webhooks", "poll", str(cfg), "--output", "json", env=env).stdout)
    assert fourth == {"cases": n - 1, "requests": n - 1, "recorded": 0, "left": 0, "errors": []}
    st = json.loads(run_cli("status", str(cfg), "--output", "json", env=env).stdout)["debitura_cases"]
    assert st["mode"] == "poll" and st["subscription"] is None and st["cases"][0].startswith(expected)


def test_sync_reactivates_a_disabled_subscription_and_gets_a_secret_for_a_new_state_store(tmp_path, env):
    port = free_port()
    cfg = write(tmp_path, port)
    made = json.loads(run_cli("webhooks", "sync", str(cfg), "--output", "json", env=env).stdout)["subscription_id"]
    first = stored_secret(cfg, env)
    r = control(cfg, "PATCH", f"/webhooks/{made}", {"isActive": False})
    assert r.status_code == 200 and r.json()["isActive"] is False
    fixed = run_cli("webhooks", "sync", str(cfg), env=env)
    assert fixed.stdout.startswith(f"update subscription {made}: isActive → True"), fixed.stdout + fixed.stderr
    assert sim(cfg).webhooks.subscriptions()[0]["isActive"] is True
    assert stored_secret(cfg, env) == first  # an update keeps the secret

    # The state store is lost: the subscription at the configured URL is adopted, with a new secret (Debitura
    # shows a secret only once), not duplicated.
    for f in (tmp_path / "state").glob("state.db*"):
        f.unlink()
    adopted = run_cli("webhooks", "sync", str(cfg), env=env)
    assert adopted.stdout.startswith(f"update subscription {made}: a new signing secret"), adopted.stdout
    assert [s["id"] for s in sim(cfg).webhooks.subscriptions()] == [made]
    second = stored_secret(cfg, env)
    assert second != first and second not in adopted.stdout + adopted.stderr
    assert "nothing to change" in run_cli("webhooks", "sync", str(cfg), env=env).stdout


def test_a_push_config_without_url_is_refused_with_its_line(tmp_path, env):
    cfg = write(tmp_path, 0, """
  webhooks:
    test_mode: true""")
    r = run_cli("validate", str(cfg), env=env)
    assert r.returncode != 0 and "config.yaml:7:" in r.stderr + r.stdout
    assert "missing required key 'url' (at destination.webhooks)" in r.stderr + r.stdout


def test_status_says_to_sync_when_push_has_no_subscription(tmp_path, env):
    cfg = write(tmp_path, free_port())
    r = run_cli("status", str(cfg), env=env)
    assert r.returncode == 0, r.stderr
    assert f"no webhook subscription yet → runner webhooks sync {cfg}" in r.stdout


def test_a_server_without_the_passphrase_refuses_webhooks_and_says_why(tmp_path, env, serve):
    port = free_port()
    cfg = write(tmp_path, port)
    assert run_cli("webhooks", "sync", str(cfg), env=env).returncode == 0
    secret = stored_secret(cfg, env)
    env.pop("RUNNER_SECRET_KEY")
    srv = serve(cfg, port)
    body = _event()
    r = srv.post(body, {"X-Debitura-Signature": sign(secret, int(time.time()), body)})
    assert r.status_code == 503 and "RUNNER_SECRET_KEY is not set" in r.json()["message"]
    assert events(cfg) == []
    assert "the stored webhook secret cannot be read" in srv.stop()


def _doctor_webhooks(cfg: Path, env: dict) -> dict:
    r = run_cli("doctor", str(cfg), "--output", "json", env=env)
    checks = json.loads(r.stdout)["checks"]
    return next(c for c in checks if c["scope"] == "destination" and c["check"] == "webhooks")


def test_doctor_checks_the_subscription_and_the_secret(tmp_path, env, backend):
    port = free_port()
    cfg = write(tmp_path, port, backend=backend)
    before = _doctor_webhooks(cfg, env)
    assert before["status"] == "failed" and f"no webhook subscription to http://127.0.0.1:{port}" in before["message"]
    assert before["fix"] == f"runner webhooks sync {cfg}"
    made = json.loads(run_cli("webhooks", "sync", str(cfg), "--output", "json", env=env).stdout)["subscription_id"]
    ok = _doctor_webhooks(cfg, env)
    assert ok["status"] == "ok" and ok["message"] == (f"subscription {made} → http://127.0.0.1:{port}{ROUTE} is "
                                                      f"active; no case event recorded yet")
    control(cfg, "PATCH", f"/webhooks/{made}", {"isActive": False})
    off = _doctor_webhooks(cfg, env)
    assert off["status"] == "failed" and "Debitura disabled the subscription" in off["message"]


def test_the_zapier_server_also_takes_webhooks_without_an_api_key(tmp_path, env, serve):
    port = free_port()
    secret = base64.b64encode(os.urandom(32)).decode()
    (tmp_path / "hook-secret").write_text(secret)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
state: state/state.db
destination:
  type: debitura
  environment: sandbox
  api_key: "${{DEBITURA_API_KEY}}"
  webhooks:
    url: https://runner.example.com{ROUTE}
    secret: "${{file:hook-secret}}"     # a subscription made in Debitura's app: its secret comes from here
connections:
  - name: zaps
    integration: zapier
    environment: production
    account_id: acme-crm
""")
    srv = serve(cfg, port)
    assert srv.proc.stdout.readline().startswith("serving 'zaps'")
    assert srv.proc.stdout.readline().strip() == f"and Debitura webhooks on http://127.0.0.1:{port}{ROUTE}"
    assert httpx.post(f"http://127.0.0.1:{port}/v1/invoices", json={}).status_code == 401  # Zaps need a key
    body = _event()
    assert srv.post(body, {}).json()["message"] == "no X-Debitura-Signature header"
    r = srv.post(body, {"X-Debitura-Signature": sign(secret, int(time.time()), body)})
    assert r.status_code == 200 and r.json()["recorded"] is True
    assert [e[1] for e in events(cfg)] == ["payment.created"]
    assert secret not in srv.stop()
