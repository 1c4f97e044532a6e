"""Tokens at rest: encrypted with Fernet when RUNNER_SECRET_KEY is set (cryptography comes with authlib).

RUNNER_SECRET_KEY may be any passphrase; it is stretched to a Fernet key. Without it tokens are stored as
plain JSON in a 0600 file, and `runner doctor` says so.
"""
from __future__ import annotations

import base64
import hashlib
import os

PREFIX = "enc:v1:"


def _fernet():
    key = os.environ.get("RUNNER_SECRET_KEY")
    if not key:
        return None
    from cryptography.fernet import Fernet

    from runner import redact

    redact.register(key)
    raw = hashlib.pbkdf2_hmac("sha256", key.encode(), b"runner-token-store", 100_000)
    return Fernet(base64.urlsafe_b64encode(raw))


def encrypt(text: str) -> str:
    f = _fernet()
    if f is None:
        return text
    return PREFIX + f.encrypt(text.encode()).decode()


def decrypt(blob: str) -> str:
    if not blob.startswith(PREFIX):
        return blob
    f = _fernet()
    if f is None:
        from runner.errors import RunnerError

        raise RunnerError("the stored OAuth tokens are encrypted, but RUNNER_SECRET_KEY is not set",
                          fix="export RUNNER_SECRET_KEY with the passphrase used when the connection was made")
    from cryptography.fernet import InvalidToken

    try:
        return f.decrypt(blob[len(PREFIX):].encode()).decode()
    except InvalidToken:
        from runner.errors import RunnerError

        raise RunnerError("RUNNER_SECRET_KEY does not decrypt the stored OAuth tokens (wrong passphrase?)",
                          fix="set the passphrase used when the connection was made, or run `runner connect` again") from None
