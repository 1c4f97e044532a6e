"""`runner serve`: the HTTP API that push integrations call (a Zap posting invoices, polling for cases).

One server serves one inbound connection of the config, in that connection's environment (test or
production). Every request carries an API key (`runner keys create`) in the header the spec names; a key of
the other environment is refused with a 401 that says so, an unknown or revoked key with a plain 401, and
both are recorded on the connection for `runner doctor`.

Posted invoices go through the very same steps as fetched ones: `pipeline.Source.evaluate` (mapping → unpaid →
date window → canonical schema → not yet due) and `pipeline._deliver_page` (ledger `pending` committed before
the destination is called, `delivered` after, derived idempotency keys). Everything is committed before the
answer is sent, so a server killed right after answering has kept every invoice it accepted; a retried
request (same Idempotency-Key header, or the same invoice again) never creates a second case.

Endpoints (all JSON; all but /healthz need the key):
  GET  /healthz                   liveness
  GET  /v1/me                     the auth test: the connection, environment and account the key belongs to
  POST /v1/invoices               one invoice, a list, or {"invoices": [...]} (the spec's `inbound.records`)
  GET  /v1/triggers/cases         polling trigger: cases created, newest first, each with a stable `id`
  GET  /v1/triggers/skipped       polling trigger: invoices skipped and why, newest first, stable `id`
  POST /v1/webhooks/debitura      Debitura's signed case events, when destination.webhooks is set (no key:
                                  the signature is checked; runner/inbound/webhooks.py)
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

import orjson
from loguru import logger

from runner import metrics
from runner.inbound import apikeys
from runner.inbound.body import read_bounded
from runner.spec import config as config_mod
from runner.engine import destinations
from runner.engine import pipeline
from runner.spec import validation
from runner.spec.config import Config, Connection
from runner.errors import ConfigError, DestinationError, Problem, RunnerError, failure_words
from runner.net.http import Clients
from runner.engine.pipeline import ELIGIBLE, IMPORTED, REASONS, SKIPPED, ConnectionResult, RunResult, Source, Verdict
from runner.engine.classify import verdict_rows
from runner.redact import MASK, redact, redact_obj
from runner.state import open_store

MAX_BODY = 5 * 1024 * 1024
DEFAULT_KEY_HEADER = "XApiKey"
TRIGGER_LIMIT = 100
TRIGGER_LIMIT_MAX = 500
# Bounds on what one request may hold, checked before anything else looks at it: every later step (mapping,
# messages, redaction, the ledger) then works on small, flat, typed values.
MAX_INVOICES = 1000         # invoices per request
MAX_DEPTH = 32              # nesting of objects and lists
MAX_NODES = 200_000         # values in the whole payload
MAX_TEXT = 10_000           # characters in any one string (or key) of the payload
MAX_FIELD = 1000            # characters in a field the spec reads (an id, a name, an address line)
MAX_ERRORS = 50             # errors listed in a 422; the rest are counted

# Skips the sender can act on: answered 422, so a Zap step fails and shows the reason and the fix. The other
# skips are decisions, not problems (paid or void, outside the configured window, already a case): 200.
FIXABLE = {
    "incomplete_address": "add the debtor's {missing} to the invoice (or map it in the Zap) and send it again",
    "not_yet_due": "send it again after {due_date} (in a Zap: a Delay Until step set to the due date)",
}

def ensure(store) -> None:
    """The store's migrations create the tables the server uses (runner/state)."""


# --- which connection ------------------------------------------------------------------------------------

def inbound_connections(cfg: Config) -> list[Connection]:
    return [c for c in cfg.connections if not c.spec.pull and c.spec.inbound]


def select(cfg: Config, name: str | None = None) -> Connection:
    """The connection `runner serve` serves: the one named, else the config's only inbound connection."""
    conns = inbound_connections(cfg)
    if name:
        conn = cfg.connection(name)
        if conn not in conns:
            raise ConfigError(Problem(
                f"'{name}' is a {conn.spec.name} connection, which the runner fetches from; only inbound "
                f"connections (integrations with an `inbound:` section) can be served",
                fix=f"serve one of: {', '.join(c.name for c in conns)}" if conns else
                "add a connection whose integration is inbound (see `runner integrations`)"))
        return conn
    if not conns:
        raise ConfigError(Problem(f"{cfg.file} has no inbound connection to serve",
                                  fix="add a connection whose integration receives invoices (see `runner "
                                      "integrations`), with `environment: production` or `environment: test`"))
    if len(conns) > 1:
        raise ConfigError(Problem(f"{cfg.file} has {len(conns)} inbound connections; one server serves one",
                                  fix="choose with --connection: " + ", ".join(c.name for c in conns)))
    return conns[0]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- what a payload may hold ---------------------------------------------------------------------------------

def _where(path: tuple) -> str:
    """A payload position as people write it: invoices[3].customer.address.city."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: f"{'true' if value else 'false'} (a yes/no value)",
            str: "text", type(None): "null"}.get(type(value), "a number")


def payload_problem(body: Any) -> tuple[str, str] | None:
    """(where, what) for the first bound the parsed payload breaks: nesting, number of values, the length of
    a string or key. One pass with an explicit stack, so a deep or wide payload costs its size, no more."""
    stack = [(body, ())]
    nodes = 0
    while stack:
        value, path = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return "body", f"the payload holds more than {MAX_NODES:,} values: send the invoices in smaller batches"
        kind = type(value)
        if kind is str:
            if len(value) > MAX_TEXT:
                return _where(path), (f"{_where(path)} is {len(value):,} characters long ({_shown(value)}); at most "
                                      f"{MAX_TEXT:,} are accepted")
        elif kind is dict or kind is list:
            if len(path) >= MAX_DEPTH:
                return _where(path), f"the payload is nested more than {MAX_DEPTH} levels deep at {_where(path)}"
            if kind is dict:
                for k, v in value.items():
                    if len(k) > MAX_TEXT:
                        return _where(path), f"{_where(path)} has a key {len(k):,} characters long"
                    stack.append((v, path + (k,)))
            else:
                stack.extend((v, path + (i,)) for i, v in enumerate(value))
    return None


# Functions whose argument is a list or an object, not one value: a field passed to them is a container.
_CONTAINER_FUNCTIONS = {"length", "join", "keys", "values", "sort", "sort_by", "max", "min", "max_by", "min_by",
                        "sum", "avg", "map", "merge", "reverse", "to_array", "type", "not_null", "contains"}
_CONDITIONS = {"comparator", "and_expression", "or_expression", "not_expression"}
_CONTAINERS = {"index_expression", "projection", "filter_projection", "value_projection", "flatten", "slice",
               "index"}


def _chain(node) -> tuple | None:
    """The field path of a plain `a.b.c` expression, else None."""
    t = node.get("type")
    if t == "field":
        return (node["value"],)
    if t == "subexpression":
        parts = [_chain(c) for c in node["children"]]
        return sum(parts, ()) if parts and all(parts) else None
    return None


def fields_read(expressions, computed: set[str]) -> dict[tuple, str]:
    """Every payload field a spec's expressions read, with how: 'value' (a piece of the invoice: text or a
    number), 'condition' (also true/false) or 'container' (an object or list the expression looks into).
    Derived from the expressions themselves, so it holds for every inbound integration."""
    out: dict[tuple, str] = {}
    rank = {"condition": 0, "value": 1, "container": 2}

    def note(path, role):
        if path[0] in computed:
            return
        for i in range(1, len(path)):  # a.b.c: a and a.b are objects
            out[path[:i]] = "container"
        if rank[role] > rank[out.get(path, "condition")] or path not in out:
            out[path] = role

    def walk(node, role):
        if not isinstance(node, dict):
            return
        path = _chain(node)
        if path:
            note(path, role)
            return
        t = node.get("type")
        if t in _CONTAINERS:
            child_role = "container"
        elif t in _CONDITIONS:
            child_role = "condition"
        elif t == "function_expression":
            child_role = "container" if node.get("value") in _CONTAINER_FUNCTIONS else "value"
        else:
            child_role = "value"
        for i, child in enumerate(node.get("children") or []):
            # Only the left side of a projection or index is looked into; the right works on its items.
            walk(child, child_role if (t not in _CONTAINERS or i == 0) else "container")

    for expr in expressions:
        walk(expr.ast, "value")
    return out


def record_problems(record: dict, reads: dict[tuple, str]) -> list[tuple[str, str]]:
    """(field, message) for each field the spec reads that holds the wrong kind of value, or too long a text."""
    out = []
    for path, role in reads.items():
        value: Any = record
        for i, key in enumerate(path):
            if not isinstance(value, dict):
                value = None
                break
            value = value.get(key)
        if value is None:
            continue
        name = ".".join(path)
        kind = type(value)
        if role == "container":
            if kind is not dict and kind is not list:
                inner = [p[-1] for p in reads if len(p) == len(path) + 1 and p[:len(path)] == path]
                out.append((name, f"{name}: could not read {_shown(value)} ({_kind(value)}) as an object "
                                  f"(with {', '.join(inner)})"))
        elif kind is dict or kind is list or (kind is bool and role == "value"):
            out.append((name, f"{name}: could not read {_shown(value)} ({_kind(value)}); it must be text or a number"))
        elif kind is str and len(value) > MAX_FIELD:
            out.append((name, f"{name} is {len(value):,} characters long ({_shown(value)}); at most {MAX_FIELD:,} "
                              f"are accepted"))
    return out


def _shown(value: Any) -> str:
    """A value as a message quotes it: short, so a hostile megabyte never travels back in an answer."""
    text = repr(value) if not isinstance(value, (dict, list)) else orjson.dumps(value).decode()
    return text if len(text) <= 60 else text[:57] + "..."


# --- the server --------------------------------------------------------------------------------------------

class InboundServer:
    def __init__(self, cfg: Config, conn: Connection):
        self.cfg = cfg
        self.conn = conn
        self.spec = conn.spec
        self.environment = conn.environment
        self.key_header = self.spec.inbound.get("key_header") or DEFAULT_KEY_HEADER
        self.records_expr = self.spec.inbound["records"]
        self.mapped_from = {".".join(path): expr.source for path, expr in self.spec.invoices.mapping.fields}
        stream = self.spec.invoices
        self.reads = fields_read([e for _, e in stream.let] + [e for _, e in stream.mapping.fields]
                                 + [e for e in (stream.unpaid, stream.status_text) if e is not None],
                                 {name for name, _ in stream.let})
        self.store = None
        self.clients: Clients | None = None
        self.destination = None
        self.destination_ok = False
        self.account_key: str | None = None
        self.account_id: str | None = None
        self.account_name: str | None = None
        self.lock: asyncio.Lock | None = None

    # lifecycle ---------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.lock = asyncio.Lock()  # one import at a time: retries and duplicates are decided one after another
        from runner.engine.destinations import ledger_id

        self.store = open_store(self.cfg, destination=ledger_id(self.cfg.destination))
        ensure(self.store)
        self.clients = Clients(sandbox_dir=self.cfg.state_path.parent / "sandbox")
        dest_cfg = self.cfg.destination
        if self.spec.environments[self.environment].test_cases:
            dest_cfg = dataclasses.replace(dest_cfg, is_test=True)
        self.destination = destinations.make(dest_cfg, self.clients)
        source = await self._source()
        self.account_key, self.account_id, self.account_name = source.account_key, source.account_id, source.account_name
        self.store.update_connection(self.conn.name, integration=self.conn.integration, account_id=self.account_id,
                                     account_name=self.account_name,
                                     data={"inbound_serving": {"environment": self.environment, "since": time.time(),
                                                               "pid": os.getpid()}})

    async def shutdown(self) -> None:
        if self.destination is not None:
            await self.destination.close()
        if self.clients is not None:
            await self.clients.aclose()
        if self.store is not None:
            self.store.close()

    def _window(self):
        """Re-resolved per request: `last: 90d` slides with the clock of a server that runs for weeks."""
        data = self.cfg.doc.data
        raw = (data["connections"][self.conn.index].get("window") or (data.get("defaults") or {}).get("window")
               or {"from": "1970-01-01"})
        return config_mod.resolve_window(raw)

    async def _source(self) -> Source:
        source = Source(dataclasses.replace(self.conn, window=self._window()), self.clients, self.store)
        await source.open()
        return source

    # responses -----------------------------------------------------------------------------------------------
    @staticmethod
    def _json(status: int, body: Any, headers: dict | None = None):
        from starlette.responses import Response

        return Response(orjson.dumps(redact_obj(body), default=str), status_code=status,
                        media_type="application/json", headers=headers)

    # keys ------------------------------------------------------------------------------------------------------
    def authenticate(self, request, endpoint: str):
        """(key, None) when the key is good for this server's environment, else (None, a 401 response)."""
        presented = request.headers.get(self.key_header)
        if not presented:
            in_url = any(k.lower() == self.key_header.lower() for k in request.query_params.keys())
            if in_url:  # refused even when valid: a URL is kept by proxies and browser histories
                return None, self._refuse("key_in_url", f"the API key was sent in the URL, where proxies and logs "
                                                        f"keep it: send it in the {self.key_header} header instead, "
                                                        f"and revoke this key (runner keys revoke) and make a new "
                                                        f"one", endpoint)
            return None, self._refuse("missing_key", f"no API key: send the key from `runner keys create` in the "
                                                     f"{self.key_header} header", endpoint)
        check = apikeys.verify(self.store, presented)
        if check.status != "ok":
            return None, self._refuse(f"{check.status}_key", "invalid API key", endpoint,
                                      key_id=check.key.id if check.key else None)
        key = check.key
        if key.environment != self.environment:
            msg = (f"this is a {key.environment} API key, but this is the {self.environment} server: use a "
                   f"{self.environment} key here (runner keys create --environment {self.environment}), or send "
                   f"{key.environment} invoices to the {key.environment} server")
            return None, self._refuse("wrong_environment", msg, endpoint, key_id=key.id,
                                      key_environment=key.environment)
        apikeys.touch(self.store, key.id)
        self.store.update_connection(self.conn.name, data={"inbound_last_call": {
            "at": time.time(), "key_id": key.id, "endpoint": endpoint, "environment": self.environment}})
        return key, None

    def _refuse(self, reason: str, message: str, endpoint: str, key_id: str | None = None,
                key_environment: str | None = None):
        saved = self.store.connection(self.conn.name).get("data") or {}
        self.store.update_connection(self.conn.name, data={
            "inbound_refused_count": int(saved.get("inbound_refused_count") or 0) + 1,
            "inbound_last_refused": {"at": time.time(), "reason": reason, "message": message, "endpoint": endpoint,
                                     "key_id": key_id, "key_environment": key_environment,
                                     "environment": self.environment}})
        logger.warning("refused a request to {}: {}", endpoint, message)
        return self._json(401, {"error": "unauthorized", "message": message})

    # endpoints -------------------------------------------------------------------------------------------------
    async def healthz(self, request):
        return self._json(200, {"ok": True})

    async def readyz(self, request):
        """Ready once the state store is open and the source's account is known (startup finished)."""
        if self.store is None or self.account_key is None:
            return self._json(503, {"ok": False, "message": "starting"})
        return self._json(200, {"ok": True})

    async def metrics(self, request):
        from starlette.responses import Response

        from runner import metrics

        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def me(self, request):
        key, refused = self.authenticate(request, "me")
        if refused is not None:
            return refused
        return self._json(200, {"id": self.account_key, "connection": self.conn.name, "integration": self.spec.id,
                                "environment": self.environment, "account_id": self.account_id,
                                "account_name": self.account_name,
                                "key": {"id": key.id, "label": key.label, "environment": key.environment},
                                "destination": self.destination.describe()})

    async def _body(self, request) -> tuple[bytes | None, Any]:
        """The request body, read no further than MAX_BODY (also when it is sent chunked): (bytes, None), or
        (None, the 413 to answer)."""
        too_large = self._json(413, {"error": "too_large", "message": f"the payload is over {MAX_BODY // 1024 // 1024}"
                                     f" MB: send at most {MAX_INVOICES} invoices per request, in smaller batches"})
        body = await read_bounded(request, MAX_BODY)
        return (None, too_large) if body is None else (body, None)

    async def invoices(self, request):
        key, refused = self.authenticate(request, "invoices")
        if refused is not None:
            return refused
        raw, too_large = await self._body(request)
        if too_large is not None:
            return too_large
        idem = request.headers.get("idempotency-key")
        if idem is not None and not (0 < len(idem) <= 255):
            return self._unprocessable("invalid_idempotency_key", "the Idempotency-Key header must be 1 to 255 "
                                       "characters", [{"field": "Idempotency-Key", "message": "1 to 255 characters"}])
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            hint = ""
            if "form" in request.headers.get("content-type", ""):
                hint = " (it was sent as a form: set the request's payload type to JSON)"
            msg = f"the request body is not valid JSON{hint}: {exc}"
            return self._unprocessable("invalid_json", msg, [{"field": "body", "message": msg}])
        problem = payload_problem(body)  # before anything else reads the payload: hashing, mapping, messages
        if problem is not None:
            return self._unprocessable("invalid_payload", problem[1] + "; nothing was imported",
                                       [{"field": problem[0], "message": problem[1]}])
        body_hash = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        async with self.lock:
            if idem:
                prior = self.store.inbound_request(self.conn.name, idem)
                if prior is not None and not _final(json.loads(prior[2])):
                    prior = None  # kept by an earlier version of the runner, which kept skips too
                if prior is not None:
                    if prior[0] != body_hash:
                        return self._json(409, {"error": "idempotency_conflict", "message":
                                                "this Idempotency-Key was already used for a request whose invoices "
                                                "were all imported, with a different payload; use a new key for a "
                                                "new request (an invoice already imported stays one case)"})
                    return self._json(prior[1], json.loads(prior[2]), headers={"Idempotent-Replayed": "true"})
            records, single, problem = self._records(body)
            if problem is not None:
                return problem
            try:
                status, answer = await self._import(records, single)
            except RunnerError as exc:
                return self._json(500, {"error": "failed", "message": redact(exc.message),
                                        "fix": redact(exc.fix) if exc.fix else None})
            except Exception as exc:  # noqa: BLE001 - a bug must answer JSON, never a plain-text traceback
                logger.opt(exception=exc).debug("unexpected error while importing a payload")
                return self._json(500, {"error": "internal_error",
                                        "message": failure_words(exc),
                                        "fix": "try again; if it persists, run `runner serve -vv` to see where, and report it"})
            # Kept under the key only when final: every invoice is a case (imported now or before). Any other
            # answer (a skip to fix, a failure) is worked out again on the next request, so a corrected invoice
            # sent with the same key is imported.
            if idem and status == 200 and _final(answer):
                self.store.save_inbound_request(self.conn.name, idem, body_hash, status,
                                                orjson.dumps(answer, default=str).decode())
        return self._json(status, answer)

    def _unprocessable(self, code: str, message: str, errors: list[dict]):
        return self._json(422, {"error": code, "message": message, "errors": errors[:MAX_ERRORS],
                                "errors_total": len(errors)})

    def _records(self, body: Any):
        """(records, whether one invoice was posted on its own, None) or (None, None, the 422 to answer)."""
        try:
            records = self.records_expr.search(body)
        except Exception as exc:  # a JMESPath type error on a hostile payload
            records = exc
        single = isinstance(records, dict)
        if single:
            records = [records]
        if not isinstance(records, list):
            msg = ("the payload must be one invoice (a JSON object), a list of invoices, or a batch; "
                   f"the spec reads the invoices at '{self.records_expr.source}'")
            return None, None, self._unprocessable("invalid_payload", msg, [{"field": "body", "message": msg}])
        if not records:
            msg = "the payload holds no invoices"
            return None, None, self._unprocessable("invalid_payload", msg, [{"field": "body", "message": msg}])
        if len(records) > MAX_INVOICES:
            msg = (f"the payload holds {len(records):,} invoices; at most {MAX_INVOICES:,} are accepted per request: "
                   f"send them in batches")
            return None, None, self._unprocessable("too_many_invoices", msg, [{"field": "body", "message": msg}])
        bad = []
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                bad.append({"invoice": i, "field": "invoice",
                            "message": f"invoice {i} is {_kind(r)}, not a JSON object"})
                continue
            for field, message in record_problems(r, self.reads):
                bad.append({"invoice": i, "invoice_id": self._readable_id(r), "field": field, "message": message})
        if bad:
            shown = "; ".join(f"invoice {e['invoice']}: {e['message']}" for e in bad[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            return None, None, self._unprocessable(
                "invalid_payload", f"{len({e['invoice'] for e in bad})} of the {len(records)} invoices cannot be read: "
                                   f"{shown}{more}; nothing was imported", bad)
        return records, single, None

    def _readable_id(self, record: dict) -> str | None:
        """The invoice's id when it is one (text or a number), to name the invoice in an error."""
        for path, expr in self.spec.invoices.mapping.fields:
            if path == ("external_id",):
                try:
                    value = expr.search(record)
                except Exception:  # noqa: BLE001 - a wrong type is what the error is about
                    return None
                readable = isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))
                return value if readable else None
        return None

    def _field_errors(self, index: int, v: Verdict, record: Any, source: Source) -> list[dict]:
        """Every bad field of one invoice, named as in the canonical invoice, with the expression that fed it.

        The engine stops at an invoice's first problem (no id, an unreadable date); a Zap's author needs them
        all at once, so the mapped invoice is checked against the canonical schema here as well."""
        texts = list((v.detail or {}).get("errors") or [])
        if not texts:
            try:
                inv = source.stream.mapping.apply(source.stream.prepare(dict(record)))
                inv["source"] = {"connection": self.conn.name, "integration": self.spec.id,
                                 "account_id": source.account_id or self.conn.name}
                if isinstance(inv.get("debtor"), dict):
                    inv["debtor"].setdefault("type", self.conn.debtor_type)
                for key in ("external_id", "number"):
                    if isinstance(inv.get(key), (int, float)):
                        inv[key] = str(inv[key])
                texts = validation.explain(inv).errors if not validation.check(inv).ok else []
            except Exception:  # the mapping itself failed: the verdict's message says how
                texts = []
        fields = [t.split(" ", 1)[0].rstrip(":") for t in texts]
        if v.invoice_id == "<no id>" and "external_id" not in fields:
            texts.insert(0, "external_id is missing")
            fields.insert(0, "external_id")
        if not texts:
            texts, fields = [v.message], ["issue_date" if v.message.startswith("its date cannot be read") else "invoice"]
        out = []
        for field, text in zip(fields, texts):
            item = {"invoice": index, "invoice_id": None if v.invoice_id == "<no id>" else v.invoice_id,
                    "field": field, "message": text}
            if field in self.mapped_from:
                item["mapped_from"] = self.mapped_from[field]
            out.append(item)
        return out

    async def _import(self, records: list, single: bool = False) -> tuple[int, dict]:
        started = time.time()
        source = await self._source()
        conn = source.conn
        verdicts = [source.evaluate(r) for r in records]
        result = ConnectionResult(name=conn.name, integration=conn.integration, environment=conn.environment,
                                  window=conn.window.as_dict(), window_text=conn.window.describe(),
                                  account_id=source.account_id, account_name=source.account_name)
        store = self.store
        run_id = store.begin_run("serve", str(self.cfg.file))
        try:
            return await self._import_run(records, source, conn, verdicts, result, started, run_id, single)
        except BaseException as exc:
            # Never leave the run row 'running': record why it failed (redacted), then let the caller answer.
            why = failure_words(exc)
            metrics.run("serve", "failed")
            try:
                store.finish_run(run_id, "failed", {"run_id": run_id, "mode": "serve", "started": started,
                                                    "finished": time.time(), "error": why,
                                                    "connections": [{"name": conn.name, "status": "failed",
                                                                     "error": why}]})
                store.update_connection(conn.name, last_run_id=run_id, last_error=why, last_error_at=time.time())
            except Exception as inner:  # noqa: BLE001 - the original error is the one to report
                logger.opt(exception=inner).debug("could not record the failed run {}", run_id)
            raise

    async def _import_run(self, records: list, source: Source, conn: Connection, verdicts: list, result,
                          started: float, run_id: int, single: bool = False) -> tuple[int, dict]:
        store = self.store
        bad = [(i, v) for i, v in enumerate(verdicts) if v.verdict == SKIPPED and v.reason == "invalid"]
        run = pipeline._RunState()
        if bad:  # nothing is accepted from a malformed payload: the Zap run fails and names every bad field
            errors = []
            for i, v in bad:
                # Each bad invoice costs a second mapping to name all its fields: only for those listed.
                errors.extend(self._field_errors(i, v, records[i], source) if len(errors) < MAX_ERRORS else
                              [{"invoice": i, "invoice_id": None if v.invoice_id == "<no id>" else v.invoice_id,
                                "field": "invoice", "message": v.message}])
            recorded = [v for _, v in bad]
            pipeline._count(result, recorded, False)
            result.status, result.error = "failed", f"{len(bad)} invoice(s) in the payload are malformed"
            shown = "; ".join(f"invoice {e['invoice']}: {e['message']}" for e in errors[:5])
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            message = (f"{len(bad)} of the {len(records)} invoices in the payload cannot be read: {shown}{more}; "
                       f"nothing was imported")
            answer = {"error": "invalid_invoices", "message": message, "errors": errors[:MAX_ERRORS],
                      "errors_total": len(errors)}
            status = 422
        else:
            recorded = verdicts
            eligible = [v for v in verdicts if v.verdict == ELIGIBLE]
            if eligible and not self.destination_ok:
                try:
                    await self.destination.check()
                    self.destination_ok = True
                except DestinationError as exc:
                    run.fatal = exc
            if eligible:
                sem = asyncio.Semaphore(max(1, getattr(self.cfg.destination, "concurrency", 8)))
                await pipeline._deliver_page(source, result, eligible, store, self.destination, run, sem,
                                             run_id=run_id)
            if run.fatal is not None:
                self.destination_ok = False
            pipeline._count(result, verdicts, False)
            items = [self._item(v) for v in verdicts]
            to_fix = [(i, item) for i, item in enumerate(items) if item.get("reason") in FIXABLE]
            status = (503 if run.fatal is not None else 502) if result.failed else 422 if to_fix else 200
            if result.failed:
                result.status = "partial"
                result.error = run.fatal.message if run.fatal is not None else f"{result.failed} invoice(s) failed"
            answer = {"ok": status == 200, "connection": conn.name, "environment": self.environment,
                      "received": len(verdicts), "imported": result.imported, "skipped": result.skipped(),
                      "failed": result.failed, "invoices": items}
            if run.fatal is not None:
                answer["error"] = run.fatal.message
                answer["fix"] = run.fatal.fix
            elif status == 422:
                # A Zap step fails on a 4xx, and shows this message: the user learns nothing was created, and why.
                shown = "; ".join(f"invoice {item['invoice_id']}: {item['message']}: {item['fix']}"
                                  for _, item in to_fix[:5])
                more = f" (and {len(to_fix) - 5} more)" if len(to_fix) > 5 else ""
                others = len(items) - len(to_fix)
                answer["error"] = "not_imported"
                answer["message"] = (f"{len(to_fix)} of the {len(items)} invoices were not imported: {shown}{more}"
                                     + (f"; the other {others} have their verdict in `invoices` (sending the "
                                        f"request again after the fix imports nothing twice)" if others else ""))
                answer["errors"] = [{"invoice": i, "invoice_id": item["invoice_id"], "reason": item["reason"],
                                     "message": item["message"], "fix": item["fix"]} for i, item in to_fix[:MAX_ERRORS]]
                answer["errors_total"] = len(to_fix)
            if single:  # one invoice posted on its own: its result at the top, with the `id` a create action expects
                answer = {"id": items[0]["invoice_id"], **items[0], **answer}
        # Committed before the answer leaves: the verdicts, the run, the connection's health.
        store.record_verdicts(run_id, verdict_rows(conn.name, source.account_key, recorded))
        result.seen = len(recorded)
        result.seconds = time.time() - started
        summary = RunResult(run_id=run_id, mode="serve", destination=self.destination.describe(), connections=[result],
                            started=started, finished=time.time(),
                            destination_error=run.fatal.render() if run.fatal is not None else None)
        # Skips the sender must act on are verdicts of a run that worked, as in `runner apply`.
        worked = status == 200 or answer.get("error") == "not_imported"
        store.finish_run(run_id, "ok" if worked else ("failed" if status == 422 else "partial"),
                         summary.stored())
        metrics.record_run(summary, "serve")
        health: dict = {"last_run_id": run_id}
        if worked:
            health["last_success"] = time.time()
        else:
            health["last_error"] = answer["message"] if status == 422 else answer.get("error")
            health["last_error_at"] = time.time()
        store.update_connection(conn.name, **health)
        answer["run_id"] = run_id
        return status, answer

    @staticmethod
    def _item(v: Verdict) -> dict:
        item = {"invoice_id": v.invoice_id, "number": v.number, "verdict": v.verdict, "reason": v.reason,
                "message": v.message}
        detail = v.detail or {}
        for k in ("case_id", "case_reference", "missing", "fix"):
            if detail.get(k) is not None:
                item[k] = detail[k]
        if v.reason == "not_yet_due":
            # Nothing fetches a pushed invoice again later: the sender is the one to send it once it is due.
            item["message"] = (f"due on {detail.get('due_date')}: only overdue invoices can become collection cases, "
                               f"and nothing was created")
        if v.reason in FIXABLE:
            missing = ", ".join(m.replace("_", " ") for m in detail.get("missing") or [])
            item["fix"] = FIXABLE[v.reason].format(missing=missing or "address",
                                                   due_date=detail.get("due_date"))
        return item

    # polling triggers ------------------------------------------------------------------------------------------
    # Newest first, `limit` items a page. When more are left, the answer carries the next page's address in
    # the `X-Next-Cursor` header (and a `Link: <…>; rel="next"` header): `?cursor=` with it returns the items
    # after the last one of this page, however many arrived in between. The body stays a plain list, which is
    # what polling triggers read.
    def _page_params(self, request):
        """(limit, cursor position or None, None) or (None, None, the 422 to answer)."""
        raw_limit = (request.query_params.get("limit") or "").strip()
        limit = max(1, min(int(raw_limit), TRIGGER_LIMIT_MAX)) if raw_limit.isdigit() and len(raw_limit) < 10 \
            else TRIGGER_LIMIT
        cursor = request.query_params.get("cursor")
        if not cursor:
            return limit, None, None
        position = _decode_cursor(cursor)
        if position is None:
            msg = "cursor is not one this server gave out: use the X-Next-Cursor header of the previous page"
            return None, None, self._unprocessable("invalid_cursor", msg, [{"field": "cursor", "message": msg}])
        return limit, position, None

    def _page(self, request, items: list, positions: list, limit: int):
        headers = {}
        if len(items) > limit:  # one more than a page was read: there is a next page
            items = items[:limit]
            cursor = _encode_cursor(positions[limit - 1])
            headers["X-Next-Cursor"] = cursor
            nxt = request.url.include_query_params(cursor=cursor, limit=limit)
            headers["Link"] = f'<{nxt}>; rel="next"'
        return self._json(200, items, headers=headers)

    async def trigger_cases(self, request):
        key, refused = self.authenticate(request, "triggers/cases")
        if refused is not None:
            return refused
        limit, after, problem = self._page_params(request)
        if problem is not None:
            return problem
        rows = self.store.delivered_page(self.account_key, after, limit + 1)
        items = [{"id": f"case-{case_id or idem}", "case_id": case_id, "case_reference": ref, "invoice_id": inv,
                  "invoice_number": number, "connection": conn, "environment": self.environment,
                  "created_at": _iso(updated)}
                 for _, updated, case_id, idem, ref, inv, number, conn in rows]
        return self._page(request, items, [(r[1], r[0]) for r in rows], limit)

    async def trigger_skipped(self, request):
        key, refused = self.authenticate(request, "triggers/skipped")
        if refused is not None:
            return refused
        limit, after, problem = self._page_params(request)
        if problem is not None:
            return problem
        # One item per invoice and reason (its latest verdict), so a retried payload is not news twice.
        rows = self.store.skipped_page(self.account_key, after[1] if after is not None else None, limit + 1)
        items = []
        for conn, invoice_id, number, reason, detail, at, _ in rows:
            d = json.loads(detail) if detail else {}
            item = {"id": f"{conn}:{invoice_id}:{reason}", "invoice_id": invoice_id, "invoice_number": number,
                    "connection": conn, "environment": self.environment, "reason": reason,
                    "reason_text": REASONS.get(reason, reason), "message": d.get("message"), "skipped_at": _iso(at)}
            if d.get("missing"):
                item["missing"] = d["missing"]
            items.append(item)
        return self._page(request, items, [(0.0, r[-1]) for r in rows], limit)


def _final(answer: dict) -> bool:
    """Every invoice of the answer is a case (imported by this request, or before it)."""
    items = answer.get("invoices")
    return bool(items) and all(i.get("verdict") == IMPORTED or i.get("reason") == "duplicate" for i in items)


def _encode_cursor(position: tuple[float, int]) -> str:
    """An opaque page position: the last item's time and row, so a page starts exactly after it."""
    return base64.urlsafe_b64encode(f"{position[0]!r}/{position[1]}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, int] | None:
    if len(cursor) > 200:
        return None
    try:
        at, row = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("/")
        position = (float(at), int(row))
    except (ValueError, UnicodeDecodeError):
        return None
    return position if position[0] == position[0] and position[0] not in (float("inf"), float("-inf")) else None


def create_app(cfg: Config, conn: Connection):
    """The Starlette app for one inbound connection."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.routing import Route

    from runner.inbound import webhooks

    server = InboundServer(cfg, conn)
    receiver = webhooks.Receiver(cfg) if webhooks.configured(cfg) else None

    @asynccontextmanager
    async def lifespan(app):
        await server.startup()
        if receiver is not None:
            receiver.startup(server.store)
        try:
            yield
        finally:
            await server.shutdown()

    routes = [Route("/healthz", server.healthz, methods=["GET"]),
              Route("/readyz", server.readyz, methods=["GET"]),
              Route("/metrics", server.metrics, methods=["GET"]),
              Route("/v1/me", server.me, methods=["GET"]),
              Route("/v1/invoices", server.invoices, methods=["POST"]),
              Route("/v1/triggers/cases", server.trigger_cases, methods=["GET"]),
              Route("/v1/triggers/skipped", server.trigger_skipped, methods=["GET"])]
    if receiver is not None:  # signed by Debitura: no API key
        routes.append(Route(webhooks.ROUTE, receiver.handle, methods=["POST"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


# --- logs ------------------------------------------------------------------------------------------------------
# Every line a server writes goes through loguru, whose sink (cli.setup_logging) redacts: the servers' own
# libraries (uvicorn, httpx) log through the standard `logging` module, which is routed there, and the access
# log is ours, with the values of key-like query parameters masked (a key sent as ?XApiKey=… never shows).

_SENSITIVE = ("key", "token", "secret", "password", "passwd", "auth", "signature", "sig", "credential", "session")


class _ToLoguru(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info or None).log(level, "{}", record.getMessage())


def route_std_logging(level: int) -> None:
    """Send the standard library's log records (uvicorn, httpx, …) to loguru, and so through redaction."""
    root = logging.getLogger()
    root.handlers[:] = [_ToLoguru()]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True


def shown_target(path: str, query: bytes | str, extra_sensitive: tuple[str, ...] = ()) -> str:
    """The request target for a log line: the path, and the query with every key-like value masked."""
    from urllib.parse import parse_qsl, urlencode

    if isinstance(query, bytes):
        query = query.decode("latin-1")
    if not query:
        return path[:300]
    sensitive = tuple(s.lower() for s in extra_sensitive)
    pairs = []
    for k, v in parse_qsl(query, keep_blank_values=True):
        bare = k.lower().replace("-", "").replace("_", "")
        masked = any(s in bare for s in _SENSITIVE) or bare in sensitive
        pairs.append((k, MASK if masked and v else v))
    return redact(f"{path}?{urlencode(pairs, safe='*')}")[:300]


def access_log(app, key_header: str = DEFAULT_KEY_HEADER):
    """An ASGI wrapper that logs one line per request (method, target with keys masked, status, time)."""
    sensitive = (key_header.lower().replace("-", "").replace("_", ""),)

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started = time.perf_counter()
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            logger.info("{} {} {} {} ({:.0f} ms)", client[0], scope["method"],
                        shown_target(scope.get("path", ""), scope.get("query_string", b""), sensitive), status[0],
                        (time.perf_counter() - started) * 1000)

    return wrapped


# --- doctor --------------------------------------------------------------------------------------------------

def doctor_checks(cfg: Config, store, connections: list[Connection] | None = None) -> list[dict]:
    """The seed's checks for inbound connections, from what the server recorded: a usable key for the
    environment, no key of the other environment (or a revoked one) refused since the last good call, and the
    last time a Zap called. Each: {connection, check, title, status: ok|warning|failed, ok, message, fix}."""
    out = []

    def add(conn, check, title, status, message, fix=None):
        out.append({"connection": conn.name, "check": check, "title": title, "status": status,
                    "ok": status == "ok", "message": message, "fix": fix})

    conns = [c for c in (connections or inbound_connections(cfg)) if not c.spec.pull]
    if store is None:
        for conn in conns:
            add(conn, "api_key", "an active API key for the environment", "skipped", "no state store")
        return out
    ensure(store)
    keys = apikeys.list_keys(store)
    for conn in conns:
        env = conn.environment
        data = store.connection(conn.name).get("data") or {}
        active = [k for k in keys if k.active and k.environment == env]
        add(conn, "api_key", f"an active {env} API key", "ok" if active else "failed",
            (f"{len(active)} active {env} API key(s): " + ", ".join(k.id for k in active)) if active
            else f"no active {env} API key: no Zap can call this connection's server",
            None if active else f"runner keys create {cfg.file} --environment {env}, and put the key in the Zap")
        refused = data.get("inbound_last_refused")
        last = data.get("inbound_last_call")
        recent = refused and (not last or refused.get("at", 0) > last.get("at", 0))
        title = "Zaps use a key of the right environment"
        if recent and refused.get("reason") == "wrong_environment":
            add(conn, "key_environment", title, "failed",
                f"the last call ({_iso(refused['at'])}) used a {refused.get('key_environment')} key against this "
                f"{env} server, and was refused",
                f"put a {env} key in the Zap (runner keys create {cfg.file} --environment {env}), or point the Zap "
                f"at the {refused.get('key_environment')} server")
        elif recent:
            add(conn, "key_environment", title, "failed",
                f"the last call ({_iso(refused['at'])}) was refused: " + {
                    "missing_key": "it sent no API key", "key_in_url": "it sent its API key in the URL",
                    "unknown_key": "its API key is not one of this runner's",
                    "revoked_key": f"its API key {refused.get('key_id')} was revoked"}.get(refused.get("reason"),
                                                                                       refused.get("reason", "")),
                f"put an active {env} key in the Zap's XApiKey header: `runner keys list {cfg.file}` shows them")
        else:
            add(conn, "key_environment", title, "ok", f"no call refused since the last accepted one ({env})")
        if last:
            add(conn, "last_call", "the last time a Zap called", "ok",
                f"a Zap last called {_iso(last['at'])} ({last.get('endpoint')}, key {last.get('key_id')}); polling "
                f"triggers are called every 1 to 15 minutes, depending on the plan")
        else:
            add(conn, "last_call", "the last time a Zap called", "warning", "no Zap has called this connection yet",
                f"start `runner serve {cfg.file}` and test the connection in the Zap editor")
    return out
