"""Visma e-conomic simulator: the REST API at restapi.e-conomic.com (read-only, booked invoices).

    GET /self                                     the agreement the grant token is for: agreementNumber, company
    GET /invoices/booked?skippages=&pagesize=&filter=   booked invoices (credit notes are booked invoices with
                                                  negative amounts); filter: field$op:value[$and:...]
    GET /invoices/unpaid | /invoices/overdue      the convenience lists (remainder <> 0; and due date passed)
    GET /invoices/booked/{bookedInvoiceNumber}
    GET /customers/{customerNumber}

Auth: two headers on every request, X-AppSecretToken (the app's) and X-AgreementGrantToken (the grant a customer
gave the app for one agreement). A missing or unknown token -> 401 with e-conomic's error envelope
``{"message", "errorCode", "developerHint", "logId", "httpStatusCode", "logTime"}``.

Paging: ``skippages`` (0-based page index) and ``pagesize`` (default 20, at most 1000); every collection has
``pagination`` with ``maxPageSizeAllowed``, ``skipPages``, ``pageSize``, ``results``, ``resultsWithoutFilter``,
``firstPage``, ``lastPage`` and, except on the last page, ``nextPage`` (absolute links).

Agreements: grant ``SANDBOX_GRANT_TOKEN`` -> 7001234 "Nordisk Tømrer ApS" (the sandbox-secrets token), grant
``OTHER_GRANT_TOKEN`` -> 7005678 "Fjordbyg A/S". Recipients' countries are free text as users type them
("Danmark", "Denmark", "Sverige", "DK").
"""

from __future__ import annotations

import re
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import httpx

from .core import Simulator, json_response

APP_SECRET_TOKEN = "sandboxEconomicAppSecretToken0000000000001"
SANDBOX_GRANT_TOKEN = "sandboxEconomicAgreementGrant7001234000001"
OTHER_GRANT_TOKEN = "sandboxEconomicAgreementGrant7005678000001"
PUBLIC_HOST = "https://restapi.e-conomic.com"
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 20

AGREEMENTS = {
    SANDBOX_GRANT_TOKEN: (7001234, "Nordisk Tømrer ApS", "DKK"),
    OTHER_GRANT_TOKEN: (7005678, "Fjordbyg A/S", "DKK"),
}

# customerNumber -> (name, address, zip, city, country, email)
CUSTOMERS = {
    101: ("Havnens Bageri ApS", "Havnegade 12", "1058", "København K", "Danmark", "bogholderi@havnensbageri.example"),
    102: ("Lund & Søn I/S", "Torvet 3", "8000", "Aarhus C", "Denmark", "faktura@lundogsoen.example"),
    103: ("Göteborgs Trä AB", "Storgatan 5", "411 38", "Göteborg", "Sverige", "ekonomi@gbgtra.example"),
    104: ("Eventyr Rejser", "Vestergade 9", "", "Odense C", "Danmark", "info@eventyr.example"),  # no postal code
    105: ("Kvist Arkitekter", "Nørregade 40", "5000", "Odense C", "DK", "adm@kvist.example"),
}


def _recipient(cn: int, **override) -> dict:
    name, address, zip_, city, country, _ = CUSTOMERS[cn]
    r = {"name": name, "address": address, "zip": zip_, "city": city, "country": country,
         "vatZone": {"name": "Domestic", "vatZoneNumber": 1, "enabledForCustomer": True, "enabledForSupplier": True,
                     "self": f"{PUBLIC_HOST}/vat-zones/1"}}
    r.update(override)
    return {k: v for k, v in r.items() if v is not None}


def _invoices(agreement: int, today: date) -> list[dict]:
    """Booked invoices of one agreement: (customer, days ago, gross, remainder, recipient overrides)."""
    if agreement == 7001234:
        plan = [
            (101, 40, 12500.00, 12500.00, {}),                      # unpaid, overdue
            (102, 35, 8000.00, 8000.00, {}),                        # unpaid, overdue ("Denmark")
            (103, 50, 4300.50, 4300.50, {}),                        # unpaid, Swedish customer ("Sverige")
            (104, 45, 2200.00, 2200.00, {}),                        # unpaid, no postal code anywhere
            (105, 30, 990.00, 990.00, {"address": None, "zip": None, "city": None}),  # recipient sparse: customer's
            (101, 60, 5000.00, 2000.00, {}),                        # partially paid
            (102, 70, 3100.00, 0.00, {}),                           # paid
            (103, 20, -750.00, -750.00, {}),                        # a credit note (negative amounts)
            (105, 3, 1500.00, 1500.00, {}),                         # unpaid, not yet due
        ]
        plan += [(101 + i % 3, 25 + i % 30, 100.0 + i, 100.0 + i, {}) for i in range(23)]  # more than one page
    else:
        plan = [(101, 33, 7000.00, 7000.00, {}), (102, 31, 650.00, 650.00, {})]
    out = []
    for n, (cn, ago, gross, remainder, override) in enumerate(plan, start=1):
        number = (20000 if agreement == 7001234 else 50000) + n
        d = today - timedelta(days=ago)
        due = d + timedelta(days=14)
        net = round(gross / 1.25, 2)
        out.append({
            "bookedInvoiceNumber": number, "date": d.isoformat(), "dueDate": due.isoformat(), "currency": "DKK",
            "exchangeRate": 100, "netAmount": net, "netAmountInBaseCurrency": net, "grossAmount": gross,
            "grossAmountInBaseCurrency": gross, "vatAmount": round(gross - net, 2), "roundingAmount": 0.00,
            "remainder": remainder, "remainderInBaseCurrency": remainder,
            "paymentTerms": {"paymentTermsNumber": 1, "daysOfCredit": 14, "name": "Netto 14 dage",
                             "paymentTermsType": "net", "self": f"{PUBLIC_HOST}/payment-terms/1"},
            "customer": {"customerNumber": cn, "self": f"{PUBLIC_HOST}/customers/{cn}"},
            "recipient": _recipient(cn, **override),
            "layout": {"layoutNumber": 19, "self": f"{PUBLIC_HOST}/layouts/19"},
            "pdf": {"download": f"{PUBLIC_HOST}/invoices/booked/{number}/pdf"},
            "self": f"{PUBLIC_HOST}/invoices/booked/{number}",
        })
    return out


_OPS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b, "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b}
_FILTERABLE = {"bookedInvoiceNumber": int, "date": str, "dueDate": str, "remainder": float, "grossAmount": float,
               "currency": str}


class FilterError(ValueError):
    pass


def _parse_filter(text: str) -> list[tuple[str, str, Any]]:
    """``field$op:value`` terms joined by ``$and:`` (the only join the simulator knows; e-conomic has $or: too)."""
    terms = []
    for part in text.split("$and:"):
        m = re.fullmatch(r"([A-Za-z.]+)\$(eq|ne|gt|gte|lt|lte):(.*)", part)
        if m is None:
            raise FilterError(f"Could not parse filter term '{part}'.")
        field, op, raw = m.groups()
        if field not in _FILTERABLE:
            raise FilterError(f"The property '{field}' is not filterable.")
        try:
            terms.append((field, op, _FILTERABLE[field](raw)))
        except ValueError:
            raise FilterError(f"Invalid value '{raw}' for '{field}'.") from None
    return terms


class EconomicSimulator(Simulator):
    name = "economic"

    def __init__(self, data_dir: Any = None, today: date | None = None):
        super().__init__()
        self._data_dir = data_dir
        self.today = today or datetime.now(timezone.utc).date()
        self.agreements = {number: {"name": name, "currency": cur, "invoices": _invoices(number, self.today)}
                           for number, name, cur in AGREEMENTS.values()}
        self.customer_fetches: dict[int, int] = {}

    def reset(self) -> None:
        super().reset()
        self.__init__(data_dir=self._data_dir, today=self.today)

    @staticmethod
    def _error(status: int, code: str, message: str, hint: str = "") -> httpx.Response:
        return json_response(status, {"message": message, "errorCode": code, "developerHint": hint,
                                      "logId": uuid.uuid4().hex[:16], "httpStatusCode": status,
                                      "logTime": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def fault_response(self, status: int) -> httpx.Response:
        if status == 401:
            return self._error(401, "E04010", "Unauthorized access (Unauthorized).",
                               "The supplied token(s) are not valid.")
        if status == 429:
            return self._error(429, "E06000", "Too many requests.", "Slow down and try again later.")
        return self._error(status, "E00500", "An error occurred.", "Injected fault.")

    # --- routing ---------------------------------------------------------------------------------
    async def dispatch(self, request: httpx.Request) -> httpx.Response:
        if request.method != "GET":
            return self._error(405, "E00405", "Method not allowed.")
        secret = request.headers.get("x-appsecrettoken")
        grant = request.headers.get("x-agreementgranttoken")
        if not secret or not grant:
            return self._error(401, "E04010", "Unauthorized access (Unauthorized).",
                               "Both X-AppSecretToken and X-AgreementGrantToken headers must be supplied.")
        if secret != APP_SECRET_TOKEN or grant not in AGREEMENTS:
            return self._error(401, "E04010", "Unauthorized access (Unauthorized).",
                               "The supplied token(s) are not valid.")
        number = AGREEMENTS[grant][0]
        agreement = self.agreements[number]
        path = request.url.path.rstrip("/") or "/"
        q = request.url.params
        if path == "/self":
            return json_response(200, {
                "agreementNumber": number, "agreementType": {"agreementTypeNumber": 2, "name": "Plus"},
                "company": {"name": agreement["name"], "addressLine1": "Industrivej 7", "zip": "4000",
                            "city": "Roskilde", "country": "Danmark", "companyIdentificationNumber": "12345678"},
                "application": {"appNumber": 42, "name": "Debitura runner (sandbox)", "requiredRoles": []},
                "userName": "bogholder", "signupDate": "2019-03-01", "canSendElectronicInvoice": True,
                "self": f"{PUBLIC_HOST}/self"})
        if path in ("/invoices/booked", "/invoices/unpaid", "/invoices/overdue"):
            rows = list(agreement["invoices"])
            if path != "/invoices/booked":
                rows = [r for r in rows if r["remainder"] != 0]
            if path == "/invoices/overdue":
                rows = [r for r in rows if r["dueDate"] < self.today.isoformat()]
            return self._collection(request, path, rows, q)
        m = re.fullmatch(r"/invoices/booked/(\d+)", path)
        if m:
            inv = next((r for r in agreement["invoices"] if r["bookedInvoiceNumber"] == int(m.group(1))), None)
            if inv is None:
                return self._error(404, "E07000", "Booked invoice not found.",
                                   f"No booked invoice with number {m.group(1)}.")
            return json_response(200, inv)
        m = re.fullmatch(r"/customers/(\d+)", path)
        if m and int(m.group(1)) in CUSTOMERS:
            cn = int(m.group(1))
            self.customer_fetches[cn] = self.customer_fetches.get(cn, 0) + 1
            name, address, zip_, city, country, email = CUSTOMERS[cn]
            return json_response(200, {"customerNumber": cn, "name": name, "address": address, "zip": zip_,
                                       "city": city, "country": country, "email": email, "currency": "DKK",
                                       "corporateIdentificationNumber": f"{30000000 + cn}",
                                       "self": f"{PUBLIC_HOST}/customers/{cn}"})
        return self._error(404, "E00404", "The requested resource was not found.", f"No route {path}.")

    def _collection(self, request: httpx.Request, path: str, rows: list[dict], q) -> httpx.Response:
        try:
            skip = int(q.get("skippages", "0"))
            size = int(q.get("pagesize", str(DEFAULT_PAGE_SIZE)))
        except ValueError:
            return self._error(400, "E00400", "Invalid paging parameters.")
        if size > MAX_PAGE_SIZE or size < 1 or skip < 0:
            return self._error(400, "E00400", f"pagesize must be between 1 and {MAX_PAGE_SIZE}.")
        all_count = len(rows)
        if q.get("filter"):
            try:
                terms = _parse_filter(q["filter"])
            except FilterError as exc:
                return self._error(400, "E00400", "Invalid filter.", str(exc))
            rows = [r for r in rows if all(_OPS[op](r[f], v) for f, op, v in terms)]
        rows.sort(key=lambda r: r["bookedInvoiceNumber"])
        chunk = rows[skip * size:(skip + 1) * size]
        last = max(0, (len(rows) - 1) // size)

        def link(page: int) -> str:
            params = {k: v for k, v in q.items() if k not in ("skippages", "pagesize")}
            return f"{PUBLIC_HOST}{path}?" + urlencode({"skippages": page, "pagesize": size, **params})

        pagination = {"maxPageSizeAllowed": MAX_PAGE_SIZE, "skipPages": skip, "pageSize": size,
                      "results": len(rows), "resultsWithoutFilter": all_count, "firstPage": link(0),
                      "lastPage": link(last)}
        if skip < last:
            pagination["nextPage"] = link(skip + 1)
        return json_response(200, {"collection": chunk, "pagination": pagination, "self": link(skip)})
