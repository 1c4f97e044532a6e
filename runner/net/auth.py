"""Authentication for provider requests, as the spec's `auth` section declares it.

`api_key`: headers rendered from templates such as `Bearer {{ secrets.api_key }}`. `oauth2`: see
`runner.oauth` (authlib does every OAuth2 step; tokens live in the state store). `none`: nothing.
"""
from __future__ import annotations

from typing import Protocol


class Auth(Protocol):
    async def headers(self) -> dict[str, str]: ...

    async def unauthorized(self) -> bool:
        """Called on a 401; True if new credentials were obtained and the request is worth retrying once."""
        ...


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

        return oauth.OAuthSession(conn, context, store, clients)
    return HeaderAuth(spec.auth.headers, context)
