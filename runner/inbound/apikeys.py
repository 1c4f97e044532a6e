"""API keys for `runner serve`: what a Zap sends in the `XApiKey` header.

A key is shown once, when it is created, and stored only as a SHA-256 hash (the secret part is 256 random
bits, so a plain hash is enough and a stolen state file reveals no key). Each key carries its environment
(test or production); the server of one environment refuses the other's keys with a message that says so.
Keys are compared in constant time. They live in the state store beside the ledger, in their own table.

Key format: ``rnr_<prod|test>_<key id: 8 hex>_<secret: 64 hex>``. The key id is public (it is what
`runner keys list` shows and what `runner keys revoke` takes); the environment tag in the text is only a
hint for people: the environment that counts is the one stored with the hash.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

ENVIRONMENTS = ("production", "test")
_TAG = {"production": "prod", "test": "test"}
_SHAPE = re.compile(r"^rnr_(prod|test)_([0-9a-f]{8})_([0-9a-f]{64})$")



@dataclass
class KeyInfo:
    id: str
    environment: str
    label: str | None
    created: float
    revoked: float | None
    last_used: float | None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def as_dict(self) -> dict:
        return {"id": self.id, "environment": self.environment, "label": self.label, "created": self.created,
                "revoked": self.revoked, "last_used": self.last_used, "active": self.active}


@dataclass
class Check:
    status: str  # ok | unknown | revoked
    key: KeyInfo | None = None


def ensure(store) -> None:
    """The store's migrations create the keys' table (runner/state)."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def create(store, environment: str, label: str | None = None) -> tuple[str, KeyInfo]:
    """Make a key; returns (the key text, shown once and never stored, its info)."""
    if environment not in ENVIRONMENTS:
        raise ValueError(f"environment must be one of {', '.join(ENVIRONMENTS)}")
    ensure(store)
    while True:
        key_id = secrets.token_hex(4)
        key = f"rnr_{_TAG[environment]}_{key_id}_{secrets.token_hex(32)}"
        now = time.time()
        if not store.add_api_key(key_id, environment, label, _hash(key), now):
            continue
        return key, KeyInfo(key_id, environment, label, now, None, None)


def list_keys(store) -> list[KeyInfo]:
    ensure(store)
    return [KeyInfo(*r) for r in store.api_keys()]


def get(store, key_id: str) -> KeyInfo | None:
    ensure(store)
    r = store.api_key(key_id)
    return KeyInfo(*r[:-1]) if r else None


def revoke(store, key_id: str) -> KeyInfo | None:
    """Revoke by key id (or by the whole key text). None if there is no such key."""
    ensure(store)
    m = _SHAPE.match(key_id.strip())
    if m:
        key_id = m.group(2)
    store.revoke_api_key(key_id, time.time())
    return get(store, key_id)


def verify(store, presented: str | None) -> Check:
    """Which key this is, in constant time over the secret. unknown covers malformed and wrong keys alike."""
    presented = (presented or "").strip()
    m = _SHAPE.match(presented)
    digest = _hash(presented)
    row = None
    if m:
        row = store.api_key(m.group(2))
    stored = row[-1] if row else "0" * 64
    same = hmac.compare_digest(digest, stored)  # always run, so timing does not tell a known id from an unknown one
    if not (row and same):
        return Check("unknown")
    info = KeyInfo(*row[:-1])
    return Check("ok" if info.active else "revoked", info)


def touch(store, key_id: str) -> None:
    store.touch_api_key(key_id, time.time())
