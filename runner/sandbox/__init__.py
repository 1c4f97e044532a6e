"""Sandbox simulators of the external APIs (for tests, demos and `runner sandbox serve`).

Import-light on purpose: submodules (and httpx) are imported only when a simulator is created.

    SIMULATORS                 name -> factory(data_dir) for "stripe", "debitura", "debitura-test"
    get_simulator(name, data_dir=None)   cached instance per (name, data_dir) in this process
    get_transport(name, data_dir=None)   httpx.AsyncBaseTransport answering from that instance
    reset_cache()                        forget cached instances
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable


def _stripe(data_dir: pathlib.Path | None = None) -> Any:
    from .stripe import StripeSimulator

    return StripeSimulator(data_dir=data_dir)


def _debitura(data_dir: pathlib.Path | None = None) -> Any:
    from .debitura import DebituraSimulator

    return DebituraSimulator("production", data_dir=data_dir)


def _debitura_test(data_dir: pathlib.Path | None = None) -> Any:
    from .debitura import DebituraSimulator

    return DebituraSimulator("test", data_dir=data_dir)


def _quickbooks(data_dir: pathlib.Path | None = None) -> Any:
    from .quickbooks import QuickBooksSimulator

    return QuickBooksSimulator(data_dir=data_dir)


def _zoho(data_dir: pathlib.Path | None = None) -> Any:
    from .zoho import ZohoSimulator

    return ZohoSimulator(data_dir=data_dir)


def _economic(data_dir: pathlib.Path | None = None) -> Any:
    from .economic import EconomicSimulator

    return EconomicSimulator(data_dir=data_dir)


def _freshbooks(data_dir: pathlib.Path | None = None) -> Any:
    from .freshbooks import FreshBooksSimulator

    return FreshBooksSimulator(data_dir=data_dir)


SIMULATORS: dict[str, Callable[..., Any]] = {
    "stripe": _stripe,
    "quickbooks": _quickbooks,
    "zoho": _zoho,
    "economic": _economic,
    "freshbooks": _freshbooks,
    "debitura": _debitura,
    "debitura-test": _debitura_test,
}

_CACHE: dict[tuple[str, str | None], Any] = {}


def _cache_key(name: str, data_dir: pathlib.Path | str | None) -> tuple[str, str | None]:
    return name, (str(pathlib.Path(data_dir).resolve()) if data_dir is not None else None)


def get_simulator(name: str, data_dir: pathlib.Path | None = None) -> Any:
    """The simulator instance for ``name`` (cached per (name, data_dir) in this process)."""
    if name not in SIMULATORS:
        raise KeyError(f"unknown simulator {name!r}; known: {', '.join(sorted(SIMULATORS))}")
    key = _cache_key(name, data_dir)
    sim = _CACHE.get(key)
    if sim is None:
        sim = _CACHE[key] = SIMULATORS[name](pathlib.Path(data_dir) if data_dir is not None else None)
    return sim


def get_transport(name: str, data_dir: pathlib.Path | None = None) -> Any:
    """An ``httpx.AsyncBaseTransport`` answering from ``get_simulator(name, data_dir)``."""
    from .core import transport

    return transport(get_simulator(name, data_dir))


def reset_cache() -> None:
    _CACHE.clear()


__all__ = ["SIMULATORS", "get_simulator", "get_transport", "reset_cache"]
