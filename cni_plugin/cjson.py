"""Strict JSON for the plugin's CNI path, through CPython's C accelerator ``_json`` without importing ``json``.

Deviation from the standard library, for start-up time: ``import json`` pulls in re, enum, functools and
collections, a large share of the start-up budget kubelet pays on every pod ADD and DEL (docs/benchmarks.md, P1).
``_json`` is the C scanner and encoder that ``json`` itself uses, so values, escaping and number handling are
exactly json's; this module only supplies what json's Python layer adds around them (whitespace, trailing data,
the error type). tests/cni/test_cjson.py checks it against ``json`` on arbitrary input. Stricter than json.loads:
NaN/Infinity are refused in both directions and only UTF-8 bytes are accepted.
"""

import _json


class _ScannerContext:
    """The attributes ``_json.make_scanner`` reads from a decoder (what json.JSONDecoder provides)."""

    __slots__ = ("strict", "object_hook", "object_pairs_hook", "parse_float", "parse_int", "parse_constant")

    def __init__(self) -> None:
        self.strict = True
        self.object_hook = None
        self.object_pairs_hook = None
        self.parse_float = float
        self.parse_int = int
        self.parse_constant = _refuse_constant


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _refuse_type(value: object) -> None:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_WHITESPACE = " \t\n\r"
# typeshed types the context as a make_scanner itself (a TODO there: it is a duck type).
_scan_once = _json.make_scanner(_ScannerContext())  # type: ignore[arg-type]
# make_encoder(markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys, allow_nan):
# no circular-reference markers (values come from parsed JSON, which has no cycles), the C encoder has no indent.
_encode_compact = _json.make_encoder(None, _refuse_type, _json.encode_basestring_ascii, None, ":", ",",
                                     False, False, False)
_encode_sorted = _json.make_encoder(None, _refuse_type, _json.encode_basestring_ascii, None, ":", ",",
                                    True, False, False)


def loads(data: bytes | str) -> object:
    """Parse one JSON document. Raises ValueError (a JSONDecodeError or UnicodeDecodeError) or RecursionError."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if text.startswith("\ufeff"):
        raise ValueError("JSON text starts with a byte-order mark")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        _raise_decode_error("Expecting value", text, stop.value)
    rest = len(text) - len(text[end:].lstrip(_WHITESPACE))
    if rest != len(text):
        _raise_decode_error("Extra data", text, rest)
    return value


def _scan(text: str, start: int) -> tuple[object, int]:
    try:
        return _scan_once(text, start)
    except SystemError:
        # _json raises syntax errors as json.decoder.JSONDecodeError, which CPython 3.11 looks up in sys.modules
        # only (raise_errmsg); when json was never imported it fails without an exception. Import it on this error
        # path and scan again to get the real error.
        import json.decoder  # noqa: F401

        return _scan_once(text, start)


def dumps(value: object, sort_keys: bool = False) -> str:
    """Compact, ASCII-only JSON text of ``value``; NaN and Infinity are refused (ValueError)."""
    return "".join((_encode_sorted if sort_keys else _encode_compact)(value, 0))


def _raise_decode_error(message: str, text: str, position: int) -> None:
    from json import JSONDecodeError  # only on the error path, where start-up time no longer matters

    raise JSONDecodeError(message, text, position)
