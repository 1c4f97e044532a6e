"""Load a YAML file and remember where every value came from, so errors can name file:line:column.

`load(path)` returns a `Document`: the plain data (dicts, lists, scalars) plus a table from each value's
path (a tuple of keys and indexes) to its position. JSON Schema errors carry such paths, so a schema
violation becomes "config.yaml:12:5: unknown key 'widow'" instead of a traceback.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from runner.errors import ConfigError, Problem

Path_ = tuple  # a path into the document: ("connections", 0, "window")


@dataclass
class Document:
    data: Any
    file: str
    value_marks: dict = field(default_factory=dict)  # path -> (line, column) of the value
    key_marks: dict = field(default_factory=dict)  # path -> (line, column) of the key naming it

    def mark(self, path: Iterable, *, key: bool = False) -> tuple[int | None, int | None]:
        path = tuple(path)
        table = (self.key_marks, self.value_marks) if key else (self.value_marks, self.key_marks)
        while True:
            for t in table:
                if path in t:
                    return t[path]
            if not path:
                return (None, None)
            path = path[:-1]

    def problem(self, path: Iterable, message: str, fix: str | None = None, *, key: bool = False) -> Problem:
        path = tuple(path)
        line, col = self.mark(path, key=key)
        if line is None:  # the whole document (e.g. an empty file): point at its start
            line, col = 1, 1
        return Problem(message=message, file=self.file, line=line, column=col, fix=fix,
                       where=dotted(path) or None)


def dotted(path: Iterable) -> str:
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


# libyaml's parser when pyyaml was built with it (several times faster; marks are the same).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Constructor(yaml.constructor.SafeConstructor):
    pass


def _build(node: yaml.Node, path: tuple, doc: Document, ctor: _Constructor) -> Any:
    doc.value_marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN:
        raise _unreadable(doc, node, f"could not determine a constructor for the tag '{node.tag}'")
    if isinstance(node, yaml.MappingNode):
        ctor.flatten_mapping(node)
        out: dict = {}
        for key_node, value_node in node.value:
            try:
                key = ctor.construct_object(key_node, deep=True)
            except Exception as exc:  # a tagged key
                raise _unreadable(doc, key_node, exc) from None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise ConfigError(Problem("a mapping key must be a plain word", doc.file,
                                          key_node.start_mark.line + 1, key_node.start_mark.column + 1))
            if key in out:
                raise ConfigError(Problem(f"key '{key}' appears twice in the same block", doc.file,
                                          key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                          fix="keep one of them; YAML would silently use the last"))
            doc.key_marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _build(value_node, path + (key,), doc, ctor)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, path + (i,), doc, ctor) for i, item in enumerate(node.value)]
    # YAML 1.1 reads unquoted dates as date objects; the runner wants the text the person wrote.
    if node.tag == "tag:yaml.org,2002:timestamp":
        return node.value
    try:
        return ctor.construct_object(node, deep=True)
    except Exception as exc:  # e.g. a custom tag (!!python/object) the safe loader refuses
        raise _unreadable(doc, node, exc) from None


_PLAIN = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def _unreadable(doc: Document, node: yaml.Node, why) -> ConfigError:
    return ConfigError(Problem(f"cannot read this value: {why}", doc.file, node.start_mark.line + 1,
                               node.start_mark.column + 1, fix="write plain YAML values (no tags)"))


def loads(text: str, file: str = "<input>") -> Document:
    doc = Document(data=None, file=file)
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        what = exc.problem or str(exc)
        if exc.context:
            what = f"{exc.context}, {what}"
        raise ConfigError(Problem(f"this is not valid YAML: {what}", file, line, col,
                                  fix="check the indentation and quoting on this line and the one above "
                                      "(a value containing ': ' or starting with '{', '*' or '&' needs quotes)"))
    except yaml.reader.ReaderError as exc:  # a control character or invalid UTF-8: not a MarkedYAMLError
        before = text[:exc.position] if isinstance(exc.position, int) else ""
        line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        raise ConfigError(Problem(f"this is not valid YAML: the character {char} is not allowed in a YAML file",
                                  file, line, col, fix="delete the invisible character at this place (it often "
                                                       "comes from copying text from a web page or a PDF)")) from None
    except yaml.YAMLError as exc:  # defensive: report the file at least
        raise ConfigError(Problem(f"this is not valid YAML: {exc}", file, 1, 1))
    if node is None:
        doc.data = None
        return doc
    doc.data = _build(node, (), doc, _Constructor())
    return doc


def load(path: Path | str) -> Document:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(Problem(f"file not found: {path}", str(path),
                                  fix="check the path; it is relative to the directory you run the command in"))
    except UnicodeDecodeError as exc:
        raise ConfigError(Problem(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})", str(path)))
    except OSError as exc:
        raise ConfigError(Problem(f"cannot read the file: {exc.strerror}", str(path)))
    return loads(text, str(path))


# --- JSON Schema errors, told in plain words at the right place -----------------------------------------

_TYPE_NAMES = {"string": "text", "integer": "a whole number", "number": "a number", "boolean": "true or false",
               "object": "a block of keys", "array": "a list", "null": "empty"}


def _typename(value: Any) -> str:
    if value is None:
        return "empty"
    return {bool: "true/false", int: "a number", float: "a number", str: "text", list: "a list",
            dict: "a block of keys"}.get(type(value), type(value).__name__)


def schema_problems(doc: Document, errors: Iterable, *, base: tuple = ()) -> list[Problem]:
    """Turn jsonschema ValidationErrors into Problems located in `doc` (deduplicated, in file order)."""
    problems: dict[tuple, Problem] = {}
    for err in errors:
        for p in _explain(doc, err, base):
            problems.setdefault((p.line, p.column, p.message), p)
    return sorted(problems.values(), key=lambda p: (p.line or 0, p.column or 0))


def _explain(doc: Document, err, base: tuple) -> list[Problem]:
    path = base + tuple(err.absolute_path)
    schema = err.schema if isinstance(err.schema, dict) else {}
    fix = schema.get("x-fix")
    v = err.validator
    if v in ("anyOf", "oneOf") and err.context:
        # Report the branch that got furthest: the deepest error is usually the real mistake.
        best = max(err.context, key=lambda e: (len(e.absolute_path), -len(list(e.context or []))))
        inner = _explain(doc, best, base)
        if inner:
            return inner
    if v == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list((schema.get("properties") or {}).keys())
        out = []
        patterns = schema.get("patternProperties") or {}
        import re

        for key in err.instance:
            if key in allowed or any(re.search(p, str(key)) for p in patterns):
                continue
            guess = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else (
                f"allowed keys here: {', '.join(allowed)}" if allowed else None)
            out.append(doc.problem(path + (key,), f"unknown key '{key}'", fix or hint, key=True))
        return out
    if v == "required":
        missing = [m for m in err.validator_value if isinstance(err.instance, dict) and m not in err.instance]
        return [doc.problem(path, f"missing required key '{m}'", fix, key=True) for m in missing]
    if v == "type":
        want = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        want_s = " or ".join(_TYPE_NAMES.get(w, w) for w in want)
        return [doc.problem(path, f"must be {want_s}, not {_typename(err.instance)}", fix)]
    if v == "enum":
        opts = ", ".join(repr(o) for o in err.validator_value)
        return [doc.problem(path, f"{err.instance!r} is not allowed here; use one of: {opts}", fix)]
    if v == "pattern":
        desc = schema.get("x-pattern-meaning") or f"match the pattern {err.validator_value}"
        return [doc.problem(path, f"{_short(err.instance)} does not {desc}", fix)]
    if v == "const":
        return [doc.problem(path, f"must be {err.validator_value!r}", fix)]
    if v in ("minLength",) and err.instance == "":
        return [doc.problem(path, "must not be empty", fix)]
    if v == "not" and "x-not-message" in schema:
        return [doc.problem(path, schema["x-not-message"], fix)]
    return [doc.problem(path, err.message, fix)]


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "...'"
