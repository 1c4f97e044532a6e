"""Debitura simulator: webhook subscriptions, signed event delivery, payments and the test-case lifecycle.

Endpoints (as the Customer API's OpenAPI document describes them):

  POST /webhooks                      201 WebhookDto with ``secret`` (base64 of 32 random bytes, shown only here)
  GET  /webhooks, GET /webhooks/{id}  WebhookDto without the secret
  PATCH /webhooks/{id}                url, isActive, isTestMode, regenerateSecret (answers the new secret);
                                      events cannot be changed (400)
  DELETE /webhooks/{id}               204
  POST /webhooks/{id}/test (and :test)   a synthetic case.created delivery; TestResultDto
  GET  /webhooks/events?caseId=       WebhookEventDto list, newest first
  POST /webhooks/events/{id}/replay   the same payload again, with ``X-Debitura-Replay: true``
  POST /test/webhooks/fire            {event, caseId, subscriptionId?}: a current-state event of a test case
  POST /test/cases/{id}/advance       {to: Active | Closed:Paid | Closed:NoPayment, amount}: test cases only
  GET  /cases/{id}/payments           PaymentDto list

Sandbox controls (not in the real API; for any case, production or test):

  POST /_sandbox/cases/{id}/payments  {amount, date?}: a payment registered by the collection partner
  POST /_sandbox/cases/{id}/close     {closeCode?}: the case closed (default: Paid when nothing is left, else
                                      PreLegalExhaustedNoPayment)

Validation as documented: the URL must be HTTPS and must not be a private address. The simulator lets
``http://127.0.0.1``, ``http://localhost`` and ``http://[::1]`` through, so tests and demos can receive deliveries
on this machine; every other plain-HTTP or private URL is refused with 400.

Deliveries: when a case is created, changes lifecycle, gets a payment (or loses one) or is closed, every active
subscription for that event whose test mode matches the case's (test cases go to test subscriptions only, as
documented) gets a POST with ``X-Debitura-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "{t}.{body}" keyed with the
base64-decoded secret>``, ``X-Debitura-Timestamp`` and ``X-Debitura-Event``. The delivery is made before the
API call that caused it answers (one attempt; a failure is kept in the event log with its error, and
``/webhooks/events/{id}/replay`` delivers again). The event body is ``{id, event, timestamp, classification, data}``
with ``data`` = the case summary of the documented example (caseId, reference, creditorReference, status, amount,
currency, debtorName) plus, per event: ``oldLifecycle``/``newLifecycle`` (case.updated), ``closeCode`` and
``closeComment`` (case.closed), ``payment`` (a PaymentDto; payment.*), ``chat`` (chat.created). The OpenAPI
document shows only the case.created example; the per-event fields are the simulator's reading of the event
descriptions.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx

EVENTS = ("case.created", "case.updated", "case.closed", "payment.created", "payment.deleted", "chat.created")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
DELIVERY_TIMEOUT_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_subscriptions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    body TEXT NOT NULL,               -- WebhookDto without the secret
    secret TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    subscription_id TEXT NOT NULL,
    case_id TEXT,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at TEXT NOT NULL,
    delivered_at TEXT,
    attempt_count INTEGER NOT NULL DEFAULT 0,
    last_response_code INTEGER,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS payments (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    case_id TEXT NOT NULL,
    body TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
"""


def _iso(ts: float | None = None) -> str:
    t = time.time() if ts is None else ts
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(base64.b64decode(secret), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def url_problem(url: Any) -> str | None:
    if not isinstance(url, str) or not url.strip():
        return "The Url field is required."
    if len(url) > 1024:
        return "The field Url must be a string with a maximum length of 1024."
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "Url must be a valid absolute URL."
    if parts.scheme not in ("http", "https") or not host:
        return "Url must be a valid absolute URL."
    if host in LOCAL_HOSTS:
        return None
    if parts.scheme != "https":
        return "Url must use HTTPS."
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved:
        return "Url must not point to a private IP address."
    return None


class WebhookHub:
    """Held by a DebituraSimulator (``sim.webhooks``); shares its SQLite store."""

    def __init__(self, sim: Any):
        self.sim = sim
        self.conn = sim.store.conn
        self.conn.executescript(SCHEMA)

    def reset(self) -> None:
        for t in ("webhook_subscriptions", "webhook_events", "payments"):
            self.conn.execute(f"DELETE FROM {t}")

    # -- helpers
    def _json(self, status: int, body: Any) -> httpx.Response:
        return self.sim._json(status, body)

    def _bad(self, field: str, message: str) -> httpx.Response:
        return self.sim._problem({field: [message]})

    def _not_found(self, what: str) -> httpx.Response:
        return self.sim._api_error(404, "Not Found", f"{what} was not found.", "NotFound")

    def subscriptions(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.conn.execute("SELECT body FROM webhook_subscriptions ORDER BY seq")]

    def _sub(self, sub_id: str) -> tuple[dict, str] | None:
        row = self.conn.execute("SELECT body, secret FROM webhook_subscriptions WHERE id = ?",
                                (sub_id.strip().lower(),)).fetchone()
        return (json.loads(row["body"]), row["secret"]) if row else None

    def _save_sub(self, body: dict, secret: str) -> None:
        self.conn.execute("INSERT INTO webhook_subscriptions (id, body, secret) VALUES (?, ?, ?) ON CONFLICT (id) DO "
                          "UPDATE SET body=excluded.body, secret=excluded.secret",
                          (body["id"], json.dumps(body), secret))

    def _case(self, case_id: str) -> dict | None:
        try:
            cid = str(uuid.UUID(case_id))
        except ValueError:
            return None
        row = self.conn.execute("SELECT body FROM cases WHERE id = ?", (cid,)).fetchone()
        return json.loads(row["body"]) if row else None

    def _save_case(self, case: dict) -> None:
        self.conn.execute("UPDATE cases SET body = ? WHERE id = ?", (json.dumps(case, ensure_ascii=False), case["id"]))

    def payments(self, case_id: str, deleted: bool = False) -> list[dict]:
        return [json.loads(r["body"]) for r in self.conn.execute(
            "SELECT body FROM payments WHERE case_id = ? AND deleted = ? ORDER BY seq", (case_id, int(deleted)))]

    @staticmethod
    async def _body(request: httpx.Request) -> Any:
        raw = await request.aread()
        try:
            return json.loads(raw) if raw.strip() else None
        except ValueError:
            return ValueError

    # -- routing: None when the path is not one of these endpoints
    async def dispatch(self, request: httpx.Request, parts: list[str], method: str) -> httpx.Response | None:
        lower = [p.lower() for p in parts]
        if lower[:1] == ["webhooks"]:
            if lower == ["webhooks"]:
                if method == "GET":
                    return self._json(200, self.subscriptions())
                if method == "POST":
                    return await self._create(request)
                return httpx.Response(405)
            if lower == ["webhooks", "events"] and method == "GET":
                return self._events(request)
            if len(lower) == 4 and lower[1] == "events" and lower[3] == "replay" and method == "POST":
                return await self._replay(parts[2])
            sid = parts[1].split(":", 1)[0]
            test = len(lower) == 3 and lower[2] == "test" or (len(lower) == 2 and lower[1].endswith(":test"))
            if test and method == "POST":
                return await self._test(sid)
            if len(lower) == 2:
                if method == "GET":
                    found = self._sub(sid)
                    return self._json(200, found[0]) if found else self._not_found(f"Webhook '{sid}'")
                if method == "PATCH":
                    return await self._patch(request, sid)
                if method == "DELETE":
                    if self._sub(sid) is None:
                        return self._not_found(f"Webhook '{sid}'")
                    self.conn.execute("DELETE FROM webhook_subscriptions WHERE id = ?", (sid.strip().lower(),))
                    return httpx.Response(204)
            return None
        if lower == ["test", "webhooks", "fire"] and method == "POST":
            return await self._fire(request)
        if len(lower) == 4 and lower[:2] == ["test", "cases"] and lower[3] == "advance" and method == "POST":
            return await self._advance(request, parts[2])
        if len(lower) == 3 and lower[0] == "cases" and lower[2] == "payments" and method == "GET":
            case = self._case(parts[1])
            return self._json(200, self.payments(case["id"])) if case else self._not_found(f"Case '{parts[1]}'")
        if len(lower) == 4 and lower[:2] == ["_sandbox", "cases"] and method == "POST":
            case = self._case(parts[2])
            if case is None:
                return self._not_found(f"Case '{parts[2]}'")
            body = await self._body(request)
            body = body if isinstance(body, dict) else {}
            if lower[3] == "payments":
                try:
                    amount = float(body.get("amount"))
                except (TypeError, ValueError):
                    return self._bad("Amount", "The Amount field is required.")
                payment = await self.register_payment(case, amount, body.get("date"))
                return self._json(201, payment)
            if lower[3] == "close":
                await self.close_case(case, body.get("closeCode"))
                return self._json(200, self._case(case["id"]))
        return None

    # -- subscriptions
    async def _create(self, request: httpx.Request) -> httpx.Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            return self._bad("$", "A JSON object with url and events is required.")
        unknown = set(body) - {"url", "events", "isTestMode"}
        if unknown:
            return self._bad("$", f"Unknown field(s): {', '.join(sorted(unknown))}.")
        why = url_problem(body.get("url"))
        if why:
            return self._bad("Url", why)
        events = body.get("events")
        if not isinstance(events, list) or not events:
            return self._bad("Events", "At least one event type is required.")
        bad = [e for e in events if e not in EVENTS]
        if bad:
            return self._bad("Events", f"Invalid event type(s): {', '.join(map(str, bad))}. "
                                       f"Valid: {', '.join(EVENTS)}.")
        now = _iso()
        secret = base64.b64encode(secrets.token_bytes(32)).decode()
        dto = {"id": str(uuid.uuid4()), "url": body["url"], "events": list(dict.fromkeys(events)), "isActive": True,
               "createdUtc": now, "updatedUtc": now, "disabledReason": None, "secret": None,
               "isTestMode": bool(body.get("isTestMode", False))}
        self._save_sub(dto, secret)
        return self._json(201, {**dto, "secret": secret})

    async def _patch(self, request: httpx.Request, sid: str) -> httpx.Response:
        found = self._sub(sid)
        if found is None:
            return self._not_found(f"Webhook '{sid}'")
        dto, secret = found
        body = await self._body(request)
        if not isinstance(body, dict):
            return self._bad("$", "A JSON object is required.")
        if body.get("events") is not None and sorted(body["events"]) != sorted(dto["events"]):
            return self._bad("Events", "Event types cannot be changed after creation. Delete and recreate the "
                                       "subscription.")
        if body.get("url") is not None:
            why = url_problem(body["url"])
            if why:
                return self._bad("Url", why)
            dto["url"] = body["url"]
        if body.get("isActive") is not None:
            dto["isActive"] = bool(body["isActive"])
            dto["disabledReason"] = None if dto["isActive"] else "Disabled by the creditor."
        if body.get("isTestMode") is not None:
            dto["isTestMode"] = bool(body["isTestMode"])
        shown = None
        if body.get("regenerateSecret"):
            secret = shown = base64.b64encode(secrets.token_bytes(32)).decode()
        dto["updatedUtc"] = _iso()
        self._save_sub(dto, secret)
        return self._json(200, {**dto, "secret": shown})

    # -- events
    def _case_data(self, case: dict) -> dict:
        return {"caseId": case["id"], "reference": case.get("reference"),
                "creditorReference": case.get("creditorReference"), "status": case.get("lifecycle"),
                "amount": case.get("grossAmount"), "remainder": case.get("remainder"),
                "currency": case.get("currency"), "debtorName": (case.get("debtor") or {}).get("name")}

    async def emit(self, event: str, case: dict, extra: dict | None = None, only: str | None = None) -> int:
        """Deliver `event` about `case` to every matching subscription (or only subscription `only`); returns how
        many deliveries were made."""
        payload = {"id": f"evt_{uuid.uuid4().hex}", "event": event, "timestamp": _iso(),
                   "classification": "test" if case.get("isTestCase") else "production",
                   "data": {**self._case_data(case), **(extra or {})}}
        raw = json.dumps(payload, ensure_ascii=False)
        count = 0
        for r in self.conn.execute("SELECT body, secret FROM webhook_subscriptions ORDER BY seq").fetchall():
            sub = json.loads(r["body"])
            if only is not None and sub["id"] != only:
                continue
            if only is None and (not sub["isActive"] or event not in sub["events"]
                                 or bool(sub["isTestMode"]) != bool(case.get("isTestCase"))):
                continue
            eid = str(uuid.uuid4())
            self.conn.execute("INSERT INTO webhook_events (id, subscription_id, case_id, event_type, payload, "
                              "created_at) VALUES (?, ?, ?, ?, ?, ?)", (eid, sub["id"], case["id"], event, raw, _iso()))
            await self._deliver(eid, sub, r["secret"], raw.encode())
            count += 1
        return count

    async def _deliver(self, event_id: str, sub: dict, secret: str, body: bytes, replay: bool = False) -> dict:
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "X-Debitura-Signature": signature(secret, ts, body),
                   "X-Debitura-Timestamp": str(ts),
                   "X-Debitura-Event": json.loads(body).get("event", ""), "User-Agent": "Debitura-Webhooks/1.0"}
        if replay:
            headers["X-Debitura-Replay"] = "true"
        started = time.monotonic()
        code, error = None, None
        try:
            async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_S, trust_env=False) as client:
                resp = await client.post(sub["url"], content=body, headers=headers)
            code = resp.status_code
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.conn.execute("UPDATE webhook_events SET attempt_count = attempt_count + 1, last_response_code = ?, "
                          "last_error = ?, delivered_at = CASE WHEN ? IS NULL THEN ? ELSE delivered_at END WHERE id = ?",
                          (code, error, error, _iso(), event_id))
        return {"success": error is None, "httpStatusCode": code,
                "durationMs": int((time.monotonic() - started) * 1000), "errorMessage": error,
                "errorCategory": None if error is None else ("HttpError" if code else "NetworkError")}

    def _events(self, request: httpx.Request) -> httpx.Response:
        case_ids = self.sim._qp(request, "caseId")
        if not case_ids:
            return self._bad("caseId", "The caseId field is required.")
        try:
            cid = str(uuid.UUID(case_ids[-1]))
        except ValueError:
            return self._bad("caseId", f"The value '{case_ids[-1]}' is not valid.")
        rows = self.conn.execute("SELECT * FROM webhook_events WHERE case_id = ? ORDER BY seq DESC", (cid,)).fetchall()
        since = self.sim._qp(request, "since")
        out = [{"id": r["id"], "subscriptionId": r["subscription_id"], "caseId": r["case_id"],
                "eventType": r["event_type"], "payload": r["payload"], "createdAt": r["created_at"],
                "deliveredAt": r["delivered_at"], "attemptCount": r["attempt_count"],
                "lastResponseCode": r["last_response_code"], "lastError": r["last_error"]} for r in rows]
        if since:
            out = [e for e in out if e["createdAt"] >= since[-1]]
        return self._json(200, out)

    async def _replay(self, event_id: str) -> httpx.Response:
        row = self.conn.execute("SELECT * FROM webhook_events WHERE id = ?", (event_id.strip().lower(),)).fetchone()
        found = self._sub(row["subscription_id"]) if row else None
        if row is None or found is None:
            return self._not_found(f"Event '{event_id}'")
        await self._deliver(row["id"], found[0], found[1], row["payload"].encode(), replay=True)
        return self._json(200, {"eventId": row["id"], "subscriptionId": row["subscription_id"],
                                "eventType": row["event_type"]})

    async def _test(self, sid: str) -> httpx.Response:
        found = self._sub(sid)
        if found is None:
            return self._not_found(f"Webhook '{sid}'")
        payload = {"id": f"evt_{uuid.uuid4().hex}", "event": "case.created", "timestamp": _iso(),
                   "classification": "test",
                   "data": {"caseId": str(uuid.uuid4()), "reference": "TEST0000", "creditorReference": "INV-TEST",
                            "status": "Active", "amount": 1000.0, "currency": "EUR",
                            "debtorName": "Debtor Company Ltd"}}
        raw = json.dumps(payload).encode()
        eid = str(uuid.uuid4())
        self.conn.execute("INSERT INTO webhook_events (id, subscription_id, case_id, event_type, payload, created_at) "
                          "VALUES (?, ?, ?, ?, ?, ?)", (eid, sid.lower(), None, "case.created", raw.decode(), _iso()))
        result = await self._deliver(eid, found[0], found[1], raw)
        return self._json(200, {**result, "testPayload": payload})

    async def _fire(self, request: httpx.Request) -> httpx.Response:
        body = await self._body(request)
        if not isinstance(body, dict) or not body.get("event") or not body.get("caseId"):
            return self._bad("$", "event and caseId are required.")
        if body["event"] not in EVENTS:
            return self._bad("Event", f"'{body['event']}' is not a valid event type.")
        case = self._case(str(body["caseId"]))
        if case is None:
            return self._not_found(f"Case '{body['caseId']}'")
        if not case.get("isTestCase"):
            return self._bad("CaseId", "Only test cases can fire webhooks.")
        sid = body.get("subscriptionId")
        if sid is not None:
            found = self._sub(str(sid))
            if found is None or not found[0]["isTestMode"]:
                return self._bad("SubscriptionId", "The subscription was not found or is not a test subscription.")
        extra: dict = {}
        ev = body["event"]
        if ev == "case.updated":
            extra = {"oldLifecycle": case.get("lifecycle"), "newLifecycle": case.get("lifecycle")}
        elif ev == "case.closed":
            extra = {"closeCode": case.get("closeCode"), "closeComment": case.get("closeComment")}
        elif ev in ("payment.created", "payment.deleted"):
            pays = self.payments(case["id"], deleted=ev == "payment.deleted")
            if not pays:
                return self._json(422, {"error": "Unprocessable", "message": "The case has no such payment."})
            extra = {"payment": pays[-1]}
        elif ev == "chat.created":
            chats = getattr(self.sim, "chats", None)
            latest = chats(case["id"])[-1:] if callable(chats) else []
            if not latest:
                return self._json(422, {"error": "Unprocessable", "message": "The case has no chat messages."})
            extra = {"chat": latest[0]}
        if sid is None:
            n = 0
            for s in self.subscriptions():
                if s["isActive"] and s["isTestMode"] and ev in s["events"]:
                    n += await self.emit(ev, case, extra, only=s["id"])
        else:
            n = await self.emit(ev, case, extra, only=str(sid).lower())
        return self._json(200, {"eventType": ev, "caseId": case["id"], "enqueuedCount": n})

    # -- the case's life
    async def set_lifecycle(self, case: dict, lifecycle: str) -> None:
        old = case.get("lifecycle")
        if old == lifecycle:
            return
        case["lifecycle"] = lifecycle
        case["dateUpdated"] = _iso()
        self._save_case(case)
        await self.emit("case.updated", case, {"oldLifecycle": old, "newLifecycle": lifecycle})

    async def register_payment(self, case: dict, amount: float, date: str | None = None) -> dict:
        now = _iso()
        payment = {"id": str(uuid.uuid4()), "dateCreated": now, "dateUpdated": None, "date": date or now,
                   "grossAmount": round(amount, 2), "recipient": "CollectionPartner", "method": "BankTransfer",
                   "currency": case.get("currency"),
                   "invoice": {"status": "Paid", "reference": case.get("creditorReference") or "",
                               "invoiceId": str(uuid.uuid4())}}
        self.conn.execute("INSERT INTO payments (id, case_id, body) VALUES (?, ?, ?)",
                          (payment["id"], case["id"], json.dumps(payment)))
        case["remainder"] = round(max(float(case.get("remainder") or 0) - amount, 0.0), 2)
        case["dateUpdated"] = now
        self._save_case(case)
        await self.emit("payment.created", case, {"payment": payment})
        return payment

    async def delete_payment(self, case: dict, payment_id: str) -> None:
        row = self.conn.execute("SELECT body FROM payments WHERE id = ? AND deleted = 0", (payment_id,)).fetchone()
        if row is None:
            return
        payment = json.loads(row["body"])
        self.conn.execute("UPDATE payments SET deleted = 1 WHERE id = ?", (payment_id,))
        case["remainder"] = round(float(case.get("remainder") or 0) + payment["grossAmount"], 2)
        case["dateUpdated"] = _iso()
        self._save_case(case)
        await self.emit("payment.deleted", case, {"payment": payment})

    async def close_case(self, case: dict, close_code: str | None = None) -> None:
        if case.get("lifecycle") == "Closed":
            return
        code = close_code or ("Paid" if float(case.get("remainder") or 0) <= 0 else "PreLegalExhaustedNoPayment")
        await self.set_lifecycle(case, "Closed")
        case["closeCode"] = code
        case["dateFinished"] = _iso()
        self._save_case(case)
        await self.emit("case.closed", case, {"closeCode": code, "closeComment": None})

    async def _advance(self, request: httpx.Request, case_id: str) -> httpx.Response:
        case = self._case(case_id)
        if case is None:
            return self._not_found(f"Case '{case_id}'")
        if not case.get("isTestCase"):
            return self._bad("Id", "Only test cases can be advanced.")
        body = await self._body(request)
        to = body.get("to") if isinstance(body, dict) else None
        if to not in ("Active", "Closed:Paid", "Closed:NoPayment"):
            return self._bad("To", "To must be one of: Active, Closed:Paid, Closed:NoPayment.")
        state = ("Closed:" + ("Paid" if case.get("closeCode") == "Paid" else "NoPayment"
                              if case.get("closeCode") == "PreLegalExhaustedNoPayment" else "")).rstrip(":") \
            if case.get("lifecycle") == "Closed" else case.get("lifecycle")
        if to == "Active":
            if case.get("lifecycle") not in ("Active", "Closed"):
                await self.set_lifecycle(case, "Active")
                return self._json(200, {"advanced": True, "state": "Active"})
            return self._json(200, {"advanced": False, "state": state})
        if state == to:
            return self._json(200, {"advanced": False, "state": state})
        if case.get("lifecycle") == "Closed":
            return self._bad("To", f"The case is already closed as {state}.")
        if to == "Closed:Paid":
            try:
                amount = float(body.get("amount"))
            except (TypeError, ValueError):
                return self._bad("Amount", "Amount is required when To is Closed:Paid.")
            if amount <= 0:
                return self._bad("Amount", "Amount must be positive.")
            await self.set_lifecycle(case, "Active")
            await self.register_payment(case, amount)
            await self.close_case(case, "Paid")
        else:
            await self.set_lifecycle(case, "Active")
            await self.close_case(case, "PreLegalExhaustedNoPayment")
        return self._json(200, {"advanced": True, "state": to})
