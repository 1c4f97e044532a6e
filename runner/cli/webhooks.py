"""`runner webhooks`: Debitura's side of each case — the webhook subscription, and polling where no public
endpoint is possible (runner/inbound/webhooks.py)."""
from __future__ import annotations

import click

from runner.cli.main import EXIT_FAILED, fail, load_config, open_store, output_option, run, \
    setup_logging, verbose_option


@click.group()
def webhooks():
    """Debitura's case events (lifecycle, payments, messages): a webhook subscription received by `runner serve`,
    or polling. Configured in destination.webhooks; shown by `runner status` and `runner explain`."""


def _run(cfg, work):
    """`work(store, clients)` to its end, with the config's state store and HTTP clients, both closed after."""
    from runner.net.http import Clients

    store = open_store(cfg)
    clients = Clients(sandbox_dir=cfg.state_path.parent / "sandbox")

    async def go():
        try:
            return await work(store, clients)
        finally:
            await clients.aclose()

    try:
        return run(go())
    finally:
        store.close()


@webhooks.command("sync")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Show what would change at Debitura; change nothing.")
@output_option
@verbose_option
def sync(config_file, dry_run, output, verbose):
    """Make Debitura's webhook subscription match destination.webhooks: create, update or delete it. Running it
    again changes nothing. The signing secret Debitura returns is kept in the state store (encrypted when
    RUNNER_SECRET_KEY is set); it is never printed."""
    setup_logging(verbose)
    from runner.inbound import webhooks as hooks

    cfg = load_config(config_file)
    res = _run(cfg, lambda store, clients: hooks.sync(cfg, store, clients, dry_run=dry_run))
    if output == "json":
        from runner.cli.report import print_json

        print_json({"dry_run": dry_run, "changed": res.changed, "subscription_id": res.subscription_id,
                    "actions": res.actions})
        return
    for line in res.actions:
        click.echo(("would " if dry_run and res.changed and not line.startswith("nothing") else "") + line)


@webhooks.command("poll")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--max-requests", type=click.IntRange(1, 20000),
              help="Requests this poll may make (default: destination.webhooks.poll.max_requests, else 500).")
@output_option
@verbose_option
def poll(config_file, max_requests, output, verbose):
    """Read the open cases (GET /cases/{id}, within the destination's rate limit) and record what changed as case
    events: the fallback where Debitura cannot reach `runner serve`. Least recently read cases first."""
    setup_logging(verbose)
    import sys

    from runner.inbound import webhooks as hooks

    cfg = load_config(config_file)
    if cfg.destination.type != "debitura":
        from runner.errors import ConfigError, Problem

        fail(ConfigError(Problem(f"{cfg.file}: the destination is a file; only Debitura cases can be polled",
                                 fix="set destination.type: debitura")))
    res = _run(cfg, lambda store, clients: hooks.poll(cfg, store, clients, max_requests))
    if output == "json":
        from runner.cli.report import print_json

        print_json({"cases": res.cases, "requests": res.requests, "recorded": res.recorded, "left": res.left,
                    "errors": res.errors})
    else:
        click.echo(f"read {res.cases} open case(s) with {res.requests} request(s); recorded {res.recorded} new "
                   f"event(s)" + (f"; {res.left} case(s) left for the next poll (request budget)" if res.left else ""))
        for e in res.errors[:20]:
            click.echo(f"  error: {e}", err=True)
    sys.exit(EXIT_FAILED if res.errors and not res.cases else 0)

