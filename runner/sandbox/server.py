"""`serve()`: run every registered simulator on one local HTTP server, each under ``/<name>``."""

from __future__ import annotations

import pathlib
import sys
from typing import Iterable


def serve(host: str = "127.0.0.1", port: int = 8765, data_dir: pathlib.Path | str | None = None,
          names: Iterable[str] | None = None) -> None:
    """Serve the simulators ``names`` (default: all registered) until interrupted (Ctrl-C).

    Prints one line per simulator: ``<name>  <base URL>``. Control endpoints: ``GET /_sandbox/state``,
    ``POST /_sandbox/faults/<name>`` (JSON body), ``POST /_sandbox/reset``.
    """
    from . import SIMULATORS, get_simulator
    from .core import SandboxServer

    chosen = list(names) if names else list(SIMULATORS)
    unknown = [n for n in chosen if n not in SIMULATORS]
    if unknown:
        raise KeyError(f"unknown simulator(s): {', '.join(unknown)}; known: {', '.join(SIMULATORS)}")
    ddir = pathlib.Path(data_dir) if data_dir is not None else None
    server = SandboxServer({n: get_simulator(n, ddir) for n in chosen}, host=host, port=port)
    plain_stderr = sys.stderr
    sys.stderr = _Redacting(plain_stderr)  # the HTTP server's error reports quote what clients sent
    _route_std_logging()
    base = server.start()
    width = max(len(n) for n in chosen)
    for n in chosen:
        print(f"{n.ljust(width)}  {base}/{n}", flush=True)
    print(f"{'control'.ljust(width)}  {base}/_sandbox/state", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        sys.stdout.flush()
        sys.stderr = plain_stderr


class _Redacting:
    """stderr through the runner's redaction: a request's credentials never reach the terminal in clear."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        from runner.redact import redact

        return self._stream.write(redact(text))

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _route_std_logging() -> None:
    """Log records of the standard `logging` module (http.server, httpx) are written through redaction."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
