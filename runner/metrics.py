"""Prometheus metrics of the runner, in one registry any long-running process can serve.

`runner serve` answers them on /metrics; a long-running worker can do the same with `exposition()`. Every
series is documented in docs/operations.md. Labels hold names from the config and the specs (connection,
integration), never invoice ids or anything unbounded, so the number of series stays small.

The engine counts into plain dictionaries here; prometheus_client (0.1 s of imports) is loaded only when the
series are read (`registry()`, `exposition()`), so a one-shot `runner apply` never pays for it.
"""
from __future__ import annotations

import threading
import time

# name -> (type, help, label names)
SERIES = {
    "runner_runs": ("counter", "Runs (plan, apply, inbound imports) by how they ended.", ("command", "outcome")),
    "runner_invoices": ("counter", "Invoices by verdict (imported, skipped, failed) and reason code.",
                        ("connection", "verdict", "reason")),
    "runner_provider_requests": ("counter", "HTTP requests to a provider or to Debitura, by the answer's status "
                                 "class (2xx, 4xx, 429, 5xx) or 'error' when none came.", ("target", "status")),
    "runner_rate_limit_waits": ("counter", "Times a request waited for a rate limit or quota.", ("target",)),
    "runner_rate_limit_wait_seconds": ("counter", "Seconds spent waiting for rate limits and quotas.", ("target",)),
    "runner_token_refreshes": ("counter", "OAuth access-token renewals, by outcome (ok, failed).",
                               ("connection", "outcome")),
    "runner_last_success_timestamp_seconds": ("gauge", "Unix time a connection last synced without error (alert "
                                              "when time() minus this grows too large).", ("connection",)),
    "runner_connection_failed": ("gauge", "1 when the connection's last sync failed, else 0.", ("connection",)),
}

_values: dict[str, dict[tuple, float]] = {name: {} for name in SERIES}
_lock = threading.Lock()
_registry = None


def _add(name: str, labels: tuple, amount: float = 1.0) -> None:
    with _lock:
        table = _values[name]
        table[labels] = table.get(labels, 0.0) + amount


def _set(name: str, labels: tuple, value: float) -> None:
    with _lock:
        _values[name][labels] = value


def status_class(status: int | None) -> str:
    if status is None:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def request(target: str, status: int | None) -> None:
    _add("runner_provider_requests", (target, status_class(status)))


def rate_limit_wait(target: str, seconds: float) -> None:
    if seconds > 0:
        _add("runner_rate_limit_waits", (target,))
        _add("runner_rate_limit_wait_seconds", (target,), seconds)


def token_refresh(connection: str, ok: bool) -> None:
    _add("runner_token_refreshes", (connection, "ok" if ok else "failed"))


def invoice(connection: str, verdict: str, reason: str | None, n: int = 1) -> None:
    if n:
        _add("runner_invoices", (connection, verdict, reason or ""), n)


def connection_result(connection: str, ok: bool, when: float | None = None) -> None:
    _set("runner_connection_failed", (connection,), 0 if ok else 1)
    if ok:
        _set("runner_last_success_timestamp_seconds", (connection,), when or time.time())


def run(command: str, outcome: str) -> None:
    _add("runner_runs", (command, outcome))


def record_run(result, command: str) -> None:
    """Count a finished pipeline RunResult: its outcome, every connection's verdicts, its health."""
    outcome = ("interrupted" if getattr(result, "interrupted", None) else "ok" if result.ok else "failed")
    run(command, outcome)
    for c in result.connections:
        invoice(c.name, "imported", None, c.imported)
        for reason, n in c.skipped().items():
            invoice(c.name, "skipped", reason, n)
        invoice(c.name, "failed", None, c.failed)
        if c.status != "interrupted":
            connection_result(c.name, c.status == "ok", result.finished)


class _Collector:
    """Presents the counts above to prometheus_client when it collects."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with _lock:
            snapshot = {name: dict(table) for name, table in _values.items()}
        for name, (kind, text, labels) in SERIES.items():
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, text, labels=list(labels))
            for values, amount in sorted(snapshot[name].items()):
                family.add_metric(list(values), amount)
            yield family

    def describe(self):
        return list(self.collect())


def registry():
    """The prometheus_client registry holding the runner's series (made on first use)."""
    global _registry
    if _registry is None:
        from prometheus_client import CollectorRegistry

        reg = CollectorRegistry(auto_describe=True)
        reg.register(_Collector())
        _registry = reg
    return _registry


def exposition() -> tuple[bytes, str]:
    """The body and content type of a /metrics answer."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry()), CONTENT_TYPE_LATEST
