"""The JSON Schemas in schemas/: loaded once, compiled once, and the single source of validation rules."""
from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


@functools.cache
def load(name: str) -> dict:
    """name: 'config', 'integration' or 'invoice'."""
    path = SCHEMA_DIR / f"{name}.schema.json"
    if not path.exists():  # installed without the symlinked folder: use package resources
        return json.loads(resources.files("runner").joinpath(f"schemas/{name}.schema.json").read_text())
    return json.loads(path.read_text(encoding="utf-8"))


@functools.cache
def validator(name: str):
    """A jsonschema validator with precise, path-carrying errors (used for config and specs)."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator(load(name), format_checker=Draft202012Validator.FORMAT_CHECKER)


@functools.cache
def _is_valid(name: str):
    import jsonschema_rs

    return jsonschema_rs.validator_for(load(name)).is_valid


def errors(name: str, data) -> list:
    """Every schema error in `data`, with its path (jsonschema's precise errors). A document jsonschema-rs
    finds valid (the common case) costs about a millisecond and never imports jsonschema, which is most of
    a command's start-up otherwise; only a failing one is explained by jsonschema."""
    try:
        if _is_valid(name)(data):
            return []
    except Exception:  # a value jsonschema-rs cannot read (e.g. a YAML date): jsonschema decides
        pass
    return list(validator(name).iter_errors(data))
