"""Rate limits held across processes: connections of one provider account synced by different workers stay
within the account's declared limit together (runner/state/postgres.py RateBudget), on a real PostgreSQL
server, with real worker processes and the Stripe simulator behind a recording proxy on a real socket."""
from __future__ import annotations

import http.server
import threading
import time

import httpx
import psycopg
import pytest

try:
    from tests.conftest import free_port
    from tests.test_crash import _post, served  # noqa: F401 (a fixture)
    from tests.test_worker import SECOND, _env, _start, _stop, _syncs, _workspace
except ImportError:  # tests/ without __init__.py
    from conftest import free_port
    from test_crash import _post, served  # noqa: F401
    from test_worker import SECOND, _env, _start, _stop, _syncs, _workspace

RATE = 4.0  # requests per second the test's Stripe spec declares


class RecordingProxy:
    """Forwards every request to `upstream` and notes when it arrived: what the provider sees."""

    def __init__(self, upstream: str, delay: float = 0.0):
        """`delay`: seconds each request takes at least (a provider's latency), so that requests sent at once
        are in flight together."""
        self.upstream, self.arrivals, self.port = upstream, [], free_port()
        self.in_flight = self.most_in_flight = 0
        client, arrivals, proxy, lock = httpx.Client(timeout=30), self.arrivals, self, threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's name)
                arrivals.append((time.monotonic(), self.path))
                with lock:
                    proxy.in_flight += 1
                    proxy.most_in_flight = max(proxy.most_in_flight, proxy.in_flight)
                try:
                    time.sleep(delay)
                    r = client.get(upstream + self.path, headers={k: v for k, v in self.headers.items()
                                                                  if k.lower() not in ("host", "connection")})
                finally:
                    with lock:
                        proxy.in_flight -= 1
                body = r.content
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_two_workers_syncing_one_account_stay_within_its_declared_rate_together(served, tmp_path, pg_url):
    """Two connections of one Stripe account (one key), each synced by a worker process of its own at the
    same moment. Each worker alone may send RATE requests a second; together they must too, or the account's
    real limit is exceeded by as many workers as there are. Without the shared budget the proxy saw about
    twice RATE a second."""
    from runner.engine import schedule
    from runner.state import postgres

    base, _ = served
    _post(base + "/_sandbox/faults/stripe", {"synthetic_invoices": 300})
    proxy = RecordingProxy(base + "/stripe")

    def declare_rate(spec: dict) -> None:
        spec["environments"]["sandbox"]["rate_limit"] = {"requests_per_second": RATE, "concurrency": 4}
        spec.pop("document", None)  # list pages only, and small ones: many requests, few cases to create
        spec["invoices"]["request"]["params"]["limit"] = "10"

    cfg = _workspace(tmp_path, pg_url, base, SECOND, spec_change=declare_rate,
                     stripe_base=f"http://127.0.0.1:{proxy.port}")
    cfg.write_text(cfg.read_text().replace("schedule: {every: 2s}", "schedule: {every: 1h}"))
    # Held as `runner apply` holds it, the store's lock keeps each worker's sync waiting until both have one:
    # then both start at once.
    apply_lock = psycopg.connect(pg_url, autocommit=True)
    apply_lock.execute("SELECT pg_advisory_lock(%s)", (postgres.APPLY_LOCK,))
    procs = [_start(cfg, tmp_path, n, concurrency=1, stalled_after=30) for n in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len({r["worker"] for r in schedule.schedule_rows(pg_url).values() if r["worker"]}) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no sync for each worker"
            time.sleep(0.2)
        apply_lock.close()
        while {s[0] for s in _syncs(pg_url) if s[3] is not None} != {"w-stripe", "w-stripe-2"}:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the two syncs did not end"
            time.sleep(0.2)
    finally:
        apply_lock.close()
        _stop(procs)
        proxy.close()
    syncs = [next(s for s in _syncs(pg_url) if s[0] == name) for name in ("w-stripe", "w-stripe-2")]
    assert {s[4] for s in syncs} == {"ok"}, syncs
    assert len({s[1] for s in syncs}) == 2, "each connection was synced by a worker of its own"
    (s1, e1), (s2, e2) = [(s[2], s[3]) for s in syncs]
    assert max(s1, s2) < min(e1, e2), "the two syncs ran at the same time"
    times = [t for t, _ in proxy.arrivals]
    assert len(times) >= 30, proxy.arrivals
    span = max(times) - min(times)
    # Spaced by 1/RATE among all: at most RATE + 1 arrivals in any second, give or take the network's jitter.
    assert _most_in_one_second(times) <= RATE + 2, sorted(times)
    assert (len(times) - 1) / span <= RATE * 1.1, (len(times), span)


def test_syncs_of_one_account_side_by_side_in_one_worker_share_its_concurrency_cap(served, tmp_path, pg_url,
                                                                                   monkeypatch):
    """A worker runs its syncs side by side in one process (schedule.run_sync, as its job threads call it):
    two connections of one account, the second starting while the first is under way, never have more
    requests in flight together than the account's declared `concurrency`. Each sync used to start the
    process's limiters afresh, and one started mid-way through another's gave each a cap of its own."""

    from runner.engine import schedule
    from runner.spec import config

    base, _ = served
    _post(base + "/_sandbox/faults/stripe", {"synthetic_invoices": 60})
    proxy = RecordingProxy(base + "/stripe", delay=0.02)

    def one_at_a_time(spec: dict) -> None:
        spec["environments"]["sandbox"]["rate_limit"] = {"requests_per_second": 200, "concurrency": 1}
        spec.pop("document", None)
        spec["invoices"]["request"]["params"]["limit"] = "10"  # many requests

    path = _workspace(tmp_path, pg_url, base, SECOND, spec_change=one_at_a_time,
                      stripe_base=f"http://127.0.0.1:{proxy.port}")
    for name, value in _env().items():
        monkeypatch.setenv(name, value)
    cfg = config.load(path)
    first, second = cfg.connections
    schedule.prepare(pg_url)
    statuses = {}

    def sync(conn) -> None:
        statuses[conn.name] = schedule.run_sync(cfg, pg_url, conn, "test-worker", concurrency=2)

    threads = [threading.Thread(target=sync, args=(conn,)) for conn in (first, second)]
    try:
        threads[0].start()
        deadline = time.monotonic() + 60
        while len(proxy.arrivals) < 5:  # the first sync is under way
            assert time.monotonic() < deadline and threads[0].is_alive(), "the first sync made no requests"
            time.sleep(0.01)
        threads[1].start()
        for t in threads:
            t.join(120)
    finally:
        schedule.close_stores()
        proxy.close()
    assert statuses == {first.name: "ok", second.name: "ok"}
    (s1, e1), (s2, e2) = [(s[2], s[3]) for s in sorted(_syncs(pg_url))]
    assert max(s1, s2) < min(e1, e2), "the two syncs ran at the same time"
    assert proxy.most_in_flight == 1, f"{proxy.most_in_flight} requests of one account in flight at once"


def test_a_budget_is_one_for_every_process_on_the_database(pg_url):
    """The budget itself, as two processes see it (two RateBudget objects, two connections): requests are
    spaced by the interval whoever takes them, a provider's 429 wait holds everyone, and an hourly quota
    counts everyone's requests and is never exceeded."""
    from runner.state import postgres

    postgres.Store(pg_url).close()  # the schema
    a, b = postgres.RateBudget(pg_url), postgres.RateBudget(pg_url)
    waits = [(a if i % 2 else b).take("stripe:acct_1", 0.5)[0] for i in range(6)]
    # Each request is given a moment half a second after the previous one's, whichever process took it.
    assert all(abs(later - earlier - 0.5) < 0.1 for earlier, later in zip(waits, waits[1:])), waits
    assert b.take("stripe:acct_2", 0.5) == pytest.approx((0.0, True), abs=0.05)  # another account: its own
    a.hold("stripe:acct_2", 30)
    wait, taken = b.take("stripe:acct_2", 0.5)
    assert taken and 29 < wait <= 30.1
    quota = ((3, 3600.0),)
    assert [a.take("debitura:k", None, quota)[1], b.take("debitura:k", None, quota)[1],
            a.take("debitura:k", None, quota)[1]] == [True, True, True]
    wait, taken = b.take("debitura:k", None, quota)
    assert not taken and 0 < wait <= 60.1  # the quota's oldest sixtieth must pass first
    for budget in (a, b):
        budget._db.close()
