"""Validate a mapped invoice against schemas/invoice.schema.json and say precisely what is wrong.

The schema is the only place the rules live. A compiled validator (jsonschema-rs) answers the common
case, a valid invoice, quickly; only an invoice that fails is re-checked with jsonschema, whose errors
name every missing or bad field. The address rule of the seed (street, city, postal code, country) is
in the schema; a failure there becomes `incomplete_address` with the missing fields.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from runner.spec import schemas

ADDRESS = ("debtor", "address")
FIELD_NAMES = {"street": "street", "city": "city", "postal_code": "postal code", "country": "country",
               "state": "state"}


@dataclass
class Outcome:
    ok: bool
    reason: str | None = None  # incomplete_address | invalid
    missing: list[str] = field(default_factory=list)  # address fields that cannot be used: missing, blank or unreadable
    errors: list[str] = field(default_factory=list)  # every schema error, in plain words
    absent: list[tuple] = field(default_factory=list)  # paths of required fields the invoice lacks
    unreadable: list[dict] = field(default_factory=list)  # of those, the ones whose source value is unreadable
    unusable: list[str] = field(default_factory=list)  # address fields in `missing` that are present but not usable

    def message(self) -> str:
        if self.reason == "incomplete_address":
            parts = []
            absent = [m for m in self.missing if m not in self.unusable]
            if absent:
                parts.append("the debtor's address is missing " + ", ".join(FIELD_NAMES.get(m, m) for m in absent))
            # what is wrong with address fields that are there (a value that cannot be read, a bad code)
            parts += [e for e in self.errors if e.startswith("debtor.address") and not e.endswith(" is missing")]
            others = [e for e in self.errors if not e.startswith("debtor.address")]
            return "; ".join(parts) + ("; also " + "; ".join(others) if others else "")
        return "; ".join(self.errors)


_OK = Outcome(ok=True)


def _compiled(drop_address: bool):
    """The invoice schema, compiled once by jsonschema-rs for the hot path (about 2 µs per invoice, where
    fastjsonschema took 9: its generated code raises and catches an exception for every non-US address, the
    `if` of the state rule). With drop_address, the address is only required to be an object (used to tell
    whether the address is the only thing wrong)."""
    import copy

    import jsonschema_rs

    schema = copy.deepcopy(schemas.load("invoice"))
    if drop_address:
        schema["properties"]["debtor"]["properties"]["address"] = {"type": "object"}
    return jsonschema_rs.validator_for(schema).is_valid


@functools.cache
def _fast():
    return _compiled(False)


@functools.cache
def _fast_without_address():
    return _compiled(True)


def _address_schema() -> dict:
    """The invoice schema's part for the debtor's address (ADDRESS)."""
    return schemas.load("invoice")["properties"]["debtor"]["properties"]["address"]


@functools.cache
def _address_validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(_address_schema())


class _Error(NamedTuple):
    """What `explain` reads of a jsonschema error (the error itself holds the schema and its whole context)."""
    validator: str
    validator_value: Any
    instance: Any
    message: str


@functools.cache
def _address_check():
    """jsonschema-rs's errors of an address, to tell which checks fail (a few µs, where jsonschema takes 50-90)."""
    import jsonschema_rs

    return jsonschema_rs.validator_for(_address_schema()).iter_errors


# jsonschema's errors of an address whose only faults are missing fields, by which ones are missing: the same
# for every such address (a `required` error reads nothing of the address but whether a name is in it).
_BY_MISSING: dict[tuple, list] = {}


def _address_found(address: dict) -> list[tuple[tuple, _Error]]:
    """The schema errors of an address, by jsonschema, cached by the address (a customer with an incomplete
    address usually has several unpaid invoices). Keyed with each value's type: 0, 0.0, False and
    Decimal("0") are equal as keys, not as JSON."""
    items = tuple((k, type(v), v) for k, v in address.items())
    try:
        return _address_errors(items)
    except TypeError:  # a value that cannot be a cache key (a list, a dict): explained uncached
        return _explained(items)


@functools.lru_cache(maxsize=2048)
def _address_errors(items: tuple) -> list[tuple[tuple, _Error]]:
    """An address not seen before. The usual fault, fields that are missing (the seed's most common cause: a
    customer without a postal code), is told by jsonschema-rs (≈ 8 µs), and jsonschema's errors for that set
    of missing fields are reused: explaining each customer's afresh took 50-90 µs, 15 % of classifying
    invoices of customers not seen before. Any other fault (a pattern, a blank or mistyped value) is
    explained by jsonschema from the values."""
    try:
        faults = list(_address_check()({k: v for k, _, v in items}))
    except Exception:  # a value jsonschema-rs cannot read as JSON: jsonschema explains it
        faults = None
    if faults is None or not all(f.kind.name == "required" for f in faults):
        return _explained(items)
    key = tuple(sorted((tuple(f.instance_path), tuple(f.schema_path), f.kind.property) for f in faults))
    found = _BY_MISSING.get(key)
    if found is None:
        if len(_BY_MISSING) >= 256:
            _BY_MISSING.clear()
        found = _BY_MISSING[key] = _explained(items)
    return found


def _explained(items: tuple) -> list[tuple[tuple, _Error]]:
    """jsonschema's errors of one address (its items as _address_found keys them)."""
    return [(ADDRESS + tuple(e.absolute_path), _Error(e.validator, e.validator_value, e.instance, e.message))
            for e in _address_validator().iter_errors({k: v for k, _, v in items})]


def _passes(is_valid, invoice: dict) -> bool:
    try:
        return is_valid(invoice)
    except Exception:  # a value jsonschema-rs cannot read as JSON (never produced by a mapping): not valid
        return False


def valid(invoice: dict) -> bool:
    """Whether the invoice matches the canonical schema (the fast check alone)."""
    return _passes(_fast(), invoice)


def check(invoice: dict, why: Callable[[tuple], Any] | None = None) -> Outcome:
    if _passes(_fast(), invoice):
        return _OK
    return explain(invoice, why)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _errors(invoice: dict) -> list[tuple[tuple, object]]:
    """Every schema error with its path. Most failing invoices fail only in the address (the seed's most
    common cause): then only the small address schema is run through jsonschema, which is far cheaper."""
    debtor = invoice.get("debtor") if isinstance(invoice, dict) else None
    address = debtor.get("address") if isinstance(debtor, dict) else None
    if isinstance(address, dict) and _passes(_fast_without_address(), invoice):
        found = list(_address_found(address))
    else:
        found = [(tuple(e.absolute_path), e) for e in schemas.validator("invoice").iter_errors(invoice)]
    return sorted(found, key=lambda pe: list(map(str, pe[0])))


def explain(invoice: dict, why: Callable[[tuple], Any] | None = None) -> Outcome:
    """Every schema error of an invoice, in plain words. `why(path)`, for a required path the invoice lacks:
    a functions.Unreadable when the record had a value there that could not be read (else None). Such a field
    is named with that value, never called missing."""
    missing: list[str] = []
    unusable: list[str] = []
    texts: list[str] = []
    absent: list[tuple] = []
    unread: list[dict] = []
    for path, err in _errors(invoice):
        if err.validator == "required":
            for name in err.validator_value:
                if isinstance(err.instance, dict) and name not in err.instance:
                    full = path + (name,)
                    absent.append(full)
                    found = why(full) if why is not None else None
                    if path == ADDRESS:
                        missing.append(name)
                        if found is not None:
                            unusable.append(name)
                    elif full == ADDRESS:
                        missing.extend(["street", "city", "postal_code", "country"])
                        if found is not None:
                            unusable.extend(["street", "city", "postal_code", "country"])
                    if found is not None:
                        texts.append(found.text(_dotted(full)))
                        unread.append(found.as_dict(_dotted(full)))
                    else:
                        texts.append(f"{_dotted(full)} is missing")
            continue
        where = _dotted(path) or "invoice"
        if path == ADDRESS + ("country",) and err.validator == "pattern":
            missing.append("country")
            unusable.append("country")
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
        return Outcome(ok=False, reason="incomplete_address", missing=list(dict.fromkeys(missing)), errors=texts,
                       absent=absent, unreadable=unread, unusable=list(dict.fromkeys(unusable)))
    return Outcome(ok=False, reason="invalid", errors=texts or ["the invoice does not match the canonical schema"],
                   absent=absent, unreadable=unread)
