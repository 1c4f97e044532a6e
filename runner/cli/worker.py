"""`runner worker CONFIG`: a long-running process that keeps every connection in sync on its schedule."""
from __future__ import annotations

import sys

import click

from runner.cli.main import EXIT_INVALID, load_config, run, setup_logging, verbose_option


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Connections this worker syncs at the same time.")
@click.option("--stalled-after", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              help="Seconds without a heartbeat after which another worker takes over a worker's syncs "
                   "(a killed process or machine).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Serve /healthz, /readyz and /metrics on this port (off by default; 9108 is customary).")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address --port listens on.")
@verbose_option
def worker(config_file, concurrency, stalled_after, port, host, verbose):
    """Keep every connection of CONFIG in sync on its `schedule:` (default every 5 minutes), until stopped.

    Needs `state:` on a PostgreSQL server: run as many workers as you like on one ledger; a connection is
    synced by one worker at a time, and a stopped worker's connections are taken over by the others."""
    setup_logging(verbose)
    cfg = load_config(config_file)
    url = getattr(cfg, "state_url", None)
    if url is None:
        click.echo(f"error: {config_file}: `runner worker` needs the state on a PostgreSQL server; `state:` is the "
                   f"file {cfg.state_path}\n    fix: set `state: \"${{DATABASE_URL}}\"` (a postgresql:// URL) in "
                   "the config and copy the existing state there with `runner state migrate CONFIG --to URL`; "
                   "or run `runner apply CONFIG` from a timer instead", err=True)
        sys.exit(EXIT_INVALID)
    from runner.engine import schedule

    opts = schedule.Options(concurrency=concurrency, stalled_after=stalled_after)
    run(_main(cfg, url, opts, host, port))


async def _main(cfg, url, opts, host, port):
    import asyncio

    from runner.engine import schedule

    ready = asyncio.Event()
    http = None
    if port is not None:
        http = asyncio.create_task(_health(host, port, ready))
    try:
        await schedule.serve(cfg, url, opts, ready)
    finally:
        if http is not None:
            http.cancel()


async def _health(host: str, port: int, ready):
    """/healthz (the process answers), /readyz (the job engine is connected), /metrics (Prometheus)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from runner import metrics

    async def healthz(request):
        return JSONResponse({"ok": True})

    async def readyz(request):
        if not ready.is_set():
            return JSONResponse({"ok": False, "message": "starting"}, status_code=503)
        return JSONResponse({"ok": True})

    async def prometheus(request):
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    app = Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", prometheus)])
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    server.install_signal_handlers = lambda: None  # the worker's own handlers stop the process
    await server.serve()
