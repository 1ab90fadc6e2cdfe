"""Input the databases can store.

PostgreSQL's text and jsonb refuse the NUL character, so a NUL anywhere in a message, an
agent id or metadata (a key, a value, at any depth) reached the database and came back
as a 500; so did NaN and Infinity in metadata (Python's JSON reader takes them; JSON and
jsonb do not). A lone UTF-16 surrogate, which JSON's `\\ud800` escape can produce, has no
UTF-8 form for either database.

- A client's input with them is refused at the edge, as a 422 naming the field, and the
  OpenAPI document says so (a `pattern` on every such string, metadata to any depth).
- A downstream service's text with them is repaired instead (`repaired_json`, used by
  clients/base.py): its reply cannot be sent back for correction.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

#: No NUL character (U+0000), as a regular expression both pydantic and a JSON Schema
#: reader understand. (pydantic refuses a lone surrogate in any `str` by itself.)
NO_NUL = r"^[^\x00]*$"

StorableText = Annotated[str, StringConstraints(pattern=NO_NUL)]


def storable_text(text: str) -> str:
    """The same rule for text that no model checks (metadata's contents, token claims)."""
    if "\x00" in text:
        raise ValueError("must not contain the NUL character (U+0000)")
    if not text.isascii():  # a flag CPython keeps: ASCII text needs no encoding trial
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError("must be Unicode text (a lone surrogate is not)") from error
    return text


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400
        raise ValueError(f"number out of range: {text[:40]}")
    return number


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: One decoder for every call: `json.loads` with hooks builds a decoder and its scanner
#: per call, which was half the cost of decoding a stream event (~5 us against ~3 us).
_STRICT_DECODER = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)


def strict_json(raw: str | bytes) -> Any:
    """`json.loads`, without the numbers JSON does not have: Python's reader takes NaN,
    Infinity and 1e400 (as infinity), and PostgreSQL's jsonb refuses them (ValueError).
    Bytes are decoded as `json.loads` does (UTF-8, -16 or -32, told by their start)."""
    if not isinstance(raw, str):
        raw = raw.decode(json.detect_encoding(raw), "surrogatepass")
    return _STRICT_DECODER.decode(raw)


#: How deep client JSON (metadata; a WebSocket message) may nest. Deeper metadata was
#: stored and then broke every answer that carried it (pydantic's serializer gives up
#: past a few hundred levels): one request could make its tenant's session list a 500.
MAX_JSON_DEPTH = 32


class UnstorableJson(ValueError):
    """A value `storable_json` refuses: `path` is where (`tags[2]`, `a.b`; empty for the
    object itself), `reason` what is wrong; the text is both (`tags[2]: must not ...`)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def storable_json(value: dict[str, Any]) -> dict[str, Any]:
    """Every key, string and number of a JSON object, at any depth, and the depth itself;
    the error says where (`tags[2]: must not contain ...`, `a.b: key 'x\\x00' ...`)."""
    pending: list[tuple[Any, str, int]] = [(value, "", 1)]
    while pending:
        item, path, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise UnstorableJson(path, f"nesting deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            _stored_as_is(item, path)
        elif isinstance(item, dict):
            for key, inner in item.items():
                _stored_as_is(key, path, f"key {key[:40]!r} ")
                pending.append((inner, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(item, list):
            pending.extend(
                (inner, f"{path}[{index}]", depth + 1) for index, inner in enumerate(item)
            )
        elif isinstance(item, float) and not math.isfinite(item):
            # Python's JSON reader takes NaN, Infinity and 1e400 (read as infinity); JSON
            # has no such numbers, and PostgreSQL's jsonb refuses them.
            raise UnstorableJson(path, "must be a finite number (JSON has no NaN or Infinity)")
    return value


def _stored_as_is(text: str, path: str, what: str = "") -> None:
    try:
        storable_text(text)
    except ValueError as error:
        raise UnstorableJson(path, f"{what}{error}") from None


_TEXT_SCHEMA = {"type": "string", "pattern": NO_NUL}
_VALUE_REF = {"$ref": "#/components/schemas/StorableValue"}

#: A metadata value in the OpenAPI document, to any depth (refine_openapi adds it as the
#: component `StorableValue`: the models' own schema has no name to refer to).
VALUE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        _TEXT_SCHEMA,
        {"type": ["number", "boolean", "null"]},
        {"type": "array", "items": _VALUE_REF},
        {"type": "object", "propertyNames": _TEXT_SCHEMA, "additionalProperties": _VALUE_REF},
    ]
}

#: A JSON object from a client (metadata), storable at every depth.
StorableJson = Annotated[
    dict[str, Any],
    AfterValidator(storable_json),
    WithJsonSchema(
        {"type": "object", "propertyNames": _TEXT_SCHEMA, "additionalProperties": _VALUE_REF}
    ),
]


_REPLACEMENT = "\ufffd"


def repaired_text(text: str) -> str:
    """Text from a downstream service made storable: each NUL and lone surrogate becomes
    U+FFFD, the character Unicode keeps for what cannot be represented. A client's text is
    refused instead (above); a service's reply cannot be sent back, and failing the whole
    turn over one unprintable character would lose the rest of it."""
    if "\x00" in text:
        text = text.replace("\x00", _REPLACEMENT)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = "".join(_REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def repaired_json(value: Any) -> Any:
    """A copy of a decoded JSON value with every key and string repaired."""
    if isinstance(value, str):
        return repaired_text(value)
    if isinstance(value, dict):
        return {repaired_text(key): repaired_json(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [repaired_json(inner) for inner in value]
    return value
