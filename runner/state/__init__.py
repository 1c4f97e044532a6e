"""The state store: the ledger, verdicts, runs, connection health, OAuth tokens, inbound keys.

Two backends with one surface: SQLite (runner/state/sqlite.py, a file beside the config: the default, no
server needed) and PostgreSQL (runner/state/postgres.py, for runners whose disk does not last: a CI job, a
container, several machines on one ledger). `open_store` picks one from a config or a URL/path; the
functions below are what a forked classification worker (runner/engine/workers.py) calls on the connection
it opens itself from `Store.reader_target()`, whichever backend that is.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from runner.state import sqlite
from runner.state.sqlite import IMPORTED, RECENT_RUNS, LedgerRow, StateFileError  # noqa: F401

SERVER_SCHEMES = ("postgresql://", "postgres://")


def is_url(target) -> bool:
    """Whether `target` names a PostgreSQL server rather than an SQLite file."""
    return isinstance(target, str) and target.strip().lower().startswith(SERVER_SCHEMES)


def safe_url(url: str) -> str:
    """A PostgreSQL URL as messages show it: the password (in the authority or the query) left out."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "postgresql://(a URL that cannot be read)"


def open_store(target, destination: str = "", *, local_dir: Path | None = None):
    """The store a config names (`state:`), or the one at a URL (postgresql://...) or SQLite path.

    `destination`: the ledger id of the destination (runner/engine/destinations.ledger_id). A URL opens a
    PostgreSQL store; its schema is migrated at open, as an SQLite file's is."""
    if hasattr(target, "state_path"):  # a loaded Config
        url = getattr(target, "state_url", None)
        if url is None:
            return sqlite.Store(target.state_path, destination=destination)
        target, local_dir = url, target.state_path.parent
    if is_url(target):
        from runner.state import postgres

        return postgres.Store(target, destination=destination, local_dir=local_dir)
    return sqlite.Store(target, destination=destination)


# --- for forked workers: one connection of their own, either backend -----------------------------------------

def connect(target: str):
    """A connection of this process's own to the store at `target` (Store.reader_target()[0])."""
    if is_url(target):
        from runner.state import postgres

        return postgres.connect(target)
    return sqlite.connect(target)


def alive(db) -> bool:
    """Whether a connection of connect()'s still answers (a PostgreSQL server may have closed it since)."""
    if _backend(db) is sqlite:
        return True
    from runner.state import postgres

    return postgres.alive(db)


async def off_loop(store, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, a call of `store`'s, from async code: a remote store's (PostgreSQL) in a thread,
    so its wait for the server holds no event loop (the one every connection of a run, and every sync of a
    `runner worker`, shares); an SQLite store's right here (microseconds, and one writer at a time)."""
    if getattr(store, "remote", False):
        import asyncio

        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _backend(db):
    if isinstance(db, sqlite.sqlite3.Connection):
        return sqlite
    from runner.state import postgres

    return postgres


def lookup(db, destination: str, account_key: str, ids: list[str]) -> dict[str, LedgerRow]:
    """The ledger rows of these invoices of one source account, by invoice id (a few queries per page)."""
    return _backend(db).lookup(db, destination, account_key, ids)


@contextmanager
def transaction(db) -> Iterator:
    """A write transaction on a worker's connection (committed at the end, rolled back on an exception)."""
    with _backend(db).transaction(db) as tx:
        yield tx


def record_written(db, destination: str, run_id: int, imported: list[tuple], length: int | None,
                   verdicts: list[tuple]) -> None:
    """A page a worker wrote to a local sink, recorded atomically: the ledger rows of what it wrote
    (insert_imported's, as delivered by `run_id`), the sink recorded up to `length` (None: unchanged), and
    the page's verdict rows."""
    _backend(db).record_written(db, destination, run_id, imported, length, verdicts)


def record_verdicts(db, run_id: int, rows: list[tuple]) -> None:
    """Verdict rows (insert_verdicts's), recorded atomically on their own."""
    _backend(db).record_verdicts(db, run_id, rows)


def sink_lookup(db, destination: str, account_key: str,
                ids: list[str]) -> tuple[tuple[int, int | None] | None, dict[str, LedgerRow]]:
    """sink_recorded's mark and these invoices' ledger rows: what a writer reads under a local sink's lock
    through an SQLite store (see localsink.write_page)."""
    return _backend(db).sink_lookup(db, destination, account_key, ids)


def records_first(db) -> bool:
    """Whether writers of a local sink through this connection record each page before writing it, in one
    round trip (PostgreSQL: claim_written, sink_state, settle_sink); else they look it up, write it and
    record it (SQLite, one run at a time)."""
    return _backend(db) is not sqlite


def claim_written(db, destination: str, run_id: int, imported: list[tuple], at: int, length: int,
                  verdicts: list[tuple], upsert: bool = False) -> str:
    return _backend(db).claim_written(db, destination, run_id, imported, at, length, verdicts, upsert)


def sink_state(db, destination: str) -> tuple | None:
    return _backend(db).sink_state(db, destination)


def settle_sink(db, destination: str, length: int, undo, imported: list[tuple], run_id: int | None) -> None:
    _backend(db).settle_sink(db, destination, length, undo, imported, run_id)

