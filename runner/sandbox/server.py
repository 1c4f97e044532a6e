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
