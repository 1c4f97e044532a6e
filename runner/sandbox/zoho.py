"""Zoho Books simulator: Zoho's multi-data-centre OAuth 2.0 servers and the Books API v3 (read-only).

Each data centre's hosts appear as the first path segment, so every call shows where it went:

    GET  /accounts.zoho.com/oauth/v2/auth          authorize (any DC's accounts host works; users log in anywhere);
                                                   the redirect carries code, state, location and accounts-server
    POST /accounts.zoho.<tld>/oauth/v2/token       token: client_secret_post; refresh tokens do NOT rotate;
                                                   20 live refresh tokens per user, the oldest silently deleted
    POST /accounts.zoho.<tld>/oauth/v2/token/revoke
    GET  /www.zohoapis.<tld>/books/v3/organizations
    GET  /www.zohoapis.<tld>/books/v3/invoices?organization_id=&status=&date_start=&date_end=&page=&per_page=
    GET  /www.zohoapis.<tld>/books/v3/invoices/{id}?organization_id=   (&accept=pdf: the invoice as a PDF)
    GET  /www.zohoapis.<tld>/books/v3/contacts/{id}?organization_id=

A token only works at its own data centre's accounts server and API domain. The token response's
``api_domain`` and the redirect's ``accounts-server`` are built from ``public_base``: when it is None (the
default) it is where the request came in: ``sandbox://zoho`` in-process, ``http://<Host>/zoho`` on a
SandboxServer / ``runner sandbox serve`` (mounted as ``zoho``).

Errors as Zoho sends them: a bad, revoked or foreign refresh token -> HTTP 200 ``{"error": "invalid_code"}``;
a bad or expired access token -> HTTP 401 ``{"code": 57, "message": ...}``; a Books error -> ``{"code": n,
"message": ...}`` with a non-zero code.

Users (test-only ``sandbox_user`` on the authorize URL picks one): ``sam`` (US data centre, two
organizations: 60001 "Sam's Shop LLC", 60002 "Sam's Side Hustle"; default), ``ulla`` (EU, two
organizations: 20001 "Ulla's Nordic Trading ApS" in DKK, 20002 "Ulla Holding GmbH" in EUR), ``ines``
(India, one organization 70001 "Ines Textiles Pvt Ltd"). Bootstrap refresh tokens (as from Zoho's Self
Client) for sam is in ``sandbox-secrets/zoho_refresh_token``.
"""

from __future__ import annotations

import re
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx

from .core import Simulator, json_response
from .oauth_server import OAuthServer

CLIENT_ID = "1000.SANDBOXZOHOCLIENT0000000000000"
CLIENT_SECRET = "zoho-sandbox-secret-51c0de"
BOOTSTRAP_REFRESH_TOKEN = "1000.sandboxzohobootstrap.sam00000000000000000000"
ULLA_REFRESH_TOKEN = "1000.sandboxzohobootstrap.ulla0000000000000000000"
DCS = {"com": "us", "eu": "eu", "in": "in", "com.au": "au", "jp": "jp", "ca": "ca", "com.cn": "cn", "sa": "sa"}
USERS = {"sam": "com", "ulla": "eu", "ines": "in"}
ORGS = {
    "sam": [("60001", "Sam's Shop LLC", "USD", "US"), ("60002", "Sam's Side Hustle", "USD", "US")],
    "ulla": [("20001", "Ulla's Nordic Trading ApS", "DKK", "DK"), ("20002", "Ulla Holding GmbH", "EUR", "DE")],
    "ines": [("70001", "Ines Textiles Pvt Ltd", "INR", "IN")],
}
MAX_PER_PAGE = 200


def _contacts(country: str) -> dict[str, dict]:
    if country == "DK":
        rows = [("c1", "Fjord Fisk A/S", "Havnegade 12", "København K", "1058", "Denmark"),
                ("c2", "Bager Hansen", "Torvet 3", "Aarhus C", "8000", "Danmark"),
                ("c3", "Eventyr Rejser", "Vestergade 9", "Odense C", "", "Denmark")]
    elif country == "DE":
        rows = [("c1", "Berliner Brot GmbH", "Unter den Linden 5", "Berlin", "10117", "Germany")]
    elif country == "IN":
        rows = [("c1", "Mumbai Mills", "12 Marine Drive", "Mumbai", "400020", "India")]
    else:
        rows = [("c1", "Acme Corp", "1 Main St", "Springfield", "62701", "U.S.A.", "IL"),
                ("c2", "Globex LLC", "500 Market St", "San Francisco", "94105", "United States", "CA"),
                ("c3", "Initech", "4120 Freidrich Ln", "Austin", "78744", "", "TX"),
                ("c4", "Umbrella Ltd", "22 Baker St", "London", "NW1 6XE", "United Kingdom", "")]
    rows = [r if len(r) == 7 else r + ("",) for r in rows]
    out = {}
    for cid, name, street, city, zip_, ctry, state in rows:
        out[cid] = {"contact_id": cid, "contact_name": name, "company_name": name, "contact_type": "customer",
                    "customer_sub_type": "business", "status": "active", "email": f"ap@{re.sub(r'[^a-z]', '', name.lower())}.example",
                    "billing_address": {"attention": "", "address": street, "street2": "", "state_code": state, "city": city,
                                        "state": state, "zip": zip_, "country": ctry, "fax": "", "phone": ""},
                    "contact_persons": [dict(cp) for cp in _CONTACT_PERSONS.get(name, [])]}
    return out


# Contact persons of a contact, as GET /contacts/{id} lists them (one of them the primary contact).
_CONTACT_PERSONS = {"Acme Corp": [
    {"contact_person_id": "cp1", "salutation": "", "first_name": "Accounts", "last_name": "Payable",
     "email": "ap@acmecorp.example", "phone": "", "mobile": "", "is_primary_contact": False},
    {"contact_person_id": "cp2", "salutation": "Ms.", "first_name": "Wilma", "last_name": "Coyote",
     "email": "wilma@acmecorp.example", "phone": "", "mobile": "", "is_primary_contact": True}]}


def _invoices(org: str, currency: str, contacts: dict, today: date) -> list[dict]:
    ids = list(contacts)
    plan = []  # (contact index, days ago, total, balance, status)
    if org == "60001":  # enough for two pages of 200
        for i in range(230):
            plan.append((i % len(ids), 3 + i % 80, 100.0 + i, 100.0 + i, "overdue"))
        plan += [(0, 20, 500.0, 250.0, "partially_paid"), (1, 30, 80.0, 0.0, "paid"), (0, 10, 60.0, 60.0, "draft"),
                 (1, 12, 70.0, 70.0, "void"), (2, 25, 300.0, 300.0, "overdue"), (3, 5, 90.0, 90.0, "sent")]
    else:
        for i in range(6):
            plan.append((i % len(ids), 10 + 7 * i, 1000.0 + 10 * i, 1000.0 + 10 * i, "overdue" if i else "sent"))
        plan.append((0, 20, 900.0, 400.0, "partially_paid"))
        plan.append((0, 200, 50.0, 50.0, "overdue"))
    out = []
    for n, (ci, ago, total, balance, status) in enumerate(plan, start=1):
        c = contacts[ids[ci]]
        d = today - timedelta(days=ago)
        due = d + timedelta(days=(30 if status == "sent" else 14))
        out.append({"invoice_id": f"{org}00000{n:05d}", "invoice_number": f"INV-{n:06d}", "status": status,
                    "customer_id": c["contact_id"], "customer_name": c["contact_name"], "company_name": c["company_name"],
                    "date": d.isoformat(), "due_date": due.isoformat(), "currency_code": currency, "total": total,
                    "balance": balance, "email": c["email"], "reference_number": "",
                    "created_time": f"{d.isoformat()}T10:00:00+0000", "last_modified_time": f"{d.isoformat()}T10:00:00+0000"})
    return out


class ZohoSimulator(Simulator):
    name = "zoho"

    def __init__(self, data_dir: Any = None, today: date | None = None, public_base: str | None = None):
        super().__init__()
        self.wall = time.time  # the clock last_modified_time is stamped with (tests move it)
        self._data_dir = data_dir
        self.today = today or datetime.now(timezone.utc).date()
        self.public_base = public_base
        self._host: str | None = None
        # One authorization "cloud": tokens are per data centre, checked against the host they are used at.
        self.oauth = OAuthServer(clients={CLIENT_ID: CLIENT_SECRET}, rotate=False, token_prefix="1000.",
                                 invalid_grant_error="invalid_code", invalid_grant_status=200, refresh_token_limit=20)
        self.oauth.add_grant(BOOTSTRAP_REFRESH_TOKEN, CLIENT_ID, "sam", "ZohoBooks.fullaccess.all")
        self.oauth.add_grant(ULLA_REFRESH_TOKEN, CLIENT_ID, "ulla", "ZohoBooks.fullaccess.all")
        from .lifecycle import Changes

        self.changes = Changes(data_dir, "zoho")
        self.oauth.keep_in(data_dir, self.name)
        self.users = {u: {"dc": dc} for u, dc in USERS.items()}
        self.default_user = "sam"
        self.orgs: dict[str, dict] = {}
        for user, orgs in ORGS.items():
            for oid, name, cur, country in orgs:
                contacts = _contacts(country)
                self.orgs[oid] = {"user": user, "name": name, "currency": cur, "contacts": contacts,
                                  "invoices": _invoices(oid, cur, contacts, self.today)}
        self.calls_by_host: dict[str, int] = {}
        self.contact_fetches: dict[str, int] = {}

    def _public(self) -> str:
        if self.public_base:
            return self.public_base
        host = self._host or ""
        if not host or host.endswith(".sandbox.invalid"):
            return f"sandbox://{self.name}"
        return f"http://{host}/{self.name}"

    def api_domain(self, tld: str) -> str:
        return f"{self._public()}/www.zohoapis.{tld}"

    def accounts_server(self, tld: str) -> str:
        return f"{self._public()}/accounts.zoho.{tld}"

    def state(self) -> dict:
        return {**super().state(), "oauth": self.oauth.state(), "calls_by_host": dict(self.calls_by_host)}

    def reset(self) -> None:
        super().reset()
        self.oauth.forget()
        self.__init__(data_dir=self._data_dir, today=self.today, public_base=self.public_base)

    def fault_response(self, status: int) -> httpx.Response:
        if status == 401:
            return json_response(401, {"code": 57, "message": "You are not authorized to perform this operation"})
        if status == 429:
            return json_response(429, {"code": 44, "message": "You have made too many requests continuously. "
                                                              "Please try again after some time."})
        return json_response(status, {"code": 1, "message": "Internal error"})

    @staticmethod
    def _books(status: int, code: int, message: str) -> httpx.Response:
        return json_response(status, {"code": code, "message": message})

    # --- routing ---------------------------------------------------------------------------------
    async def dispatch(self, request: httpx.Request) -> httpx.Response:
        self._apply_changes()
        self._host = request.headers.get("host") or request.url.netloc.decode()
        host, _, rest = request.url.path.lstrip("/").partition("/")
        rest = "/" + rest
        self.calls_by_host[host] = self.calls_by_host.get(host, 0) + 1
        m = re.fullmatch(r"accounts\.zoho\.([a-z.]+)", host)
        if m and m.group(1) in DCS:
            return self._accounts(m.group(1), rest, request)
        m = re.fullmatch(r"www\.zohoapis\.([a-z.]+)", host)
        if m and m.group(1) in DCS:
            return self._api(m.group(1), rest, request)
        return json_response(404, {"code": 5, "message": "Invalid URL Passed"})

    # --- after import: pay, void or credit an invoice at the source (runner sandbox pay|void|credit) --------
    def _apply_changes(self) -> None:
        for c in self.changes.pending():
            try:
                self.act(c["action"], c["invoice"], c.get("amount"))
            except KeyError:
                pass

    def act(self, action: str, invoice: str, amount: str | None = None) -> dict:
        """As Zoho Books shows an invoice after a payment (payment_made, balance; paid or partially_paid), a
        void (status void) or an applied credit note (credits_applied, balance)."""
        inv = next((i for o in self.orgs.values() for i in o["invoices"]
                    if invoice in (i["invoice_id"], i["invoice_number"])), None)
        if inv is None:
            raise KeyError(invoice)
        amt = min(inv["balance"], float(amount)) if amount is not None else inv["balance"]
        if action in ("pay", "credit"):
            field = "payment_made" if action == "pay" else "credits_applied"
            inv[field] = round(inv.get(field, 0.0) + amt, 2)
            inv["balance"] = round(inv["balance"] - amt, 2)
            inv["status"] = "paid" if inv["balance"] == 0 else "partially_paid"
        elif action == "void":
            inv["status"], inv["balance"] = "void", 0.0
        else:
            raise ValueError(action)
        org = next(o for o, d in self.orgs.items() if inv in d["invoices"])
        self.record_change(org, inv)
        return inv

    def invoice_pdf(self, inv: dict) -> bytes:
        from .lifecycle import pdf

        return pdf(f"Invoice {inv['invoice_number']}", [f"Bill to: {inv['customer_name']}",
                                                        f"Date: {inv['date']}  Due: {inv['due_date']}",
                                                        f"Total: {inv['total']:.2f} {inv['currency_code']}  "
                                                        f"Balance due: {inv['balance']:.2f}"])

    def _accounts(self, tld: str, rest: str, request: httpx.Request) -> httpx.Response:
        if rest == "/oauth/v2/auth" and request.method == "GET":
            def extra(user: str) -> dict:
                dc = self.users[user]["dc"]
                return {"location": DCS[dc], "accounts-server": self.accounts_server(dc)}
            return self.oauth.authorize(request, self.users, self.default_user, extra)
        if rest == "/oauth/v2/token" and request.method == "POST":
            from urllib.parse import parse_qsl

            form = dict(parse_qsl(request.content.decode("utf-8", "replace")))
            g = self.oauth.grants.get(form.get("refresh_token", "")) if form.get("grant_type") == "refresh_token" else None
            if g is not None and self.users[g.user]["dc"] != tld:
                return json_response(200, {"error": "invalid_code"})  # a token from another data centre
            return self.oauth.token(request, lambda user: {"api_domain": self.api_domain(self.users[user]["dc"])})
        if rest == "/oauth/v2/token/revoke" and request.method == "POST":
            return self.oauth.revoke(request)
        return json_response(404, {"error": "invalid_url"})

    def _api(self, tld: str, rest: str, request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization")
        user, why = self.oauth.check_access(auth, scheme="Zoho-oauthtoken")
        if user is None or self.users[user]["dc"] != tld:
            return self._books(401, 57, "You are not authorized to perform this operation")
        if not rest.startswith("/books/v3/"):
            return self._books(404, 5, "Invalid URL Passed")
        path = rest[len("/books/v3"):]
        q = request.url.params
        if path == "/organizations":
            orgs = [{"organization_id": oid, "name": o["name"], "contact_name": user.title(), "email": f"{user}@example.com",
                     "is_default_org": False, "currency_code": o["currency"], "time_zone": "Europe/Copenhagen",
                     "is_org_active": True, "plan_name": "Standard"}
                    for oid, o in self.orgs.items() if o["user"] == user]
            return json_response(200, {"code": 0, "message": "success", "organizations": orgs})
        oid = q.get("organization_id")
        if not oid:
            return self._books(400, 6041, "organization_id is not specified")
        org = self.orgs.get(oid)
        if org is None or org["user"] != user:
            return self._books(401, 6041, "You are not authorized to access this organization")
        if path == "/invoices":
            return self._list(org, q)
        m = re.fullmatch(r"/invoices/([^/]+)", path)
        if m:
            inv = next((i for i in org["invoices"] if i["invoice_id"] == m.group(1)), None)
            if inv is None:
                return self._books(404, 1002, "Invoice does not exist.")
            if (q.get("accept") or "").lower() == "pdf":  # GET /invoices/{id}?accept=pdf: the invoice as a PDF
                return httpx.Response(200, content=self.invoice_pdf(inv), headers={"Content-Type": "application/pdf"})
            c = org["contacts"][inv["customer_id"]]
            return json_response(200, {"code": 0, "message": "success",
                                       "invoice": {**inv, "billing_address": dict(c["billing_address"])}})
        m = re.fullmatch(r"/contacts/([^/]+)", path)
        if m:
            c = org["contacts"].get(m.group(1))
            if c is None:
                return self._books(404, 1002, "Contact does not exist.")
            key = f"{oid}/{m.group(1)}"
            self.contact_fetches[key] = self.contact_fetches.get(key, 0) + 1
            return json_response(200, {"code": 0, "message": "success", "contact": c})
        return self._books(404, 5, "Invalid URL Passed")

    def _list(self, org: dict, q: httpx.QueryParams) -> httpx.Response:
        try:
            page = int(q.get("page", "1"))
            per_page = int(q.get("per_page", "200"))
        except ValueError:
            return self._books(400, 2, "Invalid value passed for page")
        if per_page > MAX_PER_PAGE or per_page < 1 or page < 1:
            return self._books(400, 2, "Invalid value passed for per_page")
        rows = list(org["invoices"])
        status = q.get("status")
        if status == "unpaid":  # Zoho's Unpaid view: everything with a balance that is not draft or void
            rows = [r for r in rows if r["status"] in ("sent", "overdue", "viewed", "partially_paid", "unpaid")]
        elif status:
            rows = [r for r in rows if r["status"] == status]
        if q.get("invoice_number"):
            rows = [r for r in rows if r["invoice_number"] == q["invoice_number"]]
        if q.get("customer_id"):
            rows = [r for r in rows if r["customer_id"] == q["customer_id"]]
        if q.get("date_start"):
            rows = [r for r in rows if r["date"] >= q["date_start"]]
        if q.get("date_end"):
            rows = [r for r in rows if r["date"] <= q["date_end"]]
        if q.get("last_modified_time"):  # "invoices modified after a specific time" (YYYY-MM-DDTHH:MM:SS+hhmm)
            try:
                after = _zoho_time(q["last_modified_time"])
            except ValueError:
                return self._books(400, 2, "Invalid value passed for last_modified_time")
            rows = [r for r in rows if _zoho_time(r["last_modified_time"]) > after]
        rows.sort(key=lambda r: r["created_time"], reverse=True)
        chunk = rows[(page - 1) * per_page: page * per_page]
        return json_response(200, {"code": 0, "message": "success", "invoices": chunk,
                                   "page_context": {"page": page, "per_page": per_page,
                                                    "has_more_page": page * per_page < len(rows),
                                                    "report_name": "Invoices", "applied_filter": "Status.All",
                                                    "sort_column": "created_time", "sort_order": "D"}})

    # --- changes: last_modified_time -------------------------------------------------------------------
    def record_change(self, org_id: str, invoice: dict) -> None:
        """An invoice changed now (call it after changing it): its last_modified_time moves on."""
        invoice["last_modified_time"] = datetime.fromtimestamp(self.wall(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z")


def _zoho_time(text: str) -> datetime:
    """Zoho's time stamps and filter values: 2013-11-18T02:02:51-0800 (also with a colon in the offset)."""
    return datetime.fromisoformat(text.strip().replace(" ", "+"))
