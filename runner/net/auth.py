"""Authentication for provider requests, as the spec's `auth` section declares it.

`auth.headers` are rendered from templates such as `Bearer {{ secrets.api_key }}` and sent with every request,
whatever the auth type: an api_key spec's whole authentication, or what an OAuth2 API needs beside the token
(a tenant or organization id). `oauth2`: see `runner.net.oauth` (authlib does every OAuth2 step; tokens live in
the state store); its Authorization header wins over a spec-wide one of the same name. `none`: the headers only.
"""
from __future__ import annotations

from typing import Protocol


class Auth(Protocol):
    async def headers(self) -> dict[str, str]: ...

    async def unauthorized(self) -> bool:
        """Called on a 401; True if new credentials were obtained and the request is worth retrying once."""
        ...


class WithHeaders:
    """Another Auth plus the spec-wide headers (the inner auth's own headers win on a clash)."""

    def __init__(self, inner, headers: dict, context: dict):
        self.inner = inner
        self._headers = headers
        self._context = context  # the live context: fields learned when authorizing may be used in the headers

    async def headers(self) -> dict[str, str]:
        own = await self.inner.headers()
        names = {k.lower() for k in own}
        return {**{k: t.render(self._context) for k, t in self._headers.items() if k.lower() not in names}, **own}

    async def unauthorized(self, *args) -> bool:
        return await self.inner.unauthorized(*args)

    def __getattr__(self, name):  # prepare(), learned, token ...: whatever the inner auth offers
        return getattr(self.inner, name)


class HeaderAuth:
    def __init__(self, headers: dict, context: dict):
        self._headers = {k: t.render(context) for k, t in headers.items()}

    async def headers(self) -> dict[str, str]:
        return self._headers

    async def unauthorized(self) -> bool:
        return False


def make(conn, context: dict, store=None, clients=None) -> Auth:
    spec = conn.spec
    if spec.auth.type == "oauth2":
        from runner.net import oauth

        session = oauth.OAuthSession(conn, context, store, clients)
        return WithHeaders(session, spec.auth.headers, context) if spec.auth.headers else session
    return HeaderAuth(spec.auth.headers, context)
