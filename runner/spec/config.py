"""The user's config: load, validate against schemas/config.schema.json, resolve secrets and date windows.

Everything a run needs is resolved here, before any request is made, so a mistake is reported with its
file, line and fix instead of failing halfway through a sync.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

from runner.spec import schemas
from runner.spec import secrets
from runner.spec import loader as specs
from runner.errors import ConfigError, Problem
from runner.spec.yamlfile import Document, load as load_yaml, schema_problems


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    tz: str
    source: str  # how the user wrote it, e.g. "last 90d"

    def contains(self, moment: datetime) -> bool:
        return self.start <= moment <= self.end

    def contains_date(self, d: date) -> bool:
        return self.start_date <= d <= self.end_date

    @property
    def zone(self):
        return _zone(self.tz)

    @property
    def start_date(self) -> date:
        return self.start.astimezone(self.zone).date()

    @property
    def end_date(self) -> date:
        return self.end.astimezone(self.zone).date()

    def describe(self) -> str:
        fmt = "%Y-%m-%d %H:%M %Z"
        z = self.zone
        return f"{self.start.astimezone(z).strftime(fmt)} → {self.end.astimezone(z).strftime(fmt)} ({self.source})"

    def as_dict(self) -> dict:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "timezone": self.tz, "source": self.source}

    def context(self) -> dict:
        """What templates see as `window`."""
        return {"start": self.start, "end": self.end, "start_date": self.start_date.isoformat(),
                "end_date": self.end_date.isoformat(), "timezone": self.tz}


@dataclass
class Connection:
    name: str
    integration: str
    spec: specs.Spec
    environment: str
    base_url: str | None
    credentials: dict[str, str]  # resolved secret values (redacted everywhere)
    credential_refs: dict[str, str]
    window: Window
    server_filters: bool
    debtor_type: str
    account_id: str | None
    expect: dict
    options: dict
    enabled: bool = True
    full_scan_every: float = 86400.0  # seconds between full scans where the spec reads a change feed
    schedule_every: float = 300.0  # seconds between two syncs by `runner worker` (`schedule: {every: 5m}`)
    problems: list[Problem] = field(default_factory=list)  # non-fatal in lenient mode (doctor)
    index: int = 0


@dataclass
class Destination:
    type: str
    environment: str | None = None
    api_key: str | None = None
    base_url: str | None = None
    is_test: bool = False
    tag: str | None = None
    allow_pending_contracts: bool = False
    concurrency: int = 8
    path: Path | None = None
    chat_user_email: str | None = None  # who the runner's chat messages on cases come from (GET /users)
    chat_user_id: str | None = None
    problems: list[Problem] = field(default_factory=list)
    webhooks: "Webhooks | None" = None


WEBHOOK_EVENTS = ("case.created", "case.updated", "case.closed", "payment.created", "payment.deleted", "chat.created")


@dataclass
class Webhooks:
    """destination.webhooks: how the runner learns Debitura's side of its cases (runner/inbound/webhooks.py)."""
    mode: str = "push"                   # push (a subscription to `url`) | poll (read open cases)
    url: str | None = None
    events: tuple = WEBHOOK_EVENTS
    test_mode: bool = False
    secret: str | None = None            # resolved from `secret:` (a subscription made outside the runner)
    secret_ref: str | None = None
    poll_max_requests: int = 500


# A run that sees 100,000 invoices records a verdict for each one it skips: 70,000 rows and 26 MiB a run once
# they are all imported (duplicates). Run every few minutes, the store would grow by gigabytes a day.
KEEP_RUNS = 30


@dataclass
class Config:
    file: Path
    doc: Document
    state_path: Path
    destination: Destination
    connections: list[Connection]
    integrations_dir: Path | None
    keep_runs: int = KEEP_RUNS  # apply runs whose verdicts of skipped invoices are kept (state.keep_runs)
    # The PostgreSQL store's URL (`state: postgresql://...`), secrets resolved; None: SQLite at state_path.
    state_url: str | None = None

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    def connection(self, name: str) -> Connection:
        for c in self.connections:
            if c.name == name:
                return c
        raise ConfigError(Problem(f"no connection named '{name}' in {self.file}",
                                  fix=f"use one of: {', '.join(c.name for c in self.connections)}"))


_DURATION = re.compile(r"^([1-9][0-9]*)\s*([dwmqyh])$")


class WindowError(ValueError):
    """A window that cannot be resolved: `key` is the window's key at fault, `fix` what to write instead."""

    def __init__(self, key: str, message: str, fix: str):
        super().__init__(message)
        self.key, self.message, self.fix = key, message, fix


def _zone(name: str):
    from zoneinfo import ZoneInfo

    return timezone.utc if name in ("UTC", "utc", "Z") else ZoneInfo(name)


def _checked_zone(name: str):
    """The zone, or a WindowError naming the closest IANA names (a typo is the usual cause)."""
    import difflib
    from zoneinfo import ZoneInfoNotFoundError, available_timezones

    try:
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        names = sorted(available_timezones())
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.85) or difflib.get_close_matches(
            name.split("/")[-1], [n.split("/")[-1] for n in names], n=3)
        if close and "/" not in close[0]:  # matched on the city alone: show the full names
            close = [n for n in names if n.split("/")[-1] in close][:3]
        fix = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close else
               "use an IANA time zone name such as Europe/Copenhagen, America/New_York or UTC")
        raise WindowError("timezone", f"'{name}' is not a time zone the runner knows", fix) from None


def _months_back(moment: datetime, months: int) -> datetime:
    y, m = divmod(moment.month - 1 - months, 12)
    year, month = moment.year + y, m + 1
    import calendar

    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def _parse_point(text: str, tz, *, end: bool, key: str = "from") -> datetime:
    text = str(text).strip()
    try:
        if len(text) == 10:  # a plain date: the whole day in the window's zone
            d = date.fromisoformat(text)
            if end:
                return datetime.combine(d, time.max, tzinfo=tz)
            return datetime.combine(d, time.min, tzinfo=tz)
        moment = datetime.fromisoformat(text.replace(" ", "T").replace("Z", "+00:00"))
    except ValueError as exc:
        raise WindowError(key, f"`{key}: {text}` is not a real date: {_why_not_a_date(text, exc)}",
                          f"write a date that exists, as YYYY-MM-DD{_nearest_date(text)}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=tz)


def _why_not_a_date(text: str, exc: Exception) -> str:
    import calendar

    m = re.match(r"^(\d{4})-(\d{2})-(\d{2})", text)
    if m:
        y, mo, d = (int(x) for x in m.groups())
        if not 1 <= mo <= 12:
            return f"there is no month {mo}"
        days = calendar.monthrange(y, mo)[1]
        if not 1 <= d <= days:
            return f"{calendar.month_name[mo]} {y} has {days} days"
    return str(exc)


def _nearest_date(text: str) -> str:
    import calendar

    m = re.match(r"^(\d{4})-(\d{2})-(\d{2})", text)
    if m and 1 <= int(m.group(2)) <= 12:
        y, mo = int(m.group(1)), int(m.group(2))
        return f" (the last day of that month is {y:04d}-{mo:02d}-{calendar.monthrange(y, mo)[1]:02d})"
    return ""


def _period_start(moment: datetime, period: str) -> datetime:
    """The first moment of the calendar month, quarter or year `moment` is in (in moment's zone)."""
    month = {"month": moment.month, "quarter": 3 * ((moment.month - 1) // 3) + 1, "year": 1}[period]
    return datetime.combine(date(moment.year, month, 1), time.min, tzinfo=moment.tzinfo)


def _period_before(start: datetime, period: str) -> datetime:
    months = {"month": 1, "quarter": 3, "year": 12}[period]
    y, m = divmod(start.month - 1 - months, 12)
    return start.replace(year=start.year + y, month=m + 1, day=1)


def resolve_window(raw: dict, now: datetime | None = None) -> Window:
    """The window in absolute time. Plain dates and calendar periods are read in the window's time zone, so
    `previous: month` on a job in Copenhagen is that month's days there, whatever the clocks do (DST)."""
    tzname = raw.get("timezone", "UTC")
    tz = _checked_zone(tzname)
    now = (now or datetime.now(timezone.utc)).astimezone(tz)
    if "last" in raw:
        n, unit = _DURATION.match(str(raw["last"]).strip()).groups()
        n = int(n)
        if unit == "m":
            start = _months_back(now, n)
        elif unit == "q":
            start = _months_back(now, 3 * n)
        elif unit == "y":
            start = _months_back(now, 12 * n)
        else:
            start = now - timedelta(**{{"d": "days", "w": "weeks", "h": "hours"}[unit]: n})
        return Window(start=start, end=now, tz=tzname, source=f"last {raw['last']}")
    if "previous" in raw or "current" in raw:
        which = "previous" if "previous" in raw else "current"
        period = raw[which]
        this = _period_start(now, period)
        if which == "current":
            return Window(start=this, end=now, tz=tzname, source=f"current {period}")
        start = _period_before(this, period)
        # The last moment of the period before this one, read in the zone (a DST change is inside a period,
        # never at its end: periods end at midnight).
        end = datetime.combine(this.date() - timedelta(days=1), time.max, tzinfo=tz)
        return Window(start=start.replace(tzinfo=tz), end=end, tz=tzname, source=f"previous {period}")
    if "since" in raw:
        start = _parse_point(raw["since"], tz, end=False, key="since")
        return Window(start=start, end=now, tz=tzname, source=f"since {raw['since']}")
    start = _parse_point(raw["from"], tz, end=False, key="from")
    end = _parse_point(raw["to"], tz, end=True, key="to") if raw.get("to") else now
    src = f"from {raw['from']}" + (f" to {raw['to']}" if raw.get("to") else " to now")
    return Window(start=start, end=end, tz=tzname, source=src)


def _walk_strings(obj: Any, path: tuple = ()):
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_strings(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_strings(v, path + (i,))


def load(path: Path | str, *, strict: bool = True, resolve: bool = True, environ=None,
         now: datetime | None = None) -> Config:
    """Load and check a config. strict=False keeps per-connection problems on the connection (for doctor)."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    doc = load_yaml(path)
    data = doc.data
    if not isinstance(data, dict):
        raise ConfigError(doc.problem((), "the config must be a block of keys: destination, connections, ...",
                                      "start from sample-config.yaml"))
    problems: list[Problem] = []
    # Literal secrets first: they are the most dangerous mistake in a file that lives in git.
    for p, value in _walk_strings(data):
        if secrets.parse_ref(value) is None and secrets.looks_secret(value, p):
            problems.append(doc.problem(p, "this looks like a literal secret (an API key or token) written in the config",
                                        "remove it from the file (and rotate it if it was committed), put it in an "
                                        "environment variable and write \"${MY_API_KEY}\" instead"))
    errors = schemas.errors("config", data)
    problems += [p for p in schema_problems(doc, errors) if not any(
        q.line == p.line and q.column == p.column for q in problems)]
    if problems:
        raise ConfigError(problems)

    base = path.resolve().parent
    state_raw = data.get("state", ".runner/state.db")
    state_url = _state_url(doc, state_raw, base, environ, problems)
    if state_url is not None or _is_server_state(state_raw):
        # A database server holds the state; this folder beside the config keeps only local files (the
        # sandbox simulators' data).
        state_path = Path(".runner/state.db")
    else:
        state_path = Path(state_raw if isinstance(state_raw, str) else state_raw.get("path", ".runner/state.db"))
    state_path = state_path if state_path.is_absolute() else base / state_path
    integrations_dir = Path(data["integrations_dir"]) if data.get("integrations_dir") else base / "integrations.d"
    if not integrations_dir.is_absolute():
        integrations_dir = base / integrations_dir

    dest = _destination(doc, data["destination"], base, problems, resolve, environ)
    defaults = data.get("defaults") or {}
    connections: list[Connection] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["connections"]):
        p = ("connections", i)
        if raw["name"] in seen:
            problems.append(doc.problem(p + ("name",), f"two connections are named '{raw['name']}'",
                                        "give each connection its own name; the ledger is kept per connection"))
            continue
        seen.add(raw["name"])
        conn = _connection(doc, raw, p, i, defaults, base, integrations_dir, problems, resolve, environ, now)
        if conn is not None:
            connections.append(conn)
    for c in connections:  # real collection cases against test-mode debtors: refused before anything runs
        refused = _test_into_production(doc, c, data["connections"][c.index], dest)
        if refused is not None:
            problems.append(refused)
    if strict:
        for c in connections:
            problems += c.problems
        problems += dest.problems
    if problems:
        raise ConfigError(problems)
    return Config(file=path, doc=doc, state_path=state_path, state_url=state_url, destination=dest,
                  connections=connections,
                  integrations_dir=integrations_dir if integrations_dir.is_dir() else None,
                  keep_runs=KEEP_RUNS if isinstance(state_raw, str) else state_raw.get("keep_runs", KEEP_RUNS))


# What a shell, a CI system or a Kubernetes Secret can set as an environment variable.
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SERVER_SCHEMES = ("postgresql://", "postgres://")


def _is_server_state(raw) -> bool:
    if isinstance(raw, dict):
        return raw.get("type") == "postgresql"
    return isinstance(raw, str) and (raw.strip().lower().startswith(SERVER_SCHEMES) or secrets.parse_ref(raw) is not None)


def _state_url(doc, raw, base, environ, problems) -> str | None:
    """The PostgreSQL URL `state:` names (a URL, a ${...} reference to one, or {type: postgresql, url}); None
    for an SQLite file. Resolved even when other secrets are not: nothing opens the store without it."""
    if not _is_server_state(raw):
        return None
    at = ("state", "url") if isinstance(raw, dict) else ("state",)
    value = raw.get("url") if isinstance(raw, dict) else raw
    ref = secrets.parse_ref(value)
    if ref is not None:
        url = secrets.resolve(ref, base, environ)
        if url is None:
            problems.append(secrets.missing_problem(ref, doc, at))
            return None
        url = url.strip()
    else:
        url = value.strip()
        if _url_password(url):
            problems.append(doc.problem(at, "the state store's URL holds a password written in the config",
                                        "remove the password from the file (and change it if it was committed); "
                                        "write state: {type: postgresql, url: \"${DATABASE_URL}\"} with the whole "
                                        "URL in that environment variable, or give the password in PGPASSWORD"))
            return None
    if not url.lower().startswith(SERVER_SCHEMES):
        problems.append(doc.problem(at, "the state store's URL must start with postgresql:// (from "
                                        f"{ref.describe() if ref else 'the config'})",
                                    "give a URL such as postgresql://runner@db.example.com:5432/runner"))
        return None
    from runner import redact

    redact.register(_url_password(url))
    return url


def _url_password(url: str) -> str | None:
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(url)
        return parts.password or (parse_qs(parts.query).get("password") or [None])[0]
    except ValueError:
        return None


def _secret(doc, value, path, base, resolve, environ, problems) -> str | None:
    ref = secrets.parse_ref(value)
    if ref is None:
        return None
    if not resolve:  # validate without secrets (a fork's pull request): the reference's form only
        if ref.kind == "env" and not _ENV_NAME.match(ref.name):
            problems.append(doc.problem(path, f"'{ref.name}' cannot be the name of an environment variable",
                                        "use letters, digits and _ (not starting with a digit), e.g. "
                                        "\"${DEBITURA_API_KEY}\", or \"${file:path/to/file}\" for a file"))
        return None
    got = secrets.resolve(ref, base, environ)
    if got is None:
        problems.append(secrets.missing_problem(ref, doc, path))
        return None
    bad = secrets.unsendable_problem(ref, got, doc, path)
    if bad is not None:
        problems.append(bad)
    return got


def _destination(doc, raw, base, problems, resolve, environ) -> Destination:
    if raw["type"] == "jsonl":
        p = Path(raw["path"])
        return Destination(type="jsonl", path=p if p.is_absolute() else base / p)
    d = Destination(type="debitura", environment=raw["environment"], base_url=raw.get("base_url"),
                    is_test=bool(raw.get("is_test", False)), tag=raw.get("tag"),
                    allow_pending_contracts=bool(raw.get("allow_pending_contracts", False)),
                    concurrency=int(raw.get("concurrency", 8)), chat_user_email=raw.get("chat_user_email"),
                    chat_user_id=raw.get("chat_user_id"))
    d.api_key = _secret(doc, raw["api_key"], ("destination", "api_key"), base, resolve, environ, d.problems)
    hooks = raw.get("webhooks")
    if hooks is not None:
        d.webhooks = Webhooks(
            mode=hooks.get("mode", "push"), url=hooks.get("url"),
            events=tuple(e for e in WEBHOOK_EVENTS if e in hooks.get("events", WEBHOOK_EVENTS)),
            test_mode=bool(hooks.get("test_mode", d.is_test)), secret_ref=hooks.get("secret"),
            secret=_secret(doc, hooks["secret"], ("destination", "webhooks", "secret"), base, resolve, environ,
                           d.problems) if hooks.get("secret") else None,
            poll_max_requests=int((hooks.get("poll") or {}).get("max_requests", 500)))
    return d


def _connection(doc, raw, p, index, defaults, base, integrations_dir, problems, resolve, environ, now):
    try:
        spec = specs.load_spec(raw["integration"], integrations_dir)
    except KeyError:
        names = ", ".join(sorted(specs.available(integrations_dir)))
        problems.append(doc.problem(p + ("integration",), f"no integration named '{raw['integration']}'",
                                    f"use one of: {names} (or add {raw['integration']}.yaml to integrations.d/)"))
        return None
    except ConfigError as exc:  # the spec itself is broken: report its own file and line
        problems.extend(exc.problems)
        return None
    env = raw.get("environment", spec.default_environment)
    if env not in spec.environments:
        problems.append(doc.problem(p + ("environment",), f"integration '{spec.id}' has no environment '{env}'",
                                    f"use one of: {', '.join(spec.environments)}"))
        return None
    window_raw = raw.get("window") or defaults.get("window")
    if window_raw is None and not spec.pull:  # inbound: what a Zap posts is not limited by date unless asked
        window_raw = {"from": "1970-01-01"}
    if window_raw is None:
        problems.append(doc.problem(p, "no date window for this connection",
                                    "add `window: {last: 90d}` to the connection (or under defaults:)", key=True))
        return None
    where = p + ("window",) if raw.get("window") else ("defaults", "window")
    try:
        window = resolve_window(window_raw, now)
    except WindowError as exc:  # unknown time zone, impossible date: at the key's own line
        problems.append(doc.problem(where + (exc.key,), exc.message, exc.fix))
        return None
    except Exception as exc:  # defensive: anything else the window's values hold
        problems.append(doc.problem(where, f"cannot read the date window: {exc}",
                                    "dates are YYYY-MM-DD, time zones are IANA names like Europe/Copenhagen"))
        return None
    if window.start > window.end:
        problems.append(doc.problem(p + ("window",), "the window starts after it ends", "swap `from` and `to`"))
    conn = Connection(name=raw["name"], integration=spec.id, spec=spec, environment=env,
                      base_url=raw.get("base_url"), credentials={}, credential_refs=dict(raw.get("credentials") or {}),
                      window=window, server_filters=raw.get("server_filters", True),
                      debtor_type=raw.get("debtor_type") or defaults.get("debtor_type") or "Company",
                      account_id=raw.get("account_id"), expect=raw.get("expect") or {},
                      options=_options(doc, spec, raw.get("options") or {}, p, problems),
                      enabled=raw.get("enabled", True), index=index,
                      full_scan_every=specs.interval_seconds(raw.get("full_scan_every") or defaults.get("full_scan_every")
                                                       or "1d"),
                      schedule_every=specs.interval_seconds((raw.get("schedule") or defaults.get("schedule")
                                                             or {"every": "5m"})["every"]))
    if not spec.names_account and not conn.account_id:
        conn.problems.append(doc.problem(
            p, f"integration '{spec.id}' cannot tell which account its invoices come from, and the ledger must "
               f"know it (a connection's name is not used: renaming the connection would import everything again)",
            f"add `account_id: <a stable name for the source, e.g. the app's account or company>` to the "
            f"connection '{conn.name}'", key=True))
    import difflib

    for name in spec.auth.credentials:
        if name not in conn.credential_refs:
            typo = difflib.get_close_matches(name, [k for k in conn.credential_refs
                                                    if k not in spec.auth.credentials], n=1, cutoff=0.7)
            if typo:  # `apikey` for `api_key`: the unknown name is the culprit, at its own line
                conn.problems.append(doc.problem(
                    p + ("credentials", typo[0]), f"unknown credential '{typo[0]}': integration '{spec.id}' "
                    f"needs '{name}'", f"rename `{typo[0]}` to `{name}`", key=True))
                continue
            # Worded so that the redaction of log lines (`api_key: <value>`) cannot mask the advice itself.
            conn.problems.append(doc.problem(
                p, f"integration '{spec.id}' needs the credential '{name}'",
                f"add {name} under `credentials:` of this connection, read from an environment variable "
                f"(${{{(conn.integration + '_' + name).upper()}}}) or a file (${{file:path/to/file}})", key=True))
    for name, ref in conn.credential_refs.items():
        value = _secret(doc, ref, p + ("credentials", name), base, resolve, environ, conn.problems)
        if value is None:
            continue
        conn.credentials[name] = value
        rule = spec.environments[env].credentials.get(name)
        if rule and not rule.matches(value):
            conn.problems.append(doc.problem(p + ("credentials", name), rule.message,
                                             f"use the {env} credential here, or set `environment:` to match the key"))
    return conn


def _test_into_production(doc, conn: Connection, raw: dict, dest: Destination) -> Problem | None:
    """A connection reading an environment of test data (a test-mode API key, a provider's sandbox company)
    must not create real collection cases: refused when the destination is Debitura production without isTest."""
    env = conn.spec.environments[conn.environment]
    if not env.test or env.test_cases or raw.get("allow_test_source"):
        return None
    if dest.type != "debitura" or dest.environment != "production" or dest.is_test:
        return None
    dest_line, _ = doc.mark(("destination", "environment"))
    return doc.problem(
        ("connections", conn.index, "environment"),
        f"the connection '{conn.name}' reads {conn.spec.name}'s {conn.environment} environment, which holds test "
        f"data, but the destination ({doc.file}:{dest_line}) is Debitura production: its debtors would get real "
        f"collection cases",
        "use the connection's live/production environment, or send test cases: `is_test: true` under "
        "destination (or `environment: test`); if this really is real data, set `allow_test_source: true` "
        "on the connection")


def _options(doc, spec, given: dict, p, problems) -> dict:
    out = {}
    for name, decl in spec.options.items():
        if name in given:
            out[name] = given[name]
        elif "default" in decl:
            out[name] = decl["default"]
    for name in given:
        if name not in spec.options:
            problems.append(doc.problem(p + ("options", name), f"integration '{spec.id}' has no option '{name}'",
                                        f"options it knows: {', '.join(spec.options) or 'none'}", key=True))
    return out
