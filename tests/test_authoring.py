"""The authoring kit: `runner integrations new`, `trace` and `test` (record and replay)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STRIPE_KEY = (ROOT / "sandbox-secrets" / "stripe_api_key").read_text().strip()


def runner(*args, cwd, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)


def sample(tmp_path: Path) -> Path:
    """The sample config and its sandbox secrets, with a state store of its own."""
    shutil.copy(ROOT / "sample-config.yaml", tmp_path / "sample-config.yaml")
    shutil.copytree(ROOT / "sandbox-secrets", tmp_path / "sandbox-secrets")
    return tmp_path / "sample-config.yaml"


# --- new -----------------------------------------------------------------------------------------------------

def test_new_scaffolds_a_spec_that_validates_once_filled_and_refuses_to_overwrite(tmp_path):
    made = runner("integrations", "new", "acme_billing", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    spec = tmp_path / "integrations.d" / "acme_billing.yaml"
    assert (tmp_path / "integrations.d" / "acme_billing.fixtures").is_dir()
    text = spec.read_text()
    for part in ("auth:", "environments:", "account:", "invoices:", "lookup:", "TODO"):
        assert part in text
    # Fill in the TODOs as an author would: real names in place of the placeholders.
    filled = re.sub(r"TODO_", "", text).replace("TODO.example.com", "api.acme.example").replace("/TODO/", "/v1/")
    filled = filled.replace("TODO ", "")
    assert "TODO" not in filled.split("\n", 1)[1]
    spec.write_text(filled)
    (tmp_path / "key").write_text("acme-key-123456")
    (tmp_path / "config.yaml").write_text(
        "version: 1\ndestination: {type: jsonl, path: out.jsonl}\nconnections:\n"
        "  - name: acme\n    integration: acme_billing\n    credentials: {api_key: \"${file:key}\"}\n"
        "    window: {last: 90d}\n")
    valid = runner("validate", "config.yaml", cwd=tmp_path)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    assert "acme: acme_billing (production)" in valid.stdout

    again = runner("integrations", "new", "acme_billing", cwd=tmp_path)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert spec.read_text() == filled  # untouched


def test_new_refuses_an_unusable_id(tmp_path):
    bad = runner("integrations", "new", "Acme Billing", cwd=tmp_path)
    assert bad.returncode == 2 and "not a usable id" in bad.stderr
    assert not (tmp_path / "integrations.d").exists()


def test_list_and_show_still_work_without_a_subcommand(tmp_path):
    listed = runner("integrations", cwd=tmp_path)
    assert listed.returncode == 0 and re.search(r"^stripe\s+api_key", listed.stdout, re.M)
    shown = runner("integrations", "zoho_books", cwd=tmp_path)
    assert shown.returncode == 0 and "id: zoho_books" in shown.stdout


# --- trace ---------------------------------------------------------------------------------------------------

def test_trace_shows_requests_with_secrets_masked_the_answers_shape_and_the_mapped_invoices(tmp_path):
    cfg = sample(tmp_path)
    out = runner("integrations", "trace", str(cfg), "acme-stripe", "--limit", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "> GET http://stripe.sandbox.invalid/v1/account" in text
    assert "> GET http://stripe.sandbox.invalid/v1/invoices?limit=100" in text
    assert ">   Authorization: ****" in text
    assert STRIPE_KEY not in text + out.stderr
    assert re.search(r"< HTTP 200  keys \['object', 'data', 'has_more', 'url'\], records \d+, paging", text)
    assert len(re.findall(r"^invoice in_\w+: (eligible|skipped)", text, re.M)) == 2
    assert '"external_id": "in_' in text


def test_trace_of_an_oauth_connection_masks_the_token(tmp_path):
    cfg = sample(tmp_path)
    out = runner("integrations", "trace", str(cfg), "acme-zoho", "--limit", "1", "-o", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = yaml.safe_load(out.stdout)
    auth = [r["headers"].get("Authorization") for r in data["requests"]]
    assert auth and set(auth) == {"****"}
    assert data["account"]["id"] == "60001"
    assert len(data["invoices"]) == 1 and "mapped" in data["invoices"][0]


def test_vv_logs_every_rendered_request(tmp_path):
    cfg = sample(tmp_path)
    out = runner("plan", str(cfg), "-c", "acme-stripe", "-vv", cwd=tmp_path)
    assert re.search(r"DEBUG\s+GET http://stripe\.sandbox\.invalid/v1/invoices\?limit=100\S* -> HTTP 200", out.stderr)
    assert STRIPE_KEY not in out.stderr


# --- test: replay and record ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["stripe", "quickbooks_online", "zoho_books"])
def test_builtin_spec_passes_its_recorded_fixtures(spec, tmp_path):
    out = runner("integrations", "test", spec, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(rf"^{spec}: ok, \d+ invoices as expected", out.stdout, re.M)
    if spec != "quickbooks_online":  # Stripe's fixtures and Zoho's OpenAPI examples
        assert "fixtures/reference)" in out.stdout


def _copy_fixtures(tmp_path: Path, spec: str) -> Path:
    folder = tmp_path / f"{spec}.fixtures"
    shutil.copytree(ROOT / "integrations.d" / f"{spec}.fixtures", folder)
    shutil.rmtree(folder / "reference", ignore_errors=True)
    return folder


def test_replay_fails_on_a_verdict_the_spec_does_not_give(tmp_path):
    folder = _copy_fixtures(tmp_path, "stripe")
    expected = yaml.safe_load((folder / "expected.yaml").read_text())
    inv_id, entry = next((k, v) for k, v in expected["invoices"].items() if v.get("reason") == "not_unpaid")
    entry.update(verdict="eligible")
    entry.pop("reason")
    entry.setdefault("fields", {})["currency"] = "XXX"
    (folder / "expected.yaml").write_text(yaml.safe_dump(expected))
    out = runner("integrations", "test", "stripe", "--fixtures", str(folder), cwd=tmp_path)
    assert out.returncode == 1
    assert f"FAIL {inv_id}: verdict skipped (not_unpaid" in out.stdout
    assert f"FAIL {inv_id}: currency is " in out.stdout and "expected 'XXX'" in out.stdout
    assert "stripe: 1 of " in out.stdout


def test_replay_answers_only_from_the_recording(tmp_path):
    folder = _copy_fixtures(tmp_path, "stripe")
    answers = yaml.safe_load((folder / "responses.yaml").read_text())
    listing = next(a for a in answers if a["request"]["path"] == "/v1/invoices")
    listing["response"]["json"]["data"] = listing["response"]["json"]["data"][:1]
    (folder / "responses.yaml").write_text(yaml.safe_dump([a for a in answers if a is listing] + [
        a for a in answers if a is not listing and a["request"]["path"] != "/v1/account"]))
    out = runner("integrations", "test", "stripe", "--fixtures", str(folder), cwd=tmp_path)
    # Without the account answer the replay says what was asked and answers 404, never the simulator.
    assert out.returncode != 0
    assert "no recorded answer for GET /v1/account" in out.stdout + out.stderr


def test_record_masks_secrets_and_replaces_personal_data(tmp_path):
    cfg = sample(tmp_path)
    folder = tmp_path / "rec"
    out = runner("integrations", "test", "zoho_books", "--fixtures", str(folder), "--record", str(cfg), "acme-zoho",
                 cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    recorded = (folder / "responses.yaml").read_text()
    for name in ("zoho_client_id", "zoho_client_secret", "zoho_refresh_token"):
        assert (tmp_path / "sandbox-secrets" / name).read_text().strip() not in recorded
    answers = yaml.safe_load(recorded)
    token = next(a for a in answers if a["request"]["path"].endswith("/oauth/v2/token"))
    assert token["response"]["json"]["access_token"] == "REDACTED"
    contacts = [a["response"]["json"]["contact"] for a in answers if "/contacts/" in a["request"]["path"]]
    assert contacts
    for c in contacts:
        assert c["email"] is None or c["email"].endswith("@example.com")
        assert c.get("contact_name") is None or c["contact_name"].startswith("Name ")
        street = (c.get("billing_address") or {}).get("address")
        assert not street or street.endswith("Sample Street")
    expected = yaml.safe_load((folder / "expected.yaml").read_text())
    assert expected["connection"]["options"] == {"organization_id": "60001"}
    assert set(expected["connection"]["credentials"]) == {"client_id", "client_secret", "refresh_token"}
    # The same person gets the same fake in every answer: what the recording says of a contact stays consistent.
    again = tmp_path / "rec2"
    runner("integrations", "test", "zoho_books", "--fixtures", str(again), "--record", str(cfg), "acme-zoho",
           cwd=tmp_path)
    names = lambda p: re.findall(r"contact_name: (Name \w+)", (p / "responses.yaml").read_text())  # noqa: E731
    assert names(folder) and names(folder) == names(again)


def test_scrub_keeps_empty_values_and_masks_registered_secrets():
    from runner import redact
    from runner.engine.recording import scrub

    redact.register("s3cret-value-42")
    out = scrub({"name": "Ada Lovelace", "email": "", "phone": None, "address": {"line1": "1 Main St", "line2": ""},
                 "note": "key s3cret-value-42 here", "amount": 12, "status": "open"})
    assert out["name"].startswith("Name ") and out["name"] == scrub({"name": "Ada Lovelace"})["name"]
    assert out["email"] == "" and out["phone"] is None and out["address"]["line2"] == ""
    assert out["address"]["line1"].endswith("Sample Street")
    assert "s3cret-value-42" not in out["note"]
    assert out["amount"] == 12 and out["status"] == "open"


def test_a_recording_made_with_a_limit_replays_to_that_limit(tmp_path):
    cfg = sample(tmp_path)
    folder = tmp_path / "rec"
    out = runner("integrations", "test", "zoho_books", "--fixtures", str(folder), "--record", str(cfg), "acme-zoho",
                 "--limit", "3", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    expected = yaml.safe_load((folder / "expected.yaml").read_text())
    assert len(expected["invoices"]) == 3 and expected["limit"] == 3
    assert "zoho_books: ok, 3 invoices as expected (3 invoices replayed" in out.stdout
    assert "no recorded answer" not in out.stdout
