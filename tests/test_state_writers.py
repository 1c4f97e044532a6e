"""Writers of one state store take turns on a lock that wakes the next one at once (runner/state/sqlite.py)."""
from __future__ import annotations

import fcntl
import os
import threading

from runner.state import sqlite as state


def _held(path: str) -> bool:
    """Whether some writer holds the store's write lock now (tried from a descriptor of our own)."""
    fd = os.open(path + "-writing", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_write_transaction_holds_the_stores_write_lock_and_the_next_writer_waits_for_it(tmp_path):
    path = str(tmp_path / "state.db")
    store = state.Store(path, "jsonl:out")
    other = state.connect(path)
    order: list[str] = []
    inside = threading.Event()
    try:
        with state.transaction(store.db):
            assert _held(path)
            # Another writer (a classification worker, the ledger thread) blocks on the lock, not on SQLite
            # polling the database every few milliseconds.
            t = threading.Thread(target=lambda: (order.append("waiting"), _write(other, inside, order)))
            t.start()
            while not order:
                pass
            assert not inside.wait(0.2)  # still waiting while this transaction runs
            order.append("first commits")
        t.join(5)
        assert order == ["waiting", "first commits", "second writes"]
        assert not _held(path)  # released after each transaction, the failed ones too
        try:
            with state.transaction(store.db):
                raise RuntimeError("a page that could not be recorded")
        except RuntimeError:
            pass
        assert not _held(path)
        assert store.db.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    finally:
        other.close()
        store.close()


def _write(db, inside: threading.Event, order: list[str]) -> None:
    with state.transaction(db):
        inside.set()
        order.append("second writes")
        db.execute("INSERT INTO runs (command, config, started, status) VALUES ('apply', 'c.yaml', 0, 'ok')")


def test_a_store_in_memory_has_no_lock_file_and_still_writes():
    store = state.Store(":memory:", "jsonl:out")
    try:
        run_id = store.begin_run("apply", "config.yaml")
        assert run_id == 1
    finally:
        store.close()
