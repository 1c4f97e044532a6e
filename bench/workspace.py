"""Build a throw-away workspace for one benchmark scenario: secrets, config and an integration override.

The override is integrations.d/stripe.yaml itself (same requests, mapping, filters, validation), loaded
and written back with one extra environment, `bench`, whose base URL is the peers' fake server. Whether
that environment declares a rate limit is the scenario's choice: the throughput targets (1-3, 5) run
unthrottled like the peers; the latency-bound target (4) keeps the test environment's declared limit.
"""
from __future__ import annotations

import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "integrations.d" / "stripe.yaml"


def make(work: Path, url: str, *, connections: int = 1, rate_limit: dict | None = None,
         window=("2022-01-01T00:00:00Z", "2024-01-01T00:00:00Z"), partition: dict | None = None,
         fresh: bool = True) -> Path:
    """Write work/{config.yaml, integrations.d/stripe.yaml, secrets/}; returns the config path."""
    if fresh and work.exists():
        shutil.rmtree(work)
    (work / "integrations.d").mkdir(parents=True, exist_ok=True)
    (work / "secrets").mkdir(exist_ok=True)
    spec = yaml.safe_load(SPEC.read_text())
    test = spec["environments"]["test"]
    env = {"description": "the peers' fake Stripe server (benchmark)", "base_url": url,
           "credentials": test.get("credentials", {})}
    if rate_limit:
        env["rate_limit"] = rate_limit
    spec["environments"] = {"bench": env, **spec["environments"]}
    if partition is not None:
        spec["invoices"]["partition"] = partition
    # The fake server answers /v1/invoices only, so it cannot name its account (GET /v1/account): each connection
    # pins its own, as a config does for a provider that cannot say.
    spec.pop("account", None)
    # Nor has it /v1/events: targets 1 and 2 measure the full read of the window (bench/incremental.py measures
    # the change feed, against the runner's own simulator).
    spec.pop("changes", None)
    (work / "integrations.d" / "stripe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    for i in range(connections):
        (work / "secrets" / f"stripe_{i}").write_text(f"sk_test_bench{i}")
    conns = "".join(
        f"  - name: bench-{i}\n    integration: stripe\n    environment: bench\n    account_id: bench-{i}\n"
        f"    credentials: {{api_key: \"${{file:secrets/stripe_{i}}}\"}}\n"
        f"    window: {{from: \"{window[0]}\", to: \"{window[1]}\"}}\n" for i in range(connections))
    cfg = work / "config.yaml"
    cfg.write_text("version: 1\nstate: state/state.db\ndestination: {type: jsonl, path: out/cases.jsonl}\n"
                   "integrations_dir: integrations.d\nconnections:\n" + conns)
    return cfg


@contextmanager
def postgres_server(durable: bool = True) -> Iterator[str]:
    """The admin URL of a PostgreSQL server: RUNNER_BENCH_PG_URL's, else one started here (tests/pgserver.py)
    and stopped after. `durable`: its data files synced as a production server's."""
    url = os.environ.get("RUNNER_BENCH_PG_URL")
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import pgserver

    url, pid, root = pgserver.start(durable=durable)
    try:
        yield url
    finally:
        pgserver.stop(pid, root)


def new_database(server_url: str) -> str:
    """The URL of a new, empty database on the server."""
    import psycopg

    name = "bench_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(url: str) -> None:
    """Drop a database new_database made: a benchmark's earlier databases would otherwise keep the server's
    autovacuum busy (each holds a ledger just filled) while the next run is timed."""
    import psycopg

    server, name = url.rsplit("/", 1)
    with psycopg.connect(server + "/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
