"""Classification in a second process, so a large sync uses a second core.

Mapping and checking invoices (runner/classify.py) is pure CPU and about half of a large sync; fetching
pages, the ledger and deliveries are the other half. With a worker, the engine hands each page after a
connection's first to one forked process (the provider's answer as it came, when the records are all of
it) and goes on fetching the next pages and delivering the earlier ones while that page is classified.
The engine does not decode a page it hands over: the worker decodes it and first sends back what the
engine's paginator needs (the record count, the cursor or next link, `more`: pagination.PageFacts), so
the engine asks for the next page while this one is classified; a page the worker cannot decode is
decoded by the engine, which then reports the problem as it would have. The worker looks the page's
invoices up in the ledger itself (its own SQLite connection), records the
verdicts that end with it (every skipped invoice) and sends back only the eligible invoices, as plain
tuples, with a tally of the rest. Answers come back in page order over a socket pair read by the event
loop, so the engine needs no threads to talk to it.

The worker is forked (it inherits the loaded config and compiled specs; nothing is re-read or re-compiled),
only on Linux and a machine with more than one core, and only once a connection has
more than one page: a small sync never starts it. RUNNER_WORKERS=0 keeps everything in one process. If the
worker dies, its pages are classified in the engine's own process: a run never depends on it.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import multiprocessing
import os
import pickle
import socket
import sqlite3
import struct
import sys
from datetime import date
from typing import Any, Callable

import orjson
from loguru import logger

from runner import pagination, state
from runner.classify import ELIGIBLE, Classifier, Tally, Verdict, classify_page, detail_json, tally
from runner.config import Connection
from runner.destinations import idempotency_key

# Set in the engine's process before the worker forks; the worker reads its connections from here.
_CONNECTIONS: dict[str, Connection] = {}
_classifiers: dict[tuple, Classifier] = {}
_encode: Callable[[dict, str], bytes] | None = None  # a local sink's encoder, when the run delivers to one
_ledger: tuple[str, str] | None = None  # (state store path, destination id): where the worker looks invoices up
_db: sqlite3.Connection | None = None  # the worker's own connection to the store, opened in the worker
_engine_pid = os.getpid()


def _store() -> sqlite3.Connection:
    """In the worker: its own connection to the state store (WAL: it sees every transaction the engine has
    committed; its reads never block the engine, and its writes take turns with the engine's)."""
    global _db
    if _db is None:
        _db = state.connect(_ledger[0])
    return _db


def _classify_page(name: str, account_id: str | None, account_key: str, today: str, payload: Any,
                   is_answer: bool, dedupe: bool, run_id: int | None) -> tuple[list[tuple], Tally | None]:
    """Runs in the worker: one page (the provider's answer as bytes, the records as JSON bytes, or the list
    itself) to verdicts, invoices already imported looked up in the ledger first.

    With a `run_id`, the verdicts that end here (every one but the eligible) are recorded in the store by the
    worker and come back only as a Tally; the eligible ones come back as tuples, for the engine to deliver.
    For a local sink, an eligible invoice comes back already encoded (with its derived idempotency key)
    instead of as a dict: less to copy between the processes, and less work for the engine's."""
    key = (name, account_id, today)
    classifier = _classifiers.get(key)
    if classifier is None:
        classifier = _classifiers[key] = Classifier(_CONNECTIONS[name], account_id, date.fromisoformat(today))
    records = orjson.loads(payload) if isinstance(payload, bytes) else payload
    if is_answer:
        records = classifier.stream.page_records(records)
    lookup = None
    if dedupe and _ledger is not None:
        db, destination = _store(), _ledger[1]
        lookup = lambda ids: state.lookup(db, destination, account_key, ids)  # noqa: E731
    verdicts = classify_page(classifier, records, lookup)
    counted = None
    if run_id is not None and _ledger is not None:
        ended = [v for v in verdicts if v.verdict != ELIGIBLE]
        if ended:
            with state.transaction(_store()) as db:
                state.insert_verdicts(db, run_id, [(name, account_key, v.invoice_id, v.number, v.verdict, v.reason,
                                                    detail_json(v)) for v in ended])
            verdicts = [v for v in verdicts if v.verdict == ELIGIBLE]
        counted = Tally()
        tally(counted, ended)
    out = []
    for v in verdicts:
        if _encode is not None and v.verdict == ELIGIBLE:
            key = idempotency_key(account_key, v.invoice_id)
            out.append((v.invoice_id, v.number, v.verdict, v.reason, v.message, v.detail, None, _encode(v.invoice, key),
                        key))
        else:
            out.append((v.invoice_id, v.number, v.verdict, v.reason, v.message, v.detail, v.invoice))
    return out, counted


def _page_facts(name: str, payload: bytes) -> tuple[list, pagination.PageFacts]:
    """Runs in the worker: decode a provider's answer, its records and what the engine's paginator needs.
    Anything unexpected raises: the engine then decodes the page itself and reports it in its own words."""
    stream = _CONNECTIONS[name].spec.invoices
    body = orjson.loads(payload)
    records = stream.page_records(body)
    return records, pagination.facts(stream.paginate, body, records)


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


class WorkerGone(Exception):
    """The worker process ended (killed, crashed) with pages still unanswered."""


class _Channel(asyncio.Protocol):
    """The engine's end of the socket to the worker: pickled frames, each prefixed by its length. The worker
    answers one page at a time, in the order asked, so answers are matched to questions first in, first out.
    Everything runs on the event loop: no feeder or result threads competing with it for the GIL."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.buffer = bytearray()
        self.lost: BaseException | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def ask(self, question: tuple, answers: int = 1) -> list[asyncio.Future]:
        """Send a question; a future for each of the answers it gets (they come in order)."""
        if self.lost is not None:
            raise WorkerGone(str(self.lost))
        frame = pickle.dumps(question, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_HEADER.pack(len(frame)) + frame)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(answers)]
        self.waiting.extend(futures)
        return futures

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while len(buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf)
            end = _HEADER.size + size
            if len(buf) < end:
                return
            ok, value = pickle.loads(memoryview(buf)[_HEADER.size:end])
            del buf[:end]
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

    def connection_lost(self, exc) -> None:
        self.lost = exc or WorkerGone("the worker closed its end")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(WorkerGone(f"the worker ended: {self.lost}"))


_HEADER = struct.Struct("!I")


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _send(sock: socket.socket, answer: tuple) -> None:
    try:
        frame = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an exception that cannot be pickled
        frame = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
    sock.sendall(_HEADER.pack(len(frame)) + frame)


def _serve(sock: socket.socket) -> None:
    """The worker's loop: read a page, answer it, until the engine closes its end. A question that asks
    for the page's facts first (see Workers.submit) gets two answers: the facts, then the verdicts."""
    _worker_start()
    while True:
        header = _read_exactly(sock, _HEADER.size)
        if header is None:
            return
        question = _read_exactly(sock, _HEADER.unpack(header)[0])
        if question is None:
            return
        try:
            *args, facts_first = pickle.loads(question)
            if facts_first:
                try:
                    records, facts = _page_facts(args[0], args[4])
                except Exception as exc:  # the engine decodes this page itself: both answers say so
                    _send(sock, (False, exc))
                    _send(sock, (False, exc))
                    continue
                _send(sock, (True, facts))
                args[4], args[5] = records, False
            answer = (True, _classify_page(*args))
        except Exception as exc:  # sent back: the engine classifies that page itself
            answer = (False, exc)
        _send(sock, answer)


class Workers:
    """Classifies pages for the connections of one run, in a worker process when that helps."""

    def __init__(self, connections: list[Connection], destination=None, store=None):
        global _encode, _ledger
        self.enabled = _wanted()
        self._process = None
        self._socket: socket.socket | None = None
        self._channel: asyncio.Task | None = None  # connects the engine's end of the socket, once
        self._names = {c.name for c in connections}
        if self.enabled:
            _CONNECTIONS.update({c.name: c for c in connections})
            _encode = destination.encode if hasattr(destination, "write_many") else None
            _ledger = store.reader_target() if store is not None else None

    def _takes(self, source, store, page: int) -> bool:
        # A connection's first page stays here unless the worker runs already: a one-page sync never forks.
        # A store the worker cannot open (in memory) keeps the lookups here too.
        return (self.enabled and (page > 1 or self._process is not None) and source.conn.name in self._names
                and (store is None or _ledger is not None))

    async def submit(self, source, store, answer: bytes, page: int, run_id: int | None = None):
        """Hand the worker a provider's answer as it came, undecoded. Returns (a future of its PageFacts, a
        future of what `classify` returns), or None when this page is the engine's to decode. If the facts
        future fails, the page is the engine's after all (and the second future is cancelled)."""
        if not self._takes(source, store, page):
            return None
        question = (source.conn.name, source.account_id, source.account_key, source.today_iso, answer, True,
                    store is not None, run_id if store is not None else None, True)
        try:
            self._start(store)
            channel = await self._channel
            facts, verdicts = channel.ask(question, answers=2)
        except Exception as exc:  # the worker cannot start or has ended: this page and the rest stay here
            self._gone(exc)
            return None
        classified = asyncio.ensure_future(self._answered(verdicts, question, source, store, None))

        def check(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                classified.cancel()
                verdicts.add_done_callback(lambda v: v.cancelled() or v.exception())  # retrieved: no warning
                if not f.cancelled() and isinstance(f.exception(), WorkerGone):
                    self._gone(f.exception())

        facts.add_done_callback(check)
        return facts, classified

    def _gone(self, exc: BaseException | None) -> None:
        logger.debug("classifying in the engine's process: the worker failed ({})", exc)
        self.enabled = False

    def classify(self, source, store, records: list, answer: bytes | None, page: int, run_id: int | None = None):
        """One page's verdicts (see classify_page) and, when the worker recorded the verdicts that end there
        (with a `run_id`: see _classify_page), their Tally; else None. Returns that pair, or a future of it.
        `answer`: the provider's answer the records came from, when they are all of it."""
        if not (records and self._takes(source, store, page)):
            return self.here(source, store, records), None
        payload: Any = answer
        if payload is None:
            try:
                payload = orjson.dumps(records)
            except TypeError:  # something orjson cannot write (never from a JSON answer): the list itself
                payload = records
        question = (source.conn.name, source.account_id, source.account_key, source.today_iso, payload,
                    answer is not None, store is not None, run_id if store is not None else None, False)
        try:
            self._start(store)
        except OSError as exc:
            return self._fallback(source, store, records, exc), None
        # While the worker has the page, the engine keeps only what it sent (the answer's bytes are a tenth
        # of the parsed records): with many connections, many pages are in flight.
        return asyncio.ensure_future(self._ask(question, source, store, records if answer is None else None))

    async def _ask(self, question: tuple, source, store, records: list | None) -> tuple[list[Verdict], Tally | None]:
        try:
            channel = await self._channel
            (answer,) = channel.ask(question)
        except Exception as exc:  # the worker has ended: the engine classifies the page
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(exc)
        return await self._answered(answer, question, source, store, records)

    async def _answered(self, answer: asyncio.Future, question: tuple, source, store,
                        records: list | None) -> tuple[list[Verdict], Tally | None]:
        try:
            tuples, counted = await answer
        except Exception as exc:  # the worker died or failed on this page: the engine classifies it
            if records is None:
                records = source.stream.page_records(orjson.loads(question[4]))
            return self._fallback(source, store, records, exc), None
        return [Verdict(*t) for t in tuples], counted

    @staticmethod
    def here(source, store, records: list) -> list[Verdict]:
        """A page classified in the engine's process."""
        lookup = None if store is None else functools.partial(store.ledger_lookup, source.account_key)
        return classify_page(source.classifier(), records, lookup)

    def _fallback(self, source, store, records: list, exc: BaseException) -> list[Verdict]:
        self._gone(exc)
        return self.here(source, store, records)

    def _start(self, store=None) -> None:
        if self._process is not None:
            return
        global _engine_pid
        _engine_pid = os.getpid()
        # The worker is a copy of this process: anything still buffered would be written twice.
        sys.stdout.flush()
        sys.stderr.flush()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in (mine, theirs):
            # Room for many pages in the kernel (capped by net.core.wmem_max): a page that does not fit is
            # copied into asyncio's own buffer instead, which is then shifted on every partial send.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        process = multiprocessing.get_context("fork").Process(target=_serve, args=(theirs,), daemon=True,
                                                              name="runner-worker")
        # SQLite keeps a process's locks in its memory: forked while the ledger thread is inside a
        # transaction, the worker would believe that lock held forever and wait on it.
        with store.quiet() if store is not None else contextlib.nullcontext():
            process.start()
        theirs.close()
        self._process, self._socket = process, mine
        loop = asyncio.get_running_loop()
        self._channel = loop.create_task(self._connect(loop, mine))

    @staticmethod
    async def _connect(loop, sock: socket.socket) -> _Channel:
        _, channel = await loop.create_unix_connection(_Channel, sock=sock)
        return channel

    def close(self) -> None:
        if self._channel is not None:
            self._channel.cancel()  # a no-op once connected
            if self._channel.done() and not self._channel.cancelled() and self._channel.exception() is None:
                transport = self._channel.result().transport
                if transport is not None:
                    transport.close()
            self._channel = None
        if self._socket is not None:
            try:  # now, not on the event loop's next turn: the worker reads the end of its input and exits
                self._socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._socket = None
        if self._process is not None:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None
        for name in self._names:
            _CONNECTIONS.pop(name, None)
        global _encode, _ledger
        _encode = _ledger = None
