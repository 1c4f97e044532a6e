"""Classification: one provider record in, one verdict out (map, unpaid rule, date window, schema, due date).

Pure: no I/O, no state. Runs in the engine's process or, for large syncs, in a worker process
(runner/engine/workers.py), so everything a Classifier needs is plain data derived from the config.
"""
from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any, Callable

from runner.spec import functions
from runner.spec import validation
from runner.spec.config import Connection

IMPORTED, SKIPPED, FAILED, ELIGIBLE = "imported", "skipped", "failed", "eligible"
REASONS = {
    "not_unpaid": "not unpaid (paid, partially paid, void or draft)",
    "outside_date_window": "outside the date window",
    "incomplete_address": "incomplete debtor address",
    "invalid": "invalid invoice data",
    "not_yet_due": "not yet due",
    "duplicate": "already imported (duplicate)",
    "excluded": "set aside by the spec's exclude rule (not a receivable)",
}


@dataclass(slots=True)
class Verdict:
    invoice_id: str
    number: str | None
    verdict: str
    reason: str | None = None
    message: str = ""
    detail: dict = field(default_factory=dict)
    invoice: dict | None = None
    payload: bytes | None = None  # the invoice already encoded for a local sink (by the worker), if any
    key: str | None = None  # the idempotency key the payload was encoded with
    link: str | None = None  # an eligible invoice's document link (the spec's `document: url:`), if any

    def as_dict(self, with_invoice: bool = False) -> dict:
        d = {"invoice_id": self.invoice_id, "number": self.number, "verdict": self.verdict, "reason": self.reason,
             "message": self.message}
        if self.detail:
            d["detail"] = self.detail
        if with_invoice and self.invoice is not None:
            d["invoice"] = self.invoice
        return d



SAMPLES = 5  # examples kept of each reason, for summaries and support bundles


@dataclass
class Tally:
    """What a run reports of the verdicts it saw: how many of each outcome ("imported", "skipped:<reason>",
    "failed"), not-unpaid invoices by status, and the first few examples of each reason."""
    seen: int = 0
    counts: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    samples: dict = field(default_factory=dict)  # reason (or verdict) -> [Verdict without the invoice]


def tally(into, verdicts) -> None:
    """Count verdicts into a Tally (or anything with its four fields, such as a connection's result)."""
    counts, statuses, samples = into.counts, into.statuses, into.samples
    for v in verdicts:
        into.seen += 1
        reason = v.reason
        counts[v.verdict if v.verdict != SKIPPED else f"skipped:{reason}"] += 1
        if reason == "not_unpaid":
            statuses[str(v.detail.get("status") or "unknown")] += 1
        kept = samples.setdefault(reason or v.verdict, [])
        if len(kept) < SAMPLES:
            kept.append(Verdict(v.invoice_id, v.number, v.verdict, reason, v.message, v.detail))


def merge(into, other: Tally) -> None:
    """Add a Tally of later verdicts (e.g. a page counted by the worker) to `into`."""
    into.seen += other.seen
    into.counts.update(other.counts)
    into.statuses.update(other.statuses)
    for reason, examples in other.samples.items():
        kept = into.samples.setdefault(reason, [])
        kept.extend(examples[:SAMPLES - len(kept)])


def detail_json(v: Verdict) -> str | None:
    """A verdict's message and detail as stored with it in the state store."""
    if not v.message and not v.detail:
        return None
    import orjson

    return orjson.dumps({"message": v.message, **v.detail}, default=str).decode()


def verdict_rows(connection: str, account_key: str, verdicts) -> list[tuple]:
    """The state store's verdict rows for these verdicts (state.insert_verdicts). An imported invoice has none:
    its ledger row, recorded with the delivery, is its verdict (state.IMPORTED)."""
    return [(connection, account_key, v.invoice_id, v.number, v.verdict, v.reason, detail_json(v))
            for v in verdicts if v.verdict != IMPORTED]


def imported_message(case_id: str | None, case_reference: str | None) -> str:
    return f"imported as case {case_reference or case_id}"


def to_deliver(eligible: list[Verdict], ledger: dict, account_key: str,
               own: tuple[int, str] | None = None) -> list[tuple[Verdict, str]]:
    """The eligible invoices still to deliver, each with its idempotency key: the one an unfinished delivery
    kept in the ledger, else the one derived from the account and id (by the worker already, if it encoded
    the invoice). Those the ledger has as delivered are turned into duplicates here. `own` (run id,
    connection), for a page classified again after its worker died: what the ledger has as delivered by that
    run for that connection is the dead worker's delivery of this very page, an import, not a duplicate."""
    from runner.engine.destinations import Delivery, idempotency_key

    out = []
    for v in eligible:
        row = ledger.get(v.invoice_id)
        if row is not None and row.status == "delivered":
            if own is not None and row.run_id == own[0] and row.connection == own[1]:
                delivered(v, Delivery(case_id=row.case_id, case_reference=row.case_reference))
            else:
                duplicate(v, row)
        else:
            out.append((v, row.idempotency_key if row else v.key or idempotency_key(account_key, v.invoice_id)))
    return out


def delivered(v: Verdict, delivery) -> Verdict:
    """Turn an eligible `v` into the verdict for its delivery (a destinations.Delivery)."""
    v.detail = {"case_id": delivery.case_id, "case_reference": delivery.case_reference}
    if delivery.existing:
        v.verdict, v.reason = SKIPPED, "duplicate"
        v.message = f"the destination already has this case ({delivery.case_reference or delivery.case_id})"
    else:
        v.verdict = IMPORTED
        v.message = imported_message(delivery.case_id, delivery.case_reference)
    return v


@functools.lru_cache(maxsize=1024)
def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(ts))


def duplicate(v: Verdict, row) -> Verdict:
    """Turn `v` into the verdict for an invoice the ledger row says was already delivered."""
    when = _day(int(row.updated))
    v.verdict, v.reason = SKIPPED, "duplicate"
    v.message = f"already imported on {when} as case {row.case_reference or row.case_id}"
    v.detail = {"case_id": row.case_id, "case_reference": row.case_reference, "imported_on": when}
    return v


def classify_page(classifier: "Classifier", records: list, lookup: Callable[[list[str]], dict] | None) -> list[Verdict]:
    """One page's verdicts. With a ledger `lookup` (invoice ids -> ledger rows, one query per page), an invoice
    already delivered gets its verdict from the ledger and is not mapped or checked again."""
    if lookup is not None:
        ids = [classifier.invoice_id(r) for r in records]
        ledger = lookup([i for i in ids if i is not None])
        if any(row.status == "delivered" for row in ledger.values()):
            out = []
            for rec, i in zip(records, ids):
                row = ledger.get(i) if i is not None else None
                if row is not None and row.status == "delivered":
                    out.append(at_source(classifier, rec, duplicate(Verdict(i, row.number, SKIPPED), row)))
                else:
                    out.append(classifier.evaluate(rec))
            return out
    return list(map(classifier.evaluate, records))


def at_source(classifier: "Classifier", rec: Any, v: Verdict) -> Verdict:
    """An invoice whose case exists, seen again: what the source shows now (the spec's `recheck:`), kept in the
    verdict's detail when it is no longer unpaid, so the run's re-check of open cases needs no look-up for it
    (runner/engine/lifecycle.py)."""
    if classifier.spec.recheck is not None:
        from runner.engine.lifecycle import what_source_shows

        # Most invoices seen again are still unpaid as imported: the spec's own unpaid rule (compiled, cheap)
        # says so, and there is nothing at the source to tell. Only the others are read with `recheck:`.
        try:
            if _truthy(classifier._unpaid(classifier.stream.prepare(rec) if classifier._unpaid_needs_let else rec)):
                return v
        except Exception:  # noqa: BLE001 - unreadable: the recheck rules below decide
            pass
        try:
            shows = what_source_shows(classifier.spec, rec)
        except Exception:  # noqa: BLE001 - the re-check looks it up and reports what is wrong
            shows = {"state": "unreadable"}
        if shows:
            v.detail["at_source"] = shows
    return v


def _truthy(v: Any) -> bool:
    return v not in (None, False, "", [], {}, 0)


def _date_of(value: Any, fmt: str, tz) -> tuple[datetime | None, date | None]:
    if value is None or value == "":
        return None, None
    if fmt == "unix":
        return datetime.fromtimestamp(int(float(value)), timezone.utc), None
    text = str(value)
    if fmt == "date" or len(text) == 10:
        return None, date.fromisoformat(text[:10])
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=tz)), None


def _lookup(inv: dict, path: tuple) -> Any:
    node: Any = inv
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _fields(node) -> set[str]:
    """Every field name an expression's AST reads."""
    out: set[str] = set()
    if isinstance(node, dict):
        if node.get("type") == "field":
            out.add(node.get("value"))
        for child in node.get("children") or []:
            out |= _fields(child)
    return out


class Classifier:
    """The rules of one connection's spec and window, applied to records of one source account."""

    def __init__(self, conn: Connection, account_id: str | None, today: date):
        self.conn = conn
        self.spec = conn.spec
        self.stream = conn.spec.invoices
        self.account_id = account_id
        self.today_iso = today.isoformat()
        self._source = {"connection": conn.name, "integration": self.spec.id, "account_id": account_id or conn.name}
        self._id = next((e for path, e in self.stream.mapping.fields if path == ("external_id",)), None)
        lets = {name for name, _ in self.stream.let}
        self._id_needs_let = self._id is not None and bool(lets & _fields(self._id.ast))
        # A unix timestamp is in the window exactly when it lies between the window's own timestamps: the
        # common case is decided without making a datetime (the rest takes the general path below).
        rule = self.stream.date
        self._unix = rule.value.compiled() if rule is not None and rule.format == "unix" else None
        self._span = (conn.window.start.timestamp(), conn.window.end.timestamp())
        # The per-record path calls these for each invoice: bound once, compiled (specs.Expression, Mapping).
        self._map = self.stream.mapping.compiled()
        self._unpaid = self.stream.unpaid.compiled()
        self._unpaid_needs_let = bool(lets & _fields(self.stream.unpaid.ast))
        # To tell a value that is absent from one that is there but unreadable, once an invoice has failed:
        # the let names (not the record's own fields), and which expressions can read a value they cannot use.
        self._lets = frozenset(lets)
        self._let_exprs = dict(self.stream.let)
        self._flags: dict[int, tuple | None] = {}
        self._under: dict[tuple, list] = {}
        self._unpaid_flags = self._may_flag(self.stream.unpaid) is not None
        ex = self.stream.exclude
        self._exclude = ex.when.compiled() if ex is not None else None

    def invoice_id(self, rec: Any) -> str | None:
        """The id `evaluate` gives this record, without mapping the rest: to skip invoices already imported."""
        if self._id is None or not isinstance(rec, dict):
            return None
        try:
            value = self._id.search(self.stream.prepare(rec) if self._id_needs_let else rec)
        except Exception:
            return None
        if type(value) is str:
            value = value.strip()
        if value is None or value == "" or (isinstance(value, (dict, list)) and not value):
            return None
        return str(value)

    def evaluate(self, rec: Any) -> Verdict:
        try:
            return self._evaluate(rec)
        except Exception as exc:  # a mapping function choking on a hostile value: a verdict, not a crash
            rid = rec.get("id") if isinstance(rec, dict) else None
            text = self._failure(rec, exc)
            return Verdict(str(rid or "<unknown>"), None, SKIPPED, "invalid", text, {"errors": [text]})

    def _failure(self, rec: Any, exc: Exception) -> str:
        """Which field's expression failed on which value (an amount given as a list, a date as a number)."""
        if isinstance(rec, dict):
            rules = [(".".join(f), e, True) for f, e in self.stream.mapping.fields]
            rules += [(name, e, False) for name, e in (("unpaid", self.stream.unpaid),
                                                        ("status_text", self.stream.status_text)) if e]
            for name, expr, mapped in rules:
                try:
                    expr.search(rec)
                except Exception as e:  # noqa: BLE001 - the first one that fails is the one to name
                    how = f"the spec maps it with {expr.source}" if mapped else f"the spec's {name} rule reads it"
                    value = getattr(e, "current_value", None)
                    if value is None or not getattr(e, "function_name", None):
                        return f"{name}: could not evaluate {expr.source}: {e}"
                    src = functions.locate(rec, value, self._lets)
                    shown = repr(value)
                    shown = shown if len(shown) <= 80 else shown[:77] + "..."
                    head = (f"{name}: could not read {shown}" + (f" (from {src})" if src else "")) if mapped else \
                        f"{src or name}: could not read {shown}"
                    return (f"{head}: {e.function_name}() takes "
                            f"{' or '.join(getattr(e, 'expected_types', []) or ['?'])}, not a "
                            f"{getattr(e, 'actual_type', '?')} ({how})")
        return f"could not map this record: {exc}"

    def _excluded(self, rec: Any) -> Verdict:
        """A record the spec's `exclude` rule sets aside: its own verdict, with whatever id and number it has."""
        ex = self.stream.exclude
        try:
            inv = self._map(rec)
        except Exception:  # a bill need not map like an invoice
            inv = {}
        ext = inv.get("external_id") or (rec.get("id") if isinstance(rec, dict) else None)
        number = inv.get("number")
        text = ex.message or f"set aside by the spec's exclude rule ({ex.when.source})"
        return Verdict(str(ext) if ext is not None else "<no id>", None if number is None else str(number),
                       SKIPPED, ex.reason, text, {"rule": ex.when.source})

    def _evaluate(self, rec: Any) -> Verdict:
        rec = self.stream.prepare(rec)
        if self._exclude is not None and _truthy(self._exclude(rec)):
            return self._excluded(rec)
        inv = self._map(rec)
        ext = inv.get("external_id")
        number = inv.get("number")
        if isinstance(number, (int, float)):
            number = inv["number"] = str(number)
        if ext is None:
            return Verdict("<no id>", number, SKIPPED, "invalid",
                           "the record has no id (the spec's external_id mapping found nothing)")
        ext = inv["external_id"] = str(ext)
        if not _truthy(self._unpaid(rec)):
            status = self.stream.status_text.search(rec) if self.stream.status_text else None
            why = self._unreadable(self.stream.unpaid, rec) if self._unpaid_flags else None
            if why is not None:  # not "not unpaid": the rule could not read what it needs to decide
                text = why.text() + ", so the spec's unpaid rule cannot tell whether the invoice is unpaid"
                return Verdict(ext, number, SKIPPED, "invalid", text,
                               {"errors": [text], "unreadable": [why.as_dict()], "status": status})
            return Verdict(ext, number, SKIPPED, "not_unpaid",
                           f"status is {status}: only unpaid invoices are imported" if status
                           else "not unpaid: only unpaid invoices are imported", {"status": status})
        ok, shown = self._in_window(rec, inv)
        if ok is None:
            text = self._date_problem(rec, inv, shown)
            return Verdict(ext, number, SKIPPED, "invalid", text, {"errors": [text, *self._other_errors(rec, inv)]})
        if not ok:
            w = self.conn.window
            return Verdict(ext, number, SKIPPED, "outside_date_window",
                           f"dated {shown}, outside the window {w.start_date} → {w.end_date}",
                           {"date": shown, "window": w.as_dict()})
        inv["source"] = self._source.copy()
        debtor = inv.get("debtor")
        if isinstance(debtor, dict) and "type" not in debtor:
            debtor["type"] = self.conn.debtor_type
        if not validation.valid(inv):
            seen: dict = {}
            outcome = validation.explain(inv, lambda path: self.why_absent(rec, inv, path, seen))
            detail = {"errors": outcome.errors}
            if outcome.missing:
                detail["missing"] = outcome.missing
            if outcome.unreadable:
                detail["unreadable"] = outcome.unreadable
            if isinstance(debtor, dict):
                detail["debtor"] = debtor.get("name")
            return Verdict(ext, number, SKIPPED, outcome.reason, outcome.message(), detail, inv)
        if inv["due_date"] > self.today_iso:
            return Verdict(ext, number, SKIPPED, "not_yet_due",
                           f"due on {inv['due_date']}: only overdue invoices can become collection cases; it will be "
                           f"imported by a run after that date", {"due_date": inv["due_date"]}, inv)
        doc = self.spec.document
        if doc is not None and doc.url is not None:  # read now: after delivery the record is gone
            try:
                link = doc.url.search(rec)
            except Exception:  # noqa: BLE001 - the document phase looks the invoice up instead
                link = None
            return Verdict(ext, number, ELIGIBLE, invoice=inv, link=link if isinstance(link, str) else None)
        return Verdict(ext, number, ELIGIBLE, invoice=inv)

    # --- why a value is null (only for an invoice that has already failed) ------------------------------------
    def _may_flag(self, expr) -> tuple | None:
        """The let names `expr` reads, if it (or one of them) can give null for a value that is there but
        unreadable; None if it cannot."""
        key = id(expr)
        if key not in self._flags:
            lets = tuple(sorted(_fields(expr.ast) & self._lets))
            flags = functions.may_be_unreadable(expr.ast) or any(
                functions.may_be_unreadable(self._let_exprs[n].ast) for n in lets)
            self._flags[key] = lets if flags else None
        return self._flags[key]

    def _unreadable(self, expr, rec, seen: dict | None = None) -> "functions.Unreadable | None":
        """The present value `expr` could not read in the (prepared) record, if that is why it gave null: the
        let values it reads first (those that came out blank), then the expression itself, evaluated
        strictly. `seen`: let name -> its finding, shared by the calls for one record."""
        seen = {} if seen is None else seen
        for name in self._may_flag(expr) or ():
            if name not in seen:
                v = rec.get(name)  # a let that has a value did not fail to read one
                seen[name] = (functions.unreadable(self._let_exprs[name].ast, rec, self._lets)
                              if v is None or (type(v) is str and not v.strip()) else None)
            if seen[name] is not None:
                return seen[name]
        return functions.unreadable(expr.ast, rec, self._lets)

    def why_absent(self, rec: Any, inv: dict, path: tuple, seen: dict | None = None) -> "functions.Unreadable | None":
        """For a canonical path the mapped invoice lacks: the value the record had for it that could not be
        read, if that is why (None: it is simply absent). `seen`: shared by the calls for one record."""
        if not isinstance(rec, dict):
            return None
        under = self._under.get(path)
        if under is None:  # the mapping's fields at or under `path` that can read an unreadable value
            n = len(path)
            under = self._under[path] = [(f, e) for f, e in self.stream.mapping.fields
                                         if f[:n] == path and self._may_flag(e) is not None]
        for fpath, expr in under:
            if _lookup(inv, fpath) is not None:
                continue
            why = self._unreadable(expr, rec, seen)
            if why is not None:
                return why
        return None

    def _other_errors(self, rec: Any, inv: dict) -> list[str]:
        """The schema's other complaints about an invoice already skipped for its date, so that whoever fixes
        the record sees every bad field at once (the issue date is told by the date's own message)."""
        inv = dict(inv, source=self._source.copy())
        debtor = inv.get("debtor")
        if isinstance(debtor, dict) and "type" not in debtor:
            inv["debtor"] = dict(debtor, type=self.conn.debtor_type)
        if validation.valid(inv):
            return []
        seen: dict = {}
        errors = validation.explain(inv, lambda path: self.why_absent(rec, inv, path, seen)).errors
        return [e for e in errors if not e.startswith("issue_date")]

    def _date_problem(self, rec: Any, inv: dict, value: Any) -> str:
        """Why the window's date cannot be read: absent, or there and unreadable (with the value)."""
        rule = self.stream.date
        if rule is None:  # the window reads the mapped issue_date
            why = self.why_absent(rec, inv, ("issue_date",))
            if why is not None:
                return why.text("issue_date") + ", so its date cannot be read"
            return "issue_date is missing: the date window needs the invoice's date"
        # Messages start with the field, as the schema's do (a push sender's errors are keyed by it).
        if value is None or value == "":
            why = self._unreadable(rule.value, rec) if self._may_flag(rule.value) is not None else None
            if why is not None:  # there, but not a date the rule can read: show it, never call it missing
                return why.text() + ", so its date cannot be read"
            return f"{rule.value.source} is missing: the date window needs the invoice's date"
        what = "a unix timestamp" if rule.format == "unix" else "a date"
        return f"{rule.value.source}: could not read {value!r:.80} as {what}, so its date cannot be read"

    def record_date(self, rec: Any, inv: dict | None = None) -> tuple[datetime | None, date | None, Any]:
        """The date the window applies to: (moment, None) for timestamps, (None, day) for dates, and the raw
        value; (None, None, value) when it cannot be read."""
        rule = self.stream.date
        if rule is not None:
            value, fmt = rule.value.search(rec), rule.format
        else:
            if inv is None:
                inv = self.stream.mapping.apply(self.stream.prepare(rec))
            value, fmt = inv.get("issue_date"), "date"
        try:
            return (*_date_of(value, fmt, self.conn.window.zone), value)
        except (ValueError, TypeError, OverflowError, OSError):  # OSError: a timestamp beyond the platform's range
            return None, None, value

    def window_position(self, rec: Any) -> str | None:
        """'before' | 'in' | 'after' the connection's window, or None when the date cannot be read."""
        moment, day, _ = self.record_date(self.stream.prepare(rec))
        w = self.conn.window
        if moment is not None:
            return "before" if moment < w.start else "after" if moment > w.end else "in"
        if day is not None:
            return "before" if day < w.start_date else "after" if day > w.end_date else "in"
        return None

    def _in_window(self, rec, inv) -> tuple[bool | None, Any]:
        if self._unix is not None:
            value = self._unix(rec)
            if type(value) is int and self._span[0] <= value <= self._span[1]:
                return True, None
        w = self.conn.window
        moment, day, value = self.record_date(rec, inv)
        if moment is not None:
            if w.contains(moment):  # the common case: the date is only shown when it is outside the window
                return True, None
            return False, moment.astimezone(w.zone).strftime("%Y-%m-%d %H:%M %Z")
        if day is not None:
            return w.contains_date(day), day.isoformat()
        return None, value

