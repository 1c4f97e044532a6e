"""The `runner` command line.

Exit codes (also in the README):
  0  everything worked
  1  the run finished, but a connection or some invoices failed (see the summary)
  2  the config or a spec is invalid, or the command was used wrongly (apply against Debitura production
     with no terminal to ask and no --auto-approve)
  3  another `runner apply` holds the state store's lock
  130 interrupted (Ctrl-C); everything committed so far is kept
  143 stopped by SIGTERM (as Ctrl-C: the pages fetched are finished and recorded, the summary printed)
`plan --detailed-exitcode` uses Terraform's instead: 0 nothing to create, 1 an error, 2 cases would be created.
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
    "integrations": "runner.cli.integrations:integrations",
    "webhooks": "runner.cli.webhooks:webhooks",
    "state": "runner.cli.state:state",
    "worker": "runner.cli.worker:worker",
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
        except BrokenPipeError:
            # The reader of our output left (`runner validate c.yaml | head -1`): nothing is wrong, stop quietly.
            # click's main() silences the flush at exit and ends with exit code 1.
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


LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "RUNNER_LOG_FORMAT"


def setup_logging(verbose: int = 0) -> None:
    """Log lines on stderr through the redaction layer: plain text (the default), or with --log-format json
    (RUNNER_LOG_FORMAT=json) one JSON object per line for a log shipper: time, level, event, run_id,
    connection, and any other context bound to the line."""
    from loguru import logger

    from runner.redact import redact

    logger.remove()
    level = "DEBUG" if verbose > 1 else "INFO" if verbose == 1 else "WARNING"
    # diagnose=False: loguru would otherwise print variable values (secrets) in tracebacks.
    if os.environ.get(LOG_FORMAT_ENV, "text").strip().lower() == "json":
        logger.add(_json_sink, level=level, format="{message}", backtrace=False, diagnose=False, colorize=False)
        return

    def sink(message):
        sys.stderr.write(redact(str(message)))

    # loguru ends each entry with a line break of its own: the format has none, so no blank line between entries.
    fmt = "{time:HH:mm:ss} {level: <7} {message}"
    logger.add(sink, level=level, format=fmt, backtrace=False, diagnose=False, colorize=False)


def _json_sink(message) -> None:
    """One JSON object per entry, built from loguru's record; the redaction layer runs on the serialized text."""
    import json

    from runner.redact import redact

    r = message.record
    extra = dict(r["extra"])
    entry = {"time": r["time"].isoformat(), "level": r["level"].name, "event": r["message"],
             "run_id": extra.pop("run_id", None), "connection": extra.pop("connection", None),
             "logger": r["name"]}
    entry.update(extra)
    if r["exception"] is not None and r["exception"].type is not None:
        entry["exception"] = f"{r['exception'].type.__name__}: {r['exception'].value}"
    sys.stderr.write(redact(json.dumps(entry, default=str, ensure_ascii=False)) + "\n")


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
@click.option("--log-format", type=click.Choice(LOG_FORMATS), envvar=LOG_FORMAT_ENV, default="text",
              show_default=True, help="Log lines on stderr: text for people, json (one object per line) for a "
              "log shipper. Also RUNNER_LOG_FORMAT.")
def main(log_format):
    """Import unpaid invoices from accounting systems into Debitura as collection cases.

    Start with `runner validate CONFIG`, look with `runner plan CONFIG`, then `runner apply CONFIG`.
    """
    os.environ[LOG_FORMAT_ENV] = log_format  # read by setup_logging, also in the servers' worker processes


@main.command()
@click.argument("config_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--check-secrets", is_flag=True,
              help="Also read every secret the config references (environment variables, files) and check it. "
                   "Without it, validate needs no secret at all: only each reference's form is checked.")
@output_option
def validate(config_files, check_secrets, output):
    """Check each CONFIG and every integration spec it uses (exit 2 when one is invalid). Sends no request.

    Needs no secrets unless --check-secrets is given, so it can run where none are set (a pre-commit hook,
    a pull request from a fork)."""
    from runner.spec import config
    from runner.errors import ConfigError
    from runner.redact import redact

    reports, failed = [], None
    for config_file in config_files:
        try:
            cfg = config.load(config_file, resolve=check_secrets)
        except ConfigError as exc:
            failed = exc
            if output != "json":
                click.echo(redact(f"error: {exc.render()}"), err=True)
                continue
            reports.append({"ok": False, "config": str(config_file), "errors": [
                {"file": p.file, "line": p.line, "column": p.column, "message": redact(p.message),
                 "fix": redact(p.fix) if p.fix else None, "where": p.where} for p in exc.problems]})
            continue
        if output == "json":
            reports.append({"ok": True, "config": str(cfg.file), "secrets_checked": check_secrets, "connections": [
                {"name": c.name, "integration": c.integration, "environment": c.environment,
                 "window": c.window.as_dict()} for c in cfg.connections], "destination": cfg.destination.type})
            continue
        click.echo(f"{cfg.file}: valid" + ("" if check_secrets else
                                           " (secrets not read: add --check-secrets to check them)"))
        for c in cfg.connections:
            state = "" if c.enabled else " (disabled)"
            click.echo(f"  {c.name}: {c.integration} ({c.environment}){state}, window {c.window.describe()}")
        d = cfg.destination
        click.echo(f"  destination: {d.type}" + (f" ({d.environment})" if d.environment else f" ({d.path})"))
    if output == "json":
        from runner.cli.report import print_json

        print_json(reports[0] if len(reports) == 1 else reports)
    if failed is not None:
        sys.exit(failed.exit_code)


def _sync(config_file, mode, details, output, verbose, connections, auto_approve=True, full=False):
    setup_logging(verbose)
    more_files()
    from runner.engine import pipeline
    from runner.cli import report

    cfg = load_config(config_file)
    if mode == "apply" and not auto_approve and _asks(cfg.destination):
        _plan_ask_apply(cfg, details, output, verbose, connections, full)
        return
    store = open_store(cfg, lock=(mode == "apply"))
    from runner.cli import progress as progress_display

    chosen = select(cfg, connections) or cfg.connections
    live = progress_display.make(mode, output, sum(1 for c in chosen if c.enabled and c.spec.pull), report.console)
    progress = live
    if live is not None:
        live.start()
    stop = pipeline.StopRequest()
    try:
        result = run(pipeline.sync(cfg, mode=mode, store=store, connections=select(cfg, connections),
                                   # every verdict is kept only to be shown: with --details, and in a plan's JSON
                                   details=details or (output == "json" and mode == "plan"), progress=progress,
                                   command=mode, stop=stop, full=full), stop=stop)
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
                            output_option, verbose_option, connection_option,
                            click.option("--full", is_flag=True, help="Read the whole date window, even where the "
                                         "integration's change feed would read only what changed since the last run."))):
        f = option(f)
    return f


@main.command()
@sync_options
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Save the plan (a summary, every invoice and the case it becomes) to this file, for review and "
                   "for `runner apply FILE`, which then sends exactly these invoices.")
@click.option("--detailed-exitcode", is_flag=True,
              help="Exit 0 when there is nothing to create, 2 when cases would be created, 1 on any error "
                   "(an invalid config included).")
@click.option("--preview", is_flag=True,
              help="Ask Debitura (POST /cases/preview) whether each planned case is eligible and at what fee.")
@click.option("--preview-limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="Preview at most this many invoices.")
def plan(config_file, details, output, verbose, connections, full, out, detailed_exitcode, preview, preview_limit):
    """Dry run: per connection, how many invoices would be imported and how many skipped, and why; checks the
    destination (its key and collection contract) too. Creates nothing."""
    from runner.errors import ConfigError
    from runner.engine import pipeline, plan as planmod
    from runner.cli import report

    setup_logging(verbose)
    more_files()
    try:
        from runner.spec import config

        cfg = config.load(config_file)
    except ConfigError as exc:
        if detailed_exitcode:  # 2 means "changes" under this flag: an invalid config is an error, 1
            from runner.redact import redact

            click.echo(redact(f"error: {exc.render()}"), err=True)
            sys.exit(EXIT_FAILED)
        fail(exc)
    store = open_store(cfg)
    stop = pipeline.StopRequest()
    try:
        doc, result, checks = run(planmod.make(cfg, store, connections=select(cfg, connections),
                                               preview=preview_limit if preview else 0, stop=stop, full=full),
                                  stop=stop)
    finally:
        store.close()
    if out and not stopped_code(stop):  # an interrupted plan is not one to review and apply
        planmod.write(doc, out)
    if output == "json":
        data = result.as_dict()
        for c, cr in zip(data["connections"], result.connections):
            c["invoices"] = [v.as_dict() for v in cr.verdicts]
        data.update(destination_checks=checks.as_dict(), pending=doc["pending"], plan_file=out)
        report.print_json(data)
    else:
        report.render_run(result, details=details)
        _print_checks(checks)
        if out:
            click.echo(f"Saved the plan to {out}: review it (`jq -r .summary {out}`), then `runner apply {out}`")
    code = stopped_code(stop)
    if code is None:
        ok = result.ok and checks.ok
        code = (EXIT_FAILED if not ok else 2 if doc["pending"] else EXIT_OK) if detailed_exitcode else (
            EXIT_OK if ok else EXIT_FAILED)
    sys.exit(code)


def _print_checks(checks) -> None:
    if not checks.creditor and not checks.problems and not checks.warnings and checks.contract is None:
        return
    click.echo(f"destination check: {checks.destination}" + (f", creditor {checks.creditor}" if checks.creditor else ""))
    if checks.contract is not None:
        c = checks.contract
        click.echo("  debt collection agreement: " + ("signed" if c.get("signed") and not c.get("requiresResigning")
                                                      else "NOT signed"))
    for p in checks.problems:
        click.echo(f"  error: {p['message']}" + (f"\n    fix: {p['fix']}" if p.get("fix") else ""))
    for p in checks.warnings:
        click.echo(f"  warning: {p['message']}" + (f"\n    fix: {p['fix']}" if p.get("fix") else ""))
    if checks.previews:
        refused = [k for k, v in checks.previews.items() if not v.get("eligible")]
        click.echo(f"  preview: {len(checks.previews)} case(s) asked, {len(refused)} not eligible"
                   + "".join(f"\n    {inv}: {checks.previews[(c, inv)].get('reason')}" for c, inv in refused))


@main.command()
@sync_options
@click.option("--auto-approve", is_flag=True,
              help="Do not ask before creating cases in Debitura production (for automation).")
def apply(config_file, details, output, verbose, connections, full, auto_approve):
    """Import: create a case for every eligible invoice not imported before, and record a verdict for each invoice.

    CONFIG_FILE may be a plan saved by `runner plan --out FILE`: then exactly its invoices are sent, and the plan
    is refused when the config or a spec changed since; an invoice changed at the source since is not sent.
    Against Debitura production, apply shows the plan and asks first (on a terminal; elsewhere it needs
    --auto-approve)."""
    from runner.engine import plan as planmod

    if planmod.is_plan_file(config_file):
        if connections:
            click.echo("error: a saved plan's connections were chosen when it was made; leave out --connection",
                       err=True)
            sys.exit(EXIT_INVALID)
        doc = planmod.load(config_file)
        _apply_plan(doc, load_config(doc["config"]["path"]), config_file, details, output, verbose, auto_approve)
        return
    _sync(config_file, "apply", details, output, verbose, connections, auto_approve=auto_approve, full=full)


def _plan_ask_apply(cfg, details, output, verbose, connections, full=False) -> None:
    """Apply of a config against Debitura production: plan it, show the plan and ask, then apply that plan."""
    from runner.engine import pipeline, plan as planmod

    _no_terminal(cfg)
    store = open_store(cfg)
    stop = pipeline.StopRequest()
    try:
        doc, _, _ = run(planmod.make(cfg, store, connections=select(cfg, connections), stop=stop, full=full),
                        stop=stop)
    finally:
        store.close()
    if stopped_code(stop):
        sys.exit(stopped_code(stop))
    _apply_plan(doc, cfg, "(the plan above)", details, output, verbose, auto_approve=False)


def _asks(dest) -> bool:
    """Cases that are really collected: Debitura production, not test cases. The sandbox and a file never ask."""
    return dest.type == "debitura" and dest.environment == "production" and not dest.is_test


def _no_terminal(cfg) -> None:
    if sys.stdin.isatty():
        return
    click.echo(f"error: this would create real collection cases in {cfg.destination.environment} Debitura, and "
               f"there is no terminal to ask for approval; nothing was sent\n"
               f"    fix: review a plan, then apply it without asking: `runner plan {cfg.file} --out plan.json` "
               f"and `runner apply plan.json --auto-approve`", err=True)
    sys.exit(EXIT_INVALID)


def _apply_plan(doc, cfg, plan_path, details, output, verbose, auto_approve):
    setup_logging(verbose)
    more_files()
    from runner.engine import pipeline, plan as planmod
    from runner.cli import report

    planmod.prepare(doc, cfg, plan_path)  # a stale plan is refused before anything is asked or sent
    if doc["checks"].get("problems"):  # a refused key, an unsigned contract: every case would fail
        click.echo("error: the plan's destination check failed, so nothing was sent:\n" + "\n".join(
            f"  {p['message']}" + (f"\n    fix: {p['fix']}" if p.get("fix") else "") for p in doc["checks"]["problems"]),
            err=True)
        sys.exit(EXIT_FAILED)
    if not auto_approve and _asks(cfg.destination):
        _no_terminal(cfg)
        click.echo(doc["summary"], err=True)
        if doc["pending"] and not click.confirm(f"\nCreate these {doc['pending']} case(s) in Debitura production?",
                                                default=False, err=True):
            click.echo("Nothing was sent.", err=True)
            sys.exit(EXIT_FAILED)
    store = open_store(cfg, lock=True)
    stop = pipeline.StopRequest()
    try:
        result, missed = run(planmod.apply(doc, cfg, store, plan_path, stop=stop), stop=stop)
    finally:
        store.close()
    if output == "json":
        data = result.as_dict()
        if details:
            for c, cr in zip(data["connections"], result.connections):
                c["invoices"] = [v.as_dict() for v in cr.verdicts]
        data["plan"] = {"file": str(plan_path), "planned": doc["pending"], "not_delivered": missed}
        report.print_json(data)
    else:
        report.render_run(result, details=details)
        if missed:
            click.echo(f"{len(missed)} planned invoice(s) were not delivered:")
            for m in missed:
                click.echo(f"  {m['connection']}: {m['number'] or m['invoice_id']}: {m['why']}")
            click.echo(f"    fix: review a new plan (`runner plan {cfg.file} --out plan.json`) and apply it")
    sys.exit(stopped_code(stop) or (EXIT_OK if result.ok and not missed else EXIT_FAILED))


@main.command()
@click.option("--dir", "extra_dir", type=click.Path(file_okay=False),
              help="A folder of extra specs (default: integrations.d/ here, if present).")
def schema(extra_dir):
    """Print the config's JSON Schema for the integrations installed (integration and environment names are
    checked), for an editor: `runner schema > .runner-schema.json`, then in the config
    `# yaml-language-server: $schema=.runner-schema.json`."""
    import json
    from pathlib import Path

    from runner.spec import editor_schema

    click.echo(json.dumps(editor_schema.build(Path(extra_dir) if extra_dir else Path("integrations.d").resolve()),
                          indent=2, ensure_ascii=False))


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


@sandbox.command("pay")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("integration")
@click.argument("invoice")
@click.option("--amount", help="Pay only this much (major units, e.g. 125.50): a partial payment.")
def sandbox_pay(config_file, integration, invoice, amount):
    """Pay an invoice (by id or number) in a simulator: the next run finds it paid after its case exists."""
    _sandbox_act(config_file, "pay", integration, invoice, amount)


@sandbox.command("void")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("integration")
@click.argument("invoice")
def sandbox_void(config_file, integration, invoice):
    """Void an invoice (by id or number) in a simulator."""
    _sandbox_act(config_file, "void", integration, invoice, None)


@sandbox.command("credit")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("integration")
@click.argument("invoice")
@click.option("--amount", help="Credit only this much (major units); default: all that is left.")
def sandbox_credit(config_file, integration, invoice, amount):
    """Credit an invoice (a credit note; by id or number) in a simulator."""
    _sandbox_act(config_file, "credit", integration, invoice, amount)


def _sandbox_act(config_file, action, integration, invoice, amount) -> None:
    from runner.sandbox import controls

    cfg = load_config(config_file, strict=False)
    click.echo(controls.act(cfg.state_path.parent / "sandbox", action, integration, invoice, amount))


def socket_error() -> type:
    """What an unknown --host raises (a failed name lookup)."""
    import socket

    return socket.gaierror


if __name__ == "__main__":  # pragma: no cover
    main()
