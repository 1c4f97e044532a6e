'use strict';
// The example app run by Zapier's own test harness (zapier-platform-core's createAppTester) against real
// `runner serve` processes. tests/test_zapier_app.py starts the servers and sets:
//   RUNNER_URL, RUNNER_KEY            a production server and one of its keys
//   RUNNER_TEST_URL, RUNNER_TEST_KEY  a test server (test cases only) and one of its keys
//   RUNNER_RUN                        a tag that keeps this run's invoice ids apart from earlier runs'
const assert = require('assert');
const zapier = require('zapier-platform-core');

const App = require('../index');

const appTester = zapier.createAppTester(App);
const RUN = process.env.RUNNER_RUN || String(Date.now());

const production = { base_url: process.env.RUNNER_URL, api_key: process.env.RUNNER_KEY };
const testServer = { base_url: process.env.RUNNER_TEST_URL, api_key: process.env.RUNNER_TEST_KEY };

const day = (offset) => new Date(Date.now() + offset * 86400000).toISOString().slice(0, 10);

const invoice = (n, extra = {}) => ({
  id: `ZAP-${RUN}-${n}`, number: `Z${RUN}-${n}`.slice(-40), issue_date: day(-60), due_date: day(-30), currency: 'EUR',
  amount_due: `${100 + n}.50`, customer_name: `Customer ${n} GmbH`, customer_email: `ap${n}@example.de`,
  street: `Hauptstr. ${n}`, city: 'Berlin', postal_code: '10115', country: 'Germany', ...extra,
});

const create = (authData, inputData) =>
  appTester(App.creates.invoice.operation.perform, { authData, inputData });

describe('runner serve, through the example Zapier app', function () {
  before(function () {
    if (!production.base_url || !production.api_key) {
      throw new Error('set RUNNER_URL and RUNNER_KEY (tests/test_zapier_app.py does)');
    }
  });

  it('the app definition passes Zapier\'s schema validation', () => {
    const { prepareApp, validateApp } = require('zapier-platform-core/src/tools/schema');
    assert.deepStrictEqual(validateApp(prepareApp(App)), []);
  });

  it('authentication test: GET /v1/me names the connection and environment', async () => {
    const me = await appTester(App.authentication.test, { authData: production });
    assert.strictEqual(me.environment, 'production');
    assert.ok(me.connection);
    assert.strictEqual(me.key.environment, 'production');
  });

  it('authentication test fails with a wrong key, and says why', async () => {
    await assert.rejects(
      appTester(App.authentication.test, { authData: { ...production, api_key: 'rnr_prod_00000000_' + '0'.repeat(64) } }),
      (err) => /invalid API key/.test(err.message),
    );
  });

  it('create: an invoice is imported and the result has an id', async () => {
    const result = await create(production, invoice(1));
    assert.strictEqual(result.id, `ZAP-${RUN}-1`);
    assert.strictEqual(result.verdict, 'imported');
    assert.ok(result.case_id && result.case_reference);
  });

  it('create: a skip the user can fix fails the step with the reason', async () => {
    await assert.rejects(create(production, invoice(2, { city: '' })), (err) => {
      assert.match(err.message, /missing city/);
      assert.match(err.message, /send it again/);
      return true;
    });
  });

  it('create: the corrected invoice, with the same Idempotency-Key, is imported', async () => {
    const broken = invoice(3, { postal_code: '' });
    await assert.rejects(create(production, broken), /missing postal code/);
    const fixed = await create(production, invoice(3)); // Idempotency-Key: the invoice id, both times
    assert.strictEqual(fixed.verdict, 'imported');
    const replay = await create(production, invoice(3));
    assert.deepStrictEqual(replay, fixed);
  });

  it('create: a paid invoice is not an error, and nothing is created', async () => {
    const result = await create(production, invoice(4, { status: 'paid' }));
    assert.strictEqual(result.verdict, 'skipped');
    assert.strictEqual(result.reason, 'not_unpaid');
  });

  it('trigger: every new case is seen even when more arrived than one page holds', async () => {
    const ids = [];
    for (let n = 10; n < 15; n += 1) {
      ids.push((await create(production, invoice(n))).id);
    }
    const cases = await appTester(App.triggers.case.operation.perform,
      { authData: production, inputData: { page_size: 2 }, meta: {} });
    const seen = cases.map((c) => c.invoice_id);
    ids.forEach((id) => assert.ok(seen.includes(id), `${id} was not seen`));
    assert.strictEqual(new Set(cases.map((c) => c.id)).size, cases.length);
    assert.ok(cases.length >= 7); // invoices 1, 3 and 10..14
  });

  it('trigger: skipped invoices, with the reason', async () => {
    const skipped = await appTester(App.triggers.skipped.operation.perform,
      { authData: production, inputData: { page_size: 1 }, meta: {} });
    const paid = skipped.find((s) => s.invoice_id === `ZAP-${RUN}-4`);
    assert.ok(paid && paid.reason === 'not_unpaid');
  });
});

describe('test server, then production', function () {
  // Debitura keeps creditor references unique across test and production cases: the production server must
  // not take the test case for the real one (that would record an invoice as imported with no real case).
  it('an invoice tried on the test server is refused by production, naming the test case to delete', async function () {
    if (!testServer.base_url) this.skip();
    const tried = await create(testServer, invoice(50));
    assert.strictEqual(tried.verdict, 'imported');
    await assert.rejects(create(production, invoice(50)), (err) => {
      assert.match(err.message, /TEST case/);
      assert.match(err.message, new RegExp(tried.case_reference || tried.case_id));
      return true;
    });
  });

  it('once the test case is deleted, production imports the invoice for real', async function () {
    if (!testServer.base_url || !process.env.RUNNER_TEST_CASE_DELETED) this.skip();
    const real = await create(production, invoice(50));
    assert.strictEqual(real.verdict, 'imported', `production answered ${JSON.stringify(real)}`);
  });
});
