"""plan and apply against the built-in sandbox: every verdict, exactly-once, and plan creating nothing."""
from __future__ import annotations

import asyncio
import json
from decimal import Decimal

from runner import sandbox
from runner.spec import config
from runner.engine import pipeline
import pytest

from conftest import query, run_cli, store_of, use_backend


@pytest.fixture
def sandbox_config(sandbox_config, backend):
    """Every test here runs on both state stores."""
    return use_backend(sandbox_config, backend)


def Store(path):  # noqa: N802 - the store a test config names, on its backend
    return store_of(path)


def _run(cfg_path, mode, details=True):
    cfg = config.load(cfg_path)
    store = store_of(cfg_path)
    try:
        return cfg, asyncio.run(pipeline.sync(cfg, mode=mode, store=store, details=details))
    finally:
        store.close()


def _cases(cfg):
    return sandbox.get_simulator("debitura", cfg.state_path.parent / "sandbox").cases()


def _by_kind(cfg):
    """The sandbox's own labels, so expectations come from the data set, not from the runner."""
    from runner.sandbox.stripe import build_dataset, today_anchor

    kinds = {}
    for inv in build_dataset(today_anchor())["test"]["invoices"]:
        kinds[inv["id"]] = inv["_sandbox_kind"]
    return kinds


def test_apply_gives_every_invoice_one_verdict_with_the_right_reason(sandbox_config):
    cfg, result = _run(sandbox_config, "apply")
    (conn,) = result.connections
    assert conn.status == "ok", conn.error
    kinds = _by_kind(cfg)
    verdicts = {v.invoice_id: v for v in conn.verdicts}
    assert set(verdicts) == set(kinds), "every invoice the provider returned has exactly one verdict"
    expected = {"open": ("imported", None), "open_address_on_customer": ("imported", None),
                "open_partial": ("skipped", "not_unpaid"), "paid": ("skipped", "not_unpaid"),
                "void": ("skipped", "not_unpaid"), "draft": ("skipped", "not_unpaid"),
                "uncollectible": ("skipped", "not_unpaid"), "open_incomplete_address": ("skipped", "incomplete_address"),
                "open_old": ("skipped", "outside_date_window")}
    for inv_id, kind in kinds.items():
        v = verdicts[inv_id]
        assert (v.verdict, v.reason) == expected[kind], (inv_id, kind, v)
    partial = [v for i, v in verdicts.items() if kinds[i] == "open_partial"]
    assert all("partially paid" in v.message for v in partial)
    incomplete = [v for i, v in verdicts.items() if kinds[i] == "open_incomplete_address"]
    assert sorted(tuple(v.detail["missing"]) for v in incomplete) == sorted(
        [("postal_code",), ("city",), ("street", "city", "postal_code", "country")])
    # one case per imported invoice, with the invoice number as creditorReference
    cases = _cases(cfg)
    imported = [v for v in verdicts.values() if v.verdict == "imported"]
    assert sorted(c["creditorReference"] for c in cases) == sorted(v.number for v in imported)
    # the verdicts are recorded in the state store, one per invoice (an imported one is its ledger row)
    store = Store(cfg.file)
    stored = store.run_verdicts(result.run_id, limit=10_000)
    store.close()
    assert len(stored) == len({r["invoice_id"] for r in stored}) == len(kinds)
    assert sorted((r["invoice_id"], r["verdict"], r["reason"]) for r in stored) == sorted(
        (i, v.verdict, v.reason) for i, v in verdicts.items())
    assert all(r["detail"]["message"] == verdicts[r["invoice_id"]].message for r in stored if r["verdict"] == "imported")


def test_second_apply_creates_nothing_and_reports_duplicates(sandbox_config):
    cfg, first = _run(sandbox_config, "apply")
    n = first.connections[0].imported
    assert n > 0
    before = len(_cases(cfg))
    _, second = _run(sandbox_config, "apply")
    conn = second.connections[0]
    assert conn.imported == 0
    assert conn.skipped()["duplicate"] == n
    assert len(_cases(cfg)) == before
    assert "already imported" in conn.why_zero()
    dup = next(v for v in conn.verdicts if v.reason == "duplicate")
    assert dup.detail["case_reference"]


def test_plan_creates_nothing_and_predicts_apply(sandbox_config):
    cfg, planned = _run(sandbox_config, "plan")
    assert _cases(cfg) == []
    store = Store(cfg.file)
    assert query(store, "SELECT COUNT(*) FROM ledger") == [(0,)]
    store.close()
    _, applied = _run(sandbox_config, "apply")
    assert planned.connections[0].counts == applied.connections[0].counts


def test_currency_exponents_reach_the_case(sandbox_config):
    cfg, result = _run(sandbox_config, "apply")
    from runner.sandbox.stripe import build_dataset, today_anchor

    raw = {i["id"]: i for i in build_dataset(today_anchor())["test"]["invoices"]}
    cases = {c["creditorReference"]: c for c in _cases(cfg)}
    seen = set()
    for v in result.connections[0].verdicts:
        if v.verdict != "imported":
            continue
        inv = raw[v.invoice_id]
        exp = {"jpy": 0, "kwd": 3}.get(inv["currency"], 2)
        want = Decimal(inv["amount_remaining"]).scaleb(-exp)
        assert v.invoice["amount"] == want
        assert Decimal(str(cases[v.number]["amountToRecover"] if "amountToRecover" in cases[v.number]
                           else cases[v.number]["grossAmount"])) == want
        seen.add(inv["currency"])
    assert {"jpy", "kwd"} <= seen


def test_server_filters_send_status_and_window_to_the_provider(tmp_path, sandbox_env):
    from conftest import SANDBOX_CONFIG, write_config

    path = write_config(tmp_path, SANDBOX_CONFIG.format(server_filters="true"))
    cfg, result = _run(path, "plan")
    conn = result.connections[0]
    # the provider filtered: nothing paid/void/draft or old came back, only open invoices in the window
    assert "outside_date_window" not in conn.skipped()
    assert all(v.detail.get("status") in (None, "open, partially paid") for v in conn.verdicts if v.reason == "not_unpaid")
    sim = sandbox.get_simulator("stripe", cfg.state_path.parent / "sandbox")
    first = next(path for _, path in sim.request_log if path.startswith("/v1/invoices"))
    assert "status=open" in first
    assert "created%5Bgte%5D=" in first or "created[gte]=" in first


def test_cli_apply_twice_and_json_output(sandbox_config, sandbox_env):
    first = run_cli("apply", str(sandbox_config), "--output", "json", "--details", env=sandbox_env)
    assert first.returncode == 0, first.stderr
    data = json.loads(first.stdout)
    conn = data["connections"][0]
    assert conn["imported"] > 0 and conn["skipped"]["not_unpaid"] > 0
    assert {i["verdict"] for i in conn["invoices"]} == {"imported", "skipped"}
    second = run_cli("apply", str(sandbox_config), env=sandbox_env)
    assert second.returncode == 0
    assert "imported 0" in second.stdout and "duplicate" in second.stdout


def test_json_output_of_apply_is_the_summary_and_keeps_no_invoice_list(sandbox_config, sandbox_env):
    """`apply -o json` (for scripts and CI) prints the counts, the reasons and a few examples per reason; the
    verdict of every invoice only with --details. It kept every verdict in memory for nothing: 507 MiB and
    2.4x the time at 100,000 invoices."""
    out = run_cli("apply", str(sandbox_config), "--output", "json", env=sandbox_env)
    assert out.returncode == 0, out.stderr
    (conn,) = json.loads(out.stdout)["connections"]
    assert "invoices" not in conn and conn["imported"] > 0 and conn["skipped"]["not_unpaid"] > 0
    assert conn["samples"]["not_unpaid"][0]["message"]
    plan = run_cli("plan", str(sandbox_config), "--output", "json", env=sandbox_env)
    (planned,) = json.loads(plan.stdout)["connections"]
    assert len(planned["invoices"]) == planned["seen"]  # a plan's JSON lists every invoice


def test_the_ledger_is_per_destination(tmp_path, sandbox_env, backend):
    """Cases written to a file (or to Debitura's test environment) do not make invoices duplicates for production."""
    from conftest import SANDBOX_CONFIG, write_config

    text = SANDBOX_CONFIG.format(server_filters="false")
    jsonl = text.replace('  type: debitura\n  environment: sandbox\n  api_key: "${DEBITURA_API_KEY}"',
                         "  type: jsonl\n  path: out/cases.jsonl")
    assert jsonl != text
    _, to_file = _run(use_backend(write_config(tmp_path, jsonl), backend), "apply")
    n = to_file.connections[0].imported
    assert n > 0
    cfg, to_debitura = _run(use_backend(write_config(tmp_path, text), backend), "apply")
    assert to_debitura.connections[0].imported == n
    assert len(_cases(cfg)) == n
    _, again = _run(use_backend(write_config(tmp_path, jsonl), backend), "apply")
    assert again.connections[0].imported == 0 and again.connections[0].skipped()["duplicate"] == n


def test_only_the_latest_runs_keep_their_verdicts_and_the_ledger_and_summaries_stay(tmp_path, sandbox_env,
                                                                                   monkeypatch, backend):
    """A run records a verdict for each invoice it skips: 26 MiB a run at 100,000 invoices once they are all
    duplicates. `state.keep_runs` (default 30) bounds the store; imports are the ledger's, kept for good. Runs
    older than the latest keep_runs and RECENT_RUNS (what status reads) keep their summary's totals, not its
    part for each connection (0.5 KB a connection a run: 72 MB a day for 500 connections every 5 minutes)."""
    from conftest import SANDBOX_CONFIG, write_config

    monkeypatch.setattr(pipeline, "RECENT_RUNS", 3)
    cfg_path = write_config(tmp_path, SANDBOX_CONFIG.format(server_filters="false").replace(
        "state: state/state.db", "state: {type: sqlite, path: state/state.db, keep_runs: 2}"))
    use_backend(cfg_path, backend)
    runs = [_run(cfg_path, "apply", details=False)[1] for _ in range(4)]
    cfg = config.load(cfg_path)
    assert cfg.keep_runs == 2
    store = Store(cfg_path)
    try:
        by_run = dict(query(store, "SELECT run_id, count(*) FROM verdicts GROUP BY run_id"))
        summaries = {i: json.loads(s) for i, s in query(store, "SELECT id, summary FROM runs ORDER BY id")}
        delivered = query(store, "SELECT count(*) FROM ledger WHERE status='delivered'")[0][0]
    finally:
        store.close()
    first, *_, third, fourth = runs
    assert set(by_run) == {third.run_id, fourth.run_id}  # the two latest runs, each with all it skipped
    assert by_run[fourth.run_id] == sum(sum(c.skipped().values()) for c in fourth.connections) > 0
    assert len(summaries) == 4 and delivered == first.totals()["imported"] > 0
    assert summaries[first.run_id] == {k: v for k, v in first.stored().items() if k != "connections"}
    assert all(summaries[r.run_id] == r.stored() for r in runs[1:])  # the latest three: whole


def test_a_runs_stored_summary_has_its_counts_but_not_the_examples_its_verdicts_hold(sandbox_config, sandbox_env):
    """The summary kept with each run is what status reads (counts, why nothing was imported, errors); the
    examples of each reason repeat the run's verdict rows and were 85 % of it, kept for every run forever."""
    result = _run(sandbox_config, "apply", details=False)[1]
    store = Store(sandbox_config)
    try:
        stored = json.loads(query(store, "SELECT summary FROM runs WHERE id=?", (result.run_id,))[0][0])
    finally:
        store.close()
    (conn,) = stored["connections"]
    (ran,) = result.connections
    assert "samples" not in conn and ran.samples  # the run had examples; the store does not keep them
    assert conn["imported"] == ran.imported > 0 and conn["skipped"] == ran.skipped() and conn["seen"] == ran.seen
    assert stored["totals"] == result.totals()


def test_keep_runs_must_be_a_positive_number(tmp_path, sandbox_env):
    from conftest import SANDBOX_CONFIG, write_config

    cfg_path = write_config(tmp_path, SANDBOX_CONFIG.format(server_filters="false").replace(
        "state: state/state.db", "state: {type: sqlite, path: state/state.db, keep_runs: 0}"))
    out = run_cli("validate", str(cfg_path))
    assert out.returncode == 2 and "keep_runs" in out.stdout + out.stderr, out.stdout + out.stderr


def test_a_run_that_ends_in_an_unexpected_error_is_recorded_as_failed_not_left_running(tmp_path, monkeypatch, sandbox_env,
                                                                                         backend):
    import pytest

    from conftest import SANDBOX_CONFIG, write_config
    from runner.engine import destinations

    cfg_path = use_backend(write_config(tmp_path, SANDBOX_CONFIG.format(server_filters="false")), backend)

    async def broken(self):
        raise RuntimeError("the destination's check broke")

    monkeypatch.setattr(destinations.DebituraDestination, "check", broken)
    with pytest.raises(RuntimeError):
        _run(cfg_path, "apply")
    store = Store(cfg_path)
    try:
        ((status, summary),) = query(store, "SELECT status, summary FROM runs ORDER BY id DESC LIMIT 1")
    finally:
        store.close()
    assert status == "failed"
    assert json.loads(summary)["error"] == "unexpected error: RuntimeError: the destination's check broke"
