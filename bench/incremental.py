"""Runs that cost what changed: a scheduled re-run over a 100,000-invoice window in which 100 invoices changed.

    /tmp/venv/bin/python bench/incremental.py                 # N=100,000, 100 changes
    /tmp/venv/bin/python bench/incremental.py --n 10000       # smaller
    /tmp/venv/bin/python bench/incremental.py --zoho-only     # the Zoho budget arithmetic alone
    /tmp/venv/bin/python bench/incremental.py --airbyte /tmp/peers-venvs/airbyte/bin/python   # + Airbyte
    /tmp/venv/bin/python bench/incremental.py --fake-server --peers-only   # today's re-scan, peers' server

The runner's own Stripe simulator (StripeSimulator(synthetic=N), unthrottled, served over a socket by
SandboxServer) stands in for Stripe: the peers' fake server has no /v1/events. Each run is the whole process,
`python -m runner apply config.yaml -o json`, in a throw-away workspace whose spec is integrations.d/stripe.yaml
with one extra environment pointing at the socket. Requests are the simulator's counter before and after.

1. first import (a full scan: no cursor yet), then 100 invoices change at the source: 50 paid after their case
   was created, 30 voided, 20 marked uncollectible (each recorded as the event Stripe sends);
2. the scheduled re-run: the change feed (one page of events, the account) — the figure this is about;
3. today's full re-scan of the same window (`apply --full`), for comparison.

Then the Zoho sample (sample-config.yaml's connection, organization 60001) at a five-minute schedule: the
requests of a full scan and of a change run, measured, and the day's total against a 1,000-call budget.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.sandbox.core import SandboxServer  # noqa: E402
from runner.sandbox.stripe import StripeSimulator  # noqa: E402
from runner.sandbox.zoho import ZohoSimulator  # noqa: E402

STRIPE_KEY = "sk_test_sandbox_4eC39HqLyjWDarjtT1zdp7dc"


def _apply(cfg: Path, *args: str) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "runner", "apply", str(cfg), "-o", "json", *args], cwd=cfg.parent,
                         env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if out.returncode not in (0, 1):
        raise SystemExit(f"apply failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout), wall


def _stripe_workspace(work: Path, url: str) -> Path:
    (work / "integrations.d").mkdir(parents=True)
    spec = yaml.safe_load((ROOT / "integrations.d" / "stripe.yaml").read_text())
    test = spec["environments"]["test"]
    spec["environments"] = {"bench": {"description": "the runner's Stripe simulator over a socket (benchmark)",
                                      "base_url": url, "credentials": test.get("credentials", {}),
                                      "test": True},
                            **spec["environments"]}
    (work / "integrations.d" / "stripe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (work / "key").write_text(STRIPE_KEY)
    cfg = work / "config.yaml"
    cfg.write_text("version: 1\nstate: state.db\nintegrations_dir: integrations.d\n"
                   "destination: {type: jsonl, path: out/cases.jsonl}\nconnections:\n"
                   "  - name: bench\n    integration: stripe\n    environment: bench\n"
                   "    credentials: {api_key: \"${file:key}\"}\n    window: {last: 90d}\n")
    return cfg


def _row(label: str, summary: dict, wall: float, requests: int) -> str:
    c = summary["connections"][0]
    scan = c.get("scan") or {}
    return (f"| {label} | {scan.get('mode', '?')} | {c['seen']:,} | {c['imported']:,} | "
            f"{sum(c['skipped'].values()):,} | {requests:,} | {wall:.2f} |")


def stripe(n: int, changes: int) -> None:
    sim = StripeSimulator(synthetic=n)
    sim.set_faults({"rate_limit_per_s": 1_000_000})  # unthrottled, as the peers' throughput targets
    server = SandboxServer({"stripe": sim})
    server.start()
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        cfg = _stripe_workspace(work, server.url("stripe"))
        rows = []
        before = sim.requests
        first, wall = _apply(cfg)
        rows.append(_row("first import", first, wall, sim.requests - before))
        # 100 invoices change at the source, some of them imported (their case exists) and then paid
        synthetic = [i for i in sim.data["test"]["invoices"] if (i["number"] or "").startswith("SYN-")]
        step = max(1, len(synthetic) // changes)
        picked = synthetic[::step][:changes]
        for k, inv in enumerate(picked):
            if k < changes // 2:
                sim.update_invoice(inv["id"], "invoice.paid", status="paid", amount_paid=inv["amount_due"],
                                   amount_remaining=0)
            elif k < changes * 8 // 10:
                sim.update_invoice(inv["id"], "invoice.voided", status="void", amount_remaining=0)
            else:
                sim.update_invoice(inv["id"], "invoice.marked_uncollectible", status="uncollectible")
        before = sim.requests
        incremental, wall_inc = _apply(cfg)
        req_inc = sim.requests - before
        rows.append(_row(f"scheduled re-run, {len(picked)} changed (change feed)", incremental, wall_inc, req_inc))
        before = sim.requests
        full, wall_full = _apply(cfg, "--full")
        req_full = sim.requests - before
        rows.append(_row("the same re-run as a full re-scan (`--full`)", full, wall_full, req_full))
        event_pages = -(-len(picked) // 100)
        print(f"\n## Stripe: N={n:,} synthetic open invoices in the window, {len(picked)} changed\n")
        print("| run | read | seen | imported | skipped | requests | wall s |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        print(f"\nchange feed: {req_inc} requests = {event_pages} page(s) of events + {req_inc - event_pages} "
              f"(the account; customers of changed open invoices: none here) vs {req_full} for the full re-scan; "
              f"wall {wall_inc:.2f} s vs {wall_full:.2f} s ({wall_full / wall_inc:.1f}x)")
        c = incremental["connections"][0]
        print(f"scan: {c['scan']}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def zoho() -> None:
    sim = ZohoSimulator()
    server = SandboxServer({"zoho": sim})
    server.start()
    work = Path(tempfile.mkdtemp(prefix="bench-zoho-"))
    try:
        shutil.copytree(ROOT / "sandbox-secrets", work / "sandbox-secrets")
        accounts = server.url("zoho") + "/accounts.zoho.com"
        cfg = work / "config.yaml"
        cfg.write_text(
            "version: 1\nstate: state.db\ndestination: {type: jsonl, path: out/cases.jsonl}\nconnections:\n"
            "  - name: acme-zoho\n    integration: zoho_books\n    environment: sandbox\n"
            "    credentials:\n"
            "      client_id: \"${file:sandbox-secrets/zoho_client_id}\"\n"
            "      client_secret: \"${file:sandbox-secrets/zoho_client_secret}\"\n"
            "      refresh_token: \"${file:sandbox-secrets/zoho_refresh_token}\"\n"
            f"    options: {{organization_id: \"60001\", accounts_server: \"{accounts}\"}}\n"
            "    window: {last: 90d}\n")

        def books_calls() -> int:  # API calls to Zoho Books (the budget), not to the accounts server (OAuth)
            return sum(1 for _, p in sim.request_log if "/books/v3/" in p)

        invoices = sim.orgs["60001"]["invoices"]

        def pay_three() -> None:
            for inv in [i for i in invoices if i["status"] == "overdue"][:3]:
                inv["status"], inv["balance"] = "paid", 0.0
                sim.record_change("60001", inv)

        def new_unpaid() -> None:
            inv = dict(next(i for i in invoices if i["status"] == "overdue"), invoice_id="6000199999",
                       invoice_number="INV-NEW-1", status="sent")
            invoices.append(inv)
            sim.record_change("60001", inv)

        runs = []
        for label, change in (("full scan (first run)", None), ("change run, nothing changed", None),
                              ("change run, 3 invoices paid at the source", pay_three),
                              ("change run, 1 new unpaid invoice", new_unpaid)):
            if change is not None:
                change()
            sim.request_log.clear()
            summary, wall = _apply(cfg)
            runs.append((label, books_calls(), summary["connections"][0]))
        full, idle, paid, new = (r[1] for r in runs)
        per_day = 24 * 60 // 5
        print("\n## Zoho sample (organization 60001) at a five-minute schedule\n")
        print("| run | read | seen | Zoho Books API calls |")
        print("|---|---|---|---|")
        for label, calls, c in runs:
            print(f"| {label} | {c['scan']['mode']} | {c['seen']} | {calls} |")
        worst = full + (per_day - 1) * new
        print(f"\nper day: {per_day} runs = 1 full scan (full_scan_every: 1d) + {per_day - 1} change runs")
        print(f"  nothing changing:                        {full} + {per_day - 1} x {idle} = "
              f"{full + (per_day - 1) * idle} calls")
        print(f"  payments in every run:                   {full} + {per_day - 1} x {paid} = "
              f"{full + (per_day - 1) * paid} calls")
        print(f"  a new unpaid invoice in every run:       {full} + {per_day - 1} x {new} = {worst} calls "
              f"({'inside' if worst <= 1000 else 'OVER'} a 1,000-call budget)")
        print(f"  without a change feed (a full scan each): {per_day} x {full} = {per_day * full} calls")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


PEERS = ROOT.parent / "shared" / "peers"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_server(n: int):
    import urllib.request

    port = _free_port()
    server = subprocess.Popen([sys.executable, str(PEERS / "fake_stripe.py"), str(port), str(n)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def stats() -> int:
        with urllib.request.urlopen(url + "/_stats", timeout=5) as r:
            return json.loads(r.read())["requests"]

    for _ in range(1200):
        try:
            stats()
            break
        except OSError:
            time.sleep(0.2)
    return server, url, stats


def rescan_on_fake_server(n: int) -> None:
    """Today's full re-scan on the peers' fake server (pre-rendered answers: the runner's own cost, not a
    simulator's): a first import, then the re-run of the whole window (every invoice a duplicate)."""
    from bench import workspace

    server, url, stats = _fake_server(n)
    work = Path(tempfile.mkdtemp(prefix="bench-rescan-"))
    try:
        cfg = workspace.make(work / "w", url)
        rows = []
        for label in ("first import", "re-run of the whole window (today's scheduled run)"):
            before = stats()
            summary, wall = _apply(cfg, "--full")  # the fake server has no /v1/events
            rows.append(_row(label, summary, wall, stats() - before - 1))
        print(f"\n## The runner's full re-scan on the peers' fake server (N={n:,})\n")
        print("| run | read | seen | imported | skipped | requests | wall s |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def airbyte(python: str, n: int) -> None:
    """The peers' Airbyte manifest in its incremental mode (a DatetimeBasedCursor on `created`) against the
    peers' fake server: a first read without state, then a re-run from the state it emitted."""
    server, url, stats = _fake_server(n)
    work = Path(tempfile.mkdtemp(prefix="bench-airbyte-"))
    try:
        (work / "config.json").write_text(json.dumps({"base_url": url, "api_key": "sk_test_bench",
                                                      "start_ts": "1640995200", "end_ts": "1704067200"}))
        rows = []
        state_arg: list[str] = []
        for label in ("first read (no state)", "incremental re-run (from its state)"):
            before = stats()
            started = time.perf_counter()
            out = subprocess.run([python, str(PEERS / "airbyte" / "run_airbyte.py"), "read", "--config",
                                  str(work / "config.json"), "--catalog", str(PEERS / "airbyte" / "catalog.json"),
                                  *state_arg], capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - started
            requests = stats() - before - 1
            records, state = 0, None
            for line in out.stdout.splitlines():
                if line.startswith('{"type":"RECORD"') or line.startswith('{"type": "RECORD"'):
                    records += 1
                elif '"STATE"' in line[:30]:
                    state = json.loads(line)["state"]
            rows.append(f"| Airbyte: {label} | {records:,} | {requests:,} | {wall:.2f} |")
            if state is not None:
                (work / "state.json").write_text(json.dumps([state]))
                state_arg = ["--state", str(work / "state.json")]
        print(f"\n## Airbyte's incremental mode (peers' manifest, fake server, N={n:,})\n")
        print("| run | records | requests | wall s |")
        print("|---|---|---|---|")
        print("\n".join(rows))
        print("\nIts cursor is the invoice's `created`: a re-run reads only invoices created since, so an invoice "
              "paid, voided or marked uncollectible after it was read is never read again (the peers' fake "
              "server cannot change an invoice, and has no /v1/events).")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--zoho-only", action="store_true")
    ap.add_argument("--airbyte", metavar="PYTHON", help="the Python of a venv with airbyte-cdk (../shared/peers/setup.sh)")
    ap.add_argument("--fake-server", action="store_true",
                    help="also time the runner's full re-scan on the peers' fake server")
    ap.add_argument("--peers-only", action="store_true", help="only --fake-server and --airbyte")
    a = ap.parse_args()
    if a.fake_server:
        rescan_on_fake_server(a.n)
    if a.airbyte:
        airbyte(a.airbyte, a.n)
    if a.peers_only:
        return
    if not a.zoho_only:
        stripe(a.n, a.changes)
    zoho()


if __name__ == "__main__":
    main()
