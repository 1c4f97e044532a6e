"""Every request the Debitura destination sends matches the official Customer API OpenAPI document."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator

from runner import sandbox
from runner.spec import config
from runner.engine import pipeline
from runner.state.sqlite import Store

OPENAPI = Path(__file__).resolve().parent / "fixtures" / "debitura" / "customer-api.openapi.json"
REQUEST = "Debitura.Web.ExternalApi.Contracts.V1.Cases.Requests.CreateCollectionCaseRequestApiViewModel"


def _to_json_schema(node):
    """OpenAPI 3.0 → JSON Schema: `nullable: true` becomes a union with null; refs point into the document."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if k not in ("nullable", "example", "deprecated")}
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "$ref" in out:
        out["$ref"] = out["$ref"].replace("#/components/schemas/", "#/$defs/")
    return out


@pytest.fixture(scope="module")
def request_validator():
    doc = json.loads(OPENAPI.read_text())
    post = doc["paths"]["/cases"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith(REQUEST)
    schema = {"$defs": _to_json_schema(doc["components"]["schemas"]), "$ref": "#/$defs/" + REQUEST}
    header = next(p for p in post["parameters"] if p["name"] == "Idempotency-Key")
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER), header["schema"]


class Recorder(httpx.AsyncBaseTransport):
    def __init__(self, inner):
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request):
        await request.aread()
        self.requests.append(request)
        return await self.inner.handle_async_request(request)


def test_every_case_request_matches_the_openapi_document(sandbox_config, monkeypatch, request_validator):
    validator, idem_schema = request_validator
    recorders = {}
    real = sandbox.get_transport

    def recording(name, data_dir=None):
        recorders[name] = Recorder(real(name, data_dir))
        return recorders[name]

    monkeypatch.setattr(sandbox, "get_transport", recording)
    cfg = config.load(sandbox_config)
    store = Store(cfg.state_path)
    result = asyncio.run(pipeline.sync(cfg, mode="apply", store=store))
    store.close()
    # Case creations (each case's invoice document follows as POST /cases/{id}/files: test_lifecycle_contract.py)
    posts = [r for r in recorders["debitura"].requests if r.method == "POST" and r.url.path == "/cases"]
    assert len(posts) == result.connections[0].imported > 0
    keys = set()
    for req in posts:
        assert req.url.path == "/cases"
        assert req.headers["XApiKey"] and req.headers["Accept"] == "application/json"
        key = req.headers["Idempotency-Key"]
        assert len(key) <= idem_schema["maxLength"]
        keys.add(key)
        body = json.loads(req.content)
        errors = [e.message for e in validator.iter_errors(body)]
        assert errors == [], errors
        # What the schema leaves loose but the API documents as required:
        assert body["currencyCode"].isupper() and len(body["currencyCode"]) == 3
        assert body["amountToRecover"] > 0
        assert body["debtor"]["type"] in ("Company", "Private")
        assert len(body["debtor"]["countryAlpha2"]) == 2
        assert body["debtor"]["address"] and body["debtor"]["city"] and body["debtor"]["zipCode"]
        if body["debtor"]["countryAlpha2"] == "US":
            assert body["debtor"]["stateAlpha2"]
        assert body["dueDate"] >= body["date"]
        assert body["creditorReference"] and len(body["creditorReference"]) <= 50
    assert len(keys) == len(posts), "one idempotency key per invoice"


def test_idempotency_key_is_stable_across_runs():
    from runner.engine.destinations import idempotency_key

    assert idempotency_key("stripe:acme", "in_1") == idempotency_key("stripe:acme", "in_1")
    assert idempotency_key("stripe:acme", "in_1") != idempotency_key("stripe:other", "in_1")
