"""JMESPath custom functions used by integration specs.

Every function is null-safe: a null (missing) input gives null, so a spec can
chain functions without guarding each field, and schema validation later
flags the required fields that stayed null.  Functions never guess: an
unknown currency, an unparseable date or an unknown country gives null.

Use :func:`compile` and :func:`search` (or ``compile(expr).search(data)``,
whose default options already include these functions).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import functools
import json
import re
import unicodedata
from decimal import Decimal

import jmespath
from jmespath import exceptions as _jexc
from jmespath import functions as _jfunc
from jmespath import visitor as _visitor
from jmespath.parser import ParsedResult

__all__ = [
    "RunnerFunctions",
    "OPTIONS",
    "FUNCTION_DOCS",
    "compile",
    "search",
    "currency_exponent",
    "country_code",
    "minor_to_major",
    "to_decimal",
    "parse_date",
    "DATE_FORMATS",
    "Unreadable",
    "unreadable",
    "may_be_unreadable",
    "locate",
]

signature = _jfunc.signature

FUNCTION_DOCS: dict[str, str] = {
    "minor_to_major": "minor_to_major(amount, currency, overrides?) -> exact decimal: amount in minor units "
    "(int or numeric string) divided by 10^ISO-4217 exponent; unknown currency -> null; "
    "overrides is an object like {\"ISK\": 2} for provider quirks.",
    "to_decimal": "to_decimal(value) -> exact decimal from a number or string (\"1,234.50\", \"12.5\", \"(3.00)\"); "
    "null, \"\" or unparseable -> null.",
    "unix_to_date": "unix_to_date(seconds, tz?) -> \"YYYY-MM-DD\" of a unix timestamp in UTC or in the IANA zone "
    "tz (null tz = UTC).",
    "unix_to_datetime": "unix_to_datetime(seconds) -> ISO 8601 UTC \"YYYY-MM-DDTHH:MM:SSZ\".",
    "to_date": "to_date(value, format?) -> \"YYYY-MM-DD\" from an ISO date/datetime (the date as written, offset "
    "not applied) or a strptime format such as \"%d/%m/%Y\"; unparseable -> null.",
    "parse_date": "parse_date(value, format) -> \"YYYY-MM-DD\" from a date in a named format: 'dotnet' "
    "(/Date(1700000000000+0100)/, milliseconds since the epoch; the offset, if any, gives the date as written), "
    "'DD.MM.YYYY', 'DD/MM/YYYY', 'MM/DD/YYYY', 'DD-MM-YYYY', 'YYYY-MM-DD' (a time after the date is ignored); "
    "unreadable -> null, and a verdict that names the value.",
    "regex_group": "regex_group(text, pattern) -> the first group of the pattern's first match in text (the whole "
    "match if it has no group); no match, null or non-string -> null. RE2 syntax (linear time, no back-references); "
    "reads at most the first 2,000 characters.",
    "upper": "upper(s) -> upper-cased string; null -> null.",
    "lower": "lower(s) -> lower-cased string; null -> null.",
    "trim": "trim(s) -> string without leading/trailing whitespace; null -> null.",
    "country_code": "country_code(value) -> ISO 3166-1 alpha-2 code from an alpha-2/alpha-3 code, English name, "
    "alias or local name (case/accent/punctuation-insensitive); unknown or empty -> null.",
    "coalesce": "coalesce(a, b, ...) -> first argument that is not blank (null, whitespace-only string, [], or an "
    "object whose values are all blank); else null.",
    "non_empty": "non_empty(value) -> value, or null if it is blank (null, whitespace-only string, [], or an "
    "object whose values are all blank).",
    "concat_ws": "concat_ws(sep, a, b, ...) -> the non-blank string/number arguments (arrays are flattened one "
    "level), each trimmed, joined with sep; null if none.",
    "currency_exponent": "currency_exponent(code) -> ISO 4217 minor-unit exponent (int), or null if unknown or the "
    "currency has no minor unit.",
}


class RunnerFunctionError(_jexc.JMESPathError):
    """A function was called with arguments that are a spec bug (not a data problem)."""


# ---------------------------------------------------------------------------
# Data tables (loaded lazily, once)
# ---------------------------------------------------------------------------


def _read_data(name: str):
    from importlib import resources

    return json.loads((resources.files("runner") / "data" / name).read_text(encoding="utf-8"))


@functools.cache
def _exponents() -> dict[str, int | None]:
    raw = _read_data("currencies.json")
    table: dict[str, int | None] = {}
    table.update(raw.get("withdrawn", {}))
    for code in raw.get("no_minor_unit", []):
        table[code] = None
    table.update(raw["active"])
    return table


_NON_WORD = re.compile(r"[\W_]+")
_DROP_CHARS = str.maketrans("", "", ".'\u2019`\u00b4")


def _norm_country(text: str) -> str:
    s = unicodedata.normalize("NFKD", text)
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = s.casefold().translate(_DROP_CHARS).replace("&", " and ")
    s = " ".join(_NON_WORD.sub(" ", s).split())
    if s.startswith("the "):
        s = s[4:]
    return s


@functools.cache
def _codes() -> tuple[frozenset[str], dict[str, str]]:
    """(alpha-2 codes, alpha-3 -> alpha-2): all a country already written as a code needs."""
    raw = _read_data("countries.json")
    return frozenset(raw["alpha2"]), dict(raw["alpha3"])


@functools.cache
def _names() -> dict[str, str]:
    """Normalised name/alias -> alpha-2. Built only when a country is written out in words: normalising the
    few thousand names and aliases takes tens of milliseconds, which a sync of alpha-2 codes never pays."""
    raw = _read_data("countries.json")
    names: dict[str, str] = {}
    # aliases first so official names win on a (theoretical) clash
    for alias, code in raw["aliases"].items():
        names[_norm_country(alias)] = code
    for code, name in raw["alpha2"].items():
        names[_norm_country(name)] = code
    return names


# ---------------------------------------------------------------------------
# Plain-Python implementations (also usable outside JMESPath)
# ---------------------------------------------------------------------------


# (code, id of the overrides) -> (the overrides, exponent). Every invoice asks again, with the same code and
# the same overrides object (a literal of its spec); keeping that object in the entry keeps its id unique.
_EXPONENTS: dict[tuple, tuple] = {}


def currency_exponent(code, overrides=None):
    """ISO 4217 exponent for ``code`` (any case), honouring ``overrides``; None if unknown."""
    if code is None:
        return None
    if not isinstance(code, str):
        raise RunnerFunctionError(f"currency code must be a string, got {type(code).__name__}")
    key = (code, id(overrides))
    hit = _EXPONENTS.get(key)
    if hit is not None and hit[0] is overrides:
        return hit[1]
    exp = _currency_exponent(code, overrides)
    if len(_EXPONENTS) < 10_000:
        _EXPONENTS[key] = (overrides, exp)
    return exp


def _currency_exponent(code: str, overrides) -> int | None:
    c = code.strip().upper()
    if overrides:
        for k, v in overrides.items():
            if isinstance(k, str) and k.strip().upper() == c:
                if v is not None and (type(v) is not int or v < 0):
                    raise RunnerFunctionError(f"currency exponent override for {k!r} must be an int >= 0, got {v!r}")
                return v
    return _exponents().get(c)


_DEC_STRICT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _decimal_from_minor(amount):
    t = type(amount)
    if t is int:
        return Decimal(amount)
    if t is str:
        s = amount.strip()
        if not _DEC_STRICT.fullmatch(s):
            return None
        return Decimal(s)
    if t is float:
        if amount != amount or amount in (float("inf"), float("-inf")):
            return None
        return Decimal(str(amount))
    if t is Decimal:
        return amount if amount.is_finite() else None
    raise RunnerFunctionError(f"amount must be a number or numeric string, got {t.__name__}")


_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


def minor_to_major(amount, currency, overrides=None):
    """Exact Decimal of ``amount`` minor units in ``currency``; None if either is null/unknown."""
    if amount is None or currency is None:
        return None
    exp = currency_exponent(currency, overrides)
    if exp is None:
        return None
    d = _decimal_from_minor(amount)
    if d is None:
        return None
    if exp == 0:
        return d
    return d.scaleb(-exp, _EXACT)  # the same digits, the exponent moved: no rounding in a context this wide


_THOUSANDS_COMMA = re.compile(r"\d{1,3}(,\d{3})+(\.\d*)?")
_THOUSANDS_DOT = re.compile(r"\d{1,3}(\.\d{3})+(,\d*)?")
_THOUSANDS_SPACE = re.compile(r"\d{1,3}([ '\u00a0\u202f\u2009]\d{3})+([.,]\d*)?")


def _parse_decimal_string(s: str):
    s = s.strip()
    if not s:
        return None
    neg = False
    if s[0] == "(" and s[-1] == ")":  # accounting negative: (1,234.50)
        neg, s = True, s[1:-1].strip()
    if s and s[0] in "+-":
        neg ^= s[0] == "-"
        s = s[1:].lstrip()
    if not s:
        return None
    if _DEC_STRICT.fullmatch(s):
        num = s
    elif _THOUSANDS_COMMA.fullmatch(s):
        num = s.replace(",", "")
    elif _THOUSANDS_DOT.fullmatch(s):  # 1.234,50
        num = s.replace(".", "").replace(",", ".")
    elif _THOUSANDS_SPACE.fullmatch(s):  # 1 234,50 / 1'234.50
        num = re.sub(r"[ '\u00a0\u202f\u2009]", "", s).replace(",", ".")
    elif s.count(",") == 1 and "." not in s and re.fullmatch(r"\d*,\d+", s):  # 12,5 (decimal comma)
        num = s.replace(",", ".")
    else:
        return None
    try:
        d = Decimal(num)
    except decimal.InvalidOperation:
        return None
    return -d if neg else d


def to_decimal(value):
    """Exact Decimal from a number or numeric string; None for null/empty/garbage."""
    if value is None:
        return None
    t = type(value)
    if t is int:
        return Decimal(value)
    if t is float:
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return Decimal(str(value))
    if t is Decimal:
        return value if value.is_finite() else None
    if t is str:
        return _parse_decimal_string(value)
    return None


_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()
_UTC = _dt.timezone.utc


def _seconds(value):
    """Unix seconds as int/float from a number or numeric string; None if null/garbage."""
    if value is None:
        return None
    t = type(value)
    if t is int or t is float:
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if t is Decimal:
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if t is str:
        s = value.strip()
        if not _DEC_STRICT.fullmatch(s):
            return None
        d = Decimal(s)
        return int(d) if d == d.to_integral_value() else float(d)
    raise RunnerFunctionError(f"unix timestamp must be a number or numeric string, got {t.__name__}")


@functools.lru_cache(maxsize=64)
def _zone(name: str):
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise RunnerFunctionError(f"unknown IANA time zone {name!r}") from exc


_DAYS: dict[int, str] = {}  # day number since the epoch -> ISO date: a sync's invoices share few days


def unix_to_date(seconds, tz=None):
    if tz is None and type(seconds) is int:  # the common case: whole seconds in UTC
        day = seconds // 86400
        iso = _DAYS.get(day)
        if iso is None:
            try:
                iso = _dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()
            except (ValueError, OverflowError):
                return None
            if len(_DAYS) < 100_000:
                _DAYS[day] = iso
        return iso
    s = _seconds(seconds)
    if s is None:
        return None
    zone = None if tz is None or tz.strip().upper() in ("UTC", "Z", "ETC/UTC") else _zone(tz.strip())
    try:
        if zone is None:
            return _dt.date.fromordinal(_EPOCH_ORDINAL + int(s // 86400)).isoformat()
        return _dt.datetime.fromtimestamp(s, zone).date().isoformat()
    except (ValueError, OverflowError, OSError):
        return None


def unix_to_datetime(seconds):
    s = _seconds(seconds)
    if s is None:
        return None
    try:
        dt = _dt.datetime.fromtimestamp(int(s // 1), _UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return dt.isoformat()[:19] + "Z"


def to_date(value, fmt=None):
    if value is None:
        return None
    s = value.strip()
    if not s:
        return None
    try:
        if fmt is not None:
            return _dt.datetime.strptime(s, fmt).date().isoformat()
        if len(s) == 10:
            return _dt.date.fromisoformat(s).isoformat()
        # fromisoformat keeps the wall-clock date as written in its own offset
        return _dt.datetime.fromisoformat(s).date().isoformat()
    except ValueError:
        return None


_DOTNET = re.compile(r"\\?/Date\((-?\d{1,15})(?:([+-])(\d{2})(\d{2}))?\)\\?/")
# Day-first and month-first dates are told apart only by what the spec declares: 03/04/2026 is both.
_DMY = {"DD.MM.YYYY": ".", "DD/MM/YYYY": "/", "DD-MM-YYYY": "-"}
_MDY = {"MM/DD/YYYY": "/"}
DATE_FORMATS = ("dotnet", *_DMY, *_MDY, "YYYY-MM-DD")
_NUMERIC_DATE = re.compile(r"(\d{1,4})([./-])(\d{1,2})\2(\d{1,4})(?:[ T].*)?")


def parse_date(value, fmt):
    """A date in one of the named non-ISO formats, as YYYY-MM-DD; None when it is not one."""
    if value is None:
        return None
    if fmt not in DATE_FORMATS:
        raise RunnerFunctionError(f"parse_date: unknown format {fmt!r}; formats: {', '.join(DATE_FORMATS)}")
    s = value.strip()
    if not s:
        return None
    try:
        if fmt == "dotnet":
            m = _DOTNET.fullmatch(s)
            if m is None:
                return None
            ms = int(m.group(1))
            if m.group(2):  # the writer's own offset: the date as it was on their calendar
                minutes = int(m.group(3)) * 60 + int(m.group(4))
                ms += (minutes if m.group(2) == "+" else -minutes) * 60_000
            return _dt.date.fromordinal(_EPOCH_ORDINAL + ms // 86_400_000).isoformat()
        m = _NUMERIC_DATE.fullmatch(s)
        if m is None:
            return None
        a, sep, b, c = m.groups()
        if fmt == "YYYY-MM-DD":
            y, mo, d, want = a, b, c, "-"
        elif fmt in _DMY:
            d, mo, y, want = a, b, c, _DMY[fmt]
        else:
            mo, d, y, want = a, b, c, _MDY[fmt]
        if sep != want or len(y) != 4:
            return None
        return _dt.date(int(y), int(mo), int(d)).isoformat()
    except (ValueError, OverflowError):
        return None


@functools.lru_cache(maxsize=8192)
def _country_slow(value: str):
    alpha2, alpha3 = _codes()
    s = value.strip()
    if not s:
        return None
    u = s.upper()
    if u in alpha2:
        return u
    if u in alpha3:
        return alpha3[u]
    key = _norm_country(s)
    if not key:
        return None
    ku = key.upper()
    if ku in alpha2:
        return ku
    if ku in alpha3:
        return alpha3[ku]
    return _names().get(key)


def country_code(value):
    """ISO 3166-1 alpha-2 for a code, name or alias; None if unknown/empty."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RunnerFunctionError(f"country must be a string, got {type(value).__name__}")
    if len(value) == 2 and value in _codes()[0]:  # fast path: already a valid upper-case alpha-2
        return value
    return _country_slow(value)


REGEX_INPUT = 2000  # a spec's pattern reads messages and ids, never whole documents


def user_pattern(source: str):
    """A regular expression written in a spec, compiled by RE2: it runs in time linear in the text it reads,
    where Python's backtracking `re` can take hours on a pattern like ^(a+)+$ (a spec comes from anyone's
    pull request). Raises ValueError, in words, for what RE2 cannot run (back-references, look-arounds)."""
    import re2

    options = re2.Options()
    options.log_errors = False  # RE2 would also print its complaint to stderr
    try:
        return re2.compile(source, options)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        raise ValueError(why.decode(errors="replace") if isinstance(why, bytes) else str(why)) from None


_regex = functools.lru_cache(maxsize=256)(user_pattern)


def regex_group(text, pattern):
    """The first group of the pattern's first match (e.g. an account id named in an error message)."""
    if not isinstance(text, str):
        return None
    m = _regex(pattern).search(text[:REGEX_INPUT])
    if m is None:
        return None
    return m.group(1) if _regex(pattern).groups else m.group(0)


def _is_blank(value) -> bool:
    if value is None:
        return True
    t = type(value)
    if t is str:
        return not value.strip()
    if t is list:
        return not value
    if t is dict:
        return all(_is_blank(v) for v in value.values())
    return False


def _concat_parts(parts, out):
    for p in parts:
        if p is None:
            continue
        t = type(p)
        if t is str:
            p = p.strip()
            if p:
                out.append(p)
        elif t is int or t is float or t is Decimal:
            out.append(str(p))
        elif t is list:
            _concat_parts([x for x in p if type(x) is not list], out)
        else:
            raise RunnerFunctionError(f"concat_ws() cannot join a {t.__name__}")


# ---------------------------------------------------------------------------
# JMESPath function class
# ---------------------------------------------------------------------------

_NUM_OR_STR = {"types": ["number", "string", "null"]}
_STR = {"types": ["string", "null"]}


class RunnerFunctions(_jfunc.Functions):
    """JMESPath functions for specs.

    Extends the signature format with ``"optional": True`` for trailing optional
    arguments, and treats ``decimal.Decimal`` as a JMESPath number so the output
    of ``to_decimal``/``minor_to_major`` can feed other functions (``sum``, ...).
    """

    _arity_cache: dict = {}

    def _validate_arguments(self, args, signature, function_name):
        bounds = self._arity_cache.get(function_name)
        if bounds is None or bounds[0] is not signature:
            required = sum(1 for s in signature if not s.get("optional") and not s.get("variadic"))
            variadic = bool(signature) and bool(signature[-1].get("variadic"))
            if variadic:
                required += 1
            bounds = (signature, required, None if variadic else len(signature))
            self._arity_cache[function_name] = bounds
        _, required, maximum = bounds
        n = len(args)
        if maximum is None:
            if n < required:
                raise _jexc.VariadictArityError(required, n, function_name)
        elif n < required or n > maximum:
            raise _jexc.ArityError(required if n < required else maximum, n, function_name)
        for i in range(min(n, len(signature))):
            types = signature[i]["types"]
            if types:
                self._type_check_single(args[i], types, function_name)

    _pytypes_cache: dict = {}

    def _get_allowed_pytypes(self, types):
        key = tuple(types)
        hit = self._pytypes_cache.get(key)
        if hit is None:
            allowed, subtypes = super()._get_allowed_pytypes(types)
            if "float" in allowed:
                allowed = [*allowed, "Decimal"]
            subtypes = [(*s, "Decimal") if "float" in s else s for s in subtypes]
            hit = self._pytypes_cache[key] = (allowed, subtypes)
        return hit

    @signature(_NUM_OR_STR, _STR, {"types": ["object", "null"], "optional": True})
    def _func_minor_to_major(self, amount, currency, overrides=None):
        return minor_to_major(amount, currency, overrides)

    @signature(_NUM_OR_STR)
    def _func_to_decimal(self, value):
        return to_decimal(value)

    @signature(_NUM_OR_STR, {"types": ["string", "null"], "optional": True})
    def _func_unix_to_date(self, seconds, tz=None):
        return unix_to_date(seconds, tz)

    @signature(_NUM_OR_STR)
    def _func_unix_to_datetime(self, seconds):
        return unix_to_datetime(seconds)

    @signature(_STR, {"types": ["string", "null"], "optional": True})
    def _func_to_date(self, value, fmt=None):
        return to_date(value, fmt)

    @signature(_STR, {"types": ["string"]})
    def _func_parse_date(self, value, fmt):
        return parse_date(value, fmt)

    @signature(_STR)
    def _func_upper(self, s):
        return None if s is None else s.upper()

    @signature(_STR)
    def _func_lower(self, s):
        return None if s is None else s.lower()

    @signature(_STR)
    def _func_trim(self, s):
        return None if s is None else s.strip()

    @signature(_STR)
    def _func_country_code(self, value):
        return country_code(value)

    @signature({"types": [], "variadic": True})
    def _func_coalesce(self, *args):
        for a in args:
            if not _is_blank(a):
                return a
        return None

    @signature({"types": []})
    def _func_non_empty(self, value):
        return None if _is_blank(value) else value

    @signature({"types": ["string"]}, {"types": [], "variadic": True})
    def _func_concat_ws(self, sep, *parts):
        out: list[str] = []
        _concat_parts(parts, out)
        return sep.join(out) if out else None

    @signature(_STR)
    def _func_currency_exponent(self, code):
        return currency_exponent(code)

    @signature({"types": []}, {"types": ["string"]})
    def _func_regex_group(self, text, pattern):
        return regex_group(text, pattern)


_missing_docs = (set(RunnerFunctions.FUNCTION_TABLE) - set(_jfunc.Functions.FUNCTION_TABLE)) ^ set(FUNCTION_DOCS)
if _missing_docs:  # pragma: no cover - guards against adding a function without a doc line
    raise RuntimeError(f"FUNCTION_DOCS out of sync with RunnerFunctions: {sorted(_missing_docs)}")

OPTIONS = jmespath.Options(custom_functions=RunnerFunctions())


# ---------------------------------------------------------------------------
# Strict evaluation: why an expression gave null
# ---------------------------------------------------------------------------


class Unreadable(Exception):
    """A value was present but could not be read (raised only by the strict evaluation, see `unreadable`).

    value: the value as the record has it; what: what it should have been ("a YYYY-MM-DD date");
    source: where in the record it was (a dotted path such as "customer.address.country"), when known."""

    def __init__(self, value, what: str, source: str | None = None):
        super().__init__(value, what, source)
        self.value, self.what, self.source = value, what, source

    def shown(self) -> str:
        text = repr(self.value)
        return text if len(text) <= 80 else text[:77] + "..."

    def text(self, name: str | None = None) -> str:
        """"due_date: could not read '31/31/2026' as a YYYY-MM-DD date (from due_date)"."""
        where = f" (from {self.source})" if self.source and name else ""  # name: a canonical field; source: the record's
        return f"{name or self.source or 'a value'}: could not read {self.shown()} as {self.what}{where}"

    def as_dict(self, name: str | None = None) -> dict:
        v = self.value  # kept as sent when it is a plain value of a sane size (it is stored with the verdict)
        keep = isinstance(v, (int, float, bool)) or (isinstance(v, str) and len(v) <= 200)
        return {"field": name or self.source, "value": v if keep else self.shown(), "source": self.source,
                "expected": self.what}


def _present(value) -> bool:
    return value is not None and not (type(value) is str and not value.strip())


class StrictFunctions(RunnerFunctions):
    """The runner functions, except that a present value they cannot read raises Unreadable instead of
    giving null. Only used to explain a null after the fact (never on the per-invoice path)."""

    @signature(_NUM_OR_STR, _STR, {"types": ["object", "null"], "optional": True})
    def _func_minor_to_major(self, amount, currency, overrides=None):
        out = minor_to_major(amount, currency, overrides)
        if out is None and amount is not None and currency is not None:
            if currency_exponent(currency, overrides) is None:
                raise Unreadable(currency, "an ISO 4217 currency code")
            raise Unreadable(amount, "an amount in minor units")
        return out

    @signature(_NUM_OR_STR)
    def _func_to_decimal(self, value):
        out = to_decimal(value)
        if out is None and _present(value):
            raise Unreadable(value, "a number")
        return out

    @signature(_NUM_OR_STR, {"types": ["string", "null"], "optional": True})
    def _func_unix_to_date(self, seconds, tz=None):
        out = unix_to_date(seconds, tz)
        if out is None and _present(seconds):
            raise Unreadable(seconds, "a unix timestamp")
        return out

    @signature(_NUM_OR_STR)
    def _func_unix_to_datetime(self, seconds):
        out = unix_to_datetime(seconds)
        if out is None and _present(seconds):
            raise Unreadable(seconds, "a unix timestamp")
        return out

    @signature(_STR, {"types": ["string", "null"], "optional": True})
    def _func_to_date(self, value, fmt=None):
        out = to_date(value, fmt)
        if out is None and _present(value):
            raise Unreadable(value, f"a date in the form {fmt}" if fmt else "a YYYY-MM-DD date")
        return out

    @signature(_STR, {"types": ["string"]})
    def _func_parse_date(self, value, fmt):
        out = parse_date(value, fmt)
        if out is None and _present(value):
            raise Unreadable(value, "a .NET JSON date (/Date(milliseconds)/)" if fmt == "dotnet" else f"a {fmt} date")
        return out

    @signature(_STR)
    def _func_country_code(self, value):
        out = country_code(value)
        if out is None and _present(value):
            raise Unreadable(value, "a country code or name")
        return out


# Functions whose null can mean "present but unreadable": an expression without them (and without a field
# read from a value) cannot have an unreadable input, so nothing needs explaining.
STRICT_FUNCTIONS = frozenset(name for name in StrictFunctions.FUNCTION_TABLE
                             if StrictFunctions.FUNCTION_TABLE[name]["function"] is not
                             RunnerFunctions.FUNCTION_TABLE[name]["function"])


def _chain(nodes) -> str | None:
    """The dotted path of a chain of field (and index) nodes, else None."""
    parts: list[str] = []
    for n in nodes:
        t = n.get("type")
        if t == "field":
            parts.append(str(n["value"]))
        elif t == "subexpression" or t == "index_expression":
            inner = _chain(n.get("children") or [])
            if inner is None:
                return None
            parts.append(inner)
        elif t == "index" and parts:
            parts[-1] += f"[{n['value']}]"
        else:
            return None
    return ".".join(parts) if parts else None


_NORMAL = _visitor.TreeInterpreter(OPTIONS)  # an expression's value as the mapping itself computes it


class _StrictInterpreter(_visitor.TreeInterpreter):
    """jmespath's interpreter with StrictFunctions, and a field read from a present value that is not an
    object (a customer given as a plain string) raising Unreadable instead of giving null."""

    def visit_field(self, node, value):
        if value is not None and type(value) is not dict:
            raise Unreadable(value, f"an object with a {node['value']!r} field")
        return value.get(node["value"]) if value is not None else None

    def visit_subexpression(self, node, value):
        result = value
        children = node["children"]
        for i, child in enumerate(children):
            try:
                result = self.visit(child, result)
            except Unreadable as exc:
                if exc.source is None and i > 0 and exc.value is result:
                    exc.source = _chain(children[:i])
                raise
        return result

    def visit_function_expression(self, node, value):
        # An argument that cannot be read counts as null, and only matters if the call then gives nothing: in
        # coalesce(customer.address, customer_address) an unexpanded customer id is no fault when the invoice
        # has its own address.
        args, pending = [], None
        for child in node["children"]:
            try:
                args.append(self.visit(child, value))
            except Unreadable as exc:
                pending = pending or exc
                args.append(_NORMAL.visit(child, value))  # what the argument is when read as usual
        try:
            out = self._functions.call_function(node["value"], args)
        except Unreadable as exc:
            if exc.source is None:
                exc.source = next((_source_of(child, exc.value, value) for child, arg in zip(node["children"], args)
                                   if arg is exc.value), None)
            raise
        except Exception:
            if pending is not None:
                raise pending from None
            raise
        if pending is not None and _is_blank(out):
            raise pending
        return out

    def visit_or_expression(self, node, value):
        """a || b: an unreadable `a` only matters if `b` gives nothing either."""
        try:
            left, pending = self.visit(node["children"][0], value), None
        except Unreadable as exc:
            left, pending = _NORMAL.visit(node["children"][0], value), exc
        if not self._is_false(left):
            return left
        right = self.visit(node["children"][1], value)
        if pending is not None and _is_blank(right):
            raise pending
        return right


def _source_of(node, target, data) -> str | None:
    """Where an argument's value came from: the node itself if it is a plain path, else the first plain path
    inside it (in a coalesce, say) whose value is the very value in question."""
    path = _chain([node])
    if path is not None:
        return path
    for child in node.get("children") or []:
        found = _source_of(child, target, data)
        if found is not None:
            try:
                if _visitor.TreeInterpreter(OPTIONS).visit(compile(found).parsed, data) is target:
                    return found
            except Exception:  # noqa: BLE001 - a path that cannot be read is not the source
                pass
    return None


_STRICT_OPTIONS = jmespath.Options(custom_functions=StrictFunctions())
_STRICT = _StrictInterpreter(_STRICT_OPTIONS)


def may_be_unreadable(node) -> bool:
    """Whether an expression (its AST) can give null for a present but unreadable value: it calls a function
    of STRICT_FUNCTIONS or reads a field of a field."""
    if isinstance(node, dict):
        t = node.get("type")
        if t == "subexpression" or (t == "function_expression" and node.get("value") in STRICT_FUNCTIONS):
            return True
        return any(may_be_unreadable(c) for c in node.get("children") or [])
    return False


def unreadable(node, data, hidden=()) -> Unreadable | None:
    """Evaluate an expression's AST strictly on `data`: the present value it could not read, or None (every
    value it read was readable, or absent). For explaining a null after the fact; never raises.

    `hidden`: names in `data` that are not the record's own (a spec's `let` values): a source under one of them
    is looked up again in the record, by identity, so the message names a field the user knows."""
    try:
        _STRICT.visit(node, data)
    except Unreadable as exc:
        if hidden and (exc.source is None or exc.source.split(".", 1)[0].split("[", 1)[0] in hidden):
            exc.source = locate(data, exc.value, hidden) or exc.source
        return exc
    except Exception:  # noqa: BLE001 - any other failure is reported where the expression runs normally
        return None
    return None


def locate(data, target, hidden, limit: int = 5000) -> str | None:
    """The dotted path of `target` (by identity) in `data`, outside the `hidden` top-level keys; breadth first,
    bounded."""
    if not isinstance(data, dict):
        return None
    queue = [(str(k), v) for k, v in data.items() if k not in hidden]
    seen = 0
    while queue and seen < limit:
        nxt = []
        for path, v in queue:
            seen += 1
            if v is target:
                return path
            if type(v) is dict:
                nxt.extend((f"{path}.{k}", x) for k, x in v.items())
            elif type(v) is list:
                nxt.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
        queue = nxt
    return None


class RunnerParsedResult(ParsedResult):
    """A ParsedResult whose ``search`` uses the runner functions unless told otherwise."""

    def search(self, value, options=None):
        return super().search(value, options=OPTIONS if options is None else options)


@functools.lru_cache(maxsize=4096)
def compile(expression: str) -> ParsedResult:  # noqa: A001 - mirrors jmespath.compile
    """Parse a spec expression (cached). ``.search(data)`` already uses the runner functions."""
    parsed = jmespath.compile(expression)
    return RunnerParsedResult(parsed.expression, parsed.parsed)


def search(parsed, data):
    """Evaluate a compiled expression (or an expression string) with the runner functions."""
    if isinstance(parsed, str):
        parsed = compile(parsed)
    return parsed.search(data, options=OPTIONS)
