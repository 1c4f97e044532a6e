"""Pages written to a local sink (a jsonl file) by several writers at once, without losing or repeating one.

A local sink has no pending row per invoice, as a Debitura delivery has: its ledger rows are recorded after
the page is written. Each writer (a classification worker, runner/engine/workers.py) does it all under the
file's lock (JsonlDestination.exclusive): it looks the page's invoices up in the ledger, writes those not
delivered, and records them with the file's new length (sink_marks.recorded). The file being longer than
that length means the writer before died between its write and its record: the next writer records those
lines first (repair), so none is written twice.
"""
from __future__ import annotations

from runner import state
from runner.engine.classify import Verdict, delivered, to_deliver, verdict_rows


def write_page(db, sink, destination: str, name: str, account_key: str, run_id: int, eligible: list[Verdict],
               lines: dict[str, bytes], ended: list[tuple]) -> None:
    """Under the file's lock: look the eligible invoices up again, write those not delivered (`lines`, by
    invoice id), record the page (`ended`: the verdict rows of the rest). Two round trips to a server
    while the other writers wait: the look-up (with the sink's mark) and the record."""
    ids = [v.invoice_id for v in eligible]
    mark, ledger = state.sink_lookup(db, destination, account_key, ids)
    if repair(db, sink, destination, mark):
        ledger = state.lookup(db, destination, account_key, ids)
    to_send = to_deliver(eligible, ledger, account_key)
    if any(v.invoice_id in ledger for v, _ in to_send):  # which of those the file holds already
        sink.prepare({k for v, k in to_send if v.invoice_id in ledger})
    written = []
    if to_send:
        deliveries = sink.write_many([(v.invoice, k, lines[v.invoice_id]) for v, k in to_send])
        sink.flush()
        for (v, k), d in zip(to_send, deliveries):
            delivered(v, d)
            written.append((account_key, v.invoice_id, name, v.number, k, d.case_id, d.case_reference))
    state.record_written(db, destination, run_id, written, sink.length() if written else None,
                         ended + verdict_rows(name, account_key, eligible))


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
