"""Recorded provider answers for spec tests (`runner integrations test`).

`RecordingClients` sends a run's requests as usual (network or a built-in simulator) and keeps every answer;
`ReplayClients` answers every request, OAuth token calls included, from such a recording, so a spec is tested
without the provider. Both replace only where a request goes (the connection pools and the httpx transports of
`runner.net.http.Clients`), never how the engine builds it.

A recording keeps no secret: request headers and bodies are not stored, registered secrets and token fields are
masked, and personal data (names, e-mails, phones, street lines) is replaced by stable fakes: the same value
always gets the same fake, so a customer read twice stays one customer. Empty values stay empty, so the
verdicts a recording gives (an incomplete address) are those of the live data.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpcore
import orjson
import yaml

from runner import redact
from runner.net import http as http_mod
from runner.net.http import SANDBOX_SCHEME, Clients

RESPONSES = "responses.yaml"
EXPECTED = "expected.yaml"
MASKED = "REDACTED"

_TOKEN_KEYS = {"access_token", "refresh_token", "id_token", "client_secret", "api_key", "password", "secret", "token"}
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")
# Keys whose string values are personal data, compared in lower case with "_" and "-" removed.
_NAME_KEYS = re.compile(r"^(name|displayname|fullname|firstname|lastname|givenname|familyname|middlename|"
                        r"companyname|businessname|individualname|customername|contactname|contactperson|"
                        r"attention|fullyqualifiedname|printoncheckname|legalname|recipientname|shippingname|billingname|"
                        r"accountname|accountholdername|username|nickname|statementdescriptor)$")
_PHONE_KEYS = re.compile(r"(phone|mobile|fax|freeformnumber)")
_STREET_KEYS = re.compile(r"^(line[1-5]|street\d?|address(line)?[1-5]?|addr[1-5]?|streetaddress)$")


def fixtures_dir(spec_path: Path, spec_id: str) -> Path:
    """Where a spec's recorded answers and expectations live: beside it, `<id>.fixtures/`."""
    return spec_path.parent / f"{spec_id}.fixtures"


def _fake(kind: str, value: str) -> str:
    h = hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()[:6]
    if kind == "email":
        return f"person-{h}@example.com"
    if kind == "phone":
        return "+1 555 01" + str(int(h, 16) % 100).zfill(2)
    if kind == "street":
        return f"{int(h, 16) % 900 + 1} Sample Street"
    return f"Name {h}"


def scrub(value: Any, key: str = "") -> Any:
    """A copy of a decoded answer without secrets and personal data (see the module's notes)."""
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, key) for v in value]
    if not isinstance(value, str) or not value:
        return value
    k = key.lower().replace("_", "").replace("-", "")
    if key.lower() in _TOKEN_KEYS or k in {t.replace("_", "") for t in _TOKEN_KEYS}:
        return MASKED
    if _EMAIL.match(value) or "email" in k:
        return _fake("email", value)
    if _PHONE_KEYS.search(k):
        return _fake("phone", value)
    if _STREET_KEYS.match(k):
        return _fake("street", value)
    if _NAME_KEYS.match(k):
        return _fake("name", value)
    masked = redact.redact(value)
    return masked.replace(redact.MASK, MASKED) if masked != value else value


def _params(query: str) -> dict:
    out: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        out[k] = [*out[k], v] if isinstance(out.get(k), list) else [out[k], v] if k in out else v
    return out


def _exchange(method: str, url: str, status: int, content_type: str, content: bytes) -> dict:
    split = urlsplit(url)
    params = {k: redact.redact(v) if isinstance(v, str) else v for k, v in _params(split.query).items()}
    resp: dict[str, Any] = {"status": status}
    try:
        resp["json"] = scrub(orjson.loads(content)) if content else None
    except orjson.JSONDecodeError:
        resp["text"] = redact.redact(content.decode("utf-8", "replace"))[:2000]
        resp["content_type"] = content_type or "text/plain"
    return {"request": {"method": method, "path": split.path, **({"params": params} if params else {})},
            "response": resp}


class _RecordingPool:
    """A connection pool that passes every request on and keeps its answer."""

    def __init__(self, inner, exchanges: list):
        self.inner, self.exchanges = inner, exchanges

    async def request(self, method, url, *, headers=None, content=None, extensions=None):
        resp = await self.inner.request(method, url, headers=headers, content=content, extensions=extensions)
        hdrs = http_mod.Headers(resp.headers)
        body = http_mod._decoded(resp.content, hdrs.get("content-encoding"))
        target = url.target.decode("ascii") if isinstance(url, httpcore.URL) else str(url)
        self.exchanges.append(_exchange(method.decode() if isinstance(method, bytes) else method,
                                        "http://recorded" + target, resp.status, hdrs.get("content-type", ""), body))
        return resp

    async def aclose(self):
        await self.inner.aclose()


class _RecordingTransport:
    def __init__(self, inner, exchanges: list):
        self.inner, self.exchanges = inner, exchanges

    async def handle_async_request(self, request):
        import httpx

        resp = await self.inner.handle_async_request(request)
        try:
            content = await resp.aread()
        finally:
            await resp.aclose()
        self.exchanges.append(_exchange(request.method, str(request.url), resp.status_code,
                                        resp.headers.get("content-type", ""), content))
        headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(resp.status_code, headers=headers, content=content, request=request)

    async def aclose(self):
        await self.inner.aclose()


class RecordingClients(Clients):
    """Clients that keep every answer (in `exchanges`), scrubbed as it is received."""

    def __init__(self, sandbox_dir=None):
        super().__init__(sandbox_dir)
        self.exchanges: list[dict] = []
        self._wrapped: dict[int, Any] = {}

    def pool(self, base_url: str, pool: str = ""):
        inner = super().pool(base_url, pool)
        found = self._wrapped.get(id(inner))
        if found is None:
            found = self._wrapped[id(inner)] = _RecordingPool(inner, self.exchanges)
        return found

    def resolve(self, base_url: str, pool: str = ""):
        import httpx

        client, url = super().resolve(base_url, pool)
        found = self._wrapped.get(id(client))
        if found is None:
            transport = _RecordingTransport(self.transport(client), self.exchanges)
            found = self._wrapped[id(client)] = httpx.AsyncClient(transport=transport, timeout=30.0)
            self._transports[id(found)] = transport
        return found, url


class Replay:
    """Answers from a recording: the answer recorded for the same method, path and parameters; else the next
    unused one for the same method and path (a date window's parameters change from day to day); else, for an
    OAuth token request, a token; else 404 with a body that says what was asked."""

    def __init__(self, exchanges: list[dict]):
        self.exchanges = exchanges
        self.used: set[int] = set()
        self.unmatched: list[str] = []

    def answer(self, method: str, path: str, params: dict, body: bytes) -> tuple[int, str, bytes]:
        same = [i for i, e in enumerate(self.exchanges)
                if e["request"]["method"] == method and e["request"]["path"] == path]
        exact = [i for i in same if (self.exchanges[i]["request"].get("params") or {}) == params]
        pick = next((i for i in exact if i not in self.used), exact[-1] if exact else None)
        if pick is None:
            pick = next((i for i in same if i not in self.used), None)
        if pick is None:
            if method == "POST" and b"grant_type=" in (body or b""):
                token = {"access_token": "replayed-access-token", "refresh_token": "replayed-refresh-token",
                         "token_type": "Bearer", "expires_in": 3600}
                return 200, "application/json", orjson.dumps(token)
            self.unmatched.append(f"{method} {path}" + (f" {params}" if params else ""))
            return 404, "application/json", orjson.dumps(
                {"message": f"no recorded answer for {method} {path} {params or ''}".strip()})
        self.used.add(pick)
        resp = self.exchanges[pick]["response"]
        if "json" in resp:
            return resp["status"], "application/json", orjson.dumps(resp["json"])
        return resp["status"], resp.get("content_type", "text/plain"), str(resp.get("text", "")).encode()


class _ReplayPool:
    def __init__(self, replay: Replay):
        self.replay = replay

    async def request(self, method, url, *, headers=None, content=None, extensions=None):
        target = url.target.decode("ascii")
        split = urlsplit("http://replay" + target)
        status, ctype, body = self.replay.answer(method.decode() if isinstance(method, bytes) else method,
                                                 split.path, _params(split.query), content or b"")
        resp = httpcore.Response(status, headers=[(b"Content-Type", ctype.encode())], content=body)
        await resp.aread()
        return resp

    async def aclose(self):
        pass


class ReplayClients(Clients):
    """Clients whose every request, to any host or simulator, is answered from a recording."""

    def __init__(self, exchanges: list[dict]):
        super().__init__()
        self.replay = Replay(exchanges)
        self._replay_client = None

    def pool(self, base_url: str, pool: str = ""):
        return _ReplayPool(self.replay)

    def resolve(self, base_url: str, pool: str = ""):
        import httpx

        if self._replay_client is None:
            async def handle(request: httpx.Request) -> httpx.Response:
                status, ctype, body = self.replay.answer(request.method, request.url.path,
                                                         _params(request.url.query.decode()), await request.aread())
                return httpx.Response(status, headers={"Content-Type": ctype}, content=body)

            transport = httpx.MockTransport(handle)
            self._replay_client = httpx.AsyncClient(transport=transport, timeout=30.0)
            self._transports[id(self._replay_client)] = transport
        url = base_url
        if base_url.startswith(SANDBOX_SCHEME):
            name = base_url[len(SANDBOX_SCHEME):].split("/", 1)[0]
            url = f"http://{name}.sandbox.invalid{base_url[len(SANDBOX_SCHEME) + len(name):]}"
        return self._replay_client, url

    async def aclose(self) -> None:
        if self._replay_client is not None:
            await self._replay_client.aclose()
        await super().aclose()


def load_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def dump_yaml(data: Any, path: Path, header: str = "") -> None:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    path.write_text(header + text, encoding="utf-8")
