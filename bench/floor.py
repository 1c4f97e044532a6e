#!/usr/bin/env python3
"""Target 5's CPU budget: what fifty connections cost, what the least Python could cost, and what 1.5x allows.

    /work/venv/bin/python bench/floor.py               # 5 rounds
    /work/venv/bin/python bench/floor.py --rounds 9

Target 5 (issue 7) asks fifty connections of 2,000 invoices each (1,400 of them open, 50 ms per request) to
finish within 1.5x the time of one. One connection is fourteen requests of waiting; fifty are 70,000
invoices of CPU work on two cores. This script measures, against the peers' fake server:

1. The runner's worker path per invoice: one page at a time through `workers._classify_page`, as a worker
   runs it in a real apply (decode, let, mapping, unpaid rule, window, schema, due date, idempotency key,
   the jsonl line, the lookup under the file's lock, the ledger rows and verdicts, the commit), into a
   fresh state store and file.
2. The floor: only the work any implementation of the runner's job does per invoice, with the same
   libraries and nothing else: orjson decode, the spec's compiled `let` and mapping, jsonschema-rs, the
   sha256 key, the line (orjson), one plain INSERT per invoice and one commit per page, one write per
   page. No verdicts of skipped invoices, no lookups, no locks, no unpaid rule or window, no bookkeeping.
   Each stage is timed on its own.
3. One `runner apply` of one connection and of fifty (target 5's own workload): wall time, and the CPU
   of the engine, of each worker and of the server (from /proc, sampled every 20 ms).

Then it prints the CPU the fifty connections would need if the workers' path cost only the floor, against
the two cores' capacity within 1.5x the single connection's wall time. Rounds alternate (worker path,
floor, worker path, ...) and report medians: the machine's speed drifts.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from bench import workspace  # noqa: E402
from bench.run import FakeServer  # noqa: E402

CONNECTIONS = 50
TICK = os.sysconf("SC_CLK_TCK")


def fetch_pages(url: str) -> list[bytes]:
    """One account's open invoices, as the runner's spec asks for them (customer expanded), page by page."""
    pages, after = [], None
    while True:
        q = "/v1/invoices?limit=100&expand[]=data.customer&status=open" + (f"&starting_after={after}" if after else "")
        req = urllib.request.Request(url + q, headers={"Authorization": "Bearer sk_test_floor"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        page = orjson.loads(body)
        pages.append(body)
        if not page["has_more"]:
            return pages
        after = page["data"][-1]["id"]


class Paths:
    """The worker path and the floor over the same pages, each into a store and file of its own per round."""

    def __init__(self, cfg_path: Path, pages: list[bytes], tmp: Path):
        from runner.spec import config

        self.cfg = config.load(cfg_path)
        self.pages = pages
        self.tmp = tmp
        self.invoices = sum(len(orjson.loads(p)["data"]) for p in pages) * CONNECTIONS
        self.today = date.today().isoformat()

    def _fresh(self, name: str) -> Path:
        d = self.tmp / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def worker(self) -> float:
        """CPU seconds for every page of every connection through the worker's own function."""
        from runner.engine import destinations
        from runner.state import sqlite as state
        from runner.engine import workers

        d = self._fresh("worker")
        self.cfg.destination.path = d / "cases.jsonl"
        store = state.Store(d / "state.db", destinations.ledger_id(self.cfg.destination))
        run_id = store.begin_run("apply", "floor")
        sink = destinations.make(self.cfg.destination, None)
        store.mark_sink(0, run_id)
        workers._CONNECTIONS.update({c.name: c for c in self.cfg.connections})
        workers._encode, workers._sink, workers._ledger = sink.encode, sink, store.reader_target()
        workers._own_sink = workers._db = None
        t0 = time.process_time()
        for p in range(len(self.pages)):  # connections interleaved page by page, as in a run
            for conn in self.cfg.connections:
                workers._classify_page(conn.name, None, f"stripe:{conn.name}", self.today, self.pages[p], True,
                                       False, run_id, True)
        spent = time.process_time() - t0
        workers._db.close()
        workers._own_sink = workers._db = None
        store.close()
        return spent

    def floor(self, stages: dict[str, float]) -> float:
        """CPU seconds for the least work per invoice (see the module's docstring); adds each stage's share."""
        import jsonschema_rs

        from runner.engine import destinations
        from runner.spec import schemas
        from runner.state import sqlite as state

        d = self._fresh("floor")
        db = state.connect(str(d / "state.db"))
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(state.SCHEMA)
        fh = open(d / "cases.jsonl", "ab")
        is_valid = jsonschema_rs.validator_for(schemas.load("invoice")).is_valid
        stream = self.cfg.connections[0].spec.invoices
        let = [(name, e.search) for name, e in stream.let]
        apply = stream.mapping.apply
        dcfg = self.cfg.destination
        dest = destinations.ledger_id(dcfg)
        clock = time.process_time
        insert = ("INSERT INTO ledger (destination, account_key, invoice_id, connection, number, status, "
                  "idempotency_key, case_id, case_reference, first_seen, updated, run_id) "
                  "VALUES (?, ?, ?, ?, ?, 'delivered', ?, ?, NULL, ?, ?, 1)")
        t0 = clock()
        for p in range(len(self.pages)):
            for conn in self.cfg.connections:
                ak = f"stripe:{conn.name}"
                source = {"connection": conn.name, "integration": "stripe", "account_id": conn.name}
                a = clock()
                records = orjson.loads(self.pages[p])["data"]
                b = clock()
                for r in records:
                    for name, search in let:
                        r[name] = search(r)
                c = clock()
                invoices = [apply(r) for r in records]
                e = clock()
                ok = []
                for inv in invoices:
                    inv["source"] = dict(source)
                    debtor = inv.get("debtor")
                    if isinstance(debtor, dict):
                        debtor.setdefault("type", "Company")
                    if is_valid(inv):
                        ok.append(inv)
                f = clock()
                keys = ["runner-" + hashlib.sha256(f"{ak}\x1f{inv['external_id']}".encode()).hexdigest()[:40]
                        for inv in ok]
                g = clock()
                lines = [orjson.dumps({"idempotency_key": k, "invoice": inv, "case": destinations.case_body(inv, dcfg)},
                                      default=float) for k, inv in zip(keys, ok)]
                h = clock()
                fh.write(b"\n".join(lines) + b"\n")
                fh.flush()
                i = clock()
                now = time.time()
                db.execute("BEGIN IMMEDIATE")
                db.executemany(insert, [(dest, ak, inv["external_id"], conn.name, inv.get("number"), k, k, now, now)
                                        for k, inv in zip(keys, ok)])
                db.execute("COMMIT")
                j = clock()
                del records, invoices, ok, lines
                k = clock()
                for stage, spent in (("decode", b - a), ("let", c - b), ("mapping", e - c), ("schema", f - e),
                                     ("key", g - f), ("line", h - g), ("write", i - h), ("ledger", j - i),
                                     ("free", k - j)):
                    stages[stage] = stages.get(stage, 0.0) + spent
        spent = clock() - t0
        fh.close()
        db.close()
        return spent


# --- one apply, with the CPU of each process ---------------------------------------------------------------

def _cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def apply_cpu(work: Path, server: FakeServer) -> dict:
    """One `runner apply` in `work`: wall seconds and CPU seconds of the engine, its workers and the server."""
    shutil.rmtree(work / "state", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    s0 = _cpu(server.proc.pid) or 0.0
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "apply", "config.yaml"], cwd=work,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    engine, workers = 0.0, {}
    while proc.poll() is None:
        engine = _cpu(proc.pid) or engine
        for child in _children(proc.pid):
            workers[child] = _cpu(child) or workers.get(child, 0.0)
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    return {"wall": wall, "engine": engine, "workers": sum(workers.values()),
            "server": (_cpu(server.proc.pid) or 0.0) - s0, "rc": proc.returncode}


def measure(server: FakeServer, tmp: Path, rounds: int, log=None) -> dict:
    """The medians over `rounds` (see the module's docstring) against `server` (target 5's: 2,000 invoices,
    50 ms a request): worker path and floor per invoice (us), the floor's stages, and the one and fifty
    connection runs (wall and CPU seconds); `budget`: the CPU two cores give within 1.5x of the one connection,
    `at_floor`: what the fifty would need with their workers at the floor."""
    med = statistics.median
    one = tmp / "one"
    workspace.make(one, server.url, connections=1)
    cfg = workspace.make(tmp / "many", server.url, connections=CONNECTIONS)
    paths = Paths(cfg, fetch_pages(server.url), tmp / "paths")
    n = paths.invoices
    paths.worker()  # warm-up: compiles the mapping and the validators once
    worker, floor, stages, ones, fifties = [], [], {}, [], []
    for i in range(rounds):
        worker.append(paths.worker() / n * 1e6)
        floor.append(paths.floor(stages) / n * 1e6)
        ones.append(apply_cpu(one, server))
        fifties.append(apply_cpu(tmp / "many", server))
        if log is not None:
            log(f"floor round {i}: worker path {worker[-1]:.1f} us, floor {floor[-1]:.1f} us, one "
                f"{ones[-1]['wall']:.2f}s, fifty {fifties[-1]['wall']:.2f}s")
    if any(m["rc"] not in (0, 1) for m in ones + fifties):
        raise RuntimeError("a runner apply failed")
    out = {"invoices": n, "rounds": rounds, "worker_us": med(worker), "floor_us": med(floor),
           "stages_us": {k: v / rounds / n * 1e6 for k, v in stages.items()},
           "one": med(m["wall"] for m in ones), "fifty": med(m["wall"] for m in fifties),
           **{k: med(m[k] for m in fifties) for k in ("engine", "workers", "server")}}
    out["cpu"] = out["engine"] + out["workers"] + out["server"]
    out["budget"] = 2 * 1.5 * out["one"]
    out["at_floor"] = out["engine"] + out["server"] + out["workers"] * out["floor_us"] / out["worker_us"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="runner-floor-"))
    try:
        with FakeServer(2000, latency_ms=50) as server:
            m = measure(server, tmp, args.rounds, log=lambda s: print(f"[floor] {s}", file=sys.stderr, flush=True))
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = m["invoices"]
    print(f"Per invoice, {n:,} invoices ({CONNECTIONS} connections x {n // CONNECTIONS:,}), one process, "
          f"median of {m['rounds']} rounds:\n")
    print("| path | CPU us per invoice |\n|---|---|")
    print(f"| the runner's worker path (workers._classify_page, delivering to jsonl) | {m['worker_us']:.1f} |")
    print(f"| the floor: the same libraries, only the unavoidable work | {m['floor_us']:.1f} |")
    for stage, us in m["stages_us"].items():
        print(f"| &nbsp;&nbsp;floor: {stage} | {us:.1f} |")
    print(f"\nTarget 5's runs (median of {m['rounds']}): one connection {m['one']:.2f} s; fifty {m['fifty']:.2f} s = "
          f"{m['fifty'] / m['one']:.2f}x. CPU of the fifty: engine {m['engine']:.2f} s, workers {m['workers']:.2f} s, "
          f"server {m['server']:.2f} s, {m['cpu']:.2f} s in all.")
    print(f"Within 1.5x of one connection ({1.5 * m['one']:.2f} s) two cores give at most {m['budget']:.2f} CPU "
          f"seconds, start-up included. With the workers at the floor the fifty would still need "
          f"{m['at_floor']:.2f} ({m['at_floor'] / m['budget']:.0%} of it); the engine's share alone is "
          f"{m['engine']:.2f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
