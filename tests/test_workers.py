"""Large syncs classify pages in a forked worker process (runner/engine/workers.py) and skip invoices already
imported before mapping them. Both are only speed: the verdicts, the ledger and the delivered cases must be
exactly those of a single-process run, and a dying worker must not cost an invoice.

Runs against the built-in Stripe simulator with small pages (5 invoices), so a sync has many pages.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import orjson
import pytest

from runner.engine import classify
from runner.spec import config
from runner.engine import pagination
from runner.engine import pipeline
from runner.state import sqlite as state
from runner.engine import workers
from runner.net.http import reset_limiters

from conftest import page_size, query, store_of, stripe_workspace, use_backend

_TARGETS: dict = {}  # config path -> its PostgreSQL database, when the test runs on PostgreSQL
_BACKEND = ["sqlite", None]


@pytest.fixture(autouse=True, params=["sqlite", "postgresql"])
def _on_both_stores(request):
    """Every test here runs on both state stores: `state` is the backend's module (tests patch its Store and
    lookup), and each config applied gets a database of its own (see _apply)."""
    global state
    if request.param == "postgresql":
        from runner.state import postgres

        state = postgres
        _BACKEND[:] = ["postgresql", request.getfixturevalue("pg_databases")]
    yield
    from runner.state import sqlite

    state = sqlite
    _BACKEND[:] = ["sqlite", None]
    _TARGETS.clear()


def _sqlite_only(reason: str) -> None:
    if _BACKEND[0] != "sqlite":
        pytest.skip(reason)


def _workspace(tmp: Path) -> Path:
    return stripe_workspace(tmp, edit=page_size(5))


class _Recording(workers.Workers):
    last: "_Recording | None" = None

    def __init__(self, connections, destination=None, store=None, **kwargs):
        super().__init__(connections, destination, store, **kwargs)
        self.submitted = 0
        _Recording.last = self

    def _start(self, store=None):
        self.submitted += 1
        return super()._start(store)


def _apply(cfg_path: Path, monkeypatch, *, workers_setting: str | None):
    if workers_setting is None:
        monkeypatch.delenv("RUNNER_WORKERS", raising=False)
    else:
        monkeypatch.setenv("RUNNER_WORKERS", workers_setting)
    monkeypatch.setattr(pipeline, "Workers", _Recording)
    reset_limiters()
    if _BACKEND[0] == "postgresql":
        use_backend(cfg_path, _TARGETS.setdefault(cfg_path, _BACKEND[1]()))
    cfg = config.load(cfg_path)
    store = store_of(cfg_path)
    try:
        # the whole window every run (not the changes since the last): these tests compare runs page by page
        result = asyncio.run(pipeline.sync(cfg, mode="apply", store=store, full=True))
        verdicts = sorted(query(
            store, "SELECT invoice_id, number, verdict, reason, detail FROM verdicts WHERE run_id=?", (result.run_id,)))
        ledger = sorted(query(store, "SELECT invoice_id, status, idempotency_key FROM ledger"))
    finally:
        store.close()
    out = cfg.destination.path
    lines = sorted(out.read_bytes().splitlines()) if out.exists() else []
    return result, verdicts, ledger, lines


def _comparable(verdicts):
    return [(i, n, v, r, {k: x for k, x in orjson.loads(d).items() if k != "imported_on"} if d else None)
            for i, n, v, r, d in verdicts]


@pytest.mark.skipif(not workers._wanted(), reason="needs fork and a second core")
def test_worker_gives_exactly_the_verdicts_and_cases_of_one_process(tmp_path, monkeypatch):
    one = _apply(_workspace(tmp_path / "one"), monkeypatch, workers_setting="0")
    assert _Recording.last.submitted == 0
    two = _apply(_workspace(tmp_path / "two"), monkeypatch, workers_setting=None)
    assert _Recording.last.submitted > 0, "a many-page sync should have used the worker"
    assert one[0].connections[0].seen > 20 and one[0].totals() == two[0].totals()
    assert _comparable(one[1]) == _comparable(two[1])  # every verdict, with its reason and message
    assert one[2] == two[2] and one[3] == two[3]  # the same ledger and the same cases


@pytest.mark.skipif(not workers._wanted(), reason="needs fork and a second core")
def test_a_dying_worker_costs_no_invoice(tmp_path, monkeypatch):
    reference = _apply(_workspace(tmp_path / "ref"), monkeypatch, workers_setting="0")

    def die(*args, **kwargs):  # runs in the forked worker: as if it were killed mid-page
        os._exit(9)

    monkeypatch.setattr(workers, "_classify_page", die)
    result, verdicts, ledger, lines = _apply(_workspace(tmp_path / "dying"), monkeypatch, workers_setting=None)
    assert _Recording.last.submitted > 0
    assert result.ok and result.totals() == reference[0].totals()
    assert _comparable(verdicts) == _comparable(reference[1]) and lines == reference[3]


def test_second_run_takes_imported_invoices_from_the_ledger_without_mapping_them(tmp_path, monkeypatch):
    cfg = _workspace(tmp_path)
    first = _apply(cfg, monkeypatch, workers_setting="0")
    imported = first[0].totals()["imported"]
    assert imported > 10
    evaluated, lookups = [], []
    real_evaluate, real_lookup = classify.Classifier.evaluate, state.Store.ledger_lookup
    monkeypatch.setattr(classify.Classifier, "evaluate", lambda self, rec: evaluated.append(rec) or real_evaluate(self, rec))
    monkeypatch.setattr(state.Store, "ledger_lookup", lambda self, *a: lookups.append(a) or real_lookup(self, *a))
    result, verdicts, _, lines = _apply(cfg, monkeypatch, workers_setting="0")
    conn = result.connections[0]
    assert conn.imported == 0 and conn.skipped()["duplicate"] == imported and lines == first[3]
    assert len(evaluated) == conn.seen - imported  # only the invoices never imported are mapped again
    pages = -(-conn.seen // 5)
    assert len(lookups) <= 2 * pages  # batched: a query per page, not per invoice
    dup = [d for _, _, v, r, d in verdicts if r == "duplicate"]
    assert len(dup) == imported and all("already imported on" in orjson.loads(d)["message"] for d in dup)


@pytest.mark.skipif(not workers._wanted(), reason="needs fork and a second core")
def test_worker_looks_up_imported_invoices_itself_with_the_same_verdicts(tmp_path, monkeypatch):
    """A second run: the worker reads the ledger through its own connection; every invoice imported by the
    first run is a duplicate, exactly as when one process does everything."""
    runs = {}
    for setting in ("0", None):
        cfg = _workspace(tmp_path / str(setting))
        first = _apply(cfg, monkeypatch, workers_setting=setting)
        runs[setting] = (first, _apply(cfg, monkeypatch, workers_setting=setting))
    assert _Recording.last.submitted > 0
    (first_one, second_one), (first_two, second_two) = runs["0"], runs[None]
    imported = first_one[0].totals()["imported"]
    assert imported > 10 and second_two[0].totals() == second_one[0].totals()
    assert second_two[0].connections[0].skipped()["duplicate"] == imported
    assert _comparable(second_two[1]) == _comparable(second_one[1])
    assert second_two[3] == first_two[3] == first_one[3]  # nothing written twice


def test_every_connection_that_writes_the_store_commits_without_waiting_for_the_disk(tmp_path):
    """The engine's and the worker's connections share one durability setting (WAL, synchronous=NORMAL:
    a commit survives the process being killed, and does not fsync): the worker's verdict commits used to
    wait for the disk on every page."""
    _sqlite_only("SQLite's durability settings")
    store = state.Store(tmp_path / "state.db", "jsonl:x")
    try:
        old = workers._ledger, workers._db
        workers._ledger, workers._db = store.reader_target(), None
        try:
            for db in (store.db, workers._store()):
                assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
                assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        finally:
            workers._db.close()
            workers._ledger, workers._db = old
    finally:
        store.close()


@pytest.mark.skipif(not workers._wanted(), reason="needs fork and a second core")
@pytest.mark.parametrize("setting", ["1", None])
def test_pages_go_to_the_workers_undecoded_and_one_the_engine_cannot_read_is_decoded_in_full(tmp_path, monkeypatch,
                                                                                          setting):
    """The engine reads only the paginator's facts from the bytes of a page it hands over (it never decodes
    those pages); when that reader fails (here: every third page), the engine decodes the page in full and
    the run is the one-process run."""
    reference = _apply(_workspace(tmp_path / "ref"), monkeypatch, workers_setting="0")
    real, calls, decoded = pagination.facts_reader, [0], []

    def sometimes(stream):
        read = real(stream)

        def flaky(content):
            calls[0] += 1
            if calls[0] % 3 == 0:
                raise ValueError("cannot read this one")
            return read(content)

        return flaky

    real_records = pipeline.Source.page_records
    monkeypatch.setattr(pagination, "facts_reader", sometimes)
    monkeypatch.setattr(pipeline.Source, "page_records", lambda self, *a: decoded.append(1) or real_records(self, *a))
    result, verdicts, ledger, lines = _apply(_workspace(tmp_path / str(setting)), monkeypatch, workers_setting=setting)
    assert _Recording.last.submitted > 0 and _Recording.last.enabled
    pages = calls[0]
    assert pages >= 4 and len(decoded) == pages // 3, "only the pages the reader failed on were decoded here"
    assert result.ok and result.totals() == reference[0].totals()
    assert _comparable(verdicts) == _comparable(reference[1]) and ledger == reference[2] and lines == reference[3]


@pytest.mark.skipif(not workers._wanted(), reason="needs fork and a second core")
def test_a_worker_dying_with_pages_queued_behind_it_costs_no_invoice(tmp_path, monkeypatch):
    reference = _apply(_workspace(tmp_path / "ref"), monkeypatch, workers_setting="0")
    real, calls, engine = workers.classify_page, [0], os.getpid()

    def second_page_dies(*args, **kwargs):
        if os.getpid() != engine:  # in the forked worker
            calls[0] += 1
            if calls[0] == 2:
                os._exit(9)
        return real(*args, **kwargs)

    monkeypatch.setattr(workers, "classify_page", second_page_dies)
    result, verdicts, ledger, lines = _apply(_workspace(tmp_path / "dying"), monkeypatch, workers_setting="1")
    assert _Recording.last.submitted > 0 and not _Recording.last.enabled
    assert result.ok and result.totals() == reference[0].totals()
    assert _comparable(verdicts) == _comparable(reference[1]) and lines == reference[3]


@pytest.mark.skipif(not workers._wanted(), reason="needs fork and a second core")
def test_a_broken_page_mid_run_is_reported_as_the_engine_would(tmp_path, monkeypatch):
    """The provider answers page 4 with an HTML error page (status 200): with the worker decoding pages, the
    connection fails with the same words as in one process, and the pages before it are delivered."""
    real = pipeline.Source.send_spec

    async def html_on_page_4(self, req_spec, ctx, extra_params=None, url=None, ok=()):
        resp = await real(self, req_spec, ctx, extra_params, url, ok)
        if (ctx.get("page") or {}).get("number") == 4:
            resp.content = b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>"
        return resp

    monkeypatch.setattr(pipeline.Source, "send_spec", html_on_page_4)
    runs = [_apply(_workspace(tmp_path / str(s)), monkeypatch, workers_setting=s) for s in ("0", None)]
    assert _Recording.last.submitted > 0
    (one, _, ledger_one, lines_one), (two, _, ledger_two, lines_two) = runs
    assert one.connections[0].status == two.connections[0].status == "failed"
    assert "HTML page, not JSON" in one.connections[0].error and one.connections[0].error == two.connections[0].error
    assert ledger_one == ledger_two and lines_one == lines_two and len(lines_one) > 0


@pytest.mark.skipif(not workers._wanted(), reason="needs fork and a second core")
@pytest.mark.parametrize("setting", ["1", "2"])
def test_a_worker_killed_between_writing_a_page_and_recording_it_writes_nothing_twice(tmp_path, monkeypatch, setting):
    """Workers deliver their pages to the jsonl file themselves: through SQLite, write then record; through
    PostgreSQL, record then write (runner/engine/localsink.py). One is killed in between, on its third page;
    the engine waits for the other's pages, makes the ledger and the file agree again (records the lines
    written, or takes back the rows of lines never written), and delivers the rest itself. Every eligible
    invoice is in the file once and in the ledger, and the run reads as a run without workers."""
    reference = _apply(_workspace(tmp_path / "ref"), monkeypatch, workers_setting="0")
    engine, calls = os.getpid(), [0]
    real, real_claim = workers.state.record_written, workers.state.claim_written

    def killed_after_writing(db, destination, run_id, rows, *args):
        if os.getpid() != engine and rows:  # in a worker: its third page is in the file, its rows not committed
            calls[0] += 1
            if calls[0] == 3:
                os._exit(9)
        return real(db, destination, run_id, rows, *args)

    def killed_before_writing(db, destination, run_id, rows, *args):
        claimed = real_claim(db, destination, run_id, rows, *args)
        if os.getpid() != engine and claimed == "claimed":  # its third page is recorded, not in the file
            calls[0] += 1
            if calls[0] == 3:
                os._exit(9)
        return claimed

    monkeypatch.setattr(workers.state, "record_written", killed_after_writing)
    monkeypatch.setattr(workers.state, "claim_written", killed_before_writing)
    result, verdicts, ledger, lines = _apply(_workspace(tmp_path / "k"), monkeypatch, workers_setting=setting)
    assert _Recording.last.submitted > 0 and not _Recording.last.enabled, "the worker died and the engine took over"
    expected = reference[0].totals()["imported"]
    totals = result.totals()
    assert result.ok and totals["seen"] == reference[0].totals()["seen"]
    # The killed page's invoices were written (or, through PostgreSQL, are written after the kill) by this
    # run: imported by it, as without workers.
    assert totals == reference[0].totals()
    keys = [orjson.loads(line)["idempotency_key"] for line in lines]
    assert len(keys) == len(set(keys)) == expected, "every eligible invoice in the file, none twice"
    assert sorted(k for _, status, k in ledger if status == "delivered") == sorted(keys)


def test_a_worker_ends_a_line_another_left_torn_before_it_writes(tmp_path):
    """Workers append pages to one file, each through its own handle, under the file's lock. A worker killed
    mid-write leaves half a line; the next one to take the lock ends it first, so its own first line is
    whole (and the torn one is left for the recovery to skip)."""
    from runner.spec.config import Destination
    from runner.engine.destinations import JsonlDestination

    sink = JsonlDestination(Destination(type="jsonl", path=tmp_path / "out.jsonl"))
    first, second = sink.copy(), sink.copy()
    with first.exclusive():
        first.write_many([({"external_id": "a"}, "k-a", b'{"idempotency_key":"k-a"}')])
    with open(tmp_path / "out.jsonl", "ab") as killed:  # another worker, killed halfway through its line
        killed.write(b'{"idempotency_key":"k-b","inv')
    with second.exclusive():
        second.write_many([({"external_id": "c"}, "k-c", b'{"idempotency_key":"k-c"}')])
    with first.exclusive():  # a handle opened before the torn write checks again under the lock
        first.write_many([({"external_id": "d"}, "k-d", b'{"idempotency_key":"k-d"}')])
    assert (tmp_path / "out.jsonl").read_bytes().splitlines() == [
        b'{"idempotency_key":"k-a"}', b'{"idempotency_key":"k-b","inv', b'{"idempotency_key":"k-c"}',
        b'{"idempotency_key":"k-d"}']


def _same_account_twice(tmp_path: Path) -> Path:
    """Two connections of one account, the second window inside the first: their invoices overlap."""
    cfg = _workspace(tmp_path)
    text = cfg.read_text().replace("    window: {last: 3y}\n", "    window: {last: 3y}\n    account_id: acme\n")
    second = text[text.index("  - name: s"):].replace("name: s", "name: s-recent").replace("last: 3y", "last: 1y")
    cfg.write_text(text + second)
    return cfg


def test_two_connections_of_one_account_write_an_invoice_once_when_the_ledger_commits_late(tmp_path, monkeypatch):
    """The engine writes the file (no workers: macOS, one core, RUNNER_WORKERS=0) and commits each page's
    ledger rows in its ledger thread. Each connection waited only for its own page before: with the commit
    late (a busy disk, stood in for by a sleep in the ledger thread), the other connection's page looked the
    same invoice up before it was recorded and wrote it again (found in review: 31 lines for 16 invoices)."""
    real = state.Store.record_page

    def late(self, *args, **kwargs):
        time.sleep(0.1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(state.Store, "record_page", late)
    result, verdicts, ledger, lines = _apply(_same_account_twice(tmp_path), monkeypatch, workers_setting="0")
    keys = [orjson.loads(line)["idempotency_key"] for line in lines]
    older, recent = result.connections
    assert recent.seen > 10 and older.skipped().get("duplicate", 0) + recent.skipped().get("duplicate", 0) > 0
    assert len(keys) == len(set(keys)) == older.imported + recent.imported == len(ledger)


@pytest.mark.parametrize("setting", ["0", None])
def test_a_new_accounts_first_run_skips_the_lookup_before_classifying_and_still_delivers_each_invoice_once(
        tmp_path, monkeypatch, setting):
    """An account the ledger has no row of is classified without looking its invoices up first (issue 7): all
    that lookup could find is what this run delivers, and delivery looks every invoice up again. Two
    connections of the same account with overlapping windows show it: the overlap is delivered once."""
    def edit(spec: dict) -> None:
        page_size(5)(spec)
        # Both connections must open before either delivers (the account request would stagger them), so the
        # ledger has no row of the account when each starts.
        spec.pop("account")

    cfg = stripe_workspace(tmp_path, edit=edit)
    text = cfg.read_text().replace("    window: {last: 3y}\n", "    window: {last: 3y}\n    account_id: acme\n")
    second = text[text.index("  - name: s"):].replace("name: s", "name: s-recent").replace("last: 3y", "last: 1y")
    cfg.write_text(text + second)
    looked_up = []
    real, real_sink = state.lookup, state.sink_lookup
    monkeypatch.setattr(state, "lookup", lambda db, dest, account, ids: looked_up.append(len(ids)) or real(
        db, dest, account, ids))
    monkeypatch.setattr(state, "sink_lookup", lambda db, dest, account, ids: looked_up.append(
        len(ids)) or real_sink(db, dest, account, ids))
    result, verdicts, ledger, lines = _apply(cfg, monkeypatch, workers_setting=setting)
    older, recent = result.connections
    assert older.account_id == recent.account_id == "acme" and recent.seen > 10
    keys = [orjson.loads(line)["idempotency_key"] for line in lines]
    assert len(keys) == len(set(keys)) == older.imported + recent.imported  # none written twice
    assert len(ledger) == len(keys) and all(s == "delivered" for _, s, _ in ledger)
    # the overlap: each of its invoices imported by one of the connections and a duplicate for the other
    dup = [d for _, _, v, r, d in verdicts if r == "duplicate"]
    assert len(dup) == older.skipped().get("duplicate", 0) + recent.skipped().get("duplicate", 0) > 0
    assert all("already imported on" in orjson.loads(d)["message"] for d in dup)
    if setting == "0" and _BACKEND[0] == "sqlite":  # looked up at delivery only, once per eligible invoice
        assert sum(looked_up) == len(keys) + len(dup)
    elif setting == "0":  # PostgreSQL: a page is recorded before it is written, the ledger's key finding the
        # duplicates; only a page that has one is looked up (to leave it out)
        assert 0 < sum(looked_up) < len(keys) + len(dup)
    # exactly the cases the wider connection alone delivers
    alone = _workspace(tmp_path / "alone")
    alone.write_text(text)
    assert sorted(orjson.loads(line)["idempotency_key"] for line in _apply(alone, monkeypatch,
                                                                           workers_setting=setting)[3]) == sorted(keys)


@pytest.mark.parametrize("setting,limit", [("0", 3), (None, 3), (None, 64)])
def test_the_runs_pages_in_flight_are_bounded_across_all_its_connections(tmp_path, monkeypatch, setting, limit):
    """Hundreds of connections each holding a page or two waiting for the workers was 350 MiB with 500
    connections: the run as a whole has at most PAGES_IN_FLIGHT pages fetched and not yet finished."""
    cfg = _workspace(tmp_path)
    text = cfg.read_text()
    one = text[text.index("  - name: s"):]
    cfg.write_text(text[:text.index("  - name: s")] + "".join(
        one.replace("name: s", f"name: s{i}").replace("    window:", f"    account_id: acct{i}\n    window:")
        for i in range(6)))
    monkeypatch.setattr(pipeline, "PAGES_IN_FLIGHT", limit)
    held, most = [0], [0]
    requests = []
    real_send = pipeline.Source.send_spec

    async def send_spec(self, req_spec, ctx, *a, **k):
        if req_spec is self.stream.request:
            held[0] += 1
            most[0] = max(most[0], held[0])
        try:
            return await real_send(self, req_spec, ctx, *a, **k)
        finally:
            if req_spec is self.stream.request:
                held[0] -= 1
                requests.append(1)

    monkeypatch.setattr(pipeline.Source, "send_spec", send_spec)
    result, verdicts, ledger, lines = _apply(cfg, monkeypatch, workers_setting=setting)
    assert len(result.connections) == 6 and all(c.status == "ok" and c.seen > 20 for c in result.connections)
    assert len({c.imported for c in result.connections}) == 1  # six copies of one account: the same work each
    assert len(lines) == len(ledger) == sum(c.imported for c in result.connections)
    assert len(requests) == 6 * 5  # five pages a connection
    if limit == 3:
        assert most[0] == 3  # never more than three pages at once, all connections together
    else:
        assert most[0] > 3  # what the six would do unbounded (so the bound above is what holds them back)


def test_when_a_dead_workers_lines_cannot_be_recorded_the_mark_stays_and_the_next_run_repairs(tmp_path, monkeypatch):
    """A worker killed between writing its page and recording it, and the engine's repair of that during the
    run failing too (the store locked by another process past its timeout): the run used to clear its mark
    anyway, and the next run wrote those invoices a second time (found in review: 19 lines for 16)."""
    import sqlite3

    _sqlite_only("stands in SQLite's lock timeout for a store that cannot be written")

    cfg = _workspace(tmp_path)
    engine, calls = os.getpid(), [0]
    real_record = workers.state.record_written

    def killed_after_writing(db, destination, run_id, rows, *args):
        if os.getpid() != engine and rows:
            calls[0] += 1
            if calls[0] == 2:
                os._exit(9)
        return real_record(db, destination, run_id, rows, *args)

    real_recover = pipeline._recover_local_sink

    def locked(store, dest, *, clear=True):
        if not clear:
            raise sqlite3.OperationalError("database is locked")
        return real_recover(store, dest, clear=clear)

    monkeypatch.setattr(workers.state, "record_written", killed_after_writing)
    monkeypatch.setattr(pipeline, "_recover_local_sink", locked)
    first = _apply(cfg, monkeypatch, workers_setting="1")[0]
    assert first.connections[0].status == "failed" and "database is locked" in first.connections[0].error
    db = sqlite3.connect(tmp_path / "state.db")
    try:
        assert db.execute("SELECT count(*) FROM sink_marks").fetchone()[0] == 1  # kept for the next run
    finally:
        db.close()
    monkeypatch.undo()
    second, _, ledger, lines = _apply(cfg, monkeypatch, workers_setting="0")
    keys = [orjson.loads(line)["idempotency_key"] for line in lines]
    assert len(keys) == len(set(keys)) == len(ledger) > 10


def test_a_worker_holds_no_socket_of_the_engines_but_its_own(tmp_path, monkeypatch):
    """A forked worker let the engine's sockets (its event loop's, its keep-alive connections to providers)
    stay open in its copy until the run ended: a connection the engine closed stayed open."""
    engine, out = os.getpid(), tmp_path / "sockets"
    real = workers._classify_page

    def spy(*args, **kwargs):
        if os.getpid() != engine and not out.exists():
            links = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    links.append(os.readlink(f"/proc/self/fd/{fd}"))
                except OSError:
                    pass
            out.write_text("\n".join(link for link in links if link.startswith("socket:")))
        return real(*args, **kwargs)

    monkeypatch.setattr(workers, "_classify_page", spy)
    result = _apply(_workspace(tmp_path / "w"), monkeypatch, workers_setting="2")[0]
    assert result.ok and out.exists()
    assert len(out.read_text().splitlines()) == 1  # the socket to the engine it answers on


def test_a_worker_killed_between_writing_and_recording_leaves_nothing_for_the_other_to_write_again(tmp_path,
                                                                                                  monkeypatch):
    """Three connections of one account, same window: their first pages hold the same invoices, and two
    workers get them. The first to write is killed before it records its page. The other worker's page used
    to be looked up in the ledger, find nothing of the dead one's lines (the engine records those only when
    it learns of the death) and write them again (found in review: 20 lines for 16). A worker now records
    what the file holds past the last recorded page before its lookup. Through PostgreSQL a page is recorded
    before it is written: the dead one's rows claim lines the file does not hold, and the other worker
    takes them back before it claims its own page, or those invoices would be in neither's page."""
    cfg = _workspace(tmp_path)
    text = cfg.read_text().replace("    window: {last: 3y}\n", "    window: {last: 3y}\n    account_id: acme\n")
    one = text[text.index("  - name: s"):]
    cfg.write_text(text + one.replace("name: s", "name: s2") + one.replace("name: s", "name: s3"))
    engine, flag = os.getpid(), str(tmp_path / "killed")
    real, real_claim = workers.state.record_written, workers.state.claim_written

    def first(kill: bool) -> bool:
        """The first page written in the run, once: a slow commit (the other worker waits for the file's
        lock with its page meanwhile), then the kill."""
        if not kill:
            return False
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        time.sleep(0.3)
        os._exit(9)

    def first_writer_killed(db, destination, run_id, rows, *args):  # SQLite: written, not recorded
        first(os.getpid() != engine and bool(rows))
        return real(db, destination, run_id, rows, *args)

    def first_claimer_killed(db, destination, run_id, rows, *args):  # PostgreSQL: recorded, not written
        claimed = real_claim(db, destination, run_id, rows, *args)
        first(os.getpid() != engine and claimed == "claimed")
        return claimed

    monkeypatch.setattr(workers.state, "claim_written", first_claimer_killed)
    monkeypatch.setattr(workers.state, "record_written", first_writer_killed)
    result, verdicts, ledger, lines = _apply(cfg, monkeypatch, workers_setting="2")
    keys = [orjson.loads(line)["idempotency_key"] for line in lines]
    assert os.path.exists(flag) and all(c.status == "ok" for c in result.connections)
    assert len(keys) == len(set(keys)) == len(ledger) > 10  # every invoice written once, and recorded


@pytest.mark.parametrize("setting", ["1", "2"])
def test_a_worker_killed_after_recording_a_page_before_answering_leaves_one_verdict_per_invoice(
        tmp_path, monkeypatch, setting):
    """A worker killed (the OOM killer, kill -9) after it committed a page and before its answer reached the
    engine: the engine classifies that page again. Its skipped invoices got a second verdict row in the run,
    and the dead worker's imports were counted as duplicates (found in review: 10 verdict rows for 5). The
    run must read exactly as a run without workers."""
    reference = _apply(_workspace(tmp_path / "ref"), monkeypatch, workers_setting="0")
    engine, calls = os.getpid(), [0]
    real = workers._send

    def killed_before_answering(sock, answer):
        if os.getpid() != engine:
            calls[0] += 1
            if calls[0] == 3:
                os._exit(9)
        return real(sock, answer)

    monkeypatch.setattr(workers, "_send", killed_before_answering)
    result, verdicts, ledger, lines = _apply(_workspace(tmp_path / "k"), monkeypatch, workers_setting=setting)
    assert result.totals() == reference[0].totals()
    assert _comparable(verdicts) == _comparable(reference[1])
    assert len(lines) == len(set(lines)) == len(ledger) == result.totals()["imported"]


def test_a_sink_reopened_after_a_dead_worker_waits_for_the_page_being_written(tmp_path):
    """When a classification process dies, the engine reopens its handle of the local sink (to end a line
    the process may have left torn) while one of its threads may be writing another page in its turn at the
    file. The handle was closed under that thread: its page went to a handle opened outside the file's lock,
    and its turn failed at the end (the connection's sync failed). Reopening now waits for the turn to end."""
    import threading

    from runner.engine.destinations import JsonlDestination
    from runner.spec.config import Destination

    sink = JsonlDestination(Destination(type="jsonl", path=tmp_path / "out.jsonl"))
    in_turn, go_on, failed = threading.Event(), threading.Event(), []

    def write_a_page() -> None:
        try:
            with sink.exclusive():
                in_turn.set()
                go_on.wait(10)
                sink.append(b'{"invoice": 1}\n')
        except Exception as exc:  # noqa: BLE001 - what the writer's page would have failed with
            failed.append(exc)

    writer = threading.Thread(target=write_a_page)
    writer.start()
    assert in_turn.wait(10)
    reopening = threading.Thread(target=sink.reopen)
    reopening.start()
    reopening.join(0.2)  # had it not waited for the turn, it would be done by now
    go_on.set()
    writer.join(10)
    reopening.join(10)
    assert failed == [] and not reopening.is_alive()
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"invoice": 1}\n'
