"""Classification (and, for a local sink, delivery) in worker processes, so a large sync uses every core.

Mapping and checking invoices (runner/engine/classify.py) is pure CPU and most of a large sync; fetching pages is
the rest. With workers, the engine hands each page of a connection that has more than one to a forked
process (the provider's answer as it came, when the records are all of it), to the one with the fewest
pages still to answer, and goes on fetching while the page is classified. Each worker looks the page's
invoices up in the ledger itself (its own connection to the store) and records the verdicts that end with it
(every skipped invoice). For a run that delivers to a local sink (a jsonl file), the worker also writes
the page's eligible invoices to the file and records them with the page's verdicts (see _deliver), under
the file's lock and the run's mark of the file: the invoices never travel back to the engine. Otherwise
it sends back the eligible invoices, as plain tuples, with a tally of the rest. Answers come back in
order over a socket pair per worker, read by the event loop, so the engine needs no threads to talk to
them; the engine finishes the pages in the order it fetched them.

The engine does not decode a page it hands over: it reads only what its paginator needs from the answer's
bytes (the record count, the cursor or next link, `more`: pagination.facts_reader), sends the next request
at once, and the worker decodes the page. An answer that reader cannot read (not JSON, say) is decoded by
the engine, which reports the problem in its own words; so is a page the worker fails on.

Workers are forked (they inherit the loaded config and compiled specs; nothing is re-read or re-compiled),
only on Linux and a machine with more than one core (one per core, up to four, or RUNNER_WORKERS=N), and
only once a connection has more than one page: a small sync never starts them. RUNNER_WORKERS=0 keeps
everything in one process. If a worker dies or fails, the pages still with the others are settled, what
it wrote to a local sink without recording it is recorded, and the engine classifies and delivers the
rest itself: a run never depends on them.
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
import stat
import struct
import sys
from dataclasses import dataclass
from datetime import date
from typing import Any, Callable

import orjson
from loguru import logger

from runner import state
from runner.engine import localsink
from runner.engine.classify import ELIGIBLE, Classifier, Tally, Verdict, classify_page, tally, verdict_rows
from runner.spec.config import Connection
from runner.engine.destinations import idempotency_key, idempotency_keys

# Set in the engine's process before the worker forks; the worker reads its connections from here.
_CONNECTIONS: dict[str, Connection] = {}
_classifiers: dict[tuple, Classifier] = {}
_encode: Callable[[dict, str], bytes] | None = None  # a local sink's encoder, when the run delivers to one
_sink = None  # that local sink (destinations.JsonlDestination), for pages the worker delivers itself
_own_sink = None  # in the worker: its copy of _sink, with a file handle of its own
_ledger: tuple[str, str] | None = None  # (state store path or URL, destination id): where the worker looks invoices up
_db = None  # the worker's own connection to the store (SQLite or PostgreSQL), opened in the worker
_engine_pid = os.getpid()


def _store():
    """In the worker: its own connection to the state store (WAL: it sees every transaction the engine has
    committed; its reads never block the engine, and its writes take turns with the engine's)."""
    global _db
    if _db is not None and not state.alive(_db):  # the server closed it (a restart, a failover): a new one
        _db.close()
        _db = None
    if _db is None:
        _db = state.connect(_ledger[0])
    return _db


def _classify_page(name: str, account_id: str | None, account_key: str, today: str, payload: Any,
                   is_answer: bool, dedupe: bool, run_id: int | None,
                   deliver: bool = False) -> tuple[list[tuple], Tally | None]:
    """Runs in the worker: one page (the provider's answer as bytes, the records as JSON bytes, or the list
    itself) to verdicts, invoices already imported looked up in the ledger first.

    With a `run_id`, the verdicts that end here (every one but the eligible) are recorded in the store by the
    worker and come back only as a Tally; the eligible ones come back as tuples, for the engine to deliver.
    For a local sink, an eligible invoice comes back already encoded (with its derived idempotency key)
    instead of as a dict: less to copy between the processes, and less work for the engine's.

    With `deliver` (a run delivering to a local sink), the worker also writes the eligible invoices to the
    sink and records the whole page (see _deliver): only the page's Tally goes back."""
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
    if deliver:  # the engine asks only when the worker can (Workers._delivers)
        return [], _deliver(name, account_key, run_id, verdicts)
    if run_id is not None and _ledger is not None:
        ended = [v for v in verdicts if v.verdict != ELIGIBLE]
        if ended:
            state.record_verdicts(_store(), run_id, verdict_rows(name, account_key, ended))
            verdicts = [v for v in verdicts if v.verdict == ELIGIBLE]
        counted = Tally()
        tally(counted, ended)
    out = []
    for v in verdicts:
        if _encode is not None and v.verdict == ELIGIBLE:
            key = idempotency_key(account_key, v.invoice_id)
            out.append((v.invoice_id, v.number, v.verdict, v.reason, v.message, v.detail, None, _encode(v.invoice, key),
                        key, v.link))
        elif v.link:  # Verdict's fields in order; the document link last (classify.Verdict.link)
            out.append((v.invoice_id, v.number, v.verdict, v.reason, v.message, v.detail, v.invoice, None, None, v.link))
        else:
            out.append((v.invoice_id, v.number, v.verdict, v.reason, v.message, v.detail, v.invoice))
    return out, counted


def _deliver(name: str, account_key: str, run_id: int, verdicts: list[Verdict]) -> Tally:
    """In the worker: write a page's eligible invoices to the local sink and record the page (the ledger
    rows of what was written, and every verdict) in one transaction: what the engine does with a page it
    delivers (pipeline._deliver_page), without sending the invoices back to it. In a turn at the file
    (runner/engine/localsink.py): another worker may have delivered one of these invoices (on a page of its
    own) since this page was classified, and a crash between the write and the record is made good by the
    next writer, under the run's mark of the file (committed before such a page is handed over)."""
    global _own_sink
    if _own_sink is None:
        _own_sink = _sink.copy()
    db, destination = _store(), _ledger[1]
    eligible = [v for v in verdicts if v.verdict == ELIGIBLE]
    ended = verdict_rows(name, account_key, [v for v in verdicts if v.verdict != ELIGIBLE])
    if eligible:
        # Encoded before the lock (the other workers wait for it): each with the key derived from its
        # account and id, which is the one written unless the ledger keeps another (see to_deliver).
        lines, encode = {}, _own_sink.encode
        for v, key in zip(eligible, idempotency_keys(account_key, [v.invoice_id for v in eligible])):
            v.key = key
            lines[v.invoice_id] = encode(v.invoice, key)
        localsink.write_page(lambda: contextlib.nullcontext(db), state.records_first(db), _own_sink, destination,
                             name, account_key, run_id, eligible, lines, ended)
    else:  # nothing to write (a second run: every invoice a duplicate): the file is not touched
        state.record_verdicts(db, run_id, ended)
    counted = Tally()
    tally(counted, verdicts)
    return counted


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
    import signal

    # Ctrl-C reaches every process of the terminal's group, and a service manager's SIGTERM every process of
    # the unit: the engine decides how the run stops (finishing its pages, with these workers) and closes
    # their sockets at the end; a worker stopped on its own would print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The engine's fetching is one chain of requests that feeds every worker: when the cores are all busy,
    # the scheduler runs it first, and the workers take the rest.
    with contextlib.suppress(OSError):
        os.nice(5)


def _wanted() -> bool:
    setting = os.environ.get("RUNNER_WORKERS", "").strip()
    if setting == "0":
        return False
    # Linux only: fork is safe there for a child that only computes; macOS frameworks are not fork-safe.
    return sys.platform.startswith("linux") and (os.cpu_count() or 1) > 1


def _count(default: int | None = None) -> int:
    """How many workers a large sync forks: RUNNER_WORKERS, else `default`, else one per core. The engine
    itself mostly waits for answers (fetching, bookkeeping), so with two cores two workers keep both busy."""
    setting = os.environ.get("RUNNER_WORKERS", "").strip()
    if setting.isdigit() and int(setting) > 0:
        return min(int(setting), 16)
    return default or max(1, min(os.cpu_count() or 1, 4))


@dataclass
class _Worker:
    process: Any  # multiprocessing.Process
    socket: socket.socket  # the engine's end
    channel: asyncio.Task  # of the _Channel on that socket, connected on the event loop


class WorkerGone(Exception):
    """The worker process ended (killed, crashed) with pages still unanswered."""


FAILED_PAGES = 3  # a classification process that fails this many pages in a row is given up


class PageFailed(Exception):
    """The worker could not classify a page (its cause: what it raised) and goes on with the next."""


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

    def ask(self, question: tuple) -> asyncio.Future:
        """Send a question; a future of its answer."""
        if self.lost is not None:
            raise WorkerGone(str(self.lost))
        frame = pickle.dumps(question, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(_HEADER.pack(len(frame)) + frame)
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return future

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
                if ok:
                    future.set_result(value)
                else:
                    failed = PageFailed(str(value))
                    failed.__cause__ = value
                    future.set_exception(failed)

    def connection_lost(self, exc) -> None:
        self.lost = exc or WorkerGone("the worker closed its end")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(WorkerGone(f"the worker ended: {self.lost}"))


_HEADER = struct.Struct("!I")


def _read_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)  # read into, and unpickled from, as it is: a page is not copied once more
    with memoryview(buf) as view:
        got = 0
        while got < n:
            k = sock.recv_into(view[got:])
            if k == 0:
                return None
            got += k
    return buf


def _send(sock: socket.socket, answer: tuple) -> None:
    try:
        frame = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an exception that cannot be pickled
        frame = pickle.dumps((False, RuntimeError(f"{type(exc).__name__}: {exc}")))
    sock.sendall(_HEADER.pack(len(frame)) + frame)


def _close_inherited_sockets(keep: int) -> None:
    """Let go of the engine's sockets this copy of it holds (its connections to the providers and the
    destination, its event loop's): a connection the engine closes must not stay open in a worker until the
    run ends. Each descriptor is pointed at /dev/null rather than closed: a Python object of the engine's
    that still owns the number may close it when collected, and must not close a file the worker opened
    under a reused number. Files stay as they are: the worker never uses the engine's."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: they go when the worker exits
        return
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            if fd in (keep, null) or fd < 3:
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
            except OSError:  # the listing's own descriptor, gone already
                pass
    finally:
        os.close(null)


def _serve(sock: socket.socket, others: list[socket.socket] = ()) -> None:
    """The worker's loop: read a page, answer it, until the engine closes its end. `others`: the sockets
    of the other workers this one inherited, closed at once."""
    _worker_start()
    for other in others:
        other.close()
    _close_inherited_sockets(keep=sock.fileno())
    try:
        while True:
            header = _read_exactly(sock, _HEADER.size)
            if header is None:
                return
            question = _read_exactly(sock, _HEADER.unpack(header)[0])
            if question is None:
                return
            try:
                answer = (True, _classify_page(*pickle.loads(question)))
            except Exception as exc:  # sent back: the engine classifies that page itself
                answer = (False, exc)
            _send(sock, answer)
    except OSError:
        # The engine is gone (killed with answers unread: the socket reads as reset, or a write finds it
        # closed). Nothing is left to answer; what was recorded is in the store. Quietly, not a traceback.
        return


class Workers:
    """Classifies pages for the connections of one run, in a worker process when that helps. A `runner worker`
    keeps one for its whole life instead, shared by all its syncs (runner/engine/schedule.py): its processes
    are forked once, at the first page of a sync that is handed over, not once for every sync."""

    def __init__(self, connections: list[Connection], destination=None, store=None,
                 recover: Callable[[], None] | None = None, processes: int | None = None):
        """`recover`: records what the worker wrote to the local sink without recording it (it failed or died
        mid-page), before the engine delivers such a page itself (see _answered). A pool kept across runs
        gets it from none of them: on a PostgreSQL store settling the file needs no run (localsink.repair_shared).
        `processes`: how many to fork unless RUNNER_WORKERS says (default: one per core, up to four)."""
        global _encode, _ledger, _sink
        self.enabled = _wanted()
        self.processes = processes
        self._pool: list[_Worker] = []  # forked at the first page handed over
        self._names = {c.name for c in connections}
        self._recover = recover
        self.unsure = False  # some page a worker wrote to the local sink may not be recorded (see close)
        self._failed = 0  # pages in a row a worker could not classify (see _answered)
        if self.enabled:
            _CONNECTIONS.update({c.name: c for c in connections})
            local = hasattr(destination, "write_many")
            _encode = destination.encode if local else None
            _sink = destination if local and hasattr(destination, "copy") else None
            _ledger = store.reader_target() if store is not None else None

    def _takes(self, source, store, page: int, more: bool = False) -> bool:
        # A connection's first page stays here unless more pages follow or the worker runs already: a
        # one-page sync never forks. A store the worker cannot open (in memory) keeps the lookups here too.
        return (self.enabled and (page > 1 or more or bool(self._pool))
                and source.conn.name in self._names and (store is None or _ledger is not None))

    def _delivers(self, store, run_id: int | None, deliver: Callable[[], None] | None) -> bool:
        """Whether the worker delivers this page to the local sink itself; if so, `deliver()` (the run's mark
        of the sink) has been called first."""
        if deliver is None or _sink is None or store is None or run_id is None or _ledger is None:
            return False
        deliver()
        return True

    def _question(self, source, store, payload: Any, is_answer: bool, run_id: int | None,
                  deliver: Callable[[], None] | None) -> tuple:
        """What a worker is sent for one page: the arguments of _classify_page."""
        return (source.conn.name, source.account_id, source.account_key, source.today_iso, payload, is_answer,
                source.known, run_id if store is not None else None,
                self._delivers(store, run_id, deliver))

    def take(self, source, store, answer: bytes, count: int, page: int, more: bool, run_id: int | None = None,
             deliver: Callable[[], None] | None = None) -> asyncio.Future | None:
        """Hand a worker a provider's answer as it came, undecoded (its `count` records read by the engine's
        paginator already). Returns a future of what `classify` returns, or None when the page is the
        engine's to decode and classify (an empty page, a first page with nothing after it, no worker)."""
        if not (count and self._takes(source, store, page, more)):
            return None
        try:
            self._start(store)
        except OSError as exc:  # the worker cannot start: this page and the rest stay here
            self._gone(exc)
            return None
        question = self._question(source, store, answer, True, run_id, deliver)
        return asyncio.ensure_future(self._ask(question, source, store, None))

    def _gone(self, exc: BaseException | None) -> None:
        # Not forked again: a `runner worker` classifies in its own process from then on, until it restarts
        if self.enabled:
            logger.warning("a classification process ended ({}); this process classifies the rest itself", exc)
        self.enabled = False

    def classify(self, source, store, records: list, answer: bytes | None, page: int, run_id: int | None = None,
                 deliver: Callable[[], None] | None = None, more: bool = False):
        """One page's verdicts (see classify_page) and, when the worker recorded the verdicts that end there
        (with a `run_id`: see _classify_page), their Tally; else None. Returns that pair, or a future of it.
        `answer`: the provider's answer the records came from, when they are all of it. `more`: another page
        follows (a first page goes to the worker then, so the engine goes on fetching). `deliver`: see take."""
        if not (records and self._takes(source, store, page, more)):
            return self.here(source, store, records), None
        payload: Any = answer
        if payload is None:
            try:
                payload = orjson.dumps(records)
            except TypeError:  # something orjson cannot write (never from a JSON answer): the list itself
                payload = records
        try:
            self._start(store)
        except OSError as exc:
            return self._fallback(source, store, records, exc), None
        question = self._question(source, store, payload, answer is not None, run_id, deliver)
        # While the worker has the page, the engine keeps only what it sent (the answer's bytes are a tenth
        # of the parsed records): with many connections, many pages are in flight.
        return asyncio.ensure_future(self._ask(question, source, store, records if answer is None else None))

    async def _ask(self, question: tuple, source, store, records: list | None) -> tuple[list[Verdict], Tally | None]:
        try:
            channel = await self._channel_for()
            answer = channel.ask(question)
        except Exception as exc:  # the worker has ended: the engine classifies the page
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(exc)
        return await self._answered(answer, question, source, store, records)

    async def _answered(self, answer: asyncio.Future, question: tuple, source, store,
                        records: list | None) -> tuple[list[Verdict], Tally | None]:
        try:
            tuples, counted = await answer
        except Exception as exc:  # the worker died or failed on this page: the engine classifies it
            self._failed += 1
            if isinstance(exc, PageFailed) and self._failed < FAILED_PAGES:
                # It lives on, and takes the next page (its store may be back); a process that fails page
                # after page only doubles the work, and is given up as a dead one.
                logger.warning("a classification process could not classify a page of {} ({}); this process "
                               "classifies it", source.conn.name, exc.__cause__ or exc)
            else:
                self._gone(exc)
            if question[8]:
                # The worker may have written some of this page to the local sink without recording it. The
                # pages still with it are settled first (delivered, or failed), then what the file holds is
                # recorded, and only then does the engine deliver the page: nothing is written twice.
                await self._settled()
                if self._recover is not None:
                    try:
                        self._recover()
                    except BaseException:
                        self.unsure = True  # the lines stay unrecorded: the run's mark must stay for the next run
                        raise
            if records is None:  # an answer the engine has not decoded (see take): it says what is wrong with it
                records = source.page_records(question[4])
            # The worker may have recorded this page before it died: the engine's record of it replaces that.
            return self.here(source, store, records), None, True
        self._failed = 0
        return [Verdict(*t) for t in tuples], counted

    async def _channel_for(self) -> _Channel:
        """The channel of the worker with the fewest pages still to answer (each answers in order)."""
        channels = [await w.channel for w in self._pool]
        return min((c for c in channels if c.lost is None), key=lambda c: len(c.waiting), default=channels[0])

    async def _settled(self) -> None:
        """Wait until the workers have answered (or failed) every page they were given."""
        owed = [f for w in self._pool if w.channel.done() and not w.channel.cancelled() and w.channel.exception() is None
                for f in w.channel.result().waiting]
        if owed:
            await asyncio.wait(owed)

    @staticmethod
    def here(source, store, records: list) -> list[Verdict]:
        """A page classified in the engine's process."""
        lookup = functools.partial(store.ledger_lookup, source.account_key) if source.known else None
        return classify_page(source.classifier(), records, lookup)

    def _fallback(self, source, store, records: list, exc: BaseException) -> list[Verdict]:
        self._gone(exc)
        return self.here(source, store, records)

    def _start(self, store=None) -> None:
        if self._pool:
            return
        global _engine_pid
        _engine_pid = os.getpid()
        # A worker is a copy of this process: anything still buffered would be written twice.
        sys.stdout.flush()
        sys.stderr.flush()
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(_count(self.processes))]
        for sock in (s for pair in pairs for s in pair):
            # Room for many pages in the kernel (capped by net.core.wmem_max): a page that does not fit is
            # copied into asyncio's own buffer instead, which is then shifted on every partial send.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        loop = asyncio.get_running_loop()
        for i, (mine, theirs) in enumerate(pairs):
            others = [s for j, pair in enumerate(pairs) for s in pair if j != i] + [mine]
            process = multiprocessing.get_context("fork").Process(target=_serve, args=(theirs, others), daemon=True,
                                                                  name=f"runner-worker-{i + 1}")
            # SQLite keeps a process's locks in its memory: forked while the ledger thread is inside a
            # transaction, a worker would believe that lock held forever and wait on it.
            with store.quiet() if store is not None else contextlib.nullcontext():
                process.start()
            theirs.close()
            self._pool.append(_Worker(process, mine, loop.create_task(self._connect(loop, mine))))

    @staticmethod
    async def _connect(loop, sock: socket.socket) -> _Channel:
        _, channel = await loop.create_unix_connection(_Channel, sock=sock)
        return channel

    def close(self) -> None:
        for w in self._pool:
            w.channel.cancel()  # a no-op once connected
            if w.channel.done() and not w.channel.cancelled() and w.channel.exception() is None:
                transport = w.channel.result().transport
                if transport is not None:
                    transport.close()
            try:  # now, not on the event loop's next turn: the worker reads the end of its input and exits
                w.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        for w in self._pool:
            w.process.join(timeout=10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            if w.process.exitcode != 0:
                # Killed (here, or by anyone) or crashed: it may have written to the local sink what no one
                # recorded (a page nobody waited for any more). The run's mark stays; the next run repairs.
                self.unsure = True
        self._pool = []
        for name in self._names:
            _CONNECTIONS.pop(name, None)
        global _encode, _ledger, _sink
        _encode = _ledger = _sink = None
