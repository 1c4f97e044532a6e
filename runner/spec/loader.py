"""Integration specs: load `integrations.d/*.yaml`, validate against the schema, compile every template
and JMESPath expression up front, and hand the engine typed, ready-to-run objects.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runner.spec import fastpath
from runner.spec import functions
from runner.spec import schemas
from runner.spec.functions import user_pattern
from runner.errors import ConfigError, Problem
from runner.spec.templates import Template, TemplateError
from runner.spec.yamlfile import Document, dotted, load as load_yaml, schema_problems

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "integrations.d"

# Names a template may read, by where it is used. A typo ({{ secret.api_key }}) fails at load time.
REQUEST_NAMES = {"secrets", "window", "page", "connection", "options", "environment", "token", "base_url"}
DETAIL_NAMES = REQUEST_NAMES | {"record"}
LOOKUP_NAMES = REQUEST_NAMES | {"invoice_id", "number"}
CHANGES_NAMES = REQUEST_NAMES | {"changes"}
BATCH_LOOKUP_NAMES = REQUEST_NAMES | {"invoice_ids"}
RECHECK_FIELDS = ("state", "status_text", "amount_paid", "amount_credited", "amount_due", "currency", "date")


class Expression:
    """A compiled JMESPath expression that remembers its source (for messages)."""

    __slots__ = ("source", "_parsed", "search", "ast", "_compiled")

    def __init__(self, source: str):
        self.source = source
        self._parsed = functions.compile(source)  # a broken expression fails here, when the spec loads
        _check_functions(self._parsed.parsed)
        self.ast = self._parsed.parsed
        self._compiled = None
        self.search = self._first_search

    def _first_search(self, data):
        return self.compiled()(data)

    def compiled(self) -> Callable[[Any], Any]:
        """The expression as a plain function (what `search` becomes once used): for callers that keep it.
        Compiled to Python on first use (runner/spec/fastpath.py), not at load: `runner validate` and a run that
        never reaches this expression do not pay for it. jmespath for anything the compiler does not cover."""
        if self._compiled is None:
            parsed, options = self._parsed, functions.OPTIONS
            slow = lambda d: parsed.search(d, options=options)  # noqa: E731
            self._compiled = fastpath.compile(self.ast, options.custom_functions, slow) or slow
            self.search = self._compiled
        return self._compiled

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


def _check_functions(node) -> None:
    """JMESPath only finds an unknown function when it runs; find it when the spec loads instead."""
    if isinstance(node, dict):
        if node.get("type") == "function_expression" and node.get("value") not in functions.OPTIONS.custom_functions.FUNCTION_TABLE:
            known = ", ".join(sorted(functions.OPTIONS.custom_functions.FUNCTION_TABLE))
            raise ValueError(f"unknown function {node.get('value')}(); known functions: {known}")
        if node.get("type") == "function_expression" and node.get("value") == "parse_date":
            args = node.get("children") or []
            fmt = args[1] if len(args) > 1 else None
            if fmt is not None and fmt.get("type") == "literal" and fmt.get("value") not in functions.DATE_FORMATS:
                raise ValueError(f"parse_date() has no format {fmt.get('value')!r}; its formats: "
                                 f"{', '.join(repr(f) for f in functions.DATE_FORMATS)}")
        for child in node.get("children") or []:
            _check_functions(child)


@dataclass
class RequestSpec:
    method: str
    path: Template
    params: dict[str, Any]  # name -> Template | list[Template] | scalar
    headers: dict[str, Template]
    json: dict | None = None

    def render(self, ctx: dict, extra_params: dict | None = None) -> dict:
        params = {}
        for k, v in self.params.items():
            params[k] = _render_value(v, ctx)
        for k, v in (extra_params or {}).items():
            params[k] = _render_value(v, ctx)
        return {"method": self.method, "path": self.path.render(ctx), "params": params,
                "headers": {k: t.render(ctx) for k, t in self.headers.items()},
                "json": _render_json(self.json, ctx) if self.json is not None else None}


def _render_value(v, ctx):
    if isinstance(v, Template):
        return v.render(ctx)
    if isinstance(v, list):
        return [_render_value(x, ctx) for x in v]
    return v


def _render_json(obj, ctx):
    if isinstance(obj, str):
        return Template(obj).render(ctx)
    if isinstance(obj, dict):
        return {k: _render_json(v, ctx) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_render_json(v, ctx) for v in obj]
    return obj


@dataclass
class Paginate:
    type: str = "none"
    param: str | None = None
    value: Expression | None = None
    more: Expression | None = None
    size_param: str | None = None
    size: int | None = None
    start: int | None = None
    max_pages: int = 100_000


@dataclass
class Detail:
    name: str
    key: Template
    request: RequestSpec
    select: Expression | None
    when: Expression | None


@dataclass
class Mapping:
    """Canonical field path -> expression. Applying it builds the nested canonical dict."""

    fields: list[tuple[tuple, Expression]]

    def __post_init__(self) -> None:
        self._plan = [(path[:-1], path[-1], expr) for path, expr in self.fields]
        self._compiled = None
        self.apply = self._first_apply

    def _first_apply(self, record: Any) -> dict:
        return self.compiled()(record)

    def compiled(self) -> Callable[[Any], dict]:
        """`apply` as a plain function. The whole mapping as one generated function (runner/spec/fastpath.py),
        made on first use; a record it cannot handle (a function raising on a hostile value, say) goes
        through apply_each."""
        if self._compiled is None:
            self._compiled = fastpath.mapping_function([(path, expr.ast) for path, expr in self.fields],
                                                       functions.OPTIONS.custom_functions,
                                                       self.apply_each) or self.apply_each
            self.apply = self._compiled
        return self._compiled

    def apply_each(self, record: Any) -> dict:
        """Missing, null and blank values are left out, so the schema names them as missing."""
        out: dict = {}
        for parents, leaf, expr in self._plan:
            value = expr.search(record)
            if value is None:
                continue
            kind = type(value)
            if kind is str:
                value = value.strip()
                if not value:
                    continue
            elif (kind is dict or kind is list) and not value:
                continue
            node = out
            for key in parents:
                node = node.get(key) or node.setdefault(key, {})
            node[leaf] = value
        return out


@dataclass
class DateRule:
    value: Expression
    format: str = "date"


class PageTooLarge(ValueError):
    """A list answer with more invoices than the spec allows (the argument: how many)."""


@dataclass
class Stream:
    request: RequestSpec
    records: Expression
    paginate: Paginate
    mapping: Mapping
    unpaid: Expression
    status_text: Expression | None
    date: DateRule | None
    server_filters: dict[str, dict[str, Any]]
    details: list[Detail]
    max_page_size: int | None
    let: list[tuple[str, Expression]] = field(default_factory=list)
    partition: dict | None = None  # {by: window, parts, min_seconds}: fetch sub-windows concurrently
    exclude: "Exclude | None" = None  # records that are not receivables: their own verdict, still paginated

    def page_records(self, body: Any) -> list:
        """The invoices of one list answer, by the spec's `records` expression. Raises TypeError when the
        answer holds something else where the list should be, and PageTooLarge when it holds more invoices
        than the spec's max_page_size."""
        records = self.records.search(body)
        if records is None:
            return []  # some APIs omit the list entirely when it is empty
        if isinstance(records, dict):
            return [records]
        if not isinstance(records, list):
            raise TypeError(type(records).__name__)
        if self.max_page_size and len(records) > self.max_page_size:
            raise PageTooLarge(len(records))
        return records


    def prepare(self, record: Any) -> Any:
        """Compute the spec's `let` values into the record (names start with _, so they never clash)."""
        if self.let and isinstance(record, dict):
            for name, expr in self.let:
                record[name] = expr.search(record)
        return record


def interval_seconds(text: str) -> float:
    """'30s', '5m', '12h', '1d', '1w' (schema-checked) in seconds."""
    text = text.strip()
    return float(text[:-1].strip()) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[text[-1]]


@dataclass
class Changes:
    """`changes:`: how the provider reports the invoices changed since a moment (runner/engine/incremental.py)."""

    request: RequestSpec
    records: Expression
    paginate: Paginate
    id: Expression
    invoice: Expression
    retention_s: float | None  # None: changes are kept for good (a modified-since filter)
    overlap_s: float = 300.0
    deleted: Expression | None = None
    order: str = "newest_first"
    limit: int | None = None
    max_page_size: int | None = None
    details: list[Detail] = field(default_factory=list)


@dataclass
class Exclude:
    """`invoices.exclude`: records set aside with their own reason (never dropped: each gets a verdict)."""
    when: Expression
    reason: str = "excluded"
    message: str = ""


@dataclass
class LookupRequest:
    request: RequestSpec
    record: Expression
    not_found: list[int]


@dataclass
class BatchLookup:
    """lookup.by_ids: many invoices by id in one request."""
    request: RequestSpec
    records: Expression
    id: Expression
    max_ids: int = 30
    missing_means_deleted: bool = True


@dataclass
class Recheck:
    """What the source shows for an invoice whose case exists (`recheck:`): field -> expression."""
    fields: dict[str, Expression]
    max_lookups: int = 200
    interval_minutes: int = 60  # a case is looked up at most once in this long


@dataclass
class Document:
    """How to fetch an invoice's original document (`document:`)."""
    request: RequestSpec | None = None
    url: Expression | None = None
    hosts: list[str] = field(default_factory=list)
    file_name: Template | None = None
    max_per_run: int = 50
    max_attempts: int = 10


@dataclass
class CredentialRule:
    pattern: str
    message: str
    regex: Any = field(default=None, repr=False, compare=False)  # compiled by user_pattern when the spec loads

    def matches(self, value: str) -> bool:
        return (self.regex or user_pattern(self.pattern)).search(value) is not None


@dataclass
class Environment:
    name: str
    base_url: Template
    credentials: dict[str, CredentialRule]
    oauth2: dict
    rate_limit: dict | None
    description: str = ""
    test_cases: bool = False  # cases from this environment are test cases at the destination
    test: bool = False  # holds test data: never delivered to a production destination as real cases
    links: dict[str, str] = field(default_factory=dict)  # origin -> where its links point here (a simulator)


@dataclass
class Auth:
    type: str
    credentials: list[str]
    headers: dict[str, Template]
    oauth2: dict | None
    advice: dict[int, str] = field(default_factory=dict)  # status -> what to do about it (auth.advice)


@dataclass
class Spec:
    id: str
    name: str
    description: str
    file: str
    auth: Auth
    environments: dict[str, Environment]
    rate_limit: dict
    retry: dict
    check: RequestSpec | None
    account: dict
    invoices: Stream
    lookup: dict[str, LookupRequest]
    inbound: dict
    options: dict
    raw: dict = field(repr=False, default_factory=dict)
    retry_after: Expression | None = None  # retry.retry_after_body, compiled
    changes: Changes | None = None  # a change feed: runs read what changed since the last one
    batch_lookup: BatchLookup | None = None  # lookup.by_ids
    recheck: Recheck | None = None
    document: Document | None = None

    @property
    def default_environment(self) -> str:
        return next(iter(self.environments))

    @property
    def names_account(self) -> bool:
        """Whether the provider says which account a connection reads; if not, each connection must pin one
        with `account_id:` (the ledger keys invoices by it, never by the connection's name)."""
        return self.account.get("id") is not None and not self.account.get("from_config")

    @property
    def pull(self) -> bool:
        """False for an inbound-only spec: its invoices are posted to `runner serve`, never fetched."""
        return self.invoices.request is not None


class _Compiler:
    """Walks a validated spec document and compiles it, collecting every problem with its location."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.problems: list[Problem] = []

    def template(self, value: Any, path: tuple, allowed: set[str]) -> Template | None:
        try:
            line, _ = self.doc.mark(path)
            t = Template(str(value), where=f"{self.doc.file}:{line or 1}, {dotted(path)}")
        except TemplateError as exc:
            self.problems.append(self.doc.problem(path, str(exc), "fix the Jinja2 syntax: {{ name }} or {{ name | filter }}"))
            return None
        unknown = t.names() - allowed
        if unknown:
            self.problems.append(self.doc.problem(
                path, f"template {value!r} uses unknown name(s): {', '.join(sorted(unknown))}",
                f"a template here may use: {', '.join(sorted(allowed))}"))
        return t

    def credential(self, raw: dict, path: tuple) -> CredentialRule:
        rule = CredentialRule(pattern=raw["pattern"], message=raw["message"])
        try:
            rule.regex = user_pattern(rule.pattern)
        except ValueError as exc:
            self.problems.append(self.doc.problem(
                path + ("pattern",), f"the credential pattern {rule.pattern!r} cannot be used: {exc}",
                "patterns are RE2 regular expressions, which always run in time proportional to the key's length: "
                "no back-references (\\1) or look-arounds ((?=...), (?!...)); a prefix such as ^sk_live_ is "
                "usually all a credential pattern needs"))
        return rule

    def expression(self, value: Any, path: tuple) -> Expression | None:
        if value is None:
            return None
        try:
            return Expression(str(value))
        except Exception as exc:  # jmespath ParseError / LexerError / unknown function
            detail = getattr(exc, "msg", None) or str(exc).splitlines()[0]
            self.problems.append(self.doc.problem(
                path, f"JMESPath expression {value!r} is invalid: {detail}",
                "check the expression at https://jmespath.org (literals need backticks: `0`, strings single quotes: 'open')"))
            return None

    def request(self, raw: dict, path: tuple, allowed: set[str]) -> RequestSpec:
        params = {}
        for k, v in (raw.get("params") or {}).items():
            if isinstance(v, list):
                params[k] = [self.template(x, path + ("params", k, i), allowed) for i, x in enumerate(v)]
            elif isinstance(v, str):
                params[k] = self.template(v, path + ("params", k), allowed)
            else:
                params[k] = v
        headers = {k: self.template(v, path + ("headers", k), allowed) for k, v in (raw.get("headers") or {}).items()}
        if raw.get("json") is not None:
            self._check_json_templates(raw["json"], path + ("json",), allowed)
        return RequestSpec(method=raw.get("method", "GET"), path=self.template(raw["path"], path + ("path",), allowed),
                           params=params, headers=headers, json=raw.get("json"))

    def _check_json_templates(self, obj, path, allowed):
        if isinstance(obj, str):
            self.template(obj, path, allowed)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                self._check_json_templates(v, path + (k,), allowed)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                self._check_json_templates(v, path + (i,), allowed)

    def mapping(self, raw: dict, path: tuple) -> Mapping:
        fields: list = []
        self._mapping_fields(raw, path, (), fields, schemas.load("invoice"))
        return Mapping(fields=fields)

    def _mapping_fields(self, raw: dict, path: tuple, prefix: tuple, out: list, schema: dict) -> None:
        props = schema.get("properties", {})
        for key, value in raw.items():
            if key not in props or key == "source":
                import difflib

                guess = difflib.get_close_matches(key, list(props), n=1)
                self.problems.append(self.doc.problem(
                    path + (key,), f"'{key}' is not a field of the canonical invoice" +
                    (" here" if prefix else ""),
                    f"did you mean '{guess[0]}'?" if guess else f"fields here: {', '.join(p for p in props if p != 'source')}",
                    key=True))
                continue
            if isinstance(value, dict):
                self._mapping_fields(value, path + (key,), prefix + (key,), out, props[key])
            else:
                expr = self.expression(value, path + (key,))
                if expr is not None:
                    out.append((prefix + (key,), expr))

    def paginate(self, raw: dict | None, path: tuple) -> Paginate:
        if not raw:
            return Paginate()
        return Paginate(type=raw["type"], param=raw.get("param"),
                        value=self.expression(raw.get("value"), path + ("value",)),
                        more=self.expression(raw.get("more"), path + ("more",)),
                        size_param=raw.get("size_param"), size=raw.get("size"),
                        start=raw.get("start"), max_pages=raw.get("max_pages", 100_000))

    def exclude(self, raw: dict | None, path: tuple) -> Exclude | None:
        if not raw:
            return None
        when = self.expression(raw["when"], path + ("when",))
        return Exclude(when=when, reason=raw.get("reason", "excluded"), message=raw.get("message", "")) if when else None

    def details(self, raw: list | None, path: tuple) -> list[Detail]:
        details = []
        for i, d in enumerate(raw or []):
            p = path + ("details", i)
            details.append(Detail(name=d["name"], key=self.template(d["key"], p + ("key",), DETAIL_NAMES),
                                  request=self.request(d["request"], p + ("request",), DETAIL_NAMES),
                                  select=self.expression(d.get("select"), p + ("select",)),
                                  when=self.expression(d.get("when"), p + ("when",))))
        return details

    def changes(self, raw: dict | None, path: tuple) -> Changes | None:
        if not raw:
            return None
        return Changes(request=self.request(raw["request"], path + ("request",), CHANGES_NAMES),
                       records=self.expression(raw["records"], path + ("records",)),
                       paginate=self.paginate(raw.get("paginate"), path + ("paginate",)),
                       id=self.expression(raw["id"], path + ("id",)),
                       invoice=self.expression(raw["invoice"], path + ("invoice",)),
                       deleted=self.expression(raw.get("deleted"), path + ("deleted",)),
                       retention_s=interval_seconds(raw["retention"]) if raw.get("retention") else None,
                       overlap_s=interval_seconds(raw.get("overlap", "5m")),
                       order=raw.get("order", "newest_first"), limit=raw.get("limit"),
                       max_page_size=raw.get("max_page_size"), details=self.details(raw.get("details"), path))

    def stream(self, raw: dict, path: tuple) -> Stream:
        details = self.details(raw.get("details"), path)
        server_filters = {}
        for kind, params in (raw.get("server_filters") or {}).items():
            server_filters[kind] = {k: (self.template(v, path + ("server_filters", kind, k), REQUEST_NAMES)
                                        if isinstance(v, str) else v) for k, v in params.items()}
        date = None
        if raw.get("date"):
            date = DateRule(value=self.expression(raw["date"]["value"], path + ("date", "value")),
                            format=raw["date"].get("format", "date"))
        return Stream(request=(self.request(raw["request"], path + ("request",), REQUEST_NAMES)
                               if raw.get("request") else None),  # None: inbound-only, nothing is fetched
                      records=self.expression(raw.get("records"), path + ("records",)),
                      paginate=self.paginate(raw.get("paginate"), path + ("paginate",)),
                      mapping=self.mapping(raw["map"], path + ("map",)),
                      unpaid=self.expression(raw["unpaid"], path + ("unpaid",)),
                      status_text=self.expression(raw.get("status_text"), path + ("status_text",)),
                      date=date, server_filters=server_filters, details=details,
                      max_page_size=raw.get("max_page_size"), partition=raw.get("partition"),
                      exclude=self.exclude(raw.get("exclude"), path + ("exclude",)),
                      let=[(k, e) for k, v in (raw.get("let") or {}).items()
                           if (e := self.expression(v, path + ("let", k))) is not None])


def parse(doc: Document) -> Spec:
    """Validate and compile one spec document. Raises ConfigError naming every problem."""
    data = doc.data
    if not isinstance(data, dict):
        raise ConfigError(doc.problem((), "an integration spec must be a block of keys (id, name, auth, ...)"))
    advice = (data.get("auth") or {}).get("advice") if isinstance(data.get("auth"), dict) else None
    if isinstance(advice, dict):  # `403:` unquoted is a number in YAML; the schema names statuses as text
        data["auth"]["advice"] = {str(k): v for k, v in advice.items()}
    errors = schemas.errors("integration", data)
    if errors:
        raise ConfigError(schema_problems(doc, errors))
    c = _Compiler(doc)
    envs = {}
    for name, env in data["environments"].items():
        p = ("environments", name)
        envs[name] = Environment(
            name=name, base_url=(c.template(env["base_url"], p + ("base_url",), {"connection", "options", "token"})
                                 if "base_url" in env else None),
            credentials={k: c.credential(v, p + ("credentials", k)) for k, v in (env.get("credentials") or {}).items()},
            oauth2=env.get("oauth2") or {}, rate_limit=env.get("rate_limit"),
            description=env.get("description", ""), test_cases=bool(env.get("test_cases", False)),
            test=bool(env.get("test", False)), links=dict(env.get("links") or {}))
    a = data["auth"]
    auth = Auth(type=a["type"], credentials=list(a.get("credentials") or []),
                headers={k: c.template(v, ("auth", "headers", k), REQUEST_NAMES) for k, v in (a.get("headers") or {}).items()},
                oauth2=a.get("oauth2"), advice={int(k): v for k, v in (a.get("advice") or {}).items()})
    if auth.oauth2:
        for key in ("authorize_url", "token_url", "revoke_url", "header"):
            if key in auth.oauth2:
                c.template(auth.oauth2[key], ("auth", "oauth2", key), REQUEST_NAMES | {"redirect", "base_url"})
    for name, env in envs.items():  # environment overrides of oauth2 URLs are templates too
        for key in ("authorize_url", "token_url", "revoke_url", "header"):
            if key in env.oauth2:
                c.template(env.oauth2[key], ("environments", name, "oauth2", key), REQUEST_NAMES | {"redirect", "base_url"})
    check = c.request(data["check"]["request"], ("check", "request"), REQUEST_NAMES) if data.get("check") else None
    account = dict(data.get("account") or {})
    if "request" in account:
        account["request"] = c.request(account["request"], ("account", "request"), REQUEST_NAMES)
        for k in ("id", "name"):
            if k in account:
                account[k] = c.expression(account[k], ("account", k))
    else:
        for k in ("id", "name"):
            if k in account:
                account[k] = c.template(account[k], ("account", k), REQUEST_NAMES)
    if "refused" in account:
        account["refused"] = {k: (c.expression(v, ("account", "refused", k)) if k != "status" else v)
                              for k, v in account["refused"].items()}
    if "choose" in account:
        ch = account["choose"]
        account["choose"] = {k: (c.expression(v, ("account", "choose", k)) if k != "option" else v) for k, v in ch.items()}
    lookup = {}
    for kind, lr in (data.get("lookup") or {}).items():
        p = ("lookup", kind)
        if kind == "by_ids":
            continue
        lookup[kind] = LookupRequest(request=c.request(lr["request"], p + ("request",), LOOKUP_NAMES),
                                     record=c.expression(lr.get("record", "@"), p + ("record",)),
                                     not_found=list(lr.get("not_found") or [404]))
    batch_lookup, recheck, document = _after_case(c, data)
    inbound = dict(data.get("inbound") or {})
    if "records" in inbound:
        inbound["records"] = c.expression(inbound["records"], ("inbound", "records"))
    stream = c.stream(data["invoices"], ("invoices",))
    changes = c.changes(data.get("changes"), ("changes",))
    retry_after = c.expression((data.get("retry") or {}).get("retry_after_body"), ("retry", "retry_after_body"))
    for where, rl in [(("rate_limit",), data.get("rate_limit"))] + [
            (("environments", n, "rate_limit"), e.get("rate_limit")) for n, e in data["environments"].items()]:
        if rl and rl.get("scope"):
            c.template(rl["scope"], where + ("scope",), REQUEST_NAMES)
    stem = Path(doc.file).stem
    if stem != data["id"] and not doc.file.startswith("<"):
        c.problems.append(doc.problem(("id",), f"the spec id '{data['id']}' does not match its file name '{stem}.yaml'",
                                      f"rename the file to {data['id']}.yaml or set id: {stem}"))
    if c.problems:
        raise ConfigError(c.problems)
    return Spec(id=data["id"], name=data["name"], description=data.get("description", ""), file=doc.file,
                auth=auth, environments=envs, rate_limit=data.get("rate_limit") or {}, retry=data.get("retry") or {},
                check=check, account=account, invoices=stream, lookup=lookup, inbound=inbound,
                options=data.get("options") or {}, raw=data, retry_after=retry_after, changes=changes,
                batch_lookup=batch_lookup, recheck=recheck, document=document)


def _after_case(c: _Compiler, data: dict) -> tuple:
    """lookup.by_ids, recheck and document: what the runner does with an invoice once its case exists."""
    batch = None
    raw = (data.get("lookup") or {}).get("by_ids")
    if raw:
        p = ("lookup", "by_ids")
        batch = BatchLookup(request=c.request(raw["request"], p + ("request",), BATCH_LOOKUP_NAMES),
                            records=c.expression(raw["records"], p + ("records",)),
                            id=c.expression(raw["id"], p + ("id",)), max_ids=int(raw.get("max_ids", 30)),
                            missing_means_deleted=bool(raw.get("missing_means_deleted", True)))
    recheck = None
    raw = data.get("recheck")
    if raw:
        recheck = Recheck(fields={k: c.expression(raw[k], ("recheck", k)) for k in RECHECK_FIELDS if raw.get(k)},
                          max_lookups=int(raw.get("max_lookups", 200)),
                          interval_minutes=int(raw.get("interval_minutes", 60)))
    document = None
    raw = data.get("document")
    if raw:
        p = ("document",)
        document = Document(
            request=c.request(raw["request"], p + ("request",), LOOKUP_NAMES) if raw.get("request") else None,
            url=c.expression(raw.get("url"), p + ("url",)), hosts=[h.lower() for h in raw.get("hosts") or []],
            file_name=c.template(raw["file_name"], p + ("file_name",), LOOKUP_NAMES) if raw.get("file_name") else None,
            max_per_run=int(raw.get("max_per_run", 50)), max_attempts=int(raw.get("max_attempts", 10)))
    return batch, recheck, document


def spec_dirs(extra: Path | None = None) -> list[Path]:
    """Where specs are found: a user folder first (it may override a built-in), then the built-ins."""
    dirs = []
    if extra is not None and extra.is_dir():
        dirs.append(extra)
    dirs.append(BUILTIN_DIR)
    return dirs


def available(extra: Path | None = None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in spec_dirs(extra):
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


@functools.lru_cache(maxsize=64)
def load_file(path: Path) -> Spec:
    return parse(load_yaml(path))


def load_spec(spec_id: str, extra: Path | None = None) -> Spec:
    files = available(extra)
    if spec_id not in files:
        raise KeyError(spec_id)
    return load_file(files[spec_id])
