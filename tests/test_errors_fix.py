"""Mistakes a new user makes, each told with the file:line of the culprit, what is wrong and the fix.

Each test runs the real `runner validate` on a config with one mistake and asserts the whole message.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from conftest import ROOT, run_cli
except ModuleNotFoundError:  # tests/ as a package
    from tests.conftest import ROOT, run_cli

KEY = '{api_key: "${file:sandbox-secrets/stripe_api_key}"}'
JSONL = "{type: jsonl, path: out.jsonl}"


def config(tmp_path: Path, destination: str = JSONL, credentials: str = KEY, window: str = "{last: 90d}",
           state: str = "state.db") -> Path:
    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets", dirs_exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(f"""state: {state}
destination: {destination}
connections:
  - name: s
    integration: stripe
    environment: sandbox
    credentials: {credentials}
    window: {window}
""")
    return path


def problems(path: Path) -> list[str]:
    r = run_cli("validate", path.name, cwd=path.parent, env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: ")
    return [line.strip() for line in lines[1:]]


def test_a_destination_written_as_a_word_says_to_write_a_block(tmp_path):
    got = problems(config(tmp_path, destination="debitura"))
    assert got == [
        "c.yaml:2:14: must be a block of keys, not text (at destination)",
        "fix: write the destination as a block of keys, as in sample-config.yaml: `type: debitura` with "
        "`environment: production` and the `api_key` reference (${DEBITURA_API_KEY}), or `type: jsonl` with a `path`"]


def test_a_debitura_destination_without_environment_names_the_missing_key(tmp_path):
    got = problems(config(tmp_path, destination='{type: debitura, api_key: "${file:sandbox-secrets/debitura_api_key}"}'))
    assert got == ["c.yaml:2:1: missing required key 'environment' (at destination)",
                   "fix: add `environment:` with one of: production, test, sandbox"]


def test_last_together_with_from_names_both(tmp_path):
    got = problems(config(tmp_path, window="{last: 90d, from: 2026-01-01}"))
    assert got[0] == ("c.yaml:8:25: `last:` and `from:` cannot be used together: each one alone says which dates to "
                      "read (at connections[0].window.from)")
    assert got[1].startswith("fix: keep one of them; use one of `last: 90d`, `from: 2026-01-01`")
    assert "anyOf" not in "\n".join(got)


def test_an_unknown_key_in_state_is_named_with_its_likely_spelling(tmp_path):
    got = problems(config(tmp_path, state="{type: sqlite, keep_run: 10}"))
    assert got == ["c.yaml:1:23: unknown key 'keep_run' (at state.keep_run)", "fix: did you mean 'keep_runs'?"]


def test_a_window_typo_suggests_the_key_meant(tmp_path):
    got = problems(config(tmp_path, window="{from: 2026-01-01, too: 2026-02-01}"))
    assert got == ["c.yaml:8:32: unknown key 'too' (at connections[0].window.too)", "fix: did you mean 'to'?"]


def test_a_misspelt_credential_is_named_and_the_fix_is_not_garbled(tmp_path):
    got = problems(config(tmp_path, credentials='{apikey: "${file:sandbox-secrets/stripe_api_key}"}'))
    assert got == ["c.yaml:7:19: unknown credential 'apikey': integration 'stripe' needs 'api_key' "
                   "(at connections[0].credentials.apikey)", "fix: rename `apikey` to `api_key`"]


def test_a_missing_credential_fix_survives_redaction(tmp_path):
    got = problems(config(tmp_path, credentials='{token: "${file:sandbox-secrets/stripe_api_key}"}'))
    assert got == ["c.yaml:4:5: integration 'stripe' needs the credential 'api_key' (at connections[0])",
                   "fix: add api_key under `credentials:` of this connection, read from an environment variable "
                   "(${STRIPE_API_KEY}) or a file (${file:path/to/file})"]


def test_a_misspelt_time_zone_points_at_it_and_suggests_the_real_name(tmp_path):
    got = problems(config(tmp_path, window="{from: 2026-01-01, timezone: Europe/Copenhagn}"))
    assert got == ["c.yaml:8:42: 'Europe/Copenhagn' is not a time zone the runner knows "
                   "(at connections[0].window.timezone)", "fix: did you mean 'Europe/Copenhagen'?"]


def test_an_impossible_date_says_which_and_why(tmp_path):
    got = problems(config(tmp_path, window="{from: 2026-01-01, to: 2026-11-31}"))
    assert got == ["c.yaml:8:36: `to: 2026-11-31` is not a real date: November 2026 has 30 days "
                   "(at connections[0].window.to)",
                   "fix: write a date that exists, as YYYY-MM-DD (the last day of that month is 2026-11-30)"]


def test_to_without_from_is_explained(tmp_path):
    got = problems(config(tmp_path, window="{last: 90d, to: 2026-02-01}"))
    assert got[0] == "c.yaml:8:25: `to:` needs `from:` beside it (at connections[0].window.to)"


def test_a_bad_indentation_is_explained_in_plain_words(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("state: state.db\ndestination: {type: jsonl, path: out.jsonl}\nconnections:\n  - name: s\n"
                    "    integration: stripe\n   environment: sandbox\n")
    got = problems(path)
    assert got == ["c.yaml:6:4: the indentation of line 6 (`environment: sandbox`, 3 spaces) matches no block above "
                   "it: the keys of the blocks above start at 4 or 0 spaces",
                   "fix: indent it by 4 spaces to continue the block above it (or by 0 to end that block); every key "
                   "of a block starts in the same column"]


def test_a_tab_in_the_indentation_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("state: state.db\ndestination:\n\ttype: jsonl\n")
    assert problems(path) == ["c.yaml:3:1: line 3 is indented with a tab character; YAML indents with spaces only",
                              "fix: replace the tab at the start of the line with spaces, as on the lines above"]


def test_output_cut_short_by_a_closed_pipe_ends_quietly(tmp_path):
    """`runner validate big.yaml | head -1`: the reader leaves; no "bug" message, no traceback."""
    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    lines = ["state: state.db", "destination: {type: jsonl, path: out.jsonl}", "connections:"]
    lines += [f'  - {{name: s{i}, integration: stripe, environment: sandbox, credentials: {KEY}, '
              f'window: {{last: 90d}}}}' for i in range(3000)]  # far more output than a pipe holds
    (tmp_path / "big.yaml").write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "runner", "validate", "big.yaml"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().startswith(b"big.yaml: valid")
    proc.stdout.close()  # as `head -1` does once it has its line
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 1
    assert err == ""
    if shutil.which("sh") and shutil.which("head"):
        r = subprocess.run(["sh", "-c", f"{sys.executable} -m runner validate big.yaml | head -1"], cwd=tmp_path,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.stdout.startswith("big.yaml: valid") and r.stdout.count("\n") == 1
        assert "Error" not in r.stderr and "bug" not in r.stderr
