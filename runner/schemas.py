"""The JSON Schemas in schemas/: loaded once, compiled once, and the single source of validation rules."""
from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


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
