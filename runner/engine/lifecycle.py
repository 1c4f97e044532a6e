"""After the case exists: invoices paid, voided, credited or deleted at the source are found and told.

Every run re-checks the invoices whose case exists and is not settled at the source yet: those the run saw
still unpaid in its window need nothing more; the others are fetched (the spec's `lookup.by_ids` in batches
where the provider can, else `lookup.by_id`, at most `recheck.max_lookups` a run, least recently checked
first). What the source shows is read with the spec's `recheck:` expressions. A change is recorded in the
ledger (source_changes) and told once on the case's chat at the destination (POST /cases/{id}/chats): the event
is marked `telling` before the post and `told` after it; an event found `telling` (a run stopped between the
two) is looked for in the case's chat before it is posted again. Nothing here knows any one integration.

`recheck(source, store, destination, invoices)` is the entry point for callers that already hold changed
source records (a change feed, a webhook): it records and tells what those records show.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from loguru import logger

from runner import state
from runner.errors import DestinationError, RunnerError, UnsafeRequest

KINDS = ("paid", "partially_paid", "void", "credited", "deleted", "uncollectible")
FINAL = frozenset(KINDS) - {"partially_paid"}  # settled at the source: the case is not re-checked again
WORDS = {"paid": "PAID IN FULL", "partially_paid": "PARTLY PAID", "void": "VOIDED (cancelled)",
         "credited": "CREDITED (a credit note cancels it)", "deleted": "DELETED",
         "uncollectible": "MARKED UNCOLLECTIBLE (written off)"}

# Tests only: `RUNNER_TEST_CRASH_AT=<point>` kills the process (SIGKILL) at that point, to prove that what
# was sent before it is not sent twice. Points: after_chat_post, after_file_upload.
CRASH_ENV = "RUNNER_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Change:
    invoice_id: str
    number: str | None
    case_id: str | None
    case_reference: str | None
    kind: str
    detail: dict
    event_key: str
    message: str

    def as_dict(self) -> dict:
        return {"invoice_id": self.invoice_id, "number": self.number, "case_id": self.case_id,
                "case_reference": self.case_reference, "kind": self.kind, "detail": self.detail}


@dataclass
class Report:
    """What the re-check of one connection did (ConnectionResult.after_case)."""
    open_cases: int = 0
    seen_in_window: int = 0  # open cases the run saw still unpaid: no look-up needed
    looked_up: int = 0
    requests: int = 0
    left_for_later: int = 0  # open cases beyond this run's max_lookups
    changes: list[Change] = field(default_factory=list)
    recorded: int = 0  # changes not seen before
    told: int = 0
    would_tell: int = 0
    tell_failed: int = 0
    documents: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"open_cases": self.open_cases, "seen_in_window": self.seen_in_window, "looked_up": self.looked_up,
                "requests": self.requests, "left_for_later": self.left_for_later,
                "changed": len(self.changes), "changes": [c.as_dict() for c in self.changes[:10]],
                "recorded": self.recorded, "told": self.told, "would_tell": self.would_tell, "tell_failed": self.tell_failed,
                "documents": self.documents, "errors": self.errors}


def _amount(v: Any) -> str | None:
    if v is None or v == "":
        return None
    try:
        return f"{Decimal(str(v)):,.2f}"
    except (InvalidOperation, ValueError):
        return str(v)


def _positive(v: Any) -> bool:
    try:
        return v is not None and Decimal(str(v)) > 0
    except (InvalidOperation, ValueError):
        return False


def what_source_shows(spec, record: Any) -> dict | None:
    """The `recheck:` fields of a source record; None while the invoice is unpaid as imported. A record of
    None is an invoice the source no longer has (deleted)."""
    rc = spec.recheck
    if record is None:
        return {"state": "deleted"}
    out = {}
    # `state` first: while it is null (unpaid as imported) the other fields are not read.
    for name, expr in sorted(rc.fields.items(), key=lambda item: item[0] != "state"):
        try:
            v = expr.search(record)
        except Exception:  # noqa: BLE001 - a field the record lacks reads as absent
            v = None
        if isinstance(v, Decimal):
            v = str(v)
        if name == "state" and not v:
            return None
        out[name] = v
    state = out.get("state")
    if not state:
        return None
    if state not in KINDS:
        raise RunnerError(f"the spec's recheck.state gave {state!r} for an invoice; it must be null or one of "
                          f"{', '.join(KINDS)}", fix=f"fix `recheck: state:` in {spec.file}")
    return {k: v for k, v in out.items() if v is not None}


def event_key(account_key: str, invoice_id: str, detail: dict) -> str:
    """The same change of the same invoice is one event, whichever run or feed sees it."""
    parts = [account_key, invoice_id] + [str(detail.get(k)) for k in ("state", "amount_paid", "amount_credited",
                                                                      "amount_due")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]


def message(spec_name: str, number: str | None, invoice_id: str, detail: dict, key: str) -> str:
    """The chat message: what the source system shows, with amounts and dates, and a marker that finds it in
    the case's chat again (see tell)."""
    cur = detail.get("currency") or ""
    state = detail["state"]
    words = [f"Update from {spec_name}: invoice {number or invoice_id} ({spec_name} id {invoice_id}) is now "
             f"{WORDS[state]} in {spec_name}"]
    if detail.get("date"):
        words[0] += f" as of {detail['date']}"
    words[0] += "."
    facts = []
    if _positive(detail.get("amount_paid")):
        facts.append(f"paid there: {_amount(detail['amount_paid'])} {cur}".strip())
    if _positive(detail.get("amount_credited")):
        facts.append(f"credited there: {_amount(detail['amount_credited'])} {cur}".strip())
    if detail.get("amount_due") is not None:
        facts.append(f"still owed there: {_amount(detail['amount_due'])} {cur}".strip())
    if detail.get("status_text"):
        facts.append(f"status in {spec_name}: {detail['status_text']}")
    if facts:
        text = "; ".join(facts)
        words.append(text[0].upper() + text[1:] + ".")
    if state == "partially_paid":
        words.append("Please take the payment into account in the amount you collect.")
    else:
        words.append("Please check with the debtor and stop or adjust collection on this case.")
    words.append(f"(Sent by the invoice sync runner, ref {key})")
    return " ".join(words)


def _record_id(source, rec: Any) -> str | None:
    """A source record's invoice id, by the spec's own mapping of external_id."""
    try:
        return source.classifier().invoice_id(rec)
    except Exception:  # noqa: BLE001 - a record without a readable id is not one of ours
        return None


async def _fetch(source, ids: list[str], report: Report) -> dict[str, Any]:
    """invoice id -> its source record (None: the source no longer has it). Ids a look-up could not settle
    (an error) are left out, and re-checked on a later run."""
    spec = source.spec
    out: dict[str, Any] = {}
    before = source.http.requests
    batch = spec.batch_lookup
    try:
        if batch is not None:
            for i in range(0, len(ids), batch.max_ids):
                chunk = ids[i:i + batch.max_ids]
                ctx = source.context(invoice_ids=chunk)
                resp = await source.send_spec(batch.request, ctx)
                recs = batch.records.search(resp.json(f"{spec.name}'s invoices by id")) or []
                got = {str(batch.id.search(r)): r for r in recs if isinstance(r, dict)}
                missing = [x for x in chunk if x not in got]
                out.update((x, got[x]) for x in chunk if x in got)
                if missing and batch.missing_means_deleted:
                    # Telling a partner an invoice was deleted is not undone: an id a batch answer leaves out is
                    # asked for on its own first (when the spec can), and deleted only if that says so too.
                    if spec.lookup.get("by_id") is not None:
                        out.update(await _one_by_one(source, missing))
                    else:
                        out.update((x, None) for x in missing)
        else:
            if spec.lookup.get("by_id") is None:
                report.errors.append(f"{spec.name}'s spec has `recheck:` but no `lookup.by_id` or `lookup.by_ids`: "
                                     f"open cases cannot be re-checked")
                return out
            out.update(await _one_by_one(source, ids))
    except (RunnerError, UnsafeRequest) as exc:
        report.errors.append(f"re-checking open cases at {spec.name} stopped: {exc.message}")
    finally:
        report.requests += source.http.requests - before
    return out


async def _one_by_one(source, ids: list[str]) -> dict[str, Any]:
    """invoice id -> its record by `lookup.by_id` (None: the source answers that it has no such invoice)."""
    lr = source.spec.lookup["by_id"]
    out: dict[str, Any] = {}
    for x in ids:
        resp = await source.send_spec(lr.request, source.context(invoice_id=x), ok=tuple(lr.not_found))
        if resp.status in lr.not_found:
            out[x] = None
            continue
        rec = lr.record.search(resp.json(f"{source.spec.name}'s invoice answer"))
        out[x] = rec if rec else None
    return out


def _changes(source, rows: dict, shown: dict[str, dict | None]) -> list[Change]:
    """The changes of ledger rows (by invoice id), from what the source shows for each (None: unpaid)."""
    out = []
    for iid, detail in shown.items():
        row = rows.get(iid)
        if row is None or not detail:
            continue
        key = event_key(source.account_key, iid, detail)
        out.append(Change(iid, row.number, row.case_id, row.case_reference, detail["state"], detail, key,
                          message(source.spec.name, row.number, iid, detail, key)))
    return out


def _open_cases(store, account: str, run_id: int | None, lookups: int | None, checked_before: float) -> tuple:
    """What the store says of the account's open cases for a re-check: (how many are open, the invoices the
    run saw unpaid, the changes it saw, the cases to look up (at most `lookups`; None: none is looked up),
    how many were due, the ledger rows of those and of the changed ones)."""
    open_cases = store.count_cases_to_recheck(account)
    unpaid, changed = store.seen_in_run(run_id, account) if run_id is not None else (set(), {})
    changed = {k: v for k, v in changed.items() if v.get("state") in KINDS}  # else: looked up below
    # Nothing to look up (a destination without cases): the cases due are not even listed.
    todo, due = (store.cases_to_recheck(account, lookups, exclude=unpaid | set(changed), checked_before=checked_before)
                 if lookups is not None else ([], 0))
    rows = {r.invoice_id: r for r in todo}
    rows.update({iid: r for iid, r in store.ledger_lookup(account, list(changed)).items()
                 if r.status == "delivered" and r.case_id})
    return open_cases, unpaid, changed, todo, due, rows


async def recheck(source, store, destination, invoices: list | None = None, *, run_id: int | None = None,
                  report: Report | None = None, tell_now: bool = True, look_up: bool = True,
                  deleted: tuple | list = ()) -> Report:
    """Find, record and tell what the source shows for invoices whose case exists.

    `invoices`: source records already fetched (a change feed, a webhook); only those are checked. Without
    them, the open cases of the source's account are re-checked (see the module's doc). `destination` None
    is a plan: nothing is recorded or told, the report says what would be. `look_up` false: only what the
    run saw in its window is checked. `deleted`: ids a change feed reported deleted at the source."""
    report = report or Report()
    spec = source.spec
    if spec.recheck is None or store is None:
        return report
    account = source.account_key
    shown: dict[str, dict | None] = {}
    checked: list[str] = []
    if invoices is not None:
        by_id = {}
        for rec in invoices:
            iid = _record_id(source, rec)
            if iid is not None:
                by_id[iid] = rec
        rows = {iid: r for iid, r in store.ledger_lookup(account, list(by_id)).items()
                if r.status == "delivered" and r.case_id}
        shown = {iid: what_source_shows(spec, by_id[iid]) for iid in rows}
        checked = list(rows)
    else:
        report.open_cases, unpaid, changed, todo, due, rows = await state.off_loop(
            store, _open_cases, store, account, run_id, spec.recheck.max_lookups if look_up else None,
            time.time() - 60 * spec.recheck.interval_minutes)
        report.seen_in_window = len(unpaid) + len(changed)
        report.left_for_later = due - len(todo) if look_up else 0
        records = await _fetch(source, [r.invoice_id for r in todo], report) if todo else {}
        report.looked_up = len(records)
        shown = {iid: what_source_shows(spec, rec) for iid, rec in records.items()}
        checked = list(records)
        shown.update(changed)
    if deleted:  # a change feed's deletions: no record to read, the feed's word is the source's
        gone = {iid: r for iid, r in store.ledger_lookup(account, list(deleted)).items()
                if r.status == "delivered" and r.case_id}
        rows.update(gone)
        shown.update({iid: {"state": "deleted"} for iid in gone})
    changes = _changes(source, rows, shown)
    report.changes.extend(changes)
    if destination is None:  # plan
        report.would_tell += len({c.event_key for c in changes} | {
            e["event_key"] for e in store.untold_source_changes(account)})
        return report
    if checked:  # what a later run may skip for `interval_minutes` (a case seen in a window is not counted)
        store.mark_checked(account, checked)
    for ch in changes:
        if store.record_source_change(account, ch.invoice_id, ch.event_key, ch.case_id, ch.kind, ch.kind in FINAL,
                                   ch.detail, ch.message, run_id):
            report.recorded += 1
            logger.info("{}: invoice {} is {} at the source (case {}); recorded", source.conn.name,
                        ch.number or ch.invoice_id, ch.kind.replace("_", " "), ch.case_reference or ch.case_id)
    if tell_now:
        await tell(store, destination, account, report)
    return report


async def tell(store, destination, account_key: str, report: Report) -> None:
    """Tell the destination, once, each event recorded and not told yet (see the module's doc)."""
    for ev in store.untold_source_changes(account_key):
        iid, key, case_id = ev["invoice_id"], ev["event_key"], ev["case_id"]
        if not hasattr(destination, "post_chat"):  # a local file has no chat: the ledger holds the event
            store.set_source_change(account_key, iid, key, "recorded")
            continue
        marker = f"ref {key})"
        try:
            if ev["status"] != "new":  # a post may have reached the case before the run stopped or failed
                found = next((c for c in await destination.chats(case_id) if marker in (c.get("message") or "")),
                             None)
                if found is not None:
                    store.set_source_change(account_key, iid, key, "told", chat_id=str(found.get("id") or ""))
                    report.told += 1
                    continue
            store.set_source_change(account_key, iid, key, "telling")
            posted = await destination.post_chat(case_id, ev["message"])
            crash_point("after_chat_post")
            store.set_source_change(account_key, iid, key, "told", chat_id=str(posted.get("id") or "") or None)
            report.told += 1
        except DestinationError as exc:
            store.set_source_change(account_key, iid, key, "failed", error=exc.message)
            report.tell_failed += 1
            report.errors.append(f"telling case {case_id} failed: {exc.message}")
            if exc.fatal:
                return


async def after_run(source, store, destination, run_id: int | None, destination_down: bool = False,
                    scan=None) -> dict:
    """The connection's work after its cases: upload documents of new cases, re-check open cases, tell what
    changed. Never fails the connection: what went wrong is in the report and retried on the next run.

    `scan` (engine/incremental.py): when the run read a change feed, the invoices it reported changed are the
    ones re-checked, from the records the feed brought (no look-up one by one); its deletions are told too."""
    from runner.engine import documents

    report = Report()
    if store is None or (source.spec.recheck is None and source.spec.document is None):
        return {}
    before = source.http.requests
    dest = None if destination_down else destination
    plan = destination is None
    # Only a Debitura destination has cases to attach documents to and chats to tell: for a file, the changes
    # the run saw in its window are still recorded, and nothing is fetched for them.
    cases = (store.destination or "").startswith("debitura:")
    try:
        if source.spec.document is not None and cases and (plan or dest is not None):
            report.documents = await documents.upload(source, store, dest)
        if source.spec.recheck is not None and (plan or dest is not None):
            if scan is not None and scan.mode == "changes":  # exactly what changed, as the feed read it
                await recheck(source, store, dest, list(scan.records.values()), run_id=run_id, report=report,
                              deleted=sorted(scan.deleted))
            else:
                await recheck(source, store, dest, run_id=run_id, report=report, look_up=cases)
    except (RunnerError, UnsafeRequest) as exc:
        report.errors.append(exc.message)
    for e in report.errors:
        logger.warning("{}: {}", source.conn.name, e)
    out = report.as_dict()
    out["requests_in_all"] = source.http.requests - before  # re-checks and documents together
    return out
