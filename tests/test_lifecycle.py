"""After the case exists: invoices paid, voided or credited at the source are found by the next run and told
once on the case's chat; the invoice PDF is uploaded to each case once; both survive a SIGKILL between the
request and its record. Real CLI subprocesses against the file-backed simulators."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, query, run_cli, store_of, use_backend

CONFIG = """state: state/state.db
{integrations_dir}
destination:
  type: debitura
  environment: sandbox
  api_key: "${{file:sandbox-secrets/debitura_api_key}}"
connections:
  - name: acme-stripe
    integration: stripe
    environment: sandbox
    credentials: {{api_key: "${{file:sandbox-secrets/stripe_api_key}}"}}
    window: {{last: 90d}}
"""


def workspace(tmp: Path, edit=None, backend: str = "sqlite") -> Path:
    shutil.copytree(ROOT / "sandbox-secrets", tmp / "sandbox-secrets")
    extra = ""
    if edit is not None:
        import yaml

        (tmp / "integrations.d").mkdir()
        spec = yaml.safe_load((ROOT / "integrations.d" / "stripe.yaml").read_text())
        edit(spec)
        (tmp / "integrations.d" / "stripe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        extra = "integrations_dir: integrations.d"
    cfg = tmp / "config.yaml"
    cfg.write_text(CONFIG.format(integrations_dir=extra))
    return use_backend(cfg, backend)


def cli(*args, env=None, ok=True):
    r = run_cli(*args, env=env)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def apply(cfg: Path, env=None, ok=True) -> dict | None:
    r = cli("apply", str(cfg), "--output", "json", env=env, ok=ok)
    return json.loads(r.stdout) if r.returncode == 0 else None


def debitura(cfg: Path):
    from runner.sandbox.debitura import DebituraSimulator
    from runner.spec import config

    # Beside the store's file, or for a PostgreSQL store beside the config (the store's local_dir).
    return DebituraSimulator("production", data_dir=config.load(cfg, strict=False).state_path.parent / "sandbox")


def rows(cfg: Path, sql: str) -> list[tuple]:
    store = store_of(cfg)
    try:
        return query(store, sql)
    finally:
        store.close()


def ledger(cfg: Path) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in rows(cfg, "SELECT number, invoice_id, case_id, case_reference FROM ledger "
                                           "WHERE status='delivered'")}


def events(cfg: Path) -> list[tuple]:
    return rows(cfg, "SELECT invoice_id, kind, status, detail FROM source_changes ORDER BY seen_at")


def test_paid_and_voided_at_the_source_are_told_once_on_each_case(tmp_path, backend):
    cfg = workspace(tmp_path, backend=backend)
    first = apply(cfg)
    assert first["connections"][0]["imported"] == 13
    cases = ledger(cfg)
    paid, voided = "SBX-0026", "SBX-0024"
    assert paid in cases and voided in cases
    cli("sandbox", "pay", str(cfg), "stripe", paid)
    cli("sandbox", "void", str(cfg), "stripe", voided)

    plan = json.loads(cli("plan", str(cfg), "--output", "json").stdout)["connections"][0]["after_case"]
    assert plan["would_tell"] == 2
    assert {c["number"]: c["kind"] for c in plan["changes"]} == {paid: "paid", voided: "void"}
    sim = debitura(cfg)
    assert sim.chats(cases[paid][1]) == [] and sim.chats(cases[voided][1]) == []  # a plan tells nobody

    second = apply(cfg)["connections"][0]["after_case"]
    assert second["recorded"] == 2 and second["told"] == 2
    # Stripe's change feed brought both (invoice.paid, invoice.voided) with the run's own requests: no look-up.
    assert second["looked_up"] == 0 and second["requests"] == 0
    assert {(e[1], e[2]) for e in events(cfg)} == {("paid", "told"), ("void", "told")}

    sim = debitura(cfg)
    paid_chat, void_chat = sim.chats(cases[paid][1]), sim.chats(cases[voided][1])
    assert len(paid_chat) == 1 and len(void_chat) == 1
    text = paid_chat[0]["message"]
    assert "PAID IN FULL in Stripe" in text and "1,840.50 EUR" in text and "still owed there: 0.00 EUR" in text
    assert "as of 20" in text  # the date Stripe shows
    assert "VOIDED" in void_chat[0]["message"]
    assert paid_chat[0]["user"]["email"] == "finance@sandbox-creditor.example"  # the first user of GET /users
    other = next(v for k, v in cases.items() if k not in (paid, voided))
    assert sim.chats(other[1]) == []

    third = apply(cfg)["connections"][0]["after_case"]  # nothing new: no second message
    assert third["told"] == 0 and third["looked_up"] == 0
    sim = debitura(cfg)
    assert len(sim.chats(cases[paid][1])) == 1 and len(sim.chats(cases[voided][1])) == 1

    explained = cli("explain", str(cfg), paid).stdout
    assert f"imported on" in explained and f"as case {cases[paid][2]}" in explained
    assert "paid in full at Stripe as of" in explained and "1,840.50 EUR" in explained
    assert "Debitura was told on the case's chat on" in explained
    assert "the original invoice (invoice-SBX-0026.pdf) was uploaded" in explained
    status = cli("status", str(cfg)).stdout
    assert "changed at the source since import: 1 paid, 1 void (all told to Debitura)" in status


def test_sigkill_between_chat_post_and_record_tells_once(tmp_path, backend):
    cfg = workspace(tmp_path, backend=backend)
    apply(cfg)
    cases = ledger(cfg)
    cli("sandbox", "pay", str(cfg), "stripe", "SBX-0026")
    killed = cli("apply", str(cfg), env={"RUNNER_TEST_CRASH_AT": "after_chat_post"}, ok=False)
    assert killed.returncode == -9, killed.stderr
    assert [(e[1], e[2]) for e in events(cfg)] == [("paid", "telling")]  # posted, not recorded as told
    assert len(debitura(cfg).chats(cases["SBX-0026"][1])) == 1

    after = apply(cfg)["connections"][0]["after_case"]
    assert after["told"] == 1  # found in the case's chat, not posted again
    assert [(e[1], e[2]) for e in events(cfg)] == [("paid", "told")]
    assert len(debitura(cfg).chats(cases["SBX-0026"][1])) == 1


def test_a_failed_chat_post_is_retried_on_the_next_run(tmp_path, backend):
    cfg = workspace(tmp_path, backend=backend)
    apply(cfg)
    cli("sandbox", "void", str(cfg), "stripe", "SBX-0024")
    text = cfg.read_text().replace("  api_key:", "  chat_user_email: nobody@elsewhere.example\n  api_key:", 1)
    cfg.write_text(text)
    r = cli("apply", str(cfg), "--output", "json", ok=False)
    out = json.loads(r.stdout)["connections"][0]
    assert out["status"] == "ok" and out["after_case"]["tell_failed"] == 1  # the case and the run are not failed
    assert [(e[1], e[2]) for e in events(cfg)] == [("void", "failed")]
    cfg.write_text(text.replace("nobody@elsewhere.example", "ops@sandbox-creditor.example"))
    assert apply(cfg)["connections"][0]["after_case"]["told"] == 1
    chat = debitura(cfg).chats(ledger(cfg)["SBX-0024"][1])
    assert len(chat) == 1 and chat[0]["user"]["email"] == "ops@sandbox-creditor.example"


def test_partial_payment_and_credit_are_told_with_their_amounts(tmp_path):
    cfg = workspace(tmp_path)
    apply(cfg)
    cases = ledger(cfg)
    cli("sandbox", "pay", str(cfg), "stripe", "SBX-0022", "--amount", "10")
    cli("sandbox", "credit", str(cfg), "stripe", "SBX-0020")
    after = apply(cfg)["connections"][0]["after_case"]
    assert after["told"] == 2
    partial = debitura(cfg).chats(cases["SBX-0022"][1])[0]["message"]
    assert "PARTLY PAID" in partial and "Paid there: 10.00 USD" in partial and "12,490.00 USD" in partial
    credit = debitura(cfg).chats(cases["SBX-0020"][1])[0]["message"]
    assert "CREDITED" in credit
    # A partly paid invoice stays open: paid in full later, it is a new change, told again.
    cli("sandbox", "pay", str(cfg), "stripe", "SBX-0022")
    assert apply(cfg)["connections"][0]["after_case"]["told"] == 1
    msgs = [c["message"] for c in debitura(cfg).chats(cases["SBX-0022"][1])]
    assert len(msgs) == 2 and "PAID IN FULL" in msgs[1]


def test_invoice_pdf_is_on_each_case_once_across_a_sigkill(tmp_path, backend):
    cfg = workspace(tmp_path, backend=backend)
    killed = cli("apply", str(cfg), env={"RUNNER_TEST_CRASH_AT": "after_file_upload"}, ok=False)
    assert killed.returncode == -9
    cases = ledger(cfg)
    assert len(cases) == 13  # the cases were recorded before any upload
    sim = debitura(cfg)
    assert sum(len(sim.files(c[1])) for c in cases.values()) == 1  # killed right after the first upload

    apply(cfg)
    sim = debitura(cfg)
    for number, (_, case_id, _) in cases.items():
        files = sim.files(case_id)
        assert len(files) == 1, (number, files)
        assert files[0]["documentType"] == "OriginalInvoice" and files[0]["fileName"] == f"invoice-{number}.pdf"
        content = sim.file_content(files[0]["id"])
        assert content.startswith(b"%PDF-1.4") and content.rstrip().endswith(b"%%EOF")
        assert f"Invoice {number}".encode() in content
    assert apply(cfg)["connections"][0]["after_case"]["documents"] == {}  # nothing left to upload


def test_a_document_link_off_the_declared_hosts_is_not_fetched_and_never_blocks_the_case(tmp_path):
    def edit(spec):
        spec["document"]["hosts"] = ["files.stripe.com"]  # pay.stripe.com, where the links point, is not allowed

    cfg = workspace(tmp_path, edit)
    out = apply(cfg)["connections"][0]
    assert out["imported"] == 13 and out["status"] == "ok"
    assert out["after_case"]["documents"] == {"failed": 13}
    errors = {r[0] for r in rows(cfg, "SELECT error FROM case_documents")}
    assert len(errors) == 1 and "pay.stripe.com, which is not one of the spec's document hosts" in errors.pop()
    assert all(debitura(cfg).files(c[1]) == [] for c in ledger(cfg).values())

    def fixed(spec):
        pass

    shutil.rmtree(tmp_path / "integrations.d")
    (tmp_path / "integrations.d").mkdir()
    shutil.copy(ROOT / "integrations.d" / "stripe.yaml", tmp_path / "integrations.d" / "stripe.yaml")
    assert apply(cfg)["connections"][0]["after_case"]["documents"] == {"uploaded": 13}  # retried


def test_recheck_state_must_be_a_known_change(tmp_path):
    def edit(spec):
        spec["recheck"]["state"] = "status == 'paid' && 'settled' || null"

    cfg = workspace(tmp_path, edit)
    apply(cfg)
    cli("sandbox", "pay", str(cfg), "stripe", "SBX-0026")
    out = apply(cfg)["connections"][0]
    assert out["status"] == "ok"
    assert any("recheck.state gave 'settled'" in e for e in out["after_case"]["errors"])
    assert events(cfg) == []


def test_spec_language_rejects_a_document_link_without_hosts(tmp_path):
    (tmp_path / "good").mkdir()
    assert cli("validate", str(workspace(tmp_path / "good", lambda spec: None))).returncode == 0

    def edit(spec):
        spec["document"] = {"url": "invoice_pdf"}  # a link with no hosts it may point to

    (tmp_path / "bad").mkdir()
    r = cli("validate", str(workspace(tmp_path / "bad", edit)), ok=False)
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert "stripe.yaml" in out and "document" in out and "hosts" in out


def test_a_document_of_a_type_debitura_does_not_take_is_refused_once_and_the_case_stays(tmp_path):
    def edit(spec):  # the invoice's JSON, not a document: not an allowed file type
        spec["document"] = {"request": {"method": "GET", "path": "/v1/invoices/{{ invoice_id }}"}}

    cfg = workspace(tmp_path, edit)
    out = apply(cfg)["connections"][0]
    assert out["imported"] == 13 and out["after_case"]["documents"] == {"refused": 13}
    assert apply(cfg)["connections"][0]["after_case"]["documents"] == {}  # refused ones are not tried again
    explained = cli("explain", str(cfg), "SBX-0026").stdout
    assert "the original invoice was not uploaded: the document is of type application/json" in explained
    doctor = cli("doctor", str(cfg), ok=False).stdout
    assert "13 refused (too large or a type Debitura does not take)" in doctor


def test_doctor_and_status_say_what_is_not_told_yet(tmp_path, backend):
    cfg = workspace(tmp_path, backend=backend)
    apply(cfg)
    cli("sandbox", "void", str(cfg), "stripe", "SBX-0024")
    text = cfg.read_text()
    cfg.write_text(text.replace("  api_key:", "  chat_user_email: nobody@elsewhere.example\n  api_key:", 1))
    cli("apply", str(cfg), ok=False)
    doctor = cli("doctor", str(cfg), ok=False).stdout
    assert "1 of 1 change(s) found at the source are not told to the case's partner yet" in doctor
    assert "The user is not an active member of your team" in doctor  # the event's error
    assert ("`chat_user_email: nobody@elsewhere.example` is not a member of your Debitura team (GET /users lists "
            "finance@sandbox-creditor.example, ops@sandbox-creditor.example)") in doctor
    st = json.loads(cli("status", str(cfg), "--output", "json").stdout)
    assert st["after_case"]["untold"] == 1 and st["after_case"]["source_changes"] == {"void": {"failed": 1}}
    assert "(1 not told to Debitura yet)" in cli("status", str(cfg)).stdout


def test_a_case_outside_the_window_is_looked_up_at_most_once_an_interval(tmp_path):
    def edit(spec):
        spec["recheck"]["interval_minutes"] = 600

    cfg = workspace(tmp_path, edit)
    apply(cfg)
    cfg.write_text(cfg.read_text().replace("window: {last: 90d}", "window: {last: 1d}"))  # every case outside it
    first = apply(cfg)["connections"][0]["after_case"]
    assert first["looked_up"] == 13 and first["requests"] == 13 and first["seen_in_window"] == 0
    again = apply(cfg)["connections"][0]["after_case"]
    assert again["looked_up"] == 0 and again["requests"] == 0 and again["left_for_later"] == 0


def test_sandbox_controls_name_what_they_cannot_find(tmp_path):
    cfg = workspace(tmp_path)
    r = cli("sandbox", "pay", str(cfg), "stripe", "NOPE", ok=False)
    assert r.returncode == 1 and "the stripe simulator has no invoice 'NOPE'" in r.stderr and "fix:" in r.stderr
    r = cli("sandbox", "void", str(cfg), "xero", "1", ok=False)
    assert "there is no simulated source called 'xero'" in r.stderr and "stripe, quickbooks, zoho" in r.stderr
    assert not (tmp_path / "state" / "sandbox" / "source-changes.json").exists()  # nothing recorded


def test_open_cases_are_looked_up_least_recently_checked_first_on_both_stores(tmp_path, backend):
    """A run looks up at most `max_lookups` open cases, never-checked first (oldest first), then the least
    recently checked, so that a bounded number of look-ups per run reaches every case in turn; the cases the
    run saw in its window, settled ones and those checked since `checked_before` are not looked up; an
    account of 1,200 open cases gets 1,100 whole rows back."""
    import time as clock

    from runner.state import open_store

    store = open_store(tmp_path / "state.db" if backend == "sqlite" else backend, destination="jsonl:out")
    try:
        for i in range(6):  # one transaction each: each its own `updated`, in this order
            store.record_imported([("acct", f"i{i}", "c", f"N{i}", f"k{i}", f"case{i}", f"R{i}")], run_id=None)
        store.mark_checked("acct", ["i0"])
        between = clock.time()
        store.mark_checked("acct", ["i1"])
        later = clock.time() + 1
        store.record_source_change("acct", "i5", "e5", "case5", "paid", True, {"state": "paid"}, "paid", None)

        todo, due = store.cases_to_recheck("acct", 3, exclude={"i3"}, checked_before=later)
        assert [r.invoice_id for r in todo] == ["i2", "i4", "i0"] and due == 4
        assert todo[0].case_id == "case2" and todo[0].number == "N2"
        todo, due = store.cases_to_recheck("acct", 10, exclude={"i3"}, checked_before=later)
        assert [r.invoice_id for r in todo] == ["i2", "i4", "i0", "i1"] and due == 4
        todo, due = store.cases_to_recheck("acct", 10, exclude=(), checked_before=between)  # i1 checked since
        assert [r.invoice_id for r in todo] == ["i2", "i3", "i4", "i0"] and due == 4

        many = [("big", f"b{i}", "c", f"B{i}", f"kb{i}", f"cb{i}", None) for i in range(1200)]
        store.record_imported(many, run_id=None)
        todo, due = store.cases_to_recheck("big", 1100, exclude={"b7"}, checked_before=later)
        assert due == 1199 and len(todo) == 1100 and len({r.invoice_id for r in todo}) == 1100
        assert "b7" not in {r.invoice_id for r in todo}
        assert all(r.case_id == "cb" + r.invoice_id[1:] for r in todo)
    finally:
        store.close()


def test_what_a_run_saw_of_its_cases_is_read_back_on_both_stores(tmp_path, backend):
    """The invoices with a case that a run saw again in its window: those it saw still unpaid (no look-up
    needed) and, from their verdicts' detail, what the source shows of those no longer unpaid (told without
    a request); another run's verdicts, another account's and other reasons are not this run's."""
    import json as js

    from runner.state import open_store

    store = open_store(tmp_path / "state.db" if backend == "sqlite" else backend, destination="jsonl:out")
    try:
        run, other = store.begin_run("apply", "config.yaml"), store.begin_run("apply", "config.yaml")
        paid = {"state": "paid", "paid_at": "2026-12-01"}
        store.record_verdicts(run, [
            ("c", "acct", "i1", "N1", "skipped", "duplicate", js.dumps({"case": "case1"})),
            ("c", "acct", "i2", "N2", "skipped", "duplicate", js.dumps({"case": "case2", "at_source": paid})),
            ("c", "acct", "i3", "N3", "skipped", "duplicate", None),
            ("c", "acct", "i4", "N4", "skipped", "not_yet_due", js.dumps({"at_source": paid})),
            ("c", "other", "i5", "N5", "skipped", "duplicate", None)])
        store.record_verdicts(other, [("c", "acct", "i6", "N6", "skipped", "duplicate", None)])
        store.record_imported([("acct", "i7", "c", "N7", "k7", "case7", "R7")], run_id=run)
        unpaid, changed = store.seen_in_run(run, "acct")
        assert unpaid == {"i1", "i3", "i7"} and changed == {"i2": paid}
    finally:
        store.close()
