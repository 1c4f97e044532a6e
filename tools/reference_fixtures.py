"""Make the `reference/` spec-test cases of the built-in specs from the providers' own published material.

    python tools/reference_fixtures.py /path/to/shared/reference

Stripe: the invoice and customer of Stripe's OpenAPI fixtures (stripe/openapi, fixtures3.json), the
invoice in a list envelope with its customer expanded, as `expand[]=data.customer` returns it. Zoho Books:
the answers built from the `example` of every field of Zoho's OpenAPI documents (organizations, invoices,
contacts). The answers pass through the same scrubbing as `--record`. Which answers are made up (an account
answer the reference does not have) is said in each case's README.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.engine import recording  # noqa: E402


def example(schema: dict, doc: dict, depth: int = 0):
    """A value built from an OpenAPI schema's examples ($refs followed)."""
    if depth > 12:
        return None
    if "$ref" in schema:
        node = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return example(node, doc, depth + 1)
    if "example" in schema:
        return schema["example"]
    if schema.get("type") == "array" or "items" in schema:
        item = example(schema.get("items", {}), doc, depth + 1)
        return [] if item is None else [item]
    if schema.get("type") == "object" or "properties" in schema:
        out = {}
        for k, v in (schema.get("properties") or {}).items():
            value = example(v, doc, depth + 1)
            if value is not None:
                out[k] = value
        return out
    return None


def exchange(method: str, path: str, body, status: int = 200) -> dict:
    return {"request": {"method": method, "path": path}, "response": {"status": status, "json": recording.scrub(body)}}


def write(folder: Path, exchanges: list, expected: dict, readme: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    recording.dump_yaml(exchanges, folder / recording.RESPONSES,
                        "# Made by tools/reference_fixtures.py from the providers' published material (see README.md).\n")
    recording.dump_yaml(expected, folder / recording.EXPECTED,
                        "# What the spec must make of the reference answers (checked by `runner integrations test`).\n")
    (folder / "README.md").write_text(readme, encoding="utf-8")


def stripe(ref: Path) -> None:
    invoice = json.loads((ref / "stripe/fixture-invoice.json").read_text())
    customer = json.loads((ref / "stripe/fixture-customer.json").read_text())
    invoice = {**invoice, "customer": customer}
    listing = {"object": "list", "data": [invoice], "has_more": False, "url": "/v1/invoices"}
    # Not in the reference: the account answer, reduced to the id Stripe's fixtures use as an account.
    account = {"id": "acct_1Pgc6tB7WZ01zgkW", "object": "account"}
    write(ROOT / "integrations.d/stripe.fixtures/reference",
          [exchange("GET", "/v1/account", account), exchange("GET", "/v1/invoices", listing)],
          {"today": "2009-02-20",
           "connection": {"environment": "sandbox", "credentials": {"api_key": "sk_test_replayed"},
                          "window": {"from": "2009-01-01", "to": "2009-12-31"}, "server_filters": False},
           "all_listed": True,
           "invoices": {invoice["id"]: {"verdict": "skipped", "reason": "not_unpaid",
                                        "fields": {"external_id": invoice["id"], "currency": "USD",
                                                   "amount": "10.00", "issue_date": "2009-02-13",
                                                   "debtor.id": customer["id"]}}}},
          "Stripe's own fixtures (stripe/openapi @ f0758b1, openapi/fixtures3.json: resources.invoice and\n"
          "resources.customer): a draft invoice of 1000 cents in usd, created 2009-02-13. The account answer\n"
          "(GET /v1/account) is not in the reference and holds only an id.\n")


def zoho(ref: Path) -> None:
    docs = {n: yaml.safe_load((ref / f"zoho/zoho-books-{n}.openapi.yml").read_text())
            for n in ("organizations", "invoices", "contacts")}

    def answer(name: str, path: str):
        d = docs[name]
        schema = d["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        return example(schema, d)

    orgs, invoices, contact = (answer("organizations", "/organizations"), answer("invoices", "/invoices"),
                               answer("contacts", "/contacts/{contact_id}"))
    inv = invoices["invoices"][0]
    org = orgs["organizations"][0]
    base = "/www.zohoapis.com/books/v3"
    write(ROOT / "integrations.d/zoho_books.fixtures/reference",
          [exchange("GET", f"{base}/organizations", orgs), exchange("GET", f"{base}/invoices", invoices),
           exchange("GET", f"{base}/contacts/{inv['customer_id']}", contact)],
          {"today": inv["due_date"],
           "connection": {"environment": "sandbox",
                          "credentials": {"client_id": "replayed", "client_secret": "replayed",
                                          "refresh_token": "replayed"},
                          "options": {"organization_id": str(org["organization_id"])},
                          "window": {"from": "2000-01-01", "to": "2030-12-31"}, "server_filters": False},
           "all_listed": True,
           "invoices": {str(inv["invoice_id"]): {"verdict": "skipped", "reason": "not_unpaid",
                                                 "fields": {"number": inv["invoice_number"],
                                                            "currency": inv["currency_code"],
                                                            "issue_date": inv["date"]}}}},
          "Answers built from the `example` of every field in Zoho Books' OpenAPI documents (organizations,\n"
          "invoices, contacts; see shared/reference/README.md for their origin). The OAuth token answer is the\n"
          "replay's own. The example invoice's status is draft: skipped as not unpaid.\n")


if __name__ == "__main__":
    ref = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/reference")
    stripe(ref)
    zoho(ref)
