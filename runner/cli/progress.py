"""Progress of a long plan or apply, on stderr.

On a terminal: a live line per connection with its totals, its rate and the time elapsed. Without a terminal
(CI, cron, a container's log): a plain progress line every RUNNER_PROGRESS_EVERY seconds (default 30), written
by a timer thread, so a log is never silent for minutes even while a provider's rate limit holds a run back.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EVERY_ENV = "RUNNER_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0
SHOWN = 10  # connections named per progress line; the rest are counted in the total


def _every() -> float:
    try:
        value = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S))
    except ValueError:
        return DEFAULT_EVERY_S
    return value if value > 0 else DEFAULT_EVERY_S


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class _Snapshot:
    def __init__(self):
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.rows: dict[str, tuple[int, int, int, float]] = {}  # name -> seen, imported, failed, first seen at

    def update(self, name: str, res) -> None:
        with self.lock:
            first = self.rows.get(name, (0, 0, 0, time.monotonic()))[3]
            self.rows[name] = (res.seen, res.imported, res.failed, first)


class Lines:
    """Without a terminal: a line every `every` seconds until stopped."""

    def __init__(self, total: int, verb: str, stream=None, every: float | None = None):
        self.snap = _Snapshot()
        self.total, self.verb = total, verb
        self.stream = stream or sys.stderr
        self.every = every or _every()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="runner-progress", daemon=True)

    def __call__(self, name: str, res) -> None:
        self.snap.update(name, res)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def _loop(self) -> None:
        as_json = os.environ.get("RUNNER_LOG_FORMAT", "text").strip().lower() == "json"
        while not self.done.wait(self.every):
            self.stream.write((self.json_line() if as_json else self.line()) + "\n")
            self.stream.flush()

    def json_line(self) -> str:
        """With --log-format json, a progress line is a log entry like the others (one JSON object)."""
        import json
        from datetime import datetime, timezone

        from runner.redact import redact

        with self.snap.lock:
            rows = dict(self.snap.rows)
        entry = {"time": datetime.now(timezone.utc).astimezone().isoformat(), "level": "INFO", "event": self.line(),
                 "run_id": None, "connection": None, "logger": "runner.progress",
                 "elapsed_s": round(time.monotonic() - self.snap.started, 1),
                 "connections": {name: {"seen": r[0], "imported": r[1], "failed": r[2]} for name, r in rows.items()}}
        return redact(json.dumps(entry, ensure_ascii=False))

    def line(self) -> str:
        from runner.redact import redact

        now = time.monotonic()
        elapsed = now - self.snap.started
        with self.snap.lock:
            rows = dict(self.snap.rows)
        seen = sum(r[0] for r in rows.values())
        imported = sum(r[1] for r in rows.values())
        rate = seen / elapsed if elapsed > 0 else 0.0
        head = (f"progress {_clock(elapsed)}: {len(rows)} of {self.total} connection(s) started, {seen:,} invoices "
                f"seen ({rate:,.0f}/s), {imported:,} {self.verb}")
        busiest = sorted(rows.items(), key=lambda kv: -kv[1][0])[:SHOWN]
        parts = [f"{name} {r[0]:,} seen/{r[1]:,} {self.verb}" for name, r in busiest]
        more = f" (+{len(rows) - SHOWN} more)" if len(rows) > SHOWN else ""
        return redact(head + ("; " + ", ".join(parts) + more if parts else "; fetching the first pages"))


class Live:
    """On a terminal: rich's live display, a row per connection."""

    def __init__(self, console, verb: str):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.verb = verb
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 transient=True, console=console)
        self.tasks: dict[str, int] = {}
        self.first: dict[str, float] = {}

    def __call__(self, name: str, res) -> None:
        from runner.redact import redact

        now = time.monotonic()
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name)
            self.first[name] = now
        elapsed = now - self.first[name]
        rate = f" · {res.seen / elapsed:,.0f}/s" if elapsed > 0.5 else ""
        self.progress.update(self.tasks[name], description=redact(
            f"{name}: {res.seen:,} seen · {res.imported:,} {self.verb} · {res.failed:,} failed{rate}"))

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()


def make(mode: str, output: str, connections: int, console_factory):
    """The progress display for a run, or None (JSON on a terminal: the display would mix with the output)."""
    verb = "to import" if mode == "plan" else "imported"
    if sys.stderr.isatty():
        return Live(console_factory(stderr=True), verb) if output == "text" else None
    return Lines(connections, verb)
