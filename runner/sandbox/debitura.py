"""Debitura Customer API simulator (cases).

Environments: ``production`` (registry name ``debitura``) and ``test`` (``debitura-test``).

API keys (header ``XApiKey``):

==================================  ===========  ==========================================
key                                 environment  behaviour
==================================  ===========  ==========================================
``dbt_sandbox_live_Hq7Xv2Lm9Pz4``   production   valid in production; 401 (says "production") in test
``dbt_sandbox_test_Kc3Nw8Rt5Yb1``   test         valid in test; 401 (says "test") in production
``dbt_sandbox_revoked_Aa0Bb1``      -            revoked -> 401
==================================  ===========  ==========================================

401 body: ``{"error": "unauthorized", "message": ...}`` (the real API documents no body).

Endpoints: ``GET /me``, ``POST /cases``, ``GET /cases``, ``GET /cases/{id}``,
``GET /cases/by-creditor-reference/{ref}``, ``DELETE /test/cases/{id}``, ``DELETE /test/cases?tag=``,
``GET /contracts/debt-collection/status`` (``CollectionContractStatusApiDTO``; signed unless a test sets
``contract``) and ``POST /cases/preview`` (``PreviewCaseResponseApiViewModel``: eligible unless the debtor's
country is in ``NO_PARTNER``; a success fee of ``BASE_FEE`` % plus an age surcharge past 12 and 24 months);
webhooks, payments and the test-case lifecycle in ``debitura_webhooks.py``.
``GET /users``, ``GET|POST /cases/{id}/chats``, ``GET|POST /cases/{id}/files`` (multipart, ≤ 25 MB, PDF, Excel,
CSV, text and image files); ``POST /test/cases/{id}/advance`` is in ``debitura_webhooks.py``, with the events
it sends.

``POST /cases`` validates like the real API (400 ASP.NET ProblemDetails with ``errors`` keyed by field path,
e.g. ``Debtor.City``), enforces a unique ``creditorReference`` per creditor (400 ``DuplicateReference``; test
cases (``isTest``) and production cases share one set of references: the docs scope the uniqueness to the
creditor only, and ``DELETE /test/cases/{id}`` is how a test case gives its reference back),
honours ``Idempotency-Key`` (replay of the stored terminal response; 422 ``IdempotencyConflict`` when the body
differs; 400s are not stored) and answers **200** with an ``InvoiceDto``.

Rate limit: 2,000 requests per minute per key (sliding window) -> 429
``{"error": "rate_limit_exceeded", "message": ..., "retryAfter": <seconds>}`` and no Retry-After header.
``faults.rate_limit_per_s`` replaces it with a token bucket of that rate.

Persistence: with ``data_dir``, cases and idempotency records live in ``data_dir/debitura-<env>.sqlite`` so
separate processes share them; without, an in-memory SQLite database.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote

import httpx

from .core import Simulator, SlidingWindow, TokenBucket, json_response

PRODUCTION_KEY = "dbt_sandbox_live_Hq7Xv2Lm9Pz4"
TEST_KEY = "dbt_sandbox_test_Kc3Nw8Rt5Yb1"
REVOKED_KEY = "dbt_sandbox_revoked_Aa0Bb1"

HOSTS = {"production": "https://customer-api.debitura.com", "test": "https://testcustomer-api.debitura.com"}
CREDITOR_ID = "3f1c2b7a-9d4e-4c8b-a1f0-5e6d7c8b9a01"
CREDITOR_PROFILE = {
    "id": CREDITOR_ID,
    "companyName": "Sandbox Creditor ApS",
    "companyRegistrationNumber": "DK12345678",
    "address": "Sandboxvej 1",
    "zipCode": "2100",
    "city": "København Ø",
    "state": None,
    "country": "Denmark",
    "officeEmail": "finance@sandbox-creditor.example",
    "officePhone": "+45 70 70 70 70",
    # not in CreditorMeApiDTO; kept for convenience
    "email": "finance@sandbox-creditor.example",
}

# Preview: jurisdictions without a collection partner, and the success fee (percent) with its age surcharges.
NO_PARTNER = {"AQ", "KP"}
BASE_FEE = 10.0
AGE_SURCHARGE = ((730, 10.0), (365, 5.0))  # days overdue, extra percent
SIGNED_CONTRACT = {"signed": True, "requiresResigning": False, "invalidationReason": "None",
                   "termsUrl": "https://app.debitura.com/contracts/sdca.pdf", "solutionUrl": None}

RATE_LIMIT = 2000
RATE_WINDOW_S = 60.0
VALIDATION_TYPE = "https://tools.ietf.org/html/rfc7231#section-6.5.1"
VALIDATION_TITLE = "One or more validation errors occurred."

CURRENCIES = set("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF
CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG
HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA
MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD
RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD
UYU UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL
""".split())

COUNTRIES = set("""
AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA
CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA
GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP
KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS
MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS
RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW
TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
""".split())

US_STATES = {
    "AL": "Alabama", "AK": "Alaska", "AZ": "Arizona", "AR": "Arkansas", "CA": "California", "CO": "Colorado",
    "CT": "Connecticut", "DE": "Delaware", "FL": "Florida", "GA": "Georgia", "HI": "Hawaii", "ID": "Idaho",
    "IL": "Illinois", "IN": "Indiana", "IA": "Iowa", "KS": "Kansas", "KY": "Kentucky", "LA": "Louisiana",
    "ME": "Maine", "MD": "Maryland", "MA": "Massachusetts", "MI": "Michigan", "MN": "Minnesota",
    "MS": "Mississippi", "MO": "Missouri", "MT": "Montana", "NE": "Nebraska", "NV": "Nevada",
    "NH": "New Hampshire", "NJ": "New Jersey", "NM": "New Mexico", "NY": "New York", "NC": "North Carolina",
    "ND": "North Dakota", "OH": "Ohio", "OK": "Oklahoma", "OR": "Oregon", "PA": "Pennsylvania",
    "RI": "Rhode Island", "SC": "South Carolina", "SD": "South Dakota", "TN": "Tennessee", "TX": "Texas",
    "UT": "Utah", "VT": "Vermont", "VA": "Virginia", "WA": "Washington", "WV": "West Virginia",
    "WI": "Wisconsin", "WY": "Wyoming", "DC": "District of Columbia", "PR": "Puerto Rico",
}
_STATE_NAMES = {v.lower(): k for k, v in US_STATES.items()}

_CASE_REF_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_datetime(value: Any) -> datetime | None:
    """Parse an ISO 8601 date or date-time the way System.Text.Json would accept it; naive -> UTC."""
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
            dt = datetime.fromisoformat(v)
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,7})?)?(Z|[+-]\d{2}:\d{2})?", v):
            m = re.match(r"(.*?\.)(\d+)(.*)$", v)
            if m and len(m.group(2)) > 6:  # .NET allows 7 fractional digits
                v = m.group(1) + m.group(2)[:6] + m.group(3)
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        else:
            return None
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt


def canonical_body_hash(raw: bytes) -> str:
    try:
        canon = json.dumps(json.loads(raw or b"null"), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canon = raw
    return hashlib.sha256(canon).hexdigest()


class _Store:
    """SQLite store for cases and idempotency records (shared across processes when file-backed)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path) if path else ":memory:", timeout=30, isolation_level=None,
                                    check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        if path is not None:
            self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS cases (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT UNIQUE NOT NULL,
                reference TEXT UNIQUE NOT NULL,
                creditor_reference TEXT,
                is_test INTEGER NOT NULL,
                tag TEXT,
                body TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS cases_cref ON cases(creditor_reference);
            CREATE TABLE IF NOT EXISTS deleted_test_cases (id TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS idempotency (
                api_key TEXT NOT NULL,
                idem_key TEXT NOT NULL,
                body_hash TEXT NOT NULL,
                status INTEGER NOT NULL,
                response TEXT NOT NULL,
                PRIMARY KEY (api_key, idem_key)
            );
        """)

    def close(self) -> None:
        self.conn.close()


# --- after the case exists: users, case chats, case files --------------------------------------------------
# Kept together: DebituraSimulator.dispatch hands these paths to `_case_life` first.

USERS = [
    {"id": "6d0e7c1a-2b3f-4a5e-9c8d-7f6e5d4c3b21", "name": "Sandbox Finance", "email": "finance@sandbox-creditor.example"},
    {"id": "9a8b7c6d-5e4f-4321-8abc-def012345678", "name": "Sandbox Operations", "email": "ops@sandbox-creditor.example"},
]
DOCUMENT_TYPES = ("OriginalInvoice", "DebtorDocuments", "CreditorDocuments", "PartnerDocuments", "DemandLetter",
                  "Miscellaneous")
FILE_EXTENSIONS = (".pdf", ".xls", ".xlsx", ".csv", ".txt", ".jpg", ".jpeg", ".png", ".gif")
MAX_FILE_BYTES = 25 * 1024 * 1024
CASE_LIFE_SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (seq INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (seq INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT NOT NULL, body TEXT NOT NULL,
                                  content BLOB NOT NULL);
"""


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, str | None, bytes]] | None:
    """name -> (file name, content type, bytes) of a multipart/form-data body; None if it is not one."""
    import email
    import email.policy

    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        return None
    msg = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw,
                                   policy=email.policy.HTTP)
    if not msg.is_multipart():
        return None
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            out[name] = (part.get_filename(), part.get_content_type() if part.get("content-type") else None,
                         part.get_payload(decode=True) or b"")
    return out


def _case_life(sim: "DebituraSimulator", method: str, lower: list[str], parts: list[str]):
    """The handler of a users/chats/files request, or None for other paths (an awaitable)."""
    if lower == ["users"] and method == "GET":
        return sim._users
    if len(lower) == 3 and lower[0] == "cases" and lower[2] in ("chats", "files") and method in ("GET", "POST"):
        return getattr(sim, f"_{method.lower()}_{lower[2]}")
    return None


class _CaseLife:
    """DebituraSimulator's endpoints for a case's life (see _case_life)."""

    def _life_tables(self) -> None:
        if not getattr(self.store, "_life", False):
            self.store.conn.executescript(CASE_LIFE_SCHEMA)
            self.store._life = True

    def chats(self, case_id: str) -> list[dict[str, Any]]:
        self._life_tables()
        return [json.loads(r["body"]) for r in self.store.conn.execute(
            "SELECT body FROM chats WHERE case_id = ? ORDER BY seq", (case_id.lower(),))]

    def files(self, case_id: str) -> list[dict[str, Any]]:
        self._life_tables()
        return [json.loads(r["body"]) for r in self.store.conn.execute(
            "SELECT body FROM files WHERE case_id = ? ORDER BY seq", (case_id.lower(),))]

    def file_content(self, file_id: str) -> bytes | None:
        self._life_tables()
        for r in self.store.conn.execute("SELECT body, content FROM files"):
            if json.loads(r["body"])["id"] == file_id:
                return bytes(r["content"])
        return None

    def _case_row(self, case_id: str):
        try:
            cid = str(uuid.UUID(case_id))
        except ValueError:
            return None, self._api_error(400, "Bad Request", f"'{case_id}' is not a valid case id.", "InvalidId")
        row = self.store.conn.execute("SELECT body, is_test FROM cases WHERE id = ?", (cid,)).fetchone()
        if row is None:
            return None, self._api_error(404, "Not Found", f"Case '{cid}' was not found.", "NotFound")
        return row, None

    async def _users(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        try:
            page = int((self._qp(request, "Page") or ["1"])[-1])
            size = int((self._qp(request, "PageSize") or ["50"])[-1])
        except ValueError:
            return self._problem({"Page": ["The value is not valid."]})
        if page < 1 or not 1 <= size <= 100:
            return self._problem({"PageSize": ["PageSize must be between 1 and 100."]})
        chunk = USERS[(page - 1) * size: page * size]
        return self._json(200, {"page": {"totalResults": len(USERS), "pageSize": size, "currentPage": page,
                                         "responseCount": len(chunk), "totalPages": math.ceil(len(USERS) / size)},
                                "users": chunk})

    async def _get_chats(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        row, err = self._case_row(parts[1])
        if err is not None:
            return err
        return self._json(200, self.chats(parts[1]))

    async def _post_chats(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        row, err = self._case_row(parts[1])
        if err is not None:
            return err
        try:
            body = json.loads(await request.aread() or b"null")
        except ValueError:
            return self._problem({"$": ["The JSON input is not valid."]})
        if not isinstance(body, dict):
            return self._problem({"": ["A non-empty request body is required."]})
        msg = body.get("message")
        if not isinstance(msg, str):
            return self._problem({"Message": ["The Message field is required."]})
        if len(msg) > 10000:
            return self._problem({"Message": ["The field Message must be a string with a maximum length of 10000."]})
        email_, uid = body.get("userEmail"), body.get("userId")
        if not email_ and not uid:
            return self._problem({"": ["At least one of UserId or UserEmail must be provided."]})
        user = next((u for u in USERS if (email_ and u["email"].lower() == str(email_).lower())
                     or (uid and u["id"] == str(uid).lower())), None)
        if user is None:
            return self._api_error(400, "Bad Request", "The user is not an active member of your team.",
                                   "InvalidUser")
        first, _, last = user["name"].partition(" ")
        now = _iso(self.now())
        chat = {"id": str(uuid.uuid4()), "dateCreated": now, "dateUpdated": None, "role": 1, "roleLabel": "Creditor",
                "message": msg, "isSeen": False,
                "user": {"id": USERS.index(user) + 1, "dateCreated": None, "dateUpdated": None, "firstName": first,
                         "lastName": last, "email": user["email"]}}
        self._life_tables()
        self.store.conn.execute("INSERT INTO chats (case_id, body) VALUES (?, ?)",
                                (parts[1].lower(), json.dumps(chat, ensure_ascii=False)))
        return self._json(200, chat)

    async def _get_files(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        row, err = self._case_row(parts[1])
        if err is not None:
            return err
        return self._json(200, self.files(parts[1]))

    async def _post_files(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        row, err = self._case_row(parts[1])
        if err is not None:
            return err
        form = _multipart(request.headers.get("content-type") or "", await request.aread())
        if form is None:
            return json_response(415, {"title": "Unsupported Media Type", "status": 415},
                                 content_type="application/problem+json; charset=utf-8")
        if "File" not in form or not form["File"][0]:
            return self._problem({"File": ["The File field is required."]})
        name, _, content = form["File"]
        dtype = (form.get("DocumentType") or (None, None, b"OriginalInvoice"))[2].decode() or "OriginalInvoice"
        if dtype not in DOCUMENT_TYPES:
            return self._problem({"DocumentType": [f"'{dtype}' is not a valid document type."]})
        if len(content) > MAX_FILE_BYTES:
            return self._api_error(400, "Bad Request", "The file exceeds the maximum size of 25MB.", "FileTooLarge")
        if not name.lower().endswith(FILE_EXTENSIONS):
            return self._api_error(400, "Bad Request", "The file type is not allowed.", "InvalidFileType")
        now = _iso(self.now())
        fid = str(uuid.uuid4())
        desc = form.get("Description")
        dto = {"id": fid, "dateCreated": now, "dateUpdated": now, "caseId": parts[1].lower(), "entityType": "Case",
               "entityId": parts[1].lower(), "fileName": name, "url": f"{HOSTS[self.environment]}/files/{fid}",
               "description": desc[2].decode() if desc else None, "documentType": dtype}
        self._life_tables()
        self.store.conn.execute("INSERT INTO files (case_id, body, content) VALUES (?, ?, ?)",
                                (parts[1].lower(), json.dumps(dto, ensure_ascii=False), content))
        return self._json(200, dto)


class DebituraSimulator(_CaseLife, Simulator):
    def __init__(self, environment: str = "production", data_dir: Path | str | None = None):
        super().__init__()
        if environment not in ("production", "test"):
            raise ValueError("environment must be 'production' or 'test'")
        self.environment = environment
        self.name = "debitura" if environment == "production" else "debitura-test"
        self.data_dir = Path(data_dir) if data_dir is not None else None
        db = self.data_dir / f"debitura-{environment}.sqlite" if self.data_dir is not None else None
        self.store = _Store(db)
        self.now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
        self.keys: dict[str, str] = {PRODUCTION_KEY: "production", TEST_KEY: "test"}
        self.revoked: set[str] = {REVOKED_KEY}
        self._limiters: dict[str, Any] = {}
        self.contract: dict[str, Any] = dict(SIGNED_CONTRACT)  # GET /contracts/debt-collection/status
        from .debitura_webhooks import WebhookHub  # webhooks, payments, the test-case lifecycle

        self.webhooks = WebhookHub(self)

    # -- test helpers
    def add_key(self, key: str, environment: str | None = None) -> None:
        self.keys[key] = environment or self.environment
        self.revoked.discard(key)

    def revoke(self, key: str) -> None:
        self.revoked.add(key)

    def cases(self) -> list[dict[str, Any]]:
        """All stored cases (InvoiceDto dicts), oldest first."""
        rows = self.store.conn.execute("SELECT body FROM cases ORDER BY seq").fetchall()
        return [json.loads(r["body"]) for r in rows]

    def state(self) -> dict[str, Any]:
        st = super().state()
        st["environment"] = self.environment
        st["cases"] = self.store.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
        return st

    def reset(self) -> None:
        super().reset()
        self.keys = {PRODUCTION_KEY: "production", TEST_KEY: "test"}
        self.revoked = {REVOKED_KEY}
        self.contract = dict(SIGNED_CONTRACT)
        self.store.conn.execute("DELETE FROM cases")
        self.store.conn.execute("DELETE FROM idempotency")
        self.store.conn.execute("DELETE FROM deleted_test_cases")
        self.webhooks.reset()
        self._life_tables()
        self.store.conn.execute("DELETE FROM chats")
        self.store.conn.execute("DELETE FROM files")

    def on_faults_changed(self) -> None:
        self._limiters.clear()

    # -- responses
    def _json(self, status: int, body: Any) -> httpx.Response:
        return json_response(status, body, content_type="application/json; charset=utf-8")

    def _problem(self, errors: dict[str, list[str]], extra: dict[str, Any] | None = None) -> httpx.Response:
        body: dict[str, Any] = {"type": VALIDATION_TYPE, "title": VALIDATION_TITLE, "status": 400,
                                "errors": errors,
                                "traceId": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"}
        if extra:
            body.update(extra)
        return json_response(400, body, content_type="application/problem+json; charset=utf-8")

    def _api_error(self, status: int, error: str, message: str, btype: str | None = None) -> httpx.Response:
        return self._json(status, {"error": error, "message": message,
                                   "businessErrors": [{"type": btype or error, "message": message,
                                                       "solutionUrl": None}]})

    def _unauthorized(self, message: str) -> httpx.Response:
        return self._json(401, {"error": "unauthorized", "message": message})

    def _rate_limited(self, retry_after: float) -> httpx.Response:
        return self._json(429, {"error": "rate_limit_exceeded",
                                "message": "Rate limit exceeded: 2000 requests per minute per API key. "
                                           "Retry after the number of seconds in retryAfter.",
                                "retryAfter": round(max(retry_after, 0.001), 3)})

    def fault_response(self, status: int) -> httpx.Response:
        if status == 429:
            return self._rate_limited(1.0)
        if status == 401:
            return self._unauthorized("Missing or invalid API key.")
        if status == 400:
            return self._problem({"": ["Injected validation fault."]})
        if status == 404:
            return self._api_error(404, "Not Found", "Resource not found.", "NotFound")
        if status == 422:
            return self._json(422, {"businessErrors": [{"type": "NoPartnerAvailable",
                                                        "message": "No collection partner is available for the "
                                                                   "debtor's jurisdiction.",
                                                        "solutionUrl": None}],
                                    "signingHandoff": None})
        return self._api_error(status, "Internal Server Error" if status == 500 else "Service Unavailable",
                               "An unexpected error occurred. Please try again later.", "ServerError")

    # -- pipeline
    async def dispatch(self, request: httpx.Request) -> httpx.Response:
        key = request.headers.get("xapikey")
        if not key:
            return self._unauthorized("Missing API key. Send your key in the XApiKey header.")
        if key in self.revoked:
            return self._unauthorized("The API key has been revoked.")
        env = self.keys.get(key)
        if env is None:
            return self._unauthorized("Invalid API key.")
        if env != self.environment:
            return self._unauthorized(
                f"This API key belongs to the {env} environment ({HOSTS[env]}), but this is the "
                f"{self.environment} environment ({HOSTS[self.environment]}).")
        limiter = self._limiters.get(key)
        if limiter is None:
            rate = self.faults.rate_limit_per_s
            limiter = (TokenBucket(rate, clock=self.clock) if rate is not None
                       else SlidingWindow(RATE_LIMIT, RATE_WINDOW_S, clock=self.clock))
            self._limiters[key] = limiter
        allowed, wait = limiter.try_take()
        if not allowed:
            return self._rate_limited(wait)
        accept = (request.headers.get("accept") or "").strip().lower()
        if accept == "text/plain":
            return httpx.Response(406)

        path = request.url.path.rstrip("/") or "/"
        parts = [unquote(p) for p in request.url.raw_path.decode().split("?", 1)[0].strip("/").split("/")]
        method = request.method.upper()
        lower = [p.lower() for p in parts]
        life = _case_life(self, method, lower, parts)
        if life is not None:
            return await life(request, parts)
        if lower == ["me"] and method == "GET":
            return self._json(200, dict(CREDITOR_PROFILE))
        if lower == ["contracts", "debt-collection", "status"] and method == "GET":
            return self._json(200, dict(self.contract))
        if lower == ["cases", "preview"] and method == "POST":
            return self._preview(await request.aread())
        hooked = await self.webhooks.dispatch(request, parts, method)
        if hooked is not None:
            return hooked
        if lower == ["cases"]:
            if method == "POST":
                return await self._create(request, key)
            if method == "GET":
                return self._list(request)
        if len(lower) >= 3 and lower[:2] == ["cases", "by-creditor-reference"] and method == "GET":
            return self._by_cref("/".join(parts[2:]))
        if len(lower) == 2 and lower[0] == "cases" and method == "GET":
            return self._get(parts[1])
        if lower[:2] == ["test", "cases"] and method == "DELETE":
            return self._delete_test(request, parts[2] if len(parts) == 3 else None)
        if path in ("/me", "/cases") or lower[:1] == ["cases"]:
            return httpx.Response(405)
        return httpx.Response(404)

    # -- endpoints
    def _row_to_case(self, row: sqlite3.Row | None) -> dict[str, Any] | None:
        return json.loads(row["body"]) if row is not None else None

    def _get(self, case_id: str) -> httpx.Response:
        try:
            cid = str(uuid.UUID(case_id))
        except ValueError:
            return self._api_error(400, "Bad Request", f"'{case_id}' is not a valid case id.", "InvalidId")
        row = self.store.conn.execute("SELECT body FROM cases WHERE id = ?", (cid,)).fetchone()
        if row is None:
            return self._api_error(404, "Not Found", f"Case '{cid}' was not found.", "NotFound")
        return self._json(200, self._row_to_case(row))

    def _by_cref(self, ref: str) -> httpx.Response:
        if not ref.strip():
            return self._api_error(400, "Bad Request", "Creditor reference is required.", "InvalidReference")
        row = self.store.conn.execute(
            "SELECT body FROM cases WHERE creditor_reference = ? ORDER BY seq DESC LIMIT 1", (ref,)).fetchone()
        if row is None:
            return self._api_error(404, "Not Found", f"No case found with creditor reference '{ref}'.", "NotFound")
        return self._json(200, self._row_to_case(row))

    def _qp(self, request: httpx.Request, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in request.url.params.multi_items() if k.lower() == lname]

    def _list(self, request: httpx.Request) -> httpx.Response:
        errors: dict[str, list[str]] = {}

        def int_param(name: str, default: int) -> int:
            vals = self._qp(request, name)
            if not vals:
                return default
            try:
                return int(vals[-1])
            except ValueError:
                errors[name] = [f"The value '{vals[-1]}' is not valid for {name}."]
                return default

        page = int_param("Page", 1)
        size = int_param("PageSize", 10)
        if "Page" not in errors and page < 1:
            errors["Page"] = ["Page must be greater than or equal to 1."]
        if "PageSize" not in errors and not 1 <= size <= 100:
            errors["PageSize"] = ["PageSize must be between 1 and 100."]
        if errors:
            return self._problem(errors)
        cases = list(reversed(self.cases()))  # newest first
        ids = {v.lower() for raw in self._qp(request, "Ids") for v in raw.split(",") if v}
        statuses = {v.lower() for raw in self._qp(request, "Statuses") for v in raw.split(",") if v}
        if ids:
            cases = [c for c in cases if c["id"].lower() in ids]
        if statuses:
            cases = [c for c in cases if (c.get("lifecycle") or "").lower() in statuses]
        total = len(cases)
        chunk = cases[(page - 1) * size: page * size]
        return self._json(200, {"page": {"totalResults": total, "pageSize": size, "currentPage": page,
                                         "responseCount": len(chunk),
                                         "totalPages": math.ceil(total / size) if total else 0},
                                "cases": chunk})

    def _delete_test(self, request: httpx.Request, case_id: str | None) -> httpx.Response:
        """As documented: 204 (also for a test case already deleted), 400 for a production case (by tag: if any
        matched case is one, and then nothing is deleted), 404 for a case this creditor never had."""
        conn = self.store.conn
        if case_id is not None:
            cid = case_id.strip().lower()
            row = conn.execute("SELECT is_test FROM cases WHERE id = ?", (cid,)).fetchone()
            if row is None:
                if conn.execute("SELECT 1 FROM deleted_test_cases WHERE id = ?", (cid,)).fetchone():
                    return httpx.Response(204)
                return self._api_error(404, "Not Found", f"Case '{case_id}' was not found.", "NotFound")
            if not row["is_test"]:
                return self._api_error(400, "Bad Request", f"Case '{case_id}' is a production case: only test "
                                                           "cases can be deleted.", "NotATestCase")
            conn.execute("DELETE FROM cases WHERE id = ?", (cid,))
            conn.execute("INSERT OR IGNORE INTO deleted_test_cases (id) VALUES (?)", (cid,))
            self._life_tables()  # a hard delete takes the case's chats and files with it
            conn.execute("DELETE FROM chats WHERE case_id = ?", (cid,))
            conn.execute("DELETE FROM files WHERE case_id = ?", (cid,))
            return httpx.Response(204)
        tags = [t for t in self._qp(request, "tag") if t.strip()]
        if not tags:
            return self._problem({"tag": ["The tag field is required."]})
        tag = tags[-1]
        if conn.execute("SELECT 1 FROM cases WHERE tag = ? AND is_test = 0", (tag,)).fetchone():
            return self._api_error(400, "Bad Request", f"Cases tagged '{tag}' include production cases: nothing "
                                                       "was deleted.", "NotATestCase")
        ids = [r["id"] for r in conn.execute("SELECT id FROM cases WHERE tag = ? AND is_test = 1", (tag,))]
        conn.execute("DELETE FROM cases WHERE tag = ? AND is_test = 1", (tag,))
        conn.executemany("INSERT OR IGNORE INTO deleted_test_cases (id) VALUES (?)", [(i,) for i in ids])
        return httpx.Response(204)

    # -- POST /cases
    def _validate(self, body: Any) -> dict[str, list[str]]:
        errors: dict[str, list[str]] = {}

        def add(field: str, msg: str) -> None:
            errors.setdefault(field, []).append(msg)

        if not isinstance(body, dict):
            add("$", "The JSON value could not be converted to CreateCollectionCaseRequestApiViewModel. Path: $ | "
                     "LineNumber: 0 | BytePositionInLine: 1.")
            return errors

        def text(obj: dict, key: str, path: str) -> str | None:
            v = obj.get(key)
            if v is None:
                return None
            if not isinstance(v, str):
                add(f"$.{path}", f"The JSON value could not be converted to System.String. Path: $.{path} | "
                                 "LineNumber: 0 | BytePositionInLine: 0.")
                return None
            return v

        now = self.now()
        cur = text(body, "currencyCode", "currencyCode")
        if cur is None or not cur.strip():
            if "$.currencyCode" not in errors:
                add("CurrencyCode", "The CurrencyCode field is required.")
        elif cur not in CURRENCIES:
            add("CurrencyCode", f"'{cur}' is not a valid ISO 4217 currency code.")

        amount = body.get("amountToRecover")
        if isinstance(amount, str):  # System.Text.Json web defaults read numbers from strings
            try:
                amount = float(amount)
            except ValueError:
                add("$.amountToRecover", "The JSON value could not be converted to System.Double. Path: "
                                         "$.amountToRecover | LineNumber: 0 | BytePositionInLine: 0.")
                amount = None
        if amount is None or isinstance(amount, bool) or not isinstance(amount, (int, float)):
            if "$.amountToRecover" not in errors:
                add("AmountToRecover", "The AmountToRecover field is required.")
        elif not math.isfinite(amount) or amount <= 0:
            add("AmountToRecover", "AmountToRecover must be greater than 0.")

        date_raw = body.get("date")
        date = parse_datetime(date_raw)
        if date_raw is None or (isinstance(date_raw, str) and not date_raw.strip()):
            add("Date", "The Date field is required.")
        elif date is None:
            add("$.date", "The JSON value could not be converted to System.DateTime. Path: $.date | LineNumber: 0 "
                          "| BytePositionInLine: 0.")
        elif date > now:
            add("Date", "Date cannot be in the future.")

        due_raw = body.get("dueDate")
        due = parse_datetime(due_raw)
        if due_raw is None or (isinstance(due_raw, str) and not due_raw.strip()):
            add("DueDate", "The DueDate field is required.")
        elif due is None:
            add("$.dueDate", "The JSON value could not be converted to System.DateTime. Path: $.dueDate | "
                             "LineNumber: 0 | BytePositionInLine: 0.")
        else:
            if due > now:
                add("DueDate", "DueDate must be in the past.")
            if date is not None and due < date:
                add("DueDate", "DueDate cannot be before Date.")

        for fld, limit, label in (("creditorReference", 50, "CreditorReference"), ("comments", 4000, "Comments"),
                                  ("claimDescription", 4000, "ClaimDescription"), ("tag", 100, "Tag")):
            v = text(body, fld, fld)
            if v is not None and len(v) > limit:
                add(label, f"The field {label} must be a string or array type with a maximum length of '{limit}'.")
        for fld in ("isTest", "allowPendingContracts", "skipDebituraVerification", "skipCreationEmails"):
            v = body.get(fld)
            if v is not None and not isinstance(v, bool):
                add(f"$.{fld}", f"The JSON value could not be converted to System.Boolean. Path: $.{fld} | "
                                "LineNumber: 0 | BytePositionInLine: 0.")

        debtor = body.get("debtor")
        if debtor is None:
            add("Debtor", "The Debtor field is required.")
            return errors
        if not isinstance(debtor, dict):
            add("$.debtor", "The JSON value could not be converted to DebtorDto. Path: $.debtor | LineNumber: 0 | "
                            "BytePositionInLine: 0.")
            return errors
        dtype = text(debtor, "type", "debtor.type")
        if dtype is None or not dtype.strip():
            add("Debtor.Type", "The Type field is required.")
        elif dtype.strip().lower() not in ("company", "private", "person"):
            add("Debtor.Type", f"Debtor type '{dtype}' is not valid. Valid values: 'Company', 'Private'.")
        name = text(debtor, "name", "debtor.name")
        if name is None or not name.strip():
            add("Debtor.Name", "The Name field is required.")
        country = text(debtor, "countryAlpha2", "debtor.countryAlpha2")
        if country is None or not country.strip():
            add("Debtor.CountryAlpha2", "The CountryAlpha2 field is required.")
        elif country.strip().upper() not in COUNTRIES:
            add("Debtor.CountryAlpha2", f"'{country}' is not a valid ISO 3166-1 alpha-2 country code.")
        elif country.strip().upper() == "US":
            st = text(debtor, "stateAlpha2", "debtor.stateAlpha2")
            if st is None or not st.strip():
                add("Debtor.StateAlpha2", "StateAlpha2 is required when CountryAlpha2 is 'US'.")
            else:
                s = st.strip().upper()
                if s.startswith("US-"):
                    s = s[3:]
                if s not in US_STATES and st.strip().lower() not in _STATE_NAMES:
                    add("Debtor.StateAlpha2", f"'{st}' is not a valid US state.")
        for fld, label in (("address", "Address"), ("city", "City")):
            v = text(debtor, fld, f"debtor.{fld}")
            if v is None or not v.strip():
                if f"$.debtor.{fld}" not in errors:
                    add(f"Debtor.{label}", f"The {label} field is required.")
        # contactPerson is described as "required for companies, not used for persons", but DebtorDto's
        # `required` lists only type and name, and the POST /cases rules make only the name mandatory for a
        # Company: a company without one is accepted, as documented.
        for fld in ("zipCode", "state", "country", "email", "phone", "contactPerson", "companyRegistrationNumber"):
            text(debtor, fld, f"debtor.{fld}")
        return errors

    def _new_reference(self) -> str:
        while True:
            ref = "".join(secrets.choice(_CASE_REF_ALPHABET) for _ in range(8))
            if self.store.conn.execute("SELECT 1 FROM cases WHERE reference = ?", (ref,)).fetchone() is None:
                return ref

    def _build_case(self, body: dict[str, Any]) -> dict[str, Any]:
        now = self.now()
        debtor = dict(body["debtor"])
        normalized_debtor = {
            "type": debtor.get("type"),
            "name": debtor.get("name"),
            "contactPerson": debtor.get("contactPerson"),
            "companyRegistrationNumber": debtor.get("companyRegistrationNumber"),
            "address": debtor.get("address"),
            "zipCode": debtor.get("zipCode"),
            "city": debtor.get("city"),
            "state": debtor.get("state"),
            "stateAlpha2": debtor.get("stateAlpha2"),
            "countryAlpha2": (debtor.get("countryAlpha2") or "").strip().upper(),
            "country": debtor.get("country"),
            "email": debtor.get("email"),
            "phone": debtor.get("phone"),
        }
        amount = float(body["amountToRecover"])
        created = _iso(now)
        return {
            "id": str(uuid.uuid4()),
            "dateCreated": created,
            "created": created,
            "dateUpdated": None,
            "reference": self._new_reference(),
            "creditorReference": body.get("creditorReference"),
            "creditorComments": body.get("comments"),
            "claimDescription": body.get("claimDescription"),
            "grossAmount": amount,
            "remainder": amount,
            "interestFees": 0.0,
            "reminderFees": 0.0,
            "collectionFees": 0.0,
            "totalAddedFees": 0.0,
            "currency": body["currencyCode"],
            "isTestCase": bool(body.get("isTest", False)),
            "lifecycle": "Active",
            "dueDate": _iso(parse_datetime(body["dueDate"])),  # type: ignore[arg-type]
            "date": _iso(parse_datetime(body["date"])),  # type: ignore[arg-type]
            "dateFinished": None,
            "dateCollectionStarted": created,
            "closeCode": None,
            "currentEngagementPhase": "Pre-legal",
            "claimType": "Unpaid Invoice",
            "creditorDivisionId": body.get("creditorDivisionId"),
            "debtor": normalized_debtor,
            "creditor": {k: CREDITOR_PROFILE[k] for k in ("id", "companyName", "companyRegistrationNumber",
                                                          "officeEmail", "officePhone", "address", "city",
                                                          "zipCode", "state", "country")},
            "solutionUrl": None,
            "signingHandoff": None,
        }

    def _preview(self, raw: bytes) -> httpx.Response:
        """POST /cases/preview: eligibility and the success fee of a case, creating nothing."""
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._api_error(400, "Bad Request", "A JSON request body is required.", "ValidationError")
        debtor = body.get("debtor") if isinstance(body.get("debtor"), dict) else {}
        missing = [n for n, v in (("AmountToRecover", body.get("amountToRecover")),
                                  ("CurrencyCode", body.get("currencyCode")), ("Debtor.Type", debtor.get("type")),
                                  ("Debtor.CountryAlpha2", debtor.get("countryAlpha2"))) if v in (None, "")]
        country = str(debtor.get("countryAlpha2") or "").strip().upper()
        if country == "US" and not debtor.get("stateAlpha2"):
            missing.append("Debtor.StateAlpha2")
        if missing:
            return self._api_error(400, "Bad Request", f"Required: {', '.join(missing)}.", "ValidationError")
        surcharge = 0.0
        due = parse_datetime(body.get("dueDate"))
        if due is not None:
            overdue = (self.now() - due).days
            surcharge = next((extra for days, extra in AGE_SURCHARGE if overdue > days), 0.0)
        eligible = country not in NO_PARTNER
        return self._json(200, {"result": {
            "isEligible": eligible,
            "ineligibilityReason": None if eligible else f"No collection partner covers {country}.",
            "partnerAssignment": {"collectionPartnerId": str(uuid.uuid5(uuid.NAMESPACE_URL, country)),
                                  "partnerName": f"Sandbox Collections {country}", "partnerCountry": country}
            if eligible else None,
            "requiredActions": [] if self.contract.get("signed") else [{
                "type": "SignStandardAgreement", "message": "Sign the Standard Debt Collection Agreement.",
                "solutionUrl": "https://app.debitura.com/contracts/sign", "isBlocking": True}],
            "jurisdiction": {"id": 1, "name": country, "countryAlpha2": country,
                             "stateAlpha2": debtor.get("stateAlpha2")},
            "pricingPreview": {"baseSuccessFeePercentage": BASE_FEE, "ageSurchargePercentage": surcharge,
                               "totalSuccessFeePercentage": BASE_FEE + surcharge,
                               "currencyCode": body.get("currencyCode"), "pricingSource": "Standard",
                               "pricingSourceDescription": "Standard pricing"},
            "requiresKycVerification": False, "hasKycOnFile": True, "signingHandoff": None}})

    async def _create(self, request: httpx.Request, api_key: str) -> httpx.Response:
        raw = await request.aread()
        idem = request.headers.get("idempotency-key")
        if idem is not None and len(idem) > 255:
            return self._problem({"Idempotency-Key": ["The Idempotency-Key header must be at most 255 characters."]})
        ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if ctype not in ("application/json", "text/json", "application/json-patch+json") and \
                not (ctype.startswith("application/") and ctype.endswith("+json")):
            return json_response(415, {"type": "https://tools.ietf.org/html/rfc7231#section-6.5.13",
                                       "title": "Unsupported Media Type", "status": 415,
                                       "traceId": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"},
                                 content_type="application/problem+json; charset=utf-8")
        if not raw.strip():
            return self._problem({"": ["A non-empty request body is required."]})
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return self._problem({"$": [f"The JSON input is not valid: {exc.msg}. Path: $ | LineNumber: "
                                        f"{exc.lineno - 1} | BytePositionInLine: {exc.colno - 1}."]})
        body_hash = canonical_body_hash(raw)
        conn = self.store.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if idem is not None:
                row = conn.execute("SELECT body_hash, status, response FROM idempotency WHERE api_key = ? AND "
                                   "idem_key = ?", (api_key, idem)).fetchone()
                if row is not None:
                    conn.execute("COMMIT")
                    if row["body_hash"] == body_hash:
                        return httpx.Response(row["status"], content=row["response"].encode("utf-8"),
                                              headers={"Content-Type": "application/json; charset=utf-8"})
                    return self._json(422, {"businessErrors": [{
                        "type": "IdempotencyConflict",
                        "message": "The Idempotency-Key was already used with a different request body.",
                        "solutionUrl": None}], "signingHandoff": None})
            errors = self._validate(body)
            if errors:
                conn.execute("COMMIT")
                return self._problem(errors)
            cref = body.get("creditorReference")
            if cref:
                dup = conn.execute("SELECT id FROM cases WHERE creditor_reference = ?", (cref,)).fetchone()
                if dup is not None:
                    conn.execute("COMMIT")
                    msg = f"A case with creditor reference '{cref}' already exists (case id {dup['id']})."
                    return self._problem(
                        {"CreditorReference": ["DuplicateReference: a case with this creditor reference already "
                                               "exists"]},
                        {"error": "DuplicateReference", "message": msg,
                         "businessErrors": [{"type": "DuplicateReference", "message": msg, "solutionUrl": None}]})
            case = self._build_case(body)
            payload = json.dumps(case, ensure_ascii=False)
            conn.execute("INSERT INTO cases (id, reference, creditor_reference, is_test, tag, body) VALUES "
                         "(?, ?, ?, ?, ?, ?)", (case["id"], case["reference"], cref, int(case["isTestCase"]),
                                                body.get("tag"), payload))
            if idem is not None:
                conn.execute("INSERT INTO idempotency (api_key, idem_key, body_hash, status, response) VALUES "
                             "(?, ?, ?, ?, ?)", (api_key, idem, body_hash, 200, payload))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        await self.webhooks.emit("case.created", case)
        return httpx.Response(200, content=payload.encode("utf-8"),
                              headers={"Content-Type": "application/json; charset=utf-8"})

