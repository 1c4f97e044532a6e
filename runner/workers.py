"""Classification in a second process, so a large sync uses a second core.

Mapping and checking invoices (runner/classify.py) is pure CPU and about half of a large sync; fetching
pages, the ledger and deliveries are the other half. With a worker, the engine hands each page after a
connection's first to one forked process and goes on fetching the next page and recording the last one
while that page is classified. Verdicts come back in page order, as plain tuples.

The worker is forked (it inherits the loaded config and compiled specs; nothing is re-read or re-compiled),
only on Linux and a machine with more than one core, and only once a connection has
more than one page: a small sync never starts it. RUNNER_WORKERS=0 keeps everything in one process. If the
worker dies, its pages are classified in the engine's own process: a run never depends on it.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import date
from typing import Any, Callable

import orjson
from loguru import logger

from runner.classify import ELIGIBLE, Classifier, Verdict
from runner.config import Connection
from runner.destinations import idempotency_key

# Set in the engine's process before the worker forks; the worker reads its connections from here.
_CONNECTIONS: dict[str, Connection] = {}
_classifiers: dict[tuple, Classifier] = {}
_encode: Callable[[dict, str], bytes] | None = None  # a local sink's encoder, when the run delivers to one
_engine_pid = os.getpid()


def _classify_page(name: str, account_id: str | None, account_key: str, today: str, payload: Any) -> list[tuple]:
    """Runs in the worker: one page of records (JSON bytes, or the list itself) to verdict tuples. For a
    local sink, an eligible invoice comes back already encoded (with its derived idempotency key) instead of
    as a dict: less to copy between the processes, and less work for the engine's."""
    key = (name, account_id, today)
    classifier = _classifiers.get(key)
    if classifier is None:
        classifier = _classifiers[key] = Classifier(_CONNECTIONS[name], account_id, date.fromisoformat(today))
    records = orjson.loads(payload) if isinstance(payload, bytes) else payload
    out = []
    for v in map(classifier.evaluate, records):
        if _encode is not None and v.verdict == ELIGIBLE:
            line = _encode(v.invoice, idempotency_key(account_key, v.invoice_id))
            out.append((v.invoice_id, v.number, v.verdict, v.reason, v.message, v.detail, None, line))
        else:
            out.append((v.invoice_id, v.number, v.verdict, v.reason, v.message, v.detail, v.invoice))
    return out


def _worker_start() -> None:
    """In the worker, first thing: die with the engine (Linux), never outlive a killed run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != _engine_pid:  # the engine died before prctl took effect
        os._exit(1)


def _wanted() -> bool:
    setting = os.environ.get("RUNNER_WORKERS", "").strip()
    if setting == "0":
        return False
    # Linux only: fork is safe there for a child that only computes; macOS frameworks are not fork-safe.
    return sys.platform.startswith("linux") and (os.cpu_count() or 1) > 1


class Workers:
    """Classifies pages for the connections of one run, in a worker process when that helps."""

    def __init__(self, connections: list[Connection], destination=None):
        global _encode
        self.enabled = _wanted()
        self._pool: ProcessPoolExecutor | None = None
        self._names = {c.name for c in connections}
        if self.enabled:
            _CONNECTIONS.update({c.name: c for c in connections})
            _encode = destination.encode if hasattr(destination, "write_many") else None

    def classify(self, source, records: list, page: int) -> asyncio.Future | list[Verdict]:
        """The verdicts of one page: a list (classified here) or a future of one (classified by the worker)."""
        # A connection's first page stays here unless the worker runs already: a one-page sync never forks.
        if not (self.enabled and (page > 1 or self._pool is not None) and records and source.conn.name in self._names):
            return [source.evaluate(r) for r in records]
        try:
            payload: Any = orjson.dumps(records)
        except TypeError:  # something orjson cannot write (never from a JSON answer): the list itself
            payload = records
        try:
            pool = self._start()
            cf = pool.submit(_classify_page, source.conn.name, source.account_id, source.account_key,
                             source.today_iso, payload)
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            return self._fallback(source, records, exc)
        future = asyncio.get_running_loop().create_future()

        def done(f) -> None:
            future.get_loop().call_soon_threadsafe(self._settle, future, f, source, records)

        cf.add_done_callback(done)
        return future

    def _settle(self, future: asyncio.Future, cf, source, records: list) -> None:
        if future.done():
            return
        exc = cf.exception()
        if exc is None:
            future.set_result([Verdict(*t) for t in cf.result()])
        else:
            future.set_result(self._fallback(source, records, exc))

    def _fallback(self, source, records: list, exc: BaseException) -> list[Verdict]:
        logger.debug("classifying in the engine's process: the worker failed ({}: {})", type(exc).__name__, exc)
        self.enabled = False
        return [source.evaluate(r) for r in records]

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            global _engine_pid
            _engine_pid = os.getpid()
            # The worker is a copy of this process: anything still buffered would be written twice.
            sys.stdout.flush()
            sys.stderr.flush()
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_worker_start)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for name in self._names:
            _CONNECTIONS.pop(name, None)
        global _encode
        _encode = None
