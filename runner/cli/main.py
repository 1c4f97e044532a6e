"""The `runner` command line.

Exit codes (also in the README):
  0  everything worked
  1  the run finished, but a connection or some invoices failed (see the summary)
  2  the config or a spec is invalid, or the command was used wrongly
  3  another `runner apply` holds the state store's lock
  130 interrupted (Ctrl-C); everything committed so far is kept
  143 stopped by SIGTERM (as Ctrl-C: the pages fetched are finished and recorded, the summary printed)
"""
from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import sys

import click

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_LOCKED = 0, 1, 2, 3

# Commands that live in their own modules, imported only when used (start-up time matters for validate).
LAZY = {
    "doctor": "runner.cli.diagnostics:doctor",
    "explain": "runner.cli.diagnostics:explain",
    "status": "runner.cli.diagnostics:status",
    "support-bundle": "runner.cli.diagnostics:support_bundle",
    "connect": "runner.cli.connect:connect",
    "serve": "runner.cli.inbound:serve",
    "keys": "runner.cli.inbound:keys",
    "state": "runner.cli.state:state",
}


class Group(click.Group):
    def list_commands(self, ctx):
        extra = [n for n, target in LAZY.items() if importlib.util.find_spec(target.split(":")[0]) is not None]
        return sorted(set(super().list_commands(ctx)) | set(extra))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in LAZY:
            return cmd
        module, attr = LAZY[name].split(":")
        if importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        """Errors are told to a person, never as a traceback (which could also carry secrets)."""
        from runner.errors import RunnerError

        try:
            return super().invoke(ctx)
        except RunnerError as exc:
            fail(exc)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            from runner.redact import redact

            if isinstance(exc, OSError) and exc.errno == errno.EMFILE:
                click.echo(f"error: the system's limit of open files ({_files_limit()}) is too low for this run: "
                           "each connection keeps a network connection open\n"
                           "    fix: raise it (for example `ulimit -n 8192` before the run, or LimitNOFILE= in a "
                           "systemd unit), or split the connections over several configs", err=True)
                sys.exit(EXIT_FAILED)
            click.echo(redact(f"error: unexpected {type(exc).__name__}: {exc}\n"
                              "    fix: this is a bug in the runner; run again with -vv and report the output "
                              "(it is redacted) with `runner support-bundle`"), err=True)
            if os.environ.get("RUNNER_DEBUG"):
                raise
            sys.exit(EXIT_FAILED)


def _files_limit() -> int | str:
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return "unknown"


def more_files() -> None:
    """Raise the soft limit of open files to the hard one, as servers do: a sync keeps a socket per
    connection, and the usual soft limit (1,024) is reached by a few hundred of them, the hard one
    (often 524,288) is not."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, OSError, ValueError):  # not on this platform, or not allowed: the limit stays
        pass


def setup_logging(verbose: int = 0) -> None:
    from loguru import logger

    from runner.redact import redact

    logger.remove()
    level = "DEBUG" if verbose > 1 else "INFO" if verbose == 1 else "WARNING"

    def sink(message):
        sys.stderr.write(redact(str(message)))

    fmt = "{time:HH:mm:ss} {level: <7} {message}\n"
    # diagnose=False: loguru would otherwise print variable values (secrets) in tracebacks.
    logger.add(sink, level=level, format=fmt, backtrace=False, diagnose=False, colorize=False)


def fail(exc) -> None:
    """Print a RunnerError for a person (never a traceback) and exit with its code."""
    from runner.redact import redact

    click.echo(redact(f"error: {exc.render()}"), err=True)
    sys.exit(getattr(exc, "exit_code", EXIT_FAILED))


def load_config(path: str, *, strict: bool = True):
    from runner.spec import config
    from runner.errors import ConfigError

    try:
        return config.load(path, strict=strict)
    except ConfigError as exc:
        fail(exc)


def run(coro, stop=None):
    """Run a command's coroutine. SIGTERM (a service manager, `kill`) is handled like Ctrl-C, not as a sudden
    death: with `stop` (a pipeline.StopRequest) the first signal asks the run to finish the pages it has and
    end with its summary, and a second one cancels it; without, the first cancels. Either way whatever was
    committed is kept and the run is recorded as ended. Exit 128 + the signal's number (130, 143)."""
    import asyncio  # only commands that talk to an API pay for it (start-up time of `validate`)
    import signal

    received: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal(signum: int) -> None:
            received.append(signum)
            if stop is not None and len(received) == 1:
                stop.set(signal.Signals(signum).name)
            else:
                task.cancel()

        handled = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
                handled.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or not on this platform
                pass
        try:
            return await coro
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("interrupted: everything committed so far is kept; run the same command again to continue", err=True)
        sys.exit(128 + (received[0] if received else signal.SIGINT))


def stopped_code(stop) -> int | None:
    """The exit code of a run a stop signal ended early (see run), or None."""
    import signal

    return 128 + signal.Signals[stop.why].value if stop is not None and stop.why else None


def select(cfg, names: tuple[str, ...]):
    from runner.errors import ConfigError

    if not names:
        return None
    try:
        return [cfg.connection(n) for n in names]
    except ConfigError as exc:
        fail(exc)


def open_store(cfg, *, lock: bool = False):
    from runner import state

    from runner.engine.destinations import ledger_id

    store = state.open_store(cfg, destination=ledger_id(cfg.destination))
    if lock and not store.lock():
        click.echo(f"error: another `runner apply` is using {store.describe()}; wait for it to finish", err=True)
        sys.exit(EXIT_LOCKED)
    return store


output_option = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                             help="text for people, json for scripts.")
verbose_option = click.option("-v", "--verbose", count=True, help="More log lines (-vv for debug).")
connection_option = click.option("--connection", "-c", "connections", multiple=True,
                                 help="Only this connection (repeatable).")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runner", prog_name="runner")
def main():
    """Import unpaid invoices from accounting systems into Debitura as collection cases.

    Start with `runner validate CONFIG`, look with `runner plan CONFIG`, then `runner apply CONFIG`.
    """


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@output_option
def validate(config_file, output):
    """Check CONFIG and every integration spec it uses (exit 2 when invalid). Sends no request."""
    cfg = load_config(config_file)
    if output == "json":
        from runner.cli.report import print_json

        print_json({"ok": True, "config": str(cfg.file), "connections": [
            {"name": c.name, "integration": c.integration, "environment": c.environment, "window": c.window.as_dict()}
            for c in cfg.connections], "destination": cfg.destination.type})
        return
    click.echo(f"{cfg.file}: valid")
    for c in cfg.connections:
        state = "" if c.enabled else " (disabled)"
        click.echo(f"  {c.name}: {c.integration} ({c.environment}){state}, window {c.window.describe()}")
    d = cfg.destination
    click.echo(f"  destination: {d.type}" + (f" ({d.environment})" if d.environment else f" ({d.path})"))


def _sync(config_file, mode, details, output, verbose, connections):
    setup_logging(verbose)
    more_files()
    from runner.engine import pipeline
    from runner.cli import report

    cfg = load_config(config_file)
    store = open_store(cfg, lock=(mode == "apply"))
    progress = None
    live = None
    if mode == "apply" and output == "text" and sys.stderr.isatty():
        from rich.progress import Progress, SpinnerColumn, TextColumn

        live = Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True,
                        console=report.console(stderr=True))
        tasks = {}

        def progress(name, res):
            if name not in tasks:
                tasks[name] = live.add_task(name)
            live.update(tasks[name], description=f"{name}: {res.seen} seen, {res.imported} imported")

        live.start()
    stop = pipeline.StopRequest()
    try:
        result = run(pipeline.sync(cfg, mode=mode, store=store, connections=select(cfg, connections),
                                   # every verdict is kept only to be shown: with --details, and in a plan's JSON
                                   details=details or (output == "json" and mode == "plan"), progress=progress,
                                   command=mode, stop=stop), stop=stop)
    finally:
        if live is not None:
            live.stop()
        store.close()
    if output == "json":
        data = result.as_dict()
        if details or mode == "plan":
            for c, cr in zip(data["connections"], result.connections):
                c["invoices"] = [v.as_dict() for v in cr.verdicts]
        report.print_json(data)
    else:
        report.render_run(result, details=details)
    sys.exit(stopped_code(stop) or (EXIT_OK if result.ok else EXIT_FAILED))


def sync_options(f):
    """The arguments plan and apply share."""
    for option in reversed((click.argument("config_file", type=click.Path(dir_okay=False)),
                            click.option("--details", is_flag=True, help="Show every invoice and its verdict."),
                            output_option, verbose_option, connection_option)):
        f = option(f)
    return f


@main.command()
@sync_options
def plan(config_file, details, output, verbose, connections):
    """Dry run: per connection, how many invoices would be imported and how many skipped, and why. Creates nothing."""
    _sync(config_file, "plan", details, output, verbose, connections)


@main.command()
@sync_options
def apply(config_file, details, output, verbose, connections):
    """Import: create a case for every eligible invoice not imported before, and record a verdict for each invoice."""
    _sync(config_file, "apply", details, output, verbose, connections)


@main.command()
@click.argument("integration", required=False)
@click.option("--dir", "extra_dir", type=click.Path(file_okay=False), help="A folder of extra specs.")
@output_option
def integrations(integration, extra_dir, output):
    """List the integrations, or show one spec."""
    from pathlib import Path

    from runner.spec import loader as specs
    from runner.errors import ConfigError

    found = specs.available(Path(extra_dir) if extra_dir else Path("integrations.d").resolve())
    if integration is None:
        rows = []
        for sid, path in found.items():
            try:
                s = specs.load_file(path)
                rows.append({"id": sid, "name": s.name, "auth": s.auth.type, "environments": list(s.environments),
                             "file": str(path), "description": s.description})
            except ConfigError as exc:
                rows.append({"id": sid, "file": str(path), "error": exc.render()})
        if output == "json":
            from runner.cli.report import print_json

            print_json(rows)
            return
        for r in rows:
            if "error" in r:
                click.echo(f"{r['id']:<22} INVALID  {r['file']}\n{r['error']}")
            else:
                click.echo(f"{r['id']:<22} {r['auth']:<8} {', '.join(r['environments']):<24} {r['description']}")
        return
    if integration not in found:
        click.echo(f"error: no integration '{integration}'; known: {', '.join(found)}", err=True)
        sys.exit(EXIT_INVALID)
    try:
        s = specs.load_file(found[integration])
    except ConfigError as exc:
        fail(exc)
    if output == "json":
        from runner.cli.report import print_json

        print_json(s.raw)
        return
    click.echo(f"# {found[integration]}")
    click.echo(found[integration].read_text())


@main.group()
def sandbox():
    """The built-in simulators of the providers and of Debitura."""


@sandbox.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--data-dir", type=click.Path(file_okay=False), help="Persist simulator state (cases) here.")
def sandbox_serve(host, port, data_dir):
    """Serve every simulator over HTTP under /<name> (e.g. http://127.0.0.1:8765/debitura)."""
    from pathlib import Path

    from runner.sandbox import server

    try:
        server.serve(host=host, port=port, data_dir=Path(data_dir) if data_dir else None)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            click.echo(f"error: port {port} is in use; choose another with --port", err=True)
        elif exc.errno in (errno.EACCES, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(exc, socket_error()):
            click.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}\n"
                       f"    fix: choose another --host or --port (ports below 1024 need root)", err=True)
        else:
            raise
        sys.exit(EXIT_INVALID)


def socket_error() -> type:
    """What an unknown --host raises (a failed name lookup)."""
    import socket

    return socket.gaierror


if __name__ == "__main__":  # pragma: no cover
    main()
