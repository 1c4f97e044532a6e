"""`runner state ...`: the state store itself (moving it to a PostgreSQL server)."""
from __future__ import annotations

import sys

import click

from runner.cli.main import EXIT_INVALID, EXIT_LOCKED, fail, load_config


@click.group()
def state():
    """The state store: the ledger, run history, tokens and keys (SQLite file or PostgreSQL)."""


@state.command("migrate")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--to", "to", required=True, metavar="URL",
              help="The PostgreSQL database to copy into: postgresql://user@host:5432/db (a password: PGPASSWORD, "
                   "~/.pgpass, or a ${VARIABLE} reference).")
def migrate(config_file, to):
    """Copy CONFIG's SQLite store (ledger, verdicts, runs, tokens, inbound keys and requests, connection health,
    sink marks, changes) into an empty PostgreSQL database. Then set `state:` in the config to that database:
    the next apply imports nothing again."""
    from runner.errors import RunnerError
    from runner.spec import secrets
    from runner.state import is_url, open_store, safe_url, transfer

    cfg = load_config(config_file, strict=False)
    ref = secrets.parse_ref(to)
    if ref is not None:
        resolved = secrets.resolve(ref, cfg.base_dir)
        if resolved is None:
            click.echo(f"error: --to names the {ref.describe()}, which is not set\n    fix: set it to the "
                       "database's URL, postgresql://user:password@host:5432/db", err=True)
            sys.exit(EXIT_INVALID)
        to = resolved.strip()
    if not is_url(to):
        click.echo("error: --to must be a PostgreSQL URL (postgresql://user@host:5432/db)\n"
                   "    fix: give the URL of an empty database on the server", err=True)
        sys.exit(EXIT_INVALID)
    from urllib.parse import urlsplit

    from runner import redact

    try:
        redact.register(urlsplit(to).password)  # never in a message (errors from the server included)
    except ValueError:
        pass
    if cfg.state_url is not None:
        click.echo(f"error: {cfg.file} already keeps its state in PostgreSQL ({safe_url(cfg.state_url)})\n"
                   "    fix: `runner state migrate` copies an SQLite store; nothing to do", err=True)
        sys.exit(EXIT_INVALID)
    if not cfg.state_path.is_file():
        click.echo(f"error: there is no state file at {cfg.state_path} to copy\n"
                   "    fix: check `state:` in the config (the file the runs used)", err=True)
        sys.exit(EXIT_INVALID)
    try:
        source = open_store(cfg)
        target = open_store(to)
    except RunnerError as exc:
        fail(exc)
    try:
        if not source.lock() or not target.lock():
            click.echo("error: a `runner apply` is using one of the stores; wait for it to finish", err=True)
            sys.exit(EXIT_LOCKED)
        counts = transfer.copy_store(source, target)
    except RunnerError as exc:
        fail(exc)
    finally:
        source.close()
        target.close()
    click.echo(f"copied {cfg.state_path} into {safe_url(to)}: " +
               ", ".join(f"{n} {table}" for table, n in counts.items()))
    click.echo(f"next: set `state:` in {cfg.file.name} to the database, e.g. "
               "state: {type: postgresql, url: \"${DATABASE_URL}\"}")
