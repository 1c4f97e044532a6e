"""`runner worker`: several worker processes on one PostgreSQL ledger, killed at random points.

Real processes against a real PostgreSQL (tests/pgserver.py) and `runner sandbox serve` (the Stripe simulator
with synthetic invoices, the Debitura simulator persisting its cases). Reproduce the full kill run:
    RUNNER_WORKER_KILLS=50 RUNNER_WORKER_SEED=<seed> pytest -q -s tests/test_worker.py -k sigkill
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

try:
    from tests.conftest import DEBITURA_KEY, ROOT, SANDBOX_CONFIG, STRIPE_KEY, run_cli, use_backend, write_config
    from tests.test_crash import _cases, _eligible_numbers, _post, served  # noqa: F401 (a fixture)
except ImportError:  # tests/ without __init__.py
    from conftest import DEBITURA_KEY, ROOT, SANDBOX_CONFIG, STRIPE_KEY, run_cli, use_backend, write_config
    from test_crash import _cases, _eligible_numbers, _post, served  # noqa: F401

KILLS = int(os.environ.get("RUNNER_WORKER_KILLS", "5"))
SYNTHETIC = int(os.environ.get("RUNNER_WORKER_INVOICES", "1500"))
SEED = int(os.environ.get("RUNNER_WORKER_SEED", str(random.SystemRandom().randrange(1 << 30))))
STALLED_AFTER = 3  # seconds: --stalled-after of the workers under test

CONFIG = """
state: "{url}"
integrations_dir: integrations.d
defaults:
  schedule: {{every: 2s}}
destination:
  type: debitura
  environment: sandbox
  base_url: {base}/debitura
  api_key: "${{DEBITURA_API_KEY}}"
connections:
  - name: w-stripe
    integration: stripe
    environment: sandbox
    base_url: {stripe_base}
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
{extra}"""


SECOND = """  - name: w-stripe-2
    integration: stripe
    environment: sandbox
    base_url: {stripe_base}
    credentials: {{api_key: "${{STRIPE_API_KEY}}"}}
    window: {{last: 90d}}
"""


def _workspace(tmp_path, url: str, base: str, extra: str = "", *, spec_change=None, stripe_base: str | None = None):
    """The config, beside a copy of the built-in Stripe spec (change feed, re-checks and documents included,
    unless `spec_change` edits it); the Stripe connections call `stripe_base` (default: the simulator)."""
    import yaml

    spec = yaml.safe_load((ROOT / "integrations.d" / "stripe.yaml").read_text())
    if spec_change is not None:
        spec_change(spec)
    (tmp_path / "integrations.d").mkdir()
    (tmp_path / "integrations.d" / "stripe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    cfg = tmp_path / "config.yaml"
    stripe_base = stripe_base or base + "/stripe"
    cfg.write_text(CONFIG.format(url=url, base=base, stripe_base=stripe_base,
                                 extra=extra.format(base=base, stripe_base=stripe_base)))
    return cfg


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STRIPE_API_KEY": STRIPE_KEY, "DEBITURA_API_KEY": DEBITURA_KEY}
    env.pop("RUNNER_SECRET_KEY", None)
    return env


def _start(cfg, tmp_path, n: int, concurrency: int = 2, stalled_after: float = STALLED_AFTER) -> subprocess.Popen:
    log = open(tmp_path / f"worker-{n}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "runner", "worker", str(cfg), "--concurrency", str(concurrency),
                             "--stalled-after", str(stalled_after)], cwd=tmp_path, env=_env(),
                            stdout=log, stderr=log)


def _syncs(url: str) -> list[tuple]:
    with psycopg.connect(url) as db:
        try:
            return db.execute("SELECT connection, worker, started, finished, status FROM runner_syncs "
                              "ORDER BY started").fetchall()
        except psycopg.errors.UndefinedTable:
            return []


def _assert_one_at_a_time(syncs: list[tuple], killed_at: dict[str, float]) -> None:
    """No two syncs of one connection overlap; a killed worker's sync ends at the moment it was killed."""
    by_conn: dict[str, list[tuple[float, float, str]]] = {}
    for conn, worker, started, finished, _ in syncs:
        end = finished if finished is not None else killed_at.get(worker.rsplit(":", 1)[1], float("inf"))
        by_conn.setdefault(conn, []).append((started, end, worker))
    for conn, spans in by_conn.items():
        spans.sort()
        for (s1, e1, w1), (s2, e2, w2) in zip(spans, spans[1:]):
            assert s2 >= e1, f"{conn}: a sync by {w2} started at {s2} while {w1}'s ({s1}..{e1}) ran"


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _sandbox_connections(tmp_path, pg_url: str, names: list[str], state: str = "state: state/state.db"):
    """The sandbox config (tests/conftest.py) on `pg_url`, its Stripe connection copied once per name in
    `names`, loaded; `state`: its `state:` line before the URL replaces the path (keep_runs)."""
    from runner.spec import config as config_mod

    text = SANDBOX_CONFIG.format(server_filters="false")
    one = text[text.index("  - name: acme-stripe"):]
    text = text.replace("state: state/state.db", state) + "".join(one.replace("acme-stripe", n) for n in names)
    return config_mod.load(use_backend(write_config(tmp_path, text), pg_url))


def test_worker_refuses_sqlite_state(tmp_path):
    cfg = _workspace(tmp_path, "state.db", "http://127.0.0.1:9")
    r = run_cli("worker", str(cfg), env=_env(), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "PostgreSQL" in r.stderr and "runner state migrate" in r.stderr
    assert not (tmp_path / "state.db").exists()


def test_sigkill_workers_at_random_points_every_invoice_once(served, tmp_path, pg_url):
    """3 workers sync two connections of one Stripe account every 2s (both read the same invoices: the ledger,
    keyed by the account, must deliver each once); one of them at random is SIGKILLed at a random moment, KILLS
    times, and started again. Afterwards: every eligible invoice is one Debitura case (none lost, none twice),
    every invoice is delivered in the ledger, the syncs of the connection never overlapped, and a killed
    worker's sync was finished by another within the documented bound."""
    base, sim_db = served
    _post(base + "/_sandbox/faults/stripe", {"synthetic_invoices": SYNTHETIC})
    cfg = _workspace(tmp_path, pg_url, base, SECOND)
    expected = _eligible_numbers(SYNTHETIC)
    rng = random.Random(SEED)
    procs = {n: _start(cfg, tmp_path, n) for n in range(3)}
    killed_at: dict[str, float] = {}
    mid_sync = importing = 0
    started = time.monotonic()
    try:
        for k in range(KILLS):
            assert time.monotonic() - started < 60 + 20 * KILLS, "the kill loop is far slower than expected"
            time.sleep(rng.uniform(0.2, 3.0))  # a random point of the workers' lives, not a timing crutch
            running = [s for s in _syncs(pg_url) if s[3] is None and s[1].rsplit(":", 1)[1] not in killed_at]
            n = rng.randrange(3)
            if running and rng.random() < 0.8:  # mostly the worker that is syncing right now
                pid = running[-1][1].rsplit(":", 1)[1]
                n = next((i for i, p in procs.items() if str(p.pid) == pid), n)
                mid_sync += str(procs[n].pid) == pid
            importing += len(_cases(sim_db)) < len(expected)  # cases were still being created
            procs[n].send_signal(signal.SIGKILL)
            procs[n].wait()
            killed_at[str(procs[n].pid)] = time.time()
            procs[n] = _start(cfg, tmp_path, n)
        # Every sync a kill interrupted is finished by a worker, and the connection's invoices all land.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            cases = dict(_cases(sim_db))
            last = max((s for s in _syncs(pg_url)), key=lambda s: s[2], default=None)
            if set(cases) >= expected and last is not None and last[2] > max(killed_at.values(), default=0) \
                    and any(s[3] is not None and s[4] == "ok" and s[2] > max(killed_at.values(), default=0)
                            for s in _syncs(pg_url)):
                break
            time.sleep(0.5)
    finally:
        _stop(procs.values())
    cases = dict(_cases(sim_db))
    twice = {ref: n for ref, n in cases.items() if n > 1}
    lost = expected - set(cases)
    syncs = _syncs(pg_url)
    with psycopg.connect(pg_url) as db:
        ledger = Counter(dict(db.execute("SELECT status, COUNT(*) FROM ledger GROUP BY status").fetchall()))
    # Recovery bound: after a kill, the next sync of the connection starts within stalled-after + a poll.
    gaps = []
    for pid, at in killed_at.items():
        nxt = [s[2] for s in syncs if s[2] > at]
        if any(s[1].endswith(":" + pid) and s[3] is None for s in syncs) and nxt:
            gaps.append(min(nxt) - at)
    print(f"\nworker kills: {len(killed_at)} ({mid_sync} mid-sync, {importing} while cases were being created), seed {SEED}, syncs {len(syncs)}, "
          f"cases {len(cases)}/{len(expected)}, lost {len(lost)}, twice {len(twice)}, "
          f"longest takeover {max(gaps, default=0):.1f}s")
    assert not twice, f"invoices delivered twice: {sorted(twice)[:10]} (seed {SEED})"
    assert not lost, f"{len(lost)} invoices never delivered, e.g. {sorted(lost)[:10]} (seed {SEED})"
    assert set(cases) == expected
    assert ledger.get("delivered", 0) >= len(expected) and set(ledger) <= {"delivered", "imported"}, ledger
    _assert_one_at_a_time(syncs, killed_at)
    assert max(gaps, default=0) < STALLED_AFTER * 2 + 10, gaps


def _jsonl_numbers(path) -> Counter:
    """How many lines of the jsonl file hold each invoice number (a torn last line is not a case)."""
    import orjson

    out: Counter = Counter()
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                out[orjson.loads(line)["invoice"]["number"]] += 1
            except (ValueError, KeyError, TypeError):
                continue
    return out


def _jsonl_workspace(served, tmp_path, pg_url):
    """Three connections of one Stripe account (SYNTHETIC invoices, several pages each) into one jsonl file."""
    base, _ = served
    _post(base + "/_sandbox/faults/stripe", {"synthetic_invoices": SYNTHETIC})
    cfg = _workspace(tmp_path, pg_url, base, SECOND + SECOND.replace("w-stripe-2", "w-stripe-3"))
    return cfg, _to_jsonl(cfg)


def _to_jsonl(cfg) -> Path:
    """The workspace's destination made a jsonl file (out/cases.jsonl beside the config): its path."""
    text = cfg.read_text()
    head, rest = text.split("destination:", 1)
    cfg.write_text(head + "destination: {type: jsonl, path: out/cases.jsonl}\n" + rest[rest.index("connections:"):])
    return cfg.parent / "out" / "cases.jsonl"


def _delivered_to_jsonl(url: str) -> int:
    """How many invoices the ledger has as delivered to a jsonl file."""
    with psycopg.connect(url) as db:
        return db.execute("SELECT count(*) FROM ledger WHERE status='delivered' AND destination LIKE 'jsonl:%'"
                          ).fetchone()[0]


def test_sigkill_workers_writing_one_jsonl_file_every_invoice_once(served, tmp_path, pg_url):
    """A jsonl destination written by several syncs at once: 3 workers of --concurrency 2 sync three
    connections of one Stripe account (the same invoices) into one file, a worker at random is SIGKILLed at
    a random moment, max(3, KILLS // 5) times. Afterwards the file holds every eligible invoice on exactly
    one line, and the ledger has each as delivered."""
    cfg, out = _jsonl_workspace(served, tmp_path, pg_url)
    expected = _eligible_numbers(SYNTHETIC)
    rng = random.Random(SEED)
    procs = {n: _start(cfg, tmp_path, n) for n in range(3)}
    kills = 0
    try:
        for _ in range(max(3, KILLS // 5)):
            time.sleep(rng.uniform(0.1, 2.0))  # a random point of the workers' lives, not a timing crutch
            n = rng.randrange(3)
            procs[n].send_signal(signal.SIGKILL)
            procs[n].wait()
            kills += 1
            procs[n] = _start(cfg, tmp_path, n)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and set(_jsonl_numbers(out)) < expected:
            time.sleep(0.5)
        # Every connection synced again after the last kill: whatever a kill left unrecorded is repaired.
        last_kill = time.time()
        while time.monotonic() < deadline:
            done = {s[0] for s in _syncs(pg_url) if s[2] > last_kill and s[4] == "ok"}
            if done >= {"w-stripe", "w-stripe-2", "w-stripe-3"}:
                break
            time.sleep(0.5)
    finally:
        _stop(procs.values())
    lines = _jsonl_numbers(out)
    twice = {num: c for num, c in lines.items() if c > 1}
    print(f"\njsonl kills: {kills}, seed {SEED}, lines {sum(lines.values())}, invoices {len(lines)}/{len(expected)}, "
          f"twice {len(twice)}")
    assert not twice, f"invoices written twice: {sorted(twice)[:10]} (seed {SEED})"
    assert set(lines) == expected, f"missing {sorted(expected - set(lines))[:10]} (seed {SEED})"
    assert _delivered_to_jsonl(pg_url) == len(expected)


def _children(pid: int) -> set[int]:
    """The processes `pid` forked and that still run (Linux: each of its threads lists its own)."""
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out |= {int(c) for c in open(f"/proc/{pid}/task/{tid}/children").read().split()}
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_rounds(url: str, since: float, rounds: int, timeout: float = 90,
                     names=("w-stripe", "w-stripe-2", "w-stripe-3"), proc: subprocess.Popen | None = None,
                     log: Path | None = None) -> None:
    """Until every connection in `names` has `rounds` finished syncs that started after `since` (and the
    worker `proc` runs meanwhile). A failure shows the end of the worker's `log`, and the jobs of `names`."""
    deadline = time.monotonic() + timeout
    while True:
        done = Counter(s[0] for s in _syncs(url) if s[2] >= since and s[4] == "ok")
        if all(done[n] >= rounds for n in names):
            return
        if (proc is not None and proc.poll() is not None) or time.monotonic() >= deadline:
            with psycopg.connect(url) as db:
                jobs = db.execute("SELECT id, args->>'connection', status, worker_id FROM procrastinate_jobs "
                                  "ORDER BY id").fetchall()
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            ended = "the worker ended" if proc is not None and proc.poll() is not None else f"after {timeout} s"
            pytest.fail(f"{ended}: syncs finished: {dict(done)}; jobs: {jobs}\n{tail}")
        time.sleep(0.2)


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="classification workers are forked on Linux with more than one core")
def test_a_workers_syncs_share_its_classification_processes_which_end_with_it(served, tmp_path, pg_url,
                                                                               monkeypatch):
    """A worker forks its classification process once (one: workers run one per core) and every sync after
    that hands its pages to the same one (a set per sync made the worker classify small syncs itself, a third
    more CPU); SIGKILLed, the worker takes it with it: nothing is left running that could write to the file."""
    monkeypatch.delenv("RUNNER_WORKERS", raising=False)
    cfg, out = _jsonl_workspace(served, tmp_path, pg_url)
    started = time.time()
    proc = _start(cfg, tmp_path, 0, concurrency=3)
    try:
        _wait_for_rounds(pg_url, started, 1)
        first = _children(proc.pid)
        _wait_for_rounds(pg_url, time.time(), 2)
        later = _children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(first) == 1, f"classification processes after the first syncs: {first}"
    assert later == first, f"the syncs after the first forked processes of their own: {first} then {later}"
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in first) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in first), "a classification process outlived its killed worker"
    lines = _jsonl_numbers(out)
    assert set(lines) == _eligible_numbers(SYNTHETIC) and max(lines.values()) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="classification workers are forked on Linux with more than one core")
def test_a_classification_process_killed_mid_sync_loses_and_repeats_nothing(served, tmp_path, pg_url):
    """One of a worker's classification processes SIGKILLed while the worker's syncs hand it pages: the
    worker classifies the rest itself and goes on syncing; the file holds each invoice once, the ledger too."""
    cfg, out = _jsonl_workspace(served, tmp_path, pg_url)
    expected = _eligible_numbers(SYNTHETIC)
    proc = _start(cfg, tmp_path, 0, concurrency=3)
    try:
        deadline = time.monotonic() + 60
        while not (_children(proc.pid) and out.exists() and out.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = min(_children(proc.pid))
        os.kill(victim, signal.SIGKILL)  # mid-sync: the file is being written
        killed = time.time()
        _wait_for_rounds(pg_url, killed, 1)
    finally:
        _stop([proc])
    lines = _jsonl_numbers(out)
    assert not {n for n, c in lines.items() if c > 1}, "invoices written twice"
    assert set(lines) == expected
    assert _delivered_to_jsonl(pg_url) == len(expected)


def _waiting_on(url: str, table: str) -> int:
    """How many of the server's sessions wait for a lock of `table`."""
    with psycopg.connect(url) as db:
        return db.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                          (table,)).fetchone()[0]


def _flock_waiters(path) -> int:
    """How many processes wait for an flock() of the file at `path` (Linux's /proc/locks: a waiter's line
    has `->` before its lock type)."""
    inode = os.stat(path).st_ino
    return sum(1 for line in open("/proc/locks") if "->" in line and line.split()[-3].endswith(f":{inode}"))


def test_two_syncs_writing_one_jsonl_file_at_once_write_each_invoice_once(served, tmp_path, pg_url):
    """A worker of --concurrency 2 syncs two connections of the same Stripe account (the same invoices) at
    once, into one jsonl file. The ledger is held (LOCK ... IN SHARE MODE: read, not written) until each sync
    has either written its page and waits to record it, or waits for the other's turn at the file: a sync
    must look its page up and write it only while no other writer is between its own look-up and record.
    Afterwards the file holds every eligible invoice once."""
    from runner.state import open_store

    base, _ = served
    cfg = _workspace(tmp_path, pg_url, base, SECOND)
    out = _to_jsonl(cfg)
    open_store(pg_url).close()  # the schema, before the ledger is held
    out.parent.mkdir()
    out.touch()
    holder = psycopg.connect(pg_url)
    worker = None
    try:
        holder.execute("LOCK TABLE ledger IN SHARE MODE")
        worker = _start(cfg, tmp_path, 0, concurrency=2)
        deadline = time.monotonic() + 60
        while not (_waiting_on(pg_url, "ledger") >= 2
                   or (_waiting_on(pg_url, "ledger") == 1 and _flock_waiters(out) >= 1)):
            if time.monotonic() > deadline or worker.poll() is not None:
                break  # reported below, once the ledger is free again
            time.sleep(0.05)
        reached = _waiting_on(pg_url, "ledger"), _flock_waiters(out)
    finally:
        holder.rollback()
        holder.close()
    try:
        assert reached[0] >= 2 or reached == (1, 1), \
            f"the syncs never reached their record: {reached}, {(tmp_path / 'worker-0.log').read_text()[-2000:]}"
        while time.monotonic() < deadline:
            if {s[0] for s in _syncs(pg_url) if s[4] == "ok"} >= {"w-stripe", "w-stripe-2"}:
                break
            time.sleep(0.2)
    finally:
        _stop([worker])
    lines = _jsonl_numbers(out)
    assert {n: c for n, c in lines.items() if c > 1} == {}
    assert set(lines) == _eligible_numbers(0)


def test_a_page_recorded_and_never_written_is_written_by_the_next_run_and_a_replaced_file_is_followed(
        served, tmp_path, pg_url):
    """Through PostgreSQL a page goes to a jsonl file recorded first, then written. A writer killed in
    between leaves ledger rows for lines the file does not hold (here: the file cut back to the middle of its
    last page, as a kill mid-write leaves it). The next run takes those rows back and writes those invoices:
    each once. Then the user deletes the file and new invoices appear: the next run writes only the new ones,
    once (the mark, kept from run to run, follows the new file)."""
    base, _ = served
    _post(base + "/_sandbox/faults/stripe", {"synthetic_invoices": 150})
    cfg = _workspace(tmp_path, pg_url, base)
    out = _to_jsonl(cfg)
    first = run_cli("apply", str(cfg), env=_env(), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    expected = _eligible_numbers(150)
    assert set(_jsonl_numbers(out)) == expected
    with psycopg.connect(pg_url) as db:
        start, length, claimed = db.execute("SELECT writing_from, recorded, cardinality(writing_ids) FROM sink_marks"
                                            ).fetchone()
    assert 0 < start < length == out.stat().st_size and claimed > 2
    data = out.read_bytes()
    page = data[start:]
    cut = start + page.index(b"\n", page.index(b"\n") + 1) + 1 + 40  # two whole lines, and 40 bytes of a third
    out.write_bytes(data[:cut])
    assert len(_jsonl_numbers(out)) == len(expected) - claimed + 2

    again = run_cli("apply", str(cfg), "--full", env=_env(), cwd=tmp_path)  # --full: the synthetic invoices
    assert again.returncode == 0, again.stdout + again.stderr              # have no events in the change feed
    lines = _jsonl_numbers(out)
    assert {n: c for n, c in lines.items() if c > 1} == {} and set(lines) == expected

    out.unlink()
    _post(base + "/_sandbox/faults/stripe", {"synthetic_invoices": 180})
    new = _eligible_numbers(180) - expected
    third = run_cli("apply", str(cfg), "--full", env=_env(), cwd=tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    lines = _jsonl_numbers(out)
    assert {n: c for n, c in lines.items() if c > 1} == {} and set(lines) == new and new
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT count(*) FROM ledger WHERE status='delivered'").fetchone()[0] == len(
            _eligible_numbers(180))
        assert db.execute("SELECT recorded FROM sink_marks").fetchone()[0] == out.stat().st_size


def test_apply_beside_running_workers_delivers_nothing_twice(served, tmp_path, pg_url):
    """`runner apply` while two workers sync the same connection: it either refuses (exit 3, a worker holds
    the store) or runs while no worker syncs; every invoice is one case."""
    base, sim_db = served
    _post(base + "/_sandbox/faults/stripe", {"synthetic_invoices": SYNTHETIC})
    cfg = _workspace(tmp_path, pg_url, base)
    expected = _eligible_numbers(SYNTHETIC)
    procs = [_start(cfg, tmp_path, n) for n in range(2)]
    codes = Counter()
    try:
        deadline = time.monotonic() + 120
        while not _syncs(pg_url):  # a worker has started a sync
            assert time.monotonic() < deadline, "no worker started a sync"
            time.sleep(0.2)
        for _ in range(4):
            r = run_cli("apply", str(cfg), env=_env(), cwd=tmp_path)
            codes[r.returncode] += 1
            assert r.returncode in (0, 3), r.stderr
            if r.returncode == 3:
                assert "another `runner apply`" in r.stderr
        while set(dict(_cases(sim_db))) < expected:
            assert time.monotonic() < deadline, "the invoices were not all delivered"
            time.sleep(0.5)
    finally:
        _stop(procs)
    cases = dict(_cases(sim_db))
    assert codes[3] >= 1, codes  # the first apply met a worker's sync
    assert {ref for ref, n in cases.items() if n > 1} == set()
    assert set(cases) == expected


def test_status_shows_schedule_and_the_worker_holding_a_connection(served, tmp_path, pg_url, monkeypatch):
    """While an apply holds the store, a worker's job of the connection waits (no sync starts) and status names
    the worker holding the connection; once the apply ends, the sync runs and status shows its last and next."""
    from runner.cli.diagnostics import schedule_line
    from runner.diagnostics.checks import worker_schedule
    from runner.spec import config as config_mod
    from runner.state import postgres

    base, sim_db = served
    cfg_path = _workspace(tmp_path, pg_url, base)
    monkeypatch.setenv("STRIPE_API_KEY", STRIPE_KEY)
    monkeypatch.setenv("DEBITURA_API_KEY", DEBITURA_KEY)
    cfg = config_mod.load(cfg_path)
    assert worker_schedule(cfg) == {"w-stripe": {"every_s": 2.0, "last_started": None, "last_finished": None,
                                                 "last_status": None, "next_run": None, "worker": None}}
    from runner.engine import schedule

    schedule.prepare(pg_url)
    schedule.prepare(pg_url)  # idempotent: a second worker starting finds the tables there
    with psycopg.connect(pg_url) as db:  # a sync of eight days ago: older than the week kept
        db.execute("INSERT INTO runner_syncs (connection, worker, started, finished, status) "
                   "VALUES ('w-stripe', 'old:1', %s, %s, 'ok')", (time.time() - 8 * 86400, time.time() - 8 * 86400))
    apply_lock = psycopg.connect(pg_url, autocommit=True)
    apply_lock.execute("SELECT pg_advisory_lock(%s)", (postgres.APPLY_LOCK,))  # as `runner apply` holds it
    proc = _start(cfg_path, tmp_path, 0)
    try:
        deadline = time.monotonic() + 60
        while worker_schedule(cfg)["w-stripe"]["worker"] is None:
            assert time.monotonic() < deadline and proc.poll() is None, "the worker never took the connection"
            time.sleep(0.2)
        s = worker_schedule(cfg)["w-stripe"]
        assert s["worker"].endswith(f":{proc.pid}")
        assert f"syncing now on {s['worker']}" in schedule_line(s) and "every 2s" in schedule_line(s)
        assert len(_syncs(pg_url)) == 1 and _cases(sim_db) == []  # nothing synced while the apply runs
        apply_lock.close()
        while worker_schedule(cfg)["w-stripe"]["last_status"] is None:
            assert time.monotonic() < deadline, "the sync did not run after the apply ended"
            time.sleep(0.2)
    finally:
        apply_lock.close()
        _stop([proc])
    s = worker_schedule(cfg)["w-stripe"]
    assert s["last_status"] == "ok" and s["worker"] is None and s["next_run"] is not None
    line = schedule_line(s)
    assert "last sync " in line and "(ok)" in line and "not syncing now" in line
    assert set(dict(_cases(sim_db))) == _eligible_numbers(0)
    assert "old:1" not in {w for _, w, *_ in _syncs(pg_url)}, "syncs older than a week are deleted"


def test_worker_serves_health_readiness_and_metrics(served, tmp_path, pg_url):
    import urllib.request

    from tests.conftest import free_port, wait_for_port

    base, _ = served
    cfg = _workspace(tmp_path, pg_url, base)
    port = free_port()
    log = open(tmp_path / "worker.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "runner", "worker", str(cfg), "--port", str(port)],
                            cwd=tmp_path, env=_env(), stdout=log, stderr=log)
    try:
        wait_for_port(port, timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
        deadline = time.monotonic() + 60
        while True:  # ready once the job queue is connected
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
                    assert r.status == 200
                    break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and time.monotonic() < deadline
                time.sleep(0.2)
        while not any(s[4] for s in _syncs(pg_url)):  # a sync has finished
            assert time.monotonic() < deadline, "no sync finished"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'runner_runs_total{command="worker",outcome="ok"}' in body
    finally:
        _stop([proc])
    assert proc.returncode == 143 or proc.returncode == 0, proc.returncode


def test_schedule_per_connection_overrides_the_default_and_a_bad_interval_is_explained(tmp_path, monkeypatch):
    from runner.spec import config as config_mod

    monkeypatch.setenv("STRIPE_API_KEY", STRIPE_KEY)
    monkeypatch.setenv("DEBITURA_API_KEY", DEBITURA_KEY)
    cfg_path = _workspace(tmp_path, "state.db", "http://127.0.0.1:9", SECOND + "    schedule: {{every: 1h}}\n")
    cfg = config_mod.load(cfg_path)
    assert [c.schedule_every for c in cfg.connections] == [2.0, 3600.0]
    cfg_path.write_text(cfg_path.read_text().replace("{every: 1h}", "{every: 5 minutes}"))
    r = run_cli("validate", str(cfg_path), env=_env(), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "config.yaml:" in out and "schedule" in out and "schedule: {every: 5m}" in out, out


def test_a_workers_syncs_keep_each_connections_recent_verdicts(tmp_path, sandbox_env, pg_url):
    """`keep_runs` counts each connection's own syncs in a worker: every sync is a run of its own, and counted
    together, the syncs of the other connections (500 of them, every 5 minutes) pruned a connection's
    verdicts of skipped invoices minutes after they were written, so `runner explain` had nothing to show."""
    from runner.engine import schedule

    cfg = _sandbox_connections(tmp_path, pg_url, ["acme-stripe-eu"],
                               state="state: {type: sqlite, path: state/state.db, keep_runs: 1}")
    schedule.prepare(pg_url)
    first, other = cfg.connections[0], cfg.connections[1]
    try:
        for conn in (first, other, other, other):
            assert schedule.run_sync(cfg, pg_url, conn, "test:1") == "ok"
    finally:
        schedule.close_stores()
    with psycopg.connect(pg_url) as db:
        kept = dict(db.execute("SELECT connection, count(DISTINCT run_id) FROM verdicts GROUP BY 1").fetchall())
    assert kept.get(first.name) == 1, kept  # its one sync's verdicts, after three syncs of another connection
    assert kept.get(other.name) == 1, kept  # and the other's last sync's only


def test_a_connection_taken_by_one_worker_is_not_deferred_again_by_anothers_tick(tmp_path, sandbox_env, pg_url):
    """Between a worker taking a connection's job and starting its sync, the job's queueing lock is free and
    the connection was still due: another worker's tick deferred a second job, and the connection was synced
    twice in a row (a third of them on a first import of 100 with two workers). A tick now claims what it
    defers: the connection is due again after its interval."""
    import asyncio

    from runner.engine import schedule

    cfg = _sandbox_connections(tmp_path, pg_url, ["acme-stripe-eu"])
    schedule.prepare(pg_url)

    async def ticks() -> list:
        app = schedule.make_app(cfg, pg_url, "test:1")
        async with app.open_async():
            await schedule._defer_due(app, pg_url, cfg)  # one worker's tick
            worker = await app.job_manager.register_worker()
            taken = await app.job_manager.fetch_job(queues=[schedule.QUEUE], worker_id=worker)
            await schedule._defer_due(app, pg_url, cfg)  # another's, before the first starts the sync
            return taken.task_kwargs["connection"]

    taken = asyncio.run(ticks())
    with psycopg.connect(pg_url) as db:
        jobs = Counter(r[0] for r in db.execute("SELECT args->>'connection' FROM procrastinate_jobs").fetchall())
        due = db.execute("SELECT count(*) FROM runner_schedule WHERE next_run <= now()").fetchone()[0]
    assert jobs == Counter({c.name: 1 for c in cfg.connections}), (taken, jobs)
    assert due == 0


def test_a_worker_runs_as_many_syncs_at_once_as_its_concurrency(tmp_path, sandbox_env, pg_url, monkeypatch):
    """Each sync waits in a thread while it runs. They were asyncio's default threads, min(32, cores + 4) of
    them: a worker of --concurrency 16 on 2 cores ran 6 syncs at a time. Here every sync waits until all of
    them have started: they pass only if the worker runs them all at once."""
    import asyncio
    import threading

    from runner.engine import schedule

    n = min(32, (os.cpu_count() or 1) + 4) + 2  # more than asyncio's default threads on this machine
    cfg = _sandbox_connections(tmp_path, pg_url, [f"acme-stripe-{i}" for i in range(n - 1)])
    assert len(cfg.connections) >= n
    all_started = threading.Barrier(n, timeout=20)
    ran = []

    def waits_for_the_others(cfg_, url, conn, name, concurrency):
        all_started.wait()  # raises BrokenBarrierError if fewer than n run at once
        ran.append(conn.name)
        return "ok"

    monkeypatch.setattr(schedule, "run_sync", waits_for_the_others)
    schedule.prepare(pg_url)

    async def work() -> None:
        app = schedule.make_app(cfg, pg_url, "test:1", concurrency=n)
        async with app.open_async():
            for conn in cfg.connections[:n]:
                await app.configure_task(schedule.TASK).defer_async(connection=conn.name)
            await app.run_worker_async(queues=[schedule.QUEUE], concurrency=n, wait=False,
                                       install_signal_handlers=False)

    asyncio.run(work())
    assert sorted(ran) == sorted(c.name for c in cfg.connections[:n])


def test_a_worker_whose_database_connections_are_dropped_goes_on_syncing(served, tmp_path, pg_url):
    """Every server connection of a running worker terminated at once (a failover, a restarted server, a
    proxy's idle timeout), its classification process's included: the worker's next syncs succeed, each
    connection's pages still go to that process (a page it failed on once made the worker classify every
    page of its life itself), and nothing is written twice. The pools test a connection before use only
    when the server has said something on it meanwhile, instead of a round trip at every query."""
    cfg, out = _jsonl_workspace(served, tmp_path, pg_url)
    proc = _start(cfg, tmp_path, 0, concurrency=3)
    try:
        _wait_for_rounds(pg_url, 0, 1, proc=proc)
        with psycopg.connect(pg_url, autocommit=True) as db:
            pids = [r[0] for r in db.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                             "AND pid <> pg_backend_pid()").fetchall()]
            assert len(pids) >= 4, pids  # the store's, the job queue's, the guards' and the classifier's at least
            db.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS t(pid)", (pids,))
            while db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchone()[0]:
                time.sleep(0.01)  # terminating is asynchronous: until each of them has ended
        after = time.time()
        _wait_for_rounds(pg_url, after, 2, timeout=60, proc=proc, log=tmp_path / "worker-0.log")
    finally:
        _stop([proc])
    failed = [s for s in _syncs(pg_url) if s[2] >= after and s[4] != "ok"]
    with psycopg.connect(pg_url) as db:
        why = db.execute("SELECT summary FROM runs WHERE started >= %s AND status <> 'ok'", (after,)).fetchall()
    assert not failed, f"syncs started after the connections were dropped failed: {failed}: {why}"
    log = (tmp_path / "worker-0.log").read_text()
    assert "classifies the rest itself" not in log and "could not classify a page" not in log
    lines = _jsonl_numbers(out)
    assert set(lines) == _eligible_numbers(SYNTHETIC) and max(lines.values()) == 1


TWO = ("w-stripe", "w-stripe-2")


def _worker_of_two(served, tmp_path, pg_url, **start) -> tuple[subprocess.Popen, Path]:
    """A worker (`_start` with `start`) syncing the connections TWO, each synced once already: it and its log."""
    proc = _start(_workspace(tmp_path, pg_url, served[0], SECOND), tmp_path, 0, **start)
    try:
        _wait_for_rounds(pg_url, 0, 1, names=TWO, proc=proc, log=tmp_path / "worker-0.log")
    except BaseException:
        _stop([proc])
        raise
    return proc, tmp_path / "worker-0.log"


def _rename_functions(db, names: tuple[str, ...], back: bool = False) -> None:
    """procrastinate's SQL functions `names` renamed away (as a restarting database fails them), or `back`."""
    for name in names:
        old, new = (name + "_away", name) if back else (name, name + "_away")
        signature = db.execute("SELECT p.oid::regprocedure::text FROM pg_proc p WHERE proname = %s",
                               (old,)).fetchone()[0]
        db.execute(f"ALTER FUNCTION {signature} RENAME TO {new}")


def test_a_worker_whose_job_queue_fails_takes_jobs_again_once_it_works(served, tmp_path, pg_url):
    """A query of procrastinate's own failing (here its functions to take and to defer a job gone for a
    while, as a database restarting fails them) ended `runner worker` with "unexpected ConnectorException",
    or silently ended its schedule: the worker ran on and never deferred a sync again. Now the worker lets
    its running syncs finish, says why in its log, and defers and takes jobs again once the queue works."""
    proc, log = _worker_of_two(served, tmp_path, pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as db:
            functions = ("procrastinate_fetch_job_v2", "procrastinate_defer_jobs_v1")
            _rename_functions(db, functions)
            deadline = time.monotonic() + 30
            while not all(w in log.read_text() for w in ("taking jobs again", "cannot reach the state database")):
                assert proc.poll() is None, "the worker ended when its job queue failed"
                assert time.monotonic() < deadline, "the worker never noticed its job queue failing"
                time.sleep(0.1)
            _rename_functions(db, functions, back=True)
        _wait_for_rounds(pg_url, time.time(), 2, timeout=60, names=TWO, proc=proc, log=log)
    finally:
        _stop([proc])
    assert "lost its database" in log.read_text() and "ConnectorException" not in log.read_text()
    cases = dict(_cases(served[1]))
    assert set(cases) == _eligible_numbers(0) and max(cases.values()) == 1


def _ended_but_doing(url: str) -> dict[str, tuple[int, int]]:
    """The connections whose job is `doing` and whose last sync has ended: (the job's id, the sync's id)."""
    with psycopg.connect(url) as db:
        return {r[0]: (r[1], r[2]) for r in db.execute(
            "SELECT j.args->>'connection', j.id, s.id FROM procrastinate_jobs j JOIN LATERAL (SELECT id, finished "
            "FROM runner_syncs WHERE connection = j.args->>'connection' ORDER BY id DESC LIMIT 1) s ON true "
            "WHERE j.status = 'doing' AND s.finished IS NOT NULL").fetchall()}


def test_a_sync_whose_end_the_job_queue_could_not_record_holds_up_no_later_sync(served, tmp_path, pg_url):
    """procrastinate records a job's end right after its sync; when that fails (the connection it used dropped
    at that moment, the database restarting), the job stayed `doing` under a worker whose heartbeat went on:
    never counted as stalled, its lock held every later sync of the connection back for good, while the
    worker's other connections went on syncing. The worker now records such an end itself once the queue
    works again, says so in its log, and the connection's syncs go on."""
    proc, log = _worker_of_two(served, tmp_path, pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as db:
            _rename_functions(db, ("procrastinate_finish_job_v1",))
            deadline = time.monotonic() + 30
            # Until both syncs have ended and their jobs stay `doing` (for a moment between taking a job and
            # starting its sync, a job is `doing` while the connection's last sync has ended too)
            while True:
                first = _ended_but_doing(pg_url)
                time.sleep(0.5)
                if all(n in first for n in TWO) and _ended_but_doing(pg_url) == first:
                    break
                assert proc.poll() is None, "the worker ended when its job queue failed"
                assert time.monotonic() < deadline, f"no sync ended: {_syncs(pg_url)[-4:]}"
            _rename_functions(db, ("procrastinate_finish_job_v1",), back=True)
        _wait_for_rounds(pg_url, time.time(), 2, timeout=60, names=TWO, proc=proc, log=log)
    finally:
        _stop([proc])
    assert "sync was not recorded in the job queue" in log.read_text()
    assert "recorded the end of w-stripe's sync" in log.read_text()


def test_a_worker_whose_heartbeat_fails_once_keeps_beating(served, tmp_path, pg_url):
    """procrastinate's heartbeat task ended at its first failed query (the database away for a moment) and
    nothing noticed: the worker ran on without a heartbeat, so `--stalled-after` later every sync it ran
    counted as stalled and was started again beside the one still running. The worker now says so in its
    log and beats again once the database answers: no sync of a connection overlaps another, none is handed
    over, and the syncs go on."""
    proc, log = _worker_of_two(served, tmp_path, pg_url, stalled_after=8)  # beats every 2 s
    try:
        with psycopg.connect(pg_url, autocommit=True) as db:
            away = time.time()
            _rename_functions(db, ("procrastinate_update_heartbeat_v1",))
            deadline = time.monotonic() + 30
            # Until a beat has failed: the last recorded one older than the interval between two
            while db.execute("SELECT max(now() - last_heartbeat) < interval '2.5 s' FROM procrastinate_workers"
                             ).fetchone()[0]:
                assert proc.poll() is None, f"the worker ended when its heartbeat failed: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "the worker's heartbeat never failed"
                time.sleep(0.1)
            _rename_functions(db, ("procrastinate_update_heartbeat_v1",), back=True)
        _wait_for_rounds(pg_url, time.time(), 2, timeout=60, names=TWO, proc=proc, log=log)
        # Past --stalled-after and a tick since the outage began: a worker left without a heartbeat would
        # count as stalled by now, and its syncs would be started again beside themselves.
        settled = away + 8 + 4
        _wait_for_rounds(pg_url, settled, 1, timeout=60, names=TWO, proc=proc, log=log)
        with psycopg.connect(pg_url) as db:  # the other workers see this one alive: its heartbeat is recent
            silent = db.execute("SELECT extract(epoch FROM now() - last_heartbeat) FROM procrastinate_workers"
                                ).fetchall()
        assert len(silent) == 1 and silent[0][0] < 8, f"seconds since the worker's heartbeat: {silent}"
    finally:
        _stop([proc])
    text = log.read_text()
    assert "cannot record this worker's heartbeat" in text
    assert "stopped answering" not in text and "left the `doing` state" not in text, text[-3000:]
    _assert_one_at_a_time(_syncs(pg_url), {})


def test_syncs_side_by_side_keep_the_collector_quiet_until_the_last_one_ends():
    """A sync freezes what exists before it and makes the cyclic collector's passes rare while it allocates
    (pipeline._few_collections). A worker's syncs overlap: the first to end gave the collector its defaults
    back (and unfroze everything) under the fifteen still running, whose pages then cost more CPU (two
    workers' first import of 500 connections took a median 1.16x one apply's wall; 1.04x with this). The
    defaults come back only when the last one ends."""
    import gc

    from runner.engine.pipeline import _few_collections

    before = gc.get_threshold()
    first, second = _few_collections(), _few_collections()
    first.__enter__()
    quiet = gc.get_threshold()
    assert quiet[0] > before[0] and gc.get_freeze_count() > 0
    second.__enter__()
    first.__exit__(None, None, None)  # the first sync ends while the second runs
    assert gc.get_threshold() == quiet and gc.get_freeze_count() > 0
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_tick_defers_every_due_connection_and_skips_one_with_a_job_waiting(tmp_path, sandbox_env, pg_url):
    """A tick defers its due connections in one statement. One connection whose job still waits (a slow
    sync, a backlog) makes that statement defer none: then each goes on its own, the waiting one is left
    as it is (never two jobs of a connection), and the others are deferred all the same."""
    import asyncio

    from runner.engine import schedule

    cfg = _sandbox_connections(tmp_path, pg_url, ["acme-stripe-eu", "acme-stripe-us"])
    schedule.prepare(pg_url)
    names = sorted(c.name for c in cfg.connections)

    def jobs() -> Counter:
        with psycopg.connect(pg_url) as db:
            return Counter(r[0] for r in db.execute("SELECT args->>'connection' FROM procrastinate_jobs "
                                                    "WHERE status = 'todo'").fetchall())

    async def tick() -> None:
        app = schedule.make_app(cfg, pg_url, "test:1")
        async with app.open_async():
            await schedule._defer_due(app, pg_url, cfg)

    asyncio.run(tick())
    assert jobs() == Counter({n: 1 for n in names})  # all due at first: deferred together
    with psycopg.connect(pg_url) as db:
        db.execute("DELETE FROM procrastinate_jobs WHERE args->>'connection' <> %s", (names[0],))
        db.execute("UPDATE runner_schedule SET next_run = now()")  # all due again; names[0]'s job still waits
    asyncio.run(tick())
    assert jobs() == Counter({n: 1 for n in names})
    with psycopg.connect(pg_url) as db:  # each claimed by the tick: due again after its interval
        assert db.execute("SELECT count(*) FROM runner_schedule WHERE next_run <= now()").fetchone()[0] == 0


def test_a_worker_starts_while_another_ones_sync_waits_for_an_apply(tmp_path, sandbox_env, pg_url):
    """A sync waiting for a `runner apply` holds runner_syncs (its insert waits for the store's lock), and a
    worker starting meanwhile created its tables again: CREATE INDEX IF NOT EXISTS locks the table before it
    looks, so the new worker waited for the apply to end (two workers started under an apply never both
    synced). A worker's start now leaves existing tables alone."""
    import threading

    from runner.engine import schedule
    from runner.state import postgres

    cfg = _sandbox_connections(tmp_path, pg_url, [])
    schedule.prepare(pg_url)
    apply_lock = psycopg.connect(pg_url, autocommit=True)
    apply_lock.execute("SELECT pg_advisory_lock(%s)", (postgres.APPLY_LOCK,))  # as `runner apply` holds it
    syncing = threading.Thread(target=schedule.run_sync, args=(cfg, pg_url, cfg.connections[0], "test:1"),
                               daemon=True)
    try:
        syncing.start()
        with psycopg.connect(pg_url, autocommit=True) as db:
            while not db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                                 ).fetchone()[0]:
                time.sleep(0.05)  # until the sync waits for the apply's lock
        starting = threading.Thread(target=schedule.prepare, args=(pg_url,), daemon=True)
        starting.start()
        starting.join(timeout=15)
        assert not starting.is_alive(), "a worker's start waited for the apply to end"
    finally:
        apply_lock.close()
        syncing.join(timeout=60)
        schedule.close_stores()
