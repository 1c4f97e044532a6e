"""`runner integrations`: lists every built-in spec and shows one."""
from __future__ import annotations

import json

from conftest import run_cli


def test_list_and_show():
    r = run_cli("integrations", "--output", "json")
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert rows["stripe"]["auth"] == "api_key"
    assert rows["stripe"]["environments"] == ["live", "test", "sandbox"]
    assert all("error" not in row for row in rows.values()), rows
    shown = run_cli("integrations", "stripe")
    assert shown.returncode == 0 and "starting_after" in shown.stdout
    missing = run_cli("integrations", "nope")
    assert missing.returncode == 2 and "stripe" in missing.stderr
