"""Fuzz: generated hostile configs and specs through the real CLI, with a memory limit and a timeout (issue 19).

Each case is a workspace (a config beside a spec, the sandbox's secrets) made hostile in one way: anchors and
aliases that multiply or loop, files too large or too dense, blocks nested deep, templates that loop or grow,
credential patterns that backtrack, secrets and configs that are devices or pipes, random damage. `runner
validate` (or `plan`, for templates, which only a run renders) must answer within the timeout and the memory
limit, exit 2 (config or spec invalid) with a message, and never print a traceback or "bug in the runner".

The cases are drawn from a seeded generator, a bounded number per run; a failing case names its seed:
RUNNER_FUZZ_SEED=<seed> python -m pytest tests/test_hostile_fuzz.py reproduces it.
"""
from __future__ import annotations

import functools
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from conftest import ROOT
from test_hostile_bounds import CONFIG, limit_memory  # the same config, and the same 1 GiB bound

SEED = int(os.environ.get("RUNNER_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
CASES = 40  # about 0.5 s each: the whole file stays well under a minute
TIMEOUT = 30
SPEC = (ROOT / "integrations.d" / "stripe.yaml").read_text()


@dataclass
class Case:
    kind: str
    config: str = CONFIG
    spec: str = SPEC
    command: str = "validate"
    exits: tuple = (2,)  # what the case may end with
    special: dict = field(default_factory=dict)  # relative path -> "fifo" | a path to link to
    files: dict = field(default_factory=dict)  # relative path -> bytes


def _indent(text: str, by: str = "  ") -> str:
    return "".join(by + line + "\n" for line in text.splitlines())


def _in_config(rnd: random.Random, block: str) -> str:
    """A hostile block under an unknown key of the config (YAML reads it before the schema could refuse it)."""
    return CONFIG + f"x_{rnd.randrange(100)}:\n" + _indent(block)


def _in_spec(rnd: random.Random, block: str) -> str:
    return SPEC + f"x_{rnd.randrange(100)}:\n" + _indent(block)


def _place(rnd: random.Random, case: Case, block: str) -> Case:
    if rnd.random() < 0.5:
        case.config = _in_config(rnd, block)
    else:
        case.spec = _in_spec(rnd, block)
    return case


def aliases(rnd: random.Random) -> Case:
    fan, levels = rnd.randint(3, 12), rnd.randint(6, 12)
    flow = rnd.random() < 0.5
    text = "a0: &a0 [" + ", ".join(['"lol"'] * fan) + "]\n"
    for i in range(1, levels):
        items = [f"*a{i - 1}"] * fan
        text += (f"a{i}: &a{i} [" + ", ".join(items) + "]\n") if flow else (
            f"a{i}: &a{i}\n" + "".join(f"  - {x}\n" for x in items))
    if rnd.random() < 0.3:  # mappings instead of lists
        text = text.replace("[", "{").replace("]", "}")
        text = "".join(line if "{" not in line else _keyed(line) for line in text.splitlines(True))
    return _place(rnd, Case("aliases"), text)


def _keyed(line: str) -> str:
    head, body = line.split("{", 1)
    items = body.rstrip("}\n").split(", ")
    return head + "{" + ", ".join(f"k{j}: {v}" for j, v in enumerate(items)) + "}\n"


def recursive_alias(rnd: random.Random) -> Case:
    text = rnd.choice(["r: &r [*r]", "r: &r {a: *r}", "r: &r [1, [2, {b: *r}]]", "r: &r {<<: *r, a: 1}",
                       "r: &r {a: 1, b: [*r]}", "r: &r\n  - *r", "a: &a [1]\nb: {? *a : 1}",
                       "a: &a {x: 1}\nb: &b {<<: [*a, *b]}"])
    return _place(rnd, Case("recursive alias"), text)


def merge_keys(rnd: random.Random) -> Case:
    fan = rnd.randint(2, 10)
    text = "m0: &m0 {" + ", ".join(f"k{j}: {j}" for j in range(fan)) + "}\n"
    for i in range(1, rnd.randint(3, 9)):
        text += f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * fan) + f"], z{i}: 1}}\n"
    return _place(rnd, Case("merge keys"), text)


def size(rnd: random.Random) -> Case:
    choice = rnd.choice(["dense", "long string", "many keys", "over the limit", "just under the limit"])
    if choice == "dense":
        block = "v: [" + "1," * rnd.randint(150_000, 400_000) + "1]"
    elif choice == "long string":
        block = "v: \"" + "x" * rnd.randint(500_000, 1_900_000) + "\""
    elif choice == "many keys":
        block = "".join(f"k{i}: {i}\n" for i in range(rnd.randint(100_000, 200_000)))
    elif choice == "over the limit":
        block = "v: [" + "1," * rnd.randint(1_100_000, 3_000_000) + "1]"
    else:
        block = "v: \"" + "x" * (2 * 1024 * 1024 - len(CONFIG) - 200) + "\""
    case = Case(f"size: {choice}")
    return _place(rnd, case, block)


def nesting(rnd: random.Random) -> Case:
    depth = rnd.choice([rnd.randint(40, 80), rnd.randint(500, 999), rnd.randint(1000, 20_000)])
    if rnd.random() < 0.5:
        opener, closer = rnd.choice([("[", "]"), ("{a: ", "}")])
        block = "v: " + opener * depth + "1" + closer * depth
    else:
        block = "".join(" " * i + f"k{i}:\n" for i in range(min(depth, 3000))) + " " * min(depth, 3000) + "1"
    return _place(rnd, Case(f"nesting {depth}"), block)


TEMPLATE_ATOMS = [
    "{% for i in range(N) %}{% for j in range(N) %}{{ i }}{% endfor %}{% endfor %}",
    "{{ 'x' * N * N }}", "{{ ['x'] * N * N }}", "{{ 'ab' | center(N * N) }}", "{{ 'a'.ljust(N * N) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s * 2 %}{% endfor %}{{ ns.s }}",
    "{{ '%' ~ (N * N) ~ 's' }}", "{{ ('%' ~ (N * N) ~ 's') % 1 }}", "{{ ('{:>' ~ (N * N) ~ '}').format(1) }}",
    "{{ 2 ** (N * N) }}", "{{ range(N) | map('string') | join('x' * N) }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(N) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% set s = 'x' * N %}{{ s.replace('x', s) }}", "{{ (range(N) | list) | batch(N * N, 'x') | list }}",
    "{% for i in range(N) %}" + "y" * 4000 + "{% endfor %}", "{{ 'x\n' * N | indent(N) }}",
    "{{ lipsum(N, false, N, N) }}", "{% for x in range(3) recursive %}{{ loop(range(N)) }}{% endfor %}",
    "{{ window.start | unix }}",
]


def template(rnd: random.Random) -> Case:
    source = "".join(rnd.choice(TEMPLATE_ATOMS) for _ in range(rnd.randint(1, 2)))
    source = source.replace("N", str(rnd.choice([60, 1000, 10_000, 100_000, 3_000_000])))
    where = rnd.choice(["limit", "path"])
    quoted = source.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    spec = SPEC.replace('      limit: "100"\n', f'      limit: "{quoted}"\n', 1) if where == "limit" else \
        SPEC.replace("    path: /v1/invoices\n", f'    path: "/v1/invoices{quoted}"\n', 1)
    # A template only runs in a run: `plan` ends with the connection failed (1) naming the bound, or, for the
    # few that fit the bounds, a request the simulator refuses or answers (0/1); a refused one is 2.
    return Case(f"template {source[:50]!r}", spec=spec, command="plan", exits=(0, 1, 2))


PATTERNS = ["^(a+)+$", "^(a|a)*$", "^(a|aa)+$", "(x+x+)+y", "^(\\w+\\s?)*$", "(.*a){20}", "^([a-z]+)*[0-9]$",
            "(a)\\1", "^(?=sk_)sk", "(?<!x)sk", "(?P<k>a)(?P=k)", "[", "a{2,1}", "(?i)^SK_TEST_", "^(sk|rk)_test_"]


def pattern(rnd: random.Random) -> Case:
    pat = rnd.choice(PATTERNS)
    quoted = pat.replace("\\", "\\\\").replace('"', '\\"')
    case = Case(f"pattern {pat}", spec=SPEC.replace('"^(sk|rk)_test_"', f'"{quoted}"'),
                config=CONFIG.replace("sandbox-secrets/stripe_api_key", "key.txt"))
    key = rnd.choice(["a" * 40 + "!", "x" * 5000 + "y", "ab " * 2000 + "!", "sk_test_" + "a" * 30])
    case.files["key.txt"] = key.encode()
    case.exits = (0, 2)  # a key the pattern accepts is valid
    return case


def special_file(rnd: random.Random) -> Case:
    what = rnd.choice(["/dev/zero", "/dev/urandom", "/dev/null", "fifo secret", "folder secret", "big secret",
                       "binary secret", "fifo config", "device config", "fifo spec", "folder spec"])
    case = Case(f"special file: {what}")
    if what.startswith("/dev/"):
        case.config = CONFIG.replace("sandbox-secrets/stripe_api_key", what)
    elif what == "fifo secret":
        case.config = CONFIG.replace("sandbox-secrets/stripe_api_key", "key.fifo")
        case.special["key.fifo"] = "fifo"
    elif what == "folder secret":
        case.config = CONFIG.replace("sandbox-secrets/stripe_api_key", "integrations.d")
    elif what == "big secret":
        case.config = CONFIG.replace("sandbox-secrets/stripe_api_key", "key.txt")
        case.files["key.txt"] = b"sk_test_" + b"a" * rnd.randint(70_000, 5_000_000)
    elif what == "binary secret":
        case.config = CONFIG.replace("sandbox-secrets/stripe_api_key", "key.txt")
        case.files["key.txt"] = bytes(rnd.randrange(256) for _ in range(rnd.randint(10, 5000)))
    elif what == "fifo config":
        case.special["config.yaml"] = "fifo"
    elif what == "device config":
        case.special["config.yaml"] = rnd.choice(["/dev/zero", "/dev/urandom"])
    elif what == "fifo spec":
        case.special["integrations.d/stripe.yaml"] = "fifo"
    else:
        case.special["integrations.d/stripe.yaml"] = "folder"
    return case


DAMAGE = ["&a ", "*a ", "*nope ", "<<: *a\n", "!!python/object:os.system ", "!!binary ", "? ", "- ", ": ", "{", "[",
          "\t", "\x00", "\ufeff", "'", '"', "{{", "{% for", "%", "|\n", ">-\n", "&a [*a]", "!!set ", "!!omap "]


def damage(rnd: random.Random) -> Case:
    """Random damage to a good config or spec: hostile YAML fragments inserted at random places."""
    case = Case("random damage", exits=(0, 2))
    target = rnd.choice(["config", "spec"])
    text = case.config if target == "config" else case.spec
    for _ in range(rnd.randint(1, 6)):
        at = rnd.randrange(len(text))
        text = text[:at] + rnd.choice(DAMAGE) + text[at:]
    setattr(case, target, text)
    return case


KINDS = [aliases, recursive_alias, merge_keys, size, nesting, template, template, pattern, special_file,
         special_file, damage, damage]


@functools.cache
def generate(seed: int, n: int) -> list[Case]:
    rnd = random.Random(seed)
    # Every kind at least once, then drawn at random.
    kinds = KINDS + [rnd.choice(KINDS) for _ in range(max(0, n - len(KINDS)))]
    return [kind(rnd) for kind in kinds[:n]]


def _workspace(tmp, case: Case):
    shutil.copytree(ROOT / "sandbox-secrets", tmp / "sandbox-secrets")
    (tmp / "integrations.d").mkdir()
    (tmp / "config.yaml").write_text(case.config)
    (tmp / "integrations.d" / "stripe.yaml").write_text(case.spec)
    for rel, data in case.files.items():
        (tmp / rel).write_bytes(data)
    for rel, what in case.special.items():
        target = tmp / rel
        target.unlink(missing_ok=True)
        if what == "fifo":
            os.mkfifo(target)
        elif what == "folder":
            target.mkdir()
        else:
            target.symlink_to(what)
    return tmp / "config.yaml"


@pytest.mark.parametrize("index", range(CASES))
def test_hostile_configs_and_specs_end_in_a_clear_error(tmp_path, index):
    case = generate(SEED, CASES)[index]
    where = f"seed {SEED}, case {index} ({case.kind}); RUNNER_FUZZ_SEED={SEED} reproduces it"
    config = _workspace(tmp_path, case)
    env = {**os.environ, "RUNNER_DEBUG": ""}
    try:
        r = subprocess.run([sys.executable, "-m", "runner", case.command,
                            *(["--check-secrets"] if case.command == "validate" else []), str(config)], capture_output=True,
                           text=True, cwd=tmp_path, env=env, timeout=TIMEOUT, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for more than {TIMEOUT} s: {where}")
    out = r.stdout + r.stderr
    for bad in ("Traceback", "bug in the runner", "MemoryError", "RecursionError"):
        assert bad not in out, f"{bad}: {where}\n{out[-3000:]}"
    assert r.returncode in case.exits, f"exit {r.returncode}: {where}\n{out[-3000:]}"
    if r.returncode == 2:  # the problems found, each at its place (or click's usage error)
        assert "problem" in out and ".yaml" in out or "Error:" in out, f"no message: {where}\n{out[-3000:]}"
