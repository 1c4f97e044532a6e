"""A small OAuth 2.0 authorization server shared by the QuickBooks and Zoho simulators.

Authorization-code grant (with PKCE, S256 checked with authlib's own challenge function), refresh-token
grant (rotating or not), revocation, access-token expiry, and a per-user cap on live refresh tokens (Zoho
keeps 20 and silently deletes the oldest). Error bodies follow RFC 6749 as authlib's error classes render
them; each provider simulator chooses the HTTP status and the error code it really sends.

The authorize endpoint plays the provider's login and consent pages: it "logs in" the user named by the
test-only parameter ``sandbox_user`` (default: the server's ``default_user``) and redirects to the
``redirect_uri`` with ``code`` and ``state`` plus the provider's own redirect parameters (QuickBooks
``realmId``; Zoho ``location`` and ``accounts-server``).

Sandbox-only client credentials and bootstrap refresh tokens are committed in ``sandbox-secrets/``; they
work only here.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749 import errors as oauth_errors
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from .core import json_response

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


@dataclass
class Grant:
    refresh_token: str
    client_id: str
    user: str
    scope: str
    extra: dict = field(default_factory=dict)  # fields added to every token response (e.g. api_domain)
    created: float = 0.0
    active: bool = True


@dataclass
class AccessToken:
    user: str
    client_id: str
    expires_at: float
    grant: str  # the refresh token of the grant that issued it


class OAuthServer:
    """State and endpoints of one provider's authorization server (in one simulator instance)."""

    def __init__(self, *, clients: dict[str, str], rotate: bool, access_ttl: int = 3600,
                 invalid_grant_error: str = "invalid_grant", invalid_grant_status: int = 400,
                 refresh_token_limit: int | None = None, token_prefix: str = "",
                 clock: Callable[[], float] = time.time, persist: Any = None):
        self.clients = dict(clients)  # client_id -> client_secret
        self.rotate = rotate
        self.access_ttl = access_ttl
        self.invalid_grant_error = invalid_grant_error
        self.invalid_grant_status = invalid_grant_status
        self.refresh_token_limit = refresh_token_limit
        self.token_prefix = token_prefix
        self.clock = clock
        self.codes: dict[str, dict] = {}
        self.grants: dict[str, Grant] = {}
        self.access: dict[str, AccessToken] = {}
        self.token_requests = 0
        self.refreshes = 0
        self.deleted_by_limit: list[str] = []
        # With a data directory, grants and access tokens outlive the process (like the real server), so a
        # rotated refresh token stays the only valid one across runs of `runner apply`.
        self.persist = persist

    def keep_in(self, data_dir: Any, name: str) -> None:
        """Keep the grants and tokens in `data_dir` (a simulator's, beside the config's state), read back now:
        nothing without one."""
        if data_dir is not None:
            import pathlib

            self.persist = pathlib.Path(data_dir) / f"{name}-oauth.json"
            self.load()

    def forget(self) -> None:
        """Delete what was kept (a simulator's reset)."""
        if self.persist is not None and self.persist.exists():
            self.persist.unlink()

    def load(self) -> None:
        """Read persisted grants and tokens (after seeding: a persisted grant wins over a seeded one)."""
        import json
        import pathlib

        if self.persist is None or not pathlib.Path(self.persist).exists():
            return
        try:
            data = json.loads(pathlib.Path(self.persist).read_text())
        except (OSError, ValueError):
            return
        self.grants.update({k: Grant(**v) for k, v in data.get("grants", {}).items()})
        self.access = {k: AccessToken(**v) for k, v in data.get("access", {}).items()}

    def save(self) -> None:
        import dataclasses
        import json
        import os
        import pathlib

        if self.persist is None:
            return
        p = pathlib.Path(self.persist)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({"grants": {k: dataclasses.asdict(g) for k, g in self.grants.items()},
                                   "access": {k: dataclasses.asdict(a) for k, a in self.access.items()}}))
        os.replace(tmp, p)

    # --- seeding and test controls -----------------------------------------------------------------
    def add_grant(self, refresh_token: str, client_id: str, user: str, scope: str = "", extra: dict | None = None) -> None:
        self.grants[refresh_token] = Grant(refresh_token, client_id, user, scope, dict(extra or {}), self.clock())

    def revoke_user(self, user: str) -> None:
        """The user disconnected the app (or changed their password): every grant and token dies."""
        for g in self.grants.values():
            if g.user == user:
                g.active = False
        for t, a in list(self.access.items()):
            if a.user == user:
                del self.access[t]
        self.save()

    def expire_access_tokens(self) -> None:
        """Every access token issued so far expires now (no sleeping in tests)."""
        for a in self.access.values():
            a.expires_at = self.clock() - 1
        self.save()

    def live_grants(self, user: str | None = None) -> list[Grant]:
        return [g for g in self.grants.values() if g.active and (user is None or g.user == user)]

    # --- resource-server side ------------------------------------------------------------------------
    def check_access(self, authorization: str | None, scheme: str = "Bearer") -> tuple[str | None, str]:
        """(user, "") for a valid access token; (None, reason) otherwise: missing | invalid | expired."""
        if not authorization:
            return None, "missing"
        parts = authorization.split(None, 1)
        if len(parts) != 2 or parts[0].lower() != scheme.lower():
            return None, "invalid"
        tok = self.access.get(parts[1].strip())
        if tok is None:
            return None, "invalid"
        if tok.expires_at <= self.clock():
            return None, "expired"
        g = self.grants.get(tok.grant)
        if g is not None and not g.active:
            return None, "invalid"
        return tok.user, ""

    # --- authorization endpoint ----------------------------------------------------------------------
    def authorize(self, request: httpx.Request, users: dict[str, dict], default_user: str,
                  redirect_extra: Callable[[str], dict]) -> httpx.Response:
        q = dict(request.url.params)
        client_id = q.get("client_id", "")
        redirect_uri = q.get("redirect_uri", "")
        if client_id not in self.clients:
            return self._page(400, "invalid_client", "Unknown client_id")
        host = urlsplit(redirect_uri).hostname or ""
        if not redirect_uri.startswith("http://") or host not in LOOPBACK_HOSTS:
            return self._page(400, "invalid_redirect_uri", "redirect_uri must be a registered (loopback) address")
        if q.get("response_type") != "code":
            return self._redirect(redirect_uri, {"error": "unsupported_response_type", "state": q.get("state", "")})
        user = q.get("sandbox_user") or default_user
        if user not in users:
            return self._redirect(redirect_uri, {"error": "access_denied", "state": q.get("state", "")})
        if q.get("code_challenge") and q.get("code_challenge_method", "plain") != "S256":
            return self._redirect(redirect_uri, {"error": "invalid_request", "state": q.get("state", "")})
        code = generate_token(32)
        self.codes[code] = {"client_id": client_id, "redirect_uri": redirect_uri, "user": user,
                            "scope": q.get("scope", ""), "challenge": q.get("code_challenge"),
                            "expires_at": self.clock() + 600}
        params = {"code": code, **({"state": q["state"]} if "state" in q else {}), **redirect_extra(user)}
        return self._redirect(redirect_uri, params)

    # --- token endpoint ------------------------------------------------------------------------------
    def token(self, request: httpx.Request, grant_extra: Callable[[str], dict]) -> httpx.Response:
        resp = self._token(request, grant_extra)
        self.save()
        return resp

    def _token(self, request: httpx.Request, grant_extra: Callable[[str], dict]) -> httpx.Response:
        self.token_requests += 1
        form = dict(parse_qsl(request.content.decode("utf-8", "replace")))
        client_id, secret = self._client_auth(request, form)
        if client_id is None or self.clients.get(client_id) != secret:
            return self._error(oauth_errors.InvalidClientError(), 401)
        gt = form.get("grant_type")
        if gt == "authorization_code":
            c = self.codes.pop(form.get("code", ""), None)
            if c is None or c["client_id"] != client_id or c["expires_at"] < self.clock():
                return self._invalid_grant("Invalid authorization code")
            if form.get("redirect_uri") != c["redirect_uri"]:
                return self._invalid_grant("redirect_uri does not match the authorization request")
            if c["challenge"]:
                verifier = form.get("code_verifier") or ""
                if not verifier or create_s256_code_challenge(verifier) != c["challenge"]:
                    return self._invalid_grant("PKCE verification failed")
            rt = self.token_prefix + generate_token(40)
            self.add_grant(rt, client_id, c["user"], c["scope"])
            self._enforce_limit(c["user"])
            return json_response(200, {**self._issue(self.grants[rt]), **grant_extra(c["user"])})
        if gt == "refresh_token":
            g = self.grants.get(form.get("refresh_token", ""))
            if g is None or not g.active or g.client_id != client_id:
                return self._invalid_grant("Token invalid" if g is None else "Token revoked or rotated")
            self.refreshes += 1
            if self.rotate:
                g.active = False
                new = self.token_prefix + generate_token(40)
                self.grants[new] = Grant(new, g.client_id, g.user, g.scope, g.extra, self.clock())
                for a in self.access.values():
                    if a.grant == g.refresh_token:
                        a.grant = new
                g = self.grants[new]
                return json_response(200, {**self._issue(g, with_refresh=True), **grant_extra(g.user)})
            return json_response(200, {**self._issue(g, with_refresh=False), **grant_extra(g.user)})
        return self._error(oauth_errors.UnsupportedGrantTypeError(), 400)

    def revoke(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode("utf-8", "replace")))
        if not form and request.content:
            import json

            try:
                form = json.loads(request.content)
            except ValueError:
                form = {}
        token = form.get("token", "") or dict(request.url.params).get("token", "")
        g = self.grants.get(token)
        if g is not None:
            g.active = False
            for t, a in list(self.access.items()):
                if a.grant == token:
                    del self.access[t]
        self.access.pop(token, None)
        self.save()
        return json_response(200, {})

    # --- helpers -------------------------------------------------------------------------------------
    def _issue(self, g: Grant, with_refresh: bool = True) -> dict:
        at = self.token_prefix + generate_token(48)
        self.access[at] = AccessToken(g.user, g.client_id, self.clock() + self.access_ttl, g.refresh_token)
        body: dict[str, Any] = {"access_token": at, "token_type": "bearer", "expires_in": self.access_ttl}
        if with_refresh:
            body["refresh_token"] = g.refresh_token
        if g.scope:
            body["scope"] = g.scope
        body.update(g.extra)
        return body

    def _enforce_limit(self, user: str) -> None:
        if not self.refresh_token_limit:
            return
        live = sorted(self.live_grants(user), key=lambda g: g.created)
        while len(live) > self.refresh_token_limit:
            oldest = live.pop(0)
            oldest.active = False  # silently, as the real server does
            self.deleted_by_limit.append(oldest.refresh_token)

    @staticmethod
    def _client_auth(request: httpx.Request, form: dict) -> tuple[str | None, str | None]:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except ValueError:
                return None, None
            from urllib.parse import unquote

            return unquote(cid), unquote(secret)
        return form.get("client_id"), form.get("client_secret")

    def _invalid_grant(self, description: str) -> httpx.Response:
        err = oauth_errors.InvalidGrantError(description=description)
        err.error = self.invalid_grant_error
        return self._error(err, self.invalid_grant_status)

    @staticmethod
    def _error(err: oauth_errors.OAuth2Error, status: int) -> httpx.Response:
        return json_response(status, dict(err.get_body()))

    @staticmethod
    def _redirect(uri: str, params: dict) -> httpx.Response:
        sep = "&" if "?" in uri else "?"
        return httpx.Response(302, headers={"Location": uri + sep + urlencode(params)})

    @staticmethod
    def _page(status: int, error: str, message: str) -> httpx.Response:
        return json_response(status, {"error": error, "error_description": message})

    def state(self) -> dict:
        return {"grants": len(self.live_grants()), "access_tokens": len(self.access),
                "token_requests": self.token_requests, "refreshes": self.refreshes}
