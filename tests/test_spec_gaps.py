"""Spec-language and engine gaps an author meets when writing a new integration, each shown through a real run:
spec-wide headers beside OAuth2, `{{ base_url }}` in templates, the provider's own advice on 401/403, error
messages that name the request and show the answer, parse_date(), `invoices.exclude`, and explain checking
that a lookup returned the invoice asked for.

The runs go to the QuickBooks simulator on a real socket, through a copy of the built-in QuickBooks spec
changed the way an author would change it; a subclass of the simulator records what it was sent and can answer
a path the way a misbehaving provider would."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import jmespath
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.sandbox.core import SandboxServer, json_response
from runner.sandbox.quickbooks import REALM_US, QuickBooksSimulator
from runner.spec import functions
from runner.spec.loader import Expression

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ROOT / "sandbox-secrets"


class RecordingQuickBooks(QuickBooksSimulator):
    """The QuickBooks simulator, recording each request's headers; `answers` maps a path regex to a canned
    (status, body) answer, `swap_lookup` answers an invoice lookup with another invoice."""

    def __init__(self):
        super().__init__()
        self.sent: list[tuple[str, dict]] = []
        self.answers: dict[str, tuple[int, object]] = {}
        self.swap_lookup = False

    async def dispatch(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.url.path, dict(request.headers)))
        for pattern, (status, body) in self.answers.items():
            if re.search(pattern, request.url.path):
                if isinstance(body, bytes):
                    return httpx.Response(status, content=body, headers={"Content-Type": "text/plain"})
                return json_response(status, body)
        m = re.fullmatch(rf"/v3/company/{REALM_US}/invoice/(\d+)", request.url.path)
        if self.swap_lookup and m:
            other = next(i for i in self.data[REALM_US]["Invoice"] if i["Id"] != m.group(1))
            return json_response(200, {"Invoice": other, "time": "2026-01-01T00:00:00-08:00"})
        return await super().dispatch(request)

    def api_requests(self) -> list[tuple[str, dict]]:
        return [(p, h) for p, h in self.sent if p.startswith("/v3/")]


@pytest.fixture()
def qbo():
    sim = RecordingQuickBooks()
    server = SandboxServer({"quickbooks": sim})
    server.start()
    try:
        yield sim, server.url("quickbooks")
    finally:
        server.stop()


def workspace(tmp: Path, url: str, edit=None) -> Path:
    """A config with one QuickBooks connection (to `url`) and a copy of the QuickBooks spec, changed by edit()."""
    spec = yaml.safe_load((ROOT / "integrations.d" / "quickbooks_online.yaml").read_text())
    if edit is not None:
        edit(spec)
    (tmp / "specs").mkdir(exist_ok=True)
    (tmp / "specs" / "quickbooks_online.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    cfg = tmp / "config.yaml"
    cfg.write_text(f"""version: 1
state: state.db
integrations_dir: specs
destination: {{type: jsonl, path: out.jsonl}}
connections:
  - name: q
    integration: quickbooks_online
    environment: sandbox
    base_url: "{url}"
    server_filters: false
    options: {{realm_id: "{REALM_US}"}}
    window: {{last: 1y}}
    credentials:
      client_id: "${{file:{SECRETS}/quickbooks_client_id}}"
      client_secret: "${{file:{SECRETS}/quickbooks_client_secret}}"
      refresh_token: "${{file:{SECRETS}/quickbooks_refresh_token}}"
""")
    return cfg


def run(cfg_path: Path, mode: str = "plan"):
    from runner.engine import pipeline
    from runner.spec import config
    from runner.state.sqlite import Store

    cfg = config.load(cfg_path)
    store = Store(cfg.state_path)
    try:
        return asyncio.run(pipeline.sync(cfg, mode=mode, store=store, details=True)).connections[0]
    finally:
        store.close()


def explain(cfg_path: Path, key: str):
    from runner.diagnostics import checks
    from runner.spec import config
    from runner.state.sqlite import Store

    cfg = config.load(cfg_path)
    store = Store(cfg.state_path)
    try:
        return asyncio.run(checks.explain(cfg, store, key))[0]
    finally:
        store.close()


# --- auth.headers with every auth type; {{ base_url }} ------------------------------------------------------
def test_auth_headers_are_sent_beside_the_oauth2_token(qbo, tmp_path):
    sim, url = qbo

    def edit(spec):
        spec["auth"]["headers"] = {"X-Tenant": "realm-{{ connection.realm_id }}", "X-Api-Base": "{{ base_url }}"}

    conn = run(workspace(tmp_path, url, edit))
    assert conn.error is None, conn.error
    requests = sim.api_requests()
    assert len(requests) >= 2
    for path, headers in requests:
        assert headers.get("x-tenant") == f"realm-{REALM_US}", path
        # {{ base_url }} is the connection's address (its base_url: override), not the spec's sandbox:// one
        assert headers.get("x-api-base") == url, path
        assert headers["authorization"].startswith("Bearer ")  # the token's header still wins


def test_base_url_in_a_request_template_is_the_connections(qbo, tmp_path):
    sim, url = qbo

    def edit(spec):
        spec["invoices"]["request"]["headers"]["X-Called-At"] = "{{ base_url }}"

    assert run(workspace(tmp_path, url, edit)).error is None
    listed = [h for p, h in sim.api_requests() if p.endswith("/query")]
    assert listed and all(h.get("x-called-at") == url for h in listed)


# --- 401/403 advice from the spec; messages naming the request and the answer ---------------------------
def test_a_403_takes_the_specs_advice_and_names_the_request(qbo, tmp_path):
    sim, url = qbo
    sim.answers[r"/query$"] = (403, {"Fault": {"Error": [{"Message": "ApplicationAuthorizationFailed",
                                                          "Detail": "not allowed", "code": "3201"}],
                                               "type": "AuthorizationFault"}})

    def edit(spec):
        spec["auth"]["advice"] = {403: "give the Intuit app the Accounting scope and connect again"}

    conn = run(workspace(tmp_path, url, edit))
    assert conn.status == "failed"
    assert conn.fix == "give the Intuit app the Accounting scope and connect again"
    assert f"GET {url}/v3/company/{REALM_US}/query?" in conn.error and "HTTP 403" in conn.error


def test_doctor_gives_the_specs_403_advice(qbo, tmp_path):
    from runner.diagnostics import checks
    from runner.spec import config
    from runner.state.sqlite import Store

    sim, url = qbo
    sim.answers[r"/query$"] = (403, {"Fault": {"Error": [{"Message": "ApplicationAuthorizationFailed", "code": "3201"}]}})

    def edit(spec):
        spec["auth"]["advice"] = {"403": "give the Intuit app the Accounting scope and connect again"}

    cfg = config.load(workspace(tmp_path, url, edit))
    store = Store(cfg.state_path)
    try:
        report = asyncio.run(checks.doctor(cfg, store))
    finally:
        store.close()
    perm = report.get("q", "permission")
    assert perm.status == checks.FAILED
    assert perm.fix.startswith("give the Intuit app the Accounting scope and connect again")


def test_a_403_without_advice_in_the_spec_names_no_other_provider(qbo, tmp_path):
    sim, url = qbo
    sim.answers[r"/query$"] = (403, {"Fault": {"Error": [{"Message": "nope", "code": "3201"}]}})
    conn = run(workspace(tmp_path, url))
    assert conn.status == "failed" and "HTTP 403" in conn.error
    assert "restricted key" not in conn.fix and "Stripe" not in conn.fix


def test_an_error_names_the_request_and_shows_the_start_of_an_unknown_body(qbo, tmp_path):
    sim, url = qbo
    sim.answers[r"/query$"] = (404, {"problem": {"reason": "no route to the tenant shard"}})

    def edit(spec):
        spec["invoices"]["request"]["params"]["signature"] = "{{ secrets.client_secret }}-sig"

    conn = run(workspace(tmp_path, url, edit))
    assert conn.status == "failed"
    assert "answered HTTP 404 to GET " in conn.error and f"/v3/company/{REALM_US}/query?" in conn.error
    assert "no route to the tenant shard" in conn.error  # the start of the answer, which has no known envelope
    secret = (SECRETS / "quickbooks_client_secret").read_text().strip()
    assert secret not in conn.error and "signature=****" in conn.error


def test_a_plain_text_error_body_is_shown(qbo, tmp_path):
    sim, url = qbo
    sim.answers[r"/query$"] = (502, b"upstream connect error or disconnect/reset before headers")

    def edit(spec):
        spec["retry"] = {"attempts": 1}

    conn = run(workspace(tmp_path, url, edit))
    assert "answered HTTP 502 to GET" in conn.error and "upstream connect error" in conn.error


# --- parse_date() ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, fmt, expected", [
    ("/Date(1700000000000)/", "dotnet", "2023-11-14"),
    ("/Date(1700000000000+0000)/", "dotnet", "2023-11-14"),
    ("/Date(1699999200000+0300)/", "dotnet", "2023-11-15"),  # 22:00 UTC is the next day at +03:00
    ("\\/Date(0)\\/", "dotnet", "1970-01-01"),  # as it is written inside a JSON string
    ("/Date(-86400000)/", "dotnet", "1969-12-31"),
    ("31.12.2025", "DD.MM.YYYY", "2025-12-31"),
    ("03/04/2026", "DD/MM/YYYY", "2026-04-03"),
    ("03/04/2026", "MM/DD/YYYY", "2026-03-04"),
    ("12/31/2025 10:30", "MM/DD/YYYY", "2025-12-31"),
    ("31-12-2025", "DD-MM-YYYY", "2025-12-31"),
    ("2025-12-31", "YYYY-MM-DD", "2025-12-31"),
    ("31/12/2025", "MM/DD/YYYY", None),  # month 31: unreadable, never a guessed date
    ("31.12.2025", "DD/MM/YYYY", None),  # the declared separator only
    ("Date(1700000000000)", "dotnet", None),
    ("", "dotnet", None),
    (None, "DD.MM.YYYY", None),
])
def test_parse_date(value, fmt, expected):
    assert Expression(f"parse_date(v, '{fmt}')").search({"v": value}) == expected


def test_parse_date_with_an_unknown_format_is_refused_when_the_spec_loads():
    with pytest.raises(ValueError, match="parse_date\\(\\) has no format 'DD.MM.YY'"):
        Expression("parse_date(v, 'DD.MM.YY')")


_values = st.one_of(st.none(), st.integers(), st.text(max_size=30),
                    st.sampled_from(["/Date(1700000000000)/", "/Date(1700000000000-0500)/", "31.12.2025",
                                     "12/31/2025", "2025-13-01", "29.02.2023", "29.02.2024"]))
_formats = st.sampled_from(["dotnet", "DD.MM.YYYY", "DD/MM/YYYY", "DD-MM-YYYY", "MM/DD/YYYY", "YYYY-MM-DD", "iso"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_values, _formats)
def test_parse_date_compiled_equals_jmespath(value, fmt):
    source = f"parse_date(v, '{fmt}')"
    parsed = functions.compile(source)

    def outcome(fn):
        try:
            return "ok", fn({"v": value})
        except Exception as exc:  # the compiled path must raise what jmespath raises
            return "error", type(exc).__name__

    slow = outcome(lambda d: parsed.search(d, options=functions.OPTIONS))
    from runner.spec import fastpath

    fast = fastpath.compile(parsed.parsed, functions.OPTIONS.custom_functions,
                            lambda d: parsed.search(d, options=functions.OPTIONS))
    assert fast is not None  # parse_date takes part in the compiled path
    assert outcome(fast) == slow
    assert jmespath.search("v", {"v": value}) == value


def test_an_unreadable_dotnet_date_is_shown_in_the_verdict_not_called_missing(qbo, tmp_path):
    sim, url = qbo
    from datetime import datetime, timezone

    for inv in sim.data[REALM_US]["Invoice"]:
        for field in ("TxnDate", "DueDate"):
            ms = int(datetime.fromisoformat(inv[field]).replace(tzinfo=timezone.utc).timestamp() * 1000)
            inv[field] = f"/Date({ms}+0000)/"
    sim.data[REALM_US]["Invoice"][0]["TxnDate"] = "/Date(not a date)/"

    def edit(spec):
        spec["invoices"]["date"] = {"value": "parse_date(TxnDate, 'dotnet')", "format": "date"}
        spec["invoices"]["map"]["issue_date"] = "parse_date(TxnDate, 'dotnet')"
        spec["invoices"]["map"]["due_date"] = "parse_date(coalesce(DueDate, TxnDate), 'dotnet')"

    conn = run(workspace(tmp_path, url, edit))
    assert conn.error is None, conn.error
    verdicts = {v.invoice_id: v for v in conn.verdicts}
    bad = verdicts["101"]
    assert bad.reason == "invalid"
    assert "/Date(not a date)/" in bad.message and "missing" not in bad.message
    ok = verdicts["102"]  # the readable .NET dates are read: a plan says it would be imported
    assert ok.verdict == "imported" and ok.invoice["issue_date"] == sim.data[REALM_US]["Invoice"][1]["MetaData"]["CreateTime"][:10]


# --- invoices.exclude ------------------------------------------------------------------------------------
def test_excluded_records_get_their_own_verdict_and_pagination_still_counts_them(qbo, tmp_path):
    sim, url = qbo
    invoices = sim.data[REALM_US]["Invoice"]
    for inv in invoices[:3]:  # bills mixed into the invoice list, all on the first page
        inv["TxnType"] = "Bill"

    def edit(spec):
        spec["invoices"]["paginate"]["size"] = 3
        spec["invoices"]["max_page_size"] = 3
        spec["invoices"]["exclude"] = {"when": "TxnType == 'Bill'", "reason": "not_a_receivable",
                                       "message": "a bill (money the company owes), not a receivable"}

    conn = run(workspace(tmp_path, url, edit))
    assert conn.error is None, conn.error
    assert conn.seen == len(invoices)  # a page of 3 that held 3 bills did not end the listing
    assert conn.skipped()["not_a_receivable"] == 3
    verdicts = {v.invoice_id: v for v in conn.verdicts}
    assert all(verdicts[i["Id"]].reason == "not_a_receivable" for i in invoices[:3])
    assert verdicts[invoices[0]["Id"]].message == "a bill (money the company owes), not a receivable"


def test_an_exclude_reason_may_not_hide_a_built_in_one(tmp_path):
    from runner.errors import ConfigError
    from runner.spec import loader
    from runner.spec.yamlfile import load as load_yaml

    spec = yaml.safe_load((ROOT / "integrations.d" / "quickbooks_online.yaml").read_text())
    spec["invoices"]["exclude"] = {"when": "TxnType == 'Bill'", "reason": "not_unpaid"}
    p = tmp_path / "quickbooks_online.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ConfigError):
        loader.parse(load_yaml(p))


# --- explain checks the looked-up record ----------------------------------------------------------------
def test_explain_says_when_the_lookup_returned_another_invoice(qbo, tmp_path):
    sim, url = qbo
    sim.swap_lookup = True
    ex = explain(workspace(tmp_path, url), "104")
    assert not ex.found
    assert "another invoice" in ex.summary and "104" in ex.summary
    assert "lookup" in ex.fix


def test_explain_takes_the_invoice_asked_for(qbo, tmp_path):
    sim, url = qbo
    ex = explain(workspace(tmp_path, url), "104")
    assert ex.found and ex.invoice_id == "104"
    assert json.dumps(ex.as_dict())  # plain data
