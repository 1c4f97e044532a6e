"""One HTTP layer for every integration and the destination.

Timeouts, retries with exponential backoff and jitter on 429/5xx/connection errors, `Retry-After` (header, or
a wait inside the body for APIs that send it there), proactive rate limits shared by everything that uses the
same account, and a guard that no request ever leaves the declared base URL.
"""
from __future__ import annotations

import asyncio
import collections
import datetime
import email.utils
import functools
import random
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol
from urllib.parse import quote_plus, unquote, urlsplit

import httpcore
import orjson
from loguru import logger

from runner import __version__, metrics
from runner.errors import ProviderError, UnsafeRequest

RETRY_STATUSES = {429, 500, 502, 503, 504}
# What a request that never got an answer raises, from httpx (the sandbox's transport) or from httpcore (the
# network): the same names (ConnectError, ReadTimeout, RemoteProtocolError, ...) in both.
# httpx is imported only by runs that use one of its clients (a sandbox, an OAuth flow): ≈ 0.1 s of start-up.
_UNANSWERED_CORE = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                    httpcore.UnsupportedProtocol, httpcore.ProxyError)
UNANSWERED = _UNANSWERED_CORE
# What httpx's client would add, and a User-Agent that says who is calling (providers ask for one).
DEFAULT_HEADERS = {"Accept": "*/*", "Accept-Encoding": "gzip, deflate", "User-Agent": f"runner/{__version__}"}
SANDBOX_SCHEME = "sandbox://"
# Connections per pool, and how many stay open between requests: the same for httpcore pools and OAuth clients.
MAX_CONNECTIONS, MAX_KEEPALIVE = 64, 32
# New TCP connections to one host being opened at once (every pool of a run), and how long one attempt may go
# unanswered before a second starts beside it (see Connector).
CONNECTS_AT_ONCE, BACKUP_CONNECT_S, CONNECT_ATTEMPTS = 8, 0.25, 3
# One attempt as a whole (waiting to connect, connecting, sending, reading every byte) may take this many times
# the per-read timeout.
DEADLINE_TIMEOUTS = 4
# A request with all its attempts and the backoff between them (retry.deadline_s): without it, a server
# dripping a byte at a time held each request for attempts × 4 × timeout_s (12.5 min at the defaults).
DEADLINE_S = 120.0
# Called as observer(method, URL sent, request headers, Response) for every answer (`runner integrations trace`).
OBSERVERS: list[Callable] = []


@dataclass
class Policy:
    attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 30.0
    retry_after_body: Callable[[Any], Any] | None = None  # JMESPath search on a 429 body
    deadline_s: float = DEADLINE_S  # the request with every retry (waits the server asks for are not counted)

    @classmethod
    def from_spec(cls, raw: dict | None, expression=None) -> "Policy":
        raw = raw or {}
        return cls(attempts=raw.get("attempts", 5), backoff_s=raw.get("backoff_s", 0.5),
                   max_backoff_s=raw.get("max_backoff_s", 30.0), timeout_s=raw.get("timeout_s", 30.0),
                   retry_after_body=expression.search if expression is not None else None,
                   deadline_s=raw.get("deadline_s", DEADLINE_S))


class SharedBudget(Protocol):
    """Request budgets kept where several processes see them (runner/state/postgres.py RateBudget)."""

    def take(self, scope: str, interval: float | None, windows: tuple[tuple[int, float], ...]) -> tuple[float, bool]:
        """One request: (seconds to wait, taken); not taken: ask again after the wait."""

    def hold(self, scope: str, seconds: float) -> None:
        """No request of `scope` before `seconds` from now, in any process."""


class Limiter:
    """A token bucket plus a concurrency cap, shared by every connection with the same scope in this process
    and, with a shared budget (share), by every process on the same state store."""

    def __init__(self, per_second: float | None, concurrency: int | None,
                 windows: list[tuple[int, float]] | None = None, scope: str = ""):
        self.rate = per_second
        self.capacity = max(1.0, per_second or 1.0)
        # Start with one token, not a full bucket: a burst at start-up is what trips a provider's limiter.
        self.tokens = 1.0
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(concurrency) if concurrency else None
        self.paused_until = 0.0
        # Quotas over longer windows (e.g. 20,000 an hour besides 2,000 a minute): an exact sliding log each.
        self.windows = [(int(n), float(s), collections.deque()) for n, s in (windows or [])]
        self.scope = scope  # whose budget: a provider account's (limiter_for)
        self.shared: SharedBudget | None = None  # a budget other processes draw on too (share)

    def share(self, budget: "SharedBudget | None") -> None:
        """Draw on `budget` as well, under this limiter's scope: the processes that share a state store (workers
        on several machines) then stay within the declared limits together. This process's own bucket still
        paces its requests; the shared budget spaces them among all. None: no budget but this process's."""
        self.shared = budget

    async def _take_shared(self) -> None:
        interval = 1.0 / self.rate if self.rate else None
        windows = tuple((n, s) for n, s, _ in self.windows)
        while True:
            wait, taken = await asyncio.to_thread(self.shared.take, self.scope, interval, windows)
            if not taken and wait >= QUOTA_WAIT_LOGGED_S:
                logger.warning("a quota shared with the other runners on this state store is used up: waiting {} "
                               "before the next request", _duration(wait))
            if wait > 0:
                await asyncio.sleep(wait)
            if taken:
                return

    def _window_full(self, now: float) -> tuple[str, int]:
        """Which quota window is full (for the log line): its span in words and its number of requests."""
        limit, seconds = max(((n, w) for n, w, log in self.windows if len(log) >= n), key=lambda x: x[1])
        return {3600.0: "hourly", 86400.0: "daily"}.get(seconds, f"{seconds:g}-second"), limit

    def _window_wait(self, now: float) -> float:
        wait = 0.0
        for limit, seconds, log in self.windows:
            while log and log[0] <= now - seconds:
                log.popleft()
            if len(log) >= limit:
                wait = max(wait, log[0] + seconds - now)
        return wait

    async def acquire(self) -> None:
        if self.rate is None and not self.paused_until and not self.windows:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                if now < self.paused_until:
                    await asyncio.sleep(self.paused_until - now)
                    continue
                wait = self._window_wait(now)
                if wait > 0:
                    if wait >= QUOTA_WAIT_LOGGED_S:  # an hourly or daily quota: the run would look hung
                        logger.warning("the {} quota of {} requests is used up: waiting {} before the next request",
                                       *self._window_full(now), _duration(wait))
                    await asyncio.sleep(wait)
                    continue
                if self.rate is not None:
                    self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                    self.stamp = now
                    if self.tokens < 1.0:
                        await asyncio.sleep((1.0 - self.tokens) / self.rate)
                        continue
                    self.tokens -= 1.0
                for _, _, log in self.windows:
                    log.append(now)
                if self.shared is not None:
                    await self._take_shared()
                return

    async def hold(self, seconds: float) -> None:
        """A 429 told us to wait: pause here (pause) and, with a shared budget, in every process sharing it."""
        self.pause(seconds)
        if self.shared is not None:
            await asyncio.to_thread(self.shared.hold, self.scope, seconds)

    def pause(self, seconds: float) -> None:
        """A 429 told us to wait: every request sharing this budget waits, not only the one refused. The
        bucket starts empty when the pause ends: a pause must not earn tokens for a burst right after it,
        the moment the provider asked for less."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)
        self.tokens, self.stamp = 0.0, self.paused_until


# By event loop (a limiter's lock and semaphore belong to one): every run on a loop shares its limiters, as
# the syncs a `runner worker` runs side by side on its one loop must (runner/engine/schedule.py sync_loop).
# None: made outside a loop (they bind to the first loop that uses them).
_limiters: dict[asyncio.AbstractEventLoop | None, dict[tuple, Limiter]] = {}
QUOTA_WAIT_LOGGED_S = 5.0
# A wait shorter than this is the lock's own cost, not a rate limit (runner_rate_limit_waits counts the rest).
RATE_WAIT_NOTED_S = 0.001


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


WINDOWS = {"requests_per_hour": 3600.0, "requests_per_day": 86400.0}


def limiter_for(scope: str, rate_limit: dict | None) -> Limiter:
    rate_limit = rate_limit or {}
    rps = rate_limit.get("requests_per_second")
    if rps is None and rate_limit.get("requests_per_minute"):
        rps = rate_limit["requests_per_minute"] / 60.0
    windows = tuple((rate_limit[k], s) for k, s in WINDOWS.items() if rate_limit.get(k))
    key = (scope, rps, rate_limit.get("concurrency"), windows)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    mine = _limiters.get(loop)
    if mine is None:
        for ended in [other for other in _limiters if other is not None and other.is_closed()]:
            del _limiters[ended]
        mine = _limiters[loop] = {}
    lim = mine.get(key)
    if lim is None:
        lim = mine[key] = Limiter(rps, rate_limit.get("concurrency"), list(windows), scope=scope)
    return lim


def reset_limiters() -> None:
    """Every limiter forgotten: the next requests start with fresh budgets (a test's)."""
    _limiters.clear()


class Headers:
    """A response's headers, looked up by name in any case (what httpx.Headers gives the runner), decoded on
    first use. A name sent more than once gets its values joined with ", "."""

    __slots__ = ("_raw", "_names")

    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self._raw = raw
        self._names: dict[str, str] | None = None

    def _index(self) -> dict[str, str]:
        if self._names is None:
            names: dict[str, str] = {}
            for k, v in self._raw:
                name, value = k.decode("latin-1").lower(), v.decode("latin-1")
                names[name] = f"{names[name]}, {value}" if name in names else value
            self._names = names
        return self._names

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._index().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._index()[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index()

    def __repr__(self) -> str:
        return f"Headers({list(self._index())})"


def _with_httpx():
    """Import httpx for a run that uses its clients; what its transports raise counts as unanswered too."""
    global UNANSWERED
    import httpx

    UNANSWERED = (httpx.TransportError, *_UNANSWERED_CORE)
    return httpx


def _ssl_context():
    """The TLS context httpx makes by default: certifi's CA bundle, or SSL_CERT_FILE / SSL_CERT_DIR."""
    import os
    import ssl

    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


@dataclass
class Response:
    status: int
    headers: Headers  # or httpx.Headers, from a sandbox: both look names up in any case
    content: bytes
    url: str
    elapsed_s: float = 0.0
    _json: Any = field(default=None, repr=False)

    def json(self, what: str = "the response") -> Any:
        if self._json is None:
            self._json = parse_json(self.content, self.headers.get("content-type", ""), what, self.status)
        return self._json


def parse_json(content: bytes, content_type: str, what: str, status: int | None = None) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        from runner.redact import redact

        head = redact(content[:200].decode("utf-8", "replace").strip())
        if "html" in content_type or head.lower().startswith(("<!doctype", "<html")):
            msg = f"{what} was an HTML page, not JSON (HTTP {status}): the provider or a proxy in between returned an error page"
        elif not content:
            msg = f"{what} was empty (HTTP {status})"
        else:
            msg = f"{what} is not valid JSON (HTTP {status}, {exc}); it starts with {head[:80]!r}"
        raise ProviderError(msg, status=status, fix="run again later; if it persists, check the provider's status page") from None


_ERROR_PATHS = ("error.message", "error_description", "message", "Fault.Error[0].Detail", "Fault.Error[0].Message",
                "fault.error[0].detail", "title", "error")


def error_message(resp: Response) -> str:
    """The provider's own words for an error, from whichever common envelope it uses.

    Redacted here, where provider text enters the runner: an API that echoes the key it was sent must not
    put that key into errors, verdicts, the state store or a support bundle.
    """
    from runner.redact import redact

    return redact(_error_message(resp))


def _error_message(resp: Response) -> str:
    try:
        body = orjson.loads(resp.content)
    except Exception:
        text = resp.content[:200].decode("utf-8", "replace").strip()
        return text if text and not text.lower().startswith("<") else f"HTTP {resp.status}"
    import jmespath

    for p in _ERROR_PATHS:
        try:
            v = jmespath.search(p, body)
        except Exception:
            v = None
        if isinstance(v, str) and v:
            return v
    return f"HTTP {resp.status}"


@functools.lru_cache(maxsize=1)
def _no_trust():
    import ssl

    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names, and trusts none


class Connector(httpcore.AsyncNetworkBackend):
    """How the run's connection pools open TCP connections (httpcore's network backend).

    A server whose queue of connections waiting to be accepted is full drops the next SYN, and the kernel
    sends it again only after a second (then three). Fifty connections starting at once against one host
    overflowed the small queue of a plain Python server (the benchmark's: 5) and a third of them sat idle for
    that second (issue 7). So, per host and port: at most CONNECTS_AT_ONCE connections are being opened at
    a time (a burst the size of the run's connections is what overflows such a queue), and an attempt with
    no answer after BACKUP_CONNECT_S gets a second one beside it (up to CONNECT_ATTEMPTS), the first to
    connect wins and the others are closed: a lost SYN costs a quarter of a second, not a second. Browsers
    do the same for the same reason (Chromium's backup connect job, RFC 8305's connection attempt delay)."""

    def __init__(self, backend: httpcore.AsyncNetworkBackend | None = None):
        self._backend = backend or httpcore.AnyIOBackend()
        self._gates: dict[tuple[str, int], asyncio.Semaphore] = {}

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options=None) -> httpcore.AsyncNetworkStream:
        gate = self._gates.get((host, port))
        if gate is None:
            gate = self._gates[(host, port)] = asyncio.Semaphore(CONNECTS_AT_ONCE)
        async with gate:
            attempts: list[asyncio.Task] = []  # those still running
            started, failure = 0, None
            try:
                while True:
                    if started < CONNECT_ATTEMPTS:
                        started += 1
                        attempts.append(asyncio.ensure_future(self._backend.connect_tcp(
                            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options)))
                    done, _ = await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED,
                                                 timeout=BACKUP_CONNECT_S if started < CONNECT_ATTEMPTS else None)
                    for a in done:
                        attempts.remove(a)
                        if a.exception() is None:
                            return a.result()
                        failure = failure or a.exception()
                    if done and not attempts:  # an answer (refused, unreachable, timed out): no second guess
                        raise failure
            finally:
                await self._abandon(attempts)

    @staticmethod
    async def _abandon(attempts: list[asyncio.Task]) -> None:
        """Stop the attempts that lost; one that connected meanwhile is closed."""
        for a in attempts:
            a.cancel()
        for outcome in await asyncio.gather(*attempts, return_exceptions=True):
            if isinstance(outcome, httpcore.AsyncNetworkStream):
                await outcome.aclose()

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        return await self._backend.connect_unix_socket(path, timeout=timeout, socket_options=socket_options)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def proxy_for(base_url: str) -> str | None:
    """The proxy for a base URL as the environment names it (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY,
    in either case; on macOS and Windows also the system's settings), which httpx's clients honour by
    default: a machine whose only way out is a company's proxy must reach the providers through it."""
    import os
    import sys

    if sys.platform.startswith("linux") and not any(k.lower().endswith("_proxy") for k in os.environ):
        return None  # nothing names a proxy (and urllib.request, ≈ 30 ms of start-up, is not needed to say so)
    import urllib.request

    split = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(split.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(split.netloc, proxies):
        return None
    return proxy if "://" in proxy else "http://" + proxy


def _proxy_parts(proxy: str) -> tuple[str, tuple[str, str] | None]:
    """A proxy URL without its user and password, and those (for Proxy-Authorization), kept out of the logs."""
    from runner import redact

    split = urlsplit(proxy)
    if split.username is None:
        return proxy, None
    password = unquote(split.password or "")
    redact.register(password)
    host = f"[{split.hostname}]" if ":" in (split.hostname or "") else split.hostname or ""
    netloc = host + (f":{split.port}" if split.port else "")
    return split._replace(netloc=netloc).geturl(), (unquote(split.username), password)


class Clients:
    """The connections of one run: httpcore connection pools for the network, the httpx clients that OAuth
    flows use (authlib), and one httpx transport per built-in sandbox simulator."""

    def __init__(self, sandbox_dir=None):
        self.sandbox_dir = sandbox_dir
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._transports: dict[int, httpx.AsyncBaseTransport] = {}
        self._pools: dict[str, httpcore.AsyncConnectionPool] = {}
        self._connector = Connector()  # one for every pool: its limit of connections being opened is per host
        self._tls = None

    def transport(self, client: httpx.AsyncClient) -> httpx.AsyncBaseTransport:
        """The transport under a client from `resolve` (see Http.request)."""
        return self._transports[id(client)]

    def _verify(self, tls: bool):
        if not tls:
            # A plain-http base URL never needs the CA bundle (loading it is ~35 ms of start-up): it gets a
            # TLS context with no trusted certificates, so a TLS handshake there could only fail.
            return _no_trust()
        if self._tls is None:
            self._tls = _ssl_context()
        return self._tls

    def pool(self, base_url: str, pool: str = "") -> httpcore.AsyncConnectionPool:
        """The connection pool for a network base URL. `pool` gives a connection its own: httpcore checks every
        pooled socket on each request, so fifty connections sharing one pool spent more time in those checks
        than in their requests. The TLS context (the costly part) is shared. Through the proxy the environment
        names for the URL, as httpx's clients go by default (`proxy_for`)."""
        tls = base_url.startswith("https:")
        proxy = proxy_for(base_url)
        key = f"{'tls' if tls else 'plain'}:{pool}:{proxy or ''}"
        found = self._pools.get(key)
        if found is None:
            common = dict(ssl_context=self._verify(tls), max_connections=MAX_CONNECTIONS,
                          max_keepalive_connections=MAX_KEEPALIVE, keepalive_expiry=5.0, network_backend=self._connector)
            if proxy is None:
                found = httpcore.AsyncConnectionPool(**common)
            else:
                url, auth = _proxy_parts(proxy)
                found = httpcore.AsyncHTTPProxy(proxy_url=url, proxy_auth=auth,
                                                proxy_ssl_context=self._verify(True) if url.startswith("https:") else None,
                                                **common)
            self._pools[key] = found
        return found

    def resolve(self, base_url: str, pool: str = "") -> tuple[httpx.AsyncClient, str]:
        """An httpx client for a base URL (OAuth flows), and the URL it answers on: a built-in sandbox's
        transport for sandbox://<name>, the network otherwise."""
        httpx = _with_httpx()
        if base_url.startswith(SANDBOX_SCHEME):
            name = base_url[len(SANDBOX_SCHEME):].split("/", 1)[0]
            client = self._clients.get(name)
            if client is None:
                from runner import sandbox  # only runs that use a sandbox pay for importing it

                transport = sandbox.get_transport(name, self.sandbox_dir)
                client = self._clients[name] = httpx.AsyncClient(transport=transport, timeout=30.0)
                self._transports[id(client)] = transport
            rest = base_url[len(SANDBOX_SCHEME) + len(name):]
            return client, f"http://{name}.sandbox.invalid{rest}"
        tls = base_url.startswith("https:")
        proxy = proxy_for(base_url)
        key = f"network:{'tls' if tls else 'plain'}:{pool}:{proxy or ''}"
        client = self._clients.get(key)
        if client is None:
            # A transport of our own turns off httpx's reading of the proxy variables: given here instead.
            transport = httpx.AsyncHTTPTransport(verify=self._verify(tls), proxy=proxy, limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_KEEPALIVE))
            client = self._clients[key] = httpx.AsyncClient(timeout=30.0, transport=transport, follow_redirects=False)
            self._transports[id(client)] = transport
        return client, base_url

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        for p in self._pools.values():
            await p.aclose()
        self._clients.clear()
        self._pools.clear()
        self._transports.clear()


# Characters a request target may carry as they are; anything else (a space, non-ASCII) is percent-encoded
# by httpx's URL parser first.
_TARGET_OK = re.compile(r"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*")


_DEFAULT_PORTS = {b"http": 80, b"https": 443}
# What a header value may not hold: line breaks and NUL (h11 refuses them; they would split the header),
# and, as the runner sends values, anything outside ASCII.
_BAD_HEADER_CHARS = re.compile(r"[\r\n\x00]|[^\x00-\x7f]")


def _header_value(name: str, value: str) -> bytes:
    """A header value as bytes, or an error that names the header and where the bad character is, never
    the value: it is usually a key (a line break from a Windows .env file, a quote pasted from a document)."""
    bad = _BAD_HEADER_CHARS.search(value)
    if bad is None:
        return value.encode("ascii")
    what = {"\r": "a carriage return", "\n": "a line break", "\x00": "a NUL character"}.get(bad.group(), "a non-ASCII character")
    raise UnsafeRequest(f"the {name} header holds {what} at position {bad.start() + 1}, which HTTP cannot send; "
                        f"it usually comes from a secret (an API key or token)",
                        fix="copy the key again into its environment variable or file, without line breaks or "
                            "typographic quotes")


def _address(split) -> tuple[bytes, bytes, int | None, bytes]:
    """Scheme, host (IDNA), port (None for the scheme's default) and Host header of a split URL."""
    scheme = split.scheme.lower().encode("ascii")
    host = (split.hostname or "").encode("idna")
    port = None if split.port == _DEFAULT_PORTS.get(scheme) else split.port
    netloc = b"[" + host + b"]" if b":" in host else host
    return scheme, host, port, netloc + (b":%d" % port if port is not None else b"")


def _query(params: dict) -> str:
    """Query parameters as httpx encodes them: lists repeat the name, True/False are true/false, None empty."""
    return "&".join(_pair(k, "true" if x is True else "false" if x is False else "" if x is None else str(x))
                    for k, v in params.items() for x in (v if isinstance(v, (list, tuple)) else [v]))


@functools.lru_cache(maxsize=1024)
def _pair(name: str, value: str) -> str:
    # A paging request repeats all its parameters but the cursor: each is percent-encoded once.
    return f"{quote_plus(name)}={quote_plus(value)}"


def _decoded(content: bytes, encoding: str | None) -> bytes:
    """The body as sent before the Content-Encoding the runner asked for (gzip, deflate) was applied. An
    empty body is empty whatever the header says (as httpx reads it: a 204, or a 503 from a proxy)."""
    if not encoding or not content:
        return content
    for coding in reversed([c.strip().lower() for c in encoding.split(",")]):
        if coding in ("gzip", "x-gzip"):
            content = zlib.decompress(content, zlib.MAX_WBITS | 16)
        elif coding == "deflate":
            try:
                content = zlib.decompress(content)
            except zlib.error:  # raw deflate, without the zlib header some servers leave out
                content = zlib.decompress(content, -zlib.MAX_WBITS)
    return content


class Http:
    """Requests to one base URL with one set of default headers, one policy and one limiter."""

    def __init__(self, clients: Clients, base_url: str, *, headers: dict | None = None, policy: Policy | None = None,
                 limiter: Limiter | None = None, label: str = "provider", pool: str = "",
                 advice: dict | None = None):
        base_url = base_url.rstrip("/")
        self.advice = advice or {}  # status -> what to do, for 401/403 (the spec's auth.advice)
        if base_url.startswith(SANDBOX_SCHEME):
            client, self.base_url = clients.resolve(base_url, pool)
            self._transport, self._pool = clients.transport(client), None
        else:
            self.base_url, self._transport, self._pool = base_url, None, clients.pool(base_url, pool)
        self.headers = headers or {}
        self.policy = policy or Policy()
        t = self.policy.timeout_s
        self._timeout = {"connect": t, "read": t, "write": t, "pool": t}
        self.limiter = limiter
        self.label = label
        self.requests = 0
        self.retries = 0
        split = urlsplit(self.base_url)
        self._origin = (split.scheme, split.netloc)
        self._prefix = split.path.rstrip("/")
        # Every request goes to this origin (see url()), as httpx would address it.
        self._scheme, self._host, self._port, netloc = _address(split)
        self._host_header = (b"Host", netloc)

    def url(self, path_or_url: str) -> str:
        """Join a path to the base URL; an absolute URL must stay on the base URL's host and path. A path with
        `.` or `..` segments is refused: a server resolves them, so `/v1/../admin` (an id from the provider or
        the command line, a next-page link) would leave the declared path with the runner's credentials."""
        head = path_or_url.split("?", 1)[0].split("#", 1)[0]
        if is_link(path_or_url):
            s = urlsplit(path_or_url)
            inside = not self._prefix or s.path == self._prefix or s.path.startswith(self._prefix + "/")
            if (s.scheme, s.netloc) != self._origin or not inside or _dot_segments(s.path):
                raise UnsafeRequest(
                    f"{self.label} sent a link to {s.scheme}://{s.netloc}{s.path}, outside its declared address "
                    f"{self.base_url}; the runner does not follow it",
                    fix="if the provider really moved, update base_url in the integration spec")
            return path_or_url
        if not path_or_url.startswith("/"):
            path_or_url = "/" + path_or_url
        if _dot_segments(head):
            raise UnsafeRequest(f"a request to {self.label} would go to {head}, whose '..' or '.' would leave the "
                                f"declared address {self.base_url}; the runner does not send it",
                                fix="check the invoice id or number it was made from")
        return self.base_url + path_or_url

    async def request(self, method: str, path: str, *, params: dict | None = None, headers: dict | None = None,
                      json: Any = None, content: bytes | None = None, ok: tuple = ()) -> Response:
        """Send with retries. Returns the response for 2xx and for statuses in `ok`; raises otherwise."""
        url = self.url(path)
        hdrs = _merged(DEFAULT_HEADERS, self.headers, headers or {})
        body = orjson.dumps(json) if json is not None else content
        if json is not None:
            if not any(k.lower() == "content-type" for k in hdrs):
                hdrs["Content-Type"] = "application/json"
        attempt = 0
        # The whole request, retries and backoff included, ends by this moment; a wait the server asked for
        # (Retry-After) moves it on by that wait, since the server said when to come back.
        deadline = time.monotonic() + self.policy.deadline_s
        while True:
            attempt += 1
            if self.limiter is not None:
                waiting = time.monotonic()
                await self.limiter.acquire()
                metrics.rate_limit_wait(self.label, time.monotonic() - waiting - RATE_WAIT_NOTED_S)
            started = time.monotonic()
            try:
                if self.limiter is not None and self.limiter.slots is not None:
                    async with self.limiter.slots:
                        status, resp_headers, content, sent = await self._send_within(method, url, params, hdrs, body,
                                                                                      deadline)
                else:
                    status, resp_headers, content, sent = await self._send_within(method, url, params, hdrs, body,
                                                                                  deadline)
                self.requests += 1
            except httpcore.LocalProtocolError as exc:  # nothing was sent, and sending it again cannot help
                # h11's own words may quote a header's value (a key): only the kind of error is shown.
                raise UnsafeRequest(f"the request to {self.label} is not valid HTTP ({type(exc).__name__}), so it "
                                    f"was not sent", fix="check the spec's headers and the secrets they use") from None
            except UNANSWERED as exc:
                self.requests += 1
                metrics.request(self.label, None)
                wait, now = self._backoff(attempt), time.monotonic()
                if now >= deadline or (attempt < self.policy.attempts and now + wait >= deadline):
                    raise ProviderError(
                        f"{self.label} gave no complete answer within {self.policy.deadline_s:g} s, the request's "
                        f"deadline ({attempt} attempts, the last ended in {type(exc).__name__})",
                        fix="check the network and the provider's status page, then run again; for a provider "
                            "that is this slow, raise retry.deadline_s in the integration spec") from None
                if attempt >= self.policy.attempts:
                    raise ProviderError(f"{self.label} could not be reached after {attempt} attempts: "
                                        f"{type(exc).__name__}: {exc}",
                                        fix="check the network and the provider's status page, then run again") from None
                logger.warning("{} {}: {} — retrying in {:.1f}s", method, _short(url), type(exc).__name__, wait)
                self.retries += 1
                await asyncio.sleep(wait)
                continue
            resp = Response(status=status, headers=resp_headers, content=content, url=sent,
                            elapsed_s=time.monotonic() - started)
            logger.debug("{} {} -> HTTP {}", method, sent, status)  # the log sink redacts secrets
            for observe in OBSERVERS:
                observe(method, sent, hdrs, resp)
            metrics.request(self.label, status)
            if 200 <= resp.status < 300 or resp.status in ok:
                return resp
            if resp.status in RETRY_STATUSES and attempt < self.policy.attempts:
                asked = self._asked_wait(resp)
                wait = self._backoff(attempt) if asked is None else asked
                if asked is not None:
                    deadline += wait
                elif time.monotonic() + wait >= deadline:
                    raise _status_error(self.label, resp, attempt, method, self.advice)
                if resp.status == 429 and self.limiter is not None:
                    await self.limiter.hold(wait)
                logger.info("{} {}: HTTP {} — retrying in {:.1f}s (attempt {}/{})", method, _short(url),
                            resp.status, wait, attempt, self.policy.attempts)
                self.retries += 1
                await asyncio.sleep(wait)
                continue
            raise _status_error(self.label, resp, attempt, method, self.advice)

    async def _send_within(self, method: str, url: str, params, headers: dict, body,
                           deadline: float) -> tuple[int, Headers, bytes, str]:
        """One attempt, as a whole within DEADLINE_TIMEOUTS times the policy's timeout and before the request's
        `deadline` (a time.monotonic() moment): that timeout is per read, and a server (or a middlebox) sending
        a byte at a time would otherwise hold the request for ever."""
        limit = min(self.policy.timeout_s * DEADLINE_TIMEOUTS, max(0.0, deadline - time.monotonic()))
        try:
            async with asyncio.timeout(limit):
                return await self._send(method, url, params, headers, body)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no complete answer within {limit:.3g} s") from None

    async def _send(self, method: str, url: str, params, headers: dict, body) -> tuple[int, Headers, bytes, str]:
        """One request. On the network, straight to httpcore's connection pool (the transport under httpx):
        httpx's client layers (cookies, auth flows, redirects, event hooks) and its request and response
        models are nothing the runner uses, and cost half the CPU of a request. A built-in sandbox answers
        through its httpx transport. Returns the status, headers, body (gzip/deflate undone) and URL sent."""
        if params:  # added to any query the URL has already (a provider's next link keeps its own)
            url += ("&" if "?" in url else "?") + _query(params)
        if self._pool is None:
            import httpx

            request = httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": self._timeout})
            raw = await self._transport.handle_async_request(request)
            try:
                content = await raw.aread()
            finally:
                await raw.aclose()
                # httpx's response and its (read, closed) stream refer to each other: without this, every
                # body would stay in memory until the cyclic garbage collector happens to run.
                raw.stream = None
            return raw.status_code, raw.headers, content, url
        # url() keeps every request on the base URL's origin: only the target (path and query) varies.
        target = url[url.index("/", url.index("://") + 3):] if url.count("/") > 2 else "/"
        if not _TARGET_OK.fullmatch(target):
            httpx = _with_httpx()
            target = httpx.URL(url).raw_path.decode("ascii")
            url = str(httpx.URL(url))
        try:
            hdrs = [self._host_header, *((k.encode("ascii"), _header_value(k, v)) for k, v in headers.items())]
        except UnicodeEncodeError:
            raise UnsafeRequest(f"a header name of the request to {self.label} has a non-ASCII character",
                                fix="check the spec's `auth.headers`") from None
        if body is not None:
            hdrs.append((b"Content-Length", str(len(body)).encode("ascii")))
        raw = await self._pool.request(method, httpcore.URL(scheme=self._scheme, host=self._host, port=self._port,
                                                            target=target.encode("ascii")),
                                       headers=hdrs, content=body, extensions={"timeout": self._timeout})
        resp_headers = Headers(raw.headers)
        try:
            content = _decoded(raw.content, resp_headers.get("content-encoding"))
        except zlib.error as exc:
            if not 200 <= raw.status < 300:  # an error's body is only read for its message: the status decides
                return raw.status, resp_headers, raw.content, url
            raise ProviderError(f"{self.label}'s answer could not be decompressed "
                                f"({resp_headers.get('content-encoding')}: {exc})",
                                status=raw.status, fix="run again; if it persists, the provider or a proxy "
                                                       "in between is sending corrupt answers") from None
        return raw.status, resp_headers, content, url

    def _backoff(self, attempt: int) -> float:
        cap = min(self.policy.max_backoff_s, self.policy.backoff_s * (2 ** (attempt - 1)))
        return cap * (0.5 + random.random() / 2)  # jitter: many clients must not retry in step

    def _wait_for(self, resp: Response, attempt: int) -> float:
        """The wait before the next attempt: the one the server asked for, or the runner's own backoff."""
        asked = self._asked_wait(resp)
        return self._backoff(attempt) if asked is None else asked

    def _asked_wait(self, resp: Response) -> float | None:
        """The wait the server asked for (Retry-After, or a wait in a 429's body), if it did."""
        ra = resp.headers.get("retry-after")
        if ra:
            try:
                return min(120.0, max(0.0, float(ra)))
            except ValueError:
                try:
                    moment = email.utils.parsedate_to_datetime(ra)
                    if moment.tzinfo is None:  # "-0000": UTC, with no statement of the local zone (RFC 5322)
                        moment = moment.replace(tzinfo=datetime.timezone.utc)
                    when = moment.timestamp()
                    return min(120.0, max(0.0, when - time.time()))
                except Exception:
                    pass
        if resp.status == 429:
            try:
                body = orjson.loads(resp.content)
                v = self.policy.retry_after_body(body) if self.policy.retry_after_body else (
                    body.get("retryAfter") if isinstance(body, dict) else None)
                if isinstance(v, (int, float)) and v >= 0:
                    return min(120.0, float(v))
            except Exception:
                pass
        return None


def is_link(path_or_url: str) -> bool:
    """Whether this is an absolute link (scheme and host) rather than a path: a "://" in a query value does
    not make one."""
    return "://" in path_or_url.split("?", 1)[0].split("#", 1)[0]


def _dot_segments(path: str) -> bool:
    """Whether a URL path has a `.` or `..` segment, percent-encoded or not (`%2e%2e` is `..` to a server)."""
    if "." not in path and "%2e" not in path.lower():
        return False
    return any(unquote(seg) in (".", "..") for seg in path.split("/"))


def _merged(*layers: dict) -> dict:
    """Header dicts merged as HTTP names compare, in any case: a later `accept` replaces an earlier `Accept`."""
    out: dict[str, str] = {}
    names: dict[str, str] = {}
    for layer in layers:
        for k, v in layer.items():
            old = names.get(k.lower())
            if old is not None and old != k:
                del out[old]
            names[k.lower()] = k
            out[k] = v
    return out


# A generic word for each refusal when the spec gives none (`auth.advice`): no provider's terms in it.
DEFAULT_ADVICE = {
    401: "the key or token is wrong, revoked or expired: create a new one and update the secret it is read from",
    403: "the credentials work but lack a permission this request needs: give them read access to what the "
         "integration reads (its invoices and customers), or see the integration's documentation",
}
# Query parameters whose values are credentials, by name: masked in messages even when not registered.
_SECRET_PARAM = re.compile(r"(?i)(key|token|secret|password|passwd|signature|sig|auth|code)")
BODY_SHOWN = 200  # characters of an error answer's body shown in its message


def shown_url(url: str) -> str:
    """A request's URL as messages show it: credentials in the query masked, registered secrets redacted."""
    from runner.redact import MASK, redact

    head, sep, query = url.partition("?")
    if sep:
        parts = []
        for pair in query.split("&"):
            name, eq, value = pair.partition("=")
            parts.append(f"{name}={MASK}" if eq and value and _SECRET_PARAM.search(unquote(name)) else pair)
        url = head + "?" + "&".join(parts)
    return redact(url)


def body_start(resp: Response) -> str:
    """The start of an answer's body, on one line and redacted (empty when there is none)."""
    from runner.redact import redact

    text = " ".join(resp.content[:BODY_SHOWN * 2].decode("utf-8", "replace").split())
    if not text:
        return ""
    text = redact(text)
    return text if len(text) <= BODY_SHOWN else text[:BODY_SHOWN - 1] + "…"


def _status_error(label: str, resp: Response, attempts: int, method: str = "",
                  advice: dict | None = None) -> ProviderError:
    """The error for an answer that is not a success: the status, the request (method and URL, secrets masked),
    the provider's own words and the start of its body, and (401/403) the spec's advice for this provider."""
    from runner.errors import AuthError

    msg = error_message(resp)
    body = body_start(resp)
    request = f" to {method} {shown_url(resp.url)}" if resp.url else ""
    said = msg if not body or body == msg else (f"{msg} (the answer starts: {body})" if msg != f"HTTP {resp.status}"
                                                 else f"the answer starts: {body}")
    if not body and msg == f"HTTP {resp.status}":
        said = "the answer has no body"
    advice = {**DEFAULT_ADVICE, **(advice or {})}
    if resp.status == 401:
        return AuthError(f"{label} refused the credentials (HTTP 401){request}: {said}", status=401, fix=advice[401])
    if resp.status == 403:
        return AuthError(f"{label} accepted the credentials but they may not read this (HTTP 403){request}: {said}",
                         status=403, fix=advice[403])
    extra = f" after {attempts} attempts" if attempts > 1 else ""
    return ProviderError(f"{label} answered HTTP {resp.status}{extra}{request}: {said}", status=resp.status)


def _short(url: str) -> str:
    s = urlsplit(url)
    return s.path
