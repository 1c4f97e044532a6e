"""`runner connect`: authorize the runner to read an OAuth2 provider (authorization code + loopback redirect).

The browser is sent to the provider's authorize URL; the provider redirects back to http://127.0.0.1:<free
port>/callback, where a one-shot local server receives the code. `state` is checked, PKCE is used when the
spec says the provider supports it, and authlib exchanges the code. Tokens go to the state store; what the
redirect and the token response say about the connection (a company id, a data centre) goes into the
connection's data. Then the connected company/organization is read and shown, exactly as a run would.
"""
from __future__ import annotations

import asyncio
import http.server
import os
import sys
import threading
import time
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

import click

from runner import redact
from runner.net import oauth
from runner.spec import secrets
from runner.errors import AccountMismatch, AuthError, ProviderError, RunnerError

PAGE = (b"<!doctype html><meta charset=utf-8><title>runner</title>"
        b"<p>The runner received the authorization. You can close this window and return to the terminal.</p>")


class Loopback:
    """A one-shot HTTP server on 127.0.0.1 that waits for the provider's redirect."""

    def __init__(self, port: int = 0):
        outer = self
        self.params: dict | None = None
        self.received = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # no access log on the terminal (the URL holds the code)
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                if parts.path != "/callback":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if outer.params is None:
                    outer.params = dict(parse_qsl(parts.query, keep_blank_values=True))
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)
                outer.received.set()

        self.httpd = http.server.HTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.redirect_uri = f"http://127.0.0.1:{self.port}/callback"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> dict | None:
        self.received.wait(timeout)
        return self.params

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _context(conn, store) -> dict:
    saved = store.connection(conn.name)
    return {"secrets": dict(conn.credentials), "options": dict(conn.options),
            "connection": {"name": conn.name, **(saved.get("data") or {})},
            "environment": conn.environment, "window": conn.window.context()}


def _staging_store(conn, store, token: dict, learned: dict):
    """An in-memory store holding only the new authorization, so it is tried before it replaces anything."""
    from runner.state.sqlite import Store

    tmp = Store(":memory:")  # SQLite in memory whatever the real store is: it only stages the new grant
    saved = store.connection(conn.name)
    tmp.save_token(conn.name, token)
    tmp.update_connection(conn.name, integration=conn.spec.id, status="active",
                          data={**(saved.get("data") or {}), **learned})
    return tmp


def _loopback(port: int) -> "Loopback":
    try:
        return Loopback(port)
    except OSError as exc:
        raise RunnerError(f"the runner cannot listen on 127.0.0.1 port {port} for the browser's answer "
                          f"({exc.strerror or exc}); nothing was changed",
                          fix="choose another --port (or leave --port out to use a free one)") from None


async def connect_flow(conn, store, *, clients=None, open_browser: bool = True, port: int = 0, timeout: float = 300,
                       force: bool = False, echo: Callable[[str], None] = print,
                       on_url: Callable[[str], None] | None = None,
                       echo_url: Callable[[str], None] | None = None) -> dict:
    """Run the authorization-code flow for one connection. Returns {account_id, account_name, data}."""
    from authlib.common.security import generate_token

    from runner.net.http import Clients

    spec = conn.spec
    if spec.auth.type != "oauth2":
        raise RunnerError(f"'{conn.name}' uses {spec.name}, which does not use OAuth (nothing to connect)",
                          fix="give its credentials in the config instead")
    for name in ("client_id", "client_secret"):
        if not conn.credentials.get(name):
            raise AuthError(f"'{conn.name}' needs the app's {name.replace('_', ' ')} to connect",
                            fix=f"set credentials: {{{name}: \"${{{spec.id.upper()}_{name.upper()}}}\"}} (an environment "
                                f"variable or a ${{file:...}} reference)")
    own_clients = clients is None
    clients = clients or Clients(sandbox_dir=store.local_dir / "sandbox" if store.local_dir is not None else None)
    cfg = oauth.settings(spec, conn.environment)
    try:
        stored = store.get_token(conn.name)
        status = store.connection(conn.name).get("status")
        if stored and not force and status != "needs_reconnect":
            # Reuse a grant that still works: a new one costs a refresh token (some providers keep only a few per user).
            from runner.engine.pipeline import Source

            source = Source(conn, clients, store)
            try:
                await source.open()
                echo(f"'{conn.name}' is already connected to {spec.name} account "
                     f"{source.account_name or ''} ({source.account_id}); the stored authorization still works, "
                     f"so no new one was made (use --force to connect again, e.g. to choose another company)")
                return {"account_id": source.account_id, "account_name": source.account_name, "reused": True,
                        "data": store.connection(conn.name).get("data")}
            except AccountMismatch:
                choose = spec.account.get("choose")
                if choose is not None and len(source.accounts) > 1 and not conn.options.get(choose.get("option")):
                    raise  # several organizations and none pinned: a config line fixes it, not a new authorization
            except RunnerError:
                pass  # the stored grant does not work: make a new one
        limit = cfg.get("refresh_token_limit") or {}
        if limit:
            echo("note: " + " ".join((limit.get("message") or
                                      f"{spec.name} keeps at most {limit.get('count')} refresh tokens per user").split()))
        ctx = oauth.template_context(conn, _context(conn, store))
        loop_server = _loopback(port)
        try:
            authorize_url = oauth.render(cfg, "authorize_url", ctx)
            state = generate_token(30)
            verifier = generate_token(64) if cfg.get("pkce") else None
            client, _ = oauth.oauth_client(clients, oauth.render(cfg, "token_url", ctx), cfg,
                                           conn.credentials["client_id"], conn.credentials["client_secret"],
                                           redirect_uri=loop_server.redirect_uri,
                                           scope=(cfg.get("scope_separator") or " ").join(cfg.get("scopes") or []) or None,
                                           **({"code_challenge_method": "S256"} if verifier else {}))
            url, _ = client.create_authorization_url(authorize_url, state=state, code_verifier=verifier,
                                                     **(cfg.get("authorize_params") or {}))
            # Printed as is: it holds the app's client id (public in OAuth), never a secret, and must stay usable.
            echo(f"Open this address in a browser, log in to {spec.name} and allow access:\n")
            (echo_url or echo)(f"  {url}\n")
            if on_url is not None:
                on_url(url)
            if open_browser:
                import webbrowser

                webbrowser.open(url)
            echo(f"waiting for {spec.name} to send the browser back to {loop_server.redirect_uri} ...")
            params = await asyncio.to_thread(loop_server.wait, timeout)
        finally:
            loop_server.close()
        if params is None:
            raise AuthError(f"no answer from the browser within {int(timeout)} s; nothing was changed",
                            fix=f"run `runner connect {conn.name}` again and finish the login in the browser")
        if params.get("state") != state:
            raise AuthError("the browser came back with a different `state` than the runner sent: the answer may not "
                            "be from this login, so it was refused; nothing was changed",
                            fix=f"run `runner connect {conn.name}` again")
        if params.get("error"):
            raise AuthError(f"{spec.name} did not authorize the runner ({params['error']}"
                            + (f": {params.get('error_description')}" if params.get("error_description") else "") + ")",
                            fix=f"run `runner connect {conn.name}` again and allow access")
        code = params.get("code")
        if not code:
            raise AuthError(f"{spec.name} sent the browser back without an authorization code",
                            fix=f"run `runner connect {conn.name}` again")
        redact.register(code)
        learned = oauth.learned_fields(cfg, {}, params)
        ctx["connection"].update(learned)
        token_url = oauth.render(cfg, "token_url", ctx)  # may depend on the redirect (the user's data centre)
        client, real_url = oauth.oauth_client(clients, token_url, cfg, conn.credentials["client_id"],
                                              conn.credentials["client_secret"], redirect_uri=loop_server.redirect_uri)
        from authlib.integrations.base_client.errors import OAuthError

        try:
            token = await client.fetch_token(real_url, grant_type="authorization_code", code=code,
                                             redirect_uri=loop_server.redirect_uri,
                                             **({"code_verifier": verifier} if verifier else {}))
        except OAuthError as exc:
            raise AuthError(f"{spec.name} refused the authorization code ({exc.error}: {exc.description}); nothing "
                            f"was changed", fix=f"run `runner connect {conn.name}` again")
        except ValueError as exc:  # not JSON
            raise ProviderError(f"{spec.name}'s token endpoint sent an answer that is not a token ({exc}); nothing "
                                f"was changed", fix=f"try `runner connect {conn.name}` again later; if it persists, "
                                                    f"the provider may be having an outage")
        except Exception as exc:  # network trouble
            raise ProviderError(f"could not reach {spec.name}'s token endpoint to finish connecting '{conn.name}': "
                                f"{type(exc).__name__}: {exc}; nothing was changed",
                                fix=f"check the network and run `runner connect {conn.name}` again")
        cred = conn.credentials.get("refresh_token")
        token = oauth.stored_token(dict(token), bootstrap=secrets.fingerprint(cred) if cred else None)
        token["connected"] = time.time()
        learned.update(oauth.learned_fields(cfg, token))
        old = stored
        saved = store.connection(conn.name)
        # Identify the account with the new authorization BEFORE it replaces the stored one: connecting the
        # wrong company (against `expect:`, or one that cannot see the pinned organization) must not cost
        # the grant that works.
        staging = _staging_store(conn, store, token, learned)
        from runner.engine.pipeline import Source

        source = Source(conn, clients, staging)
        keep = True
        mismatch = None
        try:
            await source.open()
        except AccountMismatch as exc:
            choose = spec.account.get("choose")
            # Several organizations and none pinned: the authorization is right, a config line picks one.
            keep = choose is not None and len(source.accounts) > 1 and not conn.options.get(choose.get("option"))
            mismatch = exc
        except BaseException:
            staging.close()
            echo(f"the new authorization for '{conn.name}' was not saved"
                 + ("; the one stored before is unchanged" if old else ""))
            raise
        token = staging.get_token(conn.name) or token  # a refresh during identification may have rotated it
        learned.update({k: v for k, v in (staging.connection(conn.name).get("data") or {}).items()
                        if (saved.get("data") or {}).get(k) != v})
        staging.close()
        if not keep:
            echo(f"the new authorization for '{conn.name}' was not saved"
                 + ("; the one stored before is unchanged and still used:" if old else ":"))
            raise mismatch
        store.save_token(conn.name, token)
        fields = {"integration": spec.id, "data": learned, "status": "active", "last_error": None,
                  "last_error_at": None}
        if mismatch is None:
            if source.account_id:
                fields["account_id"] = source.account_id
            if source.account_name:
                fields["account_name"] = source.account_name
        store.update_connection(conn.name, **fields)
        same_account = (mismatch is None and saved.get("account_id") is not None
                        and str(saved.get("account_id")) == str(source.account_id))
        if (same_account and old and old.get("refresh_token") and old["refresh_token"] != token.get("refresh_token")
                and cfg.get("revoke_url")):
            try:  # give back the replaced grant (it would otherwise count against the provider's per-user limit)
                rctx = oauth.template_context(conn, _context(conn, store))
                rc, rurl = oauth.oauth_client(clients, oauth.render(cfg, "revoke_url", rctx), cfg,
                                              conn.credentials["client_id"], conn.credentials["client_secret"])
                await rc.revoke_token(rurl, token=old["refresh_token"], token_type_hint="refresh_token")
            except Exception:
                pass
        if mismatch is not None:
            echo(f"the authorization for '{conn.name}' is saved, but the runner will not import from it yet:")
            raise mismatch
        shown = ", ".join(f"{k}={v}" for k, v in learned.items() if k not in ("name",))
        echo(f"connected '{conn.name}' to {spec.name} account {source.account_name or ''} ({source.account_id})"
             + (f" [{shown}]" if shown else ""))
        return {"account_id": source.account_id, "account_name": source.account_name, "reused": False, "data": learned}
    finally:
        if own_clients:
            await clients.aclose()


@click.command()
@click.argument("args", nargs=-1, required=True)
@click.option("--config", "-f", "config_file", default=None,
              help="The config file (default: $RUNNER_CONFIG, else config.yaml). May also be the first argument.")
@click.option("--no-browser", is_flag=True, help="Only print the address to open (headless machines).")
@click.option("--port", type=int, default=0, help="Loopback port for the redirect (default: a free one).")
@click.option("--timeout", type=float, default=300, help="Seconds to wait for the browser.")
@click.option("--force", is_flag=True, help="Make a new authorization even if the stored one still works.")
def connect(args, config_file, no_browser, port, timeout, force):
    """Connect an OAuth2 connection: runner connect [CONFIG_FILE] CONNECTION.

    Opens the provider's login page; after you allow access, the tokens are kept in the state store (never in
    the config) and the connected company/organization is shown. Client id and secret come from the
    connection's credentials (environment variables or files).
    """
    from runner.cli.main import EXIT_INVALID, fail, load_config, open_store

    if len(args) == 2:
        config_file, name = args
    elif len(args) == 1:
        name = args[0]
        config_file = config_file or os.environ.get("RUNNER_CONFIG") or "config.yaml"
    else:
        click.echo("usage: runner connect [CONFIG_FILE] CONNECTION", err=True)
        sys.exit(EXIT_INVALID)
    cfg = load_config(config_file)
    try:
        conn = cfg.connection(name)
    except RunnerError as exc:
        fail(exc)
    store = open_store(cfg)
    try:
        asyncio.run(connect_flow(conn, store, open_browser=not no_browser, port=port, timeout=timeout, force=force,
                                 echo=lambda s: click.echo(redact.redact(s)), echo_url=click.echo))
    except RunnerError as exc:
        fail(exc)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was changed", err=True)
        sys.exit(130)
    finally:
        store.close()
