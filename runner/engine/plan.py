"""Saved plans: review, then apply.

`runner plan CONFIG --out FILE` writes what a run would send: per connection the resolved window and every
eligible invoice with the case body it would become and a fingerprint of what matters to a collection case
(amount, currency, status, debtor address, due date), plus the hashes of the config and of every spec used
and the checks of the destination (the key, the collection contract, optionally a preview of eligibility and
fee). `runner apply FILE` then sends exactly those invoices: a plan whose config or specs changed is refused
before any request, an invoice the plan does not hold is not sent, and one that changed at the source since
(paid, a new amount or address) is not sent either, with what changed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from runner.errors import ConfigError, DestinationError, Problem, ProviderError, RunnerError
from runner.redact import redact

FORMAT = "runner-plan"
VERSION = 1
PREVIEW_LIMIT = 50  # POST /cases/preview requests a plan sends at most (--preview)
SHOWN = 50  # invoices listed per connection in the summary (all of them are in the file)
STALE_REASON = "changed_since_plan"
UNPLANNED_REASON = "not_in_plan"


class StalePlan(RunnerError):
    """The plan no longer matches the config or specs it was made from (exit 1, as any refused run)."""


# --- fingerprints -----------------------------------------------------------------------------------------

def facts(invoice: dict) -> dict:
    """What a collection case depends on: a change to any of these after review means a new review. Only
    eligible invoices are planned, so their status is 'unpaid' (a paid one is no longer eligible)."""
    debtor = invoice.get("debtor") or {}
    addr = debtor.get("address") or {}
    return {"amount": str(invoice.get("amount")), "currency": invoice.get("currency"), "status": "unpaid",
            "due_date": invoice.get("due_date"),
            "address": {k: addr.get(k) for k in ("street", "city", "postal_code", "state", "country")}}


def fingerprint(invoice: dict) -> str:
    return hashlib.sha256(orjson.dumps(facts(invoice), option=orjson.OPT_SORT_KEYS)).hexdigest()


def changes(before: dict, after: dict) -> str:
    """'amount 120.00 → 80.00, address city Aarhus → Odense' for two facts() dicts."""
    out = []
    for k in ("status", "amount", "currency", "due_date"):
        if before.get(k) != after.get(k):
            out.append(f"{k.replace('_', ' ')} {before.get(k)} → {after.get(k)}")
    b, a = before.get("address") or {}, after.get("address") or {}
    for k in ("street", "city", "postal_code", "state", "country"):
        if b.get(k) != a.get(k):
            out.append(f"address {k.replace('_', ' ')} {b.get(k) or '(none)'} → {a.get(k) or '(none)'}")
    return ", ".join(out) or "changed"


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hashes(cfg, connections) -> dict:
    """The sha256 of the config file and of every spec file the connections use."""
    return {"config": file_hash(cfg.file),
            "specs": {c.spec.id: {"file": str(c.spec.file), "sha256": file_hash(Path(c.spec.file))}
                      for c in connections}}


def is_plan_file(path: str | Path) -> bool:
    """A plan is told from a config by its content (JSON with "format": "runner-plan"), not by its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and b'"format"' in head and FORMAT.encode() in head


# --- the destination's checks -----------------------------------------------------------------------------

@dataclass
class Checks:
    destination: str = ""
    creditor: str | None = None
    contract: dict | None = None
    problems: list[dict] = field(default_factory=list)  # {"message", "fix"}: each fails the plan
    warnings: list[dict] = field(default_factory=list)
    previews: dict = field(default_factory=dict)  # (connection, invoice id) -> preview facts

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"destination": self.destination, "ok": self.ok, "creditor": self.creditor, "contract": self.contract,
                "problems": self.problems, "warnings": self.warnings,
                "previewed": len(self.previews)}


async def check_destination(cfg, clients, planned: list[tuple[str, Any]], preview: int = 0) -> Checks:
    """The destination as apply would meet it: the key (GET /me), the debt collection contract
    (GET /contracts/debt-collection/status) and, with `preview`, POST /cases/preview for at most that many of
    the planned invoices. A local file sink has nothing to check."""
    from runner.engine import destinations

    dest = destinations.make(cfg.destination, clients)
    checks = Checks(destination=dest.describe())
    if cfg.destination.type != "debitura":
        await dest.close()
        return checks
    try:
        try:
            me = await dest.check()
        except DestinationError as exc:
            checks.problems.append({"message": exc.message, "fix": exc.fix})
            return checks
        checks.creditor = (me or {}).get("companyName") if isinstance(me, dict) else None
        try:
            resp = await dest.http.request("GET", "/contracts/debt-collection/status")
            contract = resp.json("Debitura's contract status")
        except ProviderError as exc:
            checks.warnings.append({"message": f"could not read the collection contract's status: {exc.message}",
                                    "fix": exc.fix})
            contract = None
        if isinstance(contract, dict):
            checks.contract = {k: contract.get(k) for k in ("signed", "requiresResigning", "invalidationReason",
                                                              "solutionUrl")}
            unsigned = not contract.get("signed") or contract.get("requiresResigning")
            if unsigned:
                why = ("is not signed" if not contract.get("signed") else
                       f"must be signed again ({contract.get('invalidationReason') or 'a new version'})")
                entry = {"message": f"Debitura's debt collection agreement {why}: cases are not collected until it is",
                         "fix": f"sign it at {contract.get('solutionUrl') or 'app.debitura.com → Contracts'}"
                                + ("" if cfg.destination.allow_pending_contracts else
                                   ", or set `allow_pending_contracts: true` under destination to create the cases "
                                   "pending until then")}
                (checks.warnings if cfg.destination.allow_pending_contracts else checks.problems).append(entry)
        for conn_name, v in planned[:max(0, preview)]:
            body = destinations.case_body(v.invoice, cfg.destination)
            ask = {"amountToRecover": body["amountToRecover"], "currencyCode": body["currencyCode"],
                   "dueDate": body["dueDate"],
                   "debtor": {k: body["debtor"][k] for k in ("type", "countryAlpha2", "stateAlpha2")
                              if k in body["debtor"]}}
            try:
                resp = await dest.http.request("POST", "/cases/preview", content=destinations.dumps(ask),
                                               headers={"Content-Type": "application/json"}, ok=(400,))
                data = resp.json("Debitura's case preview")
            except ProviderError as exc:
                checks.warnings.append({"message": f"preview of {v.number or v.invoice_id}: {exc.message}",
                                        "fix": exc.fix})
                continue
            res = (data or {}).get("result") if isinstance(data, dict) else None
            if resp.status == 400 or not isinstance(res, dict):
                checks.previews[(conn_name, v.invoice_id)] = {
                    "eligible": False, "reason": str((data or {}).get("message") if isinstance(data, dict) else data)}
                continue
            price = res.get("pricingPreview") or {}
            checks.previews[(conn_name, v.invoice_id)] = {
                "eligible": bool(res.get("isEligible")), "reason": res.get("ineligibilityReason"),
                "fee_percent": price.get("totalSuccessFeePercentage"),
                "partner": (res.get("partnerAssignment") or {}).get("partnerName"),
                "blocking": [a.get("message") for a in res.get("requiredActions") or [] if a.get("isBlocking")]}
        return checks
    finally:
        await dest.close()


# --- making a plan ----------------------------------------------------------------------------------------

async def make(cfg, store, *, connections=None, preview: int = 0, stop=None, full: bool = False):
    """Run a plan (nothing is created) and check the destination. Returns (plan document, RunResult, Checks)."""
    from runner.engine import destinations, pipeline
    from runner.net.http import Clients

    chosen = [c for c in (connections or cfg.connections) if c.enabled and c.spec.pull]
    result = await pipeline.sync(cfg, mode="plan", store=store, connections=connections, details=True,
                                 command="plan", stop=stop, full=full)
    planned = [(cr.name, v) for cr in result.connections for v in cr.verdicts
               if v.verdict == pipeline.IMPORTED and v.invoice is not None]
    clients = Clients(sandbox_dir=cfg.state_path.parent / "sandbox")
    try:
        checks = await check_destination(cfg, clients, planned, preview)
    finally:
        await clients.aclose()
    by_name = {c.name: c for c in chosen}
    doc = {
        "format": FORMAT, "version": VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"path": str(cfg.file)}, **_hashes_doc(cfg, chosen),
        "destination": {"type": cfg.destination.type, "environment": cfg.destination.environment,
                        "ledger": destinations.ledger_id(cfg.destination), "describe": checks.destination},
        "checks": checks.as_dict(),
        "connections": [],
    }
    for cr in result.connections:
        invoices = []
        for v in cr.verdicts:
            if v.verdict != pipeline.IMPORTED or v.invoice is None:
                continue
            entry = {"invoice_id": v.invoice_id, "number": v.number, "fingerprint": fingerprint(v.invoice),
                     "facts": facts(v.invoice), "invoice": v.invoice,
                     "case": destinations.case_body(v.invoice, cfg.destination)}
            if (cr.name, v.invoice_id) in checks.previews:
                entry["preview"] = checks.previews[(cr.name, v.invoice_id)]
            invoices.append(entry)
        doc["connections"].append({
            "name": cr.name, "integration": cr.integration, "environment": cr.environment,
            "window": by_name[cr.name].window.as_dict(), "status": cr.status, "error": cr.error, "fix": cr.fix,
            "seen": cr.seen, "skipped": cr.skipped(), "invoices": invoices})
    doc["ok"] = result.ok and checks.ok
    doc["pending"] = sum(len(c["invoices"]) for c in doc["connections"])
    doc["summary"] = summary(doc)
    return doc, result, checks


def _hashes_doc(cfg, connections) -> dict:
    h = hashes(cfg, connections)
    return {"config_sha256": h["config"], "specs": h["specs"]}


def write(doc: dict, path: str | Path) -> None:
    """The plan as JSON, redacted (no secret value can be in it, and none is written if one were)."""
    text = redact(json.dumps(doc, indent=1, ensure_ascii=False, default=str))
    Path(path).write_text(text + "\n", encoding="utf-8")


def load(path: str | Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(Problem(f"cannot read the plan: {exc}", file=str(path),
                                  fix="make it again with `runner plan CONFIG --out FILE`")) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(Problem("this is not a plan made by `runner plan --out`", file=str(path),
                                  fix="make one with `runner plan CONFIG --out FILE`"))
    if doc.get("version") != VERSION:
        raise ConfigError(Problem(f"this plan has format version {doc.get('version')}; this runner reads version "
                                  f"{VERSION}", file=str(path), fix="make the plan again with this runner"))
    return doc


def money(inv: dict) -> str:
    return f"{inv.get('amount')} {inv.get('currency')}"


def summary(doc: dict) -> str:
    """The plan for a reviewer (and a pull request's comment): what would be created, where, and why not more."""
    dest = doc["destination"]
    lines = [f"Plan: {doc['pending']} case(s) to create in {dest['describe']}"]
    checks = doc["checks"]
    if checks.get("creditor"):
        lines.append(f"  creditor: {checks['creditor']}")
    contract = checks.get("contract")
    if contract is not None:
        lines.append("  debt collection agreement: " + ("signed" if contract.get("signed") and not
                                                         contract.get("requiresResigning") else "NOT signed"))
    for p in checks.get("problems", []):
        lines.append(f"  ERROR: {p['message']}" + (f"\n    fix: {p['fix']}" if p.get("fix") else ""))
    for p in checks.get("warnings", []):
        lines.append(f"  warning: {p['message']}" + (f"\n    fix: {p['fix']}" if p.get("fix") else ""))
    for c in doc["connections"]:
        w = c["window"]
        lines.append("")
        lines.append(f"{c['name']} ({c['integration']}, {c['environment']}), window {w['start'][:16]} → "
                     f"{w['end'][:16]} {w['timezone']} ({w['source']}): {len(c['invoices'])} to create, "
                     f"{c['seen']} seen")
        if c["status"] != "ok":
            lines.append(f"  ERROR: {c['error']}" + (f"\n    fix: {c['fix']}" if c.get("fix") else ""))
        for reason, n in sorted(c["skipped"].items(), key=lambda x: -x[1]):
            lines.append(f"  skipped {n}: {reason}")
        for e in c["invoices"][:SHOWN]:
            inv = e["invoice"]
            debtor = inv.get("debtor") or {}
            addr = debtor.get("address") or {}
            extra = ""
            if "preview" in e:
                pv = e["preview"]
                extra = (f"  [eligible, fee {pv.get('fee_percent')} %]" if pv.get("eligible")
                         else f"  [NOT eligible: {pv.get('reason')}]")
            lines.append(f"  + {e['number'] or e['invoice_id']}  {money(inv)}  due {inv.get('due_date')}  "
                         f"{debtor.get('name')}, {addr.get('city')} {addr.get('country')}{extra}")
        if len(c["invoices"]) > SHOWN:
            lines.append(f"  … and {len(c['invoices']) - SHOWN} more (all of them are in the plan file)")
    return "\n".join(lines)


# --- applying a plan ----------------------------------------------------------------------------------------

def stale_problems(doc: dict, cfg, plan_path: str | Path) -> list[Problem]:
    """Why the config or specs no longer match the plan ([] when they do)."""
    problems = []
    fix = f"review a new plan: runner plan {cfg.file} --out {plan_path}"
    if file_hash(cfg.file) != doc.get("config_sha256"):
        problems.append(Problem(f"the config {cfg.file} changed since this plan was made ({doc.get('created')})",
                                file=str(plan_path), fix=fix))
    names = {c["name"] for c in doc["connections"]}
    known = {c.name: c for c in cfg.connections}
    for name in sorted(names - set(known)):
        problems.append(Problem(f"the plan has the connection '{name}', which the config no longer has",
                                file=str(plan_path), fix=fix))
    for c in (known[n] for n in sorted(names & set(known))):
        saved = doc.get("specs", {}).get(c.spec.id)
        if saved is None or saved.get("sha256") != file_hash(Path(c.spec.file)):
            problems.append(Problem(f"the integration spec {c.spec.file} ('{c.spec.id}') changed since this plan "
                                    f"was made", file=str(plan_path), fix=fix))
    return problems


def prepare(doc: dict, cfg, plan_path: str | Path):
    """The config's connections as the plan saw them (its resolved windows), and the `allow` filter for
    pipeline.sync. Raises StalePlan when the config or a spec changed since the plan."""
    from runner.spec.config import Window

    problems = stale_problems(doc, cfg, plan_path)
    if problems:
        raise StalePlan("the plan is stale, nothing was sent:\n" + "\n".join("  " + p.render() for p in problems),
                        fix=problems[0].fix)
    conns = []
    planned: dict[str, dict[str, dict]] = {}
    for c in doc["connections"]:
        conn = cfg.connection(c["name"])
        w = c["window"]
        conn.window = Window(start=datetime.fromisoformat(w["start"]), end=datetime.fromisoformat(w["end"]),
                             tz=w["timezone"], source=w["source"] + f", as planned {doc.get('created')}")
        conns.append(conn)
        planned[c["name"]] = {e["invoice_id"]: e for e in c["invoices"]}

    def allow(connection: str, v) -> tuple[str, str] | None:
        entry = planned.get(connection, {}).get(v.invoice_id)
        if entry is None:
            return UNPLANNED_REASON, "eligible, but not in the plan being applied; the next plan shows it"
        invoice = v.invoice if v.invoice is not None else orjson.loads(v.payload)["invoice"]
        if fingerprint(invoice) != entry["fingerprint"]:
            return STALE_REASON, (f"changed at the source since the plan: {changes(entry['facts'], facts(invoice))}; "
                                  f"not sent, the next plan shows it for review")
        return None

    return conns, planned, allow


def outcome(planned: dict[str, dict[str, dict]], result) -> list[dict]:
    """Every planned invoice that was not imported by this apply, with what happened to it instead."""
    from runner.engine import pipeline

    out = []
    by_conn = {cr.name: cr for cr in result.connections}
    for name, entries in planned.items():
        cr = by_conn.get(name)
        verdicts = {v.invoice_id: v for v in (cr.verdicts if cr is not None else [])}
        for inv_id, e in entries.items():
            v = verdicts.get(inv_id)
            label = e.get("number") or inv_id
            if v is not None and v.verdict == pipeline.IMPORTED:
                continue
            if cr is None or cr.status not in ("ok",) and v is None:
                why = f"not sent: the connection failed ({cr.error if cr else 'not run'})"
            elif v is None:
                why = "not sent: the source no longer returns it (deleted, or moved out of the planned window)"
            elif v.reason == "not_unpaid":
                why = (f"not sent: it is no longer unpaid at the source (now {v.detail.get('status') or 'not unpaid'}"
                       f"{'; ' + v.message if v.message else ''})")
            elif v.reason == "duplicate":
                continue  # imported meanwhile (another apply): nothing was lost
            elif v.verdict == pipeline.FAILED:
                why = f"delivery failed: {v.message}"
            else:
                why = f"not sent: {v.message or v.reason}"
            out.append({"connection": name, "invoice_id": inv_id, "number": e.get("number"), "why": why,
                        "changed": v is None or v.verdict != pipeline.FAILED})
    return out


async def apply(doc: dict, cfg, store, plan_path: str | Path, *, stop=None, progress=None):
    """Deliver exactly the plan's invoices. Returns (RunResult, the planned invoices not imported)."""
    from runner.engine import pipeline

    conns, planned, allow = prepare(doc, cfg, plan_path)
    result = await pipeline.sync(cfg, mode="apply", store=store, connections=conns, details=True,
                                 command="apply", stop=stop, allow=allow, progress=progress)
    return result, outcome(planned, result)
