"""apply asks before creating real collection cases: on a terminal (a pseudo-terminal here) it shows the plan
and asks; without one it refuses unless --auto-approve; the sandbox and a jsonl file never ask."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import httpx
import pytest

from conftest import DEBITURA_KEY, ROOT, SANDBOX_CONFIG, STRIPE_KEY, free_port, run_cli, wait_for_port

PROMPT = b"Create these"


@pytest.fixture
def served(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "sandbox", "serve", "--port", str(port),
                             "--data-dir", str(tmp_path / "sim")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _production(tmp_path, base):
    path = tmp_path / "config.yaml"
    path.write_text(f"""
state: state.db
destination:
  type: debitura
  environment: production
  base_url: {base}/debitura
  api_key: "${{DEBITURA_API_KEY}}"
connections:
  - name: acme-stripe
    integration: stripe
    environment: test
    allow_test_source: true          # the simulator stands in for a live account here
    base_url: {base}/stripe
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
""")
    return path


ENV = {**os.environ, "STRIPE_API_KEY": STRIPE_KEY, "DEBITURA_API_KEY": DEBITURA_KEY, "PYTHONPATH": str(ROOT),
       "NO_COLOR": "1", "TERM": "dumb"}


def _cases(base):
    r = httpx.get(f"{base}/debitura/cases", params={"PageSize": 100}, headers={"XApiKey": DEBITURA_KEY})
    r.raise_for_status()
    return r.json()["cases"]


def on_terminal(args, cwd, answer: bytes | None, timeout=120) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as its stdin/stdout/stderr; type `answer` when it asks."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the runner, on the terminal
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "runner", *args], ENV)
    out = b""
    answered = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal: it ended
                break
            if not chunk:
                break
            out += chunk
            if answer is not None and not answered and PROMPT in out:
                os.write(fd, answer)
                answered = True
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_on_a_terminal_production_apply_shows_the_plan_and_no_sends_nothing(tmp_path, served):
    cfg = _production(tmp_path, served)
    code, out = on_terminal(["apply", str(cfg)], tmp_path, b"n\n")
    assert code == 1, out
    assert "Plan:" in out and "case(s) to create" in out and "Create these" in out and "Nothing was sent." in out
    assert _cases(served) == []


def test_on_a_terminal_yes_applies_exactly_the_plan_shown(tmp_path, served):
    cfg = _production(tmp_path, served)
    assert run_cli("plan", str(cfg), "--out", "plan.json", env=ENV, cwd=tmp_path).returncode == 0
    code, out = on_terminal(["apply", "plan.json"], tmp_path, b"y\n")
    assert code == 0, out
    import json

    planned = {e["number"] for c in json.loads((tmp_path / "plan.json").read_text())["connections"]
               for e in c["invoices"]}
    assert planned and {c["creditorReference"] for c in _cases(served)} == planned


def test_without_a_terminal_production_apply_refuses_unless_auto_approve(tmp_path, served):
    cfg = _production(tmp_path, served)
    r = subprocess.run([sys.executable, "-m", "runner", "apply", str(cfg)], cwd=tmp_path, env=ENV,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "there is no terminal to ask for approval; nothing was sent" in r.stderr and "--auto-approve" in r.stderr
    assert _cases(served) == []
    r = subprocess.run([sys.executable, "-m", "runner", "apply", str(cfg), "--auto-approve"], cwd=tmp_path, env=ENV,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(_cases(served)) > 0


@pytest.mark.parametrize("destination", ["sandbox", "jsonl"])
def test_the_sandbox_and_a_file_never_ask_even_on_a_terminal(tmp_path, destination):
    body = SANDBOX_CONFIG.format(server_filters="false")
    if destination == "jsonl":
        body = body.replace('type: debitura\n  environment: sandbox\n  api_key: "${DEBITURA_API_KEY}"',
                            "type: jsonl\n  path: out.jsonl")
    (tmp_path / "config.yaml").write_text(body)
    code, out = on_terminal(["apply", "config.yaml"], tmp_path, None)
    assert code == 0, out
    assert "Create these" not in out and "imported" in out
    assert (tmp_path / "out.jsonl").exists() == (destination == "jsonl")
