"""Diagnostics: the seed's troubleshooting page, run by the runner itself (doctor, explain, status, bundle).

Everything here is generic over the spec language: the checks use the engine (`pipeline.Source`: auth,
account identification and pinning, pages, evaluate, lookup), the spec's `check` request and the
environment credential rules, the state store and the destination's own check. No integration is named.

Doctor only reads: it never creates a case and never writes a ledger row.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

from runner.engine import pipeline
from runner.spec.config import Config, Connection
from runner.state.sqlite import RECENT_RUNS
from runner.errors import (AccountMismatch, AuthError, DestinationError, NeedsReconnect, ProviderError, RunnerError,
                           UnsafeRequest)
from runner.redact import redact, redact_obj

OK, WARNING, FAILED, SKIPPED = "ok", "warning", "failed", "skipped"

# The checks, in the order they are printed. (id, title)
CONNECTION_CHECKS = [
    ("credentials", "credentials present and resolvable"),
    ("environment", "credentials fit the connection's environment"),
    ("auth", "credentials accepted (key valid, OAuth connection active)"),
    ("permission", "allowed to read invoices and customers"),
    ("account", "connected account (company / organization)"),
    ("window", "date window covers the unpaid invoices"),
    ("addresses", "debtor addresses complete"),
    ("invoice_data", "invoice data valid"),
    ("status_filter", "paid, partially paid, void and draft invoices"),
    ("duplicates", "invoices imported before (duplicates)"),
    ("last_sync", "last successful sync and last error"),
]
DESTINATION_CHECKS = [
    ("credentials", "destination API key present and resolvable"),
    ("key", "destination API key valid"),
    ("environment", "destination key belongs to the configured environment"),
    ("reachable", "destination reachable"),
]
# After the cases (a Debitura destination whose destination checks pass, with a spec that has `recheck:`).
AFTER_CASE_CHECKS = [
    ("case_chat", "the runner can tell a case's partner about changes at the source"),
    ("source_changes", "changes at the source since import were told to Debitura"),
    ("documents", "each case has its original invoice"),
]
# The other Debitura environment of each configured one: (name, base URL or None for the standard one).
OTHER_DESTINATION_ENV = {"production": ("test", None), "test": ("production", None),
                         "sandbox": ("test", "sandbox://debitura-test")}
MAX_LISTED = 8


@dataclass
class Check:
    scope: str  # a connection name, or "destination"
    id: str
    title: str
    status: str = OK
    message: str = ""
    fix: str | None = None
    detail: dict = field(default_factory=dict)

    def set(self, status: str, message: str, fix: str | None = None, **detail) -> "Check":
        self.status, self.message, self.fix = status, message, fix
        self.detail.update(detail)
        return self

    def as_dict(self) -> dict:
        d = {"scope": self.scope, "check": self.id, "title": self.title, "status": self.status,
             "message": self.message}
        if self.fix:
            d["fix"] = self.fix
        if self.detail:
            d["detail"] = self.detail
        return d


@dataclass
class DoctorReport:
    config: str
    checks: list[Check]
    summaries: dict = field(default_factory=dict)  # connection -> one line ("would import N ...")
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(c.status == FAILED for c in self.checks)

    def get(self, scope: str, check_id: str) -> Check:
        for c in self.checks:
            if c.scope == scope and c.id == check_id:
                return c
        raise KeyError((scope, check_id))

    def counts(self) -> dict:
        return dict(Counter(c.status for c in self.checks))

    def as_dict(self) -> dict:
        return redact_obj({"config": self.config, "ok": self.ok, "counts": self.counts(),
                           "seconds": round(self.seconds, 3), "summaries": self.summaries,
                           "checks": [c.as_dict() for c in self.checks]})


def _when(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _day(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d") if ts else None


def _listing(items: list[str], limit: int = MAX_LISTED) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def _clients(cfg: Config):
    from runner.net import http

    return http.Clients(sandbox_dir=cfg.state_path.parent / "sandbox")


# --- doctor: one connection -------------------------------------------------------------------------------

def _split_problems(conn: Connection):
    """Config problems kept on the connection (lenient load): environment-rule mismatches vs the rest."""
    env = conn.spec.environments.get(conn.environment)
    rule_messages = {r.message for r in env.credentials.values()} if env else set()
    env_problems = [p for p in conn.problems if p.message in rule_messages]
    other = [p for p in conn.problems if p.message not in rule_messages]
    return env_problems, other


def _problem_text(problems) -> tuple[str, str | None]:
    msg = "; ".join(f"{p.message} ({p.location()})" for p in problems)
    fixes = [p.fix for p in problems if p.fix]
    return msg, "; ".join(dict.fromkeys(fixes)) or None


def _reconnect_fix(conn: Connection, exc: RunnerError | None = None) -> str:
    return (exc.fix if exc is not None and exc.fix else None) or f"runner connect {conn.name}"


def _auth_failure(check_auth: Check, check_perm: Check, conn: Connection, exc: AuthError) -> None:
    sname = conn.spec.name
    if isinstance(exc, NeedsReconnect):
        check_auth.set(FAILED, f"the {sname} connection is not active: {exc.message}",
                       f"reconnect it: `{_reconnect_fix(conn, exc)}`", status_code=exc.status)
        check_perm.set(SKIPPED, "not checked: the connection is not active")
    elif exc.status == 403:
        check_auth.set(OK, f"{sname} accepted the credentials")
        advice = conn.spec.auth.advice.get(403)  # the provider's own terms, from the spec
        check_perm.set(FAILED, f"{sname} accepted the credentials but refused to let them read what the sync needs: "
                               f"{_plain(exc, 403)}",
                       f"{advice}; then update the secret {', '.join(conn.credential_refs.values()) or ''} if the "
                       f"credential changed, and run `runner doctor` again" if advice else
                       f"give the credential read access to invoices and customers in {sname} (or create a "
                                  f"new one that has it), update the secret "
                                  f"{', '.join(conn.credential_refs.values()) or ''} and run `runner doctor` again",
                       status_code=403)
    else:
        if conn.spec.auth.type == "oauth2":
            fix = _reconnect_fix(conn, exc)
            # A bare command reads "reconnect it: `runner connect x`"; a sentence (the app's client id/secret,
            # a data centre to set) is shown as it is.
            shown = f"reconnect it: `{fix}`" if fix.strip() == f"runner connect {conn.name}" else fix
            check_auth.set(FAILED, f"{sname} refused the connection's authorization: {_plain(exc, exc.status)}",
                           shown, status_code=exc.status)
        else:
            refs = ", ".join(conn.credential_refs.values())
            advice = conn.spec.auth.advice.get(401)
            check_auth.set(FAILED, f"{_plain(exc, exc.status or 401)}; the key is invalid, revoked or rotated",
                           f"{advice} (this connection reads it from {refs}), then run `runner doctor` again" if advice else
                           f"create a new key in {sname} (read access to invoices and customers), put it "
                                      f"where {refs} points, and run `runner doctor` again", status_code=exc.status)
        check_perm.set(SKIPPED, "not checked: the credentials were refused")


def _transport_failure(exc: RunnerError) -> bool:
    """The provider was not reached or answered with a server error: a network/outage problem."""
    return (isinstance(exc, ProviderError) and not isinstance(exc, (AuthError, UnsafeRequest))
            and (exc.status is None or exc.status >= 500) and "reach" in exc.message)


def _open_failure(checks: dict, sname: str, exc: RunnerError) -> None:
    """Opening the connection failed for another reason than refused credentials."""
    if _transport_failure(exc):
        checks["auth"].set(FAILED, f"could not reach {sname}: {exc.message}", exc.fix)
        why = f"{sname} could not be reached"
    else:  # an unknown company id, a missing secret key, a broken answer: not a network problem
        checks["auth"].set(FAILED, f"the {sname} connection could not be opened: {exc.message}", exc.fix)
        why = "the connection could not be opened"
    _skip(checks, ("permission", "account") + _DATA_CHECKS,
          f"not checked: {why}")


def _plain(exc: RunnerError, status) -> str:
    """The error's own message, with the HTTP status named once."""
    msg = exc.message
    return msg if f"HTTP {status}" in msg or not status else f"{msg} (HTTP {status})"


def _position(source: pipeline.Source, rec: Any) -> str | None:
    """'before' | 'in' | 'after' the connection's window, or None when the date cannot be read."""
    return source.window_position(rec)


def _record_date(source: pipeline.Source, rec: Any) -> date | None:
    moment, day, _ = source.record_date(source.stream.prepare(rec))
    return moment.astimezone(source.conn.window.zone).date() if moment is not None else day


@dataclass
class Scan:
    seen: int = 0
    truncated: bool = False
    eligible: list = field(default_factory=list)  # verdicts
    before: list = field(default_factory=list)  # (verdict, date)
    after: list = field(default_factory=list)
    incomplete: list = field(default_factory=list)
    invalid: list = field(default_factory=list)
    not_yet_due: list = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)  # the spec's exclude reason -> count (not receivables)
    not_unpaid_in: Counter = field(default_factory=Counter)  # status -> count, inside the window
    not_unpaid_examples: dict = field(default_factory=dict)  # status -> invoice numbers
    duplicates: list = field(default_factory=list)  # (verdict, ledger row)
    retry: list = field(default_factory=list)  # (verdict, ledger row) pending / failed


async def _scan(source: pipeline.Source, store, max_records: int) -> Scan:
    """Read every invoice the account has (server filters off) and classify each, as a sync would."""
    scan = Scan()
    async for records in source.pages():
        for rec in records:
            scan.seen += 1
            v = source.evaluate(rec)
            if v.verdict == pipeline.ELIGIBLE:
                scan.eligible.append(v)
            elif v.reason == "not_unpaid":
                if _position(source, rec) in ("in", None):
                    status = (v.detail or {}).get("status") or "not unpaid"
                    scan.not_unpaid_in[status] += 1
                    scan.not_unpaid_examples.setdefault(status, []).append(v.number or v.invoice_id)
            elif v.reason == "outside_date_window":
                pos = _position(source, rec)
                (scan.after if pos == "after" else scan.before).append((v, _record_date(source, rec)))
            elif v.reason == "incomplete_address":
                scan.incomplete.append(v)
            elif v.reason == "not_yet_due":
                scan.not_yet_due.append(v)
            elif source.stream.exclude is not None and v.reason == source.stream.exclude.reason:
                scan.excluded[v.reason] += 1  # set aside by the spec: nothing to fix
            else:
                scan.invalid.append(v)
        if scan.seen >= max_records:
            scan.truncated = True
            break
    if store is not None and scan.eligible:
        rows = store.ledger_lookup(source.account_key, [v.invoice_id for v in scan.eligible])
        for v in scan.eligible:
            row = rows.get(v.invoice_id)
            if row is not None and row.status == "delivered":
                scan.duplicates.append((v, row))
            elif row is not None:
                scan.retry.append((v, row))
    return scan


def _window_line(conn: Connection, earliest: date | None, latest_needed: bool) -> str:
    w = conn.window
    parts = []
    if earliest is not None:
        parts.append(f"from: \"{earliest.isoformat()}\"")
    else:
        parts.append(f"from: \"{w.start_date.isoformat()}\"")
    if not latest_needed and "to" in w.source and "to now" not in w.source:
        parts.append(f"to: \"{w.end_date.isoformat()}\"")
    if w.tz not in ("UTC",):
        parts.append(f"timezone: {w.tz}")
    return "window: {" + ", ".join(parts) + "}"


def _data_checks(checks: dict, conn: Connection, source: pipeline.Source, scan: Scan, cfg: Config) -> str:
    sname = conn.spec.name
    w = conn.window
    where = ""
    if cfg is not None:
        p = cfg.doc.problem(("connections", conn.index, "window"), "")
        where = f" ({p.location()})"
    # window
    if scan.before or scan.after:
        n_b, n_a = len(scan.before), len(scan.after)
        dates_b = [d for _, d in scan.before if d is not None]
        earliest = min(dates_b) if dates_b else None
        bits = []
        if n_b:
            bits.append(f"{n_b} before it (the oldest dated {earliest})" if earliest else f"{n_b} before it")
        if n_a:
            bits.append(f"{n_a} after it")
        examples = [f"{v.number or v.invoice_id} ({d})" for v, d in (scan.before + scan.after)]
        line = _window_line(conn, earliest, bool(n_a))
        fix = (f"if you want them imported, change the connection's window{where} to:\n    {line}\n"
               f"then run `runner plan {cfg.file if cfg else 'CONFIG'}` to see what would be imported")
        checks["window"].set(WARNING, f"{n_b + n_a} unpaid invoice(s) lie outside the date window {w.start_date} → "
                                      f"{w.end_date} ({w.source}): {', '.join(bits)}; they are not imported: "
                                      f"{_listing(examples)}", fix,
                             before=n_b, after=n_a, config_line=line)
    else:
        checks["window"].set(OK, f"no unpaid invoice lies outside the window {w.start_date} → {w.end_date} "
                                 f"({w.source})", before=0, after=0)
    # addresses
    if scan.incomplete:
        by_debtor: dict[tuple, list] = {}
        for v in scan.incomplete:
            d = v.detail or {}
            unread = tuple((u.get("field"), str(u.get("value"))) for u in d.get("unreadable") or ())
            by_debtor.setdefault((d.get("debtor") or "(no name)", tuple(d.get("missing", [])), unread), []).append(
                v.number or v.invoice_id)
        names = [f"'{debtor}' has {_missing_words(list(missing), [{'field': f, 'value': x} for f, x in unread])} "
                 f"({', '.join(map(str, nums[:3]))}"
                 + (f" and {len(nums) - 3} more" if len(nums) > 3 else "") + ")"
                 for (debtor, missing, unread), nums in sorted(by_debtor.items(), key=lambda x: -len(x[1]))]
        checks["addresses"].set(
            FAILED, f"{len(scan.incomplete)} unpaid invoice(s) in the window are skipped because the debtor's address "
                    f"is incomplete ({len(by_debtor)} customer(s)): {_listing(names)}",
            f"complete each customer's billing address (street, city, postal code, country) in {sname}, then run "
            f"`runner apply {cfg.file if cfg else 'CONFIG'}`",
            invoices=[{"invoice": v.number or v.invoice_id, "debtor": (v.detail or {}).get("debtor"),
                       "missing": (v.detail or {}).get("missing", [])} for v in scan.incomplete])
    else:
        checks["addresses"].set(OK, "every unpaid invoice in the window has a complete debtor address")
    # other invalid data
    if scan.invalid:
        items = [f"{v.number or v.invoice_id}: {v.message}" for v in scan.invalid]
        checks["invoice_data"].set(FAILED, f"{len(scan.invalid)} unpaid invoice(s) in the window have data the "
                                           f"runner cannot send: {_listing(items, 4)}",
                                   f"correct these invoices in {sname} (or the spec's mapping), then run "
                                   f"`runner explain INVOICE` on one to see every stage")
    else:
        checks["invoice_data"].set(OK, "every unpaid invoice in the window maps to a valid invoice")
    # status filter
    if scan.not_unpaid_in:
        total = sum(scan.not_unpaid_in.values())
        parts = [f"{n} {s} (e.g. {', '.join(map(str, scan.not_unpaid_examples[s][:3]))})"
                 for s, n in scan.not_unpaid_in.most_common()]
        checks["status_filter"].set(
            WARNING, f"{total} invoice(s) in the window are not imported because they are not unpaid: "
                     f"{'; '.join(parts)}. Only invoices with nothing paid become cases (partially paid ones too "
                     f"are left out)",
            f"nothing to fix if they are settled. If one should be collected, check its status in {sname}; "
            f"`runner explain INVOICE` shows what the runner sees",
            statuses=dict(scan.not_unpaid_in))
    else:
        checks["status_filter"].set(OK, "no paid, partially paid, void or draft invoice in the window")
    # duplicates
    if scan.duplicates:
        ex = [f"{v.number or v.invoice_id} → case {row.case_reference or row.case_id} ({_day(row.updated)})"
              for v, row in scan.duplicates]
        checks["duplicates"].set(WARNING, f"{len(scan.duplicates)} unpaid invoice(s) in the window were imported "
                                          f"before and are never sent twice: {_listing(ex, 5)}",
                                 "nothing to fix: each invoice becomes one case; `runner explain INVOICE` shows when "
                                 "and as which case", count=len(scan.duplicates))
    else:
        checks["duplicates"].set(OK, "none of the unpaid invoices in the window was imported before")
    new = len(scan.eligible) - len(scan.duplicates)
    summary = (f"{scan.seen} invoice(s) read{' (stopped early: --max-records)' if scan.truncated else ''}; "
               f"{new} unpaid invoice(s) in the window are ready to import")
    if scan.retry:
        summary += f" ({len(scan.retry)} of them are retries of an unfinished delivery)"
    if scan.not_yet_due:
        summary += f"; {len(scan.not_yet_due)} not yet due"
    for reason, n in scan.excluded.items():
        summary += f"; {n} set aside as {reason}"
    return summary


async def _connection_checks(conn: Connection, cfg: Config, clients, store, max_records: int,
                             report: DoctorReport) -> None:
    checks = {cid: Check(conn.name, cid, title) for cid, title in CONNECTION_CHECKS}
    report.checks.extend(checks.values())
    sname = conn.spec.name
    _last_sync(checks["last_sync"], conn, store)
    env_problems, other_problems = _split_problems(conn)
    rest = [c for c in checks.values() if c.id not in ("credentials", "environment", "last_sync")]
    if other_problems:
        msg, fix = _problem_text(other_problems)
        checks["credentials"].set(FAILED, msg, fix)
        checks["environment"].set(SKIPPED, "not checked: a credential is missing")
        for c in rest:
            c.set(SKIPPED, "not checked: a credential is missing")
        return
    names = ", ".join(f"{k} (from {v})" for k, v in conn.credential_refs.items())
    checks["credentials"].set(OK, f"resolved: {names}" if names else
                              ("none needed here; the authorization is held by the runner's state store"
                               if conn.spec.auth.type == "oauth2" else "none needed"))
    if env_problems:
        msg, fix = _problem_text(env_problems)
        checks["environment"].set(FAILED, f"{msg}; the connection's environment is '{conn.environment}'",
                                  fix or f"use a {conn.environment} credential, or set `environment:` to match it")
    else:
        rules = conn.spec.environments[conn.environment].credentials
        checks["environment"].set(OK, f"the credentials fit the '{conn.environment}' environment" if rules else
                                  f"environment '{conn.environment}' (no credential pattern to compare)")
    source = pipeline.Source(conn, clients, store)
    # auth, account
    try:
        await source.open()
    except AccountMismatch as exc:
        checks["auth"].set(OK, f"{sname} accepted the credentials")
        checks["permission"].set(OK, "the account could be read")
        checks["account"].set(FAILED, exc.message, exc.fix, accounts=source.accounts)
        _skip(checks, _DATA_CHECKS, "not checked: the connected account is not the one the config names")
        return
    except AuthError as exc:
        _auth_failure(checks["auth"], checks["permission"], conn, exc)
        _skip(checks, ("account",) + _DATA_CHECKS, "not checked: the credentials were not accepted")
        return
    except (RunnerError, UnsafeRequest) as exc:
        _open_failure(checks, sname, exc)
        return
    # the spec's cheap probe (needs the same permission as the sync)
    try:
        refreshed = ""
        if conn.spec.auth.type == "oauth2" and hasattr(source.auth, "unauthorized"):
            # Prove the refresh works now, not at 3 a.m.: renew the access token once (the rotated refresh
            # token is committed to the state store before it is used, as in every run).
            if await source.auth.unauthorized():
                refreshed = ", token refresh works"
        if conn.spec.check is not None:
            await source.send_spec(conn.spec.check, source.context())
        checks["auth"].set(OK, f"{sname} accepted the credentials" + (
            f" (OAuth connection active{refreshed})" if conn.spec.auth.type == "oauth2" else ""))
        checks["permission"].set(OK, "allowed to read invoices" if conn.spec.check is not None else
                                 "no permission probe in the spec; the invoice scan below reads with it")
    except AuthError as exc:
        _auth_failure(checks["auth"], checks["permission"], conn, exc)
        if checks["auth"].status == FAILED:
            _skip(checks, ("account",) + _DATA_CHECKS, "not checked: the credentials were not accepted")
            return
    except (RunnerError, UnsafeRequest) as exc:
        _open_failure(checks, sname, exc)
        return
    _account_check(checks["account"], conn, source, store)
    if checks["permission"].status == FAILED or checks["environment"].status == FAILED:
        why = ("the credentials may not read invoices" if checks["permission"].status == FAILED
               else "the credentials belong to another environment")
        _skip(checks, _DATA_CHECKS, f"not checked: {why}")
        return
    # the invoices: read everything (server filters off) so what lies outside the window can be counted
    scan_source = pipeline.Source(dataclasses.replace(conn, server_filters=False), clients, store)
    scan_source.auth, scan_source.accounts = source.auth, source.accounts
    scan_source.account_id, scan_source.account_name = source.account_id, source.account_name
    scan_source.options.update(source.options)
    # What the authorization learned (e.g. a company id from the token response) lives in the context.
    scan_source._ctx_base["connection"] = source._ctx_base["connection"]
    try:
        scan = await _scan(scan_source, store, max_records)
    except AuthError as exc:
        _auth_failure(checks["auth"], checks["permission"], conn, exc)
        _skip(checks, _DATA_CHECKS,
              "not checked: reading the invoices was refused")
        return
    except (RunnerError, UnsafeRequest) as exc:
        for cid in _DATA_CHECKS:
            checks[cid].set(FAILED, f"reading the invoices failed: {exc.message}", exc.fix)
        return
    except Exception as exc:  # noqa: BLE001 - a broken spec template, a bug: a failed check, not a traceback
        for cid in _DATA_CHECKS:
            checks[cid].set(FAILED, f"reading the invoices failed: {type(exc).__name__}: {exc}",
                            f"run `runner plan {cfg.file if cfg else 'CONFIG'} -v` to see where")
        return
    report.summaries[conn.name] = _data_checks(checks, conn, scan_source, scan, cfg)


# The checks that read invoices: skipped together when the connection cannot be read.
_DATA_CHECKS = ("window", "addresses", "invoice_data", "status_filter", "duplicates")


def _skip(checks: dict, ids, why: str) -> None:
    for cid in ids:
        if checks[cid].status == OK and not checks[cid].message:
            checks[cid].set(SKIPPED, why)


def _account_check(check: Check, conn: Connection, source: pipeline.Source, store) -> None:
    acc = conn.spec.account
    if not any(acc.get(k) is not None for k in ("request", "id", "name", "choose")):
        # The engine then keeps the account's invoices under the connection's name: that is not an account.
        check.set(OK, f"{conn.spec.name} does not report which account the credentials belong to (the "
                      f"integration spec has no `account:` section); its invoices are kept under the connection "
                      f"'{conn.name}'", account_id=None, account_name=None)
        return
    shown = source.account_name or source.account_id
    if source.account_name is None and source.account_id == (conn.account_id or conn.name):
        shown = None  # nothing came back from the provider: the id is the connection's (or the config's) name
    pinned = []
    if conn.expect:
        pinned.append("expect: " + ", ".join(f"{k}={v}" for k, v in conn.expect.items()))
    opt = (conn.spec.account.get("choose") or {}).get("option")
    if opt and conn.options.get(opt):
        pinned.append(f"options.{opt}={conn.options[opt]}")
    text = (f"connected to {conn.spec.name} account {shown!r}" if shown is not None else
            f"connected; {conn.spec.name} did not report which account (no account id or name in its answer)")
    if source.account_name and source.account_id and source.account_id != source.account_name:
        text += f" (id {source.account_id})"
    if len(source.accounts) > 1:
        text += f"; the authorization can see {len(source.accounts)} accounts: " + "; ".join(
            f"{a['id']} ({a['name']})" for a in source.accounts)
    text += f"; matches the config ({'; '.join(pinned)})" if pinned else ""
    saved = store.connection(conn.name) if store is not None else {}
    before = saved.get("account_id")
    if before and source.account_id and before != source.account_id and saved.get("last_success"):
        check.set(WARNING, text + f"; the last successful sync ({_when(saved.get('last_success'))}) was from account "
                                  f"{saved.get('account_name') or before!r}",
                  "if this is the wrong account, pin the right one in the config (`expect:` or the account option) and "
                  f"reconnect with `runner connect {conn.name}`", account_id=source.account_id,
                  account_name=source.account_name)
        return
    check.set(OK, text, account_id=source.account_id, account_name=source.account_name)


def _last_sync(check: Check, conn: Connection, store) -> None:
    if store is None:
        check.set(SKIPPED, "no state store")
        return
    row = store.connection(conn.name)
    last_ok, last_err, err_at = row.get("last_success"), row.get("last_error"), row.get("last_error_at")
    info = {"last_success": _when(last_ok), "last_error": last_err, "last_error_at": _when(err_at)}
    if row.get("status") == "needs_reconnect":  # the auth check above says so too, with the fix
        check.set(WARNING, f"the connection needs to be reconnected: {last_err or 'its authorization was revoked'}",
                  f"runner connect {conn.name}", **info)
    elif err_at and (not last_ok or err_at > last_ok):
        check.set(WARNING, f"the last sync failed at {_when(err_at)}: {last_err}" +
                  (f"; the last successful one was {_when(last_ok)}" if last_ok else "; it has never synced successfully"),
                  "the checks above show whether the cause is still there", **info)
    elif last_ok:
        check.set(OK, f"last successful sync {_when(last_ok)}" + (f"; last error {_when(err_at)}: {last_err}"
                                                                   if last_err else ""), **info)
    else:
        check.set(OK, f"has not synced yet; run `runner apply` to import", **info)


# --- doctor: destination ----------------------------------------------------------------------------------

async def _destination_checks(cfg: Config, clients, report: DoctorReport) -> None:
    from runner.engine import destinations

    d = cfg.destination
    checks = {cid: Check("destination", cid, title) for cid, title in DESTINATION_CHECKS}
    report.checks.extend(checks.values())
    if d.type != "debitura":
        for cid in ("credentials", "key", "environment"):
            checks[cid].set(OK, "not needed for a file destination")
        folder = d.path.parent if d.path else None
        import os

        if folder is not None and (folder.is_dir() and os.access(folder, os.W_OK) or not folder.exists()):
            checks["reachable"].set(OK, f"writes to {d.path}")
        else:
            checks["reachable"].set(FAILED, f"cannot write to {d.path}", "choose a writable path")
        return
    if d.problems:
        msg, fix = _problem_text(d.problems)
        checks["credentials"].set(FAILED, msg, fix)
        for cid in ("key", "environment", "reachable"):
            checks[cid].set(SKIPPED, "not checked: the API key is missing")
        return
    checks["credentials"].set(OK, "the API key resolved")
    dest = destinations.make(d, clients)
    try:
        profile = await dest.check()
    except DestinationError as exc:
        if exc.status in (401, 403):
            other = await _other_environment(d, clients) if exc.status == 401 else None
            says_env = "environment" in (exc.message or "").lower()
            if other or says_env:
                where = other or "another environment"
                checks["key"].set(OK, f"the key is valid, in Debitura's {where} environment")
                checks["environment"].set(
                    FAILED, f"the destination is set to environment '{d.environment}', but the API key belongs to "
                            f"{'the ' + other if other else 'another'} environment: {exc.message}",
                    f"use a key generated for {d.environment} (production keys come from app.debitura.com, test keys "
                    f"from testapp.debitura.com), or set `destination.environment: {other or '...'}` in the config")
            else:
                checks["key"].set(FAILED, exc.message, exc.fix, status_code=exc.status)
                checks["environment"].set(SKIPPED, "not checked: the key is not accepted anywhere")
            checks["reachable"].set(OK, f"{dest.describe()} answered")
        else:
            checks["key"].set(SKIPPED, "not checked: Debitura could not be reached")
            checks["environment"].set(SKIPPED, "not checked: Debitura could not be reached")
            checks["reachable"].set(FAILED, exc.message, exc.fix or "check the network and Debitura's status page")
        return
    finally:
        await dest.close() if hasattr(dest, "close") else None
    who = (profile or {}).get("companyName") if isinstance(profile, dict) else None
    checks["key"].set(OK, "Debitura accepted the API key" + (f" (creditor {who})" if who else ""))
    if d.base_url and d.base_url.rstrip("/") != destinations.DEBITURA_URLS.get(d.environment):
        # A custom address answers for whichever environment it serves: acceptance there says nothing about
        # which one the key belongs to, and there is no standard twin to ask.
        checks["environment"].set(SKIPPED, f"not checked: `destination.base_url` is set to {d.base_url}, so the key's "
                                           f"environment cannot be compared with Debitura's '{d.environment}' "
                                           f"environment (the key works at that address)")
    else:
        checks["environment"].set(OK, f"the key belongs to the '{d.environment}' environment")
    checks["reachable"].set(OK, f"{dest.describe()} answered")


async def _after_case_checks(cfg: Config, clients, store, conns: list, report: DoctorReport) -> None:
    """Whether the collection partners can be told what changed at the source, and whether they were."""
    from runner.engine import destinations

    d = cfg.destination
    if d.type != "debitura" or d.problems or not any(c.spec.recheck is not None for c in conns):
        return
    if any(c.status == FAILED for c in report.checks):  # the destination's own checks say what is wrong
        return
    chat, told, doc = (Check("destination", cid, title) for cid, title in AFTER_CASE_CHECKS)
    report.checks.extend((chat, told, doc))
    dest = destinations.make(d, clients)
    try:
        author = await dest.chat_author()
        who = author.get("userEmail") or author.get("userId")
        if d.chat_user_email or d.chat_user_id:
            team = await dest.team_members()
            if not any(who in (str(u.get("email") or "").lower(), str(u.get("id") or "").lower()) or
                       str(who).lower() in (str(u.get("email") or "").lower(), str(u.get("id") or "").lower())
                       for u in team):
                listed = ", ".join(str(u.get("email") or u.get("id")) for u in team[:10]) or "nobody"
                chat.set(FAILED, f"`chat_user_{'email' if d.chat_user_email else 'id'}: {who}` is not a member of "
                                 f"your Debitura team (GET /users lists {listed}); messages on cases would be refused",
                         "set `chat_user_email:` under destination to one of those")
        if chat.status != FAILED:
            chat.set(OK, f"messages on a case's chat are sent as {who}" + (
                "" if d.chat_user_email or d.chat_user_id else " (the first team member GET /users lists; set "
                                                               "`chat_user_email:` under destination to choose)"))
    except DestinationError as exc:
        chat.set(FAILED, exc.message, exc.fix or "set `chat_user_email:` under destination to a member of your "
                                                  "Debitura team")
    if store is None:
        told.set(SKIPPED, "not checked: no state store")
        doc.set(SKIPPED, "not checked: no state store")
        return
    totals = after_case_totals(store)
    untold = [e for e in store.source_changes() if e["status"] in ("new", "telling", "failed")]
    n = sum(sum(by.values()) for by in totals["source_changes"].values())
    if untold:
        e = untold[0]
        told.set(FAILED, f"{len(untold)} of {n} change(s) found at the source are not told to the case's partner yet "
                         f"(e.g. invoice {e['invoice_id']}, {e['kind'].replace('_', ' ')}"
                         + (f": {e['error']}" if e.get("error") else "") + ")",
                 f"the next `runner apply {cfg.file}` tells them; `runner explain {e['invoice_id']}` shows the story")
    else:
        told.set(OK, f"{n} change(s) found at the source since import, all told" if n else
                 "no invoice with a case has changed at the source yet")
    docs = totals["documents"]
    if not docs.get("failed") and not docs.get("refused"):
        doc.set(OK, f"{docs.get('uploaded', 0)} invoice document(s) uploaded to their cases" + (
            f"; {docs['none']} invoice(s) have no document at the source" if docs.get("none") else ""))
    else:
        doc.set(FAILED, f"{docs.get('failed', 0)} document upload(s) failing, {docs.get('refused', 0)} refused "
                        f"(too large or a type Debitura does not take); {docs.get('uploaded', 0)} uploaded",
                f"`runner explain INVOICE` shows the error for one; failing uploads are retried by the next apply")


async def _other_environment(d, clients) -> str | None:
    """The other environment the key works in, if any (read-only GET /me there)."""
    from runner.engine import destinations

    if d.base_url:
        return None  # a custom URL: no standard twin to ask
    other = OTHER_DESTINATION_ENV.get(d.environment)
    if other is None:
        return None
    name, url = other
    probe = destinations.make(dataclasses.replace(d, environment=name, base_url=url), clients)
    try:
        await probe.check()
        return name
    except RunnerError:
        return None
    finally:
        await probe.close() if hasattr(probe, "close") else None


async def _inbound_checks(conn: Connection, cfg: Config, store, report: DoctorReport) -> None:
    """An inbound connection (`runner serve`): its keys, refused calls and last call, as the server recorded them."""
    from runner.inbound import server as inbound

    for c in inbound.doctor_checks(cfg, store, [conn]):
        report.checks.append(Check(conn.name, c["check"], c["title"]).set(c["status"], c["message"], c["fix"]))


async def doctor(cfg: Config, store, connections: list[Connection] | None = None,
                 max_records: int = 5000) -> DoctorReport:
    """Run every check for the chosen connections and the destination. Reads only; creates nothing."""
    import asyncio

    started = time.monotonic()
    report = DoctorReport(config=str(cfg.file), checks=[])
    clients = _clients(cfg)
    try:
        conns = connections or [c for c in cfg.connections if c.enabled]
        parts = [DoctorReport(config=str(cfg.file), checks=[]) for _ in conns]
        dest_part = DoctorReport(config=str(cfg.file), checks=[])
        await asyncio.gather(*((_connection_checks(c, cfg, clients, store, max_records, p) if c.spec.pull
                                else _inbound_checks(c, cfg, store, p)) for c, p in zip(conns, parts)),
                             _destination_checks(cfg, clients, dest_part))
        await webhook_checks(cfg, clients, store, dest_part)
        await _after_case_checks(cfg, clients, store, conns, dest_part)
        for p in parts + [dest_part]:
            report.checks.extend(p.checks)
            report.summaries.update(p.summaries)
    finally:
        await clients.aclose()
    report.seconds = time.monotonic() - started
    return report


# --- explain ----------------------------------------------------------------------------------------------

@dataclass
class Explanation:
    key: str
    connection: str
    integration: str
    found: bool = False
    invoice_id: str | None = None
    number: str | None = None
    verdict: str | None = None  # imported | skipped | eligible | failed | None (not found / error)
    reason: str | None = None
    summary: str = ""
    fix: str | None = None
    stages: list = field(default_factory=list)  # {"stage", "result": ok|skipped|failed|not reached, "text"}
    ledger: list = field(default_factory=list)
    history: list = field(default_factory=list)
    error: str | None = None
    after_case: list = field(default_factory=list)  # what happened after the case: source changes, document

    def as_dict(self) -> dict:
        return redact_obj(dataclasses.asdict(self))


def _stage(stages: list, name: str, result: str, text: str) -> None:
    stages.append({"stage": name, "result": result, "text": text})


def _missing_words(missing: list[str], unreadable: list | tuple = ()) -> str:
    """"no postal code", "no address"; an address field whose value is there but unreadable (a verdict's
    detail["unreadable"]) is named with its value instead: "a country that cannot be read ('Narnia')"."""
    bad = {}
    for u in unreadable or ():
        f = str(u.get("field") or "")
        if f.startswith("debtor.address"):
            name = f[len("debtor.address."):] or "address"
            bad[name] = u.get("value")
    words = []
    if "address" in bad:
        words.append(f"an address that cannot be read ({bad['address']!r})")
        missing = []
    absent = [m for m in missing if m not in bad]
    if set(absent) >= {"street", "city", "postal_code", "country"}:
        words.append("no address")
    else:
        plain = [{"postal_code": "postal code"}.get(m, m) for m in absent]
        if plain:
            words.append("no " + (" and no ".join(plain) if len(plain) <= 2 else ", no ".join(plain)))
    words += [f"a {n.replace('_', ' ')} that cannot be read ({v!r})" for n, v in bad.items() if n != "address"]
    return " and ".join(words) if words else "an incomplete address"


async def _explain_one(conn: Connection, key: str, cfg: Config, clients, store) -> Explanation:
    sname = conn.spec.name
    ex = Explanation(key=key, connection=conn.name, integration=conn.integration)
    source = pipeline.Source(conn, clients, store)
    try:
        if conn.problems:
            raise RunnerError("; ".join(p.message for p in conn.problems),
                              fix="; ".join(dict.fromkeys(p.fix for p in conn.problems if p.fix)) or None)
        await source.open()
        others: list = []
        rec = await _lookup(source, key, others)
    except NeedsReconnect as exc:
        ex.error = f"could not look up {key} in {sname}: the connection is not active: {exc.message}"
        ex.fix = f"reconnect it: `{_reconnect_fix(conn, exc)}`, then run `runner explain {key}` again"
        _stage(ex.stages, "fetch", FAILED, ex.error)
        return ex
    except AuthError as exc:
        if exc.status == 403:
            ex.error = (f"could not look up {key} in {sname}: the credentials may not read invoices: "
                        f"{_plain(exc, 403)}")
            ex.fix = exc.fix or f"give the credential read access to invoices and customers in {sname}"
        else:
            ex.error = (f"could not look up {key} in {sname}: the credentials were refused: {_plain(exc, exc.status)}; "
                        f"the key is invalid, revoked or rotated")
            ex.fix = exc.fix or (f"reconnect: `runner connect {conn.name}`" if conn.spec.auth.type == "oauth2" else
                                 f"create a new key in {sname} and update the secret it is read from")
        _stage(ex.stages, "fetch", FAILED, ex.error)
        return ex
    except AccountMismatch as exc:
        ex.error = f"could not look up {key}: {exc.message}"
        ex.fix = exc.fix
        _stage(ex.stages, "fetch", FAILED, ex.error)
        return ex
    except (RunnerError, UnsafeRequest) as exc:
        ex.error = f"could not look up {key} in {sname}: {exc.message}"
        ex.fix = exc.fix
        _stage(ex.stages, "fetch", FAILED, ex.error)
        return ex
    acct = _reported_account(conn, source)
    where = f"{sname} (account {acct})" if acct else sname
    if rec is None and others:
        how = {"by_id": "by id", "by_number": "by number"}
        got = "; ".join(f"{how[k]}: id {i or '?'}, number {n or '?'}" for k, i, n in others)
        text = f"{where}'s lookup for {key} answered with another invoice ({got}), not the one asked for"
        _stage(ex.stages, "fetch", FAILED, text)
        ex.summary = text
        ex.fix = (f"check the lookup requests of the {conn.spec.id} integration spec (lookup.by_id / lookup.by_number): "
                  f"the provider ignored the filter or the `record` expression picks the wrong entry")
        return ex
    if rec is None:
        how = {"by_id": "by id", "by_number": "by number"}
        _stage(ex.stages, "fetch", FAILED, f"{where} has no invoice with id or number {key}")
        ex.summary = f"{key} was not found in {where} " + " or ".join(how[k] for k in _lookup_kinds(source.spec, key))
        ex.fix = ("check the number as shown in the accounting system, and that this connection is the right "
                  "account" + (f" (it is connected to {acct!r})" if acct else ""))
        return ex
    ex.found = True
    _stage(ex.stages, "fetch", OK, f"found in {where}")
    v = source.evaluate(rec)
    ex.invoice_id, ex.number = v.invoice_id, v.number
    label = v.number or v.invoice_id
    # Every stage on its own, so a person sees all that is wrong at once; the verdict is the engine's.
    prepared = source.stream.prepare(rec)
    try:
        inv = source.stream.mapping.apply(prepared)
    except Exception as exc:  # noqa: BLE001 - a hostile value: shown as the mapping stage's failure
        inv = None
        _stage(ex.stages, "mapping", FAILED, f"could not map the record: {exc}")
    unpaid = pipeline._truthy(source.stream.unpaid.search(prepared))
    status_text = source.stream.status_text.search(prepared) if source.stream.status_text else None
    vd = v.detail or {}
    if not unpaid and v.reason == "invalid" and "status" in vd and vd.get("unreadable"):
        _stage(ex.stages, "status filter", FAILED, v.message)  # the unpaid rule could not read a value
    else:
        _stage(ex.stages, "status filter", OK if unpaid else SKIPPED,
               f"unpaid ({status_text})" if unpaid and status_text else "unpaid" if unpaid else
               f"status is {status_text or 'not unpaid'}: only unpaid invoices are imported")
    pos = _position(source, rec)
    w = conn.window
    day = _record_date(source, rec)
    _stage(ex.stages, "date window", OK if pos == "in" else SKIPPED if pos else FAILED,
           f"dated {day}, inside the window {w.start_date} → {w.end_date} ({w.source})" if pos == "in" else
           f"dated {day}, {pos} the window {w.start_date} → {w.end_date} ({w.source})" if pos else
           "its date cannot be read")
    if inv is not None:
        inv.setdefault("source", {"connection": conn.name, "integration": conn.spec.id, "account_id": source.account_id})
        debtor = inv.get("debtor")
        if isinstance(debtor, dict) and "type" not in debtor:
            debtor["type"] = conn.debtor_type
        from runner.spec import validation

        classifier = source.classifier()
        outcome = validation.check(inv, lambda path: classifier.why_absent(prepared, inv, path))
        _stage(ex.stages, "validation", OK if outcome.ok else SKIPPED,
               "debtor address complete and invoice data valid" if outcome.ok else outcome.message())
        due = inv.get("due_date")
        if isinstance(due, str):
            overdue = due <= source.today.isoformat()
            _stage(ex.stages, "due date", OK if overdue else SKIPPED,
                   f"due {due}, overdue" if overdue else f"due {due}: not yet due")
    # dedupe + ledger
    rows = store.ledger_lookup(source.account_key, [v.invoice_id]) if store is not None else {}
    row = rows.get(v.invoice_id)
    if store is not None:
        ex.ledger = [{"status": r.status, "case_id": r.case_id, "case_reference": r.case_reference,
                      "first_seen": _when(r.first_seen), "updated": _when(r.updated), "error": r.error}
                     for r in store.ledger_find(conn.name, v.invoice_id)] or (
            [{"status": row.status, "case_id": row.case_id, "case_reference": row.case_reference,
              "first_seen": _when(row.first_seen), "updated": _when(row.updated), "error": row.error}] if row else [])
        ex.history = [{"run_id": h["run_id"], "at": _when(h["at"]), "verdict": h["verdict"], "reason": h["reason"],
                       "message": (h.get("detail") or {}).get("message")}
                      for h in store.verdict_history(source.account_key, v.invoice_id)]
    if row is not None and row.status == "delivered":
        _stage(ex.stages, "dedupe", OK, f"imported on {_day(row.updated)} as case {row.case_reference or row.case_id}")
    elif row is not None:
        _stage(ex.stages, "dedupe", OK, f"a delivery was started ({row.status})" +
               (f": {row.error}" if row.error else ""))
    else:
        _stage(ex.stages, "dedupe", OK, "not imported before")
    ex.verdict, ex.reason = v.verdict, v.reason
    d = v.detail or {}
    apply_cmd = f"runner apply {cfg.file}"
    if row is not None and row.status == "delivered":
        ex.verdict = pipeline.IMPORTED
        ex.summary = f"{label} was imported on {_day(row.updated)} as case {row.case_reference or row.case_id}"
        if v.verdict != pipeline.ELIGIBLE and not store.source_changes(source.account_key, v.invoice_id):
            ex.summary += f" (today it would be skipped: {v.message})"
        _after_case(ex, source, store, v.invoice_id, rec)
    elif v.reason == "not_unpaid":
        ex.summary = (f"{label} was not imported because its status in {sname} is "
                      f"{d.get('status') or 'not unpaid'}: only unpaid invoices (nothing paid yet) become cases")
        ex.fix = (f"nothing to do if it is settled; if it really is unpaid, correct its status in {sname} and run "
                  f"`{apply_cmd}`")
    elif v.reason == "outside_date_window":
        line = _window_line(conn, day if pos == "before" else None, pos == "after")
        ex.summary = (f"{label} was not imported because it is dated {day}, outside the date window "
                      f"{w.start_date} → {w.end_date} ({w.source}) of '{conn.name}'")
        ex.fix = f"widen the connection's window, e.g. `{line}`, and run `{apply_cmd}`"
    elif v.reason == "incomplete_address":
        who = d.get("debtor") or "(no name)"
        ex.summary = (f"{label} was not imported because the customer '{who}' has "
                      f"{_missing_words(d.get('missing') or [], d.get('unreadable') or [])}")
        ex.fix = f"add it in {sname} (street, city, postal code and country) and run `{apply_cmd}`"
    elif v.reason == "invalid":
        ex.summary = f"{label} was not imported because its data is invalid: {v.message}"
        ex.fix = f"correct the invoice in {sname} and run `{apply_cmd}`"
    elif v.reason == "not_yet_due":
        ex.summary = f"{label} has not been imported because it is not due yet ({d.get('due_date')})"
        ex.fix = "nothing to do: the first `runner apply` after its due date imports it"
    elif v.verdict == pipeline.ELIGIBLE:
        problem = await _destination_problem(cfg, clients)
        last = ex.history[0] if ex.history else None
        if problem is not None:
            _stage(ex.stages, "destination", FAILED, problem.message)
            ex.verdict = pipeline.FAILED
            ex.summary = f"{label} is eligible but has not been imported because {problem.message}"
            ex.fix = problem.fix
        elif row is not None and row.status == "failed":
            ex.verdict = pipeline.FAILED
            ex.summary = f"{label} is eligible; its last delivery failed: {row.error}"
            ex.fix = f"the next `{apply_cmd}` retries it"
        elif last and last["verdict"] == pipeline.FAILED:
            ex.verdict = pipeline.FAILED
            ex.summary = f"{label} is eligible; the last run failed to deliver it: {last['message']}"
            ex.fix = f"the next `{apply_cmd}` retries it"
        else:
            _stage(ex.stages, "destination", OK, "the destination accepts the API key")
            ex.summary = f"{label} has not been imported yet; it is eligible and the next `{apply_cmd}` imports it"
    else:
        ex.summary = f"{label}: {v.verdict} ({v.reason}): {v.message}"
    return ex


def _after_case(ex: Explanation, source: pipeline.Source, store, invoice_id: str, rec: Any) -> None:
    """The story after the case: its document, what the source showed since, and whether the case was told."""
    from runner.engine.lifecycle import WORDS, _amount, what_source_shows

    sname = source.spec.name
    doc = store.case_document(source.account_key, invoice_id)
    if doc is not None:
        text = {"uploaded": f"the original invoice ({doc['file_name']}) was uploaded to the case on "
                            f"{_day(doc['updated'])}",
                "uploading": "an upload of the original invoice was started; the next apply checks the case's "
                             "files and finishes it",
                "failed": f"uploading the original invoice failed ({doc['attempts']} attempt(s)): {doc['error']}; "
                          f"the next apply tries again",
                "refused": f"the original invoice was not uploaded: {doc['error']}",
                "none": f"{sname} has no document for this invoice"}.get(doc["status"], doc["status"])
        _stage(ex.stages, "document", OK if doc["status"] in ("uploaded", "none") else FAILED
               if doc["status"] in ("failed", "refused") else SKIPPED, text)
        ex.after_case.append({"what": "document", **doc, "updated": _when(doc["updated"])})
    story = []
    events = store.source_changes(source.account_key, invoice_id)
    for e in events:
        d = e["detail"]
        cur = d.get("currency") or ""
        amounts = ", ".join(x for x in (
            f"paid {_amount(d['amount_paid'])} {cur}" if d.get("amount_paid") not in (None, "0.00", "0") else "",
            f"credited {_amount(d['amount_credited'])} {cur}" if d.get("amount_credited") not in (None, "0.00", "0")
            else "",
            f"still owed {_amount(d['amount_due'])} {cur}" if d.get("amount_due") is not None else "") if x)
        seen = (f"{WORDS[e['kind']].split(' (')[0].lower()} at {sname}" + (f" as of {d['date']}" if d.get("date") else "")
                + (f" ({amounts})" if amounts else "") + f"; found by the runner on {_day(e['seen_at'])}")
        _stage(ex.stages, "at the source", SKIPPED, seen)
        told = {"told": f"Debitura was told on the case's chat on {_day(e['told_at'])}",
                "telling": "telling Debitura was started and not confirmed; the next apply checks the case's chat "
                           "first, so the message is never posted twice",
                "failed": f"telling Debitura failed: {e['error']}; the next apply tries again",
                "new": "Debitura is told on the case's chat by the next apply",
                "recorded": "recorded (the destination has no chat to tell)"}.get(e["status"], e["status"])
        _stage(ex.stages, "told", OK if e["status"] in ("told", "recorded") else FAILED if e["status"] == "failed"
               else SKIPPED, told)
        story.append(f"{seen}; {told}")
        ex.after_case.append({"what": e["kind"], "detail": d, "status": e["status"], "seen": _when(e["seen_at"]),
                              "told": _when(e["told_at"]), "chat_id": e["chat_id"], "message": e["message"]})
    if source.spec.recheck is not None and rec is not None:
        try:
            now = what_source_shows(source.spec, rec)
        except RunnerError:
            now = None
        if now and not any(e["event_key"] for e in events if e["detail"].get("state") == now["state"]):
            _stage(ex.stages, "at the source", SKIPPED, f"{sname} shows it {WORDS[now['state']].lower()} now; the "
                                                        f"next apply records it and tells Debitura on the case")
            story.append(f"{sname} shows it {WORDS[now['state']].lower()} now; the next apply tells Debitura")
    if story:
        ex.summary += "; then " + "; then ".join(story)


def _reported_account(conn: Connection, source: pipeline.Source) -> str | None:
    """The account the provider says the connection reads (its name, else its id); None when it says none
    (the engine then keys the ledger by the connection's name, which is no account)."""
    if not any(conn.spec.account.get(k) is not None for k in ("request", "id", "name", "choose")):
        return None
    if source.account_name is None and source.account_id == (conn.account_id or conn.name):
        return None
    return source.account_name or source.account_id


def _lookup_kinds(spec, key: str) -> list[str]:
    """Which of the spec's lookups can find `key`. With `lookup.by_id.id_prefixes`, a key starting with one of
    them is an id (looked up by id only) and any other key a number (by number only): no request is spent on a
    lookup that cannot match. Without it: by id, then by number."""
    kinds = [k for k in ("by_id", "by_number") if k in spec.lookup]
    prefixes = ((spec.raw.get("lookup") or {}).get("by_id") or {}).get("id_prefixes")
    if prefixes and "by_id" in kinds:
        is_id = key.startswith(tuple(prefixes))
        kinds = [k for k in kinds if (k == "by_id") == is_id]
    return kinds


def _identity(source: pipeline.Source, rec: Any) -> tuple[str | None, str | None]:
    """The id and number the spec's mapping reads from a record (None where it reads nothing)."""
    out = []
    for field in ("external_id", "number"):
        expr = next((e for path, e in source.stream.mapping.fields if path == (field,)), None)
        try:
            v = expr.search(source.stream.prepare(dict(rec))) if expr is not None and isinstance(rec, dict) else None
        except Exception:  # noqa: BLE001 - a value the mapping cannot read names nothing
            v = None
        out.append(None if v is None or str(v).strip() == "" else str(v).strip())
    return out[0], out[1]


def _is_asked(source: pipeline.Source, rec: Any, key: str) -> bool:
    """Whether a looked-up record is the invoice asked for: its id or its number is the key. A lookup that
    ignores its filter (a search parameter the API does not know) answers with some other invoice."""
    ident, number = _identity(source, rec)
    if ident is None and number is None:
        return True  # the mapping names neither: nothing to compare (the verdict will say the id is missing)
    k = key.strip()
    return ident == k or (number is not None and number.casefold() == k.casefold())


async def _lookup(source: pipeline.Source, key: str, others: list | None = None) -> Any | None:
    """Fetch one invoice with the spec's lookup requests (see _lookup_kinds). None if not found. A record that
    is another invoice (neither its id nor its number is `key`) is not taken: it is added to `others` as
    (kind, id, number)."""
    for kind in _lookup_kinds(source.spec, key):
        lr = source.spec.lookup[kind]
        var = "invoice_id" if kind == "by_id" else "number"
        resp = await source.send_spec(lr.request, source.context(**{var: key}), ok=tuple(lr.not_found))
        if resp.status in lr.not_found:
            continue
        rec = lr.record.search(resp.json(f"{source.spec.name}'s invoice answer"))
        if rec:
            if not _is_asked(source, rec, key):
                if others is not None:
                    others.append((kind, *_identity(source, rec)))
                continue
            if source.stream.details:
                await source.enrich([rec])
            return rec
    return None


def _recorded(ex: Explanation, conn: Connection, key: str, store) -> None:
    """What the runs recorded for an invoice the provider could not show now (not found, or not asked): the
    verdict history, and the latest verdict in the summary (an incomplete address found by the last apply)."""
    if store is None:
        return
    import json as _json

    rows = store.connection_verdicts(conn.name, key)
    if not rows:
        return
    ex.history = [{"run_id": r[0], "at": _when(r[7]), "verdict": r[4], "reason": r[5],
                   "message": (_json.loads(r[6]) if r[6] else {}).get("message")} for r in rows]
    run_id, _, invoice_id, number, verdict, reason, _, at = rows[0]
    ex.invoice_id, ex.number = ex.invoice_id or invoice_id, ex.number or number
    last = ex.history[0]
    text = (f"the last apply that saw it (run {run_id}, {_when(at)}) recorded it as {verdict}"
            + (f" ({REASON_WORDS.get(reason, reason)})" if reason else "")
            + (f": {last['message']}" if last.get("message") else ""))
    _stage(ex.stages, "last verdict", OK if verdict == pipeline.IMPORTED else SKIPPED, text)
    ex.summary = (ex.summary + "; " if ex.summary else "") + text


async def _destination_problem(cfg: Config, clients) -> Check | None:
    part = DoctorReport(config=str(cfg.file), checks=[])
    await _destination_checks(cfg, clients, part)
    for c in part.checks:
        if c.status == FAILED:
            return c
    return None


def _explain_inbound(conn: Connection, key: str, cfg: Config, store) -> Explanation:
    """An inbound connection (invoices are pushed to `runner serve`): nothing to fetch; what arrived, and its
    verdicts, are in the state store; when nothing arrived, the refused calls say why."""
    sname = conn.spec.name
    ex = Explanation(key=key, connection=conn.name, integration=conn.integration)
    rows = [] if store is None else store.connection_verdicts(conn.name, key)
    if not rows:
        _stage(ex.stages, "received", FAILED, f"no call from {sname} carried an invoice with id or number {key}")
        ex.summary = f"{key} has not arrived from {sname}: no accepted call carried it"
        ex.fix = (f"check the sender's history for that invoice; a polling sender only sends at its next poll. "
                  f"`runner doctor {cfg.file} --connection {conn.name}` shows refused calls and keys")
        try:
            from runner.inbound import server as inbound

            failed = [c for c in inbound.doctor_checks(cfg, store, [conn]) if c["status"] == FAILED]
        except Exception:  # noqa: BLE001 - the explanation stands without them
            failed = []
        if failed:
            ex.summary += "; " + "; ".join(c["message"] for c in failed)
            ex.fix = failed[0].get("fix") or ex.fix
        return ex
    import json as _json

    ex.found = True
    run_id, account_key, invoice_id, number, verdict, reason, detail, at = rows[0]
    d = _json.loads(detail) if detail else {}
    ex.invoice_id, ex.number, ex.verdict, ex.reason = invoice_id, number, verdict, reason
    label = number or invoice_id
    _stage(ex.stages, "received", OK, f"received from {sname} {_when(at)} (run {run_id})")
    ex.history = [{"run_id": r[0], "at": _when(r[7]), "verdict": r[4], "reason": r[5],
                   "message": (_json.loads(r[6]) if r[6] else {}).get("message")} for r in rows]
    led = store.ledger_lookup(account_key, [invoice_id]).get(invoice_id)
    if led is not None:
        ex.ledger = [{"status": led.status, "case_id": led.case_id, "case_reference": led.case_reference,
                      "first_seen": _when(led.first_seen), "updated": _when(led.updated), "error": led.error}]
    if led is not None and led.status == "delivered":
        ex.verdict = pipeline.IMPORTED
        ex.summary = f"{label} was imported on {_day(led.updated)} as case {led.case_reference or led.case_id}"
    elif reason == "incomplete_address":
        ex.summary = (f"{label} was not imported because the customer '{d.get('debtor') or '(no name)'}' has "
                      f"{_missing_words(d.get('missing') or [], d.get('unreadable') or [])}")
        ex.fix = f"add it where the invoice comes from and let {sname} send the invoice again"
    elif verdict == pipeline.FAILED:
        ex.summary = f"{label} arrived but its delivery failed: {d.get('message')}"
        ex.fix = f"it is retried when {sname} sends it again"
    else:
        ex.summary = f"{label} was {verdict}" + (f" ({REASON_WORDS.get(reason, reason)})" if reason else "") + (
            f": {d.get('message')}" if d.get("message") else "")
    return ex


REASON_WORDS = pipeline.REASONS


async def explain(cfg: Config, store, key: str, connections: list[Connection] | None = None) -> list[Explanation]:
    """Explain one invoice: the first connection that has it, else what every connection said; with Debitura's
    side of its case when the runner has heard of it."""
    out = await _explain_connections(cfg, store, key, connections)
    if store is not None:
        for ex in out:
            _debitura_side(ex, store)
    return out


async def _explain_connections(cfg: Config, store, key: str,
                               connections: list[Connection] | None = None) -> list[Explanation]:
    clients = _clients(cfg)
    out: list[Explanation] = []
    try:
        for conn in connections or [c for c in cfg.connections if c.enabled]:
            if not getattr(conn.spec, "pull", True):
                ex = _explain_inbound(conn, key, cfg, store)
                if ex.found:
                    return [ex]
                out.append(ex)
                continue
            ex = await _explain_one(conn, key, cfg, clients, store)
            if ex.found:
                return [ex]
            _recorded(ex, conn, key, store)
            if not ex.error and store is not None:  # not at the provider: perhaps the ledger knows it
                rows = store.ledger_find(conn.name, key)
                if rows:
                    r = rows[0]
                    ex.ledger = [{"status": r.status, "case_id": r.case_id, "case_reference": r.case_reference,
                                  "first_seen": _when(r.first_seen), "updated": _when(r.updated), "error": r.error}]
                    ex.summary += (f"; the ledger has it as {r.status}" +
                                   (f" (case {r.case_reference or r.case_id}, {_day(r.updated)})"
                                    if r.status == "delivered" else ""))
            elif store is not None:
                ex.ledger = [{"status": r.status, "case_id": r.case_id, "case_reference": r.case_reference,
                              "updated": _when(r.updated)} for r in store.ledger_find(conn.name, key)]
            out.append(ex)
    finally:
        await clients.aclose()
    return out


# --- status and support bundle ----------------------------------------------------------------------------

def _last_runs_by_connection(store, limit: int = RECENT_RUNS) -> dict[str, tuple[dict, dict]]:
    """Each connection's latest run among the last `limit` runs, with its part of that run's summary. The runs
    are read once for every connection: read again for each (a run's summary holds every connection's part),
    `status` of 500 connections parsed 14 MB of summaries 500 times and took 51 s."""
    out: dict[str, tuple[dict, dict]] = {}
    for run in store.last_runs(limit):
        for c in (run.get("summary") or {}).get("connections") or []:
            out.setdefault(c.get("name"), (run, c))
    return out


def status(cfg: Config, store, last_runs: dict[str, tuple[dict, dict]] | None = None) -> dict:
    """`last_runs`: _last_runs_by_connection(store), when the caller has it already."""
    if last_runs is None:
        last_runs = _last_runs_by_connection(store)
    conns = []
    scheduled = worker_schedule(cfg)
    for conn in cfg.connections:
        row = store.connection(conn.name)
        run, c = last_runs.get(conn.name, (None, None))
        entry = {"name": conn.name, "integration": conn.integration, "integration_name": conn.spec.name,
                 "environment": conn.environment, "enabled": conn.enabled,
                 "state": row.get("status") or "active",
                 "account": {"id": row.get("account_id"), "name": row.get("account_name")},
                 "last_success": _when(row.get("last_success")), "last_error": row.get("last_error"),
                 "last_error_at": _when(row.get("last_error_at")), "last_run": None,
                 "changes": [{**ch, "at": _when(ch["at"])} for ch in store.changes(conn.name, 5)]}
        if run is not None:
            entry["last_run"] = {"id": run["id"], "command": run["command"], "status": run["status"],
                                 "started": _when(run["started"]), "seen": c.get("seen"),
                                 "imported": c.get("imported"), "skipped": c.get("skipped"),
                                 "failed": c.get("failed"), "why_zero": c.get("why_zero"),
                                 "connection_status": c.get("status"), "error": c.get("error"),
                                 "after_case": c.get("after_case") or {}}
        if row.get("status") == "needs_reconnect":
            entry["fix"] = f"runner connect {conn.name}"
        if scheduled is not None:
            entry["schedule"] = scheduled[conn.name]
        conns.append(entry)
    from runner.state import safe_url

    where = safe_url(cfg.state_url) if getattr(cfg, "state_url", None) else str(cfg.state_path)
    out = {"config": str(cfg.file), "state": where, "connections": conns, "after_case": after_case_totals(store)}
    cases = debitura_cases(cfg, store)
    if cases is not None:
        out["debitura_cases"] = cases
    return redact_obj(out)


def worker_schedule(cfg: Config) -> dict[str, dict] | None:
    """Per connection, what `runner worker` does with it: its interval, last and next sync, the worker syncing
    it now. None when the state is not on PostgreSQL (no worker can run)."""
    url = getattr(cfg, "state_url", None)
    if url is None:
        return None
    from runner.engine import schedule

    rows = schedule.schedule_rows(url)

    def when(dt) -> str | None:
        return None if dt is None else _when(dt.timestamp())

    out = {}
    for conn in cfg.connections:
        r = rows.get(conn.name) or {}
        out[conn.name] = {"every_s": conn.schedule_every, "last_started": when(r.get("last_started")),
                          "last_finished": when(r.get("last_finished")), "last_status": r.get("last_status"),
                          "next_run": when(r.get("next_run")), "worker": r.get("worker")}
    return out


def after_case_totals(store) -> dict:
    """Every case's life after import at this destination: changes found at the source by kind and whether
    Debitura was told, and the invoice documents by status."""
    events = store.source_change_counts()
    return {"source_changes": events, "untold": sum(n for by in events.values() for st, n in by.items()
                                                    if st in ("new", "telling", "failed")),
            "documents": store.document_counts()}


def _config_summary(cfg: Config) -> dict:
    d = cfg.destination
    return {"file": str(cfg.file),
            "destination": {"type": d.type, "environment": d.environment, "base_url": d.base_url,
                            "is_test": d.is_test, "problems": [p.message for p in d.problems]},
            "connections": [{"name": c.name, "integration": c.integration, "integration_name": c.spec.name,
                             "environment": c.environment, "base_url": c.base_url, "enabled": c.enabled,
                             "window": c.window.as_dict(), "server_filters": c.server_filters,
                             "credentials_from": [f"{k} from {v}" for k, v in c.credential_refs.items()], "expect": c.expect,
                             "options": c.options, "problems": [p.message for p in c.problems]}
                            for c in cfg.connections]}


def support_bundle(cfg: Config, store, doctor_report: DoctorReport | None = None, samples: int = 3) -> dict:
    """What the seed's escalation section asks for, and nothing secret."""
    from runner import __version__ as version

    last_runs = _last_runs_by_connection(store)
    st = status(cfg, store, last_runs)
    conns = []
    for entry in st["connections"]:
        run, _ = last_runs.get(entry["name"], (None, None))
        not_imported = []
        if run is not None:
            by_reason: dict = {}
            for v in store.run_verdicts(run["id"], entry["name"], not_imported=True, limit=5000):
                lst = by_reason.setdefault(v["reason"] or v["verdict"], [])
                if len(lst) < samples:
                    lst.append({"invoice_id": v["invoice_id"], "number": v["number"], "verdict": v["verdict"],
                                "reason": v["reason"], "message": (v.get("detail") or {}).get("message")})
            for lst in by_reason.values():
                not_imported.extend(lst)
        errors = [e for e in (entry.get("last_error"), (entry.get("last_run") or {}).get("error")) if e]
        conns.append({"connection": entry["name"], "integration": entry["integration_name"],
                      "environment": entry["environment"], "account": entry["account"], "state": entry["state"],
                      "last_worked": entry["last_success"], "last_run": entry["last_run"],
                      "sample_invoices_not_imported": not_imported,
                      "errors": list(dict.fromkeys(errors)), "recent_changes": entry["changes"]})
    runs = [{"id": r["id"], "command": r["command"], "status": r["status"], "started": _when(r["started"]),
             "totals": (r.get("summary") or {}).get("totals"),
             "destination_error": (r.get("summary") or {}).get("destination_error")} for r in store.last_runs(10)]
    bundle = {"generated": _when(time.time()), "runner_version": version, "config": _config_summary(cfg),
              "connections": conns, "recent_runs": runs}
    if doctor_report is not None:
        bundle["doctor"] = doctor_report.as_dict()
    return redact_obj(bundle)


def render_text(obj) -> str:
    return redact(obj) if isinstance(obj, str) else obj


# --- Debitura's side of a case: events from webhooks or polling (runner/inbound/webhooks.py) ----------------

_CLOSE_WORDS = {"Paid": "paid", "PreLegalExhaustedNoPayment": "no payment, pre-legal collection exhausted"}


def _amount(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _words(code: str) -> str:
    import re as _re

    return _CLOSE_WORDS.get(code) or _re.sub(r"(?<=[a-z])(?=[A-Z])", " ", code).lower()


def case_lifecycle(events: list[dict]) -> dict:
    """One case's story from its recorded events (oldest first): the steps, the line people read, and the amounts
    collected per currency (payments less reversed ones)."""
    steps: list[str] = []
    collected: dict[str, float] = {}
    seen_payments: set = set()
    case_id = ref = lifecycle = close_code = None
    for e in events:
        d = e.get("data") or {}
        case_id = case_id or e.get("case_id") or d.get("caseId")
        ref = e.get("case_reference") or d.get("reference") or ref
        kind = e["event"]
        step = None
        if kind == "case.created":
            lifecycle = d.get("status") or lifecycle
            step = (d.get("status") or "created").lower()
        elif kind == "case.updated":
            new = d.get("newLifecycle") or d.get("status")
            if new and new != lifecycle and new != "Closed":  # a close is told by case.closed
                step = new.lower()
            lifecycle = new or lifecycle
        elif kind in ("payment.created", "payment.deleted"):
            p = d.get("payment") if isinstance(d.get("payment"), dict) else {}
            pid = (kind, p.get("id") or e.get("event_id"))
            if pid in seen_payments:
                continue
            seen_payments.add(pid)
            amount = _amount(p.get("grossAmount", p.get("amount", d.get("paymentAmount"))))
            cur = p.get("currency") or d.get("currency") or ""
            day = str(p.get("date") or e.get("occurred") or "")[:10]
            shown = f"{amount:.2f} {cur}".strip() if amount is not None else "(amount not given)"
            if amount is not None:
                collected[cur] = round(collected.get(cur, 0.0) + (amount if kind == "payment.created" else -amount), 2)
            step = (f"payment {shown}" + (f" on {day}" if day else "")) if kind == "payment.created" else \
                f"payment {shown} reversed" + (f" on {str(e.get('occurred') or '')[:10]}" if e.get("occurred") else "")
        elif kind == "case.closed":
            close_code = d.get("closeCode") or close_code
            lifecycle = "Closed"
            step = "closed" + (f" ({_words(close_code)})" if close_code else "")
        elif kind == "chat.created":
            step = "message" + (f" on {str(e.get('occurred'))[:10]}" if e.get("occurred") else "")
        if step and (not steps or steps[-1] != step):
            steps.append(step)
    name = ref or case_id
    return {"case_id": case_id, "case_reference": ref, "lifecycle": lifecycle, "close_code": close_code,
            "collected": collected, "steps": steps, "events": len(events),
            "line": f"case {name}: " + " → ".join(steps) if steps else f"case {name}: no events yet"}


def _story_text(story: dict) -> str:
    money = ", ".join(f"{v:.2f} {c}".strip() for c, v in story["collected"].items() if v)
    return story["line"] + (f"; collected {money}" if money else "")


def case_lifecycles(store, case_ids) -> dict[str, dict]:
    by_case: dict[str, list] = {}
    for e in store.case_events(case_ids):
        by_case.setdefault(e["case_id"], []).append(e)
    return {cid: case_lifecycle(evs) for cid, evs in by_case.items()}


def _debitura_side(ex: Explanation, store) -> None:
    """Add Debitura's side of the invoice's case (matched by case id in the ledger) to an explanation."""
    ids = [r.get("case_id") for r in ex.ledger if r.get("case_id")]
    if not ids:
        return
    stories = case_lifecycles(store, ids)
    for cid in dict.fromkeys(ids):
        story = stories.get(cid)
        if story is None:
            continue
        text = _story_text(story)
        _stage(ex.stages, "Debitura", OK, text)
        ex.summary = (ex.summary + "; " if ex.summary else "") + "Debitura: " + text


def debitura_cases(cfg: Config, store, limit: int = 10) -> dict | None:
    """For `status`: how the runner hears from Debitura, what it heard, and the latest cases' stories."""
    hooks = cfg.destination.webhooks
    totals = store.case_event_totals()
    if hooks is None and not totals["by_event"]:
        return None
    sub = store.webhook_subscription() if hooks is not None and hooks.mode == "push" else None
    stories = case_lifecycles(store, store.recent_case_ids(limit))
    collected: dict[str, float] = {}
    for st in stories.values():
        for cur, v in st["collected"].items():
            collected[cur] = round(collected.get(cur, 0.0) + v, 2)
    out = {"mode": hooks.mode if hooks else None,
           "subscription": ({"id": sub["id"], "url": sub["url"], "events": sub["events"]} if sub else None),
           "events": totals["by_event"], "last_event": _when(totals["last"]),
           "cases": [_story_text(stories[c]) for c in store.recent_case_ids(limit) if c in stories],
           "collected_in_shown_cases": collected}
    if hooks is not None and hooks.mode == "push" and sub is None and not hooks.secret:
        out["fix"] = f"runner webhooks sync {cfg.file}"
    refusals = store.webhook_refusals()
    if refusals:
        out["refused"] = {"count": refusals["refused"], "last": _when(refusals["last_at"]),
                          "last_reason": refusals["last_reason"]}
    return out


async def webhook_checks(cfg: Config, clients, store, report: DoctorReport) -> None:
    """doctor: is Debitura's side of the cases reaching the runner (a live, signed subscription, or polling)?"""
    from runner.engine import destinations

    d, hooks = cfg.destination, cfg.destination.webhooks
    if hooks is None or d.type != "debitura":
        return
    check = Check("destination", "webhooks", "Debitura case events (webhooks or polling)")
    report.checks.append(check)
    totals = store.case_event_totals() if store is not None else {"by_event": {}, "last": None}
    heard = (f"last event recorded {_when(totals['last'])}" if totals["last"] else "no case event recorded yet")
    if hooks.mode == "poll":
        check.set(OK, f"polling: `runner webhooks poll {cfg.file}` reads the open cases; {heard}")
        return
    if d.problems:
        check.set(SKIPPED, "not checked: the destination's API key is missing")
        return
    fix = f"runner webhooks sync {cfg.file}"
    try:
        stored = store.webhook_subscription() if store is not None else None
    except RunnerError as exc:
        check.set(FAILED, f"the stored webhook secret cannot be read: {exc.message}", exc.fix)
        return
    dest = destinations.DebituraDestination(d, clients)
    try:
        listed = (await dest.http.request("GET", "/webhooks")).json("Debitura's list of webhooks")
    except ProviderError as exc:
        check.set(FAILED, f"Debitura's webhook subscriptions could not be read: {exc.message}", exc.fix)
        return
    listed = [s for s in listed if isinstance(s, dict)] if isinstance(listed, list) else []
    ours = next((s for s in listed if stored and str(s.get("id")) == stored["id"]), None) or \
        next((s for s in listed if s.get("url") == hooks.url), None)
    if ours is None:
        check.set(FAILED, f"Debitura has no webhook subscription to {hooks.url}, so it tells the runner nothing", fix)
    elif ours.get("isActive") is False:
        check.set(FAILED, f"Debitura disabled the subscription {ours.get('id')}"
                          + (f": {ours['disabledReason']}" if ours.get("disabledReason") else "")
                          + "; check that `runner serve` is reachable at " + hooks.url, fix)
    elif not hooks.secret and not (stored and stored.get("secret") and stored["id"] == str(ours.get("id"))):
        check.set(FAILED, f"the runner has no signing secret for subscription {ours.get('id')}: every delivery "
                          f"would be refused", fix)
    elif sorted(ours.get("events") or []) != sorted(hooks.events) or ours.get("url") != hooks.url:
        check.set(WARNING, f"subscription {ours.get('id')} differs from the config (events or URL)", fix)
    else:
        refusals = store.webhook_refusals() if store is not None else None
        if refusals and (not totals["last"] or refusals["last_at"] > totals["last"]):
            check.set(WARNING, f"subscription {ours.get('id')} is active, but `runner serve` refused deliveries since "
                               f"the last one it recorded ({refusals['refused']} in all; the last, "
                               f"{_when(refusals['last_at'])}: {refusals['last_reason']})",
                      f"if the secret is wrong or lost: {fix} (a new state store gets a new secret); if the "
                      f"timestamp is off: synchronise this machine's clock (NTP)")
        else:
            check.set(OK, f"subscription {ours.get('id')} → {hooks.url} is active; {heard}")
