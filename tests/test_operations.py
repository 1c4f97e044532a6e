"""Operations: log lines a shipper can parse, metrics, health endpoints, status as a health check, progress.

Everything runs the real CLI (or a real server over a socket) against the built-in sandbox.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

try:
    from conftest import DEBITURA_KEY, ROOT, STRIPE_KEY, free_port, run_cli, wait_for_port
    from test_inbound import Server, invoice, make_key, write as write_inbound
except ModuleNotFoundError:  # tests/ as a package
    from tests.conftest import DEBITURA_KEY, ROOT, STRIPE_KEY, free_port, run_cli, wait_for_port
    from tests.test_inbound import Server, invoice, make_key, write as write_inbound

BAD_KEY = "sk_test_sandbox_wrongwrongwrong1234"
TWO = """state: state/state.db
destination: {type: jsonl, path: out.jsonl}
connections:
  - name: good
    integration: stripe
    environment: sandbox
    credentials: {api_key: "${STRIPE_API_KEY}"}
    window: {last: 90d}
  - name: bad
    integration: stripe
    environment: sandbox
    credentials: {api_key: "${BAD_KEY}"}
    window: {last: 90d}
"""
ENV = {"STRIPE_API_KEY": STRIPE_KEY, "BAD_KEY": BAD_KEY, "DEBITURA_API_KEY": DEBITURA_KEY}


def sample(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "sample-config.yaml", tmp_path / "sample-config.yaml")
    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    return tmp_path / "sample-config.yaml"


def two(tmp_path: Path, good_only: bool = False) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TWO.split("  - name: bad")[0] if good_only else TWO)
    return cfg


# --- logs -----------------------------------------------------------------------------------------------------

def test_json_logs_are_one_object_per_line_with_run_id_and_connection_and_parse_with_jq(tmp_path):
    cfg = sample(tmp_path)
    r = run_cli("--log-format", "json", "apply", str(cfg), "-v", cwd=tmp_path, env={"RUNNER_PROGRESS_EVERY": "600"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(line.strip() for line in lines)
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "event", "run_id", "connection"} <= set(entries[0])
    refreshed = [e for e in entries if "renewed" in e["event"]]
    assert refreshed and all(e["level"] == "INFO" and e["run_id"] == 1 and e["connection"] in
                             ("acme-quickbooks", "acme-zoho") for e in refreshed)
    if shutil.which("jq"):
        out = subprocess.run(["jq", "-r", ".connection"], input=r.stderr, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert set(out.stdout.split()) <= {"acme-quickbooks", "acme-zoho", "acme-stripe", "null"}


def test_the_environment_chooses_json_logs_too(tmp_path):
    cfg = sample(tmp_path)
    r = run_cli("plan", str(cfg), "-v", cwd=tmp_path, env={"RUNNER_LOG_FORMAT": "json"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() and all(json.loads(line)["level"] for line in r.stderr.splitlines())


def test_text_logs_have_no_blank_lines_between_entries(tmp_path):
    cfg = sample(tmp_path)
    r = run_cli("apply", str(cfg), "-v", cwd=tmp_path, env={"RUNNER_PROGRESS_EVERY": "600"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) >= 2 and all(re.match(r"\d\d:\d\d:\d\d (INFO|WARNING|DEBUG)", line) for line in lines), lines


def test_json_log_lines_are_redacted_after_serialization(capsys, monkeypatch):
    """A secret in a log line (and in the context bound to it) is masked in the JSON text itself."""
    from loguru import logger

    from runner import redact
    from runner.cli.main import setup_logging

    secret = "sk_live_51JsonLogSecretValue9876"
    redact.register(secret)
    monkeypatch.setenv("RUNNER_LOG_FORMAT", "json")
    setup_logging(1)
    try:
        with logger.contextualize(connection="acme", run_id=7, header=f"Bearer {secret}"):
            logger.info("calling with {}", secret)
    finally:
        logger.remove()
    err = capsys.readouterr().err
    assert secret not in err
    entry = json.loads(err)
    assert entry["connection"] == "acme" and entry["run_id"] == 7 and entry["event"].startswith("calling with ")


# --- the summary and status as a health check ---------------------------------------------------------------

def test_total_counts_a_failed_connection_and_status_exit_code_fails_on_it(tmp_path):
    cfg = two(tmp_path)
    r = run_cli("apply", str(cfg), env=ENV)
    assert r.returncode == 1
    total = [line for line in r.stdout.splitlines() if line.startswith("total:")][0]
    assert "1 connection failed (bad)" in total, total
    assert BAD_KEY not in r.stdout

    st = run_cli("status", str(cfg), "--exit-code", env=ENV)
    assert st.returncode == 1, st.stdout
    assert "unhealthy: 1 connection(s)" in st.stdout and "bad: its last run" in st.stdout
    assert run_cli("status", str(cfg), env=ENV).returncode == 0  # without the flag: a report, not a check
    js = run_cli("status", str(cfg), "--exit-code", "-o", "json", env=ENV)
    assert js.returncode == 1 and json.loads(js.stdout)["unhealthy"][0]["connection"] == "bad"


def test_status_exit_code_passes_when_healthy_and_fails_on_needs_reconnect(tmp_path):
    from runner.state.sqlite import Store

    cfg = two(tmp_path, good_only=True)
    assert run_cli("apply", str(cfg), env=ENV).returncode == 0
    ok = run_cli("status", str(cfg), "--exit-code", env=ENV)
    assert ok.returncode == 0 and "unhealthy" not in ok.stdout
    store = Store(tmp_path / "state" / "state.db")  # what a revoked OAuth grant leaves behind
    try:
        store.update_connection("good", status="needs_reconnect")
    finally:
        store.close()
    bad = run_cli("status", str(cfg), "--exit-code", env=ENV)
    assert bad.returncode == 1 and "good: needs reconnecting: runner connect good" in bad.stdout


# --- progress -------------------------------------------------------------------------------------------------

def test_without_a_terminal_progress_lines_come_at_the_interval(tmp_path):
    cfg = sample(tmp_path)
    r = run_cli("apply", str(cfg), cwd=tmp_path, env={"RUNNER_PROGRESS_EVERY": "0.2"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("progress ")]
    assert len(lines) >= 2, r.stderr
    assert re.match(r"progress \d+:\d\d:\d\d: \d+ of 3 connection\(s\) started, [\d,]+ invoices seen \([\d,]+/s\), "
                    r"[\d,]+ imported", lines[-1]), lines[-1]
    assert any("acme-" in line for line in lines)


def test_progress_lines_are_json_log_entries_with_json_logs(tmp_path):
    cfg = sample(tmp_path)
    r = run_cli("--log-format", "json", "apply", str(cfg), cwd=tmp_path, env={"RUNNER_PROGRESS_EVERY": "0.2"})
    assert r.returncode == 0, r.stderr
    entries = [json.loads(line) for line in r.stderr.splitlines()]
    progress = [e for e in entries if e["logger"] == "runner.progress"]
    assert len(progress) >= 2 and progress[-1]["event"].startswith("progress ")
    assert sum(c["seen"] for c in progress[-1]["connections"].values()) > 0


def test_a_short_run_prints_no_progress_line(tmp_path):
    cfg = two(tmp_path, good_only=True)
    r = run_cli("plan", str(cfg), env=ENV)
    assert r.returncode == 0 and "progress" not in r.stderr


# --- metrics and health endpoints -----------------------------------------------------------------------------

def _families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample_name: str, **labels) -> float | None:
    for s in families[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_serve_answers_metrics_health_and_readiness_after_a_real_import(tmp_path):
    cfg = write_inbound(tmp_path)
    key = make_key(cfg, "production")
    srv = Server(cfg)
    try:
        assert srv.http.get("/healthz").status_code == 200
        assert srv.http.get("/readyz").json() == {"ok": True}
        r = srv.post(key, [invoice(1), invoice(2), invoice(3, customer={"name": "No Address Ltd"})])
        assert r.status_code in (200, 422), r.text
        m = srv.http.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        fam = _families(m.text)
    finally:
        srv.stop()
    documented = (ROOT / "docs" / "operations.md").read_text()
    for name in ("runner_runs", "runner_invoices", "runner_provider_requests", "runner_rate_limit_waits",
                 "runner_rate_limit_wait_seconds", "runner_token_refreshes", "runner_last_success_timestamp_seconds",
                 "runner_connection_failed"):
        assert f"`{name}" in documented, name
    assert _value(fam, "runner_runs", "runner_runs_total", command="serve") == 1
    assert _value(fam, "runner_invoices", "runner_invoices_total", connection="zaps", verdict="imported") == 2
    assert _value(fam, "runner_invoices", "runner_invoices_total", connection="zaps", verdict="skipped") == 1
    assert _value(fam, "runner_provider_requests", "runner_provider_requests_total", status="2xx") >= 2
    assert _value(fam, "runner_connection_failed", "runner_connection_failed", connection="zaps") == 0
    assert _value(fam, "runner_last_success_timestamp_seconds", "runner_last_success_timestamp_seconds",
                  connection="zaps") > 1.7e9


def test_sandbox_serve_answers_health_and_readiness(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "sandbox", "serve", "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for_port(port)
        for path in ("/healthz", "/readyz"):
            r = httpx.get(f"http://127.0.0.1:{port}{path}")
            assert r.status_code == 200 and r.json()["ok"] is True and "debitura" in r.json()["simulators"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_metrics_module_counts_a_pipeline_run(tmp_path):
    """The registry a long-running process serves: a plan through the pipeline shows up in it."""
    import asyncio

    from runner import metrics
    from runner.engine import pipeline
    from runner.spec import config

    cfg_path = two(tmp_path)
    cfg = config.load(cfg_path, environ={**os.environ, **ENV})
    labels = {"command": "plan", "outcome": "failed"}
    before = metrics.registry().get_sample_value("runner_runs_total", labels) or 0
    asyncio.run(pipeline.sync(cfg, mode="plan", store=None))
    fam = _families(metrics.exposition()[0].decode())
    assert metrics.registry().get_sample_value("runner_runs_total", labels) == before + 1
    assert _value(fam, "runner_connection_failed", "runner_connection_failed", connection="bad") == 1
    assert _value(fam, "runner_provider_requests", "runner_provider_requests_total", target="Stripe",
                  status="4xx") >= 1


def test_on_a_terminal_each_connection_shows_totals_rate_and_elapsed_time(tmp_path):
    """A real pseudo-terminal: rich's live display draws a line per connection while the run goes."""
    import pty
    import select

    cfg = sample(tmp_path)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "apply", str(cfg)], cwd=tmp_path, stdin=secondary,
                            stdout=secondary, stderr=secondary, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                     "COLUMNS": "200", "TERM": "xterm"})
    os.close(secondary)
    out = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    live = re.findall(r"acme-zoho: [\d,]+ seen · [\d,]+ imported · [\d,]+ failed(?: · [\d,]+/s)? *\d+:\d\d:\d\d", text)
    assert live, text[-2000:]
    assert "total: imported" in text
