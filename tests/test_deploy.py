"""Every `runner ...` command in deploy/ and docs/worker.md is a real command of the CLI, with real options."""
from __future__ import annotations

import re
import shlex

import pytest
import yaml

try:
    from tests.conftest import ROOT, run_cli
except ImportError:  # tests/ without __init__.py
    from conftest import ROOT, run_cli

FILES = sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file()) + [ROOT / "docs" / "worker.md"]
MENTION = re.compile(r"(?<![\w.-])runner ([a-z][^\n`#\"\]]*)")


def _code(path) -> str:
    """The text that can hold commands: all of a deploy file; a Markdown page's code spans and blocks."""
    text = path.read_text()
    if path.suffix != ".md":
        return text
    return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text))


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in FILES:
        where = str(path.relative_to(ROOT))
        if path.suffix in (".yaml", ".yml"):  # container commands: ["runner", "worker", ...]
            def walk(node):
                if isinstance(node, list) and node and node[0] == "runner":
                    found.append((where, [str(x) for x in node[1:]]))
                elif isinstance(node, dict):
                    for v in node.values():
                        walk(v)
                elif isinstance(node, list):
                    for v in node:
                        walk(v)
            for doc in yaml.safe_load_all(path.read_text()):
                walk(doc)
        for m in MENTION.finditer(_code(path)):
            args = shlex.split(m.group(1).replace("\\", " "))
            found.append((where, args))
    return found


def _path(args: list[str]) -> list[str]:
    """The command's words (`state migrate`), up to its first argument or option."""
    out = []
    for a in args:
        if not re.fullmatch(r"[a-z][a-z-]*", a):
            break
        out.append(a)
    return out


COMMANDS = _commands()


def test_the_deploy_files_name_commands():
    names = {" ".join(_path(args)) for _, args in COMMANDS}
    assert {"worker", "apply", "validate"} <= names, names


@pytest.mark.parametrize("where,args", COMMANDS, ids=[f"{w}:{' '.join(a)[:40]}" for w, a in COMMANDS])
def test_every_command_is_real(where, args):
    path = _path(args)
    assert path, f"{where}: `runner {' '.join(args)}` names no command"
    r = run_cli(*path, "--help")
    if r.returncode != 0 and len(path) > 1:  # `runner worker config` is a command and an argument
        path = path[:1]
        r = run_cli(*path, "--help")
    assert r.returncode == 0, f"{where}: `runner {' '.join(path)}` is not a command: {r.stderr}"
    for opt in (a.split("=")[0] for a in args if a.startswith("--")):
        assert opt in r.stdout, f"{where}: `runner {' '.join(path)}` has no option {opt}"
