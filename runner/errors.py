"""The runner's errors: one hierarchy, each carrying what a person needs to fix the cause.

A `Problem` is one thing wrong at one place in one file. A `ConfigError` holds one or more of them,
so `runner validate` can report every mistake at once instead of the first only.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    fix: str | None = None
    where: str | None = None  # a dotted path inside the document, e.g. connections[0].window

    def location(self) -> str:
        parts = [self.file or "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def render(self) -> str:
        text = f"{self.location()}: {self.message}"
        if self.where:
            text += f" (at {self.where})"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class RunnerError(Exception):
    """Base of every error the runner reports to a person (never shown as a traceback)."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def render(self) -> str:
        return self.message + (f"\n    fix: {self.fix}" if self.fix else "")


def failure_words(exc: BaseException) -> str:
    """What a run's record says of the error that ended it, redacted: a RunnerError's own message, anything
    else as an unexpected error (its type and text; the traceback is for -vv)."""
    from runner.redact import redact

    return redact(exc.message if isinstance(exc, RunnerError) else f"unexpected error: {type(exc).__name__}: {exc}")


class ConfigError(RunnerError):
    """The config file or an integration spec is invalid. Exit code 2."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(p.render() for p in self.problems))

    def render(self) -> str:
        n = len(self.problems)
        head = "1 problem found:" if n == 1 else f"{n} problems found:"
        return head + "\n" + "\n".join("  " + p.render().replace("\n", "\n  ") for p in self.problems)


class SecretError(ConfigError):
    """A secret reference cannot be resolved (unset variable, unreadable file)."""


class ProviderError(RunnerError):
    """The accounting system answered in a way we cannot use (bad JSON, wrong shape, error status)."""

    def __init__(self, message: str, *, fix: str | None = None, status: int | None = None, code: str | None = None):
        super().__init__(message, fix=fix)
        self.status = status
        self.code = code


class AuthError(ProviderError):
    """Credentials were refused (401) or lack a permission (403)."""


class NeedsReconnect(AuthError):
    """An OAuth grant was revoked or expired; only a person can fix it, with `runner connect`."""


class AccountMismatch(RunnerError):
    """The connected company/organization is not the one the config pins."""


class DestinationError(RunnerError):
    """The destination refused or failed a delivery."""

    def __init__(self, message: str, *, fix: str | None = None, status: int | None = None,
                 fatal: bool = False, details: dict | None = None):
        super().__init__(message, fix=fix)
        self.status = status
        self.fatal = fatal  # True when no further delivery can succeed (bad key, wrong environment)
        self.details = details or {}


class UnsafeRequest(ProviderError):
    """A request would leave the declared base URL (e.g. a next-page link to another host)."""
