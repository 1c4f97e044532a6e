"""Calendar windows: `last: 1q`, `previous:`/`current:` month, quarter or year, `since:`, read in the window's
time zone, at the boundaries where they go wrong (year change, quarter ends, DST changes)."""
from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from runner.spec.config import resolve_window

try:
    from conftest import ROOT, run_cli
except ModuleNotFoundError:  # tests/ as a package
    from tests.conftest import ROOT, run_cli

CPH = ZoneInfo("Europe/Copenhagen")
NY = ZoneInfo("America/New_York")


def local(w, zone):
    return (w.start.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S"), w.end.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S"))


@pytest.mark.parametrize("raw,now,start,end", [
    # The first quarter of a year: the previous quarter is the last one of the year before.
    ({"previous": "quarter"}, datetime(2026, 2, 10, 12, tzinfo=timezone.utc), "2025-10-01 00:00:00", "2025-12-31 23:59:59"),
    ({"previous": "quarter"}, datetime(2026, 5, 10, 12, tzinfo=timezone.utc), "2026-01-01 00:00:00", "2026-03-31 23:59:59"),
    ({"previous": "month"}, datetime(2026, 1, 1, 0, 0, tzinfo=timezone.utc), "2025-12-01 00:00:00", "2025-12-31 23:59:59"),
    ({"previous": "month"}, datetime(2026, 3, 15, tzinfo=timezone.utc), "2026-02-01 00:00:00", "2026-02-28 23:59:59"),
    ({"previous": "month"}, datetime(2024, 3, 15, tzinfo=timezone.utc), "2024-02-01 00:00:00", "2024-02-29 23:59:59"),
    ({"previous": "year"}, datetime(2026, 1, 1, 0, 0, 1, tzinfo=timezone.utc), "2025-01-01 00:00:00", "2025-12-31 23:59:59"),
    ({"current": "quarter"}, datetime(2026, 9, 30, 23, 59, tzinfo=timezone.utc), "2026-07-01 00:00:00", "2026-09-30 23:59:00"),
    ({"current": "quarter"}, datetime(2026, 10, 1, 0, 0, tzinfo=timezone.utc), "2026-10-01 00:00:00", "2026-10-01 00:00:00"),
    ({"current": "month"}, datetime(2026, 12, 31, 18, tzinfo=timezone.utc), "2026-12-01 00:00:00", "2026-12-31 18:00:00"),
    ({"current": "year"}, datetime(2026, 6, 1, tzinfo=timezone.utc), "2026-01-01 00:00:00", "2026-06-01 00:00:00"),
    ({"last": "1q"}, datetime(2026, 5, 31, 10, tzinfo=timezone.utc), "2026-02-28 10:00:00", "2026-05-31 10:00:00"),
    ({"last": "2q"}, datetime(2026, 1, 15, tzinfo=timezone.utc), "2025-07-15 00:00:00", "2026-01-15 00:00:00"),
    ({"since": "2026-03-01"}, datetime(2026, 4, 2, 8, tzinfo=timezone.utc), "2026-03-01 00:00:00", "2026-04-02 08:00:00"),
])
def test_calendar_windows_in_utc(raw, now, start, end):
    assert local(resolve_window(raw, now), timezone.utc) == (start, end)


def test_the_year_changes_in_the_connection_zone_before_it_does_in_utc():
    # 23:30 UTC on New Year's Eve is already 00:30 on 1 January in Copenhagen: last year is complete there.
    now = datetime(2025, 12, 31, 23, 30, tzinfo=timezone.utc)
    w = resolve_window({"previous": "year", "timezone": "Europe/Copenhagen"}, now)
    assert local(w, CPH) == ("2025-01-01 00:00:00", "2025-12-31 23:59:59")
    assert w.start == datetime(2024, 12, 31, 23, 0, tzinfo=timezone.utc)  # midnight in Copenhagen, in UTC
    assert local(resolve_window({"previous": "year"}, now), timezone.utc)[0] == "2024-01-01 00:00:00"
    cur = resolve_window({"current": "month", "timezone": "Europe/Copenhagen"}, now)
    assert local(cur, CPH)[0] == "2026-01-01 00:00:00"


def test_a_month_with_a_dst_change_has_its_true_length():
    # March 2026: Copenhagen moves from +01:00 to +02:00 on the 29th; the month is 31 days less one hour.
    w = resolve_window({"previous": "month", "timezone": "Europe/Copenhagen"}, datetime(2026, 4, 10, tzinfo=timezone.utc))
    assert local(w, CPH) == ("2026-03-01 00:00:00", "2026-03-31 23:59:59")
    assert w.start.utcoffset().total_seconds() == 3600 and w.end.utcoffset().total_seconds() == 7200
    utc = timezone.utc  # (aware datetimes of one zone subtract as wall-clock times: compare in UTC)
    assert round((w.end.astimezone(utc) - w.start.astimezone(utc)).total_seconds()) == 31 * 86400 - 3600
    # November in New York gains the hour back.
    nov = resolve_window({"previous": "month", "timezone": "America/New_York"}, datetime(2026, 12, 2, 12, tzinfo=timezone.utc))
    assert local(nov, NY) == ("2026-11-01 00:00:00", "2026-11-30 23:59:59")
    assert round((nov.end.astimezone(utc) - nov.start.astimezone(utc)).total_seconds()) == 30 * 86400 + 3600


def test_quarter_boundaries_in_a_zone():
    for month, first in ((1, "01"), (3, "01"), (4, "04"), (6, "04"), (7, "07"), (9, "07"), (10, "10"), (12, "10")):
        now = datetime(2026, month, 15, 12, tzinfo=CPH)
        w = resolve_window({"current": "quarter", "timezone": "Europe/Copenhagen"}, now)
        assert local(w, CPH)[0] == f"2026-{first}-01 00:00:00"


def test_windows_in_a_config_validate_and_are_shown(tmp_path):
    import shutil

    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    (tmp_path / "c.yaml").write_text("""destination: {type: jsonl, path: out.jsonl}
connections:
""" + "".join(f"""  - name: s{i}
    integration: stripe
    environment: sandbox
    credentials: {{api_key: "${{file:sandbox-secrets/stripe_api_key}}"}}
    window: {w}
""" for i, w in enumerate(["{previous: quarter, timezone: Europe/Copenhagen}", "{current: month}", "{last: 1q}",
                           "{since: 2026-01-01}"])))
    r = run_cli("validate", "c.yaml", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "(previous quarter)" in r.stdout and "(current month)" in r.stdout and "(last 1q)" in r.stdout
    assert "(since 2026-01-01)" in r.stdout and "CEST" in r.stdout


def test_two_kinds_of_window_at_once_are_refused(tmp_path):
    import shutil

    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    (tmp_path / "c.yaml").write_text("""destination: {type: jsonl, path: out.jsonl}
connections:
  - name: s
    integration: stripe
    environment: sandbox
    credentials: {api_key: "${file:sandbox-secrets/stripe_api_key}"}
    window: {previous: quarter, since: 2026-01-01}
""")
    r = run_cli("validate", "c.yaml", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert "`since:` and `previous:` cannot be used together" in r.stderr
