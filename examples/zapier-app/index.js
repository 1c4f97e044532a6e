'use strict';
// An example Zapier app for the runner's inbound API (`runner serve`, docs/zapier.md): an action that imports
// one invoice, and two polling triggers (new cases, skipped invoices). Build your own from it with
// `zapier-platform` (zapier-platform-cli); `npm test` runs its tests against a running `runner serve`.

const { version: platformVersion } = require('zapier-platform-core');

const MAX_PAGES = 50; // pages a poll follows (each up to `page_size` items) before it stops

const baseUrl = (bundle) => String(bundle.authData.base_url || '').replace(/\/+$/, '');

// Every request carries the runner key in the XApiKey header (never in the URL, which proxies log).
const addApiKey = (request, z, bundle) => {
  if (bundle.authData && bundle.authData.api_key) {
    request.headers = { ...(request.headers || {}), XApiKey: bundle.authData.api_key };
  }
  return request;
};

// The runner answers every error as JSON with a `message` written for people: show that message in the Zap.
const explainErrors = (response, z) => {
  if (response.status >= 400) {
    let body = {};
    try {
      body = response.json || JSON.parse(response.content);
    } catch (e) {
      body = {};
    }
    const message = body.message || `the runner answered HTTP ${response.status}`;
    throw new z.errors.Error(message, body.error || 'runner_error', response.status);
  }
  return response;
};

const authentication = {
  type: 'custom',
  fields: [
    { key: 'base_url', label: 'Runner URL', required: true, type: 'string',
      helpText: 'The HTTPS address of `runner serve`, e.g. https://runner.example.com' },
    { key: 'api_key', label: 'API key', required: true, type: 'password',
      helpText: 'A key from `runner keys create` for the environment of that server.' },
  ],
  test: async (z, bundle) => {
    const response = await z.request({ url: `${baseUrl(bundle)}/v1/me` });
    return response.data;
  },
  connectionLabel: '{{json.connection}} ({{json.environment}})',
};

const INVOICE_FIELDS = [
  { key: 'id', label: 'Invoice ID', required: true, helpText: 'The invoice id in the source app.' },
  { key: 'number', label: 'Invoice number', required: false },
  { key: 'issue_date', label: 'Issue date', required: true, type: 'string' },
  { key: 'due_date', label: 'Due date', required: true, type: 'string' },
  { key: 'currency', label: 'Currency', required: true },
  { key: 'amount_due', label: 'Amount due', required: true, type: 'string' },
  { key: 'status', label: 'Status', required: false },
  { key: 'amount_paid', label: 'Amount paid', required: false, type: 'string' },
  { key: 'customer_name', label: 'Customer name', required: true },
  { key: 'customer_type', label: 'Customer type', required: false, choices: ['Company', 'Private'] },
  { key: 'customer_email', label: 'Customer email', required: false },
  { key: 'customer_phone', label: 'Customer phone', required: false },
  { key: 'street', label: 'Street', required: true },
  { key: 'city', label: 'City', required: true },
  { key: 'postal_code', label: 'Postal code', required: true },
  { key: 'state', label: 'State', required: false },
  { key: 'country', label: 'Country', required: true },
  { key: 'idempotency_key', label: 'Idempotency key', required: false,
    helpText: 'Defaults to the invoice id: a Zap replay answers the first result again.' },
];

const present = (value) => value !== undefined && value !== null && value !== '';

const invoiceFrom = (d) => {
  const pick = (obj) => Object.fromEntries(Object.entries(obj).filter(([, v]) => present(v)));
  return pick({
    id: d.id, number: d.number, issue_date: d.issue_date, due_date: d.due_date, currency: d.currency,
    amount_due: d.amount_due, status: d.status, amount_paid: d.amount_paid,
    customer: pick({
      name: d.customer_name, type: d.customer_type, email: d.customer_email, phone: d.customer_phone,
      address: pick({ street: d.street, city: d.city, postal_code: d.postal_code, state: d.state,
                      country: d.country }),
    }),
  });
};

const importInvoice = {
  key: 'invoice',
  noun: 'Invoice',
  display: { label: 'Import Invoice', description: 'Sends one unpaid invoice to the runner, which creates a collection case.' },
  operation: {
    inputFields: INVOICE_FIELDS,
    perform: async (z, bundle) => {
      const d = bundle.inputData;
      const response = await z.request({
        method: 'POST',
        url: `${baseUrl(bundle)}/v1/invoices`,
        headers: { 'Content-Type': 'application/json', 'Idempotency-Key': String(d.idempotency_key || d.id) },
        body: invoiceFrom(d),
      });
      return response.data; // one invoice's result, with `id`, `verdict`, `case_id`
    },
    sample: { id: 'INV-1', invoice_id: 'INV-1', number: '1001', verdict: 'imported', reason: null,
              message: 'imported as case RI5O06GJ', case_id: '46be0c1e', case_reference: 'RI5O06GJ' },
  },
};

// A polling trigger that follows the runner's pages (X-Next-Cursor), so a poll sees every new item even when
// more than one page arrived since the last poll. Zapier keeps the ids it has seen and triggers on new ones.
const pagedTrigger = (path) => async (z, bundle) => {
  const limit = Number(bundle.inputData.page_size) || 100;
  const items = [];
  let cursor = null;
  for (let page = 0; page < MAX_PAGES; page += 1) {
    const params = { limit };
    if (cursor) params.cursor = cursor;
    const response = await z.request({ url: `${baseUrl(bundle)}${path}`, params });
    items.push(...response.data);
    cursor = response.headers.get('x-next-cursor');
    if (!cursor || bundle.meta.isLoadingSample) break;
  }
  return items;
};

const PAGE_SIZE = { key: 'page_size', label: 'Page size', required: false, type: 'integer',
                    helpText: 'Items per request (1 to 500, default 100); every page is read.' };

const newCase = {
  key: 'case',
  noun: 'Case',
  display: { label: 'New Case', description: 'Triggers when the runner creates a collection case.' },
  operation: {
    inputFields: [PAGE_SIZE],
    perform: pagedTrigger('/v1/triggers/cases'),
    sample: { id: 'case-46be0c1e', case_id: '46be0c1e', case_reference: 'RI5O06GJ', invoice_id: 'INV-1',
              invoice_number: '1001', connection: 'zaps', environment: 'production',
              created_at: '2026-01-01T00:00:00Z' },
  },
};

const skippedInvoice = {
  key: 'skipped',
  noun: 'Skipped Invoice',
  display: { label: 'Invoice Not Imported', description: 'Triggers when the runner skips an invoice, with the reason.' },
  operation: {
    inputFields: [PAGE_SIZE],
    perform: pagedTrigger('/v1/triggers/skipped'),
    sample: { id: 'zaps:INV-3:incomplete_address', invoice_id: 'INV-3', invoice_number: '1003', connection: 'zaps',
              environment: 'production', reason: 'incomplete_address', reason_text: 'incomplete debtor address',
              message: "the debtor's address is missing city", skipped_at: '2026-01-01T00:00:00Z' },
  },
};

module.exports = {
  version: require('./package.json').version,
  platformVersion,
  authentication,
  beforeRequest: [addApiKey],
  afterResponse: [explainErrors],
  triggers: { [newCase.key]: newCase, [skippedInvoice.key]: skippedInvoice },
  creates: { [importInvoice.key]: importInvoice },
};
