"""The config's JSON Schema for the integrations installed: what `runner schema` prints for editors.

schemas/config.schema.json accepts any integration name and environment (specs are data, added without a
release). An editor pointed at this one completes and checks them: `integration:` is one of the installed
specs, and each integration's `environment:` one of its own (an if/then per integration).
"""
from __future__ import annotations

import copy
from pathlib import Path

from runner.errors import ConfigError
from runner.spec import loader as specs
from runner.spec import schemas


def build(extra_dir: Path | None = None) -> dict:
    schema = copy.deepcopy(schemas.load("config"))
    found = {}
    for sid, path in specs.available(extra_dir).items():
        try:
            found[sid] = specs.load_file(path)
        except ConfigError:  # a broken spec is reported by `runner integrations`; it is not offered here
            continue
    base_id = schema.pop("$id", None)
    schema["$comment"] = (f"{base_id}, with the integrations installed where `runner schema` ran: "
                          f"{', '.join(sorted(found))}")
    conn = schema["$defs"]["connection"]
    conn["properties"]["integration"] = {**conn["properties"]["integration"], "enum": sorted(found)}
    conn["allOf"] = [{
        "if": {"properties": {"integration": {"const": sid}}, "required": ["integration"]},
        "then": {"properties": {"environment": {
            "enum": list(spec.environments),
            "description": f"{spec.name}'s environments. Default: {spec.default_environment}."}}},
    } for sid, spec in sorted(found.items())]
    return schema
