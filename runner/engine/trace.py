"""What a spec does with one connection, request by request: the authoring kit's engine.

`walk` runs a connection's Source (the same code as `runner plan`: auth, account, pages, mapping, verdicts)
and reports every request the HTTP layer sends and every answer's shape through `runner.net.http.OBSERVERS`;
`spec_test` replays a recording (runner.engine.recording) and compares the verdicts with the author's
expectations.
"""
from __future__ import annotations

import contextlib
import datetime
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from runner import redact
from runner.engine.pipeline import Source
from runner.net import http as http_mod
from runner.spec.config import Connection

# Request headers shown by name only: what they carry is a credential whatever its shape.
SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "apikey"}


@dataclass
class Step:
    method: str
    url: str
    headers: dict
    status: int
    shape: dict


@dataclass
class Walk:
    source: Source
    steps: list[Step] = field(default_factory=list)
    records: list[tuple[Any, Any, dict | None]] = field(default_factory=list)  # (record, verdict, mapped)


def shown_url(url: str) -> str:
    """A URL with its secrets masked (registered values, and parameters named like keys)."""
    s = urlsplit(url)
    pairs = [(k, redact.MASK if any(w in k.lower() for w in ("key", "token", "secret", "password")) else v)
             for k, v in parse_qsl(s.query, keep_blank_values=True)]
    return redact.redact(urlunsplit((s.scheme, s.netloc, s.path, urlencode(pairs, safe="[]:,"), "")))


def shown_headers(headers: dict) -> dict:
    out = {}
    for k, v in headers.items():
        secret = k.lower() in SECRET_HEADERS or any(w in k.lower() for w in ("token", "secret", "key", "auth"))
        out[k] = redact.MASK if secret else redact.redact(str(v))
    return out


def shape(source: Source | None, body: Any) -> dict:
    """The answer in a few facts: its top-level keys, how many records the spec finds in it, and what the
    paginator reads from it."""
    out: dict[str, Any] = {}
    if isinstance(body, dict):
        out["keys"] = list(body)[:20]
    elif isinstance(body, list):
        out["list_of"] = len(body)
    if source is not None and body is not None:
        with contextlib.suppress(Exception):
            records = source.stream.page_records(body)
            out["records"] = len(records)
            from runner.engine import pagination

            facts = pagination.facts(source.stream.paginate, body, records)
            out["paging"] = {k: getattr(facts, k) for k in ("more", "value") if getattr(facts, k) not in (None, "")}
    return out


def mapped(source: Source, rec: Any) -> dict | None:
    """The canonical invoice the spec maps a record to (also for a record the verdict skips)."""
    c = source.classifier()
    try:
        return c._map(source.stream.prepare(rec))
    except Exception:  # noqa: BLE001 - the verdict says what failed
        return None


async def walk(conn: Connection, clients, store, *, limit: int | None = None,
               today: datetime.date | None = None, on_step: Callable[[Step], None] | None = None) -> Walk:
    source = Source(conn, clients, store)
    if today is not None:  # a recording's verdicts are those of the day it was made
        source.today, source.today_iso = today, today.isoformat()
    result = Walk(source)
    tail = _list_tail(conn)

    def observe(method, url, headers, resp):
        body = None
        with contextlib.suppress(Exception):
            body = orjson.loads(resp.content) if resp.content else None
        is_page = bool(tail) and urlsplit(url).path.endswith("/" + tail)
        step = Step(method, shown_url(url), shown_headers(headers), resp.status, shape(source if is_page else None, body))
        result.steps.append(step)
        if on_step is not None:
            on_step(step)

    http_mod.OBSERVERS.append(observe)
    try:
        await source.open()
        pages = source.pages()
        try:
            async for records in pages:
                for rec in records:
                    result.records.append((rec, source.evaluate(rec), mapped(source, rec)))
                    if limit is not None and len(result.records) >= limit:
                        return result
        finally:
            await pages.aclose()
    finally:
        http_mod.OBSERVERS.remove(observe)
    return result


def _list_tail(conn: Connection) -> str:
    """The last segment of the invoice list's path: which answers are pages of invoices."""
    raw = (conn.spec.raw.get("invoices") or {}).get("request") or {}
    path = str(raw.get("path", "")).split("?", 1)[0]
    return path.rsplit("/", 1)[-1] if "{" not in path.rsplit("/", 1)[-1] else ""


# --- spec tests --------------------------------------------------------------------------------------------

def replay_config(spec_path: Path, spec_id: str, expected: dict, workdir: Path) -> Path:
    """A config with one connection to the spec, whose credentials are the recording's stand-ins."""
    import yaml

    conn = dict(expected.get("connection") or {})
    creds = {}
    for name, value in (conn.pop("credentials", None) or {}).items():
        (workdir / f"cred-{name}").write_text(str(value))
        creds[name] = f"${{file:cred-{name}}}"
    cfg = {"version": 1, "state": "state.db", "integrations_dir": str(spec_path.parent.resolve()),
           "destination": {"type": "jsonl", "path": "cases.jsonl"},
           "connections": [{"name": "replay", "integration": spec_id, **conn, "credentials": creds}]}
    cfg["connections"][0].setdefault("window", {"from": "2000-01-01"})
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Outcome:
    problems: list[str]
    checked: int
    failed: int
    seen: int
    unmatched: list[str]


def compare(expected: dict, w: Walk) -> tuple[list[str], int, int]:
    """Every way the walk differs from what the author expects: a verdict, a reason, a mapped field."""
    problems: list[str] = []
    failed: set[str] = set()
    want = expected.get("invoices") or {}
    got = {v.invoice_id: (v, inv) for _, v, inv in w.records}
    for inv_id, exp in want.items():
        inv_id = str(inv_id)
        if inv_id not in got:
            problems.append(f"{inv_id}: expected, but the spec found no such invoice in the recorded answers")
            failed.add(inv_id)
            continue
        before = len(problems)
        v, inv = got[inv_id]
        exp = exp if isinstance(exp, dict) else {"verdict": exp}
        if "verdict" in exp and exp["verdict"] != v.verdict:
            problems.append(f"{inv_id}: verdict {v.verdict} ({v.reason}: {v.message}), expected {exp['verdict']}")
        if "reason" in exp and exp["reason"] != v.reason:
            problems.append(f"{inv_id}: reason {v.reason} ({v.message}), expected {exp['reason']}")
        for path, value in (exp.get("fields") or {}).items():
            actual = _dig(inv, path)
            if not same(actual, value):
                problems.append(f"{inv_id}: {path} is {plain(actual)!r}, expected {plain(value)!r}")
        if len(problems) > before:
            failed.add(inv_id)
    if expected.get("all_listed") and set(got) - {str(k) for k in want}:
        extra = sorted(set(got) - {str(k) for k in want})
        problems.append(f"invoices not in the expectations: {', '.join(extra[:10])}")
    return problems, len(want), len(failed)


def plain(v: Any) -> Any:
    """A mapped value as YAML writes and reads it: a Decimal as its text, a date as ISO."""
    import decimal

    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (datetime.date, datetime.datetime)):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def same(actual: Any, wanted: Any) -> bool:
    import decimal

    if isinstance(actual, decimal.Decimal) and isinstance(wanted, (int, float, str)) and not isinstance(wanted, bool):
        try:
            return actual == decimal.Decimal(str(wanted))
        except decimal.InvalidOperation:
            return False
    return plain(actual) == plain(wanted)


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


async def spec_test(spec_path: Path, spec_id: str, fixtures: Path) -> Outcome:
    from runner.engine import recording
    from runner.spec import config as config_mod
    from runner.state.sqlite import Store

    expected = recording.load_yaml(fixtures / recording.EXPECTED) or {}
    exchanges = recording.load_yaml(fixtures / recording.RESPONSES) or []
    today = expected.get("today")
    if isinstance(today, str):
        today = datetime.date.fromisoformat(today)
    with tempfile.TemporaryDirectory(prefix="runner-spec-test-") as tmp:
        cfg = config_mod.load(replay_config(spec_path, spec_id, expected, Path(tmp)))
        clients = recording.ReplayClients(exchanges)
        store = Store(cfg.state_path)
        try:
            # A recording made with --limit stops where it stopped: the pages after it were never fetched.
            w = await walk(cfg.connections[0], clients, store, today=today, limit=expected.get("limit"))
        finally:
            store.close()
            await clients.aclose()
    problems, checked, failed = compare(expected, w)
    return Outcome(problems, checked, failed, len(w.records), clients.replay.unmatched)


async def record(conn: Connection, store, spec_path: Path, fixtures: Path, *, limit: int | None = None) -> Walk:
    """Run the connection through RecordingClients and write its answers (and, the first time, expectations
    from its verdicts for the author to review) into the fixtures folder."""
    from runner.engine import recording

    clients = recording.RecordingClients()
    try:
        w = await walk(conn, clients, store, limit=limit)
    finally:
        await clients.aclose()
    fixtures.mkdir(parents=True, exist_ok=True)
    recording.dump_yaml(clients.exchanges, fixtures / recording.RESPONSES,
                        "# Recorded by `runner integrations test --record`: the provider's answers with secrets masked\n"
                        "# and personal data replaced by stable fakes. Replayed by `runner integrations test`.\n")
    exp_path = fixtures / recording.EXPECTED
    if not exp_path.exists():
        recording.dump_yaml({**expectations(conn, w), **({"limit": limit} if limit else {})}, exp_path,
                            "# What `runner integrations test` checks: written from the recorded run's verdicts.\n"
                            "# Review every line: it is what the spec should do, not only what it does today.\n")
    return w


def stand_in(conn: Connection, name: str) -> str:
    """A credential for replays: the start the environment requires (sk_test_...) and no secret."""
    rule = conn.spec.environments[conn.environment].credentials.get(name)
    fake = "replayed"
    if rule is not None:
        import re

        value = conn.credentials.get(name, "")
        m = re.match(rule.pattern.lstrip("^"), value)
        # Only a short fixed start (sk_test_): a pattern matching the whole key would copy the key.
        head = m.group(0) if m and len(m.group(0)) <= 10 and 2 * len(m.group(0)) <= len(value) else ""
        fake = head + "replayed" if rule.matches(head + "replayed") else fake
    return fake


def expectations(conn: Connection, w: Walk) -> dict:
    out: dict[str, Any] = {
        "today": w.source.today_iso,
        "connection": {"environment": conn.environment,
                       "credentials": {n: stand_in(conn, n) for n in dict.fromkeys([*conn.spec.auth.credentials,
                                                                                     *conn.credential_refs])},
                       **({"options": dict(w.source.options)} if w.source.options else {}),
                       "window": {"from": conn.window.start_date.isoformat(), "to": conn.window.end_date.isoformat(),
                                  "timezone": conn.window.tz},
                       "server_filters": conn.server_filters},
        "invoices": {}}
    if conn.account_id:
        out["connection"]["account_id"] = conn.account_id
    for _, v, inv in w.records:
        entry: dict[str, Any] = {"verdict": v.verdict}
        if v.reason:
            entry["reason"] = v.reason
        if inv:
            entry["fields"] = {k: plain(inv.get(k)) for k in ("number", "amount", "currency", "due_date") if k in inv}
        out["invoices"][v.invoice_id] = entry
    return out
