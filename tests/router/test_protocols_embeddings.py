"""`POST /v1/embeddings` parsing: which inputs route, and the errors for the rest."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from infermesh.router.errors import ApiError
from infermesh.router.features import Route, parse_request


def _parse(body: dict[str, Any]) -> Any:
    return parse_request(Route.EMBEDDINGS, orjson.dumps(body), request_id="r1")


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        ("abcdefgh", 2),
        (["abcd", "efghij"], 3),
        ([1, 2, 3], 3),
        ([[1, 2], [3]], 3),
    ],
)
def test_embedding_inputs_are_routed_with_prompt_token_estimates(value: Any, tokens: int) -> None:
    parsed = _parse({"model": "e5", "input": value})
    features = parsed.features
    assert (features.model, features.prompt_tokens, features.stream) == ("e5", tokens, False)
    assert features.max_output_tokens == 0
    assert Route.EMBEDDINGS.label == "embeddings"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"model": "e5"}, "'input' is required"),
        ({"model": "e5", "input": []}, "an empty list"),
        ({"model": "e5", "input": ["a", 1]}, "mixed"),
        ({"model": "e5", "input": 3}, "a int"),
        ({"model": "e5", "input": "a", "stream": True}, "cannot be streamed"),
        ({"input": "a"}, "'model' is required"),
    ],
)
def test_bad_embedding_requests_are_400(body: dict[str, Any], says: str) -> None:
    with pytest.raises(ApiError) as refused:
        _parse(body)
    assert refused.value.status == 400
    assert says in refused.value.message
