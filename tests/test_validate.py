"""`runner validate`: every kind of mistake exits 2 with the file, the line and the fix."""
from __future__ import annotations

import re
import shutil

import pytest

from conftest import ROOT, STRIPE_KEY, run_cli, write_config

GOOD = """\
destination:
  type: debitura
  environment: sandbox
  api_key: "${DEBITURA_API_KEY}"
connections:
  - name: acme-stripe
    integration: stripe
    environment: sandbox
    credentials: {api_key: "${STRIPE_API_KEY}"}
    window: {last: 90d}
"""


def _validate(path, env):
    return run_cli("validate", "--check-secrets", str(path), env=env)


def _location(out: str, path) -> tuple[int, int]:
    m = re.search(re.escape(str(path)) + r":(\d+):(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def test_good_config_is_valid(tmp_path, sandbox_env):
    r = _validate(write_config(tmp_path, GOOD), sandbox_env)
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and "last 90d" in r.stdout


def test_yaml_syntax_error(tmp_path, sandbox_env):
    path = write_config(tmp_path, GOOD.replace("    window: {last: 90d}", "    window: {last: 90d"))
    r = _validate(path, sandbox_env)
    assert r.returncode == 2
    line, _ = _location(r.stderr, path)
    assert line in (10, 11)
    assert "not valid YAML" in r.stderr and "fix:" in r.stderr


def test_unknown_key_suggests_the_right_one(tmp_path, sandbox_env):
    path = write_config(tmp_path, GOOD.replace("    window: {last: 90d}", "    widow: {last: 90d}"))
    r = _validate(path, sandbox_env)
    assert r.returncode == 2
    assert _location(r.stderr, path) == (10, 5)
    assert "unknown key 'widow'" in r.stderr and "did you mean 'window'" in r.stderr


def test_bad_jmespath_in_a_spec_names_the_spec_file_and_line(tmp_path, sandbox_env):
    spec_dir = tmp_path / "integrations.d"
    spec_dir.mkdir()
    text = (ROOT / "integrations.d" / "stripe.yaml").read_text()
    broken = text.replace("number: number", "number: \"number[?\"", 1)
    assert broken != text
    (spec_dir / "stripe.yaml").write_text(broken)
    r = _validate(write_config(tmp_path, GOOD), sandbox_env)
    assert r.returncode == 2
    line, _ = _location(r.stderr, spec_dir / "stripe.yaml")
    assert broken.splitlines()[line - 1].strip().startswith("number:")
    assert "JMESPath" in r.stderr and "fix:" in r.stderr


def test_unknown_function_is_found_at_load_time(tmp_path, sandbox_env):
    spec_dir = tmp_path / "integrations.d"
    spec_dir.mkdir()
    text = (ROOT / "integrations.d" / "stripe.yaml").read_text().replace("upper(currency)", "uppercase(currency)")
    (spec_dir / "stripe.yaml").write_text(text)
    r = _validate(write_config(tmp_path, GOOD), sandbox_env)
    assert r.returncode == 2
    assert "unknown function uppercase()" in r.stderr


def test_broken_template_in_a_spec(tmp_path, sandbox_env):
    spec_dir = tmp_path / "integrations.d"
    spec_dir.mkdir()
    text = (ROOT / "integrations.d" / "stripe.yaml").read_text().replace("{{ secrets.api_key }}", "{{ secret.api_key }}")
    (spec_dir / "stripe.yaml").write_text(text)
    r = _validate(write_config(tmp_path, GOOD), sandbox_env)
    assert r.returncode == 2
    assert "unknown name(s): secret" in r.stderr


def test_missing_environment_variable(tmp_path, sandbox_env):
    env = dict(sandbox_env)
    env["STRIPE_API_KEY"] = ""
    path = write_config(tmp_path, GOOD)
    r = _validate(path, env)
    assert r.returncode == 2
    assert _location(r.stderr, path)[0] == 9
    assert "STRIPE_API_KEY is not set" in r.stderr and "export STRIPE_API_KEY" in r.stderr


def test_literal_api_key_is_refused_and_not_echoed(tmp_path, sandbox_env):
    path = write_config(tmp_path, GOOD.replace('"${STRIPE_API_KEY}"', STRIPE_KEY))
    r = _validate(path, sandbox_env)
    assert r.returncode == 2
    assert _location(r.stderr, path)[0] == 9
    assert "literal secret" in r.stderr and "${" in r.stderr
    assert STRIPE_KEY not in r.stderr + r.stdout


def test_test_key_in_live_environment(tmp_path, sandbox_env):
    path = write_config(tmp_path, GOOD.replace("    environment: sandbox\n    cred", "    environment: live\n    cred"))
    r = _validate(path, sandbox_env)
    assert r.returncode == 2
    assert "not a live-mode Stripe key" in r.stderr


@pytest.mark.parametrize("change,needle", [
    (("integration: stripe", "integration: strype"), "no integration named 'strype'"),
    (("{last: 90d}", "{last: 90 days}"), "duration"),
    (("{last: 90d}", "{from: 2026-02-30}"), "`from: 2026-02-30` is not a real date: February 2026 has 28 days"),
    (("environment: sandbox\n  api_key", "environment: staging\n  api_key"), "'staging' is not allowed here"),
])
def test_other_mistakes(tmp_path, sandbox_env, change, needle):
    r = _validate(write_config(tmp_path, GOOD.replace(*change)), sandbox_env)
    assert r.returncode == 2, r.stdout
    assert needle in r.stderr


def test_long_readable_names_are_not_mistaken_for_secrets(tmp_path, sandbox_env):
    text = GOOD.replace('  api_key: "${DEBITURA_API_KEY}"', '  api_key: "${DEBITURA_API_KEY}"\n  tag: stripe-import-production-2026-batch')
    r = _validate(write_config(tmp_path, text), sandbox_env)
    assert r.returncode == 0, r.stderr


def test_bad_retry_after_expression_is_found_by_validate(tmp_path, sandbox_env):
    spec_dir = tmp_path / "integrations.d"
    spec_dir.mkdir()
    text = (ROOT / "integrations.d" / "stripe.yaml").read_text().replace(
        "retry: {attempts: 6,", 'retry: {retry_after_body: "error.wait(", attempts: 6,')
    assert "retry_after_body" in text
    (spec_dir / "stripe.yaml").write_text(text)
    r = _validate(write_config(tmp_path, GOOD), sandbox_env)
    assert r.returncode == 2 and "retry.retry_after_body" in r.stderr


def _mutations(doc):
    """Each top-level key dropped, and each top-level value replaced by a wrong type."""
    for key in list(doc):
        yield {k: v for k, v in doc.items() if k != key}
        yield {**doc, key: 12345}
        yield {**doc, key: ["not", "this"]}


@pytest.mark.parametrize("name", ["config", "integration"])
def test_fast_schema_check_agrees_with_jsonschema(name):
    """Config and specs are checked by jsonschema-rs first (start-up time); what is reported must be exactly
    what jsonschema says, for the shipped documents and for broken ones."""
    import yaml

    from runner.spec import schemas

    if name == "config":
        docs = [yaml.safe_load((ROOT / "sample-config.yaml").read_text()), yaml.safe_load(GOOD)]
    else:
        docs = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "integrations.d").glob("*.yaml"))]
    cases = [m for d in docs for m in [d, *_mutations(d)]]
    reference = schemas.validator(name)
    disagreements = [(c, schemas.errors(name, c)) for c in cases
                     if [e.message for e in schemas.errors(name, c)] != [e.message for e in reference.iter_errors(c)]]
    assert not disagreements
    assert sum(1 for c in cases if schemas.errors(name, c)) > len(docs)  # the broken ones are caught


@pytest.mark.parametrize("text", ["defaults:\n!!python/object  window: {last: 90d}\n", "a: !!set {x}\n",
                                  "? !!python/tuple [1]\n: 2\n", "a: !custom [1, 2]\n", "a: !!omap [{x: 1}]\n"])
def test_a_tag_on_a_block_or_a_key_is_a_config_error_with_its_place(text):
    """Found by the fuzz test: a tag on a mapping escaped as a raw yaml exception (a traceback)."""
    from runner.spec import yamlfile
    from runner.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        yamlfile.loads(text, "config.yaml")
    assert "config.yaml:" in str(err.value) and "no tags" in str(err.value)


def test_an_unknown_template_filter_in_a_spec_is_reported_at_load_with_the_likely_name(tmp_path):
    """Found by the fuzz test: templates compile on first use, so a mistyped filter escaped as a raw Jinja
    exception instead of a spec problem."""
    from runner.spec import loader as specs
    from runner.errors import ConfigError

    text = (ROOT / "integrations.d" / "stripe.yaml").read_text().replace("invoice_id | urlencode", "invoice_id | rlencode")
    assert "rlencode" in text
    path = tmp_path / "stripe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        specs.load_file(path)
    assert f"{path}:" in str(err.value) and "unknown filter 'rlencode' (did you mean 'urlencode'?)" in str(err.value)
