"""`runner doctor`, `runner explain`, `runner status`, `runner support-bundle` (logic in runner.diagnostics)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runner.cli.main import (EXIT_FAILED, EXIT_INVALID, EXIT_OK, connection_option, load_config, open_store, output_option,
                        run, select, setup_logging, verbose_option)
from runner.redact import redact, redact_obj

MARK = {"ok": "ok  ", "warning": "WARN", "failed": "FAIL", "skipped": "skip"}
STYLE = {"ok": "green", "warning": "yellow", "failed": "red", "skipped": "dim"}


def _echo(text: str = "", **style) -> None:
    if style and sys.stdout.isatty():
        click.secho(redact(text), **style)
    else:
        click.echo(redact(text))


def _json(obj) -> None:
    sys.stdout.write(redact(json.dumps(redact_obj(obj), indent=2, default=str, ensure_ascii=False)) + "\n")


def render_doctor(report) -> None:
    scope = None
    for c in report.checks:
        if c.scope != scope:
            scope = c.scope
            _echo()
            _echo(f"● {scope}" if scope == "destination" else f"● connection {scope}", bold=True)
            if scope in report.summaries:
                _echo(f"  {report.summaries[scope]}")
        _echo(f"  [{MARK[c.status]}] {c.title}: {c.message}", fg=STYLE[c.status])
        if c.fix and c.status in ("failed", "warning"):
            _echo("         fix: " + c.fix.replace("\n", "\n         "), fg="yellow")
    n = report.counts()
    _echo()
    _echo(f"doctor: {n.get('failed', 0)} failed, {n.get('warning', 0)} warning(s), {n.get('ok', 0)} ok, "
          f"{n.get('skipped', 0)} skipped · {report.seconds:.1f}s · nothing was created", bold=True)


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@connection_option
@click.option("--max-records", default=5000, show_default=True, type=int,
              help="Stop reading a connection's invoices after this many.")
@output_option
@verbose_option
def doctor(config_file, connections, max_records, output, verbose):
    """Run the troubleshooting checklist for real: credentials, permissions, environments, OAuth connections,
    accounts, the date window, addresses, paid invoices, duplicates, the destination and the last sync.

    Exit 0 when no check failed, 1 otherwise. Only reads: it never creates a case.
    """
    setup_logging(verbose)
    from runner.diagnostics import checks as diagnostics

    cfg = load_config(config_file, strict=False)
    store = open_store(cfg)
    try:
        report = run(diagnostics.doctor(cfg, store, select(cfg, connections), max_records=max_records))
    finally:
        store.close()
    if output == "json":
        _json(report.as_dict())
    else:
        render_doctor(report)
    sys.exit(EXIT_OK if report.ok else EXIT_FAILED)


def render_explanation(ex) -> None:
    head = f"{ex.key} in {ex.connection} ({ex.integration})"
    if ex.invoice_id and ex.invoice_id != ex.key:
        head += f": invoice {ex.invoice_id}" + (f", number {ex.number}" if ex.number and ex.number != ex.key else "")
    _echo(head, bold=True)
    for s in ex.stages:
        _echo(f"  [{MARK.get(s['result'], s['result'])}] {s['stage']:<14} {s['text']}", fg=STYLE.get(s["result"]))
    _echo()
    _echo(ex.error or ex.summary, bold=True)
    if ex.fix:
        _echo(f"fix: {ex.fix}", fg="yellow")
    if ex.ledger:
        _echo("ledger:")
        for r in ex.ledger:
            _echo(f"  {r.get('status')}" + (f", case {r.get('case_reference') or r.get('case_id')}"
                                              if r.get("case_id") or r.get("case_reference") else "") +
                  (f", updated {r.get('updated')}" if r.get("updated") else "") +
                  (f", error: {r.get('error')}" if r.get("error") else ""))
    if ex.history:
        _echo("verdict history (newest first):")
        for h in ex.history:
            _echo(f"  run {h['run_id']} {h['at']}: {h['verdict']}" + (f" ({h['reason']})" if h["reason"] else "") +
                  (f": {h['message']}" if h.get("message") else ""))


def _default_config() -> str:
    import os

    if os.environ.get("RUNNER_CONFIG"):
        return os.environ["RUNNER_CONFIG"]
    for name in ("runner.yaml", "config.yaml"):
        if Path(name).exists():
            return name
    return "runner.yaml"


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="[CONFIG] INVOICE")
@click.option("--config", "config_opt", type=click.Path(dir_okay=False),
              help="The config file (or give it as the first argument; default $RUNNER_CONFIG, runner.yaml).")
@connection_option
@output_option
@verbose_option
def explain(args, config_opt, connections, output, verbose):
    """Why INVOICE (an id or number as the accounting system shows it) was or was not imported: fetches it from
    the provider (paid ones too), runs it through every stage and shows its ledger history.
    """
    setup_logging(verbose)
    from runner.diagnostics import checks as diagnostics

    if len(args) > 2:
        raise click.UsageError("give at most CONFIG and INVOICE")
    invoice = args[-1]
    config_file = args[0] if len(args) == 2 else (config_opt or _default_config())

    cfg = load_config(config_file, strict=False)
    store = open_store(cfg)
    try:
        results = run(diagnostics.explain(cfg, store, invoice, select(cfg, connections)))
    finally:
        store.close()
    if output == "json":
        _json([e.as_dict() for e in results])
    else:
        for i, ex in enumerate(results):
            if i:
                _echo()
            render_explanation(ex)
    found = any(e.found for e in results)
    sys.exit(EXIT_OK if found else EXIT_FAILED)


def unhealthy(st: dict) -> list[tuple[str, str]]:
    """(connection, why) for each enabled connection a health check must fail on: it needs reconnecting, or its
    last run failed (the connection, or some of its invoices)."""
    out = []
    for c in st["connections"]:
        if not c["enabled"]:
            continue
        lr = c["last_run"] or {}
        if c["state"] == "needs_reconnect":
            out.append((c["name"], "needs reconnecting: " + (c.get("fix") or "runner connect " + c["name"])))
        elif lr.get("connection_status") not in (None, "ok", "interrupted"):
            out.append((c["name"], f"its last run ({lr.get('id')}) failed: {lr.get('error') or lr['connection_status']}"))
        elif lr.get("failed"):
            out.append((c["name"], f"its last run ({lr.get('id')}) could not deliver {lr['failed']} invoice(s)"))
    return out


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@output_option
@click.option("--exit-code", "exit_code", is_flag=True,
              help="Exit 1 when an enabled connection needs reconnecting or its last run failed (a health check).")
def status(config_file, output, exit_code):
    """Per connection: the last successful sync, the last error, the last run's verdict counts and the account."""
    from runner.diagnostics import checks as diagnostics

    cfg = load_config(config_file, strict=False)
    store = open_store(cfg)
    try:
        st = diagnostics.status(cfg, store)
    finally:
        store.close()
    bad = unhealthy(st)
    if output == "json":
        _json({**st, "healthy": not bad, "unhealthy": [{"connection": n, "why": w} for n, w in bad]})
        sys.exit(EXIT_FAILED if exit_code and bad else EXIT_OK)
    _status_text(st)
    if bad:
        _echo()
        _echo(f"unhealthy: {len(bad)} connection(s)", fg="red", bold=True)
        for name, why in bad:
            _echo(f"  {name}: {why}", fg="red")
    sys.exit(EXIT_FAILED if exit_code and bad else EXIT_OK)


def schedule_line(s: dict) -> str:
    """`runner worker`'s side of a connection: its schedule, last and next sync, who holds it now."""
    every = s["every_s"]
    every = (f"{every / 3600:g}h" if every >= 3600 and every % 3600 == 0 else f"{every / 60:g}m"
             if every >= 60 and every % 60 == 0 else f"{every:g}s")
    last = s["last_started"] or "never"
    if s["last_status"] and s["last_finished"]:
        last += f" ({s['last_status']})"
    holder = f"syncing now on {s['worker']}" if s["worker"] else "not syncing now"
    return f"worker schedule: every {every}; last sync {last}; next {s['next_run'] or 'when a worker starts'}; {holder}"


def _status_text(st: dict) -> None:
    for c in st["connections"]:
        acct = c["account"].get("name") or c["account"].get("id")
        _echo(f"● {c['name']} ({c['integration_name']}, {c['environment']}" + (f", account {acct}" if acct else "") +
              (")" if c["enabled"] else ", disabled)"), bold=True)
        if c["state"] != "active":
            _echo(f"  state: {c['state']}" + (f" → {c['fix']}" if c.get("fix") else ""), fg="red")
        _echo(f"  last successful sync: {c['last_success'] or 'never'}")
        if c.get("schedule"):
            _echo("  " + schedule_line(c["schedule"]))
        if c["last_error"]:
            _echo(f"  last error ({c['last_error_at']}): {c['last_error']}", fg="red")
        lr = c["last_run"]
        if lr:
            sk = ", ".join(f"{n} {r}" for r, n in sorted((lr.get("skipped") or {}).items(), key=lambda x: -x[1]))
            _echo(f"  last run {lr['id']} ({lr['command']}, {lr['started']}): seen {lr['seen']}, imported "
                  f"{lr['imported']}, skipped {sum((lr.get('skipped') or {}).values())}" + (f" ({sk})" if sk else "") +
                  f", failed {lr['failed']}")
            if lr.get("why_zero"):
                _echo(f"  0 imported: {lr['why_zero']}", fg="yellow")
            ac = lr.get("after_case") or {}
            if ac.get("open_cases") or ac.get("changed") or ac.get("documents"):
                from runner.cli.report import after_case_line

                _echo("  " + after_case_line(ac))
        else:
            _echo("  no run recorded yet")
        for ch in c["changes"]:
            _echo(f"  change {ch['at']}: {ch['what']} {ch['old']} → {ch['new']}")
    cases = st.get("debitura_cases")
    if cases:  # Debitura's side of the cases (webhooks or polling)
        how = {"push": "webhooks", "poll": "polling"}.get(cases["mode"], "recorded events")
        _echo(f"● Debitura cases ({how}" + (f", subscription {cases['subscription']['id']}" if cases["subscription"]
                                           else "") + ")", bold=True)
        if cases.get("fix"):
            _echo(f"  no webhook subscription yet → {cases['fix']}", fg="yellow")
        counts = ", ".join(f"{n} {e}" for e, n in sorted(cases["events"].items()))
        _echo(f"  events: {counts or 'none yet'}" + (f" (last {cases['last_event']})" if cases["last_event"] else ""))
        if cases.get("refused"):
            r = cases["refused"]
            _echo(f"  refused deliveries: {r['count']} (last {r['last']}: {r['last_reason']})", fg="yellow")
        for line in cases["cases"]:
            _echo(f"  {line}")
    ac = st.get("after_case") or {}
    if ac.get("source_changes") or ac.get("documents"):
        kinds = ", ".join(f"{sum(by.values())} {k.replace('_', ' ')}" for k, by in sorted(ac["source_changes"].items()))
        docs = ", ".join(f"{n} {s}" for s, n in sorted(ac["documents"].items()))
        _echo("after the cases: " + "; ".join(x for x in (
            kinds and f"changed at the source since import: {kinds}" + (
                f" ({ac['untold']} not told to Debitura yet)" if ac["untold"] else " (all told to Debitura)"),
            docs and f"invoice documents: {docs}") if x), bold=True)


@click.command("support-bundle")
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Where to write it "
              "(default: runner-support-<time>.json beside the config).")
@click.option("--offline", is_flag=True, help="Do not run doctor's live checks; only what the state store knows.")
@connection_option
def support_bundle(config_file, out_path, offline, connections):
    """Write one redacted file for support: the integration, when the sync last worked, sample invoices that
    were not imported with their verdicts, the errors, recent changes and (unless --offline) doctor's checks.
    It holds no secret.
    """
    import time as _time

    from runner.diagnostics import checks as diagnostics

    cfg = load_config(config_file, strict=False)
    store = open_store(cfg)
    try:
        report = None if offline else run(diagnostics.doctor(cfg, store, select(cfg, connections)))
        bundle = diagnostics.support_bundle(cfg, store, report)
    finally:
        store.close()
    path = Path(out_path) if out_path else cfg.base_dir / f"runner-support-{_time.strftime('%Y%m%d-%H%M%S')}.json"
    text = redact(json.dumps(bundle, indent=2, default=str, ensure_ascii=False))
    try:
        from runner.state.sqlite import write_private

        write_private(path, text + "\n")  # 0600, as the state store: it describes the same accounts
    except OSError as exc:
        click.echo(redact(f"error: cannot write {path}: {exc}"), err=True)
        sys.exit(EXIT_INVALID)
    click.echo(redact(f"wrote {path} ({len(text)} bytes, redacted): attach it to your message to support"))

