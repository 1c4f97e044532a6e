"""Debitura's side of a case: webhook subscriptions, signed webhook events, and polling where no public endpoint is
possible.

- `sync`: make Debitura's subscriptions match `destination.webhooks` (GET/POST/PATCH/DELETE /webhooks). The signing
  secret Debitura shows once, on creation, is committed to the state store (encrypted like OAuth tokens) before
  anything else happens.
- `Receiver`: `POST /v1/webhooks/debitura` on `runner serve`. A request is accepted only with a valid
  `X-Debitura-Signature: t=<unix time>,v1=<HMAC-SHA256>` over `{t}.{raw body}`, keyed with the base64-decoded
  secret, compared in constant time, and `t` within five minutes of now. Each event is recorded once by its id: a
  redelivery or replay is acknowledged (200) and not recorded again.
- `poll`: for open cases, `GET /cases/{id}` within the destination's rate limit; what changed since the last poll is
  recorded as the same events (`case.created`, `case.updated`, `payment.created`, `payment.deleted`, `case.closed`).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from runner.errors import ConfigError, DestinationError, Problem, ProviderError, RunnerError
from runner.inbound.body import read_bounded
from runner.spec.config import WEBHOOK_EVENTS, Config

ROUTE = "/v1/webhooks/debitura"
SIGNATURE_HEADER = "X-Debitura-Signature"
TOLERANCE_S = 300          # Debitura: "verify timestamp is within 5 minutes to prevent replay attacks"
MAX_BODY = 256 * 1024      # an event is one case's summary; far larger bodies are refused unread
MAX_ID = 200               # characters of an event id kept
MAX_DATA = 64 * 1024       # bytes of an event's data object kept


# --- signatures --------------------------------------------------------------------------------------------

def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Debitura-Signature value for this body at this time (what Debitura sends; tests and the simulator)."""
    mac = hmac.new(base64.b64decode(secret), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def parse_signature(header: str) -> tuple[int | None, list[str]]:
    """(t, [v1 values]) of a `t=...,v1=...` header; t None when absent or not a number."""
    t, sigs = None, []
    for part in header.split(",")[:10]:
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit() and len(value) <= 12:
            t = int(value)
        elif name == "v1" and value:
            sigs.append(value.strip()[:200])
    return t, sigs


def verify(secret: str, header: str | None, body: bytes, now: float | None = None) -> str | None:
    """None when the signature is good and recent; else the reason it is refused (never the secret)."""
    if not header:
        return f"no {SIGNATURE_HEADER} header"
    t, sigs = parse_signature(header)
    if t is None or not sigs:
        return f"the {SIGNATURE_HEADER} header is not of the form t=<unix time>,v1=<signature>"
    now = time.time() if now is None else now
    if abs(now - t) > TOLERANCE_S:
        return (f"the signature's timestamp is {int(abs(now - t))} s {'old' if t < now else 'in the future'} "
                f"(at most {TOLERANCE_S} s are accepted): an old delivery replayed, or this machine's clock is off")
    try:
        key = base64.b64decode(secret, validate=True)
    except (binascii.Error, ValueError):
        return "the configured webhook secret is not base64 (as Debitura issues it): it cannot check signatures"
    digest = hmac.new(key, f"{t}.".encode() + body, hashlib.sha256).digest()
    # The OpenAPI document does not say how v1 is encoded: hex (as many signing schemes do) and base64 both match.
    expected = (digest.hex().encode(), base64.b64encode(digest))
    good = False
    for sig in sigs:
        raw = sig.encode("ascii", "replace")
        for e in expected:
            good |= hmac.compare_digest(raw.lower() if e is expected[0] else raw, e)
    return None if good else "the signature does not match the body (a wrong secret, or a body changed on the way)"


# --- events ------------------------------------------------------------------------------------------------

def _case_fields(data: dict) -> tuple[str | None, str | None]:
    case_id = data.get("caseId") or data.get("id")
    ref = data.get("reference") or data.get("caseReference")
    return (str(case_id)[:MAX_ID] if case_id else None), (str(ref)[:MAX_ID] if ref else None)


def _bounded(data: dict) -> dict:
    text = json.dumps(data, sort_keys=True, default=str)
    if len(text.encode()) <= MAX_DATA:
        return data
    keep = {k: v for k, v in data.items() if not isinstance(v, (dict, list)) and len(str(v)) <= 1000}
    keep["truncated"] = True
    return keep


def record(store, event: dict, via: str) -> bool:
    """Record one event (a parsed webhook body, or one made by polling). True when new."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    case_id, ref = _case_fields(data)
    return store.record_case_event(str(event["id"])[:MAX_ID], event["event"], case_id, ref,
                                   str(event.get("timestamp") or "")[:40] or None, via, _bounded(data))


def event_problem(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    if not isinstance(body.get("id"), str) or not body["id"].strip():
        return "the event has no id"
    if not isinstance(body.get("event"), str):
        return "the event has no type (`event`)"
    if body.get("data") is not None and not isinstance(body.get("data"), dict):
        return "the event's data is not an object"
    return None


# --- receiving -------------------------------------------------------------------------------------------------

class Receiver:
    """`POST /v1/webhooks/debitura`: no API key; the signature is the authentication."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.hooks = cfg.destination.webhooks
        self.store = None
        self._blob: str | None = None
        self._secret: str | None = None
        self.refused = 0
        self.accepted = 0
        self.duplicates = 0

    def startup(self, store) -> None:
        self.store = store
        if self.hooks is not None and self.hooks.secret:
            from runner import redact

            redact.register(self.hooks.secret)

    def secret(self) -> str | None:
        """The configured secret, else the stored one: re-read per request, decrypted only when it changed
        (`runner webhooks sync` may have rotated it while the server runs)."""
        if self.hooks is not None and self.hooks.secret:
            return self.hooks.secret
        blob = self.store.webhook_secret_blob()
        if blob != self._blob:
            from runner import redact
            from runner.state import crypto

            self._secret = crypto.decrypt(blob) if blob else None
            self._blob = blob
            if self._secret:
                redact.register(self._secret)
        return self._secret

    @staticmethod
    def _json(status: int, body: dict):
        from starlette.responses import JSONResponse

        return JSONResponse(body, status_code=status)

    def _refuse(self, status: int, reason: str, request, note: bool = False) -> Any:
        self.refused += 1
        client = request.client.host if request.client else "-"
        logger.warning("refused a Debitura webhook from {}: {}", client, reason)
        if note and self.store is not None:  # signed, so meant as Debitura's: for doctor and status
            self.store.note_webhook_refused(reason)
        return self._json(status, {"error": "refused", "message": reason})

    async def handle(self, request):
        raw = await read_bounded(request, MAX_BODY)
        if raw is None:
            return self._refuse(413, f"the body is over {MAX_BODY // 1024} KB", request)
        try:
            secret = self.secret()
        except RunnerError as exc:  # encrypted in the store, and RUNNER_SECRET_KEY missing or wrong
            return self._refuse(503, f"the stored webhook secret cannot be read: {exc.message}; {exc.fix}", request,
                                note=True)
        if not secret:
            return self._refuse(503, "no webhook secret: run `runner webhooks sync CONFIG` (it keeps the secret "
                                     "Debitura returns), or set destination.webhooks.secret", request, note=True)
        header = request.headers.get(SIGNATURE_HEADER)
        why = verify(secret, header, raw)
        if why is not None:
            return self._refuse(401, why, request, note=bool(header))
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return self._refuse(400, "the body is not JSON (or nests too deeply)", request)
        why = event_problem(body)
        if why is not None:
            return self._refuse(400, why, request)
        if body["event"] not in WEBHOOK_EVENTS:
            logger.info("ignored a Debitura webhook of a kind the runner does not record: {}", body["event"][:60])
            return self._json(200, {"received": True, "recorded": False})
        new = record(self.store, body, "webhook")
        if new:
            self.accepted += 1
            logger.info("recorded Debitura event {} ({})", body["id"][:MAX_ID], body["event"])
        else:
            self.duplicates += 1
            replay = (request.headers.get("X-Debitura-Replay") or "").lower() == "true"
            logger.warning("Debitura event {} ({}) was recorded before: acknowledged, not recorded again{}",
                           body["id"][:MAX_ID], body["event"], " (a replay)" if replay else "")
        return self._json(200, {"received": True, "recorded": new})


def configured(cfg: Config) -> bool:
    """Does this config receive webhooks (a push-mode `destination.webhooks`)?"""
    hooks = cfg.destination.webhooks
    return hooks is not None and hooks.mode == "push"


def create_app(cfg: Config):
    """`runner serve --webhooks-only`: only /healthz and the webhook route (no inbound connection needed)."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from runner.engine.destinations import ledger_id
    from runner.state import open_store

    receiver = Receiver(cfg)

    @asynccontextmanager
    async def lifespan(app):
        store = open_store(cfg, destination=ledger_id(cfg.destination))
        receiver.startup(store)
        try:
            yield
        finally:
            store.close()

    async def healthz(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/healthz", healthz, methods=["GET"]),
                            Route(ROUTE, receiver.handle, methods=["POST"])], lifespan=lifespan)
    app.state.receiver = receiver
    return app


# --- the subscription ----------------------------------------------------------------------------------------

@dataclass
class SyncResult:
    actions: list[str] = field(default_factory=list)
    subscription_id: str | None = None
    changed: bool = False


def _http(cfg: Config, clients):
    from runner.engine.destinations import DebituraDestination

    if cfg.destination.type != "debitura":
        raise ConfigError(Problem(f"{cfg.file}: webhooks come from Debitura, but the destination is a "
                                  f"{cfg.destination.type} file", fix="remove destination.webhooks"))
    return DebituraDestination(cfg.destination, clients).http


def _call_failed(what: str, exc: ProviderError) -> DestinationError:
    return DestinationError(f"Debitura refused to {what}: {exc.message}", status=exc.status,
                            fix=exc.fix or "check the destination's API key and the webhooks section of the config")


async def sync(cfg: Config, store, clients, dry_run: bool = False) -> SyncResult:
    """Make Debitura's subscription for this destination match `destination.webhooks`; a second run changes
    nothing. Subscriptions this runner did not make (other URLs) are left alone."""
    hooks = cfg.destination.webhooks
    http = _http(cfg, clients)
    res = SyncResult()
    try:
        listed = (await http.request("GET", "/webhooks")).json("Debitura's list of webhooks")
    except ProviderError as exc:
        raise _call_failed("list the webhook subscriptions", exc) from None
    listed = [s for s in listed if isinstance(s, dict)] if isinstance(listed, list) else []
    stored = store.webhook_subscription()
    by_id = {str(s.get("id")): s for s in listed}
    want = hooks is not None and hooks.mode == "push"
    ours = by_id.get(stored["id"]) if stored else None
    if ours is None and want:  # made before, but its id was lost (a new state store): the one at our URL
        ours = next((s for s in listed if s.get("url") == hooks.url), None)
    extra = [s for s in listed if want and s is not ours and s.get("url") == hooks.url]

    async def delete(sub: dict, why: str) -> None:
        res.actions.append(f"delete subscription {sub.get('id')} ({sub.get('url')}): {why}")
        res.changed = True
        if not dry_run:
            try:
                await http.request("DELETE", f"/webhooks/{sub['id']}", ok=(404,))
            except ProviderError as exc:
                raise _call_failed("delete a webhook subscription", exc) from None

    if not want:
        if ours is not None:
            await delete(ours, "the config has no push webhooks" if hooks is None else "the config polls instead")
        if stored and not dry_run:
            store.delete_webhook_subscription()
        if not res.actions:
            res.actions.append("nothing to change (no webhooks configured, none registered by this runner)")
        return res
    for sub in extra:
        await delete(sub, "a second subscription to the same URL would deliver every event twice")
    events = sorted(hooks.events)
    if ours is not None and sorted(ours.get("events") or []) != events:
        # Debitura: "event types cannot be changed after creation. To update event types, delete and recreate".
        await delete(ours, f"its events ({', '.join(sorted(ours.get('events') or []))}) differ from the config's")
        ours = None
    have_secret = bool(hooks.secret) or bool(stored and stored.get("secret") and ours is not None
                                              and str(ours.get("id")) == stored["id"])
    if ours is None:
        res.actions.append(f"create subscription → {hooks.url} for {', '.join(events)}"
                           + (" (test mode)" if hooks.test_mode else ""))
        res.changed = True
        if not dry_run:
            try:
                made = (await http.request("POST", "/webhooks", json={"url": hooks.url, "events": events,
                                                                      "isTestMode": hooks.test_mode})).json(
                    "Debitura's new webhook subscription")
            except ProviderError as exc:
                raise _call_failed(f"create a webhook subscription to {hooks.url}", exc) from None
            store.save_webhook_subscription(str(made["id"]), hooks.url, events, hooks.test_mode, made.get("secret"))
            res.subscription_id = str(made["id"])
        return res
    patch: dict[str, Any] = {}
    if ours.get("url") != hooks.url:
        patch["url"] = hooks.url
    if ours.get("isActive") is False:
        patch["isActive"] = True
    if bool(ours.get("isTestMode")) != hooks.test_mode:
        patch["isTestMode"] = hooks.test_mode
    if not have_secret:  # shown once, and not kept: only a new one can be had
        patch["regenerateSecret"] = True
    res.subscription_id = str(ours["id"])
    if patch:
        shown = ", ".join(f"{k} → {v}" for k, v in patch.items() if k != "regenerateSecret")
        res.actions.append(f"update subscription {ours['id']}: " + (shown or "")
                           + ((", " if shown else "") + "a new signing secret (the runner has none)"
                              if "regenerateSecret" in patch else "")
                           + (f" ({ours.get('disabledReason')})" if ours.get("disabledReason") else ""))
        res.changed = True
        if not dry_run:
            try:
                got = (await http.request("PATCH", f"/webhooks/{ours['id']}", json=patch)).json(
                    "Debitura's updated webhook subscription")
            except ProviderError as exc:
                raise _call_failed(f"update webhook subscription {ours['id']}", exc) from None
            store.save_webhook_subscription(str(ours["id"]), hooks.url, events, hooks.test_mode,
                                            got.get("secret") if isinstance(got, dict) else None)
    else:
        res.actions.append(f"nothing to change: subscription {ours['id']} → {hooks.url} for {', '.join(events)}")
        if not dry_run and (stored is None or stored["id"] != str(ours["id"])):
            store.save_webhook_subscription(str(ours["id"]), hooks.url, events, hooks.test_mode, None)
    return res


# --- polling -------------------------------------------------------------------------------------------------

@dataclass
class PollResult:
    cases: int = 0
    requests: int = 0
    recorded: int = 0
    left: int = 0           # open cases not read this time (the request budget ran out)
    errors: list[str] = field(default_factory=list)


def _money(v) -> float | None:
    try:
        return round(float(v), 2)
    except (TypeError, ValueError):
        return None


def _case_data(case: dict) -> dict:
    return {"caseId": case.get("id"), "reference": case.get("reference"),
            "creditorReference": case.get("creditorReference"), "status": case.get("lifecycle"),
            "amount": case.get("grossAmount"), "remainder": case.get("remainder"), "currency": case.get("currency")}


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def poll(cfg: Config, store, clients, max_requests: int | None = None) -> PollResult:
    """Read open cases (`GET /cases/{id}`, and `GET /cases/{id}/payments` when the amount left changed) and record
    what changed as events. Requests go through the destination's rate limiter and stop at `max_requests`."""
    hooks = cfg.destination.webhooks
    budget = max_requests or (hooks.poll_max_requests if hooks else 500)
    http = _http(cfg, clients)
    res = PollResult()
    open_cases = store.open_cases(budget + 1000)
    for i, (case_id, _ref) in enumerate(open_cases):
        if res.requests >= budget:
            res.left = len(open_cases) - i
            break
        try:
            resp = await http.request("GET", f"/cases/{case_id}", ok=(404,))
            res.requests += 1
            if resp.status == 404:
                res.errors.append(f"case {case_id}: Debitura has no such case (deleted?)")
                store.save_case_poll_state(case_id, {"missing": True})
                continue
            case = resp.json("Debitura's case")
        except ProviderError as exc:
            res.errors.append(f"case {case_id}: {exc.message}")
            if exc.status in (401, 403):
                break
            continue
        res.cases += 1
        before = store.case_poll_state(case_id) or {}
        data = _case_data(case)
        when = case.get("dateUpdated") or _now_iso()
        events: list[dict] = []
        if not before:
            events.append({"id": f"poll:{case_id}:created", "event": "case.created",
                           "timestamp": case.get("dateCreated") or case.get("created"), "data": data})
        lifecycle, old = case.get("lifecycle"), before.get("lifecycle")
        if before and lifecycle != old:
            events.append({"id": f"poll:{case_id}:lifecycle:{old}:{lifecycle}:{when}", "event": "case.updated",
                           "timestamp": when, "data": {**data, "oldLifecycle": old, "newLifecycle": lifecycle}})
        payments = list(before.get("payments") or [])
        remainder = seen_remainder = _money(case.get("remainder"))
        if remainder != before.get("remainder") and (before or remainder != _money(case.get("grossAmount"))):
            seen_remainder = before.get("remainder")  # until the payments are read: the next poll reads them
        if seen_remainder != remainder and res.requests < budget:
            try:
                listed = (await http.request("GET", f"/cases/{case_id}/payments")).json("Debitura's payments")
                res.requests += 1
            except ProviderError as exc:
                res.errors.append(f"case {case_id} payments: {exc.message}")
                listed = None
            if isinstance(listed, list):
                now_ids = []
                for p in listed:
                    if not isinstance(p, dict) or not p.get("id"):
                        continue
                    now_ids.append(str(p["id"]))
                    if str(p["id"]) not in payments:
                        events.append({"id": f"poll:payment:{p['id']}", "event": "payment.created",
                                       "timestamp": p.get("dateCreated") or p.get("date") or when,
                                       "data": {**data, "payment": p}})
                for gone in payments:
                    if gone not in now_ids:
                        events.append({"id": f"poll:payment-deleted:{gone}", "event": "payment.deleted",
                                       "timestamp": when, "data": {**data, "payment": {"id": gone}}})
                payments = now_ids
                seen_remainder = remainder
        if lifecycle == "Closed" and seen_remainder == remainder:  # its payments are read first
            events.append({"id": f"poll:{case_id}:closed", "event": "case.closed",
                           "timestamp": case.get("dateFinished") or when,
                           "data": {**data, "closeCode": case.get("closeCode")}})
        for ev in events:
            res.recorded += record(store, ev, "poll")
        store.save_case_poll_state(case_id, {"lifecycle": lifecycle, "remainder": seen_remainder,
                                             "payments": payments})
    return res
