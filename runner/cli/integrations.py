"""`runner integrations`: list and show specs, and the kit for writing one (new, trace, test)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from runner.cli.main import EXIT_FAILED, EXIT_INVALID, EXIT_OK, fail, load_config, output_option, run, setup_logging

SUBCOMMANDS = ("list", "show", "new", "trace", "test")
ID_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")


class IntegrationsGroup(click.Group):
    """`runner integrations` lists, `runner integrations ID` shows one spec, as before the kit's subcommands:
    a first argument that names no subcommand is the spec to show."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            positional, i = [], 0
            while i < len(args):
                if args[i] in ("--dir", "-o", "--output"):
                    i += 2  # an option and its value
                    continue
                if not args[i].startswith("-"):
                    positional.append(args[i])
                i += 1
            args = ["show" if positional else "list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=IntegrationsGroup, invoke_without_command=False)
def integrations():
    """List the integrations, show one spec, or write a new one (new, trace, test).

    \b
      runner integrations                     list every spec
      runner integrations ID                  show one
      runner integrations new ID              start a spec (and its fixtures folder)
      runner integrations trace CONFIG CONN   every request, answer and verdict of one connection
      runner integrations test SPEC           replay recorded answers and check the expected verdicts
    """


dir_option = click.option("--dir", "extra_dir", type=click.Path(file_okay=False), help="A folder of extra specs.")


def _found(extra_dir):
    from runner.spec import loader as specs

    return specs.available(Path(extra_dir) if extra_dir else Path("integrations.d").resolve())


@integrations.command("list")
@dir_option
@output_option
def list_cmd(extra_dir, output):
    """List the integrations."""
    from runner.errors import ConfigError
    from runner.spec import loader as specs

    rows = []
    for sid, path in _found(extra_dir).items():
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


@integrations.command("show")
@click.argument("integration")
@dir_option
@output_option
def show_cmd(integration, extra_dir, output):
    """Show one spec."""
    from runner.errors import ConfigError
    from runner.spec import loader as specs

    found = _found(extra_dir)
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


# --- new -----------------------------------------------------------------------------------------------------

@integrations.command("new")
@click.argument("spec_id")
@click.option("--dir", "target", default="integrations.d", show_default=True, type=click.Path(file_okay=False),
              help="Where the spec goes (a config finds it there: `integrations_dir:`, default integrations.d/).")
def new_cmd(spec_id, target):
    """Start a spec: ID.yaml with every part commented and TODO where the provider's facts go, and the
    folder ID.fixtures/ beside it for its recorded answers and expectations (`runner integrations test`)."""
    from runner.cli.scaffold import spec_text

    if not ID_RE.match(spec_id):
        click.echo(f"error: '{spec_id}' is not a usable id\n    fix: use lower-case letters, digits and _, "
                   f"starting with a letter (e.g. acme_billing)", err=True)
        sys.exit(EXIT_INVALID)
    folder = Path(target)
    spec_path, fixtures = folder / f"{spec_id}.yaml", folder / f"{spec_id}.fixtures"
    for p in (spec_path, fixtures):
        if p.exists():
            click.echo(f"error: {p} already exists; nothing was written\n"
                       f"    fix: choose another id, or move {p} away first", err=True)
            sys.exit(EXIT_INVALID)
    folder.mkdir(parents=True, exist_ok=True)
    fixtures.mkdir()
    spec_path.write_text(spec_text(spec_id, folder), encoding="utf-8")
    (fixtures / "README.md").write_text(
        f"Recorded answers (responses.yaml) and expected verdicts (expected.yaml) of the spec {spec_id}.\n"
        f"Make them with `runner integrations test {spec_path} --record CONFIG CONNECTION`,\n"
        f"check them with `runner integrations test {spec_path}`.\n", encoding="utf-8")
    click.echo(f"wrote {spec_path} and {fixtures}/")
    click.echo(f"next: fill in every TODO, then `runner validate CONFIG` with a connection to '{spec_id}', "
               f"and `runner integrations trace CONFIG CONNECTION`")


# --- trace ---------------------------------------------------------------------------------------------------

@integrations.command("trace")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.argument("connection")
@click.option("--limit", default=5, show_default=True, type=click.IntRange(min=1),
              help="Show the mapped invoice and verdict of this many records (and stop reading there).")
@output_option
@click.option("-v", "--verbose", count=True, help="More log lines (-vv for debug).")
def trace_cmd(config_file, connection, limit, output, verbose):
    """Every request one connection sends (secrets masked), each answer's status and shape, and the mapped
    invoice with its verdict for the first records. Reads only; imports nothing."""
    from runner.cli.main import open_store, select
    from runner.engine import trace
    from runner.net.http import Clients

    setup_logging(verbose)
    cfg = load_config(config_file)
    conn = select(cfg, (connection,))[0]
    store = open_store(cfg)
    text = output == "text"

    def on_step(step):
        if text:
            click.echo(f"> {step.method} {step.url}")
            for k, v in step.headers.items():
                click.echo(f">   {k}: {v}")
            facts = ", ".join(f"{k} {v}" for k, v in step.shape.items())
            click.echo(f"< HTTP {step.status}" + (f"  {facts}" if facts else ""))

    async def go():
        clients = Clients()
        try:
            return await trace.walk(conn, clients, store, limit=limit, on_step=on_step)
        finally:
            await clients.aclose()

    try:
        w = run(go())
    finally:
        store.close()
    if output == "json":
        from runner.cli.report import print_json
        from runner.redact import redact

        print_json({"requests": [vars(s) for s in w.steps], "account": {"id": w.source.account_id,
                                                                         "name": w.source.account_name},
                    "invoices": [{**v.as_dict(), "mapped": inv} for _, v, inv in w.records]})
        return
    click.echo(f"account: {w.source.account_id}" + (f" ({w.source.account_name})" if w.source.account_name else ""))
    for _, v, inv in w.records:
        import json

        from runner.redact import redact

        click.echo(f"\ninvoice {v.invoice_id}: {v.verdict}" + (f" ({v.reason}: {v.message})" if v.reason else ""))
        click.echo(redact(json.dumps(inv, indent=2, default=str, ensure_ascii=False)) if inv is not None
                   else "  (the spec could not map this record)")


# --- test ----------------------------------------------------------------------------------------------------

@integrations.command("test")
@click.argument("spec")
@click.option("--fixtures", type=click.Path(file_okay=False), help="The recording's folder (default: SPEC's "
              "ID.fixtures/ beside the spec file).")
@click.option("--record", nargs=2, metavar="CONFIG CONNECTION",
              help="First record the answers of this connection (a live account or a simulator), with secrets "
                   "masked and personal data replaced; writes expected.yaml from its verdicts if there is none.")
@click.option("--limit", type=click.IntRange(min=1), help="With --record: stop after this many invoices.")
@dir_option
@click.option("-v", "--verbose", count=True, help="More log lines (-vv: every request replayed).")
def test_cmd(spec, fixtures, record, limit, extra_dir, verbose):
    """Replay a spec's recorded answers and check the verdicts and mapped fields in expected.yaml.
    SPEC is a spec file or the id of one. Sends no request (without --record): runs in CI."""
    from runner.engine import recording, trace
    from runner.errors import ConfigError
    from runner.spec import loader as specs

    path = Path(spec)
    if not path.is_file():
        found = _found(extra_dir)
        if spec not in found:
            click.echo(f"error: '{spec}' is neither a spec file nor a known integration ({', '.join(found)})", err=True)
            sys.exit(EXIT_INVALID)
        path = found[spec]
    try:
        spec_id = specs.load_file(path.resolve()).id
    except ConfigError as exc:
        fail(exc)
    folder = Path(fixtures) if fixtures else recording.fixtures_dir(path, spec_id)
    if record:
        from runner.cli.main import open_store, select

        setup_logging(verbose)
        cfg = load_config(record[0])
        conn = select(cfg, (record[1],))[0]
        if conn.integration != spec_id:
            click.echo(f"error: the connection '{conn.name}' uses '{conn.integration}', not '{spec_id}'", err=True)
            sys.exit(EXIT_INVALID)
        store = open_store(cfg)
        try:
            w = run(trace.record(conn, store, path, folder, limit=limit))
        finally:
            store.close()
        click.echo(f"recorded {len(w.steps)} answers and {len(w.records)} invoices into {folder}/")
    setup_logging(verbose)
    # The folder is one case; each subfolder with its own recording (e.g. reference/) is another.
    cases = [d for d in (folder, *sorted(p for p in folder.glob("*") if p.is_dir()))
             if (d / recording.RESPONSES).exists() and (d / recording.EXPECTED).exists()]
    if not cases:
        click.echo(f"error: {folder} has no {recording.RESPONSES} and {recording.EXPECTED}\n"
                   f"    fix: record them: runner integrations test {spec} --record CONFIG CONNECTION", err=True)
        sys.exit(EXIT_INVALID)
    failed = 0
    for case in cases:
        outcome = run(trace.spec_test(path, spec_id, case))
        for line in outcome.unmatched:
            click.echo(f"note: no recorded answer for {line}")
        for p in outcome.problems:
            click.echo(f"FAIL {p}")
        if outcome.problems:
            failed += 1
            click.echo(f"{spec_id}: {outcome.failed} of {outcome.checked} invoices not as expected "
                       f"({outcome.seen} invoices replayed from {case})")
        else:
            click.echo(f"{spec_id}: ok, {outcome.checked} invoices as expected "
                       f"({outcome.seen} invoices replayed from {case})")
    sys.exit(EXIT_FAILED if failed else EXIT_OK)
