"""`runner schema`: the config's JSON Schema with the installed integrations and their environments, checked
with a real JSON Schema validator as an editor would."""
from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def printed():
    r = run_cli("schema")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _sample() -> dict:
    return yaml.safe_load((ROOT / "sample-config.yaml").read_text())


def _errors(schema: dict, config: dict) -> list[str]:
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return [e.message for e in cls(schema).iter_errors(config)]


def test_the_sample_config_is_valid_against_the_printed_schema(printed):
    assert _errors(printed, _sample()) == []


def test_a_misspelt_integration_fails_against_the_printed_schema_and_passed_the_file(printed):
    cfg = _sample()
    cfg["connections"][0]["integration"] = "strip"
    assert any("'strip' is not one of" in m for m in _errors(printed, cfg))
    assert _errors(json.loads((ROOT / "schemas" / "config.schema.json").read_text()), cfg) == []


def test_a_misspelt_environment_fails_for_its_own_integration(printed):
    cfg = _sample()
    cfg["connections"][0]["environment"] = "sandbx"
    assert any("'sandbx' is not one of ['live', 'test', 'sandbox']" in m for m in _errors(printed, cfg))
    cfg["connections"][0]["environment"] = "production"  # QuickBooks has it, Stripe does not
    assert _errors(printed, cfg)


def test_the_schema_file_has_a_stable_id():
    assert json.loads((ROOT / "schemas" / "config.schema.json").read_text())["$id"] == \
        "https://runner.dev/schemas/config.schema.json"
