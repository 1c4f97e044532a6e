"""`runner state migrate`: copy an SQLite store into a PostgreSQL one, everything it holds, so the runs that
follow on PostgreSQL go on where the SQLite store left off (nothing is imported again, tokens and keys work).
"""
from __future__ import annotations

from runner.state import postgres, sqlite
from runner.state.sqlite import StateFileError

# Every table, and the columns copied (the same names in both stores; the PostgreSQL-only row orders, ledger.seq
# and verdicts.id, are numbered as the rows arrive, in the SQLite rowid order).
TABLES: dict[str, list[str]] = {
    "runs": ["id", "command", "config", "started", "finished", "status", "summary"],
    "ledger": ["account_key", "invoice_id", "connection", "number", "status", "idempotency_key", "case_id",
               "case_reference", "destination", "error", "first_seen", "updated", "run_id"],
    "verdicts": ["run_id", "connection", "account_key", "invoice_id", "number", "verdict", "reason", "detail", "at"],
    "connections": ["name", "integration", "status", "account_id", "account_name", "credential_fingerprint", "data",
                    "last_success", "last_error", "last_error_at", "last_run_id", "updated"],
    "sink_marks": ["destination", "offset", "run_id", "at", "recorded"],
    "tokens": ["connection", "token", "updated"],
    "changes": ["connection", "what", "old", "new", "at"],
    "api_keys": ["id", "environment", "label", "hash", "created", "revoked", "last_used"],
    "inbound_requests": ["connection", "idempotency_key", "body_hash", "status", "response", "at"],
    "webhook_subscriptions": ["destination", "subscription_id", "url", "events", "is_test", "secret", "updated"],
    "case_events": ["destination", "event_id", "event", "case_id", "case_reference", "occurred", "via", "data",
                    "received"],
    "webhook_refusals": ["destination", "refused", "last_at", "last_reason"],
    "case_poll_state": ["destination", "case_id", "state", "checked"],
    "cursors": ["connection", "stream", "cursor", "scope", "full_at", "updated"],
    "source_changes": ["destination", "account_key", "invoice_id", "event_key", "case_id", "kind", "final", "detail",
                       "message", "status", "chat_id", "error", "run_id", "seen_at", "told_at"],
    "case_checks": ["destination", "account_key", "invoice_id", "checked_at"],
    "case_documents": ["destination", "account_key", "invoice_id", "case_id", "status", "file_name", "content_type",
                       "size", "file_id", "error", "attempts", "updated"],
}


def copy_store(source: sqlite.Store, target: postgres.Store) -> dict[str, int]:
    """Copy every row of `source` into `target`, in one transaction: all or nothing. The target must hold no
    run, ledger row or token yet (a second copy would mix two histories). Returns the rows copied per table."""
    counts: dict[str, int] = {}
    with target.tx() as db:
        held = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("runs", "ledger", "tokens")}
        if any(held.values()):
            raise StateFileError(
                f"the state store {target.describe()} is not empty ({held['runs']} runs, {held['ledger']} ledger "
                f"rows, {held['tokens']} tokens); nothing was copied",
                fix="copy into a new, empty database (CREATE DATABASE ...), or point `state:` at this one if it is "
                    "already the store you want")
        for table, cols in TABLES.items():
            quoted = ", ".join(f'"{c}"' for c in cols)
            n = 0
            with db.cursor() as cur, cur.copy(f"COPY {table} ({quoted}) FROM STDIN") as copy:
                for row in source.db.execute(f"SELECT {quoted} FROM {table} ORDER BY rowid"):
                    copy.write_row(row)
                    n += 1
            counts[table] = n
        # The next run's id follows the copied ones.
        db.execute("SELECT setval(pg_get_serial_sequence('runs', 'id'), (SELECT max(id) FROM runs)) "
                   "WHERE EXISTS (SELECT 1 FROM runs)")
    return counts
