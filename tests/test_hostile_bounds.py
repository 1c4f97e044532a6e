"""Hostile input cannot exhaust, hang or mislead the runner (issue 19, items 1-5).

Each case runs the real code in a subprocess with an address-space limit and a timeout, as the runner runs for a
user: a hang is a timeout, a memory blow-up a MemoryError, and neither may print a traceback or "bug in the runner".
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, STRIPE_KEY

MEMORY = 1 << 30  # 1 GiB of address space for each hostile run
ENV = {"STRIPE_API_KEY": STRIPE_KEY, "DEBITURA_API_KEY": "dbt_sandbox_live_Hq7Xv2Lm9Pz4"}


def limit_memory() -> None:
    """In the child, before it runs: at most MEMORY of address space (a blow-up is a MemoryError, not a hang)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def bounded(args: list[str], *, timeout: float = 30, cwd=None, env=None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `python ARGS` with the memory limit; fail the test (not hang) when it runs past the timeout."""
    full_env = {**os.environ, **ENV, **(env or {})}
    start = time.monotonic()
    try:
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, cwd=cwd or ROOT,
                           timeout=timeout, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: {args}")
    return r, time.monotonic() - start


def cli(*args, timeout: float = 30, cwd=None, env=None) -> subprocess.CompletedProcess:
    r, _ = bounded(["-m", "runner", *args], timeout=timeout, cwd=cwd, env=env)
    return r


def assert_refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 (config or spec invalid) with a message a person can act on, never a traceback or a 'bug'."""
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "bug in the runner" not in out and "MemoryError" not in out, out[-3000:]
    assert r.returncode == 2, (r.returncode, out[-3000:])
    assert "fix:" in out, out[-3000:]
    for n in needles:
        assert n in out, (n, out[-3000:])


# --- 19.1 redaction is linear in its input -------------------------------------------------------------------

MB = 1 << 20
ADVERSARIAL = {  # for every alternative of redact's patterns: the text that makes a backtracking engine work
    "letters": "'x' * MB",
    "words and dashes": "'abc-' * (MB // 4)",
    "letters before -oauthtoken": "'x' * MB + '-oauthtoke'",
    "-oauthtoken repeated": "'Zoho-oauthtoken' * (MB // 15)",
    "-oauthtoken and spaces": "'Zoho-oauthtoken' + ' ' * MB",
    "Bearer repeated": "'Bearer ' * (MB // 7)",
    "Bearer and spaces": "'Bearer' + ' ' * MB + 'abc'",
    "sk_live_ long": "'sk_live_' + 'a' * MB",
    "sk_live_ repeated": "'sk_live_' * (MB // 8)",
    "api key prefix repeated": "'rnr_prod_01234567_' * (MB // 18)",
    "access_token= repeated": "'access_token=' * (MB // 13)",
    "quoted key and spaces": "'\"access_token\"' + ' ' * MB + ':'",
    "quotes": "'\"' * MB",
}


def test_redaction_of_a_megabyte_of_adversarial_text_is_linear():
    """Each pattern alternative against 1 MB made to make it backtrack: well under 2 s each (a quadratic
    pattern took 14 s for 100 KB); one registered secret too, as in a real run."""
    code = textwrap.dedent(f"""
        import time
        from runner.redact import redact, register
        MB = {MB}
        register('sk_test_' + 'Q' * 24)
        for name, make in {ADVERSARIAL!r}.items():
            text = eval(make)
            t = time.perf_counter()
            out = redact(text)
            print(f"{{name}}\\t{{time.perf_counter() - t:.3f}}\\t{{len(out)}}", flush=True)
    """)
    r, _ = bounded(["-c", code], timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    times = {line.split("\t")[0]: float(line.split("\t")[1]) for line in r.stdout.splitlines()}
    assert set(times) == set(ADVERSARIAL), r.stdout
    slow = {k: v for k, v in times.items() if v >= 2.0}
    assert not slow, slow
    print("redact, seconds for 1 MB:", times)


def test_redaction_still_masks_every_shape():
    from runner.redact import redact

    assert redact("Authorization: Zoho-oauthtoken 1000.abcdef123456") == "Authorization: Zoho-oauthtoken ****"
    assert redact("x Zoho-oauthtoken 1000.abcdef123456") == "x Zoho-oauthtoken ****"
    assert redact("Bearer abcdefgh12345") == "Bearer ****"
    assert redact("key sk_live_abcdefgh") == "key sk_live_****"
    assert redact('{"access_token": "abcdefgh"}') == '{"access_token": "****"}'


# --- 19.2 YAML bombs: file size, alias expansion, loops and nesting are bounded ------------------------------

CONFIG = """\
version: 1
state: state.db
integrations_dir: integrations.d
destination: {type: jsonl, path: out.jsonl}
connections:
  - name: s
    integration: stripe
    environment: sandbox
    credentials: {api_key: "${file:sandbox-secrets/stripe_api_key}"}
    window: {last: 90d}
"""


def workspace(tmp_path, config: str = CONFIG, spec: str | None = None):
    import shutil

    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    (tmp_path / "integrations.d").mkdir()
    (tmp_path / "integrations.d" / "stripe.yaml").write_text(
        spec if spec is not None else (ROOT / "integrations.d" / "stripe.yaml").read_text())
    path = tmp_path / "config.yaml"
    path.write_text(config)
    return path


def laughs(levels: int = 9) -> str:
    """The billion laughs: each anchor repeats the one before nine times (9^9 values from ten lines)."""
    out = 'lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        out += f"lol{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n"
    return out


def test_billion_laughs_in_a_config_is_refused_at_its_line(tmp_path):
    path = workspace(tmp_path, CONFIG + "x-laughs:\n" + "".join("  " + line + "\n" for line in laughs().splitlines()))
    r = cli("validate", "--check-secrets", str(path))
    assert_refused(r, "repeat their anchored blocks", "200,000 values", "billion laughs")
    assert f"{path}:" in r.stderr


def test_billion_laughs_in_a_spec_names_the_spec_file(tmp_path):
    spec = (ROOT / "integrations.d" / "stripe.yaml").read_text() + "x_laughs:\n" + "".join(
        "  " + line + "\n" for line in laughs().splitlines())
    path = workspace(tmp_path, spec=spec)
    r = cli("validate", "--check-secrets", str(path))
    assert_refused(r, "repeat their anchored blocks")
    assert "integrations.d/stripe.yaml:" in r.stderr


def test_an_alias_inside_its_own_anchor_is_refused_at_its_line(tmp_path):
    path = workspace(tmp_path, CONFIG + "x: &r [*r]\n")
    r = cli("validate", "--check-secrets", str(path))
    assert_refused(r, "refers to the block it is in")
    assert f"{path}:11:" in r.stderr


def test_deep_nesting_is_refused(tmp_path):
    path = workspace(tmp_path, CONFIG + "x: " + "[" * 900 + "]" * 900 + "\n")
    assert_refused(cli("validate", "--check-secrets", str(path)), "nested more than 64 deep")


def test_a_config_file_of_many_megabytes_is_refused_before_it_is_read(tmp_path):
    """12 MB of valid YAML: 1.8 GB and half a minute to parse per 45 MB; refused by its size, at once."""
    path = workspace(tmp_path, CONFIG + "x: [" + "1," * (6 * MB) + "1]\n")
    r, took = bounded(["-m", "runner", "validate", "--check-secrets", str(path)], timeout=30)
    assert_refused(r, "more than the 2.0 MB allowed")
    assert took < 10, took


# --- 19.4 special files as secrets or config -----------------------------------------------------------------

@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "fifo"])
def test_a_device_or_a_pipe_as_a_secret_is_refused_not_read(tmp_path, target):
    if target == "fifo":
        os.mkfifo(tmp_path / "key.fifo")
        target = "key.fifo"
    path = workspace(tmp_path, CONFIG.replace("sandbox-secrets/stripe_api_key", target))
    r = cli("validate", "--check-secrets", str(path), timeout=20)
    assert_refused(r, f"the secret file {target} cannot be used", "not a regular file")
    assert "missing" not in r.stderr and "does not exist" not in r.stderr


def test_a_secret_file_larger_than_any_key_is_refused(tmp_path):
    path = workspace(tmp_path, CONFIG.replace("sandbox-secrets/stripe_api_key", "big.key"))
    (tmp_path / "big.key").write_text("sk_test_" + "a" * (1 * MB))
    assert_refused(cli("validate", "--check-secrets", str(path)), "the secret file big.key cannot be used", "more than the 64 KB allowed")


def test_a_secret_file_that_is_not_text_is_named_so_not_called_missing(tmp_path):
    """Found by the fuzz test: bytes that are not UTF-8 in a secret file were 'a bug in the runner'."""
    path = workspace(tmp_path, CONFIG.replace("sandbox-secrets/stripe_api_key", "key.bin"))
    (tmp_path / "key.bin").write_bytes(b"sk_test_\xff\xfe\x00abc")
    r = cli("validate", "--check-secrets", str(path))
    assert_refused(r, "the secret file key.bin cannot be used: it is not text (UTF-8)")
    assert "missing" not in r.stdout + r.stderr


@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_a_pipe_or_a_device_as_the_config_is_refused(tmp_path, target):
    if target == "fifo":
        os.mkfifo(tmp_path / "config.yaml")
        target = str(tmp_path / "config.yaml")
    r = cli("validate", "--check-secrets", target, timeout=20)
    assert_refused(r, "not a regular file")


def test_a_pipe_as_a_spec_is_refused(tmp_path):
    path = workspace(tmp_path)
    (tmp_path / "integrations.d" / "stripe.yaml").unlink()
    os.mkfifo(tmp_path / "integrations.d" / "stripe.yaml")
    assert_refused(cli("validate", "--check-secrets", str(path), timeout=20), "integrations.d/stripe.yaml", "named pipe (FIFO)")


# --- 19.5 a spec's credential pattern runs in linear time ----------------------------------------------------

def _spec_with_pattern(pattern: str) -> str:
    return (ROOT / "integrations.d" / "stripe.yaml").read_text().replace('"^(sk|rk)_test_"', pattern)


def test_a_catastrophic_credential_pattern_does_not_hang_validate(tmp_path):
    """^(a+)+$ against 40 a and a '!' takes Python's re hours; RE2 answers at once: the key does not match."""
    path = workspace(tmp_path, CONFIG.replace("sandbox-secrets/stripe_api_key", "key.txt"),
                     spec=_spec_with_pattern('"^(a+)+$"'))
    (tmp_path / "key.txt").write_text("a" * 40 + "!")
    r = cli("validate", "--check-secrets", str(path), timeout=20)
    assert_refused(r, "the sandbox takes test-mode keys")


@pytest.mark.parametrize("pattern, why", [(r'"^(sk)_\\1"', "invalid escape sequence"),
                                          (r'"^(?!rk_)sk_"', "invalid perl operator"),
                                          ('"^(sk"', "missing )")])
def test_a_credential_pattern_the_linear_engine_cannot_run_is_refused_when_the_spec_loads(tmp_path, pattern, why):
    path = workspace(tmp_path, spec=_spec_with_pattern(pattern))
    r = cli("validate", "--check-secrets", str(path))
    assert_refused(r, "integrations.d/stripe.yaml:", "the credential pattern", why, "RE2",
                   "environments.sandbox.credentials.api_key.pattern")
    assert "re2.cc" not in r.stderr  # RE2's own log line stays out of the output


def test_credential_patterns_still_tell_live_keys_from_test_keys(tmp_path):
    path = workspace(tmp_path, CONFIG.replace("sandbox-secrets/stripe_api_key", "key.txt"))
    (tmp_path / "key.txt").write_text("sk_live_" + "a" * 24)
    assert_refused(cli("validate", "--check-secrets", str(path)), "the sandbox takes test-mode keys")
    (tmp_path / "key.txt").write_text("sk_test_" + "a" * 24)
    r = cli("validate", "--check-secrets", str(path))
    assert r.returncode == 0, r.stderr


# --- 19.3 templates are bounded in loops, sizes and output ---------------------------------------------------

HOSTILE_TEMPLATES = {
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}100",
                     "range() of 100,000 numbers"),
    "nested loops within range": ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}100",
                                  "more than 100,000 steps"),
    "a huge repetition": ("{{ 'x' * 3000000000 }}", "longer than 1,000,000 characters"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s | length }}", "longer than 1,000,000 characters"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s | length }}", "longer than 1,000,000 characters"),
    "a huge padding": ("{{ '1' | center(3000000000) }}", "longer than 1,000,000 characters"),
    "a huge format width": ("{{ '{:>3000000000}'.format(1) }}", "pads to more than 1,000,000 characters"),
    "a loop writing gigabytes": ("{% for i in range(10000) %}{{ 'y' * 900000 }}{% endfor %}",
                                 "more than 16,000,000 characters"),
    "an exponential macro": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                             "{{ f(60) }}", "more than 100,000 steps"),
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_a_hostile_template_is_stopped_at_its_bound_naming_its_place(tmp_path, name):
    source, bound = HOSTILE_TEMPLATES[name]
    spec = (ROOT / "integrations.d" / "stripe.yaml").read_text().replace('      limit: "100"\n',
                                                                          f'      limit: "{source}"\n', 1)
    path = workspace(tmp_path, spec=spec)
    r = cli("plan", str(path), timeout=60)
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "bug in the runner" not in out and "MemoryError" not in out, out[-3000:]
    assert r.returncode in (1, 2), (r.returncode, out[-3000:])  # the connection failed, with its reason
    assert "was stopped" in out and bound in out, out[-3000:]
    line = spec.splitlines().index(f'      limit: "{source}"') + 1
    assert f"integrations.d/stripe.yaml:{line}, invoices.request.params.limit" in out, out[-3000:]
    assert "fix:" in out


def test_templates_within_the_bounds_render_as_before():
    from datetime import datetime, timezone

    from runner.spec.templates import Template

    t = Template("/v1/{{ window.start | unix }}-{{ 'a' ~ 'b' }}{% for i in range(3) %}{{ i }}{% if not loop.last %},"
                 "{% endif %}{% endfor %}{{ '%05d' % 42 }}{{ ('x' * 3) + 'y' }}{{ [1, 2] | join(',') }}"
                 "{{ '{:>4}'.format('a') }}{{ 'x' | center(5) }}{{ 2 ** 10 }}")
    out = t.render({"window": {"start": datetime(2026, 1, 1, tzinfo=timezone.utc)}})
    assert out == "/v1/1767225600-ab0,1,200042xxxy1,2   a  x  1024"


def test_a_recursive_loop_is_refused_when_the_spec_loads():
    from runner.spec.templates import Template, TemplateError

    with pytest.raises(TemplateError, match="recursive loop"):
        Template("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}")
