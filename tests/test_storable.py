"""Text the databases can store (models/storable.py): a client's is refused, a downstream
service's is repaired. Through the real interfaces elsewhere (test_sessions_api,
test_chat_embedded, test_chat_resilience, test_api_fuzz); here, the rules to the letter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent_orchestrator.clients.base import downstream_json
from agent_orchestrator.models.storable import MAX_JSON_DEPTH, storable_json, storable_text


def test_downstream_json_replaces_nul_and_lone_surrogates_and_keeps_pairs() -> None:
    raw = b'{"a": "x\\u0000y", "k\\u0000": ["\\ud800", "\\ud83d\\ude00", "\\udfff!"], "n": 1}'
    assert downstream_json(raw) == {
        "a": "x\ufffdy",
        "k\ufffd": ["\ufffd", "\U0001f600", "\ufffd!"],
        "n": 1,
    }
    assert downstream_json(raw.decode()) == downstream_json(raw)


def test_downstream_json_leaves_everything_else_as_decoded() -> None:
    value = {"text": "plain \u00e9 \U0001f600", "escaped": "a\\u0000b", "list": [1.5, None, True]}
    raw = json.dumps(value)
    assert downstream_json(raw) == value  # "\\u0000" there is six characters, not a NUL


@pytest.mark.parametrize("raw", ['{"x": NaN}', '{"x": [-Infinity]}', '{"x": 1e400}'])
def test_downstream_json_refuses_numbers_json_does_not_have(raw: str) -> None:
    with pytest.raises(ValueError, match=r"not JSON|out of range"):
        downstream_json(raw)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("a\x00b", "NUL character"), ("\ud800", "lone surrogate"), ("x\udfffy", "lone surrogate")],
)
def test_client_text_that_cannot_be_stored_is_refused(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        storable_text(text)


def test_client_text_that_can_be_stored_passes_as_it_is() -> None:
    for text in ("", "plain", "\u00e9\u4e2d\U0001f600", "tab\tand\nnewline"):
        assert storable_text(text) is text


def test_metadata_may_nest_to_max_json_depth_and_no_deeper() -> None:
    def nested(levels: int) -> dict[str, Any]:
        value: Any = []
        for _ in range(levels - 2):  # the object and the innermost list are two levels
            value = [value]
        return {"x": value}

    assert storable_json(nested(MAX_JSON_DEPTH)) == nested(MAX_JSON_DEPTH)
    with pytest.raises(ValueError, match=f"nesting deeper than {MAX_JSON_DEPTH}"):
        storable_json(nested(MAX_JSON_DEPTH + 1))
