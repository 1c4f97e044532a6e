"""`runner sandbox pay|void|credit CONFIG INTEGRATION INVOICE`: change an invoice at a simulated source.

The change is recorded beside the config's state (``<state dir>/sandbox/source-changes.json``, the folder the
runner's simulators use), so the next `runner plan|apply` with that config sees the invoice paid, voided or
credited, as it would see a change made in Stripe, QuickBooks or Zoho after the case was created.
"""
from __future__ import annotations

from pathlib import Path

from runner.errors import RunnerError
from runner.sandbox import lifecycle

SOURCES = ("stripe", "quickbooks", "zoho")
NAMES = {"quickbooks_online": "quickbooks", "zoho_books": "zoho"}  # integration id -> simulator


def act(data_dir: Path, action: str, integration: str, invoice: str, amount: str | None = None) -> str:
    from runner.sandbox import get_simulator, reset_cache

    name = NAMES.get(integration, integration)
    if name not in SOURCES:
        raise RunnerError(f"there is no simulated source called {integration!r}",
                          fix=f"use one of: {', '.join(SOURCES)}")
    reset_cache()
    sim = get_simulator(name, data_dir)
    sim._apply_changes()  # what earlier controls did, so this one acts on the invoice as it is now
    try:
        shown = sim.act(action, invoice, amount)
    except KeyError:
        raise RunnerError(f"the {name} simulator has no invoice {invoice!r}",
                          fix="give an invoice id or number the simulator serves (`runner plan --details` lists "
                              "them)") from None
    except ValueError as exc:
        raise RunnerError(f"cannot {action} {invoice!r}: {exc}") from None
    lifecycle.record(data_dir, name, action, invoice, amount)
    reset_cache()
    return (f"{name}: invoice {invoice} {dict(pay='paid', void='voided', credit='credited')[action]}"
            f"{f' ({amount})' if amount else ''}; it now shows {summary(shown)}. The next run with this config "
            f"finds the change and tells the case's collection partner.")


def summary(inv: dict) -> str:
    for keys in (("status", "amount_remaining", "amount_paid"), ("Balance", "TotalAmt"),
                 ("status", "balance", "total")):
        found = {k: inv[k] for k in keys if k in inv}
        if found:
            return ", ".join(f"{k} {v}" for k, v in found.items())
    return "the change"
