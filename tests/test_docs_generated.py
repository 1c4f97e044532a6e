"""The generated references match a fresh generation, and the tutorial's commands do what it shows."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gen_docs  # noqa: E402


def test_spec_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "spec-reference.md").read_text(encoding="utf-8")
    assert committed == gen_docs.spec_reference(), "docs/spec-reference.md is stale: run python tools/gen_docs.py"


def test_spec_reference_has_every_schema_key_with_an_example():
    import json

    schema = json.loads(gen_docs.SCHEMA.read_text())
    rows: list = []
    gen_docs.walk(schema, schema, "", (), rows)
    text = (ROOT / "docs" / "spec-reference.md").read_text(encoding="utf-8")
    for path, *_ in rows:
        section = text.split(f"### `{path}`\n", 1)
        assert len(section) == 2, f"{path} is not in the reference"
        body = section[1].split("\n### ", 1)[0]
        assert "```yaml\n" in body and "(no example)" not in body, f"{path} has no example"


def test_functions_page_is_generated_and_its_examples_hold():
    # functions_doc() evaluates every example with the engine's expression compiler and stops on a mismatch.
    committed = (ROOT / "docs" / "functions.md").read_text(encoding="utf-8")
    assert committed == gen_docs.functions_doc(), "docs/functions.md is stale: run python tools/gen_docs.py"


def test_a_wrong_function_example_stops_the_generation(monkeypatch):
    monkeypatch.setitem(gen_docs.FUNCTION_EXAMPLES, "upper", [("upper(currency)", {"currency": "usd"}, "usd")])
    with pytest.raises(SystemExit, match="upper"):
        gen_docs.functions_doc()


def test_the_undocumented_list_is_documented():
    ref = (ROOT / "docs" / "spec-reference.md").read_text(encoding="utf-8")
    for words in ("`response` (the decoded answer), `connection`", "Capped at half the token's lifetime",
                  "| `base_url` |", "Jinja's built-in filters", "replaces the request's own",
                  "Default: 1 for `page`", "http://127.0.0.1:<port>/callback", "changed bootstrap refresh token"):
        assert words in ref, words
    assert "## `non_empty`" in (ROOT / "docs" / "functions.md").read_text(encoding="utf-8")


# --- the tutorial ------------------------------------------------------------------------------------------

def _steps(text: str) -> list[tuple[str, str, str]]:
    """("file", path, content) for a ```yaml block that starts with `# file: PATH`, ("console", command,
    shown output) for each `$ ` line of a ```console block, in the order they appear."""
    steps = []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S):
        if lang == "yaml" and body.startswith("# file: "):
            first, _, rest = body.partition("\n")
            steps.append(("file", first[len("# file: "):].strip(), body))
        elif lang == "console":
            command, shown = None, []
            for line in body.splitlines():
                if line.startswith("$ "):
                    if command:
                        steps.append(("console", command, "\n".join(shown)))
                    command, shown = line[2:], []
                else:
                    shown.append(line)
            if command:
                steps.append(("console", command, "\n".join(shown)))
    return steps


def _shown_in(shown: str, output: str) -> None:
    """Every line the tutorial shows is in the output, `...` standing for any text."""
    for line in shown.splitlines():
        if not line.strip() or line.strip() == "...":
            continue
        pattern = ".*?".join(re.escape(part) for part in line.split("..."))
        assert re.search(pattern, output), f"the tutorial shows {line!r}; the command printed:\n{output}"


def test_the_tutorial_runs_as_written(tmp_path):
    text = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
    steps = _steps(text)
    assert sum(1 for kind, command, _ in steps if kind == "console" and command.startswith("runner integrations "))>= 4
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200"}
    for kind, what, content in steps:
        if kind == "file":
            path = tmp_path / what
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            continue
        words = shlex.split(what)
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
            continue
        assert words[0] == "runner", f"the tutorial runs {what!r}: only runner commands and export are run here"
        proc = subprocess.run([sys.executable, "-m", "runner", *words[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        output = proc.stdout + proc.stderr
        # A block that shows a failure (FAIL, error:) expects the command to fail; any other must succeed.
        fails = any(line.startswith(("FAIL ", "error:")) for line in content.splitlines())
        assert (proc.returncode != 0) == fails, f"{what} exited {proc.returncode}:\n{output}"
        _shown_in(content, output)
