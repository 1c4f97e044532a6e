"""OAuth 2.0 for connections whose spec says `auth: {type: oauth2}`. authlib does every protocol step.

Where tokens live: the state store (`tokens` table), never the config. What the authorization taught us
about the connection (a company id from the redirect, an API domain from the token response) lives in the
connection's `data` and reaches templates as `connection.<field>`.

Rules this module keeps:
- An access token is refreshed before it expires (`refresh_margin_s`), and once on a 401.
- A refresh response is committed to the store *before* its access token is used, so a rotated refresh
  token survives a crash at any point (the old one is dead on the provider's side by then).
- Two runs of one connection never refresh at the same time: an exclusive lock file per connection beside
  the state store, and the token is re-read after the lock is taken (the other run may have refreshed).
- A refresh answered with a "grant is gone" error (`reconnect_errors`, default invalid_grant) marks the
  connection `needs_reconnect` and raises NeedsReconnect with the exact command to fix it. No retries.
- A connection may carry a bootstrap `refresh_token` in its credentials (from a provider's token
  playground or self-client page); it is used when the store has no token made from it, and from then on
  the store's (rotated) token is used.
"""
from __future__ import annotations

import asyncio
import contextvars
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from loguru import logger

from runner import metrics, redact
from runner.spec import secrets
from runner.errors import AuthError, NeedsReconnect, ProviderError, RunnerError
from runner.spec.templates import Template

DEFAULT_HEADER = "Bearer {{ token.access_token }}"
DEFAULT_MARGIN_S = 300
CRASH_ENV = "RUNNER_TEST_CRASH_AFTER_TOKEN_SAVE"  # tests only: SIGKILL right after a refreshed token is saved


def settings(spec, environment: str) -> dict:
    """The spec's oauth2 block with the environment's overrides applied."""
    base = dict(spec.auth.oauth2 or {})
    env = spec.environments.get(environment)
    if env is not None and env.oauth2:
        base.update(env.oauth2)
    return base


def template_context(conn, context: dict) -> dict:
    """Names oauth2 templates may use: the request context plus `base_url` (the connection's API address)."""
    ctx = dict(context)
    if "base_url" not in ctx:
        env = conn.spec.environments[conn.environment]
        try:
            ctx["base_url"] = conn.base_url or env.base_url.render(ctx)
        except Exception:
            ctx["base_url"] = conn.base_url or ""
    return ctx


def render(cfg: dict, key: str, ctx: dict) -> str:
    return Template(str(cfg[key])).render(ctx)


def oauth_client(clients, url: str, cfg: dict, client_id: str, client_secret: str, **kw):
    """An authlib AsyncOAuth2Client whose requests go where `clients` sends `url` (network or a simulator)."""
    import warnings

    # authlib's httpx client announces, on import, that authlib will move to the httpx2 package: nothing a user
    # can act on. authlib.deprecate sets an "always" filter for its warnings when it is first imported, which
    # would win over a filter set before it: import it first, then ignore that one notice.
    from authlib.deprecate import AuthlibDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The httpx module is deprecated", category=AuthlibDeprecationWarning)
        from authlib.integrations.httpx_client import AsyncOAuth2Client

    http, real_url = clients.resolve(url)
    client = AsyncOAuth2Client(client_id=client_id, client_secret=client_secret,
                               token_endpoint_auth_method=cfg.get("token_auth_method", "client_secret_basic"),
                               transport=http._transport, timeout=30.0, **kw)
    return client, real_url


def learned_fields(cfg: dict, token: dict, redirect: dict | None = None) -> dict:
    """Connection data to keep from a token response (`token_fields`) and a redirect (`redirect_fields`)."""
    out = {}
    for name, field in (cfg.get("token_fields") or {}).items():
        if token.get(field) not in (None, ""):
            out[name] = token[field]
    for name, param in (cfg.get("redirect_fields") or {}).items():
        if redirect and redirect.get(param) not in (None, ""):
            out[name] = redirect[param]
    return out


def stored_token(token: dict, *, bootstrap: str | None) -> dict:
    """What goes into the store: the token response plus when it expires and where it came from."""
    tok = {k: v for k, v in dict(token).items()}
    now = time.time()
    if "expires_at" not in tok and tok.get("expires_in") is not None:
        tok["expires_at"] = now + float(tok["expires_in"])
    tok["obtained_at"] = now
    tok["bootstrap"] = bootstrap
    for k in ("access_token", "refresh_token"):
        redact.register(tok.get(k))
    return tok


class _FileLock:
    """An exclusive fcntl lock on a file (blocking; taken in a worker thread so the event loop runs on)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        self._f = f

    def release(self) -> None:
        if self._f is not None:
            import fcntl

            fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def lock_path(store, name: str) -> Path:
    p = getattr(store, "path", None)
    if p is None or str(p) == ":memory:":
        return Path(tempfile.gettempdir()) / f"runner-oauth-{os.getuid()}-{name}.lock"
    return Path(str(p) + f".oauth-{name}.lock")


def _options_fp(conn) -> str:
    return secrets.fingerprint(json.dumps(dict(conn.options), sort_keys=True, default=str))


def reconnect_cleared(conn, store) -> bool:
    """True when a connection marked `needs_reconnect` now has something new to try: the bootstrap
    `credentials.refresh_token` differs from the one it had when the grant was refused.

    A run may then try to renew the authorization instead of stopping at the mark; a renewal that succeeds
    clears the mark (OAuthSession._refresh)."""
    if store is None:
        return False
    saved = store.connection(conn.name)
    if saved.get("status") != "needs_reconnect":
        return False
    cred = conn.credentials.get("refresh_token")
    if not cred:
        return False
    data = saved.get("data") or {}
    if "refused_bootstrap" in data:
        marked = data["refused_bootstrap"]
    else:  # marked by an older runner, or by a run that found no token at all: compare with the stored token
        tok = store.get_token(conn.name)
        marked = tok.get("bootstrap") if tok else None
    return secrets.fingerprint(cred) != marked


class OAuthSession:
    """The `Auth` of an oauth2 connection: headers with a valid access token; refresh on expiry and 401."""

    def __init__(self, conn, context: dict, store, clients):
        self.conn = conn
        self.name = conn.name
        self.spec = conn.spec
        self.ctx = context  # the Source's live context: learned connection data is written into it
        self.store = store
        self.clients = clients
        self.cfg = settings(conn.spec, conn.environment)
        self.header = Template(self.cfg.get("header", DEFAULT_HEADER))
        self.reconnect_errors = set(self.cfg.get("reconnect_errors") or ["invalid_grant"])
        self.token: dict | None = None
        self.learned: dict = {}
        self._gen = 0
        self._lock = asyncio.Lock()
        cred = conn.credentials.get("refresh_token")
        self._bootstrap_fp = secrets.fingerprint(cred) if cred else None
        # A needs_reconnect mark and a new bootstrap token in the config: the new token wins over a stored
        # (connected) one, whose grant was refused.
        self._bootstrap_wins = reconnect_cleared(conn, store)
        # The access token the current task last sent (per asyncio task): a 401 for an older token than the
        # session holds now is a straggler, already answered by the refresh another request made.
        self._sent: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"oauth-sent-{self.name}",
                                                                               default=None)

    # --- the Auth protocol -------------------------------------------------------------------------
    async def headers(self) -> dict[str, str]:
        if self.token is None:
            self.token = self._usable_stored()
        if self.token is None or not self._fresh(self.token):
            gen = self._gen
            async with self._lock:
                if self._gen == gen:
                    await self._refresh(force=False)
        self._sent.set(self.token.get("access_token"))
        return {"Authorization": self.header.render({**self.ctx, "token": self.token})}

    async def unauthorized(self, sent: str | None = None) -> bool:
        """A request was answered 401: renew the access token once, unless it was renewed since that
        request was sent. `sent` is the access token the refused request carried; without it, the one
        headers() last gave to this asyncio task (send() asks headers() right before each request)."""
        used = sent if sent is not None else self._sent.get()
        async with self._lock:
            current = (self.token or {}).get("access_token")
            if used is not None and current is not None and used != current:
                return True  # a straggler: another request already renewed the token; retry with the new one
            logger.info("{}: the access token was refused (401); renewing it once", self.name)
            await self._refresh(force=True)
        return True

    async def prepare(self) -> dict:
        """Make sure a usable token exists; return connection data learned while doing so (may be empty)."""
        await self.headers()
        conn_data = self.ctx.setdefault("connection", {})
        for field, what in (self.cfg.get("required_fields") or {}).items():
            if conn_data.get(field) in (None, ""):
                given = self.ctx.get("options", {}).get(field)
                if given in (None, ""):
                    raise RunnerError(f"'{self.name}' does not know {what} ({field}): it is learned when connecting",
                                         fix=f"runner connect {self.name}   (or set options: {{{field}: ...}} in the "
                                             f"connection, if you know it)")
                conn_data[field] = str(given)
                self.learned[field] = str(given)
        return dict(self.learned)

    # --- internals ---------------------------------------------------------------------------------
    def _usable_stored(self) -> dict | None:
        if self.store is None:
            return None
        tok = self.store.get_token(self.name)
        if tok is None:
            return None
        if self._from_bootstrap(tok):
            return None  # the config now gives another bootstrap token: start from it
        for k in ("access_token", "refresh_token"):
            redact.register(tok.get(k))
        return tok

    def _margin(self, tok: dict) -> float:
        margin = float(self.cfg.get("refresh_margin_s", DEFAULT_MARGIN_S))
        if tok.get("expires_in"):
            margin = min(margin, float(tok["expires_in"]) / 2)
        return margin

    def _fresh(self, tok: dict) -> bool:
        if not tok.get("access_token"):
            return False
        exp = tok.get("expires_at")
        return exp is None or float(exp) - self._margin(tok) > time.time()

    def _from_bootstrap(self, stored: dict | None) -> bool:
        """Whether the config's bootstrap refresh token is to be used instead of the stored token."""
        if not self._bootstrap_fp:
            return False
        return stored is None or (stored.get("bootstrap") != self._bootstrap_fp
                                  and (stored.get("connected") is None or self._bootstrap_wins))

    def _refresh_token(self, stored: dict | None) -> tuple[str, str | None]:
        cred = self.conn.credentials.get("refresh_token")
        if cred and self._from_bootstrap(stored):
            return cred, self._bootstrap_fp
        if stored and stored.get("refresh_token"):
            return stored["refresh_token"], stored.get("bootstrap")
        raise NeedsReconnect(f"'{self.name}' has not been connected to {self.spec.name} yet (no authorization is "
                             f"stored for it)", fix=f"runner connect {self.name}")

    async def _refresh(self, force: bool) -> None:
        # One refresh of a connection at a time, across processes: the store's own lock when it has one (a
        # server's, which runners on other machines see too), else a file beside the store.
        own = getattr(self.store, "refresh_lock", None)
        lock = own(self.name) if own is not None else _FileLock(lock_path(self.store, self.name))
        await asyncio.to_thread(lock.acquire)
        try:
            stored = self._usable_stored()
            mine = (self.token or {}).get("access_token")
            if stored is not None and self._fresh(stored) and (not force or stored.get("access_token") != mine):
                self.token = stored  # another run (or an earlier step) refreshed while we waited
                self._gen += 1
                return
            refresh_token, bootstrap = self._refresh_token(stored)
            redact.register(refresh_token)
            ctx = template_context(self.conn, self.ctx)
            url = render(self.cfg, "token_url", ctx)
            client_id = self.conn.credentials.get("client_id", "")
            client, real_url = oauth_client(self.clients, url, self.cfg, client_id,
                                            self.conn.credentials.get("client_secret", ""))
            from authlib.integrations.base_client.errors import OAuthError

            try:
                new = await client.refresh_token(real_url, refresh_token=refresh_token)
            except OAuthError as exc:
                metrics.token_refresh(self.name, False)
                self._refused(exc.error, exc.description, url=url, ctx=ctx)
            except ValueError as exc:  # not JSON
                metrics.token_refresh(self.name, False)
                raise ProviderError(f"{self.spec.name}'s token endpoint sent an answer that is not a token ({exc})",
                                    fix="try again later; if it persists, the provider may be having an outage")
            except Exception as exc:  # network trouble, 5xx
                metrics.token_refresh(self.name, False)
                raise ProviderError(f"could not reach {self.spec.name}'s token endpoint to renew the authorization "
                                    f"for '{self.name}': {type(exc).__name__}: {exc}",
                                    fix="check the network and try again")
            token = dict(new)
            metrics.token_refresh(self.name, True)
            if not token.get("refresh_token"):
                token["refresh_token"] = refresh_token  # providers that do not rotate send none back
            if stored and stored.get("connected") is not None and bootstrap == stored.get("bootstrap"):
                token["connected"] = stored["connected"]
            token = stored_token(token, bootstrap=bootstrap)
            # Committed before anything uses the new access token: a rotated refresh token is never lost.
            if self.store is not None:
                self.store.save_token(self.name, token)
            if os.environ.get(CRASH_ENV) == self.name:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            learned = learned_fields(self.cfg, token)
            if learned:
                changed = {k: v for k, v in learned.items() if self.ctx.get("connection", {}).get(k) != v}
                if changed and self.store is not None:
                    self.store.update_connection(self.name, data=changed)
                self.ctx.setdefault("connection", {}).update(learned)
                self.learned.update(changed)
            self.token = token
            self._gen += 1
            logger.info("{}: renewed the {} access token{}", self.name, self.spec.name,
                        " (the refresh token rotated; the new one is saved)"
                        if token["refresh_token"] != refresh_token else "")
            if self.store is not None and self.store.connection(self.name).get("status") == "needs_reconnect":
                # The authorization works again (a new bootstrap refresh token in the config): lift the mark.
                self.store.update_connection(self.name, status="active", last_error=None, last_error_at=None)
                self._bootstrap_wins = False
                logger.info("{}: the new refresh token works; the connection is active again", self.name)
        finally:
            lock.release()

    def _unlearned_server(self, ctx: dict) -> list[str]:
        """Fields the token endpoint's address depends on that are learned when connecting (from the
        redirect, e.g. the user's own accounts server / data centre) and that neither a connect taught us
        nor the connection's options give."""
        template = str(self.cfg.get("token_url", ""))
        conn_data = ctx.get("connection") or {}
        options = ctx.get("options") or {}
        return [f for f in (self.cfg.get("redirect_fields") or {})
                if f"connection.{f}" in template and conn_data.get(f) in (None, "") and options.get(f) in (None, "")]

    def _refused(self, error: str | None, description: str | None, *, url: str = "", ctx: dict | None = None) -> None:
        detail = f"{error}" + (f": {description}" if description else "")
        if error in self.reconnect_errors:
            unknown = self._unlearned_server(ctx or {})
            if unknown:
                # A refresh token made outside `runner connect` in another data centre is refused with the
                # same error as a revoked one: the runner only knows which server it asked.
                field = unknown[0]
                opt = (self.spec.options or {}).get(field) or {}
                about = " ".join(str(opt.get("description") or "").split())
                msg = (f"{self.spec.name} refused the refresh token of '{self.name}' ({detail}) at {url}. The token "
                       f"was not made by `runner connect`, so the runner does not know which {self.spec.name} data "
                       f"centre (accounts server) it belongs to and asked the default one; a token made in another "
                       f"data centre is refused exactly like this (it may also have been revoked)")
                fix = (f"set options: {{{field}: ...}} on '{self.name}' to the accounts server the token was made at"
                       + (f" ({about})" if about else "") + f", or run `runner connect {self.name}`, which finds it "
                       f"by itself")
                # Not marked needs_reconnect: a line in the config may be all it takes, so the next run tries again.
                raise AuthError(msg, fix=fix, status=401)
            msg = (f"{self.spec.name} refused to renew the authorization of '{self.name}' ({detail}): it was revoked, "
                   f"it expired, or the user's password changed. Nothing is imported from this connection until "
                   f"someone reconnects it")
            if self.store is not None:
                self.store.update_connection(self.name, status="needs_reconnect", last_error=redact.redact(msg),
                                             last_error_at=time.time(),
                                             data={"refused_bootstrap": self._bootstrap_fp})
            raise NeedsReconnect(msg, fix=f"runner connect {self.name}")
        if error in ("invalid_client", "unauthorized_client"):
            raise AuthError(f"{self.spec.name} does not accept this app's client id/secret ({detail})",
                            fix=f"check credentials client_id and client_secret of '{self.name}'", status=401)
        raise AuthError(f"{self.spec.name} refused to renew the authorization of '{self.name}' ({detail})",
                        fix=f"try again; if it persists, run `runner connect {self.name}`")
