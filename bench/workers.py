#!/usr/bin/env python3
"""Many connections on one PostgreSQL ledger: one `runner apply` against two `runner worker` processes on the
same machine, and the per-connection costs a capacity model needs.

    python bench/workers.py                              # 500 connections x 2,000 invoices, 50 ms a request
    python bench/workers.py --connections 100 --latency-ms 0
    python bench/workers.py --concurrency 16 --runs 5     # five pairs; the median pair's figures
    RUNNER_BENCH_PG_URL=postgresql://user@host/postgres python bench/workers.py   # an existing server
    BENCH_WORKER_ENV="RUNNER_WORKERS=0" python bench/workers.py   # environment of the workers only

Each scenario gets a new database on the server (tests/pgserver.py's, durable, as bench/store.py) and a
workspace of N connections of the peers' fake Stripe server (bench/workspace.py: each connection an account
of its own, the same 2,000 invoices each; jsonl destination). Each scenario's database is dropped before the
next starts, and each timed pass starts after a checkpoint, so none pays for the writes of the one before;
with --runs, the pairs alternate which scenario goes first:

1. `runner apply` (the first import of every connection), then `runner apply` again (every invoice already
   delivered: what a scheduled sync costs when nothing changed, with the full read of the window);
2. two `runner worker --concurrency C` processes on a fresh database, from start until every connection has
   one finished sync (the first import); then every connection is made due again and two new workers sync
   them all (the steady state). Each pass's walls count from the workers' start, as an apply's do.

It prints the walls side by side, and, from the workers' steady state, the CPU seconds and wall seconds one
sync of one connection costs (the workers' process trees, from their rusage; the server's processes, from
/proc), and what they make of how many connections a worker machine sustains at a 5-minute schedule
(docs/worker.md explains the model).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from bench import workspace  # noqa: E402
from bench.run import ENV, PY, FakeServer, log, runner_cmd  # noqa: E402


WORKER_ENV = dict(kv.split("=", 1) for kv in os.environ.get("BENCH_WORKER_ENV", "").split() if "=" in kv)


def _postgres_cpu() -> float:
    """CPU seconds of every PostgreSQL process on this machine, ended backends included (the postmaster's
    children's time)."""
    hz, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if "(postgres)" in stat:
            fields = stat.rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])
    return total / hz


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _workspace(work: Path, server_url: str, fake_url: str, connections: int) -> tuple[Path, str]:
    cfg = workspace.make(work, fake_url, connections=connections)
    db = workspace.new_database(server_url)
    text = cfg.read_text().replace("state: state/state.db", f"state: {db}")
    cfg.write_text(text + "defaults:\n  schedule: {every: 1h}\n")  # one sync of each, until made due again
    return cfg, db


def _finished(watch, since: float) -> int:
    """Connections with a finished sync since `since`, asked on `watch` (one connection for the whole wait: a
    new one every tenth of a second cost the server more CPU than some of what is measured)."""
    import psycopg

    try:
        return watch.execute("SELECT count(DISTINCT connection) FROM runner_syncs WHERE finished IS NOT NULL "
                             "AND status = 'ok' AND started >= %s", (since,)).fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return 0


def _sync_walls(db: str, since: float) -> list[float]:
    import psycopg

    with psycopg.connect(db) as c:
        return [r[0] for r in c.execute("SELECT finished - started FROM runner_syncs WHERE started >= %s AND "
                                        "finished IS NOT NULL", (since,)).fetchall()]


def _apply(cfg: Path) -> tuple[float, float, float]:
    cpu, pg = _children_cpu(), _postgres_cpu()
    t0 = time.perf_counter()
    r = subprocess.run(runner_cmd(cfg), cwd=cfg.parent, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise SystemExit(f"runner apply failed: {r.stderr.decode()[-2000:]}")
    return wall, _children_cpu() - cpu, _postgres_cpu() - pg


def _workers(cfg: Path, db: str, connections: int, n: int, concurrency: int) -> tuple[float, float, float, list]:
    """`n` workers started together, stopped (SIGTERM) once every connection has one finished sync since they
    started: (wall, their CPU with their children's, PostgreSQL's CPU, each sync's wall)."""
    logs = cfg.parent / "workers.log"
    cpu, pg = _children_cpu(), _postgres_cpu()
    start = time.time()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([PY, "-m", "runner", "worker", str(cfg), "--concurrency", str(concurrency)],
                              cwd=cfg.parent, env={**ENV, **WORKER_ENV}, stdout=open(logs, "ab"),
                              stderr=subprocess.STDOUT)
             for _ in range(n)]
    import psycopg

    try:
        with psycopg.connect(db, autocommit=True) as watch:
            while _finished(watch, start) < connections:
                if any(p.poll() is not None for p in procs):
                    raise SystemExit(f"a worker stopped: {logs.read_text()[-2000:]}")
                time.sleep(0.1)
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
    return wall, _children_cpu() - cpu, _postgres_cpu() - pg, sorted(_sync_walls(db, start))


def _due_again(db: str) -> None:
    import psycopg

    with psycopg.connect(db, autocommit=True) as c:
        c.execute("UPDATE runner_schedule SET next_run = now()")


def _checkpoint(server_url: str) -> None:
    """The server's dirty pages written out now, not during the next scenario (a server of
    RUNNER_BENCH_PG_URL whose user may not checkpoint is left as it is)."""
    import psycopg

    try:
        with psycopg.connect(server_url, autocommit=True) as c:
            c.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        pass


def _apply_pass(work: Path, server_url: str, fake_url: str, args) -> tuple:
    """`runner apply`'s first import, then its re-run, on a database of their own (dropped after)."""
    cfg, db = _workspace(work, server_url, fake_url, args.connections)
    _checkpoint(server_url)
    first = _apply(cfg)
    log(f"apply: first import {first[0]:.1f} s")
    _checkpoint(server_url)
    steady = _apply(cfg)
    log(f"apply: re-run {steady[0]:.1f} s")
    workspace.drop_database(db)  # the next scenario's server has no autovacuum of this ledger to do meanwhile
    return first, steady


def _workers_pass(work: Path, server_url: str, fake_url: str, args) -> tuple:
    """The workers' first import, then every connection again, on a database of their own (dropped after)."""
    cfg, db = _workspace(work, server_url, fake_url, args.connections)
    _checkpoint(server_url)
    first = _workers(cfg, db, args.connections, args.workers, args.concurrency)
    log(f"workers: first import {first[0]:.1f} s")
    _due_again(db)
    _checkpoint(server_url)
    steady = _workers(cfg, db, args.connections, args.workers, args.concurrency)
    log(f"workers: every connection again {steady[0]:.1f} s")
    workspace.drop_database(db)
    return first, steady


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=500)
    ap.add_argument("--invoices", type=int, default=2000, help="per connection")
    ap.add_argument("--latency-ms", type=int, default=50, help="the fake server's latency per request")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4, help="each worker's --concurrency")
    ap.add_argument("--runs", type=int, default=1, help="pairs of apply and workers, every other one in the "
                                                         "other order; the median pair's figures are printed")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="runner-bench-workers-"))
    try:
        with workspace.postgres_server() as server_url, \
                FakeServer(args.invoices, latency_ms=args.latency_ms) as fake:
            records = fake.stats()["workload"]["records"]
            log(f"{args.connections} connections x {args.invoices} invoices ({records} open each), "
                f"{args.latency_ms} ms a request")
            pairs = []
            for run in range(args.runs):
                # Side by side, the order turned every other pair (apply first, then the workers first): the
                # machine's drift, and whatever a scenario leaves the server, weigh on both alike.
                order = (_apply_pass, _workers_pass) if run % 2 == 0 else (_workers_pass, _apply_pass)
                done = {p: p(tmp / f"{p.__name__.strip('_')}-{run}", server_url, fake.url, args) for p in order}
                (first, steady), (wfirst, wsteady) = done[_apply_pass], done[_workers_pass]
                pairs.append((first, wfirst, steady, wsteady))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # The figures of the pair whose first-import ratio is the median
    pairs.sort(key=lambda p: p[1][0] / p[0][0])
    first, wfirst, steady, wsteady = pairs[len(pairs) // 2]

    n, walls = args.connections, wsteady[3]
    per_sync_cpu = (wsteady[1] + wsteady[2]) / n
    per_sync_wall = walls[len(walls) // 2]
    print(f"| scenario ({n} connections x {args.invoices:,} invoices, {args.latency_ms} ms/request) | wall s | "
          f"runner CPU s | PostgreSQL CPU s |")
    print("|---|---|---|---|")
    print(f"| `runner apply`, first import | {first[0]:.1f} | {first[1]:.1f} | {first[2]:.1f} |")
    print(f"| {args.workers} workers (--concurrency {args.concurrency}), first import | {wfirst[0]:.1f} | "
          f"{wfirst[1]:.1f} | {wfirst[2]:.1f} |")
    print(f"| `runner apply`, re-run (nothing new) | {steady[0]:.1f} | {steady[1]:.1f} | {steady[2]:.1f} |")
    print(f"| {args.workers} workers, every connection again (nothing new) | {wsteady[0]:.1f} | {wsteady[1]:.1f} | "
          f"{wsteady[2]:.1f} |")
    ratio = wfirst[0] / first[0]
    if len(pairs) > 1:
        print(f"\nfirst import, each pair: {', '.join(f'{p[1][0] / p[0][0]:.2f}x' for p in pairs)}; steady state: "
              f"{', '.join(f'{r:.2f}x' for r in sorted(p[3][0] / p[2][0] for p in pairs))}")
    print(f"\nfirst import: {args.workers} workers {ratio:.2f}x one apply{' (median)' if len(pairs) > 1 else ''} "
          f"(goal: not slower, <= 1.0x: {'MET' if ratio <= 1.0 else 'NOT MET'}); steady state "
          f"{wsteady[0] / steady[0]:.2f}x")
    print(f"one steady-state sync of one connection: {per_sync_cpu * 1000:.0f} ms of CPU (runner + PostgreSQL), "
          f"{per_sync_wall:.2f} s of wall (median; p90 {walls[int(len(walls) * 0.9)]:.2f} s)")
    cores = os.cpu_count() or 1
    by_cpu = 300 * cores / per_sync_cpu
    by_slots = 300 * args.concurrency / per_sync_wall
    print(f"capacity at a 5-minute schedule, per worker machine of {cores} cores and --concurrency "
          f"{args.concurrency}: min(CPU: 300 s x {cores} / {per_sync_cpu:.3f} s = {by_cpu:.0f}, slots: 300 s x "
          f"{args.concurrency} / {per_sync_wall:.2f} s = {by_slots:.0f}) = {min(by_cpu, by_slots):.0f} connections")
    return 0


if __name__ == "__main__":
    sys.exit(main())
