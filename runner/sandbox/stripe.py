"""Stripe API simulator (invoices and customers, read-only).

Faithful to the real API where the runner cares: auth (Bearer or HTTP Basic with the key as user name),
error envelope ``{"error": {"type", "message", "code"?, "param"?, "doc_url"?}}``, a ``Request-Id`` header on
every response, cursor pagination (newest first), ``created`` range filters, ``expand[]=data.customer``,
the Search API, and 429s in Stripe's shape (no Retry-After header). The ``Stripe-Version`` request header is
recorded (``StripeSimulator.api_versions``) and echoed; without one the account's default version is named.

Endpoints: ``GET /v1/invoices``, ``GET /v1/invoices/search``, ``GET /v1/invoices/{id}``,
``GET /v1/customers/{id}``, ``GET /v1/account`` (a restricted key without the account permission gets Stripe's
403, which names the account), ``GET /v1/events`` (invoice events recorded by ``record_event`` when an invoice
changes in the simulator; kept 30 days, newest first, filtered by ``type``/``types[]`` and ``created``).

API keys (``StripeSimulator.keys``; add with ``sim.add_key(...)``, revoke with ``sim.revoke(key)``):

=========================================  =====  ==============================================
key                                        mode   behaviour
=========================================  =====  ==============================================
``sk_test_sandbox_4eC39HqLyjWDarjtT1zdp7dc`` test   full secret key, test data set
``rk_test_sandbox_readonly_51Hx``           test   restricted: invoice + customer read
``rk_test_sandbox_noinvoices_77Qa``         test   restricted: customer read only -> 403 on invoices
``sk_test_sandbox_revoked_00xx``            test   revoked -> 401 "Invalid API Key provided"
``sk_live_sandbox_9Zq2``                    live   full secret key, live data set (3 open invoices)
=========================================  =====  ==============================================

Any other key -> 401. No key -> 401 "You did not provide an API key...".

Rate limits: 25 req/s in test mode, 100 req/s in live mode (token bucket per account and mode), Search API
20 req/s; ``faults.rate_limit_per_s`` replaces all of them when set.

Data: :func:`build_dataset` (deterministic, relative to an anchor = today's UTC midnight).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import time
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from .core import Simulator, TokenBucket, json_response

ACCOUNT_ID = "acct_1SbxSandbox0Acct"
TEST_SECRET_KEY = "sk_test_sandbox_4eC39HqLyjWDarjtT1zdp7dc"
TEST_RESTRICTED_KEY = "rk_test_sandbox_readonly_51Hx"
TEST_RESTRICTED_NO_INVOICES_KEY = "rk_test_sandbox_noinvoices_77Qa"
TEST_REVOKED_KEY = "sk_test_sandbox_revoked_00xx"
LIVE_SECRET_KEY = "sk_live_sandbox_9Zq2"

PERM_INVOICE_READ = "rak_invoice_read"
PERM_INVOICE_WRITE = "rak_invoice_write"
# Restricted keys' "Events: read" permission; the internal name is modelled on the others, not verified.
PERM_EVENT_READ = "rak_event_read"
PERM_CUSTOMER_READ = "rak_customer_read"
# GET /v1/account: a restricted key needs this permission; without it Stripe answers 403 and names the account.
PERM_ACCOUNT_READ = "rak_accounts_kyc_basic_read"
ACCOUNT_NAME = "Acme Sandbox ApS"


def account_obj() -> dict[str, Any]:
    """The account the sandbox's keys belong to (test and live mode of one account share its id)."""
    return {"id": ACCOUNT_ID, "object": "account", "type": "standard", "country": "DK", "default_currency": "dkk",
            "email": "finance@acme-sandbox.example", "charges_enabled": True, "details_submitted": True,
            "business_profile": {"name": ACCOUNT_NAME, "url": None, "support_email": None},
            "settings": {"dashboard": {"display_name": ACCOUNT_NAME, "timezone": "Europe/Copenhagen"}}}

ACCOUNT_API_VERSION = "2024-06-20"  # the account's default, used when a request names no Stripe-Version
API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(\.[a-z]+)?")
DEFAULT_RATE = {"test": 25.0, "live": 100.0}
SEARCH_RATE = 20.0

DOC_RATE_LIMIT = "https://stripe.com/docs/error-codes/rate-limit"
DOC_RESOURCE_MISSING = "https://stripe.com/docs/error-codes/resource-missing"
NO_KEY_MESSAGE = (
    "You did not provide an API key. You need to provide your API key in the Authorization header, "
    "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication "
    "for details, or we can help at https://support.stripe.com/."
)
RATE_LIMIT_MESSAGE = (
    "Request rate limit exceeded. You can learn more about rate limits here https://stripe.com/docs/rate-limits."
)


@dataclass
class StripeKey:
    mode: str  # "test" | "live"
    permissions: frozenset[str] | None = None  # None = secret key (everything)
    active: bool = True


def default_keys() -> dict[str, StripeKey]:
    return {
        TEST_SECRET_KEY: StripeKey("test"),
        TEST_RESTRICTED_KEY: StripeKey("test", frozenset({PERM_INVOICE_READ, PERM_CUSTOMER_READ})),
        TEST_RESTRICTED_NO_INVOICES_KEY: StripeKey("test", frozenset({PERM_CUSTOMER_READ})),
        TEST_REVOKED_KEY: StripeKey("test", active=False),
        LIVE_SECRET_KEY: StripeKey("live"),
    }


def mask_key(key: str) -> str:
    """Mask like Stripe: keep the ``sk_test_``-style prefix and the last 4 characters."""
    m = re.match(r"^((?:sk|rk|pk)_(?:test|live)_)(.*)$", key)
    prefix, rest = (m.group(1), m.group(2)) if m else ("", key)
    if len(rest) <= 4:
        return prefix + "*" * len(rest)
    return prefix + "*" * (len(rest) - 4) + rest[-4:]


# ----------------------------------------------------------------------------------------------
# Data set

DAY = 86400


def _stable_id(prefix: str, seed: str, n: int = 14) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    num = int.from_bytes(hashlib.sha256(seed.encode()).digest(), "big")
    out = []
    for _ in range(n):
        num, r = divmod(num, 62)
        out.append(alphabet[r])
    return prefix + "1Sbx" + "".join(out)


def _addr(line1=None, city=None, postal_code=None, country=None, state=None, line2=None) -> dict[str, Any]:
    return {"city": city, "country": country, "line1": line1, "line2": line2,
            "postal_code": postal_code, "state": state}


NULL_ADDRESS = _addr()

# key -> (name, email, address or None, phone, preferred currency)
_TEST_CUSTOMERS: list[tuple[str, str, str, dict | None, str | None]] = [
    ("mueller", "Müller Maschinenbau GmbH", "buchhaltung@mueller-maschinenbau.example",
     _addr("Industriestraße 12", "Stuttgart", "70565", "DE"), "+49 711 5550100"),
    ("nordlys", "Nordlys ApS", "faktura@nordlys.example",
     _addr("Vesterbrogade 41", "København V", "1620", "DK"), "+45 33 55 01 02"),
    ("acme", "Acme Widgets Inc.", "ap@acme-widgets.example",
     _addr("500 Howard Street", "San Francisco", "94105", "US", "CA", "Suite 300"), "+1 415 555 0199"),
    ("janedoe", "Jane Doe", "jane.doe@mail.example",
     _addr("221 W 57th Street", "New York", "10019", "US", "NY", "Apt 4B"), None),
    ("thames", "Thames Consulting Ltd", "accounts@thames-consulting.example",
     _addr("18 Bermondsey Street", "London", "SE1 2EG", "GB"), "+44 20 7946 0011"),
    ("dupont", "Boulangerie Dupont SARL", "compta@boulangerie-dupont.example",
     _addr("14 Rue de Rivoli", "Paris", "75004", "FR"), "+33 1 44 55 66 77"),
    ("tanaka", "Tanaka Shoji K.K.", "keiri@tanaka-shoji.example",
     _addr("1-2-3 Marunouchi", "Chiyoda-ku, Tokyo", "100-0005", "JP", "Tokyo"), "+81 3 5555 0123"),
    ("alsalam", "Al-Salam General Trading Co. W.L.L.", "finance@alsalam-trading.example",
     _addr("Block 3, Street 12, Sharq", "Kuwait City", "15300", "KW"), "+965 2222 3333"),
    ("jensen", "Lars Jensen", "lars.jensen@post.example",
     _addr("Nørrebrogade 88, 3. th.", "Aarhus C", "8000", "DK"), None),
    ("martin", "Sophie Martin", "sophie.martin@courriel.example",
     _addr("7 Place Bellecour", "Lyon", "69002", "FR"), "+33 6 12 34 56 78"),
    ("weber", "Hans Weber", "h.weber@web.example",
     _addr("Sendlinger Straße 5", "München", "80331", "DE"), None),
    ("pacific", "Pacific Trading LLC", "billing@pacific-trading.example",
     _addr("2100 Ross Avenue", "Dallas", "75201", "US", "TX"), "+1 214 555 0142"),
    # complete address only on the customer object (invoice.customer_address is all-null)
    ("fjord", "Fjordline Logistics A/S", "regnskab@fjordline.example",
     _addr("Havnegade 7", "Odense C", "5000", "DK"), "+45 66 12 34 56"),
    # incomplete addresses
    ("nopostal", "Bergmann Elektro GmbH", "info@bergmann-elektro.example",
     _addr("Hauptstraße 3", "Leipzig", None, "DE"), None),
    ("nocity", "Oakridge Supplies Ltd", "ledger@oakridge.example",
     _addr("4 Mill Lane", "", "OX1 1AA", "GB"), None),
    ("noaddr", "Peter Novak", "peter.novak@mail.example", None, None),
]

_LIVE_CUSTOMERS: list[tuple[str, str, str, dict | None, str | None]] = [
    ("live_hansen", "Hansen & Søn ApS", "bogholderi@hansen-soen.example",
     _addr("Strandvejen 100", "Hellerup", "2900", "DK"), "+45 39 40 41 42"),
    ("live_baker", "Baker Street Analytics Ltd", "finance@bakerst-analytics.example",
     _addr("221B Baker Street", "London", "NW1 6XE", "GB"), None),
    ("live_lone", "Lone Star Fabrication Inc.", "ap@lonestarfab.example",
     _addr("1200 Main Street", "Houston", "77002", "US", "TX"), "+1 713 555 0100"),
]

# (kind, customer key, currency, amount_due, amount_paid, created days before anchor, status,
#  collection_method, due days after created, invoice address mode)
# address mode: "copy" = customer's address frozen on invoice, "null" = all-null address object.
_TEST_INVOICES: list[tuple[str, str, str, int, int, int, str, str, int, str]] = [
    # 12 open, unpaid, complete address, created in the last 60 days, due date in the past
    ("open", "mueller", "eur", 184050, 0, 17, "open", "send_invoice", 14, "copy"),
    ("open", "nordlys", "eur", 62500, 0, 21, "open", "send_invoice", 14, "copy"),
    ("open", "acme", "usd", 1250000, 0, 24, "open", "send_invoice", 14, "copy"),
    ("open", "janedoe", "usd", 48999, 0, 28, "open", "send_invoice", 14, "copy"),
    ("open", "thames", "gbp", 320000, 0, 31, "open", "send_invoice", 14, "copy"),
    ("open", "dupont", "eur", 9870, 0, 35, "open", "send_invoice", 30, "copy"),
    ("open", "tanaka", "jpy", 150000, 0, 38, "open", "send_invoice", 30, "copy"),
    ("open", "alsalam", "kwd", 1250750, 0, 42, "open", "send_invoice", 30, "copy"),
    ("open", "jensen", "eur", 34900, 0, 45, "open", "send_invoice", 14, "copy"),
    ("open", "martin", "eur", 120000, 0, 49, "open", "send_invoice", 30, "copy"),
    ("open", "weber", "eur", 75000, 0, 53, "open", "send_invoice", 30, "copy"),
    ("open", "pacific", "usd", 560000, 0, 58, "open", "send_invoice", 30, "copy"),
    # open; address only on the customer object
    ("open_address_on_customer", "fjord", "eur", 215000, 0, 26, "open", "send_invoice", 14, "null"),
    # 2 open, partially paid
    ("open_partial", "acme", "usd", 800000, 300000, 33, "open", "send_invoice", 14, "copy"),
    ("open_partial", "mueller", "eur", 240000, 40000, 47, "open", "send_invoice", 14, "copy"),
    # 3 paid, 2 void, 2 draft, 1 uncollectible
    ("paid", "nordlys", "eur", 45000, 45000, 12, "paid", "charge_automatically", 0, "copy"),
    ("paid", "pacific", "usd", 99000, 99000, 40, "paid", "charge_automatically", 0, "copy"),
    ("paid", "thames", "gbp", 150000, 150000, 55, "paid", "send_invoice", 14, "copy"),
    ("void", "dupont", "eur", 22000, 0, 19, "void", "send_invoice", 14, "copy"),
    ("void", "janedoe", "usd", 15000, 0, 44, "void", "send_invoice", 14, "copy"),
    ("draft", "weber", "eur", 58000, 0, 2, "draft", "send_invoice", 30, "copy"),
    ("draft", "acme", "usd", 300000, 0, 5, "draft", "charge_automatically", 0, "copy"),
    ("uncollectible", "jensen", "eur", 87500, 0, 50, "uncollectible", "send_invoice", 14, "copy"),
    # 3 open whose customer address is incomplete
    ("open_incomplete_address", "nopostal", "eur", 43000, 0, 23, "open", "send_invoice", 14, "copy"),
    ("open_incomplete_address", "nocity", "gbp", 27500, 0, 30, "open", "send_invoice", 14, "copy"),
    ("open_incomplete_address", "noaddr", "eur", 19900, 0, 36, "open", "send_invoice", 14, "copy"),
    # 3 open, complete, but old (200-400 days before the anchor)
    ("open_old", "thames", "gbp", 410000, 0, 210, "open", "send_invoice", 30, "copy"),
    ("open_old", "acme", "usd", 275000, 0, 305, "open", "send_invoice", 30, "copy"),
    ("open_old", "nordlys", "eur", 96000, 0, 390, "open", "send_invoice", 30, "copy"),
]

_LIVE_INVOICES = [
    ("open", "live_hansen", "dkk", 1875000, 0, 20, "open", "send_invoice", 14, "copy"),
    ("open", "live_baker", "gbp", 640000, 0, 34, "open", "send_invoice", 14, "copy"),
    ("open", "live_lone", "usd", 1299900, 0, 48, "open", "send_invoice", 30, "copy"),
]

_DESCRIPTIONS = ["Consulting services", "Hardware delivery", "Annual software licence", "Maintenance contract",
                 "Implementation project", "Support retainer"]


_INDIVIDUALS = {"janedoe", "jensen", "martin", "weber", "noaddr"}  # private persons, not companies
_CONTACTS = {"mueller": "Klaus Müller", "live_hansen": "Mette Hansen"}  # a company's contact person


def _customer_obj(key: str, name: str, email: str, address: dict | None, phone: str | None,
                  created: int, currency: str, livemode: bool, mode_tag: str) -> dict[str, Any]:
    cid = _stable_id("cus_", f"{mode_tag}:customer:{key}")
    return {
        "id": cid,
        "object": "customer",
        "address": dict(address) if address is not None else None,
        "balance": 0,
        "created": created,
        "currency": currency,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "discount": None,
        "email": email,
        "invoice_prefix": hashlib.sha1(cid.encode()).hexdigest()[:7].upper(),
        "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                             "rendering_options": None},
        "livemode": livemode,
        "metadata": {},
        "name": name,
        # Since API version 2025-09-30.clover: a private person's name is an individual_name; a company may
        # name the person to contact beside its business_name.
        "business_name": name if key in _CONTACTS else None,
        "individual_name": _CONTACTS.get(key, name if key in _INDIVIDUALS else None),
        "next_invoice_sequence": 1,
        "phone": phone,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }


def _build(anchor_ts: int, customers_spec, invoices_spec, livemode: bool, number_prefix: str):
    mode_tag = "live" if livemode else "test"
    customers: dict[str, dict[str, Any]] = {}
    by_key: dict[str, dict[str, Any]] = {}
    for i, (key, name, email, address, phone) in enumerate(customers_spec):
        cur = "eur"
        c = _customer_obj(key, name, email, address, phone, anchor_ts - (500 + i) * DAY, cur, livemode, mode_tag)
        customers[c["id"]] = c
        by_key[key] = c
    invoices: list[dict[str, Any]] = []
    seq = 0
    # number invoices in creation order (oldest first), like a real account
    order = sorted(range(len(invoices_spec)), key=lambda i: -invoices_spec[i][5])
    for idx in order:
        kind, ckey, currency, due, paid, days_ago, status, method, due_days, addr_mode = invoices_spec[idx]
        cust = by_key[ckey]
        cust["currency"] = currency
        # spread creation times over the day so they are unique and deterministic
        created = anchor_ts - days_ago * DAY + 9 * 3600 + (idx * 937) % 28800
        inv_id = _stable_id("in_", f"{mode_tag}:invoice:{idx}", 16)
        number = None
        if status != "draft":
            seq += 1
            number = f"{number_prefix}-{seq:04d}"
        remaining = due - paid if status == "open" else 0
        if status == "paid":
            paid = due
        if status in ("void", "uncollectible", "draft"):
            remaining = due if status in ("uncollectible", "draft") else 0
        if addr_mode == "null":
            inv_addr: dict | None = dict(NULL_ADDRESS)
        else:
            inv_addr = dict(cust["address"]) if cust["address"] is not None else None
        finalized = None if status == "draft" else created + 60
        due_date = created + due_days * DAY if method == "send_invoice" else None
        line_id = _stable_id("il_", f"{mode_tag}:line:{idx}", 16)
        invoice = {
            "id": inv_id,
            "object": "invoice",
            "account_country": "DK",
            "account_name": "Sandbox Creditor ApS",
            "account_tax_ids": None,
            "amount_due": due,
            "amount_overpaid": 0,
            "amount_paid": paid,
            "amount_remaining": remaining,
            "amount_shipping": 0,
            "application": None,
            "attempt_count": 1 if method == "charge_automatically" and status != "draft" else 0,
            "attempted": method == "charge_automatically" and status != "draft",
            "auto_advance": status in ("draft", "open"),
            "automatic_tax": {"enabled": False, "liability": None, "status": None, "disabled_reason": None,
                              "provider": None},
            "automatically_finalizes_at": created + 3600 if status == "draft" else None,
            "billing_reason": "manual",
            "collection_method": method,
            "created": created,
            "currency": currency,
            "custom_fields": None,
            "customer": cust["id"],
            "customer_account": None,
            "customer_address": inv_addr,
            "customer_email": cust["email"],
            "customer_name": cust["name"],
            "customer_phone": cust["phone"],
            "customer_shipping": None,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "due_date": due_date,
            "effective_at": finalized,
            "ending_balance": None if status == "draft" else 0,
            "footer": None,
            "from_invoice": None,
            "hosted_invoice_url": None if status == "draft" else f"https://invoice.stripe.com/i/{ACCOUNT_ID}/{inv_id}",
            "invoice_pdf": None if status == "draft" else f"https://pay.stripe.com/invoice/{ACCOUNT_ID}/{inv_id}/pdf",
            "issuer": {"type": "self"},
            "last_finalization_error": None,
            "latest_revision": None,
            "lines": {
                "object": "list",
                "data": [{
                    "id": line_id,
                    "object": "line_item",
                    "amount": due,
                    "currency": currency,
                    "description": _DESCRIPTIONS[idx % len(_DESCRIPTIONS)],
                    "discount_amounts": [],
                    "discountable": True,
                    "discounts": [],
                    "invoice": inv_id,
                    "livemode": livemode,
                    "metadata": {},
                    "period": {"end": created, "start": created},
                    "quantity": 1,
                    "subscription": None,
                    "taxes": [],
                }],
                "has_more": False,
                "url": f"/v1/invoices/{inv_id}/lines",
            },
            "livemode": livemode,
            "metadata": {},
            "next_payment_attempt": None,
            "number": number,
            "on_behalf_of": None,
            "parent": None,
            "payment_settings": {"default_mandate": None, "payment_method_options": None,
                                 "payment_method_types": None},
            "period_end": created,
            "period_start": created,
            "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0,
            "receipt_number": None,
            "rendering": None,
            "shipping_cost": None,
            "shipping_details": None,
            "starting_balance": 0,
            "statement_descriptor": None,
            "status": status,
            "status_transitions": {
                "finalized_at": finalized,
                "marked_uncollectible_at": created + 40 * DAY if status == "uncollectible" else None,
                "paid_at": created + 5 * DAY if status == "paid" else None,
                "voided_at": created + 2 * DAY if status == "void" else None,
            },
            "subtotal": due,
            "subtotal_excluding_tax": due,
            "test_clock": None,
            "total": due,
            "total_discount_amounts": [],
            "total_excluding_tax": due,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": created + 10,
            # not part of the API response; stripped before serialisation
            "_sandbox_kind": kind,
        }
        invoices.append(invoice)
    invoices.sort(key=lambda inv: (inv["created"], inv["id"]), reverse=True)
    return invoices, customers


def build_dataset(anchor: datetime) -> dict[str, Any]:
    """Deterministic data set relative to ``anchor`` (normally today's UTC midnight).

    Returns ``{"test": {"invoices": [...], "customers": {id: customer}}, "live": {...}}``; invoices are
    sorted newest first. Each invoice carries a private ``_sandbox_kind`` marker (open, open_partial,
    open_address_on_customer, open_incomplete_address, open_old, paid, void, draft, uncollectible)
    which is never sent over the API.
    """
    if anchor.tzinfo is None:
        anchor = anchor.replace(tzinfo=timezone.utc)
    anchor_ts = int(anchor.timestamp())
    t_inv, t_cus = _build(anchor_ts, _TEST_CUSTOMERS, _TEST_INVOICES, False, "SBX")
    l_inv, l_cus = _build(anchor_ts, _LIVE_CUSTOMERS, _LIVE_INVOICES, True, "SBXL")
    return {"anchor": anchor_ts, "test": {"invoices": t_inv, "customers": t_cus},
            "live": {"invoices": l_inv, "customers": l_cus}}


def synthetic_invoices(anchor_ts: int, n: int) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """``n`` extra open, unpaid, eligible test-mode invoices (numbers ``SYN-00001``...), for load and crash tests.

    Spread over the 12 customers with complete addresses, created 15-74 days before the anchor and due 14 days
    after creation (so always overdue); ids are distinct from the base data set's.
    """
    complete = [c for c in _TEST_CUSTOMERS[:12]]
    currencies = {"mueller": "eur", "nordlys": "dkk", "acme": "usd", "janedoe": "usd", "thames": "gbp",
                  "dupont": "eur", "tanaka": "jpy", "alsalam": "kwd", "jensen": "dkk", "martin": "eur",
                  "weber": "eur", "pacific": "usd"}
    spec = [("open", complete[i % 12][0], currencies[complete[i % 12][0]], 1000 + (i * 7919) % 900000, 0,
             15 + (i * 13) % 60, "open", "send_invoice", 14, "copy") for i in range(n)]
    invoices, customers = _build(anchor_ts, complete, spec, False, "SYN")
    for inv in invoices:
        inv["id"] = _stable_id("in_", f"test:synthetic:{inv['number']}", 16)
        inv["lines"]["url"] = f"/v1/invoices/{inv['id']}/lines"
        inv["hosted_invoice_url"] = f"https://invoice.stripe.com/i/{ACCOUNT_ID}/{inv['id']}"
        inv["invoice_pdf"] = f"https://pay.stripe.com/invoice/{ACCOUNT_ID}/{inv['id']}/pdf"
        for line in inv["lines"]["data"]:
            line["invoice"] = inv["id"]
        inv["_sandbox_kind"] = "open"
    return invoices, customers


def today_anchor() -> datetime:
    now = datetime.now(timezone.utc)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_sandbox")}


# ----------------------------------------------------------------------------------------------
# Simulator


class StripeError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, doc_url: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.doc_url = doc_url or (f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}" if code else None)

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {}
        if self.code:
            err["code"] = self.code
        if self.doc_url:
            err["doc_url"] = self.doc_url
        err["message"] = self.message
        if self.param:
            err["param"] = self.param
        err["type"] = self.type
        return {"error": err}


_LIST_PARAMS = {"status", "customer", "collection_method", "created", "due_date", "limit", "starting_after",
                "ending_before", "subscription", "expand"}
_STATUSES = ("draft", "open", "paid", "uncollectible", "void")
_RANGE_OPS = ("gt", "gte", "lt", "lte")


def _int_param(value: str, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StripeError(400, f"Invalid integer: {value}", param=name) from None


def _base_name(key: str) -> str:
    return key.split("[", 1)[0]


class StripeSimulator(Simulator):
    name = "stripe"

    def __init__(self, anchor: datetime | None = None, data_dir: Any = None, synthetic: int = 0):
        super().__init__()
        self.anchor = anchor or today_anchor()
        self.data = build_dataset(self.anchor)
        self.synthetic = 0
        if synthetic:
            self.set_synthetic(synthetic)
        self.keys: dict[str, StripeKey] = default_keys()
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.api_versions: list[str | None] = []  # the Stripe-Version header of each request (None: not sent)
        self._version = ACCOUNT_API_VERSION
        self.wall = time.time  # the clock events are stamped with (tests move it)
        self.events: dict[str, list[dict[str, Any]]] = {"test": [], "live": []}
        from .lifecycle import Changes

        self.changes = Changes(data_dir, "stripe")

    # -- after import: pay, void or credit an invoice at the source (runner sandbox pay|void|credit)
    def _apply_changes(self) -> None:
        for c in self.changes.pending():
            try:
                self.act(c["action"], c["invoice"], c.get("amount"), at=c.get("at"))
            except KeyError:
                pass  # an invoice this data set does not have (another mode or a reset)

    def act(self, action: str, invoice: str, amount: str | None = None, at: int | None = None) -> dict[str, Any]:
        """pay (in full, or `amount` in major units), void, or credit (a credit note for `amount`, default what
        is left) one invoice, by id or number, as Stripe would show it afterwards."""
        from .lifecycle import minor

        inv = next((i for m in ("test", "live") for i in self.data[m]["invoices"]
                    if invoice in (i["id"], i["number"])), None)
        if inv is None:
            raise KeyError(invoice)
        import time

        at = int(at or time.time())
        left = inv["amount_remaining"]
        amt = min(left, minor(amount, inv["currency"])) if amount is not None else left
        st = inv["status_transitions"]
        if action == "pay":
            inv["amount_paid"] += amt
            inv["amount_remaining"] = left - amt
            if inv["amount_remaining"] == 0:
                inv["status"], st["paid_at"] = "paid", at
        elif action == "void":
            inv["status"], st["voided_at"], inv["amount_remaining"] = "void", at, 0
        elif action == "credit":
            # A credit note on an unpaid invoice is a pre-payment one; credited in full, the invoice is paid.
            inv["pre_payment_credit_notes_amount"] += amt
            inv["amount_due"] -= amt
            inv["amount_remaining"] = left - amt
            if inv["amount_remaining"] == 0:
                inv["status"], st["paid_at"] = "paid", at
        else:
            raise ValueError(action)
        mode = next(m for m in ("test", "live") if inv in self.data[m]["invoices"])
        # What Stripe's events API reports for it (a credit note updates the invoice; in full, it is paid).
        self.record_event("invoice.paid" if inv["status"] == "paid" else
                          "invoice.voided" if action == "void" else "invoice.updated", inv, mode)
        return public(inv)

    def invoice_pdf(self, inv_id: str) -> bytes:
        from .lifecycle import pdf

        inv = next((i for m in ("test", "live") for i in self.data[m]["invoices"] if i["id"] == inv_id), None)
        if inv is None or inv["status"] == "draft":
            raise KeyError(inv_id)
        return pdf(f"Invoice {inv['number']}", [f"Billed to: {inv['customer_name']}",
                                                f"Amount due: {inv['amount_due']} ({inv['currency'].upper()}, minor units)",
                                                f"Stripe invoice {inv['id']}"])

    def _pdf_route(self, parts: list[str]) -> httpx.Response | None:
        """pay.stripe.com/invoice/{acct}/{id}/pdf (no API key: the link is the secret) redirects to the file
        on files.stripe.com, as Stripe's links do; both hosts map to this simulator."""
        if len(parts) == 4 and parts[0] == "invoice" and parts[3] == "pdf":
            return httpx.Response(302, headers={"Location": f"https://files.stripe.com/links/{parts[2]}/pdf"})
        if len(parts) == 3 and parts[0] == "links" and parts[2] == "pdf":
            try:
                body = self.invoice_pdf(parts[1])
            except KeyError:
                return httpx.Response(404, text="Not Found")
            return httpx.Response(200, content=body, headers={"Content-Type": "application/pdf"})
        return None

    # -- test helpers
    def add_key(self, key: str, mode: str = "test", permissions: set[str] | frozenset[str] | None = None) -> None:
        self.keys[key] = StripeKey(mode, frozenset(permissions) if permissions is not None else None)

    def revoke(self, key: str) -> None:
        if key in self.keys:
            self.keys[key].active = False
        else:
            self.keys[key] = StripeKey("test", active=False)

    def pay(self, inv_id: str, mode: str = "test") -> dict[str, Any]:
        """Pay an open invoice in full, as ``POST /v1/invoices/{id}/pay`` does (paid out of band)."""
        inv = self._find_invoice(mode, inv_id)
        if inv is None:
            raise self._missing("invoice", inv_id, mode)
        if inv["status"] != "open":
            raise StripeError(400, f"Invoice {inv_id} is already {inv['status']}; only open invoices can be paid.",
                              code="invoice_not_open")
        inv.update(status="paid", amount_paid=inv["amount_due"], amount_remaining=0, auto_advance=False)
        inv["status_transitions"]["paid_at"] = int(datetime.now().timestamp())
        return public(inv)

    def invoices(self, mode: str = "test") -> list[dict[str, Any]]:
        return [public(i) for i in self.data[mode]["invoices"]]

    def state(self) -> dict[str, Any]:
        st = super().state()
        st["invoices"] = {m: len(self.data[m]["invoices"]) for m in ("test", "live")}
        st["synthetic_invoices"] = self.synthetic
        return st

    def set_synthetic(self, n: int) -> None:
        """Serve ``n`` extra eligible test-mode invoices (see :func:`synthetic_invoices`) besides the base set."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 100_000:
            raise ValueError("synthetic_invoices must be an integer from 0 to 100000")
        self.data = build_dataset(self.anchor)
        self.synthetic = n
        if n:
            invs, custs = synthetic_invoices(self.data["anchor"], n)
            test = self.data["test"]
            for cid, c in custs.items():
                test["customers"].setdefault(cid, c)
            test["invoices"] = sorted(test["invoices"] + invs, key=lambda inv: (inv["created"], inv["id"]),
                                      reverse=True)

    def set_faults(self, values) -> None:
        """Besides the common knobs, ``synthetic_invoices: N`` (over ``POST /_sandbox/faults/stripe`` too)."""
        values = dict(values)
        if "synthetic_invoices" in values:
            self.set_synthetic(values.pop("synthetic_invoices"))
        super().set_faults(values)

    def reset(self) -> None:
        super().reset()
        self.keys = default_keys()
        self.data = build_dataset(self.anchor)
        self.synthetic = 0
        self.api_versions.clear()
        self.events = {"test": [], "live": []}
        self.changes.reset()

    def on_faults_changed(self) -> None:
        self._buckets.clear()

    # -- responses
    def _headers(self) -> dict[str, str]:
        return {"Request-Id": "req_" + secrets.token_urlsafe(10).replace("-", "x").replace("_", "y")[:14],
                "Stripe-Version": self._version, "Cache-Control": "no-cache, no-store"}

    def _ok(self, body: Any) -> httpx.Response:
        return json_response(200, body, self._headers())

    def _err(self, e: StripeError) -> httpx.Response:
        return json_response(e.status, e.body(), self._headers())

    def fault_response(self, status: int) -> httpx.Response:
        if status == 429:
            e = StripeError(429, RATE_LIMIT_MESSAGE, code="rate_limit", doc_url=DOC_RATE_LIMIT)
        elif status == 401:
            e = StripeError(401, NO_KEY_MESSAGE)
        elif status == 403:
            e = StripeError(403, "The provided key does not have the required permissions for this endpoint.")
        elif status == 404:
            e = StripeError(404, "Unrecognized request URL. Please see https://stripe.com/docs or we can help at "
                                 "https://support.stripe.com/.")
        elif status == 409:
            e = StripeError(409, "Keys for idempotent requests can only be used with the same parameters they "
                                 "were first used with.", type_="idempotency_error")
        elif 400 <= status < 500:
            e = StripeError(status, "Invalid request (injected fault).")
        else:
            e = StripeError(status, "An unknown error occurred", type_="api_error")
        return self._err(e)

    # -- request pipeline
    def _key_from(self, request: httpx.Request) -> str | None:
        auth = request.headers.get("authorization")
        if not auth:
            return None
        scheme, _, value = auth.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            return value or None
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value).decode("utf-8")
            except Exception:
                return ""
            return decoded.split(":", 1)[0]
        return ""

    def _rate_limit(self, mode: str, search: bool) -> None:
        override = self.faults.rate_limit_per_s
        buckets = [("all", override if override is not None else DEFAULT_RATE[mode])]
        if search and override is None:
            buckets.append(("search", SEARCH_RATE))
        for scope, rate in buckets:
            b = self._buckets.get((mode, scope))
            if b is None or b.rate != rate:
                b = self._buckets[(mode, scope)] = TokenBucket(rate, clock=self.clock)
            allowed, _ = b.try_take()
            if not allowed:
                raise StripeError(429, RATE_LIMIT_MESSAGE, code="rate_limit", doc_url=DOC_RATE_LIMIT)

    async def dispatch(self, request: httpx.Request) -> httpx.Response:
        self._apply_changes()
        if request.method.upper() == "GET":
            doc = self._pdf_route(request.url.path.strip("/").split("/"))
            if doc is not None:
                return doc
        try:
            return self._route(request)
        except StripeError as e:
            return self._err(e)

    def _route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.rstrip("/") or "/"
        method = request.method.upper()
        # Stripe answers in the version the request names (echoed in the response's Stripe-Version), else in
        # the account's default; a malformed version is refused. The data set is the same in every version.
        version = request.headers.get("stripe-version")
        self.api_versions.append(version)
        if len(self.api_versions) > 1000:
            del self.api_versions[:-1000]
        self._version = version or ACCOUNT_API_VERSION
        if version is not None and not API_VERSION.fullmatch(version.strip()):
            self._version = ACCOUNT_API_VERSION
            raise StripeError(400, f"Invalid Stripe API version: {version}")
        key = self._key_from(request)
        if key is None:
            raise StripeError(401, NO_KEY_MESSAGE)
        info = self.keys.get(key)
        if info is None or not info.active:
            raise StripeError(401, f"Invalid API Key provided: {mask_key(key)}")
        mode = info.mode

        parts = path.strip("/").split("/")
        route = None
        if method == "GET" and parts[:2] == ["v1", "invoices"]:
            if len(parts) == 2:
                route, perm = ("list", PERM_INVOICE_READ)
            elif len(parts) == 3 and parts[2] == "search":
                route, perm = ("search", PERM_INVOICE_READ)
            elif len(parts) == 3:
                route, perm = ("invoice", PERM_INVOICE_READ)
        elif method == "POST" and parts[:2] == ["v1", "invoices"] and len(parts) == 4 and parts[3] == "pay":
            route, perm = ("pay", PERM_INVOICE_WRITE)
        elif method == "GET" and parts[:2] == ["v1", "customers"] and len(parts) == 3:
            route, perm = ("customer", PERM_CUSTOMER_READ)
        elif method == "GET" and parts == ["v1", "account"]:
            route, perm = ("account", PERM_ACCOUNT_READ)
        elif method == "GET" and parts == ["v1", "events"]:
            route, perm = ("events", PERM_EVENT_READ)
        if route is None:
            raise StripeError(404, f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs "
                                   "or we can help at https://support.stripe.com/.")
        if info.permissions is not None and perm not in info.permissions:
            raise StripeError(
                403,
                f"The provided key '{mask_key(key)}' does not have the required permissions for this endpoint on "
                f"account '{ACCOUNT_ID}'. Having the '{perm}' permission would allow this request to continue.")
        self._rate_limit(mode, route == "search")
        params = request.url.params
        if route == "list":
            return self._ok(self._list(mode, params))
        if route == "search":
            return self._ok(self._search(mode, params))
        if route == "invoice":
            return self._ok(self._retrieve_invoice(mode, parts[2], params))
        if route == "account":
            return self._ok(account_obj())
        if route == "pay":
            return self._ok(self.pay(parts[2], mode))
        if route == "events":
            return self._ok(self._list_events(mode, params))
        return self._ok(self._retrieve_customer(mode, parts[2], params))

    # -- helpers
    def _expand(self, params: httpx.QueryParams, allowed: set[str]) -> set[str]:
        out = set()
        for k, v in params.multi_items():
            if k == "expand" or k.startswith("expand["):
                if v not in allowed:
                    raise StripeError(400, f"This property cannot be expanded ({v}).", param="expand")
                out.add(v)
        return out

    def _render(self, mode: str, inv: dict[str, Any], expand_customer: bool) -> dict[str, Any]:
        out = public(inv)
        if expand_customer:
            out["customer"] = dict(self.data[mode]["customers"][inv["customer"]])
        return out

    def _find_invoice(self, mode: str, inv_id: str) -> dict[str, Any] | None:
        for inv in self.data[mode]["invoices"]:
            if inv["id"] == inv_id:
                return inv
        return None

    def _missing(self, kind: str, obj_id: str, mode: str, param: str | None = None) -> StripeError:
        other = "live" if mode == "test" else "test"
        exists_other = (self._find_invoice(other, obj_id) is not None if kind == "invoice"
                        else obj_id in self.data[other]["customers"])
        msg = f"No such {kind}: '{obj_id}'"
        if exists_other:
            msg += (f"; a similar object exists in {other} mode, but a {mode} mode key was used to make this "
                    "request.")
        return StripeError(404, msg, code="resource_missing", param=param or "id", doc_url=DOC_RESOURCE_MISSING)

    def _limit(self, params: httpx.QueryParams) -> int:
        if "limit" not in params:
            return 10
        limit = _int_param(params["limit"], "limit")
        if limit < 1:
            raise StripeError(400, "This value must be greater than or equal to 1.", param="limit")
        if limit > 100:
            raise StripeError(400, "This value must be less than or equal to 100.", param="limit")
        return limit

    def _range_filter(self, params: httpx.QueryParams, name: str):
        conds: list[tuple[str, int]] = []
        for k, v in params.multi_items():
            if k == name:
                conds.append(("eq", _int_param(v, name)))
            elif k.startswith(name + "["):
                op = k[len(name) + 1:-1] if k.endswith("]") else ""
                if op not in _RANGE_OPS:
                    raise StripeError(400, f"Received unknown parameter: {k}", param=k)
                conds.append((op, _int_param(v, k)))

        def ok(value: int | None) -> bool:
            if not conds:
                return True
            if value is None:
                return False
            for op, t in conds:
                if (op == "eq" and value != t) or (op == "gt" and not value > t) or (op == "gte" and not value >= t) \
                        or (op == "lt" and not value < t) or (op == "lte" and not value <= t):
                    return False
            return True

        return ok

    # -- endpoints
    def _list(self, mode: str, params: httpx.QueryParams) -> dict[str, Any]:
        for k in params.keys():
            if _base_name(k) not in _LIST_PARAMS:
                raise StripeError(400, f"Received unknown parameter: {k}", param=k)
        limit = self._limit(params)
        status = params.get("status")
        if status is not None and status not in _STATUSES:
            raise StripeError(400, "Invalid status: must be one of draft, open, paid, uncollectible, or void",
                              param="status")
        method = params.get("collection_method")
        if method is not None and method not in ("charge_automatically", "send_invoice"):
            raise StripeError(400, "Invalid collection_method: must be one of charge_automatically or send_invoice",
                              param="collection_method")
        customer = params.get("customer")
        created_ok = self._range_filter(params, "created")
        due_ok = self._range_filter(params, "due_date")
        expand = self._expand(params, {"data.customer"})
        after, before = params.get("starting_after"), params.get("ending_before")
        if after and before:
            raise StripeError(400, "You may only specify one of these parameters: ending_before, starting_after.",
                              param="ending_before")
        everything = self.data[mode]["invoices"]
        matches = [inv for inv in everything
                   if (status is None or inv["status"] == status)
                   and (method is None or inv["collection_method"] == method)
                   and (customer is None or inv["customer"] == customer)
                   and created_ok(inv["created"]) and due_ok(inv["due_date"])]

        def sort_key(inv):
            return (inv["created"], inv["id"])

        if after or before:
            cursor = self._find_invoice(mode, after or before)
            if cursor is None:
                raise self._missing("invoice", after or before, mode,
                                    param="starting_after" if after else "ending_before")
            ck = sort_key(cursor)
            if after:
                older = [inv for inv in matches if sort_key(inv) < ck]
                page, has_more = older[:limit], len(older) > limit
            else:
                newer = [inv for inv in matches if sort_key(inv) > ck]
                page, has_more = newer[-limit:], len(newer) > limit
        else:
            page, has_more = matches[:limit], len(matches) > limit
        return {"object": "list",
                "data": [self._render(mode, inv, "data.customer" in expand) for inv in page],
                "has_more": has_more, "url": "/v1/invoices"}

    def _retrieve_invoice(self, mode: str, inv_id: str, params: httpx.QueryParams) -> dict[str, Any]:
        expand = self._expand(params, {"customer"})
        inv = self._find_invoice(mode, inv_id)
        if inv is None:
            raise self._missing("invoice", inv_id, mode)
        return self._render(mode, inv, "customer" in expand)

    def _retrieve_customer(self, mode: str, cus_id: str, params: httpx.QueryParams) -> dict[str, Any]:
        self._expand(params, set())
        cust = self._data_customer(mode, cus_id)
        return dict(cust)

    def _data_customer(self, mode: str, cus_id: str) -> dict[str, Any]:
        cust = self.data[mode]["customers"].get(cus_id)
        if cust is None:
            raise self._missing("customer", cus_id, mode)
        return cust

    _CLAUSE = re.compile(r"""\s*(-?)([a-z_]+)\s*(:|>=|<=|>|<)\s*('([^']*)'|"([^"]*)"|([^\s'"]+))\s*""")
    _SEARCH_FIELDS = {"number", "customer", "status", "currency", "created", "total", "amount_due",
                      "subscription"}

    def _parse_query(self, query: str) -> tuple[list[tuple[bool, str, str, str]], str]:
        parse_err = StripeError(
            400, "We were unable to parse your search query. Try using the format `metadata[\"key\"]:\"value\"` "
                 "to query for metadata or key:\"value\" to query for other fields.", param="query")
        clauses = []
        pos = 0
        joiner = None
        while True:
            m = self._CLAUSE.match(query, pos)
            if not m:
                raise parse_err
            neg, fld, op, _, sq, dq, bare = m.groups()
            value = sq if sq is not None else dq if dq is not None else bare
            if fld not in self._SEARCH_FIELDS:
                raise StripeError(400, f"Field `{fld}` is an unsupported search field for resource `invoices`. "
                                       "See http://stripe.com/docs/search#query-fields-for-invoices for a list of "
                                       "supported fields.", param="query")
            clauses.append((bool(neg), fld, op, value))
            pos = m.end()
            if pos >= len(query):
                break
            j = re.match(r"(AND|OR)\s+", query[pos:])
            if not j:
                raise parse_err
            if joiner and joiner != j.group(1):
                raise StripeError(400, "Search queries cannot mix AND and OR.", param="query")
            joiner = j.group(1)
            pos += j.end()
        return clauses, joiner or "AND"

    def _search(self, mode: str, params: httpx.QueryParams) -> dict[str, Any]:
        for k in params.keys():
            if _base_name(k) not in {"query", "limit", "page", "expand"}:
                raise StripeError(400, f"Received unknown parameter: {k}", param=k)
        query = params.get("query")
        if not query:
            raise StripeError(400, "Missing required param: query.", code="parameter_missing", param="query")
        limit = self._limit(params)
        expand = self._expand(params, {"data.customer", "total_count"})
        clauses, joiner = self._parse_query(query.strip())

        def clause_ok(inv, neg, fld, op, value) -> bool:
            actual = inv.get(fld)
            if op == ":":
                if fld in ("created", "total", "amount_due"):
                    try:
                        res = actual == int(value)
                    except ValueError:
                        res = False
                else:
                    res = actual is not None and str(actual).lower() == value.lower() if fld != "number" \
                        else actual == value
            else:
                try:
                    t = int(value)
                except ValueError:
                    raise StripeError(400, f"Invalid numeric value for `{fld}`: {value}", param="query") from None
                if not isinstance(actual, int):
                    res = False
                else:
                    res = {">": actual > t, ">=": actual >= t, "<": actual < t, "<=": actual <= t}[op]
            return not res if neg else res

        combine = all if joiner == "AND" else any
        matches = [inv for inv in self.data[mode]["invoices"]
                   if combine(clause_ok(inv, *c) for c in clauses)]
        offset = 0
        if params.get("page"):
            try:
                offset = int(base64.urlsafe_b64decode(params["page"].encode()).decode().split(":", 1)[1])
            except Exception:
                raise StripeError(400, "Invalid page: page cursor is malformed.", param="page") from None
        page = matches[offset:offset + limit]
        has_more = offset + limit < len(matches)
        next_page = base64.urlsafe_b64encode(f"sbx:{offset + limit}".encode()).decode() if has_more else None
        out = {"object": "search_result",
               "data": [self._render(mode, inv, "data.customer" in expand) for inv in page],
               "has_more": has_more, "next_page": next_page, "url": "/v1/invoices/search"}
        if "total_count" in expand:
            out["total_count"] = len(matches)
        return out

    # -- events (GET /v1/events) ----------------------------------------------------------------------
    # Stripe keeps events 30 days and lists them newest first; each embeds the object as it was when the
    # event happened (data.object), rendered in the event's API version, with data.previous_attributes on
    # *.updated events. The seeded data set has no events: they start with changes made in the simulator.

    def record_event(self, kind: str, invoice: dict[str, Any], mode: str = "test",
                     previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record that ``invoice`` changed (``invoice.paid``, ``invoice.voided``, ``invoice.updated``, ...):
        call it after changing the invoice in ``self.data``. Returns the event."""
        events = self.events[mode]
        n = len(events) + 1
        data: dict[str, Any] = {"object": copy.deepcopy(public(invoice))}
        if previous is not None:
            data["previous_attributes"] = previous
        event = {"id": _stable_id("evt_", f"{mode}:{n}:{kind}:{invoice['id']}", 24), "object": "event",
                 "api_version": self._version, "created": int(self.wall()), "data": data,
                 "livemode": mode == "live", "pending_webhooks": 0,
                 "request": {"id": None, "idempotency_key": None}, "type": kind, "_sandbox_seq": n}
        events.append(event)
        return event

    def update_invoice(self, invoice_id: str, kind: str = "invoice.updated", mode: str = "test",
                       **fields: Any) -> dict[str, Any]:
        """Change fields of an invoice and record the event (a test helper)."""
        inv = self._find_invoice(mode, invoice_id)
        if inv is None:
            raise KeyError(invoice_id)
        previous = {k: inv.get(k) for k in fields}
        inv.update(fields)
        return self.record_event(kind, inv, mode, previous if kind == "invoice.updated" else None)

    def _list_events(self, mode: str, params: httpx.QueryParams) -> dict[str, Any]:
        for k in params.keys():
            if _base_name(k) not in _EVENT_PARAMS:
                raise StripeError(400, f"Received unknown parameter: {k}", param=k)
        limit = self._limit(params)
        one = params.get("type")
        types = [v for k, v in params.multi_items() if _base_name(k) == "types"]
        if one is not None and types:
            raise StripeError(400, "You may only specify one of these parameters: type, types.", param="types")
        if len(types) > 20:
            raise StripeError(400, "You may pass at most 20 event types.", param="types")
        created_ok = self._range_filter(params, "created")
        # 30 days of events: older ones are gone.
        cutoff = int(self.wall()) - EVENT_RETENTION_S
        self.events[mode] = [e for e in self.events[mode] if e["created"] >= cutoff]

        def type_ok(t: str) -> bool:
            if one is not None:
                return t == one or (one.endswith("*") and t.startswith(one[:-1]))
            return not types or t in types

        matches = [e for e in reversed(self.events[mode]) if type_ok(e["type"]) and created_ok(e["created"])]
        after, before = params.get("starting_after"), params.get("ending_before")
        if after and before:
            raise StripeError(400, "You may only specify one of these parameters: ending_before, starting_after.",
                              param="ending_before")
        if after or before:
            pos = next((i for i, e in enumerate(matches) if e["id"] == (after or before)), None)
            if pos is None:
                raise StripeError(404, f"No such event: '{after or before}'", code="resource_missing",
                                  param="starting_after" if after else "ending_before", doc_url=DOC_RESOURCE_MISSING)
            if after:
                rest = matches[pos + 1:]
                page, has_more = rest[:limit], len(rest) > limit
            else:
                rest = matches[:pos]
                page, has_more = rest[-limit:], len(rest) > limit
        else:
            page, has_more = matches[:limit], len(matches) > limit
        return {"object": "list", "data": [public(e) for e in page], "has_more": has_more, "url": "/v1/events"}


EVENT_RETENTION_S = 30 * 86400
_EVENT_PARAMS = {"type", "types", "created", "limit", "starting_after", "ending_before", "delivery_success"}
