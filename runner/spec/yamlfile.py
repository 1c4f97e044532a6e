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
        plain = _indentation(text, line, what) if line else None
        if plain is not None:
            raise ConfigError(Problem(plain[0], file, line, col, fix=plain[1]))
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


# PyYAML's words for a line whose indentation matches no block around it.
_INDENT_WORDS = ("did not find expected '-' indicator", "did not find expected key", "expected <block end>",
                 "mapping values are not allowed", "cannot start any token")


def _indentation(text: str, line: int, what: str) -> tuple[str, str] | None:
    """A bad indentation in plain words: how far the line is indented, and where the blocks above start."""
    if not any(w in what for w in _INDENT_WORDS):
        return None
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return None
    here = lines[line - 1]
    if "\t" in here[:len(here) - len(here.lstrip())]:
        return (f"line {line} is indented with a tab character; YAML indents with spaces only",
                "replace the tab at the start of the line with spaces, as on the lines above")
    indent = len(here) - len(here.lstrip(" "))
    starts: list[int] = []  # where the keys of the blocks above begin, innermost first
    for above in reversed(lines[:line - 1]):
        body = above.lstrip(" ")
        if not body or body.startswith("#"):
            continue
        col = len(above) - len(body)
        if body.startswith("- "):
            col += 2 + (len(body[2:]) - len(body[2:].lstrip(" ")))
        if not starts or col < starts[-1]:
            starts.append(col)
        if col == 0:
            break
    if "cannot start any token" in what or indent in starts or not starts:
        return None
    shown = here.strip()
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    inner = [c for c in starts if c < indent]
    target = inner[0] if inner else starts[-1]
    near = min(starts, key=lambda c: abs(c - indent))
    return (f"the indentation of line {line} (`{shown}`, {indent} space{'s' if indent != 1 else ''}) matches no "
            f"block above it: the keys of the blocks above start at {' or '.join(str(c) for c in starts)} spaces",
            f"indent it by {near} spaces to continue the block above it" + (
                f" (or by {target} to end that block)" if target != near else "")
            + "; every key of a block starts in the same column")


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
    errors = list(errors)
    # A value of the wrong kind (text where a block of keys belongs) is the one thing to say about it: the
    # other rules at the same place (which shapes of block are allowed) only repeat the schema.
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    errors = [e for e in errors if e.validator == "type" or tuple(e.absolute_path) not in mistyped]
    problems: dict[tuple, Problem] = {}
    for err in errors:
        for p in _explain(doc, err, base):
            problems.setdefault((p.line, p.column, p.message), p)
    return sorted(problems.values(), key=lambda p: (p.line or 0, p.column or 0))


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _fits_type(branch: dict, value: Any) -> bool:
    want = branch.get("type")
    if want is None:
        return True
    for w in want if isinstance(want, list) else [want]:
        if w in ("integer", "number"):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif isinstance(value, _JSON_TYPES.get(w, object)):
            return True
    return False


def _chosen_branch(err) -> list | None:
    """The errors of the one branch of an anyOf/oneOf the value was meant for, or None when that is unclear:
    the only branch of the value's kind (text or a block), or the one whose tag the value names (type: jsonl)."""
    branches = err.validator_value if isinstance(err.validator_value, list) else []
    candidates = [i for i, b in enumerate(branches) if isinstance(b, dict) and _fits_type(b, err.instance)]
    if len(candidates) > 1 and isinstance(err.instance, dict):
        tagged = [i for i in candidates if any(
            isinstance(d, dict) and "const" in d and err.instance.get(k) == d["const"]
            for k, d in (branches[i].get("properties") or {}).items())]
        if len(tagged) == 1:
            candidates = tagged
    if len(candidates) != 1:
        return None
    mine = [e for e in err.context if e.relative_schema_path and e.relative_schema_path[0] == candidates[0]]
    return mine or None


def _exclusive(doc: Document, err, path: tuple, schema: dict, fix) -> list[Problem] | None:
    """A block whose keys are alternatives (a window: last, from, since...): name the ones that clash."""
    keys = schema.get("x-exclusive")
    if not keys or not isinstance(err.instance, dict):
        return None
    given = [k for k in keys if k in err.instance]
    if len(given) > 1:
        both = " and ".join(f"`{k}:`" for k in given)
        return [doc.problem(path + (given[1],), f"{both} cannot be used together: each one alone says which "
                                                f"dates to read", f"keep one of them; {fix}" if fix else None,
                            key=True)]
    if not given:
        return [doc.problem(path, f"this block needs one of {', '.join(f'`{k}:`' for k in keys)}", fix, key=True)]
    return None


def _missing_fix(schema: dict, key: str) -> str | None:
    prop = (schema.get("properties") or {}).get(key) or {}
    if "enum" in prop:
        return f"add `{key}:` with one of: {', '.join(str(o) for o in prop['enum'])}"
    if "const" in prop:
        return f"add `{key}: {prop['const']}`"
    if prop.get("x-fix"):
        return prop["x-fix"]
    if prop.get("description"):
        desc = prop["description"].rstrip(".")
        return f"add `{key}:`, {desc[:1].lower()}{desc[1:]}"
    return None


def _explain(doc: Document, err, base: tuple) -> list[Problem]:
    path = base + tuple(err.absolute_path)
    schema = err.schema if isinstance(err.schema, dict) else {}
    fix = schema.get("x-fix")
    v = err.validator
    if v in ("anyOf", "oneOf"):
        told = _exclusive(doc, err, path, schema, fix)
        if told is not None:
            return told
    if v in ("anyOf", "oneOf") and err.context:
        mine = _chosen_branch(err)
        if mine is not None:  # every mistake in the shape the value was meant to have
            out = [p for e in mine for p in _explain(doc, e, base)]
            if out:
                return out
        # Report the branch that got furthest: the deepest error is usually the real mistake.
        best = max(err.context, key=lambda e: (len(e.absolute_path), -len(list(e.context or []))))
        inner = _explain(doc, best, base)
        if inner:
            return inner
    if v == "dependentRequired" and isinstance(err.instance, dict):
        out = []
        for key, needs in (err.validator_value or {}).items():
            for need in needs:
                if key in err.instance and need not in err.instance:
                    out.append(doc.problem(path + (key,), f"`{key}:` needs `{need}:` beside it",
                                           f"add `{need}:`, or remove `{key}:`; {fix}" if fix else
                                           f"add `{need}:`, or remove `{key}:`", key=True))
        if out:
            return out
    if v == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list((schema.get("properties") or {}).keys())
        out = []
        patterns = schema.get("patternProperties") or {}
        import re

        for key in err.instance:
            if key in allowed or any(re.search(p, str(key)) for p in patterns):
                continue
            guess = difflib.get_close_matches(str(key), allowed, n=1)
            # A likely typo is the fix to show; the block's general advice only when nothing is close.
            hint = f"did you mean '{guess[0]}'?" if guess else (fix or (
                f"allowed keys here: {', '.join(allowed)}" if allowed else None))
            out.append(doc.problem(path + (key,), f"unknown key '{key}'", hint, key=True))
        return out
    if v == "required":
        missing = [m for m in err.validator_value if isinstance(err.instance, dict) and m not in err.instance]
        return [doc.problem(path, f"missing required key '{m}'", _missing_fix(schema, m) or fix, key=True)
                for m in missing]
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
