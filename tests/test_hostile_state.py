"""Error classes and state under hostile input (issue 19, items 8 to 11).

Real processes throughout: `python -m runner` in a subprocess, providers served by a real `SandboxServer` on
127.0.0.1 in this process (a Stripe simulator that stalls or repeats a page on request), signals sent with
os.kill, a worker forked by the runner's own code.
"""
from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner.sandbox.core import SandboxServer
from runner.sandbox.stripe import StripeSimulator

try:
    from tests.conftest import ROOT, page_size, run_cli, stripe_workspace
except ImportError:  # tests/ without __init__.py
    from conftest import ROOT, page_size, run_cli, stripe_workspace

ENV = {"PYTHONPATH": str(ROOT)}


def _state(cfg: Path, value: str) -> Path:
    """The config with its `state:` set to `value`."""
    lines = [f"state: {value}" if line.startswith("state:") else line for line in cfg.read_text().splitlines()]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _clean(out: subprocess.CompletedProcess) -> str:
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "bug in the runner" not in text, text
    return text


# --- 19.8: a state path the runner cannot use is the config's problem (exit 2, with the fix) ----------------

def _garbage(tmp: Path) -> str:
    (tmp / "garbage.db").write_bytes(b"this is not an SQLite database, it is a shopping list\n" * 40)
    return "garbage.db"


def _folder(tmp: Path) -> str:
    (tmp / "afolder").mkdir()
    return "afolder"


STATE_PATHS = {
    "dev-null": (lambda tmp: "/dev/null", "is not a regular file"),
    "dev-full": (lambda tmp: "/dev/full", "is not a regular file"),
    "proc-self-mem": (lambda tmp: "/proc/self/mem", "cannot be used as a database"),
    "a-folder": (_folder, "is a folder"),
    # Read-only even for root (the tests may run as root, for whom a chmod 555 folder is writable).
    "read-only-folder": (lambda tmp: "/sys/state.db", "cannot be created or written"),
    "garbage-file": (_garbage, "is not a runner state database"),
}


@pytest.mark.parametrize("kind", list(STATE_PATHS))
@pytest.mark.parametrize("command", ["apply", "status"])
def test_a_state_path_the_runner_cannot_use_is_exit_2_with_the_fix(tmp_path, kind, command):
    make, words = STATE_PATHS[kind]
    cfg = _state(stripe_workspace(tmp_path), make(tmp_path))
    out = run_cli(command, str(cfg), cwd=tmp_path, env=ENV)
    text = _clean(out)
    assert out.returncode == 2, text
    assert "state file" in out.stderr and words in out.stderr, out.stderr
    assert "fix:" in out.stderr and "state:" in out.stderr, out.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_state_file_in_a_folder_without_write_access_is_exit_2(tmp_path):
    (tmp_path / "ro").mkdir()
    cfg = _state(stripe_workspace(tmp_path), "ro/state.db")
    (tmp_path / "ro").chmod(0o555)
    try:
        out = run_cli("apply", str(cfg), cwd=tmp_path, env=ENV)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert out.returncode == 2 and "cannot be created" in _clean(out), out.stderr


def test_keep_runs_beyond_its_bound_is_refused_by_validate(tmp_path):
    cfg = _state(stripe_workspace(tmp_path), "{type: sqlite, path: state.db, keep_runs: 99999999999999999999999999}")
    out = run_cli("validate", str(cfg), cwd=tmp_path, env=ENV)
    assert out.returncode == 2, _clean(out)
    assert "keep_runs" in out.stderr and "maximum of 100000" in out.stderr, out.stderr
    ok = _state(cfg, "{type: sqlite, path: state.db, keep_runs: 100000}")
    out = run_cli("apply", str(ok), cwd=tmp_path, env=ENV)
    assert out.returncode == 0, _clean(out)


INBOUND_CONFIG = """
state: state.db
destination: {type: jsonl, path: out.jsonl}
connections:
  - name: zaps
    integration: zapier
    environment: production
    account_id: acme-crm
"""


@pytest.mark.parametrize("command", ["sandbox", "serve"])
def test_a_port_in_use_is_exit_2_naming_the_port(tmp_path, command):
    (tmp_path / "config.yaml").write_text(INBOUND_CONFIG)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = (["sandbox", "serve", "--port", str(port)] if command == "sandbox"
                else ["serve", str(tmp_path / "config.yaml"), "--port", str(port)])
        out = run_cli(*args, cwd=tmp_path, env=ENV, timeout=60)
    text = _clean(out)
    assert out.returncode == 2, text
    assert str(port) in out.stderr and "--port" in out.stderr, out.stderr


# --- 19.9: the apply lock is the real file's, whatever path reaches it ---------------------------------------

def _holds_lock(pid: int, path: Path) -> bool:
    """Whether process `pid` holds a POSIX lock on `path` (/proc/locks: pid, then device:inode)."""
    inode = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "POSIX" in fields and str(pid) in fields and any(f.endswith(f":{inode}") for f in fields):
            return True
    return False


def _writing_lock(state: Path):
    """Hold the store's writers' lock (`<store>-writing`): an apply waits at its first write transaction,
    having taken the run lock, until it is released."""
    import fcntl

    fd = os.open(str(state) + "-writing", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_second_config_reaching_the_store_through_a_symlink_waits_for_the_lock(tmp_path):
    first = stripe_workspace(tmp_path / "a")
    second = _state(stripe_workspace(tmp_path / "b"), "linked.db")
    real = tmp_path / "a" / "state.db"
    run_cli("plan", str(first), cwd=first.parent, env=ENV)  # creates nothing: the store exists once opened
    assert real.exists()
    os.symlink(real, tmp_path / "b" / "linked.db")
    held = _writing_lock(real)
    env = {**os.environ, **ENV}
    one = subprocess.Popen([sys.executable, "-m", "runner", "apply", str(first)], cwd=first.parent, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lockfile = Path(str(real) + ".lock")
        while not (lockfile.exists() and _holds_lock(one.pid, lockfile)):
            assert one.poll() is None, one.communicate()
            select.select([], [], [], 0.02)
        two = subprocess.Popen([sys.executable, "-m", "runner", "apply", str(second)], cwd=second.parent, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = two.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # it went past the lock and waits for the writers' lock
            two.kill()
            out, err = two.communicate()
            pytest.fail("the second apply was not stopped by the lock: it ran alongside the first")
        assert two.returncode == 3, out + err
        assert "another `runner apply`" in err, err
    finally:
        os.close(held)
        out, err = one.communicate(timeout=60)
    assert one.returncode == 0, out + err


# --- 19.10: SIGTERM stops apply like Ctrl-C; a run whose process died is closed by the next apply ----------

class StallingStripe(StripeSimulator):
    """The Stripe simulator; a request for a page after the first waits until `release` is set (a provider
    that stops answering mid-run). `asked` is set when such a request arrives."""

    def __init__(self):
        super().__init__()
        self.asked = threading.Event()
        self.release = threading.Event()

    async def dispatch(self, request):
        if request.url.path == "/v1/invoices" and "starting_after" in request.url.params:
            self.asked.set()
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        return await super().dispatch(request)


@pytest.fixture
def stalling():
    sim = StallingStripe()
    server = SandboxServer({"stripe": sim})
    server.start()
    try:
        yield sim, server.url("stripe")
    finally:
        sim.release.set()
        server.stop()


def _start_apply(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner", "apply", str(cfg)], cwd=cfg.parent,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _runs(state: Path) -> list[tuple]:
    db = sqlite3.connect(state)
    try:
        return db.execute("SELECT id, status, summary FROM runs ORDER BY id").fetchall()
    finally:
        db.close()


def test_sigterm_finishes_the_page_records_and_exits_143_with_a_summary(tmp_path, stalling):
    sim, url = stalling
    cfg = stripe_workspace(tmp_path, page_size(5), extra=f"    base_url: {url}\n")
    proc = _start_apply(cfg)
    try:
        assert sim.asked.wait(60), proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err and "bug in the runner" not in err, err
    assert proc.returncode == 143, out + err
    assert "interrupted (SIGTERM)" in out and "seen 5 ·" in out, out
    (run_id, status, summary), = _runs(tmp_path / "state.db")
    assert status == "interrupted", status
    assert json.loads(summary)["totals"]["seen"] == 5
    db = sqlite3.connect(tmp_path / "state.db")
    try:  # the first page, all five invoices, with one verdict each
        imported = db.execute("SELECT COUNT(*) FROM ledger WHERE run_id=? AND status='delivered'", (run_id,)).fetchone()[0]
        others = db.execute("SELECT COUNT(*) FROM verdicts WHERE run_id=?", (run_id,)).fetchone()[0]
    finally:
        db.close()
    assert imported + others == 5
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == imported


def test_a_run_left_running_by_a_killed_apply_is_closed_by_the_next(tmp_path, stalling):
    sim, url = stalling
    cfg = stripe_workspace(tmp_path, page_size(5), extra=f"    base_url: {url}\n")
    proc = _start_apply(cfg)
    try:
        assert sim.asked.wait(60), proc.communicate()
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r[1] for r in _runs(tmp_path / "state.db")] == ["running"]
    sim.release.set()
    out = run_cli("apply", str(cfg), cwd=tmp_path, env=ENV)
    assert out.returncode == 0, _clean(out)
    (_, first, summary), (_, second, _) = _runs(tmp_path / "state.db")
    assert (first, second) == ("interrupted", "ok")
    assert "its process ended" in json.loads(summary)["error"]


WORKER_GONE = r"""
import pickle, select, socket, sys, multiprocessing
from runner.engine import workers

mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
worker = multiprocessing.get_context("fork").Process(target=workers._serve, args=(theirs, [mine]), daemon=True)
worker.start()
theirs.close()
frame = pickle.dumps(("a question", "the worker cannot answer"))
mine.sendall(workers._HEADER.pack(len(frame)) + frame)
select.select([mine], [], [], 30)  # its answer has arrived: the engine now goes without reading it
mine.close()
worker.join(30)
print("exitcode", worker.exitcode)
"""


def test_a_worker_whose_engine_is_gone_exits_quietly(tmp_path):
    """The engine's end of the socket closed with an answer unread (as when it is killed): the worker's next
    read is a connection reset. It ends without a traceback."""
    out = subprocess.run([sys.executable, "-c", WORKER_GONE], cwd=ROOT, env={**os.environ, **ENV},
                         capture_output=True, text=True, timeout=60)
    assert "Traceback" not in out.stderr and "ConnectionResetError" not in out.stderr, out.stderr
    assert "exitcode 0" in out.stdout, out.stdout + out.stderr


# --- 19.11: one verdict per invoice when a page repeats; the support bundle is private --------------------

class RepeatingStripe(StripeSimulator):
    """The Stripe simulator answering the request for page 2 with page 1 again (a cursor it ignores)."""

    async def dispatch(self, request):
        if request.url.path == "/v1/invoices" and "starting_after" in request.url.params:
            import httpx

            request = httpx.Request("GET", str(request.url.copy_remove_param("starting_after")),
                                    headers=request.headers)
        return await super().dispatch(request)


def test_a_repeated_page_gives_each_invoice_one_verdict(tmp_path):
    server = SandboxServer({"stripe": RepeatingStripe()})
    server.start()
    try:
        cfg = stripe_workspace(tmp_path, page_size(10), extra=f"    base_url: {server.url('stripe')}\n")
        out = run_cli("apply", str(cfg), "-o", "json", cwd=tmp_path, env=ENV)
    finally:
        server.stop()
    _clean(out)
    conn = json.loads(out.stdout)["connections"][0]
    assert conn["status"] == "failed" and "looping" in conn["error"], conn
    assert conn["seen"] == 10, conn
    assert "duplicate" not in conn["skipped"], conn  # not imported and then duplicate in the same run
    assert conn["imported"] + sum(conn["skipped"].values()) + conn["failed"] == 10
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == conn["imported"]


def test_the_support_bundle_is_written_for_its_owner_only(tmp_path):
    cfg = stripe_workspace(tmp_path)
    assert run_cli("apply", str(cfg), cwd=tmp_path, env=ENV).returncode == 0
    bundle = tmp_path / "bundle.json"
    bundle.write_text("an older bundle, world-readable\n")
    bundle.chmod(0o644)
    out = run_cli("support-bundle", str(cfg), "--offline", "--out", str(bundle), cwd=tmp_path, env=ENV)
    assert out.returncode == 0, _clean(out)
    assert bundle.stat().st_mode & 0o777 == 0o600
    fresh = tmp_path / "fresh.json"
    out = subprocess.run(["sh", "-c", f"umask 000 && {sys.executable} -m runner support-bundle {cfg} --offline "
                                      f"--out {fresh}"], cwd=tmp_path, env={**os.environ, **ENV},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert fresh.stat().st_mode & 0o777 == 0o600
