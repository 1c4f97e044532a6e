"""Validate a mapped invoice against schemas/invoice.schema.json and say precisely what is wrong.

The schema is the only place the rules live. A compiled validator (fastjsonschema) answers the common
case, a valid invoice, quickly; only an invoice that fails is re-checked with jsonschema, whose errors
name every missing or bad field. The address rule of the seed (street, city, postal code, country) is
in the schema; a failure there becomes `incomplete_address` with the missing fields.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from runner import schemas

ADDRESS = ("debtor", "address")
FIELD_NAMES = {"street": "street", "city": "city", "postal_code": "postal code", "country": "country",
               "state": "state"}


@dataclass
class Outcome:
    ok: bool
    reason: str | None = None  # incomplete_address | invalid
    missing: list[str] = field(default_factory=list)  # address fields missing or blank
    errors: list[str] = field(default_factory=list)  # every schema error, in plain words

    def message(self) -> str:
        if self.reason == "incomplete_address":
            text = "the debtor's address is missing " + ", ".join(FIELD_NAMES.get(m, m) for m in self.missing)
            others = [e for e in self.errors if not e.startswith("debtor.address")]
            return text + ("; also " + "; ".join(others) if others else "")
        return "; ".join(self.errors)


@functools.cache
def _fast():
    import fastjsonschema

    return fastjsonschema.compile(schemas.load("invoice"))


def check(invoice: dict) -> Outcome:
    try:
        _fast()(invoice)
        return Outcome(ok=True)
    except Exception:
        pass
    return explain(invoice)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def explain(invoice: dict) -> Outcome:
    errors = sorted(schemas.validator("invoice").iter_errors(invoice), key=lambda e: list(map(str, e.absolute_path)))
    missing: list[str] = []
    texts: list[str] = []
    for err in errors:
        path = tuple(err.absolute_path)
        if err.validator == "required":
            for name in err.validator_value:
                if isinstance(err.instance, dict) and name not in err.instance:
                    full = path + (name,)
                    if path == ADDRESS:
                        missing.append(name)
                    elif full == ADDRESS:
                        missing.extend(["street", "city", "postal_code", "country"])
                    texts.append(f"{_dotted(full)} is missing")
            continue
        where = _dotted(path) or "invoice"
        if path == ADDRESS + ("country",) and err.validator == "pattern":
            missing.append("country")
            texts.append(f"{where} {err.instance!r} is not an ISO 3166-1 alpha-2 country code")
        elif err.validator in ("pattern", "enum") and path == ("currency",):
            texts.append(f"currency {err.instance!r} is not an ISO 4217 currency code")
        elif err.validator == "exclusiveMinimum":
            texts.append(f"{where} must be more than 0 (it is {err.instance})")
        elif err.validator == "type":
            texts.append(f"{where} has the wrong type ({type(err.instance).__name__}, expected {err.validator_value})")
        elif err.validator == "enum":
            texts.append(f"{where} {err.instance!r} must be one of {', '.join(map(str, err.validator_value))}")
        else:
            texts.append(f"{where}: {err.message}")
    texts = list(dict.fromkeys(texts))
    if missing:
        return Outcome(ok=False, reason="incomplete_address", missing=list(dict.fromkeys(missing)), errors=texts)
    return Outcome(ok=False, reason="invalid", errors=texts or ["the invoice does not match the canonical schema"])
