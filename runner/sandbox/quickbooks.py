"""QuickBooks Online simulator: Intuit's OAuth 2.0 server and the Accounting API v3 (read-only).

Everything lives under one mount (``sandbox://quickbooks`` in-process, ``/quickbooks`` on a SandboxServer):

    GET  /connect/oauth2                          authorize (appcenter.intuit.com); redirect has code, state, realmId
    POST /oauth2/v1/tokens/bearer                 token (oauth.platform.intuit.com): client_secret_basic or _post;
                                                  refresh tokens ROTATE (the old one is dead once a new one is issued)
    POST /oauth2/v1/tokens/revoke                 revoke (developer.api.intuit.com)
    GET  /v3/company/{realmId}/companyinfo/{realmId}
    GET  /v3/company/{realmId}/query?query=...    select * from Invoice|CompanyInfo|Customer [where a op 'v' and ...]
                                                  [orderby f] [startposition n] [maxresults m]   (max 1000)
    GET  /v3/company/{realmId}/invoice/{id}
    GET  /v3/company/{realmId}/invoice/{id}/pdf   the invoice as a PDF (Accept: application/pdf)
    GET  /v3/company/{realmId}/customer/{id}
    GET  /v3/company/{realmId}/cdc?entities=Invoice&changedSince=...   change data capture (see record_change)

Errors use Intuit's shapes: token endpoint ``{"error": "invalid_grant", "error_description": ...}`` (400);
API ``{"Fault": {"Error": [{"Message", "Detail", "code"}], "type"}, "time"}`` (401 code 3200 for an expired or
bad token, 403 code 3201 for a company the grant does not cover, 400 code 4000 for a query parse error).
An empty query result has no entity key: ``{"QueryResponse": {}, "time": ...}``.

Users (who "logs in" at the authorize page; test-only ``sandbox_user`` parameter picks one):
``alice`` -> company 9130357766961111 "Sandbox Company_US_1" (default), ``bjorn`` -> 9130357766962222
"Nordlys Consulting ApS" (Denmark), ``carol`` -> 9130357766963333 "Carol's Big Company" (1,200 invoices).
A sandbox bootstrap refresh token for alice (as from Intuit's OAuth Playground) is in
``sandbox-secrets/quickbooks_refresh_token``; client credentials in ``sandbox-secrets/quickbooks_client_*``.
"""

from __future__ import annotations

import re
import time
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx

from .core import Simulator, json_response
from .oauth_server import OAuthServer

CLIENT_ID = "ABsandboxQBOclient0000000000000000000000000000000"
CLIENT_SECRET = "qbo-sandbox-secret-7f3a9c"
BOOTSTRAP_REFRESH_TOKEN = "AB11sandboxQBObootstrapRefreshToken00alice"
REALM_US, REALM_DK, REALM_BIG = "9130357766961111", "9130357766962222", "9130357766963333"
USERS = {"alice": REALM_US, "bjorn": REALM_DK, "carol": REALM_BIG}
COMPANY = {REALM_US: ("Sandbox Company_US_1", "US"), REALM_DK: ("Nordlys Consulting ApS", "DK"),
           REALM_BIG: ("Carol's Big Company", "US")}
MAX_RESULTS = 1000


def _now_iso() -> str:
    return datetime.now(timezone.utc).astimezone(timezone(timedelta(hours=-8))).isoformat(timespec="milliseconds")


def _addr(line1=None, city=None, postal=None, country=None, sub=None, line2=None, id_="1") -> dict:
    a: dict[str, Any] = {"Id": id_}
    for k, v in (("Line1", line1), ("Line2", line2), ("City", city), ("CountrySubDivisionCode", sub),
                 ("PostalCode", postal), ("Country", country)):
        if v is not None:
            a[k] = v
    return a


def _customers(realm: str) -> dict[str, dict]:
    if realm == REALM_DK:
        rows = [("1", "Fjord Fisk A/S", "bogholderi@fjordfisk.dk", _addr("Havnegade 12", "København K", "1058", "Danmark")),
                ("2", "Bager Hansen", "hansen@bager.dk", _addr("Torvet 3", "Aarhus C", "8000", "DK")),
                ("3", "Nordic Tools AB", "ap@nordictools.se", _addr("Storgatan 1", "Malmö", "211 34", "Sverige")),
                ("4", "Eventyr Rejser", "info@eventyr.dk", _addr("Vestergade 9", "Odense C", None, "Danmark"))]
    else:
        rows = [("1", "Amy's Bird Sanctuary", "birds@intuit.com", _addr("4581 Finch St.", "Bayshore", "94326", "USA", "CA")),
                ("2", "Bill's Windsurf Shop", "surf@intuit.com", _addr("12 Ocean Dr.", "Half Moon Bay", "94213", "United States", "CA")),
                ("3", "Cool Cars", "cool_cars@intuit.com", _addr("65 Ocean Dr.", "Half Moon Bay", "94213", None, "CA")),
                ("4", "Diego Rodriguez", "diego@rodriguez.com", _addr("321 Channel St.", "Mountain View", "94303", "U.S.A.", "CA")),
                ("5", "Narnia Imports", "lion@narnia.example", _addr("1 Lamp Post", "Cair Paravel", "00001", "Narnia"))]
    out = {}
    for cid, name, email, addr in rows:
        out[cid] = {"Id": cid, "SyncToken": "0", "DisplayName": name, "CompanyName": name, "Active": True,
                    "PrimaryEmailAddr": {"Address": email}, "BillAddr": addr, "Balance": 0,
                    "MetaData": {"CreateTime": "2024-01-05T10:00:00-08:00", "LastUpdatedTime": "2024-01-05T10:00:00-08:00"}}
        if realm != REALM_DK:
            out[cid].update(_PEOPLE.get(name, {}))
            if out[cid]["CompanyName"] is None:  # QuickBooks leaves an empty field out
                del out[cid]["CompanyName"]
    return out


# As in Intuit's sample company: a company customer with the name of the person to contact, and a private
# person (a GivenName and FamilyName, no CompanyName).
_PEOPLE = {"Bill's Windsurf Shop": {"GivenName": "Bill", "FamilyName": "Lucchini"},
           "Diego Rodriguez": {"GivenName": "Diego", "FamilyName": "Rodriguez", "CompanyName": None}}


def _invoices(realm: str, today: date) -> list[dict]:
    cur = "DKK" if realm == REALM_DK else "USD"
    cur_name = "Danish Krone" if cur == "DKK" else "United States Dollar"
    plan: list[tuple] = []  # (customer, days_ago, due_days, total, balance, billaddr_override)
    if realm == REALM_BIG:
        for i in range(1200):
            plan.append((str(1 + i % 4), 5 + i % 60, 14, 100.0 + i, 100.0 + i, None))
    elif realm == REALM_DK:
        plan = [("1", 40, 14, 12500.0, 12500.0, None), ("2", 35, 30, 800.0, 800.0, None),
                ("3", 20, 14, 4300.5, 4300.5, None), ("4", 30, 14, 999.0, 999.0, None),
                ("1", 25, 14, 5000.0, 2500.0, None), ("2", 50, 14, 300.0, 0.0, None),
                ("1", 200, 14, 700.0, 700.0, None)]
    else:
        plan = [("1", 45, 30, 1200.0, 1200.0, None),  # unpaid, overdue
                ("2", 40, 30, 350.0, 350.0, {"Line1": "12 Ocean Dr."}),  # sparse BillAddr -> customer's address
                ("3", 33, 30, 640.0, 640.0, None),  # no country anywhere -> incomplete_address
                ("4", 50, 14, 900.0, 450.0, None),  # partially paid -> not_unpaid
                ("1", 60, 14, 75.0, 0.0, None),  # paid
                ("4", 38, 14, 420.0, 420.0, None),  # "U.S.A." -> US
                ("5", 36, 14, 99.0, 99.0, None),  # "Narnia" -> country not recognised
                ("2", 5, 30, 510.0, 510.0, None),  # not yet due
                ("1", 150, 14, 2000.0, 2000.0, None)]  # outside a 90-day window
    custs = _customers(realm)
    out = []
    for n, (cid, ago, due_days, total, balance, bill) in enumerate(plan, start=1):
        c = custs[cid]
        txn = today - timedelta(days=ago)
        inv = {"Id": str(100 + n), "SyncToken": "0", "DocNumber": str(1000 + n), "TxnDate": txn.isoformat(),
               "DueDate": (txn + timedelta(days=due_days)).isoformat(), "TotalAmt": total, "Balance": balance,
               "CurrencyRef": {"value": cur, "name": cur_name},
               "CustomerRef": {"value": cid, "name": c["DisplayName"]},
               "BillEmail": {"Address": c["PrimaryEmailAddr"]["Address"]},
               "BillAddr": dict(bill) if bill is not None else dict(c["BillAddr"]),
               "Line": [{"Id": "1", "LineNum": 1, "Amount": total, "DetailType": "SalesItemLineDetail",
                         "SalesItemLineDetail": {"ItemRef": {"value": "1", "name": "Services"}}}],
               "MetaData": {"CreateTime": f"{txn.isoformat()}T09:00:00-08:00",
                            "LastUpdatedTime": f"{txn.isoformat()}T09:00:00-08:00"}}
        if realm == REALM_DK:  # multicurrency off: QuickBooks leaves CurrencyRef out
            del inv["CurrencyRef"]
        out.append(inv)
    return out


_COND = re.compile(r"^\s*([A-Za-z][\w.]*)\s*(>=|<=|!=|=|<|>|\bLIKE\b|\bIN\b)\s*(.+?)\s*$", re.I)
_QUERY = re.compile(r"^\s*select\s+(\*|count\(\*\))\s+from\s+(\w+)(?:\s+where\s+(.*?))?(?:\s+orderby\s+([\w.]+(?:\s+(?:asc|desc))?))?"
                    r"(?:\s+startposition\s+(\d+))?(?:\s+maxresults\s+(\d+))?\s*$", re.I | re.S)


class QueryError(Exception):
    pass


def _value(text: str):
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("\\'", "'")
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return float(text)
    raise QueryError(f"QueryParserError: Encountered \" <IDENTIFIER> \"{text} \"\" at line 1")


def _get(obj: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _matches(rec: dict, field: str, op: str, raw: str) -> bool:
    have = _get(rec, field)
    if op.upper() == "IN":
        values = [_value(v) for v in raw.strip().strip("()").split(",")]
        return any(str(have) == str(v) for v in values)
    want = _value(raw)
    if isinstance(have, (int, float)) or (isinstance(want, float) and have is not None):
        try:
            have_n, want_n = float(have), float(want)
        except (TypeError, ValueError):
            return False
        have, want = have_n, want_n
    elif have is None:
        return False
    else:
        have, want = str(have), str(want)
    op = op.upper()
    if op == "LIKE":
        pat = "^" + re.escape(str(want)).replace("%", ".*") + "$"
        return re.match(pat, str(have), re.I) is not None
    return {"=": have == want, "!=": have != want, "<": have < want, ">": have > want,
            "<=": have <= want, ">=": have >= want}[op]


def run_query(text: str, tables: dict[str, list[dict]]) -> dict:
    m = _QUERY.match(text or "")
    if not m:
        raise QueryError("QueryParserError: Encountered \" <EOF> \"\" at line 1")
    what, entity, where, order, start, maxr = m.groups()
    name = next((k for k in tables if k.lower() == entity.lower()), None)
    if name is None:
        raise QueryError(f"QueryValidationError: Entity {entity} is not supported")
    rows = list(tables[name])
    if where:
        if re.search(r"\bor\b", where, re.I):
            raise QueryError("QueryParserError: Encountered \" \"OR\" \"or \"\"")
        for cond in re.split(r"\s+and\s+", where, flags=re.I):
            cm = _COND.match(cond)
            if not cm:
                raise QueryError(f"QueryParserError: Encountered \"{cond.strip()}\" at line 1")
            rows = [r for r in rows if _matches(r, cm.group(1), cm.group(2), cm.group(3))]
    if what.lower().startswith("count"):
        return {"totalCount": len(rows)}
    if order:
        parts = order.split()
        rows.sort(key=lambda r: (str(_get(r, parts[0])).zfill(20) if str(_get(r, parts[0])).isdigit()
                                 else str(_get(r, parts[0]))), reverse=len(parts) > 1 and parts[1].lower() == "desc")
    start_i = int(start or 1)
    max_i = int(maxr or 100)
    if max_i > MAX_RESULTS:
        max_i = MAX_RESULTS
    page = rows[max(0, start_i - 1): max(0, start_i - 1) + max_i]
    if not page:
        return {}
    return {name: page, "startPosition": start_i, "maxResults": len(page)}


class QuickBooksSimulator(Simulator):
    name = "quickbooks"

    def __init__(self, data_dir: Any = None, today: date | None = None):
        super().__init__()
        self._data_dir = data_dir
        self.today = today or datetime.now(timezone.utc).date()
        self.oauth = OAuthServer(clients={CLIENT_ID: CLIENT_SECRET}, rotate=True, token_prefix="")
        self.oauth.add_grant(BOOTSTRAP_REFRESH_TOKEN, CLIENT_ID, "alice", "com.intuit.quickbooks.accounting")
        self.oauth.keep_in(data_dir, self.name)
        self.users = {u: {"realm": r} for u, r in USERS.items()}
        self.default_user = "alice"
        self.data = {r: {"Invoice": _invoices(r, self.today), "Customer": list(_customers(r).values()),
                         "CompanyInfo": [self._company(r)]} for r in COMPANY}
        self.expire_after: int | None = None  # expire every access token after this many more API calls
        self.wall = time.time  # the clock changes are stamped with (tests move it)
        self.deleted: dict[str, list[dict]] = {r: [] for r in COMPANY}  # CDC's tombstones of deleted invoices
        from .lifecycle import Changes

        self.changes = Changes(data_dir, "quickbooks")

    # --- after import: pay, void or credit an invoice at the source (runner sandbox pay|void|credit) --------
    def _apply_changes(self) -> None:
        for c in self.changes.pending():
            try:
                self.act(c["action"], c["invoice"], c.get("amount"))
            except KeyError:
                pass

    def act(self, action: str, invoice: str, amount: str | None = None) -> dict:
        """As QuickBooks shows an invoice after a payment (Balance down, a linked Payment), a void (amounts
        zeroed, "Voided" in the private note) or an applied credit memo (Balance down, a linked CreditMemo)."""
        inv = next((i for realm in self.data.values() for i in realm["Invoice"] if invoice in (i["Id"], i["DocNumber"])),
                   None)
        if inv is None:
            raise KeyError(invoice)
        amt = min(inv["Balance"], float(amount)) if amount is not None else inv["Balance"]
        seq = str(9000 + sum(len(i.get("LinkedTxn") or []) for r in self.data.values() for i in r["Invoice"]))
        if action == "pay":
            inv["Balance"] = round(inv["Balance"] - amt, 2)
            inv.setdefault("LinkedTxn", []).append({"TxnId": seq, "TxnType": "Payment"})
        elif action == "void":
            inv["Balance"], inv["TotalAmt"] = 0.0, 0.0
            for line in inv["Line"]:
                line["Amount"] = 0.0
            inv["PrivateNote"] = "Voided"
        elif action == "credit":
            inv["Balance"] = round(inv["Balance"] - amt, 2)
            inv.setdefault("LinkedTxn", []).append({"TxnId": seq, "TxnType": "CreditMemo"})
        elif action == "delete":  # gone: queries leave it out, a read answers Object Not Found; CDC reports it
            realm = next(r for r, d in self.data.items() if inv in d["Invoice"])
            self.record_change(realm, inv, deleted=True)
            return inv
        else:
            raise ValueError(action)
        realm = next(r for r, d in self.data.items() if inv in d["Invoice"])
        self.record_change(realm, inv)  # SyncToken and MetaData.LastUpdatedTime move on, as CDC reads them
        return inv

    def invoice_pdf(self, realm: str, inv_id: str) -> bytes | None:
        from .lifecycle import pdf

        inv = next((i for i in self.data[realm]["Invoice"] if i["Id"] == inv_id), None)
        if inv is None:
            return None
        return pdf(f"Invoice {inv['DocNumber']}", [f"Bill to: {inv['CustomerRef']['name']}",
                                                   f"Date: {inv['TxnDate']}  Due: {inv['DueDate']}",
                                                   f"Total: {inv['TotalAmt']:.2f}  Balance due: {inv['Balance']:.2f}"])

    def _company(self, realm: str) -> dict:
        name, country = COMPANY[realm]
        addr = _addr("Havnegade 1", "København K", "1058", "DK") if country == "DK" else \
            _addr("123 Sierra Way", "San Pablo", "87999", "US", "CA")
        return {"Id": "1", "CompanyName": name, "LegalName": name, "Country": country, "CompanyAddr": addr,
                "SyncToken": "3", "MetaData": {"CreateTime": "2023-06-01T10:00:00-07:00"}}

    # --- state -----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {**super().state(), "oauth": self.oauth.state()}

    def reset(self) -> None:
        super().reset()
        self.oauth.forget()
        self.__init__(data_dir=self._data_dir, today=self.today)

    def fault_response(self, status: int) -> httpx.Response:
        if status == 401:
            return self._fault(401, "AuthenticationFault", "3200", "message=AuthenticationFailed; errorCode=003200; statusCode=401",
                               "Token expired")
        if status == 429:
            return self._fault(429, "ThrottleExceeded", "003001", "message=ThrottleExceeded; errorCode=003001; statusCode=429",
                               "Too many requests")
        return self._fault(status, "SystemFault", "10000", "An application error has occurred while processing your request",
                           "System Failure Error: injected")

    @staticmethod
    def _fault(status: int, type_: str, code: str, message: str, detail: str) -> httpx.Response:
        return json_response(status, {"Fault": {"Error": [{"Message": message, "Detail": detail, "code": code}],
                                                "type": type_}, "time": _now_iso()},
                             headers={"intuit_tid": "1-sandbox-tid"})

    # --- routing ---------------------------------------------------------------------------------
    async def dispatch(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self._apply_changes()
        if path == "/connect/oauth2" and request.method == "GET":
            return self.oauth.authorize(request, self.users, self.default_user,
                                        lambda user: {"realmId": self.users[user]["realm"]})
        if path == "/oauth2/v1/tokens/bearer" and request.method == "POST":
            return self.oauth.token(request, lambda user: {"x_refresh_token_expires_in": 8726400})
        if path == "/oauth2/v1/tokens/revoke" and request.method == "POST":
            return self.oauth.revoke(request)
        m = re.match(r"^/v3/company/(\d+)/(query|preferences|cdc|companyinfo/\d+|invoice/[^/]+/pdf|invoice/[^/]+|"
                     r"customer/[^/]+)$", path)
        if not m or request.method not in ("GET", "POST"):
            return self._fault(404, "ValidationFault", "610", "Object Not Found", f"Unknown resource {path}")
        if self.expire_after is not None:
            if self.expire_after <= 0:
                self.oauth.expire_access_tokens()
                self.expire_after = None
            else:
                self.expire_after -= 1
        user, why = self.oauth.check_access(request.headers.get("authorization"))
        if user is None:
            return self._fault(401, "AuthenticationFault", "3200",
                               "message=AuthenticationFailed; errorCode=003200; statusCode=401",
                               "Token expired" if why == "expired" else "Token invalid")
        realm, rest = m.group(1), m.group(2)
        if realm not in self.data:
            return self._fault(404, "ValidationFault", "610", "Object Not Found", f"Company {realm} not found")
        if self.users[user]["realm"] != realm:
            return self._fault(403, "AuthorizationFault", "3201", "message=ApplicationAuthorizationFailed; "
                               "errorCode=003201; statusCode=403", "This app is not authorized for this company")
        tables = self.data[realm]
        if rest == "query":
            text = request.url.params.get("query")
            if text is None and request.method == "POST":
                text = request.content.decode("utf-8", "replace")
            try:
                resp = run_query(text or "", tables)
            except QueryError as exc:
                return self._fault(400, "ValidationFault", "4000", "Error parsing query", str(exc))
            return json_response(200, {"QueryResponse": resp, "time": _now_iso()})
        if rest == "cdc":
            return self._cdc(realm, request.url.params)
        if rest == "preferences":
            home = "DKK" if realm == REALM_DK else "USD"
            return json_response(200, {"Preferences": {"CurrencyPrefs": {"MultiCurrencyEnabled": realm != REALM_DK,
                                                                          "HomeCurrency": {"value": home}}},
                                       "time": _now_iso()})
        if rest.startswith("invoice/") and rest.endswith("/pdf"):
            # GET /v3/company/{realm}/invoice/{id}/pdf with Accept: application/pdf: the invoice as QuickBooks
            # prints it.
            body = self.invoice_pdf(realm, rest.split("/")[1])
            if body is None:
                return self._fault(400, "ValidationFault", "610", "Object Not Found", "Object Not Found")
            return httpx.Response(200, content=body, headers={"Content-Type": "application/pdf"})
        kind, _, ident = rest.partition("/")
        if kind == "companyinfo":
            if ident != realm:
                return self._fault(400, "ValidationFault", "610", "Object Not Found", "CompanyInfo id must be the realm id")
            return json_response(200, {"CompanyInfo": tables["CompanyInfo"][0], "time": _now_iso()})
        table = "Invoice" if kind == "invoice" else "Customer"
        row = next((r for r in tables[table] if r["Id"] == ident), None)
        if row is None:
            return self._fault(400, "ValidationFault", "610", "Object Not Found",
                               "Object Not Found : Something you're trying to use has been made inactive.")
        return json_response(200, {table: row, "time": _now_iso()})

    # --- change data capture (GET /v3/company/{realm}/cdc) ----------------------------------------------
    # Intuit: entities (comma-separated) and changedSince (ISO date or date-time, within the last 30 days);
    # the full payload of every entity changed since, at most 1,000 objects per answer, no paging; a deleted
    # entity comes as {"domain": "QBO", "status": "Deleted", "Id", "MetaData": {"LastUpdatedTime"}}. The
    # answer's shape (CDCResponse[].QueryResponse[].<Entity>) follows Intuit's published example; the fault
    # for a changedSince older than 30 days is not documented there and is modelled on other validation faults.

    def _stamp(self) -> str:
        return datetime.fromtimestamp(self.wall(), timezone.utc).astimezone(
            timezone(timedelta(hours=-8))).isoformat(timespec="seconds")

    def record_change(self, realm: str, invoice: dict, deleted: bool = False) -> None:
        """An invoice changed (or was deleted) now: call it after changing the invoice in ``self.data``."""
        if deleted:
            self.data[realm]["Invoice"] = [r for r in self.data[realm]["Invoice"] if r["Id"] != invoice["Id"]]
            self.deleted[realm].append({"domain": "QBO", "status": "Deleted", "Id": invoice["Id"],
                                        "MetaData": {"LastUpdatedTime": self._stamp()}})
            return
        invoice.setdefault("MetaData", {})["LastUpdatedTime"] = self._stamp()
        invoice["SyncToken"] = str(int(invoice.get("SyncToken", "0")) + 1)

    def _cdc(self, realm: str, params: httpx.QueryParams) -> httpx.Response:
        entities = [e.strip() for e in (params.get("entities") or "").split(",") if e.strip()]
        since_text = params.get("changedSince") or ""
        if not entities or not since_text:
            return self._fault(400, "ValidationFault", "2020", "Required param missing, need to supply the required "
                               "value for the API", "Required parameter entities and changedSince are missing")
        try:
            since = datetime.fromisoformat(since_text.strip().replace("Z", "+00:00"))
        except ValueError:
            return self._fault(400, "ValidationFault", "2010", "Invalid value for changedSince",
                               f"changedSince {since_text!r} is not an ISO date-time")
        if since.tzinfo is None:
            since = since.replace(tzinfo=timezone(timedelta(hours=-8)))  # the company's zone (Pacific here)
        if since.timestamp() < self.wall() - 30 * 86400:
            return self._fault(400, "ValidationFault", "2010", "Invalid value for changedSince",
                               "changedSince must be within the last 30 days")
        tables = self.data[realm]
        out = []
        for name in entities:
            table = next((k for k in tables if k.lower() == name.lower()), None)
            if table is None:
                return self._fault(400, "ValidationFault", "2010", f"Entity {name} is not supported for CDC",
                                   f"Unsupported entity {name}")
            rows = [r for r in tables[table]
                    if datetime.fromisoformat(r.get("MetaData", {}).get("LastUpdatedTime", "1970-01-01T00:00:00+00:00"))
                    > since]
            if table == "Invoice":
                rows += [d for d in self.deleted[realm]
                         if datetime.fromisoformat(d["MetaData"]["LastUpdatedTime"]) > since]
            rows = rows[:MAX_RESULTS]
            qr: dict[str, Any] = {"startPosition": 1, "maxResults": len(rows), "totalCount": len(rows)}
            if rows:
                qr[table] = rows
            out.append(qr)
        return json_response(200, {"CDCResponse": [{"QueryResponse": out}], "time": _now_iso()})
