"""Secrets come only by reference — `${ENV_VAR}` or `${file:path}` — and are redacted everywhere.

Every resolved secret is registered with `redact`, so no log line, error, plan or bundle can print it.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from runner import redact
from runner.errors import Problem
from runner.spec.yamlfile import NotRegular, read_regular

REF = re.compile(r"^\$\{(?:(env|file):)?([^}]+)\}$")

# Shapes of real credentials. A literal matching one of these in a config is refused: configs live in git.
SECRET_SHAPES = re.compile(
    r"^(?:"
    r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9_]{8,}"  # payment-provider style keys
    r"|dbt_[A-Za-z0-9_]{8,}"  # destination keys
    r"|(?:Bearer|Basic)\s+\S{8,}"  # pasted Authorization headers
    r"|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]*"  # JWTs (access tokens)
    r"|(?:AB|RT)\d{2,}[A-Za-z0-9]{20,}"  # OAuth refresh tokens
    r"|1000\.[0-9a-f]{20,}\.[0-9a-f]{20,}"  # OAuth tokens with a numeric prefix
    r")$"
)
# A long opaque string is a secret where a secret belongs (credentials, api_key), or when it is random-looking
# (upper case, lower case and digits); a long readable name such as a tag is not.
OPAQUE = re.compile(r"^[A-Za-z0-9+/_\-]{32,}={0,2}$")
SECRET_KEYS = re.compile(r"(key|secret|token|password|credential)", re.I)


@dataclass(frozen=True)
class SecretRef:
    kind: str  # "env" | "file"
    name: str
    raw: str

    def describe(self) -> str:
        return f"environment variable {self.name}" if self.kind == "env" else f"file {self.name}"


def parse_ref(value: object) -> SecretRef | None:
    if not isinstance(value, str):
        return None
    m = REF.match(value.strip())
    if not m:
        return None
    return SecretRef(kind=m.group(1) or "env", name=m.group(2).strip(), raw=value)


def looks_secret(value: object, path: tuple = ()) -> bool:
    if not isinstance(value, str) or value.startswith(("http", "/", ".")):
        return False
    text = value.strip()
    if SECRET_SHAPES.match(text):
        return True
    if not OPAQUE.match(text):
        return False
    in_secret_field = any(isinstance(p, str) and SECRET_KEYS.search(p) for p in path)
    random_looking = any(c.isupper() for c in text) and any(c.islower() for c in text) and any(c.isdigit() for c in text)
    return in_secret_field or random_looking


# A key, a token or a service account's JSON is a few kilobytes at most.
MAX_SECRET_BYTES = 64 * 1024
_refused: dict[SecretRef, str] = {}  # why a secret file was refused, for missing_problem's message


def resolve(ref: SecretRef, base_dir: Path, environ=os.environ) -> str | None:
    """Return the secret's value, or None when it is not set. Registers the value for redaction."""
    if ref.kind == "env":
        # Stripped like a file's: a value from a Windows .env file or `kubectl create secret --from-file`
        # ends in a line break that is no part of the key (and HTTP cannot send in a header).
        value = environ.get(ref.name)
        value = value.strip() if value is not None else None
    else:
        _refused.pop(ref, None)
        path = Path(ref.name).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        try:
            value = read_regular(path, MAX_SECRET_BYTES).decode("utf-8").strip()
        except NotRegular as exc:  # a pipe or a device would hang the run or fill the memory
            _refused[ref] = str(exc)
            value = None
        except UnicodeDecodeError:
            _refused[ref] = "it is not text (UTF-8)"
            value = None
        except OSError:
            value = None
    if value:
        redact.register(value)
        return value
    return None


_UNSENDABLE = re.compile(r"[\x00-\x1f\x7f]|[^\x00-\x7f]")


def unsendable_problem(ref: SecretRef, value: str, doc, path: tuple) -> Problem | None:
    """A problem when the secret holds a character an HTTP header cannot carry (where every secret goes: a
    key in a header, a token, a client secret in basic auth), said by position, never by the value."""
    bad = _UNSENDABLE.search(value)
    if bad is None:
        return None
    what = "a non-ASCII character" if ord(bad.group()) > 0x7f else "a control character (a tab or line break)"
    where = f"the environment variable {ref.name}" if ref.kind == "env" else f"the secret file {ref.name}"
    return doc.problem(path, f"the secret in {where} holds {what} at position {bad.start() + 1}: keys and tokens are "
                             f"plain ASCII, so it was probably changed when it was copied",
                       "copy the key again from the provider's dashboard (not from a document or chat, which "
                       "may turn quotes and dashes into typographic ones)")


def missing_problem(ref: SecretRef, doc, path: tuple) -> Problem:
    if ref.kind == "env":
        fix = (f"export {ref.name}=... in the shell or CI job that runs the runner "
               f"(or use ${{file:path/to/secret}} to read it from a file)")
        msg = f"the environment variable {ref.name} is not set (or is empty)"
    elif ref in _refused:
        fix = (f"point {ref.raw} at a regular file (relative to the config file) of at most "
               f"{MAX_SECRET_BYTES // 1024} KB holding only the secret, mode 0600")
        msg = f"the secret file {ref.name} cannot be used: {_refused[ref]}"
    else:
        fix = f"create the file {ref.name} (relative to the config file) holding only the secret, mode 0600"
        msg = f"the secret file {ref.name} does not exist, cannot be read, or is empty"
    return doc.problem(path, msg, fix)


def fingerprint(value: str) -> str:
    """A short, non-reversible name for a credential, so a rotated key shows up as a change."""
    return "fp:" + hashlib.sha256(value.encode()).hexdigest()[:12]
