"""Secrets never leave the runner: every command, with known secret values, grepped for them.

The CLI runs in subprocesses as a user would (text and JSON output, -vv debug logs, error paths with refused
keys, a literal key written in the config, the support bundle on disk). No output may contain a secret or a
long piece of one. State files are created 0600, and stored OAuth tokens are encrypted at rest when
RUNNER_SECRET_KEY is set.
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import zipfile
from pathlib import Path

import pytest

try:
    from tests.conftest import DEBITURA_KEY, ROOT, STRIPE_KEY, run_cli
except ImportError:  # tests/ without __init__.py
    from conftest import DEBITURA_KEY, ROOT, STRIPE_KEY, run_cli

PASSPHRASE = "correct-horse-battery-staple-9f3k2"
WRONG_STRIPE = "sk_test_sandboxWRONGsecretKEY0000zz"
WRONG_DEBITURA = "dbt_sandbox_live_WRONGkeyQQ77ww"
ACCESS_TOKEN = "eyJhbGciOiJSUzI1NiJ9.acc3ssT0kenValue.sig77"
REFRESH_TOKEN = "AB11refreshTOKENvalue9988776655xyz"
SECRETS = [STRIPE_KEY, DEBITURA_KEY, PASSPHRASE, WRONG_STRIPE, WRONG_DEBITURA, ACCESS_TOKEN, REFRESH_TOKEN]

CONFIG = """
state: state/state.db
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
    server_filters: false
"""

CHECKED: list[str] = []


def _pieces(secret: str) -> list[str]:
    """The secret, and every 10-character piece of it past a well-known prefix (sk_test_, dbt_sandbox_...)."""
    body = secret
    for prefix in ("sk_test_", "dbt_sandbox_live_", "dbt_sandbox_"):
        if body.startswith(prefix):
            body = body[len(prefix):]
            break
    return [secret] + [body[i:i + 10] for i in range(0, max(1, len(body) - 9))]


def assert_clean(what: str, text: str) -> None:
    CHECKED.append(what)
    for s in SECRETS:
        for piece in _pieces(s):
            assert piece not in text, f"{what} leaks a secret ({piece!r} of {s[:6]}...):\n{text[:3000]}"


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print(f"\nSECRETS SUMMARY outputs_checked={len(CHECKED)} secrets={len(SECRETS)} leaks=0")


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "config.yaml").write_text(CONFIG)
    return tmp_path


def cli(workdir: Path, *args, stripe=STRIPE_KEY, debitura=DEBITURA_KEY, **env):
    full = {"PYTHONPATH": str(ROOT), "STRIPE_API_KEY": stripe, "DEBITURA_API_KEY": debitura,
            "RUNNER_SECRET_KEY": PASSPHRASE, "NO_COLOR": "1", **env}
    r = run_cli(*args, env=full, cwd=workdir)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert_clean(" ".join(args) + " (stdout)", r.stdout)
    assert_clean(" ".join(args) + " (stderr)", r.stderr)
    return r


def cli_all(workdir: Path, commands: list[tuple], **kw) -> list:
    """Independent commands (none of them `apply`, which takes the store's lock) run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: cli(workdir, *args, **kw), commands))


def _store_token(workdir: Path) -> None:
    """A stored OAuth token, as `runner connect` leaves it, with RUNNER_SECRET_KEY set."""
    os.environ["RUNNER_SECRET_KEY"] = PASSPHRASE
    try:
        from runner.state.sqlite import Store

        store = Store(workdir / "state" / "state.db")
        store.save_token("acme-stripe", {"access_token": ACCESS_TOKEN, "refresh_token": REFRESH_TOKEN,
                                         "token_type": "bearer", "expires_at": 1999999999})
        store.close()
    finally:
        del os.environ["RUNNER_SECRET_KEY"]


def test_every_command_keeps_secrets_out_of_all_output(workdir):
    _store_token(workdir)
    for out in ("text", "json"):
        assert cli(workdir, "apply", "config.yaml", "-o", out, "-vv", "--details").returncode == 0
    bundle = workdir / "bundle.zip"
    results = cli_all(workdir, [("validate", "--check-secrets", "config.yaml"), ("integrations", "stripe", "-o", "json"),
                                ("integrations",), ("--help",), ("support-bundle", "config.yaml", "--out", str(bundle))]
                      + [(cmd, "config.yaml", *extra, "-o", out) for out in ("text", "json") for cmd, extra in (
                          ("plan", ("-vv",)), ("doctor", ("-vv",)), ("status", ()), ("explain", ("SBX-0020",)))])
    assert results[0].returncode == 0 and all(r.returncode == 0 for r in results[5:] if "plan" in r.args)
    assert bundle.exists()
    if zipfile.is_zipfile(bundle):
        with zipfile.ZipFile(bundle) as z:
            for name in z.namelist():
                assert_clean(f"support bundle: {name}", z.read(name).decode("utf-8", "replace"))
    else:
        assert_clean("support bundle", bundle.read_bytes().decode("utf-8", "replace"))


def test_refused_keys_and_error_paths_keep_secrets_out(workdir):
    for out in ("text", "json"):
        r = cli(workdir, "apply", "config.yaml", "-o", out, "-vv", stripe=WRONG_STRIPE)
        assert r.returncode == 1 and "401" in (r.stdout + r.stderr)
        r = cli(workdir, "apply", "config.yaml", "-o", out, "-vv", debitura=WRONG_DEBITURA)
        assert r.returncode == 1 and "401" in (r.stdout + r.stderr)
    cli_all(workdir, [("doctor", "config.yaml", "-o", out, "-vv") for out in ("text", "json")],
            stripe=WRONG_STRIPE, debitura=WRONG_DEBITURA)
    # a key of the wrong mode for the environment: the error names the rule, not the key
    r = cli(workdir, "validate", "--check-secrets", "config.yaml", stripe="sk_live_" + WRONG_STRIPE[8:])
    assert r.returncode == 2
    SECRETS.append("sk_live_" + WRONG_STRIPE[8:])


class EchoingProvider:
    """A provider that repeats the credential it was sent in its error body (some real APIs do)."""

    async def handle(self, request):
        from runner.sandbox.core import json_response

        sent = request.headers.get("authorization") or request.headers.get("xapikey") or ""
        return json_response(401, {"error": {"message": f"Invalid API Key provided: {sent}"},
                                   "message": f"Invalid API Key provided: {sent}", "echo": sent})


def test_secrets_echoed_back_by_a_provider_are_redacted_everywhere(workdir):
    from runner.sandbox.core import SandboxServer

    server = SandboxServer({"stripe": EchoingProvider(), "debitura": EchoingProvider()})
    base = server.start()
    try:
        text = CONFIG.replace("  environment: sandbox\n  api_key", f"  environment: sandbox\n  base_url: {base}/debitura"
                                                                     "\n  api_key", 1)
        text = text.replace("    environment: sandbox\n", f"    environment: sandbox\n    base_url: {base}/stripe\n", 1)
        assert text.count(base) == 2
        (workdir / "config.yaml").write_text(text)
        for out in ("text", "json"):
            r = cli(workdir, "apply", "config.yaml", "-o", out, "-vv")
            assert r.returncode != 0 and "401" in r.stdout + r.stderr, (r.stdout, r.stderr)
        bundle = workdir / "echo-bundle.zip"
        results = cli_all(workdir, [(cmd, "config.yaml", "-o", out, "-vv") for cmd in ("plan", "doctor")
                                    for out in ("text", "json")] + [
            ("explain", "config.yaml", "SBX-0020", "-vv"), ("status", "config.yaml", "-o", "json"),
            ("support-bundle", "config.yaml", "--out", str(bundle))])
        for r in results[:4]:
            assert r.returncode != 0 and "401" in r.stdout + r.stderr, (r.args, r.stdout, r.stderr)
        if zipfile.is_zipfile(bundle):
            with zipfile.ZipFile(bundle) as z:
                for name in z.namelist():
                    assert_clean(f"support bundle: {name}", z.read(name).decode("utf-8", "replace"))
        # what the runner stored (last errors, verdict details) is as clean as what it printed
        raw = b"".join(f.read_bytes() for f in (workdir / "state").iterdir() if f.is_file())
        assert_clean("state store", raw.decode("utf-8", "replace"))
    finally:
        server.stop()


def test_a_literal_secret_in_the_config_is_refused_without_being_repeated(workdir):
    text = CONFIG.replace('"${STRIPE_API_KEY}"', WRONG_STRIPE)
    assert WRONG_STRIPE in text
    (workdir / "config.yaml").write_text(text)
    for out in ("text", "json"):
        cmds = ("validate", "plan", "apply", "doctor") if out == "text" else ("validate", "apply")
        for r in cli_all(workdir, [(cmd, "config.yaml", "-o", out) for cmd in cmds]):
            assert r.returncode == 2, (r.args, r.stdout, r.stderr)
            assert "literal secret" in r.stdout + r.stderr


def test_redaction_masks_registered_and_token_shaped_values():
    from runner import redact

    redact.register(REFRESH_TOKEN)
    for raw in (f"refresh failed for {REFRESH_TOKEN}", f"Authorization: Bearer {ACCESS_TOKEN}",
                f'{{"access_token": "{ACCESS_TOKEN}"}}', f"key {WRONG_STRIPE} refused", f"api_key={WRONG_DEBITURA}"):
        assert_clean("redact()", redact.redact(raw))
    # A value with a control character, quoted as Python writes it in an error message (repr: "\r").
    odd = "dk_odd_Secret4242\r"
    redact.register(odd)
    assert "Secret4242" not in redact.redact(f"Illegal header value {odd.encode()!r}")


def test_state_files_are_0600_and_tokens_are_encrypted_at_rest(workdir):
    _store_token(workdir)
    assert cli(workdir, "apply", "config.yaml").returncode == 0
    state = workdir / "state"
    for f in state.iterdir():
        if f.name.startswith("state.db") and not f.name.endswith(".lock") and f.is_file():
            mode = stat.S_IMODE(f.stat().st_mode)
            assert mode & 0o077 == 0, f"{f.name} is readable by others: {oct(mode)}"
    raw = b"".join(f.read_bytes() for f in state.iterdir() if f.is_file())
    for s in (ACCESS_TOKEN, REFRESH_TOKEN, PASSPHRASE):
        assert s.encode() not in raw, "a token is stored in clear text"
    db = sqlite3.connect(state / "state.db")
    (blob,) = db.execute("SELECT token FROM tokens WHERE connection='acme-stripe'").fetchone()
    db.close()
    assert blob.startswith("enc:v1:")
    # Decrypts with the passphrase; refuses clearly without it or with a wrong one.
    from runner.state import crypto
    from runner.errors import RunnerError

    os.environ["RUNNER_SECRET_KEY"] = PASSPHRASE
    try:
        assert json.loads(crypto.decrypt(blob))["refresh_token"] == REFRESH_TOKEN
        os.environ["RUNNER_SECRET_KEY"] = "not-the-passphrase"
        with pytest.raises(RunnerError, match="does not decrypt"):
            crypto.decrypt(blob)
        del os.environ["RUNNER_SECRET_KEY"]
        with pytest.raises(RunnerError, match="RUNNER_SECRET_KEY is not set"):
            crypto.decrypt(blob)
    finally:
        os.environ.pop("RUNNER_SECRET_KEY", None)


def test_a_new_state_file_is_created_0600_even_with_a_permissive_umask(tmp_path):
    from runner.state.sqlite import Store

    old = os.umask(0o000)
    try:
        store = Store(tmp_path / "s" / "state.db")
        store.save_token("c", {"access_token": ACCESS_TOKEN})
        store.close()
    finally:
        os.umask(old)
    for f in (tmp_path / "s").iterdir():
        if f.is_file() and not f.name.endswith(".lock"):
            assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, (f.name, oct(f.stat().st_mode))


def test_many_registered_secrets_are_all_masked_and_registering_stays_cheap():
    """A config with fifty connections registers fifty keys at load: each is masked, and the pattern is
    compiled once when text is next redacted, not once per key (that was a fifth of a second at start-up)."""
    import re as _re

    from runner import redact as r

    keys = [f"sk_live_{i:04d}abcdefghijklmnop" for i in range(50)] + ["plain-secret-value-7"]
    compiled = []
    real = _re.compile

    def counting(pattern, *a, **k):
        compiled.append(pattern)
        return real(pattern, *a, **k)

    try:
        r.re.compile = counting
        for k in keys:
            r.register(k)
        assert compiled == []
        text = "keys: " + ", ".join(keys)
        out = r.redact(text)
        assert len(compiled) == 1
        assert not any(k in out for k in keys) and out.count(r.MASK) == len(keys)
        r.redact(text)
        assert len(compiled) == 1, "compiled once until another secret is registered"
    finally:
        r.re.compile = real


def test_a_key_from_an_env_file_with_a_line_break_works_and_a_pasted_typographic_quote_is_named(workdir):
    """A key read from a Windows .env file ends in "\\r": it is no part of the key (as for a secret file), and
    the run works. A key with a character no HTTP header can carry (a quote turned typographic in a
    document) is a config problem that says where it is, never what the key is."""
    crlf = cli(workdir, "apply", "config.yaml", debitura=DEBITURA_KEY + "\r\n", stripe=STRIPE_KEY + "\r")
    assert crlf.returncode == 0, crlf.stdout + crlf.stderr
    pasted = DEBITURA_KEY[:10] + "\u2019" + DEBITURA_KEY[10:]
    SECRETS.append(pasted)
    try:
        bad = cli(workdir, "validate", "--check-secrets", "config.yaml", debitura=pasted)
    finally:
        SECRETS.remove(pasted)
    out = bad.stdout + bad.stderr
    assert bad.returncode == 2
    assert "the environment variable DEBITURA_API_KEY holds a non-ASCII character at position 11" in out
    assert "copy the key again" in out
