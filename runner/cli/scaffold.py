"""The spec `runner integrations new ID` starts from: every part a pull integration needs, commented, with
TODO where the provider's facts go. Filled in, it passes `runner validate` (tests/test_authoring.py)."""
from __future__ import annotations

TEMPLATE = '''\
# yaml-language-server: $schema={schema}
# {id}: TODO one line on what it reads, and with which credential.
# Facts (check each in the provider's API documentation; say here which could not be verified):
#   TODO the invoice list endpoint, its paging, its date and amount formats, its rate limit.
# Every key is described in docs/spec-reference.md, every function in docs/functions.md.
id: {id}
name: TODO Provider name
description: TODO Unpaid invoices from ... (one line, shown by `runner integrations`)
docs: https://TODO.example.com/docs/api/invoices

auth:
  # api_key: the credentials below go into headers. oauth2: see docs/spec-reference.md#auth-oauth2.
  type: api_key
  # The names a connection gives under `credentials:` in the config (their values never go in YAML).
  credentials: [api_key]
  headers:
    # Templates: `secrets.<name>` is a credential, `options.<name>` a connection option.
    Authorization: "Bearer {{{{ secrets.api_key }}}}"

environments:
  # A connection picks one with `environment:`; the first is the default.
  production:
    description: TODO The provider's live API.
    base_url: https://TODO.example.com/api
    # What the provider allows per account, with a margin.
    rate_limit: {{requests_per_second: 5, concurrency: 4}}

# Which account the credential belongs to: the ledger keys every invoice by it. Expressions are JMESPath on
# {{response: <the answer>, connection: <connection data>, options: <connection options>}}.
account:
  request: {{method: GET, path: /TODO/me}}
  id: response.TODO_id
  name: response.TODO_name

invoices:
  request:
    method: GET
    path: /TODO/invoices
    params: {{per_page: "100"}}
  # JMESPath: where the list of invoices is in each answer.
  records: TODO_invoices
  # page: ?page=1,2,... until a short page (start: the first page's number, default 1).
  paginate: {{type: page, param: page, size: 100}}
  # The date the connection's window applies to (unix | date | datetime).
  date: {{value: TODO_issue_date, format: date}}
  # Which records are unpaid (JMESPath, true or false). Everything else is skipped with its status.
  unpaid: "TODO_status == 'TODO_open' && to_decimal(TODO_balance) > `0`"
  # The canonical invoice: each value is JMESPath on one record (docs/functions.md for the functions).
  map:
    external_id: TODO_id
    number: TODO_number
    issue_date: TODO_issue_date
    due_date: TODO_due_date
    currency: upper(TODO_currency)
    amount: to_decimal(TODO_balance)
    debtor:
      id: TODO_customer.id
      name: TODO_customer.name
      email: TODO_customer.email
      address:
        street: TODO_customer.address.line1
        city: TODO_customer.address.city
        postal_code: TODO_customer.address.postal_code
        country: country_code(TODO_customer.address.country)

# One invoice by the id or number a person sees (`runner explain`).
lookup:
  by_id:
    request: {{method: GET, path: "/TODO/invoices/{{{{ invoice_id | urlencode }}}}"}}
    # JMESPath on the answer: the invoice record itself.
    record: TODO_invoice
    not_found: [404]
'''


def spec_text(spec_id: str, folder=None) -> str:
    """The spec; its first line points editors at the runner's schema, relative to `folder` when given."""
    import os
    from pathlib import Path

    schema = Path(__file__).resolve().parents[1] / "schemas" / "integration.schema.json"
    shown = os.path.relpath(schema, Path(folder).resolve()) if folder is not None else str(schema)
    return TEMPLATE.format(id=spec_id, schema=shown)
