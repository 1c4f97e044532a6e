"""The state store (SQLite): the ledger, verdict history, run history, connection health and OAuth tokens.

Writes that later steps depend on are committed before those steps run: an invoice is recorded as
`pending` with its idempotency key before the destination is called, and as `delivered` after, so a crash
at any point followed by a rerun delivers every invoice exactly once. A local file needs no row per invoice
before it is written: a run marks the file's length once (`sink_marks`) before its first write, and a run
that finds such a mark left by a crash first records what the file holds past it (runner/engine/pipeline.py).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from runner.errors import RunnerError

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    account_key TEXT NOT NULL,
    invoice_id TEXT NOT NULL,
    connection TEXT NOT NULL,
    number TEXT,
    status TEXT NOT NULL,            -- pending | delivered | failed
    idempotency_key TEXT NOT NULL,
    case_id TEXT,
    case_reference TEXT,
    destination TEXT NOT NULL,       -- where the case was sent (type, environment/URL or file, test flag)
    error TEXT,
    first_seen REAL NOT NULL,
    updated REAL NOT NULL,
    run_id INTEGER,                  -- the run that recorded the delivery: a delivered row is that run's
                                     -- "imported" verdict (see IMPORTED)
    PRIMARY KEY (destination, account_key, invoice_id)
);
-- ledger_number (connection, number) is gone: explain's lookup by id or number only ever used its
-- connection prefix (a scan either way), and every imported invoice paid a random insert into it.
DROP INDEX IF EXISTS ledger_number;
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    command TEXT NOT NULL,
    config TEXT,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,            -- running | ok | failed | partial | interrupted
    summary TEXT
);
CREATE TABLE IF NOT EXISTS verdicts (  -- every verdict but "imported" (the ledger's delivered rows)
    run_id INTEGER NOT NULL,
    connection TEXT NOT NULL,
    account_key TEXT NOT NULL,
    invoice_id TEXT NOT NULL,
    number TEXT,
    verdict TEXT NOT NULL,           -- imported | skipped | failed
    reason TEXT,
    detail TEXT,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS verdicts_invoice ON verdicts (account_key, invoice_id);
CREATE INDEX IF NOT EXISTS verdicts_run ON verdicts (run_id, connection);
CREATE TABLE IF NOT EXISTS connections (
    name TEXT PRIMARY KEY,
    integration TEXT,
    status TEXT NOT NULL DEFAULT 'active',   -- active | needs_reconnect
    account_id TEXT,
    account_name TEXT,
    credential_fingerprint TEXT,
    data TEXT NOT NULL DEFAULT '{}',         -- what a connect flow learned (realm id, api domain, ...)
    last_success REAL,
    last_error TEXT,
    last_error_at REAL,
    last_run_id INTEGER,
    updated REAL
);
CREATE TABLE IF NOT EXISTS sink_marks (
    destination TEXT PRIMARY KEY,    -- a local file an apply run is writing cases to
    offset INTEGER NOT NULL,         -- its length before the run's first write: what follows may be unrecorded
    run_id INTEGER,
    at REAL NOT NULL,
    recorded INTEGER                 -- its length after the last page a worker recorded (see sink_recorded)
);
CREATE TABLE IF NOT EXISTS tokens (
    connection TEXT PRIMARY KEY,
    token TEXT NOT NULL,             -- JSON, encrypted when RUNNER_SECRET_KEY is set
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    connection TEXT NOT NULL,
    what TEXT NOT NULL,
    old TEXT,
    new TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (  -- `runner serve`'s keys (runner/inbound/apikeys.py)
    id TEXT PRIMARY KEY,             -- public key id, shown by `runner keys list`
    environment TEXT NOT NULL,       -- production | test
    label TEXT,
    hash TEXT NOT NULL,              -- sha256 of the whole key, hex
    created REAL NOT NULL,
    revoked REAL,
    last_used REAL
);
CREATE TABLE IF NOT EXISTS inbound_requests (  -- answers `runner serve` keeps per Idempotency-Key
    connection TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    status INTEGER NOT NULL,
    response TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (connection, idempotency_key)
);
"""

# Debitura's side of a case (runner/inbound/webhooks.py): the webhook subscription `runner webhooks sync` made,
# and every case event received by webhook or found by polling, once per event id.
WEBHOOKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_subscriptions (
    destination TEXT PRIMARY KEY,    -- one subscription per destination (ledger id)
    subscription_id TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,            -- JSON list
    is_test INTEGER NOT NULL DEFAULT 0,
    secret TEXT,                     -- the signing secret Debitura showed once; encrypted when RUNNER_SECRET_KEY is set
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS case_events (
    destination TEXT NOT NULL,
    event_id TEXT NOT NULL,          -- the event's own id (webhook), or one derived from what changed (polling)
    event TEXT NOT NULL,             -- case.created | case.updated | case.closed | payment.created | ...
    case_id TEXT,
    case_reference TEXT,
    occurred TEXT,                   -- when Debitura says it happened (ISO 8601)
    via TEXT NOT NULL,               -- webhook | poll
    data TEXT NOT NULL,              -- the event's data object (JSON)
    received REAL NOT NULL,
    PRIMARY KEY (destination, event_id)
);
CREATE INDEX IF NOT EXISTS case_events_case ON case_events (destination, case_id);
CREATE TABLE IF NOT EXISTS webhook_refusals (  -- deliveries `runner serve` refused, for doctor and status
    destination TEXT PRIMARY KEY,
    refused INTEGER NOT NULL,
    last_at REAL NOT NULL,
    last_reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS case_poll_state (
    destination TEXT NOT NULL,
    case_id TEXT NOT NULL,
    state TEXT NOT NULL,             -- JSON: lifecycle, closeCode, remainder, payment ids seen
    checked REAL NOT NULL,
    PRIMARY KEY (destination, case_id)
);
"""


def _statements(script: str) -> list[str]:
    """A script's statements, one by one: executescript() would commit the migration's transaction."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out


def _v1(db: sqlite3.Connection) -> None:
    """The schema as it was before versions were numbered; a store made before gets what it lacks (its
    tables and rows stay as they are)."""
    for stmt in _statements(SCHEMA):
        db.execute(stmt)
    for table, column in (("ledger", "run_id"), ("sink_marks", "recorded")):
        if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} INTEGER")


# Numbered migrations, applied in order at open (PRAGMA user_version is the store's version). A new one is
# appended, never edited once released; runner/state/postgres.py keeps the same numbers.
def _v2(db: sqlite3.Connection) -> None:
    """Debitura's side of the cases (webhook subscription, case events, polling state), change-feed cursors,
    and what happened after each case (changes at the source told to Debitura, re-checks, invoice documents)."""
    for script in (WEBHOOKS_SCHEMA, CURSORS_SCHEMA, LIFECYCLE_SCHEMA):
        for stmt in _statements(script):
            db.execute(stmt)


# What the end of a connection's run reads (seen_in_run: the run's duplicates of one account). The index on
# (run_id, connection) does not narrow by account: with 500 connections in one run each read went through
# all of the run's verdicts (40-270 ms a read on PostgreSQL). Partial: a first import has no duplicates.
DUPLICATES_INDEX = ("CREATE INDEX IF NOT EXISTS verdicts_duplicates ON verdicts (run_id, account_key) "
                    "WHERE reason = 'duplicate'")


def _v5(db: sqlite3.Connection) -> None:
    db.execute(DUPLICATES_INDEX)


MIGRATIONS = [(1, _v1), (2, _v2), (5, _v5)]
VERSION = MIGRATIONS[-1][0]


def migrate(db: sqlite3.Connection) -> int:
    """Bring the store to VERSION, under the write lock (BEGIN IMMEDIATE): of several runners opening one
    store at once, one migrates and the others then find nothing to do. Returns the version found."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found >= VERSION:
        return found
    with transaction(db):
        found = db.execute("PRAGMA user_version").fetchone()[0]
        for number, step in MIGRATIONS:
            if number > found:
                step(db)
        if found < VERSION:
            db.execute(f"PRAGMA user_version={VERSION}")
    return found


@dataclass
class LedgerRow:
    account_key: str
    invoice_id: str
    connection: str
    number: str | None
    status: str
    idempotency_key: str
    case_id: str | None
    case_reference: str | None
    error: str | None
    first_seen: float
    updated: float
    run_id: int | None = None  # the run that recorded the delivery (read by `lookup` only)


class _Db(sqlite3.Connection):
    """A connection to the store that knows its file's write lock (see transaction)."""

    write_lock: int | None = None  # a descriptor of `<store>-writing`, opened on the first transaction

    def close(self) -> None:
        super().close()
        if self.write_lock is not None and self.write_lock >= 0:
            os.close(self.write_lock)
        self.write_lock = None


def connect(path: str) -> sqlite3.Connection:
    """A connection to the store, in autocommit mode. WAL with synchronous=NORMAL: a committed transaction
    survives the process being killed (the runner's crash model); only a power cut can take back the last
    ones, and commits do not wait for the disk. synchronous is a per-connection setting: every connection
    that writes (the engine's, the classification worker's) must get it here."""
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False, factory=_Db)
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def lookup(db: sqlite3.Connection, destination: str, account_key: str, ids: list[str]) -> dict[str, LedgerRow]:
    """The ledger rows of these invoices of one source account, by invoice id: one query per 500 ids."""
    out: dict[str, LedgerRow] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        q = ("SELECT account_key, invoice_id, connection, number, status, idempotency_key, case_id, "
             "case_reference, error, first_seen, updated, run_id FROM ledger WHERE destination=? AND account_key=? "
             "AND invoice_id IN (%s)" % ",".join("?" * len(chunk)))
        for row in db.execute(q, (destination, account_key, *chunk)):
            out[row[1]] = LedgerRow(*row)
    return out


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction on a connection in autocommit mode: the write lock is taken at the start.

    Writers (the engine, its ledger thread, each classification worker) first wait on an advisory lock of
    the store's file, and are woken the moment the writer before them is done. SQLite's own wait for a
    busy database polls with sleeps that grow to 100 ms: on the engine's thread that stops every
    connection's fetching (strace of a 50-connection run: 80 such sleeps as connections recorded their
    health at the end), and in a worker that holds a local sink's lock it stops the other workers too. The
    lock is only a courtesy between writers; SQLite's locking is what keeps the data right, for any writer
    that does not take it."""
    fd = _write_lock(db)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _write_lock(db: sqlite3.Connection) -> int | None:
    """This connection's descriptor of the store's write lock file; None in memory or where it cannot be
    opened (SQLite's busy wait alone then)."""
    fd = getattr(db, "write_lock", None)
    if fd is None and isinstance(db, _Db):
        path = next((row[2] for row in db.execute("PRAGMA database_list") if row[1] == "main"), "")
        if not path:
            db.write_lock = -1
            return None
        try:
            # flock() on a descriptor of this connection's own: it excludes the other connections of this
            # process (the ledger thread's) as well as other processes. A forked worker opens its own.
            fd = db.write_lock = os.open(path + "-writing", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            db.write_lock = -1
            return None
    return fd if fd is not None and fd >= 0 else None


def write_private(path: Path | str, text: str) -> None:
    """Write a file only its owner may read (0600, whatever the umask or an older copy's mode): like the state
    store, a support bundle describes the accounts and their invoices."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, 0o600)
        f.write(text)


# An imported invoice's verdict is its delivered ledger row: the run that recorded it, the case it became. A
# verdict row would only repeat it, and writing both was a sixth of a worker's time per invoice. Rows from
# before the ledger kept the run (run_id NULL) have their verdict rows instead.
IMPORTED = "status='delivered' AND run_id IS NOT NULL"  # the ledger rows that are imported verdicts


def imported_detail(case_id: str | None, case_reference: str | None) -> dict:
    """The detail (message, case) of an imported verdict, as classify.delivered gives it (classify.imported_message:
    the state store does not import the engine)."""
    return {"message": f"imported as case {case_reference or case_id}", "case_id": case_id,
            "case_reference": case_reference}


def insert_verdicts(db: sqlite3.Connection, run_id: int, rows: list[tuple]) -> None:
    """rows: (connection, account_key, invoice_id, number, verdict, reason, detail_json), in the caller's transaction."""
    now = time.time()
    db.executemany("INSERT INTO verdicts (run_id, connection, account_key, invoice_id, number, verdict, reason, "
                   "detail, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(run_id, *r, now) for r in rows])


def sink_recorded(db: sqlite3.Connection, destination: str) -> tuple[int, int | None] | None:
    """How much of a local sink is known to be in the ledger (its length after the last page a worker
    recorded, or the run's mark), and the marking run; None when no run is writing it. A worker reads it
    under the file's lock: the file being longer means a writer died between writing a page and recording
    it (see localsink.repair)."""
    r = db.execute("SELECT coalesce(recorded, offset), run_id FROM sink_marks WHERE destination=?",
                   (destination,)).fetchone()
    return None if r is None else (r[0], r[1])


def set_sink_recorded(db: sqlite3.Connection, destination: str, length: int) -> None:
    """In the transaction that records a page: the sink is in the ledger up to `length`."""
    db.execute("UPDATE sink_marks SET recorded=? WHERE destination=?", (length, destination))


def insert_imported(db: sqlite3.Connection, destination: str, rows: list[tuple], run_id: int | None) -> None:
    """rows: (account_key, invoice_id, connection, number, idempotency_key, case_id, case_reference) of invoices
    a local sink holds, as delivered by run `run_id` (no pending row before them: see sink_marks), in the
    caller's transaction."""
    now = time.time()
    db.executemany(
        "INSERT INTO ledger (destination, account_key, invoice_id, connection, number, status, idempotency_key, "
        "case_id, case_reference, first_seen, updated, run_id) VALUES (?, ?, ?, ?, ?, 'delivered', ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (destination, account_key, invoice_id) DO UPDATE SET status='delivered', "
        "idempotency_key=excluded.idempotency_key, case_id=excluded.case_id, "
        "case_reference=excluded.case_reference, number=excluded.number, error=NULL, updated=excluded.updated, "
        "run_id=excluded.run_id WHERE ledger.status != 'delivered'",
        [(destination, a, i, c, n, k, cid, cref, now, now, run_id) for a, i, c, n, k, cid, cref in rows])


def record_written(db: sqlite3.Connection, destination: str, run_id: int, imported: list[tuple],
                   length: int | None, verdicts: list[tuple]) -> None:
    """A page a worker wrote to a local sink, recorded in one transaction: `imported` (insert_imported's
    rows), the sink recorded up to `length` (None: unchanged), the page's verdict rows."""
    with transaction(db):
        if imported:
            insert_imported(db, destination, imported, run_id)
        if length is not None:
            set_sink_recorded(db, destination, length)
        insert_verdicts(db, run_id, verdicts)


def record_verdicts(db: sqlite3.Connection, run_id: int, rows: list[tuple]) -> None:
    """Verdict rows on their own, in a transaction of their own."""
    with transaction(db):
        insert_verdicts(db, run_id, rows)


def sink_lookup(db: sqlite3.Connection, destination: str, account_key: str,
                ids: list[str]) -> tuple[tuple[int, int | None] | None, dict[str, LedgerRow]]:
    """sink_recorded's mark and lookup: what a worker reads under a local sink's lock (see localsink.write_page)."""
    return sink_recorded(db, destination), lookup(db, destination, account_key, ids)


# `runner status` finds each connection's last run among the latest RECENT_RUNS runs; apply runs older than that
# (and than state.keep_runs) keep only their totals (Store.trim_summaries).
RECENT_RUNS = 50


class StateFileError(RunnerError):
    """The config's `state` names something the runner cannot keep its database in. Exit code 2: the fix is
    in the config (or the folder's permissions), not in the runner."""

    exit_code = 2


FIX_PATH = "set `state:` in the config to a file the runner may create and write, for example .runner/state.db"


def _unusable(path: Path, exc: BaseException) -> StateFileError:
    """What is wrong with a state file that could not be opened or set up, said for the person who chose it."""
    text = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
    code = exc.errno if isinstance(exc, OSError) else None
    if code == errno.ENOSPC or "disk is full" in text:
        return StateFileError(f"the state file {path} cannot be written: the disk is full",
                              fix="free space on that disk, or move `state:` in the config to another disk")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "readonly" in text or "unable to open" in text:
        return StateFileError(f"the state file {path} cannot be created or written ({text})",
                              fix="give the runner write access to the file and its folder (SQLite writes files "
                                  "beside it), or " + FIX_PATH[0].lower() + FIX_PATH[1:])
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in text:
        return StateFileError(f"the state file {path} is not a runner state database (it holds something else)",
                              fix="set `state:` in the config to the runner's state file, or to a new file name to "
                                  "start a new one; if it was the runner's and is damaged, restore it from a backup")
    if isinstance(exc, OSError):
        return StateFileError(f"the state file {path} cannot be created ({text})", fix=FIX_PATH)
    return StateFileError(f"the state file {path} cannot be used as a database ({text})", fix=FIX_PATH)


# --- after the case exists: Debitura's case events, change-feed cursors, source changes, invoice documents ----
# One block, shared by both store backends: the DDL (WEBHOOKS_SCHEMA above, CURSORS_SCHEMA and LIFECYCLE_SCHEMA
# below; runner/state/postgres.py derives its types from them) and the methods of CaseEvents, Cursors and
# CaseLife, the only way the engine (runner/inbound/webhooks.py, runner/engine/incremental.py,
# runner/engine/lifecycle.py, runner/engine/documents.py) reads or writes these tables. Their SQL is written
# once, with `?` placeholders, through the helpers of Portable.

# Where each connection's change feed resumes, per stream: the start of its last recorded run, what the cursor
# is valid for (account, window rule, filters), and when its last full scan started. Written only after a run's
# pages are recorded, so a crash reads the same changes again rather than skipping them.
CURSORS_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
    connection TEXT NOT NULL,
    stream TEXT NOT NULL,
    cursor REAL NOT NULL,            -- unix time the last recorded run started reading
    scope TEXT NOT NULL,             -- what the cursor is valid for; another scope means a full scan
    full_at REAL,                    -- unix time the last full scan started
    updated REAL NOT NULL,
    PRIMARY KEY (connection, stream)
);
"""

LIFECYCLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS source_changes (
    destination TEXT NOT NULL,
    account_key TEXT NOT NULL,
    invoice_id TEXT NOT NULL,
    event_key TEXT NOT NULL,         -- a digest of what the source shows: the same change is one event
    case_id TEXT,
    kind TEXT NOT NULL,              -- paid | partially_paid | void | credited | deleted | uncollectible
    final INTEGER NOT NULL,          -- the invoice is settled at the source: no more re-checks
    detail TEXT NOT NULL,            -- JSON: status, amounts, currency, date as the source shows them
    message TEXT NOT NULL,           -- the chat message, as sent (its marker finds it in the case's chat)
    status TEXT NOT NULL,            -- new | telling (posting; unsure after a crash) | told | failed | recorded
    chat_id TEXT,
    error TEXT,
    run_id INTEGER,
    seen_at REAL NOT NULL,
    told_at REAL,
    PRIMARY KEY (destination, account_key, invoice_id, event_key)
);
CREATE TABLE IF NOT EXISTS case_checks (  -- when each open case was last re-checked at the source
    destination TEXT NOT NULL,
    account_key TEXT NOT NULL,
    invoice_id TEXT NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (destination, account_key, invoice_id)
);
CREATE TABLE IF NOT EXISTS case_documents (
    destination TEXT NOT NULL,
    account_key TEXT NOT NULL,
    invoice_id TEXT NOT NULL,
    case_id TEXT,
    status TEXT NOT NULL,            -- uploading (unsure after a crash) | uploaded | failed | none (no document)
    file_name TEXT,
    content_type TEXT,
    size INTEGER,
    file_id TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (destination, account_key, invoice_id)
);
"""

EVENT_COLUMNS = ("account_key", "invoice_id", "event_key", "case_id", "kind", "final", "detail", "message", "status",
                 "chat_id", "error", "run_id", "seen_at", "told_at")
DOCUMENT_COLUMNS = ("account_key", "invoice_id", "case_id", "status", "file_name", "content_type", "size", "file_id",
                    "error", "attempts", "updated")
_LEDGER_ROW = ("l.account_key, l.invoice_id, l.connection, l.number, l.status, l.idempotency_key, l.case_id, "
               "l.case_reference, l.error, l.first_seen, l.updated")


class Portable:
    """SQL written once for both backends, with `?` placeholders; a backend whose driver wants another
    (psycopg's %s) sets PARAM. The store provides tx(), _all(sql, args) and _one(sql, args)."""

    PARAM = "?"

    def _q(self, sql: str) -> str:
        return sql if self.PARAM == "?" else sql.replace("?", self.PARAM)

    def _rows(self, sql: str, args=()) -> list[tuple]:
        return self._all(self._q(sql), args)

    def _row(self, sql: str, args=()) -> tuple | None:
        return self._one(self._q(sql), args)

    def _write(self, sql: str, args=()) -> int:
        """One statement in a transaction of its own, committed on return: the rows it changed."""
        with self.tx() as db:
            return db.execute(self._q(sql), args).rowcount

    def _write_many(self, sql: str, rows: list[tuple]) -> None:
        with self.tx() as db:
            cur = db.cursor()
            try:
                cur.executemany(self._q(sql), rows)
            finally:
                cur.close()


class Connections(Portable):
    """A connection's health row, its changes and its OAuth token, the same SQL on both backends."""

    COLUMNS = ("name", "integration", "status", "account_id", "account_name", "credential_fingerprint", "data",
               "last_success", "last_error", "last_error_at", "last_run_id")
    WATCHED = ("account_id", "account_name", "credential_fingerprint")  # a change of these is a `changes` row

    def connection(self, name: str) -> dict:
        r = self._row(f"SELECT {', '.join(self.COLUMNS)} FROM connections WHERE name=?", (name,))
        if r is None:
            return {"name": name, "status": "active", "data": {}}
        d = dict(zip(self.COLUMNS, r))
        d["data"] = json.loads(d["data"] or "{}")
        return d

    def update_connection(self, name: str, **fields) -> None:
        """Upsert fields of a connection's row; records a `changes` row when the account or credential changes."""
        unknown = set(fields) - set(self.COLUMNS)
        if unknown:  # a caller's mistake, on either backend
            raise TypeError(f"update_connection: no column {', '.join(sorted(unknown))}")
        cur = self.connection(name)
        if "data" in fields:
            fields["data"] = json.dumps({**cur.get("data", {}), **fields["data"]})
        now = time.time()
        changes = []
        for what in self.WATCHED:
            if what in fields and cur.get(what) and fields[what] and cur.get(what) != fields[what]:
                changes.append((name, what, cur.get(what), fields[what], now))
        cols = ["name", "updated"] + list(fields)
        vals = [name, now] + list(fields.values())
        with self.tx() as db:
            db.execute(self._q(f"INSERT INTO connections ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                               "ON CONFLICT (name) DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in cols[1:])),
                       vals)
            if changes:
                c = db.cursor()
                try:
                    c.executemany(self._q("INSERT INTO changes (connection, what, old, new, at) VALUES (?, ?, ?, ?, ?)"),
                                  changes)
                finally:
                    c.close()

    def changes(self, name: str, limit: int = 20) -> list[dict]:
        return [{"what": r[0], "old": r[1], "new": r[2], "at": r[3]} for r in self._rows(
            "SELECT what, old, new, at FROM changes WHERE connection=? ORDER BY at DESC LIMIT ?", (name, limit))]

    def get_token(self, connection: str) -> dict | None:
        r = self._row("SELECT token FROM tokens WHERE connection=?", (connection,))
        if r is None:
            return None
        from runner.state import crypto

        return json.loads(crypto.decrypt(r[0]))

    def delete_token(self, connection: str) -> None:
        self._write("DELETE FROM tokens WHERE connection=?", (connection,))


class CaseEvents(Portable):
    """Debitura webhooks and case events (runner/inbound/webhooks.py; tables in WEBHOOKS_SCHEMA)."""

    def webhook_subscription(self) -> dict | None:
        """The subscription `runner webhooks sync` made for this store's destination, its secret decrypted."""
        r = self._row("SELECT subscription_id, url, events, is_test, secret, updated FROM webhook_subscriptions "
                      "WHERE destination=?", (self.destination,))
        if r is None:
            return None
        from runner.state import crypto

        return {"id": r[0], "url": r[1], "events": json.loads(r[2]), "is_test": bool(r[3]),
                "secret": crypto.decrypt(r[4]) if r[4] else None, "updated": r[5]}

    def webhook_secret_blob(self) -> str | None:
        """The stored secret as stored (encrypted or not): a server re-decrypts only when it changed."""
        r = self._row("SELECT secret FROM webhook_subscriptions WHERE destination=?", (self.destination,))
        return r[0] if r else None

    def save_webhook_subscription(self, subscription_id: str, url: str, events: list[str], is_test: bool,
                                  secret: str | None = None) -> None:
        """Committed before anything else happens: Debitura shows a new secret only once. secret=None keeps
        the stored one (an update that did not regenerate it)."""
        from runner.state import crypto

        blob = crypto.encrypt(secret) if secret else None
        self._write(
            "INSERT INTO webhook_subscriptions (destination, subscription_id, url, events, is_test, secret, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (destination) DO UPDATE SET "
            "subscription_id=excluded.subscription_id, url=excluded.url, events=excluded.events, "
            "is_test=excluded.is_test, secret=COALESCE(excluded.secret, CASE WHEN "
            "webhook_subscriptions.subscription_id = excluded.subscription_id THEN webhook_subscriptions.secret "
            "END), updated=excluded.updated",
            (self.destination, subscription_id, url, json.dumps(sorted(events)), int(is_test), blob, time.time()))

    def delete_webhook_subscription(self) -> None:
        self._write("DELETE FROM webhook_subscriptions WHERE destination=?", (self.destination,))

    def record_case_event(self, event_id: str, event: str, case_id: str | None, case_reference: str | None,
                          occurred: str | None, via: str, data: dict) -> bool:
        """True when recorded now, False when this event id was recorded before (a replay)."""
        return self._write(
            "INSERT INTO case_events (destination, event_id, event, case_id, case_reference, occurred, via, data, "
            "received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (destination, event_id) DO NOTHING",
            (self.destination, event_id, event, case_id, case_reference, occurred, via,
             json.dumps(data, sort_keys=True), time.time())) == 1

    def case_events(self, case_ids: Iterable[str]) -> list[dict]:
        """The recorded events of these cases, oldest first (by Debitura's time, then arrival)."""
        ids = list(dict.fromkeys(i for i in case_ids if i))
        out: list[dict] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            out += [{"event_id": r[0], "event": r[1], "case_id": r[2], "case_reference": r[3], "occurred": r[4],
                     "via": r[5], "data": json.loads(r[6]), "received": r[7]} for r in self._rows(
                "SELECT event_id, event, case_id, case_reference, occurred, via, data, received FROM case_events "
                f"WHERE destination=? AND case_id IN ({', '.join('?' * len(chunk))})", [self.destination, *chunk])]
        out.sort(key=lambda e: (e["occurred"] or "", e["received"]))
        return out

    def recent_case_ids(self, limit: int = 10) -> list[str]:
        """The cases whose latest event arrived most recently, newest first."""
        return [r[0] for r in self._rows(
            "SELECT case_id FROM case_events WHERE destination=? AND case_id IS NOT NULL GROUP BY case_id "
            "ORDER BY MAX(received) DESC LIMIT ?", (self.destination, limit))]

    def case_event_totals(self) -> dict:
        """Events recorded per kind, and the time of the latest."""
        rows = self._rows("SELECT event, COUNT(*), MAX(received) FROM case_events WHERE destination=? "
                          "GROUP BY event", (self.destination,))
        return {"by_event": {r[0]: r[1] for r in rows}, "last": max((r[2] for r in rows), default=None)}

    def note_webhook_refused(self, reason: str) -> None:
        self._write("INSERT INTO webhook_refusals (destination, refused, last_at, last_reason) VALUES "
                    "(?, 1, ?, ?) ON CONFLICT (destination) DO UPDATE SET refused=webhook_refusals.refused+1, "
                    "last_at=excluded.last_at, last_reason=excluded.last_reason",
                    (self.destination, time.time(), reason[:500]))

    def webhook_refusals(self) -> dict | None:
        """{refused, last_at, last_reason} of the deliveries refused so far, or None."""
        r = self._row("SELECT refused, last_at, last_reason FROM webhook_refusals WHERE destination=?",
                      (self.destination,))
        return {"refused": r[0], "last_at": r[1], "last_reason": r[2]} if r else None

    def open_cases(self, limit: int) -> list[tuple[str, str | None]]:
        """(case id, reference) of delivered cases with no recorded close, least recently polled first."""
        return [(r[0], r[1]) for r in self._rows(
            "SELECT l.case_id, l.case_reference FROM ledger l LEFT JOIN case_poll_state p ON "
            "p.destination = l.destination AND p.case_id = l.case_id WHERE l.destination=? AND "
            "l.status='delivered' AND l.case_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM case_events e WHERE "
            "e.destination = l.destination AND e.case_id = l.case_id AND e.event='case.closed') "
            "ORDER BY COALESCE(p.checked, 0), l.updated LIMIT ?", (self.destination, limit))]

    def case_poll_state(self, case_id: str) -> dict | None:
        r = self._row("SELECT state FROM case_poll_state WHERE destination=? AND case_id=?",
                      (self.destination, case_id))
        return json.loads(r[0]) if r else None

    def save_case_poll_state(self, case_id: str, state: dict) -> None:
        self._write("INSERT INTO case_poll_state (destination, case_id, state, checked) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (destination, case_id) DO UPDATE SET state=excluded.state, "
                    "checked=excluded.checked", (self.destination, case_id, json.dumps(state), time.time()))


class Cursors(Portable):
    """Change-feed cursors (runner/engine/incremental.py; the table in CURSORS_SCHEMA)."""

    def cursor(self, connection: str, stream: str) -> dict | None:
        """{cursor, scope, full_at} of a connection's stream, or None (never synced with a change feed)."""
        r = self._row("SELECT cursor, scope, full_at FROM cursors WHERE connection=? AND stream=?",
                      (connection, stream))
        return None if r is None else {"cursor": r[0], "scope": r[1], "full_at": r[2]}

    def save_cursor(self, connection: str, stream: str, cursor: float, scope: str, full_at: float | None) -> None:
        self._write("INSERT INTO cursors (connection, stream, cursor, scope, full_at, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (connection, stream) DO UPDATE SET "
                    "cursor=excluded.cursor, scope=excluded.scope, full_at=excluded.full_at, "
                    "updated=excluded.updated", (connection, stream, cursor, scope, full_at, time.time()))

    def drop_cursor(self, connection: str, stream: str) -> None:
        """The next run of this stream is a full scan."""
        self._write("DELETE FROM cursors WHERE connection=? AND stream=?", (connection, stream))


class CaseLife(Portable):
    """Store methods for what happens after a case exists (tables in LIFECYCLE_SCHEMA)."""

    def _event(self, r) -> dict:
        d = dict(zip(EVENT_COLUMNS, r))
        d["detail"] = json.loads(d["detail"])
        return d

    def cases_to_recheck(self, account_key: str, limit: int, exclude: Iterable[str] = (),
                   checked_before: float | None = None) -> tuple[list[LedgerRow], int]:
        """Delivered cases of this account whose invoice is not settled at the source yet, not in `exclude`
        and not re-checked since `checked_before`, least recently re-checked first (so a bounded number of
        look-ups per run still reaches every case in turn): (the first `limit`, how many there are)."""
        skip = set(exclude)
        out: list[LedgerRow] = []
        due = 0
        for r in self._rows(
                f"SELECT {_LEDGER_ROW} FROM ledger l "
                "LEFT JOIN case_checks c ON c.destination=l.destination AND c.account_key=l.account_key "
                "AND c.invoice_id=l.invoice_id WHERE l.destination=? AND l.account_key=? AND l.status='delivered' "
                "AND l.case_id IS NOT NULL AND COALESCE(c.checked_at, 0) < ? AND NOT EXISTS (SELECT 1 FROM "
                "source_changes e WHERE e.destination=l.destination AND e.account_key=l.account_key AND "
                "e.invoice_id=l.invoice_id AND e.final=1) ORDER BY COALESCE(c.checked_at, 0), l.updated",
                (self.destination, account_key, time.time() + 1 if checked_before is None else checked_before)):
            if r[1] in skip:
                continue
            due += 1
            if len(out) < limit:
                out.append(LedgerRow(*r))
        return out, due

    def count_cases_to_recheck(self, account_key: str) -> int:
        return self._row(
            "SELECT COUNT(*) FROM ledger l WHERE l.destination=? AND l.account_key=? AND l.status='delivered' AND "
            "l.case_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM source_changes e WHERE e.destination=l.destination "
            "AND e.account_key=l.account_key AND e.invoice_id=l.invoice_id AND e.final=1)",
            (self.destination, account_key))[0]

    def seen_in_run(self, run_id: int, account_key: str) -> tuple[set[str], dict[str, dict]]:
        """Invoices with a case that this run saw in its window: (those still unpaid, or imported by the run;
        {invoice id: what the source shows} of those no longer unpaid, from their verdict's detail)."""
        unpaid, changed = set(), {}
        # The detail only where it holds what the source shows: a run that saw tens of thousands of its cases
        # again read every one's detail here, its peak memory (a third more than the sync's own).
        for iid, detail in self._rows(
                "SELECT invoice_id, CASE WHEN detail LIKE ? THEN detail END FROM verdicts "
                "WHERE run_id=? AND account_key=? AND reason='duplicate'", ('%"at_source"%', run_id, account_key)):
            shows = json.loads(detail).get("at_source") if detail else None
            if shows:
                changed[iid] = shows
            else:
                unpaid.add(iid)
        unpaid.update(r[0] for r in self._rows(
            "SELECT invoice_id FROM ledger WHERE destination=? AND run_id=? AND account_key=? AND status='delivered'",
            (self.destination, run_id, account_key)))
        return unpaid - set(changed), changed

    def mark_checked(self, account_key: str, invoice_ids: Iterable[str]) -> None:
        now = time.time()
        rows = [(self.destination, account_key, i, now) for i in invoice_ids]
        if rows:
            self._write_many(
                "INSERT INTO case_checks (destination, account_key, invoice_id, checked_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (destination, account_key, invoice_id) DO UPDATE SET checked_at=excluded.checked_at",
                rows)

    def record_source_change(self, account_key: str, invoice_id: str, event_key: str, case_id: str | None, kind: str,
                          final: bool, detail: dict, message: str, run_id: int | None, status: str = "new") -> bool:
        """Record what the source shows; False when this very change was recorded before (nothing new)."""
        return self._write(
            "INSERT INTO source_changes (destination, account_key, invoice_id, event_key, case_id, kind, final, "
            "detail, message, status, run_id, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (destination, account_key, invoice_id, event_key) DO NOTHING",
            (self.destination, account_key, invoice_id, event_key, case_id, kind, int(final),
             json.dumps(detail, sort_keys=True), message, status, run_id, time.time())) == 1

    def untold_source_changes(self, account_key: str, limit: int = 1000) -> list[dict]:
        """Events not told yet (new, failed, or telling when a run stopped mid-post), oldest first."""
        return [self._event(r) for r in self._rows(
            "SELECT " + ", ".join(EVENT_COLUMNS) + " FROM source_changes WHERE destination=? AND account_key=? AND "
            "status IN ('new', 'telling', 'failed') ORDER BY seen_at LIMIT ?", (self.destination, account_key, limit))]

    def set_source_change(self, account_key: str, invoice_id: str, event_key: str, status: str,
                       chat_id: str | None = None, error: str | None = None) -> None:
        """Committed before the next step: `telling` before the post, `told` right after it."""
        self._write(
            "UPDATE source_changes SET status=?, chat_id=COALESCE(?, chat_id), error=?, told_at=CASE WHEN ? THEN ? "
            "ELSE told_at END WHERE destination=? AND account_key=? AND invoice_id=? AND event_key=?",
            (status, chat_id, error, status == "told", time.time(), self.destination, account_key, invoice_id,
             event_key))

    def source_changes(self, account_key: str | None = None, invoice_id: str | None = None) -> list[dict]:
        """Events of one invoice (or all), oldest first (explain, status)."""
        where, args = "destination=?", [self.destination]
        if account_key is not None:
            where, args = where + " AND account_key=?", args + [account_key]
        if invoice_id is not None:
            where, args = where + " AND invoice_id=?", args + [invoice_id]
        return [self._event(r) for r in self._rows(
            "SELECT " + ", ".join(EVENT_COLUMNS) + " FROM source_changes WHERE " + where + " ORDER BY seen_at", args)]

    def source_change_counts(self) -> dict:
        """{kind: {status: n}} of every event at this destination (status, doctor)."""
        out: dict = {}
        for kind, status, n in self._rows(
                "SELECT kind, status, COUNT(*) FROM source_changes WHERE destination=? GROUP BY kind, status",
                (self.destination,)):
            out.setdefault(kind, {})[status] = n
        return out

    # documents
    def documents_to_upload(self, account_key: str, limit: int, max_attempts: int) -> list[tuple[LedgerRow, dict | None]]:
        """Delivered cases without their document yet (never tried, unsure, or failed fewer than
        `max_attempts` times), with the document row if there is one."""
        out = []
        for r in self._rows(
                f"SELECT {_LEDGER_ROW}, " + ", ".join("d." + c for c in DOCUMENT_COLUMNS)
                + " FROM ledger l LEFT JOIN case_documents d ON d.destination=l.destination AND "
                "d.account_key=l.account_key AND d.invoice_id=l.invoice_id WHERE l.destination=? AND l.account_key=? "
                "AND l.status='delivered' AND l.case_id IS NOT NULL AND (d.status IS NULL OR d.status='uploading' OR "
                "(d.status='failed' AND d.attempts < ?)) ORDER BY COALESCE(d.attempts, 0), l.updated LIMIT ?",
                (self.destination, account_key, max_attempts, limit)):
            doc = dict(zip(DOCUMENT_COLUMNS, r[11:])) if r[11 + 3] is not None else None
            out.append((LedgerRow(*r[:11]), doc))
        return out

    def set_document(self, account_key: str, invoice_id: str, case_id: str | None, status: str, *,
                     file_name: str | None = None, content_type: str | None = None, size: int | None = None,
                     file_id: str | None = None, error: str | None = None, attempt: bool = False) -> None:
        self._write(
            "INSERT INTO case_documents (destination, account_key, invoice_id, case_id, status, file_name, "
            "content_type, size, file_id, error, attempts, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (destination, account_key, invoice_id) DO UPDATE SET case_id=excluded.case_id, "
            "status=excluded.status, file_name=COALESCE(excluded.file_name, case_documents.file_name), "
            "content_type=COALESCE(excluded.content_type, case_documents.content_type), "
            "size=COALESCE(excluded.size, case_documents.size), file_id=COALESCE(excluded.file_id, "
            "case_documents.file_id), error=excluded.error, attempts=case_documents.attempts + excluded.attempts, "
            "updated=excluded.updated",
            (self.destination, account_key, invoice_id, case_id, status, file_name, content_type, size, file_id,
             error, int(attempt), time.time()))

    def case_document(self, account_key: str, invoice_id: str) -> dict | None:
        r = self._row("SELECT " + ", ".join(DOCUMENT_COLUMNS) + " FROM case_documents WHERE destination=? AND "
                      "account_key=? AND invoice_id=?", (self.destination, account_key, invoice_id))
        return dict(zip(DOCUMENT_COLUMNS, r)) if r else None

    def document_counts(self) -> dict:
        return dict(self._rows("SELECT status, COUNT(*) FROM case_documents WHERE destination=? GROUP BY status",
                               (self.destination,)))


class Store(Connections, CaseLife, CaseEvents, Cursors):
    kind = "sqlite"
    remote = False  # a file beside the config: a lookup takes microseconds

    def __init__(self, path: Path | str, destination: str = ""):
        self.path = Path(path)
        # Beside the store: the sandbox simulators' data (runner/net/http.py), a connect flow's files.
        self.local_dir = None if str(path) == ":memory:" else self.path.parent
        # The ledger is per destination: an invoice sent to a jsonl file or to Debitura's test environment
        # has not been sent to production. Runs set this from the config (destinations.ledger_id).
        self.destination = destination
        self._reader: sqlite3.Connection | None = None
        self._lockfile = None
        self.db = None
        try:
            self._open()
        except (OSError, sqlite3.Error) as exc:
            if self.db is not None:
                self.db.close()
            raise _unusable(self.path, exc) from None

    def _open(self) -> None:
        if str(self.path) != ":memory:":
            try:
                mode = os.stat(self.path).st_mode
            except FileNotFoundError:
                mode = None
            if mode is not None and stat.S_ISDIR(mode):
                raise StateFileError(f"the state file {self.path} is a folder",
                                     fix=f"set `state:` in the config to a file in it, for example "
                                         f"{self.path / 'state.db'}")
            if mode is not None and not stat.S_ISREG(mode):
                # SQLite on /dev/null or a pipe fails later, with an error that names neither the file nor why.
                raise StateFileError(f"the state file {self.path} is not a regular file (a device, pipe or socket)",
                                     fix=FIX_PATH)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if mode is None:
                # Created 0600: the store holds OAuth tokens.
                fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
            else:
                try:
                    os.chmod(self.path, 0o600)
                except OSError:
                    pass
        # One connection, used by the engine's thread and, during a sync, by its ledger writer thread
        # (runner/engine/pipeline.py): every transaction holds self._lock. Ledger lookups have their own connection.
        self.db = connect(str(self.path))
        self._lock = threading.RLock()
        self.db.execute("PRAGMA journal_mode=WAL")
        migrate(self.db)

    def describe(self) -> str:
        """The store, as messages name it."""
        return str(self.path)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.db.close()
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self.db):
            yield self.db

    def _all(self, sql: str, args=()) -> list[tuple]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def _one(self, sql: str, args=()) -> tuple | None:
        with self._lock:
            return self.db.execute(sql, args).fetchone()

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """No transaction runs meanwhile, in any thread (for a fork: see runner/engine/workers.py). Lookups through
        the reader connection are made only by the engine's own thread, the one that forks."""
        with self._lock:
            yield

    def lock(self) -> bool:
        """Take the run lock (one apply at a time per state store). False if another run holds it."""
        import fcntl

        if str(self.path) == ":memory:":
            return True
        # Beside the real file: a second config reaching the same database through a symbolic link (or
        # another spelling of the path) must find the same lock.
        lockpath = os.path.realpath(self.path) + ".lock"
        try:
            f = open(lockpath, "a+")
        except OSError as exc:
            raise StateFileError(f"the lock file {lockpath} beside the state file cannot be created "
                                 f"({exc.strerror or exc})", fix="give the runner write access to that folder, or "
                                                                 + FIX_PATH[0].lower() + FIX_PATH[1:]) from None
        try:
            # A POSIX lock, not flock(): it is not inherited by a forked classification worker, so a run
            # killed mid-way never leaves its lock held by a child (runner/engine/workers.py).
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._lockfile = f
        self._close_abandoned()
        return True

    ABANDONED = ("its process ended without recording how the run went (killed, or the machine stopped); "
                 "everything it committed is kept, and the next apply went on from there")

    def _close_abandoned(self) -> None:
        """Under the run lock no other apply is running: one still `running` in the store lost its process
        (SIGKILL, a power cut) and would show as running for ever. It is closed as interrupted."""
        with self.tx():
            self.db.execute("UPDATE runs SET status='interrupted', finished=?, summary=json_object('run_id', id, "
                            "'mode', command, 'started', started, 'finished', ?, 'error', ?) "
                            "WHERE status='running' AND command='apply'", (time.time(), time.time(), self.ABANDONED))

    # --- runs ------------------------------------------------------------------------------------------
    def begin_run(self, command: str, config: str) -> int:
        with self.tx():
            cur = self.db.execute("INSERT INTO runs (command, config, started, status) VALUES (?, ?, ?, 'running')",
                                  (command, config, time.time()))
            return cur.lastrowid

    def prune_verdicts(self, command: str, keep_runs: int) -> int:
        """Remove the verdict rows of the `command` runs older than its latest `keep_runs` (a thousand runs at
        a time, the ones just past the kept ones: earlier ones went at earlier runs). The runs' summaries and
        the ledger stay. Returns how many rows went."""
        with self.tx():
            gone = self.db.execute(
                "DELETE FROM verdicts WHERE run_id IN (SELECT id FROM runs WHERE command=? ORDER BY id DESC "
                "LIMIT 1000 OFFSET ?)", (command, keep_runs)).rowcount
        return gone

    def trim_summaries(self, command: str, keep_runs: int) -> int:
        """Drop the per-connection part of the summaries of the `command` runs older than its latest `keep_runs`
        (a thousand at a time, as prune_verdicts): their totals, status and times stay. Nothing reads that part
        of an old run (status looks for each connection's last run among the latest 50), and it is ~0.5 KB
        per connection: 500 connections every five minutes added 72 MB a day. Returns how many runs changed
        (none with an SQLite built without its JSON functions, before 3.38: then they are kept whole)."""
        try:
            with self.tx():
                return self.db.execute(
                    "UPDATE runs SET summary = json_remove(summary, '$.connections') WHERE id IN (SELECT id FROM "
                    "runs WHERE command=? ORDER BY id DESC LIMIT 1000 OFFSET ?) AND (CASE WHEN json_valid(summary) "
                    "THEN json_type(summary, '$.connections') END) IS NOT NULL", (command, keep_runs)).rowcount
        except sqlite3.OperationalError as exc:
            if "no such function" not in str(exc):
                raise
            return 0

    def finish_run(self, run_id: int, status: str, summary: dict, keep: tuple[str, int, int] | None = None) -> None:
        """The run's end and summary; with `keep` = (command, runs, summaries), the retention of that command's
        runs after it: prune_verdicts(command, runs) and trim_summaries(command, summaries)."""
        with self.tx():
            self.db.execute("UPDATE runs SET finished=?, status=?, summary=? WHERE id=?",
                            (time.time(), status, json.dumps(summary, default=str), run_id))
        if keep is not None:
            self.prune_verdicts(keep[0], keep[1])
            self.trim_summaries(keep[0], keep[2])

    def last_runs(self, limit: int = 10) -> list[dict]:
        rows = self.db.execute("SELECT id, command, started, finished, status, summary FROM runs "
                               "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"id": r[0], "command": r[1], "started": r[2], "finished": r[3], "status": r[4],
                 "summary": json.loads(r[5]) if r[5] else None} for r in rows]

    # --- ledger ----------------------------------------------------------------------------------------
    def ledger_lookup(self, account_key: str, invoice_ids: Iterable[str]) -> dict[str, LedgerRow]:
        ids = list(invoice_ids)
        if self._reader is None and str(self.path) != ":memory:":
            # Its own connection, so a sync's lookups never wait for the ledger writer thread (WAL: a reader
            # sees every committed transaction and is never blocked by the writer). Used by one thread.
            self._reader = connect(str(self.path))
        if self._reader is not None:
            return self._lookup(self._reader, account_key, ids)
        with self._lock:
            return self._lookup(self.db, account_key, ids)

    def has_ledger(self, account_key: str) -> bool:
        """Whether the ledger has any row of this source account (for this destination)."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM ledger WHERE destination=? AND account_key=? LIMIT 1",
                                   (self.destination, account_key)).fetchone() is not None

    def adopt_account(self, account_key: str, legacy_keys: Iterable[str]) -> int:
        """Move this destination's ledger rows (and verdicts) recorded under a connection-name key, from before
        sources were keyed by the provider's account, to the account's key: the next run finds them and
        imports nothing again. A row the account already has stays as it is. Returns the rows moved."""
        moved = 0
        for old in legacy_keys:
            if old == account_key or not self.has_ledger(old):
                continue
            with self.tx() as db:
                moved += db.execute("UPDATE OR IGNORE ledger SET account_key=? WHERE destination=? AND account_key=?",
                                    (account_key, self.destination, old)).rowcount
                db.execute("DELETE FROM ledger WHERE destination=? AND account_key=?", (self.destination, old))
                db.execute("UPDATE verdicts SET account_key=? WHERE account_key=?", (account_key, old))
        return moved

    def _lookup(self, db, account_key: str, ids: list[str]) -> dict[str, LedgerRow]:
        return lookup(db, self.destination, account_key, ids)

    def rate_budget(self) -> None:
        """No budget shared with other processes: one runner syncs on an SQLite store at a time, and its own
        limiters (runner/net/http.py) hold it to the declared limits (see the PostgreSQL store's)."""
        return None

    def reader_target(self) -> tuple[str, str] | None:
        """(path, destination) for another process's ledger lookups (runner/engine/workers.py); None in memory."""
        return None if str(self.path) == ":memory:" else (str(self.path), self.destination)

    def ledger_find(self, connection: str | None, key: str) -> list[LedgerRow]:
        """Find ledger rows by invoice id or number (for explain)."""
        q = ("SELECT account_key, invoice_id, connection, number, status, idempotency_key, case_id, case_reference, "
             "error, first_seen, updated FROM ledger WHERE destination=? AND (invoice_id=? OR number=?)")
        args: list = [self.destination, key, key]
        if connection:
            q += " AND connection=?"
            args.append(connection)
        return [LedgerRow(*r) for r in self.db.execute(q, args)]

    def delivered(self, account_key: str, limit: int) -> list[LedgerRow]:
        """The newest delivered cases of one source account at this store's destination."""
        return [LedgerRow(*r) for r in self.db.execute(
            "SELECT account_key, invoice_id, connection, number, status, idempotency_key, case_id, case_reference, "
            "error, first_seen, updated FROM ledger WHERE destination=? AND account_key=? AND status='delivered' "
            "ORDER BY updated DESC, rowid DESC LIMIT ?", (self.destination, account_key, limit))]

    def mark_pending(self, rows: list[tuple]) -> None:
        """rows: (account_key, invoice_id, connection, number, idempotency_key). Committed before delivery."""
        now = time.time()
        with self.tx():
            self.db.executemany(
                "INSERT INTO ledger (destination, account_key, invoice_id, connection, number, status, "
                "idempotency_key, first_seen, updated) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) "
                "ON CONFLICT (destination, account_key, invoice_id) DO UPDATE SET status='pending', "
                "updated=excluded.updated, number=excluded.number WHERE ledger.status != 'delivered'",
                [(self.destination, a, i, c, n, k, now, now) for a, i, c, n, k in rows])

    def mark_delivered(self, rows: list[tuple], run_id: int | None = None) -> None:
        """rows: (account_key, invoice_id, case_id, case_reference), delivered by run `run_id`."""
        if not rows:
            return
        now = time.time()
        with self.tx():
            self.db.executemany(
                "UPDATE ledger SET status='delivered', case_id=?, case_reference=?, error=NULL, updated=?, run_id=? "
                "WHERE destination=? AND account_key=? AND invoice_id=?",
                [(cid, cref, now, run_id, self.destination, a, i) for a, i, cid, cref in rows])

    def mark_failed(self, rows: list[tuple]) -> None:
        """rows: (account_key, invoice_id, error). The invoice is retried by the next run."""
        now = time.time()
        with self.tx():
            self.db.executemany(
                "UPDATE ledger SET status='failed', error=?, updated=? WHERE destination=? AND account_key=? "
                "AND invoice_id=? AND status != 'delivered'", [(e, now, self.destination, a, i) for a, i, e in rows])

    def record_imported(self, rows: list[tuple], run_id: int | None) -> None:
        """rows: (account_key, invoice_id, connection, number, idempotency_key, case_id, case_reference) of
        invoices a local sink holds: delivered by run `run_id`, with no pending row before (see sink_marks)."""
        with self.tx():
            insert_imported(self.db, self.destination, rows, run_id)

    # --- local sinks -----------------------------------------------------------------------------------
    def sink_mark(self) -> tuple[int, int | None] | None:
        """The offset a run that did not finish marked in this store's local sink, and that run; or None."""
        with self._lock:
            r = self.db.execute("SELECT offset, run_id FROM sink_marks WHERE destination=?",
                                (self.destination,)).fetchone()
        return None if r is None else (r[0], r[1])

    def mark_sink(self, offset: int, run_id: int | None) -> None:
        """Committed before a run's first write to a local sink: what the file holds past `offset` may not be
        in the ledger until the run ends. An earlier mark is kept (it covers more of the file)."""
        with self.tx():
            self.db.execute("INSERT INTO sink_marks (destination, offset, run_id, at, recorded) VALUES (?, ?, ?, ?, ?) "
                            "ON CONFLICT (destination) DO NOTHING",
                            (self.destination, offset, run_id, time.time(), offset))

    def clear_sink_mark(self) -> None:
        """Everything the local sink holds is in the ledger."""
        with self.tx():
            self.db.execute("DELETE FROM sink_marks WHERE destination=?", (self.destination,))

    # --- verdicts --------------------------------------------------------------------------------------
    def record_verdicts(self, run_id: int, rows: list[tuple]) -> None:
        """rows: (connection, account_key, invoice_id, number, verdict, reason, detail_json)."""
        self.record_page(run_id, rows)

    def record_page(self, run_id: int, verdicts: list[tuple], imported: list[tuple] = (),
                    replacing: tuple[str, str, list[str]] | None = None) -> None:
        """One page's verdicts, and the invoices it wrote to a local sink (see record_imported), in one
        transaction. `replacing` (connection, account key, invoice ids): a page a worker may have recorded
        before it died, classified again by the engine: the worker's verdict rows of it in this run give way
        to these (another connection's verdicts of the same invoices stay)."""
        with self.tx():
            if replacing is not None and replacing[2]:
                connection, account_key, ids = replacing
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    self.db.execute("DELETE FROM verdicts WHERE run_id=? AND connection=? AND account_key=? AND "
                                    "invoice_id IN (%s)" % ",".join("?" * len(chunk)),
                                    (run_id, connection, account_key, *chunk))
            if imported:
                insert_imported(self.db, self.destination, imported, run_id)
            insert_verdicts(self.db, run_id, verdicts)

    def verdict_history(self, account_key: str, invoice_id: str, limit: int = 20) -> list[dict]:
        """An invoice's verdicts, newest first, its imports (into any destination) included."""
        rows = self.db.execute(
            "SELECT run_id, verdict, reason, detail, at FROM verdicts WHERE account_key=? AND invoice_id=? "
            "ORDER BY at DESC LIMIT ?", (account_key, invoice_id, limit)).fetchall()
        out = [{"run_id": r[0], "verdict": r[1], "reason": r[2], "detail": json.loads(r[3]) if r[3] else None,
                "at": r[4]} for r in rows]
        # The ledger's key starts with the destination: each of the few there are is looked up by its key.
        imported = self.db.execute(
            "WITH RECURSIVE d(x) AS (SELECT MIN(destination) FROM ledger UNION ALL "
            "SELECT (SELECT MIN(destination) FROM ledger WHERE destination > x) FROM d WHERE x IS NOT NULL) "
            "SELECT run_id, case_id, case_reference, updated FROM ledger WHERE destination IN (SELECT x FROM d) "
            f"AND account_key=? AND invoice_id=? AND {IMPORTED}", (account_key, invoice_id)).fetchall()
        out += [{"run_id": r[0], "verdict": "imported", "reason": None, "detail": imported_detail(r[1], r[2]),
                 "at": r[3]} for r in imported]
        return sorted(out, key=lambda h: h["at"], reverse=True)[:limit]

    def connection_verdicts(self, connection: str, key: str, limit: int = 20) -> list[tuple]:
        """The verdicts of one connection's invoice with id or number `key`, newest first, imported ones
        included: (run_id, account_key, invoice_id, number, verdict, reason, detail as JSON text, at)."""
        rows = self.db.execute(
            "SELECT run_id, account_key, invoice_id, number, verdict, reason, detail, at FROM verdicts "
            "WHERE connection=? AND (invoice_id=? OR number=?) ORDER BY at DESC, rowid DESC LIMIT ?",
            (connection, key, key, limit)).fetchall()
        rows += [(r[0], r[1], r[2], r[3], "imported", None, json.dumps(imported_detail(r[4], r[5])), r[6])
                 for r in self.db.execute(
            "SELECT run_id, account_key, invoice_id, number, case_id, case_reference, updated FROM ledger "
            f"WHERE connection=? AND (invoice_id=? OR number=?) AND {IMPORTED}", (connection, key, key))]
        return sorted(rows, key=lambda r: r[7], reverse=True)[:limit]

    def run_verdicts(self, run_id: int, connection: str | None = None, not_imported: bool = False,
                     limit: int = 1000) -> list[dict]:
        """A run's verdicts (with `not_imported`: only those that did not end in a case, new or existing)."""
        where, args = " WHERE run_id=?", [run_id]
        if connection:
            where += " AND connection=?"
            args.append(connection)
        rows = [{"connection": r[0], "invoice_id": r[1], "number": r[2], "verdict": r[3], "reason": r[4],
                 "detail": json.loads(r[5]) if r[5] else None} for r in self.db.execute(
            "SELECT connection, invoice_id, number, verdict, reason, detail FROM verdicts" + where +
            (" AND verdict != 'imported' AND reason IS NOT 'duplicate'" if not_imported else "") + " LIMIT ?",
            [*args, limit])]
        if not not_imported and len(rows) < limit:
            rows += [{"connection": r[0], "invoice_id": r[1], "number": r[2], "verdict": "imported", "reason": None,
                      "detail": imported_detail(r[3], r[4])} for r in self.db.execute(
                "SELECT connection, invoice_id, number, case_id, case_reference FROM ledger" + where +
                f" AND {IMPORTED} LIMIT ?", [*args, limit - len(rows)])]
        return rows

    # --- tokens ----------------------------------------------------------------------------------------
    def save_token(self, connection: str, token: dict) -> None:
        """Committed (durably) before the caller uses the token: a rotated refresh token is never lost."""
        from runner.state import crypto

        blob = crypto.encrypt(json.dumps(token))
        with self.tx():
            self.db.execute("INSERT INTO tokens (connection, token, updated) VALUES (?, ?, ?) ON CONFLICT (connection) "
                            "DO UPDATE SET token=excluded.token, updated=excluded.updated", (connection, blob, time.time()))

    @contextmanager
    def refreshing(self, connection: str) -> Iterator[tuple[dict | None, object]]:
        """Single-flight refresh: the store's write lock (BEGIN IMMEDIATE, every process) is held until the
        block ends; yields (the token as it is now, save(token)), committed when the block ends."""
        from runner.state import crypto

        def save(token: dict) -> None:
            self.db.execute("INSERT INTO tokens (connection, token, updated) VALUES (?, ?, ?) ON CONFLICT "
                            "(connection) DO UPDATE SET token=excluded.token, updated=excluded.updated",
                            (connection, crypto.encrypt(json.dumps(token)), time.time()))

        with self.tx():
            r = self.db.execute("SELECT token FROM tokens WHERE connection=?", (connection,)).fetchone()
            yield (json.loads(crypto.decrypt(r[0])) if r else None), save

    # --- inbound API keys (runner/inbound/apikeys.py) ---------------------------------------------------
    API_KEY_COLS = "id, environment, label, created, revoked, last_used"

    def add_api_key(self, key_id: str, environment: str, label: str | None, digest: str, created: float) -> bool:
        """False when the id is taken (the caller draws another)."""
        with self.tx():
            if self.db.execute("SELECT 1 FROM api_keys WHERE id=?", (key_id,)).fetchone():
                return False
            self.db.execute("INSERT INTO api_keys (id, environment, label, hash, created) VALUES (?, ?, ?, ?, ?)",
                            (key_id, environment, label, digest, created))
        return True

    def api_keys(self) -> list[tuple]:
        """(id, environment, label, created, revoked, last_used) of every key, oldest first."""
        with self._lock:
            return self.db.execute(f"SELECT {self.API_KEY_COLS} FROM api_keys ORDER BY created, id").fetchall()

    def api_key(self, key_id: str) -> tuple | None:
        """(id, environment, label, created, revoked, last_used, hash) of one key."""
        with self._lock:
            return self.db.execute(f"SELECT {self.API_KEY_COLS}, hash FROM api_keys WHERE id=?", (key_id,)).fetchone()

    def revoke_api_key(self, key_id: str, at: float) -> None:
        with self.tx():
            self.db.execute("UPDATE api_keys SET revoked=? WHERE id=? AND revoked IS NULL", (at, key_id))

    def touch_api_key(self, key_id: str, at: float) -> None:
        with self.tx():
            self.db.execute("UPDATE api_keys SET last_used=? WHERE id=?", (at, key_id))

    # --- inbound requests (runner/inbound/server.py) ----------------------------------------------------
    def inbound_request(self, connection: str, idempotency_key: str) -> tuple | None:
        """(body_hash, status, response JSON) kept under an Idempotency-Key, or None."""
        with self._lock:
            return self.db.execute("SELECT body_hash, status, response FROM inbound_requests WHERE connection=? "
                                   "AND idempotency_key=?", (connection, idempotency_key)).fetchone()

    def save_inbound_request(self, connection: str, idempotency_key: str, body_hash: str, status: int,
                             response: str) -> None:
        with self.tx():
            self.db.execute("INSERT OR REPLACE INTO inbound_requests (connection, idempotency_key, body_hash, status, "
                            "response, at) VALUES (?, ?, ?, ?, ?, ?)",
                            (connection, idempotency_key, body_hash, status, response, time.time()))

    def delivered_page(self, account_key: str, after: tuple[float, int] | None, limit: int) -> list[tuple]:
        """A page of this destination's delivered cases of one account, newest first, after the position
        `after` (updated, row): (row, updated, case_id, idempotency_key, case_reference, invoice_id, number,
        connection)."""
        sql = ("SELECT rowid, updated, case_id, idempotency_key, case_reference, invoice_id, number, connection "
               "FROM ledger WHERE destination=? AND account_key=? AND status='delivered'")
        args: list = [self.destination, account_key]
        if after is not None:
            sql += " AND (updated < ? OR (updated = ? AND rowid < ?))"
            args += [after[0], after[0], after[1]]
        with self._lock:
            return self.db.execute(sql + " ORDER BY updated DESC, rowid DESC LIMIT ?", (*args, limit)).fetchall()

    def skipped_page(self, account_key: str, before_row: int | None, limit: int) -> list[tuple]:
        """One row per invoice and skip reason (its latest verdict, duplicates left out), newest first, before
        the verdict row `before_row`: (connection, invoice_id, number, reason, detail, at, row)."""
        having = "HAVING r < ? " if before_row is not None else ""
        with self._lock:
            return self.db.execute(
                "SELECT connection, invoice_id, number, reason, detail, at, MAX(rowid) AS r FROM verdicts "
                "WHERE account_key=? AND verdict='skipped' AND reason IS NOT 'duplicate' "
                f"GROUP BY invoice_id, reason {having}ORDER BY r DESC LIMIT ?",
                (account_key, *([before_row] if before_row is not None else []), limit)).fetchall()
