"""`runner serve` and `runner keys`: the inbound API and its API keys."""
from __future__ import annotations

import socket
import sys

import click

from runner.cli.main import EXIT_INVALID, fail, load_config, output_option, setup_logging, verbose_option


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--connection", "-c", "connection", help="The inbound connection to serve (default: the only one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but 127.0.0.1 should sit behind an HTTPS proxy.")
@click.option("--port", default=8088, show_default=True, type=int, help="0 picks a free port (printed on start).")
@click.option("--webhooks-only", is_flag=True, help="Serve only Debitura's webhooks (destination.webhooks), no "
                                                   "inbound connection (the default when the config has none).")
@verbose_option
def serve(config_file, connection, host, port, webhooks_only, verbose):
    """Serve an inbound connection of CONFIG over HTTP: Zaps post invoices to it and poll it for cases.

    \b
    Endpoints (every one but /healthz needs an API key from `runner keys create`):
      GET  /v1/me                 auth test: which connection and environment the key belongs to
      POST /v1/invoices           one invoice, a list, or {"invoices": [...]}; answers each invoice's verdict
      GET  /v1/triggers/cases     polling trigger: cases created, newest first
      GET  /v1/triggers/skipped   polling trigger: invoices skipped and why, newest first
      POST /v1/webhooks/debitura  Debitura's signed case events (when destination.webhooks is set; no key)
    """
    setup_logging(verbose)
    import uvicorn

    from runner.inbound import server as inbound
    from runner.errors import ConfigError

    from runner.errors import Problem
    from runner.inbound import webhooks

    cfg = load_config(config_file)
    only = webhooks_only or (not connection and webhooks.configured(cfg) and not inbound.inbound_connections(cfg))
    conn = None
    try:
        if only and not webhooks.configured(cfg):
            raise ConfigError(Problem(f"{cfg.file} has no destination.webhooks with mode push, so there are no "
                                      f"webhooks to serve", fix="add destination.webhooks with the public url of "
                                                                "this server (see docs/webhooks.md)"))
        if not only:
            conn = inbound.select(cfg, connection)
    except ConfigError as exc:
        fail(exc)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        click.echo(f"error: cannot listen on {host}:{port}: {exc.strerror}\n    fix: choose another --port", err=True)
        sys.exit(EXIT_INVALID)
    sock.listen(128)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    if only:
        click.echo(f"serving Debitura webhooks on http://{shown}:{bound}{webhooks.ROUTE}", nl=True)
    else:
        click.echo(f"serving '{conn.name}' ({conn.spec.name}, {conn.environment} environment) on "
                   f"http://{shown}:{bound}", nl=True)
        if webhooks.configured(cfg):
            click.echo(f"and Debitura webhooks on http://{shown}:{bound}{webhooks.ROUTE}")
    sys.stdout.flush()
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo("warning: listening beyond this machine; put the runner behind an HTTPS proxy so keys are never "
                   "sent in clear text", err=True)
    import logging

    app = webhooks.create_app(cfg) if only else inbound.create_app(cfg, conn)
    # uvicorn's own logging config and access log would write to the terminal past the redaction layer (a key
    # sent in a query string, in clear): its records go to loguru instead, and the access log is the runner's.
    inbound.route_std_logging(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    if verbose:
        app = inbound.access_log(app, inbound.DEFAULT_KEY_HEADER if only else app.state.server.key_header)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           log_level="debug" if verbose > 1 else "info" if verbose else "warning",
                                           lifespan="on"))
    server.run(sockets=[sock])


@click.group()
def keys():
    """API keys for `runner serve` (what a Zap sends in the XApiKey header).

    A key is shown once, when created; only its hash is stored. Each key belongs to one environment:
    a test key is refused by the production server and the reverse.
    """


def _store(config_file):
    from runner.spec import config
    from runner.errors import ConfigError
    from runner.state import open_store

    try:  # keys need only the state store: no secret has to be set to manage them
        cfg = config.load(config_file, strict=False, resolve=False)
    except ConfigError as exc:
        fail(exc)
    from runner.engine.destinations import ledger_id

    return cfg, open_store(cfg, destination=ledger_id(cfg.destination))


def _when(ts):
    import time

    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


@keys.command("create")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--environment", "-e", type=click.Choice(["production", "test"]), required=True,
              help="The server environment this key works with (and only that one).")
@click.option("--label", "-l", help="A note to recognise the key by, e.g. the Zap's name.")
@output_option
def keys_create(config_file, environment, label, output):
    """Create a key. It is printed once: copy it into the Zap's connection now."""
    from runner.inbound import apikeys
    from runner.inbound import server as inbound

    cfg, store = _store(config_file)
    try:
        key, info = apikeys.create(store, environment, label)
    finally:
        store.close()
    served = [c.name for c in inbound.inbound_connections(cfg) if c.environment == environment]
    if not served:
        click.echo(f"note: {cfg.file} has no inbound connection in the {environment} environment yet, so no server "
                   f"will accept this key until you add one", err=True)
    # The key itself is printed as is, on purpose and only here; nothing else ever shows it.
    if output == "json":
        click.echo(__import__("json").dumps({"key": key, **info.as_dict()}))
        return
    click.echo(f"created {environment} API key {info.id}" + (f" ({label})" if label else ""))
    click.echo("")
    click.echo(f"    {key}")
    click.echo("")
    click.echo("This is the only time the key is shown; the runner keeps only its hash. Put it in the Zap's "
               "XApiKey header.")


@keys.command("list")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--all", "show_all", is_flag=True, help="Include revoked keys.")
@output_option
def keys_list(config_file, show_all, output):
    """List keys (ids, environments, labels, last use): never the keys themselves."""
    from runner.inbound import apikeys

    cfg, store = _store(config_file)
    try:
        rows = [k for k in apikeys.list_keys(store) if show_all or k.active]
    finally:
        store.close()
    if output == "json":
        from runner.cli.report import print_json

        print_json([k.as_dict() for k in rows])
        return
    if not rows:
        click.echo("no API keys" + ("" if show_all else " (active)") + f"; create one with `runner keys create "
                                                                       f"{config_file} --environment production`")
        return
    click.echo(f"{'id':<10} {'environment':<12} {'created':<17} {'last used':<17} {'status':<8} label")
    for k in rows:
        click.echo(f"{k.id:<10} {k.environment:<12} {_when(k.created):<17} {_when(k.last_used):<17} "
                   f"{'active' if k.active else 'revoked':<8} {k.label or ''}")


@keys.command("revoke")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("key_id")
def keys_revoke(config_file, key_id):
    """Revoke a key by its id (see `runner keys list`). Servers refuse it from the next request on."""
    from runner.inbound import apikeys

    cfg, store = _store(config_file)
    try:
        info = apikeys.revoke(store, key_id)
    finally:
        store.close()
    if info is None:
        from runner.redact import redact

        click.echo(redact(f"error: no API key with id '{key_id}'\n    fix: `runner keys list {config_file} --all` shows "
                          f"the ids"), err=True)
        sys.exit(EXIT_INVALID)
    click.echo(f"revoked {info.environment} API key {info.id}" + (f" ({info.label})" if info.label else ""))
