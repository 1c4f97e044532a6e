"""Write docs/config-reference.md from schemas/config.schema.json, so the reference cannot drift from the schema.

    python tools/gen_config_reference.py           # rewrite docs/config-reference.md
    python tools/gen_config_reference.py --check   # exit 1 when the committed file differs from a fresh one
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "schemas" / "config.schema.json"
OUT = ROOT / "docs" / "config-reference.md"

HEAD = """# Config reference

Generated from [`schemas/config.schema.json`](../schemas/config.schema.json) by
`python tools/gen_config_reference.py`; a test fails when this page and the schema differ. Editors validate
a config against the same schema when the file starts with
`# yaml-language-server: $schema=schemas/config.schema.json`.

Secrets are never written in the config: a key that takes a secret takes a reference, `${ENV_VAR}` (from the
environment) or `${file:path}` (a file, relative to the config).
"""


def resolve(schema: dict, node: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        extra = {k: v for k, v in node.items() if k != "$ref"}
        node = {**schema["$defs"][name], **extra}
    return node


def kind(schema: dict, node: dict) -> str:
    node = resolve(schema, node)
    if "enum" in node:
        return " | ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    if "oneOf" in node and "type" not in node:
        return " or ".join(kind(schema, b) for b in node["oneOf"])
    t = node.get("type")
    if t == "string" and node.get("pattern") == "^\\$\\{[^}]+\\}$":
        return "secret reference"
    if t == "string" and "x-pattern-meaning" in node:
        return "text (" + node["x-pattern-meaning"].replace("look like ", "").replace("be ", "") + ")"
    names = {"string": "text", "integer": "whole number", "number": "number", "boolean": "true/false",
             "object": "block of keys", "array": "list"}
    if isinstance(t, list):
        return " or ".join(names.get(x, x) for x in t)
    if t == "object" and not node.get("properties") and isinstance(node.get("additionalProperties"), dict):
        return f"block of keys, each {kind(schema, node['additionalProperties'])}"
    text = names.get(t, t or "any")
    if t == "integer" and ("minimum" in node or "maximum" in node):
        text += f" ({node.get('minimum', '')}–{node.get('maximum', '')})"
    return text


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(schema: dict, node: dict, prefix: str, rows: list, sections: list) -> None:
    node = resolve(schema, node)
    required = set(node.get("required") or [])
    for key, sub in (node.get("properties") or {}).items():
        sub = resolve(schema, sub)
        path = f"{prefix}{key}"
        desc = sub.get("description", "")
        rows.append(f"| `{path}` | {cell(kind(schema, sub))} | {'yes' if key in required else ''} | {cell(desc)} |")
        if sub.get("type") == "object" and sub.get("properties"):
            sections.append((path, sub))
        elif sub.get("type") == "array" and isinstance(sub.get("items"), dict):
            sections.append((path + "[]", resolve(schema, sub["items"])))
        elif "oneOf" in sub:
            shapes = [b for b in (resolve(schema, b) for b in sub["oneOf"])
                      if b.get("type") == "object" and b.get("properties")]
            if len(shapes) == 1:
                sections.append((path, shapes[0]))
            elif shapes:  # several block shapes (state: sqlite or postgresql): a table for each
                sections.append((path, {"type": "object", "oneOf": shapes}))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        rows.append(f"| `{prefix}<name>` | {cell(kind(schema, extra))} |  | any name (see the description above) |")


def section(schema: dict, title: str, node: dict, out: list, prefix: str) -> None:
    node = resolve(schema, node)
    variants = node.get("oneOf") if node.get("type") == "object" or "properties" in node else None
    desc = node.get("description")
    out.append(f"\n## `{title}`\n" if title else "\n## Top level\n")
    if desc:
        out.append("\n" + desc + "\n")
    if node.get("x-fix") and title.endswith("window"):
        out.append("\nWrite " + node["x-fix"].removeprefix("use ") + ".\n")
    branches = [resolve(schema, b) for b in (variants or []) if resolve(schema, b).get("properties")]
    nested: list = []
    if branches:  # one table per shape (destination: debitura or jsonl)
        for b in branches:
            tag = next((f"{k}: {v['const']}" for k, v in b["properties"].items() if "const" in v), "variant")
            out.append(f"\n### `{tag}`\n")
            rows: list = []
            table(schema, b, prefix, rows, nested)
            out.append("\n| key | value | required | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    else:
        rows = []
        table(schema, node, prefix, rows, nested)
        out.append("\n| key | value | required | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    seen = set()
    for path, sub in nested:
        if path in seen:
            continue
        seen.add(path)
        section(schema, path, sub, out, path + ".")


def generate() -> str:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    out = [HEAD]
    section(schema, "", schema, out, "")
    return "".join(out).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = generate()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is not what {SCHEMA.relative_to(ROOT)} gives; "
                  f"run: python tools/gen_config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
