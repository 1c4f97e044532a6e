"""One redaction layer for everything the runner prints or logs.

Secrets are registered as they are resolved (config credentials, OAuth tokens). `redact(text)` masks
every registered value; the loguru sink and every console/JSON output go through it.
"""
from __future__ import annotations

import re
import threading

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern | None = None
MASK = "****"

# Token-shaped strings are masked even when not registered (e.g. inside a provider's error body).
_SHAPES = re.compile(
    r"(?:(?:sk|rk)_(?:live|test)_[A-Za-z0-9_]{4,})"
    r"|(?:Bearer\s+)[A-Za-z0-9._~+/=-]{8,}"
    # The look-behind starts the word only at its first letter: without it, every letter of a long word began
    # a new attempt that read to the word's end (quadratic: 100 KB of letters took 14 s).
    r"|(?:(?<![A-Za-z])[A-Za-z]+-oauthtoken\s+)[A-Za-z0-9._-]{8,}"
    r"|(?:rnr_(?:prod|test)_[0-9a-f]{8}_)[0-9a-f]{8,}"  # `runner serve` API keys: the key id stays readable
    r"|(?:\"?(?:access_token|refresh_token|client_secret|api_key|id_token)\"?\s*[:=]\s*\"?)[^\s\",&}]{4,}"
)


def register(value: str | None) -> None:
    global _pattern
    if not value or len(value) < 4:
        return
    # Also as Python writes it in a repr (an error message quoting the value): "\r" for a carriage return.
    escaped = repr(value)[1:-1]
    with _lock:
        for form in {value, escaped}:
            if form not in _secrets:
                _secrets.add(form)
                _pattern = None  # compiled again when next needed: a config with fifty keys registers fifty


def _compiled() -> re.Pattern | None:
    global _pattern
    with _lock:
        if _pattern is None and _secrets:
            _pattern = re.compile("|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True)))
        return _pattern


def _shape(m: re.Match) -> str:
    s = m.group(0)
    if s.startswith("Bearer ") or "-oauthtoken " in s:
        return s.split(" ", 1)[0] + " " + MASK
    if s[:3] in ("sk_", "rk_"):
        return s[:8] + MASK
    if s.startswith("rnr_"):
        return s[:18] + MASK
    key_end = max(s.find(":"), s.find("="))
    return s[: key_end + 1] + (' "' if '"' in s[key_end:key_end + 3] else " ") + MASK if key_end > 0 else MASK


def redact(text):
    if not isinstance(text, str):
        return text
    pat = _pattern or _compiled()
    if pat is not None:
        text = pat.sub(MASK, text)
    return _SHAPES.sub(_shape, text)


def redact_obj(obj):
    """Redact every string inside a JSON-like structure (for --output json and bundles)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def known() -> frozenset[str]:
    return frozenset(_secrets)
