"""Generate docs/spec-reference.md (from schemas/integration.schema.json) and docs/functions.md (from
runner/spec/functions.py FUNCTION_DOCS and the examples below, each evaluated while generating).

    python tools/gen_docs.py           write both files
    python tools/gen_docs.py --check   exit 1 if a committed file differs from a fresh generation

Every key's example is taken from the built-in specs (integrations.d/*.yaml) where one uses it, else from
EXAMPLES here; a key with neither stops the generation, so a new schema key cannot go undocumented.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = ROOT / "schemas" / "integration.schema.json"
SPEC_REFERENCE = ROOT / "docs" / "spec-reference.md"
FUNCTIONS = ROOT / "docs" / "functions.md"
WILDCARD = "<name>"

# Examples of keys no built-in spec uses (YAML text of the key's value).
EXAMPLES: dict[str, str] = {
    "lookup.by_ids.request.json": "{ids: \"{{ invoice_ids | join(',') }}\"}",
    "lookup.by_ids.missing_means_deleted": "false",
    "document.request.json": "{format: pdf}",
    "document.file_name": "\"invoice-{{ number }}.pdf\"",
    "document.max_per_run": "50",
    "document.max_attempts": "10",
    "changes.request.json": "{since: \"{{ changes.since | isoformat }}\"}",
    "changes.paginate.max_pages": "1000",
    "auth.advice.401": "\"the key is wrong or revoked: create a new one and update the secret it is read from\"",
    "auth.advice.403": "\"give the key read access to invoices and customers\"",
    "$schema": "../schemas/integration.schema.json",
    "environments.<name>.test_cases": "[SBX-0001]",
    "auth.oauth2.revoke_url": "\"{{ base_url }}/oauth2/revoke\"",
    "auth.oauth2.scope_separator": "\",\"",
    "auth.oauth2.header": "\"Zoho-oauthtoken {{ token.access_token }}\"",
    "auth.oauth2.refresh_margin_s": "600",
    "auth.oauth2.refresh_token_limit": "{count: 20, message: \"Zoho allows 20 refresh tokens per user\"}",
    "auth.oauth2.refresh_token_limit.count": "20",
    "auth.oauth2.refresh_token_limit.message": "\"Zoho allows 20 refresh tokens per user\"",
    "auth.oauth2.reconnect_errors": "[invalid_grant, invalid_code]",
    "auth.oauth2.authorize_params": "{access_type: offline, prompt: consent}",
    "auth.oauth2.authorize_params.<name>": "offline",
    "auth.oauth2.redirect_fields.<name>": "realmId",
    "auth.oauth2.token_fields.<name>": "api_domain",
    "auth.oauth2.required_fields.<name>": "\"the QuickBooks company id (realmId)\"",
    "environments.<name>.rate_limit.requests_per_hour": "20000",
    "environments.<name>.rate_limit.requests_per_day": "200000",
    "environments.<name>.rate_limit.requests_per_minute": "500",
    "environments.<name>.rate_limit.scope": "\"{{ options.organization_id }}\"",
    "rate_limit": "{requests_per_second: 5, concurrency: 4}",
    "retry.deadline_s": "300",
    "retry.timeout_s": "60",
    "retry.retry_after_body": "error.retry_after",
    "account.from_config": "true",
    "account.refused.name": "\"regex_group(response.error.message, 'account .([^ ]+).')\"",
    "check": "{request: {method: GET, path: /v1/invoices, params: {limit: \"1\"}}}",
    "invoices.request.json": "{query: \"{{ window.start | date }}\"}",
    "invoices.request.headers": "{Accept: application/json}",
    "invoices.request.headers.<name>": "application/json",
    "invoices.partition": "{by: window, parts: 4, min_seconds: 86400}",
    "invoices.partition.parts": "4",
    "invoices.partition.min_seconds": "86400",
    "invoices.paginate.start": "0",
    "invoices.paginate.max_pages": "10000",
    "invoices.paginate.param": "page",
    "invoices.paginate.size_param": "per_page",
    "invoices.paginate.size": "100",
    "rate_limit.requests_per_minute": "500",
    "rate_limit.requests_per_hour": "20000",
    "rate_limit.requests_per_day": "200000",
    "check.request.json": "{query: \"SELECT 1\"}",
    "account.request.json": "{fields: [id, name]}",
    "lookup.by_id.request.json": "{ids: [\"{{ invoice_id }}\"]}",
    "lookup.by_number.request.json": "{numbers: [\"{{ number }}\"]}",
    "invoices.partition.by": "window",
    "options.<name>.required": "true",
    "lookup.by_number.id_prefixes": "[INV-]",
    "lookup.by_number.not_found": "[404]",
    "inbound": "{records: invoices, response: {status: 202}}",
}

# What the schema's descriptions leave out: how a key is read. Keyed like EXAMPLES.
NOTES: dict[str, str] = {
    "account": "With `request`, `id` and `name` are JMESPath expressions evaluated against an object of three "
               "keys: `response` (the decoded answer), `connection` (the connection's data: `name`, "
               "`account_id`, and what `runner connect` learned, such as a company id) and `options` (the "
               "connection's `options:`, including the one `choose` set). Without `request` they are templates "
               "rendered with the request variables (see Templates below).",
    "account.choose": "`list` is evaluated against the account request's answer itself (not the three-key "
                      "object), `id` and `name` against each entry of that list. With one entry it is taken; with "
                      "several, the connection must pin one with `options: {<option>: <id>}` (the run stops and "
                      "lists them otherwise). The chosen id is then `options.<option>` for `account.id`/`name` "
                      "and every template.",
    "auth.oauth2.refresh_margin_s": "Seconds before the access token expires at which it is "
                                                   "renewed; default 300. Capped at half the token's lifetime "
                                                   "(`expires_in` / 2), so a token that lives 10 minutes is renewed "
                                                   "after 5, not at once.",
    "auth.oauth2": "An environment's `oauth2:` takes the same keys and overrides these per environment. "
                   "`runner connect` receives the provider's redirect on "
                                  "`http://127.0.0.1:<port>/callback`: register that redirect URI with the provider. "
                                  "The port is a free one unless `runner connect --port PORT` fixes it, which "
                                  "providers that compare the URI exactly (most do) need: register "
                                  "`http://127.0.0.1:PORT/callback` and always connect with that `--port`. A "
                                  "connection may instead give a bootstrap `refresh_token` credential (from the "
                                  "provider's playground or self-client); the runner keeps the rotated tokens in "
                                  "the state store. A changed bootstrap refresh token in the config replaces a "
                                  "stored token that came from an earlier bootstrap token; a token stored by "
                                  "`runner connect` is kept, unless the connection needs reconnecting (its grant "
                                  "was refused), in which case the new bootstrap token is tried once.",
    "invoices.server_filters": "Each entry's parameters are added to `invoices.request.params` when the "
                               "connection has `server_filters: true` (the default). A parameter of the same name "
                               "replaces the request's own: a spec can list `status: all` in `params` and "
                               "`status: open` here.",
    "invoices.paginate.start": "The first page's number (page) or first offset (offset). Default: 1 for `page`, "
                               "0 for `offset`.",
    "invoices.paginate": "Without `more`, `page` and `offset` stop on a short or empty page, so `size` must be "
                         "the page size the provider really uses.",
    "environments.<name>.base_url": "A template; `sandbox://<simulator>` addresses a built-in simulator. A "
                                    "connection's `base_url:` replaces it (a proxy, `runner sandbox serve`); "
                                    "oauth2 templates see that address as `{{ base_url }}`.",
    "invoices.unpaid": "`non_empty(x)` (see functions.md) treats blank strings and empty objects as missing.",
}

TEMPLATES_SECTION = """\
## Templates

Values documented as templates (request paths, parameters, headers, `base_url`, oauth2 URLs, `key` of a
detail) are Jinja2, rendered in Jinja's sandbox; a name that is not defined is an error, found by
`runner validate`. The variables:

| Variable | What it is |
|---|---|
| `secrets.<name>` | a credential of the connection (`auth.credentials`); masked in every log and message |
| `options.<name>` | a connection option (`options:` in the spec declares them, `options:` in the config sets them) |
| `connection.name`, `connection.account_id`, `connection.<field>` | the connection, and what `runner connect` or a token answer taught (`redirect_fields`, `token_fields`) |
| `environment` | the environment's name |
| `window.start`, `window.end` | the date window's bounds (datetimes; format with `unix`, `date`, `isoformat`) |
| `window.start_date`, `window.end_date`, `window.timezone` | the same as `YYYY-MM-DD` text, and the zone's name |
| `page.number`, `page.size`, `page.offset`, `page.cursor` | the page being fetched: its number (every paginator), size and offset (page, offset), the cursor (cursor; none on the first page) |
| `invoice_id`, `number` | in `lookup.by_id` / `lookup.by_number` requests: what was asked for |
| `record` | in `invoices.details`: the invoice record being enriched |
| `token.access_token` | in `oauth2.header`: the current access token |
| `base_url` | in oauth2 URLs: the connection's API address (its `base_url:` override, else the environment's) |

Filters added by the runner: `unix` (seconds since 1970), `date` (`YYYY-MM-DD`, or a strftime format:
`date('%d.%m.%Y')`), `isoformat`, `utc` (a datetime moved to UTC), `sql_quote` (a value quoted for a
provider's SQL-like query language: `'O\\'Brien'`). Jinja's built-in filters and tests work too (`default`,
`urlencode`, `lower`, `upper`, `replace`, `join`, `int`, `string`, `trim`, ...), as does `range()`; loops,
ranges and the size of what a template builds are bounded, so a template cannot hang a run.
"""


def resolve(node: dict, schema: dict) -> tuple[dict, str | None]:
    ref = node.get("$ref")
    if not ref:
        return node, None
    name = ref.rsplit("/", 1)[-1]
    target = schema["$defs"][name]
    merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return merged, name


def kind(node: dict, ref: str | None) -> str:
    if ref in ("template", "expression"):
        return {"template": "template (Jinja2)", "expression": "JMESPath expression"}[ref]
    if "enum" in node:
        return "one of " + ", ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    t = node.get("type")
    if isinstance(t, list):
        return " or ".join(t)
    if t == "array":
        items, iref = resolve(node.get("items") or {}, {"$defs": {}}) if "$ref" not in (node.get("items") or {}) \
            else (node["items"], node["items"]["$ref"].rsplit("/", 1)[-1])
        inner = {"template": "templates", "expression": "JMESPath expressions"}.get(iref) or items.get("type", "value")
        return f"list of {inner}"
    if "anyOf" in node or "oneOf" in node:
        return "object (one of several forms)" if t == "object" or "oneOf" in node else "value"
    return t or "value"


def walk(node: dict, schema: dict, path: str, seen: tuple, out: list) -> None:
    node, ref = resolve(node, schema)
    if ref and ref in seen:
        return
    seen = seen + ((ref,) if ref else ())
    if path:
        desc = node.get("description", "")
        if ref and not desc:
            desc = schema["$defs"][ref].get("description", "")
        out.append((path, kind(node, ref), desc, node))
    props: dict[str, Any] = {}
    for k, v in (node.get("properties") or {}).items():
        props[k] = v
    for alt in node.get("oneOf", []) + node.get("anyOf", []):
        alt_node, _ = resolve(alt, schema)
        for k, v in (alt_node.get("properties") or {}).items():
            if k not in props or props[k].get("const") is not None:
                props.setdefault(k, v)
    for k, v in props.items():
        walk(v, schema, f"{path}.{k}" if path else k, seen, out)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra:
        walk(extra, schema, f"{path}.{WILDCARD}" if path else WILDCARD, seen, out)


def builtin_specs() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "integrations.d").glob("*.yaml"))]


def lookup(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    head, rest = parts[0], parts[1:]
    if isinstance(doc, list):
        for item in doc:
            found = lookup(item, parts)
            if found is not None:
                return found
        return None
    if not isinstance(doc, dict):
        return None
    keys = list(doc) if head == WILDCARD else [head] if head in doc else []
    for k in keys:
        found = lookup(doc[k], rest)
        if found is not None:
            return found
    return None


def example(path: str, specs: list[dict]) -> str:
    if path in EXAMPLES:
        return f"{path.rsplit('.', 1)[-1]}: {EXAMPLES[path]}"
    parts = path.split(".")
    for s in specs:
        value = lookup(s, parts)
        if value is not None:
            key = parts[-1] if parts[-1] != WILDCARD else next(iter(_parent_keys(s, parts)), "name")
            text = yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True, width=100).rstrip()
            lines = text.splitlines()
            return "\n".join(lines[:12] + (["  # ..."] if len(lines) > 12 else []))
    # The same key elsewhere (rate_limit at the top level is the environments' rate_limit).
    tail = parts[-2:] if len(parts) > 1 else parts
    for s in specs:
        value = anywhere(s, tail)
        if value is not None:
            text = yaml.safe_dump({parts[-1] if parts[-1] != WILDCARD else "name": value}, sort_keys=False,
                                  allow_unicode=True, width=100).rstrip()
            lines = text.splitlines()
            return "\n".join(lines[:12] + (["  # ..."] if len(lines) > 12 else []))
    MISSING.append(path)
    return "(no example)"


MISSING: list[str] = []


def anywhere(doc: Any, parts: list[str]) -> Any:
    found = lookup(doc, parts)
    if found is not None:
        return found
    children = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    for child in children:
        found = anywhere(child, parts)
        if found is not None:
            return found
    return None


def _parent_keys(doc: dict, parts: list[str]) -> list[str]:
    parent = lookup(doc, parts[:-1])
    return [k for k, v in parent.items() if v is not None] if isinstance(parent, dict) else []


def spec_reference() -> str:
    schema = json.loads(SCHEMA.read_text())
    rows: list = []
    walk(schema, schema, "", (), rows)
    specs = builtin_specs()
    lines = ["# Integration spec reference", "",
             "<!-- Generated by tools/gen_docs.py from schemas/integration.schema.json; do not edit by hand. -->", "",
             "An integration spec is a YAML file in `integrations.d/` (or the folder a config names with "
             "`integrations_dir:`). `runner integrations new ID` starts one; `runner validate CONFIG` checks it "
             "against this schema and compiles every template and expression. Examples come from the built-in "
             "specs where they use the key. `<name>` stands for a name you choose (an environment, a header, a "
             "field). A walk-through: [tutorial.md](tutorial.md); the mapping functions: "
             "[functions.md](functions.md).", "", TEMPLATES_SECTION, "## Keys", ""]
    top = [p for p, *_ in rows if "." not in p]
    lines.append("Top level: " + ", ".join(f"[`{p}`](#{anchor(p)})" for p in top) + ".")
    lines.append("")
    for path, k, desc, node in rows:
        lines.append(f"### `{path}`")
        lines.append("")
        required = ""
        parent = next((n for p, _, _, n in rows if p == path.rsplit(".", 1)[0]), schema if "." not in path else None)
        if parent is not None and path.rsplit(".", 1)[-1] in (parent.get("required") or []):
            required = " Required."
        lines.append(f"*{k}*.{required} {desc}".rstrip())
        if path in NOTES:
            lines += ["", NOTES[path]]
        lines += ["", "```yaml", example(path, specs), "```", ""]
    if MISSING:
        raise SystemExit("no example for the spec key(s) " + ", ".join(MISSING) + ": add them to EXAMPLES in "
                         "tools/gen_docs.py")
    return "\n".join(lines).rstrip() + "\n"


def anchor(path: str) -> str:
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


# --- functions -----------------------------------------------------------------------------------------------

# name -> [(expression, record, expected result)]: evaluated by gen_docs (and so by its test).
FUNCTION_EXAMPLES: dict[str, list[tuple[str, Any, Any]]] = {
    "parse_date": [("parse_date(date, 'dotnet')", {"date": "/Date(1700000000000+0000)/"}, "2023-11-14"),
                   ("parse_date(date, 'DD.MM.YYYY')", {"date": "31.12.2026"}, "2026-12-31"),
                   ("parse_date(date, 'MM/DD/YYYY')", {"date": "31/12/2026"}, None)],
    "minor_to_major": [("minor_to_major(amount_remaining, currency)", {"amount_remaining": 12345, "currency": "eur"}, "123.45"),
                       ("minor_to_major(amount, 'JPY')", {"amount": 500}, "500"),
                       ("minor_to_major(amount, 'ISK', `{\"ISK\": 2}`)", {"amount": 1050}, "10.50")],
    "to_decimal": [("to_decimal(balance)", {"balance": "1,234.50"}, "1234.50"),
                   ("to_decimal(balance)", {"balance": ""}, None)],
    "unix_to_date": [("unix_to_date(created)", {"created": 1700000000}, "2023-11-14"),
                     ("unix_to_date(created, 'Pacific/Auckland')", {"created": 1700000000}, "2023-11-15")],
    "unix_to_datetime": [("unix_to_datetime(created)", {"created": 1700000000}, "2023-11-14T22:13:20Z")],
    "to_date": [("to_date(TxnDate)", {"TxnDate": "2024-03-01T10:00:00-08:00"}, "2024-03-01"),
                ("to_date(date, '%d/%m/%Y')", {"date": "31/01/2024"}, "2024-01-31")],
    "upper": [("upper(currency)", {"currency": "usd"}, "USD")],
    "lower": [("lower(status)", {"status": "OPEN"}, "open")],
    "trim": [("trim(name)", {"name": "  Acme  "}, "Acme")],
    "country_code": [("country_code(country)", {"country": "Denmark"}, "DK"),
                     ("country_code(country)", {"country": "us"}, "US")],
    "coalesce": [("coalesce(customer_name, customer.name)", {"customer_name": None, "customer": {"name": "Acme"}}, "Acme")],
    "non_empty": [("non_empty(address)", {"address": {"line1": " ", "city": None}}, None),
                  ("non_empty(email)", {"email": "ap@acme.example"}, "ap@acme.example")],
    "concat_ws": [("concat_ws(', ', line1, line2)", {"line1": "Main St 1", "line2": None}, "Main St 1"),
                  ("concat_ws(' ', first, last)", {"first": "Ada", "last": "Lovelace"}, "Ada Lovelace")],
    "currency_exponent": [("currency_exponent('JPY')", {}, 0), ("currency_exponent('KWD')", {}, 3)],
    "regex_group": [("regex_group(message, 'on account .(acct_[A-Za-z0-9]+)')",
                     {"message": "No such key on account 'acct_123'"}, "acct_123")],
}


def evaluate(expr: str, record: Any) -> Any:
    from runner.spec.loader import Expression  # as a spec's expression is compiled and evaluated

    value = Expression(expr).search(record)
    return str(value) if value.__class__.__name__ == "Decimal" else value


def code(text: str) -> str:
    """Inline code in a table cell: doubled backticks around text with a backtick (JMESPath literals)."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def functions_doc() -> str:
    from runner.spec.functions import FUNCTION_DOCS

    lines = ["# Mapping functions", "",
             "<!-- Generated by tools/gen_docs.py from runner/spec/functions.py; do not edit by hand. -->", "",
             "Spec expressions (`map`, `unpaid`, `let`, `records`, `account.id`, ...) are JMESPath with these "
             "functions added to JMESPath's own (`length`, `contains`, `join`, `to_number`, `to_string`, ...). "
             "Every example below is evaluated when this page is generated, and the result shown is the one it "
             "gave. Exact amounts come out as decimals (shown here as text).", ""]
    missing = sorted(set(FUNCTION_DOCS) - set(FUNCTION_EXAMPLES))
    if missing:
        raise SystemExit(f"no example for the function(s) {', '.join(missing)}: add them to FUNCTION_EXAMPLES")
    for name in sorted(FUNCTION_DOCS):
        lines += [f"## `{name}`", "", FUNCTION_DOCS[name], "", "| Expression | Record | Result |", "|---|---|---|"]
        for expr, record, want in FUNCTION_EXAMPLES[name]:
            got = evaluate(expr, record)
            if got != want:
                raise SystemExit(f"the example {expr} on {record} gives {got!r}, the page says {want!r}")
            lines.append(f"| {code(expr)} | {code(json.dumps(record, ensure_ascii=False))} | "
                         f"{code(json.dumps(got, ensure_ascii=False))} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    outputs = {SPEC_REFERENCE: spec_reference(), FUNCTIONS: functions_doc()}
    if "--check" in argv:
        stale = [str(p.relative_to(ROOT)) for p, text in outputs.items()
                 if not p.exists() or p.read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run: python tools/gen_docs.py")
            return 1
        return 0
    for p, text in outputs.items():
        p.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
