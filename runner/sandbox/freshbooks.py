"""FreshBooks simulator: FreshBooks' OAuth 2.0 server, the identity endpoint and the accounting API (read-only).

Everything lives under one mount (``sandbox://freshbooks`` in-process, ``/freshbooks`` on a SandboxServer):

    GET  /oauth/authorize                         authorize (auth.freshbooks.com): redirect with code and state
    POST /auth/oauth/token                        token (api.freshbooks.com): client id and secret in the body;
                                                  refresh tokens are SINGLE-USE (a refresh returns a new one and
                                                  the old one is dead); access tokens last 12 hours
    POST /auth/oauth/revoke
    GET  /auth/api/v1/users/me                    the user: business_memberships[].business.account_id
    GET  /accounting/account/{account_id}/invoices/invoices?page=&per_page=&search[...]=
    GET  /accounting/account/{account_id}/invoices/invoices/{invoiceid}
    GET  /accounting/account/{account_id}/users/clients/{clientid}

Lists answer ``{"response": {"result": {"invoices": [...], "page", "pages", "per_page", "total"}}}``
(per_page at most 100). Invoices carry ``v3_status`` (draft, sent, viewed, paid, auto-paid, retry, failed,
partial, overdue, disputed), money as ``{"amount": "12.50", "code": "CAD"}`` (``amount``, ``outstanding``,
``paid``) and the client's address as written on the invoice (street, city, province, code, country).
Searches: ``search[invoice_number]``, ``search[customerid]``, ``search[date_min]``, ``search[date_max]``; an
unknown one is refused with 400 (the simulator is strict so that a spec's typo shows). Requests that come
without FreshBooks' ``Api-Version: alpha`` header are counted in ``without_api_version``.

Errors: a missing, bad or expired token -> 401 ``{"error": "unauthenticated", "error_description": ...}``; an
account the user has no membership in -> 401 with the accounting error envelope
``{"response": {"errors": [{"errno", "field", "message", "object", "value"}]}}``; not found -> 404 (same).

Users (test-only ``sandbox_user`` on the authorize URL picks one): ``fiona`` (default) with two businesses,
account ``xZ3q7`` "Fiona's Flowers Ltd" (CAD) and ``bR8m2`` "Fiona Consulting Inc" (USD), and ``gus`` with one,
``pL5n1`` "Gus Plumbing LLC". A bootstrap refresh token for fiona is in ``sandbox-secrets/freshbooks_refresh_token``.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx

from .core import Simulator, json_response
from .oauth_server import OAuthServer

CLIENT_ID = "fbsandboxclient00000000000000000000000000000000000000000000000001"
CLIENT_SECRET = "fbsandboxsecret0000000000000000000000000000000000000000000000001"
BOOTSTRAP_REFRESH_TOKEN = "fbsandboxbootstraprefreshtoken000000000000000000000000000fiona"
GUS_REFRESH_TOKEN = "fbsandboxbootstraprefreshtoken0000000000000000000000000000gus"
ACCESS_TTL = 43200  # 12 hours
MAX_PER_PAGE = 100
BUSINESSES = {
    "xZ3q7": {"id": 439001, "name": "Fiona's Flowers Ltd", "currency": "CAD", "user": "fiona"},
    "bR8m2": {"id": 439002, "name": "Fiona Consulting Inc", "currency": "USD", "user": "fiona"},
    "pL5n1": {"id": 439003, "name": "Gus Plumbing LLC", "currency": "USD", "user": "gus"},
}
USERS = {"fiona": {"id": 12345, "first": "Fiona", "last": "Fleur"}, "gus": {"id": 12346, "first": "Gus", "last": "Pipe"}}
SEARCHES = {"invoice_number", "customerid", "date_min", "date_max"}

# clientid -> (organization, first, last, street, city, province, postal code, country, email)
CLIENTS = {
    501: ("Maple Leaf Catering", "Anne", "Shirley", "12 Front St W", "Toronto", "ON", "M5J 2N1", "Canada", "ap@mapleleaf.example"),
    502: ("Harbour Books", "Gil", "Blythe", "88 Water St", "Vancouver", "BC", "V6B 1B2", "Canada", "books@harbour.example"),
    503: ("Prairie Seeds Co", "Diana", "Barry", "400 Main St", "Winnipeg", "MB", "R3C 1A1", "CA", "hello@prairie.example"),
    504: ("Lone Pine Cabins", "Matt", "Cuth", "", "Banff", "AB", "T1L 1A1", "Canada", "stay@lonepine.example"),  # no street
    505: ("Nordic Import ApS", "Karen", "Holm", "Strandvejen 100", "Hellerup", "", "2900", "Danmark", "karen@nordic.example"),
}


def _money(value: float, code: str) -> dict:
    return {"amount": f"{value:.2f}", "code": code}


def _invoices(account: str, currency: str, today: date) -> list[dict]:
    """(client, days ago, total, outstanding, v3_status, address on the invoice complete?)"""
    if account == "xZ3q7":
        plan = [
            (501, 40, 1200.00, 1200.00, "overdue", True),
            (502, 35, 450.00, 450.00, "viewed", True),
            (503, 38, 300.00, 300.00, "sent", True),
            (505, 45, 880.00, 880.00, "overdue", True),     # Danish customer, free-text country
            (502, 50, 999.00, 999.00, "overdue", False),    # sparse address on the invoice: the client's is complete
            (504, 42, 650.00, 650.00, "overdue", True),     # no street anywhere
            (501, 60, 1000.00, 400.00, "partial", True),    # partially paid
            (503, 70, 500.00, 0.00, "paid", True),
            (501, 5, 75.00, 75.00, "draft", True),
        ]
        plan += [(501 + i % 3, 40 + i % 15, 50.0 + i, 50.0 + i, "overdue", True) for i in range(6)]
    elif account == "bR8m2":
        plan = [(501, 33, 5000.00, 5000.00, "overdue", True), (502, 31, 720.00, 720.00, "sent", True)]
    else:
        plan = [(503, 30, 180.00, 180.00, "overdue", True)]
    out = []
    base = {"xZ3q7": 1000, "bR8m2": 2000, "pL5n1": 3000}[account]
    for n, (cid, ago, total, outstanding, status, full) in enumerate(plan, start=1):
        org, first, last, street, city, province, code, country, _ = CLIENTS[cid]
        d = today - timedelta(days=ago)
        ident = base + n
        paid = round(total - outstanding, 2)
        out.append({
            "id": ident, "invoiceid": ident, "accountid": account, "invoice_number": f"{n:07d}",
            "customerid": cid, "create_date": d.isoformat(), "due_date": (d + timedelta(days=30)).isoformat(),
            "due_offset_days": 30, "currency_code": currency, "amount": _money(total, currency),
            "outstanding": _money(outstanding, currency), "paid": _money(paid, currency), "v3_status": status,
            "payment_status": "paid" if outstanding == 0 else "partial" if paid else "unpaid",
            "display_status": status if status in ("draft", "paid") else "sent",
            "organization": org, "fname": first, "lname": last,
            "street": street if full else "", "street2": "", "city": city if full else "",
            "province": province, "code": code if full else "", "country": country if full else "",
            "vis_state": 0, "updated": f"{d.isoformat()} 09:00:00",
        })
    return out


class FreshBooksSimulator(Simulator):
    name = "freshbooks"

    def __init__(self, data_dir: Any = None, today: date | None = None):
        super().__init__()
        self._data_dir = data_dir
        self.today = today or datetime.now(timezone.utc).date()
        self.oauth = OAuthServer(clients={CLIENT_ID: CLIENT_SECRET}, rotate=True, access_ttl=ACCESS_TTL)
        self.oauth.add_grant(BOOTSTRAP_REFRESH_TOKEN, CLIENT_ID, "fiona", "user:profile:read user:invoices:read")
        self.oauth.add_grant(GUS_REFRESH_TOKEN, CLIENT_ID, "gus", "user:profile:read user:invoices:read")
        self.oauth.keep_in(data_dir, self.name)
        self.users = {u: dict(v) for u, v in USERS.items()}
        self.default_user = "fiona"
        self.invoices = {acc: _invoices(acc, b["currency"], self.today) for acc, b in BUSINESSES.items()}
        self.client_fetches: dict[str, int] = {}
        self.without_api_version = 0

    def state(self) -> dict:
        return {**super().state(), "oauth": self.oauth.state()}

    def reset(self) -> None:
        super().reset()
        self.oauth.forget()
        self.__init__(data_dir=self._data_dir, today=self.today)

    @staticmethod
    def _unauthenticated() -> httpx.Response:
        return json_response(401, {"error": "unauthenticated",
                                   "error_description": "This action requires authentication to continue."})

    @staticmethod
    def _errors(status: int, errno: int, field: str, message: str, obj: str = "", value: str = "") -> httpx.Response:
        return json_response(status, {"response": {"errors": [{"errno": errno, "field": field, "message": message,
                                                               "object": obj, "value": value}]}})

    def fault_response(self, status: int) -> httpx.Response:
        if status == 401:
            return self._unauthenticated()
        if status == 429:
            return json_response(429, {"error": "Too Many Requests", "message": "Rate limit exceeded"})
        return self._errors(status, 1000, "", "Internal error")

    # --- routing ---------------------------------------------------------------------------------
    async def dispatch(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.rstrip("/")
        if path == "/oauth/authorize" and request.method == "GET":
            return self.oauth.authorize(request, self.users, self.default_user, lambda user: {})
        if path == "/auth/oauth/token" and request.method == "POST":
            return self.oauth.token(request, lambda user: {"created_at": int(self.oauth.clock())})
        if path == "/auth/oauth/revoke" and request.method == "POST":
            return self.oauth.revoke(request)
        if request.headers.get("api-version") != "alpha":
            self.without_api_version += 1
        user, _why = self.oauth.check_access(request.headers.get("authorization"))
        if user is None:
            return self._unauthenticated()
        if path == "/auth/api/v1/users/me":
            return json_response(200, {"response": self._me(user)})
        m = re.fullmatch(r"/accounting/account/([^/]+)/(invoices/invoices|users/clients)(?:/([^/]+))?", path)
        if m is None or request.method != "GET":
            return self._errors(404, 1001, "", "The requested resource does not exist.")
        account, kind, ident = m.groups()
        biz = BUSINESSES.get(account)
        if biz is None or biz["user"] != user:
            return self._errors(401, 1003, "accountid",
                                "The server could not verify that you are authorized to access the URL requested.",
                                "account", account)
        if kind == "users/clients":
            c = CLIENTS.get(int(ident)) if ident and ident.isdigit() else None
            if c is None:
                return self._errors(404, 1012, "userid", "Client not found.", "client", ident or "")
            key = f"{account}/{ident}"
            self.client_fetches[key] = self.client_fetches.get(key, 0) + 1
            org, first, last, street, city, province, code, country, email = c
            return json_response(200, {"response": {"result": {"client": {
                "id": int(ident), "userid": int(ident), "organization": org, "fname": first, "lname": last,
                "email": email, "p_street": street, "p_street2": "", "p_city": city, "p_province": province,
                "p_code": code, "p_country": country, "currency_code": biz["currency"], "vis_state": 0}}}})
        if ident is not None:
            inv = next((i for i in self.invoices[account] if str(i["id"]) == ident), None)
            if inv is None:
                return self._errors(404, 1012, "invoiceid", "Invoice not found.", "invoice", ident)
            return json_response(200, {"response": {"result": {"invoice": inv}}})
        return self._list(account, request.url.params)

    def _me(self, user: str) -> dict:
        u = self.users[user]
        memberships = [{"id": 140000 + b["id"] % 1000, "role": "owner", "unacknowledged_change": False,
                        "business": {"id": b["id"], "name": b["name"], "account_id": acc,
                                     "date_format": "mm/dd/yyyy", "business_clients": []}}
                       for acc, b in BUSINESSES.items() if b["user"] == user]
        return {"id": u["id"], "identity_id": u["id"], "first_name": u["first"], "last_name": u["last"],
                "email": f"{user}@example.com", "language": "en", "business_memberships": memberships,
                "roles": [{"role": "admin", "accountid": m["business"]["account_id"]} for m in memberships]}

    def _list(self, account: str, q: httpx.QueryParams) -> httpx.Response:
        try:
            page = int(q.get("page", "1"))
            per_page = int(q.get("per_page", "15"))
        except ValueError:
            return self._errors(400, 1001, "page", "Invalid page parameters.")
        per_page = min(per_page, MAX_PER_PAGE)
        rows = list(self.invoices[account])
        for key, value in q.multi_items():
            m = re.fullmatch(r"search\[([a-z_0-9]+)\]", key)
            if key in ("page", "per_page"):
                continue
            if m is None or m.group(1) not in SEARCHES:
                return self._errors(400, 1001, key, f"Unknown search or parameter: {key}")
            name = m.group(1)
            if name == "date_min":
                rows = [r for r in rows if r["create_date"] >= value]
            elif name == "date_max":
                rows = [r for r in rows if r["create_date"] <= value]
            elif name == "customerid":
                rows = [r for r in rows if str(r["customerid"]) == value]
            elif name == "invoice_number":
                rows = [r for r in rows if r["invoice_number"] == value]
            elif name == "v3_status":
                rows = [r for r in rows if r["v3_status"] == value]
        rows.sort(key=lambda r: r["id"], reverse=True)
        pages = max(1, -(-len(rows) // per_page))
        chunk = rows[(page - 1) * per_page: page * per_page]
        return json_response(200, {"response": {"result": {"invoices": chunk, "page": page, "pages": pages,
                                                           "per_page": per_page, "total": len(rows)}}})
