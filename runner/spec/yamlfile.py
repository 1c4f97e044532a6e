"""Load a YAML file and remember where every value came from, so errors can name file:line:column.

`load(path)` returns a `Document`: the plain data (dicts, lists, scalars) plus a table from each value's
path (a tuple of keys and indexes) to its position. JSON Schema errors carry such paths, so a schema
violation becomes "config.yaml:12:5: unknown key 'widow'" instead of a traceback.
"""
from __future__ import annotations

import difflib
import os
import stat
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


# Bounds on what one config or spec file may hold. A real config is a few kilobytes; a config of thousands of
# connections stays far below them. Without them a file could take minutes and gigabytes to read: 1 MB of the
# densest YAML is about 150 MB of parsed nodes, and anchors and aliases (&a / *a) can repeat a block without
# limit ("billion laughs": 40 lines that expand to 10^9 values).
MAX_BYTES = 2 * 1024 * 1024
MAX_VALUES = 200_000  # values in the document as read, each alias use counted with everything it repeats
MAX_DEPTH = 64  # blocks inside blocks


class _Builder:
    """Turns composed YAML nodes into plain data, counting what it builds so no file can exceed the bounds."""

    def __init__(self, doc: Document):
        self.doc = doc
        self.ctor = _Constructor()
        self.count = 0
        self.aliased = False  # a block was used a second time (through an alias)
        self.built: set[int] = set()  # container nodes built at least once
        self.open: set[int] = set()  # container nodes being built (an alias to one of them is a loop)

    def _too_many(self, node: yaml.Node, mark) -> ConfigError:
        line, col = mark.line + 1, mark.column + 1
        if self.aliased:
            return ConfigError(Problem(
                f"the aliases (*name) in this file repeat their anchored blocks (&name) to more than "
                f"{MAX_VALUES:,} values", self.doc.file, line, col,
                fix="write the repeated values out, or repeat only small blocks with aliases; a file that "
                    "expands this much is usually a mistake or an attack (\"billion laughs\")"))
        return ConfigError(Problem(f"the file holds more than {MAX_VALUES:,} values", self.doc.file, line, col,
                                   fix=_TOO_MANY_FIX))

    def build(self, node: yaml.Node, path: tuple, use, repeat: bool = False) -> Any:
        """`use`: the place that holds `node`, reported when a bound is hit there. Inside a block that an alias
        repeats it stays the alias's place (a repeated node's own mark is where its anchor is)."""
        doc = self.doc
        self.count += 1
        if self.count > MAX_VALUES:
            raise self._too_many(node, use)
        doc.value_marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if node.tag not in _PLAIN:
                raise _unreadable(doc, node, f"could not determine a constructor for the tag '{node.tag}'")
            key = id(node)
            if key in self.open:
                raise ConfigError(Problem(
                    "an alias (*name) here refers to the block it is in, so the block would repeat forever",
                    doc.file, use.line + 1, use.column + 1,
                    fix="an alias may only name a block that is complete before it (&name ... then *name "
                        "outside it)"))
            if len(self.open) >= MAX_DEPTH:
                raise ConfigError(Problem(f"the blocks here are nested more than {MAX_DEPTH} deep", doc.file,
                                          node.start_mark.line + 1, node.start_mark.column + 1,
                                          fix="a config or spec needs only a few levels; check the indentation "
                                              "and the brackets"))
            if key in self.built:
                self.aliased = repeat = True
            self.built.add(key)
            self.open.add(key)
            try:
                if isinstance(node, yaml.MappingNode):
                    return self._mapping(node, path, use, repeat)
                return [self.build(item, path + (i,), use if repeat else (
                    node.start_mark if id(item) in self.built else item.start_mark), repeat)
                    for i, item in enumerate(node.value)]
            finally:
                self.open.discard(key)
        # YAML 1.1 reads unquoted dates as date objects; the runner wants the text the person wrote.
        if node.tag == "tag:yaml.org,2002:timestamp":
            return node.value
        try:
            return self.ctor.construct_object(node, deep=True)
        except Exception as exc:  # e.g. a custom tag (!!python/object) the safe loader refuses
            raise _unreadable(doc, node, exc) from None

    def _mapping(self, node: yaml.MappingNode, path: tuple, use, repeat: bool) -> dict:
        doc = self.doc
        self._flatten(node)
        out: dict = {}
        for key_node, value_node in node.value:
            # A key is a plain scalar: a block or an alias to one as a key would be built in full by PyYAML.
            if not isinstance(key_node, yaml.ScalarNode):
                if key_node.tag not in _PLAIN:
                    raise _unreadable(doc, key_node, f"could not determine a constructor for the tag '{key_node.tag}'")
                raise ConfigError(Problem("a mapping key must be a plain word", doc.file,
                                          key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                          fix=_KEY_FIX))
            try:
                key = self.ctor.construct_object(key_node, deep=True)
            except Exception as exc:  # a tagged key
                raise _unreadable(doc, key_node, exc) from None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise ConfigError(Problem("a mapping key must be a plain word", doc.file,
                                          key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                          fix=_KEY_FIX))
            if key in out:
                raise ConfigError(Problem(f"key '{key}' appears twice in the same block", doc.file,
                                          key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                          fix="keep one of them; YAML would silently use the last"))
            doc.key_marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = self.build(value_node, path + (key,), use if repeat else key_node.start_mark, repeat)
        return out

    def _flatten(self, node: yaml.MappingNode) -> None:
        """PyYAML's merge keys (`<<: *defaults`), resolved as SafeConstructor.flatten_mapping does, with each
        merged entry counted: nested merges multiply, so they can expand like aliases."""
        merge: list = []
        index = 0
        while index < len(node.value):
            key_node, value_node = node.value[index]
            if key_node.tag == "tag:yaml.org,2002:merge":
                del node.value[index]
                subnodes = [value_node] if isinstance(value_node, yaml.MappingNode) else (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else None)
                if subnodes is None or not all(isinstance(n, yaml.MappingNode) for n in subnodes):
                    raise _unreadable(self.doc, value_node, "a merge key (<<) needs a block of keys or a list "
                                                            "of them")
                for sub in reversed(subnodes):
                    if id(sub) in self.open:
                        raise ConfigError(Problem(
                            "a merge (<<: *name) here refers to the block it is in", self.doc.file,
                            key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                            fix="merge only a block that is complete before this one"))
                    self.open.add(id(sub))
                    try:
                        self._flatten(sub)
                    finally:
                        self.open.discard(id(sub))
                    self.count += len(sub.value)
                    self.aliased = True
                    if self.count > MAX_VALUES:
                        raise self._too_many(node, key_node.start_mark)
                    merge.extend(sub.value)
            elif key_node.tag == "tag:yaml.org,2002:value":
                key_node.tag = "tag:yaml.org,2002:str"
                index += 1
            else:
                index += 1
        if merge:
            node.value = merge + node.value


_KEY_FIX = "write the key as a plain word followed by ': ' (a list, a block or an alias cannot be a key)"
_PLAIN = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


def _unreadable(doc: Document, node: yaml.Node, why) -> ConfigError:
    return ConfigError(Problem(f"cannot read this value: {why}", doc.file, node.start_mark.line + 1,
                               node.start_mark.column + 1, fix="write plain YAML values (no tags)"))


_NODE_EVENTS = (yaml.ScalarEvent, yaml.AliasEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)


def _count_values(text: str, file: str) -> None:
    """Refuse a file of too many values before PyYAML composes them all (150 MB and seconds a megabyte):
    its events stream past and are counted, holding nothing. Only a large file pays for the second pass."""
    count = 0
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, _NODE_EVENTS):
                count += 1
                if count > MAX_VALUES:
                    mark = event.start_mark
                    raise ConfigError(Problem(f"the file holds more than {MAX_VALUES:,} values", file,
                                              mark.line + 1, mark.column + 1, fix=_TOO_MANY_FIX))
    except yaml.YAMLError:
        return  # composing it again reports the error at its place


_TOO_MANY_FIX = "check that this is the right file; split a very long list of connections over several config files"


def loads(text: str, file: str = "<input>") -> Document:
    doc = Document(data=None, file=file)
    if len(text) > 256 * 1024:
        _count_values(text, file)
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
    doc.data = _Builder(doc).build(node, (), node.start_mark)
    return doc


class NotRegular(OSError):
    """The path names something other than a regular file (a folder, a pipe, a device), or one too large."""

    def __init__(self, reason: str, *, too_large: bool = False):
        super().__init__(reason)
        self.too_large = too_large


def _kind(mode: int) -> str:
    return ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")


def read_regular(path: Path | str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A pipe or a device (/dev/zero, a FIFO) would hang
    the reader or never end: it is opened without blocking and refused by its type before anything is read.
    Raises FileNotFoundError, NotRegular, or another OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(f"it is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise NotRegular(f"it is {_size(st.st_size)}, more than the {_size(limit)} allowed", too_large=True)
        chunks, total = [], 0
        while total <= limit:  # the file may grow while it is read
            chunk = os.read(fd, limit + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise NotRegular(f"it is more than the {_size(limit)} allowed", too_large=True)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KB" if n >= 1024 else f"{n} bytes"


def load(path: Path | str) -> Document:
    path = Path(path)
    try:
        raw = read_regular(path, MAX_BYTES)
        # As Path.read_text reads it: line breaks of any system become \n.
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except FileNotFoundError:
        raise ConfigError(Problem(f"file not found: {path}", str(path),
                                  fix="check the path; it is relative to the directory you run the command in"))
    except UnicodeDecodeError as exc:
        raise ConfigError(Problem(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})", str(path)))
    except NotRegular as exc:
        fix = (f"check that this is the right file: a config or spec is a few kilobytes (at most {_size(MAX_BYTES)}); "
               "split a very long list of connections over several configs") if exc.too_large else (
            "name the YAML file itself: configs and specs are read only from regular files")
        raise ConfigError(Problem(f"cannot use {path} as a config or integration spec: {exc}", str(path), fix=fix))
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
