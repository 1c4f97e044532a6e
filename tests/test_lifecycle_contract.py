"""The chat, users and files requests the runner sends match Debitura's OpenAPI document; the spec language's
batch re-check (QuickBooks) and document requests (QuickBooks, Zoho) work against the simulators; the
re-check entry point takes source records a caller already has (a change feed, a webhook)."""
from __future__ import annotations

import asyncio
import email
import email.policy
import json
import shutil

from jsonschema import Draft202012Validator

from runner import sandbox
from runner.engine import lifecycle, pipeline
from runner.net.http import Clients
from runner.spec import config
from runner.state.sqlite import Store
from tests.conftest import ROOT
from tests.test_debitura_contract import OPENAPI, Recorder, _to_json_schema

CHAT = "Debitura.Web.ExternalApi.Contracts.V1.Chats.SendChatRequest"


def recorded_sync(monkeypatch, cfg_path, mode="apply", full=False):
    recorders = {}
    real = sandbox.get_transport

    def recording(name, data_dir=None):
        recorders[name] = Recorder(real(name, data_dir))
        return recorders[name]

    monkeypatch.setattr(sandbox, "get_transport", recording)
    cfg = config.load(cfg_path)
    store = Store(cfg.state_path)
    try:
        result = asyncio.run(pipeline.sync(cfg, mode=mode, store=store, full=full))
    finally:
        store.close()
    return cfg, result, recorders


def test_chat_users_and_file_requests_match_the_openapi_document(sandbox_config, monkeypatch):
    doc = json.loads(OPENAPI.read_text())
    schemas = _to_json_schema(doc["components"]["schemas"])
    chat_schema = {"$defs": schemas, "$ref": "#/$defs/" + CHAT}
    validator = Draft202012Validator(chat_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    files_post = doc["paths"]["/cases/{id}/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]

    cfg, first, rec = recorded_sync(monkeypatch, sandbox_config)
    uploads = [r for r in rec["debitura"].requests if r.method == "POST" and r.url.path.endswith("/files")]
    assert len(uploads) == first.connections[0].imported == 13
    for req in uploads:
        ctype = req.headers["Content-Type"]
        assert ctype.startswith("multipart/form-data; boundary=")
        msg = email.message_from_bytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + req.content,
                                       policy=email.policy.HTTP)
        parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
        assert set(parts) <= set(files_post["properties"]) and set(files_post["required"]) <= set(parts)
        assert parts["DocumentType"].get_payload(decode=True) == b"OriginalInvoice"
        assert parts["File"].get_content_type() == "application/pdf"
        assert parts["File"].get_filename().startswith("invoice-SBX-")
        assert parts["File"].get_payload(decode=True).startswith(b"%PDF-")

    from runner.sandbox.controls import act

    act(cfg.state_path.parent / "sandbox", "pay", "stripe", "SBX-0026")
    sandbox.reset_cache()
    _, second, rec = recorded_sync(monkeypatch, sandbox_config)
    assert second.connections[0].after_case["told"] == 1
    users = [r for r in rec["debitura"].requests if r.url.path == "/users"]
    assert len(users) == 1 and users[0].method == "GET"
    assert set(users[0].url.params) <= {"Page", "PageSize"}
    posts = [r for r in rec["debitura"].requests if r.method == "POST" and r.url.path.endswith("/chats")]
    assert len(posts) == 1
    body = json.loads(posts[0].content)
    assert [e.message for e in validator.iter_errors(body)] == []
    assert body["userEmail"] == "finance@sandbox-creditor.example" and "SBX-0026" in body["message"]


def test_quickbooks_rechecks_open_cases_thirty_to_a_query_and_uploads_its_pdf(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text("""state: state/state.db
destination: {type: debitura, environment: sandbox, api_key: "${file:sandbox-secrets/debitura_api_key}"}
connections:
  - name: big
    integration: quickbooks_online
    environment: sandbox
    credentials:
      client_id: "${file:sandbox-secrets/quickbooks_client_id}"
      client_secret: "${file:sandbox-secrets/quickbooks_client_secret}"
      refresh_token: "${file:sandbox-secrets/quickbooks_refresh_token}"
    options: {realm_id: "9130357766961111"}
    window: {last: 90d}
""")
    cfg, first, rec = recorded_sync(monkeypatch, cfg_path)
    assert first.connections[0].imported == 3
    pdfs = [r for r in rec["quickbooks"].requests if r.url.path.endswith("/pdf")]
    assert len(pdfs) == 3 and all(r.headers["Accept"] == "application/pdf" for r in pdfs)

    from runner.sandbox.controls import act

    act(cfg.state_path.parent / "sandbox", "pay", "quickbooks_online", "1001")
    act(cfg.state_path.parent / "sandbox", "void", "quickbooks_online", "1002")
    sandbox.reset_cache()
    # A plan (no verdicts of the window are recorded) re-checks every open case: one query for the three.
    _, plan, rec = recorded_sync(monkeypatch, cfg_path, mode="plan", full=True)
    ac = plan.connections[0].after_case
    assert ac["looked_up"] == 3 and ac["requests"] == 1 and ac["would_tell"] == 2
    queries = [r.url.params["query"] for r in rec["quickbooks"].requests if "query" in r.url.params
               and " Id in " in r.url.params["query"]]
    assert len(queries) == 1 and all(f"'{i}'" in queries[0] for i in ("101", "102", "106"))
    assert {c["number"]: c["kind"] for c in ac["changes"]} == {"1001": "paid", "1002": "void"}


def test_zoho_document_is_the_invoice_pdf(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text("""state: state/state.db
destination: {type: debitura, environment: sandbox, api_key: "${file:sandbox-secrets/debitura_api_key}"}
connections:
  - name: z
    integration: zoho_books
    environment: sandbox
    credentials:
      client_id: "${file:sandbox-secrets/zoho_client_id}"
      client_secret: "${file:sandbox-secrets/zoho_client_secret}"
      refresh_token: "${file:sandbox-secrets/zoho_refresh_token}"
    options: {organization_id: "60001"}
    window: {last: 30d}
""")
    cfg, first, rec = recorded_sync(monkeypatch, cfg_path)
    imported = first.connections[0].imported
    docs = first.connections[0].after_case["documents"]
    assert docs == {"uploaded": min(imported, 50)}  # document.max_per_run: the rest on later runs
    pdfs = [r for r in rec["zoho"].requests if r.url.params.get("accept") == "pdf"]
    assert len(pdfs) == docs["uploaded"]
    from runner.sandbox.debitura import DebituraSimulator

    sim = DebituraSimulator("production", data_dir=cfg.state_path.parent / "sandbox")
    files = [f for c in sim.cases() for f in sim.files(c["id"])]
    assert len(files) == docs["uploaded"] and all(f["fileName"].startswith("invoice-INV-") for f in files)


def test_recheck_takes_source_records_a_caller_already_has(sandbox_config):
    """The entry point for a change feed or a webhook: records in, recorded and told once, no look-ups."""
    cfg = config.load(sandbox_config)
    store = Store(cfg.state_path)
    try:
        asyncio.run(pipeline.sync(cfg, mode="apply", store=store))
        from runner.sandbox import get_simulator

        stripe = get_simulator("stripe", cfg.state_path.parent / "sandbox")
        paid = stripe.act("pay", "SBX-0026")
        still_open = next(i for i in stripe.invoices() if i["number"] == "SBX-0022")

        async def feed():
            clients = Clients(sandbox_dir=cfg.state_path.parent / "sandbox")
            from runner.engine import destinations

            dest = destinations.make(cfg.destination, clients)
            source = pipeline.Source(cfg.connections[0], clients, store)
            await source.open()
            before = source.http.requests
            first = await lifecycle.recheck(source, store, dest, [paid, still_open, {"id": "in_unknown"}])
            again = await lifecycle.recheck(source, store, dest, [paid])
            await clients.aclose()
            return first, again, source.http.requests - before

        first, again, requests = asyncio.run(feed())
        assert requests == 0  # the records were given: nothing fetched from the source
        assert [c.kind for c in first.changes] == ["paid"] and first.told == 1
        assert again.recorded == 0 and again.told == 0  # the same change again is not told twice
        events = store.source_changes()
        assert [(e["kind"], e["status"]) for e in events] == [("paid", "told")]
        sim = sandbox.get_simulator("debitura", cfg.state_path.parent / "sandbox")
        assert len(sim.chats(events[0]["case_id"])) == 1
    finally:
        store.close()


def _debitura_call(method, path, **kw):
    import httpx

    async def go():
        async with httpx.AsyncClient(transport=sandbox.get_transport("debitura"), base_url="http://d") as c:
            return await c.request(method, path, headers={"XApiKey": "dbt_sandbox_live_Hq7Xv2Lm9Pz4",
                                                          **kw.pop("headers", {})}, **kw)
    return asyncio.run(go())


def _case(is_test: bool) -> str:
    body = {"currencyCode": "EUR", "amountToRecover": 100.0, "date": "2026-01-01T00:00:00Z",
            "dueDate": "2026-01-15T00:00:00Z", "creditorReference": f"REF-{is_test}", "isTest": is_test,
            "debtor": {"type": "Company", "name": "Debtor ApS", "address": "Vej 1", "zipCode": "2100",
                       "city": "København", "countryAlpha2": "DK", "email": "a@b.dk", "contactPerson": "Ann"}}
    r = _debitura_call("POST", "/cases", json=body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_debitura_simulator_files_chats_and_advance_follow_the_documented_rules():
    from runner.engine.destinations import multipart

    case = _case(False)
    big, ctype = multipart([("File", "huge.pdf", "application/pdf", b"%PDF-" + b"0" * (25 * 1024 * 1024))])
    assert _debitura_call("POST", f"/cases/{case}/files", content=big,
                          headers={"Content-Type": ctype}).json()["businessErrors"][0]["type"] == "FileTooLarge"
    exe, ctype = multipart([("File", "tool.exe", "application/octet-stream", b"MZ")])
    assert _debitura_call("POST", f"/cases/{case}/files", content=exe, headers={"Content-Type": ctype}).status_code == 400
    bad, ctype = multipart([("DocumentType", None, None, b"Selfie"), ("File", "a.pdf", "application/pdf", b"%PDF-")])
    assert _debitura_call("POST", f"/cases/{case}/files", content=bad, headers={"Content-Type": ctype}).status_code == 400
    ok, ctype = multipart([("File", "a.pdf", "application/pdf", b"%PDF-1.4")])
    made = _debitura_call("POST", f"/cases/{case}/files", content=ok, headers={"Content-Type": ctype}).json()
    assert made["documentType"] == "OriginalInvoice" and made["caseId"] == case  # the documented default
    assert [f["id"] for f in _debitura_call("GET", f"/cases/{case}/files").json()] == [made["id"]]

    assert _debitura_call("POST", f"/cases/{case}/chats", json={"message": "hi"}).status_code == 400  # no user
    assert _debitura_call("POST", f"/cases/{case}/chats", json={"message": "x" * 10001,
                                                                "userEmail": "finance@sandbox-creditor.example"}
                          ).status_code == 400
    users = _debitura_call("GET", "/users", params={"PageSize": "1"}).json()
    assert users["page"]["totalResults"] == 2 and len(users["users"]) == 1
    chat = _debitura_call("POST", f"/cases/{case}/chats", json={"message": "hi", "userId": users["users"][0]["id"]})
    assert chat.status_code == 200 and chat.json()["roleLabel"] == "Creditor"
    assert _debitura_call("GET", "/cases/00000000-0000-0000-0000-000000000000/chats").status_code == 404

    # /test/cases/{id}/advance: test cases only; Closed:Paid needs an amount; no-op when already there.
    assert _debitura_call("POST", f"/test/cases/{case}/advance", json={"to": "Active"}).status_code == 400
    test_case = _case(True)
    assert _debitura_call("POST", f"/test/cases/{test_case}/advance", json={"to": "Closed:Paid"}).status_code == 400
    r = _debitura_call("POST", f"/test/cases/{test_case}/advance", json={"to": "Closed:Paid", "amount": 100})
    assert r.json() == {"advanced": True, "state": "Closed:Paid"}
    assert _debitura_call("POST", f"/test/cases/{test_case}/advance",
                          json={"to": "Closed:Paid", "amount": 100}).json() == {"advanced": False, "state": "Closed:Paid"}
    assert _debitura_call("GET", f"/cases/{test_case}").json()["lifecycle"] == "Closed"
    # A hard delete of a test case takes its chats and files with it.
    _debitura_call("POST", f"/cases/{test_case}/chats", json={"message": "x", "userEmail": "ops@sandbox-creditor.example"})
    assert _debitura_call("DELETE", f"/test/cases/{test_case}").status_code == 204
    assert sandbox.get_simulator("debitura").chats(test_case) == []


def test_an_invoice_a_batch_answer_leaves_out_is_confirmed_deleted_on_its_own_first(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text("""state: state/state.db
destination: {type: debitura, environment: sandbox, api_key: "${file:sandbox-secrets/debitura_api_key}"}
connections:
  - name: q
    integration: quickbooks_online
    environment: sandbox
    credentials:
      client_id: "${file:sandbox-secrets/quickbooks_client_id}"
      client_secret: "${file:sandbox-secrets/quickbooks_client_secret}"
      refresh_token: "${file:sandbox-secrets/quickbooks_refresh_token}"
    options: {realm_id: "9130357766961111"}
    window: {last: 90d}
""")
    cfg, _, _ = recorded_sync(monkeypatch, cfg_path)
    qbo = sandbox.get_simulator("quickbooks", cfg.state_path.parent / "sandbox")
    qbo.act("delete", "1002")
    real_query = qbo.dispatch

    async def flaky(request):  # the batch answer also leaves out 1001, which still exists
        resp = await real_query(request)
        if " Id in " in (request.url.params.get("query") or ""):
            body = json.loads(resp.content)
            body["QueryResponse"]["Invoice"] = [i for i in body["QueryResponse"]["Invoice"] if i["Id"] != "101"]
            import httpx

            return httpx.Response(200, json=body)
        return resp

    monkeypatch.setattr(qbo, "dispatch", flaky)
    _, plan, rec = recorded_sync(monkeypatch, cfg_path, mode="plan", full=True)
    ac = plan.connections[0].after_case
    assert {c["number"]: c["kind"] for c in ac["changes"]} == {"1002": "deleted"}  # 1001 was found on its own
    singles = [r.url.path for r in rec["quickbooks"].requests if "/invoice/" in r.url.path]
    assert sorted(p.rsplit("/", 1)[1] for p in singles) == ["101", "102"]
