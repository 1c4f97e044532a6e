"""Prometheus metrics of the runner, in one registry any long-running process can serve.

`runner serve` answers them on /metrics; a long-running worker can do the same with `exposition()`. Every
series is documented in docs/operations.md. Labels hold names from the config and the specs (connection,
integration), never invoice ids or anything unbounded, so the number of series stays small.

The engine calls the small functions below; when prometheus_client cannot be imported they do nothing, so a
one-shot `runner apply` never depends on it.
"""
from __future__ import annotations

import time

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
    from prometheus_client import CONTENT_TYPE_LATEST
except ImportError:  # pragma: no cover - prometheus_client is a dependency; this keeps the engine usable without
    CollectorRegistry = None

REGISTRY = CollectorRegistry(auto_describe=True) if CollectorRegistry else None

if REGISTRY is not None:
    RUNS = Counter("runner_runs", "Runs (plan, apply, inbound imports) by how they ended.",
                   ["command", "outcome"], registry=REGISTRY)
    INVOICES = Counter("runner_invoices", "Invoices by verdict (imported, skipped, failed) and reason code.",
                       ["connection", "verdict", "reason"], registry=REGISTRY)
    PROVIDER_REQUESTS = Counter("runner_provider_requests", "HTTP requests to a provider or to Debitura, by the "
                                "answer's status class (2xx, 4xx, 429, 5xx) or 'error' when none came.",
                                ["target", "status"], registry=REGISTRY)
    RATE_LIMIT_WAITS = Counter("runner_rate_limit_waits", "Times a request waited for a rate limit or quota.",
                               ["target"], registry=REGISTRY)
    RATE_LIMIT_WAIT_SECONDS = Counter("runner_rate_limit_wait_seconds", "Seconds spent waiting for rate limits "
                                      "and quotas.", ["target"], registry=REGISTRY)
    TOKEN_REFRESHES = Counter("runner_token_refreshes", "OAuth access-token renewals, by outcome (ok, failed).",
                              ["connection", "outcome"], registry=REGISTRY)
    LAST_SUCCESS = Gauge("runner_last_success_timestamp_seconds", "Unix time a connection last synced without "
                         "error (alert when time() minus this grows too large).", ["connection"], registry=REGISTRY)
    LAST_RUN_FAILED = Gauge("runner_connection_failed", "1 when the connection's last sync failed, else 0.",
                            ["connection"], registry=REGISTRY)


def _on() -> bool:
    return REGISTRY is not None


def status_class(status: int | None) -> str:
    if status is None:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def request(target: str, status: int | None) -> None:
    if _on():
        PROVIDER_REQUESTS.labels(target, status_class(status)).inc()


def rate_limit_wait(target: str, seconds: float) -> None:
    if _on() and seconds > 0:
        RATE_LIMIT_WAITS.labels(target).inc()
        RATE_LIMIT_WAIT_SECONDS.labels(target).inc(seconds)


def token_refresh(connection: str, ok: bool) -> None:
    if _on():
        TOKEN_REFRESHES.labels(connection, "ok" if ok else "failed").inc()


def invoice(connection: str, verdict: str, reason: str | None, n: int = 1) -> None:
    if _on() and n:
        INVOICES.labels(connection, verdict, reason or "").inc(n)


def connection_result(connection: str, ok: bool, when: float | None = None) -> None:
    if not _on():
        return
    LAST_RUN_FAILED.labels(connection).set(0 if ok else 1)
    if ok:
        LAST_SUCCESS.labels(connection).set(when or time.time())


def run(command: str, outcome: str) -> None:
    if _on():
        RUNS.labels(command, outcome).inc()


def record_run(result, command: str) -> None:
    """Count a finished pipeline RunResult: its outcome, every connection's verdicts, its health."""
    if not _on():
        return
    outcome = ("interrupted" if getattr(result, "interrupted", None) else "ok" if result.ok else "failed")
    run(command, outcome)
    for c in result.connections:
        invoice(c.name, "imported", None, c.imported)
        for reason, n in c.skipped().items():
            invoice(c.name, "skipped", reason, n)
        invoice(c.name, "failed", None, c.failed)
        if c.status != "interrupted":
            connection_result(c.name, c.status == "ok", result.finished)


def exposition() -> tuple[bytes, str]:
    """The body and content type of a /metrics answer."""
    if not _on():
        return b"", "text/plain; charset=utf-8"
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
