"""Hostile input, fuzzed with hypothesis: config and spec loaders, sandboxed templates, and invoice data.

* Loaders: broken YAML, wrong types, unknown keys, bad JMESPath, hostile Jinja. Every failure must be a
  ConfigError whose problems carry a location (file, and a line or a path), never another exception.
* Templates: attribute escapes and file access are refused by the sandbox at render time.
* Invoice data through `pipeline.Source.evaluate`: every record gets a verdict (never an exception), an
  eligible invoice is always a valid one, and the edge cases get the precise verdict.

A summary line with the number of fuzz cases run is printed at the end:  pytest -q -s tests/test_fuzz.py
"""
from __future__ import annotations

import copy
import tempfile
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.spec import config
from runner.engine import pipeline
from runner.spec import loader as specs
from runner.spec import validation
from runner.errors import ConfigError
from runner.net.http import Clients
from runner.spec.templates import Template, TemplateError
from runner.spec.yamlfile import load as load_yaml

try:
    from tests.conftest import ROOT, STRIPE_KEY
except ImportError:  # tests/ without __init__.py
    from conftest import ROOT, STRIPE_KEY

RUN: Counter = Counter()
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
WORK = Path(tempfile.mkdtemp(prefix="runner-fuzz-"))
ENV = {"STRIPE_API_KEY": STRIPE_KEY, "DEBITURA_API_KEY": "dbt_sandbox_live_Hq7Xv2Lm9Pz4"}

GOOD_CONFIG = """\
version: 1
state: state/state.db
destination:
  type: debitura
  environment: sandbox
  api_key: "${DEBITURA_API_KEY}"
defaults:
  window: {last: 90d}
connections:
  - name: acme-stripe
    integration: stripe
    environment: sandbox
    credentials:
      api_key: "${STRIPE_API_KEY}"
    window: {last: 90d, timezone: Europe/Copenhagen}
    server_filters: false
"""
GOOD_SPEC = (ROOT / "integrations.d" / "stripe.yaml").read_text()


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print("\nFUZZ SUMMARY " + " ".join(f"{k}={v}" for k, v in sorted(RUN.items())) + f" total={sum(RUN.values())}")


def _write(name: str, text: str) -> Path:
    RUN[name] += 1
    if name == "spec":  # a spec's file name must match its id
        (WORK / f"spec-{RUN[name]}").mkdir()
        p = WORK / f"spec-{RUN[name]}" / "stripe.yaml"
    else:
        p = WORK / f"{name}-{RUN[name]}.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def _located(exc: ConfigError, path: Path) -> None:
    assert exc.problems, "a ConfigError must say what is wrong"
    for p in exc.problems:
        assert p.message
        assert p.file, f"problem without a file: {p}"
        assert p.line is not None or p.where or p.file != str(path), f"problem without a location: {p.render()}"
    exc.render()  # renders without raising


def _load_config(text: str) -> None:
    path = _write("config", text)
    try:
        config.load(path, environ=ENV)
    except ConfigError as exc:
        _located(exc, path)


def _load_spec(text: str) -> None:
    path = _write("spec", text)
    try:
        specs.parse(load_yaml(path))
    except ConfigError as exc:
        _located(exc, path)


# --- YAML that does not parse, or parses into nonsense ------------------------------------------------------

YAML_NOISE = st.sampled_from(list(":{}[]-'\"&*!|>%@#\t\n ,?") + ["\x00", "\ufeff", "  ", "- ", ": ", "{{", "}}",
                                                                  "${", "\\", "...", "---", "!!python/object"])


@st.composite
def mangled(draw, base: str):
    text = base
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert":
            text = text[:i] + draw(YAML_NOISE) + text[i:]
        elif op == "delete":
            j = min(len(text), i + draw(st.integers(1, 20)))
            text = text[:i] + text[j:]
        else:
            text = text[:i] + draw(st.text(max_size=5)) + text[i + 1:]
    return text


@FUZZ
@given(mangled(GOOD_CONFIG))
def test_config_loader_broken_yaml(text):
    _load_config(text)


@FUZZ
@given(mangled(GOOD_SPEC))
def test_spec_loader_broken_yaml(text):
    _load_spec(text)


@FUZZ
@given(st.text(max_size=200))
def test_config_loader_arbitrary_text(text):
    _load_config(text)


# --- well-formed YAML with wrong types and unknown keys -----------------------------------------------------

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=3), max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def retyped(draw, base_text: str):
    data = yaml.safe_load(base_text)
    paths = [p for p in _paths(data) if p]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = data
        try:
            for k in path[:-1]:
                parent = parent[k]
            if draw(st.booleans()):
                parent[path[-1]] = draw(JSONISH)  # a wrong type (or a wrong value)
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=10))] = draw(JSONISH)  # an unknown key
        except (KeyError, IndexError, TypeError):
            continue
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@FUZZ
@given(retyped(GOOD_CONFIG))
def test_config_loader_wrong_types_and_unknown_keys(text):
    _load_config(text)


@FUZZ
@given(retyped(GOOD_SPEC))
def test_spec_loader_wrong_types_and_unknown_keys(text):
    _load_spec(text)


# --- bad JMESPath and hostile Jinja inside an otherwise good spec -------------------------------------------

HOSTILE_JINJA = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ secrets.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].listdir('/') }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% extends '/etc/hosts' %}",
    "{{ self._TemplateReference__context }}",
    "{{ window.start.__class__.__subclasses__() }}",
    "{{ secrets.api_key.__len__() }}",
    "{{ range(10**9) | list }}",
    "{{ options.update({'a': 1}) }}",
    "{{ config.items() }}",
    "{{ request.environ }}",
    "{{ undefined_name }}",
    "{{ 1/0 }}",
    "{{",
    "{% for %}",
]
BAD_JMESPATH = ["data[", "@@", "foo.", "&&", "`not json", "unknown_function(id)", "length(`1`, `2`)", "[?", "a.b[-]",
                "to_number(", "'unterminated", "*.*.[", "sort_by(@, &)"]


@st.composite
def spec_with(draw, values):
    data = yaml.safe_load(GOOD_SPEC)
    targets = [("invoices", "request", "path"), ("invoices", "request", "params", "limit"),
               ("auth", "headers", "Authorization"), ("lookup", "by_id", "request", "path"),
               ("invoices", "records"), ("invoices", "unpaid"), ("invoices", "map", "currency"),
               ("invoices", "map", "debtor", "name"), ("invoices", "paginate", "value"), ("invoices", "let", "_address"),
               ("invoices", "date", "value"), ("environments", "sandbox", "base_url")]
    path = draw(st.sampled_from(targets))
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = draw(values)
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


@FUZZ
@given(spec_with(st.sampled_from(HOSTILE_JINJA + BAD_JMESPATH) | st.text(max_size=30)))
def test_spec_loader_bad_jmespath_and_hostile_jinja(text):
    _load_spec(text)


@pytest.mark.parametrize("source", HOSTILE_JINJA)
def test_hostile_templates_cannot_escape_the_sandbox(source):
    RUN["template"] += 1
    ctx = {"secrets": {"api_key": "sk_test_secret_value_1234"}, "options": {}, "window": {
        "start": datetime(2026, 1, 1, tzinfo=timezone.utc)}, "connection": {"name": "x"}}
    try:
        out = Template(source).render(ctx)
    except TemplateError as exc:
        assert "Traceback" not in str(exc)
        return
    # Rendered without an error: then it must not have reached anything outside the sandbox.
    assert "root:" not in out and "<class" not in out and "function" not in out and "module" not in out, out


# --- invoice data through the pipeline's evaluate -----------------------------------------------------------

def _source(tz="UTC", window="{last: 3650d}"):
    path = _write("evalconfig", GOOD_CONFIG.replace("{last: 90d, timezone: Europe/Copenhagen}",
                                                    window if "timezone" in window else window[:-1] +
                                                    f", timezone: {tz}}}"))
    conn = config.load(path, environ=ENV).connections[0]
    src = pipeline.Source(conn, Clients())
    src.account_id = "acct_test"
    return src


SOURCE = None


def _src():
    global SOURCE
    if SOURCE is None:
        SOURCE = _source()
    return SOURCE


NOW = int(datetime.now(timezone.utc).timestamp())
ADDRESS = {"line1": "Industriestraße 12", "line2": None, "city": "Stuttgart", "postal_code": "70565",
           "country": "DE", "state": None}


def _invoice(**over):
    rec = {"id": "in_fuzz1", "object": "invoice", "number": "FZ-0001", "status": "open", "amount_paid": 0,
           "amount_remaining": 12345, "amount_due": 12345, "currency": "eur", "created": NOW - 40 * 86400,
           "effective_at": None, "due_date": NOW - 20 * 86400, "customer": "cus_1", "customer_name": "Müller GmbH",
           "customer_email": "a@b.example", "customer_phone": None, "customer_address": dict(ADDRESS),
           "customer_tax_ids": []}
    rec.update(over)
    return rec


def _check_verdict(v, rec):
    assert v.verdict in (pipeline.ELIGIBLE, pipeline.SKIPPED), v
    if v.verdict == pipeline.SKIPPED:
        assert v.reason in pipeline.REASONS and v.message, v
    else:
        inv = v.invoice
        assert validation.check(inv).ok
        assert Decimal(str(inv["amount"])) > 0
        a = inv["debtor"]["address"]
        assert all(a.get(k) for k in ("street", "city", "postal_code", "country"))


AMOUNTS = (st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True) |
           st.text(max_size=12) | st.sampled_from(["100", "-5", "0", "1e3", "12,50", "NaN", "Infinity", "", " "]) |
           st.none() | st.booleans())
CURRENCIES = st.sampled_from(["eur", "usd", "jpy", "kwd", "xxx", "zzz", "EUR", "", "eu", "€"]) | st.text(max_size=4) | \
    st.none() | st.integers()
DATES = (st.integers(-10**11, 10**11) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=25) |
         st.none() | st.sampled_from(["2026-01-01", "2026-01-01T23:59:59+14:00", "1e10", "yesterday"]))
NAMES = st.text(max_size=40) | st.none() | st.integers()
ADDRS = st.none() | st.fixed_dictionaries({k: st.none() | st.text(max_size=10) for k in ADDRESS}) | st.just(ADDRESS)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(AMOUNTS, CURRENCIES, DATES, NAMES, ADDRS, st.sampled_from(["open", "paid", "draft", None, 3]))
def test_every_record_gets_a_precise_verdict_never_an_exception(amount, currency, created, name, addr, status):
    RUN["invoice"] += 1
    rec = _invoice(amount_remaining=amount, currency=currency, created=created, customer_name=name,
                   customer_address=addr, status=status)
    _check_verdict(_src().evaluate(copy.deepcopy(rec)), rec)


@pytest.mark.parametrize("amount, verdict, reason, words", [
    (0, "skipped", "not_unpaid", "only unpaid"),
    (-500, "skipped", "not_unpaid", "only unpaid"),
    (1, "eligible", None, None),
    (10**18, "eligible", None, None),
])
def test_amount_edges(amount, verdict, reason, words):
    RUN["invoice"] += 1
    v = _src().evaluate(_invoice(amount_remaining=amount, amount_due=max(amount, 1)))
    assert (v.verdict, v.reason) == (verdict, reason), v
    if words:
        assert words in v.message
    if verdict == "eligible":
        assert v.invoice["amount"] == Decimal(amount) / 100


def test_amount_as_string_is_read_exactly_or_refused_precisely():
    RUN["invoice"] += 2
    v = _src().evaluate(_invoice(amount_remaining="lots"))
    assert v.verdict == "skipped" and v.reason in ("invalid", "not_unpaid") and v.message
    v = _src().evaluate(_invoice(amount_remaining="12345"))
    # a numeric string: either taken exactly, or refused with a reason, never a wrong amount
    assert v.verdict == "skipped" or v.invoice["amount"] == Decimal("123.45")


@pytest.mark.parametrize("currency", ["xxx", "zzz", "", "eu"])
def test_unknown_currency_is_invalid_and_named(currency):
    RUN["invoice"] += 1
    v = _src().evaluate(_invoice(currency=currency))
    assert (v.verdict, v.reason) == ("skipped", "invalid"), v
    assert "currency" in v.message


def test_unicode_names_are_kept_exactly():
    RUN["invoice"] += 1
    name = "Zoë Ωmega 株式会社 — Ærø Smørrebrød 🚀"
    v = _src().evaluate(_invoice(customer_name=name))
    assert v.verdict == "eligible" and v.invoice["debtor"]["name"] == name


def test_null_address_names_every_missing_field():
    RUN["invoice"] += 1
    v = _src().evaluate(_invoice(customer_address=None))
    assert (v.verdict, v.reason) == ("skipped", "incomplete_address")
    assert v.detail["missing"] == ["street", "city", "postal_code", "country"]


def _ts(text):
    return int(datetime.fromisoformat(text).timestamp())


@pytest.mark.parametrize("tz, created, verdict", [
    # Copenhagen is UTC+1 in January: 23:30 UTC on Dec 31 is already Jan 1 there (inside), and 23:30 UTC on
    # Jan 31 is Feb 1 there (outside).
    ("Europe/Copenhagen", "2025-12-31T23:30:00+00:00", "eligible"),
    ("Europe/Copenhagen", "2025-12-31T22:59:59+00:00", "outside_date_window"),
    ("Europe/Copenhagen", "2026-01-31T22:59:59+00:00", "eligible"),
    ("Europe/Copenhagen", "2026-01-31T23:30:00+00:00", "outside_date_window"),
    # Los Angeles is UTC-8: 05:00 UTC on Jan 1 is still Dec 31 there (outside); 07:59 UTC on Feb 1 is Jan 31.
    ("America/Los_Angeles", "2026-01-01T05:00:00+00:00", "outside_date_window"),
    ("America/Los_Angeles", "2026-01-01T08:00:00+00:00", "eligible"),
    ("America/Los_Angeles", "2026-02-01T07:59:59+00:00", "eligible"),
    ("America/Los_Angeles", "2026-02-01T08:00:00+00:00", "outside_date_window"),
    ("UTC", "2025-12-31T23:59:59+00:00", "outside_date_window"),
    ("UTC", "2026-01-01T00:00:00+00:00", "eligible"),
    ("UTC", "2026-01-31T23:59:59+00:00", "eligible"),
    ("UTC", "2026-02-01T00:00:00+00:00", "outside_date_window"),
])
def test_dates_on_both_sides_of_utc_midnight(tz, created, verdict):
    RUN["invoice"] += 1
    src = _source(tz, "{from: '2026-01-01', to: '2026-01-31', timezone: %s}" % tz)
    v = src.evaluate(_invoice(created=_ts(created), due_date=_ts(created) + 86400))
    got = v.verdict if v.verdict == "eligible" else v.reason
    assert got == verdict, v


WINDOW_SOURCE = None


@FUZZ
@given(st.one_of(st.integers(min_value=_ts("2025-12-31T00:00:00+00:00"), max_value=_ts("2026-02-02T00:00:00+00:00")),
                 st.integers(), st.floats(allow_nan=True), st.booleans(), st.none()))
def test_the_unix_window_shortcut_agrees_with_the_datetime_comparison(created):
    """A unix timestamp is checked against the window's own timestamps without making a datetime; the
    answer (and what is shown when it is outside, or unreadable) is the general path's."""
    global WINDOW_SOURCE
    RUN["invoice"] += 1
    if WINDOW_SOURCE is None:
        WINDOW_SOURCE = _source("Europe/Copenhagen", "{from: '2026-01-01', to: '2026-01-31', timezone: Europe/Copenhagen}")
    fast = WINDOW_SOURCE.classifier()
    general = copy.copy(fast)
    general._unix = None
    rec = {"created": created}
    assert fast._in_window(rec, None) == general._in_window(rec, None)


@pytest.mark.parametrize("created", ["yesterday", "2026-13-45", "", "1e400", float("nan"), [1], {"a": 1}])
def test_unreadable_dates_are_invalid_with_the_value_shown(created):
    RUN["invoice"] += 1
    v = _src().evaluate(_invoice(created=created))
    assert (v.verdict, v.reason) == ("skipped", "invalid"), v
    assert v.message


@pytest.mark.parametrize("source", [s for s in HOSTILE_JINJA if "__" in s or "_Template" in s or "include" in s
                                    or "import" in s or "extends" in s])
def test_hostile_templates_are_refused_when_the_spec_loads_with_a_location(source):
    RUN["template"] += 1
    data = yaml.safe_load(GOOD_SPEC)
    data["invoices"]["request"]["params"]["limit"] = source
    path = _write("spec", yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        specs.parse(load_yaml(path))
    (p,) = info.value.problems
    assert p.line is not None and p.where == "invoices.request.params.limit"
    assert any(w in p.message for w in ("private attribute", "may not include", "does not compile")), p.message


def test_a_template_refused_at_render_time_fails_the_connection_without_a_traceback(tmp_path, monkeypatch, capsys):
    import asyncio

    from runner.state.sqlite import Store

    spec_dir = tmp_path / "integrations.d"
    spec_dir.mkdir()
    data = yaml.safe_load(GOOD_SPEC)
    data["id"] = "mutating"
    data["invoices"]["request"]["params"]["limit"] = "{{ options.update({'a': 1}) }}"
    (spec_dir / "mutating.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(GOOD_CONFIG.replace("integration: stripe", "integration: mutating"))
    cfg = config.load(cfg_path, environ=ENV)
    store = Store(cfg.state_path)
    try:
        result = asyncio.run(pipeline.sync(cfg, mode="plan", store=store))
    finally:
        store.close()
    (conn,) = result.connections
    assert conn.status == "failed" and "tried something not allowed" in conn.error and conn.fix
    assert "Traceback" not in capsys.readouterr().err
