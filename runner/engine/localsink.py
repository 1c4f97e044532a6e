"""Pages written to a local sink (a jsonl file) by several writers at once, without losing or repeating one.

A local sink has no pending row per invoice, as a Debitura delivery has. Each writer takes a turn at the file
(its lock, JsonlDestination.exclusive) and keeps the file's mark (sink_marks) true to it:

- Through an SQLite store (one run at a time: its classification workers): look the page's invoices up, write
  those not delivered, record them with the file's new length (sink_marks.recorded). The file being longer
  than that length means the writer before died between its write and its record: the next writer records
  those lines first (repair), so none is written twice. Outside the workers the engine writes its own pages
  without a turn, under a mark that lasts as long as the run (runner/engine/pipeline.py).
- Through a PostgreSQL store, where several runs may write one file at once (a `runner apply` and the syncs
  of any number of `runner worker`s), every page, the engine's too: record first, then write. One statement
  records the page's ledger rows and moves the mark past it, noting the page as the one being written
  (claim_written); it fails, recording nothing, if any of the invoices is in the ledger already (the unique
  key does the look-up) or if the mark is not at the file's end. Then the page is written. The file found
  shorter than the mark, under the lock, means the writer before died before its page was (wholly) in the
  file: the next writer takes back the ledger rows of the lines that are not there (settle). A turn is one
  round trip to the server; a page with an invoice delivered already takes a second one (look-up, settle).
  The mark stays from run to run: a run ending while another writes must not leave the other uncovered.
"""
from __future__ import annotations

import dataclasses

from runner import state
from runner.engine.classify import Verdict, delivered, to_deliver, verdict_rows
from runner.engine.destinations import idempotency_key


def write_page(connect, records_first: bool, sink, destination: str, name: str, account_key: str, run_id: int,
               eligible: list[Verdict], lines: dict[str, bytes] | None, ended: list[tuple] | None,
               own: tuple[int, str] | None = None) -> None:
    """Take a turn at the file and in it write the eligible invoices not delivered yet (`lines`, by invoice
    id, encoded ahead for the derived key; None: encoded here) and record them; with `ended` (the verdict
    rows of the rest of the page), the page's verdicts too (None: the caller records them). `own`:
    to_deliver's. The eligible verdicts become imported, or duplicates. `connect()`: a context manager
    giving the store's connection, entered once the turn is taken (a pool's is not held waiting for it);
    `records_first`: state.records_first's, for that connection."""
    if records_first:
        # Made before the turn (the other writers wait for it), as if none of the invoices were delivered (a
        # first import; a page seen again rarely gets this far, its duplicates found before classifying):
        # the claim finds out if one was.
        first = _Page.of(sink, name, account_key, [(v, v.key or idempotency_key(account_key, v.invoice_id))
                                                    for v in eligible], [], lines, ended)
        with sink.exclusive(), connect() as db:
            _claim_page(db, sink, destination, name, account_key, run_id, eligible, lines, ended, own, first)
        return
    with sink.exclusive(), connect() as db:
        _write_then_record(db, sink, destination, name, account_key, run_id, eligible, lines, ended, own)


def _write_then_record(db, sink, destination: str, name: str, account_key: str, run_id: int,
                       eligible: list[Verdict], lines: dict[str, bytes] | None, ended: list[tuple] | None,
                       own: tuple[int, str] | None) -> None:
    """SQLite's turn: look the page up, write those not delivered, record them with the file's new length."""
    ids = [v.invoice_id for v in eligible]
    mark, ledger = state.sink_lookup(db, destination, account_key, ids)
    if repair(db, sink, destination, mark):
        ledger = state.lookup(db, destination, account_key, ids)
    to_send = to_deliver(eligible, ledger, account_key, own)
    if any(v.invoice_id in ledger for v, _ in to_send):  # which of those the file holds already
        sink.prepare({k for v, k in to_send if v.invoice_id in ledger})
    written = []
    if to_send:
        deliveries = sink.write_many([(v.invoice, k, lines[v.invoice_id] if lines else None) for v, k in to_send])
        sink.flush()
        for (v, k), d in zip(to_send, deliveries):
            delivered(v, d)
            written.append((account_key, v.invoice_id, name, v.number, k, d.case_id, d.case_reference))
    verdicts = [] if ended is None else ended + verdict_rows(name, account_key, eligible)
    if written or verdicts:
        state.record_written(db, destination, run_id, written, sink.length() if written else None, verdicts)


def repair(db, sink, destination: str, mark: tuple[int, int | None] | None) -> bool:
    """Under the file's lock, before a page is written (`mark`: sink_recorded's, read with the look-up):
    lines past what the ledger is known to hold were written by a writer that died before recording them
    (another worker, killed between its write and its commit). They are recorded first, or this page would
    write the same invoices again; the engine only records them once it learns of the death, which may be
    after this page. True if it recorded any (the page's look-up is then out of date)."""
    if mark is None:
        return False
    recorded, run_id = mark
    length = sink.length()
    if length <= recorded:
        return False
    rows = list(sink.recover(recorded))
    state.record_written(db, destination, run_id, rows, length, [])
    return bool(rows)


@dataclasses.dataclass
class _Page:
    """What a claim records and then writes: the bytes, the ledger rows, the verdict rows, and the verdicts
    as they will read once it is claimed (copies: the page's own change only then)."""
    to_send: list[tuple]  # (verdict, idempotency key)
    trial: list[Verdict]
    written: list[tuple]
    verdicts: list[tuple]
    data: bytes

    @classmethod
    def of(cls, sink, name: str, account_key: str, to_send: list[tuple], done: list[Verdict],
           lines: dict[str, bytes] | None, ended: list[tuple] | None) -> "_Page":
        data, deliveries = sink.encode_page([(v.invoice, k, lines.get(v.invoice_id) if lines else None)
                                             for v, k in to_send])
        trial = [dataclasses.replace(v) for v, _ in to_send]
        for t, d in zip(trial, deliveries):
            delivered(t, d)
        # Those the file holds already (an unfinished delivery's, see prepare) are recorded, not written again
        written = [(account_key, t.invoice_id, name, t.number, k, d.case_id, d.case_reference)
                   for t, (_, k), d in zip(trial, to_send, deliveries)]
        verdicts = [] if ended is None else ended + verdict_rows(name, account_key, done + trial)
        return cls(to_send, trial, written, verdicts, data)


def _claim_page(db, sink, destination: str, name: str, account_key: str, run_id: int, eligible: list[Verdict],
                lines: dict[str, bytes] | None, ended: list[tuple] | None, own: tuple[int, str] | None,
                first: _Page) -> None:
    """PostgreSQL's turn: claim `first` (the page as if none of it were delivered); failing that, settle
    the mark, look the page up, and claim what is left of it."""
    if _claim(db, sink, destination, run_id, first) == "claimed":
        return
    settle(db, sink, destination)
    ledger = state.lookup(db, destination, account_key, [v.invoice_id for v in eligible])
    to_send = to_deliver(eligible, ledger, account_key, own)
    sent = {id(v) for v, _ in to_send}
    done = [v for v in eligible if id(v) not in sent]  # the look-up made them duplicates
    if any(v.invoice_id in ledger for v, _ in to_send):  # a delivery left unfinished: is it in the file?
        sink.prepare({k for v, k in to_send if v.invoice_id in ledger})
    page = _Page.of(sink, name, account_key, to_send, done, lines, ended)
    outcome = _claim(db, sink, destination, run_id, page, upsert=True)
    if outcome != "claimed":  # the look-up and the claim were made in one turn: nothing can come between
        raise RuntimeError(f"the local sink {sink.describe()} changed during this writer's turn ({outcome})")


def _claim(db, sink, destination: str, run_id: int, page: _Page, upsert: bool = False) -> str:
    """Record `page` as written from the file's end, then write it; its verdicts change only once it is."""
    at = sink.length()
    if not page.written:
        outcome = "claimed"
        if page.verdicts:
            state.record_verdicts(db, run_id, page.verdicts)
    else:
        outcome = state.claim_written(db, destination, run_id, page.written, at, at + len(page.data),
                                      page.verdicts, upsert)
    if outcome != "claimed":
        return outcome
    try:
        sink.append(page.data)
        sink.flush()
    except BaseException:
        try:  # the page is not in the file: take its claim back (else the next writer will)
            sink.cut(at)
            settle(db, sink, destination)
        except Exception:  # noqa: BLE001 - the next writer's settle finds the file short and does it
            pass
        raise
    for (v, _), t in zip(page.to_send, page.trial):
        v.verdict, v.reason, v.message, v.detail = t.verdict, t.reason, t.message, t.detail
    return outcome


def settle(db, sink, destination: str) -> None:
    """In a turn at the file, make the mark true to it (PostgreSQL): the file shorter than the mark, and the
    last page claimed not (wholly) in it: that writer died before its write; the ledger rows of its lines
    that are not in the file are taken back. Shorter than where that page began: the file was replaced (or
    cut) since, and what it holds now is all there is. Longer: lines written and not recorded (a writer that
    recorded after writing) are recorded, put down to the mark's run."""
    length = sink.length()
    mark = state.sink_state(db, destination)
    if mark is None:
        state.settle_sink(db, destination, length, None, [], None)
        return
    recorded, run_id, start, account, ids = mark
    if length == recorded:
        return
    undo, imported = None, []
    if length < recorded and start is not None and start <= length and ids:
        there = {row[1] for row in sink.recover(start) if row[0] == account}
        undo = (account, [i for i in ids if i not in there], run_id)
    elif length > recorded:
        imported = list(sink.recover(recorded))
    state.settle_sink(db, destination, length, undo, imported, run_id)


def write_shared(store, sink, name: str, account_key: str, run_id: int, eligible: list[Verdict],
                 own: tuple[int, str] | None = None) -> None:
    """A page of a run on a PostgreSQL store, written and recorded by the engine in its turn at the file (in
    a thread: the lock and the server are waited for off the event loop). The eligible verdicts become
    imported or duplicate; the caller records the page's verdicts."""
    # Encoded before the turn (the other writers wait for it), each with the key derived from its account and
    # id: the one written unless the ledger keeps another (see to_deliver).
    lines = {v.invoice_id: v.payload if v.payload is not None else
             sink.encode(v.invoice, v.key or idempotency_key(account_key, v.invoice_id)) for v in eligible}
    write_page(store.session, True, sink, store.destination, name, account_key, run_id, eligible, lines, None, own)


def repair_shared(store, sink) -> None:
    """At a run's start on a PostgreSQL store (or after a classification worker died): in a turn at the
    file, settle what a writer that died left. The mark stays: other runs may write on."""
    if not sink.path.exists():
        return
    with store.session() as db:
        mark = state.sink_state(db, store.destination)
    if mark is None or mark[0] == sink.length():  # no writer yet, or the file and the mark agree: no turn needed
        return
    with sink.exclusive(), store.session() as db:  # the lock first: no server connection held waiting for it
        settle(db, sink, store.destination)
