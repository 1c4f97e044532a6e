"""Destinations: where eligible invoices go. `debitura` creates collection cases through the Customer API
(POST /cases); `jsonl` appends the mapped cases to a file for people who want them without sending them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import orjson

from runner.spec import secrets
from runner.spec.config import Destination as DestinationConfig
from runner.errors import DestinationError, ProviderError
from runner.net.http import Clients, Http, Policy, error_message, limiter_for

DEBITURA_URLS = {
    "production": "https://customer-api.debitura.com",
    "test": "https://testcustomer-api.debitura.com",
    "sandbox": "sandbox://debitura",
}
# Per API key: 2,000 a minute, 20,000 an hour, 100,000 a day (docs.debitura.com, rate limiting).
DEBITURA_RATE = {"requests_per_minute": 2000, "requests_per_hour": 20000, "requests_per_day": 100000}


@dataclass
class Delivery:
    case_id: str | None
    case_reference: str | None
    existing: bool = False  # the destination already had this case (replayed or found by reference)
    replayed: bool = False  # Debitura answered with a case made before this request: an idempotent replay


# Debitura replays an earlier answer to the same Idempotency-Key verbatim: a case created more than this long
# before the request was made by an earlier request (another state store's run, or a run that crashed before
# recording it). The margin covers the clocks of the runner's machine and Debitura's disagreeing.
REPLAY_SLACK_S = 120.0


def _replayed(data: dict, sent: float) -> bool:
    from datetime import datetime

    created = data.get("dateCreated")
    if not isinstance(created, str):
        return False
    try:
        moment = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return False
    if moment.tzinfo is None:
        return False
    return moment.timestamp() < sent - REPLAY_SLACK_S


def ledger_id(cfg: DestinationConfig) -> str:
    """Which destination a ledger row is about: a case in Debitura's test environment, or one written to a
    file, does not make the invoice a duplicate for production."""
    if cfg.type == "jsonl":
        return f"jsonl:{cfg.path}"
    base = cfg.base_url or DEBITURA_URLS[cfg.environment]
    return f"debitura:{cfg.environment}:{base}" + (":isTest" if cfg.is_test else "")


def idempotency_key(account_key: str, invoice_id: str) -> str:
    """Derived, so every retry and every rerun of the same invoice sends the same key."""
    return idempotency_keys(account_key, (invoice_id,))[0]


def idempotency_keys(account_key: str, invoice_ids) -> list[str]:
    """idempotency_key of each of these invoices of one account (a page's: the account's part encoded once)."""
    head, sha256 = f"{account_key}\x1f".encode(), hashlib.sha256
    return ["runner-" + sha256(head + i.encode()).hexdigest()[:40] for i in invoice_ids]


def _json_default(obj):
    if isinstance(obj, Decimal):
        return float(obj)
    raise TypeError


def dumps(obj) -> bytes:
    return orjson.dumps(obj, default=_json_default)


def case_body(invoice: dict, cfg: DestinationConfig) -> dict:
    """The POST /cases body for one canonical invoice (CreateCollectionCaseRequestApiViewModel)."""
    debtor = invoice["debtor"]
    addr = debtor.get("address") or {}
    d = {}
    # Built field by field, leaving out what is missing: this runs once per invoice delivered.
    for field, value in (("type", debtor["type"]), ("name", debtor["name"]),
                         ("address", addr.get("street")), ("zipCode", addr.get("postal_code")),
                         ("city", addr.get("city")), ("countryAlpha2", addr.get("country"))):
        if value is not None:
            d[field] = value
    # Debitura's DebtorDto: the contact person is "required for companies, not used for persons".
    if debtor.get("contact_person") and debtor["type"] == "Company":
        d["contactPerson"] = debtor["contact_person"]
    if debtor.get("email"):
        d["email"] = debtor["email"]
    if debtor.get("phone"):
        d["phone"] = debtor["phone"]
    if addr.get("state"):
        d["state"] = addr["state"]
        if addr.get("country") == "US":
            d["stateAlpha2"] = addr["state"]
    number = invoice["number"]
    body = {
        "currencyCode": invoice["currency"],
        "amountToRecover": float(invoice["amount"]),
        "date": invoice["issue_date"] + "T00:00:00Z",
        "dueDate": invoice["due_date"] + "T00:00:00Z",
        "creditorReference": number,
        "claimDescription": f"Unpaid invoice {number} ({invoice['source']['integration']} {invoice['external_id']})",
        "debtor": d,
        "isTest": bool(cfg.is_test),
    }
    if cfg.tag:
        body["tag"] = cfg.tag
    if cfg.allow_pending_contracts:
        body["allowPendingContracts"] = True
    return body


class DebituraDestination:
    name = "debitura"

    def __init__(self, cfg: DestinationConfig, clients: Clients):
        self.cfg = cfg
        base = self.base = cfg.base_url or DEBITURA_URLS[cfg.environment]
        key = cfg.api_key or ""
        self.http = Http(clients, base, headers={"XApiKey": key, "Accept": "application/json"},
                         policy=Policy(attempts=6, backoff_s=0.5, max_backoff_s=60),
                         limiter=limiter_for("debitura:" + secrets.fingerprint(key), DEBITURA_RATE),
                         label=f"Debitura ({cfg.environment})")
        self.label = self.http.label

    def describe(self) -> str:
        where = "built-in simulator" if self.base.startswith("sandbox://") else self.base
        return f"Debitura Customer API, {self.cfg.environment} ({where})" + (
            ", test cases (isTest)" if self.cfg.is_test else "")

    def prepare(self, pending_keys: set[str]) -> None:
        pass

    async def check(self) -> dict:
        """GET /me: proves the key works in this environment; returns the creditor profile."""
        try:
            resp = await self.http.request("GET", "/me")
        except ProviderError as exc:
            raise self._fatal(exc) from None
        try:
            return resp.json("Debitura's /me answer")
        except ProviderError as exc:  # a proxy's HTML page or an empty answer: no delivery can succeed
            raise DestinationError(exc.message, fix=exc.fix, status=exc.status, fatal=True) from None

    def _fatal(self, exc: ProviderError) -> DestinationError:
        if exc.status == 401:
            other = "test" if self.cfg.environment == "production" else "production"
            return DestinationError(
                f"Debitura ({self.cfg.environment}) refused the API key (HTTP 401): {exc.message.split(': ', 1)[-1]}",
                fix=f"check that the key is active (app.debitura.com → API keys) and that it belongs to the "
                    f"{self.cfg.environment} environment, not {other}; then update the secret it is read from",
                status=401, fatal=True)
        return DestinationError(str(exc.message), fix=exc.fix, status=exc.status, fatal=exc.status == 403)

    def _wire_key(self, key: str) -> str:
        """The Idempotency-Key sent for this invoice. Keys are derived from the source account and invoice only,
        and Debitura remembers a key with the body it first came with: a test case (isTest) and the production
        case of the same invoice must not share one, or the production case would be refused as an
        IdempotencyConflict for as long as Debitura keeps the test request, even after the test case is deleted."""
        return key + "-test" if self.cfg.is_test else key

    def _matches_mode(self, case: dict) -> bool:
        """Is this case of the kind this destination creates (a test case for is_test, else a real one)?"""
        return bool(case.get("isTestCase")) == bool(self.cfg.is_test)

    def _held_by_other_mode(self, case: dict, invoice: dict, status: int) -> DestinationError:
        """Debitura documents creditorReference as unique per creditor ("enforced at case creation — a duplicate
        value returns a DuplicateReference validation error", docs.debitura.com/developer-concepts/case-identifiers)
        and no test-mode scope for it: a test case (isTest) and a production case of one creditor share the
        references. So a case of the other kind holding the reference is neither this invoice's case nor a
        reason to record the invoice as imported: the invoice fails, with what to do."""
        number, cid = invoice["number"], case.get("id")
        shown = f"case {case.get('reference') or cid}" + (f", id {cid}" if cid and case.get("reference") else "")
        if case.get("isTestCase"):
            return DestinationError(
                f"Debitura already has a TEST case with creditor reference {number!r} ({shown}), made by a test "
                f"run; Debitura keeps creditor references unique across test and production cases, so no "
                f"production case was created and this invoice is not imported",
                status=status, details={"case_id": cid, "is_test_case": True},
                fix=f"delete the test case in Debitura (DELETE /test/cases/{cid} in the Customer API, or "
                    f"DELETE /test/cases?tag=<tag> for every test case of a test run's tag); the next run "
                    f"imports this invoice")
        return DestinationError(
            f"Debitura already has a production case with creditor reference {number!r} ({shown}); a test case "
            f"cannot use the same reference, so no test case was created",
            status=status, details={"case_id": cid, "is_test_case": False},
            fix="this invoice is already in collection for real: test with invoices that were never imported to "
                "production, or give test invoices numbers of their own")

    async def deliver(self, invoice: dict, key: str) -> Delivery:
        body = case_body(invoice, self.cfg)
        sent = time.time()
        try:
            resp = await self.http.request("POST", "/cases", content=dumps(body),
                                           headers={"Idempotency-Key": self._wire_key(key),
                                                    "Content-Type": "application/json"},
                                           ok=(400, 409, 422))
        except ProviderError as exc:
            if exc.status in (401, 403):
                raise self._fatal(exc) from None
            raise DestinationError(exc.message, fix=exc.fix, status=exc.status) from None
        data = _safe_json(resp.content)
        if resp.status == 200 or resp.status == 201:
            if isinstance(data, dict) and data.get("id"):
                return Delivery(case_id=str(data["id"]), case_reference=data.get("reference"),
                                replayed=_replayed(data, sent))
            # Accepted, but the answer does not say which case: find it rather than record a case "None".
            existing = await self.find(invoice["number"])
            if existing is not None and existing.get("id") and self._matches_mode(existing):
                return Delivery(case_id=str(existing["id"]), case_reference=existing.get("reference"))
            raise DestinationError("Debitura accepted the case but its answer names no case id; the invoice stays "
                                   "pending and is sent again (with the same idempotency key) by the next run",
                                   status=resp.status)
        kinds = _business_types(data)
        if "IdempotencyConflict" in kinds or "DuplicateReference" in kinds or _mentions_duplicate(data):
            existing = await self.find(invoice["number"])
            # A test case never stands for a production one, nor the reverse (whatever else matches).
            if existing is not None and not self._matches_mode(existing):
                raise self._held_by_other_mode(existing, invoice, resp.status)
            # Our own idempotency key (derived from this account and invoice) proves the case is this invoice's;
            # a reference alone does not: another account may use the same invoice number.
            ours = "IdempotencyConflict" in kinds
            if existing is not None and (ours or _same_invoice(existing, invoice)):
                return Delivery(case_id=existing.get("id"), case_reference=existing.get("reference"), existing=True)
            if existing is not None:
                raise DestinationError(
                    f"Debitura already has a case with creditor reference {invoice['number']!r} for another invoice "
                    f"(case {existing.get('reference') or existing.get('id')}); this invoice was not imported",
                    status=resp.status, fix="two source accounts use the same invoice number: give one of them a "
                                            "prefix in the accounting system, or import it by hand")
        raise DestinationError(f"Debitura refused the case (HTTP {resp.status}): {_describe_errors(data, resp)}",
                               status=resp.status, details={"response": data},
                               fix="fix the invoice or debtor data named above in the accounting system; "
                                   "the invoice is retried on the next run")

    async def find(self, creditor_reference: str) -> dict | None:
        from urllib.parse import quote

        try:
            resp = await self.http.request("GET", "/cases/by-creditor-reference/" + quote(creditor_reference, safe=""),
                                           ok=(404,))
        except ProviderError:
            return None
        if resp.status == 404:
            return None
        data = _safe_json(resp.content)
        return data if isinstance(data, dict) else None

    async def close(self) -> None:
        pass

    # --- after the case exists: chats and files (runner/engine/lifecycle.py, runner/engine/documents.py) ---
    _author: dict | None = None

    async def _call(self, method: str, path: str, what: str, **kw):
        try:
            resp = await self.http.request(method, path, **kw)
        except ProviderError as exc:
            if exc.status in (401, 403):
                raise self._fatal(exc) from None
            raise DestinationError(f"{what}: {exc.message}", fix=exc.fix, status=exc.status) from None
        return _safe_json(resp.content)

    async def chat_author(self) -> dict:
        """Who the runner's chat messages are from: `chat_user_email` / `chat_user_id` in the config, else the
        first team member GET /users lists (the body's userEmail or userId)."""
        if self._author is None:
            if self.cfg.chat_user_email:
                self._author = {"userEmail": self.cfg.chat_user_email}
            elif self.cfg.chat_user_id:
                self._author = {"userId": self.cfg.chat_user_id}
            else:
                users = await self.team_members()
                if not users:
                    raise DestinationError("Debitura lists no team member (GET /users) to send the case's chat "
                                           "message as", fix="add a user to your Debitura team, or set "
                                                             "`chat_user_email:` under destination in the config")
                first = users[0]
                self._author = {"userEmail": first["email"]} if first.get("email") else {"userId": first.get("id")}
        return self._author

    async def team_members(self) -> list[dict]:
        """GET /users: the creditor's team (id, name, email), first page of 100."""
        data = await self._call("GET", "/users", "Debitura's team members (GET /users)",
                                params={"Page": "1", "PageSize": "100"})
        return [u for u in (data.get("users") or []) if isinstance(u, dict)] if isinstance(data, dict) else []

    async def chats(self, case_id: str) -> list[dict]:
        """GET /cases/{id}/chats: the case's chat messages."""
        data = await self._call("GET", f"/cases/{_seg(case_id)}/chats", f"the chat of case {case_id}")
        return [c for c in data if isinstance(c, dict)] if isinstance(data, list) else []

    async def post_chat(self, case_id: str, message: str) -> dict:
        """POST /cases/{id}/chats: a message on the case; the collection partner is notified."""
        body = {"message": message, **(await self.chat_author())}
        data = await self._call("POST", f"/cases/{_seg(case_id)}/chats", f"the chat message on case {case_id}",
                                content=dumps(body), headers={"Content-Type": "application/json"})
        return data if isinstance(data, dict) else {}

    async def files(self, case_id: str) -> list[dict]:
        """GET /cases/{id}/files."""
        data = await self._call("GET", f"/cases/{_seg(case_id)}/files", f"the files of case {case_id}")
        return [f for f in data if isinstance(f, dict)] if isinstance(data, list) else []

    async def upload_file(self, case_id: str, file_name: str, content: bytes, content_type: str,
                          document_type: str = "OriginalInvoice", description: str | None = None) -> dict:
        """POST /cases/{id}/files (multipart/form-data: File, DocumentType, Description)."""
        fields = [("DocumentType", None, None, document_type.encode())]
        if description:
            fields.append(("Description", None, None, description.encode()))
        fields.append(("File", file_name, content_type, content))
        body, ctype = multipart(fields)
        data = await self._call("POST", f"/cases/{_seg(case_id)}/files", f"the upload to case {case_id}",
                                content=body, headers={"Content-Type": ctype})
        return data if isinstance(data, dict) else {}


def _seg(value: str) -> str:
    from urllib.parse import quote

    return quote(str(value), safe="")


def multipart(fields: list[tuple[str, str | None, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578) of (name, file name or None, content type or None, bytes)."""
    import secrets as _secrets

    boundary = "runner-" + _secrets.token_hex(16)
    out = bytearray()
    for name, filename, ctype, data in fields:
        out += f"--{boundary}\r\n".encode()
        disp = f'form-data; name="{name}"'
        if filename is not None:
            disp += '; filename="' + filename.replace('"', "").replace("\r", "").replace("\n", "") + '"'
        out += f"Content-Disposition: {disp}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def _same_invoice(case: dict, invoice: dict) -> bool:
    """Is the case Debitura already has under this creditor reference this very invoice? Invoice numbers are
    only unique within one source account, so a second account's "1001" must not be taken for the first's."""
    desc = case.get("claimDescription")
    if isinstance(desc, str) and desc:
        return f"{invoice['source']['integration']} {invoice['external_id']})" in desc
    name = (case.get("debtor") or {}).get("name") if isinstance(case.get("debtor"), dict) else None
    return not name or name.strip().casefold() == invoice["debtor"]["name"].strip().casefold()


def _safe_json(content: bytes):
    try:
        return orjson.loads(content)
    except Exception:
        return {}


def _business_types(data) -> set[str]:
    if not isinstance(data, dict):
        return set()
    errs = data.get("businessErrors") or []
    return {e.get("type") for e in errs if isinstance(e, dict)}


def _mentions_duplicate(data) -> bool:
    return "DuplicateReference" in orjson.dumps(data).decode() if data else False


def _describe_errors(data, resp) -> str:
    """Parse both error shapes Debitura documents (redacted: an answer may echo what it was sent)."""
    from runner.redact import redact

    return redact(_describe_errors_raw(data, resp))


def _describe_errors_raw(data, resp) -> str:
    """Parse both error shapes Debitura documents: ASP.NET field dictionaries and ApiErrorResponseDto."""
    if isinstance(data, dict):
        parts = []
        errors = data.get("errors")
        if isinstance(errors, dict):
            for fld, msgs in errors.items():
                parts.append(f"{fld}: {'; '.join(msgs) if isinstance(msgs, list) else msgs}")
        for e in data.get("businessErrors") or []:
            if isinstance(e, dict):
                parts.append(f"{e.get('type')}: {e.get('message')}")
        if not parts and data.get("message"):
            parts.append(str(data["message"]))
        if parts:
            return "; ".join(parts)
    return error_message(resp)


class JsonlDestination:
    """Appends one JSON object per case. Idempotent across crashes: keys already in the file are not rewritten."""

    name = "jsonl"
    concurrent = False  # a local file: deliveries run one after another, without a task each

    def __init__(self, cfg: DestinationConfig, clients: Clients | None = None):
        self.cfg = cfg
        self.path: Path = cfg.path
        self._fh = None
        self._written: set[str] | None = None
        # exclusive(): flock() excludes other handles of the file, not the threads sharing this one
        self._turn = threading.Lock()

    def describe(self) -> str:
        return f"JSON lines file {self.path}"

    def prepare(self, pending_keys: set[str]) -> None:
        """Only when a previous run stopped mid-delivery do we need to know what the file already holds."""
        if pending_keys:
            self._written = {key for key, _ in self._lines(0)}

    def _lines(self, offset: int):
        """(idempotency key, invoice) of each whole line from `offset` (from the start if the file is shorter:
        it was replaced)."""
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            if offset <= fh.seek(0, 2):
                fh.seek(offset)
            else:
                fh.seek(0)
            for line in fh:
                try:
                    d = orjson.loads(line)
                    yield d["idempotency_key"], d.get("invoice")
                except Exception:
                    continue  # a line cut short by a crash

    def length(self) -> int:
        """Where the next line will start (see recover)."""
        if self._fh is not None:
            self._fh.flush()
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def recover(self, offset: int):
        """The ledger rows of the cases written from `offset` by a run that stopped before recording them:
        (account_key, invoice_id, connection, number, idempotency_key, case_id, case_reference). A line is
        taken only if its key is the one derived from its invoice's source account and id, so a line this
        runner did not write is never attributed to an invoice."""
        for key, inv in self._lines(offset):
            src = inv.get("source") if isinstance(inv, dict) else None
            if not isinstance(src, dict) or inv.get("external_id") is None:
                continue
            invoice_id = str(inv["external_id"])
            # The account key is "<integration>:<account id>"; a source that reported no account id is
            # keyed with "None" but shows the connection's name in the invoice.
            for account_key in (f"{src.get('integration')}:{src.get('account_id')}", f"{src.get('integration')}:None"):
                if idempotency_key(account_key, invoice_id) == key:
                    yield account_key, invoice_id, src.get("connection"), inv.get("number"), key, key, None
                    break

    async def check(self) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return {"path": str(self.path)}

    async def deliver(self, invoice: dict, key: str) -> Delivery:
        return self.write_many([(invoice, key, None)])[0]

    def encode(self, invoice: dict, key: str) -> bytes:
        """One line of the file (pure: the classification worker encodes eligible invoices ahead)."""
        return dumps({"idempotency_key": key, "invoice": invoice, "case": case_body(invoice, self.cfg)})

    def write_many(self, items: list[tuple[dict | None, str, bytes | None]]) -> list[Delivery]:
        """A page of cases in one write; the engine flushes and records them in the ledger together.
        items: (invoice, key, the line encoded ahead or None); an ahead line is for the derived key."""
        data, out = self.encode_page(items)
        self.append(data)
        return out

    def encode_page(self, items: list[tuple[dict | None, str, bytes | None]]) -> tuple[bytes, list[Delivery]]:
        """write_many's bytes and deliveries, nothing written yet (a writer that records a page before it
        writes it: runner/engine/localsink.py)."""
        out, lines = [], []
        written = self._written
        for invoice, key, line in items:
            if written is not None and key in written:
                out.append(Delivery(case_id=key, case_reference=None, existing=True))
                continue
            if line is None:
                line = self.encode(invoice, key)
            elif not line.startswith(b'{"idempotency_key":"' + key.encode() + b'"'):  # a key kept from the ledger
                line = self.encode(orjson.loads(line)["invoice"], key)
            lines.append(line)
            out.append(Delivery(case_id=key, case_reference=None))
        return (b"\n".join(lines) + b"\n" if lines else b""), out

    def append(self, data: bytes) -> None:
        if data:
            self._open().write(data)

    def cut(self, length: int) -> None:
        """Take back what was appended past `length` (a page whose write failed halfway), under exclusive()."""
        self.flush()
        os.truncate(self.path, length)

    def _open(self):
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("ab")
            # A crash in the middle of a write leaves a torn last line: end it, or the next record would be
            # glued to it and lost to every reader.
            self._end_torn_line()
        return self._fh

    def _end_torn_line(self) -> None:
        """End the file's last line if it has no newline, at once: the file's end is what the next check reads."""
        with self.path.open("rb") as fh:
            if fh.seek(0, 2) == 0:
                return
            fh.seek(-1, 2)
            if fh.read(1) == b"\n":
                return
        self._fh.write(b"\n")
        self._fh.flush()

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """This thread alone writes the file meanwhile (an advisory lock of the file itself, released if the
        process dies, and a lock of this handle's threads). Every writer of a page takes this turn
        (runner/engine/localsink.py), so no invoice is written by two of them. A line another process left
        torn (killed mid-write) is ended first."""
        import fcntl

        with self._turn:
            fh = self._open()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                self._end_torn_line()
                yield
            finally:
                fh.flush()
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def copy(self) -> "JsonlDestination":
        """The same file, with a handle of its own (for the classification worker, which writes pages too:
        runner/engine/workers.py). Every write is a whole page appended in one call."""
        return type(self)(self.cfg)

    def reopen(self) -> None:
        """Close the handle: the next write opens the file again and first ends a line another process may
        have left torn (a worker killed mid-write). After the turn a thread of this handle is taking, if any:
        the handle is the turn's (exclusive)."""
        with self._turn:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    async def close(self) -> None:
        self.reopen()


def make(cfg: DestinationConfig, clients: Clients):
    return DebituraDestination(cfg, clients) if cfg.type == "debitura" else JsonlDestination(cfg, clients)
