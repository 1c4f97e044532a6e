"""Sandbox controls for what happens to an invoice after it was imported: paid, voided or credited at the
source (`runner sandbox pay|void|credit`), and the invoice documents the simulators serve.

The controls are kept in ``<data_dir>/source-changes.json`` (a list of actions, in order), so a control run
from the command line reaches the simulator of the next `runner apply` (each process builds its simulators
afresh from their deterministic data sets and then applies the recorded actions).
"""
from __future__ import annotations

import json
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

FILE = "source-changes.json"
ACTIONS = ("pay", "void", "credit")
ZERO_DECIMAL = {"BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV", "XAF",
                "XOF", "XPF"}


def minor(amount: str | float | Decimal, currency: str) -> int:
    exp = 0 if currency.upper() in ZERO_DECIMAL else 2
    return int((Decimal(str(amount)) * (10 ** exp)).to_integral_value())


def record(data_dir: Path | str, integration: str, action: str, invoice: str, amount: str | None = None) -> dict:
    """Append one control to the file the simulators read (atomically replaced)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    path = Path(data_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {"action": action, "invoice": invoice, "amount": amount, "at": int(time.time())}
    data.setdefault(integration, []).append(entry)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return entry


class Changes:
    """A simulator's view of the control file: `pending()` returns the actions not applied yet."""

    def __init__(self, data_dir: Any, integration: str):
        self.path = Path(data_dir) / FILE if data_dir is not None else None
        self.integration = integration
        self.applied = 0
        self._mtime: float | None = None

    def pending(self) -> list[dict]:
        if self.path is None:
            return []
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        if mtime == self._mtime:
            return []
        self._mtime = mtime
        try:
            actions = json.loads(self.path.read_text()).get(self.integration) or []
        except (ValueError, OSError):
            return []
        new = actions[self.applied:]
        self.applied = len(actions)
        return new

    def reset(self) -> None:
        self.applied, self._mtime = 0, None


def pdf(title: str, lines: list[str]) -> bytes:
    """A small, valid one-page PDF (text in Helvetica) with a correct cross-reference table."""
    def esc(t: str) -> str:
        return t.encode("latin-1", "replace").decode("latin-1").replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    text = ["BT", "/F1 18 Tf", "72 770 Td", f"({esc(title)}) Tj", "/F1 11 Tf"]
    for line in lines:
        text += ["0 -18 Td", f"({esc(line)}) Tj"]
    text.append("ET")
    stream = "\n".join(text).encode("latin-1")
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)
