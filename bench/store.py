#!/usr/bin/env python3
"""Targets 1 and 2 with each state store, side by side: `runner apply` of N invoices (first import, then the
re-run where every invoice is a duplicate) with the SQLite store and with the PostgreSQL store, alternating
run by run (SQLite first in one pair, PostgreSQL first in the next); each ratio is the median of the per-pair
ratios (PostgreSQL / SQLite; the goal is <= 1.3).

    python bench/store.py                      # N=100,000, 3 pairs; starts a PostgreSQL server itself
    python bench/store.py --n 20000 --runs 1
    python bench/store.py --no-fsync           # the server syncs no data file (the store's own work only)
    RUNNER_BENCH_PG_URL=postgresql://user@host/postgres python bench/store.py   # an existing server

The server it starts (tests/pgserver.py, durable=True) syncs its data files as a production server does;
commits do not wait for the disk (synchronous_commit=off), as the SQLite store's do not (WAL,
synchronous=NORMAL). Each first import gets a new database; the one before is dropped. Same workspace as
bench/run.py (the peers' fake Stripe server, the jsonl destination, one verdict per invoice).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from bench import workspace  # noqa: E402
from bench.run import FakeServer, log, runner_cmd, timed  # noqa: E402


def _counts(store) -> dict:
    """The last run's verdicts, as bench/run.py counts them, from either store."""
    run_id = store.last_runs(1)[0]["id"]
    out: dict = {}
    for v in store.run_verdicts(run_id, limit=10_000_000):
        key = v["verdict"] + (f":{v['reason']}" if v["reason"] else "")
        out[key] = out.get(key, 0) + 1
    return out


def _set_state(cfg: Path, state: str) -> None:
    text = cfg.read_text()
    cfg.write_text("\n".join(f"state: {state}" if line.startswith("state:") else line for line in text.splitlines())
                   + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3, help="pairs per target")
    ap.add_argument("--no-fsync", action="store_true",
                    help="start the server with fsync=off (as the tests' server): what the store's own work costs, "
                         "without the data files' syncs, which on a shared disk dominate")
    args = ap.parse_args()

    from runner.state import open_store

    tmp = Path(tempfile.mkdtemp(prefix="runner-bench-store-"))
    walls: dict[tuple[str, str], list[float]] = {}
    counts: dict[str, dict] = {}
    database = None  # the PostgreSQL run's, dropped when the next pair starts
    try:
        with workspace.postgres_server(durable=not args.no_fsync) as server_url, FakeServer(args.n) as server:
            log(f"N={args.n}: {server.stats()['workload']}")
            works = {b: workspace.make(tmp / b, server.url) for b in ("sqlite", "postgresql")}
            for i in range(args.runs + 1):  # the first pair warms the caches and is not counted
                # The order turned every other pair: the machine's drift, and what one store's run leaves
                # the disk and the caches, weigh on both alike.
                for backend in ("sqlite", "postgresql")[::1 if i % 2 == 0 else -1]:
                    cfg = works[backend]
                    work = cfg.parent
                    shutil.rmtree(work / "out", ignore_errors=True)
                    shutil.rmtree(work / "state", ignore_errors=True)
                    if backend == "postgresql":
                        if database:
                            workspace.drop_database(database)
                        database = workspace.new_database(server_url)
                        _set_state(cfg, database)
                    for target, label in ((1, "first import"), (2, "re-run")):
                        m = timed(server, runner_cmd(cfg), cwd=work)
                        if m["rc"] not in (0, 1):
                            log(f"{backend} target {target} failed: {m['stderr']}")
                            return 1
                        if i:
                            walls.setdefault((backend, label), []).append(m["wall"])
                        store = open_store(cfg.read_text().split("state: ", 1)[1].split("\n", 1)[0]
                                           if backend == "postgresql" else work / "state" / "state.db")
                        counts[f"{backend} {label}"] = _counts(store)
                        store.close()
                        log(f"pair {i} {backend:10} {label:12} {m['wall']:.2f} s {counts[f'{backend} {label}']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for label in ("first import", "re-run"):
        assert counts[f"sqlite {label}"] == counts[f"postgresql {label}"], "both stores must reach the same verdicts"
    print(f"| target | N | SQLite s (median) | PostgreSQL s (median) | ratio (median of pairs) | goal |")
    print("|---|---|---|---|---|---|")
    for target, label in ((1, "first import"), (2, "re-run")):
        sq, pg = walls[("sqlite", label)], walls[("postgresql", label)]
        ratio = statistics.median(p / s for p, s in zip(pg, sq))
        print(f"| {target} ({label}) | {args.n:,} | {statistics.median(sq):.2f} | {statistics.median(pg):.2f} | "
              f"{ratio:.2f}x | <= 1.3x {'MET' if ratio <= 1.3 else 'NOT MET'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
