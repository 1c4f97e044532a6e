"""What a person reads after plan and apply: a summary per connection, counts by reason, examples, the fix.

Everything printed goes through the redaction layer. `--output json` prints the same facts as JSON.
"""
from __future__ import annotations

import json
import sys

from runner.engine.pipeline import RunResult
from runner.redact import redact, redact_obj


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (CI logs, files) gets wide lines instead of tables wrapped at 80 columns.
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 220)


def print_json(obj) -> None:
    sys.stdout.write(redact(json.dumps(redact_obj(obj), indent=2, default=str, ensure_ascii=False)) + "\n")


def render_run(result: RunResult, *, details: bool = False, out=None) -> None:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    out = out or console()
    # Everything is printed at once, as one group: a print per line cost ~1 ms a connection (0.5 s for 500).
    items: list = []

    def say(text: str = "", style: str = "") -> None:
        items.append(Text(text, style=style))

    verb = "would import" if result.mode == "plan" else "imported"
    head = "plan (dry run: nothing is created)" if result.mode == "plan" else f"apply (run {result.run_id})"
    say(redact(f"runner {head} → {result.destination}"), style="bold")
    if result.destination_error:
        say(redact("destination: " + result.destination_error), style="red")
    if result.interrupted:
        say(f"interrupted ({result.interrupted}): the run stopped early; every page fetched was finished and "
            f"recorded; run the same command again to continue", style="yellow")
    for c in result.connections:
        say()
        acct = f", account {c.account_name or c.account_id}" if (c.account_name or c.account_id) else ""
        say(redact(f"● {c.name} ({c.integration}, {c.environment}{acct})"), style="bold")
        say(redact(f"  window: {c.window_text}"))
        if c.scan is not None and c.scan.reason != "the integration has no change feed":
            d = c.scan.as_dict()
            say(redact(f"  read: only the changes since {d['since']} ({d['changed']} invoice(s)); {c.scan.reason}"
                       if c.scan.mode == "changes" else f"  read: full scan of the window: {c.scan.reason}"))
        if c.status != "ok":
            label = {"needs_reconnect": "NEEDS RECONNECT", "interrupted": "INTERRUPTED"}.get(c.status, "FAILED")
            say(redact(f"  {label}: {c.error}"), style="red")
            if c.fix:
                say(redact("  fix: " + c.fix.replace("\n", "\n  ")), style="yellow")
        sk = c.skipped()
        say(redact(f"  seen {c.seen} · {verb} {c.imported} · skipped {sum(sk.values())} · failed {c.failed}"))
        if c.requests:
            pace = (f"  {c.requests} request{'s' if c.requests != 1 else ''} to the provider · {c.seconds:.1f}s in all "
                    f"(fetching and delivering)")
            if c.paced_by_limit():
                pace += (f" · paced by the {c.integration} spec's rate limit ({c.rate_limit:g} requests/s): faster "
                         f"only if the provider allows more")
            say(redact(pace), style="dim")
        if sk or c.failed:
            t = Table(show_header=True, header_style="dim", box=None, padding=(0, 2, 0, 4))
            t.add_column("reason")
            t.add_column("count", justify="right")
            t.add_column("details")
            for reason, n in sorted(sk.items(), key=lambda x: -x[1]):
                ex = (c.samples.get(reason) or [None])[0]
                if reason == "not_unpaid" and c.statuses:
                    text = ", ".join(f"{k} {v}" for k, v in c.statuses.most_common())
                else:
                    text = f"{ex.number or ex.invoice_id}: {ex.message}" if ex else ""
                t.add_row(reason, str(n), redact(text))
            if c.failed:
                ex = (c.samples.get("delivery_failed") or c.samples.get("destination_unavailable") or [None])[0]
                t.add_row(Text("failed", style="red"), str(c.failed),
                          redact(f"{ex.number or ex.invoice_id}: {ex.message}") if ex else "")
            items.append(t)
        why = c.why_zero()
        if why:
            say(redact(f"  0 {verb}: {why}"), style="yellow")
        ac = c.after_case
        if ac and (ac.get("open_cases") or ac.get("changes") or ac.get("documents") or ac.get("errors")):
            say(redact("  after the cases: " + after_case_line(ac)))
            shown = ac.get("changes") or []
            if shown and (result.mode == "plan" and ac.get("would_tell") or ac.get("recorded")):
                say(redact(f"  {'would tell' if result.mode == 'plan' else 'told'} Debitura, e.g.: " + "; ".join(
                    f"{ch['number'] or ch['invoice_id']} {ch['kind'].replace('_', ' ')} (case "
                    f"{ch['case_reference'] or ch['case_id']})" for ch in shown[:3])))
            for e in ac.get("errors") or []:
                say(redact(f"  {e}"), style="yellow")
        if details and c.verdicts:
            t = Table(show_header=True, header_style="dim", box=None, padding=(0, 2, 0, 4))
            for col in ("invoice", "number", "verdict", "reason", "why"):
                t.add_column(col)
            for v in c.verdicts:
                style = {"imported": "green", "failed": "red"}.get(v.verdict)
                t.add_row(v.invoice_id, v.number or "", Text(v.verdict, style=style or ""), v.reason or "",
                          redact(v.message))
            items.append(t)
    for name in result.inbound:
        say()
        say(f"● {name} (inbound)", style="bold")
        say(f"  receives pushed invoices through `runner serve`; plan and apply do not fetch it "
            f"(see `runner status` for what arrived)")
    tot = result.totals()
    sk = ", ".join(f"{n} {r}" for r, n in sorted(tot["skipped"].items(), key=lambda x: -x[1]))
    say()
    line = f"total: {verb} {tot['imported']}, skipped {sum(tot['skipped'].values())}" + (f" ({sk})" if sk else "")
    line += f", failed {tot['failed']}"
    broken = [c.name for c in result.connections if c.status not in ("ok", "interrupted")]
    if broken:  # a connection that failed before (or while) reading invoices has no invoice counted above
        shown = ", ".join(broken[:5]) + (f" and {len(broken) - 5} more" if len(broken) > 5 else "")
        line += f" · {len(broken)} connection{'s' if len(broken) != 1 else ''} failed ({shown})"
    line += f" · {result.finished - result.started:.1f}s"
    say(redact(line), style="bold")
    out.print(Group(*items))

def after_case_line(ac: dict) -> str:
    """One line of a run's after-the-case work (status, the run summary)."""
    parts = [f"{ac.get('open_cases', 0)} open case(s) re-checked at the source ({ac.get('seen_in_window', 0)} seen in "
             f"the window, {ac.get('looked_up', 0)} looked up in {ac.get('requests', 0)} request(s)"
             + (f", {ac['left_for_later']} left for later runs" if ac.get("left_for_later") else "") + ")"]
    if ac.get("recorded"):
        parts.append(f"{ac['recorded']} newly changed at the source")
    elif ac.get("changed") and ac.get("would_tell"):
        parts.append(f"{ac['changed']} changed at the source")
    if ac.get("told"):
        parts.append(f"{ac['told']} told to Debitura")
    if ac.get("would_tell"):
        parts.append(f"would tell Debitura {ac['would_tell']}")
    if ac.get("tell_failed"):
        parts.append(f"{ac['tell_failed']} could not be told (retried next run)")
    docs = ac.get("documents") or {}
    if docs:
        parts.append("documents: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in docs.items()))
    if ac.get("requests_in_all"):
        parts.append(f"{ac['requests_in_all']} request(s) to the provider for this")
    return "; ".join(parts)
